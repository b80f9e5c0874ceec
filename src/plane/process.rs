//! Child processes that die with their owner.
//!
//! Every process is spawned from one dedicated, never-ending thread with
//! `prctl(PR_SET_PDEATHSIG, SIGKILL)`: the kernel delivers the signal when the
//! *thread* that forked the child exits, so spawning from a tokio worker (which
//! can go away at any time) would kill components at random. The spawner thread
//! lives as long as the process, so a component dies exactly when its owner does
//! (including on SIGKILL of the owner).

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// How long [`Process`]'s `Drop` waits after SIGTERM before it sends SIGKILL.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3);

struct SpawnRequest {
    cmd: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

fn spawner() -> io::Result<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    if let Some(tx) = SPAWNER.get() {
        return Ok(lock(tx).clone());
    }
    let (tx, rx) = mpsc::channel::<SpawnRequest>();
    let tx = SPAWNER.get_or_init(|| {
        // The thread owns `rx` and never returns while any sender exists; the
        // static keeps one sender alive for the life of the process.
        let spawned = std::thread::Builder::new()
            .name("kab-plane-spawner".into())
            .spawn(move || {
                while let Ok(mut req) = rx.recv() {
                    let _ = req.reply.send(req.cmd.spawn());
                }
            });
        if let Err(e) = spawned {
            // Leave a sender whose receiver is gone: every spawn reports the error.
            tracing::error!("cannot start the process spawner thread: {e}");
        }
        Mutex::new(tx)
    });
    Ok(lock(tx).clone())
}

use crate::lock;

/// Spawns `cmd` from the spawner thread with PDEATHSIG=SIGKILL, in its own
/// process group (so a terminal's Ctrl-C reaches only the owner, which then
/// tears down in order), stdin closed, stdout and stderr appended to `log`.
pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Process> {
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating log directory {}", parent.display()))?;
    }
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log file {} for {name}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("duplicating log file handle for {name}"))?;
    let owner = std::process::id() as libc::pid_t;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0);
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The owner may have died between fork and prctl: then nobody will
            // ever signal us, so refuse to start.
            if libc::getppid() != owner {
                return Err(io::Error::other("owner process exited before exec"));
            }
            Ok(())
        });
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner()
        .and_then(|tx| {
            tx.send(SpawnRequest {
                cmd,
                reply: reply_tx,
            })
            .map_err(|_| io::Error::other("process spawner thread is gone"))
        })
        .with_context(|| format!("starting {name}"))?;
    let child = reply_rx
        .recv()
        .map_err(|_| io::Error::other("process spawner thread is gone"))
        .and_then(|r| r)
        .with_context(|| format!("starting {name} ({program})"))?;
    Ok(Process {
        name: name.to_string(),
        pid: child.id(),
        child: Some(child),
        log: log.to_path_buf(),
        exit: None,
    })
}

/// A running child process owned by this process: `Drop` stops it (SIGTERM,
/// [`DEFAULT_GRACE`], SIGKILL, reap).
#[derive(Debug)]
pub struct Process {
    name: String,
    pid: u32,
    child: Option<Child>,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

impl Process {
    /// The component name given at spawn time (e.g. `kube-apiserver`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its pid (stays valid as a number after exit; check [`Process::exited`]).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The file its stdout and stderr go to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// `Some(status)` once the process has exited (reaps it; never blocks).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none()
            && let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.exit = Some(status);
            self.child = None;
        }
        self.exit
    }

    /// The last `lines` lines of its log (best effort).
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// SIGTERM, wait up to `grace`, SIGKILL, and wait until the pid is gone.
    pub fn stop(&mut self, grace: Duration) {
        stop_all(&mut [self], grace);
    }

    fn signal(&self, sig: libc::c_int) {
        if self.child.is_some() {
            // SAFETY: plain kill(2) on our own, not yet reaped, child.
            unsafe {
                libc::kill(self.pid as libc::pid_t, sig);
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(DEFAULT_GRACE);
    }
}

/// Stops several processes together: SIGTERM to all, then wait up to `grace`
/// for all of them, SIGKILL the survivors and reap them. Returns when every
/// pid is gone.
pub fn stop_all(procs: &mut [&mut Process], grace: Duration) {
    for p in procs.iter_mut() {
        if p.exited().is_none() {
            p.signal(libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    // Polls the children's exit with a deadline (no pidfd in std yet).
    while procs.iter_mut().any(|p| p.exited().is_none()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for p in procs.iter_mut() {
        if p.exited().is_none() {
            tracing::debug!(name = %p.name, pid = p.pid, "did not exit on SIGTERM in time; SIGKILL");
            p.signal(libc::SIGKILL);
            if let Some(mut child) = p.child.take() {
                p.exit = child.wait().ok();
            }
        }
    }
}

/// The last `lines` lines of a file, or a note why it cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            all[from..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Resident set size of a pid in KiB, from `/proc/<pid>/status` (Linux).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_logs_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("logs/echo.log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2"]);
        let mut p = spawn("echo", cmd, &log).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(p.exited().unwrap().success());
        assert_eq!(log_tail(&log, 5), "out\nerr");

        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let mut p = spawn("sleeper", cmd, &dir.path().join("s.log")).unwrap();
        assert!(p.exited().is_none());
        let pid = p.pid();
        p.stop(Duration::from_secs(2));
        assert!(p.exited().is_some());
        // Reaped: no zombie of ours left behind.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(!stat.contains(") Z "), "zombie left behind: {stat}");
    }

    #[test]
    fn sigkill_after_grace() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stubborn.log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; echo ready; while :; do sleep 1; done"]);
        let mut p = spawn("stubborn", cmd, &log).unwrap();
        let start = Instant::now();
        p.stop(Duration::from_millis(300));
        assert!(p.exited().is_some());
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn spawn_from_short_lived_threads_survives_thread_exit() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("t.log");
        let path = log.clone();
        let mut p = std::thread::spawn(move || {
            let mut cmd = Command::new("sleep");
            cmd.arg("600");
            spawn("t", cmd, &path).unwrap()
        })
        .join()
        .unwrap();
        // The requesting thread is gone; PDEATHSIG is bound to the spawner thread,
        // so the child must still be alive.
        assert!(
            p.exited().is_none(),
            "child died with its (short-lived) requesting thread"
        );
        p.stop(Duration::from_secs(1));
    }

    #[test]
    fn tail_of_missing_file_says_so() {
        assert!(log_tail(Path::new("/nonexistent/x.log"), 3).contains("cannot read"));
    }

    #[test]
    fn rss_of_self() {
        assert!(rss_kib(std::process::id()).unwrap_or(0) > 0);
    }
}
