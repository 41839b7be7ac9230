//! The store's on-disk records: fixed-width big-endian integers, then bytes. Every
//! decoder checks lengths and tags, so a damaged record is an error naming what is wrong,
//! never a panic or a silently wrong value.

use super::{EventKind, Value};

/// What is wrong with a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("record is {len} bytes, shorter than its {need}-byte header")]
    Short { len: usize, need: usize },
    #[error("unknown event tag {0}")]
    Tag(u8),
    #[error("member key is not 8 bytes of id")]
    Length,
    #[error("member address is not UTF-8")]
    Utf8,
}

const VALUE_HEADER: usize = 24;

pub fn encode_u64(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub fn decode_u64(bytes: &[u8]) -> Result<u64, CodecError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| CodecError::Short {
        len: bytes.len(),
        need: 8,
    })?;
    Ok(u64::from_be_bytes(array))
}

/// `create ‖ mod ‖ version ‖ data`.
pub fn encode_value(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(VALUE_HEADER + value.data.len());
    out.extend_from_slice(&value.create_revision.to_be_bytes());
    out.extend_from_slice(&value.mod_revision.to_be_bytes());
    out.extend_from_slice(&value.version.to_be_bytes());
    out.extend_from_slice(&value.data);
    out
}

pub fn decode_value(bytes: &[u8]) -> Result<Value, CodecError> {
    if bytes.len() < VALUE_HEADER {
        return Err(CodecError::Short {
            len: bytes.len(),
            need: VALUE_HEADER,
        });
    }
    Ok(Value {
        create_revision: decode_u64(&bytes[0..8])?,
        mod_revision: decode_u64(&bytes[8..16])?,
        version: decode_u64(&bytes[16..24])?,
        data: bytes[VALUE_HEADER..].to_vec(),
    })
}

/// `revision ‖ key`: history sorts by revision, then key.
pub fn history_key(revision: u64, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&revision.to_be_bytes());
    out.extend_from_slice(key);
    out
}

pub fn decode_history_key(bytes: &[u8]) -> Result<(u64, &[u8]), CodecError> {
    if bytes.len() < 8 {
        return Err(CodecError::Short {
            len: bytes.len(),
            need: 8,
        });
    }
    Ok((decode_u64(&bytes[..8])?, &bytes[8..]))
}

/// `tag ‖ value`: 1 put, 2 delete (with the last value).
pub fn encode_event_kind(kind: &EventKind) -> Vec<u8> {
    let (tag, value) = match kind {
        EventKind::Put(v) => (1u8, v),
        EventKind::Delete(v) => (2u8, v),
    };
    let mut out = vec![tag];
    out.extend_from_slice(&encode_value(value));
    out
}

pub fn decode_event_kind(bytes: &[u8]) -> Result<EventKind, CodecError> {
    let Some((&tag, rest)) = bytes.split_first() else {
        return Err(CodecError::Short { len: 0, need: 1 });
    };
    let value = decode_value(rest)?;
    match tag {
        1 => Ok(EventKind::Put(value)),
        2 => Ok(EventKind::Delete(value)),
        other => Err(CodecError::Tag(other)),
    }
}

/// A continue token: `revision.hex(last key)`.
pub fn encode_continue(revision: u64, last_key: &[u8]) -> String {
    let mut out = format!("{revision}.");
    for b in last_key {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

pub fn decode_continue(token: &str) -> Option<(u64, Vec<u8>)> {
    let (revision, hex) = token.split_once('.')?;
    let revision = revision.parse().ok()?;
    if hex.len() % 2 != 0 || hex.len() > 2 * 4096 {
        return None;
    }
    let key = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some((revision, key))
}

/// The format version of a command in a raft entry: the first byte of its data.
pub const COMMAND_VERSION: u8 = 1;
/// The first byte of a compaction entry (`tag ‖ revision u64`): every member drops the
/// same history at the same point in the log.
pub const COMPACTION_TAG: u8 = 0x80;

/// What a normal raft entry asks of the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryCommand {
    Txn(super::Command),
    /// Drop history before this revision.
    Compact {
        revision: u64,
    },
}

pub fn encode_compaction(revision: u64) -> Vec<u8> {
    let mut out = vec![COMPACTION_TAG];
    out.extend_from_slice(&revision.to_be_bytes());
    out
}

/// Decodes a normal entry's data: a compaction or a transaction.
pub fn decode_entry(bytes: &[u8]) -> Result<EntryCommand, CommandError> {
    match bytes.split_first() {
        Some((&COMPACTION_TAG, rest)) => {
            let revision: [u8; 8] = rest.try_into().map_err(|_| CommandError::Short(1))?;
            Ok(EntryCommand::Compact {
                revision: u64::from_be_bytes(revision),
            })
        }
        _ => decode_command(bytes).map(EntryCommand::Txn),
    }
}

/// `version ‖ count ‖ (tag ‖ key len ‖ key ‖ [data len ‖ data] ‖ [expect flag ‖ expect])*`,
/// lengths and counts as u32, revisions as u64, all big-endian.
pub fn encode_command(command: &super::Command) -> Vec<u8> {
    use super::Op;
    let mut out = vec![COMMAND_VERSION];
    out.extend_from_slice(&(command.ops.len() as u32).to_be_bytes());
    let bytes = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    };
    let expect = |out: &mut Vec<u8>, e: &Option<u64>| match e {
        None => out.push(0),
        Some(r) => {
            out.push(1);
            out.extend_from_slice(&r.to_be_bytes());
        }
    };
    for op in &command.ops {
        match op {
            Op::Create { key, data } => {
                out.push(1);
                bytes(&mut out, key);
                bytes(&mut out, data);
            }
            Op::Update {
                key,
                data,
                expect_mod,
            } => {
                out.push(2);
                bytes(&mut out, key);
                bytes(&mut out, data);
                expect(&mut out, expect_mod);
            }
            Op::Delete { key, expect_mod } => {
                out.push(3);
                bytes(&mut out, key);
                expect(&mut out, expect_mod);
            }
        }
    }
    out
}

/// What is wrong with an encoded command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("empty command")]
    Empty,
    #[error("command format version {0} is not known (this build reads {COMMAND_VERSION})")]
    Version(u8),
    #[error("command is cut short at byte {0}")]
    Short(usize),
    #[error("unknown operation tag {0}")]
    Tag(u8),
    #[error("{0} bytes after the last operation")]
    Trailing(usize),
}

pub fn decode_command(bytes: &[u8]) -> Result<super::Command, CommandError> {
    use super::Op;
    struct Reader<'a> {
        bytes: &'a [u8],
        at: usize,
    }
    impl Reader<'_> {
        fn take(&mut self, n: usize) -> Result<&[u8], CommandError> {
            let end = self.at.checked_add(n).ok_or(CommandError::Short(self.at))?;
            let slice = self
                .bytes
                .get(self.at..end)
                .ok_or(CommandError::Short(self.at))?;
            self.at = end;
            Ok(slice)
        }
        fn u8(&mut self) -> Result<u8, CommandError> {
            Ok(self.take(1)?[0])
        }
        fn u32(&mut self) -> Result<u32, CommandError> {
            let b = self.take(4)?;
            Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        }
        fn u64(&mut self) -> Result<u64, CommandError> {
            let b = self.take(8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            Ok(u64::from_be_bytes(a))
        }
        fn bytes(&mut self) -> Result<Vec<u8>, CommandError> {
            let n = self.u32()? as usize;
            Ok(self.take(n)?.to_vec())
        }
        fn expect(&mut self) -> Result<Option<u64>, CommandError> {
            match self.u8()? {
                0 => Ok(None),
                1 => Ok(Some(self.u64()?)),
                other => Err(CommandError::Tag(other)),
            }
        }
    }
    let mut r = Reader { bytes, at: 0 };
    let version = r.u8().map_err(|_| CommandError::Empty)?;
    if version != COMMAND_VERSION {
        return Err(CommandError::Version(version));
    }
    let count = r.u32()?;
    // Every operation takes at least 5 bytes: a count beyond that is a lie.
    if count as usize > bytes.len() / 5 {
        return Err(CommandError::Short(r.at));
    }
    let mut ops = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let op = match r.u8()? {
            1 => Op::Create {
                key: r.bytes()?,
                data: r.bytes()?,
            },
            2 => Op::Update {
                key: r.bytes()?,
                data: r.bytes()?,
                expect_mod: r.expect()?,
            },
            3 => Op::Delete {
                key: r.bytes()?,
                expect_mod: r.expect()?,
            },
            other => return Err(CommandError::Tag(other)),
        };
        ops.push(op);
    }
    if r.at != bytes.len() {
        return Err(CommandError::Trailing(bytes.len() - r.at));
    }
    Ok(super::Command { ops })
}
