//! The protocol between a node agent and a pod's sandbox process: versioned frames over a
//! Unix socket pair (issue 3).
//!
//! A frame is `u32 length (big endian) | u8 version | u8 kind | body`, where `length` counts
//! the version, kind and body bytes. Control messages (set-up, start, run, stop, exits)
//! carry JSON; HTTP heads, body chunks and log output, the hot path, carry a compact binary
//! encoding.
//!
//! The conversation: the agent sends [`Message::Setup`]; the sandbox builds its root and,
//! for a user-namespaced pod, unshares its user namespace and sends
//! [`Message::UsernsReady`]; the agent writes the ID maps and answers
//! [`Message::UsernsMapped`]; the sandbox drops every privilege, loads the pod's compiled
//! artifacts on [`Message::Start`] and answers [`Message::Ready`]. From then on requests
//! and responses stream both ways by id, commands run on [`Message::Run`], and the
//! guests' outbound HTTP comes back to the agent as `Outbound*` streams.
//!
//! A frame that is too long, of another version, of an unknown kind, or whose body does not
//! parse is a [`FrameError`]: the agent closes that one sandbox. Decoding never panics and
//! never allocates more than [`MAX_FRAME_BYTES`] for a frame, whatever a peer sends.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The version this build speaks. Both ends must agree exactly.
pub const PROTOCOL_VERSION: u8 = 3;
/// The largest frame (version, kind and body) either end accepts. Body chunks are split
/// below it by the sender.
pub const MAX_FRAME_BYTES: usize = 1 << 20;
/// The largest body chunk a sender puts in one frame.
pub const MAX_CHUNK_BYTES: usize = 64 << 10;
const LENGTH_BYTES: usize = 4;

/// How the sandbox builds its jail: sent first, while the sandbox is still privileged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Setup {
    /// An empty directory on the host that becomes the sandbox's root (a fresh tmpfs is
    /// mounted on it inside the sandbox's own mount namespace).
    pub root: String,
    /// Host files bind-mounted read-only into the root: (host path, path inside).
    pub files: Vec<(String, String)>,
    /// Host directories bind-mounted into the root (a pod's volumes).
    pub dirs: Vec<DirBind>,
    /// The sandbox's host name (its own UTS namespace).
    pub hostname: String,
    /// Whether to enter a user namespace (the agent maps IDs once asked).
    pub user_namespace: bool,
    /// Thread and process cap (RLIMIT_NPROC of the sandbox's own uid).
    pub max_threads: u64,
    /// Cap on the sandbox's writable private memory (RLIMIT_DATA), in bytes.
    pub max_data_bytes: u64,
    /// What runs once the jail is built.
    pub mode: SandboxMode,
}

/// A host directory bound into a sandbox's root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirBind {
    pub host: String,
    /// Where it appears inside the sandbox (absolute, plain components).
    pub inside: String,
    pub read_only: bool,
}

/// A directory a guest is given, at a path of its own choosing (a volume mount).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preopen {
    /// The directory inside the sandbox.
    pub dir: String,
    /// The path the guest sees (the mount's `mountPath`).
    pub guest: String,
    pub read_only: bool,
}

/// What a sandbox runs once its jail is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SandboxMode {
    /// Host the pod's guests.
    Pod,
    /// Run one native attack and report what happened (tests only; never for a pod).
    Probe { attack: String, args: Vec<String> },
}

/// The engine settings a sandbox must share with the agent that compiled its artifacts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSpec {
    pub epoch_tick_ms: u64,
    pub request_deadline_ms: u64,
    pub max_instances: u32,
    pub max_guest_memory: u64,
}

/// What a container in a sandbox runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    pub name: String,
    /// The compiled artifact inside the sandbox's root.
    pub artifact: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub memory_limit: u64,
    /// The container's volume mounts.
    pub preopens: Vec<Preopen>,
}

/// Run these containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Start {
    pub pod: String,
    pub engine: EngineSpec,
    pub containers: Vec<ContainerSpec>,
}

/// How a command container (or a probe) ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exited {
    pub container: String,
    pub code: i32,
    pub reason: String,
    pub message: Option<String>,
}

/// An HTTP request or response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpHead {
    /// The stream this head opens; every later body chunk names it.
    pub id: u64,
    /// The method for a request; empty for a response.
    pub method: String,
    /// The URI for a request; empty for a response.
    pub uri: String,
    /// The status for a response; 0 for a request.
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A piece of a body; `end` closes the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub id: u64,
    pub end: bool,
    pub bytes: Vec<u8>,
}

/// Which standard stream output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// Every message either end may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// agent → sandbox, first: build the jail.
    Setup(Setup),
    /// sandbox → agent: my user namespace exists; write its ID maps.
    UsernsReady,
    /// agent → sandbox: the ID maps are written.
    UsernsMapped,
    /// agent → sandbox: load these containers.
    Start(Start),
    /// sandbox → agent: the containers are prepared; these ones serve HTTP (the others
    /// are commands).
    Ready { services: Vec<String> },
    /// agent → sandbox: run a command container once.
    Run { container: String },
    /// agent → sandbox: stop within this grace period.
    Stop { grace_ms: u64 },
    /// agent → sandbox: a request for a service container.
    RequestHead { container: String, head: HttpHead },
    /// agent → sandbox: part of a request body.
    RequestBody(Chunk),
    /// sandbox → agent: the response head of stream `head.id`.
    ResponseHead(HttpHead),
    /// sandbox → agent: part of a response body.
    ResponseBody(Chunk),
    /// sandbox → agent: a guest's outbound request (the agent applies the allow-list).
    OutboundHead { container: String, head: HttpHead },
    /// sandbox → agent: part of an outbound request body.
    OutboundBody(Chunk),
    /// agent → sandbox: the response head of an outbound request.
    OutboundResponseHead(HttpHead),
    /// agent → sandbox: part of an outbound response body.
    OutboundResponseBody(Chunk),
    /// agent → sandbox: an outbound request failed (`denied` when the allow-list refused it).
    OutboundError { id: u64, message: String },
    /// sandbox → agent: output of a container.
    Log {
        container: String,
        stream: LogStream,
        bytes: Vec<u8>,
    },
    /// sandbox → agent: a command container (or a probe) ended.
    Exited(Exited),
    /// sandbox → agent: the sandbox cannot go on.
    Fatal { message: String },
}

/// Why bytes from a peer are not a valid frame.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is over the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("frame of {0} bytes is too short to hold a version and a kind")]
    TooShort(usize),
    #[error("protocol version {0} is not {PROTOCOL_VERSION}")]
    Version(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("malformed {kind} message: {reason}")]
    Malformed { kind: &'static str, reason: String },
}

// Message kinds on the wire.
const SETUP: u8 = 1;
const USERNS_READY: u8 = 2;
const USERNS_MAPPED: u8 = 3;
const START: u8 = 4;
const READY: u8 = 5;
const RUN: u8 = 6;
const STOP: u8 = 7;
const REQUEST_HEAD: u8 = 8;
const REQUEST_BODY: u8 = 9;
const RESPONSE_HEAD: u8 = 10;
const RESPONSE_BODY: u8 = 11;
const OUTBOUND_HEAD: u8 = 12;
const OUTBOUND_BODY: u8 = 13;
const OUTBOUND_RESPONSE_HEAD: u8 = 14;
const OUTBOUND_RESPONSE_BODY: u8 = 15;
const OUTBOUND_ERROR: u8 = 16;
const LOG: u8 = 17;
const EXITED: u8 = 18;
const FATAL: u8 = 19;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadyBody {
    services: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    container: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StopBody {
    grace_ms: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutboundErrorBody {
    id: u64,
    message: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FatalBody {
    message: String,
}

fn malformed(kind: &'static str, reason: impl ToString) -> FrameError {
    FrameError::Malformed {
        kind,
        reason: reason.to_string(),
    }
}

fn json(value: &impl Serialize) -> Result<Vec<u8>, FrameError> {
    serde_json::to_vec(value).map_err(|e| malformed("json", e))
}

/// Encodes one message as a frame. Fails only when the frame would exceed the limit.
pub fn encode(message: &Message) -> Result<Vec<u8>, FrameError> {
    let (kind, body) = match message {
        Message::Setup(setup) => (SETUP, json(setup)?),
        Message::UsernsReady => (USERNS_READY, Vec::new()),
        Message::UsernsMapped => (USERNS_MAPPED, Vec::new()),
        Message::Start(start) => (START, json(start)?),
        Message::Ready { services } => (
            READY,
            json(&ReadyBody {
                services: services.clone(),
            })?,
        ),
        Message::Run { container } => (
            RUN,
            json(&RunBody {
                container: container.clone(),
            })?,
        ),
        Message::Stop { grace_ms } => (
            STOP,
            json(&StopBody {
                grace_ms: *grace_ms,
            })?,
        ),
        Message::RequestHead { container, head } => (REQUEST_HEAD, named_head(container, head)?),
        Message::RequestBody(chunk) => (REQUEST_BODY, body_chunk(chunk)),
        Message::ResponseHead(head) => (RESPONSE_HEAD, bare_head(head)?),
        Message::ResponseBody(chunk) => (RESPONSE_BODY, body_chunk(chunk)),
        Message::OutboundHead { container, head } => (OUTBOUND_HEAD, named_head(container, head)?),
        Message::OutboundBody(chunk) => (OUTBOUND_BODY, body_chunk(chunk)),
        Message::OutboundResponseHead(head) => (OUTBOUND_RESPONSE_HEAD, bare_head(head)?),
        Message::OutboundResponseBody(chunk) => (OUTBOUND_RESPONSE_BODY, body_chunk(chunk)),
        Message::OutboundError { id, message } => (
            OUTBOUND_ERROR,
            json(&OutboundErrorBody {
                id: *id,
                message: message.clone(),
            })?,
        ),
        Message::Log {
            container,
            stream,
            bytes,
        } => {
            let mut body = Vec::with_capacity(container.len() + bytes.len() + 3);
            put_str(&mut body, container)?;
            body.push(match stream {
                LogStream::Stdout => 1,
                LogStream::Stderr => 2,
            });
            body.extend_from_slice(bytes);
            (LOG, body)
        }
        Message::Exited(exited) => (EXITED, json(exited)?),
        Message::Fatal { message } => (
            FATAL,
            json(&FatalBody {
                message: message.clone(),
            })?,
        ),
    };
    let length = body.len() + 2;
    if length > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(length));
    }
    let mut frame = Vec::with_capacity(LENGTH_BYTES + length);
    // `length` is at most MAX_FRAME_BYTES, which fits in a u32.
    frame.extend_from_slice(&(length as u32).to_be_bytes());
    frame.push(PROTOCOL_VERSION);
    frame.push(kind);
    frame.extend_from_slice(&body);
    Ok(frame)
}

fn named_head(container: &str, head: &HttpHead) -> Result<Vec<u8>, FrameError> {
    let mut body = Vec::new();
    put_str(&mut body, container)?;
    put_head(&mut body, head)?;
    Ok(body)
}

fn bare_head(head: &HttpHead) -> Result<Vec<u8>, FrameError> {
    let mut body = Vec::new();
    put_head(&mut body, head)?;
    Ok(body)
}

fn body_chunk(chunk: &Chunk) -> Vec<u8> {
    let mut body = Vec::with_capacity(9 + chunk.bytes.len());
    body.extend_from_slice(&chunk.id.to_be_bytes());
    body.push(u8::from(chunk.end));
    body.extend_from_slice(&chunk.bytes);
    body
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), FrameError> {
    let len = u16::try_from(bytes.len())
        .map_err(|_| malformed("http head", "a field is over 65535 bytes"))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<(), FrameError> {
    put_bytes(out, s.as_bytes())
}

fn put_head(out: &mut Vec<u8>, head: &HttpHead) -> Result<(), FrameError> {
    out.extend_from_slice(&head.id.to_be_bytes());
    out.extend_from_slice(&head.status.to_be_bytes());
    put_str(out, &head.method)?;
    put_str(out, &head.uri)?;
    let count = u16::try_from(head.headers.len())
        .map_err(|_| malformed("http head", "too many headers"))?;
    out.extend_from_slice(&count.to_be_bytes());
    for (name, value) in &head.headers {
        put_str(out, name)?;
        put_bytes(out, value)?;
    }
    Ok(())
}

/// A cursor over a frame body that refuses to read past its end.
struct Reader<'a> {
    bytes: &'a [u8],
    kind: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], kind: &'static str) -> Self {
        Self { bytes, kind }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.bytes.len() < n {
            return Err(malformed(self.kind, "truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(b);
        Ok(u64::from_be_bytes(array))
    }

    fn bytes(&mut self) -> Result<&'a [u8], FrameError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    fn string(&mut self) -> Result<String, FrameError> {
        let kind = self.kind;
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| malformed(kind, "text is not UTF-8"))
    }

    fn head(&mut self) -> Result<HttpHead, FrameError> {
        let id = self.u64()?;
        let status = self.u16()?;
        let method = self.string()?;
        let uri = self.string()?;
        let count = self.u16()?;
        let mut headers = Vec::with_capacity(usize::from(count).min(self.bytes.len() / 4));
        for _ in 0..count {
            let name = self.string()?;
            let value = self.bytes()?.to_vec();
            headers.push((name, value));
        }
        Ok(HttpHead {
            id,
            method,
            uri,
            status,
            headers,
        })
    }

    fn chunk(&mut self) -> Result<Chunk, FrameError> {
        let id = self.u64()?;
        let end = match self.u8()? {
            0 => false,
            1 => true,
            _ => return Err(malformed(self.kind, "end flag is neither 0 nor 1")),
        };
        let bytes = std::mem::take(&mut self.bytes).to_vec();
        Ok(Chunk { id, end, bytes })
    }

    fn finish<T>(self, value: T) -> Result<T, FrameError> {
        if self.bytes.is_empty() {
            Ok(value)
        } else {
            Err(malformed(self.kind, "trailing bytes"))
        }
    }
}

fn from_json<T: serde::de::DeserializeOwned>(
    kind: &'static str,
    body: &[u8],
) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| malformed(kind, e))
}

fn empty(kind: &'static str, body: &[u8], message: Message) -> Result<Message, FrameError> {
    if body.is_empty() {
        Ok(message)
    } else {
        Err(malformed(kind, "unexpected body"))
    }
}

fn decode_body(kind: u8, body: &[u8]) -> Result<Message, FrameError> {
    Ok(match kind {
        SETUP => Message::Setup(from_json("setup", body)?),
        USERNS_READY => empty("userns ready", body, Message::UsernsReady)?,
        USERNS_MAPPED => empty("userns mapped", body, Message::UsernsMapped)?,
        START => Message::Start(from_json("start", body)?),
        READY => Message::Ready {
            services: from_json::<ReadyBody>("ready", body)?.services,
        },
        RUN => Message::Run {
            container: from_json::<RunBody>("run", body)?.container,
        },
        STOP => Message::Stop {
            grace_ms: from_json::<StopBody>("stop", body)?.grace_ms,
        },
        REQUEST_HEAD | OUTBOUND_HEAD => {
            let name = if kind == REQUEST_HEAD {
                "request head"
            } else {
                "outbound head"
            };
            let mut r = Reader::new(body, name);
            let container = r.string()?;
            let head = r.head()?;
            if kind == REQUEST_HEAD {
                r.finish(Message::RequestHead { container, head })?
            } else {
                r.finish(Message::OutboundHead { container, head })?
            }
        }
        RESPONSE_HEAD => {
            let mut r = Reader::new(body, "response head");
            let head = r.head()?;
            r.finish(Message::ResponseHead(head))?
        }
        OUTBOUND_RESPONSE_HEAD => {
            let mut r = Reader::new(body, "outbound response head");
            let head = r.head()?;
            r.finish(Message::OutboundResponseHead(head))?
        }
        REQUEST_BODY => Message::RequestBody(Reader::new(body, "request body").chunk()?),
        RESPONSE_BODY => Message::ResponseBody(Reader::new(body, "response body").chunk()?),
        OUTBOUND_BODY => Message::OutboundBody(Reader::new(body, "outbound body").chunk()?),
        OUTBOUND_RESPONSE_BODY => {
            Message::OutboundResponseBody(Reader::new(body, "outbound response body").chunk()?)
        }
        OUTBOUND_ERROR => {
            let b: OutboundErrorBody = from_json("outbound error", body)?;
            Message::OutboundError {
                id: b.id,
                message: b.message,
            }
        }
        LOG => {
            let mut r = Reader::new(body, "log");
            let container = r.string()?;
            let stream = match r.u8()? {
                1 => LogStream::Stdout,
                2 => LogStream::Stderr,
                _ => return Err(malformed("log", "unknown stream")),
            };
            Message::Log {
                container,
                stream,
                bytes: std::mem::take(&mut r.bytes).to_vec(),
            }
        }
        EXITED => Message::Exited(from_json("exited", body)?),
        FATAL => Message::Fatal {
            message: from_json::<FatalBody>("fatal", body)?.message,
        },
        other => return Err(FrameError::UnknownKind(other)),
    })
}

/// Reassembles frames from a byte stream, whatever its chunking.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    /// Bytes of `buffer` already decoded; compacted lazily so a burst of small frames is
    /// not a quadratic copy.
    consumed: usize,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.consumed > 0 && self.consumed * 2 >= self.buffer.len() {
            self.buffer.drain(..self.consumed);
            self.consumed = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` when more bytes are needed, or the error that
    /// ends this peer. The length is checked before its bytes arrive, so a hostile length
    /// never makes the decoder wait for (or buffer) gigabytes.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        let pending = &self.buffer[self.consumed..];
        if pending.len() < LENGTH_BYTES {
            return Ok(None);
        }
        let length = u32::from_be_bytes([pending[0], pending[1], pending[2], pending[3]]) as usize;
        if length > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(length));
        }
        if length < 2 {
            return Err(FrameError::TooShort(length));
        }
        if pending.len() < LENGTH_BYTES + length {
            return Ok(None);
        }
        let frame = &pending[LENGTH_BYTES..LENGTH_BYTES + length];
        self.consumed += LENGTH_BYTES + length;
        let (version, kind) = (frame[0], frame[1]);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::Version(version));
        }
        decode_body(kind, &frame[2..]).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        let head = HttpHead {
            id: 7,
            method: "POST".into(),
            uri: "/path?q=1".into(),
            status: 0,
            headers: vec![
                ("content-type".into(), b"text/plain".to_vec()),
                ("x-bin".into(), vec![0, 255, 10]),
            ],
        };
        let chunk = |id, end, bytes: &[u8]| Chunk {
            id,
            end,
            bytes: bytes.to_vec(),
        };
        let response = HttpHead {
            method: String::new(),
            uri: String::new(),
            status: 200,
            ..head.clone()
        };
        vec![
            Message::Setup(Setup {
                root: "/var/lib/brink/sandboxes/uid".into(),
                files: vec![("/host/a.cwasm".into(), "/artifacts/a.cwasm".into())],
                dirs: vec![DirBind {
                    host: "/var/lib/brink/pods/u/volumes/data".into(),
                    inside: "/volumes/data".into(),
                    read_only: false,
                }],
                hostname: "hello".into(),
                user_namespace: true,
                max_threads: 64,
                max_data_bytes: 1 << 30,
                mode: SandboxMode::Probe {
                    attack: "mount".into(),
                    args: vec!["x".into()],
                },
            }),
            Message::UsernsReady,
            Message::UsernsMapped,
            Message::Start(Start {
                pod: "default/hello".into(),
                engine: EngineSpec {
                    epoch_tick_ms: 10,
                    request_deadline_ms: 10_000,
                    max_instances: 100,
                    max_guest_memory: 1 << 30,
                },
                containers: vec![ContainerSpec {
                    name: "hello".into(),
                    artifact: "/artifact.cwasm".into(),
                    args: vec!["hello".into()],
                    env: vec![("GREETING".into(), "Hi".into())],
                    memory_limit: 64 << 20,
                    preopens: vec![Preopen {
                        dir: "/volumes/data".into(),
                        guest: "/data".into(),
                        read_only: true,
                    }],
                }],
            }),
            Message::Ready {
                services: vec!["hello".into()],
            },
            Message::Run {
                container: "job".into(),
            },
            Message::Stop { grace_ms: 30_000 },
            Message::RequestHead {
                container: "hello".into(),
                head: head.clone(),
            },
            Message::RequestBody(chunk(7, false, b"part")),
            Message::RequestBody(chunk(7, true, b"")),
            Message::ResponseHead(response.clone()),
            Message::ResponseBody(chunk(7, true, &[1, 2, 3])),
            Message::OutboundHead {
                container: "fetch".into(),
                head: head.clone(),
            },
            Message::OutboundBody(chunk(9, true, b"")),
            Message::OutboundResponseHead(response),
            Message::OutboundResponseBody(chunk(9, false, b"x")),
            Message::OutboundError {
                id: 9,
                message: "denied".into(),
            },
            Message::Log {
                container: "job".into(),
                stream: LogStream::Stderr,
                bytes: ["ünïcode\n".as_bytes(), &[0xff]].concat(),
            },
            Message::Exited(Exited {
                container: "job".into(),
                code: 3,
                reason: "Error".into(),
                message: None,
            }),
            Message::Fatal {
                message: "out of memory".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips_whatever_the_chunking() {
        let messages = samples();
        let stream: Vec<u8> = messages
            .iter()
            .flat_map(|m| encode(m).expect("encode"))
            .collect();
        for chunk in [1, 3, 64, stream.len()] {
            let mut decoder = FrameDecoder::new();
            let mut out = Vec::new();
            for piece in stream.chunks(chunk) {
                decoder.push(piece);
                while let Some(m) = decoder.next_message().expect("valid stream") {
                    out.push(m);
                }
            }
            assert_eq!(out, messages, "chunk size {chunk}");
        }
    }

    fn decode_one(bytes: &[u8]) -> Result<Option<Message>, FrameError> {
        let mut decoder = FrameDecoder::new();
        decoder.push(bytes);
        decoder.next_message()
    }

    #[test]
    fn hostile_frames_are_errors() {
        let mut oversized = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes().to_vec();
        oversized.extend_from_slice(&[PROTOCOL_VERSION, 1]);
        assert_eq!(
            decode_one(&oversized),
            Err(FrameError::TooLarge(MAX_FRAME_BYTES + 1))
        );
        assert_eq!(
            decode_one(&[0, 0, 0, 1, PROTOCOL_VERSION]),
            Err(FrameError::TooShort(1))
        );
        assert_eq!(
            decode_one(&[0, 0, 0, 2, 9, READY]),
            Err(FrameError::Version(9))
        );
        assert_eq!(
            decode_one(&[0, 0, 0, 2, PROTOCOL_VERSION, 0]),
            Err(FrameError::UnknownKind(0))
        );
        assert_eq!(
            decode_one(&[0, 0, 0, 2, PROTOCOL_VERSION, 200]),
            Err(FrameError::UnknownKind(200))
        );
        assert!(matches!(
            decode_one(&[0, 0, 0, 3, PROTOCOL_VERSION, USERNS_READY, 0]),
            Err(FrameError::Malformed { .. })
        ));
        let mut bad_json = vec![0, 0, 0, 7, PROTOCOL_VERSION, STOP];
        bad_json.extend_from_slice(b"{oops");
        assert!(matches!(
            decode_one(&bad_json),
            Err(FrameError::Malformed { kind: "stop", .. })
        ));
        let mut unknown_field = vec![];
        let body = br#"{"grace_ms":1,"extra":true}"#;
        unknown_field.extend_from_slice(&((body.len() + 2) as u32).to_be_bytes());
        unknown_field.extend_from_slice(&[PROTOCOL_VERSION, STOP]);
        unknown_field.extend_from_slice(body);
        assert!(decode_one(&unknown_field).is_err());
        // A head whose header count promises more than the frame holds.
        let mut head = Vec::new();
        head.extend_from_slice(&1u64.to_be_bytes());
        head.extend_from_slice(&200u16.to_be_bytes());
        head.extend_from_slice(&[0, 0, 0, 0, 0xff, 0xff]);
        let mut frame = ((head.len() + 2) as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&[PROTOCOL_VERSION, RESPONSE_HEAD]);
        frame.extend_from_slice(&head);
        assert!(matches!(
            decode_one(&frame),
            Err(FrameError::Malformed {
                kind: "response head",
                ..
            })
        ));
        // A partial frame is not an error, just not yet a message.
        assert_eq!(decode_one(&[0, 0, 0, 9, PROTOCOL_VERSION]), Ok(None));
    }

    #[test]
    fn an_oversized_message_is_refused_when_encoding() {
        let chunk = vec![0u8; MAX_FRAME_BYTES];
        assert!(matches!(
            encode(&Message::ResponseBody(Chunk {
                id: 1,
                end: true,
                bytes: chunk
            })),
            Err(FrameError::TooLarge(_))
        ));
    }

    /// xorshift64*: a fixed-seed generator, so a failure reproduces.
    fn rng(state: &mut u64) -> u64 {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let valid: Vec<Vec<u8>> = samples()
            .iter()
            .map(|m| encode(m).expect("encode"))
            .collect();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for round in 0..20_000 {
            let mut bytes = if round % 2 == 0 {
                let len = (rng(&mut state) % 64) as usize;
                (0..len).map(|_| rng(&mut state) as u8).collect::<Vec<u8>>()
            } else {
                valid[(rng(&mut state) as usize) % valid.len()].clone()
            };
            // Flip a few bytes, keeping the version sometimes so bodies get parsed.
            for _ in 0..=(rng(&mut state) % 4) {
                if !bytes.is_empty() {
                    let i = (rng(&mut state) as usize) % bytes.len();
                    bytes[i] = rng(&mut state) as u8;
                }
            }
            let mut decoder = FrameDecoder::new();
            decoder.push(&bytes);
            for _ in 0..4 {
                match decoder.next_message() {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
