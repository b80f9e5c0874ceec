//! The status tree of a stack: a pure function ([`build`]) of the facts `kab status` fetched
//! ([`StackFacts`]). The same [`Node`] tree is printed as text, JSON, YAML or graphviz.
//!
//! A line of the tree is either a *part* of the stack (entity API, webhook, entity controller,
//! broker, config and RBAC), whose state, reason, message and age come from the stack's status
//! condition (the operator's word), or a Kubernetes *object* under a part, whose state comes from
//! what the cluster says about it right now. Both appear, so a stale status (operator stopped) and
//! a live failure (a crash-looping pod) are each visible.
//!
//! To add a fact (the webhook's last dry-run probe, the entity controller's publish lag): fetch it
//! into [`StackFacts`], then add a line or a [`Node::facts`] entry where the part is built.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{BrokerMode, JetStreamStorage, KabStack, KabStackStatus, Phase};
use crate::render::{self, Step};

/// The state of one line.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// Everything it needs is there and working.
    Ready,
    /// On its way: being created, rolled out, or waiting for something that is on its way.
    Progressing,
    /// Something is failing (a crash-looping pod, an expired certificate, a failed apply).
    Degraded,
    /// The stack cannot be reconciled until it is edited (invalid spec, conflict).
    Failed,
    /// `spec.paused` is true: kab changes nothing.
    Paused,
    /// The stack is being deleted.
    Deleting,
    /// Not used by this stack (`broker.mode: None`).
    Disabled,
    /// `kab status` could not read it (the message says why, e.g. forbidden).
    Unknown,
}

impl State {
    /// The state as printed.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ready => "Ready",
            State::Progressing => "Progressing",
            State::Degraded => "Degraded",
            State::Failed => "Failed",
            State::Paused => "Paused",
            State::Deleting => "Deleting",
            State::Disabled => "Disabled",
            State::Unknown => "Unknown",
        }
    }
}

/// One line of the tree. `kab status NS/NAME -o json` prints the root (the stack); `-A` prints a
/// [`StatusList`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    /// What the line is about: `KabStack`; a part (`EntityAPI`, `Webhook`, `EntityController`,
    /// `Broker`, `ConfigAndRBAC`); or an object kind (`CustomResourceDefinition`, `Deployment`,
    /// `StatefulSet`, `Certificate`, `ValidatingWebhookConfiguration`).
    pub kind: String,
    /// `namespace/name` or `name` of the object; empty for a part.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Its state.
    pub state: State,
    /// Why, in one CamelCase word (the reason of the blocking condition when not Ready).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// What a person reads: the facts when all is well, the blocker otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Since when it has been in this state (a condition's `lastTransitionTime`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// The facts behind the line, typed, for scripts (e.g. `readyReplicas`, `entities`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub facts: BTreeMap<String, Value>,
    /// Lines under this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Node>,
}

/// What `kab status -A -o json|yaml` prints.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct StatusList {
    /// One tree per stack, sorted by namespace and name.
    pub items: Vec<Node>,
}

impl Node {
    fn new(kind: &str, name: impl Into<String>, state: State) -> Self {
        Node {
            kind: kind.to_owned(),
            name: name.into(),
            state,
            reason: String::new(),
            message: String::new(),
            since: None,
            facts: BTreeMap::new(),
            children: Vec::new(),
        }
    }

    fn why(mut self, reason: &str, message: impl Into<String>) -> Self {
        self.reason = reason.to_owned();
        self.message = message.into();
        self
    }

    fn since(mut self, since: Option<Time>) -> Self {
        self.since = since;
        self
    }

    fn fact(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.facts.insert(name.to_owned(), value.into());
        self
    }

    fn child(mut self, child: Node) -> Self {
        self.children.push(child);
        self
    }

    /// Every line of the tree, depth first, with its depth (the root is 0).
    pub fn lines(&self) -> Vec<(usize, &Node)> {
        fn walk<'a>(n: &'a Node, depth: usize, out: &mut Vec<(usize, &'a Node)>) {
            out.push((depth, n));
            for c in &n.children {
                walk(c, depth + 1, out);
            }
        }
        let mut out = Vec::new();
        walk(self, 0, &mut out);
        out
    }

    /// The first line of this kind (and name, when given), depth first.
    pub fn find(&self, kind: &str, name: Option<&str>) -> Option<&Node> {
        self.lines()
            .into_iter()
            .map(|(_, n)| n)
            .find(|n| n.kind == kind && name.is_none_or(|want| n.name == want))
    }
}

/// The result of fetching one thing.
#[derive(Clone, Debug, PartialEq)]
pub enum Fetched<T> {
    /// It exists; here is what matters about it.
    Found(T),
    /// It does not exist.
    Missing,
    /// It could not be read; the error, e.g. `forbidden`.
    Unknown(String),
}

impl<T> Fetched<T> {
    /// The value, when found.
    pub fn found(&self) -> Option<&T> {
        match self {
            Fetched::Found(t) => Some(t),
            _ => None,
        }
    }
}

/// A Deployment or StatefulSet of the stack, as its health functions see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// `Deployment` or `StatefulSet`.
    pub kind: String,
    /// `namespace/name`.
    pub name: String,
    /// Ready (available, rolled out).
    pub ready: bool,
    /// Something is failing (crash loop, deadline exceeded), not merely in progress.
    pub failing: bool,
    /// What the operator's health functions say, e.g. `1/2 available: pod x CrashLoopBackOff (3 restarts)`.
    pub message: String,
    /// Ready (StatefulSet) or available (Deployment) replicas.
    pub ready_replicas: i32,
    /// Desired replicas.
    pub replicas: i32,
    /// When it last became available or unavailable (the Deployment's `Available` condition).
    pub since: Option<Time>,
}

impl Workload {
    /// From a Deployment and its pods ([`crate::health::deployment_health`]).
    pub fn from_deployment(d: &Deployment, pods: &[Arc<Pod>]) -> Self {
        let (ready, failing, message) = crate::health::deployment_health(d, pods);
        let status = d.status.as_ref();
        // `Available` dates this line only while it agrees with it (a Deployment can be
        // available and failing at once).
        let since = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_.as_deref() == Some("Available")))
            .filter(|c| (c.status.as_deref() == Some("True")) == ready)
            .and_then(|c| c.last_transition_time.clone());
        Workload {
            kind: "Deployment".into(),
            name: display_name(&d.metadata),
            ready,
            failing,
            message,
            ready_replicas: status.and_then(|s| s.available_replicas).unwrap_or(0),
            replicas: d.spec.replicas.unwrap_or(1),
            since,
        }
    }

    /// From a StatefulSet and its pods ([`crate::health::statefulset_health`]).
    pub fn from_statefulset(s: &StatefulSet, pods: &[Arc<Pod>]) -> Self {
        let (ready, failing, message) = crate::health::statefulset_health(s, pods);
        Workload {
            kind: "StatefulSet".into(),
            name: display_name(&s.metadata),
            ready,
            failing,
            message,
            ready_replicas: s
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0),
            replicas: s.spec.replicas.unwrap_or(1),
            since: None,
        }
    }
}

fn display_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    let name = meta.name.clone().unwrap_or_default();
    match &meta.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name,
    }
}

/// The entity's CustomResourceDefinition.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityCrd {
    /// `Established=True`.
    pub established: bool,
    /// The message of `NamesAccepted=False`, when the names clash with another API.
    pub names_rejected: Option<String>,
    /// Served versions.
    pub served: Vec<String>,
    /// The storage version.
    pub storage: Option<String>,
    /// When `Established` last changed.
    pub since: Option<Time>,
}

impl EntityCrd {
    /// From the CRD object.
    pub fn from_crd(crd: &CustomResourceDefinition) -> Self {
        let conds = crd
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let established = conds.iter().find(|c| c.type_ == "Established");
        EntityCrd {
            established: established.is_some_and(|c| c.status == "True"),
            names_rejected: conds
                .iter()
                .find(|c| c.type_ == "NamesAccepted" && c.status == "False")
                .map(|c| c.message.clone().unwrap_or_default()),
            served: crd
                .spec
                .versions
                .iter()
                .filter(|v| v.served)
                .map(|v| v.name.clone())
                .collect(),
            storage: crd
                .spec
                .versions
                .iter()
                .find(|v| v.storage)
                .map(|v| v.name.clone()),
            since: established.and_then(|c| c.last_transition_time.clone()),
        }
    }
}

/// How many entities the stack's namespace holds (a LIST with a limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntityCount {
    /// The count, or a lower bound when not exact.
    pub count: u64,
    /// Whether the API server said how many remain (`remainingItemCount`).
    pub exact: bool,
}

/// The stack's ValidatingWebhookConfiguration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// Whether its webhook has a `caBundle`.
    pub ca_bundle: bool,
    /// Its failure policy (`Fail`, `Ignore`).
    pub failure_policy: Option<String>,
}

/// A config or RBAC object found with the stack's labels.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectRef {
    /// Kind, e.g. `Role`.
    pub kind: String,
    /// `namespace/name` or `name`.
    pub name: String,
}

/// Everything `kab status` fetched about one stack: the input of [`build`].
#[derive(Clone, Debug)]
pub struct StackFacts {
    /// The stack, with its status.
    pub stack: KabStack,
    /// The entity's CRD.
    pub crd: Fetched<EntityCrd>,
    /// Entities in the stack's namespace.
    pub entities: Fetched<EntityCount>,
    /// The webhook Deployment.
    pub webhook: Fetched<Workload>,
    /// The webhook registration.
    pub registration: Fetched<Registration>,
    /// The entity controller Deployment.
    pub controller: Fetched<Workload>,
    /// The managed broker's workload (StatefulSet for File storage, Deployment for Memory).
    pub broker: Fetched<Workload>,
    /// ConfigMaps, Secrets, ServiceAccounts, Roles and RoleBindings carrying the stack's labels.
    pub objects: Fetched<Vec<ObjectRef>>,
}

/// Kinds the config-and-RBAC line counts.
pub const CONFIG_RBAC_KINDS: [&str; 5] = [
    "ConfigMap",
    "Secret",
    "ServiceAccount",
    "Role",
    "RoleBinding",
];

/// What the stack-level status says blocks every part that is not there (a Failed stack).
struct Blocked {
    reason: String,
    stack: String,
}

impl Blocked {
    fn not_created(&self) -> String {
        format!(
            "not created: KabStack {} is Failed ({})",
            self.stack, self.reason
        )
    }
}

/// Builds the tree of one stack. Pure: `now` only dates the certificate's expiry.
pub fn build(f: &StackFacts, now: Timestamp) -> Node {
    let stack = &f.stack;
    let names = render::names(stack);
    let status = stack.status.as_ref();
    let stack_name = format!("{}/{}", names.namespace, names.stack);

    let blocked = status
        .filter(|s| s.phase == Some(Phase::Failed))
        .map(|s| Blocked {
            reason: crate::status::condition(s, "Reconciled")
                .map(|c| c.reason.clone())
                .unwrap_or_else(|| "Failed".into()),
            stack: stack_name.clone(),
        });

    let root = root_line(stack, status, &stack_name);
    root.child(entity_api(f, status, blocked.as_ref()))
        .child(webhook(f, status, blocked.as_ref(), now))
        .child(controller(f, status, blocked.as_ref()))
        .child(broker(f, status, blocked.as_ref()))
        .child(config_rbac(f, blocked.as_ref()))
}

fn root_line(stack: &KabStack, status: Option<&KabStackStatus>, name: &str) -> Node {
    let generation = stack.metadata.generation;
    let mut node = Node::new("KabStack", name, State::Progressing);
    if let Some(g) = generation {
        node = node.fact("generation", g);
    }
    let Some(status) = status else {
        return node.why(
            "NotObserved",
            "the operator has not reported on this stack yet (is kab operator running?)",
        );
    };
    let phase = status.phase;
    node.state = match phase {
        Some(Phase::Ready) => State::Ready,
        Some(Phase::Degraded) => State::Degraded,
        Some(Phase::Failed) => State::Failed,
        Some(Phase::Paused) => State::Paused,
        Some(Phase::Deleting) => State::Deleting,
        Some(Phase::Progressing) | None => State::Progressing,
    };
    if let Some(p) = phase {
        node = node.fact("phase", p.as_str());
    }
    if let Some(e) = &status.entity {
        node = node.fact("entity", e.as_str());
    }
    if let Some(g) = status.observed_generation {
        node = node.fact("observedGeneration", g);
    }
    let ready = crate::status::condition(status, "Ready");
    if let Some(c) = ready {
        node = node
            .why(&c.reason, c.message.clone())
            .since(Some(c.last_transition_time.clone()));
    }
    if let (Some(seen), Some(current)) = (status.observed_generation, generation)
        && seen < current
    {
        node.message = format!(
            "{} (status is for generation {seen}, the spec is at {current}: the operator has not caught up)",
            node.message
        );
    }
    node
}

/// A part line from its condition: Ready when True; Failed when the stack is; Degraded when the
/// condition says something is failing; Progressing otherwise.
fn part(
    kind: &str,
    status: Option<&KabStackStatus>,
    type_: &str,
    blocked: Option<&Blocked>,
) -> Node {
    let node = Node::new(kind, "", State::Progressing).fact("condition", type_);
    let Some(c) = status.and_then(|s| crate::status::condition(s, type_)) else {
        return node.why(
            "NotObserved",
            format!("the operator has not reported {type_} yet"),
        );
    };
    let state = condition_state(c, blocked);
    let mut node = node.since(Some(c.last_transition_time.clone()));
    node.state = state;
    node.reason = c.reason.clone();
    match blocked {
        // Nothing was rendered because the stack is Failed: name that, not "not rendered".
        Some(b) if state == State::Failed && c.reason == "NotRendered" => {
            node.reason = b.reason.clone();
            node.message = b.not_created();
        }
        _ if state != State::Ready => node.message = c.message.clone(),
        _ => {}
    }
    node
}

fn condition_state(c: &Condition, blocked: Option<&Blocked>) -> State {
    if c.status == "True" {
        State::Ready
    } else if blocked.is_some() {
        State::Failed
    } else if matches!(c.reason.as_str(), "Failing" | "Expired" | "ApplyFailed") {
        State::Degraded
    } else {
        State::Progressing
    }
}

/// The line of an object that does not exist (or could not be read).
fn absent(kind: &str, name: &str, what: &Fetched<impl Sized>, blocked: Option<&Blocked>) -> Node {
    match (what, blocked) {
        (Fetched::Unknown(e), _) => Node::new(kind, name, State::Unknown)
            .why("ReadFailed", format!("could not read it: {e}")),
        (_, Some(b)) => Node::new(kind, name, State::Failed).why(&b.reason, b.not_created()),
        _ => Node::new(kind, name, State::Progressing).why("NotCreated", "not created yet"),
    }
}

fn entity_api(f: &StackFacts, status: Option<&KabStackStatus>, blocked: Option<&Blocked>) -> Node {
    let spec = &f.stack.spec.entity;
    let crd_name = spec.crd_name();
    let ns = render::names(&f.stack).namespace;
    let part = part("EntityAPI", status, "EntityAPIReady", blocked);
    let line = match &f.crd {
        Fetched::Found(crd) => {
            let mut facts = vec![];
            let mut node = if let Some(m) = &crd.names_rejected {
                Node::new("CustomResourceDefinition", &crd_name, State::Degraded)
                    .why("NamesNotAccepted", format!("names not accepted: {m}"))
            } else if crd.established {
                facts.push("Established".to_string());
                Node::new("CustomResourceDefinition", &crd_name, State::Ready)
                    .why("Established", "")
            } else {
                Node::new("CustomResourceDefinition", &crd_name, State::Progressing)
                    .why("NotEstablished", "")
            }
            .since(crd.since.clone())
            .fact("established", crd.established)
            .fact("servedVersions", crd.served.clone());
            if !crd.served.is_empty() {
                facts.push(format!("serves {}", crd.served.join(", ")));
            }
            if let Some(s) = &crd.storage {
                node = node.fact("storageVersion", s.as_str());
                facts.push(format!("storage {s}"));
            }
            match &f.entities {
                Fetched::Found(n) => {
                    node = node.fact("entities", n.count);
                    let more = if n.exact { "" } else { "at least " };
                    let plural = if n.count == 1 {
                        spec.singular()
                    } else {
                        spec.plural()
                    };
                    facts.push(format!("{more}{} {plural} in {ns}", n.count));
                }
                Fetched::Unknown(e) => facts.push(format!("entities not counted: {e}")),
                Fetched::Missing => {}
            }
            if node.state != State::Degraded {
                node.message = facts.join(", ");
            }
            node
        }
        other => absent("CustomResourceDefinition", &crd_name, other, blocked),
    };
    part.child(line)
}

fn workload_line(kind: &str, name: &str, w: &Fetched<Workload>, blocked: Option<&Blocked>) -> Node {
    match w {
        Fetched::Found(w) => {
            let (state, reason) = if w.ready {
                (State::Ready, "Available")
            } else if w.failing {
                (State::Degraded, "Failing")
            } else {
                (State::Progressing, "RollingOut")
            };
            Node::new(&w.kind, &w.name, state)
                .why(reason, w.message.clone())
                .since(w.since.clone())
                .fact("readyReplicas", w.ready_replicas)
                .fact("replicas", w.replicas)
        }
        other => absent(kind, name, other, blocked),
    }
}

fn webhook(
    f: &StackFacts,
    status: Option<&KabStackStatus>,
    blocked: Option<&Blocked>,
    now: Timestamp,
) -> Node {
    let names = render::names(&f.stack);
    let ns = &names.namespace;
    let deployment = workload_line(
        "Deployment",
        &format!("{ns}/{}", names.webhook),
        &f.webhook,
        blocked,
    );

    let cert_name = format!("{ns}/{}", names.webhook_tls_secret);
    let cert_cond = status.and_then(|s| crate::status::condition(s, "CertificateValid"));
    let certificate = match (status.and_then(|s| s.certificate.as_ref()), cert_cond) {
        (Some(cert), cond) => {
            let state = cond.map_or(State::Progressing, |c| condition_state(c, blocked));
            let left = cert
                .not_after
                .parse::<Timestamp>()
                .ok()
                .map(|t| {
                    let secs = t.as_second() - now.as_second();
                    if secs > 0 {
                        format!(" (in {})", crate::cli::show::human_duration(secs))
                    } else {
                        " (expired)".to_string()
                    }
                })
                .unwrap_or_default();
            let mut node = Node::new("Certificate", &cert_name, state)
                .fact("notAfter", cert.not_after.as_str())
                .fact("renewAt", cert.renew_at.as_str())
                .since(cond.map(|c| c.last_transition_time.clone()));
            node.reason = cond.map(|c| c.reason.clone()).unwrap_or_default();
            node.message = if state == State::Ready || cond.is_none() {
                format!(
                    "expires {}{left}, kab renews it at {}",
                    cert.not_after, cert.renew_at
                )
            } else {
                cond.map(|c| c.message.clone()).unwrap_or_default()
            };
            node
        }
        (None, _) if blocked.is_some() => {
            absent("Certificate", &cert_name, &Fetched::<()>::Missing, blocked)
        }
        (None, Some(c)) => Node::new("Certificate", &cert_name, condition_state(c, blocked))
            .why(&c.reason, c.message.clone())
            .since(Some(c.last_transition_time.clone())),
        (None, None) => Node::new("Certificate", &cert_name, State::Progressing)
            .why("NotIssued", "not issued yet"),
    };

    let registration = match &f.registration {
        Fetched::Found(r) => {
            let mut said = vec!["registered".to_string()];
            let state = if r.ca_bundle {
                said.push("caBundle set".into());
                State::Ready
            } else {
                said.push("no caBundle yet".into());
                State::Progressing
            };
            if let Some(p) = &r.failure_policy {
                said.push(format!("failurePolicy {p}"));
            }
            let mut node = Node::new("ValidatingWebhookConfiguration", &names.registration, state)
                .why(
                    if r.ca_bundle {
                        "Registered"
                    } else {
                        "NoCaBundle"
                    },
                    said.join(", "),
                )
                .fact("caBundle", r.ca_bundle);
            if let Some(p) = &r.failure_policy {
                node = node.fact("failurePolicy", p.as_str());
            }
            node
        }
        Fetched::Missing if blocked.is_none() => {
            let available = f.webhook.found().is_some_and(|w| w.ready);
            Node::new(
                "ValidatingWebhookConfiguration",
                &names.registration,
                State::Progressing,
            )
            .why(
                "NotRegistered",
                if available {
                    "not registered yet"
                } else {
                    "waits for the webhook Deployment to be available before it is registered"
                },
            )
        }
        other => absent(
            "ValidatingWebhookConfiguration",
            &names.registration,
            other,
            blocked,
        ),
    };

    let part = part("Webhook", status, "WebhookReady", blocked);
    // The operator's dry-run admission probe (`crate::status::PROBE_KIND` rows): whether the API
    // server really reaches the webhook. Only the status knows it.
    let probes: Vec<Node> = status
        .map(|s| s.components.as_slice())
        .unwrap_or_default()
        .iter()
        .filter(|c| c.kind == "AdmissionProbe")
        .map(|c| {
            let state = match (c.ready, part.state) {
                (true, _) => State::Ready,
                (false, State::Failed | State::Degraded) => part.state,
                (false, _) => State::Progressing,
            };
            Node::new("AdmissionProbe", &c.name, state).why(
                if c.ready { "Admitted" } else { "ProbeFailed" },
                c.message.clone(),
            )
        })
        .collect();
    let mut part = part
        .child(deployment)
        .child(certificate)
        .child(registration);
    part.children.extend(probes);
    part
}

fn controller(f: &StackFacts, status: Option<&KabStackStatus>, blocked: Option<&Blocked>) -> Node {
    let names = render::names(&f.stack);
    let name = format!("{}/{}", names.namespace, names.controller);
    part("EntityController", status, "ControllerReady", blocked).child(workload_line(
        "Deployment",
        &name,
        &f.controller,
        blocked,
    ))
}

fn broker(f: &StackFacts, status: Option<&KabStackStatus>, blocked: Option<&Blocked>) -> Node {
    let spec = &f.stack.spec.broker;
    let names = render::names(&f.stack);
    match spec.mode {
        BrokerMode::None => Node::new("Broker", "", State::Disabled)
            .why(
                "Disabled",
                "broker.mode is None: entity changes are not published",
            )
            .fact("mode", "None"),
        BrokerMode::External => {
            let url = spec.url.clone().unwrap_or_default();
            let mut node = part("Broker", status, "BrokerReady", blocked)
                .fact("mode", "External")
                .fact("url", url.as_str());
            if node.state == State::Ready {
                node.message = format!("external broker {url} (kab does not run or check it)");
            }
            node
        }
        BrokerMode::Managed => {
            let kind = match spec.jetstream.storage {
                JetStreamStorage::File => "StatefulSet",
                JetStreamStorage::Memory => "Deployment",
            };
            let name = format!("{}/{}", names.namespace, names.broker);
            part("Broker", status, "BrokerReady", blocked)
                .fact("mode", "Managed")
                .child(workload_line(kind, &name, &f.broker, blocked))
        }
    }
}

/// The config and RBAC objects the stack should have: the operator's component rows of those
/// kinds (they follow its template overrides), or, before it reported any, what the embedded
/// templates render plus the certificate Secrets. Empty when neither is known (an invalid spec).
pub fn desired_config_rbac(stack: &KabStack) -> Vec<ObjectRef> {
    let mut out: Vec<ObjectRef> = match stack.status.as_ref() {
        Some(st) if !st.components.is_empty() => st
            .components
            .iter()
            .filter(|c| CONFIG_RBAC_KINDS.contains(&c.kind.as_str()))
            .map(|c| ObjectRef {
                kind: c.kind.clone(),
                name: c.name.clone(),
            })
            .collect(),
        _ => rendered_config_rbac(stack),
    };
    out.sort();
    out.dedup();
    out
}

fn rendered_config_rbac(stack: &KabStack) -> Vec<ObjectRef> {
    let names = render::names(stack);
    let ns = &names.namespace;
    let facts = render::Facts {
        ca_bundle_pem: None,
    };
    let Ok(rendered) = render::render(
        &render::Templates::embedded(),
        stack,
        &render::Settings::default(),
        &facts,
    ) else {
        return Vec::new();
    };
    let mut out: Vec<ObjectRef> = rendered
        .children
        .iter()
        .filter(|c| matches!(c.step, Step::Rbac | Step::Config))
        .map(|c| ObjectRef {
            kind: c.kind().to_owned(),
            name: format!("{ns}/{}", c.name()),
        })
        .collect();
    for secret in [&names.webhook_tls_secret, &names.webhook_ca_secret] {
        out.push(ObjectRef {
            kind: "Secret".into(),
            name: format!("{ns}/{secret}"),
        });
    }
    out
}

fn config_rbac(f: &StackFacts, blocked: Option<&Blocked>) -> Node {
    let node = Node::new("ConfigAndRBAC", "", State::Progressing);
    let present = match &f.objects {
        Fetched::Found(p) => p,
        Fetched::Unknown(e) => {
            return Node {
                state: State::Unknown,
                ..node
            }
            .why("ReadFailed", format!("could not read them: {e}"));
        }
        Fetched::Missing => &Vec::new(),
    };
    let desired = desired_config_rbac(&f.stack);
    let missing: Vec<&ObjectRef> = desired.iter().filter(|d| !present.contains(d)).collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for o in present {
        *counts.entry(o.kind.as_str()).or_default() += 1;
    }
    let summary: Vec<String> = CONFIG_RBAC_KINDS
        .iter()
        .filter_map(|k| {
            counts
                .get(k)
                .map(|n| format!("{n} {k}{}", if *n == 1 { "" } else { "s" }))
        })
        .collect();
    let mut node = node.fact("present", present.len()).fact(
        "missing",
        json!(
            missing
                .iter()
                .map(|m| format!("{} {}", m.kind, m.name))
                .collect::<Vec<_>>()
        ),
    );
    if missing.is_empty() && (!present.is_empty() || blocked.is_none()) {
        node.state = State::Ready;
        node.reason = "Present".into();
        node.message = if summary.is_empty() {
            "nothing to create".into()
        } else {
            summary.join(", ")
        };
    } else if let Some(b) = blocked.filter(|_| present.is_empty() || !missing.is_empty()) {
        node.state = State::Failed;
        node.reason = b.reason.clone();
        node.message = b.not_created();
    } else {
        let shown: Vec<String> = missing
            .iter()
            .take(3)
            .map(|m| format!("{} {}", m.kind, m.name))
            .collect();
        let more = if missing.len() > 3 {
            format!(" and {} more", missing.len() - 3)
        } else {
            String::new()
        };
        node.reason = "Missing".into();
        node.message = format!("missing {}{more}", shown.join(", "));
    }
    node
}
