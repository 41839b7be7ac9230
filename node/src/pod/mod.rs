//! The pod lifecycle on a node, in krator's spirit: each pod has one worker task that walks
//! a typed state machine (Pending → Pulling → Starting → Running → Succeeded/Failed, with
//! back-off states on the way) and is the only writer of that pod's [`PodRecord`].
//!
//! Owns: pull and start ordering, restart policy, CrashLoopBackOff and ImagePullBackOff,
//! probes, graceful stop. Does not own: where pods come from (see [`crate::source`]),
//! how guests run (see [`crate::runtime`]), how ports are served (see [`crate::hostport`]).

mod probe;
pub mod restart;
pub mod status;
pub mod volumes;
mod worker;

pub use status::{ContainerState, PodPhase, PodRecord};
pub use worker::PodHandle;

use k8s_openapi::api::core::v1::Pod;
use sha2::Digest as _;

/// What makes a pod the same pod. Without a uid (a manifest's pod) it is everything in
/// the manifest: a changed manifest is a new pod, as with a kubelet's static pods. With
/// one (an API pod) it is the uid, spec and annotations: the API server writes status,
/// labels, owners and versions without the pod being replaced, while an edited spec (a
/// new image) starts it again. Status never counts.
pub fn fingerprint(pod: &Pod) -> String {
    let bytes = match &pod.metadata.uid {
        Some(uid) => serde_json::to_vec(&(uid, &pod.metadata.annotations, &pod.spec)),
        None if pod.status.is_none() => serde_json::to_vec(pod),
        None => serde_json::to_vec(&Pod {
            status: None,
            ..pod.clone()
        }),
    }
    .unwrap_or_default();
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A stable UUID-shaped uid derived from the fingerprint, so a node restart gives the same
/// pod the same uid (and the same log directory).
pub fn uid_from_fingerprint(fingerprint: &str) -> String {
    let f = fingerprint.as_bytes();
    let part = |a: usize, b: usize| {
        String::from_utf8_lossy(&f[a.min(f.len())..b.min(f.len())]).into_owned()
    };
    format!(
        "{}-{}-{}-{}-{}",
        part(0, 8),
        part(8, 12),
        part(12, 16),
        part(16, 20),
        part(20, 32)
    )
}
