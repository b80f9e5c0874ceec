//! The kab operator: reconciles every KabStack.
//!
//! [`reconcile`] is the finalizer dispatch; [`reconcile_stack`] is the pipeline, one module per
//! step: `finalizer → validate → certificates → render → plan → apply → prune → status`.
//! Only apply, prune, the admission probe and the status write touch the API; every read comes
//! from the watch caches ([`watches`]), never a LIST per reconcile. Decisions are values:
//! [`plan`] is pure and decides what to write, so an idle stack causes no write at all.

mod apply;
mod certificates;
mod conflict;
mod error;
mod finalizer;
mod memo;
mod outline;
mod plan;
mod probe;
mod prune;
mod report;
mod watches;

pub use error::{Error, Stage};

use crate::api::KabStack;
use crate::render::{self, Settings, Templates};
use crate::status;
use finalizer::{FINALIZER, Gate};
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};
use memo::Memo;
use report::Halt;
use std::sync::Arc;
use std::time::Duration;
use watches::Stores;

/// Operator settings.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Watch only this namespace (None: all namespaces).
    pub namespace: Option<String>,
    /// Directory of template overrides (by file name).
    pub templates_dir: Option<std::path::PathBuf>,
    /// Images and other render settings.
    pub settings: Settings,
    /// Stacks reconciled at once.
    pub concurrency: u16,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            templates_dir: None,
            settings: Settings::default(),
            concurrency: 16,
        }
    }
}

/// What every reconcile shares.
struct Ctx {
    client: Client,
    templates: Templates,
    settings: Settings,
    stores: Stores,
    recorder: Recorder,
    metrics: Arc<crate::metrics::Metrics>,
    memo: Memo,
}

/// Runs the operator until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let templates = Templates::load(config.templates_dir.as_deref())?;
    let (controller, stores) =
        watches::controller(&client, config.namespace.as_deref(), config.concurrency);
    let reporter = Reporter {
        controller: "kab-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        templates,
        settings: config.settings,
        stores,
        recorder: Recorder::new(client, reporter),
        metrics,
        memo: Memo::default(),
    });
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile error (reported by error_policy)");
            }
        })
        .await;
    Ok(())
}

/// The finalizer dispatch: a new stack gets kab's finalizer (in flight while the pipeline runs),
/// a live one the pipeline, a deleted one the [`finalizer::cleanup`].
async fn reconcile(stack: Arc<KabStack>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let start = std::time::Instant::now();
    let ns = stack
        .namespace()
        .ok_or_else(|| Error::NoNamespace(stack.name_any()))?;
    let api: Api<KabStack> = Api::namespaced(ctx.client.clone(), &ns);
    let result = if stack.metadata.deletion_timestamp.is_none()
        && !stack.finalizers().iter().any(|f| f == FINALIZER)
    {
        let gate = Gate::add_finalizer(&api, &stack);
        // A task spawned from a worker waits in that worker's LIFO slot until the spawner
        // yields: yield once, so the patch is sent before the CPU-bound planning starts.
        tokio::task::yield_now().await;
        reconcile_stack(stack, ctx.clone(), gate).await
    } else {
        finalizer(&api, FINALIZER, stack, |event| async {
            match event {
                FinalizerEvent::Apply(stack) => {
                    reconcile_stack(stack, ctx.clone(), Gate::open_already()).await
                }
                FinalizerEvent::Cleanup(stack) => finalizer::cleanup(stack, ctx.clone()).await,
            }
        })
        .await
        .map_err(|e| match e {
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            other => Error::Finalizer(Box::new(other)),
        })
    };
    ctx.metrics.observe_reconcile(
        start.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    ctx.metrics.set_phases(&ctx.stores.stacks.state());
    result
}

/// The pipeline of a live stack.
async fn reconcile_stack(stack: Arc<KabStack>, ctx: Arc<Ctx>, gate: Gate) -> Result<Action, Error> {
    let now = Timestamp::now();
    let ns = stack.namespace().unwrap_or_default();
    let sref = ObjectRef::from_obj(stack.as_ref());
    let names = render::names(&stack);

    // validate: an invalid spec, or an entity API someone else holds, stops here with a status.
    if let Err(errors) = crate::validate::validate(&stack) {
        let halt = Halt::InvalidSpec(errors.to_string());
        return report::halt(&stack, &ctx, &gate, halt, now).await;
    }
    if let Some(message) = conflict::crd_conflict(&stack, &ctx).await? {
        return report::halt(&stack, &ctx, &gate, Halt::Conflict(message), now).await;
    }
    // certificates: read back from their Secrets, issued or renewed only when due.
    let certs = certificates::prepare(&stack, &ctx, &names, now)?;
    // render: every child's outline, remembered per generation and CA bundle.
    let (prepared, fresh) = match outline::prepare(&stack, &ctx, &certs.facts()) {
        Ok(r) => r,
        Err(e) => {
            return report::halt(&stack, &ctx, &gate, Halt::RenderFailed(e.to_string()), now).await;
        }
    };
    // plan (pure): what to apply, when the Secrets go, what to prune.
    let webhook_available = ctx.stores.deployment_available(&ns, &names.webhook);
    let plan = plan_for(&stack, &ctx, &prepared, &names, &certs, webhook_available);
    // apply: the planned children (rendered again if need be) and certificate Secrets.
    let objects =
        match outline::objects(&stack, &ctx, &prepared, fresh, &plan.apply, &certs.facts()) {
            Ok(outline::Objects::Rendered(objects)) => objects,
            Ok(outline::Objects::Stale) => return Ok(Action::requeue(Duration::from_secs(1))),
            Err(e) => {
                return report::halt(&stack, &ctx, &gate, Halt::RenderFailed(e.to_string()), now)
                    .await;
            }
        };
    let objects = objects
        .into_iter()
        .map(|(i, child)| (prepared.children[i].key, prepared.children[i].hash, child))
        .collect();
    let mut errors = apply::apply(&stack, &ctx, &gate, objects, plan.secrets, &certs, &names).await;
    gate.open().await?;
    // prune: what is labelled for the stack and no longer desired.
    if let Some(doomed) = &plan.prune {
        let failed = prune::prune(&ctx, &format!("{ns}/{}", stack.name_any()), doomed).await;
        if failed.is_empty() && errors.is_empty() {
            ctx.memo.record_prune(&sref, prepared.desired);
        }
        errors.extend(failed);
    }
    // status: rows from the caches and the admission probe; a Warning Event on a new error.
    let mut rows = report::rows(&stack, &ctx, &prepared.children, &names, webhook_available);
    let probe = probe::probe(&stack, &ctx, &names, webhook_available).await;
    let probe_failed = probe.as_ref().is_some_and(|row| !row.ready);
    rows.extend(probe);
    let outcome = match (errors.first(), stack.spec.paused) {
        (Some(e), _) => status::Outcome::ApplyFailed(e.to_string()),
        (None, true) => status::Outcome::Paused,
        (None, false) => status::Outcome::Applied,
    };
    let cert = certs.status();
    let deferred = report::write(&stack, &ctx, &outcome, &rows, cert.as_ref(), now).await?;
    if let Some(e) = errors.into_iter().next() {
        report::warn_once(&stack, &ctx, &outcome).await;
        return Err(e);
    }
    ctx.memo.succeeded(&sref);
    let renew_at = cert.map(|c| c.renew_at);
    let next = plan::next_wakeup(stack.spec.paused, now, renew_at, probe_failed, deferred);
    Ok(next.map_or_else(Action::await_change, Action::requeue))
}

/// Gathers the plan's input from the caches and the memo, and plans.
fn plan_for(
    stack: &KabStack,
    ctx: &Ctx,
    prepared: &outline::Prepared,
    names: &render::Names,
    certs: &certificates::Certificates,
    webhook_available: bool,
) -> plan::Plan {
    let ns = stack.namespace().unwrap_or_default();
    let children = &prepared.children;
    let current: Vec<Option<String>> = children
        .iter()
        .map(|c| ctx.stores.version(c.kind, c.namespace.as_deref(), &c.name))
        .collect();
    let applied: Vec<_> = children.iter().map(|c| ctx.memo.applied(c.key)).collect();
    // Pruning scans every cache for the stack's labels: done when the desired set changed (and
    // once per stack after a start), not on every reconcile.
    let sref = ObjectRef::from_obj(stack);
    let existing = (!ctx.memo.pruned(&sref, prepared.desired))
        .then(|| prune::existing(ctx, &ns, &stack.name_any()));
    plan::plan(&plan::Input {
        paused: stack.spec.paused,
        namespace: &ns,
        children,
        current: &current,
        applied: &applied,
        webhook_available,
        registered: ctx
            .stores
            .index
            .exists(plan::REGISTRATION, None, &names.registration),
        certificates: if certs.issued {
            plan::Certificates::Issued
        } else {
            plan::Certificates::Kept
        },
        secret_names: [&names.webhook_ca_secret, &names.webhook_tls_secret],
        existing: existing.as_deref(),
    })
}

/// After a failed reconcile: exponential backoff per stack ([`backoff`]).
fn error_policy(stack: Arc<KabStack>, error: &Error, ctx: Arc<Ctx>) -> Action {
    let n = ctx.memo.failed(&ObjectRef::from_obj(stack.as_ref()));
    let delay = backoff(n);
    tracing::warn!(stack = %format!("{}/{}", stack.namespace().unwrap_or_default(), stack.name_any()), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Exponential backoff per stack: 1 s, 2 s, 4 s … capped at 5 minutes.
fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(9);
    Duration::from_secs(secs.min(300))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(50), Duration::from_secs(300));
    }
}
