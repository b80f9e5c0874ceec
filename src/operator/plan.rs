//! The plan: which children to apply, when the certificate Secrets go, what to prune and when
//! to come back. Pure: a function of the outlines, what the caches show and what kab remembers;
//! no client, no clock. The driver gathers the [`Input`] from the caches and carries the [`Plan`]
//! out.

use super::memo::Applied;
use super::outline::Outline;
use crate::render::Step;
use k8s_openapi::jiff::Timestamp;
use std::collections::HashSet;
use std::time::Duration;

/// Kind of the webhook registration, the one cluster-scoped child that is pruned.
pub const REGISTRATION: &str = "ValidatingWebhookConfiguration";

/// A stack with nothing to wait for is looked at again after this long (no writes unless
/// something drifted; the watches report changes sooner).
pub const RESYNC: Duration = Duration::from_secs(600);
/// A failed admission probe is sent again after this long.
pub const PROBE_RETRY: Duration = Duration::from_secs(10);

/// A child labelled for the stack, as it exists in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Existing {
    /// Its kind.
    pub kind: &'static str,
    /// Its namespace (`None` when cluster-scoped).
    pub namespace: Option<String>,
    /// Its name.
    pub name: String,
}

/// What the certificate step did this time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Certificates {
    /// The stored certificates stay.
    Kept,
    /// New ones were issued (first issue or renewal) and must be stored.
    Issued,
}

/// Everything the plan is decided from.
pub struct Input<'a> {
    /// `spec.paused`: nothing is written.
    pub paused: bool,
    /// The stack's namespace.
    pub namespace: &'a str,
    /// The desired children.
    pub children: &'a [Outline],
    /// Per child (same order): the version the caches show, `None` when it does not exist.
    pub current: &'a [Option<String>],
    /// Per child: what kab last applied to it (and the version that produced).
    pub applied: &'a [Option<Applied>],
    /// The webhook Deployment has an available replica.
    pub webhook_available: bool,
    /// The webhook registration exists.
    pub registered: bool,
    /// Whether certificates were issued.
    pub certificates: Certificates,
    /// Names of the certificate Secrets (desired besides the rendered children).
    pub secret_names: [&'a str; 2],
    /// The children labelled for the stack that exist, when a prune is due; `None` when the last
    /// clean prune was for the same desired set.
    pub existing: Option<&'a [Existing]>,
}

/// When the certificate Secrets are applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Secrets {
    /// Not at all: they hold what is wanted.
    Unchanged,
    /// Together with the children (first issue: nothing reads them sooner).
    WithChildren,
    /// After the children: a rotation. The registration must trust the new CA before the webhook
    /// is handed a certificate that CA signed.
    AfterChildren,
}

/// What a reconcile writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Indexes (into [`Input::children`]) of the children to apply, at once.
    pub apply: Vec<usize>,
    /// When the certificate Secrets go.
    pub secrets: Secrets,
    /// Children to delete; `None` when no prune was due.
    pub prune: Option<Vec<Existing>>,
}

/// Decides what to write.
///
/// A child is applied when it does not exist, when what kab renders changed, or when the object
/// changed under kab (hand edit: another version than kab's apply produced). The registration
/// waits until the webhook serves, so a `Fail` policy never blocks writes on a webhook that is
/// not there yet; once registered it is kept up to date. A paused stack gets no writes.
pub fn plan(input: &Input<'_>) -> Plan {
    if input.paused {
        return Plan {
            apply: Vec::new(),
            secrets: Secrets::Unchanged,
            prune: None,
        };
    }
    let apply = input
        .children
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            c.step != Step::Registration || input.webhook_available || input.registered
        })
        .filter(|(i, c)| !unchanged(c, input.current[*i].as_deref(), input.applied[*i].as_ref()))
        .map(|(i, _)| i)
        .collect();
    let secrets = match (input.certificates, input.registered) {
        (Certificates::Kept, _) => Secrets::Unchanged,
        (Certificates::Issued, false) => Secrets::WithChildren,
        (Certificates::Issued, true) => Secrets::AfterChildren,
    };
    let prune = input.existing.map(|existing| doomed(input, existing));
    Plan {
        apply,
        secrets,
        prune,
    }
}

/// Whether the child is as kab last applied it: same rendered hash, and the cached object has
/// the version that apply produced.
fn unchanged(child: &Outline, current: Option<&str>, applied: Option<&Applied>) -> bool {
    match (current, applied) {
        (Some(current), Some(last)) => last.hash == child.hash && last.version == current,
        _ => false,
    }
}

/// The existing children that are no longer desired. Namespaced children count only in the
/// stack's namespace (a label is no proof of ownership elsewhere); the entity CRD is shared and
/// never pruned.
fn doomed(input: &Input<'_>, existing: &[Existing]) -> Vec<Existing> {
    let mut desired: HashSet<(&str, &str)> = input
        .children
        .iter()
        .map(|c| (c.kind, c.name.as_str()))
        .collect();
    for secret in input.secret_names {
        desired.insert(("Secret", secret));
    }
    let mut doomed: Vec<Existing> = existing
        .iter()
        .filter(|e| e.kind != "CustomResourceDefinition")
        .filter(|e| e.kind == REGISTRATION || e.namespace.as_deref() == Some(input.namespace))
        .filter(|e| !desired.contains(&(e.kind, e.name.as_str())))
        .cloned()
        .collect();
    doomed.sort();
    doomed
}

/// When to look at the stack again (`None`: when something changes). The soonest of: the
/// resync, a failed probe's retry, a deferred status write, the certificate renewal.
pub fn next_wakeup(
    paused: bool,
    now: Timestamp,
    renew_at: Option<Timestamp>,
    probe_failed: bool,
    status_deferred: Option<Duration>,
) -> Option<Duration> {
    if paused {
        return None;
    }
    let mut next = if probe_failed { PROBE_RETRY } else { RESYNC };
    if let Some(d) = status_deferred {
        next = next.min(d);
    }
    if let Some(renew_at) = renew_at {
        let until = renew_at.as_second() - now.as_second();
        next = if until > 0 {
            next.min(Duration::from_secs(until.unsigned_abs() + 1))
        } else {
            Duration::from_secs(1)
        };
    }
    Some(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const NS: &str = "shop";
    const SECRETS: [&str; 2] = ["todo-webhook-ca", "todo-webhook-tls"];

    fn child(step: Step, kind: &'static str, name: &str, hash: u64) -> Outline {
        let namespaced = kind != REGISTRATION && kind != "CustomResourceDefinition";
        Outline {
            step,
            template: "t.yaml.hbs",
            kind,
            namespace: namespaced.then(|| Arc::from(NS)),
            name: name.into(),
            namespaced,
            stack_label: None,
            component: None,
            key: hash * 1000,
            hash,
        }
    }

    /// The todo stack's children, hashes 1..=5.
    fn todo() -> Vec<Outline> {
        vec![
            child(Step::Rbac, "ServiceAccount", "todo-webhook", 1),
            child(
                Step::EntityApi,
                "CustomResourceDefinition",
                "todos.todo.example.com",
                2,
            ),
            child(Step::Config, "ConfigMap", "todo-config", 3),
            child(Step::Webhook, "Deployment", "todo-webhook", 4),
            child(Step::Registration, REGISTRATION, "todo.shop.kab.dev", 5),
        ]
    }

    /// Where each child stands: absent, as kab applied it ("v<hash>"), or edited under kab.
    #[derive(Clone, Copy)]
    enum At {
        Absent,
        Applied,
        Edited,
        /// Applied with an older rendering (the spec changed since).
        Stale,
    }

    struct Case {
        name: &'static str,
        paused: bool,
        at: [At; 5],
        webhook_available: bool,
        certificates: Certificates,
        existing: Option<Vec<Existing>>,
        apply: &'static [&'static str],
        secrets: Secrets,
        prune: Option<&'static [&'static str]>,
    }

    fn existing(kind: &'static str, ns: Option<&str>, name: &str) -> Existing {
        Existing {
            kind,
            namespace: ns.map(Into::into),
            name: name.into(),
        }
    }

    fn run(case: &Case) -> Plan {
        let children = todo();
        let mut current = Vec::new();
        let mut applied = Vec::new();
        for (c, at) in children.iter().zip(case.at) {
            let kab = Applied {
                hash: c.hash,
                version: format!("v{}", c.hash),
            };
            let (cur, app) = match at {
                At::Absent => (None, Some(kab)),
                At::Applied => (Some(kab.version.clone()), Some(kab)),
                At::Edited => (Some("edited".to_string()), Some(kab)),
                At::Stale => (
                    Some(kab.version.clone()),
                    Some(Applied {
                        hash: c.hash + 100,
                        ..kab
                    }),
                ),
            };
            current.push(cur);
            applied.push(app);
        }
        let registered = !matches!(case.at[4], At::Absent);
        plan(&Input {
            paused: case.paused,
            namespace: NS,
            children: &children,
            current: &current,
            applied: &applied,
            webhook_available: case.webhook_available,
            registered,
            certificates: case.certificates,
            secret_names: SECRETS,
            existing: case.existing.as_deref(),
        })
    }

    fn names(children: &[Outline], plan: &Plan) -> Vec<String> {
        plan.apply
            .iter()
            .map(|&i| children[i].name.clone())
            .collect()
    }

    use At::{Absent, Applied as Ok_, Edited, Stale};
    use Certificates::{Issued, Kept};

    #[test]
    fn plan_table() {
        let all_ok = [Ok_, Ok_, Ok_, Ok_, Ok_];
        let cases = [
            Case {
                name: "new stack: everything but the registration, certificates with them",
                paused: false,
                at: [Absent, Absent, Absent, Absent, Absent],
                webhook_available: false,
                certificates: Issued,
                existing: Some(vec![]),
                apply: &[
                    "todo-webhook",
                    "todos.todo.example.com",
                    "todo-config",
                    "todo-webhook",
                ],
                secrets: Secrets::WithChildren,
                prune: Some(&[]),
            },
            Case {
                name: "the webhook serves: the registration follows",
                paused: false,
                at: [Ok_, Ok_, Ok_, Ok_, Absent],
                webhook_available: true,
                certificates: Kept,
                existing: None,
                apply: &["todo.shop.kab.dev"],
                secrets: Secrets::Unchanged,
                prune: None,
            },
            Case {
                name: "idle: nothing to write",
                paused: false,
                at: all_ok,
                webhook_available: true,
                certificates: Kept,
                existing: None,
                apply: &[],
                secrets: Secrets::Unchanged,
                prune: None,
            },
            Case {
                name: "a deleted child is restored",
                paused: false,
                at: [Ok_, Ok_, Absent, Ok_, Ok_],
                webhook_available: true,
                certificates: Kept,
                existing: None,
                apply: &["todo-config"],
                secrets: Secrets::Unchanged,
                prune: None,
            },
            Case {
                name: "a hand edit is restored",
                paused: false,
                at: [Ok_, Ok_, Ok_, Edited, Ok_],
                webhook_available: true,
                certificates: Kept,
                existing: None,
                apply: &["todo-webhook"],
                secrets: Secrets::Unchanged,
                prune: None,
            },
            Case {
                name: "a spec edit re-applies what renders differently",
                paused: false,
                at: [Ok_, Stale, Ok_, Stale, Ok_],
                webhook_available: true,
                certificates: Kept,
                existing: None,
                apply: &["todos.todo.example.com", "todo-webhook"],
                secrets: Secrets::Unchanged,
                prune: None,
            },
            Case {
                name: "a registered webhook that lost its pods stays registered and up to date",
                paused: false,
                at: [Ok_, Ok_, Ok_, Ok_, Stale],
                webhook_available: false,
                certificates: Kept,
                existing: None,
                apply: &["todo.shop.kab.dev"],
                secrets: Secrets::Unchanged,
                prune: None,
            },
            Case {
                name: "rotation: the registration (new CA bundle) first, the Secrets after",
                paused: false,
                at: [Ok_, Ok_, Ok_, Ok_, Stale],
                webhook_available: true,
                certificates: Issued,
                existing: None,
                apply: &["todo.shop.kab.dev"],
                secrets: Secrets::AfterChildren,
                prune: None,
            },
            Case {
                name: "paused: a deleted child stays deleted, nothing is pruned or issued",
                paused: true,
                at: [Ok_, Ok_, Absent, Edited, Ok_],
                webhook_available: true,
                certificates: Issued,
                existing: Some(vec![existing("ConfigMap", Some(NS), "old")]),
                apply: &[],
                secrets: Secrets::Unchanged,
                prune: None,
            },
            Case {
                name: "prune: only undesired children of the stack's namespace and its registration",
                paused: false,
                at: all_ok,
                webhook_available: true,
                certificates: Kept,
                existing: Some(vec![
                    existing("ConfigMap", Some(NS), "todo-config"),
                    existing("ConfigMap", Some(NS), "todo-broker-config"),
                    existing("ConfigMap", Some("elsewhere"), "forged-labels"),
                    existing("Secret", Some(NS), "todo-webhook-tls"),
                    existing("Secret", Some(NS), "todo-old-secret"),
                    existing(REGISTRATION, None, "todo.shop.kab.dev"),
                    existing(REGISTRATION, None, "todo-old.shop.kab.dev"),
                    existing("CustomResourceDefinition", None, "olds.todo.example.com"),
                ]),
                apply: &[],
                secrets: Secrets::Unchanged,
                prune: Some(&[
                    "todo-broker-config",
                    "todo-old-secret",
                    "todo-old.shop.kab.dev",
                ]),
            },
        ];
        for case in &cases {
            let got = run(case);
            let children = todo();
            assert_eq!(names(&children, &got), case.apply, "{}: apply", case.name);
            assert_eq!(got.secrets, case.secrets, "{}: secrets", case.name);
            let pruned: Option<Vec<&str>> = got
                .prune
                .as_ref()
                .map(|p| p.iter().map(|e| e.name.as_str()).collect());
            assert_eq!(pruned.as_deref(), case.prune, "{}: prune", case.name);
        }
    }

    #[test]
    fn next_wakeup_table() {
        let now: Timestamp = "2026-12-08T10:00:00Z".parse().unwrap();
        let at = |s: &str| Some(s.parse::<Timestamp>().unwrap());
        let secs = |s| Some(Duration::from_secs(s));
        // (case, paused, renew_at, probe_failed, status_deferred, expected)
        let cases = [
            ("idle: the resync", false, None, false, None, Some(RESYNC)),
            (
                "paused: only a change wakes it",
                true,
                at("2026-12-08T10:00:05Z"),
                true,
                secs(1),
                None,
            ),
            (
                "a failed probe is retried",
                false,
                None,
                true,
                None,
                Some(PROBE_RETRY),
            ),
            (
                "a deferred status write",
                false,
                None,
                true,
                secs(3),
                secs(3),
            ),
            (
                "renewal in a minute",
                false,
                at("2026-12-08T10:01:00Z"),
                false,
                None,
                secs(61),
            ),
            (
                "renewal due",
                false,
                at("2026-12-08T09:00:00Z"),
                false,
                None,
                secs(1),
            ),
            (
                "renewal far away",
                false,
                at("2027-03-08T10:00:00Z"),
                false,
                None,
                Some(RESYNC),
            ),
        ];
        for (name, paused, renew_at, probe_failed, deferred, expected) in cases {
            assert_eq!(
                next_wakeup(paused, now, renew_at, probe_failed, deferred),
                expected,
                "{name}"
            );
        }
    }
}
