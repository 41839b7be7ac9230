//! The site's certificate authority, member and admin credentials, join tokens, and the
//! TLS configurations members speak QUIC with.
//!
//! Owns `DATA_DIR/pki/` (`ca.crt`, `ca.key`, `member.crt`, `member.key`, `admin.crt`,
//! `admin.key`, `join-token`), written once and atomically, keys with mode 0600. Every
//! member holds the CA key: members are the control plane, and the one that admits a new
//! member hands it the CA so that any voter can admit the next (as kubeadm's
//! control-plane join shares the CA). Nodes (a later issue) never get it.
//!
//! Identity is in the certificate: a member's names are [`MEMBER_SERVER_NAME`] (what
//! dialers verify) and `m<id>.`[`MEMBER_SERVER_NAME`], which the receiver checks against
//! the id a peer claims, so one member's credential cannot speak for another.
//!
//! A join token is `brink1.<sha256 of the CA certificate, hex>.<secret, hex>`: the hash
//! lets a new member pin the CA before it trusts anything it is told (as k3s's and
//! kubeadm's tokens do); the secret proves the operator sent it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

/// The DNS name every member certificate carries and every dialer verifies.
pub const MEMBER_SERVER_NAME: &str = "member.brink.internal";
/// The DNS name of the admin credential.
pub const ADMIN_NAME: &str = "admin.brink.internal";
/// The ALPN protocol members speak.
pub const PEER_ALPN: &[u8] = b"brink-peer/1";
const CA_COMMON_NAME: &str = "brink site CA";
const TOKEN_PREFIX: &str = "brink1";

/// Why credentials could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a PEM {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error(
        "join token is malformed: expected brink1.<64 hex digits of the CA hash>.<64 hex digits of secret>"
    )]
    BadToken,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn ca_params() -> Result<rcgen::CertificateParams, PkiError> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// Certificate parameters for `names` with subject `CN=common_name` and an `O` per group.
fn subject_params<'a>(
    names: Vec<String>,
    common_name: &str,
    groups: impl IntoIterator<Item = &'a str>,
) -> Result<rcgen::CertificateParams, PkiError> {
    let mut params = rcgen::CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    for group in groups {
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, group);
    }
    Ok(params)
}

/// The DNS name that proves a certificate belongs to member `id`.
pub fn member_identity_name(id: u64) -> String {
    format!("m{id:x}.{MEMBER_SERVER_NAME}")
}

/// A certificate and its key, in PEM.
#[derive(Clone)]
pub struct Credential {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The site CA (certificate and key).
#[derive(Clone)]
pub struct SiteCa {
    pub cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
}

impl SiteCa {
    /// A new CA for a new site.
    pub fn generate() -> Result<Self, PkiError> {
        let key = rcgen::KeyPair::generate()?;
        let cert = ca_params()?.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
        })
    }

    /// The CA from PEM text (as stored, or as a join answer carried it).
    pub fn from_pem(cert_pem: &str, key_pem: &str, origin: &Path) -> Result<Self, PkiError> {
        let cert_der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| PkiError::Pem {
                path: origin.to_path_buf(),
                what: "certificate",
            })?;
        rcgen::KeyPair::from_pem(key_pem).map_err(|_| PkiError::Pem {
            path: origin.to_path_buf(),
            what: "private key",
        })?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            cert_der,
        })
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The CA certificate, DER-encoded.
    pub fn cert_der(&self) -> &[u8] {
        self.cert_der.as_ref()
    }

    /// Signs a PKCS#10 request (PEM) whose signature checks out, for `subject` (CN and O
    /// as the request has them, already checked by the caller), `dns`/`ips` as subject
    /// alternative names, `server` or client usage, valid from yesterday to `until`
    /// (year, month, day). Nothing else the request asks for is honoured.
    pub fn sign_request(
        &self,
        request_pem: &str,
        common_name: &str,
        organizations: &[String],
        names: (Vec<String>, Vec<std::net::IpAddr>),
        server: bool,
        valid: ((i32, u8, u8), (i32, u8, u8)),
    ) -> Result<String, PkiError> {
        let request = rcgen::CertificateSigningRequestParams::from_pem(request_pem)?;
        let mut params = subject_params(
            names.0,
            common_name,
            organizations.iter().map(String::as_str),
        )?;
        for ip in names.1 {
            params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
        }
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![if server {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        params.use_authority_key_identifier_extension = true;
        let ((y0, m0, d0), (y1, m1, d1)) = valid;
        params.not_before = rcgen::date_time_ymd(y0, m0, d0);
        params.not_after = rcgen::date_time_ymd(y1, m1, d1);
        let ca_key = rcgen::KeyPair::from_pem(&self.key_pem)?;
        let issuer = rcgen::Issuer::new(ca_params()?, ca_key);
        let signed = rcgen::CertificateSigningRequestParams {
            params,
            public_key: request.public_key,
        }
        .signed_by(&issuer)?;
        Ok(signed.pem())
    }

    /// The SHA-256 of the CA certificate, which join tokens pin.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.cert_der.as_ref()).into()
    }

    fn issue(&self, names: Vec<String>, common_name: &str) -> Result<Credential, PkiError> {
        self.issue_with_groups(names, common_name, &[])
    }

    fn issue_with_groups(
        &self,
        names: Vec<String>,
        common_name: &str,
        groups: &[&str],
    ) -> Result<Credential, PkiError> {
        let ca_key = rcgen::KeyPair::from_pem(&self.key_pem)?;
        let issuer = rcgen::Issuer::new(ca_params()?, ca_key);
        let key = rcgen::KeyPair::generate()?;
        let mut params = subject_params(names, common_name, groups.iter().copied())?;
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Credential {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A member's certificate: the shared member name and its own identity name.
    pub fn issue_member(&self, id: u64) -> Result<Credential, PkiError> {
        self.issue(
            vec![MEMBER_SERVER_NAME.to_owned(), member_identity_name(id)],
            &format!("brink member {id:x}"),
        )
    }

    /// The admin credential `--init` writes for the operator.
    pub fn issue_admin(&self) -> Result<Credential, PkiError> {
        self.issue(vec![ADMIN_NAME.to_owned()], "brink admin")
    }

    /// A client certificate for the Kubernetes API: CN is the user, each O a group
    /// (as kube-apiserver reads x509 client certificates).
    pub fn issue_api_client(&self, user: &str, groups: &[&str]) -> Result<Credential, PkiError> {
        self.issue_with_groups(Vec::new(), user, groups)
    }

    /// The API server's serving certificate, naming every address clients use.
    pub fn issue_api_serving(&self, names: Vec<String>) -> Result<Credential, PkiError> {
        self.issue(names, "brink-apiserver")
    }
}

/// A join token: the CA's hash and a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_hash: [u8; 32],
    pub secret: [u8; 32],
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs.
        write!(
            f,
            "JoinToken {{ ca_hash: {}, secret: <hidden> }}",
            hex::encode(self.ca_hash)
        )
    }
}

impl JoinToken {
    pub fn new(ca: &SiteCa) -> Self {
        let mut secret = [0u8; 32];
        for chunk in secret.chunks_mut(8) {
            chunk.copy_from_slice(&fastrand::u64(..).to_le_bytes());
        }
        // fastrand is not a CSPRNG: the secret also mixes in the CA key's fresh
        // randomness and the time, through SHA-256.
        let mut h = Sha256::new();
        h.update(secret);
        h.update(ca.key_pem.as_bytes());
        h.update(format!("{:?}", std::time::SystemTime::now()).as_bytes());
        Self {
            ca_hash: ca.hash(),
            secret: h.finalize().into(),
        }
    }

    pub fn parse(text: &str) -> Result<Self, PkiError> {
        let mut parts = text.trim().split('.');
        let (Some(TOKEN_PREFIX), Some(hash), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(PkiError::BadToken);
        };
        let mut token = Self {
            ca_hash: [0; 32],
            secret: [0; 32],
        };
        hex::decode_to_slice(hash, &mut token.ca_hash).map_err(|_| PkiError::BadToken)?;
        hex::decode_to_slice(secret, &mut token.secret).map_err(|_| PkiError::BadToken)?;
        Ok(token)
    }

    /// The token's text form, for `--token`.
    pub fn render(&self) -> String {
        format!(
            "{TOKEN_PREFIX}.{}.{}",
            hex::encode(self.ca_hash),
            hex::encode(self.secret)
        )
    }

    /// Whether `secret` is this token's, in time independent of where they differ.
    pub fn secret_matches(&self, secret: &[u8]) -> bool {
        secret.len() == self.secret.len()
            && secret
                .iter()
                .zip(self.secret.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// A member's credentials as kept in `DATA_DIR/pki`.
#[derive(Clone)]
pub struct MemberPki {
    pub ca: SiteCa,
    pub member: Credential,
    pub token: JoinToken,
}

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const MEMBER_CERT: &str = "member.crt";
const MEMBER_KEY: &str = "member.key";
const ADMIN_CERT: &str = "admin.crt";
const ADMIN_KEY: &str = "admin.key";
const TOKEN: &str = "join-token";

/// The folder of a data directory that holds its credentials.
pub fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki")
}

fn write_file(dir: &Path, name: &str, text: &str, secret: bool) -> Result<(), PkiError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io_error(&tmp))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_error(&path))
}

fn read_file(dir: &Path, name: &str) -> Result<String, PkiError> {
    let path = dir.join(name);
    std::fs::read_to_string(&path).map_err(io_error(&path))
}

impl MemberPki {
    /// Writes a member's credentials (and, with `admin`, the operator's) to `data_dir`.
    pub fn write(&self, data_dir: &Path, admin: Option<&Credential>) -> Result<(), PkiError> {
        let dir = pki_dir(data_dir);
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        write_file(&dir, CA_CERT, &self.ca.cert_pem, false)?;
        write_file(&dir, CA_KEY, &self.ca.key_pem, true)?;
        write_file(&dir, MEMBER_CERT, &self.member.cert_pem, false)?;
        write_file(&dir, MEMBER_KEY, &self.member.key_pem, true)?;
        write_file(&dir, TOKEN, &format!("{}\n", self.token.render()), true)?;
        if let Some(admin) = admin {
            write_file(&dir, ADMIN_CERT, &admin.cert_pem, false)?;
            write_file(&dir, ADMIN_KEY, &admin.key_pem, true)?;
        }
        let dir_file = std::fs::File::open(&dir).map_err(io_error(&dir))?;
        dir_file.sync_all().map_err(io_error(&dir))
    }

    /// Reads a member's credentials, refusing anything missing or malformed by name.
    pub fn read(data_dir: &Path) -> Result<Self, PkiError> {
        let dir = pki_dir(data_dir);
        let ca = SiteCa::from_pem(
            &read_file(&dir, CA_CERT)?,
            &read_file(&dir, CA_KEY)?,
            &dir.join(CA_CERT),
        )?;
        let member = Credential {
            cert_pem: read_file(&dir, MEMBER_CERT)?,
            key_pem: read_file(&dir, MEMBER_KEY)?,
        };
        let token = JoinToken::parse(&read_file(&dir, TOKEN)?)?;
        let pki = Self { ca, member, token };
        // Build the TLS pieces once so that a bad file is reported at start-up.
        pki.identity(&dir)?;
        Ok(pki)
    }

    fn identity(
        &self,
        dir: &Path,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
        let cert =
            CertificateDer::from_pem_slice(self.member.cert_pem.as_bytes()).map_err(|_| {
                PkiError::Pem {
                    path: dir.join(MEMBER_CERT),
                    what: "certificate",
                }
            })?;
        let key = PrivateKeyDer::from_pem_slice(self.member.key_pem.as_bytes()).map_err(|_| {
            PkiError::Pem {
                path: dir.join(MEMBER_KEY),
                what: "private key",
            }
        })?;
        Ok((vec![cert, self.ca.cert_der.clone()], key))
    }

    fn roots(&self) -> Result<rustls::RootCertStore, PkiError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.cert_der.clone())?;
        Ok(roots)
    }

    /// The QUIC server side: presents the member certificate; client certificates are
    /// verified under the site CA when present (a joining member has none yet and may
    /// only ask to join).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Verifier(e.to_string()))?;
        let (chain, key) = self.identity(Path::new("pki"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![PEER_ALPN.to_vec()];
        Ok(config)
    }

    /// The Kubernetes API's HTTPS side: a serving certificate naming `names`, issued
    /// now by the site CA; client certificates under the site CA are verified when
    /// presented (bearer tokens serve clients without one).
    pub fn api_server_config(&self, names: Vec<String>) -> Result<rustls::ServerConfig, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Verifier(e.to_string()))?;
        let serving = self.ca.issue_api_serving(names)?;
        let cert = CertificateDer::from_pem_slice(serving.cert_pem.as_bytes()).map_err(|_| {
            PkiError::Pem {
                path: PathBuf::from("api serving certificate"),
                what: "certificate",
            }
        })?;
        let key = PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).map_err(|_| {
            PkiError::Pem {
                path: PathBuf::from("api serving key"),
                what: "private key",
            }
        })?;
        Ok(rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![cert, self.ca.cert_der.clone()], key)?)
    }

    /// The QUIC client side between members: verifies the peer under the site CA and
    /// presents this member's certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (chain, key) = self.identity(Path::new("pki"))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(chain, key)?;
        config.alpn_protocols = vec![PEER_ALPN.to_vec()];
        Ok(config)
    }
}

/// A kubeconfig for `user` with `credential`, trusting the site CA, one cluster and
/// context per server address (the first is current).
pub fn kubeconfig(ca_pem: &str, servers: &[String], user: &str, credential: &Credential) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let mut clusters = String::new();
    let mut contexts = String::new();
    for (i, server) in servers.iter().enumerate() {
        let name = if i == 0 {
            "brink".to_owned()
        } else {
            format!("brink-{i}")
        };
        clusters.push_str(&format!(
            "- name: {name}\n  cluster:\n    server: https://{server}\n    certificate-authority-data: {}\n",
            b64(ca_pem)
        ));
        contexts.push_str(&format!(
            "- name: {name}\n  context:\n    cluster: {name}\n    user: {user}\n"
        ));
    }
    format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: brink\nclusters:\n{clusters}contexts:\n{contexts}users:\n- name: {user}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\npreferences: {{}}\n",
        b64(&credential.cert_pem),
        b64(&credential.key_pem),
    )
}

/// Writes `text` as `name` under `data_dir`'s credentials folder, readable by the owner
/// only.
pub fn write_secret_file(data_dir: &Path, name: &str, text: &str) -> Result<PathBuf, PkiError> {
    let dir = pki_dir(data_dir);
    std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    write_file(&dir, name, text, true)?;
    Ok(dir.join(name))
}

/// Whether `cert` (a peer's end-entity certificate, already verified under the CA by
/// rustls) names member `id`.
pub fn certifies_member(cert: &CertificateDer<'_>, id: u64) -> bool {
    let Ok(end_entity) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(member_identity_name(id)) else {
        return false;
    };
    end_entity.verify_is_valid_for_subject_name(&name).is_ok()
}

/// The client side a joining member uses: it has no credential yet and trusts the server
/// only if the server's chain holds a CA whose hash the token pins, and the server's
/// certificate verifies under that CA.
pub fn join_client_config(token: &JoinToken) -> Result<rustls::ClientConfig, PkiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCaVerifier {
        ca_hash: token.ca_hash,
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![PEER_ALPN.to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct PinnedCaVerifier {
    ca_hash: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| <[u8; 32]>::from(Sha256::digest(c.as_ref())) == self.ca_hash)
        else {
            return Err(rustls::Error::General(
                "the server's CA is not the one the join token pins".into(),
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let ca = SiteCa::generate().expect("ca");
        let token = JoinToken::new(&ca);
        assert_eq!(token.ca_hash, ca.hash());
        let text = token.render();
        assert_eq!(JoinToken::parse(&text).expect("parse"), token);
        assert!(token.secret_matches(&token.secret));
        assert!(!token.secret_matches(&[0; 32]));
        assert!(!token.secret_matches(&token.secret[..31]));
        for bad in [
            "",
            "brink1",
            "brink2.00.00",
            &text.replace("brink1", "brink2"),
            &format!("{text}.x"),
            &text[..text.len() - 1],
            &text.replace('a', "g"),
        ] {
            if bad != text {
                assert!(JoinToken::parse(bad).is_err(), "{bad:?} parsed");
            }
        }
        assert!(!format!("{token:?}").contains(&hex::encode(token.secret)));
    }

    #[test]
    fn member_certificates_name_their_member_and_no_other() {
        let ca = SiteCa::generate().expect("ca");
        let member = ca.issue_member(0x2a).expect("issue");
        let der = CertificateDer::from_pem_slice(member.cert_pem.as_bytes()).expect("pem");
        assert!(certifies_member(&der, 0x2a));
        assert!(!certifies_member(&der, 0x2b));
        let admin = ca.issue_admin().expect("admin");
        let der = CertificateDer::from_pem_slice(admin.cert_pem.as_bytes()).expect("pem");
        assert!(!certifies_member(&der, 0x2a));
    }

    #[test]
    fn credentials_survive_disk_and_corrupt_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = SiteCa::generate().expect("ca");
        let pki = MemberPki {
            member: ca.issue_member(1).expect("member"),
            token: JoinToken::new(&ca),
            ca,
        };
        pki.write(dir.path(), Some(&pki.ca.issue_admin().unwrap()))
            .expect("write");
        let back = MemberPki::read(dir.path()).expect("read");
        assert_eq!(back.token, pki.token);
        back.server_config().expect("server config");
        back.client_config().expect("client config");
        std::fs::write(pki_dir(dir.path()).join(MEMBER_KEY), "garbage").unwrap();
        let err = MemberPki::read(dir.path()).err().expect("refused");
        assert!(err.to_string().contains("member.key"), "{err}");
        std::fs::write(pki_dir(dir.path()).join(CA_CERT), "garbage").unwrap();
        let err = MemberPki::read(dir.path()).err().expect("refused");
        assert!(err.to_string().contains("ca.crt"), "{err}");
    }
}
