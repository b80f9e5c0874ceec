//! What every kab process shares to be observed: its log set-up, and the `/healthz`, `/readyz`
//! and `/metrics` endpoints (served on their own port by the operator and the entity
//! controller, beside `/validate` by the webhook).

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;

/// Log output format (`--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Sends `tracing` output to standard error in `format`, filtered by `RUST_LOG`, or else by
/// `default_filter` (an `EnvFilter` directive such as `info,kube=warn`). Once per process: a
/// later call keeps the first set-up.
pub fn init_logs(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Why the process is not ready: one reason per unmet condition, none when it is ready.
pub type Readiness = Arc<dyn Fn() -> Vec<&'static str> + Send + Sync>;

/// The metrics in the text exposition format, produced at each scrape.
pub type Exposition = Arc<dyn Fn() -> String + Send + Sync>;

/// `/healthz` (200 while the process answers), `/readyz` (200 `ready`, or 503
/// `not ready: <reasons>`) and `/metrics` (OpenMetrics text).
pub fn health_routes(readiness: Readiness, metrics: Exposition) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(move || async move { readyz(&readiness()) }))
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics(),
                )
            }),
        )
}

fn readyz(missing: &[&str]) -> Response {
    if missing.is_empty() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}", missing.join("; ")),
        )
            .into_response()
    }
}

/// Serves [`health_routes`] on `listener` until the process ends.
pub async fn serve_health(
    listener: tokio::net::TcpListener,
    readiness: Readiness,
    metrics: Exposition,
) -> anyhow::Result<()> {
    axum::serve(listener, health_routes(readiness, metrics)).await?;
    Ok(())
}

/// The text exposition of every metric in `registry` (empty if encoding fails).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tower::ServiceExt as _;

    async fn get(router: Router, path: &str) -> (u16, String) {
        let r = router
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn health_readiness_and_metrics_are_served() {
        let ready = Arc::new(AtomicBool::new(false));
        let r = ready.clone();
        let routes = health_routes(
            Arc::new(move || {
                if r.load(Ordering::Relaxed) {
                    vec![]
                } else {
                    vec!["cache not synced", "no leader"]
                }
            }),
            Arc::new(|| "up 1\n# EOF\n".to_owned()),
        );
        assert_eq!(get(routes.clone(), "/healthz").await, (200, "ok".into()));
        assert_eq!(
            get(routes.clone(), "/readyz").await,
            (503, "not ready: cache not synced; no leader".into())
        );
        ready.store(true, Ordering::Relaxed);
        assert_eq!(get(routes.clone(), "/readyz").await, (200, "ready".into()));
        assert_eq!(get(routes, "/metrics").await, (200, "up 1\n# EOF\n".into()));
    }
}
