//! `brink server`: a control-plane member. Raft on sled, QUIC with mutual TLS between
//! members, the Kubernetes API over HTTPS, and the store's debugging API with `/readyz`
//! and `/metrics`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use brink_control::member::{self, Start};
use brink_control::peers::pki::JoinToken;
use brink_control::settings::{MemberSettings, ReplicaSettings, TransportSettings};
use clap::Args;

/// `brink server`'s flags on their own, so `brink up` can start a member with them.
#[derive(Debug, clap::Parser)]
pub struct ServerFlags {
    #[command(flatten)]
    pub args: ServerArgs,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ServerArgs {
    #[command(subcommand)]
    pub command: Option<crate::token_cmd::ServerCommand>,
    /// Bootstrap a new cluster with this member as its only voter (the data directory
    /// must be new). Writes the site CA, an admin credential and a join token under
    /// DATA_DIR/pki.
    #[arg(long, conflicts_with = "join")]
    init: bool,
    /// Join the cluster a member of which listens (QUIC) at ADDR; needs --token.
    #[arg(long, value_name = "ADDR", requires = "token")]
    join: Option<String>,
    /// The join token (DATA_DIR/pki/join-token on any member).
    #[arg(long, env = "BRINK_JOIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where the member keeps its raft log, store and credentials.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where the store API, /readyz and /metrics listen (plain HTTP: keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:2379")]
    listen: SocketAddr,
    /// Where the Kubernetes API listens (HTTPS; client certificates under the site CA
    /// or bearer tokens).
    #[arg(long, default_value = "0.0.0.0:6443")]
    api_listen: SocketAddr,
    /// The address clients reach the Kubernetes API at (default: --api-listen, or the
    /// host of --advertise-peer with the API port when --api-listen is a wildcard).
    #[arg(long, value_name = "HOST:PORT")]
    advertise_api: Option<String>,
    /// Static bearer tokens for the Kubernetes API, one `token,user,uid[,"groups"]` per
    /// line (kube-apiserver's --token-auth-file format).
    #[arg(long, value_name = "FILE")]
    token_auth_file: Option<PathBuf>,
    /// Most open connections to the Kubernetes API (keep it below the file handle limit).
    #[arg(long, default_value_t = 2048)]
    api_max_connections: usize,
    /// Most open watches on this member's Kubernetes API.
    #[arg(long, default_value_t = 8192)]
    api_max_watches: usize,
    /// Changes a watcher may fall behind the watch cache before it is ended with 410 Gone
    /// (its client lists again); bounds what a client that stops reading costs.
    #[arg(long, default_value_t = 4096)]
    api_watch_lag: usize,
    /// How long a watch waits for its client to read the next event before ending the
    /// stream (the client resumes from the last resourceVersion it read).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    api_watch_stall: Duration,
    /// How many days the certificates signed for nodes are valid (they renew before).
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(i32).range(1..=3650))]
    node_certificate_days: i32,
    /// Where the QUIC endpoint for other members listens (UDP).
    #[arg(long, default_value = "127.0.0.1:2380")]
    peer_listen: SocketAddr,
    /// The address other members dial this one at (default: --peer-listen).
    #[arg(long, value_name = "HOST:PORT")]
    advertise_peer: Option<String>,
    /// One raft tick.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    raft_tick: Duration,
    /// Ticks without a leader before a follower stands for election (randomized up to
    /// twice this).
    #[arg(long, default_value_t = 10)]
    election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    #[arg(long, default_value_t = 2)]
    heartbeat_ticks: usize,
    /// The most proposals written and flushed together.
    #[arg(long, default_value_t = 4096)]
    max_batch: usize,
    /// How long a write or linearizable read waits before its caller is told the outcome
    /// is unknown.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    request_timeout: Duration,
    /// Raft messages queued for one peer before new ones are dropped.
    #[arg(long, default_value_t = 4096)]
    peer_queue: usize,
    /// Applied entries between two snapshots; each snapshot lets the raft log be
    /// truncated.
    #[arg(long, default_value_t = 10_000)]
    snapshot_entries: u64,
    /// Entries kept in the log behind a snapshot, so a member a little behind catches up
    /// from the log rather than by a whole snapshot.
    #[arg(long, default_value_t = 5_000)]
    catch_up_entries: u64,
    /// How often the leader compacts the store's history (0s: never); each compaction
    /// keeps at least one interval of history for watches to resume from.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    compact_interval: Duration,
    /// How often pods that fit no node are tried again when nothing changed (any node
    /// or pod change tries them at once).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    scheduler_retry: Duration,
    /// Pod bindings the scheduler has in flight at once.
    #[arg(long, default_value_t = 16)]
    scheduler_parallel_bindings: usize,
    /// Run no scheduler on this member (another one places pods: `brink scheduler`).
    #[arg(long)]
    disable_scheduler: bool,
    /// How long a node may go without renewing its Lease before it is marked
    /// Ready=Unknown and tainted unreachable.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "40s")]
    node_grace_period: Duration,
    /// How often the node controller looks at nodes and their pods.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    node_monitor_period: Duration,
    /// How long a pod stays on a not-ready or unreachable node before it is evicted,
    /// unless it says otherwise (the tolerations the API server adds to every pod).
    #[arg(long, default_value_t = 300)]
    default_toleration_seconds: u32,
    /// How often the controllers reconcile every object when nothing changed.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    controller_resync: Duration,
    /// How long a controller counts pods it created or deleted that its watch has not
    /// shown yet.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1m")]
    controller_expectation_timeout: Duration,
    /// The write-ahead log's size in bytes (made once, full of zeros, so a sync never
    /// writes metadata); when it fills, sled is made durable and the log starts over.
    #[arg(long, default_value_t = 16 << 20)]
    wal_bytes: u64,
}

pub async fn server(mut args: ServerArgs) -> anyhow::Result<()> {
    if let Some(command) = args.command.take() {
        return crate::token_cmd::run(command).await;
    }
    let member = start(args).await?;
    crate::node_cmd::shutdown_signal().await;
    member.stop().await
}

/// A running member: the store, the Kubernetes API, and the leader's scheduler and
/// controllers.
pub struct Member {
    /// The site CA and this member's credentials.
    pub pki: brink_control::peers::pki::MemberPki,
    /// Where this member's own API is reached from this host.
    pub local_api: SocketAddr,
    running: member::RunningMember,
    api_server: brink_control::apiserver::RunningApiServer,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Member {
    /// Stops the leader's loops, the API and the store, in that order.
    pub async fn stop(self) -> anyhow::Result<()> {
        for task in &self.tasks {
            task.abort();
        }
        self.api_server.stop();
        for task in self.tasks {
            let _ = task.await;
        }
        let running = self.running;
        tokio::task::spawn_blocking(move || running.stop()).await??;
        Ok(())
    }
}

/// Starts a member as `args` say.
pub async fn start(args: ServerArgs) -> anyhow::Result<Member> {
    let advertise = match &args.advertise_peer {
        Some(a) => a.clone(),
        None if args.peer_listen.ip().is_unspecified() => anyhow::bail!(
            "--peer-listen {} is a wildcard: say where other members reach this one with --advertise-peer",
            args.peer_listen
        ),
        None => args.peer_listen.to_string(),
    };
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| crate::default_data_dir("server"));
    let has_state = std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some());
    let how = match (&args.join, args.init) {
        (Some(_), _) | (None, true) if has_state => anyhow::bail!(
            "{} already holds a member's data; start it without --init or --join",
            dir.display()
        ),
        (Some(addr), _) => {
            let text = args.token.as_deref().unwrap_or_default();
            let token = JoinToken::parse(text).context("--token")?;
            Start::Join {
                addr: addr.clone(),
                token,
            }
        }
        (None, true) => Start::Init,
        (None, false) if !has_state => anyhow::bail!(
            "{} holds no member's data: bootstrap a cluster with --init, or join one with --join ADDR --token T",
            dir.display()
        ),
        (None, false) => Start::Restart,
    };
    let init = matches!(how, Start::Init);
    let settings = MemberSettings {
        data_dir: dir.clone(),
        peer_listen: args.peer_listen,
        advertise: advertise.clone(),
        replica: ReplicaSettings {
            id: 0,
            tick: args.raft_tick,
            election_ticks: args.election_ticks,
            heartbeat_ticks: args.heartbeat_ticks,
            max_batch: args.max_batch,
            request_timeout: args.request_timeout,
            snapshot_entries: args.snapshot_entries,
            catch_up_entries: args.catch_up_entries,
            compact_interval: args.compact_interval,
            wal_bytes: args.wal_bytes,
            ..ReplicaSettings::default()
        },
        transport: TransportSettings {
            peer_queue: args.peer_queue,
            ..TransportSettings::default()
        },
    };
    settings.check()?;
    anyhow::ensure!(
        !args.scheduler_retry.is_zero() && args.scheduler_parallel_bindings >= 1,
        "--scheduler-retry must be positive and --scheduler-parallel-bindings at least 1"
    );
    anyhow::ensure!(
        !args.controller_resync.is_zero() && !args.controller_expectation_timeout.is_zero(),
        "--controller-resync and --controller-expectation-timeout must be positive"
    );
    anyhow::ensure!(
        !args.node_grace_period.is_zero() && !args.node_monitor_period.is_zero(),
        "--node-grace-period and --node-monitor-period must be positive"
    );
    anyhow::ensure!(
        args.api_max_connections >= 1
            && args.api_max_watches >= 1
            && args.api_watch_lag >= 1
            && !args.api_watch_stall.is_zero(),
        "--api-max-connections, --api-max-watches, --api-watch-lag and --api-watch-stall must be positive"
    );
    let advertise_api = match &args.advertise_api {
        Some(a) => a.clone(),
        None if args.api_listen.ip().is_unspecified() => {
            let host = advertise
                .rsplit_once(':')
                .map_or(advertise.as_str(), |(h, _)| h);
            format!("{host}:{}", args.api_listen.port())
        }
        None => args.api_listen.to_string(),
    };
    let tokens = match &args.token_auth_file {
        Some(path) => brink_control::apiserver::Tokens::read(path)?,
        None => brink_control::apiserver::Tokens::default(),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    let api_listener = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("--api-listen {}", args.api_listen))?;
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let running = member::start(settings, how)
        .await
        .with_context(|| format!("start the member in {}", dir.display()))?;
    let kubeconfig = if init {
        let admin = running
            .pki
            .ca
            .issue_api_client("brink-admin", &["system:masters"])?;
        let text = brink_control::peers::pki::kubeconfig(
            &running.pki.ca.cert_pem,
            std::slice::from_ref(&advertise_api),
            "brink-admin",
            &admin,
        );
        Some(brink_control::peers::pki::write_secret_file(
            &dir,
            "admin.kubeconfig",
            &text,
        )?)
    } else {
        None
    };
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
    ];
    let host = advertise_api
        .rsplit_once(':')
        .map_or(advertise_api.as_str(), |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_owned();
    for name in [host, args.api_listen.ip().to_string()] {
        if !names.contains(&name) && name != "0.0.0.0" && name != "::" {
            names.push(name);
        }
    }
    let tls = running.pki.api_server_config(names)?;
    let api_server = brink_control::apiserver::start(
        api_listener,
        tls,
        running.replica.clone(),
        brink_control::apiserver::ApiServerSettings {
            advertise: advertise_api.clone(),
            max_connections: args.api_max_connections,
            max_watches: args.api_max_watches,
            watch_stall: args.api_watch_stall,
            cache: brink_control::apiserver::CacheSettings {
                broadcast: args.api_watch_lag,
                ..Default::default()
            },
            node_certificate_days: args.node_certificate_days,
            default_toleration_seconds: i64::from(args.default_toleration_seconds),
            ..Default::default()
        },
        tokens,
        Some(running.pki.ca.clone()),
    );
    // The scheduler is an API client of this member, with its own identity (RBAC's
    // system:kube-scheduler), and runs while this member leads.
    let local_api = match args.api_listen.ip() {
        ip if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], args.api_listen.port())),
        _ => args.api_listen,
    };
    let scheduler_client = in_process_client(
        &running.pki,
        &local_api.to_string(),
        "system:kube-scheduler",
        &[],
    )
    .await?;
    let replica = running.replica.clone();
    let disabled = args.disable_scheduler;
    let scheduler = tokio::spawn(brink_control::scheduler::run_while_leading(
        scheduler_client,
        brink_control::scheduler::SchedulerSettings {
            retry: args.scheduler_retry,
            parallel_bindings: args.scheduler_parallel_bindings,
            ..Default::default()
        },
        move || !disabled && replica.is_leader(),
    ));
    let controllers_client = in_process_client(
        &running.pki,
        &local_api.to_string(),
        "system:kube-controller-manager",
        &[],
    )
    .await?;
    let replica = running.replica.clone();
    let controllers = tokio::spawn(brink_control::controllers::run_while_leading(
        controllers_client,
        brink_control::controllers::ControllerSettings {
            resync: args.controller_resync,
            expectation_timeout: args.controller_expectation_timeout,
            node_lifecycle: brink_control::controllers::nodelifecycle::NodeLifecycleSettings {
                grace: args.node_grace_period,
                period: args.node_monitor_period,
            },
            ..Default::default()
        },
        move || replica.is_leader(),
    ));
    if let Some(path) = &kubeconfig {
        eprintln!(
            "brink: the Kubernetes API is at https://{advertise_api}; use it with\n  export KUBECONFIG={}",
            path.display()
        );
    }
    if init {
        eprintln!(
            "brink: a new cluster; other members join with\n  brink server --join {advertise} --token \"$(cat {})\"",
            brink_control::peers::pki::pki_dir(&dir)
                .join("join-token")
                .display()
        );
    }
    tracing::info!(
        member = running.id,
        listen = %args.listen,
        api = %advertise_api,
        peer = %advertise,
        dir = %dir.display(),
        "control-plane member serving"
    );
    let api = tokio::spawn(brink_control::store_api::serve(
        listener,
        brink_control::store_api::ApiState {
            replica: running.replica.clone(),
            transport: Some(running.transport.metrics.clone()),
        },
    ));
    Ok(Member {
        pki: running.pki.clone(),
        local_api,
        running,
        api_server,
        tasks: vec![scheduler, controllers, api],
    })
}

/// A client of this member's own API with a certificate for `user` under the site CA,
/// made at start and kept in memory only.
pub async fn in_process_client(
    pki: &brink_control::peers::pki::MemberPki,
    server: &str,
    user: &str,
    groups: &[&str],
) -> anyhow::Result<kube::Client> {
    let credential = pki.ca.issue_api_client(user, groups)?;
    let text = brink_control::peers::pki::kubeconfig(
        &pki.ca.cert_pem,
        &[server.to_owned()],
        user,
        &credential,
    );
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&text).context("in-process kubeconfig")?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .context("in-process kubeconfig")?;
    kube::Client::try_from(config).context("in-process client")
}

#[derive(Debug, Args)]
pub struct SchedulerArgs {
    /// The kubeconfig to schedule with (it needs system:kube-scheduler's rights).
    #[arg(long, value_name = "FILE")]
    kubeconfig: PathBuf,
    /// How often pods that fit no node are tried again when nothing changed.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    retry: Duration,
    /// Pod bindings in flight at once.
    #[arg(long, default_value_t = 16)]
    parallel_bindings: usize,
}

/// `brink scheduler`: the scheduler loop alone, as kube-scheduler runs beside an API
/// server. Two may run at once: a pod is still bound only once.
pub async fn scheduler(args: SchedulerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.retry.is_zero() && args.parallel_bindings >= 1,
        "--retry must be positive and --parallel-bindings at least 1"
    );
    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("read {}", args.kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .with_context(|| format!("use {}", args.kubeconfig.display()))?;
    let client = kube::Client::try_from(config).context("a client for the API")?;
    let settings = brink_control::scheduler::SchedulerSettings {
        retry: args.retry,
        parallel_bindings: args.parallel_bindings,
        ..Default::default()
    };
    tokio::select! {
        () = brink_control::scheduler::run(client, settings) => {}
        () = crate::node_cmd::shutdown_signal() => {}
    }
    Ok(())
}
