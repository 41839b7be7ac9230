//! The kubelet-style endpoint: `/healthz`, `/pods` (a `v1/PodList` with live statuses),
//! `/containerLogs/{namespace}/{pod}/{container}` (`tailLines`, `timestamps`, `follow`),
//! `/metrics` (Prometheus text), `/debug/manifests` (what the pod source refused) and the
//! Gateway API objects with the status the data plane computed
//! (`/apis/gateway.networking.k8s.io/v1/{gatewayclasses,gateways,httproutes}`, as lists
//! the API server would return).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::agent::Agent;
use crate::logs::{self, LogQuery};

/// Serves the endpoint on `listener` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, agent: Arc<Agent>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/pods", get(pods))
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .route("/metrics", get(metrics))
        .route("/debug/manifests", get(manifest_errors))
        .route(
            "/apis/gateway.networking.k8s.io/v1/{kind}",
            get(gateway_objects),
        )
        .route("/api/v1/{kind}", get(core_objects))
        .with_state(agent);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "kubelet endpoint failed");
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let message = message.into();
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "code": status.as_u16(),
        "reason": status.canonical_reason().unwrap_or("Error").replace(' ', ""),
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn pods(State(agent): State<Arc<Agent>>) -> Response {
    let items: Vec<_> = agent.pods().iter().map(|r| r.to_pod()).collect();
    let list =
        serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items});
    (
        [(header::CONTENT_TYPE, "application/json")],
        list.to_string(),
    )
        .into_response()
}

async fn gateway_objects(State(agent): State<Arc<Agent>>, Path(kind): Path<String>) -> Response {
    let view = agent.ctx.gateway.view();
    let items = match kind.as_str() {
        "gatewayclasses" => ("GatewayClass", serde_json::to_value(&view.classes)),
        "gateways" => ("Gateway", serde_json::to_value(&view.gateways)),
        "httproutes" => ("HTTPRoute", serde_json::to_value(&view.routes)),
        other => return not_found(other),
    };
    list_response("gateway.networking.k8s.io/v1", items)
}

/// Services and their local Endpoints, as the data plane sees them.
async fn core_objects(State(agent): State<Arc<Agent>>, Path(kind): Path<String>) -> Response {
    let gateway = &agent.ctx.gateway;
    let items = match kind.as_str() {
        "services" => ("Service", serde_json::to_value(&gateway.view().services)),
        "endpoints" => ("Endpoints", serde_json::to_value(gateway.endpoints())),
        other => return not_found(other),
    };
    list_response("v1", items)
}

fn not_found(resource: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("the server could not find the requested resource {resource:?}"),
    )
}

/// A `<Kind>List` of `items`, each stamped with its apiVersion and kind, as the API
/// server returns lists.
fn list_response(
    api_version: &str,
    (item_kind, items): (&str, serde_json::Result<serde_json::Value>),
) -> Response {
    let mut items = match items {
        Ok(items) => items,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    for item in items.as_array_mut().into_iter().flatten() {
        if let Some(map) = item.as_object_mut() {
            map.insert("apiVersion".into(), api_version.into());
            map.insert("kind".into(), item_kind.into());
        }
    }
    let list = serde_json::json!({
        "kind": format!("{item_kind}List"), "apiVersion": api_version, "metadata": {},
        "items": items,
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        list.to_string(),
    )
        .into_response()
}

async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    let text = agent.ctx.metrics.render(agent.pod_count());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn manifest_errors(State(agent): State<Arc<Agent>>) -> Response {
    let body = serde_json::json!({"errors": agent.source_errors()});
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogParams {
    tail_lines: Option<String>,
    timestamps: Option<String>,
    follow: Option<String>,
}

fn flag(value: &Option<String>) -> Result<bool, String> {
    match value.as_deref() {
        None | Some("false") | Some("0") => Ok(false),
        Some("") | Some("true") | Some("1") => Ok(true),
        Some(other) => Err(format!("invalid boolean {other:?}")),
    }
}

async fn container_logs(
    State(agent): State<Arc<Agent>>,
    Path((namespace, pod, container)): Path<(String, String, String)>,
    Query(params): Query<LogParams>,
) -> Response {
    let (timestamps, follow) = match (flag(&params.timestamps), flag(&params.follow)) {
        (Ok(t), Ok(f)) => (t, f),
        (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, e),
    };
    let tail_lines = match params.tail_lines.as_deref().map(str::parse::<i64>) {
        None => None,
        Some(Ok(n)) if n >= 0 => Some(n as usize),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "tailLines must be a non-negative integer",
            );
        }
    };
    let key = format!("{namespace}/{pod}");
    let Some(record) = agent.pod(&key) else {
        return error(StatusCode::NOT_FOUND, format!("pod {key} not found"));
    };
    if !record.containers.iter().any(|c| c.name == container) {
        return error(
            StatusCode::NOT_FOUND,
            format!("container {container} is not in pod {key}"),
        );
    }
    let path = agent
        .ctx
        .pod_log_dir(&record.pod)
        .join(format!("{container}.log"));
    let max_files = agent.ctx.settings.log_max_files;
    let read_path = path.clone();
    let lines =
        match tokio::task::spawn_blocking(move || logs::read_all(&read_path, max_files)).await {
            Ok(Ok(lines)) => lines,
            Ok(Err(e)) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("reading logs: {e}"),
                );
            }
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("reading logs: {e}"),
                );
            }
        };
    let query = LogQuery {
        tail_lines,
        timestamps,
    };
    let first = logs::render(&lines, &query);
    if !follow {
        return ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], first).into_response();
    }
    // Follow: send what is appended to the current file until the container is done for
    // good (or the pod is gone), as `kubectl logs -f` does.
    let offset = tokio::fs::metadata(&path)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    let follower = Follower {
        first: Some(first),
        offset,
        path,
        agent,
        key,
        uid: record.pod.metadata.uid.clone(),
        container,
        timestamps,
    };
    let stream = futures::stream::unfold(follower, |mut f| async move {
        if let Some(first) = f.first.take() {
            return Some((Ok::<_, std::io::Error>(first), f));
        }
        loop {
            let running = f.agent.pod(&f.key).is_some_and(|r| {
                r.pod.metadata.uid == f.uid
                    && r.containers
                        .iter()
                        .any(|c| c.name == f.container && !c.finished)
            });
            let read_path = f.path.clone();
            let offset = f.offset;
            let read =
                tokio::task::spawn_blocking(move || logs::read_from(&read_path, offset)).await;
            if let Ok(Ok((lines, next))) = read {
                f.offset = next;
                if !lines.is_empty() {
                    let text: String = lines.iter().map(|l| l.render(f.timestamps)).collect();
                    return Some((Ok(text), f));
                }
            }
            if !running {
                return None;
            }
            tokio::time::sleep(f.agent.ctx.settings.log_follow_poll).await;
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// State of one `follow=true` log stream.
struct Follower {
    first: Option<String>,
    offset: u64,
    path: std::path::PathBuf,
    agent: Arc<Agent>,
    key: String,
    uid: Option<String>,
    container: String,
    timestamps: bool,
}
