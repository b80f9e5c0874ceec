//! The rules engine: what the webhook decides for one admission request.
//!
//! [`evaluate`] is a function of its inputs only: the stack's rules, the request
//! ([`Admission`]), and three views it reads through traits — the watch cache of entities
//! ([`Entities`]), the unique-value claims ([`Claims`]) and the business application
//! ([`External`]). The webhook plugs in the watch cache, Leases and an HTTP client; the tests
//! plug in tables.
//!
//! Order: every rule is checked in the stack's order with reads only (cache lookups, the
//! external call); the first failing rule is the denial. Only when every rule passed are the
//! unique values claimed (writes, skipped on dry run), so that a request denied by a rule never
//! leaves a claim behind. Claims taken by a request that is then denied by a later claim are
//! released before answering. After an allowed UPDATE that moves a unique value, and after an
//! allowed DELETE, the values the entity held are released.

use std::future::Future;
use std::time::Duration;

use kube::core::DynamicObject;
use serde_json::Value;

use crate::api::{BusinessRule, ExternalRule};

/// The operation of an admission request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// A new entity.
    Create,
    /// A change to an entity (spec, metadata; the status subresource is not sent to us).
    Update,
    /// An entity goes.
    Delete,
    /// A connect request (never sent for custom resources; allowed).
    Connect,
}

impl Operation {
    /// The operation as the API server spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Connect => "CONNECT",
        }
    }
}

/// What the engine knows about one admission request.
#[derive(Clone, Copy, Debug)]
pub struct Admission<'a> {
    /// What is being done.
    pub operation: Operation,
    /// Namespace of the entity.
    pub namespace: &'a str,
    /// Name of the entity (generated names are set before validating admission).
    pub name: &'a str,
    /// The entity as it would be stored (CREATE, UPDATE).
    pub object: Option<&'a DynamicObject>,
    /// The entity as it is stored (UPDATE, DELETE).
    pub old_object: Option<&'a DynamicObject>,
    /// A dry run: decide, but write nothing.
    pub dry_run: bool,
}

/// The rules of one stack and the names its messages use.
#[derive(Clone, Debug)]
pub struct RuleSet {
    /// The rules, in the stack's order.
    pub rules: Vec<BusinessRule>,
    /// Singular of the entity (`todo`), as in `todo shop/first`.
    pub singular: String,
    /// Plural of the entity (`todos`).
    pub plural: String,
}

/// The answer for one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// The rule that denied it.
    pub rule: Option<String>,
    /// Why it was denied (starts with `rule <name>: `), empty when allowed.
    pub message: String,
    /// Warnings for the client (e.g. a fail-open external rule that did not answer).
    pub warnings: Vec<String>,
}

impl Decision {
    /// Allowed, with `warnings`.
    pub fn allow(warnings: Vec<String>) -> Self {
        Decision {
            allowed: true,
            rule: None,
            message: String::new(),
            warnings,
        }
    }

    /// Denied by `rule` because of `why`.
    pub fn deny(rule: &str, why: impl std::fmt::Display, warnings: Vec<String>) -> Self {
        Decision {
            allowed: false,
            rule: Some(rule.to_owned()),
            message: format!("rule {rule}: {why}"),
            warnings,
        }
    }
}

/// The entities of the stack, as the watch cache sees them.
pub trait Entities {
    /// Name of an entity of `namespace`, other than `except`, whose `fields` hold `values`.
    fn find_holder(
        &self,
        namespace: &str,
        fields: &[String],
        values: &[Value],
        except: &str,
    ) -> Option<String>;
    /// How many entities `namespace` has.
    fn count(&self, namespace: &str) -> usize;
}

/// A unique value (the combination of a rule's fields) and the entity that wants or holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The unique rule.
    pub rule: String,
    /// The rule's fields.
    pub fields: Vec<String>,
    /// Their values, in the order of `fields`.
    pub values: Vec<Value>,
    /// Namespace of the entity.
    pub namespace: String,
    /// Name of the entity.
    pub holder: String,
}

/// How a claim went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The value is ours (claimed now, already ours, or taken over from a stale claim). On a
    /// dry run: it would be.
    Granted,
    /// Another stored entity holds the value.
    HeldBy(String),
    /// Another entity claimed the value moments ago and is not stored (yet): its create may be
    /// in flight, or may have failed after its claim.
    Claiming {
        /// The entity that claimed it.
        holder: String,
        /// How long ago.
        age: Duration,
    },
}

/// Unique-value claims, made atomically through the API server.
pub trait Claims {
    /// Why a claim could not be decided (the request is then denied with it: fail closed).
    type Error: std::error::Error + Send + Sync + 'static;
    /// What [`Claims::acquire`] would answer, without writing anything (dry run).
    fn check(
        &self,
        claim: &Claim,
    ) -> impl Future<Output = Result<ClaimOutcome, Self::Error>> + Send;
    /// Claims the value for `claim.holder`.
    fn acquire(
        &self,
        claim: &Claim,
    ) -> impl Future<Output = Result<ClaimOutcome, Self::Error>> + Send;
    /// Gives the value up if `claim.holder` holds it (best effort; never fails the request).
    fn release(&self, claim: &Claim) -> impl Future<Output = ()> + Send;
}

/// What the business application answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExternalAnswer {
    /// `{allowed: true}`.
    Allowed {
        /// Warnings it sent along.
        warnings: Vec<String>,
    },
    /// `{allowed: false, message}`.
    Denied {
        /// Its message (may be empty).
        message: String,
        /// Warnings it sent along.
        warnings: Vec<String>,
    },
    /// No answer: timeout, connection failure, 5xx. A fail-open rule admits.
    Unavailable(String),
    /// An answer that is not one: 3xx/4xx, a body that is not `{allowed, message}`. Always
    /// denies.
    Invalid(String),
}

/// The business application behind `external` rules.
pub trait External {
    /// POSTs `payload` to the rule's URL and reads the answer, within the rule's timeout.
    fn ask(
        &self,
        rule: &ExternalRule,
        payload: &Value,
    ) -> impl Future<Output = ExternalAnswer> + Send;
}

/// The value at a dotted path (`spec.code`) of `object`; `None` when absent or null.
pub fn field<'o>(object: &'o DynamicObject, path: &str) -> Option<&'o Value> {
    let mut node = &object.data;
    for segment in path.split('.') {
        node = node.as_object()?.get(segment)?;
    }
    (!node.is_null()).then_some(node)
}

/// The values of `fields` in `object`, or `None` when one is missing (not constrained).
pub fn values_of(object: &DynamicObject, fields: &[String]) -> Option<Vec<Value>> {
    fields.iter().map(|f| field(object, f).cloned()).collect()
}

/// `spec.code "A-1"` or `spec.a "x", spec.b 2`.
pub fn describe_values(fields: &[String], values: &[Value]) -> String {
    fields
        .iter()
        .zip(values)
        .map(|(f, v)| format!("{f} {}", shown(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A value for a message: JSON, cut at 100 characters.
fn shown(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 100 {
        format!("{}…", text.chars().take(100).collect::<String>())
    } else {
        text
    }
}

/// Decides one admission request. See the module documentation for the order of things.
pub async fn evaluate<E, C, X>(
    set: &RuleSet,
    admission: &Admission<'_>,
    entities: &E,
    claims: &C,
    external: &X,
) -> Decision
where
    E: Entities,
    C: Claims,
    X: External,
{
    let mut warnings = Vec::new();
    match admission.operation {
        Operation::Connect => return Decision::allow(warnings),
        Operation::Delete => {
            // No rule denies a delete. The values the entity held are given up.
            if !admission.dry_run
                && let Some(old) = admission.old_object
            {
                for claim in unique_claims(set, admission, old) {
                    claims.release(&claim).await;
                }
            }
            return Decision::allow(warnings);
        }
        Operation::Create | Operation::Update => {}
    }
    let Some(object) = admission.object else {
        // The request decoder refuses this; never admit what we cannot check.
        return Decision {
            allowed: false,
            rule: None,
            message: format!("{} request without an object", admission.operation.as_str()),
            warnings,
        };
    };
    let update = admission.operation == Operation::Update;
    let old = admission.old_object.filter(|_| update);

    let mut wanted: Vec<Claim> = Vec::new();
    let mut moved_from: Vec<Claim> = Vec::new();
    for rule in &set.rules {
        if let Some(unique) = &rule.unique {
            let Some(values) = values_of(object, &unique.fields) else {
                continue; // a missing field is not constrained
            };
            let old_values = old.and_then(|o| values_of(o, &unique.fields));
            if old_values.as_ref() == Some(&values) {
                continue; // unchanged: the entity already holds them
            }
            if let Some(holder) =
                entities.find_holder(admission.namespace, &unique.fields, &values, admission.name)
            {
                return Decision::deny(
                    &rule.name,
                    format!(
                        "{} {} already used by {} {}/{holder}",
                        describe_values(&unique.fields, &values),
                        if values.len() == 1 { "is" } else { "are" },
                        set.singular,
                        admission.namespace,
                    ),
                    warnings,
                );
            }
            let claim = |values: Vec<Value>| Claim {
                rule: rule.name.clone(),
                fields: unique.fields.clone(),
                values,
                namespace: admission.namespace.to_owned(),
                holder: admission.name.to_owned(),
            };
            if let Some(previous) = old_values {
                moved_from.push(claim(previous));
            }
            wanted.push(claim(values));
        } else if let Some(immutable) = &rule.immutable {
            let Some(old) = old else { continue };
            for path in &immutable.fields {
                match (field(old, path), field(object, path)) {
                    (Some(was), Some(now)) if was != now => {
                        return Decision::deny(
                            &rule.name,
                            format!(
                                "{path} cannot change (was {}, now {})",
                                shown(was),
                                shown(now)
                            ),
                            warnings,
                        );
                    }
                    (Some(was), None) => {
                        return Decision::deny(
                            &rule.name,
                            format!("{path} cannot be removed (was {})", shown(was)),
                            warnings,
                        );
                    }
                    // Unchanged, or set for the first time.
                    _ => {}
                }
            }
        } else if let Some(max) = rule.max_count {
            if admission.operation != Operation::Create {
                continue;
            }
            let count = entities.count(admission.namespace);
            if i64::try_from(count).unwrap_or(i64::MAX) >= max {
                return Decision::deny(
                    &rule.name,
                    format!(
                        "at most {max} {} per namespace, and {} already has {count}",
                        set.plural, admission.namespace
                    ),
                    warnings,
                );
            }
        } else if let Some(ext) = &rule.external {
            if !asks_external(admission, object) {
                continue;
            }
            let payload = external_payload(&rule.name, admission);
            match external.ask(ext, &payload).await {
                ExternalAnswer::Allowed { warnings: w } => warnings.extend(w),
                ExternalAnswer::Denied {
                    message,
                    warnings: w,
                } => {
                    warnings.extend(w);
                    let why = if message.trim().is_empty() {
                        format!("denied by {}", ext.url)
                    } else {
                        message
                    };
                    return Decision::deny(&rule.name, why, warnings);
                }
                ExternalAnswer::Unavailable(why) if ext.fail_open => {
                    warnings.push(format!(
                        "rule {}: {} {why}; admitted because the rule fails open",
                        rule.name, ext.url
                    ));
                }
                ExternalAnswer::Unavailable(why) | ExternalAnswer::Invalid(why) => {
                    return Decision::deny(&rule.name, format!("{} {why}", ext.url), warnings);
                }
            }
        }
    }

    let mut granted: Vec<&Claim> = Vec::new();
    for claim in &wanted {
        let outcome = if admission.dry_run {
            claims.check(claim).await
        } else {
            claims.acquire(claim).await
        };
        let denial = match outcome {
            Ok(ClaimOutcome::Granted) => {
                granted.push(claim);
                continue;
            }
            Ok(ClaimOutcome::HeldBy(holder)) => format!(
                "{} {} already used by {} {}/{holder}",
                describe_values(&claim.fields, &claim.values),
                if claim.values.len() == 1 { "is" } else { "are" },
                set.singular,
                claim.namespace,
            ),
            Ok(ClaimOutcome::Claiming { holder, age }) => format!(
                "{} {} being claimed by {} {}/{holder} ({}s ago, not stored yet) — retry in a few seconds",
                describe_values(&claim.fields, &claim.values),
                if claim.values.len() == 1 { "is" } else { "are" },
                set.singular,
                claim.namespace,
                age.as_secs(),
            ),
            Err(e) => format!(
                "cannot claim {}: {e}",
                describe_values(&claim.fields, &claim.values)
            ),
        };
        if !admission.dry_run {
            for taken in granted {
                claims.release(taken).await;
            }
        }
        return Decision::deny(&claim.rule, denial, warnings);
    }
    if !admission.dry_run {
        for claim in &moved_from {
            claims.release(claim).await;
        }
    }
    Decision::allow(warnings)
}

/// The claims `object` holds, one per unique rule whose fields it has.
pub fn unique_claims(
    set: &RuleSet,
    admission: &Admission<'_>,
    object: &DynamicObject,
) -> Vec<Claim> {
    set.rules
        .iter()
        .filter_map(|rule| {
            let unique = rule.unique.as_ref()?;
            let values = values_of(object, &unique.fields)?;
            Some(Claim {
                rule: rule.name.clone(),
                fields: unique.fields.clone(),
                values,
                namespace: admission.namespace.to_owned(),
                holder: admission.name.to_owned(),
            })
        })
        .collect()
}

/// External rules judge content: they are asked on CREATE and on an UPDATE that changes the
/// spec of an entity that is not being deleted. Metadata-only writes (finalizers, labels) skip
/// them, so kab's own controller is never blocked by an outage of the business application.
fn asks_external(admission: &Admission<'_>, object: &DynamicObject) -> bool {
    match admission.operation {
        Operation::Create => true,
        Operation::Update => {
            object.metadata.deletion_timestamp.is_none()
                && admission.old_object.map(|o| o.data.get("spec")) != Some(object.data.get("spec"))
        }
        Operation::Delete | Operation::Connect => false,
    }
}

/// What an external rule POSTs to the business application.
pub fn external_payload(rule: &str, admission: &Admission<'_>) -> Value {
    serde_json::json!({
        "rule": rule,
        "operation": admission.operation.as_str(),
        "namespace": admission.namespace,
        "name": admission.name,
        "dryRun": admission.dry_run,
        "object": admission.object,
        "oldObject": admission.old_object,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::FieldsRule;
    use serde_json::json;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    fn todo(name: &str, spec: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "todo.example.com/v1",
            "kind": "Todo",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn unique(name: &str, fields: &[&str]) -> BusinessRule {
        BusinessRule {
            name: name.into(),
            unique: Some(FieldsRule {
                fields: fields.iter().map(|f| f.to_string()).collect(),
            }),
            immutable: None,
            max_count: None,
            external: None,
        }
    }

    fn immutable(name: &str, fields: &[&str]) -> BusinessRule {
        BusinessRule {
            name: name.into(),
            unique: None,
            immutable: Some(FieldsRule {
                fields: fields.iter().map(|f| f.to_string()).collect(),
            }),
            max_count: None,
            external: None,
        }
    }

    fn max_count(name: &str, max: i64) -> BusinessRule {
        BusinessRule {
            name: name.into(),
            unique: None,
            immutable: None,
            max_count: Some(max),
            external: None,
        }
    }

    fn external(name: &str, fail_open: bool) -> BusinessRule {
        BusinessRule {
            name: name.into(),
            unique: None,
            immutable: None,
            max_count: None,
            external: Some(ExternalRule {
                url: "http://app.shop.svc/validate".into(),
                timeout_seconds: 2,
                fail_open,
            }),
        }
    }

    fn set(rules: Vec<BusinessRule>) -> RuleSet {
        RuleSet {
            rules,
            singular: "todo".into(),
            plural: "todos".into(),
        }
    }

    /// The cache: a list of stored entities.
    struct Cache(Vec<DynamicObject>);

    impl Entities for Cache {
        fn find_holder(
            &self,
            namespace: &str,
            fields: &[String],
            values: &[Value],
            except: &str,
        ) -> Option<String> {
            self.0
                .iter()
                .filter(|o| o.metadata.namespace.as_deref() == Some(namespace))
                .filter(|o| o.metadata.name.as_deref() != Some(except))
                .find(|o| values_of(o, fields).as_deref() == Some(values))
                .and_then(|o| o.metadata.name.clone())
        }
        fn count(&self, namespace: &str) -> usize {
            self.0
                .iter()
                .filter(|o| o.metadata.namespace.as_deref() == Some(namespace))
                .count()
        }
    }

    /// Claims in memory: (rule, values) → holder; records every call.
    #[derive(Default)]
    struct Memory {
        held: Mutex<BTreeMap<(String, String), String>>,
        claiming: BTreeMap<(String, String), String>,
        calls: Mutex<Vec<String>>,
        broken: bool,
    }

    fn key(c: &Claim) -> (String, String) {
        (c.rule.clone(), Value::from(c.values.clone()).to_string())
    }

    impl Memory {
        fn holding(entries: &[(&str, Value, &str)]) -> Self {
            let m = Memory::default();
            for (rule, values, holder) in entries {
                m.held
                    .lock()
                    .unwrap()
                    .insert((rule.to_string(), values.to_string()), holder.to_string());
            }
            m
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        fn holder(&self, rule: &str, values: Value) -> Option<String> {
            self.held
                .lock()
                .unwrap()
                .get(&(rule.to_string(), values.to_string()))
                .cloned()
        }
        fn outcome(&self, c: &Claim, write: bool) -> Result<ClaimOutcome, Unanswered> {
            if self.broken {
                return Err(Unanswered);
            }
            if let Some(h) = self.claiming.get(&key(c)) {
                return Ok(ClaimOutcome::Claiming {
                    holder: h.clone(),
                    age: Duration::from_secs(2),
                });
            }
            let mut held = self.held.lock().unwrap();
            match held.get(&key(c)) {
                Some(h) if *h != c.holder => Ok(ClaimOutcome::HeldBy(h.clone())),
                _ => {
                    if write {
                        held.insert(key(c), c.holder.clone());
                    }
                    Ok(ClaimOutcome::Granted)
                }
            }
        }
    }

    /// What a broken [`Memory`] fails with.
    #[derive(Debug, thiserror::Error)]
    #[error("the API server did not answer")]
    struct Unanswered;

    impl Claims for Memory {
        type Error = Unanswered;
        async fn check(&self, c: &Claim) -> Result<ClaimOutcome, Unanswered> {
            self.calls.lock().unwrap().push(format!(
                "check {} {}",
                c.rule,
                Value::from(c.values.clone())
            ));
            self.outcome(c, false)
        }
        async fn acquire(&self, c: &Claim) -> Result<ClaimOutcome, Unanswered> {
            self.calls.lock().unwrap().push(format!(
                "acquire {} {}",
                c.rule,
                Value::from(c.values.clone())
            ));
            self.outcome(c, true)
        }
        async fn release(&self, c: &Claim) {
            self.calls.lock().unwrap().push(format!(
                "release {} {}",
                c.rule,
                Value::from(c.values.clone())
            ));
            let mut held = self.held.lock().unwrap();
            if held.get(&key(c)) == Some(&c.holder) {
                held.remove(&key(c));
            }
        }
    }

    /// The business application: a fixed answer; records the payloads.
    struct App(ExternalAnswer, Mutex<Vec<Value>>);

    impl App {
        fn answering(a: ExternalAnswer) -> Self {
            App(a, Mutex::new(Vec::new()))
        }
        fn asked(&self) -> usize {
            self.1.lock().unwrap().len()
        }
    }

    impl External for App {
        async fn ask(&self, _rule: &ExternalRule, payload: &Value) -> ExternalAnswer {
            self.1.lock().unwrap().push(payload.clone());
            self.0.clone()
        }
    }

    fn allow_all() -> App {
        App::answering(ExternalAnswer::Allowed { warnings: vec![] })
    }

    fn create<'a>(o: &'a DynamicObject) -> Admission<'a> {
        Admission {
            operation: Operation::Create,
            namespace: "shop",
            name: o.metadata.name.as_deref().unwrap(),
            object: Some(o),
            old_object: None,
            dry_run: false,
        }
    }

    fn update<'a>(old: &'a DynamicObject, new: &'a DynamicObject) -> Admission<'a> {
        Admission {
            operation: Operation::Update,
            old_object: Some(old),
            ..create(new)
        }
    }

    fn run<C: Claims, X: External>(
        rules: Vec<BusinessRule>,
        admission: Admission<'_>,
        cache: &Cache,
        claims: &C,
        app: &X,
    ) -> Decision {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(evaluate(&set(rules), &admission, cache, claims, app))
    }

    #[test]
    fn unique_table() {
        let first = todo("first", json!({"code": "A-1", "n": 1}));
        let stored = Cache(vec![first.clone()]);
        struct Case {
            what: &'static str,
            rules: Vec<BusinessRule>,
            object: DynamicObject,
            old: Option<DynamicObject>,
            claims: Memory,
            denied: Option<&'static str>,
        }
        let cases = vec![
            Case {
                what: "a new value is admitted",
                rules: vec![unique("unique-code", &["spec.code"])],
                object: todo("second", json!({"code": "B-2"})),
                old: None,
                claims: Memory::default(),
                denied: None,
            },
            Case {
                what: "a value used by a cached entity is denied, naming the rule, field and holder",
                rules: vec![unique("unique-code", &["spec.code"])],
                object: todo("second", json!({"code": "A-1"})),
                old: None,
                claims: Memory::default(),
                denied: Some(
                    r#"rule unique-code: spec.code "A-1" is already used by todo shop/first"#,
                ),
            },
            Case {
                what: "a missing field is not constrained",
                rules: vec![unique("unique-code", &["spec.code"])],
                object: todo("second", json!({"message": "no code"})),
                old: None,
                claims: Memory::holding(&[("unique-code", json!([null]), "x")]),
                denied: None,
            },
            Case {
                what: "a null field is not constrained",
                rules: vec![unique("unique-code", &["spec.code"])],
                object: todo("second", json!({"code": null})),
                old: None,
                claims: Memory::default(),
                denied: None,
            },
            Case {
                what: "several fields are unique together",
                rules: vec![unique("code-and-n", &["spec.code", "spec.n"])],
                object: todo("second", json!({"code": "A-1", "n": 2})),
                old: None,
                claims: Memory::default(),
                denied: None,
            },
            Case {
                what: "several fields, same combination",
                rules: vec![unique("code-and-n", &["spec.code", "spec.n"])],
                object: todo("second", json!({"code": "A-1", "n": 1})),
                old: None,
                claims: Memory::default(),
                denied: Some(
                    r#"rule code-and-n: spec.code "A-1", spec.n 1 are already used by todo shop/first"#,
                ),
            },
            Case {
                what: "numbers and strings differ",
                rules: vec![unique("unique-n", &["spec.n"])],
                object: todo("second", json!({"n": "1"})),
                old: None,
                claims: Memory::default(),
                denied: None,
            },
            Case {
                what: "a claim held by an entity the cache does not show yet is denied",
                rules: vec![unique("unique-code", &["spec.code"])],
                object: todo("second", json!({"code": "C-3"})),
                old: None,
                claims: Memory::holding(&[("unique-code", json!(["C-3"]), "racer")]),
                denied: Some(
                    r#"rule unique-code: spec.code "C-3" is already used by todo shop/racer"#,
                ),
            },
            Case {
                what: "a claim in flight is denied with a retry hint",
                rules: vec![unique("unique-code", &["spec.code"])],
                object: todo("second", json!({"code": "C-3"})),
                old: None,
                claims: Memory {
                    claiming: BTreeMap::from([(
                        ("unique-code".to_string(), json!(["C-3"]).to_string()),
                        "racer".to_string(),
                    )]),
                    ..Memory::default()
                },
                denied: Some(
                    r#"rule unique-code: spec.code "C-3" is being claimed by todo shop/racer (2s ago, not stored yet) — retry in a few seconds"#,
                ),
            },
            Case {
                what: "claims that cannot be made deny (fail closed)",
                rules: vec![unique("unique-code", &["spec.code"])],
                object: todo("second", json!({"code": "C-3"})),
                old: None,
                claims: Memory {
                    broken: true,
                    ..Memory::default()
                },
                denied: Some(
                    r#"rule unique-code: cannot claim spec.code "C-3": the API server did not answer"#,
                ),
            },
            Case {
                what: "an update keeping its own value is admitted without a claim",
                rules: vec![unique("unique-code", &["spec.code"])],
                object: todo("first", json!({"code": "A-1", "n": 7})),
                old: Some(first.clone()),
                claims: Memory::default(),
                denied: None,
            },
            Case {
                what: "an update to a value another entity uses is denied",
                rules: vec![unique("unique-code", &["spec.code"])],
                object: todo("third", json!({"code": "A-1"})),
                old: Some(todo("third", json!({"code": "Z-9"}))),
                claims: Memory::default(),
                denied: Some(
                    r#"rule unique-code: spec.code "A-1" is already used by todo shop/first"#,
                ),
            },
        ];
        for case in cases {
            let app = allow_all();
            let admission = match &case.old {
                Some(old) => update(old, &case.object),
                None => create(&case.object),
            };
            let d = run(case.rules, admission, &stored, &case.claims, &app);
            match case.denied {
                None => assert!(d.allowed, "{}: {d:?}", case.what),
                Some(msg) => {
                    assert!(!d.allowed, "{}: admitted", case.what);
                    assert_eq!(d.message, msg, "{}", case.what);
                }
            }
        }
    }

    #[test]
    fn claims_are_made_after_every_rule_passed_and_never_on_dry_run() {
        let o = todo("second", json!({"code": "B-2"}));
        let cache = Cache(vec![]);
        let rules = || vec![unique("unique-code", &["spec.code"]), max_count("max", 0)];

        // A later rule denies: nothing was claimed.
        let claims = Memory::default();
        let d = run(rules(), create(&o), &cache, &claims, &allow_all());
        assert!(!d.allowed);
        assert_eq!(d.rule.as_deref(), Some("max"));
        assert!(claims.calls().is_empty(), "{:?}", claims.calls());

        // Dry run: checked, not written.
        let claims = Memory::default();
        let admission = Admission {
            dry_run: true,
            ..create(&o)
        };
        let d = run(
            vec![unique("unique-code", &["spec.code"])],
            admission,
            &cache,
            &claims,
            &allow_all(),
        );
        assert!(d.allowed, "{d:?}");
        assert_eq!(claims.calls(), vec![r#"check unique-code ["B-2"]"#]);
        assert_eq!(claims.holder("unique-code", json!(["B-2"])), None);

        // Real create: claimed for the entity.
        let claims = Memory::default();
        let d = run(
            vec![unique("unique-code", &["spec.code"])],
            create(&o),
            &cache,
            &claims,
            &allow_all(),
        );
        assert!(d.allowed, "{d:?}");
        assert_eq!(
            claims.holder("unique-code", json!(["B-2"])).as_deref(),
            Some("second")
        );
    }

    #[test]
    fn a_denied_second_claim_releases_the_first() {
        let o = todo("second", json!({"code": "B-2", "n": 5}));
        let claims = Memory::holding(&[("unique-n", json!([5]), "other")]);
        let d = run(
            vec![
                unique("unique-code", &["spec.code"]),
                unique("unique-n", &["spec.n"]),
            ],
            create(&o),
            &Cache(vec![]),
            &claims,
            &allow_all(),
        );
        assert_eq!(
            d.message,
            "rule unique-n: spec.n 5 is already used by todo shop/other"
        );
        assert_eq!(
            claims.calls(),
            vec![
                r#"acquire unique-code ["B-2"]"#,
                "acquire unique-n [5]",
                r#"release unique-code ["B-2"]"#
            ]
        );
        assert_eq!(claims.holder("unique-code", json!(["B-2"])), None);
    }

    #[test]
    fn an_update_moves_the_claim_and_a_delete_releases_it() {
        let rules = || vec![unique("unique-code", &["spec.code"])];
        let old = todo("first", json!({"code": "A-1"}));
        let new = todo("first", json!({"code": "A-2"}));
        let claims = Memory::holding(&[("unique-code", json!(["A-1"]), "first")]);
        let d = run(
            rules(),
            update(&old, &new),
            &Cache(vec![old.clone()]),
            &claims,
            &allow_all(),
        );
        assert!(d.allowed, "{d:?}");
        assert_eq!(
            claims.calls(),
            vec![
                r#"acquire unique-code ["A-2"]"#,
                r#"release unique-code ["A-1"]"#
            ]
        );
        assert_eq!(claims.holder("unique-code", json!(["A-1"])), None);

        let delete = Admission {
            operation: Operation::Delete,
            namespace: "shop",
            name: "first",
            object: None,
            old_object: Some(&new),
            dry_run: false,
        };
        let d = run(rules(), delete, &Cache(vec![]), &claims, &allow_all());
        assert!(d.allowed);
        assert_eq!(claims.holder("unique-code", json!(["A-2"])), None);

        // A dry-run delete releases nothing.
        let claims = Memory::holding(&[("unique-code", json!(["A-2"]), "first")]);
        let d = run(
            rules(),
            Admission {
                dry_run: true,
                ..delete
            },
            &Cache(vec![]),
            &claims,
            &allow_all(),
        );
        assert!(d.allowed);
        assert!(claims.calls().is_empty());
    }

    #[test]
    fn immutable_table() {
        let cases: Vec<(&str, Value, Value, Option<&str>)> = vec![
            (
                "unchanged",
                json!({"code": "A-1"}),
                json!({"code": "A-1", "message": "x"}),
                None,
            ),
            (
                "changed",
                json!({"code": "A-1"}),
                json!({"code": "A-2"}),
                Some(r#"rule code-immutable: spec.code cannot change (was "A-1", now "A-2")"#),
            ),
            (
                "removed",
                json!({"code": "A-1"}),
                json!({}),
                Some(r#"rule code-immutable: spec.code cannot be removed (was "A-1")"#),
            ),
            (
                "set to null",
                json!({"code": "A-1"}),
                json!({"code": null}),
                Some(r#"rule code-immutable: spec.code cannot be removed (was "A-1")"#),
            ),
            (
                "set for the first time",
                json!({}),
                json!({"code": "A-1"}),
                None,
            ),
            (
                "a nested field",
                json!({"owner": {"team": "a"}}),
                json!({"owner": {"team": "b"}}),
                Some(r#"rule code-immutable: spec.owner.team cannot change (was "a", now "b")"#),
            ),
            (
                "a type change",
                json!({"code": 1}),
                json!({"code": "1"}),
                Some(r#"rule code-immutable: spec.code cannot change (was 1, now "1")"#),
            ),
        ];
        for (what, before, after, denied) in cases {
            let old = todo("first", before);
            let new = todo("first", after);
            let d = run(
                vec![immutable(
                    "code-immutable",
                    &["spec.code", "spec.owner.team"],
                )],
                update(&old, &new),
                &Cache(vec![]),
                &Memory::default(),
                &allow_all(),
            );
            match denied {
                None => assert!(d.allowed, "{what}: {d:?}"),
                Some(m) => assert_eq!(d.message, m, "{what}"),
            }
        }
        // Not checked on create.
        let o = todo("first", json!({"code": "A-1"}));
        let d = run(
            vec![immutable("code-immutable", &["spec.code"])],
            create(&o),
            &Cache(vec![]),
            &Memory::default(),
            &allow_all(),
        );
        assert!(d.allowed);
    }

    #[test]
    fn max_count_table() {
        let stored: Vec<DynamicObject> = (0..3)
            .map(|i| todo(&format!("t{i}"), json!({"code": i})))
            .collect();
        let mut other_ns = todo("elsewhere", json!({}));
        other_ns.metadata.namespace = Some("other".into());
        let cases: Vec<(&str, i64, Vec<DynamicObject>, bool)> = vec![
            ("below the limit", 4, stored.clone(), true),
            ("at the limit", 3, stored.clone(), false),
            ("zero allows none", 0, vec![], false),
            ("other namespaces do not count", 1, vec![other_ns], true),
        ];
        for (what, max, cache, allowed) in cases {
            let o = todo("new", json!({"code": "n"}));
            let d = run(
                vec![max_count("at-most", max)],
                create(&o),
                &Cache(cache),
                &Memory::default(),
                &allow_all(),
            );
            assert_eq!(d.allowed, allowed, "{what}: {d:?}");
        }
        let d = run(
            vec![max_count("at-most-3", 3)],
            create(&todo("new", json!({}))),
            &Cache(stored.clone()),
            &Memory::default(),
            &allow_all(),
        );
        assert_eq!(
            d.message,
            "rule at-most-3: at most 3 todos per namespace, and shop already has 3"
        );
        // Updates are not counted.
        let old = stored[0].clone();
        let new = todo("t0", json!({"code": "changed"}));
        let d = run(
            vec![max_count("at-most-3", 3)],
            update(&old, &new),
            &Cache(stored),
            &Memory::default(),
            &allow_all(),
        );
        assert!(d.allowed);
    }

    #[test]
    fn external_table() {
        // (what, failOpen, answer, denial, warnings)
        type Case<'a> = (&'a str, bool, ExternalAnswer, Option<&'a str>, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            (
                "allowed",
                false,
                ExternalAnswer::Allowed {
                    warnings: vec!["fyi".into()],
                },
                None,
                vec!["fyi"],
            ),
            (
                "denied with a message",
                false,
                ExternalAnswer::Denied {
                    message: "code A-1 is reserved".into(),
                    warnings: vec![],
                },
                Some("rule app-says-ok: code A-1 is reserved"),
                vec![],
            ),
            (
                "denied without a message",
                false,
                ExternalAnswer::Denied {
                    message: " ".into(),
                    warnings: vec![],
                },
                Some("rule app-says-ok: denied by http://app.shop.svc/validate"),
                vec![],
            ),
            (
                "timeout, fail closed",
                false,
                ExternalAnswer::Unavailable("did not answer within 2s".into()),
                Some("rule app-says-ok: http://app.shop.svc/validate did not answer within 2s"),
                vec![],
            ),
            (
                "timeout, fail open",
                true,
                ExternalAnswer::Unavailable("did not answer within 2s".into()),
                None,
                vec![
                    "rule app-says-ok: http://app.shop.svc/validate did not answer within 2s; admitted because the rule fails open",
                ],
            ),
            (
                "a 404 denies even when failing open",
                true,
                ExternalAnswer::Invalid("answered 404 Not Found".into()),
                Some("rule app-says-ok: http://app.shop.svc/validate answered 404 Not Found"),
                vec![],
            ),
        ];
        for (what, fail_open, answer, denied, warnings) in cases {
            let o = todo("first", json!({"code": "A-1"}));
            let app = App::answering(answer);
            let d = run(
                vec![external("app-says-ok", fail_open)],
                create(&o),
                &Cache(vec![]),
                &Memory::default(),
                &app,
            );
            match denied {
                None => assert!(d.allowed, "{what}: {d:?}"),
                Some(m) => assert_eq!(d.message, m, "{what}"),
            }
            assert_eq!(d.warnings, warnings, "{what}");
        }
    }

    #[test]
    fn external_rules_see_the_request_and_skip_metadata_only_updates() {
        let old = todo("first", json!({"code": "A-1"}));
        let mut relabelled = old.clone();
        relabelled.metadata.labels = Some(BTreeMap::from([("a".into(), "b".into())]));
        let app = allow_all();
        let rules = || vec![external("app-says-ok", false)];
        run(
            rules(),
            update(&old, &relabelled),
            &Cache(vec![]),
            &Memory::default(),
            &app,
        );
        assert_eq!(app.asked(), 0, "metadata-only update");

        let changed = todo("first", json!({"code": "A-1", "message": "new"}));
        run(
            rules(),
            update(&old, &changed),
            &Cache(vec![]),
            &Memory::default(),
            &app,
        );
        assert_eq!(app.asked(), 1);
        let payload = app.1.lock().unwrap()[0].clone();
        assert_eq!(payload["rule"], "app-says-ok");
        assert_eq!(payload["operation"], "UPDATE");
        assert_eq!(payload["namespace"], "shop");
        assert_eq!(payload["name"], "first");
        assert_eq!(payload["object"]["spec"]["message"], "new");
        assert_eq!(payload["oldObject"]["spec"]["code"], "A-1");

        let delete = Admission {
            operation: Operation::Delete,
            namespace: "shop",
            name: "first",
            object: None,
            old_object: Some(&old),
            dry_run: false,
        };
        let d = run(rules(), delete, &Cache(vec![]), &Memory::default(), &app);
        assert!(d.allowed);
        assert_eq!(app.asked(), 1, "deletes are never sent to the application");
    }

    #[test]
    fn rules_apply_in_order_and_the_first_failure_is_named() {
        let old = todo("first", json!({"code": "A-1"}));
        let new = todo("first", json!({"code": "A-2"}));
        let app = App::answering(ExternalAnswer::Denied {
            message: "no".into(),
            warnings: vec![],
        });
        let d = run(
            vec![
                immutable("code-immutable", &["spec.code"]),
                external("app-says-ok", false),
            ],
            update(&old, &new),
            &Cache(vec![]),
            &Memory::default(),
            &app,
        );
        assert_eq!(d.rule.as_deref(), Some("code-immutable"));
        assert_eq!(app.asked(), 0, "later rules are not evaluated");
    }

    #[test]
    fn field_paths() {
        let o = todo(
            "x",
            json!({"code": "A", "nested": {"deep": {"v": 3}}, "empty": null, "list": [1]}),
        );
        assert_eq!(field(&o, "spec.code"), Some(&json!("A")));
        assert_eq!(field(&o, "spec.nested.deep.v"), Some(&json!(3)));
        assert_eq!(field(&o, "spec.empty"), None);
        assert_eq!(field(&o, "spec.missing"), None);
        assert_eq!(field(&o, "spec.code.more"), None);
        assert_eq!(field(&o, "spec.list.0"), None);
        assert_eq!(
            describe_values(&["spec.a".into(), "spec.b".into()], &[json!("x"), json!(2)]),
            r#"spec.a "x", spec.b 2"#
        );
        let long = json!("y".repeat(300));
        assert!(shown(&long).chars().count() <= 101);
    }
}
