//! Render: the pure step of the pipeline that turns a [`KabStack`] into the children the operator
//! applies. No client, no clock, no randomness: the same stack, settings and facts always give the
//! same objects.
//!
//! Each child comes from one handlebars template (`templates/*.yaml.hbs`, embedded in the binary,
//! overridable by file name). Templates run in strict mode (a missing variable is an error, in
//! `{{#if}}` too) without HTML escaping, and place every value through `{{json …}}`, which writes
//! it as one line of JSON (valid YAML flow syntax): a value arrives as data, whatever quotes, line
//! breaks, `{{`, `---`, anchors or comments it holds, and can never add or change an object. A template that renders to nothing but
//! whitespace and comments is a child that is not desired for this stack. After parsing, code (not
//! templates) sets the labels, namespace and owner reference of every child, and checks it against
//! its k8s-openapi type.

mod context;
mod kinds;
mod names;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use handlebars::{
    Context, Handlebars, Helper, HelperDef, HelperResult, JsonTruthy, Output, PathAndJson,
    RenderContext, RenderErrorReason, Renderable, no_escape,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::DynamicObject;
use kube::core::ApiResource;
use serde_json::Value;

use crate::api::KabStack;

pub use kinds::{SupportedKind, kind_for, kinds};
pub use names::{
    ANNOTATION_CONFIG_HASH, BROKER_CLIENT_PORT, BROKER_CREDENTIALS_DIR, BROKER_CREDENTIALS_KEY,
    CONFIG_PATH, KAB, LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_PART_OF, LABEL_STACK,
    LABEL_STACK_NAMESPACE, Names, WEBHOOK_PORT, WEBHOOK_TLS_DIR, broker_url, names, selector_for,
    stack_config, stack_labels, stack_namespace,
};

/// Version of the NATS server of a managed broker.
pub const NATS_VERSION: &str = "2.15.2";

/// What the operator brings to rendering besides the stack: default images.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Image of kab (webhook and entity controller) unless `spec.images.kab` says otherwise.
    pub kab_image: String,
    /// Image of a managed NATS broker unless `spec.images.nats` says otherwise.
    pub nats_image: String,
    /// The operator's ServiceAccount `(namespace, name)`: it gets a Role to send the dry-run
    /// admission probe (create on the entity); `None` renders no probe Role.
    pub operator_service_account: Option<(String, String)>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            kab_image: format!("ghcr.io/kab-dev/kab:{}", env!("CARGO_PKG_VERSION")),
            nats_image: format!("docker.io/library/nats:{NATS_VERSION}-alpine"),
            operator_service_account: Some(("kab-system".to_owned(), "kab-operator".to_owned())),
        }
    }
}

/// What the operator observed in the cluster that rendering needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// PEM of the CA(s) the webhook registration trusts; `None` renders the registration without
    /// a `caBundle`.
    pub ca_bundle_pem: Option<String>,
}

/// The part of a stack a child belongs to.
///
/// The order of the variants is a dependency order: what a child uses comes before it
/// (ServiceAccounts and RBAC, the entity's CRD and the configuration before the workloads).
/// Children are sorted by it for `kab render` and for the components in a stack's status; it is
/// not the order the operator applies them in. The operator applies a stack's children at
/// once, except that [`Step::Registration`] waits until the webhook serves (and on a certificate
/// rotation, the TLS Secrets, which are not rendered children, follow the registration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    /// ServiceAccounts, Roles, RoleBindings.
    Rbac,
    /// The entity's CustomResourceDefinition.
    EntityApi,
    /// The stack configuration ConfigMap.
    Config,
    /// The managed broker.
    Broker,
    /// The webhook workload.
    Webhook,
    /// The ValidatingWebhookConfiguration (applied only once the webhook serves).
    Registration,
    /// The entity controller workload.
    Controller,
}

impl Step {
    /// Every step, in dependency order.
    pub const ALL: [Step; 7] = [
        Step::Rbac,
        Step::EntityApi,
        Step::Config,
        Step::Broker,
        Step::Webhook,
        Step::Registration,
        Step::Controller,
    ];

    /// Value of the `app.kubernetes.io/component` label of the step's children.
    pub fn component(self) -> &'static str {
        match self {
            Step::Rbac => "rbac",
            Step::EntityApi => "entity-api",
            Step::Config => "config",
            Step::Broker => "broker",
            Step::Webhook | Step::Registration => "webhook",
            Step::Controller => "controller",
        }
    }
}

/// One desired child of a stack.
#[derive(Clone, Debug)]
pub struct Child {
    /// File name of the template it comes from, e.g. `webhook-deployment.yaml.hbs`.
    pub template: &'static str,
    /// The part of the stack it belongs to.
    pub step: Step,
    /// The object, with labels, namespace and owner reference set.
    pub object: DynamicObject,
    /// Its API resource (for a dynamic `Api`).
    pub resource: ApiResource,
    /// Whether it lives in the stack's namespace (else it is cluster-scoped).
    pub namespaced: bool,
}

impl Child {
    /// Kind of the object.
    pub fn kind(&self) -> &str {
        &self.resource.kind
    }

    /// Name of the object.
    pub fn name(&self) -> &str {
        self.object.metadata.name.as_deref().unwrap_or_default()
    }
}

/// Every desired child of a stack, sorted by (step, template).
#[derive(Clone, Debug, Default)]
pub struct Rendered {
    /// The children, by step (dependency order), then template file name.
    pub children: Vec<Child>,
}

impl Rendered {
    /// The child of this kind and name.
    pub fn get(&self, kind: &str, name: &str) -> Option<&Child> {
        self.children
            .iter()
            .find(|c| c.kind() == kind && c.name() == name)
    }

    /// The children of one step.
    pub fn step(&self, step: Step) -> impl Iterator<Item = &Child> {
        self.children.iter().filter(move |c| c.step == step)
    }
}

/// Why a stack could not be rendered. Every variant about a template names it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A template is not valid handlebars.
    #[error("template {template}{}: {message}", at(*line, *column))]
    Syntax {
        template: String,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    /// A template failed to render (a missing variable in strict mode, a helper misused).
    #[error("template {template}{}: {message}", at(*line, *column))]
    Template {
        template: String,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    /// A template rendered text that is not YAML; the line is of the rendered text.
    #[error("template {template} rendered invalid YAML{}: {message}", at(*line, *column).replace(", line", ", rendered line"))]
    Yaml {
        template: String,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    /// A template rendered more than one YAML document (one template is one child).
    #[error(
        "template {template} rendered {count} YAML documents; a template renders one object, or nothing"
    )]
    MultipleDocuments { template: String, count: usize },
    /// A template rendered something that is not a Kubernetes object.
    #[error("template {template}: {message}")]
    NotAnObject { template: String, message: String },
    /// A template rendered a kind kab does not apply.
    #[error("template {template} rendered {api_version} {kind}, which kab does not manage")]
    UnsupportedKind {
        template: String,
        api_version: String,
        kind: String,
    },
    /// A rendered object is not a valid object of its kind.
    #[error("template {template}: not a valid {kind}: {message}")]
    InvalidObject {
        template: String,
        kind: String,
        message: String,
    },
    /// Two templates rendered the same object.
    #[error("templates {first} and {template} both render {kind} {name}")]
    Duplicate {
        template: String,
        first: String,
        kind: String,
        name: String,
    },
    /// The override directory has files that are not templates kab knows.
    #[error("template overrides in {}: unknown file(s) {}; the templates are {}", dir.display(), files.join(", "), known.join(", "))]
    UnknownOverride {
        dir: PathBuf,
        files: Vec<String>,
        known: Vec<String>,
    },
    /// A template file could not be read.
    #[error("template {}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    /// The stack itself cannot be rendered (the validate step normally catches this first).
    #[error("cannot render the stack: {message}")]
    InvalidStack { message: String },
}

fn at(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!(", line {line}, column {column}"),
        (Some(line), None) => format!(", line {line}"),
        _ => String::new(),
    }
}

/// A row of [`TEMPLATES`]: the file name, its step, and the embedded source.
macro_rules! template {
    ($file:literal, $step:ident) => {
        (
            $file,
            Step::$step,
            include_str!(concat!("../../templates/", $file)),
        )
    };
}

/// One template per child: file name, step, embedded source.
const TEMPLATES: &[(&str, Step, &str)] = &[
    template!("webhook-serviceaccount.yaml.hbs", Rbac),
    template!("webhook-role.yaml.hbs", Rbac),
    template!("webhook-rolebinding.yaml.hbs", Rbac),
    template!("controller-serviceaccount.yaml.hbs", Rbac),
    template!("controller-role.yaml.hbs", Rbac),
    template!("controller-rolebinding.yaml.hbs", Rbac),
    template!("reader-role.yaml.hbs", Rbac),
    template!("reader-rolebinding.yaml.hbs", Rbac),
    template!("writer-role.yaml.hbs", Rbac),
    template!("writer-rolebinding.yaml.hbs", Rbac),
    template!("probe-role.yaml.hbs", Rbac),
    template!("probe-rolebinding.yaml.hbs", Rbac),
    template!("entity-crd.yaml.hbs", EntityApi),
    template!("config.yaml.hbs", Config),
    template!("broker-config.yaml.hbs", Broker),
    template!("broker-service.yaml.hbs", Broker),
    template!("broker-headless-service.yaml.hbs", Broker),
    template!("broker-statefulset.yaml.hbs", Broker),
    template!("broker-deployment.yaml.hbs", Broker),
    template!("broker-networkpolicy.yaml.hbs", Broker),
    template!("webhook-deployment.yaml.hbs", Webhook),
    template!("webhook-service.yaml.hbs", Webhook),
    template!("webhook-pdb.yaml.hbs", Webhook),
    template!("webhook-registration.yaml.hbs", Registration),
    template!("controller-deployment.yaml.hbs", Controller),
];

/// The file name and step of every template, by step (dependency order), then file name.
pub fn template_files() -> Vec<(&'static str, Step)> {
    let mut files: Vec<_> = TEMPLATES
        .iter()
        .map(|(file, step, _)| (*file, *step))
        .collect();
    files.sort_by_key(|(file, step)| (*step, *file));
    files
}

/// The compiled templates: the embedded ones, some possibly replaced by overrides.
pub struct Templates {
    registry: Result<Handlebars<'static>, RenderError>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates")
            .field("ok", &self.registry.is_ok())
            .finish_non_exhaustive()
    }
}

impl Templates {
    /// The templates built into kab.
    pub fn embedded() -> Self {
        let sources = TEMPLATES
            .iter()
            .map(|(file, _, source)| (*file, (*source).to_owned()));
        Templates {
            registry: compile(sources),
        }
    }

    /// The embedded templates, with those in `overrides` (a directory of files named like the
    /// templates) replacing them. A file with another name is an error naming it; entries whose
    /// name starts with `.` are skipped (a mounted ConfigMap has `..data` and the like).
    pub fn load(overrides: Option<&Path>) -> Result<Self, RenderError> {
        let Some(dir) = overrides else {
            return Ok(Templates::embedded());
        };
        let io = |path: &Path, e: std::io::Error| RenderError::Io {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let mut replaced: BTreeMap<&'static str, String> = BTreeMap::new();
        let mut unknown = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
            let entry = entry.map_err(|e| io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            match TEMPLATES.iter().find(|(file, _, _)| *file == name) {
                Some((file, _, _)) => {
                    let path = entry.path();
                    let source = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
                    replaced.insert(file, source);
                }
                None => unknown.push(name),
            }
        }
        if !unknown.is_empty() {
            unknown.sort();
            return Err(RenderError::UnknownOverride {
                dir: dir.to_owned(),
                files: unknown,
                known: TEMPLATES
                    .iter()
                    .map(|(file, _, _)| (*file).to_owned())
                    .collect(),
            });
        }
        let sources = TEMPLATES.iter().map(|(file, _, source)| {
            (
                *file,
                replaced
                    .remove(file)
                    .unwrap_or_else(|| (*source).to_owned()),
            )
        });
        let registry = compile(sources)?;
        Ok(Templates {
            registry: Ok(registry),
        })
    }
}

fn compile(
    sources: impl Iterator<Item = (&'static str, String)>,
) -> Result<Handlebars<'static>, RenderError> {
    let mut registry = Handlebars::new();
    registry.set_strict_mode(true);
    registry.register_escape_fn(no_escape);
    registry.register_helper("json", Box::new(json_helper));
    registry.register_helper("if", Box::new(StrictIf { positive: true }));
    registry.register_helper("unless", Box::new(StrictIf { positive: false }));
    for (file, source) in sources {
        registry
            .register_template_string(file, source)
            .map_err(|e| {
                let (line, column) = e.pos().unzip();
                RenderError::Syntax {
                    template: file.to_owned(),
                    line,
                    column,
                    message: e.reason().to_string(),
                }
            })?;
    }
    Ok(registry)
}

/// `{{json value}}`: the value as one line of JSON, which YAML reads back as the same data.
fn json_helper(
    h: &Helper<'_>,
    _: &Handlebars<'_>,
    _: &Context,
    _: &mut RenderContext<'_, '_>,
    out: &mut dyn Output,
) -> HelperResult {
    if h.params().len() != 1 {
        return Err(RenderErrorReason::Other(format!(
            "json takes exactly one value, got {}",
            h.params().len()
        ))
        .into());
    }
    let param = h
        .param(0)
        .ok_or(RenderErrorReason::ParamNotFoundForIndex("json", 0))?;
    if param.is_value_missing() {
        return Err(missing(param));
    }
    out.write(&yaml_safe_json(param.value()))?;
    Ok(())
}

/// `{{#if x}}` and `{{#unless x}}` that, like every other expression, fail on a missing `x`
/// instead of reading it as false (the built-in ones are lenient even in strict mode).
struct StrictIf {
    positive: bool,
}

impl HelperDef for StrictIf {
    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        rc: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        let name = if self.positive { "if" } else { "unless" };
        let param = h
            .param(0)
            .ok_or(RenderErrorReason::ParamNotFoundForIndex(name, 0))?;
        if param.is_value_missing() {
            return Err(missing(param));
        }
        let branch = if param.value().is_truthy(false) == self.positive {
            h.template()
        } else {
            h.inverse()
        };
        match branch {
            Some(template) => template.render(r, ctx, rc, out),
            None => Ok(()),
        }
    }
}

fn missing(param: &PathAndJson<'_>) -> handlebars::RenderError {
    let path = param
        .relative_path()
        .cloned()
        .unwrap_or_else(|| "?".to_owned());
    RenderErrorReason::MissingVariable(Some(path)).into()
}

/// One line of JSON (YAML flow syntax) for `value`, which YAML reads back as the same data.
/// Characters YAML does not allow raw, or reads as line breaks, are escaped (they can only occur
/// inside strings, where `\uXXXX` means the same in both); keys longer than YAML allows for an
/// implicit key are written as explicit keys (`? "key": value`).
fn yaml_safe_json(value: &Value) -> String {
    let mut json = String::new();
    write_flow(value, &mut json);
    let mut safe = String::with_capacity(json.len());
    for c in json.chars() {
        match c {
            '\u{7f}'..='\u{9f}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{feff}'
            | '\u{fffe}'
            | '\u{ffff}' => {
                let _ = write!(safe, "\\u{:04x}", c as u32);
            }
            c => safe.push(c),
        }
    }
    safe
}

/// Longest key written as an implicit key (YAML allows 1024 characters, quotes included).
const IMPLICIT_KEY_MAX: usize = 512;

fn write_flow(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            out.push('{');
            for (i, (key, value)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let key = Value::String(key.clone()).to_string();
                if key.len() > IMPLICIT_KEY_MAX {
                    let _ = write!(out, "? {key}: ");
                } else {
                    let _ = write!(out, "{key}:");
                }
                write_flow(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_flow(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Renders every child of `stack`.
pub fn render(
    templates: &Templates,
    stack: &KabStack,
    settings: &Settings,
    facts: &Facts,
) -> Result<Rendered, RenderError> {
    render_only(templates, stack, settings, facts, |_| true)
}

/// Renders only the templates `wanted` accepts (by file name), as [`render`] would render them:
/// the operator re-renders just the children it has to apply again.
pub fn render_only(
    templates: &Templates,
    stack: &KabStack,
    settings: &Settings,
    facts: &Facts,
    wanted: impl Fn(&str) -> bool,
) -> Result<Rendered, RenderError> {
    let registry = templates.registry.as_ref().map_err(Clone::clone)?;
    let data = context::build(stack, settings, facts)?;
    let mut children: Vec<Child> = Vec::new();
    for (file, step, _) in TEMPLATES.iter().filter(|(file, _, _)| wanted(file)) {
        let text = registry
            .render(file, &data)
            .map_err(|e| template_error(file, e))?;
        let Some(object) = parse_one(file, &text)? else {
            continue;
        };
        let child = finish(file, *step, object, stack)?;
        if let Some(first) = children.iter().find(|c| {
            c.kind() == child.kind()
                && c.name() == child.name()
                && c.resource.api_version == child.resource.api_version
        }) {
            return Err(RenderError::Duplicate {
                template: child.template.to_owned(),
                first: first.template.to_owned(),
                kind: first.kind().to_owned(),
                name: first.name().to_owned(),
            });
        }
        children.push(child);
    }
    children.sort_by_key(|c| (c.step, c.template));
    Ok(Rendered { children })
}

fn template_error(file: &str, e: handlebars::RenderError) -> RenderError {
    let message = match e.reason() {
        RenderErrorReason::MissingVariable(Some(path)) => {
            format!("variable `{path}` is not defined (templates run in strict mode)")
        }
        RenderErrorReason::MissingVariable(None) => {
            "a variable is not defined (templates run in strict mode)".to_owned()
        }
        RenderErrorReason::HelperNotFound(name) => format!("no helper named `{name}`"),
        reason => reason.to_string(),
    };
    RenderError::Template {
        template: file.to_owned(),
        line: e.line_no,
        column: e.column_no,
        message,
    }
}

/// The one object a template rendered, or `None` for nothing (whitespace and comments).
fn parse_one(file: &str, text: &str) -> Result<Option<Value>, RenderError> {
    let mut documents: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| {
        let location = e.location();
        RenderError::Yaml {
            template: file.to_owned(),
            line: location.map(|l| l.line() as usize),
            column: location.map(|l| l.column() as usize),
            message: e.without_snippet().to_string(),
        }
    })?;
    match documents.len() {
        0 => Ok(None),
        1 => Ok(documents.pop()),
        count => Err(RenderError::MultipleDocuments {
            template: file.to_owned(),
            count,
        }),
    }
}

/// Checks the kind, then sets what code (not templates) owns on every child: labels, namespace,
/// owner reference. Finally checks the object against its k8s-openapi type.
fn finish(
    file: &'static str,
    step: Step,
    object: Value,
    stack: &KabStack,
) -> Result<Child, RenderError> {
    let not_an_object = |message: &str| RenderError::NotAnObject {
        template: file.to_owned(),
        message: message.to_owned(),
    };
    let Value::Object(map) = &object else {
        return Err(not_an_object("renders a YAML value that is not a mapping"));
    };
    let field = |key: &str| {
        map.get(key)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if api_version.is_empty() || kind.is_empty() {
        return Err(not_an_object("the object needs apiVersion and kind"));
    }
    let supported = kind_for(&api_version, &kind).ok_or_else(|| RenderError::UnsupportedKind {
        template: file.to_owned(),
        api_version: api_version.clone(),
        kind: kind.clone(),
    })?;
    let invalid = |message: String| RenderError::InvalidObject {
        template: file.to_owned(),
        kind: kind.clone(),
        message,
    };
    let mut dynamic: DynamicObject =
        serde_json::from_value(object).map_err(|e| invalid(e.to_string()))?;
    if dynamic.metadata.name.as_deref().is_none_or(str::is_empty) {
        return Err(invalid("metadata.name is required".to_owned()));
    }

    let meta = &mut dynamic.metadata;
    let labels = meta.labels.get_or_insert_with(Default::default);
    if step == Step::EntityApi {
        // Shared by every stack declaring the entity: no stack labels.
        labels.insert(LABEL_MANAGED_BY.to_owned(), KAB.to_owned());
        labels.insert(LABEL_PART_OF.to_owned(), KAB.to_owned());
    } else {
        labels.extend(stack_labels(stack));
    }
    labels.insert(LABEL_COMPONENT.to_owned(), step.component().to_owned());
    if supported.namespaced {
        meta.namespace = Some(stack_namespace(stack));
        meta.owner_references = stack.metadata.uid.as_ref().map(|uid| {
            vec![OwnerReference {
                api_version: format!("{}/{}", crate::api::GROUP, crate::api::VERSION),
                kind: "KabStack".to_owned(),
                name: stack.metadata.name.clone().unwrap_or_default(),
                uid: uid.clone(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]
        });
    } else {
        meta.namespace = None;
        meta.owner_references = None;
    }

    let value = serde_json::to_value(&dynamic).map_err(|e| invalid(e.to_string()))?;
    supported.check(&value).map_err(invalid)?;
    Ok(Child {
        template: file,
        step,
        object: dynamic,
        resource: supported.resource.clone(),
        namespaced: supported.namespaced,
    })
}

/// Every child as a multi-document YAML stream, as `kab render` prints it.
pub fn to_yaml(rendered: &Rendered) -> String {
    let mut out = String::new();
    for child in &rendered.children {
        out.push_str("---\n");
        let _ = writeln!(out, "# Source: templates/{}", child.template);
        match serde_saphyr::to_string(&child.object) {
            Ok(yaml) => out.push_str(&yaml),
            Err(e) => {
                let _ = writeln!(out, "# cannot write {} {}: {e}", child.kind(), child.name());
            }
        }
        if !out.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}
