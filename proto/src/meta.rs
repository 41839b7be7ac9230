//! Object metadata checks every kind shares: the field error they report, names
//! (DNS-1123 labels and subdomains) and the default namespace.
//!
//! Pure functions over `ObjectMeta`; each kind's own rules live beside the kind.

/// A problem with one field, before the source and document are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

pub fn field_err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// Checks a name and fills in the default namespace, as the API server does for every
/// namespaced object.
pub fn validate_name_and_namespace(
    metadata: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<(), FieldError> {
    let name = metadata
        .name
        .as_deref()
        .ok_or_else(|| field_err("metadata.name", "required"))?;
    if !is_dns_subdomain(name) {
        return Err(field_err(
            "metadata.name",
            format!("{name:?} is not a valid name (lowercase letters, digits, '-' and '.')"),
        ));
    }
    validate_labels_and_annotations(metadata)?;
    let namespace = metadata.namespace.get_or_insert_with(|| "default".into());
    if !is_dns_label(namespace) {
        return Err(field_err(
            "metadata.namespace",
            format!("{namespace:?} is not a valid namespace"),
        ));
    }
    Ok(())
}

/// A DNS-1123 label: what Kubernetes requires of namespaces and container names.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain: what Kubernetes requires of pod names.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// The most bytes all of an object's annotations may hold, keys and values together
/// (Kubernetes' `TotalAnnotationSizeLimitB`).
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;
/// The longest label value and the longest name part of a qualified key.
pub const MAX_LABEL_VALUE_BYTES: usize = 63;

fn is_name_part(s: &str) -> bool {
    let bytes = s.as_bytes();
    !s.is_empty()
        && s.len() <= MAX_LABEL_VALUE_BYTES
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A qualified name (`name` or `prefix/name`, the prefix a DNS subdomain): what label
/// and annotation keys must be.
pub fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_name_part(name),
        None => is_name_part(s),
    }
}

/// A label value: empty, or up to 63 alphanumerics with `-`, `_`, `.` inside.
pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_name_part(s)
}

/// Checks labels and annotations as the API server does: key grammar, label values, and
/// the total size of annotations.
pub fn validate_labels_and_annotations(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<(), FieldError> {
    for (key, value) in metadata.labels.iter().flatten() {
        if !is_qualified_name(key) {
            return Err(field_err(
                "metadata.labels",
                format!(
                    "{key:?}: a label key must be a qualified name (alphanumerics, '-', '_' or '.', at most 63, with an optional DNS subdomain prefix and '/')"
                ),
            ));
        }
        if !is_label_value(value) {
            return Err(field_err(
                "metadata.labels",
                format!(
                    "{value:?}: a label value must be empty or at most 63 alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
                ),
            ));
        }
    }
    let mut total = 0usize;
    for (key, value) in metadata.annotations.iter().flatten() {
        if !is_qualified_name(&key.to_lowercase()) {
            return Err(field_err(
                "metadata.annotations",
                format!("{key:?}: an annotation key must be a qualified name"),
            ));
        }
        total = total.saturating_add(key.len() + value.len());
    }
    if total > MAX_ANNOTATIONS_BYTES {
        return Err(field_err(
            "metadata.annotations",
            format!("Too long: may not be more than {MAX_ANNOTATIONS_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// The deepest nesting of flow collections (`[`, `{`) accepted in YAML or JSON text.
/// Kubernetes objects nest a few dozen levels at most; the YAML parser's time grows
/// faster than linearly with depth, so deep text is refused before it runs.
pub const MAX_NESTING: usize = 100;

/// Refuses text whose flow collections nest deeper than `max_depth`, looking past quoted
/// strings and comments. Linear in the text.
pub fn check_nesting(text: &str, max_depth: usize) -> Result<(), String> {
    let mut depth = 0usize;
    let mut in_single = false;
    let mut in_double = false;
    let mut in_comment = false;
    let mut escaped = false;
    let mut previous = '\n';
    for c in text.chars() {
        if in_comment {
            if c == '\n' {
                in_comment = false;
            }
        } else if in_double {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_double = false;
            }
        } else if in_single {
            if c == '\'' {
                in_single = false;
            }
        } else {
            match c {
                '"' => in_double = true,
                '\'' if !previous.is_alphanumeric() => in_single = true,
                '#' if previous.is_whitespace() => in_comment = true,
                '[' | '{' => {
                    depth += 1;
                    if depth > max_depth {
                        return Err(format!(
                            "nested more than {max_depth} levels deep: refused before parsing"
                        ));
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        previous = c;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_keys_and_values_follow_the_kubernetes_grammar() {
        for good in ["app", "app.kubernetes.io/name", "a_b", "A-1", "x/y"] {
            assert!(is_qualified_name(good), "{good}");
        }
        for bad in [
            "",
            "../a",
            "/a",
            "a/",
            "-a",
            "a-",
            "a b",
            "UPPER.com/x",
            &"a".repeat(64),
        ] {
            assert!(!is_qualified_name(bad), "{bad}");
        }
        assert!(is_label_value(""));
        assert!(is_label_value("v1.2_3"));
        assert!(!is_label_value("-v"));
        assert!(!is_label_value(&"v".repeat(64)));
    }

    #[test]
    fn annotations_are_capped_in_total() {
        let mut metadata = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            annotations: Some(
                [("big".to_owned(), "x".repeat(MAX_ANNOTATIONS_BYTES))]
                    .into_iter()
                    .collect(),
            ),
            ..Default::default()
        };
        let e = validate_labels_and_annotations(&metadata).expect_err("too big");
        assert_eq!(e.field, "metadata.annotations");
        metadata.annotations = Some([("ok".to_owned(), "x".repeat(1000))].into_iter().collect());
        metadata.labels = Some([("../a".to_owned(), "v".to_owned())].into_iter().collect());
        assert!(validate_labels_and_annotations(&metadata).is_err());
    }

    #[test]
    fn deep_nesting_is_refused_in_linear_time() {
        let deep = "[".repeat(100_000);
        assert!(check_nesting(&deep, MAX_NESTING).is_err());
        assert!(check_nesting("a: \"[[[[[[\"\nb: '{{{{' # [[[[\n", 2).is_ok());
        assert!(check_nesting("{a: [1, {b: [2]}]}", 4).is_ok());
        assert!(check_nesting("{a: [1, {b: [2]}]}", 3).is_err());
    }
}
