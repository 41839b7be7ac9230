//! The store's debugging API (what `brink store` speaks), with `/readyz` and `/metrics`.
//!
//! Plain HTTP with JSON bodies, for loopback: the Kubernetes-compatible API server that
//! clients will use comes later in issue 5's successors. Values are UTF-8 text here.
//! Owns only request decoding and answers; every write goes through the replica.
//!
//! - `GET /v0/get?key=K` → the value with its revisions, or 404.
//! - `POST /v0/txn` `{"ops": [{"op": "create"|"update"|"delete", "key", "value",
//!   "expectMod"}]}` → `{"revision"}`, or 409 with the refusal.
//! - `GET /v0/range?prefix=P&limit=N&continue=T` → a page.
//! - `GET /v0/watch?prefix=P&after=R&timeoutSeconds=S` → the changes after R, waiting
//!   up to S (at most [`MAX_WATCH_WAIT`]) for the first; 410 when R is compacted.

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

use crate::replica::Replica;
use crate::store::{Applied, Command, Event, EventKind, Op, Refusal, StoreError, Value};

/// The longest a watch request waits for a change.
pub const MAX_WATCH_WAIT: Duration = Duration::from_secs(60);
/// The most keys one range page returns.
pub const MAX_PAGE: usize = 10_000;

/// Serves the API on `listener` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, replica: Arc<Replica>) {
    let app = Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v0/get", get(get_key))
        .route("/v0/txn", post(txn))
        .route("/v0/range", get(range))
        .route("/v0/watch", get(watch))
        .with_state(replica);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "store API failed");
    }
}

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

/// Runs a blocking store read off the async threads.
async fn blocking<T: Send + 'static>(
    replica: &Arc<Replica>,
    f: impl FnOnce(&Replica) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Response> {
    let replica = replica.clone();
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

async fn readyz(State(replica): State<Arc<Replica>>) -> Response {
    if replica.is_leader() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no leader yet\n").into_response()
    }
}

async fn metrics(State(replica): State<Arc<Replica>>) -> Response {
    let m = &replica.metrics;
    let revision = *replica.subscribe_revision().borrow();
    let text = format!(
        "# HELP brink_store_revision The store's revision (raft index of the last applied write).\n# TYPE brink_store_revision gauge\nbrink_store_revision {revision}\n\
         # HELP brink_store_applied_index The last applied raft index.\n# TYPE brink_store_applied_index gauge\nbrink_store_applied_index {}\n\
         # HELP brink_raft_proposals_total Proposals handed to raft.\n# TYPE brink_raft_proposals_total counter\nbrink_raft_proposals_total {}\n\
         # HELP brink_raft_flushes_total Ready batches made durable (one flush each).\n# TYPE brink_raft_flushes_total counter\nbrink_raft_flushes_total {}\n\
         # HELP brink_raft_leader_changes_total Times this member became leader.\n# TYPE brink_raft_leader_changes_total counter\nbrink_raft_leader_changes_total {}\n\
         # HELP brink_raft_is_leader 1 while this member leads.\n# TYPE brink_raft_is_leader gauge\nbrink_raft_is_leader {}\n",
        m.applied_index.load(Ordering::Relaxed),
        m.proposals.load(Ordering::Relaxed),
        m.flushes.load(Ordering::Relaxed),
        m.leader_changes.load(Ordering::Relaxed),
        m.is_leader.load(Ordering::Relaxed),
    );
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

#[derive(Deserialize)]
struct KeyQuery {
    key: String,
}

async fn get_key(State(replica): State<Arc<Replica>>, Query(q): Query<KeyQuery>) -> Response {
    let key = q.key.clone();
    match blocking(&replica, move |r| r.store().get(key.as_bytes())).await {
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

async fn txn(State(replica): State<Arc<Replica>>, body: axum::body::Bytes) -> Response {
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
    match replica.propose(Command { ops }).await {
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
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(Deserialize)]
struct RangeQuery {
    prefix: String,
    #[serde(default)]
    limit: usize,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
}

async fn range(State(replica): State<Arc<Replica>>, Query(q): Query<RangeQuery>) -> Response {
    let limit = if q.limit == 0 {
        MAX_PAGE
    } else {
        q.limit.min(MAX_PAGE)
    };
    let result = blocking(&replica, move |r| {
        r.store()
            .range(q.prefix.as_bytes(), limit, q.continue_token.as_deref())
    })
    .await;
    match result {
        Ok(page) => Json(serde_json::json!({
            "revision": page.revision,
            "continue": page.continue_token,
            "items": page.items.iter().map(|(k, v)| value_out(k, v)).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(response) => response,
    }
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

async fn watch(State(replica): State<Arc<Replica>>, Query(q): Query<WatchQuery>) -> Response {
    let wait = Duration::from_secs(q.timeout_seconds.unwrap_or(30)).min(MAX_WATCH_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let mut revisions = replica.subscribe_revision();
    loop {
        let prefix = q.prefix.clone();
        let after = q.after;
        let events = match blocking(&replica, move |r| {
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
