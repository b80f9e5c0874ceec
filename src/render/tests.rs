//! Render tests: golden output of every example, and the properties a reader of the manifests
//! would check by eye.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PodTemplateSpec, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::*;
use crate::api::{BrokerMode, JetStreamStorage, KabStack, SubjectKind, SubjectRef};

const EXAMPLES: [&str; 4] = ["minimal", "todo", "external-broker", "no-broker"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn example(name: &str) -> KabStack {
    let path = root().join("examples").join(format!("{name}.yaml"));
    let text = std::fs::read_to_string(&path).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn render_stack(stack: &KabStack) -> Rendered {
    render(
        &Templates::embedded(),
        stack,
        &Settings::default(),
        &Facts::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

fn typed<K: DeserializeOwned>(rendered: &Rendered, kind: &str, name: &str) -> K {
    let child = rendered
        .get(kind, name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {:?}", inventory(rendered)));
    serde_json::from_value(serde_json::to_value(&child.object).unwrap()).unwrap()
}

fn inventory(rendered: &Rendered) -> Vec<String> {
    rendered
        .children
        .iter()
        .map(|c| format!("{} {}", c.kind(), c.name()))
        .collect()
}

fn pod_templates(rendered: &Rendered) -> Vec<(String, PodTemplateSpec)> {
    rendered
        .children
        .iter()
        .filter_map(|c| {
            let template = c.object.data.pointer("/spec/template")?;
            Some((
                c.name().to_owned(),
                serde_json::from_value(template.clone()).unwrap(),
            ))
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn golden_output_of_every_example() {
    let bless = crate::bless();
    for name in EXAMPLES {
        let yaml = to_yaml(&render_stack(&example(name)));
        let path = root().join("tests/golden").join(format!("{name}.yaml"));
        if bless {
            std::fs::write(&path, &yaml).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e} (run with KAB_BLESS=1 to write it)", path.display())
        });
        assert!(
            yaml == expected,
            "render of examples/{name}.yaml differs from {}; run with KAB_BLESS=1 and review the diff",
            path.display()
        );
    }
}

#[test]
fn yaml_output_reads_back_as_the_same_objects() {
    for name in EXAMPLES {
        let rendered = render_stack(&example(name));
        let documents: Vec<Value> = serde_saphyr::from_multiple(&to_yaml(&rendered)).unwrap();
        let objects: Vec<Value> = rendered
            .children
            .iter()
            .map(|c| serde_json::to_value(&c.object).unwrap())
            .collect();
        assert_eq!(documents, objects, "{name}");
    }
}

#[test]
fn every_child_of_every_example_is_a_valid_object_of_its_kind() {
    for name in EXAMPLES {
        for child in render_stack(&example(name)).children {
            let supported = kind_for(&child.resource.api_version, child.kind()).unwrap();
            let value = serde_json::to_value(&child.object).unwrap();
            supported
                .check(&value)
                .unwrap_or_else(|e| panic!("{name}/{}: {e}", child.template));
            assert_eq!(child.namespaced, supported.namespaced);
        }
    }
}

#[test]
fn the_todo_stack_has_every_child_in_dependency_order() {
    let rendered = render_stack(&example("todo"));
    assert_eq!(
        inventory(&rendered),
        [
            "Role todo-controller",
            "RoleBinding todo-controller",
            "ServiceAccount todo-controller",
            "Role todo-kab-probe",
            "RoleBinding todo-kab-probe",
            "Role todo-reader",
            "RoleBinding todo-reader",
            "Role todo-webhook",
            "RoleBinding todo-webhook",
            "ServiceAccount todo-webhook",
            "Role todo-writer",
            "RoleBinding todo-writer",
            "CustomResourceDefinition todos.todo.example.com",
            "ConfigMap todo-config",
            "ConfigMap todo-broker-config",
            "Service todo-broker-headless",
            "NetworkPolicy todo-broker",
            "Service todo-broker",
            "StatefulSet todo-broker",
            "Deployment todo-webhook",
            "PodDisruptionBudget todo-webhook",
            "Service todo-webhook",
            "ValidatingWebhookConfiguration todo.shop.kab.dev",
            "Deployment todo-controller",
        ]
    );
    let order: Vec<_> = rendered
        .children
        .iter()
        .map(|c| (c.step, c.template))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted);
}

#[test]
fn rendering_some_templates_gives_the_same_children_as_the_whole_render() {
    let stack = example("todo");
    let all = render_stack(&stack);
    let wanted = [
        "webhook-registration.yaml.hbs",
        "webhook-service.yaml.hbs",
        "not-a-template.yaml.hbs",
    ];
    let some = render_only(
        &Templates::embedded(),
        &stack,
        &Settings::default(),
        &Facts::default(),
        |file| wanted.contains(&file),
    )
    .unwrap();
    let templates: Vec<&str> = some.children.iter().map(|c| c.template).collect();
    assert_eq!(
        templates,
        ["webhook-service.yaml.hbs", "webhook-registration.yaml.hbs"]
    );
    for child in &some.children {
        let same = all
            .children
            .iter()
            .find(|c| c.template == child.template)
            .unwrap();
        assert_eq!(
            serde_json::to_value(&same.object).unwrap(),
            serde_json::to_value(&child.object).unwrap()
        );
    }
    let none = render_only(
        &Templates::embedded(),
        &stack,
        &Settings::default(),
        &Facts::default(),
        |_| false,
    )
    .unwrap();
    assert!(none.children.is_empty());
}

#[test]
fn webhook_pods_are_restricted_and_mount_the_serving_certificate_only() {
    let rendered = render_stack(&example("todo"));
    let deployment: Deployment = typed(&rendered, "Deployment", "todo-webhook");
    let spec = deployment.spec;
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("todo-webhook"));
    assert_eq!(pod.automount_service_account_token, Some(true));

    let security = pod.security_context.unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.run_as_user, Some(65532));
    assert_eq!(security.seccomp_profile.unwrap().type_, "RuntimeDefault");

    let container = &pod.containers[0];
    assert_eq!(
        container.args.as_deref().unwrap(),
        [
            "webhook",
            "--config",
            "/etc/kab/stack.json",
            "--tls-dir",
            "/etc/kab/tls"
        ]
    );
    let security = container.security_context.clone().unwrap();
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.capabilities.unwrap().drop.unwrap(), ["ALL"]);
    let readiness = container.readiness_probe.clone().unwrap().http_get.unwrap();
    assert_eq!(
        (readiness.path.as_deref(), readiness.scheme.as_deref()),
        (Some("/readyz"), Some("HTTPS"))
    );

    let volumes = pod.volumes.unwrap();
    let secrets: Vec<_> = volumes
        .iter()
        .filter_map(|v| v.secret.as_ref()?.secret_name.clone())
        .collect();
    assert_eq!(
        secrets,
        ["todo-webhook-tls"],
        "the CA key Secret is never mounted"
    );
    let mounts: Vec<_> = container
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(mounts, ["/etc/kab", "/etc/kab/tls"]);

    let service: Service = typed(&rendered, "Service", "todo-webhook");
    let port = &service.spec.unwrap().ports.unwrap()[0];
    assert_eq!(port.port, 443);
}

#[test]
fn every_pod_of_every_example_is_restricted_and_bounded() {
    for name in EXAMPLES {
        let rendered = render_stack(&example(name));
        let stack = example(name);
        for (workload, template) in pod_templates(&rendered) {
            let what = format!("{name}/{workload}");
            let pod_labels = template.metadata.as_ref().unwrap().labels.clone().unwrap();
            assert_eq!(
                pod_labels.get(LABEL_STACK),
                stack.metadata.name.as_ref(),
                "{what}"
            );
            assert!(pod_labels.contains_key(LABEL_COMPONENT), "{what}");
            let annotations = template.metadata.unwrap().annotations.unwrap();
            assert_eq!(annotations[ANNOTATION_CONFIG_HASH].len(), 16, "{what}");

            let pod = template.spec.unwrap();
            let security = pod.security_context.unwrap();
            assert_eq!(security.run_as_non_root, Some(true), "{what}");
            assert!(security.run_as_user.is_some_and(|uid| uid > 0), "{what}");
            assert_eq!(
                security.seccomp_profile.unwrap().type_,
                "RuntimeDefault",
                "{what}"
            );
            assert!(
                pod.automount_service_account_token.is_some(),
                "{what}: say whether a token is needed"
            );
            for container in pod
                .containers
                .iter()
                .chain(pod.init_containers.iter().flatten())
            {
                let security = container.security_context.clone().unwrap();
                assert_eq!(security.allow_privilege_escalation, Some(false), "{what}");
                assert_eq!(security.read_only_root_filesystem, Some(true), "{what}");
                assert_eq!(
                    security.capabilities.unwrap().drop.unwrap(),
                    ["ALL"],
                    "{what}"
                );
                let resources = container.resources.clone().unwrap();
                for bounds in [resources.requests.unwrap(), resources.limits.unwrap()] {
                    assert!(
                        bounds.contains_key("cpu") && bounds.contains_key("memory"),
                        "{what}"
                    );
                }
            }
        }
    }
}

#[test]
fn registration_covers_the_entity_in_the_stack_namespace_only() {
    let stack = example("todo");
    let facts = Facts {
        ca_bundle_pem: Some(
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        ),
    };
    let rendered = render(&Templates::embedded(), &stack, &Settings::default(), &facts).unwrap();
    let registration: ValidatingWebhookConfiguration = typed(
        &rendered,
        "ValidatingWebhookConfiguration",
        "todo.shop.kab.dev",
    );
    let webhook = &registration.webhooks.unwrap()[0];
    assert_eq!(webhook.name, "todo.shop.kab.dev");
    // The namespace is a matchCondition, evaluated only after the rules matched an entity write;
    // a namespaceSelector would be matched on every write in the cluster.
    assert_eq!(webhook.namespace_selector, None);
    let conditions = webhook.match_conditions.clone().unwrap();
    assert_eq!(
        conditions
            .iter()
            .map(|c| (c.name.as_str(), c.expression.as_str()))
            .collect::<Vec<_>>(),
        [("in-stack-namespace", r#"request.namespace == "shop""#)]
    );
    assert_eq!(webhook.match_policy.as_deref(), Some("Exact"));
    assert_eq!(
        webhook.rules.clone().unwrap()[0].api_versions.as_deref(),
        Some(&["*".to_owned()][..]),
        "Exact matching covers every version only because the rule names them all"
    );
    let service = webhook.client_config.service.clone().unwrap();
    assert_eq!(
        (
            service.namespace.as_str(),
            service.name.as_str(),
            service.path.as_deref(),
            service.port
        ),
        ("shop", "todo-webhook", Some("/validate"), Some(443))
    );
    assert_eq!(
        webhook.client_config.ca_bundle.as_ref().unwrap().0,
        facts.ca_bundle_pem.unwrap().as_bytes()
    );
    let rule = &webhook.rules.as_ref().unwrap()[0];
    assert_eq!(rule.api_groups.as_deref().unwrap(), ["todo.example.com"]);
    assert_eq!(rule.resources.as_deref().unwrap(), ["todos"]);
    assert_eq!(
        rule.operations.as_deref().unwrap(),
        ["CREATE", "UPDATE", "DELETE"]
    );
    assert_eq!(webhook.side_effects, "NoneOnDryRun");
    assert_eq!(webhook.failure_policy.as_deref(), Some("Fail"));
    assert_eq!(webhook.timeout_seconds, Some(5));

    let without_ca = render_stack(&stack);
    let registration: ValidatingWebhookConfiguration = typed(
        &without_ca,
        "ValidatingWebhookConfiguration",
        "todo.shop.kab.dev",
    );
    assert_eq!(
        registration.webhooks.unwrap()[0].client_config.ca_bundle,
        None
    );
}

#[test]
fn reader_and_writer_roles_only_when_someone_is_listed() {
    let mut stack = example("todo");
    let rendered = render_stack(&stack);
    let reader: Role = typed(&rendered, "Role", "todo-reader");
    assert_eq!(reader.rules.unwrap()[0].verbs, ["get", "list", "watch"]);
    let binding: RoleBinding = typed(&rendered, "RoleBinding", "todo-reader");
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", "reporting", Some("shop"))
    );

    stack.spec.rbac.readers.clear();
    let rendered = render_stack(&stack);
    assert!(rendered.get("Role", "todo-reader").is_none());
    assert!(rendered.get("RoleBinding", "todo-reader").is_none());
    assert!(rendered.get("Role", "todo-writer").is_some());

    let minimal = render_stack(&example("minimal"));
    for name in ["notes-reader", "notes-writer"] {
        assert!(minimal.get("Role", name).is_none() && minimal.get("RoleBinding", name).is_none());
    }
}

#[test]
fn rbac_subjects_name_their_namespace_or_api_group() {
    let rendered = render_stack(&example("external-broker"));
    let binding: RoleBinding = typed(&rendered, "RoleBinding", "orders-writer");
    let subjects: Vec<_> = binding
        .subjects
        .unwrap()
        .into_iter()
        .map(|s| (s.kind, s.name, s.namespace, s.api_group))
        .collect();
    assert_eq!(
        subjects,
        [
            (
                "ServiceAccount".into(),
                "checkout".into(),
                Some("storefront".into()),
                None
            ),
            (
                "Group".into(),
                "sales-admins".into(),
                None,
                Some("rbac.authorization.k8s.io".into())
            ),
        ]
    );
}

#[test]
fn roles_list_explicit_verbs_and_never_a_wildcard() {
    for name in EXAMPLES {
        for child in render_stack(&example(name))
            .children
            .iter()
            .filter(|c| c.kind() == "Role")
        {
            let text = serde_json::to_string(&child.object.data).unwrap();
            assert!(!text.contains('*'), "{name}/{}: {text}", child.template);
        }
    }
    let rendered = render_stack(&example("todo"));
    let controller: Role = typed(&rendered, "Role", "todo-controller");
    let rules: Vec<_> = controller
        .rules
        .unwrap()
        .into_iter()
        .map(|r| (r.resources.unwrap().join(","), r.verbs.join(",")))
        .collect();
    assert!(rules.contains(&("todos/status".into(), "get,update,patch".into())));
    assert!(rules.contains(&("todos/finalizers".into(), "update".into())));
}

#[test]
fn managed_broker_storage_picks_the_workload() {
    let mut stack = example("todo");
    let rendered = render_stack(&stack);
    let statefulset: StatefulSet = typed(&rendered, "StatefulSet", "todo-broker");
    let spec = statefulset.spec;
    assert_eq!(spec.service_name.as_deref(), Some("todo-broker-headless"));
    let claim = &spec.volume_claim_templates.unwrap()[0];
    let size = &claim
        .spec
        .as_ref()
        .unwrap()
        .resources
        .as_ref()
        .unwrap()
        .requests
        .as_ref()
        .unwrap()["storage"];
    assert_eq!(size.0, "2Gi");
    let container = &spec.template.spec.unwrap().containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some("docker.io/library/nats:2.15.2-alpine")
    );
    assert_eq!(
        container.command.as_deref().unwrap(),
        ["nats-server", "--config", "/etc/nats/nats.conf"]
    );
    assert!(rendered.get("Deployment", "todo-broker").is_none());

    stack.spec.broker.jetstream.storage = JetStreamStorage::Memory;
    let rendered = render_stack(&stack);
    assert!(rendered.get("StatefulSet", "todo-broker").is_none());
    assert!(rendered.get("Service", "todo-broker-headless").is_none());
    let _: Deployment = typed(&rendered, "Deployment", "todo-broker");

    for mode in [BrokerMode::None, BrokerMode::External] {
        stack.spec.broker.mode = mode;
        stack.spec.broker.url = (mode == BrokerMode::External).then(|| "nats://nats:4222".into());
        let rendered = render_stack(&stack);
        assert!(
            rendered.step(Step::Broker).next().is_none(),
            "{mode:?}: {:?}",
            inventory(&rendered)
        );
    }
}

#[test]
fn clustered_broker_routes_to_every_server() {
    let mut stack = example("todo");
    stack.spec.broker.replicas = 3;
    let rendered = render_stack(&stack);
    let config: ConfigMap = typed(&rendered, "ConfigMap", "todo-broker-config");
    let conf = &config.data.unwrap()["nats.conf"];
    for i in 0..3 {
        assert!(
            conf.contains(&format!(
                "nats://todo-broker-{i}.todo-broker-headless.shop.svc:6222"
            )),
            "{conf}"
        );
    }
    assert!(conf.contains("store_dir: /data"));
    assert!(conf.contains("http_port: 8222"));
    let single = render_stack(&example("todo"));
    let config: ConfigMap = typed(&single, "ConfigMap", "todo-broker-config");
    assert!(!config.data.unwrap()["nats.conf"].contains("cluster"));
}

#[test]
fn broker_network_policy_admits_the_stack_and_its_declared_clients() {
    let mut stack = example("todo");
    let rendered = render_stack(&stack);
    let policy: NetworkPolicy = typed(&rendered, "NetworkPolicy", "todo-broker");
    let ingress = policy.spec.unwrap().ingress.unwrap();
    let clients: Vec<_> = ingress[0]
        .from
        .clone()
        .unwrap()
        .into_iter()
        .map(|peer| peer.pod_selector.unwrap().match_labels.unwrap())
        .collect();
    assert_eq!(
        clients,
        [
            labels(&[("kab.dev/stack", "todo")]),
            labels(&[("app", "todo-api")])
        ]
    );
    assert_eq!(
        ingress[0].ports.as_ref().unwrap()[0].port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(4222))
    );

    // No clientPodLabels: no empty selector, which would admit every pod of the namespace.
    stack.spec.broker.client_pod_labels.clear();
    let rendered = render_stack(&stack);
    let policy: NetworkPolicy = typed(&rendered, "NetworkPolicy", "todo-broker");
    assert_eq!(
        policy.spec.unwrap().ingress.unwrap()[0]
            .from
            .as_ref()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn disruption_budget_only_with_two_webhook_replicas_or_more() {
    assert!(
        render_stack(&example("todo"))
            .get("PodDisruptionBudget", "todo-webhook")
            .is_some()
    );
    let single = render_stack(&example("no-broker"));
    assert!(
        single
            .get("PodDisruptionBudget", "inventory-webhook")
            .is_none()
    );
}

#[test]
fn controller_mounts_external_broker_credentials() {
    let rendered = render_stack(&example("external-broker"));
    let deployment: Deployment = typed(&rendered, "Deployment", "orders-controller");
    let pod = deployment.spec.template.spec.unwrap();
    let secrets: Vec<_> = pod
        .volumes
        .unwrap()
        .iter()
        .filter_map(|v| v.secret.as_ref()?.secret_name.clone())
        .collect();
    assert_eq!(secrets, ["orders-nats-creds"]);
    assert_eq!(
        pod.containers[0].args.as_deref().unwrap(),
        ["entity-controller", "--config", "/etc/kab/stack.json"]
    );

    let todo = render_stack(&example("todo"));
    let deployment: Deployment = typed(&todo, "Deployment", "todo-controller");
    assert!(
        deployment
            .spec
            .template
            .spec
            .unwrap()
            .volumes
            .unwrap()
            .iter()
            .all(|v| v.secret.is_none())
    );
}

#[test]
fn entity_crd_merges_kab_status_with_the_application_status() {
    let rendered = render_stack(&example("external-broker"));
    let crd: CustomResourceDefinition = typed(
        &rendered,
        "CustomResourceDefinition",
        "orders.sales.example.com",
    );
    let labels = crd.metadata.labels.unwrap();
    assert!(
        !labels.contains_key(LABEL_STACK),
        "the entity CRD is shared between stacks"
    );
    assert_eq!(labels[LABEL_COMPONENT], "entity-api");
    assert_eq!(crd.metadata.owner_references, None);
    let spec = crd.spec;
    assert_eq!(spec.scope, "Namespaced");
    assert_eq!(spec.names.list_kind.as_deref(), Some("OrderList"));
    assert_eq!(spec.names.categories.as_deref().unwrap(), ["kab"]);
    let storage: Vec<_> = spec
        .versions
        .iter()
        .map(|v| (v.name.as_str(), v.storage))
        .collect();
    assert_eq!(storage, [("v1", false), ("v2", true)]);

    let v2 = &spec.versions[1];
    let schema = serde_json::to_value(
        v2.schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        schema["properties"]["spec"]["required"],
        json!(["number", "amount"])
    );
    let status = &schema["properties"]["status"]["properties"];
    assert_eq!(status["shipped"], json!({"type": "boolean"}));
    assert_eq!(
        status["kab"]["properties"]["publishedGeneration"]["format"],
        "int64"
    );
    assert_eq!(
        status["kab"]["properties"]["conditions"]["x-kubernetes-list-map-keys"],
        json!(["type"])
    );
    assert!(v2.subresources.as_ref().unwrap().status.is_some());
    let columns: Vec<_> = v2
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["Amount", "Shipped", "Age"]);
}

#[test]
fn a_status_schema_may_not_take_kabs_place() {
    let mut stack = example("external-broker");
    stack.spec.entity.versions[1].status_schema =
        Some(json!({"type": "object", "properties": {"kab": {"type": "string"}}}));
    let err = render(
        &Templates::embedded(),
        &stack,
        &Settings::default(),
        &Facts::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("`kab` is reserved"), "{err}");
}

#[test]
fn code_sets_labels_namespace_and_owner_on_every_child() {
    let mut stack = example("todo");
    for child in render_stack(&stack).children {
        let meta = &child.object.metadata;
        assert_eq!(
            meta.owner_references, None,
            "offline render has no uid, so no owner"
        );
        let labels = meta.labels.clone().unwrap();
        assert_eq!(labels[LABEL_MANAGED_BY], "kab");
        assert_eq!(labels[LABEL_PART_OF], "kab");
        assert_eq!(labels[LABEL_COMPONENT], child.step.component());
        if child.step != Step::EntityApi {
            assert_eq!(
                (
                    labels[LABEL_STACK].as_str(),
                    labels[LABEL_STACK_NAMESPACE].as_str()
                ),
                ("todo", "shop")
            );
        }
        assert_eq!(
            meta.namespace.is_some(),
            child.namespaced,
            "{}",
            child.template
        );
    }

    stack.metadata.uid = Some("0b7c5d2e-1111-2222-3333-444455556666".into());
    for child in render_stack(&stack).children {
        let owners = child
            .object
            .metadata
            .owner_references
            .clone()
            .unwrap_or_default();
        if !child.namespaced {
            assert!(
                owners.is_empty(),
                "{}: a cluster-scoped child cannot have a namespaced owner",
                child.template
            );
            continue;
        }
        let owner = &owners[0];
        assert_eq!(
            (
                owner.api_version.as_str(),
                owner.kind.as_str(),
                owner.name.as_str(),
                owner.uid.as_str()
            ),
            (
                "kab.dev/v1alpha1",
                "KabStack",
                "todo",
                "0b7c5d2e-1111-2222-3333-444455556666"
            )
        );
        assert_eq!(
            (owner.controller, owner.block_owner_deletion),
            (Some(true), Some(true))
        );
    }
}

#[test]
fn stack_config_is_what_the_webhook_and_controller_read() {
    let stack = example("todo");
    let config = stack_config(&stack);
    assert_eq!(
        config["stack"],
        json!({"name": "todo", "namespace": "shop"})
    );
    // With a uid (a stored stack), the webhook's claims can be owned by the stack.
    let mut stored = stack.clone();
    stored.metadata.uid = Some("0b7c5d2e-1111-2222-3333-444455556666".into());
    let stored_config = stack_config(&stored);
    assert_eq!(
        stored_config["stack"],
        json!({"name": "todo", "namespace": "shop", "uid": "0b7c5d2e-1111-2222-3333-444455556666"})
    );
    let read: crate::webhook::StackConfig =
        serde_json::from_value(stored_config).expect("the webhook reads it");
    let owner = read.stack.owner_reference().expect("owner reference");
    assert_eq!(
        (
            owner.api_version.as_str(),
            owner.kind.as_str(),
            owner.name.as_str()
        ),
        ("kab.dev/v1alpha1", "KabStack", "todo")
    );
    assert_eq!(owner.uid, "0b7c5d2e-1111-2222-3333-444455556666");
    assert_eq!(
        owner.block_owner_deletion, None,
        "needs no permission on the stack"
    );
    let unstored: crate::webhook::StackConfig =
        serde_json::from_value(config.clone()).expect("the webhook reads it");
    assert!(unstored.stack.owner_reference().is_none());
    assert_eq!(
        config["entity"],
        json!({"group": "todo.example.com", "kind": "Todo", "plural": "todos", "singular": "todo",
               "versions": ["v1"], "storageVersion": "v1"})
    );
    assert_eq!(
        config["rules"][0],
        json!({"name": "unique-code", "unique": {"fields": ["spec.code"]}})
    );
    assert_eq!(
        config["rules"][2],
        json!({"name": "at-most-1000", "maxCount": 1000})
    );
    assert_eq!(config["controller"]["subjectPrefix"], "kab");
    assert_eq!(
        config["controller"]["notify"]["url"],
        "http://todo-api.shop.svc/notifications"
    );
    assert_eq!(config["broker"]["url"], "nats://todo-broker.shop.svc:4222");
    assert_eq!(config["broker"]["mode"], "Managed");
    assert_eq!(
        config["webhook"],
        json!({"port": 8443, "tlsDir": "/etc/kab/tls"})
    );

    let external = stack_config(&example("external-broker"));
    assert_eq!(external["broker"]["url"], "nats://nats.messaging.svc:4222");
    assert_eq!(external["broker"]["credentialsSecret"], "orders-nats-creds");
    assert_eq!(
        stack_config(&example("no-broker"))["broker"]["url"],
        Value::Null
    );

    // The ConfigMap holds exactly that, and the pods carry its hash.
    let rendered = render_stack(&stack);
    let config_map: ConfigMap = typed(&rendered, "ConfigMap", "todo-config");
    let stored: Value = serde_json::from_str(&config_map.data.unwrap()["stack.json"]).unwrap();
    assert_eq!(stored, config);
}

#[test]
fn a_config_change_rolls_the_pods() {
    let hash = |stack: &KabStack, name: &str| {
        let deployment: Deployment = typed(&render_stack(stack), "Deployment", name);
        deployment
            .spec
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()[ANNOTATION_CONFIG_HASH]
            .clone()
    };
    let mut stack = example("todo");
    let before = hash(&stack, "todo-webhook");
    assert_eq!(before, hash(&stack, "todo-controller"));
    stack.spec.rules.pop();
    assert_ne!(before, hash(&stack, "todo-webhook"));
    // Replicas are not configuration: they do not roll the pods.
    let mut scaled = example("todo");
    scaled.spec.webhook.replicas = 4;
    assert_eq!(before, hash(&scaled, "todo-webhook"));
}

#[test]
fn names_and_selector() {
    let stack = example("todo");
    let names = names(&stack);
    assert_eq!(names.webhook_tls_secret, "todo-webhook-tls");
    assert_eq!(names.webhook_ca_secret, "todo-webhook-ca");
    assert_eq!(names.registration, "todo.shop.kab.dev");
    assert_eq!(names.crd, "todos.todo.example.com");
    assert_eq!(
        selector_for(&stack),
        "app.kubernetes.io/managed-by=kab,kab.dev/stack=todo,kab.dev/stack-namespace=shop"
    );
    assert_eq!(
        stack_labels(&stack),
        labels(&[
            ("app.kubernetes.io/managed-by", "kab"),
            ("app.kubernetes.io/part-of", "kab"),
            ("kab.dev/stack", "todo"),
            ("kab.dev/stack-namespace", "shop"),
        ])
    );
}

#[test]
fn images_come_from_settings_unless_the_stack_overrides_them() {
    assert_eq!(
        Settings::default().kab_image,
        format!("ghcr.io/kab-dev/kab:{}", env!("CARGO_PKG_VERSION"))
    );
    let mut stack = example("todo");
    stack.spec.images.kab = Some("registry.example.com/kab:dev".into());
    let rendered = render_stack(&stack);
    let deployment: Deployment = typed(&rendered, "Deployment", "todo-controller");
    assert_eq!(
        deployment.spec.template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("registry.example.com/kab:dev")
    );
    let broker: StatefulSet = typed(&rendered, "StatefulSet", "todo-broker");
    assert_eq!(
        broker.spec.template.spec.unwrap().containers[0].image,
        Some(Settings::default().nats_image)
    );
}

/// Every string a user controls, made of what could break a YAML template built by string
/// substitution: quotes, line breaks, handlebars, document markers, anchors, aliases, mapping and
/// comment indicators.
const HOSTILE: &str = "x\" y' \n---\nkind: Secret\n{{names.webhook}} &anchor *alias : # comment\n- [a, {b: c}] \t\\ \u{2028} \u{85} \u{7f} |\n>";

fn hostile(tag: &str) -> String {
    format!("{tag} {HOSTILE}")
}

#[test]
fn hostile_strings_arrive_as_data_and_never_add_an_object() {
    let mut stack = example("todo");
    let count = render_stack(&stack).children.len();

    let spec = &mut stack.spec;
    spec.entity.group = hostile("group");
    spec.entity.kind = hostile("kind");
    spec.entity.short_names = vec![hostile("short")];
    spec.entity.versions[0].name = hostile("version");
    spec.entity.versions[0].schema["properties"]["code"]["description"] =
        json!(hostile("description"));
    spec.entity.versions[0].schema["properties"][hostile("property")] = json!({"type": "string"});
    spec.entity.versions[0].printer_columns[0].json_path = hostile("path");
    spec.rules[0].name = hostile("rule");
    spec.controller.subject_prefix = hostile("prefix");
    spec.images.kab = Some(hostile("kab-image"));
    spec.images.nats = Some(hostile("nats-image"));
    spec.broker.jetstream.size = hostile("size");
    spec.broker.client_pod_labels = BTreeMap::from([
        (hostile("key"), hostile("value")),
        (hostile("long").repeat(40), "v".into()),
    ]);
    spec.controller.notify.as_mut().unwrap().url = hostile("notify").repeat(100);
    spec.rbac.readers = vec![SubjectRef {
        kind: SubjectKind::User,
        name: hostile("reader"),
        namespace: None,
    }];
    spec.rbac.writers = vec![SubjectRef {
        kind: SubjectKind::ServiceAccount,
        name: hostile("writer"),
        namespace: Some(hostile("ns")),
    }];

    let rendered = render_stack(&stack);
    assert_eq!(rendered.children.len(), count, "{:?}", inventory(&rendered));
    assert!(rendered.children.iter().all(|c| c.kind() != "Secret"));

    let crd: CustomResourceDefinition = typed(
        &rendered,
        "CustomResourceDefinition",
        &stack.spec.entity.crd_name(),
    );
    assert_eq!(crd.spec.group, hostile("group"));
    assert_eq!(crd.spec.names.kind, hostile("kind"));
    assert_eq!(crd.spec.names.short_names.unwrap(), [hostile("short")]);
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, hostile("version"));
    let schema = serde_json::to_value(
        version
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        schema["properties"]["spec"],
        stack.spec.entity.versions[0].schema
    );
    assert_eq!(
        version.additional_printer_columns.as_ref().unwrap()[0].json_path,
        hostile("path")
    );

    let reader: RoleBinding = typed(&rendered, "RoleBinding", "todo-reader");
    assert_eq!(reader.subjects.unwrap()[0].name, hostile("reader"));
    let writer: RoleBinding = typed(&rendered, "RoleBinding", "todo-writer");
    assert_eq!(writer.subjects.unwrap()[0].namespace, Some(hostile("ns")));
    let role: Role = typed(&rendered, "Role", "todo-reader");
    assert_eq!(
        role.rules.unwrap()[0].api_groups.as_deref().unwrap(),
        [hostile("group")]
    );

    let webhook: Deployment = typed(&rendered, "Deployment", "todo-webhook");
    assert_eq!(
        webhook.spec.template.spec.unwrap().containers[0].image,
        Some(hostile("kab-image"))
    );
    let broker: StatefulSet = typed(&rendered, "StatefulSet", "todo-broker");
    let broker = broker.spec;
    assert_eq!(
        broker.template.spec.unwrap().containers[0].image,
        Some(hostile("nats-image"))
    );
    let claim = broker.volume_claim_templates.unwrap()[0]
        .spec
        .clone()
        .unwrap();
    assert_eq!(
        claim.resources.unwrap().requests.unwrap()["storage"].0,
        hostile("size")
    );
    let policy: NetworkPolicy = typed(&rendered, "NetworkPolicy", "todo-broker");
    let peers = policy.spec.unwrap().ingress.unwrap()[0]
        .from
        .clone()
        .unwrap();
    assert_eq!(
        peers[1].pod_selector.clone().unwrap().match_labels.unwrap(),
        labels(&[
            (&hostile("key"), &hostile("value")),
            (&hostile("long").repeat(40), "v")
        ])
    );

    let config: ConfigMap = typed(&rendered, "ConfigMap", "todo-config");
    let stored: Value = serde_json::from_str(&config.data.unwrap()["stack.json"]).unwrap();
    assert_eq!(stored, stack_config(&stack));
    assert_eq!(stored["rules"][0]["name"], hostile("rule"));

    // `kab render` output too reads back as the same objects.
    let documents: Vec<Value> = serde_saphyr::from_multiple(&to_yaml(&rendered)).unwrap();
    assert_eq!(documents.len(), count);
    let objects: Vec<Value> = rendered
        .children
        .iter()
        .map(|c| serde_json::to_value(&c.object).unwrap())
        .collect();
    assert_eq!(documents, objects);
}

#[test]
fn a_stack_name_must_be_a_dns_label() {
    let mut stack = example("minimal");
    stack.metadata.name = Some("notes.v2".into());
    let err = render(
        &Templates::embedded(),
        &stack,
        &Settings::default(),
        &Facts::default(),
    )
    .unwrap_err();
    assert!(matches!(err, RenderError::InvalidStack { .. }), "{err}");
    assert!(err.to_string().contains("\"notes.v2\""), "{err}");
}

/// A directory of overrides holding `files`.
fn overrides(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn render_with(files: &[(&str, &str)]) -> Result<Rendered, RenderError> {
    let dir = overrides(files);
    let templates = Templates::load(Some(dir.path()))?;
    render(
        &templates,
        &example("todo"),
        &Settings::default(),
        &Facts::default(),
    )
}

#[test]
fn an_override_replaces_the_embedded_template() {
    let service = "apiVersion: v1\nkind: Service\nmetadata:\n  name: {{json names.webhook}}\n  annotations: {team: payments}\nspec:\n  selector: {{json labels.webhook}}\n  ports: [{port: 443, targetPort: 8443}]\n";
    let rendered =
        render_with(&[("webhook-service.yaml.hbs", service), ("..data", "ignored")]).unwrap();
    let service: Service = typed(&rendered, "Service", "todo-webhook");
    assert_eq!(service.metadata.annotations.unwrap()["team"], "payments");
    assert_eq!(
        service.metadata.labels.unwrap()[LABEL_STACK],
        "todo",
        "labels are set by code"
    );
}

#[test]
fn an_override_with_a_syntax_error_names_the_file_and_line() {
    let err = render_with(&[(
        "webhook-service.yaml.hbs",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {{json names.webhook}\n",
    )])
    .unwrap_err();
    let RenderError::Syntax { template, line, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        (template.as_str(), *line),
        ("webhook-service.yaml.hbs", Some(4))
    );
    assert!(
        err.to_string()
            .starts_with("template webhook-service.yaml.hbs, line 4"),
        "{err}"
    );
}

#[test]
fn a_missing_variable_is_an_error_naming_it() {
    let err = render_with(&[(
        "webhook-service.yaml.hbs",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {{json names.webhok}}\n",
    )])
    .unwrap_err();
    let RenderError::Template {
        template,
        line,
        message,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(template, "webhook-service.yaml.hbs");
    assert_eq!(*line, Some(4));
    assert!(message.contains("names.webhok"), "{err}");

    let err = render_with(&[("webhook-service.yaml.hbs", "name: {{names.webhok}}\n")]).unwrap_err();
    assert!(err.to_string().contains("names.webhok"), "{err}");

    // A misspelt condition is not silently false.
    let err = render_with(&[(
        "reader-role.yaml.hbs",
        "{{#if rbac.hasReadrs}}x: 1{{/if}}\n",
    )])
    .unwrap_err();
    assert!(err.to_string().contains("rbac.hasReadrs"), "{err}");
    let err = render_with(&[(
        "reader-role.yaml.hbs",
        "{{#unless rbac.hasReadrs}}x: 1{{/unless}}\n",
    )])
    .unwrap_err();
    assert!(err.to_string().contains("rbac.hasReadrs"), "{err}");
}

#[test]
fn an_override_rendering_another_kind_is_an_error_naming_it() {
    let err = render_with(&[(
        "webhook-service.yaml.hbs",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n",
    )])
    .unwrap_err();
    assert_eq!(
        err,
        RenderError::UnsupportedKind {
            template: "webhook-service.yaml.hbs".into(),
            api_version: "v1".into(),
            kind: "Pod".into()
        }
    );
}

#[test]
fn an_override_with_a_misplaced_field_is_an_error_naming_the_field() {
    let err = render_with(&[("webhook-service.yaml.hbs", "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 443, targetport: 8443}]}\n")]).unwrap_err();
    assert!(
        err.to_string().contains("webhook-service.yaml.hbs"),
        "{err}"
    );
    assert!(
        err.to_string().contains("spec.ports[0].targetport"),
        "{err}"
    );
}

#[test]
fn an_override_rendering_two_documents_or_broken_yaml_is_an_error() {
    let two = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: b}\n";
    let err = render_with(&[("webhook-serviceaccount.yaml.hbs", two)]).unwrap_err();
    assert_eq!(
        err,
        RenderError::MultipleDocuments {
            template: "webhook-serviceaccount.yaml.hbs".into(),
            count: 2
        }
    );

    let err = render_with(&[(
        "webhook-serviceaccount.yaml.hbs",
        "apiVersion: v1\nkind: [ServiceAccount\n",
    )])
    .unwrap_err();
    assert!(
        matches!(&err, RenderError::Yaml { template, .. } if template == "webhook-serviceaccount.yaml.hbs"),
        "{err:?}"
    );
}

#[test]
fn an_override_rendering_nothing_removes_the_child() {
    let rendered = render_with(&[(
        "webhook-pdb.yaml.hbs",
        "{{!-- no budget here --}}\n# nothing\n",
    )])
    .unwrap();
    assert!(
        rendered
            .get("PodDisruptionBudget", "todo-webhook")
            .is_none()
    );
}

#[test]
fn two_templates_rendering_one_object_is_an_error() {
    let err = render_with(&[("webhook-pdb.yaml.hbs", "apiVersion: v1\nkind: Service\nmetadata: {name: {{json names.webhook}}}\nspec: {ports: [{port: 1}]}\n")]).unwrap_err();
    assert!(matches!(err, RenderError::Duplicate { .. }), "{err}");
    assert!(
        err.to_string().contains("webhook-pdb.yaml.hbs")
            && err.to_string().contains("webhook-service.yaml.hbs"),
        "{err}"
    );
}

#[test]
fn unknown_override_files_are_named() {
    let dir = overrides(&[("webhook-deploy.yaml.hbs", ""), ("notes.txt", "")]);
    let err = Templates::load(Some(dir.path())).unwrap_err();
    let RenderError::UnknownOverride { files, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(files, &["notes.txt", "webhook-deploy.yaml.hbs"]);
    assert!(
        err.to_string().contains("webhook-deployment.yaml.hbs"),
        "the message lists the real names: {err}"
    );
}

#[test]
fn templates_can_be_shared_between_reconciles() {
    fn shared<T: Send + Sync + 'static>() {}
    shared::<Templates>();
    shared::<Rendered>();
}

#[test]
fn template_files_are_listed_in_dependency_order() {
    let files = template_files();
    assert_eq!(files.len(), 25);
    assert!(files.windows(2).all(|w| w[0].1 <= w[1].1));
    assert_eq!(
        files.last().unwrap(),
        &("controller-deployment.yaml.hbs", Step::Controller)
    );
}

#[test]
fn json_helper_escapes_what_yaml_would_not_read_back() {
    let value = json!("a\u{2028}b\u{85}c\u{7f}\u{feff}");
    let text = yaml_safe_json(&value);
    assert!(text.is_ascii(), "{text}");
    let back: Value = serde_saphyr::from_str(&format!("key: {text}\n")).unwrap();
    assert_eq!(back["key"], value);

    // YAML limits implicit keys to 1024 characters: long keys are written as explicit keys.
    let long = "k".repeat(2000);
    let value = json!({"short": [1, {"a": null}], long.clone(): {long.clone(): "v"}});
    let text = yaml_safe_json(&value);
    assert!(
        text.starts_with(&format!(
            "{{? \"{long}\": {{? \"{long}\": \"v\"}},\"short\":[1,{{\"a\":null}}]"
        )),
        "{text}"
    );
    let back: Value = serde_saphyr::from_str(&format!("- {text}\n")).unwrap();
    assert_eq!(back[0], value);
}
