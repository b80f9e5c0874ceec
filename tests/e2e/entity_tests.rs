//! The entity controller against the real control plane and a real nats-server: every change of
//! an entity becomes one valid CloudEvent on the stack's JetStream stream, in order per entity,
//! and nothing is lost or duplicated when the broker is down, the controller is killed, or
//! entities are deleted while it is down.
//!
//! The controller runs as the built `kab entity-controller` process under exactly the RBAC the
//! stack renders (a client certificate of the stack's controller ServiceAccount), as the local
//! workload runtime will run it: `KUBECONFIG`, `KAB_METRICS_ADDR`, and `KAB_HOSTS_FILE` mapping
//! the broker's and the notify receiver's Service names to loopback.
//!
//! `KAB_E2E_ENTITY_WRITES` (default 200) scales the no-loss test, `KAB_E2E_BROKER_DOWN_SECS`
//! (default 20) sets how long the broker is down in it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use cloudevents::AttributesReader as _;
use futures::{StreamExt as _, TryStreamExt as _};
use kab::api::KabStack;
use kab::plane::Process;
use kab::render;
use kube::ResourceExt as _;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::{Value, json};

use crate::support::http::http_get;
use crate::support::{Ctx, Test, e2e_tests, wait_for};

pub fn tests() -> Vec<Test> {
    let mut tests = e2e_tests![
        changes_are_published_as_cloud_events_in_order_and_notified,
        broker_mode_none_keeps_status_and_publishes_nothing,
        a_managed_stack_publishes_through_its_own_broker,
    ];
    tests.push(
        Test::new(
            crate::support::qualified_name(
                module_path!(),
                "nothing_is_lost_or_duplicated_across_broker_and_controller_failures",
            ),
            nothing_is_lost_or_duplicated_across_broker_and_controller_failures,
        )
        .timeout(Duration::from_secs(300)),
    );
    tests
}

const STACK: &str = "shop";
const KIND: &str = "Order";
const PLURAL: &str = "orders";
const FINALIZER: &str = "kab.dev/publish";
const TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// create, update (spec), update (label only), delete → created, updated, deleted: each a valid
/// CloudEvent, in order per entity, nothing for the label-only edit; the same events reach the
/// notify URL (after a retried 503); status and conditions say so; /readyz and /metrics work.
async fn changes_are_published_as_cloud_events_in_order_and_notified(
    ctx: Ctx,
) -> anyhow::Result<()> {
    let ns = ctx.namespace("entity-events").await?;
    let env = StackEnv::install(&ctx, &ns).await?;
    let nats = Nats::start(&ctx, &ns, env.dir.path())?;
    nats.wait_serving().await?;
    let notify = NotifyReceiver::start(1).await?;
    let config = env.write_config(
        &format!("nats://{STACK}-broker.{ns}.svc:{}", nats.port),
        Some(&format!(
            "http://todo-api.{ns}.svc:{}/notifications",
            notify.port
        )),
    )?;
    let mut controller = Controller::start(&ctx, &env, &config)?;
    controller.wait_ready().await?;

    let api = env.entities(&ctx);
    let a = create(&api, "a", "A").await?;
    let a_uid = a.uid().context("uid")?;
    let a = wait_entity(&api, "a", |o| published(o) == Some(1)).await?;
    ensure!(
        a.finalizers().iter().any(|f| f == FINALIZER),
        "no finalizer on a"
    );
    let kab_status = &a.data["status"]["kab"];
    ensure!(
        condition(kab_status, "Published").0 == "True",
        "Published: {kab_status}"
    );
    ensure!(
        condition(kab_status, "Notified") == ("True".into(), "Delivered".into()),
        "Notified: {kab_status}"
    );

    update(&api, "a", "second").await?;
    let labelled = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"color": "blue"}}})),
        )
        .await?;
    ensure!(
        labelled.metadata.generation == Some(2),
        "a label must not bump the generation"
    );
    wait_entity(&api, "a", |o| published(o) == Some(2)).await?;

    let b = create(&api, "b", "B").await?;
    let b_uid = b.uid().context("uid")?;
    wait_entity(&api, "b", |o| published(o) == Some(1)).await?;
    api.delete("b", &DeleteParams::default()).await?;
    api.delete("a", &DeleteParams::default()).await?;
    wait_gone(&api, "a").await?;
    wait_gone(&api, "b").await?;

    let events = nats.read_stream(&env.stream()).await?;
    let seen: Vec<(String, String, i64)> = events
        .iter()
        .map(|e| (e.uid.clone(), e.change.clone(), e.generation))
        .collect();
    let of = |uid: &str| -> Vec<(String, i64)> {
        seen.iter()
            .filter(|(u, _, _)| u == uid)
            .map(|(_, c, g)| (c.clone(), *g))
            .collect()
    };
    ensure!(
        of(&a_uid)
            == [
                ("created".into(), 1),
                ("updated".into(), 2),
                // marking an entity with finalizers for deletion bumps its generation
                ("deleted".into(), 3)
            ],
        "events of a: {:?}",
        of(&a_uid)
    );
    ensure!(
        of(&b_uid) == [("created".into(), 1), ("deleted".into(), 2)],
        "events of b: {:?}",
        of(&b_uid)
    );
    ensure!(events.len() == 5, "5 events, got {seen:?}");
    let first = &events[0];
    ensure!(
        first.subject == format!("kab.{ns}.{PLURAL}.created"),
        "{}",
        first.subject
    );
    ensure!(
        first.event["source"] == format!("/apis/{}/v1/namespaces/{ns}/{PLURAL}/a", env.group),
        "{}",
        first.event
    );
    ensure!(
        first.event["type"] == format!("{}.{KIND}.created", env.group),
        "{}",
        first.event
    );
    ensure!(
        first.event["data"]["metadata"]
            .get("managedFields")
            .is_none(),
        "data keeps managedFields"
    );
    ensure!(first.event["data"]["spec"]["code"] == "A");

    // The notify receiver got the same events (the first attempt was answered 503 and retried).
    let delivered = notify.wait_for(5).await?;
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let mut notified: Vec<&str> = delivered.iter().filter_map(|e| e["id"].as_str()).collect();
    notified.dedup();
    ensure!(notified == ids, "notified {notified:?}, published {ids:?}");
    ensure!(notify.refused() == 1, "one 503 answered");

    let (status, _) =
        http_get(&format!("127.0.0.1:{}", controller.metrics_port), "/readyz").await?;
    ensure!(status == 200, "readyz {status}");
    // The backlog gauges are refreshed every second.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = http_get(
            &format!("127.0.0.1:{}", controller.metrics_port),
            "/metrics",
        )
        .await?;
        let missing: Vec<&str> = [
            "kab_entity_controller_events_published_total{event=\"created\"} 2",
            "kab_entity_controller_events_published_total{event=\"updated\"} 1",
            "kab_entity_controller_events_published_total{event=\"deleted\"} 2",
            "kab_entity_controller_queue_depth 0",
            "kab_entity_controller_publish_lag_seconds 0",
            "kab_entity_controller_broker_connected 1",
        ]
        .into_iter()
        .filter(|line| !metrics.contains(line))
        .collect();
        if missing.is_empty() {
            break;
        }
        ensure!(Instant::now() < deadline, "{missing:?} not in\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    controller.stop();
    Ok(())
}

/// Broker mode None: the controller runs and keeps status (`Published=False BrokerDisabled`),
/// adds no finalizer, and is ready without a broker.
async fn broker_mode_none_keeps_status_and_publishes_nothing(ctx: Ctx) -> anyhow::Result<()> {
    let ns = ctx.namespace("entity-none").await?;
    let env = StackEnv::install(&ctx, &ns).await?;
    let path = env.write_config("nats://unused.invalid:4222", None)?;
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    config["broker"] = json!({"mode": "None", "url": null, "storage": null});
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
    let mut controller = Controller::start(&ctx, &env, &path)?;
    controller.wait_ready().await?;

    let api = env.entities(&ctx);
    create(&api, "n", "N").await?;
    update(&api, "n", "two").await?;
    let n = wait_entity(&api, "n", |o| {
        o.data["status"]["kab"]["observedGeneration"] == 2
    })
    .await?;
    let kab_status = &n.data["status"]["kab"];
    ensure!(
        condition(kab_status, "Published") == ("False".into(), "BrokerDisabled".into()),
        "{kab_status}"
    );
    ensure!(
        kab_status.get("publishedGeneration").is_none(),
        "{kab_status}"
    );
    ensure!(
        !n.finalizers().iter().any(|f| f == FINALIZER),
        "no finalizer without anywhere to deliver"
    );
    api.delete("n", &DeleteParams::default()).await?;
    wait_gone(&api, "n").await?;
    controller.stop();
    Ok(())
}

/// The whole path as the operator builds it, run by the local workload runtime: the managed
/// broker (a StatefulSet with a File store) and the entity controller Deployment run as real
/// processes; an entity written through the API server arrives as a CloudEvent on the stack's
/// stream, read through the broker's Service.
async fn a_managed_stack_publishes_through_its_own_broker(ctx: Ctx) -> anyhow::Result<()> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Service;
    crate::support::operator(&ctx).await?;
    let ns = crate::support::local_namespace(&ctx, "entity-managed").await?;
    let group = format!("{ns}.e2e.example.com");
    let mut stack = crate::support::todo_stack(&ns, "todo", &group)?;
    stack["spec"]["rules"] = json!([]);
    stack["spec"]["controller"] = json!({"replicas": 1}); // no business application here
    crate::support::apply_stack(&ctx, &stack).await?;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client(), &ns);
    let controller = wait_for(
        &deployments,
        "todo-controller",
        |d: Option<&Deployment>| {
            d.and_then(|d| d.status.as_ref())
                .and_then(|s| s.available_replicas)
                == Some(1)
        },
        Duration::from_secs(120),
    )
    .await
    .context("the entity controller did not become ready (broker connected, watching)")?;
    let args =
        serde_json::to_value(&controller)?["spec"]["template"]["spec"]["containers"][0]["args"]
            .clone();
    ensure!(
        args.as_array()
            .is_some_and(|a| a.contains(&json!("--stream-replicas=1"))),
        "{args}"
    );

    let resource = ApiResource {
        group: group.clone(),
        version: "v1".into(),
        api_version: format!("{group}/v1"),
        kind: "Todo".into(),
        plural: "todos".into(),
    };
    let todos: Api<DynamicObject> = Api::namespaced_with(ctx.client(), &ns, &resource);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": resource.api_version, "kind": "Todo",
        "metadata": {"name": "buy-milk"}, "spec": {"code": "M1", "message": "buy milk"},
    }))?;
    let created = todos.create(&PostParams::default(), &obj).await?;
    let todo = wait_entity(&todos, "buy-milk", |o| published(o) == Some(1)).await?;
    ensure!(
        condition(&todo.data["status"]["kab"], "Published").0 == "True",
        "{}",
        todo.data["status"]
    );

    let svc = Api::<Service>::namespaced(ctx.client(), &ns)
        .get("todo-broker")
        .await?;
    let ip = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .context("no ClusterIP")?;
    let client = async_nats::connect(format!("nats://{ip}:4222")).await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(format!("kab-{ns}-todo")).await?;
    let info = stream.info().await?;
    ensure!(
        info.config.storage == async_nats::jetstream::stream::StorageType::File
            && info.config.subjects == [format!("kab.{ns}.todos.>")],
        "stream {:?} {:?}",
        info.config.storage,
        info.config.subjects
    );
    let message = stream.get_raw_message(1).await.context("the first event")?;
    let event: cloudevents::Event = serde_json::from_slice(&message.payload)?;
    ensure!(
        event.ty() == format!("{group}.Todo.created")
            && event.subject() == Some("buy-milk")
            && event.id() == format!("{}:created", created.uid().unwrap_or_default()),
        "{event}"
    );
    todos.delete("buy-milk", &DeleteParams::default()).await?;
    wait_gone(&todos, "buy-milk").await?;
    let last = stream.info().await?.state.last_sequence;
    let message = stream.get_raw_message(last).await?;
    ensure!(
        message.subject.as_str() == format!("kab.{ns}.todos.deleted"),
        "{}",
        message.subject
    );
    Ok(())
}

/// The acceptance test of the no-loss guarantee, scaled by `KAB_E2E_ENTITY_WRITES`:
/// writes while (a) nats-server is stopped and restarted on the same port and store, (b) the
/// controller process is SIGKILLed four times (once with acknowledged events whose progress it could
/// not record, twice while publishing, once before deletes), (c) entities are
/// deleted while it is down. After recovery the stream holds exactly one event per observed
/// change: one `created` and (for deleted entities) one `deleted` per object, `updated` events
/// with strictly increasing generations ending at the entity's last generation, no duplicate id.
async fn nothing_is_lost_or_duplicated_across_broker_and_controller_failures(
    ctx: Ctx,
) -> anyhow::Result<()> {
    let writes = env_number("KAB_E2E_ENTITY_WRITES", 200).max(40);
    let down = Duration::from_secs(env_number("KAB_E2E_BROKER_DOWN_SECS", 20) as u64);
    let started = Instant::now();
    let ns = ctx.namespace("entity-noloss").await?;
    let env = StackEnv::install(&ctx, &ns).await?;
    let mut nats = Nats::start(&ctx, &ns, env.dir.path())?;
    nats.wait_serving().await?;
    let config = env.write_config(
        &format!("nats://{STACK}-broker.{ns}.svc:{}", nats.port),
        None,
    )?;
    let mut controller = Controller::start(&ctx, &env, &config)?;
    controller.wait_ready().await?;
    let api = env.entities(&ctx);
    let book = Arc::new(Book::default());

    // 1. (b) Kill #1 after events were acknowledged but their progress could not be recorded
    //    (the controller's status permission is taken away): the restarted controller
    //    publishes them again and the broker drops the retries; entities updated while it was
    //    down get their update published after their creation.
    env.allow_status_writes(&ctx, false).await?;
    let initial = writes / 5;
    let names: Vec<String> = (0..initial).map(|i| format!("o-{i:04}")).collect();
    burst(
        &api,
        &book,
        names.iter().map(|n| Op::Create(n.clone())).collect(),
    )
    .await?;
    let deadline = Instant::now() + TIMEOUT;
    while scrape(controller.metrics_port).await?.published < initial as u64 {
        ensure!(
            Instant::now() < deadline,
            "the creations were not published"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    controller.crash().await;
    let ops = (0..writes / 20)
        .map(|i| Op::Update(names[i * 2].clone()))
        .collect();
    burst(&api, &book, ops).await?;
    env.allow_status_writes(&ctx, true).await?;
    controller.restart(&ctx)?;
    wait_all_published(&api, TIMEOUT).await?;
    ensure!(
        scrape(controller.metrics_port).await?.duplicates >= initial as u64,
        "every creation was published again and deduplicated"
    );

    // 2. (a) The broker is down while entities change; the controller notices, then the
    //    broker comes back on the same port and store.
    nats.stop();
    let ops = (0..writes / 5)
        .map(|i| Op::Update(names[i * 7 % names.len()].clone()))
        .collect();
    burst(&api, &book, ops).await?;
    wait_entity(&api, &names[0], |o| {
        condition(&o.data["status"]["kab"], "Published").0 == "False"
    })
    .await
    .context("the controller did not report the broker outage on the entity")?;
    let outage = Instant::now();
    if let Some(rest) = down.checked_sub(outage.duration_since(nats.stopped_at)) {
        tokio::time::sleep(rest).await; // the outage itself, not a wait for something
    }
    nats.restart(&ctx)?;
    nats.wait_serving().await?;
    controller.wait_ready().await?; // reconnected, catching up

    // 3. (b) Kill #1 while it publishes the backlog and a burst of creates and updates.
    let extra: Vec<String> = (0..writes / 20).map(|i| format!("p-{i:04}")).collect();
    let mut ops: Vec<Op> = extra.iter().map(|n| Op::Create(n.clone())).collect();
    ops.extend((0..writes / 10).map(|i| Op::Update(names[(i * 3 + 1) % names.len()].clone())));
    controller.kill_during(burst(&api, &book, ops)).await?;
    controller.restart(&ctx)?;

    // 4. (b)+(c) Kill #2, then deletes, creates and updates while the controller is down.
    wait_all_published(&api, TIMEOUT).await?; // the deleted ones carry the finalizer
    controller.crash().await;
    let doomed: Vec<String> = names.iter().rev().take(writes / 10).cloned().collect();
    let late: Vec<String> = (0..writes / 20).map(|i| format!("q-{i:04}")).collect();
    let mut ops: Vec<Op> = doomed.iter().map(|n| Op::Delete(n.clone())).collect();
    ops.extend(late.iter().map(|n| Op::Create(n.clone())));
    ops.extend((0..writes / 20).map(|i| Op::Update(names[i % (names.len() / 2)].clone())));
    burst(&api, &book, ops).await?;
    controller.restart(&ctx)?;
    controller.wait_ready().await?;

    // 5. (b) Kill #3 while it publishes what happened while it was down and a burst of updates.
    let live: Vec<String> = names
        .iter()
        .filter(|n| !doomed.contains(n))
        .chain(&extra)
        .chain(&late)
        .cloned()
        .collect();
    let remaining = writes.saturating_sub(book.writes());
    let ops = (0..remaining)
        .map(|i| Op::Update(live[(i * 5 + 2) % live.len()].clone()))
        .collect();
    controller.kill_during(burst(&api, &book, ops)).await?;
    controller.restart(&ctx)?;
    controller.wait_ready().await?;

    // Recovery: every live entity published at its generation, every deleted one gone.
    wait_all_published(&api, Duration::from_secs(90)).await?;
    for name in &doomed {
        wait_gone(&api, name).await?;
    }
    let recovered = started.elapsed();
    let deduplicated = controller.duplicates + scrape(controller.metrics_port).await?.duplicates;
    ensure!(controller.kills == 4, "{} kills", controller.kills);

    let events = nats.read_stream(&env.stream()).await?;
    let live_objects = api.list(&Default::default()).await?.items;
    let report = check_no_loss(&book, &events, &live_objects)?;
    println!(
        "entity_tests no-loss: {} writes on {} entities ({} deleted while the controller was down), \
         broker down {}s, controller SIGKILLed {} times → {} events ({} created, {} updated, {} deleted), \
         0 duplicates (ids and changes; {} retries dropped by the broker's deduplication), 0 missing, \
         {} generations superseded before they were observed, max lag change→stored {:.1}s, p50 {:.1}s; \
         whole scenario {:.0}s",
        book.writes(),
        report.entities,
        doomed.len(),
        down.as_secs(),
        controller.kills,
        events.len(),
        report.created,
        report.updated,
        report.deleted,
        deduplicated,
        report.superseded,
        report.max_lag.as_secs_f64(),
        report.p50_lag.as_secs_f64(),
        recovered.as_secs_f64(),
    );
    controller.stop();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The stack: its entity API and RBAC, rendered by kab and applied here (no operator, no webhook)
// ---------------------------------------------------------------------------------------------

struct StackEnv {
    ns: String,
    group: String,
    stack: KabStack,
    resource: ApiResource,
    /// The controller's Role as rendered (to take a permission away and give it back).
    controller_role: render::Child,
    dir: tempfile::TempDir,
}

impl StackEnv {
    /// Renders a stack with an entity group of its own and applies its RBAC and entity CRD.
    async fn install(ctx: &Ctx, ns: &str) -> anyhow::Result<Self> {
        let group = format!("{ns}.e2e.example.com");
        let stack: KabStack = serde_json::from_value(json!({
            "apiVersion": "kab.dev/v1alpha1",
            "kind": "KabStack",
            "metadata": {"name": STACK, "namespace": ns},
            "spec": {
                "entity": {
                    "group": group,
                    "kind": KIND,
                    "versions": [{"name": "v1", "schema": {
                        "type": "object",
                        "required": ["code"],
                        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                    }}],
                },
                "broker": {"mode": "External", "url": format!("nats://{STACK}-broker.{ns}.svc:4222")},
            },
        }))?;
        kab::validate::validate(&stack).map_err(|e| anyhow!("invalid test stack: {e}"))?;
        let rendered = crate::support::apply_rbac_entity_api_and_config(ctx, ns, &stack).await?;
        let resource = ApiResource {
            group: group.clone(),
            version: "v1".into(),
            api_version: format!("{group}/v1"),
            kind: KIND.into(),
            plural: PLURAL.into(),
        };
        let controller_role = rendered
            .get("Role", &format!("{STACK}-controller"))
            .context("no controller Role rendered")?
            .clone();
        Ok(Self {
            ns: ns.to_owned(),
            group,
            stack,
            resource,
            controller_role,
            dir: tempfile::tempdir()?,
        })
    }

    /// Applies the controller's Role without (`false`) or with its rule on `<plural>/status`:
    /// without it, events are acknowledged but their progress cannot be recorded, so the
    /// controller retries them.
    async fn allow_status_writes(&self, ctx: &Ctx, allowed: bool) -> anyhow::Result<()> {
        let mut role = self.controller_role.object.clone();
        if !allowed {
            let status = format!("{PLURAL}/status");
            if let Some(rules) = role.data["rules"].as_array_mut() {
                rules.retain(|r| {
                    !r["resources"]
                        .as_array()
                        .is_some_and(|a| a.contains(&json!(status)))
                });
            }
        }
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client(), &self.ns, &self.controller_role.resource);
        api.patch(
            self.controller_role.name(),
            &PatchParams::apply("kab-e2e").force(),
            &Patch::Apply(&role),
        )
        .await?;
        Ok(())
    }

    fn entities(&self, ctx: &Ctx) -> Api<DynamicObject> {
        Api::namespaced_with(ctx.client(), &self.ns, &self.resource)
    }

    fn stream(&self) -> String {
        format!("kab-{}-{STACK}", self.ns)
    }

    /// `stack.json` as the operator renders it, with the broker (and notify) URLs given, and a
    /// hosts file mapping their hosts to loopback.
    fn write_config(&self, broker_url: &str, notify_url: Option<&str>) -> anyhow::Result<PathBuf> {
        let mut config = render::stack_config(&self.stack);
        config["broker"]["url"] = json!(broker_url);
        if let Some(url) = notify_url {
            config["controller"]["notify"] = json!({"url": url, "timeoutSeconds": 2});
        }
        let path = self.dir.path().join("stack.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        let hosts = format!(
            "# the local workload runtime's view of the Services\n\
             127.0.0.1 {STACK}-broker.{ns}.svc {STACK}-broker.{ns}.svc.cluster.local\n\
             127.0.0.1 todo-api.{ns}.svc\n",
            ns = self.ns
        );
        std::fs::write(self.dir.path().join("hosts"), hosts)?;
        Ok(path)
    }
}

// ---------------------------------------------------------------------------------------------
// Processes: nats-server and the controller
// ---------------------------------------------------------------------------------------------

struct Nats {
    process: Option<Process>,
    name: String,
    port: u16,
    store: PathBuf,
    bin: PathBuf,
    stopped_at: Instant,
}

impl Nats {
    fn start(ctx: &Ctx, ns: &str, dir: &Path) -> anyhow::Result<Self> {
        let mut nats = Self {
            process: None,
            name: format!("nats-{ns}"),
            port: kab::plane::free_port()?,
            store: dir.join("jetstream"),
            bin: ctx.bin("nats-server"),
            stopped_at: Instant::now(),
        };
        nats.restart(ctx)?;
        Ok(nats)
    }

    fn restart(&mut self, ctx: &Ctx) -> anyhow::Result<()> {
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-sd",
        ])
        .arg(&self.store);
        self.process = Some(ctx.plane().spawn(&self.name, cmd)?);
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop(Duration::from_secs(5));
        }
        self.stopped_at = Instant::now();
    }

    async fn wait_serving(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let url = format!("nats://127.0.0.1:{}", self.port);
            if let Ok(client) = async_nats::connect(&url).await {
                let js = async_nats::jetstream::new(client);
                if js.query_account().await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let log = self
                    .process
                    .as_ref()
                    .map(|p| p.log_tail(20))
                    .unwrap_or_default();
                bail!(
                    "nats-server on port {} not serving JetStream:\n{log}",
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every event of `stream`, read from the start by an ordered consumer.
    async fn read_stream(&self, stream: &str) -> anyhow::Result<Vec<Received>> {
        let client = async_nats::connect(format!("nats://127.0.0.1:{}", self.port)).await?;
        let js = async_nats::jetstream::new(client);
        let mut stream = js
            .get_stream(stream)
            .await
            .with_context(|| format!("stream {stream}"))?;
        let last = stream.info().await?.state.last_sequence;
        let mut events = Vec::new();
        if last == 0 {
            return Ok(events);
        }
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let read = async {
            while let Some(message) = messages.try_next().await? {
                let info = message.info().map_err(|e| anyhow!("{e}"))?;
                let sequence = info.stream_sequence;
                let stored = info.published;
                events.push(Received::parse(&message, stored)?);
                if sequence >= last {
                    break;
                }
            }
            Ok::<_, anyhow::Error>(())
        };
        tokio::time::timeout(TIMEOUT, read)
            .await
            .map_err(|_| anyhow!("reading {last} messages timed out"))??;
        Ok(events)
    }
}

struct Controller {
    process: Option<Process>,
    name: String,
    cmd: Box<dyn Fn() -> Command + Send + Sync>,
    metrics_port: u16,
    kills: u32,
    /// Retries the broker deduplicated, summed over the killed processes (as last scraped).
    duplicates: u64,
}

impl Controller {
    /// `kab entity-controller` with the identity of the stack's controller ServiceAccount.
    fn start(ctx: &Ctx, env: &StackEnv, config: &Path) -> anyhow::Result<Self> {
        let kubeconfig = ctx.plane().write_kubeconfig(
            &format!("system:serviceaccount:{}:{STACK}-controller", env.ns),
            &[
                "system:serviceaccounts",
                &format!("system:serviceaccounts:{}", env.ns),
                "system:authenticated",
            ],
        )?;
        let metrics_port = kab::plane::free_port()?;
        let config = config.to_owned();
        let hosts = env.dir.path().join("hosts");
        let identity = format!("{}-controller-0", env.ns);
        let cmd = move || {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_kab"));
            cmd.arg("entity-controller")
                .arg("--config")
                .arg(&config)
                .args(["--lease-duration-seconds", "10"])
                .env("KUBECONFIG", &kubeconfig)
                .env("KAB_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
                .env("KAB_HOSTS_FILE", &hosts)
                .env("POD_NAME", &identity)
                .env(
                    "RUST_LOG",
                    std::env::var("KAB_E2E_CONTROLLER_LOG")
                        .unwrap_or_else(|_| "info,kab=debug,kube=warn,async_nats=warn".into()),
                );
            cmd
        };
        let mut controller = Self {
            process: None,
            name: format!("entity-controller-{}", env.ns),
            cmd: Box::new(cmd),
            metrics_port,
            kills: 0,
            duplicates: 0,
        };
        controller.restart(ctx)?;
        Ok(controller)
    }

    fn restart(&mut self, ctx: &Ctx) -> anyhow::Result<()> {
        self.process = Some(ctx.plane().spawn(&self.name, (self.cmd)())?);
        Ok(())
    }

    /// Notes what the controller deduplicated so far, and SIGKILLs it.
    async fn crash(&mut self) {
        if let Ok(m) = scrape(self.metrics_port).await {
            self.duplicates += m.duplicates;
        }
        self.kill();
    }

    /// SIGKILL: no graceful shutdown, no Lease release, whatever was in flight is cut.
    fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            // SAFETY: kill(2) on our own child, which `Process` has not reaped yet.
            unsafe {
                libc::kill(p.pid() as libc::pid_t, libc::SIGKILL);
            }
            p.stop(Duration::from_secs(1));
            self.kills += 1;
        }
    }

    /// Runs `burst` and SIGKILLs the controller as soon as it has published 5 more events than
    /// before (so the kill lands while it is publishing), then lets the burst finish.
    async fn kill_during(
        &mut self,
        burst: impl Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let port = self.metrics_port;
        let before = scrape(port).await?.published;
        let mut burst = std::pin::pin!(burst);
        let publishing = async {
            loop {
                if let Ok(m) = scrape(port).await
                    && m.published >= before + 5
                {
                    return m;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let mut publishing = std::pin::pin!(publishing);
        let seen = tokio::select! {
            r = &mut burst => {
                r?;
                tokio::time::timeout(TIMEOUT, publishing).await.map_err(|_| anyhow!("the controller published nothing"))?
            }
            m = &mut publishing => m,
        };
        self.duplicates += seen.duplicates;
        self.kill();
        burst.await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok((200, _)) =
                http_get(&format!("127.0.0.1:{}", self.metrics_port), "/readyz").await
            {
                return Ok(());
            }
            if let Some(p) = self.process.as_mut()
                && let Some(status) = p.exited()
            {
                bail!("entity controller exited ({status}):\n{}", p.log_tail(30));
            }
            if Instant::now() > deadline {
                bail!("entity controller not ready:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_tail(&self) -> String {
        self.process
            .as_ref()
            .map(|p| p.log_tail(30))
            .unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.stop(Duration::from_secs(5));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writes, and what the test knows it wrote
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Create(String),
    Update(String),
    Delete(String),
}

/// Every write the test made: per object (uid), its name, its last generation, whether deleted.
#[derive(Default)]
struct Book {
    inner: Mutex<BookInner>,
}

#[derive(Default)]
struct BookInner {
    writes: usize,
    objects: BTreeMap<String, Written>,
}

#[derive(Clone, Debug)]
struct Written {
    name: String,
    generation: i64,
    deleted: bool,
}

impl Book {
    fn writes(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).writes
    }

    fn record(&self, obj: &DynamicObject, deleted: bool) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.writes += 1;
        let uid = obj.uid().unwrap_or_default();
        let generation = obj.metadata.generation.unwrap_or(1);
        let entry = inner.objects.entry(uid).or_insert_with(|| Written {
            name: obj.name_any(),
            generation,
            deleted,
        });
        entry.generation = entry.generation.max(generation);
        entry.deleted |= deleted;
    }

    fn objects(&self) -> BTreeMap<String, Written> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .objects
            .clone()
    }
}

/// Runs `ops` four at a time (writes to one entity keep their order: each goes to a queue of
/// its own name).
async fn burst(api: &Api<DynamicObject>, book: &Arc<Book>, ops: Vec<Op>) -> anyhow::Result<()> {
    let mut queues: BTreeMap<String, Vec<Op>> = BTreeMap::new();
    for op in ops {
        let name = match &op {
            Op::Create(n) | Op::Update(n) | Op::Delete(n) => n.clone(),
        };
        queues.entry(name).or_default().push(op);
    }
    futures::stream::iter(queues.into_values())
        .map(|queue| {
            let (api, book) = (api.clone(), book.clone());
            async move {
                for op in queue {
                    match op {
                        Op::Create(name) => {
                            let obj = create(&api, &name, &name.to_uppercase()).await?;
                            book.record(&obj, false);
                        }
                        Op::Update(name) => {
                            let message = format!("w{}", book.writes());
                            let obj = update(&api, &name, &message).await?;
                            book.record(&obj, false);
                        }
                        Op::Delete(name) => {
                            let obj = api.get(&name).await?;
                            api.delete(&name, &DeleteParams::default()).await?;
                            book.record(&obj, true);
                        }
                    }
                }
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(4)
        .try_collect::<()>()
        .await
}

async fn create(api: &Api<DynamicObject>, name: &str, code: &str) -> anyhow::Result<DynamicObject> {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": api_version(api),
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {"code": code, "message": "first"},
    }))?;
    api.create(&PostParams::default(), &obj)
        .await
        .with_context(|| format!("creating {name}"))
}

/// `<group>/<version>` of the entity API (its URL is `/apis/<group>/<version>/namespaces/…`).
fn api_version(api: &Api<DynamicObject>) -> String {
    let url = api.resource_url();
    let mut parts = url.trim_start_matches("/apis/").split('/');
    match (parts.next(), parts.next()) {
        (Some(group), Some(version)) => format!("{group}/{version}"),
        _ => String::new(),
    }
}

async fn update(
    api: &Api<DynamicObject>,
    name: &str,
    message: &str,
) -> anyhow::Result<DynamicObject> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"message": message}})),
    )
    .await
    .with_context(|| format!("updating {name}"))
}

// ---------------------------------------------------------------------------------------------
// Waiting on watches
// ---------------------------------------------------------------------------------------------

fn published(obj: &DynamicObject) -> Option<i64> {
    obj.data["status"]["kab"]["publishedGeneration"].as_i64()
}

fn condition(kab_status: &Value, type_: &str) -> (String, String) {
    kab_status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .unwrap_or_default()
}

/// Waits on a watch until entity `name` satisfies `cond`.
async fn wait_entity(
    api: &Api<DynamicObject>,
    name: &str,
    cond: impl Fn(&DynamicObject) -> bool,
) -> anyhow::Result<DynamicObject> {
    let mut last = None;
    let watch = async {
        let mut stream = std::pin::pin!(watcher::watch_object(api.clone(), name));
        while let Some(event) = stream.next().await {
            if let Ok(Some(obj)) = event {
                if cond(&obj) {
                    return Some(obj);
                }
                last = Some(obj);
            }
        }
        None
    };
    match tokio::time::timeout(TIMEOUT, watch).await {
        Ok(Some(obj)) => Ok(obj),
        _ => bail!(
            "timed out waiting for entity {name}; last seen status: {}",
            last.map(|o| o.data["status"].to_string())
                .unwrap_or_else(|| "none".into())
        ),
    }
}

async fn wait_gone(api: &Api<DynamicObject>, name: &str) -> anyhow::Result<()> {
    let watch = async {
        let mut stream = std::pin::pin!(watcher::watch_object(api.clone(), name));
        while let Some(event) = stream.next().await {
            if let Ok(None) = event {
                return;
            }
        }
    };
    tokio::time::timeout(TIMEOUT, watch)
        .await
        .map_err(|_| anyhow!("entity {name} still exists"))
}

/// Waits on a watch of every entity until each live one is published at its generation.
async fn wait_all_published(api: &Api<DynamicObject>, timeout: Duration) -> anyhow::Result<()> {
    let mut objects: HashMap<String, DynamicObject> = HashMap::new();
    let pending = |objects: &HashMap<String, DynamicObject>| -> Vec<String> {
        objects
            .values()
            .filter(|o| {
                o.metadata.deletion_timestamp.is_none() && published(o) != o.metadata.generation
            })
            .map(|o| o.name_any())
            .collect()
    };
    let mut synced = false;
    let mut last_pending = Vec::new();
    let watch = async {
        let mut stream = std::pin::pin!(watcher(api.clone(), watcher::Config::default()));
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    objects.insert(o.name_any(), o);
                }
                Ok(watcher::Event::Delete(o)) => {
                    objects.remove(&o.name_any());
                }
                Ok(watcher::Event::Init) => {
                    objects.clear();
                    synced = false;
                }
                Ok(watcher::Event::InitDone) => synced = true,
                Err(_) => continue,
            }
            if synced {
                last_pending = pending(&objects);
                if last_pending.is_empty() {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(timeout, watch).await.map_err(|_| {
        anyhow!(
            "{} entities not published after {}s: {:?}",
            last_pending.len(),
            timeout.as_secs(),
            last_pending.iter().take(10).collect::<Vec<_>>()
        )
    })
}

// ---------------------------------------------------------------------------------------------
// What the subscriber received
// ---------------------------------------------------------------------------------------------

struct Received {
    id: String,
    subject: String,
    uid: String,
    change: String,
    generation: i64,
    event: Value,
    /// When the broker stored it.
    stored: time::OffsetDateTime,
    /// When the change happened (the event's `time`).
    time: time::OffsetDateTime,
}

impl Received {
    /// Checks one message: a CloudEvents 1.0 structured event (parsed by the CloudEvents SDK),
    /// whose id is the message's `Nats-Msg-Id` and whose type matches the subject.
    fn parse(
        message: &async_nats::jetstream::Message,
        stored: time::OffsetDateTime,
    ) -> anyhow::Result<Self> {
        let subject = message.subject.to_string();
        let sdk: cloudevents::Event = serde_json::from_slice(&message.payload)
            .with_context(|| format!("message on {subject} is not a CloudEvent"))?;
        let event: Value = serde_json::from_slice(&message.payload)?;
        ensure!(
            sdk.specversion() == cloudevents::event::SpecVersion::V10,
            "specversion {}",
            sdk.specversion()
        );
        let msg_id = message
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_owned())
            .context("no Nats-Msg-Id")?;
        ensure!(
            sdk.id() == msg_id,
            "id {} != Nats-Msg-Id {msg_id}",
            sdk.id()
        );
        let change = subject.rsplit('.').next().unwrap_or_default().to_owned();
        ensure!(
            sdk.ty().ends_with(&format!(".{change}")),
            "type {} on subject {subject}",
            sdk.ty()
        );
        ensure!(
            sdk.datacontenttype() == Some("application/json"),
            "datacontenttype {:?}",
            sdk.datacontenttype()
        );
        let name = event["data"]["metadata"]["name"]
            .as_str()
            .unwrap_or_default();
        ensure!(
            sdk.subject() == Some(name) && sdk.source().ends_with(&format!("/{PLURAL}/{name}")),
            "subject {:?} / source {} for entity {name}",
            sdk.subject(),
            sdk.source()
        );
        let time = sdk.time().context("no time")?;
        let time = time::OffsetDateTime::from_unix_timestamp(time.timestamp())?;
        Ok(Self {
            id: msg_id,
            subject,
            uid: event["data"]["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            change,
            generation: event["kabgeneration"].as_i64().unwrap_or_default(),
            event,
            stored,
            time,
        })
    }
}

#[derive(Debug)]
struct NoLossReport {
    entities: usize,
    created: usize,
    updated: usize,
    deleted: usize,
    superseded: i64,
    max_lag: Duration,
    p50_lag: Duration,
}

/// Exactly one event per observed change, none missing, in order per entity.
fn check_no_loss(
    book: &Book,
    events: &[Received],
    live: &[DynamicObject],
) -> anyhow::Result<NoLossReport> {
    let ids: HashSet<&str> = events.iter().map(|e| e.id.as_str()).collect();
    ensure!(
        ids.len() == events.len(),
        "{} duplicate message ids",
        events.len() - ids.len()
    );
    let mut per_uid: HashMap<&str, Vec<&Received>> = HashMap::new();
    for e in events {
        per_uid.entry(&e.uid).or_default().push(e);
    }
    let live_generation: HashMap<String, i64> = live
        .iter()
        .filter_map(|o| Some((o.uid()?, o.metadata.generation?)))
        .collect();
    let objects = book.objects();
    let mut problems = Vec::new();
    let mut superseded = 0;
    for (uid, written) in &objects {
        let seq = per_uid.remove(uid.as_str()).unwrap_or_default();
        let changes: Vec<(&str, i64)> = seq
            .iter()
            .map(|e| (e.change.as_str(), e.generation))
            .collect();
        let name = &written.name;
        let final_generation = live_generation
            .get(uid)
            .copied()
            .unwrap_or(written.generation);
        if changes.first().map(|c| c.0) != Some("created") {
            problems.push(format!("{name}: does not start with created: {changes:?}"));
        }
        let created = changes.iter().filter(|c| c.0 == "created").count();
        let deleted = changes.iter().filter(|c| c.0 == "deleted").count();
        if created != 1 {
            problems.push(format!("{name}: {created} created events: {changes:?}"));
        }
        if deleted != usize::from(written.deleted) {
            problems.push(format!(
                "{name}: {deleted} deleted events (deleted: {}): {changes:?}",
                written.deleted
            ));
        }
        if written.deleted && changes.last().map(|c| c.0) != Some("deleted") {
            problems.push(format!("{name}: deleted is not last: {changes:?}"));
        }
        let generations: Vec<i64> = changes
            .iter()
            .filter(|c| c.0 != "deleted")
            .map(|c| c.1)
            .collect();
        if generations.windows(2).any(|w| w[0] >= w[1]) {
            problems.push(format!(
                "{name}: generations not strictly increasing: {changes:?}"
            ));
        }
        // An update first seen together with the deletion is published with the generation of
        // the entity marked for deletion (one more than its last write).
        let last = generations.last().copied();
        let complete = last == Some(final_generation)
            || (written.deleted && last == Some(final_generation + 1));
        if !complete {
            problems.push(format!(
                "{name}: last published generation {:?}, the entity's last is {final_generation}: {changes:?}",
                generations.last()
            ));
        }
        superseded += final_generation - i64::try_from(generations.len()).unwrap_or(0);
    }
    if !per_uid.is_empty() {
        problems.push(format!(
            "events of {} objects the test never wrote",
            per_uid.len()
        ));
    }
    if !problems.is_empty() {
        bail!(
            "{} problems in {} events:\n{}",
            problems.len(),
            events.len(),
            problems.join("\n")
        );
    }
    let mut lags: Vec<Duration> = events
        .iter()
        .map(|e| Duration::try_from(e.stored - e.time).unwrap_or(Duration::ZERO))
        .collect();
    lags.sort();
    let count = |c: &str| events.iter().filter(|e| e.change == c).count();
    Ok(NoLossReport {
        entities: objects.len(),
        created: count("created"),
        updated: count("updated"),
        deleted: count("deleted"),
        superseded,
        max_lag: lags.last().copied().unwrap_or_default(),
        p50_lag: lags.get(lags.len() / 2).copied().unwrap_or_default(),
    })
}

// ---------------------------------------------------------------------------------------------
// HTTP: the notify receiver, and GETs of the controller's endpoints
// ---------------------------------------------------------------------------------------------

/// Records every CloudEvent POSTed to it; answers 503 to the first `refuse` requests.
struct NotifyReceiver {
    port: u16,
    received: Arc<Mutex<Vec<Value>>>,
    refused: Arc<Mutex<usize>>,
    server: tokio::task::JoinHandle<()>,
}

impl NotifyReceiver {
    async fn start(refuse: usize) -> anyhow::Result<Self> {
        use axum::http::{HeaderMap, StatusCode};
        let received = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(0usize));
        let (r, f) = (received.clone(), refused.clone());
        let app = axum::Router::new().route(
            "/notifications",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (r, f) = (r.clone(), f.clone());
                async move {
                    let mut refused = f.lock().unwrap_or_else(|p| p.into_inner());
                    if *refused < refuse {
                        *refused += 1;
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let structured = headers
                        .get("content-type")
                        .is_some_and(|v| v == "application/cloudevents+json");
                    match serde_json::from_slice::<cloudevents::Event>(&body) {
                        Ok(_) if structured => {
                            if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                                r.lock().unwrap_or_else(|p| p.into_inner()).push(v);
                            }
                            StatusCode::NO_CONTENT
                        }
                        _ => StatusCode::BAD_REQUEST,
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            port,
            received,
            refused,
            server,
        })
    }

    fn refused(&self) -> usize {
        *self.refused.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn wait_for(&self, n: usize) -> anyhow::Result<Vec<Value>> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let got = self
                .received
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if got.len() >= n {
                return Ok(got);
            }
            if Instant::now() > deadline {
                bail!("notify receiver got {} of {n} events", got.len());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for NotifyReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// What the controller's /metrics say.
struct Scraped {
    published: u64,
    duplicates: u64,
}

async fn scrape(port: u16) -> anyhow::Result<Scraped> {
    let (status, text) = http_get(&format!("127.0.0.1:{port}"), "/metrics").await?;
    ensure!(status == 200, "/metrics: HTTP {status}");
    let sum = |name: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    Ok(Scraped {
        published: sum("kab_entity_controller_events_published_total"),
        duplicates: sum("kab_entity_controller_duplicates_total"),
    })
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
