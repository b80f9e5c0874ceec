//! What every benchmark shares: knobs, statistics, the result table and its JSON, the plane, the
//! operator process under the shipped RBAC, process CPU and memory, the audit log, and a few
//! small HTTP and Kubernetes helpers.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kab::plane::{Plane, PlaneOptions};
use kube::api::Api;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use crate::support::http::metric_sum;
pub use crate::support::operator::{Operator, USER as OPERATOR_USER};
pub use crate::support::wait::poll_until;

/// Every namespace a benchmark creates starts with this.
pub const NS_PREFIX: &str = "kb-";

// ---------------------------------------------------------------------------------------------
// Knobs
// ---------------------------------------------------------------------------------------------

/// A number from the environment (`default` when unset or unparsable).
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Seconds from the environment.
pub fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(env_usize(name, default as usize) as u64)
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

/// Nearest-rank percentile of `samples` (any order); 0 when empty.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p50/p99/min/max/mean of a sample set, for the JSON.
pub fn summary(samples: &[f64]) -> Value {
    let n = samples.len();
    let mean = if n == 0 {
        0.0
    } else {
        samples.iter().sum::<f64>() / n as f64
    };
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({
        "n": n,
        "p50": percentile(samples, 50.0),
        "p90": percentile(samples, 90.0),
        "p99": percentile(samples, 99.0),
        "min": if n == 0 { 0.0 } else { min },
        "max": if n == 0 { 0.0 } else { max },
        "mean": mean,
    })
}

// ---------------------------------------------------------------------------------------------
// The report: a table and its JSON
// ---------------------------------------------------------------------------------------------

/// One line of the table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub figure: String,
    pub unit: String,
    pub kab: Option<f64>,
    pub baseline: Option<f64>,
    /// kab / baseline.
    pub ratio: Option<f64>,
    pub target: String,
    /// `None`: reported, no target.
    pub pass: Option<bool>,
}

impl Row {
    pub fn new(figure: &str, unit: &str, kab: Option<f64>, baseline: Option<f64>) -> Self {
        let ratio = match (kab, baseline) {
            (Some(k), Some(b)) if b > 0.0 => Some(k / b),
            _ => None,
        };
        Row {
            figure: figure.into(),
            unit: unit.into(),
            kab,
            baseline,
            ratio,
            target: String::new(),
            pass: None,
        }
    }

    pub fn target(mut self, target: &str, pass: bool) -> Self {
        self.target = target.into();
        self.pass = Some(pass);
        self
    }

    pub fn info(mut self, note: &str) -> Self {
        self.target = note.into();
        self
    }
}

/// What one benchmark prints and writes.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub name: String,
    pub title: String,
    /// Heading of the baseline column ("floor", "fixed-allow", "raw CRD").
    pub baseline: String,
    pub rows: Vec<Row>,
    /// Conditions of the run, printed under the table.
    pub notes: Vec<String>,
    /// Everything else measured (samples, requests by verb, …).
    pub details: Value,
    pub started_at: String,
    pub took_seconds: f64,
}

fn fmt_value(v: Option<f64>, unit: &str) -> String {
    let Some(v) = v else {
        return "—".into();
    };
    match unit {
        "ms" => format!("{v:.1} ms"),
        "µs" => format!("{v:.0} µs"),
        "s" => format!("{v:.2} s"),
        "MiB" => format!("{v:.1} MiB"),
        "/s" => format!("{v:.0}/s"),
        "count" => format!("{v:.0}"),
        "cpu-s" => format!("{v:.2} s"),
        other => format!("{v:.2} {other}"),
    }
}

impl Report {
    pub fn new(name: &str, title: &str, baseline: &str) -> Self {
        Report {
            name: name.into(),
            title: title.into(),
            baseline: baseline.into(),
            rows: Vec::new(),
            notes: Vec::new(),
            details: json!({}),
            started_at: k8s_openapi::jiff::Timestamp::now().to_string(),
            took_seconds: 0.0,
        }
    }

    pub fn note(&mut self, s: impl Into<String>) {
        let s = s.into();
        eprintln!("bench {}: {s}", self.name);
        self.notes.push(s);
    }

    pub fn detail(&mut self, key: &str, v: Value) {
        if let Value::Object(m) = &mut self.details {
            m.insert(key.into(), v);
        }
    }

    /// The table as text (also what goes in the issue notes).
    pub fn table(&self) -> String {
        let header = [
            "figure".to_string(),
            "kab".to_string(),
            self.baseline.clone(),
            "ratio".to_string(),
            "target".to_string(),
            "result".to_string(),
        ];
        let mut lines: Vec<[String; 6]> = vec![header];
        for r in &self.rows {
            lines.push([
                r.figure.clone(),
                fmt_value(r.kab, &r.unit),
                fmt_value(r.baseline, &r.unit),
                r.ratio
                    .map(|x| format!("{x:.2}×"))
                    .unwrap_or_else(|| "—".into()),
                r.target.clone(),
                match r.pass {
                    Some(true) => "pass".into(),
                    Some(false) => "MISS".into(),
                    None => "".into(),
                },
            ]);
        }
        let widths: Vec<usize> = (0..6)
            .map(|i| {
                lines
                    .iter()
                    .map(|l| l[i].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = format!("== {} ==\n", self.title);
        for (n, l) in lines.iter().enumerate() {
            let cells: Vec<String> = l
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
                .collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
            if n == 0 {
                let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                out.push_str(&format!("|-{}-|\n", rule.join("-|-")));
            }
        }
        for n in &self.notes {
            out.push_str(&format!("  * {n}\n"));
        }
        out
    }

    /// Prints the table and writes `target/bench/<name>.json`.
    pub fn finish(&mut self, started: Instant) -> anyhow::Result<PathBuf> {
        self.took_seconds = started.elapsed().as_secs_f64();
        println!("\n{}", self.table());
        let dir = bench_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{}.json", self.name));
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))?;
        std::fs::write(dir.join(format!("{}.txt", self.name)), self.table())?;
        println!("written: {}", path.display());
        Ok(path)
    }
}

/// `target/bench` (honours `CARGO_TARGET_DIR`).
pub fn bench_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench")
}

// ---------------------------------------------------------------------------------------------
// The plane
// ---------------------------------------------------------------------------------------------

/// Audit policy of the operator benchmark: every request of the operator (reads too) and the
/// writes of the bench's own client ([`BENCH_USER`]); nothing else (KCM, scheduler and KWOK writes are not
/// logged, which keeps the API server's audit work small and equal for kab and the floor).
pub const AUDIT_OPERATOR: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages:
- RequestReceived
rules:
- level: Metadata
  users: [\"system:serviceaccount:kab-system:kab-operator\"]
- level: Metadata
  users: [\"kab-bench\"]
  verbs: [create, update, patch, delete, deletecollection]
- level: None
";

/// The user the benchmarks' own client authenticates as (`system:masters`): KCM, the scheduler
/// and KWOK use the plane's admin identity, so the bench's writes are told apart from theirs.
pub const BENCH_USER: &str = "kab-bench";

/// A client of [`BENCH_USER`] on the current runtime.
pub async fn bench_client(plane: &Plane) -> anyhow::Result<kube::Client> {
    let path = plane.write_kubeconfig(BENCH_USER, &["system:masters"])?;
    let kc = kube::config::Kubeconfig::read_from(&path)?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await?;
    Ok(kube::Client::try_from(config)?)
}

/// Starts a plane for benchmark `name` with audit `policy` (never rotated, so that the bench
/// reads every event). `fast_kcm` lifts KCM's and the scheduler's client limits.
pub async fn start_plane(name: &str, fast_kcm: bool, policy: &str) -> anyhow::Result<Plane> {
    let dir = bench_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("audit-policy-{name}.yaml"));
    std::fs::write(&path, policy)?;
    let opts = PlaneOptions {
        fast_kcm,
        apiserver_args: [
            format!("--audit-policy-file={}", path.display()),
            "--audit-log-maxsize=0".into(),
        ]
        .into_iter()
        // Profiling only when a profile is asked for (see `PprofCapture`).
        .chain(
            std::env::var("KAB_BENCH_PPROF")
                .is_ok()
                .then(|| "--profiling=true".to_string()),
        )
        .collect(),
        startup_timeout: Duration::from_secs(300),
        ..PlaneOptions::default()
    };
    Plane::start(opts)
        .await
        .context("starting the control plane")
}

// ---------------------------------------------------------------------------------------------
// The operator, under the RBAC it ships with
// ---------------------------------------------------------------------------------------------

/// Installs the KabStack CRD and the operator's RBAC exactly as `kab install --print` ships them
/// (all but the Deployment), and starts the built `kab operator` with the shipped arguments plus
/// `extra`, as a client certificate of the operator's ServiceAccount (nothing but that RBAC); the
/// same code as the e2e tests' operator (`tests/e2e/support/operator.rs`).
pub async fn start_operator(plane: &Plane, extra: &[&str]) -> anyhow::Result<Operator> {
    use crate::support::operator;
    operator::install(plane, "example.invalid/kab:bench").await?;
    // `KAB_BENCH_OPERATOR_WRAPPER="heaptrack -o /tmp/kab-operator"` runs the operator under a
    // profiler (a diagnostic run: the bench's figures then include the wrapper's cost).
    let wrapper = std::env::var("KAB_BENCH_OPERATOR_WRAPPER")
        .ok()
        .filter(|w| !w.trim().is_empty());
    let opts = operator::Options {
        // The shipped Deployment logs JSON (`kab install --print`).
        extra: ["--log-format", "json"]
            .iter()
            .chain(extra)
            .map(|a| a.to_string())
            .collect(),
        log: std::env::var("KAB_BENCH_OPERATOR_LOG").unwrap_or_else(|_| "info".into()),
        wrapper,
    };
    operator::start(plane, &opts).await
}

// ---------------------------------------------------------------------------------------------
// Processes: CPU and memory
// ---------------------------------------------------------------------------------------------

/// utime + stime of a process, in seconds (`/proc/<pid>/stat`).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 is fields[0]; utime is field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tick = if tick > 0 { tick as f64 } else { 100.0 };
    Some((utime + stime) / tick)
}

/// CPU seconds of every running plane component, plus `extra` processes, by name.
pub fn cpu_by_process(plane: &Plane, extra: &[(&str, u32)]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (name, pid) in plane.pids() {
        *out.entry(name).or_insert(0.0) += cpu_seconds(pid).unwrap_or(0.0);
    }
    for (name, pid) in extra {
        *out.entry(name.to_string()).or_insert(0.0) += cpu_seconds(*pid).unwrap_or(0.0);
    }
    out
}

/// CPU seconds the whole machine spent busy so far (`/proc/stat`: all but idle and iowait).
pub fn machine_busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let busy: f64 = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    busy / if tick > 0 { tick as f64 } else { 100.0 }
}

/// `b - a`, by name.
pub fn cpu_delta(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    b.iter()
        .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0.0)))
        .collect()
}

/// `name 1.23 s, …` (nonzero only).
pub fn fmt_cpu(cpu: &BTreeMap<String, f64>) -> String {
    cpu.iter()
        .filter(|(_, v)| **v >= 0.01)
        .map(|(k, v)| format!("{k} {v:.2} s"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The kernel's peak resident set size of a process (`VmHWM`), KiB.
pub fn hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Samples `kab::plane::rss_kib(pid)` every 100 ms and keeps the peak.
pub struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (peak, stop) = (peak.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(kib) = kab::plane::rss_kib(pid) {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        RssSampler { peak, stop, task }
    }

    /// Peak so far, MiB.
    pub fn peak_mib(&self) -> f64 {
        self.peak.load(Ordering::Relaxed) as f64 / 1024.0
    }

    pub fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
        self.peak_mib()
    }
}

// ---------------------------------------------------------------------------------------------
// The audit log
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuditLine {
    #[serde(rename = "auditID")]
    pub audit_id: String,
    pub stage: String,
    pub verb: String,
    pub user: AuditUser,
    pub object_ref: Option<AuditRef>,
    pub response_status: Option<AuditCode>,
    pub request_received_timestamp: String,
    pub stage_timestamp: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct AuditUser {
    pub username: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AuditRef {
    pub resource: String,
    pub namespace: String,
    pub name: String,
    pub subresource: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct AuditCode {
    pub code: i32,
}

impl AuditLine {
    /// `resource[/subresource]`.
    pub fn resource(&self) -> String {
        match &self.object_ref {
            Some(r) if !r.subresource.is_empty() => format!("{}/{}", r.resource, r.subresource),
            Some(r) => r.resource.clone(),
            None => "(none)".into(),
        }
    }

    pub fn is_write(&self) -> bool {
        matches!(
            self.verb.as_str(),
            "create" | "update" | "patch" | "delete" | "deletecollection"
        )
    }

    /// When the API server received the request, µs since the epoch.
    pub fn received_us(&self) -> i64 {
        parse_us(&self.request_received_timestamp)
    }

    /// When it answered, µs since the epoch.
    pub fn done_us(&self) -> i64 {
        parse_us(&self.stage_timestamp)
    }

    /// The operator's leader-election Lease.
    pub fn is_leader_lease(&self) -> bool {
        self.object_ref
            .as_ref()
            .is_some_and(|r| r.resource == "leases" && r.namespace == kab::install::NAMESPACE)
    }
}

fn parse_us(s: &str) -> i64 {
    s.parse::<k8s_openapi::jiff::Timestamp>()
        .map(|t| t.as_microsecond())
        .unwrap_or(0)
}

/// Reads the audit log from a position on: each request once (by audit id).
pub struct AuditTail {
    path: PathBuf,
    offset: u64,
    seen: HashSet<String>,
}

impl AuditTail {
    /// From the current end of the file.
    pub fn at_end(path: &Path) -> Self {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        AuditTail {
            path: path.to_path_buf(),
            offset,
            seen: HashSet::new(),
        }
    }

    /// Requests logged since the last call (complete lines only).
    pub fn read(&mut self) -> anyhow::Result<Vec<AuditLine>> {
        let mut f = std::fs::File::open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        self.offset += complete as u64;
        let mut out = Vec::new();
        for line in buf[..complete].split(|b| *b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let Ok(ev) = serde_json::from_slice::<AuditLine>(line) else {
                continue;
            };
            if self.seen.insert(ev.audit_id.clone()) {
                out.push(ev);
            }
        }
        Ok(out)
    }
}

/// Counts by verb, and by `verb resource`.
pub fn by_verb(events: &[&AuditLine]) -> (BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let mut verbs = BTreeMap::new();
    let mut detail = BTreeMap::new();
    for e in events {
        *verbs.entry(e.verb.clone()).or_insert(0) += 1;
        *detail
            .entry(format!("{} {}", e.verb, e.resource()))
            .or_insert(0) += 1;
    }
    (verbs, detail)
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// Creates namespaces (labelled Pod Security `restricted`, like the e2e tests, plus
/// `annotations`) `concurrency` at a time.
pub async fn create_namespaces(
    client: &kube::Client,
    names: &[String],
    annotations: &BTreeMap<String, String>,
    concurrency: usize,
) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    use k8s_openapi::api::core::v1::Namespace;
    let api: Api<Namespace> = Api::all(client.clone());
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let api = api.clone();
            let annotations = annotations.clone();
            async move {
                let ns: Namespace = serde_json::from_value(json!({
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {
                        "name": name,
                        "labels": {"pod-security.kubernetes.io/enforce": "restricted", "kab.dev/bench": "true"},
                        "annotations": annotations,
                    },
                }))?;
                match api.create(&kube::api::PostParams::default(), &ns).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                    Err(e) => Err(e).with_context(|| format!("creating namespace {name}")),
                }
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect()
}

/// With `KAB_BENCH_PPROF=<seconds>`, captures a CPU profile of kube-apiserver for that long
/// (`/debug/pprof/profile`, read with `go tool pprof`) into `target/bench/<name>.pprof`, in the
/// background; the returned child is waited on by [`PprofCapture::finish`].
pub struct PprofCapture {
    child: Option<std::process::Child>,
    path: PathBuf,
}

impl PprofCapture {
    pub fn start(plane: &Plane, name: &str) -> Self {
        let path = bench_dir().join(format!("{name}.pprof"));
        let child = std::env::var("KAB_BENCH_PPROF")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .and_then(|secs| {
                let file = std::fs::File::create(&path).ok()?;
                Command::new(plane.bin("kubectl"))
                    .args([
                        "get",
                        "--raw",
                        &format!("/debug/pprof/profile?seconds={secs}"),
                        "--request-timeout",
                        &format!("{}s", secs + 60),
                    ])
                    .env("KUBECONFIG", plane.kubeconfig_path())
                    .stdout(file)
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .ok()
            });
        PprofCapture { child, path }
    }

    /// Waits for the capture; the profile's path when one was taken.
    pub fn finish(mut self) -> Option<PathBuf> {
        let status = self.child.take()?.wait().ok()?;
        status.success().then(|| self.path.clone())
    }
}
