//! Watches (never polls of the API server) of every kind a stack has, across the benchmark's
//! namespaces: when each object was first seen, and when it was first seen ready. Times are taken
//! when the watch event arrives, so how often a waiter looks at this state does not change them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kab::api::KabStack;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt as _};
use tokio::sync::mpsc;

use crate::common::NS_PREFIX;

/// `(kind, namespace or "", name)`.
pub type Key = (String, String, String);

pub fn key(kind: &str, ns: &str, name: &str) -> Key {
    (kind.to_string(), ns.to_string(), name.to_string())
}

#[derive(Default)]
pub struct State {
    pub exists: HashMap<Key, Instant>,
    pub ready: HashMap<Key, Instant>,
}

pub struct Observer {
    state: Mutex<State>,
    synced: Mutex<usize>,
    /// Namespaces whose webhook Deployment just became available, for the floor (it registers
    /// the webhook then, as the operator does).
    webhook_available: Mutex<Option<mpsc::UnboundedSender<String>>>,
    webhook_deployment: String,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    watches: usize,
}

fn relevant(ns: Option<String>) -> Option<String> {
    match ns {
        None => Some(String::new()),
        Some(ns) if ns.starts_with(NS_PREFIX) => Some(ns),
        Some(_) => None,
    }
}

/// Watches `api` for the observer: `on` sees every object as it arrives (listed or changed);
/// the end of the initial list counts towards "every watch has listed".
fn follow<K>(
    obs: Arc<Observer>,
    api: Api<K>,
    on: impl Fn(&Observer, &K) + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    tokio::spawn(async move {
        let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Event::Apply(o) | Event::InitApply(o)) => on(&obs, &o),
                Ok(Event::InitDone) => obs.mark_synced(),
                _ => {}
            }
        }
    })
}

impl Observer {
    /// Starts one watch per resource of `plain` (existence only; metadata-only watches), plus
    /// Deployments, StatefulSets, CustomResourceDefinitions and KabStacks (readiness); waits
    /// until every watch has listed.
    pub async fn start(
        client: Client,
        plain: Vec<ApiResource>,
        webhook_deployment: &str,
    ) -> anyhow::Result<Arc<Observer>> {
        let obs = Arc::new(Observer {
            state: Mutex::new(State::default()),
            synced: Mutex::new(0),
            webhook_available: Mutex::new(None),
            webhook_deployment: webhook_deployment.to_string(),
            tasks: Mutex::new(Vec::new()),
            watches: plain.len() + 4,
        });
        let mut tasks = Vec::new();
        for ar in plain {
            let api: Api<PartialObjectMeta<DynamicObject>> = Api::all_with(client.clone(), &ar);
            let kind = ar.kind.clone();
            tasks.push(follow(obs.clone(), api, move |o, m| {
                if let Some(ns) = relevant(m.metadata.namespace.clone()) {
                    let name = m.metadata.name.clone().unwrap_or_default();
                    o.seen(&kind, &ns, &name, true);
                }
            }));
        }
        tasks.push(follow(
            obs.clone(),
            Api::<Deployment>::all(client.clone()),
            |o, d| {
                if let Some(ns) = relevant(d.namespace()) {
                    let ready = kab::health::deployment_health(d, &[]).0;
                    let name = d.name_any();
                    let first = o.seen("Deployment", &ns, &name, ready);
                    if first && name == o.webhook_deployment {
                        o.tell_available(&ns);
                    }
                }
            },
        ));
        tasks.push(follow(
            obs.clone(),
            Api::<StatefulSet>::all(client.clone()),
            |o, s| {
                if let Some(ns) = relevant(s.namespace()) {
                    let ready = kab::health::statefulset_health(s, &[]).0;
                    o.seen("StatefulSet", &ns, &s.name_any(), ready);
                }
            },
        ));
        tasks.push(follow(
            obs.clone(),
            Api::<CustomResourceDefinition>::all(client.clone()),
            |o, c| {
                let established = c
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                o.seen("CustomResourceDefinition", "", &c.name_any(), established);
            },
        ));
        tasks.push(follow(
            obs.clone(),
            Api::<KabStack>::all(client.clone()),
            |o, s| {
                if let Some(ns) = relevant(s.namespace()) {
                    let ready = kab::health::ready(s.status.as_ref());
                    o.seen("KabStack", &ns, &s.name_any(), ready);
                }
            },
        ));
        *obs.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        let o = obs.clone();
        crate::common::poll_until(
            "the benchmark's watches to list",
            Duration::from_secs(60),
            Duration::from_millis(20),
            move || o.synced_count() >= o.watches,
        )
        .await?;
        Ok(obs)
    }

    fn mark_synced(&self) {
        *self.synced.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    fn synced_count(&self) -> usize {
        *self.synced.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an event; true when the object became ready for the first time.
    fn seen(&self, kind: &str, ns: &str, name: &str, ready: bool) -> bool {
        let now = Instant::now();
        let k = key(kind, ns, name);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.exists.entry(k.clone()).or_insert(now);
        if ready && !s.ready.contains_key(&k) {
            s.ready.insert(k, now);
            return true;
        }
        false
    }

    fn tell_available(&self, ns: &str) {
        if let Some(tx) = self
            .webhook_available
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = tx.send(ns.to_string());
        }
    }

    /// Where namespaces go whose webhook Deployment became available.
    pub fn subscribe_webhook_available(&self) -> mpsc::UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self
            .webhook_available
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    /// Runs `f` on the state.
    pub fn with<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Observer {
    /// Stops the watches (their tasks hold the observer: dropping it is not enough).
    pub fn stop(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}
