//! `kab webhook` against the real control plane: the API server calls the built binary, run as
//! a local process under exactly the RBAC the stack renders (a client certificate of the stack's
//! webhook ServiceAccount), with a serving certificate from `kab::certs` laid out the way the
//! kubelet mounts a Secret (`..data` symlink). Each test registers its own
//! ValidatingWebhookConfiguration with `clientConfig.url: https://127.0.0.1:<port>/validate`
//! (the Service path comes with the local workload runtime), scoped to its namespace, and an
//! entity group of its own.
//!
//! Covered: every rule admitted and denied with the rule named; 50 concurrent creates of one
//! unique value admit exactly one, with two webhook replicas behind a round-robin TCP balancer
//! (like a Service); stale and in-flight claims; dry runs write nothing; the external rule
//! against a small HTTP server (allow, deny, timeout, 5xx, fail open); a corpus of bad
//! AdmissionReviews; a rotated certificate served without a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kab::admission_probe::{DENIAL_MARKER, PROBE_ANNOTATION};
use kab::api::KabStack;
use kab::certs::{Ca, Serving};
use kab::plane::Process;
use kab::render;
use kab::webhook::claims::{LABEL_RULE, LeaseClaims, claim_name};
use kube::ResourceExt as _;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::support::tls::{self, der};
use crate::support::{Ctx, Test, e2e_tests, wait_deleted};

pub fn tests() -> Vec<Test> {
    e2e_tests![
        rules_are_enforced_and_each_denial_names_its_rule,
        fifty_concurrent_creates_of_one_unique_value_admit_exactly_one,
        external_rule_allows_denies_times_out_and_fails_open,
        bad_admission_reviews_get_4xx_and_the_process_survives,
        a_rotated_certificate_is_served_without_restart,
    ]
}

const STACK: &str = "shop";
const KIND: &str = "Todo";
const PLURAL: &str = "todos";
const TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// Valid entities are admitted; unique, immutable and maxCount violations are denied naming the
/// rule, the field and the conflicting entity; values move with updates and are freed by
/// deletes; dry runs write no claim; a stale claim is taken over, a fresh one is not.
async fn rules_are_enforced_and_each_denial_names_its_rule(ctx: Ctx) -> anyhow::Result<()> {
    let ns = ctx.namespace("webhook-rules").await?;
    let env = Env::install(
        &ctx,
        &ns,
        json!([
            {"name": "unique-code", "unique": {"fields": ["spec.code"]}},
            {"name": "owner-immutable", "immutable": {"fields": ["spec.owner"]}},
            {"name": "at-most-5", "maxCount": 5},
        ]),
    )
    .await?;
    let webhook = env.start_webhook(&ctx, "a", &[]).await?;
    let _registration = env.register(&ctx, webhook.port).await?;
    let todos = env.entities(&ctx);
    let leases: Api<Lease> = Api::namespaced(ctx.client(), &ns);
    let claim = |code: &str| claim_name(STACK, "unique-code", &[json!(code)]);

    // Admitted, and the value claimed for it.
    create(
        &todos,
        &env.entity("first", json!({"code": "A-1", "owner": "ann"})),
    )
    .await?;
    let lease = leases
        .get(&claim("A-1"))
        .await
        .context("the claim of A-1")?;
    ensure!(holder(&lease) == "first", "claim: {lease:?}");
    ensure!(
        lease.labels().get(LABEL_RULE).map(String::as_str) == Some("unique-code"),
        "{lease:?}"
    );

    // unique: denied, naming rule, field, value and holder.
    let denied = denial(create(&todos, &env.entity("second", json!({"code": "A-1"}))).await)?;
    expect(
        &denied,
        &format!(r#"rule unique-code: spec.code "A-1" is already used by todo {ns}/first"#),
    )?;

    // Generated names are known at validation: the claim names the generated entity.
    let generated = create(
        &todos,
        &env.entity_generated("gen-", json!({"code": "G-1"})),
    )
    .await?;
    ensure!(holder(&leases.get(&claim("G-1")).await?) == generated.name_any());

    // immutable: denied on change, allowed on other fields.
    let mut changed = todos.get("first").await?;
    changed.data["spec"]["owner"] = json!("bob");
    let denied = denial(
        todos
            .replace("first", &PostParams::default(), &changed)
            .await,
    )?;
    expect(
        &denied,
        r#"rule owner-immutable: spec.owner cannot change (was "ann", now "bob")"#,
    )?;
    let mut edited = todos.get("first").await?;
    edited.data["spec"]["message"] = json!("hello");
    todos
        .replace("first", &PostParams::default(), &edited)
        .await
        .context("an update of a free field")?;

    // unique on update: the value moves, the old one is freed.
    let mut moved = todos.get("first").await?;
    moved.data["spec"]["code"] = json!("A-2");
    todos
        .replace("first", &PostParams::default(), &moved)
        .await
        .context("moving first to A-2")?;
    ensure!(holder(&leases.get(&claim("A-2")).await?) == "first");
    ensure!(
        leases.get_opt(&claim("A-1")).await?.is_none(),
        "the claim of A-1 was not released"
    );
    create_when_admitted(&todos, &env.entity("third", json!({"code": "A-1"}))).await?;

    // Dry runs: the decision without a write.
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    todos
        .create(&dry, &env.entity("dry", json!({"code": "D-1"})))
        .await
        .context("a dry-run create of a free value")?;
    ensure!(
        leases.get_opt(&claim("D-1")).await?.is_none(),
        "a dry run wrote a claim"
    );
    let denied = denial(
        todos
            .create(&dry, &env.entity("dry", json!({"code": "A-2"})))
            .await,
    )?;
    expect(&denied, "is already used by todo")?;

    // delete frees the value.
    todos.delete("first", &DeleteParams::default()).await?;
    wait_deleted(&leases, &claim("A-2"), Duration::from_secs(10)).await?;
    create_when_admitted(&todos, &env.entity("fourth", json!({"code": "A-2"}))).await?;

    // A claim nobody holds, older than the grace period, is taken over.
    let now = Timestamp::now();
    leases
        .create(
            &PostParams::default(),
            &ghost_claim(
                &ns,
                &claim("Z-1"),
                Timestamp::from_second(now.as_second() - 600)?,
            ),
        )
        .await?;
    create(&todos, &env.entity("zed", json!({"code": "Z-1"}))).await?;
    ensure!(holder(&leases.get(&claim("Z-1")).await?) == "zed");
    // A fresh claim by an entity not stored (yet) is respected.
    leases
        .create(
            &PostParams::default(),
            &ghost_claim(&ns, &claim("Z-2"), now),
        )
        .await?;
    let denied = denial(create(&todos, &env.entity("zed-2", json!({"code": "Z-2"}))).await)?;
    expect(
        &denied,
        &format!(r#"rule unique-code: spec.code "Z-2" is being claimed by todo {ns}/ghost"#),
    )?;

    // maxCount: third, gen-*, fourth, zed, fifth = 5; a sixth is refused.
    create_when_admitted(&todos, &env.entity("fifth", json!({"code": "M-5"}))).await?;
    let sixth = env.entity("sixth", json!({"code": "M-6"}));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // The watch cache catches up with the fifth within milliseconds.
        match todos.create(&dry, &sixth).await {
            Err(e) if e.to_string().contains("rule at-most-5") => break,
            _ if Instant::now() > deadline => bail!("maxCount never applied to a dry run"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let denied = denial(create(&todos, &sixth).await)?;
    expect(
        &denied,
        &format!("rule at-most-5: at most 5 todos per namespace, and {ns} already has 5"),
    )?;
    ensure!(
        webhook.alive(),
        "the webhook exited:\n{}",
        webhook.log_tail()
    );
    Ok(())
}

/// 50 creates at once, all with the same unique value, through two webhook replicas behind a
/// round-robin balancer: exactly one is admitted (three rounds); both replicas judged some.
async fn fifty_concurrent_creates_of_one_unique_value_admit_exactly_one(
    ctx: Ctx,
) -> anyhow::Result<()> {
    let ns = ctx.namespace("webhook-race").await?;
    let env = Env::install(
        &ctx,
        &ns,
        json!([{"name": "unique-code", "unique": {"fields": ["spec.code"]}}]),
    )
    .await?;
    let a = env.start_webhook(&ctx, "a", &[]).await?;
    let b = env.start_webhook(&ctx, "b", &[]).await?;
    let balancer = RoundRobin::start([a.port, b.port]).await?;
    let _registration = env.register(&ctx, balancer.port).await?;
    let todos = env.entities(&ctx);
    let leases: Api<Lease> = Api::namespaced(ctx.client(), &ns);

    // Sequential creates, each claiming a new value: the latency a client sees.
    let mut sequential = Vec::new();
    for i in 0..20 {
        let started = Instant::now();
        create(
            &todos,
            &env.entity(&format!("seq-{i}"), json!({"code": format!("S-{i}")})),
        )
        .await?;
        sequential.push(started.elapsed());
    }

    let mut race_latencies = Vec::new();
    for round in 0..3 {
        let code = format!("RACE-{round}");
        let attempts = (0..50).map(|i| {
            let todos = todos.clone();
            let object = env.entity(&format!("race-{round}-{i}"), json!({"code": code}));
            async move {
                let started = Instant::now();
                let result = todos.create(&PostParams::default(), &object).await;
                (result, started.elapsed())
            }
        });
        let results = futures::future::join_all(attempts).await;
        let mut admitted = Vec::new();
        let (mut used, mut claiming) = (0, 0);
        for (result, took) in results {
            race_latencies.push(took);
            match result {
                Ok(o) => admitted.push(o.name_any()),
                Err(e) => {
                    let message = e.to_string();
                    ensure!(
                        message.contains("rule unique-code"),
                        "round {round}: a create failed for another reason: {message}"
                    );
                    if message.contains("is already used by") {
                        used += 1;
                    } else if message.contains("is being claimed by") {
                        claiming += 1;
                    } else {
                        bail!("round {round}: unexpected denial: {message}");
                    }
                }
            }
        }
        ensure!(
            admitted.len() == 1,
            "round {round}: {} creates of {code} admitted: {admitted:?}",
            admitted.len()
        );
        let stored: Vec<String> = todos
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter(|o| o.data["spec"]["code"] == json!(code))
            .map(|o| o.name_any())
            .collect();
        ensure!(stored == admitted, "round {round}: stored {stored:?}");
        let lease = leases
            .get(&claim_name(STACK, "unique-code", &[json!(code)]))
            .await?;
        ensure!(
            holder(&lease) == admitted[0],
            "round {round}: claim held by {} not {}",
            holder(&lease),
            admitted[0]
        );
        eprintln!(
            "webhook e2e: round {round}: 1 of 50 admitted ({}), {used} denied as used, {claiming} as being claimed",
            admitted[0]
        );
    }

    let served = [a.admissions("CREATE").await?, b.admissions("CREATE").await?];
    ensure!(
        served.iter().all(|n| *n > 0),
        "both replicas must judge creates: {served:?} (connections {:?})",
        balancer.connections()
    );
    eprintln!(
        "webhook e2e: creates judged per replica {served:?}; connections per replica {:?}",
        balancer.connections()
    );
    eprintln!(
        "webhook e2e: sequential create (API server + webhook + claim) p50 {:?} max {:?}; under 50 concurrent creates p50 {:?} p99 {:?}",
        percentile(&mut sequential, 50),
        percentile(&mut sequential, 100),
        percentile(&mut race_latencies, 50),
        percentile(&mut race_latencies, 99),
    );
    let mut contended = 0;
    for w in [&a, &b] {
        let text = w.get("/metrics").await?.1;
        contended += metric(&text, r#"kab_webhook_claims_total{result="conflict"}"#)
            + metric(&text, r#"kab_webhook_claims_total{result="in_flight"}"#);
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_default()
                .to_owned()
        };
        let claims: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("kab_webhook_claims_total"))
            .collect();
        eprintln!(
            "webhook e2e: replica {}: {} / {}; {claims:?}",
            w.name,
            line("kab_webhook_request_duration_seconds_sum"),
            line("kab_webhook_request_duration_seconds_count")
        );
    }
    // Losers that came after the cache saw the winner were denied without a write; the others
    // raced the winner to the API server and lost on the claim. Both must have happened for
    // this test to prove anything about claims.
    ensure!(
        contended > 0,
        "no create reached the claim step: the race was not exercised"
    );
    ensure!(a.alive() && b.alive(), "a webhook replica exited");
    Ok(())
}

/// The external rule against a small HTTP server: allowed, denied with the application's
/// message, timeout and 5xx denied (fail closed), timeout admitted (fail open), and the
/// application sees the request; metadata-only updates are not sent.
async fn external_rule_allows_denies_times_out_and_fails_open(ctx: Ctx) -> anyhow::Result<()> {
    let ns = ctx.namespace("webhook-external").await?;
    let app = BusinessApp::start().await?;
    let env = Env::install(
        &ctx,
        &ns,
        json!([
            {"name": "app-strict", "external": {"url": format!("{}/strict", app.url), "timeoutSeconds": 1}},
            {"name": "app-lenient", "external": {"url": format!("{}/lenient", app.url), "timeoutSeconds": 1, "failOpen": true}},
        ]),
    )
    .await?;
    let webhook = env.start_webhook(&ctx, "a", &[]).await?;
    let _registration = env.register(&ctx, webhook.port).await?;
    let todos = env.entities(&ctx);

    let before = app.calls();
    create(&todos, &env.entity("ok-1", json!({"code": "ok"}))).await?;
    // In order, strict first; the API server may repeat a webhook call (a retried connection),
    // so the check is on the sequence of rules asked, not on a count.
    let seen = app.sent_since(before);
    let rules: Vec<&str> = seen.iter().filter_map(|p| p["rule"].as_str()).collect();
    ensure!(
        rules.first() == Some(&"app-strict") && rules.contains(&"app-lenient"),
        "both rules ask the app, strict first: {seen:?}"
    );
    for asked in &seen {
        ensure!(asked["operation"] == "CREATE", "{asked}");
        ensure!(asked["namespace"] == json!(ns), "{asked}");
        ensure!(asked["name"] == "ok-1", "{asked}");
        ensure!(asked["object"]["spec"]["code"] == "ok", "{asked}");
    }

    let denied = denial(create(&todos, &env.entity("no-1", json!({"code": "no"}))).await)?;
    expect(&denied, "rule app-strict: the app refuses code no")?;

    let started = Instant::now();
    let denied = denial(create(&todos, &env.entity("slow-1", json!({"code": "slow"}))).await)?;
    expect(
        &denied,
        &format!(
            "rule app-strict: {}/strict did not answer within 1s",
            app.url
        ),
    )?;
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let denied = denial(create(&todos, &env.entity("boom-1", json!({"code": "boom"}))).await)?;
    expect(
        &denied,
        &format!(
            "rule app-strict: {}/strict answered 503 Service Unavailable",
            app.url
        ),
    )?;

    // Fail open: the lenient rule times out, the entity is admitted (with a warning).
    let started = Instant::now();
    create(
        &todos,
        &env.entity("lenient-1", json!({"code": "slow-lenient"})),
    )
    .await?;
    ensure!(
        started.elapsed() >= Duration::from_secs(1),
        "the fail-open rule did not wait for its timeout: {:?}",
        started.elapsed()
    );

    // A metadata-only update is not sent to the application; a spec change is, to both rules.
    // The API server may call a webhook more than once for one write (an update that meets a
    // stale cache retries, admission included), so the check is on what was sent, not a count.
    let calls = app.calls();
    let labels = json!({"metadata": {"labels": {"reviewed": "yes"}}});
    todos
        .patch("ok-1", &PatchParams::default(), &Patch::Merge(&labels))
        .await?;
    let sent = app.sent_since(calls);
    ensure!(
        sent.is_empty(),
        "a label change was sent to the app: {sent:?}"
    );
    let spec = json!({"spec": {"message": "changed"}});
    todos
        .patch("ok-1", &PatchParams::default(), &Patch::Merge(&spec))
        .await?;
    let sent = app.sent_since(calls);
    let rules: std::collections::BTreeSet<&str> =
        sent.iter().filter_map(|p| p["rule"].as_str()).collect();
    ensure!(
        rules == ["app-lenient", "app-strict"].into(),
        "the spec change was not sent to both rules' app: {sent:?}"
    );
    for payload in &sent {
        ensure!(
            payload["operation"] == "UPDATE"
                && payload["name"] == "ok-1"
                && payload["object"]["spec"]["message"] == "changed",
            "the app was sent something other than the spec change: {payload}"
        );
    }
    ensure!(
        webhook.alive(),
        "the webhook exited:\n{}",
        webhook.log_tail()
    );
    Ok(())
}

/// Malformed requests sent straight to the webhook get a 4xx with a message each, and the
/// process keeps serving.
async fn bad_admission_reviews_get_4xx_and_the_process_survives(ctx: Ctx) -> anyhow::Result<()> {
    let ns = ctx.namespace("webhook-bad").await?;
    let env = Env::install(
        &ctx,
        &ns,
        json!([{"name": "unique-code", "unique": {"fields": ["spec.code"]}}]),
    )
    .await?;
    let webhook = env.start_webhook(&ctx, "a", &[]).await?;
    let good = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "e2e-1",
            "kind": {"group": env.group, "version": "v1", "kind": KIND},
            "resource": {"group": env.group, "version": "v1", "resource": PLURAL},
            "name": "x",
            "namespace": ns,
            "operation": "CREATE",
            "userInfo": {"username": "e2e"},
            "object": env.entity_in_ns("x", json!({"code": "X-1"})),
            "dryRun": true,
        }
    });
    let good_bytes = serde_json::to_vec(&good)?;
    let mut wrong_version = good.clone();
    wrong_version["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let mut no_object = good.clone();
    no_object["request"]
        .as_object_mut()
        .context("request")?
        .remove("object");
    let mut no_request = good.clone();
    no_request
        .as_object_mut()
        .context("review")?
        .remove("request");
    let nested = String::from_utf8(good_bytes.clone())?.replace(
        r#""code":"X-1""#,
        &format!(r#""code":{}"#, "[".repeat(200_000)),
    );
    let mut huge = good.clone();
    huge["request"]["object"]["spec"]["message"] = json!("x".repeat(10 * 1024 * 1024));

    let json_ct = Some("application/json");
    // (what, body, content type, status, message)
    type Case<'a> = (&'a str, Vec<u8>, Option<&'a str>, u16, &'a str);
    let corpus: Vec<Case> = vec![
        (
            "truncated JSON",
            good_bytes[..good_bytes.len() / 2].to_vec(),
            json_ct,
            400,
            "not valid JSON",
        ),
        (
            "not JSON",
            b"<AdmissionReview/>".to_vec(),
            json_ct,
            400,
            "not valid JSON",
        ),
        ("empty", Vec::new(), json_ct, 400, "empty body"),
        (
            "wrong apiVersion",
            serde_json::to_vec(&wrong_version)?,
            json_ct,
            400,
            "admission.k8s.io/v1 only",
        ),
        (
            "missing object",
            serde_json::to_vec(&no_object)?,
            json_ct,
            400,
            "has no object",
        ),
        (
            "missing request",
            serde_json::to_vec(&no_request)?,
            json_ct,
            400,
            "has no request",
        ),
        (
            "10 MB body",
            serde_json::to_vec(&huge)?,
            json_ct,
            413,
            "larger than 4 MiB",
        ),
        (
            "deeply nested JSON",
            nested.into_bytes(),
            json_ct,
            400,
            "nested deeper than 128",
        ),
        (
            "not JSON content",
            good_bytes.clone(),
            Some("text/plain"),
            415,
            "application/json",
        ),
    ];
    for (what, body, content_type, status, message) in corpus {
        let (got, text) = webhook.post("/validate", content_type, body).await?;
        ensure!(got == status, "{what}: {got} {text}");
        ensure!(text.contains(message), "{what}: {text:?} lacks {message:?}");
        ensure!(
            webhook.alive(),
            "{what}: the webhook exited:\n{}",
            webhook.log_tail()
        );
    }
    // Not TLS at all.
    {
        use tokio::io::AsyncWriteExt as _;
        let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", webhook.port)).await?;
        raw.write_all(b"POST /validate HTTP/1.1\r\nHost: x\r\n\r\n")
            .await?;
        let _ = raw.shutdown().await;
    }
    // Still serving, and still judging.
    let (status, text) = webhook
        .post("/validate", json_ct, good_bytes.clone())
        .await?;
    ensure!(status == 200, "{status} {text}");
    let answer: Value = serde_json::from_str(&text)?;
    ensure!(answer["response"]["uid"] == "e2e-1", "{answer}");
    ensure!(answer["response"]["allowed"] == true, "{answer}");
    ensure!(webhook.get("/healthz").await?.0 == 200);
    let metrics = webhook.get("/metrics").await?.1;
    ensure!(
        metrics.contains(r#"kab_webhook_requests_total{operation="",result="invalid",rule=""} 9"#),
        "{metrics}"
    );
    ensure!(
        webhook.alive(),
        "the webhook exited:\n{}",
        webhook.log_tail()
    );
    Ok(())
}

/// The kubelet swaps the Secret's `..data` symlink to a new certificate: the next handshake
/// presents it, the process is the same, and the API server keeps calling the webhook.
async fn a_rotated_certificate_is_served_without_restart(ctx: Ctx) -> anyhow::Result<()> {
    let ns = ctx.namespace("webhook-rotate").await?;
    let env = Env::install(
        &ctx,
        &ns,
        json!([{"name": "unique-code", "unique": {"fields": ["spec.code"]}}]),
    )
    .await?;
    let webhook = env
        .start_webhook(&ctx, "a", &["--cert-poll-seconds", "1"])
        .await?;
    let _registration = env.register(&ctx, webhook.port).await?;
    let todos = env.entities(&ctx);
    let pid = webhook.pid();
    let first = der(&env.serving.cert_pem)?;
    ensure!(presented(webhook.port, &env.ca.cert_pem).await? == first);
    create(&todos, &env.entity("before", json!({"code": "R-1"}))).await?;

    let next = env.issue_serving()?;
    write_secret_volume(&env.tls_dir(), &next, &env.ca, 2)?;
    let rotated = Instant::now();
    let expected = der(&next.cert_pem)?;
    let deadline = rotated + Duration::from_secs(15);
    loop {
        if presented(webhook.port, &env.ca.cert_pem).await? == expected {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "webhook e2e: rotated certificate served {:?} after the swap",
        rotated.elapsed()
    );
    ensure!(
        webhook.alive() && webhook.pid() == pid,
        "the webhook restarted"
    );
    // The API server opens new connections: admission keeps working with the new certificate.
    create(&todos, &env.entity("after", json!({"code": "R-2"}))).await?;
    let denied = denial(create(&todos, &env.entity("again", json!({"code": "R-1"}))).await)?;
    expect(&denied, "rule unique-code")?;
    let metrics = webhook.get("/metrics").await?.1;
    ensure!(
        metrics.contains("kab_webhook_certificate_reloads_total 2"),
        "{metrics}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The stack: RBAC, entity CRD and configuration rendered by kab, a certificate from kab::certs
// ---------------------------------------------------------------------------------------------

struct Env {
    ns: String,
    group: String,
    resource: ApiResource,
    dir: tempfile::TempDir,
    ca: Ca,
    serving: Serving,
}

impl Env {
    /// Renders a stack with `rules` and an entity group of its own, applies its webhook RBAC,
    /// entity CRD and ConfigMap, writes `stack.json` and a serving certificate for 127.0.0.1.
    async fn install(ctx: &Ctx, ns: &str, rules: Value) -> anyhow::Result<Self> {
        let group = format!("{ns}.e2e.example.com");
        let stack: KabStack = serde_json::from_value(json!({
            "apiVersion": "kab.dev/v1alpha1",
            "kind": "KabStack",
            "metadata": {"name": STACK, "namespace": ns},
            "spec": {
                "entity": {
                    "group": group,
                    "kind": KIND,
                    "versions": [{"name": "v1", "schema": {
                        "type": "object",
                        "properties": {
                            "code": {"type": "string"},
                            "owner": {"type": "string"},
                            "message": {"type": "string"},
                        },
                    }}],
                },
                "rules": rules,
                "webhook": {"timeoutSeconds": 10},
                "broker": {"mode": "None"},
            },
        }))?;
        kab::validate::validate(&stack).map_err(|e| anyhow!("invalid test stack: {e}"))?;
        crate::support::apply_rbac_entity_api_and_config(ctx, ns, &stack).await?;

        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("stack.json"),
            serde_json::to_vec_pretty(&render::stack_config(&stack))?,
        )?;
        let ca = kab::certs::issue_ca(
            &format!("{ns} e2e webhook CA"),
            Timestamp::now(),
            Duration::from_secs(3600),
        )?;
        let env = Env {
            ns: ns.to_owned(),
            resource: ApiResource {
                group: group.clone(),
                version: "v1".into(),
                api_version: format!("{group}/v1"),
                kind: KIND.into(),
                plural: PLURAL.into(),
            },
            group,
            serving: kab::certs::issue_serving(
                &ca,
                &["127.0.0.1".into(), "localhost".into()],
                Timestamp::now(),
                Duration::from_secs(1800),
            )?,
            ca,
            dir,
        };
        std::fs::create_dir_all(env.tls_dir())?;
        write_secret_volume(&env.tls_dir(), &env.serving, &env.ca, 1)?;
        Ok(env)
    }

    fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    fn issue_serving(&self) -> anyhow::Result<Serving> {
        Ok(kab::certs::issue_serving(
            &self.ca,
            &["127.0.0.1".into(), "localhost".into()],
            Timestamp::now(),
            Duration::from_secs(1800),
        )?)
    }

    fn entities(&self, ctx: &Ctx) -> Api<DynamicObject> {
        Api::namespaced_with(ctx.client(), &self.ns, &self.resource)
    }

    fn entity(&self, name: &str, spec: Value) -> DynamicObject {
        self.object(json!({"name": name}), spec)
    }

    fn entity_in_ns(&self, name: &str, spec: Value) -> DynamicObject {
        self.object(json!({"name": name, "namespace": self.ns}), spec)
    }

    fn entity_generated(&self, prefix: &str, spec: Value) -> DynamicObject {
        self.object(json!({"generateName": prefix}), spec)
    }

    fn object(&self, metadata: Value, spec: Value) -> DynamicObject {
        let value = json!({
            "apiVersion": self.resource.api_version,
            "kind": KIND,
            "metadata": metadata,
            "spec": spec,
        });
        serde_json::from_value(value).unwrap_or_else(|_| DynamicObject::new("", &self.resource))
    }

    /// Starts `kab webhook` as the stack's webhook ServiceAccount and waits for `/readyz`.
    async fn start_webhook(
        &self,
        ctx: &Ctx,
        name: &str,
        extra: &[&str],
    ) -> anyhow::Result<Webhook> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let user = format!("system:serviceaccount:{}:{STACK}-webhook", self.ns);
        let kubeconfig = ctx
            .plane()
            .write_kubeconfig(&user, &["system:serviceaccounts"])?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kab"));
        cmd.arg("webhook")
            .arg("--config")
            .arg(self.dir.path().join("stack.json"))
            .arg("--tls-dir")
            .arg(self.tls_dir())
            .args(extra)
            .env("KUBECONFIG", &kubeconfig)
            .env("KAB_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info,kab=debug");
        let process = ctx
            .plane()
            .spawn(&format!("webhook-{}-{name}", self.ns), cmd)?;
        let webhook = Webhook {
            name: name.to_owned(),
            process: Mutex::new(process),
            port,
            client: https_client(&self.ca.cert_pem)?,
        };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            ensure!(
                webhook.alive(),
                "kab webhook {name} exited:\n{}",
                webhook.log_tail()
            );
            if let Ok((200, _)) = webhook.get("/readyz").await {
                return Ok(webhook);
            }
            ensure!(
                Instant::now() < deadline,
                "kab webhook {name} not ready after {TIMEOUT:?}:\n{}",
                webhook.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Registers `https://127.0.0.1:<port>/validate` for the entity in this namespace, and waits
    /// until the API server calls it (a dry-run probe is denied by the webhook).
    async fn register(&self, ctx: &Ctx, port: u16) -> anyhow::Result<Registration> {
        let name = format!("{}.e2e.kab.dev", self.ns);
        let vwc: ValidatingWebhookConfiguration = serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [{
                "name": name,
                "admissionReviewVersions": ["v1"],
                "clientConfig": {
                    "url": format!("https://127.0.0.1:{port}/validate"),
                    "caBundle": base64::engine::general_purpose::STANDARD.encode(&self.ca.cert_pem),
                },
                "rules": [{
                    "apiGroups": [self.group],
                    "apiVersions": ["*"],
                    "operations": ["CREATE", "UPDATE", "DELETE"],
                    "resources": [PLURAL],
                    "scope": "Namespaced",
                }],
                "namespaceSelector": {"matchExpressions": [{
                    "key": "kubernetes.io/metadata.name", "operator": "In", "values": [self.ns],
                }]},
                "failurePolicy": "Fail",
                "timeoutSeconds": 10,
                "matchPolicy": "Equivalent",
                "sideEffects": "NoneOnDryRun",
            }],
        }))?;
        let api: Api<ValidatingWebhookConfiguration> = Api::all(ctx.client());
        api.create(&PostParams::default(), &vwc).await?;
        let registration = Registration {
            name: name.clone(),
            kubectl: ctx.bin("kubectl"),
            kubeconfig: ctx.kubeconfig().to_path_buf(),
        };
        let mut probe = self.entity("probe", json!({"code": "probe"}));
        probe
            .annotations_mut()
            .insert(PROBE_ANNOTATION.into(), "e2e".into());
        let dry = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        let todos = self.entities(ctx);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match todos.create(&dry, &probe).await {
                Err(e) if e.to_string().contains(DENIAL_MARKER) => return Ok(registration),
                // Admitted: the API server has not seen the registration yet.
                other => ensure!(
                    Instant::now() < deadline,
                    "the API server never called the webhook: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Deletes the registration when the test ends (before its webhook stops), so that the
/// namespace can go.
struct Registration {
    name: String,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "delete",
                "validatingwebhookconfiguration",
                &self.name,
                "--ignore-not-found",
                "--wait=false",
            ])
            .output();
    }
}

/// Writes a Secret volume the way the kubelet does: files in `..genN`, an atomic `..data`
/// symlink swap, and `tls.crt` → `..data/tls.crt`.
fn write_secret_volume(
    dir: &Path,
    serving: &Serving,
    ca: &Ca,
    generation: u32,
) -> anyhow::Result<()> {
    use std::os::unix::fs::symlink;
    let data = format!("..gen{generation}");
    std::fs::create_dir_all(dir.join(&data))?;
    std::fs::write(dir.join(&data).join("tls.crt"), &serving.cert_pem)?;
    std::fs::write(dir.join(&data).join("tls.key"), &serving.key_pem)?;
    std::fs::write(dir.join(&data).join("ca.crt"), &ca.cert_pem)?;
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&data, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        if std::fs::symlink_metadata(dir.join(key)).is_err() {
            symlink(format!("..data/{key}"), dir.join(key))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The webhook process, and talking to it over HTTPS
// ---------------------------------------------------------------------------------------------

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

struct Webhook {
    name: String,
    process: Mutex<Process>,
    port: u16,
    client: HttpsClient,
}

impl Webhook {
    fn alive(&self) -> bool {
        self.process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .exited()
            .is_none()
    }

    fn pid(&self) -> u32 {
        self.process.lock().unwrap_or_else(|p| p.into_inner()).pid()
    }

    fn log_tail(&self) -> String {
        self.process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .log_tail(40)
    }

    async fn request(
        &self,
        method: http::Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> anyhow::Result<(u16, String)> {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("https://127.0.0.1:{}{path}", self.port));
        if let Some(ct) = content_type {
            request = request.header(http::header::CONTENT_TYPE, ct);
        }
        let request = request.body(Full::new(Bytes::from(body)))?;
        let response = tokio::time::timeout(Duration::from_secs(30), self.client.request(request))
            .await
            .context("the webhook did not answer within 30s")??;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.request(http::Method::GET, path, None, Vec::new())
            .await
    }

    async fn post(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> anyhow::Result<(u16, String)> {
        self.request(http::Method::POST, path, content_type, body)
            .await
    }

    /// Admission requests of `operation` this replica answered (any result).
    async fn admissions(&self, operation: &str) -> anyhow::Result<u64> {
        let text = self.get("/metrics").await?.1;
        let prefix = format!(r#"kab_webhook_requests_total{{operation="{operation}""#);
        Ok(text
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum())
    }
}

fn https_client(ca_pem: &str) -> anyhow::Result<HttpsClient> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls::client_config(ca_pem)?)
        .https_only()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector))
}

/// The DER of the leaf certificate a fresh TLS handshake with the webhook presents.
async fn presented(port: u16, ca_pem: &str) -> anyhow::Result<Vec<u8>> {
    tls::presented(&format!("127.0.0.1:{port}"), "127.0.0.1", ca_pem).await
}

/// A TCP balancer alternating connections between two backends, like a Service in front of
/// two pods (TLS passes through: each replica serves the same certificate).
struct RoundRobin {
    port: u16,
    counts: Arc<[AtomicUsize; 2]>,
    task: tokio::task::JoinHandle<()>,
}

impl RoundRobin {
    async fn start(backends: [u16; 2]) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let counts: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let next = Arc::new(AtomicUsize::new(0));
        let task = {
            let counts = counts.clone();
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let i = next.fetch_add(1, Ordering::Relaxed) % 2;
                    counts[i].fetch_add(1, Ordering::Relaxed);
                    let backend = backends[i];
                    tokio::spawn(async move {
                        if let Ok(mut outbound) =
                            tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                        {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
            })
        };
        Ok(RoundRobin { port, counts, task })
    }

    fn connections(&self) -> [usize; 2] {
        [
            self.counts[0].load(Ordering::Relaxed),
            self.counts[1].load(Ordering::Relaxed),
        ]
    }
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The business application of the external rules: `/strict` refuses code `no`, sleeps on
/// `slow`, answers 503 on `boom`; `/lenient` sleeps on `slow-lenient`; both allow the rest.
struct BusinessApp {
    url: String,
    payloads: Arc<Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl BusinessApp {
    async fn start() -> anyhow::Result<Self> {
        use axum::Json;
        use axum::extract::State;
        use axum::routing::post;
        type Payloads = Arc<Mutex<Vec<Value>>>;
        fn record(p: &Payloads, body: &Value) -> String {
            p.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(body.clone());
            body["object"]["spec"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        }
        async fn strict(
            State(p): State<Payloads>,
            Json(body): Json<Value>,
        ) -> axum::response::Response {
            use axum::response::IntoResponse as _;
            match record(&p, &body).as_str() {
                "no" => Json(json!({"allowed": false, "message": "the app refuses code no"}))
                    .into_response(),
                "slow" => {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    Json(json!({"allowed": true})).into_response()
                }
                "boom" => (http::StatusCode::SERVICE_UNAVAILABLE, "down").into_response(),
                _ => Json(json!({"allowed": true})).into_response(),
            }
        }
        async fn lenient(State(p): State<Payloads>, Json(body): Json<Value>) -> Json<Value> {
            if record(&p, &body) == "slow-lenient" {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            Json(json!({"allowed": true}))
        }
        let payloads: Payloads = Arc::default();
        let router = axum::Router::new()
            .route("/strict", post(strict))
            .route("/lenient", post(lenient))
            .with_state(payloads.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(BusinessApp {
            url,
            payloads,
            task,
        })
    }

    fn calls(&self) -> usize {
        self.payloads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// What the app was sent after its first `calls` calls.
    fn sent_since(&self, calls: usize) -> Vec<Value> {
        self.payloads.lock().unwrap_or_else(|p| p.into_inner())[calls..].to_vec()
    }
}

impl Drop for BusinessApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

async fn create(
    api: &Api<DynamicObject>,
    object: &DynamicObject,
) -> Result<DynamicObject, kube::Error> {
    api.create(&PostParams::default(), object).await
}

/// Creates `object` once a dry run is admitted: a value freed a moment ago (a delete, or an
/// update that moved it) is refused for the few milliseconds the webhook's watch cache takes to
/// see the change.
async fn create_when_admitted(
    api: &Api<DynamicObject>,
    object: &DynamicObject,
) -> anyhow::Result<DynamicObject> {
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match api.create(&dry, object).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline && e.to_string().contains("is already used by") => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).context(format!("dry-run create of {}", object.name_any())),
        }
    }
    create(api, object)
        .await
        .with_context(|| format!("creating {}", object.name_any()))
}

/// The message of an admission denial (anything else is an error).
fn denial<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> anyhow::Result<String> {
    match result {
        Ok(v) => bail!("admitted, expected a denial: {v:?}"),
        Err(kube::Error::Api(status)) if status.message.contains("denied the request") => {
            Ok(status.message.clone())
        }
        Err(e) => bail!("expected an admission denial, got: {e}"),
    }
}

fn expect(message: &str, part: &str) -> anyhow::Result<()> {
    ensure!(
        message.contains(part),
        "denial {message:?} does not say {part:?}"
    );
    Ok(())
}

fn holder(lease: &Lease) -> String {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default()
}

/// A claim held by `ghost`, an entity that does not exist, taken at `acquired`.
fn ghost_claim(ns: &str, name: &str, acquired: Timestamp) -> Lease {
    let mut labels: BTreeMap<String, String> = LeaseClaims::labels(STACK, ns);
    labels.insert(LABEL_RULE.into(), "unique-code".into());
    Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("ghost".into()),
            acquire_time: Some(MicroTime(acquired)),
            ..LeaseSpec::default()
        }),
    }
}

/// The value of the metric line starting with `series` (0 when absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    samples.sort();
    let i = ((samples.len() * p).div_ceil(100)).clamp(1, samples.len()) - 1;
    samples[i]
}
