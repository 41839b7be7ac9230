//! Image pulls as a kubelet does them: the pull policy decides whether the network is asked,
//! the cache decides whether bytes move, and the result names the exact digest that runs.

use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use oci_client::manifest::OciDescriptor;
use tokio::io::AsyncWrite;

use crate::cache::{BlobCache, BlobSink, BlobSource, CacheError, ImageRecord};
use crate::metrics::Metrics;
use crate::oci::artifact::{parse_manifest, wasm_layer};
use crate::oci::registry::RegistryClient;
use crate::oci::{ImageRef, OciError, layout};
use crate::settings::NodeSettings;

/// Kubernetes' `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn parse(s: &str) -> PullPolicy {
        match s {
            "Always" => PullPolicy::Always,
            "Never" => PullPolicy::Never,
            _ => PullPolicy::IfNotPresent,
        }
    }
}

/// Why a pull failed; `message()` is what pod status shows.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("image {0} is not present on the node and its pull policy is Never")]
    NeverPull(String),
}

/// A pulled, verified artifact ready to compile.
#[derive(Debug, Clone)]
pub struct PulledImage {
    pub reference: String,
    /// `repo@sha256:…` of the manifest: what Kubernetes reports as `imageID`.
    pub image_id: String,
    pub manifest_digest: String,
    pub layer_digest: String,
    pub blob_path: std::path::PathBuf,
    pub source: BlobSource,
}

/// Callback for download progress: bytes so far, bytes in all.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

pub struct ImageService {
    cache: BlobCache,
    settings: NodeSettings,
    metrics: Arc<Metrics>,
}

impl ImageService {
    pub fn new(settings: NodeSettings, metrics: Arc<Metrics>) -> Result<Self, CacheError> {
        let cache = BlobCache::open(&settings.data_dir.join("images"), metrics.clone())?;
        Ok(Self {
            cache,
            settings,
            metrics,
        })
    }

    /// Makes `image` available locally per `policy`.
    pub async fn ensure(
        &self,
        image: &str,
        policy: PullPolicy,
        progress: Option<Progress>,
    ) -> Result<PulledImage, PullError> {
        let result = self.ensure_inner(image, policy, progress).await;
        if result.is_err() {
            Metrics::inc(&self.metrics.pull_errors);
        }
        result
    }

    async fn ensure_inner(
        &self,
        image: &str,
        policy: PullPolicy,
        progress: Option<Progress>,
    ) -> Result<PulledImage, PullError> {
        let reference = ImageRef::from_str(image)?;
        if policy != PullPolicy::Always
            && let Some(record) = self.cache.record(image).await?
            && self
                .cache
                .verify(&record.layer_digest, Some(record.layer_size))
                .await?
        {
            Metrics::inc(&self.metrics.blob_cache_hits);
            return Ok(self.pulled(&reference, &record, BlobSource::Cached)?);
        }
        if policy == PullPolicy::Never {
            return Err(PullError::NeverPull(image.to_string()));
        }
        // One client for the whole pull: it holds the registry's auth token once the
        // manifest request has negotiated it, and the blob request needs the same.
        let origin = match &reference {
            ImageRef::Registry(r) => Origin::Registry(r, self.client(r)),
            ImageRef::Layout { path, tag, digest } => Origin::Layout { path, tag, digest },
        };
        let (manifest_bytes, manifest_digest) = match &origin {
            Origin::Registry(r, client) => client.fetch_manifest(r).await?,
            Origin::Layout { path, tag, digest } => {
                let (path, tag, digest) = (path.to_path_buf(), (*tag).clone(), (*digest).clone());
                tokio::task::spawn_blocking(move || {
                    layout::resolve(&path, tag.as_deref(), digest.as_deref())
                })
                .await
                .map_err(|e| OciError::BadArtifact(format!("layout task failed: {e}")))??
            }
        };
        let manifest = parse_manifest(&manifest_bytes)?;
        let layer = wasm_layer(&manifest)?.clone();
        let size = u64::try_from(layer.size).map_err(|_| {
            OciError::BadArtifact(format!("layer {} has a negative size", layer.digest))
        })?;
        let source = self
            .cache
            .ensure(&layer.digest, Some(size), |sink| {
                Self::fetch_layer(&origin, layer.clone(), sink, size, progress)
            })
            .await?;
        let record = ImageRecord {
            reference: image.to_string(),
            manifest_digest,
            layer_digest: layer.digest.clone(),
            layer_media_type: layer.media_type.clone(),
            layer_size: size,
            pulled_at: k8s_openapi::jiff::Timestamp::now().to_string(),
        };
        self.cache.put_record(&record).await?;
        Ok(self.pulled(&reference, &record, source)?)
    }

    fn pulled(
        &self,
        reference: &ImageRef,
        record: &ImageRecord,
        source: BlobSource,
    ) -> Result<PulledImage, OciError> {
        Ok(PulledImage {
            reference: record.reference.clone(),
            image_id: reference.with_digest(&record.manifest_digest),
            manifest_digest: record.manifest_digest.clone(),
            layer_digest: record.layer_digest.clone(),
            blob_path: self.cache.blob_path(&record.layer_digest)?,
            source,
        })
    }

    fn client(&self, reference: &oci_client::Reference) -> RegistryClient {
        RegistryClient::new(
            reference.resolve_registry(),
            &self.settings.insecure_registries,
            self.settings.registry_timeout,
        )
    }

    async fn fetch_layer(
        origin: &Origin<'_>,
        layer: OciDescriptor,
        sink: BlobSink,
        size: u64,
        progress: Option<Progress>,
    ) -> Result<BlobSink, OciError> {
        let mut writer = ProgressWriter {
            inner: sink,
            total: size,
            progress,
        };
        match origin {
            Origin::Registry(r, client) => {
                client.fetch_blob(r, &layer, &mut writer).await?;
            }
            Origin::Layout { path, .. } => {
                let source = layout::blob_path(path, &layer.digest)?;
                let mut file = tokio::fs::File::open(&source)
                    .await
                    .map_err(OciError::io(format!("open {}", source.display())))?;
                tokio::io::copy(&mut file, &mut writer)
                    .await
                    .map_err(OciError::io(format!("copy {}", source.display())))?;
            }
        }
        Ok(writer.inner)
    }
}

/// Where a pull's bytes come from.
enum Origin<'a> {
    Registry(&'a oci_client::Reference, RegistryClient),
    Layout {
        path: &'a std::path::Path,
        tag: &'a Option<String>,
        digest: &'a Option<String>,
    },
}

struct ProgressWriter {
    inner: BlobSink,
    total: u64,
    progress: Option<Progress>,
}

impl AsyncWrite for ProgressWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let (Poll::Ready(Ok(_)), Some(progress)) = (&result, &self.progress) {
            progress(self.inner.written(), self.total);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
