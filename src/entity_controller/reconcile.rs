//! One entity through the pipeline: `finalizer → publish what is unpublished → notify →
//! status`. kube-runtime's controller is the work queue: it never runs two reconciles of one
//! entity at once, so the events of one entity are published, and acknowledged, in order.
//!
//! Progress is the entity's `status.kab.publishedGeneration`, written only after the broker's
//! ack (in broker mode None: `observedGeneration`). Whatever the controller finds unpublished —
//! at start, after a crash, after a broker outage — it publishes; a retry of an event the broker
//! already stored is dropped by JetStream's deduplication on the event's stable id.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource as _, ResourceExt as _};
use serde_json::{Value, json};

use super::broker::{Broker, BrokerError};
use super::config::StackConfig;
use super::event::{self, Change};
use super::metrics::Metrics;
use super::notify::Notifier;
use super::status::{self, KabStatus, NOTIFIED, PUBLISHED, Want};

/// Finalizer on every entity while changes are delivered: the `deleted` event is acknowledged
/// before it is removed.
pub const FINALIZER: &str = "kab.dev/publish";
/// Field manager of the controller's writes (status apply, finalizer patches).
pub const MANAGER: &str = "kab-entity-controller";

/// A reconcile error: which entity, which step, and the cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker did not acknowledge an event.
    #[error("{entity}: {source}")]
    Broker {
        entity: String,
        #[source]
        source: BrokerError,
    },
    /// A write to the API server failed.
    #[error("{entity}: {action}: {source}")]
    Kube {
        entity: String,
        action: &'static str,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// Short class for the failures metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Broker { source, .. } => source.metric_label(),
            Error::Kube { action, .. } => action,
        }
    }
}

/// What the reconciler shares.
pub struct Context {
    pub config: Arc<StackConfig>,
    pub api: Api<DynamicObject>,
    pub resource: ApiResource,
    pub broker: Option<Arc<Broker>>,
    pub notifier: Option<Notifier>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// uid → the generation delivered (acknowledged), which the cached object may not show yet.
    delivered: Mutex<HashMap<String, i64>>,
    /// uid → consecutive failures (for the backoff of `error_policy`).
    failures: Mutex<HashMap<String, u32>>,
}

use crate::lock;

impl Context {
    pub fn new(
        config: Arc<StackConfig>,
        api: Api<DynamicObject>,
        resource: ApiResource,
        broker: Option<Arc<Broker>>,
        notifier: Option<Notifier>,
        recorder: Recorder,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            config,
            api,
            resource,
            broker,
            notifier,
            recorder,
            metrics,
            delivered: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Whether there is anywhere to deliver changes to (then entities carry the finalizer).
    pub fn delivers(&self) -> bool {
        self.broker.is_some() || self.notifier.is_some()
    }

    /// The generation whose change was delivered: from the entity's status or from this
    /// process's memory, whichever is further.
    pub fn done(&self, obj: &DynamicObject) -> Option<i64> {
        let current = status::current(obj);
        let recorded = if self.broker.is_some() {
            current.published_generation
        } else {
            current.observed_generation
        };
        let remembered = obj
            .metadata
            .uid
            .as_ref()
            .and_then(|uid| lock(&self.delivered).get(uid).copied());
        recorded.max(remembered)
    }

    /// The change `obj` waits for, if any.
    pub fn pending(&self, obj: &DynamicObject) -> Option<Change> {
        if !self.delivers() {
            return None;
        }
        if obj.metadata.deletion_timestamp.is_some() {
            return has_finalizer(obj).then_some(Change::Deleted);
        }
        let generation = obj.metadata.generation.unwrap_or(1);
        match self.done(obj) {
            None => Some(Change::Created),
            Some(done) if done < generation => Some(Change::Updated),
            Some(_) => None,
        }
    }

    /// Forgets the uids that are no longer watched.
    pub fn retain(&self, uids: &HashSet<String>) {
        lock(&self.delivered).retain(|uid, _| uids.contains(uid));
        lock(&self.failures).retain(|uid, _| uids.contains(uid));
    }

    fn remember(&self, uid: &str, generation: i64) {
        let mut delivered = lock(&self.delivered);
        let entry = delivered.entry(uid.to_owned()).or_insert(generation);
        *entry = (*entry).max(generation);
    }

    fn forget(&self, uid: &str) {
        lock(&self.delivered).remove(uid);
        lock(&self.failures).remove(uid);
    }
}

/// The generation of the entity's content: its generation, less the bump the API server makes
/// when it marks an entity with finalizers for deletion.
fn content_generation(obj: &DynamicObject) -> i64 {
    let generation = obj.metadata.generation.unwrap_or(1);
    if obj.metadata.deletion_timestamp.is_some() {
        (generation - 1).max(1)
    } else {
        generation
    }
}

fn has_finalizer(obj: &DynamicObject) -> bool {
    obj.finalizers().iter().any(|f| f == FINALIZER)
}

fn entity_name(obj: &DynamicObject) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// What one reconcile achieved, for the status.
#[derive(Default)]
struct Outcome {
    published: Option<i64>,
    published_condition: Option<Want>,
    notified_condition: Option<Want>,
}

/// Reconciles one entity.
pub async fn reconcile(obj: Arc<DynamicObject>, ctx: Arc<Context>) -> Result<Action, Error> {
    let result = process(&obj, &ctx).await;
    if result.is_ok()
        && let Some(uid) = &obj.metadata.uid
    {
        lock(&ctx.failures).remove(uid);
    }
    result
}

/// Backoff per entity: 250 ms, 500 ms, 1 s … capped at 10 s, so that a recovered broker is used
/// again within seconds.
pub fn error_policy(obj: Arc<DynamicObject>, error: &Error, ctx: Arc<Context>) -> Action {
    let uid = obj.metadata.uid.clone().unwrap_or_else(|| obj.name_any());
    let n = {
        let mut failures = lock(&ctx.failures);
        let n = failures.entry(uid).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    ctx.metrics.failed(error.metric_label());
    let delay = backoff(n);
    tracing::warn!(error = %error, retry_in = ?delay, "entity change not delivered yet");
    Action::requeue(delay)
}

/// `250 ms × 2^(failures-1)`, at most 10 s.
pub fn backoff(failures: u32) -> Duration {
    let ms = 250u64 << failures.saturating_sub(1).min(6);
    Duration::from_millis(ms.min(10_000))
}

async fn process(obj: &DynamicObject, ctx: &Context) -> Result<Action, Error> {
    let Some(uid) = obj.metadata.uid.clone() else {
        return Ok(Action::await_change());
    };
    let delivers = ctx.delivers();
    if obj.metadata.deletion_timestamp.is_some() {
        if !has_finalizer(obj) {
            ctx.forget(&uid);
            return Ok(Action::await_change());
        }
        if delivers {
            let mut outcome = Outcome::default();
            let delivered = async {
                catch_up(obj, ctx, &mut outcome).await?;
                send(obj, ctx, Change::Deleted, &mut outcome).await
            }
            .await;
            if let Err(e) = delivered {
                record_failure(obj, ctx, &outcome, &e).await;
                return Err(e);
            }
        }
        remove_finalizer(obj, ctx).await?;
        ctx.forget(&uid);
        return Ok(Action::await_change());
    }

    if delivers && !has_finalizer(obj) {
        add_finalizer(obj, ctx).await?;
    } else if !delivers && has_finalizer(obj) {
        remove_finalizer(obj, ctx).await?;
    }

    let mut outcome = Outcome::default();
    let delivered = if delivers {
        catch_up(obj, ctx, &mut outcome).await
    } else {
        Ok(())
    };
    if let Err(e) = delivered {
        record_failure(obj, ctx, &outcome, &e).await;
        return Err(e);
    }
    write_status(obj, ctx, &outcome, None).await?;
    Ok(Action::await_change())
}

/// Publishes the entity's current generation if it was not published yet (as `created` when
/// nothing was, else `updated`). The API server bumps the generation once more when it marks an
/// entity with finalizers for deletion: that bump is the deletion, not an update.
async fn catch_up(obj: &DynamicObject, ctx: &Context, outcome: &mut Outcome) -> Result<(), Error> {
    match ctx.done(obj) {
        Some(done) if done >= content_generation(obj) => Ok(()),
        Some(_) => send(obj, ctx, Change::Updated, outcome).await,
        None => send(obj, ctx, Change::Created, outcome).await,
    }
}

/// Publishes one change and waits for the ack, then notifies.
async fn send(
    obj: &DynamicObject,
    ctx: &Context,
    change: Change,
    outcome: &mut Outcome,
) -> Result<(), Error> {
    let config = &ctx.config;
    let generation = obj.metadata.generation.unwrap_or(1);
    let uid = obj.metadata.uid.clone().unwrap_or_default();
    let namespace = obj
        .namespace()
        .unwrap_or_else(|| config.stack.namespace.clone());
    let now = Timestamp::now();
    let time = event::change_time(obj, change, MANAGER).unwrap_or(now);
    let mut notified = event::cloud_event(config, obj, change, time);

    if let Some(broker) = &ctx.broker {
        let ack = publish(
            ctx, broker, &namespace, change, &uid, generation, &notified, time,
        )
        .await
        .map_err(|source| Error::Broker {
            entity: entity_name(obj),
            source,
        })?;
        let mut sequence = ack.sequence;
        let mut published = change;
        if change == Change::Created && ack.duplicate {
            // The creation was published before (a crash came between the ack and the status
            // write); if the entity changed since, that change is an update of its own.
            let original = broker.generation_of(ack.sequence).await;
            if original.is_none_or(|g| g < content_generation(obj)) {
                let update = event::cloud_event(config, obj, Change::Updated, time);
                let ack = publish(
                    ctx,
                    broker,
                    &namespace,
                    Change::Updated,
                    &uid,
                    generation,
                    &update,
                    time,
                )
                .await
                .map_err(|source| Error::Broker {
                    entity: entity_name(obj),
                    source,
                })?;
                sequence = ack.sequence;
                published = Change::Updated;
                notified = update;
            }
        }
        outcome.published_condition = Some(Want {
            type_: PUBLISHED,
            ok: true,
            reason: "Published",
            message: format!(
                "generation {generation}: {} event acknowledged by the broker (stream {}, sequence {sequence})",
                published.as_str(),
                broker.stream_name()
            ),
        });
    }
    if change != Change::Deleted {
        ctx.remember(&uid, generation);
        outcome.published = Some(generation);
    }

    if let Some(notifier) = &ctx.notifier {
        let want = match notifier.deliver(&notified).await {
            Ok(d) => {
                ctx.metrics.notified(true);
                Want {
                    type_: NOTIFIED,
                    ok: true,
                    reason: "Delivered",
                    message: format!(
                        "generation {generation}: {} event delivered to {} (HTTP {})",
                        change.as_str(),
                        notifier.url(),
                        d.status
                    ),
                }
            }
            Err(e) => {
                ctx.metrics.notified(false);
                tracing::warn!(entity = %entity_name(obj), error = %e, "notify failed");
                warn(obj, ctx, "NotifyFailed", "Notify", &e.to_string()).await;
                Want {
                    type_: NOTIFIED,
                    ok: false,
                    reason: "NotifyFailed",
                    message: format!("generation {generation}: {e}"),
                }
            }
        };
        outcome.notified_condition = Some(want);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn publish(
    ctx: &Context,
    broker: &Broker,
    namespace: &str,
    change: Change,
    uid: &str,
    generation: i64,
    cloud_event: &Value,
    time: Timestamp,
) -> Result<super::broker::Ack, BrokerError> {
    let subject = event::subject(&ctx.config, namespace, change);
    let id = event::message_id(uid, generation, change);
    let payload = Bytes::from(serde_json::to_vec(cloud_event).unwrap_or_default());
    let ack = broker.publish(&subject, &id, generation, payload).await?;
    if ack.duplicate {
        ctx.metrics.duplicate();
        tracing::debug!(%subject, %id, sequence = ack.sequence, "already published");
    } else {
        let delay = Timestamp::now()
            .duration_since(time)
            .try_into()
            .unwrap_or(Duration::ZERO);
        ctx.metrics.published(change, Some(delay));
        tracing::debug!(%subject, %id, sequence = ack.sequence, "published");
    }
    Ok(ack)
}

/// The conditions the controller keeps on entities.
fn kept(ctx: &Context) -> Vec<&'static str> {
    let mut kept = vec![PUBLISHED];
    if ctx.notifier.is_some() {
        kept.push(NOTIFIED);
    }
    kept
}

/// Applies `status.kab` when it changed.
async fn write_status(
    obj: &DynamicObject,
    ctx: &Context,
    outcome: &Outcome,
    failure: Option<&Error>,
) -> Result<(), Error> {
    let current = status::current(obj);
    let generation = obj.metadata.generation.unwrap_or(1);
    let mut updates = Vec::new();
    if ctx.broker.is_none() {
        updates.push(Want {
            type_: PUBLISHED,
            ok: false,
            reason: "BrokerDisabled",
            message: "broker mode is None: changes are not published".to_owned(),
        });
    } else if let Some(e) = failure {
        updates.push(Want {
            type_: PUBLISHED,
            ok: false,
            reason: "PublishFailed",
            message: format!("generation {generation} not published yet: {e}"),
        });
    } else if let Some(want) = &outcome.published_condition {
        updates.push(want.clone());
    }
    if let Some(want) = &outcome.notified_condition {
        updates.push(want.clone());
    }
    let published = if ctx.broker.is_some() {
        outcome.published.max(ctx.done(obj))
    } else {
        None
    };
    let desired = status::desired(
        &current,
        generation,
        published,
        &updates,
        &kept(ctx),
        Timestamp::now(),
    );
    if desired == current {
        return Ok(());
    }
    apply_status(obj, ctx, &desired).await
}

async fn apply_status(
    obj: &DynamicObject,
    ctx: &Context,
    desired: &KabStatus,
) -> Result<(), Error> {
    let body = status::apply_body(
        &ctx.resource.api_version,
        &ctx.resource.kind,
        &obj.namespace().unwrap_or_default(),
        &obj.name_any(),
        desired,
    );
    let params = PatchParams::apply(MANAGER).force();
    match ctx
        .api
        .patch_status(&obj.name_any(), &params, &Patch::Apply(body))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(source) => Err(Error::Kube {
            entity: entity_name(obj),
            action: "status",
            source,
        }),
    }
}

/// On a failure: the `Published` condition says why (kept progress untouched), and a Warning
/// Event is recorded when the condition's message changes (not on every retry).
async fn record_failure(obj: &DynamicObject, ctx: &Context, outcome: &Outcome, error: &Error) {
    let current = status::current(obj);
    let message = format!(
        "generation {} not published yet: {error}",
        obj.metadata.generation.unwrap_or(1)
    );
    let already = status::condition(&current, PUBLISHED)
        .is_some_and(|c| c.status == "False" && c.message == message);
    if !already {
        warn(obj, ctx, "PublishFailed", "Publish", &error.to_string()).await;
    }
    if let Err(e) = write_status(obj, ctx, outcome, Some(error)).await {
        tracing::debug!(error = %e, "cannot record the failure on the entity");
    }
}

async fn warn(obj: &DynamicObject, ctx: &Context, reason: &str, action: &str, note: &str) {
    let event = Event {
        type_: EventType::Warning,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx
        .recorder
        .publish(&event, &obj.object_ref(&ctx.resource))
        .await
    {
        tracing::debug!(error = %e, "cannot record a Warning event");
    }
}

async fn add_finalizer(obj: &DynamicObject, ctx: &Context) -> Result<(), Error> {
    let finalizers = obj.finalizers();
    let ops = if finalizers.is_empty() {
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    } else {
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ])
    };
    patch_finalizers(obj, ctx, ops, "add finalizer").await
}

async fn remove_finalizer(obj: &DynamicObject, ctx: &Context) -> Result<(), Error> {
    let Some(index) = obj.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let path = format!("/metadata/finalizers/{index}");
    let ops = json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ]);
    patch_finalizers(obj, ctx, ops, "remove finalizer").await
}

/// A JSON patch guarded by a `test` (never a blind write, never an apply that could recreate
/// a deleted entity).
async fn patch_finalizers(
    obj: &DynamicObject,
    ctx: &Context,
    ops: Value,
    action: &'static str,
) -> Result<(), Error> {
    let patch = Patch::<()>::Json(serde_json::from_value(ops).unwrap_or_default());
    let params = PatchParams {
        field_manager: Some(MANAGER.to_owned()),
        ..PatchParams::default()
    };
    match ctx.api.patch(&obj.name_any(), &params, &patch).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(source) => Err(Error::Kube {
            entity: entity_name(obj),
            action,
            source,
        }),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_short_and_capped() {
        let delays: Vec<u128> = (1..=9).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(
            delays,
            [250, 500, 1000, 2000, 4000, 8000, 10000, 10000, 10000]
        );
    }
}
