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
//! Not built yet: snapshots (the log is never truncated, so a member that joins or falls
//! behind catches up from the log itself).

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
use crate::store::{Applied, Command, Store, StoreError, decode_command, encode_command};
use crate::transport::Transport;

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
}

type Answer<T> = tokio::sync::oneshot::Sender<Result<T, ReplicaError>>;

enum Request {
    Propose(Command, Answer<Applied>),
    ConfChange(ConfChange, Answer<ConfState>),
    Read(Answer<()>),
    Step(Box<Message>),
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
}

/// A running replica.
pub struct Replica {
    path: PathBuf,
    requests: mpsc::Sender<Request>,
    thread: Option<std::thread::JoinHandle<Result<(), ReplicaError>>>,
    store: Arc<Store>,
    revision: tokio::sync::watch::Receiver<u64>,
    conf: tokio::sync::watch::Receiver<ConfState>,
    pub metrics: Arc<ReplicaMetrics>,
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
        let log = SledLog::open(store.db())?;
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
        };
        let thread = std::thread::Builder::new()
            .name(format!("raft-{:x}", settings.id))
            .spawn(move || ready_loop.run(inbox))
            .map_err(|e| ReplicaError::Store(StoreError::Sled(sled::Error::Io(e))))?;
        Ok(Self {
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
        self.ask(|a| Request::Propose(command, a)).await
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
        let result = self.run_inner(inbox);
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
        for (queued, since) in std::mem::take(&mut self.waiting) {
            let (id, context) = self.next_context();
            let (result, waiter) = match queued {
                Queued::Write(command, answer) => (
                    self.node.propose(context, encode_command(&command)),
                    Waiter::Write(answer),
                ),
                Queued::Conf(change, answer) => (
                    self.node.propose_conf_change(context, change),
                    Waiter::Conf(answer),
                ),
            };
            match result {
                Ok(()) => {
                    self.pending.insert(id, (waiter, since));
                }
                Err(e) => waiter.fail(ReplicaError::Dropped(e.to_string())),
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
        self.promote_caught_up_learner()
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
        let committed = ready.take_committed_entries();
        self.apply(committed)?;
        if !ready.snapshot().is_empty() {
            // Never sent: the log is never truncated (snapshots are not built yet).
            tracing::error!("received a snapshot, which this build cannot install");
        }
        self.node.store().append(ready.entries())?;
        if let Some(hs) = ready.hs() {
            self.node.store().set_hard_state(hs)?;
        }
        // One flush per batch: what is acknowledged or promised below is on disk.
        let started = Instant::now();
        self.store.flush()?;
        self.metrics
            .flush_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.metrics.flushes.fetch_add(1, Ordering::Relaxed);
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

    /// Applies committed entries in order and answers their proposers.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), ReplicaError> {
        for entry in entries {
            let id = entry_id(&entry.context);
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
                    let command = decode_command(&entry.data).map_err(|e| {
                        // A committed entry this build cannot read: every replica must
                        // stop the same way rather than diverge.
                        ReplicaError::BadEntry {
                            index: entry.index,
                            message: e.to_string(),
                        }
                    })?;
                    let outcome = self.store.apply(entry.index, &command)?;
                    if let Some((Waiter::Write(answer), _)) =
                        id.and_then(|id| self.pending.remove(&id))
                    {
                        let _ = answer.send(Ok(outcome));
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
        self.metrics
            .voters
            .store(conf.voters.len() as u64, Ordering::Relaxed);
        self.metrics
            .learners
            .store(conf.learners.len() as u64, Ordering::Relaxed);
        self.conf.send_replace(conf.clone());
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

    #[test]
    fn an_empty_directory_without_a_bootstrap_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Replica::start(dir.path(), settings(), Bootstrap::Existing, None)
            .err()
            .expect("refused");
        assert!(matches!(err, ReplicaError::NotInitialized(_)), "{err}");
    }
}
