//! The operator's watches: the KabStacks, and every kind of child kab renders, by label, mapped
//! back to their stack. What is read whole (stacks, entity CRDs, certificate Secrets) sits in
//! reflector stores, trimmed on arrival; every other child, and the pods, only as summaries in
//! the [`Index`].

use crate::api::KabStack;
use crate::index::{Index, Summarize};
use crate::render::{LABEL_COMPONENT, LABEL_STACK, LABEL_STACK_NAMESPACE};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::sync::Arc;

/// Label every object kab manages carries.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by=kab";

/// Everything the operator reads: reflector stores for the objects it reads whole, the
/// [`Index`] for every other child and the pods.
#[derive(Clone)]
pub struct Stores {
    /// KabStacks (without managedFields).
    pub stacks: Store<KabStack>,
    /// Entity CRDs kab labelled (without schemas).
    pub crds: Store<CustomResourceDefinition>,
    /// Certificate Secrets kab labelled.
    pub secrets: Store<Secret>,
    /// Summaries of every other child and of the stacks' pods.
    pub index: Arc<Index>,
}

/// The KabStack controller with every child watch attached, and the stores it fills.
pub fn controller(
    client: &Client,
    ns: Option<&str>,
    concurrency: u16,
) -> (Controller<KabStack>, Stores) {
    let managed = watcher::Config::default().labels(MANAGED_BY);
    let stack_pods = watcher::Config::default().labels(LABEL_STACK);

    // KabStacks are cached without managedFields (a second copy of the spec's shape, per stack).
    let (stacks, stacks_writer) = reflector::store();
    let stack_stream = watcher(
        namespaced_or_all::<KabStack>(client, ns),
        watcher::Config::default().any_semantic(),
    )
    .default_backoff()
    .modify(|s: &mut KabStack| s.managed_fields_mut().clear())
    .reflect(stacks_writer)
    .applied_objects();
    let controller = Controller::for_stream(stack_stream, stacks.clone())
        .with_config(ControllerConfig::default().concurrency(concurrency));

    let (crds, crd_stream) = typed(
        Api::all(client.clone()),
        managed.clone(),
        |c: &mut CustomResourceDefinition| {
            trim_meta(&mut c.metadata);
            // Status reads conditions and served versions, not schemas.
            for v in &mut c.spec.versions {
                v.schema = None;
                v.additional_printer_columns = None;
            }
        },
    );
    let (secrets, secret_stream) = typed(
        namespaced_or_all(client, ns),
        managed.clone(),
        |s: &mut Secret| trim_meta(&mut s.metadata),
    );
    let index = Arc::new(Index::default());
    let dep_stream = indexed(
        watcher(namespaced_or_all::<Deployment>(client, ns), managed.clone()),
        &index,
    );
    let sts_stream = indexed(
        watcher(
            namespaced_or_all::<StatefulSet>(client, ns),
            managed.clone(),
        ),
        &index,
    );
    let pod_stream = indexed(
        watcher(namespaced_or_all::<Pod>(client, ns), stack_pods),
        &index,
    );
    // The other children by metadata only (`Api<PartialObjectMeta<_>>` asks for no bodies).
    macro_rules! meta {
        ($kind:ty, $api:expr) => {{
            let api: Api<PartialObjectMeta<$kind>> = $api;
            indexed(watcher(api, managed.clone()), &index)
        }};
    }
    let reg_stream = meta!(ValidatingWebhookConfiguration, Api::all(client.clone()));
    let sa_stream = meta!(ServiceAccount, namespaced_or_all(client, ns));
    let role_stream = meta!(Role, namespaced_or_all(client, ns));
    let rb_stream = meta!(RoleBinding, namespaced_or_all(client, ns));
    let cm_stream = meta!(ConfigMap, namespaced_or_all(client, ns));
    let svc_stream = meta!(Service, namespaced_or_all(client, ns));
    let pdb_stream = meta!(PodDisruptionBudget, namespaced_or_all(client, ns));
    let np_stream = meta!(NetworkPolicy, namespaced_or_all(client, ns));

    // The entity CRD is shared: a change wakes every stack that declares it.
    let crd_stacks = stacks.clone();
    let crd_mapper = move |crd: CustomResourceDefinition| {
        let name = crd.name_any();
        crd_stacks
            .state()
            .into_iter()
            .filter(|s| s.spec.entity.crd_name() == name)
            .map(|s| ObjectRef::from_obj(s.as_ref()))
            .collect::<Vec<_>>()
    };
    let controller = controller
        .watches_stream(crd_stream, crd_mapper)
        .watches_stream(dep_stream, by_labels)
        .watches_stream(sts_stream, by_labels)
        .watches_stream(pod_stream, pod_to_stack)
        .watches_stream(secret_stream, by_labels)
        .watches_stream(reg_stream, by_labels)
        .watches_stream(sa_stream, by_labels)
        .watches_stream(role_stream, by_labels)
        .watches_stream(rb_stream, by_labels)
        .watches_stream(cm_stream, by_labels)
        .watches_stream(svc_stream, by_labels)
        .watches_stream(pdb_stream, by_labels)
        .watches_stream(np_stream, by_labels);
    let stores = Stores {
        stacks,
        crds,
        secrets,
        index,
    };
    (controller, stores)
}

/// An API for one namespace, or all when `ns` is `None`.
pub fn namespaced_or_all<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// What the operator reads of a cached child's metadata: name, namespace, generation,
/// resourceVersion, deletion, and the labels that map it to its stack and component. The rest
/// (annotations, owner references, managed fields, other labels) is dropped on arrival.
fn trim_meta(m: &mut ObjectMeta) {
    m.managed_fields = None;
    m.annotations = None;
    m.owner_references = None;
    m.finalizers = None;
    m.generate_name = None;
    m.creation_timestamp = None;
    m.uid = None;
    if let Some(labels) = &mut m.labels {
        labels
            .retain(|k, _| k == LABEL_STACK || k == LABEL_STACK_NAMESPACE || k == LABEL_COMPONENT);
    }
}

type WatchStream<K> = futures::stream::BoxStream<'static, Result<K, watcher::Error>>;

/// A typed reflector whose cached objects are trimmed by `modify`.
fn typed<K>(
    api: Api<K>,
    config: watcher::Config,
    modify: impl FnMut(&mut K) + Send + 'static,
) -> (Store<K>, WatchStream<K>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(modify)
        .reflect(writer)
        .touched_objects()
        .boxed();
    (reader, stream)
}

/// A child watch that keeps the [`Index`] up to date and passes the touched objects on (to be
/// mapped to their stacks), dropping them after.
fn indexed<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    index: &Arc<Index>,
) -> WatchStream<K>
where
    K: Summarize + Clone + Debug + Send + 'static,
{
    let index = index.clone();
    events
        .default_backoff()
        .map_ok(move |event| {
            index.apply(&event);
            event
        })
        .touched_objects()
        .boxed()
}

/// Maps a labelled child back to its stack.
fn by_labels<K: Resource>(obj: K) -> Option<ObjectRef<KabStack>> {
    let labels = obj.labels();
    let name = labels.get(LABEL_STACK)?;
    let ns = labels.get(LABEL_STACK_NAMESPACE)?;
    Some(ObjectRef::new(name).within(ns))
}

/// Maps a stack's pod to its stack: pods carry the stack label (the workloads' selectors) but
/// not the stack-namespace label, and are always in their stack's namespace. Without this a
/// pod's own changes (a crash loop starting) woke no reconcile, and status waited for some
/// other child to change.
fn pod_to_stack(pod: Pod) -> Option<ObjectRef<KabStack>> {
    let name = pod.labels().get(LABEL_STACK)?;
    Some(ObjectRef::new(name).within(&pod.namespace()?))
}

impl Stores {
    /// The version (see [`crate::index::version_of`]) of a child kab watches, if it is there.
    pub fn version(&self, kind: &str, ns: Option<&str>, name: &str) -> Option<String> {
        match kind {
            "CustomResourceDefinition" => self
                .crds
                .get(&ObjectRef::new(name))
                .map(|o| crate::index::version_of(&o.metadata)),
            "Secret" => self
                .secrets
                .get(&ObjectRef::new(name).within(ns?))
                .map(|o| crate::index::version_of(&o.metadata)),
            other => self.index.version(other, ns, name),
        }
    }

    /// Whether the Deployment `ns/name` has an available replica.
    pub fn deployment_available(&self, ns: &str, name: &str) -> bool {
        self.index
            .deployment(ns, name)
            .and_then(|d| d.status.as_ref().and_then(|s| s.available_replicas))
            .unwrap_or(0)
            >= 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stacks_pod_maps_to_the_stack_of_its_namespace() {
        let pod = |labels: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "todo-webhook-abc", "namespace": "shop", "labels": labels}
            }))
            .unwrap()
        };
        // The labels of the webhook's pod template: no stack-namespace label.
        let webhook = pod(serde_json::json!({
            "kab.dev/stack": "todo", "app.kubernetes.io/component": "webhook",
        }));
        assert_eq!(
            pod_to_stack(webhook.clone()),
            Some(ObjectRef::new("todo").within("shop"))
        );
        assert_eq!(by_labels(webhook), None);
        assert_eq!(pod_to_stack(pod(serde_json::json!({"app": "other"}))), None);
    }
}
