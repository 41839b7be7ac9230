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
//! A raft snapshot message never travels in a batch: the peer's task opens a stream of
//! its own for it (Hello, [`Frame::SnapshotBegin`], the snapshot file in
//! [`Frame::SnapshotChunk`]s, [`Frame::SnapshotEnd`] with its SHA-256), and tells the
//! owner whether it arrived. The receiver writes the chunks to a file, checks size and
//! digest, and hands file and message to its owner, which checks the file whole before
//! raft sees the message. A snapshot is at most [`TransportSettings::max_snapshot_bytes`].
//!
//! Incoming connections are accepted from anyone the TLS layer lets in. A connection with a
//! client certificate under the CA may send raft batches, but only as the member its
//! certificate names; one without may only ask to join, on a bidirectional stream. Any
//! frame that does not decode, or a raft message that is not for us or not from the peer,
//! closes the connection and is counted.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use brink_proto::peer::{Frame, FrameError, decode_frame, encode_frame, frame_len};
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use rustls::pki_types::CertificateDer;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::peers::pki::{self, MEMBER_SERVER_NAME};
use crate::settings::TransportSettings;

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
    /// Snapshot files sent whole, and bytes of them.
    pub snapshots_sent: AtomicU64,
    pub snapshot_bytes_sent: AtomicU64,
    /// Snapshot files received whole and handed on.
    pub snapshots_received: AtomicU64,
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
    /// A snapshot `message` from an authenticated member arrived whole (size and digest
    /// checked) in `file`. Blocking: called off the async threads. The handler checks the
    /// file itself, keeps it, and steps the message; an error refuses it.
    fn receive_snapshot(&self, message: Message, file: &Path) -> Result<(), String>;
    /// Whether the snapshot message for member `to` was sent whole.
    fn snapshot_sent(&self, to: u64, ok: bool);
}

struct Peer {
    addr: String,
    queue: tokio::sync::mpsc::Sender<Vec<u8>>,
    snapshots: tokio::sync::mpsc::Sender<Message>,
    task: tokio::task::JoinHandle<()>,
}

/// What a peer's task reads from.
struct PeerQueues {
    raft: tokio::sync::mpsc::Receiver<Vec<u8>>,
    snapshots: tokio::sync::mpsc::Receiver<Message>,
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
    /// Where snapshot files are read from when sent and written to when received.
    snapshot_dir: PathBuf,
    /// Set by [`serve`](Self::serve): whom to tell about snapshots sent. Weak: the
    /// handler holds the replica, which holds this transport.
    handler: OnceLock<std::sync::Weak<dyn PeerHandler>>,
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

/// The most bytes one chunk frame carries (well under a frame's limit).
const MAX_CHUNK_BYTES: usize = 4 << 20;

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
        snapshot_dir: PathBuf,
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
            snapshot_dir,
            handler: OnceLock::new(),
            metrics: Arc::new(TransportMetrics::default()),
        }))
    }

    fn report_snapshot(&self, to: u64, ok: bool) {
        if let Some(handler) = self.handler.get().and_then(std::sync::Weak::upgrade) {
            handler.snapshot_sent(to, ok);
        }
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
        let (queue, raft) = tokio::sync::mpsc::channel(self.settings.peer_queue.max(1));
        let (snapshots, snapshots_queued) = tokio::sync::mpsc::channel(1);
        let me = self.clone();
        let peer_addr = addr.to_owned();
        let queues = PeerQueues {
            raft,
            snapshots: snapshots_queued,
        };
        let task = self
            .runtime
            .spawn(async move { me.run_peer(id, peer_addr, queues).await });
        if let Some(old) = peers.insert(
            id,
            Peer {
                addr: addr.to_owned(),
                queue,
                snapshots,
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
        if message.get_msg_type() == MessageType::MsgSnapshot {
            let queued = self
                .peers
                .lock()
                .ok()
                .and_then(|p| p.get(&message.to).map(|p| p.snapshots.clone()))
                .is_some_and(|q| q.try_send(message.clone()).is_ok());
            if !queued {
                // One snapshot at a time per peer; raft tries again once told.
                self.report_snapshot(message.to, false);
                dropped();
            }
            return;
        }
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

    async fn run_peer(self: Arc<Self>, id: u64, addr: String, mut queued: PeerQueues) {
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
            while queued.raft.try_recv().is_ok() {
                self.metrics
                    .messages_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
            while queued.snapshots.try_recv().is_ok() {
                self.report_snapshot(id, false);
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
        self: &Arc<Self>,
        id: u64,
        addr: &str,
        queued: &mut PeerQueues,
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
                m = queued.raft.recv() => m,
                Some(snapshot) = queued.snapshots.recv() => {
                    let me = self.clone();
                    let (conn, addr) = (conn.clone(), addr.to_owned());
                    tokio::spawn(async move {
                        let result = me.send_snapshot(&conn, &snapshot, &addr).await;
                        if let Err(e) = &result {
                            tracing::warn!(peer = id, error = %e, wait = ?me.settings.snapshot_retry_delay, "snapshot not sent");
                            // Raft sends again as soon as it hears of the failure: a
                            // member out of file handles would retry (and log) every
                            // heartbeat, so the failure is reported after a pause.
                            tokio::time::sleep(me.settings.snapshot_retry_delay).await;
                        }
                        me.report_snapshot(id, result.is_ok());
                    });
                    continue;
                }
                e = conn.closed() => return Err(TransportError::Stream { addr: addr.to_owned(), message: e.to_string() }),
            };
            let Some(first) = first else {
                return Ok(());
            };
            let mut bytes = first.len();
            let mut messages = vec![first];
            while bytes < self.settings.max_batch_bytes {
                match queued.raft.try_recv() {
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

    /// Streams the snapshot file `message` names on a stream of its own; resolves once
    /// the peer has received all of it.
    async fn send_snapshot(
        &self,
        conn: &quinn::Connection,
        message: &Message,
        addr: &str,
    ) -> Result<(), TransportError> {
        let index = message.get_snapshot().get_metadata().index;
        let path = self
            .snapshot_dir
            .join(crate::store::snapshot::file_name(index));
        let io = |e: std::io::Error| TransportError::Stream {
            addr: addr.to_owned(),
            message: format!("{}: {e}", path.display()),
        };
        let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
        let size = file.metadata().await.map_err(io)?.len();
        if size > self.settings.max_snapshot_bytes {
            return Err(TransportError::Stream {
                addr: addr.to_owned(),
                message: format!(
                    "snapshot of {size} bytes is over the limit of {}",
                    self.settings.max_snapshot_bytes
                ),
            });
        }
        let started = std::time::Instant::now();
        let mut send = conn.open_uni().await.map_err(|e| TransportError::Stream {
            addr: addr.to_owned(),
            message: e.to_string(),
        })?;
        let hello = Frame::Hello {
            from: self.id,
            peer_addr: self.advertise.clone(),
        };
        write(&mut send, &encode_frame(&hello), addr).await?;
        let mut header = message.clone();
        header.mut_snapshot().data = Default::default();
        let begin = Frame::SnapshotBegin {
            message: header
                .write_to_bytes()
                .map_err(|e| TransportError::Stream {
                    addr: addr.to_owned(),
                    message: e.to_string(),
                })?,
            size,
        };
        write(&mut send, &encode_frame(&begin), addr).await?;
        let mut hash = Sha256::new();
        let mut sent = 0u64;
        let mut chunk = vec![0u8; self.settings.snapshot_chunk_bytes.clamp(1, MAX_CHUNK_BYTES)];
        while sent < size {
            let want = chunk.len().min((size - sent) as usize);
            file.read_exact(&mut chunk[..want]).await.map_err(io)?;
            hash.update(&chunk[..want]);
            let frame = Frame::SnapshotChunk {
                bytes: chunk[..want].to_vec(),
            };
            write(&mut send, &encode_frame(&frame), addr).await?;
            sent += want as u64;
        }
        let end = Frame::SnapshotEnd {
            sha256: hash.finalize().into(),
        };
        write(&mut send, &encode_frame(&end), addr).await?;
        let _ = send.finish();
        // Resolves once the peer has every byte (or stopped the stream).
        match send.stopped().await {
            Ok(None) => {}
            Ok(Some(code)) => {
                return Err(TransportError::Stream {
                    addr: addr.to_owned(),
                    message: format!("the peer stopped the snapshot stream ({code})"),
                });
            }
            Err(e) => {
                return Err(TransportError::Stream {
                    addr: addr.to_owned(),
                    message: e.to_string(),
                });
            }
        }
        self.metrics.snapshots_sent.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .snapshot_bytes_sent
            .fetch_add(size, Ordering::Relaxed);
        tracing::info!(
            peer = message.to,
            index,
            bytes = size,
            millis = started.elapsed().as_millis() as u64,
            "snapshot sent"
        );
        Ok(())
    }

    /// Receives a snapshot stream's file after its SnapshotBegin; Err says why it was
    /// refused (the caller closes the connection).
    async fn receive_snapshot(
        &self,
        recv: &mut quinn::RecvStream,
        from: u64,
        message: &[u8],
        size: u64,
        addr: &str,
        handler: &Arc<dyn PeerHandler>,
    ) -> Result<(), String> {
        let message = Message::parse_from_bytes(message)
            .map_err(|_| "snapshot message does not decode".to_owned())?;
        let index = message.get_snapshot().get_metadata().index;
        if message.get_msg_type() != MessageType::MsgSnapshot
            || message.from != from
            || message.to != self.id
            || index == 0
        {
            return Err("a snapshot stream must carry a snapshot from the peer to us".into());
        }
        if size > self.settings.max_snapshot_bytes {
            return Err(format!(
                "snapshot of {size} bytes is over the limit of {}",
                self.settings.max_snapshot_bytes
            ));
        }
        tokio::fs::create_dir_all(&self.snapshot_dir)
            .await
            .map_err(|e| format!("{}: {e}", self.snapshot_dir.display()))?;
        let part = self.snapshot_dir.join(format!("recv-{from}-{index}.part"));
        let result = async {
            let mut file = tokio::fs::File::create(&part)
                .await
                .map_err(|e| format!("{}: {e}", part.display()))?;
            let mut hash = Sha256::new();
            let mut written = 0u64;
            loop {
                match read_frame(recv, addr).await.map_err(|e| e.to_string())? {
                    Some(Frame::SnapshotChunk { bytes }) => {
                        written += bytes.len() as u64;
                        if written > size {
                            return Err(format!("snapshot runs past its size of {size} bytes"));
                        }
                        hash.update(&bytes);
                        file.write_all(&bytes)
                            .await
                            .map_err(|e| format!("{}: {e}", part.display()))?;
                    }
                    Some(Frame::SnapshotEnd { sha256 }) => {
                        if written != size {
                            return Err(format!("snapshot ended at {written} of {size} bytes"));
                        }
                        if hash.finalize().as_slice() != sha256 {
                            return Err("snapshot digest does not match its bytes".into());
                        }
                        file.sync_all()
                            .await
                            .map_err(|e| format!("{}: {e}", part.display()))?;
                        break;
                    }
                    _ => return Err("unexpected frame in a snapshot stream".into()),
                }
            }
            let handler = handler.clone();
            let path = part.clone();
            tokio::task::spawn_blocking(move || handler.receive_snapshot(message, &path))
                .await
                .map_err(|e| e.to_string())?
        }
        .await;
        // Kept under its final name by the handler when accepted; gone otherwise.
        let _ = tokio::fs::remove_file(&part).await;
        if result.is_ok() {
            self.metrics
                .snapshots_received
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer = from, index, bytes = size, "snapshot received");
        }
        result
    }

    /// Accepts connections until the endpoint closes.
    pub async fn serve(self: Arc<Self>, handler: Arc<dyn PeerHandler>) {
        let _ = self.handler.set(Arc::downgrade(&handler));
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
                Ok(Some(Frame::SnapshotBegin { message, size })) => {
                    if let Err(why) = self
                        .receive_snapshot(&mut recv, from, &message, size, &addr, &handler)
                        .await
                    {
                        return self.refuse(&conn, &addr, &why);
                    }
                    continue;
                }
                Ok(None) => return,
                Ok(Some(_)) => {
                    return self.refuse(&conn, &addr, "unexpected frame on a raft stream");
                }
                Err(TransportError::Stream { .. }) => return,
                Err(e) => return self.refuse(&conn, &addr, &e.to_string()),
            };
            for bytes in messages {
                let message = match Message::parse_from_bytes(&bytes) {
                    Ok(m) if m.get_msg_type() == MessageType::MsgSnapshot => {
                        return self.refuse(
                            &conn,
                            &addr,
                            "a snapshot must come on a snapshot stream, with its file",
                        );
                    }
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
