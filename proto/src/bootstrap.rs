//! Joining a site the way kubeadm joins a cluster: bootstrap tokens
//! (`abcdef.0123456789abcdef`, stored as the Secret `kube-system/bootstrap-token-<id>`),
//! the signatures that vouch for the `kube-public/cluster-info` ConfigMap (a detached
//! JWS, HS256 keyed by the token, as the bootstrap signer writes them), and the CA pin a
//! joining node checks (`sha256:` of the CA's public key, kubeadm's
//! `--discovery-token-ca-cert-hash`).
//!
//! Formats only, no I/O: the API server authenticates tokens and signs cluster-info,
//! `brink server token` writes tokens, and a joining node verifies what it is shown.

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
        use ring::rand::SecureRandom as _;
        let random = ring::rand::SystemRandom::new();
        let mut text = String::with_capacity(22);
        // Rejection sampling keeps every character equally likely.
        while text.len() < 22 {
            let mut bytes = [0u8; 32];
            random
                .fill(&mut bytes)
                .map_err(|e| TokenError::Random(e.to_string()))?;
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

/// The `kube-public/cluster-info` ConfigMap's key for a token's signature.
pub fn signature_key(token_id: &str) -> String {
    format!("jws-kubeconfig-{token_id}")
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A detached JWS (`header..signature`) of `payload`, HS256 keyed by the whole token,
/// with the token's ID as `kid`: what the bootstrap signer writes into cluster-info.
pub fn sign_detached(payload: &str, token: &BootstrapToken) -> String {
    let header = b64url(format!(r#"{{"alg":"HS256","kid":"{}"}}"#, token.id).as_bytes());
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.render().as_bytes());
    let input = format!("{header}.{}", b64url(payload.as_bytes()));
    let tag = ring::hmac::sign(&key, input.as_bytes());
    format!("{header}..{}", b64url(tag.as_ref()))
}

/// Whether `jws` (detached) signs `payload` with `token` (HS256 only).
pub fn verify_detached(jws: &str, payload: &str, token: &BootstrapToken) -> bool {
    use base64::Engine as _;
    let mut parts = jws.split('.');
    let (Some(header), Some(""), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let decode = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()
    };
    let Some(header_json) =
        decode(header).and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
    else {
        return false;
    };
    if header_json.get("alg").and_then(serde_json::Value::as_str) != Some("HS256") {
        return false;
    }
    let Some(signature) = decode(signature) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, token.render().as_bytes());
    let input = format!("{header}.{}", b64url(payload.as_bytes()));
    // ring compares in constant time.
    ring::hmac::verify(&key, input.as_bytes(), &signature).is_ok()
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
        assert!(ca_public_key_hash(b"not a certificate").is_err());
    }

    #[test]
    fn a_signature_verifies_only_with_its_token_and_payload() {
        let t = BootstrapToken::parse("abcdef.0123456789abcdef").expect("token");
        let other = BootstrapToken::parse("abcdef.0123456789abcdee").expect("token");
        let jws = sign_detached("apiVersion: v1\nkind: Config\n", &t);
        let parts: Vec<&str> = jws.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert!(parts[1].is_empty(), "detached: {jws}");
        assert!(verify_detached(&jws, "apiVersion: v1\nkind: Config\n", &t));
        assert!(!verify_detached(
            &jws,
            "apiVersion: v1\nkind: Config\n",
            &other
        ));
        assert!(!verify_detached(
            &jws,
            "apiVersion: v1\nkind: Config \n",
            &t
        ));
        for garbage in ["", "..", "a.b.c", "x..y", &jws.replace("..", ".e30.")] {
            assert!(
                !verify_detached(garbage, "apiVersion: v1\nkind: Config\n", &t),
                "{garbage}"
            );
        }
    }
}
