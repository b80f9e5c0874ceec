//! The broker side: one NATS connection, the stack's JetStream stream (created or updated by the
//! controller), and publishing with deduplication.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;

use super::config::StackConfig;
use super::event::{self, CLOUDEVENTS_JSON};
use crate::api::JetStreamStorage;
use crate::hosts;

/// NATS header carrying the entity generation an event was built from.
pub const GENERATION_HEADER: &str = "Kab-Generation";

/// Stream settings that do not come from `stack.json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    /// JetStream's deduplication window: a retry of the same event within it is dropped.
    pub duplicate_window: Duration,
    /// How long events are kept.
    pub max_age: Duration,
    /// Stream replicas (the managed broker's server count).
    pub replicas: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            duplicate_window: Duration::from_secs(10 * 60),
            max_age: Duration::from_secs(7 * 24 * 3600),
            replicas: 1,
        }
    }
}

/// `kab-<namespace>-<stack>`: the stream of one stack's entity changes.
pub fn stream_name(config: &StackConfig) -> String {
    format!("kab-{}-{}", config.stack.namespace, config.stack.name)
}

/// The stream the controller creates or updates.
pub fn stream_config(config: &StackConfig, options: &StreamOptions) -> stream::Config {
    stream::Config {
        name: stream_name(config),
        description: Some(format!(
            "Changes of {}.{} in namespace {} (KabStack {})",
            config.entity.plural, config.entity.group, config.stack.namespace, config.stack.name
        )),
        subjects: vec![event::stream_subjects(config)],
        storage: match config.broker.storage {
            Some(JetStreamStorage::Memory) => stream::StorageType::Memory,
            Some(JetStreamStorage::File) | None => stream::StorageType::File,
        },
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: options.duplicate_window,
        max_age: options.max_age,
        num_replicas: options.replicas.max(1),
        ..Default::default()
    }
}

/// Why an event was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Not connected right now (the client reconnects by itself).
    #[error("not connected to the broker at {url}")]
    Disconnected { url: String },
    /// The stream could not be created or updated.
    #[error("creating or updating stream {stream}: {message}")]
    Stream { stream: String, message: String },
    /// The publish or its acknowledgement failed.
    #[error("publishing to {subject}: {message}")]
    Publish { subject: String, message: String },
}

impl BrokerError {
    /// Short class for the failures metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            BrokerError::Disconnected { .. } => "broker disconnected",
            BrokerError::Stream { .. } => "stream",
            BrokerError::Publish { .. } => "publish",
        }
    }
}

/// What the broker said about one publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// Stream sequence of the message (of the original one for a duplicate).
    pub sequence: u64,
    /// The broker already had a message with this id (a retry).
    pub duplicate: bool,
}

/// A connection to the stack's broker.
pub struct Broker {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    stream: stream::Config,
    stream_ready: AtomicBool,
    stream_lock: tokio::sync::Mutex<()>,
    url: String,
}

impl Broker {
    /// Connects in the background (the client retries and reconnects forever), resolving the
    /// URL's host through the hosts file at `hosts` when given.
    pub async fn connect(
        config: &StackConfig,
        options: &StreamOptions,
        hosts: Option<&Path>,
    ) -> anyhow::Result<Arc<Self>> {
        let url = config
            .broker
            .url
            .clone()
            .ok_or_else(|| anyhow::anyhow!("broker.url is not set"))?;
        let resolved = match hosts {
            Some(path) => hosts::resolve_in_file(&url, path, Duration::from_secs(60)).await,
            None => None,
        };
        let mut connect = match &config.broker.credentials_file {
            Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| {
                    anyhow::anyhow!("reading broker credentials {}: {e}", path.display())
                })?,
            None => async_nats::ConnectOptions::new(),
        }
        .name(format!(
            "kab-entity-controller {}/{}",
            config.stack.namespace, config.stack.name
        ))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100u64 << attempts.min(5) as u64).min(2_000))
        })
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("broker connected"),
                async_nats::Event::Disconnected => tracing::warn!("broker disconnected"),
                other => tracing::info!(event = %other, "broker event"),
            }
        });
        let target = match &resolved {
            Some(r) => {
                tracing::info!(url = %url, resolved = %r.url, "broker host resolved through {}", hosts::HOSTS_FILE_ENV);
                // Servers announced by the broker are cluster names the hosts file may not map.
                connect = connect.ignore_discovered_servers();
                r.url.clone()
            }
            None => url.clone(),
        };
        let client = connect
            .connect(target.as_str())
            .await
            .map_err(|e| anyhow::anyhow!("connecting to the broker at {url}: {e}"))?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .build(client.clone());
        Ok(Arc::new(Self {
            client,
            jetstream,
            stream: stream_config(config, options),
            stream_ready: AtomicBool::new(false),
            stream_lock: tokio::sync::Mutex::new(()),
            url,
        }))
    }

    /// Whether the connection is up.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.stream.name
    }

    /// Creates or updates the stream once per process (and again after it went missing, e.g.
    /// a Memory broker restarted).
    async fn ensure_stream(&self) -> Result<(), BrokerError> {
        if self.stream_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let _guard = self.stream_lock.lock().await;
        if self.stream_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        self.jetstream
            .create_or_update_stream(self.stream.clone())
            .await
            .map_err(|e| BrokerError::Stream {
                stream: self.stream.name.clone(),
                message: e.to_string(),
            })?;
        tracing::info!(stream = %self.stream.name, subjects = ?self.stream.subjects, "stream ready");
        self.stream_ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Publishes `payload` to `subject` with deduplication id `id` and waits for the ack.
    pub async fn publish(
        &self,
        subject: &str,
        id: &str,
        generation: i64,
        payload: Bytes,
    ) -> Result<Ack, BrokerError> {
        if !self.connected() {
            return Err(BrokerError::Disconnected {
                url: self.url.clone(),
            });
        }
        self.ensure_stream().await?;
        let failed = |e: &dyn std::fmt::Display| BrokerError::Publish {
            subject: subject.to_owned(),
            message: e.to_string(),
        };
        let message = jetstream::message::PublishMessage::build()
            .payload(payload)
            .message_id(id)
            .expected_stream(&self.stream.name)
            .header(GENERATION_HEADER, generation.to_string().as_str())
            .header("Content-Type", CLOUDEVENTS_JSON);
        let result = match self
            .jetstream
            .send_publish(subject.to_owned(), message)
            .await
        {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match result {
            Ok(ack) => Ok(Ack {
                sequence: ack.sequence,
                duplicate: ack.duplicate,
            }),
            Err(e) => {
                if e.kind() == PublishErrorKind::StreamNotFound {
                    self.stream_ready.store(false, Ordering::Release);
                }
                Err(failed(&e))
            }
        }
    }

    /// The entity generation of the stored message `sequence` (from its header), if it is still
    /// in the stream.
    pub async fn generation_of(&self, sequence: u64) -> Option<i64> {
        let stream = self
            .jetstream
            .get_stream_no_info(&self.stream.name)
            .await
            .ok()?;
        let message = stream.get_raw_message(sequence).await.ok()?;
        message
            .headers
            .get(GENERATION_HEADER)
            .and_then(|v| v.as_str().parse().ok())
    }

    /// Sends what is buffered (before the process exits).
    pub async fn flush(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_stream_holds_every_change_of_the_stack() {
        let text = r#"{
          "stack": {"name": "todo", "namespace": "shop"},
          "entity": {"group": "todo.example.com", "kind": "Todo", "plural": "todos",
                     "storageVersion": "v1"},
          "controller": {"subjectPrefix": "kab"},
          "broker": {"mode": "Managed", "url": "nats://todo-broker.shop.svc:4222", "storage": "Memory"}
        }"#;
        let config = StackConfig::parse(Path::new("stack.json"), text).unwrap();
        let stream = stream_config(&config, &StreamOptions::default());
        assert_eq!(stream.name, "kab-shop-todo");
        assert_eq!(stream.subjects, vec!["kab.shop.todos.>".to_owned()]);
        assert_eq!(stream.storage, stream::StorageType::Memory);
        assert_eq!(stream.duplicate_window, Duration::from_secs(600));
        assert_eq!(stream.num_replicas, 1);

        let mut external = config.clone();
        external.broker.storage = None;
        assert_eq!(
            stream_config(&external, &StreamOptions::default()).storage,
            stream::StorageType::File,
            "an external broker keeps events on disk"
        );
    }
}
