//! The data the templates see. Everything that takes a decision or builds a complex piece (the
//! merged entity schema, RBAC subjects, `nats.conf`, hashes) is computed here, in Rust; the
//! templates only place values, each through `{{json …}}`.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::names::{self, KAB, LABEL_COMPONENT, LABEL_PART_OF, LABEL_STACK, Names, stack_config};
use super::{Facts, RenderError, Settings};
use crate::api::{BrokerMode, EntityVersion, JetStreamStorage, KabStack, SubjectKind, SubjectRef};

/// Name of the property kab reserves in the entity status.
const KAB_STATUS: &str = "kab";

/// Builds the template context of `stack`.
pub(super) fn build(
    stack: &KabStack,
    settings: &Settings,
    facts: &Facts,
) -> Result<Value, RenderError> {
    check_identity(stack)?;
    let spec = &stack.spec;
    let entity = &spec.entity;
    let names = names::names(stack);
    let storage = entity
        .storage_version()
        .ok_or_else(|| RenderError::InvalidStack {
            message: "spec.entity.versions: exactly one version must have storage: true".to_owned(),
        })?;

    let config_json = config_json(stack);
    let broker = &spec.broker;
    let managed = broker.mode == BrokerMode::Managed;
    let stateful = managed && broker.jetstream.storage == JetStreamStorage::File;
    let clustered = managed && broker.replicas > 1;
    let nats_conf = nats_conf(stack, &names);
    let credentials = match broker.mode {
        BrokerMode::External => broker.credentials_secret.clone(),
        BrokerMode::Managed | BrokerMode::None => None,
    };

    let versions = entity
        .versions
        .iter()
        .map(|version| {
            Ok(json!({
                "name": version.name,
                "served": version.served,
                "storage": version.name == storage.name,
                "schema": entity_schema(version)?,
                "printerColumns": printer_columns(version),
            }))
        })
        .collect::<Result<Vec<_>, RenderError>>()?;

    let plural = entity.plural();
    Ok(json!({
        "stack": {"name": names.stack, "namespace": names.namespace},
        "names": names,
        "images": {
            "kab": spec.images.kab.as_ref().unwrap_or(&settings.kab_image),
            "nats": spec.images.nats.as_ref().unwrap_or(&settings.nats_image),
        },
        "labels": {
            "stack": {LABEL_STACK: names.stack},
            "webhook": selector(&names, "webhook"),
            "controller": selector(&names, "controller"),
            "broker": selector(&names, "broker"),
        },
        "podLabels": {
            "webhook": pod_labels(&names, "webhook"),
            "controller": pod_labels(&names, "controller"),
            "broker": pod_labels(&names, "broker"),
        },
        "entity": {
            "group": entity.group,
            "kind": entity.kind,
            "listKind": format!("{}List", entity.kind),
            "plural": plural,
            "singular": entity.singular(),
            "hasShortNames": !entity.short_names.is_empty(),
            "shortNames": entity.short_names,
            "statusResource": format!("{plural}/status"),
            "finalizersResource": format!("{plural}/finalizers"),
            "versions": versions,
            "storageVersion": storage.name,
        },
        "probe": {
            "enabled": settings.operator_service_account.is_some(),
            "subjects": settings.operator_service_account.iter().map(|(ns, name)| json!({
                "kind": "ServiceAccount", "name": name, "namespace": ns,
            })).collect::<Vec<_>>(),
        },
        "rbac": {
            "hasReaders": !spec.rbac.readers.is_empty(),
            "readers": subjects(&spec.rbac.readers, &names.namespace),
            "hasWriters": !spec.rbac.writers.is_empty(),
            "writers": subjects(&spec.rbac.writers, &names.namespace),
        },
        "config": {
            "stackJson": config_json,
            "hash": short_hash(&config_json),
        },
        "webhook": {
            "replicas": spec.webhook.replicas,
            "failurePolicy": spec.webhook.failure_policy,
            "timeoutSeconds": spec.webhook.timeout_seconds,
            "disruptionBudget": spec.webhook.replicas >= 2,
        },
        "controller": {
            "replicas": spec.controller.replicas,
            "mountCredentials": credentials.is_some(),
            "credentialsSecret": credentials,
        },
        "broker": {
            "managed": managed,
            "statefulSet": stateful,
            "deployment": managed && !stateful,
            "headless": stateful || clustered,
            "replicas": broker.replicas,
            "size": broker.jetstream.size,
            "natsConf": nats_conf,
            "configHash": short_hash(&nats_conf),
            "hasClientPodLabels": !broker.client_pod_labels.is_empty(),
            "clientPodLabels": broker.client_pod_labels,
        },
        "registration": {
            // CEL, evaluated by the API server only for writes of the entity resource.
            "namespaceCondition": format!(
                "request.namespace == {}",
                Value::String(names.namespace.clone())
            ),
            "hasCaBundle": facts.ca_bundle_pem.is_some(),
            "caBundle": facts
                .ca_bundle_pem
                .as_ref()
                .map(|pem| base64::engine::general_purpose::STANDARD.encode(pem)),
        },
    }))
}

/// `stack.json` exactly as stored in the config ConfigMap (its hash rolls the pods).
pub(super) fn config_json(stack: &KabStack) -> String {
    let mut text = serde_json::to_string_pretty(&stack_config(stack)).unwrap_or_default();
    text.push('\n');
    text
}

/// First 16 hex digits of the SHA-256 of `text`.
pub(super) fn short_hash(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The stack's name and namespace end up in DNS names, Service names and `nats.conf`: they must
/// be DNS labels (the API server guarantees a namespace is one; a KabStack name could have dots).
fn check_identity(stack: &KabStack) -> Result<(), RenderError> {
    let name = stack.metadata.name.as_deref().unwrap_or_default();
    if name.is_empty() {
        return Err(RenderError::InvalidStack {
            message: "metadata.name is required".to_owned(),
        });
    }
    if !is_dns_label(name, true) || name.len() > 40 {
        return Err(RenderError::InvalidStack {
            message: format!(
                "metadata.name {name:?}: a KabStack name must be at most 40 lowercase letters, digits \
                 and '-', start with a letter and end with a letter or digit (it names Services)"
            ),
        });
    }
    let namespace = names::stack_namespace(stack);
    if !is_dns_label(&namespace, false) || namespace.len() > 63 {
        return Err(RenderError::InvalidStack {
            message: format!("metadata.namespace {namespace:?} is not a valid namespace name"),
        });
    }
    Ok(())
}

fn is_dns_label(s: &str, letter_first: bool) -> bool {
    let bytes = s.as_bytes();
    let ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            (if letter_first {
                first.is_ascii_lowercase()
            } else {
                ok(first)
            }) && ok(last)
                && bytes.iter().all(|b| ok(b) || *b == b'-')
        }
        _ => false,
    }
}

fn selector(names: &Names, component: &str) -> BTreeMap<&'static str, String> {
    BTreeMap::from([
        (LABEL_COMPONENT, component.to_owned()),
        (LABEL_STACK, names.stack.clone()),
    ])
}

fn pod_labels(names: &Names, component: &str) -> BTreeMap<&'static str, String> {
    let mut labels = selector(names, component);
    labels.insert(LABEL_PART_OF, KAB.to_owned());
    labels
}

/// RoleBinding subjects; a ServiceAccount without a namespace is in the stack's.
fn subjects(refs: &[SubjectRef], namespace: &str) -> Vec<Value> {
    refs.iter()
        .map(|subject| match subject.kind {
            SubjectKind::ServiceAccount => json!({
                "kind": "ServiceAccount",
                "name": subject.name,
                "namespace": subject.namespace.as_deref().unwrap_or(namespace),
            }),
            SubjectKind::User | SubjectKind::Group => json!({
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": subject.kind,
                "name": subject.name,
            }),
        })
        .collect()
}

/// The openAPIV3Schema of one entity version: the user's spec schema, and a status made of kab's
/// own `status.kab` next to the user's status properties.
fn entity_schema(version: &EntityVersion) -> Result<Value, RenderError> {
    let invalid = |message: String| RenderError::InvalidStack {
        message: format!(
            "spec.entity.versions[{}].statusSchema: {message}",
            version.name
        ),
    };
    let mut status = match &version.status_schema {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(schema)) => schema.clone(),
        Some(other) => return Err(invalid(format!("must be an object schema, not {other}"))),
    };
    status.insert("type".to_owned(), json!("object"));
    let properties = status.entry("properties").or_insert_with(|| json!({}));
    let Value::Object(properties) = properties else {
        return Err(invalid("properties must be an object".to_owned()));
    };
    if properties.contains_key(KAB_STATUS) {
        return Err(invalid(format!(
            "the property `{KAB_STATUS}` is reserved for kab"
        )));
    }
    properties.insert(KAB_STATUS.to_owned(), kab_status_schema());
    Ok(json!({
        "type": "object",
        "properties": {
            "spec": version.schema,
            "status": status,
        },
    }))
}

/// Schema of `status.kab`, written by the entity controller. Unknown fields are kept so a newer
/// controller can add some before the CRD is updated.
pub(super) fn kab_status_schema() -> Value {
    json!({
        "type": "object",
        "description": "Written by kab's entity controller: how far the entity's changes have been published.",
        "x-kubernetes-preserve-unknown-fields": true,
        "properties": {
            "observedGeneration": {
                "type": "integer", "format": "int64", "minimum": 0,
                "description": "The generation the entity controller last saw.",
            },
            "publishedGeneration": {
                "type": "integer", "format": "int64", "minimum": 0,
                "description": "The last generation whose change event the broker acknowledged.",
            },
            "conditions": {
                "type": "array",
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
                "items": {
                    "type": "object",
                    "required": ["type", "status"],
                    "properties": {
                        "type": {"type": "string", "maxLength": 316},
                        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                        "reason": {"type": "string", "maxLength": 1024},
                        "message": {"type": "string", "maxLength": 32768},
                        "lastTransitionTime": {"type": "string", "format": "date-time"},
                        "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
                    },
                },
            },
        },
    })
}

fn printer_columns(version: &EntityVersion) -> Vec<Value> {
    version
        .printer_columns
        .iter()
        .map(|column| {
            let mut value = json!({
                "name": column.name,
                "type": column.type_,
                "jsonPath": column.json_path,
            });
            if let Some(description) = &column.description {
                value["description"] = json!(description);
            }
            value
        })
        .chain([json!({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"})])
        .collect()
}

/// `nats.conf` of a managed broker. Only the stack's name and namespace (checked DNS labels) and
/// numbers go into it.
fn nats_conf(stack: &KabStack, names: &Names) -> String {
    let broker = &stack.spec.broker;
    let file = broker.jetstream.storage == JetStreamStorage::File;
    let mut conf = format!(
        "# NATS with JetStream for KabStack {}/{}, rendered by kab.\n\
         server_name: $POD_NAME\n\
         port: 4222\n\
         http_port: 8222\n\
         jetstream {{\n  store_dir: /data\n  max_memory_store: 256MB\n",
        names.namespace, names.stack
    );
    if let Some(bytes) = volume_bytes(&broker.jetstream.size).filter(|_| file) {
        // Leave a tenth of the volume for the server's own files.
        conf.push_str(&format!("  max_file_store: {}\n", bytes / 10 * 9));
    }
    conf.push_str("}\n");
    if broker.replicas > 1 {
        let routes: Vec<String> = if file {
            (0..broker.replicas)
                .map(|i| {
                    format!(
                        "    nats://{}-{i}.{}.{}.svc:6222\n",
                        names.broker, names.broker_headless, names.namespace
                    )
                })
                .collect()
        } else {
            vec![format!(
                "    nats://{}.{}.svc:6222\n",
                names.broker_headless, names.namespace
            )]
        };
        conf.push_str(&format!(
            "cluster {{\n  name: {}\n  port: 6222\n  routes: [\n{}  ]\n}}\n",
            names.stack,
            routes.concat()
        ));
    }
    conf
}

/// Bytes of a volume size such as `1Gi` (the CRD pattern is `^[1-9][0-9]*(Mi|Gi|Ti)$`).
fn volume_bytes(size: &str) -> Option<u64> {
    let (number, unit) = size.split_at(size.len().checked_sub(2)?);
    let shift = match unit {
        "Mi" => 20,
        "Gi" => 30,
        "Ti" => 40,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(1 << shift)
}
