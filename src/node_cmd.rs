//! `brink node` and `brink up`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use brink_node::source::ManifestDir;
use brink_node::{Agent, NodeSettings};
use clap::Args;

/// Settings shared by `node` and `up`; each one is a `NodeSettings` field.
#[derive(Debug, Args)]
pub struct NodeFlags {
    /// Where the node keeps its cache, compiled artifacts and logs.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The node's name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// Address of the kubelet-style endpoint (/healthz, /pods, /containerLogs, /metrics).
    #[arg(long, default_value = "127.0.0.1:10250")]
    kubelet_addr: SocketAddr,
    /// Address host ports bind to when a port names no hostIP.
    #[arg(long, default_value = "0.0.0.0")]
    host_port_address: IpAddr,
    /// A registry (host:port) to reach over plain HTTP; loopback ones always are.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// How often the manifest directory is re-read.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    manifest_poll_interval: Duration,
    /// How long one HTTP request may run in a guest before it gets a 504.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    request_deadline: Duration,
    /// Resolution of the guest CPU deadline.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10ms")]
    epoch_tick: Duration,
    /// Guest instances alive at once (pooling allocator slots).
    #[arg(long, default_value_t = 1000)]
    max_instances: u32,
    /// Largest linear memory of one guest, in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    max_guest_memory: u64,
    /// Memory cap of containers without resources.limits.memory, in bytes.
    #[arg(long, default_value_t = 256 << 20)]
    default_guest_memory: u64,
    /// First wait after a failed pull (doubles up to --backoff-max).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    image_pull_backoff: Duration,
    /// First wait before restarting a crashed container (doubles up to --backoff-max).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    crash_loop_backoff: Duration,
    /// Ceiling of both back-offs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    backoff_max: Duration,
    /// Rotate a container log past this many bytes.
    #[arg(long, default_value_t = 10 << 20)]
    log_max_file_bytes: u64,
    /// Log files kept per container.
    #[arg(long, default_value_t = 5)]
    log_max_files: usize,
    /// Where guests run: `sandbox` (one user-namespaced process per pod) or `in-process`
    /// (inside the agent, isolated by wasmtime alone; for benchmarks and debugging).
    #[arg(long, value_enum, default_value_t = IsolationFlag::Sandbox)]
    isolation: IsolationFlag,
    /// First host uid/gid of the pool pods' user-namespace ranges come from.
    #[arg(long, default_value_t = 1_000_000)]
    id_pool_base: u32,
    /// Number of 65,536-ID ranges in the pool (the most sandboxed pods at once).
    #[arg(long, default_value_t = 4096)]
    id_pool_ranges: u32,
    /// Let pods ask for `hostUsers: true` (no user namespace).
    #[arg(long)]
    allow_host_users: bool,
    /// Let pods mount `hostPath` volumes under this directory (repeat for several).
    #[arg(long = "allow-host-path", value_name = "DIR")]
    allow_host_paths: Vec<PathBuf>,
    /// Threads one sandbox may have.
    #[arg(long, default_value_t = 64)]
    sandbox_max_threads: u64,
    /// Guest instances alive at once in one sandbox.
    #[arg(long, default_value_t = 64)]
    sandbox_max_instances: u32,
    /// Writable memory a sandbox may map beyond its containers' memory limits, in bytes.
    #[arg(long, default_value_t = 512 << 20)]
    sandbox_memory_overhead: u64,
    /// How long a new sandbox may take to start.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    sandbox_start_timeout: Duration,
    /// cgroup limits for sandboxes: `auto` uses v2, or v1 on hybrid hosts, where the
    /// agent may create cgroups; `off` relies on rlimits alone.
    #[arg(long, value_enum, default_value = "auto")]
    cgroups: CgroupsArg,
    /// Memory a sandbox's cgroup allows beyond its containers' limits, in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    sandbox_cgroup_memory_overhead: u64,
    /// Sandbox processes kept started ahead of need, so a pod's start skips the exec and
    /// the move into a cgroup (0: none).
    #[arg(long, default_value_t = 2)]
    sandbox_spares: usize,
    /// The address Gateway listeners open on.
    #[arg(long, default_value = "0.0.0.0")]
    gateway_address: IpAddr,
    /// GatewayClasses with this controllerName are served by this node.
    #[arg(long, default_value = brink_node::gateway::DEFAULT_CONTROLLER_NAME)]
    gateway_controller_name: String,
    /// How long a gateway port that closes gives its open connections to finish.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    gateway_drain: std::time::Duration,
    /// How long a gateway port that another process holds waits before the next try.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    gateway_port_retry: std::time::Duration,
    /// How long an HTTP/1.1 client of a gateway port may take to send its headers (0s: no
    /// limit).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    gateway_header_read_timeout: std::time::Duration,
    /// How long a TLS handshake on an HTTPS gateway port may take.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    gateway_tls_handshake_timeout: std::time::Duration,
    /// The most header bytes a request to a gateway port may carry (8 KiB at least).
    #[arg(long, default_value_t = 64 << 10)]
    gateway_max_header_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CgroupsArg {
    Auto,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum IsolationFlag {
    Sandbox,
    InProcess,
}

impl NodeFlags {
    fn settings(&self, default_dir: &str) -> anyhow::Result<NodeSettings> {
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| crate::default_data_dir(default_dir));
        // Sandboxes resolve their root and volumes after they change directory: every
        // path the node hands out must be absolute.
        let data_dir = std::path::absolute(&data_dir)
            .with_context(|| format!("--data-dir {}", data_dir.display()))?;
        let mut s = NodeSettings::new(data_dir);
        if let Some(name) = &self.node_name {
            anyhow::ensure!(
                brink_proto::meta::is_dns_subdomain(name),
                "--node-name {name:?} is not a valid node name"
            );
            s.node_name = name.clone();
        }
        anyhow::ensure!(self.max_instances > 0, "--max-instances must be at least 1");
        anyhow::ensure!(!self.epoch_tick.is_zero(), "--epoch-tick must be positive");
        anyhow::ensure!(self.log_max_files > 0, "--log-max-files must be at least 1");
        anyhow::ensure!(
            self.default_guest_memory <= self.max_guest_memory,
            "--default-guest-memory must not exceed --max-guest-memory"
        );
        s.kubelet_addr = self.kubelet_addr;
        s.host_port_address = self.host_port_address;
        s.insecure_registries = self.insecure_registries.clone();
        s.manifest_poll_interval = self.manifest_poll_interval;
        s.request_deadline = self.request_deadline;
        s.epoch_tick = self.epoch_tick;
        s.max_instances = self.max_instances;
        s.max_guest_memory = self.max_guest_memory;
        s.default_guest_memory = self.default_guest_memory;
        s.image_pull_backoff_initial = self.image_pull_backoff;
        s.crash_loop_backoff_initial = self.crash_loop_backoff;
        s.backoff_max = self.backoff_max;
        s.log_max_file_bytes = self.log_max_file_bytes;
        s.log_max_files = self.log_max_files;
        anyhow::ensure!(
            self.id_pool_ranges > 0,
            "--id-pool-ranges must be at least 1"
        );
        anyhow::ensure!(
            u64::from(self.id_pool_base) + u64::from(self.id_pool_ranges) * 65_536
                <= u64::from(u32::MAX),
            "--id-pool-base plus --id-pool-ranges ranges of 65,536 IDs must fit in 32-bit IDs"
        );
        anyhow::ensure!(
            self.id_pool_base > 0,
            "--id-pool-base must not be 0: uid 0 outside is the host's root"
        );
        anyhow::ensure!(
            self.sandbox_max_threads >= 8,
            "--sandbox-max-threads must be at least 8 (the sandbox's own runtime needs some)"
        );
        anyhow::ensure!(
            self.sandbox_max_instances > 0,
            "--sandbox-max-instances must be at least 1"
        );
        s.isolation = match self.isolation {
            IsolationFlag::Sandbox => brink_node::settings::Isolation::Sandbox,
            IsolationFlag::InProcess => brink_node::settings::Isolation::InProcess,
        };
        s.id_pool_base = self.id_pool_base;
        s.id_pool_ranges = self.id_pool_ranges;
        s.allow_host_users = self.allow_host_users;
        for dir in &self.allow_host_paths {
            if !dir.is_absolute() {
                anyhow::bail!(
                    "--allow-host-path {}: must be an absolute path",
                    dir.display()
                );
            }
        }
        s.allowed_host_paths = self.allow_host_paths.clone();
        s.sandbox_max_threads = self.sandbox_max_threads;
        s.sandbox_max_instances = self.sandbox_max_instances;
        s.sandbox_memory_overhead = self.sandbox_memory_overhead;
        s.sandbox_start_timeout = self.sandbox_start_timeout;
        s.cgroups = self.cgroups == CgroupsArg::Auto;
        s.sandbox_cgroup_memory_overhead = self.sandbox_cgroup_memory_overhead;
        s.sandbox_spares = self.sandbox_spares;
        anyhow::ensure!(
            !self.gateway_controller_name.is_empty() && self.gateway_controller_name.contains('/'),
            "--gateway-controller-name must look like a domain-prefixed path (example.com/name)"
        );
        s.gateway_controller_name = self.gateway_controller_name.clone();
        s.gateway_address = self.gateway_address;
        s.gateway_drain = self.gateway_drain;
        anyhow::ensure!(
            !self.gateway_port_retry.is_zero(),
            "--gateway-port-retry must be positive"
        );
        s.gateway_port_retry = self.gateway_port_retry;
        anyhow::ensure!(
            !self.gateway_tls_handshake_timeout.is_zero(),
            "--gateway-tls-handshake-timeout must be positive"
        );
        anyhow::ensure!(
            (8 << 10..=16 << 20).contains(&self.gateway_max_header_bytes),
            "--gateway-max-header-bytes must be between 8 KiB and 16 MiB"
        );
        s.gateway_header_read_timeout = self.gateway_header_read_timeout;
        s.gateway_tls_handshake_timeout = self.gateway_tls_handshake_timeout;
        s.gateway_max_header_bytes = self.gateway_max_header_bytes;
        Ok(s)
    }
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Run the Pod manifests in this directory, following changes to it.
    #[arg(long)]
    manifests: Option<PathBuf>,
    #[command(flatten)]
    site: SiteFlags,
    #[command(flatten)]
    flags: NodeFlags,
}

/// Joining a site (or a Kubernetes cluster) and heartbeating to it.
#[derive(Debug, Args)]
pub struct SiteFlags {
    /// Join the site whose API is at this URL (https://HOST:6443), with --token and
    /// --discovery-token-ca-cert-hash; the node's credential is kept in
    /// DATA_DIR/kubeconfig, so later starts need neither.
    #[arg(long, value_name = "URL", requires_all = ["token", "discovery_token_ca_cert_hash"], conflicts_with = "kubeconfig")]
    server: Option<String>,
    /// A bootstrap token (`brink server token create`).
    #[arg(long, env = "BRINK_NODE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The site CA's pin, `sha256:<hex>` (printed by `brink server token create
    /// --print-join-command`).
    #[arg(long, value_name = "sha256:HEX")]
    discovery_token_ca_cert_hash: Option<String>,
    /// Use this kubeconfig's credential instead of joining with a token.
    #[arg(long, value_name = "FILE", conflicts_with = "in_cluster")]
    kubeconfig: Option<PathBuf>,
    /// Use the pod's ServiceAccount (running as a virtual kubelet inside a cluster; see
    /// deploy/).
    #[arg(long, conflicts_with = "server")]
    in_cluster: bool,
    /// How long to wait for the site to sign the node's certificate.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    join_timeout: std::time::Duration,
    /// How often the node renews its Lease in kube-node-lease.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    node_lease_renew: std::time::Duration,
    /// How often the node writes its status when nothing changed.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    node_status_report: std::time::Duration,
    /// The most pods the node runs (its capacity.pods).
    #[arg(long, default_value_t = 110)]
    max_pods: u32,
    /// Taints the node registers with, `key[=value]:Effect,...` (joined to a cluster
    /// that also runs containers: `runtime.brink.dev/wasm=true:NoSchedule`, so only pods
    /// of the `brink` RuntimeClass land here).
    #[arg(long, value_name = "TAINTS", value_parser = brink_node::registration::parse_taints)]
    register_with_taints: Option<std::vec::Vec<k8s_openapi::api::core::v1::Taint>>,
    /// How often the node looks again whether it is the one that writes Gateway API
    /// status, and whether a write is due, when its data plane has nothing new.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    gateway_status_recheck: std::time::Duration,
}

impl SiteFlags {
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.join_timeout.is_zero()
                && !self.node_lease_renew.is_zero()
                && !self.node_status_report.is_zero()
                && !self.gateway_status_recheck.is_zero(),
            "--join-timeout, --node-lease-renew, --node-status-report and --gateway-status-recheck must be positive"
        );
        if self.server.is_some() {
            brink_proto::bootstrap::BootstrapToken::parse(self.token.as_deref().unwrap_or(""))
                .context("--token")?;
            let pin = self.discovery_token_ca_cert_hash.as_deref().unwrap_or("");
            anyhow::ensure!(
                pin.len() == 71
                    && pin.starts_with("sha256:")
                    && pin[7..].bytes().all(|b| b.is_ascii_hexdigit()),
                "--discovery-token-ca-cert-hash must be sha256: and 64 hex digits"
            );
        }
        Ok(())
    }

    /// The kubeconfig the node uses for the site, joining first if it has none yet.
    async fn kubeconfig(&self, settings: &NodeSettings) -> anyhow::Result<Option<PathBuf>> {
        if let Some(path) = &self.kubeconfig {
            return Ok(Some(path.clone()));
        }
        let Some(server) = &self.server else {
            return Ok(None);
        };
        let path = settings.data_dir.join("kubeconfig");
        if path.exists() {
            tracing::info!(kubeconfig = %path.display(), "joined before; using the node's own credential");
            return Ok(Some(path));
        }
        // check() has vetted both.
        let token =
            brink_proto::bootstrap::BootstrapToken::parse(self.token.as_deref().unwrap_or(""))
                .context("--token")?;
        let pin = self
            .discovery_token_ca_cert_hash
            .clone()
            .unwrap_or_default();
        let join = brink_node::join::JoinSettings {
            server: server.trim_end_matches('/').to_owned(),
            token,
            ca_pin: pin,
            node_name: settings.node_name.clone(),
            timeout: self.join_timeout,
            poll: std::time::Duration::from_millis(500),
        };
        let joined = brink_node::join::join(&join)
            .await
            .context("join the site")?;
        let text = brink_node::join::kubeconfig(&joined, &settings.node_name);
        brink_node::join::write_kubeconfig(&path, &text)?;
        eprintln!(
            "brink: joined {server} as system:node:{}; credential in {}",
            settings.node_name,
            path.display()
        );
        Ok(Some(path))
    }
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Port of the Gateway listener the example hello app is served through.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Where the one-member site's Kubernetes API listens (kubectl reaches it there).
    #[arg(long, default_value = "127.0.0.1:6443")]
    api_listen: std::net::SocketAddr,
    /// Where the member's store API and /metrics listen.
    #[arg(long, default_value = "127.0.0.1:2379")]
    store_listen: std::net::SocketAddr,
    /// Where the member's QUIC endpoint listens (no other member ever dials it).
    #[arg(long, default_value = "127.0.0.1:2380")]
    peer_listen: std::net::SocketAddr,
    #[command(flatten)]
    flags: NodeFlags,
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

async fn run_manifests(settings: NodeSettings, manifests: PathBuf) -> anyhow::Result<()> {
    anyhow::ensure!(
        manifests.is_dir(),
        "--manifests {}: not a directory",
        manifests.display()
    );
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("create {}", settings.data_dir.display()))?;
    let poll = settings.manifest_poll_interval;
    let source = ManifestDir::new(manifests, poll, &settings.data_dir.join("gateway"));
    let agent = Agent::new(settings)?;
    agent.run(source, shutdown_signal()).await?;
    Ok(())
}

pub async fn node(args: NodeArgs) -> anyhow::Result<()> {
    let settings = args.flags.settings("node")?;
    // Every flag is checked before anything is written.
    if let Some(manifests) = &args.manifests {
        anyhow::ensure!(
            manifests.is_dir(),
            "--manifests {}: not a directory",
            manifests.display()
        );
    }
    args.site.check()?;
    anyhow::ensure!(
        args.manifests.is_some()
            || args.site.server.is_some()
            || args.site.kubeconfig.is_some()
            || args.site.in_cluster,
        "say where pods come from: --manifests DIR, or a site (--server URL --token T --discovery-token-ca-cert-hash H, --kubeconfig FILE or --in-cluster)"
    );
    // Read before anything is written: outside a pod it is a flag error.
    let in_cluster = match args.site.in_cluster {
        true => Some(
            kube::Config::incluster()
                .context("--in-cluster: not inside a pod with a ServiceAccount")?,
        ),
        false => None,
    };
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("create {}", settings.data_dir.display()))?;
    let site = if let Some(config) = in_cluster {
        Some(kube::Client::try_from(config).context("a client for the cluster")?)
    } else {
        match args.site.kubeconfig(&settings).await? {
            Some(path) => Some(client_from(&path).await?),
            None => None,
        }
    };
    let registration = args.site.registration(&settings);
    match (args.manifests, site) {
        (Some(manifests), site) => {
            let heartbeat = site.map(|client| {
                tracing::warn!(
                    "--manifests with a site: the node runs the manifests' pods only; mirror pods on the site are not implemented yet"
                );
                tokio::spawn(brink_node::registration::run(
                    client,
                    registration,
                    shutdown_signal(),
                ))
            });
            let result = run_manifests(settings, manifests).await;
            if let Some(task) = heartbeat {
                task.abort();
            }
            result
        }
        (None, Some(client)) => {
            run_on_site(
                settings,
                client,
                registration,
                args.site.gateway_status_recheck,
            )
            .await
        }
        (None, None) => anyhow::bail!("no pods to run and no site to join"),
    }
}

/// A client from a kubeconfig file.
async fn client_from(path: &std::path::Path) -> anyhow::Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("read {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .with_context(|| format!("use {}", path.display()))?;
    kube::Client::try_from(config).context("a client for the site")
}

impl SiteFlags {
    fn registration(
        &self,
        settings: &NodeSettings,
    ) -> brink_node::registration::RegistrationSettings {
        let address = match settings.host_port_address {
            ip if ip.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
            ip => ip,
        };
        brink_node::registration::RegistrationSettings {
            node_name: settings.node_name.clone(),
            address,
            max_pods: self.max_pods,
            kubelet_port: settings.kubelet_addr.port(),
            lease_renew: self.node_lease_renew,
            status_report: self.node_status_report,
            taints: self.register_with_taints.clone().unwrap_or_default(),
        }
    }
}

/// A node joined to a site: it registers and heartbeats, runs the pods the site binds to
/// it, serves the site's Gateways and writes their status, until Ctrl-C or SIGTERM.
async fn run_on_site(
    settings: NodeSettings,
    client: kube::Client,
    registration: brink_node::registration::RegistrationSettings,
    gateway_status_recheck: std::time::Duration,
) -> anyhow::Result<()> {
    let heartbeat = tokio::spawn(brink_node::registration::run(
        client.clone(),
        registration,
        shutdown_signal(),
    ));
    let source = brink_node::source::kube::SiteSettings::new(&settings.node_name);
    let node_name = settings.node_name.clone();
    let (pods, status) = brink_node::source::kube::start(client.clone(), source);
    let agent = Agent::with_status(settings, status)?;
    let gateway_status = tokio::spawn(brink_node::source::gateway_status::run(
        client,
        agent.ctx.gateway.clone(),
        brink_node::source::gateway_status::GatewayStatusSettings {
            node_name,
            recheck: gateway_status_recheck,
        },
    ));
    let result = agent.run(pods, shutdown_signal()).await;
    gateway_status.abort();
    heartbeat.abort();
    result?;
    Ok(())
}

/// The hello app as `brink up` applies it: a Deployment, its Service, and the Gateway
/// API objects it is reached through.
fn up_objects(image: &str, port: u16, controller: &str) -> Vec<serde_json::Value> {
    use serde_json::json;
    vec![
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "hello", "namespace": "default"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "hello"}},
                 "template": {"metadata": {"labels": {"app": "hello"}},
                              "spec": {"containers": [{
                                  "name": "hello", "image": image,
                                  "env": [{"name": "GREETING", "value": "Hello"},
                                          {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                                  "ports": [{"containerPort": 8080}],
                                  "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 5},
                              }]}}}}),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "hello", "namespace": "default"},
               "spec": {"selector": {"app": "hello"}, "ports": [{"port": 80, "targetPort": 8080}]}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
               "metadata": {"name": "brink"}, "spec": {"controllerName": controller}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "brink", "namespace": "default"},
               "spec": {"gatewayClassName": "brink",
                        "listeners": [{"name": "http", "port": port, "protocol": "HTTP"}]}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"name": "hello", "namespace": "default"},
               "spec": {"parentRefs": [{"name": "brink"}],
                        "rules": [{"backendRefs": [{"name": "hello", "port": 80}]}]}}),
    ]
}

/// Applies `objects` server-side as `brink up`, retrying while the new site's API comes up.
async fn apply_objects(client: &kube::Client, objects: &[serde_json::Value]) -> anyhow::Result<()> {
    use kube::api::{Api, DynamicObject, Patch, PatchParams};
    use kube::discovery::ApiResource;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for object in objects {
        let (group, version) = match object["apiVersion"]
            .as_str()
            .unwrap_or("v1")
            .split_once('/')
        {
            Some((g, v)) => (g.to_owned(), v.to_owned()),
            None => (
                String::new(),
                object["apiVersion"].as_str().unwrap_or("v1").to_owned(),
            ),
        };
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let plural = match kind.as_str() {
            "GatewayClass" => "gatewayclasses".to_owned(),
            other => format!("{}s", other.to_lowercase()),
        };
        let resource = ApiResource {
            group: group.clone(),
            version: version.clone(),
            api_version: object["apiVersion"].as_str().unwrap_or("v1").to_owned(),
            kind,
            plural,
        };
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        let params = PatchParams::apply("brink-up").force();
        loop {
            match api.patch(&name, &params, &Patch::Apply(object)).await {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "the site is not ready yet");
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e).context(format!("apply {name}")),
            }
        }
    }
    Ok(())
}

/// The hello example, built by build.rs and embedded so `brink up` needs nothing else.
const HELLO_WASM: &[u8] = include_bytes!(concat!(env!("BRINK_EXAMPLES_DIR"), "/hello.wasm"));

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let mut settings = args.flags.settings("up")?;
    if args.flags.host_port_address.is_unspecified() {
        // A demo on one machine: keep it off the network unless asked.
        settings.host_port_address = IpAddr::from([127, 0, 0, 1]);
    }
    if args.flags.gateway_address.is_unspecified() {
        settings.gateway_address = IpAddr::from([127, 0, 0, 1]);
    }
    let data = settings.data_dir.clone();
    let layout = data.join("examples");
    std::fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
    let layout_for_write = layout.clone();
    tokio::task::spawn_blocking(move || {
        brink_node::oci::layout::write_artifact(&layout_for_write, "hello", HELLO_WASM.to_vec())
    })
    .await??;
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if !root && settings.isolation == brink_node::settings::Isolation::Sandbox {
        eprintln!(
            "brink up: not running as root, so pods cannot get their user-namespaced sandbox \
             and will be refused (UserNamespacesUnavailable). Run it as root, or pass \
             --isolation in-process to run the guests inside this process instead.\n"
        );
    }
    // The site: one member, started fresh the first time and resumed after.
    let server_dir = data.join("server");
    let fresh = !std::fs::read_dir(&server_dir).is_ok_and(|mut d| d.next().is_some());
    let mut server_args = vec![
        "brink-up-server".to_owned(),
        "--data-dir".to_owned(),
        server_dir.display().to_string(),
        "--api-listen".to_owned(),
        args.api_listen.to_string(),
        "--listen".to_owned(),
        args.store_listen.to_string(),
        "--peer-listen".to_owned(),
        args.peer_listen.to_string(),
    ];
    if fresh {
        server_args.push("--init".to_owned());
    }
    let server_flags =
        <crate::server_cmd::ServerFlags as clap::Parser>::try_parse_from(&server_args)
            .context("the site's settings")?;
    let member = crate::server_cmd::start(server_flags.args).await?;
    let api = member.local_api.to_string();
    let admin =
        crate::server_cmd::in_process_client(&member.pki, &api, "brink-admin", &["system:masters"])
            .await?;
    let node_user = format!("system:node:{}", settings.node_name);
    let node_client =
        crate::server_cmd::in_process_client(&member.pki, &api, &node_user, &["system:nodes"])
            .await?;
    let image = format!("oci:{}:hello", layout.display());
    apply_objects(
        &admin,
        &up_objects(&image, args.port, &settings.gateway_controller_name),
    )
    .await?;
    let kubeconfig = brink_control::peers::pki::pki_dir(&server_dir).join("admin.kubeconfig");
    let host = settings.gateway_address;
    eprintln!(
        "brink up: a one-member site with this machine as its node, serving the hello Deployment through the Gateway \"brink\"; try:\n\n    curl http://{host}:{}/\n    export KUBECONFIG={}\n    kubectl get pods,deployments,gateways\n\nstop: Ctrl-C\n",
        args.port,
        kubeconfig.display()
    );
    let registration = brink_node::registration::RegistrationSettings {
        node_name: settings.node_name.clone(),
        address: settings.host_port_address,
        max_pods: 110,
        kubelet_port: settings.kubelet_addr.port(),
        lease_renew: std::time::Duration::from_secs(10),
        status_report: std::time::Duration::from_secs(300),
        taints: Vec::new(),
    };
    let result = run_on_site(
        settings,
        node_client,
        registration,
        std::time::Duration::from_secs(2),
    )
    .await;
    member.stop().await?;
    result
}
