//! `brink server`: a control-plane member. Today a single voter (raft on sled, the store's
//! debugging API, `/readyz`, `/metrics`); joining voters over QUIC comes next (issue 5).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use brink_control::replica::{Replica, ReplicaSettings};
use clap::Args;

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Bootstrap a new cluster with this member as its only voter (the data directory
    /// must be new).
    #[arg(long)]
    init: bool,
    /// Join an existing cluster at ADDR (not implemented yet).
    #[arg(long, value_name = "ADDR")]
    join: Option<String>,
    /// Where the member keeps its raft log and store.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where the store API, /readyz and /metrics listen (plain HTTP: keep it on loopback).
    #[arg(long, default_value = "127.0.0.1:2380")]
    listen: SocketAddr,
    /// One raft tick.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    raft_tick: Duration,
    /// Ticks without a leader before a follower stands for election.
    #[arg(long, default_value_t = 10)]
    election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    #[arg(long, default_value_t = 2)]
    heartbeat_ticks: usize,
    /// The most proposals written and flushed together.
    #[arg(long, default_value_t = 4096)]
    max_batch: usize,
}

pub async fn server(args: ServerArgs) -> anyhow::Result<()> {
    if args.join.is_some() {
        anyhow::bail!(
            "`brink server --join` is not implemented yet: voters over QUIC are the next part of issue 5"
        );
    }
    anyhow::ensure!(!args.raft_tick.is_zero(), "--raft-tick must be positive");
    anyhow::ensure!(
        args.heartbeat_ticks >= 1 && args.election_ticks > args.heartbeat_ticks,
        "--election-ticks must be greater than --heartbeat-ticks (at least 1)"
    );
    anyhow::ensure!(args.max_batch >= 1, "--max-batch must be at least 1");
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| crate::default_data_dir("server"));
    let has_state = std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some());
    if args.init && has_state {
        anyhow::bail!(
            "--init: {} already holds a member's data; start it without --init",
            dir.display()
        );
    }
    if !args.init && !has_state {
        anyhow::bail!(
            "{} holds no member's data: bootstrap a cluster with --init",
            dir.display()
        );
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let settings = ReplicaSettings {
        id: 1,
        tick: args.raft_tick,
        election_ticks: args.election_ticks,
        heartbeat_ticks: args.heartbeat_ticks,
        max_batch: args.max_batch,
    };
    let open_dir = dir.clone();
    let replica = tokio::task::spawn_blocking(move || Replica::start(&open_dir, settings))
        .await?
        .with_context(|| format!("open {}", dir.display()))?;
    let replica = Arc::new(replica);
    tracing::info!(listen = %args.listen, dir = %dir.display(), "control-plane member serving");
    let api = tokio::spawn(brink_control::api::serve(listener, replica.clone()));
    crate::node_cmd::shutdown_signal().await;
    api.abort();
    let _ = api.await;
    match Arc::try_unwrap(replica) {
        Ok(replica) => tokio::task::spawn_blocking(move || replica.stop()).await??,
        Err(_) => tracing::warn!("requests still hold the store; leaving it to the OS"),
    }
    Ok(())
}
