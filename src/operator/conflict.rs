//! Conflicts over the entity API: another stack declaring the same CRD differently, or a CRD of
//! that name kab did not make. Either way kab writes nothing and says who is in the way.

use super::Ctx;
use super::error::{Error, Stage};
use crate::api::{EntitySpec, KabStack};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::ObjectRef;
use std::sync::Arc;

/// Whether two entity declarations name the same CRD; runs for every stack on every reconcile,
/// so the common cases (other group; same kind and plural) are decided without formatting names.
fn same_crd(a: &EntitySpec, b: &EntitySpec) -> bool {
    a.group == b.group && ((a.kind == b.kind && a.plural == b.plural) || a.plural() == b.plural())
}

/// Whether another stack declares the same entity differently, or the CRD exists unmanaged.
pub async fn crd_conflict(stack: &KabStack, ctx: &Ctx) -> Result<Option<String>, Error> {
    let e = &stack.spec.entity;
    let crd_name = e.crd_name();
    let others: Vec<Arc<KabStack>> = ctx
        .stores
        .stacks
        .state()
        .into_iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none() && same_crd(&s.spec.entity, e))
        .collect();
    if let Some(message) = sharing_conflict(stack, &others) {
        return Ok(Some(message));
    }
    if ctx.stores.crds.get(&ObjectRef::new(&crd_name)).is_none() {
        // Not in our (label-filtered) cache: it may exist without kab's label.
        let api: Api<PartialObjectMeta<CustomResourceDefinition>> = Api::all(ctx.client.clone());
        if let Some(existing) = api.get_metadata_opt(&crd_name).await.map_err(Error::kube(
            Stage::CheckEntityCrd,
            format!("CustomResourceDefinition {crd_name}"),
        ))? && existing
            .labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str)
            != Some("kab")
        {
            return Ok(Some(format!(
                "CustomResourceDefinition {crd_name} already exists and is not managed by kab; kab never overwrites it. \
                 Choose another entity group or kind, or delete that CRD if it is unused."
            )));
        }
    }
    Ok(None)
}

/// The entity declaration that must match for stacks to share a CRD (everything the CRD is
/// rendered from, not the deletion policy).
fn entity_fingerprint(stack: &KabStack) -> serde_json::Value {
    let e = &stack.spec.entity;
    serde_json::json!({
        "group": e.group, "kind": e.kind, "plural": e.plural(), "singular": e.singular(),
        "shortNames": e.short_names, "versions": e.versions,
    })
}

/// Pure: among the stacks declaring this CRD, the oldest defines it; a stack declaring it
/// differently is in conflict.
pub fn sharing_conflict(stack: &KabStack, users: &[Arc<KabStack>]) -> Option<String> {
    let key = |s: &KabStack| {
        (
            s.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
                .unwrap_or(i64::MAX),
            s.namespace().unwrap_or_default(),
            s.name_any(),
        )
    };
    let owner = users.iter().min_by_key(|s| key(s))?;
    if owner.namespace() == stack.namespace() && owner.name_any() == stack.name_any() {
        return None;
    }
    if entity_fingerprint(owner) == entity_fingerprint(stack) {
        return None;
    }
    Some(format!(
        "entity API {} is already declared by KabStack {}/{} with a different definition; \
         stacks share an entity only with identical group, kind, names and versions (schemas). \
         Make spec.entity identical to that stack's, or choose another group or kind",
        stack.spec.entity.crd_name(),
        owner.namespace().unwrap_or_default(),
        owner.name_any()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::KabStackSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn stack(ns: &str, name: &str, created: &str, schema: serde_json::Value) -> Arc<KabStack> {
        let spec: KabStackSpec = serde_json::from_value(serde_json::json!({
            "entity": {"group": "todo.example.com", "kind": "Todo",
                       "versions": [{"name": "v1", "schema": schema}]}
        }))
        .unwrap();
        let mut s = KabStack::new(name, spec);
        s.metadata.namespace = Some(ns.into());
        s.metadata.creation_timestamp = Some(Time(created.parse().unwrap()));
        Arc::new(s)
    }

    #[test]
    fn stacks_with_the_same_entity_share_and_a_different_schema_conflicts() {
        let a = stack(
            "a",
            "todo",
            "2026-11-27T10:00:00Z",
            serde_json::json!({"type": "object"}),
        );
        let b = stack(
            "b",
            "todo",
            "2026-11-27T11:00:00Z",
            serde_json::json!({"type": "object"}),
        );
        let c = stack(
            "c",
            "todo",
            "2026-11-27T12:00:00Z",
            serde_json::json!({"type": "object", "properties": {"x": {"type": "string"}}}),
        );
        let users = vec![a.clone(), b.clone(), c.clone()];
        assert_eq!(sharing_conflict(&a, &users), None);
        assert_eq!(sharing_conflict(&b, &users), None);
        let msg = sharing_conflict(&c, &users).unwrap();
        assert!(msg.contains("KabStack a/todo"), "{msg}");
        assert!(msg.contains("todos.todo.example.com"));
    }

    #[test]
    fn same_crd_compares_plural_and_group() {
        let entity = |group: &str, kind: &str, plural: Option<&str>| {
            let mut e = stack("a", "todo", "2026-11-27T10:00:00Z", serde_json::json!({}))
                .spec
                .entity
                .clone();
            e.group = group.into();
            e.kind = kind.into();
            e.plural = plural.map(Into::into);
            e
        };
        let todo = entity("todo.example.com", "Todo", None);
        assert!(same_crd(&todo, &entity("todo.example.com", "Todo", None)));
        // The kind differs, the CRD name (todos.todo.example.com) does not.
        assert!(same_crd(
            &todo,
            &entity("todo.example.com", "TODO", Some("todos"))
        ));
        assert!(!same_crd(&todo, &entity("other.example.com", "Todo", None)));
        assert!(!same_crd(
            &todo,
            &entity("todo.example.com", "Todo", Some("todoes"))
        ));
        assert!(!same_crd(&todo, &entity("todo.example.com", "Task", None)));
    }
}
