//! Gateway API status back to the site: the status the node's data plane computed for
//! GatewayClasses, Gateways and HTTPRoutes, written through their `status`
//! subresources so `kubectl get gateway` shows it. Every node computes the same status
//! from the same objects; one writes it, so an object has one writer: the Ready node
//! with the lowest name (the next one takes over when it is not Ready any more).
//!
//! Owns only those status writes. A route's `status.parents` is written whole: on a
//! Brink site Brink is the only controller; beside another implementation its entries
//! would be replaced (a known limit, said here).

use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, Patch, PatchParams};
use ::kube::runtime::reflector::Store;
use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use gateway_api::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Node;
use serde_json::{Value, json};

use super::kube::follow;
use crate::gateway::DataPlane;

/// How the writer behaves.
#[derive(Debug, Clone)]
pub struct GatewayStatusSettings {
    pub node_name: String,
    /// How often the writer looks again when no new view came (the writer may have
    /// changed, or a write failed).
    pub recheck: Duration,
}

/// Whether `name` is the node that writes status: the Ready node with the lowest name.
pub fn is_writer(nodes: &[Arc<Node>], name: &str) -> bool {
    let ready = |n: &Node| {
        n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    nodes
        .iter()
        .filter(|n| ready(n))
        .filter_map(|n| n.metadata.name.as_deref())
        .min()
        == Some(name)
}

/// Writes `computed`'s status over `stored`'s when they differ; returns whether it wrote.
async fn write<K>(api: Api<K>, stored: &K, computed: &Value) -> Result<bool, ::kube::Error>
where
    K: ::kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let current = serde_json::to_value(stored)
        .ok()
        .and_then(|v| v.get("status").cloned());
    let wanted = computed.get("status").cloned().unwrap_or(Value::Null);
    if current.as_ref() == Some(&wanted) || wanted.is_null() {
        return Ok(false);
    }
    let name = stored.meta().name.clone().unwrap_or_default();
    let patch = json!({"metadata": {"uid": stored.meta().uid}, "status": wanted});
    let params = PatchParams {
        field_manager: Some(crate::registration::FIELD_MANAGER.into()),
        ..Default::default()
    };
    api.patch_status(&name, &params, &Patch::Merge(patch))
        .await?;
    Ok(true)
}

/// Writes the data plane's Gateway API status while this node is the writer.
pub async fn run(
    client: ::kube::Client,
    data_plane: Arc<DataPlane>,
    settings: GatewayStatusSettings,
) {
    let mut tasks = Vec::new();
    let nodes: Store<Node> = follow(&client, || {}, &mut tasks);
    let classes: Store<GatewayClass> = follow(&client, || {}, &mut tasks);
    let gateways: Store<Gateway> = follow(&client, || {}, &mut tasks);
    let routes: Store<HttpRoute> = follow(&client, || {}, &mut tasks);
    let mut updates = data_plane.view_updates();
    loop {
        tokio::select! {
            changed = updates.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(settings.recheck) => {}
        }
        if !is_writer(&nodes.state(), &settings.node_name) {
            continue;
        }
        let view = data_plane.view();
        let key = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            (m.namespace.clone(), m.name.clone())
        };
        let mut failures = 0;
        for class in &view.classes {
            let stored = classes
                .state()
                .into_iter()
                .find(|c| key(&c.metadata) == key(&class.metadata));
            if let (Some(stored), Ok(computed)) = (stored, serde_json::to_value(class)) {
                let api: Api<GatewayClass> = Api::all(client.clone());
                failures += usize::from(write(api, &stored, &computed).await.is_err());
            }
        }
        for gateway in &view.gateways {
            let stored = gateways
                .state()
                .into_iter()
                .find(|g| key(&g.metadata) == key(&gateway.metadata));
            if let (Some(stored), Ok(computed)) = (stored, serde_json::to_value(gateway)) {
                let namespace = stored.metadata.namespace.clone().unwrap_or_default();
                let api: Api<Gateway> = Api::namespaced(client.clone(), &namespace);
                failures += usize::from(write(api, &stored, &computed).await.is_err());
            }
        }
        for route in &view.routes {
            let stored = routes
                .state()
                .into_iter()
                .find(|r| key(&r.metadata) == key(&route.metadata));
            if let (Some(stored), Ok(computed)) = (stored, serde_json::to_value(route)) {
                let namespace = stored.metadata.namespace.clone().unwrap_or_default();
                let api: Api<HttpRoute> = Api::namespaced(client.clone(), &namespace);
                failures += usize::from(write(api, &stored, &computed).await.is_err());
            }
        }
        if failures > 0 {
            tracing::debug!(failures, "gateway status writes failed; trying again");
        }
    }
    for task in tasks {
        task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ready: &str) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name},
                "status": {"conditions": [{"type": "Ready", "status": ready}]},
            }))
            .expect("node"),
        )
    }

    #[test]
    fn the_lowest_ready_node_writes() {
        let nodes = [node("b", "True"), node("a", "Unknown"), node("c", "True")];
        assert!(is_writer(&nodes, "b"));
        assert!(!is_writer(&nodes, "a"));
        assert!(!is_writer(&nodes, "c"));
        assert!(!is_writer(&[], "a"));
    }
}
