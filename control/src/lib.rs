//! `brink-control`: the control plane.
//!
//! Today: the replicated store's state machine ([`store`]: keys with revisions,
//! compare-and-set transactions, ranges, watch history, compaction, on sled). To come
//! (issue 5 onward): raft-rs `RawNode` driving it, the QUIC transport between voters, the
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
