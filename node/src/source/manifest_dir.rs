//! Pods and objects from manifest files in a directory: a standalone node's source, and
//! the mirror pods of a joined one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use brink_proto::{Object, PodManifest, parse_manifests};

use super::stamps::Stamps;
use super::{DesiredPods, PodSource};

/// Pod manifests (`*.yaml`, `*.yml`, `*.json`) in a directory, re-read when a file changes.
/// inotify wakes it at once; the poll interval is the fallback (and a periodic resync) for
/// file systems where events do not arrive. Gateway API objects get the
/// `creationTimestamp` and `generation` an API server would have given them
/// ([`Stamps`]), kept in a state directory so both survive restarts.
pub struct ManifestDir {
    dir: PathBuf,
    stamps: Option<Stamps>,
    poll: Duration,
    seen: BTreeMap<PathBuf, FileState>,
    first: bool,
    wake: Arc<tokio::sync::Notify>,
    _watcher: Option<notify::RecommendedWatcher>,
}

#[derive(Debug, Clone)]
struct FileState {
    stamp: (SystemTime, u64),
    /// The last objects this file yielded without error.
    objects: Vec<Object>,
    error: Option<String>,
}

impl ManifestDir {
    /// Reads `dir`, keeping object ages under `state_dir`.
    pub fn new(dir: impl Into<PathBuf>, poll: Duration, state_dir: &Path) -> Self {
        let dir = dir.into();
        let stamps = match Stamps::open(state_dir) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "gateway object ages cannot be kept; routes order by name only");
                None
            }
        };
        let wake = Arc::new(tokio::sync::Notify::new());
        let waker = wake.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Only changes mean "look again": the rescan itself opens and reads the
            // directory, and reacting to those access events would rescan forever.
            // A stored permit covers changes that land between scans.
            let changed = match &event {
                Ok(event) => !matches!(event.kind, notify::EventKind::Access(_)),
                Err(_) => true,
            };
            if changed {
                waker.notify_one();
            }
        })
        .and_then(|mut w| {
            use notify::Watcher as _;
            w.watch(&dir, notify::RecursiveMode::NonRecursive)
                .map(|()| w)
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "no file events; polling only");
                None
            }
        };
        Self {
            dir,
            stamps,
            poll,
            seen: BTreeMap::new(),
            first: true,
            wake,
            _watcher: watcher,
        }
    }

    /// Re-reads changed files; returns whether anything changed. Blocking.
    fn rescan(dir: &Path, seen: &mut BTreeMap<PathBuf, FileState>) -> bool {
        let mut present = Vec::new();
        let mut changed = false;
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the manifest directory");
                return false;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let is_manifest = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if !is_manifest || hidden {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let stamp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            present.push(path.clone());
            if seen.get(&path).is_some_and(|s| s.stamp == stamp) {
                continue;
            }
            changed = true;
            let name = path.display().to_string();
            let parsed = std::fs::read(&path)
                .map_err(|e| format!("{name}: {e}"))
                .and_then(|bytes| {
                    String::from_utf8(bytes).map_err(|_| format!("{name}: not UTF-8 text"))
                })
                .and_then(|text| parse_manifests(&name, &text).map_err(|e| e.to_string()));
            let previous = seen.remove(&path);
            let state = match parsed {
                Ok(objects) => FileState {
                    stamp,
                    objects,
                    error: None,
                },
                Err(error) => {
                    tracing::error!(%error, "manifest refused; nothing from this file changes");
                    // Pods already running from an earlier good version keep running: a typo
                    // in an edit must not take a service down.
                    FileState {
                        stamp,
                        objects: previous.map(|p| p.objects).unwrap_or_default(),
                        error: Some(error),
                    }
                }
            };
            seen.insert(path, state);
        }
        let before = seen.len();
        seen.retain(|path, _| present.contains(path));
        changed || seen.len() != before
    }

    fn desired(seen: &BTreeMap<PathBuf, FileState>) -> DesiredPods {
        let mut desired = DesiredPods::default();
        let mut owners: BTreeMap<(&str, String), &Path> = BTreeMap::new();
        for (path, state) in seen {
            if let Some(error) = &state.error {
                desired.errors.push(error.clone());
            }
            for object in &state.objects {
                let key = object.key();
                if let Some(first) = owners.get(&(object.kind(), key.clone())) {
                    desired.errors.push(format!(
                        "{}: {} {key} is already defined in {}; ignored here",
                        path.display(),
                        object.kind(),
                        first.display()
                    ));
                    continue;
                }
                owners.insert((object.kind(), key.clone()), path);
                match object {
                    Object::Pod(pod) => desired.pods.push(PodManifest::clone(pod)),
                    Object::ConfigMap(c) => {
                        desired.config.config_maps.insert(key, c.clone());
                    }
                    Object::Secret(s) => {
                        desired.config.secrets.insert(key, s.clone());
                    }
                    Object::Service(s) => {
                        desired.gateway.services.insert(key, (**s).clone());
                    }
                    Object::Namespace(n) => {
                        desired.gateway.namespaces.insert(key, n.clone());
                    }
                    Object::GatewayClass(c) => {
                        desired.gateway.classes.insert(key, (**c).clone());
                    }
                    Object::Gateway(g) => {
                        desired.gateway.gateways.insert(key, (**g).clone());
                    }
                    Object::HttpRoute(r) => {
                        desired.gateway.routes.insert(key, (**r).clone());
                    }
                    Object::ReferenceGrant(g) => {
                        desired.gateway.grants.insert(key, (**g).clone());
                    }
                }
            }
        }
        desired
    }
}

impl PodSource for ManifestDir {
    async fn next(&mut self) -> Option<DesiredPods> {
        loop {
            if !self.first {
                tokio::select! {
                    () = tokio::time::sleep(self.poll) => {}
                    () = self.wake.notified() => {}
                }
            }
            let dir = self.dir.clone();
            let first = self.first;
            let mut seen = std::mem::take(&mut self.seen);
            let mut stamps = self.stamps.take();
            // Reading files and stamping (which writes one) are blocking.
            let (seen, stamps, desired) = tokio::task::spawn_blocking(move || {
                let changed = Self::rescan(&dir, &mut seen);
                let desired = (changed || first).then(|| {
                    let mut desired = Self::desired(&seen);
                    if let Some(Err(e)) = stamps.as_mut().map(|s| s.stamp(&mut desired.gateway)) {
                        tracing::warn!(error = %e, "cannot record gateway object ages");
                    }
                    desired
                });
                (seen, stamps, desired)
            })
            .await
            .ok()?;
            self.seen = seen;
            self.stamps = stamps;
            if let Some(desired) = desired {
                self.first = false;
                return Some(desired);
            }
        }
    }
}
