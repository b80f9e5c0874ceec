//! Test registry, command line, concurrent runner, reporting and teardown.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::anyhow;
use futures::FutureExt as _;
use kab::plane::{Plane, PlaneOptions};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::task::JoinSet;

use super::ctx::{Ctx, Suite};

type BoxFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;
type TestFn = Arc<dyn Fn(Ctx) -> BoxFuture + Send + Sync>;

/// One registered test.
#[derive(Clone)]
pub struct Test {
    name: String,
    timeout: Option<Duration>,
    run: TestFn,
}

impl Test {
    /// A test from an `async fn(Ctx) -> anyhow::Result<()>` (or closure).
    pub fn new<F, Fut>(name: impl Into<String>, f: F) -> Self
    where
        F: Fn(Ctx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        Self {
            name: name.into(),
            timeout: None,
            run: Arc::new(move |ctx| Box::pin(f(ctx))),
        }
    }

    /// Overrides the per-test deadline (default `KAB_E2E_TIMEOUT`, 180 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// `e2e::plane_tests` + `f` → `plane_tests::f` (the crate name dropped).
pub fn qualified_name(module_path: &str, f: &str) -> String {
    match module_path.split_once("::") {
        Some((_, rest)) => format!("{rest}::{f}"),
        None => f.to_string(),
    }
}

/// The libtest-like command line.
#[derive(Debug, Default)]
struct Args {
    filters: Vec<String>,
    skip: Vec<String>,
    exact: bool,
    list: bool,
    ignored: bool,
    help: bool,
}

impl Args {
    fn parse(argv: impl IntoIterator<Item = String>) -> Result<Self, String> {
        // libtest flags that take a value; accepted and ignored unless handled.
        const WITH_VALUE: &[&str] = &[
            "--test-threads",
            "--color",
            "--format",
            "--logfile",
            "--shuffle-seed",
            "-Z",
        ];
        let mut args = Args::default();
        let mut it = argv.into_iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--list" => args.list = true,
                "--exact" => args.exact = true,
                "--ignored" => args.ignored = true,
                "--skip" => args.skip.push(it.next().ok_or("--skip needs a value")?),
                "-h" | "--help" => args.help = true,
                s if s.starts_with("--skip=") => args.skip.push(s["--skip=".len()..].to_string()),
                s if WITH_VALUE.contains(&s) => {
                    it.next();
                }
                s if s.starts_with('-') => {} // --nocapture, --include-ignored, -q, --test-threads=N, ...
                _ => args.filters.push(a),
            }
        }
        Ok(args)
    }

    fn selects(&self, name: &str) -> bool {
        let hit = |f: &String| {
            if self.exact {
                name == f
            } else {
                name.contains(f.as_str())
            }
        };
        (self.filters.is_empty() || self.filters.iter().any(hit)) && !self.skip.iter().any(hit)
    }
}

const HELP: &str = "usage: cargo test --test e2e -- [FILTER...] [--exact] [--skip S] [--list]
Runs the end-to-end tests against one local control plane.
  KAB_E2E_JOBS     tests run in parallel (default 4)
  KAB_E2E_TIMEOUT  seconds per test (default 180)
  KAB_E2E_FAST_KCM=1  lift the controller manager's client limits (benchmarks)
  KAB_KEEP_PLANE=1 keep the plane directory after the run
Other libtest flags (--nocapture, --test-threads, ...) are accepted and ignored.";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// Entry point: parses argv, runs the selected tests of every group.
pub fn main(groups: &[fn() -> Vec<Test>]) -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    if args.help {
        println!("{HELP}");
        return ExitCode::SUCCESS;
    }
    let all: Vec<Test> = groups.iter().flat_map(|g| g()).collect();
    let mut names: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        eprintln!("e2e: test {} is registered twice", w[0]);
        return ExitCode::from(2);
    }
    let total = all.len();
    let selected: Vec<Test> = all.into_iter().filter(|t| args.selects(&t.name)).collect();
    if args.list {
        for t in &selected {
            println!("{}: test", t.name);
        }
        println!("\n{} tests, 0 benchmarks", selected.len());
        return ExitCode::SUCCESS;
    }
    let filtered_out = total - selected.len();
    if selected.is_empty() || args.ignored {
        println!("\nrunning 0 tests\n");
        println!(
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; {total} filtered out; finished in 0.00s\n"
        );
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("e2e: cannot build the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(run(selected, filtered_out));
    // A test stuck in blocking code must not hold the exit up.
    rt.shutdown_timeout(Duration::from_secs(2));
    code
}

struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

struct Outcome {
    name: String,
    result: anyhow::Result<()>,
    elapsed: Duration,
}

async fn run(tests: Vec<Test>, filtered_out: usize) -> ExitCode {
    let started = Instant::now();
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("e2e: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let logs_dest = logs_destination();
    println!("\nrunning {} tests", tests.len());
    let opts = PlaneOptions {
        fast_kcm: std::env::var("KAB_E2E_FAST_KCM").is_ok_and(|v| v == "1"),
        failure_logs_dir: Some(logs_dest.clone()),
        ..PlaneOptions::default()
    };
    // Dropping the start on a signal stops whatever it had started.
    let plane = tokio::select! {
        r = Plane::start(opts) => r,
        sig = signals.next() => {
            eprintln!("e2e: {sig} while the control plane was starting; stopped");
            return ExitCode::from(130);
        }
    };
    let plane = match plane {
        Ok(p) => Arc::new(p),
        Err(e) => {
            eprintln!("e2e: the control plane did not start: {}", render_error(&e));
            if logs_dest.exists() {
                eprintln!("e2e: control-plane logs kept in {}", logs_dest.display());
            }
            return ExitCode::FAILURE;
        }
    };
    let suite = Arc::new(Suite::new(plane.clone()));
    let (outcomes, interrupted) = run_tests(&suite, tests, &mut signals).await;
    let crashed = plane.exited_components();
    for (name, status, log) in &crashed {
        eprintln!(
            "e2e: {name} exited during the run ({status}); its log: {}",
            log.display()
        );
    }

    // Teardown: shared resources (e.g. the operator) first, then the plane.
    // A second signal during teardown exits at once (PDEATHSIG kills the rest).
    let second = tokio::spawn(async move {
        signals.next().await;
        eprintln!("e2e: second signal, exiting without teardown");
        std::process::exit(130);
    });
    suite.teardown();
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    let stop_plane = {
        let plane = plane.clone();
        let keep = (!failed.is_empty() || interrupted.is_some() || !crashed.is_empty())
            .then(|| logs_dest.clone());
        move || match keep {
            Some(dest) => match plane.stop_keeping_logs(&dest) {
                Ok(()) => println!("e2e: control-plane logs kept in {}", dest.display()),
                Err(e) => eprintln!("e2e: could not keep the logs in {}: {e:#}", dest.display()),
            },
            None => plane.stop(),
        }
    };
    // Stopping waits on processes (blocking); keep the runtime responsive.
    if let Err(e) = tokio::task::spawn_blocking(stop_plane).await {
        eprintln!("e2e: stopping the control plane failed: {e}");
    }
    second.abort();

    if !failed.is_empty() {
        println!("\nfailures:\n");
        for o in &failed {
            if let Err(e) = &o.result {
                println!("---- {} ----\n{}\n", o.name, render_error(e));
            }
        }
        println!("failures:");
        for o in &failed {
            println!("    {}", o.name);
        }
    }
    let passed = outcomes.len() - failed.len();
    let ok = failed.is_empty() && interrupted.is_none() && crashed.is_empty();
    println!(
        "\ntest result: {}. {passed} passed; {} failed; 0 ignored; 0 measured; {filtered_out} filtered out; finished in {:.2}s\n",
        if ok { "ok" } else { "FAILED" },
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    match interrupted {
        Some("SIGTERM") => ExitCode::from(143),
        Some(_) => ExitCode::from(130),
        None if ok => ExitCode::SUCCESS,
        None => ExitCode::FAILURE,
    }
}

async fn run_tests(
    suite: &Arc<Suite>,
    tests: Vec<Test>,
    signals: &mut Signals,
) -> (Vec<Outcome>, Option<&'static str>) {
    let jobs = env_number("KAB_E2E_JOBS", 4) as usize;
    let default_timeout = Duration::from_secs(env_number("KAB_E2E_TIMEOUT", 180));
    let mut queue = tests.into_iter();
    let mut running = JoinSet::new();
    let mut outcomes = Vec::new();
    let mut names: Vec<String> = Vec::new(); // tests in flight
    loop {
        while running.len() < jobs {
            let Some(test) = queue.next() else { break };
            names.push(test.name.clone());
            running.spawn(run_one(suite.clone(), test, default_timeout));
        }
        tokio::select! {
            joined = running.join_next() => match joined {
                Some(Ok(outcome)) => {
                    names.retain(|n| *n != outcome.name);
                    report(&outcome);
                    outcomes.push(outcome);
                }
                Some(Err(e)) => eprintln!("e2e: a test task failed outside its test: {e}"),
                None => break,
            },
            sig = signals.next() => {
                eprintln!("e2e: {sig}: aborting the running tests");
                running.abort_all();
                while running.join_next().await.is_some() {}
                for name in names {
                    println!("test {name} ... interrupted");
                }
                return (outcomes, Some(sig));
            }
        }
    }
    (outcomes, None)
}

fn report(o: &Outcome) {
    println!(
        "test {} ... {} ({:.2}s)",
        o.name,
        if o.result.is_ok() { "ok" } else { "FAILED" },
        o.elapsed.as_secs_f64()
    );
}

async fn run_one(suite: Arc<Suite>, test: Test, default_timeout: Duration) -> Outcome {
    let start = Instant::now();
    let timeout = test.timeout.unwrap_or(default_timeout);
    let ctx = Ctx::new(suite, &test.name);
    let fut = AssertUnwindSafe((test.run)(ctx.clone())).catch_unwind();
    let result = match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(anyhow!("timed out after {}s", timeout.as_secs())),
        Ok(Err(panic)) => Err(anyhow!("panicked: {}", panic_message(&*panic))),
        Ok(Ok(r)) => r,
    };
    ctx.cleanup().await;
    Outcome {
        name: test.name,
        result,
        elapsed: start.elapsed(),
    }
}

/// The error and its causes, without a backtrace (RUST_BACKTRACE is often set
/// and the async backtrace says nothing useful).
fn render_error(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    let causes: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
    if !causes.is_empty() {
        text.push_str("\n\nCaused by:");
        for (i, c) in causes.iter().enumerate() {
            text.push_str(&format!("\n    {i}: {}", c.replace('\n', "\n       ")));
        }
    }
    text
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".into())
}

/// `<target>/e2e-logs/<UTC timestamp>-<pid>/`.
fn logs_destination() -> PathBuf {
    // The test binary is <target>/<profile>/deps/e2e-<hash>.
    let target = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let deps = exe.parent()?;
            (deps.file_name()? == "deps").then(|| deps.parent()?.parent().map(PathBuf::from))?
        })
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("e2e-logs").join(format!(
        "{}-{}",
        utc_stamp(SystemTime::now()),
        std::process::id()
    ))
}

/// `YYYY-MM-DDTHH-MM-SSZ` (file-name safe).
fn utc_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}-{:02}-{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
