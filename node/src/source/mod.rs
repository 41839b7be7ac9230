//! Where a node's pods come from. A [`PodSource`] yields the complete desired set of pods
//! (and the ConfigMaps and Secrets their volumes read, and the Gateway API objects its
//! data plane serves) each time it changes, like a kubelet config source's SET
//! operation; the agent reconciles against it.
//!
//! Owns: the desired-state types every other module reads ([`DesiredPods`],
//! [`ConfigObjects`], [`GatewayObjects`]), the sources ([`ManifestDir`] reads manifests
//! from a directory, [`kube::SitePods`] takes the pods a site binds to this node), and
//! where pod status goes ([`StatusSink`]; [`kube::SiteStatus`] writes it to the site,
//! [`gateway_status`] the data plane's Gateway API status). It must not touch
//! running pods, sandboxes or ports: it says what is wanted and carries status away.

pub mod gateway_status;
pub mod kube;
pub mod manifest_dir;
pub mod pod_events;
pub mod stamps;
pub mod status;

use std::collections::BTreeMap;

use brink_proto::PodManifest;
use brink_proto::gateway::RouteManifest;
use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use gateway_api::referencegrants::ReferenceGrant;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};

pub use manifest_dir::ManifestDir;
pub use status::StatusSink;

/// The pods a source wants running, the objects their volumes may read, and what it could
/// not read.
#[derive(Debug, Clone, Default)]
pub struct DesiredPods {
    pub pods: Vec<PodManifest>,
    pub config: ConfigObjects,
    /// Gateway API objects and the Services and Namespaces they refer to.
    pub gateway: GatewayObjects,
    /// One line per source that failed (file, document, field, message).
    pub errors: Vec<String>,
}

/// ConfigMaps and Secrets by `namespace/name`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigObjects {
    pub config_maps: BTreeMap<String, ConfigMap>,
    pub secrets: BTreeMap<String, Secret>,
}

/// Everything the Gateway data plane is computed from, by key (`namespace/name`, or
/// `name` for cluster-scoped kinds).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GatewayObjects {
    pub classes: BTreeMap<String, GatewayClass>,
    pub gateways: BTreeMap<String, Gateway>,
    pub routes: BTreeMap<String, RouteManifest>,
    pub services: BTreeMap<String, Service>,
    pub grants: BTreeMap<String, ReferenceGrant>,
    pub namespaces: BTreeMap<String, Namespace>,
}

/// A source of desired pods.
pub trait PodSource: Send + 'static {
    /// Waits for the next change and returns the complete desired set; None when the
    /// source has ended.
    fn next(&mut self) -> impl std::future::Future<Output = Option<DesiredPods>> + Send;
}
