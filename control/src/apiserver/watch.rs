//! Watches as kube-apiserver streams them: one JSON event per line on a 200 response,
//! synthetic ADDED events for the current state when the client gave no revision (or
//! `0`, or `sendInitialEvents=true`, closed by the `k8s.io/initial-events-end`
//! bookmark), BOOKMARK events on an interval when asked for, `timeoutSeconds`, and a
//! revision that is too old answered as an in-stream ERROR event with a 410 `Status`
//! (kube-rs relists only on that).
//!
//! A watcher that falls behind the cache's broadcast is ended with the same 410, so a
//! client that never reads costs a bounded amount of memory.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http::{HeaderValue, Response};
use http_body_util::BodyExt as _;
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::cache::{Broadcast, Change, ChangeKind};
use super::handler::{Body, Call, Selection, Target, error_response};
use super::kinds::Kind;
use super::status::ApiError;
use crate::store::EventKind;

/// Frames queued for one watch's connection before its task waits for the client.
const STREAM_QUEUE: usize = 64;

/// How event objects are shown: as stored, or as one-row Tables (what `kubectl get -w`
/// asks for), the first carrying the column definitions.
struct Shape {
    table: Option<String>,
    columns_sent: bool,
}

impl Shape {
    fn line(&mut self, kind: &Kind, word: &str, object: &Value) -> Bytes {
        match &self.table {
            None => event_line(word, object),
            Some(include) => {
                let rv = object
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                let mut t = super::table::table(kind, &[object], &rv, None, include);
                if self.columns_sent {
                    t["columnDefinitions"] = json!([]);
                }
                self.columns_sent = true;
                event_line(word, &t)
            }
        }
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn bookmark(kind: &Kind, revision: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": revision.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line(
        "BOOKMARK",
        &json!({"kind": kind.kind, "apiVersion": kind.api_version(), "metadata": metadata}),
    )
}

fn expired(message: String) -> Bytes {
    event_line("ERROR", &ApiError::expired(message).to_status())
}

struct Filter {
    prefix: String,
    selection: Selection,
}

impl Filter {
    /// What a change looks like to this watcher: a change that moves an object into or
    /// out of its selection is an ADDED or DELETED to it, as Kubernetes sends them.
    fn view(&self, change: &Change) -> Option<&'static str> {
        if !change.key.starts_with(&self.prefix) {
            return None;
        }
        let previous_matched = change.previous.as_ref().map(|p| self.selection.matches(p));
        let now = self.selection.matches(&change.object);
        match change.kind {
            ChangeKind::Deleted => now.then_some("DELETED"),
            ChangeKind::Added => now.then_some("ADDED"),
            ChangeKind::Modified => match (previous_matched.unwrap_or(now), now) {
                (true, true) => Some("MODIFIED"),
                (false, true) => Some("ADDED"),
                (true, false) => Some("DELETED"),
                (false, false) => None,
            },
        }
    }
}

/// Serves a watch request.
pub async fn serve(call: Call<'_>, target: Target) -> Response<Body> {
    match start(&call, &target).await {
        Ok(response) => response,
        Err(e) => error_response(&e),
    }
}

async fn start(call: &Call<'_>, target: &Target) -> Result<Response<Body>, ApiError> {
    let state = call.state.clone();
    let kind = target.kind;
    let mut selection = Selection::parse(call, kind)?;
    if let Some(name) = &target.name {
        // `/watch/.../NAME` watches one object.
        selection.fields =
            super::select::FieldSelector::parse(&format!("metadata.name={name}"), kind)
                .map_err(ApiError::bad_request)?;
    }
    let filter = Filter {
        prefix: kind.prefix(target.namespace.as_deref()),
        selection,
    };
    let bookmarks = call.q("allowWatchBookmarks") == Some("true");
    let send_initial = match call.q("sendInitialEvents") {
        Some("true") => Some(true),
        Some("false") => Some(false),
        None | Some("") => None,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "sendInitialEvents {other:?} is not true or false"
            )));
        }
    };
    let rv = call.q("resourceVersion").unwrap_or("");
    if send_initial.is_some() && call.q("resourceVersionMatch") != Some("NotOlderThan") {
        return Err(ApiError::bad_request(
            "sendInitialEvents is forbidden unless resourceVersionMatch is NotOlderThan",
        ));
    }
    if send_initial == Some(true) && !bookmarks {
        return Err(ApiError::bad_request(
            "sendInitialEvents requires allowWatchBookmarks=true",
        ));
    }
    let timeout = match call.q("timeoutSeconds") {
        Some(t) => Duration::from_secs(
            t.parse::<u64>()
                .map_err(|_| ApiError::bad_request("timeoutSeconds must be a number"))?,
        ),
        None => {
            let min = state.settings.watch_timeout.as_secs().max(1);
            Duration::from_secs(min + fastrand::u64(0..min))
        }
    }
    .min(state.settings.watch_timeout * 2);
    // Where the stream starts, and whether it opens with the current state.
    let (after, initial) = match (rv, send_initial) {
        ("", None) | (_, Some(true)) => {
            if rv.is_empty() {
                super::handler::consistent(&state).await?;
            }
            (None, true)
        }
        ("0", None) => (None, true),
        (rv, _) => (
            Some(rv.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("resourceVersion {rv:?} is not valid"))
            })?),
            false,
        ),
    };
    let active = state.watches.fetch_add(1, Ordering::Relaxed);
    if active >= state.settings.max_watches {
        state.watches.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::too_many_requests(format!(
            "{active} watches are open on this member: at most {} may be",
            state.settings.max_watches
        )));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(STREAM_QUEUE);
    let watch_state = state.clone();
    let bookmark_interval = state.settings.bookmark_interval;
    let shape = Shape {
        table: call
            .accept
            .contains("as=Table")
            .then(|| call.q("includeObject").unwrap_or("Metadata").to_owned()),
        columns_sent: false,
    };
    tokio::spawn(async move {
        let state = watch_state;
        run(
            &state,
            kind,
            filter,
            after,
            initial,
            send_initial == Some(true),
            bookmarks,
            bookmark_interval,
            timeout,
            tx,
            shape,
        )
        .await;
        state.watches.fetch_sub(1, Ordering::Relaxed);
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(Frame::data(b)), rx))
    });
    let body = http_body_util::StreamBody::new(stream.boxed()).boxed_unsync();
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    response.headers_mut().insert(
        "cache-control",
        HeaderValue::from_static("no-cache, private"),
    );
    Ok(response)
}

#[allow(clippy::too_many_arguments)]
async fn run(
    state: &Arc<super::ApiState>,
    kind: &'static Kind,
    filter: Filter,
    after: Option<u64>,
    initial: bool,
    initial_end_bookmark: bool,
    bookmarks: bool,
    bookmark_interval: Duration,
    timeout: Duration,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    mut shape: Shape,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let stall = state.settings.watch_stall;
    // A client that stops reading fills the stream's queue; waiting for it is bounded by
    // the watch's own deadline and by `watch_stall`, so it cannot hold its slot (or this
    // task) for good. What it has not read of the queue is all it costs meanwhile.
    let send = |b: Bytes| {
        let tx = tx.clone();
        async move {
            let until = deadline.min(tokio::time::Instant::now() + stall);
            matches!(tokio::time::timeout_at(until, tx.send(b)).await, Ok(Ok(())))
        }
    };
    let Some(start) = state.cache.watch(after.unwrap_or(u64::MAX)) else {
        return;
    };
    let mut receiver = start.receiver;
    let mut last = start.at;
    if initial {
        let (objects, _) = state.cache.list(&filter.prefix);
        for object in objects.iter().filter(|o| filter.selection.matches(o)) {
            if !send(shape.line(kind, "ADDED", object)).await {
                return;
            }
        }
        if initial_end_bookmark && !send(bookmark(kind, last, true)).await {
            return;
        }
    } else if let Some(after) = after {
        last = after;
        if start.from_store {
            // Older than the cache keeps: read the store's history up to where the
            // broadcast takes over.
            let prefix = filter.prefix.clone();
            let replica = state.replica.clone();
            let read = tokio::task::spawn_blocking(move || {
                replica.store().events_after(prefix.as_bytes(), after, 0)
            })
            .await;
            match read {
                Ok(Ok(events)) => {
                    for event in events.into_iter().filter(|e| e.revision <= start.at) {
                        let (kind_word, value, revision) = match &event.kind {
                            EventKind::Put(v) => (
                                if v.version == 1 {
                                    ChangeKind::Added
                                } else {
                                    ChangeKind::Modified
                                },
                                v,
                                v.mod_revision,
                            ),
                            EventKind::Delete(v) => (ChangeKind::Deleted, v, event.revision),
                        };
                        let Some(object) = super::cache::decode(&value.data, revision) else {
                            continue;
                        };
                        let change = Change {
                            revision: event.revision,
                            key: String::from_utf8_lossy(&event.key).into_owned(),
                            kind: kind_word,
                            object: Arc::new(object),
                            previous: None,
                        };
                        if let Some(word) = filter.view(&change)
                            && !send(shape.line(kind, word, &change.object)).await
                        {
                            return;
                        }
                        last = event.revision;
                    }
                    last = last.max(start.at);
                }
                Ok(Err(crate::store::StoreError::Gone { asked, compacted })) => {
                    let _ = send(expired(format!(
                        "too old resource version: {asked} ({compacted})"
                    )))
                    .await;
                    return;
                }
                _ => {
                    let _ = send(expired("the store's history could not be read".into())).await;
                    return;
                }
            }
        }
        for change in start.backlog {
            if change.revision <= after {
                continue;
            }
            if let Some(word) = filter.view(&change)
                && !send(shape.line(kind, word, &change.object)).await
            {
                return;
            }
        }
        last = last.max(start.at);
    }
    let mut ticker = tokio::time::interval(bookmark_interval);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return,
            () = tx.closed() => return,
            _ = ticker.tick(), if bookmarks => {
                if !send(bookmark(kind, last.max(state.cache.revision()), false)).await {
                    return;
                }
            }
            message = receiver.recv() => match message {
                Ok(Broadcast::Change(change)) => {
                    if change.revision <= last {
                        continue;
                    }
                    last = change.revision;
                    if let Some(word) = filter.view(&change)
                        && !send(shape.line(kind, word, &change.object)).await
                    {
                        return;
                    }
                }
                Ok(Broadcast::Reset) => {
                    let _ = send(expired("the watch cache was reloaded; list again".into())).await;
                    return;
                }
                Err(RecvError::Lagged(n)) => {
                    let _ = send(expired(format!("the watcher fell {n} events behind and was ended; list again"))).await;
                    return;
                }
                Err(RecvError::Closed) => return,
            }
        }
    }
}
