//! One error type for a reconcile: which stage, which object, and the cause (kept as a source).

use crate::render::Step;
use std::sync::Arc;

/// The stage of a reconcile that failed: the `error` label of the failures metric, and the first
/// words of the message a person reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Adding kab's finalizer to a new stack.
    AddFinalizer,
    /// Looking for an entity CRD kab did not make.
    CheckEntityCrd,
    /// Issuing the webhook certificates.
    Certificates,
    /// Applying the children of one render step.
    Apply(Step),
    /// Applying the certificate Secrets.
    ApplyCertificates,
    /// Deleting a child that is no longer desired.
    Prune,
    /// Writing the stack's status.
    WriteStatus,
    /// Deleting the webhook registration of a stack that goes.
    DeleteRegistration,
    /// Deleting the entity CRD of the last stack that used it.
    DeleteEntityCrd,
    /// kube's finalizer helper (adding or removing the finalizer).
    Finalizer,
}

impl Stage {
    /// The metric label, also the start of the error message.
    pub fn label(self) -> &'static str {
        match self {
            Stage::AddFinalizer => "add finalizer",
            Stage::CheckEntityCrd => "check entity CRD",
            Stage::Certificates => "certificates",
            Stage::Apply(Step::Rbac) => "apply RBAC",
            Stage::Apply(Step::EntityApi) => "apply entity CRD",
            Stage::Apply(Step::Config) => "apply config",
            Stage::Apply(Step::Broker) => "apply broker",
            Stage::Apply(Step::Webhook) => "apply webhook",
            Stage::Apply(Step::Registration) => "apply webhook registration",
            Stage::Apply(Step::Controller) => "apply entity controller",
            Stage::ApplyCertificates => "apply certificates",
            Stage::Prune => "prune",
            Stage::WriteStatus => "write status",
            Stage::DeleteRegistration => "delete webhook registration",
            Stage::DeleteEntityCrd => "delete entity CRD",
            Stage::Finalizer => "finalizer",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// A reconcile error: which stage, which object, and the cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("{stage} {object}: {source}")]
    Kube {
        /// The stage.
        stage: Stage,
        /// The object, `Kind ns/name`.
        object: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The webhook certificates could not be issued.
    #[error("certificates for {object}: {source}")]
    Certificates {
        /// The stack.
        object: String,
        /// The cause.
        #[source]
        source: crate::certs::CertError,
    },
    /// The KabStack has no namespace (never happens for a namespaced resource).
    #[error("KabStack {0} has no namespace")]
    NoNamespace(String),
    /// kube's finalizer helper failed (adding or removing the finalizer).
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// The task that added the finalizer of a new stack did not finish.
    #[error("adding the finalizer: {0}")]
    FinalizerTask(#[source] tokio::task::JoinError),
    /// An error seen by several stages that waited for the same step (the finalizer patch).
    #[error(transparent)]
    Shared(Arc<Error>),
}

impl Error {
    /// Short label for the failures metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube { stage, .. } => stage.label(),
            Error::Certificates { .. } => Stage::Certificates.label(),
            Error::NoNamespace(_) => "no namespace",
            Error::Finalizer(_) | Error::FinalizerTask(_) => Stage::Finalizer.label(),
            Error::Shared(e) => e.metric_label(),
        }
    }

    /// An API error of `stage` about `object`.
    pub fn kube(stage: Stage, object: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let object = object.into();
        move |source| Error::Kube {
            stage,
            object,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_render_step_has_its_own_label_and_causes_are_kept() {
        let labels: std::collections::HashSet<&str> =
            Step::ALL.iter().map(|s| Stage::Apply(*s).label()).collect();
        assert_eq!(labels.len(), Step::ALL.len());
        let e = Error::kube(Stage::Apply(Step::Webhook), "Deployment shop/todo-webhook")(
            kube::Error::LinesCodecMaxLineLengthExceeded,
        );
        assert_eq!(e.metric_label(), "apply webhook");
        assert!(
            e.to_string()
                .starts_with("apply webhook Deployment shop/todo-webhook: ")
        );
        assert!(std::error::Error::source(&e).is_some());
        let shared = Error::Shared(Arc::new(e));
        assert_eq!(shared.metric_label(), "apply webhook");
    }
}
