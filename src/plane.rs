//! A real local control plane for `kab dev` and the end-to-end tests.
//!
//! [`Plane::start`] builds (once, cached) and runs etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and KWOK as local processes in a
//! fresh directory with its own PKI and free loopback ports, creates one fake
//! Node and a default StorageClass (PVCs are bound at once, so StatefulSets
//! with `volumeClaimTemplates` run), and returns only when the cluster is
//! really usable: `/readyz` is ok, the Node is Ready and a probe Deployment
//! became Available.
//!
//! Components die with the owning process (PDEATHSIG), also on SIGKILL; a
//! killed run leaves at most its directory, which the next start sweeps.
//! Component output goes to `<dir>/logs/<component>.log`; write requests are
//! audited to [`Plane::audit_log_path`] at Metadata level.

mod components;
mod kubeconfig;
pub mod pki;
mod ports;
mod process;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, GetParams, PostParams};
use kube::runtime::wait::await_condition;
use serde::Deserialize;
use serde_json::json;

use components::{APISERVER, CONTROLLER_MANAGER, ETCD, KWOK, Layout, Ports, SCHEDULER};
pub use components::{AUDIT_POLICY, STORAGE_CLASS};
pub use pki::{Ca, CertPair};
pub use ports::free_port;
pub use process::{Process, log_tail, rss_kib, spawn as spawn_process};

/// The binaries [`Plane::start`] makes available through [`Plane::bin`].
pub const BINARIES: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
    "nats-server",
];

/// The tools `tests/go/build.sh` is asked for.
const TOOLS: &[&str] = &["kubernetes", "etcd", "kwok", "nats"];

/// Name of the fake Node.
pub const NODE_NAME: &str = "kwok-node-0";

/// Namespace of the startup probe Deployment (deleted once it is Available).
pub const PROBE_NAMESPACE: &str = "kab-plane-probe";

/// A file in a plane directory that keeps the sweep of stale planes from
/// deleting it (only its etcd data is removed).
const KEEP_MARKER: &str = "KEEP";

const DIR_PREFIX: &str = "kab-plane-";

/// How a [`Plane`] is started.
#[derive(Clone, Debug)]
pub struct PlaneOptions {
    /// Lift kube-controller-manager's and kube-scheduler's client limits
    /// (`--kube-api-qps=400 --kube-api-burst=800`, 20 Deployment/ReplicaSet
    /// workers): needed by benchmarks, or they measure KCM.
    pub fast_kcm: bool,
    /// Keep the plane directory (logs, audit log, PKI) after stop. Default:
    /// set when the environment has `KAB_KEEP_PLANE=1`.
    pub keep_dir: bool,
    /// Parent of the plane directory. Default: `$KAB_PLANE_DIR`, else the
    /// system temp dir.
    pub base_dir: Option<PathBuf>,
    /// Pod capacity of the fake Node.
    pub node_pods: u32,
    /// Deadline for the whole start (after the binaries are built).
    pub startup_timeout: Duration,
    /// Extra kube-apiserver flags (e.g. `--feature-gates=…`).
    pub apiserver_args: Vec<String>,
    /// Print a line to stderr when the plane is usable (or being retried).
    pub progress: bool,
    /// When the start fails, copy the component logs here too (the plane
    /// directory is kept either way, minus etcd's data).
    pub failure_logs_dir: Option<PathBuf>,
}

impl Default for PlaneOptions {
    fn default() -> Self {
        Self {
            fast_kcm: false,
            keep_dir: std::env::var("KAB_KEEP_PLANE").is_ok_and(|v| !v.is_empty() && v != "0"),
            base_dir: None,
            node_pods: 10_000,
            startup_timeout: Duration::from_secs(180),
            apiserver_args: Vec::new(),
            progress: true,
            failure_logs_dir: None,
        }
    }
}

/// How long each startup phase took, counted from the first component start.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// Running `tests/go/build.sh` (near zero with a warm cache).
    pub binaries: Duration,
    /// Until kube-apiserver's `/readyz` said ok.
    pub apiserver_ready: Duration,
    /// Until the fake Node was Ready.
    pub node_ready: Duration,
    /// Until the probe Deployment was Available: the plane is usable.
    pub usable: Duration,
}

/// A running control plane. Dropping it stops it.
pub struct Plane {
    layout: Layout,
    keep_dir: AtomicBool,
    bins: BTreeMap<String, PathBuf>,
    server: String,
    config: kube::Config,
    client: kube::Client,
    ca: Ca,
    components: Mutex<Vec<Process>>,
    stopped: AtomicBool,
    timings: Timings,
}

impl std::fmt::Debug for Plane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plane")
            .field("dir", &self.layout.dir)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// One write request from the audit log (Metadata level).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuditEvent {
    pub audit_id: String,
    pub stage: String,
    pub verb: String,
    #[serde(rename = "requestURI")]
    pub request_uri: String,
    pub user: AuditUser,
    pub object_ref: Option<AuditObjectRef>,
    pub response_status: Option<AuditStatus>,
    pub user_agent: String,
}

/// The authenticated user of an [`AuditEvent`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct AuditUser {
    pub username: String,
    pub groups: Vec<String>,
}

/// The object an [`AuditEvent`] is about.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuditObjectRef {
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub api_group: String,
    pub api_version: String,
    pub subresource: String,
}

/// The response code of an [`AuditEvent`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct AuditStatus {
    pub code: i32,
}

impl Plane {
    /// Builds missing binaries, starts every component and waits until the
    /// cluster is usable (see the module docs). Retries up to twice with new
    /// ports when a component could not bind its port.
    pub async fn start(opts: PlaneOptions) -> anyhow::Result<Plane> {
        let t0 = Instant::now();
        let bins = binaries().await?;
        let binaries_took = t0.elapsed();
        let base = opts
            .base_dir
            .clone()
            .or_else(|| std::env::var_os("KAB_PLANE_DIR").map(PathBuf::from))
            .unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&base)
            .with_context(|| format!("creating the plane base directory {}", base.display()))?;
        sweep_stale(&base);
        const ATTEMPTS: u32 = 3;
        for attempt in 1..=ATTEMPTS {
            match start_once(&opts, &bins, &base).await {
                Ok(mut plane) => {
                    plane.timings.binaries = binaries_took;
                    if opts.progress {
                        let t = plane.timings;
                        eprintln!(
                            "plane: usable in {:.1}s (apiserver ready {:.1}s, node ready {:.1}s); {}",
                            t.usable.as_secs_f64(),
                            t.apiserver_ready.as_secs_f64(),
                            t.node_ready.as_secs_f64(),
                            plane.dir().display()
                        );
                    }
                    return Ok(plane);
                }
                Err(failure) if failure.port_conflict && attempt < ATTEMPTS => {
                    if opts.progress {
                        eprintln!(
                            "plane: a port was taken by another process, retrying with new ports ({:#})",
                            failure.error
                        );
                    }
                }
                Err(failure) => return Err(failure.error),
            }
        }
        bail!("the control plane did not start (port conflicts in {ATTEMPTS} attempts)")
    }

    /// The admin kubeconfig (`system:masters`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.layout.kubeconfig
    }

    /// An admin client. It is bound to the tokio runtime that started the
    /// plane; use [`Plane::new_client`] from another runtime.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// A fresh admin client on the current tokio runtime.
    pub fn new_client(&self) -> anyhow::Result<kube::Client> {
        kube::Client::try_from(self.config.clone()).context("building a kube client")
    }

    /// The admin client configuration.
    pub fn config(&self) -> &kube::Config {
        &self.config
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server
    }

    /// Runs the plane's `kubectl` with the admin kubeconfig, `stdin` fed to it (e.g. `apply -f
    /// -`); its stdout, or an error with its stderr.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> anyhow::Result<String> {
        use std::io::Write as _;
        let mut child = std::process::Command::new(self.bin("kubectl"))
            .args(args)
            .env("KUBECONFIG", self.kubeconfig_path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting kubectl")?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(stdin.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Path of a built binary, e.g. `kubectl` or `nats-server` (see
    /// [`BINARIES`]). An unknown name yields a path that does not exist.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bins
            .get(name)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(format!("/nonexistent/kab-plane-bin/{name}")))
    }

    /// The plane's directory.
    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }

    /// Where component logs go (`<component>.log`).
    pub fn logs_dir(&self) -> &Path {
        &self.layout.logs
    }

    /// The API server's audit log: one JSON event per write request.
    pub fn audit_log_path(&self) -> &Path {
        &self.layout.audit_log
    }

    /// The CA certificate file (trusted by the API server for client certs).
    pub fn ca_cert_path(&self) -> &Path {
        &self.layout.ca_crt
    }

    /// The plane's CA, to issue e.g. webhook serving certificates.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// How long the start took.
    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// `(component, pid)` of every running component.
    pub fn pids(&self) -> Vec<(String, u32)> {
        let mut procs = crate::lock(&self.components);
        procs
            .iter_mut()
            .filter_map(|p| {
                p.exited()
                    .is_none()
                    .then(|| (p.name().to_string(), p.pid()))
            })
            .collect()
    }

    /// Components that exited although the plane is not stopped (they
    /// should not): `(component, exit status, log file)`.
    pub fn exited_components(&self) -> Vec<(String, String, PathBuf)> {
        if self.stopped.load(Ordering::SeqCst) {
            return Vec::new();
        }
        let mut procs = crate::lock(&self.components);
        procs
            .iter_mut()
            .filter_map(|p| {
                let status = p.exited()?;
                Some((
                    p.name().to_string(),
                    status.to_string(),
                    p.log_path().to_path_buf(),
                ))
            })
            .collect()
    }

    /// Keep (or not) the plane directory after stop.
    pub fn set_keep_dir(&self, keep: bool) {
        self.keep_dir.store(keep, Ordering::SeqCst);
    }

    /// Writes a kubeconfig for a client certificate with user `user` and
    /// `groups` (no groups: the user has only what RBAC grants it) and returns
    /// its path (`<dir>/<user>.kubeconfig`, `:` replaced).
    pub fn write_kubeconfig(&self, user: &str, groups: &[&str]) -> anyhow::Result<PathBuf> {
        let pair = self.ca.client_cert(user, groups)?;
        let text = kubeconfig::render(
            "kab-plane",
            &self.server,
            self.ca.cert_pem(),
            user,
            &pair.cert_pem,
            &pair.key_pem,
        );
        let file: String = user
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = self.layout.dir.join(format!("{file}.kubeconfig"));
        write_private(&path, &text)?;
        Ok(path)
    }

    /// Starts an extra process (e.g. the operator) the same way as the
    /// components: it dies with this process, and its output goes to
    /// `<logs_dir>/<name>.log`. The caller owns it; dropping it stops it.
    pub fn spawn(&self, name: &str, cmd: std::process::Command) -> anyhow::Result<Process> {
        process::spawn(name, cmd, &self.layout.log(name))
    }

    /// Every event of the audit log so far (write requests only).
    pub fn audit_events(&self) -> anyhow::Result<Vec<AuditEvent>> {
        read_audit_log(&self.layout.audit_log)
    }

    /// Copies the component logs and the audit log into `dest` (created).
    pub fn copy_logs_to(&self, dest: &Path) -> anyhow::Result<()> {
        copy_dir_files(&self.layout.logs, dest)?;
        if self.layout.audit_log.exists() {
            std::fs::copy(&self.layout.audit_log, dest.join("audit.log"))
                .context("copying the audit log")?;
        }
        Ok(())
    }

    /// Stops every component (SIGTERM, a few seconds, SIGKILL; waits until
    /// each pid is gone; clients of the API server first, etcd last) and
    /// removes the plane directory unless it is kept. Idempotent. Blocks for
    /// up to a few seconds: from async code, call it via `spawn_blocking`.
    pub fn stop(&self) {
        self.stop_processes();
        if !self.keep_dir.load(Ordering::SeqCst) {
            let _ = std::fs::remove_dir_all(&self.layout.dir);
        } else {
            let _ = std::fs::write(self.layout.dir.join(KEEP_MARKER), "");
        }
    }

    /// Stops the components, copies the logs into `dest`, then cleans up as
    /// [`Plane::stop`] does.
    pub fn stop_keeping_logs(&self, dest: &Path) -> anyhow::Result<()> {
        self.stop_processes();
        let copied = self.copy_logs_to(dest);
        self.stop();
        copied
    }

    fn stop_processes(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut procs = std::mem::take(&mut *crate::lock(&self.components));
        stop_in_order(&mut procs);
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Clients of the API server first (closing their watches lets it exit
/// quickly), then the API server, then etcd.
fn stop_in_order(procs: &mut Vec<Process>) {
    let grace = process::DEFAULT_GRACE;
    for tier in [
        &[KWOK, SCHEDULER, CONTROLLER_MANAGER][..],
        &[APISERVER][..],
        &[ETCD][..],
    ] {
        let mut group: Vec<&mut Process> = procs
            .iter_mut()
            .filter(|p| tier.contains(&p.name()))
            .collect();
        process::stop_all(&mut group, grace);
    }
    let mut rest: Vec<&mut Process> = procs.iter_mut().collect();
    process::stop_all(&mut rest, grace);
    procs.clear();
}

/// The events of the audit log at `path` so far (none when it does not exist yet).
pub fn read_audit_log(path: &Path) -> anyhow::Result<Vec<AuditEvent>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    parse_audit(&text)
}

/// Every complete line of an audit log (a line being written has no newline yet).
fn parse_audit(text: &str) -> anyhow::Result<Vec<AuditEvent>> {
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("audit log line {}", i + 1)))
        .collect()
}

/// Runs `tests/go/build.sh` for every tool (its progress goes to stderr) and
/// maps each binary name to its path.
async fn binaries() -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/go/build.sh");
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .args(TOOLS)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}); its messages are above",
            script.display(),
            out.status
        );
    }
    binaries_from(&String::from_utf8_lossy(&out.stdout))
}

/// Parses build.sh's `<tool> <dir>` lines into binary paths.
fn binaries_from(stdout: &str) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut bins = BTreeMap::new();
    for line in stdout.lines() {
        let Some((_tool, dir)) = line.trim().split_once(' ') else {
            continue;
        };
        let dir = Path::new(dir.trim());
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
        for entry in entries.flatten() {
            if let Some(name) = entry.file_name().to_str() {
                bins.insert(name.to_string(), entry.path());
            }
        }
    }
    let missing: Vec<&str> = BINARIES
        .iter()
        .copied()
        .filter(|b| !bins.contains_key(*b))
        .collect();
    if !missing.is_empty() {
        bail!("tests/go/build.sh did not provide {}", missing.join(", "));
    }
    Ok(bins)
}

/// Removes directories of planes whose owning process is gone (killed runs).
/// A directory with a `KEEP` marker only loses its etcd data.
fn sweep_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        if path.join(KEEP_MARKER).exists() {
            let _ = std::fs::remove_dir_all(path.join("etcd-data"));
        } else {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn make_dir(base: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt as _;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("{DIR_PREFIX}{}-{millis}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("creating {}", dir.display()));
            }
        }
    }
}

/// Copies the files of `from` (not recursive) into `dest` (created).
fn copy_dir_files(from: &Path, dest: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let entries = std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            let to = dest.join(entry.file_name());
            std::fs::copy(entry.path(), &to).with_context(|| {
                format!("copying {} to {}", entry.path().display(), to.display())
            })?;
        }
    }
    Ok(())
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

struct StartFailure {
    error: anyhow::Error,
    port_conflict: bool,
}

/// Everything a start attempt owns until it becomes a [`Plane`]; on failure
/// the processes stop on drop and the directory is kept for its logs (minus
/// etcd's data).
struct Starting {
    layout: Layout,
    procs: Mutex<Vec<Process>>,
}

impl Starting {
    fn spawn(&self, name: &str, bin: &Path, args: Vec<String>) -> anyhow::Result<()> {
        let mut cmd = std::process::Command::new(bin);
        cmd.args(args).current_dir(&self.layout.dir);
        if name == KWOK {
            // Hermetic: KWOK would also load ~/.kwok/kwok.yaml.
            cmd.env("HOME", &self.layout.dir);
        }
        let p = process::spawn(name, cmd, &self.layout.log(name))?;
        crate::lock(&self.procs).push(p);
        Ok(())
    }

    /// The first component that has exited, as an error naming it and its log.
    fn dead(&self) -> Option<anyhow::Error> {
        let mut procs = crate::lock(&self.procs);
        procs.iter_mut().find_map(|p| {
            p.exited().map(|status| {
                anyhow!(
                    "{} exited during startup ({status}); log: {}\n--- last lines of {} ---\n{}",
                    p.name(),
                    p.log_path().display(),
                    p.name(),
                    p.log_tail(30)
                )
            })
        })
    }

    fn tails(&self, names: &[&str]) -> String {
        names
            .iter()
            .map(|n| {
                let log = self.layout.log(n);
                format!(
                    "--- last lines of {n} ({}) ---\n{}",
                    log.display(),
                    log_tail(&log, 15)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs `fut` until `deadline`, failing early when a component exits.
    /// On timeout the error shows the tails of the `blame`d components' logs.
    async fn phase<T>(
        &self,
        what: &str,
        deadline: Instant,
        blame: &[&str],
        fut: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let watchdog = async {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                if let Some(e) = self.dead() {
                    return e;
                }
            }
        };
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            r = tokio::time::timeout(left, fut) => match r {
                Ok(r) => r.with_context(|| format!("control plane startup: {what}")),
                Err(_) => Err(anyhow!(
                    "control plane startup: timed out waiting for {what}\n{}",
                    self.tails(blame)
                )),
            },
            e = watchdog => Err(e.context(format!("control plane startup: {what}"))),
        }
    }

    fn port_conflict(&self) -> bool {
        [ETCD, APISERVER].iter().any(|n| {
            std::fs::read_to_string(self.layout.log(n))
                .is_ok_and(|t| t.contains("address already in use"))
        })
    }

    fn fail(self, error: anyhow::Error, logs_to: Option<&Path>) -> StartFailure {
        let port_conflict = self.port_conflict();
        let mut procs = std::mem::take(&mut *crate::lock(&self.procs));
        stop_in_order(&mut procs);
        if let Some(dest) = logs_to.filter(|_| !port_conflict) {
            let _ = copy_dir_files(&self.layout.logs, dest);
            let _ = std::fs::copy(&self.layout.audit_log, dest.join("audit.log"));
        }
        let _ = std::fs::remove_dir_all(&self.layout.etcd_data);
        if port_conflict {
            let _ = std::fs::remove_dir_all(&self.layout.dir);
        } else {
            let _ = std::fs::write(self.layout.dir.join(KEEP_MARKER), "");
        }
        StartFailure {
            error: error.context(format!(
                "the control plane did not start; its files are in {}",
                self.layout.dir.display()
            )),
            port_conflict,
        }
    }
}

async fn start_once(
    opts: &PlaneOptions,
    bins: &BTreeMap<String, PathBuf>,
    base: &Path,
) -> Result<Plane, StartFailure> {
    let dir = make_dir(base).map_err(|error| StartFailure {
        error,
        port_conflict: false,
    })?;
    let starting = Starting {
        layout: Layout::new(&dir),
        procs: Mutex::new(Vec::new()),
    };
    match run_start(opts, bins, &starting).await {
        Ok((server, config, client, ca, timings)) => Ok(Plane {
            keep_dir: AtomicBool::new(opts.keep_dir),
            bins: bins.clone(),
            server,
            config,
            client,
            ca,
            components: Mutex::new(std::mem::take(&mut *crate::lock(&starting.procs))),
            stopped: AtomicBool::new(false),
            timings,
            layout: starting.layout,
        }),
        Err(error) => Err(starting.fail(error, opts.failure_logs_dir.as_deref())),
    }
}

fn bin<'a>(bins: &'a BTreeMap<String, PathBuf>, name: &str) -> anyhow::Result<&'a PathBuf> {
    bins.get(name)
        .ok_or_else(|| anyhow!("binary {name} is missing from the build cache"))
}

type Started = (String, kube::Config, kube::Client, Ca, Timings);

async fn run_start(
    opts: &PlaneOptions,
    bins: &BTreeMap<String, PathBuf>,
    s: &Starting,
) -> anyhow::Result<Started> {
    let l = &s.layout;
    for d in [&l.logs, &l.pki, &l.stages] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }

    // PKI.
    let ca = Ca::new("kab-plane-ca")?;
    let names = pki::apiserver_names(&components::service_ip());
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let serving = ca.serving_cert("kube-apiserver", &names)?;
    let admin = ca.client_cert("kab-admin", &["system:masters"])?;
    let (sa_key, sa_pub) = pki::service_account_keys()?;
    for (path, text) in [
        (&l.ca_crt, ca.cert_pem()),
        (&l.ca_key, ca.key_pem()),
        (&l.apiserver_crt, serving.cert_pem.as_str()),
        (&l.apiserver_key, serving.key_pem.as_str()),
        (&l.admin_crt, admin.cert_pem.as_str()),
        (&l.admin_key, admin.key_pem.as_str()),
        (&l.sa_key, sa_key.as_str()),
        (&l.sa_pub, sa_pub.as_str()),
    ] {
        write_private(path, text)?;
    }

    // Ports, held until the component that binds them starts.
    let mut reserved = ports::reserve(3)?;
    let ports = Ports {
        etcd_client: reserved[0].port(),
        etcd_peer: reserved[1].port(),
        apiserver: reserved[2].port(),
    };
    let server = format!("https://127.0.0.1:{}", ports.apiserver);

    write_private(
        &l.kubeconfig,
        &kubeconfig::render(
            "kab-plane",
            &server,
            ca.cert_pem(),
            "kab-admin",
            &admin.cert_pem,
            &admin.key_pem,
        ),
    )?;
    write_private(&l.audit_policy, components::AUDIT_POLICY)?;
    for (name, text) in components::STAGES {
        write_private(&l.stages.join(name), text)?;
    }

    let t0 = Instant::now();
    let deadline = t0 + opts.startup_timeout;
    reserved[0].release();
    reserved[1].release();
    s.spawn(ETCD, bin(bins, "etcd")?, components::etcd_args(l, ports))?;
    reserved[2].release();
    s.spawn(
        APISERVER,
        bin(bins, "kube-apiserver")?,
        components::apiserver_args(l, ports, &opts.apiserver_args),
    )?;

    let kc = kube::config::Kubeconfig::read_from(&l.kubeconfig)
        .context("reading the admin kubeconfig")?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .context("loading the admin kubeconfig")?;
    let client = kube::Client::try_from(config.clone()).context("building the admin client")?;

    s.phase(
        "kube-apiserver /readyz",
        deadline,
        &[ETCD, APISERVER],
        wait_readyz(&client),
    )
    .await?;
    let apiserver_ready = t0.elapsed();

    create_storage_class(&client)
        .await
        .context("creating the default StorageClass")?;

    s.spawn(
        CONTROLLER_MANAGER,
        bin(bins, "kube-controller-manager")?,
        components::controller_manager_args(l, opts.fast_kcm),
    )?;
    s.spawn(
        SCHEDULER,
        bin(bins, "kube-scheduler")?,
        components::scheduler_args(l, opts.fast_kcm),
    )?;
    s.spawn(KWOK, bin(bins, "kwok")?, components::kwok_args(l))?;

    s.phase(
        &format!("Node {NODE_NAME} Ready"),
        deadline,
        &[KWOK],
        create_node_and_wait(&client, opts.node_pods),
    )
    .await?;
    let node_ready = t0.elapsed();

    s.phase(
        &format!("probe Deployment in {PROBE_NAMESPACE} Available"),
        deadline,
        &[CONTROLLER_MANAGER, SCHEDULER, KWOK],
        probe_deployment(&client),
    )
    .await?;
    let usable = t0.elapsed();

    Ok((
        server,
        config,
        client,
        ca,
        Timings {
            binaries: Duration::ZERO,
            apiserver_ready,
            node_ready,
            usable,
        },
    ))
}

/// Polls `/readyz` while the API server is not listening or not ready yet
/// (bounded by the caller's deadline).
async fn wait_readyz(client: &kube::Client) -> anyhow::Result<()> {
    loop {
        let req = kube::core::Request::new("").get("readyz", &GetParams::default())?;
        if let Ok(body) = client.request_text(req).await
            && body.trim() == "ok"
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The default StorageClass (see `tests/kwok/pvc-provision.yaml`): PVCs
/// without a class get it and are bound at once by KWOK.
async fn create_storage_class(client: &kube::Client) -> anyhow::Result<()> {
    let classes: Api<StorageClass> = Api::all(client.clone());
    let class: StorageClass = serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": components::STORAGE_CLASS,
            "annotations": { "storageclass.kubernetes.io/is-default-class": "true" },
        },
        "provisioner": "kwok.x-k8s.io/volume",
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }))?;
    classes.create(&PostParams::default(), &class).await?;
    Ok(())
}

/// The fake Node: no KWOK taint, big capacity, label `type=kwok`.
fn node_manifest(pods: u32) -> serde_json::Value {
    let resources = json!({ "cpu": "1000", "memory": "1Ti", "pods": pods.to_string() });
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE_NAME,
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": NODE_NAME,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
            },
            "annotations": {
                "kwok.x-k8s.io/node": "fake",
                "node.alpha.kubernetes.io/ttl": "0",
            },
        },
        "spec": {},
        "status": { "allocatable": resources.clone(), "capacity": resources },
    })
}

/// True when a Node's Ready condition is True.
pub fn is_node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// True when a Deployment's current generation is rolled out and Available:
/// observed generation caught up, Available=True, and every desired replica
/// updated and available.
pub fn is_deployment_available(d: &Deployment) -> bool {
    let Some(status) = d.status.as_ref() else {
        return false;
    };
    let desired = d.spec.replicas.unwrap_or(1);
    let generation = d.metadata.generation.unwrap_or(0);
    status.observed_generation.unwrap_or(0) >= generation
        && status.available_replicas.unwrap_or(0) >= desired
        && status.updated_replicas.unwrap_or(0) >= desired
        && status.conditions.as_ref().is_some_and(|cs| {
            cs.iter().any(|c| {
                c.type_.as_deref() == Some("Available") && c.status.as_deref() == Some("True")
            })
        })
}

async fn create_node_and_wait(client: &kube::Client, pods: u32) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(node_manifest(pods))?;
    nodes
        .create(&PostParams::default(), &node)
        .await
        .context("creating the fake Node")?;
    await_condition(nodes, NODE_NAME, |n: Option<&Node>| {
        n.is_some_and(is_node_ready)
    })
    .await?;
    Ok(())
}

/// A restricted-compliant Deployment of pause containers.
fn probe_manifest() -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": "probe", "namespace": PROBE_NAMESPACE },
        "spec": {
            "replicas": 2,
            "selector": { "matchLabels": { "app": "probe" } },
            "template": {
                "metadata": { "labels": { "app": "probe" } },
                "spec": {
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "seccompProfile": { "type": "RuntimeDefault" },
                    },
                    "containers": [{
                        "name": "pause",
                        "image": "registry.k8s.io/pause:3.10",
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "capabilities": { "drop": ["ALL"] },
                        },
                    }],
                },
            },
        },
    })
}

async fn probe_deployment(client: &kube::Client) -> anyhow::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": PROBE_NAMESPACE,
            "labels": { "pod-security.kubernetes.io/enforce": "restricted" },
        },
    }))?;
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .context("creating the probe namespace")?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), PROBE_NAMESPACE);
    let probe: Deployment = serde_json::from_value(probe_manifest())?;
    deployments
        .create(&PostParams::default(), &probe)
        .await
        .context("creating the probe Deployment")?;
    await_condition(deployments, "probe", |d: Option<&Deployment>| {
        d.is_some_and(is_deployment_available)
    })
    .await?;
    // Not waited for: the namespace controller finishes this in the background.
    namespaces
        .delete(PROBE_NAMESPACE, &DeleteParams::background())
        .await
        .context("deleting the probe namespace")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_are_mapped_from_build_output() {
        let tmp = tempfile::tempdir().unwrap();
        let k = tmp.path().join("kubernetes-v1");
        let o = tmp.path().join("other");
        std::fs::create_dir_all(&k).unwrap();
        std::fs::create_dir_all(&o).unwrap();
        for b in [
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubectl",
        ] {
            std::fs::write(k.join(b), "").unwrap();
        }
        for b in ["etcd", "kwok", "nats-server"] {
            std::fs::write(o.join(b), "").unwrap();
        }
        let out = format!("kubernetes {}\netcd {}\n", k.display(), o.display());
        let bins = binaries_from(&out).unwrap();
        assert_eq!(bins["kubectl"], k.join("kubectl"));
        assert_eq!(bins["nats-server"], o.join("nats-server"));

        let partial = format!("kubernetes {}\n", k.display());
        let err = binaries_from(&partial).unwrap_err().to_string();
        assert!(err.contains("etcd") && err.contains("nats-server"), "{err}");
    }

    #[test]
    fn sweep_removes_only_dead_owners() {
        let tmp = tempfile::tempdir().unwrap();
        // pid 0x7fffffff is beyond pid_max: never alive.
        let dead = tmp.path().join(format!("{DIR_PREFIX}2147483647-1-0"));
        let kept = tmp.path().join(format!("{DIR_PREFIX}2147483647-1-1"));
        let alive = tmp
            .path()
            .join(format!("{DIR_PREFIX}{}-1-0", std::process::id()));
        let unrelated = tmp.path().join("something-else");
        for d in [&dead, &kept, &alive, &unrelated] {
            std::fs::create_dir_all(d.join("etcd-data")).unwrap();
        }
        std::fs::write(kept.join(KEEP_MARKER), "").unwrap();
        sweep_stale(tmp.path());
        assert!(!dead.exists());
        assert!(kept.exists() && !kept.join("etcd-data").exists());
        assert!(alive.join("etcd-data").exists());
        assert!(unrelated.exists());
    }

    #[test]
    fn make_dir_is_unique_and_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let a = make_dir(tmp.path()).unwrap();
        let b = make_dir(tmp.path()).unwrap();
        assert_ne!(a, b);
        let mode = std::fs::metadata(&a).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn node_manifest_is_a_valid_untainted_node() {
        let node: Node = serde_json::from_value(node_manifest(1000)).unwrap();
        assert!(node.spec.as_ref().and_then(|s| s.taints.as_ref()).is_none());
        let labels = node.metadata.labels.unwrap();
        assert_eq!(labels["type"], "kwok");
        let cap = node.status.unwrap().capacity.unwrap();
        assert_eq!(cap["pods"].0, "1000");
    }

    #[test]
    fn probe_is_restricted_compliant() {
        let d: Deployment = serde_json::from_value(probe_manifest()).unwrap();
        let pod = d.spec.template.spec.unwrap();
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
    }

    #[test]
    fn deployment_availability() {
        let mut d: Deployment = serde_json::from_value(probe_manifest()).unwrap();
        assert!(!is_deployment_available(&d));
        d.metadata.generation = Some(1);
        d.status = serde_json::from_value(json!({
            "observedGeneration": 1, "availableReplicas": 2, "updatedReplicas": 2,
            "conditions": [{ "type": "Available", "status": "True" }],
        }))
        .unwrap();
        assert!(is_deployment_available(&d));
        d.metadata.generation = Some(2);
        assert!(!is_deployment_available(&d));
    }

    #[test]
    fn audit_lines_parse() {
        let text = r#"{"kind":"Event","apiVersion":"audit.k8s.io/v1","level":"Metadata","auditID":"a1","stage":"ResponseComplete","requestURI":"/api/v1/namespaces/x/configmaps","verb":"create","user":{"username":"kab-admin","groups":["system:masters","system:authenticated"]},"objectRef":{"resource":"configmaps","namespace":"x","name":"c","apiVersion":"v1"},"responseStatus":{"metadata":{},"code":201},"userAgent":"kube-rs"}
{"kind":"Event","auditID":"a2","stage":"ResponseComplete","verb":"delete","user":{"username":"u"}}
"#;
        let events = parse_audit(text).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].verb, "create");
        assert_eq!(events[0].request_uri, "/api/v1/namespaces/x/configmaps");
        assert_eq!(events[0].user.username, "kab-admin");
        let obj = events[0].object_ref.as_ref().unwrap();
        assert_eq!(
            (obj.resource.as_str(), obj.name.as_str()),
            ("configmaps", "c")
        );
        assert_eq!(events[0].response_status.as_ref().unwrap().code, 201);
        assert!(events[1].object_ref.is_none());
        // A line still being written is not read yet.
        let partial = format!("{text}{{\"kind\":\"Event\",\"verb\":\"cre");
        assert_eq!(parse_audit(&partial).unwrap().len(), 2);
    }
}
