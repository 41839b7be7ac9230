//! `brink-node`: the node agent, a kubelet for WebAssembly.
//!
//! It owns everything that happens on one machine: fetching artifacts
//! ([`oci`], [`cache`], [`images`]), running them ([`runtime`]), the pod lifecycle
//! ([`pod`]), where pods come from ([`source`]), serving host ports ([`hostport`]), logs
//! ([`logs`]) and the kubelet-style endpoint ([`kubelet`]); [`agent`] wires them together.
//! Joining a site ([`join`]: token discovery and TLS bootstrap) and being seen by it
//! ([`registration`]: the Node and its Lease) go through the Kubernetes API only.
//! It must not reach into the control plane's store: it talks to the cluster only through
//! a [`source::PodSource`] (and, as later issues land, the Kubernetes API).

pub mod agent;
pub mod cache;
pub mod fnv;
pub mod gateway;
pub mod hostport;
pub mod idranges;
pub mod images;
pub mod in_flight;
pub mod join;
pub mod keyed_lock;
pub mod kubelet;
pub mod logs;
pub mod metrics;
pub mod oci;
pub mod pod;
pub mod registration;
pub mod runtime;
pub mod sandbox;
pub mod settings;
pub mod source;

pub use agent::{Agent, AgentError};
pub use brink_proto::manifest::pod_key;
pub use settings::NodeSettings;

/// Installs rustls' ring provider as the process default, once. Both the registry client
/// and (later) the Kubernetes client need one, and two linked-in providers make rustls
/// refuse to pick; call this at the top of `main` and of tests that pull over TLS.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
