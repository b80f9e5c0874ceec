//! The operator against the real control plane: stacks become Ready, children heal, deletion
//! cleans up, entities are shared, failures are named, invalid specs are refused or reported, an
//! idle operator writes nothing. The operator runs as the built `kab` binary under exactly the
//! RBAC `kab install --print` ships.

use std::time::Duration;

use anyhow::{Context as _, anyhow, ensure};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Event, Secret, Service};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kab::api::KabStack;
use kab::plane::Plane;
use kube::ResourceExt as _;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use serde_json::json;

use crate::support::own_plane::{OwnPlane, restricted_namespace};
use crate::support::stack::IMAGE;
use crate::support::{
    Ctx, READY_TIMEOUT, Test, apply_stack, audit, condition, e2e_tests, group_for, is_ready,
    local_namespace, operator, ready_todo, todo_stack, wait_deleted, wait_for, wait_ready,
};

pub fn tests() -> Vec<Test> {
    let mut tests = e2e_tests![
        todo_stack_becomes_ready_with_every_child,
        hand_edits_and_deletions_are_restored,
        deleting_a_stack_removes_its_children_and_retains_the_entity_api,
        deletion_policy_delete_removes_the_entity_api,
        stacks_share_an_entity_api_and_a_different_schema_conflicts,
        a_crash_looping_webhook_degrades_the_stack_and_recovers,
        a_failing_webhook_rollout_degrades_and_recovers,
        invalid_stacks_are_refused_or_reported,
        paused_stack_is_left_alone,
        no_private_key_in_logs_events_or_status,
        installed_rbac_is_least_privilege,
    ];
    // Observes 60 s of idleness after Ready.
    tests.push(
        Test::new(
            crate::support::qualified_name(module_path!(), "an_idle_operator_makes_no_writes"),
            an_idle_operator_makes_no_writes,
        )
        .timeout(Duration::from_secs(300)),
    );
    tests
}

async fn todo_stack_becomes_ready_with_every_child(ctx: Ctx) -> anyhow::Result<()> {
    let (ns, group) = ready_todo(&ctx, "ready").await?;
    let client = ctx.client();
    let stack = Api::<KabStack>::namespaced(client.clone(), &ns)
        .get("todo")
        .await?;
    let status = stack.status.clone().context("status")?;
    ensure!(
        status.phase == Some(kab::api::Phase::Ready),
        "phase {:?}",
        status.phase
    );
    ensure!(status.observed_generation == stack.metadata.generation);
    for t in [
        "Ready",
        "Reconciled",
        "EntityAPIReady",
        "WebhookReady",
        "ControllerReady",
        "BrokerReady",
        "CertificateValid",
    ] {
        let (s, reason, msg) = condition(&stack, t).with_context(|| format!("no {t} condition"))?;
        ensure!(s == "True", "{t} is {s} ({reason}: {msg})");
    }
    ensure!(condition(&stack, "Paused").map(|c| c.0) == Some("False".into()));
    ensure!(
        status.components.iter().all(|c| c.ready),
        "not all components ready: {:?}",
        status.components
    );
    ensure!(status.certificate.is_some(), "no certificate in status");

    // Every child exists and is what it should be.
    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get(&format!("todos.{group}"))
        .await?;
    ensure!(crd.spec.scope == "Namespaced");
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    for (name, replicas) in [("todo-webhook", 2), ("todo-controller", 1)] {
        let d = deps.get(name).await?;
        ensure!(
            d.status.and_then(|s| s.available_replicas) == Some(replicas),
            "{name} not {replicas}/{replicas} available"
        );
    }
    let sts = Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .get("todo-broker")
        .await?;
    ensure!(
        sts.spec
            .volume_claim_templates
            .is_some_and(|v| !v.is_empty()),
        "File storage without a PVC template"
    );
    let reg = Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .get(&format!("todo.{ns}.kab.dev"))
        .await?;
    let hook = reg
        .webhooks
        .as_ref()
        .and_then(|w| w.first())
        .context("no webhook entry")?;
    ensure!(
        hook.client_config
            .ca_bundle
            .as_ref()
            .is_some_and(|b| !b.0.is_empty()),
        "no caBundle"
    );
    let conditions: Vec<(&str, &str)> = hook
        .match_conditions
        .iter()
        .flatten()
        .map(|c| (c.name.as_str(), c.expression.as_str()))
        .collect();
    let want = format!("request.namespace == \"{ns}\"");
    ensure!(
        // The API server defaults the selector to {} (every namespace): the condition scopes it.
        hook.namespace_selector.as_ref().is_none_or(|s| {
            s.match_labels.as_ref().is_none_or(|l| l.is_empty())
                && s.match_expressions.as_ref().is_none_or(|e| e.is_empty())
        }) && conditions == [("in-stack-namespace", want.as_str())],
        "the registration is not scoped to namespace {ns} by a matchCondition: {conditions:?}"
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let tls = secrets.get("todo-webhook-tls").await?;
    ensure!(tls.type_.as_deref() == Some("kubernetes.io/tls"));
    for name in [
        "todo-webhook",
        "todo-controller",
        "todo-reader",
        "todo-writer",
    ] {
        Api::<Role>::namespaced(client.clone(), &ns)
            .get(name)
            .await
            .with_context(|| format!("Role {name}"))?;
    }

    // kubectl shows the printer columns.
    let out = ctx.kubectl(["get", "kabstacks", "-n", &ns]).await?;
    let header = out.lines().next().unwrap_or_default();
    for col in ["NAME", "READY", "PHASE", "ENTITY", "AGE"] {
        ensure!(header.contains(col), "no {col} column in:\n{out}");
    }
    let row = out.lines().nth(1).unwrap_or_default();
    ensure!(
        row.contains("True") && row.contains("Ready") && row.contains(&format!("todos.{group}")),
        "row: {row}"
    );
    Ok(())
}

async fn hand_edits_and_deletions_are_restored(ctx: Ctx) -> anyhow::Result<()> {
    let (ns, _) = ready_todo(&ctx, "heal").await?;
    let client = ctx.client();
    let t = Duration::from_secs(30);

    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let old_uid = deps.get("todo-controller").await?.uid();
    deps.delete("todo-controller", &DeleteParams::foreground())
        .await?;
    wait_for(
        &deps,
        "todo-controller",
        |d: Option<&Deployment>| d.is_some_and(|d| d.uid() != old_uid),
        t,
    )
    .await
    .context("deleted controller Deployment not recreated")?;

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    cms.delete("todo-config", &DeleteParams::default()).await?;
    wait_for(&cms, "todo-config", |c: Option<&ConfigMap>| c.is_some(), t)
        .await
        .context("deleted ConfigMap not recreated")?;

    // A hand edit of a field kab sets is reverted.
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    let target = |s: &Service| {
        s.spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .and_then(|p| p.first())
            .and_then(|p| p.target_port.clone())
    };
    let before = target(&svcs.get("todo-webhook").await?).context("no targetPort")?;
    ctx.kubectl([
        "-n",
        &ns,
        "patch",
        "service",
        "todo-webhook",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/ports/0/targetPort","value":9999}]"#,
    ])
    .await?;
    wait_for(
        &svcs,
        "todo-webhook",
        move |s: Option<&Service>| s.and_then(target) == Some(before.clone()),
        t,
    )
    .await
    .context("hand-edited Service targetPort not restored")?;

    // The cluster-scoped registration too.
    let regs: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let reg = format!("todo.{ns}.kab.dev");
    regs.delete(&reg, &DeleteParams::default()).await?;
    wait_for(
        &regs,
        &reg,
        |r: Option<&ValidatingWebhookConfiguration>| r.is_some(),
        t,
    )
    .await
    .context("deleted webhook registration not recreated")?;
    wait_ready(&ctx, &ns, "todo").await?;
    Ok(())
}

async fn deleting_a_stack_removes_its_children_and_retains_the_entity_api(
    ctx: Ctx,
) -> anyhow::Result<()> {
    let (ns, group) = ready_todo(&ctx, "delete").await?;
    let client = ctx.client();
    let stacks: Api<KabStack> = Api::namespaced(client.clone(), &ns);
    stacks.delete("todo", &DeleteParams::default()).await?;
    let t = Duration::from_secs(60);
    wait_deleted(&stacks, "todo", t).await?;
    wait_deleted(
        &Api::<ValidatingWebhookConfiguration>::all(client.clone()),
        &format!("todo.{ns}.kab.dev"),
        t,
    )
    .await?;
    wait_deleted(
        &Api::<Deployment>::namespaced(client.clone(), &ns),
        "todo-webhook",
        t,
    )
    .await?;
    wait_deleted(
        &Api::<Deployment>::namespaced(client.clone(), &ns),
        "todo-controller",
        t,
    )
    .await?;
    wait_deleted(
        &Api::<StatefulSet>::namespaced(client.clone(), &ns),
        "todo-broker",
        t,
    )
    .await?;
    wait_deleted(
        &Api::<Secret>::namespaced(client.clone(), &ns),
        "todo-webhook-tls",
        t,
    )
    .await?;
    wait_deleted(
        &Api::<Role>::namespaced(client.clone(), &ns),
        "todo-writer",
        t,
    )
    .await?;
    // Retain: the entity API and its data stay.
    let crd = Api::<CustomResourceDefinition>::all(client.clone())
        .get_opt(&format!("todos.{group}"))
        .await?;
    ensure!(crd.is_some(), "the Retained CRD was deleted");
    Ok(())
}

async fn deletion_policy_delete_removes_the_entity_api(ctx: Ctx) -> anyhow::Result<()> {
    operator(&ctx).await?;
    let ns = local_namespace(&ctx, "purge").await?;
    let group = group_for(&ns);
    let mut stack = todo_stack(&ns, "todo", &group)?;
    stack["spec"]["entity"]["deletionPolicy"] = json!("Delete");
    apply_stack(&ctx, &stack).await?;
    wait_ready(&ctx, &ns, "todo").await?;
    let stacks: Api<KabStack> = Api::namespaced(ctx.client(), &ns);
    stacks.delete("todo", &DeleteParams::default()).await?;
    wait_deleted(
        &Api::<CustomResourceDefinition>::all(ctx.client()),
        &format!("todos.{group}"),
        Duration::from_secs(60),
    )
    .await
    .context("deletionPolicy Delete: the CRD should go with its last stack")?;
    Ok(())
}

async fn stacks_share_an_entity_api_and_a_different_schema_conflicts(
    ctx: Ctx,
) -> anyhow::Result<()> {
    operator(&ctx).await?;
    let a = local_namespace(&ctx, "share-a").await?;
    let b = local_namespace(&ctx, "share-b").await?;
    let c = local_namespace(&ctx, "share-c").await?;
    let group = group_for(&a);
    let mut first = todo_stack(&a, "todo", &group)?;
    first["spec"]["entity"]["deletionPolicy"] = json!("Delete");
    apply_stack(&ctx, &first).await?;
    wait_ready(&ctx, &a, "todo").await?;
    apply_stack(&ctx, &todo_stack(&b, "todo", &group)?).await?;
    wait_ready(&ctx, &b, "todo").await?;

    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client());
    let crd_name = format!("todos.{group}");
    let before = crds.get(&crd_name).await?;

    let mut other = todo_stack(&c, "todo", &group)?;
    other["spec"]["entity"]["versions"][0]["schema"]["properties"]["extra"] =
        json!({"type": "integer"});
    apply_stack(&ctx, &other).await?;
    let stacks: Api<KabStack> = Api::namespaced(ctx.client(), &c);
    let conflicted = wait_for(
        &stacks,
        "todo",
        |s: Option<&KabStack>| {
            s.and_then(|s| condition(s, "Reconciled"))
                .is_some_and(|c| c.1 == "Conflict")
        },
        Duration::from_secs(60),
    )
    .await?;
    let (_, _, msg) = condition(&conflicted, "Reconciled").context("Reconciled")?;
    ensure!(
        msg.contains(&format!("{a}/todo")),
        "conflict message should name the defining stack: {msg}"
    );
    ensure!(conflicted.status.as_ref().and_then(|s| s.phase) == Some(kab::api::Phase::Failed));
    let after = crds.get(&crd_name).await?;
    ensure!(
        after.spec.versions == before.spec.versions,
        "a conflicting stack must never overwrite the shared CRD"
    );

    // The first stack goes (policy Delete), but b still uses the entity: the CRD stays.
    Api::<KabStack>::namespaced(ctx.client(), &a)
        .delete("todo", &DeleteParams::default())
        .await?;
    wait_deleted(
        &Api::<KabStack>::namespaced(ctx.client(), &a),
        "todo",
        Duration::from_secs(60),
    )
    .await?;
    ensure!(
        crds.get_opt(&crd_name).await?.is_some(),
        "CRD deleted while another stack still uses it"
    );
    Ok(())
}

/// With real processes: a webhook rollout whose new pod crash-loops (another field manager gives
/// its container a command kab does not know, so the process exits at once and the local runtime
/// restarts it with a back-off) degrades a Ready stack, naming the Deployment and the pod;
/// withdrawing the change brings it back to Ready.
async fn a_crash_looping_webhook_degrades_the_stack_and_recovers(ctx: Ctx) -> anyhow::Result<()> {
    let (ns, _) = ready_todo(&ctx, "degraded").await?;
    let deps: Api<Deployment> = Api::namespaced(ctx.client(), &ns);
    // kab does not own the container's command, so it keeps it: the new pod crash-loops.
    let chaos = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "todo-webhook", "namespace": ns},
        "spec": {"template": {"spec": {
            "containers": [{"name": "webhook", "command": ["kab", "no-such-command"]}],
        }}}
    });
    deps.patch(
        "todo-webhook",
        &PatchParams::apply("e2e-chaos"),
        &Patch::Apply(&chaos),
    )
    .await?;
    let stacks: Api<KabStack> = Api::namespaced(ctx.client(), &ns);
    let degraded = wait_for(
        &stacks,
        "todo",
        |s: Option<&KabStack>| {
            s.and_then(|s| s.status.as_ref()).and_then(|s| s.phase)
                == Some(kab::api::Phase::Degraded)
        },
        Duration::from_secs(90),
    )
    .await?;
    let (_, reason, msg) = condition(&degraded, "Ready").context("Ready")?;
    ensure!(reason == "WebhookNotReady", "reason {reason}");
    ensure!(
        msg.contains(&format!("{ns}/todo-webhook")) && msg.contains("CrashLoopBackOff"),
        "message should name the blocker: {msg}"
    );
    let row = degraded
        .status
        .as_ref()
        .and_then(|s| {
            s.components
                .iter()
                .find(|c| c.kind == "Deployment" && c.name == format!("{ns}/todo-webhook"))
        })
        .context("no component row for the webhook")?;
    ensure!(
        !row.ready && row.message.contains("CrashLoopBackOff"),
        "row {row:?}"
    );
    withdraw_chaos(&deps, &ns).await?;
    wait_recovered(&stacks).await
}

/// Removes every field the `e2e-chaos` field manager set on the webhook Deployment.
async fn withdraw_chaos(deps: &Api<Deployment>, ns: &str) -> anyhow::Result<()> {
    let withdraw = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "todo-webhook", "namespace": ns}});
    deps.patch(
        "todo-webhook",
        &PatchParams::apply("e2e-chaos"),
        &Patch::Apply(&withdraw),
    )
    .await?;
    Ok(())
}

/// Recovered: Ready again at the current generation, no longer Degraded, every component ready.
fn recovered(s: Option<&KabStack>) -> bool {
    s.is_some_and(|s| {
        observed_current(s)
            && is_ready(Some(s))
            && s.status.as_ref().is_some_and(|st| {
                st.phase == Some(kab::api::Phase::Ready) && st.components.iter().all(|c| c.ready)
            })
    })
}

/// Waits until the stack has [`recovered`] from a fault just removed.
async fn wait_recovered(stacks: &Api<KabStack>) -> anyhow::Result<()> {
    wait_for(stacks, "todo", recovered, Duration::from_secs(90))
        .await
        .context("stack did not recover: not Ready, still Degraded or a component not ready")?;
    Ok(())
}

/// With real processes: a webhook rollout whose new pod cannot start (it mounts a Secret that
/// does not exist) degrades a Ready stack, naming the pod and why; withdrawing the change brings
/// it back to Ready.
async fn a_failing_webhook_rollout_degrades_and_recovers(ctx: Ctx) -> anyhow::Result<()> {
    let (ns, _) = ready_todo(&ctx, "rollout").await?;
    let deps: Api<Deployment> = Api::namespaced(ctx.client(), &ns);
    let chaos = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "todo-webhook", "namespace": ns},
        "spec": {"template": {"spec": {
            "volumes": [{"name": "chaos", "secret": {"secretName": "does-not-exist"}}],
            "containers": [{"name": "webhook", "volumeMounts": [{"name": "chaos", "mountPath": "/chaos"}]}],
        }}}
    });
    deps.patch(
        "todo-webhook",
        &PatchParams::apply("e2e-chaos"),
        &Patch::Apply(&chaos),
    )
    .await?;
    let stacks: Api<KabStack> = Api::namespaced(ctx.client(), &ns);
    let degraded = wait_for(
        &stacks,
        "todo",
        |s: Option<&KabStack>| {
            s.and_then(|s| s.status.as_ref()).and_then(|s| s.phase)
                == Some(kab::api::Phase::Degraded)
        },
        Duration::from_secs(90),
    )
    .await?;
    let (_, reason, msg) = condition(&degraded, "Ready").context("Ready")?;
    ensure!(reason == "WebhookNotReady", "reason {reason}");
    ensure!(
        msg.contains(&format!("{ns}/todo-webhook")) && msg.contains("CreateContainerConfigError"),
        "message should name the blocker: {msg}"
    );
    withdraw_chaos(&deps, &ns).await?;
    wait_recovered(&stacks).await
}

/// The operator's counter of reconciliations (of every stack).
const RECONCILIATIONS: &str = "kab_operator_reconciliations_total";
/// How long invalid stacks are watched for a reconcile loop.
const HOT_LOOP_WINDOW: Duration = Duration::from_secs(30);

/// The objects of every kind kab renders that exist in namespace `ns` (but the namespace's own
/// `default` ServiceAccount and `kube-root-ca.crt` ConfigMap), and the cluster-scoped ones named
/// in `cluster_scoped`: `Kind ns/name` each.
async fn children_in(
    client: &kube::Client,
    ns: &str,
    cluster_scoped: &[&str],
) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    for kind in kab::render::kinds() {
        let r = &kind.resource;
        let api: Api<DynamicObject> = if kind.namespaced {
            Api::namespaced_with(client.clone(), ns, r)
        } else {
            Api::all_with(client.clone(), r)
        };
        for o in api.list(&ListParams::default()).await?.items {
            let name = o.name_any();
            let own = matches!(
                (r.kind.as_str(), name.as_str()),
                ("ServiceAccount", "default") | ("ConfigMap", "kube-root-ca.crt")
            );
            let ours = if kind.namespaced {
                !own
            } else {
                cluster_scoped.contains(&name.as_str())
                    || o.labels()
                        .get(kab::render::LABEL_STACK_NAMESPACE)
                        .map(String::as_str)
                        == Some(ns)
            };
            if ours {
                found.push(format!(
                    "{} {}{name}",
                    r.kind,
                    if kind.namespaced {
                        format!("{ns}/")
                    } else {
                        String::new()
                    }
                ));
            }
        }
    }
    Ok(found)
}

/// Each invalid stack is either refused by the API server with a message naming the field (what
/// the CRD's schema and rules catch), or accepted and then reported by the operator
/// `Reconciled=False/InvalidSpec` naming it (what only the operator can check). A reported stack
/// gets exactly one Warning Event, no child of any kind, and no reconcile loop.
///
/// On a plane of its own, with an operator of its own: every reconciliation that operator counts
/// is then one of these stacks.
async fn invalid_stacks_are_refused_or_reported(_ctx: Ctx) -> anyhow::Result<()> {
    let plane = OwnPlane::start().await?;
    let result = invalid_stacks(plane.get()).await;
    plane.stop(result).await
}

async fn invalid_stacks(plane: &Plane) -> anyhow::Result<()> {
    operator::install(plane, IMAGE).await?;
    let op = operator::start(plane, &Default::default()).await?;
    let client = plane.client();
    let ns = "invalid".to_string();
    restricted_namespace(&client, &ns).await?;
    let group = group_for(&ns);
    let base = todo_stack(&ns, "x", &group)?;
    type Edit = fn(&mut serde_json::Value);
    // Refused by the API server.
    let refused: Vec<(&str, Edit, &str)> = vec![
        (
            "two-storage",
            |v| {
                v["spec"]["entity"]["versions"] = json!([
                {"name": "v1", "storage": true, "schema": {"type": "object"}},
                {"name": "v2", "storage": true, "schema": {"type": "object"}}]);
            },
            "storage",
        ),
        (
            "no-storage",
            |v| {
                v["spec"]["entity"]["versions"] = json!([
                {"name": "v1", "schema": {"type": "object"}},
                {"name": "v2", "schema": {"type": "object"}}]);
            },
            "exactly one version",
        ),
        (
            "external-no-url",
            |v| v["spec"]["broker"] = json!({"mode": "External"}),
            "broker.url",
        ),
        (
            "url-not-external",
            |v| v["spec"]["broker"] = json!({"mode": "Managed", "url": "nats://x:4222"}),
            "broker.url",
        ),
        (
            "empty-kind",
            |v| v["spec"]["entity"]["kind"] = json!(""),
            "spec.entity.kind",
        ),
        (
            "lower-kind",
            |v| v["spec"]["entity"]["kind"] = json!("todo"),
            "spec.entity.kind",
        ),
        (
            "reserved-group",
            |v| v["spec"]["entity"]["group"] = json!("kab.dev"),
            "reserved",
        ),
        (
            "k8s-group",
            |v| v["spec"]["entity"]["group"] = json!("apps.k8s.io"),
            "reserved",
        ),
        (
            "two-rule-kinds",
            |v| {
                v["spec"]["rules"] =
                    json!([{"name": "both", "maxCount": 3, "unique": {"fields": ["spec.code"]}}]);
            },
            "exactly one of",
        ),
        (
            "no-rule-kind",
            |v| v["spec"]["rules"] = json!([{"name": "none"}]),
            "exactly one of",
        ),
        (
            "renew-after-expiry",
            |v| {
                v["spec"]["webhook"]["certificate"] =
                    json!({"validity": "1h", "renewBefore": "2h"});
            },
            "renewBefore",
        ),
        (
            "broker-replicas-2",
            |v| v["spec"]["broker"]["replicas"] = json!(2),
            "spec.broker.replicas",
        ),
        (
            "bad-version-name",
            |v| v["spec"]["entity"]["versions"][0]["name"] = json!("V1"),
            "name",
        ),
        (
            "long-name",
            |v| v["metadata"]["name"] = json!("a-name-that-is-much-too-long-for-a-kab-stack-x"),
            "40",
        ),
    ];
    let api: Api<KabStack> = Api::namespaced(client.clone(), &ns);
    let mut failures = Vec::new();
    for (i, (what, edit, expect)) in refused.iter().enumerate() {
        let mut v = base.clone();
        v["metadata"]["name"] = json!(format!("refused-{i}"));
        edit(&mut v);
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match api
            .patch(&name, &PatchParams::apply("e2e"), &Patch::Apply(&v))
            .await
        {
            Ok(_) => failures.push(format!("{what}: accepted by the API server")),
            Err(kube::Error::Api(s)) if s.message.contains(expect) => {}
            Err(e) => failures.push(format!("{what}: refused without naming {expect:?}: {e}")),
        }
    }

    // Accepted by the API server, reported by the operator.
    let reported: Vec<(&str, Edit, &str)> = vec![
        (
            "rule-path-not-in-schema",
            |v| {
                v["spec"]["rules"] = json!([{"name": "u", "unique": {"fields": ["spec.nope"]}}]);
            },
            "spec.rules[0].unique.fields[0]",
        ),
        (
            "non-structural-schema",
            |v| {
                v["spec"]["entity"]["versions"][0]["schema"]["properties"]["message"] =
                    json!({"description": "no type"});
            },
            "spec.entity.versions[0].schema",
        ),
        (
            "unique-on-object",
            |v| {
                v["spec"]["entity"]["versions"][0]["schema"]["properties"]["meta"] =
                    json!({"type": "object", "properties": {"a": {"type": "string"}}});
                v["spec"]["rules"] = json!([{"name": "u", "unique": {"fields": ["spec.meta"]}}]);
            },
            "spec.rules[0].unique.fields[0]",
        ),
        (
            "status-schema-kab",
            |v| {
                v["spec"]["entity"]["versions"][0]["statusSchema"] =
                    json!({"type": "object", "properties": {"kab": {"type": "string"}}});
            },
            "statusSchema",
        ),
    ];
    let mut invalid = Vec::new();
    for (i, (what, edit, expect)) in reported.iter().enumerate() {
        let mut v = base.clone();
        let name = format!("reported-{i}");
        v["metadata"]["name"] = json!(name);
        edit(&mut v);
        match api
            .patch(&name, &PatchParams::apply("e2e"), &Patch::Apply(&v))
            .await
        {
            Ok(_) => invalid.push((name, *what, *expect)),
            Err(e) => failures.push(format!(
                "{what}: refused by the API server, but it is the operator's to report: {e}"
            )),
        }
    }
    let mut reported_messages = Vec::new();
    for (name, what, expect) in &invalid {
        let got = wait_for(
            &api,
            name,
            |s: Option<&KabStack>| {
                s.is_some_and(|s| {
                    observed_current(s)
                        && condition(s, "Reconciled")
                            .is_some_and(|c| c.0 == "False" && c.1 == "InvalidSpec")
                })
            },
            Duration::from_secs(60),
        )
        .await;
        match got {
            Ok(s) => {
                let (_, _, msg) = condition(&s, "Reconciled").unwrap_or_default();
                if !msg.contains(expect) {
                    failures.push(format!(
                        "{what}: InvalidSpec message does not name {expect:?}: {msg}"
                    ));
                }
                if s.status.as_ref().and_then(|s| s.phase) != Some(kab::api::Phase::Failed) {
                    failures.push(format!("{what}: phase is not Failed"));
                }
                reported_messages.push((name.clone(), *what, msg));
            }
            Err(e) => failures.push(format!(
                "{what}: not reported Reconciled=False/InvalidSpec: {e:#}"
            )),
        }
    }

    // No loop: once every invalid stack is reported, the operator neither writes about them
    // (Events are counted below) nor reconciles them for 30 s: it waits for an edit. Its counter
    // counts these stacks only (the plane is the test's own).
    let registrations: Vec<String> = invalid
        .iter()
        .map(|(name, _, _)| format!("{name}.{ns}.kab.dev"))
        .collect();
    let crd = format!("todos.{group}");
    let mut cluster_scoped: Vec<&str> = registrations.iter().map(String::as_str).collect();
    cluster_scoped.push(&crd);
    let mine = audit::by_operator_about(&ns, &cluster_scoped);
    // A write may trail the last report (a reconcile already under way): let it land first.
    audit::settle(
        plane,
        &mine,
        Duration::from_secs(2),
        Duration::from_secs(10),
    )
    .await?;
    let reconciles_before = op.metric(RECONCILIATIONS).await?;
    let window = audit::Cursor::now(plane)?;
    let writes = window
        .observe(HOT_LOOP_WINDOW, |e| {
            mine(e)
                && e.object_ref
                    .as_ref()
                    .is_some_and(|o| o.resource != "events")
        })
        .await?;
    let reconciles = op.metric(RECONCILIATIONS).await? - reconciles_before;
    eprintln!(
        "invalid stacks: {reconciles} reconciliations in {}s, {} writes",
        HOT_LOOP_WINDOW.as_secs(),
        writes.len()
    );
    if !writes.is_empty() {
        failures.push(format!(
            "the operator kept writing about invalid stacks ({} writes in {}s):\n{}",
            writes.len(),
            HOT_LOOP_WINDOW.as_secs(),
            audit::describe(&writes)
        ));
    }
    if reconciles > 0.0 {
        failures.push(format!(
            "{reconciles} reconciliations in {}s while the invalid stacks waited for an edit: a \
             reconcile loop",
            HOT_LOOP_WINDOW.as_secs()
        ));
    }

    // Exactly one Warning Event per distinct message.
    let events = Api::<Event>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    for (name, what, msg) in &reported_messages {
        let warnings: Vec<&Event> = events
            .iter()
            .filter(|e| {
                e.involved_object.kind.as_deref() == Some("KabStack")
                    && e.involved_object.name.as_deref() == Some(name.as_str())
                    && e.type_.as_deref() == Some("Warning")
            })
            .collect();
        let shown = || {
            warnings
                .iter()
                .map(|e| {
                    format!(
                        "{:?} x{:?} (series {:?}): {:?}",
                        e.reason,
                        e.count,
                        e.series.as_ref().and_then(|s| s.count),
                        e.message
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let once = match warnings.as_slice() {
            [e] => {
                e.reason.as_deref() == Some("InvalidSpec")
                    && e.count.unwrap_or(1) == 1
                    && e.series.is_none()
                    && e.message.as_deref() == Some(msg.as_str())
            }
            _ => false,
        };
        if !once {
            failures.push(format!(
                "{what}: want exactly one Warning Event InvalidSpec {msg:?}, got {}: {}",
                warnings.len(),
                shown()
            ));
        }
    }

    // Invalid specs wrote nothing but status and Events: no child of any kind kab renders.
    let children = children_in(&client, &ns, &cluster_scoped).await?;
    if !children.is_empty() {
        failures.push(format!(
            "children were created for invalid stacks: {}",
            children.join(", ")
        ));
    }
    if !op.alive() {
        failures.push("the operator exited".into());
    }
    if op.log().contains("panicked") {
        failures.push("the operator panicked".into());
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("{}", failures.join("\n")))
    }
}

/// The stack's status is of its current generation.
fn observed_current(s: &KabStack) -> bool {
    s.status.as_ref().and_then(|st| st.observed_generation) == s.metadata.generation
}

/// Paused: the operator sees a child go but re-creates nothing and writes nothing about the stack
/// across a window (audit log); on resume the child is restored and Paused clears.
async fn paused_stack_is_left_alone(ctx: Ctx) -> anyhow::Result<()> {
    let (ns, group) = ready_todo(&ctx, "paused").await?;
    let plane = ctx.plane().clone();
    let mut stack = todo_stack(&ns, "todo", &group)?;
    stack["spec"]["paused"] = json!(true);
    apply_stack(&ctx, &stack).await?;
    let stacks: Api<KabStack> = Api::namespaced(ctx.client(), &ns);
    wait_for(
        &stacks,
        "todo",
        |s: Option<&KabStack>| {
            s.is_some_and(|s| {
                observed_current(s)
                    && s.status.as_ref().and_then(|s| s.phase) == Some(kab::api::Phase::Paused)
                    && condition(s, "Paused").is_some_and(|c| c.0 == "True")
            })
        },
        Duration::from_secs(30),
    )
    .await
    .context("the stack is not Paused")?;

    // While paused, a deleted child stays deleted: a watch records any re-creation, from the
    // deletion until the resume.
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client(), &ns);
    let old_uid = cms.get("todo-config").await?.uid();
    cms.delete("todo-config", &DeleteParams::default()).await?;
    let recreated = {
        let (cms, old_uid) = (cms.clone(), old_uid.clone());
        tokio::spawn(async move {
            let other = move |c: Option<&ConfigMap>| c.is_some_and(|c| c.uid() != old_uid);
            wait_for(&cms, "todo-config", other, Duration::from_secs(3600))
                .await
                .map(|c| c.metadata.creation_timestamp)
        })
    };
    // The operator sees it go: the status (all it may write while paused) says so.
    wait_for(
        &stacks,
        "todo",
        |s: Option<&KabStack>| {
            s.and_then(|s| s.status.as_ref()).is_some_and(|st| {
                st.components
                    .iter()
                    .any(|c| c.kind == "ConfigMap" && c.name.ends_with("/todo-config") && !c.ready)
            })
        },
        Duration::from_secs(30),
    )
    .await
    .context("the paused stack's status does not show the deleted ConfigMap")?;
    // Then nothing: no write by the operator about the stack across the window.
    let reg = format!("todo.{ns}.kab.dev");
    let crd = format!("todos.{group}");
    let window = audit::Cursor::now(&plane)?;
    let writes = window
        .observe(
            Duration::from_secs(20),
            audit::by_operator_about(&ns, &[&reg, &crd]),
        )
        .await?;
    if recreated.is_finished() {
        let created = recreated.await??;
        anyhow::bail!(
            "the paused stack's ConfigMap todo-config was re-created (at {})",
            created.map(|t| t.0.to_string()).unwrap_or_default()
        );
    }
    ensure!(
        writes.is_empty(),
        "the operator wrote {} times about the paused stack in 20 s:\n{}",
        writes.len(),
        audit::describe(&writes)
    );
    recreated.abort();

    // ...and is restored on resume: a new object.
    stack["spec"]["paused"] = json!(false);
    apply_stack(&ctx, &stack).await?;
    wait_for(
        &cms,
        "todo-config",
        move |c: Option<&ConfigMap>| c.is_some_and(|c| c.uid() != old_uid),
        Duration::from_secs(30),
    )
    .await
    .context("the deleted ConfigMap was not restored on resume")?;
    let resumed = wait_for(
        &stacks,
        "todo",
        |s: Option<&KabStack>| {
            s.is_some_and(|s| {
                observed_current(s)
                    && condition(s, "Paused").is_none_or(|c| c.0 == "False")
                    && kab::health::ready(s.status.as_ref())
            })
        },
        READY_TIMEOUT,
    )
    .await
    .context("the resumed stack is not Ready with Paused False at its current generation")?;
    let paused = resumed
        .status
        .as_ref()
        .and_then(|st| kab::status::condition(st, "Paused"));
    ensure!(
        paused.is_none_or(|c| c.observed_generation == resumed.metadata.generation),
        "the Paused condition is of generation {:?}, the stack of {:?}",
        paused.and_then(|c| c.observed_generation),
        resumed.metadata.generation
    );
    Ok(())
}

async fn no_private_key_in_logs_events_or_status(ctx: Ctx) -> anyhow::Result<()> {
    let (ns, _) = ready_todo(&ctx, "secrets").await?;
    let op = operator(&ctx).await?;
    let stack = Api::<KabStack>::namespaced(ctx.client(), &ns)
        .get("todo")
        .await?;
    let key = Api::<Secret>::namespaced(ctx.client(), &ns)
        .get("todo-webhook-tls")
        .await?;
    let key_pem = key
        .data
        .as_ref()
        .and_then(|d| d.get("tls.key"))
        .map(|k| String::from_utf8_lossy(&k.0).into_owned())
        .context("no tls.key")?;
    let body = key_pem.lines().nth(1).context("empty key")?.to_string();
    let status = serde_json::to_string(&stack.status)?;
    let events = serde_json::to_string(
        &Api::<Event>::namespaced(ctx.client(), &ns)
            .list(&ListParams::default())
            .await?
            .items,
    )?;
    let log = op.log();
    for (place, text) in [
        ("status", &status),
        ("events", &events),
        ("operator log", &log),
    ] {
        ensure!(
            !text.contains("PRIVATE KEY") && !text.contains(&body),
            "a private key appears in the {place}"
        );
    }
    // The CA key is never mounted into the webhook pod.
    let d = Api::<Deployment>::namespaced(ctx.client(), &ns)
        .get("todo-webhook")
        .await?;
    let mounted = serde_json::to_string(&d.spec.template.spec)?;
    ensure!(
        !mounted.contains("todo-webhook-ca"),
        "the CA Secret is mounted into the webhook pod"
    );
    Ok(())
}

fn wildcard(v: &Option<Vec<String>>) -> bool {
    v.as_ref()
        .is_some_and(|v| v.iter().any(|s| s.contains('*')))
}

async fn installed_rbac_is_least_privilege(ctx: Ctx) -> anyhow::Result<()> {
    let (ns, _) = ready_todo(&ctx, "rbac").await?;
    let client = ctx.client();
    let mut problems = Vec::new();
    for role in Api::<Role>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items
    {
        for r in role.rules.unwrap_or_default() {
            if wildcard(&r.api_groups)
                || wildcard(&r.resources)
                || r.verbs.iter().any(|v| v.contains('*'))
            {
                problems.push(format!(
                    "Role {} has a wildcard: {r:?}",
                    role.metadata.name.clone().unwrap_or_default()
                ));
            }
        }
    }
    let cr = Api::<ClusterRole>::all(client.clone())
        .get(kab::install::NAME)
        .await?;
    for r in cr.rules.unwrap_or_default() {
        if wildcard(&r.api_groups)
            || wildcard(&r.resources)
            || r.verbs.iter().any(|v| v.contains('*'))
        {
            problems.push(format!(
                "ClusterRole {} has a wildcard: {r:?}",
                kab::install::NAME
            ));
        }
    }
    for b in Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items
    {
        if b.role_ref.name == "cluster-admin" || b.role_ref.kind == "ClusterRole" {
            problems.push(format!(
                "RoleBinding {} binds {} {}",
                b.name_any(),
                b.role_ref.kind,
                b.role_ref.name
            ));
        }
    }
    for b in Api::<ClusterRoleBinding>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
    {
        let ours = b
            .subjects
            .iter()
            .flatten()
            .any(|s| s.name == kab::install::NAME);
        if ours && b.role_ref.name != kab::install::NAME {
            problems.push(format!(
                "ClusterRoleBinding {} gives kab {}",
                b.name_any(),
                b.role_ref.name
            ));
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// Once a stack is Ready and nothing changes, the operator writes nothing about it for 60 s:
/// no child, no status, no Event, and no dry-run admission probe (it is re-sent only when what it
/// depends on changes).
async fn an_idle_operator_makes_no_writes(ctx: Ctx) -> anyhow::Result<()> {
    let (ns, group) = ready_todo(&ctx, "idle").await?;
    let plane = ctx.plane().clone();
    let reg = format!("todo.{ns}.kab.dev");
    let crd = format!("todos.{group}");
    let mine = audit::by_operator_about(&ns, &[&reg, &crd]);
    // The filter sees the admission probe: the dry-run create that made the stack Ready.
    let probes = audit::Cursor::start(&plane)
        .since(|e| mine(e) && audit::is_dry_run(e) && e.verb == "create")?;
    ensure!(
        probes
            .iter()
            .any(|e| e.object_ref.as_ref().is_some_and(|o| o.resource == "todos")),
        "no dry-run entity create of the admission probe is counted for {ns}: the filter would \
         not see a re-probe"
    );
    // Let the last writes of the Ready transition land: wait (at most 30 s) until 5 s pass
    // without one.
    let quiet = Duration::from_secs(5);
    if !audit::settle(&plane, &mine, quiet, Duration::from_secs(30)).await? {
        eprintln!("idle: the operator still wrote after 30 s; observing anyway");
    }
    // The observation window itself: 60 s of idleness, as the issue asks.
    let window = audit::Cursor::now(&plane)?;
    let writes = window.observe(Duration::from_secs(60), &mine).await?;
    let probes = writes.iter().filter(|e| audit::is_dry_run(e)).count();
    eprintln!(
        "idle window: {} operator writes for the stack in 60 s ({probes} dry-run probes)",
        writes.len()
    );
    ensure!(
        writes.is_empty(),
        "the operator wrote {} times while idle ({probes} of them dry-run admission probes):\n{}",
        writes.len(),
        audit::describe(&writes)
    );
    Ok(())
}
