//! The local workload runtime: a small kubelet for machines without a container engine.
//!
//! It registers a Node (`kab-local`, tainted `kab.dev/local=true:NoSchedule`) and runs, as real
//! local processes, the pods the scheduler binds to it:
//! - the kab image → the locally built `kab` binary with the container's args and env;
//! - the NATS image → the locally built `nats-server` with the rendered configuration;
//! - any other image → the pod stays `Pending` with a clear `NotRunnableLocally` reason.
//!
//! Which pods come here is plain Kubernetes: namespaces annotated with
//! [`namespace_annotations`] get a node selector and a toleration from the `PodNodeSelector` and
//! `PodTolerationRestriction` admission plugins, so the scheduler binds their pods to this node.
//! Nothing in the operator's manifests is special-cased.
//!
//! What a container sees, and how it differs from a cluster (documented, not hidden):
//! - Secret, ConfigMap, emptyDir and PersistentVolumeClaim volumes are directories under
//!   `<dir>/pods/<uid>/volumes/`; paths in args and env that start with a mount path are
//!   rewritten to the local directory (longest mount path first). Secret and ConfigMap volumes
//!   are updated the way the kubelet does (an atomic `..data` symlink swap), so a rotated
//!   certificate reaches the process without a restart.
//! - Ports: every container port gets a free loopback port; kab reads `KAB_LISTEN_ADDR` (its
//!   HTTPS port) and `KAB_METRICS_ADDR` (its HTTP port), nats-server gets `-p/-m` flags.
//! - Services: each ClusterIP is added to the loopback interface and served by a userspace proxy
//!   (like kube-proxy's userspace mode) that forwards to a ready local pod; the API server reaches
//!   a webhook through its Service exactly as in a cluster. Service names resolve through a hosts
//!   file passed as `KAB_HOSTS_FILE`.
//! - Identity: each process gets a `KUBECONFIG` with a client certificate for its pod's
//!   ServiceAccount (`system:serviceaccount:<ns>:<sa>`), so RBAC applies as in a cluster.
//! - Health: readiness and liveness `httpGet` probes are run for real; the pod's Ready condition
//!   follows them. A process that exits is restarted with the kubelet's backoff (10 s doubling, at
//!   most 5 min), shows `CrashLoopBackOff` and a restart count meanwhile.

mod pod;
mod probe;
mod proxy;
mod volumes;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use pod::ProcessInfo;

/// Name of the local node.
pub const NODE_NAME: &str = "kab-local";
/// Label of the local node.
pub const NODE_LABEL: (&str, &str) = ("kab.dev/node", "local");
/// Taint key of the local node: only pods of local namespaces tolerate it.
pub const TAINT_KEY: &str = "kab.dev/local";

/// Annotations that send a namespace's pods to the local node (PodNodeSelector and
/// PodTolerationRestriction admission plugins).
pub fn namespace_annotations() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "scheduler.alpha.kubernetes.io/node-selector".to_string(),
            format!("{}={}", NODE_LABEL.0, NODE_LABEL.1),
        ),
        (
            "scheduler.alpha.kubernetes.io/defaultTolerations".to_string(),
            format!(r#"[{{"key":"{TAINT_KEY}","operator":"Exists","effect":"NoSchedule"}}]"#),
        ),
    ])
}

/// Writes a kubeconfig for a user with groups and returns its path (the plane's CA signs it).
pub type IdentityFn = Arc<dyn Fn(&str, &[&str]) -> anyhow::Result<PathBuf> + Send + Sync>;

/// How the runtime maps images to local programs.
#[derive(Clone)]
pub struct RuntimeConfig {
    /// Working directory (pods, volumes, hosts file).
    pub dir: PathBuf,
    /// Where the per-process logs go (`<ns>_<pod>_<container>.log`).
    pub logs: PathBuf,
    /// The `kab` binary.
    pub kab_binary: PathBuf,
    /// The `nats-server` binary.
    pub nats_binary: PathBuf,
    /// Image prefixes that run the kab binary.
    pub kab_images: Vec<String>,
    /// Image prefixes that run nats-server.
    pub nats_images: Vec<String>,
    /// Issues kubeconfigs for pod identities.
    pub identity: IdentityFn,
}

impl RuntimeConfig {
    /// The defaults for this build: kab's and NATS's release images.
    pub fn new(
        dir: PathBuf,
        kab_binary: PathBuf,
        nats_binary: PathBuf,
        identity: IdentityFn,
    ) -> Self {
        let settings = crate::render::Settings::default();
        let kab_repo = settings
            .kab_image
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        Self {
            logs: dir.join("logs"),
            dir,
            kab_binary,
            nats_binary,
            kab_images: vec![kab_repo],
            nats_images: vec![
                "docker.io/library/nats".into(),
                "nats".into(),
                "library/nats".into(),
            ],
            identity,
        }
    }

    fn program_for(&self, image: &str) -> Option<pod::Program> {
        let repo = image.split('@').next().unwrap_or(image);
        let repo = match repo.rsplit_once(':') {
            Some((r, tag)) if !tag.contains('/') => r,
            _ => repo,
        };
        if self.kab_images.iter().any(|p| repo == p) {
            Some(pod::Program::Kab)
        } else if self.nats_images.iter().any(|p| repo == p) {
            Some(pod::Program::Nats)
        } else {
            None
        }
    }
}

/// Shared state of the runtime.
pub(crate) struct State {
    pub(crate) client: Client,
    pub(crate) config: RuntimeConfig,
    pub(crate) pods: Mutex<HashMap<String, pod::PodHandle>>,
    pub(crate) objects: Mutex<Objects>,
    pub(crate) next_ip: Mutex<u32>,
}

/// ConfigMaps and Secrets the volumes project, by `namespace/name`.
#[derive(Default)]
pub(crate) struct Objects {
    pub(crate) config_maps: HashMap<String, ConfigMap>,
    pub(crate) secrets: HashMap<String, Secret>,
}

impl State {
    pub(crate) fn lock_pods(&self) -> std::sync::MutexGuard<'_, HashMap<String, pod::PodHandle>> {
        crate::lock(&self.pods)
    }
    pub(crate) fn lock_objects(&self) -> std::sync::MutexGuard<'_, Objects> {
        crate::lock(&self.objects)
    }
    pub(crate) fn hosts_file(&self) -> PathBuf {
        self.config.dir.join("hosts")
    }
}

/// A running local runtime. Dropping it stops every process it started and removes the Service
/// addresses it added.
pub struct LocalRuntime {
    state: Arc<State>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    proxy: Arc<proxy::Proxy>,
}

impl LocalRuntime {
    /// Registers the node and starts running the pods bound to it.
    pub async fn start(client: Client, config: RuntimeConfig) -> anyhow::Result<Self> {
        for d in [&config.dir, &config.logs] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::fs::write(config.dir.join("hosts"), "")?;
        let state = Arc::new(State {
            client: client.clone(),
            config,
            pods: Mutex::new(HashMap::new()),
            objects: Mutex::new(Objects::default()),
            next_ip: Mutex::new(1),
        });
        register_node(&client).await?;
        let proxy = Arc::new(proxy::Proxy::new(state.clone()));
        let tasks = vec![
            tokio::spawn(heartbeat(client.clone())),
            tokio::spawn(watch_objects(state.clone())),
            tokio::spawn(watch_pods(state.clone())),
            tokio::spawn(proxy.clone().watch_services()),
        ];
        Ok(Self {
            state,
            tasks,
            proxy,
        })
    }

    /// Every process the runtime runs now.
    pub fn processes(&self) -> Vec<ProcessInfo> {
        let pods = self.state.lock_pods();
        let mut all: Vec<ProcessInfo> = pods.values().flat_map(|p| p.processes()).collect();
        all.sort_by(|a, b| {
            (&a.namespace, &a.pod, &a.container).cmp(&(&b.namespace, &b.pod, &b.container))
        });
        all
    }

    /// Directory of the per-process logs (`<ns>_<pod>_<container>.log`).
    pub fn logs_dir(&self) -> PathBuf {
        self.state.config.logs.clone()
    }

    /// The runtime's working directory.
    pub fn dir(&self) -> &Path {
        &self.state.config.dir
    }

    /// Stops every process and the proxy.
    pub fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        let pods: Vec<pod::PodHandle> = self.state.lock_pods().drain().map(|(_, p)| p).collect();
        for p in pods {
            p.shutdown_now();
        }
        self.proxy.shutdown();
    }
}

impl Drop for LocalRuntime {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn register_node(client: &Client) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE_NAME, "labels": {
            NODE_LABEL.0: NODE_LABEL.1, "kubernetes.io/hostname": NODE_NAME, "kubernetes.io/os": "linux",
            "type": "kab-local"}},
        "spec": {"taints": [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}]},
    });
    nodes
        .patch(
            NODE_NAME,
            &PatchParams::apply("kab-local-runtime").force(),
            &Patch::Apply(&node),
        )
        .await
        .context("registering the local node")?;
    let now = Timestamp::now().to_string();
    let status = serde_json::json!({"status": {
        "capacity": {"cpu": "8", "memory": "16Gi", "pods": "1000"},
        "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "1000"},
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": NODE_NAME}],
        "nodeInfo": {"kubeletVersion": "v1.37.2-kab-local", "operatingSystem": "linux", "architecture": std::env::consts::ARCH,
                     "containerRuntimeVersion": "kab-local://1", "kernelVersion": "", "osImage": "local processes",
                     "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": ""},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "kab local runtime is running", "lastHeartbeatTime": now, "lastTransitionTime": now}],
    }});
    nodes
        .patch_status(NODE_NAME, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("reporting the local node Ready")?;
    Ok(())
}

/// Renews the node Lease every 10 s, as a kubelet does.
async fn heartbeat(client: Client) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    loop {
        let lease = serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": NODE_NAME},
            "spec": {"holderIdentity": NODE_NAME, "leaseDurationSeconds": 40,
                     "renewTime": Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()},
        });
        if let Err(e) = leases
            .patch(
                NODE_NAME,
                &PatchParams::apply("kab-local-runtime").force(),
                &Patch::Apply(&lease),
            )
            .await
        {
            tracing::warn!(error = %e, "renewing the local node lease");
        }
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    }
}

/// Keeps the ConfigMaps and Secrets that volumes project, and refreshes the volumes on change.
async fn watch_objects(state: Arc<State>) {
    let cms = watcher(
        Api::<ConfigMap>::all(state.client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects()
    .map(|r| r.map(Obj::Cm));
    let secrets = watcher(
        Api::<Secret>::all(state.client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects()
    .map(|r| r.map(Obj::Secret));
    let mut merged = std::pin::pin!(futures::stream::select(cms, secrets));
    while let Some(item) = merged.next().await {
        let Ok(obj) = item else { continue };
        let (ns, name) = match &obj {
            Obj::Cm(c) => (c.namespace().unwrap_or_default(), c.name_any()),
            Obj::Secret(s) => (s.namespace().unwrap_or_default(), s.name_any()),
        };
        {
            let mut objects = state.lock_objects();
            match obj {
                Obj::Cm(c) => {
                    objects.config_maps.insert(format!("{ns}/{name}"), c);
                }
                Obj::Secret(s) => {
                    objects.secrets.insert(format!("{ns}/{name}"), s);
                }
            }
        }
        let pods: Vec<pod::PodHandle> = state.lock_pods().values().cloned().collect();
        for p in pods {
            if p.namespace() == ns {
                p.refresh_volumes();
            }
        }
    }
}

enum Obj {
    Cm(ConfigMap),
    Secret(Secret),
}

/// Starts and stops pods bound to the local node.
async fn watch_pods(state: Arc<State>) {
    let api: Api<Pod> = Api::all(state.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={NODE_NAME}"));
    let stream = watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        let Ok(event) = event else { continue };
        match event {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) => on_pod(&state, p),
            watcher::Event::Delete(p) => {
                let uid = p.uid().unwrap_or_default();
                let handle = state.lock_pods().remove(&uid);
                if let Some(h) = handle {
                    h.shutdown_now();
                }
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
    }
}

fn on_pod(state: &Arc<State>, p: Pod) {
    let uid = p.uid().unwrap_or_default();
    if uid.is_empty() {
        return;
    }
    let existing = state.lock_pods().get(&uid).cloned();
    match existing {
        Some(h) => h.update(p),
        None => {
            if p.metadata.deletion_timestamp.is_some() {
                // Never started here (e.g. after a restart of the runtime): finish the delete.
                let client = state.client.clone();
                tokio::spawn(async move { pod::force_delete(&client, &p).await });
                return;
            }
            let ip = {
                let mut n = crate::lock(&state.next_ip);
                *n += 1;
                *n
            };
            let handle = pod::PodHandle::start(state.clone(), p, ip);
            state.lock_pods().insert(uid, handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RuntimeConfig {
        RuntimeConfig::new(
            PathBuf::from("/tmp/x"),
            PathBuf::from("/bin/kab"),
            PathBuf::from("/bin/nats-server"),
            Arc::new(|_, _| Ok(PathBuf::new())),
        )
    }

    #[test]
    fn images_map_to_local_programs() {
        let c = cfg();
        assert_eq!(
            c.program_for(&crate::render::Settings::default().kab_image),
            Some(pod::Program::Kab)
        );
        assert_eq!(
            c.program_for("docker.io/library/nats:2.15.2-alpine"),
            Some(pod::Program::Nats)
        );
        assert_eq!(c.program_for("nats:2.15.2"), Some(pod::Program::Nats));
        assert_eq!(c.program_for("nginx:1.27"), None);
        assert_eq!(c.program_for("ghcr.io/kab-dev/kab-other:1"), None);
    }

    #[test]
    fn namespace_annotations_select_the_local_node() {
        let a = namespace_annotations();
        assert_eq!(
            a["scheduler.alpha.kubernetes.io/node-selector"],
            "kab.dev/node=local"
        );
        let tolerations: serde_json::Value =
            serde_json::from_str(&a["scheduler.alpha.kubernetes.io/defaultTolerations"]).unwrap();
        assert_eq!(tolerations[0]["key"], TAINT_KEY);
    }
}
