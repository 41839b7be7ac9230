//! A raw HTTPS client of a site's Kubernetes API, from a kubeconfig: single connections
//! over HTTP/1.1 or HTTP/2, requests, and watch streams read line by line.
//!
//! kube-rs and kubectl hide what fault tests must see and control: which connection a
//! request rides on, when a stream's body is read (or deliberately not), the exact
//! status and body. This client leaves those to the caller.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use bytes::{Buf as _, Bytes, BytesMut};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

/// What can go wrong talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("kubeconfig {path}: {why}")]
    Kubeconfig { path: String, why: String },
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
}

/// Where the API is and who we are to it: the first cluster and user of a kubeconfig with
/// a client certificate (as `brink server --init` writes for the admin).
#[derive(Clone)]
pub struct ApiAccess {
    pub addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
}

impl ApiAccess {
    pub fn from_kubeconfig(path: &Path) -> Result<Self, ApiError> {
        let fail = |why: String| ApiError::Kubeconfig {
            path: path.display().to_string(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let config: serde_yaml::Value =
            serde_yaml::from_str(&text).map_err(|e| fail(e.to_string()))?;
        let field = |list: &str, section: &str, name: &str| -> Result<String, ApiError> {
            config[list][0][section][name]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| fail(format!("no {list}[0].{section}.{name}")))
        };
        let decoded = |list: &str, section: &str, name: &str| -> Result<Vec<u8>, ApiError> {
            base64::engine::general_purpose::STANDARD
                .decode(field(list, section, name)?)
                .map_err(|e| fail(format!("{name}: {e}")))
        };
        let server = field("clusters", "cluster", "server")?;
        let addr = server
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .parse()
            .map_err(|_| fail(format!("server {server:?} is not https://IP:PORT")))?;
        let ca = CertificateDer::from_pem_slice(&decoded(
            "clusters",
            "cluster",
            "certificate-authority-data",
        )?)
        .map_err(|e| fail(format!("CA: {e}")))?;
        let cert =
            CertificateDer::from_pem_slice(&decoded("users", "user", "client-certificate-data")?)
                .map_err(|e| fail(format!("client certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&decoded("users", "user", "client-key-data")?)
            .map_err(|e| fail(format!("client key: {e}")))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).map_err(|e| fail(format!("CA: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ApiError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert], key)
            .map_err(|e| ApiError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            addr,
            tls: Arc::new(tls),
        })
    }

    async fn tls_stream(
        &self,
        alpn: &[u8],
        receive_buffer: Option<u32>,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ApiError> {
        let connect_error = |source| ApiError::Connect {
            addr: self.addr,
            source,
        };
        let socket = match self.addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .map_err(connect_error)?;
        if let Some(bytes) = receive_buffer {
            socket.set_recv_buffer_size(bytes).map_err(connect_error)?;
        }
        let tcp = socket.connect(self.addr).await.map_err(connect_error)?;
        let _ = tcp.set_nodelay(true);
        let mut config = (*self.tls).clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::from(self.addr.ip()), tcp)
            .await
            .map_err(|e| ApiError::Tls(e.to_string()))
    }

    /// One HTTP/1.1 connection (one request at a time on it).
    pub async fn http1(&self) -> Result<Http1, ApiError> {
        self.http1_with_receive_buffer(None).await
    }

    /// One HTTP/1.1 connection whose socket takes at most about `bytes` before the
    /// server must wait for us: a client that stops reading is felt at once.
    pub async fn http1_with_receive_buffer(&self, bytes: Option<u32>) -> Result<Http1, ApiError> {
        let stream = self.tls_stream(b"http/1.1", bytes).await?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Http1 { sender })
    }

    /// One HTTP/2 connection; clones of it multiplex streams over it.
    pub async fn http2(&self) -> Result<Http2, ApiError> {
        let stream = self.tls_stream(b"h2", None).await?;
        let (sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await?;
        tokio::spawn(connection);
        Ok(Http2 { sender })
    }
}

fn request(
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<hyper::Request<Full<Bytes>>, ApiError> {
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    Ok(hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "kubernetes")
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body(Full::new(body))?)
}

/// How long `open_when_admitted` waits before asking again.
const ADMISSION_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// An answer read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

async fn whole(response: hyper::Response<Incoming>) -> Result<Answer, ApiError> {
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Answer { status, body })
}

/// An HTTP/1.1 connection to the API.
pub struct Http1 {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Http1 {
    /// Sends a request and reads the whole answer.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ApiError> {
        let response = self.open(method, path, body).await?;
        whole(response).await
    }

    /// Sends a request and returns once the answer's head arrived; its body is the
    /// caller's to read, or not.
    pub async fn open(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<hyper::Response<Incoming>, ApiError> {
        self.sender.ready().await?;
        Ok(self
            .sender
            .send_request(request(method, path, body)?)
            .await?)
    }

    /// As [`Self::open`], asking again while the answer is 429 Too Many Requests (a
    /// limit whose slots free up as others finish), until `within` has passed.
    pub async fn open_when_admitted(
        &mut self,
        method: &str,
        path: &str,
        within: std::time::Duration,
    ) -> Result<hyper::Response<Incoming>, ApiError> {
        let until = tokio::time::Instant::now() + within;
        loop {
            let response = self.open(method, path, None).await?;
            if response.status() != hyper::StatusCode::TOO_MANY_REQUESTS
                || tokio::time::Instant::now() >= until
            {
                return Ok(response);
            }
            whole(response).await?;
            tokio::time::sleep(ADMISSION_RETRY).await;
        }
    }
}

/// An HTTP/2 connection to the API; clones share it.
#[derive(Clone)]
pub struct Http2 {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
}

impl Http2 {
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ApiError> {
        let response = self.open(method, path, body).await?;
        whole(response).await
    }

    pub async fn open(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<hyper::Response<Incoming>, ApiError> {
        self.sender.ready().await?;
        Ok(self
            .sender
            .send_request(request(method, path, body)?)
            .await?)
    }

    /// As [`Self::open`], asking again while the answer is 429 Too Many Requests (a
    /// limit whose slots free up as others finish), until `within` has passed.
    pub async fn open_when_admitted(
        &mut self,
        method: &str,
        path: &str,
        within: std::time::Duration,
    ) -> Result<hyper::Response<Incoming>, ApiError> {
        let until = tokio::time::Instant::now() + within;
        loop {
            let response = self.open(method, path, None).await?;
            if response.status() != hyper::StatusCode::TOO_MANY_REQUESTS
                || tokio::time::Instant::now() >= until
            {
                return Ok(response);
            }
            whole(response).await?;
            tokio::time::sleep(ADMISSION_RETRY).await;
        }
    }
}

/// A watch answer read as the events it carries, one JSON line each.
pub struct WatchLines {
    body: Incoming,
    pending: BytesMut,
}

impl WatchLines {
    pub fn new(response: hyper::Response<Incoming>) -> Self {
        Self {
            body: response.into_body(),
            pending: BytesMut::new(),
        }
    }

    /// The next event, or `None` when the stream ended (or broke).
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line = self.pending.split_to(end + 1);
                let text = &line[..end];
                if text.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(serde_json::from_slice(text).unwrap_or(Value::Null));
            }
            let frame = self.body.frame().await?.ok()?;
            if let Ok(mut data) = frame.into_data() {
                while data.has_remaining() {
                    let chunk = data.chunk();
                    self.pending.extend_from_slice(chunk);
                    let n = chunk.len();
                    data.advance(n);
                }
            }
        }
    }
}
