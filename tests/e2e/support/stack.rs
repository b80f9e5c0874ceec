//! Stacks without the operator: what a component test needs from the rendered children.

use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kab::api::KabStack;
use kab::render::{self, Facts, Settings, Step, Templates};
use kube::api::{Api, DynamicObject, Patch, PatchParams};

use super::{Ctx, wait_for};

/// Applies the rendered RBAC, entity CRD and stack config of `stack` into `ns` (no workloads,
/// no webhook registration), waits until the entity CRD is Established, and returns every
/// rendered child.
pub async fn apply_rbac_entity_api_and_config(
    ctx: &Ctx,
    ns: &str,
    stack: &KabStack,
) -> anyhow::Result<render::Rendered> {
    let rendered = render::render(
        &Templates::embedded(),
        stack,
        &Settings::default(),
        &Facts::default(),
    )?;
    let client = ctx.client();
    let params = PatchParams::apply("kab-e2e").force();
    for child in rendered
        .children
        .iter()
        .filter(|c| matches!(c.step, Step::Rbac | Step::EntityApi | Step::Config))
    {
        let api: Api<DynamicObject> = if child.namespaced {
            Api::namespaced_with(client.clone(), ns, &child.resource)
        } else {
            Api::all_with(client.clone(), &child.resource)
        };
        api.patch(child.name(), &params, &Patch::Apply(&child.object))
            .await
            .with_context(|| format!("applying {} {}", child.kind(), child.name()))?;
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    wait_for(
        &crds,
        &stack.spec.entity.crd_name(),
        kube::runtime::wait::conditions::is_crd_established(),
        Duration::from_secs(30),
    )
    .await?;
    Ok(rendered)
}
