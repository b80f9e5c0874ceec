//! Issue 10: the operator's latency for one stack (P1) and its behaviour with 500 stacks at once
//! (P2), each against the floor — the same children created by a plain kube-rs client with the
//! same parallelism, no operator — measured in the same run on the same plane.
//!
//! Knobs: `KAB_BENCH_P1` (stacks in P1, default 30), `KAB_BENCH_P2` (stacks in P2, default 500),
//! `KAB_BENCH_IDLE_SECS` (idle window after P2, default 60), `KAB_BENCH_P2_ORDER`
//! (`floor-first` default, or `kab-first`), `KAB_BENCH_FLOOR_SSA=1` (also a floor that applies
//! instead of POSTing, in P1 and P2: a diagnostic), `KAB_BENCH_OPERATOR_CONCURRENCY` (passed as
//! `--concurrency` and used as the floor's stack parallelism; default: the operator's default,
//! 16), `KAB_BENCH_P2_TIMEOUT` (seconds, default 900).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::jiff::Timestamp;
use kab::api::KabStack;
use kab::certs::{self, CertPolicy, PkiState};
use kab::render::{self, Facts, Settings, Step, Templates};
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::{Value, json};

use crate::common::{self, AuditTail, OPERATOR_USER, Report, Row, ms, percentile};
use crate::observer::{Key, Observer, key};

const STACK: &str = "todo";
/// The entity group of the operator's stacks (one CRD shared by all of them).
const KAB_GROUP: &str = "kab.bench.example.com";
/// The floor's own entity group (its own shared CRD).
const FLOOR_GROUP: &str = "floor.bench.example.com";
/// The operator applies a stack's children this many at a time (`buffer_unordered(8)` in
/// `src/operator.rs`): the floor does the same.
const CHILD_PARALLELISM: usize = 8;
/// Key of the CPU the rest of the machine used meanwhile (other people's work: noise).
const OTHERS: &str = "other processes on the machine";

/// CPU seconds per process over one phase (the plane's components and `extra`), plus what the
/// rest of the machine used meanwhile ([`OTHERS`]), to spot a disturbed run.
struct PhaseCpu {
    extra: Vec<(&'static str, u32)>,
    procs0: BTreeMap<String, f64>,
    busy0: f64,
}

impl PhaseCpu {
    fn start(plane: &kab::plane::Plane, extra: Vec<(&'static str, u32)>) -> Self {
        PhaseCpu {
            procs0: common::cpu_by_process(plane, &extra),
            busy0: common::machine_busy_seconds(),
            extra,
        }
    }

    fn stop(self, plane: &kab::plane::Plane) -> BTreeMap<String, f64> {
        let mut procs =
            common::cpu_delta(&self.procs0, &common::cpu_by_process(plane, &self.extra));
        let ours: f64 = procs.values().sum();
        procs.insert(
            OTHERS.into(),
            common::machine_busy_seconds() - self.busy0 - ours,
        );
        procs
    }
}

/// CPU seconds of ours (plane, operator, bench) in a phase.
fn ours(procs: &BTreeMap<String, f64>) -> f64 {
    procs
        .iter()
        .filter(|(k, _)| k.as_str() != OTHERS)
        .map(|(_, v)| v)
        .sum()
}

/// The operator's default `--concurrency`.
const DEFAULT_CONCURRENCY: usize = 16;

/// What the operator renders with: its defaults, and `--admission-probe=false`, which renders no
/// probe Role (the operator's ServiceAccount is not given one).
fn settings() -> Settings {
    Settings {
        operator_service_account: None,
        ..Settings::default()
    }
}

/// `examples/todo.yaml` in `ns` with entity group `group`.
fn stack_value(ns: &str, group: &str) -> anyhow::Result<Value> {
    let mut v: Value = serde_saphyr::from_str(include_str!("../../examples/todo.yaml"))?;
    v["metadata"] = json!({"name": STACK, "namespace": ns});
    v["spec"]["entity"]["group"] = json!(group);
    Ok(v)
}

fn stack(ns: &str, group: &str) -> anyhow::Result<KabStack> {
    Ok(serde_json::from_value(stack_value(ns, group)?)?)
}

/// What a stack in `ns` consists of once applied: `(key, is the webhook registration)`.
/// The two certificate Secrets the operator keeps are children too.
fn expected(ns: &str, group: &str) -> anyhow::Result<Vec<(Key, bool)>> {
    let s = stack(ns, group)?;
    let rendered = render::render(&Templates::embedded(), &s, &settings(), &Facts::default())?;
    let names = render::names(&s);
    let mut out: Vec<(Key, bool)> = rendered
        .children
        .iter()
        .map(|c| {
            let kns = if c.namespaced { ns } else { "" };
            (key(c.kind(), kns, c.name()), c.step == Step::Registration)
        })
        .collect();
    out.push((key("Secret", ns, &names.webhook_ca_secret), false));
    out.push((key("Secret", ns, &names.webhook_tls_secret), false));
    Ok(out)
}

/// The resources the observer watches for existence (everything but the kinds it watches in
/// full), from a rendered stack.
fn plain_resources() -> anyhow::Result<Vec<ApiResource>> {
    let s = stack("kb-x", KAB_GROUP)?;
    let rendered = render::render(&Templates::embedded(), &s, &settings(), &Facts::default())?;
    let mut out: BTreeMap<String, ApiResource> = BTreeMap::new();
    for c in &rendered.children {
        if matches!(
            c.kind(),
            "Deployment" | "StatefulSet" | "CustomResourceDefinition"
        ) {
            continue;
        }
        out.insert(c.kind().to_string(), c.resource.clone());
    }
    out.insert(
        "Secret".into(),
        ApiResource::erase::<k8s_openapi::api::core::v1::Secret>(&()),
    );
    Ok(out.into_values().collect())
}

// ---------------------------------------------------------------------------------------------
// The floor: the same children, created by a plain client
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Obj {
    /// Server-side apply (forced, manager `kab-bench-floor`) instead of a POST.
    ssa: bool,
    ar: ApiResource,
    namespaced: bool,
    ns: String,
    body: DynamicObject,
}

struct FloorStack {
    ns: String,
    objects: Vec<Obj>,
    registration: Obj,
}

/// Renames kab's ownership labels, so that the operator's label-selected watches never see the
/// floor's objects (it would cache them and map them to stacks): same objects, same sizes.
fn relabel(v: &Value) -> anyhow::Result<Value> {
    let text = serde_json::to_string(v)?
        .replace("\"kab.dev/stack\"", "\"floor.kab.dev/stack\"")
        .replace(
            "\"kab.dev/stack-namespace\"",
            "\"floor.kab.dev/stack-namespace\"",
        )
        .replace(
            "\"app.kubernetes.io/managed-by\":\"kab\"",
            "\"app.kubernetes.io/managed-by\":\"kab-bench-floor\"",
        );
    Ok(serde_json::from_str(&text)?)
}

/// Everything the floor creates for a stack in `ns`: the rendered children (the registration
/// apart) and the two certificate Secrets, with a PKI issued beforehand (not timed).
fn floor_stack(ns: &str, ssa: bool) -> anyhow::Result<FloorStack> {
    let s = stack(ns, FLOOR_GROUP)?;
    let names = render::names(&s);
    let policy = CertPolicy::from_spec(&s.spec.webhook.certificate)?;
    let dns = certs::webhook_dns_names(&names.webhook, ns);
    let pki = certs::execute(
        Timestamp::now(),
        &PkiState::default(),
        &policy,
        &dns,
        certs::Action::IssueAll,
    )?;
    let facts = Facts {
        ca_bundle_pem: Some(certs::ca_bundle(&pki)),
    };
    let rendered = render::render(&Templates::embedded(), &s, &settings(), &facts)?;
    let mut objects = Vec::new();
    let mut registration = None;
    for c in &rendered.children {
        let body: DynamicObject =
            serde_json::from_value(relabel(&serde_json::to_value(&c.object)?)?)?;
        let o = Obj {
            ssa,
            ar: c.resource.clone(),
            namespaced: c.namespaced,
            ns: ns.to_string(),
            body,
        };
        if c.step == Step::Registration {
            registration = Some(o);
        } else {
            objects.push(o);
        }
    }
    let mut labels = render::stack_labels(&s);
    labels.insert("app.kubernetes.io/component".into(), "webhook".into());
    for (name, type_, data) in [
        (&names.webhook_ca_secret, "Opaque", pki.ca_secret_data()),
        (
            &names.webhook_tls_secret,
            "kubernetes.io/tls",
            pki.tls_secret_data(),
        ),
    ] {
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "type": type_, "data": data,
        });
        objects.push(Obj {
            ssa,
            ar: ApiResource::erase::<k8s_openapi::api::core::v1::Secret>(&()),
            namespaced: true,
            ns: ns.to_string(),
            body: serde_json::from_value(relabel(&secret)?)?,
        });
    }
    Ok(FloorStack {
        ns: ns.to_string(),
        objects,
        registration: registration.ok_or_else(|| anyhow!("no registration rendered"))?,
    })
}

/// POST one object (already there counts as created); transient failures are retried.
async fn create(client: kube::Client, o: Obj) -> anyhow::Result<()> {
    let api: Api<DynamicObject> = if o.namespaced {
        Api::namespaced_with(client, &o.ns, &o.ar)
    } else {
        Api::all_with(client, &o.ar)
    };
    let mut attempt = 0;
    loop {
        let name = o.body.metadata.name.clone().unwrap_or_default();
        let result = if o.ssa {
            api.patch(
                &name,
                &kube::api::PatchParams::apply("kab-bench-floor").force(),
                &kube::api::Patch::Apply(&o.body),
            )
            .await
        } else {
            api.create(&PostParams::default(), &o.body).await
        };
        match result {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => return Ok(()),
            Err(e) if attempt < 5 => {
                attempt += 1;
                eprintln!(
                    "floor: retrying {} {}: {e}",
                    o.ar.kind,
                    o.body.metadata.name.as_deref().unwrap_or("")
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "floor: creating {} {}/{}",
                        o.ar.kind,
                        o.ns,
                        o.body.metadata.name.as_deref().unwrap_or("")
                    )
                });
            }
        }
    }
}

/// Creates a floor stack's objects `CHILD_PARALLELISM` at a time (the registration comes later,
/// from [`Registrar`], when the webhook Deployment is available — as the operator does it).
async fn run_floor_stack(client: kube::Client, objects: Vec<Obj>) -> anyhow::Result<()> {
    futures::stream::iter(objects)
        .map(|o| create(client.clone(), o))
        .buffer_unordered(CHILD_PARALLELISM)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Creates a floor stack's webhook registration as soon as the observer sees its webhook
/// Deployment available.
struct Registrar {
    pending: Arc<Mutex<HashMap<String, Obj>>>,
    errors: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Registrar {
    fn start(client: kube::Client, obs: &Observer) -> Self {
        let pending: Arc<Mutex<HashMap<String, Obj>>> = Arc::default();
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut rx = obs.subscribe_webhook_available();
        let task = {
            let (pending, errors) = (pending.clone(), errors.clone());
            tokio::spawn(async move {
                while let Some(ns) = rx.recv().await {
                    let reg = pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&ns);
                    if let Some(reg) = reg {
                        let (client, errors) = (client.clone(), errors.clone());
                        tokio::spawn(async move {
                            if let Err(e) = create(client, reg).await {
                                errors
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(format!("{e:#}"));
                            }
                        });
                    }
                }
            })
        };
        Registrar {
            pending,
            errors,
            task,
        }
    }

    fn expect(&self, o: Obj) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(o.ns.clone(), o);
    }

    fn errors(&self) -> Vec<String> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Registrar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Per-stack figures, from the observer's timestamps
// ---------------------------------------------------------------------------------------------

fn since(t0: Instant, t: Instant) -> Duration {
    t.saturating_duration_since(t0)
}

/// Every child but the registration exists: when (from `t0`).
fn applied_at(obs: &Observer, exp: &[(Key, bool)], t0: Instant) -> Option<Duration> {
    obs.with(|s| {
        let mut last = Duration::ZERO;
        for (k, reg) in exp {
            if *reg {
                continue;
            }
            last = last.max(since(t0, *s.exists.get(k)?));
        }
        Some(last)
    })
}

/// Every child ready (the floor's readiness: what the operator's status requires).
fn all_ready_at(obs: &Observer, exp: &[(Key, bool)], t0: Instant) -> Option<Duration> {
    obs.with(|s| {
        let mut last = Duration::ZERO;
        for (k, _) in exp {
            last = last.max(since(t0, *s.ready.get(k)?));
        }
        Some(last)
    })
}

/// The KabStack said Ready=True: when.
fn stack_ready_at(obs: &Observer, ns: &str, t0: Instant) -> Option<Duration> {
    obs.with(|s| {
        s.ready
            .get(&key("KabStack", ns, STACK))
            .map(|t| since(t0, *t))
    })
}

// ---------------------------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------------------------

struct P1 {
    kab_applied: Vec<f64>,
    kab_ready: Vec<f64>,
    floor_applied: Vec<f64>,
    floor_ready: Vec<f64>,
    /// With `KAB_BENCH_FLOOR_SSA=1`: the floor again, applying instead of POSTing.
    ssa_applied: Vec<f64>,
}

pub async fn run() -> anyhow::Result<Report> {
    let started = Instant::now();
    let p1_n = common::env_usize("KAB_BENCH_P1", 30);
    let p2_n = common::env_usize("KAB_BENCH_P2", 500);
    let idle = common::env_secs("KAB_BENCH_IDLE_SECS", 60);
    let p2_timeout = common::env_secs("KAB_BENCH_P2_TIMEOUT", 900);
    let concurrency_env = std::env::var("KAB_BENCH_OPERATOR_CONCURRENCY").ok();
    let concurrency = common::env_usize("KAB_BENCH_OPERATOR_CONCURRENCY", DEFAULT_CONCURRENCY);
    let kab_first = std::env::var("KAB_BENCH_P2_ORDER").is_ok_and(|v| v == "kab-first");
    let floor_ssa = std::env::var("KAB_BENCH_FLOOR_SSA").is_ok_and(|v| v == "1");
    let mut report = Report::new(
        "operator",
        "kab operator (issue 10): P1 single stack, P2 scale",
        "floor",
    );

    let plane = common::start_plane("operator", true, common::AUDIT_OPERATOR).await?;
    let client = common::bench_client(&plane).await?;
    let mut extra = vec!["--admission-probe=false".to_string()];
    if let Some(c) = &concurrency_env {
        extra.push(format!("--concurrency={c}"));
    }
    let extra_ref: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut whole_run = AuditTail::at_end(plane.audit_log_path());
    let operator = common::start_operator(&plane, &extra_ref).await?;
    report.note(String::from(
        "plane: local etcd + kube-apiserver + KCM + scheduler + KWOK; fast_kcm: KCM and scheduler \
         --kube-api-qps=400 --kube-api-burst=800, 20 Deployment/ReplicaSet workers; pods are KWOK's \
         (Ready at once, no process)"
    ));
    report.note(format!(
        "operator: built `kab operator --leader-elect --log-format json {}` (default settings otherwise; \
         concurrency {concurrency}) under the shipped RBAC; --admission-probe=false because on KWOK no \
         webhook really runs, so the dry-run probe could never pass (Ready = workloads available + \
         registration, as the operator computes it without the probe)",
        extra.join(" ")
    ));
    report.note(format!(
        "floor: the same children (kab::render of the same stack, the 2 certificate Secrets with a PKI \
         issued beforehand, not timed), POSTed by a plain kube-rs client (user kab-bench, system:masters), {CHILD_PARALLELISM} \
         children at a time per stack (as the operator applies them) and {concurrency} stacks at a time \
         in P2 (the operator's --concurrency); the webhook registration is created when a watch sees the \
         webhook Deployment available (as the operator does); same readiness conditions (CRD Established, \
         Deployments available and updated, StatefulSet ready, every other child exists); kab ownership \
         labels renamed so the operator never caches the floor's objects; floor and operator stacks each \
         share their own entity CRD"
    ));
    report.note(
        "times are taken by the bench's own watches (metadata-only for plain kinds) when the event \
         arrives; t0 = just before the KabStack POST (kab) or the first child POST (floor)"
            .to_string(),
    );

    let obs = Observer::start(client.clone(), plain_resources()?, "todo-webhook").await?;
    let registrar = Registrar::start(client.clone(), &obs);
    let stacks: Api<KabStack> = Api::all(client.clone());
    let _ = stacks;

    // ---------------------------------------------------------------- P1
    eprintln!(
        "bench operator: P1, {p1_n} stacks one after another (+1 warm-up), kab and floor alternating"
    );
    let p1_ns: Vec<(String, String)> = (0..=p1_n)
        .map(|i| (format!("kb-p1-kab-{i}"), format!("kb-p1-floor-{i}")))
        .collect();
    let p1_ssa_ns: Vec<String> = (0..=p1_n).map(|i| format!("kb-p1-ssa-{i}")).collect();
    let mut all: Vec<String> = p1_ns
        .iter()
        .flat_map(|(a, b)| [a.clone(), b.clone()])
        .collect();
    if floor_ssa {
        all.extend(p1_ssa_ns.iter().cloned());
    }
    common::create_namespaces(&client, &all, &BTreeMap::new(), 16).await?;
    wait_default_service_accounts(&obs, &all).await?;
    let cpu_p1_start = common::cpu_seconds(operator.pid()).unwrap_or(0.0);
    let rec0 = (
        operator
            .metric("kab_operator_reconciliations_total")
            .await
            .unwrap_or(0.0),
        operator
            .metric("kab_operator_reconcile_duration_seconds_sum")
            .await
            .unwrap_or(0.0),
        operator
            .metric("kab_operator_reconcile_duration_seconds_count")
            .await
            .unwrap_or(0.0),
    );
    let rss_start = kab::plane::rss_kib(operator.pid()).unwrap_or(0) as f64 / 1024.0;
    let mut p1_tail = AuditTail::at_end(plane.audit_log_path());
    let mut p1 = P1 {
        kab_applied: vec![],
        kab_ready: vec![],
        floor_applied: vec![],
        floor_ready: vec![],
        ssa_applied: vec![],
    };
    let gap = Duration::from_millis(common::env_usize("KAB_BENCH_P1_GAP_MS", 500) as u64);
    let mut per_stack = Vec::new();
    for (i, (kns, fns)) in p1_ns.iter().enumerate() {
        // Alternate which goes first, so that drift of the plane hits both alike.
        let kab_first_here = i % 2 == 0;
        let mut k = None;
        let mut f = None;
        for turn in 0..2 {
            if (turn == 0) == kab_first_here {
                k = Some(p1_kab(&client, &obs, kns).await?);
            } else {
                f = Some(p1_floor(&client, &obs, &registrar, fns, false).await?);
            }
            tokio::time::sleep(gap).await;
        }
        // The SSA floor (diagnostic) goes last, so the kab/floor alternation stays as it was.
        let ssa = if floor_ssa {
            let r = p1_floor(&client, &obs, &registrar, &p1_ssa_ns[i], true).await?;
            tokio::time::sleep(gap).await;
            Some(r.0)
        } else {
            None
        };
        let (ka, kr) = k.unwrap_or_default();
        let (fa, fr) = f.unwrap_or_default();
        if i == 0 {
            eprintln!(
                "bench operator: P1 warm-up (creates the shared CRDs): kab applied {:.0} ms ready {:.0} ms; floor applied {:.0} ms ready {:.0} ms",
                ms(ka),
                ms(kr),
                ms(fa),
                ms(fr)
            );
            continue;
        }
        eprintln!(
            "bench operator: P1 {i}/{p1_n}: kab applied {:.0} ms ready {:.0} ms | floor applied {:.0} ms ready {:.0} ms",
            ms(ka),
            ms(kr),
            ms(fa),
            ms(fr)
        );
        p1.kab_applied.push(ms(ka));
        p1.kab_ready.push(ms(kr));
        p1.floor_applied.push(ms(fa));
        p1.floor_ready.push(ms(fr));
        if let Some(sa) = ssa {
            p1.ssa_applied.push(ms(sa));
        }
        per_stack.push(json!({"kab_applied_ms": ms(ka), "kab_ready_ms": ms(kr), "floor_applied_ms": ms(fa), "floor_ready_ms": ms(fr)}));
    }
    let cpu_p1 = common::cpu_seconds(operator.pid()).unwrap_or(0.0) - cpu_p1_start;
    let rec1 = (
        operator
            .metric("kab_operator_reconciliations_total")
            .await
            .unwrap_or(0.0),
        operator
            .metric("kab_operator_reconcile_duration_seconds_sum")
            .await
            .unwrap_or(0.0),
        operator
            .metric("kab_operator_reconcile_duration_seconds_count")
            .await
            .unwrap_or(0.0),
    );
    report.note(format!(
        "P1: {:.0} reconciles for {} stacks ({:.1} per stack), mean reconcile {:.1} ms, operator CPU {:.2} s ({:.1} ms per stack)",
        rec1.0 - rec0.0,
        p1_n + 1,
        (rec1.0 - rec0.0) / (p1_n + 1) as f64,
        (rec1.1 - rec0.1) * 1000.0 / (rec1.2 - rec0.2).max(1.0),
        common::cpu_seconds(operator.pid()).unwrap_or(0.0) - cpu_p1_start,
        (common::cpu_seconds(operator.pid()).unwrap_or(0.0) - cpu_p1_start) * 1000.0 / (p1_n + 1) as f64
    ));
    let rss_after_p1 = kab::plane::rss_kib(operator.pid()).unwrap_or(0) as f64 / 1024.0;
    let p1_events = p1_tail.read()?;
    let kab_names: Vec<String> = p1_ns.iter().skip(1).map(|(k, _)| k.clone()).collect();
    let floor_names: Vec<String> = p1_ns.iter().skip(1).map(|(_, f)| f.clone()).collect();
    let (timeline, timeline_text) = p1_timeline(&p1_events, &kab_names, &floor_names);
    report.detail("p1_timeline_ms", timeline);
    report.note(timeline_text);
    report.detail(
        "p1",
        json!({
            "stacks": p1_n,
            "kab_applied_ms": common::summary(&p1.kab_applied),
            "kab_ready_ms": common::summary(&p1.kab_ready),
            "floor_applied_ms": common::summary(&p1.floor_applied),
            "floor_ready_ms": common::summary(&p1.floor_ready),
            "ssa_floor_applied_ms": common::summary(&p1.ssa_applied),
            "operator_cpu_seconds": cpu_p1,
            "operator_rss_mib": {"start": rss_start, "after_p1": rss_after_p1},
            "per_stack": per_stack,
        }),
    );
    let (ka50, fa50) = (
        percentile(&p1.kab_applied, 50.0),
        percentile(&p1.floor_applied, 50.0),
    );
    let (ka99, fa99) = (
        percentile(&p1.kab_applied, 99.0),
        percentile(&p1.floor_applied, 99.0),
    );
    let (kr50, fr50) = (
        percentile(&p1.kab_ready, 50.0),
        percentile(&p1.floor_ready, 50.0),
    );
    let (kr99, fr99) = (
        percentile(&p1.kab_ready, 99.0),
        percentile(&p1.floor_ready, 99.0),
    );
    report.rows.push(
        Row::new(
            &format!("P1 children applied p50 (n={p1_n})"),
            "ms",
            Some(ka50),
            Some(fa50),
        )
        .target("≤ 1.4× floor", ka50 <= 1.4 * fa50),
    );
    if !p1.ssa_applied.is_empty() {
        report.rows.push(
            Row::new(
                "P1 children applied p50 vs floor with server-side apply",
                "ms",
                Some(ka50),
                Some(percentile(&p1.ssa_applied, 50.0)),
            )
            .info("(diagnostic: floor applies instead of POSTs)"),
        );
    }
    report.rows.push(
        Row::new("P1 children applied p99", "ms", Some(ka99), Some(fa99))
            .target("≤ 150 ms", ka99 <= 150.0),
    );
    report.rows.push(
        Row::new("P1 Ready p50", "ms", Some(kr50), Some(fr50))
            .target("≤ floor + 100 ms", kr50 <= fr50 + 100.0),
    );
    report
        .rows
        .push(Row::new("P1 Ready p99", "ms", Some(kr99), Some(fr99)).info("(reported)"));

    // ---------------------------------------------------------------- P2
    eprintln!(
        "bench operator: P2, {p2_n} stacks at once ({})",
        if kab_first {
            "kab first"
        } else {
            "floor first"
        }
    );
    let kab_ns: Vec<String> = (0..p2_n).map(|i| format!("kb-p2-kab-{i}")).collect();
    let floor_ns: Vec<String> = (0..p2_n).map(|i| format!("kb-p2-floor-{i}")).collect();
    let ssa_ns: Vec<String> = (0..p2_n).map(|i| format!("kb-p2-ssa-{i}")).collect();
    let mut all_ns = kab_ns.clone();
    all_ns.extend(floor_ns.iter().cloned());
    if floor_ssa {
        all_ns.extend(ssa_ns.iter().cloned());
    }
    common::create_namespaces(&client, &all_ns, &BTreeMap::new(), 32).await?;
    wait_default_service_accounts(&obs, &all_ns).await?;
    let settle = common::env_secs("KAB_BENCH_SETTLE_SECS", 5);

    let mut floor_result = None;
    let mut kab_result = None;
    let mut ssa_result = None;
    // Each floor phase is cleared (namespaces deleted, waited until gone) before the next phase:
    // a phase that runs on a plane holding another phase's 500 stacks pays for them (the scheduler
    // weighs every pod on the node, the controllers' and the API server's caches grow), measured at
    // 10-20% per earlier phase. kab's stacks stay for the idle window, so kab runs last by default.
    let floors: &[&str] = if floor_ssa {
        &["floor", "floor-ssa"]
    } else {
        &["floor"]
    };
    let phases: Vec<&str> = if kab_first {
        std::iter::once("kab")
            .chain(floors.iter().copied())
            .collect()
    } else {
        floors
            .iter()
            .copied()
            .chain(std::iter::once("kab"))
            .collect()
    };
    let mut cleared: Vec<(&str, f64)> = Vec::new();
    let last = phases.len() - 1;
    for (i, phase) in phases.into_iter().enumerate() {
        tokio::time::sleep(settle).await;
        match phase {
            "kab" => {
                kab_result =
                    Some(p2_kab(&plane, &client, &obs, &operator, &kab_ns, p2_timeout).await?)
            }
            floor => {
                // The POST floor, or the floor that server-side applies (a diagnostic).
                let ssa = floor == "floor-ssa";
                let namespaces = if ssa { &ssa_ns } else { &floor_ns };
                let fs: Vec<FloorStack> = namespaces
                    .iter()
                    .map(|ns| floor_stack(ns, ssa))
                    .collect::<anyhow::Result<_>>()?;
                let result = p2_floor(
                    &plane,
                    &client,
                    &obs,
                    &registrar,
                    fs,
                    namespaces,
                    concurrency,
                    p2_timeout,
                    &format!("apiserver-p2-{floor}"),
                )
                .await?;
                if ssa {
                    ssa_result = Some(result);
                } else {
                    floor_result = Some(result);
                }
                drop_floor_registrations(&client).await?;
                if i < last {
                    cleared.push((floor, clear_phase(&client, namespaces).await?));
                }
            }
        }
    }
    for (phase, took) in &cleared {
        report.note(format!(
            "P2 {phase}: its {p2_n} namespaces deleted and gone {took:.1} s after the phase, before the next one (not timed)"
        ));
    }
    let floor = floor_result.ok_or_else(|| anyhow!("no floor result"))?;
    let kab = kab_result.ok_or_else(|| anyhow!("no kab result"))?;
    let reg_errors = registrar.errors();
    if !reg_errors.is_empty() {
        report.note(format!("floor registration errors: {reg_errors:?}"));
    }

    // ---------------------------------------------------------------- idle
    eprintln!(
        "bench operator: {}s of idle after all Ready",
        idle.as_secs()
    );
    let mut tail = AuditTail::at_end(plane.audit_log_path());
    let idle_cpu0 = common::cpu_seconds(operator.pid()).unwrap_or(0.0);
    tokio::time::sleep(idle).await;
    let idle_cpu = common::cpu_seconds(operator.pid()).unwrap_or(0.0) - idle_cpu0;
    let idle_events = tail.read()?;
    let idle_writes: Vec<String> = idle_events
        .iter()
        .filter(|e| e.user.username == OPERATOR_USER && e.is_write() && !e.is_leader_lease())
        .map(|e| {
            let r = e.object_ref.clone().unwrap_or_default();
            format!("{} {} {}/{}", e.verb, e.resource(), r.namespace, r.name)
        })
        .collect();
    let idle_lease = idle_events
        .iter()
        .filter(|e| e.user.username == OPERATOR_USER && e.is_write() && e.is_leader_lease())
        .count();
    let idle_reads = idle_events
        .iter()
        .filter(|e| e.user.username == OPERATOR_USER && !e.is_write())
        .count();
    let alive = operator.alive();
    let rss_after_idle = kab::plane::rss_kib(operator.pid()).unwrap_or(0) as f64 / 1024.0;
    report.note(format!(
        "operator RSS: {rss_start:.1} MiB at start, {rss_after_p1:.1} MiB after P1 ({} stacks), peak {:.1} MiB in P2, \
         {rss_after_idle:.1} MiB after idle ({} stacks): ≈{:.0} KiB per stack",
        p1_n + 1,
        kab.peak_rss_mib,
        p1_n + 1 + p2_n,
        (rss_after_idle - rss_after_p1) * 1024.0 / p2_n.max(1) as f64
    ));
    let everything = whole_run.read()?;
    let ops: Vec<&common::AuditLine> = everything
        .iter()
        .filter(|e| e.user.username == OPERATOR_USER)
        .collect();
    let (run_verbs, run_detail) = common::by_verb(&ops);
    report.note(format!(
        "operator requests over the whole run (start, P1, P2, idle) by verb: {}",
        run_verbs
            .iter()
            .map(|(v, c)| format!("{v} {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    report.detail(
        "operator_requests_whole_run",
        json!({"by_verb": run_verbs, "by_verb_resource": run_detail}),
    );

    // ---------------------------------------------------------------- rows
    let n = p2_n as f64;
    let kab_all = kab.all_ready.map(|d| d.as_secs_f64());
    let floor_all = floor.all_ready.map(|d| d.as_secs_f64());
    let all_pass = match (kab_all, floor_all) {
        (Some(k), Some(f)) => k <= 1.2 * f && k <= 60.0,
        _ => false,
    };
    report.rows.push(
        Row::new(&format!("P2 all {p2_n} Ready"), "s", kab_all, floor_all)
            .target("≤ 1.2× floor, ≤ 60 s", all_pass),
    );
    if let Some(ssa) = &ssa_result {
        let ssa_all = ssa.all_ready.map(|d| d.as_secs_f64());
        report.rows.push(
            Row::new(
                &format!("P2 all {p2_n} Ready vs floor with server-side apply"),
                "s",
                kab_all,
                ssa_all,
            )
            .info("(diagnostic: floor applies instead of POSTs)"),
        );
        report.note(format!(
            "P2 CPU seconds while the SSA floor ran ({:.1} s): {}",
            ssa_all.unwrap_or_default(),
            common::fmt_cpu(&ssa.procs)
        ));
    }
    report.rows.push(
        Row::new(
            "P2 CPU of plane + operator + bench",
            "cpu-s",
            Some(ours(&kab.procs)),
            Some(ours(&floor.procs)),
        )
        .info("(reported; the work behind the wall time, robust to noise)"),
    );
    report.rows.push(
        Row::new(
            "P2 CPU of other processes (noise)",
            "cpu-s",
            kab.procs.get(OTHERS).copied(),
            floor.procs.get(OTHERS).copied(),
        )
        .info("(noise; kernel softirq time lands here too)"),
    );
    report.rows.push(
        Row::new(
            "P2 all children applied",
            "s",
            kab.all_applied.map(|d| d.as_secs_f64()),
            floor.all_applied.map(|d| d.as_secs_f64()),
        )
        .info("(reported)"),
    );
    report.rows.push(
        Row::new(
            "P2 per-stack Ready p50",
            "s",
            Some(percentile(&kab.ready, 50.0)),
            Some(percentile(&floor.ready, 50.0)),
        )
        .info("(reported)"),
    );
    report.rows.push(
        Row::new(
            "P2 operator peak RSS (sampled 100 ms)",
            "MiB",
            Some(kab.peak_rss_mib),
            None,
        )
        .target("≤ 64 MiB", kab.peak_rss_mib <= 64.0),
    );
    report.rows.push(
        Row::new("operator VmHWM (whole life)", "MiB", kab.hwm_mib, None)
            .info("(kernel peak, cross-check)"),
    );
    report.rows.push(
        Row::new(
            "P2 operator CPU (utime+stime)",
            "cpu-s",
            Some(kab.cpu_seconds),
            None,
        )
        .info(&format!(
            "(reported; {:.1} ms/stack)",
            kab.cpu_seconds * 1000.0 / n
        )),
    );
    report.rows.push(
        Row::new(
            "P2 API requests per stack",
            "count",
            Some(kab.requests as f64 / n),
            Some(floor.writes as f64 / n),
        )
        .info("(reported; floor: its POSTs)"),
    );
    report.rows.push(
        Row::new(
            "P2 API writes per stack",
            "count",
            Some(kab.writes as f64 / n),
            Some(floor.writes as f64 / n),
        )
        .info("(reported)"),
    );
    let lists = kab.verbs.get("list").copied().unwrap_or(0);
    let list_limit = (kab.reconciles / 10.0).max(20.0);
    report.rows.push(
        Row::new(
            "P2 operator LISTs during the run",
            "count",
            Some(lists as f64),
            None,
        )
        .target(
            &format!("no LIST per reconcile ({:.0} reconciles)", kab.reconciles),
            (lists as f64) < list_limit,
        ),
    );
    report.rows.push(
        Row::new(
            &format!("writes in {}s idle (excl. leader Lease)", idle.as_secs()),
            "count",
            Some(idle_writes.len() as f64),
            None,
        )
        .target("0", idle_writes.is_empty()),
    );
    report.note(format!(
        "P2 operator requests by verb (audit log; the bench's audit policy logs every request of the \
         operator's user, reads included): {}",
        kab.verbs.iter().map(|(v, c)| format!("{v} {c}")).collect::<Vec<_>>().join(", ")
    ));
    report.note(format!(
        "P2 CPU seconds while the floor ran ({:.1} s): {}",
        floor_all.unwrap_or_default(),
        common::fmt_cpu(&floor.procs)
    ));
    report.note(format!(
        "P2 CPU seconds while kab ran ({:.1} s): {}",
        kab_all.unwrap_or_default(),
        common::fmt_cpu(&kab.procs)
    ));
    report.note(format!(
        "P2 operator requests by verb and resource: {}",
        kab.detail
            .iter()
            .map(|(v, c)| format!("{v} {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    report.note(format!(
        "P2: {:.0} reconciles for {p2_n} stacks ({:.1} per stack); floor: {} POSTs",
        kab.reconciles,
        kab.reconciles / n,
        floor.writes
    ));
    report.note(format!(
        "idle: {idle_lease} leader-election Lease writes excluded (kab-system), {idle_reads} reads, operator CPU {idle_cpu:.2} s; other writes: {idle_writes:?}"
    ));
    report.note(format!(
        "P2 order: {}; each floor phase's namespaces are deleted (and waited for) before the next phase, so every phase starts on a plane of the same size (kab's stay: the idle window follows); the floor's webhook registrations go with them (the API server weighs every registration on every write)",
        if kab_first {
            "kab first, then the floor (which then runs beside kab's 500 stacks: conservative for the floor)"
        } else if floor_ssa {
            "floor, floor with server-side apply, then kab"
        } else {
            "floor, then kab"
        }
    ));
    if !alive {
        report.note("the operator process EXITED during the run".to_string());
    }
    report.detail(
        "p2",
        json!({
            "stacks": p2_n,
            "kab": {
                "all_ready_s": kab_all,
                "all_applied_s": kab.all_applied.map(|d| d.as_secs_f64()),
                "ready_s": common::summary(&kab.ready),
                "not_ready": kab.not_ready,
                "peak_rss_mib": kab.peak_rss_mib,
                "vm_hwm_mib": kab.hwm_mib,
                "cpu_seconds": kab.cpu_seconds,
                "requests": kab.requests,
                "writes": kab.writes,
                "by_verb": kab.verbs,
                "by_verb_resource": kab.detail,
                "reconciles": kab.reconciles,
                "create_all_stacks_s": kab.create_took.as_secs_f64(),
                "cpu_by_process": kab.procs,
            },
            "floor": {
                "all_ready_s": floor_all,
                "all_applied_s": floor.all_applied.map(|d| d.as_secs_f64()),
                "ready_s": common::summary(&floor.ready),
                "not_ready": floor.not_ready,
                "writes": floor.writes,
                "bench_cpu_seconds": floor.bench_cpu,
                "cpu_by_process": floor.procs,
            },
            "idle": {"seconds": idle.as_secs(), "writes": idle_writes, "leader_lease_writes": idle_lease, "reads": idle_reads, "operator_cpu_seconds": idle_cpu},
        }),
    );
    obs.stop();
    drop(registrar);
    report.finish(started)?;
    drop(operator);
    drop(plane);
    Ok(report)
}

/// Where the time of a P1 stack goes, from the API server's audit timestamps (median over the
/// stacks, ms from the KabStack create, or from the floor's first POST).
fn p1_timeline(
    events: &[common::AuditLine],
    kab_ns: &[String],
    floor_ns: &[String],
) -> (Value, String) {
    use std::collections::BTreeSet;
    let ns_of = |e: &common::AuditLine| {
        e.object_ref
            .as_ref()
            .map(|r| r.namespace.clone())
            .unwrap_or_default()
    };
    let name_of = |e: &common::AuditLine| {
        e.object_ref
            .as_ref()
            .map(|r| r.name.clone())
            .unwrap_or_default()
    };
    let mut marks: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for ns in kab_ns {
        let reg = format!("{STACK}.{ns}.kab.dev");
        let mine: Vec<&common::AuditLine> = events
            .iter()
            .filter(|e| ns_of(e) == *ns || name_of(e) == reg)
            .collect();
        let Some(create) = mine
            .iter()
            .find(|e| {
                e.user.username == common::BENCH_USER
                    && e.verb == "create"
                    && e.resource() == "kabstacks"
            })
            .map(|e| e.received_us())
        else {
            continue;
        };
        let ops: Vec<&&common::AuditLine> = mine
            .iter()
            .filter(|e| e.user.username == OPERATOR_USER && e.is_write())
            .collect();
        let at = |us: i64| (us - create) as f64 / 1000.0;
        let first = |f: &dyn Fn(&common::AuditLine) -> bool| {
            ops.iter().filter(|e| f(e)).map(|e| e.received_us()).min()
        };
        let mut push = |k: &'static str, v: Option<i64>| {
            if let Some(v) = v {
                marks.entry(k).or_default().push(at(v));
            }
        };
        push(
            "kab 1 finalizer patch received",
            first(&|e| e.resource() == "kabstacks"),
        );
        push(
            "kab 2 first Secret patch received",
            first(&|e| e.resource() == "secrets"),
        );
        push(
            "kab 3 Secrets answered",
            ops.iter()
                .filter(|e| e.resource() == "secrets")
                .map(|e| e.done_us())
                .max(),
        );
        let is_child = |e: &common::AuditLine| {
            !matches!(
                e.resource().as_str(),
                "kabstacks" | "kabstacks/status" | "secrets" | "validatingwebhookconfigurations"
            )
        };
        push(
            "kab 4 first other child patch received",
            first(&|e| is_child(e)),
        );
        // The first apply of each child (later ones are re-applies).
        let mut seen = BTreeSet::new();
        let last_child = ops
            .iter()
            .filter(|e| is_child(e) && seen.insert((e.resource(), name_of(e))))
            .map(|e| e.done_us())
            .max();
        push("kab 5 last child answered", last_child);
        push(
            "kab 6 first status patch received",
            first(&|e| e.resource() == "kabstacks/status"),
        );
        push(
            "kab 7 registration patch received",
            first(&|e| e.resource() == "validatingwebhookconfigurations"),
        );
        push(
            "kab 8 last status patch answered",
            ops.iter()
                .filter(|e| e.resource() == "kabstacks/status")
                .map(|e| e.done_us())
                .max(),
        );
        marks
            .entry("kab children patches per stack")
            .or_default()
            .push(seen.len() as f64);
        marks
            .entry("kab writes per stack")
            .or_default()
            .push(ops.len() as f64);
    }
    for ns in floor_ns {
        let reg = format!("{STACK}.{ns}.kab.dev");
        let mine: Vec<&common::AuditLine> = events
            .iter()
            .filter(|e| {
                (ns_of(e) == *ns || name_of(e) == reg)
                    && e.user.username == common::BENCH_USER
                    && e.is_write()
            })
            .collect();
        let Some(start) = mine.iter().map(|e| e.received_us()).min() else {
            continue;
        };
        let at = |us: i64| (us - start) as f64 / 1000.0;
        let reg_at = mine
            .iter()
            .filter(|e| e.resource() == "validatingwebhookconfigurations")
            .map(|e| e.received_us())
            .min();
        let last = mine
            .iter()
            .filter(|e| e.resource() != "validatingwebhookconfigurations")
            .map(|e| e.done_us())
            .max();
        if let Some(v) = last {
            marks
                .entry("floor 1 last POST answered")
                .or_default()
                .push(at(v));
        }
        if let Some(v) = reg_at {
            marks
                .entry("floor 2 registration POST received")
                .or_default()
                .push(at(v));
        }
    }
    let json: serde_json::Map<String, Value> = marks
        .iter()
        .map(|(k, v)| (k.to_string(), json!(percentile(v, 50.0))))
        .collect();
    let text = format!(
        "P1 timeline (API server audit timestamps, median ms from the KabStack create / the floor's first POST): {}",
        marks
            .iter()
            .map(|(k, v)| format!("{k} {:.1}", percentile(v, 50.0)))
            .collect::<Vec<_>>()
            .join("; ")
    );
    (Value::Object(json), text)
}

/// The status of a stack that is late, for the error message.
async fn describe_stack(api: &Api<KabStack>) -> String {
    match api.get(STACK).await {
        Ok(s) => match &s.status {
            Some(st) => {
                let conds: Vec<String> = st
                    .conditions
                    .iter()
                    .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
                    .collect();
                let blocked: Vec<String> = st
                    .components
                    .iter()
                    .filter(|c| !c.ready)
                    .map(|c| format!("{} {}: {}", c.kind, c.name, c.message))
                    .collect();
                format!("status: {conds:?}; not ready: {blocked:?}")
            }
            None => "no status".into(),
        },
        Err(e) => format!("cannot read the stack: {e}"),
    }
}

async fn wait_default_service_accounts(
    obs: &Observer,
    namespaces: &[String],
) -> anyhow::Result<()> {
    common::poll_until(
        "the default ServiceAccount of every benchmark namespace",
        Duration::from_secs(300),
        Duration::from_millis(100),
        || {
            obs.with(|s| {
                namespaces
                    .iter()
                    .all(|ns| s.exists.contains_key(&key("ServiceAccount", ns, "default")))
            })
        },
    )
    .await
}

/// One KabStack: `(children applied, Ready)`.
async fn p1_kab(
    client: &kube::Client,
    obs: &Observer,
    ns: &str,
) -> anyhow::Result<(Duration, Duration)> {
    let exp = expected(ns, KAB_GROUP)?;
    let api: Api<KabStack> = Api::namespaced(client.clone(), ns);
    let s = stack(ns, KAB_GROUP)?;
    let t0 = Instant::now();
    api.create(&PostParams::default(), &s)
        .await
        .with_context(|| format!("creating KabStack {ns}/{STACK}"))?;
    let waited = common::poll_until(
        &format!("KabStack {ns}/{STACK} Ready with every child"),
        Duration::from_secs(180),
        Duration::from_millis(5),
        || stack_ready_at(obs, ns, t0).is_some() && applied_at(obs, &exp, t0).is_some(),
    )
    .await;
    if let Err(e) = waited {
        let missing: Vec<String> = obs.with(|s| {
            exp.iter()
                .filter(|(k, reg)| !reg && !s.exists.contains_key(k))
                .map(|(k, _)| format!("{} {}/{}", k.0, k.1, k.2))
                .collect()
        });
        return Err(e.context(format!(
            "{}; children not seen: {missing:?}",
            describe_stack(&api).await
        )));
    }
    Ok((
        applied_at(obs, &exp, t0).unwrap_or_default(),
        stack_ready_at(obs, ns, t0).unwrap_or_default(),
    ))
}

/// One floor stack: `(children applied, every child ready)`.
async fn p1_floor(
    client: &kube::Client,
    obs: &Observer,
    registrar: &Registrar,
    ns: &str,
    ssa: bool,
) -> anyhow::Result<(Duration, Duration)> {
    let exp = expected(ns, FLOOR_GROUP)?;
    let fs = floor_stack(ns, ssa)?;
    registrar.expect(fs.registration.clone());
    let t0 = Instant::now();
    run_floor_stack(client.clone(), fs.objects).await?;
    common::poll_until(
        &format!("floor stack {ns} ready"),
        Duration::from_secs(180),
        Duration::from_millis(5),
        || all_ready_at(obs, &exp, t0).is_some(),
    )
    .await?;
    Ok((
        applied_at(obs, &exp, t0).unwrap_or_default(),
        all_ready_at(obs, &exp, t0).unwrap_or_default(),
    ))
}

struct FloorP2 {
    all_ready: Option<Duration>,
    all_applied: Option<Duration>,
    ready: Vec<f64>,
    not_ready: usize,
    writes: usize,
    bench_cpu: f64,
    procs: BTreeMap<String, f64>,
}

#[allow(clippy::too_many_arguments)]
async fn p2_floor(
    plane: &kab::plane::Plane,
    client: &kube::Client,
    obs: &Observer,
    registrar: &Registrar,
    stacks: Vec<FloorStack>,
    namespaces: &[String],
    concurrency: usize,
    timeout: Duration,
    profile: &str,
) -> anyhow::Result<FloorP2> {
    let exps: Vec<Vec<(Key, bool)>> = namespaces
        .iter()
        .map(|ns| expected(ns, FLOOR_GROUP))
        .collect::<anyhow::Result<_>>()?;
    let writes: usize = stacks.iter().map(|s| s.objects.len() + 1).sum();
    let mut work = Vec::new();
    for s in stacks {
        registrar.expect(s.registration.clone());
        work.push((s.ns, s.objects));
    }
    let cpu0 = common::cpu_seconds(std::process::id()).unwrap_or(0.0);
    let phase_cpu = PhaseCpu::start(
        plane,
        vec![("bench (floor client + watches)", std::process::id())],
    );
    let pprof = common::PprofCapture::start(plane, profile);
    eprintln!(
        "bench operator: P2 floor: {} stacks, {writes} POSTs",
        work.len()
    );
    let t0 = Instant::now();
    let c = client.clone();
    let creating = tokio::spawn(async move {
        futures::stream::iter(work)
            .map(|(_, objects)| run_floor_stack(c.clone(), objects))
            .buffer_unordered(concurrency.max(1))
            .try_collect::<Vec<()>>()
            .await
    });
    let waited = common::poll_until(
        "every floor stack ready",
        timeout,
        Duration::from_millis(250),
        || exps.iter().all(|e| all_ready_at(obs, e, t0).is_some()),
    )
    .await;
    creating.await??;
    let bench_cpu = common::cpu_seconds(std::process::id()).unwrap_or(0.0) - cpu0;
    let procs = phase_cpu.stop(plane);
    if let Some(path) = pprof.finish() {
        eprintln!(
            "bench operator: P2 floor: kube-apiserver CPU profile in {}",
            path.display()
        );
    }
    let ready: Vec<f64> = exps
        .iter()
        .filter_map(|e| all_ready_at(obs, e, t0))
        .map(|d| d.as_secs_f64())
        .collect();
    let (all_ready, all_applied, not_ready) =
        phase_end("P2 floor", &waited, &ready, obs, &exps, t0);
    eprintln!(
        "bench operator: P2 floor: all ready in {:?}, all applied in {:?}",
        all_ready, all_applied
    );
    Ok(FloorP2 {
        all_ready,
        all_applied,
        ready,
        not_ready,
        writes,
        bench_cpu,
        procs,
    })
}

struct KabP2 {
    all_ready: Option<Duration>,
    all_applied: Option<Duration>,
    ready: Vec<f64>,
    not_ready: usize,
    peak_rss_mib: f64,
    hwm_mib: Option<f64>,
    cpu_seconds: f64,
    requests: usize,
    writes: usize,
    verbs: BTreeMap<String, u64>,
    detail: BTreeMap<String, u64>,
    reconciles: f64,
    create_took: Duration,
    procs: BTreeMap<String, f64>,
}

/// Deletes a finished floor phase's namespaces and waits until they are gone (polling a
/// metadata list of namespaces); returns the seconds it took.
async fn clear_phase(client: &kube::Client, names: &[String]) -> anyhow::Result<f64> {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{DeleteParams, ListParams};
    let api: Api<Namespace> = Api::all(client.clone());
    let t = Instant::now();
    futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let api = api.clone();
            async move {
                match api.delete(&name, &DeleteParams::background()).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                    Err(e) => {
                        Err(anyhow::Error::new(e).context(format!("deleting namespace {name}")))
                    }
                }
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    let wanted: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
    let timeout = Duration::from_secs(900);
    loop {
        let left = api
            .list_metadata(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|n| {
                n.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| wanted.contains(n))
            })
            .count();
        if left == 0 {
            return Ok(t.elapsed().as_secs_f64());
        }
        if t.elapsed() > timeout {
            anyhow::bail!(
                "{left} of {} namespaces still there after {timeout:?}",
                names.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The end of a P2 phase: when the last stack became ready (if all did in time), when the last
/// child was applied (if all were), and how many stacks never became ready.
fn phase_end(
    label: &str,
    waited: &anyhow::Result<()>,
    ready: &[f64],
    obs: &Observer,
    exps: &[Vec<(Key, bool)>],
    t0: Instant,
) -> (Option<Duration>, Option<Duration>, usize) {
    let applied: Vec<Duration> = exps.iter().filter_map(|e| applied_at(obs, e, t0)).collect();
    let not_ready = exps.len() - ready.len();
    if let Err(e) = waited {
        eprintln!("bench operator: {label}: {e:#} ({not_ready} not ready)");
    }
    let all_ready = waited
        .is_ok()
        .then(|| Duration::from_secs_f64(ready.iter().copied().fold(0.0, f64::max)));
    let all_applied =
        (applied.len() == exps.len()).then(|| applied.iter().copied().max().unwrap_or_default());
    (all_ready, all_applied, not_ready)
}

/// Deletes the floor's webhook registrations once its P2 phase is measured: the API server
/// considers every registration on every write, so leaving 500 of them behind would make the
/// phase that follows pay for the floor's stacks too.
async fn drop_floor_registrations(client: &kube::Client) -> anyhow::Result<()> {
    use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
    let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    api.delete_collection(
        &kube::api::DeleteParams::default(),
        &kube::api::ListParams::default().labels("app.kubernetes.io/managed-by=kab-bench-floor"),
    )
    .await
    .context("deleting the floor's webhook registrations")?;
    Ok(())
}

async fn p2_kab(
    plane: &kab::plane::Plane,
    client: &kube::Client,
    obs: &Observer,
    operator: &common::Operator,
    namespaces: &[String],
    timeout: Duration,
) -> anyhow::Result<KabP2> {
    let exps: Vec<Vec<(Key, bool)>> = namespaces
        .iter()
        .map(|ns| expected(ns, KAB_GROUP))
        .collect::<anyhow::Result<_>>()?;
    let bodies: Vec<(String, KabStack)> = namespaces
        .iter()
        .map(|ns| Ok((ns.clone(), stack(ns, KAB_GROUP)?)))
        .collect::<anyhow::Result<_>>()?;
    let pid = operator.pid();
    let reconciles0 = operator
        .metric("kab_operator_reconciliations_total")
        .await
        .unwrap_or(0.0);
    let mut tail = AuditTail::at_end(plane.audit_log_path());
    let rss = common::RssSampler::start(pid);
    let cpu0 = common::cpu_seconds(pid).unwrap_or(0.0);
    let me = std::process::id();
    let phase_cpu = PhaseCpu::start(
        plane,
        vec![("kab operator", pid), ("bench (client + watches)", me)],
    );
    let pprof = common::PprofCapture::start(plane, "apiserver-p2-kab");
    eprintln!(
        "bench operator: P2 kab: creating {} KabStacks",
        bodies.len()
    );
    let t0 = Instant::now();
    let c = client.clone();
    let created: Vec<anyhow::Result<()>> = futures::stream::iter(bodies)
        .map(|(ns, s)| {
            let api: Api<KabStack> = Api::namespaced(c.clone(), &ns);
            async move {
                api.create(&PostParams::default(), &s)
                    .await
                    .map(|_| ())
                    .with_context(|| format!("creating KabStack {ns}/{STACK}"))
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let create_took = t0.elapsed();
    created.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    eprintln!(
        "bench operator: P2 kab: {} KabStacks created in {create_took:?}",
        namespaces.len()
    );
    let waited = common::poll_until(
        "every KabStack Ready",
        timeout,
        Duration::from_millis(250),
        || {
            namespaces
                .iter()
                .all(|ns| stack_ready_at(obs, ns, t0).is_some())
        },
    )
    .await;
    let cpu_seconds = common::cpu_seconds(pid).unwrap_or(0.0) - cpu0;
    let procs = phase_cpu.stop(plane);
    let peak_rss_mib = rss.stop();
    if let Some(path) = pprof.finish() {
        eprintln!(
            "bench operator: P2 kab: kube-apiserver CPU profile in {}",
            path.display()
        );
    }
    let hwm_mib = common::hwm_kib(pid).map(|k| k as f64 / 1024.0);
    let reconciles = operator
        .metric("kab_operator_reconciliations_total")
        .await
        .unwrap_or(0.0)
        - reconciles0;
    let events = tail.read()?;
    let ops: Vec<&common::AuditLine> = events
        .iter()
        .filter(|e| e.user.username == OPERATOR_USER)
        .collect();
    let (verbs, detail) = common::by_verb(&ops);
    let writes = ops.iter().filter(|e| e.is_write()).count();
    let ready: Vec<f64> = namespaces
        .iter()
        .filter_map(|ns| stack_ready_at(obs, ns, t0))
        .map(|d| d.as_secs_f64())
        .collect();
    let (all_ready, all_applied, not_ready) = phase_end("P2 kab", &waited, &ready, obs, &exps, t0);
    eprintln!(
        "bench operator: P2 kab: all Ready in {all_ready:?}, all applied in {all_applied:?}, peak RSS {peak_rss_mib:.1} MiB, CPU {cpu_seconds:.1} s, {} requests",
        ops.len()
    );
    Ok(KabP2 {
        all_ready,
        all_applied,
        ready,
        not_ready,
        peak_rss_mib,
        hwm_mib,
        cpu_seconds,
        requests: ops.len(),
        writes,
        verbs,
        detail,
        reconciles,
        create_took,
        procs,
    })
}

/// `cargo bench --bench kab -- planning`: the CPU a new stack's first reconcile spends before its
/// first write (certificate issuance, render), averaged over many runs; no control plane.
pub fn planning() -> anyhow::Result<()> {
    let s = stack("shop", KAB_GROUP)?;
    let templates = Templates::embedded();
    let policy = CertPolicy {
        validity: Duration::from_secs(2160 * 3600),
        renew_before: Duration::from_secs(720 * 3600),
    };
    let dns = certs::webhook_dns_names("todo-webhook", "shop");
    let n = 200;
    let t = Instant::now();
    let mut pki = PkiState::default();
    for _ in 0..n {
        let now = Timestamp::now();
        let action = certs::plan(now, &PkiState::default(), &policy, &dns);
        pki = certs::execute(now, &PkiState::default(), &policy, &dns, action)?;
    }
    let certs_ms = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
    let facts = Facts {
        ca_bundle_pem: Some(certs::ca_bundle(&pki)),
    };
    let t = Instant::now();
    let mut children = 0;
    for _ in 0..n {
        children = render::render(&templates, &s, &settings(), &facts)?
            .children
            .len();
    }
    let render_ms = t.elapsed().as_secs_f64() * 1000.0 / n as f64;
    println!(
        "planning: certificates (CA + serving) {certs_ms:.2} ms, render ({children} children) {render_ms:.2} ms, per new stack"
    );
    Ok(())
}
