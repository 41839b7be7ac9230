//! Garbage collection of owned objects, on the raft leader: an object whose owners
//! (by `ownerReferences[].uid`) are all gone is deleted (background propagation); an
//! owner held by the `foregroundDeletion` finalizer waits until its dependents are gone;
//! an owner held by the `orphan` finalizer has its references removed from its
//! dependents, then goes. Each step is one compare-and-set write, so a sweep that races
//! a client's write simply tries again on the next one.
//!
//! Reads only the watch cache; writes only through the replica.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Value, json};

use super::ApiState;
use super::cache::REGISTRY_PREFIX;
use crate::store::{Applied, Command, Op};

const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";

fn uid(object: &Value) -> Option<&str> {
    object.pointer("/metadata/uid").and_then(Value::as_str)
}

fn owners(object: &Value) -> Vec<&str> {
    object
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default()
}

fn finalizers(object: &Value) -> Vec<&str> {
    object
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|f| f.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn revision(object: &Value) -> Option<u64> {
    object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .and_then(|r| r.parse().ok())
}

fn stored(object: &Value) -> Vec<u8> {
    let mut object = object.clone();
    if let Some(m) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    serde_json::to_vec(&object).unwrap_or_default()
}

/// What one sweep decided to write.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Remove the object now.
    Delete { key: String },
    /// Write the object back changed (marked for deletion, a reference or finalizer
    /// removed).
    Update { key: String, object: Value },
}

/// The owner written back without `finalizer` (its deletion then completes).
fn release(key: &str, object: &Value, held: &[&str], finalizer: &str) -> Step {
    let mut done = object.clone();
    done["metadata"]["finalizers"] =
        json!(held.iter().filter(|f| **f != finalizer).collect::<Vec<_>>());
    Step::Update {
        key: key.to_owned(),
        object: done,
    }
}

/// How a dependent is deleted: bound pods and objects with finalizers are marked,
/// the rest removed.
fn delete_step(
    key: &str,
    object: &Value,
    propagate_foreground: bool,
    has_dependents: bool,
) -> Option<Step> {
    if object.pointer("/metadata/deletionTimestamp").is_some() {
        return None;
    }
    let bound_pod = key.starts_with("/registry/core/pods/")
        && object.pointer("/spec/nodeName").is_some()
        && !matches!(
            object.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
    let mut marked_finalizers: Vec<Value> =
        finalizers(object).into_iter().map(|f| json!(f)).collect();
    if propagate_foreground && has_dependents {
        marked_finalizers.push(json!(FOREGROUND));
    }
    if !bound_pod && marked_finalizers.is_empty() {
        return Some(Step::Delete {
            key: key.to_owned(),
        });
    }
    let mut marked = object.clone();
    marked["metadata"]["deletionTimestamp"] = json!(super::handler::now_rfc3339());
    let grace = if bound_pod {
        object
            .pointer("/spec/terminationGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(30)
    } else {
        0
    };
    marked["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
    if !marked_finalizers.is_empty() {
        marked["metadata"]["finalizers"] = json!(marked_finalizers);
    }
    Some(Step::Update {
        key: key.to_owned(),
        object: marked,
    })
}

/// Decides one sweep over every object (pure: the tests call it directly).
pub fn sweep(objects: &[(String, Arc<Value>)]) -> Vec<Step> {
    let uids: HashSet<&str> = objects.iter().filter_map(|(_, o)| uid(o)).collect();
    let mut dependents: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, (_, object)) in objects.iter().enumerate() {
        for owner in owners(object) {
            dependents.entry(owner).or_default().push(i);
        }
    }
    let mut steps = Vec::new();
    let mut touched: HashSet<usize> = HashSet::new();
    for (i, (key, object)) in objects.iter().enumerate() {
        let Some(own_uid) = uid(object) else { continue };
        let deleting = object.pointer("/metadata/deletionTimestamp").is_some();
        let held = finalizers(object);
        let mine = dependents.get(own_uid).cloned().unwrap_or_default();
        if deleting && held.contains(&ORPHAN) {
            if mine.is_empty() {
                steps.push(release(key, object, &held, ORPHAN));
            } else {
                for d in mine {
                    if !touched.insert(d) {
                        continue;
                    }
                    let (dkey, dependent) = &objects[d];
                    let mut freed = (**dependent).clone();
                    let kept: Vec<Value> = dependent
                        .pointer("/metadata/ownerReferences")
                        .and_then(Value::as_array)
                        .map(|refs| {
                            refs.iter()
                                .filter(|r| r.get("uid").and_then(Value::as_str) != Some(own_uid))
                                .cloned()
                                .collect()
                        })
                        .unwrap_or_default();
                    if kept.is_empty() {
                        if let Some(m) = freed.get_mut("metadata").and_then(Value::as_object_mut) {
                            m.remove("ownerReferences");
                        }
                    } else {
                        freed["metadata"]["ownerReferences"] = json!(kept);
                    }
                    steps.push(Step::Update {
                        key: dkey.clone(),
                        object: freed,
                    });
                }
            }
            continue;
        }
        if deleting && held.contains(&FOREGROUND) {
            if mine.is_empty() {
                steps.push(release(key, object, &held, FOREGROUND));
            } else {
                for d in mine {
                    if !touched.insert(d) {
                        continue;
                    }
                    let (dkey, dependent) = &objects[d];
                    let has_own = uid(dependent).is_some_and(|u| dependents.contains_key(u));
                    if let Some(step) = delete_step(dkey, dependent, true, has_own) {
                        steps.push(step);
                    }
                }
            }
            continue;
        }
        let refs = owners(object);
        if !refs.is_empty() && refs.iter().all(|o| !uids.contains(o)) && touched.insert(i) {
            let has_own = dependents.contains_key(own_uid);
            if let Some(step) = delete_step(key, object, false, has_own) {
                steps.push(step);
            }
        }
    }
    steps
}

/// One sweep against the cache and the store; returns the writes that took.
pub async fn collect(state: &ApiState) -> usize {
    let keyed = state.cache.list_keyed(REGISTRY_PREFIX);
    let by_key: HashMap<&str, &Arc<Value>> = keyed.iter().map(|(k, o)| (k.as_str(), o)).collect();
    let mut done = 0;
    for step in sweep(&keyed) {
        let (key, op) = match step {
            Step::Delete { key } => {
                let expect = by_key.get(key.as_str()).and_then(|o| revision(o));
                (
                    key.clone(),
                    Op::Delete {
                        key: key.into_bytes(),
                        expect_mod: expect,
                    },
                )
            }
            Step::Update { key, object } => {
                let expect = revision(&object);
                let finished = super::handler::finalized(&object);
                let op = if finished {
                    Op::Delete {
                        key: key.clone().into_bytes(),
                        expect_mod: expect,
                    }
                } else {
                    Op::Update {
                        key: key.clone().into_bytes(),
                        data: stored(&object),
                        expect_mod: expect,
                    }
                };
                (key, op)
            }
        };
        match state.replica.propose(Command { ops: vec![op] }).await {
            Ok(Applied::Done { .. }) => done += 1,
            Ok(_) => tracing::debug!(key, "garbage collector: lost a race; next sweep"),
            Err(e) => {
                tracing::debug!(key, error = %e, "garbage collector: write failed; next sweep");
                break;
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str, uid: &str, owners: &[&str], extra: Value) -> (String, Arc<Value>) {
        let mut o = json!({"metadata": {"uid": uid, "resourceVersion": "7"}});
        if !owners.is_empty() {
            o["metadata"]["ownerReferences"] = json!(owners.iter().map(|u| json!({"uid": u, "kind": "ReplicaSet", "name": "rs", "apiVersion": "apps/v1"})).collect::<Vec<_>>());
        }
        if let Value::Object(m) = extra {
            for (k, v) in m {
                if k == "metadata" {
                    if let Value::Object(mm) = v {
                        for (k2, v2) in mm {
                            o["metadata"][k2] = v2;
                        }
                    }
                } else {
                    o[k] = v;
                }
            }
        }
        (key.to_owned(), Arc::new(o))
    }

    #[test]
    fn orphans_of_a_gone_owner_are_deleted_in_the_background() {
        let objects = vec![
            obj("/registry/core/pods/a/p1", "p1", &["rs1"], json!({})),
            obj("/registry/core/pods/a/p2", "p2", &["rs2"], json!({})),
            obj("/registry/apps/replicasets/a/rs2", "rs2", &[], json!({})),
            obj(
                "/registry/core/pods/a/p3",
                "p3",
                &["gone", "rs2"],
                json!({}),
            ),
            obj(
                "/registry/core/pods/a/p4",
                "p4",
                &["gone"],
                json!({"spec": {"nodeName": "n1", "terminationGracePeriodSeconds": 5}}),
            ),
        ];
        let steps = sweep(&objects);
        assert!(steps.contains(&Step::Delete {
            key: "/registry/core/pods/a/p1".into()
        }));
        // One owner left is enough to keep it; a bound pod is marked, not removed.
        assert!(!steps.iter().any(
            |s| matches!(s, Step::Delete { key } if key.ends_with("p2") || key.ends_with("p3"))
        ));
        let marked = steps.iter().find_map(|s| match s {
            Step::Update { key, object } if key.ends_with("p4") => Some(object),
            _ => None,
        });
        assert_eq!(
            marked.expect("p4 marked")["metadata"]["deletionGracePeriodSeconds"],
            5
        );
        assert_eq!(steps.len(), 2);
    }

    #[test]
    fn foreground_waits_for_dependents_and_orphan_frees_them() {
        let deleting = |f: &str| json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z", "finalizers": [f]}});
        let objects = vec![
            obj(
                "/registry/apps/deployments/a/d",
                "d",
                &[],
                deleting(FOREGROUND),
            ),
            obj("/registry/apps/replicasets/a/rs", "rs", &["d"], json!({})),
            obj("/registry/core/pods/a/p", "p", &["rs"], json!({})),
        ];
        let steps = sweep(&objects);
        // The replica set has a dependent of its own: it is marked foreground too.
        let rs = steps.iter().find_map(|s| match s {
            Step::Update { key, object } if key.ends_with("/rs") => Some(object),
            _ => None,
        });
        assert_eq!(
            rs.expect("rs marked")["metadata"]["finalizers"],
            json!([FOREGROUND])
        );
        assert!(
            !steps
                .iter()
                .any(|s| matches!(s, Step::Update { key, .. } if key.ends_with("/d")))
        );
        let alone = vec![obj(
            "/registry/apps/deployments/a/d",
            "d",
            &[],
            deleting(FOREGROUND),
        )];
        let steps = sweep(&alone);
        let Some(Step::Update { object, .. }) = steps.first() else {
            panic!("{steps:?}")
        };
        assert_eq!(object["metadata"]["finalizers"], json!([]));

        let objects = vec![
            obj(
                "/registry/apps/replicasets/a/rs",
                "rs",
                &[],
                deleting(ORPHAN),
            ),
            obj("/registry/core/pods/a/p", "p", &["rs"], json!({})),
        ];
        let steps = sweep(&objects);
        let Some(Step::Update { key, object }) = steps.first() else {
            panic!("{steps:?}")
        };
        assert!(key.ends_with("/p"));
        assert!(object["metadata"].get("ownerReferences").is_none());
    }
}
