//! The local workload runtime shared by the run: pods bound to the `kab-local` node run as local
//! processes.

use std::sync::{Arc, Mutex};

use kab::plane::Plane;
use kab::runtime::{LocalRuntime, ProcessInfo};

use super::Ctx;

/// The runtime shared by the run (one `kab-local` node).
pub struct Runtime(Mutex<LocalRuntime>);

impl Runtime {
    /// The processes it runs now.
    pub fn processes(&self) -> Vec<ProcessInfo> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).processes()
    }
}

/// Starts (once) the local runtime with the built kab binary and the plane's nats-server.
pub async fn runtime(ctx: &Ctx) -> anyhow::Result<Arc<Runtime>> {
    ctx.shared(|plane: Arc<Plane>| async move {
        let kab = env!("CARGO_BIN_EXE_kab").into();
        let rt = kab::dev::start_runtime(plane.clone(), plane.client(), kab).await?;
        Ok(Runtime(Mutex::new(rt)))
    })
    .await
}

/// A namespace whose pods the local runtime runs.
pub async fn local_namespace(ctx: &Ctx, prefix: &str) -> anyhow::Result<String> {
    runtime(ctx).await?;
    ctx.namespace_with(prefix, kab::runtime::namespace_annotations())
        .await
}
