//! One pod's worker: the state machine that takes a pod from Pending to a terminal phase
//! and stops it gracefully when asked.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::probe::{ProbeTiming, probe_http};
use super::restart::{self, Decision, next_backoff};
use super::status::{ContainerState, PodRecord, Terminated};
use super::volumes::{self, PreparedVolume, VolumeError};
use crate::agent::NodeContext;
use crate::images::{PullPolicy, PulledImage};
use crate::logs::GuestOutput;
use crate::logs::{ContainerLog, Stream};
use crate::metrics::Metrics;
use crate::runtime::{ExitStatus, GuestContext, Outbound, OutboundPolicy, Preopen};
use crate::sandbox::{
    CgroupLimits, CgroupPlan, Command, PodSandbox, SandboxEvents, SandboxPlan, SandboxService,
    Service,
};
use crate::settings::Isolation;

/// A prepared container, wherever its guests run.
enum App {
    Http(Service),
    Command(Command),
}

/// How long a failed pull shows as ErrImagePull before the back-off state (at most half
/// the back-off).
const ERR_IMAGE_PULL_SHOWN: Duration = Duration::from_secs(2);

/// The states a pod's worker walks through. Each state's handler returns the next one.
enum PodState {
    /// Fetch every container's artifact (ErrImagePull/ImagePullBackOff on failure).
    Pulling,
    /// Compile or load each artifact and prepare the containers.
    Starting(Vec<PulledImage>),
    /// Supervise the containers until they finish or the pod is stopped.
    Running(Vec<(Container, App)>),
    /// Every container is done for good; wait to be removed.
    Finished,
    /// A stop was requested: the worker ends.
    Stopped,
}

/// A running pod worker, owned by the agent.
pub struct PodHandle {
    pub key: String,
    pub fingerprint: String,
    pub record: Arc<RwLock<PodRecord>>,
    stop: watch::Sender<bool>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl PodHandle {
    /// Starts a worker for `pod` (already validated, with uid and nodeName set).
    pub fn spawn(ctx: Arc<NodeContext>, pod: Pod, key: String, fingerprint: String) -> Self {
        let host_ip = ctx.settings.host_port_address.to_string();
        let record = Arc::new(RwLock::new(PodRecord::new(pod, host_ip)));
        let (stop, stop_rx) = watch::channel(false);
        let uid = record
            .read()
            .ok()
            .and_then(|r| r.pod.metadata.uid.clone())
            .unwrap_or_default();
        let worker = Worker {
            ctx,
            record: record.clone(),
            stop: stop_rx,
            key: key.clone(),
            sandbox: None,
            volumes: Vec::new(),
            volume_owner: None,
        };
        let span = tracing::info_span!("pod", pod = %key, uid = %uid);
        let task = tokio::spawn(worker.run().instrument(span));
        Self {
            key,
            fingerprint,
            record,
            stop,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    /// Stops the pod gracefully (its `terminationGracePeriodSeconds`) and waits for it.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    pub fn snapshot(&self) -> Option<PodRecord> {
        self.record.read().ok().map(|r| r.clone())
    }
}

struct Worker {
    ctx: Arc<NodeContext>,
    record: Arc<RwLock<PodRecord>>,
    stop: watch::Receiver<bool>,
    key: String,
    /// The pod's sandbox, once started (sandboxed isolation only).
    sandbox: Option<Arc<PodSandbox>>,
    /// The pod's volumes, once set up.
    volumes: Vec<PreparedVolume>,
    /// Who owns what the pod may write in its volumes (its ID range's root).
    volume_owner: Option<u32>,
}

/// The pod's CPU quota: the sum of its containers' CPU limits, or none when a container
/// has no limit (as a Kubernetes pod cgroup).
fn cpu_quota(containers: &[Container]) -> Option<u64> {
    containers.iter().try_fold(0u64, |sum, c| {
        let cpu = c.resources.as_ref()?.limits.as_ref()?.get("cpu")?;
        let millis = brink_proto::parse_cpu_millis(&cpu.0).ok()?;
        Some(sum.saturating_add(millis))
    })
}

/// Where a sandbox sees a pod's volume.
fn volume_inside(name: &str) -> String {
    format!("/volumes/{name}")
}

/// Resolves when a stop is requested (or the handle is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

impl Worker {
    fn pod(&self) -> Pod {
        self.record
            .read()
            .map(|r| r.pod.clone())
            .unwrap_or_default()
    }

    /// Reads one thing from the pod's spec without copying the whole pod.
    fn spec<T: Default>(&self, f: impl FnOnce(&k8s_openapi::api::core::v1::PodSpec) -> T) -> T {
        self.record
            .read()
            .ok()
            .and_then(|r| r.pod.spec.as_ref().map(f))
            .unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut PodRecord)) {
        // The sink is told after every update; it keeps what it needs and coalesces
        // (a sink that writes somewhere must not write an unchanged status again).
        let (readiness_changed, status) = match self.record.write() {
            Ok(mut record) => {
                let was_ready = record.all_ready();
                f(&mut record);
                let ready = record.all_ready();
                if ready != was_ready {
                    record.ready_since = Timestamp::now();
                }
                let uid = record.pod.metadata.uid.clone().unwrap_or_default();
                (
                    (ready != was_ready).then_some(ready),
                    Some((uid, record.status())),
                )
            }
            Err(_) => (None, None),
        };
        if let Some((uid, status)) = status {
            self.ctx.status.changed(&self.key, &uid, &status);
        }
        // The gateway sends traffic only to ready pods, as EndpointSlices would.
        if let Some(ready) = readiness_changed {
            self.ctx.gateway.endpoints.set_ready(&self.key, ready);
        }
    }

    fn set_container(&self, name: &str, f: impl FnOnce(&mut super::status::ContainerRecord)) {
        self.update(|r| {
            if let Some(c) = r.container_mut(name) {
                f(c);
            }
        });
    }

    /// Shows every container waiting, with the same reason and message.
    fn set_all_waiting(&self, reason: &str, message: &str) {
        self.update(|r| {
            for c in &mut r.containers {
                c.state = ContainerState::Waiting {
                    reason: reason.to_string(),
                    message: Some(message.to_string()),
                };
            }
        });
    }

    fn grace(&self) -> Duration {
        let secs = self
            .spec(|s| s.termination_grace_period_seconds)
            .unwrap_or(30);
        Duration::from_secs(secs.max(0) as u64)
    }

    async fn run(mut self) {
        // A pod that had finished before the agent restarted is not run again.
        let finished = self.record.read().is_ok_and(|r| r.is_terminal());
        let mut state = if finished {
            tracing::info!("pod taken up as finished");
            self.update(|_| {});
            PodState::Finished
        } else {
            tracing::info!("pod accepted");
            PodState::Pulling
        };
        loop {
            state = match state {
                PodState::Pulling => self.pull().await,
                PodState::Starting(images) => self.start(images).await,
                PodState::Running(apps) => self.supervise(apps).await,
                PodState::Finished => {
                    // Nothing will run again: the sandbox goes now, not when the pod does.
                    if let Some(sandbox) = self.sandbox.take() {
                        sandbox.stop(self.grace()).await;
                    }
                    tracing::info!(phase = ?self.record.read().map(|r| r.phase()).ok(), "pod finished");
                    stopped(&mut self.stop).await;
                    PodState::Stopped
                }
                PodState::Stopped => break,
            };
        }
        if let Some(sandbox) = self.sandbox.take() {
            sandbox.stop(self.grace()).await;
        }
        tracing::info!("pod stopped");
    }

    async fn pull(&mut self) -> PodState {
        let containers = self.spec(|s| s.containers.clone());
        let mut backoff = self.ctx.settings.image_pull_backoff_initial;
        'retry: loop {
            let mut pulled = Vec::with_capacity(containers.len());
            for container in &containers {
                let image = container.image.clone().unwrap_or_default();
                let policy = PullPolicy::parse(
                    container
                        .image_pull_policy
                        .as_deref()
                        .unwrap_or("IfNotPresent"),
                );
                let result = tokio::select! {
                    r = self.ctx.images.ensure(&image, policy, None) => r,
                    () = stopped(&mut self.stop) => return PodState::Stopped,
                };
                match result {
                    Ok(image) => {
                        self.set_container(&container.name, |c| {
                            c.image_id = image.image_id.clone()
                        });
                        pulled.push(image);
                    }
                    Err(e) => {
                        tracing::warn!(container = %container.name, %image, error = %e, "pull failed");
                        // As a kubelet reports it: ErrImagePull for the failure itself, then
                        // ImagePullBackOff while waiting to try again.
                        self.set_container(&container.name, |c| {
                            c.state = ContainerState::Waiting {
                                reason: "ErrImagePull".into(),
                                message: Some(e.to_string()),
                            }
                        });
                        let shown = (backoff / 2).min(ERR_IMAGE_PULL_SHOWN);
                        tokio::select! {
                            () = tokio::time::sleep(shown) => {}
                            () = stopped(&mut self.stop) => return PodState::Stopped,
                        }
                        let message = format!("Back-off pulling image {image:?}: {e}");
                        self.set_container(&container.name, |c| {
                            c.state = ContainerState::Waiting {
                                reason: "ImagePullBackOff".into(),
                                message: Some(message),
                            }
                        });
                        tokio::select! {
                            () = tokio::time::sleep(backoff - shown) => {}
                            () = stopped(&mut self.stop) => return PodState::Stopped,
                        }
                        backoff = next_backoff(backoff, self.ctx.settings.backoff_max);
                        continue 'retry;
                    }
                }
            }
            return PodState::Starting(pulled);
        }
    }

    fn guest_context(
        &self,
        container: &Container,
        memory_limit: u64,
        log: Arc<dyn GuestOutput>,
    ) -> GuestContext {
        let pod = self.pod();
        let mut args: Vec<String> = container
            .command
            .clone()
            .unwrap_or_else(|| vec![container.name.clone()]);
        args.extend(container.args.iter().flatten().cloned());
        let field = |path: &str| -> String {
            match path {
                "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
                "metadata.namespace" => pod.metadata.namespace.clone().unwrap_or_default(),
                "metadata.uid" => pod.metadata.uid.clone().unwrap_or_default(),
                "spec.nodeName" => pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default(),
                _ => String::new(),
            }
        };
        let env = container
            .env
            .iter()
            .flatten()
            .map(|e| {
                let value = match (
                    &e.value,
                    e.value_from.as_ref().and_then(|f| f.field_ref.as_ref()),
                ) {
                    (_, Some(r)) => field(&r.field_path),
                    (Some(v), None) => v.clone(),
                    (None, None) => String::new(),
                };
                (e.name.clone(), value)
            })
            .collect();
        GuestContext {
            args,
            env,
            memory_limit,
            log,
            outbound: Outbound::Direct(self.outbound_policy()),
            name: format!("{}/{}", self.key, container.name),
            preopens: self.preopens(container, false),
        }
    }

    /// The directories a container's guests are given: one per volume mount, at its
    /// `mountPath`; in a sandbox, where the sandbox binds the volume.
    fn preopens(&self, container: &Container, in_sandbox: bool) -> Vec<Preopen> {
        container
            .volume_mounts
            .iter()
            .flatten()
            .filter_map(|mount| {
                let volume = self.volumes.iter().find(|v| v.name == mount.name)?;
                Some(Preopen {
                    dir: if in_sandbox {
                        volume_inside(&volume.name).into()
                    } else {
                        volume.host_dir.clone()
                    },
                    guest: mount.mount_path.clone(),
                    read_only: mount.read_only == Some(true) || !volume.writable,
                })
            })
            .collect()
    }

    /// Creates or updates the pod's volume directories from `objects`, off the runtime.
    async fn set_up_volumes(
        &self,
        objects: Arc<crate::source::ConfigObjects>,
        owner: Option<u32>,
    ) -> Result<Result<Vec<PreparedVolume>, VolumeError>, tokio::task::JoinError> {
        let pod = self.pod();
        let data_dir = self.ctx.settings.data_dir.clone();
        let allowed = self.ctx.settings.allowed_host_paths.clone();
        tokio::task::spawn_blocking(move || {
            volumes::prepare(&data_dir, &pod, &objects, owner, &allowed)
        })
        .await
    }

    /// Sets up the pod's volume directories, owned by `owner`. While a ConfigMap or Secret
    /// they read is missing the pod waits in ContainerCreating, as with a kubelet, and
    /// tries again when the node's objects change. On failure, returns the next state.
    async fn prepare_volumes(&mut self, owner: Option<u32>) -> Result<(), PodState> {
        let mut config = self.ctx.config.subscribe();
        loop {
            let objects = config.borrow_and_update().clone();
            let prepared = self.set_up_volumes(objects, owner).await;
            let error = match prepared {
                Ok(Ok(prepared)) => {
                    self.volumes = prepared;
                    self.volume_owner = owner;
                    return Ok(());
                }
                Ok(Err(e)) => e,
                Err(e) => return Err(self.start_failed(format!("volume task: {e}")).await),
            };
            match error {
                VolumeError::Missing(message) => {
                    tracing::info!(%message, "waiting for a volume's source");
                    self.set_all_waiting("ContainerCreating", &message);
                    tokio::select! {
                        r = config.changed() => if r.is_err() {
                            stopped(&mut self.stop).await;
                            return Err(PodState::Stopped);
                        },
                        () = stopped(&mut self.stop) => return Err(PodState::Stopped),
                    }
                }
                VolumeError::NotAllowed(message) => {
                    return Err(self.reject("HostPathNotAllowed", message).await);
                }
                other => return Err(self.start_failed(other.to_string()).await),
            }
        }
    }

    /// Keeps configMap and secret volumes in step with their objects while the pod runs
    /// (a removed object leaves the last content in place). Never returns.
    async fn refresh_volumes(&self) {
        let projected = self.volumes.iter().any(|v| v.kind.always_read_only());
        let mut config = self.ctx.config.subscribe();
        config.borrow_and_update();
        if !projected {
            return std::future::pending().await;
        }
        while config.changed().await.is_ok() {
            let objects = config.borrow_and_update().clone();
            let refreshed = self.set_up_volumes(objects, self.volume_owner).await;
            match refreshed {
                Ok(Ok(_)) => tracing::debug!("volumes refreshed"),
                Ok(Err(VolumeError::Missing(message))) => {
                    tracing::info!(%message, "a volume's source is gone; its files stay as they were")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot refresh volumes"),
                Err(e) => tracing::warn!(error = %e, "volume refresh task failed"),
            }
        }
        std::future::pending().await
    }

    /// The pod's outbound allow-list. Validated with the manifest; an unreadable list here
    /// would mean "allow nothing".
    fn outbound_policy(&self) -> OutboundPolicy {
        let allowed = self
            .record
            .read()
            .ok()
            .and_then(|r| {
                r.pod
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(brink_proto::outbound::ALLOWED_OUTBOUND_HOSTS))
                    .and_then(|v| brink_proto::outbound::parse_allowed_hosts(v).ok())
            })
            .unwrap_or_default();
        OutboundPolicy::new(allowed)
    }

    /// Refuses the pod for good, as a kubelet's admission does.
    async fn reject(&mut self, reason: &str, message: String) -> PodState {
        tracing::warn!(%reason, %message, "pod rejected");
        self.set_all_waiting(reason, &message);
        self.update(|r| r.rejected = Some((reason.to_string(), message)));
        stopped(&mut self.stop).await;
        PodState::Stopped
    }

    async fn start(&mut self, images: Vec<PulledImage>) -> PodState {
        match self.ctx.settings.isolation {
            Isolation::InProcess => self.start_in_process(images).await,
            Isolation::Sandbox => self.start_sandboxed(images).await,
        }
    }

    /// Waits out a failed start, showing the reason on every container.
    async fn start_failed(&mut self, message: String) -> PodState {
        tracing::warn!(%message, "cannot start the pod");
        self.set_all_waiting("CreateContainerError", &message);
        tokio::select! {
            () = tokio::time::sleep(self.ctx.settings.crash_loop_backoff_initial) => PodState::Pulling,
            () = stopped(&mut self.stop) => PodState::Stopped,
        }
    }

    /// Starts the pod's sandbox: checks the policy, takes the pod's ID range, compiles
    /// (or finds) each artifact, and waits for the sandbox to load them.
    async fn start_sandboxed(&mut self, images: Vec<PulledImage>) -> PodState {
        let ctx = self.ctx.clone();
        let settings = &ctx.settings;
        let host_users = self.spec(|s| s.host_users) == Some(true);
        if host_users && !settings.allow_host_users {
            return self
                .reject(
                    "HostUsersNotAllowed",
                    "the pod asks for hostUsers: true, which this node's policy does not allow (--allow-host-users)".into(),
                )
                .await;
        }
        if !host_users && let Err(reason) = &self.ctx.user_namespaces {
            let message = format!("the pod needs a user namespace and {reason}");
            return self.reject("UserNamespacesUnavailable", message).await;
        }
        let uid = self
            .record
            .read()
            .ok()
            .and_then(|r| r.pod.metadata.uid.clone())
            .unwrap_or_default();
        let ids = if host_users {
            None
        } else {
            let ranges = self.ctx.id_ranges.clone();
            let pod_uid = uid.clone();
            match tokio::task::spawn_blocking(move || ranges.allocate(&pod_uid)).await {
                Ok(Ok(range)) => Some(range),
                Ok(Err(e)) => return self.start_failed(e.to_string()).await,
                Err(e) => return self.start_failed(format!("ID range task: {e}")).await,
            }
        };
        if let Err(next) = self.prepare_volumes(ids.map(|r| r.first)).await {
            return next;
        }
        let containers = self.spec(|s| s.containers.clone());
        let mut specs = Vec::with_capacity(containers.len());
        let mut files = Vec::new();
        let mut logs = std::collections::HashMap::new();
        let mut total_memory: u64 = 0;
        for (container, image) in containers.iter().zip(&images) {
            let prepared = async {
                let (memory_limit, log) = self.container_basics(container)?;
                let path = self
                    .ctx
                    .runtime
                    .ensure_compiled(&image.layer_digest, &image.blob_path)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((memory_limit, log, path))
            }
            .await;
            let (memory_limit, log, path) = match prepared {
                Ok(p) => p,
                Err(message) => {
                    return self
                        .start_failed(format!("container {}: {message}", container.name))
                        .await;
                }
            };
            total_memory = total_memory.saturating_add(memory_limit);
            let file_name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let inside = format!("/artifacts/{file_name}");
            if !files
                .iter()
                .any(|(_, i): &(std::path::PathBuf, String)| *i == inside)
            {
                files.push((path, inside.clone()));
            }
            let context = self.guest_context(container, memory_limit, log.clone());
            logs.insert(container.name.clone(), log);
            specs.push(brink_proto::sandbox::ContainerSpec {
                name: container.name.clone(),
                artifact: inside,
                args: context.args,
                env: context.env,
                memory_limit,
                preopens: self
                    .preopens(container, true)
                    .into_iter()
                    .map(|p| brink_proto::sandbox::Preopen {
                        dir: p.dir.to_string_lossy().into_owned(),
                        guest: p.guest,
                        read_only: p.read_only,
                    })
                    .collect(),
            });
        }
        let plan = SandboxPlan {
            name: self.key.clone(),
            root: settings.data_dir.join("sandboxes").join(&uid),
            ids,
            files,
            dirs: self
                .volumes
                .iter()
                .map(|v| (v.host_dir.clone(), volume_inside(&v.name), !v.writable))
                .collect(),
            hostname: self
                .record
                .read()
                .ok()
                .and_then(|r| r.pod.metadata.name.clone())
                .unwrap_or_else(|| "pod".into()),
            max_threads: settings.sandbox_max_threads,
            max_data_bytes: total_memory.saturating_add(settings.sandbox_memory_overhead),
            mode: brink_proto::sandbox::SandboxMode::Pod,
            cgroup: ctx.cgroups.clone().map(|cgroups| CgroupPlan {
                cgroups,
                name: uid.clone(),
                limits: CgroupLimits {
                    memory_bytes: total_memory
                        .saturating_add(settings.sandbox_cgroup_memory_overhead),
                    pids: settings.sandbox_max_threads,
                    cpu_millis: cpu_quota(&containers),
                },
            }),
            spares: ctx.spares.clone(),
        };
        let start = brink_proto::sandbox::Start {
            pod: self.key.clone(),
            engine: brink_proto::sandbox::EngineSpec {
                epoch_tick_ms: u64::try_from(settings.epoch_tick.as_millis()).unwrap_or(10),
                request_deadline_ms: u64::try_from(settings.request_deadline.as_millis())
                    .unwrap_or(u64::MAX),
                max_instances: settings.sandbox_max_instances,
                max_guest_memory: settings.max_guest_memory,
            },
            containers: specs,
        };
        let events = Arc::new(PodEvents {
            logs,
            policy: self.outbound_policy(),
        });
        let sandbox = PodSandbox::new(
            plan,
            start,
            events,
            settings.sandbox_start_timeout,
            settings.request_deadline,
            self.ctx.metrics.clone(),
        );
        let services = tokio::select! {
            r = sandbox.ensure() => r,
            () = stopped(&mut self.stop) => return PodState::Stopped,
        };
        let services = match services {
            Ok((_, services)) => services,
            Err(message) => {
                // A compiled file the sandbox cannot load is compiled again next time.
                if message.contains("compiled artifact") {
                    for image in &images {
                        self.ctx.runtime.discard_compiled(&image.layer_digest).await;
                    }
                }
                return self.start_failed(message).await;
            }
        };
        self.sandbox = Some(sandbox.clone());
        let apps = containers
            .into_iter()
            .map(|container| {
                let app = if services.contains(&container.name) {
                    App::Http(Service::Sandboxed(SandboxService::new(
                        sandbox.clone(),
                        container.name.clone(),
                    )))
                } else {
                    App::Command(Command::Sandboxed {
                        pod: sandbox.clone(),
                        container: container.name.clone(),
                    })
                };
                (container, app)
            })
            .collect();
        self.update(|r| r.initialized_at = Some(Timestamp::now()));
        PodState::Running(apps)
    }

    async fn start_in_process(&mut self, images: Vec<PulledImage>) -> PodState {
        if let Err(next) = self.prepare_volumes(None).await {
            return next;
        }
        let containers = self.spec(|s| s.containers.clone());
        let mut apps = Vec::with_capacity(containers.len());
        for (container, image) in containers.into_iter().zip(images) {
            let prepared = async {
                let (memory_limit, log) = self.container_basics(&container)?;
                let loaded = self
                    .ctx
                    .runtime
                    .load(&image.layer_digest, &image.blob_path)
                    .await
                    .map_err(|e| e.to_string())?;
                self.ctx
                    .runtime
                    .prepare(&loaded, self.guest_context(&container, memory_limit, log))
                    .map_err(|e| e.to_string())
            }
            .await;
            match prepared {
                Ok(crate::runtime::App::Http(app)) => {
                    apps.push((container, App::Http(Service::InProcess(app))))
                }
                Ok(crate::runtime::App::Command(app)) => {
                    apps.push((container, App::Command(Command::InProcess(app))))
                }
                Err(message) => {
                    tracing::warn!(container = %container.name, %message, "cannot start container");
                    self.set_container(&container.name, |c| {
                        c.state = ContainerState::Waiting {
                            reason: "CreateContainerError".into(),
                            message: Some(message),
                        }
                    });
                    tokio::select! {
                        () = tokio::time::sleep(self.ctx.settings.crash_loop_backoff_initial) => return PodState::Pulling,
                        () = stopped(&mut self.stop) => return PodState::Stopped,
                    }
                }
            }
        }
        self.update(|r| r.initialized_at = Some(Timestamp::now()));
        PodState::Running(apps)
    }

    /// What every container needs wherever it runs: its memory cap and its log.
    fn container_basics(&self, container: &Container) -> Result<(u64, Arc<ContainerLog>), String> {
        let memory_limit = self.memory_limit(container)?;
        let log = self
            .ctx
            .container_log(&self.pod(), &container.name)
            .map_err(|e| format!("cannot open the container log: {e}"))?;
        Ok((memory_limit, log))
    }

    /// The container's guest memory cap: its `resources.limits.memory`, or the node's
    /// default; a limit above what the node's pool can give is refused.
    fn memory_limit(&self, container: &Container) -> Result<u64, String> {
        let limit = container
            .resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
            .and_then(|q| brink_proto::parse_bytes(&q.0).ok());
        match limit {
            Some(l) if l > self.ctx.settings.max_guest_memory => Err(format!(
                "memory limit {l} bytes is above this node's largest guest memory ({} bytes)",
                self.ctx.settings.max_guest_memory
            )),
            Some(l) => Ok(l),
            None => Ok(self.ctx.settings.default_guest_memory),
        }
    }

    async fn supervise(&mut self, apps: Vec<(Container, App)>) -> PodState {
        let services = apps
            .iter()
            .filter(|(_, app)| matches!(app, App::Http(_)))
            .count();
        let supervisors = apps.into_iter().map(|(container, app)| {
            let stop = self.stop.clone();
            let this = &*self;
            async move {
                match app {
                    App::Http(app) => this.supervise_http(container, app, services, stop).await,
                    App::Command(app) => this.supervise_command(container, app, stop).await,
                }
            }
        });
        tokio::select! {
            _ = futures::future::join_all(supervisors) => {}
            () = self.refresh_volumes() => {}
        }
        if *self.stop.borrow() {
            PodState::Stopped
        } else {
            PodState::Finished
        }
    }

    fn restart_policy(&self) -> restart::Policy {
        restart::Policy::from_spec(self.spec(|s| s.restart_policy.clone()).as_deref())
    }

    fn crash_loop_backoff(&self) -> restart::Backoff {
        let s = &self.ctx.settings;
        restart::Backoff {
            initial: s.crash_loop_backoff_initial,
            max: s.backoff_max,
            reset_after: s.backoff_reset_after,
        }
    }

    /// A command container: run, apply the restart policy, back off between crashes.
    async fn supervise_command(
        &self,
        container: Container,
        app: Command,
        mut stop: watch::Receiver<bool>,
    ) {
        let name = container.name.clone();
        let settings = &self.ctx.settings;
        let mut backoff = settings.crash_loop_backoff_initial;
        loop {
            let started_at = Timestamp::now();
            let started = Instant::now();
            self.set_container(&name, |c| {
                c.state = ContainerState::Running { started_at };
                c.ready = true;
            });
            Metrics::inc(&self.ctx.metrics.container_starts);
            let run = app.run();
            tokio::pin!(run);
            let (status, stopping) = tokio::select! {
                status = &mut run => (status, false),
                () = stopped(&mut stop) => {
                    let grace = self.grace();
                    match tokio::time::timeout(grace, &mut run).await {
                        Ok(status) => (status, true),
                        Err(_) => (ExitStatus {
                            code: 137,
                            reason: "Error".into(),
                            message: Some(format!("stopped after its {}s grace period", grace.as_secs())),
                        }, true),
                    }
                }
            };
            let terminated = Terminated {
                exit_code: status.code,
                reason: status.reason.clone(),
                message: status.message.clone(),
                started_at,
                finished_at: Timestamp::now(),
            };
            tracing::info!(container = %name, code = status.code, reason = %status.reason, "container exited");
            let (delay, next) = match restart::decide(
                self.restart_policy(),
                status.code,
                stopping,
                started.elapsed(),
                backoff,
                &self.crash_loop_backoff(),
            ) {
                Decision::GiveUp => {
                    self.set_container(&name, |c| {
                        c.state = ContainerState::Terminated(terminated);
                        c.ready = false;
                        c.finished = true;
                    });
                    return;
                }
                Decision::Restart { delay, next } => (delay, next),
            };
            let message = format!(
                "back-off {}s restarting failed container={name} pod={}",
                delay.as_secs_f64(),
                self.key
            );
            self.set_container(&name, |c| {
                c.last_state = Some(terminated.clone());
                c.state = ContainerState::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: Some(message),
                };
                c.ready = false;
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopped(&mut stop) => {
                    self.set_container(&name, |c| {
                        c.state = ContainerState::Terminated(terminated);
                        c.finished = true;
                    });
                    return;
                }
            }
            backoff = next;
            self.set_container(&name, |c| c.restart_count += 1);
            Metrics::inc(&self.ctx.metrics.container_restarts);
        }
    }

    /// A service container: open its host ports, probe it, and drain it on stop.
    async fn supervise_http(
        &self,
        container: Container,
        app: Service,
        services: usize,
        mut stop: watch::Receiver<bool>,
    ) {
        let name = container.name.clone();
        let mut listeners = Vec::new();
        let mut backoff = self.ctx.settings.crash_loop_backoff_initial;
        for port in container.ports.iter().flatten() {
            let Some(host_port) = port.host_port else {
                continue;
            };
            let ip = port
                .host_ip
                .as_deref()
                .and_then(|ip| ip.parse().ok())
                .unwrap_or(self.ctx.settings.host_port_address);
            let addr = std::net::SocketAddr::new(ip, host_port as u16);
            loop {
                match self
                    .ctx
                    .host_ports
                    .bind(addr, format!("{}/{name}", self.key), app.clone())
                    .await
                {
                    Ok(listener) => {
                        listeners.push(listener);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(container = %name, %addr, error = %e, "cannot open host port");
                        self.set_container(&name, |c| {
                            c.state = ContainerState::Waiting {
                                reason: "RunContainerError".into(),
                                message: Some(format!("host port {addr}: {e}")),
                            }
                        });
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = stopped(&mut stop) => return,
                        }
                        backoff = next_backoff(backoff, self.ctx.settings.backoff_max);
                    }
                }
            }
        }
        let started_at = Timestamp::now();
        Metrics::inc(&self.ctx.metrics.container_starts);
        let readiness = container.readiness_probe.clone();
        self.set_container(&name, |c| {
            c.state = ContainerState::Running { started_at };
            c.ready = readiness.is_none();
        });
        tracing::info!(container = %name, "service container running");
        let ready = self.record.read().is_ok_and(|r| r.all_ready());
        self.ctx.gateway.endpoints.register(
            &self.key,
            &self.pod(),
            &name,
            container.ports.clone().unwrap_or_default(),
            services,
            app.clone(),
            ready,
        );

        let mut readiness = readiness.map(ProbeLoop::new);
        let mut liveness = container.liveness_probe.clone().map(ProbeLoop::new);
        loop {
            let next = [readiness.as_ref(), liveness.as_ref()]
                .into_iter()
                .flatten()
                .map(|p| p.due)
                .min();
            let sleep = async {
                match next {
                    Some(due) => tokio::time::sleep_until(due.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => {}
                () = stopped(&mut stop) => break,
                end = app.sandbox_ended() => {
                    if !self.restart_sandbox(&name, &end, &mut backoff, &mut stop).await {
                        break;
                    }
                    continue;
                }
            }
            if let Some(probe) = readiness.as_mut().filter(|p| p.is_due())
                && let Some(ready) = probe.run(&app).await
            {
                self.set_container(&name, |c| c.ready = ready);
            }
            if let Some(probe) = liveness.as_mut().filter(|p| p.is_due())
                && probe.run(&app).await == Some(false)
            {
                tracing::warn!(container = %name, "liveness probe failed; restarting");
                let terminated = Terminated {
                    exit_code: 137,
                    reason: "Error".into(),
                    message: Some("Liveness probe failed".into()),
                    started_at,
                    finished_at: Timestamp::now(),
                };
                self.set_container(&name, |c| {
                    c.last_state = Some(terminated);
                    c.restart_count += 1;
                    c.state = ContainerState::Running {
                        started_at: Timestamp::now(),
                    };
                });
                Metrics::inc(&self.ctx.metrics.container_restarts);
                probe.reset();
            }
        }
        // Graceful stop: out of the gateway's endpoints first, then close the listeners
        // and let requests in flight finish.
        self.ctx.gateway.endpoints.unregister(&self.key, &name);
        // A proxy still holding the old backend map hands refused requests to another
        // endpoint; without closing, one could arrive after the wait below and meet a
        // stopped sandbox.
        app.close();
        self.set_container(&name, |c| c.ready = false);
        let grace = self.grace();
        let deadline = Instant::now() + grace;
        for listener in listeners {
            listener
                .shutdown(deadline.saturating_duration_since(Instant::now()))
                .await;
        }
        while app.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.set_container(&name, |c| {
            c.state = ContainerState::Terminated(Terminated {
                exit_code: 0,
                reason: "Completed".into(),
                message: None,
                started_at,
                finished_at: Timestamp::now(),
            });
            c.finished = true;
        });
    }
}

impl Worker {
    /// A service's sandbox died: record it as the container's last termination, back
    /// off, and start a new sandbox. Returns false when the pod is being stopped.
    async fn restart_sandbox(
        &self,
        name: &str,
        end: &crate::sandbox::SandboxEnd,
        backoff: &mut Duration,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let description = end.describe();
        tracing::warn!(container = %name, end = %description, "sandbox died");
        let finished_at = Timestamp::now();
        let terminated = Terminated {
            exit_code: end.exit_code(),
            reason: end.reason().into(),
            message: Some(description),
            started_at: self
                .record
                .read()
                .ok()
                .and_then(|r| {
                    r.containers
                        .iter()
                        .find(|c| c.name == name)
                        .and_then(|c| match &c.state {
                            ContainerState::Running { started_at } => Some(*started_at),
                            _ => None,
                        })
                })
                .unwrap_or(finished_at),
            finished_at,
        };
        loop {
            let message = format!(
                "back-off {}s restarting failed container={name} pod={}",
                backoff.as_secs_f64(),
                self.key
            );
            self.set_container(name, |c| {
                c.last_state = Some(terminated.clone());
                c.state = ContainerState::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: Some(message),
                };
                c.ready = false;
            });
            tokio::select! {
                () = tokio::time::sleep(*backoff) => {}
                () = stopped(stop) => return false,
            }
            *backoff = next_backoff(*backoff, self.ctx.settings.backoff_max);
            let Some(sandbox) = &self.sandbox else {
                return false;
            };
            match sandbox.ensure().await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(container = %name, error = %e, "cannot restart the sandbox")
                }
            }
        }
        self.set_container(name, |c| {
            c.restart_count += 1;
            c.state = ContainerState::Running {
                started_at: Timestamp::now(),
            };
            c.ready = true;
        });
        Metrics::inc(&self.ctx.metrics.container_restarts);
        true
    }
}

/// Where a sandboxed pod's output and outbound calls go.
struct PodEvents {
    logs: std::collections::HashMap<String, Arc<ContainerLog>>,
    policy: OutboundPolicy,
}

impl SandboxEvents for PodEvents {
    fn output(&self, container: &str, stream: Stream, bytes: &[u8]) {
        if let Some(log) = self.logs.get(container) {
            log.write(stream, bytes);
        }
    }

    fn outbound_policy(&self, container: &str) -> Option<OutboundPolicy> {
        self.logs
            .contains_key(container)
            .then(|| self.policy.clone())
    }
}

/// One probe's schedule and thresholds.
struct ProbeLoop {
    probe: Probe,
    timing: ProbeTiming,
    due: Instant,
    successes: u32,
    failures: u32,
}

impl ProbeLoop {
    fn new(probe: Probe) -> Self {
        let timing = ProbeTiming::of(&probe);
        Self {
            due: Instant::now() + timing.initial_delay,
            probe,
            timing,
            successes: 0,
            failures: 0,
        }
    }

    fn is_due(&self) -> bool {
        Instant::now() >= self.due
    }

    fn reset(&mut self) {
        self.due = Instant::now() + self.timing.initial_delay.max(self.timing.period);
        self.successes = 0;
        self.failures = 0;
    }

    /// Runs the probe; returns the new verdict once a threshold is crossed.
    async fn run(&mut self, app: &Service) -> Option<bool> {
        let ok = probe_http(app, &self.probe, &self.timing).await;
        self.due = Instant::now() + self.timing.period;
        if ok {
            self.failures = 0;
            self.successes += 1;
            (self.successes >= self.timing.success_threshold).then_some(true)
        } else {
            self.successes = 0;
            self.failures += 1;
            (self.failures >= self.timing.failure_threshold).then_some(false)
        }
    }
}
