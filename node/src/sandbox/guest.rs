//! Sandbox side: the process a pod's guests live in. `brink sandbox-init` lands here with
//! its end of the socket pair on fd 3: it receives its set-up, builds the jail, installs
//! seccomp and then serves the agent's requests with the pod's precompiled artifacts,
//! sending output, exits and outbound calls back over the link.
//!
//! If the agent goes away (the link closes) the sandbox exits at once: it never outlives
//! the agent that started it.

use std::collections::HashMap;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brink_proto::sandbox::{
    Chunk, ContainerSpec, Exited, HttpHead, LogStream, Message, SandboxMode, Start,
};
use tokio::sync::{mpsc, oneshot};

use super::bodies::{self, ChunkSender};
use super::link::{BlockingLink, LinkError, LinkSender, spawn_link};
use super::spawn::SANDBOX_SOCKET_FD;
use super::{jail, probe, seccomp};
use crate::logs::{GuestOutput, Stream};
use crate::runtime::{
    App, GuestContext, GuestFailure, Outbound, OutboundRelay, Runtime, SendFuture,
};

/// Threads in a sandbox's blocking pool (guest file I/O).
const SANDBOX_BLOCKING_THREADS: usize = 8;

/// Exit codes of a sandbox that could not start.
const EXIT_NO_SETUP: i32 = 2;
const EXIT_JAIL: i32 = 3;
const EXIT_RUNTIME: i32 = 4;

/// Entry point of `brink sandbox-init`. Must run before anything starts a thread.
pub fn sandbox_main() -> i32 {
    // SAFETY: the agent placed our end of the socket pair on this descriptor before exec.
    let stream = unsafe { UnixStream::from_raw_fd(SANDBOX_SOCKET_FD) };
    let mut link = BlockingLink::new(stream);
    let setup = match link.recv() {
        Ok(Message::Setup(setup)) => setup,
        Ok(other) => {
            let _ = link.send(&fatal(format!("expected the set-up, got {other:?}")));
            return EXIT_NO_SETUP;
        }
        Err(_) => return EXIT_NO_SETUP,
    };
    if let Err(e) = jail::build(&setup, &mut link) {
        let _ = link.send(&fatal(format!("building the sandbox: {e}")));
        return EXIT_JAIL;
    }
    let (stream, decoder) = link.into_parts();
    // Before seccomp: switching the socket to non-blocking is an ioctl we need only once.
    if let Err(e) = stream.set_nonblocking(true) {
        let mut link = BlockingLink::new(stream);
        let _ = link.send(&fatal(format!("socket: {e}")));
        return EXIT_JAIL;
    }
    if let Err(e) = seccomp::install() {
        let mut link = BlockingLink::new(stream);
        let _ = link.send(&fatal(e.to_string()));
        return EXIT_JAIL;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(SANDBOX_BLOCKING_THREADS)
        .build();
    let Ok(runtime) = runtime else {
        return EXIT_RUNTIME;
    };
    runtime.block_on(async move {
        let (sender, messages) = match spawn_link(stream, decoder) {
            Ok(link) => link,
            Err(_) => return EXIT_RUNTIME,
        };
        let code = match setup.mode {
            SandboxMode::Pod => serve(sender.clone(), messages).await,
            SandboxMode::Probe { attack, args } => probe::run(&attack, &args, sender.clone()).await,
        };
        // Whatever was said last (a fatal error, say) reaches the agent before the exit.
        sender.flush().await;
        code
    })
}

fn fatal(message: String) -> Message {
    Message::Fatal { message }
}

/// Output of one container, sent to the agent (which stamps and stores it).
struct RelayOutput {
    container: String,
    link: LinkSender,
}

impl GuestOutput for RelayOutput {
    fn write(&self, stream: Stream, bytes: &[u8]) {
        let stream = match stream {
            Stream::Stdout => LogStream::Stdout,
            Stream::Stderr => LogStream::Stderr,
        };
        for piece in bytes.chunks(brink_proto::sandbox::MAX_CHUNK_BYTES) {
            // Output beyond what the link can queue is dropped rather than blocking a guest.
            let _ = self.link.try_send(&Message::Log {
                container: self.container.clone(),
                stream,
                bytes: piece.to_vec(),
            });
        }
    }

    fn flush_partial(&self) {}
}

/// Open streams of this sandbox, by id.
#[derive(Default)]
struct Streams {
    /// Inbound request bodies being received.
    requests: Mutex<HashMap<u64, ChunkSender>>,
    /// Outbound calls waiting for their response head.
    outbound_heads: Mutex<HashMap<u64, oneshot::Sender<Result<HttpHead, String>>>>,
    /// Outbound response bodies being received.
    outbound_bodies: Mutex<HashMap<u64, ChunkSender>>,
    next_outbound: AtomicU64,
    in_flight: AtomicU64,
}

/// Guests' outbound calls, relayed to the agent.
struct Relay {
    container: String,
    link: LinkSender,
    streams: Arc<Streams>,
}

fn relay_error(message: &str) -> wasmtime_wasi_http::Error {
    use wasmtime_wasi_http::Error as E;
    match message {
        "denied" => E::HttpRequestDenied,
        "connection-refused" => E::ConnectionRefused,
        "timeout" => E::ConnectionTimeout,
        "dns" => E::DnsError {
            rcode: None,
            info_code: None,
        },
        "invalid-uri" => E::HttpRequestUriInvalid,
        other => E::InternalError(Some(other.to_string())),
    }
}

impl OutboundRelay for Relay {
    fn send(&self, request: http::Request<wasmtime_wasi_http::WasiBody>) -> SendFuture {
        let id = self.streams.next_outbound.fetch_add(1, Ordering::Relaxed) + 1;
        let (link, streams, container) = (
            self.link.clone(),
            self.streams.clone(),
            self.container.clone(),
        );
        Box::new(async move {
            let (head_tx, head_rx) = oneshot::channel();
            if let Ok(mut heads) = streams.outbound_heads.lock() {
                heads.insert(id, head_tx);
            }
            // The body channel exists before the head is sent: chunks may follow the head
            // before this task has looked at it.
            let (sender, response_body) = bodies::channel_body();
            if let Ok(mut open) = streams.outbound_bodies.lock() {
                open.insert(id, sender);
            }
            let (parts, body) = request.into_parts();
            let head = bodies::request_head(id, &parts);
            link.send(&Message::OutboundHead { container, head })
                .await
                .map_err(|e| relay_error(&e.to_string()))?;
            let pump_link = link.clone();
            tokio::spawn(async move {
                bodies::pump_body(id, body, &pump_link, Message::OutboundBody).await;
            });
            let head = head_rx
                .await
                .map_err(|_| relay_error("the agent dropped the request"))?
                .map_err(|e| relay_error(&e))?;
            let mut response = http::Response::new(response_body);
            *response.status_mut() = http::StatusCode::from_u16(head.status)
                .map_err(|_| relay_error("invalid status from the agent"))?;
            *response.headers_mut() = bodies::header_map(&head).map_err(|e| relay_error(&e))?;
            let io: Box<
                dyn std::future::Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send,
            > = Box::new(async { Ok(()) });
            Ok((response, io))
        })
    }
}

/// Serves the agent until it says stop or goes away.
async fn serve(link: LinkSender, mut messages: mpsc::Receiver<Result<Message, LinkError>>) -> i32 {
    let streams = Arc::new(Streams::default());
    let mut apps: HashMap<String, App> = HashMap::new();
    while let Some(message) = messages.recv().await {
        let message = match message {
            Ok(m) => m,
            // The agent is gone or garbled: nothing left to serve.
            Err(_) => return 0,
        };
        match message {
            Message::Start(start) => match prepare(&start, &link, &streams) {
                Ok(prepared) => {
                    apps = prepared;
                    let services = apps
                        .iter()
                        .filter(|(_, app)| matches!(app, App::Http(_)))
                        .map(|(name, _)| name.clone())
                        .collect();
                    let _ = link.send(&Message::Ready { services }).await;
                }
                Err(message) => {
                    let _ = link.send(&fatal(message)).await;
                    return EXIT_RUNTIME;
                }
            },
            Message::RequestHead { container, head } => {
                let Some(App::Http(app)) = apps.get(&container).cloned() else {
                    let _ = link
                        .send(&fatal(format!("no service container {container:?}")))
                        .await;
                    return EXIT_RUNTIME;
                };
                let (sender, body) = bodies::channel_body();
                if let Ok(mut open) = streams.requests.lock() {
                    open.insert(head.id, sender);
                }
                let (link, streams) = (link.clone(), streams.clone());
                streams.in_flight.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let id = head.id;
                    let (response, failure) = match build_request(&head, body) {
                        Ok(request) => app.handle_with_outcome(request).await,
                        Err(e) => (
                            crate::runtime::text_response(http::StatusCode::BAD_REQUEST, e),
                            None,
                        ),
                    };
                    let (mut parts, body) = response.into_parts();
                    if let Some(failure) = failure {
                        parts.headers.insert(
                            super::OUTCOME_HEADER,
                            http::HeaderValue::from_static(match failure {
                                GuestFailure::Deadline => "deadline",
                                GuestFailure::Error => "error",
                            }),
                        );
                    }
                    let head = bodies::response_head(id, &parts);
                    if link.send(&Message::ResponseHead(head)).await.is_ok() {
                        bodies::pump_body(id, body, &link, Message::ResponseBody).await;
                    }
                    if let Ok(mut open) = streams.requests.lock() {
                        open.remove(&id);
                    }
                    streams.in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Message::RequestBody(chunk) => route(&streams.requests, chunk).await,
            Message::OutboundResponseBody(chunk) => route(&streams.outbound_bodies, chunk).await,
            Message::OutboundResponseHead(head) => {
                let waiter = streams
                    .outbound_heads
                    .lock()
                    .ok()
                    .and_then(|mut h| h.remove(&head.id));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Ok(head));
                }
            }
            Message::OutboundError { id, message } => {
                let waiter = streams
                    .outbound_heads
                    .lock()
                    .ok()
                    .and_then(|mut h| h.remove(&id));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Err(message));
                }
            }
            Message::Run { container } => {
                let Some(App::Command(app)) = apps.get(&container).cloned() else {
                    let _ = link
                        .send(&fatal(format!("no command container {container:?}")))
                        .await;
                    return EXIT_RUNTIME;
                };
                let link = link.clone();
                tokio::spawn(async move {
                    let status = app.run().await;
                    let _ = link
                        .send(&Message::Exited(Exited {
                            container,
                            code: status.code,
                            reason: status.reason,
                            message: status.message,
                        }))
                        .await;
                });
            }
            Message::Stop { grace_ms } => {
                // Requests in flight still need their body chunks: keep serving the link
                // while they finish, and leave when they have or the grace period is over.
                let (streams, link) = (streams.clone(), link.clone());
                tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now() + Duration::from_millis(grace_ms);
                    while streams.in_flight.load(Ordering::Relaxed) > 0
                        && tokio::time::Instant::now() < deadline
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    // The last response's final chunks may still be queued.
                    link.flush().await;
                    std::process::exit(0);
                });
            }
            other => {
                let _ = link
                    .send(&fatal(format!("unexpected message {other:?}")))
                    .await;
                return EXIT_RUNTIME;
            }
        }
    }
    0
}

async fn route(open: &Mutex<HashMap<u64, ChunkSender>>, chunk: Chunk) {
    let id = chunk.id;
    let sender = open.lock().ok().and_then(|o| o.get(&id).cloned());
    if let Some(sender) = sender
        && !bodies::feed(&sender, chunk).await
        && let Ok(mut open) = open.lock()
    {
        open.remove(&id);
    }
}

fn build_request(
    head: &HttpHead,
    body: wasmtime_wasi_http::p2::body::HyperOutgoingBody,
) -> Result<http::Request<wasmtime_wasi_http::p2::body::HyperOutgoingBody>, String> {
    let mut request = http::Request::new(body);
    *request.method_mut() = http::Method::from_bytes(head.method.as_bytes())
        .map_err(|_| format!("invalid method {:?}", head.method))?;
    *request.uri_mut() = head
        .uri
        .parse()
        .map_err(|_| format!("invalid URI {:?}", head.uri))?;
    *request.headers_mut() = bodies::header_map(head)?;
    Ok(request)
}

/// Loads every container's compiled artifact and prepares it.
fn prepare(
    start: &Start,
    link: &LinkSender,
    streams: &Arc<Streams>,
) -> Result<HashMap<String, App>, String> {
    let runtime = Runtime::for_sandbox(&start.engine).map_err(|e| e.to_string())?;
    let mut apps = HashMap::new();
    for spec in &start.containers {
        let app = prepare_one(&runtime, spec, &start.pod, link, streams)
            .map_err(|e| format!("container {}: {e}", spec.name))?;
        apps.insert(spec.name.clone(), app);
    }
    Ok(apps)
}

fn prepare_one(
    runtime: &Arc<Runtime>,
    spec: &ContainerSpec,
    pod: &str,
    link: &LinkSender,
    streams: &Arc<Streams>,
) -> Result<App, String> {
    let loaded = runtime
        .load_precompiled(std::path::Path::new(&spec.artifact))
        .map_err(|e| e.to_string())?;
    let ctx = GuestContext {
        args: spec.args.clone(),
        env: spec.env.clone(),
        memory_limit: spec.memory_limit,
        log: Arc::new(RelayOutput {
            container: spec.name.clone(),
            link: link.clone(),
        }),
        outbound: Outbound::Relay(Arc::new(Relay {
            container: spec.name.clone(),
            link: link.clone(),
            streams: streams.clone(),
        })),
        name: format!("{pod}/{}", spec.name),
        preopens: spec
            .preopens
            .iter()
            .map(|p| crate::runtime::Preopen {
                dir: p.dir.clone().into(),
                guest: p.guest.clone(),
                read_only: p.read_only,
            })
            .collect(),
    };
    runtime.prepare(&loaded, ctx).map_err(|e| e.to_string())
}
