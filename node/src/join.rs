//! Joining a site the way a kubelet joins a cluster with kubeadm:
//!
//! 1. **Token discovery**: read `kube-public/cluster-info` without trusting the server
//!    yet, check its signature with the bootstrap token (only someone who knows the token
//!    could have signed it) and the CA inside it against the pinned hash.
//! 2. **TLS bootstrap**: with the token, ask the CSR API for a client certificate
//!    (`kubernetes.io/kube-apiserver-client-kubelet`, `CN=system:node:<name>`,
//!    `O=system:nodes`) and wait until the site signs it.
//! 3. Write a kubeconfig with the node's own credential; the token is not needed again.
//!
//! Owns those steps and nothing after them: registering the Node and running its pods
//! read the kubeconfig this writes. Talks to the site only through the Kubernetes API
//! (kube-rs), as it would to any cluster.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use brink_proto::bootstrap::{BootstrapToken, ca_public_key_hash, signature_key, verify_detached};
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

/// The signer of a node's client certificate.
pub const KUBELET_CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";

/// What a node joins with.
#[derive(Debug, Clone)]
pub struct JoinSettings {
    /// The API server's URL (`https://host:6443`).
    pub server: String,
    pub token: BootstrapToken,
    /// `sha256:<hex>` of the site CA's public key (`--discovery-token-ca-cert-hash`).
    pub ca_pin: String,
    pub node_name: String,
    /// How long to wait for the certificate to be signed.
    pub timeout: Duration,
    /// How often to look whether it has been.
    pub poll: Duration,
}

/// Why a join failed. Each names what to check.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("--server {0:?} is not an https:// URL")]
    Server(String),
    #[error("cannot reach the site at {server}: {source}")]
    Unreachable {
        server: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("cluster-info: {0}")]
    ClusterInfo(String),
    #[error(
        "cluster-info has no signature for token {0}: the token is unknown, expired, or not for signing"
    )]
    Unsigned(String),
    #[error(
        "cluster-info's signature does not match the token: a wrong token, or someone between this node and the site"
    )]
    BadSignature,
    #[error("the site's CA is {found}, not {pinned} (--discovery-token-ca-cert-hash)")]
    WrongCa { found: String, pinned: String },
    #[error("the certificate request was refused: {source}")]
    Request {
        #[source]
        source: Box<kube::Error>,
    },
    #[error("the certificate request was {0}")]
    Refused(String),
    #[error("no certificate after {0:?}: is the site's leader running?")]
    Timeout(Duration),
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The node's credential and what it trusts.
#[derive(Clone)]
pub struct Joined {
    pub server: String,
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

fn check_server(server: &str) -> Result<http::Uri, JoinError> {
    let uri: http::Uri = server
        .parse()
        .map_err(|_| JoinError::Server(server.to_owned()))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() {
        return Err(JoinError::Server(server.to_owned()));
    }
    Ok(uri)
}

/// Step 1: the site's CA, once cluster-info's signature and the pin both check out.
pub async fn discover(settings: &JoinSettings) -> Result<String, JoinError> {
    let uri = check_server(&settings.server)?;
    let unreachable = |source| JoinError::Unreachable {
        server: settings.server.clone(),
        source: Box::new(source),
    };
    // Nothing is trusted yet: the content, not the connection, is checked below.
    let mut config = kube::Config::new(uri);
    config.accept_invalid_certs = true;
    let client = kube::Client::try_from(config).map_err(unreachable)?;
    let info = Api::<ConfigMap>::namespaced(client, "kube-public")
        .get("cluster-info")
        .await
        .map_err(unreachable)?;
    let data = info.data.unwrap_or_default();
    let payload = data
        .get("kubeconfig")
        .ok_or_else(|| JoinError::ClusterInfo("no kubeconfig in it".into()))?;
    let signature = data
        .get(&signature_key(&settings.token.id))
        .ok_or_else(|| JoinError::Unsigned(settings.token.id.clone()))?;
    if !verify_detached(signature, payload, &settings.token) {
        return Err(JoinError::BadSignature);
    }
    let ca_pem = ca_of(payload)?;
    let der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| JoinError::ClusterInfo(format!("its CA is not a PEM certificate: {e}")))?;
    let found = ca_public_key_hash(&der).map_err(|e| JoinError::ClusterInfo(e.to_string()))?;
    if !found.eq_ignore_ascii_case(&settings.ca_pin) {
        return Err(JoinError::WrongCa {
            found,
            pinned: settings.ca_pin.clone(),
        });
    }
    Ok(ca_pem)
}

/// The CA (PEM) of cluster-info's kubeconfig.
fn ca_of(kubeconfig: &str) -> Result<String, JoinError> {
    brink_proto::meta::check_nesting(kubeconfig, brink_proto::meta::MAX_NESTING)
        .map_err(|e| JoinError::ClusterInfo(format!("its kubeconfig is {e}")))?;
    let config: serde_json::Value = serde_yaml::from_str(kubeconfig)
        .map_err(|e| JoinError::ClusterInfo(format!("its kubeconfig is not YAML: {e}")))?;
    let data = config
        .pointer("/clusters/0/cluster/certificate-authority-data")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| JoinError::ClusterInfo("its kubeconfig names no CA".into()))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|_| JoinError::ClusterInfo("its CA is not base64".into()))?;
    String::from_utf8(bytes).map_err(|_| JoinError::ClusterInfo("its CA is not PEM text".into()))
}

/// A client for the site: trusting `ca_pem`, authenticating with `auth`.
fn client(
    server: &str,
    ca_pem: &str,
    auth: kube::config::AuthInfo,
) -> Result<kube::Client, JoinError> {
    let uri = check_server(server)?;
    let der = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e| JoinError::Credentials(format!("CA: {e}")))?;
    let mut config = kube::Config::new(uri);
    config.root_cert = Some(vec![der.as_ref().to_vec()]);
    config.auth_info = auth;
    kube::Client::try_from(config).map_err(|source| JoinError::Unreachable {
        server: server.to_owned(),
        source: Box::new(source),
    })
}

/// Step 2: a client certificate for the node, asked for with the token.
pub async fn bootstrap(settings: &JoinSettings, ca_pem: &str) -> Result<Joined, JoinError> {
    let auth = kube::config::AuthInfo {
        token: Some(settings.token.render().into()),
        ..Default::default()
    };
    let client = client(&settings.server, ca_pem, auth)?;
    let key = rcgen::KeyPair::generate().map_err(|e| JoinError::Credentials(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| JoinError::Credentials(e.to_string()))?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("system:node:{}", settings.node_name),
    );
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    let request = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| JoinError::Credentials(e.to_string()))?;
    let csrs: Api<CertificateSigningRequest> = Api::all(client);
    let name = format!("node-csr-{}-{:08x}", settings.node_name, fastrand::u32(..));
    let csr = CertificateSigningRequest {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            signer_name: KUBELET_CLIENT_SIGNER.into(),
            usages: Some(vec!["digital signature".into(), "client auth".into()]),
            request: k8s_openapi::ByteString(request.into_bytes()),
            ..Default::default()
        },
        status: None,
    };
    csrs.create(&PostParams::default(), &csr)
        .await
        .map_err(|source| JoinError::Request {
            source: Box::new(source),
        })?;
    let deadline = tokio::time::Instant::now() + settings.timeout;
    loop {
        let current = csrs.get(&name).await.map_err(|source| JoinError::Request {
            source: Box::new(source),
        })?;
        let status = current.status.unwrap_or_default();
        if let Some(refused) = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Denied" || c.type_ == "Failed")
        {
            return Err(JoinError::Refused(format!(
                "{} ({}): {}",
                refused.type_.to_lowercase(),
                refused.reason.clone().unwrap_or_default(),
                refused.message.clone().unwrap_or_default()
            )));
        }
        if let Some(certificate) = status.certificate {
            let cert_pem = String::from_utf8(certificate.0)
                .map_err(|_| JoinError::Credentials("the certificate is not PEM text".into()))?;
            return Ok(Joined {
                server: settings.server.clone(),
                ca_pem: ca_pem.to_owned(),
                cert_pem,
                key_pem: key.serialize_pem(),
            });
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(JoinError::Timeout(settings.timeout));
        }
        tokio::time::sleep(settings.poll).await;
    }
}

/// Steps 1 and 2.
pub async fn join(settings: &JoinSettings) -> Result<Joined, JoinError> {
    let ca_pem = discover(settings).await?;
    bootstrap(settings, &ca_pem).await
}

/// The kubeconfig of a joined node (its own credential inline).
pub fn kubeconfig(joined: &Joined, node_name: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let user = format!("system:node:{node_name}");
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: site\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\ncontexts:\n- name: node\n  context:\n    cluster: site\n    user: {user}\ncurrent-context: node\nusers:\n- name: {user}\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\n",
        server = joined.server,
        ca = b64(&joined.ca_pem),
        cert = b64(&joined.cert_pem),
        key = b64(&joined.key_pem),
    )
}

/// Writes the kubeconfig readable by its owner only, atomically.
pub fn write_kubeconfig(path: &Path, text: &str) -> Result<(), JoinError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| JoinError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_must_be_https_urls() {
        for bad in [
            "",
            "10.0.0.1:6443",
            "http://10.0.0.1:6443",
            "https://",
            "ftp://x",
        ] {
            assert!(check_server(bad).is_err(), "{bad}");
        }
        assert!(check_server("https://10.0.0.1:6443").is_ok());
    }

    #[test]
    fn cluster_info_kubeconfigs_that_name_no_ca_are_refused() {
        for bad in [
            "not: [yaml",
            "apiVersion: v1\nclusters: []\n",
            "clusters:\n- cluster:\n    certificate-authority-data: '!!!'\n",
            &"[".repeat(10_000),
        ] {
            assert!(ca_of(bad).is_err(), "{bad:.40}");
        }
        let ok = format!(
            "clusters:\n- cluster:\n    certificate-authority-data: {}\n",
            base64::engine::general_purpose::STANDARD.encode("PEM")
        );
        assert_eq!(ca_of(&ok).expect("ca"), "PEM");
    }
}
