//! The webhook's metrics (`/metrics`): requests by operation, result and rule, request latency,
//! unique-value claims by outcome, the serving certificate.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    operation: String,
    result: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// Every metric of `kab webhook`.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Histogram,
    claims: Family<ResultLabels, Counter>,
    cert_not_after: Gauge,
    cert_reloads: Counter,
    entities: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kab_webhook");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let claims = Family::<ResultLabels, Counter>::default();
        let cert_not_after = Gauge::default();
        let cert_reloads = Counter::default();
        let entities = Gauge::default();
        registry.register(
            "requests",
            "Admission requests by operation, result (allowed, denied, invalid) and denying rule",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer one admission request",
            duration.clone(),
        );
        registry.register(
            "claims",
            "Unique-value claims by outcome (acquired, renewed, taken_over, conflict, in_flight, released, collected, error)",
            claims.clone(),
        );
        registry.register(
            "certificate_not_after_seconds",
            "Expiry of the serving certificate in use (Unix time)",
            cert_not_after.clone(),
        );
        registry.register(
            "certificate_reloads",
            "Serving certificates loaded from disk",
            cert_reloads.clone(),
        );
        registry.register(
            "cached_entities",
            "Entities in the watch cache",
            entities.clone(),
        );
        Metrics {
            registry,
            requests,
            duration,
            claims,
            cert_not_after,
            cert_reloads,
            entities,
        }
    }

    /// Records one answered request; `rule` is the denying rule, if any.
    pub fn request(&self, operation: &str, result: &str, rule: Option<&str>, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                operation: operation.to_owned(),
                result: result.to_owned(),
                rule: rule.unwrap_or_default().to_owned(),
            })
            .inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Records a claim outcome.
    pub fn claim(&self, result: &str) {
        self.claims
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Records a newly loaded serving certificate.
    pub fn certificate_loaded(&self, not_after_unix: Option<i64>) {
        self.cert_reloads.inc();
        if let Some(t) = not_after_unix {
            self.cert_not_after.set(t);
        }
    }

    /// Sets the size of the entity cache.
    pub fn set_entities(&self, n: usize) {
        self.entities.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Text exposition of every metric.
    pub fn encode(&self) -> String {
        crate::telemetry::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exposed_with_their_names() {
        let m = Metrics::new();
        m.request(
            "CREATE",
            "denied",
            Some("unique-code"),
            Duration::from_millis(3),
        );
        m.request("CREATE", "allowed", None, Duration::from_millis(1));
        m.claim("acquired");
        m.certificate_loaded(Some(1_900_000_000));
        let text = m.encode();
        for expected in [
            r#"kab_webhook_requests_total{operation="CREATE",result="denied",rule="unique-code"} 1"#,
            r#"kab_webhook_requests_total{operation="CREATE",result="allowed",rule=""} 1"#,
            "kab_webhook_request_duration_seconds_count 2",
            r#"kab_webhook_claims_total{result="acquired"} 1"#,
            "kab_webhook_certificate_not_after_seconds 1900000000",
            "kab_webhook_certificate_reloads_total 1",
        ] {
            assert!(text.contains(expected), "{expected} missing in\n{text}");
        }
    }
}
