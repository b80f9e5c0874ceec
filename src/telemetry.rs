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

/// What the health endpoints show of a process.
pub trait Health: Send + Sync + 'static {
    /// Why the process is not ready, one reason per unmet condition; none when it is ready.
    fn not_ready(&self) -> Vec<&'static str>;
    /// Every metric in the text exposition format, sampled now.
    fn metrics_text(&self) -> String;
}

/// `/healthz` (200 while the process answers), `/readyz` (200 `ready`, or 503
/// `not ready: <reasons>`) and `/metrics` (OpenMetrics text) of `health`.
pub fn health_routes<H: Health>(health: Arc<H>) -> Router {
    let metrics = health.clone();
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || async move { readyz(&health.not_ready()) }),
        )
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.metrics_text(),
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
pub async fn serve_health<H: Health>(
    listener: tokio::net::TcpListener,
    health: Arc<H>,
) -> anyhow::Result<()> {
    axum::serve(listener, health_routes(health)).await?;
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

/// GETs `path` from `router` without a socket: the status and the body.
#[cfg(test)]
pub(crate) async fn fetch(router: Router, path: &str) -> (u16, String) {
    use tower::ServiceExt as _;
    let request = axum::http::Request::get(path)
        .body(axum::body::Body::empty())
        .unwrap();
    let response = router.oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Process {
        ready: AtomicBool,
    }

    impl Health for Process {
        fn not_ready(&self) -> Vec<&'static str> {
            if self.ready.load(Ordering::Relaxed) {
                vec![]
            } else {
                vec!["cache not synced", "no leader"]
            }
        }
        fn metrics_text(&self) -> String {
            "up 1\n# EOF\n".to_owned()
        }
    }

    #[tokio::test]
    async fn health_readiness_and_metrics_are_served() {
        let process = Arc::new(Process {
            ready: AtomicBool::new(false),
        });
        let routes = health_routes(process.clone());
        assert_eq!(fetch(routes.clone(), "/healthz").await, (200, "ok".into()));
        assert_eq!(
            fetch(routes.clone(), "/readyz").await,
            (503, "not ready: cache not synced; no leader".into())
        );
        process.ready.store(true, Ordering::Relaxed);
        assert_eq!(
            fetch(routes.clone(), "/readyz").await,
            (200, "ready".into())
        );
        assert_eq!(
            fetch(routes, "/metrics").await,
            (200, "up 1\n# EOF\n".into())
        );
    }
}
