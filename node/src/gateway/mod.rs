//! The Gateway API data plane of a node: Gateways' listeners served on this node, with
//! HTTPRoutes matched by the spec's precedence and sent to the ready pods of the
//! Services they name.
//!
//! Owns: compiling objects into route tables and status
//! ([`compile`], [`table`]), the listener ports ([`listeners`]), the request path
//! ([`proxy`]) and the local endpoints ([`endpoints`]). It must not touch pods: workers
//! register their service containers in [`Endpoints`], and the data plane only reads them.
//!
//! Every change (objects, Secrets, endpoints) builds a new table that is swapped in whole;
//! requests in flight finish on the table they started with.

pub mod compile;
pub mod endpoints;
pub mod listeners;
pub mod proxy;
pub mod table;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;
use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use gateway_api::httproutes::HttpRoute;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;

pub use endpoints::Endpoints;

use crate::source::{ConfigObjects, GatewayObjects};

/// The `controllerName` Brink's GatewayClasses carry unless configured otherwise.
pub const DEFAULT_CONTROLLER_NAME: &str = "brink.dev/gateway-controller";

/// The data plane's settings.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// GatewayClasses with this `controllerName` are this node's.
    pub controller_name: String,
    /// The address gateway ports are opened on.
    pub bind_address: IpAddr,
    /// The address written into Gateways' `status.addresses`.
    pub advertise_address: IpAddr,
    /// How gateway ports treat connections: drain, header and handshake deadlines, header
    /// size.
    pub limits: listeners::ConnectionLimits,
    /// How long a port that could not be opened waits before the next try. Without it a
    /// port taken for a moment (say by another process while this node restarted) would
    /// stay closed until some object changed.
    pub port_retry: std::time::Duration,
}

/// Objects as `brink get` shows them: spec and metadata as given, status as computed.
#[derive(Debug, Clone, Default)]
pub struct StatusView {
    pub classes: Vec<GatewayClass>,
    pub gateways: Vec<Gateway>,
    pub routes: Vec<HttpRoute>,
    pub services: Vec<k8s_openapi::api::core::v1::Service>,
}

/// The node's gateway data plane.
pub struct DataPlane {
    settings: GatewaySettings,
    shared: Arc<listeners::Shared>,
    pub endpoints: Arc<Endpoints>,
    objects: watch::Sender<Arc<GatewayObjects>>,
    view: RwLock<Arc<StatusView>>,
    /// Counts the views built, so a status writer waits for a new one.
    view_updates: watch::Sender<u64>,
    /// Whether the source has given objects yet (they may come before `run` subscribes).
    objects_given: std::sync::atomic::AtomicBool,
}

impl DataPlane {
    pub fn new(settings: GatewaySettings, metrics: Arc<crate::metrics::Metrics>) -> Arc<Self> {
        Arc::new(Self {
            settings,
            shared: Arc::new(listeners::Shared {
                table: ArcSwap::from_pointee(table::RouteTable::default()),
                backends: ArcSwap::from_pointee(endpoints::BackendMap::new()),
                metrics,
            }),
            endpoints: Arc::new(Endpoints::default()),
            objects: watch::Sender::new(Arc::default()),
            view: RwLock::new(Arc::default()),
            view_updates: watch::Sender::new(0),
            objects_given: Default::default(),
        })
    }

    /// The source's latest objects.
    pub fn set_objects(&self, objects: GatewayObjects) {
        self.objects_given
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.objects.send_if_modified(|current| {
            if **current == objects {
                return false;
            }
            *current = Arc::new(objects);
            true
        });
    }

    /// The objects with their status.
    pub fn view(&self) -> Arc<StatusView> {
        self.view.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// Changes each time a new view is built.
    pub fn view_updates(&self) -> watch::Receiver<u64> {
        self.view_updates.subscribe()
    }

    /// Every Service's ready local endpoints, as `v1` Endpoints (pods have no IP of their
    /// own here: each address is the node's, with the pod as its `targetRef`).
    pub fn endpoints(&self) -> Vec<k8s_openapi::api::core::v1::Endpoints> {
        use k8s_openapi::api::core::v1::{
            EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference,
        };
        let view = self.view();
        let backends = self.shared.backends.load();
        view.services
            .iter()
            .map(|service| {
                let key = brink_proto::manifest::object_key(&service.metadata);
                let ports = service
                    .spec
                    .as_ref()
                    .and_then(|s| s.ports.clone())
                    .unwrap_or_default();
                let subsets: Vec<EndpointSubset> = ports
                    .iter()
                    .filter_map(|port| {
                        let set = backends.get(&(key.clone(), u16::try_from(port.port).ok()?))?;
                        (!set.endpoints.is_empty()).then(|| EndpointSubset {
                            addresses: Some(
                                set.endpoints
                                    .iter()
                                    .map(|e| {
                                        let (namespace, name) =
                                            e.pod.split_once('/').unwrap_or(("", &e.pod));
                                        EndpointAddress {
                                            ip: self.settings.advertise_address.to_string(),
                                            target_ref: Some(ObjectReference {
                                                kind: Some("Pod".into()),
                                                namespace: Some(namespace.into()),
                                                name: Some(name.into()),
                                                ..Default::default()
                                            }),
                                            ..Default::default()
                                        }
                                    })
                                    .collect(),
                            ),
                            ports: Some(vec![EndpointPort {
                                name: port.name.clone(),
                                port: port.port,
                                protocol: port.protocol.clone(),
                                ..Default::default()
                            }]),
                            ..Default::default()
                        })
                    })
                    .collect();
                Endpoints {
                    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                        name: service.metadata.name.clone(),
                        namespace: service.metadata.namespace.clone(),
                        creation_timestamp: service.metadata.creation_timestamp.clone(),
                        ..Default::default()
                    },
                    subsets: (!subsets.is_empty()).then_some(subsets),
                }
            })
            .collect()
    }

    /// Runs until `shutdown` resolves, rebuilding on every change; then closes the ports.
    pub async fn run(
        self: Arc<Self>,
        mut config: watch::Receiver<Arc<ConfigObjects>>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut objects_rx = self.objects.subscribe();
        // Objects the source gave before this subscribed would not count as a change.
        if self.objects_given.load(std::sync::atomic::Ordering::SeqCst) {
            objects_rx.mark_changed();
        }
        let mut endpoints_rx = self.endpoints.subscribe();
        let mut ports = listeners::Listeners::new(
            self.settings.bind_address,
            self.settings.limits,
            self.shared.clone(),
        );
        let mut previous = StatusView::default();
        let mut services = BTreeMap::new();
        tokio::pin!(shutdown);
        // Nothing is compiled before the source has said what it wants: after a restart
        // the first table is built from the objects, not from nothing.
        let mut source_seen = false;
        let mut objects_changed = false;
        // Set while some port could not be opened: when to try again.
        let mut retry_ports_at: Option<tokio::time::Instant> = None;
        loop {
            if objects_changed {
                let objects = GatewayObjects::clone(&objects_rx.borrow_and_update());
                let secrets = config.borrow_and_update().secrets.clone();
                let settings = self.settings.clone();
                let objects = Arc::new(objects);
                let compiled = {
                    let objects = objects.clone();
                    tokio::task::spawn_blocking(move || {
                        compile::compile(&compile::Inputs {
                            objects: &objects,
                            secrets: &secrets,
                            controller: &settings.controller_name,
                            address: settings.advertise_address,
                            now: Timestamp::now(),
                        })
                    })
                    .await
                };
                let Ok(mut compiled) = compiled else {
                    // A bug, not input: keep serving the last good table.
                    tracing::error!("gateway compile panicked; keeping the previous table");
                    objects_changed = false;
                    continue;
                };
                let bind_errors = ports.apply(&compiled.ports).await;
                retry_ports_at = (!bind_errors.is_empty())
                    .then(|| tokio::time::Instant::now() + self.settings.port_retry);
                let now = Timestamp::now();
                let gateway_status = compiled.finish(&bind_errors, now);
                let ports_plan = std::mem::take(&mut compiled.ports);
                let table = table::RouteTable {
                    ports: ports_plan
                        .into_iter()
                        .map(|(p, plan)| (p, plan.table))
                        .collect(),
                };
                self.shared.table.store(Arc::new(table));
                services = objects.services.clone();
                self.shared
                    .backends
                    .store(Arc::new(self.endpoints.resolve(&services)));
                let view = build_view(&objects, &compiled, gateway_status, &previous);
                tracing::info!(
                    gateways = view.gateways.len(),
                    routes = view.routes.len(),
                    ports = self.shared.table.load().ports.len(),
                    "gateway data plane updated"
                );
                previous = view.clone();
                if let Ok(mut v) = self.view.write() {
                    *v = Arc::new(view);
                }
                self.view_updates.send_modify(|n| *n = n.wrapping_add(1));
            }
            tokio::select! {
                changed = objects_rx.changed() => {
                    if changed.is_err() { break; }
                    source_seen = true;
                    objects_changed = true;
                }
                changed = config.changed() => {
                    if changed.is_err() { break; }
                    objects_changed = source_seen;
                }
                changed = endpoints_rx.changed() => {
                    if changed.is_err() { break; }
                    endpoints_rx.borrow_and_update();
                    self.shared.backends.store(Arc::new(self.endpoints.resolve(&services)));
                    objects_changed = false;
                }
                () = async {
                    match retry_ports_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    // Rebuilding from the same objects tries the closed ports again and
                    // rewrites the status when one opens.
                    objects_changed = true;
                }
                () = &mut shutdown => break,
            }
        }
        ports.close_all().await;
    }
}

/// The objects with their new status, `lastTransitionTime`s carried from `previous`.
fn build_view(
    objects: &GatewayObjects,
    compiled: &compile::Compiled,
    gateway_status: BTreeMap<String, gateway_api::gateways::GatewayStatus>,
    previous: &StatusView,
) -> StatusView {
    let key = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        brink_proto::manifest::object_key(m)
    };
    let mut view = StatusView {
        services: objects.services.values().cloned().collect(),
        ..StatusView::default()
    };
    for (name, class) in &objects.classes {
        let mut class = class.clone();
        if let Some(mut status) = compiled.classes.get(name).cloned() {
            let old = previous
                .classes
                .iter()
                .find(|c| c.metadata.name == class.metadata.name)
                .and_then(|c| c.status.as_ref())
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            if let Some(conditions) = status.conditions.as_mut() {
                compile::carry_transition_times(&old, conditions);
            }
            class.status = Some(status);
        }
        view.classes.push(class);
    }
    for (k, gateway) in &objects.gateways {
        let mut gateway = gateway.clone();
        if let Some(mut status) = gateway_status.get(k).cloned() {
            let old = previous
                .gateways
                .iter()
                .find(|g| key(&g.metadata) == *k)
                .and_then(|g| g.status.clone())
                .unwrap_or_default();
            if let Some(conditions) = status.conditions.as_mut() {
                compile::carry_transition_times(
                    old.conditions.as_deref().unwrap_or_default(),
                    conditions,
                );
            }
            for listener in status.listeners.iter_mut().flatten() {
                if let Some(old_listener) = old
                    .listeners
                    .iter()
                    .flatten()
                    .find(|l| l.name == listener.name)
                {
                    compile::carry_transition_times(
                        &old_listener.conditions,
                        &mut listener.conditions,
                    );
                }
            }
            gateway.status = Some(status);
        }
        view.gateways.push(gateway);
    }
    for (k, manifest) in &objects.routes {
        let mut route = manifest.route.clone();
        if let Some(mut status) = compiled.routes.get(k).cloned() {
            let old = previous
                .routes
                .iter()
                .find(|r| key(&r.metadata) == *k)
                .and_then(|r| r.status.clone())
                .unwrap_or_default();
            for parent in &mut status.parents {
                if let Some(old_parent) = old
                    .parents
                    .iter()
                    .find(|p| p.parent_ref == parent.parent_ref)
                {
                    compile::carry_transition_times(&old_parent.conditions, &mut parent.conditions);
                }
            }
            route.status = Some(status);
        }
        view.routes.push(route);
    }
    view
}
