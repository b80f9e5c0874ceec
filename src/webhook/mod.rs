//! `kab webhook`: the admission webhook enforcing a stack's business rules.
//!
//! One process per replica serves AdmissionReview v1 over HTTPS (rustls, TLS 1.2 and 1.3, the
//! ring provider) on `POST /validate`, plus `/healthz`, `/readyz` (the entity cache has synced
//! and a certificate is loaded) and `/metrics`. It reads the stack's `stack.json` (see
//! [`crate::render::stack_config`]) and the serving certificate from the mounted
//! `<stack>-webhook-tls` Secret, which it re-reads every few seconds so that a rotated
//! certificate is served without a restart ([`tls`]).
//!
//! Layers, one direction: [`review`] (bytes ↔ AdmissionReview, every malformed input is a 4xx)
//! → [`server`] (routes) → [`engine`] (the rules, pure over three traits) ← [`cache`] (watch
//! cache of entities), [`claims`] (Leases), [`external`] (HTTP client).
//!
//! # Rules
//!
//! In the stack's order, first failure denies, naming the rule, the field and the conflicting
//! object (`rule unique-code: spec.code "A-1" is already used by todo shop/first`):
//! - `unique`: on CREATE, and on UPDATE when the values change. A missing or null field is not
//!   constrained. Scope: the stack's namespace.
//! - `immutable`: on UPDATE; a set field cannot change or be removed (setting it for the first
//!   time is allowed).
//! - `maxCount`: on CREATE, against the cache — it is eventually consistent: creates racing in
//!   the same instant can overshoot by the number of racers.
//! - `external`: on CREATE and on UPDATEs that change the spec of an entity not being deleted
//!   (metadata-only writes, such as the entity controller's finalizers, never wait on the
//!   business application; DELETE is never sent to it).
//!
//! # Unique values under concurrency: claims
//!
//! A check against the cache alone cannot hold: two creates of the same value, served by the
//! same or by two replicas, both see a cache without the other. So a unique value is *claimed*
//! through the API server, which serialises writes to one object name:
//!
//! 1. The cache is checked first: a stored entity with the values is a denial without any write.
//! 2. Once every rule passed, each unique value is claimed by creating the Lease
//!    `<stack>-u-<sha256(rule, values)[..32 hex]>` in the stack's namespace, labelled for the
//!    stack (component `webhook-claim`), `holderIdentity` = the entity's name, `acquireTime` =
//!    now. The POST is the atomic step: of 50 concurrent creates, exactly one POST succeeds.
//! 3. On 409 the Lease is read. Held by the same entity name → ours (refreshed). Otherwise the
//!    holder is read **directly from the API server** (the cache may lag behind a create stored
//!    a millisecond ago), and [`claims::judge`] decides: the holder is stored with the values →
//!    denied, "already used by"; the holder is not stored or has other values, and the claim is
//!    younger than the grace period (default 60 s, the API server's request timeout) → denied,
//!    "is being claimed … retry" (its create may still be on its way: admitted by us, not yet
//!    persisted); older than that → stale (the write that claimed it failed after our
//!    admission: another webhook denied it, or storing it failed) and taken over with an
//!    optimistic update (resourceVersion precondition; a lost race re-reads and re-judges).
//! 4. A request denied after some of its claims were made releases them before answering.
//! 5. Release: after an allowed UPDATE that moves a value, the old value's claim is deleted; an
//!    allowed DELETE deletes the entity's claims. Deletes are conditional (the Lease is read,
//!    must still name this entity, and is deleted with a resourceVersion precondition).
//!    An UPDATE or DELETE can still fail after our admission; the entity then keeps a value
//!    without a claim, and the cache check (step 1) is what protects it.
//!    A terminating entity is still stored: its values stay taken until it is gone.
//! 6. Garbage: every few minutes, claims older than the grace period whose holder (read from
//!    the API server) is gone or has other values are deleted, with preconditions. This is
//!    tidiness only: step 3 takes such claims over anyway.
//!
//! Dry-run requests never write: claims are only read (step 3 without the POST or the
//! takeover), nothing is released, hence `sideEffects: NoneOnDryRun`. A failure to reach the
//! API server while claiming denies the request (fail closed) with the reason.
//!
//! Clocks: `acquireTime` is written by one replica and judged by another; the grace period is
//! meant to dwarf the skew between them.

pub mod cache;
pub mod claims;
pub mod engine;
pub mod external;
pub mod metrics;
pub mod review;
pub mod server;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kube::api::Api;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde::Deserialize;

use crate::api::BusinessRule;
use crate::render::{CONFIG_PATH, WEBHOOK_PORT, WEBHOOK_TLS_DIR};
use crate::telemetry::{LogFormat, init_logs};

pub use engine::{Decision, RuleSet, evaluate};

/// `kab webhook` options.
#[derive(clap::Args, Clone, Debug)]
pub struct WebhookArgs {
    /// The stack configuration (`stack.json` of the `<stack>-config` ConfigMap).
    #[arg(long, default_value = CONFIG_PATH)]
    pub config: PathBuf,
    /// Directory with `tls.crt` and `tls.key` (default: `webhook.tlsDir` of the configuration).
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Address to serve HTTPS on (default: 0.0.0.0:<webhook.port of the configuration>).
    #[arg(long, env = "KAB_LISTEN_ADDR")]
    pub listen: Option<SocketAddr>,
    /// How long a unique-value claim whose holder is not stored counts as in flight.
    #[arg(long, default_value_t = claims::DEFAULT_GRACE.as_secs())]
    pub claim_grace_seconds: u64,
    /// How often claims that nobody holds are deleted (0: never).
    #[arg(long, default_value_t = 300)]
    pub claim_gc_seconds: u64,
    /// How often the certificate files are checked for a change.
    #[arg(long, default_value_t = 2)]
    pub cert_poll_seconds: u64,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// The parts of `stack.json` the webhook reads.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StackConfig {
    /// The stack.
    pub stack: StackRef,
    /// The entity.
    pub entity: EntityConfig,
    /// The business rules, in order.
    #[serde(default)]
    pub rules: Vec<BusinessRule>,
    /// Where to serve.
    #[serde(default)]
    pub webhook: WebhookConfig,
}

/// Name, namespace and uid of the stack.
#[derive(Clone, Debug, Deserialize)]
pub struct StackRef {
    /// Name.
    pub name: String,
    /// Namespace (where its entities, and the claims, live).
    pub namespace: String,
    /// The KabStack's uid: claims carry an owner reference to it, so that they go with the
    /// stack. Absent in configurations rendered without one (claims then outlive the stack).
    #[serde(default)]
    pub uid: Option<String>,
}

impl StackRef {
    /// An owner reference to the KabStack, when its uid is known.
    pub fn owner_reference(
        &self,
    ) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
        use kube::Resource as _;
        Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: crate::api::KabStack::api_version(&()).into_owned(),
                kind: crate::api::KabStack::kind(&()).into_owned(),
                name: self.name.clone(),
                uid: self.uid.clone().filter(|u| !u.is_empty())?,
                ..Default::default()
            },
        )
    }
}

/// The entity's API.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntityConfig {
    /// API group.
    pub group: String,
    /// Kind.
    pub kind: String,
    /// Plural (resource name).
    pub plural: String,
    /// Singular, used in messages.
    pub singular: String,
    /// Served versions.
    #[serde(default)]
    pub versions: Vec<String>,
    /// The storage version (watched).
    #[serde(default)]
    pub storage_version: Option<String>,
}

/// The `webhook` part of `stack.json`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookConfig {
    /// HTTPS port.
    pub port: u16,
    /// Directory of the mounted serving certificate.
    pub tls_dir: PathBuf,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            port: WEBHOOK_PORT,
            tls_dir: PathBuf::from(WEBHOOK_TLS_DIR),
        }
    }
}

impl StackConfig {
    /// Parses and checks `stack.json`.
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let config: StackConfig =
            serde_json::from_str(text).context("not a kab stack configuration")?;
        config.check()?;
        Ok(config)
    }

    /// Reads [`StackConfig::from_json`] from `path`.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the stack configuration {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("in {}", path.display()))
    }

    fn check(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        for (field, value) in [
            ("stack.name", &self.stack.name),
            ("stack.namespace", &self.stack.namespace),
            ("entity.group", &self.entity.group),
            ("entity.kind", &self.entity.kind),
            ("entity.plural", &self.entity.plural),
        ] {
            if value.is_empty() {
                problems.push(format!("{field} is empty"));
            }
        }
        if self.version().is_none() {
            problems.push("entity has neither storageVersion nor versions".to_owned());
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let kinds = [
                rule.unique.is_some(),
                rule.immutable.is_some(),
                rule.max_count.is_some(),
                rule.external.is_some(),
            ]
            .iter()
            .filter(|x| **x)
            .count();
            if kinds != 1 {
                problems.push(format!(
                    "rules[{i}] ({}) must set exactly one of unique, immutable, maxCount, external",
                    rule.name
                ));
            }
            for fields in [&rule.unique, &rule.immutable].into_iter().flatten() {
                if fields.fields.is_empty() || fields.fields.iter().any(|f| f.is_empty()) {
                    problems.push(format!(
                        "rules[{i}] ({}) has an empty field list or path",
                        rule.name
                    ));
                }
            }
        }
        anyhow::ensure!(problems.is_empty(), "{}", problems.join("; "));
        Ok(())
    }

    /// The version watched: the storage version, else the first served one.
    pub fn version(&self) -> Option<&str> {
        self.entity
            .storage_version
            .as_deref()
            .or(self.entity.versions.first().map(String::as_str))
    }

    /// The entity's API resource.
    pub fn api_resource(&self) -> ApiResource {
        let e = &self.entity;
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(&e.group, self.version().unwrap_or_default(), &e.kind),
            &e.plural,
        )
    }

    /// The rules, with the entity's names for messages.
    pub fn rule_set(&self) -> RuleSet {
        RuleSet {
            rules: self.rules.clone(),
            singular: if self.entity.singular.is_empty() {
                self.entity.kind.to_lowercase()
            } else {
                self.entity.singular.clone()
            },
            plural: self.entity.plural.clone(),
        }
    }
}

/// Runs the webhook until SIGTERM or SIGINT.
pub async fn run(args: WebhookArgs) -> anyhow::Result<()> {
    init_logs(args.log_format, "info,kube=warn");
    let config = StackConfig::read(&args.config)?;
    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], config.webhook.port)));
    let tls_dir = args
        .tls_dir
        .clone()
        .unwrap_or_else(|| config.webhook.tls_dir.clone());
    let namespace = config.stack.namespace.clone();
    let stack = config.stack.name.clone();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let metrics = Arc::new(metrics::Metrics::new());

    let certs = Arc::new(tls::CertReloader::new(&tls_dir, provider.clone()));
    let cert_task = tokio::spawn(certs.clone().watch(
        Duration::from_secs(args.cert_poll_seconds.max(1)),
        metrics.clone(),
    ));

    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster config or KUBECONFIG)")?;
    let resource = config.api_resource();
    let entities_api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &namespace, &resource);
    let (cache, cache_task) = cache::EntityCache::start(entities_api.clone(), resource, &namespace);
    let grace = Duration::from_secs(args.claim_grace_seconds);
    let claims = claims::LeaseClaims::new(
        client.clone(),
        entities_api,
        &stack,
        &namespace,
        grace,
        metrics.clone(),
    )
    .owned_by(config.stack.owner_reference());
    let external = external::HttpExternal::new(provider.clone())
        .context("setting up the HTTP client of external rules")?;

    let gc_task = (args.claim_gc_seconds > 0 && config.rules.iter().any(|r| r.unique.is_some()))
        .then(|| {
            let (claims, rules) = (claims.clone(), config.rules.clone());
            let every = Duration::from_secs(args.claim_gc_seconds);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match claims::collect_garbage(&claims, &rules).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(removed = n, "removed unique-value claims nobody holds")
                        }
                        Err(e) => tracing::warn!("collecting unique-value claims: {e}"),
                    }
                }
            })
        });

    let readiness: server::Readiness = {
        let (cache, certs) = (cache.clone(), certs.clone());
        Arc::new(move || {
            let mut missing = Vec::new();
            if !cache.is_synced() {
                missing.push("entity cache not synced");
            }
            if !certs.is_loaded() {
                missing.push("no serving certificate loaded");
            }
            missing
        })
    };
    let on_scrape = {
        let (cache, metrics) = (cache.clone(), metrics.clone());
        Arc::new(move || metrics.set_entities(cache.len()))
    };
    let app = Arc::new(server::App {
        scope: server::Scope {
            stack: format!("{namespace}/{stack}"),
            group: config.entity.group.clone(),
            kind: config.entity.kind.clone(),
            namespace: namespace.clone(),
        },
        rules: config.rule_set(),
        entities: cache,
        claims,
        external,
        metrics,
        readiness,
        on_scrape,
    });

    let tls_config =
        Arc::new(tls::server_config(provider, certs).context("building the TLS configuration")?);
    let listener = tls::TlsListener::bind(listen, tls_config)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    tracing::info!(
        %listen,
        stack = %format!("{namespace}/{stack}"),
        entity = %format!("{}.{}", config.entity.plural, config.entity.group),
        rules = config.rules.len(),
        tls_dir = %tls_dir.display(),
        "kab webhook serving"
    );
    let served = axum::serve(listener, server::router(app))
        .with_graceful_shutdown(crate::shutdown_signal())
        .await;
    cert_task.abort();
    cache_task.abort();
    if let Some(t) = gc_task {
        t.abort();
    }
    served.context("serving HTTPS")?;
    tracing::info!("kab webhook stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::KabStack;

    #[test]
    fn reads_the_rendered_stack_configuration() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/todo.yaml"))
                .unwrap();
        let stack: KabStack = serde_saphyr::from_str(&text).unwrap();
        let json = crate::render::stack_config(&stack).to_string();
        let config = StackConfig::from_json(&json).unwrap();
        assert_eq!(config.stack.name, "todo");
        assert_eq!(config.stack.namespace, "shop");
        assert_eq!(config.version(), Some("v1"));
        let ar = config.api_resource();
        assert_eq!(ar.api_version, "todo.example.com/v1");
        assert_eq!(ar.plural, "todos");
        assert_eq!(config.rules.len(), 4);
        assert_eq!(config.webhook.port, WEBHOOK_PORT);
        assert_eq!(config.webhook.tls_dir, PathBuf::from(WEBHOOK_TLS_DIR));
        let set = config.rule_set();
        assert_eq!(
            (set.singular.as_str(), set.plural.as_str()),
            ("todo", "todos")
        );
    }

    #[test]
    fn a_broken_configuration_is_refused_with_the_reason() {
        let err = StackConfig::from_json("{}").unwrap_err();
        assert!(format!("{err:#}").contains("missing field"), "{err:#}");
        let two_kinds = r#"{"stack": {"name": "s", "namespace": "n"},
            "entity": {"group": "g", "kind": "K", "plural": "ks", "singular": "k", "versions": ["v1"]},
            "rules": [{"name": "r", "maxCount": 1, "unique": {"fields": ["spec.a"]}}]}"#;
        let err = StackConfig::from_json(two_kinds).unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err:#}");
    }
}
