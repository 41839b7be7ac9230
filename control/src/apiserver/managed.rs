//! Field ownership: `metadata.managedFields` and server-side apply, kept as
//! structured-merge-diff keeps them, so `kubectl apply --server-side`, its conflicts and
//! `--force-conflicts` behave as they do against kube-apiserver.
//!
//! Owns: field paths and sets, their `FieldsV1` encoding, recording who changed what on
//! an ordinary write ([`track_update`]), and the apply merge with its conflicts
//! ([`apply`]). It must not touch storage or requests: the handler reads, calls these
//! pure functions and writes.
//!
//! Kubernetes reads list types from each type's schema; Brink reads them from the field's
//! name with the table strategic merge uses ([`super::patch::merge_key`]): lists with a
//! merge key are maps keyed by it (`k:{"name":"web"}`), `finalizers` is a set
//! (`v:"x"`), every other list is atomic (owned and replaced whole).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::{Map, Value, json};

use super::patch::{merge_key, merges_primitives};

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Element {
    /// A field of a struct or a key of a map: `f:<name>`.
    Field(String),
    /// An item of a keyed list, by its key fields as a canonical JSON object:
    /// `k:{"name":"web"}`.
    Key(String),
    /// An item of a set, by its value as canonical JSON: `v:"x"`.
    Value(String),
}

/// A field path from the object's root.
pub type Path = Vec<Element>;

/// A set of field paths: leaves (scalars, atomic lists, empty maps) and the items of
/// keyed lists and sets themselves.
pub type FieldSet = BTreeSet<Path>;

/// A path as kube-apiserver prints it in conflicts: `.spec.containers[name="web"].image`.
pub struct Printed<'a>(pub &'a [Element]);

impl fmt::Display for Printed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for element in self.0 {
            match element {
                Element::Field(name) => write!(f, ".{name}")?,
                Element::Key(key) => {
                    let fields: Map<String, Value> = serde_json::from_str(key).unwrap_or_default();
                    let inner: Vec<String> =
                        fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    write!(f, "[{}]", inner.join(","))?;
                }
                Element::Value(v) => write!(f, "[={v}]")?,
            }
        }
        Ok(())
    }
}

/// Fields the server sets and nobody owns (kube-apiserver strips the same ones).
fn stripped(path: &[Element]) -> bool {
    let field = |i: usize| match path.get(i) {
        Some(Element::Field(f)) => Some(f.as_str()),
        _ => None,
    };
    match (field(0), field(1)) {
        (Some("apiVersion" | "kind"), _) => path.len() == 1,
        (Some("metadata"), Some(f)) => matches!(
            f,
            "name"
                | "namespace"
                | "creationTimestamp"
                | "selfLink"
                | "uid"
                | "generation"
                | "managedFields"
                | "resourceVersion"
                | "deletionTimestamp"
                | "deletionGracePeriodSeconds"
        ),
        _ => false,
    }
}

/// How a list is owned.
enum ListKind {
    Keyed(&'static str),
    Set,
    Atomic,
}

fn list_kind(field: Option<&str>, items: &[Value]) -> ListKind {
    let Some(field) = field else {
        return ListKind::Atomic;
    };
    if merges_primitives(field) && items.iter().all(|i| !i.is_object() && !i.is_array()) {
        return ListKind::Set;
    }
    let sample = items.iter().find_map(Value::as_object);
    match merge_key(field, |f| sample.is_some_and(|s| s.contains_key(f))) {
        // Every item must carry the key, or the list cannot be keyed.
        Some(key)
            if items
                .iter()
                .all(|i| i.get(key).is_some_and(|k| !k.is_null())) =>
        {
            ListKind::Keyed(key)
        }
        _ => ListKind::Atomic,
    }
}

fn key_of(item: &Value, key: &str) -> String {
    let mut m = Map::new();
    if let Some(v) = item.get(key) {
        m.insert(key.to_owned(), v.clone());
    }
    Value::Object(m).to_string()
}

/// The fields `object` sets, without those the server owns. `null`s set nothing.
pub fn fields_of(object: &Value) -> FieldSet {
    let mut set = FieldSet::new();
    let mut path = Vec::new();
    walk(object, None, &mut path, &mut set);
    set.retain(|p| !stripped(p));
    set
}

fn walk(value: &Value, field: Option<&str>, path: &mut Path, set: &mut FieldSet) {
    match value {
        Value::Null => {}
        Value::Object(map) => {
            if map.values().all(Value::is_null) {
                if !path.is_empty() {
                    set.insert(path.clone());
                }
                return;
            }
            for (k, v) in map {
                path.push(Element::Field(k.clone()));
                walk(v, Some(k), path, set);
                path.pop();
            }
        }
        Value::Array(items) => match list_kind(field, items) {
            ListKind::Keyed(key) => {
                for item in items {
                    path.push(Element::Key(key_of(item, key)));
                    set.insert(path.clone());
                    walk(item, None, path, set);
                    path.pop();
                }
                if items.is_empty() {
                    set.insert(path.clone());
                }
            }
            ListKind::Set => {
                for item in items {
                    path.push(Element::Value(item.to_string()));
                    set.insert(path.clone());
                    path.pop();
                }
                if items.is_empty() {
                    set.insert(path.clone());
                }
            }
            ListKind::Atomic => {
                set.insert(path.clone());
            }
        },
        _ => {
            set.insert(path.clone());
        }
    }
}

/// Whether a set's item is the one a `v:` path element names.
fn is_value(item: &Value, encoded: &str) -> bool {
    serde_json::from_str::<Value>(encoded).is_ok_and(|v| v == *item)
}

/// The value at `path`, if the object has one.
pub fn value_at<'a>(object: &'a Value, path: &[Element]) -> Option<&'a Value> {
    let mut here = object;
    let mut field: Option<&str> = None;
    for element in path {
        here = match element {
            Element::Field(name) => {
                field = Some(name);
                here.get(name)?
            }
            Element::Key(key) => {
                let items = here.as_array()?;
                let ListKind::Keyed(k) = list_kind(field, items) else {
                    return None;
                };
                field = None;
                items.iter().find(|i| key_of(i, k) == *key)?
            }
            Element::Value(v) => {
                field = None;
                here.as_array()?.iter().find(|i| is_value(i, v))?
            }
        };
    }
    Some(here)
}

/// What a write changed: paths it added or gave a new value, and paths it removed.
pub struct Changes {
    pub set: FieldSet,
    pub removed: FieldSet,
}

/// Compares two versions of an object field by field.
pub fn changes(old: &Value, new: &Value) -> Changes {
    let before = fields_of(old);
    let after = fields_of(new);
    let removed = before.difference(&after).cloned().collect();
    let set = after
        .iter()
        .filter(|p| {
            !before.contains(*p)
                || (!is_member(p) && value_at(old, p).is_some_and(|v| Some(v) != value_at(new, p)))
        })
        .cloned()
        .collect();
    Changes { set, removed }
}

/// Items of keyed lists and sets are owned as items; their values are their children.
fn is_member(path: &[Element]) -> bool {
    matches!(path.last(), Some(Element::Key(_)))
}

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    pub api_version: String,
    pub time: Option<String>,
    pub subresource: Option<String>,
    pub fields: FieldSet,
}

impl Entry {
    fn same_owner(&self, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource.as_deref() == subresource
    }

    /// How conflicts name this manager: `"kubectl" using v1` for an update.
    fn printed(&self) -> String {
        let mut s = format!("{:?}", self.manager);
        if let Some(sub) = &self.subresource {
            s.push_str(&format!(" with subresource {sub:?}"));
        }
        if self.operation == "Update" {
            s.push_str(&format!(" using {}", self.api_version));
        }
        s
    }
}

/// `metadata.managedFields` that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct BadManagedFields(pub String);

/// Reads `metadata.managedFields` (absent: none).
pub fn entries(object: &Value) -> Result<Vec<Entry>, BadManagedFields> {
    let Some(list) = object.pointer("/metadata/managedFields") else {
        return Ok(Vec::new());
    };
    let Some(list) = list.as_array() else {
        return Err(BadManagedFields(
            "metadata.managedFields must be a list".into(),
        ));
    };
    list.iter().enumerate().map(|(i, e)| entry(i, e)).collect()
}

fn entry(i: usize, e: &Value) -> Result<Entry, BadManagedFields> {
    let bad = |why: &str| BadManagedFields(format!("metadata.managedFields[{i}]: {why}"));
    let text = |name: &str| e.get(name).and_then(Value::as_str).map(str::to_owned);
    let operation = text("operation").unwrap_or_default();
    if !matches!(operation.as_str(), "Apply" | "Update") {
        return Err(bad("operation must be Apply or Update"));
    }
    if text("fieldsType").is_some_and(|t| t != "FieldsV1") {
        return Err(bad("fieldsType must be FieldsV1"));
    }
    let mut fields = FieldSet::new();
    if let Some(tree) = e.get("fieldsV1") {
        read_tree(tree, &mut Vec::new(), &mut fields).map_err(|why| bad(&why))?;
    }
    Ok(Entry {
        manager: text("manager").unwrap_or_default(),
        operation,
        api_version: text("apiVersion").unwrap_or_default(),
        time: text("time"),
        subresource: text("subresource").filter(|s| !s.is_empty()),
        fields,
    })
}

fn read_tree(tree: &Value, path: &mut Path, set: &mut FieldSet) -> Result<(), String> {
    let Some(map) = tree.as_object() else {
        return Err("fieldsV1 nodes must be objects".into());
    };
    if map.is_empty() && !path.is_empty() {
        set.insert(path.clone());
    }
    for (key, child) in map {
        if key == "." {
            set.insert(path.clone());
            continue;
        }
        let element = if let Some(name) = key.strip_prefix("f:") {
            Element::Field(name.to_owned())
        } else if let Some(k) = key.strip_prefix("k:") {
            let parsed: Value =
                serde_json::from_str(k).map_err(|_| format!("bad key {key:?} in fieldsV1"))?;
            if !parsed.is_object() {
                return Err(format!("bad key {key:?} in fieldsV1"));
            }
            Element::Key(parsed.to_string())
        } else if let Some(v) = key.strip_prefix("v:") {
            let parsed: Value =
                serde_json::from_str(v).map_err(|_| format!("bad value {key:?} in fieldsV1"))?;
            Element::Value(parsed.to_string())
        } else {
            return Err(format!("unknown fieldsV1 key {key:?}"));
        };
        path.push(element);
        read_tree(child, path, set)?;
        path.pop();
    }
    Ok(())
}

/// The `fieldsV1` tree of a set.
pub fn tree(set: &FieldSet) -> Value {
    #[derive(Default)]
    struct Node {
        member: bool,
        children: BTreeMap<String, Node>,
    }
    let mut root = Node::default();
    for path in set {
        let mut node = &mut root;
        for element in path {
            let key = match element {
                Element::Field(f) => format!("f:{f}"),
                Element::Key(k) => format!("k:{k}"),
                Element::Value(v) => format!("v:{v}"),
            };
            node = node.children.entry(key).or_default();
        }
        node.member = true;
    }
    fn encode(node: &Node) -> Value {
        let mut map = Map::new();
        if node.member && !node.children.is_empty() {
            map.insert(".".into(), json!({}));
        }
        for (k, child) in &node.children {
            map.insert(k.clone(), encode(child));
        }
        Value::Object(map)
    }
    encode(&root)
}

/// Writes `entries` into the object's `metadata.managedFields` (removing it when empty).
pub fn store(object: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut m = Map::new();
            m.insert("manager".into(), json!(e.manager));
            m.insert("operation".into(), json!(e.operation));
            m.insert("apiVersion".into(), json!(e.api_version));
            if let Some(t) = &e.time {
                m.insert("time".into(), json!(t));
            }
            m.insert("fieldsType".into(), json!("FieldsV1"));
            m.insert("fieldsV1".into(), tree(&e.fields));
            if let Some(s) = &e.subresource {
                m.insert("subresource".into(), json!(s));
            }
            Value::Object(m)
        })
        .collect();
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// Who writes, as managedFields records it.
#[derive(Debug, Clone)]
pub struct Writer<'a> {
    pub manager: &'a str,
    pub api_version: &'a str,
    pub subresource: Option<&'a str>,
    /// RFC 3339, seconds.
    pub now: &'a str,
}

/// Records an ordinary write (create, update, non-apply patch) by `writer`: the fields it
/// set become its own (taken from whoever had them), the fields it removed nobody's.
pub fn track_update(entries: &mut Vec<Entry>, writer: &Writer<'_>, old: &Value, new: &Value) {
    let Changes { set, removed } = changes(old, new);
    for e in entries.iter_mut() {
        e.fields.retain(|p| !removed.contains(p));
        if !e.same_owner(writer.manager, "Update", writer.subresource) {
            e.fields.retain(|p| !set.contains(p));
        }
    }
    if !set.is_empty() {
        match entries
            .iter_mut()
            .find(|e| e.same_owner(writer.manager, "Update", writer.subresource))
        {
            Some(e) => {
                e.fields.extend(set);
                e.api_version = writer.api_version.to_owned();
                e.time = Some(writer.now.to_owned());
            }
            None => entries.push(Entry {
                manager: writer.manager.to_owned(),
                operation: "Update".into(),
                api_version: writer.api_version.to_owned(),
                time: Some(writer.now.to_owned()),
                subresource: writer.subresource.map(str::to_owned),
                fields: set,
            }),
        }
    }
    entries.retain(|e| !e.fields.is_empty());
}

/// An apply that would change fields other managers own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflicts(pub Vec<(String, Path)>);

impl Conflicts {
    /// kube-apiserver's message: `Apply failed with 1 conflict: conflict with "m" using
    /// v1: .spec.x`.
    pub fn message(&self) -> String {
        if let [(manager, path)] = self.0.as_slice() {
            return format!(
                "Apply failed with 1 conflict: conflict with {manager}: {}",
                Printed(path)
            );
        }
        let mut by_manager: BTreeMap<&str, Vec<&Path>> = BTreeMap::new();
        for (m, p) in &self.0 {
            by_manager.entry(m).or_default().push(p);
        }
        let mut lines = Vec::new();
        for (m, paths) in by_manager {
            lines.push(format!("conflicts with {m}:"));
            lines.extend(paths.iter().map(|p| format!("- {}", Printed(p))));
        }
        format!(
            "Apply failed with {} conflicts: {}",
            self.0.len(),
            lines.join("\n")
        )
    }
}

/// Server-side apply of `config` by `writer` onto `live` (the stored object, with its
/// managedFields in `entries`): merges what `config` sets, removes what `writer` applied
/// before and no longer does (unless someone else owns it), and refuses to change fields
/// other managers own unless `force`. Returns the merged object; `entries` hold the new
/// ownership.
pub fn apply(
    live: &Value,
    config: &Value,
    entries: &mut Vec<Entry>,
    writer: &Writer<'_>,
    force: bool,
) -> Result<Value, Conflicts> {
    let applied = fields_of(config);
    let mine = |e: &Entry| e.same_owner(writer.manager, "Apply", writer.subresource);
    let before: FieldSet = entries
        .iter()
        .filter(|e| mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let others: FieldSet = entries
        .iter()
        .filter(|e| !mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let mut merged = live.clone();
    merge_into(&mut merged, config, None);
    // What this manager stopped applying goes, unless another manager owns it or
    // something under it.
    let dropped: Vec<&Path> = before
        .iter()
        .filter(|p| !applied.contains(*p))
        .filter(|p| !others.iter().any(|o| o.starts_with(p)))
        .collect();
    for path in dropped {
        remove_at(&mut merged, path);
    }
    let changed = changes(live, &merged);
    let mut conflicts = Vec::new();
    for e in entries.iter().filter(|e| !mine(e)) {
        for p in e.fields.intersection(&changed.set) {
            if !is_member(p) {
                conflicts.push((e.printed(), p.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(Conflicts(conflicts));
    }
    for e in entries.iter_mut() {
        e.fields.retain(|p| !changed.removed.contains(p));
        if !mine(e) {
            // Forced: the fields this apply changed are no longer theirs.
            e.fields
                .retain(|p| !(changed.set.contains(p) && applied.contains(p)));
        }
    }
    match entries.iter_mut().find(|e| mine(e)) {
        Some(e) => {
            e.fields = applied;
            e.api_version = writer.api_version.to_owned();
            e.time = Some(writer.now.to_owned());
        }
        None => entries.push(Entry {
            manager: writer.manager.to_owned(),
            operation: "Apply".into(),
            api_version: writer.api_version.to_owned(),
            time: Some(writer.now.to_owned()),
            subresource: writer.subresource.map(str::to_owned),
            fields: applied,
        }),
    }
    entries.retain(|e| !e.fields.is_empty());
    Ok(merged)
}

/// The annotation kubectl's client-side apply keeps its last configuration in.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Fields kubectl's server-side apply may take over without a conflict when an object
/// moves from client-side apply: those of the last client-side configuration that still
/// have its values in the live object (kube-apiserver's rule, for the manager `kubectl`
/// only). None when the object has no usable annotation.
pub fn taken_over_from_client_side_apply(live: &Value, api_version: &str) -> Option<FieldSet> {
    let text = live
        .pointer("/metadata/annotations")?
        .get(LAST_APPLIED)?
        .as_str()?;
    let last: Value = serde_json::from_str(text).ok()?;
    if last.get("apiVersion").and_then(Value::as_str) != Some(api_version) {
        return None;
    }
    let live_fields = fields_of(live);
    Some(
        fields_of(&last)
            .into_iter()
            .filter(|p| {
                live_fields.contains(p) && (is_member(p) || value_at(&last, p) == value_at(live, p))
            })
            .collect(),
    )
}

/// Merges what `config` sets into `target`: maps field by field, keyed lists item by
/// item, sets as unions, everything else replaced.
fn merge_into(target: &mut Value, config: &Value, field: Option<&str>) {
    match (target, config) {
        (Value::Object(t), Value::Object(c)) => {
            for (k, v) in c {
                if v.is_null() {
                    continue;
                }
                match t.get_mut(k) {
                    Some(existing) => merge_into(existing, v, Some(k)),
                    None => {
                        t.insert(k.clone(), without_nulls(v));
                    }
                }
            }
        }
        (Value::Array(t), Value::Array(c)) => match list_kind(field, c) {
            ListKind::Keyed(key) if matches!(list_kind(field, t), ListKind::Keyed(k) if k == key) => {
                for item in c {
                    let id = key_of(item, key);
                    match t.iter_mut().find(|i| key_of(i, key) == id) {
                        Some(existing) => merge_into(existing, item, None),
                        None => t.push(without_nulls(item)),
                    }
                }
            }
            ListKind::Set => {
                for item in c {
                    if !t.contains(item) {
                        t.push(item.clone());
                    }
                }
            }
            _ => *t = c.clone(),
        },
        (t, c) => *t = without_nulls(c),
    }
}

fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// Removes the field, item or set value at `path` (nothing if it is not there).
fn remove_at(object: &mut Value, path: &[Element]) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let parent_field = match parent_path.last() {
        Some(Element::Field(f)) => Some(f.clone()),
        _ => None,
    };
    let Some(parent) = value_at_mut(object, parent_path) else {
        return;
    };
    match last {
        Element::Field(name) => {
            if let Some(m) = parent.as_object_mut() {
                m.remove(name);
            }
        }
        Element::Key(key) => {
            if let Some(items) = parent.as_array_mut()
                && let ListKind::Keyed(k) = list_kind(parent_field.as_deref(), items)
            {
                items.retain(|i| key_of(i, k) != *key);
            }
        }
        Element::Value(v) => {
            if let Some(items) = parent.as_array_mut() {
                items.retain(|i| !is_value(i, v));
            }
        }
    }
}

fn value_at_mut<'a>(object: &'a mut Value, path: &[Element]) -> Option<&'a mut Value> {
    let mut here = object;
    let mut field: Option<String> = None;
    for element in path {
        here = match element {
            Element::Field(name) => {
                field = Some(name.clone());
                here.get_mut(name)?
            }
            Element::Key(key) => {
                let items = here.as_array_mut()?;
                let ListKind::Keyed(k) = list_kind(field.as_deref(), items) else {
                    return None;
                };
                field = None;
                items.iter_mut().find(|i| key_of(i, k) == *key)?
            }
            Element::Value(v) => {
                field = None;
                here.as_array_mut()?.iter_mut().find(|i| is_value(i, v))?
            }
        };
    }
    Some(here)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: &str = "2026-12-02T00:00:00Z";

    fn writer(manager: &str) -> Writer<'_> {
        Writer {
            manager,
            api_version: "v1",
            subresource: None,
            now: NOW,
        }
    }

    fn pod(image: &str) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "d", "uid": "u", "labels": {"app": "a"},
                          "finalizers": ["x/y"]},
            "spec": {"containers": [{"name": "web", "image": image, "ports": [{"containerPort": 80}]},
                                    {"name": "side", "image": "s", "args": ["a", "b"]}]}
        })
    }

    #[test]
    fn fields_v1_round_trips_as_kube_apiserver_writes_it() {
        let set = fields_of(&pod("i"));
        let t = tree(&set);
        assert_eq!(t["f:metadata"]["f:labels"]["f:app"], json!({}));
        assert!(t["f:metadata"].get("f:name").is_none(), "server-owned");
        assert_eq!(t["f:metadata"]["f:finalizers"]["v:\"x/y\""], json!({}));
        let web = &t["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"];
        assert_eq!(web["."], json!({}));
        assert_eq!(web["f:image"], json!({}));
        assert_eq!(
            web["f:ports"]["k:{\"containerPort\":80}"]["f:containerPort"],
            json!({})
        );
        // Atomic lists are leaves.
        assert_eq!(
            t["f:spec"]["f:containers"]["k:{\"name\":\"side\"}"]["f:args"],
            json!({})
        );
        let mut back = FieldSet::new();
        read_tree(&t, &mut Vec::new(), &mut back).expect("reads");
        assert_eq!(back, set);
    }

    #[test]
    fn garbage_managed_fields_are_refused_with_the_entry_named() {
        for bad in [
            json!("x"),
            json!([{"operation": "Take"}]),
            json!([{"operation": "Apply", "fieldsType": "FieldsV2"}]),
            json!([{"operation": "Apply", "fieldsV1": {"q:x": {}}}]),
            json!([{"operation": "Apply", "fieldsV1": {"k:notjson": {}}}]),
            json!([{"operation": "Apply", "fieldsV1": {"f:a": 3}}]),
        ] {
            let object = json!({"metadata": {"managedFields": bad}});
            assert!(entries(&object).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn an_update_takes_the_fields_it_changes_from_their_owner() {
        let mut entries = Vec::new();
        let empty = json!({});
        track_update(&mut entries, &writer("creator"), &empty, &pod("i"));
        assert_eq!(entries.len(), 1);
        track_update(&mut entries, &writer("editor"), &pod("i"), &pod("j"));
        let image = vec![
            Element::Field("spec".into()),
            Element::Field("containers".into()),
            Element::Key("{\"name\":\"web\"}".into()),
            Element::Field("image".into()),
        ];
        assert!(entries[1].fields.contains(&image));
        assert!(!entries[0].fields.contains(&image));
        assert_eq!(entries[1].fields.len(), 1);
        // A write that changes nothing records nothing.
        track_update(&mut entries, &writer("idle"), &pod("j"), &pod("j"));
        assert_eq!(entries.len(), 2);
    }

    #[test]
    fn apply_conflicts_with_another_owner_unless_forced() {
        let mut entries = Vec::new();
        track_update(&mut entries, &writer("kubectl-edit"), &json!({}), &pod("i"));
        let config = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "web", "image": "new"}]}});
        let err = apply(
            &pod("i"),
            &config,
            &mut entries.clone(),
            &writer("ci"),
            false,
        )
        .expect_err("conflict");
        assert_eq!(
            err.message(),
            "Apply failed with 1 conflict: conflict with \"kubectl-edit\" using v1: .spec.containers[name=\"web\"].image"
        );
        // The same value is shared, not a conflict.
        let same = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "web", "image": "i"}]}});
        let mut shared = entries.clone();
        apply(&pod("i"), &same, &mut shared, &writer("ci"), false).expect("no conflict");
        assert_eq!(shared.len(), 2);
        let merged = apply(&pod("i"), &config, &mut entries, &writer("ci"), true).expect("forced");
        assert_eq!(merged["spec"]["containers"][0]["image"], "new");
        assert_eq!(
            merged["spec"]["containers"][1]["name"], "side",
            "others stay"
        );
        assert_eq!(entries[1].operation, "Apply");
        assert!(
            entries[0]
                .fields
                .iter()
                .all(|p| Printed(p).to_string() != ".spec.containers[name=\"web\"].image")
        );
    }

    #[test]
    fn a_field_no_longer_applied_goes_unless_someone_else_owns_it() {
        let mut entries = Vec::new();
        let base = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
        let first = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
            "data": {"a": "1", "b": "2"}});
        let live = apply(&base, &first, &mut entries, &writer("ci"), false).expect("applies");
        let second = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
            "data": {"a": "1"}});
        let live2 =
            apply(&live, &second, &mut entries.clone(), &writer("ci"), false).expect("applies");
        assert_eq!(live2["data"], json!({"a": "1"}));
        // Another manager took b meanwhile: it stays.
        let mut edited = live.clone();
        edited["data"]["b"] = json!("3");
        track_update(&mut entries, &writer("kubectl-edit"), &live, &edited);
        let live3 = apply(&edited, &second, &mut entries, &writer("ci"), false).expect("applies");
        assert_eq!(live3["data"], json!({"a": "1", "b": "3"}));
    }

    #[test]
    fn kubectl_takes_over_what_its_client_side_apply_set_unchanged() {
        let last = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
            "data": {"a": "1", "b": "2"}});
        let mut live = last.clone();
        live["metadata"]["annotations"] = json!({LAST_APPLIED: last.to_string()});
        live["data"]["b"] = json!("edited");
        let taken = taken_over_from_client_side_apply(&live, "v1").expect("annotation");
        let a = vec![Element::Field("data".into()), Element::Field("a".into())];
        let b = vec![Element::Field("data".into()), Element::Field("b".into())];
        assert!(taken.contains(&a));
        assert!(!taken.contains(&b), "edited since: not kubectl's to take");
        assert_eq!(taken_over_from_client_side_apply(&live, "apps/v1"), None);
        assert_eq!(taken_over_from_client_side_apply(&last, "v1"), None);
    }

    #[test]
    fn several_conflicts_are_listed_by_manager() {
        let c = Conflicts(vec![
            ("\"b\" using v1".into(), vec![Element::Field("x".into())]),
            ("\"a\"".into(), vec![Element::Field("y".into())]),
        ]);
        assert_eq!(
            c.message(),
            "Apply failed with 2 conflicts: conflicts with \"a\":\n- .y\nconflicts with \"b\" using v1:\n- .x"
        );
    }
}
