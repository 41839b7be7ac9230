//! The EndpointSlice controller: for every Service with a selector, one EndpointSlice
//! (`discovery.k8s.io/v1`, managed by `endpointslice-controller.k8s.io`, owned by the
//! Service) listing the pods it selects, with their ready/serving/terminating
//! conditions, node and pod reference, and the Service's ports resolved to the pods'
//! container ports. A Brink pod has no IP of its own: its address is its node's
//! (`status.hostIP`), as the node's own Endpoints show it.
//!
//! Not done (said here): slices split at 100 endpoints, IPv6 address types, named
//! target ports that differ between pods (the first pod's number is used).

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::{Resource as _, ResourceExt as _};
use serde_json::{Value, json};

use super::{ControllerSettings, ReconcileError};

pub const COMPONENT: &str = "endpointslice-controller.k8s.io";
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";

struct Context {
    client: kube::Client,
    pods: Store<Pod>,
    /// The slices as written, so an unchanged one is not read or written again.
    slices: Store<EndpointSlice>,
    settings: ControllerSettings,
}

/// Runs the EndpointSlice controller until its watches end. Every Service is looked at
/// again when a pod changes.
pub async fn run(client: kube::Client, settings: ControllerSettings) {
    let (nudge, pod_events) = super::nudges();
    let (pods, follower) = super::follow(Api::<Pod>::all(client.clone()), nudge);
    if pods.wait_until_ready().await.is_err() {
        return;
    }
    let (slices, slice_follower) = super::follow(Api::<EndpointSlice>::all(client.clone()), || {});
    if slices.wait_until_ready().await.is_err() {
        follower.abort();
        return;
    }
    let context = Arc::new(Context {
        client: client.clone(),
        pods,
        slices,
        settings,
    });
    let controller = Controller::new(Api::<Service>::all(client.clone()), Default::default())
        .owns(Api::<EndpointSlice>::all(client), Default::default())
        .reconcile_all_on(pod_events)
        .run(reconcile, super::retry_later, context);
    super::drive(controller, "endpointslice").await;
    follower.abort();
    slice_follower.abort();
}

/// The container port a Service port's targetPort names in `pod`.
fn target_port(pod: &Pod, target: Option<&IntOrString>, port: i32) -> Option<i32> {
    match target {
        None => Some(port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

/// The slice for `service` over `pods` (those it selects), as JSON for server-side apply.
pub fn slice_for(service: &Service, pods: &[&Pod]) -> Option<Value> {
    let name = service.metadata.name.clone()?;
    let namespace = service
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let owner = service.controller_owner_ref(&())?;
    let ports: Vec<Value> = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let number = pods
                .iter()
                .find_map(|pod| target_port(pod, p.target_port.as_ref(), p.port))
                .unwrap_or(p.port);
            json!({"name": p.name.clone().unwrap_or_default(), "port": number,
                   "protocol": p.protocol.clone().unwrap_or_else(|| "TCP".into())})
        })
        .collect();
    let endpoints: Vec<Value> = pods
        .iter()
        .filter_map(|pod| {
            let ip = pod.status.as_ref()?.host_ip.clone()?;
            let ready = super::ready_since(pod).is_some();
            let terminating = pod.metadata.deletion_timestamp.is_some();
            Some(json!({
                "addresses": [ip],
                "conditions": {"ready": ready && !terminating, "serving": ready, "terminating": terminating},
                "nodeName": pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod.name_any(), "uid": pod.uid()},
            }))
        })
        .collect();
    Some(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-brink"),
            "namespace": namespace,
            "labels": {SERVICE_NAME: name, MANAGED_BY: COMPONENT},
            "ownerReferences": [owner],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }))
}

async fn reconcile(service: Arc<Service>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let Some(selector) = service.spec.as_ref().and_then(|s| s.selector.clone()) else {
        // No selector: its endpoints are the user's to write.
        return Ok(Action::await_change());
    };
    if service.metadata.deletion_timestamp.is_some() || selector.is_empty() {
        return Ok(Action::await_change());
    }
    let namespace = service.namespace().unwrap_or_else(|| "default".into());
    let state = ctx.pods.state();
    let mut selected: Vec<&Pod> = state
        .iter()
        .map(|p| p.as_ref())
        .filter(|p| p.namespace().as_deref() == Some(&namespace))
        .filter(|p| {
            let labels = p.labels();
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .collect();
    selected.sort_by_key(|p| p.name_any());
    let Some(slice) = slice_for(&service, &selected) else {
        return Ok(Action::await_change());
    };
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &namespace);
    let name = slice["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // Written only when it changed: compare with what the API holds.
    let current = ctx.slices.state().into_iter().find(|c| {
        c.metadata.namespace.as_deref() == Some(namespace.as_str())
            && c.metadata.name.as_deref() == Some(name.as_str())
    });
    let unchanged = current.as_ref().is_some_and(|c| {
        let have = serde_json::to_value(c.as_ref()).unwrap_or_default();
        have.get("endpoints").unwrap_or(&json!([])) == slice.get("endpoints").unwrap_or(&json!([]))
            && have.get("ports").unwrap_or(&json!([])) == slice.get("ports").unwrap_or(&json!([]))
    });
    if !unchanged {
        slices
            .patch(
                &name,
                &PatchParams::apply(COMPONENT).force(),
                &Patch::Apply(&slice),
            )
            .await?;
    }
    Ok(Action::requeue(ctx.settings.resync))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_lists_selected_pods_at_their_node_with_resolved_ports() {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "svc-1"},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "admin", "port": 81},
            ]},
        }))
        .expect("service");
        let pod = |name: &str, ready: bool, deleting: bool| -> Pod {
            let mut p = json!({
                "metadata": {"name": name, "namespace": "shop", "uid": format!("u-{name}")},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"hostIP": "10.0.0.1", "phase": "Running",
                           "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
            });
            if deleting {
                p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            serde_json::from_value(p).expect("pod")
        };
        let (a, b, c) = (
            pod("a", true, false),
            pod("b", false, false),
            pod("c", true, true),
        );
        let slice = slice_for(&service, &[&a, &b, &c]).expect("slice");
        assert_eq!(slice["metadata"]["labels"][SERVICE_NAME], "web");
        assert_eq!(slice["metadata"]["ownerReferences"][0]["uid"], "svc-1");
        assert_eq!(slice["ports"][0]["port"], 8080);
        assert_eq!(slice["ports"][1]["port"], 81);
        let endpoints = slice["endpoints"].as_array().expect("endpoints");
        assert_eq!(endpoints.len(), 3);
        assert_eq!(endpoints[0]["addresses"][0], "10.0.0.1");
        assert_eq!(
            endpoints[0]["conditions"],
            json!({"ready": true, "serving": true, "terminating": false})
        );
        assert_eq!(endpoints[1]["conditions"]["ready"], false);
        assert_eq!(
            endpoints[2]["conditions"],
            json!({"ready": false, "serving": true, "terminating": true})
        );
        assert_eq!(endpoints[0]["targetRef"]["name"], "a");
    }
}
