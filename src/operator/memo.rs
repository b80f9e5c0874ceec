//! What the operator remembers per stack between reconciles, all of it in one place with one
//! [`Memo::forget`]: the last apply of each child, failures for the backoff, the last admission
//! probe, the prepared outlines, when status was last written, and the last clean prune.
//! Losing it (a restart) costs a re-render, a re-apply of unchanged children and a re-probe;
//! nothing is wrong afterwards.

use super::outline::Prepared;
use super::probe::ProbeRecord;
use crate::api::KabStack;
use crate::lock;
use kube::runtime::reflector::ObjectRef;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What kab last applied to a child, and the version of the object it produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Hash of the rendered object.
    pub hash: u64,
    /// The version the apply answered with (see [`crate::index::version`]).
    pub version: String,
}

type StackRef = ObjectRef<KabStack>;

/// The operator's memory of its stacks.
#[derive(Default)]
pub struct Memo {
    /// Child key → what kab last applied to it.
    applied: Mutex<HashMap<u64, Applied>>,
    /// Consecutive failed reconciles, for the backoff.
    failures: Mutex<HashMap<StackRef, u32>>,
    /// The last admission probe.
    probes: Mutex<HashMap<StackRef, ProbeRecord>>,
    /// The outlines of the children for the last (uid, generation, CA bundle).
    prepared: Mutex<HashMap<StackRef, Arc<Prepared>>>,
    /// When kab last wrote the status (for pacing progress-only writes).
    status_written: Mutex<HashMap<StackRef, Instant>>,
    /// The desired set (hash) of the last prune that found nothing failing.
    pruned: Mutex<HashMap<StackRef, u64>>,
    /// The last Warning Event published (reason and message), until a reconcile succeeds.
    warned: Mutex<HashMap<StackRef, (&'static str, String)>>,
}

impl Memo {
    /// What kab last applied to the child with this key.
    pub fn applied(&self, key: u64) -> Option<Applied> {
        lock(&self.applied).get(&key).cloned()
    }

    /// Remembers an apply.
    pub fn record_apply(&self, key: u64, applied: Applied) {
        lock(&self.applied).insert(key, applied);
    }

    /// One more failure of the stack; returns how many in a row.
    pub fn failed(&self, stack: &StackRef) -> u32 {
        let mut failures = lock(&self.failures);
        let n = failures.entry(stack.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// The stack reconciled without error: its backoff starts over, and the same error coming
    /// back later is warned about again.
    pub fn succeeded(&self, stack: &StackRef) {
        lock(&self.failures).remove(stack);
        lock(&self.warned).remove(stack);
    }

    /// Remembers a Warning Event; false when the same one was published last.
    pub fn record_warning(&self, stack: &StackRef, reason: &'static str, message: &str) -> bool {
        let mut warned = lock(&self.warned);
        if warned
            .get(stack)
            .is_some_and(|(r, m)| *r == reason && m == message)
        {
            return false;
        }
        warned.insert(stack.clone(), (reason, message.to_owned()));
        true
    }

    /// The last probe of the stack.
    pub fn probe(&self, stack: &StackRef) -> Option<ProbeRecord> {
        lock(&self.probes).get(stack).cloned()
    }

    /// Remembers a probe.
    pub fn record_probe(&self, stack: &StackRef, record: ProbeRecord) {
        lock(&self.probes).insert(stack.clone(), record);
    }

    /// The prepared outlines, if they were prepared for `key`.
    pub fn prepared(&self, stack: &StackRef, key: u64) -> Option<Arc<Prepared>> {
        lock(&self.prepared)
            .get(stack)
            .filter(|p| p.key == key)
            .cloned()
    }

    /// Remembers prepared outlines.
    pub fn record_prepared(&self, stack: &StackRef, prepared: Arc<Prepared>) {
        lock(&self.prepared).insert(stack.clone(), prepared);
    }

    /// Drops the prepared outlines (the next reconcile renders afresh).
    pub fn drop_prepared(&self, stack: &StackRef) {
        lock(&self.prepared).remove(stack);
    }

    /// How long until a progress-only status write is due, if one was written less than `pace`
    /// ago.
    pub fn status_pace(&self, stack: &StackRef, pace: Duration) -> Option<Duration> {
        let last = *lock(&self.status_written).get(stack)?;
        pace.checked_sub(last.elapsed()).filter(|d| !d.is_zero())
    }

    /// Remembers a status write.
    pub fn record_status_write(&self, stack: &StackRef) {
        lock(&self.status_written).insert(stack.clone(), Instant::now());
    }

    /// Whether the last clean prune was for this desired set.
    pub fn pruned(&self, stack: &StackRef, desired: u64) -> bool {
        lock(&self.pruned).get(stack) == Some(&desired)
    }

    /// Remembers a clean prune.
    pub fn record_prune(&self, stack: &StackRef, desired: u64) {
        lock(&self.pruned).insert(stack.clone(), desired);
    }

    /// Forgets everything about a stack that is going away.
    pub fn forget(&self, stack: &StackRef) {
        let prepared = lock(&self.prepared).remove(stack);
        if let Some(prepared) = prepared {
            let mut applied = lock(&self.applied);
            for child in &prepared.children {
                applied.remove(&child.key);
            }
        }
        lock(&self.pruned).remove(stack);
        lock(&self.status_written).remove(stack);
        lock(&self.probes).remove(stack);
        lock(&self.failures).remove(stack);
        lock(&self.warned).remove(stack);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warning_is_published_once_per_error_until_a_success() {
        let memo = Memo::default();
        let todo = ObjectRef::new("todo").within("shop");
        let other = ObjectRef::new("todo").within("other");
        assert!(memo.record_warning(&todo, "InvalidSpec", "spec.entity.kind: empty"));
        // The reconcile after the finalizer patch, before the status write is seen: no second one.
        assert!(!memo.record_warning(&todo, "InvalidSpec", "spec.entity.kind: empty"));
        assert!(memo.record_warning(&other, "InvalidSpec", "spec.entity.kind: empty"));
        // Another error is new.
        assert!(memo.record_warning(&todo, "InvalidSpec", "spec.entity.group: empty"));
        // Fixed, then broken the same way again: warned again.
        memo.succeeded(&todo);
        assert!(memo.record_warning(&todo, "InvalidSpec", "spec.entity.group: empty"));
        memo.forget(&todo);
        assert!(memo.record_warning(&todo, "InvalidSpec", "spec.entity.group: empty"));
    }
}
