//! The status step: one row per desired child from the watch caches, the conditions computed
//! from them ([`crate::status::compute`], pure), written only when they changed (progress paced),
//! and a Warning Event when the stack's `Reconciled` condition turns to a new error.

use super::Ctx;
use super::error::{Error, Stage};
use super::finalizer::Gate;
use super::outline::{self, Outline};
use crate::api::{GROUP, KabStack, VERSION};
use crate::health;
use crate::render::{self, Facts, Names, Step};
use crate::status::{self, CertFacts, Observed, Outcome};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use std::time::Duration;

/// Field manager for KabStack status.
pub const MANAGER_STATUS: &str = "kab-operator-status";
/// Progress-only status changes of a stack are written at most this often.
const STATUS_PACE: Duration = Duration::from_secs(5);
/// A stack in conflict is looked at again this often (the other stack may go or change).
const CONFLICT_RETRY: Duration = Duration::from_secs(60);

/// Why a reconcile stops before writing any child.
#[derive(Clone, Debug)]
pub enum Halt {
    /// The spec is invalid (the message names the fields).
    InvalidSpec(String),
    /// Another stack declares the entity differently, or the CRD exists unmanaged.
    Conflict(String),
    /// A template could not be rendered.
    RenderFailed(String),
}

/// Reports a halted stack: its status, a Warning Event when the message is new, and when to
/// look again (an invalid spec or a broken template wait for an edit).
pub async fn halt(
    stack: &KabStack,
    ctx: &Ctx,
    gate: &Gate,
    halt: Halt,
    now: Timestamp,
) -> Result<Action, Error> {
    let (outcome, rows, action) = match halt {
        Halt::InvalidSpec(m) => (Outcome::InvalidSpec(m), Vec::new(), Action::await_change()),
        Halt::RenderFailed(m) => (Outcome::RenderFailed(m), Vec::new(), Action::await_change()),
        Halt::Conflict(m) => (
            Outcome::Conflict(m),
            rows_of_existing(stack, ctx),
            Action::requeue(CONFLICT_RETRY),
        ),
    };
    gate.open().await?;
    warn_once(stack, ctx, &outcome).await;
    write(stack, ctx, &outcome, &rows, None, now).await?;
    Ok(action)
}

/// Status rows for every desired child, and the certificate Secrets, from the watch caches.
pub fn rows(
    stack: &KabStack,
    ctx: &Ctx,
    children: &[Outline],
    names: &Names,
    webhook_available: bool,
) -> Vec<Observed> {
    let ns = stack.namespace().unwrap_or_default();
    let mut rows: Vec<Observed> = children
        .iter()
        .map(|c| row(ctx, c, webhook_available))
        .collect();
    for secret in [&names.webhook_ca_secret, &names.webhook_tls_secret] {
        let exists = ctx.stores.version("Secret", Some(&ns), secret).is_some();
        rows.push(Observed {
            step: Step::Config,
            kind: "Secret".into(),
            name: format!("{ns}/{secret}"),
            ready: exists,
            failing: false,
            message: present(exists),
        });
    }
    rows
}

/// Rows for a stack whose children are not planned this time (conflict): what exists.
fn rows_of_existing(stack: &KabStack, ctx: &Ctx) -> Vec<Observed> {
    let facts = Facts {
        ca_bundle_pem: None,
    };
    match render::render(&ctx.templates, stack, &ctx.settings, &facts) {
        Ok(r) => {
            let names = render::names(stack);
            let ns = stack.namespace().unwrap_or_default();
            let available = ctx.stores.deployment_available(&ns, &names.webhook);
            rows(stack, ctx, &outline::outlines(&r), &names, available)
        }
        Err(_) => Vec::new(),
    }
}

fn present(exists: bool) -> String {
    if exists { "present" } else { "not created yet" }.into()
}

/// The row of one child: workloads and the CRD by their health, the registration by whether
/// it waits for the webhook, the rest by existence.
fn row(ctx: &Ctx, child: &Outline, webhook_available: bool) -> Observed {
    let ns = child.namespace.as_deref().unwrap_or_default();
    let name = child.name.as_str();
    let (ready, failing, message) = match child.kind {
        "CustomResourceDefinition" => match ctx.stores.crds.get(&ObjectRef::new(name)) {
            None => (false, false, present(false)),
            Some(crd) => health::crd_health(&crd),
        },
        "Deployment" => match ctx.stores.index.deployment(ns, name) {
            None => (false, false, present(false)),
            Some(d) => health::deployment_health_with(&d, || pods_of(ctx, ns, child)),
        },
        "StatefulSet" => match ctx.stores.index.statefulset(ns, name) {
            None => (false, false, present(false)),
            Some(s) => health::statefulset_health_with(&s, || pods_of(ctx, ns, child)),
        },
        super::plan::REGISTRATION => {
            if ctx.stores.index.exists(child.kind, None, name) {
                (true, false, "registered".into())
            } else if webhook_available {
                (false, false, "not registered yet".into())
            } else {
                (
                    false,
                    false,
                    "waits for the webhook Deployment to be available before registering it".into(),
                )
            }
        }
        other => {
            let exists = ctx
                .stores
                .version(other, child.namespaced.then_some(ns), name)
                .is_some();
            (exists, false, present(exists))
        }
    };
    Observed {
        step: child.step,
        kind: child.kind.to_owned(),
        name: if child.namespaced {
            format!("{ns}/{name}")
        } else {
            name.to_owned()
        },
        ready,
        failing,
        message,
    }
}

/// Pods of a workload child: the stack's pods with the same component label.
fn pods_of(
    ctx: &Ctx,
    ns: &str,
    child: &Outline,
) -> Vec<std::sync::Arc<k8s_openapi::api::core::v1::Pod>> {
    ctx.stores
        .index
        .pods(ns, child.stack_label.as_deref(), child.component.as_deref())
}

/// Writes the status computed from the rows, unless it equals the stored one. Progress inside
/// one rollout ([`status::progress_only`]) is written at most once per [`STATUS_PACE`] per
/// stack: a stack's parts become ready one by one, and a status write per step would cost the
/// API server more than the rollout itself at scale. Returns when to come back for such a
/// deferred write.
pub async fn write(
    stack: &KabStack,
    ctx: &Ctx,
    outcome: &Outcome,
    rows: &[Observed],
    cert: Option<&CertFacts>,
    now: Timestamp,
) -> Result<Option<Duration>, Error> {
    let new = status::compute(&status::Input {
        stack,
        outcome,
        children: rows,
        cert,
        entity: Some(stack.spec.entity.crd_name()),
        now,
    });
    if stack.status.as_ref() == Some(&new) {
        return Ok(None);
    }
    let sref = ObjectRef::from_obj(stack);
    if let Some(old) = &stack.status
        && status::progress_only(old, &new)
        && let Some(wait) = ctx.memo.status_pace(&sref, STATUS_PACE)
    {
        return Ok(Some(wait));
    }
    let ns = stack.namespace().unwrap_or_default();
    let name = stack.name_any();
    let api: Api<KabStack> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": "KabStack",
        "status": new,
    });
    api.patch_status(
        &name,
        &super::apply::apply_params(MANAGER_STATUS),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::kube(
        Stage::WriteStatus,
        format!("KabStack {ns}/{name}"),
    ))?;
    ctx.memo.record_status_write(&sref);
    Ok(None)
}

/// The reason and message of an outcome that is an error.
fn failure(outcome: &Outcome) -> Option<(&'static str, &str)> {
    match outcome {
        Outcome::InvalidSpec(m) => Some(("InvalidSpec", m)),
        Outcome::Conflict(m) => Some(("Conflict", m)),
        Outcome::RenderFailed(m) => Some(("RenderFailed", m)),
        Outcome::ApplyFailed(m) => Some(("ApplyFailed", m)),
        Outcome::Applied | Outcome::Paused => None,
    }
}

/// Publishes a Warning Event when the Reconciled condition is about to change to this error,
/// so a stack stuck on the same error does not flood the namespace with events. The stored
/// status says what a previous operator run reported; the memo what this run published, which
/// the cached status may not show yet (the reconcile after the finalizer patch can run before
/// the watch brings back kab's own status write).
pub async fn warn_once(stack: &KabStack, ctx: &Ctx, outcome: &Outcome) {
    let Some((reason, message)) = failure(outcome) else {
        return;
    };
    let stored = stack
        .status
        .as_ref()
        .and_then(|s| status::condition(s, "Reconciled"))
        .is_some_and(|c| c.reason == reason && c.message == message);
    let new = ctx
        .memo
        .record_warning(&ObjectRef::from_obj(stack), reason, message);
    if stored || !new {
        return;
    }
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(message.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &stack.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish a Warning event");
    }
}
