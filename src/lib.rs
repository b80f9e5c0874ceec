//! kab: Kubernetes as the backend of business applications.
//!
//! The operator's pipeline, `finalizer → validate → certificates → render → plan → apply → prune
//! → status`, lives in [`operator`], a file per step. The pure parts it builds on stand on their
//! own: [`api`] (the KabStack type), [`validate`], [`certs`], [`render`], [`status`] and
//! [`health`]. [`webhook`] and [`entity_controller`] are the per-stack processes; [`cli`],
//! [`dev`] and [`plane`] (a local control plane for `kab dev` and the end-to-end tests) serve
//! people. Imports point one way: `cli`/`dev` → `operator`/`webhook`/`entity_controller` → the
//! pure modules.

pub mod admission_probe;
pub mod api;
pub mod certs;
pub mod cli;
pub mod dev;
pub mod entity_controller;
pub mod health;
pub mod hosts;
pub mod index;
pub mod install;
pub mod leader;
pub mod metrics;
pub mod olm;
pub mod operator;
pub mod plane;
pub mod render;
pub mod runtime;
pub mod status;
pub mod telemetry;
pub mod validate;
pub mod webhook;

/// The KabStack CustomResourceDefinition as YAML (what `kab crd` prints and `crds/` holds).
pub fn crd_yaml() -> anyhow::Result<String> {
    use kube::CustomResourceExt;
    let crd = api::KabStack::crd();
    Ok(serde_saphyr::to_string(&crd)?)
}

/// Locks a mutex of kab's in-memory state. The maps behind kab's mutexes stay consistent enough
/// to read after a panic elsewhere while one was held, so poisoning is ignored.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Read-locks an `RwLock` of kab's in-memory state, ignoring poisoning as [`lock`] does.
pub fn read<T>(l: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Write-locks an `RwLock` of kab's in-memory state, ignoring poisoning as [`lock`] does.
pub fn write<T>(l: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether a test that compares with a committed file rewrites it instead: `KAB_BLESS=1`
/// (any other value, or none, compares).
#[cfg(test)]
pub(crate) fn bless() -> bool {
    std::env::var("KAB_BLESS").is_ok_and(|v| v == "1")
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    /// The committed CRD must be what `kab crd` prints (`KAB_BLESS=1` rewrites it).
    #[test]
    fn committed_crd_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/kabstack.yaml");
        let generated = super::crd_yaml().unwrap();
        if super::bless() {
            std::fs::write(path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "crds/kabstack.yaml is stale: run `cargo run -- crd > crds/kabstack.yaml` (or KAB_BLESS=1 cargo test)"
        );
    }
}
