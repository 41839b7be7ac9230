//! Every setting of a control-plane member, with its default and the checks that refuse a
//! value that cannot work: the replica (raft timing, batching, snapshots, the write-ahead
//! log), the peer transport, and the member that ties them together.
//!
//! Owns the types and their checks only; the command line maps its flags onto them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A setting that cannot work, named by its flag.
#[derive(Debug, thiserror::Error)]
#[error("{setting} {message}")]
pub struct SettingsError {
    pub setting: &'static str,
    pub message: &'static str,
}

fn refuse(setting: &'static str, message: &'static str) -> Result<(), SettingsError> {
    Err(SettingsError { setting, message })
}

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

impl ReplicaSettings {
    /// Refuses values that cannot work (each named by its `brink server` flag).
    pub fn check(&self) -> Result<(), SettingsError> {
        if self.tick.is_zero() {
            return refuse("--raft-tick", "must be positive");
        }
        if self.heartbeat_ticks < 1 || self.election_ticks <= self.heartbeat_ticks {
            return refuse(
                "--election-ticks",
                "must be greater than --heartbeat-ticks (at least 1)",
            );
        }
        if self.max_batch < 1 {
            return refuse("--max-batch", "must be at least 1");
        }
        if !(1 << 16..=1 << 34).contains(&self.wal_bytes) {
            return refuse("--wal-bytes", "must be between 64 KiB and 16 GiB");
        }
        if self.snapshot_entries < 1 {
            return refuse("--snapshot-entries", "must be at least 1");
        }
        if self.request_timeout.is_zero() {
            return refuse("--request-timeout", "must be positive");
        }
        Ok(())
    }
}

/// The transport's limits and intervals.
#[derive(Debug, Clone)]
pub struct TransportSettings {
    /// Raft messages queued for one peer before new ones are dropped.
    pub peer_queue: usize,
    /// The most bytes of raft messages written as one frame.
    pub max_batch_bytes: usize,
    /// The first wait after a failed connection attempt (doubling up to the maximum).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// A connection silent for this long is dead (keep-alives go at a third of it).
    pub idle_timeout: Duration,
    /// The first connection attempt to a peer gives up after this (doubling on each
    /// failure up to `idle_timeout`): a peer that is not listening yet (a newcomer still
    /// binding its port) is tried again soon rather than after QUIC's own retransmits.
    pub connect_timeout: Duration,
    /// How long a join may take, end to end.
    pub join_timeout: Duration,
    /// The largest snapshot file sent or accepted.
    pub max_snapshot_bytes: u64,
    /// The bytes of a snapshot file in one chunk frame.
    pub snapshot_chunk_bytes: usize,
    /// How long after a failed snapshot send raft hears of it (and sends again).
    pub snapshot_retry_delay: Duration,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            peer_queue: 4096,
            max_batch_bytes: 4 << 20,
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_millis(250),
            join_timeout: Duration::from_secs(60),
            max_snapshot_bytes: 8 << 30,
            snapshot_chunk_bytes: 1 << 20,
            snapshot_retry_delay: Duration::from_secs(1),
        }
    }
}

impl TransportSettings {
    /// Refuses values that cannot work.
    pub fn check(&self) -> Result<(), SettingsError> {
        if self.peer_queue < 1 {
            return refuse("--peer-queue", "must be at least 1");
        }
        Ok(())
    }
}

/// A member's settings.
pub struct MemberSettings {
    pub data_dir: PathBuf,
    /// Where the QUIC endpoint listens.
    pub peer_listen: SocketAddr,
    /// Where other members dial this one.
    pub advertise: String,
    /// Raft settings (the id is this member's own, whatever is set here).
    pub replica: ReplicaSettings,
    pub transport: TransportSettings,
}

impl MemberSettings {
    /// Checks the replica's and the transport's settings.
    pub fn check(&self) -> Result<(), SettingsError> {
        self.replica.check()?;
        self.transport.check()
    }
}
