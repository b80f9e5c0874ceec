//! Waiting on watches, with deadlines and useful timeout messages; polling state that watches
//! keep. Shared with the benchmarks: keep this file free of the e2e context.

use std::fmt::Debug;
use std::pin::pin;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use futures::TryStreamExt as _;
use kube::api::Api;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::wait::Condition;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Waits on a watch until object `name` satisfies `cond` and returns it.
/// Fails after `timeout` showing the last state seen, or if the condition
/// holds only because the object is absent (use [`wait_deleted`] for that).
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    cond: impl Condition<K>,
    timeout: Duration,
) -> anyhow::Result<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug + Send + 'static,
{
    match wait_until(api, name, cond, timeout).await? {
        Some(obj) => Ok(obj),
        None => Err(anyhow!(
            "{} {name}: the condition matched while the object does not exist",
            K::kind(&())
        )),
    }
}

/// Waits on a watch until object `name` does not exist.
pub async fn wait_deleted<K>(api: &Api<K>, name: &str, timeout: Duration) -> anyhow::Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug + Send + 'static,
{
    wait_until(api, name, |o: Option<&K>| o.is_none(), timeout)
        .await
        .map(drop)
}

/// Waits until `f` holds, checking every `every` (for state that watches keep, or that has no
/// single object to watch, e.g. the audit log). Fails after `timeout` naming `what`.
pub async fn poll_until(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

async fn wait_until<K>(
    api: &Api<K>,
    name: &str,
    cond: impl Condition<K>,
    timeout: Duration,
) -> anyhow::Result<Option<K>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug + Send + 'static,
{
    let mut last: Option<Option<K>> = None;
    let mut last_error: Option<String> = None;
    let watch = async {
        let mut stream = pin!(watcher::watch_object(api.clone(), name).default_backoff());
        loop {
            match stream.try_next().await {
                Ok(Some(obj)) => {
                    if cond.matches_object(obj.as_ref()) {
                        return obj;
                    }
                    last = Some(obj);
                }
                Ok(None) => {} // the watcher's stream does not end
                Err(e) => last_error = Some(e.to_string()), // retried with backoff
            }
        }
    };
    let result = tokio::time::timeout(timeout, watch).await;
    let kind = K::kind(&());
    result
        .map_err(|_| {
            let seen = match &last {
                None => "nothing yet".to_string(),
                Some(None) => "the object does not exist".to_string(),
                Some(Some(obj)) => describe(obj),
            };
            let error = last_error
                .map(|e| format!("\nlast watch error: {e}"))
                .unwrap_or_default();
            anyhow!(
                "timed out after {}s waiting for {kind} {}{name}; last seen: {seen}{error}",
                timeout.as_secs(),
                api_namespace(&last)
            )
        })
        .context(format!("waiting for {kind} {name}"))
}

fn api_namespace<K: Resource>(last: &Option<Option<K>>) -> String {
    last.as_ref()
        .and_then(|o| o.as_ref())
        .and_then(|o| o.namespace())
        .map(|ns| format!("{ns}/"))
        .unwrap_or_default()
}

/// The object's status (or the whole object), as compact JSON, truncated.
fn describe<K: Serialize>(obj: &K) -> String {
    let value = serde_json::to_value(obj).unwrap_or_default();
    let shown = value.get("status").unwrap_or(&value).to_string();
    if shown.len() > 3000 {
        let cut = (0..=3000)
            .rev()
            .find(|i| shown.is_char_boundary(*i))
            .unwrap_or(0);
        format!("{}…", &shown[..cut])
    } else {
        shown
    }
}
