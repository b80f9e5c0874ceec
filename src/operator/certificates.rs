//! The certificate step: the webhook's CA and serving certificate, read back from their Secrets,
//! issued or renewed only when [`certs::plan`] says so (pure, with the clock passed in), and
//! stored with their own field manager when the plan says when.

use super::Ctx;
use super::apply::apply_params;
use super::error::{Error, Stage};
use crate::api::KabStack;
use crate::certs::{self, CertPolicy, PkiState};
use crate::render::{self, Facts, LABEL_COMPONENT, Names};
use crate::status::CertFacts;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

/// Field manager for the webhook certificate Secrets.
pub const MANAGER_CERTS: &str = "kab-operator-certs";

/// A stack's webhook PKI for this reconcile.
pub struct Certificates {
    /// The CA(s) and serving certificate.
    pub pki: PkiState,
    /// Whether they were issued now (and must be stored).
    pub issued: bool,
    policy: CertPolicy,
}

impl Certificates {
    /// What rendering needs: the CA bundle the registration trusts.
    pub fn facts(&self) -> Facts {
        Facts {
            ca_bundle_pem: Some(certs::ca_bundle(&self.pki)),
        }
    }

    /// What status reports: expiry and renewal of the serving certificate.
    pub fn status(&self) -> Option<CertFacts> {
        let serving = self.pki.serving.as_ref()?;
        Some(CertFacts {
            not_after: serving.not_after,
            renew_at: certs::renew_at(serving, &self.policy),
        })
    }
}

/// The stack's PKI as stored, renewed when due. A paused stack keeps what it has.
pub fn prepare(
    stack: &KabStack,
    ctx: &Ctx,
    names: &Names,
    now: Timestamp,
) -> Result<Certificates, Error> {
    let ns = stack.namespace().unwrap_or_default();
    let policy = policy(stack);
    let pki = stored(ctx, &ns, names);
    let dns = certs::webhook_dns_names(&names.webhook, &ns);
    let action = if stack.spec.paused {
        certs::Action::Keep
    } else {
        certs::plan(now, &pki, &policy, &dns)
    };
    if action == certs::Action::Keep {
        return Ok(Certificates {
            pki,
            issued: false,
            policy,
        });
    }
    let pki =
        certs::execute(now, &pki, &policy, &dns, action).map_err(|source| Error::Certificates {
            object: format!("KabStack {ns}/{}", stack.name_any()),
            source,
        })?;
    Ok(Certificates {
        pki,
        issued: true,
        policy,
    })
}

/// The PKI in the stack's certificate Secrets (from the watch cache).
fn stored(ctx: &Ctx, ns: &str, names: &Names) -> PkiState {
    let get = |name: &str| ctx.stores.secrets.get(&ObjectRef::new(name).within(ns));
    let ca = get(&names.webhook_ca_secret);
    let tls = get(&names.webhook_tls_secret);
    PkiState::from_secret_data(
        ca.as_ref().and_then(|s| s.data.as_ref()),
        tls.as_ref().and_then(|s| s.data.as_ref()),
    )
}

fn policy(stack: &KabStack) -> CertPolicy {
    // validate() checked the policy; fall back to the defaults rather than fail here.
    CertPolicy::from_spec(&stack.spec.webhook.certificate).unwrap_or_default()
}

/// Stores the two certificate Secrets, owned by the stack, with their own field manager.
pub async fn store(
    stack: &KabStack,
    ctx: &Ctx,
    pki: &PkiState,
    names: &render::Names,
) -> Result<(), Error> {
    let ns = stack.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut labels = render::stack_labels(stack);
    labels.insert(LABEL_COMPONENT.into(), "webhook".into());
    let owner = stack.controller_owner_ref(&());
    let one = |name: &String, type_: &str, data| {
        let api = api.clone();
        let name = name.clone();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(labels.clone()),
                owner_references: owner.clone().map(|o| vec![o]),
                ..Default::default()
            },
            type_: Some(type_.into()),
            data: Some(data),
            ..Default::default()
        };
        let mut value = serde_json::to_value(&secret).unwrap_or_default();
        value["apiVersion"] = "v1".into();
        value["kind"] = "Secret".into();
        let object = format!("Secret {ns}/{name}");
        async move {
            api.patch(&name, &apply_params(MANAGER_CERTS), &Patch::Apply(&value))
                .await
                .map(|_| ())
                .map_err(Error::kube(Stage::ApplyCertificates, object))
        }
    };
    let (ca, tls) = futures::join!(
        one(&names.webhook_ca_secret, "Opaque", pki.ca_secret_data()),
        one(
            &names.webhook_tls_secret,
            "kubernetes.io/tls",
            pki.tls_secret_data()
        ),
    );
    ca.and(tls)
}
