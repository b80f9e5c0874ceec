//! `httpGet` probes, as the kubelet runs them: HTTP or HTTPS (certificates not verified, like
//! the kubelet), success on a 2xx or 3xx status, a timeout per attempt.

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One probe target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpProbe {
    /// Local port.
    pub port: u16,
    /// Request path.
    pub path: String,
    /// HTTPS instead of HTTP.
    pub https: bool,
    /// Timeout of one attempt.
    pub timeout: Duration,
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No answer within the probe's timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Nothing listens on the port.
    #[error("connect 127.0.0.1:{port}: {source}")]
    Connect {
        /// The local port.
        port: u16,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed.
    #[error("TLS: {0}")]
    Tls(#[source] std::io::Error),
    /// Sending the request failed.
    #[error("sending the request: {0}")]
    Send(#[source] std::io::Error),
    /// The answer does not start with an HTTP status line.
    #[error("no HTTP status in the response: {0:?}")]
    NoStatus(String),
    /// The status is not 2xx or 3xx.
    #[error("HTTP probe failed with statuscode: {0}")]
    Status(u16),
}

/// Runs the probe once: `Ok(())` on success, why it failed otherwise.
pub async fn run(p: &HttpProbe) -> Result<(), ProbeError> {
    match tokio::time::timeout(p.timeout, attempt(p)).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(p.timeout)),
    }
}

async fn attempt(p: &HttpProbe) -> Result<(), ProbeError> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
        .await
        .map_err(|source| ProbeError::Connect {
            port: p.port,
            source,
        })?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUser-Agent: kab-local-runtime\r\nConnection: close\r\n\r\n",
        p.path, p.port
    );
    let mut response = Vec::new();
    if p.https {
        let connector = tokio_rustls::TlsConnector::from(tls_config());
        // The address connected to, as the kubelet does (no SNI; certificates are not verified).
        let name = rustls::pki_types::ServerName::from(std::net::Ipv4Addr::LOCALHOST);
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(ProbeError::Tls)?;
        tls.write_all(request.as_bytes())
            .await
            .map_err(ProbeError::Send)?;
        let _ = tls.read_to_end(&mut response).await;
    } else {
        let mut tcp = tcp;
        tcp.write_all(request.as_bytes())
            .await
            .map_err(ProbeError::Send)?;
        let _ = tcp.read_to_end(&mut response).await;
    }
    let head = String::from_utf8_lossy(&response[..response.len().min(64)]).to_string();
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(ProbeError::NoStatus(head))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(ProbeError::Status(code))
    }
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map(|b| {
                    b.dangerous()
                        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
                        .with_no_client_auth()
                })
                .unwrap_or_else(|_| {
                    rustls::ClientConfig::builder()
                        .with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth()
                });
            Arc::new(config)
        })
        .clone()
}

/// Probes do not verify certificates (neither does the kubelet).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn http_probe_reads_the_status_code() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for code in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {code}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let p = HttpProbe {
            port,
            path: "/readyz".into(),
            https: false,
            timeout: Duration::from_secs(2),
        };
        assert!(run(&p).await.is_ok());
        let failed = run(&p).await.unwrap_err();
        assert!(matches!(failed, ProbeError::Status(503)), "{failed}");
        assert_eq!(failed.to_string(), "HTTP probe failed with statuscode: 503");
    }

    #[tokio::test]
    async fn a_closed_port_fails() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = HttpProbe {
            port,
            path: "/".into(),
            https: false,
            timeout: Duration::from_secs(1),
        };
        let failed = run(&p).await.unwrap_err();
        assert!(matches!(failed, ProbeError::Connect { .. }), "{failed}");
    }
}
