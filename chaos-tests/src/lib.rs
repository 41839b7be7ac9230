//! `brink-chaos`: the chaos harness.
//!
//! Today: the history checkers ([`linearizability`]: a Wing-Gong-Lowe search over any
//! sequential model, with the register model of one key in a revisioned store) and a raw
//! client of the Kubernetes API ([`api`]: chosen connections and protocols, streams read
//! or deliberately left unread). To come:
//! hosts as network namespaces, the fault catalog, workload generators and reports. It
//! drives Brink (or any cluster) only from the outside, through processes, sockets and
//! the Kubernetes API; it must not link into a node's or the control plane's internals.

pub mod api;
pub mod linearizability;
