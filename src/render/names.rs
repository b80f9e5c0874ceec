//! Names, labels and the runtime configuration of a stack: the pieces every other part of kab
//! (the operator's pruning and status, the webhook, the entity controller) agrees on.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Value, json};

use crate::api::{BrokerMode, KabStack};

/// `app.kubernetes.io/managed-by`: `kab` on every child.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// `app.kubernetes.io/part-of`: `kab` on every child and pod.
pub const LABEL_PART_OF: &str = "app.kubernetes.io/part-of";
/// `app.kubernetes.io/component`: webhook, controller, broker, entity-api, rbac or config.
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// `kab.dev/stack`: name of the owning stack (on every child but the shared entity CRD, and on
/// every pod of the stack).
pub const LABEL_STACK: &str = "kab.dev/stack";
/// `kab.dev/stack-namespace`: namespace of the owning stack (maps cluster-scoped children back).
pub const LABEL_STACK_NAMESPACE: &str = "kab.dev/stack-namespace";
/// Pod template annotation whose change rolls the pods when their configuration changes.
pub const ANNOTATION_CONFIG_HASH: &str = "kab.dev/config-hash";
/// Value of [`LABEL_MANAGED_BY`] and [`LABEL_PART_OF`].
pub const KAB: &str = "kab";

/// HTTPS port of the webhook container.
pub const WEBHOOK_PORT: u16 = 8443;
/// Where the webhook's serving certificate is mounted.
pub const WEBHOOK_TLS_DIR: &str = "/etc/kab/tls";
/// Where the stack configuration (`stack.json`) is mounted in the webhook and controller pods.
pub const CONFIG_PATH: &str = "/etc/kab/stack.json";
/// Where an external broker's credentials Secret is mounted in the controller pod.
pub const BROKER_CREDENTIALS_DIR: &str = "/etc/kab/broker";
/// Key of the NATS credentials in an external broker's credentials Secret.
pub const BROKER_CREDENTIALS_KEY: &str = "creds";
/// Client port of a managed broker.
pub const BROKER_CLIENT_PORT: u16 = 4222;

/// The name of every child of a stack (and of the Secrets the operator keeps for it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Names {
    /// The stack's own name.
    pub stack: String,
    /// The stack's namespace, where every namespaced child lives.
    pub namespace: String,
    /// The entity's CustomResourceDefinition, `<plural>.<group>` (shared between stacks).
    pub crd: String,
    /// ConfigMap holding `stack.json`.
    pub config: String,
    /// Webhook Deployment, Service and PodDisruptionBudget.
    pub webhook: String,
    /// ServiceAccount of the webhook pods.
    pub webhook_service_account: String,
    /// Role and RoleBinding of the webhook.
    pub webhook_role: String,
    /// Secret with the webhook's serving certificate and key (mounted by the webhook).
    pub webhook_tls_secret: String,
    /// Secret with the CA certificate and key (never mounted in a pod).
    pub webhook_ca_secret: String,
    /// ValidatingWebhookConfiguration (cluster-scoped), and the name of its one webhook.
    pub registration: String,
    /// Entity controller Deployment.
    pub controller: String,
    /// ServiceAccount of the entity controller pods.
    pub controller_service_account: String,
    /// Role and RoleBinding of the entity controller.
    pub controller_role: String,
    /// Lease the entity controller replicas elect their leader with.
    pub controller_lease: String,
    /// Role and RoleBinding of `spec.rbac.readers`.
    pub reader_role: String,
    /// Role and RoleBinding letting the operator send the dry-run admission probe.
    pub probe_role: String,
    /// Role and RoleBinding of `spec.rbac.writers`.
    pub writer_role: String,
    /// Managed broker workload, client Service and NetworkPolicy.
    pub broker: String,
    /// Headless Service of the managed broker's pods.
    pub broker_headless: String,
    /// ConfigMap with the managed broker's `nats.conf`.
    pub broker_config: String,
}

/// The stack's name (empty when missing; [`super::render`] rejects that).
pub fn stack_name(stack: &KabStack) -> String {
    stack.metadata.name.clone().unwrap_or_default()
}

/// The stack's namespace; `default` when the object has none (an offline `kab render` of a file
/// without one).
pub fn stack_namespace(stack: &KabStack) -> String {
    stack
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned())
}

/// Every child name of `stack`.
pub fn names(stack: &KabStack) -> Names {
    let name = stack_name(stack);
    let namespace = stack_namespace(stack);
    let child = |suffix: &str| format!("{name}-{suffix}");
    Names {
        crd: stack.spec.entity.crd_name(),
        config: child("config"),
        webhook: child("webhook"),
        webhook_service_account: child("webhook"),
        webhook_role: child("webhook"),
        webhook_tls_secret: child("webhook-tls"),
        webhook_ca_secret: child("webhook-ca"),
        registration: format!("{name}.{namespace}.kab.dev"),
        controller: child("controller"),
        controller_service_account: child("controller"),
        controller_role: child("controller"),
        controller_lease: child("controller-leader"),
        reader_role: child("reader"),
        probe_role: child("kab-probe"),
        writer_role: child("writer"),
        broker: child("broker"),
        broker_headless: child("broker-headless"),
        broker_config: child("broker-config"),
        stack: name,
        namespace,
    }
}

/// Labels on every child of `stack` but the shared entity CRD: what pruning selects on.
pub fn stack_labels(stack: &KabStack) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_owned(), KAB.to_owned()),
        (LABEL_PART_OF.to_owned(), KAB.to_owned()),
        (LABEL_STACK.to_owned(), stack_name(stack)),
        (LABEL_STACK_NAMESPACE.to_owned(), stack_namespace(stack)),
    ])
}

/// Label selector (`k=v,k=v`) matching every child of `stack` but the shared entity CRD.
pub fn selector_for(stack: &KabStack) -> String {
    [LABEL_MANAGED_BY, LABEL_STACK, LABEL_STACK_NAMESPACE]
        .iter()
        .filter_map(|key| {
            stack_labels(stack)
                .get(*key)
                .map(|value| format!("{key}={value}"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The broker URL the entity controller connects to: the managed broker's Service, the external
/// URL, or none.
pub fn broker_url(stack: &KabStack) -> Option<String> {
    match stack.spec.broker.mode {
        BrokerMode::Managed => Some(format!(
            "nats://{}.{}.svc:{BROKER_CLIENT_PORT}",
            names(stack).broker,
            stack_namespace(stack)
        )),
        BrokerMode::External => stack.spec.broker.url.clone(),
        BrokerMode::None => None,
    }
}

/// The runtime configuration the webhook and the entity controller read (`stack.json` in the
/// `<stack>-config` ConfigMap, mounted at [`CONFIG_PATH`]).
pub fn stack_config(stack: &KabStack) -> Value {
    let spec = &stack.spec;
    let entity = &spec.entity;
    let names = names(stack);
    let broker = &spec.broker;
    let credentials = match broker.mode {
        BrokerMode::External => broker.credentials_secret.clone(),
        BrokerMode::Managed | BrokerMode::None => None,
    };
    let mut stack_ref = json!({"name": names.stack, "namespace": names.namespace});
    if let Some(uid) = &stack.metadata.uid {
        // Claims the webhook creates are owned by the stack (see `kab webhook`).
        stack_ref["uid"] = json!(uid);
    }
    json!({
        "stack": stack_ref,
        "entity": {
            "group": entity.group,
            "kind": entity.kind,
            "plural": entity.plural(),
            "singular": entity.singular(),
            "versions": entity.versions.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
            "storageVersion": entity.storage_version().map(|v| v.name.as_str()),
        },
        "rules": spec.rules,
        "controller": {
            "subjectPrefix": spec.controller.subject_prefix,
            "notify": spec.controller.notify,
            "leaseName": names.controller_lease,
        },
        "broker": {
            "mode": broker.mode,
            "url": broker_url(stack),
            "credentialsSecret": credentials,
            "credentialsFile": credentials
                .as_ref()
                .map(|_| format!("{BROKER_CREDENTIALS_DIR}/{BROKER_CREDENTIALS_KEY}")),
            "storage": match broker.mode {
                BrokerMode::Managed => json!(broker.jetstream.storage),
                BrokerMode::External | BrokerMode::None => Value::Null,
            },
        },
        "webhook": {"port": WEBHOOK_PORT, "tlsDir": WEBHOOK_TLS_DIR},
    })
}
