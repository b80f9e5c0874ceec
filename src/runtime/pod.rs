//! One pod on the local node: its volumes, ports, processes, probes, restarts and status.

use super::probe::{self, HttpProbe};
use super::volumes::{self, LocalVolume, Source};
use super::{NODE_NAME, State};
use crate::plane::Process;
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a container image runs locally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// The kab binary.
    Kab,
    /// nats-server.
    Nats,
}

/// Why a container cannot be started yet: its pod status shows `CreateContainerConfigError`
/// with this message (the kubelet's wording where it has one) until the cause is gone.
#[derive(Debug, thiserror::Error)]
pub enum ContainerConfigError {
    /// A ConfigMap or Secret volume's object is missing.
    #[error("{kind} \"{name}\" not found")]
    MissingVolume {
        /// `configmap` or `secret`.
        kind: &'static str,
        /// The object.
        name: String,
    },
    /// An env var's ConfigMap or Secret key is missing.
    #[error("{kind} \"{name}\" or its key \"{key}\" not found")]
    MissingKey {
        /// `configmap` or `secret`.
        kind: &'static str,
        /// The object.
        name: String,
        /// The key.
        key: String,
    },
    /// The NATS configuration could not be read or its local copy written.
    #[error("{doing} {path}: {source}")]
    NatsConfig {
        /// `reading the NATS configuration` or `writing`.
        doing: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No kubeconfig could be issued for the pod's ServiceAccount.
    #[error("issuing an identity for {user}: {source:#}")]
    Identity {
        /// `system:serviceaccount:<ns>:<name>`.
        user: String,
        /// Why.
        #[source]
        source: anyhow::Error,
    },
}

/// A process the runtime runs, for tests and `kab dev`.
#[derive(Clone, Debug)]
pub struct ProcessInfo {
    /// Namespace of the pod.
    pub namespace: String,
    /// Name of the pod.
    pub pod: String,
    /// Container name.
    pub container: String,
    /// Pid while running.
    pub pid: Option<u32>,
    /// Restarts so far.
    pub restarts: i32,
    /// Readiness probe passing.
    pub ready: bool,
    /// Its log file.
    pub log: PathBuf,
}

#[derive(Clone, Debug, Default)]
struct ContainerState {
    name: String,
    image: String,
    pid: Option<u32>,
    restarts: i32,
    ready: bool,
    started_at: Option<String>,
    /// `(reason, message)` while not running.
    waiting: Option<(String, String)>,
    /// Last termination: `(exit code, reason, finished at)`.
    last: Option<(i32, String, String)>,
    log: PathBuf,
}

/// A handle on a running pod (cheap to clone).
#[derive(Clone)]
pub struct PodHandle {
    inner: Arc<Inner>,
}

struct Inner {
    state: Arc<State>,
    uid: String,
    namespace: String,
    name: String,
    pod: Mutex<Pod>,
    ip: String,
    dir: PathBuf,
    volumes: Vec<LocalVolume>,
    /// (container, containerPort) → local port; and port name → local port.
    ports: BTreeMap<(String, i32), u16>,
    port_names: BTreeMap<String, u16>,
    containers: Mutex<Vec<ContainerState>>,
    stop: tokio::sync::watch::Sender<bool>,
    projections: AtomicU64,
    last_status: Mutex<String>,
    status_lock: tokio::sync::Mutex<()>,
    started: String,
}

impl PodHandle {
    /// Prepares the pod and starts its containers.
    pub fn start(state: Arc<State>, pod: Pod, ip_index: u32) -> Self {
        let uid = pod.uid().unwrap_or_default();
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let dir = state.config.dir.join("pods").join(&uid);
        let volumes = volumes::plan(&pod, &dir, &state.config.dir.join("claims"));
        let mut ports = BTreeMap::new();
        let mut port_names = BTreeMap::new();
        for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
            for p in c.ports.iter().flatten() {
                let local = crate::plane::free_port().unwrap_or(0);
                ports.insert((c.name.clone(), p.container_port), local);
                if let Some(n) = &p.name {
                    port_names.insert(n.clone(), local);
                }
            }
        }
        let containers = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| ContainerState {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                waiting: Some(("ContainerCreating".into(), String::new())),
                log: state
                    .config
                    .logs
                    .join(format!("{namespace}_{name}_{}.log", c.name)),
                ..Default::default()
            })
            .collect();
        let (stop, _) = tokio::sync::watch::channel(false);
        let ip = format!("10.245.{}.{}", (ip_index / 250) % 250, ip_index % 250 + 2);
        let handle = PodHandle {
            inner: Arc::new(Inner {
                state,
                uid,
                namespace,
                name,
                pod: Mutex::new(pod.clone()),
                ip,
                dir,
                volumes,
                ports,
                port_names,
                containers: Mutex::new(containers),
                stop,
                projections: AtomicU64::new(0),
                last_status: Mutex::new(String::new()),
                status_lock: tokio::sync::Mutex::new(()),
                started: Timestamp::now().to_string(),
            }),
        };
        handle.refresh_volumes();
        for (i, c) in pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .enumerate()
        {
            let h = handle.clone();
            let c = c.clone();
            tokio::spawn(async move { h.supervise(i, c).await });
        }
        let h = handle.clone();
        tokio::spawn(async move { h.push_status().await });
        handle
    }

    /// Namespace of the pod.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// Labels of the pod now.
    pub fn labels(&self) -> BTreeMap<String, String> {
        crate::lock(&self.inner.pod).labels().clone()
    }

    /// Whether every container is ready.
    pub fn ready(&self) -> bool {
        let cs = crate::lock(&self.inner.containers);
        !cs.is_empty() && cs.iter().all(|c| c.ready)
    }

    /// The local port a Service's targetPort reaches, if the pod is ready.
    pub fn backend(&self, target: &IntOrString) -> Option<u16> {
        if !self.ready() {
            return None;
        }
        match target {
            IntOrString::Int(n) => self
                .inner
                .ports
                .iter()
                .find(|((_, p), _)| p == n)
                .map(|(_, l)| *l),
            IntOrString::String(name) => self.inner.port_names.get(name).copied(),
        }
    }

    /// The processes of this pod.
    pub fn processes(&self) -> Vec<ProcessInfo> {
        let cs = crate::lock(&self.inner.containers);
        cs.iter()
            .map(|c| ProcessInfo {
                namespace: self.inner.namespace.clone(),
                pod: self.inner.name.clone(),
                container: c.name.clone(),
                pid: c.pid,
                restarts: c.restarts,
                ready: c.ready,
                log: c.log.clone(),
            })
            .collect()
    }

    /// A newer version of the pod: a deletion stops it gracefully and finishes the delete.
    pub fn update(&self, pod: Pod) {
        let deleting = pod.metadata.deletion_timestamp.is_some();
        let grace = pod
            .metadata
            .deletion_grace_period_seconds
            .unwrap_or(30)
            .clamp(0, 10) as u64;
        *crate::lock(&self.inner.pod) = pod.clone();
        if deleting && !*self.inner.stop.borrow() {
            let h = self.clone();
            tokio::spawn(async move {
                h.stop_processes(Duration::from_secs(grace)).await;
                force_delete(&h.inner.state.client, &pod).await;
                h.inner.state.lock_pods().remove(&h.inner.uid);
                let _ = std::fs::remove_dir_all(&h.inner.dir);
            });
        }
    }

    /// Stops the processes at once (runtime shutdown).
    pub fn shutdown_now(&self) {
        let _ = self.inner.stop.send(true);
        let pids: Vec<u32> = {
            let cs = crate::lock(&self.inner.containers);
            cs.iter().filter_map(|c| c.pid).collect()
        };
        for pid in pids {
            // SAFETY: kill(2) on a pid this runtime started; the supervisor reaps it.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }

    async fn stop_processes(&self, grace: Duration) {
        let _ = self.inner.stop.send(true);
        let deadline = Instant::now() + grace + Duration::from_secs(2);
        // The supervisors see the stop signal and stop their process within `grace`.
        let mut rx = self.inner.stop.subscribe();
        while Instant::now() < deadline {
            let running = {
                let cs = crate::lock(&self.inner.containers);
                cs.iter().any(|c| c.pid.is_some())
            };
            if !running {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
        }
    }

    /// Re-projects ConfigMap and Secret volumes from the current objects.
    pub fn refresh_volumes(&self) {
        let objects = self.inner.state.lock_objects();
        for v in &self.inner.volumes {
            match &v.source {
                Source::ConfigMap { .. } | Source::Secret { .. } => {
                    if let Some(files) = volumes::files(
                        &v.source,
                        &self.inner.namespace,
                        &objects.config_maps,
                        &objects.secrets,
                    ) {
                        let generation = self.inner.projections.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = volumes::project(&v.dir, &files, generation) {
                            tracing::warn!(pod = %self.inner.name, volume = %v.name, error = %e, "projecting a volume");
                        }
                    }
                }
                _ => {
                    let _ = std::fs::create_dir_all(&v.dir);
                }
            }
        }
    }

    fn volume_ready(&self, v: &LocalVolume) -> Result<(), ContainerConfigError> {
        let (kind, name) = match &v.source {
            Source::ConfigMap {
                name,
                optional: false,
                ..
            } => ("configmap", name),
            Source::Secret {
                name,
                optional: false,
                ..
            } => ("secret", name),
            _ => return Ok(()),
        };
        if v.dir.join("..data").exists() {
            return Ok(());
        }
        Err(ContainerConfigError::MissingVolume {
            kind,
            name: name.clone(),
        })
    }

    fn set(&self, i: usize, f: impl FnOnce(&mut ContainerState)) {
        {
            let mut cs = crate::lock(&self.inner.containers);
            if let Some(c) = cs.get_mut(i) {
                f(c);
            }
        }
        let h = self.clone();
        tokio::spawn(async move { h.push_status().await });
    }

    fn stopping(&self) -> bool {
        *self.inner.stop.borrow()
    }

    /// Runs one container: start, probe, restart with backoff, until the pod stops.
    async fn supervise(&self, i: usize, c: Container) {
        let program = self
            .inner
            .state
            .config
            .program_for(c.image.as_deref().unwrap_or_default());
        let Some(program) = program else {
            self.set(i, |s| {
                s.waiting = Some((
                    "NotRunnableLocally".into(),
                    format!(
                        "image {} is not runnable by the kab local runtime (it runs the kab and nats images as local processes)",
                        c.image.as_deref().unwrap_or("(none)")
                    ),
                ))
            });
            return;
        };
        let mut backoff = Duration::from_secs(10);
        let mut stop_rx = self.inner.stop.subscribe();
        loop {
            if self.stopping() {
                return;
            }
            let cmd = match self.command(program, &c) {
                Ok(cmd) => cmd,
                Err(reason) => {
                    self.set(i, |s| {
                        s.waiting = Some(("CreateContainerConfigError".into(), reason.to_string()))
                    });
                    // Wait for the missing object (volumes are refreshed on every change).
                    let _ = tokio::time::timeout(Duration::from_secs(2), stop_rx.changed()).await;
                    continue;
                }
            };
            let log = crate::lock(&self.inner.containers)[i].log.clone();
            let name = format!("{}/{}/{}", self.inner.namespace, self.inner.name, c.name);
            let mut process = match crate::plane::spawn_process(&name, cmd, &log) {
                Ok(p) => p,
                Err(e) => {
                    self.set(i, |s| {
                        s.waiting = Some(("RunContainerError".into(), format!("{e:#}")))
                    });
                    let _ = tokio::time::timeout(backoff, stop_rx.changed()).await;
                    backoff = (backoff * 2).min(Duration::from_secs(300));
                    continue;
                }
            };
            let started = Instant::now();
            let pid = process.pid();
            self.set(i, |s| {
                s.pid = Some(pid);
                s.waiting = None;
                s.ready = c.readiness_probe.is_none();
                s.started_at = Some(Timestamp::now().to_string());
            });
            let exit = self.run_until_exit(i, &c, &mut process, &mut stop_rx).await;
            let code = exit.unwrap_or(-1);
            let ran_long = started.elapsed() > Duration::from_secs(600);
            if self.stopping() {
                self.set(i, |s| {
                    s.pid = None;
                    s.ready = false;
                });
                return;
            }
            if ran_long {
                backoff = Duration::from_secs(10);
            }
            let reason = if code == 0 { "Completed" } else { "Error" };
            self.set(i, |s| {
                s.pid = None;
                s.ready = false;
                s.restarts += 1;
                s.last = Some((code, reason.to_string(), Timestamp::now().to_string()));
                s.waiting = Some((
                    "CrashLoopBackOff".into(),
                    format!(
                        "back-off {}s restarting failed container={} pod={}",
                        backoff.as_secs(),
                        c.name,
                        self.inner.name
                    ),
                ));
            });
            let _ = tokio::time::timeout(backoff, stop_rx.changed()).await;
            backoff = (backoff * 2).min(Duration::from_secs(300));
        }
    }

    /// Probes the running process until it exits or the pod stops; returns the exit code.
    async fn run_until_exit(
        &self,
        i: usize,
        c: &Container,
        process: &mut Process,
        stop_rx: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Option<i32> {
        let readiness = c
            .readiness_probe
            .as_ref()
            .and_then(|p| self.http_probe(c, p));
        let liveness = c
            .liveness_probe
            .as_ref()
            .and_then(|p| self.http_probe(c, p));
        let period = |p: Option<&Probe>| {
            Duration::from_secs(p.and_then(|p| p.period_seconds).unwrap_or(10).max(1) as u64)
        };
        let r_period = period(c.readiness_probe.as_ref());
        let l_period = period(c.liveness_probe.as_ref());
        let l_threshold = c
            .liveness_probe
            .as_ref()
            .and_then(|p| p.failure_threshold)
            .unwrap_or(3);
        let l_delay = Duration::from_secs(
            c.liveness_probe
                .as_ref()
                .and_then(|p| p.initial_delay_seconds)
                .unwrap_or(0)
                .max(0) as u64,
        );
        let mut next_ready = Instant::now() + Duration::from_millis(300);
        let mut next_live = Instant::now() + l_delay + l_period;
        let mut live_failures = 0;
        let mut ready = c.readiness_probe.is_none();
        loop {
            if let Some(status) = process.exited() {
                return status.code().or(Some(137));
            }
            if self.stopping() {
                let grace = {
                    let pod = crate::lock(&self.inner.pod);
                    pod.metadata
                        .deletion_grace_period_seconds
                        .unwrap_or(10)
                        .clamp(1, 10) as u64
                };
                stop_process(process, Duration::from_secs(grace)).await;
                return None;
            }
            let now = Instant::now();
            if let Some(p) = &readiness
                && now >= next_ready
            {
                let ok = probe::run(p).await.is_ok();
                if ok != ready {
                    ready = ok;
                    self.set(i, |s| s.ready = ok);
                }
                // Probe quickly until first ready, then at the probe period.
                next_ready = now
                    + if ready {
                        r_period
                    } else {
                        r_period.min(Duration::from_secs(1))
                    };
            }
            if let Some(p) = &liveness
                && now >= next_live
            {
                match probe::run(p).await {
                    Ok(()) => live_failures = 0,
                    Err(e) => {
                        live_failures += 1;
                        if live_failures >= l_threshold {
                            tracing::warn!(pod = %self.inner.name, container = %c.name, error = %e, "liveness probe failed: restarting");
                            stop_process(process, Duration::from_secs(5)).await;
                            return Some(137);
                        }
                    }
                }
                next_live = now + l_period;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), stop_rx.changed()).await;
        }
    }

    fn http_probe(&self, c: &Container, p: &Probe) -> Option<HttpProbe> {
        let get = p.http_get.as_ref()?;
        let port = match &get.port {
            IntOrString::Int(n) => self.inner.ports.get(&(c.name.clone(), *n)).copied(),
            IntOrString::String(name) => self.inner.port_names.get(name).copied(),
        }?;
        Some(HttpProbe {
            port,
            path: get.path.clone().unwrap_or_else(|| "/".into()),
            https: get.scheme.as_deref() == Some("HTTPS"),
            timeout: Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64),
        })
    }

    /// The local command for a container: program, remapped args, resolved env.
    fn command(
        &self,
        program: Program,
        c: &Container,
    ) -> Result<std::process::Command, ContainerConfigError> {
        for v in &self.inner.volumes {
            self.volume_ready(v)?;
        }
        let mounts: Vec<(String, PathBuf)> = c
            .volume_mounts
            .iter()
            .flatten()
            .filter_map(|m| {
                let v = self.inner.volumes.iter().find(|v| v.name == m.name)?;
                let dir = match &m.sub_path {
                    Some(sp) if !sp.is_empty() => v.dir.join(sp),
                    _ => v.dir.clone(),
                };
                Some((m.mount_path.clone(), dir))
            })
            .collect();
        let env = self.resolve_env(c.env.as_deref().unwrap_or_default())?;
        let mut args: Vec<String> = c.command.iter().flatten().skip(1).cloned().collect();
        args.extend(c.args.iter().flatten().cloned());
        let args: Vec<String> = args
            .iter()
            .map(|a| volumes::remap(&expand(a, &env), &mounts))
            .collect();
        let port = |p: i32| self.inner.ports.get(&(c.name.clone(), p)).copied();
        let mut cmd;
        let home = self.inner.dir.join("home").join(&c.name);
        let _ = std::fs::create_dir_all(&home);
        match program {
            Program::Kab => {
                cmd = std::process::Command::new(&self.inner.state.config.kab_binary);
                cmd.args(&args);
            }
            Program::Nats => {
                cmd = std::process::Command::new(&self.inner.state.config.nats_binary);
                // The rendered configuration names in-container paths (e.g. `store_dir: /data`):
                // run a copy whose paths are remapped like the args.
                let mut args = args;
                if let Some(i) = args.iter().position(|a| a == "--config" || a == "-c")
                    && let Some(path) = args.get(i + 1).cloned()
                {
                    let text = std::fs::read_to_string(&path).map_err(|source| {
                        ContainerConfigError::NatsConfig {
                            doing: "reading the NATS configuration",
                            path: PathBuf::from(&path),
                            source,
                        }
                    })?;
                    let local = home.join("nats.conf");
                    std::fs::write(&local, volumes::remap_text(&text, &mounts)).map_err(
                        |source| ContainerConfigError::NatsConfig {
                            doing: "writing",
                            path: local.clone(),
                            source,
                        },
                    )?;
                    args[i + 1] = local.display().to_string();
                }
                cmd.args(&args);
                if let Some(p) = port(4222) {
                    cmd.args(["-p", &p.to_string()]);
                }
                if let Some(p) = port(8222) {
                    cmd.args(["-m", &p.to_string()]);
                }
                cmd.args(["-a", "127.0.0.1"]);
            }
        }
        cmd.env_clear();
        cmd.env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        );
        cmd.env("HOME", &home);
        cmd.current_dir(&home);
        for (k, v) in &env {
            cmd.env(k, volumes::remap(v, &mounts));
        }
        if program == Program::Kab {
            let sa = {
                let pod = crate::lock(&self.inner.pod);
                pod.spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into())
            };
            let user = format!("system:serviceaccount:{}:{sa}", self.inner.namespace);
            let group = format!("system:serviceaccounts:{}", self.inner.namespace);
            let kubeconfig = (self.inner.state.config.identity)(
                &user,
                &["system:serviceaccounts", &group, "system:authenticated"],
            )
            .map_err(|source| ContainerConfigError::Identity {
                user: user.clone(),
                source,
            })?;
            cmd.env("KUBECONFIG", kubeconfig);
            cmd.env("KAB_HOSTS_FILE", self.inner.state.hosts_file());
            let find = |want: &dyn Fn(&k8s_openapi::api::core::v1::ContainerPort) -> bool| {
                c.ports
                    .iter()
                    .flatten()
                    .find(|p| want(p))
                    .and_then(|p| port(p.container_port))
            };
            if let Some(l) =
                find(&|p| p.name.as_deref() == Some("https") || p.container_port == 8443)
            {
                cmd.env("KAB_LISTEN_ADDR", format!("127.0.0.1:{l}"));
            }
            if let Some(l) = find(&|p| {
                matches!(p.name.as_deref(), Some("http") | Some("metrics"))
                    || p.container_port == 8080
            }) {
                cmd.env("KAB_METRICS_ADDR", format!("127.0.0.1:{l}"));
            }
            if let Ok(filter) = std::env::var("KAB_LOCAL_RUST_LOG") {
                cmd.env("RUST_LOG", filter);
            }
        }
        Ok(cmd)
    }

    fn resolve_env(&self, vars: &[EnvVar]) -> Result<Vec<(String, String)>, ContainerConfigError> {
        let pod = crate::lock(&self.inner.pod).clone();
        let objects = self.inner.state.lock_objects();
        let mut out: Vec<(String, String)> = Vec::new();
        for v in vars {
            let value = if let Some(from) = &v.value_from {
                if let Some(f) = &from.field_ref {
                    field(&pod, &f.field_path, &self.inner.ip)
                } else if let Some(s) = &from.secret_key_ref {
                    let found = objects
                        .secrets
                        .get(&format!("{}/{}", self.inner.namespace, s.name))
                        .and_then(|o| o.data.as_ref()?.get(&s.key))
                        .map(|b| String::from_utf8_lossy(&b.0).into_owned());
                    match key_ref(found, "secret", &s.name, &s.key, s.optional)? {
                        Some(value) => value,
                        None => continue,
                    }
                } else if let Some(c) = &from.config_map_key_ref {
                    let found = objects
                        .config_maps
                        .get(&format!("{}/{}", self.inner.namespace, c.name))
                        .and_then(|o| o.data.as_ref()?.get(&c.key).cloned());
                    match key_ref(found, "configmap", &c.name, &c.key, c.optional)? {
                        Some(value) => value,
                        None => continue,
                    }
                } else {
                    String::new()
                }
            } else {
                expand(v.value.as_deref().unwrap_or_default(), &out)
            };
            out.push((v.name.clone(), value));
        }
        Ok(out)
    }

    /// Reports the pod's status (merge patch of the status subresource), when it changed.
    async fn push_status(&self) {
        let _guard = self.inner.status_lock.lock().await;
        if self.stopping()
            && crate::lock(&self.inner.pod)
                .metadata
                .deletion_timestamp
                .is_some()
        {
            return;
        }
        let status = self.status_json();
        let text = status.to_string();
        {
            let mut last = crate::lock(&self.inner.last_status);
            if *last == text {
                return;
            }
            *last = text;
        }
        let api: Api<Pod> = Api::namespaced(self.inner.state.client.clone(), &self.inner.namespace);
        if let Err(e) = api
            .patch_status(
                &self.inner.name,
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({"status": status})),
            )
            .await
        {
            tracing::debug!(pod = %self.inner.name, error = %e, "reporting pod status");
            crate::lock(&self.inner.last_status).clear();
        }
    }

    fn status_json(&self) -> serde_json::Value {
        let cs = crate::lock(&self.inner.containers).clone();
        let all_ready = !cs.is_empty() && cs.iter().all(|c| c.ready);
        let any_started = cs.iter().any(|c| c.pid.is_some() || c.restarts > 0);
        let statuses: Vec<serde_json::Value> = cs
            .iter()
            .map(|c| {
                let state = match (&c.pid, &c.waiting) {
                    (Some(_), _) => serde_json::json!({"running": {"startedAt": c.started_at}}),
                    (None, Some((reason, message))) => serde_json::json!({"waiting": {"reason": reason, "message": message}}),
                    (None, None) => serde_json::json!({"waiting": {"reason": "ContainerCreating"}}),
                };
                let mut s = serde_json::json!({
                    "name": c.name, "image": c.image, "imageID": format!("kab-local://{}", c.image),
                    "ready": c.ready, "restartCount": c.restarts, "started": c.pid.is_some(), "state": state,
                });
                if let Some(pid) = c.pid {
                    s["containerID"] = serde_json::json!(format!("kab-local://{pid}"));
                }
                if let Some((code, reason, at)) = &c.last {
                    s["lastState"] = serde_json::json!({"terminated": {"exitCode": code, "reason": reason, "finishedAt": at}});
                }
                s
            })
            .collect();
        let cond = |t: &str, ok: bool| serde_json::json!({"type": t, "status": if ok { "True" } else { "False" }});
        serde_json::json!({
            "phase": if any_started { "Running" } else { "Pending" },
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.inner.ip, "podIPs": [{"ip": self.inner.ip}],
            "startTime": self.inner.started,
            "containerStatuses": statuses,
            "conditions": [cond("PodScheduled", true), cond("Initialized", true),
                           cond("ContainersReady", all_ready), cond("Ready", all_ready)],
        })
    }
}

/// SIGTERM, up to `grace` for the process to exit, then SIGKILL; reaps it.
async fn stop_process(p: &mut Process, grace: Duration) {
    if p.exited().is_some() {
        return;
    }
    let pid = p.pid() as libc::pid_t;
    // SAFETY: kill(2) on our own child, not yet reaped (exited() is None).
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if p.exited().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    for _ in 0..100 {
        if p.exited().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes a pod whose processes are gone (grace period 0), as the kubelet does.
pub async fn force_delete(client: &Client, pod: &Pod) {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let mut dp = DeleteParams::default().grace_period(0);
    if let Some(uid) = pod.uid() {
        dp.preconditions = Some(kube::api::Preconditions {
            uid: Some(uid),
            resource_version: None,
        });
    }
    if let Err(e) = api.delete(&pod.name_any(), &dp).await {
        tracing::debug!(pod = %pod.name_any(), error = %e, "finishing a pod delete");
    }
}

/// The value of a `secretKeyRef` or `configMapKeyRef` (`found`); `None` when it is missing
/// and optional (the variable is left out), an error when it is missing and required.
fn key_ref(
    found: Option<String>,
    kind: &'static str,
    name: &str,
    key: &str,
    optional: Option<bool>,
) -> Result<Option<String>, ContainerConfigError> {
    match found {
        Some(value) => Ok(Some(value)),
        None if optional == Some(true) => Ok(None),
        None => Err(ContainerConfigError::MissingKey {
            kind,
            name: name.to_owned(),
            key: key.to_owned(),
        }),
    }
}

/// A pod field for `fieldRef`.
fn field(pod: &Pod, path: &str, ip: &str) -> String {
    let m = &pod.metadata;
    let label = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix("['").and_then(|r| r.strip_suffix("']")))
            .and_then(|k| map.as_ref().and_then(|m| m.get(k)).cloned())
    };
    match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => NODE_NAME.into(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" => ip.into(),
        "status.hostIP" => "127.0.0.1".into(),
        _ => label("metadata.labels", &m.labels)
            .or_else(|| label("metadata.annotations", &m.annotations))
            .unwrap_or_default(),
    }
}

/// `$(VAR)` expansion as in a pod spec.
fn expand(value: &str, env: &[(String, String)]) -> String {
    let map: HashMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find(')') {
            Some(end) if map.contains_key(&after[..end]) => {
                out.push_str(map[&after[..end]]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_pod_spec_variables() {
        let env = vec![("POD_NAME".to_string(), "todo-0".to_string())];
        assert_eq!(expand("--name=$(POD_NAME)", &env), "--name=todo-0");
        assert_eq!(expand("$(MISSING) stays", &env), "$(MISSING) stays");
    }

    #[test]
    fn container_config_errors_read_like_the_kubelet_and_keep_their_cause() {
        let volume = ContainerConfigError::MissingVolume {
            kind: "secret",
            name: "todo-webhook-tls".into(),
        };
        assert_eq!(volume.to_string(), r#"secret "todo-webhook-tls" not found"#);
        let key = ContainerConfigError::MissingKey {
            kind: "configmap",
            name: "todo-config".into(),
            key: "stack.json".into(),
        };
        assert_eq!(
            key.to_string(),
            r#"configmap "todo-config" or its key "stack.json" not found"#
        );
        let identity = ContainerConfigError::Identity {
            user: "system:serviceaccount:shop:todo".into(),
            source: anyhow::anyhow!("no CA key").context("signing the client certificate"),
        };
        assert_eq!(
            identity.to_string(),
            "issuing an identity for system:serviceaccount:shop:todo: signing the client certificate: no CA key"
        );
        assert!(std::error::Error::source(&identity).is_some());
    }

    #[test]
    fn env_key_refs_resolve_or_are_left_out_or_fail() {
        let found = key_ref(Some("v".into()), "secret", "s", "k", None).unwrap();
        assert_eq!(found.as_deref(), Some("v"));
        let optional = key_ref(None, "secret", "s", "k", Some(true)).unwrap();
        assert_eq!(optional, None);
        let missing = key_ref(None, "configmap", "c", "k", Some(false)).unwrap_err();
        assert_eq!(
            missing.to_string(),
            r#"configmap "c" or its key "k" not found"#
        );
    }

    #[test]
    fn field_refs_resolve() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "shop", "labels": {"app": "x"}},
            "spec": {"containers": [], "serviceAccountName": "sa"}
        }))
        .unwrap();
        assert_eq!(field(&pod, "metadata.name", "10.0.0.1"), "p");
        assert_eq!(field(&pod, "metadata.namespace", "10.0.0.1"), "shop");
        assert_eq!(field(&pod, "status.podIP", "10.0.0.1"), "10.0.0.1");
        assert_eq!(field(&pod, "metadata.labels['app']", ""), "x");
        assert_eq!(field(&pod, "spec.serviceAccountName", ""), "sa");
    }
}
