//! The scheduler: places pods that name no node on a node that fits them, as
//! kube-scheduler does, through the public API only (watches of Nodes and Pods, a
//! `pods/binding` per pod, Events). A binding is one raft compare-and-set in the API
//! server (a pod already bound answers 409), so a pod is bound at most once however many
//! schedulers race. On a site it runs on the raft leader and moves with leadership
//! ([`run_while_leading`]); `brink scheduler --kubeconfig` runs the same loop anywhere.
//!
//! Owns: the choice of node ([`fit`] filters and scores), the binding, the `Scheduled`
//! and `FailedScheduling` Events and the pod's `PodScheduled` condition while it waits.
//! Must not touch the store, raft or a node: it is an API client like any other.

pub mod fit;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::Notify;

use fit::NodeInfo;

/// The name pods ask for in `spec.schedulerName` (or leave empty).
pub const SCHEDULER_NAME: &str = "default-scheduler";

/// The scheduler's settings; each is a flag of `brink server` and `brink scheduler`.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    /// How often pods that fit nowhere are tried again when nothing changed (a change
    /// to any node or pod tries them at once).
    pub retry: Duration,
    /// Bindings in flight at once.
    pub parallel_bindings: usize,
    /// How often a member that is not the leader looks whether it has become it.
    pub leader_poll: Duration,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self {
            retry: Duration::from_secs(10),
            parallel_bindings: 16,
            leader_poll: Duration::from_millis(250),
        }
    }
}

/// Runs the scheduler while `leading()` says this member leads, stopping it (and
/// dropping what it saw) the moment it does not.
pub async fn run_while_leading(
    client: kube::Client,
    settings: SchedulerSettings,
    leading: impl Fn() -> bool + Send + Sync + 'static,
) {
    crate::leading::while_leading("scheduler", settings.leader_poll, leading, || {
        run(client.clone(), settings.clone())
    })
    .await
}

/// Whether the scheduler should place this pod.
fn waiting(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    spec.is_some_and(|s| s.node_name.as_deref().is_none_or(str::is_empty))
        && spec
            .and_then(|s| s.scheduler_name.as_deref())
            .is_none_or(|n| n.is_empty() || n == SCHEDULER_NAME)
        && pod.metadata.deletion_timestamp.is_none()
        && !matches!(phase, Some("Succeeded" | "Failed"))
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// What one pass decided for a pod.
enum Decision {
    Bind(String),
    Unschedulable(String),
}

/// Places each waiting pod, oldest first, counting the pods placed before it.
fn decide(
    nodes: &[Arc<Node>],
    pods: &[Arc<Pod>],
    assumed: &HashMap<String, String>,
) -> Vec<(Arc<Pod>, Decision)> {
    let mut infos: BTreeMap<String, NodeInfo> = nodes
        .iter()
        .filter_map(|n| Some((n.metadata.name.clone()?, NodeInfo::new(Node::clone(n)))))
        .collect();
    let mut queue = Vec::new();
    for pod in pods {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        let bound = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty())
            .or_else(|| assumed.get(uid).cloned());
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        match bound {
            Some(node) if !matches!(phase, Some("Succeeded" | "Failed")) => {
                if let Some(info) = infos.get_mut(&node) {
                    info.add(pod);
                }
            }
            Some(_) => {}
            None if waiting(pod) => queue.push(pod.clone()),
            None => {}
        }
    }
    queue.sort_by(|a, b| {
        let at = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        at(a).cmp(&at(b)).then_with(|| pod_key(a).cmp(&pod_key(b)))
    });
    let mut out = Vec::with_capacity(queue.len());
    for pod in queue {
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        let mut best: Option<((i64, i64), &str)> = None;
        for (name, info) in &infos {
            let misfits = fit::misfits(&pod, info);
            if misfits.is_empty() {
                let score = fit::score(&pod, info);
                // Ties go to the first name, so a pass is deterministic.
                if best.is_none_or(|(s, _)| score > s) {
                    best = Some((score, name));
                }
            } else {
                for reason in misfits {
                    *reasons.entry(reason).or_default() += 1;
                }
            }
        }
        let decision = match best {
            Some((_, name)) => {
                let name = name.to_owned();
                if let Some(info) = infos.get_mut(&name) {
                    info.add(&pod);
                }
                Decision::Bind(name)
            }
            None => Decision::Unschedulable(fit::explain(infos.len(), &reasons)),
        };
        out.push((pod, decision));
    }
    out
}

fn now_time() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

async fn record(client: &kube::Client, pod: &Pod, kind: &str, reason: &str, message: &str) {
    use kube::Resource as _;
    crate::controllers::record(
        client,
        SCHEDULER_NAME,
        &pod.object_ref(&()),
        kind,
        reason,
        message,
    )
    .await;
}

/// Binds `pod` to `node`: Ok(true) when bound, Ok(false) when someone else bound it (or
/// it is gone), Err when the API could not be reached.
async fn bind(client: &kube::Client, pod: &Pod, node: &str) -> Result<bool, kube::Error> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "namespace": namespace, "uid": pod.metadata.uid},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    match pods
        .create_subresource::<_, serde_json::Value>(
            "binding",
            name,
            &PostParams::default(),
            &binding,
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409 | 422) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Marks a pod that fits nowhere as kube-scheduler does (`PodScheduled=False`,
/// reason `Unschedulable`), so `kubectl get` and `describe` say why it waits.
async fn mark_unschedulable(client: &kube::Client, pod: &Pod, message: &str) {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let patch = json!({
        "metadata": {"uid": pod.metadata.uid},
        "status": {"conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": message, "lastTransitionTime": now_time(),
        }]},
    });
    let params = PatchParams {
        field_manager: Some(SCHEDULER_NAME.into()),
        ..Default::default()
    };
    if let Err(e) = pods.patch_status(name, &params, &Patch::Merge(patch)).await {
        tracing::debug!(error = %e, "pod condition not written");
    }
}

/// Runs the scheduler until the watches end (never, unless the client is dropped).
pub async fn run(client: kube::Client, settings: SchedulerSettings) {
    let wake = Arc::new(Notify::new());
    let node_wake = wake.clone();
    let pod_wake = wake.clone();
    let (nodes, node_task) =
        crate::controllers::follow(Api::<Node>::all(client.clone()), move || {
            node_wake.notify_one()
        });
    let (pods, pod_task) = crate::controllers::follow(Api::<Pod>::all(client.clone()), move || {
        pod_wake.notify_one()
    });
    let followers = [node_task, pod_task];
    struct AbortOnDrop<const N: usize>([tokio::task::JoinHandle<()>; N]);
    impl<const N: usize> Drop for AbortOnDrop<N> {
        fn drop(&mut self) {
            for t in &self.0 {
                t.abort();
            }
        }
    }
    let _followers = AbortOnDrop(followers);
    let (Ok(()), Ok(())) = (
        nodes.wait_until_ready().await,
        pods.wait_until_ready().await,
    ) else {
        return;
    };
    // Pods bound by this scheduler and not yet seen bound by the watch (uid → node), as
    // kube-scheduler's assumed pods: they count on their node meanwhile.
    let mut assumed: HashMap<String, String> = HashMap::new();
    // The last unschedulable message per pod uid, so one is not written again and again.
    let mut told: HashMap<String, String> = HashMap::new();
    loop {
        let all_pods = pods.state();
        assumed.retain(|uid, _| {
            all_pods.iter().any(|p| {
                p.metadata.uid.as_deref() == Some(uid)
                    && p.spec
                        .as_ref()
                        .and_then(|s| s.node_name.as_deref())
                        .is_none()
            })
        });
        told.retain(|uid, _| {
            all_pods
                .iter()
                .any(|p| p.metadata.uid.as_deref() == Some(uid) && waiting(p))
        });
        let decisions = decide(&nodes.state(), &all_pods, &assumed);
        let mut unreachable = false;
        let bindings: Vec<(Arc<Pod>, String)> = decisions
            .iter()
            .filter_map(|(pod, d)| match d {
                Decision::Bind(node) => Some((pod.clone(), node.clone())),
                Decision::Unschedulable(_) => None,
            })
            .collect();
        for (pod, node) in &bindings {
            if let Some(uid) = &pod.metadata.uid {
                assumed.insert(uid.clone(), node.clone());
            }
        }
        let results = futures::stream::iter(bindings)
            .map(|(pod, node)| {
                let client = client.clone();
                async move {
                    let result = bind(&client, &pod, &node).await;
                    if let Ok(true) = result {
                        let message = format!("Successfully assigned {} to {node}", pod_key(&pod));
                        tracing::info!(pod = %pod_key(&pod), %node, "scheduled");
                        record(&client, &pod, "Normal", "Scheduled", &message).await;
                    }
                    (pod, result)
                }
            })
            .buffer_unordered(settings.parallel_bindings.max(1))
            .collect::<Vec<_>>()
            .await;
        for (pod, result) in results {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            match result {
                Ok(true) => {}
                Ok(false) => {
                    assumed.remove(&uid);
                }
                Err(e) => {
                    tracing::warn!(pod = %pod_key(&pod), error = %e, "binding failed; retrying");
                    assumed.remove(&uid);
                    unreachable = true;
                }
            }
        }
        for (pod, decision) in &decisions {
            let Decision::Unschedulable(message) = decision else {
                continue;
            };
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if told.get(&uid) == Some(message) {
                continue;
            }
            tracing::info!(pod = %pod_key(pod), %message, "unschedulable");
            record(&client, pod, "Warning", "FailedScheduling", message).await;
            mark_unschedulable(&client, pod, message).await;
            told.insert(uid, message.clone());
        }
        let wait = if unreachable {
            Duration::from_millis(500)
        } else {
            settings.retry
        };
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name},
                "status": {"allocatable": {"cpu": "4", "memory": "4Gi", "pods": "110"},
                           "conditions": [{"type": "Ready", "status": "True"}]},
            }))
            .expect("node"),
        )
    }

    fn pod(name: &str, node: Option<&str>, at: &str) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                             "creationTimestamp": at,
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "rs", "controller": true}]},
                "spec": {"containers": [{"name": "c"}], "nodeName": node},
            }))
            .expect("pod"),
        )
    }

    #[test]
    fn nine_siblings_spread_three_to_a_node() {
        let nodes = [node("a"), node("b"), node("c")];
        let pods: Vec<Arc<Pod>> = (0..9)
            .map(|i| pod(&format!("p{i}"), None, &format!("2026-01-01T00:00:0{i}Z")))
            .collect();
        let decisions = decide(&nodes, &pods, &HashMap::new());
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for (_, d) in &decisions {
            match d {
                Decision::Bind(n) => *per_node.entry(n.clone()).or_default() += 1,
                Decision::Unschedulable(m) => panic!("unschedulable: {m}"),
            }
        }
        assert_eq!(per_node.values().copied().collect::<Vec<_>>(), [3, 3, 3]);
    }

    #[test]
    fn bound_and_assumed_pods_count_and_are_not_placed_again() {
        let nodes = [node("a"), node("b")];
        let pods = vec![
            pod("bound", Some("a"), "2026-01-01T00:00:00Z"),
            pod("assumed", None, "2026-01-01T00:00:01Z"),
            pod("new", None, "2026-01-01T00:00:02Z"),
        ];
        let assumed: HashMap<String, String> = [("uid-assumed".to_owned(), "a".to_owned())]
            .into_iter()
            .collect();
        let decisions = decide(&nodes, &pods, &assumed);
        assert_eq!(decisions.len(), 1);
        assert!(matches!(&decisions[0].1, Decision::Bind(n) if n == "b"));
    }

    #[test]
    fn no_nodes_or_no_fit_says_why() {
        let pods = vec![pod("p", None, "2026-01-01T00:00:00Z")];
        let decisions = decide(&[], &pods, &HashMap::new());
        assert!(
            matches!(&decisions[0].1, Decision::Unschedulable(m) if m == "no nodes available to schedule pods")
        );
        let mut cordoned = Node::clone(&node("a"));
        cordoned.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        let decisions = decide(&[Arc::new(cordoned)], &pods, &HashMap::new());
        assert!(
            matches!(&decisions[0].1, Decision::Unschedulable(m) if m.starts_with("0/1 nodes are available: 1 node(s) were unschedulable."))
        );
    }
}
