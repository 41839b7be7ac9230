//! The node agent: wires the image service, the runtime, host ports and the kubelet
//! endpoint together, and reconciles the pods it runs against what its source wants.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Pod;

use crate::cache::CacheError;
use crate::hostport::HostPorts;
use crate::idranges::IdRanges;
use crate::images::ImageService;
use crate::logs::ContainerLog;
use crate::metrics::Metrics;
use crate::pod::{PodHandle, PodRecord, fingerprint, uid_from_fingerprint};
use crate::runtime::{Runtime, RuntimeError};
use crate::settings::NodeSettings;
use crate::source::{ConfigObjects, DesiredPods, PodSource};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("image cache: {0}")]
    Cache(#[from] CacheError),
    #[error("runtime: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("user-namespace ID ranges: {0}")]
    IdRanges(#[from] crate::idranges::IdRangeError),
    #[error("kubelet endpoint {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What every pod worker shares.
pub struct NodeContext {
    pub settings: NodeSettings,
    pub images: ImageService,
    pub runtime: Arc<Runtime>,
    pub host_ports: Arc<HostPorts>,
    pub metrics: Arc<Metrics>,
    /// Each sandboxed pod's host ID range.
    pub id_ranges: Arc<IdRanges>,
    /// Whether pods can have user namespaces here, or why not (checked once at start).
    pub user_namespaces: Result<(), String>,
    /// The ConfigMaps and Secrets pods' volumes read; workers watch it for changes.
    pub config: tokio::sync::watch::Sender<Arc<ConfigObjects>>,
    /// Where sandboxes get cgroup limits (None: rlimits only).
    pub cgroups: Option<Arc<crate::sandbox::Cgroups>>,
    /// Sandbox processes started ahead of need (None: every start from scratch).
    pub spares: Option<Arc<crate::sandbox::Spares>>,
    /// The Gateway API data plane; workers register their service containers in its
    /// endpoints.
    pub gateway: Arc<crate::gateway::DataPlane>,
    /// Where workers report pod status.
    pub status: Arc<dyn crate::source::StatusSink>,
}

impl NodeContext {
    /// Directory of a pod's logs: `logs/<namespace>_<name>_<uid>/`.
    pub fn pod_log_dir(&self, pod: &Pod) -> PathBuf {
        let m = &pod.metadata;
        self.settings.data_dir.join("logs").join(format!(
            "{}_{}_{}",
            m.namespace.as_deref().unwrap_or("default"),
            m.name.as_deref().unwrap_or_default(),
            m.uid.as_deref().unwrap_or_default()
        ))
    }

    pub fn container_log(&self, pod: &Pod, container: &str) -> std::io::Result<Arc<ContainerLog>> {
        ContainerLog::open(
            self.pod_log_dir(pod).join(format!("{container}.log")),
            self.settings.log_max_file_bytes,
            self.settings.log_max_files,
        )
    }
}

/// A node agent.
pub struct Agent {
    pub ctx: Arc<NodeContext>,
    pods: RwLock<HashMap<String, Arc<PodHandle>>>,
    source_errors: RwLock<Vec<String>>,
    /// Whether the first desired set has been applied (it prunes stale ID ranges).
    reconciled: std::sync::atomic::AtomicBool,
}

impl Agent {
    /// A node whose pod status stays in its own records (a standalone node).
    pub fn new(settings: NodeSettings) -> Result<Arc<Self>, AgentError> {
        Self::with_status(settings, Arc::new(crate::source::status::RecordsOnly))
    }

    /// A node that reports pod status to `status` (a site's API).
    pub fn with_status(
        settings: NodeSettings,
        status: Arc<dyn crate::source::StatusSink>,
    ) -> Result<Arc<Self>, AgentError> {
        let metrics = Arc::new(Metrics::default());
        let images = ImageService::new(settings.clone(), metrics.clone())?;
        let runtime = Runtime::new(&settings, metrics.clone())?;
        let id_ranges = Arc::new(IdRanges::open(
            &settings.data_dir.join("idranges"),
            settings.id_pool_base,
            settings.id_pool_ranges,
        )?);
        let user_namespaces = match settings.isolation {
            crate::settings::Isolation::Sandbox => crate::sandbox::user_namespaces_available(),
            crate::settings::Isolation::InProcess => Ok(()),
        };
        if let Err(reason) = &user_namespaces {
            tracing::warn!(%reason, "pods that need a user namespace will be refused");
        }
        // Sandboxes are always capped by rlimits (threads: RLIMIT_NPROC of their own uid;
        // writable memory: RLIMIT_DATA); cgroups add exact memory, pids and CPU limits
        // where the host lets the agent make them, and the log says which it is.
        let cgroups = if settings.isolation == crate::settings::Isolation::Sandbox {
            if settings.cgroups {
                let name = crate::sandbox::cgroup::subtree_name(&settings.data_dir);
                match crate::sandbox::Cgroups::set_up(&name) {
                    Ok(cgroups) => {
                        cgroups.remove_stale();
                        tracing::info!(cgroups = %cgroups.describe(), "sandboxes get cgroup limits");
                        Some(Arc::new(cgroups))
                    }
                    Err(e) => {
                        tracing::warn!(reason = %e, "sandboxes get no cgroup limits, only rlimits");
                        None
                    }
                }
            } else {
                tracing::warn!("cgroups are off (--cgroups off): sandboxes get rlimits only");
                None
            }
        } else {
            None
        };
        if settings.isolation == crate::settings::Isolation::InProcess {
            tracing::warn!(
                "guests run inside the agent process (--isolation=in-process): no sandbox"
            );
        }
        let spares = (settings.isolation == crate::settings::Isolation::Sandbox
            && user_namespaces.is_ok()
            && settings.sandbox_spares > 0)
            .then(|| {
                crate::sandbox::Spares::new(
                    cgroups.clone(),
                    crate::sandbox::CgroupLimits {
                        memory_bytes: settings.sandbox_cgroup_memory_overhead,
                        pids: settings.sandbox_max_threads,
                        cpu_millis: None,
                    },
                    settings.sandbox_spares,
                )
            });
        let advertise_address = match settings.gateway_address {
            ip if ip.is_unspecified() && !settings.host_port_address.is_unspecified() => {
                settings.host_port_address
            }
            ip if ip.is_unspecified() => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            ip => ip,
        };
        let gateway = crate::gateway::DataPlane::new(
            crate::gateway::GatewaySettings {
                controller_name: settings.gateway_controller_name.clone(),
                bind_address: settings.gateway_address,
                advertise_address,
                limits: crate::gateway::listeners::ConnectionLimits {
                    drain: settings.gateway_drain,
                    header_read_timeout: Some(settings.gateway_header_read_timeout)
                        .filter(|t| !t.is_zero()),
                    tls_handshake_timeout: settings.gateway_tls_handshake_timeout,
                    max_header_bytes: settings.gateway_max_header_bytes,
                },
                port_retry: settings.gateway_port_retry,
            },
            metrics.clone(),
        );
        Ok(Arc::new(Self {
            ctx: Arc::new(NodeContext {
                settings,
                images,
                runtime,
                host_ports: Arc::new(HostPorts::default()),
                metrics,
                id_ranges,
                user_namespaces,
                config: tokio::sync::watch::Sender::new(Arc::default()),
                cgroups,
                spares,
                gateway,
                status,
            }),
            pods: RwLock::new(HashMap::new()),
            source_errors: RwLock::new(Vec::new()),
            reconciled: Default::default(),
        }))
    }

    /// Every pod with its current status, sorted by namespace and name.
    pub fn pods(&self) -> Vec<PodRecord> {
        let pods = self
            .pods
            .read()
            .map(|p| p.values().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        let mut records: Vec<PodRecord> = pods.iter().filter_map(|h| h.snapshot()).collect();
        records.sort_by_key(|r| crate::pod_key(&r.pod));
        records
    }

    /// How many pods the node runs, without copying their records.
    pub fn pod_count(&self) -> usize {
        self.pods.read().map(|p| p.len()).unwrap_or_default()
    }

    pub fn pod(&self, key: &str) -> Option<PodRecord> {
        self.pods.read().ok()?.get(key)?.snapshot()
    }

    /// What the pod source could not read, one line per problem.
    pub fn source_errors(&self) -> Vec<String> {
        self.source_errors
            .read()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    /// Runs the node: the kubelet endpoint, and pods from `source`, until `shutdown`
    /// resolves; then stops every pod gracefully.
    pub async fn run(
        self: Arc<Self>,
        mut source: impl PodSource,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), AgentError> {
        let addr = self.ctx.settings.kubelet_addr;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Bind { addr, source })?;
        let server = tokio::spawn(crate::kubelet::serve(listener, self.clone()));
        let spares = self.ctx.spares.clone().map(|s| tokio::spawn(s.run()));
        let (gateway_stop, gateway_stopped) = tokio::sync::oneshot::channel::<()>();
        let gateway = tokio::spawn(self.ctx.gateway.clone().run(
            self.ctx.config.subscribe(),
            async move {
                let _ = gateway_stopped.await;
            },
        ));
        tracing::info!(node = %self.ctx.settings.node_name, %addr, "node agent ready");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                desired = source.next() => match desired {
                    Some(desired) => self.reconcile(desired).await,
                    None => break,
                },
                () = &mut shutdown => break,
            }
        }
        tracing::info!("stopping every pod");
        self.ctx.status.closing();
        // Gateway ports close first, as a kubelet's endpoints go before its pods.
        let _ = gateway_stop.send(());
        let _ = gateway.await;
        let handles: Vec<_> = self
            .pods
            .write()
            .map(|mut p| p.drain().map(|(_, h)| h).collect())
            .unwrap_or_default();
        futures::future::join_all(handles.into_iter().map(stop_handle)).await;
        if let Some(task) = spares {
            task.abort();
        }
        if let Some(spares) = &self.ctx.spares {
            spares.shutdown().await;
        }
        if let Some(cgroups) = self.ctx.cgroups.clone() {
            let _ = tokio::task::spawn_blocking(move || cgroups.remove_subtree()).await;
        }
        server.abort();
        Ok(())
    }

    /// Brings the running pods in line with `desired`: stops removed and changed pods
    /// (gracefully, all at once), then starts new and changed ones.
    pub async fn reconcile(&self, desired: DesiredPods) {
        if let Ok(mut errors) = self.source_errors.write() {
            *errors = desired.errors.clone();
        }
        // Objects first, so pods started below see the ConfigMaps and Secrets that came
        // with them.
        let config = desired.config;
        self.ctx.gateway.set_objects(desired.gateway);
        self.ctx.config.send_if_modified(|current| {
            if **current == config {
                return false;
            }
            *current = Arc::new(config);
            true
        });
        let mut wanted: HashMap<String, (Pod, String)> = HashMap::new();
        for manifest in desired.pods {
            let key = manifest.key();
            let mut pod = manifest.pod;
            let print = fingerprint(&pod);
            if pod.metadata.uid.is_none() {
                pod.metadata.uid = Some(uid_from_fingerprint(&print));
            }
            if let Some(spec) = pod.spec.as_mut() {
                spec.node_name = Some(self.ctx.settings.node_name.clone());
            }
            wanted.insert(key, (pod, print));
        }
        let to_stop: Vec<Arc<PodHandle>> = {
            let Ok(mut pods) = self.pods.write() else {
                return;
            };
            let stale: Vec<String> = pods
                .iter()
                .filter(|(key, handle)| {
                    wanted
                        .get(*key)
                        .is_none_or(|(_, print)| *print != handle.fingerprint)
                })
                .map(|(key, _)| key.clone())
                .collect();
            stale.iter().filter_map(|key| pods.remove(key)).collect()
        };
        let stop_dirs: Vec<PathBuf> = to_stop
            .iter()
            .filter_map(|h| h.snapshot())
            .map(|r| self.ctx.pod_log_dir(&r.pod))
            .collect();
        let removed: Vec<String> = to_stop
            .iter()
            .filter_map(|h| h.snapshot().and_then(|r| r.pod.metadata.uid))
            .collect();
        let data_dir = self.ctx.settings.data_dir.clone();
        let stopping: Vec<(String, String)> = to_stop
            .iter()
            .filter_map(|h| Some((h.key.clone(), h.snapshot()?.pod.metadata.uid?)))
            .collect();
        futures::future::join_all(to_stop.into_iter().map(stop_handle)).await;
        for (key, uid) in &stopping {
            self.ctx.status.stopped(key, uid);
        }
        // A pod that is gone (or changed, which is a new pod) gives its ID range back;
        // records of pods removed while the agent was down go on the first pass.
        let live: Vec<String> = wanted
            .values()
            .filter_map(|(pod, _)| pod.metadata.uid.clone())
            .collect();
        let ranges = self.ctx.id_ranges.clone();
        let first = !self
            .reconciled
            .swap(true, std::sync::atomic::Ordering::Relaxed);
        let released = tokio::task::spawn_blocking(move || {
            for uid in removed.iter().filter(|u| !live.contains(u)) {
                // A pod's emptyDir goes with the pod, as in Kubernetes.
                let _ = std::fs::remove_dir_all(data_dir.join("pods").join(uid));
                ranges.release(uid)?;
            }
            if first {
                crate::pod::volumes::prune(&data_dir, &live);
                let live: Vec<&str> = live.iter().map(String::as_str).collect();
                ranges.retain(&live)?;
            }
            Ok::<_, crate::idranges::IdRangeError>(())
        })
        .await;
        if let Ok(Err(e)) = released {
            tracing::warn!(error = %e, "cannot release user-namespace ID ranges");
        }
        for dir in stop_dirs {
            // Logs of a pod that is gone are garbage, as a kubelet collects them.
            let _ = tokio::fs::remove_dir_all(dir).await;
        }
        let Ok(mut pods) = self.pods.write() else {
            return;
        };
        for (key, (pod, print)) in wanted {
            if pods.contains_key(&key) {
                continue;
            }
            let handle = PodHandle::spawn(self.ctx.clone(), pod, key.clone(), print);
            pods.insert(key, Arc::new(handle));
        }
    }
}

async fn stop_handle(handle: Arc<PodHandle>) {
    handle.stop().await;
}
