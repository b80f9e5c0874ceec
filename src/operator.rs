//! The kab operator: reconciles every KabStack.
//!
//! `finalizer → validate → certificates → render (pure) → apply → prune → status`.
//! Only apply, prune and the status write touch the API; every read comes from watch caches
//! (reflector stores, and the [`Index`] of child summaries), never a LIST per reconcile. A child
//! is re-applied only when what kab wants changed or the object changed under it (deleted, or
//! edited by hand), so an idle stack causes no write at all.

use crate::api::{EntitySpec, KabStack};
use crate::certs::{self, CertPolicy, PkiState};
use crate::health;
use crate::index::{Index, Summarize, version, version_of};
use crate::render::{
    self, Child, Facts, LABEL_COMPONENT, LABEL_STACK, LABEL_STACK_NAMESPACE, Rendered, Settings,
    Step, Templates,
};
use crate::status::{self, CertFacts, Observed, Outcome};
use crate::validate;
use futures::{FutureExt, StreamExt, TryStreamExt, stream};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, DeleteParams, DynamicObject, PartialObjectMeta, Patch, PatchParams, PostParams,
};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Finalizer on every KabStack: removes the cluster-scoped children (webhook registration first).
pub const FINALIZER: &str = "kab.dev/cleanup";
/// Progress-only status changes of a stack are written at most this often.
const STATUS_PACE: Duration = Duration::from_secs(5);

/// Field manager for the children rendered from templates.
pub const MANAGER: &str = "kab-operator";
/// Field manager for the webhook certificate Secrets.
pub const MANAGER_CERTS: &str = "kab-operator-certs";
/// Field manager for KabStack status.
pub const MANAGER_STATUS: &str = "kab-operator-status";
/// Label every object kab manages carries.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by=kab";
const REGISTRATION: &str = "ValidatingWebhookConfiguration";

/// Operator settings.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Watch only this namespace (None: all namespaces).
    pub namespace: Option<String>,
    /// Directory of template overrides (by file name).
    pub templates_dir: Option<std::path::PathBuf>,
    /// Images and other render settings.
    pub settings: Settings,
    /// Stacks reconciled at once.
    pub concurrency: u16,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            templates_dir: None,
            settings: Settings::default(),
            concurrency: 16,
        }
    }
}

/// A reconcile error: which step, which object, and the cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("{step} {object}: {source}")]
    Kube {
        /// The pipeline step.
        step: &'static str,
        /// The object, `Kind ns/name`.
        object: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The webhook certificates could not be issued.
    #[error("certificates for {object}: {message}")]
    Certificates {
        /// The stack.
        object: String,
        /// The cause.
        message: String,
    },
    /// The KabStack has no namespace (should never happen for a namespaced resource).
    #[error("KabStack {0} has no namespace")]
    NoNamespace(String),
    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// Short label for the failures metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { step, .. } => step,
            Error::Certificates { .. } => "certificates",
            Error::NoNamespace(_) => "no_namespace",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

/// Everything the operator reads: reflector stores for the objects it reads whole (stacks,
/// entity CRDs, certificate Secrets), the [`Index`] for every other child and the pods.
#[derive(Clone)]
struct Stores {
    stacks: Store<KabStack>,
    crds: Store<CustomResourceDefinition>,
    secrets: Store<Secret>,
    index: Arc<Index>,
}

/// What kab last applied to a child, and the version of the object it produced.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Applied {
    hash: u64,
    version: String,
}

struct Ctx {
    client: Client,
    templates: Templates,
    settings: Settings,
    stores: Stores,
    recorder: Recorder,
    metrics: Arc<crate::metrics::Metrics>,
    applied: Mutex<HashMap<u64, Applied>>,
    failures: Mutex<HashMap<ObjectRef<KabStack>, u32>>,
    probes: Mutex<HashMap<ObjectRef<KabStack>, ProbeRecord>>,
    prepared: Mutex<HashMap<ObjectRef<KabStack>, Arc<Prepared>>>,
    /// When kab last wrote each stack's status (for pacing progress-only writes).
    status_written: Mutex<HashMap<ObjectRef<KabStack>, std::time::Instant>>,
    /// Per stack, the desired set (hash) of the last prune that found nothing failing.
    pruned: Mutex<HashMap<ObjectRef<KabStack>, u64>>,
}

/// Runs the operator until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let templates = Templates::load(config.templates_dir.as_deref())?;
    let ns = config.namespace.clone();
    let stacks_api: Api<KabStack> = namespaced_or_all(&client, ns.as_deref());
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=kab");
    let stack_pods = watcher::Config::default().labels(LABEL_STACK);

    // KabStacks are cached without managedFields (a second copy of the spec's shape, per stack).
    let (stacks, stacks_writer) = reflector::store();
    let stack_stream = watcher(stacks_api, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(|s: &mut KabStack| s.managed_fields_mut().clear())
        .reflect(stacks_writer)
        .applied_objects();
    let controller = Controller::for_stream(stack_stream, stacks.clone())
        .with_config(ControllerConfig::default().concurrency(config.concurrency));

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
    let index = Arc::new(Index::default());
    let dep_stream = indexed(
        watcher(
            namespaced_or_all::<Deployment>(&client, ns.as_deref()),
            managed.clone(),
        ),
        &index,
    );
    let sts_stream = indexed(
        watcher(
            namespaced_or_all::<StatefulSet>(&client, ns.as_deref()),
            managed.clone(),
        ),
        &index,
    );
    let pod_stream = indexed(
        watcher(namespaced_or_all::<Pod>(&client, ns.as_deref()), stack_pods),
        &index,
    );
    let (secrets, secret_stream) = typed(
        namespaced_or_all(&client, ns.as_deref()),
        managed.clone(),
        |s: &mut Secret| {
            trim_meta(&mut s.metadata);
        },
    );
    // The other children by metadata only (`Api<PartialObjectMeta<_>>` asks for no bodies).
    macro_rules! meta {
        ($kind:ty, $api:expr) => {{
            let api: Api<PartialObjectMeta<$kind>> = $api;
            indexed(watcher(api, managed.clone()), &index)
        }};
    }
    let reg_stream = meta!(ValidatingWebhookConfiguration, Api::all(client.clone()));
    let sa_stream = meta!(ServiceAccount, namespaced_or_all(&client, ns.as_deref()));
    let role_stream = meta!(Role, namespaced_or_all(&client, ns.as_deref()));
    let rb_stream = meta!(RoleBinding, namespaced_or_all(&client, ns.as_deref()));
    let cm_stream = meta!(ConfigMap, namespaced_or_all(&client, ns.as_deref()));
    let svc_stream = meta!(Service, namespaced_or_all(&client, ns.as_deref()));
    let pdb_stream = meta!(
        PodDisruptionBudget,
        namespaced_or_all(&client, ns.as_deref())
    );
    let np_stream = meta!(NetworkPolicy, namespaced_or_all(&client, ns.as_deref()));

    let stores = Stores {
        stacks: stacks.clone(),
        crds,
        secrets,
        index,
    };
    let reporter = Reporter {
        controller: "kab-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        templates,
        settings: config.settings.clone(),
        stores,
        recorder: Recorder::new(client.clone(), reporter),
        metrics,
        applied: Mutex::new(HashMap::new()),
        failures: Mutex::new(HashMap::new()),
        probes: Mutex::new(HashMap::new()),
        prepared: Mutex::new(HashMap::new()),
        status_written: Mutex::new(HashMap::new()),
        pruned: Mutex::new(HashMap::new()),
    });

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

    controller
        .watches_stream(crd_stream, crd_mapper)
        .watches_stream(dep_stream, by_labels)
        .watches_stream(sts_stream, by_labels)
        .watches_stream(pod_stream, by_labels)
        .watches_stream(secret_stream, by_labels)
        .watches_stream(reg_stream, by_labels)
        .watches_stream(sa_stream, by_labels)
        .watches_stream(role_stream, by_labels)
        .watches_stream(rb_stream, by_labels)
        .watches_stream(cm_stream, by_labels)
        .watches_stream(svc_stream, by_labels)
        .watches_stream(pdb_stream, by_labels)
        .watches_stream(np_stream, by_labels)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile error (reported by error_policy)");
            }
        })
        .await;
    Ok(())
}

fn namespaced_or_all<K>(client: &Client, ns: Option<&str>) -> Api<K>
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
/// (annotations, owner references, managed fields, other labels) is dropped on arrival (for the
/// objects cached whole: stacks' CRDs and certificate Secrets; other children are in the
/// [`Index`]).
fn trim_meta(m: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
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

/// A typed reflector whose cached objects are trimmed by `modify` (managedFields, pod templates).
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

async fn reconcile(stack: Arc<KabStack>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let start = std::time::Instant::now();
    let ns = stack
        .namespace()
        .ok_or_else(|| Error::NoNamespace(stack.name_any()))?;
    let api: Api<KabStack> = Api::namespaced(ctx.client.clone(), &ns);
    let result = if stack.metadata.deletion_timestamp.is_none()
        && !stack.finalizers().iter().any(|f| f == FINALIZER)
    {
        // A new stack: add the finalizer and go on with the object it returns, rather than
        // waiting for the watch to bring the change back for a second reconcile.
        // The patch is in flight while the reconcile plans certificates and renders (see
        // [`Gate`]).
        let gate = Gate::add_finalizer(&api, &stack);
        // A task spawned from a worker waits in that worker's LIFO slot until the spawner
        // yields: yield once, so the patch is sent before the CPU-bound planning starts.
        tokio::task::yield_now().await;
        apply(stack, ctx.clone(), gate).await
    } else {
        finalizer(&api, FINALIZER, stack, |event| async {
            match event {
                FinalizerEvent::Apply(stack) => {
                    apply(stack, ctx.clone(), Gate::open_already()).await
                }
                FinalizerEvent::Cleanup(stack) => cleanup(stack, ctx.clone()).await,
            }
        })
        .await
        .map_err(|e| match e {
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            other => Error::Finalizer(other.to_string()),
        })
    };
    ctx.metrics.observe_reconcile(
        start.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    ctx.metrics.set_phases(&ctx.stores.stacks.state());
    result
}

type GateFuture = futures::future::Shared<futures::future::BoxFuture<'static, Result<(), String>>>;

/// The finalizer patch of a new stack, in flight while its first reconcile computes. The
/// finalizer exists for what garbage collection cannot remove (the cluster-scoped entity CRD and
/// webhook registration): those writes, status and pruning open (await) the gate first, while the
/// namespaced children, owned by the stack, are applied at once.
#[derive(Clone)]
struct Gate(Option<GateFuture>);

impl Gate {
    fn open_already() -> Self {
        Gate(None)
    }

    fn add_finalizer(api: &Api<KabStack>, stack: &Arc<KabStack>) -> Self {
        let (api, stack) = (api.clone(), stack.clone());
        let patch = tokio::spawn(async move { add_finalizer(&api, &stack).await });
        Gate(Some(
            async move {
                match patch.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) => Err(format!("adding the finalizer: {e}")),
                }
            }
            .boxed()
            .shared(),
        ))
    }

    async fn open(&self) -> Result<(), Error> {
        match &self.0 {
            None => Ok(()),
            Some(patch) => patch.clone().await.map_err(Error::Finalizer),
        }
    }
}

/// Adds kab's finalizer with a JSON patch that fails (to be retried) if the finalizer list changed
/// since the stack was read, as kube's `finalizer` helper does; returns the patched stack.
async fn add_finalizer(api: &Api<KabStack>, stack: &KabStack) -> Result<KabStack, Error> {
    let name = stack.name_any();
    let ops = if stack.finalizers().is_empty() {
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    } else {
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": stack.finalizers()},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ])
    };
    let patch: json_patch::Patch =
        serde_json::from_value(ops).map_err(|e| Error::Finalizer(e.to_string()))?;
    api.patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(|source| Error::Kube {
            step: "add finalizer",
            object: format!("KabStack {}/{name}", stack.namespace().unwrap_or_default()),
            source,
        })
}

fn error_policy(stack: Arc<KabStack>, error: &Error, ctx: Arc<Ctx>) -> Action {
    let key = ObjectRef::from_obj(stack.as_ref());
    let n = {
        let mut failures = lock(&ctx.failures);
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(n);
    tracing::warn!(stack = %format!("{}/{}", stack.namespace().unwrap_or_default(), stack.name_any()), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Exponential backoff per stack: 1 s, 2 s, 4 s … capped at 5 minutes.
fn backoff(failures: u32) -> Duration {
    let secs = 1u64 << failures.saturating_sub(1).min(9);
    Duration::from_secs(secs.min(300))
}

/// What reconciles need of a rendered child, without keeping the object itself (a stack's
/// rendered children weigh ~150 KiB; the outline ~150 bytes: the strings a stack's children
/// share — namespace, stack and component labels — are shared, the kind is static).
#[derive(Clone, Debug)]
struct Outline {
    step: Step,
    /// The template it comes from: a re-render renders just the templates to apply again.
    template: &'static str,
    kind: &'static str,
    namespace: Option<Arc<str>>,
    name: String,
    namespaced: bool,
    /// The `kab.dev/stack` and component labels, to find a workload's pods.
    stack_label: Option<Arc<str>>,
    component: Option<Arc<str>>,
    /// Hash of `kind/namespace/name`: the key of the applied cache.
    key: u64,
    /// Hash of the rendered object, compared with the last apply.
    hash: u64,
}

/// Shares equal strings among a stack's outlines.
#[derive(Default)]
struct Interner(HashSet<Arc<str>>);

impl Interner {
    fn get(&mut self, s: Option<&str>) -> Option<Arc<str>> {
        let s = s?;
        if let Some(shared) = self.0.get(s) {
            return Some(shared.clone());
        }
        let shared: Arc<str> = Arc::from(s);
        self.0.insert(shared.clone());
        Some(shared)
    }
}

impl Outline {
    fn of(child: &Child, strings: &mut Interner) -> Self {
        let labels = child.object.metadata.labels.as_ref();
        let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
        let kind = render::kind_for(&child.resource.api_version, &child.resource.kind)
            .map_or("(unsupported)", |k| k.resource.kind.as_str());
        Outline {
            template: child.template,
            step: child.step,
            kind,
            namespace: strings.get(child.object.metadata.namespace.as_deref()),
            name: child.name().to_owned(),
            namespaced: child.namespaced,
            stack_label: strings.get(label(LABEL_STACK)),
            component: strings.get(label(LABEL_COMPONENT)),
            key: child_key(child),
            hash: hash_object(&child.object),
        }
    }
}

/// The outlines of a stack's rendered children (sharing their common strings).
fn outlines(rendered: &Rendered) -> Vec<Outline> {
    let mut strings = Interner::default();
    rendered
        .children
        .iter()
        .map(|c| Outline::of(c, &mut strings))
        .collect()
}

fn child_key(c: &Child) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        &c.resource.group,
        &c.resource.kind,
        c.object.metadata.namespace.as_deref().unwrap_or(""),
        c.object.metadata.name.as_deref().unwrap_or(""),
    )
        .hash(&mut h);
    h.finish()
}

fn hash_object(obj: &DynamicObject) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(obj).unwrap_or_default().hash(&mut h);
    h.finish()
}

async fn apply(stack: Arc<KabStack>, ctx: Arc<Ctx>, gate: Gate) -> Result<Action, Error> {
    let ns = stack
        .namespace()
        .ok_or_else(|| Error::NoNamespace(stack.name_any()))?;
    let name = stack.name_any();
    let now = Timestamp::now();
    let names = render::names(&stack);
    let entity = Some(stack.spec.entity.crd_name());

    if stack.spec.paused {
        gate.open().await?;
        let rows = observe_existing(&stack, &ctx);
        let cert = cert_facts(&stack, &ctx, now);
        write_status(
            &stack,
            &ctx,
            &Outcome::Paused,
            &rows,
            cert.as_ref(),
            entity,
            now,
        )
        .await?;
        return Ok(Action::await_change());
    }

    if let Err(errors) = validate::validate(&stack) {
        let outcome = Outcome::InvalidSpec(errors.to_string());
        gate.open().await?;
        warn_once(&stack, &ctx, "InvalidSpec", &outcome).await;
        write_status(&stack, &ctx, &outcome, &[], None, entity, now).await?;
        return Ok(Action::await_change());
    }

    if let Some(message) = crd_conflict(&stack, &ctx).await? {
        let outcome = Outcome::Conflict(message);
        gate.open().await?;
        warn_once(&stack, &ctx, "Conflict", &outcome).await;
        let rows = observe_existing(&stack, &ctx);
        write_status(&stack, &ctx, &outcome, &rows, None, entity, now).await?;
        // The other stack may go away or change: look again in a while.
        return Ok(Action::requeue(Duration::from_secs(60)));
    }

    // Certificates: generated once, stored in Secrets, read back, rotated only near expiry.
    let policy = cert_policy(&stack);
    let dns = certs::webhook_dns_names(&names.webhook, &ns);
    let pki = pki_state(&ctx, &ns, &names);
    let action = certs::plan(now, &pki, &policy, &dns);
    // A new or renewed PKI is rendered into the registration's caBundle right away and its
    // Secrets are applied together with the other children (nothing reads them sooner).
    let (pki, pki_changed) = if matches!(action, certs::Action::Keep) {
        (pki, false)
    } else {
        let new =
            certs::execute(now, &pki, &policy, &dns, action).map_err(|e| Error::Certificates {
                object: format!("KabStack {ns}/{name}"),
                message: e.to_string(),
            })?;
        (new, true)
    };

    let facts = Facts {
        ca_bundle_pem: Some(certs::ca_bundle(&pki)),
    };
    let (prepared, fresh) = match prepare(&stack, &ctx, &facts) {
        Ok(r) => r,
        Err(e) => return render_failed(&stack, &ctx, &gate, &e, entity, now).await,
    };

    // Everything but the registration at once; the registration once the webhook serves, so a
    // `Fail` policy never blocks writes on a webhook that is not there yet.
    let webhook_available = deployment_available(&ctx, &ns, &names.webhook);
    let registered = ctx
        .stores
        .index
        .exists(REGISTRATION, None, &names.registration);
    let needed: Vec<usize> = prepared
        .children
        .iter()
        .enumerate()
        .filter(|(_, c)| c.step != Step::Registration || webhook_available || registered)
        .filter(|(_, c)| !applied_already(&ctx, c))
        .map(|(i, _)| i)
        .collect();
    // The objects themselves are not cached: what is to be applied is rendered again (only its
    // templates).
    let rendered = match fresh {
        Some(r) => Some(r),
        None if needed.is_empty() => None,
        None => {
            let wanted: HashSet<&str> = needed
                .iter()
                .map(|&i| prepared.children[i].template)
                .collect();
            match render::render_only(&ctx.templates, &stack, &ctx.settings, &facts, |file| {
                wanted.contains(file)
            }) {
                Ok(r) => Some(r),
                Err(e) => return render_failed(&stack, &ctx, &gate, &e, entity, now).await,
            }
        }
    };
    let mut applies = Vec::with_capacity(needed.len());
    // (Nothing is rendered only when nothing is needed.)
    for &i in &needed {
        let o = &prepared.children[i];
        let child = rendered.as_ref().and_then(|r| {
            r.children
                .iter()
                .find(|c| c.template == o.template && child_key(c) == o.key)
        });
        let Some(child) = child else {
            // Rendering is deterministic; should it ever differ, start over from a fresh render.
            tracing::warn!(stack = %format!("{ns}/{name}"), template = o.template, "a re-render differs from the cached outline; rendering afresh");
            lock(&ctx.prepared).remove(&ObjectRef::from_obj(stack.as_ref()));
            return Ok(Action::requeue(Duration::from_secs(1)));
        };
        let apply = apply_child(ctx.clone(), child.clone(), o.key, o.hash);
        applies.push(if o.namespaced {
            apply.boxed()
        } else {
            let gate = gate.clone();
            async move {
                gate.open().await?;
                apply.await
            }
            .boxed()
        });
    }
    let secrets = async {
        if pki_changed {
            apply_secrets(&stack, &ctx, &pki, &names).await
        } else {
            Ok(())
        }
    };
    let children = stream::iter(applies).buffer_unordered(8).collect();
    let (secrets, results): (_, Vec<Result<(), Error>>) = if pki_changed && registered {
        // A rotation: the registration must trust the new CA before the webhook can be handed
        // a certificate it signed, so the Secrets go after the children.
        let results = children.await;
        (secrets.await, results)
    } else {
        futures::join!(secrets, children)
    };
    gate.open().await?;
    let mut errors: Vec<Error> = secrets.err().into_iter().collect();
    errors.extend(results.into_iter().filter_map(Result::err));
    // Pruning scans every cache for the stack's labels: done when what is desired changed (and
    // once per stack after a start), not on every reconcile.
    let sref = ObjectRef::from_obj(stack.as_ref());
    let pruned = lock(&ctx.pruned).get(&sref) == Some(&prepared.desired);
    if !pruned {
        let prune_errors = prune(&stack, &ctx, &prepared.children, &names).await;
        if prune_errors.is_empty() && errors.is_empty() {
            lock(&ctx.pruned).insert(sref, prepared.desired);
        }
        errors.extend(prune_errors);
    }

    let outcome = match errors.first() {
        None => Outcome::Applied,
        Some(e) => Outcome::ApplyFailed(e.to_string()),
    };
    let mut rows = observe(&stack, &ctx, &prepared.children, &names, webhook_available);
    let mut probe_retry = false;
    if let Some(row) = admission_probe(&stack, &ctx, &names, webhook_available).await {
        probe_retry = !row.ready;
        rows.push(row);
    }
    let cert = cert_facts_from(&pki, &policy);
    let deferred = write_status(&stack, &ctx, &outcome, &rows, cert.as_ref(), entity, now).await?;
    if let Some(e) = errors.into_iter().next() {
        warn_once(&stack, &ctx, "ApplyFailed", &outcome).await;
        return Err(e);
    }
    lock(&ctx.failures).remove(&ObjectRef::from_obj(stack.as_ref()));

    // Wake up for the certificate renewal (or to probe again); otherwise the watches say when
    // something changed.
    let mut next = Duration::from_secs(if probe_retry { 10 } else { 600 });
    if let Some(d) = deferred {
        next = next.min(d);
    }
    if let Some(c) = &cert {
        let until = c.renew_at.as_second() - now.as_second();
        if until > 0 {
            next = next.min(Duration::from_secs(until as u64 + 1));
        } else {
            next = Duration::from_secs(1);
        }
    }
    Ok(Action::requeue(next))
}

/// A stack whose templates do not render: a `RenderFailed` condition and a Warning Event; the
/// stack is looked at again when it (or the templates, with a restart) change.
async fn render_failed(
    stack: &KabStack,
    ctx: &Ctx,
    gate: &Gate,
    e: &render::RenderError,
    entity: Option<String>,
    now: Timestamp,
) -> Result<Action, Error> {
    let outcome = Outcome::RenderFailed(e.to_string());
    gate.open().await?;
    warn_once(stack, ctx, "RenderFailed", &outcome).await;
    write_status(stack, ctx, &outcome, &[], None, entity, now).await?;
    Ok(Action::await_change())
}

/// The last admission probe of a stack: what it was sent for and what it found.
#[derive(Clone, Debug)]
struct ProbeRecord {
    key: String,
    row: Observed,
    at: std::time::Instant,
}

/// Proves the API server → webhook path with a dry-run create of a probe entity that the
/// webhook must deny (see [`crate::admission_probe`]). Sent again only when something it depends on
/// changed (webhook rollout, certificate, registration) or 10 minutes passed, so an idle stack
/// sees no probe writes; a failed probe is retried by the requeue.
async fn admission_probe(
    stack: &KabStack,
    ctx: &Ctx,
    names: &render::Names,
    webhook_available: bool,
) -> Option<Observed> {
    ctx.settings.operator_service_account.as_ref()?;
    let ns = stack.namespace()?;
    let registration = ctx
        .stores
        .index
        .version(REGISTRATION, None, &names.registration)?;
    if !webhook_available {
        return None;
    }
    let dep = ctx.stores.index.deployment(&ns, &names.webhook)?;
    let tls = ctx
        .stores
        .secrets
        .get(&ObjectRef::new(&names.webhook_tls_secret).within(&ns));
    let st = dep.status.clone().unwrap_or_default();
    let key = format!(
        "{}/{}/{}/{}/{}",
        st.observed_generation.unwrap_or_default(),
        st.available_replicas.unwrap_or_default(),
        st.updated_replicas.unwrap_or_default(),
        registration,
        tls.and_then(|t| t.metadata.resource_version.clone())
            .unwrap_or_default(),
    );
    let sref = ObjectRef::from_obj(stack);
    let last = lock(&ctx.probes).get(&sref).cloned();
    if let Some(last) = &last
        && last.key == key
        && last.row.ready
        && last.at.elapsed() < Duration::from_secs(600)
    {
        return Some(last.row.clone());
    }
    let entity = &stack.spec.entity;
    let version = entity.storage_version()?;
    let resource = kube::core::ApiResource {
        group: entity.group.clone(),
        version: version.name.clone(),
        api_version: format!("{}/{}", entity.group, version.name),
        kind: entity.kind.clone(),
        plural: entity.plural(),
    };
    let nonce = {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            stack.metadata.uid.clone(),
            std::time::SystemTime::now(),
            &key,
        )
            .hash(&mut h);
        format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
    };
    let object = crate::admission_probe::probe_object(
        &resource.api_version,
        &resource.kind,
        &ns,
        &version.schema,
        &nonce,
    );
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &resource);
    let obj: DynamicObject = serde_json::from_value(object).ok()?;
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let (ready, message) = match api.create(&pp, &obj).await {
        Err(kube::Error::Api(s)) if s.message.contains(crate::admission_probe::DENIAL_MARKER) => {
            (true, "a dry-run create reached the webhook through its Service and was denied as expected".to_string())
        }
        Err(kube::Error::Api(s)) if s.code == 422 => (
            true,
            format!("inconclusive: the API server refused the probe entity before the webhook saw it ({}); readiness comes from the Deployment", s.message),
        ),
        Err(kube::Error::Api(s)) => (
            false,
            format!("a dry-run create did not reach the webhook ({} {}): {}", s.code, s.reason, s.message),
        ),
        Err(e) => (false, format!("a dry-run create could not be sent: {e}")),
        Ok(_) => (
            false,
            "a dry-run probe entity was admitted without the webhook denying it: the webhook is not being called (failurePolicy Ignore with an unreachable webhook?)".to_string(),
        ),
    };
    let row = Observed {
        step: Step::Registration,
        kind: crate::status::PROBE_KIND.into(),
        name: "dry-run create".into(),
        ready,
        failing: false,
        message,
    };
    lock(&ctx.probes).insert(
        sref,
        ProbeRecord {
            key,
            row: row.clone(),
            at: std::time::Instant::now(),
        },
    );
    Some(row)
}

/// A stack's children rendered for one (uid, generation, CA bundle), with what reconciles need
/// of them precomputed: a stack is reconciled several times per change while its children
/// become ready, and rendering (templates, YAML, typed checks) is most of a reconcile's CPU.
struct Prepared {
    key: u64,
    children: Vec<Outline>,
    /// Hash of the desired (kind, name) set, for pruning.
    desired: u64,
}

/// The outlines of a stack's children for this (uid, generation, CA bundle), from the cache or
/// rendered now (then the rendering is returned too, for the applies it is needed for).
fn prepare(
    stack: &KabStack,
    ctx: &Ctx,
    facts: &Facts,
) -> Result<(Arc<Prepared>, Option<Rendered>), render::RenderError> {
    let key = {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            &stack.metadata.uid,
            &stack.metadata.generation,
            &facts.ca_bundle_pem,
        )
            .hash(&mut h);
        h.finish()
    };
    let sref = ObjectRef::from_obj(stack);
    let cacheable = stack.metadata.uid.is_some() && stack.metadata.generation.is_some();
    if cacheable
        && let Some(p) = lock(&ctx.prepared).get(&sref)
        && p.key == key
    {
        return Ok((p.clone(), None));
    }
    let rendered = render::render(&ctx.templates, stack, &ctx.settings, facts)?;
    let children = outlines(&rendered);
    let desired = {
        let mut set: Vec<u64> = children.iter().map(|c| c.key).collect();
        set.sort();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        set.hash(&mut h);
        h.finish()
    };
    let prepared = Arc::new(Prepared {
        key,
        children,
        desired,
    });
    if cacheable {
        lock(&ctx.prepared).insert(sref, prepared.clone());
    }
    Ok((prepared, Some(rendered)))
}

/// Whether the child is unchanged since kab last applied it (same rendered hash, and the object
/// in the cache has the version that apply returned).
fn applied_already(ctx: &Ctx, child: &Outline) -> bool {
    let Some(current) = observed_version(ctx, child) else {
        return false;
    };
    lock(&ctx.applied)
        .get(&child.key)
        .is_some_and(|last| last.hash == child.hash && last.version == current)
}

/// Applies one child with server-side apply.
async fn apply_child(ctx: Arc<Ctx>, child: Child, key: u64, hash: u64) -> Result<(), Error> {
    let child = &child;
    let name = child.object.metadata.name.as_deref().unwrap_or_default();
    let ns = child
        .object
        .metadata
        .namespace
        .as_deref()
        .filter(|_| child.namespaced);
    let failed = |source| Error::Kube {
        step: step_name(child.step),
        object: describe(child),
        source,
    };
    let mut request = kube::core::Request::new(DynamicObject::url_path(&child.resource, ns))
        .patch(name, &apply_params(MANAGER), &Patch::Apply(&child.object))
        .map_err(|e| failed(kube::Error::BuildRequest(e)))?;
    request.extensions_mut().insert("patch");
    let applied: AppliedAnswer = ctx.client.request(request).await.map_err(failed)?;
    let meta = applied.metadata;
    let version = version(meta.generation, meta.resource_version.as_deref());
    lock(&ctx.applied).insert(key, Applied { hash, version });
    Ok(())
}

/// Server-side apply, forced, as `manager`, with field validation off: what kab applies was
/// checked against its type when rendered (children: a lossless round trip through k8s-openapi;
/// status: serialised from `KabStackStatus`), and with validation on the API server parses every
/// apply body as YAML a second time, strictly, only to look for duplicate or unknown fields.
fn apply_params(manager: &str) -> PatchParams {
    PatchParams::apply(manager).force().validation_ignore()
}

/// What kab reads of an apply's answer: the version the watches will show. Reading only this
/// skips building the whole object and its managedFields, most of the answer.
#[derive(serde::Deserialize)]
struct AppliedAnswer {
    metadata: AppliedMeta,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct AppliedMeta {
    generation: Option<i64>,
    resource_version: Option<String>,
}

fn observed_version(ctx: &Ctx, child: &Outline) -> Option<String> {
    observed(ctx, child.kind, child.namespace.as_deref(), &child.name)
}

/// The version (see [`version_of`]) of a child kab watches, if it is there.
fn observed(ctx: &Ctx, kind: &str, ns: Option<&str>, name: &str) -> Option<String> {
    let s = &ctx.stores;
    match kind {
        "CustomResourceDefinition" => s
            .crds
            .get(&ObjectRef::new(name))
            .map(|o| version_of(&o.metadata)),
        "Secret" => s
            .secrets
            .get(&ObjectRef::new(name).within(ns?))
            .map(|o| version_of(&o.metadata)),
        other => s.index.version(other, ns, name),
    }
}

fn step_name(step: Step) -> &'static str {
    match step {
        Step::Rbac => "apply RBAC",
        Step::EntityApi => "apply entity CRD",
        Step::Config => "apply config",
        Step::Broker => "apply broker",
        Step::Webhook => "apply webhook",
        Step::Registration => "apply webhook registration",
        Step::Controller => "apply entity controller",
    }
}

fn describe(child: &Child) -> String {
    let m = &child.object.metadata;
    match &m.namespace {
        Some(ns) if child.namespaced => format!(
            "{} {}/{}",
            child.resource.kind,
            ns,
            m.name.as_deref().unwrap_or("")
        ),
        _ => format!(
            "{} {}",
            child.resource.kind,
            m.name.as_deref().unwrap_or("")
        ),
    }
}

/// The two certificate Secrets, applied with their own field manager.
async fn apply_secrets(
    stack: &KabStack,
    ctx: &Ctx,
    pki: &PkiState,
    names: &render::Names,
) -> Result<(), Error> {
    let ns = stack.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut labels = render::stack_labels(stack);
    labels.insert(LABEL_COMPONENT.into(), "webhook".into());
    let owner = stack.controller_owner_ref(&());
    let one = |name: &String, type_: &str, data| {
        let api = api.clone();
        let name = name.clone();
        let secret = Secret {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(labels.clone()),
                owner_references: owner.clone().map(|o| vec![o]),
                ..Default::default()
            },
            type_: Some(type_.into()),
            data: Some(data),
            ..Default::default()
        };
        let mut value = serde_json::to_value(&secret).unwrap_or_default();
        value["apiVersion"] = "v1".into();
        value["kind"] = "Secret".into();
        let object = format!("Secret {ns}/{name}");
        async move {
            api.patch(&name, &apply_params(MANAGER_CERTS), &Patch::Apply(&value))
                .await
                .map(|_| ())
                .map_err(|source| Error::Kube {
                    step: "apply certificates",
                    object,
                    source,
                })
        }
    };
    let (ca, tls) = futures::join!(
        one(&names.webhook_ca_secret, "Opaque", pki.ca_secret_data()),
        one(
            &names.webhook_tls_secret,
            "kubernetes.io/tls",
            pki.tls_secret_data()
        ),
    );
    ca.and(tls)
}

fn pki_state(ctx: &Ctx, ns: &str, names: &render::Names) -> PkiState {
    let get = |name: &str| ctx.stores.secrets.get(&ObjectRef::new(name).within(ns));
    let ca = get(&names.webhook_ca_secret);
    let tls = get(&names.webhook_tls_secret);
    PkiState::from_secret_data(
        ca.as_ref().and_then(|s| s.data.as_ref()),
        tls.as_ref().and_then(|s| s.data.as_ref()),
    )
}

fn cert_policy(stack: &KabStack) -> CertPolicy {
    let c = &stack.spec.webhook.certificate;
    // validate() checked both; fall back to the defaults rather than panic.
    let validity = certs::parse_duration(&c.validity).unwrap_or(Duration::from_secs(2160 * 3600));
    let renew_before =
        certs::parse_duration(&c.renew_before).unwrap_or(Duration::from_secs(720 * 3600));
    CertPolicy {
        validity,
        renew_before,
    }
}

fn cert_facts_from(pki: &PkiState, policy: &CertPolicy) -> Option<CertFacts> {
    let serving = pki.serving.as_ref()?;
    Some(CertFacts {
        not_after: serving.not_after,
        renew_at: certs::renew_at(serving, policy),
    })
}

fn cert_facts(stack: &KabStack, ctx: &Ctx, _now: Timestamp) -> Option<CertFacts> {
    let ns = stack.namespace()?;
    let names = render::names(stack);
    cert_facts_from(&pki_state(ctx, &ns, &names), &cert_policy(stack))
}

/// Whether two entity declarations name the same CRD; runs for every stack on every reconcile,
/// so the common cases (other group; same kind and plural) are decided without formatting names.
fn same_crd(a: &EntitySpec, b: &EntitySpec) -> bool {
    a.group == b.group && ((a.kind == b.kind && a.plural == b.plural) || a.plural() == b.plural())
}

/// Whether another stack declares the same entity differently, or the CRD exists unmanaged.
async fn crd_conflict(stack: &KabStack, ctx: &Ctx) -> Result<Option<String>, Error> {
    let e = &stack.spec.entity;
    let crd_name = e.crd_name();
    let others: Vec<Arc<KabStack>> = ctx
        .stores
        .stacks
        .state()
        .into_iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none() && same_crd(&s.spec.entity, e))
        .collect();
    if let Some(message) = sharing_conflict(stack, &others) {
        return Ok(Some(message));
    }
    if ctx.stores.crds.get(&ObjectRef::new(&crd_name)).is_none() {
        // Not in our (label-filtered) cache: it may exist without kab's label.
        let api: Api<PartialObjectMeta<CustomResourceDefinition>> = Api::all(ctx.client.clone());
        if let Some(existing) =
            api.get_metadata_opt(&crd_name)
                .await
                .map_err(|source| Error::Kube {
                    step: "check entity CRD",
                    object: format!("CustomResourceDefinition {crd_name}"),
                    source,
                })?
            && existing
                .labels()
                .get("app.kubernetes.io/managed-by")
                .map(String::as_str)
                != Some("kab")
        {
            return Ok(Some(format!(
                "CustomResourceDefinition {crd_name} already exists and is not managed by kab; kab never overwrites it. \
                 Choose another entity group or kind, or delete that CRD if it is unused."
            )));
        }
    }
    Ok(None)
}

/// The entity declaration that must match for stacks to share a CRD (everything the CRD is
/// rendered from, not the deletion policy).
fn entity_fingerprint(stack: &KabStack) -> serde_json::Value {
    let e = &stack.spec.entity;
    serde_json::json!({
        "group": e.group, "kind": e.kind, "plural": e.plural(), "singular": e.singular(),
        "shortNames": e.short_names, "versions": e.versions,
    })
}

/// Pure: among the stacks declaring this CRD, the oldest defines it; a stack declaring it
/// differently is in conflict.
pub fn sharing_conflict(stack: &KabStack, users: &[Arc<KabStack>]) -> Option<String> {
    let key = |s: &KabStack| {
        (
            s.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
                .unwrap_or(i64::MAX),
            s.namespace().unwrap_or_default(),
            s.name_any(),
        )
    };
    let owner = users.iter().min_by_key(|s| key(s))?;
    if owner.namespace() == stack.namespace() && owner.name_any() == stack.name_any() {
        return None;
    }
    if entity_fingerprint(owner) == entity_fingerprint(stack) {
        return None;
    }
    Some(format!(
        "entity API {} is already declared by KabStack {}/{} with a different definition; \
         stacks share an entity only with identical group, kind, names and versions (schemas). \
         Make spec.entity identical to that stack's, or choose another group or kind",
        stack.spec.entity.crd_name(),
        owner.namespace().unwrap_or_default(),
        owner.name_any()
    ))
}

fn deployment_available(ctx: &Ctx, ns: &str, name: &str) -> bool {
    ctx.stores
        .index
        .deployment(ns, name)
        .and_then(|d| d.status.as_ref().and_then(|s| s.available_replicas))
        .unwrap_or(0)
        >= 1
}

/// Deletes children labelled for this stack that are no longer desired.
async fn prune(
    stack: &KabStack,
    ctx: &Ctx,
    children: &[Outline],
    names: &render::Names,
) -> Vec<Error> {
    let ns = stack.namespace().unwrap_or_default();
    let name = stack.name_any();
    let mut desired: HashSet<(String, String)> = children
        .iter()
        .map(|c| (c.kind.to_owned(), c.name.clone()))
        .collect();
    desired.insert(("Secret".into(), names.webhook_ca_secret.clone()));
    desired.insert(("Secret".into(), names.webhook_tls_secret.clone()));

    // Namespaced children count only in the stack's namespace; the registration is cluster-wide.
    let in_place = |kind: &str, obj_ns: &Option<String>| {
        kind == REGISTRATION || obj_ns.as_deref() == Some(ns.as_str())
    };
    // Every kind kab renders is in the index but the two read whole: the entity CRD (shared,
    // never pruned) and the certificate Secrets (below).
    let indexed: Vec<&str> = render::kinds()
        .iter()
        .map(|k| k.resource.kind.as_str())
        .filter(|k| !matches!(*k, "CustomResourceDefinition" | "Secret"))
        .collect();
    let mut doomed: Vec<(String, Option<String>, String)> = ctx
        .stores
        .index
        .children_of(&indexed, &ns, &name)
        .into_iter()
        .filter(|(kind, obj_ns, obj_name)| {
            in_place(kind, obj_ns) && !desired.contains(&(kind.to_string(), obj_name.clone()))
        })
        .map(|(kind, obj_ns, obj_name)| (kind.to_owned(), obj_ns, obj_name))
        .collect();
    for secret in ctx.stores.secrets.state() {
        let m = &secret.metadata;
        let label = |k: &str| m.labels.as_ref().and_then(|l| l.get(k));
        let secret_name = m.name.clone().unwrap_or_default();
        if label(LABEL_STACK) == Some(&name)
            && label(LABEL_STACK_NAMESPACE) == Some(&ns)
            && in_place("Secret", &m.namespace)
            && !desired.contains(&("Secret".to_owned(), secret_name.clone()))
        {
            doomed.push(("Secret".into(), m.namespace.clone(), secret_name));
        }
    }

    let mut errors = Vec::new();
    for (kind, obj_ns, obj_name) in doomed {
        let Some(supported) = render::kinds().iter().find(|k| k.resource.kind == kind) else {
            continue;
        };
        let (resource, namespaced) = (supported.resource.clone(), supported.namespaced);
        let api: Api<DynamicObject> = match (&obj_ns, namespaced) {
            (Some(n), true) => Api::namespaced_with(ctx.client.clone(), n, &resource),
            _ => Api::all_with(ctx.client.clone(), &resource),
        };
        tracing::info!(kind, name = %obj_name, stack = %format!("{ns}/{name}"), "pruning a child no longer desired");
        match api.delete(&obj_name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => errors.push(Error::Kube {
                step: "prune",
                object: format!("{kind} {obj_name}"),
                source,
            }),
        }
    }
    errors
}

/// Removes what garbage collection cannot: the webhook registration (first, so no namespace is
/// left failing closed) and, when this was its last stack and the policy says so, the entity CRD.
async fn cleanup(stack: Arc<KabStack>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let names = render::names(&stack);
    let regs: Api<ValidatingWebhookConfiguration> = Api::all(ctx.client.clone());
    match regs
        .delete(&names.registration, &DeleteParams::background())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(source) => {
            return Err(Error::Kube {
                step: "delete webhook registration",
                object: format!("ValidatingWebhookConfiguration {}", names.registration),
                source,
            });
        }
    }
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
    let policy_delete = stack.spec.entity.deletion_policy == crate::api::DeletionPolicy::Delete;
    let ours = ctx.stores.crds.get(&ObjectRef::new(&crd_name)).is_some();
    if policy_delete && others == 0 && ours {
        let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
        tracing::info!(crd = %crd_name, "deleting the entity CRD: its last stack is gone and deletionPolicy is Delete");
        match crds.delete(&crd_name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(Error::Kube {
                    step: "delete entity CRD",
                    object: format!("CustomResourceDefinition {crd_name}"),
                    source,
                });
            }
        }
    } else if others == 0 {
        tracing::info!(crd = %crd_name, "keeping the entity CRD and its data (deletionPolicy Retain)");
    }
    forget(&stack, &ctx);
    Ok(Action::await_change())
}

use crate::lock;

/// Drops what the operator remembers about a stack that is going away.
fn forget(stack: &KabStack, ctx: &Ctx) {
    let sref = ObjectRef::from_obj(stack);
    let prepared = lock(&ctx.prepared).remove(&sref);
    if let Some(prepared) = prepared {
        let mut applied = lock(&ctx.applied);
        for child in &prepared.children {
            applied.remove(&child.key);
        }
    }
    lock(&ctx.pruned).remove(&sref);
    lock(&ctx.status_written).remove(&sref);
    lock(&ctx.probes).remove(&sref);
    lock(&ctx.failures).remove(&sref);
}

/// Status rows for every desired child, from the watch caches.
fn observe(
    stack: &KabStack,
    ctx: &Ctx,
    children: &[Outline],
    names: &render::Names,
    webhook_available: bool,
) -> Vec<Observed> {
    let ns = stack.namespace().unwrap_or_default();
    let mut rows: Vec<Observed> = children
        .iter()
        .map(|c| observe_child(ctx, c, webhook_available))
        .collect();
    for secret in [&names.webhook_ca_secret, &names.webhook_tls_secret] {
        let exists = ctx
            .stores
            .secrets
            .get(&ObjectRef::new(secret).within(&ns))
            .is_some();
        rows.push(Observed {
            step: Step::Config,
            kind: "Secret".into(),
            name: format!("{ns}/{secret}"),
            ready: exists,
            failing: false,
            message: if exists {
                "present".into()
            } else {
                "not created yet".into()
            },
        });
    }
    rows
}

/// Rows for a stack that is not rendered this time (paused, conflict): what exists.
fn observe_existing(stack: &KabStack, ctx: &Ctx) -> Vec<Observed> {
    let facts = Facts {
        ca_bundle_pem: None,
    };
    match render::render(&ctx.templates, stack, &ctx.settings, &facts) {
        Ok(r) => {
            let names = render::names(stack);
            let ns = stack.namespace().unwrap_or_default();
            let available = deployment_available(ctx, &ns, &names.webhook);
            observe(stack, ctx, &outlines(&r), &names, available)
        }
        Err(_) => Vec::new(),
    }
}

fn observe_child(ctx: &Ctx, child: &Outline, webhook_available: bool) -> Observed {
    let ns = child.namespace.as_deref().unwrap_or_default().to_owned();
    let name = child.name.clone();
    let display = if child.namespaced {
        format!("{ns}/{name}")
    } else {
        name.clone()
    };
    let kind = child.kind;
    let row = |ready: bool, failing: bool, message: String| Observed {
        step: child.step,
        kind: kind.to_owned(),
        name: display.clone(),
        ready,
        failing,
        message,
    };
    let s = &ctx.stores;
    match kind {
        "CustomResourceDefinition" => match s.crds.get(&ObjectRef::new(&name)) {
            None => row(false, false, "not created yet".into()),
            Some(crd) => {
                let (ready, failing, msg) = health::crd_health(&crd);
                row(ready, failing, msg)
            }
        },
        "Deployment" => match s.index.deployment(&ns, &name) {
            None => row(false, false, "not created yet".into()),
            Some(d) => {
                let (ready, failing, msg) =
                    health::deployment_health_with(&d, || pods_of(ctx, &ns, child));
                row(ready, failing, msg)
            }
        },
        "StatefulSet" => match s.index.statefulset(&ns, &name) {
            None => row(false, false, "not created yet".into()),
            Some(st) => {
                let (ready, failing, msg) =
                    health::statefulset_health_with(&st, || pods_of(ctx, &ns, child));
                row(ready, failing, msg)
            }
        },
        "ValidatingWebhookConfiguration" => {
            if s.index.exists(REGISTRATION, None, &name) {
                row(true, false, "registered".into())
            } else if webhook_available {
                row(false, false, "not registered yet".into())
            } else {
                row(
                    false,
                    false,
                    "waits for the webhook Deployment to be available before registering it".into(),
                )
            }
        }
        other => {
            let exists =
                observed(ctx, other, child.namespaced.then_some(ns.as_str()), &name).is_some();
            row(
                exists,
                false,
                if exists {
                    "present".into()
                } else {
                    "not created yet".into()
                },
            )
        }
    }
}

/// Pods of a workload child: the stack's pods with the same component label.
fn pods_of(ctx: &Ctx, ns: &str, child: &Outline) -> Vec<Arc<Pod>> {
    ctx.stores
        .index
        .pods(ns, child.stack_label.as_deref(), child.component.as_deref())
}

/// Writes the status computed from what was observed, unless it equals the stored one. Progress
/// inside one rollout ([`status::progress_only`]) is written at most once per [`STATUS_PACE`]
/// per stack: a stack's parts become ready one by one, and a status write per step would cost
/// the API server more than the rollout itself at scale. Returns when to come back for such a
/// deferred write.
async fn write_status(
    stack: &KabStack,
    ctx: &Ctx,
    outcome: &Outcome,
    rows: &[Observed],
    cert: Option<&CertFacts>,
    entity: Option<String>,
    now: Timestamp,
) -> Result<Option<Duration>, Error> {
    let new = status::compute(&status::Input {
        stack,
        outcome,
        children: rows,
        cert,
        entity,
        now,
    });
    if stack.status.as_ref() == Some(&new) {
        return Ok(None);
    }
    let sref = ObjectRef::from_obj(stack);
    if let Some(old) = &stack.status
        && status::progress_only(old, &new)
        && let Some(last) = lock(&ctx.status_written).get(&sref)
        && last.elapsed() < STATUS_PACE
    {
        return Ok(Some(STATUS_PACE - last.elapsed()));
    }
    let ns = stack.namespace().unwrap_or_default();
    let name = stack.name_any();
    let api: Api<KabStack> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": format!("{}/{}", crate::api::GROUP, crate::api::VERSION),
        "kind": "KabStack",
        "status": new,
    });
    api.patch_status(&name, &apply_params(MANAGER_STATUS), &Patch::Apply(&patch))
        .await
        .map_err(|source| Error::Kube {
            step: "write status",
            object: format!("KabStack {ns}/{name}"),
            source,
        })?;
    lock(&ctx.status_written).insert(sref, std::time::Instant::now());
    Ok(None)
}

/// Publishes a Warning Event when the Reconciled condition is about to change to this message,
/// so a stack stuck on the same error does not flood the namespace with events.
async fn warn_once(stack: &KabStack, ctx: &Ctx, reason: &str, outcome: &Outcome) {
    let message = match outcome {
        Outcome::InvalidSpec(m)
        | Outcome::Conflict(m)
        | Outcome::RenderFailed(m)
        | Outcome::ApplyFailed(m) => m.clone(),
        _ => return,
    };
    let same = stack
        .status
        .as_ref()
        .and_then(|s| status::condition(s, "Reconciled"))
        .is_some_and(|c| c.reason == reason && c.message == message);
    if same {
        return;
    }
    let note: String = message.chars().take(1000).collect();
    let event = Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &stack.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish a Warning event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::KabStackSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn stack(ns: &str, name: &str, created: &str, schema: serde_json::Value) -> Arc<KabStack> {
        let spec: KabStackSpec = serde_json::from_value(serde_json::json!({
            "entity": {"group": "todo.example.com", "kind": "Todo",
                       "versions": [{"name": "v1", "schema": schema}]}
        }))
        .unwrap();
        let mut s = KabStack::new(name, spec);
        s.metadata.namespace = Some(ns.into());
        s.metadata.creation_timestamp = Some(Time(created.parse().unwrap()));
        Arc::new(s)
    }

    #[test]
    fn stacks_with_the_same_entity_share_and_a_different_schema_conflicts() {
        let a = stack(
            "a",
            "todo",
            "2026-11-27T10:00:00Z",
            serde_json::json!({"type": "object"}),
        );
        let b = stack(
            "b",
            "todo",
            "2026-11-27T11:00:00Z",
            serde_json::json!({"type": "object"}),
        );
        let c = stack(
            "c",
            "todo",
            "2026-11-27T12:00:00Z",
            serde_json::json!({"type": "object", "properties": {"x": {"type": "string"}}}),
        );
        let users = vec![a.clone(), b.clone(), c.clone()];
        assert_eq!(sharing_conflict(&a, &users), None);
        assert_eq!(sharing_conflict(&b, &users), None);
        let msg = sharing_conflict(&c, &users).unwrap();
        assert!(msg.contains("KabStack a/todo"), "{msg}");
        assert!(msg.contains("todos.todo.example.com"));
    }

    #[test]
    fn same_crd_compares_plural_and_group() {
        let entity = |group: &str, kind: &str, plural: Option<&str>| {
            let mut e = stack("a", "todo", "2026-11-27T10:00:00Z", serde_json::json!({}))
                .spec
                .entity
                .clone();
            e.group = group.into();
            e.kind = kind.into();
            e.plural = plural.map(Into::into);
            e
        };
        let todo = entity("todo.example.com", "Todo", None);
        assert!(same_crd(&todo, &entity("todo.example.com", "Todo", None)));
        // The kind differs, the CRD name (todos.todo.example.com) does not.
        assert!(same_crd(
            &todo,
            &entity("todo.example.com", "TODO", Some("todos"))
        ));
        assert!(!same_crd(&todo, &entity("other.example.com", "Todo", None)));
        assert!(!same_crd(
            &todo,
            &entity("todo.example.com", "Todo", Some("todoes"))
        ));
        assert!(!same_crd(&todo, &entity("todo.example.com", "Task", None)));
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

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(50), Duration::from_secs(300));
    }
}
