//! `brink-control`: the control plane.
//!
//! Today: the replicated store ([`store`]: keys with revisions, compare-and-set
//! transactions, ranges, watch history, compaction and snapshot files, on sled), driven by
//! raft-rs (`raftlog`, `wal`, `replica`), with members talking QUIC under the site CA
//! (`transport`, `pki`, `member`) and a debugging API (`api`). To come: the
//! Kubernetes-compatible API server, the scheduler and the bridge to an upstream cluster.
//! It must not run guests or touch a node's disk: nodes reach it only through the
//! Kubernetes API.

pub mod api;
pub mod member;
pub mod pki;
pub mod raftlog;
pub mod replica;
pub mod store;
pub mod transport;
pub mod wal;
