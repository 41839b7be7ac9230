//! The Kubernetes API server, served by every control-plane member over the replicated
//! store: HTTPS (HTTP/1.1 and HTTP/2) with client certificates under the site CA or
//! bearer tokens, RBAC, discovery, Table output, and get/list/watch/create/update/patch/
//! delete on the resources in [`kinds`]. Keys are `/registry/<group>/<resource>/
//! [<namespace>/]<name>`, values the object's JSON, `resourceVersion` the store revision.
//!
//! Owns request handling, admission and the watch cache; it reaches the store only
//! through the replica (writes are raft proposals, reads follow a ReadIndex round) and
//! never touches raft, the log or peers. On the leader it also runs what kube-apiserver
//! and the controller manager keep the API itself working with: namespace deletion,
//! garbage collection ([`gc`]), nodes' certificates ([`certificates`]) and cluster-info
//! ([`cluster_info`]).

pub mod admit;
pub mod auth;
pub mod cache;
pub mod certificates;
pub mod cluster_info;
pub mod discovery;
pub mod gc;
pub mod handler;
pub mod kinds;
pub mod managed;
pub mod openapi;
pub mod patch;
pub mod pod_log;
pub mod protobuf;
pub mod select;
pub mod status;
pub mod table;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde_json::{Value, json};

use crate::consensus::replica::Replica;
use crate::store::{Command, Op};

pub use auth::{Tokens, User};
pub use cache::{Cache, CacheSettings};

/// The API server's settings; every limit and timeout is named here.
#[derive(Debug, Clone)]
pub struct ApiServerSettings {
    /// The address clients reach this member at (`host:port`), for discovery.
    pub advertise: String,
    /// The largest request body (kube-apiserver's is 3 MiB).
    pub max_body_bytes: usize,
    /// The largest object stored (etcd's default request limit, 1.5 MiB).
    pub max_object_bytes: usize,
    /// How long a client may take to send its request headers.
    pub header_read_timeout: Duration,
    /// How long a client may take to send its request body.
    pub body_read_timeout: Duration,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// Open connections at most; further ones are closed at once (keep this below the
    /// process's file handle limit).
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams on one connection.
    pub max_streams: u32,
    /// Open watches on this member at most; further ones get 429.
    pub max_watches: usize,
    /// A watch without `timeoutSeconds` lasts between this and twice this (as
    /// kube-apiserver's `--min-request-timeout`).
    pub watch_timeout: Duration,
    /// How long a watch waits for its client to take the next event before it ends the
    /// stream: a client that stopped reading gives its watch slot back (it resumes from
    /// the last resourceVersion it read, as after any ended watch).
    pub watch_stall: Duration,
    /// Bookmarks go out this often to watchers that allow them.
    pub bookmark_interval: Duration,
    /// How long a consistent read waits for the watch cache to catch up.
    pub cache_wait: Duration,
    /// How often the leader looks for namespaces being deleted.
    pub namespace_sweep: Duration,
    /// How often the leader's garbage collector sweeps when nothing wakes it (every
    /// deletion does; the interval catches objects created for owners already gone).
    pub gc_interval: Duration,
    /// How often the leader looks for nodes' certificate requests to approve and sign,
    /// and for token changes cluster-info's signatures must follow.
    pub certificate_sweep: Duration,
    /// How many days the certificates signed for nodes are valid (nodes renew before).
    pub node_certificate_days: i32,
    /// The tolerationSeconds of the not-ready and unreachable NoExecute tolerations
    /// every pod is given unless it has its own (DefaultTolerationSeconds admission).
    pub default_toleration_seconds: i64,
    pub cache: CacheSettings,
}

impl Default for ApiServerSettings {
    fn default() -> Self {
        Self {
            advertise: "127.0.0.1:6443".into(),
            max_body_bytes: 3 << 20,
            max_object_bytes: 1536 * 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 2048,
            max_streams: 250,
            max_watches: 8192,
            watch_timeout: Duration::from_secs(1800),
            watch_stall: Duration::from_secs(60),
            bookmark_interval: Duration::from_secs(60),
            cache_wait: Duration::from_secs(10),
            namespace_sweep: Duration::from_secs(2),
            gc_interval: Duration::from_secs(10),
            certificate_sweep: Duration::from_secs(1),
            node_certificate_days: 365,
            default_toleration_seconds: 300,
            cache: CacheSettings::default(),
        }
    }
}

/// What every request shares.
pub struct ApiState {
    pub replica: Arc<Replica>,
    pub cache: Arc<Cache>,
    pub settings: ApiServerSettings,
    pub tokens: Tokens,
    pub watches: AtomicUsize,
    pub requests: AtomicU64,
    /// Woken when a namespace is marked for deletion, so its contents go soon.
    pub namespace_deleted: tokio::sync::Notify,
    /// Woken by every deletion, so dependents go soon.
    pub gc_wake: tokio::sync::Notify,
    /// The system namespaces and default RBAC exist (`/readyz` waits for it, as
    /// kube-apiserver's waits for its bootstrap hooks).
    pub bootstrapped: std::sync::atomic::AtomicBool,
    /// The site CA, which signs nodes' certificate requests (None: requests stay
    /// unsigned).
    pub signer: Option<crate::peers::pki::SiteCa>,
}

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("TLS: {0}")]
    Tls(String),
}

/// A running API server: its tasks end when it is dropped or stopped.
pub struct RunningApiServer {
    pub state: Arc<ApiState>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningApiServer {
    pub fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for RunningApiServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts serving on `listener` with `tls` (which must ask for, but not require, client
/// certificates under the site CA).
pub fn start(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    replica: Arc<Replica>,
    settings: ApiServerSettings,
    tokens: Tokens,
    signer: Option<crate::peers::pki::SiteCa>,
) -> RunningApiServer {
    let cache = Cache::new(settings.cache.clone());
    let state = Arc::new(ApiState {
        replica: replica.clone(),
        cache: cache.clone(),
        settings,
        tokens,
        watches: AtomicUsize::new(0),
        requests: AtomicU64::new(0),
        namespace_deleted: tokio::sync::Notify::new(),
        gc_wake: tokio::sync::Notify::new(),
        bootstrapped: std::sync::atomic::AtomicBool::new(false),
        signer,
    });
    let mut tls = tls;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tasks = vec![
        tokio::spawn(cache.follow(replica)),
        tokio::spawn(accept_loop(listener, Arc::new(tls), state.clone())),
        tokio::spawn(bootstrap(state.clone())),
        tokio::spawn(namespace_sweeper(state.clone())),
        tokio::spawn(garbage_collector(state.clone())),
        tokio::spawn(node_bootstrap_controller(state.clone())),
    ];
    RunningApiServer { state, tasks }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<ApiState>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let max = state.settings.max_connections;
    crate::accept::accept_loop(listener, max, "kubernetes-api", move |tcp, peer| {
        serve_connection(acceptor.clone(), tcp, peer, state.clone())
    })
    .await;
}

async fn serve_connection(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    state: Arc<ApiState>,
) {
    let _ = tcp.set_nodelay(true);
    let tls =
        match tokio::time::timeout(state.settings.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "API server: TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "API server: TLS handshake timed out");
                return;
            }
        };
    let user = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| User::from_certificate(cert.as_ref()));
    let header_read_timeout = state.settings.header_read_timeout;
    let max_streams = state.settings.max_streams;
    let service = hyper::service::service_fn(move |request| {
        let state = state.clone();
        let user = user.clone();
        async move {
            Ok::<_, std::convert::Infallible>(handler::serve_request(state, user, request).await)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(max_streams)
        .keep_alive_interval(Duration::from_secs(30));
    if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
        tracing::debug!(%peer, error = %e, "API server: connection ended");
    }
}

/// The objects every site has: the four system namespaces, the default RBAC, and
/// (with a CA) cluster-info for joining nodes.
fn bootstrap_objects(state: &ApiState) -> Vec<(String, Value)> {
    let now = handler::now_rfc3339();
    let mut out = Vec::new();
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        out.push((
            format!("/registry/core/namespaces/{ns}"),
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": ns, "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": now,
                                "labels": {"kubernetes.io/metadata.name": ns}},
                   "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
        ));
    }
    // The RuntimeClass wasm pods name; its scheduling rules keep them on Brink nodes.
    out.push((
        format!(
            "/registry/node.k8s.io/runtimeclasses/{}",
            brink_proto::RUNTIME_CLASS
        ),
        json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
               "metadata": {"name": brink_proto::RUNTIME_CLASS, "uid": uuid::Uuid::new_v4().to_string(), "creationTimestamp": now},
               "handler": "brink",
               "scheduling": {
                   "nodeSelector": {brink_proto::WASM_NODE_LABEL: "true"},
                   "tolerations": [{"key": brink_proto::WASM_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
               }}),
    ));
    for mut object in auth::default_rbac() {
        let kind = object["kind"].as_str().unwrap_or("").to_lowercase();
        let name = object["metadata"]["name"].as_str().unwrap_or("").to_owned();
        object["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
        object["metadata"]["creationTimestamp"] = json!(now);
        out.push((
            format!("/registry/rbac.authorization.k8s.io/{kind}s/{name}"),
            object,
        ));
    }
    if let Some(ca) = &state.signer {
        for (key, mut object) in
            cluster_info::bootstrap_objects(&ca.cert_pem, &state.settings.advertise)
        {
            object["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
            object["metadata"]["creationTimestamp"] = json!(now);
            // Before the RBAC defaults' last binding, which marks the bootstrap done.
            out.insert(out.len() - 1, (key, object));
        }
    }
    out
}

/// A default ClusterRole or binding as stored, brought up to this release's rules,
/// roleRef and subjects (None when it already is, or is not a default, or its owner
/// opted out with `rbac.authorization.kubernetes.io/autoupdate: "false"`), as
/// kube-apiserver reconciles its bootstrap policy on start.
fn reconciled_default(stored: &Value, wanted: &Value) -> Option<Value> {
    let default = |o: &Value| {
        o.pointer("/metadata/labels/kubernetes.io~1bootstrapping")
            .and_then(Value::as_str)
            == Some("rbac-defaults")
    };
    let opted_out = stored
        .pointer("/metadata/annotations/rbac.authorization.kubernetes.io~1autoupdate")
        .and_then(Value::as_str)
        == Some("false");
    if !default(stored) || !default(wanted) || opted_out {
        return None;
    }
    let mut updated = stored.clone();
    let mut changed = false;
    for field in ["rules", "roleRef", "subjects"] {
        if let Some(value) = wanted.get(field)
            && stored.get(field) != Some(value)
        {
            updated[field] = value.clone();
            changed = true;
        }
    }
    changed.then(|| {
        if let Some(m) = updated.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        updated
    })
}

/// Creates what every site has, each object only if missing, and brings the default
/// ClusterRoles and bindings up to this release (a site made by an older Brink gets the
/// roles its new scheduler, controllers and nodes need).
async fn bootstrap(state: Arc<ApiState>) {
    for (key, object) in bootstrap_objects(&state) {
        loop {
            let stored = {
                let replica = state.replica.clone();
                let k = key.clone();
                tokio::task::spawn_blocking(move || replica.store().get(k.as_bytes()))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .flatten()
            };
            let op = match stored {
                None => Op::Create {
                    key: key.clone().into_bytes(),
                    data: serde_json::to_vec(&object).unwrap_or_default(),
                },
                Some(stored) => {
                    let Some(updated) = serde_json::from_slice::<Value>(&stored.data)
                        .ok()
                        .and_then(|old| reconciled_default(&old, &object))
                    else {
                        break;
                    };
                    tracing::info!(
                        key,
                        "API server: a default role or binding brought up to date"
                    );
                    Op::Update {
                        key: key.clone().into_bytes(),
                        data: serde_json::to_vec(&updated).unwrap_or_default(),
                        expect_mod: Some(stored.mod_revision),
                    }
                }
            };
            match state.replica.propose(Command { ops: vec![op] }).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(key, error = %e, "API server: bootstrap write failed; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
    // Ready once the cache holds them too, so the first request is authorized by them.
    let revision = *state.replica.subscribe_revision().borrow();
    while !state.cache.wait_for(revision, Duration::from_secs(1)).await {}
    state
        .bootstrapped
        .store(true, std::sync::atomic::Ordering::Release);
}

/// Sweeps run back to back while each makes progress, at most this many.
const GC_SWEEPS_IN_A_ROW: usize = 16;

/// On the leader: collects owned objects whose owners are gone (see [`gc`]).
async fn garbage_collector(state: Arc<ApiState>) {
    loop {
        tokio::select! {
            () = state.gc_wake.notified() => {}
            () = tokio::time::sleep(state.settings.gc_interval) => {}
        }
        // A sweep that wrote something may have unblocked the next step (a dependent
        // gone lets its owner's finalizer go): sweep again at once, a bounded number
        // of times, each after the cache has seen the previous writes.
        for _ in 0..GC_SWEEPS_IN_A_ROW {
            if !state.replica.is_leader() || !state.cache.is_ready() {
                break;
            }
            let revision = *state.replica.subscribe_revision().borrow();
            state
                .cache
                .wait_for(revision, state.settings.cache_wait)
                .await;
            if gc::collect(&state).await == 0 {
                break;
            }
        }
    }
}

/// On the leader: approves and signs nodes' certificate requests (see [`certificates`])
/// and keeps cluster-info signed for the current tokens (see [`cluster_info`]).
async fn node_bootstrap_controller(state: Arc<ApiState>) {
    let Some(ca) = state.signer.clone() else {
        return;
    };
    loop {
        tokio::time::sleep(state.settings.certificate_sweep).await;
        if state.replica.is_leader() && state.cache.is_ready() {
            certificates::sweep(&state, &ca).await;
            cluster_info::sweep(&state).await;
        }
    }
}

/// On the leader: deletes what namespaces marked for deletion hold, then the namespaces.
async fn namespace_sweeper(state: Arc<ApiState>) {
    loop {
        tokio::select! {
            () = state.namespace_deleted.notified() => {}
            () = tokio::time::sleep(state.settings.namespace_sweep) => {}
        }
        if !state.replica.is_leader() || !state.cache.is_ready() {
            continue;
        }
        let (namespaces, _) = state.cache.list("/registry/core/namespaces/");
        for ns in namespaces
            .iter()
            .filter(|n| n.pointer("/metadata/deletionTimestamp").is_some())
        {
            let Some(name) = ns.pointer("/metadata/name").and_then(Value::as_str) else {
                continue;
            };
            let mut ops = Vec::new();
            for kind in kinds::KINDS.iter().filter(|k| k.namespaced) {
                let (objects, _) = state.cache.list(&kind.prefix(Some(name)));
                for object in objects.iter() {
                    let object_name = object
                        .pointer("/metadata/name")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    ops.push(Op::Delete {
                        key: kind.key(Some(name), object_name).into_bytes(),
                        expect_mod: None,
                    });
                }
            }
            let result = if ops.is_empty() {
                state
                    .replica
                    .propose(Command {
                        ops: vec![Op::Delete {
                            key: format!("/registry/core/namespaces/{name}").into_bytes(),
                            expect_mod: None,
                        }],
                    })
                    .await
            } else {
                // In batches small enough for one raft proposal each.
                let mut last = Ok(crate::store::Applied::AlreadyApplied);
                for chunk in ops.chunks(64) {
                    last = state
                        .replica
                        .propose(Command {
                            ops: chunk.to_vec(),
                        })
                        .await;
                    if last.is_err() {
                        break;
                    }
                }
                last
            };
            if let Err(e) = result {
                tracing::warn!(namespace = name, error = %e, "API server: namespace cleanup failed; trying again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_roles_are_brought_up_to_date_unless_their_owner_opted_out() {
        let wanted = json!({"kind": "ClusterRole", "metadata": {"name": "r", "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
                            "rules": [{"verbs": ["get"]}, {"verbs": ["patch"]}]});
        let old = json!({"kind": "ClusterRole", "metadata": {"name": "r", "uid": "u", "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
                         "rules": [{"verbs": ["get"]}]});
        let updated = reconciled_default(&old, &wanted).expect("updated");
        assert_eq!(updated["rules"], wanted["rules"]);
        assert_eq!(updated["metadata"]["uid"], "u");
        assert_eq!(reconciled_default(&updated, &wanted), None);
        let mut kept = old.clone();
        kept["metadata"]["annotations"] =
            json!({"rbac.authorization.kubernetes.io/autoupdate": "false"});
        assert_eq!(reconciled_default(&kept, &wanted), None);
        let namespace = json!({"kind": "Namespace", "metadata": {"name": "default"}});
        assert_eq!(reconciled_default(&namespace, &namespace), None);
    }
}
