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
//! [`Transport`](crate::transport::Transport); the replica never waits on the network.
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
use raft::prelude::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message};
use raft::{RawNode, StateRole};

use crate::raftlog::{LogError, SledLog};
use crate::store::snapshot::{self, SnapshotError, SnapshotHeader};
use crate::store::{
    Applied, Command, EntryCommand, Store, StoreError, decode_entry, encode_command,
    encode_compaction,
};
use crate::transport::Transport;
use crate::wal::{Wal, WalError};

/// A replica's settings; every interval and limit is named here.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// This member's raft id (not 0).
    pub id: u64,
    /// One raft tick.
    pub tick: Duration,
    /// Ticks without a leader's word before a follower stands for election (the actual
    /// timeout is randomized between this and twice this).
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// The most proposals taken into one ready batch (one flush).
    pub max_batch: usize,
    /// How long a write or read waits for an answer before the caller is told the
    /// outcome is unknown (a write may still be applied later).
    pub request_timeout: Duration,
    /// A learner is promoted once its log is within this many entries of the leader's
    /// commit index.
    pub promote_lag: u64,
    /// Applied entries between two snapshots (each snapshot lets the log be truncated).
    pub snapshot_entries: u64,
    /// Entries kept in the log behind a snapshot, so a member only a little behind
    /// catches up from the log rather than by a whole snapshot.
    pub catch_up_entries: u64,
    /// How often the leader compacts the store's history (zero: never). Each time it
    /// drops what is older than the revision it saw the time before, so watches can
    /// resume from at least one interval back, as the Kubernetes API server compacts
    /// etcd.
    pub compact_interval: Duration,
    /// The write-ahead log's size; when it is full, sled is checkpointed and the log
    /// starts over.
    pub wal_bytes: u64,
}

impl Default for ReplicaSettings {
    fn default() -> Self {
        Self {
            id: 1,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            max_batch: 4096,
            request_timeout: Duration::from_secs(10),
            promote_lag: 64,
            snapshot_entries: 10_000,
            catch_up_entries: 5_000,
            compact_interval: Duration::from_secs(300),
            wal_bytes: 16 << 20,
        }
    }
}

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
    #[error("{0} holds no member state, and no bootstrap was asked for")]
    NotInitialized(PathBuf),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Wal(#[from] WalError),
}

type Answer<T> = tokio::sync::oneshot::Sender<Result<T, ReplicaError>>;

enum Request {
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
const PROPOSAL_MESSAGE_BYTES: usize = 1 << 20;

/// A snapshot file written off the ready loop.
struct WrittenSnapshot {
    index: u64,
    term: u64,
    conf: ConfState,
    bytes: u64,
    started: Instant,
    result: Result<PathBuf, SnapshotError>,
}

/// Where a member keeps its snapshot files, under its data directory.
pub const SNAPSHOT_DIR: &str = "snapshots";

/// The stem of a member's write-ahead log files (`raft-0.wal`, `raft-1.wal`) under its
/// data directory.
pub const WAL_STEM: &str = "raft";

/// Finishes an install a crash interrupted: the store still holds the marker, the file
/// is still there (it is removed only after a newer snapshot is in place). True when
/// there was one.
fn finish_interrupted_install(store: &Store, dir: &Path) -> Result<bool, ReplicaError> {
    let Some(index) = store.installing()? else {
        return Ok(false);
    };
    let path = dir.join(SNAPSHOT_DIR).join(snapshot::file_name(index));
    tracing::warn!(index, path = %path.display(), "finishing a snapshot install a crash interrupted");
    let header = store.install(&path)?;
    let conf = conf_of(&header, &path)?;
    crate::raftlog::reset_to_snapshot(store.db(), header.index, header.term, &conf)?;
    store.finish_install()?;
    Ok(true)
}

fn conf_of(header: &SnapshotHeader, path: &Path) -> Result<ConfState, ReplicaError> {
    ConfState::parse_from_bytes(&header.conf).map_err(|e| {
        ReplicaError::Snapshot(SnapshotError::Damaged {
            path: path.to_path_buf(),
            message: format!("configuration: {e}"),
        })
    })
}

/// Removes leftovers of interrupted writes and receipts in the snapshot directory, and
/// snapshot files older than `keep`.
fn prune_snapshots(dir: &Path, keep: u64) {
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
fn newest_snapshot(dir: &Path) -> Option<(u64, SnapshotHeader, PathBuf)> {
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

fn bootstrap_entry(id: u64, peer_addr: &str) -> Result<Entry, ReplicaError> {
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
type CommittedWrite = (u64, Command, Option<(u64, u64)>);

/// A proposer waiting for its entry.
enum Waiter {
    Write(Answer<Applied>),
    Conf(Answer<ConfState>),
}

impl Waiter {
    fn fail(self, e: ReplicaError) {
        match self {
            Waiter::Write(a) => {
                let _ = a.send(Err(e));
            }
            Waiter::Conf(a) => {
                let _ = a.send(Err(e));
            }
        }
    }
}

/// A proposal not yet handed to raft (no leader known yet).
enum Queued {
    Write(Command, Answer<Applied>),
    Conf(ConfChange, Answer<ConfState>),
}

struct ReadyLoop {
    node: RawNode<SledLog>,
    store: Arc<Store>,
    transport: Option<Arc<Transport>>,
    settings: ReplicaSettings,
    revision: tokio::sync::watch::Sender<u64>,
    conf: tokio::sync::watch::Sender<ConfState>,
    metrics: Arc<ReplicaMetrics>,
    /// Proposal ids are (incarnation, sequence): unique across restarts and members, so
    /// entries committed by an earlier run or another member never answer this run's
    /// proposers.
    incarnation: u64,
    next_id: u64,
    pending: HashMap<(u64, u64), (Waiter, Instant)>,
    waiting: Vec<(Queued, Instant)>,
    /// Reads that arrived since the last ReadIndex round.
    reads_new: Vec<(Answer<()>, Instant)>,
    /// ReadIndex rounds asked of raft, by context, with their readers.
    reads_asked: HashMap<Vec<u8>, Vec<(Answer<()>, Instant)>>,
    /// Readers whose read index is known, waiting for it to be applied.
    reads_ready: Vec<(u64, Answer<()>)>,
    /// The learner being promoted and when that was proposed.
    promoting: Option<(u64, Instant)>,
    was_leader: bool,
    snapshot_dir: PathBuf,
    /// The index of the newest snapshot made or installed here.
    last_snapshot: u64,
    /// A snapshot file is being written off the loop.
    snapshot_writing: bool,
    /// The loop's own inbox, for work it hands off to report back.
    inbox_sender: mpsc::Sender<Request>,
    /// When this member (as leader) last looked at compaction, and the revision then:
    /// the next compaction drops history before it.
    compaction_mark: Option<(Instant, u64)>,
    wal: Wal,
    /// The checkpoint begun at the last switch of write-ahead files, if still running.
    checkpointing: Option<std::thread::JoinHandle<Result<(), StoreError>>>,
}

fn entry_id(context: &[u8]) -> Option<(u64, u64)> {
    let c = <[u8; 16]>::try_from(context).ok()?;
    let (a, b) = c.split_at(8);
    Some((
        u64::from_be_bytes(a.try_into().ok()?),
        u64::from_be_bytes(b.try_into().ok()?),
    ))
}

impl ReadyLoop {
    fn run(&mut self, inbox: mpsc::Receiver<Request>) -> Result<(), ReplicaError> {
        let result = self.run_inner(inbox).and(self.finish_checkpoint());
        if let Err(e) = &result {
            tracing::error!(id = self.settings.id, error = %e, "replica stopped");
        }
        result
    }

    fn run_inner(&mut self, inbox: mpsc::Receiver<Request>) -> Result<(), ReplicaError> {
        let mut last_tick = Instant::now();
        loop {
            let timeout = self.settings.tick.saturating_sub(last_tick.elapsed());
            let first = match inbox.recv_timeout(timeout) {
                Ok(r) => Some(r),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            };
            let mut taken = 0;
            let mut next = first;
            // Everything already queued joins this batch.
            while let Some(request) = next {
                if !self.take(request)? {
                    return Ok(());
                }
                taken += 1;
                if taken >= self.settings.max_batch {
                    break;
                }
                next = match inbox.try_recv() {
                    Ok(r) => Some(r),
                    Err(mpsc::TryRecvError::Empty) => None,
                    Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
                };
            }
            if last_tick.elapsed() >= self.settings.tick {
                self.node.tick();
                last_tick = Instant::now();
                self.on_tick()?;
            }
            self.track_role();
            self.hand_over_waiting();
            self.ask_reads();
            if self.node.has_ready() {
                self.handle_ready()?;
            }
            self.maybe_snapshot()?;
        }
    }

    /// Takes one request in; false on Stop.
    fn take(&mut self, request: Request) -> Result<bool, ReplicaError> {
        let now = Instant::now();
        match request {
            Request::Propose(c, a) => self.waiting.push((Queued::Write(c, a), now)),
            Request::ConfChange(c, a) => self.waiting.push((Queued::Conf(c, a), now)),
            Request::Read(a) => self.reads_new.push((a, now)),
            Request::Step(m) => {
                // Messages from members this one does not know yet (a leader that
                // admitted us) are still raft's to judge.
                if let Err(e) = self.node.step(*m) {
                    tracing::debug!(error = %e, "raft refused a message");
                }
            }
            Request::SnapshotSent(to, ok) => {
                let status = if ok {
                    self.metrics.snapshots_sent.fetch_add(1, Ordering::Relaxed);
                    raft::SnapshotStatus::Finish
                } else {
                    self.metrics
                        .snapshots_send_failures
                        .fetch_add(1, Ordering::Relaxed);
                    raft::SnapshotStatus::Failure
                };
                self.node.report_snapshot(to, status);
            }
            Request::SnapshotWritten(written) => self.snapshot_written(*written)?,
            Request::Stop => return Ok(false),
        }
        Ok(true)
    }

    fn track_role(&mut self) {
        let raft = &self.node.raft;
        let leader = raft.state == StateRole::Leader;
        self.metrics
            .leader_id
            .store(raft.leader_id, Ordering::Relaxed);
        self.metrics.term.store(raft.term, Ordering::Relaxed);
        if leader != self.was_leader {
            self.was_leader = leader;
            self.metrics
                .is_leader
                .store(u64::from(leader), Ordering::Relaxed);
            if leader {
                self.metrics.leader_changes.fetch_add(1, Ordering::Relaxed);
                tracing::info!(id = self.settings.id, term = raft.term, "leading");
            }
        }
    }

    fn next_context(&mut self) -> ((u64, u64), Vec<u8>) {
        let id = (self.incarnation, self.next_id);
        self.next_id += 1;
        let mut context = id.0.to_be_bytes().to_vec();
        context.extend_from_slice(&id.1.to_be_bytes());
        (id, context)
    }

    /// Hands queued proposals to raft once a leader is known (raft forwards a
    /// follower's proposals to it).
    fn hand_over_waiting(&mut self) {
        if self.waiting.is_empty() || self.node.raft.leader_id == raft::INVALID_ID {
            return;
        }
        self.metrics
            .proposals
            .fetch_add(self.waiting.len() as u64, Ordering::Relaxed);
        // Writes go to raft as one proposal message per batch (cut at
        // PROPOSAL_MESSAGE_BYTES): raft appends them together and sends followers one
        // append for them all, where one proposal each would send one append each and
        // fill the in-flight window.
        let mut batch: Vec<Entry> = Vec::new();
        let mut batch_ids: Vec<((u64, u64), Waiter, Instant)> = Vec::new();
        let mut batch_bytes = 0;
        for (queued, since) in std::mem::take(&mut self.waiting) {
            let (id, context) = self.next_context();
            match queued {
                Queued::Write(command, answer) => {
                    let data = encode_command(&command);
                    if batch_bytes + data.len() > PROPOSAL_MESSAGE_BYTES && !batch.is_empty() {
                        self.propose_batch(
                            std::mem::take(&mut batch),
                            std::mem::take(&mut batch_ids),
                        );
                        batch_bytes = 0;
                    }
                    batch_bytes += data.len();
                    batch.push(Entry {
                        data: data.into(),
                        context: context.into(),
                        ..Default::default()
                    });
                    batch_ids.push((id, Waiter::Write(answer), since));
                }
                Queued::Conf(change, answer) => {
                    let waiter = Waiter::Conf(answer);
                    match self.node.propose_conf_change(context, change) {
                        Ok(()) => {
                            self.pending.insert(id, (waiter, since));
                        }
                        Err(e) => waiter.fail(ReplicaError::Dropped(e.to_string())),
                    }
                }
            }
        }
        if !batch.is_empty() {
            self.propose_batch(batch, batch_ids);
        }
    }

    /// Hands raft one proposal message holding `entries` (as `RawNode::propose` does for
    /// one); their waiters wait for them, or all fail if raft drops the message.
    fn propose_batch(&mut self, entries: Vec<Entry>, waiters: Vec<((u64, u64), Waiter, Instant)>) {
        let mut message = Message::default();
        message.set_msg_type(raft::prelude::MessageType::MsgPropose);
        message.from = self.node.raft.id;
        message.set_entries(entries.into());
        match self.node.raft.step(message) {
            Ok(()) => {
                for (id, waiter, since) in waiters {
                    self.pending.insert(id, (waiter, since));
                }
            }
            Err(e) => {
                for (_, waiter, _) in waiters {
                    waiter.fail(ReplicaError::Dropped(e.to_string()));
                }
            }
        }
    }

    /// Starts one ReadIndex round for every read that arrived since the last.
    fn ask_reads(&mut self) {
        if self.reads_new.is_empty() || self.node.raft.leader_id == raft::INVALID_ID {
            return;
        }
        let (_, context) = self.next_context();
        self.reads_asked
            .insert(context.clone(), std::mem::take(&mut self.reads_new));
        self.metrics.read_rounds.fetch_add(1, Ordering::Relaxed);
        self.node.read_index(context);
    }

    fn on_tick(&mut self) -> Result<(), ReplicaError> {
        let timeout = self.settings.request_timeout;
        let expired = |since: &Instant| since.elapsed() >= timeout;
        // Raft drops ReadIndex requests silently (no leader yet, a new leader that has
        // not committed in its term, a lost message): ask again each tick until answered.
        let asked: Vec<Vec<u8>> = self.reads_asked.keys().cloned().collect();
        for context in asked {
            if let Some(readers) = self.reads_asked.get_mut(&context) {
                let mut kept = Vec::with_capacity(readers.len());
                for (answer, since) in readers.drain(..) {
                    if expired(&since) {
                        self.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
                        let _ = answer.send(Err(ReplicaError::Timeout(timeout)));
                    } else {
                        kept.push((answer, since));
                    }
                }
                if kept.is_empty() {
                    self.reads_asked.remove(&context);
                } else {
                    *readers = kept;
                    if self.node.raft.leader_id != raft::INVALID_ID {
                        self.node.read_index(context);
                    }
                }
            }
        }
        for (answer, since) in std::mem::take(&mut self.reads_new) {
            if expired(&since) {
                self.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
                let _ = answer.send(Err(ReplicaError::Timeout(timeout)));
            } else {
                self.reads_new.push((answer, since));
            }
        }
        for (queued, since) in std::mem::take(&mut self.waiting) {
            if expired(&since) {
                self.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
                match queued {
                    Queued::Write(_, a) => {
                        let _ = a.send(Err(ReplicaError::Timeout(timeout)));
                    }
                    Queued::Conf(_, a) => {
                        let _ = a.send(Err(ReplicaError::Timeout(timeout)));
                    }
                }
            } else {
                self.waiting.push((queued, since));
            }
        }
        let gone: Vec<(u64, u64)> = self
            .pending
            .iter()
            .filter(|(_, (_, since))| expired(since))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            if let Some((waiter, _)) = self.pending.remove(&id) {
                self.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
                waiter.fail(ReplicaError::Timeout(timeout));
            }
        }
        self.compact_history()?;
        self.promote_caught_up_learner()
    }

    /// On the leader, every `compact_interval`: proposes dropping history older than
    /// the revision seen an interval ago (a lost proposal is simply made again later).
    fn compact_history(&mut self) -> Result<(), ReplicaError> {
        let interval = self.settings.compact_interval;
        if interval.is_zero() || self.node.raft.state != StateRole::Leader {
            self.compaction_mark = None;
            return Ok(());
        }
        let revision = self.store.revision()?;
        match self.compaction_mark {
            None => self.compaction_mark = Some((Instant::now(), revision)),
            Some((since, _)) if since.elapsed() < interval => {}
            Some((_, mark)) => {
                if mark > self.store.compacted()? {
                    let (_, context) = self.next_context();
                    if let Err(e) = self.node.propose(context, encode_compaction(mark)) {
                        tracing::debug!(error = %e, "compaction not proposed");
                    }
                }
                self.compaction_mark = Some((Instant::now(), revision));
            }
        }
        Ok(())
    }

    /// On the leader: proposes promoting one learner whose log has caught up.
    fn promote_caught_up_learner(&mut self) -> Result<(), ReplicaError> {
        if self.node.raft.state != StateRole::Leader || self.node.raft.has_pending_conf() {
            return Ok(());
        }
        if let Some((_, since)) = self.promoting
            && since.elapsed() < self.settings.tick * self.settings.election_ticks as u32
        {
            return Ok(());
        }
        let committed = self.node.raft.raft_log.committed;
        let candidate = self
            .node
            .raft
            .prs()
            .conf()
            .learners()
            .iter()
            .copied()
            .find(|id| {
                self.node
                    .raft
                    .prs()
                    .get(*id)
                    // matched > 0: a learner that has not answered yet has caught up
                    // with nothing, however young the log.
                    .is_some_and(|p| {
                        p.matched > 0 && p.matched + self.settings.promote_lag >= committed
                    })
            });
        let Some(id) = candidate else {
            return Ok(());
        };
        let addr = self
            .store
            .members()?
            .into_iter()
            .find(|(m, _)| *m == id)
            .map(|(_, a)| a)
            .unwrap_or_default();
        let mut change = ConfChange::default();
        change.set_change_type(ConfChangeType::AddNode);
        change.node_id = id;
        change.context = addr.into_bytes().into();
        tracing::info!(learner = id, "promoting a caught-up learner to voter");
        if let Err(e) = self.node.propose_conf_change(Vec::new(), change) {
            tracing::warn!(learner = id, error = %e, "promotion not proposed");
        }
        self.promoting = Some((id, Instant::now()));
        Ok(())
    }

    fn send_messages(&self, messages: Vec<Message>) {
        if let Some(transport) = &self.transport {
            for m in &messages {
                transport.send(m);
            }
        }
    }

    fn handle_ready(&mut self) -> Result<(), ReplicaError> {
        let mut ready = self.node.ready();
        // A leader's messages can go before its own write (raft's thesis §10.2.1).
        self.send_messages(ready.take_messages());
        for rs in ready.take_read_states() {
            if let Some(readers) = self.reads_asked.remove(rs.request_ctx.as_slice()) {
                self.reads_ready
                    .extend(readers.into_iter().map(|(a, _)| (rs.index, a)));
            }
        }
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            self.install_snapshot(&snapshot)?;
        }
        let committed = ready.take_committed_entries();
        self.apply(committed)?;
        self.node.store().append(ready.entries())?;
        if let Some(hs) = ready.hs() {
            self.node.store().set_hard_state(hs)?;
        }
        // One sync per batch: what is acknowledged or promised below is on disk. A
        // ready that only moves the commit index and applies entries needs none: the
        // entries are already durable, and applying them again after a crash is a replay
        // (the applied index only trails).
        if ready.must_sync() {
            let started = Instant::now();
            let record = crate::raftlog::encode_batch(ready.entries(), ready.hs())?;
            if !self.wal.fits(record.len()) {
                self.switch_wal()?;
            }
            if self.wal.fits(record.len()) {
                self.wal.append(&record)?;
                self.wal.sync()?;
            } else {
                // Larger than a whole file: made durable in sled itself.
                self.store.flush()?;
            }
            self.metrics
                .flush_micros
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            self.metrics.flushes.fetch_add(1, Ordering::Relaxed);
        }
        self.send_messages(ready.take_persisted_messages());
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.node.store().hard_state()?;
            hs.commit = commit;
            self.node.store().set_hard_state(&hs)?;
        }
        self.send_messages(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.node.advance_apply();
        let applied = self.store.applied_index()?;
        self.metrics.applied_index.store(applied, Ordering::Relaxed);
        self.metrics
            .commit_index
            .store(self.node.raft.raft_log.committed, Ordering::Relaxed);
        self.metrics
            .last_index
            .store(self.node.raft.raft_log.last_index(), Ordering::Relaxed);
        // Reads whose index is now applied may go ahead.
        let mut kept = Vec::with_capacity(self.reads_ready.len());
        for (index, answer) in self.reads_ready.drain(..) {
            if index <= applied {
                let _ = answer.send(Ok(()));
            } else {
                kept.push((index, answer));
            }
        }
        self.reads_ready = kept;
        self.revision.send_replace(self.store.revision()?);
        Ok(())
    }

    /// The active write-ahead file is full: waits for the last checkpoint (which covers
    /// the other file's records), makes the other file active, and starts a checkpoint
    /// (sled made durable, its files fsynced) of everything written so far beside the
    /// loop.
    fn switch_wal(&mut self) -> Result<(), ReplicaError> {
        self.finish_checkpoint()?;
        self.wal.switch()?;
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let spawned = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                let started = Instant::now();
                store.flush()?;
                metrics.checkpoints.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    millis = started.elapsed().as_millis() as u64,
                    "checkpoint: sled durable"
                );
                Ok(())
            });
        match spawned {
            Ok(handle) => self.checkpointing = Some(handle),
            Err(e) => {
                tracing::warn!(error = %e, "no thread for a checkpoint; making it here");
                self.store.flush()?;
                self.metrics.checkpoints.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Waits for a running checkpoint; its failure stops the replica (sled could not be
    /// made durable).
    fn finish_checkpoint(&mut self) -> Result<(), ReplicaError> {
        match self.checkpointing.take() {
            None => Ok(()),
            Some(handle) => handle.join().unwrap_or_else(|_| {
                Err(StoreError::Sled(sled::Error::ReportableBug(
                    "the checkpoint thread panicked".into(),
                )))
            }),
        }
        .map_err(ReplicaError::from)
    }

    /// Replaces the state machine and the log with the snapshot raft accepted (the
    /// transport placed its file, checked, before handing raft the message).
    fn install_snapshot(&mut self, snapshot: &raft::prelude::Snapshot) -> Result<(), ReplicaError> {
        let meta = snapshot.get_metadata();
        let path = self.snapshot_dir.join(snapshot::file_name(meta.index));
        let started = Instant::now();
        let header = self.store.install(&path)?;
        if header.index != meta.index || header.term != meta.term {
            return Err(ReplicaError::Snapshot(SnapshotError::Damaged {
                path,
                message: format!(
                    "holds index {} term {}, raft's message says {} and {}",
                    header.index, header.term, meta.index, meta.term
                ),
            }));
        }
        let conf = meta.get_conf_state().clone();
        self.node
            .store()
            .apply_snapshot(self.store.db(), meta.index, meta.term, &conf)?;
        self.store.finish_install()?;
        // The log before the snapshot is gone: so is what the write-ahead log held.
        self.wal.reset()?;
        self.node
            .store()
            .set_snapshot(meta.index, meta.term, conf.clone());
        self.last_snapshot = meta.index;
        prune_snapshots(&self.snapshot_dir, meta.index);
        if let Some(transport) = &self.transport {
            let members = self.store.members()?;
            for (id, addr) in &members {
                transport.set_peer(*id, addr);
            }
            for (id, _) in transport.peers() {
                if !members.iter().any(|(m, _)| *m == id) {
                    transport.remove_peer(id);
                }
            }
        }
        self.publish_conf(&conf);
        self.metrics
            .snapshots_installed
            .fetch_add(1, Ordering::Relaxed);
        self.metrics
            .first_index
            .store(meta.index + 1, Ordering::Relaxed);
        tracing::info!(
            index = meta.index,
            term = meta.term,
            millis = started.elapsed().as_millis() as u64,
            "installed a snapshot from the leader"
        );
        Ok(())
    }

    /// Encodes a snapshot when enough has been applied since the last one, or when raft
    /// needs one to send, and hands the file write (and its fsync) to another thread:
    /// the loop pauses only to read the store.
    fn maybe_snapshot(&mut self) -> Result<(), ReplicaError> {
        if self.snapshot_writing {
            return Ok(());
        }
        let applied = self.store.applied_index()?;
        let due = applied >= self.last_snapshot + self.settings.snapshot_entries.max(1);
        if applied <= self.last_snapshot || !(due || self.node.store().take_snapshot_wanted()) {
            return Ok(());
        }
        let started = Instant::now();
        let term = raft::Storage::term(self.node.store(), applied)?;
        let conf = self.node.raft.prs().conf().to_conf_state();
        let header = SnapshotHeader {
            index: applied,
            term,
            conf: conf
                .write_to_bytes()
                .map_err(|e| ReplicaError::Dropped(e.to_string()))?,
        };
        let bytes = snapshot::encode(&self.store, &header)?;
        let dir = self.snapshot_dir.clone();
        let report = self.inbox_sender.clone();
        self.snapshot_writing = true;
        let spawned = std::thread::Builder::new()
            .name("snapshot-writer".into())
            .spawn(move || {
                let result = snapshot::write_file(&dir, applied, &bytes);
                let _ = report.send(Request::SnapshotWritten(Box::new(WrittenSnapshot {
                    index: applied,
                    term,
                    conf,
                    bytes: bytes.len() as u64,
                    started,
                    result,
                })));
            });
        if let Err(e) = spawned {
            self.snapshot_writing = false;
            tracing::warn!(error = %e, "no thread to write a snapshot; trying again later");
        }
        Ok(())
    }

    /// Offers a snapshot written off the loop and truncates the log behind it.
    fn snapshot_written(&mut self, written: WrittenSnapshot) -> Result<(), ReplicaError> {
        self.snapshot_writing = false;
        let path = match written.result {
            Ok(path) => path,
            Err(e) => {
                tracing::warn!(index = written.index, error = %e, "snapshot not written; trying again later");
                return Ok(());
            }
        };
        // A snapshot installed from the leader meanwhile may be newer.
        if written.index <= self.last_snapshot {
            return Ok(());
        }
        self.node
            .store()
            .set_snapshot(written.index, written.term, written.conf);
        self.last_snapshot = written.index;
        let keep_from = written.index.saturating_sub(self.settings.catch_up_entries);
        self.node.store().compact(keep_from)?;
        prune_snapshots(&self.snapshot_dir, written.index);
        self.metrics.snapshots_made.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .first_index
            .store(self.node.store().first(), Ordering::Relaxed);
        tracing::info!(
            index = written.index,
            bytes = written.bytes,
            path = %path.display(),
            log_first_index = self.node.store().first(),
            millis = written.started.elapsed().as_millis() as u64,
            "wrote a snapshot and truncated the log"
        );
        Ok(())
    }

    fn publish_conf(&self, conf: &ConfState) {
        self.metrics
            .voters
            .store(conf.voters.len() as u64, Ordering::Relaxed);
        self.metrics
            .learners
            .store(conf.learners.len() as u64, Ordering::Relaxed);
        self.conf.send_replace(conf.clone());
    }

    /// Applies committed entries in order and answers their proposers.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), ReplicaError> {
        // Consecutive writes are applied together (one sled transaction).
        let mut writes: Vec<CommittedWrite> = Vec::new();
        for entry in entries {
            let id = entry_id(&entry.context);
            let is_write = entry.get_entry_type() == EntryType::EntryNormal
                && !entry.data.is_empty()
                && entry.data.first() != Some(&crate::store::COMPACTION_TAG);
            if !is_write {
                self.apply_writes(std::mem::take(&mut writes))?;
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {
                    self.store.mark_applied(entry.index)?;
                    // A new leader's empty entry, or a proposal raft replaced with an
                    // empty one (a second membership change while one was pending).
                    if let Some((waiter, _)) = id.and_then(|id| self.pending.remove(&id)) {
                        waiter.fail(ReplicaError::Dropped(
                            "another membership change is in progress; try again".into(),
                        ));
                    }
                }
                EntryType::EntryNormal => {
                    let command = decode_entry(&entry.data).map_err(|e| {
                        // A committed entry this build cannot read: every replica must
                        // stop the same way rather than diverge.
                        ReplicaError::BadEntry {
                            index: entry.index,
                            message: e.to_string(),
                        }
                    })?;
                    match command {
                        EntryCommand::Txn(command) => writes.push((entry.index, command, id)),
                        EntryCommand::Compact { revision } => {
                            if self.store.apply_compaction(entry.index, revision)? {
                                self.metrics.compactions.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(revision, "history compacted");
                            }
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    let change = ConfChange::parse_from_bytes(&entry.data).map_err(|e| {
                        ReplicaError::BadEntry {
                            index: entry.index,
                            message: e.to_string(),
                        }
                    })?;
                    let conf = self.apply_conf_change(entry.index, &change)?;
                    if let Some((Waiter::Conf(answer), _)) =
                        id.and_then(|id| self.pending.remove(&id))
                    {
                        let _ = answer.send(Ok(conf));
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    return Err(ReplicaError::BadEntry {
                        index: entry.index,
                        message: "joint configuration changes are not used by Brink".into(),
                    });
                }
            }
        }
        self.apply_writes(writes)
    }

    /// Applies consecutive write entries in one go and answers their proposers.
    fn apply_writes(&mut self, writes: Vec<CommittedWrite>) -> Result<(), ReplicaError> {
        if writes.is_empty() {
            return Ok(());
        }
        let batch: Vec<(u64, &Command)> = writes.iter().map(|(i, c, _)| (*i, c)).collect();
        let outcomes = self.store.apply_many(&batch)?;
        for ((_, _, id), outcome) in writes.iter().zip(outcomes) {
            if let Some((Waiter::Write(answer), since)) = id.and_then(|id| self.pending.remove(&id))
            {
                self.metrics.commit_latency.observe(since.elapsed());
                let _ = answer.send(Ok(outcome));
            }
        }
        Ok(())
    }

    fn apply_conf_change(
        &mut self,
        index: u64,
        change: &ConfChange,
    ) -> Result<ConfState, ReplicaError> {
        let conf = self.node.apply_conf_change(change)?;
        self.node.store().set_conf_state(&conf)?;
        let id = change.node_id;
        let addr = String::from_utf8_lossy(&change.context).into_owned();
        let removed = change.get_change_type() == ConfChangeType::RemoveNode;
        self.store
            .apply_membership(index, id, (!removed).then_some(addr.as_str()))?;
        if let Some(transport) = &self.transport {
            if removed {
                transport.remove_peer(id);
            } else if !addr.is_empty() {
                transport.set_peer(id, &addr);
            }
        }
        if self.promoting.is_some_and(|(p, _)| p == id) {
            self.promoting = None;
        }
        tracing::info!(
            member = id,
            change = ?change.get_change_type(),
            voters = ?conf.voters,
            learners = ?conf.learners,
            "membership changed"
        );
        self.publish_conf(&conf);
        if removed && id == self.settings.id {
            tracing::warn!("this member was removed from the cluster");
        }
        Ok(conf)
    }
}

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
