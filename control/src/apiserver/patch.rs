//! The three patch formats kubectl sends: JSON patch (RFC 6902), JSON merge patch
//! (RFC 7386) and Kubernetes' strategic merge patch.
//!
//! Strategic merge merges lists of objects by their merge key (containers by `name`,
//! ports by `containerPort` or `port`, volume mounts by `mountPath`, ...) and honours the
//! directives `$patch` (`replace`, `delete`, `merge`), `$retainKeys`,
//! `$setElementOrder/<field>` and `$deleteFromPrimitiveList/<field>`. Kubernetes reads
//! merge keys from each type's schema; Brink reads them from the field's name (the same
//! keys for every type Brink serves), and replaces lists it has no key for, as Kubernetes
//! does for atomic lists.

use serde_json::{Map, Value};

/// A patch that does not apply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct PatchError(pub String);

/// Applies an RFC 6902 JSON patch.
pub fn json_patch(doc: &mut Value, patch: &[u8]) -> Result<(), PatchError> {
    let ops: json_patch::Patch = serde_json::from_slice(patch)
        .map_err(|e| PatchError(format!("invalid JSON patch: {e}")))?;
    json_patch::patch(doc, &ops).map_err(|e| PatchError(e.to_string()))
}

/// Applies an RFC 7386 merge patch.
pub fn merge_patch(doc: &mut Value, patch: &[u8]) -> Result<(), PatchError> {
    let patch: Value = serde_json::from_slice(patch)
        .map_err(|e| PatchError(format!("invalid merge patch: {e}")))?;
    if !patch.is_object() {
        return Err(PatchError("a merge patch must be a JSON object".into()));
    }
    json_patch::merge(doc, &patch);
    Ok(())
}

/// Applies a strategic merge patch.
pub fn strategic_merge_patch(doc: &mut Value, patch: &[u8]) -> Result<(), PatchError> {
    let patch: Value = serde_json::from_slice(patch)
        .map_err(|e| PatchError(format!("invalid strategic merge patch: {e}")))?;
    let Value::Object(patch) = patch else {
        return Err(PatchError(
            "a strategic merge patch must be a JSON object".into(),
        ));
    };
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    if let Value::Object(target) = doc {
        merge_map(target, &patch)?;
    }
    Ok(())
}

/// The merge key of a list field, from its name and whether its elements have a
/// field (`has`): the one table both strategic merge and the OpenAPI documents use.
pub fn merge_key(field: &str, has: impl Fn(&str) -> bool) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates"
        | "listeners" => "name",
        // Containers' ports by containerPort, services' by port.
        "ports" if has("containerPort") => "containerPort",
        "ports" => "port",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        _ => return None,
    })
}

/// Lists of scalars merged as sets rather than replaced.
pub fn merges_primitives(field: &str) -> bool {
    field == "finalizers"
}

fn directive(map: &Map<String, Value>) -> Option<&str> {
    map.get("$patch").and_then(Value::as_str)
}

/// A list element that is only a `$patch` directive.
fn only_directive(map: &Map<String, Value>) -> bool {
    map.len() == 1 && directive(map).is_some()
}

fn without_directives(map: &Map<String, Value>) -> Map<String, Value> {
    map.iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k.clone(), strip(v)))
        .collect()
}

/// A patch value with its directives removed (what lands in the object when there is
/// nothing to merge with).
fn strip(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(without_directives(map)),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .filter(|i| !i.as_object().is_some_and(only_directive))
                .map(strip)
                .collect(),
        ),
        other => other.clone(),
    }
}

fn merge_map(
    target: &mut Map<String, Value>,
    patch: &Map<String, Value>,
) -> Result<(), PatchError> {
    match directive(patch) {
        Some("replace") => {
            *target = without_directives(patch);
            return Ok(());
        }
        Some("delete") => {
            target.clear();
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => return Err(PatchError(format!("unknown $patch directive {other:?}"))),
    }
    if let Some(retain) = patch.get("$retainKeys") {
        let keep: Vec<&str> = retain
            .as_array()
            .ok_or_else(|| PatchError("$retainKeys must be a list".into()))?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        target.retain(|k, _| keep.contains(&k.as_str()));
    }
    let mut orders = Vec::new();
    for (key, value) in patch {
        if key == "$patch" || key == "$retainKeys" {
            continue;
        }
        if let Some(field) = key.strip_prefix("$setElementOrder/") {
            orders.push((field, value));
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let remove = value
                .as_array()
                .ok_or_else(|| PatchError(format!("{key} must be a list")))?;
            if let Some(Value::Array(items)) = target.get_mut(field) {
                items.retain(|i| !remove.contains(i));
            }
            continue;
        }
        if key.starts_with('$') {
            return Err(PatchError(format!("unknown directive {key:?}")));
        }
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(p) => {
                if directive(p) == Some("delete") {
                    target.remove(key);
                    continue;
                }
                match target.get_mut(key) {
                    Some(Value::Object(t)) => merge_map(t, p)?,
                    _ => {
                        let mut fresh = Map::new();
                        merge_map(&mut fresh, p)?;
                        target.insert(key.clone(), Value::Object(fresh));
                    }
                }
            }
            Value::Array(p) => {
                let merged = merge_list(key, target.get(key), p)?;
                target.insert(key.clone(), merged);
            }
            other => {
                target.insert(key.clone(), other.clone());
            }
        }
    }
    for (field, order) in orders {
        if let (Some(Value::Array(items)), Some(order)) = (target.get_mut(field), order.as_array())
        {
            reorder(field, items, order);
        }
    }
    Ok(())
}

fn merge_list(field: &str, current: Option<&Value>, patch: &[Value]) -> Result<Value, PatchError> {
    let current = current
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    // A list-level `{"$patch": "replace"}` element replaces the whole list.
    if patch.iter().any(|i| {
        i.as_object()
            .is_some_and(|m| directive(m) == Some("replace") && m.len() == 1)
    }) {
        return Ok(Value::Array(
            patch
                .iter()
                .filter(|i| !i.as_object().is_some_and(only_directive))
                .map(strip)
                .collect(),
        ));
    }
    if merges_primitives(field) {
        let mut out = current;
        for item in patch {
            if !out.contains(item) {
                out.push(item.clone());
            }
        }
        return Ok(Value::Array(out));
    }
    let sample = patch.first().or(current.first());
    let Some(key) = merge_key(field, |f| sample.is_some_and(|s| s.get(f).is_some()))
        .filter(|_| sample.is_some_and(Value::is_object))
    else {
        return Ok(Value::Array(patch.iter().map(strip).collect()));
    };
    let mut out = current;
    for item in patch {
        let Value::Object(p) = item else {
            return Err(PatchError(format!(
                "{field}: a list merged by {key:?} holds objects"
            )));
        };
        let Some(id) = p.get(key) else {
            return Err(PatchError(format!(
                "{field}: an element is missing its merge key {key:?}"
            )));
        };
        let at = out.iter().position(|e| e.get(key) == Some(id));
        match (directive(p), at) {
            (Some("delete"), Some(i)) => {
                out.remove(i);
            }
            (Some("delete"), None) => {}
            (_, Some(i)) => {
                if let Value::Object(t) = &mut out[i] {
                    merge_map(t, p)?;
                }
            }
            (_, None) => out.push(Value::Object(without_directives(p))),
        }
    }
    Ok(Value::Array(out))
}

/// Puts the elements `$setElementOrder` names first, in its order; others keep theirs.
fn reorder(field: &str, items: &mut [Value], order: &[Value]) {
    let sample = order.first();
    let key = merge_key(field, |f| sample.is_some_and(|s| s.get(f).is_some()));
    let position = |item: &Value| {
        order.iter().position(|o| match key {
            Some(k) if o.is_object() => o.get(k).is_some() && o.get(k) == item.get(k),
            _ => o == item,
        })
    };
    items.sort_by_key(|i| position(i).unwrap_or(usize::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smp(doc: Value, patch: Value) -> Value {
        let mut doc = doc;
        strategic_merge_patch(&mut doc, patch.to_string().as_bytes()).expect("patch");
        doc
    }

    #[test]
    fn containers_merge_by_name_and_other_fields_stay() {
        let pod = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"containers": [
            {"name": "web", "image": "web:1", "env": [{"name": "X", "value": "1"}]},
            {"name": "side", "image": "side:1"}]}});
        let out = smp(
            pod,
            json!({"metadata": {"labels": {"b": "2"}}, "spec": {"containers": [{"name": "web", "image": "web:2"}]}}),
        );
        assert_eq!(out["spec"]["containers"][0]["image"], "web:2");
        assert_eq!(out["spec"]["containers"][0]["env"][0]["value"], "1");
        assert_eq!(out["spec"]["containers"][1]["image"], "side:1");
        assert_eq!(out["metadata"]["labels"], json!({"a": "1", "b": "2"}));
    }

    #[test]
    fn directives_delete_replace_order_and_retain() {
        let doc = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}], "args": ["x"], "finalizers": ["f1"]}, "metadata": {"labels": {"k": "v"}}});
        let out = smp(
            doc.clone(),
            json!({"spec": {"containers": [{"name": "a", "$patch": "delete"}], "args": ["y"], "finalizers": ["f2"]}, "metadata": {"labels": null}}),
        );
        assert_eq!(out["spec"]["containers"], json!([{"name": "b"}]));
        assert_eq!(out["spec"]["args"], json!(["y"]));
        assert_eq!(out["spec"]["finalizers"], json!(["f1", "f2"]));
        assert!(out["metadata"].get("labels").is_none());
        let out = smp(
            doc.clone(),
            json!({"spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}], "containers": [{"name": "a", "image": "i"}]}}),
        );
        assert_eq!(
            out["spec"]["containers"],
            json!([{"name": "b"}, {"name": "a", "image": "i"}])
        );
        let out = smp(
            doc.clone(),
            json!({"spec": {"$patch": "replace", "args": ["z"]}}),
        );
        assert_eq!(out["spec"], json!({"args": ["z"]}));
        let out = smp(
            doc.clone(),
            json!({"spec": {"$retainKeys": ["args"], "args": ["q"]}}),
        );
        assert_eq!(out["spec"], json!({"args": ["q"]}));
        let out = smp(
            doc,
            json!({"spec": {"$deleteFromPrimitiveList/finalizers": ["f1"]}}),
        );
        assert_eq!(out["spec"]["finalizers"], json!([]));
    }

    #[test]
    fn garbage_patches_are_refused() {
        let mut doc = json!({"a": 1});
        for bad in [
            "[1,2]",
            "not json",
            "\"s\"",
            "{\"$patch\": \"explode\"}",
            "{\"spec\": {\"$bogus\": 1}}",
        ] {
            assert!(
                strategic_merge_patch(&mut doc, bad.as_bytes()).is_err(),
                "{bad}"
            );
        }
        assert!(json_patch(&mut doc, b"[{\"op\": \"remove\", \"path\": \"/nope\"}]").is_err());
        assert!(json_patch(&mut doc, b"{}").is_err());
        assert!(merge_patch(&mut doc, b"[]").is_err());
        assert_eq!(doc, json!({"a": 1}));
    }
}
