//! The write-ahead log: one preallocated file whose records make a ready batch durable
//! with a single `fdatasync`.
//!
//! Owns `DATA_DIR/raft.wal`; knows nothing of raft (records are opaque bytes). Why it
//! exists: sled's flush pushes its pages with `sync_file_range`, which is slow here
//! (~15 ms) and does not survive a power cut (no device cache flush, no metadata). The
//! ready loop writes each batch to sled without flushing it and appends the same batch
//! here; a checkpoint (sled flushed, its files fsynced) lets the log start over.
//!
//! The file is filled with zeros when made, so appends never change its size and
//! `fdatasync` has no metadata to write. It starts with `"BRINKWAL" ‖ generation u64`;
//! each record is `len u32 ‖ crc32 u32 ‖ generation u64 ‖ payload`, the CRC over the
//! generation and payload. A reset bumps the generation and writes from the start again:
//! replay stops at the first record that is empty, torn, or of an older generation.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"BRINKWAL";
const HEADER_BYTES: u64 = 16;
const RECORD_HEADER_BYTES: u64 = 16;

/// Why the log could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("write-ahead log {path} is damaged: {message}")]
    Damaged { path: PathBuf, message: String },
}

/// The write-ahead log file.
pub struct Wal {
    path: PathBuf,
    file: File,
    generation: u64,
    /// Where the next record goes.
    offset: u64,
    capacity: u64,
}

impl Wal {
    /// Opens (or makes, `capacity` bytes of zeros) the log at `path`, returning it and
    /// the payloads of the current generation's records in order.
    pub fn open(path: &Path, capacity: u64) -> Result<(Self, Vec<Vec<u8>>), WalError> {
        let io = |source| WalError::Io {
            path: path.to_path_buf(),
            source,
        };
        if !path.exists() {
            create(path, capacity).map_err(io)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut bytes = Vec::with_capacity(size as usize);
        file.read_to_end(&mut bytes).map_err(io)?;
        let damaged = |message: &str| WalError::Damaged {
            path: path.to_path_buf(),
            message: message.to_owned(),
        };
        if bytes.len() < HEADER_BYTES as usize || &bytes[..8] != MAGIC {
            return Err(damaged("no BRINKWAL header"));
        }
        let generation =
            u64::from_be_bytes(bytes[8..16].try_into().map_err(|_| damaged("header"))?);
        let mut records = Vec::new();
        let mut at = HEADER_BYTES as usize;
        while let Some(head) = bytes.get(at..at + RECORD_HEADER_BYTES as usize) {
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            let crc = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
            let record_generation =
                u64::from_be_bytes(head[8..16].try_into().map_err(|_| damaged("record"))?);
            let start = at + RECORD_HEADER_BYTES as usize;
            let Some(payload) = bytes.get(start..start.saturating_add(len)) else {
                break;
            };
            if len == 0 || record_generation != generation || checksum(generation, payload) != crc {
                // The end: zeros, a record of an earlier generation, or one torn by a
                // crash mid-write (never acknowledged: the sync comes after the write).
                break;
            }
            records.push(payload.to_vec());
            at = start + len;
        }
        Ok((
            Self {
                path: path.to_path_buf(),
                file,
                generation,
                offset: at as u64,
                capacity: size,
            },
            records,
        ))
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> WalError + '_ {
        |source| WalError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Whether a record of `len` payload bytes fits after the current ones.
    pub fn fits(&self, len: usize) -> bool {
        self.offset + RECORD_HEADER_BYTES + len as u64 <= self.capacity
    }

    /// Whether a record of `len` bytes could fit at all (after a reset).
    pub fn could_fit(&self, len: usize) -> bool {
        HEADER_BYTES + RECORD_HEADER_BYTES + len as u64 <= self.capacity
    }

    /// Writes a record (not yet durable: call [`sync`](Self::sync)). The caller checks
    /// [`fits`](Self::fits) first.
    pub fn append(&mut self, payload: &[u8]) -> Result<(), WalError> {
        let mut record = Vec::with_capacity(RECORD_HEADER_BYTES as usize + payload.len());
        record.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        record.extend_from_slice(&checksum(self.generation, payload).to_be_bytes());
        record.extend_from_slice(&self.generation.to_be_bytes());
        record.extend_from_slice(payload);
        let offset = self.offset;
        self.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.file.write_all(&record))
            .map_err(self.io())?;
        self.offset += record.len() as u64;
        Ok(())
    }

    /// Makes every appended record durable (one `fdatasync`).
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.file.sync_data().map_err(self.io())
    }

    /// Starts over (call only once everything recorded is durable elsewhere): a new
    /// generation, written from the start.
    pub fn reset(&mut self) -> Result<(), WalError> {
        self.generation += 1;
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&self.generation.to_be_bytes());
        self.file
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.file.write_all(&header))
            .and_then(|()| self.file.sync_data())
            .map_err(self.io())?;
        self.offset = HEADER_BYTES;
        Ok(())
    }
}

fn checksum(generation: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&generation.to_be_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Makes the zero-filled file under a temporary name, then names it (and syncs the
/// directory), so a crash never leaves a short log behind.
fn create(path: &Path, capacity: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp)?;
    let mut header = MAGIC.to_vec();
    header.extend_from_slice(&1u64.to_be_bytes());
    file.write_all(&header)?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = capacity.saturating_sub(HEADER_BYTES);
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_replay_in_order_and_a_reset_hides_the_old_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft.wal");
        let (mut wal, records) = Wal::open(&path, 4096).unwrap();
        assert!(records.is_empty());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        for r in [&b"one"[..], b"two", b"three"] {
            wal.append(r).unwrap();
        }
        wal.sync().unwrap();
        drop(wal);
        let (mut wal, records) = Wal::open(&path, 4096).unwrap();
        assert_eq!(
            records,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        wal.reset().unwrap();
        wal.append(b"four").unwrap();
        wal.sync().unwrap();
        drop(wal);
        // "two" and "three" still lie after "four" in the file, of the old generation.
        let (wal, records) = Wal::open(&path, 4096).unwrap();
        assert_eq!(records, vec![b"four".to_vec()]);
        assert!(wal.fits(4000) && !wal.fits(4096) && !wal.could_fit(4096));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096, "never grows");
    }

    #[test]
    fn a_torn_or_flipped_record_ends_the_replay_and_garbage_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft.wal");
        let (mut wal, _) = Wal::open(&path, 4096).unwrap();
        wal.append(b"kept").unwrap();
        wal.append(b"torn record").unwrap();
        wal.sync().unwrap();
        drop(wal);
        let mut bytes = std::fs::read(&path).unwrap();
        let second = (HEADER_BYTES + RECORD_HEADER_BYTES + 4 + RECORD_HEADER_BYTES) as usize;
        bytes[second + 3] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let (mut wal, records) = Wal::open(&path, 4096).unwrap();
        assert_eq!(records, vec![b"kept".to_vec()]);
        // New records go where the torn one was.
        wal.append(b"next").unwrap();
        wal.sync().unwrap();
        drop(wal);
        assert_eq!(
            Wal::open(&path, 4096).unwrap().1,
            vec![b"kept".to_vec(), b"next".to_vec()]
        );
        std::fs::write(&path, b"not a log at all").unwrap();
        assert!(matches!(
            Wal::open(&path, 4096),
            Err(WalError::Damaged { .. })
        ));
    }
}
