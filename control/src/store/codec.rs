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
