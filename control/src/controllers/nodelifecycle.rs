//! The node lifecycle controller, as Kubernetes' node controller and taint-based
//! eviction do it: a node whose Lease (and Ready heartbeat) is older than the grace
//! period is marked `Ready=Unknown` ("Kubelet stopped posting node status.") and
//! tainted `node.kubernetes.io/unreachable` (NoSchedule and NoExecute); a node that says
//! it is not Ready gets `node.kubernetes.io/not-ready`; the taints go when it is Ready
//! again. Pods on a node with a NoExecute taint they do not tolerate are deleted at
//! once, those that tolerate it for `tolerationSeconds` once that has passed since the
//! taint was added (the API server gives every pod 300 s by default).
//!
//! A deleted pod on an unreachable node stays Terminating until the node comes back
//! (nobody can confirm it stopped), as in Kubernetes; its controller replaces it
//! elsewhere meanwhile, since a pod being deleted is not one of its replicas.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::reflector::Store;
use kube::{Resource as _, ResourceExt as _};
use serde_json::json;

use super::ReconcileError;

pub const COMPONENT: &str = "node-controller";
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";

/// The node controller's settings; flags of `brink server`.
#[derive(Debug, Clone)]
pub struct NodeLifecycleSettings {
    /// How long a node may go without renewing its Lease before it is Unknown
    /// (`--node-grace-period`, kube-controller-manager's node-monitor-grace-period).
    pub grace: Duration,
    /// How often nodes and pods are looked at.
    pub period: Duration,
}

impl Default for NodeLifecycleSettings {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(40),
            period: Duration::from_secs(2),
        }
    }
}

/// What the node controller decides for one node.
#[derive(Debug, PartialEq)]
pub enum Health {
    Ready,
    /// Says it is not Ready.
    NotReady,
    /// Has not been heard from for longer than the grace period.
    Unreachable,
}

/// When a node was last heard from: its Lease's renewal or its Ready heartbeat.
pub fn last_heard(node: &Node, lease: Option<&Lease>) -> Option<Timestamp> {
    let renewed = lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0);
    let heartbeat = ready_condition(node).and_then(|c| c.last_heartbeat_time.as_ref().map(|t| t.0));
    renewed.max(heartbeat)
}

fn ready_condition(node: &Node) -> Option<&NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

pub fn health(node: &Node, lease: Option<&Lease>, now: Timestamp, grace: Duration) -> Health {
    let created = node.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let heard = last_heard(node, lease).or(created);
    let silent = heard.is_none_or(|t| now.duration_since(t).as_secs_f64() > grace.as_secs_f64());
    if silent {
        return Health::Unreachable;
    }
    match ready_condition(node).map(|c| c.status.as_str()) {
        Some("True") => Health::Ready,
        _ => Health::NotReady,
    }
}

/// The node's taints with the lifecycle ones made to match `health` (kept as they are,
/// with their timeAdded, when they already do).
pub fn taints_for(current: &[Taint], health: &Health, now: Timestamp) -> Vec<Taint> {
    let wanted_key = match health {
        Health::Ready => None,
        Health::NotReady => Some(NOT_READY),
        Health::Unreachable => Some(UNREACHABLE),
    };
    let mut taints: Vec<Taint> = current
        .iter()
        .filter(|t| {
            !matches!(t.key.as_str(), UNREACHABLE | NOT_READY) || Some(t.key.as_str()) == wanted_key
        })
        .cloned()
        .collect();
    if let Some(key) = wanted_key {
        for effect in ["NoSchedule", "NoExecute"] {
            if !taints.iter().any(|t| t.key == key && t.effect == effect) {
                taints.push(Taint {
                    key: key.into(),
                    effect: effect.into(),
                    time_added: Some(Time(now)),
                    value: None,
                });
            }
        }
    }
    taints
}

fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    let effect_ok = t
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let key = t.key.as_deref().unwrap_or("");
    let key_ok = match t.operator.as_deref().unwrap_or("Equal") {
        "Exists" => key.is_empty() || key == taint.key,
        _ => {
            key == taint.key
                && t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
    };
    effect_ok && key_ok
}

/// When a pod must go from a node with these taints: now, at a time, or never.
pub fn eviction_due(pod: &Pod, taints: &[Taint]) -> Option<Timestamp> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let mut due: Option<Timestamp> = None;
    for taint in taints.iter().filter(|t| t.effect == "NoExecute") {
        let added = taint
            .time_added
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(Timestamp::UNIX_EPOCH);
        let tolerated: Vec<&Toleration> =
            tolerations.iter().filter(|t| tolerates(t, taint)).collect();
        let at = if tolerated.is_empty() {
            Some(added)
        } else if tolerated.iter().any(|t| t.toleration_seconds.is_none()) {
            None
        } else {
            let seconds = tolerated
                .iter()
                .filter_map(|t| t.toleration_seconds)
                .min()
                .unwrap_or(0)
                .max(0);
            added
                .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(seconds))
                .ok()
        };
        if let Some(at) = at {
            due = Some(due.map_or(at, |d| d.min(at)));
        }
    }
    due
}

/// Runs the node lifecycle controller until it is dropped.
pub async fn run(client: kube::Client, settings: NodeLifecycleSettings) {
    let (nodes, a) = super::follow(Api::<Node>::all(client.clone()), || {});
    let (leases, b) = super::follow(
        Api::<Lease>::namespaced(client.clone(), "kube-node-lease"),
        || {},
    );
    let (pods, c) = super::follow(Api::<Pod>::all(client.clone()), || {});
    let tasks = [a, b, c];
    let ready = futures::future::join3(
        nodes.wait_until_ready(),
        leases.wait_until_ready(),
        pods.wait_until_ready(),
    )
    .await;
    if ready.0.is_ok() && ready.1.is_ok() && ready.2.is_ok() {
        // A new leader has not watched nodes before: give every node one grace period
        // from now before calling it unreachable.
        let started = Timestamp::now();
        loop {
            if let Err(e) = pass(&client, &settings, &nodes, &leases, &pods, started).await {
                tracing::warn!(error = %e, "node controller pass failed; next pass retries");
            }
            tokio::time::sleep(settings.period).await;
        }
    }
    for task in tasks {
        task.abort();
    }
}

async fn pass(
    client: &kube::Client,
    settings: &NodeLifecycleSettings,
    nodes: &Store<Node>,
    leases: &Store<Lease>,
    pods: &Store<Pod>,
    started: Timestamp,
) -> Result<(), ReconcileError> {
    let now = Timestamp::now();
    let node_api: Api<Node> = Api::all(client.clone());
    let params = PatchParams {
        field_manager: Some(COMPONENT.into()),
        ..Default::default()
    };
    let leases = leases.state();
    let all_pods = pods.state();
    for node in nodes.state() {
        let name = node.name_any();
        let lease = leases.iter().find(|l| l.name_any() == name);
        let health = health(&node, lease.map(|l| l.as_ref()), now, settings.grace);
        if health == Health::Unreachable
            && now.duration_since(started).as_secs_f64() < settings.grace.as_secs_f64()
        {
            continue;
        }
        let current = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        if health == Health::Unreachable
            && ready_condition(&node).is_some_and(|c| c.status != "Unknown")
        {
            tracing::warn!(node = %name, "node stopped posting status: Ready=Unknown, tainted unreachable");
            let conditions: Vec<NodeCondition> = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default()
                .into_iter()
                .map(|mut c| {
                    if c.status != "Unknown" {
                        c.status = "Unknown".into();
                        c.reason = Some("NodeStatusUnknown".into());
                        c.message = Some("Kubelet stopped posting node status.".into());
                        c.last_transition_time = Some(Time(now));
                    }
                    c
                })
                .collect();
            node_api
                .patch_status(
                    &name,
                    &params,
                    &Patch::Merge(json!({"metadata": {"uid": node.uid()}, "status": {"conditions": conditions}})),
                )
                .await?;
            super::record(
                client,
                COMPONENT,
                &node.object_ref(&()),
                "Normal",
                "NodeNotReady",
                &format!("Node {name} status is now: NodeNotReady"),
            )
            .await;
        }
        let taints = taints_for(&current, &health, now);
        if taints != current {
            node_api
                .patch(
                    &name,
                    &params,
                    &Patch::Merge(
                        json!({"metadata": {"uid": node.uid()}, "spec": {"taints": taints}}),
                    ),
                )
                .await?;
        }
        // Taint-based eviction.
        for pod in all_pods.iter().filter(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
                && p.metadata.deletion_timestamp.is_none()
        }) {
            let Some(due) = eviction_due(pod, &taints) else {
                continue;
            };
            if due > now {
                continue;
            }
            let namespace = pod.namespace().unwrap_or_else(|| "default".into());
            let pods_api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
            let delete = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: pod.uid(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match pods_api.delete(&pod.name_any(), &delete).await {
                Ok(_) => {
                    tracing::info!(pod = %format!("{namespace}/{}", pod.name_any()), node = %name, "evicted: the node's NoExecute taint is not tolerated any longer");
                    super::record(
                        client,
                        "taint-eviction-controller",
                        &pod.object_ref(&()),
                        "Normal",
                        "TaintManagerEviction",
                        &format!("Marking for deletion Pod {namespace}/{}", pod.name_any()),
                    )
                    .await;
                }
                Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(ready: &str, heartbeat: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"conditions": [{"type": "Ready", "status": ready, "lastHeartbeatTime": heartbeat}]},
        }))
        .expect("node")
    }

    fn lease(renewed: &str) -> Lease {
        serde_json::from_value(json!({"metadata": {"name": "n"}, "spec": {"renewTime": renewed}}))
            .expect("lease")
    }

    fn at(t: &str) -> Timestamp {
        t.parse().expect("time")
    }

    #[test]
    fn a_node_is_heard_through_its_lease_or_its_heartbeat() {
        let grace = Duration::from_secs(40);
        let now = at("2026-01-01T01:00:00Z");
        let old = node("True", "2026-01-01T00:00:00Z");
        assert_eq!(health(&old, None, now, grace), Health::Unreachable);
        let renewed = lease("2026-01-01T00:59:50.000000Z");
        assert_eq!(health(&old, Some(&renewed), now, grace), Health::Ready);
        let down = node("False", "2026-01-01T00:59:59Z");
        assert_eq!(health(&down, None, now, grace), Health::NotReady);
    }

    #[test]
    fn lifecycle_taints_follow_health_and_keep_their_time() {
        let t0 = at("2026-01-01T00:00:00Z");
        let t1 = at("2026-01-01T00:01:00Z");
        let other = Taint {
            key: "dedicated".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        let unreachable = taints_for(std::slice::from_ref(&other), &Health::Unreachable, t0);
        assert_eq!(unreachable.len(), 3);
        assert!(
            unreachable
                .iter()
                .any(|t| t.key == UNREACHABLE && t.effect == "NoExecute")
        );
        // Still unreachable later: unchanged, times kept.
        assert_eq!(
            taints_for(&unreachable, &Health::Unreachable, t1),
            unreachable
        );
        let back = taints_for(&unreachable, &Health::Ready, t1);
        assert_eq!(back, vec![other.clone()]);
        let not_ready = taints_for(&unreachable, &Health::NotReady, t1);
        assert!(not_ready.iter().all(|t| t.key != UNREACHABLE));
        assert!(not_ready.iter().any(|t| t.key == NOT_READY));
    }

    #[test]
    fn pods_go_when_their_toleration_runs_out() {
        let t0 = at("2026-01-01T00:00:00Z");
        let taints = taints_for(&[], &Health::Unreachable, t0);
        let pod = |tolerations: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": [], "tolerations": tolerations}}))
                .expect("pod")
        };
        assert_eq!(eviction_due(&pod(json!([])), &taints), Some(t0));
        let five = pod(
            json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}]),
        );
        assert_eq!(
            eviction_due(&five, &taints),
            Some(at("2026-01-01T00:00:05Z"))
        );
        let forever =
            pod(json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"}]));
        assert_eq!(eviction_due(&forever, &taints), None);
        assert_eq!(eviction_due(&pod(json!([])), &[]), None);
    }
}
