//! Leader election for kab's replicated processes (the operator, and each stack's entity
//! controller): one Lease, one active replica, through kube-lease-manager.

use std::time::Duration;

use anyhow::Context as _;
use kube_lease_manager::{LeaseManager, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long [`Election::release`] waits for the Lease to be given up.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(3);

/// A won election: the leader flag, and the task that renews (and finally releases) the Lease.
pub struct Election {
    leader: watch::Receiver<bool>,
    task: JoinHandle<Result<LeaseManager, LeaseManagerError>>,
}

impl Election {
    /// Waits until `manager`'s Lease is ours; `None` when `stop` changes first (the Lease is
    /// then given up).
    pub async fn win(
        manager: LeaseManager,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Option<Self>> {
        let (mut leader, task) = manager.watch().await;
        loop {
            if *leader.borrow_and_update() {
                return Ok(Some(Election { leader, task }));
            }
            tokio::select! {
                r = leader.changed() => r.context("leader election stopped")?,
                _ = stop.changed() => {
                    Election { leader, task }.release().await;
                    return Ok(None);
                }
            }
        }
    }

    /// The leader flag, for [`stopped_or_lost`]: it turns false when the Lease is lost.
    pub fn leader(&self) -> watch::Receiver<bool> {
        self.leader.clone()
    }

    /// Releases the Lease so that another replica takes over at once (once every
    /// [`Election::leader`] flag is dropped too).
    pub async fn release(self) {
        drop(self.leader);
        let _ = tokio::time::timeout(RELEASE_TIMEOUT, self.task).await;
    }
}

/// Resolves when `stop` changes (`false`), or when `leader` — the flag of a won election, for a
/// process that elects one — turns false or its election ends (`true`: leadership lost).
pub async fn stopped_or_lost(
    leader: Option<watch::Receiver<bool>>,
    mut stop: watch::Receiver<bool>,
) -> bool {
    let Some(mut leader) = leader else {
        let _ = stop.changed().await;
        return false;
    };
    let lost = async {
        while leader.changed().await.is_ok() {
            if !*leader.borrow() {
                break;
            }
        }
    };
    tokio::select! {
        _ = stop.changed() => false,
        _ = lost => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_or_a_lost_lease_ends_the_wait() {
        let (stop_tx, stop) = watch::channel(false);
        let (leader_tx, leader) = watch::channel(true);
        let waiting = tokio::spawn(stopped_or_lost(Some(leader), stop.clone()));
        leader_tx.send_replace(true);
        leader_tx.send_replace(false);
        assert!(waiting.await.unwrap(), "losing the Lease is reported");

        let (leader_tx, leader) = watch::channel(true);
        let waiting = tokio::spawn(stopped_or_lost(Some(leader), stop.clone()));
        drop(leader_tx);
        assert!(
            waiting.await.unwrap(),
            "an election that ends is a lost Lease"
        );

        let waiting = tokio::spawn(stopped_or_lost(None, stop));
        stop_tx.send_replace(true);
        assert!(!waiting.await.unwrap(), "a stop is not a lost Lease");
    }
}
