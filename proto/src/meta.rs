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
