//! The watch cache of the stack's entities: a kube reflector on the entity (as
//! `DynamicObject`, storage version) in the stack's namespace. Requests read it; nothing lists
//! entities per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt as _;
use kube::api::Api;
use kube::core::DynamicObject;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::Value;

use super::engine::{Entities, field};

/// The entities of one namespace, as last seen by the watch.
#[derive(Clone)]
pub struct EntityCache {
    store: Store<DynamicObject>,
    namespace: String,
    synced: Arc<AtomicBool>,
}

impl EntityCache {
    /// Starts watching `api` (namespaced to `namespace`) in the background. The task ends when
    /// the returned handle is aborted.
    pub fn start(
        api: Api<DynamicObject>,
        resource: kube::core::ApiResource,
        namespace: &str,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let writer = reflector::store::Writer::new(resource);
        let store = writer.as_reader();
        let synced = Arc::new(AtomicBool::new(false));
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|o: &mut DynamicObject| {
                // Not needed to judge anything; often the biggest part of an object.
                o.metadata.managed_fields = None;
                if let Some(a) = o.metadata.annotations.as_mut() {
                    a.remove("kubectl.kubernetes.io/last-applied-configuration");
                }
            })
            .reflect(writer);
        let task = {
            let store = store.clone();
            let synced = synced.clone();
            tokio::spawn(async move {
                let ready = async {
                    if store.wait_until_ready().await.is_ok() {
                        synced.store(true, Ordering::Relaxed);
                        tracing::info!(entities = store.len(), "entity cache synced");
                    }
                };
                let drive = stream.for_each(|event| async move {
                    if let Err(e) = event {
                        tracing::warn!("entity watch: {e} (retrying)");
                    }
                });
                tokio::join!(ready, drive);
            })
        };
        (
            EntityCache {
                store,
                namespace: namespace.to_owned(),
                synced,
            },
            task,
        )
    }

    /// Whether the first list has been read.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Entities in the cache.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }
}

impl Entities for EntityCache {
    fn find_holder(
        &self,
        namespace: &str,
        fields: &[String],
        values: &[Value],
        except: &str,
    ) -> Option<String> {
        if namespace != self.namespace {
            return None;
        }
        self.store
            .find(|o| {
                o.metadata.name.as_deref() != Some(except)
                    && fields.len() == values.len()
                    && fields
                        .iter()
                        .zip(values)
                        .all(|(f, v)| field(o, f) == Some(v))
            })
            .and_then(|o| o.metadata.name.clone())
    }

    fn count(&self, namespace: &str) -> usize {
        if namespace == self.namespace {
            self.store.len()
        } else {
            0
        }
    }
}
