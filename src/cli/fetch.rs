//! The edge of `kab status`: reads what the tree needs from the cluster (one LIST per kind and
//! namespace, not one GET per object) and turns failures into errors that say what to do.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::anyhow;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, ObjectList, PartialObjectMeta};
use kube::{Client, ResourceExt as _};
use serde::de::DeserializeOwned;

use super::tree::{EntityCount, EntityCrd, Fetched, ObjectRef, Registration, StackFacts, Workload};
use crate::api::{BrokerMode, JetStreamStorage, KabStack};
use crate::render::{self, LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_PART_OF, LABEL_STACK};

/// Which stacks to show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every stack in every namespace (`-A`).
    All,
    /// Every stack in one namespace.
    Namespace(String),
    /// One stack.
    Stack {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

/// A connected client, and where it points (for error messages).
#[derive(Clone)]
pub struct Cluster {
    /// The client.
    pub client: Client,
    /// The API server URL.
    pub server: String,
    /// The namespace of the kubeconfig context (`default` when it names none).
    pub default_namespace: String,
}

/// The error for a missing KabStack CRD.
pub fn no_crd_message(program: &str) -> String {
    format!(
        "no KabStack CRD in this cluster — install kab first: {program} install --print | kubectl apply --server-side -f -"
    )
}

/// The error for a stack that does not exist: names it, and lists the stacks of its namespace.
pub fn not_found_message(namespace: &str, name: &str, others: &[String], program: &str) -> String {
    if others.is_empty() {
        format!(
            "KabStack {namespace}/{name} not found: there is no KabStack in namespace {namespace} ({program} status -A lists the stacks of every namespace)"
        )
    } else {
        format!(
            "KabStack {namespace}/{name} not found; stacks in namespace {namespace}: {}",
            others.join(", ")
        )
    }
}

/// The error when no cluster can be reached: says how the kubeconfig is found.
pub fn no_cluster_message(error: &str, kubeconfig: Option<&str>, program: &str) -> String {
    let source = match kubeconfig {
        Some(k) if !k.is_empty() => format!("KUBECONFIG is {k}"),
        _ => "KUBECONFIG is not set, so ~/.kube/config is used (or, in a pod, its service account)"
            .to_string(),
    };
    format!(
        "cannot reach a Kubernetes cluster: {error}\n{program} talks to the cluster of the current context of the kubeconfig: {source}.\nPoint KUBECONFIG at the right file (export KUBECONFIG=/path/to/kubeconfig), or start a local cluster with `{program} dev` and export the KUBECONFIG it prints."
    )
}

/// Connects with the kubeconfig (or in-cluster config); the error says how KUBECONFIG is used.
pub async fn connect(program: &str) -> anyhow::Result<Cluster> {
    let kubeconfig = std::env::var("KUBECONFIG").ok();
    let config = kube::Config::infer().await.map_err(|e| {
        anyhow!(no_cluster_message(
            &e.to_string(),
            kubeconfig.as_deref(),
            program
        ))
    })?;
    let server = config.cluster_url.to_string();
    let default_namespace = config.default_namespace.clone();
    let client = Client::try_from(config).map_err(|e| {
        anyhow!(no_cluster_message(
            &e.to_string(),
            kubeconfig.as_deref(),
            program
        ))
    })?;
    Ok(Cluster {
        client,
        server,
        default_namespace,
    })
}

/// Turns an error of the first request into one that says what to do.
fn explain(cluster: &Cluster, e: kube::Error, what: &str, program: &str) -> anyhow::Error {
    match e {
        kube::Error::Api(s) if s.code == 401 => anyhow!(
            "the cluster at {} refused the credentials of the kubeconfig ({}): check KUBECONFIG and its current context",
            cluster.server,
            s.message
        ),
        kube::Error::Api(s) if s.code == 403 => anyhow!("not allowed to {what}: {}", s.message),
        kube::Error::Api(s) => anyhow!("{what}: {}", s.message),
        other => {
            let kubeconfig = std::env::var("KUBECONFIG").ok();
            anyhow!(no_cluster_message(
                &format!("{} does not answer ({other})", cluster.server),
                kubeconfig.as_deref(),
                program
            ))
        }
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// The stacks of the target, sorted by namespace and name. Errors name what is missing.
pub async fn stacks(
    cluster: &Cluster,
    target: &Target,
    program: &str,
) -> anyhow::Result<Vec<KabStack>> {
    let client = cluster.client.clone();
    let list = |api: Api<KabStack>, what: String| async move {
        match api.list(&ListParams::default()).await {
            Ok(l) => Ok(l.items),
            Err(e) if is_not_found(&e) => Err(anyhow!(no_crd_message(program))),
            Err(e) => Err(explain(cluster, e, &what, program)),
        }
    };
    let mut stacks = match target {
        Target::All => list(Api::all(client), "list KabStacks in every namespace".into()).await?,
        Target::Namespace(ns) => {
            list(
                Api::namespaced(client, ns),
                format!("list KabStacks in namespace {ns}"),
            )
            .await?
        }
        Target::Stack { namespace, name } => {
            let api: Api<KabStack> = Api::namespaced(client, namespace);
            match api.get_opt(name).await {
                Ok(Some(s)) => vec![s],
                Ok(None) => {
                    let others =
                        list(api, format!("list KabStacks in namespace {namespace}")).await?;
                    let names: Vec<String> = others.iter().map(|s| s.name_any()).collect();
                    return Err(anyhow!(not_found_message(namespace, name, &names, program)));
                }
                // A missing resource type is a 404 too: the list tells which.
                Err(e) if is_not_found(&e) => {
                    list(api, format!("list KabStacks in namespace {namespace}")).await?;
                    return Err(anyhow!(not_found_message(namespace, name, &[], program)));
                }
                Err(e) => {
                    return Err(explain(
                        cluster,
                        e,
                        &format!("get KabStack {namespace}/{name}"),
                        program,
                    ));
                }
            }
        }
    };
    stacks.sort_by_key(|s| (s.namespace().unwrap_or_default(), s.name_any()));
    Ok(stacks)
}

type Listed<T> = Result<Vec<T>, String>;

async fn list_in<K>(client: &Client, ns: &str, labels: &str) -> Listed<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default().labels(labels))
        .await
        .map(|l| l.items)
        .map_err(|e| short_error(&e))
}

async fn list_meta_in<K>(client: &Client, ns: &str, labels: &str) -> Listed<PartialObjectMeta<K>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.list_metadata(&ListParams::default().labels(labels))
        .await
        .map(|l: ObjectList<PartialObjectMeta<K>>| l.items)
        .map_err(|e| short_error(&e))
}

fn not_listed<T>(what: &str) -> Fetched<T> {
    Fetched::Unknown(format!("{what} not listed"))
}

fn short_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

/// What one namespace holds for its stacks.
struct NamespaceObjects {
    deployments: Listed<Deployment>,
    statefulsets: Listed<StatefulSet>,
    pods: Listed<Arc<Pod>>,
    /// Config and RBAC objects with the value of their stack label.
    objects: Listed<(ObjectRef, String)>,
}

async fn namespace_objects(client: &Client, ns: &str) -> NamespaceObjects {
    let managed = format!("{LABEL_MANAGED_BY}={}", render::KAB);
    let part_of = format!("{LABEL_PART_OF}={}", render::KAB);
    let (deployments, statefulsets, pods, cms, secrets, sas, roles, bindings) = futures::join!(
        list_in::<Deployment>(client, ns, &managed),
        list_in::<StatefulSet>(client, ns, &managed),
        list_in::<Pod>(client, ns, &part_of),
        list_meta_in::<ConfigMap>(client, ns, &managed),
        list_meta_in::<Secret>(client, ns, &managed),
        list_meta_in::<ServiceAccount>(client, ns, &managed),
        list_meta_in::<Role>(client, ns, &managed),
        list_meta_in::<RoleBinding>(client, ns, &managed),
    );
    let mut objects: Listed<(ObjectRef, String)> = Ok(Vec::new());
    add_refs("ConfigMap", cms, &mut objects);
    add_refs("Secret", secrets, &mut objects);
    add_refs("ServiceAccount", sas, &mut objects);
    add_refs("Role", roles, &mut objects);
    add_refs("RoleBinding", bindings, &mut objects);
    NamespaceObjects {
        deployments,
        statefulsets,
        pods: pods.map(|p| p.into_iter().map(Arc::new).collect()),
        objects,
    }
}

fn add_refs<K>(
    kind: &str,
    items: Listed<PartialObjectMeta<K>>,
    out: &mut Listed<(ObjectRef, String)>,
) {
    match (items, out.as_mut()) {
        (Ok(items), Ok(v)) => v.extend(items.into_iter().map(|m| {
            let stack = m
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_STACK).cloned())
                .unwrap_or_default();
            let r = ObjectRef {
                kind: kind.to_owned(),
                name: format!(
                    "{}/{}",
                    m.metadata.namespace.clone().unwrap_or_default(),
                    m.metadata.name.clone().unwrap_or_default()
                ),
            };
            (r, stack)
        })),
        (Err(e), Ok(_)) => *out = Err(format!("listing {kind}s: {e}")),
        (_, Err(_)) => {}
    }
}

fn named<'a, K: kube::Resource>(items: &'a [K], ns: &str, name: &str) -> Option<&'a K> {
    items.iter().find(|o| {
        o.meta().name.as_deref() == Some(name) && o.meta().namespace.as_deref() == Some(ns)
    })
}

fn pods_of(pods: &[Arc<Pod>], stack: &str, component: &str) -> Vec<Arc<Pod>> {
    pods.iter()
        .filter(|p| {
            let l = p.labels();
            l.get(LABEL_STACK).map(String::as_str) == Some(stack)
                && l.get(LABEL_COMPONENT).map(String::as_str) == Some(component)
        })
        .cloned()
        .collect()
}

fn workload<K: kube::Resource>(
    listed: &Listed<K>,
    pods: &Listed<Arc<Pod>>,
    ns: &str,
    name: &str,
    stack: &str,
    component: &str,
    health: impl Fn(&K, &[Arc<Pod>]) -> Workload,
) -> Fetched<Workload> {
    match listed {
        Err(e) => Fetched::Unknown(e.clone()),
        Ok(items) => match named(items, ns, name) {
            None => Fetched::Missing,
            Some(o) => {
                let pods = match pods {
                    Ok(p) => pods_of(p, stack, component),
                    Err(_) => Vec::new(),
                };
                Fetched::Found(health(o, &pods))
            }
        },
    }
}

/// Counts the entities of the stack's namespace with a LIST of limit 1 (metadata only): the
/// API server says how many remain.
async fn count_entities(
    client: &Client,
    stack: &KabStack,
    crd: &CustomResourceDefinition,
) -> Fetched<EntityCount> {
    let ns = render::names(stack).namespace;
    let Some(version) = crd
        .spec
        .versions
        .iter()
        .find(|v| v.storage && v.served)
        .or_else(|| crd.spec.versions.iter().find(|v| v.served))
    else {
        return Fetched::Missing;
    };
    let group = &crd.spec.group;
    let ar = ApiResource {
        group: group.clone(),
        version: version.name.clone(),
        api_version: format!("{group}/{}", version.name),
        kind: crd.spec.names.kind.clone(),
        plural: crd.spec.names.plural.clone(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(list) => {
            let remaining = list.metadata.remaining_item_count;
            let more = list
                .metadata
                .continue_
                .as_deref()
                .is_some_and(|c| !c.is_empty());
            let n = list.items.len() as u64;
            Fetched::Found(EntityCount {
                count: n + remaining.map_or(0, |r| r.max(0) as u64),
                exact: !more || remaining.is_some(),
            })
        }
        Err(e) => Fetched::Unknown(short_error(&e)),
    }
}

/// Fetches the facts of every stack: one LIST per kind and namespace, one GET per entity CRD,
/// one limited LIST per stack to count entities.
pub async fn facts(client: &Client, stacks: Vec<KabStack>) -> Vec<StackFacts> {
    let namespaces: BTreeSet<String> = stacks.iter().map(|s| render::names(s).namespace).collect();
    let per_ns = futures::future::join_all(
        namespaces
            .iter()
            .map(|ns| async move { (ns.clone(), namespace_objects(client, ns).await) }),
    )
    .await;
    let per_ns: BTreeMap<String, NamespaceObjects> = per_ns.into_iter().collect();

    let registrations: Listed<ValidatingWebhookConfiguration> = {
        let api: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
        api.list(&ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={}", render::KAB)))
            .await
            .map(|l| l.items)
            .map_err(|e| short_error(&e))
    };

    let crd_names: BTreeSet<String> = stacks.iter().map(|s| s.spec.entity.crd_name()).collect();
    let crds_api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crds: BTreeMap<String, Result<Option<CustomResourceDefinition>, String>> =
        futures::future::join_all(crd_names.iter().map(|n| {
            let api = crds_api.clone();
            async move { (n.clone(), api.get_opt(n).await.map_err(|e| short_error(&e))) }
        }))
        .await
        .into_iter()
        .collect();

    let out = stacks.into_iter().map(|stack| {
        let names = render::names(&stack);
        let ns = names.namespace.clone();
        let objs = per_ns.get(&ns);
        let crd_result = crds.get(&stack.spec.entity.crd_name());
        let registrations = &registrations;
        async move {
            let (crd, entities) = match crd_result {
                Some(Ok(Some(crd))) => {
                    let facts = EntityCrd::from_crd(crd);
                    let entities = if facts.established {
                        count_entities(client, &stack, crd).await
                    } else {
                        Fetched::Missing
                    };
                    (Fetched::Found(facts), entities)
                }
                Some(Ok(None)) => (Fetched::Missing, Fetched::Missing),
                Some(Err(e)) => (Fetched::Unknown(e.clone()), Fetched::Missing),
                None => (not_listed("CRD"), Fetched::Missing),
            };
            let Some(objs) = objs else {
                return StackFacts {
                    stack,
                    crd,
                    entities,
                    webhook: not_listed("Deployments"),
                    registration: not_listed("registrations"),
                    controller: not_listed("Deployments"),
                    broker: not_listed("workloads"),
                    objects: not_listed("objects"),
                };
            };
            let webhook = workload(
                &objs.deployments,
                &objs.pods,
                &ns,
                &names.webhook,
                &names.stack,
                "webhook",
                Workload::from_deployment,
            );
            let controller = workload(
                &objs.deployments,
                &objs.pods,
                &ns,
                &names.controller,
                &names.stack,
                "controller",
                Workload::from_deployment,
            );
            let broker = match (stack.spec.broker.mode, stack.spec.broker.jetstream.storage) {
                (BrokerMode::Managed, JetStreamStorage::File) => workload(
                    &objs.statefulsets,
                    &objs.pods,
                    &ns,
                    &names.broker,
                    &names.stack,
                    "broker",
                    Workload::from_statefulset,
                ),
                (BrokerMode::Managed, JetStreamStorage::Memory) => workload(
                    &objs.deployments,
                    &objs.pods,
                    &ns,
                    &names.broker,
                    &names.stack,
                    "broker",
                    Workload::from_deployment,
                ),
                _ => Fetched::Missing,
            };
            let registration = match registrations {
                Err(e) => Fetched::Unknown(e.clone()),
                Ok(items) => match items
                    .iter()
                    .find(|r| r.metadata.name.as_deref() == Some(names.registration.as_str()))
                {
                    None => Fetched::Missing,
                    Some(r) => {
                        let hook = r.webhooks.as_ref().and_then(|w| w.first());
                        Fetched::Found(Registration {
                            ca_bundle: hook
                                .and_then(|h| h.client_config.ca_bundle.as_ref())
                                .is_some_and(|b| !b.0.is_empty()),
                            failure_policy: hook.and_then(|h| h.failure_policy.clone()),
                        })
                    }
                },
            };
            let objects = match &objs.objects {
                Err(e) => Fetched::Unknown(e.clone()),
                Ok(all) => Fetched::Found(
                    all.iter()
                        .filter(|(_, s)| *s == names.stack)
                        .map(|(r, _)| r.clone())
                        .collect(),
                ),
            };
            StackFacts {
                stack,
                crd,
                entities,
                webhook,
                registration,
                controller,
                broker,
                objects,
            }
        }
    });
    futures::future::join_all(out).await
}
