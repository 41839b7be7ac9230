//! The node's image cache: content-addressed blobs on disk (`blobs/sha256/<hex>`) and a
//! sled index of what each reference resolved to.
//!
//! Owns: verifying every blob against its digest before it is used, deleting and
//! re-fetching one that fails, and making concurrent pulls of one digest download once.
//! It does not know about registries (see [`crate::oci`]) nor about compiled code (see
//! [`crate::runtime`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tokio::io::AsyncWriteExt;

use crate::keyed_lock::KeyedLocks;
use crate::metrics::Metrics;
use crate::oci::{OciError, validate_digest};

/// What a reference resolved to when it was last pulled.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    pub reference: String,
    pub manifest_digest: String,
    pub layer_digest: String,
    pub layer_media_type: String,
    pub layer_size: u64,
    pub pulled_at: String,
}

/// Errors of the cache itself (disk, index).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("image index {path}: {message}")]
    Index { path: String, message: String },
    #[error(transparent)]
    Oci(#[from] OciError),
}

/// Blobs and the index, under one data directory.
pub struct BlobCache {
    root: PathBuf,
    db: sled::Db,
    metrics: Arc<Metrics>,
    in_flight: KeyedLocks,
}

/// How a blob came to be in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobSource {
    Cached,
    Downloaded,
}

impl BlobCache {
    /// Opens the cache under `root` (`blobs/`, `tmp/`, `index.sled`). A corrupt index is
    /// reported with its path, never silently recreated.
    pub fn open(root: &Path, metrics: Arc<Metrics>) -> Result<Self, CacheError> {
        for dir in ["blobs/sha256", "tmp"] {
            std::fs::create_dir_all(root.join(dir))
                .map_err(OciError::io(format!("create {}", root.join(dir).display())))?;
        }
        // Leftovers of a fetch that a crash interrupted.
        if let Ok(entries) = std::fs::read_dir(root.join("tmp")) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let index_path = root.join("index.sled");
        let db = sled::open(&index_path).map_err(|e| CacheError::Index {
            path: index_path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Self {
            root: root.to_path_buf(),
            db,
            metrics,
            in_flight: KeyedLocks::default(),
        })
    }

    /// Where a verified blob lives.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, OciError> {
        let hex = validate_digest(digest)?;
        Ok(self.root.join("blobs/sha256").join(hex))
    }

    /// The record of a reference's last pull, if any.
    pub async fn record(&self, reference: &str) -> Result<Option<ImageRecord>, CacheError> {
        let db = self.db.clone();
        let key = format!("image/{reference}");
        let value = tokio::task::spawn_blocking(move || db.get(key))
            .await
            .map_err(|e| self.index_err(e.to_string()))?
            .map_err(|e| self.index_err(e.to_string()))?;
        match value {
            None => Ok(None),
            Some(bytes) => match serde_json::from_slice(&bytes) {
                Ok(record) => Ok(Some(record)),
                Err(e) => {
                    // A record we cannot read is treated as absent (the image is pulled
                    // again) and said out loud.
                    tracing::warn!(reference, error = %e, "unreadable image record; pulling again");
                    Ok(None)
                }
            },
        }
    }

    /// Stores a reference's record durably (flushed before returning).
    pub async fn put_record(&self, record: &ImageRecord) -> Result<(), CacheError> {
        let db = self.db.clone();
        let key = format!("image/{}", record.reference);
        let value = serde_json::to_vec(record).map_err(|e| self.index_err(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            db.insert(key, value)?;
            db.flush().map(|_| ())
        })
        .await
        .map_err(|e| self.index_err(e.to_string()))?
        .map_err(|e| self.index_err(e.to_string()))
    }

    fn index_err(&self, message: String) -> CacheError {
        CacheError::Index {
            path: self.root.join("index.sled").display().to_string(),
            message,
        }
    }

    /// True when the blob is present, of the right size and digest. A present but
    /// corrupt blob is deleted (and counted) so the caller fetches it again.
    pub async fn verify(&self, digest: &str, size: Option<u64>) -> Result<bool, OciError> {
        let path = self.blob_path(digest)?;
        let expected = digest.to_string();
        let check = tokio::task::spawn_blocking(move || -> std::io::Result<Option<bool>> {
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            if size.is_some_and(|s| s != meta.len()) {
                std::fs::remove_file(&path)?;
                return Ok(Some(false));
            }
            let mut file = std::fs::File::open(&path)?;
            let mut hasher = sha2::Sha256::new();
            std::io::copy(&mut file, &mut hasher)?;
            let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
            if actual != expected {
                std::fs::remove_file(&path)?;
                return Ok(Some(false));
            }
            Ok(Some(true))
        })
        .await
        .map_err(|e| OciError::BadArtifact(format!("verify task failed: {e}")))?
        .map_err(OciError::io(format!("verify {digest}")))?;
        match check {
            Some(true) => Ok(true),
            None => Ok(false),
            Some(false) => {
                tracing::warn!(
                    digest,
                    "cached blob failed verification; deleted, fetching again"
                );
                Metrics::inc(&self.metrics.blob_corrupt_dropped);
                Ok(false)
            }
        }
    }

    /// Makes sure the blob `digest` is in the cache, calling `fetch` to download it when it
    /// is not. Concurrent callers for one digest wait for the first: one download.
    /// What `fetch` writes is verified (size and digest) before it becomes visible.
    pub async fn ensure<F, Fut>(
        &self,
        digest: &str,
        size: Option<u64>,
        fetch: F,
    ) -> Result<BlobSource, OciError>
    where
        F: FnOnce(BlobSink) -> Fut,
        Fut: std::future::Future<Output = Result<BlobSink, OciError>>,
    {
        let final_path = self.blob_path(digest)?;
        // Concurrent pulls of one digest: the first downloads, the rest find it cached.
        let _guard = self.in_flight.lock(digest).await;
        async {
            if self.verify(digest, size).await? {
                Metrics::inc(&self.metrics.blob_cache_hits);
                return Ok(BlobSource::Cached);
            }
            let tmp = self.root.join("tmp").join(format!(
                "{}.{}",
                validate_digest(digest)?,
                std::process::id()
            ));
            let file = tokio::fs::File::create(&tmp)
                .await
                .map_err(OciError::io(format!("create {}", tmp.display())))?;
            let sink = BlobSink {
                file,
                hasher: sha2::Sha256::new(),
                written: 0,
                limit: size,
            };
            let outcome = fetch(sink).await;
            let finished = match outcome {
                Ok(mut sink) => {
                    sink.file
                        .flush()
                        .await
                        .map_err(OciError::io(format!("write {}", tmp.display())))?;
                    let actual = format!("sha256:{}", hex::encode(sink.hasher.finalize()));
                    if let Some(expected) = size
                        && expected != sink.written
                    {
                        Err(OciError::SizeMismatch {
                            digest: digest.to_string(),
                            expected,
                            actual: sink.written,
                        })
                    } else if actual != digest {
                        Err(OciError::DigestMismatch {
                            what: format!("blob {digest}"),
                            expected: digest.to_string(),
                            actual,
                        })
                    } else {
                        Ok(sink.written)
                    }
                }
                Err(e) => Err(e),
            };
            match finished {
                Ok(bytes) => {
                    tokio::fs::rename(&tmp, &final_path)
                        .await
                        .map_err(OciError::io(format!(
                            "rename into {}",
                            final_path.display()
                        )))?;
                    Metrics::inc(&self.metrics.blob_downloads);
                    Metrics::add(&self.metrics.blob_download_bytes, bytes);
                    Ok(BlobSource::Downloaded)
                }
                Err(e) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    Err(e)
                }
            }
        }
        .await
    }
}

/// Where a blob being fetched is written: a temp file, hashed as it goes, refusing more
/// bytes than the descriptor announced.
pub struct BlobSink {
    file: tokio::fs::File,
    hasher: sha2::Sha256,
    written: u64,
    limit: Option<u64>,
}

impl BlobSink {
    pub fn written(&self) -> u64 {
        self.written
    }
}

impl tokio::io::AsyncWrite for BlobSink {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self
            .limit
            .is_some_and(|l| self.written + buf.len() as u64 > l)
        {
            return std::task::Poll::Ready(Err(std::io::Error::other(
                "blob is larger than its descriptor says",
            )));
        }
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.file).poll_write(cx, buf) {
            std::task::Poll::Ready(Ok(n)) => {
                this.hasher.update(&buf[..n]);
                this.written += n as u64;
                std::task::Poll::Ready(Ok(n))
            }
            other => other,
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.file).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.file).poll_shutdown(cx)
    }
}
