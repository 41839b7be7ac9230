//! Frames between control-plane members (`brink server`) over QUIC.
//!
//! Owns the byte layout of everything one member sends another, its version and its
//! limits; no I/O. Raft's own messages travel as opaque bytes (raft-rs's protobuf
//! encoding): `proto` does not depend on raft, and the receiver decodes them only from a
//! peer whose certificate chains to the site CA.
//!
//! A frame on a stream is `u32 length` (big-endian, of what follows, at most
//! [`MAX_FRAME_BYTES`]) then `u8 version` ([`PEER_PROTOCOL_VERSION`]), `u8 kind`, and the
//! kind's body. Integers are big-endian; strings and byte strings are a `u32` length and
//! their bytes. A frame with bytes left over, an unknown kind or version, or a length past
//! a limit is refused whole.

/// The version byte every frame carries; a member refuses frames of another version.
pub const PEER_PROTOCOL_VERSION: u8 = 1;
/// The largest frame (raft batches are cut well below this by the sender).
pub const MAX_FRAME_BYTES: usize = 16 << 20;
/// The most raft messages in one batch frame.
pub const MAX_BATCH_MESSAGES: usize = 65_536;
/// The longest string field (addresses, reasons, PEM documents).
pub const MAX_STRING_BYTES: usize = 64 << 10;
/// The most members listed in a join answer.
pub const MAX_MEMBERS: usize = 64;

const KIND_HELLO: u8 = 1;
const KIND_RAFT: u8 = 2;
const KIND_JOIN_REQUEST: u8 = 3;
const KIND_JOIN_ACCEPTED: u8 = 4;
const KIND_JOIN_REFUSED: u8 = 5;
const KIND_SNAPSHOT_BEGIN: u8 = 6;
const KIND_SNAPSHOT_CHUNK: u8 = 7;
const KIND_SNAPSHOT_END: u8 = 8;

/// A member of the cluster and the address its peers dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    pub peer_addr: String,
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The first frame on a member's stream: who is talking and where it can be dialled.
    Hello { from: u64, peer_addr: String },
    /// Raft messages, in order, each raft-rs's encoding of one `Message`.
    Raft { messages: Vec<Vec<u8>> },
    /// A new member asks to join: the join token's secret and where it can be dialled.
    JoinRequest { secret: Vec<u8>, peer_addr: String },
    /// The cluster took the new member in as a learner with `id`; it gets the site CA
    /// (members sign their own certificates) and the members it must talk to.
    JoinAccepted {
        id: u64,
        ca_cert_pem: String,
        ca_key_pem: String,
        members: Vec<Member>,
    },
    /// The join was refused, and why.
    JoinRefused { reason: String },
    /// Opens a snapshot on a member's raft stream (after its Hello): the raft
    /// `MsgSnapshot` that carries the snapshot's index, term and configuration, and the
    /// size of the snapshot file that follows as chunks.
    SnapshotBegin { message: Vec<u8>, size: u64 },
    /// The next bytes of the snapshot file.
    SnapshotChunk { bytes: Vec<u8> },
    /// The snapshot file is complete; its SHA-256 (the file also checks itself).
    SnapshotEnd { sha256: [u8; 32] },
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes is larger than the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("peer protocol version {0} is not {PEER_PROTOCOL_VERSION}")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame ends inside its {0}")]
    Truncated(&'static str),
    #[error("{field} has {len} entries or bytes, over the limit of {limit}")]
    Limit {
        field: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("{0} is not UTF-8")]
    Utf8(&'static str),
    #[error("{0} bytes left over after the frame")]
    Trailing(usize),
}

/// Reads a frame's length prefix, refusing lengths past [`MAX_FRAME_BYTES`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    if len < 2 {
        return Err(FrameError::Empty);
    }
    Ok(len)
}

/// Encodes `frame` with its length prefix.
pub fn encode_frame(frame: &Frame) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    out.push(PEER_PROTOCOL_VERSION);
    match frame {
        Frame::Hello { from, peer_addr } => {
            out.push(KIND_HELLO);
            out.extend_from_slice(&from.to_be_bytes());
            put_bytes(&mut out, peer_addr.as_bytes());
        }
        Frame::Raft { messages } => {
            out.push(KIND_RAFT);
            out.extend_from_slice(&(messages.len() as u32).to_be_bytes());
            for m in messages {
                put_bytes(&mut out, m);
            }
        }
        Frame::JoinRequest { secret, peer_addr } => {
            out.push(KIND_JOIN_REQUEST);
            put_bytes(&mut out, secret);
            put_bytes(&mut out, peer_addr.as_bytes());
        }
        Frame::JoinAccepted {
            id,
            ca_cert_pem,
            ca_key_pem,
            members,
        } => {
            out.push(KIND_JOIN_ACCEPTED);
            out.extend_from_slice(&id.to_be_bytes());
            put_bytes(&mut out, ca_cert_pem.as_bytes());
            put_bytes(&mut out, ca_key_pem.as_bytes());
            out.extend_from_slice(&(members.len() as u32).to_be_bytes());
            for m in members {
                out.extend_from_slice(&m.id.to_be_bytes());
                put_bytes(&mut out, m.peer_addr.as_bytes());
            }
        }
        Frame::JoinRefused { reason } => {
            out.push(KIND_JOIN_REFUSED);
            put_bytes(&mut out, reason.as_bytes());
        }
        Frame::SnapshotBegin { message, size } => {
            out.push(KIND_SNAPSHOT_BEGIN);
            put_bytes(&mut out, message);
            out.extend_from_slice(&size.to_be_bytes());
        }
        Frame::SnapshotChunk { bytes } => {
            out.push(KIND_SNAPSHOT_CHUNK);
            put_bytes(&mut out, bytes);
        }
        Frame::SnapshotEnd { sha256 } => {
            out.push(KIND_SNAPSHOT_END);
            out.extend_from_slice(sha256);
        }
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Encoded size of a raft batch holding messages of these sizes (for cutting batches).
pub fn raft_batch_overhead(messages: usize) -> usize {
    4 + 2 + 4 + 4 * messages
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
        if self.rest.len() < n {
            return Err(FrameError::Truncated(what));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, FrameError> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn count(&mut self, what: &'static str, limit: usize) -> Result<usize, FrameError> {
        let n = self.u32(what)? as usize;
        if n > limit {
            return Err(FrameError::Limit {
                field: what,
                len: n,
                limit,
            });
        }
        Ok(n)
    }

    fn bytes(&mut self, what: &'static str, limit: usize) -> Result<&'a [u8], FrameError> {
        let n = self.count(what, limit)?;
        self.take(n, what)
    }

    fn string(&mut self, what: &'static str) -> Result<String, FrameError> {
        let b = self.bytes(what, MAX_STRING_BYTES)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| FrameError::Utf8(what))
    }
}

/// Decodes one frame's body (what follows the length prefix).
pub fn decode_frame(body: &[u8]) -> Result<Frame, FrameError> {
    if body.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut r = Reader { rest: body };
    let version = r.u8("version").map_err(|_| FrameError::Empty)?;
    if version != PEER_PROTOCOL_VERSION {
        return Err(FrameError::Version(version));
    }
    let frame = match r.u8("kind")? {
        KIND_HELLO => Frame::Hello {
            from: r.u64("sender id")?,
            peer_addr: r.string("peer address")?,
        },
        KIND_RAFT => {
            let n = r.count("raft batch", MAX_BATCH_MESSAGES)?;
            // Each message needs at least its 4-byte length: a count the body cannot
            // hold is refused before anything is allocated for it.
            if n.saturating_mul(4) > r.rest.len() {
                return Err(FrameError::Truncated("raft batch"));
            }
            let mut messages = Vec::with_capacity(n);
            for _ in 0..n {
                messages.push(r.bytes("raft message", MAX_FRAME_BYTES)?.to_vec());
            }
            Frame::Raft { messages }
        }
        KIND_JOIN_REQUEST => Frame::JoinRequest {
            secret: r.bytes("join secret", MAX_STRING_BYTES)?.to_vec(),
            peer_addr: r.string("peer address")?,
        },
        KIND_JOIN_ACCEPTED => {
            let id = r.u64("member id")?;
            let ca_cert_pem = r.string("CA certificate")?;
            let ca_key_pem = r.string("CA key")?;
            let n = r.count("member list", MAX_MEMBERS)?;
            let mut members = Vec::with_capacity(n);
            for _ in 0..n {
                members.push(Member {
                    id: r.u64("member id")?,
                    peer_addr: r.string("peer address")?,
                });
            }
            Frame::JoinAccepted {
                id,
                ca_cert_pem,
                ca_key_pem,
                members,
            }
        }
        KIND_JOIN_REFUSED => Frame::JoinRefused {
            reason: r.string("reason")?,
        },
        KIND_SNAPSHOT_BEGIN => Frame::SnapshotBegin {
            message: r.bytes("snapshot message", MAX_STRING_BYTES)?.to_vec(),
            size: r.u64("snapshot size")?,
        },
        KIND_SNAPSHOT_CHUNK => Frame::SnapshotChunk {
            bytes: r.bytes("snapshot chunk", MAX_FRAME_BYTES)?.to_vec(),
        },
        KIND_SNAPSHOT_END => {
            let mut sha256 = [0u8; 32];
            sha256.copy_from_slice(r.take(32, "snapshot digest")?);
            Frame::SnapshotEnd { sha256 }
        }
        other => return Err(FrameError::Kind(other)),
    };
    if !r.rest.is_empty() {
        return Err(FrameError::Trailing(r.rest.len()));
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello {
                from: 7,
                peer_addr: "10.0.0.7:2380".into(),
            },
            Frame::Raft {
                messages: vec![vec![1, 2, 3], vec![], vec![9; 300]],
            },
            Frame::Raft { messages: vec![] },
            Frame::JoinRequest {
                secret: vec![0xAA; 32],
                peer_addr: "[::1]:2380".into(),
            },
            Frame::JoinAccepted {
                id: u64::MAX,
                ca_cert_pem: "-----BEGIN CERTIFICATE-----\n".into(),
                ca_key_pem: "key".into(),
                members: vec![
                    Member {
                        id: 1,
                        peer_addr: "a:1".into(),
                    },
                    Member {
                        id: 2,
                        peer_addr: "b:2".into(),
                    },
                ],
            },
            Frame::JoinRefused {
                reason: "the join token is wrong".into(),
            },
            Frame::SnapshotBegin {
                message: vec![7; 40],
                size: 1 << 33,
            },
            Frame::SnapshotChunk {
                bytes: vec![0x5A; 1000],
            },
            Frame::SnapshotChunk { bytes: vec![] },
            Frame::SnapshotEnd { sha256: [3; 32] },
        ]
    }

    fn body(encoded: &[u8]) -> &[u8] {
        let len = frame_len(encoded[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, encoded.len() - 4);
        &encoded[4..]
    }

    #[test]
    fn every_frame_survives_a_round_trip() {
        for frame in samples() {
            let encoded = encode_frame(&frame);
            assert_eq!(decode_frame(body(&encoded)), Ok(frame));
        }
    }

    #[test]
    fn wrong_version_kind_and_trailing_bytes_are_refused() {
        let encoded = encode_frame(&samples()[0]);
        let mut b = body(&encoded).to_vec();
        b[0] = 2;
        assert_eq!(decode_frame(&b), Err(FrameError::Version(2)));
        b[0] = PEER_PROTOCOL_VERSION;
        b[1] = 99;
        assert_eq!(decode_frame(&b), Err(FrameError::Kind(99)));
        let mut b = body(&encoded).to_vec();
        b.push(0);
        assert_eq!(decode_frame(&b), Err(FrameError::Trailing(1)));
        assert_eq!(decode_frame(&[]), Err(FrameError::Empty));
        assert!(matches!(
            frame_len((MAX_FRAME_BYTES as u32 + 1).to_be_bytes()),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn a_huge_count_in_a_small_frame_allocates_nothing_and_is_refused() {
        let mut b = vec![PEER_PROTOCOL_VERSION, KIND_RAFT];
        b.extend_from_slice(&(MAX_BATCH_MESSAGES as u32).to_be_bytes());
        assert_eq!(decode_frame(&b), Err(FrameError::Truncated("raft batch")));
        let mut b = vec![PEER_PROTOCOL_VERSION, KIND_RAFT];
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(decode_frame(&b), Err(FrameError::Limit { .. })));
    }

    /// Random bytes, and valid frames with bytes flipped, cut or grown, never panic the
    /// decoder; whatever it accepts encodes back to the same bytes.
    #[test]
    fn garbage_is_refused_without_panicking() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let valid: Vec<Vec<u8>> = samples()
            .iter()
            .map(|f| body(&encode_frame(f)).to_vec())
            .collect();
        for round in 0..40_000 {
            let mut b = if round % 4 == 0 {
                let len = (next() % 64) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                valid[(next() as usize) % valid.len()].clone()
            };
            if !b.is_empty() {
                for _ in 0..=(next() % 3) {
                    let i = (next() as usize) % b.len();
                    b[i] = next() as u8;
                }
                if next() % 4 == 0 {
                    b.truncate((next() as usize) % b.len());
                }
            }
            if let Ok(frame) = decode_frame(&b) {
                assert_eq!(body(&encode_frame(&frame)), &b[..], "round {round}");
            }
        }
    }
}
