//! The store's debugging API (what `brink store` speaks), with `/readyz` and `/metrics`.
//!
//! Plain HTTP with JSON bodies, for loopback: the Kubernetes-compatible API server that
//! clients will use comes later in issue 5's successors. Values are UTF-8 text here.
//! Owns only request decoding and answers; every write goes through the replica.
//!
//! Reads are linearizable (a ReadIndex round first) unless `serializable=true` asks for
//! this member's applied state as it is; a member cut off from the leader answers 504.
//!
//! - `GET /v0/get?key=K` → the value with its revisions, or 404.
//! - `POST /v0/txn` `{"ops": [{"op": "create"|"update"|"delete", "key", "value",
//!   "expectMod"}]}` → `{"revision"}`, or 409 with the refusal.
//! - `GET /v0/range?prefix=P&limit=N&continue=T` → a page.
//! - `GET /v0/watch?prefix=P&after=R&timeoutSeconds=S` → the changes after R, waiting
//!   up to S (at most [`MAX_WATCH_WAIT`]) for the first; 410 when R is compacted.
//! - `GET /v0/members` → the leader, voters, learners and members' peer addresses.
//! - `POST /v0/members/remove?id=ID` → removes a member (raft configuration change).
//!
//! A write that got no answer in time is 504 with "may or may not have been applied".

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::consensus::replica::{Replica, ReplicaError};
use crate::peers::transport::TransportMetrics;

/// What the API's handlers share.
pub struct ApiState {
    pub replica: Arc<Replica>,
    /// The QUIC transport's counters, when this member has peers.
    pub transport: Option<Arc<TransportMetrics>>,
}
use crate::store::{Applied, Command, Event, EventKind, Op, Refusal, StoreError, Value};

/// The longest a watch request waits for a change.
pub const MAX_WATCH_WAIT: Duration = Duration::from_secs(60);
/// The most keys one range page returns.
pub const MAX_PAGE: usize = 10_000;
/// The most value bytes one range page returns (a page is cut short, with a continue
/// token, past this: a page of large values must not take the member's memory).
pub const MAX_PAGE_BYTES: usize = 16 << 20;

/// Refuses a query string that is not percent-encoded UTF-8 (the extractor would read
/// `%FF` as U+FFFD, another key than the one asked for).
fn strict_query(uri: &axum::http::Uri) -> Option<Response> {
    crate::apiserver::handler::parse_query(uri.query())
        .err()
        .map(|e| error(StatusCode::BAD_REQUEST, e.message))
}

/// Serves the API on `listener` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, state: ApiState) {
    let app = Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v0/get", get(get_key))
        .route("/v0/txn", post(txn))
        .route("/v0/range", get(range))
        .route("/v0/watch", get(watch))
        .route("/v0/members", get(members))
        .route("/v0/members/remove", post(remove_member))
        .with_state(Arc::new(state));
    let app = hyper_util::service::TowerToHyperService::new(app);
    crate::accept::accept_loop(listener, MAX_CONNECTIONS, "store-api", move |tcp, peer| {
        let app = app.clone();
        async move {
            let service = hyper::service::service_fn(move |request| {
                let app = app.clone();
                async move {
                    use hyper::service::Service as _;
                    // A client that trickles its body (or a handler that hangs) is
                    // answered 408 once the request's deadline passes.
                    match tokio::time::timeout(REQUEST_DEADLINE, app.call(request)).await {
                        Ok(Ok(response)) => Ok::<_, std::convert::Infallible>(response),
                        Ok(Err(never)) => match never {},
                        Err(_) => Ok(error(
                            StatusCode::REQUEST_TIMEOUT,
                            "the request did not complete in time",
                        )),
                    }
                }
            });
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let io = hyper_util::rt::TokioIo::new(tcp);
            if let Err(e) = builder.serve_connection(io, service).await {
                tracing::debug!(%peer, error = %e, "store API: connection ended");
            }
        }
    })
    .await;
}

/// Open connections to the store API at most; further ones are closed at once, so idle
/// clients cannot take every file handle.
pub const MAX_CONNECTIONS: usize = 512;
/// How long a client may take to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take, body included (a watch waits at most
/// [`MAX_WATCH_WAIT`] for changes, so this is longer).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(90);

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({"error": message.into()}))).into_response()
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::Gone { .. } => error(StatusCode::GONE, e.to_string()),
        StoreError::BadContinue => error(StatusCode::BAD_REQUEST, e.to_string()),
        e => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn replica_error(e: ReplicaError) -> Response {
    match e {
        ReplicaError::Timeout(_) => error(StatusCode::GATEWAY_TIMEOUT, e.to_string()),
        e => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Waits for a ReadIndex round unless the caller asked for a serializable read.
async fn barrier(state: &ApiState, serializable: bool) -> Result<(), Response> {
    if serializable {
        return Ok(());
    }
    state.replica.read_barrier().await.map_err(replica_error)
}

/// Runs a blocking store read off the async threads.
async fn blocking<T: Send + 'static>(
    state: &Arc<ApiState>,
    f: impl FnOnce(&Replica) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Response> {
    let replica = state.replica.clone();
    match tokio::task::spawn_blocking(move || f(&replica)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(store_error(e)),
        Err(_) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, "read task failed")),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ValueOut {
    key: String,
    value: String,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
}

fn value_out(key: &[u8], v: &Value) -> ValueOut {
    ValueOut {
        key: String::from_utf8_lossy(key).into_owned(),
        value: String::from_utf8_lossy(&v.data).into_owned(),
        create_revision: v.create_revision,
        mod_revision: v.mod_revision,
        version: v.version,
    }
}

async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    match state.replica.leader() {
        Some(leader) => (StatusCode::OK, format!("ok (leader {leader:x})\n")).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "no leader known\n").into_response(),
    }
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let replica = &state.replica;
    let m = &replica.metrics;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let applied = load(&m.applied_index);
    let commit = load(&m.commit_index);
    let mut rows: Vec<(&str, &str, &str, String)> = vec![
        (
            "brink_store_revision",
            "gauge",
            "The store's revision (raft index of the last applied write).",
            replica.subscribe_revision().borrow().to_string(),
        ),
        (
            "brink_store_applied_index",
            "gauge",
            "The last applied raft index.",
            applied.to_string(),
        ),
        (
            "brink_raft_commit_index",
            "gauge",
            "The commit index this member knows.",
            commit.to_string(),
        ),
        (
            "brink_raft_apply_lag",
            "gauge",
            "Committed entries not yet applied here.",
            commit.saturating_sub(applied).to_string(),
        ),
        (
            "brink_raft_log_last_index",
            "gauge",
            "The last index in this member's raft log.",
            load(&m.last_index).to_string(),
        ),
        (
            "brink_raft_log_first_index",
            "gauge",
            "The first index still in the raft log (earlier ones are in a snapshot).",
            load(&m.first_index).to_string(),
        ),
        (
            "brink_raft_log_entries",
            "gauge",
            "Entries in this member's raft log.",
            (load(&m.last_index) + 1)
                .saturating_sub(load(&m.first_index))
                .to_string(),
        ),
        (
            "brink_raft_term",
            "gauge",
            "The current raft term.",
            load(&m.term).to_string(),
        ),
        (
            "brink_raft_leader_id",
            "gauge",
            "The member this one believes leads (0: none).",
            load(&m.leader_id).to_string(),
        ),
        (
            "brink_raft_is_leader",
            "gauge",
            "1 while this member leads.",
            load(&m.is_leader).to_string(),
        ),
        (
            "brink_raft_leader_changes_total",
            "counter",
            "Times this member became leader.",
            load(&m.leader_changes).to_string(),
        ),
        (
            "brink_raft_proposals_total",
            "counter",
            "Proposals handed to raft.",
            load(&m.proposals).to_string(),
        ),
        (
            "brink_raft_flushes_total",
            "counter",
            "Ready batches made durable (one write-ahead log sync each).",
            load(&m.flushes).to_string(),
        ),
        (
            "brink_raft_flush_seconds_total",
            "counter",
            "Time spent making ready batches durable.",
            format!("{:.6}", load(&m.flush_micros) as f64 / 1e6),
        ),
        (
            "brink_raft_checkpoints_total",
            "counter",
            "Checkpoints: sled's files made durable and the write-ahead log started over.",
            load(&m.checkpoints).to_string(),
        ),
        (
            "brink_raft_read_index_rounds_total",
            "counter",
            "ReadIndex rounds asked of raft (one serves many reads).",
            load(&m.read_rounds).to_string(),
        ),
        (
            "brink_raft_request_timeouts_total",
            "counter",
            "Requests answered with an unknown outcome for want of an answer in time.",
            load(&m.timeouts).to_string(),
        ),
        (
            "brink_raft_voters",
            "gauge",
            "Voters in the applied configuration.",
            load(&m.voters).to_string(),
        ),
        (
            "brink_raft_learners",
            "gauge",
            "Learners in the applied configuration.",
            load(&m.learners).to_string(),
        ),
        (
            "brink_store_compactions_total",
            "counter",
            "History compactions applied here.",
            load(&m.compactions).to_string(),
        ),
        (
            "brink_store_compacted_revision",
            "gauge",
            "History before this revision is gone (watches from earlier get 410).",
            replica.store().compacted().unwrap_or(0).to_string(),
        ),
        (
            "brink_raft_snapshots_made_total",
            "counter",
            "Snapshots written here (each lets the log be truncated).",
            load(&m.snapshots_made).to_string(),
        ),
        (
            "brink_raft_snapshots_installed_total",
            "counter",
            "Snapshots received from a leader and installed.",
            load(&m.snapshots_installed).to_string(),
        ),
        (
            "brink_raft_snapshots_sent_total",
            "counter",
            "Snapshots sent whole to members that fell behind.",
            load(&m.snapshots_sent).to_string(),
        ),
        (
            "brink_raft_snapshot_send_failures_total",
            "counter",
            "Snapshot sends that failed (raft tries again).",
            load(&m.snapshots_send_failures).to_string(),
        ),
    ];
    if let Some(t) = &state.transport {
        rows.extend([
            (
                "brink_peer_messages_sent_total",
                "counter",
                "Raft messages written to peers.",
                load(&t.messages_sent).to_string(),
            ),
            (
                "brink_peer_messages_received_total",
                "counter",
                "Raft messages read from peers.",
                load(&t.messages_received).to_string(),
            ),
            (
                "brink_peer_messages_dropped_total",
                "counter",
                "Raft messages dropped (queue full, peer unknown or down).",
                load(&t.messages_dropped).to_string(),
            ),
            (
                "brink_peer_connects_total",
                "counter",
                "Connections made to peers.",
                load(&t.connects).to_string(),
            ),
            (
                "brink_peer_connect_failures_total",
                "counter",
                "Peer links that failed or could not be made.",
                load(&t.connect_failures).to_string(),
            ),
            (
                "brink_peer_frames_refused_total",
                "counter",
                "Peer connections closed for a bad frame.",
                load(&t.frames_refused).to_string(),
            ),
        ]);
    }
    let mut text = String::new();
    for (name, kind, help, value) in rows {
        text.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    let (buckets, sum, count) = m.commit_latency.snapshot();
    let name = "brink_raft_commit_seconds";
    text.push_str(&format!(
        "# HELP {name} Writes proposed at this member, from arrival to applied (durable on a quorum).\n# TYPE {name} histogram\n"
    ));
    for (bound, cumulative) in buckets {
        let le = bound.map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
        text.push_str(&format!("{name}_bucket{{le=\"{le}\"}} {cumulative}\n"));
    }
    text.push_str(&format!("{name}_sum {sum:.6}\n{name}_count {count}\n"));
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

async fn members(State(state): State<Arc<ApiState>>) -> Response {
    let conf = state.replica.conf_state();
    let result = blocking(&state, |r| r.store().members()).await;
    match result {
        Ok(members) => Json(serde_json::json!({
            "leader": state.replica.leader(),
            "voters": conf.voters,
            "learners": conf.learners,
            "members": members.iter().map(|(id, addr)| serde_json::json!({"id": id, "peerAddr": addr})).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(response) => response,
    }
}

#[derive(Deserialize)]
struct RemoveQuery {
    id: u64,
}

async fn remove_member(
    State(state): State<Arc<ApiState>>,
    Query(q): Query<RemoveQuery>,
) -> Response {
    let conf = state.replica.conf_state();
    if !conf.voters.contains(&q.id) && !conf.learners.contains(&q.id) {
        return error(
            StatusCode::NOT_FOUND,
            format!("member {} is not in the cluster", q.id),
        );
    }
    if conf.voters == [q.id] {
        return error(StatusCode::CONFLICT, "the last voter cannot be removed");
    }
    let mut change = raft::prelude::ConfChange::default();
    change.set_change_type(raft::prelude::ConfChangeType::RemoveNode);
    change.node_id = q.id;
    match state.replica.change_membership(change).await {
        Ok(conf) => Json(serde_json::json!({"voters": conf.voters, "learners": conf.learners}))
            .into_response(),
        Err(e) => replica_error(e),
    }
}

#[derive(Deserialize)]
struct KeyQuery {
    key: String,
    #[serde(default)]
    serializable: bool,
}

async fn get_key(
    State(state): State<Arc<ApiState>>,
    uri: axum::http::Uri,
    Query(q): Query<KeyQuery>,
) -> Response {
    if let Some(response) = strict_query(&uri) {
        return response;
    }
    if let Err(response) = barrier(&state, q.serializable).await {
        return response;
    }
    let key = q.key.clone();
    match blocking(&state, move |r| r.store().get(key.as_bytes())).await {
        Ok(Some(v)) => Json(value_out(q.key.as_bytes(), &v)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("key {:?} not found", q.key)),
        Err(response) => response,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TxnIn {
    ops: Vec<OpIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OpIn {
    op: String,
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    expect_mod: Option<u64>,
}

/// The most operations in one transaction, and the largest key and value.
pub const MAX_TXN_OPS: usize = 128;
pub const MAX_KEY_BYTES: usize = 1024;
pub const MAX_VALUE_BYTES: usize = 1536 * 1024;

fn to_op(i: usize, op: OpIn) -> Result<Op, String> {
    if op.key.is_empty() || op.key.len() > MAX_KEY_BYTES {
        return Err(format!("ops[{i}].key: 1 to {MAX_KEY_BYTES} bytes"));
    }
    if op.value.as_ref().is_some_and(|v| v.len() > MAX_VALUE_BYTES) {
        return Err(format!("ops[{i}].value: at most {MAX_VALUE_BYTES} bytes"));
    }
    let key = op.key.into_bytes();
    let value = |v: Option<String>| v.ok_or_else(|| format!("ops[{i}].value: required"));
    match op.op.as_str() {
        "create" if op.expect_mod.is_none() => Ok(Op::Create {
            key,
            data: value(op.value)?.into_bytes(),
        }),
        "create" => Err(format!("ops[{i}]: create takes no expectMod")),
        "update" => Ok(Op::Update {
            key,
            data: value(op.value)?.into_bytes(),
            expect_mod: op.expect_mod,
        }),
        "delete" if op.value.is_none() => Ok(Op::Delete {
            key,
            expect_mod: op.expect_mod,
        }),
        "delete" => Err(format!("ops[{i}]: delete takes no value")),
        other => Err(format!(
            "ops[{i}].op: {other:?} is not create, update or delete"
        )),
    }
}

async fn txn(State(state): State<Arc<ApiState>>, body: axum::body::Bytes) -> Response {
    let input: TxnIn = match serde_json::from_slice(&body) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid transaction: {e}")),
    };
    if input.ops.is_empty() || input.ops.len() > MAX_TXN_OPS {
        return error(
            StatusCode::BAD_REQUEST,
            format!("a transaction has 1 to {MAX_TXN_OPS} operations"),
        );
    }
    let ops = match input
        .ops
        .into_iter()
        .enumerate()
        .map(|(i, op)| to_op(i, op))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(ops) => ops,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match state.replica.propose(Command { ops }).await {
        Ok(Applied::Done { revision }) => {
            Json(serde_json::json!({"revision": revision})).into_response()
        }
        Ok(Applied::Refused(refusal)) => {
            let message = match refusal {
                Refusal::AlreadyExists { op } => format!("ops[{op}]: the key exists"),
                Refusal::NotFound { op } => format!("ops[{op}]: the key does not exist"),
                Refusal::Conflict { op, actual_mod } => {
                    format!("ops[{op}]: the key's modRevision is {actual_mod}")
                }
                Refusal::Invalid { reason } => reason,
            };
            error(StatusCode::CONFLICT, message)
        }
        Ok(Applied::AlreadyApplied) => error(StatusCode::INTERNAL_SERVER_ERROR, "entry replayed"),
        Err(e) => replica_error(e),
    }
}

#[derive(Deserialize)]
struct RangeQuery {
    prefix: String,
    #[serde(default)]
    limit: usize,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
    #[serde(default)]
    serializable: bool,
}

async fn range(
    State(state): State<Arc<ApiState>>,
    uri: axum::http::Uri,
    Query(q): Query<RangeQuery>,
) -> Response {
    if let Some(response) = strict_query(&uri) {
        return response;
    }
    let limit = if q.limit == 0 {
        MAX_PAGE
    } else {
        q.limit.min(MAX_PAGE)
    };
    if let Err(response) = barrier(&state, q.serializable).await {
        return response;
    }
    let result = blocking(&state, move |r| {
        r.store()
            .range(q.prefix.as_bytes(), limit, q.continue_token.as_deref())
    })
    .await;
    match result {
        Ok(mut page) => {
            let mut bytes = 0usize;
            if let Some(cut) = page.items.iter().position(|(k, v)| {
                bytes += k.len() + v.data.len();
                bytes > MAX_PAGE_BYTES
            }) {
                // Keep at least one item so a page always makes progress.
                page.items.truncate(cut.max(1));
                page.continue_token = page
                    .items
                    .last()
                    .map(|(k, _)| crate::store::Store::continue_after(page.revision, k));
            }
            range_page(page)
        }
        Err(response) => response,
    }
}

fn range_page(page: crate::store::Page) -> Response {
    Json(serde_json::json!({
        "revision": page.revision,
        "continue": page.continue_token,
        "items": page.items.iter().map(|(k, v)| value_out(k, v)).collect::<Vec<_>>(),
    }))
    .into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WatchQuery {
    prefix: String,
    #[serde(default)]
    after: u64,
    #[serde(default)]
    timeout_seconds: Option<u64>,
}

fn event_out(e: &Event) -> serde_json::Value {
    let (kind, v) = match &e.kind {
        EventKind::Put(v) => ("PUT", v),
        EventKind::Delete(v) => ("DELETE", v),
    };
    serde_json::json!({"type": kind, "revision": e.revision, "object": value_out(&e.key, v)})
}

async fn watch(
    State(state): State<Arc<ApiState>>,
    uri: axum::http::Uri,
    Query(q): Query<WatchQuery>,
) -> Response {
    if let Some(response) = strict_query(&uri) {
        return response;
    }
    let wait = Duration::from_secs(q.timeout_seconds.unwrap_or(30)).min(MAX_WATCH_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let mut revisions = state.replica.subscribe_revision();
    loop {
        let prefix = q.prefix.clone();
        let after = q.after;
        let events = match blocking(&state, move |r| {
            r.store().events_after(prefix.as_bytes(), after, MAX_PAGE)
        })
        .await
        {
            Ok(events) => events,
            Err(response) => return response,
        };
        if !events.is_empty() {
            return Json(serde_json::json!({
                "events": events.iter().map(event_out).collect::<Vec<_>>(),
            }))
            .into_response();
        }
        tokio::select! {
            changed = revisions.changed() => {
                if changed.is_err() {
                    return error(StatusCode::SERVICE_UNAVAILABLE, "the replica stopped");
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                return Json(serde_json::json!({"events": []})).into_response();
            }
        }
    }
}
