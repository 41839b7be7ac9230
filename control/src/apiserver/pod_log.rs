//! `pods/log`: the API server asks the node running the pod, as kube-apiserver asks a
//! kubelet: at the node's `InternalIP` and the port its status gives
//! (`status.daemonEndpoints.kubeletEndpoint.Port`), path `/containerLogs/{ns}/{pod}/
//! {container}` with `tailLines`, `timestamps` and `follow` passed on, and the answer
//! streamed back (a `follow` stays open as long as the client and the node do).
//!
//! Owns that proxy only. The node's endpoint is plain HTTP for now (its HTTPS serving
//! certificate is still to come), so the link from member to node is not encrypted.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http::{Response, StatusCode};
use http_body_util::BodyExt as _;
use serde_json::Value;

use super::handler::Body;
use super::status::ApiError;

/// How long the API server waits for a node to answer a log request.
pub const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The container a log request names, or why it names none: one container is implied,
/// several need `container`, as kube-apiserver says.
pub fn container(pod: &Value, name: &str, asked: Option<&str>) -> Result<String, ApiError> {
    let containers: Vec<&str> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect();
    match asked {
        Some(c) if containers.contains(&c) => Ok(c.to_owned()),
        Some(c) => Err(ApiError::bad_request(format!(
            "container {c} is not valid for pod {name}"
        ))),
        None if containers.len() == 1 => Ok(containers[0].to_owned()),
        None => Err(ApiError::bad_request(format!(
            "a container name must be specified for pod {name}, choose one of: [{}]",
            containers.join(" ")
        ))),
    }
}

/// Where a node's kubelet endpoint is: its InternalIP and kubelet port.
pub fn kubelet_address(node: &Value) -> Option<String> {
    let ip = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)?
        .iter()
        .find(|a| a.get("type").and_then(Value::as_str) == Some("InternalIP"))?
        .get("address")?
        .as_str()?
        .to_owned();
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .unwrap_or(10250);
    Some(if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    })
}

/// Asks the node at `address` for `path_and_query` and streams its answer back.
pub async fn proxy(address: &str, path_and_query: &str) -> Result<Response<Body>, ApiError> {
    let unreachable = |e: &dyn std::fmt::Display| {
        ApiError::new(
            502,
            "InternalError",
            format!("the node's kubelet endpoint at {address} cannot be reached: {e}"),
        )
    };
    let stream = tokio::time::timeout(
        NODE_CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(address),
    )
    .await
    .map_err(|e| unreachable(&e))?
    .map_err(|e| unreachable(&e))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(&e))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = http::Request::get(path_and_query)
        .header("host", address)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| ApiError::internal(format!("a log request: {e}")))?;
    let answer = tokio::time::timeout(NODE_CONNECT_TIMEOUT, sender.send_request(request))
        .await
        .map_err(|e| unreachable(&e))?
        .map_err(|e| unreachable(&e))?;
    let status = answer.status();
    let content_type = answer.headers().get("content-type").cloned();
    // The body ends where the node's does, or where the link fails.
    let frames = http_body_util::BodyStream::new(answer.into_body())
        .take_while(|frame| std::future::ready(frame.is_ok()))
        .filter_map(|frame| std::future::ready(frame.ok().map(Ok::<_, Infallible>)));
    let body: Body = http_body_util::StreamBody::new(frames).boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = if status.is_success() {
        StatusCode::OK
    } else {
        status
    };
    if let Some(kind) = content_type {
        response.headers_mut().insert("content-type", kind);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_container_is_named_or_implied() {
        let one = json!({"spec": {"containers": [{"name": "web"}]}});
        assert_eq!(container(&one, "p", None).ok().as_deref(), Some("web"));
        assert!(container(&one, "p", Some("db")).is_err());
        let two = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        let err = container(&two, "p", None).err().map(|e| e.message);
        assert_eq!(
            err.as_deref(),
            Some("a container name must be specified for pod p, choose one of: [a b]")
        );
        assert_eq!(container(&two, "p", Some("b")).ok().as_deref(), Some("b"));
    }

    #[tokio::test]
    async fn a_node_that_does_not_answer_is_a_502_naming_it() {
        // A port nobody listens on: bind one, note it, let it go.
        let free = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr());
        let address = free.expect("a port").to_string();
        let Err(err) = proxy(&address, "/containerLogs/a/b/c").await else {
            panic!("a node nobody answers for was reached");
        };
        assert_eq!(err.code, 502);
        assert!(err.message.contains(&address), "{}", err.message);
    }

    #[test]
    fn a_node_is_reached_at_its_internal_ip_and_kubelet_port() {
        let node = json!({"status": {
            "addresses": [{"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "10.0.0.7"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10260}},
        }});
        assert_eq!(kubelet_address(&node).as_deref(), Some("10.0.0.7:10260"));
        let v6 = json!({"status": {"addresses": [{"type": "InternalIP", "address": "fd00::1"}]}});
        assert_eq!(kubelet_address(&v6).as_deref(), Some("[fd00::1]:10250"));
        assert_eq!(kubelet_address(&json!({})), None);
    }
}
