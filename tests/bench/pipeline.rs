//! Issue 6: sustained entity creates through the whole path — API server → the stack's real
//! webhook (2 replicas, through the rendered Service) → etcd → the real entity controller → the
//! real managed nats-server, every part run by the operator and the local runtime — against raw
//! creates of the same CRD with no webhook registered and no controller, in the same run, same
//! client and concurrency. Delivery is observed by subscribing with async-nats to
//! `<prefix>.<ns>.<plural>.created`.
//!
//! Knobs: `KAB_BENCH_PIPELINE_ENTITIES` (creates per round and side, default 400),
//! `KAB_BENCH_PIPELINE_ROUNDS` (alternating rounds, default 2), `KAB_BENCH_PIPELINE_CONCURRENCY`
//! (default 16).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, ensure};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kab::api::KabStack;
use kab::plane::Plane;
use kab::render::{self, Facts, Settings, Step, Templates};
use kab::runtime::LocalRuntime;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::{Value, json};

use crate::common::{self, Report, Row, ms, percentile};

const STACK: &str = "todo";
const NS: &str = "kb-pipeline";
const RAW_NS: &str = "kb-raw";
const GROUP: &str = "pipeline.bench.example.com";
const RAW_GROUP: &str = "raw.bench.example.com";

fn stack_value(ns: &str, group: &str) -> anyhow::Result<Value> {
    let mut v: Value = serde_saphyr::from_str(include_str!("../../examples/todo.yaml"))?;
    v["metadata"] = json!({"name": STACK, "namespace": ns});
    v["spec"]["entity"]["group"] = json!(group);
    // No business application runs here: no external rule, no notify callback.
    v["spec"]["rules"] = json!([
        {"name": "unique-code", "unique": {"fields": ["spec.code"]}},
        {"name": "code-immutable", "immutable": {"fields": ["spec.code"]}},
    ]);
    v["spec"]["controller"] = json!({"replicas": 1});
    Ok(v)
}

fn resource(group: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: "v1".into(),
        api_version: format!("{group}/v1"),
        kind: "Todo".into(),
        plural: "todos".into(),
    }
}

/// One side's round.
#[derive(Default)]
struct Round {
    /// Create request latency, ms.
    create_ms: Vec<f64>,
    /// Create sent → delivered on the broker, ms.
    delivery_ms: Vec<f64>,
    /// Create answered → delivered, ms.
    after_ack_ms: Vec<f64>,
    /// First send → last answer.
    api_seconds: f64,
    /// First send → last delivery.
    e2e_seconds: f64,
    n: usize,
    undelivered: usize,
    errors: Vec<String>,
}

type Deliveries = Arc<Mutex<HashMap<String, Instant>>>;

/// `n` creates, `concurrency` at a time: `(uid, sent, answered)` each.
async fn creates(
    api: &Api<DynamicObject>,
    ar: &ApiResource,
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> (Vec<(String, Instant, Instant)>, Vec<String>) {
    let results: Vec<Result<(String, Instant, Instant), String>> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let mut o = DynamicObject::new(&format!("{prefix}-{i}"), ar);
            o.data = json!({"spec": {"code": format!("{prefix}-{i}"), "message": "benchmark"}});
            async move {
                let sent = Instant::now();
                match api.create(&PostParams::default(), &o).await {
                    Ok(created) => Ok((
                        created.metadata.uid.unwrap_or_default(),
                        sent,
                        Instant::now(),
                    )),
                    Err(e) => Err(format!("{prefix}-{i}: {e}")),
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(x) => ok.push(x),
            Err(e) => errors.push(e),
        }
    }
    (ok, errors)
}

async fn round(
    api: &Api<DynamicObject>,
    ar: &ApiResource,
    prefix: &str,
    n: usize,
    concurrency: usize,
    deliveries: Option<&Deliveries>,
) -> Round {
    let t0 = Instant::now();
    let (done, errors) = creates(api, ar, prefix, n, concurrency).await;
    let last_answer = done.iter().map(|d| d.2).max().unwrap_or(t0);
    let mut r = Round {
        create_ms: done.iter().map(|d| ms(d.2 - d.1)).collect(),
        api_seconds: (last_answer - t0).as_secs_f64(),
        n: done.len(),
        errors,
        ..Round::default()
    };
    let Some(deliveries) = deliveries else {
        r.e2e_seconds = r.api_seconds;
        return r;
    };
    // Wait for every delivery (at most 120 s).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let missing = {
            let d = deliveries.lock().unwrap_or_else(|p| p.into_inner());
            done.iter().filter(|x| !d.contains_key(&x.0)).count()
        };
        if missing == 0 || Instant::now() > deadline {
            r.undelivered = missing;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = deliveries.lock().unwrap_or_else(|p| p.into_inner());
    let mut last = last_answer;
    for (uid, sent, answered) in &done {
        if let Some(at) = d.get(uid) {
            r.delivery_ms.push(ms(at.saturating_duration_since(*sent)));
            r.after_ack_ms
                .push(ms(at.saturating_duration_since(*answered)));
            last = last.max(*at);
        }
    }
    r.e2e_seconds = (last - t0).as_secs_f64();
    r
}

#[derive(Default)]
struct Side {
    create_ms: Vec<f64>,
    delivery_ms: Vec<f64>,
    after_ack_ms: Vec<f64>,
    api_seconds: f64,
    e2e_seconds: f64,
    n: usize,
    undelivered: usize,
    errors: Vec<String>,
}

impl Side {
    fn add(&mut self, r: Round) {
        self.create_ms.extend(r.create_ms);
        self.delivery_ms.extend(r.delivery_ms);
        self.after_ack_ms.extend(r.after_ack_ms);
        self.api_seconds += r.api_seconds;
        self.e2e_seconds += r.e2e_seconds;
        self.n += r.n;
        self.undelivered += r.undelivered;
        self.errors.extend(r.errors);
    }
    fn api_rate(&self) -> f64 {
        self.n as f64 / self.api_seconds.max(1e-9)
    }
    fn e2e_rate(&self) -> f64 {
        (self.n - self.undelivered) as f64 / self.e2e_seconds.max(1e-9)
    }
}

/// CPU seconds of the plane's and the runtime's processes, by name.
fn cpu_snapshot(plane: &Plane, rt: &LocalRuntime, operator_pid: u32) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (name, pid) in plane.pids() {
        *out.entry(name).or_insert(0.0) += common::cpu_seconds(pid).unwrap_or(0.0);
    }
    for p in rt.processes() {
        if let Some(pid) = p.pid {
            let name = if p.pod.contains("webhook") {
                "kab webhook (2 replicas)"
            } else if p.pod.contains("controller") {
                "kab entity-controller"
            } else if p.pod.contains("broker") {
                "nats-server"
            } else {
                "other"
            };
            *out.entry(name.to_string()).or_insert(0.0) += common::cpu_seconds(pid).unwrap_or(0.0);
        }
    }
    out.insert(
        "kab operator".into(),
        common::cpu_seconds(operator_pid).unwrap_or(0.0),
    );
    out.insert(
        "bench client".into(),
        common::cpu_seconds(std::process::id()).unwrap_or(0.0),
    );
    out
}

use common::cpu_delta;

/// A user name of the audit log, short.
fn who(user: &str) -> String {
    if user == common::BENCH_USER {
        return "bench client".into();
    }
    if user == "kab-admin" {
        return "KCM/scheduler/KWOK/local runtime (admin)".into();
    }
    match user.strip_prefix("system:serviceaccount:") {
        Some(sa) => sa.rsplit(':').next().unwrap_or(sa).to_string(),
        None => user.trim_start_matches("system:").to_string(),
    }
}

/// Writes per entity, by `who verb resource`.
fn writes_per_entity(events: &[common::AuditLine], n: usize) -> String {
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    for e in events.iter().filter(|e| e.is_write()) {
        *by.entry(format!(
            "{} {} {}",
            who(&e.user.username),
            e.verb,
            e.resource()
        ))
        .or_insert(0) += 1;
    }
    by.iter()
        .filter(|(_, c)| **c as f64 / n.max(1) as f64 >= 0.05)
        .map(|(k, c)| format!("{k} {:.2}", *c as f64 / n.max(1) as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn run() -> anyhow::Result<Report> {
    let started = Instant::now();
    let per_round = common::env_usize("KAB_BENCH_PIPELINE_ENTITIES", 400);
    let rounds = common::env_usize("KAB_BENCH_PIPELINE_ROUNDS", 2).max(1);
    let concurrency = common::env_usize("KAB_BENCH_PIPELINE_CONCURRENCY", 16);
    let mut report = Report::new(
        "pipeline",
        "entity pipeline (issue 6): API server → webhook → etcd → controller → NATS",
        "raw CRD",
    );

    let plane = Arc::new(common::start_plane("pipeline", true, kab::plane::AUDIT_POLICY).await?);
    let client = common::bench_client(&plane).await?;
    let operator = common::start_operator(&plane, &[]).await?;
    // The runtime writes as the plane's admin (like KCM), not as the bench client.
    let kab = env!("CARGO_BIN_EXE_kab").into();
    let rt = kab::dev::start_runtime(plane.clone(), plane.client(), kab).await?;

    // The stack, its pods run for real by the local runtime.
    common::create_namespaces(
        &client,
        &[NS.to_string()],
        &kab::runtime::namespace_annotations(),
        1,
    )
    .await?;
    common::create_namespaces(&client, &[RAW_NS.to_string()], &Default::default(), 1).await?;
    let stack: KabStack = serde_json::from_value(stack_value(NS, GROUP)?)?;
    let stacks: Api<KabStack> = Api::namespaced(client.clone(), NS);
    let t = Instant::now();
    stacks
        .create(&PostParams::default(), &stack)
        .await
        .context("creating the KabStack")?;
    tokio::time::timeout(
        Duration::from_secs(240),
        kube::runtime::wait::await_condition(stacks.clone(), STACK, |s: Option<&KabStack>| {
            s.is_some_and(|s| kab::health::ready(s.status.as_ref()))
        }),
    )
    .await
    .map_err(|_| {
        anyhow!(
            "the stack was not Ready in 240 s (logs: {})",
            plane.logs_dir().display()
        )
    })??;
    eprintln!(
        "bench pipeline: stack Ready (real processes) in {:?}",
        t.elapsed()
    );

    // The baseline: the same CRD under another group, no webhook, no controller.
    let raw_stack: KabStack = serde_json::from_value(stack_value(RAW_NS, RAW_GROUP)?)?;
    let rendered = render::render(
        &Templates::embedded(),
        &raw_stack,
        &Settings::default(),
        &Facts::default(),
    )?;
    let crd = rendered
        .children
        .iter()
        .find(|c| c.step == Step::EntityApi)
        .ok_or_else(|| anyhow!("no CRD rendered"))?;
    let mut crd_obj = crd.object.clone();
    crd_obj.metadata.labels = None;
    Api::<DynamicObject>::all_with(client.clone(), &crd.resource)
        .create(&PostParams::default(), &crd_obj)
        .await
        .context("creating the raw CRD")?;
    tokio::time::timeout(
        Duration::from_secs(60),
        kube::runtime::wait::await_condition(
            Api::<CustomResourceDefinition>::all(client.clone()),
            crd.name(),
            kube::runtime::wait::conditions::is_crd_established(),
        ),
    )
    .await
    .context("raw CRD not Established")??;

    // Subscribe to the stack's `created` subject on its broker, through the broker's Service.
    let svc = Api::<Service>::namespaced(client.clone(), NS)
        .get(&format!("{STACK}-broker"))
        .await?;
    let ip = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .ok_or_else(|| anyhow!("broker Service has no ClusterIP"))?;
    let prefix = render::stack_config(&stack)["controller"]["subjectPrefix"]
        .as_str()
        .unwrap_or("kab")
        .to_string();
    let subject = format!("{prefix}.{NS}.todos.created");
    let nats = async_nats::connect(format!("nats://{ip}:{}", render::BROKER_CLIENT_PORT))
        .await
        .context("connecting to the managed broker")?;
    let mut sub = nats.subscribe(subject.clone()).await?;
    nats.flush().await?;
    let deliveries: Deliveries = Arc::default();
    let receiver = {
        let deliveries = deliveries.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let at = Instant::now();
                let id = serde_json::from_slice::<Value>(&msg.payload)
                    .ok()
                    .and_then(|v| v["id"].as_str().map(str::to_string))
                    .unwrap_or_default();
                if let Some(uid) = id.strip_suffix(":created") {
                    deliveries
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(uid.to_string())
                        .or_insert(at);
                }
            }
        })
    };
    // One entity through the whole path first (warm-up: connections, caches).
    let kab_ar = resource(GROUP);
    let raw_ar = resource(RAW_GROUP);
    let kab_api: Api<DynamicObject> = Api::namespaced_with(client.clone(), NS, &kab_ar);
    let raw_api: Api<DynamicObject> = Api::namespaced_with(client.clone(), RAW_NS, &raw_ar);
    let warm = round(&kab_api, &kab_ar, "warm", 20, 4, Some(&deliveries)).await;
    ensure!(
        warm.undelivered == 0 && warm.errors.is_empty(),
        "warm-up: {} undelivered, errors {:?}",
        warm.undelivered,
        warm.errors
    );
    let _ = round(&raw_api, &raw_ar, "warm", 20, 4, None).await;

    let mut raw = Side::default();
    let mut kab = Side::default();
    let mut cpu_raw = BTreeMap::new();
    let mut cpu_kab = BTreeMap::new();
    let mut audit_raw = Vec::new();
    let mut audit_kab = Vec::new();
    for r in 0..rounds {
        for side in ["raw", "kab"] {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let c0 = cpu_snapshot(&plane, &rt, operator.pid());
            let mut tail = common::AuditTail::at_end(plane.audit_log_path());
            let res = if side == "raw" {
                round(
                    &raw_api,
                    &raw_ar,
                    &format!("r{r}"),
                    per_round,
                    concurrency,
                    None,
                )
                .await
            } else {
                round(
                    &kab_api,
                    &kab_ar,
                    &format!("r{r}"),
                    per_round,
                    concurrency,
                    Some(&deliveries),
                )
                .await
            };
            let c1 = cpu_snapshot(&plane, &rt, operator.pid());
            let events = tail.read().unwrap_or_default();
            if side == "raw" {
                audit_raw.extend(events)
            } else {
                audit_kab.extend(events)
            }
            let target = if side == "raw" {
                &mut cpu_raw
            } else {
                &mut cpu_kab
            };
            for (k, v) in cpu_delta(&c0, &c1) {
                *target.entry(k).or_insert(0.0) += v;
            }
            eprintln!(
                "bench pipeline: round {} {side}: {} creates, API {:.0}/s, end-to-end {:.0}/s, create p50 {:.1} ms, delivery p50 {:.1} ms p99 {:.1} ms, undelivered {}, errors {}",
                r + 1,
                res.n,
                res.n as f64 / res.api_seconds.max(1e-9),
                (res.n - res.undelivered) as f64 / res.e2e_seconds.max(1e-9),
                percentile(&res.create_ms, 50.0),
                percentile(&res.delivery_ms, 50.0),
                percentile(&res.delivery_ms, 99.0),
                res.undelivered,
                res.errors.len()
            );
            if side == "raw" {
                raw.add(res);
            } else {
                kab.add(res);
            }
        }
    }
    receiver.abort();

    // ------------------------------------------------------------------ table
    report.rows.push(
        Row::new(
            "sustained creates/s, end to end (all delivered)",
            "/s",
            Some(kab.e2e_rate()),
            Some(raw.api_rate()),
        )
        .info("ratio reported"),
    );
    report.rows.push(
        Row::new(
            "creates/s admitted by the API server",
            "/s",
            Some(kab.api_rate()),
            Some(raw.api_rate()),
        )
        .info("ratio reported"),
    );
    report.rows.push(
        Row::new(
            "create request p50",
            "ms",
            Some(percentile(&kab.create_ms, 50.0)),
            Some(percentile(&raw.create_ms, 50.0)),
        )
        .info("ratio reported"),
    );
    report.rows.push(
        Row::new(
            "create request p99",
            "ms",
            Some(percentile(&kab.create_ms, 99.0)),
            Some(percentile(&raw.create_ms, 99.0)),
        )
        .info("ratio reported"),
    );
    report.rows.push(
        Row::new(
            "create → delivery p50",
            "ms",
            Some(percentile(&kab.delivery_ms, 50.0)),
            None,
        )
        .info("from the create request sent"),
    );
    report.rows.push(
        Row::new(
            "create → delivery p99",
            "ms",
            Some(percentile(&kab.delivery_ms, 99.0)),
            None,
        )
        .info("from the create request sent"),
    );
    report.rows.push(
        Row::new(
            "create answered → delivery p50",
            "ms",
            Some(percentile(&kab.after_ack_ms, 50.0)),
            None,
        )
        .info("controller + broker only"),
    );
    report.rows.push(
        Row::new("undelivered", "count", Some(kab.undelivered as f64), None)
            .target("0", kab.undelivered == 0),
    );
    let per_entity = |cpu: &BTreeMap<String, f64>, n: usize| -> String {
        cpu.iter()
            .filter(|(_, v)| **v > 0.005)
            .map(|(k, v)| format!("{k} {:.2} ms", v * 1000.0 / n.max(1) as f64))
            .collect::<Vec<_>>()
            .join(", ")
    };
    report.note(String::from(
        "kab side: the stack of examples/todo.yaml minus the external rule and notify callback (rules unique-code, \
         code-immutable; webhook 2 replicas, failurePolicy Fail, reached through its Service; entity controller 1 \
         replica; Managed NATS JetStream broker, File storage), every pod a real process of the local runtime, \
         operator with its default settings (admission probe on); raw side: the same CRD schema under another \
         group, no webhook registered, no controller"
    ));
    report.note(format!(
        "{rounds} alternating rounds of {per_round} creates per side, {concurrency} concurrent creates (kube-rs, \
         admin), each create a new spec.code; a kab round ends when every entity was delivered on `{subject}` \
         (core NATS subscription to the broker through its Service)"
    ));
    report.note(format!(
        "CPU per entity, kab rounds: {}",
        per_entity(&cpu_kab, kab.n)
    ));
    report.note(format!(
        "CPU per entity, raw rounds: {}",
        per_entity(&cpu_raw, raw.n)
    ));
    report.note(format!(
        "API writes per entity (audit log, every writer), kab rounds: {}",
        writes_per_entity(&audit_kab, kab.n)
    ));
    report.note(format!(
        "API writes per entity, raw rounds: {}",
        writes_per_entity(&audit_raw, raw.n)
    ));
    let errors: Vec<String> = kab
        .errors
        .iter()
        .chain(&raw.errors)
        .take(5)
        .cloned()
        .collect();
    if !errors.is_empty() {
        report.note(format!(
            "create errors: {} (first: {:?})",
            kab.errors.len() + raw.errors.len(),
            errors
        ));
    }
    report.detail(
        "samples",
        json!({
            "per_round": per_round, "rounds": rounds, "concurrency": concurrency,
            "kab": {"n": kab.n, "undelivered": kab.undelivered, "api_seconds": kab.api_seconds, "e2e_seconds": kab.e2e_seconds,
                    "create_ms": common::summary(&kab.create_ms), "delivery_ms": common::summary(&kab.delivery_ms),
                    "after_ack_ms": common::summary(&kab.after_ack_ms), "cpu_seconds": cpu_kab, "errors": kab.errors},
            "raw": {"n": raw.n, "api_seconds": raw.api_seconds, "create_ms": common::summary(&raw.create_ms),
                    "cpu_seconds": cpu_raw, "errors": raw.errors},
        }),
    );
    report.finish(started)?;
    drop(nats);
    drop(rt);
    drop(operator);
    drop(plane);
    Ok(report)
}
