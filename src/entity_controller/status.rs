//! `status.kab` of an entity: how far its changes have been published, and conditions saying
//! what went wrong. Pure: the reconciler decides, this computes the object to apply and whether
//! anything changed at all (no write when nothing did).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::DynamicObject;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Condition: the latest generation's event was acknowledged by the broker.
pub const PUBLISHED: &str = "Published";
/// Condition: the latest event was delivered to the notify URL.
pub const NOTIFIED: &str = "Notified";

/// `status.kab`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KabStatus {
    /// The generation the controller last processed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The last generation whose event the broker acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// `status.kab` of `obj`, read tolerantly: a malformed field is taken as absent, never an error
/// that would wedge the entity.
pub fn current(obj: &DynamicObject) -> KabStatus {
    let kab = &obj.data["status"]["kab"];
    KabStatus {
        observed_generation: kab["observedGeneration"].as_i64(),
        published_generation: kab["publishedGeneration"].as_i64(),
        conditions: kab["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| serde_json::from_value(c.clone()).ok())
            .collect(),
    }
}

/// A condition as the reconciler wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    pub type_: &'static str,
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The status to apply: `observed`/`published` generations, the `updates` set on top of the
/// current conditions, and only the condition types in `kept` (others are dropped). A
/// condition's `lastTransitionTime` moves only when its status changes.
pub fn desired(
    current: &KabStatus,
    observed: i64,
    published: Option<i64>,
    updates: &[Want],
    kept: &[&str],
    now: Timestamp,
) -> KabStatus {
    let mut conditions: Vec<Condition> = Vec::new();
    for type_ in kept {
        let old = current.conditions.iter().find(|c| c.type_ == *type_);
        let Some(want) = updates.iter().find(|w| w.type_ == *type_) else {
            if let Some(old) = old {
                conditions.push(old.clone());
            }
            continue;
        };
        let status = if want.ok { "True" } else { "False" };
        let since = match old {
            Some(old) if old.status == status => old.last_transition_time.clone(),
            _ => Time(now),
        };
        conditions.push(Condition {
            type_: want.type_.to_owned(),
            status: status.to_owned(),
            reason: want.reason.to_owned(),
            message: truncate(&want.message, 1024),
            observed_generation: Some(observed),
            last_transition_time: since,
        });
    }
    KabStatus {
        observed_generation: Some(observed),
        published_generation: published.or(current.published_generation),
        conditions,
    }
}

/// The server-side apply body of `status.kab` for entity `name` (sent to the status
/// subresource; the user's own status fields are left to their managers).
pub fn apply_body(
    api_version: &str,
    kind: &str,
    namespace: &str,
    name: &str,
    status: &KabStatus,
) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "status": {"kab": status},
    })
}

/// The condition of `type_`, if any.
pub fn condition<'a>(status: &'a KabStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let cut = (0..=max.saturating_sub(3))
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    format!("{}...", &text[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn published(generation: i64) -> Want {
        Want {
            type_: PUBLISHED,
            ok: true,
            reason: "Published",
            message: format!("generation {generation} acknowledged by the broker"),
        }
    }

    #[test]
    fn reads_status_kab_tolerantly() {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "todo.example.com/v1", "kind": "Todo",
            "metadata": {"name": "a"},
            "status": {"mine": 1, "kab": {"publishedGeneration": 2, "observedGeneration": "x",
                       "conditions": [{"type": "Published", "status": "True", "reason": "Published",
                                       "message": "", "lastTransitionTime": "2026-05-01T10:00:00Z"},
                                      {"bogus": true}]}},
        }))
        .unwrap();
        let status = current(&obj);
        assert_eq!(status.published_generation, Some(2));
        assert_eq!(status.observed_generation, None);
        assert_eq!(status.conditions.len(), 1);
        let none: DynamicObject = serde_json::from_value(json!({"apiVersion": "v1", "kind": "X",
            "metadata": {"name": "b"}}))
        .unwrap();
        assert_eq!(current(&none), KabStatus::default());
    }

    #[test]
    fn transitions_move_only_when_the_status_changes() {
        let first = desired(
            &KabStatus::default(),
            1,
            Some(1),
            &[published(1)],
            &[PUBLISHED],
            t("2026-05-01T10:00:00Z"),
        );
        assert_eq!(first.published_generation, Some(1));
        let c = condition(&first, PUBLISHED).unwrap();
        assert_eq!(
            (c.status.as_str(), c.observed_generation),
            ("True", Some(1))
        );

        // Same status, later: the transition time stays.
        let second = desired(
            &first,
            2,
            Some(2),
            &[published(2)],
            &[PUBLISHED],
            t("2026-05-01T10:05:00Z"),
        );
        assert_eq!(
            condition(&second, PUBLISHED).unwrap().last_transition_time,
            Time(t("2026-05-01T10:00:00Z"))
        );

        // A failure keeps the published generation and moves the transition time.
        let failed = desired(
            &second,
            3,
            None,
            &[Want {
                type_: PUBLISHED,
                ok: false,
                reason: "PublishFailed",
                message: "broker unreachable".into(),
            }],
            &[PUBLISHED],
            t("2026-05-01T10:06:00Z"),
        );
        assert_eq!(failed.published_generation, Some(2));
        assert_eq!(failed.observed_generation, Some(3));
        let c = condition(&failed, PUBLISHED).unwrap();
        assert_eq!(
            (
                c.status.as_str(),
                c.reason.as_str(),
                &c.last_transition_time
            ),
            ("False", "PublishFailed", &Time(t("2026-05-01T10:06:00Z")))
        );
    }

    #[test]
    fn nothing_new_means_no_write_and_dropped_types_go() {
        let now = t("2026-05-01T10:00:00Z");
        let status = desired(
            &KabStatus::default(),
            1,
            Some(1),
            &[
                published(1),
                Want {
                    type_: NOTIFIED,
                    ok: true,
                    reason: "Delivered",
                    message: "ok".into(),
                },
            ],
            &[PUBLISHED, NOTIFIED],
            now,
        );
        // Re-computed later with no news: identical, so the caller skips the write.
        let again = desired(
            &status,
            1,
            None,
            &[],
            &[PUBLISHED, NOTIFIED],
            t("2026-05-01T11:00:00Z"),
        );
        assert_eq!(again, status);
        // notify removed from the configuration: its condition goes.
        let without = desired(&status, 1, None, &[], &[PUBLISHED], now);
        assert_eq!(without.conditions.len(), 1);
        assert_eq!(
            apply_body("todo.example.com/v1", "Todo", "shop", "a", &without)["status"]["kab"]["publishedGeneration"],
            1
        );
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let text = "é".repeat(600);
        let cut = truncate(&text, 1024);
        assert!(cut.len() <= 1024 && cut.ends_with("..."));
    }
}
