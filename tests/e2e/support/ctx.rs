//! What a test gets: the plane, a client, fresh namespaces, kubectl, and
//! lazily started resources shared by the whole run.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kab::plane::Plane;
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::OnceCell;

use super::wait::wait_for;

type Shared = Arc<dyn Any + Send + Sync>;

/// State of the whole run.
pub struct Suite {
    plane: Arc<Plane>,
    shared: Mutex<HashMap<TypeId, Arc<OnceCell<Shared>>>>,
}

impl Suite {
    pub(super) fn new(plane: Arc<Plane>) -> Self {
        Self {
            plane,
            shared: Mutex::new(HashMap::new()),
        }
    }

    /// Drops the shared resources (their `Drop` stops them).
    pub(super) fn teardown(&self) {
        let resources: Vec<_> = lock(&self.shared).drain().collect();
        drop(resources);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Scope {
    name: String,
    namespaces: Mutex<Vec<String>>,
}

/// The context of one test (cheap to clone).
#[derive(Clone)]
pub struct Ctx {
    suite: Arc<Suite>,
    scope: Arc<Scope>,
}

impl Ctx {
    pub(super) fn new(suite: Arc<Suite>, test: &str) -> Self {
        Self {
            suite,
            scope: Arc::new(Scope {
                name: test.to_string(),
                namespaces: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The running test's name.
    pub fn name(&self) -> &str {
        &self.scope.name
    }

    /// The control plane shared by the run.
    pub fn plane(&self) -> &Arc<Plane> {
        &self.suite.plane
    }

    /// An admin (`system:masters`) client.
    pub fn client(&self) -> kube::Client {
        self.suite.plane.client()
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        self.suite.plane.kubeconfig_path()
    }

    /// A built binary (`kubectl`, `nats-server`, ...).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.suite.plane.bin(name)
    }

    /// Creates a fresh namespace `<prefix>-xxxxx` enforcing the `restricted`
    /// Pod Security level, waits for its `default` ServiceAccount (pods are
    /// rejected before it exists), and deletes it after the test (without
    /// waiting).
    pub async fn namespace(&self, prefix: &str) -> anyhow::Result<String> {
        self.namespace_with(prefix, std::collections::BTreeMap::new())
            .await
    }

    /// [`Ctx::namespace`] with annotations (e.g. the local runtime's node
    /// selector).
    pub async fn namespace_with(
        &self,
        prefix: &str,
        annotations: std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<String> {
        let api: Api<Namespace> = Api::all(self.client());
        let ns: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "generateName": format!("{}-", dns_label(prefix, 50)),
                "annotations": annotations,
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "kab.dev/e2e-test": dns_label(&self.scope.name, 63),
                },
            },
        }))?;
        let name = api
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating a namespace {prefix}-*"))?
            .name_any();
        lock(&self.scope.namespaces).push(name.clone());
        let sas: Api<ServiceAccount> = Api::namespaced(self.client(), &name);
        wait_for(
            &sas,
            "default",
            |sa: Option<&ServiceAccount>| sa.is_some(),
            Duration::from_secs(60),
        )
        .await
        .with_context(|| format!("namespace {name}: waiting for the default ServiceAccount"))?;
        Ok(name)
    }

    /// Runs the built kubectl with the admin kubeconfig; returns stdout, or an
    /// error with the exit status and stderr.
    pub async fn kubectl<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.kubectl_with_stdin(args, "").await
    }

    /// [`Ctx::kubectl`] with `stdin` fed to the process (e.g. `apply -f -`).
    pub async fn kubectl_with_stdin<I, S>(&self, args: I, stdin: &str) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let shown = args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = tokio::process::Command::new(self.bin("kubectl"))
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting kubectl {shown}"))?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes()).await?;
        }
        let out = child
            .wait_with_output()
            .await
            .with_context(|| format!("running kubectl {shown}"))?;
        if !out.status.success() {
            bail!(
                "kubectl {shown}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A resource shared by the whole run, started by the first caller with
    /// `init` and dropped after the last test (before the plane stops). One
    /// instance per type `T`; a failed `init` is retried by the next caller.
    pub async fn shared<T, F, Fut>(&self, init: F) -> anyhow::Result<Arc<T>>
    where
        T: Any + Send + Sync,
        F: FnOnce(Arc<Plane>) -> Fut,
        Fut: Future<Output = anyhow::Result<T>>,
    {
        let cell = lock(&self.suite.shared)
            .entry(TypeId::of::<T>())
            .or_default()
            .clone();
        let plane = self.suite.plane.clone();
        let value = cell
            .get_or_try_init(
                || async move { Ok::<Shared, anyhow::Error>(Arc::new(init(plane).await?)) },
            )
            .await?
            .clone();
        value
            .downcast::<T>()
            .map_err(|_| anyhow!("shared resource has an unexpected type"))
    }

    /// Deletes the test's namespaces (not waiting for them to go).
    pub(super) async fn cleanup(&self) {
        let names = std::mem::take(&mut *lock(&self.scope.namespaces));
        let api: Api<Namespace> = Api::all(self.client());
        let dp = DeleteParams::background();
        for name in names {
            let delete = api.delete(&name, &dp);
            match tokio::time::timeout(Duration::from_secs(10), delete).await {
                Ok(Ok(_)) | Ok(Err(kube::Error::Api(_))) => {} // e.g. already gone
                Ok(Err(e)) => eprintln!("e2e: deleting namespace {name}: {e}"),
                Err(_) => eprintln!("e2e: deleting namespace {name}: timed out"),
            }
        }
    }
}

/// A DNS label from arbitrary text: lowercase alphanumerics and `-`, at most
/// `max` characters, starting and ending alphanumeric.
pub fn dns_label(text: &str, max: usize) -> String {
    let mapped: String = text
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(max)
        .collect();
    let trimmed = mapped.trim_matches('-');
    if trimmed.is_empty() {
        "x".into()
    } else {
        trimmed.to_string()
    }
}
