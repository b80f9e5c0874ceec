//! `kab entity-controller`: publishes every change of a stack's entities to its broker.
//!
//! The pipeline, one module per step: [`config`] (`stack.json`, checked) → [`reconcile`] (per
//! entity, through kube-runtime's work queue: finalizer, catch-up, publish, notify, status) with
//! the pure parts in [`event`] (the CloudEvent, subject and deduplication id) and [`status`]
//! (`status.kab`), the I/O in [`broker`] (NATS JetStream) and [`notify`] (HTTP callback), and
//! [`metrics`] (metrics and readiness, served on `/metrics` and `/readyz`).
//!
//! Guarantees: every creation, generation change and deletion that the controller observes is
//! published at least once and stored once (JetStream deduplication on a stable id), in order
//! per entity. Progress is written on the entity only after the broker's acknowledgement, and a
//! finalizer holds a deleted entity until its `deleted` event is acknowledged. Generations that
//! follow each other faster than the controller (or while it is down) are observed as one change
//! with the latest content: the API server keeps no history.

pub mod broker;
pub mod config;
pub mod event;
pub mod metrics;
pub mod notify;
pub mod reconcile;
pub mod status;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject};
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::watch;

use self::broker::{Broker, StreamOptions};
use self::config::StackConfig;
use self::metrics::Metrics;
use self::notify::Notifier;
use self::reconcile::Context;
use crate::hosts::Hosts;
use crate::leader::{Election, stopped_or_lost};
use crate::telemetry::{LogFormat, init_logs, serve_health};

/// `kab entity-controller` arguments.
#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// The stack configuration (`stack.json` of the stack's ConfigMap).
    #[arg(long, default_value = crate::render::CONFIG_PATH)]
    pub config: PathBuf,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "KAB_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Elect one active replica with the Lease named in the configuration.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Lease duration: how long a dead leader blocks the others.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// Identity in leader election (default: POD_NAME, else host and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Entities processed at once (one entity is never processed twice at once).
    #[arg(long, default_value_t = 16)]
    pub workers: u16,
    /// JetStream deduplication window: retries within it are stored once.
    #[arg(long, default_value_t = 600)]
    pub duplicate_window_seconds: u64,
    /// How long the stream keeps events.
    #[arg(long, default_value_t = 7 * 24 * 3600)]
    pub max_age_seconds: u64,
    /// Stream replicas (the managed broker's server count).
    #[arg(long, default_value_t = 1)]
    pub stream_replicas: usize,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// Runs the entity controller until SIGTERM/SIGINT (or until it loses leadership, an error).
pub async fn run(args: Args) -> anyhow::Result<()> {
    init_logs(args.log_format, "info,kube=warn,async_nats=warn");
    let config = Arc::new(StackConfig::load(&args.config)?);
    let hosts = Hosts::path_from_env();
    let metrics = Arc::new(Metrics::new(config.publishes()));
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("listening on {} for health and metrics", args.metrics_addr))?;
    let server = tokio::spawn(serve_health(listener, metrics.clone()));

    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster config or KUBECONFIG)")?;
    let options = StreamOptions {
        duplicate_window: Duration::from_secs(args.duplicate_window_seconds.max(1)),
        max_age: Duration::from_secs(args.max_age_seconds),
        replicas: args.stream_replicas,
    };
    let broker = if config.publishes() {
        Some(Broker::connect(&config, &options, hosts.as_deref()).await?)
    } else {
        tracing::warn!("broker mode is None: entity changes are not published");
        None
    };
    let notifier = config
        .controller
        .notify
        .as_ref()
        .map(|n| Notifier::new(n, hosts.clone()));
    tracing::info!(
        stack = %format!("{}/{}", config.stack.namespace, config.stack.name),
        entity = %format!("{}.{}", config.entity.plural, config.entity.group),
        version = %config.version(),
        broker = ?config.broker.mode,
        stream = broker.as_ref().map(|b| b.stream_name()).unwrap_or("-"),
        notify = config.controller.notify.as_ref().map(|n| n.url.as_str()).unwrap_or("-"),
        "kab entity controller starting"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    if let Some(broker) = &broker {
        let (broker, metrics) = (broker.clone(), metrics.clone());
        tokio::spawn(async move {
            loop {
                metrics.set_broker_connected(broker.connected());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let mut election = None;
    if args.leader_elect {
        let Some(won) = elect(&client, &config, &identity, &args, stop_rx.clone()).await? else {
            return Ok(()); // stopped while waiting
        };
        election = Some(won);
    }
    metrics.set_leading(true);

    let resource = config.api_resource();
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &config.stack.namespace, &resource);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: reconcile::MANAGER.to_owned(),
            instance: Some(identity.clone()),
        },
    );
    let ctx = Arc::new(Context::new(
        config.clone(),
        api.clone(),
        resource.clone(),
        broker.clone(),
        notifier,
        recorder,
        metrics.clone(),
    ));

    // The entity watch and its cache, built here rather than by `Controller::new` so that
    // readiness comes from the watch itself (the store's own readiness signal wakes only one
    // waiter, and the controller's runner is already waiting on it).
    let writer = reflector::store::Writer::new(resource.clone());
    let store = writer.as_reader();
    let watching = metrics.clone();
    let entities = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .inspect(move |event| match event {
            Ok(watcher::Event::InitDone) => {
                if !watching.watching() {
                    tracing::info!("watching entities");
                }
                watching.set_watching(true);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "entity watch failed (retrying)"),
        })
        .reflect(writer)
        .applied_objects();
    let controller = Controller::for_stream_with(entities, store.clone(), resource)
        .with_config(ControllerConfig::default().concurrency(args.workers.max(1)));
    tokio::spawn(watch_backlog(store, ctx.clone()));

    let (lost_tx, mut lost_rx) = watch::channel(false);
    let leader = election.as_ref().map(Election::leader);
    let stop = stop_rx.clone();
    let shutdown = async move {
        if stopped_or_lost(leader, stop).await {
            tracing::error!("lost the leader Lease: stopping");
            let _ = lost_tx.send(true);
        }
    };
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;

    metrics.set_leading(false);
    if let Some(broker) = &broker {
        broker.flush().await;
    }
    if let Some(election) = election {
        election.release().await;
    }
    server.abort();
    if *lost_rx.borrow_and_update() {
        anyhow::bail!("lost the leader Lease");
    }
    tracing::info!("kab entity controller stopped");
    Ok(())
}

/// Waits to become the leader; `None` when stopped first.
async fn elect(
    client: &kube::Client,
    config: &StackConfig,
    identity: &str,
    args: &Args,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Option<Election>> {
    let duration = args.lease_duration_seconds.max(2);
    let lease = config.lease_name();
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &lease)
        .with_namespace(&config.stack.namespace)
        .with_identity(identity)
        .with_duration(duration)
        .with_grace((duration / 3).max(1))
        .build()
        .await
        .context("setting up leader election")?;
    tracing::info!(%identity, %lease, "waiting to become the leader");
    let won = Election::win(manager, stop).await?;
    if won.is_some() {
        tracing::info!(%identity, %lease, "became the leader");
    }
    Ok(won)
}

/// Every second: the backlog metrics (entities with an unpublished change, age of the oldest
/// change), and forgetting entities that are gone.
async fn watch_backlog(store: Store<DynamicObject>, ctx: Arc<Context>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let objects = store.state();
        let now = Timestamp::now();
        let mut depth = 0usize;
        let mut oldest: Option<Timestamp> = None;
        for obj in &objects {
            if let Some(change) = ctx.pending(obj) {
                depth += 1;
                if let Some(t) = event::change_time(obj, change, reconcile::MANAGER) {
                    oldest = Some(oldest.map_or(t, |o| o.min(t)));
                }
            }
        }
        let age = oldest.and_then(|t| Duration::try_from(now.duration_since(t)).ok());
        ctx.metrics.set_backlog(depth, age);
        let uids: HashSet<String> = objects
            .iter()
            .filter_map(|o| o.metadata.uid.clone())
            .collect();
        if ctx.metrics.watching() {
            ctx.retain(&uids);
        }
    }
}
