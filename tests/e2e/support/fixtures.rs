//! Manifests that pass the `restricted` Pod Security level (which every
//! `ctx.namespace()` enforces).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use serde_json::json;

/// The label that makes KWOK crash-loop a pod (see `tests/kwok/`).
pub const SIMULATE_LABEL: &str = "kab.dev/simulate";
/// Its value for a crash-looping pod.
pub const CRASH_LOOP: &str = "crash-loop";

/// A restricted-compliant pod spec running one pause container. Its grace
/// period is 0: the namespace controller then finishes deleting a namespace
/// in ~5 s instead of ~10 s (KWOK deletes pods at once either way).
pub fn restricted_pod_spec() -> PodSpec {
    serde_json::from_value(json!({
        "terminationGracePeriodSeconds": 0,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "containers": [{
            "name": "main",
            "image": "registry.k8s.io/pause:3.10",
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "capabilities": { "drop": ["ALL"] },
            },
        }],
    }))
    .expect("fixture is a valid manifest")
}

/// A restricted-compliant Pod with `labels`.
pub fn pod(name: &str, labels: &[(&str, &str)]) -> Pod {
    let mut pod = Pod::default();
    pod.metadata.name = Some(name.to_string());
    pod.metadata.labels = Some(to_map(labels));
    pod.spec = Some(restricted_pod_spec());
    pod
}

/// A restricted-compliant Deployment of `replicas` pods labelled `app=<name>`
/// plus `pod_labels`.
pub fn deployment(name: &str, replicas: i32, pod_labels: &[(&str, &str)]) -> Deployment {
    let mut labels = to_map(pod_labels);
    labels.insert("app".into(), name.to_string());
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": labels },
                "spec": restricted_pod_spec(),
            },
        },
    }))
    .expect("fixture is a valid manifest")
}

/// A restricted-compliant StatefulSet of `replicas` pods labelled
/// `app=<name>`, each with a 1Gi claim `data` (of the plane's default
/// StorageClass, which KWOK binds at once).
pub fn statefulset(name: &str, replicas: i32) -> StatefulSet {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": { "name": name },
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": restricted_pod_spec(),
            },
            "volumeClaimTemplates": [{
                "metadata": { "name": "data" },
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": { "requests": { "storage": "1Gi" } },
                },
            }],
        },
    }))
    .expect("fixture is a valid manifest")
}

fn to_map(labels: &[(&str, &str)]) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
