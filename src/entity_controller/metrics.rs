//! The entity controller's metrics and readiness (served by
//! [`crate::telemetry::serve_health`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::event::Change;
use crate::telemetry::{self, Health};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChangeLabels {
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

/// Metrics (prefix `kab_entity_controller_`) and readiness.
pub struct Metrics {
    registry: Registry,
    published: Family<ChangeLabels, Counter>,
    duplicates: Counter,
    failures: Family<ErrorLabels, Counter>,
    notifications: Family<OutcomeLabels, Counter>,
    lag: Gauge<f64, AtomicU64>,
    queue_depth: Gauge,
    delay: Histogram,
    broker_connected: Gauge,
    leader: Gauge,
    needs_broker: bool,
    broker_up: AtomicBool,
    leading: AtomicBool,
    watching: AtomicBool,
}

impl Metrics {
    /// A registry with every metric; `needs_broker` is false in broker mode None.
    pub fn new(needs_broker: bool) -> Self {
        let mut registry = Registry::with_prefix("kab_entity_controller");
        let published = Family::<ChangeLabels, Counter>::default();
        let duplicates = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let notifications = Family::<OutcomeLabels, Counter>::default();
        let lag = Gauge::<f64, AtomicU64>::default();
        let queue_depth = Gauge::default();
        let delay = Histogram::new([
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ]);
        let broker_connected = Gauge::default();
        let leader = Gauge::default();
        registry.register(
            "events_published",
            "Change events acknowledged by the broker, by event (created, updated, deleted)",
            published.clone(),
        );
        registry.register(
            "duplicates",
            "Retried events the broker already had (dropped by its deduplication)",
            duplicates.clone(),
        );
        registry.register(
            "failures",
            "Failed attempts to process an entity change, by error",
            failures.clone(),
        );
        registry.register(
            "notifications",
            "Notify callbacks, by outcome (delivered, failed)",
            notifications.clone(),
        );
        registry.register(
            "publish_lag_seconds",
            "Age of the oldest entity change not yet published (0 when none is pending)",
            lag.clone(),
        );
        registry.register(
            "queue_depth",
            "Entities with a change not yet published",
            queue_depth.clone(),
        );
        registry.register(
            "publish_delay_seconds",
            "Time from an entity change to the broker's acknowledgement of its event",
            delay.clone(),
        );
        registry.register(
            "broker_connected",
            "1 while connected to the broker",
            broker_connected.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        Self {
            registry,
            published,
            duplicates,
            failures,
            notifications,
            lag,
            queue_depth,
            delay,
            broker_connected,
            leader,
            needs_broker,
            broker_up: AtomicBool::new(false),
            leading: AtomicBool::new(false),
            watching: AtomicBool::new(false),
        }
    }

    /// One event acknowledged, `delay` after the change it carries.
    pub fn published(&self, change: Change, delay: Option<Duration>) {
        self.published
            .get_or_create(&ChangeLabels {
                event: change.as_str().to_owned(),
            })
            .inc();
        if let Some(delay) = delay {
            self.delay.observe(delay.as_secs_f64());
        }
    }

    /// One retried event that the broker already had.
    pub fn duplicate(&self) {
        self.duplicates.inc();
    }

    /// One failure, labelled by a short error class.
    pub fn failed(&self, error: &str) {
        self.failures
            .get_or_create(&ErrorLabels {
                error: error.to_owned(),
            })
            .inc();
    }

    /// One notify delivery (after its retries).
    pub fn notified(&self, delivered: bool) {
        let outcome = if delivered { "delivered" } else { "failed" };
        self.notifications
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The backlog: entities with an unpublished change and the age of the oldest one.
    pub fn set_backlog(&self, depth: usize, oldest: Option<Duration>) {
        self.queue_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        self.lag.set(oldest.map_or(0.0, |d| d.as_secs_f64()));
    }

    /// Broker connection state.
    pub fn set_broker_connected(&self, up: bool) {
        self.broker_up.store(up, Ordering::Relaxed);
        self.broker_connected.set(i64::from(up));
    }

    /// Leader election state.
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Relaxed);
        self.leader.set(i64::from(leading));
    }

    /// The entity watch has listed everything once.
    pub fn set_watching(&self, watching: bool) {
        self.watching.store(watching, Ordering::Relaxed);
    }

    /// Whether the entity watch has listed everything once.
    pub fn watching(&self) -> bool {
        self.watching.load(Ordering::Relaxed)
    }

    /// Ready: the broker is connected (or there is none), and a leader is watching (a standby
    /// replica is ready to take over as soon as its broker connection is).
    pub fn ready(&self) -> bool {
        self.not_ready().is_empty()
    }

    /// Text exposition of every metric.
    pub fn encode(&self) -> String {
        telemetry::encode(&self.registry)
    }
}

impl Health for Metrics {
    fn not_ready(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.needs_broker && !self.broker_up.load(Ordering::Relaxed) {
            missing.push("not connected to the broker");
        }
        if self.leading.load(Ordering::Relaxed) && !self.watching.load(Ordering::Relaxed) {
            missing.push("the entity watch has not listed everything yet");
        }
        missing
    }

    fn metrics_text(&self) -> String {
        self.encode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exposed_with_their_names() {
        let m = Metrics::new(true);
        m.published(Change::Created, Some(Duration::from_millis(30)));
        m.failed("broker unavailable");
        m.duplicate();
        m.notified(true);
        m.set_backlog(3, Some(Duration::from_secs(2)));
        let text = m.encode();
        for line in [
            "kab_entity_controller_events_published_total{event=\"created\"} 1",
            "kab_entity_controller_failures_total{error=\"broker unavailable\"} 1",
            "kab_entity_controller_duplicates_total 1",
            "kab_entity_controller_notifications_total{outcome=\"delivered\"} 1",
            "kab_entity_controller_queue_depth 3",
            "kab_entity_controller_publish_lag_seconds 2.0",
            "kab_entity_controller_publish_delay_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn readiness_needs_the_broker_and_a_watching_leader() {
        let m = Metrics::new(true);
        assert!(!m.ready());
        m.set_broker_connected(true);
        assert!(m.ready(), "a standby replica with a broker is ready");
        m.set_leading(true);
        assert!(!m.ready(), "a leader is ready once it watches");
        m.set_watching(true);
        assert!(m.ready());
        m.set_broker_connected(false);
        assert!(!m.ready());
        let none = Metrics::new(false);
        none.set_leading(true);
        none.set_watching(true);
        assert!(none.ready(), "broker mode None needs no broker");
    }
}
