//! `brink-control`: the control plane (not built yet).
//!
//! It will own the raft-replicated store (raft-rs `RawNode` on sled), the QUIC transport
//! between voters, the Kubernetes-compatible API server, the scheduler and the bridge to an
//! upstream cluster (issue 5 onward). It must not run guests or touch a node's disk: nodes
//! reach it only through the Kubernetes API.
