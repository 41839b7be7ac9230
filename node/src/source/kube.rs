//! Pods from a site's Kubernetes API, as a kubelet takes them: the pods bound to this node
//! (one watch, `fieldSelector=spec.nodeName=<node>`), the ConfigMaps and Secrets those
//! pods' volumes read (one single-object watch each, which is all the Node authorizer
//! lets a node read), status written back through `pods/status` with the pod's uid as
//! precondition, and the last step of a graceful deletion (the node deletes the pod with
//! `gracePeriodSeconds=0` once it has stopped).
//!
//! It also follows the Gateway API objects (GatewayClasses, Gateways, HTTPRoutes,
//! ReferenceGrants) and the Services and Namespaces they refer to, for the node's data
//! plane.
//!
//! Owns: the node's view of its pods in the API and every write the node makes to them.
//! Must not touch running pods: it says what is wanted ([`SitePods`]) and carries status
//! away ([`SiteStatus`]). When the API cannot be reached, watches and writes back off and
//! resume; the pods already running keep running on the last desired set.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use ::kube::runtime::WatchStreamExt as _;
use ::kube::runtime::reflector::{self, Store};
use ::kube::runtime::watcher::{self, Event};
use brink_proto::PodManifest;
use brink_proto::gateway::RouteManifest;
use futures::StreamExt as _;
use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use gateway_api::httproutes::HttpRoute;
use gateway_api::referencegrants::ReferenceGrant;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, PodStatus, Secret, Service};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::{ConfigObjects, DesiredPods, GatewayObjects, PodSource, StatusSink};

/// How the node talks to its site about pods.
#[derive(Debug, Clone)]
pub struct SiteSettings {
    /// This node's name: its pods are those with `spec.nodeName` set to it.
    pub node_name: String,
    /// First wait after a status write or deletion failed for want of the API; it
    /// doubles up to `retry_max` and goes back once a write succeeds.
    pub retry: Duration,
    pub retry_max: Duration,
    /// Status writes in flight at once (each is one raft write on the site).
    pub status_writes: usize,
}

impl SiteSettings {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            retry: Duration::from_millis(200),
            retry_max: Duration::from_secs(10),
            status_writes: 8,
        }
    }
}

/// The reason a pod this node cannot run fails with (as a kubelet's admission refusal).
pub const UNSUPPORTED_POD: &str = "UnsupportedPodSpec";

/// A ConfigMap or Secret a pod reads.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Reference {
    ConfigMap { namespace: String, name: String },
    Secret { namespace: String, name: String },
}

impl Reference {
    fn key(&self) -> String {
        match self {
            Reference::ConfigMap { namespace, name } | Reference::Secret { namespace, name } => {
                format!("{namespace}/{name}")
            }
        }
    }
}

/// What a pod reads from the API: its volumes' ConfigMaps and Secrets.
fn references(pod: &Pod) -> Vec<Reference> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut out = Vec::new();
    for volume in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .unwrap_or_default()
    {
        if let Some(name) = volume.config_map.as_ref().map(|c| c.name.clone()) {
            out.push(Reference::ConfigMap {
                namespace: namespace.clone(),
                name,
            });
        }
        if let Some(name) = volume.secret.as_ref().and_then(|s| s.secret_name.clone()) {
            out.push(Reference::Secret {
                namespace: namespace.clone(),
                name,
            });
        }
    }
    out
}

/// A pod's identity on the node (`namespace/name`), and its namespace and name.
fn pod_names(pod: &Pod) -> (String, String, String) {
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    (format!("{namespace}/{name}"), namespace, name)
}

/// A pod the node has stopped, to be deleted if the API is deleting it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Finish {
    namespace: String,
    name: String,
    uid: String,
}

#[derive(Default)]
struct State {
    /// The pods bound to this node, by uid, as the watch last saw them.
    pods: BTreeMap<String, Pod>,
    /// Whether the pod watch has listed once (no desired set goes out before).
    synced: bool,
    /// Whether something changed since the last desired set.
    dirty: bool,
    config: ConfigObjects,
    /// Uids handed to the agent and not yet reported stopped.
    handed: BTreeSet<String>,
    /// Uids refused as pods this node cannot run (their Failed status is on its way).
    refused: BTreeSet<String>,
    /// Status waiting to be written, by pod key.
    pending: BTreeMap<String, (String, PodStatus)>,
    /// The status last written, by pod key (an unchanged status is not written again).
    written: HashMap<String, (String, PodStatus)>,
    /// Stopped pods whose deletion the node may have to finish.
    finish: BTreeSet<Finish>,
    /// The status each pod last reported, by key: the kubelet Events are its changes.
    reported: HashMap<String, (String, PodStatus)>,
    /// Events waiting to be written: pod key, uid, type, reason, message.
    events: Vec<(String, String, super::pod_events::PodEvent)>,
    /// The agent is shutting down: what its pods do now is not news for the site (their
    /// status stays as it was; the next start takes them up).
    closing: bool,
}

struct Shared {
    settings: SiteSettings,
    state: Mutex<State>,
    /// Wakes the source: the desired set changed.
    changed: Notify,
    /// Wakes the writer: status or a deletion to write.
    work: Notify,
}

impl Shared {
    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> Option<T> {
        self.state.lock().ok().map(|mut s| f(&mut s))
    }

    fn touch(&self) {
        if self.with_state(|s| s.dirty = true).is_some() {
            self.changed.notify_one();
        }
    }
}

/// The pods a site binds to this node: a [`PodSource`].
pub struct SitePods {
    shared: Arc<Shared>,
    client: ::kube::Client,
    gateway: GatewayStores,
    /// One single-object watch per ConfigMap or Secret the pods read.
    objects: BTreeMap<Reference, JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Where this node's pod status goes: `pods/status` on the site. A [`StatusSink`].
pub struct SiteStatus {
    shared: Arc<Shared>,
}

/// Starts watching the site for this node's pods and writing their status.
pub fn start(client: ::kube::Client, settings: SiteSettings) -> (SitePods, Arc<SiteStatus>) {
    let shared = Arc::new(Shared {
        settings,
        state: Mutex::new(State::default()),
        changed: Notify::new(),
        work: Notify::new(),
    });
    let mut tasks = vec![
        tokio::spawn(watch_pods(client.clone(), shared.clone())),
        tokio::spawn(write_back(client.clone(), shared.clone())),
    ];
    let gateway = GatewayStores::start(&client, &shared, &mut tasks);
    (
        SitePods {
            shared: shared.clone(),
            client,
            gateway,
            objects: BTreeMap::new(),
            tasks,
        },
        Arc::new(SiteStatus { shared }),
    )
}

impl Drop for SitePods {
    fn drop(&mut self) {
        for task in self.tasks.iter().chain(self.objects.values()) {
            task.abort();
        }
    }
}

/// Follows the pods bound to this node; relists (and so recovers) on its own after the
/// API was away, backing off while it is.
async fn watch_pods(client: ::kube::Client, shared: Arc<Shared>) {
    let api: Api<Pod> = Api::all(client);
    let config =
        watcher::Config::default().fields(&format!("spec.nodeName={}", shared.settings.node_name));
    let stream = watcher::watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut listing: Option<BTreeMap<String, Pod>> = None;
    while let Some(event) = stream.next().await {
        let uid_of = |pod: &Pod| pod.metadata.uid.clone().filter(|u| !u.is_empty());
        match event {
            Ok(Event::Init) => listing = Some(BTreeMap::new()),
            Ok(Event::InitApply(pod)) => {
                if let (Some(listing), Some(uid)) = (listing.as_mut(), uid_of(&pod)) {
                    listing.insert(uid, pod);
                }
            }
            Ok(Event::InitDone) => {
                let pods = listing.take().unwrap_or_default();
                shared.with_state(|s| {
                    s.pods = pods;
                    s.synced = true;
                });
                shared.touch();
            }
            Ok(Event::Apply(pod)) => {
                if let Some(uid) = uid_of(&pod) {
                    shared.with_state(|s| s.pods.insert(uid, pod));
                    shared.touch();
                }
            }
            Ok(Event::Delete(pod)) => {
                if let Some(uid) = uid_of(&pod) {
                    shared.with_state(|s| s.pods.remove(&uid));
                    shared.touch();
                }
            }
            Err(e) => tracing::warn!(error = %e, "watching this node's pods; retrying"),
        }
    }
}

/// The Gateway API objects (and the Services and Namespaces routes refer to) the node's
/// data plane is computed from: every one in the site, as each node serves every
/// Gateway.
struct GatewayStores {
    classes: Store<GatewayClass>,
    gateways: Store<Gateway>,
    routes: Store<HttpRoute>,
    grants: Store<ReferenceGrant>,
    services: Store<Service>,
    namespaces: Store<Namespace>,
}

/// Follows every object of one kind into a store, calling `changed` after each event
/// (the watcher relists and backs off on its own); the task goes into `tasks`.
pub(crate) fn follow<K>(
    client: &::kube::Client,
    changed: impl Fn() + Send + 'static,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<K>
where
    K: ::kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    let (store, writer) = reflector::store();
    let api: Api<K> = Api::all(client.clone());
    tasks.push(tokio::spawn(async move {
        let kind = K::kind(&K::DynamicType::default()).into_owned();
        let stream = reflector::reflector(writer, watcher::watcher(api, Default::default()))
            .default_backoff();
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed(),
                Err(e) => {
                    tracing::warn!(%kind, error = %e, "watching the site's objects; retrying")
                }
            }
        }
    }));
    store
}

impl GatewayStores {
    fn start(
        client: &::kube::Client,
        shared: &Arc<Shared>,
        tasks: &mut Vec<JoinHandle<()>>,
    ) -> Self {
        let touch = || {
            let shared = shared.clone();
            move || shared.touch()
        };
        Self {
            classes: follow(client, touch(), tasks),
            gateways: follow(client, touch(), tasks),
            routes: follow(client, touch(), tasks),
            grants: follow(client, touch(), tasks),
            services: follow(client, touch(), tasks),
            namespaces: follow(client, touch(), tasks),
        }
    }

    /// The objects as the data plane takes them: cluster-scoped ones by name, the rest
    /// by `namespace/name`; a route with a wrong value carries why (its parents report
    /// it), as one from a manifest does.
    fn objects(&self) -> GatewayObjects {
        fn by_key<K>(store: &Store<K>) -> BTreeMap<String, K>
        where
            K: ::kube::Resource + Clone,
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            store
                .state()
                .iter()
                .map(|o| {
                    let mut o = K::clone(o);
                    // Versions and field owners change with every write and mean
                    // nothing to the data plane.
                    o.meta_mut().resource_version = None;
                    o.meta_mut().managed_fields = None;
                    let meta = o.meta();
                    let name = meta.name.clone().unwrap_or_default();
                    let key = match &meta.namespace {
                        Some(ns) => format!("{ns}/{name}"),
                        None => name,
                    };
                    (key, o)
                })
                .collect()
        }
        // Status is the data plane's output, not its input: without it, the status
        // this node writes back does not look like a change to compile again.
        GatewayObjects {
            classes: by_key(&self.classes)
                .into_iter()
                .map(|(key, mut class)| {
                    class.status = None;
                    (key, class)
                })
                .collect(),
            gateways: by_key(&self.gateways)
                .into_iter()
                .map(|(key, mut gateway)| {
                    gateway.status = None;
                    (key, gateway)
                })
                .collect(),
            routes: by_key(&self.routes)
                .into_iter()
                .map(|(key, mut route)| {
                    route.status = None;
                    let invalid = brink_proto::gateway::validate_route_spec(&route.spec).err();
                    (key, RouteManifest { route, invalid })
                })
                .collect(),
            services: by_key(&self.services),
            grants: by_key(&self.grants),
            namespaces: by_key(&self.namespaces),
        }
    }
}

/// Follows one ConfigMap or Secret (`fieldSelector=metadata.name=<name>`).
async fn watch_object<K>(
    client: ::kube::Client,
    shared: Arc<Shared>,
    reference: Reference,
    store: fn(&mut ConfigObjects, String, Option<K>),
) where
    K: ::kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
    K::DynamicType: Default,
{
    let (namespace, name) = match &reference {
        Reference::ConfigMap { namespace, name } | Reference::Secret { namespace, name } => {
            (namespace.clone(), name.clone())
        }
    };
    let api: Api<K> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher::watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let key = reference.key();
    let mut found = false;
    while let Some(event) = stream.next().await {
        let object = match event {
            Ok(Event::Init) => {
                found = false;
                continue;
            }
            Ok(Event::InitApply(o)) | Ok(Event::Apply(o)) => {
                found = true;
                Some(o)
            }
            Ok(Event::InitDone) if found => continue,
            Ok(Event::InitDone) | Ok(Event::Delete(_)) => None,
            Err(e) => {
                tracing::warn!(object = %key, error = %e, "watching a pod's volume source; retrying");
                continue;
            }
        };
        shared.with_state(|s| store(&mut s.config, key.clone(), object));
        shared.touch();
    }
}

fn store_config_map(config: &mut ConfigObjects, key: String, object: Option<ConfigMap>) {
    match object {
        Some(o) => config.config_maps.insert(key, o),
        None => config.config_maps.remove(&key),
    };
}

fn store_secret(config: &mut ConfigObjects, key: String, object: Option<Secret>) {
    match object {
        Some(o) => config.secrets.insert(key, o),
        None => config.secrets.remove(&key),
    };
}

/// What a pod the node refuses reports (phase Failed, as a kubelet's admission refusal).
fn refused_status(message: &str) -> PodStatus {
    PodStatus {
        phase: Some("Failed".into()),
        reason: Some(UNSUPPORTED_POD.into()),
        message: Some(format!("Pod was rejected: {message}")),
        ..Default::default()
    }
}

impl SitePods {
    /// The desired set from what the watches saw; starts and ends volume-source watches
    /// to match, and queues what the writer has to do for refused and deleted pods.
    fn desired(&mut self) -> Option<DesiredPods> {
        let shared = self.shared.clone();
        let (desired, wanted) = shared.with_state(|s| {
            s.dirty = false;
            let mut desired = DesiredPods::default();
            let mut wanted = BTreeSet::new();
            let live: BTreeSet<String> = s.pods.keys().cloned().collect();
            s.handed.retain(|uid| live.contains(uid));
            s.refused.retain(|uid| live.contains(uid));
            let mut refusals = Vec::new();
            let mut finishes = Vec::new();
            for (uid, pod) in &s.pods {
                let (key, namespace, name) = pod_names(pod);
                if pod.metadata.deletion_timestamp.is_some() {
                    // Never started here (or not since the agent restarted): nothing
                    // to stop, so the deletion can finish now.
                    if !s.handed.contains(uid) {
                        finishes.push(Finish {
                            namespace,
                            name,
                            uid: uid.clone(),
                        });
                    }
                    continue;
                }
                let mut pod = pod.clone();
                if let Err(e) = brink_proto::manifest::validate_pod(&mut pod) {
                    let e = format!("{}: {}", e.field, e.message);
                    if !s.refused.contains(uid) {
                        tracing::warn!(pod = %key, error = %e, "pod refused: this node cannot run it");
                        refusals.push((key, uid.clone(), refused_status(&e)));
                    }
                    continue;
                }
                wanted.extend(references(&pod));
                s.handed.insert(uid.clone());
                desired.pods.push(PodManifest { pod, document: 0 });
            }
            let work = !refusals.is_empty() || !finishes.is_empty();
            for (key, uid, status) in refusals {
                s.refused.insert(uid.clone());
                s.pending.insert(key, (uid, status));
            }
            s.finish.extend(finishes);
            if work {
                shared.work.notify_one();
            }
            (desired, wanted)
        })?;
        // Volume sources: a watch for each new one, none for what no pod reads now.
        let gone: Vec<Reference> = self
            .objects
            .keys()
            .filter(|r| !wanted.contains(*r))
            .cloned()
            .collect();
        for reference in gone {
            if let Some(task) = self.objects.remove(&reference) {
                task.abort();
            }
            let key = reference.key();
            shared.with_state(|s| match reference {
                Reference::ConfigMap { .. } => s.config.config_maps.remove(&key).is_some(),
                Reference::Secret { .. } => s.config.secrets.remove(&key).is_some(),
            });
        }
        for reference in wanted {
            if self.objects.contains_key(&reference) {
                continue;
            }
            let (client, shared) = (self.client.clone(), shared.clone());
            let task = match &reference {
                Reference::ConfigMap { .. } => tokio::spawn(watch_object::<ConfigMap>(
                    client,
                    shared,
                    reference.clone(),
                    store_config_map,
                )),
                Reference::Secret { .. } => tokio::spawn(watch_object::<Secret>(
                    client,
                    shared,
                    reference.clone(),
                    store_secret,
                )),
            };
            self.objects.insert(reference, task);
        }
        let config = shared.with_state(|s| s.config.clone())?;
        Some(DesiredPods {
            config,
            gateway: self.gateway.objects(),
            ..desired
        })
    }
}

impl PodSource for SitePods {
    async fn next(&mut self) -> Option<DesiredPods> {
        loop {
            let ready = self.shared.with_state(|s| s.synced && s.dirty)?;
            if ready {
                return self.desired();
            }
            self.shared.changed.notified().await;
        }
    }
}

impl StatusSink for SiteStatus {
    fn changed(&self, key: &str, uid: &str, status: &PodStatus) {
        let queued = self.shared.with_state(|s| {
            // Workers report after every update, changed or not: an unchanged status
            // is neither news nor a write.
            if s.closing
                || s.reported
                    .get(key)
                    .is_some_and(|(u, st)| u == uid && st == status)
            {
                return false;
            }
            let before = s
                .reported
                .get(key)
                .filter(|(u, _)| u == uid)
                .map(|(_, st)| st);
            let said = super::pod_events::transitions(key, before, status);
            let news = !said.is_empty();
            for event in said {
                s.events.push((key.to_owned(), uid.to_owned(), event));
            }
            s.reported
                .insert(key.to_owned(), (uid.to_owned(), status.clone()));
            let same = |entry: Option<&(String, PodStatus)>| {
                entry.is_some_and(|(u, st)| u == uid && st == status)
            };
            if same(s.written.get(key)) {
                s.pending.remove(key);
                return news;
            }
            if same(s.pending.get(key)) {
                return news;
            }
            s.pending
                .insert(key.to_owned(), (uid.to_owned(), status.clone()));
            true
        });
        if queued == Some(true) {
            self.shared.work.notify_one();
        }
    }

    fn closing(&self) {
        self.shared.with_state(|s| s.closing = true);
    }

    fn stopped(&self, key: &str, uid: &str) {
        let Some((namespace, name)) = key.split_once('/') else {
            return;
        };
        let finish = Finish {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: uid.to_owned(),
        };
        self.shared.with_state(|s| {
            s.handed.remove(uid);
            s.finish.insert(finish);
        });
        self.shared.work.notify_one();
    }
}

/// A merge patch that makes the stored status `status`: fields the last written status
/// had and this one lacks are set to null, and the uid makes it a precondition (a pod
/// deleted and made again under the same name is not written to).
fn status_patch(uid: &str, status: &PodStatus, previous: Option<&PodStatus>) -> Value {
    let mut body = serde_json::to_value(status).unwrap_or_else(|_| json!({}));
    if let (Some(map), Some(Value::Object(before))) = (
        body.as_object_mut(),
        previous.and_then(|p| serde_json::to_value(p).ok()),
    ) {
        for field in before.keys() {
            map.entry(field.clone()).or_insert(Value::Null);
        }
    }
    json!({"metadata": {"uid": uid}, "status": body})
}

/// Writes one kubelet Event about a pod (core/v1, source `kubelet` on this node);
/// an Event that cannot be written is dropped, as a kubelet's recorder drops them.
async fn write_event(
    client: &::kube::Client,
    node: &str,
    key: &str,
    uid: &str,
    (kind, reason, message): super::pod_events::PodEvent,
) {
    use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
    let (namespace, name) = key.split_once('/').unwrap_or(("default", key));
    let now = k8s_openapi::jiff::Timestamp::now();
    let event = Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            uid: Some(uid.to_owned()),
            ..Default::default()
        },
        reason: Some(reason.into()),
        message: Some(message),
        type_: Some(kind.into()),
        source: Some(EventSource {
            component: Some("kubelet".into()),
            host: Some(node.to_owned()),
        }),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        count: Some(1),
        reporting_component: Some("kubelet".into()),
        reporting_instance: Some(node.to_owned()),
        ..Default::default()
    };
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    if let Err(e) = api.create(&Default::default(), &event).await {
        tracing::debug!(pod = %key, error = %e, "kubelet event not written");
    }
}

/// Whether a failed write is worth trying again: the API was away, not the answer no.
fn retryable(error: &::kube::Error) -> bool {
    match error {
        ::kube::Error::Api(status) => matches!(status.code, 429 | 500..=599),
        _ => true,
    }
}

/// Writes queued status and finishes deletions, backing off while the API is away.
async fn write_back(client: ::kube::Client, shared: Arc<Shared>) {
    let settings = shared.settings.clone();
    let mut wait = settings.retry;
    loop {
        let work = shared.with_state(|s| {
            let statuses: Vec<(String, String, PodStatus, Option<PodStatus>)> =
                std::mem::take(&mut s.pending)
                    .into_iter()
                    .map(|(key, (uid, status))| {
                        let previous = s
                            .written
                            .get(&key)
                            .filter(|(u, _)| *u == uid)
                            .map(|(_, st)| st.clone());
                        (key, uid, status, previous)
                    })
                    .collect();
            // A deletion is finished only for a pod the API is deleting, with this uid.
            let finishes: Vec<Finish> = std::mem::take(&mut s.finish)
                .into_iter()
                .filter(|f| {
                    s.pods
                        .get(&f.uid)
                        .is_some_and(|p| p.metadata.deletion_timestamp.is_some())
                })
                .collect();
            s.reported.retain(|_, (uid, _)| s.pods.contains_key(uid));
            let events = std::mem::take(&mut s.events);
            (statuses, finishes, events)
        });
        let Some((statuses, finishes, events)) = work else {
            return;
        };
        for (key, uid, event) in events {
            write_event(&client, &settings.node_name, &key, &uid, event).await;
        }
        if statuses.is_empty() && finishes.is_empty() {
            shared.work.notified().await;
            continue;
        }
        let mut failed = false;
        let results = futures::stream::iter(statuses)
            .map(|(key, uid, status, previous)| {
                let client = client.clone();
                async move {
                    let (namespace, name) = key.split_once('/').unwrap_or(("default", &key));
                    let api: Api<Pod> = Api::namespaced(client, namespace);
                    let patch = status_patch(&uid, &status, previous.as_ref());
                    let result = api
                        .patch_status(
                            name,
                            &PatchParams {
                                field_manager: Some(crate::registration::FIELD_MANAGER.into()),
                                ..Default::default()
                            },
                            &Patch::Merge(patch),
                        )
                        .await;
                    (key, uid, status, result)
                }
            })
            .buffer_unordered(settings.status_writes.max(1))
            .collect::<Vec<_>>()
            .await;
        for (key, uid, status, result) in results {
            match result {
                Ok(_) => {
                    shared.with_state(|s| s.written.insert(key, (uid, status)));
                }
                Err(e) if retryable(&e) => {
                    tracing::debug!(pod = %key, error = %e, "pod status not written; retrying");
                    failed = true;
                    shared.with_state(|s| {
                        s.pending.entry(key).or_insert((uid, status));
                    });
                }
                Err(e) => {
                    // Gone, or another pod by now: nothing to write to.
                    tracing::debug!(pod = %key, error = %e, "pod status not written");
                    shared.with_state(|s| s.written.remove(&key));
                }
            }
        }
        for finish in finishes {
            let api: Api<Pod> = Api::namespaced(client.clone(), &finish.namespace);
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(finish.uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(&finish.name, &params).await {
                Ok(_) => {
                    tracing::info!(pod = %format!("{}/{}", finish.namespace, finish.name), "pod deleted after it stopped");
                }
                Err(e) if retryable(&e) => {
                    failed = true;
                    shared.with_state(|s| s.finish.insert(finish));
                }
                Err(e) => tracing::debug!(error = %e, "pod deletion not finished: gone already"),
            }
        }
        if failed {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(settings.retry_max);
        } else {
            wait = settings.retry;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_patch_nulls_what_went_and_pins_the_uid() {
        let before = PodStatus {
            phase: Some("Failed".into()),
            reason: Some("Evicted".into()),
            ..Default::default()
        };
        let now = PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        };
        let patch = status_patch("u-1", &now, Some(&before));
        assert_eq!(patch["metadata"]["uid"], "u-1");
        assert_eq!(patch["status"]["phase"], "Running");
        assert_eq!(patch["status"]["reason"], Value::Null);
        assert!(patch["status"].get("reason").is_some());
        let first = status_patch("u-1", &now, None);
        assert!(first["status"].get("reason").is_none());
    }

    #[test]
    fn a_pod_reads_the_config_maps_and_secrets_its_volumes_name() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {"containers": [{"name": "c"}], "volumes": [
                {"name": "a", "configMap": {"name": "settings"}},
                {"name": "b", "secret": {"secretName": "keys"}},
                {"name": "c", "emptyDir": {}},
            ]},
        }))
        .expect("pod");
        assert_eq!(
            references(&pod),
            vec![
                Reference::ConfigMap {
                    namespace: "shop".into(),
                    name: "settings".into()
                },
                Reference::Secret {
                    namespace: "shop".into(),
                    name: "keys".into()
                },
            ]
        );
    }

    #[test]
    fn only_a_refusal_from_the_server_side_is_final() {
        let answer = |code| {
            ::kube::Error::Api(
                ::kube::core::Status::failure("no", "NotFound")
                    .with_code(code)
                    .boxed(),
            )
        };
        assert!(!retryable(&answer(404)));
        assert!(!retryable(&answer(409)));
        assert!(retryable(&answer(503)));
        assert!(retryable(&answer(429)));
    }
}
