//! The operator's own install: namespace, ServiceAccount, RBAC and Deployment. One definition,
//! used by `kab install --print`, by the OLM bundle, and by the end-to-end tests that run the
//! operator under exactly this RBAC.

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::json;

/// Namespace the operator is installed in by default.
pub const NAMESPACE: &str = "kab-system";
/// Name of the operator's ServiceAccount, ClusterRole and bindings.
pub const NAME: &str = "kab-operator";

/// One RBAC rule of the operator and why it needs it.
pub struct Grant {
    /// API groups.
    pub groups: &'static [&'static str],
    /// Resources.
    pub resources: &'static [&'static str],
    /// Verbs.
    pub verbs: &'static [&'static str],
    /// Why the operator needs it.
    pub why: &'static str,
}

const CHILD_VERBS: &[&str] = &[
    "get", "list", "watch", "create", "update", "patch", "delete",
];

/// The operator's cluster-wide rules. No wildcards; each rule says why.
pub const CLUSTER_GRANTS: &[Grant] = &[
    Grant {
        groups: &["kab.dev"],
        resources: &["kabstacks"],
        verbs: &["get", "list", "watch", "patch", "update"],
        why: "watch every KabStack; patch adds and removes the kab.dev/cleanup finalizer",
    },
    Grant {
        groups: &["kab.dev"],
        resources: &["kabstacks/status"],
        verbs: &["get", "patch", "update"],
        why: "write the aggregated status (server-side apply on the status subresource)",
    },
    Grant {
        groups: &["kab.dev"],
        resources: &["kabstacks/finalizers"],
        verbs: &["update"],
        why: "children carry a blocking ownerReference to their KabStack (OwnerReferencesPermissionEnforcement)",
    },
    Grant {
        groups: &["apiextensions.k8s.io"],
        resources: &["customresourcedefinitions"],
        verbs: CHILD_VERBS,
        why: "creating each stack's entity API is the product; delete only with deletionPolicy Delete",
    },
    Grant {
        groups: &["admissionregistration.k8s.io"],
        resources: &["validatingwebhookconfigurations"],
        verbs: CHILD_VERBS,
        why: "register each stack's business-rule webhook, scoped to the stack's namespace and entity",
    },
    Grant {
        groups: &[""],
        resources: &["serviceaccounts", "configmaps", "services", "secrets"],
        verbs: CHILD_VERBS,
        why: "children of a stack: identities, runtime config, the webhook and broker Services, the webhook certificates",
    },
    Grant {
        groups: &[""],
        resources: &["pods"],
        verbs: &["get", "list", "watch"],
        why: "name a crash-looping pod in the stack's status (read only)",
    },
    Grant {
        groups: &["", "events.k8s.io"],
        resources: &["events"],
        verbs: &["create", "patch"],
        why: "Warning Events on the KabStack when a reconcile fails",
    },
    Grant {
        groups: &["apps"],
        resources: &["deployments", "statefulsets"],
        verbs: CHILD_VERBS,
        why: "the webhook, entity controller and broker workloads",
    },
    Grant {
        groups: &["policy"],
        resources: &["poddisruptionbudgets"],
        verbs: CHILD_VERBS,
        why: "keep the webhook available during node drains",
    },
    Grant {
        groups: &["networking.k8s.io"],
        resources: &["networkpolicies"],
        verbs: CHILD_VERBS,
        why: "admit broker clients only from the stack's pods",
    },
    Grant {
        groups: &["rbac.authorization.k8s.io"],
        resources: &["roles", "rolebindings"],
        verbs: CHILD_VERBS,
        why: "least-privilege Roles for each stack's webhook, controller, readers and writers",
    },
    Grant {
        groups: &["rbac.authorization.k8s.io"],
        resources: &["roles"],
        verbs: &["escalate", "bind"],
        why: "the Roles grant access to entity groups that only exist at run time; without escalate+bind the \
              operator would itself need those permissions on every group, i.e. a wildcard. Limited to \
              namespaced Roles: no ClusterRole can be created or bound",
    },
];

/// Rules of the operator's namespaced Role (leader election).
pub const NAMESPACE_GRANTS: &[Grant] = &[Grant {
    groups: &["coordination.k8s.io"],
    resources: &["leases"],
    verbs: &["get", "create", "update", "patch"],
    why: "leader election: one operator replica reconciles at a time",
}];

/// The rules as k8s-openapi values.
pub fn policy_rules(grants: &[Grant]) -> Vec<PolicyRule> {
    grants
        .iter()
        .map(|g| PolicyRule {
            api_groups: Some(g.groups.iter().map(|s| s.to_string()).collect()),
            resources: Some(g.resources.iter().map(|s| s.to_string()).collect()),
            verbs: g.verbs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .collect()
}

/// The operator's container image for this release.
pub fn operator_image() -> String {
    crate::render::Settings::default().kab_image
}

fn labels() -> serde_json::Value {
    json!({"app.kubernetes.io/name": "kab", "app.kubernetes.io/component": "operator", "app.kubernetes.io/part-of": "kab"})
}

/// The operator Deployment's spec (also the OLM install strategy's deployment spec).
pub fn deployment_spec(image: &str) -> serde_json::Value {
    json!({
        "replicas": 1,
        "selector": {"matchLabels": {"app.kubernetes.io/name": "kab", "app.kubernetes.io/component": "operator"}},
        "template": {
            "metadata": {"labels": labels()},
            "spec": {
                "serviceAccountName": NAME,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "operator",
                    "image": image,
                    "args": ["operator", "--leader-elect", "--log-format", "json"],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "KAB_WATCH_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['olm.targetNamespaces']"}}},
                        // Explicit, so that a mirrored install (OLM rewrites the CSV's images)
                        // runs every stack on the same images as the operator.
                        {"name": "KAB_IMAGE", "value": image},
                        {"name": "KAB_NATS_IMAGE", "value": crate::render::Settings::default().nats_image},
                    ],
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
                    "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
                    "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                                  "limits": {"cpu": "1", "memory": "256Mi"}},
                    "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                        "capabilities": {"drop": ["ALL"]}},
                }],
            },
        },
    })
}

fn yaml_rules(grants: &[Grant], out: &mut String) {
    out.push_str("rules:\n");
    for g in grants {
        out.push_str(&format!("  # {}\n", g.why));
        let list = |v: &[&str]| {
            v.iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!("  - apiGroups: [{}]\n", list(g.groups)));
        out.push_str(&format!("    resources: [{}]\n", list(g.resources)));
        out.push_str(&format!("    verbs: [{}]\n", list(g.verbs)));
    }
}

/// The plain install as multi-document YAML, every RBAC rule commented with why.
pub fn manifests(namespace: &str, image: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    out.push_str(
        "# kab operator install: kab install --print | kubectl apply --server-side -f -\n",
    );
    out.push_str(&crate::crd_yaml()?);
    let ns = json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": namespace, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}});
    let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": NAME, "namespace": namespace, "labels": labels()}});
    for obj in [ns, sa] {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&obj)?);
    }
    out.push_str(&format!(
        "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: {NAME}\n  labels:\n    app.kubernetes.io/name: kab\n"
    ));
    yaml_rules(CLUSTER_GRANTS, &mut out);
    out.push_str(&format!(
        "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {NAME}\n  labels:\n    app.kubernetes.io/name: kab\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: {NAME}\nsubjects:\n  - kind: ServiceAccount\n    name: {NAME}\n    namespace: {namespace}\n"
    ));
    out.push_str(&format!(
        "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: {NAME}\n  namespace: {namespace}\n  labels:\n    app.kubernetes.io/name: kab\n"
    ));
    yaml_rules(NAMESPACE_GRANTS, &mut out);
    out.push_str(&format!(
        "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: {NAME}\n  namespace: {namespace}\n  labels:\n    app.kubernetes.io/name: kab\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: {NAME}\nsubjects:\n  - kind: ServiceAccount\n    name: {NAME}\n    namespace: {namespace}\n"
    ));
    let mut spec = deployment_spec(image);
    // Outside OLM there is no olm.targetNamespaces annotation: watch every namespace.
    if let Some(env) = spec
        .pointer_mut("/template/spec/containers/0/env")
        .and_then(|e| e.as_array_mut())
    {
        env.retain(|e| e["name"] != "KAB_WATCH_NAMESPACE");
    }
    let deploy = json!({"apiVersion": "apps/v1", "kind": "Deployment",
                        "metadata": {"name": NAME, "namespace": namespace, "labels": labels()}, "spec": spec});
    out.push_str("---\n");
    out.push_str(&serde_saphyr::to_string(&deploy)?);
    Ok(out)
}

/// Creates the KabStack CRD if it is missing (used by `kab dev` and the tests; in a cluster the
/// install manifests carry it).
pub async fn ensure_crd(client: &kube::Client) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = crate::api::KabStack::crd();
    let name = crd.metadata.name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply("kab-install").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    kube::runtime::wait::await_condition(
        api,
        &name,
        kube::runtime::wait::conditions::is_crd_established(),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_rbac_has_no_wildcards_and_says_why() {
        for g in CLUSTER_GRANTS.iter().chain(NAMESPACE_GRANTS) {
            for v in g.groups.iter().chain(g.resources).chain(g.verbs) {
                assert!(!v.contains('*'), "wildcard in {:?}", g.resources);
            }
            assert!(g.why.len() > 20, "rule on {:?} must say why", g.resources);
        }
        // escalate/bind only on namespaced Roles, never on ClusterRoles.
        let escalating: Vec<_> = CLUSTER_GRANTS
            .iter()
            .filter(|g| g.verbs.contains(&"escalate") || g.verbs.contains(&"bind"))
            .collect();
        assert_eq!(escalating.len(), 1);
        assert_eq!(escalating[0].resources, &["roles"]);
    }

    #[test]
    fn manifests_parse_and_bind_only_our_role() {
        let text = manifests(NAMESPACE, "example/kab:dev").unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
        let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "CustomResourceDefinition",
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
                "Deployment"
            ]
        );
        for d in &docs {
            if let Some(role) = d.pointer("/roleRef/name") {
                assert_eq!(
                    role, NAME,
                    "no binding to cluster-admin or any role but ours"
                );
            }
        }
        let cr: k8s_openapi::api::rbac::v1::ClusterRole =
            serde_json::from_value(docs[3].clone()).unwrap();
        assert_eq!(cr.rules.unwrap().len(), CLUSTER_GRANTS.len());
        let _: k8s_openapi::api::apps::v1::Deployment =
            serde_json::from_value(docs[7].clone()).unwrap();
    }
}
