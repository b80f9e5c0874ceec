//! Semantic validation of a [`KabStack`] beyond its CRD schema.
//!
//! The API server checks the generated schema and its CEL rules, but `kab render` works offline
//! and some checks (a structural entity schema, rule paths that exist in it) cannot be expressed
//! in the schema at all. [`validate`] checks everything, collects every error (it does not stop
//! at the first) in a deterministic order, and names each offending field with its path, e.g.
//! `spec.entity.versions[1].schema.properties.code`.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use crate::api::{BrokerMode, BusinessRule, EntitySpec, EntityVersion, KabStack};
use crate::certs;

/// Longest KabStack name: children are named `<name>-webhook`, `<name>-controller`, ...
pub const MAX_NAME_LEN: usize = 40;

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `spec.rules[0].unique.fields[0]`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in a stack, in a deterministic order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl ValidationErrors {
    /// Paths of the offending fields, in order.
    pub fn fields(&self) -> Vec<&str> {
        self.0.iter().map(|e| e.field.as_str()).collect()
    }
}

/// Check everything about `stack` that its CRD schema does not (or, offline, cannot) check.
pub fn validate(stack: &KabStack) -> Result<(), ValidationErrors> {
    let mut v = Errors::default();
    check_metadata(stack, &mut v);
    check_entity(&stack.spec.entity, &mut v);
    check_rules(stack, &mut v);
    check_controller(stack, &mut v);
    check_webhook(stack, &mut v);
    check_broker(stack, &mut v);
    if v.0.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(v.0))
    }
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
}

// ---------------------------------------------------------------------------------------------
// metadata

fn check_metadata(stack: &KabStack, v: &mut Errors) {
    match stack.metadata.name.as_deref() {
        None | Some("") => v.add("metadata.name", "a KabStack needs a name"),
        Some(name) => {
            if name.len() > MAX_NAME_LEN {
                v.add(
                    "metadata.name",
                    format!(
                        "{name:?} is {} characters long — at most {MAX_NAME_LEN} are allowed because children are named <name>-webhook, <name>-controller, ...",
                        name.len()
                    ),
                );
            }
            if !is_dns1035_label(name) {
                v.add(
                    "metadata.name",
                    format!("{name:?} must be lowercase letters, digits and '-', start with a letter and end with a letter or digit (it names Services)"),
                );
            }
        }
    }
    if stack
        .metadata
        .namespace
        .as_deref()
        .is_none_or(str::is_empty)
    {
        v.add("metadata.namespace", "the stack's namespace is missing — set metadata.namespace (every child is created in it)");
    }
}

// ---------------------------------------------------------------------------------------------
// entity

const RESERVED_GROUPS: &[&str] = &["kab.dev", "k8s.io", "kubernetes.io", "x-k8s.io"];

fn check_entity(entity: &EntitySpec, v: &mut Errors) {
    let group = entity.group.as_str();
    if let Some(reserved) = RESERVED_GROUPS
        .iter()
        .find(|r| group == **r || group.ends_with(&format!(".{r}")))
    {
        let owner = if *reserved == "kab.dev" {
            "kab itself"
        } else {
            "Kubernetes"
        };
        v.add(
            "spec.entity.group",
            format!("{group:?} is reserved for {owner} (groups under {reserved}) — use a group of your own domain, e.g. todo.example.com"),
        );
    } else if !is_dns_subdomain(group) || !group.contains('.') {
        v.add(
            "spec.entity.group",
            format!("{group:?} must be a DNS subdomain with at least one dot (lowercase letters, digits, '-' and '.'), e.g. todo.example.com"),
        );
    }

    let kind = entity.kind.as_str();
    let camel = kind.len() <= 63
        && kind.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && kind.chars().all(|c| c.is_ascii_alphanumeric());
    if !camel {
        v.add(
            "spec.entity.kind",
            format!("{kind:?} must be CamelCase: an upper-case letter followed by letters and digits, at most 63 characters, e.g. Todo"),
        );
    }

    // Resource names: explicit, or derived from the kind (reported only when the kind is fine).
    let plural = entity.plural();
    let singular = entity.singular();
    if (entity.plural.is_some() || camel) && !is_dns1035_label(&plural) {
        let hint = if entity.plural.is_none() {
            " (derived from the kind — set spec.entity.plural)"
        } else {
            ""
        };
        v.add(
            "spec.entity.plural",
            format!("{plural:?} must be a lowercase DNS label: letters, digits and '-', starting with a letter, at most 63 characters{hint}"),
        );
    }
    if (entity.singular.is_some() || camel) && !is_dns1035_label(&singular) {
        let hint = if entity.singular.is_none() {
            " (derived from the kind — set spec.entity.singular)"
        } else {
            ""
        };
        v.add(
            "spec.entity.singular",
            format!("{singular:?} must be a lowercase DNS label: letters, digits and '-', starting with a letter, at most 63 characters{hint}"),
        );
    }
    if plural == singular {
        v.add(
            "spec.entity.plural",
            format!("plural and singular are both {plural:?} — they must differ (set spec.entity.plural or spec.entity.singular)"),
        );
    }
    let mut seen: BTreeMap<&str, String> = BTreeMap::new();
    seen.insert(plural.as_str(), "the plural".into());
    seen.entry(singular.as_str())
        .or_insert_with(|| "the singular".into());
    for (i, short) in entity.short_names.iter().enumerate() {
        let field = format!("spec.entity.shortNames[{i}]");
        if !is_dns1035_label(short) {
            v.add(&field, format!("{short:?} must be a lowercase DNS label: letters, digits and '-', starting with a letter"));
        } else if let Some(other) = seen.get(short.as_str()) {
            v.add(
                &field,
                format!(
                    "{short:?} is already used as {other} — every resource name must be distinct"
                ),
            );
        } else {
            seen.insert(short, format!("shortNames[{i}]"));
        }
    }

    check_versions(entity, v);
}

fn check_versions(entity: &EntitySpec, v: &mut Errors) {
    let versions = &entity.versions;
    if versions.is_empty() {
        v.add("spec.entity.versions", "at least one version is required");
        return;
    }
    let storage: Vec<&str> = versions
        .iter()
        .filter(|x| x.storage == Some(true))
        .map(|x| x.name.as_str())
        .collect();
    if versions.len() > 1 && storage.len() != 1 {
        let found = if storage.is_empty() {
            "none has".to_string()
        } else {
            format!("{} have", storage.join(", "))
        };
        v.add(
            "spec.entity.versions",
            format!("exactly one version must have storage: true ({found})"),
        );
    }
    if !versions.iter().any(|x| x.served) {
        v.add(
            "spec.entity.versions",
            "at least one version must have served: true",
        );
    }
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, ver) in versions.iter().enumerate() {
        let base = format!("spec.entity.versions[{i}]");
        if !is_version_name(&ver.name) {
            v.add(
                format!("{base}.name"),
                format!(
                    "{:?} is not a Kubernetes version name — use v1, v2beta1, v1alpha2, ...",
                    ver.name
                ),
            );
        }
        if let Some(first) = names.get(ver.name.as_str()) {
            v.add(
                format!("{base}.name"),
                format!(
                    "version {:?} is declared twice (also versions[{first}])",
                    ver.name
                ),
            );
        } else {
            names.insert(&ver.name, i);
        }
        check_version(ver, &base, v);
    }
}

fn check_version(ver: &EntityVersion, base: &str, v: &mut Errors) {
    let schema_path = format!("{base}.schema");
    check_top_schema(&ver.schema, &schema_path, "spec", v);
    if let Some(status) = &ver.status_schema {
        let status_path = format!("{base}.statusSchema");
        check_top_schema(status, &status_path, "status", v);
        if status
            .get("properties")
            .and_then(Value::as_object)
            .is_some_and(|p| p.contains_key("kab"))
        {
            v.add(
                format!("{status_path}.properties.kab"),
                "status.kab is reserved for kab's own status — rename this property",
            );
        }
    }
    for (j, col) in ver.printer_columns.iter().enumerate() {
        let path = format!("{base}.printerColumns[{j}]");
        if !col.json_path.starts_with('.') {
            v.add(
                format!("{path}.jsonPath"),
                format!("{:?} must start with '.', e.g. .spec.code", col.json_path),
            );
        }
        if !matches!(
            col.type_.as_str(),
            "string" | "integer" | "number" | "boolean" | "date"
        ) {
            v.add(
                format!("{path}.type"),
                format!(
                    "{:?} is not a column type — use string, integer, number, boolean or date",
                    col.type_
                ),
            );
        }
    }
}

/// A spec or status schema: structural, and an object at the top.
fn check_top_schema(schema: &Value, path: &str, what: &str, v: &mut Errors) {
    match schema.get("type") {
        Some(Value::String(t)) if t == "object" => {}
        _ if !schema.is_object() => {}
        _ => v.add(
            format!("{path}.type"),
            format!("the entity {what} schema must have type: object at the top"),
        ),
    }
    check_structural(schema, path, v);
}

// ---------------------------------------------------------------------------------------------
// structural schemas

const TYPES: &[&str] = &["object", "array", "string", "integer", "number", "boolean"];
const FORBIDDEN_IN_VALUE_VALIDATION: &[&str] = &[
    "type",
    "additionalProperties",
    "default",
    "nullable",
    "description",
    "title",
];

fn is_true(node: &Map<String, Value>, key: &str) -> bool {
    node.get(key) == Some(&Value::Bool(true))
}

/// Path of a child property: `.name`, or `["odd.name"]` when it is not a plain identifier.
fn child(path: &str, key: &str) -> String {
    let plain = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if plain {
        format!("{path}.{key}")
    } else {
        format!("{path}[{}]", Value::String(key.into()))
    }
}

/// Check one node of the structural part of a schema (and everything below it).
fn check_structural(node: &Value, path: &str, v: &mut Errors) {
    let Some(n) = node.as_object() else {
        v.add(path, "must be a schema object, e.g. {type: string}");
        return;
    };
    check_common(n, path, v);
    let int_or_string = is_true(n, "x-kubernetes-int-or-string");
    let preserve = is_true(n, "x-kubernetes-preserve-unknown-fields");
    let ty = match n.get("type") {
        None | Some(Value::Null) => {
            if !int_or_string && !preserve {
                v.add(
                    path,
                    "has no type — every node of a structural schema needs one of object, array, string, integer, number, boolean",
                );
            }
            None
        }
        Some(Value::String(t)) if t.is_empty() && (int_or_string || preserve) => None,
        Some(Value::String(t)) if TYPES.contains(&t.as_str()) => {
            if int_or_string {
                v.add(
                    format!("{path}.type"),
                    "must be omitted when x-kubernetes-int-or-string is true",
                );
            }
            Some(t.as_str())
        }
        Some(other) => {
            v.add(
                format!("{path}.type"),
                format!("{other} is not a type — use one of object, array, string, integer, number, boolean"),
            );
            None
        }
    };

    let properties = n.get("properties");
    let additional = n.get("additionalProperties");
    if ty.is_some_and(|t| t != "object") {
        for key in ["properties", "additionalProperties"] {
            if n.contains_key(key) {
                v.add(
                    child(path, key),
                    format!(
                        "only allowed with type: object (this node is type: {})",
                        ty.unwrap_or("")
                    ),
                );
            }
        }
    } else if properties.is_some() && additional.is_some() {
        v.add(
            child(path, "additionalProperties"),
            "properties and additionalProperties are mutually exclusive in a structural schema — use one of them",
        );
    }
    if let Some(props) = properties {
        match props.as_object() {
            Some(props) => {
                for (name, sub) in props {
                    check_structural(sub, &child(&format!("{path}.properties"), name), v);
                }
            }
            None => v.add(
                format!("{path}.properties"),
                "must be a map from property name to schema",
            ),
        }
    }
    match additional {
        None | Some(Value::Bool(_)) => {}
        Some(sub @ Value::Object(_)) => {
            check_structural(sub, &format!("{path}.additionalProperties"), v)
        }
        Some(_) => v.add(
            format!("{path}.additionalProperties"),
            "must be a schema or a boolean",
        ),
    }

    match (ty, n.get("items")) {
        (Some("array"), None) => v.add(
            format!("{path}.items"),
            "type: array requires items (the schema of the elements)",
        ),
        (_, Some(Value::Array(_))) => v.add(
            format!("{path}.items"),
            "must be a single schema, not a list of schemas (tuples are not structural)",
        ),
        (Some("array") | None, Some(items)) => check_structural(items, &format!("{path}.items"), v),
        (Some(t), Some(_)) => v.add(
            format!("{path}.items"),
            format!("only allowed with type: array (this node is type: {t})"),
        ),
        (_, None) => {}
    }

    check_value_validations(n, path, v);
}

/// `$ref`, `definitions` and `x-kubernetes-preserve-unknown-fields: false` are never allowed.
fn check_common(n: &Map<String, Value>, path: &str, v: &mut Errors) {
    if n.contains_key("$ref") {
        v.add(
            child(path, "$ref"),
            "$ref is not allowed in a Kubernetes schema — inline the referenced schema",
        );
    }
    if n.contains_key("definitions") {
        v.add(
            child(path, "definitions"),
            "definitions are not allowed in a Kubernetes schema — inline them where they are used",
        );
    }
    if let Some(p) = n.get("x-kubernetes-preserve-unknown-fields")
        && p != &Value::Bool(true)
    {
        v.add(
            child(path, "x-kubernetes-preserve-unknown-fields"),
            "must be true or left out",
        );
    }
}

/// `allOf`, `anyOf`, `oneOf`, `not` below a structural node.
fn check_value_validations(n: &Map<String, Value>, path: &str, v: &mut Errors) {
    for key in ["allOf", "anyOf", "oneOf"] {
        match n.get(key) {
            None => {}
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    check_value_validation(item, &format!("{path}.{key}[{i}]"), v);
                }
            }
            Some(_) => v.add(format!("{path}.{key}"), "must be a list of schemas"),
        }
    }
    if let Some(not) = n.get("not") {
        check_value_validation(not, &format!("{path}.not"), v);
    }
}

/// A node inside `allOf/anyOf/oneOf/not`: constraints only, no structure or documentation.
fn check_value_validation(node: &Value, path: &str, v: &mut Errors) {
    let Some(n) = node.as_object() else {
        v.add(path, "must be a schema object");
        return;
    };
    check_common(n, path, v);
    for key in FORBIDDEN_IN_VALUE_VALIDATION {
        if n.contains_key(*key) {
            v.add(
                child(path, key),
                format!("{key} is not allowed inside allOf, anyOf, oneOf or not — declare it on the node itself"),
            );
        }
    }
    if let Some(Value::Object(props)) = n.get("properties") {
        for (name, sub) in props {
            check_value_validation(sub, &child(&format!("{path}.properties"), name), v);
        }
    }
    match n.get("items") {
        Some(items @ Value::Object(_)) => {
            check_value_validation(items, &format!("{path}.items"), v)
        }
        Some(Value::Array(_)) => v.add(
            format!("{path}.items"),
            "must be a single schema, not a list of schemas",
        ),
        _ => {}
    }
    check_value_validations(n, path, v);
}

// ---------------------------------------------------------------------------------------------
// rules

/// What a rule field path leads to in one version's schema.
enum Resolved<'a> {
    /// A declared schema node.
    Node(&'a Map<String, Value>),
    /// Somewhere inside a free-form object or map: anything goes.
    Free,
    /// The path does not exist; the message says where it stops.
    Missing(String),
}

fn resolve<'a>(schema: &'a Value, segments: &[&str]) -> Resolved<'a> {
    let Some(mut node) = schema.as_object() else {
        return Resolved::Free;
    };
    let mut walked = String::from("spec");
    for seg in segments {
        if let Some(next) = node.get("properties").and_then(|p| p.get(*seg)) {
            match next.as_object() {
                Some(next) => node = next,
                None => return Resolved::Free,
            }
        } else if let Some(add) = node.get("additionalProperties") {
            match add {
                Value::Object(next) => node = next,
                Value::Bool(true) => return Resolved::Free,
                _ => return Resolved::Missing(format!("{walked} has no property {seg:?}")),
            }
        } else if is_true(node, "x-kubernetes-preserve-unknown-fields") {
            return Resolved::Free;
        } else if node.get("type").and_then(Value::as_str) == Some("array") {
            return Resolved::Missing(format!(
                "{walked} is an array — rule fields cannot address inside arrays"
            ));
        } else {
            return Resolved::Missing(format!("{walked} has no property {seg:?}"));
        }
        walked.push('.');
        walked.push_str(seg);
    }
    Resolved::Node(node)
}

fn is_scalar(node: &Map<String, Value>) -> bool {
    is_true(node, "x-kubernetes-int-or-string")
        || matches!(
            node.get("type").and_then(Value::as_str),
            Some("string" | "integer" | "number" | "boolean")
        )
}

fn check_rules(stack: &KabStack, v: &mut Errors) {
    let served: Vec<&EntityVersion> = stack
        .spec
        .entity
        .versions
        .iter()
        .filter(|x| x.served)
        .collect();
    let webhook_timeout = stack.spec.webhook.timeout_seconds;
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, rule) in stack.spec.rules.iter().enumerate() {
        let base = format!("spec.rules[{i}]");
        if !is_dns1123_label(&rule.name) {
            v.add(
                format!("{base}.name"),
                format!("{:?} must be a lowercase DNS label: letters, digits and '-', at most 63 characters", rule.name),
            );
        }
        if let Some(first) = names.get(rule.name.as_str()) {
            v.add(format!("{base}.name"), format!("rule name {:?} is used twice (also rules[{first}]) — rule names must be unique", rule.name));
        } else {
            names.insert(&rule.name, i);
        }
        let kinds = kinds_of(rule);
        if kinds.len() != 1 {
            let found = if kinds.is_empty() {
                "none".to_string()
            } else {
                kinds.join(", ")
            };
            v.add(&base, format!("each rule must set exactly one of unique, immutable, maxCount, external (found {found})"));
        }
        if let Some(u) = &rule.unique {
            check_fields(
                &u.fields,
                &format!("{base}.unique.fields"),
                true,
                &served,
                v,
            );
        }
        if let Some(im) = &rule.immutable {
            check_fields(
                &im.fields,
                &format!("{base}.immutable.fields"),
                false,
                &served,
                v,
            );
        }
        if let Some(max) = rule.max_count
            && max < 0
        {
            v.add(
                format!("{base}.maxCount"),
                format!("{max} is negative — use 0 or more"),
            );
        }
        if let Some(ext) = &rule.external {
            if let Err(why) = check_url(&ext.url, &["http", "https"]) {
                v.add(
                    format!("{base}.external.url"),
                    format!("{:?} {why}", ext.url),
                );
            }
            if !(1..=25).contains(&ext.timeout_seconds) {
                v.add(
                    format!("{base}.external.timeoutSeconds"),
                    format!("{} must be between 1 and 25", ext.timeout_seconds),
                );
            } else if ext.timeout_seconds >= webhook_timeout {
                v.add(
                    format!("{base}.external.timeoutSeconds"),
                    format!(
                        "{}s is not shorter than spec.webhook.timeoutSeconds ({webhook_timeout}s): the API server would give up on the webhook first — lower it or raise the webhook timeout",
                        ext.timeout_seconds
                    ),
                );
            }
        }
    }
}

fn kinds_of(rule: &BusinessRule) -> Vec<&'static str> {
    let mut kinds = vec![];
    if rule.unique.is_some() {
        kinds.push("unique");
    }
    if rule.immutable.is_some() {
        kinds.push("immutable");
    }
    if rule.max_count.is_some() {
        kinds.push("maxCount");
    }
    if rule.external.is_some() {
        kinds.push("external");
    }
    kinds
}

fn check_fields(
    fields: &[String],
    base: &str,
    scalar: bool,
    served: &[&EntityVersion],
    v: &mut Errors,
) {
    if fields.is_empty() {
        v.add(base, "list at least one field, e.g. spec.code");
    }
    if fields.len() > 16 {
        v.add(
            base,
            format!("{} fields listed — at most 16 are allowed", fields.len()),
        );
    }
    for (j, field) in fields.iter().enumerate() {
        let path = format!("{base}[{j}]");
        if fields[..j].contains(field) {
            v.add(&path, format!("{field:?} is listed twice"));
            continue;
        }
        let Some(rest) = field.strip_prefix("spec.") else {
            v.add(&path, format!("{field:?} must start with spec. (rules apply to the entity's spec), e.g. spec.code"));
            continue;
        };
        let segments: Vec<&str> = rest.split('.').collect();
        if segments.iter().any(|s| s.is_empty()) {
            v.add(&path, format!("{field:?} has an empty segment — use dotted property names, e.g. spec.address.city"));
            continue;
        }
        let mut missing = vec![];
        let mut not_scalar = vec![];
        for ver in served {
            match resolve(&ver.schema, &segments) {
                Resolved::Missing(why) => missing.push(format!("{} ({why})", ver.name)),
                Resolved::Node(node) if scalar && !is_scalar(node) => {
                    let ty = node
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or("untyped");
                    not_scalar.push(format!("{} (type {ty})", ver.name));
                }
                _ => {}
            }
        }
        if !missing.is_empty() {
            v.add(
                &path,
                format!(
                    "{field} does not exist in the schema of served version {}",
                    missing.join(", ")
                ),
            );
        }
        if !not_scalar.is_empty() {
            v.add(
                &path,
                format!("{field} must be a string, integer, number or boolean to be unique, but is not in version {}", not_scalar.join(", ")),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// controller, webhook, broker

fn check_controller(stack: &KabStack, v: &mut Errors) {
    if let Some(notify) = &stack.spec.controller.notify
        && let Err(why) = check_url(&notify.url, &["http", "https"])
    {
        v.add(
            "spec.controller.notify.url",
            format!("{:?} {why}", notify.url),
        );
    }
}

fn check_webhook(stack: &KabStack, v: &mut Errors) {
    let cert = &stack.spec.webhook.certificate;
    let validity = check_go_duration(&cert.validity, "spec.webhook.certificate.validity", v);
    let renew = check_go_duration(
        &cert.renew_before,
        "spec.webhook.certificate.renewBefore",
        v,
    );
    if let Some(validity) = validity {
        if validity < certs::MIN_VALIDITY {
            v.add(
                "spec.webhook.certificate.validity",
                format!("{:?} is shorter than the minimum of 2m", cert.validity),
            );
        } else if validity > certs::MAX_VALIDITY {
            v.add(
                "spec.webhook.certificate.validity",
                format!("{:?} is longer than the maximum of 87600h (10 years — the CA lives 10 times as long)", cert.validity),
            );
        } else if let Some(renew) = renew
            && renew >= validity
        {
            v.add(
                "spec.webhook.certificate.renewBefore",
                format!(
                    "{:?} must be shorter than validity {:?}, e.g. a third of it",
                    cert.renew_before, cert.validity
                ),
            );
        }
    }
}

/// Parse a duration in the CRD's form (`2160h`, `90m`, `1h30m`, `45s`).
fn check_go_duration(s: &str, field: &str, v: &mut Errors) -> Option<std::time::Duration> {
    // The CRD allows `([0-9]+h)?([0-9]+m)?([0-9]+s)?` only.
    let mut order = 0;
    let mut digits = 0;
    let mut form_ok = !s.is_empty();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits += 1;
            continue;
        }
        let rank = match c {
            'h' => 1,
            'm' => 2,
            's' => 3,
            _ => 99,
        };
        if digits == 0 || rank <= order || rank == 99 {
            form_ok = false;
            break;
        }
        order = rank;
        digits = 0;
    }
    if digits > 0 {
        form_ok = false;
    }
    if !form_ok {
        v.add(field, format!("{s:?} is not a duration — use hours, minutes and seconds such as 2160h, 90m, 1h30m or 45s"));
        return None;
    }
    match certs::parse_duration(s) {
        Ok(d) => Some(d),
        Err(e) => {
            v.add(field, e.to_string());
            None
        }
    }
}

fn check_broker(stack: &KabStack, v: &mut Errors) {
    let broker = &stack.spec.broker;
    match (broker.mode, &broker.url) {
        (BrokerMode::External, None) => {
            v.add("spec.broker.url", "broker.mode is External: set url to the NATS server, e.g. nats://nats.messaging.svc:4222")
        }
        (BrokerMode::External, Some(url)) => {
            if let Err(why) = check_url(url, &["nats", "tls"]) {
                v.add("spec.broker.url", format!("{url:?} {why}"));
            }
        }
        (mode, Some(_)) => v.add(
            "spec.broker.url",
            format!("url is only used when broker.mode is External (mode is {mode:?}) — remove it or set mode: External"),
        ),
        (_, None) => {}
    }
    if broker.mode != BrokerMode::External && broker.credentials_secret.is_some() {
        v.add(
            "spec.broker.credentialsSecret",
            "credentialsSecret is only used when broker.mode is External — remove it",
        );
    }
    if broker.mode == BrokerMode::Managed && !matches!(broker.replicas, 1 | 3) {
        v.add(
            "spec.broker.replicas",
            format!(
                "{} replicas: a managed broker runs 1 or 3 (a clustered JetStream)",
                broker.replicas
            ),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// names and URLs

/// RFC 1123 label: lowercase alphanumerics and '-', alphanumeric at both ends, ≤ 63.
fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1035 label: an RFC 1123 label that starts with a letter.
fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// RFC 1123 subdomain: dot-separated labels, ≤ 253.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn is_version_name(s: &str) -> bool {
    let Some(rest) = s.strip_prefix('v') else {
        return false;
    };
    let major = rest.bytes().take_while(u8::is_ascii_digit).count();
    if major == 0 || rest.starts_with('0') {
        return false;
    }
    let suffix = &rest[major..];
    if suffix.is_empty() {
        return true;
    }
    let Some(n) = suffix
        .strip_prefix("alpha")
        .or_else(|| suffix.strip_prefix("beta"))
    else {
        return false;
    };
    !n.is_empty() && !n.starts_with('0') && n.bytes().all(|b| b.is_ascii_digit())
}

/// A URL with one of `schemes` and a host (optionally a port, path, query).
fn check_url(url: &str, schemes: &[&str]) -> Result<(), String> {
    let list = schemes
        .iter()
        .map(|s| format!("{s}://"))
        .collect::<Vec<_>>()
        .join(" or ");
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces".into());
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("is not a URL — it must start with {list}"));
    };
    if !schemes.iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
        return Err(format!("has scheme {scheme:?} — it must start with {list}"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = if let Some(v6) = host_port.strip_prefix('[') {
        let Some((ip, after)) = v6.split_once(']') else {
            return Err("has an unclosed [ in its host".into());
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("has an invalid IPv6 host [{ip}]"));
        }
        match after {
            "" => ("v6", None),
            p => match p.strip_prefix(':') {
                Some(port) => ("v6", Some(port)),
                None => return Err("has garbage after its IPv6 host".into()),
            },
        }
    } else {
        match host_port.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err("has no host".into());
    }
    if !host.split('.').all(|l| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }) {
        return Err(format!("has an invalid host {host:?}"));
    }
    if let Some(port) = port
        && !port.parse::<u16>().is_ok_and(|p| p != 0)
    {
        return Err(format!("has an invalid port {port:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The design's example stack, valid.
    fn base() -> Value {
        json!({
            "apiVersion": "kab.dev/v1alpha1",
            "kind": "KabStack",
            "metadata": {"name": "todo", "namespace": "shop"},
            "spec": {
                "entity": {
                    "group": "todo.example.com",
                    "kind": "Todo",
                    "shortNames": ["td"],
                    "versions": [
                        {"name": "v1", "served": true, "storage": true,
                         "schema": {"type": "object", "required": ["code"], "properties": {
                             "code": {"type": "string"},
                             "message": {"type": "string"},
                             "priority": {"x-kubernetes-int-or-string": true},
                             "owner": {"type": "object", "properties": {"email": {"type": "string"}}},
                             "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                             "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                             "tags": {"type": "array", "items": {"type": "string"}},
                             "state": {"type": "string", "anyOf": [{"enum": ["open"]}, {"enum": ["done"]}]}
                         }},
                         "statusSchema": {"type": "object", "properties": {"done": {"type": "boolean"}}},
                         "printerColumns": [{"name": "Code", "type": "string", "jsonPath": ".spec.code"}]}
                    ]
                },
                "rules": [
                    {"name": "unique-code", "unique": {"fields": ["spec.code"]}},
                    {"name": "code-immutable", "immutable": {"fields": ["spec.code", "spec.owner"]}},
                    {"name": "at-most-1000", "maxCount": 1000},
                    {"name": "app-says-ok", "external": {"url": "http://todo-api.shop.svc/validate", "timeoutSeconds": 2}}
                ],
                "controller": {"replicas": 1, "notify": {"url": "http://todo-api.shop.svc/notifications"}},
                "webhook": {"replicas": 2, "failurePolicy": "Fail", "timeoutSeconds": 5,
                            "certificate": {"validity": "2160h", "renewBefore": "720h"}},
                "broker": {"mode": "Managed", "replicas": 1, "jetstream": {"storage": "File"}}
            }
        })
    }

    fn stack(doc: Value) -> KabStack {
        serde_json::from_value(doc).unwrap()
    }

    fn with(f: impl FnOnce(&mut Value)) -> KabStack {
        let mut doc = base();
        f(&mut doc);
        stack(doc)
    }

    /// A second served version with its own schema.
    fn add_v2(doc: &mut Value, schema: Value) {
        doc["spec"]["entity"]["versions"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "v2", "served": true, "schema": schema}));
    }

    #[test]
    fn valid_stacks_pass() {
        let valid: Vec<(&str, KabStack)> = vec![
            ("design example", stack(base())),
            (
                "minimal",
                stack(json!({
                    "apiVersion": "kab.dev/v1alpha1", "kind": "KabStack",
                    "metadata": {"name": "m", "namespace": "ns"},
                    "spec": {"entity": {"group": "a.b", "kind": "Thing",
                        "versions": [{"name": "v1", "schema": {"type": "object"}}]}}
                })),
            ),
            (
                "two versions, one storage, unique path under a map and a free-form object",
                with(|d| {
                    add_v2(
                        d,
                        json!({"type": "object", "properties": {
                            "code": {"type": "string"}, "owner": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}),
                    );
                    d["spec"]["rules"] = json!([
                        {"name": "u", "unique": {"fields": ["spec.code", "spec.labels.team"]}},
                        {"name": "i", "immutable": {"fields": ["spec.owner.email", "spec.extra.anything.deep", "spec.tags"]}}
                    ]);
                    // v1 has labels (a map); v2 has no labels at all: only v1 is served for that.
                    d["spec"]["entity"]["versions"][1]["served"] = json!(false);
                }),
            ),
            (
                "external broker, short certificates, int-or-string unique",
                with(|d| {
                    d["spec"]["broker"] = json!({"mode": "External", "url": "nats://nats.messaging.svc:4222", "credentialsSecret": "creds"});
                    d["spec"]["webhook"]["certificate"] =
                        json!({"validity": "1h30m", "renewBefore": "45m"});
                    d["spec"]["rules"] =
                        json!([{"name": "u", "unique": {"fields": ["spec.priority"]}}]);
                }),
            ),
            (
                "no broker, name at the limit",
                with(|d| {
                    d["metadata"]["name"] = json!("a".repeat(40));
                    d["spec"]["broker"] = json!({"mode": "None"});
                }),
            ),
        ];
        for (name, s) in valid {
            assert_eq!(validate(&s), Ok(()), "{name}");
        }
    }

    #[test]
    fn invalid_stacks_name_the_field() {
        type Case = (&'static str, Box<dyn FnOnce(&mut Value)>, &'static str);
        let cases: Vec<Case> = vec![
            (
                "two storage versions",
                Box::new(|d| {
                    add_v2(
                        d,
                        json!({"type": "object", "properties": {"code": {"type": "string"}, "owner": {"type": "object", "properties": {"email": {"type": "string"}}}}}),
                    );
                    d["spec"]["entity"]["versions"][1]["storage"] = json!(true);
                }),
                "spec.entity.versions",
            ),
            (
                "no storage version among two",
                Box::new(|d| {
                    add_v2(
                        d,
                        json!({"type": "object", "properties": {"code": {"type": "string"}, "owner": {"type": "object"}}}),
                    );
                    d["spec"]["entity"]["versions"][0]["storage"] = json!(false);
                }),
                "spec.entity.versions",
            ),
            (
                "no served version",
                Box::new(|d| d["spec"]["entity"]["versions"][0]["served"] = json!(false)),
                "spec.entity.versions",
            ),
            (
                "duplicate version names",
                Box::new(|d| {
                    let v = d["spec"]["entity"]["versions"][0].clone();
                    d["spec"]["entity"]["versions"]
                        .as_array_mut()
                        .unwrap()
                        .push(v);
                    d["spec"]["entity"]["versions"][1]["storage"] = json!(false);
                }),
                "spec.entity.versions[1].name",
            ),
            (
                "schema node without type",
                Box::new(|d| {
                    add_v2(
                        d,
                        json!({"type": "object", "properties": {"code": {"description": "no type"}}}),
                    );
                    d["spec"]["rules"] = json!([]);
                }),
                "spec.entity.versions[1].schema.properties.code",
            ),
            (
                "properties and additionalProperties",
                Box::new(|d| {
                    d["spec"]["entity"]["versions"][0]["schema"]["properties"]["labels"]["properties"] =
                        json!({"a": {"type": "string"}})
                }),
                "spec.entity.versions[0].schema.properties.labels.additionalProperties",
            ),
            (
                "array without items",
                Box::new(|d| {
                    d["spec"]["entity"]["versions"][0]["schema"]["properties"]["tags"] =
                        json!({"type": "array"})
                }),
                "spec.entity.versions[0].schema.properties.tags.items",
            ),
            (
                "array items as a list",
                Box::new(|d| {
                    d["spec"]["entity"]["versions"][0]["schema"]["properties"]["tags"]["items"] =
                        json!([{"type": "string"}])
                }),
                "spec.entity.versions[0].schema.properties.tags.items",
            ),
            (
                "$ref",
                Box::new(|d| {
                    d["spec"]["entity"]["versions"][0]["schema"]["properties"]["message"] =
                        json!({"$ref": "#/definitions/m"})
                }),
                "spec.entity.versions[0].schema.properties.message[\"$ref\"]",
            ),
            (
                "definitions",
                Box::new(|d| {
                    d["spec"]["entity"]["versions"][0]["schema"]["definitions"] =
                        json!({"m": {"type": "string"}})
                }),
                "spec.entity.versions[0].schema.definitions",
            ),
            (
                "type inside anyOf",
                Box::new(|d| {
                    d["spec"]["entity"]["versions"][0]["schema"]["properties"]["state"]["anyOf"]
                        [1]["type"] = json!("string")
                }),
                "spec.entity.versions[0].schema.properties.state.anyOf[1].type",
            ),
            (
                "description inside not",
                Box::new(|d| {
                    d["spec"]["entity"]["versions"][0]["schema"]["properties"]["state"]["not"] =
                        json!({"description": "x", "enum": ["x"]})
                }),
                "spec.entity.versions[0].schema.properties.state.not.description",
            ),
            (
                "top-level schema not an object",
                Box::new(|d| {
                    d["spec"]["entity"]["versions"][0]["schema"] = json!({"type": "string"});
                    d["spec"]["rules"] = json!([]);
                }),
                "spec.entity.versions[0].schema.type",
            ),
            (
                "status schema defines kab",
                Box::new(|d| {
                    d["spec"]["entity"]["versions"][0]["statusSchema"]["properties"]["kab"] =
                        json!({"type": "string"})
                }),
                "spec.entity.versions[0].statusSchema.properties.kab",
            ),
            (
                "rule path outside spec",
                Box::new(|d| d["spec"]["rules"][0]["unique"]["fields"] = json!(["metadata.name"])),
                "spec.rules[0].unique.fields[0]",
            ),
            (
                "rule path missing in v2",
                Box::new(|d| {
                    add_v2(
                        d,
                        json!({"type": "object", "properties": {"owner": {"type": "object", "properties": {"email": {"type": "string"}}}}}),
                    );
                }),
                "spec.rules[0].unique.fields[0]",
            ),
            (
                "unique field not scalar",
                Box::new(|d| d["spec"]["rules"][0]["unique"]["fields"] = json!(["spec.owner"])),
                "spec.rules[0].unique.fields[0]",
            ),
            (
                "immutable field missing",
                Box::new(|d| {
                    d["spec"]["rules"][1]["immutable"]["fields"] = json!(["spec.code", "spec.nope"])
                }),
                "spec.rules[1].immutable.fields[1]",
            ),
            (
                "duplicate rule names",
                Box::new(|d| d["spec"]["rules"][2]["name"] = json!("unique-code")),
                "spec.rules[2].name",
            ),
            (
                "negative maxCount",
                Box::new(|d| d["spec"]["rules"][2]["maxCount"] = json!(-1)),
                "spec.rules[2].maxCount",
            ),
            (
                "two kinds in one rule",
                Box::new(|d| d["spec"]["rules"][2]["unique"] = json!({"fields": ["spec.code"]})),
                "spec.rules[2]",
            ),
            (
                "external url without host",
                Box::new(|d| d["spec"]["rules"][3]["external"]["url"] = json!("http:///validate")),
                "spec.rules[3].external.url",
            ),
            (
                "external url with ftp scheme",
                Box::new(|d| {
                    d["spec"]["rules"][3]["external"]["url"] = json!("ftp://todo-api/validate")
                }),
                "spec.rules[3].external.url",
            ),
            (
                "external timeout not below the webhook's",
                Box::new(|d| d["spec"]["rules"][3]["external"]["timeoutSeconds"] = json!(5)),
                "spec.rules[3].external.timeoutSeconds",
            ),
            (
                "reserved group",
                Box::new(|d| d["spec"]["entity"]["group"] = json!("apps.kab.dev")),
                "spec.entity.group",
            ),
            (
                "reserved k8s.io group",
                Box::new(|d| d["spec"]["entity"]["group"] = json!("foo.k8s.io")),
                "spec.entity.group",
            ),
            (
                "reserved x-k8s.io group",
                Box::new(|d| d["spec"]["entity"]["group"] = json!("cluster.x-k8s.io")),
                "spec.entity.group",
            ),
            (
                "group without a dot",
                Box::new(|d| d["spec"]["entity"]["group"] = json!("todo")),
                "spec.entity.group",
            ),
            (
                "group not a DNS subdomain",
                Box::new(|d| d["spec"]["entity"]["group"] = json!("Todo.Example.com")),
                "spec.entity.group",
            ),
            (
                "kind not CamelCase",
                Box::new(|d| d["spec"]["entity"]["kind"] = json!("todo_item")),
                "spec.entity.kind",
            ),
            (
                "plural not a DNS label",
                Box::new(|d| d["spec"]["entity"]["plural"] = json!("Todos")),
                "spec.entity.plural",
            ),
            (
                "plural equals singular",
                Box::new(|d| d["spec"]["entity"]["plural"] = json!("todo")),
                "spec.entity.plural",
            ),
            (
                "singular not a DNS label",
                Box::new(|d| d["spec"]["entity"]["singular"] = json!("to do")),
                "spec.entity.singular",
            ),
            (
                "short name clashes with plural",
                Box::new(|d| d["spec"]["entity"]["shortNames"] = json!(["td", "todos"])),
                "spec.entity.shortNames[1]",
            ),
            (
                "short name not a label",
                Box::new(|d| d["spec"]["entity"]["shortNames"] = json!(["t.d"])),
                "spec.entity.shortNames[0]",
            ),
            (
                "printer column jsonPath",
                Box::new(|d| {
                    d["spec"]["entity"]["versions"][0]["printerColumns"][0]["jsonPath"] =
                        json!("spec.code")
                }),
                "spec.entity.versions[0].printerColumns[0].jsonPath",
            ),
            (
                "External broker without url",
                Box::new(|d| d["spec"]["broker"] = json!({"mode": "External"})),
                "spec.broker.url",
            ),
            (
                "Managed broker with url",
                Box::new(|d| {
                    d["spec"]["broker"] = json!({"mode": "Managed", "url": "nats://x:4222"})
                }),
                "spec.broker.url",
            ),
            (
                "unparseable validity",
                Box::new(|d| d["spec"]["webhook"]["certificate"]["validity"] = json!("90d")),
                "spec.webhook.certificate.validity",
            ),
            (
                "validity below 2m",
                Box::new(|d| {
                    d["spec"]["webhook"]["certificate"] =
                        json!({"validity": "90s", "renewBefore": "30s"})
                }),
                "spec.webhook.certificate.validity",
            ),
            (
                "renewBefore not below validity",
                Box::new(|d| {
                    d["spec"]["webhook"]["certificate"] =
                        json!({"validity": "1h", "renewBefore": "60m"})
                }),
                "spec.webhook.certificate.renewBefore",
            ),
            (
                "name too long",
                Box::new(|d| d["metadata"]["name"] = json!("a".repeat(41))),
                "metadata.name",
            ),
            (
                "namespace missing",
                Box::new(|d| {
                    d["metadata"].as_object_mut().unwrap().remove("namespace");
                }),
                "metadata.namespace",
            ),
            (
                "int-or-string with a type",
                Box::new(|d| {
                    d["spec"]["entity"]["versions"][0]["schema"]["properties"]["priority"]["type"] =
                        json!("string")
                }),
                "spec.entity.versions[0].schema.properties.priority.type",
            ),
            (
                "odd property name in the path",
                Box::new(|d| {
                    d["spec"]["entity"]["versions"][0]["schema"]["properties"]["a.b"] = json!({})
                }),
                "spec.entity.versions[0].schema.properties[\"a.b\"]",
            ),
        ];
        let mut checked = 0;
        for (name, mutate, field) in cases {
            let s = with(mutate);
            let result = validate(&s);
            if field.is_empty() {
                assert_eq!(result, Ok(()), "{name}");
                continue;
            }
            let errors = result.expect_err(name);
            assert!(
                errors.fields().contains(&field),
                "{name}: expected an error at {field}, got: {errors}"
            );
            for e in &errors.0 {
                assert!(
                    !e.message.is_empty(),
                    "{name}: empty message at {}",
                    e.field
                );
            }
            checked += 1;
        }
        assert!(checked >= 15);
    }

    #[test]
    fn collects_every_error_in_order() {
        let s = with(|d| {
            d["metadata"]["name"] = json!("a".repeat(41));
            d["spec"]["entity"]["group"] = json!("kab.dev");
            d["spec"]["rules"][0]["unique"]["fields"] = json!(["spec.nope"]);
            d["spec"]["rules"][2]["maxCount"] = json!(-5);
            d["spec"]["broker"] = json!({"mode": "External"});
        });
        let errors = validate(&s).unwrap_err();
        assert_eq!(
            errors.fields(),
            [
                "metadata.name",
                "spec.entity.group",
                "spec.rules[0].unique.fields[0]",
                "spec.rules[2].maxCount",
                "spec.broker.url"
            ]
        );
        assert_eq!(validate(&s), Err(errors.clone()), "deterministic");
        let text = errors.to_string();
        assert_eq!(text.matches("; ").count(), 4, "{text}");
        assert!(text.starts_with("metadata.name: "), "{text}");
        assert!(
            text.contains("spec.rules[0].unique.fields[0]: spec.nope does not exist in the schema of served version v1 (spec has no property \"nope\")"),
            "{text}"
        );
    }

    #[test]
    fn rule_paths_are_checked_in_every_served_version() {
        let s = with(|d| {
            add_v2(
                d,
                json!({"type": "object", "properties": {"owner": {"type": "object", "properties": {"email": {"type": "string"}}}}}),
            );
            d["spec"]["rules"] = json!([{"name": "u", "unique": {"fields": ["spec.code"]}}]);
        });
        let errors = validate(&s).unwrap_err();
        assert_eq!(errors.0.len(), 1, "{errors}");
        assert!(
            errors.0[0].message.contains("served version v2"),
            "{errors}"
        );
        assert!(!errors.0[0].message.contains("v1"), "{errors}");
    }

    #[test]
    fn urls() {
        for ok in [
            "http://a",
            "https://a.b:8443/x?y#z",
            "http://[::1]:80/",
            "HTTP://svc.ns.svc",
        ] {
            assert_eq!(check_url(ok, &["http", "https"]), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "a",
            "http://",
            "http://:80",
            "http://a:0",
            "http://a:99999",
            "http://a b",
            "mailto:x",
            "http://a..b",
            "http://[zz]/",
        ] {
            assert!(check_url(bad, &["http", "https"]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names() {
        assert!(
            is_version_name("v1") && is_version_name("v2beta3") && is_version_name("v10alpha1")
        );
        assert!(
            !is_version_name("v0")
                && !is_version_name("1")
                && !is_version_name("v1gamma1")
                && !is_version_name("v1beta")
        );
        assert!(
            is_dns1035_label("todos") && !is_dns1035_label("1todo") && !is_dns1035_label("todo-")
        );
        assert!(is_dns_subdomain("todo.example.com") && !is_dns_subdomain("todo..com"));
    }
}
