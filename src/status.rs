//! Status of a KabStack as a pure function of what the reconcile did and what the watches observe.
//!
//! Deterministic: conditions come in a fixed order, components sorted; a condition's
//! `lastTransitionTime` moves only when its status changes, so recomputing an unchanged state gives
//! an equal status and the operator skips the write.

use crate::api::{BrokerMode, CertificateStatus, ComponentStatus, KabStack, KabStackStatus, Phase};
use crate::render::Step;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Condition types, in the order they appear in status.
pub const CONDITION_TYPES: [&str; 8] = [
    "Ready",
    "Reconciled",
    "EntityAPIReady",
    "WebhookReady",
    "ControllerReady",
    "BrokerReady",
    "CertificateValid",
    "Paused",
];

/// Kind of the status row of the dry-run admission probe.
pub const PROBE_KIND: &str = "AdmissionProbe";

/// What the reconcile did with the stack this time.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Everything desired was applied (the registration maybe still waiting on the webhook).
    Applied,
    /// `spec.paused`: nothing was written.
    Paused,
    /// The spec is invalid; nothing was written. The message names the fields.
    InvalidSpec(String),
    /// The entity API is declared differently by another stack, or exists unmanaged.
    Conflict(String),
    /// A template could not be rendered (e.g. a broken override).
    RenderFailed(String),
    /// Applying a child failed (transient); the message names the step and the object.
    ApplyFailed(String),
}

/// What the watches say about one desired child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The apply step the child belongs to.
    pub step: Step,
    /// Kind of the child.
    pub kind: String,
    /// `namespace/name`, or `name` when cluster-scoped.
    pub name: String,
    /// Ready (exists; workloads available; CRD established).
    pub ready: bool,
    /// Something is failing (crash loop, deadline exceeded), not merely in progress.
    pub failing: bool,
    /// What the child is doing or what blocks it.
    pub message: String,
}

/// The certificate facts status reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFacts {
    /// Expiry of the serving certificate.
    pub not_after: Timestamp,
    /// When kab renews it.
    pub renew_at: Timestamp,
}

/// Everything status is computed from.
pub struct Input<'a> {
    /// The stack, with its current status (for transition times).
    pub stack: &'a KabStack,
    /// What the reconcile did.
    pub outcome: &'a Outcome,
    /// One row per desired child.
    pub children: &'a [Observed],
    /// The webhook's serving certificate, when issued.
    pub cert: Option<&'a CertFacts>,
    /// The entity API served, `<plural>.<group>`.
    pub entity: Option<String>,
    /// Now, injected.
    pub now: Timestamp,
}

struct Cond {
    type_: &'static str,
    ok: bool,
    reason: String,
    message: String,
}

fn cond(type_: &'static str, ok: bool, reason: &str, message: impl Into<String>) -> Cond {
    Cond {
        type_,
        ok,
        reason: reason.to_string(),
        message: message.into(),
    }
}

/// Readiness of the rows of one step: `(ready, reason, message)` naming the first blocker.
fn step_state(children: &[Observed], step: Step, what: &str) -> (bool, String, String) {
    let rows: Vec<&Observed> = children.iter().filter(|c| c.step == step).collect();
    if rows.is_empty() {
        return (
            false,
            "NotRendered".into(),
            format!("no {what} is rendered for this stack"),
        );
    }
    if let Some(r) = rows.iter().find(|r| r.failing) {
        return (
            false,
            "Failing".into(),
            format!("{} {}: {}", r.kind, r.name, r.message),
        );
    }
    if let Some(r) = rows.iter().find(|r| !r.ready) {
        return (
            false,
            "Progressing".into(),
            format!("{} {}: {}", r.kind, r.name, r.message),
        );
    }
    let names: Vec<String> = rows
        .iter()
        .map(|r| format!("{} {}", r.kind, r.name))
        .collect();
    (true, "Ready".into(), format!("{} ready", names.join(", ")))
}

/// Computes the whole status. Pure.
pub fn compute(input: &Input<'_>) -> KabStackStatus {
    let stack = input.stack;
    let spec = &stack.spec;
    let deleting = stack.metadata.deletion_timestamp.is_some();
    let mut conds: Vec<Cond> = Vec::with_capacity(CONDITION_TYPES.len());

    let (reconciled_ok, rec_reason, rec_msg) = match input.outcome {
        Outcome::Applied => (
            true,
            "Applied",
            "every desired child is applied".to_string(),
        ),
        Outcome::Paused => (
            false,
            "Paused",
            "spec.paused is true: kab makes no change".to_string(),
        ),
        Outcome::InvalidSpec(m) => (false, "InvalidSpec", m.clone()),
        Outcome::Conflict(m) => (false, "Conflict", m.clone()),
        Outcome::RenderFailed(m) => (false, "RenderFailed", m.clone()),
        Outcome::ApplyFailed(m) => (false, "ApplyFailed", m.clone()),
    };

    // Entity API.
    let entity = match input.outcome {
        Outcome::Conflict(m) => cond("EntityAPIReady", false, "Conflict", m.clone()),
        _ => {
            let (ok, reason, msg) = step_state(input.children, Step::EntityApi, "entity API");
            cond("EntityAPIReady", ok, &reason, msg)
        }
    };

    // Webhook: workload and registration.
    let webhook = {
        let (ok, reason, msg) = step_state(input.children, Step::Webhook, "webhook");
        if !ok {
            cond("WebhookReady", false, &reason, msg)
        } else {
            let (rok, rreason, rmsg) =
                step_state(input.children, Step::Registration, "webhook registration");
            let probe_blocks = input
                .children
                .iter()
                .any(|c| c.step == Step::Registration && c.kind == PROBE_KIND && !c.ready);
            if rok {
                cond("WebhookReady", true, "Ready", format!("{msg}; {rmsg}"))
            } else if probe_blocks && rreason != "Failing" {
                cond("WebhookReady", false, "ProbeFailed", rmsg)
            } else {
                cond(
                    "WebhookReady",
                    false,
                    if rreason == "Failing" {
                        "Failing"
                    } else {
                        "RegistrationPending"
                    },
                    rmsg,
                )
            }
        }
    };

    let controller = {
        let (ok, reason, msg) = step_state(input.children, Step::Controller, "entity controller");
        cond("ControllerReady", ok, &reason, msg)
    };

    let broker = match spec.broker.mode {
        BrokerMode::None => cond(
            "BrokerReady",
            true,
            "Disabled",
            "broker.mode is None: entity changes are not published",
        ),
        BrokerMode::External => cond(
            "BrokerReady",
            true,
            "External",
            format!(
                "using the external broker {}",
                spec.broker.url.as_deref().unwrap_or("(no url)")
            ),
        ),
        BrokerMode::Managed => {
            let (ok, reason, msg) = step_state(input.children, Step::Broker, "broker");
            cond("BrokerReady", ok, &reason, msg)
        }
    };

    let certificate = match input.cert {
        None => cond(
            "CertificateValid",
            false,
            "NotIssued",
            "the webhook's serving certificate is not issued yet",
        ),
        Some(c) if input.now >= c.not_after => cond(
            "CertificateValid",
            false,
            "Expired",
            format!(
                "the webhook's serving certificate expired at {}",
                c.not_after
            ),
        ),
        Some(c) => cond(
            "CertificateValid",
            true,
            "Valid",
            format!("valid until {}, renewed at {}", c.not_after, c.renew_at),
        ),
    };

    let paused = if spec.paused {
        cond(
            "Paused",
            true,
            "Paused",
            "spec.paused is true: kab reports status only",
        )
    } else {
        cond("Paused", false, "Active", "kab reconciles this stack")
    };

    let parts = [&entity, &webhook, &controller, &broker, &certificate];
    let ready = if !reconciled_ok {
        cond("Ready", false, rec_reason, rec_msg.clone())
    } else if let Some(blocker) = parts.iter().find(|c| !c.ok) {
        cond(
            "Ready",
            false,
            &format!(
                "{}NotReady",
                blocker
                    .type_
                    .trim_end_matches("Ready")
                    .trim_end_matches("Valid")
            ),
            blocker.message.clone(),
        )
    } else {
        cond("Ready", true, "Ready", "every part of the stack is ready")
    };

    let any_failing = input.children.iter().any(|c| c.failing);
    let phase = if deleting {
        Phase::Deleting
    } else if spec.paused {
        Phase::Paused
    } else if matches!(
        input.outcome,
        Outcome::InvalidSpec(_) | Outcome::Conflict(_) | Outcome::RenderFailed(_)
    ) {
        Phase::Failed
    } else if ready.ok {
        Phase::Ready
    } else if any_failing
        || matches!(input.outcome, Outcome::ApplyFailed(_))
        || certificate.reason == "Expired"
    {
        Phase::Degraded
    } else {
        Phase::Progressing
    };

    conds.push(ready);
    conds.push(cond("Reconciled", reconciled_ok, rec_reason, rec_msg));
    conds.push(entity);
    conds.push(webhook);
    conds.push(controller);
    conds.push(broker);
    conds.push(certificate);
    conds.push(paused);

    let old = stack
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let generation = stack.metadata.generation;
    let conditions = conds
        .into_iter()
        .map(|c| to_condition(c, old, generation, input.now))
        .collect();

    let mut components: Vec<(Step, ComponentStatus)> = input
        .children
        .iter()
        .map(|c| {
            (
                c.step,
                ComponentStatus {
                    kind: c.kind.clone(),
                    name: c.name.clone(),
                    ready: c.ready,
                    message: c.message.clone(),
                },
            )
        })
        .collect();
    components.sort_by(|a, b| (a.0, &a.1.kind, &a.1.name).cmp(&(b.0, &b.1.kind, &b.1.name)));

    KabStackStatus {
        observed_generation: generation,
        phase: Some(phase),
        entity: input.entity.clone(),
        conditions,
        components: components.into_iter().map(|(_, c)| c).collect(),
        certificate: input.cert.map(|c| CertificateStatus {
            not_after: c.not_after.to_string(),
            renew_at: c.renew_at.to_string(),
        }),
    }
}

/// Whether going from `old` to `new` only reports progress inside one rollout: the same
/// generation, Progressing before and after, Ready False in both. Such a status may wait (the
/// operator paces these writes); the first status of a generation, Ready, Degraded and Failed
/// never wait.
pub fn progress_only(old: &KabStackStatus, new: &KabStackStatus) -> bool {
    let ready_false =
        |s: &KabStackStatus| condition(s, "Ready").is_some_and(|c| c.status == "False");
    old.observed_generation == new.observed_generation
        && old.phase == Some(Phase::Progressing)
        && new.phase == Some(Phase::Progressing)
        && ready_false(old)
        && ready_false(new)
}

fn to_condition(c: Cond, old: &[Condition], generation: Option<i64>, now: Timestamp) -> Condition {
    let status = if c.ok { "True" } else { "False" }.to_string();
    let last_transition_time = old
        .iter()
        .find(|o| o.type_ == c.type_ && o.status == status)
        .map(|o| o.last_transition_time.clone())
        .unwrap_or_else(|| Time(truncate_to_seconds(now)));
    Condition {
        type_: c.type_.to_string(),
        status,
        reason: c.reason,
        message: c.message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// metav1.Time has second precision on the wire: truncating keeps a recomputed status equal to
/// the one read back.
fn truncate_to_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// The condition of a given type, if present.
pub fn condition<'a>(status: &'a KabStackStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::KabStackSpec;

    fn stack(yaml_spec: serde_json::Value) -> KabStack {
        let spec: KabStackSpec = serde_json::from_value(yaml_spec).unwrap();
        let mut s = KabStack::new("todo", spec);
        s.metadata.namespace = Some("shop".into());
        s.metadata.generation = Some(3);
        s
    }

    fn todo() -> KabStack {
        stack(serde_json::json!({
            "entity": {"group": "todo.example.com", "kind": "Todo",
                       "versions": [{"name": "v1", "schema": {"type": "object"}}]}
        }))
    }

    fn row(
        step: Step,
        kind: &str,
        name: &str,
        ready: bool,
        failing: bool,
        message: &str,
    ) -> Observed {
        Observed {
            step,
            kind: kind.into(),
            name: name.into(),
            ready,
            failing,
            message: message.into(),
        }
    }

    fn all_ready() -> Vec<Observed> {
        vec![
            row(
                Step::EntityApi,
                "CustomResourceDefinition",
                "todos.todo.example.com",
                true,
                false,
                "Established",
            ),
            row(
                Step::Webhook,
                "Deployment",
                "shop/todo-webhook",
                true,
                false,
                "2/2 available",
            ),
            row(
                Step::Registration,
                "ValidatingWebhookConfiguration",
                "todo.shop.kab.dev",
                true,
                false,
                "registered",
            ),
            row(
                Step::Controller,
                "Deployment",
                "shop/todo-controller",
                true,
                false,
                "1/1 available",
            ),
            row(
                Step::Broker,
                "StatefulSet",
                "shop/todo-broker",
                true,
                false,
                "1/1 ready",
            ),
        ]
    }

    fn now() -> Timestamp {
        "2026-11-27T12:00:00Z".parse().unwrap()
    }

    fn cert() -> CertFacts {
        CertFacts {
            not_after: "2027-02-25T12:00:00Z".parse().unwrap(),
            renew_at: "2027-01-26T12:00:00Z".parse().unwrap(),
        }
    }

    fn compute_for(
        s: &KabStack,
        outcome: Outcome,
        children: &[Observed],
        cert: Option<&CertFacts>,
        at: Timestamp,
    ) -> KabStackStatus {
        compute(&Input {
            stack: s,
            outcome: &outcome,
            children,
            cert,
            entity: Some("todos.todo.example.com".into()),
            now: at,
        })
    }

    #[test]
    fn every_part_ready_makes_the_stack_ready() {
        let s = todo();
        let st = compute_for(&s, Outcome::Applied, &all_ready(), Some(&cert()), now());
        assert_eq!(st.phase, Some(Phase::Ready));
        let types: Vec<&str> = st.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, CONDITION_TYPES);
        assert_eq!(condition(&st, "Ready").unwrap().status, "True");
        assert_eq!(condition(&st, "Paused").unwrap().status, "False");
        assert_eq!(st.observed_generation, Some(3));
    }

    #[test]
    fn a_crash_looping_webhook_degrades_the_stack_and_is_named() {
        let s = todo();
        let mut rows = all_ready();
        rows[1] = row(
            Step::Webhook,
            "Deployment",
            "shop/todo-webhook",
            false,
            true,
            "0/2 available: pod todo-webhook-abc CrashLoopBackOff (3 restarts)",
        );
        let st = compute_for(&s, Outcome::Applied, &rows, Some(&cert()), now());
        assert_eq!(st.phase, Some(Phase::Degraded));
        let ready = condition(&st, "Ready").unwrap();
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, "WebhookNotReady");
        assert!(
            ready.message.contains("shop/todo-webhook"),
            "{}",
            ready.message
        );
        assert!(ready.message.contains("CrashLoopBackOff"));
        let row = st
            .components
            .iter()
            .find(|c| c.name == "shop/todo-webhook")
            .unwrap();
        assert!(!row.ready);
    }

    #[test]
    fn invalid_spec_fails_with_the_message_and_waits() {
        let s = todo();
        let st = compute_for(
            &s,
            Outcome::InvalidSpec(
                "spec.rules[0].unique.fields[0]: spec.nope is not in the schema".into(),
            ),
            &[],
            None,
            now(),
        );
        assert_eq!(st.phase, Some(Phase::Failed));
        let rec = condition(&st, "Reconciled").unwrap();
        assert_eq!(
            (rec.status.as_str(), rec.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert!(rec.message.contains("spec.rules[0]"));
    }

    #[test]
    fn transition_time_moves_only_on_transition() {
        let mut s = todo();
        let first = compute_for(&s, Outcome::Applied, &all_ready(), Some(&cert()), now());
        s.status = Some(first.clone());
        let later: Timestamp = "2026-11-27T12:05:00Z".parse().unwrap();
        let again = compute_for(&s, Outcome::Applied, &all_ready(), Some(&cert()), later);
        assert_eq!(
            first, again,
            "an unchanged state must give an equal status (no write)"
        );

        let mut rows = all_ready();
        rows[3].ready = false;
        rows[3].message = "0/1 available".into();
        let changed = compute_for(&s, Outcome::Applied, &rows, Some(&cert()), later);
        let ctl = condition(&changed, "ControllerReady").unwrap();
        assert_eq!(ctl.last_transition_time.0, later);
        let ent = condition(&changed, "EntityAPIReady").unwrap();
        assert_eq!(ent.last_transition_time.0, now());
    }

    #[test]
    fn only_progress_inside_one_rollout_may_wait() {
        let mut s = todo();
        let mut rows = all_ready();
        rows[3].ready = false;
        rows[3].message = "0/1 available".into();
        let first = compute_for(&s, Outcome::Applied, &rows, Some(&cert()), now());
        assert_eq!(first.phase, Some(Phase::Progressing));
        s.status = Some(first.clone());

        rows[3].message = "0/1 available: rollout not observed yet".into();
        let progress = compute_for(&s, Outcome::Applied, &rows, Some(&cert()), now());
        assert!(
            progress_only(&first, &progress),
            "a new message within Progressing"
        );

        let ready = compute_for(&s, Outcome::Applied, &all_ready(), Some(&cert()), now());
        assert!(!progress_only(&first, &ready), "Ready never waits");

        rows[3].failing = true;
        let degraded = compute_for(&s, Outcome::Applied, &rows, Some(&cert()), now());
        assert_eq!(degraded.phase, Some(Phase::Degraded));
        assert!(!progress_only(&first, &degraded), "Degraded never waits");

        let mut next_generation = progress.clone();
        next_generation.observed_generation = Some(first.observed_generation.unwrap_or(0) + 1);
        assert!(
            !progress_only(&first, &next_generation),
            "the first status of a generation never waits"
        );
    }

    #[test]
    fn registration_waits_for_the_webhook() {
        let s = todo();
        let mut rows = all_ready();
        rows.retain(|r| r.step != Step::Registration);
        rows.push(row(
            Step::Registration,
            "ValidatingWebhookConfiguration",
            "todo.shop.kab.dev",
            false,
            false,
            "waits for the webhook to be available",
        ));
        let st = compute_for(&s, Outcome::Applied, &rows, Some(&cert()), now());
        let wh = condition(&st, "WebhookReady").unwrap();
        assert_eq!(
            (wh.status.as_str(), wh.reason.as_str()),
            ("False", "RegistrationPending")
        );
        assert_eq!(st.phase, Some(Phase::Progressing));
    }

    #[test]
    fn no_broker_is_reported_not_hidden() {
        let s = stack(serde_json::json!({
            "entity": {"group": "todo.example.com", "kind": "Todo",
                       "versions": [{"name": "v1", "schema": {"type": "object"}}]},
            "broker": {"mode": "None"}
        }));
        let rows: Vec<Observed> = all_ready()
            .into_iter()
            .filter(|r| r.step != Step::Broker)
            .collect();
        let st = compute_for(&s, Outcome::Applied, &rows, Some(&cert()), now());
        let b = condition(&st, "BrokerReady").unwrap();
        assert_eq!(b.reason, "Disabled");
        assert!(b.message.contains("not published"));
        assert_eq!(st.phase, Some(Phase::Ready));
    }

    #[test]
    fn paused_and_deleting_phases() {
        let mut s = todo();
        s.spec.paused = true;
        let st = compute_for(&s, Outcome::Paused, &all_ready(), Some(&cert()), now());
        assert_eq!(st.phase, Some(Phase::Paused));
        assert_eq!(condition(&st, "Paused").unwrap().status, "True");
        s.spec.paused = false;
        s.metadata.deletion_timestamp = Some(Time(now()));
        let st = compute_for(&s, Outcome::Applied, &all_ready(), Some(&cert()), now());
        assert_eq!(st.phase, Some(Phase::Deleting));
    }

    #[test]
    fn expired_certificate_degrades() {
        let s = todo();
        let late: Timestamp = "2027-03-01T00:00:00Z".parse().unwrap();
        let st = compute_for(&s, Outcome::Applied, &all_ready(), Some(&cert()), late);
        assert_eq!(
            condition(&st, "CertificateValid").unwrap().reason,
            "Expired"
        );
        assert_eq!(st.phase, Some(Phase::Degraded));
    }
}
