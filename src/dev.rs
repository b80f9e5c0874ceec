//! `kab dev`: the README's main job. Starts a local control plane (built on first use) unless
//! told to use the cluster in KUBECONFIG, runs the operator in-process, applies the sample stack,
//! waits until it is Ready while showing progress, tells the user what to do next, and stops
//! everything cleanly on Ctrl-C.

use crate::api::KabStack;
use crate::operator::{self, OperatorConfig};
use crate::plane::{Plane, PlaneOptions};
use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The sample stack applied when no file is given.
pub const SAMPLE_STACK: &str = include_str!("../examples/todo.yaml");

/// Options of `kab dev`.
#[derive(clap::Args, Debug, Clone)]
pub struct DevArgs {
    /// Use the cluster in KUBECONFIG instead of starting a local control plane.
    #[arg(long)]
    pub use_kubeconfig: bool,
    /// The KabStack to apply (default: the built-in sample, examples/todo.yaml).
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Exit once the stack is Ready instead of waiting for Ctrl-C.
    #[arg(long)]
    pub exit_when_ready: bool,
    /// How long to wait for the stack to become Ready.
    #[arg(long, default_value = "300")]
    pub ready_timeout_secs: u64,
}

fn step(msg: &str) {
    eprintln!("==> {msg}");
}

/// Runs `kab dev`.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    // The client's own ERROR lines while the plane's API server starts are noise here.
    crate::telemetry::init_logs(
        crate::telemetry::LogFormat::Text,
        "warn,kube_client::client::builder=off",
    );
    let started = Instant::now();

    let text = match &args.file {
        Some(f) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        None => SAMPLE_STACK.to_string(),
    };
    let mut stack: KabStack =
        serde_saphyr::from_str(&text).context("the stack file is not a valid KabStack")?;
    if let Err(e) = crate::validate::validate(&stack) {
        anyhow::bail!("invalid KabStack: {e}");
    }
    let ns = stack.namespace().unwrap_or_else(|| "default".into());
    stack.metadata.namespace = Some(ns.clone());
    let name = stack.name_any();

    let (plane, client, kubeconfig) = if args.use_kubeconfig {
        step("using the cluster in KUBECONFIG");
        let client = kube::Client::try_default()
            .await
            .context("connecting to the cluster in KUBECONFIG")?;
        (
            None::<Arc<Plane>>,
            client,
            std::env::var("KUBECONFIG").unwrap_or_else(|_| "~/.kube/config".into()),
        )
    } else {
        step(
            "starting a local control plane (etcd, kube-apiserver, controller-manager, scheduler, KWOK); the first run builds them from the Go module proxy, ~7 min",
        );
        let plane = Plane::start(PlaneOptions {
            keep_dir: true,
            ..PlaneOptions::default()
        })
        .await
        .context("starting the local control plane")?;
        let client = plane.client();
        let kc = plane.kubeconfig_path().display().to_string();
        step(&format!(
            "control plane usable after {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        (Some(Arc::new(plane)), client, kc)
    };

    // On the local plane the stack's pods run as local processes (the local runtime is their
    // kubelet); in a real cluster the cluster runs them.
    let mut runtime = match &plane {
        Some(p) => {
            step("starting the local workload runtime (the stack's pods run as local processes)");
            let kab = std::env::current_exe().context("finding the kab executable")?;
            Some(start_runtime(p.clone(), client.clone(), kab).await?)
        }
        None => None,
    };

    step("installing the KabStack CRD");
    crate::install::ensure_crd(&client).await?;

    step("starting the kab operator");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let op_client = client.clone();
    let operator_task = tokio::spawn(async move {
        operator::run(op_client, OperatorConfig::default(), metrics, async {
            let _ = stop_rx.await;
        })
        .await
    });

    step(&format!("applying KabStack {ns}/{name}"));
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut ns_obj = serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}
    });
    if runtime.is_some() {
        ns_obj["metadata"]["annotations"] =
            serde_json::to_value(crate::runtime::namespace_annotations())?;
    }
    namespaces
        .patch(
            &ns,
            &PatchParams::apply("kab-dev").force(),
            &Patch::Apply(&ns_obj),
        )
        .await
        .with_context(|| format!("creating namespace {ns}"))?;
    let stacks: Api<KabStack> = Api::namespaced(client.clone(), &ns);
    let mut body = serde_json::to_value(&stack)?;
    body["metadata"] = serde_json::json!({"name": name, "namespace": ns});
    stacks
        .patch(
            &name,
            &PatchParams::apply("kab-dev").force(),
            &Patch::Apply(&body),
        )
        .await
        .with_context(|| format!("applying KabStack {ns}/{name}"))?;

    let ready = wait_ready(&stacks, &name, Duration::from_secs(args.ready_timeout_secs)).await;
    match &ready {
        Ok(()) => step(&format!(
            "KabStack {ns}/{name} is Ready ({:.1} s after start)",
            started.elapsed().as_secs_f64()
        )),
        Err(e) => eprintln!("!! {e:#}"),
    }

    let entity = &stack.spec.entity;
    let plural = entity.plural();
    let kubectl = plane
        .as_ref()
        .map(|p| p.bin("kubectl").display().to_string())
        .unwrap_or_else(|| "kubectl".into());
    println!();
    println!(
        "kab is running{}.",
        if plane.is_some() {
            " on a local control plane"
        } else {
            ""
        }
    );
    println!("  export KUBECONFIG={kubeconfig}");
    println!("  alias kubectl={kubectl}");
    if let Ok(exe) = std::env::current_exe()
        && crate::cli::program() == "kab"
    {
        println!("  alias kab={}", exe.display());
    }
    println!("  kubectl get kabstacks -n {ns}                 # the stack and its health");
    println!("  kubectl get kabstack {name} -n {ns} -o yaml   # conditions and components");
    println!(
        "  kubectl get {plural}.{} -n {ns}               # the entity API",
        entity.group
    );
    println!(
        "  kubectl explain {plural}.spec --api-version={}/{}",
        entity.group,
        entity
            .storage_version()
            .map(|v| v.name.as_str())
            .unwrap_or("v1")
    );
    println!(
        "  {} status {ns}/{name}   # the tree of its parts and what blocks them (--watch follows it)",
        crate::cli::program()
    );
    println!(
        "  kubectl create -n {ns} -f - <<'EOF'   # a sample {}",
        entity.kind
    );
    for line in crate::cli::hints::sample_entity(&stack) {
        println!("  {line}");
    }
    println!("  EOF");
    for caveat in crate::cli::hints::caveats(&stack) {
        println!("  # {caveat}");
    }
    println!("  # {}", crate::cli::hints::events(&stack));
    if let Some(p) = &plane {
        println!(
            "The stack's pods (webhook, entity controller, NATS) run here as local processes; their logs: {}",
            p.logs_dir().display()
        );
    }
    if args.exit_when_ready {
        let _ = stop_tx.send(());
        let _ = operator_task.await;
        if let Some(rt) = runtime.as_mut() {
            rt.stop();
        }
        if let Some(p) = plane {
            p.stop();
        }
        return ready;
    }
    println!("Press Ctrl-C to stop everything.");
    crate::shutdown_signal().await;
    step("stopping");
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), operator_task).await;
    if let Some(rt) = runtime.as_mut() {
        rt.stop();
    }
    if let Some(p) = plane {
        p.stop();
    }
    step("stopped; nothing is left running");
    Ok(())
}

/// Waits on a watch until the stack is Ready, printing each phase change and what blocks it.
pub async fn wait_ready(api: &Api<KabStack>, name: &str, timeout: Duration) -> anyhow::Result<()> {
    let mut last = String::new();
    let stream = watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .applied_objects()
    .default_backoff();
    futures::pin_mut!(stream);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => anyhow::bail!("KabStack {name} not Ready after {} s (last: {last})", timeout.as_secs()),
            item = stream.next() => {
                let Some(item) = item else { anyhow::bail!("the watch on KabStack {name} ended") };
                let Ok(stack) = item else { continue };
                let status = stack.status.as_ref();
                let phase = status.and_then(|s| s.phase).map(|p| p.as_str()).unwrap_or("Pending");
                let blocker = status
                    .and_then(|s| crate::status::condition(s, "Ready"))
                    .map(|c| c.message.clone())
                    .unwrap_or_else(|| "waiting for the operator's first status".into());
                let line = format!("{phase}: {blocker}");
                if line != last {
                    eprintln!("    {line}");
                    last = line;
                }
                if crate::health::ready(status) {
                    return Ok(());
                }
            }
        }
    }
}

/// Starts the local runtime on a plane: pods run the `kab` binary given and the nats-server the
/// plane built, identities are client certificates from the plane's CA, and the pods' logs go with
/// the plane's.
pub async fn start_runtime(
    plane: Arc<Plane>,
    client: kube::Client,
    kab: PathBuf,
) -> anyhow::Result<crate::runtime::LocalRuntime> {
    let nats = plane.bin("nats-server");
    let dir = plane.dir().join("runtime");
    let p = plane.clone();
    let identity: crate::runtime::IdentityFn =
        Arc::new(move |user, groups| p.write_kubeconfig(user, groups));
    let mut config = crate::runtime::RuntimeConfig::new(dir, kab, nats, identity);
    config.logs = plane.logs_dir().to_path_buf();
    crate::runtime::LocalRuntime::start(client, config).await
}
