//! QUIC between control-plane members: long-lived quinn connections with mutual TLS under
//! the site CA, one ordered stream of raft batches per direction, and join requests.
//!
//! Owns connections, queues and frames; knows nothing of raft's rules or the store. The
//! ready loop hands outgoing raft messages to [`Transport::send`], which never blocks: each
//! peer has a bounded queue, and a message that finds it full is dropped and counted (raft
//! retransmits what matters; a slow or dead peer never grows memory). A peer's task
//! connects with exponential back-off, says [`Frame::Hello`], then writes batches of
//! whatever is queued (up to [`TransportSettings::max_batch_bytes`]) as one frame.
//!
//! Incoming connections are accepted from anyone the TLS layer lets in. A connection with a
//! client certificate under the CA may send raft batches, but only as the member its
//! certificate names; one without may only ask to join, on a bidirectional stream. Any
//! frame that does not decode, or a raft message that is not for us or not from the peer,
//! closes the connection and is counted.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brink_proto::peer::{Frame, FrameError, decode_frame, encode_frame, frame_len};
use protobuf::Message as _;
use raft::prelude::Message;
use rustls::pki_types::CertificateDer;

use crate::pki::{self, MEMBER_SERVER_NAME};

/// The transport's limits and intervals.
#[derive(Debug, Clone)]
pub struct TransportSettings {
    /// Raft messages queued for one peer before new ones are dropped.
    pub peer_queue: usize,
    /// The most bytes of raft messages written as one frame.
    pub max_batch_bytes: usize,
    /// The first wait after a failed connection attempt (doubling up to the maximum).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// A connection silent for this long is dead (keep-alives go at a third of it).
    pub idle_timeout: Duration,
    /// The first connection attempt to a peer gives up after this (doubling on each
    /// failure up to `idle_timeout`): a peer that is not listening yet (a newcomer still
    /// binding its port) is tried again soon rather than after QUIC's own retransmits.
    pub connect_timeout: Duration,
    /// How long a join may take, end to end.
    pub join_timeout: Duration,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            peer_queue: 4096,
            max_batch_bytes: 4 << 20,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_millis(250),
            join_timeout: Duration::from_secs(60),
        }
    }
}

/// Why the transport could not start or a join failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("TLS for QUIC: {0}")]
    Crypto(String),
    #[error("connect to {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("stream to {addr}: {message}")]
    Stream { addr: String, message: String },
    #[error("bad frame from {addr}: {source}")]
    Frame { addr: String, source: FrameError },
    #[error("{addr} answered a join with an unexpected frame")]
    Unexpected { addr: String },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct TransportMetrics {
    pub messages_sent: AtomicU64,
    pub messages_received: AtomicU64,
    /// Messages dropped because a peer's queue was full, its address unknown, or the
    /// message too large for a frame.
    pub messages_dropped: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    /// Connections closed for a frame that did not decode or broke the rules.
    pub frames_refused: AtomicU64,
}

/// What the transport hands to its owner.
pub trait PeerHandler: Send + Sync + 'static {
    /// A raft message from an authenticated member, addressed to us.
    fn step(&self, message: Message);
    /// A join request; the answer is sent back as is.
    fn join(
        &self,
        secret: Vec<u8>,
        peer_addr: String,
    ) -> Pin<Box<dyn Future<Output = Frame> + Send + '_>>;
}

struct Peer {
    addr: String,
    queue: tokio::sync::mpsc::Sender<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

/// A member's QUIC endpoint.
pub struct Transport {
    id: u64,
    advertise: String,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    settings: TransportSettings,
    peers: Mutex<HashMap<u64, Peer>>,
    runtime: tokio::runtime::Handle,
    pub metrics: Arc<TransportMetrics>,
}

fn transport_config(settings: &TransportSettings) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(settings.idle_timeout).ok());
    t.keep_alive_interval(Some(settings.idle_timeout / 3));
    Arc::new(t)
}

fn quic_client(
    config: rustls::ClientConfig,
    settings: &TransportSettings,
) -> Result<quinn::ClientConfig, TransportError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config)
        .map_err(|e| TransportError::Crypto(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport_config(settings));
    Ok(client)
}

/// Binds a QUIC endpoint at `listen` serving `pki`'s member certificate.
pub fn bind(
    listen: SocketAddr,
    pki: &pki::MemberPki,
    settings: &TransportSettings,
) -> Result<quinn::Endpoint, TransportError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(pki.server_config()?)
        .map_err(|e| TransportError::Crypto(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport_config(settings));
    quinn::Endpoint::server(server, listen).map_err(|source| TransportError::Bind {
        addr: listen,
        source,
    })
}

async fn resolve(addr: &str) -> Result<SocketAddr, TransportError> {
    let mut found = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| TransportError::Connect {
            addr: addr.to_owned(),
            message: e.to_string(),
        })?;
    found.next().ok_or_else(|| TransportError::Connect {
        addr: addr.to_owned(),
        message: "no address".into(),
    })
}

async fn connect(
    endpoint: &quinn::Endpoint,
    client: quinn::ClientConfig,
    addr: &str,
) -> Result<quinn::Connection, TransportError> {
    let target = resolve(addr).await?;
    let fail = |message: String| TransportError::Connect {
        addr: addr.to_owned(),
        message,
    };
    endpoint
        .connect_with(client, target, MEMBER_SERVER_NAME)
        .map_err(|e| fail(e.to_string()))?
        .await
        .map_err(|e| fail(e.to_string()))
}

/// Reads one frame; `None` when the stream ends cleanly between frames.
async fn read_frame(
    recv: &mut quinn::RecvStream,
    addr: &str,
) -> Result<Option<Frame>, TransportError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => {
            return Err(TransportError::Stream {
                addr: addr.to_owned(),
                message: e.to_string(),
            });
        }
    }
    let bad = |source| TransportError::Frame {
        addr: addr.to_owned(),
        source,
    };
    let len = frame_len(prefix).map_err(bad)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| TransportError::Stream {
            addr: addr.to_owned(),
            message: e.to_string(),
        })?;
    decode_frame(&body).map(Some).map_err(bad)
}

async fn write(
    send: &mut quinn::SendStream,
    bytes: &[u8],
    addr: &str,
) -> Result<(), TransportError> {
    send.write_all(bytes)
        .await
        .map_err(|e| TransportError::Stream {
            addr: addr.to_owned(),
            message: e.to_string(),
        })
}

/// Asks the member at `addr` to admit us, trusting it only under the CA `token` pins.
pub async fn request_join(
    endpoint: &quinn::Endpoint,
    addr: &str,
    token: &pki::JoinToken,
    advertise: &str,
    settings: &TransportSettings,
) -> Result<Frame, TransportError> {
    let attempt = async {
        let client = quic_client(pki::join_client_config(token)?, settings)?;
        let conn = connect(endpoint, client, addr).await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| TransportError::Stream {
            addr: addr.to_owned(),
            message: e.to_string(),
        })?;
        let request = Frame::JoinRequest {
            secret: token.secret.to_vec(),
            peer_addr: advertise.to_owned(),
        };
        write(&mut send, &encode_frame(&request), addr).await?;
        let _ = send.finish();
        let answer = read_frame(&mut recv, addr).await?;
        conn.close(0u32.into(), b"joined");
        match answer {
            Some(frame @ (Frame::JoinAccepted { .. } | Frame::JoinRefused { .. })) => Ok(frame),
            _ => Err(TransportError::Unexpected {
                addr: addr.to_owned(),
            }),
        }
    };
    tokio::time::timeout(settings.join_timeout, attempt)
        .await
        .map_err(|_| TransportError::Timeout(settings.join_timeout))?
}

impl Transport {
    /// A transport for member `id` on `endpoint`, dialled by others at `advertise`.
    /// Must be called within a tokio runtime.
    pub fn new(
        id: u64,
        advertise: String,
        endpoint: quinn::Endpoint,
        pki: &pki::MemberPki,
        settings: TransportSettings,
    ) -> Result<Arc<Self>, TransportError> {
        let client = quic_client(pki.client_config()?, &settings)?;
        Ok(Arc::new(Self {
            id,
            advertise,
            endpoint,
            client,
            settings,
            peers: Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::current(),
            metrics: Arc::new(TransportMetrics::default()),
        }))
    }

    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// Sets (or changes) where member `id` is dialled. Messages queued for an old address
    /// are dropped with its connection.
    pub fn set_peer(self: &Arc<Self>, id: u64, addr: &str) {
        if id == self.id {
            return;
        }
        let Ok(mut peers) = self.peers.lock() else {
            return;
        };
        if peers.get(&id).is_some_and(|p| p.addr == addr) {
            return;
        }
        let (queue, queued) = tokio::sync::mpsc::channel(self.settings.peer_queue.max(1));
        let me = self.clone();
        let peer_addr = addr.to_owned();
        let task = self
            .runtime
            .spawn(async move { me.run_peer(id, peer_addr, queued).await });
        if let Some(old) = peers.insert(
            id,
            Peer {
                addr: addr.to_owned(),
                queue,
                task,
            },
        ) {
            old.task.abort();
        }
    }

    /// Forgets member `id` (removed from the cluster).
    pub fn remove_peer(&self, id: u64) {
        if let Some(old) = self.peers.lock().ok().and_then(|mut p| p.remove(&id)) {
            old.task.abort();
        }
    }

    /// The peers known and their addresses.
    pub fn peers(&self) -> Vec<(u64, String)> {
        self.peers
            .lock()
            .map(|p| p.iter().map(|(id, p)| (*id, p.addr.clone())).collect())
            .unwrap_or_default()
    }

    /// Queues `message` for its recipient; never blocks.
    pub fn send(&self, message: &Message) {
        let dropped = || {
            self.metrics
                .messages_dropped
                .fetch_add(1, Ordering::Relaxed);
        };
        let Ok(bytes) = message.write_to_bytes() else {
            return dropped();
        };
        if bytes.len() + 64 > self.settings.max_batch_bytes.max(1 << 20) {
            tracing::warn!(
                to = message.to,
                bytes = bytes.len(),
                "raft message too large for a frame"
            );
            return dropped();
        }
        let Ok(peers) = self.peers.lock() else {
            return dropped();
        };
        match peers.get(&message.to) {
            Some(peer) if peer.queue.try_send(bytes).is_ok() => {}
            _ => dropped(),
        }
    }

    async fn run_peer(
        self: Arc<Self>,
        id: u64,
        addr: String,
        mut queued: tokio::sync::mpsc::Receiver<Vec<u8>>,
    ) {
        let mut backoff = self.settings.backoff_min;
        let mut connect_timeout = self.settings.connect_timeout;
        loop {
            let started = std::time::Instant::now();
            match self
                .stream_to(id, &addr, &mut queued, connect_timeout)
                .await
            {
                Ok(()) => return,
                Err(e) => {
                    if started.elapsed() > self.settings.idle_timeout {
                        // The link was up for a while: start over from the shortest waits.
                        backoff = self.settings.backoff_min;
                        connect_timeout = self.settings.connect_timeout;
                    } else {
                        connect_timeout = (connect_timeout * 2).min(self.settings.idle_timeout);
                    }
                    self.metrics
                        .connect_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = id, %addr, error = %e, "peer link down; retrying");
                }
            }
            // Whatever queued while the link was down is stale by now; raft resends.
            while queued.try_recv().is_ok() {
                self.metrics
                    .messages_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(
                backoff + Duration::from_millis(fastrand::u64(..=backoff.as_millis() as u64 / 2)),
            )
            .await;
            backoff = (backoff * 2).min(self.settings.backoff_max);
        }
    }

    /// One connection's life: Hello, then batches until the queue closes (Ok) or the
    /// connection fails (Err).
    async fn stream_to(
        &self,
        id: u64,
        addr: &str,
        queued: &mut tokio::sync::mpsc::Receiver<Vec<u8>>,
        connect_timeout: Duration,
    ) -> Result<(), TransportError> {
        let conn = tokio::time::timeout(
            connect_timeout,
            connect(&self.endpoint, self.client.clone(), addr),
        )
        .await
        .map_err(|_| TransportError::Timeout(connect_timeout))??;
        let mut send = conn.open_uni().await.map_err(|e| TransportError::Stream {
            addr: addr.to_owned(),
            message: e.to_string(),
        })?;
        self.metrics.connects.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(peer = id, %addr, "peer link up");
        let hello = Frame::Hello {
            from: self.id,
            peer_addr: self.advertise.clone(),
        };
        write(&mut send, &encode_frame(&hello), addr).await?;
        loop {
            let first = tokio::select! {
                m = queued.recv() => m,
                e = conn.closed() => return Err(TransportError::Stream { addr: addr.to_owned(), message: e.to_string() }),
            };
            let Some(first) = first else {
                return Ok(());
            };
            let mut bytes = first.len();
            let mut messages = vec![first];
            while bytes < self.settings.max_batch_bytes {
                match queued.try_recv() {
                    Ok(m) => {
                        bytes += m.len();
                        messages.push(m);
                    }
                    Err(_) => break,
                }
            }
            let n = messages.len() as u64;
            write(&mut send, &encode_frame(&Frame::Raft { messages }), addr).await?;
            self.metrics.messages_sent.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Accepts connections until the endpoint closes.
    pub async fn serve(self: Arc<Self>, handler: Arc<dyn PeerHandler>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let me = self.clone();
            let handler = handler.clone();
            tokio::spawn(async move {
                let addr = incoming.remote_address().to_string();
                match incoming.await {
                    Ok(conn) => me.serve_connection(conn, addr, handler).await,
                    Err(e) => tracing::debug!(%addr, error = %e, "peer handshake failed"),
                }
            });
        }
    }

    fn refuse(&self, conn: &quinn::Connection, addr: &str, why: &str) {
        self.metrics.frames_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%addr, why, "closing a peer connection");
        conn.close(1u32.into(), why.as_bytes());
    }

    async fn serve_connection(
        self: Arc<Self>,
        conn: quinn::Connection,
        addr: String,
        handler: Arc<dyn PeerHandler>,
    ) {
        let cert: Option<CertificateDer<'static>> = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|chain| chain.first().cloned());
        loop {
            tokio::select! {
                uni = conn.accept_uni() => {
                    let Ok(recv) = uni else { return };
                    let Some(cert) = cert.clone() else {
                        return self.refuse(&conn, &addr, "raft traffic without a member certificate");
                    };
                    let me = self.clone();
                    let (conn, addr, handler) = (conn.clone(), addr.clone(), handler.clone());
                    tokio::spawn(async move { me.serve_raft(conn, recv, cert, addr, handler).await });
                }
                bi = conn.accept_bi() => {
                    let Ok((send, recv)) = bi else { return };
                    let me = self.clone();
                    let (conn, addr, handler) = (conn.clone(), addr.clone(), handler.clone());
                    tokio::spawn(async move { me.serve_join(conn, send, recv, addr, handler).await });
                }
            }
        }
    }

    async fn serve_raft(
        self: Arc<Self>,
        conn: quinn::Connection,
        mut recv: quinn::RecvStream,
        cert: CertificateDer<'static>,
        addr: String,
        handler: Arc<dyn PeerHandler>,
    ) {
        let from = match read_frame(&mut recv, &addr).await {
            Ok(Some(Frame::Hello { from, .. })) if pki::certifies_member(&cert, from) => from,
            Ok(Some(Frame::Hello { .. })) => {
                return self.refuse(
                    &conn,
                    &addr,
                    "the certificate does not name the member it claims to be",
                );
            }
            Ok(_) => return self.refuse(&conn, &addr, "a raft stream must open with Hello"),
            Err(e) => return self.refuse(&conn, &addr, &e.to_string()),
        };
        loop {
            let messages = match read_frame(&mut recv, &addr).await {
                Ok(Some(Frame::Raft { messages })) => messages,
                Ok(None) => return,
                Ok(Some(_)) => {
                    return self.refuse(&conn, &addr, "unexpected frame on a raft stream");
                }
                Err(TransportError::Stream { .. }) => return,
                Err(e) => return self.refuse(&conn, &addr, &e.to_string()),
            };
            for bytes in messages {
                let message = match Message::parse_from_bytes(&bytes) {
                    Ok(m) if m.from == from && m.to == self.id => m,
                    Ok(_) => {
                        return self.refuse(
                            &conn,
                            &addr,
                            "raft message not from the peer or not for us",
                        );
                    }
                    Err(_) => return self.refuse(&conn, &addr, "raft message does not decode"),
                };
                self.metrics
                    .messages_received
                    .fetch_add(1, Ordering::Relaxed);
                handler.step(message);
            }
        }
    }

    async fn serve_join(
        self: Arc<Self>,
        conn: quinn::Connection,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        addr: String,
        handler: Arc<dyn PeerHandler>,
    ) {
        let answer = match read_frame(&mut recv, &addr).await {
            Ok(Some(Frame::JoinRequest { secret, peer_addr })) => {
                handler.join(secret, peer_addr).await
            }
            Ok(_) => {
                return self.refuse(
                    &conn,
                    &addr,
                    "a bidirectional stream must carry a join request",
                );
            }
            Err(e) => return self.refuse(&conn, &addr, &e.to_string()),
        };
        if write(&mut send, &encode_frame(&answer), &addr)
            .await
            .is_ok()
        {
            let _ = send.finish();
            // Let the answer leave before the peer closes.
            let _ = send.stopped().await;
        }
    }

    /// Closes every connection.
    pub fn close(&self) {
        if let Ok(mut peers) = self.peers.lock() {
            for (_, p) in peers.drain() {
                p.task.abort();
            }
        }
        self.endpoint.close(0u32.into(), b"stopping");
    }
}
