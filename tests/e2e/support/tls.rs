//! TLS as a client sees it: which certificate a server presents.

use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};

/// A client configuration trusting the certificates of `ca_pem` only.
pub fn client_config(ca_pem: &str) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// The DER of the leaf certificate a fresh TLS handshake with `addr` (`host:port`) presents,
/// verified for `server_name` against `ca_pem`.
pub async fn presented(addr: &str, server_name: &str, ca_pem: &str) -> anyhow::Result<Vec<u8>> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(ca_pem)?));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let name = ServerName::try_from(server_name.to_string())?;
    let tls = connector
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {addr} as {server_name}"))?;
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .context("no certificate presented")
}

/// The DER of the first certificate of a PEM text.
pub fn der(pem: &str) -> anyhow::Result<Vec<u8>> {
    Ok(CertificateDer::from_pem_slice(pem.as_bytes())?.to_vec())
}

/// `serial …, notAfter …` of a DER certificate, to tell certificates apart in messages.
pub fn describe(der: &[u8]) -> String {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, c)) => format!(
            "serial {}, notAfter {}",
            c.raw_serial_as_string(),
            c.validity().not_after
        ),
        Err(e) => format!("unparsable certificate: {e}"),
    }
}

/// The end of a DER certificate's validity.
pub fn not_after(der: &[u8]) -> anyhow::Result<std::time::SystemTime> {
    let (_, c) = x509_parser::parse_x509_certificate(der)?;
    let secs = u64::try_from(c.validity().not_after.timestamp())?;
    Ok(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}
