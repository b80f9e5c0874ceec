//! The optional `controller.notify` callback: an HTTP POST of the same CloudEvent (structured
//! mode, `application/cloudevents+json`), retried with exponential backoff.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::config::NotifyConfig;
use super::event::CLOUDEVENTS_JSON;
use crate::hosts;

/// Attempts per event before the outcome is recorded as failed.
pub const ATTEMPTS: u32 = 5;

/// Why an event was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The receiver refused the event (a 4xx other than 408 and 429: retrying will not help).
    #[error("{url} refused the event: HTTP {status}{body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
    /// Every attempt failed.
    #[error("{url}: {attempts} attempts failed, the last one: {last}")]
    Exhausted {
        url: String,
        attempts: u32,
        last: String,
    },
}

/// A successful delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivered {
    pub status: u16,
    pub attempts: u32,
}

/// Posts events to one URL.
pub struct Notifier {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: String,
    /// The hosts file the URL's host is resolved through, read at each attempt.
    hosts: Option<PathBuf>,
    timeout: Duration,
    base_delay: Duration,
}

impl Notifier {
    /// A notifier for `config`, resolving the URL's host through the hosts file at `hosts`
    /// when given.
    pub fn new(config: &NotifyConfig, hosts: Option<PathBuf>) -> Self {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match builder.with_provider_and_native_roots(provider.clone()) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "no CA certificates found: https notify URLs will fail");
                let tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map(|b| {
                        b.with_root_certificates(rustls::RootCertStore::empty())
                            .with_no_client_auth()
                    });
                match tls {
                    Ok(tls) => hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls),
                    Err(_) => hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                        rustls::ClientConfig::builder()
                            .with_root_certificates(rustls::RootCertStore::empty())
                            .with_no_client_auth(),
                    ),
                }
            }
        };
        let connector = builder.https_or_http().enable_http1().build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Self {
            client,
            url: config.url.clone(),
            hosts,
            timeout: Duration::from_secs(config.timeout_seconds.max(1)),
            base_delay: Duration::from_millis(250),
        }
    }

    /// The configured URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Posts `event`, retrying up to [`ATTEMPTS`] times.
    pub async fn deliver(&self, event: &Value) -> Result<Delivered, NotifyError> {
        let body = Bytes::from(serde_json::to_vec(event).unwrap_or_default());
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            match self.post(body.clone()).await {
                Ok((status, _)) if (200..300).contains(&status) => {
                    return Ok(Delivered {
                        status,
                        attempts: attempt,
                    });
                }
                Ok((status, text)) if !retryable(status) => {
                    return Err(NotifyError::Refused {
                        url: self.url.clone(),
                        status,
                        body: if text.is_empty() {
                            String::new()
                        } else {
                            format!(": {text}")
                        },
                    });
                }
                Ok((status, _)) => last = format!("HTTP {status}"),
                Err(e) => last = e,
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(retry_delay(self.base_delay, attempt)).await;
            }
        }
        Err(NotifyError::Exhausted {
            url: self.url.clone(),
            attempts: ATTEMPTS,
            last,
        })
    }

    async fn post(&self, body: Bytes) -> Result<(u16, String), String> {
        let resolved = match &self.hosts {
            Some(path) => hosts::resolve_in_file(&self.url, path, Duration::ZERO).await,
            None => None,
        };
        let target = resolved
            .as_ref()
            .map_or(self.url.as_str(), |r| r.url.as_str());
        let mut request = http::Request::post(target)
            .header(http::header::CONTENT_TYPE, CLOUDEVENTS_JSON)
            .header(http::header::USER_AGENT, "kab-entity-controller");
        if let Some(resolved) = &resolved {
            request = request.header(http::header::HOST, &resolved.authority);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| format!("invalid request: {e}"))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{e:#}"))?;
            let status = response.status().as_u16();
            let text = match response.into_body().collect().await {
                Ok(body) => String::from_utf8_lossy(&body.to_bytes())
                    .chars()
                    .take(200)
                    .collect(),
                Err(_) => String::new(),
            };
            Ok((status, text))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {}s", self.timeout.as_secs()))?
    }
}

/// Whether an HTTP status is worth another attempt.
pub fn retryable(status: u16) -> bool {
    status >= 500 || status == 408 || status == 429
}

/// Delay before attempt `attempt + 1`: `base`, 2×, 4× … capped at 30 × `base`.
pub fn retry_delay(base: Duration, attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(5);
    (base * factor).min(base * 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let base = Duration::from_millis(250);
        let delays: Vec<u128> = (1..=8).map(|a| retry_delay(base, a).as_millis()).collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 7500, 7500, 7500]);
    }

    #[test]
    fn only_transient_statuses_are_retried() {
        for status in [500, 502, 503, 504, 408, 429] {
            assert!(retryable(status), "{status}");
        }
        for status in [400, 401, 403, 404, 410, 422] {
            assert!(!retryable(status), "{status}");
        }
    }
}
