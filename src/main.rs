//! `brink`: the command line. Wiring only: every behaviour lives in the workspace crates.

mod client;
mod node_cmd;
mod oci_cmd;
mod probe_cmd;
mod server_cmd;
mod store_cmd;
mod table;
mod token_cmd;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// A mini kubelet for WebAssembly at the edge.
#[derive(Debug, Parser)]
#[command(
    name = "brink",
    version,
    about,
    propagate_version = true,
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a one-process Brink serving the example hello app (no registry needed).
    Up(node_cmd::UpArgs),
    /// Run a node agent.
    Node(node_cmd::NodeArgs),
    /// Publish a wasm file as a CNCF wasm OCI artifact (to a registry or `oci:PATH:TAG`).
    Push(oci_cmd::PushArgs),
    /// Fetch an artifact into the node's cache.
    Pull(oci_cmd::PullArgs),
    /// List resources from a node (`brink get pods`).
    Get(client::GetArgs),
    /// Print a container's logs.
    Logs(client::LogsArgs),
    /// Run a control-plane member: the replicated store and the Kubernetes API.
    Server(server_cmd::ServerArgs),
    /// Read and write a control-plane member's store (a debugging client).
    Store(store_cmd::StoreArgs),
    /// Run the scheduler against a site or cluster (every `brink server` leader runs one).
    Scheduler(server_cmd::SchedulerArgs),
    /// Run a native attack inside a pod sandbox and report what happened (for tests).
    #[command(hide = true)]
    SandboxProbe(probe_cmd::ProbeArgs),
    /// Run the chaos harness (not implemented yet).
    Chaos {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        rest: Vec<String>,
    },
}

/// Where state lives when `--data-dir` is not given: `$XDG_DATA_HOME/brink/NAME` or
/// `~/.local/share/brink/NAME`.
pub fn default_data_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("brink").join(name)
}

fn main() -> std::process::ExitCode {
    // A pod sandbox: it must build its jail while single-threaded, so it branches off
    // before anything (argument parsing included) could start a thread.
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(
            brink_node::sandbox::SANDBOX_SUBCOMMAND,
        ))
    {
        std::process::exit(brink_node::sandbox::sandbox_main());
    }
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    brink_node::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => node_cmd::up(args).await,
            Command::Node(args) => node_cmd::node(args).await,
            Command::Push(args) => oci_cmd::push(args).await,
            Command::Pull(args) => oci_cmd::pull(args).await,
            Command::Get(args) => client::get(args).await,
            Command::Logs(args) => client::logs(args).await,
            Command::SandboxProbe(args) => probe_cmd::probe(args).await,
            Command::Server(args) => server_cmd::server(args).await,
            Command::Store(args) => store_cmd::store(args).await,
            Command::Scheduler(args) => server_cmd::scheduler(args).await,
            Command::Chaos { .. } => Err(anyhow::anyhow!("`brink chaos` is not implemented yet")),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
