//! `brink sandbox-probe` (hidden): starts one sandbox exactly as a pod's is started (same
//! launch code, same jail, same seccomp filter) but running a native attack instead of
//! guests, and prints what happened as JSON lines. The attack tests drive it; it needs
//! root, like the node.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use brink_node::idranges::IdRanges;
use brink_node::logs::Stream;
use brink_node::runtime::OutboundPolicy;
use brink_node::sandbox::{Sandbox, SandboxEvents, SandboxPlan};
use brink_proto::sandbox::{Exited, SandboxMode};
use clap::Args;
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Where the ID-range records and the sandbox root live.
    #[arg(long)]
    data_dir: PathBuf,
    /// The pod uid the ID range is recorded under.
    #[arg(long, default_value = "probe")]
    pod_uid: String,
    #[arg(long, default_value_t = 1_000_000)]
    id_pool_base: u32,
    #[arg(long, default_value_t = 4096)]
    id_pool_ranges: u32,
    /// Run without a user namespace (as `hostUsers: true`).
    #[arg(long)]
    host_users: bool,
    /// A host directory to bind into the sandbox, `HOST:INSIDE`.
    #[arg(long = "bind")]
    binds: Vec<String>,
    #[arg(long, default_value_t = 64)]
    max_threads: u64,
    #[arg(long, default_value_t = 512 << 20)]
    max_data_bytes: u64,
    /// Put the sandbox in a cgroup with this memory limit, in bytes (as pods get).
    #[arg(long)]
    cgroup_memory: Option<u64>,
    /// The cgroup's pids limit (with `--cgroup-memory`).
    #[arg(long, default_value_t = 64)]
    cgroup_pids: u64,
    /// The attack: id, read PATH, write PATH, kill PID, ptrace PID, mount, unshare, bpf,
    /// keyctl, socket, fork, threads N, memory BYTES, idle (until stdin closes).
    attack: String,
    args: Vec<String>,
}

enum Event {
    Output(String),
    Exited(Exited),
}

struct ProbeEvents(mpsc::UnboundedSender<Event>);

impl SandboxEvents for ProbeEvents {
    fn output(&self, _container: &str, _stream: Stream, bytes: &[u8]) {
        let _ = self.0.send(Event::Output(
            String::from_utf8_lossy(bytes).trim_end().to_string(),
        ));
    }

    fn outbound_policy(&self, _container: &str) -> Option<OutboundPolicy> {
        None
    }

    fn unclaimed_exit(&self, exited: Exited) {
        let _ = self.0.send(Event::Exited(exited));
    }
}

fn emit(value: serde_json::Value) {
    println!("{value}");
}

pub async fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("create {}", args.data_dir.display()))?;
    let (path, base, count) = (
        args.data_dir.join("idranges"),
        args.id_pool_base,
        args.id_pool_ranges,
    );
    let ranges =
        Arc::new(tokio::task::spawn_blocking(move || IdRanges::open(&path, base, count)).await??);
    let ids = if args.host_users {
        None
    } else {
        let (ranges, uid) = (ranges.clone(), args.pod_uid.clone());
        Some(tokio::task::spawn_blocking(move || ranges.allocate(&uid)).await??)
    };
    let dirs = args
        .binds
        .iter()
        .map(|b| {
            let (host, inside) = b
                .split_once(':')
                .with_context(|| format!("--bind {b:?}: expected HOST:INSIDE"))?;
            Ok((PathBuf::from(host), inside.to_string(), false))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cgroup = match args.cgroup_memory {
        None => None,
        Some(memory_bytes) => {
            let name = brink_node::sandbox::cgroup::subtree_name(&args.data_dir);
            let cgroups =
                tokio::task::spawn_blocking(move || brink_node::sandbox::Cgroups::set_up(&name))
                    .await??;
            Some(brink_node::sandbox::CgroupPlan {
                cgroups: Arc::new(cgroups),
                name: args.pod_uid.clone(),
                limits: brink_node::sandbox::CgroupLimits {
                    memory_bytes,
                    pids: args.cgroup_pids,
                    cpu_millis: None,
                },
            })
        }
    };
    let plan = SandboxPlan {
        name: format!("probe/{}", args.pod_uid),
        root: args.data_dir.join("sandboxes").join(&args.pod_uid),
        ids,
        files: Vec::new(),
        dirs,
        hostname: "probe".into(),
        max_threads: args.max_threads,
        max_data_bytes: args.max_data_bytes,
        mode: SandboxMode::Probe {
            attack: args.attack.clone(),
            args: args.args.clone(),
        },
        cgroup,
        spares: None,
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let sandbox = Sandbox::launch(&plan, Arc::new(ProbeEvents(events_tx))).await?;
    emit(serde_json::json!({
        "event": "started",
        "pid": sandbox.pid,
        "first_id": ids.map(|r| r.first),
    }));
    let idle = args.attack == "idle";
    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    let end = loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Output(text)) => emit(serde_json::json!({"event": "output", "text": text})),
                Some(Event::Exited(exited)) => {
                    emit(serde_json::json!({"event": "exited", "code": exited.code}));
                    sandbox.kill();
                }
                None => {}
            },
            end = sandbox.ended() => break end,
            read = stdin.read(&mut sink), if idle => {
                if matches!(read, Ok(0) | Err(_)) {
                    sandbox.kill();
                }
            }
        }
    };
    // Output that raced the end.
    while let Ok(Event::Output(text)) = events.try_recv() {
        emit(serde_json::json!({"event": "output", "text": text}));
    }
    let signal = match end.process {
        Some(brink_node::sandbox::spawn::ProcessEnd::Signaled(s)) => Some(s),
        _ => None,
    };
    emit(serde_json::json!({
        "event": "end",
        "describe": end.describe(),
        "signal": signal,
        "seccomp_killed": end.seccomp_killed(),
        "oom_killed": end.oom_killed,
        "reason": end.reason(),
    }));
    if let Some(cgroup) = plan.cgroup {
        tokio::task::spawn_blocking(move || cgroup.cgroups.remove_subtree()).await?;
    }
    let uid = args.pod_uid.clone();
    tokio::task::spawn_blocking(move || ranges.release(&uid)).await??;
    Ok(())
}
