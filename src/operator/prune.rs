//! The prune step: children labelled for the stack that are no longer desired are deleted. The
//! plan decides which ([`super::plan`]); this module lists what exists (from the caches) and
//! deletes.

use super::Ctx;
use super::error::{Error, Stage};
use super::finalizer::delete;
use super::plan::Existing;
use crate::render::{self, LABEL_STACK, LABEL_STACK_NAMESPACE};
use kube::api::{Api, DynamicObject};

/// Every child labelled for the stack `ns/name` that the caches hold, of every kind kab renders
/// but the entity CRD (shared, never pruned).
pub fn existing(ctx: &Ctx, ns: &str, name: &str) -> Vec<Existing> {
    // Every kind kab renders is in the index but the two read whole: the entity CRD and the
    // certificate Secrets (below).
    let indexed: Vec<&str> = render::kinds()
        .iter()
        .map(|k| k.resource.kind.as_str())
        .filter(|k| !matches!(*k, "CustomResourceDefinition" | "Secret"))
        .collect();
    let mut found: Vec<Existing> = ctx
        .stores
        .index
        .children_of(&indexed, ns, name)
        .into_iter()
        .map(|(kind, namespace, name)| Existing {
            kind,
            namespace,
            name,
        })
        .collect();
    for secret in ctx.stores.secrets.state() {
        let m = &secret.metadata;
        let label = |k: &str| m.labels.as_ref().and_then(|l| l.get(k)).map(String::as_str);
        if label(LABEL_STACK) == Some(name) && label(LABEL_STACK_NAMESPACE) == Some(ns) {
            found.push(Existing {
                kind: "Secret",
                namespace: m.namespace.clone(),
                name: m.name.clone().unwrap_or_default(),
            });
        }
    }
    found
}

/// Deletes the doomed children; returns the errors (the others are gone).
pub async fn prune(ctx: &Ctx, stack: &str, doomed: &[Existing]) -> Vec<Error> {
    let mut errors = Vec::new();
    for child in doomed {
        let Some(supported) = render::kinds()
            .iter()
            .find(|k| k.resource.kind == child.kind)
        else {
            continue;
        };
        let api: Api<DynamicObject> = match (&child.namespace, supported.namespaced) {
            (Some(n), true) => Api::namespaced_with(ctx.client.clone(), n, &supported.resource),
            _ => Api::all_with(ctx.client.clone(), &supported.resource),
        };
        tracing::info!(kind = child.kind, name = %child.name, stack, "pruning a child no longer desired");
        if let Err(e) = delete(&api, &child.name).await {
            errors.push(Error::kube(
                Stage::Prune,
                format!("{} {}", child.kind, child.name),
            )(e));
        }
    }
    errors
}
