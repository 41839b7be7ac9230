//! OCI image layouts on disk (`oci-layout`, `index.json`, `blobs/sha256/…`): reading a
//! tagged manifest and its blobs for `oci:PATH:TAG` references, and writing one for
//! `brink push … oci:PATH:TAG` and for the embedded example app of `brink up`.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{OCI_MANIFEST, OciError, sha256_digest, validate_digest};

const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn layout_err(path: &Path, message: impl Into<String>) -> OciError {
    OciError::Layout {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Path of a blob inside a layout; the digest is validated so it cannot escape.
pub fn blob_path(root: &Path, digest: &str) -> Result<PathBuf, OciError> {
    let hex = validate_digest(digest)?;
    Ok(root.join("blobs").join("sha256").join(hex))
}

/// Finds the manifest a tag or digest names in the layout's index. Blocking.
pub fn resolve(
    root: &Path,
    tag: Option<&str>,
    digest: Option<&str>,
) -> Result<(Vec<u8>, String), OciError> {
    let index_path = root.join("index.json");
    let text = std::fs::read(&index_path)
        .map_err(|e| layout_err(root, format!("cannot read index.json: {e}")))?;
    let index: Value = serde_json::from_slice(&text)
        .map_err(|e| layout_err(root, format!("index.json is not JSON: {e}")))?;
    let manifests = index
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or_else(|| layout_err(root, "index.json has no manifests array"))?;
    let chosen = manifests.iter().find(|m| {
        let m_digest = m.get("digest").and_then(Value::as_str);
        let m_tag = m
            .pointer("/annotations/org.opencontainers.image.ref.name")
            .and_then(Value::as_str);
        match (digest, tag) {
            (Some(d), _) => m_digest == Some(d),
            (None, Some(t)) => m_tag == Some(t),
            (None, None) => manifests.len() == 1,
        }
    });
    let Some(chosen) = chosen else {
        let what = digest
            .or(tag)
            .unwrap_or("(no tag: the index holds several manifests)");
        return Err(OciError::NotFound {
            reference: format!("oci:{}", root.display()),
            message: format!("no manifest {what} in index.json"),
        });
    };
    let manifest_digest = chosen
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| layout_err(root, "index entry without digest"))?
        .to_string();
    let bytes = read_blob(root, &manifest_digest)?;
    Ok((bytes, manifest_digest))
}

/// Reads a blob and checks it against its digest. Blocking.
pub fn read_blob(root: &Path, digest: &str) -> Result<Vec<u8>, OciError> {
    let path = blob_path(root, digest)?;
    let bytes =
        std::fs::read(&path).map_err(|e| layout_err(root, format!("blob {digest}: {e}")))?;
    let actual = sha256_digest(&bytes);
    if actual != digest {
        return Err(OciError::DigestMismatch {
            what: format!("blob {} of oci:{}", digest, root.display()),
            expected: digest.to_string(),
            actual,
        });
    }
    Ok(bytes)
}

/// Writes a blob into a layout (idempotent). Blocking.
pub fn write_blob(root: &Path, bytes: &[u8]) -> Result<String, OciError> {
    let digest = sha256_digest(bytes);
    let path = blob_path(root, &digest)?;
    if !path.exists() {
        let dir = path.parent().unwrap_or(root);
        std::fs::create_dir_all(dir).map_err(OciError::io(format!("create {}", dir.display())))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).map_err(OciError::io(format!("write {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(OciError::io(format!("rename {}", path.display())))?;
    }
    Ok(digest)
}

/// Records `manifest` under `tag` in the layout's index, replacing an older entry with the
/// same tag. Returns the manifest's digest. Blocking.
pub fn tag_manifest(root: &Path, manifest: &[u8], tag: &str) -> Result<String, OciError> {
    let digest = write_blob(root, manifest)?;
    std::fs::write(
        root.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .map_err(OciError::io(format!("write {}/oci-layout", root.display())))?;
    let index_path = root.join("index.json");
    let mut index: Value = match std::fs::read(&index_path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| layout_err(root, format!("index.json is not JSON: {e}")))?,
        Err(_) => {
            json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []})
        }
    };
    let manifests = index
        .get_mut("manifests")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| layout_err(root, "index.json has no manifests array"))?;
    manifests.retain(|m| {
        m.pointer("/annotations/org.opencontainers.image.ref.name")
            .and_then(Value::as_str)
            != Some(tag)
    });
    manifests.push(json!({
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": manifest.len(),
        "annotations": {REF_NAME: tag},
    }));
    let text = serde_json::to_vec_pretty(&index).map_err(|e| layout_err(root, e.to_string()))?;
    let tmp = root.join("index.json.tmp");
    std::fs::write(&tmp, text).map_err(OciError::io(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, &index_path)
        .map_err(OciError::io(format!("rename {}", index_path.display())))?;
    Ok(digest)
}

/// Publishes `wasm` as a CNCF wasm artifact into the layout at `root` under `tag`; returns
/// the manifest digest. Blocking.
pub fn write_artifact(root: &Path, tag: &str, wasm: Vec<u8>) -> Result<String, OciError> {
    let (manifest, layer, config) = super::registry::artifact_parts(wasm)?;
    std::fs::create_dir_all(root).map_err(OciError::io(format!("create {}", root.display())))?;
    write_blob(root, &layer.data)?;
    write_blob(root, &config.data)?;
    let bytes = serde_json::to_vec(&manifest).map_err(|e| layout_err(root, e.to_string()))?;
    tag_manifest(root, &bytes, tag)
}
