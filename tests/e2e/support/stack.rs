//! Stacks: the run's operator, the todo stack, applying it and waiting until it is Ready; and,
//! without the operator, what a component test needs from the rendered children.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kab::api::KabStack;
use kab::plane::Plane;
use kab::render::{self, Facts, Settings, Step, Templates};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::json;

use super::operator::{self as process, Operator};
use super::runtime::local_namespace;
use super::{Ctx, wait_for};

/// How long a todo stack may take to become Ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The image the install manifests name (the operator runs as a local process).
pub const IMAGE: &str = "example.invalid/kab:e2e";

/// The operator shared by every test of the run: the CRD and the operator's RBAC installed
/// exactly as shipped, and `kab operator` started with an identity that has nothing but that
/// RBAC (see [`super::operator`]).
pub async fn operator(ctx: &Ctx) -> anyhow::Result<Arc<Operator>> {
    ctx.shared(|plane: Arc<Plane>| async move {
        process::install(&plane, IMAGE).await?;
        process::start(&plane, &process::Options::default()).await
    })
    .await
}

/// `examples/todo.yaml` in namespace `ns`, with an entity group of its own so that tests do not
/// share entity APIs by accident.
pub fn todo_stack(ns: &str, name: &str, group: &str) -> anyhow::Result<serde_json::Value> {
    let mut v: serde_json::Value =
        serde_saphyr::from_str(include_str!("../../../examples/todo.yaml"))?;
    v["metadata"] = json!({"name": name, "namespace": ns});
    v["spec"]["entity"]["group"] = json!(group);
    Ok(v)
}

/// The entity group of the stacks of a test namespace.
pub fn group_for(ns: &str) -> String {
    format!("{ns}.e2e.example.com")
}

/// Applies a KabStack (server-side, as `e2e`).
pub async fn apply_stack(ctx: &Ctx, stack: &serde_json::Value) -> anyhow::Result<()> {
    apply_stack_with(&ctx.client(), stack).await
}

/// [`apply_stack`] with a client of another plane.
pub async fn apply_stack_with(
    client: &kube::Client,
    stack: &serde_json::Value,
) -> anyhow::Result<()> {
    let ns = stack["metadata"]["namespace"]
        .as_str()
        .context("namespace")?;
    let name = stack["metadata"]["name"].as_str().context("name")?;
    let api: Api<KabStack> = Api::namespaced(client.clone(), ns);
    api.patch(
        name,
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(stack),
    )
    .await
    .with_context(|| format!("applying KabStack {ns}/{name}"))?;
    Ok(())
}

/// A condition of the stack's status: `(status, reason, message)`.
pub fn condition(s: &KabStack, type_: &str) -> Option<(String, String, String)> {
    let st = s.status.as_ref()?;
    let c = kab::status::condition(st, type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The stack exists and is Ready.
pub fn is_ready(s: Option<&KabStack>) -> bool {
    s.is_some_and(|s| kab::health::ready(s.status.as_ref()))
}

/// Waits until condition `type_` of stack `ns/name` is True.
pub async fn wait_condition(
    ctx: &Ctx,
    ns: &str,
    name: &str,
    type_: &str,
    timeout: Duration,
) -> anyhow::Result<KabStack> {
    let api: Api<KabStack> = Api::namespaced(ctx.client(), ns);
    let is_true = |s: Option<&KabStack>| {
        s.and_then(|s| condition(s, type_))
            .is_some_and(|c| c.0 == "True")
    };
    wait_for(&api, name, is_true, timeout)
        .await
        .with_context(|| format!("KabStack {ns}/{name}: {type_} not True"))
}

/// Waits until stack `ns/name` is Ready.
pub async fn wait_ready(ctx: &Ctx, ns: &str, name: &str) -> anyhow::Result<KabStack> {
    let api: Api<KabStack> = Api::namespaced(ctx.client(), ns);
    wait_for(&api, name, is_ready, READY_TIMEOUT)
        .await
        .with_context(|| format!("KabStack {ns}/{name} not Ready"))
}

/// A Ready todo stack in a fresh namespace whose pods the local runtime runs:
/// `(namespace, group)`.
pub async fn ready_todo(ctx: &Ctx, prefix: &str) -> anyhow::Result<(String, String)> {
    operator(ctx).await?;
    let ns = local_namespace(ctx, prefix).await?;
    let group = group_for(&ns);
    apply_stack(ctx, &todo_stack(&ns, "todo", &group)?).await?;
    wait_ready(ctx, &ns, "todo").await?;
    Ok((ns, group))
}

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
