//! Unique-value claims as `coordination.k8s.io` Leases (see the [module design](super)).
//!
//! A claim is the Lease `<stack>-u-<sha256 prefix of (rule, values)>` in the stack's namespace,
//! labelled for the stack, with `spec.holderIdentity` = the entity's name and
//! `spec.acquireTime` = when it was claimed. Creating it is the atomic step: the API server
//! lets exactly one POST of a name succeed. [`judge`] decides what an existing claim means for
//! somebody else who wants the value.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::core::DynamicObject;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::engine::{Claim, ClaimOutcome, Claims, describe_values, values_of};
use super::metrics::Metrics;
use crate::api::BusinessRule;
use crate::render::{
    KAB, LABEL_COMPONENT, LABEL_MANAGED_BY, LABEL_PART_OF, LABEL_STACK, LABEL_STACK_NAMESPACE,
};

/// `app.kubernetes.io/component` of claim Leases (the operator never prunes them).
pub const CLAIM_COMPONENT: &str = "webhook-claim";
/// Label naming the unique rule of a claim.
pub const LABEL_RULE: &str = "kab.dev/rule";
/// Annotation showing the claimed values to people (`spec.code="A-1"`).
pub const ANNOTATION_VALUES: &str = "kab.dev/claimed-values";
/// Default time a claim whose holder is not stored is considered in flight.
///
/// A claim is taken during admission; the entity is stored after every webhook admitted it,
/// and the API server gives up on a request after at most 60 s (its default request
/// timeout). After that, a claim whose holder is not stored (or no longer has the values)
/// belongs to a write that failed.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);
/// Deadline of one API call made while answering an admission request.
const CALL_TIMEOUT: Duration = Duration::from_secs(4);
/// How often a contended claim is retried (a claim deleted or taken over between our reads).
const ATTEMPTS: usize = 4;

/// The name of the claim Lease of `values` under `rule` in `stack`.
pub fn claim_name(stack: &str, rule: &str, values: &[Value]) -> String {
    let mut hash = Sha256::new();
    hash.update(rule.as_bytes());
    hash.update([0]);
    hash.update(Value::from(values.to_vec()).to_string().as_bytes());
    let digest = hash.finalize();
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{stack}-u-{hex}")
}

/// What a direct read of the claim's holder shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HolderState {
    /// Stored, with the claimed values (also while it is being deleted).
    Holds,
    /// Stored, with other values.
    Moved,
    /// Not stored.
    Absent,
}

/// What an existing claim, held by another entity, means for a new claimant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The holder has the values: the value is taken.
    Held,
    /// The holder does not have them (yet), and claimed less than `grace` ago: its write may
    /// still be on its way. Deny, ask to retry.
    InFlight(Duration),
    /// The holder verifiably does not have them, and the claim is older than `grace`: the write
    /// that claimed it failed or moved on. The claim may be taken over.
    Stale,
}

/// The pure decision about someone else's claim. `acquired` is the claim's
/// `spec.acquireTime` (a missing time counts as old; a time in the future, from a skewed
/// clock, counts as now).
pub fn judge(
    holder: HolderState,
    acquired: Option<Timestamp>,
    now: Timestamp,
    grace: Duration,
) -> Verdict {
    if holder == HolderState::Holds {
        return Verdict::Held;
    }
    let Some(acquired) = acquired else {
        return Verdict::Stale;
    };
    let age = now
        .duration_since(acquired)
        .try_into()
        .unwrap_or(Duration::ZERO);
    if age > grace {
        Verdict::Stale
    } else {
        Verdict::InFlight(age)
    }
}

/// Claims in Leases of the stack's namespace.
#[derive(Clone)]
pub struct LeaseClaims {
    leases: Api<Lease>,
    entities: Api<DynamicObject>,
    stack: String,
    namespace: String,
    grace: Duration,
    metrics: std::sync::Arc<Metrics>,
    owner: Option<OwnerReference>,
}

/// Why a claim could not be read or written. A request whose claim fails is denied with this
/// message (fail closed).
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The API server refused or failed a call.
    #[error("{doing}: {source}")]
    Api {
        /// What was being done (`reading claim Lease <name>`).
        doing: String,
        /// What the client or the API server said.
        #[source]
        source: kube::Error,
    },
    /// The API server did not answer a call within [`CALL_TIMEOUT`].
    #[error("{doing}: the API server did not answer within {}s", CALL_TIMEOUT.as_secs())]
    Timeout {
        /// What was being done.
        doing: String,
    },
    /// The claim Lease changed between our read and our write, [`ATTEMPTS`] times in a row.
    #[error("claim Lease {name} changed under us {ATTEMPTS} times")]
    Contended {
        /// The Lease.
        name: String,
    },
}

impl ClaimError {
    /// The HTTP status of the API server's refusal, if it refused.
    fn status(&self) -> Option<u16> {
        match self {
            ClaimError::Api {
                source: kube::Error::Api(status),
                ..
            } => Some(status.code),
            _ => None,
        }
    }
}

enum Read<T> {
    Found(T),
    Missing,
}

/// One API call within [`CALL_TIMEOUT`]; `doing` names it in the error.
async fn call<T>(
    doing: impl FnOnce() -> String,
    fut: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, ClaimError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(ClaimError::Api {
            doing: doing(),
            source,
        }),
        Err(_) => Err(ClaimError::Timeout { doing: doing() }),
    }
}

impl LeaseClaims {
    /// Claims of `stack` in `namespace`; `entities` reads the holders directly (not the cache).
    pub fn new(
        client: kube::Client,
        entities: Api<DynamicObject>,
        stack: &str,
        namespace: &str,
        grace: Duration,
        metrics: std::sync::Arc<Metrics>,
    ) -> Self {
        LeaseClaims {
            leases: Api::namespaced(client, namespace),
            entities,
            stack: stack.to_owned(),
            namespace: namespace.to_owned(),
            grace,
            metrics,
            owner: None,
        }
    }

    /// Claims owned by the KabStack (an owner reference), so that Kubernetes garbage-collects
    /// them with the stack.
    pub fn owned_by(mut self, owner: Option<OwnerReference>) -> Self {
        self.owner = owner;
        self
    }

    /// Labels of every claim of the stack.
    pub fn labels(stack: &str, namespace: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_MANAGED_BY.to_owned(), KAB.to_owned()),
            (LABEL_PART_OF.to_owned(), KAB.to_owned()),
            (LABEL_COMPONENT.to_owned(), CLAIM_COMPONENT.to_owned()),
            (LABEL_STACK.to_owned(), stack.to_owned()),
            (LABEL_STACK_NAMESPACE.to_owned(), namespace.to_owned()),
        ])
    }

    /// Label selector of every claim of the stack.
    pub fn selector(stack: &str, namespace: &str) -> String {
        Self::labels(stack, namespace)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn name(&self, claim: &Claim) -> String {
        claim_name(&self.stack, &claim.rule, &claim.values)
    }

    fn lease(&self, claim: &Claim, now: Timestamp) -> Lease {
        let mut labels = Self::labels(&self.stack, &self.namespace);
        labels.insert(LABEL_RULE.to_owned(), claim.rule.clone());
        let mut shown = describe_values(&claim.fields, &claim.values);
        if shown.len() > 1024 {
            let cut = (0..=1024)
                .rev()
                .find(|i| shown.is_char_boundary(*i))
                .unwrap_or(0);
            shown.truncate(cut);
        }
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name(claim)),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels),
                annotations: Some(BTreeMap::from([(ANNOTATION_VALUES.to_owned(), shown)])),
                owner_references: self.owner.clone().map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(claim.holder.clone()),
                acquire_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        }
    }

    async fn get_lease(&self, name: &str) -> Result<Read<Lease>, ClaimError> {
        match call(
            || format!("reading claim Lease {name}"),
            self.leases.get(name),
        )
        .await
        {
            Ok(l) => Ok(Read::Found(l)),
            Err(e) if e.status() == Some(404) => Ok(Read::Missing),
            Err(e) => Err(e),
        }
    }

    /// Reads the holder directly from the API server: the cache may lag behind a create that
    /// has just been stored.
    async fn holder_state(&self, holder: &str, claim: &Claim) -> Result<HolderState, ClaimError> {
        let read = call(
            || format!("reading the claim's holder {holder}"),
            self.entities.get(holder),
        )
        .await;
        match read {
            Ok(o) => Ok(
                if values_of(&o, &claim.fields).as_deref() == Some(&claim.values[..]) {
                    HolderState::Holds
                } else {
                    HolderState::Moved
                },
            ),
            Err(e) if e.status() == Some(404) => Ok(HolderState::Absent),
            Err(e) => Err(e),
        }
    }

    /// What `lease` means for `claim`: granted (ours, or stale), or not.
    async fn assess(&self, lease: &Lease, claim: &Claim) -> Result<Assessed, ClaimError> {
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.unwrap_or_default();
        if holder == claim.holder {
            return Ok(Assessed::Ours);
        }
        if holder.is_empty() {
            return Ok(Assessed::Stale);
        }
        let state = self.holder_state(&holder, claim).await?;
        Ok(
            match judge(
                state,
                spec.acquire_time.map(|t| t.0),
                Timestamp::now(),
                self.grace,
            ) {
                Verdict::Held => Assessed::Refused(ClaimOutcome::HeldBy(holder)),
                Verdict::InFlight(age) => Assessed::Refused(ClaimOutcome::Claiming { holder, age }),
                Verdict::Stale => Assessed::Stale,
            },
        )
    }

    /// Rewrites an existing claim for `claim.holder` (optimistic: fails with 409 when the
    /// Lease changed since it was read).
    async fn rewrite(
        &self,
        mut lease: Lease,
        claim: &Claim,
        takeover: bool,
    ) -> Result<bool, ClaimError> {
        let name = self.name(claim);
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        spec.holder_identity = Some(claim.holder.clone());
        spec.acquire_time = Some(MicroTime(Timestamp::now()));
        if takeover {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        let update = call(
            || format!("updating claim Lease {name}"),
            self.leases.replace(&name, &PostParams::default(), &lease),
        )
        .await;
        match update {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.status(), Some(409 | 404)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes `lease` if it is still the version that was read (uid and resourceVersion
    /// preconditions); `false` when it is gone already or has changed since.
    async fn delete_as_read(
        &self,
        lease: &Lease,
        doing: impl FnOnce() -> String,
    ) -> Result<bool, ClaimError> {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: lease.metadata.resource_version.clone(),
                uid: lease.metadata.uid.clone(),
            }),
            ..DeleteParams::default()
        };
        let name = lease.metadata.name.as_deref().unwrap_or_default();
        match call(doing, self.leases.delete(name, &dp)).await {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.status(), Some(404 | 409)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

enum Assessed {
    Ours,
    Stale,
    Refused(ClaimOutcome),
}

impl Claims for LeaseClaims {
    type Error = ClaimError;

    async fn check(&self, claim: &Claim) -> Result<ClaimOutcome, ClaimError> {
        let name = self.name(claim);
        match self.get_lease(&name).await? {
            Read::Missing => Ok(ClaimOutcome::Granted),
            Read::Found(lease) => Ok(match self.assess(&lease, claim).await? {
                Assessed::Ours | Assessed::Stale => ClaimOutcome::Granted,
                Assessed::Refused(outcome) => outcome,
            }),
        }
    }

    async fn acquire(&self, claim: &Claim) -> Result<ClaimOutcome, ClaimError> {
        let name = self.name(claim);
        for _ in 0..ATTEMPTS {
            let fresh = self.lease(claim, Timestamp::now());
            let create = call(
                || format!("creating claim Lease {name}"),
                self.leases.create(&PostParams::default(), &fresh),
            )
            .await;
            match create {
                Ok(_) => {
                    self.metrics.claim("acquired");
                    return Ok(ClaimOutcome::Granted);
                }
                Err(e) if e.status() == Some(409) => {}
                Err(e) => {
                    self.metrics.claim("error");
                    return Err(e);
                }
            }
            // Somebody holds it: whom, and is it real?
            let lease = match self.get_lease(&name).await? {
                Read::Found(l) => l,
                Read::Missing => continue, // released meanwhile: try again
            };
            match self.assess(&lease, claim).await? {
                Assessed::Refused(outcome) => {
                    self.metrics.claim(match outcome {
                        ClaimOutcome::Claiming { .. } => "in_flight",
                        _ => "conflict",
                    });
                    return Ok(outcome);
                }
                Assessed::Ours => {
                    if self.rewrite(lease, claim, false).await? {
                        self.metrics.claim("renewed");
                        return Ok(ClaimOutcome::Granted);
                    }
                }
                Assessed::Stale => {
                    if self.rewrite(lease, claim, true).await? {
                        tracing::info!(lease = %name, holder = %claim.holder, "took over a stale unique-value claim");
                        self.metrics.claim("taken_over");
                        return Ok(ClaimOutcome::Granted);
                    }
                }
            }
        }
        self.metrics.claim("error");
        Err(ClaimError::Contended { name })
    }

    async fn release(&self, claim: &Claim) {
        let name = self.name(claim);
        let lease = match self.get_lease(&name).await {
            Ok(Read::Found(l)) => l,
            Ok(Read::Missing) => return,
            Err(e) => {
                tracing::warn!("releasing a unique-value claim: {e}");
                return;
            }
        };
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref());
        if holder != Some(claim.holder.as_str()) {
            return;
        }
        match self
            .delete_as_read(&lease, || {
                format!("releasing unique-value claim Lease {name}")
            })
            .await
        {
            Ok(true) => self.metrics.claim("released"),
            Ok(false) => {}
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

/// Deletes claims nobody holds any more: the holder is not stored or has other values, and
/// the claim is older than the grace period (checked against the API server, not the cache).
/// Such claims come from writes that failed after admission, or releases that failed; they
/// would be taken over anyway — this only keeps the namespace tidy.
pub async fn collect_garbage(
    claims: &LeaseClaims,
    rules: &[BusinessRule],
) -> Result<usize, ClaimError> {
    let lp = ListParams::default()
        .labels(&LeaseClaims::selector(&claims.stack, &claims.namespace))
        .limit(500);
    let mut removed = 0;
    let mut continue_token: Option<String> = None;
    loop {
        let mut page = lp.clone();
        if let Some(token) = &continue_token {
            page = page.continue_token(token);
        }
        let list = call(
            || "listing claim Leases".to_owned(),
            claims.leases.list(&page),
        )
        .await?;
        for lease in &list.items {
            if collect_one(claims, rules, lease).await? {
                removed += 1;
            }
        }
        continue_token = list.metadata.continue_.filter(|t| !t.is_empty());
        if continue_token.is_none() {
            return Ok(removed);
        }
    }
}

async fn collect_one(
    claims: &LeaseClaims,
    rules: &[BusinessRule],
    lease: &Lease,
) -> Result<bool, ClaimError> {
    let Some(name) = lease.metadata.name.as_deref() else {
        return Ok(false);
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let acquired = spec.acquire_time.map(|t| t.0);
    let young = judge(
        HolderState::Absent,
        acquired,
        Timestamp::now(),
        claims.grace,
    ) != Verdict::Stale;
    if young {
        return Ok(false);
    }
    let holder = spec.holder_identity.unwrap_or_default();
    let rule = lease
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_RULE))
        .and_then(|r| rules.iter().find(|x| &x.name == r))
        .and_then(|r| r.unique.as_ref());
    let still_held = match (rule, holder.is_empty()) {
        (Some(unique), false) => {
            let read = call(
                || format!("reading the claim's holder {holder}"),
                claims.entities.get(&holder),
            )
            .await;
            match read {
                Ok(o) => values_of(&o, &unique.fields).is_some_and(|values| {
                    claim_name(&claims.stack, lease_rule(lease), &values) == name
                }),
                Err(e) if e.status() == Some(404) => false,
                Err(e) => return Err(e),
            }
        }
        // The rule is gone from the stack, or the claim has no holder.
        _ => false,
    };
    if still_held {
        return Ok(false);
    }
    let deleted = claims
        .delete_as_read(lease, || format!("deleting claim Lease {name}"))
        .await?;
    if deleted {
        tracing::info!(lease = %name, %holder, "removed a unique-value claim nobody holds");
        claims.metrics.claim("collected");
    }
    Ok(deleted)
}

fn lease_rule(lease: &Lease) -> &str {
    lease
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_RULE))
        .map(String::as_str)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn claim_names_are_stable_short_and_distinct() {
        let a = claim_name("todo", "unique-code", &[json!("A-1")]);
        assert_eq!(a, claim_name("todo", "unique-code", &[json!("A-1")]));
        assert!(a.starts_with("todo-u-"));
        assert_eq!(a.len(), "todo-u-".len() + 32);
        let distinct = [
            claim_name("todo", "unique-code", &[json!("A-2")]),
            claim_name("todo", "other-rule", &[json!("A-1")]),
            claim_name("other", "unique-code", &[json!("A-1")]),
            claim_name("todo", "unique-code", &[json!(1)]),
            claim_name("todo", "unique-code", &[json!("1")]),
            claim_name("todo", "unique-code", &[json!("A"), json!("-1")]),
        ];
        for d in distinct {
            assert_ne!(a, d);
        }
        // A 40-character stack name still gives a valid Lease name.
        let long = claim_name(&"s".repeat(40), "r", &[json!("x".repeat(10_000))]);
        assert!(long.len() <= 253);
    }

    #[test]
    fn judge_table() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let ago = |s: i64| Some(Timestamp::from_second(1_000_000 - s).unwrap());
        let grace = Duration::from_secs(60);
        use HolderState::*;
        let cases = [
            (
                "the holder is stored with the values",
                Holds,
                ago(3600),
                Verdict::Held,
            ),
            ("a fresh holder is stored", Holds, ago(1), Verdict::Held),
            (
                "not stored, claimed 5 s ago: in flight",
                Absent,
                ago(5),
                Verdict::InFlight(Duration::from_secs(5)),
            ),
            (
                "not stored, claimed exactly at the grace",
                Absent,
                ago(60),
                Verdict::InFlight(Duration::from_secs(60)),
            ),
            (
                "not stored, claimed 61 s ago: stale",
                Absent,
                ago(61),
                Verdict::Stale,
            ),
            (
                "moved to other values, fresh claim",
                Moved,
                ago(10),
                Verdict::InFlight(Duration::from_secs(10)),
            ),
            (
                "moved to other values long ago",
                Moved,
                ago(600),
                Verdict::Stale,
            ),
            ("no acquire time", Absent, None, Verdict::Stale),
            (
                "acquire time in the future (skew)",
                Absent,
                ago(-30),
                Verdict::InFlight(Duration::ZERO),
            ),
        ];
        for (what, holder, acquired, expected) in cases {
            assert_eq!(judge(holder, acquired, now, grace), expected, "{what}");
        }
    }

    #[test]
    fn claim_errors_name_the_call_and_keep_the_cause() {
        let refused = ClaimError::Api {
            doing: "creating claim Lease todo-u-1".into(),
            source: kube::Error::Api(
                kube::core::Status::failure("leases is forbidden", "Forbidden")
                    .with_code(403)
                    .boxed(),
            ),
        };
        assert_eq!(refused.status(), Some(403));
        let text = refused.to_string();
        assert!(
            text.starts_with("creating claim Lease todo-u-1: ") && text.contains("forbidden"),
            "{text}"
        );
        let cause = std::error::Error::source(&refused).map(|c| c.to_string());
        assert!(cause.is_some_and(|c| c.contains("leases is forbidden")));
        let slow = ClaimError::Timeout {
            doing: "reading claim Lease todo-u-1".into(),
        };
        assert_eq!(
            slow.to_string(),
            "reading claim Lease todo-u-1: the API server did not answer within 4s"
        );
        assert_eq!(slow.status(), None);
    }

    #[test]
    fn claims_are_labelled_for_the_stack_but_not_as_its_children() {
        let labels = LeaseClaims::labels("todo", "shop");
        assert_eq!(labels[LABEL_COMPONENT], CLAIM_COMPONENT);
        assert_eq!(labels[LABEL_STACK], "todo");
        assert_eq!(
            LeaseClaims::selector("todo", "shop"),
            "app.kubernetes.io/component=webhook-claim,app.kubernetes.io/managed-by=kab,app.kubernetes.io/part-of=kab,kab.dev/stack=todo,kab.dev/stack-namespace=shop"
        );
    }
}
