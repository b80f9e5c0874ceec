//! The control plane itself: workloads run, CRDs serve, namespaces are
//! collected, versions are stamped, KWOK simulates failing pods, writes are
//! audited.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, PersistentVolumeClaim, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kab::plane::{NODE_NAME, is_deployment_available, is_node_ready};
use kube::ResourceExt as _;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::runtime::wait::conditions;
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::json;

use crate::support::fixtures::{self, CRASH_LOOP, SIMULATE_LABEL};
use crate::support::{Ctx, Test, e2e_tests, wait_deleted, wait_for};

/// The Kubernetes version tests/go/build.sh builds.
const KUBERNETES_VERSION: &str = "v1.37.2";

pub fn tests() -> Vec<Test> {
    e2e_tests![
        fake_node_is_ready_untainted_and_roomy,
        deployment_becomes_available,
        statefulset_with_volume_claims_becomes_ready,
        crd_is_established_and_watchable,
        namespace_deletion_removes_everything,
        kubectl_and_server_report_the_built_version,
        crash_loop_pod_is_not_ready_while_a_normal_pod_is,
        audit_log_records_writes_only,
    ]
}

fn available(d: Option<&Deployment>) -> bool {
    d.is_some_and(is_deployment_available)
}

fn pod_ready(p: &Pod) -> Option<bool> {
    let conds = p.status.as_ref()?.conditions.as_ref()?;
    let ready = conds.iter().find(|c| c.type_ == "Ready")?;
    Some(ready.status == "True")
}

async fn fake_node_is_ready_untainted_and_roomy(ctx: Ctx) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(ctx.client());
    let node = nodes.get(NODE_NAME).await?;
    ensure!(is_node_ready(&node), "node not Ready: {:?}", node.status);
    ensure!(
        node.labels().get("type").map(String::as_str) == Some("kwok"),
        "labels: {:?}",
        node.labels()
    );
    let taints = node.spec.as_ref().and_then(|s| s.taints.as_ref());
    ensure!(taints.is_none_or(|t| t.is_empty()), "taints: {taints:?}");
    let quantity = &node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get("pods"))
        .context("no allocatable pods")?
        .0;
    // The API server canonicalises 10000 to "10k".
    let (digits, scale) = match quantity.strip_suffix('k') {
        Some(d) => (d, 1_000),
        None => (quantity.as_str(), 1),
    };
    let pods = digits
        .parse::<u64>()
        .with_context(|| format!("allocatable pods {quantity:?}"))?
        * scale;
    ensure!(pods >= 1000, "allocatable pods: {quantity}");
    Ok(())
}

async fn deployment_becomes_available(ctx: Ctx) -> anyhow::Result<()> {
    let ns = ctx.namespace("deploy").await?;
    let api: Api<Deployment> = Api::namespaced(ctx.client(), &ns);
    api.create(&PostParams::default(), &fixtures::deployment("web", 2, &[]))
        .await?;
    let d = wait_for(&api, "web", available, Duration::from_secs(60)).await?;
    let status = d.status.context("no status")?;
    ensure!(
        status.ready_replicas == Some(2),
        "ready replicas: {:?}",
        status.ready_replicas
    );

    let pods: Api<Pod> = Api::namespaced(ctx.client(), &ns);
    let list = pods.list(&ListParams::default().labels("app=web")).await?;
    ensure!(list.items.len() == 2, "{} pods", list.items.len());
    for p in &list.items {
        let status = p.status.as_ref().context("pod without status")?;
        ensure!(
            status.phase.as_deref() == Some("Running"),
            "{}: {:?}",
            p.name_any(),
            status.phase
        );
        ensure!(status.pod_ip.is_some(), "{} has no pod IP", p.name_any());
        ensure!(pod_ready(p) == Some(true), "{} not Ready", p.name_any());
    }
    Ok(())
}

async fn statefulset_with_volume_claims_becomes_ready(ctx: Ctx) -> anyhow::Result<()> {
    let ns = ctx.namespace("sts").await?;
    let api: Api<StatefulSet> = Api::namespaced(ctx.client(), &ns);
    api.create(&PostParams::default(), &fixtures::statefulset("db", 2))
        .await?;
    let ready = |s: Option<&StatefulSet>| {
        s.and_then(|s| s.status.as_ref())
            .is_some_and(|st| st.ready_replicas == Some(2) && st.available_replicas == Some(2))
    };
    wait_for(&api, "db", ready, Duration::from_secs(60)).await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client(), &ns);
    for i in 0..2 {
        let pvc = claims.get(&format!("data-db-{i}")).await?;
        let phase = pvc.status.as_ref().and_then(|s| s.phase.as_deref());
        ensure!(phase == Some("Bound"), "data-db-{i}: {phase:?}");
        let class = pvc
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.as_deref());
        ensure!(
            class == Some(kab::plane::STORAGE_CLASS),
            "data-db-{i} class {class:?}"
        );
    }
    Ok(())
}

async fn crd_is_established_and_watchable(ctx: Ctx) -> anyhow::Result<()> {
    let ns = ctx.namespace("crd").await?;
    let group = "e2e-plane.kab.dev";
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": format!("widgets.{group}") },
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": { "plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList" },
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "properties": { "spec": {
                        "type": "object",
                        "properties": { "size": { "type": "integer" } },
                    }},
                }},
            }],
        },
    }))?;
    let name = crd.name_any();
    crds.create(&PostParams::default(), &crd).await?;
    wait_for(
        &crds,
        &name,
        conditions::is_crd_established(),
        Duration::from_secs(30),
    )
    .await?;

    let resource = ApiResource {
        group: group.into(),
        version: "v1".into(),
        api_version: format!("{group}/v1"),
        kind: "Widget".into(),
        plural: "widgets".into(),
    };
    let widgets: Api<DynamicObject> = Api::namespaced_with(ctx.client(), &ns, &resource);
    let mut seen = watcher(widgets.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut widget = DynamicObject::new("w1", &resource);
    widget.data = json!({ "spec": { "size": 3 } });
    widgets.create(&PostParams::default(), &widget).await?;

    let got = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(obj) = seen.try_next().await? {
            if obj.name_any() == "w1" {
                return Ok(obj);
            }
        }
        bail!("the watch ended")
    })
    .await
    .context("timed out waiting for the Widget on the watch")??;
    ensure!(
        got.data["spec"]["size"] == 3,
        "unexpected object: {:?}",
        got.data
    );

    crds.delete(&name, &DeleteParams::default()).await?;
    Ok(())
}

async fn namespace_deletion_removes_everything(ctx: Ctx) -> anyhow::Result<()> {
    let ns = ctx.namespace("gc").await?;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client(), &ns);
    let configmaps: Api<ConfigMap> = Api::namespaced(ctx.client(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client(), &ns);
    let replicasets: Api<ReplicaSet> = Api::namespaced(ctx.client(), &ns);
    deployments
        .create(&PostParams::default(), &fixtures::deployment("app", 3, &[]))
        .await?;
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": { "name": "settings" },
        "data": { "k": "v" },
    }))?;
    configmaps.create(&PostParams::default(), &cm).await?;
    wait_for(&deployments, "app", available, Duration::from_secs(60)).await?;
    ensure!(pods.list(&ListParams::default()).await?.items.len() == 3);

    let namespaces: Api<Namespace> = Api::all(ctx.client());
    let start = Instant::now();
    namespaces.delete(&ns, &DeleteParams::background()).await?;
    wait_deleted(&namespaces, &ns, Duration::from_secs(120)).await?;
    eprintln!(
        "e2e: namespace {ns} with 3 pods gone in {:.1}s",
        start.elapsed().as_secs_f64()
    );

    let lp = ListParams::default();
    let left = [
        ("deployments", deployments.list(&lp).await?.items.len()),
        ("replicasets", replicasets.list(&lp).await?.items.len()),
        ("pods", pods.list(&lp).await?.items.len()),
        ("configmaps", configmaps.list(&lp).await?.items.len()),
    ];
    ensure!(left.iter().all(|(_, n)| *n == 0), "left in {ns}: {left:?}");
    Ok(())
}

async fn kubectl_and_server_report_the_built_version(ctx: Ctx) -> anyhow::Result<()> {
    let out = ctx.kubectl(["version", "--output=json"]).await?;
    let v: serde_json::Value = serde_json::from_str(&out).context("kubectl version output")?;
    ensure!(
        v["clientVersion"]["gitVersion"] == KUBERNETES_VERSION,
        "kubectl client version: {}",
        v["clientVersion"]
    );
    ensure!(
        v["serverVersion"]["gitVersion"] == KUBERNETES_VERSION,
        "server version: {}",
        v["serverVersion"]
    );
    let info = ctx.client().apiserver_version().await?;
    ensure!(info.git_version == KUBERNETES_VERSION, "/version: {info:?}");
    Ok(())
}

async fn crash_loop_pod_is_not_ready_while_a_normal_pod_is(ctx: Ctx) -> anyhow::Result<()> {
    let ns = ctx.namespace("crash").await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client(), &ns);
    let pp = PostParams::default();
    pods.create(&pp, &fixtures::pod("healthy", &[])).await?;
    pods.create(
        &pp,
        &fixtures::pod("crashing", &[(SIMULATE_LABEL, CRASH_LOOP)]),
    )
    .await?;

    let healthy = wait_for(
        &pods,
        "healthy",
        |p: Option<&Pod>| p.and_then(pod_ready) == Some(true),
        Duration::from_secs(60),
    )
    .await?;
    ensure!(
        healthy.status.and_then(|s| s.pod_ip).is_some(),
        "healthy pod has no IP"
    );

    let crash_looping = |p: Option<&Pod>| {
        p.and_then(|p| p.status.as_ref())
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.first())
            .is_some_and(|c| {
                let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref());
                waiting.and_then(|w| w.reason.as_deref()) == Some("CrashLoopBackOff")
                    && c.restart_count > 0
                    && !c.ready
            })
    };
    wait_for(&pods, "crashing", crash_looping, Duration::from_secs(60)).await?;
    // Read it again: nothing (e.g. the pod-ready stage) made it Ready since.
    let crashing = pods.get("crashing").await?;
    ensure!(
        pod_ready(&crashing) == Some(false),
        "crashing pod: {:?}",
        crashing.status
    );
    let phase = crashing.status.as_ref().and_then(|s| s.phase.as_deref());
    ensure!(phase == Some("Running"), "crashing pod phase: {phase:?}");
    Ok(())
}

async fn audit_log_records_writes_only(ctx: Ctx) -> anyhow::Result<()> {
    let ns = ctx.namespace("audit").await?;
    let configmaps: Api<ConfigMap> = Api::namespaced(ctx.client(), &ns);
    let cm: ConfigMap = serde_json::from_value(json!({ "metadata": { "name": "audited" } }))?;
    configmaps.create(&PostParams::default(), &cm).await?;
    configmaps.get("audited").await?;

    // The audit backend writes after the response; the file cannot be
    // watched, so poll it (bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let events = ctx.plane().audit_events()?;
        let found = events.iter().any(|e| {
            e.verb == "create"
                && e.user.username == "kab-admin"
                && e.response_status.as_ref().is_some_and(|s| s.code == 201)
                && e.object_ref.as_ref().is_some_and(|o| {
                    o.resource == "configmaps" && o.namespace == ns && o.name == "audited"
                })
        });
        if found {
            let reads: Vec<&str> = events
                .iter()
                .map(|e| e.verb.as_str())
                .filter(|v| matches!(*v, "get" | "list" | "watch"))
                .collect();
            ensure!(reads.is_empty(), "reads in the audit log: {reads:?}");
            ensure!(
                events
                    .iter()
                    .all(|e| e.stage == "ResponseComplete" || e.stage == "Panic")
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "no audit event for creating configmap {ns}/audited in {} ({} events)",
                ctx.plane().audit_log_path().display(),
                events.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
