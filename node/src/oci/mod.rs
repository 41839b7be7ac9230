//! OCI: names, formats and transport of wasm artifacts.
//!
//! Owns reference parsing (registry references and `oci:PATH:TAG` layouts), registry
//! credentials, the wasm artifact formats Brink reads and writes, and talking to registries
//! and layouts. It hands verified bytes to [`crate::cache`]; it never decides what to keep
//! (that is the cache's job) nor runs anything.

pub mod artifact;
pub mod auth;
pub mod layout;
pub mod reference;
pub mod registry;

use thiserror::Error;

pub use reference::ImageRef;

/// CNCF wasm OCI artifact: the one layer's media type.
pub const WASM_LAYER: &str = "application/wasm";
/// CNCF wasm OCI artifact: the config's media type.
pub const WASM_CONFIG_V0: &str = "application/vnd.wasm.config.v0+json";
/// wasm-to-oci (Krustlet era) config type.
pub const LEGACY_WASM_CONFIG: &str = "application/vnd.wasm.config.v1+json";
/// wasm-to-oci (Krustlet era) layer type.
pub const LEGACY_WASM_LAYER: &str = "application/vnd.wasm.content.layer.v1+wasm";
/// runwasi's component layer type.
pub const RUNWASI_COMPONENT_LAYER: &str =
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm";
/// Every layer media type Brink accepts as wasm.
pub const WASM_LAYER_TYPES: [&str; 3] = [WASM_LAYER, LEGACY_WASM_LAYER, RUNWASI_COMPONENT_LAYER];

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Why an artifact could not be fetched or published.
#[derive(Debug, Error)]
pub enum OciError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },
    #[error("{reference}: not found: {message}")]
    NotFound { reference: String, message: String },
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("size mismatch for {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("layer {digest} has media type {media_type:?}, which is not wasm (expected one of {})", WASM_LAYER_TYPES.join(", "))]
    NotWasm { digest: String, media_type: String },
    #[error("{0}")]
    BadArtifact(String),
    #[error("credentials in {path}: {message}")]
    Credentials { path: String, message: String },
    #[error("OCI layout {path}: {message}")]
    Layout { path: String, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl OciError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> OciError {
        let context = context.into();
        move |source| OciError::Io { context, source }
    }
}

/// `sha256:<64 hex>`; anything else is refused before it can name a path.
pub fn validate_digest(digest: &str) -> Result<&str, OciError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or_else(|| {
            OciError::BadArtifact(format!("unsupported or malformed digest {digest:?}"))
        })?;
    Ok(hex)
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_that_could_escape_a_path_are_refused() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(validate_digest(&good).is_ok());
        for bad in [
            "sha256:../../etc/passwd",
            "sha512:abc",
            "sha256:",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:{}/", "a".repeat(63)),
        ] {
            assert!(validate_digest(bad).is_err(), "{bad}");
        }
    }
}
