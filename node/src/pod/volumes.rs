//! A pod's volumes on the node: one directory each under `data_dir/pods/<uid>/volumes/`.
//!
//! - `emptyDir` is created empty and lives as long as the pod (across container and
//!   sandbox restarts), owned by the root of the pod's ID range.
//! - `configMap` and `secret` are projections of the objects the pod source holds. They are
//!   written the way the kubelet's atomic writer does: the files go into a fresh
//!   `..<hash>` directory, a `..data` symlink is swapped to it with one rename, and each
//!   top-level name is a symlink through `..data`; so a guest never reads half an update,
//!   and an edit to the object reaches running pods.
//! - `hostPath` is used in place, and only under a prefix the node's policy allows; the
//!   check is made on the canonical path, so a symlink cannot lead out of the prefix.
//!
//! Everything here is blocking file-system work: call it from `spawn_blocking`. It owns
//! only the directories under `pods/<uid>/`; binding them into a sandbox and preopening
//! them for guests is the sandbox's and the runtime's business.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use brink_proto::volumes::VolumeKind;
use k8s_openapi::api::core::v1::{KeyToPath, Pod, Volume};

use crate::source::ConfigObjects;

/// Mode of projected files when neither the item nor the volume names one (Kubernetes'
/// default).
const DEFAULT_FILE_MODE: u32 = 0o644;
/// The link that names the current projection.
const DATA_LINK: &str = "..data";

/// Why a pod's volumes could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A ConfigMap, Secret or key the pod needs is not there (yet): the pod waits.
    #[error("{0}")]
    Missing(String),
    /// The node's policy forbids it: the pod is refused.
    #[error("{0}")]
    NotAllowed(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hostPath {0} is not a directory")]
    NotADirectory(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError + '_ {
    move |source| VolumeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One volume, ready to be given to guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedVolume {
    pub name: String,
    pub kind: VolumeKind,
    /// The directory on the host.
    pub host_dir: PathBuf,
    /// Whether any container mounts it writable (configMap and secret never are).
    pub writable: bool,
}

/// Where a pod's volume directories live.
pub fn pod_volumes_dir(data_dir: &Path, pod_uid: &str) -> PathBuf {
    data_dir.join("pods").join(pod_uid).join("volumes")
}

/// Creates (or brings up to date) every volume of `pod`. `owner` is the host uid and gid
/// that is root inside the pod's user namespace (None: the host's root owns them).
/// Calling it again is cheap and changes only what changed.
pub fn prepare(
    data_dir: &Path,
    pod: &Pod,
    config: &ConfigObjects,
    owner: Option<u32>,
    allowed_host_paths: &[PathBuf],
) -> Result<Vec<PreparedVolume>, VolumeError> {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(Vec::new());
    };
    let base = pod_volumes_dir(data_dir, uid);
    let mut prepared = Vec::new();
    for volume in spec.volumes.iter().flatten() {
        let writable = spec.containers.iter().any(|c| {
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == volume.name && m.read_only != Some(true))
        });
        let dir = base.join(&volume.name);
        let (kind, host_dir) = if volume.empty_dir.is_some() {
            ensure_dir(&dir, owner, 0o750)?;
            (VolumeKind::EmptyDir, dir)
        } else if let Some(host) = &volume.host_path {
            (
                VolumeKind::HostPath,
                host_path(
                    Path::new(&host.path),
                    host.type_.as_deref(),
                    allowed_host_paths,
                )?,
            )
        } else if volume.config_map.is_some() || volume.secret.is_some() {
            let (kind, files) = projection(volume, namespace, config)?;
            ensure_dir(&dir, owner, 0o755)?;
            project(&dir, &files, owner)?;
            (kind, dir)
        } else {
            // Validation admits no other source; a pod that got here anyway gets nothing.
            continue;
        };
        prepared.push(PreparedVolume {
            name: volume.name.clone(),
            writable: writable && !kind.always_read_only(),
            kind,
            host_dir,
        });
    }
    Ok(prepared)
}

fn ensure_dir(dir: &Path, owner: Option<u32>, mode: u32) -> Result<(), VolumeError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(io(dir))?;
    if let Some(id) = owner {
        std::os::unix::fs::chown(dir, Some(id), Some(id)).map_err(io(dir))?;
    }
    Ok(())
}

/// Resolves a hostPath volume under the node's policy.
fn host_path(
    path: &Path,
    type_: Option<&str>,
    allowed: &[PathBuf],
) -> Result<PathBuf, VolumeError> {
    let not_allowed = || {
        VolumeError::NotAllowed(format!(
            "hostPath {} is not under a directory this node allows (--allow-host-path{})",
            path.display(),
            if allowed.is_empty() {
                ": none is allowed".to_string()
            } else {
                format!(
                    " {}",
                    allowed
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        ))
    };
    // The lexical check first, so a refused path is never created.
    if !allowed.iter().any(|prefix| path.starts_with(prefix)) {
        return Err(not_allowed());
    }
    if type_ == Some("DirectoryOrCreate") && !path.exists() {
        std::fs::create_dir_all(path).map_err(io(path))?;
    }
    let real = std::fs::canonicalize(path).map_err(io(path))?;
    let inside = allowed
        .iter()
        .any(|prefix| std::fs::canonicalize(prefix).is_ok_and(|prefix| real.starts_with(prefix)));
    if !inside {
        return Err(not_allowed());
    }
    if !real.is_dir() {
        return Err(VolumeError::NotADirectory(path.to_path_buf()));
    }
    Ok(real)
}

/// The files a configMap or secret volume shows: relative path → (content, mode).
type Files = BTreeMap<String, (Vec<u8>, u32)>;

fn projection(
    volume: &Volume,
    namespace: &str,
    config: &ConfigObjects,
) -> Result<(VolumeKind, Files), VolumeError> {
    let (kind, what, name, items, default_mode, optional, data) =
        if let Some(source) = &volume.config_map {
            let key = format!("{namespace}/{}", source.name);
            let data = config.config_maps.get(&key).map(|c| {
                let mut data: BTreeMap<String, Vec<u8>> = c
                    .data
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                    .collect();
                for (k, v) in c.binary_data.iter().flatten() {
                    data.insert(k.clone(), v.0.clone());
                }
                data
            });
            (
                VolumeKind::ConfigMap,
                "configmap",
                source.name.clone(),
                source.items.clone(),
                source.default_mode,
                source.optional == Some(true),
                data,
            )
        } else if let Some(source) = &volume.secret {
            let name = source.secret_name.clone().unwrap_or_default();
            let key = format!("{namespace}/{name}");
            let data = config.secrets.get(&key).map(|s| {
                s.data
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect::<BTreeMap<_, _>>()
            });
            (
                VolumeKind::Secret,
                "secret",
                name,
                source.items.clone(),
                source.default_mode,
                source.optional == Some(true),
                data,
            )
        } else {
            return Ok((VolumeKind::EmptyDir, Files::new()));
        };
    let default_mode = mode_bits(default_mode);
    let Some(data) = data else {
        if optional {
            return Ok((kind, Files::new()));
        }
        return Err(VolumeError::Missing(format!(
            "{what} {namespace}/{name} not found (volume {})",
            volume.name
        )));
    };
    let mut files = Files::new();
    match items {
        None => {
            for (key, value) in data {
                files.insert(key, (value, default_mode));
            }
        }
        Some(items) => {
            for KeyToPath { key, path, mode } in items {
                match data.get(&key) {
                    Some(value) => {
                        let mode = mode.map_or(default_mode, |m| mode_bits(Some(m)));
                        files.insert(path, (value.clone(), mode));
                    }
                    None if optional => {}
                    None => {
                        return Err(VolumeError::Missing(format!(
                            "{what} {namespace}/{name} has no key {key:?} (volume {})",
                            volume.name
                        )));
                    }
                }
            }
        }
    }
    Ok((kind, files))
}

fn mode_bits(mode: Option<i32>) -> u32 {
    mode.and_then(|m| u32::try_from(m).ok())
        .map_or(DEFAULT_FILE_MODE, |m| m & 0o777)
}

/// A short, stable name for one projection's content.
fn projection_name(files: &Files) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = crate::fnv::Fnv::default();
    files.hash(&mut hasher);
    format!("..{:016x}", hasher.finish())
}

/// Writes `files` into `dir` atomically (see the module docs); a no-op when `dir` already
/// shows exactly them.
fn project(dir: &Path, files: &Files, owner: Option<u32>) -> Result<(), VolumeError> {
    let name = projection_name(files);
    let link = dir.join(DATA_LINK);
    let current = std::fs::read_link(&link).ok();
    if current.as_deref() == Some(Path::new(&name)) {
        return Ok(());
    }
    let fresh = dir.join(&name);
    if fresh.exists() {
        std::fs::remove_dir_all(&fresh).map_err(io(&fresh))?;
    }
    ensure_dir(&fresh, owner, 0o755)?;
    for (path, (content, mode)) in files {
        let file = fresh.join(path);
        if let Some(parent) = file.parent()
            && parent != fresh
        {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
            let mut at = parent;
            while at != fresh {
                chown(at, owner)?;
                at = match at.parent() {
                    Some(p) => p,
                    None => break,
                };
            }
        }
        let mut out = std::fs::File::create(&file).map_err(io(&file))?;
        out.write_all(content).map_err(io(&file))?;
        out.sync_all().map_err(io(&file))?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode))
            .map_err(io(&file))?;
        chown(&file, owner)?;
    }
    // The swap: one rename replaces the link, so readers see the old set or the new one.
    let staged = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&staged);
    std::os::unix::fs::symlink(&name, &staged).map_err(io(&staged))?;
    std::fs::rename(&staged, &link).map_err(io(&link))?;
    // Top-level names point through the link; names the new set lacks go.
    let tops: std::collections::BTreeSet<&str> =
        files.keys().filter_map(|p| p.split('/').next()).collect();
    for top in &tops {
        let path = dir.join(top);
        let target = Path::new(DATA_LINK).join(top);
        if std::fs::read_link(&path).ok().as_deref() != Some(target.as_path()) {
            let _ = std::fs::remove_file(&path);
            std::os::unix::fs::symlink(&target, &path).map_err(io(&path))?;
        }
    }
    let entries = std::fs::read_dir(dir).map_err(io(dir))?;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(entry_name) = file_name.to_str() else {
            continue;
        };
        let path = entry.path();
        if entry_name.starts_with("..") {
            if entry_name != DATA_LINK && entry_name != name {
                let _ = std::fs::remove_dir_all(&path);
            }
        } else if !tops.contains(entry_name) {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(())
}

fn chown(path: &Path, owner: Option<u32>) -> Result<(), VolumeError> {
    match owner {
        Some(id) => std::os::unix::fs::lchown(path, Some(id), Some(id)).map_err(io(path)),
        None => Ok(()),
    }
}

/// Removes the volume directories of pods not in `live` (pods removed while the agent was
/// down). hostPath volumes are never under here, so nothing of the host's goes.
pub fn prune(data_dir: &Path, live: &[String]) {
    let Ok(entries) = std::fs::read_dir(data_dir.join("pods")) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !live.contains(&name) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ConfigMap, ConfigMapVolumeSource};

    fn files(pairs: &[(&str, &str)]) -> Files {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), (v.as_bytes().to_vec(), 0o644)))
            .collect()
    }

    fn read(dir: &Path, name: &str) -> Option<String> {
        std::fs::read_to_string(dir.join(name)).ok()
    }

    #[test]
    fn projection_swaps_atomically_and_drops_removed_names() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        project(dir, &files(&[("a", "1"), ("sub/b", "2")]), None).expect("first");
        assert_eq!(read(dir, "a").as_deref(), Some("1"));
        assert_eq!(read(dir, "sub/b").as_deref(), Some("2"));
        assert!(std::fs::symlink_metadata(dir.join("a")).is_ok_and(|m| m.is_symlink()));
        let first = std::fs::read_link(dir.join(DATA_LINK)).expect("link");
        // The same content again changes nothing.
        project(dir, &files(&[("a", "1"), ("sub/b", "2")]), None).expect("again");
        assert_eq!(
            std::fs::read_link(dir.join(DATA_LINK)).ok(),
            Some(first.clone())
        );
        project(dir, &files(&[("a", "3")]), None).expect("update");
        assert_eq!(read(dir, "a").as_deref(), Some("3"));
        assert!(!dir.join("sub").exists(), "a name the update lacks is gone");
        assert!(!dir.join(&first).exists(), "the old projection is gone");
        let names: Vec<String> = std::fs::read_dir(dir)
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "a, ..data and one projection: {names:?}");
    }

    #[test]
    fn missing_objects_wait_unless_optional_and_host_paths_obey_policy() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let volume = Volume {
            name: "cfg".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: "settings".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut config = ConfigObjects::default();
        let missing = projection(&volume, "default", &config);
        assert!(matches!(missing, Err(VolumeError::Missing(m)) if m.contains("default/settings")));
        let mut optional = volume.clone();
        if let Some(c) = optional.config_map.as_mut() {
            c.optional = Some(true);
        }
        assert!(matches!(projection(&optional, "default", &config), Ok((_, f)) if f.is_empty()));
        config.config_maps.insert(
            "default/settings".into(),
            ConfigMap {
                data: Some([("k".to_string(), "v".to_string())].into()),
                ..Default::default()
            },
        );
        let (_, found) = projection(&volume, "default", &config).expect("present");
        assert_eq!(found.get("k").map(|(v, _)| v.as_slice()), Some(&b"v"[..]));

        let allowed = tmp.path().join("allowed");
        std::fs::create_dir(&allowed).expect("mkdir");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        assert!(matches!(
            host_path(&outside, None, std::slice::from_ref(&allowed)),
            Err(VolumeError::NotAllowed(_))
        ));
        assert!(matches!(
            host_path(&outside, None, &[]),
            Err(VolumeError::NotAllowed(_))
        ));
        // A symlink under the allowed prefix that leads out of it is refused too.
        let sneaky = allowed.join("sneaky");
        std::os::unix::fs::symlink(&outside, &sneaky).expect("symlink");
        assert!(matches!(
            host_path(&sneaky, None, std::slice::from_ref(&allowed)),
            Err(VolumeError::NotAllowed(_))
        ));
        let created = allowed.join("new/dir");
        let got = host_path(
            &created,
            Some("DirectoryOrCreate"),
            std::slice::from_ref(&allowed),
        );
        assert!(got.is_ok_and(|p| p.is_dir()));
        assert!(matches!(
            host_path(
                &allowed.join("absent"),
                Some("Directory"),
                std::slice::from_ref(&allowed)
            ),
            Err(VolumeError::Io { .. })
        ));
    }
}
