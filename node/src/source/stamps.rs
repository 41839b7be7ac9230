//! The metadata an API server would have given the Gateway API objects read from
//! manifest files.
//!
//! Standalone, nobody sets `creationTimestamp` or `generation`, yet route precedence
//! ("oldest first") and `observedGeneration` need both. [`Stamps`] gives each object the
//! time it was first seen and a generation bumped on every spec change, persisted under
//! the data directory so both are stable across restarts. An object that disappears and
//! comes back is new, as it would be in Kubernetes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::GatewayObjects;

/// One object's persisted metadata.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Stamp {
    /// When the object was first seen (RFC 3339).
    created: Timestamp,
    generation: i64,
    /// FNV-1a of the spec's JSON: a change bumps the generation.
    spec: u64,
}

/// Why the stamps could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum StampError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// First-seen times and generations of every object, persisted in one JSON file.
pub struct Stamps {
    path: PathBuf,
    stamps: BTreeMap<String, Stamp>,
}

impl Stamps {
    /// Loads `dir/objects.json`. A corrupt file is reported and set aside (renamed with a
    /// `.corrupt` suffix), never silently read as empty: ages start over, which changes
    /// only tie-breaks between routes, and the log says so.
    pub fn open(dir: &Path) -> Result<Self, StampError> {
        let io = |path: &Path, source| StampError::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let path = dir.join("objects.json");
        let stamps = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(stamps) => stamps,
                Err(e) => {
                    let aside = path.with_extension("json.corrupt");
                    tracing::error!(file = %path.display(), error = %e, moved_to = %aside.display(),
                        "gateway object ages are corrupt; starting them over");
                    std::fs::rename(&path, &aside).map_err(|e| io(&path, e))?;
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(&path, e)),
        };
        Ok(Self { path, stamps })
    }

    /// Sets `creationTimestamp` and `generation` on every object, recording new objects
    /// and spec changes and forgetting objects that are gone. Writes the file (atomically,
    /// synced) only when something changed. Blocking.
    pub fn stamp(&mut self, objects: &mut GatewayObjects) -> Result<(), StampError> {
        let now = Timestamp::now();
        let mut live = BTreeMap::new();
        let mut visit = |kind: &str, key: &str, meta: &mut ObjectMeta, spec: u64| {
            let id = format!("{kind} {key}");
            let stamp = match self.stamps.get(&id) {
                Some(old) if old.spec == spec => old.clone(),
                Some(old) => Stamp {
                    created: old.created,
                    generation: old.generation + 1,
                    spec,
                },
                None => Stamp {
                    created: now,
                    generation: 1,
                    spec,
                },
            };
            meta.creation_timestamp = Some(Time(stamp.created));
            meta.generation = Some(stamp.generation);
            live.insert(id, stamp);
        };
        let hash = |spec: &dyn erased::Spec| crate::fnv::fnv64(spec.json().as_bytes());
        for (key, class) in &mut objects.classes {
            let spec = hash(&class.spec);
            visit("GatewayClass", key, &mut class.metadata, spec);
        }
        for (key, gateway) in &mut objects.gateways {
            let spec = hash(&gateway.spec);
            visit("Gateway", key, &mut gateway.metadata, spec);
        }
        for (key, route) in &mut objects.routes {
            // An invalid route's text is not all in its spec: hash the fault too.
            let fault = route.invalid.as_ref().map(|e| e.message.clone());
            let spec = hash(&(&route.route.spec, fault));
            visit("HTTPRoute", key, &mut route.route.metadata, spec);
        }
        for (key, service) in &mut objects.services {
            let spec = hash(&service.spec);
            visit("Service", key, &mut service.metadata, spec);
        }
        for (key, grant) in &mut objects.grants {
            let spec = hash(&grant.spec);
            visit("ReferenceGrant", key, &mut grant.metadata, spec);
        }
        if live == self.stamps {
            return Ok(());
        }
        self.stamps = live;
        self.save()
    }

    fn save(&self) -> Result<(), StampError> {
        let io = |source| StampError::Io {
            path: self.path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(&self.stamps).map_err(|e| io(e.into()))?;
        let tmp = self.path.with_extension("json.tmp");
        {
            use std::io::Write as _;
            let mut file = std::fs::File::create(&tmp).map_err(io)?;
            file.write_all(&bytes).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent()
            && let Ok(dir) = std::fs::File::open(dir)
        {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

/// Specs of different kinds, hashed through their JSON.
mod erased {
    pub trait Spec {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Spec for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(listener_port: i32) -> GatewayObjects {
        let text = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: g}}\nspec:\n  gatewayClassName: c\n  listeners: [{{name: a, port: {listener_port}, protocol: HTTP}}]\n"
        );
        let mut objects = GatewayObjects::default();
        for object in brink_proto::parse_manifests("g.yaml", &text).unwrap() {
            if let brink_proto::Object::Gateway(g) = object {
                objects.gateways.insert("default/g".into(), *g);
            }
        }
        objects
    }

    fn meta(objects: &GatewayObjects) -> (Option<Timestamp>, Option<i64>) {
        let m = &objects.gateways["default/g"].metadata;
        (m.creation_timestamp.as_ref().map(|t| t.0), m.generation)
    }

    #[test]
    fn ages_and_generations_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = objects(80);
        Stamps::open(dir.path()).unwrap().stamp(&mut first).unwrap();
        let (created, generation) = meta(&first);
        assert_eq!(generation, Some(1));

        let mut again = objects(80);
        Stamps::open(dir.path()).unwrap().stamp(&mut again).unwrap();
        assert_eq!(meta(&again), (created, Some(1)));

        let mut changed = objects(81);
        let mut stamps = Stamps::open(dir.path()).unwrap();
        stamps.stamp(&mut changed).unwrap();
        assert_eq!(meta(&changed), (created, Some(2)));

        // Gone, then back: a new object.
        stamps.stamp(&mut GatewayObjects::default()).unwrap();
        let mut back = objects(81);
        stamps.stamp(&mut back).unwrap();
        assert_eq!(meta(&back).1, Some(1));
        assert!(meta(&back).0 > created);
    }

    #[test]
    fn a_corrupt_file_is_set_aside_and_said() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("objects.json"), b"{not json").unwrap();
        let mut o = objects(80);
        Stamps::open(dir.path()).unwrap().stamp(&mut o).unwrap();
        assert_eq!(meta(&o).1, Some(1));
        assert_eq!(
            std::fs::read(dir.path().join("objects.json.corrupt")).unwrap(),
            b"{not json"
        );
    }
}
