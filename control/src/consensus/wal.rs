//! The write-ahead log: two preallocated files whose records make a ready batch durable
//! with a single `fdatasync`.
//!
//! Owns `DATA_DIR/raft-0.wal` and `raft-1.wal`; knows nothing of raft (records are opaque
//! bytes). Why it exists: sled's flush pushes its pages with `sync_file_range`, which is
//! slow here (~15 ms) and does not survive a power cut (no device cache flush, no
//! metadata). The ready loop writes each batch to sled without flushing it and appends the
//! same batch here. When the active file fills, the other one becomes active and a
//! checkpoint (sled flushed, its files fsynced) runs beside the loop; the file it covers
//! may be reused once it is done.
//!
//! Each file is filled with zeros when made, so appends never change its size and
//! `fdatasync` has no metadata to write. It starts with `"BRINKWAL" ‖ generation u64`;
//! each record is `len u32 ‖ crc32 u32 ‖ generation u64 ‖ payload`, the CRC over the
//! generation and payload. A file taken into use gets a generation above both files' and
//! is written from the start: replay reads the older file, then the newer, each up to its
//! first record that is empty, torn, or of an older generation.

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

/// One of the two files.
struct Segment {
    path: PathBuf,
    file: File,
    generation: u64,
    /// Where the next record goes.
    offset: u64,
    capacity: u64,
}

/// The write-ahead log.
pub struct Wal {
    segments: [Segment; 2],
    active: usize,
}

impl Segment {
    /// Opens (or makes) one file; returns it with its records.
    fn open(path: &Path, capacity: u64) -> Result<(Self, Vec<Vec<u8>>), WalError> {
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

    /// Empties the file under a new generation (its old records no longer count).
    fn restart(&mut self, generation: u64) -> Result<(), WalError> {
        self.generation = generation;
        let mut header = MAGIC.to_vec();
        header.extend_from_slice(&generation.to_be_bytes());
        self.file
            .seek(SeekFrom::Start(0))
            .and_then(|_| self.file.write_all(&header))
            .and_then(|()| self.file.sync_data())
            .map_err(self.io())?;
        self.offset = HEADER_BYTES;
        Ok(())
    }
}

impl Wal {
    /// Opens (or makes, `capacity` bytes of zeros each) the two files named `stem-0.wal`
    /// and `stem-1.wal` beside `stem`, returning the log and the payloads of its records
    /// in the order they were written (the older file's first).
    pub fn open(stem: &Path, capacity: u64) -> Result<(Self, Vec<Vec<u8>>), WalError> {
        let name = |n: u8| {
            let mut file = stem.as_os_str().to_owned();
            file.push(format!("-{n}.wal"));
            PathBuf::from(file)
        };
        let (first, first_records) = Segment::open(&name(0), capacity)?;
        let (second, second_records) = Segment::open(&name(1), capacity)?;
        let active = usize::from(second.generation > first.generation);
        let records = if active == 1 {
            [first_records, second_records].concat()
        } else {
            [second_records, first_records].concat()
        };
        Ok((
            Self {
                segments: [first, second],
                active,
            },
            records,
        ))
    }

    fn current(&self) -> &Segment {
        &self.segments[self.active]
    }

    /// Whether a record of `len` payload bytes fits after the active file's records.
    pub fn fits(&self, len: usize) -> bool {
        let s = self.current();
        s.offset + RECORD_HEADER_BYTES + len as u64 <= s.capacity
    }

    /// Writes a record (not yet durable: call [`sync`](Self::sync)). The caller checks
    /// [`fits`](Self::fits) first.
    pub fn append(&mut self, payload: &[u8]) -> Result<(), WalError> {
        let segment = &mut self.segments[self.active];
        let mut record = Vec::with_capacity(RECORD_HEADER_BYTES as usize + payload.len());
        record.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        record.extend_from_slice(&checksum(segment.generation, payload).to_be_bytes());
        record.extend_from_slice(&segment.generation.to_be_bytes());
        record.extend_from_slice(payload);
        let offset = segment.offset;
        segment
            .file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| segment.file.write_all(&record))
            .map_err(segment.io())?;
        segment.offset += record.len() as u64;
        Ok(())
    }

    /// Makes every appended record durable (one `fdatasync`).
    pub fn sync(&mut self) -> Result<(), WalError> {
        let segment = &self.segments[self.active];
        segment.file.sync_data().map_err(segment.io())
    }

    /// Makes the other file active, emptied. Call only once what that file held is
    /// durable elsewhere (the checkpoint begun at the last switch has finished).
    pub fn switch(&mut self) -> Result<(), WalError> {
        let next = self.segments[0].generation.max(self.segments[1].generation) + 1;
        let other = 1 - self.active;
        self.segments[other].restart(next)?;
        self.active = other;
        Ok(())
    }

    /// Empties both files (everything recorded is durable elsewhere).
    pub fn reset(&mut self) -> Result<(), WalError> {
        self.switch()?;
        self.switch()
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
    fn records_replay_in_order_across_both_files_and_a_switch_frees_the_older() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stem = dir.path().join("raft");
        let (mut wal, records) = Wal::open(&stem, 4096).unwrap();
        assert!(records.is_empty());
        assert_eq!(
            std::fs::metadata(dir.path().join("raft-0.wal"))
                .unwrap()
                .len(),
            4096
        );
        for r in [&b"one"[..], b"two"] {
            wal.append(r).unwrap();
        }
        wal.sync().unwrap();
        wal.switch().unwrap();
        wal.append(b"three").unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (mut wal, records) = Wal::open(&stem, 4096).unwrap();
        assert_eq!(
            records,
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        // The next switch empties the file that held "one" and "two".
        wal.switch().unwrap();
        wal.append(b"four").unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (mut wal, records) = Wal::open(&stem, 4096).unwrap();
        assert_eq!(records, vec![b"three".to_vec(), b"four".to_vec()]);
        assert!(wal.fits(3000) && !wal.fits(4096));
        wal.reset().unwrap();
        drop(wal);
        let (_, records) = Wal::open(&stem, 4096).unwrap();
        assert!(records.is_empty(), "{records:?}");
        assert_eq!(
            std::fs::metadata(dir.path().join("raft-1.wal"))
                .unwrap()
                .len(),
            4096,
            "never grows"
        );
    }

    #[test]
    fn a_torn_or_flipped_record_ends_the_replay_and_garbage_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stem = dir.path().join("raft");
        let (mut wal, _) = Wal::open(&stem, 4096).unwrap();
        wal.append(b"kept").unwrap();
        wal.append(b"torn record").unwrap();
        wal.sync().unwrap();
        let path = wal.current().path.clone();
        drop(wal);
        let mut bytes = std::fs::read(&path).unwrap();
        let second = (HEADER_BYTES + RECORD_HEADER_BYTES + 4 + RECORD_HEADER_BYTES) as usize;
        bytes[second + 3] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let (mut wal, records) = Wal::open(&stem, 4096).unwrap();
        assert_eq!(records, vec![b"kept".to_vec()]);
        // New records go where the torn one was.
        wal.append(b"next").unwrap();
        wal.sync().unwrap();
        drop(wal);
        assert_eq!(
            Wal::open(&stem, 4096).unwrap().1,
            vec![b"kept".to_vec(), b"next".to_vec()]
        );
        std::fs::write(&path, b"not a log at all").unwrap();
        assert!(matches!(
            Wal::open(&stem, 4096),
            Err(WalError::Damaged { .. })
        ));
    }
}
