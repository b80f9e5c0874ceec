//! Issue 5: admission latency and throughput of the real `kab webhook` process with a unique rule
//! and 10,000 entities in its watch cache, against a fixed-allow HTTPS endpoint (same TLS and
//! HTTP stack, its own process) measured in the same run with the same client and concurrency.
//! AdmissionReviews are POSTed straight to each server over HTTPS (keep-alive, HTTP/1.1, as the
//! API server calls webhooks); every answer is checked.
//!
//! Knobs: `KAB_BENCH_ENTITIES` (cached entities, default 10000), `KAB_BENCH_WEBHOOK_CONCURRENCY`
//! (default 16), `KAB_BENCH_WEBHOOK_SECS` (seconds per measured round, default 8),
//! `KAB_BENCH_WEBHOOK_ROUNDS` (alternating rounds per target, default 2),
//! `KAB_BENCH_WEBHOOK_WRITE_SECS` (non-dry-run rounds, default 5).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::{BodyExt as _, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Timestamp;
use kab::api::KabStack;
use kab::certs::{Ca, Serving};
use kab::plane::Process;
use kab::render::{self, Facts, Settings, Step, Templates};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use serde_json::{Value, json};

use crate::common::{self, Report, Row, ms, percentile};

const STACK: &str = "shop";
const KIND: &str = "Todo";
const PLURAL: &str = "todos";
const NS: &str = "kb-webhook";
const GROUP: &str = "webhook.bench.example.com";

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

fn https_client(ca_pem: &str) -> anyhow::Result<HttpsClient> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

async fn request(
    client: &HttpsClient,
    url: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<(u16, Bytes)> {
    let builder = http::Request::builder().uri(url);
    let req = match body {
        Some(b) => builder
            .method(http::Method::POST)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(b)))?,
        None => builder
            .method(http::Method::GET)
            .body(Full::new(Bytes::new()))?,
    };
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .context("no answer within 30 s")??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Writes the serving certificate the way the kubelet mounts a Secret (`..data` symlink).
fn write_secret_volume(dir: &Path, serving: &Serving, ca: &Ca) -> anyhow::Result<()> {
    use std::os::unix::fs::symlink;
    std::fs::create_dir_all(dir.join("..gen1"))?;
    std::fs::write(dir.join("..gen1/tls.crt"), &serving.cert_pem)?;
    std::fs::write(dir.join("..gen1/tls.key"), &serving.key_pem)?;
    std::fs::write(dir.join("..gen1/ca.crt"), &ca.cert_pem)?;
    symlink("..gen1", dir.join("..data"))?;
    for k in ["tls.crt", "tls.key", "ca.crt"] {
        symlink(format!("..data/{k}"), dir.join(k))?;
    }
    Ok(())
}

/// What one request does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// A dry-run CREATE of a value nobody holds: allowed.
    DryFree,
    /// A CREATE (not dry-run) of a value nobody holds: allowed, the webhook claims it.
    WriteFree,
    /// A dry-run CREATE of a value a cached entity holds: denied.
    DryTaken,
}

fn review(n: u64, kind: Kind, entities: usize) -> Vec<u8> {
    let (code, dry) = match kind {
        Kind::DryFree => (format!("B-{n}"), true),
        Kind::WriteFree => (format!("W-{n}"), false),
        Kind::DryTaken => (format!("E-{}", n as usize % entities.max(1)), true),
    };
    let name = format!("bench-{n}");
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("bench-{n}"),
            "kind": {"group": GROUP, "version": "v1", "kind": KIND},
            "resource": {"group": GROUP, "version": "v1", "resource": PLURAL},
            "requestKind": {"group": GROUP, "version": "v1", "kind": KIND},
            "requestResource": {"group": GROUP, "version": "v1", "resource": PLURAL},
            "name": name,
            "namespace": NS,
            "operation": "CREATE",
            "userInfo": {"username": "bench", "groups": ["system:authenticated"]},
            "object": {
                "apiVersion": format!("{GROUP}/v1"),
                "kind": KIND,
                "metadata": {"name": name, "namespace": NS},
                "spec": {"code": code, "message": "benchmark"},
            },
            "oldObject": null,
            "dryRun": dry,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        }
    }))
    .unwrap_or_default()
}

#[derive(Default)]
struct Load {
    latencies: Vec<f64>,
    seconds: f64,
    allowed: u64,
    denied: u64,
    errors: Vec<String>,
    /// Every request answered, warm-up included (for CPU per request).
    answered: u64,
}

impl Load {
    fn rps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.latencies.len() as f64 / self.seconds
        } else {
            0.0
        }
    }

    fn merge(&mut self, other: Load) {
        self.latencies.extend(other.latencies);
        self.seconds += other.seconds;
        self.allowed += other.allowed;
        self.denied += other.denied;
        self.errors.extend(other.errors);
        self.answered += other.answered;
    }
}

/// `concurrency` closed-loop clients for `warmup + duration`; requests started in the warm-up are
/// not recorded.
#[allow(clippy::too_many_arguments)]
async fn load(
    client: &HttpsClient,
    url: &str,
    kind: Kind,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    counter: &Arc<AtomicU64>,
    entities: usize,
) -> Load {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, counter) = (client.clone(), url.to_string(), counter.clone());
            tokio::spawn(async move {
                let mut out = Load::default();
                loop {
                    let t = Instant::now();
                    if t >= end {
                        break;
                    }
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let body = review(n, kind, entities);
                    let result = request(&client, &url, Some(body)).await;
                    let took = t.elapsed();
                    let verdict = match result {
                        Ok((200, body)) => serde_json::from_slice::<Value>(&body)
                            .map_err(|e| e.to_string())
                            .and_then(|v| {
                                if v["response"]["uid"] != json!(format!("bench-{n}")) {
                                    return Err(format!("wrong uid in {v}"));
                                }
                                v["response"]["allowed"]
                                    .as_bool()
                                    .ok_or_else(|| format!("no verdict in {v}"))
                            }),
                        Ok((status, body)) => {
                            Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)))
                        }
                        Err(e) => Err(format!("{e:#}")),
                    };
                    out.answered += 1;
                    if t < measure_from {
                        continue;
                    }
                    match verdict {
                        Ok(allowed) => {
                            out.latencies.push(ms(took));
                            if allowed {
                                out.allowed += 1;
                            } else {
                                out.denied += 1;
                            }
                        }
                        Err(e) => {
                            if out.errors.len() < 5 {
                                out.errors.push(e);
                            }
                        }
                    }
                }
                out
            })
        })
        .collect();
    let mut total = Load::default();
    for w in workers {
        if let Ok(l) = w.await {
            total.merge(l);
        }
    }
    total.seconds = duration.as_secs_f64();
    total
}

struct Server {
    name: &'static str,
    url: String,
    process: Process,
}

impl Server {
    fn cpu(&self) -> f64 {
        common::cpu_seconds(self.process.pid()).unwrap_or(0.0)
    }
}

pub async fn run() -> anyhow::Result<Report> {
    let started = Instant::now();
    let entities = common::env_usize("KAB_BENCH_ENTITIES", 10_000);
    let concurrency = common::env_usize("KAB_BENCH_WEBHOOK_CONCURRENCY", 16);
    let secs = common::env_secs("KAB_BENCH_WEBHOOK_SECS", 8);
    let rounds = common::env_usize("KAB_BENCH_WEBHOOK_ROUNDS", 2).max(1);
    let write_secs = common::env_secs("KAB_BENCH_WEBHOOK_WRITE_SECS", 5);
    let warmup = Duration::from_secs(1);
    let mut report = Report::new(
        "webhook",
        "kab webhook (issue 5): admission latency and throughput",
        "fixed-allow",
    );

    let plane = common::start_plane("webhook", false, kab::plane::AUDIT_POLICY).await?;
    let client = common::bench_client(&plane).await?;
    common::create_namespaces(&client, &[NS.to_string()], &Default::default(), 1).await?;

    // The stack: one unique rule; its webhook RBAC, entity CRD and configuration as kab renders them.
    let stack: KabStack = serde_json::from_value(json!({
        "apiVersion": "kab.dev/v1alpha1",
        "kind": "KabStack",
        "metadata": {"name": STACK, "namespace": NS},
        "spec": {
            "entity": {
                "group": GROUP,
                "kind": KIND,
                "versions": [{"name": "v1", "schema": {
                    "type": "object", "required": ["code"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                }}],
            },
            "rules": [{"name": "unique-code", "unique": {"fields": ["spec.code"]}}],
            "broker": {"mode": "None"},
        },
    }))?;
    kab::validate::validate(&stack).map_err(|e| anyhow!("invalid bench stack: {e}"))?;
    let rendered = render::render(
        &Templates::embedded(),
        &stack,
        &Settings::default(),
        &Facts::default(),
    )?;
    let params = PatchParams::apply("kab-bench").force();
    for child in rendered
        .children
        .iter()
        .filter(|c| matches!(c.step, Step::Rbac | Step::EntityApi | Step::Config))
    {
        let api: Api<DynamicObject> = if child.namespaced {
            Api::namespaced_with(client.clone(), NS, &child.resource)
        } else {
            Api::all_with(client.clone(), &child.resource)
        };
        api.patch(child.name(), &params, &Patch::Apply(&child.object))
            .await
            .with_context(|| format!("applying {} {}", child.kind(), child.name()))?;
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    tokio::time::timeout(
        Duration::from_secs(60),
        kube::runtime::wait::await_condition(
            crds,
            &format!("{PLURAL}.{GROUP}"),
            kube::runtime::wait::conditions::is_crd_established(),
        ),
    )
    .await
    .context("entity CRD not Established")??;

    // 10,000 entities, created before the webhook starts (it is never registered: requests go
    // straight to it), so that its cache lists them all.
    let ar = ApiResource {
        group: GROUP.into(),
        version: "v1".into(),
        api_version: format!("{GROUP}/v1"),
        kind: KIND.into(),
        plural: PLURAL.into(),
    };
    let todos: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &ar);
    let t = Instant::now();
    let created: Vec<anyhow::Result<()>> = futures::stream::iter(0..entities)
        .map(|i| {
            let todos = todos.clone();
            let ar = ar.clone();
            async move {
                let mut o = DynamicObject::new(&format!("e-{i}"), &ar).within(NS);
                o.data = json!({"spec": {"code": format!("E-{i}"), "message": "cached"}});
                match todos.create(&PostParams::default(), &o).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                    Err(e) => Err(e).context(format!("creating entity e-{i}")),
                }
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    created.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    eprintln!(
        "bench webhook: {entities} entities created in {:?}",
        t.elapsed()
    );

    // Certificates and configuration, laid out as the pod would see them.
    let dir = plane.dir().join("bench-webhook");
    let tls_dir = dir.join("tls");
    std::fs::create_dir_all(&tls_dir)?;
    std::fs::write(
        dir.join("stack.json"),
        serde_json::to_vec_pretty(&render::stack_config(&stack))?,
    )?;
    let ca = kab::certs::issue_ca(
        "kab bench webhook CA",
        Timestamp::now(),
        Duration::from_secs(3600),
    )?;
    let serving = kab::certs::issue_serving(
        &ca,
        &["127.0.0.1".into(), "localhost".into()],
        Timestamp::now(),
        Duration::from_secs(3600),
    )?;
    write_secret_volume(&tls_dir, &serving, &ca)?;
    let http = https_client(&ca.cert_pem)?;

    // The real webhook, as the stack's webhook ServiceAccount.
    let port = kab::plane::free_port()?;
    let kubeconfig = plane.write_kubeconfig(
        &format!("system:serviceaccount:{NS}:{STACK}-webhook"),
        &["system:serviceaccounts", "system:authenticated"],
    )?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kab"));
    cmd.arg("webhook")
        .arg("--config")
        .arg(dir.join("stack.json"))
        .arg("--tls-dir")
        .arg(&tls_dir)
        .env("KUBECONFIG", &kubeconfig)
        .env("KAB_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info");
    let webhook = Server {
        name: "kab webhook",
        url: format!("https://127.0.0.1:{port}/validate"),
        process: plane.spawn("bench-webhook", cmd)?,
    };
    wait_ok(
        &http,
        &format!("https://127.0.0.1:{port}/readyz"),
        &webhook.process,
    )
    .await?;
    // Its cache holds every entity.
    let metrics_url = format!("https://127.0.0.1:{port}/metrics");
    let deadline = Instant::now() + Duration::from_secs(60);
    let cached = loop {
        let (_, body) = request(&http, &metrics_url, None).await?;
        let n = common::metric_sum(
            &String::from_utf8_lossy(&body),
            "kab_webhook_cached_entities",
        );
        if n as usize >= entities || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ensure!(
        cached as usize >= entities,
        "the webhook caches {cached} entities, expected {entities}"
    );

    // The baseline, its own process, same certificate.
    let fport = kab::plane::free_port()?;
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args([crate::fixed_allow::SUBCOMMAND, &fport.to_string()])
        .arg(&tls_dir);
    let fixed = Server {
        name: "fixed-allow",
        url: format!("https://127.0.0.1:{fport}/validate"),
        process: plane.spawn("bench-fixed-allow", cmd)?,
    };
    wait_ok(
        &http,
        &format!("https://127.0.0.1:{fport}/healthz"),
        &fixed.process,
    )
    .await?;

    // Sanity: both allow a free value; the webhook denies a taken one.
    for (s, kind, allowed) in [
        (&fixed, Kind::DryFree, true),
        (&webhook, Kind::DryFree, true),
        (&webhook, Kind::DryTaken, false),
    ] {
        let (status, body) =
            request(&http, &s.url, Some(review(u64::MAX - 1, kind, entities))).await?;
        let v: Value =
            serde_json::from_slice(&body).with_context(|| format!("{}: HTTP {status}", s.name))?;
        ensure!(
            v["response"]["allowed"] == json!(allowed),
            "{}: {kind:?} answered {v}",
            s.name
        );
    }

    let counter = Arc::new(AtomicU64::new(0));
    let mut fixed_dry = Load::default();
    let mut kab_dry = Load::default();
    let (mut cpu_fixed, mut cpu_kab) = (0.0, 0.0);
    for r in 0..rounds {
        for (s, out, cpu) in [
            (&fixed, &mut fixed_dry, &mut cpu_fixed),
            (&webhook, &mut kab_dry, &mut cpu_kab),
        ] {
            let c0 = s.cpu();
            let l = load(
                &http,
                &s.url,
                Kind::DryFree,
                concurrency,
                warmup,
                secs,
                &counter,
                entities,
            )
            .await;
            *cpu += s.cpu() - c0;
            eprintln!(
                "bench webhook: round {} {}: dry-run {:.0}/s p50 {:.2} ms p99 {:.2} ms",
                r + 1,
                s.name,
                l.rps(),
                percentile(&l.latencies, 50.0),
                percentile(&l.latencies, 99.0)
            );
            out.merge(l);
        }
    }
    // Not dry-run: the webhook claims each value with a Lease POST.
    let mut fixed_write = Load::default();
    let mut kab_write = Load::default();
    for (s, out) in [(&fixed, &mut fixed_write), (&webhook, &mut kab_write)] {
        let l = load(
            &http,
            &s.url,
            Kind::WriteFree,
            concurrency,
            warmup,
            write_secs,
            &counter,
            entities,
        )
        .await;
        eprintln!(
            "bench webhook: {}: CREATE {:.0}/s p50 {:.2} ms p99 {:.2} ms",
            s.name,
            l.rps(),
            percentile(&l.latencies, 50.0),
            percentile(&l.latencies, 99.0)
        );
        out.merge(l);
    }
    // A taken value: denied from the cache (no API call).
    let taken = load(
        &http,
        &webhook.url,
        Kind::DryTaken,
        concurrency,
        warmup,
        write_secs,
        &counter,
        entities,
    )
    .await;

    // What one API server read costs the same way (the dry-run check reads the claim Lease).
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    let lease_get = api_get_load(&leases, concurrency, Duration::from_secs(3)).await;

    // ------------------------------------------------------------------ table
    let errors: Vec<String> = [&fixed_dry, &kab_dry, &fixed_write, &kab_write, &taken]
        .iter()
        .flat_map(|l| l.errors.clone())
        .collect();
    let wrong =
        kab_dry.denied + fixed_dry.denied + kab_write.denied + fixed_write.denied + taken.allowed;
    let p = |l: &Load, q: f64| Some(percentile(&l.latencies, q));
    report.rows.push(
        Row::new(
            "dry-run CREATE p50 (free value)",
            "ms",
            p(&kab_dry, 50.0),
            p(&fixed_dry, 50.0),
        )
        .info("ratio reported"),
    );
    report.rows.push(
        Row::new(
            "dry-run CREATE p99",
            "ms",
            p(&kab_dry, 99.0),
            p(&fixed_dry, 99.0),
        )
        .info("ratio reported"),
    );
    report.rows.push(
        Row::new(
            "dry-run CREATE requests/s",
            "/s",
            Some(kab_dry.rps()),
            Some(fixed_dry.rps()),
        )
        .info("ratio reported"),
    );
    let per_req = |cpu: f64, l: &Load| {
        let n = l.answered as f64;
        (n > 0.0).then(|| cpu * 1e6 / n)
    };
    report.rows.push(
        Row::new(
            "server CPU per dry-run request",
            "µs",
            per_req(cpu_kab, &kab_dry),
            per_req(cpu_fixed, &fixed_dry),
        )
        .info("utime+stime / requests answered"),
    );
    report.rows.push(
        Row::new(
            "CREATE p50 (not dry-run: claims a Lease)",
            "ms",
            p(&kab_write, 50.0),
            p(&fixed_write, 50.0),
        )
        .info("ratio reported"),
    );
    report.rows.push(
        Row::new(
            "CREATE p99 (not dry-run)",
            "ms",
            p(&kab_write, 99.0),
            p(&fixed_write, 99.0),
        )
        .info("ratio reported"),
    );
    report.rows.push(
        Row::new(
            "CREATE requests/s (not dry-run)",
            "/s",
            Some(kab_write.rps()),
            Some(fixed_write.rps()),
        )
        .info("ratio reported"),
    );
    report.rows.push(
        Row::new(
            "dry-run CREATE of a taken value p50 (denied)",
            "ms",
            p(&taken, 50.0),
            p(&fixed_dry, 50.0),
        )
        .info("denied from the cache"),
    );
    report.rows.push(
        Row::new(
            "dry-run CREATE of a taken value requests/s",
            "/s",
            Some(taken.rps()),
            Some(fixed_dry.rps()),
        )
        .info("denied from the cache"),
    );
    report.rows.push(
        Row::new(
            "reference: API server GET of a missing Lease p50",
            "ms",
            Some(percentile(&lease_get.latencies, 50.0)),
            None,
        )
        .info(&format!(
            "{:.0}/s; what a dry-run check waits on",
            lease_get.rps()
        )),
    );
    report.note(format!(
        "real `kab webhook` (release build) with rule unique-code (spec.code), {cached:.0} entities in its watch \
         cache; baseline: fixed-allow HTTPS server, own process, same rustls/axum stack and certificate"
    ));
    report.note(format!(
        "client: hyper + rustls, HTTP/1.1 keep-alive, {concurrency} concurrent closed-loop requests, \
         {rounds} alternating rounds of {}s per target (+1 s warm-up each), not-dry-run {}s; every answer \
         parsed and checked (uid, verdict)",
        secs.as_secs(),
        write_secs.as_secs()
    ));
    report.note(format!(
        "unexpected verdicts: {wrong}; errors: {}{}",
        errors.len(),
        if errors.is_empty() {
            String::new()
        } else {
            format!(" (first: {})", errors[0])
        }
    ));
    report.note(format!(
        "server CPU during dry-run rounds: kab {cpu_kab:.2} s, fixed-allow {cpu_fixed:.2} s; 2 shared cores, \
         the client runs on them too"
    ));
    report.detail(
        "samples",
        json!({
            "entities": entities, "cached": cached, "concurrency": concurrency,
            "kab_dry_ms": common::summary(&kab_dry.latencies), "fixed_dry_ms": common::summary(&fixed_dry.latencies),
            "kab_dry_rps": kab_dry.rps(), "fixed_dry_rps": fixed_dry.rps(),
            "kab_write_ms": common::summary(&kab_write.latencies), "fixed_write_ms": common::summary(&fixed_write.latencies),
            "kab_write_rps": kab_write.rps(), "fixed_write_rps": fixed_write.rps(),
            "kab_taken_ms": common::summary(&taken.latencies), "kab_taken_rps": taken.rps(),
            "lease_get_ms": common::summary(&lease_get.latencies), "lease_get_rps": lease_get.rps(),
            "cpu_kab_dry_s": cpu_kab, "cpu_fixed_dry_s": cpu_fixed,
            "errors": errors,
        }),
    );
    if wrong > 0 || !errors.is_empty() {
        report.note("SOME ANSWERS WERE WRONG OR FAILED: see details.errors".to_string());
    }
    drop(fixed);
    drop(webhook);
    report.finish(started)?;
    drop(plane);
    Ok(report)
}

async fn wait_ok(http: &HttpsClient, url: &str, p: &Process) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = request(http, url, None).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} not OK in 60 s:\n{}", p.log_tail(30));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `concurrency` closed-loop GETs of a Lease that does not exist, for `duration`.
async fn api_get_load(leases: &Api<Lease>, concurrency: usize, duration: Duration) -> Load {
    let end = Instant::now() + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|i| {
            let leases = leases.clone();
            tokio::spawn(async move {
                let mut out = Load::default();
                let mut n = 0u64;
                while Instant::now() < end {
                    let t = Instant::now();
                    n += 1;
                    match leases.get_opt(&format!("bench-missing-{i}-{n}")).await {
                        Ok(_) => out.latencies.push(ms(t.elapsed())),
                        Err(e) => out.errors.push(e.to_string()),
                    }
                }
                out
            })
        })
        .collect();
    let mut total = Load::default();
    for w in workers {
        if let Ok(l) = w.await {
            total.merge(l);
        }
    }
    total.seconds = duration.as_secs_f64();
    total
}
