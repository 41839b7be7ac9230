//! The ready loop: the thread that owns raft-rs's `RawNode` and the store. It batches
//! proposals, makes each ready durable (one write-ahead log sync), sends messages, applies
//! committed entries, answers proposers and readers, promotes learners, compacts history,
//! and makes, offers and installs snapshots.
//!
//! It must not wait on the network: messages go to the transport's queues.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Instant;

use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message};
use raft::{RawNode, StateRole};

use crate::consensus::log::SledLog;
use crate::consensus::wal::Wal;
use crate::peers::transport::Transport;
use crate::settings::ReplicaSettings;
use crate::store::snapshot::{self, SnapshotError, SnapshotHeader};
use crate::store::{
    Applied, Command, EntryCommand, Store, StoreError, decode_entry, encode_command,
    encode_compaction,
};

use super::replica::*;

pub(super) type CommittedWrite = (u64, Command, Option<(u64, u64)>);

/// A proposer waiting for its entry.
pub(super) enum Waiter {
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
pub(super) enum Queued {
    Write(Command, Answer<Applied>),
    Conf(ConfChange, Answer<ConfState>),
}

pub(super) struct ReadyLoop {
    pub(super) node: RawNode<SledLog>,
    pub(super) store: Arc<Store>,
    pub(super) transport: Option<Arc<Transport>>,
    pub(super) settings: ReplicaSettings,
    pub(super) revision: tokio::sync::watch::Sender<u64>,
    pub(super) conf: tokio::sync::watch::Sender<ConfState>,
    pub(super) metrics: Arc<ReplicaMetrics>,
    /// Proposal ids are (incarnation, sequence): unique across restarts and members, so
    /// entries committed by an earlier run or another member never answer this run's
    /// proposers.
    pub(super) incarnation: u64,
    pub(super) next_id: u64,
    pub(super) pending: HashMap<(u64, u64), (Waiter, Instant)>,
    pub(super) waiting: Vec<(Queued, Instant)>,
    /// Reads that arrived since the last ReadIndex round.
    pub(super) reads_new: Vec<(Answer<()>, Instant)>,
    /// ReadIndex rounds asked of raft, by context, with their readers.
    pub(super) reads_asked: HashMap<Vec<u8>, Vec<(Answer<()>, Instant)>>,
    /// Readers whose read index is known, waiting for it to be applied.
    pub(super) reads_ready: Vec<(u64, Answer<()>)>,
    /// The learner being promoted and when that was proposed.
    pub(super) promoting: Option<(u64, Instant)>,
    pub(super) was_leader: bool,
    /// The leader this member last knew: when it changes, proposals in flight are
    /// answered at once (they may have died with the old leader) rather than left to
    /// time out.
    pub(super) last_leader: u64,
    pub(super) snapshot_dir: PathBuf,
    /// The index of the newest snapshot made or installed here.
    pub(super) last_snapshot: u64,
    /// A snapshot file is being written off the loop.
    pub(super) snapshot_writing: bool,
    /// The loop's own inbox, for work it hands off to report back.
    pub(super) inbox_sender: mpsc::Sender<Request>,
    /// When this member (as leader) last looked at compaction, and the revision then:
    /// the next compaction drops history before it.
    pub(super) compaction_mark: Option<(Instant, u64)>,
    pub(super) wal: Wal,
    /// The checkpoint begun at the last switch of write-ahead files, if still running.
    pub(super) checkpointing: Option<std::thread::JoinHandle<Result<(), StoreError>>>,
}

pub(super) fn entry_id(context: &[u8]) -> Option<(u64, u64)> {
    let c = <[u8; 16]>::try_from(context).ok()?;
    let (a, b) = c.split_at(8);
    Some((
        u64::from_be_bytes(a.try_into().ok()?),
        u64::from_be_bytes(b.try_into().ok()?),
    ))
}

impl ReadyLoop {
    pub(super) fn run(&mut self, inbox: mpsc::Receiver<Request>) -> Result<(), ReplicaError> {
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
        if raft.leader_id != self.last_leader {
            let before = std::mem::replace(&mut self.last_leader, raft.leader_id);
            if before != raft::INVALID_ID && !self.pending.is_empty() {
                tracing::info!(
                    id = self.settings.id,
                    pending = self.pending.len(),
                    "the leader changed; answering proposals in flight"
                );
                for (_, (waiter, _)) in self.pending.drain() {
                    waiter.fail(ReplicaError::LeaderChanged);
                }
            }
        }
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
            let record = crate::consensus::log::encode_batch(ready.entries(), ready.hs())?;
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
