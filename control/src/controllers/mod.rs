//! The controllers that keep workloads at what their specs say, in the kube-runtime
//! shape: a watch of the kind and what it owns, a `reconcile` that reads the world from
//! reflector stores, writes through the API and returns what to do next (an
//! [`kube::runtime::controller::Action`]). They are API clients only, with their own
//! identity (`system:kube-controller-manager`), and run on the raft leader
//! ([`run_while_leading`]).
//!
//! Owns: [`replicaset`] (pods for a ReplicaSet), [`deployment`] (ReplicaSets for a
//! Deployment: rolling update, recreate, revision history), [`daemonset`] (a pod per
//! eligible node), [`job`] (pods until completions succeed or the backoff limit is
//! passed), [`nodelifecycle`] (silent nodes Unknown and tainted, their pods evicted),
//! [`endpointslice`] (a Service's pods as an EndpointSlice). Must not touch the store or
//! nodes; garbage collection of what owners leave behind is the API server's (`gc`).

pub mod daemonset;
pub mod deployment;
pub mod endpointslice;
pub mod job;
pub mod nodelifecycle;
pub mod replicaset;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, MicroTime, ObjectMeta, Time};
use kube::api::{Api, PostParams};

/// The controllers' settings; each is a flag of `brink server`.
#[derive(Debug, Clone)]
pub struct ControllerSettings {
    /// How long a controller counts a pod it created (or deleted) that its watch has not
    /// shown yet, before it trusts the watch again (kube's expectations).
    pub expectation_timeout: Duration,
    /// How often every object is reconciled when nothing changed.
    pub resync: Duration,
    /// How soon an object that has not settled (a rollout in progress, pods not yet
    /// ready) is looked at again. A controller's trigger and the store it reads come
    /// from two watches, so a pass may read a moment stale; this bounds how long.
    pub settle: Duration,
    /// The most pods one ReplicaSet creates or deletes in one pass.
    pub burst: usize,
    /// How often a member that is not the leader looks whether it has become it.
    pub leader_poll: Duration,
    /// When a silent node is unreachable, and how often nodes are looked at.
    pub node_lifecycle: nodelifecycle::NodeLifecycleSettings,
}

impl Default for ControllerSettings {
    fn default() -> Self {
        Self {
            expectation_timeout: Duration::from_secs(60),
            resync: Duration::from_secs(300),
            settle: Duration::from_secs(1),
            burst: 500,
            leader_poll: Duration::from_millis(250),
            node_lifecycle: Default::default(),
        }
    }
}

/// What each owner (by uid) is waiting to see in its watch: pods it created (by name)
/// and pods it deleted, with when (kube's expectations). A quick second pass counts
/// them, so it does not create or delete twice.
#[derive(Debug, Default)]
pub struct Expectations(std::sync::Mutex<std::collections::HashMap<String, Expecting>>);

/// Pods one owner created and deleted (by name, with when) that its watch has not shown.
type Expecting = (
    std::collections::HashMap<String, std::time::Instant>,
    std::collections::HashMap<String, std::time::Instant>,
);

impl Expectations {
    /// Forgets what the watch now shows (created pods it has seen, deleted pods no
    /// longer live) or what is older than `timeout`; returns how many creations are
    /// still expected and which deletions.
    pub fn settle(
        &self,
        owner: &str,
        seen: &std::collections::BTreeSet<String>,
        live: &std::collections::BTreeSet<String>,
        timeout: Duration,
    ) -> (usize, std::collections::BTreeSet<String>) {
        let Ok(mut all) = self.0.lock() else {
            return (0, Default::default());
        };
        let (created, deleted) = all.entry(owner.to_owned()).or_default();
        created.retain(|name, at| !seen.contains(name) && at.elapsed() < timeout);
        deleted.retain(|name, at| live.contains(name) && at.elapsed() < timeout);
        (created.len(), deleted.keys().cloned().collect())
    }

    pub fn created(&self, owner: &str, name: &str) {
        if let Ok(mut all) = self.0.lock() {
            all.entry(owner.to_owned())
                .or_default()
                .0
                .insert(name.to_owned(), std::time::Instant::now());
        }
    }

    pub fn deleted(&self, owner: &str, name: &str) {
        if let Ok(mut all) = self.0.lock() {
            all.entry(owner.to_owned())
                .or_default()
                .1
                .insert(name.to_owned(), std::time::Instant::now());
        }
    }
}

/// Follows every object `api` lists into a reflector store, calling `changed` after
/// each event (kube-runtime's watcher relists and backs off on its own); the task ends
/// when aborted.
pub fn follow<K>(
    api: Api<K>,
    changed: impl Fn() + Send + 'static,
) -> (
    kube::runtime::reflector::Store<K>,
    tokio::task::JoinHandle<()>,
)
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    use futures::StreamExt as _;
    use kube::runtime::WatchStreamExt as _;
    let (store, writer) = kube::runtime::reflector::store();
    let task = tokio::spawn(async move {
        let kind = K::kind(&K::DynamicType::default()).into_owned();
        let stream = kube::runtime::reflector::reflector(
            writer,
            kube::runtime::watcher::watcher(api, Default::default()),
        )
        .default_backoff();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed(),
                Err(e) => tracing::warn!(%kind, error = %e, "watch failed; retrying"),
            }
        }
    });
    (store, task)
}

/// A "look again" for a Controller's `reconcile_all_on`: a full channel already holds one.
pub fn nudges() -> (
    impl Fn() + Send + 'static,
    futures::channel::mpsc::Receiver<()>,
) {
    let (sender, receiver) = futures::channel::mpsc::channel::<()>(1);
    let nudge = move || {
        let _ = sender.clone().try_send(());
    };
    (nudge, receiver)
}

/// Follows every Pod into a store (for controllers that own pods), once it has listed.
pub async fn pod_store(
    client: &kube::Client,
) -> Option<(
    kube::runtime::reflector::Store<Pod>,
    tokio::task::JoinHandle<()>,
)> {
    let (pods, task) = follow(Api::<Pod>::all(client.clone()), || {});
    match pods.wait_until_ready().await {
        Ok(()) => Some((pods, task)),
        Err(_) => {
            task.abort();
            None
        }
    }
}

/// The pods in `namespace` whose controller is the object with `uid`.
pub fn owned_pods(
    pods: &kube::runtime::reflector::Store<Pod>,
    namespace: &str,
    uid: &str,
) -> Vec<std::sync::Arc<Pod>> {
    use kube::ResourceExt as _;
    pods.state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace))
        .filter(|p| controller_uid(&p.metadata) == Some(uid))
        .collect()
}

/// A pod from `owner`'s template, named after it (`generateName`), with a controller
/// reference to it.
pub fn pod_from_template<K>(
    owner: &K,
    template: Option<k8s_openapi::api::core::v1::PodTemplateSpec>,
) -> Result<Pod, ReconcileError>
where
    K: kube::Resource<DynamicType = ()>,
{
    use kube::ResourceExt as _;
    let kind = K::kind(&());
    let template = template
        .ok_or_else(|| ReconcileError::Invalid(format!("the {kind} has no pod template")))?;
    let reference = owner
        .controller_owner_ref(&())
        .ok_or_else(|| ReconcileError::Invalid(format!("the {kind} has no name or uid")))?;
    let meta = template.metadata.unwrap_or_default();
    Ok(Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", owner.name_any())),
            namespace: owner.namespace(),
            labels: meta.labels,
            annotations: meta.annotations,
            owner_references: Some(vec![reference]),
            ..Default::default()
        },
        spec: template.spec,
        status: None,
    })
}

/// Runs a Controller's reconcile stream to its end (failures are the error policy's to
/// log and retry).
pub async fn drive<T, E: std::fmt::Display>(
    stream: impl futures::Stream<Item = Result<T, E>>,
    what: &str,
) {
    use futures::StreamExt as _;
    stream
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "{what} reconcile");
            }
        })
        .await;
}

/// Every controller's error policy: log, and try again shortly.
pub fn retry_later<K: kube::Resource<DynamicType = ()>, C>(
    _object: std::sync::Arc<K>,
    error: &ReconcileError,
    _context: std::sync::Arc<C>,
) -> kube::runtime::controller::Action {
    tracing::warn!(kind = %K::kind(&()), %error, "reconcile failed; retrying");
    kube::runtime::controller::Action::requeue(Duration::from_secs(2))
}

/// Writes `status` to an object's status subresource (merge patch, with its uid as
/// precondition), as `component`.
pub async fn write_status<K>(
    api: &Api<K>,
    name: &str,
    uid: &str,
    component: &str,
    status: serde_json::Value,
) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = kube::api::PatchParams {
        field_manager: Some(component.into()),
        ..Default::default()
    };
    let patch = serde_json::json!({"metadata": {"uid": uid}, "status": status});
    api.patch_status(name, &params, &kube::api::Patch::Merge(patch))
        .await
        .map(|_| ())
}

/// Why a reconcile failed (it is retried with back-off).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("the API: {0}")]
    Api(#[from] kube::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Runs every controller while `leading()` says this member leads.
pub async fn run_while_leading(
    client: kube::Client,
    settings: ControllerSettings,
    leading: impl Fn() -> bool + Send + Sync + 'static,
) {
    crate::leading::while_leading("controllers", settings.leader_poll, leading, || {
        let (client, settings) = (client.clone(), settings.clone());
        async move {
            tokio::join!(
                replicaset::run(client.clone(), settings.clone()),
                deployment::run(client.clone(), settings.clone()),
                daemonset::run(client.clone(), settings.clone()),
                nodelifecycle::run(client.clone(), settings.node_lifecycle.clone()),
                endpointslice::run(client.clone(), settings.clone()),
                job::run(client, settings),
            );
        }
    })
    .await
}

/// Whether `labels` match a LabelSelector (matchLabels and matchExpressions). An empty
/// selector matches everything, as in Kubernetes; a malformed one nothing.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// The uid of the object that controls `meta`, if any.
pub fn controller_uid(meta: &ObjectMeta) -> Option<&str> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

/// Whether a pod counts as one of its owner's replicas: not being deleted, not finished.
pub fn is_active(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// Whether a pod's Ready condition is True, and since when.
pub fn ready_since(pod: &Pod) -> Option<k8s_openapi::jiff::Timestamp> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")
        .map(|c| {
            c.last_transition_time
                .as_ref()
                .map(|t| t.0)
                .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
        })
}

/// Whether a pod has been ready for `min_ready_seconds` at `now`.
pub fn is_available(pod: &Pod, min_ready_seconds: i32, now: k8s_openapi::jiff::Timestamp) -> bool {
    ready_since(pod).is_some_and(|since| {
        min_ready_seconds <= 0
            || now.duration_since(since).as_secs() >= i64::from(min_ready_seconds)
    })
}

/// The characters Kubernetes renders hashes in (no vowels, no look-alikes).
const SAFE: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// A name-safe hash of `bytes` (FNV-1a 32, rendered as Kubernetes' SafeEncodeString).
pub fn safe_hash(bytes: &[u8]) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for b in bytes {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash.to_string()
        .bytes()
        .map(|d| SAFE[usize::from(d) % SAFE.len()] as char)
        .collect()
}

/// Writes a core/v1 Event about `object` (kubectl describe shows these).
pub async fn record(
    client: &kube::Client,
    component: &str,
    object: &ObjectReference,
    kind: &str,
    reason: &str,
    message: &str,
) {
    let now = k8s_openapi::jiff::Timestamp::now();
    let namespace = object.namespace.clone().unwrap_or_else(|| "default".into());
    let event = Event {
        metadata: ObjectMeta {
            name: Some(format!(
                "{}.{:x}",
                object.name.as_deref().unwrap_or("object"),
                now.as_nanosecond()
            )),
            namespace: Some(namespace.clone()),
            ..Default::default()
        },
        involved_object: object.clone(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        type_: Some(kind.into()),
        source: Some(EventSource {
            component: Some(component.into()),
            host: None,
        }),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        count: Some(1),
        reporting_component: Some(component.into()),
        reporting_instance: Some(component.into()),
        ..Default::default()
    };
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    if let Err(e) = events.create(&PostParams::default(), &event).await {
        tracing::debug!(error = %e, "event not written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selectors_match_labels_and_expressions() {
        let labels: BTreeMap<String, String> =
            [("app".to_owned(), "web".to_owned())].into_iter().collect();
        let selector = |v: serde_json::Value| -> LabelSelector {
            serde_json::from_value(v).expect("selector")
        };
        assert!(selector_matches(
            &selector(json!({"matchLabels": {"app": "web"}})),
            &labels
        ));
        assert!(!selector_matches(
            &selector(json!({"matchLabels": {"app": "db"}})),
            &labels
        ));
        assert!(selector_matches(&selector(json!({})), &labels));
        assert!(selector_matches(
            &selector(
                json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "x"]}]})
            ),
            &labels
        ));
        assert!(!selector_matches(
            &selector(json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]})),
            &labels
        ));
    }

    #[test]
    fn hashes_are_stable_and_name_safe() {
        let a = safe_hash(b"template");
        assert_eq!(a, safe_hash(b"template"));
        assert_ne!(a, safe_hash(b"template2"));
        assert!(a.bytes().all(|b| SAFE.contains(&b)));
    }
}
