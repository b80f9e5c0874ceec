//! The local workload runtime: pods the scheduler binds to the `kab-local` node run as real local
//! processes from the specs the operator rendered; readiness follows real probes; a crashing
//! process is a failing pod; Services reach local pods.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, ensure};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kab::api::KabStack;
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

use crate::support::http::http_get;
use crate::support::tls;
use crate::support::{
    Ctx, Runtime, Test, apply_stack, condition, e2e_tests, local_namespace, operator, runtime,
    todo_stack, wait_condition, wait_for,
};

pub fn tests() -> Vec<Test> {
    let mut tests = e2e_tests![
        a_non_kab_image_is_reported_not_runnable,
        the_managed_broker_runs_as_a_real_nats_server,
        a_killed_process_makes_its_pod_unready_and_is_restarted,
        the_real_webhook_denies_through_the_rendered_service,
        the_admission_probe_is_denied_or_reported_inconclusive,
        a_killed_webhook_degrades_the_stack_until_restarted,
    ];
    tests.push(
        Test::new(
            crate::support::qualified_name(
                module_path!(),
                "the_serving_certificate_rotates_under_load_without_a_failed_admission",
            ),
            the_serving_certificate_rotates_under_load_without_a_failed_admission,
        )
        // Ready, then the first certificate's 2 minutes and a little more.
        .timeout(Duration::from_secs(300)),
    );
    tests
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn a_non_kab_image_is_reported_not_runnable(ctx: Ctx) -> anyhow::Result<()> {
    let ns = local_namespace(&ctx, "rt-foreign").await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client(), &ns);
    let mut pod = crate::support::fixtures::pod("web", &[("app", "web")]);
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers[0].image = Some("docker.io/library/nginx:1.27".into());
    }
    pods.create(&PostParams::default(), &pod).await?;
    let p = wait_for(
        &pods,
        "web",
        |p: Option<&Pod>| {
            p.and_then(|p| p.status.as_ref())
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.state
                            .as_ref()
                            .and_then(|s| s.waiting.as_ref())
                            .and_then(|w| w.reason.as_deref())
                            == Some("NotRunnableLocally")
                    })
                })
        },
        Duration::from_secs(60),
    )
    .await?;
    ensure!(p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(kab::runtime::NODE_NAME));
    ensure!(!pod_ready(&p), "a pod that cannot run must not be Ready");
    ensure!(p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Pending"));
    Ok(())
}

/// A stack with only a managed broker part checked: the StatefulSet's pod runs the real
/// nats-server with the rendered configuration, its readiness comes from NATS's /healthz, and the
/// Service reaches it.
async fn the_managed_broker_runs_as_a_real_nats_server(ctx: Ctx) -> anyhow::Result<()> {
    operator(&ctx).await?;
    let rt = runtime(&ctx).await?;
    let ns = local_namespace(&ctx, "rt-broker").await?;
    let mut stack = todo_stack(&ns, "todo", &format!("{ns}.e2e.example.com"))?;
    stack["spec"]["rules"] = json!([]);
    stack["spec"]["webhook"]["failurePolicy"] = json!("Ignore");
    apply_stack(&ctx, &stack).await?;
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client(), &ns);
    wait_for(
        &sts,
        "todo-broker",
        |s: Option<&StatefulSet>| {
            s.and_then(|s| s.status.as_ref())
                .and_then(|s| s.ready_replicas)
                == Some(1)
        },
        Duration::from_secs(90),
    )
    .await
    .context("broker not ready")?;
    let nats = rt
        .processes()
        .into_iter()
        .find(|p| p.namespace == ns && p.pod == "todo-broker-0")
        .context("no local process for the broker pod")?;
    let pid = nats.pid.context("broker process not running")?;
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))?.replace('\0', " ");
    ensure!(
        cmdline.contains("nats-server") && cmdline.contains("nats.conf"),
        "broker command line: {cmdline}"
    );
    // The Service reaches it: the NATS monitoring endpoint through the ClusterIP.
    let svc = Api::<k8s_openapi::api::core::v1::Service>::namespaced(ctx.client(), &ns)
        .get("todo-broker")
        .await?;
    let ip = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .context("no ClusterIP")?;
    let (status, body) = http_get(&format!("{ip}:8222"), "/healthz").await?;
    ensure!(
        status == 200,
        "NATS /healthz through the Service: {status} {body}"
    );
    wait_condition(&ctx, &ns, "todo", "BrokerReady", Duration::from_secs(30)).await?;
    Ok(())
}

/// Killing a process makes its pod un-ready (the Deployment loses availability), the runtime
/// restarts it with a restart count, and the pod becomes Ready again.
async fn a_killed_process_makes_its_pod_unready_and_is_restarted(ctx: Ctx) -> anyhow::Result<()> {
    operator(&ctx).await?;
    let rt = runtime(&ctx).await?;
    let ns = local_namespace(&ctx, "rt-kill").await?;
    let mut stack = todo_stack(&ns, "todo", &format!("{ns}.e2e.example.com"))?;
    stack["spec"]["rules"] = json!([]);
    stack["spec"]["webhook"]["failurePolicy"] = json!("Ignore");
    apply_stack(&ctx, &stack).await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client(), &ns);
    let broker = wait_for(
        &pods,
        "todo-broker-0",
        |p: Option<&Pod>| p.is_some_and(pod_ready),
        Duration::from_secs(90),
    )
    .await
    .context("broker pod not Ready")?;
    let restarts = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .map(|c| c.restart_count)
            .unwrap_or(0)
    };
    let before = restarts(&broker);
    let pid = rt
        .processes()
        .into_iter()
        .find(|p| p.namespace == ns && p.pod == "todo-broker-0")
        .and_then(|p| p.pid)
        .context("no broker process")?;
    // SAFETY: kill(2) of a process the runtime started for this test's pod.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    wait_for(
        &pods,
        "todo-broker-0",
        |p: Option<&Pod>| p.is_some_and(|p| !pod_ready(p)),
        Duration::from_secs(30),
    )
    .await
    .context("pod still Ready after its process was killed")?;
    let back = wait_for(
        &pods,
        "todo-broker-0",
        move |p: Option<&Pod>| p.is_some_and(|p| pod_ready(p) && restarts(p) > before),
        Duration::from_secs(60),
    )
    .await
    .context("pod not restarted and Ready again")?;
    ensure!(
        restarts(&back) == before + 1,
        "restart count {}",
        restarts(&back)
    );
    Ok(())
}

/// A stack whose rules the real webhook process enforces; the API server reaches it through the
/// Service the operator rendered, verifying its certificate for `<svc>.<ns>.svc`.
fn ruled_stack(ns: &str) -> anyhow::Result<serde_json::Value> {
    let mut stack = todo_stack(ns, "todo", &format!("{ns}.e2e.example.com"))?;
    // No external rule: there is no business application in this test.
    stack["spec"]["rules"] = json!([
        {"name": "unique-code", "unique": {"fields": ["spec.code"]}},
        {"name": "code-immutable", "immutable": {"fields": ["spec.code"]}},
    ]);
    stack["spec"]["controller"] = json!({"replicas": 1});
    Ok(stack)
}

/// The admission probe's two passing verdicts, on real webhook processes: a probe entity the
/// webhook denies (the path works), and one the entity's schema refuses before any webhook is
/// called (a `pattern` kab's minimal probe object cannot satisfy: 422, inconclusive). Both make
/// `WebhookReady=True`, and the `AdmissionProbe` row says which proof was used.
async fn the_admission_probe_is_denied_or_reported_inconclusive(ctx: Ctx) -> anyhow::Result<()> {
    operator(&ctx).await?;
    let plain = local_namespace(&ctx, "rt-probe").await?;
    let patterned = local_namespace(&ctx, "rt-probe-422").await?;
    apply_stack(&ctx, &ruled_stack(&plain)?).await?;
    let mut stack = ruled_stack(&patterned)?;
    stack["spec"]["entity"]["versions"][0]["schema"]["properties"]["code"]["pattern"] =
        json!("^[A-Z]+-[0-9]+$");
    apply_stack(&ctx, &stack).await?;
    for (ns, expected) in [
        (&plain, "denied as expected"),
        (
            &patterned,
            "inconclusive: the API server refused the probe entity",
        ),
    ] {
        let stacks: Api<KabStack> = Api::namespaced(ctx.client(), ns);
        let row = |s: &KabStack| {
            s.status
                .as_ref()
                .and_then(|st| st.components.iter().find(|c| c.kind == "AdmissionProbe"))
                .cloned()
        };
        let s = wait_for(
            &stacks,
            "todo",
            |s: Option<&KabStack>| {
                s.is_some_and(|s| {
                    condition(s, "WebhookReady").is_some_and(|c| c.0 == "True")
                        && row(s).is_some_and(|r| r.ready)
                })
            },
            Duration::from_secs(90),
        )
        .await
        .with_context(|| format!("{ns}: WebhookReady with a passing AdmissionProbe row"))?;
        let row = row(&s).context("no AdmissionProbe row")?;
        ensure!(
            row.message.contains(expected),
            "{ns}: the AdmissionProbe row must say {expected:?}: {:?}",
            row.message
        );
    }
    // The pattern holds for real entities: the webhook still enforces the rules behind it.
    a_duplicate_code_is_denied(&ctx, &patterned, "AB-1").await?;
    Ok(())
}

/// Creates a Todo with `code` in `ns` (a ruled stack's namespace), then another with the same
/// code, which the stack's webhook must deny naming the rule; returns the denial.
async fn a_duplicate_code_is_denied(ctx: &Ctx, ns: &str, code: &str) -> anyhow::Result<String> {
    let group = format!("{ns}.e2e.example.com");
    let todo = |name: &str| {
        format!(
            "apiVersion: {group}/v1\nkind: Todo\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{code: \"{code}\", message: hi}}\n"
        )
    };
    ctx.kubectl_with_stdin(["create", "-f", "-"], &todo("first"))
        .await
        .context("a valid entity must be admitted")?;
    let denied = ctx
        .kubectl_with_stdin(["create", "-f", "-"], &todo("second"))
        .await;
    let err = format!(
        "{:#}",
        denied.err().context("a duplicate code must be denied")?
    );
    ensure!(
        err.contains("unique-code"),
        "the denial must name the rule: {err}"
    );
    Ok(err)
}

async fn the_real_webhook_denies_through_the_rendered_service(ctx: Ctx) -> anyhow::Result<()> {
    operator(&ctx).await?;
    let ns = local_namespace(&ctx, "rt-webhook").await?;
    let stack = ruled_stack(&ns)?;
    apply_stack(&ctx, &stack).await?;
    let stacks: Api<KabStack> = Api::namespaced(ctx.client(), &ns);
    wait_condition(&ctx, &ns, "todo", "WebhookReady", Duration::from_secs(90))
        .await
        .context("webhook not ready")?;
    let group = format!("{ns}.e2e.example.com");
    let err = a_duplicate_code_is_denied(&ctx, &ns, "A-1").await?;
    ensure!(
        err.contains("denied the request"),
        "the denial must come from the admission webhook: {err}"
    );

    // The registration's matchCondition scopes it to the stack's namespace: an entity write in
    // another namespace never reaches the stack's webhook (which would admit it with a warning
    // that it "was not validated": kubectl prints the API server's warnings on stderr).
    let other = ctx.namespace("rt-webhook-other").await?;
    let mut create = tokio::process::Command::new(ctx.bin("kubectl"));
    create
        .arg("--kubeconfig")
        .arg(ctx.kubeconfig())
        .args(["create", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = create.spawn()?;
    if let Some(mut input) = child.stdin.take() {
        use tokio::io::AsyncWriteExt as _;
        input
            .write_all(
                format!(
                    "apiVersion: {group}/v1\nkind: Todo\nmetadata: {{name: elsewhere, namespace: {other}}}\nspec: {{code: \"A-1\", message: hi}}\n"
                )
                .as_bytes(),
            )
            .await?;
    }
    let out = child.wait_with_output().await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && !stderr.contains("was not validated"),
        "an entity write in namespace {other} reached the webhook of the stack in {ns}: {stderr}"
    );

    // The claim of the first entity's code is owned by the stack, and goes with it (Kubernetes'
    // garbage collector: up to ~30 s here, as it learns of the KabStack resource, installed
    // after kube-controller-manager started, at its next discovery resync).
    let leases: Api<Lease> = Api::namespaced(ctx.client(), &ns);
    let selector = kab::webhook::claims::LeaseClaims::selector("todo", &ns);
    let claims = leases
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    let uid = stacks
        .get("todo")
        .await?
        .metadata
        .uid
        .context("stack uid")?;
    let [claim] = claims.as_slice() else {
        anyhow::bail!("one claim expected (code A-1), found {claims:?}");
    };
    ensure!(
        claim
            .owner_references()
            .iter()
            .any(|o| o.kind == "KabStack" && o.uid == uid),
        "the claim is not owned by the stack: {:?}",
        claim.metadata.owner_references
    );
    stacks.delete("todo", &DeleteParams::default()).await?;
    crate::support::wait_deleted(&stacks, "todo", Duration::from_secs(60)).await?;
    crate::support::wait_deleted(&leases, &claim.name_any(), Duration::from_secs(60))
        .await
        .context("the claim outlived its stack")?;
    Ok(())
}

async fn a_killed_webhook_degrades_the_stack_until_restarted(ctx: Ctx) -> anyhow::Result<()> {
    operator(&ctx).await?;
    let rt = runtime(&ctx).await?;
    let ns = local_namespace(&ctx, "rt-degrade").await?;
    apply_stack(&ctx, &ruled_stack(&ns)?).await?;
    let stacks: Api<KabStack> = Api::namespaced(ctx.client(), &ns);
    let ready = |s: Option<&KabStack>| s.is_some_and(|s| kab::health::ready(s.status.as_ref()));
    wait_for(&stacks, "todo", ready, Duration::from_secs(120))
        .await
        .context("stack not Ready with real processes")?;
    let victim = rt
        .processes()
        .into_iter()
        .find(|p| p.namespace == ns && p.pod.starts_with("todo-webhook-") && p.pid.is_some())
        .context("no webhook process")?;
    // SAFETY: kill(2) of a process the runtime started for this test's pod.
    unsafe {
        libc::kill(victim.pid.unwrap_or_default() as libc::pid_t, libc::SIGKILL);
    }
    let degraded = wait_for(
        &stacks,
        "todo",
        |s: Option<&KabStack>| {
            s.and_then(|s| s.status.as_ref()).and_then(|s| s.phase)
                == Some(kab::api::Phase::Degraded)
        },
        Duration::from_secs(60),
    )
    .await
    .context("stack not Degraded after its webhook process was killed")?;
    let msg = degraded
        .status
        .as_ref()
        .and_then(|s| kab::status::condition(s, "Ready"))
        .map(|c| c.message.clone())
        .unwrap_or_default();
    ensure!(
        msg.contains(&format!("{ns}/todo-webhook")) && msg.contains(&victim.pod),
        "Degraded must name the pod: {msg}"
    );
    wait_for(&stacks, "todo", ready, Duration::from_secs(90))
        .await
        .context("the restart did not bring the stack back")?;
    Ok(())
}

/// The local address a webhook process serves HTTPS on (the runtime gives it `KAB_LISTEN_ADDR`).
fn listen_addr(pid: u32) -> anyhow::Result<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ"))
        .with_context(|| format!("reading the environment of process {pid}"))?;
    environ
        .split(|b| *b == 0)
        .find_map(|v| v.strip_prefix(b"KAB_LISTEN_ADDR="))
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .with_context(|| format!("process {pid} has no KAB_LISTEN_ADDR"))
}

/// Waits until every webhook pod of `ns` presents certificate `want` (DER) in a TLS handshake
/// verified against `ca_pem` for the webhook Service's name; how long that took. The error names
/// what each pod presents instead.
async fn until_every_webhook_presents(
    rt: &Runtime,
    ns: &str,
    want: &[u8],
    ca_pem: &str,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let server_name = format!("todo-webhook.{ns}.svc");
    loop {
        let mut wrong = Vec::new();
        let pods: Vec<_> = rt
            .processes()
            .into_iter()
            .filter(|p| p.namespace == ns && p.pod.starts_with("todo-webhook-"))
            .collect();
        for p in &pods {
            let got = match p.pid {
                None => Err(anyhow::anyhow!("no process")),
                Some(pid) => match listen_addr(pid) {
                    Ok(addr) => tls::presented(&addr, &server_name, ca_pem).await,
                    Err(e) => Err(e),
                },
            };
            match got {
                Ok(der) if der == want => {}
                Ok(der) => wrong.push(format!("{} presents {}", p.pod, tls::describe(&der))),
                Err(e) => wrong.push(format!("{}: {e:#}", p.pod)),
            }
        }
        if pods.len() == 2 && wrong.is_empty() {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < timeout,
            "{}s after the Secret changed to {}, not every webhook pod presents it ({} pods): {}",
            timeout.as_secs(),
            tls::describe(want),
            pods.len(),
            wrong.join("; ")
        );
        // The webhook checks its certificate files every 2 s: nothing to watch from here.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// With a 2-minute serving certificate renewed 80 s before expiry, the operator rotates it every
/// 40 s; the runtime projects the new Secret into the running webhook pods the way the kubelet
/// does and the webhook reloads it. After each rotation every webhook pod presents the Secret's
/// new certificate (read from a TLS handshake with each pod); a steady stream of entity creates
/// runs past the first certificate's notAfter and sees no failure; the webhook processes are
/// never restarted.
async fn the_serving_certificate_rotates_under_load_without_a_failed_admission(
    ctx: Ctx,
) -> anyhow::Result<()> {
    use futures::TryStreamExt as _;
    use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{ApiResource, DynamicObject};
    use kube::runtime::WatchStreamExt as _;
    operator(&ctx).await?;
    let rt = runtime(&ctx).await?;
    let ns = local_namespace(&ctx, "rt-rotate").await?;
    let mut stack = ruled_stack(&ns)?;
    stack["spec"]["webhook"]["certificate"] = json!({"validity": "2m", "renewBefore": "80s"});
    apply_stack(&ctx, &stack).await?;
    let stacks: Api<KabStack> = Api::namespaced(ctx.client(), &ns);
    let ready = |s: Option<&KabStack>| s.is_some_and(|s| kab::health::ready(s.status.as_ref()));
    wait_for(&stacks, "todo", ready, Duration::from_secs(120))
        .await
        .context("stack not Ready")?;
    let webhooks = |rt: &Runtime| -> Vec<(String, Option<u32>, i32)> {
        let mut v: Vec<_> = rt
            .processes()
            .into_iter()
            .filter(|p| p.namespace == ns && p.pod.starts_with("todo-webhook-"))
            .map(|p| (p.pod, p.pid, p.restarts))
            .collect();
        v.sort();
        v
    };
    let before = webhooks(&rt);
    ensure!(
        before.len() == 2 && before.iter().all(|w| w.1.is_some()),
        "webhook processes: {before:?}"
    );

    // What the API server trusts: the registration's caBundle (the CA stays; the leaf rotates).
    let reg = Api::<ValidatingWebhookConfiguration>::all(ctx.client())
        .get(&format!("todo.{ns}.kab.dev"))
        .await?;
    let ca_pem = reg
        .webhooks
        .iter()
        .flatten()
        .next()
        .and_then(|w| w.client_config.ca_bundle.as_ref())
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .context("no caBundle in the registration")?;
    let leaf = |s: &Secret| -> anyhow::Result<Vec<u8>> {
        let pem = s
            .data
            .as_ref()
            .and_then(|d| d.get("tls.crt"))
            .context("no tls.crt in the Secret")?;
        tls::der(&String::from_utf8_lossy(&pem.0))
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client(), &ns);
    let first = leaf(&secrets.get("todo-webhook-tls").await?)?;
    let first_not_after = tls::not_after(&first)?;
    let check = Duration::from_secs(30);
    until_every_webhook_presents(&rt, &ns, &first, &ca_pem, check).await?;

    // The load: a steady stream of creates, until told to stop.
    let group = format!("{ns}.e2e.example.com");
    let resource = ApiResource {
        group: group.clone(),
        version: "v1".into(),
        api_version: format!("{group}/v1"),
        kind: "Todo".into(),
        plural: "todos".into(),
    };
    let todos: Api<DynamicObject> = Api::namespaced_with(ctx.client(), &ns, &resource);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut created, mut failed, mut last_ok) = (0u32, Vec::new(), None);
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let obj: DynamicObject = serde_json::from_value(json!({
                    "apiVersion": format!("{group}/v1"), "kind": "Todo",
                    "metadata": {"name": format!("t{i}")},
                    "spec": {"code": format!("C-{i}"), "message": "rotating"}
                }))?;
                match todos.create(&PostParams::default(), &obj).await {
                    Ok(_) => {
                        created += 1;
                        last_ok = Some(SystemTime::now());
                    }
                    Err(e) => failed.push(format!("t{i}: {e}")),
                }
                // The write rate of the "steady stream" (a pacing interval, not a synchronisation).
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            anyhow::Ok((created, failed, last_ok))
        })
    };

    // Every rotation until the first certificate has expired, and a little past it: each time,
    // every webhook pod presents the new certificate.
    let end = first_not_after + Duration::from_secs(15);
    let mut seen = vec![first];
    let mut lags = Vec::new();
    let mut problem = None;
    {
        let mut changes = std::pin::pin!(
            kube::runtime::watcher::watch_object(secrets.clone(), "todo-webhook-tls")
                .default_backoff()
        );
        while SystemTime::now() < end {
            let left = end
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            let secret = match tokio::time::timeout(left, changes.try_next()).await {
                Err(_) => break, // the end
                Ok(Ok(Some(Some(s)))) => s,
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => {
                    eprintln!("rotation: watch error (retried): {e}");
                    continue;
                }
            };
            let now = match leaf(&secret) {
                Ok(d) => d,
                Err(e) => {
                    problem = Some(e.context("reading the rotated Secret"));
                    break;
                }
            };
            if seen.last() == Some(&now) {
                continue;
            }
            match until_every_webhook_presents(&rt, &ns, &now, &ca_pem, check).await {
                Ok(lag) => lags.push(lag),
                Err(e) => {
                    problem = Some(e.context(format!("after rotation {}", seen.len())));
                    break;
                }
            }
            seen.push(now);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (created, failed, last_ok) = load.await??;
    if let Some(e) = problem {
        return Err(e);
    }
    let rotations = seen.len() - 1;
    eprintln!(
        "certificate rotation: {rotations} rotations, every webhook pod serving each within {:?} \
         (max), {created} admissions, {} failed",
        lags.iter().max().copied().unwrap_or_default(),
        failed.len()
    );
    ensure!(
        rotations >= 2,
        "the serving certificate rotated {rotations} times in the first certificate's lifetime"
    );
    ensure!(
        failed.is_empty(),
        "{} admissions failed during rotation:\n{}",
        failed.len(),
        failed.join("\n")
    );
    ensure!(
        last_ok.is_some_and(|t| t > first_not_after),
        "the load did not run past the first certificate's notAfter ({created} admissions)"
    );
    let after = webhooks(&rt);
    ensure!(
        after == before,
        "the webhook processes were restarted: before {before:?}, after {after:?}"
    );
    Ok(())
}
