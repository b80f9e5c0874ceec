//! kab's finalizer on every KabStack, for what garbage collection cannot remove: the
//! cluster-scoped webhook registration and entity CRD. [`Gate`] adds it to a new stack while the
//! first reconcile goes on; [`cleanup`] runs when the stack is deleted.

use super::Ctx;
use super::error::{Error, Stage};
use crate::api::{DeletionPolicy, KabStack};
use crate::render;
use futures::FutureExt;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use std::sync::Arc;

/// Finalizer on every KabStack: removes the cluster-scoped children (webhook registration first).
pub const FINALIZER: &str = "kab.dev/cleanup";

type GateFuture =
    futures::future::Shared<futures::future::BoxFuture<'static, Result<(), Arc<Error>>>>;

/// The finalizer patch of a new stack, in flight while its first reconcile computes. The
/// cluster-scoped writes, status and pruning open (await) the gate first, while the namespaced
/// children, owned by the stack, are applied at once.
#[derive(Clone)]
pub struct Gate(Option<GateFuture>);

impl Gate {
    /// The stack has the finalizer already.
    pub fn open_already() -> Self {
        Gate(None)
    }

    /// Sends the patch that adds the finalizer, in a task of its own.
    pub fn add_finalizer(api: &Api<KabStack>, stack: &Arc<KabStack>) -> Self {
        let (api, stack) = (api.clone(), stack.clone());
        let patch = tokio::spawn(async move { add_finalizer(&api, &stack).await });
        Gate(Some(
            async move {
                match patch.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(Arc::new(e)),
                    Err(e) => Err(Arc::new(Error::FinalizerTask(e))),
                }
            }
            .boxed()
            .shared(),
        ))
    }

    /// Waits until the finalizer is on the stack.
    pub async fn open(&self) -> Result<(), Error> {
        match &self.0 {
            None => Ok(()),
            Some(patch) => patch.clone().await.map_err(Error::Shared),
        }
    }
}

/// Adds kab's finalizer with a JSON patch that fails (to be retried) if the finalizer list changed
/// since the stack was read, as kube's `finalizer` helper does; returns the patched stack.
async fn add_finalizer(api: &Api<KabStack>, stack: &KabStack) -> Result<KabStack, Error> {
    let name = stack.name_any();
    let object = format!("KabStack {}/{name}", stack.namespace().unwrap_or_default());
    use json_patch::jsonptr::Pointer;
    use json_patch::{AddOperation, PatchOperation, TestOperation};
    let list = Pointer::from_static("/metadata/finalizers");
    let (expected, path, value) = if stack.finalizers().is_empty() {
        (
            serde_json::Value::Null,
            list,
            serde_json::json!([FINALIZER]),
        )
    } else {
        (
            serde_json::json!(stack.finalizers()),
            Pointer::from_static("/metadata/finalizers/-"),
            serde_json::json!(FINALIZER),
        )
    };
    let test = PatchOperation::Test(TestOperation {
        path: list.to_buf(),
        value: expected,
    });
    let add = PatchOperation::Add(AddOperation {
        path: path.to_buf(),
        value,
    });
    let patch = json_patch::Patch(vec![test, add]);
    api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(Error::kube(Stage::AddFinalizer, object))
}

/// Removes what garbage collection cannot: the webhook registration (first, so no namespace is
/// left failing closed) and, when this was its last stack and the policy says so, the entity CRD.
pub async fn cleanup(stack: Arc<KabStack>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let names = render::names(&stack);
    let regs: Api<ValidatingWebhookConfiguration> = Api::all(ctx.client.clone());
    delete(&regs, &names.registration)
        .await
        .map_err(Error::kube(
            Stage::DeleteRegistration,
            format!("ValidatingWebhookConfiguration {}", names.registration),
        ))?;
    let crd_name = stack.spec.entity.crd_name();
    let others = ctx
        .stores
        .stacks
        .state()
        .into_iter()
        .filter(|s| {
            s.spec.entity.crd_name() == crd_name
                && s.metadata.deletion_timestamp.is_none()
                && !(s.namespace() == stack.namespace() && s.name_any() == stack.name_any())
        })
        .count();
    let policy_delete = stack.spec.entity.deletion_policy == DeletionPolicy::Delete;
    let ours = ctx.stores.crds.get(&ObjectRef::new(&crd_name)).is_some();
    if policy_delete && others == 0 && ours {
        let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
        tracing::info!(crd = %crd_name, "deleting the entity CRD: its last stack is gone and deletionPolicy is Delete");
        delete(&crds, &crd_name).await.map_err(Error::kube(
            Stage::DeleteEntityCrd,
            format!("CustomResourceDefinition {crd_name}"),
        ))?;
    } else if others == 0 {
        tracing::info!(crd = %crd_name, "keeping the entity CRD and its data (deletionPolicy Retain)");
    }
    ctx.memo.forget(&ObjectRef::from_obj(stack.as_ref()));
    Ok(Action::await_change())
}

/// Deletes an object in the background; one that is gone already is fine.
pub async fn delete<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}
