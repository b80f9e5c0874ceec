//! Services for local pods, the way kube-proxy's userspace mode did it: the Service's ClusterIP
//! is added to the loopback interface, a listener on `ClusterIP:port` forwards each connection to
//! a ready local pod selected by the Service (round robin). A hosts file maps
//! `<svc>.<ns>.svc[.cluster.local]` to the ClusterIP for processes that resolve names.

use super::State;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The proxy for every Service that selects local pods.
pub struct Proxy {
    state: Arc<State>,
    /// `ns/name` → (listener tasks, ClusterIP, ports).
    services: Mutex<HashMap<String, Served>>,
    /// Addresses added to `lo`, removed at shutdown.
    addresses: Mutex<Vec<IpAddr>>,
}

struct Served {
    key: String,
    ip: IpAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// A proxy over the runtime's pods.
    pub(crate) fn new(state: Arc<State>) -> Self {
        Self {
            state,
            services: Mutex::new(HashMap::new()),
            addresses: Mutex::new(Vec::new()),
        }
    }

    /// Follows Services and serves those with a ClusterIP and a selector.
    pub(crate) async fn watch_services(self: Arc<Self>) {
        let api: Api<Service> = Api::all(self.state.client.clone());
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            let Ok(event) = event else { continue };
            match event {
                watcher::Event::Apply(s) | watcher::Event::InitApply(s) => self.serve(s),
                watcher::Event::Delete(s) => {
                    let key = format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any());
                    let old = self.lock().remove(&key);
                    if let Some(old) = old {
                        for t in old.tasks {
                            t.abort();
                        }
                    }
                    self.write_hosts();
                }
                _ => {}
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Served>> {
        crate::lock(&self.services)
    }

    fn serve(self: &Arc<Self>, svc: Service) {
        let ns = svc.namespace().unwrap_or_default();
        let key = format!("{ns}/{}", svc.name_any());
        let Some(spec) = svc.spec.clone() else { return };
        let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .and_then(|i| i.parse::<IpAddr>().ok())
        else {
            return;
        };
        let Some(selector) = spec.selector.clone().filter(|s| !s.is_empty()) else {
            return;
        };
        if let Some(old) = self.lock().remove(&key) {
            for t in old.tasks {
                t.abort();
            }
        }
        if let Err(e) = add_address(ip) {
            tracing::warn!(service = %key, %ip, error = %e, "cannot add the ClusterIP to the loopback interface");
            return;
        }
        crate::lock(&self.addresses).push(ip);
        let mut tasks = Vec::new();
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                continue;
            }
            let target = port
                .target_port
                .clone()
                .unwrap_or(IntOrString::Int(port.port));
            let addr = SocketAddr::new(ip, port.port as u16);
            let me = self.clone();
            let ns = ns.clone();
            let selector = selector.clone();
            let key2 = key.clone();
            tasks.push(tokio::spawn(async move {
                let listener = match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(service = %key2, %addr, error = %e, "cannot listen for the Service");
                        return;
                    }
                };
                let next = AtomicUsize::new(0);
                loop {
                    let Ok((inbound, _)) = listener.accept().await else { continue };
                    let backends = me.backends(&ns, &selector, &target);
                    if backends.is_empty() {
                        drop(inbound);
                        continue;
                    }
                    let port = backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
                    tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                            let mut inbound = inbound;
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
            }));
        }
        self.lock().insert(key.clone(), Served { key, ip, tasks });
        self.write_hosts();
    }

    /// Local ports of the ready pods in `ns` matching `selector`, for `target`.
    fn backends(
        &self,
        ns: &str,
        selector: &BTreeMap<String, String>,
        target: &IntOrString,
    ) -> Vec<u16> {
        let pods = self.state.lock_pods();
        let mut ports: Vec<(String, u16)> = pods
            .values()
            .filter(|p| p.namespace() == ns)
            .filter(|p| {
                let labels = p.labels();
                selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            })
            .filter_map(|p| {
                p.backend(target).map(|port| {
                    (
                        p.processes()
                            .first()
                            .map(|i| i.pod.clone())
                            .unwrap_or_default(),
                        port,
                    )
                })
            })
            .collect();
        ports.sort();
        ports.into_iter().map(|(_, p)| p).collect()
    }

    fn write_hosts(&self) {
        let services = self.lock();
        let mut lines: Vec<String> = services
            .values()
            .map(|s| {
                let (ns, name) = s.key.split_once('/').unwrap_or(("", &s.key));
                format!(
                    "{} {name}.{ns}.svc {name}.{ns}.svc.cluster.local {name}.{ns}",
                    s.ip
                )
            })
            .collect();
        lines.sort();
        let path = self.state.hosts_file();
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, lines.join("\n") + "\n").is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }

    /// Stops serving and removes the addresses added to `lo`.
    pub fn shutdown(&self) {
        for (_, s) in self.lock().drain() {
            for t in s.tasks {
                t.abort();
            }
        }
        for ip in crate::lock(&self.addresses).drain(..) {
            let _ = std::process::Command::new("ip")
                .args(["addr", "del", &format!("{ip}/32"), "dev", "lo"])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Adds `ip/32` to the loopback interface (an existing address is fine).
fn add_address(ip: IpAddr) -> anyhow::Result<()> {
    if std::net::TcpListener::bind(SocketAddr::new(ip, 0)).is_ok() {
        return Ok(());
    }
    let out = std::process::Command::new("ip")
        .args(["addr", "add", &format!("{ip}/32"), "dev", "lo"])
        .output()
        .map_err(|e| anyhow::anyhow!("running `ip addr add` (iproute2): {e}"))?;
    if out.status.success() || String::from_utf8_lossy(&out.stderr).contains("File exists") {
        Ok(())
    } else {
        anyhow::bail!(
            "`ip addr add {ip}/32 dev lo` failed: {} (the local runtime needs CAP_NET_ADMIN to serve Services)",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
}
