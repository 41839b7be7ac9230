//! The raft log, hard state and configuration on sled, as raft-rs's [`Storage`].
//!
//! Owns the `raft_log` tree (index → entry) and the `raft_state` tree (hard state,
//! configuration, the index and term the log was truncated at). It must not touch the
//! state machine's trees; both live in one sled database so one flush makes a whole ready
//! batch durable. Writes are made only by the ready loop; raft reads through the trait.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    /// The newest snapshot file this member holds (what raft sends a member that needs
    /// entries the log no longer has); its data is empty: the file travels beside the
    /// message, in chunks.
    snapshot: Mutex<Option<Snapshot>>,
    /// Raft asked for a snapshot newer than the one held (or none was held).
    snapshot_wanted: AtomicBool,
}

fn truncated_record(index: u64, term: u64) -> Vec<u8> {
    [index.to_be_bytes(), term.to_be_bytes()].concat()
}

/// Resets the log trees in `db` to start after a snapshot at `index`/`term` with `conf`:
/// every entry goes, the hard state's commit and term rise to the snapshot's if lower.
/// Used while installing a snapshot (and finishing an interrupted install before the log
/// is opened).
pub fn reset_to_snapshot(
    db: &sled::Db,
    index: u64,
    term: u64,
    conf: &ConfState,
) -> Result<(), LogError> {
    let log = db.open_tree("raft_log")?;
    let state = db.open_tree("raft_state")?;
    // The truncation point first: entries left behind by a crash below it are ignored
    // and removed on open.
    state.insert(TRUNCATED, truncated_record(index, term))?;
    log.clear()?;
    let conf_bytes = conf
        .write_to_bytes()
        .map_err(|e| corrupt("conf state", e))?;
    state.insert(CONF_STATE, conf_bytes)?;
    let mut hs = match state.get(HARD_STATE)? {
        None => HardState::default(),
        Some(bytes) => HardState::parse_from_bytes(&bytes).map_err(|e| corrupt("hard state", e))?,
    };
    hs.commit = hs.commit.max(index);
    hs.term = hs.term.max(term);
    let hs_bytes = hs.write_to_bytes().map_err(|e| corrupt("hard state", e))?;
    state.insert(HARD_STATE, hs_bytes)?;
    Ok(())
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
        // Entries at or below the truncation point are left over from a compaction that
        // a crash interrupted: they are no longer part of the log.
        let stale: Vec<sled::IVec> = log
            .range(..index_key(truncated_index + 1))
            .keys()
            .collect::<Result<_, _>>()?;
        for key in stale {
            log.remove(key)?;
        }
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
            snapshot: Mutex::new(None),
            snapshot_wanted: AtomicBool::new(false),
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

    /// The first index still in the log.
    pub fn first(&self) -> u64 {
        self.truncated_index.load(Ordering::Relaxed) + 1
    }

    /// Removes entries up to and including `index` (which must be applied, and covered
    /// by a snapshot file so that a member needing them can be sent that instead).
    pub fn compact(&self, index: u64) -> Result<(), LogError> {
        let truncated = self.truncated_index.load(Ordering::Relaxed);
        let index = index.min(self.last_index.load(Ordering::Relaxed));
        if index <= truncated {
            return Ok(());
        }
        let term = self
            .entry(index)?
            .ok_or_else(|| corrupt(format!("entry {index}"), "missing from the log"))?
            .term;
        self.state
            .insert(TRUNCATED, truncated_record(index, term))?;
        self.truncated_index.store(index, Ordering::Relaxed);
        self.truncated_term.store(term, Ordering::Relaxed);
        let mut batch = sled::Batch::default();
        for old in truncated + 1..=index {
            batch.remove(&index_key(old));
        }
        self.log.apply_batch(batch)?;
        Ok(())
    }

    /// Starts the log after an installed snapshot (see [`reset_to_snapshot`]).
    pub fn apply_snapshot(
        &self,
        db: &sled::Db,
        index: u64,
        term: u64,
        conf: &ConfState,
    ) -> Result<(), LogError> {
        reset_to_snapshot(db, index, term, conf)?;
        self.truncated_index.store(index, Ordering::Relaxed);
        self.truncated_term.store(term, Ordering::Relaxed);
        self.last_index.store(index, Ordering::Relaxed);
        Ok(())
    }

    /// Offers the snapshot file at `index` to raft for members that fell behind.
    pub fn set_snapshot(&self, index: u64, term: u64, conf: ConfState) {
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf);
        if let Ok(mut held) = self.snapshot.lock() {
            *held = Some(snapshot);
        }
        self.snapshot_wanted.store(false, Ordering::Relaxed);
    }

    /// Whether raft asked for a snapshot newer than the one offered (and clears it).
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.swap(false, Ordering::Relaxed)
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

/// A ready batch as the write-ahead log records it: `count u32 ‖ (len u32 ‖ entry)* ‖
/// hard state flag u8 ‖ [hard state]` (raft-rs's protobuf encodings).
pub fn encode_batch(
    entries: &[Entry],
    hard_state: Option<&HardState>,
) -> Result<Vec<u8>, LogError> {
    let mut out = Vec::new();
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    let put = |out: &mut Vec<u8>, bytes: Vec<u8>| {
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(&bytes);
    };
    for entry in entries {
        let bytes = entry
            .write_to_bytes()
            .map_err(|e| corrupt(format!("entry {}", entry.index), e))?;
        put(&mut out, bytes);
    }
    match hard_state {
        None => out.push(0),
        Some(hs) => {
            out.push(1);
            put(
                &mut out,
                hs.write_to_bytes().map_err(|e| corrupt("hard state", e))?,
            );
        }
    }
    Ok(out)
}

fn decode_batch(bytes: &[u8]) -> Result<(Vec<Entry>, Option<HardState>), String> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let slice = bytes
            .get(at..at.checked_add(n).ok_or("length overflow")?)
            .ok_or_else(|| format!("cut short at byte {at}"))?;
        at += n;
        Ok(slice)
    };
    let count = u32::from_be_bytes(take(4)?.try_into().map_err(|_| "count")?) as usize;
    let mut entries = Vec::with_capacity(count.min(bytes.len() / 4));
    for _ in 0..count {
        let len = u32::from_be_bytes(take(4)?.try_into().map_err(|_| "length")?) as usize;
        entries.push(Entry::parse_from_bytes(take(len)?).map_err(|e| e.to_string())?);
    }
    let hard_state = match take(1)?[0] {
        0 => None,
        1 => {
            let len = u32::from_be_bytes(take(4)?.try_into().map_err(|_| "length")?) as usize;
            Some(HardState::parse_from_bytes(take(len)?).map_err(|e| e.to_string())?)
        }
        other => return Err(format!("hard state flag {other}")),
    };
    if at != bytes.len() {
        return Err(format!("{} bytes left over", bytes.len() - at));
    }
    Ok((entries, hard_state))
}

impl SledLog {
    /// Replays one write-ahead log record (a ready batch) into the log: its entries past
    /// the truncation point (those before it are in a snapshot) and its hard state.
    pub fn replay(&self, record: &[u8]) -> Result<(), LogError> {
        let (entries, hard_state) =
            decode_batch(record).map_err(|m| corrupt("write-ahead log record", m))?;
        let truncated = self.truncated_index.load(Ordering::Relaxed);
        let kept: Vec<Entry> = entries
            .into_iter()
            .filter(|e| e.index > truncated)
            .collect();
        if let Some(first) = kept.first()
            && first.index > self.last_index.load(Ordering::Relaxed) + 1
        {
            return Err(corrupt(
                "write-ahead log record",
                format!(
                    "entry {} does not follow the log's last entry {}",
                    first.index,
                    self.last_index.load(Ordering::Relaxed)
                ),
            ));
        }
        self.append(&kept)?;
        if let Some(hs) = hard_state {
            self.set_hard_state(&hs)?;
        }
        Ok(())
    }

    /// Keeps the hard state's commit index within what the log holds and at least what
    /// was applied (the commit index need not be durable; raft learns it again).
    pub fn settle_commit(&self, applied: u64) -> Result<(), LogError> {
        let mut hs = self.hard_state()?;
        let last = self.last_index.load(Ordering::Relaxed);
        let commit = hs
            .commit
            .max(applied)
            .min(last.max(self.truncated_index.load(Ordering::Relaxed)));
        if commit != hs.commit {
            hs.commit = commit;
            self.set_hard_state(&hs)?;
        }
        Ok(())
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

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // Only "temporarily unavailable" is an answer raft takes calmly (any other error
        // is fatal to it): the ready loop makes a snapshot and raft asks again.
        let held = self.snapshot.lock().ok().and_then(|s| s.clone());
        match held {
            // A member refuses a snapshot whose configuration does not hold it (one
            // taken before it was added): that needs a newer one.
            Some(s)
                if s.get_metadata().index >= request_index
                    && s.get_metadata().index >= self.truncated_index.load(Ordering::Relaxed)
                    && {
                        let conf = s.get_metadata().get_conf_state();
                        conf.voters.contains(&to) || conf.learners.contains(&to)
                    } =>
            {
                Ok(s)
            }
            _ => {
                self.snapshot_wanted.store(true, Ordering::Relaxed);
                Err(raft::Error::Store(
                    StorageError::SnapshotTemporarilyUnavailable,
                ))
            }
        }
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
    fn compaction_truncates_the_front_and_snapshots_are_offered_only_to_members_they_hold() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).unwrap();
        let log = SledLog::open(&db).unwrap();
        let entries: Vec<Entry> = (1..=10).map(|i| entry(i, 1 + i / 5, b"x")).collect();
        log.append(&entries).unwrap();
        log.compact(6).unwrap();
        assert_eq!((log.first_index().unwrap(), log.term(6).unwrap()), (7, 2));
        assert_eq!(
            log.entries(6, 8, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        );
        // A crash between the truncation point and the removals leaves old entries
        // behind: they are dropped on open, not taken for a hole.
        log.log
            .insert(index_key(3), entries[2].write_to_bytes().unwrap())
            .unwrap();
        drop(log);
        let log = SledLog::open(&db).unwrap();
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (7, 10)
        );
        assert!(log.log.get(index_key(3)).unwrap().is_none());

        // No snapshot held: raft is told to wait, and the loop is asked for one.
        assert_eq!(
            log.snapshot(0, 2),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        );
        assert!(log.take_snapshot_wanted());
        log.set_snapshot(
            8,
            2,
            ConfState {
                voters: vec![1, 2],
                ..Default::default()
            },
        );
        assert_eq!(log.snapshot(0, 2).unwrap().get_metadata().index, 8);
        // Member 3 came after the snapshot: it would refuse it, so a newer one is asked.
        assert!(log.snapshot(0, 3).is_err());
        assert!(log.take_snapshot_wanted());

        // Installing a snapshot empties the log and starts it after the snapshot.
        log.apply_snapshot(
            &db,
            20,
            4,
            &ConfState {
                voters: vec![1, 3],
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (21, 20)
        );
        assert_eq!(log.term(20).unwrap(), 4);
        let state = log.initial_state().unwrap();
        assert_eq!(
            (state.hard_state.commit, state.conf_state.voters),
            (20, vec![1, 3])
        );
        drop(log);
        let log = SledLog::open(&db).unwrap();
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (21, 20)
        );
    }

    #[test]
    fn write_ahead_records_replay_in_order_over_what_sled_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).unwrap();
        let log = SledLog::open(&db).unwrap();
        let hs = |term, commit| HardState {
            term,
            commit,
            ..Default::default()
        };
        // Sled kept entries 1..=3; the log holds batches 4..=6, then a new leader's 5..=6
        // replacing them, and a hard state.
        log.append(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")])
            .unwrap();
        let records = [
            encode_batch(
                &[entry(2, 1, b"b"), entry(3, 1, b"c"), entry(4, 1, b"d")],
                None,
            )
            .unwrap(),
            encode_batch(&[entry(5, 1, b"e"), entry(6, 1, b"f")], Some(&hs(1, 4))).unwrap(),
            encode_batch(&[entry(5, 2, b"E"), entry(6, 2, b"F")], Some(&hs(2, 6))).unwrap(),
        ];
        for r in &records {
            log.replay(r).unwrap();
        }
        let got = log
            .entries(1, 7, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            got.iter()
                .map(|e| (e.term, e.data.to_vec()))
                .collect::<Vec<_>>(),
            [
                (1, b"a".to_vec()),
                (1, b"b".to_vec()),
                (1, b"c".to_vec()),
                (1, b"d".to_vec()),
                (2, b"E".to_vec()),
                (2, b"F".to_vec())
            ]
        );
        assert_eq!(log.hard_state().unwrap(), hs(2, 6));
        // The commit index is kept within the log and at least what was applied.
        log.set_hard_state(&hs(2, 99)).unwrap();
        log.settle_commit(3).unwrap();
        assert_eq!(log.hard_state().unwrap().commit, 6);
        log.set_hard_state(&hs(2, 1)).unwrap();
        log.settle_commit(3).unwrap();
        assert_eq!(log.hard_state().unwrap().commit, 3);
        // Entries a snapshot covers are skipped; a record that leaves a hole, or is not
        // a record, is refused.
        log.compact(4).unwrap();
        log.replay(&records[0]).unwrap();
        assert_eq!(
            (log.first_index().unwrap(), log.last_index().unwrap()),
            (5, 6)
        );
        let hole = encode_batch(&[entry(9, 2, b"x")], None).unwrap();
        assert!(log.replay(&hole).is_err());
        assert!(log.replay(b"\x00\x00\x00\x05garbage").is_err());
        assert!(log.replay(&records[1][..records[1].len() - 1]).is_err());
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
