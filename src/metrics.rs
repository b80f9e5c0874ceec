//! The operator's metrics and readiness (served by [`crate::telemetry::serve_health`]).

use crate::api::{KabStack, Phase};
use crate::telemetry::{self, Health};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

/// The operator's metrics: reconciliations, failures by error, reconcile duration, stacks by phase.
pub struct Metrics {
    registry: Registry,
    reconciliations: Counter,
    failures: Family<ErrorLabels, Counter>,
    duration: Histogram,
    stacks: Family<PhaseLabels, Gauge>,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kab_operator");
        let reconciliations = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let stacks = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "reconciliations",
            "Reconciliations of KabStacks",
            reconciliations.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Failed reconciliations by error",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconciliation",
            duration.clone(),
        );
        registry.register("stacks", "KabStacks by phase", stacks.clone());
        Self {
            registry,
            reconciliations,
            failures,
            duration,
            stacks,
            ready: AtomicBool::new(false),
        }
    }

    /// Records one reconciliation.
    pub fn observe_reconcile(&self, took: Duration, error: Option<&str>) {
        self.reconciliations.inc();
        self.duration.observe(took.as_secs_f64());
        if let Some(e) = error {
            self.failures
                .get_or_create(&ErrorLabels {
                    error: e.to_string(),
                })
                .inc();
        }
    }

    /// Sets the stacks-by-phase gauge from the stack cache.
    pub fn set_phases(&self, stacks: &[Arc<KabStack>]) {
        for phase in Phase::ALL {
            let n = stacks
                .iter()
                .filter(|s| s.status.as_ref().and_then(|st| st.phase) == Some(phase))
                .count();
            self.stacks
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str().into(),
                })
                .set(n as i64);
        }
    }

    /// Marks the process ready (leading, when it elects a leader).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Text exposition of every metric.
    pub fn encode(&self) -> String {
        telemetry::encode(&self.registry)
    }
}

impl Health for Metrics {
    fn not_ready(&self) -> Vec<&'static str> {
        if self.ready.load(Ordering::Relaxed) {
            vec![]
        } else {
            vec!["not the leader yet"]
        }
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
        let m = Metrics::new();
        m.observe_reconcile(Duration::from_millis(20), Some("apply webhook"));
        let text = m.encode();
        assert!(
            text.contains("kab_operator_reconciliations_total 1"),
            "{text}"
        );
        assert!(
            text.contains("kab_operator_reconcile_failures_total{error=\"apply webhook\"} 1"),
            "{text}"
        );
        assert!(text.contains("kab_operator_reconcile_duration_seconds_bucket"));
    }
}
