//! Webhook PKI: a per-stack CA and the webhook's serving certificate.
//!
//! Everything here is pure except key generation: the clock is always passed in (`now`), and the
//! decision what to do ([`plan`]) is separate from doing it ([`execute`]). The operator reads the
//! two Secrets into a [`PkiState`], asks [`plan`], runs [`execute`] when the answer is not
//! [`Action::Keep`], and writes the result back (CA Secret first, then the serving Secret).
//!
//! Stored data (two Secrets per stack):
//! - CA Secret `<stack>-webhook-ca`: `ca.crt`, `ca.key`, and during a CA rotation
//!   `ca-previous.crt` + `ca-previous-until` (RFC 3339: when the previous CA may be dropped).
//! - serving Secret `<stack>-webhook-tls` (type `kubernetes.io/tls`): `tls.crt`, `tls.key`,
//!   `ca.crt` (the CA that issued `tls.crt`).
//!
//! Lifetimes: the serving certificate lives [`CertPolicy::validity`] and is renewed
//! [`CertPolicy::renew_before`] its expiry; the CA lives 10 × the serving validity and is rotated
//! when less than 3 × the serving validity is left. After a rotation the previous CA stays in the
//! CA bundle until every serving certificate it issued has expired.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::jiff::Timestamp;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

use crate::api::CertificateSpec;

/// Key of the CA certificate, in the CA Secret and in the serving Secret.
pub const CA_CRT: &str = "ca.crt";
/// Key of the CA private key in the CA Secret.
pub const CA_KEY: &str = "ca.key";
/// Key of the previous CA certificate in the CA Secret (present during a CA rotation).
pub const CA_PREVIOUS_CRT: &str = "ca-previous.crt";
/// Key of the time (RFC 3339) after which the previous CA is dropped.
pub const CA_PREVIOUS_UNTIL: &str = "ca-previous-until";
/// Key of the serving certificate in the serving Secret.
pub const TLS_CRT: &str = "tls.crt";
/// Key of the serving private key in the serving Secret.
pub const TLS_KEY: &str = "tls.key";

/// Shortest serving-certificate validity accepted.
pub const MIN_VALIDITY: Duration = Duration::from_secs(2 * 60);
/// Longest serving-certificate validity accepted (10 years; the CA lives 10 × this).
pub const MAX_VALIDITY: Duration = Duration::from_secs(87_600 * 3600);
/// The CA lives this many serving validities.
pub const CA_VALIDITY_FACTOR: u32 = 10;
/// The CA is rotated when fewer than this many serving validities are left.
pub const CA_RENEW_FACTOR: u32 = 3;
/// Certificates are valid from this long before `now`, to tolerate clock skew.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Anything that can go wrong with durations and certificates. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A duration string is not a Go-style duration.
    #[error(
        "invalid duration {input:?}: {reason} (use a Go-style duration such as 2160h, 90m, 1h30m or 45s)"
    )]
    Duration {
        /// The rejected input.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate policy is unusable.
    #[error("invalid certificate policy: {0}")]
    Policy(String),
    /// A certificate or key could not be generated or signed.
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM certificate could not be read.
    #[error("cannot read certificate: {0}")]
    Parse(String),
    /// A time computation left the supported range.
    #[error("time out of range: {0}")]
    Time(String),
    /// A serving certificate needs at least one DNS name.
    #[error("a serving certificate needs at least one DNS name")]
    NoDnsNames,
}

/// Parse a Go-style duration (`time.ParseDuration`): a sequence of decimal numbers, each with an
/// optional fraction and a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`), e.g. `2160h`, `1h30m`,
/// `1.5h`, `90s`. `0` alone is zero. Negative durations are rejected.
pub fn parse_duration(s: &str) -> Result<Duration, CertError> {
    let err = |reason: &str| CertError::Duration {
        input: s.to_string(),
        reason: reason.to_string(),
    };
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.starts_with('-') {
        return Err(err("must not be negative"));
    }
    if rest.is_empty() {
        return Err(err("empty"));
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    const MAX_NANOS: u128 = i64::MAX as u128; // Go's limit, about 292 years
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, after) = rest.split_at(int_len);
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.bytes().take_while(u8::is_ascii_digit).count();
                a.split_at(n)
            }
            None => ("", after),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(err("expected a number"));
        }
        let unit_len = after
            .bytes()
            .take_while(|b| !b.is_ascii_digit() && *b != b'.')
            .count();
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(err("missing unit")),
            _ => return Err(err(&format!("unknown unit {unit:?}"))),
        };
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part
                .parse::<u128>()
                .map_err(|_| err("number too large"))?
        };
        let mut value = int
            .checked_mul(unit_nanos)
            .ok_or_else(|| err("too large"))?;
        if !frac_part.is_empty() {
            // Only the first 18 digits matter for a nanosecond result.
            let digits = &frac_part[..frac_part.len().min(18)];
            let frac: u128 = digits.parse().map_err(|_| err("bad fraction"))?;
            value += frac * unit_nanos / 10u128.pow(digits.len() as u32);
        }
        total = total.checked_add(value).ok_or_else(|| err("too large"))?;
        if total > MAX_NANOS {
            return Err(err("too large"));
        }
        rest = after;
    }
    Ok(Duration::new(
        (total / 1_000_000_000) as u64,
        (total % 1_000_000_000) as u32,
    ))
}

/// The stack's webhook CA.
#[derive(Clone, PartialEq, Eq)]
pub struct Ca {
    /// PEM of the CA certificate.
    pub cert_pem: String,
    /// PEM (PKCS#8) of the CA private key. Never printed.
    pub key_pem: String,
    /// When the CA certificate expires.
    pub not_after: Timestamp,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field(
                "cert_pem",
                &format_args!("<{} bytes of PEM>", self.cert_pem.len()),
            )
            .field("key_pem", &format_args!("<redacted>"))
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// The webhook's serving certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct Serving {
    /// PEM of the serving certificate.
    pub cert_pem: String,
    /// PEM (PKCS#8) of the serving private key. Never printed.
    pub key_pem: String,
    /// When the serving certificate expires.
    pub not_after: Timestamp,
    /// PEM of the CA that issued it.
    pub issuer_ca_pem: String,
}

impl fmt::Debug for Serving {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serving")
            .field(
                "cert_pem",
                &format_args!("<{} bytes of PEM>", self.cert_pem.len()),
            )
            .field("key_pem", &format_args!("<redacted>"))
            .field("not_after", &self.not_after)
            .field(
                "issuer_ca_pem",
                &format_args!("<{} bytes of PEM>", self.issuer_ca_pem.len()),
            )
            .finish()
    }
}

/// Issue a self-signed CA (ECDSA P-256) valid from `now - 5m` for `validity`.
pub fn issue_ca(common_name: &str, now: Timestamp, validity: Duration) -> Result<Ca, CertError> {
    let (not_before, not_after) = window(now, validity)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = to_offset(not_before)?;
    params.not_after = to_offset(not_after)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    Ok(Ca {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

/// Issue a serving certificate (ECDSA P-256, serverAuth) for `dns_names` (SANs; the first is the
/// common name), signed by `ca`, valid from `now - 5m` for `validity` (but never past the CA).
pub fn issue_serving(
    ca: &Ca,
    dns_names: &[String],
    now: Timestamp,
    validity: Duration,
) -> Result<Serving, CertError> {
    let first = dns_names.first().ok_or(CertError::NoDnsNames)?;
    let (not_before, mut not_after) = window(now, validity)?;
    if not_after > ca.not_after {
        not_after = ca.not_after;
    }
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    params.distinguished_name = distinguished_name(first);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = to_offset(not_before)?;
    params.not_after = to_offset(not_after)?;
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Serving {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
        issuer_ca_pem: ca.cert_pem.clone(),
    })
}

/// DNS names under which the API server reaches the webhook Service.
pub fn webhook_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// `notAfter` of the first certificate in `cert_pem`.
pub fn read_not_after(cert_pem: &str) -> Result<Timestamp, CertError> {
    with_cert(cert_pem, |cert| {
        Timestamp::from_second(cert.validity().not_after.timestamp())
            .map_err(|e| CertError::Time(e.to_string()))
    })?
}

/// What the two Secrets hold, as far as it is readable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PkiState {
    /// The current CA (certificate and matching key).
    pub ca: Option<Ca>,
    /// The CA before the last rotation, still trusted while its serving certificates live.
    pub previous_ca_pem: Option<String>,
    /// When the previous CA is dropped from the bundle.
    pub previous_ca_until: Option<Timestamp>,
    /// The serving certificate (certificate and matching key).
    pub serving: Option<Serving>,
}

impl PkiState {
    /// Read the CA Secret's and the serving Secret's data. Tolerant: anything unreadable (bad
    /// PEM, a key that does not match its certificate, missing keys) is treated as absent.
    pub fn from_secret_data(
        ca: Option<&BTreeMap<String, ByteString>>,
        tls: Option<&BTreeMap<String, ByteString>>,
    ) -> PkiState {
        let text = |data: Option<&BTreeMap<String, ByteString>>, key: &str| -> Option<String> {
            let bytes = &data?.get(key)?.0;
            String::from_utf8(bytes.clone())
                .ok()
                .filter(|s| !s.trim().is_empty())
        };
        let ca_state = (|| {
            let cert_pem = text(ca, CA_CRT)?;
            let key_pem = text(ca, CA_KEY)?;
            let not_after = key_matches(&cert_pem, &key_pem)?;
            Some(Ca {
                cert_pem,
                key_pem,
                not_after,
            })
        })();
        let previous_ca_pem = text(ca, CA_PREVIOUS_CRT).filter(|pem| read_not_after(pem).is_ok());
        let previous_ca_until = previous_ca_pem.as_ref().and_then(|pem| {
            text(ca, CA_PREVIOUS_UNTIL)
                .and_then(|s| s.trim().parse::<Timestamp>().ok())
                // Without a readable deadline, keep the previous CA until it expires itself.
                .or_else(|| read_not_after(pem).ok())
        });
        let serving = (|| {
            let cert_pem = text(tls, TLS_CRT)?;
            let key_pem = text(tls, TLS_KEY)?;
            let not_after = key_matches(&cert_pem, &key_pem)?;
            let issuer_ca_pem = text(tls, CA_CRT).unwrap_or_default();
            Some(Serving {
                cert_pem,
                key_pem,
                not_after,
                issuer_ca_pem,
            })
        })();
        PkiState {
            ca: ca_state,
            previous_ca_until: previous_ca_pem.as_ref().and(previous_ca_until),
            previous_ca_pem,
            serving,
        }
    }

    /// Data of the CA Secret `<stack>-webhook-ca`.
    pub fn ca_secret_data(&self) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::new();
        if let Some(ca) = &self.ca {
            data.insert(CA_CRT.to_string(), bytes(&ca.cert_pem));
            data.insert(CA_KEY.to_string(), bytes(&ca.key_pem));
        }
        if let Some(prev) = &self.previous_ca_pem {
            data.insert(CA_PREVIOUS_CRT.to_string(), bytes(prev));
            if let Some(until) = self.previous_ca_until {
                data.insert(CA_PREVIOUS_UNTIL.to_string(), bytes(&until.to_string()));
            }
        }
        data
    }

    /// Data of the serving Secret `<stack>-webhook-tls` (type `kubernetes.io/tls`).
    pub fn tls_secret_data(&self) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::new();
        if let Some(s) = &self.serving {
            data.insert(TLS_CRT.to_string(), bytes(&s.cert_pem));
            data.insert(TLS_KEY.to_string(), bytes(&s.key_pem));
            data.insert(CA_CRT.to_string(), bytes(&s.issuer_ca_pem));
        }
        data
    }
}

/// Certificate lifetimes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CertPolicy {
    /// Validity of a serving certificate.
    pub validity: Duration,
    /// Renew the serving certificate this long before it expires.
    pub renew_before: Duration,
}

impl CertPolicy {
    /// The policy of a stack's `webhook.certificate`, checked: validity between 2m and 87600h,
    /// renewBefore shorter than validity.
    pub fn from_spec(spec: &CertificateSpec) -> Result<CertPolicy, CertError> {
        let policy = CertPolicy {
            validity: parse_duration(&spec.validity)?,
            renew_before: parse_duration(&spec.renew_before)?,
        };
        policy.check()?;
        Ok(policy)
    }

    /// Check the policy is usable.
    pub fn check(&self) -> Result<(), CertError> {
        if self.validity < MIN_VALIDITY {
            return Err(CertError::Policy(format!(
                "validity {:?} is shorter than the minimum of 2m",
                self.validity
            )));
        }
        if self.validity > MAX_VALIDITY {
            return Err(CertError::Policy(format!(
                "validity {:?} is longer than the maximum of 87600h (10 years)",
                self.validity
            )));
        }
        if self.renew_before >= self.validity {
            return Err(CertError::Policy(
                "renewBefore must be shorter than validity".into(),
            ));
        }
        Ok(())
    }

    /// Validity of the CA: 10 × the serving validity.
    pub fn ca_validity(&self) -> Duration {
        self.validity.saturating_mul(CA_VALIDITY_FACTOR)
    }

    /// The CA is rotated when less than this is left: 3 × the serving validity.
    pub fn ca_renew_before(&self) -> Duration {
        self.validity.saturating_mul(CA_RENEW_FACTOR)
    }

    /// `renew_before`; half the validity when the policy is unusable (`renew_before >=
    /// validity`), so that a bad policy cannot make every reconcile renew.
    fn effective_renew_before(&self) -> Duration {
        if self.renew_before < self.validity {
            self.renew_before
        } else {
            self.validity / 2
        }
    }
}

impl Default for CertPolicy {
    /// 2160h validity (90 days), renewed 720h (30 days) before expiry.
    fn default() -> Self {
        CertPolicy {
            validity: Duration::from_secs(2160 * 3600),
            renew_before: Duration::from_secs(720 * 3600),
        }
    }
}

/// What to do with the PKI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Everything is valid; no write.
    Keep,
    /// No usable CA: issue a new CA and a serving certificate.
    IssueAll,
    /// Issue a new serving certificate from the current CA (missing, near expiry, wrong names or
    /// not issued by the current CA).
    RenewServing,
    /// The CA is near expiry: a new CA becomes current, the old one stays trusted (in the bundle)
    /// until its serving certificates have expired, and the serving certificate is re-issued.
    RotateCa,
    /// The previous CA's overlap is over: drop it from the CA Secret and the bundle.
    DropPreviousCa,
}

/// Decide what to do. Pure.
pub fn plan(now: Timestamp, state: &PkiState, policy: &CertPolicy, dns_names: &[String]) -> Action {
    let Some(ca) = &state.ca else {
        return Action::IssueAll;
    };
    let Ok(ca_not_after) = read_not_after(&ca.cert_pem) else {
        return Action::IssueAll;
    };
    if now >= ca_not_after {
        return Action::IssueAll;
    }
    if now >= sub(ca_not_after, policy.ca_renew_before()) {
        return Action::RotateCa;
    }
    let Some(serving) = &state.serving else {
        return Action::RenewServing;
    };
    if !serving_ok(serving, ca, dns_names) || now >= renew_at(serving, policy) {
        return Action::RenewServing;
    }
    if state.previous_ca_pem.is_some() && state.previous_ca_until.is_none_or(|until| now >= until) {
        return Action::DropPreviousCa;
    }
    Action::Keep
}

/// Carry out `action`. Only key generation is impure; `now` is the clock.
pub fn execute(
    now: Timestamp,
    state: &PkiState,
    policy: &CertPolicy,
    dns_names: &[String],
    action: Action,
) -> Result<PkiState, CertError> {
    policy.check()?;
    let common_name = dns_names.first().ok_or(CertError::NoDnsNames)?;
    let ca_name = format!("{common_name} CA");
    let mut next = state.clone();
    match (action, &state.ca) {
        (Action::Keep, _) => {}
        (Action::DropPreviousCa, _) => {
            next.previous_ca_pem = None;
            next.previous_ca_until = None;
        }
        (Action::IssueAll, _) | (Action::RenewServing | Action::RotateCa, None) => {
            let ca = issue_ca(&ca_name, now, policy.ca_validity())?;
            let serving = issue_serving(&ca, dns_names, now, policy.validity)?;
            // The CA was lost but a serving certificate it issued may still be served until the
            // webhook reloads: keep trusting its issuer while that certificate lives.
            let previous = state.serving.as_ref().filter(|s| {
                now < s.not_after
                    && read_not_after(&s.issuer_ca_pem).is_ok_and(|t| now < t)
                    && issued_by(&s.cert_pem, &s.issuer_ca_pem)
            });
            next = PkiState {
                ca: Some(ca),
                previous_ca_pem: previous.map(|s| s.issuer_ca_pem.clone()),
                previous_ca_until: previous.map(|s| s.not_after),
                serving: Some(serving),
            };
        }
        (Action::RenewServing, Some(ca)) => {
            next.serving = Some(issue_serving(ca, dns_names, now, policy.validity)?);
        }
        (Action::RotateCa, Some(old)) => {
            let ca = issue_ca(&ca_name, now, policy.ca_validity())?;
            let serving = issue_serving(&ca, dns_names, now, policy.validity)?;
            // Serving certificates of the old CA live at most one validity from now (the current
            // one may have been issued under a longer policy: wait for it too).
            let mut until = add(now, policy.validity)?;
            if let Some(s) = &state.serving {
                until = until.max(s.not_after.min(old.not_after));
            }
            let old_valid = read_not_after(&old.cert_pem).is_ok_and(|t| t > now);
            next = PkiState {
                ca: Some(ca),
                previous_ca_pem: old_valid.then(|| old.cert_pem.clone()),
                previous_ca_until: old_valid.then_some(until),
                serving: Some(serving),
            };
        }
    }
    // Any write also drops a previous CA whose overlap is over.
    if next.previous_ca_until.is_some_and(|until| now >= until) {
        next.previous_ca_pem = None;
        next.previous_ca_until = None;
    }
    Ok(next)
}

/// The CA bundle for the webhook registration: the current CA, then the previous one (if any).
pub fn ca_bundle(state: &PkiState) -> String {
    let mut bundle = String::new();
    for pem in state
        .ca
        .as_ref()
        .map(|c| c.cert_pem.as_str())
        .into_iter()
        .chain(state.previous_ca_pem.as_deref())
    {
        bundle.push_str(pem.trim_end());
        bundle.push('\n');
    }
    bundle
}

/// When the serving certificate is renewed: `not_after - renew_before`.
pub fn renew_at(serving: &Serving, policy: &CertPolicy) -> Timestamp {
    sub(serving.not_after, policy.effective_renew_before())
}

/// When [`plan`] will next want to act on `state` (for the operator's requeue): the earliest of
/// the serving renewal, the CA rotation and the end of the previous CA's overlap. `None` when
/// something must be done now (nothing issued yet).
pub fn next_action_at(state: &PkiState, policy: &CertPolicy) -> Option<Timestamp> {
    let ca = state.ca.as_ref()?;
    let serving = state.serving.as_ref()?;
    let mut at = renew_at(serving, policy).min(sub(ca.not_after, policy.ca_renew_before()));
    if let Some(until) = state.previous_ca_until {
        at = at.min(until);
    }
    Some(at)
}

// ---------------------------------------------------------------------------------------------

fn bytes(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn add(t: Timestamp, d: Duration) -> Result<Timestamp, CertError> {
    t.checked_add(d).map_err(|e| CertError::Time(e.to_string()))
}

fn sub(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_sub(d).unwrap_or(Timestamp::MIN)
}

/// `[now - skew, now + validity]`, whole seconds (what a certificate can hold).
fn window(now: Timestamp, validity: Duration) -> Result<(Timestamp, Timestamp), CertError> {
    let now =
        Timestamp::from_second(now.as_second()).map_err(|e| CertError::Time(e.to_string()))?;
    let not_before = now
        .checked_sub(CLOCK_SKEW)
        .map_err(|e| CertError::Time(e.to_string()))?;
    let not_after = add(now, Duration::from_secs(validity.as_secs()))?;
    Ok((not_before, not_after))
}

fn to_offset(t: Timestamp) -> Result<time::OffsetDateTime, CertError> {
    time::OffsetDateTime::from_unix_timestamp(t.as_second())
        .map_err(|e| CertError::Time(e.to_string()))
}

/// Run `f` on the first certificate of `pem`.
fn with_cert<T>(pem: &str, f: impl FnOnce(&X509Certificate<'_>) -> T) -> Result<T, CertError> {
    let block = Pem::iter_from_buffer(pem.as_bytes())
        .next()
        .ok_or_else(|| CertError::Parse("no PEM block".into()))?
        .map_err(|e| CertError::Parse(e.to_string()))?;
    if block.label != "CERTIFICATE" {
        return Err(CertError::Parse(format!(
            "expected a CERTIFICATE PEM block, found {:?}",
            block.label
        )));
    }
    let cert = block
        .parse_x509()
        .map_err(|e| CertError::Parse(e.to_string()))?;
    Ok(f(&cert))
}

/// The certificate's `notAfter` when `key_pem` is the private key of `cert_pem`.
fn key_matches(cert_pem: &str, key_pem: &str) -> Option<Timestamp> {
    let key = KeyPair::from_pem(key_pem).ok()?;
    with_cert(cert_pem, |cert| {
        (cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
            .then(|| Timestamp::from_second(cert.validity().not_after.timestamp()).ok())
            .flatten()
    })
    .ok()
    .flatten()
}

/// DNS names (SANs) of a certificate.
fn san_dns_names(cert: &X509Certificate<'_>) -> Vec<String> {
    match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect(),
        _ => vec![],
    }
}

/// `cert_pem` names `ca_pem`'s subject as issuer and carries a valid signature by its key.
fn issued_by(cert_pem: &str, ca_pem: &str) -> bool {
    with_cert(ca_pem, |ca| {
        with_cert(cert_pem, |cert| {
            cert.issuer().as_raw() == ca.subject().as_raw()
                && cert.verify_signature(Some(ca.public_key())).is_ok()
        })
        .unwrap_or(false)
    })
    .unwrap_or(false)
}

/// The serving certificate is readable, names exactly `dns_names`, and was signed by `ca`.
fn serving_ok(serving: &Serving, ca: &Ca, dns_names: &[String]) -> bool {
    let mut want = dns_names.to_vec();
    want.sort();
    want.dedup();
    let have = with_cert(&serving.cert_pem, |cert| {
        let mut have = san_dns_names(cert);
        have.sort();
        have.dedup();
        have
    });
    have.is_ok_and(|have| have == want) && issued_by(&serving.cert_pem, &ca.cert_pem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::SignedDuration;

    fn t0() -> Timestamp {
        "2030-01-01T00:00:00Z".parse().unwrap()
    }
    fn hours(h: u64) -> Duration {
        Duration::from_secs(h * 3600)
    }
    fn at(base: Timestamp, d: Duration) -> Timestamp {
        base.checked_add(d).unwrap()
    }
    fn policy() -> CertPolicy {
        CertPolicy {
            validity: hours(100),
            renew_before: hours(30),
        }
    }
    fn names() -> Vec<String> {
        webhook_dns_names("todo-webhook", "shop")
    }
    fn fresh() -> PkiState {
        execute(
            t0(),
            &PkiState::default(),
            &policy(),
            &names(),
            Action::IssueAll,
        )
        .unwrap()
    }
    fn issuer_and_subject(pem: &str) -> (String, String) {
        with_cert(pem, |c| (c.issuer().to_string(), c.subject().to_string())).unwrap()
    }
    fn verifies(cert_pem: &str, ca_pem: &str) -> bool {
        with_cert(ca_pem, |ca| {
            with_cert(cert_pem, |c| {
                c.verify_signature(Some(ca.public_key())).is_ok()
            })
            .unwrap()
        })
        .unwrap()
    }

    #[test]
    fn parse_duration_table() {
        let ok: &[(&str, u64)] = &[
            ("2160h", 2160 * 3600),
            ("720h", 720 * 3600),
            ("90m", 90 * 60),
            ("1h30m", 5400),
            ("45s", 45),
            ("1h1m1s", 3661),
            ("0", 0),
            ("0s", 0),
            ("1.5h", 5400),
            ("+2m", 120),
            ("1000ms", 1),
        ];
        for (input, secs) in ok {
            assert_eq!(
                parse_duration(input).unwrap(),
                Duration::from_secs(*secs),
                "{input}"
            );
        }
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("3us").unwrap(), Duration::from_micros(3));
        for bad in [
            "",
            "h",
            "10",
            "1d",
            "-1h",
            "1h-2m",
            "abc",
            "1.h.",
            ".h",
            "1 h",
            "99999999999999999999h",
            "3000000h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        let msg = parse_duration("10").unwrap_err().to_string();
        assert!(
            msg.contains("missing unit") && msg.contains("2160h"),
            "{msg}"
        );
    }

    #[test]
    fn fresh_state_issues_everything() {
        assert_eq!(
            plan(t0(), &PkiState::default(), &policy(), &names()),
            Action::IssueAll
        );
        let state = fresh();
        let ca = state.ca.as_ref().unwrap();
        let serving = state.serving.as_ref().unwrap();
        assert_eq!(ca.not_after, at(t0(), hours(1000)));
        assert_eq!(serving.not_after, at(t0(), hours(100)));
        assert_eq!(read_not_after(&ca.cert_pem).unwrap(), ca.not_after);
        assert_eq!(
            read_not_after(&serving.cert_pem).unwrap(),
            serving.not_after
        );
        assert!(verifies(&serving.cert_pem, &ca.cert_pem));
        assert_eq!(serving.issuer_ca_pem, ca.cert_pem);
        // SANs, CN, EKU, not_before with skew.
        with_cert(&serving.cert_pem, |c| {
            assert_eq!(san_dns_names(c), names());
            assert!(c.subject().to_string().contains("CN=todo-webhook"));
            let eku = c.extended_key_usage().unwrap().unwrap();
            assert!(eku.value.server_auth);
            assert!(!c.is_ca());
            assert_eq!(c.validity().not_before.timestamp(), t0().as_second() - 300);
        })
        .unwrap();
        with_cert(&ca.cert_pem, |c| assert!(c.is_ca())).unwrap();
    }

    #[test]
    fn right_after_issue_keeps() {
        let state = fresh();
        assert_eq!(plan(t0(), &state, &policy(), &names()), Action::Keep);
        assert_eq!(
            plan(at(t0(), hours(69)), &state, &policy(), &names()),
            Action::Keep
        );
        let kept = execute(t0(), &state, &policy(), &names(), Action::Keep).unwrap();
        assert_eq!(kept, state);
    }

    #[test]
    fn renews_serving_at_renew_time() {
        let state = fresh();
        let serving = state.serving.as_ref().unwrap();
        let renew = renew_at(serving, &policy());
        assert_eq!(renew, at(t0(), hours(70)));
        assert_eq!(
            plan(
                renew.checked_sub(SignedDuration::from_secs(1)).unwrap(),
                &state,
                &policy(),
                &names()
            ),
            Action::Keep
        );
        assert_eq!(
            plan(renew, &state, &policy(), &names()),
            Action::RenewServing
        );
        let renewed = execute(renew, &state, &policy(), &names(), Action::RenewServing).unwrap();
        assert_eq!(renewed.ca, state.ca, "the CA is kept");
        assert_ne!(renewed.serving, state.serving);
        assert_eq!(
            renewed.serving.as_ref().unwrap().not_after,
            at(renew, hours(100))
        );
        assert_eq!(plan(renew, &renewed, &policy(), &names()), Action::Keep);
        assert_eq!(
            next_action_at(&renewed, &policy()),
            Some(at(renew, hours(70)))
        );
    }

    #[test]
    fn san_change_renews_serving() {
        let state = fresh();
        let other = webhook_dns_names("todo2-webhook", "shop");
        assert_eq!(plan(t0(), &state, &policy(), &other), Action::RenewServing);
        let mut reordered = names();
        reordered.reverse();
        assert_eq!(
            plan(t0(), &state, &policy(), &reordered),
            Action::Keep,
            "order does not matter"
        );
        let renewed = execute(t0(), &state, &policy(), &other, Action::RenewServing).unwrap();
        assert_eq!(plan(t0(), &renewed, &policy(), &other), Action::Keep);
    }

    #[test]
    fn serving_from_another_ca_is_renewed() {
        let state = fresh();
        let stranger = fresh();
        let mixed = PkiState {
            serving: stranger.serving.clone(),
            ..state.clone()
        };
        assert_eq!(
            plan(t0(), &mixed, &policy(), &names()),
            Action::RenewServing
        );
        // Missing serving certificate with a good CA: keep the CA.
        let no_serving = PkiState {
            serving: None,
            ..state
        };
        assert_eq!(
            plan(t0(), &no_serving, &policy(), &names()),
            Action::RenewServing
        );
    }

    #[test]
    fn near_ca_expiry_rotates_with_overlap() {
        let p = policy();
        let mut state = fresh();
        // Keep renewing the serving certificate until the CA needs rotating.
        let rotate_at = at(t0(), hours(700)); // CA: 1000h, rotated with < 300h left
        let mut now = t0();
        while now < rotate_at {
            now = renew_at(state.serving.as_ref().unwrap(), &p).min(rotate_at);
            let action = plan(now, &state, &p, &names());
            assert_ne!(action, Action::Keep, "at {now}");
            if now == rotate_at {
                assert_eq!(action, Action::RotateCa);
                break;
            }
            assert_eq!(action, Action::RenewServing);
            state = execute(now, &state, &p, &names(), action).unwrap();
        }
        let old_ca = state.ca.clone().unwrap();
        let old_serving = state.serving.clone().unwrap();
        let rotated = execute(now, &state, &p, &names(), Action::RotateCa).unwrap();
        let new_ca = rotated.ca.as_ref().unwrap();
        let serving = rotated.serving.as_ref().unwrap();
        assert_ne!(new_ca.cert_pem, old_ca.cert_pem);
        assert_eq!(
            rotated.previous_ca_pem.as_deref(),
            Some(old_ca.cert_pem.as_str())
        );
        assert_eq!(rotated.previous_ca_until, Some(at(now, hours(100))));
        // The bundle trusts both; the serving certificate is issued by (and verifies against) the
        // new CA only.
        let bundle = ca_bundle(&rotated);
        assert!(
            bundle.contains(new_ca.cert_pem.trim_end())
                && bundle.contains(old_ca.cert_pem.trim_end())
        );
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
        let (issuer, _) = issuer_and_subject(&serving.cert_pem);
        let (_, new_subject) = issuer_and_subject(&new_ca.cert_pem);
        assert_eq!(issuer, new_subject);
        assert!(verifies(&serving.cert_pem, &new_ca.cert_pem));
        assert!(!verifies(&serving.cert_pem, &old_ca.cert_pem));
        assert!(verifies(&old_serving.cert_pem, &old_ca.cert_pem));
        assert_eq!(serving.issuer_ca_pem, new_ca.cert_pem);
        // Right after: nothing to do. Once the old serving certificates are gone: drop the old CA.
        assert_eq!(plan(now, &rotated, &p, &names()), Action::Keep);
        let until = rotated.previous_ca_until.unwrap();
        assert_eq!(next_action_at(&rotated, &p), Some(renew_at(serving, &p)));
        let renewed = execute(
            renew_at(serving, &p),
            &rotated,
            &p,
            &names(),
            Action::RenewServing,
        )
        .unwrap();
        assert!(
            renewed.previous_ca_pem.is_some(),
            "still inside the overlap"
        );
        assert_eq!(plan(until, &renewed, &p, &names()), Action::DropPreviousCa);
        let dropped = execute(until, &renewed, &p, &names(), Action::DropPreviousCa).unwrap();
        assert_eq!(dropped.previous_ca_pem, None);
        assert_eq!(ca_bundle(&dropped).matches("BEGIN CERTIFICATE").count(), 1);
        assert_eq!(plan(until, &dropped, &p, &names()), Action::Keep);
    }

    #[test]
    fn lost_ca_is_reissued_and_the_old_one_trusted_while_its_serving_cert_lives() {
        let p = policy();
        let state = fresh();
        let old_ca = state.ca.clone().unwrap();
        let read = PkiState::from_secret_data(None, Some(&state.tls_secret_data()));
        assert!(read.ca.is_none() && read.serving.is_some());
        let now = at(t0(), hours(10));
        assert_eq!(plan(now, &read, &p, &names()), Action::IssueAll);
        let next = execute(now, &read, &p, &names(), Action::IssueAll).unwrap();
        assert_ne!(next.ca.as_ref().unwrap().cert_pem, old_ca.cert_pem);
        assert_eq!(
            next.previous_ca_pem.as_deref(),
            Some(old_ca.cert_pem.as_str())
        );
        assert_eq!(
            next.previous_ca_until,
            Some(state.serving.as_ref().unwrap().not_after)
        );
        assert_eq!(ca_bundle(&next).matches("BEGIN CERTIFICATE").count(), 2);
        // A serving certificate whose ca.crt is not its issuer earns no trust.
        let mut tls = state.tls_secret_data();
        tls.insert(CA_CRT.into(), fresh().ca_secret_data()[CA_CRT].clone());
        let read = PkiState::from_secret_data(None, Some(&tls));
        let next = execute(now, &read, &p, &names(), Action::IssueAll).unwrap();
        assert_eq!(next.previous_ca_pem, None);
    }

    #[test]
    fn expired_ca_reissues_everything() {
        let state = fresh();
        assert_eq!(
            plan(at(t0(), hours(1000)), &state, &policy(), &names()),
            Action::IssueAll
        );
    }

    #[test]
    fn secret_data_round_trips() {
        let p = policy();
        let state = fresh();
        let rotated =
            execute(at(t0(), hours(700)), &state, &p, &names(), Action::RotateCa).unwrap();
        let ca_data = rotated.ca_secret_data();
        let tls_data = rotated.tls_secret_data();
        assert_eq!(
            ca_data.keys().map(String::as_str).collect::<Vec<_>>(),
            [CA_PREVIOUS_UNTIL, CA_PREVIOUS_CRT, CA_CRT, CA_KEY]
        );
        assert_eq!(
            tls_data.keys().map(String::as_str).collect::<Vec<_>>(),
            [CA_CRT, TLS_CRT, TLS_KEY]
        );
        let read = PkiState::from_secret_data(Some(&ca_data), Some(&tls_data));
        assert_eq!(read, rotated);
        assert_eq!(PkiState::from_secret_data(None, None), PkiState::default());
    }

    #[test]
    fn garbage_secret_data_is_absent() {
        let garbage = |pairs: &[(&str, &[u8])]| -> BTreeMap<String, ByteString> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                .collect()
        };
        let cases = [
            garbage(&[(CA_CRT, b"not a pem"), (CA_KEY, b"\xff\xfe")]),
            garbage(&[
                (
                    CA_CRT,
                    b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                ),
                (CA_KEY, b""),
            ]),
            garbage(&[
                (TLS_CRT, b"x"),
                (TLS_KEY, b"y"),
                (CA_PREVIOUS_CRT, b"z"),
                (CA_PREVIOUS_UNTIL, b"yesterday"),
            ]),
            BTreeMap::new(),
        ];
        for data in &cases {
            let state = PkiState::from_secret_data(Some(data), Some(data));
            assert_eq!(state, PkiState::default());
            assert_eq!(plan(t0(), &state, &policy(), &names()), Action::IssueAll);
        }
        // A key that does not belong to its certificate is as good as none.
        let a = fresh();
        let b = fresh();
        let mut mixed = a.ca_secret_data();
        mixed.insert(CA_KEY.into(), b.ca_secret_data()[CA_KEY].clone());
        let state = PkiState::from_secret_data(Some(&mixed), Some(&a.tls_secret_data()));
        assert!(state.ca.is_none());
        assert_eq!(plan(t0(), &state, &policy(), &names()), Action::IssueAll);
        // Garbage placed directly in a state is handled too.
        let direct = PkiState {
            ca: Some(Ca {
                cert_pem: "junk".into(),
                key_pem: "junk".into(),
                not_after: t0(),
            }),
            ..Default::default()
        };
        assert_eq!(plan(t0(), &direct, &policy(), &names()), Action::IssueAll);
        let direct = PkiState {
            serving: Some(Serving {
                cert_pem: "junk".into(),
                key_pem: "junk".into(),
                not_after: t0(),
                issuer_ca_pem: String::new(),
            }),
            ..a
        };
        assert_eq!(
            plan(t0(), &direct, &policy(), &names()),
            Action::RenewServing
        );
    }

    #[test]
    fn debug_redacts_private_keys() {
        let state = fresh();
        let printed = format!("{state:?} {:#?}", state);
        assert!(printed.contains("<redacted>"));
        assert!(!printed.contains("PRIVATE KEY"), "{printed}");
        for key in [
            &state.ca.as_ref().unwrap().key_pem,
            &state.serving.as_ref().unwrap().key_pem,
        ] {
            let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
            assert!(!printed.contains(&body[..40]));
        }
    }

    #[test]
    fn policy_from_spec_checks_bounds() {
        let spec = |v: &str, r: &str| CertificateSpec {
            validity: v.into(),
            renew_before: r.into(),
        };
        assert_eq!(
            CertPolicy::from_spec(&CertificateSpec::default()).unwrap(),
            CertPolicy::default()
        );
        assert!(CertPolicy::from_spec(&spec("1m", "10s")).is_err());
        assert!(CertPolicy::from_spec(&spec("1h", "1h")).is_err());
        assert!(CertPolicy::from_spec(&spec("100000h", "1h")).is_err());
        assert!(CertPolicy::from_spec(&spec("1h", "x")).is_err());
        assert!(CertPolicy::from_spec(&spec("2m", "1m")).is_ok());
    }

    #[test]
    fn dns_names_of_the_webhook_service() {
        assert_eq!(
            webhook_dns_names("todo-webhook", "shop"),
            [
                "todo-webhook",
                "todo-webhook.shop",
                "todo-webhook.shop.svc",
                "todo-webhook.shop.svc.cluster.local"
            ]
        );
        assert!(matches!(
            issue_serving(&fresh().ca.unwrap(), &[], t0(), hours(1)),
            Err(CertError::NoDnsNames)
        ));
    }
}
