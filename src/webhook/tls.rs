//! HTTPS for the webhook: a certificate resolver that reloads `tls.crt`/`tls.key` when they
//! change on disk, and a TLS listener for axum.
//!
//! The kubelet updates a mounted Secret by swapping the `..data` symlink, so both files change
//! at once; reading them is two opens, though, and may straddle a swap. A pair whose key does
//! not match its certificate is therefore not an error worth more than a debug line: the old
//! certificate stays in use and the next poll reads a consistent pair. Every handshake asks the
//! resolver, so the new certificate is presented from the first handshake after a reload; open
//! connections keep theirs.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::certs::{TLS_CRT, TLS_KEY};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

struct Loaded {
    key: Arc<CertifiedKey>,
    digest: [u8; 32],
    not_after: Option<Timestamp>,
}

/// The serving certificate, reloaded from a directory holding `tls.crt` and `tls.key`.
pub struct CertReloader {
    dir: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Option<Loaded>>,
    last_error: RwLock<Option<[u8; 32]>>,
}

impl std::fmt::Debug for CertReloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertReloader")
            .field("dir", &self.dir)
            .field("loaded", &self.is_loaded())
            .finish_non_exhaustive()
    }
}

/// What a reload did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    /// The files did not change.
    Unchanged,
    /// A new certificate is in use; when it expires.
    Loaded(Option<Timestamp>),
}

/// Why the files could not be used. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// `tls.crt` holds no PEM certificate.
    #[error("{0} holds no PEM certificate")]
    NoCertificate(String),
    /// The PEM could not be parsed.
    #[error("{path} is not valid PEM: {message}")]
    Pem {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// rustls refused the pair (unsupported key, key not matching the certificate).
    #[error("the certificate and key in {dir} cannot be used together: {message}")]
    Unusable {
        /// The directory.
        dir: String,
        /// Why.
        message: String,
    },
}

impl CertReloader {
    /// A resolver for `dir` (nothing loaded yet: handshakes fail until [`CertReloader::reload`]
    /// succeeds).
    pub fn new(dir: &Path, provider: Arc<CryptoProvider>) -> Self {
        CertReloader {
            dir: dir.to_path_buf(),
            provider,
            current: RwLock::new(None),
            last_error: RwLock::new(None),
        }
    }

    /// Whether a certificate is in use.
    pub fn is_loaded(&self) -> bool {
        crate::read(&self.current).is_some()
    }

    /// Expiry of the certificate in use.
    pub fn not_after(&self) -> Option<Timestamp> {
        crate::read(&self.current)
            .as_ref()
            .and_then(|l| l.not_after)
    }

    /// Reads the files and swaps the certificate in if they changed and are usable.
    pub async fn reload(&self) -> Result<Reload, TlsError> {
        let crt_path = self.dir.join(TLS_CRT);
        let key_path = self.dir.join(TLS_KEY);
        let read = |p: PathBuf| async move {
            tokio::fs::read(&p).await.map_err(|source| TlsError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let crt = read(crt_path.clone()).await?;
        let key = read(key_path.clone()).await?;
        let mut hash = Sha256::new();
        hash.update(&crt);
        hash.update([0]);
        hash.update(&key);
        let digest: [u8; 32] = hash.finalize().into();
        let unchanged = crate::read(&self.current)
            .as_ref()
            .is_some_and(|l| l.digest == digest);
        if unchanged {
            return Ok(Reload::Unchanged);
        }
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&crt)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Pem {
                path: crt_path.display().to_string(),
                message: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate(crt_path.display().to_string()));
        }
        let private = PrivateKeyDer::from_pem_slice(&key).map_err(|e| TlsError::Pem {
            path: key_path.display().to_string(),
            // The error names the PEM section, never its content.
            message: e.to_string(),
        })?;
        let certified = CertifiedKey::from_der(certs, private, &self.provider).map_err(|e| {
            TlsError::Unusable {
                dir: self.dir.display().to_string(),
                message: e.to_string(),
            }
        })?;
        let not_after = std::str::from_utf8(&crt)
            .ok()
            .and_then(|pem| crate::certs::read_not_after(pem).ok());
        *crate::write(&self.current) = Some(Loaded {
            key: Arc::new(certified),
            digest,
            not_after,
        });
        Ok(Reload::Loaded(not_after))
    }

    /// Polls the files every `every` and reloads them when they change; logs each new
    /// certificate, and each distinct unusable pair once.
    pub async fn watch(self: Arc<Self>, every: Duration, metrics: Arc<super::metrics::Metrics>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.reload().await {
                Ok(Reload::Unchanged) => {}
                Ok(Reload::Loaded(not_after)) => {
                    *crate::write(&self.last_error) = None;
                    metrics.certificate_loaded(not_after.map(|t| t.as_second()));
                    match not_after {
                        Some(t) => {
                            tracing::info!(dir = %self.dir.display(), not_after = %t, "serving certificate loaded")
                        }
                        None => {
                            tracing::info!(dir = %self.dir.display(), "serving certificate loaded")
                        }
                    }
                }
                Err(e) => {
                    // Log a given failure once, not every poll.
                    let key = {
                        let mut h = Sha256::new();
                        h.update(e.to_string().as_bytes());
                        let d: [u8; 32] = h.finalize().into();
                        d
                    };
                    let mut last = crate::write(&self.last_error);
                    if *last != Some(key) {
                        *last = Some(key);
                        if self.is_loaded() {
                            tracing::warn!("keeping the current serving certificate: {e}");
                        } else {
                            tracing::warn!("no serving certificate yet: {e}");
                        }
                    }
                }
            }
        }
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        crate::read(&self.current).as_ref().map(|l| l.key.clone())
    }
}

/// A rustls server configuration (TLS 1.3 and 1.2, no client certificates) serving what
/// `resolver` holds.
pub fn server_config(
    provider: Arc<CryptoProvider>,
    resolver: Arc<CertReloader>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    Ok(rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver))
}

/// A TCP listener that hands axum finished TLS connections. Handshakes run in their own tasks
/// with a deadline, so a slow or silent client never holds up the others.
pub struct TlsListener {
    incoming: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Binds `addr` and starts accepting.
    pub async fn bind(addr: SocketAddr, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let tcp = TcpListener::bind(addr).await?;
        let local = tcp.local_addr()?;
        let (tx, incoming) = tokio::sync::mpsc::channel(128);
        let tls = TlsAcceptor::from(config);
        let acceptor = tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        // e.g. out of file descriptors: back off instead of spinning.
                        tracing::warn!("accepting a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (tx, tls) = (tx.clone(), tls.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(conn)) => {
                            let _ = tx.send((conn, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            incoming,
            local,
            acceptor,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(conn) => conn,
            // The acceptor task is gone (only when the listener is dropped): accept nothing.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{issue_ca, issue_serving};
    use rustls::pki_types::ServerName;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn write_pair(dir: &Path, cert: &str, key: &str) {
        // Like the kubelet: write aside, then rename into place.
        let tmp = dir.join(".tmp");
        std::fs::write(&tmp, cert).unwrap();
        std::fs::rename(&tmp, dir.join(TLS_CRT)).unwrap();
        std::fs::write(&tmp, key).unwrap();
        std::fs::rename(&tmp, dir.join(TLS_KEY)).unwrap();
    }

    async fn presented(addr: SocketAddr, ca_pem: &str) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = connector
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[tokio::test]
    async fn reloads_changed_files_and_serves_the_new_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let now = Timestamp::now();
        let ca = issue_ca("test", now, Duration::from_secs(3600)).unwrap();
        let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let first = issue_serving(&ca, &names, now, Duration::from_secs(600)).unwrap();
        let second = issue_serving(&ca, &names, now, Duration::from_secs(1200)).unwrap();

        let reloader = Arc::new(CertReloader::new(dir.path(), provider()));
        assert!(matches!(
            reloader.reload().await,
            Err(TlsError::Read { .. })
        ));
        assert!(!reloader.is_loaded());

        write_pair(dir.path(), &first.cert_pem, &first.key_pem);
        assert_eq!(
            reloader.reload().await.unwrap(),
            Reload::Loaded(Some(first.not_after))
        );
        assert_eq!(reloader.reload().await.unwrap(), Reload::Unchanged);

        let config = Arc::new(server_config(provider(), reloader.clone()).unwrap());
        let listener = TlsListener::bind("127.0.0.1:0".parse().unwrap(), config)
            .await
            .unwrap();
        let addr = axum::serve::Listener::local_addr(&listener).unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        assert_eq!(presented(addr, &ca.cert_pem).await, der(&first.cert_pem));

        // A certificate with the key of another: refused, the first stays.
        write_pair(dir.path(), &second.cert_pem, &first.key_pem);
        assert!(matches!(
            reloader.reload().await,
            Err(TlsError::Unusable { .. })
        ));
        assert_eq!(presented(addr, &ca.cert_pem).await, der(&first.cert_pem));

        // Garbage: refused, the first stays.
        write_pair(dir.path(), "not a certificate", "nor a key");
        assert!(reloader.reload().await.is_err());
        assert!(reloader.is_loaded());

        write_pair(dir.path(), &second.cert_pem, &second.key_pem);
        assert_eq!(
            reloader.reload().await.unwrap(),
            Reload::Loaded(Some(second.not_after))
        );
        assert_eq!(presented(addr, &ca.cert_pem).await, der(&second.cert_pem));
        assert_eq!(reloader.not_after(), Some(second.not_after));
        server.abort();
    }

    #[tokio::test]
    async fn errors_never_show_key_material() {
        let dir = tempfile::tempdir().unwrap();
        let now = Timestamp::now();
        let ca = issue_ca("test", now, Duration::from_secs(3600)).unwrap();
        let one = issue_serving(&ca, &["a".to_string()], now, Duration::from_secs(600)).unwrap();
        let two = issue_serving(&ca, &["b".to_string()], now, Duration::from_secs(600)).unwrap();
        write_pair(dir.path(), &one.cert_pem, &two.key_pem);
        let err = CertReloader::new(dir.path(), provider())
            .reload()
            .await
            .unwrap_err()
            .to_string();
        let body: String = two
            .key_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        assert!(!err.contains(&body[..20]), "{err}");
    }
}
