//! The commands a person types, run as the built binary against the real plane: `kab status`
//! for Ready, Degraded and invalid stacks (text, JSON, `--watch`), its errors, `kubectl kab` as a
//! plugin, and `kab dev` in a terminal (progress, summary, Ctrl-C leaves nothing behind).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use kab::api::{KabStack, Phase};
use kab::cli::show::label;
use kab::cli::tree::{Node, State, StatusList};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWriteExt as _, BufReader};

use crate::support::{
    Ctx, Test, apply_stack, e2e_tests, local_namespace, operator, qualified_name, todo_stack,
    wait_for,
};

pub fn tests() -> Vec<Test> {
    let mut tests = e2e_tests![
        status_of_a_ready_stack_is_ready_on_every_line_and_watch_follows_it,
        status_of_a_degraded_stack_names_the_crash_looping_webhook,
        status_of_an_invalid_stack_names_the_invalid_field,
        status_errors_say_what_to_do,
        kubectl_kab_status_works_as_a_plugin,
    ];
    // `kab dev` starts a plane of its own.
    tests.push(
        Test::new(
            qualified_name(
                module_path!(),
                "kab_dev_in_a_terminal_shows_progress_and_the_summary",
            ),
            kab_dev_in_a_terminal_shows_progress_and_the_summary,
        )
        .timeout(Duration::from_secs(150)),
    );
    tests.push(
        Test::new(
            qualified_name(
                module_path!(),
                "ctrl_c_stops_kab_dev_and_leaves_nothing_running",
            ),
            ctrl_c_stops_kab_dev_and_leaves_nothing_running,
        )
        .timeout(Duration::from_secs(150)),
    );
    tests
}

const KAB: &str = env!("CARGO_BIN_EXE_kab");
const WAIT: Duration = Duration::from_secs(90);

/// Output of one run of the built binary.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `kab ARGS` with the plane's admin kubeconfig (and `env`), with a deadline.
async fn kab(ctx: &Ctx, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Run> {
    let mut cmd = tokio::process::Command::new(KAB);
    cmd.args(args)
        .env("KUBECONFIG", ctx.kubeconfig())
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .with_context(|| format!("kab {} did not finish in 30 s", args.join(" ")))??;
    Ok(Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

async fn kab_ok(ctx: &Ctx, args: &[&str]) -> anyhow::Result<String> {
    let run = kab(ctx, args, &[]).await?;
    ensure!(
        run.ok,
        "kab {} failed:\n{}{}",
        args.join(" "),
        run.stdout,
        run.stderr
    );
    Ok(run.stdout)
}

/// A line of the text tree: its label (tree drawing removed), STATE and DETAIL cells.
#[derive(Debug)]
struct Line {
    label: String,
    state: String,
    detail: String,
}

/// Parses the text tree by the header's columns.
fn parse_text(out: &str) -> anyhow::Result<Vec<Line>> {
    let mut lines = out.lines();
    let header: Vec<char> = lines.next().context("no header")?.chars().collect();
    let find = |word: &str| {
        let w: Vec<char> = word.chars().collect();
        header
            .windows(w.len())
            .position(|x| x == w.as_slice())
            .with_context(|| format!("no {word} column in the header"))
    };
    let (state_at, detail_at) = (find("STATE")?, find("DETAIL")?);
    let mut rows = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        ensure!(!line.contains('\x1b'), "colour in a pipe: {line:?}");
        let chars: Vec<char> = line.chars().collect();
        let cell = |from: usize, to: usize| -> String {
            chars
                .get(from.min(chars.len())..to.min(chars.len()))
                .map(|c| c.iter().collect::<String>())
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        rows.push(Line {
            label: cell(0, state_at)
                .trim_start_matches(['│', '├', '└', '─', ' '])
                .to_string(),
            state: cell(state_at, state_at + 11)
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string(),
            detail: cell(detail_at, chars.len()),
        });
    }
    Ok(rows)
}

fn line<'a>(lines: &'a [Line], label: &str) -> anyhow::Result<&'a Line> {
    lines
        .iter()
        .find(|l| l.label == label)
        .with_context(|| format!("no line {label:?} in {lines:#?}"))
}

/// The text and the JSON of a stack carry the same lines in the same order with the same states.
fn same_facts(text: &[Line], tree: &Node) -> anyhow::Result<()> {
    let nodes = tree.lines();
    ensure!(
        nodes.len() == text.len(),
        "{} JSON lines, {} text lines",
        nodes.len(),
        text.len()
    );
    for ((_, n), l) in nodes.iter().zip(text) {
        ensure!(label(n) == l.label, "JSON {} vs text {}", label(n), l.label);
        ensure!(
            n.state.as_str() == l.state,
            "{}: JSON {:?}, text {}",
            l.label,
            n.state,
            l.state
        );
        let reason_shown =
            n.reason.is_empty() || l.detail.contains(&n.reason) || l.state == "Ready";
        ensure!(
            reason_shown,
            "{}: reason {} not shown: {}",
            l.label,
            n.reason,
            l.detail
        );
    }
    Ok(())
}

async fn status_json(ctx: &Ctx, stack: &str) -> anyhow::Result<Node> {
    let out = kab_ok(ctx, &["status", stack, "-o", "json"]).await?;
    serde_json::from_str(&out).with_context(|| format!("-o json is not a status tree:\n{out}"))
}

fn phase_is(p: Phase) -> impl Fn(Option<&KabStack>) -> bool {
    move |s: Option<&KabStack>| s.and_then(|s| s.status.as_ref()).and_then(|s| s.phase) == Some(p)
}

/// Reads lines from `r` until one satisfies `done`, within `timeout`; returns every line read.
async fn read_until<R: AsyncRead + Unpin>(
    r: &mut tokio::io::Lines<BufReader<R>>,
    timeout: Duration,
    mut done: impl FnMut(&str) -> bool,
) -> anyhow::Result<Vec<String>> {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(timeout, async {
        while let Some(l) = r.next_line().await? {
            let l = l.replace('\r', "");
            let stop = done(&l);
            seen.push(l);
            if stop {
                return Ok::<bool, std::io::Error>(true);
            }
        }
        Ok(false)
    })
    .await;
    match found {
        Ok(Ok(true)) => Ok(seen),
        Ok(Ok(false)) => bail!(
            "output ended before the expected line:\n{}",
            seen.join("\n")
        ),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => bail!(
            "expected line not seen in {} s:\n{}",
            timeout.as_secs(),
            seen.join("\n")
        ),
    }
}

async fn status_of_a_ready_stack_is_ready_on_every_line_and_watch_follows_it(
    ctx: Ctx,
) -> anyhow::Result<()> {
    operator(&ctx).await?;
    // Its pods run as local processes, so the operator's admission probe reaches a real webhook.
    let ns = local_namespace(&ctx, "cli-ready").await?;
    let stack = format!("{ns}/todo");
    apply_stack(
        &ctx,
        &todo_stack(&ns, "todo", &format!("{ns}.e2e.example.com"))?,
    )
    .await?;

    // --watch prints a JSON document per change (stdout is a pipe) until the stack is Ready.
    let mut watch = tokio::process::Command::new(KAB)
        .args(["status", &stack, "--watch", "-o", "json"])
        .env("KUBECONFIG", ctx.kubeconfig())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut frames = BufReader::new(watch.stdout.take().context("stdout")?).lines();
    let mut states = Vec::new();
    read_until(&mut frames, WAIT, |l| {
        let state = serde_json::from_str::<Node>(l).map(|n| n.state).ok();
        states.push(state);
        state == Some(State::Ready)
    })
    .await
    .context("kab status --watch never showed the stack Ready")?;
    ensure!(
        states.iter().all(Option::is_some),
        "a --watch frame is not a tree: {states:?}"
    );
    watch.kill().await?;

    let text = kab_ok(&ctx, &["status", &stack]).await?;
    let lines = parse_text(&text)?;
    for l in &lines {
        ensure!(l.state == "Ready", "not Ready: {l:?}\n{text}");
    }
    for want in [
        format!("KabStack {stack}"),
        "Entity API".into(),
        format!("CustomResourceDefinition todos.{ns}.e2e.example.com"),
        "Webhook".into(),
        format!("Deployment {ns}/todo-webhook"),
        format!("Certificate {ns}/todo-webhook-tls"),
        format!("ValidatingWebhookConfiguration todo.{ns}.kab.dev"),
        "Entity controller".into(),
        format!("Deployment {ns}/todo-controller"),
        "Broker (Managed)".into(),
        format!("StatefulSet {ns}/todo-broker"),
        "Config and RBAC".into(),
    ] {
        line(&lines, &want)?;
    }
    let crd = line(
        &lines,
        &format!("CustomResourceDefinition todos.{ns}.e2e.example.com"),
    )?;
    ensure!(
        crd.detail.contains("Established") && crd.detail.contains(&format!("0 todos in {ns}")),
        "{crd:?}"
    );
    let wh = line(&lines, &format!("Deployment {ns}/todo-webhook"))?;
    ensure!(wh.detail.contains("2/2 available"), "{wh:?}");

    let tree = status_json(&ctx, &stack).await?;
    same_facts(&lines, &tree)?;
    let webhook = tree
        .find("Deployment", Some(&format!("{ns}/todo-webhook")))
        .context("no webhook Deployment in JSON")?;
    ensure!(
        webhook.facts.get("readyReplicas") == Some(&json!(2)),
        "{webhook:?}"
    );
    let cert = tree.find("Certificate", None).context("no Certificate")?;
    ensure!(cert.facts.contains_key("notAfter"), "{cert:?}");

    // -A lists it among every stack; -o yaml and -o dot work.
    let all: StatusList =
        serde_json::from_str(&kab_ok(&ctx, &["status", "-A", "-o", "json"]).await?)?;
    ensure!(
        all.items
            .iter()
            .any(|n| n.name == stack && n.state == State::Ready),
        "-A does not list {stack} Ready"
    );
    let yaml: Node =
        serde_saphyr::from_str(&kab_ok(&ctx, &["status", &stack, "-o", "yaml"]).await?)?;
    ensure!(yaml.state == State::Ready);
    let dot = kab_ok(&ctx, &["status", &stack, "-o", "dot"]).await?;
    ensure!(
        dot.starts_with("digraph kab {") && dot.matches("[label=").count() == lines.len(),
        "{dot}"
    );
    Ok(())
}

async fn status_of_a_degraded_stack_names_the_crash_looping_webhook(
    ctx: Ctx,
) -> anyhow::Result<()> {
    operator(&ctx).await?;
    let ns = ctx.namespace("cli-degraded").await?;
    let stack = format!("{ns}/todo");
    apply_stack(
        &ctx,
        &todo_stack(&ns, "todo", &format!("{ns}.e2e.example.com"))?,
    )
    .await?;
    let stacks: Api<KabStack> = Api::namespaced(ctx.client(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client(), &ns);
    wait_for(
        &deployments,
        "todo-webhook",
        |d: Option<&Deployment>| d.is_some(),
        WAIT,
    )
    .await?;

    // KWOK runs these pods (their processes do not run); its crash-loop label on the webhook's
    // pods, from a field manager of its own, makes them crash-loop.
    let chaos = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "todo-webhook", "namespace": ns},
        "spec": {"template": {"metadata": {"labels": {"kab.dev/simulate": "crash-loop"}}}}
    });
    deployments
        .patch(
            "todo-webhook",
            &PatchParams::apply("e2e-chaos"),
            &Patch::Apply(&chaos),
        )
        .await?;
    // Degraded by the webhook alone: every other part has come up.
    let only_the_webhook_degraded = |s: Option<&KabStack>| {
        let Some(st) = s.and_then(|s| s.status.as_ref()) else {
            return false;
        };
        let ok = |t: &str| kab::status::condition(st, t).is_some_and(|c| c.status == "True");
        st.phase == Some(Phase::Degraded)
            && [
                "EntityAPIReady",
                "ControllerReady",
                "BrokerReady",
                "CertificateValid",
            ]
            .into_iter()
            .all(ok)
    };
    wait_for(&stacks, "todo", only_the_webhook_degraded, WAIT).await?;

    let text = kab_ok(&ctx, &["status", &stack]).await?;
    let lines = parse_text(&text)?;
    let root = line(&lines, &format!("KabStack {stack}"))?;
    ensure!(root.state == "Degraded", "{text}");
    ensure!(
        root.detail.starts_with("WebhookNotReady:")
            && root.detail.contains(&format!("{ns}/todo-webhook"))
            && root.detail.contains("CrashLoopBackOff"),
        "the stack line does not name the blocker:\n{text}"
    );
    ensure!(line(&lines, "Webhook")?.state == "Degraded", "{text}");
    let dep = line(&lines, &format!("Deployment {ns}/todo-webhook"))?;
    ensure!(
        dep.state == "Degraded" && dep.detail.contains("CrashLoopBackOff"),
        "{text}"
    );
    for ready in [
        "Entity API".to_string(),
        "Entity controller".into(),
        format!("Deployment {ns}/todo-controller"),
        "Broker (Managed)".into(),
        "Config and RBAC".into(),
        format!("Certificate {ns}/todo-webhook-tls"),
    ] {
        ensure!(
            line(&lines, &ready)?.state == "Ready",
            "{ready} not Ready:\n{text}"
        );
    }

    let tree = status_json(&ctx, &stack).await?;
    ensure!(tree.state == State::Degraded && tree.reason == "WebhookNotReady");
    let dep = tree
        .find("Deployment", Some(&format!("{ns}/todo-webhook")))
        .context("no webhook Deployment in JSON")?;
    ensure!(
        dep.state == State::Degraded && dep.message.contains("CrashLoopBackOff"),
        "{dep:?}"
    );
    // The JSON was read after the text: the same lines, unless the rollout moved in between.
    same_facts(
        &parse_text(&kab_ok(&ctx, &["status", &stack]).await?)?,
        &status_json(&ctx, &stack).await?,
    )
    .or_else(|_| same_facts(&lines, &tree))?;
    Ok(())
}

async fn status_of_an_invalid_stack_names_the_invalid_field(ctx: Ctx) -> anyhow::Result<()> {
    operator(&ctx).await?;
    let ns = ctx.namespace("cli-invalid").await?;
    let stack = format!("{ns}/broken");
    let mut v = todo_stack(&ns, "broken", &format!("{ns}.e2e.example.com"))?;
    v["spec"]["rules"] = json!([{"name": "u", "unique": {"fields": ["spec.nope"]}}]);
    apply_stack(&ctx, &v).await?;
    let stacks: Api<KabStack> = Api::namespaced(ctx.client(), &ns);
    wait_for(&stacks, "broken", phase_is(Phase::Failed), WAIT).await?;

    let text = kab_ok(&ctx, &["status", &stack]).await?;
    let lines = parse_text(&text)?;
    for l in &lines {
        ensure!(l.state == "Failed", "not Failed: {l:?}\n{text}");
        ensure!(
            l.detail.starts_with("InvalidSpec:"),
            "blocker not named: {l:?}\n{text}"
        );
    }
    let root = line(&lines, &format!("KabStack {stack}"))?;
    ensure!(
        root.detail.contains("spec.rules[0].unique.fields[0]"),
        "the invalid field is not named:\n{text}"
    );
    ensure!(
        line(&lines, &format!("Deployment {ns}/broken-webhook"))?
            .detail
            .contains(&format!(
                "not created: KabStack {stack} is Failed (InvalidSpec)"
            )),
        "{text}"
    );
    let tree = status_json(&ctx, &stack).await?;
    same_facts(&lines, &tree)?;
    ensure!(tree.reason == "InvalidSpec" && tree.message.contains("spec.rules[0]"));
    Ok(())
}

async fn status_errors_say_what_to_do(ctx: Ctx) -> anyhow::Result<()> {
    operator(&ctx).await?;
    let ns = ctx.namespace("cli-errors").await?;

    // An empty namespace: the error names the stack and says there is none.
    let run = kab(&ctx, &["status", &format!("{ns}/todo")], &[]).await?;
    ensure!(!run.ok, "a missing stack is an error");
    ensure!(
        run.stderr
            .contains(&format!("KabStack {ns}/todo not found"))
            && run
                .stderr
                .contains(&format!("there is no KabStack in namespace {ns}")),
        "{}",
        run.stderr
    );

    // A stack exists: the error lists it.
    let mut v = todo_stack(&ns, "orders", &format!("{ns}.e2e.example.com"))?;
    v["spec"]["paused"] = json!(true);
    apply_stack(&ctx, &v).await?;
    let run = kab(&ctx, &["status", "todo", "-n", &ns], &[]).await?;
    ensure!(
        !run.ok
            && run
                .stderr
                .contains(&format!("stacks in namespace {ns}: orders")),
        "{}",
        run.stderr
    );

    // No cluster: say how KUBECONFIG is used.
    let run = kab(
        &ctx,
        &["status", "-A"],
        &[("KUBECONFIG", "/nonexistent/kubeconfig")],
    )
    .await?;
    ensure!(
        !run.ok
            && run.stderr.contains("cannot reach a Kubernetes cluster")
            && run.stderr.contains("KUBECONFIG is /nonexistent/kubeconfig"),
        "{}",
        run.stderr
    );

    // A cluster that does not answer: name the server.
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port(); // closed below
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{port}', insecure-skip-tls-verify: true}}}}]\nusers: [{{name: u, user: {{token: x}}}}]\ncontexts: [{{name: c, context: {{cluster: c, user: u}}}}]\ncurrent-context: c\n"
        ),
    )?;
    let run = kab(
        &ctx,
        &["status", "-A"],
        &[("KUBECONFIG", kubeconfig.to_str().context("path")?)],
    )
    .await?;
    ensure!(
        !run.ok
            && run.stderr.contains(&format!("127.0.0.1:{port}"))
            && run.stderr.contains("does not answer")
            && run.stderr.contains("KUBECONFIG is"),
        "{}",
        run.stderr
    );
    Ok(())
}

async fn kubectl_kab_status_works_as_a_plugin(ctx: Ctx) -> anyhow::Result<()> {
    operator(&ctx).await?;
    let ns = local_namespace(&ctx, "cli-plugin").await?;
    let stack = format!("{ns}/todo");
    apply_stack(
        &ctx,
        &todo_stack(&ns, "todo", &format!("{ns}.e2e.example.com"))?,
    )
    .await?;
    let stacks: Api<KabStack> = Api::namespaced(ctx.client(), &ns);
    wait_for(&stacks, "todo", phase_is(Phase::Ready), WAIT).await?;

    let bin = tempfile::tempdir()?;
    std::os::unix::fs::symlink(KAB, bin.path().join("kubectl-kab"))?;
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let kubectl = |args: Vec<String>| {
        let mut cmd = tokio::process::Command::new(ctx.bin("kubectl"));
        cmd.args(args)
            .env("PATH", &path)
            .env("KUBECONFIG", ctx.kubeconfig())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        async move {
            let out = tokio::time::timeout(Duration::from_secs(30), cmd.output()).await??;
            anyhow::Ok((
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ))
        }
    };
    let (ok, list, err) = kubectl(vec!["plugin".into(), "list".into()]).await?;
    ensure!(
        ok && list.contains("kubectl-kab"),
        "kubectl plugin list: {list}{err}"
    );

    let (ok, out, err) = kubectl(vec!["kab".into(), "status".into(), stack.clone()]).await?;
    ensure!(ok, "kubectl kab status failed: {out}{err}");
    let lines = parse_text(&out)?;
    ensure!(
        line(&lines, &format!("KabStack {stack}"))?.state == "Ready",
        "{out}"
    );
    ensure!(lines.iter().all(|l| l.state == "Ready"), "{out}");

    let (ok, help, err) = kubectl(vec!["kab".into(), "status".into(), "--help".into()]).await?;
    ensure!(
        ok && help.contains("Usage: kubectl kab status"),
        "help should say kubectl kab: {help}{err}"
    );
    let (ok, _, err) = kubectl(vec!["kab".into(), "status".into(), format!("{ns}/nope")]).await?;
    ensure!(
        !ok && err.contains(&format!(
            "KabStack {ns}/nope not found; stacks in namespace {ns}: todo"
        )),
        "{err}"
    );
    Ok(())
}

/// `script` gives the command a pty (`-e`: its exit status, `-f`: flush as it writes).
///
/// `script` runs the command with `$SHELL -c`; the command is `exec`ed so that no shell sits
/// between the terminal and kab. A non-interactive dash (`/bin/sh` here, and `$SHELL` when it
/// is unset) does not exec a lone command and dies of the terminal's SIGINT itself, which
/// `script -e` reports as exit 130 even though kab stopped cleanly.
fn in_a_pty(command: &str, plane_dir: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("script");
    cmd.args(["-qfec", &format!("exec {command}"), "/dev/null"])
        .env("SHELL", "/bin/sh")
        .env("KAB_PLANE_DIR", plane_dir)
        .env_remove("KUBECONFIG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// The plane directory `kab dev` printed (`export KUBECONFIG=<dir>/admin.kubeconfig`).
fn plane_dir_of(output: &[String]) -> anyhow::Result<PathBuf> {
    let kubeconfig = output
        .iter()
        .find_map(|l| l.trim().strip_prefix("export KUBECONFIG="))
        .context("kab dev printed no KUBECONFIG")?;
    Path::new(kubeconfig)
        .parent()
        .map(Path::to_path_buf)
        .context("kubeconfig without a directory")
}

/// Pids whose command line mentions `dir`.
fn processes_under(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

fn expect_progress_and_summary(out: &str) -> anyhow::Result<()> {
    for want in [
        "==> starting a local control plane",
        "==> control plane usable after",
        "==> starting the kab operator",
        "==> applying KabStack shop/todo",
        "==> KabStack shop/todo is Ready",
        "export KUBECONFIG=",
        "kubectl get kabstacks -n shop",
        "kubectl get todos.todo.example.com -n shop",
        "kab status shop/todo",
        "kubectl create -n shop -f - <<'EOF'",
        "kind: Todo",
        "subject kab.shop.todos.>",
        "run here as local processes",
    ] {
        ensure!(out.contains(want), "kab dev did not print {want:?}:\n{out}");
    }
    Ok(())
}

async fn kab_dev_in_a_terminal_shows_progress_and_the_summary(_ctx: Ctx) -> anyhow::Result<()> {
    let planes = tempfile::tempdir()?;
    let started = Instant::now();
    let child = in_a_pty(
        &format!("{KAB} dev --exit-when-ready --ready-timeout-secs 90"),
        planes.path(),
    )
    .spawn()?;
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .context("kab dev --exit-when-ready did not return in 120 s")??;
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    ensure!(
        out.status.success(),
        "kab dev failed ({}):\n{text}",
        out.status
    );
    expect_progress_and_summary(&text)?;
    ensure!(
        !text.contains("Press Ctrl-C"),
        "--exit-when-ready waits for no Ctrl-C:\n{text}"
    );
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let dir = plane_dir_of(&lines)?;
    let left = processes_under(&dir);
    ensure!(
        left.is_empty(),
        "left running after kab dev returned: {left:?}"
    );
    eprintln!(
        "kab dev --exit-when-ready returned after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn ctrl_c_stops_kab_dev_and_leaves_nothing_running(ctx: Ctx) -> anyhow::Result<()> {
    let planes = tempfile::tempdir()?;
    let mut child =
        in_a_pty(&format!("{KAB} dev --ready-timeout-secs 90"), planes.path()).spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut seen = read_until(&mut out, Duration::from_secs(120), |l| {
        l.contains("Press Ctrl-C")
    })
    .await
    .context("kab dev never said Press Ctrl-C")?;
    let dir = plane_dir_of(&seen)?;
    ensure!(
        !processes_under(&dir).is_empty(),
        "no process mentions the plane directory {} while kab dev runs",
        dir.display()
    );
    expect_progress_and_summary(&seen.join("\n"))?;

    // The status hint works on the dev plane.
    let run = kab(
        &ctx,
        &["status", "shop/todo"],
        &[(
            "KUBECONFIG",
            &dir.join("admin.kubeconfig").to_string_lossy(),
        )],
    )
    .await?;
    ensure!(
        run.ok && run.stdout.contains("KabStack shop/todo"),
        "kab status on the dev plane: {}{}",
        run.stdout,
        run.stderr
    );

    // Ctrl-C, as a terminal sends it.
    let pressed = Instant::now();
    stdin.write_all(b"\x03").await?;
    stdin.flush().await?;
    seen.extend(
        read_until(&mut out, Duration::from_secs(60), |l| {
            l.contains("stopped; nothing is left running")
        })
        .await
        .context("kab dev did not stop after Ctrl-C")?,
    );
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .context("kab dev did not exit after Ctrl-C")??;
    let stop_took = pressed.elapsed();
    ensure!(
        status.success(),
        "kab dev exited with {status}:\n{}",
        seen.join("\n")
    );

    // Every process it started is gone (plane components and local workloads all run with the
    // plane directory on their command line).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_under(&dir);
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            return Err(anyhow!("left running after Ctrl-C: {left:#?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "kab dev stopped {:.1} s after Ctrl-C",
        stop_took.as_secs_f64()
    );
    Ok(())
}
