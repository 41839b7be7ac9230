//! Label and field selectors, parsed as kube-apiserver parses them and matched against
//! decoded objects.
//!
//! Labels: `a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`, comma-joined
//! (all must hold). Fields: `path=value`, `path==value`, `path!=value`, comma-joined,
//! over the fields each kind supports (others are refused as Kubernetes refuses them).

use serde_json::Value;

use super::kinds::Kind;

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelTerm {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector (empty: everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelTerm>);

fn valid_label_key(key: &str) -> bool {
    brink_proto::meta::is_qualified_name(key)
}

fn valid_label_value(value: &str) -> bool {
    brink_proto::meta::is_label_value(value)
}

/// Splits on commas that are not inside parentheses.
fn split_terms(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
}

fn parse_set(text: &str) -> Option<Vec<String>> {
    let inner = text.trim().strip_prefix('(')?.strip_suffix(')')?;
    let values: Vec<String> = inner
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect();
    values
        .iter()
        .all(|v| valid_label_value(v))
        .then_some(values)
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        if text.trim().is_empty() {
            return Ok(Self(terms));
        }
        for raw in split_terms(text) {
            let term = raw.trim();
            let bad = || format!("unable to parse requirement: {term:?}");
            if term.is_empty() {
                return Err(bad());
            }
            let parsed = if let Some(key) = term.strip_prefix('!') {
                LabelTerm::NotExists(key.trim().to_owned())
            } else if let Some((key, rest)) = term.split_once(" notin ") {
                LabelTerm::NotIn(key.trim().to_owned(), parse_set(rest).ok_or_else(bad)?)
            } else if let Some((key, rest)) = term.split_once(" in ") {
                LabelTerm::In(key.trim().to_owned(), parse_set(rest).ok_or_else(bad)?)
            } else if let Some((key, value)) = term.split_once("!=") {
                LabelTerm::NotEquals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, value)) = term.split_once("==") {
                LabelTerm::Equals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, value)) = term.split_once('=') {
                LabelTerm::Equals(key.trim().to_owned(), value.trim().to_owned())
            } else {
                LabelTerm::Exists(term.to_owned())
            };
            let (key, value) = match &parsed {
                LabelTerm::Equals(k, v) | LabelTerm::NotEquals(k, v) => (k, Some(v)),
                LabelTerm::In(k, _)
                | LabelTerm::NotIn(k, _)
                | LabelTerm::Exists(k)
                | LabelTerm::NotExists(k) => (k, None),
            };
            if !valid_label_key(key) {
                return Err(format!("invalid label key {key:?} in {term:?}"));
            }
            if let Some(v) = value
                && !valid_label_value(v)
            {
                return Err(format!("invalid label value {v:?} in {term:?}"));
            }
            terms.push(parsed);
        }
        Ok(Self(terms))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|term| match term {
            LabelTerm::Equals(k, v) => get(k) == Some(v.as_str()),
            LabelTerm::NotEquals(k, v) => get(k) != Some(v.as_str()),
            LabelTerm::In(k, set) => get(k).is_some_and(|x| set.iter().any(|s| s == x)),
            LabelTerm::NotIn(k, set) => get(k).is_none_or(|x| !set.iter().any(|s| s == x)),
            LabelTerm::Exists(k) => get(k).is_some(),
            LabelTerm::NotExists(k) => get(k).is_none(),
        })
    }
}

/// The fields a kind can be selected by, beyond `metadata.name` and `metadata.namespace`.
fn extra_fields(kind: &Kind) -> &'static [&'static str] {
    match (kind.group, kind.resource) {
        ("", "pods") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        ("", "events") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        ("events.k8s.io", "events") => &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "reason",
            "reportingController",
            "type",
        ],
        ("", "secrets") => &["type"],
        ("", "nodes") => &["spec.unschedulable"],
        ("", "namespaces") => &["status.phase"],
        ("apps", "replicasets") => &["status.replicas"],
        ("batch", "jobs") => &["status.successful"],
        ("certificates.k8s.io", "certificatesigningrequests") => &["spec.signerName"],
        _ => &[],
    }
}

/// A parsed field selector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// A field's value as a selector compares it (absent: the empty string, as Kubernetes
/// reads unset fields).
fn field_value(object: &Value, path: &str) -> String {
    let pointer = format!("/{}", path.replace('.', "/"));
    match object.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Null) | None => {
            // `source` of a core Event is `source.component`.
            if path == "source" {
                object
                    .pointer("/source/component")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            } else if path == "spec.unschedulable" || path == "spec.hostNetwork" {
                "false".to_owned()
            } else {
                String::new()
            }
        }
        Some(other) => other.to_string(),
    }
}

impl FieldSelector {
    pub fn parse(text: &str, kind: &Kind) -> Result<Self, String> {
        let mut terms = Vec::new();
        if text.trim().is_empty() {
            return Ok(Self(terms));
        }
        for raw in text.split(',') {
            let term = raw.trim();
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!(
                    "invalid selector: {term:?}; can't understand {term:?}"
                ));
            };
            let field = field.trim();
            let supported = field == "metadata.name"
                || (field == "metadata.namespace" && kind.namespaced)
                || extra_fields(kind).contains(&field);
            if !supported {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self(terms))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0
            .iter()
            .all(|(field, equal, value)| (field_value(object, field) == *value) == *equal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::kinds::find;
    use serde_json::json;

    #[test]
    fn label_selectors_match_as_kubernetes_matches() {
        let pod = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        for (selector, expected) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (web,api)", true),
            ("app notin (web)", false),
            ("app,tier", true),
            ("!app", false),
            ("!missing", true),
            ("missing!=x", true),
            ("app=web,tier=back", false),
            ("example.com/team notin (a, b)", true),
        ] {
            let s = LabelSelector::parse(selector).expect(selector);
            assert_eq!(s.matches(&pod), expected, "{selector}");
        }
        for bad in [
            "app=",
            "=web",
            "app in web",
            "a b c",
            "../a=b",
            "app=-x-",
            ",",
        ] {
            if bad == "app=" {
                // An empty value is a valid label value.
                assert!(LabelSelector::parse(bad).is_ok());
                continue;
            }
            assert!(LabelSelector::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn field_selectors_are_the_ones_each_kind_supports() {
        let pods = find("", "v1", "pods").expect("pods");
        let pod = json!({"metadata": {"name": "a", "namespace": "ns"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let s = FieldSelector::parse("spec.nodeName=n1,status.phase!=Failed", pods).expect("parse");
        assert!(s.matches(&pod));
        let unbound = FieldSelector::parse("spec.nodeName=", pods).expect("parse");
        assert!(!unbound.matches(&pod));
        assert!(FieldSelector::parse("spec.image=x", pods).is_err());
        let cms = find("", "v1", "configmaps").expect("configmaps");
        assert!(FieldSelector::parse("spec.nodeName=n1", cms).is_err());
        assert!(FieldSelector::parse("metadata.name=a", cms).is_ok());
        assert!(FieldSelector::parse("nonsense", cms).is_err());
    }
}
