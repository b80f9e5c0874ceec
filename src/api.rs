//! The `KabStack` API (`kab.dev/v1alpha1`): one object declares a business entity and everything
//! that serves it. Everything the API server can check is in the generated schema (patterns, enums,
//! CEL rules); what it cannot check lives in [`crate::validate`].

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of kab's own resources.
pub const GROUP: &str = "kab.dev";
/// API version of the KabStack resource.
pub const VERSION: &str = "v1alpha1";

/// Regex for a DNS-1123 label (names of rules, versions, Kubernetes objects).
const DNS_LABEL: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A KabStack declares one business entity and the backend kab builds for it: the entity's
/// CustomResourceDefinition (the REST API and store), an admission webhook enforcing business
/// rules, an entity controller publishing every change to a broker, the broker and the RBAC.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kab.dev",
    version = "v1alpha1",
    kind = "KabStack",
    namespaced,
    status = "KabStackStatus",
    shortname = "kst",
    category = "kab",
    derive = "PartialEq",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether every part of the stack is ready"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Progressing, Ready, Degraded, Failed, Paused or Deleting"
    ),
    printcolumn(
        name = "Entity",
        type_ = "string",
        json_path = ".status.entity",
        description = "The entity API served: <plural>.<group>"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 40").message("metadata.name: a KabStack name must be at most 40 characters (children are named <name>-webhook, <name>-controller, ...)"),
)]
#[serde(rename_all = "camelCase")]
pub struct KabStackSpec {
    /// The business entity: its API group, kind and versioned schemas. kab creates (or shares) a
    /// CustomResourceDefinition for it.
    pub entity: EntitySpec,
    /// Business rules enforced by the stack's admission webhook, in order, before anything is
    /// persisted. Each denial names its rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"])
    )]
    pub rules: Vec<BusinessRule>,
    /// The entity controller that publishes every change of an entity to the broker.
    #[serde(default)]
    pub controller: ControllerSpec,
    /// The admission webhook that enforces the rules.
    #[serde(default)]
    pub webhook: WebhookSpec,
    /// The message broker (NATS JetStream) that receives every entity change.
    #[serde(default)]
    pub broker: BrokerSpec,
    /// Who may read and write the entities, in this namespace.
    #[serde(default)]
    pub rbac: RbacSpec,
    /// Container images; defaults are the images matching this kab release.
    #[serde(default)]
    pub images: ImagesSpec,
    /// When true, kab makes no change to the stack's children and only reports status.
    #[serde(default)]
    pub paused: bool,
}

/// The business entity served by the stack.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntitySpec {
    /// API group of the entity, e.g. `todo.example.com`. A DNS subdomain with at least one dot;
    /// `kab.dev` and Kubernetes' own groups (`*.k8s.io`, `*.kubernetes.io`) are reserved.
    #[schemars(
        length(min = 3, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+$"),
        extend("x-kubernetes-validations" = [
            {"rule": "self != 'kab.dev' && !self.endsWith('.kab.dev')", "message": "entity.group: kab.dev is reserved for kab itself; use a group of your own domain, e.g. todo.example.com"},
            {"rule": "!(self == 'k8s.io' || self.endsWith('.k8s.io') || self == 'kubernetes.io' || self.endsWith('.kubernetes.io') || self == 'x-k8s.io' || self.endsWith('.x-k8s.io'))", "message": "entity.group: groups under k8s.io, kubernetes.io and x-k8s.io are reserved for Kubernetes; use a group of your own domain"},
        ])
    )]
    pub group: String,
    /// Kind of the entity in CamelCase, e.g. `Todo`.
    #[schemars(length(min = 1, max = 63), regex(pattern = "^[A-Z][A-Za-z0-9]*$"))]
    pub kind: String,
    /// Plural resource name (lowercase); defaults to the lowercased kind + `s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub plural: Option<String>,
    /// Singular resource name (lowercase); defaults to the lowercased kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub singular: Option<String>,
    /// Short names for kubectl, e.g. `[td]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub short_names: Vec<String>,
    /// Versions of the entity API. Exactly one is the storage version (a single version is the
    /// storage version by default).
    #[schemars(
        length(min = 1, max = 10),
        extend(
            "x-kubernetes-list-type" = "map",
            "x-kubernetes-list-map-keys" = ["name"],
            "x-kubernetes-validations" = [
                {"rule": "size(self) == 1 || self.filter(v, has(v.storage) && v.storage).size() == 1", "message": "entity.versions: exactly one version must have storage: true"},
                {"rule": "self.filter(v, has(v.storage) && v.storage).size() <= 1", "message": "entity.versions: exactly one version must have storage: true (found several)"},
            ]
        )
    )]
    pub versions: Vec<EntityVersion>,
    /// What happens to the entity API and its data when the last stack declaring it is deleted:
    /// `Retain` (default) keeps the CustomResourceDefinition and every entity; `Delete` removes them.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// One version of the entity API.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntityVersion {
    /// Version name, e.g. `v1`, `v1beta1`.
    #[schemars(
        length(max = 63),
        regex(pattern = "^v[1-9][0-9]*((alpha|beta)[1-9][0-9]*)?$")
    )]
    pub name: String,
    /// Whether the API server serves this version.
    #[serde(default = "yes")]
    pub served: bool,
    /// Whether entities are stored in this version. Exactly one version is the storage version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<bool>,
    /// OpenAPI v3 schema of the entity's `spec`, structural (every level has a `type`). Rule
    /// field paths such as `spec.code` refer to it.
    #[schemars(schema_with = "free_form_object")]
    pub schema: serde_json::Value,
    /// Optional OpenAPI v3 schema of the application's own part of the entity `status`; kab adds
    /// its own `status.kab` next to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_free_form_object")]
    pub status_schema: Option<serde_json::Value>,
    /// Extra columns for `kubectl get`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub printer_columns: Vec<PrinterColumn>,
}

/// A column shown by `kubectl get` for the entity.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrinterColumn {
    /// Column header.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// OpenAPI type of the column: string, integer, number, boolean or date.
    #[serde(rename = "type")]
    #[schemars(regex(pattern = "^(string|integer|number|boolean|date)$"))]
    pub type_: String,
    /// JSONPath of the value, e.g. `.spec.code`.
    #[schemars(length(min = 1, max = 512))]
    pub json_path: String,
    /// Column description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// What happens to the entity API when its last stack goes.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Keep the CustomResourceDefinition and every entity (no data loss).
    #[default]
    Retain,
    /// Delete the CustomResourceDefinition, and with it every entity.
    Delete,
}

/// A business rule: exactly one of `unique`, `immutable`, `maxCount`, `external`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.unique), has(self.immutable), has(self.maxCount), has(self.external)].filter(x, x).size() == 1", "message": "rules[]: each rule must set exactly one of unique, immutable, maxCount, external"},
]))]
pub struct BusinessRule {
    /// Name of the rule; denials name it.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The combination of these fields is unique among the entities of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique: Option<FieldsRule>,
    /// These fields cannot change once the entity is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub immutable: Option<FieldsRule>,
    /// At most this many entities per namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_count: Option<i64>,
    /// Ask the business application: POST the entity to `url`, expect `{allowed, message}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalRule>,
}

/// Fields an entity rule applies to.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FieldsRule {
    /// Dotted field paths into the entity, e.g. `spec.code`. Each must exist in the schema.
    #[schemars(length(min = 1, max = 16))]
    pub fields: Vec<String>,
}

/// A rule delegated to the business application over HTTP.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalRule {
    /// URL the webhook POSTs the entity to (http or https).
    #[schemars(length(min = 1, max = 2048), regex(pattern = "^https?://"))]
    pub url: String,
    /// How long to wait for the answer.
    #[serde(default = "two")]
    #[schemars(range(min = 1, max = 25))]
    pub timeout_seconds: i32,
    /// Admit the entity when the application does not answer in time or answers 5xx
    /// (default false: deny with a clear message).
    #[serde(default)]
    pub fail_open: bool,
}

/// The entity controller.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ControllerSpec {
    /// Replicas of the entity controller (one is active at a time).
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 5))]
    pub replicas: i32,
    /// Prefix of the broker subjects: `<prefix>.<namespace>.<plural>.<created|updated|deleted>`.
    #[serde(default = "default_prefix")]
    #[schemars(length(min = 1, max = 63), regex(pattern = "^[A-Za-z0-9_-]+$"))]
    pub subject_prefix: String,
    /// Optional HTTP callback that receives every change as a CloudEvent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifySpec>,
}

impl Default for ControllerSpec {
    fn default() -> Self {
        Self {
            replicas: 1,
            subject_prefix: default_prefix(),
            notify: None,
        }
    }
}

/// HTTP callback for entity changes.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotifySpec {
    /// URL that receives a POST of each CloudEvent.
    #[schemars(length(min = 1, max = 2048), regex(pattern = "^https?://"))]
    pub url: String,
    /// Timeout of one attempt.
    #[serde(default = "five")]
    #[schemars(range(min = 1, max = 60))]
    pub timeout_seconds: i32,
}

/// The admission webhook.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// Replicas of the webhook server (2 or more keeps admission available during rollouts).
    #[serde(default = "two")]
    #[schemars(range(min = 1, max = 10))]
    pub replicas: i32,
    /// What the API server does when the webhook cannot be reached: `Fail` (default: nothing is
    /// persisted unchecked) or `Ignore`.
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// How long the API server waits for the webhook.
    #[serde(default = "five")]
    #[schemars(range(min = 1, max = 30))]
    pub timeout_seconds: i32,
    /// Lifetime of the webhook's serving certificate.
    #[serde(default)]
    pub certificate: CertificateSpec,
}

impl Default for WebhookSpec {
    fn default() -> Self {
        Self {
            replicas: 2,
            failure_policy: FailurePolicy::Fail,
            timeout_seconds: 5,
            certificate: CertificateSpec::default(),
        }
    }
}

/// Failure policy of the webhook registration.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FailurePolicy {
    /// Refuse writes when the webhook is unreachable.
    #[default]
    Fail,
    /// Admit writes unchecked when the webhook is unreachable.
    Ignore,
}

/// Certificate lifetimes, as Go-style durations (`2160h`, `90m`, `30s`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "duration(self.renewBefore) < duration(self.validity)", "message": "webhook.certificate.renewBefore must be shorter than validity"},
]))]
pub struct CertificateSpec {
    /// How long a serving certificate is valid.
    #[serde(default = "default_validity")]
    #[schemars(
        regex(pattern = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"),
        length(min = 2, max = 16)
    )]
    pub validity: String,
    /// Renew the serving certificate this long before it expires.
    #[serde(default = "default_renew_before")]
    #[schemars(
        regex(pattern = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$"),
        length(min = 2, max = 16)
    )]
    pub renew_before: String,
}

impl Default for CertificateSpec {
    fn default() -> Self {
        Self {
            validity: default_validity(),
            renew_before: default_renew_before(),
        }
    }
}

/// The broker that receives every entity change.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.mode == 'External' ? has(self.url) : !has(self.url)", "message": "broker.url is required when broker.mode is External, and not allowed otherwise"},
    {"rule": "self.mode == 'External' || !has(self.credentialsSecret)", "message": "broker.credentialsSecret is only used when broker.mode is External"},
]))]
pub struct BrokerSpec {
    /// `Managed` (default): kab deploys NATS with JetStream for the stack. `External`: use the
    /// NATS server at `url`. `None`: no broker; changes are not published.
    #[serde(default)]
    pub mode: BrokerMode,
    /// NATS URL of an external broker, e.g. `nats://nats.messaging.svc:4222`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), regex(pattern = "^(nats|tls)://"))]
    pub url: Option<String>,
    /// Name of a Secret in the stack's namespace with NATS credentials (key `creds`) for an
    /// external broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_LABEL))]
    pub credentials_secret: Option<String>,
    /// Managed broker replicas: 1, or 3 for a clustered JetStream.
    #[serde(default = "one")]
    #[schemars(extend("enum" = [1, 3]))]
    pub replicas: i32,
    /// JetStream settings of a managed broker.
    #[serde(default)]
    pub jetstream: JetStreamSpec,
    /// Labels of the pods (in this namespace) allowed to connect to a managed broker, besides the
    /// stack's own pods.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub client_pod_labels: std::collections::BTreeMap<String, String>,
}

impl Default for BrokerSpec {
    fn default() -> Self {
        Self {
            mode: BrokerMode::Managed,
            url: None,
            credentials_secret: None,
            replicas: 1,
            jetstream: JetStreamSpec::default(),
            client_pod_labels: Default::default(),
        }
    }
}

/// Where the broker comes from.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum BrokerMode {
    /// kab deploys and runs NATS for this stack.
    #[default]
    Managed,
    /// An existing NATS server, given by `url`.
    External,
    /// No broker: entity changes are not published.
    None,
}

/// JetStream storage of a managed broker.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JetStreamSpec {
    /// `File` (default: a StatefulSet with a PersistentVolumeClaim) or `Memory` (a Deployment;
    /// messages are lost when the broker restarts).
    #[serde(default)]
    pub storage: JetStreamStorage,
    /// Size of the volume for File storage.
    #[serde(default = "default_volume_size")]
    #[schemars(regex(pattern = r"^[1-9][0-9]*(Mi|Gi|Ti)$"))]
    pub size: String,
}

impl Default for JetStreamSpec {
    fn default() -> Self {
        Self {
            storage: JetStreamStorage::File,
            size: default_volume_size(),
        }
    }
}

/// JetStream storage kind.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum JetStreamStorage {
    /// Persistent, on a volume.
    #[default]
    File,
    /// In memory only.
    Memory,
}

/// Consumers of the entity API in this namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RbacSpec {
    /// Subjects that may get, list and watch the entities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub readers: Vec<SubjectRef>,
    /// Subjects that may also create, update, patch and delete the entities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub writers: Vec<SubjectRef>,
}

/// A subject of a RoleBinding.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubjectRef {
    /// `ServiceAccount` (in the stack's namespace unless `namespace` is set), `User` or `Group`.
    pub kind: SubjectKind,
    /// Name of the subject.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Namespace of a ServiceAccount; defaults to the stack's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL))]
    pub namespace: Option<String>,
}

/// Kind of an RBAC subject.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SubjectKind {
    /// A ServiceAccount.
    ServiceAccount,
    /// A user.
    User,
    /// A group.
    Group,
}

/// Image overrides.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImagesSpec {
    /// Image of kab itself (webhook and entity controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub kab: Option<String>,
    /// Image of the NATS server of a managed broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub nats: Option<String>,
}

/// Observed state of a KabStack.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KabStackStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// One word for the whole stack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The entity API served, `<plural>.<group>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    /// Ready, Reconciled, EntityAPIReady, WebhookReady, ControllerReady, BrokerReady,
    /// CertificateValid, Paused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// One row per child, naming what blocks it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub components: Vec<ComponentStatus>,
    /// The webhook's serving certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateStatus>,
}

/// Phase of a stack.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub enum Phase {
    /// Children are being created or are not ready yet.
    Progressing,
    /// Every child is ready.
    Ready,
    /// A child that was ready is failing.
    Degraded,
    /// The stack cannot be reconciled (invalid spec, conflict); waits for an edit.
    Failed,
    /// `spec.paused` is true.
    Paused,
    /// The stack is being deleted.
    Deleting,
}

impl Phase {
    /// Every phase, for metrics.
    pub const ALL: [Phase; 6] = [
        Phase::Progressing,
        Phase::Ready,
        Phase::Degraded,
        Phase::Failed,
        Phase::Paused,
        Phase::Deleting,
    ];

    /// The phase as written in status.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Progressing => "Progressing",
            Phase::Ready => "Ready",
            Phase::Degraded => "Degraded",
            Phase::Failed => "Failed",
            Phase::Paused => "Paused",
            Phase::Deleting => "Deleting",
        }
    }
}

/// Status of one child of the stack.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComponentStatus {
    /// Kind of the child.
    pub kind: String,
    /// `namespace/name` or `name` of the child.
    pub name: String,
    /// Whether the child is ready.
    pub ready: bool,
    /// What the child is doing or what blocks it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The webhook's serving certificate.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// When the current serving certificate expires (RFC 3339).
    pub not_after: String,
    /// When kab renews it (RFC 3339).
    pub renew_at: String,
}

fn yes() -> bool {
    true
}
fn one() -> i32 {
    1
}
fn two() -> i32 {
    2
}
fn five() -> i32 {
    5
}
fn default_prefix() -> String {
    "kab".into()
}
fn default_validity() -> String {
    "2160h".into()
}
fn default_renew_before() -> String {
    "720h".into()
}
fn default_volume_size() -> String {
    "1Gi".into()
}

fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

fn optional_free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

impl KabStack {
    /// The entity's plural resource name (explicit or derived from the kind).
    pub fn plural(&self) -> String {
        self.spec.entity.plural()
    }
}

impl EntitySpec {
    /// Plural resource name: explicit, or the lowercased kind + `s` (`es` after s, x, z, ch, sh;
    /// `ies` after a consonant + y).
    pub fn plural(&self) -> String {
        if let Some(p) = &self.plural {
            return p.clone();
        }
        let k = self.kind.to_lowercase();
        if k.ends_with('s')
            || k.ends_with('x')
            || k.ends_with('z')
            || k.ends_with("ch")
            || k.ends_with("sh")
        {
            format!("{k}es")
        } else if k.ends_with('y')
            && !k.ends_with("ay")
            && !k.ends_with("ey")
            && !k.ends_with("oy")
            && !k.ends_with("uy")
        {
            format!("{}ies", &k[..k.len() - 1])
        } else {
            format!("{k}s")
        }
    }

    /// Singular resource name: explicit, or the lowercased kind.
    pub fn singular(&self) -> String {
        self.singular
            .clone()
            .unwrap_or_else(|| self.kind.to_lowercase())
    }

    /// Name of the entity's CustomResourceDefinition, `<plural>.<group>`.
    pub fn crd_name(&self) -> String {
        format!("{}.{}", self.plural(), self.group)
    }

    /// The storage version: the one marked `storage: true`, or the only version.
    pub fn storage_version(&self) -> Option<&EntityVersion> {
        let marked: Vec<_> = self
            .versions
            .iter()
            .filter(|v| v.storage == Some(true))
            .collect();
        match (marked.as_slice(), self.versions.as_slice()) {
            ([one], _) => Some(one),
            ([], [only]) => Some(only),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entity(kind: &str) -> EntitySpec {
        EntitySpec {
            group: "x.example.com".into(),
            kind: kind.into(),
            plural: None,
            singular: None,
            short_names: vec![],
            versions: vec![],
            deletion_policy: DeletionPolicy::Retain,
        }
    }

    #[test]
    fn plural_follows_english_endings() {
        assert_eq!(entity("Todo").plural(), "todos");
        assert_eq!(entity("Box").plural(), "boxes");
        assert_eq!(entity("Policy").plural(), "policies");
        assert_eq!(entity("Key").plural(), "keys");
        assert_eq!(entity("Match").plural(), "matches");
        assert_eq!(entity("Todo").crd_name(), "todos.x.example.com");
    }

    #[test]
    fn spec_defaults_match_the_design() {
        let spec: KabStackSpec = serde_json::from_value(serde_json::json!({
            "entity": {"group": "todo.example.com", "kind": "Todo",
                       "versions": [{"name": "v1", "schema": {"type": "object"}}]}
        }))
        .unwrap();
        assert_eq!(spec.webhook.replicas, 2);
        assert_eq!(spec.webhook.failure_policy, FailurePolicy::Fail);
        assert_eq!(spec.broker.mode, BrokerMode::Managed);
        assert_eq!(spec.entity.deletion_policy, DeletionPolicy::Retain);
        assert_eq!(spec.controller.subject_prefix, "kab");
        assert!(spec.entity.versions[0].served);
        assert_eq!(
            spec.entity.storage_version().map(|v| v.name.as_str()),
            Some("v1")
        );
    }
}
