//! `brink-chaos`: the chaos harness (not built yet).
//!
//! It will own hosts as network namespaces, the fault catalog, workload generators, history
//! checkers and reports. It drives Brink (or any cluster) only from the outside, through
//! processes, sockets and the Kubernetes API; it must not link into a node's or the control
//! plane's internals.
