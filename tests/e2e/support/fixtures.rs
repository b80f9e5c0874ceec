//! Manifests that pass the `restricted` Pod Security level (which every
//! `ctx.namespace()` enforces).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use serde_json::json;

/// The label that makes KWOK crash-loop a pod (see `tests/kwok/`).
pub const SIMULATE_LABEL: &str = "kab.dev/simulate";
/// Its value for a crash-looping pod.
pub const CRASH_LOOP: &str = "crash-loop";

/// A restricted-compliant pod spec running one pause container.
pub fn restricted_pod_spec() -> PodSpec {
    serde_json::from_value(json!({
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

fn to_map(labels: &[(&str, &str)]) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
