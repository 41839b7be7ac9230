//! Talking to OCI registries: https by default, plain http for loopback registries and the
//! configured insecure ones; credentials from the docker config.

use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::{Client, Reference};
use tokio::io::AsyncWrite;

use super::artifact::build_config;
use super::{
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST, OciError, WASM_CONFIG_V0,
    WASM_LAYER, auth, sha256_digest,
};

/// A registry client for one node or CLI invocation.
pub struct RegistryClient {
    client: Client,
}

/// True for registries on this machine, which speak plain HTTP without being listed.
fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(registry, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl RegistryClient {
    /// A client for talking to `registry` (its host decides http vs https).
    pub fn new(registry: &str, insecure: &[String], timeout: Duration) -> Self {
        let mut plain: Vec<String> = insecure.to_vec();
        if is_loopback(registry) {
            plain.push(registry.to_string());
        }
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(plain),
            connect_timeout: Some(timeout),
            read_timeout: Some(timeout),
            ..Default::default()
        };
        Self {
            client: Client::new(config),
        }
    }

    fn map_err(reference: &Reference, e: OciDistributionError) -> OciError {
        let message = e.to_string();
        let lower = message.to_ascii_lowercase();
        let not_found = matches!(e, OciDistributionError::ImageManifestNotFoundError(_))
            || [
                "manifest unknown",
                "name unknown",
                "manifest_unknown",
                "name_unknown",
                "not found",
            ]
            .iter()
            .any(|m| lower.contains(m));
        if not_found {
            OciError::NotFound {
                reference: reference.whole(),
                message,
            }
        } else {
            OciError::Registry {
                registry: reference.resolve_registry().to_string(),
                message,
            }
        }
    }

    /// Fetches the manifest a reference names, resolving an index to its wasm entry, and
    /// checks it against its digest. Returns the manifest bytes and digest.
    pub async fn fetch_manifest(
        &self,
        reference: &Reference,
    ) -> Result<(Vec<u8>, String), OciError> {
        let auth = auth::credentials_for(reference.resolve_registry())?;
        let accepted = [
            OCI_MANIFEST,
            DOCKER_MANIFEST,
            OCI_INDEX,
            DOCKER_MANIFEST_LIST,
        ];
        let (bytes, digest) = self
            .client
            .pull_manifest_raw(reference, &auth, &accepted)
            .await
            .map_err(|e| Self::map_err(reference, e))?;
        verify(&bytes, &digest, &reference.whole())?;
        if let Some(expected) = reference.digest()
            && expected != digest
        {
            return Err(OciError::DigestMismatch {
                what: reference.whole(),
                expected: expected.to_string(),
                actual: digest,
            });
        }
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            OciError::BadArtifact(format!(
                "manifest of {} is not JSON: {e}",
                reference.whole()
            ))
        })?;
        let Some(entries) = value.get("manifests").and_then(|m| m.as_array()) else {
            return Ok((bytes.to_vec(), digest));
        };
        // An index: take the wasm platform's entry, or the only one.
        let wasm = entries
            .iter()
            .find(|m| m.pointer("/platform/architecture").and_then(|a| a.as_str()) == Some("wasm"))
            .or(if entries.len() == 1 {
                entries.first()
            } else {
                None
            })
            .and_then(|m| m.get("digest").and_then(|d| d.as_str()))
            .ok_or_else(|| {
                OciError::BadArtifact(format!(
                    "{}: the image index has no wasm manifest",
                    reference.whole()
                ))
            })?;
        let pinned = reference.clone_with_digest(wasm.to_string());
        let (bytes, digest) = self
            .client
            .pull_manifest_raw(&pinned, &auth, &[OCI_MANIFEST, DOCKER_MANIFEST])
            .await
            .map_err(|e| Self::map_err(reference, e))?;
        verify(&bytes, wasm, &pinned.whole())?;
        Ok((bytes.to_vec(), digest))
    }

    /// Streams a blob into `out`. The caller verifies what arrived.
    pub async fn fetch_blob(
        &self,
        reference: &Reference,
        descriptor: &OciDescriptor,
        out: impl AsyncWrite + Unpin,
    ) -> Result<(), OciError> {
        self.client
            .pull_blob(reference, descriptor, out)
            .await
            .map_err(|e| Self::map_err(reference, e))
    }

    /// Publishes `wasm` as a CNCF wasm OCI artifact; returns the manifest digest.
    pub async fn push(&self, reference: &Reference, wasm: Vec<u8>) -> Result<String, OciError> {
        let auth = auth::credentials_for(reference.resolve_registry())?;
        let (manifest, layer, config) = artifact_parts(wasm)?;
        self.client
            .push(reference, &[layer], config, &auth, Some(manifest))
            .await
            .map_err(|e| Self::map_err(reference, e))?;
        self.client
            .fetch_manifest_digest(reference, &auth)
            .await
            .map_err(|e| Self::map_err(reference, e))
    }
}

/// The manifest, layer and config of a wasm artifact.
pub fn artifact_parts(wasm: Vec<u8>) -> Result<(OciImageManifest, ImageLayer, Config), OciError> {
    let layer_digest = sha256_digest(&wasm);
    let config = build_config(&wasm, &layer_digest)?;
    let config_bytes =
        serde_json::to_vec(&config).map_err(|e| OciError::BadArtifact(e.to_string()))?;
    let layer = ImageLayer::new(wasm, WASM_LAYER.to_string(), None);
    let config = Config::new(config_bytes, WASM_CONFIG_V0.to_string(), None);
    let mut manifest = OciImageManifest::build(std::slice::from_ref(&layer), &config, None);
    manifest.media_type = Some(OCI_MANIFEST.to_string());
    manifest.artifact_type = Some(WASM_CONFIG_V0.to_string());
    Ok((manifest, layer, config))
}

fn verify(bytes: &[u8], digest: &str, what: &str) -> Result<(), OciError> {
    let actual = sha256_digest(bytes);
    if actual != digest {
        return Err(OciError::DigestMismatch {
            what: what.to_string(),
            expected: digest.to_string(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_registries_are_plain_http_by_default() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example:5000"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }
}
