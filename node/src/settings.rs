//! Every interval, timeout and limit of the node agent, named and documented in one place.
//! The CLI exposes each one as a flag; the defaults are what a small edge machine wants.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Where a node runs its pods' guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// One user-namespaced sandbox process per pod (the default).
    Sandbox,
    /// Inside the agent process, isolated by wasmtime alone. For benchmarks and debugging
    /// only: a guest that escapes wasmtime owns the agent.
    InProcess,
}

/// Settings of one node agent.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The node's name, as it appears in `spec.nodeName` and in `brink get pods -o wide`.
    pub node_name: String,
    /// Root of everything the node keeps on disk: blob cache, compiled artifacts, logs.
    pub data_dir: PathBuf,
    /// Where the kubelet-style endpoint (`/healthz`, `/pods`, `/containerLogs`) listens.
    /// Plain HTTP, so keep it on loopback until the TLS endpoint lands.
    pub kubelet_addr: SocketAddr,
    /// The address host ports bind to when a port does not name a `hostIP`.
    pub host_port_address: IpAddr,
    /// Registries reached over plain HTTP besides loopback ones (`host:port`).
    pub insecure_registries: Vec<String>,
    /// How often the manifest directory is re-read for changes.
    pub manifest_poll_interval: Duration,
    /// Resolution of the guest CPU deadline: the engine's epoch advances this often.
    pub epoch_tick: Duration,
    /// How long one HTTP request may run in a guest before it is interrupted with a 504.
    pub request_deadline: Duration,
    /// Guest instances that may be alive at once (the pooling allocator's slots).
    pub max_instances: u32,
    /// The most linear memory one guest may have; also the pooling allocator's slot size.
    pub max_guest_memory: u64,
    /// Guest memory cap for containers without `resources.limits.memory`.
    pub default_guest_memory: u64,
    /// First wait after a failed pull; doubles per failure up to `backoff_max`.
    pub image_pull_backoff_initial: Duration,
    /// First wait before restarting a crashed container; doubles up to `backoff_max`.
    pub crash_loop_backoff_initial: Duration,
    /// Ceiling of both back-offs (Kubernetes uses five minutes).
    pub backoff_max: Duration,
    /// A container that ran this long without failing has its crash back-off reset.
    pub backoff_reset_after: Duration,
    /// A container log file is rotated when it grows past this size.
    pub log_max_file_bytes: u64,
    /// How many log files (current plus rotated) are kept per container.
    pub log_max_files: usize,
    /// How often a following log reader (`logs -f`) looks for new lines.
    pub log_follow_poll: Duration,
    /// Connect and read timeout for registry requests.
    pub registry_timeout: Duration,
    /// Where guests run.
    pub isolation: Isolation,
    /// First host uid/gid of the pool that pods' user-namespace ranges come from.
    pub id_pool_base: u32,
    /// How many 65,536-ID ranges the pool holds (so at most this many sandboxed pods).
    pub id_pool_ranges: u32,
    /// Whether a pod may ask for `hostUsers: true` (no user namespace). Off by default.
    pub allow_host_users: bool,
    /// Host directories under which pods may mount `hostPath` volumes (none by default,
    /// so a hostPath volume is refused).
    pub allowed_host_paths: Vec<PathBuf>,
    /// Threads (and processes) one sandbox may have (RLIMIT_NPROC of its own uid).
    pub sandbox_max_threads: u64,
    /// Guest instances alive at once in one sandbox (its pooling allocator's slots).
    pub sandbox_max_instances: u32,
    /// Writable memory a sandbox may map beyond its containers' memory limits: runtime,
    /// stacks and buffers (RLIMIT_DATA is the sum).
    pub sandbox_memory_overhead: u64,
    /// How long a new sandbox may take to build its jail and load its artifacts.
    pub sandbox_start_timeout: Duration,
    /// Whether sandboxes get cgroup limits where the host allows it (v2, or v1 on hybrid
    /// hosts); off leaves them with rlimits only.
    pub cgroups: bool,
    /// Memory a sandbox's cgroup allows beyond its containers' memory limits: the
    /// runtime's own resident memory, stacks and buffers.
    pub sandbox_cgroup_memory_overhead: u64,
    /// Sandbox processes kept started ahead of need (exec'd, in a cgroup), so a pod's
    /// start skips both; 0 starts every sandbox from scratch.
    pub sandbox_spares: usize,
    /// GatewayClasses with this `controllerName` are served by this node's data plane.
    pub gateway_controller_name: String,
    /// The address Gateway listeners are opened on.
    pub gateway_address: IpAddr,
    /// How long a gateway port that closes (its Gateway changed or went) gives open
    /// connections to finish.
    pub gateway_drain: Duration,
    /// How long a gateway port that could not be opened (another process holds it) waits
    /// before the next try; its listeners say `PortUnavailable` until one succeeds.
    pub gateway_port_retry: Duration,
    /// How long an HTTP/1.1 client of a gateway port may take to send a request's headers
    /// (slow clients must not hold connections for free); zero: no limit.
    pub gateway_header_read_timeout: Duration,
    /// How long a TLS handshake on an HTTPS gateway port may take.
    pub gateway_tls_handshake_timeout: Duration,
    /// The most header bytes a request to a gateway port may carry; more is refused
    /// (431) before any route or guest sees it.
    pub gateway_max_header_bytes: usize,
}

impl NodeSettings {
    /// Defaults for a node keeping its state under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            node_name: default_node_name(),
            data_dir: data_dir.into(),
            kubelet_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10250),
            host_port_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            insecure_registries: Vec::new(),
            manifest_poll_interval: Duration::from_secs(1),
            epoch_tick: Duration::from_millis(10),
            request_deadline: Duration::from_secs(10),
            max_instances: 1000,
            max_guest_memory: 1 << 30,
            default_guest_memory: 256 << 20,
            image_pull_backoff_initial: Duration::from_secs(10),
            crash_loop_backoff_initial: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            backoff_reset_after: Duration::from_secs(600),
            log_max_file_bytes: 10 << 20,
            log_max_files: 5,
            log_follow_poll: Duration::from_millis(200),
            registry_timeout: Duration::from_secs(30),
            isolation: Isolation::Sandbox,
            id_pool_base: 1_000_000,
            id_pool_ranges: 4096,
            allow_host_users: false,
            allowed_host_paths: Vec::new(),
            sandbox_max_threads: 64,
            sandbox_max_instances: 64,
            sandbox_memory_overhead: 512 << 20,
            sandbox_start_timeout: Duration::from_secs(10),
            cgroups: true,
            sandbox_cgroup_memory_overhead: 64 << 20,
            sandbox_spares: 2,
            gateway_controller_name: crate::gateway::DEFAULT_CONTROLLER_NAME.into(),
            gateway_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            gateway_drain: Duration::from_secs(10),
            gateway_port_retry: Duration::from_secs(2),
            gateway_header_read_timeout: Duration::from_secs(30),
            gateway_tls_handshake_timeout: Duration::from_secs(10),
            gateway_max_header_bytes: 64 << 10,
        }
    }
}

/// The host name, or "brink-node" when it cannot be read.
pub fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "brink-node".into())
}
