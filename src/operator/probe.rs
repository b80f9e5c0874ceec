//! The admission probe: proof that the API server → webhook path works (see
//! [`crate::admission_probe`]), reported as a status row.
//!
//! The probe is a dry-run create, so a write in the audit log: it is sent only when something it
//! depends on changed (the webhook Deployment's rollout or availability, the registration, the
//! TLS Secret) and retried while it fails (every [`super::plan::PROBE_RETRY`]). An idle stack is
//! never probed.
//!
//! Verdicts ([`verdict`]):
//! - the webhook's probe denial → ready: the whole path works;
//! - 422 from the API server → ready, *inconclusive*: the entity's schema refused kab's minimal
//!   probe object (patterns, formats, CEL rules kab cannot satisfy blindly) before any webhook
//!   was called. Readiness then rests on the webhook Deployment being available (the probe is
//!   only sent then) and the row's message says so;
//! - any other answer → not ready, with the answer: the webhook is not reached, or it admitted a
//!   probe object (failurePolicy Ignore with an unreachable webhook).

use super::Ctx;
use crate::admission_probe::{DENIAL_MARKER, probe_object};
use crate::api::KabStack;
use crate::render::{Names, Step};
use crate::status::{Observed, PROBE_KIND};
use k8s_openapi::api::apps::v1::DeploymentStatus;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, PostParams};
use kube::runtime::reflector::ObjectRef;
use std::hash::{Hash, Hasher};

/// The last admission probe of a stack: what it was sent for and what it found.
#[derive(Clone, Debug)]
pub struct ProbeRecord {
    key: String,
    row: Observed,
}

/// How the API server answered the probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The webhook denied it with the probe's message.
    Denied,
    /// The API server refused the object itself (422), before calling webhooks.
    Invalid(String),
    /// Another refusal: `code reason: message`.
    Refused(u16, String, String),
    /// The request could not be sent.
    Unsent(String),
    /// The probe object was admitted.
    Admitted,
}

/// Pure: `(ready, message)` of an answer.
pub fn verdict(answer: &Answer) -> (bool, String) {
    match answer {
        Answer::Denied => (
            true,
            "a dry-run create reached the webhook through its Service and was denied as expected"
                .into(),
        ),
        Answer::Invalid(message) => (
            true,
            format!(
                "inconclusive: the API server refused the probe entity on the entity's schema before \
                 calling the webhook ({message}); readiness rests on the webhook Deployment being available"
            ),
        ),
        Answer::Refused(code, reason, message) => (
            false,
            format!("a dry-run create did not reach the webhook ({code} {reason}): {message}"),
        ),
        Answer::Unsent(e) => (false, format!("a dry-run create could not be sent: {e}")),
        Answer::Admitted => (
            false,
            "a dry-run probe entity was admitted without the webhook denying it: the webhook is \
             not being called (failurePolicy Ignore with an unreachable webhook?)"
                .into(),
        ),
    }
}

/// Pure: what the probe depends on, as a key; a new key means probing again.
pub fn key(webhook: &DeploymentStatus, registration: &str, tls_secret: &str) -> String {
    format!(
        "{}/{}/{}/{registration}/{tls_secret}",
        webhook.observed_generation.unwrap_or_default(),
        webhook.available_replicas.unwrap_or_default(),
        webhook.updated_replicas.unwrap_or_default(),
    )
}

/// Pure: the last probe's row stands when it was sent for the same key and passed.
pub fn still_valid(last: Option<&ProbeRecord>, key: &str) -> Option<Observed> {
    last.filter(|l| l.key == key && l.row.ready)
        .map(|l| l.row.clone())
}

/// Probes the stack's webhook through the API server, when the operator knows its own identity
/// (in a cluster), the webhook is registered and available, and the stack is not paused.
pub async fn probe(
    stack: &KabStack,
    ctx: &Ctx,
    names: &Names,
    webhook_available: bool,
) -> Option<Observed> {
    ctx.settings.operator_service_account.as_ref()?;
    if stack.spec.paused || !webhook_available {
        return None;
    }
    let ns = stack.namespace()?;
    let registration =
        ctx.stores
            .index
            .version(super::plan::REGISTRATION, None, &names.registration)?;
    let webhook = ctx.stores.index.deployment(&ns, &names.webhook)?;
    let tls = ctx
        .stores
        .secrets
        .get(&ObjectRef::new(&names.webhook_tls_secret).within(&ns))
        .and_then(|t| t.metadata.resource_version.clone())
        .unwrap_or_default();
    let key = key(&webhook.status.unwrap_or_default(), &registration, &tls);
    let sref = ObjectRef::from_obj(stack);
    if let Some(row) = still_valid(ctx.memo.probe(&sref).as_ref(), &key) {
        return Some(row);
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
        (&stack.metadata.uid, std::time::SystemTime::now(), &key).hash(&mut h);
        format!("{:012x}", h.finish() & 0xffff_ffff_ffff)
    };
    let object = probe_object(&resource, &ns, &version.schema, &nonce);
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &resource);
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let answer = match api.create(&pp, &object).await {
        Err(kube::Error::Api(s)) if s.message.contains(DENIAL_MARKER) => Answer::Denied,
        Err(kube::Error::Api(s)) if s.code == 422 => Answer::Invalid(s.message),
        Err(kube::Error::Api(s)) => Answer::Refused(s.code, s.reason, s.message),
        Err(e) => Answer::Unsent(e.to_string()),
        Ok(_) => Answer::Admitted,
    };
    let (ready, message) = verdict(&answer);
    let row = Observed {
        step: Step::Registration,
        kind: PROBE_KIND.into(),
        name: "dry-run create".into(),
        ready,
        failing: false,
        message,
    };
    ctx.memo.record_probe(
        &sref,
        ProbeRecord {
            key,
            row: row.clone(),
        },
    );
    Some(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_denial_or_a_schema_refusal_makes_the_webhook_ready() {
        let cases = [
            (Answer::Denied, true, "denied as expected"),
            (
                Answer::Invalid("spec.code: Invalid value: \"\": should match '^[A-Z]+$'".into()),
                true,
                "inconclusive: the API server refused the probe entity on the entity's schema",
            ),
            (
                Answer::Refused(500, "InternalError".into(), "failed calling webhook".into()),
                false,
                "did not reach the webhook (500 InternalError): failed calling webhook",
            ),
            (
                Answer::Unsent("connection refused".into()),
                false,
                "could not be sent: connection refused",
            ),
            (
                Answer::Admitted,
                false,
                "admitted without the webhook denying it",
            ),
        ];
        for (answer, ready, message) in cases {
            let (r, m) = verdict(&answer);
            assert_eq!(r, ready, "{answer:?}");
            assert!(m.contains(message), "{answer:?}: {m}");
        }
    }

    #[test]
    fn a_probe_is_sent_again_only_on_change_or_after_a_failure() {
        let status = |available| DeploymentStatus {
            observed_generation: Some(2),
            available_replicas: Some(available),
            updated_replicas: Some(2),
            ..Default::default()
        };
        let k = key(&status(2), "7", "41");
        let row = |ready| Observed {
            step: Step::Registration,
            kind: PROBE_KIND.into(),
            name: "dry-run create".into(),
            ready,
            failing: false,
            message: String::new(),
        };
        let passed = ProbeRecord {
            key: k.clone(),
            row: row(true),
        };
        let failed = ProbeRecord {
            key: k.clone(),
            row: row(false),
        };
        // Same key, passed: no new probe, however long ago.
        assert_eq!(still_valid(Some(&passed), &k), Some(row(true)));
        // Failed: probe again.
        assert_eq!(still_valid(Some(&failed), &k), None);
        // Never probed.
        assert_eq!(still_valid(None, &k), None);
        // Anything it depends on changed: the rollout, the registration, the certificate.
        for changed in [
            key(&status(1), "7", "41"),
            key(&status(2), "8", "41"),
            key(&status(2), "7", "42"),
        ] {
            assert_ne!(changed, k);
            assert_eq!(still_valid(Some(&passed), &changed), None);
        }
    }
}
