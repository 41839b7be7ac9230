//! The DaemonSet controller: one pod per eligible node, new nodes included, as the
//! Kubernetes DaemonSet controller does since 1.12: each pod names its node through a
//! required node affinity on `metadata.name` and carries the DaemonSet tolerations
//! (not-ready, unreachable, unschedulable and the pressure taints), and the scheduler
//! binds it. A node is eligible when the pod's nodeSelector, node affinity and taints
//! allow it (a node that is not Ready is tainted not-ready:NoSchedule, which daemons do
//! not tolerate, so it gets its pod once it is Ready). A changed template replaces pods one node at a time while the others are
//! available (RollingUpdate with maxUnavailable 1); OnDelete leaves them.
//!
//! Not done (said here): maxUnavailable/maxSurge other than 1/0, ControllerRevisions
//! (`kubectl rollout history daemonset` shows nothing).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, Pod, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::{Resource as _, ResourceExt as _};
use serde_json::json;

use super::{ControllerSettings, ReconcileError, is_active, is_available, safe_hash};

pub const COMPONENT: &str = "daemonset-controller";
pub const REVISION_HASH: &str = "controller-revision-hash";

struct Context {
    client: kube::Client,
    pods: Store<Pod>,
    nodes: Store<Node>,
    settings: ControllerSettings,
    expectations: super::Expectations,
}

/// Runs the DaemonSet controller until its watches end. Every DaemonSet is looked at
/// again when a node changes (a new node needs its pod).
pub async fn run(client: kube::Client, settings: ControllerSettings) {
    let Some((pods, pod_follower)) = super::pod_store(&client).await else {
        return;
    };
    let (nudge, node_events) = super::nudges();
    let (nodes, node_follower) = super::follow(Api::<Node>::all(client.clone()), nudge);
    if nodes.wait_until_ready().await.is_err() {
        return;
    }
    let context = Arc::new(Context {
        client: client.clone(),
        pods,
        nodes,
        settings,
        expectations: Default::default(),
    });
    let controller = Controller::new(Api::<DaemonSet>::all(client.clone()), Default::default())
        .owns(Api::<Pod>::all(client), Default::default())
        .reconcile_all_on(node_events)
        .run(reconcile, super::retry_later, context);
    super::drive(controller, "daemonset").await;
    pod_follower.abort();
    node_follower.abort();
}

/// The tolerations every DaemonSet pod gets, as Kubernetes adds them.
fn daemon_tolerations() -> Vec<Toleration> {
    let exists = |key: &str, effect: &str| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Default::default()
    };
    vec![
        exists("node.kubernetes.io/not-ready", "NoExecute"),
        exists("node.kubernetes.io/unreachable", "NoExecute"),
        exists("node.kubernetes.io/disk-pressure", "NoSchedule"),
        exists("node.kubernetes.io/memory-pressure", "NoSchedule"),
        exists("node.kubernetes.io/pid-pressure", "NoSchedule"),
        exists("node.kubernetes.io/unschedulable", "NoSchedule"),
    ]
}

/// The hash of a DaemonSet's template, which names its pods' revision.
pub fn template_hash(ds: &DaemonSet) -> String {
    let template = ds.spec.as_ref().map(|s| &s.template);
    safe_hash(&serde_json::to_vec(&template).unwrap_or_default())
}

/// The DaemonSet's pod for `node`: its template, pinned to the node, tolerating what
/// daemons tolerate.
fn pod_for(ds: &DaemonSet, node: &str, hash: &str) -> Result<Pod, ReconcileError> {
    let template = ds
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .ok_or_else(|| ReconcileError::Invalid("the DaemonSet has no spec".into()))?;
    let owner = ds
        .controller_owner_ref(&())
        .ok_or_else(|| ReconcileError::Invalid("the DaemonSet has no name or uid".into()))?;
    let meta = template.metadata.unwrap_or_default();
    let mut labels = meta.labels.unwrap_or_default();
    labels.insert(REVISION_HASH.into(), hash.into());
    let mut spec = template.spec.unwrap_or_default();
    let mut tolerations = spec.tolerations.take().unwrap_or_default();
    for t in daemon_tolerations() {
        if !tolerations.contains(&t) {
            tolerations.push(t);
        }
    }
    spec.tolerations = Some(tolerations);
    let mut affinity = serde_json::to_value(spec.affinity.take()).unwrap_or(json!(null));
    if !affinity.is_object() {
        affinity = json!({});
    }
    affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = json!({
        "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}],
    });
    spec.affinity = serde_json::from_value(affinity).ok();
    Ok(Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", ds.name_any())),
            namespace: ds.namespace(),
            labels: Some(labels),
            annotations: meta.annotations,
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// The node a DaemonSet pod is for: where it is bound, or where its affinity pins it.
fn node_of(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(node) = spec.node_name.clone().filter(|n| !n.is_empty()) {
        return Some(node);
    }
    let terms = &spec
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms.iter().find_map(|t| {
        t.match_fields
            .iter()
            .flatten()
            .find(|f| f.key == "metadata.name" && f.operator == "In")
            .and_then(|f| f.values.as_ref()?.first().cloned())
    })
}

/// Whether the DaemonSet's pod may run on `node` (its selector, affinity and taints;
/// resources are the scheduler's to judge).
fn eligible(ds: &DaemonSet, node: &Node, hash: &str) -> bool {
    let name = node.metadata.name.clone().unwrap_or_default();
    let Ok(pod) = pod_for(ds, &name, hash) else {
        return false;
    };
    let info = crate::scheduler::fit::NodeInfo::new(node.clone());
    crate::scheduler::fit::misfits(&pod, &info)
        .iter()
        .all(|r| r.starts_with("Insufficient") || r == "Too many pods" || r.contains("free ports"))
}

async fn reconcile(ds: Arc<DaemonSet>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    if ds.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = ds.namespace().unwrap_or_else(|| "default".into());
    let uid = ds.uid().unwrap_or_default();
    let hash = template_hash(&ds);
    let state = super::owned_pods(&ctx.pods, &namespace, &uid);
    let owned: Vec<&Pod> = state.iter().map(|p| p.as_ref()).collect();
    let seen: BTreeSet<String> = owned.iter().map(|p| p.name_any()).collect();
    let live: BTreeSet<String> = owned
        .iter()
        .filter(|p| is_active(p))
        .map(|p| p.name_any())
        .collect();
    let (expected, deleting) =
        ctx.expectations
            .settle(&uid, &seen, &live, ctx.settings.expectation_timeout);
    let nodes: Vec<Arc<Node>> = ctx.nodes.state();
    let wanted: BTreeSet<String> = nodes
        .iter()
        .filter(|n| eligible(&ds, n, &hash))
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let mut by_node: BTreeMap<String, Vec<&Pod>> = BTreeMap::new();
    for pod in owned
        .iter()
        .filter(|p| is_active(p) && !deleting.contains(&p.name_any()))
    {
        if let Some(node) = node_of(pod) {
            by_node.entry(node).or_default().push(pod);
        }
    }
    let reference = ds.object_ref(&());
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let delete = |pod: &Pod| {
        let pods = pods.clone();
        let (name, pod_uid) = (pod.name_any(), pod.uid());
        async move {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: pod_uid,
                    resource_version: None,
                }),
                ..Default::default()
            };
            match pods.delete(&name, &params).await {
                Ok(_) | Err(kube::Error::Api(_)) => Ok(name),
                Err(e) => Err(e),
            }
        }
    };
    // Pods on nodes that should not have one, and extra pods on a node, go.
    for (node, list) in &by_node {
        let extra = if wanted.contains(node) { 1 } else { 0 };
        for pod in list.iter().skip(extra) {
            let name = delete(pod).await?;
            ctx.expectations.deleted(&uid, &name);
            super::record(
                &ctx.client,
                COMPONENT,
                &reference,
                "Normal",
                "SuccessfulDelete",
                &format!("Deleted pod: {name}"),
            )
            .await;
        }
    }
    // Nodes without one get one (unless one was just made and the watch is behind).
    if expected == 0 {
        for node in wanted.iter().filter(|n| !by_node.contains_key(*n)) {
            let pod = pod_for(&ds, node, &hash)?;
            let created = pods.create(&PostParams::default(), &pod).await?;
            ctx.expectations.created(&uid, &created.name_any());
            super::record(
                &ctx.client,
                COMPONENT,
                &reference,
                "Normal",
                "SuccessfulCreate",
                &format!("Created pod: {}", created.name_any()),
            )
            .await;
        }
    }
    // A new template: one old pod at a time, while every other pod is available.
    let now = k8s_openapi::jiff::Timestamp::now();
    let min_ready = ds
        .spec
        .as_ref()
        .and_then(|s| s.min_ready_seconds)
        .unwrap_or(0);
    let current: Vec<&Pod> = wanted
        .iter()
        .filter_map(|n| by_node.get(n).and_then(|l| l.first().copied()))
        .collect();
    let rolling = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.type_.as_deref())
        .is_none_or(|t| t == "RollingUpdate");
    let unavailable = current
        .iter()
        .filter(|p| !is_available(p, min_ready, now))
        .count()
        + wanted.len().saturating_sub(current.len());
    if rolling
        && unavailable == 0
        && expected == 0
        && deleting.is_empty()
        && let Some(old) = current
            .iter()
            .find(|p| p.labels().get(REVISION_HASH) != Some(&hash))
    {
        let name = delete(old).await?;
        ctx.expectations.deleted(&uid, &name);
    }
    let updated = current
        .iter()
        .filter(|p| p.labels().get(REVISION_HASH) == Some(&hash))
        .count();
    let ready = current
        .iter()
        .filter(|p| super::ready_since(p).is_some())
        .count();
    let available = current
        .iter()
        .filter(|p| is_available(p, min_ready, now))
        .count();
    let misscheduled = by_node.keys().filter(|n| !wanted.contains(*n)).count();
    let status = json!({
        "desiredNumberScheduled": wanted.len(),
        "currentNumberScheduled": current.len(),
        "numberMisscheduled": misscheduled,
        "numberReady": ready,
        "numberAvailable": available,
        "numberUnavailable": wanted.len() - available.min(wanted.len()),
        "updatedNumberScheduled": updated,
        "observedGeneration": ds.metadata.generation,
    });
    let stored = ds.status.as_ref().map(|s| {
        json!({
            "desiredNumberScheduled": s.desired_number_scheduled,
            "currentNumberScheduled": s.current_number_scheduled,
            "numberMisscheduled": s.number_misscheduled,
            "numberReady": s.number_ready,
            "numberAvailable": s.number_available.unwrap_or(0),
            "numberUnavailable": s.number_unavailable.unwrap_or(0),
            "updatedNumberScheduled": s.updated_number_scheduled.unwrap_or(0),
            "observedGeneration": s.observed_generation,
        })
    });
    if stored.as_ref() != Some(&status) {
        let sets: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &namespace);
        super::write_status(&sets, &ds.name_any(), &uid, COMPONENT, status).await?;
    }
    let settled = available == wanted.len() && updated == wanted.len() && misscheduled == 0;
    Ok(Action::requeue(if settled {
        ctx.settings.resync
    } else {
        ctx.settings.settle
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds(extra: serde_json::Value) -> DaemonSet {
        let mut v = json!({
            "metadata": {"name": "agent", "namespace": "kube-system", "uid": "ds-1"},
            "spec": {"selector": {"matchLabels": {"app": "agent"}},
                     "template": {"metadata": {"labels": {"app": "agent"}},
                                  "spec": {"containers": [{"name": "c", "image": "i"}]}}},
        });
        json_patch::merge(&mut v, &extra);
        serde_json::from_value(v).expect("daemonset")
    }

    fn node(name: &str, extra: serde_json::Value) -> Node {
        let mut v = json!({"metadata": {"name": name, "labels": {"zone": "a"}},
                           "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        json_patch::merge(&mut v, &extra);
        serde_json::from_value(v).expect("node")
    }

    #[test]
    fn a_daemon_pod_is_pinned_to_its_node_and_tolerates_what_daemons_do() {
        let d = ds(json!({}));
        let hash = template_hash(&d);
        let pod = pod_for(&d, "n1", &hash).expect("pod");
        assert_eq!(node_of(&pod).as_deref(), Some("n1"));
        assert_eq!(pod.labels().get(REVISION_HASH), Some(&hash));
        let tolerations = pod
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.clone())
            .unwrap_or_default();
        assert!(
            tolerations
                .iter()
                .any(|t| t.key.as_deref() == Some("node.kubernetes.io/unschedulable"))
        );
    }

    #[test]
    fn eligibility_follows_selectors_taints_and_readiness_but_not_cordons() {
        let d = ds(json!({}));
        let hash = template_hash(&d);
        assert!(eligible(&d, &node("n1", json!({})), &hash));
        let down = node(
            "n2",
            json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        );
        assert!(
            !eligible(&d, &down, &hash),
            "not-ready is NoSchedule; daemons tolerate only NoExecute"
        );
        let cordoned = node("n3", json!({"spec": {"unschedulable": true}}));
        assert!(eligible(&d, &cordoned, &hash));
        let tainted = node(
            "n4",
            json!({"spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}}),
        );
        assert!(!eligible(&d, &tainted, &hash));
        let picky = ds(json!({"spec": {"template": {"spec": {"nodeSelector": {"zone": "b"}}}}}));
        assert!(!eligible(
            &picky,
            &node("n1", json!({})),
            &template_hash(&picky)
        ));
    }
}
