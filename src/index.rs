//! What the operator remembers of the children it watches.
//!
//! A reflector store keeps every watched object whole (all its metadata and status), for every
//! child of every stack. The operator reads little of them: whether a child exists and its
//! version (to know when it changed under kab), which stack and component it belongs to (to map
//! events to stacks and to prune), and, for workloads and pods, the few status fields health is
//! computed from. [`Index`] keeps exactly that — one [`Seen`] per object — and rebuilds typed
//! objects from it for the pure health functions.
//!
//! The index follows a watch the way a reflector does ([`Index::apply`]): `Apply`/`Delete`
//! update one entry, and a (re)list (`Init` … `InitApply` … `InitDone`) is buffered and then
//! replaces the kind's entries at once, so an object deleted while the watch was down goes too.

use crate::render::{LABEL_COMPONENT, LABEL_STACK, LABEL_STACK_NAMESPACE};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStatus};
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetStatus};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::api::PartialObjectMeta;
use kube::runtime::watcher::Event;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What kab keeps of one watched object.
#[derive(Clone, Debug, PartialEq)]
pub struct Seen {
    /// The version that moves when the object changes under kab (see [`version_of`]).
    pub version: Box<str>,
    /// The KabStack it belongs to, from its labels: `(namespace, name)`; the namespace is the
    /// object's own when it has no `kab.dev/stack-namespace` label (pods).
    pub stack: Option<(Box<str>, Box<str>)>,
    /// Its `app.kubernetes.io/component` label.
    pub component: Option<Box<str>>,
    /// What health reads of it.
    pub body: Body,
}

/// The part of an object health reads; nothing for kinds that only need to exist.
#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    /// Existence and version only.
    Meta,
    /// A Deployment's generation, desired replicas and status.
    Deployment {
        generation: Option<i64>,
        replicas: Option<i32>,
        status: Option<Box<DeploymentStatus>>,
    },
    /// A StatefulSet's generation, desired replicas and status.
    StatefulSet {
        generation: Option<i64>,
        replicas: Option<i32>,
        status: Option<Box<StatefulSetStatus>>,
    },
    /// A pod's phase, scheduling and container waiting reasons and restarts.
    Pod(Option<Box<PodFacts>>),
}

/// Of a pod's status, what [`crate::health::failing_pod`] and
/// [`crate::health::unscheduled_pod`] read, instead of the whole `PodStatus`.
#[derive(Clone, Debug, PartialEq)]
pub struct PodFacts {
    phase: Option<Box<str>>,
    message: Option<Box<str>>,
    /// Reason and message of a `PodScheduled=False` condition.
    unscheduled: Option<(Text, Text)>,
    /// Per container: name, waiting reason, restart count, ready.
    containers: Box<[ContainerFacts]>,
}

type Text = Option<Box<str>>;

#[derive(Clone, Debug, PartialEq)]
struct ContainerFacts {
    name: Box<str>,
    waiting: Text,
    restarts: i32,
    ready: bool,
}

impl PodFacts {
    fn of(s: &PodStatus) -> Self {
        let boxed = |v: &Option<String>| v.as_deref().map(Box::from);
        PodFacts {
            phase: boxed(&s.phase),
            message: boxed(&s.message),
            unscheduled: s
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                .map(|c| (boxed(&c.reason), boxed(&c.message))),
            containers: s
                .container_statuses
                .iter()
                .flatten()
                .map(|c| {
                    let waiting = c.state.as_ref().and_then(|st| st.waiting.as_ref());
                    ContainerFacts {
                        name: Box::from(c.name.as_str()),
                        waiting: waiting.and_then(|w| boxed(&w.reason)),
                        restarts: c.restart_count,
                        ready: c.ready,
                    }
                })
                .collect(),
        }
    }

    /// The status health reads, as a `PodStatus`.
    fn status(&self) -> PodStatus {
        let string = |v: &Option<Box<str>>| v.as_deref().map(str::to_owned);
        PodStatus {
            phase: string(&self.phase),
            message: string(&self.message),
            conditions: self.unscheduled.as_ref().map(|(reason, message)| {
                vec![PodCondition {
                    type_: "PodScheduled".into(),
                    status: "False".into(),
                    reason: string(reason),
                    message: string(message),
                    ..Default::default()
                }]
            }),
            container_statuses: (!self.containers.is_empty()).then(|| {
                self.containers
                    .iter()
                    .map(|c| ContainerStatus {
                        name: c.name.to_string(),
                        restart_count: c.restarts,
                        ready: c.ready,
                        state: c.waiting.as_ref().map(|reason| ContainerState {
                            waiting: Some(ContainerStateWaiting {
                                reason: Some(reason.to_string()),
                                message: None,
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        }
    }
}

/// What "the object changed under us" means: the generation where the API server keeps one (it
/// moves only with the spec, so status churn — Deployments, StatefulSets, PDBs, CRDs — does not
/// cause re-applies), the resourceVersion for kinds without one (ConfigMaps, Secrets, RBAC…).
pub fn version_of(meta: &ObjectMeta) -> String {
    version(meta.generation, meta.resource_version.as_deref())
}

/// [`version_of`], from the two fields it reads.
pub fn version(generation: Option<i64>, resource_version: Option<&str>) -> String {
    match generation {
        Some(g) => format!("g{g}"),
        None => format!("r{}", resource_version.unwrap_or_default()),
    }
}

/// A watched kind the index can summarise.
pub trait Summarize: Resource<DynamicType = ()> {
    /// The kind's name (`Deployment`, `ServiceAccount`, …), as k8s-openapi and the render name it.
    fn kind_name() -> &'static str;
    /// What health reads of the object.
    fn body(&self) -> Body;
}

impl Summarize for Deployment {
    fn kind_name() -> &'static str {
        <Self as k8s_openapi::Resource>::KIND
    }
    fn body(&self) -> Body {
        let status = self.status.as_ref().map(|s| {
            Box::new(DeploymentStatus {
                available_replicas: s.available_replicas,
                updated_replicas: s.updated_replicas,
                observed_generation: s.observed_generation,
                conditions: s.conditions.as_ref().map(|cs| {
                    cs.iter()
                        .filter(|c| c.type_.as_deref() == Some("Progressing"))
                        .map(|c| k8s_openapi::api::apps::v1::DeploymentCondition {
                            type_: c.type_.clone(),
                            status: c.status.clone(),
                            reason: c.reason.clone(),
                            ..Default::default()
                        })
                        .collect()
                }),
                ..Default::default()
            })
        });
        Body::Deployment {
            generation: self.metadata.generation,
            replicas: self.spec.replicas,
            status,
        }
    }
}

impl Summarize for StatefulSet {
    fn kind_name() -> &'static str {
        <Self as k8s_openapi::Resource>::KIND
    }
    fn body(&self) -> Body {
        let status = self.status.as_ref().map(|s| {
            Box::new(StatefulSetStatus {
                ready_replicas: s.ready_replicas,
                observed_generation: s.observed_generation,
                replicas: s.replicas,
                ..Default::default()
            })
        });
        Body::StatefulSet {
            generation: self.metadata.generation,
            replicas: self.spec.replicas,
            status,
        }
    }
}

impl Summarize for Pod {
    fn kind_name() -> &'static str {
        <Self as k8s_openapi::Resource>::KIND
    }
    fn body(&self) -> Body {
        Body::Pod(self.status.as_ref().map(|s| Box::new(PodFacts::of(s))))
    }
}

impl<K> Summarize for PartialObjectMeta<K>
where
    K: Resource<DynamicType = ()> + k8s_openapi::Resource,
{
    fn kind_name() -> &'static str {
        K::KIND
    }
    fn body(&self) -> Body {
        Body::Meta
    }
}

/// The summary of one object.
pub fn seen<K: Summarize>(obj: &K) -> Seen {
    let meta = obj.meta();
    let label = |k: &str| {
        meta.labels
            .as_ref()
            .and_then(|l| l.get(k))
            .map(|v| Box::<str>::from(v.as_str()))
    };
    Seen {
        version: version_of(meta).into(),
        stack: label(LABEL_STACK_NAMESPACE)
            .or_else(|| meta.namespace.as_deref().map(Box::from))
            .zip(label(LABEL_STACK)),
        component: label(LABEL_COMPONENT),
        body: obj.body(),
    }
}

/// Objects of one kind: namespace (`""` when cluster-scoped) → name → summary.
type Objects = HashMap<Box<str>, HashMap<Box<str>, Seen>>;

#[derive(Default)]
struct Kind {
    live: Objects,
    /// A (re)list in progress: what it brought so far.
    listing: Option<Objects>,
}

/// The summaries of every watched child, by kind.
#[derive(Default)]
pub struct Index {
    kinds: Mutex<HashMap<&'static str, Kind>>,
}

/// The metadata of a rebuilt object: what health reads of it.
fn rebuilt_meta(ns: &str, name: &str, generation: Option<i64>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(ns.to_owned()),
        generation,
        ..Default::default()
    }
}

fn insert(objects: &mut Objects, ns: Option<&str>, name: &str, seen: Seen) {
    objects
        .entry(ns.unwrap_or_default().into())
        .or_default()
        .insert(name.into(), seen);
}

impl Index {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, Kind>> {
        crate::lock(&self.kinds)
    }

    /// Follows one watch event.
    pub fn apply<K: Summarize>(&self, event: &Event<K>) {
        let mut kinds = self.lock();
        let kind = kinds.entry(K::kind_name()).or_default();
        match event {
            Event::Apply(o) => insert(
                &mut kind.live,
                o.meta().namespace.as_deref(),
                o.meta().name.as_deref().unwrap_or_default(),
                seen(o),
            ),
            Event::Delete(o) => {
                let ns = o.meta().namespace.as_deref().unwrap_or_default();
                let name = o.meta().name.as_deref().unwrap_or_default();
                if let Some(names) = kind.live.get_mut(ns) {
                    names.remove(name);
                    if names.is_empty() {
                        kind.live.remove(ns);
                    }
                }
            }
            Event::Init => kind.listing = Some(Objects::new()),
            Event::InitApply(o) => insert(
                kind.listing.get_or_insert_default(),
                o.meta().namespace.as_deref(),
                o.meta().name.as_deref().unwrap_or_default(),
                seen(o),
            ),
            Event::InitDone => {
                kind.live = kind.listing.take().unwrap_or_default();
            }
        }
    }

    /// Reads one object's summary.
    pub fn with<T>(
        &self,
        kind: &str,
        ns: Option<&str>,
        name: &str,
        read: impl FnOnce(&Seen) -> T,
    ) -> Option<T> {
        let kinds = self.lock();
        let seen = kinds
            .get(kind)?
            .live
            .get(ns.unwrap_or_default())?
            .get(name)?;
        Some(read(seen))
    }

    /// Whether the object is there.
    pub fn exists(&self, kind: &str, ns: Option<&str>, name: &str) -> bool {
        self.with(kind, ns, name, |_| ()).is_some()
    }

    /// The object's version (see [`version_of`]).
    pub fn version(&self, kind: &str, ns: Option<&str>, name: &str) -> Option<String> {
        self.with(kind, ns, name, |s| s.version.to_string())
    }

    /// A Deployment rebuilt from its summary: generation, replicas and the status health reads.
    pub fn deployment(&self, ns: &str, name: &str) -> Option<Deployment> {
        self.with("Deployment", Some(ns), name, |s| match &s.body {
            Body::Deployment {
                generation,
                replicas,
                status,
            } => Some(Deployment {
                metadata: rebuilt_meta(ns, name, *generation),
                spec: DeploymentSpec {
                    replicas: *replicas,
                    ..Default::default()
                },
                status: status.as_deref().cloned(),
            }),
            _ => None,
        })
        .flatten()
    }

    /// A StatefulSet rebuilt from its summary.
    pub fn statefulset(&self, ns: &str, name: &str) -> Option<StatefulSet> {
        self.with("StatefulSet", Some(ns), name, |s| match &s.body {
            Body::StatefulSet {
                generation,
                replicas,
                status,
            } => Some(StatefulSet {
                metadata: rebuilt_meta(ns, name, *generation),
                spec: StatefulSetSpec {
                    replicas: *replicas,
                    ..Default::default()
                },
                status: status.as_deref().cloned(),
            }),
            _ => None,
        })
        .flatten()
    }

    /// The pods in `ns` with the given stack and component labels, rebuilt (name and the status
    /// health reads).
    pub fn pods(&self, ns: &str, stack: Option<&str>, component: Option<&str>) -> Vec<Arc<Pod>> {
        let kinds = self.lock();
        let Some(pods) = kinds.get("Pod").and_then(|k| k.live.get(ns)) else {
            return Vec::new();
        };
        pods.iter()
            .filter(|(_, s)| {
                s.stack.as_ref().map(|(_, n)| &**n) == stack && s.component.as_deref() == component
            })
            .map(|(name, s)| {
                Arc::new(Pod {
                    metadata: rebuilt_meta(ns, name, None),
                    spec: None,
                    status: match &s.body {
                        Body::Pod(facts) => facts.as_ref().map(|f| f.status()),
                        _ => None,
                    },
                })
            })
            .collect()
    }

    /// Every object of the given kinds labelled for the stack `stack_ns/stack_name`, as
    /// `(kind, namespace, name)` (namespace `None` when cluster-scoped).
    pub fn children_of(
        &self,
        kinds: &[&str],
        stack_ns: &str,
        stack_name: &str,
    ) -> Vec<(&'static str, Option<String>, String)> {
        let all = self.lock();
        let mut found = Vec::new();
        for (&kind, objects) in all.iter().filter(|(k, _)| kinds.contains(k)) {
            for (ns, names) in &objects.live {
                for (name, seen) in names {
                    let ours = seen
                        .stack
                        .as_ref()
                        .is_some_and(|(sns, sname)| &**sns == stack_ns && &**sname == stack_name);
                    if ours {
                        let ns = (!ns.is_empty()).then(|| ns.to_string());
                        found.push((kind, ns, name.to_string()));
                    }
                }
            }
        }
        found.sort();
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use serde_json::json;

    fn from<K: serde::de::DeserializeOwned>(v: serde_json::Value) -> K {
        serde_json::from_value(v).expect("test object")
    }

    fn deployment(name: &str, available: i32) -> Deployment {
        from(json!({
            "metadata": {
                "name": name, "namespace": "shop", "generation": 2, "resourceVersion": "812",
                "labels": {
                    "kab.dev/stack": "orders", "kab.dev/stack-namespace": "shop",
                    "app.kubernetes.io/component": "webhook", "team": "a",
                },
                "annotations": {"a": "b"},
            },
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "x"}},
                "template": {"spec": {"containers": [{"name": "c", "image": "kab:1"}]}},
            },
            "status": {
                "observedGeneration": 2, "availableReplicas": available, "updatedReplicas": 2,
                "replicas": 2,
                "conditions": [
                    {"type": "Available", "status": "True"},
                    {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"},
                ],
            },
        }))
    }

    fn account(name: &str, rv: &str, stack: Option<&str>) -> PartialObjectMeta<ServiceAccount> {
        let mut meta = PartialObjectMeta::<ServiceAccount>::default();
        meta.metadata.name = Some(name.into());
        meta.metadata.namespace = Some("shop".into());
        meta.metadata.resource_version = Some(rv.into());
        if let Some(stack) = stack {
            meta.metadata.labels = Some(
                [
                    ("kab.dev/stack".to_owned(), stack.to_owned()),
                    ("kab.dev/stack-namespace".to_owned(), "shop".to_owned()),
                ]
                .into(),
            );
        }
        meta
    }

    #[test]
    fn a_deployment_keeps_what_health_reads_and_comes_back_typed() {
        let index = Index::default();
        index.apply(&Event::Apply(deployment("orders-webhook", 1)));

        let seen = index
            .with("Deployment", Some("shop"), "orders-webhook", Seen::clone)
            .expect("indexed");
        assert_eq!(&*seen.version, "g2");
        assert_eq!(seen.stack, Some(("shop".into(), "orders".into())));
        assert_eq!(seen.component.as_deref(), Some("webhook"));

        let d = index.deployment("shop", "orders-webhook").expect("rebuilt");
        assert_eq!(d.metadata.generation, Some(2));
        assert_eq!(d.spec.replicas, Some(2));
        let st = d.status.expect("status");
        assert_eq!(st.available_replicas, Some(1));
        assert_eq!(st.updated_replicas, Some(2));
        assert_eq!(st.observed_generation, Some(2));
        let conds = st.conditions.expect("conditions");
        assert_eq!(conds.len(), 1, "only Progressing is kept: {conds:?}");
        assert_eq!(conds[0].reason.as_deref(), Some("ProgressDeadlineExceeded"));
        // The pod template is not kept.
        assert!(d.spec.template.spec.is_none());
    }

    #[test]
    fn a_pod_keeps_its_waiting_reason_restarts_and_scheduling() {
        let index = Index::default();
        let pod: Pod = from(json!({
            "metadata": {
                "name": "orders-webhook-1", "namespace": "shop", "resourceVersion": "9",
                "labels": {"kab.dev/stack": "orders", "app.kubernetes.io/component": "webhook"},
            },
            "spec": {"containers": [{"name": "webhook", "image": "kab:1"}]},
            "status": {
                "phase": "Running", "podIP": "10.0.0.1",
                "conditions": [
                    {"type": "Ready", "status": "False"},
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no node"},
                ],
                "containerStatuses": [{
                    "name": "webhook", "image": "kab:1", "imageID": "sha", "ready": false,
                    "restartCount": 3,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                }],
            },
        }));
        index.apply(&Event::Apply(pod));
        let other: Pod = from(json!({
            "metadata": {
                "name": "orders-broker-0", "namespace": "shop",
                "labels": {"kab.dev/stack": "orders", "app.kubernetes.io/component": "broker"},
            },
        }));
        index.apply(&Event::Apply(other));

        let pods = index.pods("shop", Some("orders"), Some("webhook"));
        assert_eq!(pods.len(), 1);
        assert_eq!(
            crate::health::failing_pod(&pods).as_deref(),
            Some("pod orders-webhook-1 CrashLoopBackOff (3 restarts)")
        );
        assert_eq!(
            crate::health::unscheduled_pod(&pods).as_deref(),
            Some("pod orders-webhook-1 Unschedulable: no node")
        );
        let status = pods[0].status.as_ref().expect("status");
        assert_eq!(status.pod_ip, None, "only what health reads is kept");
        assert_eq!(status.conditions.as_ref().map(Vec::len), Some(1));
        assert!(index.pods("shop", Some("orders"), Some("api")).is_empty());
        assert!(
            index
                .pods("elsewhere", Some("orders"), Some("webhook"))
                .is_empty()
        );
    }

    #[test]
    fn delete_removes_and_a_relist_replaces_the_kind_atomically() {
        let index = Index::default();
        index.apply(&Event::Apply(account("a", "1", Some("orders"))));
        index.apply(&Event::Apply(account("b", "2", Some("orders"))));
        assert_eq!(
            index
                .version("ServiceAccount", Some("shop"), "a")
                .as_deref(),
            Some("r1")
        );

        index.apply(&Event::Delete(account("a", "3", Some("orders"))));
        assert!(!index.exists("ServiceAccount", Some("shop"), "a"));

        // A relist that no longer has "b": it stays visible until the list is complete.
        index.apply(&Event::<PartialObjectMeta<ServiceAccount>>::Init);
        index.apply(&Event::InitApply(account("c", "7", Some("orders"))));
        assert!(index.exists("ServiceAccount", Some("shop"), "b"));
        assert!(!index.exists("ServiceAccount", Some("shop"), "c"));
        index.apply(&Event::<PartialObjectMeta<ServiceAccount>>::InitDone);
        assert!(!index.exists("ServiceAccount", Some("shop"), "b"));
        assert_eq!(
            index
                .version("ServiceAccount", Some("shop"), "c")
                .as_deref(),
            Some("r7")
        );
    }

    #[test]
    fn children_of_finds_what_is_labelled_for_the_stack_only() {
        let index = Index::default();
        index.apply(&Event::Apply(account("mine", "1", Some("orders"))));
        index.apply(&Event::Apply(account("theirs", "2", Some("billing"))));
        index.apply(&Event::Apply(account("unlabelled", "3", None)));
        index.apply(&Event::Apply(deployment("orders-webhook", 2)));

        assert_eq!(
            index.children_of(&["ServiceAccount", "Deployment"], "shop", "orders"),
            vec![
                ("Deployment", Some("shop".into()), "orders-webhook".into()),
                ("ServiceAccount", Some("shop".into()), "mine".into()),
            ]
        );
        assert_eq!(
            index.children_of(&["ServiceAccount"], "other", "orders"),
            vec![]
        );
    }

    #[test]
    fn status_churn_does_not_count_as_a_change_but_spec_edits_do() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        let pdb = |generation, rv: &str| ObjectMeta {
            generation: Some(generation),
            resource_version: Some(rv.into()),
            ..Default::default()
        };
        // A PDB whose status the disruption controller wrote: same generation, new resourceVersion.
        assert_eq!(version_of(&pdb(1, "10")), version_of(&pdb(1, "11")));
        assert_ne!(version_of(&pdb(1, "10")), version_of(&pdb(2, "12")));
        let cm = |rv: &str| ObjectMeta {
            resource_version: Some(rv.into()),
            ..Default::default()
        };
        assert_ne!(version_of(&cm("10")), version_of(&cm("11")));
    }
}
