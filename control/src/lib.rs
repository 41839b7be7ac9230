//! `brink-control`: the control plane.
//!
//! - [`store`]: the replicated state machine (keys with revisions, compare-and-set
//!   transactions, ranges, watch history, compaction, snapshot files) on sled.
//! - [`consensus`]: raft-rs driving the store (the replica, its ready loop, the log and
//!   the write-ahead files).
//! - [`peers`]: the site CA and credentials, and QUIC between members.
//! - [`member`]: one member's start (init, join, restart) tying those together.
//! - [`settings`]: every setting, with its checks.
//! - [`store_api`]: the store's debugging API (`brink store`), `/readyz` and `/metrics`.
//! - [`apiserver`]: the Kubernetes API over the store, served by every member.
//! - [`accept`]: accepting connections with a limit and back-off, for both HTTP servers.
//! - [`scheduler`]: places pods on nodes, as an API client (on the leader, or anywhere).
//! - [`controllers`]: ReplicaSets, Deployments, DaemonSets and Jobs (more to come), API
//!   clients on the leader; [`leading`] starts and stops leader-only work.
//!
//! To come: the other controllers, and the bridge to an upstream cluster. It must not run
//! guests or touch a node's disk: nodes reach it only through the Kubernetes API.

pub mod accept;
pub mod apiserver;
pub mod consensus;
pub mod controllers;
pub mod leading;
pub mod member;
pub mod peers;
pub mod scheduler;
pub mod settings;
pub mod store;
pub mod store_api;
