//! `brink push` and `brink pull`.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use brink_node::images::{ImageService, PullPolicy};
use brink_node::metrics::Metrics;
use brink_node::oci::registry::RegistryClient;
use brink_node::oci::{ImageRef, layout};
use brink_node::{NodeSettings, cache::BlobSource};
use clap::Args;

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The wasm component or module to publish.
    file: PathBuf,
    /// Where to: `registry/repo:tag` or `oci:PATH:TAG`.
    reference: String,
    /// A registry (host:port) to reach over plain HTTP; loopback ones always are.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// Connect and read timeout for the registry.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    timeout: Duration,
}

pub async fn push(args: PushArgs) -> anyhow::Result<()> {
    let wasm = tokio::fs::read(&args.file)
        .await
        .with_context(|| format!("read {}", args.file.display()))?;
    let reference: ImageRef = args.reference.parse()?;
    let digest = match reference {
        ImageRef::Registry(r) => {
            let client = RegistryClient::new(
                r.resolve_registry(),
                &args.insecure_registries,
                args.timeout,
            );
            client.push(&r, wasm).await?
        }
        ImageRef::Layout { path, tag, digest } => {
            anyhow::ensure!(
                digest.is_none(),
                "push to a layout takes a tag, not a digest"
            );
            let tag = tag.unwrap_or_else(|| "latest".into());
            tokio::task::spawn_blocking(move || layout::write_artifact(&path, &tag, wasm)).await??
        }
    };
    println!("{digest}");
    Ok(())
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// What to pull: `registry/repo:tag`, `registry/repo@sha256:…` or `oci:PATH:TAG`.
    reference: String,
    /// The node data directory whose cache receives the artifact.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A registry (host:port) to reach over plain HTTP; loopback ones always are.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
}

pub async fn pull(args: PullArgs) -> anyhow::Result<()> {
    let mut settings = NodeSettings::new(
        args.data_dir
            .unwrap_or_else(|| crate::default_data_dir("node")),
    );
    settings.insecure_registries = args.insecure_registries;
    let images = ImageService::new(settings, Arc::new(Metrics::default()))?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(args.reference.clone());
        bar
    });
    let progress = bar.clone().map(|bar| {
        Arc::new(move |done: u64, total: u64| {
            bar.set_length(total);
            bar.set_position(done);
        }) as brink_node::images::Progress
    });
    let pulled = images
        .ensure(&args.reference, PullPolicy::Always, progress)
        .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let pulled = pulled?;
    let how = match pulled.source {
        BlobSource::Cached => "already cached",
        BlobSource::Downloaded => "downloaded",
    };
    println!("{} {} ({how})", pulled.reference, pulled.manifest_digest);
    Ok(())
}
