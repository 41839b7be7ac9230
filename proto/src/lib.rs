//! `brink-proto`: what Brink accepts and what Brink processes say to each other.
//!
//! This crate owns the validation of the resource types Brink runs (`v1` Pods, ConfigMaps,
//! Secrets, Services and Namespaces from manifests, see [`manifest`], with pod volumes in
//! [`volumes`], the Gateway API kinds in [`gateway`], and the metadata rules every kind
//! shares in [`meta`]) and the wire formats between Brink processes ([`peer`]).
//! It does no I/O: callers hand it bytes and get typed values or a typed error that names
//! the file, the document and the field at fault. [`bootstrap`] holds the formats a node
//! joins a site with (tokens, cluster-info signatures, the CA pin).

pub mod bootstrap;
pub mod config;
pub mod gateway;
pub mod manifest;
pub mod meta;
pub mod outbound;
pub mod peer;
pub mod quantity;
pub mod sandbox;
pub mod volumes;

pub use manifest::{ManifestError, Object, PodManifest, parse_manifests};
pub use quantity::{QuantityError, parse_bytes, parse_cpu_millis};

/// The RuntimeClass wasm pods name (`runtimeClassName: brink`), with handler `brink`,
/// made at `brink server --init`.
pub const RUNTIME_CLASS: &str = "brink";
/// The label every Brink node carries, which the RuntimeClass selects; joined to a
/// cluster that also runs containers, the nodes are tainted with it too
/// (`--register-with-taints runtime.brink.dev/wasm=true:NoSchedule`), the convention
/// SpinKube and runwasi use.
pub const WASM_NODE_LABEL: &str = "runtime.brink.dev/wasm";
