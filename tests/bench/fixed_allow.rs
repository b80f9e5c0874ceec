//! The baseline of the webhook benchmark: an HTTPS endpoint that allows every AdmissionReview.
//!
//! It runs as its own process (this bench binary re-executed with [`SUBCOMMAND`]), like the
//! webhook, and serves through the same stack as `kab webhook` — rustls with the ring provider
//! and the same certificate files ([`kab::webhook::tls`]), axum over HTTP/1.1 — so that the
//! difference is the rules and nothing else. It reads the body and the request's `uid`, as any
//! webhook must, and answers `allowed: true`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse as _;
use axum::routing::{get, post};
use serde::Deserialize;

/// `kab-bench __fixed-allow <port> <tls dir>`.
pub const SUBCOMMAND: &str = "__fixed-allow";

#[derive(Deserialize)]
struct Review {
    request: Option<Request>,
}

#[derive(Deserialize)]
struct Request {
    uid: String,
}

async fn validate(body: Bytes) -> axum::response::Response {
    match serde_json::from_slice::<Review>(&body) {
        Ok(Review { request: Some(r) }) => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {"uid": r.uid, "allowed": true},
            })
            .to_string(),
        )
            .into_response(),
        _ => (StatusCode::BAD_REQUEST, "not an AdmissionReview").into_response(),
    }
}

pub fn main(args: &[String]) -> ExitCode {
    let (Some(port), Some(dir)) = (args.first(), args.get(1)) else {
        eprintln!("usage: {SUBCOMMAND} <port> <tls dir>");
        return ExitCode::from(2);
    };
    let Ok(port) = port.parse::<u16>() else {
        eprintln!("bad port {port}");
        return ExitCode::from(2);
    };
    let dir = PathBuf::from(dir);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = rt.block_on(async move {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = Arc::new(kab::webhook::tls::CertReloader::new(&dir, provider.clone()));
        certs
            .reload()
            .await
            .map_err(|e| anyhow::anyhow!("loading the certificate: {e}"))?;
        let config = Arc::new(kab::webhook::tls::server_config(provider, certs)?);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = kab::webhook::tls::TlsListener::bind(addr, config).await?;
        let app = axum::Router::new()
            .route("/validate", post(validate))
            .route("/healthz", get(|| async { "ok" }));
        eprintln!("fixed-allow serving on https://{addr}");
        axum::serve(listener, app).await?;
        anyhow::Ok(())
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fixed-allow: {e:#}");
            ExitCode::FAILURE
        }
    }
}
