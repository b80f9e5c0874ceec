//! The apply step: server-side apply, forced, one field manager per usage site. The children a
//! plan names go at once (a few in flight); the cluster-scoped ones only once the stack carries
//! kab's finalizer; the certificate Secrets with them, or after them on a rotation.

use super::Ctx;
use super::certificates::{self, Certificates};
use super::error::{Error, Stage};
use super::finalizer::Gate;
use super::memo::Applied;
use super::plan::Secrets;
use crate::api::KabStack;
use crate::index::version;
use crate::render::{Child, Names};
use futures::{FutureExt, StreamExt, stream};
use kube::Resource;
use kube::api::{DynamicObject, Patch, PatchParams};
use std::sync::Arc;

/// Field manager for the children rendered from templates.
pub const MANAGER: &str = "kab-operator";
/// Applies in flight at once, per stack.
const IN_FLIGHT: usize = 8;

/// Applies `children` (each with its outline's key and hash) and the certificate Secrets as
/// `secrets` says; returns the errors (the others went through).
pub async fn apply(
    stack: &KabStack,
    ctx: &Arc<Ctx>,
    gate: &Gate,
    children: Vec<(u64, u64, Child)>,
    secrets: Secrets,
    certs: &Certificates,
    names: &Names,
) -> Vec<Error> {
    let applies: Vec<_> = children
        .into_iter()
        .map(|(key, hash, child)| {
            let cluster_scoped = !child.namespaced;
            let apply = apply_child(ctx.clone(), child, key, hash);
            let gate = gate.clone();
            async move {
                if cluster_scoped {
                    gate.open().await?;
                }
                apply.await
            }
            .boxed()
        })
        .collect();
    let children = stream::iter(applies)
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>();
    let store = certificates::store(stack, ctx, &certs.pki, names);
    let (stored, results) = match secrets {
        Secrets::Unchanged => (Ok(()), children.await),
        Secrets::WithChildren => futures::join!(store, children),
        Secrets::AfterChildren => {
            let results = children.await;
            (store.await, results)
        }
    };
    stored
        .err()
        .into_iter()
        .chain(results.into_iter().filter_map(Result::err))
        .collect()
}

/// Applies one child and remembers what it produced.
async fn apply_child(ctx: Arc<Ctx>, child: Child, key: u64, hash: u64) -> Result<(), Error> {
    let name = child.name();
    let ns = child
        .object
        .metadata
        .namespace
        .as_deref()
        .filter(|_| child.namespaced);
    let failed = Error::kube(Stage::Apply(child.step), describe(&child));
    let mut request = match kube::core::Request::new(DynamicObject::url_path(&child.resource, ns))
        .patch(name, &apply_params(MANAGER), &Patch::Apply(&child.object))
    {
        Ok(r) => r,
        Err(e) => return Err(failed(kube::Error::BuildRequest(e))),
    };
    request.extensions_mut().insert("patch");
    let answer: AppliedAnswer = match ctx.client.request(request).await {
        Ok(a) => a,
        Err(e) => return Err(failed(e)),
    };
    let meta = answer.metadata;
    let version = version(meta.generation, meta.resource_version.as_deref());
    ctx.memo.record_apply(key, Applied { hash, version });
    Ok(())
}

/// Server-side apply, forced, as `manager`, with field validation off: what kab applies was
/// checked against its type when rendered (children: a lossless round trip through k8s-openapi;
/// status: serialised from `KabStackStatus`), and with validation on the API server parses every
/// apply body as YAML a second time, strictly, only to look for duplicate or unknown fields.
pub fn apply_params(manager: &str) -> PatchParams {
    PatchParams::apply(manager).force().validation_ignore()
}

/// What kab reads of an apply's answer: the version the watches will show. Reading only this
/// skips building the whole object and its managedFields, most of the answer.
#[derive(serde::Deserialize)]
struct AppliedAnswer {
    metadata: AppliedMeta,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AppliedMeta {
    generation: Option<i64>,
    resource_version: Option<String>,
}

/// `Kind ns/name`, or `Kind name` when cluster-scoped.
fn describe(child: &Child) -> String {
    match &child.object.metadata.namespace {
        Some(ns) if child.namespaced => format!("{} {ns}/{}", child.resource.kind, child.name()),
        _ => format!("{} {}", child.resource.kind, child.name()),
    }
}
