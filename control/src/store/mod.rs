//! The control plane's state machine: the key-value data an API server needs, kept in
//! sled, applied from raft log entries.
//!
//! Owns: keys with their create and mod revisions, transactions of compare-and-set
//! operations applied all or nothing, ranges by prefix with pages, the history that
//! watches read from a revision, and compaction of that history. It must not touch raft:
//! the ready loop hands it committed entries (`apply(index, command)`), and the store's
//! revision is the raft index of the last applied write.
//!
//! Each apply is one sled batch holding the new values, the history events and the
//! applied index, so a crash leaves either all of an entry or none of it, and an entry
//! applied again after a restart (raft replays what was not yet known applied) changes
//! nothing. Durability is the caller's: flush (`Store::flush`) before acknowledging.
//! Every call blocks; async callers use `spawn_blocking`.

mod codec;
pub mod snapshot;

use std::path::{Path, PathBuf};

pub use codec::{
    COMMAND_VERSION, COMPACTION_TAG, CodecError, CommandError, EntryCommand, decode_command,
    decode_entry, encode_command, encode_compaction,
};

/// A stored value and its revisions, as etcd keeps them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    pub data: Vec<u8>,
    /// The revision that created the key (since its last delete).
    pub create_revision: u64,
    /// The revision of the last write to the key.
    pub mod_revision: u64,
    /// Writes since the key was created (1 for a new key).
    pub version: u64,
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Fails with [`Refusal::AlreadyExists`] when the key is present.
    Create { key: Vec<u8>, data: Vec<u8> },
    /// Fails with [`Refusal::NotFound`] when the key is absent, and with
    /// [`Refusal::Conflict`] when `expect_mod` is set and differs from the key's.
    Update {
        key: Vec<u8>,
        data: Vec<u8>,
        expect_mod: Option<u64>,
    },
    /// As `Update`, for removal.
    Delete {
        key: Vec<u8>,
        expect_mod: Option<u64>,
    },
}

impl Op {
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Create { key, .. } | Op::Update { key, .. } | Op::Delete { key, .. } => key,
        }
    }
}

/// A committed command: operations applied all or nothing, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub ops: Vec<Op>,
}

/// Why a transaction was not applied (the same on every replica: it depends only on
/// the state the entry was applied to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    AlreadyExists {
        op: usize,
    },
    NotFound {
        op: usize,
    },
    Conflict {
        op: usize,
        actual_mod: u64,
    },
    /// A transaction that names one key twice, or has no operations.
    Invalid {
        reason: String,
    },
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Every operation took effect at `revision` (the entry's index).
    Done { revision: u64 },
    /// Nothing took effect; the store's revision is unchanged.
    Refused(Refusal),
    /// The entry was applied before (a replay after a restart): nothing changed.
    AlreadyApplied,
}

/// A change, as a watch delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub revision: u64,
    pub key: Vec<u8>,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Put(Value),
    /// The key's last value before the delete.
    Delete(Value),
}

/// One page of a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<(Vec<u8>, Value)>,
    /// The store's revision when the page was read.
    pub revision: u64,
    /// Set when more keys follow: pass it back to read the next page.
    pub continue_token: Option<String>,
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    #[error("store file {path}: {tree} record {key:?} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        tree: &'static str,
        key: String,
        #[source]
        source: CodecError,
    },
    /// The revision asked for has been compacted away (HTTP 410 Gone).
    #[error("revision {asked} is gone: history starts at {compacted}")]
    Gone { asked: u64, compacted: u64 },
    #[error("invalid continue token")]
    BadContinue,
}

/// How long `open` waits for a directory another holder is releasing before it says the
/// directory is in use.
pub const DIRECTORY_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

const META_APPLIED: &[u8] = b"applied";
const META_REVISION: &[u8] = b"revision";
const META_COMPACTED: &[u8] = b"compacted";
/// `member/` ‖ id (8 bytes, big-endian) → the member's peer address (UTF-8).
const META_MEMBER: &[u8] = b"member/";
/// The index of a snapshot being installed (present only mid-install).
const META_INSTALLING: &[u8] = b"installing";

/// The state machine on sled: `kv` (key → value), `history` (revision ‖ key → event),
/// `meta` (applied index, revision, compaction point).
pub struct Store {
    path: PathBuf,
    db: sled::Db,
    kv: sled::Tree,
    history: sled::Tree,
    meta: sled::Tree,
}

impl Store {
    /// Opens (or creates) the store in `dir`, checking every record's encoding so a
    /// corrupt file is reported with what is wrong and refused, never read as empty.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: dir.to_path_buf(),
            source,
        };
        // sled locks its directory; a replica that is still shutting down (its flusher
        // finishing) holds the lock for a moment, another process holds it for good.
        let deadline = std::time::Instant::now() + DIRECTORY_LOCK_WAIT;
        let db = loop {
            // No background flusher: the write-ahead log makes batches durable, and
            // a checkpoint (`flush`) makes sled's own files durable when the log starts
            // over; a flusher only competes with the log's syncs for the disk.
            match sled::Config::new().path(dir).flush_every_ms(None).open() {
                Ok(db) => break db,
                // sled reports a held lock as an Io error of kind Other with this text.
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(open_err(e)),
            }
        };
        Self::in_db(db, dir)
    }

    /// The store's trees in an open database (shared with the raft log, so one flush
    /// covers both); `dir` names it in errors.
    pub fn in_db(db: sled::Db, dir: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: dir.to_path_buf(),
            source,
        };
        let kv = db.open_tree("kv").map_err(open_err)?;
        let history = db.open_tree("history").map_err(open_err)?;
        let meta = db.open_tree("meta").map_err(open_err)?;
        let store = Self {
            path: dir.to_path_buf(),
            db,
            kv,
            history,
            meta,
        };
        store.verify()?;
        Ok(store)
    }

    fn corrupt(&self, tree: &'static str, key: &[u8], source: CodecError) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            tree,
            key: String::from_utf8_lossy(key).into_owned(),
            source,
        }
    }

    fn verify(&self) -> Result<(), StoreError> {
        for item in self.kv.iter() {
            let (key, bytes) = item?;
            codec::decode_value(&bytes).map_err(|e| self.corrupt("kv", &key, e))?;
        }
        for item in self.history.iter() {
            let (key, bytes) = item?;
            codec::decode_history_key(&key).map_err(|e| self.corrupt("history", &key, e))?;
            codec::decode_event_kind(&bytes).map_err(|e| self.corrupt("history", &key, e))?;
        }
        for name in [META_APPLIED, META_REVISION, META_COMPACTED] {
            self.meta_u64(name)?;
        }
        self.members()?;
        Ok(())
    }

    fn meta_u64(&self, name: &'static [u8]) -> Result<u64, StoreError> {
        match self.meta.get(name)? {
            None => Ok(0),
            Some(bytes) => codec::decode_u64(&bytes).map_err(|e| self.corrupt("meta", name, e)),
        }
    }

    /// The raft index of the last applied entry (write or refusal).
    pub fn applied_index(&self) -> Result<u64, StoreError> {
        self.meta_u64(META_APPLIED)
    }

    /// The raft index of the last applied write.
    pub fn revision(&self) -> Result<u64, StoreError> {
        self.meta_u64(META_REVISION)
    }

    /// The compaction point: history before this revision is gone.
    pub fn compacted(&self) -> Result<u64, StoreError> {
        self.meta_u64(META_COMPACTED)
    }

    /// The database the store lives in.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Makes everything written so far durable, power cuts included: sled's flush
    /// (which on Linux only pushes pages with `sync_file_range`), then an fsync of each
    /// of sled's files and of the directory. A checkpoint: slow, so the ready loop's
    /// batches go to the write-ahead log instead.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        let sync = |path: &Path| -> Result<(), sled::Error> {
            match std::fs::File::open(path).and_then(|f| f.sync_all()) {
                // sled replaces its page-table snapshots (`snap.*`) on its own threads:
                // one listed a moment ago may be gone, superseded by a newer one.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => Ok(other?),
            }
        };
        for entry in std::fs::read_dir(&self.path).map_err(sled::Error::from)? {
            let entry = entry.map_err(sled::Error::from)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name == "db" || name == "conf" || name.starts_with("snap.") {
                sync(&entry.path())?;
            } else if name == "blobs" {
                for blob in std::fs::read_dir(entry.path()).map_err(sled::Error::from)? {
                    sync(&blob.map_err(sled::Error::from)?.path())?;
                }
                sync(&entry.path())?;
            }
        }
        Ok(sync(&self.path)?)
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Value>, StoreError> {
        self.kv
            .get(key)?
            .map(|bytes| codec::decode_value(&bytes).map_err(|e| self.corrupt("kv", key, e)))
            .transpose()
    }

    /// Applies the committed entry `index`. Deterministic: the outcome depends only on
    /// the store's state and the command. One applier at a time (the raft ready loop):
    /// the checks read the state the writes then change.
    pub fn apply(&self, index: u64, command: &Command) -> Result<Applied, StoreError> {
        let mut outcomes = self.apply_many(&[(index, command)])?;
        Ok(outcomes.pop().unwrap_or(Applied::AlreadyApplied))
    }

    /// Applies consecutive committed entries in order, as one sled transaction: all of
    /// them or none survive a crash, and sled's per-transaction cost (it seals and
    /// writes its buffer around each one) is paid once per batch, not per write. Each
    /// entry sees the writes of those before it.
    pub fn apply_many(&self, entries: &[(u64, &Command)]) -> Result<Vec<Applied>, StoreError> {
        use sled::Transactional as _;
        use sled::transaction::ConflictableTransactionError as Abort;
        let applied_before = self.applied_index()?;
        let result = (&self.kv, &self.history, &self.meta).transaction(|(kv, history, meta)| {
            let mut outcomes = Vec::with_capacity(entries.len());
            let mut last_applied = None;
            let mut revision = None;
            for &(index, command) in entries {
                if index <= applied_before || last_applied.is_some_and(|l| index <= l) {
                    outcomes.push(Applied::AlreadyApplied);
                    continue;
                }
                last_applied = Some(index);
                let get = |key: &[u8]| -> Result<Option<Value>, StoreError> {
                    kv.get(key)
                        .map_err(|e| match e {
                            sled::transaction::UnabortableTransactionError::Storage(e) => {
                                StoreError::Sled(e)
                            }
                            sled::transaction::UnabortableTransactionError::Conflict => {
                                StoreError::Sled(sled::Error::Unsupported("conflict".into()))
                            }
                        })?
                        .map(|bytes| {
                            codec::decode_value(&bytes).map_err(|e| self.corrupt("kv", key, e))
                        })
                        .transpose()
                };
                match Self::plan(index, command, get).map_err(Abort::Abort)? {
                    Err(refusal) => outcomes.push(Applied::Refused(refusal)),
                    Ok(writes) => {
                        for (key, change) in writes {
                            let history_key = codec::history_key(index, &key);
                            match &change {
                                EventKind::Put(value) => {
                                    kv.insert(key.clone(), codec::encode_value(value))?;
                                }
                                EventKind::Delete(_) => {
                                    kv.remove(key.clone())?;
                                }
                            }
                            history.insert(history_key, codec::encode_event_kind(&change))?;
                        }
                        revision = Some(index);
                        outcomes.push(Applied::Done { revision: index });
                    }
                }
            }
            if let Some(index) = last_applied {
                meta.insert(META_APPLIED, codec::encode_u64(index).to_vec())?;
            }
            if let Some(revision) = revision {
                meta.insert(META_REVISION, codec::encode_u64(revision).to_vec())?;
            }
            Ok::<_, Abort<StoreError>>(outcomes)
        });
        result.map_err(|e| match e {
            sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
            sled::transaction::TransactionError::Abort(e) => e,
        })
    }

    /// What `command` would write at `index`, or why it is refused.
    #[allow(clippy::type_complexity)]
    fn plan(
        index: u64,
        command: &Command,
        get: impl Fn(&[u8]) -> Result<Option<Value>, StoreError>,
    ) -> Result<Result<Vec<(Vec<u8>, EventKind)>, Refusal>, StoreError> {
        if command.ops.is_empty() {
            return Ok(Err(Refusal::Invalid {
                reason: "a transaction needs at least one operation".into(),
            }));
        }
        let mut keys = std::collections::HashSet::new();
        if let Some(dup) = command.ops.iter().find(|op| !keys.insert(op.key())) {
            return Ok(Err(Refusal::Invalid {
                reason: format!(
                    "key {:?} appears twice in one transaction",
                    String::from_utf8_lossy(dup.key())
                ),
            }));
        }
        let mut writes = Vec::with_capacity(command.ops.len());
        for (i, op) in command.ops.iter().enumerate() {
            let current = get(op.key())?;
            let check = |expect: &Option<u64>, current: &Value| match expect {
                Some(expected) if *expected != current.mod_revision => Some(Refusal::Conflict {
                    op: i,
                    actual_mod: current.mod_revision,
                }),
                _ => None,
            };
            match (op, current) {
                (Op::Create { .. }, Some(_)) => return Ok(Err(Refusal::AlreadyExists { op: i })),
                (Op::Create { key, data }, None) => writes.push((
                    key.clone(),
                    EventKind::Put(Value {
                        data: data.clone(),
                        create_revision: index,
                        mod_revision: index,
                        version: 1,
                    }),
                )),
                (Op::Update { .. } | Op::Delete { .. }, None) => {
                    return Ok(Err(Refusal::NotFound { op: i }));
                }
                (
                    Op::Update {
                        key,
                        data,
                        expect_mod,
                    },
                    Some(current),
                ) => {
                    if let Some(refusal) = check(expect_mod, &current) {
                        return Ok(Err(refusal));
                    }
                    writes.push((
                        key.clone(),
                        EventKind::Put(Value {
                            data: data.clone(),
                            create_revision: current.create_revision,
                            mod_revision: index,
                            version: current.version + 1,
                        }),
                    ));
                }
                (Op::Delete { key, expect_mod }, Some(current)) => {
                    if let Some(refusal) = check(expect_mod, &current) {
                        return Ok(Err(refusal));
                    }
                    writes.push((key.clone(), EventKind::Delete(current)));
                }
            }
        }
        Ok(Ok(writes))
    }

    /// Keys under `prefix` in key order, at most `limit` (0: no limit), from where
    /// `continue_token` left off. A token older than the compaction point is Gone, as
    /// Kubernetes answers an expired continue.
    pub fn range(
        &self,
        prefix: &[u8],
        limit: usize,
        continue_token: Option<&str>,
    ) -> Result<Page, StoreError> {
        let revision = self.revision()?;
        let start = match continue_token {
            None => prefix.to_vec(),
            Some(token) => {
                let (token_revision, after) =
                    codec::decode_continue(token).ok_or(StoreError::BadContinue)?;
                if !after.starts_with(prefix) {
                    return Err(StoreError::BadContinue);
                }
                let compacted = self.compacted()?;
                if token_revision < compacted {
                    return Err(StoreError::Gone {
                        asked: token_revision,
                        compacted,
                    });
                }
                // Strictly after the last key returned.
                let mut next = after;
                next.push(0);
                next
            }
        };
        let mut items = Vec::new();
        let mut more = false;
        for item in self.kv.range(start..) {
            let (key, bytes) = item?;
            if !key.starts_with(prefix) {
                break;
            }
            if limit > 0 && items.len() == limit {
                more = true;
                break;
            }
            let value = codec::decode_value(&bytes).map_err(|e| self.corrupt("kv", &key, e))?;
            items.push((key.to_vec(), value));
        }
        let continue_token = more
            .then(|| {
                items
                    .last()
                    .map(|(k, _)| codec::encode_continue(revision, k))
            })
            .flatten();
        Ok(Page {
            items,
            revision,
            continue_token,
        })
    }

    /// A continue token that resumes a range after `last_key`, as read at `revision`
    /// (for callers that cut a page shorter than the store did).
    pub fn continue_after(revision: u64, last_key: &[u8]) -> String {
        codec::encode_continue(revision, last_key)
    }

    /// Every change under `prefix` after revision `after`, in order (at most `limit`,
    /// 0: all). Gone when some of those changes have been compacted away.
    pub fn events_after(
        &self,
        prefix: &[u8],
        after: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        // Events before the compaction point are gone; a watch after `after` needs
        // every event from `after + 1`.
        let compacted = self.compacted()?;
        if after.saturating_add(1) < compacted {
            return Err(StoreError::Gone {
                asked: after,
                compacted,
            });
        }
        let mut events = Vec::new();
        let start = codec::history_key(after.saturating_add(1), b"");
        for item in self.history.range(start..) {
            let (key, bytes) = item?;
            let (revision, event_key) =
                codec::decode_history_key(&key).map_err(|e| self.corrupt("history", &key, e))?;
            if !event_key.starts_with(prefix) {
                continue;
            }
            let kind =
                codec::decode_event_kind(&bytes).map_err(|e| self.corrupt("history", &key, e))?;
            events.push(Event {
                revision,
                key: event_key.to_vec(),
                kind,
            });
            if limit > 0 && events.len() == limit {
                break;
            }
        }
        Ok(events)
    }

    /// Applies the committed membership change `index`: member `id` now dials at `addr`,
    /// or (`None`) is gone. Returns false when the entry was applied before.
    pub fn apply_membership(
        &self,
        index: u64,
        id: u64,
        addr: Option<&str>,
    ) -> Result<bool, StoreError> {
        if index <= self.applied_index()? {
            return Ok(false);
        }
        let mut batch = sled::Batch::default();
        let key = [META_MEMBER, &id.to_be_bytes()[..]].concat();
        match addr {
            Some(addr) => batch.insert(key, addr.as_bytes()),
            None => batch.remove(key),
        }
        batch.insert(META_APPLIED, codec::encode_u64(index).to_vec());
        self.meta.apply_batch(batch)?;
        Ok(true)
    }

    /// Marks entry `index` applied when it changes nothing here (a leader's empty
    /// entry, a promotion), so that a restart does not apply it twice.
    pub fn mark_applied(&self, index: u64) -> Result<(), StoreError> {
        if index > self.applied_index()? {
            self.meta
                .insert(META_APPLIED, codec::encode_u64(index).to_vec())?;
        }
        Ok(())
    }

    /// The members and their peer addresses, as applied.
    pub fn members(&self) -> Result<Vec<(u64, String)>, StoreError> {
        let mut out = Vec::new();
        for item in self.meta.scan_prefix(META_MEMBER) {
            let (key, addr) = item?;
            let id = <[u8; 8]>::try_from(&key[META_MEMBER.len()..])
                .map_err(|_| self.corrupt("meta", &key, CodecError::Length))?;
            let addr = std::str::from_utf8(&addr)
                .map_err(|_| self.corrupt("meta", &key, CodecError::Utf8))?;
            out.push((u64::from_be_bytes(id), addr.to_owned()));
        }
        Ok(out)
    }

    /// Applies the committed compaction entry `index` (see [`compact`](Self::compact));
    /// false when it was applied before.
    pub fn apply_compaction(&self, index: u64, revision: u64) -> Result<bool, StoreError> {
        if index <= self.applied_index()? {
            return Ok(false);
        }
        // A replay after a crash between the two compacts again: nothing changes.
        self.compact(revision)?;
        self.mark_applied(index)?;
        Ok(true)
    }

    /// Drops history before `revision` (never past the store's revision). Watches from
    /// earlier revisions are Gone afterwards.
    pub fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let revision = revision.min(self.revision()?);
        if revision <= self.compacted()? {
            return Ok(());
        }
        let end = codec::history_key(revision, b"");
        let mut batch = sled::Batch::default();
        for item in self.history.range(..end) {
            let (key, _) = item?;
            batch.remove(key);
        }
        // The compaction point first: a crash in between leaves history that is only
        // unreachable, never a watch that silently skips events.
        self.meta
            .insert(META_COMPACTED, codec::encode_u64(revision).to_vec())?;
        self.history.apply_batch(batch)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
