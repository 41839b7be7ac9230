//! The user-namespaced sandbox: one process per pod hosting all of that pod's guests, so
//! that a guest escaping wasmtime is root only inside its own namespaces and an
//! unprivileged uid on the host (KEP-127's `hostUsers: false`, for every pod by default).
//!
//! Owns: creating sandbox processes and reaping them ([`spawn`]), the jail they build
//! ([`jail`], [`seccomp`]), the framed link between agent and sandbox ([`link`],
//! [`bodies`]), the agent's view of one sandbox ([`conn`]), its cgroup limits
//! ([`cgroup`]), the sandbox-side host of the guests ([`guest`]) and the attack probe
//! ([`probe`]). [`PodSandbox`] restarts a pod's
//! sandbox when it dies; [`Service`] and [`Command`] are how the pod worker reaches
//! guests, sandboxed or (for benchmarks, by explicit node setting) in-process.
//!
//! Must not touch: pod lifecycle decisions (restart policy, back-off: [`crate::pod`]) or
//! compiling guests ([`crate::runtime`]; the agent compiles, sandboxes only map the result).

mod bodies;
pub mod cgroup;
pub mod conn;
pub mod guest;
mod jail;
pub mod link;
mod probe;
mod seccomp;
pub mod spares;
pub mod spawn;

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use brink_proto::sandbox::{HttpHead, Start};
use bytes::Bytes;
use http::StatusCode;
use hyper::{Request, Response};

pub use cgroup::{CgroupLimits, Cgroups};
pub use conn::{CgroupPlan, Sandbox, SandboxEnd, SandboxError, SandboxEvents, SandboxPlan};
pub use guest::sandbox_main;
pub use spares::Spares;
pub use spawn::{SANDBOX_SUBCOMMAND, user_namespaces_available};

use crate::runtime::{CommandApp, ExitStatus, HttpApp, HttpBody, text_response};

/// A response header a sandbox adds when the guest failed the request (`deadline` or
/// `error`), so the agent's metrics count it; the agent removes it before answering.
pub const OUTCOME_HEADER: &str = "x-brink-sandbox-outcome";

/// A pod's sandbox, started again whenever it has died and someone needs it.
pub struct PodSandbox {
    plan: SandboxPlan,
    start: Start,
    events: Arc<dyn SandboxEvents>,
    start_timeout: Duration,
    request_deadline: Duration,
    metrics: Arc<crate::metrics::Metrics>,
    current: RwLock<Option<Arc<Sandbox>>>,
    launching: tokio::sync::Mutex<()>,
}

impl PodSandbox {
    pub fn new(
        plan: SandboxPlan,
        start: Start,
        events: Arc<dyn SandboxEvents>,
        start_timeout: Duration,
        request_deadline: Duration,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            plan,
            start,
            events,
            start_timeout,
            request_deadline,
            metrics,
            current: RwLock::new(None),
            launching: tokio::sync::Mutex::new(()),
        })
    }

    /// The live sandbox, if there is one.
    pub fn current(&self) -> Option<Arc<Sandbox>> {
        self.current
            .read()
            .ok()
            .and_then(|c| c.clone())
            .filter(|s| s.is_alive())
    }

    /// The live sandbox, starting a new one if there is none. Returns the service
    /// containers' names along with it.
    pub async fn ensure(&self) -> Result<(Arc<Sandbox>, Vec<String>), String> {
        let _launching = self.launching.lock().await;
        if let Some(current) = self.current() {
            return Ok((current, Vec::new()));
        }
        let started = std::time::Instant::now();
        let sandbox = Sandbox::launch(&self.plan, self.events.clone())
            .await
            .map_err(|e| e.to_string())?;
        match sandbox.start(self.start.clone(), self.start_timeout).await {
            Ok(services) => {
                let start_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                tracing::info!(pid = sandbox.pid, start_us, "sandbox ready");
                if let Ok(mut current) = self.current.write() {
                    *current = Some(sandbox.clone());
                }
                Ok((sandbox, services))
            }
            Err(e) => {
                sandbox.kill();
                let _ = sandbox.ended().await;
                Err(e)
            }
        }
    }

    /// Stops the live sandbox within `grace` (then kills it) and waits until it is reaped.
    pub async fn stop(&self, grace: Duration) {
        let _launching = self.launching.lock().await;
        let current = self.current.write().ok().and_then(|mut c| c.take());
        if let Some(sandbox) = current {
            sandbox.stop(grace).await;
        }
    }
}

/// A service container, wherever it runs.
#[derive(Clone)]
pub enum Service {
    InProcess(Arc<HttpApp>),
    Sandboxed(Arc<SandboxService>),
}

/// A service container in a sandbox.
pub struct SandboxService {
    pub pod: Arc<PodSandbox>,
    pub container: String,
    gate: crate::in_flight::Gate,
}

impl SandboxService {
    pub fn new(pod: Arc<PodSandbox>, container: String) -> Arc<Self> {
        Arc::new(Self {
            pod,
            container,
            gate: crate::in_flight::Gate::default(),
        })
    }

    /// Serves one request, or hands it back untouched when the container is stopping or
    /// its sandbox is not running (being restarted), so a proxy can try another endpoint.
    async fn try_handle<B>(&self, request: Request<B>) -> Result<Response<HttpBody>, Request<B>>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Send,
    {
        let Some(in_flight) = self.gate.enter() else {
            return Err(request);
        };
        let Some(sandbox) = self.pod.current() else {
            return Err(request);
        };
        let response = self.serve(&sandbox, request).await;
        drop(in_flight);
        Ok(response)
    }

    async fn serve<B>(&self, sandbox: &Arc<Sandbox>, request: Request<B>) -> Response<HttpBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Send,
    {
        let metrics = &self.pod.metrics;
        let id = metrics.http_requests.fetch_add(1, Ordering::Relaxed) + 1;
        let span =
            tracing::debug_span!("request", id, container = %self.container, sandbox = sandbox.pid);
        tracing::Instrument::instrument(async {
            let (head, body) = match sandbox.request(&self.container, request).await {
                Ok(pair) => pair,
                Err(e) => return text_response(StatusCode::BAD_GATEWAY, format!("{e}\n")),
            };
            // The sandbox enforces the guest's deadline; this one only covers a sandbox
            // that stopped answering.
            let wait = self.pod.request_deadline + Duration::from_secs(1);
            let head: HttpHead = tokio::select! {
                head = head => match head {
                    Ok(head) => head,
                    Err(_) => {
                        let end = sandbox.ended().await;
                        return text_response(StatusCode::BAD_GATEWAY, format!("{}\n", end.describe()));
                    }
                },
                () = tokio::time::sleep(wait) => {
                    return text_response(StatusCode::GATEWAY_TIMEOUT, "the sandbox did not answer in time\n");
                }
            };
            let mut response = Response::new(body);
            *response.status_mut() =
                StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
            match bodies::header_map(&head) {
                Ok(headers) => *response.headers_mut() = headers,
                Err(e) => return text_response(StatusCode::BAD_GATEWAY, format!("{e}\n")),
            }
            match response.headers_mut().remove(OUTCOME_HEADER) {
                Some(v) if v == "deadline" => crate::metrics::Metrics::inc(&metrics.http_deadline_exceeded),
                Some(_) => crate::metrics::Metrics::inc(&metrics.http_guest_errors),
                None => {}
            }
            response
        }, span)
        .await
    }
}

impl Service {
    /// Serves one request. Never fails: problems become 5xx responses.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<HttpBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error> + Send,
    {
        match self.try_handle(request).await {
            Ok(response) => response,
            Err(_) => text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "the container is stopping or its sandbox is not running\n",
            ),
        }
    }

    /// Serves one request, or hands it back untouched (nothing of it was sent) when the
    /// container is stopping or its sandbox is being restarted: a proxy then tries
    /// another endpoint, which is safe whatever the method.
    pub async fn try_handle<B>(&self, request: Request<B>) -> Result<Response<HttpBody>, Request<B>>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error> + Send,
    {
        match self {
            Service::InProcess(app) => app.try_handle(request).await,
            Service::Sandboxed(service) => service.try_handle(request).await,
        }
    }

    /// Takes no new requests: called once the container left the gateway's endpoints,
    /// before its graceful stop waits for the requests in flight.
    pub fn close(&self) {
        match self {
            Service::InProcess(app) => app.close(),
            Service::Sandboxed(service) => service.gate.close(),
        }
    }

    /// Requests being answered now (a graceful stop waits for this to reach zero).
    pub fn in_flight(&self) -> u64 {
        match self {
            Service::InProcess(app) => app.in_flight(),
            Service::Sandboxed(service) => service.gate.in_flight(),
        }
    }

    /// Resolves when the sandbox serving this container ends; never for in-process ones.
    pub async fn sandbox_ended(&self) -> Arc<SandboxEnd> {
        match self {
            Service::InProcess(_) => std::future::pending().await,
            Service::Sandboxed(service) => match service.pod.current() {
                Some(sandbox) => sandbox.ended().await,
                None => std::future::pending().await,
            },
        }
    }
}

/// A command container, wherever it runs.
#[derive(Clone)]
pub enum Command {
    InProcess(CommandApp),
    Sandboxed {
        pod: Arc<PodSandbox>,
        container: String,
    },
}

impl Command {
    /// Runs the command once. Cancel-safe.
    pub async fn run(&self) -> ExitStatus {
        match self {
            Command::InProcess(app) => app.run().await,
            Command::Sandboxed { pod, container } => {
                let sandbox = match pod.ensure().await {
                    Ok((sandbox, _)) => sandbox,
                    Err(message) => {
                        return ExitStatus {
                            code: 128,
                            reason: "StartError".into(),
                            message: Some(message),
                        };
                    }
                };
                match sandbox.run(container).await {
                    Ok(exited) => ExitStatus {
                        code: exited.code,
                        reason: exited.reason,
                        message: exited.message,
                    },
                    Err(end) => ExitStatus {
                        code: end.exit_code(),
                        reason: end.reason().into(),
                        message: Some(end.describe()),
                    },
                }
            }
        }
    }
}
