//! Registry credentials, read from `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`
//! as other OCI tools do. Supported: `auth` (base64 `user:password`), `username` and
//! `password`, and `registrytoken` (a bearer token). Credential helpers are not run; a
//! config naming only a helper for a registry gets anonymous access and a log line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use super::OciError;

#[derive(Debug, Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    registrytoken: Option<String>,
}

/// The docker config file this process would read, if any.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"))
}

/// Credentials for `registry` from the default docker config; anonymous when none.
pub fn credentials_for(registry: &str) -> Result<RegistryAuth, OciError> {
    match docker_config_path() {
        Some(path) => credentials_from_file(&path, registry),
        None => Ok(RegistryAuth::Anonymous),
    }
}

/// Credentials for `registry` from the config file at `path`. A missing file means
/// anonymous; a malformed one is an error naming the file.
pub fn credentials_from_file(path: &Path, registry: &str) -> Result<RegistryAuth, OciError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => {
            return Err(OciError::Credentials {
                path: path.display().to_string(),
                message: e.to_string(),
            });
        }
    };
    credentials_from_text(&text, registry).map_err(|message| OciError::Credentials {
        path: path.display().to_string(),
        message,
    })
}

fn credentials_from_text(text: &str, registry: &str) -> Result<RegistryAuth, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if !value.is_object() {
        return Err("expected a JSON object".into());
    }
    let config: DockerConfig = serde_json::from_value(value).map_err(|e| e.to_string())?;
    let wanted = normalize(registry);
    let entry = config
        .auths
        .iter()
        .find(|(key, _)| normalize(key) == wanted);
    let Some((_, entry)) = entry else {
        if config.cred_helpers.contains_key(registry) || config.creds_store.is_some() {
            tracing::warn!(
                registry,
                "docker credential helpers are not supported; pulling anonymously"
            );
        }
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(token) = &entry.registrytoken {
        return Ok(RegistryAuth::Bearer(token.clone()));
    }
    if let Some(encoded) = &entry.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|e| format!("auth for {registry} is not base64: {e}"))?;
        let decoded =
            String::from_utf8(decoded).map_err(|_| format!("auth for {registry} is not UTF-8"))?;
        let (user, password) = decoded
            .split_once(':')
            .ok_or_else(|| format!("auth for {registry} is not user:password"))?;
        return Ok(RegistryAuth::Basic(user.to_string(), password.to_string()));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(RegistryAuth::Basic(u.clone(), p.clone())),
        _ => Ok(RegistryAuth::Anonymous),
    }
}

/// `https://index.docker.io/v1/` and `docker.io` name the same registry; so do
/// `https://host:port` and `host:port`.
fn normalize(key: &str) -> String {
    let key = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = key.split('/').next().unwrap_or(key);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".into(),
        h => h.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, pass: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    }

    #[test]
    fn reads_the_forms_docker_writes() {
        let text = format!(
            r#"{{"auths": {{"https://r.example:5000": {{"auth": "{}"}},
                "https://index.docker.io/v1/": {{"username": "u", "password": "p"}},
                "tok.example": {{"registrytoken": "T"}} }} }}"#,
            basic("alice", "s:cret")
        );
        let auth = credentials_from_text(&text, "r.example:5000").expect("parse");
        assert!(matches!(auth, RegistryAuth::Basic(u, p) if u == "alice" && p == "s:cret"));
        let auth = credentials_from_text(&text, "docker.io").expect("parse");
        assert!(matches!(auth, RegistryAuth::Basic(u, _) if u == "u"));
        let auth = credentials_from_text(&text, "tok.example").expect("parse");
        assert!(matches!(auth, RegistryAuth::Bearer(t) if t == "T"));
        let auth = credentials_from_text(&text, "other.example").expect("parse");
        assert!(matches!(auth, RegistryAuth::Anonymous));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            "",
            "{",
            "[]",
            r#"{"auths": {"r": {"auth": "%%%"}}}"#,
            r#"{"auths": {"r": {"auth": "bm9jb2xvbg=="}}}"#,
        ] {
            assert!(credentials_from_text(bad, "r").is_err(), "{bad:?}");
        }
    }
}
