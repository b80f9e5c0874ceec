//! The CloudEvent of one entity change, its broker subject and its deduplication id. Pure.
//!
//! Identity: the CloudEvent `id` and the `Nats-Msg-Id` are the same string, stable for one
//! change of one object whatever the number of attempts:
//! - `created`: `<uid>:created` — an object is created once, whatever generation the controller
//!   first sees (a retry after a crash that happened between the broker's ack and the status
//!   write must be recognised as the same creation, even if the entity changed meanwhile);
//! - `updated`: `<uid>:<generation>:updated`;
//! - `deleted`: `<uid>:deleted`.

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::DynamicObject;
use serde_json::{Value, json};

use super::config::StackConfig;

/// CloudEvents attribute carrying the entity's generation (an extension: lowercase, ≤ 20 chars).
pub const GENERATION_ATTRIBUTE: &str = "kabgeneration";
/// Media type of a structured-mode CloudEvent (NATS `Content-Type` header, HTTP body).
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// What happened to the entity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Change {
    Created,
    Updated,
    Deleted,
}

impl Change {
    /// Every change, in lifecycle order.
    pub const ALL: [Change; 3] = [Change::Created, Change::Updated, Change::Deleted];

    /// `created`, `updated` or `deleted`: the last token of the subject and of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Updated => "updated",
            Change::Deleted => "deleted",
        }
    }
}

/// `<prefix>.<namespace>.<plural>.<change>`.
pub fn subject(config: &StackConfig, namespace: &str, change: Change) -> String {
    format!(
        "{}.{namespace}.{}.{}",
        config.controller.subject_prefix,
        config.entity.plural,
        change.as_str()
    )
}

/// The subjects of every change of the stack's entities: `<prefix>.<namespace>.<plural>.>`.
pub fn stream_subjects(config: &StackConfig) -> String {
    format!(
        "{}.{}.{}.>",
        config.controller.subject_prefix, config.stack.namespace, config.entity.plural
    )
}

/// The deduplication id (and CloudEvent `id`) of one change (see the module documentation).
pub fn message_id(uid: &str, generation: i64, change: Change) -> String {
    match change {
        Change::Updated => format!("{uid}:{generation}:updated"),
        Change::Created | Change::Deleted => format!("{uid}:{}", change.as_str()),
    }
}

/// `/apis/<group>/<version>/namespaces/<namespace>/<plural>/<name>`.
pub fn source(config: &StackConfig, namespace: &str, name: &str) -> String {
    format!(
        "/apis/{}/namespaces/{namespace}/{}/{name}",
        config.api_version(),
        config.entity.plural
    )
}

/// `<group>.<Kind>.<change>`.
pub fn event_type(config: &StackConfig, change: Change) -> String {
    format!(
        "{}.{}.{}",
        config.entity.group,
        config.entity.kind,
        change.as_str()
    )
}

/// When the change happened: the deletion timestamp of a deletion, else the latest write to the
/// object by anyone but `own_manager` (its `managedFields` of the main resource), else its
/// creation. Stable for a given object state, so a retried event carries the same time.
pub fn change_time(obj: &DynamicObject, change: Change, own_manager: &str) -> Option<Timestamp> {
    let meta = &obj.metadata;
    if change == Change::Deleted
        && let Some(t) = &meta.deletion_timestamp
    {
        return Some(t.0);
    }
    meta.managed_fields
        .iter()
        .flatten()
        .filter(|f| f.subresource.as_deref().unwrap_or_default().is_empty())
        .filter(|f| f.manager.as_deref() != Some(own_manager))
        .filter_map(|f| f.time.as_ref().map(|t| t.0))
        .max()
        .or_else(|| meta.creation_timestamp.as_ref().map(|t| t.0))
}

/// The entity as the event's `data`: the object without `metadata.managedFields`, with its
/// `apiVersion` and `kind`.
pub fn entity_data(config: &StackConfig, obj: &DynamicObject) -> Value {
    let mut data = serde_json::to_value(obj).unwrap_or_else(|_| json!({}));
    if let Some(meta) = data.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    if let Some(map) = data.as_object_mut() {
        map.entry("apiVersion")
            .or_insert_with(|| json!(config.api_version()));
        map.entry("kind")
            .or_insert_with(|| json!(config.entity.kind));
    }
    data
}

/// The CloudEvents 1.0 structured-mode JSON of `change` of `obj` at `time`.
pub fn cloud_event(
    config: &StackConfig,
    obj: &DynamicObject,
    change: Change,
    time: Timestamp,
) -> Value {
    let namespace = obj
        .namespace()
        .unwrap_or_else(|| config.stack.namespace.clone());
    let name = obj.name_any();
    let generation = obj.metadata.generation.unwrap_or_default();
    json!({
        "specversion": "1.0",
        "id": message_id(&obj.uid().unwrap_or_default(), generation, change),
        "source": source(config, &namespace, &name),
        "type": event_type(config, change),
        "subject": name,
        "time": time.to_string(),
        "datacontenttype": "application/json",
        GENERATION_ATTRIBUTE: generation,
        "data": entity_data(config, obj),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config() -> StackConfig {
        StackConfig::parse(
            Path::new("stack.json"),
            r#"{
              "stack": {"name": "todo", "namespace": "shop"},
              "entity": {"group": "todo.example.com", "kind": "Todo", "plural": "todos",
                         "singular": "todo", "versions": ["v1"], "storageVersion": "v1"},
              "controller": {"subjectPrefix": "kab", "leaseName": "todo-controller-leader"},
              "broker": {"mode": "Managed", "url": "nats://todo-broker.shop.svc:4222", "storage": "File"}
            }"#,
        )
        .unwrap()
    }

    fn todo() -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "todo.example.com/v1",
            "kind": "Todo",
            "metadata": {
                "name": "buy-milk", "namespace": "shop", "uid": "u-1", "generation": 3,
                "creationTimestamp": "2026-05-01T10:00:00Z",
                "finalizers": ["kab.dev/publish"],
                "managedFields": [
                    {"manager": "todo-api", "operation": "Update", "apiVersion": "todo.example.com/v1",
                     "time": "2026-05-01T10:05:00Z", "fieldsType": "FieldsV1", "fieldsV1": {}},
                    {"manager": "kab-entity-controller", "operation": "Update", "apiVersion": "todo.example.com/v1",
                     "time": "2026-05-01T10:06:00Z", "fieldsType": "FieldsV1", "fieldsV1": {}},
                    {"manager": "kab-entity-controller", "operation": "Apply", "apiVersion": "todo.example.com/v1",
                     "time": "2026-05-01T10:07:00Z", "fieldsType": "FieldsV1", "fieldsV1": {}, "subresource": "status"},
                ],
            },
            "spec": {"code": "M1", "message": "buy milk"},
        }))
        .unwrap()
    }

    #[test]
    fn subjects_ids_and_sources() {
        let c = config();
        assert_eq!(
            subject(&c, "shop", Change::Updated),
            "kab.shop.todos.updated"
        );
        assert_eq!(stream_subjects(&c), "kab.shop.todos.>");
        assert_eq!(message_id("u-1", 1, Change::Created), "u-1:created");
        assert_eq!(message_id("u-1", 4, Change::Updated), "u-1:4:updated");
        assert_eq!(message_id("u-1", 4, Change::Deleted), "u-1:deleted");
        assert_eq!(
            source(&c, "shop", "buy-milk"),
            "/apis/todo.example.com/v1/namespaces/shop/todos/buy-milk"
        );
        assert_eq!(
            event_type(&c, Change::Deleted),
            "todo.example.com.Todo.deleted"
        );
    }

    #[test]
    fn the_change_time_ignores_the_controllers_own_writes() {
        let obj = todo();
        let own = "kab-entity-controller";
        assert_eq!(
            change_time(&obj, Change::Updated, own).map(|t| t.to_string()),
            Some("2026-05-01T10:05:00Z".into())
        );
        let mut deleted = obj.clone();
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-05-01T11:00:00Z".parse().unwrap(),
            ));
        assert_eq!(
            change_time(&deleted, Change::Deleted, own).map(|t| t.to_string()),
            Some("2026-05-01T11:00:00Z".into())
        );
        let mut fresh = obj;
        fresh.metadata.managed_fields = None;
        assert_eq!(
            change_time(&fresh, Change::Created, own).map(|t| t.to_string()),
            Some("2026-05-01T10:00:00Z".into())
        );
    }

    #[test]
    fn a_cloud_event_reads_like_the_spec() {
        let event = cloud_event(
            &config(),
            &todo(),
            Change::Updated,
            "2026-05-01T10:05:00Z".parse().unwrap(),
        );
        let mut data = event["data"].clone();
        assert_eq!(data["metadata"].get("managedFields"), None);
        assert_eq!(data["spec"]["code"], "M1");
        data["metadata"] = json!({});
        assert_eq!(
            event,
            json!({
                "specversion": "1.0",
                "id": "u-1:3:updated",
                "source": "/apis/todo.example.com/v1/namespaces/shop/todos/buy-milk",
                "type": "todo.example.com.Todo.updated",
                "subject": "buy-milk",
                "time": "2026-05-01T10:05:00Z",
                "datacontenttype": "application/json",
                "kabgeneration": 3,
                "data": event["data"],
            })
        );
        assert_eq!(
            data,
            json!({"apiVersion": "todo.example.com/v1", "kind": "Todo", "metadata": {},
                   "spec": {"code": "M1", "message": "buy milk"}})
        );
    }
}
