//! Outbound HTTP from guests (`wasi:http/outgoing-handler`): denied unless the pod's
//! allow-list (`brink.dev/allowed-outbound-hosts`) names the host. Allowed requests go out
//! through wasi-http's own client, from the agent: a sandboxed guest's request is relayed
//! to the agent ([`Outbound::Relay`]), which applies the allow-list itself.

use std::future::Future;
use std::sync::Arc;

use brink_proto::outbound::HostPattern;
use http_body_util::BodyExt as _;
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
use wasmtime_wasi_http::{RequestOptions, WasiBody, WasiHttpHooks};

/// The hosts a container's guests may call.
#[derive(Debug, Clone, Default)]
pub struct OutboundPolicy {
    allowed: Arc<Vec<HostPattern>>,
}

pub type SendFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                ),
                wasmtime_wasi_http::Error,
            >,
        > + Send,
>;

impl OutboundPolicy {
    pub fn new(allowed: Vec<HostPattern>) -> Self {
        Self {
            allowed: Arc::new(allowed),
        }
    }

    /// Whether a request to this URI may leave the node.
    pub fn allows(&self, uri: &http::Uri) -> bool {
        let Some(host) = uri.host() else { return false };
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        self.allowed.iter().any(|p| p.allows(host, port))
    }
}

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> SendFuture {
        if !self.allows(request.uri()) {
            tracing::info!(uri = %request.uri(), "outbound request denied: host not in the pod's allow-list");
            return Box::new(async { Err(ErrorCode::HttpRequestDenied.into()) });
        }
        Box::new(async move {
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((
                response.map(|b| b.boxed_unsync()),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

/// Sends a guest's outbound request somewhere else (a sandbox: to its agent).
pub trait OutboundRelay: Send + Sync + 'static {
    fn send(&self, request: http::Request<WasiBody>) -> SendFuture;
}

/// Where a guest's outbound requests go.
#[derive(Clone)]
pub enum Outbound {
    /// Checked against the allow-list and sent from this process.
    Direct(OutboundPolicy),
    /// Handed to the agent, which checks and sends it.
    Relay(Arc<dyn OutboundRelay>),
}

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> SendFuture {
        match self {
            Outbound::Direct(policy) => policy.send_request(request, options, fut),
            Outbound::Relay(relay) => relay.send(request),
        }
    }
}
