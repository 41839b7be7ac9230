//! ConfigMaps and Secrets read from manifests: validated and normalized the way the API
//! server does (default namespace, `stringData` folded into `data`), so the node only ever
//! sees one form.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};

use crate::meta::{FieldError, field_err, validate_name_and_namespace};

/// The most data one ConfigMap or Secret may hold, as in Kubernetes.
pub const MAX_DATA_BYTES: usize = 1024 * 1024;

/// Secret types whose required keys Brink checks.
const TLS_SECRET: &str = "kubernetes.io/tls";

/// A key of `data`: what a file in a configMap or secret volume is named.
pub fn is_config_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && key != "."
        && !key.starts_with("..")
}

fn check_keys<'a>(
    keys: impl Iterator<Item = (&'a str, usize, &'static str)>,
) -> Result<(), FieldError> {
    let mut total = 0usize;
    for (key, len, field) in keys {
        if !is_config_key(key) {
            return Err(field_err(
                format!("{field}[{key}]"),
                format!("{key:?} is not a valid key (letters, digits, '-', '_' and '.')"),
            ));
        }
        total = total.saturating_add(len);
    }
    if total > MAX_DATA_BYTES {
        return Err(field_err(
            "data",
            format!("{total} bytes of data is more than the limit of {MAX_DATA_BYTES}"),
        ));
    }
    Ok(())
}

/// Checks a ConfigMap and fills in its namespace.
pub fn validate_config_map(config_map: &mut ConfigMap) -> Result<(), FieldError> {
    validate_name_and_namespace(&mut config_map.metadata)?;
    let data = config_map.data.iter().flatten();
    let binary = config_map.binary_data.iter().flatten();
    check_keys(
        data.map(|(k, v)| (k.as_str(), v.len(), "data"))
            .chain(binary.map(|(k, v)| (k.as_str(), v.0.len(), "binaryData"))),
    )?;
    if let (Some(data), Some(binary)) = (&config_map.data, &config_map.binary_data)
        && let Some(key) = data.keys().find(|k| binary.contains_key(*k))
    {
        return Err(field_err(
            format!("binaryData[{key}]"),
            format!("key {key:?} is in both data and binaryData"),
        ));
    }
    Ok(())
}

/// Checks a Secret, fills in its namespace and type, and folds `stringData` into `data`
/// (a key in both takes the `stringData` value, as in Kubernetes).
pub fn validate_secret(secret: &mut Secret) -> Result<(), FieldError> {
    validate_name_and_namespace(&mut secret.metadata)?;
    let type_ = secret.type_.get_or_insert_with(|| "Opaque".into()).clone();
    if let Some(strings) = secret.string_data.take() {
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        for (key, value) in strings {
            data.insert(key, ByteString(value.into_bytes()));
        }
    }
    check_keys(
        secret
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.as_str(), v.0.len(), "data")),
    )?;
    if type_ == TLS_SECRET {
        for key in ["tls.crt", "tls.key"] {
            if !secret.data.as_ref().is_some_and(|d| d.contains_key(key)) {
                return Err(field_err(
                    format!("data[{key}]"),
                    format!("required for a {TLS_SECRET} secret"),
                ));
            }
        }
    }
    Ok(())
}
