//! Where pod status goes. A pod's worker tells the node's [`StatusSink`] each time the
//! pod's status changes, without knowing where it ends up: a standalone node serves
//! status from the workers' own records (its sink keeps nothing), a node joined to a
//! site writes it through the API's `pods/status`.

use k8s_openapi::api::core::v1::PodStatus;

/// Receives every change of every pod's status on this node.
pub trait StatusSink: Send + Sync + 'static {
    /// `key` (`namespace/name`) with `uid` now has `status`. Called from pod workers
    /// after every update of the pod's record, changed or not: it must return at once,
    /// and a sink that writes somewhere queues, coalesces and skips unchanged status.
    fn changed(&self, key: &str, uid: &str, status: &PodStatus);

    /// The pod `key` with `uid` no longer runs here: its worker has ended because the
    /// source stopped wanting it. A site's sink finishes a graceful deletion now.
    fn stopped(&self, _key: &str, _uid: &str) {}

    /// The agent is shutting down and stops every pod: from now on nothing is reported
    /// (a kubelet that stops does not say its pods finished).
    fn closing(&self) {}
}

/// The standalone node's sink: status stays in the workers' records, where the kubelet
/// endpoint and `brink get` read it.
#[derive(Debug, Default, Clone, Copy)]
pub struct RecordsOnly;

impl StatusSink for RecordsOnly {
    fn changed(&self, _key: &str, _uid: &str, _status: &PodStatus) {}
}
