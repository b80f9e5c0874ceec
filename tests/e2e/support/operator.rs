//! The operator as the built `kab operator` process, under exactly the RBAC `kab install --print`
//! ships. Shared with the benchmarks (`tests/bench/support.rs`): keep this file free of the e2e
//! context. The instance the e2e tests share is `support::operator(ctx)` (in `stack.rs`).

use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::bail;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kab::plane::{Plane, Process};
use kube::api::Api;

use super::http::{http_get, metric_sum};
use super::wait::wait_for;

/// The operator's identity, as the shipped Deployment gives it (its ServiceAccount).
pub const USER: &str = "system:serviceaccount:kab-system:kab-operator";

/// The groups of that identity.
pub const GROUPS: &[&str] = &[
    "system:serviceaccounts",
    "system:serviceaccounts:kab-system",
    "system:authenticated",
];

/// Installs the KabStack CRD and the operator's RBAC exactly as `kab install --print` ships them
/// (all but the Deployment: the operator runs here as a local process) and waits until the CRD is
/// Established.
pub async fn install(plane: &Plane, image: &str) -> anyhow::Result<()> {
    let manifests = kab::install::manifests(kab::install::NAMESPACE, image)?;
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&manifests)?;
    let kept: Vec<serde_json::Value> = docs
        .into_iter()
        .filter(|d| d["kind"] != "Deployment")
        .collect();
    let yaml = serde_saphyr::to_string_multiple(&kept)?;
    plane.kubectl_stdin(
        &[
            "apply",
            "--server-side",
            "--field-manager=kab-install",
            "-f",
            "-",
        ],
        &yaml,
    )?;
    let crds: Api<CustomResourceDefinition> = Api::all(plane.client());
    wait_for(
        &crds,
        "kabstacks.kab.dev",
        kube::runtime::wait::conditions::is_crd_established(),
        Duration::from_secs(60),
    )
    .await?;
    Ok(())
}

/// How to start the operator.
#[derive(Clone, Debug)]
pub struct Options {
    /// Arguments after the shipped ones (`operator --leader-elect --lease-namespace kab-system
    /// --metrics-addr 127.0.0.1:<free port>`).
    pub extra: Vec<String>,
    /// `RUST_LOG`.
    pub log: String,
    /// A program (with its arguments) the operator runs under, e.g. a profiler.
    pub wrapper: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            extra: Vec::new(),
            log: "info,kab=debug".into(),
            wrapper: None,
        }
    }
}

/// A running `kab operator`.
pub struct Operator {
    process: Mutex<Process>,
    /// Port of its `/healthz`, `/readyz` and `/metrics` on 127.0.0.1.
    pub metrics_port: u16,
}

impl Operator {
    fn process(&self) -> MutexGuard<'_, Process> {
        self.process.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn pid(&self) -> u32 {
        self.process().pid()
    }

    pub fn alive(&self) -> bool {
        self.process().exited().is_none()
    }

    /// Its whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.process().log_path()).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process().log_tail(lines)
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let addr = format!("127.0.0.1:{}", self.metrics_port);
        let (status, body) = http_get(&addr, "/metrics").await?;
        if status != 200 {
            bail!("GET /metrics from the operator: {status} {body}");
        }
        Ok(body)
    }

    /// A counter or gauge from `/metrics` (sum over label sets).
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        Ok(metric_sum(&self.metrics().await?, name))
    }
}

/// Starts the built `kab operator` with the shipped arguments plus `opts.extra`, as a client
/// certificate of the operator's ServiceAccount (nothing but the RBAC [`install`] applied), and
/// waits until its `/readyz` answers 200.
pub async fn start(plane: &Plane, opts: &Options) -> anyhow::Result<Operator> {
    let kubeconfig = plane.write_kubeconfig(USER, GROUPS)?;
    let port = kab::plane::free_port()?;
    // With a wrapper the operator is a grandchild, out of PDEATHSIG's reach: it outlives a killed
    // run.
    let wrapper = opts.wrapper.clone().unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    let mut cmd = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(env!("CARGO_BIN_EXE_kab"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_kab")),
    };
    cmd.args(["operator", "--leader-elect"])
        .args(["--lease-namespace", kab::install::NAMESPACE])
        .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
        .args(&opts.extra)
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", &opts.log);
    let mut process = plane.spawn("operator", cmd)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = process.exited() {
            bail!("kab operator exited ({status}):\n{}", process.log_tail(40));
        }
        if let Ok((200, _)) = http_get(&format!("127.0.0.1:{port}"), "/readyz").await {
            break;
        }
        if Instant::now() > deadline {
            bail!("kab operator not ready in 60 s:\n{}", process.log_tail(40));
        }
        // Nothing to watch: the endpoint is polled.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Operator {
        process: Mutex::new(process),
        metrics_port: port,
    })
}
