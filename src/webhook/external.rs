//! The business application behind `external` rules, over HTTP(S).
//!
//! The webhook POSTs `{rule, operation, namespace, name, dryRun, object, oldObject}` as JSON
//! and expects `{"allowed": bool, "message": "...", "warnings": ["..."]}` (message and
//! warnings optional) within the rule's `timeoutSeconds`. A timeout, a connection failure or a
//! 5xx is [`ExternalAnswer::Unavailable`] (a `failOpen` rule admits, with a warning); any other
//! non-2xx status or a body that is not that JSON is [`ExternalAnswer::Invalid`] (always
//! denies). Bodies over 64 KiB are refused. HTTPS trusts the system's roots, through rustls
//! with the ring provider.
//!
//! Under the local workload runtime, `KAB_HOSTS_FILE` maps Service names
//! (`todo-api.shop.svc`) to loopback addresses: an `http://` URL whose host is in it is sent to
//! that address, with the original `Host` header. (`https://` URLs always go through DNS: the
//! certificate is checked against the name.) The file is re-read on each call, so Services
//! that appear later are found.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::Value;

use super::engine::{External, ExternalAnswer};
use crate::api::ExternalRule;
use crate::hosts::{self, Hosts};

/// Largest answer read from the application.
const MAX_ANSWER: usize = 64 * 1024;

#[derive(Deserialize)]
struct Answer {
    allowed: bool,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    warnings: Option<Vec<String>>,
}

/// An HTTP(S) client with a connection pool, shared by every external rule.
#[derive(Clone)]
pub struct HttpExternal {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl HttpExternal {
    /// A client trusting the system's root certificates (none found: HTTPS fails, HTTP works).
    pub fn new(
        provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, rustls::Error> {
        let builder = match hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider.clone())
        {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!("no system root certificates for external rules over HTTPS: {e}");
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
            }
        };
        let connector = builder.https_or_http().enable_http1().build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(HttpExternal { client })
    }

    async fn post(&self, url: &str, payload: &Value) -> ExternalAnswer {
        let body = match serde_json::to_vec(payload) {
            Ok(b) => b,
            Err(e) => return ExternalAnswer::Invalid(format!("cannot encode the request: {e}")),
        };
        let local = Hosts::from_env().unwrap_or_else(|e| {
            tracing::debug!("{e}; resolving {url} through DNS");
            None
        });
        let (target, host) = target(url, local.as_ref());
        let mut request = http::Request::post(&target);
        if let Some(host) = host {
            request = request.header(http::header::HOST, host);
        }
        let request = match request
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
        {
            Ok(r) => r,
            Err(e) => return ExternalAnswer::Invalid(format!("is not a usable URL: {e}")),
        };
        let response = match self.client.request(request).await {
            Ok(r) => r,
            Err(e) => {
                let cause = std::error::Error::source(&e)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default();
                return ExternalAnswer::Unavailable(format!("cannot be reached ({e}{cause})"));
            }
        };
        let status = response.status();
        let body = match Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return if status.is_server_error() {
                    ExternalAnswer::Unavailable(format!("answered {status}"))
                } else {
                    ExternalAnswer::Invalid(format!(
                        "answered {status} with an unreadable body ({e}; at most {} KiB)",
                        MAX_ANSWER / 1024
                    ))
                };
            }
        };
        if status.is_server_error() {
            return ExternalAnswer::Unavailable(format!("answered {status}"));
        }
        if !status.is_success() {
            return ExternalAnswer::Invalid(format!("answered {status}"));
        }
        match serde_json::from_slice::<Answer>(&body) {
            Ok(Answer {
                allowed: true,
                warnings,
                ..
            }) => ExternalAnswer::Allowed {
                warnings: warnings.unwrap_or_default(),
            },
            Ok(Answer {
                allowed: false,
                message,
                warnings,
            }) => ExternalAnswer::Denied {
                message: message.unwrap_or_default(),
                warnings: warnings.unwrap_or_default(),
            },
            Err(e) => ExternalAnswer::Invalid(format!(
                "answered {status} with a body that is not {{\"allowed\": bool, \"message\": string}}: {e}"
            )),
        }
    }
}

/// Where to send a request for `url`, and the `Host` header to keep, given the local hosts
/// file (see the module documentation).
fn target(url: &str, local: Option<&Hosts>) -> (String, Option<String>) {
    let http = url
        .get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("http://"));
    match local
        .filter(|_| http)
        .and_then(|h| hosts::resolve_url(url, h))
    {
        Some(r) => (r.url, Some(r.authority)),
        None => (url.to_owned(), None),
    }
}

impl External for HttpExternal {
    async fn ask(&self, rule: &ExternalRule, payload: &Value) -> ExternalAnswer {
        let secs = u64::try_from(rule.timeout_seconds.max(1)).unwrap_or(1);
        match tokio::time::timeout(Duration::from_secs(secs), self.post(&rule.url, payload)).await {
            Ok(answer) => answer,
            Err(_) => ExternalAnswer::Unavailable(format!("did not answer within {secs}s")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use serde_json::json;

    async fn app() -> String {
        let router = axum::Router::new()
            .route(
                "/allow",
                post(|| async { axum::Json(json!({"allowed": true, "warnings": ["fyi"]})) }),
            )
            .route(
                "/deny",
                post(|axum::Json(body): axum::Json<Value>| async move {
                    axum::Json(json!({"allowed": false, "message": format!("no {}", body["name"].as_str().unwrap_or("?"))}))
                }),
            )
            .route(
                "/slow",
                post(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "{}"
                }),
            )
            .route(
                "/boom",
                post(|| async { (http::StatusCode::SERVICE_UNAVAILABLE, "down") }),
            )
            .route("/garbage", post(|| async { "hello" }))
            .route(
                "/huge",
                post(|| async { "x".repeat(200 * 1024) }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}")
    }

    #[test]
    fn local_service_names_resolve_through_the_hosts_file_for_http_only() {
        let local = Hosts::parse("127.0.0.7 todo-api.shop.svc\n");
        assert_eq!(
            target("http://todo-api.shop.svc/validate", Some(&local)),
            (
                "http://127.0.0.7/validate".to_owned(),
                Some("todo-api.shop.svc".to_owned())
            )
        );
        assert_eq!(
            target("http://todo-api.shop.svc:8080/v", Some(&local)).0,
            "http://127.0.0.7:8080/v"
        );
        for (url, hosts) in [
            ("https://todo-api.shop.svc/validate", Some(&local)),
            ("http://elsewhere.svc/validate", Some(&local)),
            ("http://todo-api.shop.svc/validate", None),
        ] {
            assert_eq!(target(url, hosts), (url.to_owned(), None), "{url}");
        }
    }

    fn rule(url: String) -> ExternalRule {
        ExternalRule {
            url,
            timeout_seconds: 1,
            fail_open: false,
        }
    }

    #[tokio::test]
    async fn answers_table() {
        let base = app().await;
        let client =
            HttpExternal::new(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .unwrap();
        let payload = json!({"name": "first"});
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            drop(l);
            format!("http://127.0.0.1:{port}/x")
        };
        let answer = |path: &str| rule(format!("{base}{path}"));
        assert_eq!(
            client.ask(&answer("/allow"), &payload).await,
            ExternalAnswer::Allowed {
                warnings: vec!["fyi".into()]
            }
        );
        assert_eq!(
            client.ask(&answer("/deny"), &payload).await,
            ExternalAnswer::Denied {
                message: "no first".into(),
                warnings: vec![]
            }
        );
        let cases: Vec<(ExternalRule, &str, bool)> = vec![
            (answer("/slow"), "did not answer within 1s", true),
            (answer("/boom"), "answered 503 Service Unavailable", true),
            (rule(refused), "cannot be reached", true),
            (answer("/garbage"), "body that is not", false),
            (answer("/missing"), "answered 404 Not Found", false),
            (answer("/huge"), "unreadable body", false),
        ];
        for (r, expected, unavailable) in cases {
            let got = client.ask(&r, &payload).await;
            let text = match (&got, unavailable) {
                (ExternalAnswer::Unavailable(t), true) | (ExternalAnswer::Invalid(t), false) => t,
                _ => panic!("{}: {got:?}", r.url),
            };
            assert!(text.contains(expected), "{}: {text}", r.url);
        }
    }
}
