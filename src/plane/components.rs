//! The plane's files and the command lines of its components.

use std::path::{Path, PathBuf};

/// The second octet of this process's service CIDR: 10.96–10.127, picked per process so that
/// two planes running at once (two test runs) never hand out the same ClusterIP — the local
/// runtime puts ClusterIPs on the loopback interface, which all processes share.
fn service_octet() -> u8 {
    static OCTET: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *OCTET.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        96 + ((std::process::id() ^ nanos) % 32) as u8
    })
}

/// The service CIDR: a /16 (a /24 runs out after 254 Services).
pub fn service_cidr() -> String {
    format!("10.{}.0.0/16", service_octet())
}

/// The first service IP (the `kubernetes` Service), also a serving-cert SAN.
pub fn service_ip() -> String {
    format!("10.{}.0.1", service_octet())
}
/// KWOK's pod CIDR (its default overlaps the service range).
pub const POD_CIDR: &str = "10.244.0.0/16";
/// The service-account token issuer.
pub const SA_ISSUER: &str = "https://kubernetes.default.svc";

/// Audit policy: Metadata level for write verbs, nothing else. Only the
/// `ResponseComplete` stage is kept, so each write is one line.
pub const AUDIT_POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages:
- RequestReceived
rules:
- level: Metadata
  verbs: [create, update, patch, delete, deletecollection]
- level: None
";

/// KWOK stage files (project-owned, in `tests/kwok/`): `(file name, content)`.
pub const STAGES: &[(&str, &str)] = &[
    (
        "node-initialize.yaml",
        include_str!("../../tests/kwok/node-initialize.yaml"),
    ),
    (
        "node-heartbeat.yaml",
        include_str!("../../tests/kwok/node-heartbeat.yaml"),
    ),
    (
        "pod-ready.yaml",
        include_str!("../../tests/kwok/pod-ready.yaml"),
    ),
    (
        "pod-crash-loop.yaml",
        include_str!("../../tests/kwok/pod-crash-loop.yaml"),
    ),
    (
        "pod-complete.yaml",
        include_str!("../../tests/kwok/pod-complete.yaml"),
    ),
    (
        "pod-delete.yaml",
        include_str!("../../tests/kwok/pod-delete.yaml"),
    ),
    (
        "pvc-provision.yaml",
        include_str!("../../tests/kwok/pvc-provision.yaml"),
    ),
    (
        "pv-bind.yaml",
        include_str!("../../tests/kwok/pv-bind.yaml"),
    ),
    (
        "pvc-delete.yaml",
        include_str!("../../tests/kwok/pvc-delete.yaml"),
    ),
    (
        "pv-delete.yaml",
        include_str!("../../tests/kwok/pv-delete.yaml"),
    ),
];

/// The default StorageClass the KWOK volume stages provision for.
pub const STORAGE_CLASS: &str = "kwok-volume";

/// The component names, in start order.
pub const ETCD: &str = "etcd";
pub const APISERVER: &str = "kube-apiserver";
pub const CONTROLLER_MANAGER: &str = "kube-controller-manager";
pub const SCHEDULER: &str = "kube-scheduler";
pub const KWOK: &str = "kwok";

/// Where everything of one plane lives.
#[derive(Clone, Debug)]
pub struct Layout {
    pub dir: PathBuf,
    pub logs: PathBuf,
    pub etcd_data: PathBuf,
    pub pki: PathBuf,
    pub ca_crt: PathBuf,
    pub ca_key: PathBuf,
    pub apiserver_crt: PathBuf,
    pub apiserver_key: PathBuf,
    pub admin_crt: PathBuf,
    pub admin_key: PathBuf,
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
    pub kubeconfig: PathBuf,
    pub audit_policy: PathBuf,
    pub audit_log: PathBuf,
    pub stages: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Self {
        let pki = dir.join("pki");
        Self {
            dir: dir.to_path_buf(),
            logs: dir.join("logs"),
            etcd_data: dir.join("etcd-data"),
            ca_crt: pki.join("ca.crt"),
            ca_key: pki.join("ca.key"),
            apiserver_crt: pki.join("apiserver.crt"),
            apiserver_key: pki.join("apiserver.key"),
            admin_crt: pki.join("admin.crt"),
            admin_key: pki.join("admin.key"),
            sa_key: pki.join("sa.key"),
            sa_pub: pki.join("sa.pub"),
            pki,
            kubeconfig: dir.join("admin.kubeconfig"),
            audit_policy: dir.join("audit-policy.yaml"),
            audit_log: dir.join("audit.log"),
            stages: dir.join("kwok-stages"),
        }
    }

    pub fn log(&self, component: &str) -> PathBuf {
        self.logs.join(format!("{component}.log"))
    }

    pub fn stage_files(&self) -> Vec<PathBuf> {
        STAGES
            .iter()
            .map(|(name, _)| self.stages.join(name))
            .collect()
    }
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Ports of one plane.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub apiserver: u16,
}

pub fn etcd_args(l: &Layout, ports: Ports) -> Vec<String> {
    let client = format!("http://127.0.0.1:{}", ports.etcd_client);
    let peer = format!("http://127.0.0.1:{}", ports.etcd_peer);
    vec![
        "--name=default".into(),
        format!("--data-dir={}", p(&l.etcd_data)),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=default={peer}"),
        "--initial-cluster-state=new".into(),
        "--unsafe-no-fsync=true".into(),
        "--log-level=warn".into(),
    ]
}

pub fn apiserver_args(l: &Layout, ports: Ports, extra: &[String]) -> Vec<String> {
    let mut args = vec![
        format!("--etcd-servers=http://127.0.0.1:{}", ports.etcd_client),
        "--bind-address=127.0.0.1".into(),
        "--advertise-address=127.0.0.1".into(),
        format!("--secure-port={}", ports.apiserver),
        format!("--tls-cert-file={}", p(&l.apiserver_crt)),
        format!("--tls-private-key-file={}", p(&l.apiserver_key)),
        format!("--client-ca-file={}", p(&l.ca_crt)),
        "--authorization-mode=RBAC".into(),
        format!("--service-account-issuer={SA_ISSUER}"),
        format!("--service-account-key-file={}", p(&l.sa_pub)),
        format!("--service-account-signing-key-file={}", p(&l.sa_key)),
        format!("--service-cluster-ip-range={}", service_cidr()),
        // Namespaces whose pods the local runtime runs select its node by annotation.
        "--enable-admission-plugins=PodNodeSelector,PodTolerationRestriction".into(),
        "--endpoint-reconciler-type=none".into(),
        format!("--audit-policy-file={}", p(&l.audit_policy)),
        format!("--audit-log-path={}", p(&l.audit_log)),
        "--audit-log-mode=blocking".into(),
        "--profiling=false".into(),
    ];
    args.extend(extra.iter().cloned());
    args
}

const FAST_CLIENT: [&str; 2] = ["--kube-api-qps=400", "--kube-api-burst=800"];

pub fn controller_manager_args(l: &Layout, fast: bool) -> Vec<String> {
    let mut args = vec![
        format!("--kubeconfig={}", p(&l.kubeconfig)),
        "--leader-elect=false".into(),
        "--secure-port=0".into(),
        format!("--service-account-private-key-file={}", p(&l.sa_key)),
        format!("--root-ca-file={}", p(&l.ca_crt)),
    ];
    if fast {
        args.extend(FAST_CLIENT.iter().map(|s| s.to_string()));
        args.push("--concurrent-deployment-syncs=20".into());
        args.push("--concurrent-replicaset-syncs=20".into());
    }
    args
}

pub fn scheduler_args(l: &Layout, fast: bool) -> Vec<String> {
    let mut args = vec![
        format!("--kubeconfig={}", p(&l.kubeconfig)),
        "--leader-elect=false".into(),
        "--bind-address=127.0.0.1".into(),
        "--secure-port=0".into(),
    ];
    if fast {
        args.extend(FAST_CLIENT.iter().map(|s| s.to_string()));
    }
    args
}

pub fn kwok_args(l: &Layout) -> Vec<String> {
    let mut args = vec![
        format!("--kubeconfig={}", p(&l.kubeconfig)),
        // Only the fake nodes: the local runtime's node (kab-local) is not KWOK's.
        "--manage-nodes-with-label-selector=type=kwok".into(),
        format!("--cidr={POD_CIDR}"),
        "--node-ip=127.0.0.1".into(),
    ];
    args.extend(l.stage_files().iter().map(|f| format!("--config={}", p(f))));
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new(Path::new("/tmp/plane"))
    }

    const PORTS: Ports = Ports {
        etcd_client: 2379,
        etcd_peer: 2380,
        apiserver: 6443,
    };

    #[test]
    fn apiserver_flags() {
        let args = apiserver_args(&layout(), PORTS, &["--v=2".into()]);
        for want in [
            "--etcd-servers=http://127.0.0.1:2379",
            "--secure-port=6443",
            &format!("--service-cluster-ip-range={}", service_cidr()),
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
            "--audit-log-path=/tmp/plane/audit.log",
            "--audit-policy-file=/tmp/plane/audit-policy.yaml",
            "--client-ca-file=/tmp/plane/pki/ca.crt",
            "--v=2",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} missing: {args:?}");
        }
        // ServiceAccount admission stays on: nothing disables admission plugins.
        assert!(
            !args
                .iter()
                .any(|a| a.starts_with("--disable-admission-plugins"))
        );
    }

    #[test]
    fn fast_mode_lifts_client_limits() {
        let slow = controller_manager_args(&layout(), false);
        assert!(!slow.iter().any(|a| a.starts_with("--kube-api-qps")));
        let fast = controller_manager_args(&layout(), true);
        for want in [
            "--kube-api-qps=400",
            "--kube-api-burst=800",
            "--concurrent-deployment-syncs=20",
            "--concurrent-replicaset-syncs=20",
        ] {
            assert!(fast.iter().any(|a| a == want), "{want} missing: {fast:?}");
        }
        let sched = scheduler_args(&layout(), true);
        assert!(sched.iter().any(|a| a == "--kube-api-qps=400"));
        assert!(
            !scheduler_args(&layout(), false)
                .iter()
                .any(|a| a.contains("qps"))
        );
    }

    #[test]
    fn etcd_listens_on_loopback_only() {
        let args = etcd_args(&layout(), PORTS);
        assert!(args.contains(&"--listen-client-urls=http://127.0.0.1:2379".to_string()));
        assert!(args.contains(&"--initial-cluster=default=http://127.0.0.1:2380".to_string()));
    }

    #[test]
    fn kwok_gets_every_stage() {
        let args = kwok_args(&layout());
        assert_eq!(
            args.iter().filter(|a| a.starts_with("--config=")).count(),
            STAGES.len()
        );
        assert!(args.contains(&"--cidr=10.244.0.0/16".to_string()));
        assert!(args.contains(&"--manage-nodes-with-label-selector=type=kwok".to_string()));
    }

    #[test]
    fn pod_ready_stage_skips_crash_loop_pods() {
        let ready = STAGES
            .iter()
            .find(|(n, _)| *n == "pod-ready.yaml")
            .map(|(_, c)| *c)
            .unwrap();
        assert!(ready.contains("kab.dev/simulate"));
        assert!(ready.contains("NotIn"));
        let crash = STAGES
            .iter()
            .find(|(n, _)| *n == "pod-crash-loop.yaml")
            .map(|(_, c)| *c)
            .unwrap();
        assert!(crash.contains("CrashLoopBackOff"));
    }
}
