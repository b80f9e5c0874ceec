//! Health of the parts of a stack, as pure functions of what the API server shows: pods,
//! Deployments, StatefulSets, entity CRDs and KabStack status. The operator's status, `kab status`
//! and the index all read health from here.

use crate::api::KabStackStatus;
use crate::status;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use std::sync::Arc;

const FAILING_REASONS: [&str; 6] = [
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The first failing pod, described: `pod x CrashLoopBackOff (3 restarts)`.
pub fn failing_pod(pods: &[Arc<Pod>]) -> Option<String> {
    let mut sorted: Vec<&Arc<Pod>> = pods.iter().collect();
    sorted.sort_by_key(|p| p.name_any());
    for p in sorted {
        let Some(status) = &p.status else { continue };
        for cs in status.container_statuses.iter().flatten() {
            let waiting = cs.state.as_ref().and_then(|s| s.waiting.as_ref());
            if let Some(w) = waiting
                && let Some(reason) = &w.reason
                && FAILING_REASONS.contains(&reason.as_str())
            {
                return Some(format!(
                    "pod {} {} ({} restarts)",
                    p.name_any(),
                    reason,
                    cs.restart_count
                ));
            }
        }
        if status.phase.as_deref() == Some("Failed") {
            return Some(format!(
                "pod {} Failed: {}",
                p.name_any(),
                status.message.clone().unwrap_or_default()
            ));
        }
    }
    None
}

/// The first pod that cannot be scheduled, described (not a failure: it may resolve itself).
pub fn unscheduled_pod(pods: &[Arc<Pod>]) -> Option<String> {
    let mut sorted: Vec<&Arc<Pod>> = pods.iter().collect();
    sorted.sort_by_key(|p| p.name_any());
    sorted.into_iter().find_map(|p| {
        let c = p
            .status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
        Some(format!(
            "pod {} {}: {}",
            p.name_any(),
            c.reason.clone().unwrap_or_else(|| "Pending".into()),
            c.message.clone().unwrap_or_default()
        ))
    })
}

/// Pure: `(ready, failing, message)` of a Deployment and its pods.
pub fn deployment_health(d: &Deployment, pods: &[Arc<Pod>]) -> (bool, bool, String) {
    deployment_health_with(d, || pods.to_vec())
}

/// [`deployment_health`], listing the pods only when the Deployment is not ready.
pub fn deployment_health_with(
    d: &Deployment,
    pods: impl FnOnce() -> Vec<Arc<Pod>>,
) -> (bool, bool, String) {
    let desired = d.spec.replicas.unwrap_or(1);
    let st = d.status.clone().unwrap_or_default();
    let available = st.available_replicas.unwrap_or(0);
    let updated = st.updated_replicas.unwrap_or(0);
    let current = st.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
    let ready = current && available >= desired && updated >= desired;
    let mut msg = format!("{available}/{desired} available");
    if ready {
        return (true, false, msg);
    }
    let deadline = st.conditions.iter().flatten().find(|c| {
        c.type_.as_deref() == Some("Progressing")
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    let pods = pods();
    let pods = pods.as_slice();
    let failing_pod = failing_pod(pods);
    if let Some(p) = &failing_pod {
        msg.push_str(": ");
        msg.push_str(p);
    } else if deadline.is_some() {
        msg.push_str(": ProgressDeadlineExceeded");
    } else if let Some(p) = unscheduled_pod(pods) {
        msg.push_str(": ");
        msg.push_str(&p);
    } else if !current {
        msg.push_str(": rollout not observed yet");
    }
    (false, failing_pod.is_some() || deadline.is_some(), msg)
}

/// Pure: `(ready, failing, message)` of a StatefulSet and its pods.
pub fn statefulset_health(s: &StatefulSet, pods: &[Arc<Pod>]) -> (bool, bool, String) {
    statefulset_health_with(s, || pods.to_vec())
}

/// [`statefulset_health`], listing the pods only when the StatefulSet is not ready.
pub fn statefulset_health_with(
    s: &StatefulSet,
    pods: impl FnOnce() -> Vec<Arc<Pod>>,
) -> (bool, bool, String) {
    let desired = s.spec.replicas.unwrap_or(1);
    let st = s.status.clone().unwrap_or_default();
    let ready_n = st.ready_replicas.unwrap_or(0);
    let current = st.observed_generation.unwrap_or(0) >= s.metadata.generation.unwrap_or(0);
    let ready = current && ready_n >= desired;
    let mut msg = format!("{ready_n}/{desired} ready");
    if ready {
        return (true, false, msg);
    }
    let pods = pods();
    let pods = pods.as_slice();
    let failing_pod = failing_pod(pods);
    if let Some(p) = failing_pod
        .as_ref()
        .cloned()
        .or_else(|| unscheduled_pod(pods))
    {
        msg.push_str(": ");
        msg.push_str(&p);
    }
    (false, failing_pod.is_some(), msg)
}

/// Pure: `(ready, failing, message)` of an entity CRD: Established and serving, or why not.
pub fn crd_health(crd: &CustomResourceDefinition) -> (bool, bool, String) {
    let conds = crd
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    let condition = |type_: &str, status: &str| {
        conds
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
    };
    if let Some(c) = condition("NamesAccepted", "False") {
        return (
            false,
            true,
            format!(
                "names not accepted: {}",
                c.message.clone().unwrap_or_default()
            ),
        );
    }
    if condition("Established", "True").is_none() {
        return (false, false, "not Established yet".into());
    }
    let served: Vec<&str> = crd
        .spec
        .versions
        .iter()
        .filter(|v| v.served)
        .map(|v| v.name.as_str())
        .collect();
    (
        true,
        false,
        format!("Established, serving {}", served.join(", ")),
    )
}

/// The status, for callers that only need to read it.
pub fn ready(status: Option<&KabStackStatus>) -> bool {
    status
        .and_then(|s| status::condition(s, "Ready"))
        .is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_looping_pod_is_named() {
        let d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "todo-webhook", "namespace": "shop", "generation": 1},
            "spec": {"replicas": 2, "selector": {}, "template": {}},
            "status": {"observedGeneration": 1, "availableReplicas": 1, "updatedReplicas": 2}
        }))
        .unwrap();
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "todo-webhook-abc", "namespace": "shop"},
            "status": {"phase": "Running", "containerStatuses": [{
                "name": "webhook", "image": "x", "imageID": "", "ready": false, "restartCount": 4,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}}
            }]}
        }))
        .unwrap();
        let (ready, failing, msg) = deployment_health(&d, &[Arc::new(pod)]);
        assert!(!ready);
        assert!(failing);
        assert_eq!(
            msg,
            "1/2 available: pod todo-webhook-abc CrashLoopBackOff (4 restarts)"
        );
    }

    #[test]
    fn an_available_deployment_is_ready() {
        let d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "todo-controller", "generation": 2},
            "spec": {"replicas": 1, "selector": {}, "template": {}},
            "status": {"observedGeneration": 2, "availableReplicas": 1, "updatedReplicas": 1}
        }))
        .unwrap();
        assert_eq!(
            deployment_health(&d, &[]),
            (true, false, "1/1 available".to_string())
        );
    }
}
