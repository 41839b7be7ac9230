//! Consensus: the store replicated by raft-rs. The replica ([`replica`]) is the async
//! handle; the ready loop (`ready_loop`) is the thread that owns `RawNode`; the raft log
//! lives in sled ([`log`]) and each ready batch is made durable by the write-ahead files
//! ([`wal`]).
//!
//! Named `consensus` rather than `raft` so that `raft::` always means the raft-rs crate.
//! Owns the log, the write-ahead files, snapshots on disk and the apply order; must not
//! know what keys mean (that is the API server's) nor open sockets (that is `peers`').

pub mod log;
mod ready_loop;
pub mod replica;
pub mod wal;
