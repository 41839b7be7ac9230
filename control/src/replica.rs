//! A replica of the store: raft-rs's `RawNode` over [`SledLog`], driving [`Store`], in a
//! ready loop on its own thread (sled and raft are blocking; the async side only sends
//! proposals and awaits answers).
//!
//! Owns the ready loop: proposals are batched (everything waiting when the loop wakes,
//! up to `max_batch`), each ready's entries and hard state are written and flushed once,
//! and only then are committed entries applied and their proposers answered, so an
//! acknowledged write is on disk. Today the replica is a single voter (`brink server
//! --init`'s first member); the transport to other voters, membership changes and
//! snapshots are the next parts of issue 5 and are not implemented here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use raft::prelude::{ConfState, Entry, EntryType};
use raft::{RawNode, StateRole};

use crate::raftlog::{LogError, SledLog};
use crate::store::{Applied, Command, Store, StoreError, decode_command, encode_command};

/// A replica's settings; every interval and limit is named here.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    /// This member's raft id (not 0).
    pub id: u64,
    /// One raft tick.
    pub tick: Duration,
    /// Ticks without a leader's word before a follower stands for election.
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// The most proposals taken into one ready batch (one flush).
    pub max_batch: usize,
}

impl Default for ReplicaSettings {
    fn default() -> Self {
        Self {
            id: 1,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            max_batch: 4096,
        }
    }
}

/// Why a replica failed or refused a proposal.
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
}

struct Proposal {
    command: Command,
    answer: tokio::sync::oneshot::Sender<Result<Applied, String>>,
}

enum Request {
    Propose(Proposal),
    Stop,
}

/// Counters of a replica's ready loop (for `/metrics`).
#[derive(Debug, Default)]
pub struct ReplicaMetrics {
    pub proposals: AtomicU64,
    /// Ready batches written (each one flush).
    pub flushes: AtomicU64,
    /// The last applied raft index.
    pub applied_index: AtomicU64,
    pub leader_changes: AtomicU64,
    /// 1 while this member leads.
    pub is_leader: AtomicU64,
}

/// A running replica.
pub struct Replica {
    path: PathBuf,
    requests: mpsc::Sender<Request>,
    thread: Option<std::thread::JoinHandle<Result<(), ReplicaError>>>,
    store: Arc<Store>,
    revision: tokio::sync::watch::Receiver<u64>,
    pub metrics: Arc<ReplicaMetrics>,
}

impl Replica {
    /// Opens the replica's data in `dir` and starts its loop. A fresh directory becomes
    /// a single-voter cluster with this member as its voter.
    pub fn start(dir: &Path, settings: ReplicaSettings) -> Result<Self, ReplicaError> {
        let store = Arc::new(Store::open(dir)?);
        let log = SledLog::open(store.db())?;
        if !log.is_initialized()? {
            let conf = ConfState {
                voters: vec![settings.id],
                ..Default::default()
            };
            log.set_conf_state(&conf)?;
            store.flush()?;
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
        // A sole voter need not wait out an election timeout.
        if node.raft.prs().conf().voters().ids().len() == 1 {
            node.campaign()?;
        }
        let (requests, inbox) = mpsc::channel();
        let loop_store = store.clone();
        let path = dir.to_path_buf();
        let (revision_tx, revision) = tokio::sync::watch::channel(store.revision()?);
        let metrics = Arc::new(ReplicaMetrics::default());
        let loop_metrics = metrics.clone();
        let thread = std::thread::Builder::new()
            .name(format!("raft-{}", settings.id))
            .spawn(move || ready_loop(node, loop_store, inbox, settings, revision_tx, loop_metrics))
            .map_err(|e| ReplicaError::Store(StoreError::Sled(sled::Error::Io(e))))?;
        Ok(Self {
            path,
            requests,
            thread: Some(thread),
            store,
            revision,
            metrics,
        })
    }

    /// Proposes `command`; resolves once it is committed, durable and applied (or
    /// refused by the state machine).
    pub async fn propose(&self, command: Command) -> Result<Applied, ReplicaError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.requests
            .send(Request::Propose(Proposal { command, answer }))
            .map_err(|_| ReplicaError::Stopped(self.path.clone()))?;
        match answered.await {
            Ok(Ok(applied)) => Ok(applied),
            Ok(Err(message)) => Err(ReplicaError::BadEntry { index: 0, message }),
            Err(_) => Err(ReplicaError::Stopped(self.path.clone())),
        }
    }

    /// The replica's store, for reads (as of the last applied entry: not yet
    /// linearizable across members; ReadIndex comes with the multi-voter transport).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The store's revision, updated after every applied batch (watchers wait on it).
    pub fn subscribe_revision(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revision.clone()
    }

    /// Whether this member leads (and so can commit).
    pub fn is_leader(&self) -> bool {
        self.metrics.is_leader.load(Ordering::Relaxed) == 1
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

fn ready_loop(
    mut node: RawNode<SledLog>,
    store: Arc<Store>,
    inbox: mpsc::Receiver<Request>,
    settings: ReplicaSettings,
    revision: tokio::sync::watch::Sender<u64>,
    metrics: Arc<ReplicaMetrics>,
) -> Result<(), ReplicaError> {
    let mut was_leader = false;
    let mut pending: Pending = HashMap::new();
    // Proposal ids are unique across restarts: entries committed by an earlier run are
    // applied after a restart and must not answer this run's proposers.
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()).rotate_left(32);
    // Proposals that wait for a leader (raft drops proposals without one).
    let mut waiting: Vec<Proposal> = Vec::new();
    let mut next_id: u64 = 1;
    let mut last_tick = Instant::now();
    loop {
        let timeout = settings.tick.saturating_sub(last_tick.elapsed());
        let mut stop = false;
        match inbox.recv_timeout(timeout) {
            Ok(Request::Propose(p)) => waiting.push(p),
            Ok(Request::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => stop = true,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        // Everything else already queued joins this batch.
        while !stop && waiting.len() < settings.max_batch {
            match inbox.try_recv() {
                Ok(Request::Propose(p)) => waiting.push(p),
                Ok(Request::Stop) | Err(mpsc::TryRecvError::Disconnected) => stop = true,
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        if stop {
            return Ok(());
        }
        if last_tick.elapsed() >= settings.tick {
            node.tick();
            last_tick = Instant::now();
        }
        let leader = node.raft.state == StateRole::Leader;
        if leader != was_leader {
            was_leader = leader;
            metrics
                .is_leader
                .store(u64::from(leader), Ordering::Relaxed);
            if leader {
                metrics.leader_changes.fetch_add(1, Ordering::Relaxed);
                tracing::info!(id = settings.id, term = node.raft.term, "leading");
            }
        }
        if leader {
            metrics
                .proposals
                .fetch_add(waiting.len() as u64, Ordering::Relaxed);
            for p in waiting.drain(..) {
                let id = (incarnation, next_id);
                next_id += 1;
                let data = encode_command(&p.command);
                let mut context = id.0.to_be_bytes().to_vec();
                context.extend_from_slice(&id.1.to_be_bytes());
                match node.propose(context, data) {
                    Ok(()) => {
                        pending.insert(id, p.answer);
                    }
                    Err(e) => {
                        let _ = p.answer.send(Err(e.to_string()));
                    }
                }
            }
        }
        if !node.has_ready() {
            continue;
        }
        let mut ready = node.ready();
        // Messages to other voters go out here once the transport exists; a sole voter
        // has none.
        let _ = ready.take_messages();
        apply(&store, &mut pending, ready.take_committed_entries())?;
        node.store().append(ready.entries())?;
        if let Some(hs) = ready.hs() {
            node.store().set_hard_state(hs)?;
        }
        // One flush per batch: what is acknowledged below is on disk.
        store.flush()?;
        metrics.flushes.fetch_add(1, Ordering::Relaxed);
        let _ = ready.take_persisted_messages();
        let mut light = node.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut hs = node.store().hard_state()?;
            hs.commit = commit;
            node.store().set_hard_state(&hs)?;
        }
        let _ = light.take_messages();
        apply(&store, &mut pending, light.take_committed_entries())?;
        node.advance_apply();
        metrics
            .applied_index
            .store(store.applied_index()?, Ordering::Relaxed);
        revision.send_replace(store.revision()?);
    }
}

/// Proposers waiting for their entry, by (incarnation, sequence).
type Pending = HashMap<(u64, u64), tokio::sync::oneshot::Sender<Result<Applied, String>>>;

/// Applies committed entries in order and answers their proposers.
fn apply(store: &Store, pending: &mut Pending, entries: Vec<Entry>) -> Result<(), ReplicaError> {
    for entry in entries {
        if entry.get_entry_type() != EntryType::EntryNormal || entry.data.is_empty() {
            // A new leader's empty entry, or a configuration change (not yet proposed
            // by anyone): nothing for the state machine.
            continue;
        }
        let id = <[u8; 16]>::try_from(entry.context.as_ref()).ok().map(|c| {
            let (a, b) = c.split_at(8);
            (
                u64::from_be_bytes(a.try_into().unwrap_or_default()),
                u64::from_be_bytes(b.try_into().unwrap_or_default()),
            )
        });
        let outcome = match decode_command(&entry.data) {
            Ok(command) => store.apply(entry.index, &command)?,
            Err(e) => {
                // A committed entry this build cannot read: every replica must stop the
                // same way rather than diverge.
                return Err(ReplicaError::BadEntry {
                    index: entry.index,
                    message: e.to_string(),
                });
            }
        };
        if let Some(answer) = id.and_then(|id| pending.remove(&id)) {
            let _ = answer.send(Ok(outcome));
        }
    }
    Ok(())
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
        let replica = Arc::new(Replica::start(dir.path(), settings()).expect("start"));
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
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_keeps_every_acknowledged_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Replica::start(dir.path(), settings()).expect("start");
        let Applied::Done { revision: r1 } = first.propose(create("/a", "1")).await.unwrap() else {
            panic!("not applied")
        };
        first.stop().expect("stop");
        let second = Replica::start(dir.path(), settings()).expect("restart");
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
}
