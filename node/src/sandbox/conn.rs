//! Agent side of a sandbox: launching one ([`Sandbox::launch`]), writing its ID maps when
//! it asks, dispatching what it sends (responses, output, exits, outbound calls), and
//! noticing when it ends. A garbled frame or an unexpected message closes that sandbox
//! (it is killed and reaped); it never reaches the rest of the agent.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brink_proto::sandbox::{
    DirBind, Exited, FrameDecoder, HttpHead, LogStream, Message, SandboxMode, Setup, Start,
};
use tokio::sync::{oneshot, watch};

use super::bodies::{self, ChunkSender};
use super::cgroup::{CgroupError, CgroupLimits, Cgroups, PodCgroup};
use super::link::{LinkError, LinkSender, spawn_link};
use super::spares::{Spare, Spares};
use super::spawn::{ProcessEnd, SandboxProcess, signal_name, spawn};
use crate::idranges::IdRange;
use crate::logs::Stream;
use crate::runtime::OutboundPolicy;

/// Everything needed to start a pod's sandbox (again).
#[derive(Debug, Clone)]
pub struct SandboxPlan {
    /// `namespace/name`, for logs.
    pub name: String,
    /// An empty host directory the sandbox mounts its root on.
    pub root: PathBuf,
    /// The pod's host IDs; `None` runs it in the host's user namespace (`hostUsers: true`).
    pub ids: Option<IdRange>,
    /// Host files bind-mounted read-only: (host path, path inside).
    pub files: Vec<(PathBuf, String)>,
    /// Host directories bound in: (host path, path inside, read-only).
    pub dirs: Vec<(PathBuf, String, bool)>,
    pub hostname: String,
    pub max_threads: u64,
    pub max_data_bytes: u64,
    pub mode: SandboxMode,
    /// The cgroup the sandbox runs in, where the node has cgroups.
    pub cgroup: Option<CgroupPlan>,
    /// Where to take a process started ahead of need, if the node keeps spares.
    pub spares: Option<Arc<Spares>>,
}

/// Which cgroup a sandbox gets, and its limits.
#[derive(Debug, Clone)]
pub struct CgroupPlan {
    pub cgroups: Arc<Cgroups>,
    /// `pod-<name>` is the cgroup's directory name.
    pub name: String,
    pub limits: CgroupLimits,
}

/// What a sandbox's pod wants done with its output and outbound calls.
pub trait SandboxEvents: Send + Sync + 'static {
    fn output(&self, container: &str, stream: Stream, bytes: &[u8]);
    /// The allow-list of a container; `None` for a container the pod does not have.
    fn outbound_policy(&self, container: &str) -> Option<OutboundPolicy>;
    /// An exit nobody was waiting for (a probe's report).
    fn unclaimed_exit(&self, _exited: Exited) {}
}

/// Why a sandbox could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("starting the sandbox process: {0}")]
    Spawn(std::io::Error),
    #[error("{0}")]
    Start(String),
}

/// How a sandbox ended.
#[derive(Debug, Clone)]
pub struct SandboxEnd {
    pub process: Option<ProcessEnd>,
    /// What the sandbox said before it died, if anything.
    pub fatal: Option<String>,
    /// Why the agent closed the link, if it did.
    pub link: Option<String>,
    /// Whether the kernel's OOM killer ended it (its cgroup's memory limit).
    pub oom_killed: bool,
}

impl SandboxEnd {
    /// The exit code a container of this sandbox reports (128 + signal for a kill).
    pub fn exit_code(&self) -> i32 {
        match self.process {
            Some(ProcessEnd::Exited(code)) if code != 0 => code,
            Some(ProcessEnd::Signaled(signal)) => 128 + signal,
            _ => 1,
        }
    }

    /// The container's reason, as a kubelet words it.
    pub fn reason(&self) -> &'static str {
        if self.oom_killed {
            "OOMKilled"
        } else {
            "Error"
        }
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.oom_killed {
            parts.push("out of memory: killed at its cgroup's memory limit".to_string());
        }
        if let Some(end) = self.process {
            parts.push(format!("sandbox {end}"));
        }
        if let Some(fatal) = &self.fatal {
            parts.push(fatal.clone());
        }
        if let Some(link) = &self.link {
            parts.push(format!("link closed: {link}"));
        }
        if parts.is_empty() {
            "sandbox ended".into()
        } else {
            parts.join("; ")
        }
    }

    /// Whether a seccomp kill ended it.
    pub fn seccomp_killed(&self) -> bool {
        self.process == Some(ProcessEnd::Signaled(libc::SIGSYS))
    }
}

type HeadWaiter = oneshot::Sender<HttpHead>;

#[derive(Default)]
struct Shared {
    heads: Mutex<HashMap<u64, HeadWaiter>>,
    bodies: Mutex<HashMap<u64, ChunkSender>>,
    exits: Mutex<HashMap<String, oneshot::Sender<Exited>>>,
    outbound_bodies: Mutex<HashMap<u64, ChunkSender>>,
    ready: Mutex<Option<oneshot::Sender<Vec<String>>>>,
    /// Set once the ID maps are written: until then the sandbox reads nothing but the
    /// answer to its request for them, so nothing else may be sent.
    mapped: tokio::sync::Notify,
    needs_maps: std::sync::atomic::AtomicBool,
    fatal: Mutex<Option<String>>,
    next_stream: AtomicU64,
}

/// One live sandbox process.
pub struct Sandbox {
    pub pid: i32,
    link: LinkSender,
    shared: Arc<Shared>,
    process: Arc<SandboxProcess>,
    ended: watch::Receiver<Option<Arc<SandboxEnd>>>,
}

impl Sandbox {
    /// Starts a sandbox process and sends its set-up; the jail is built from here on
    /// without the caller (the ID maps are written when the sandbox asks).
    pub async fn launch(
        plan: &SandboxPlan,
        events: Arc<dyn SandboxEvents>,
    ) -> Result<Arc<Self>, SandboxError> {
        tokio::fs::create_dir_all(&plan.root)
            .await
            .map_err(|e| SandboxError::Start(format!("create {}: {e}", plan.root.display())))?;
        // A spare skips the exec and, with cgroups, the move into one (milliseconds on a
        // v1 host, where the kernel waits out an RCU grace period): its cgroup is only
        // renamed and given the pod's limits.
        let spare = plan.spares.as_ref().and_then(|s| s.take());
        let (process, spare_cgroup) = match spare {
            Some(Spare { process, cgroup }) if cgroup.is_some() == plan.cgroup.is_some() => {
                (process, cgroup)
            }
            other => {
                if let Some(unfit) = other {
                    unfit.process.kill();
                }
                (spawn().await.map_err(SandboxError::Spawn)?, None)
            }
        };
        // Without a spare, the move into the cgroup runs while the sandbox execs and
        // builds its jail. Either way it is finished before the ID maps are written, which
        // the sandbox waits for before it runs anything of the pod's.
        let mut cgroup = match (&plan.cgroup, spare_cgroup) {
            (None, _) => CgroupState::None,
            (Some(cg), Some(mut spare)) => {
                let cg = cg.clone();
                CgroupState::Pending(tokio::task::spawn_blocking(move || {
                    match spare.adopt(&cg.name, &cg.limits) {
                        Ok(()) => Ok(spare),
                        Err(e) => Err((e, Some(Box::new(spare)))),
                    }
                }))
            }
            (Some(cg), None) => {
                let (cg, pid) = (cg.clone(), process.pid);
                CgroupState::Pending(tokio::task::spawn_blocking(move || {
                    let made = cg
                        .cgroups
                        .create(&cg.name, &cg.limits)
                        .map_err(|e| (e, None))?;
                    if let Err(e) = made.add(pid) {
                        made.remove();
                        return Err((e, None));
                    }
                    Ok(made)
                }))
            }
        };
        if plan.ids.is_none()
            && let Err(e) = cgroup.ready().await
        {
            // No user namespace, so no later hand-shake to wait at: wait here.
            process.kill();
            let _ = process.wait().await;
            return Err(SandboxError::Start(e));
        }
        let socket = process.socket.try_clone().map_err(SandboxError::Spawn)?;
        let process = Arc::new(process);
        let (link, messages) = match spawn_link(socket, FrameDecoder::new()) {
            Ok(link) => link,
            Err(e) => {
                process.kill();
                let _ = process.wait().await;
                return Err(SandboxError::Spawn(e));
            }
        };
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        let setup = Setup {
            root: path(&plan.root),
            files: plan
                .files
                .iter()
                .map(|(h, i)| (path(h), i.clone()))
                .collect(),
            dirs: plan
                .dirs
                .iter()
                .map(|(h, i, read_only)| DirBind {
                    host: path(h),
                    inside: i.clone(),
                    read_only: *read_only,
                })
                .collect(),
            hostname: plan.hostname.clone(),
            user_namespace: plan.ids.is_some(),
            max_threads: plan.max_threads,
            max_data_bytes: plan.max_data_bytes,
            mode: plan.mode.clone(),
        };
        let shared = Arc::new(Shared::default());
        shared
            .needs_maps
            .store(plan.ids.is_some(), Ordering::Relaxed);
        let (ended_tx, ended) = watch::channel(None);
        let sandbox = Arc::new(Self {
            pid: process.pid,
            link: link.clone(),
            shared: shared.clone(),
            process: process.clone(),
            ended,
        });
        let span = tracing::info_span!("sandbox", pod = %plan.name, pid = process.pid);
        tokio::spawn(tracing::Instrument::instrument(
            dispatch(
                messages,
                link.clone(),
                shared,
                process,
                events,
                HostSide {
                    ids: plan.ids,
                    cgroup,
                },
                ended_tx,
            ),
            span,
        ));
        if link.send(&Message::Setup(setup)).await.is_err() {
            sandbox.kill();
        }
        Ok(sandbox)
    }

    /// Sends the pod's containers and waits until they are prepared; returns the names
    /// of the service containers.
    pub async fn start(&self, start: Start, timeout: Duration) -> Result<Vec<String>, String> {
        let (ready_tx, ready_rx) = oneshot::channel();
        if let Ok(mut ready) = self.shared.ready.lock() {
            *ready = Some(ready_tx);
        }
        if self.shared.needs_maps.load(Ordering::Relaxed) {
            let mapped = self.shared.mapped.notified();
            let ended = self.ended();
            tokio::select! {
                () = mapped => {}
                end = ended => return Err(end.describe()),
                () = tokio::time::sleep(timeout) => {
                    self.kill();
                    return Err(format!("the sandbox did not enter its user namespace within {timeout:?}"));
                }
            }
        }
        if self.link.send(&Message::Start(start)).await.is_err() {
            return Err(self.end_text().await);
        }
        match tokio::time::timeout(timeout, ready_rx).await {
            Ok(Ok(services)) => Ok(services),
            Ok(Err(_)) => Err(self.end_text().await),
            Err(_) => {
                self.kill();
                Err(format!("the sandbox was not ready within {timeout:?}"))
            }
        }
    }

    async fn end_text(&self) -> String {
        self.ended().await.describe()
    }

    pub fn kill(&self) {
        self.process.kill();
    }

    pub fn is_alive(&self) -> bool {
        self.ended.borrow().is_none()
    }

    /// Resolves when the process has ended and been reaped.
    pub async fn ended(&self) -> Arc<SandboxEnd> {
        let mut ended = self.ended.clone();
        loop {
            if let Some(end) = ended.borrow_and_update().clone() {
                return end;
            }
            if ended.changed().await.is_err() {
                return Arc::new(SandboxEnd {
                    process: None,
                    fatal: None,
                    link: Some("the sandbox's supervisor is gone".into()),
                    oom_killed: false,
                });
            }
        }
    }

    /// Asks the sandbox to stop within `grace`, then kills it; returns once reaped.
    pub async fn stop(&self, grace: Duration) -> Arc<SandboxEnd> {
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        let _ = self.link.send(&Message::Stop { grace_ms }).await;
        match tokio::time::timeout(grace + Duration::from_millis(100), self.ended()).await {
            Ok(end) => end,
            Err(_) => {
                self.kill();
                self.ended().await
            }
        }
    }

    /// Runs a command container once and returns how it exited.
    pub async fn run(&self, container: &str) -> Result<Exited, Arc<SandboxEnd>> {
        let (exit_tx, exit_rx) = oneshot::channel();
        if let Ok(mut exits) = self.shared.exits.lock() {
            exits.insert(container.to_string(), exit_tx);
        }
        let run = Message::Run {
            container: container.to_string(),
        };
        if self.link.send(&run).await.is_err() {
            return Err(self.ended().await);
        }
        match exit_rx.await {
            Ok(exited) => Ok(exited),
            Err(_) => Err(self.ended().await),
        }
    }

    /// Sends a request to a service container. The response body arrives on the
    /// returned body; the head on the returned receiver.
    pub async fn request<B>(
        &self,
        container: &str,
        request: http::Request<B>,
    ) -> Result<
        (
            oneshot::Receiver<HttpHead>,
            wasmtime_wasi_http::p2::body::HyperOutgoingBody,
        ),
        String,
    >
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Send,
    {
        let id = self.shared.next_stream.fetch_add(1, Ordering::Relaxed) + 1;
        let (head_tx, head_rx) = oneshot::channel();
        // The body channel exists before the head is sent: chunks may follow the head
        // before the caller has looked at it.
        let (body_tx, body) = bodies::channel_body();
        if let Ok(mut heads) = self.shared.heads.lock() {
            heads.insert(id, head_tx);
        }
        if let Ok(mut open) = self.shared.bodies.lock() {
            open.insert(id, body_tx);
        }
        let (parts, request_body) = request.into_parts();
        let head = bodies::request_head(id, &parts);
        let sent = self
            .link
            .send(&Message::RequestHead {
                container: container.to_string(),
                head,
            })
            .await;
        if sent.is_err() {
            self.forget(id);
            return Err("the sandbox is gone".into());
        }
        let link = self.link.clone();
        let request_body = Box::pin(request_body);
        if request_body.is_end_stream() {
            bodies::pump_body(id, request_body, &link, Message::RequestBody).await;
        } else {
            tokio::spawn(async move {
                bodies::pump_body(id, request_body, &link, Message::RequestBody).await;
            });
        }
        Ok((head_rx, body))
    }

    /// Drops the waiters of a stream the caller gave up on.
    pub fn forget(&self, id: u64) {
        if let Ok(mut heads) = self.shared.heads.lock() {
            heads.remove(&id);
        }
        if let Ok(mut open) = self.shared.bodies.lock() {
            open.remove(&id);
        }
    }
}

fn take<K: std::hash::Hash + Eq, V>(map: &Mutex<HashMap<K, V>>, key: &K) -> Option<V> {
    map.lock().ok().and_then(|mut m| m.remove(key))
}

async fn route(map: &Mutex<HashMap<u64, ChunkSender>>, chunk: brink_proto::sandbox::Chunk) {
    let id = chunk.id;
    let sender = map.lock().ok().and_then(|m| m.get(&id).cloned());
    if let Some(sender) = sender
        && !bodies::feed(&sender, chunk).await
    {
        take(map, &id);
    }
}

/// What the agent set up for a sandbox on the host side, to finish or undo.
struct HostSide {
    /// The ID range to map once the sandbox asks.
    ids: Option<IdRange>,
    /// Its cgroup, read and removed once the process is reaped.
    cgroup: CgroupState,
}

/// Why a cgroup could not be set up, and the one the process is in anyway, if any.
type CgroupFailure = (CgroupError, Option<Box<PodCgroup>>);

/// A sandbox's cgroup: none, being made (and the process moved in), or made.
enum CgroupState {
    None,
    /// On failure, the cgroup the process is already in, if any, to remove at the end.
    Pending(tokio::task::JoinHandle<Result<PodCgroup, CgroupFailure>>),
    Ready(Arc<PodCgroup>),
    Failed(String, Option<Arc<PodCgroup>>),
}

impl CgroupState {
    /// Waits for the cgroup to be made; the error says why it could not be.
    async fn ready(&mut self) -> Result<Option<Arc<PodCgroup>>, String> {
        if let CgroupState::Pending(task) = self {
            *self = match task.await {
                Ok(Ok(made)) => CgroupState::Ready(Arc::new(made)),
                Ok(Err((e, left))) => {
                    CgroupState::Failed(format!("cgroup: {e}"), left.map(|b| Arc::new(*b)))
                }
                Err(e) => CgroupState::Failed(format!("cgroup task: {e}"), None),
            };
        }
        match self {
            CgroupState::None | CgroupState::Pending(_) => Ok(None),
            CgroupState::Ready(cgroup) => Ok(Some(cgroup.clone())),
            CgroupState::Failed(e, _) => Err(e.clone()),
        }
    }

    /// The cgroup to read and remove once the process is reaped, made or not.
    async fn leftover(&mut self) -> Option<Arc<PodCgroup>> {
        match self.ready().await {
            Ok(cgroup) => cgroup,
            Err(_) => match self {
                CgroupState::Failed(_, left) => left.clone(),
                _ => None,
            },
        }
    }
}

async fn write_id_maps(pid: i32, ids: IdRange) -> std::io::Result<()> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let map = format!("0 {} {}\n", ids.first, ids.count);
    tokio::fs::write(proc.join("setgroups"), "deny").await?;
    tokio::fs::write(proc.join("uid_map"), &map).await?;
    tokio::fs::write(proc.join("gid_map"), &map).await?;
    Ok(())
}

/// Reads everything the sandbox sends until it ends; then kills and reaps it.
async fn dispatch(
    mut messages: tokio::sync::mpsc::Receiver<Result<Message, LinkError>>,
    link: LinkSender,
    shared: Arc<Shared>,
    process: Arc<SandboxProcess>,
    events: Arc<dyn SandboxEvents>,
    host: HostSide,
    ended: watch::Sender<Option<Arc<SandboxEnd>>>,
) {
    let HostSide { ids, mut cgroup } = host;
    let mut link_error = None;
    let mut mapped = false;
    while let Some(message) = messages.recv().await {
        let message = match message {
            Ok(m) => m,
            Err(LinkError::Closed) => break,
            Err(e) => {
                tracing::warn!(error = %e, "closing the sandbox");
                link_error = Some(e.to_string());
                break;
            }
        };
        match message {
            Message::ResponseHead(head) => {
                if let Some(waiter) = take(&shared.heads, &head.id) {
                    let _ = waiter.send(head);
                }
            }
            Message::ResponseBody(chunk) => route(&shared.bodies, chunk).await,
            Message::Log {
                container,
                stream,
                bytes,
            } => {
                let stream = match stream {
                    LogStream::Stdout => Stream::Stdout,
                    LogStream::Stderr => Stream::Stderr,
                };
                events.output(&container, stream, &bytes);
            }
            Message::Exited(exited) => match take(&shared.exits, &exited.container) {
                Some(waiter) => {
                    let _ = waiter.send(exited);
                }
                None => events.unclaimed_exit(exited),
            },
            Message::OutboundHead { container, head } => {
                outbound(&container, head, &events, &link, &shared);
            }
            Message::OutboundBody(chunk) => route(&shared.outbound_bodies, chunk).await,
            Message::UsernsReady if !mapped => {
                mapped = true;
                let Some(ids) = ids else {
                    link_error = Some("asked for ID maps it was not given".into());
                    break;
                };
                if let Err(e) = cgroup.ready().await {
                    link_error = Some(e);
                    break;
                }
                if let Err(e) = write_id_maps(process.pid, ids).await {
                    link_error = Some(format!("writing the ID maps: {e}"));
                    break;
                }
                let _ = link.send(&Message::UsernsMapped).await;
                shared.needs_maps.store(false, Ordering::Relaxed);
                shared.mapped.notify_one();
            }
            Message::Ready { services } => {
                let waiter = shared.ready.lock().ok().and_then(|mut r| r.take());
                if let Some(waiter) = waiter {
                    let _ = waiter.send(services);
                }
            }
            Message::Fatal { message } => {
                tracing::warn!(%message, "sandbox failed");
                if let Ok(mut fatal) = shared.fatal.lock() {
                    *fatal = Some(message);
                }
            }
            other => {
                link_error = Some(format!("unexpected message from the sandbox: {other:?}"));
                tracing::warn!(error = ?link_error, "closing the sandbox");
                break;
            }
        }
    }
    // Whatever ended the link, the process goes too.
    process.kill();
    let end = process.wait().await.ok();
    let fatal = shared.fatal.lock().ok().and_then(|f| f.clone());
    // The cgroup is read (was it an OOM kill?) and removed once the process is reaped.
    let oom_killed = match cgroup.leftover().await {
        Some(cgroup) => tokio::task::spawn_blocking(move || {
            let oom = cgroup.oom_killed();
            cgroup.remove();
            oom
        })
        .await
        .unwrap_or(false),
        None => false,
    };
    let end = SandboxEnd {
        process: end,
        fatal,
        link: link_error,
        oom_killed,
    };
    if end.seccomp_killed() {
        tracing::warn!(
            pid = process.pid,
            "sandbox killed by seccomp: {}",
            signal_name(libc::SIGSYS)
        );
    } else {
        tracing::info!(pid = process.pid, end = %end.describe(), "sandbox ended");
    }
    // Every waiter learns it is over by its sender going away.
    for map in [&shared.bodies, &shared.outbound_bodies] {
        if let Ok(mut m) = map.lock() {
            m.clear();
        }
    }
    if let Ok(mut m) = shared.heads.lock() {
        m.clear();
    }
    if let Ok(mut m) = shared.exits.lock() {
        m.clear();
    }
    if let Ok(mut r) = shared.ready.lock() {
        r.take();
    }
    let _ = ended.send(Some(Arc::new(end)));
}

/// A guest's outbound call: the agent applies the pod's allow-list (never trusting the
/// sandbox's word) and makes the call itself.
fn outbound(
    container: &str,
    head: HttpHead,
    events: &Arc<dyn SandboxEvents>,
    link: &LinkSender,
    shared: &Arc<Shared>,
) {
    let id = head.id;
    let (body_tx, body) = bodies::channel_body();
    if let Ok(mut open) = shared.outbound_bodies.lock() {
        open.insert(id, body_tx);
    }
    let policy = events.outbound_policy(container);
    let (link, shared) = (link.clone(), shared.clone());
    tokio::spawn(async move {
        let result = async {
            let policy = policy.ok_or("denied")?;
            let mut request = http::Request::new(body);
            *request.method_mut() =
                http::Method::from_bytes(head.method.as_bytes()).map_err(|_| "invalid-uri")?;
            *request.uri_mut() = head.uri.parse().map_err(|_| "invalid-uri")?;
            *request.headers_mut() = bodies::header_map(&head).map_err(|_| "invalid-uri")?;
            if !policy.allows(request.uri()) {
                tracing::info!(uri = %request.uri(), "outbound request denied: host not in the pod's allow-list");
                return Err("denied");
            }
            wasmtime_wasi_http::default_send_request(request, None)
                .await
                .map_err(|e| match e {
                    wasmtime_wasi_http::Error::ConnectionRefused => "connection-refused",
                    wasmtime_wasi_http::Error::ConnectionTimeout => "timeout",
                    wasmtime_wasi_http::Error::DnsError { .. } => "dns",
                    _ => "the outbound request failed",
                })
        }
        .await;
        take(&shared.outbound_bodies, &id);
        match result {
            Ok((response, io)) => {
                tokio::spawn(io);
                let (parts, body) = response.into_parts();
                let head = bodies::response_head(id, &parts);
                if link
                    .send(&Message::OutboundResponseHead(head))
                    .await
                    .is_ok()
                {
                    bodies::pump_body(id, Box::pin(body), &link, Message::OutboundResponseBody)
                        .await;
                }
            }
            Err(message) => {
                let _ = link
                    .send(&Message::OutboundError {
                        id,
                        message: message.to_string(),
                    })
                    .await;
            }
        }
    });
}
