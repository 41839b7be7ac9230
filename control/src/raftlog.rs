//! The raft log, hard state and configuration on sled, as raft-rs's [`Storage`].
//!
//! Owns the `raft_log` tree (index → entry) and the `raft_state` tree (hard state,
//! configuration, the index and term the log was truncated at). It must not touch the
//! state machine's trees; both live in one sled database so one flush makes a whole ready
//! batch durable. Writes are made only by the ready loop; raft reads through the trait.

use std::sync::atomic::{AtomicU64, Ordering};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

const HARD_STATE: &[u8] = b"hard";
const CONF_STATE: &[u8] = b"conf";
/// `index ‖ term` of the last entry removed from the front of the log (0, 0 at first).
const TRUNCATED: &[u8] = b"truncated";

/// Why the log could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("raft log: {0}")]
    Sled(#[from] sled::Error),
    #[error("raft log record {what} is corrupt: {message}")]
    Corrupt { what: String, message: String },
}

impl From<LogError> for raft::Error {
    fn from(e: LogError) -> Self {
        raft::Error::Store(StorageError::Other(Box::new(e)))
    }
}

/// The raft log on sled.
pub struct SledLog {
    log: sled::Tree,
    state: sled::Tree,
    /// Cached ends of the log (the trees are only written through `self`).
    last_index: AtomicU64,
    truncated_index: AtomicU64,
    truncated_term: AtomicU64,
}

fn corrupt(what: impl Into<String>, message: impl std::fmt::Display) -> LogError {
    LogError::Corrupt {
        what: what.into(),
        message: message.to_string(),
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl SledLog {
    /// Opens the log in `db`, checking that every entry parses and the indexes are
    /// contiguous: a damaged log is refused, never half read.
    pub fn open(db: &sled::Db) -> Result<Self, LogError> {
        let log = db.open_tree("raft_log")?;
        let state = db.open_tree("raft_state")?;
        let (truncated_index, truncated_term) = match state.get(TRUNCATED)? {
            None => (0, 0),
            Some(bytes) => {
                let b: [u8; 16] = bytes
                    .as_ref()
                    .try_into()
                    .map_err(|_| corrupt("truncated", "not 16 bytes"))?;
                let (i, t) = b.split_at(8);
                (
                    u64::from_be_bytes(i.try_into().map_err(|_| corrupt("truncated", "index"))?),
                    u64::from_be_bytes(t.try_into().map_err(|_| corrupt("truncated", "term"))?),
                )
            }
        };
        let mut expected = truncated_index + 1;
        for item in log.iter() {
            let (key, bytes) = item?;
            let index = u64::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|_| corrupt("entry key", "not 8 bytes"))?,
            );
            let entry = Entry::parse_from_bytes(&bytes)
                .map_err(|e| corrupt(format!("entry {index}"), e))?;
            if index != expected || entry.index != index {
                return Err(corrupt(
                    format!("entry {index}"),
                    format!(
                        "expected index {expected}, found key {index} holding entry {}",
                        entry.index
                    ),
                ));
            }
            expected += 1;
        }
        let this = Self {
            log,
            state,
            last_index: AtomicU64::new(expected - 1),
            truncated_index: AtomicU64::new(truncated_index),
            truncated_term: AtomicU64::new(truncated_term),
        };
        this.hard_state()?;
        this.conf_state()?;
        Ok(this)
    }

    pub fn hard_state(&self) -> Result<HardState, LogError> {
        match self.state.get(HARD_STATE)? {
            None => Ok(HardState::default()),
            Some(bytes) => {
                HardState::parse_from_bytes(&bytes).map_err(|e| corrupt("hard state", e))
            }
        }
    }

    pub fn conf_state(&self) -> Result<ConfState, LogError> {
        match self.state.get(CONF_STATE)? {
            None => Ok(ConfState::default()),
            Some(bytes) => {
                ConfState::parse_from_bytes(&bytes).map_err(|e| corrupt("conf state", e))
            }
        }
    }

    /// Whether the log holds no entry at all (nothing appended, nothing truncated).
    pub fn is_empty(&self) -> bool {
        self.last_index.load(Ordering::Relaxed) == 0
            && self.truncated_index.load(Ordering::Relaxed) == 0
    }

    /// Whether this log has a configuration (a member of some cluster).
    pub fn is_initialized(&self) -> Result<bool, LogError> {
        Ok(!self.conf_state()?.voters.is_empty())
    }

    pub fn set_hard_state(&self, hard_state: &HardState) -> Result<(), LogError> {
        let bytes = hard_state
            .write_to_bytes()
            .map_err(|e| corrupt("hard state", e))?;
        self.state.insert(HARD_STATE, bytes)?;
        Ok(())
    }

    pub fn set_conf_state(&self, conf_state: &ConfState) -> Result<(), LogError> {
        let bytes = conf_state
            .write_to_bytes()
            .map_err(|e| corrupt("conf state", e))?;
        self.state.insert(CONF_STATE, bytes)?;
        Ok(())
    }

    /// Appends `entries`, first removing any entries at or after the first new index (a
    /// new leader's log wins over what this member had not committed).
    pub fn append(&self, entries: &[Entry]) -> Result<(), LogError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let last = self.last_index.load(Ordering::Relaxed);
        let mut batch = sled::Batch::default();
        for stale in first.index..=last {
            batch.remove(&index_key(stale));
        }
        for entry in entries {
            let bytes = entry
                .write_to_bytes()
                .map_err(|e| corrupt(format!("entry {}", entry.index), e))?;
            batch.insert(&index_key(entry.index), bytes);
        }
        self.log.apply_batch(batch)?;
        if let Some(end) = entries.last() {
            self.last_index.store(end.index, Ordering::Relaxed);
        }
        Ok(())
    }

    fn entry(&self, index: u64) -> Result<Option<Entry>, LogError> {
        self.log
            .get(index_key(index))?
            .map(|bytes| {
                Entry::parse_from_bytes(&bytes).map_err(|e| corrupt(format!("entry {index}"), e))
            })
            .transpose()
    }
}

impl Storage for SledLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state()?,
            conf_state: self.conf_state()?,
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.truncated_index.load(Ordering::Relaxed) {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index.load(Ordering::Relaxed) + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut entries = Vec::with_capacity((high - low) as usize);
        for item in self.log.range(index_key(low)..index_key(high)) {
            let (_, bytes) = item.map_err(LogError::from)?;
            let entry = Entry::parse_from_bytes(&bytes).map_err(|e| corrupt("entry", e))?;
            entries.push(entry);
        }
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let truncated = self.truncated_index.load(Ordering::Relaxed);
        if index == truncated {
            return Ok(self.truncated_term.load(Ordering::Relaxed));
        }
        if index < truncated {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.entry(index)? {
            Some(entry) => Ok(entry.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.truncated_index.load(Ordering::Relaxed) + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index.load(Ordering::Relaxed))
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // Snapshots to members that fell behind come with multi-voter clusters (issue 5,
        // next part); until then no member ever needs one.
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    #[test]
    fn appends_truncate_conflicts_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).unwrap();
        let log = SledLog::open(&db).unwrap();
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (1, 0)
        );
        log.append(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")])
            .unwrap();
        // A new leader rewrites from index 2.
        log.append(&[entry(2, 2, b"B")]).unwrap();
        assert_eq!(log.last_index().unwrap(), 2);
        assert_eq!(log.term(2).unwrap(), 2);
        assert!(log.term(3).is_err());
        let hs = HardState {
            term: 2,
            commit: 2,
            ..Default::default()
        };
        log.set_hard_state(&hs).unwrap();
        let cs = ConfState {
            voters: vec![1],
            ..Default::default()
        };
        log.set_conf_state(&cs).unwrap();
        db.flush().unwrap();
        drop(log);
        let log = SledLog::open(&db).unwrap();
        let got = log
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            got.iter().map(|e| e.data.to_vec()).collect::<Vec<_>>(),
            [b"a".to_vec(), b"B".to_vec()]
        );
        let state = log.initial_state().unwrap();
        assert_eq!((state.hard_state.term, state.hard_state.commit), (2, 2));
        assert_eq!(state.conf_state.voters, vec![1]);
        assert!(
            log.entries(1, 4, None, GetEntriesContext::empty(false))
                .is_err()
        );
    }

    #[test]
    fn a_damaged_log_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).unwrap();
        let log = SledLog::open(&db).unwrap();
        log.append(&[entry(1, 1, b"a"), entry(2, 1, b"b")]).unwrap();
        // A hole in the log, then garbage bytes.
        log.log.remove(index_key(1)).unwrap();
        assert!(SledLog::open(&db).is_err());
        log.log.insert(index_key(1), &b"\xff\xff\xff"[..]).unwrap();
        assert!(SledLog::open(&db).is_err());
        log.state.insert(HARD_STATE, &b"\xff\xff"[..]).unwrap();
        log.log.remove(index_key(1)).unwrap();
        log.log.remove(index_key(2)).unwrap();
        assert!(SledLog::open(&db).is_err());
    }
}
