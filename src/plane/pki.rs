//! The plane's PKI: one CA signing the API server's serving certificate and
//! client certificates, plus the service-account signing key pair.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};

/// A PEM certificate and its PEM (PKCS#8) private key.
#[derive(Clone, Debug)]
pub struct CertPair {
    /// `-----BEGIN CERTIFICATE-----`
    pub cert_pem: String,
    /// `-----BEGIN PRIVATE KEY-----`
    pub key_pem: String,
}

/// A certificate authority that can issue serving and client certificates.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn serial(label: &str) -> SerialNumber {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut h = Sha256::new();
    h.update(label.as_bytes());
    h.update(nanos.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let mut bytes = h.finalize()[..16].to_vec();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&bytes)
}

fn validity(params: &mut CertificateParams) {
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + Duration::from_secs(3650 * 24 * 3600)).into();
}

fn dn(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for o in organizations {
        dn.push(DnType::OrganizationName, *o);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

impl Ca {
    /// A fresh self-signed CA (ECDSA P-256).
    pub fn new(common_name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name, &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(serial(common_name));
        validity(&mut params);
        let cert = params
            .self_signed(&key)
            .context("self-signing the CA certificate")?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate (PEM), for `caBundle`s and client trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key (PEM).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A serving certificate for `names` (DNS names and/or IP addresses).
    pub fn serving_cert(&self, common_name: &str, names: &[&str]) -> anyhow::Result<CertPair> {
        self.issue(
            common_name,
            &[],
            names,
            &[ExtendedKeyUsagePurpose::ServerAuth],
        )
    }

    /// A client certificate: the API server maps CN to the user name and each
    /// O to a group (`system:masters` is cluster-admin without RBAC bindings).
    pub fn client_cert(&self, user: &str, groups: &[&str]) -> anyhow::Result<CertPair> {
        self.issue(user, groups, &[], &[ExtendedKeyUsagePurpose::ClientAuth])
    }

    fn issue(
        &self,
        common_name: &str,
        organizations: &[&str],
        names: &[&str],
        usages: &[ExtendedKeyUsagePurpose],
    ) -> anyhow::Result<CertPair> {
        let key =
            KeyPair::generate().with_context(|| format!("generating key for {common_name}"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name, organizations);
        params.subject_alt_names = names
            .iter()
            .map(|n| {
                Ok(match n.parse::<IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(
                        (*n).try_into()
                            .with_context(|| format!("invalid DNS name {n:?}"))?,
                    ),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = usages.to_vec();
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(serial(common_name));
        validity(&mut params);
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing the certificate for {common_name}"))?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The service-account token signing key pair (private PEM, public PEM).
pub fn service_account_keys() -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate().context("generating the service-account key")?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

/// Every name the API server's serving certificate must cover.
pub fn apiserver_names(service_ip: &str) -> Vec<String> {
    [
        "127.0.0.1",
        "::1",
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        service_ip,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use std::sync::Arc;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn verifier(ca: &Ca) -> Arc<WebPkiServerVerifier> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(ca.cert_pem())).unwrap();
        WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap()
    }

    #[test]
    fn serving_cert_verifies_for_every_apiserver_name() {
        let ca = Ca::new("test-ca").unwrap();
        let names = apiserver_names("10.96.0.1");
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let pair = ca.serving_cert("kube-apiserver", &refs).unwrap();
        let v = verifier(&ca);
        for name in &names {
            let server = ServerName::try_from(name.clone()).unwrap();
            v.verify_server_cert(&der(&pair.cert_pem), &[], &server, &[], UnixTime::now())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let other = ServerName::try_from("example.com").unwrap();
        assert!(
            v.verify_server_cert(&der(&pair.cert_pem), &[], &other, &[], UnixTime::now())
                .is_err()
        );
        // A certificate from another CA is rejected.
        let stranger = Ca::new("other").unwrap().serving_cert("x", &refs).unwrap();
        let local = ServerName::try_from("localhost").unwrap();
        assert!(
            v.verify_server_cert(&der(&stranger.cert_pem), &[], &local, &[], UnixTime::now())
                .is_err()
        );
    }

    #[test]
    fn client_cert_carries_user_and_groups_and_is_not_a_server_cert() {
        let ca = Ca::new("test-ca").unwrap();
        let pair = ca.client_cert("kab-admin", &["system:masters"]).unwrap();
        let cert = der(&pair.cert_pem);
        let contains = |needle: &[u8]| cert.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"kab-admin"));
        assert!(contains(b"system:masters"));
        let local = ServerName::try_from("localhost").unwrap();
        assert!(
            verifier(&ca)
                .verify_server_cert(&cert, &[], &local, &[], UnixTime::now())
                .is_err()
        );
        assert!(pair.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    }

    #[test]
    fn service_account_keys_are_pem() {
        let (private, public) = service_account_keys().unwrap();
        assert!(private.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"));
    }
}
