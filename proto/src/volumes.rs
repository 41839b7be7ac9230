//! Pod volumes a wasm guest can be given. Each volume becomes one directory on the node,
//! which the sandbox binds in and the runtime preopens at the container's `mountPath`:
//! WASI has no mount table, only preopened directories, so every volume is a directory.
//!
//! This module only validates spec fields; the node creates and fills the directories.

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::{KeyToPath, Volume, VolumeMount};

use crate::meta::{FieldError, field_err, is_dns_label};

/// The volume sources Brink implements.
pub const VOLUME_SOURCES: [&str; 4] = ["emptyDir", "hostPath", "configMap", "secret"];

/// What backs a declared volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeKind {
    EmptyDir,
    HostPath,
    ConfigMap,
    Secret,
}

impl VolumeKind {
    /// Whether a guest may ever write to it: configMap and secret contents are the
    /// node's projection of an API object, read-only as in Kubernetes.
    pub fn always_read_only(self) -> bool {
        matches!(self, VolumeKind::ConfigMap | VolumeKind::Secret)
    }
}

/// An absolute path of plain components (no `.`, `..` or empty ones).
pub fn is_plain_absolute(path: &str) -> bool {
    path == "/"
        || (path.starts_with('/')
            && path[1..]
                .trim_end_matches('/')
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."))
}

/// A relative path of plain components, as `items[].path` must be.
pub fn is_plain_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && !path.starts_with("..")
}

/// Checks `spec.volumes` and returns each volume's kind by name.
pub fn validate_volumes(volumes: &[Volume]) -> Result<HashMap<String, VolumeKind>, FieldError> {
    let mut kinds = HashMap::new();
    for (i, volume) in volumes.iter().enumerate() {
        let at = |f: &str| format!("spec.volumes[{i}].{f}");
        if !is_dns_label(&volume.name) {
            return Err(field_err(
                at("name"),
                format!("{:?} is not a valid volume name", volume.name),
            ));
        }
        // The source is whichever field besides `name` is set; reading them off the
        // serialized form catches every source Kubernetes defines, present and future.
        let sources: Vec<String> = match serde_json::to_value(volume) {
            Ok(serde_json::Value::Object(map)) => {
                map.keys().filter(|k| *k != "name").cloned().collect()
            }
            _ => Vec::new(),
        };
        let source = match sources.as_slice() {
            [one] => one.as_str(),
            [] => return Err(field_err(at("name"), "a volume needs exactly one source")),
            _ => {
                return Err(field_err(
                    at(&sources[1]),
                    format!(
                        "a volume has exactly one source, not {}",
                        sources.join(" and ")
                    ),
                ));
            }
        };
        let kind = match source {
            "emptyDir" => {
                let empty = volume.empty_dir.as_ref();
                if empty
                    .and_then(|e| e.medium.as_deref())
                    .is_some_and(|m| !m.is_empty())
                {
                    return Err(field_err(
                        at("emptyDir.medium"),
                        "not supported yet (emptyDir lives on the node's disk)",
                    ));
                }
                if empty.is_some_and(|e| e.size_limit.is_some()) {
                    return Err(field_err(
                        at("emptyDir.sizeLimit"),
                        "not supported yet (Brink does not enforce it, so it refuses it)",
                    ));
                }
                VolumeKind::EmptyDir
            }
            "hostPath" => {
                let host = volume.host_path.as_ref();
                let path = host.map(|h| h.path.as_str()).unwrap_or_default();
                if !is_plain_absolute(path) {
                    return Err(field_err(
                        at("hostPath.path"),
                        format!("{path:?} is not a plain absolute path"),
                    ));
                }
                match host.and_then(|h| h.type_.as_deref()).unwrap_or_default() {
                    "" | "Directory" | "DirectoryOrCreate" => {}
                    t @ ("File" | "FileOrCreate" | "Socket" | "CharDevice" | "BlockDevice") => {
                        return Err(field_err(
                            at("hostPath.type"),
                            format!("{t} is not supported: a wasm guest is given directories only"),
                        ));
                    }
                    other => {
                        return Err(field_err(
                            at("hostPath.type"),
                            format!(
                                "unsupported value {other:?}: expected Directory or DirectoryOrCreate"
                            ),
                        ));
                    }
                }
                VolumeKind::HostPath
            }
            "configMap" => {
                let source = volume.config_map.as_ref();
                if source.is_none_or(|c| c.name.is_empty()) {
                    return Err(field_err(at("configMap.name"), "required"));
                }
                validate_items(
                    source.and_then(|c| c.items.as_deref()).unwrap_or_default(),
                    source.and_then(|c| c.default_mode),
                    &|f: &str| at(&format!("configMap.{f}")),
                )?;
                VolumeKind::ConfigMap
            }
            "secret" => {
                let source = volume.secret.as_ref();
                if source
                    .and_then(|s| s.secret_name.as_deref())
                    .is_none_or(str::is_empty)
                {
                    return Err(field_err(at("secret.secretName"), "required"));
                }
                validate_items(
                    source.and_then(|s| s.items.as_deref()).unwrap_or_default(),
                    source.and_then(|s| s.default_mode),
                    &|f: &str| at(&format!("secret.{f}")),
                )?;
                VolumeKind::Secret
            }
            other => {
                return Err(field_err(
                    at(other),
                    format!(
                        "volume source {other} is not supported (only {})",
                        VOLUME_SOURCES.join(", ")
                    ),
                ));
            }
        };
        if kinds.insert(volume.name.clone(), kind).is_some() {
            return Err(field_err(
                at("name"),
                format!("duplicate volume name {:?}", volume.name),
            ));
        }
    }
    Ok(kinds)
}

fn validate_mode(mode: i32, field: String) -> Result<(), FieldError> {
    if (0..=0o777).contains(&mode) {
        Ok(())
    } else {
        Err(field_err(field, "must be between 0 and 0777 (octal)"))
    }
}

fn validate_items(
    items: &[KeyToPath],
    default_mode: Option<i32>,
    at: &dyn Fn(&str) -> String,
) -> Result<(), FieldError> {
    if let Some(mode) = default_mode {
        validate_mode(mode, at("defaultMode"))?;
    }
    let mut paths = HashSet::new();
    for (j, item) in items.iter().enumerate() {
        let field = |f: &str| at(&format!("items[{j}].{f}"));
        if item.key.is_empty() {
            return Err(field_err(field("key"), "required"));
        }
        if !is_plain_relative(&item.path) {
            return Err(field_err(
                field("path"),
                format!("{:?} is not a plain relative path", item.path),
            ));
        }
        if !paths.insert(item.path.as_str()) {
            return Err(field_err(
                field("path"),
                format!("path {:?} is used twice", item.path),
            ));
        }
        if let Some(mode) = item.mode {
            validate_mode(mode, field("mode"))?;
        }
    }
    Ok(())
}

/// Checks a container's `volumeMounts` against the pod's volumes; `at` turns `[j].field`
/// into the full field path.
pub fn validate_mounts(
    mounts: &[VolumeMount],
    volumes: &HashMap<String, VolumeKind>,
    at: &dyn Fn(&str) -> String,
) -> Result<(), FieldError> {
    let mut paths = HashSet::new();
    for (j, mount) in mounts.iter().enumerate() {
        let field = |f: &str| at(&format!("[{j}].{f}"));
        if !volumes.contains_key(&mount.name) {
            return Err(field_err(
                field("name"),
                format!("no volume named {:?} in spec.volumes", mount.name),
            ));
        }
        if !is_plain_absolute(&mount.mount_path) {
            return Err(field_err(
                field("mountPath"),
                format!("{:?} is not a plain absolute path", mount.mount_path),
            ));
        }
        if !paths.insert(mount.mount_path.trim_end_matches('/')) {
            return Err(field_err(
                field("mountPath"),
                format!("{:?} is mounted twice", mount.mount_path),
            ));
        }
        for (set, name) in [
            (
                mount.sub_path.as_deref().is_some_and(|s| !s.is_empty()),
                "subPath",
            ),
            (
                mount
                    .sub_path_expr
                    .as_deref()
                    .is_some_and(|s| !s.is_empty()),
                "subPathExpr",
            ),
            (mount.recursive_read_only.is_some(), "recursiveReadOnly"),
        ] {
            if set {
                return Err(field_err(field(name), "not supported yet"));
            }
        }
        if let Some(p) = mount.mount_propagation.as_deref()
            && p != "None"
        {
            return Err(field_err(
                field("mountPropagation"),
                format!("unsupported value {p:?}: a sandbox's mounts never propagate"),
            ));
        }
    }
    Ok(())
}
