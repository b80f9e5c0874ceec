//! The API server's audit log (every write request, Metadata level; see `kab::plane`): what the
//! operator wrote about a stack, from a point on.

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use kab::plane::AuditEvent;
use kab::plane::{Plane, read_audit_log as events};

use super::operator::USER as OPERATOR_USER;
use super::wait::poll_until;

/// A position in the audit log.
pub struct Cursor {
    log: PathBuf,
    at: usize,
}

impl Cursor {
    /// The end of the audit log now. The plane's API server audits in blocking mode: a write
    /// whose answer a client has seen is already in the log.
    pub fn now(plane: &Plane) -> anyhow::Result<Self> {
        let log = plane.audit_log_path().to_path_buf();
        let at = events(&log)?.len();
        Ok(Self { log, at })
    }

    /// The beginning of the audit log.
    pub fn start(plane: &Plane) -> Self {
        Self {
            log: plane.audit_log_path().to_path_buf(),
            at: 0,
        }
    }

    /// The events logged since this position that `filter` keeps.
    pub fn since(&self, filter: impl Fn(&AuditEvent) -> bool) -> anyhow::Result<Vec<AuditEvent>> {
        Ok(events(&self.log)?
            .into_iter()
            .skip(self.at)
            .filter(|e| filter(e))
            .collect())
    }

    /// Observes the audit log for `window` (the observation window itself, not a
    /// synchronisation) and returns what `filter` kept in it, from this position on.
    pub async fn observe(
        &self,
        window: Duration,
        filter: impl Fn(&AuditEvent) -> bool,
    ) -> anyhow::Result<Vec<AuditEvent>> {
        tokio::time::sleep(window).await;
        self.since(filter)
    }
}

/// Waits (at most `max`) until `quiet` passes without a new event that `filter` keeps, e.g. for
/// the last writes of a transition to land before an observation window opens. Whether it did.
pub async fn settle(
    plane: &Plane,
    filter: impl Fn(&AuditEvent) -> bool,
    quiet: Duration,
    max: Duration,
) -> anyhow::Result<bool> {
    let mut cursor = Cursor::now(plane)?;
    let mut since = Instant::now();
    let mut error = None;
    let settled = poll_until(
        "a quiet audit log",
        max,
        Duration::from_millis(250),
        || match cursor.since(&filter) {
            Ok(new) if new.is_empty() => since.elapsed() >= quiet,
            Ok(_) => {
                match Cursor::now(plane) {
                    Ok(c) => cursor = c,
                    Err(e) => error = Some(e),
                }
                since = Instant::now();
                false
            }
            Err(e) => {
                error = Some(e);
                true
            }
        },
    )
    .await;
    match error {
        Some(e) => Err(e),
        None => Ok(settled.is_ok()),
    }
}

/// The operator's requests about the stacks of namespace `ns`: anything in the namespace
/// (children, status, Events, the dry-run admission probe's entity creates) and the
/// cluster-scoped objects named in `cluster_scoped` (the webhook registration, the entity CRD).
/// Not its leader-election Lease.
pub fn by_operator_about(
    ns: &str,
    cluster_scoped: &[&str],
) -> impl Fn(&AuditEvent) -> bool + use<> {
    let ns = ns.to_string();
    let names: Vec<String> = cluster_scoped.iter().map(|n| n.to_string()).collect();
    move |e: &AuditEvent| {
        e.user.username == OPERATOR_USER
            && e.object_ref.as_ref().is_some_and(|o| {
                o.resource != "leases"
                    && (o.namespace == ns || (o.namespace.is_empty() && names.contains(&o.name)))
            })
    }
}

/// Whether an event is a dry-run request (the admission probe's entity create).
pub fn is_dry_run(e: &AuditEvent) -> bool {
    e.request_uri.contains("dryRun=All")
}

/// One line per event: `verb resource[/subresource] namespace/name (code) uri`.
pub fn describe(events: &[AuditEvent]) -> String {
    events
        .iter()
        .map(|e| {
            let (what, at) = match &e.object_ref {
                Some(o) if o.subresource.is_empty() => {
                    (o.resource.clone(), format!("{}/{}", o.namespace, o.name))
                }
                Some(o) => (
                    format!("{}/{}", o.resource, o.subresource),
                    format!("{}/{}", o.namespace, o.name),
                ),
                None => ("?".into(), String::new()),
            };
            let code = e.response_status.as_ref().map(|s| s.code).unwrap_or(0);
            format!("{} {what} {at} ({code}) {}", e.verb, e.request_uri)
        })
        .collect::<Vec<_>>()
        .join("\n")
}
