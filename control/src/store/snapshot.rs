//! Snapshot files: the whole state machine at one raft index, written by a member to
//! truncate its log and streamed to a member that fell behind.
//!
//! Owns the file format and the install into a [`Store`]; knows nothing of raft's rules
//! (the caller supplies the index, term and configuration, and resets the log). A file is
//!
//! ```text
//! "BRINKSNP" ‖ version u8 ‖ index u64 ‖ term u64 ‖ conf len u32 ‖ conf (raft protobuf)
//! ‖ (tree u8 ‖ key len u32 ‖ key ‖ value len u32 ‖ value)* ‖ 0u8 ‖ SHA-256 of all before
//! ```
//!
//! with big-endian integers and trees 1 kv, 2 history, 3 meta. Every record is checked as
//! the store checks its own records on open, and the digest must match, before anything
//! of the store is touched: a damaged or forged file is refused whole, naming the file.

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::{META_APPLIED, META_COMPACTED, META_INSTALLING, META_MEMBER, META_REVISION, Store};
use super::{StoreError, codec};

const MAGIC: &[u8; 8] = b"BRINKSNP";
/// The snapshot file format this build writes and reads.
pub const SNAPSHOT_VERSION: u8 = 1;
/// The largest key or value a snapshot record may hold (a bound on what one record can
/// make the reader allocate).
pub const MAX_RECORD_BYTES: usize = 64 << 20;
/// The largest encoded configuration in a header.
const MAX_CONF_BYTES: usize = 1 << 20;

const TREE_END: u8 = 0;
const TREE_KV: u8 = 1;
const TREE_HISTORY: u8 = 2;
const TREE_META: u8 = 3;

/// Where a snapshot stands in the log, and the configuration then (raft's encoding).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotHeader {
    pub index: u64,
    pub term: u64,
    /// raft-rs's protobuf encoding of the `ConfState` at `index`.
    pub conf: Vec<u8>,
}

/// Why a snapshot could not be written, read or installed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot {path} is damaged: {message}")]
    Damaged { path: PathBuf, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The file name of the snapshot at `index` (sorts by index).
pub fn file_name(index: u64) -> String {
    format!("{index:020}.snap")
}

/// The index a snapshot file's name gives, if it is one.
pub fn index_of(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".snap")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn damaged(path: &Path, message: impl Into<String>) -> SnapshotError {
    SnapshotError::Damaged {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The store's whole state as the snapshot `header`, encoded in memory (the caller must
/// not apply anything meanwhile: the ready loop encodes between batches, then hands the
/// bytes to [`write_file`] off the loop).
pub fn encode(store: &Store, header: &SnapshotHeader) -> Result<Vec<u8>, SnapshotError> {
    let mut out = Vec::with_capacity(1 << 20);
    out.extend_from_slice(MAGIC);
    out.push(SNAPSHOT_VERSION);
    out.extend_from_slice(&header.index.to_be_bytes());
    out.extend_from_slice(&header.term.to_be_bytes());
    out.extend_from_slice(&(header.conf.len() as u32).to_be_bytes());
    out.extend_from_slice(&header.conf);
    for (tag, tree) in [
        (TREE_KV, &store.kv),
        (TREE_HISTORY, &store.history),
        (TREE_META, &store.meta),
    ] {
        for item in tree.iter() {
            let (key, value) = item.map_err(StoreError::from)?;
            if tag == TREE_META && key.as_ref() == META_INSTALLING {
                continue;
            }
            out.push(tag);
            out.extend_from_slice(&(key.len() as u32).to_be_bytes());
            out.extend_from_slice(&key);
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(&value);
        }
    }
    out.push(TREE_END);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    Ok(out)
}

/// Writes encoded snapshot `bytes` at `index` into `dir`, durably (the file and the
/// directory synced before it is named). Returns its path.
pub fn write_file(dir: &Path, index: u64, bytes: &[u8]) -> Result<PathBuf, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let path = dir.join(file_name(index));
    let tmp = dir.join(format!(".{}.tmp", file_name(index)));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_error(&tmp)(e));
    }
    std::fs::rename(&tmp, &path).map_err(io_error(&path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))?;
    Ok(path)
}

/// Encodes and writes in one go (tests and tools).
pub fn write(
    store: &Store,
    dir: &Path,
    header: &SnapshotHeader,
) -> Result<(PathBuf, u64), SnapshotError> {
    let bytes = encode(store, header)?;
    let path = write_file(dir, header.index, &bytes)?;
    Ok((path, bytes.len() as u64))
}

/// A record of a snapshot file, as read.
struct Record {
    tree: u8,
    key: Vec<u8>,
    value: Vec<u8>,
}

/// Reads a snapshot file front to back, hashing as it goes.
struct FileReader {
    path: PathBuf,
    input: BufReader<std::fs::File>,
    hash: Sha256,
}

impl FileReader {
    fn open(path: &Path) -> Result<(Self, SnapshotHeader), SnapshotError> {
        let file = std::fs::File::open(path).map_err(io_error(path))?;
        let mut reader = Self {
            path: path.to_path_buf(),
            input: BufReader::with_capacity(1 << 20, file),
            hash: Sha256::new(),
        };
        let magic = reader.take(8, "magic")?;
        if magic != MAGIC {
            return Err(damaged(path, "not a Brink snapshot (bad magic)"));
        }
        let version = reader.take(1, "version")?[0];
        if version != SNAPSHOT_VERSION {
            return Err(damaged(
                path,
                format!("snapshot format {version} is not {SNAPSHOT_VERSION}"),
            ));
        }
        let index = reader.u64("index")?;
        let term = reader.u64("term")?;
        let conf = reader.bytes("configuration", MAX_CONF_BYTES)?;
        if index == 0 {
            return Err(damaged(path, "snapshot index 0"));
        }
        Ok((reader, SnapshotHeader { index, term, conf }))
    }

    fn take(&mut self, n: usize, what: &str) -> Result<Vec<u8>, SnapshotError> {
        let mut buf = vec![0u8; n];
        self.input.read_exact(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                damaged(&self.path, format!("ends inside its {what}"))
            } else {
                io_error(&self.path)(e)
            }
        })?;
        self.hash.update(&buf);
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, SnapshotError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, SnapshotError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_be_bytes(a))
    }

    fn bytes(&mut self, what: &str, limit: usize) -> Result<Vec<u8>, SnapshotError> {
        let n = self.u32(what)? as usize;
        if n > limit {
            return Err(damaged(
                &self.path,
                format!("{what} of {n} bytes is over the limit of {limit}"),
            ));
        }
        self.take(n, what)
    }

    /// The next record, or `None` at the end marker (after which the digest is checked).
    fn next(&mut self) -> Result<Option<Record>, SnapshotError> {
        let tree = self.take(1, "record tag")?[0];
        if tree == TREE_END {
            let computed = self.hash.clone().finalize();
            let mut stored = [0u8; 32];
            self.input
                .read_exact(&mut stored)
                .map_err(|_| damaged(&self.path, "ends before its digest"))?;
            if computed.as_slice() != stored {
                return Err(damaged(&self.path, "digest does not match its contents"));
            }
            let mut rest = [0u8; 1];
            if self.input.read(&mut rest).map_err(io_error(&self.path))? != 0 {
                return Err(damaged(&self.path, "bytes after the digest"));
            }
            return Ok(None);
        }
        if !matches!(tree, TREE_KV | TREE_HISTORY | TREE_META) {
            return Err(damaged(&self.path, format!("unknown record tag {tree}")));
        }
        let key = self.bytes("key", MAX_RECORD_BYTES)?;
        let value = self.bytes("value", MAX_RECORD_BYTES)?;
        let record = Record { tree, key, value };
        check_record(&record).map_err(|m| damaged(&self.path, m))?;
        Ok(Some(record))
    }
}

/// The same checks `Store::open` makes of its own records.
fn check_record(r: &Record) -> Result<(), String> {
    let lossy = || String::from_utf8_lossy(&r.key).into_owned();
    match r.tree {
        TREE_KV => codec::decode_value(&r.value)
            .map(drop)
            .map_err(|e| format!("kv record {:?}: {e}", lossy())),
        TREE_HISTORY => {
            codec::decode_history_key(&r.key).map_err(|e| format!("history key: {e}"))?;
            codec::decode_event_kind(&r.value)
                .map(drop)
                .map_err(|e| format!("history record {:?}: {e}", lossy()))
        }
        _ => {
            let key = r.key.as_slice();
            if [META_APPLIED, META_REVISION, META_COMPACTED].contains(&key) {
                codec::decode_u64(&r.value)
                    .map(drop)
                    .map_err(|e| format!("meta {:?}: {e}", lossy()))
            } else if let Some(id) = key.strip_prefix(META_MEMBER) {
                if id.len() != 8 || std::str::from_utf8(&r.value).is_err() {
                    return Err(format!("member record {:?} is malformed", lossy()));
                }
                Ok(())
            } else {
                Err(format!("unknown meta record {:?}", lossy()))
            }
        }
    }
}

/// Reads a whole snapshot file, checking every record and its digest; returns its header.
/// Nothing is written anywhere.
pub fn verify(path: &Path) -> Result<SnapshotHeader, SnapshotError> {
    let (mut reader, header) = FileReader::open(path)?;
    let mut applied = None;
    while let Some(record) = reader.next()? {
        if record.tree == TREE_META && record.key == META_APPLIED {
            applied = codec::decode_u64(&record.value).ok();
        }
    }
    if applied != Some(header.index) {
        return Err(damaged(
            path,
            format!(
                "its state's applied index is {applied:?}, its header says {}",
                header.index
            ),
        ));
    }
    Ok(header)
}

/// Reads only a snapshot file's header (for listing; [`verify`] before use).
pub fn read_header(path: &Path) -> Result<SnapshotHeader, SnapshotError> {
    FileReader::open(path).map(|(_, header)| header)
}

/// How many records go to sled in one batch while installing.
const INSTALL_BATCH: usize = 4096;

impl Store {
    /// The index of a snapshot whose install was interrupted (a crash mid-install): the
    /// caller must finish it before using the store.
    pub fn installing(&self) -> Result<Option<u64>, StoreError> {
        match self.meta.get(META_INSTALLING)? {
            None => Ok(None),
            Some(bytes) => codec::decode_u64(&bytes)
                .map(Some)
                .map_err(|e| self.corrupt("meta", META_INSTALLING, e)),
        }
    }

    /// Replaces the whole state machine with the snapshot at `path` (checked whole
    /// first). Crash-safe with [`finish_install`](Self::finish_install): a marker naming
    /// the snapshot is durable before anything is removed, and stays until the caller has
    /// also reset the raft log, so a restart finds the marker and installs again.
    pub fn install(&self, path: &Path) -> Result<SnapshotHeader, SnapshotError> {
        let header = verify(path)?;
        self.meta
            .insert(META_INSTALLING, codec::encode_u64(header.index).to_vec())
            .map_err(StoreError::from)?;
        self.flush()?;
        for tree in [&self.kv, &self.history] {
            tree.clear().map_err(StoreError::from)?;
        }
        for item in self.meta.iter() {
            let (key, _) = item.map_err(StoreError::from)?;
            if key.as_ref() != META_INSTALLING {
                self.meta.remove(key).map_err(StoreError::from)?;
            }
        }
        let (mut reader, _) = FileReader::open(path)?;
        let mut batches: [sled::Batch; 3] = Default::default();
        let mut queued = 0;
        let apply = |batches: &mut [sled::Batch; 3]| -> Result<(), StoreError> {
            let [kv, history, meta] = std::mem::take(batches);
            self.kv.apply_batch(kv)?;
            self.history.apply_batch(history)?;
            self.meta.apply_batch(meta)?;
            Ok(())
        };
        while let Some(record) = reader.next()? {
            batches[usize::from(record.tree - 1)].insert(record.key, record.value);
            queued += 1;
            if queued == INSTALL_BATCH {
                apply(&mut batches)?;
                queued = 0;
            }
        }
        apply(&mut batches)?;
        Ok(header)
    }

    /// Ends an install begun by [`install`](Self::install) (after the raft log was reset)
    /// and makes it durable.
    pub fn finish_install(&self) -> Result<(), StoreError> {
        self.meta.remove(META_INSTALLING)?;
        self.flush()
    }
}
