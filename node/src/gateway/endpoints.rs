//! The endpoints of this node: every running service container, with its pod's labels,
//! ports and readiness, and the resolution of a Service port to the ready ones, as
//! EndpointSlices would give it.
//!
//! Pod workers register and unregister here; the data plane rebuilds its backend map
//! when the version changes, never per request.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{ContainerPort, Service as KubeService};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::sandbox::Service;

/// A service container of a local pod.
#[derive(Clone)]
struct Registered {
    namespace: String,
    pod: String,
    labels: BTreeMap<String, String>,
    container: String,
    ports: Vec<ContainerPort>,
    /// The pod has exactly one service container (it takes any port).
    only_service: bool,
    service: Service,
}

/// Local endpoints, by pod key then container name.
pub struct Endpoints {
    inner: Mutex<Inner>,
    version: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct Inner {
    pods: HashMap<String, PodEntry>,
}

#[derive(Default)]
struct PodEntry {
    ready: bool,
    containers: BTreeMap<String, Registered>,
}

impl Default for Endpoints {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            version: tokio::sync::watch::Sender::new(0),
        }
    }
}

/// One ready endpoint a request can go to.
#[derive(Clone)]
pub struct Endpoint {
    /// `namespace/name` of the pod.
    pub pod: String,
    pub service: Service,
}

/// The ready endpoints of one Service port, picked round-robin.
pub struct EndpointSet {
    pub endpoints: Vec<Endpoint>,
    next: AtomicUsize,
}

impl EndpointSet {
    pub fn pick(&self) -> Option<&Endpoint> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }

    /// Every endpoint once, starting at the round-robin's next: the order to try them in
    /// when one hands a request back.
    pub fn in_turn(&self) -> impl Iterator<Item = &Endpoint> {
        let count = self.endpoints.len();
        let start = match count {
            0 => 0,
            _ => self.next.fetch_add(1, Ordering::Relaxed) % count,
        };
        (0..count).filter_map(move |i| self.endpoints.get((start + i) % count))
    }
}

/// Service ports (`namespace/name`, port) → ready endpoints.
pub type BackendMap = HashMap<(String, u16), Arc<EndpointSet>>;

impl Endpoints {
    /// A change counter the data plane watches.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn changed(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// A pod's service container is serving.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &self,
        pod_key: &str,
        pod: &k8s_openapi::api::core::v1::Pod,
        container: &str,
        ports: Vec<ContainerPort>,
        service_containers: usize,
        service: Service,
        ready: bool,
    ) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let entry = inner.pods.entry(pod_key.to_string()).or_default();
        entry.ready = ready;
        entry.containers.insert(
            container.to_string(),
            Registered {
                namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                pod: pod.metadata.name.clone().unwrap_or_default(),
                labels: pod.metadata.labels.clone().unwrap_or_default(),
                container: container.to_string(),
                ports,
                only_service: service_containers == 1,
                service,
            },
        );
        drop(inner);
        self.changed();
    }

    /// A container stopped serving (its pod is stopping, or it restarts).
    pub fn unregister(&self, pod_key: &str, container: &str) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let Some(entry) = inner.pods.get_mut(pod_key) else {
            return;
        };
        if entry.containers.remove(container).is_none() {
            return;
        }
        if entry.containers.is_empty() {
            inner.pods.remove(pod_key);
        }
        drop(inner);
        self.changed();
    }

    /// The pod's Ready condition changed.
    pub fn set_ready(&self, pod_key: &str, ready: bool) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let Some(entry) = inner.pods.get_mut(pod_key) else {
            return;
        };
        if entry.ready == ready {
            return;
        }
        entry.ready = ready;
        drop(inner);
        self.changed();
    }

    /// Resolves every port of `services` to the ready local endpoints.
    pub fn resolve(&self, services: &BTreeMap<String, KubeService>) -> BackendMap {
        let Ok(inner) = self.inner.lock() else {
            return BackendMap::new();
        };
        let mut pods: Vec<(&String, &PodEntry)> =
            inner.pods.iter().filter(|(_, p)| p.ready).collect();
        pods.sort_by_key(|(k, _)| *k);
        let mut out = BackendMap::new();
        for (key, service) in services {
            let Some(spec) = &service.spec else { continue };
            let namespace = service.metadata.namespace.as_deref().unwrap_or_default();
            // A Service without a selector has no endpoints Brink could know of.
            let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
                continue;
            };
            for port in spec.ports.iter().flatten() {
                if port.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                    continue;
                }
                let target = port
                    .target_port
                    .clone()
                    .unwrap_or(IntOrString::Int(port.port));
                let mut endpoints = Vec::new();
                for (_, pod) in &pods {
                    for c in pod.containers.values() {
                        if c.namespace != namespace
                            || !selector.iter().all(|(k, v)| c.labels.get(k) == Some(v))
                        {
                            continue;
                        }
                        let serves = match &target {
                            IntOrString::Int(n) => {
                                c.ports.iter().any(|p| p.container_port == *n)
                                    || (c.only_service
                                        && !pod.containers.values().any(|o| {
                                            o.container != c.container
                                                && o.ports.iter().any(|p| p.container_port == *n)
                                        }))
                            }
                            IntOrString::String(name) => {
                                c.ports.iter().any(|p| p.name.as_deref() == Some(name))
                            }
                        };
                        if serves {
                            endpoints.push(Endpoint {
                                pod: format!("{}/{}", c.namespace, c.pod),
                                service: c.service.clone(),
                            });
                            break;
                        }
                    }
                }
                if let Ok(p) = u16::try_from(port.port) {
                    out.insert(
                        (key.clone(), p),
                        Arc::new(EndpointSet {
                            endpoints,
                            next: AtomicUsize::new(0),
                        }),
                    );
                }
            }
        }
        out
    }
}
