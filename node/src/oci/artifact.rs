//! The wasm artifact formats: what a wasm binary is (component or core module, and its
//! imports and exports), the CNCF config Brink writes when it publishes one, and picking
//! the wasm layer out of a manifest of any of the accepted formats.

use oci_client::manifest::{OciDescriptor, OciImageManifest};
use serde::Serialize;
use wasmparser::{Parser, Payload};

use super::{OciError, WASM_LAYER_TYPES};

/// What kind of wasm a binary holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmKind {
    /// A component (wasi preview 2).
    Component,
    /// A core module (wasi preview 1).
    Module,
}

/// Tells a component from a core module by the preamble; anything else is not wasm.
pub fn wasm_kind(bytes: &[u8]) -> Result<WasmKind, OciError> {
    if bytes.len() < 8 || &bytes[0..4] != b"\0asm" {
        return Err(OciError::BadArtifact(
            "not a wasm binary (no \\0asm preamble)".into(),
        ));
    }
    match [bytes[4], bytes[5], bytes[6], bytes[7]] {
        [1, 0, 0, 0] => Ok(WasmKind::Module),
        [0x0d, 0, 1, 0] => Ok(WasmKind::Component),
        [a, b, c, d] => Err(OciError::BadArtifact(format!(
            "unsupported wasm binary version {:?}",
            [a, b, c, d]
        ))),
    }
}

/// The top-level imports and exports of a component, by WIT name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ComponentWorld {
    pub imports: Vec<String>,
    pub exports: Vec<String>,
}

/// Reads a component's top-level import and export names without compiling it.
pub fn component_world(bytes: &[u8]) -> Result<ComponentWorld, OciError> {
    let mut world = ComponentWorld::default();
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload =
            payload.map_err(|e| OciError::BadArtifact(format!("invalid component: {e}")))?;
        match payload {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    let import = import
                        .map_err(|e| OciError::BadArtifact(format!("invalid import: {e}")))?;
                    world.imports.push(import.name.name.to_string());
                }
            }
            Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader {
                    let export = export
                        .map_err(|e| OciError::BadArtifact(format!("invalid export: {e}")))?;
                    world.exports.push(export.name.name.to_string());
                }
            }
            _ => {}
        }
    }
    Ok(world)
}

/// The CNCF wasm OCI artifact config (`application/vnd.wasm.config.v0+json`).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WasmConfig {
    pub created: String,
    pub architecture: &'static str,
    pub os: &'static str,
    pub layer_digests: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub component: Option<ComponentWorld>,
}

/// Builds the config for publishing `wasm`; refuses bytes that are not valid wasm.
pub fn build_config(wasm: &[u8], layer_digest: &str) -> Result<WasmConfig, OciError> {
    let kind = wasm_kind(wasm)?;
    let component = match kind {
        WasmKind::Component => Some(component_world(wasm)?),
        WasmKind::Module => {
            wasmparser::Validator::new()
                .validate_all(wasm)
                .map_err(|e| OciError::BadArtifact(format!("invalid wasm module: {e}")))?;
            None
        }
    };
    Ok(WasmConfig {
        created: k8s_openapi::jiff::Timestamp::now().to_string(),
        architecture: "wasm",
        os: match kind {
            WasmKind::Component => "wasip2",
            WasmKind::Module => "wasip1",
        },
        layer_digests: vec![layer_digest.to_string()],
        component,
    })
}

/// The one wasm layer of a manifest. Every layer must be of a wasm type: an image with a
/// tar layer is a container image, and running it as wasm would be wrong.
pub fn wasm_layer(manifest: &OciImageManifest) -> Result<&OciDescriptor, OciError> {
    for layer in &manifest.layers {
        if !WASM_LAYER_TYPES.contains(&layer.media_type.as_str()) {
            return Err(OciError::NotWasm {
                digest: layer.digest.clone(),
                media_type: layer.media_type.clone(),
            });
        }
    }
    match manifest.layers.as_slice() {
        [layer] => Ok(layer),
        [] => Err(OciError::BadArtifact("the manifest has no layers".into())),
        layers => Err(OciError::BadArtifact(format!(
            "expected one wasm layer, found {}",
            layers.len()
        ))),
    }
}

/// Parses manifest bytes, refusing indexes (the caller resolves those first) and garbage.
pub fn parse_manifest(bytes: &[u8]) -> Result<OciImageManifest, OciError> {
    let manifest: OciImageManifest = serde_json::from_slice(bytes)
        .map_err(|e| OciError::BadArtifact(format!("invalid image manifest: {e}")))?;
    if manifest.schema_version != 2 {
        return Err(OciError::BadArtifact(format!(
            "unsupported manifest schemaVersion {}",
            manifest.schema_version
        )));
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_tells_component_from_module() {
        assert_eq!(wasm_kind(b"\0asm\x01\0\0\0").ok(), Some(WasmKind::Module));
        assert_eq!(
            wasm_kind(b"\0asm\x0d\0\x01\0").ok(),
            Some(WasmKind::Component)
        );
        assert!(wasm_kind(b"\x7fELF\x02\x01\x01\0").is_err());
        assert!(wasm_kind(b"\0as").is_err());
    }

    #[test]
    fn a_tar_layer_is_refused_with_its_media_type() {
        let manifest: OciImageManifest = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", "0".repeat(64)), "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": format!("sha256:{}", "1".repeat(64)), "size": 10}]
        }))
        .expect("manifest");
        let err = wasm_layer(&manifest).expect_err("tar is not wasm");
        assert!(
            err.to_string()
                .contains("application/vnd.oci.image.layer.v1.tar+gzip"),
            "{err}"
        );
    }

    #[test]
    fn garbage_manifests_and_binaries_are_errors() {
        for bad in [
            &b""[..],
            b"{",
            b"[]",
            b"{\"schemaVersion\": 1, \"config\": {}, \"layers\": []}",
        ] {
            assert!(parse_manifest(bad).is_err());
        }
        assert!(build_config(b"\0asm\x01\0\0\0\xff\xff", "d").is_err());
        assert!(component_world(b"\0asm\x0d\0\x01\0\x07\x05garbage").is_err());
    }
}
