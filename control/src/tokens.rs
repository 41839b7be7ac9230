//! Kubernetes bootstrap tokens, the way kubeadm makes them and kube-apiserver reads them:
//! `abcdef.0123456789abcdef`, stored as the Secret `kube-system/bootstrap-token-<id>`,
//! and the CA pin a joining node checks (`sha256:` of the CA's public key, kubeadm's
//! `--discovery-token-ca-cert-hash`).
//!
//! Owns the formats only: the API server authenticates with them
//! ([`crate::apiserver::auth`]) and `brink server token` writes them through the API.

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// The group nodes joining with a token Brink made are in (besides
/// `system:bootstrappers`); the CSR approver trusts it.
pub const NODE_TOKEN_GROUP: &str = "system:bootstrappers:brink:default-node-token";

/// A bootstrap token.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    pub id: String,
    pub secret: String,
}

impl std::fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret never reaches a log.
        write!(f, "BootstrapToken({}.****************)", self.id)
    }
}

/// Why a token could not be made or read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("a bootstrap token looks like abcdef.0123456789abcdef ([a-z0-9]{{6}}.[a-z0-9]{{16}})")]
    Format,
    #[error("no secure randomness: {0}")]
    Random(String),
    #[error("the CA certificate cannot be read: {0}")]
    Certificate(String),
}

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

impl BootstrapToken {
    /// A new token from the operating system's secure random source.
    pub fn generate() -> Result<Self, TokenError> {
        let provider = rustls::crypto::ring::default_provider();
        let mut text = String::with_capacity(22);
        // Rejection sampling keeps every character equally likely.
        while text.len() < 22 {
            let mut bytes = [0u8; 32];
            provider
                .secure_random
                .fill(&mut bytes)
                .map_err(|e| TokenError::Random(format!("{e:?}")))?;
            for b in bytes {
                if usize::from(b) < ALPHABET.len() * 7 && text.len() < 22 {
                    text.push(ALPHABET[usize::from(b) % ALPHABET.len()] as char);
                }
            }
        }
        Ok(Self {
            id: text[..6].to_owned(),
            secret: text[6..].to_owned(),
        })
    }

    /// Reads `abcdef.0123456789abcdef`.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let (id, secret) = text.trim().split_once('.').ok_or(TokenError::Format)?;
        let ok = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        };
        if !ok(id, 6) || !ok(secret, 16) {
            return Err(TokenError::Format);
        }
        Ok(Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// `abcdef.0123456789abcdef`.
    pub fn render(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }

    /// The Secret's name.
    pub fn secret_name(&self) -> String {
        format!("bootstrap-token-{}", self.id)
    }

    /// The Secret that makes the token valid for authentication (and for signing the
    /// cluster-info ConfigMap), until `expiration` (RFC 3339) when given.
    pub fn secret(&self, expiration: Option<&str>, description: &str, groups: &[&str]) -> Value {
        let mut data = serde_json::Map::new();
        data.insert("token-id".into(), json!(self.id));
        data.insert("token-secret".into(), json!(self.secret));
        data.insert("usage-bootstrap-authentication".into(), json!("true"));
        data.insert("usage-bootstrap-signing".into(), json!("true"));
        if let Some(at) = expiration {
            data.insert("expiration".into(), json!(at));
        }
        if !description.is_empty() {
            data.insert("description".into(), json!(description));
        }
        if !groups.is_empty() {
            data.insert("auth-extra-groups".into(), json!(groups.join(",")));
        }
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": self.secret_name(), "namespace": "kube-system"},
            "type": "bootstrap.kubernetes.io/token",
            "stringData": data,
        })
    }
}

/// kubeadm's CA pin: `sha256:<hex>` of the certificate's SubjectPublicKeyInfo, so a
/// re-issued CA with the same key keeps its pin.
pub fn ca_public_key_hash(cert_der: &[u8]) -> Result<String, TokenError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| TokenError::Certificate(e.to_string()))?;
    let spki = cert.tbs_certificate.subject_pki.raw;
    Ok(format!("sha256:{}", hex::encode(Sha256::digest(spki))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_differ() {
        let a = BootstrapToken::generate().expect("token");
        let b = BootstrapToken::generate().expect("token");
        assert_ne!(a, b);
        assert_eq!(BootstrapToken::parse(&a.render()), Ok(a.clone()));
        assert!(
            !format!("{a:?}").contains(&a.secret),
            "Debug hides the secret"
        );
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "abcdef",
            "abcdef.",
            "abcdef.0123456789abcde",
            "ABCDEF.0123456789abcdef",
            "abcdef.0123456789abcdef0",
            "abc_ef.0123456789abcdef",
        ] {
            assert_eq!(BootstrapToken::parse(bad), Err(TokenError::Format), "{bad}");
        }
    }

    #[test]
    fn the_secret_has_the_fields_kube_apiserver_reads() {
        let t = BootstrapToken::parse("abcdef.0123456789abcdef").expect("token");
        let s = t.secret(
            Some("2030-01-01T00:00:00Z"),
            "for shop 7",
            &[NODE_TOKEN_GROUP],
        );
        assert_eq!(s["metadata"]["name"], "bootstrap-token-abcdef");
        assert_eq!(s["type"], "bootstrap.kubernetes.io/token");
        assert_eq!(s["stringData"]["token-secret"], "0123456789abcdef");
        assert_eq!(s["stringData"]["usage-bootstrap-authentication"], "true");
        assert_eq!(s["stringData"]["auth-extra-groups"], NODE_TOKEN_GROUP);
    }

    #[test]
    fn the_ca_pin_hashes_the_public_key() {
        let ca = crate::peers::pki::SiteCa::generate().expect("ca");
        let der = ca.cert_der();
        let pin = ca_public_key_hash(der).expect("pin");
        assert!(pin.starts_with("sha256:") && pin.len() == 71, "{pin}");
        assert!(ca_public_key_hash(b"not a certificate").is_err());
    }
}
