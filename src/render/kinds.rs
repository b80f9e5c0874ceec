//! The kinds a template may produce, and the typed check every rendered object passes.

use std::any::TypeId;
use std::sync::LazyLock;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::ApiResource;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// A kind a template may produce.
pub struct SupportedKind {
    /// Group, version, kind and plural of the kind.
    pub resource: ApiResource,
    /// Whether objects of the kind live in a namespace.
    pub namespaced: bool,
    check: fn(&Value) -> Result<(), String>,
}

impl std::fmt::Debug for SupportedKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupportedKind")
            .field("resource", &self.resource)
            .field("namespaced", &self.namespaced)
            .finish_non_exhaustive()
    }
}

impl SupportedKind {
    fn of<K>() -> Self
    where
        K: kube::Resource<DynamicType = ()> + DeserializeOwned + Serialize,
        K::Scope: 'static,
    {
        SupportedKind {
            resource: ApiResource::erase::<K>(&()),
            namespaced: TypeId::of::<K::Scope>() == TypeId::of::<NamespaceResourceScope>(),
            check: check_as::<K>,
        }
    }

    /// Checks that `object` is a valid object of this kind: it deserializes into the k8s-openapi
    /// type and no field is lost on the way (a misspelt or misplaced field is an error naming it).
    pub fn check(&self, object: &Value) -> Result<(), String> {
        (self.check)(object)
    }
}

static KINDS: LazyLock<Vec<SupportedKind>> = LazyLock::new(|| {
    vec![
        SupportedKind::of::<ServiceAccount>(),
        SupportedKind::of::<Role>(),
        SupportedKind::of::<RoleBinding>(),
        SupportedKind::of::<ConfigMap>(),
        SupportedKind::of::<Secret>(),
        SupportedKind::of::<Service>(),
        SupportedKind::of::<Deployment>(),
        SupportedKind::of::<StatefulSet>(),
        SupportedKind::of::<PodDisruptionBudget>(),
        SupportedKind::of::<NetworkPolicy>(),
        SupportedKind::of::<CustomResourceDefinition>(),
        SupportedKind::of::<ValidatingWebhookConfiguration>(),
    ]
});

/// Every kind a template may produce (and so every kind the operator applies and prunes).
pub fn kinds() -> &'static [SupportedKind] {
    &KINDS
}

/// The supported kind with this `apiVersion` and `kind`.
pub fn kind_for(api_version: &str, kind: &str) -> Option<&'static SupportedKind> {
    kinds()
        .iter()
        .find(|k| k.resource.api_version == api_version && k.resource.kind == kind)
}

fn check_as<K: DeserializeOwned + Serialize>(object: &Value) -> Result<(), String> {
    let typed: K = serde_json::from_value(object.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match lost(object, &back, &mut String::new()) {
        None => Ok(()),
        Some(problem) => Err(problem),
    }
}

/// The first field of `original` that did not survive the typed round trip into `back`.
fn lost(original: &Value, back: &Value, path: &mut String) -> Option<String> {
    match (original, back) {
        (Value::Object(original), Value::Object(back)) => {
            for (key, value) in original {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                let problem = match back.get(key) {
                    None if value.is_null() => None,
                    None => Some(format!("unknown field `{path}`")),
                    Some(b) => lost(value, b, path),
                };
                if problem.is_some() {
                    return problem;
                }
                path.truncate(len);
            }
            None
        }
        (Value::Array(original), Value::Array(back)) if original.len() == back.len() => {
            for (i, (value, b)) in original.iter().zip(back).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                if let Some(problem) = lost(value, b, path) {
                    return Some(problem);
                }
                path.truncate(len);
            }
            None
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => None,
        (a, b) if a == b => None,
        (a, b) => Some(format!("field `{path}`: {a} is read as {b}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cluster_scoped_kinds_are_known() {
        let crd = kind_for("apiextensions.k8s.io/v1", "CustomResourceDefinition").unwrap();
        assert!(!crd.namespaced);
        assert_eq!(crd.resource.plural, "customresourcedefinitions");
        let vwc = kind_for(
            "admissionregistration.k8s.io/v1",
            "ValidatingWebhookConfiguration",
        );
        assert!(!vwc.unwrap().namespaced);
        let deployment = kind_for("apps/v1", "Deployment").unwrap();
        assert!(deployment.namespaced);
        assert!(kind_for("v1", "Pod").is_none());
    }

    #[test]
    fn a_misspelt_field_is_named() {
        let deployment = kind_for("apps/v1", "Deployment").unwrap();
        let object = json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
            "spec": {"replica": 2, "selector": {}, "template": {}},
        });
        assert_eq!(
            deployment.check(&object).unwrap_err(),
            "unknown field `spec.replica`"
        );
        let object = json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
            "spec": {"replicas": "two", "selector": {}, "template": {}},
        });
        assert!(
            deployment
                .check(&object)
                .unwrap_err()
                .contains("invalid type")
        );
    }
}
