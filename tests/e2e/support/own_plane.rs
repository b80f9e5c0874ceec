//! A control plane of a test's own, for what the run's shared plane cannot give: installs that
//! change the cluster, or an operator whose every reconciliation is the test's.

use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kab::plane::{Plane, PlaneOptions};
use kube::api::{Api, PostParams};
use serde_json::json;

use super::wait_for;

/// A control plane for one test; kept on disk (logs, audit) when the test fails.
pub struct OwnPlane(Option<Plane>);

impl OwnPlane {
    pub async fn start() -> anyhow::Result<OwnPlane> {
        let plane = Plane::start(PlaneOptions {
            progress: false,
            ..PlaneOptions::default()
        })
        .await
        .context("starting a control plane of the test's own")?;
        Ok(OwnPlane(Some(plane)))
    }

    pub fn get(&self) -> &Plane {
        self.0.as_ref().expect("present until stopped")
    }

    /// Stops the plane off the async threads; keeps its directory when `result` is an error.
    pub async fn stop<T>(mut self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        let Some(plane) = self.0.take() else {
            return result;
        };
        let result = match result {
            Err(e) => {
                plane.set_keep_dir(true);
                Err(e.context(format!(
                    "the test's plane is kept in {}",
                    plane.dir().display()
                )))
            }
            ok => ok,
        };
        let _ = tokio::task::spawn_blocking(move || plane.stop()).await;
        result
    }
}

/// A namespace enforcing Pod Security `restricted`, once its `default` ServiceAccount exists.
pub async fn restricted_namespace(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let ns: Namespace = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}},
    }))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    wait_for(
        &sas,
        "default",
        |sa: Option<&ServiceAccount>| sa.is_some(),
        Duration::from_secs(120),
    )
    .await?;
    Ok(())
}
