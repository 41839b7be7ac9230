//! A replica of the store: raft-rs's `RawNode` over [`SledLog`], driving [`Store`], in a
//! ready loop on its own thread (sled and raft are blocking; the async side only sends
//! requests and awaits answers).
//!
//! Owns the ready loop: proposals are batched (everything waiting when the loop wakes,
//! up to `max_batch`), each ready's entries and hard state are written and flushed once,
//! and only then are persisted messages sent and committed entries applied and their
//! proposers answered, so an acknowledged write is on disk. Linearizable reads go through
//! ReadIndex, many reads sharing one round. Membership changes are raft configuration
//! changes whose context carries the member's peer address; the leader promotes a learner
//! to voter once it has caught up. Messages to other members go through a
//! [`Transport`](crate::peers::transport::Transport); the replica never waits on the network.
//!
//! Snapshots: every `snapshot_entries` applied entries (or when raft needs one for a
//! member whose entries the log no longer has) the loop writes the whole state machine to
//! a snapshot file and truncates the log, keeping `catch_up_entries` behind for members
//! that are only a little behind. The transport streams the file in chunks; a received
//! snapshot is checked whole before raft sees it, and installed crash-safely (an
//! interrupted install is finished on the next start).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::RawNode;
use raft::prelude::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message};

use crate::consensus::log::{LogError, SledLog};
use crate::consensus::wal::{Wal, WalError};
use crate::peers::transport::Transport;
use crate::settings::ReplicaSettings;
use crate::store::snapshot::{self, SnapshotError, SnapshotHeader};
use crate::store::{Applied, Command, Store, StoreError};

use super::ready_loop::ReadyLoop;

/// How a replica's data directory starts.
#[derive(Debug, Clone)]
pub enum Bootstrap {
    /// A new cluster: this member is its sole voter, dialled at `peer_addr`.
    Init { peer_addr: String },
    /// A member admitted by a running cluster: it may hold nothing yet, and learns
    /// everything, membership included, from the leader's log (also on its restarts).
    Join,
    /// The directory already holds this member's state.
    Existing,
}

/// Why a replica failed or a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("the replica at {0} has stopped")]
    Stopped(PathBuf),
    #[error("committed entry {index} cannot be applied: {message}")]
    BadEntry { index: u64, message: String },
    #[error(
        "no answer within {0:?} (no leader, or the leader unreachable): a write may or may not have been applied"
    )]
    Timeout(Duration),
    #[error("raft dropped the request: {0}")]
    Dropped(String),
    #[error(
        "the leader changed while the request was in flight: a write may or may not have been applied; try again"
    )]
    LeaderChanged,
    #[error("{0} holds no member state, and no bootstrap was asked for")]
    NotInitialized(PathBuf),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Wal(#[from] WalError),
}

pub(super) type Answer<T> = tokio::sync::oneshot::Sender<Result<T, ReplicaError>>;

pub(super) enum Request {
    Propose(Command, Answer<Applied>),
    ConfChange(ConfChange, Answer<ConfState>),
    Read(Answer<()>),
    Step(Box<Message>),
    /// The transport finished sending a snapshot to a member (true) or gave up (false).
    SnapshotSent(u64, bool),
    /// The snapshot file the loop handed off has been written (or failed).
    SnapshotWritten(Box<WrittenSnapshot>),
    Stop,
}

/// Counters of a replica's ready loop (for `/metrics`).
#[derive(Debug, Default)]
pub struct ReplicaMetrics {
    pub proposals: AtomicU64,
    /// Ready batches written (each one flush).
    pub flushes: AtomicU64,
    /// Total time spent flushing, in microseconds.
    pub flush_micros: AtomicU64,
    /// The last applied raft index.
    pub applied_index: AtomicU64,
    /// The commit index this member knows.
    pub commit_index: AtomicU64,
    /// The last index in this member's log.
    pub last_index: AtomicU64,
    pub leader_changes: AtomicU64,
    /// 1 while this member leads.
    pub is_leader: AtomicU64,
    /// The member this one believes leads (0: none).
    pub leader_id: AtomicU64,
    pub term: AtomicU64,
    /// Requests answered "unknown outcome" for want of an answer in time.
    pub timeouts: AtomicU64,
    /// ReadIndex rounds asked of raft.
    pub read_rounds: AtomicU64,
    /// Voters and learners in the applied configuration.
    pub voters: AtomicU64,
    pub learners: AtomicU64,
    /// The first index still in the log (entries before it are in a snapshot).
    pub first_index: AtomicU64,
    pub snapshots_made: AtomicU64,
    pub snapshots_installed: AtomicU64,
    pub snapshots_sent: AtomicU64,
    pub snapshots_send_failures: AtomicU64,
    /// History compactions applied here.
    pub compactions: AtomicU64,
    /// Checkpoints (sled made durable, the write-ahead log started over).
    pub checkpoints: AtomicU64,
    /// Writes proposed here, from arrival to applied and answered.
    pub commit_latency: LatencyHistogram,
}

/// A Prometheus histogram of durations, lock-free.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Counts per bucket of [`LATENCY_BUCKETS`] (not cumulative; the last is +Inf).
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

/// The histogram's upper bounds, in seconds (this machine's flush takes milliseconds).
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

impl LatencyHistogram {
    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cumulative counts per upper bound (`None`: +Inf), the sum in seconds, the count.
    pub fn snapshot(&self) -> (Vec<(Option<f64>, u64)>, f64, u64) {
        let mut total = 0;
        let mut rows = Vec::with_capacity(self.counts.len());
        for (i, count) in self.counts.iter().enumerate() {
            total += count.load(Ordering::Relaxed);
            rows.push((LATENCY_BUCKETS.get(i).copied(), total));
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (rows, sum, total)
    }
}

/// The most command bytes in one proposal message (a follower forwards it whole to the
/// leader, so it must fit well inside a transport frame).
pub(super) const PROPOSAL_MESSAGE_BYTES: usize = 1 << 20;

/// A snapshot file written off the ready loop.
pub(super) struct WrittenSnapshot {
    pub(super) index: u64,
    pub(super) term: u64,
    pub(super) conf: ConfState,
    pub(super) bytes: u64,
    pub(super) started: Instant,
    pub(super) result: Result<PathBuf, SnapshotError>,
}

/// Where a member keeps its snapshot files, under its data directory.
pub const SNAPSHOT_DIR: &str = "snapshots";

/// The stem of a member's write-ahead log files (`raft-0.wal`, `raft-1.wal`) under its
/// data directory.
pub const WAL_STEM: &str = "raft";

/// Finishes an install a crash interrupted: the store still holds the marker, the file
/// is still there (it is removed only after a newer snapshot is in place). True when
/// there was one.
pub(super) fn finish_interrupted_install(store: &Store, dir: &Path) -> Result<bool, ReplicaError> {
    let Some(index) = store.installing()? else {
        return Ok(false);
    };
    let path = dir.join(SNAPSHOT_DIR).join(snapshot::file_name(index));
    tracing::warn!(index, path = %path.display(), "finishing a snapshot install a crash interrupted");
    let header = store.install(&path)?;
    let conf = conf_of(&header, &path)?;
    crate::consensus::log::reset_to_snapshot(store.db(), header.index, header.term, &conf)?;
    store.finish_install()?;
    Ok(true)
}

pub(super) fn conf_of(header: &SnapshotHeader, path: &Path) -> Result<ConfState, ReplicaError> {
    ConfState::parse_from_bytes(&header.conf).map_err(|e| {
        ReplicaError::Snapshot(SnapshotError::Damaged {
            path: path.to_path_buf(),
            message: format!("configuration: {e}"),
        })
    })
}

/// Removes leftovers of interrupted writes and receipts in the snapshot directory, and
/// snapshot files older than `keep`.
pub(super) fn prune_snapshots(dir: &Path, keep: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stale = match snapshot::index_of(&name) {
            Some(index) => index < keep,
            None => name.ends_with(".tmp") || name.ends_with(".part"),
        };
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A running replica.
pub struct Replica {
    id: u64,
    path: PathBuf,
    requests: mpsc::Sender<Request>,
    thread: Option<std::thread::JoinHandle<Result<(), ReplicaError>>>,
    store: Arc<Store>,
    revision: tokio::sync::watch::Receiver<u64>,
    conf: tokio::sync::watch::Receiver<ConfState>,
    pub metrics: Arc<ReplicaMetrics>,
}

/// The snapshot file with the highest index in `dir`, with its header.
pub(super) fn newest_snapshot(dir: &Path) -> Option<(u64, SnapshotHeader, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            Some((
                snapshot::index_of(&e.file_name().to_string_lossy())?,
                e.path(),
            ))
        })
        .collect();
    found.sort();
    let (index, path) = found.pop()?;
    let header = snapshot::read_header(&path).ok()?;
    (header.index == index).then_some((index, header, path))
}

pub(super) fn bootstrap_entry(id: u64, peer_addr: &str) -> Result<Entry, ReplicaError> {
    let mut change = ConfChange::default();
    change.set_change_type(ConfChangeType::AddNode);
    change.node_id = id;
    change.context = peer_addr.as_bytes().to_vec().into();
    let mut entry = Entry::default();
    entry.set_entry_type(EntryType::EntryConfChange);
    entry.index = 1;
    entry.term = 1;
    entry.data = change
        .write_to_bytes()
        .map_err(|e| ReplicaError::Dropped(e.to_string()))?
        .into();
    Ok(entry)
}

impl Replica {
    /// Opens the replica's data in `dir` and starts its loop.
    pub fn start(
        dir: &Path,
        settings: ReplicaSettings,
        bootstrap: Bootstrap,
        transport: Option<Arc<Transport>>,
    ) -> Result<Self, ReplicaError> {
        let store = Arc::new(Store::open(dir)?);
        let installed = finish_interrupted_install(&store, dir)?;
        let log = SledLog::open(store.db())?;
        // What sled had not made durable is in the write-ahead log: replay it in order.
        // After an interrupted install the log is obsolete (raft drops a log it replaces
        // by a snapshot), so it starts over instead.
        let (mut wal, records) = Wal::open(&dir.join(WAL_STEM), settings.wal_bytes)?;
        if installed {
            wal.reset()?;
        } else {
            for record in &records {
                log.replay(record)?;
            }
        }
        log.settle_commit(store.applied_index()?)?;
        let snapshot_dir = dir.join(SNAPSHOT_DIR);
        // A snapshot on disk from before the restart is offered again once it is checked
        // (a damaged one is set aside: the loop writes a new one when raft asks).
        let mut last_snapshot = log.first() - 1;
        if let Some((index, header, path)) = newest_snapshot(&snapshot_dir)
            && index >= last_snapshot
        {
            match snapshot::verify(&path).and_then(|h| {
                conf_of(&h, &path).map_err(|e| SnapshotError::Damaged {
                    path: path.clone(),
                    message: e.to_string(),
                })
            }) {
                Ok(conf) => {
                    log.set_snapshot(index, header.term, conf);
                    last_snapshot = index;
                }
                Err(e) => tracing::warn!(error = %e, "not offering a damaged snapshot"),
            }
        }
        prune_snapshots(&snapshot_dir, last_snapshot);
        let fresh = !log.is_initialized()? && log.is_empty();
        match (&bootstrap, fresh) {
            (Bootstrap::Init { peer_addr }, true) => {
                // The first entry makes this member a voter, so that every member that
                // later replays the log from the start learns the same configuration.
                log.append(&[bootstrap_entry(settings.id, peer_addr)?])?;
                log.set_hard_state(&HardState {
                    term: 1,
                    commit: 1,
                    ..Default::default()
                })?;
                log.set_conf_state(&ConfState {
                    voters: vec![settings.id],
                    ..Default::default()
                })?;
                store.flush()?;
            }
            (Bootstrap::Existing, true) => {
                return Err(ReplicaError::NotInitialized(dir.to_path_buf()));
            }
            _ => {}
        }
        let applied = store.applied_index()?;
        let config = raft::Config {
            id: settings.id,
            election_tick: settings.election_ticks,
            heartbeat_tick: settings.heartbeat_ticks,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        config.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut node = RawNode::new(&config, log, &logger)?;
        if let Some(transport) = &transport {
            for (id, addr) in store.members()? {
                transport.set_peer(id, &addr);
            }
        }
        // A sole voter need not wait out an election timeout.
        if node.raft.prs().conf().voters().ids().len() == 1
            && node.raft.prs().conf().voters().contains(settings.id)
        {
            node.campaign()?;
        }
        let (requests, inbox) = mpsc::channel();
        let path = dir.to_path_buf();
        let (revision_tx, revision) = tokio::sync::watch::channel(store.revision()?);
        let (conf_tx, conf) = tokio::sync::watch::channel(node.raft.prs().conf().to_conf_state());
        let metrics = Arc::new(ReplicaMetrics::default());
        metrics
            .first_index
            .store(node.store().first(), Ordering::Relaxed);
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32)
            ^ settings.id.rotate_left(17);
        let mut ready_loop = ReadyLoop {
            node,
            store: store.clone(),
            transport,
            settings: settings.clone(),
            revision: revision_tx,
            conf: conf_tx,
            metrics: metrics.clone(),
            incarnation,
            next_id: 1,
            pending: HashMap::new(),
            waiting: Vec::new(),
            reads_new: Vec::new(),
            reads_asked: HashMap::new(),
            reads_ready: Vec::new(),
            promoting: None,
            was_leader: false,
            last_leader: raft::INVALID_ID,
            snapshot_dir,
            last_snapshot,
            snapshot_writing: false,
            compaction_mark: None,
            wal,
            checkpointing: None,
            inbox_sender: requests.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("raft-{:x}", settings.id))
            .spawn(move || ready_loop.run(inbox))
            .map_err(|e| ReplicaError::Store(StoreError::Sled(sled::Error::Io(e))))?;
        Ok(Self {
            id: settings.id,
            path,
            requests,
            thread: Some(thread),
            store,
            revision,
            conf,
            metrics,
        })
    }

    fn send<T>(
        &self,
        make: impl FnOnce(Answer<T>) -> Request,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<T, ReplicaError>>, ReplicaError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.requests
            .send(make(answer))
            .map_err(|_| ReplicaError::Stopped(self.path.clone()))?;
        Ok(answered)
    }

    async fn ask<T>(&self, make: impl FnOnce(Answer<T>) -> Request) -> Result<T, ReplicaError> {
        self.send(make)?
            .await
            .unwrap_or_else(|_| Err(ReplicaError::Stopped(self.path.clone())))
    }

    /// Proposes `command`; resolves once it is committed, durable and applied here (or
    /// refused by the state machine). On a follower the proposal goes to the leader.
    pub async fn propose(&self, command: Command) -> Result<Applied, ReplicaError> {
        use tracing::Instrument as _;
        let key = command
            .ops
            .first()
            .map(|op| String::from_utf8_lossy(op.key()).into_owned())
            .unwrap_or_default();
        let span = tracing::debug_span!(
            "proposal",
            member = self.id,
            ops = command.ops.len(),
            key,
            revision = tracing::field::Empty
        );
        async move {
            let outcome = self.ask(|a| Request::Propose(command, a)).await;
            match &outcome {
                Ok(Applied::Done { revision }) => {
                    tracing::Span::current().record("revision", revision);
                    tracing::debug!("proposal applied");
                }
                Ok(other) => tracing::debug!(outcome = ?other, "proposal not applied"),
                Err(e) => tracing::debug!(error = %e, "proposal failed"),
            }
            outcome
        }
        .instrument(span)
        .await
    }

    /// Proposes a membership change; resolves with the new configuration once applied.
    pub async fn change_membership(&self, change: ConfChange) -> Result<ConfState, ReplicaError> {
        self.ask(|a| Request::ConfChange(change, a)).await
    }

    /// Waits until this replica has applied everything committed before the call
    /// (ReadIndex): a read from the store afterwards is linearizable. Fails on a member
    /// cut off from a quorum.
    pub async fn read_barrier(&self) -> Result<(), ReplicaError> {
        self.ask(Request::Read).await
    }

    /// Hands a message from another member to raft.
    pub fn step(&self, message: Message) {
        let _ = self.requests.send(Request::Step(Box::new(message)));
    }

    /// Tells raft whether a snapshot reached member `to` (so it resumes sending entries,
    /// or tries again).
    pub fn snapshot_sent(&self, to: u64, ok: bool) {
        let _ = self.requests.send(Request::SnapshotSent(to, ok));
    }

    /// Where this replica keeps its snapshot files (received ones are placed here, named
    /// by [`snapshot::file_name`], before raft is handed their message).
    pub fn snapshot_dir(&self) -> PathBuf {
        self.path.join(SNAPSHOT_DIR)
    }

    /// The replica's store. Reads from it directly are as of the last applied entry
    /// (serializable); call [`read_barrier`](Self::read_barrier) first for linearizable.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The store's revision, updated after every applied batch (watchers wait on it).
    pub fn subscribe_revision(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revision.clone()
    }

    /// The applied configuration (voters and learners).
    pub fn conf_state(&self) -> ConfState {
        self.conf.borrow().clone()
    }

    /// Whether this member leads (and so can commit).
    pub fn is_leader(&self) -> bool {
        self.metrics.is_leader.load(Ordering::Relaxed) == 1
    }

    /// The member this one believes leads, if any.
    pub fn leader(&self) -> Option<u64> {
        match self.metrics.leader_id.load(Ordering::Relaxed) {
            0 => None,
            id => Some(id),
        }
    }

    /// Stops the loop and waits for it; the data stays on disk.
    pub fn stop(mut self) -> Result<(), ReplicaError> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), ReplicaError> {
        let _ = self.requests.send(Request::Stop);
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(ReplicaError::Stopped(self.path.clone()))),
            None => Ok(()),
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// A committed write entry waiting to be applied: its index, command and proposal id.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Op, Refusal};

    fn settings() -> ReplicaSettings {
        ReplicaSettings {
            tick: Duration::from_millis(10),
            ..ReplicaSettings::default()
        }
    }

    fn init() -> Bootstrap {
        Bootstrap::Init {
            peer_addr: "127.0.0.1:1".into(),
        }
    }

    fn create(key: &str, data: &str) -> Command {
        Command {
            ops: vec![Op::Create {
                key: key.into(),
                data: data.into(),
            }],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_proposals_are_all_applied_once_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let replica =
            Arc::new(Replica::start(dir.path(), settings(), init(), None).expect("start"));
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let replica = replica.clone();
                tokio::spawn(
                    async move { replica.propose(create(&format!("/k/{i:03}"), "v")).await },
                )
            })
            .collect();
        let mut revisions = Vec::new();
        for task in tasks {
            match task.await.expect("task").expect("propose") {
                Applied::Done { revision } => revisions.push(revision),
                other => panic!("not applied: {other:?}"),
            }
        }
        revisions.sort_unstable();
        revisions.dedup();
        assert_eq!(revisions.len(), 200, "every write has its own revision");
        let store = replica.store();
        assert_eq!(store.range(b"/k/", 0, None).unwrap().items.len(), 200);
        assert_eq!(store.revision().unwrap(), *revisions.last().unwrap());
        // The state machine's refusals reach the proposer.
        let again = replica
            .propose(create("/k/000", "dup"))
            .await
            .expect("propose");
        assert_eq!(again, Applied::Refused(Refusal::AlreadyExists { op: 0 }));
        // A sole voter serves linearizable reads, and knows itself as a member.
        replica.read_barrier().await.expect("read index");
        assert_eq!(
            replica.store().members().unwrap(),
            vec![(1, "127.0.0.1:1".to_owned())]
        );
        assert_eq!(replica.conf_state().voters, vec![1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_keeps_every_acknowledged_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Replica::start(dir.path(), settings(), init(), None).expect("start");
        let Applied::Done { revision: r1 } = first.propose(create("/a", "1")).await.unwrap() else {
            panic!("not applied")
        };
        first.stop().expect("stop");
        let second =
            Replica::start(dir.path(), settings(), Bootstrap::Existing, None).expect("restart");
        let a = second.store().get(b"/a").unwrap().expect("kept");
        assert_eq!(a.mod_revision, r1);
        let update = Command {
            ops: vec![Op::Update {
                key: b"/a".to_vec(),
                data: b"2".to_vec(),
                expect_mod: Some(r1),
            }],
        };
        let Applied::Done { revision: r2 } = second.propose(update).await.unwrap() else {
            panic!("not applied")
        };
        assert!(
            r2 > r1,
            "revisions only grow across restarts: {r1} then {r2}"
        );
        assert_eq!(second.store().get(b"/a").unwrap().unwrap().version, 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshots_truncate_the_log_and_an_interrupted_install_is_finished() {
        let dir = tempfile::tempdir().expect("tempdir");
        let small = ReplicaSettings {
            snapshot_entries: 50,
            catch_up_entries: 10,
            ..settings()
        };
        let first = Replica::start(dir.path(), small.clone(), init(), None).expect("start");
        for i in 0..120 {
            first
                .propose(create(&format!("/k/{i:03}"), "v"))
                .await
                .unwrap();
        }
        // Snapshot files are written off the loop: wait for the second to land.
        let deadline = Instant::now() + Duration::from_secs(10);
        while first.metrics.snapshots_made.load(Ordering::Relaxed) < 2 {
            assert!(Instant::now() < deadline, "no second snapshot");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let first_index = first.metrics.first_index.load(Ordering::Relaxed);
        assert!(first_index > 1, "the log was never truncated");
        let snapshots: Vec<_> = std::fs::read_dir(first.snapshot_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| snapshot::index_of(name).is_some())
            .collect();
        assert_eq!(
            snapshots.len(),
            1,
            "older snapshots are pruned: {snapshots:?}"
        );
        first.stop().expect("stop");

        // A restart reads the truncated log and keeps everything.
        let again =
            Replica::start(dir.path(), small.clone(), Bootstrap::Existing, None).expect("restart");
        assert_eq!(
            again.store().range(b"/k/", 0, None).unwrap().items.len(),
            120
        );
        again.propose(create("/k/after", "v")).await.unwrap();
        let (at, _, newest) = newest_snapshot(&again.snapshot_dir()).expect("a snapshot");
        // What the snapshot holds: every key written up to its index.
        let expected: Vec<_> = again
            .store()
            .range(b"/k/", 0, None)
            .unwrap()
            .items
            .into_iter()
            .filter(|(_, v)| v.mod_revision <= at)
            .collect();
        assert!(
            expected.len() >= 50,
            "{} keys in the snapshot",
            expected.len()
        );
        again.stop().expect("stop");

        // Another member's directory gets that snapshot installed, and a crash strikes
        // after the state machine was replaced but before the log was reset: the next
        // start finishes the install from the file.
        let other = tempfile::tempdir().expect("tempdir");
        let snap_dir = other.path().join(SNAPSHOT_DIR);
        std::fs::create_dir_all(&snap_dir).unwrap();
        std::fs::copy(&newest, snap_dir.join(newest.file_name().unwrap())).unwrap();
        {
            let store = Store::open(other.path()).expect("open");
            store.apply(1, &create("/stale", "x")).expect("apply");
            store
                .install(&snap_dir.join(newest.file_name().unwrap()))
                .expect("install");
            store.flush().unwrap();
        }
        let resumed =
            Replica::start(other.path(), small, Bootstrap::Existing, None).expect("resume");
        assert!(resumed.store().installing().unwrap().is_none());
        assert!(resumed.store().get(b"/stale").unwrap().is_none());
        assert_eq!(
            resumed.store().range(b"/k/", 0, None).unwrap().items,
            expected
        );
        assert_eq!(resumed.store().applied_index().unwrap(), at);
        assert_eq!(resumed.conf_state().voters, vec![1]);
        resumed
            .propose(create("/k/resumed", "v"))
            .await
            .expect("it commits");
    }

    /// The files of a running member, as a kill -9 leaves them (sled's pages flushed
    /// only at checkpoints), come back with every acknowledged write; a small
    /// write-ahead log fills and is checkpointed many times on the way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_write_ahead_log_brings_back_what_sled_had_not_made_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let small = ReplicaSettings {
            wal_bytes: 16 << 10,
            ..settings()
        };
        let copy = tempfile::tempdir().expect("tempdir");
        let mut acknowledged = Vec::new();
        {
            let replica = Replica::start(dir.path(), small.clone(), init(), None).expect("start");
            for i in 0..400 {
                let key = format!("/w/{i:03}");
                if let Applied::Done { revision } = replica
                    .propose(create(&key, &"v".repeat(100)))
                    .await
                    .unwrap()
                {
                    acknowledged.push((key, revision));
                }
            }
            assert!(replica.metrics.checkpoints.load(Ordering::Relaxed) >= 2);
            // What a kill -9 leaves: the files as they are now, sled's unflushed pages
            // and all (copied while the replica still runs and holds them).
            copy_dir(dir.path(), copy.path());
            std::mem::forget(replica);
        }
        let again = Replica::start(copy.path(), small, Bootstrap::Existing, None).expect("restart");
        // Replayed entries are applied again by the loop: read linearizably.
        again.read_barrier().await.expect("read index");
        for (key, revision) in &acknowledged {
            let value = again.store().get(key.as_bytes()).unwrap();
            assert_eq!(value.map(|v| v.mod_revision), Some(*revision), "{key}");
        }
        again
            .propose(create("/w/after", "v"))
            .await
            .expect("it commits");
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap().flatten() {
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }

    #[test]
    fn an_empty_directory_without_a_bootstrap_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Replica::start(dir.path(), settings(), Bootstrap::Existing, None)
            .err()
            .expect("refused");
        assert!(matches!(err, ReplicaError::NotInitialized(_)), "{err}");
    }
}
