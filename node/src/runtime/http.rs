//! wasi:http services: every request gets a fresh instance from the component's
//! pre-instantiated form (as `wasmtime serve` does), its own store with the container's
//! memory cap, and an epoch deadline that turns a runaway guest into a 504.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use tracing::Instrument as _;
use wasmtime::Store;
use wasmtime::component::ResourceTable;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpView};

use super::{GuestContext, HostState, Runtime};
use crate::metrics::Metrics;

/// The response body type of every guest response and every error the node makes.
pub type HttpBody = wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// How a guest failed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestFailure {
    /// It ran past its CPU deadline (504).
    Deadline,
    /// It trapped, or answered nothing (500).
    Error,
}

/// A wasi:http component ready to serve.
pub struct HttpApp {
    runtime: Arc<Runtime>,
    pre: ProxyPre<HostState>,
    ctx: GuestContext,
    gate: crate::in_flight::Gate,
}

/// A plain-text response made by the node itself.
pub fn text_response(status: StatusCode, text: impl Into<String>) -> Response<HttpBody> {
    let body = Full::new(Bytes::from(text.into()))
        .map_err(|never: Infallible| match never {})
        .boxed_unsync();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

impl HttpApp {
    pub(super) fn new(runtime: Arc<Runtime>, pre: ProxyPre<HostState>, ctx: GuestContext) -> Self {
        Self {
            runtime,
            pre,
            ctx,
            gate: crate::in_flight::Gate::default(),
        }
    }

    /// Requests being served now (a graceful stop waits for this to reach zero).
    pub fn in_flight(&self) -> u64 {
        self.gate.in_flight()
    }

    /// Takes no new requests (the container is stopping); those in flight finish.
    pub fn close(&self) {
        self.gate.close();
    }

    /// Serves one request, or hands it back untouched when the container is stopping.
    pub async fn try_handle<B>(&self, request: Request<B>) -> Result<Response<HttpBody>, Request<B>>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let Some(in_flight) = self.gate.enter() else {
            return Err(request);
        };
        let response = self.serve(request).await.0;
        drop(in_flight);
        Ok(response)
    }

    /// Serves one request. Never fails: guest traps become 500, the CPU deadline 504.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<HttpBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        self.handle_with_outcome(request).await.0
    }

    /// As [`HttpApp::handle`], also saying whether the guest failed (for a sandbox to
    /// report to its agent's metrics).
    pub async fn handle_with_outcome<B>(
        &self,
        request: Request<B>,
    ) -> (Response<HttpBody>, Option<GuestFailure>)
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let Some(_in_flight) = self.gate.enter() else {
            return (
                text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the container is stopping\n",
                ),
                None,
            );
        };
        self.serve(request).await
    }

    /// Serves a request already counted in.
    async fn serve<B>(&self, request: Request<B>) -> (Response<HttpBody>, Option<GuestFailure>)
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let metrics = &self.runtime.metrics;
        // The node-wide request count doubles as the request id in traces.
        let id = metrics.http_requests.fetch_add(1, Ordering::Relaxed) + 1;
        let span = tracing::debug_span!("request", id, container = %self.ctx.name);
        let response = self.handle_inner(request).instrument(span).await;
        match response {
            Ok(response) => (response, None),
            Err((status, message)) => {
                let failure = if status == StatusCode::GATEWAY_TIMEOUT {
                    Metrics::inc(&metrics.http_deadline_exceeded);
                    GuestFailure::Deadline
                } else {
                    Metrics::inc(&metrics.http_guest_errors);
                    GuestFailure::Error
                };
                self.ctx.log.note(&format!("request failed: {message}"));
                tracing::debug!(container = %self.ctx.name, %status, %message, "guest request failed");
                (text_response(status, format!("{message}\n")), Some(failure))
            }
        }
    }

    async fn handle_inner<B>(
        &self,
        request: Request<B>,
    ) -> Result<Response<HttpBody>, (StatusCode, String)>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let internal = |e: wasmtime::Error| (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"));
        let mut wasi = self.ctx.wasi().map_err(internal)?;
        let mut store = Store::new(
            self.runtime.engine(),
            HostState {
                wasi: wasi.build(),
                http: WasiHttpCtx::new(),
                table: ResourceTable::new(),
                limits: self.runtime.limits(self.ctx.memory_limit),
                outbound: self.ctx.outbound.clone(),
            },
        );
        store.limiter(|s| &mut s.limits);
        let settings = self.runtime.settings();
        let ticks =
            (settings.request_deadline.as_millis() / settings.epoch_tick.as_millis().max(1)).max(1);
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
        store.epoch_deadline_trap();

        let (sender, receiver) = tokio::sync::oneshot::channel();
        let incoming = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, request)
            .map_err(internal)?;
        let outparam = store
            .data_mut()
            .http()
            .new_response_outparam(sender)
            .map_err(internal)?;
        let pre = self.pre.clone();
        // The guest runs in its own task so it may keep streaming the body after it has
        // handed back the response head.
        let task = tokio::spawn(async move {
            let proxy = pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, incoming, outparam)
                .await
        });
        let deadline = settings.request_deadline + settings.epoch_tick * 2;
        match tokio::time::timeout(deadline, receiver).await {
            Ok(Ok(Ok(response))) => Ok(response),
            Ok(Ok(Err(code))) => Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("guest error: {code:?}"),
            )),
            Ok(Err(_)) => {
                // The guest dropped the response without setting it: look at why.
                let error = match task.await {
                    Ok(Ok(())) => {
                        return Err((
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "guest sent no response".into(),
                        ));
                    }
                    Ok(Err(e)) => e,
                    Err(e) => {
                        return Err((
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("guest task failed: {e}"),
                        ));
                    }
                };
                if matches!(
                    error.downcast_ref::<wasmtime::Trap>(),
                    Some(wasmtime::Trap::Interrupt)
                ) {
                    Err((
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "guest exceeded its {:?} deadline",
                            settings.request_deadline
                        ),
                    ))
                } else {
                    Err((
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("guest trapped: {error:#}"),
                    ))
                }
            }
            Err(_) => {
                task.abort();
                Err((
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "guest exceeded its {:?} deadline",
                        settings.request_deadline
                    ),
                ))
            }
        }
    }
}
