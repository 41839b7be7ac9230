//! Whether a pod fits a node, and how well: kube-scheduler's default filters (node name,
//! unschedulable, node affinity and selector, taints and tolerations, resources, host
//! ports) and scores (least allocated, spread of one owner's pods), as pure functions
//! over the objects. No I/O here: the loop in [`super`] feeds it what the watches saw.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, Taint, Toleration,
};

/// The node taint a node that is not Ready carries (kube's node lifecycle controller
/// adds it; the scheduler reads a not-Ready node as tainted so, until that controller
/// runs, no pod lands on a node that is down).
pub const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
/// The taint of a cordoned node.
pub const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

/// What kube-scheduler counts a container as asking for when it asks for nothing, for
/// scoring only (so pods without requests still spread).
const DEFAULT_CPU_MILLIS: u64 = 100;
const DEFAULT_MEMORY_BYTES: u64 = 200 * 1024 * 1024;

/// CPU (millicores) and memory (bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory: u64,
}

impl Resources {
    fn add(&mut self, other: Resources) {
        self.cpu_millis = self.cpu_millis.saturating_add(other.cpu_millis);
        self.memory = self.memory.saturating_add(other.memory);
    }
}

/// A pod's requests: the sum of its containers' (a request left out defaults to the
/// limit, as the API server defaults it). With `nonzero`, a missing request counts as
/// kube-scheduler's default, for scoring.
pub fn pod_requests(pod: &Pod, nonzero: bool) -> Resources {
    let mut total = Resources::default();
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        let get = |name: &str| {
            let r = c.resources.as_ref()?;
            r.requests
                .as_ref()
                .and_then(|m| m.get(name))
                .or_else(|| r.limits.as_ref().and_then(|m| m.get(name)))
                .map(|q| q.0.clone())
        };
        let cpu = get("cpu").and_then(|q| brink_proto::parse_cpu_millis(&q).ok());
        let memory = get("memory").and_then(|q| brink_proto::parse_bytes(&q).ok());
        total.add(Resources {
            cpu_millis: cpu.unwrap_or(if nonzero { DEFAULT_CPU_MILLIS } else { 0 }),
            memory: memory.unwrap_or(if nonzero { DEFAULT_MEMORY_BYTES } else { 0 }),
        });
    }
    total
}

/// A host port a pod holds: protocol, address, port.
type HostPort = (String, String, i32);

fn host_ports(pod: &Pod) -> Vec<HostPort> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let port = p.host_port.filter(|p| *p > 0)?;
            Some((
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                p.host_ip.clone().unwrap_or_else(|| "0.0.0.0".into()),
                port,
            ))
        })
        .collect()
}

/// A node with what is already placed on it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node: Node,
    pub requested: Resources,
    pub nonzero: Resources,
    pub pods: usize,
    pub ports: Vec<HostPort>,
    /// How many pods each controller (owner uid) has here.
    pub owners: BTreeMap<String, usize>,
}

/// The uid of the controller that owns a pod, if any.
pub fn controller_of(pod: &Pod) -> Option<&str> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.as_str())
}

impl NodeInfo {
    pub fn new(node: Node) -> Self {
        Self {
            node,
            requested: Resources::default(),
            nonzero: Resources::default(),
            pods: 0,
            ports: Vec::new(),
            owners: BTreeMap::new(),
        }
    }

    pub fn name(&self) -> &str {
        self.node.metadata.name.as_deref().unwrap_or_default()
    }

    /// Counts `pod` as placed here.
    pub fn add(&mut self, pod: &Pod) {
        self.requested.add(pod_requests(pod, false));
        self.nonzero.add(pod_requests(pod, true));
        self.pods += 1;
        self.ports.extend(host_ports(pod));
        if let Some(owner) = controller_of(pod) {
            *self.owners.entry(owner.to_owned()).or_default() += 1;
        }
    }

    fn allocatable(&self) -> (Option<u64>, Option<u64>, Option<u64>) {
        let status = self.node.status.as_ref();
        let list = status
            .and_then(|s| s.allocatable.as_ref())
            .or_else(|| status.and_then(|s| s.capacity.as_ref()));
        let get = |name: &str| list.and_then(|l| l.get(name)).map(|q| q.0.clone());
        (
            get("cpu").and_then(|q| brink_proto::parse_cpu_millis(&q).ok()),
            get("memory").and_then(|q| brink_proto::parse_bytes(&q).ok()),
            get("pods").and_then(|q| q.parse().ok()),
        )
    }

    fn ready(&self) -> bool {
        self.node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True")
    }

    /// The taints the scheduler heeds: the node's own, and not-ready for a node whose
    /// Ready condition is not True.
    fn taints(&self) -> Vec<Taint> {
        let mut taints: Vec<Taint> = self
            .node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        if !self.ready() && !taints.iter().any(|t| t.key == NOT_READY_TAINT) {
            taints.push(Taint {
                key: NOT_READY_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            });
        }
        taints
    }
}

fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    if toleration
        .effect
        .as_deref()
        .is_some_and(|e| !e.is_empty() && e != taint.effect)
    {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or("");
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => key.is_empty() || key == taint.key,
        _ => {
            key == taint.key
                && toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
    }
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => {
            matches!((value.and_then(number), values.first().and_then(|x| number(x))), (Some(v), Some(x)) if v > x)
        }
        "Lt" => {
            matches!((value.and_then(number), values.first().and_then(|x| number(x))), (Some(v), Some(x)) if v < x)
        }
        _ => false,
    }
}

fn term_matches(term: &NodeSelectorTerm, node: &Node) -> bool {
    let labels = node.metadata.labels.as_ref();
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        // An empty term selects nothing, as in Kubernetes.
        return false;
    }
    expressions
        .iter()
        .all(|r| requirement_matches(r, labels.and_then(|l| l.get(&r.key)).map(String::as_str)))
        && fields.iter().all(|r| {
            let value = match r.key.as_str() {
                "metadata.name" => node.metadata.name.as_deref(),
                _ => None,
            };
            requirement_matches(r, value)
        })
}

/// Whether the node has the labels the pod's nodeSelector and required node affinity ask.
fn affinity_matches(pod: &Pod, node: &Node) -> bool {
    let Some(spec) = &pod.spec else { return true };
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let selector_ok = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    let affinity_ok = required.is_none_or(|r| {
        r.node_selector_terms
            .iter()
            .any(|term| term_matches(term, node))
    });
    selector_ok && affinity_ok
}

/// Why `pod` does not fit `info`, in kube-scheduler's words; empty when it fits. The
/// filters run in kube-scheduler's order (unschedulable, taints, affinity, ports,
/// resources) and, as there, the first that fails is the node's reason.
pub fn misfits(pod: &Pod, info: &NodeInfo) -> Vec<String> {
    let mut reasons = Vec::new();
    let spec = pod.spec.clone().unwrap_or_default();
    let tolerations = spec.tolerations.clone().unwrap_or_default();
    let unschedulable = info
        .node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let cordon = Taint {
        key: UNSCHEDULABLE_TAINT.into(),
        effect: "NoSchedule".into(),
        ..Default::default()
    };
    if unschedulable && !tolerations.iter().any(|t| tolerates(t, &cordon)) {
        reasons.push("node(s) were unschedulable".to_owned());
        return reasons;
    }
    if let Some(taint) = info.taints().into_iter().find(|taint| {
        matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute")
            && !tolerations.iter().any(|t| tolerates(t, taint))
    }) {
        reasons.push(format!(
            "node(s) had untolerated taint {{{}: {}}}",
            taint.key,
            taint.value.as_deref().unwrap_or("")
        ));
        return reasons;
    }
    if !affinity_matches(pod, &info.node) {
        reasons.push("node(s) didn't match Pod's node affinity/selector".to_owned());
        return reasons;
    }
    let clash = host_ports(pod).iter().any(|(proto, ip, port)| {
        info.ports.iter().any(|(p, i, n)| {
            p == proto && n == port && (i == ip || i == "0.0.0.0" || ip == "0.0.0.0")
        })
    });
    if clash {
        reasons.push("node(s) didn't have free ports for the requested pod ports".to_owned());
        return reasons;
    }
    let (cpu, memory, pods) = info.allocatable();
    let wants = pod_requests(pod, false);
    if pods.is_some_and(|max| info.pods as u64 >= max) {
        reasons.push("Too many pods".to_owned());
    }
    if wants.cpu_millis > 0
        && cpu.is_some_and(|cpu| info.requested.cpu_millis.saturating_add(wants.cpu_millis) > cpu)
    {
        reasons.push("Insufficient cpu".to_owned());
    }
    if wants.memory > 0
        && memory.is_some_and(|m| info.requested.memory.saturating_add(wants.memory) > m)
    {
        reasons.push("Insufficient memory".to_owned());
    }
    reasons
}

/// How well `pod` fits a node it fits: higher is better. One owner's pods spread first
/// (fewest of its siblings), then the least allocated node (CPU and memory after the
/// pod, counting pods without requests at kube-scheduler's defaults), 0..=100 each.
pub fn score(pod: &Pod, info: &NodeInfo) -> (i64, i64) {
    let siblings = controller_of(pod)
        .and_then(|o| info.owners.get(o))
        .copied()
        .unwrap_or(0) as i64;
    let (cpu, memory, _) = info.allocatable();
    let wants = pod_requests(pod, true);
    let free = |capacity: Option<u64>, used: u64| match capacity {
        Some(c) if c > 0 => (u128::from(c.saturating_sub(used)) * 100 / u128::from(c)) as i64,
        _ => 0,
    };
    let least = (free(
        cpu,
        info.nonzero.cpu_millis.saturating_add(wants.cpu_millis),
    ) + free(memory, info.nonzero.memory.saturating_add(wants.memory)))
        / 2;
    (-siblings, least)
}

/// kube-scheduler's FailedScheduling message: "0/3 nodes are available: 1 Insufficient
/// cpu, 2 node(s) were unschedulable." (reasons counted and sorted as it sorts them).
pub fn explain(nodes: usize, reasons: &BTreeMap<String, usize>) -> String {
    if nodes == 0 {
        return "no nodes available to schedule pods".to_owned();
    }
    // Sorted as whole strings, counts first, as kube-scheduler sorts its histogram.
    let mut parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    parts.sort();
    format!(
        "0/{nodes} nodes are available: {}. preemption: not attempted: Brink does not preempt pods.",
        parts.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, extra: serde_json::Value) -> NodeInfo {
        let mut n = json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "zone": "a"}},
            "status": {
                "allocatable": {"cpu": "2", "memory": "1Gi", "pods": "3"},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        });
        json_patch::merge(&mut n, &extra);
        NodeInfo::new(serde_json::from_value(n).expect("node"))
    }

    fn pod(extra: serde_json::Value) -> Pod {
        let mut p = json!({"metadata": {"name": "p", "namespace": "default"},
                           "spec": {"containers": [{"name": "c"}]}});
        json_patch::merge(&mut p, &extra);
        serde_json::from_value(p).expect("pod")
    }

    #[test]
    fn a_plain_pod_fits_a_ready_node_and_nothing_else() {
        let p = pod(json!({}));
        assert!(misfits(&p, &node("a", json!({}))).is_empty());
        let down = node(
            "a",
            json!({"status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}}),
        );
        assert_eq!(
            misfits(&p, &down),
            ["node(s) had untolerated taint {node.kubernetes.io/not-ready: }"]
        );
        let cordoned = node("a", json!({"spec": {"unschedulable": true}}));
        assert_eq!(misfits(&p, &cordoned), ["node(s) were unschedulable"]);
        // A DaemonSet's pods tolerate both.
        let tolerant = pod(json!({"spec": {"tolerations": [
            {"key": UNSCHEDULABLE_TAINT, "operator": "Exists", "effect": "NoSchedule"},
            {"key": NOT_READY_TAINT, "operator": "Exists"},
        ]}}));
        assert!(misfits(&tolerant, &cordoned).is_empty());
        assert!(misfits(&tolerant, &down).is_empty());
    }

    #[test]
    fn selectors_affinity_and_taints_decide_as_kubernetes_does() {
        let a = node(
            "a",
            json!({"spec": {"taints": [{"key": "brink.dev/wasm", "value": "true", "effect": "NoSchedule"}]}}),
        );
        let plain = pod(json!({}));
        assert_eq!(
            misfits(&plain, &a),
            ["node(s) had untolerated taint {brink.dev/wasm: true}"]
        );
        let equal =
            pod(json!({"spec": {"tolerations": [{"key": "brink.dev/wasm", "value": "true"}]}}));
        assert!(misfits(&equal, &a).is_empty());
        let wrong_value =
            pod(json!({"spec": {"tolerations": [{"key": "brink.dev/wasm", "value": "no"}]}}));
        assert!(!misfits(&wrong_value, &a).is_empty());
        let everything = pod(json!({"spec": {"tolerations": [{"operator": "Exists"}]}}));
        assert!(misfits(&everything, &a).is_empty());
        let prefer = node(
            "b",
            json!({"spec": {"taints": [{"key": "x", "effect": "PreferNoSchedule"}]}}),
        );
        assert!(misfits(&plain, &prefer).is_empty());

        let b = node("b", json!({}));
        let selector = pod(json!({"spec": {"nodeSelector": {"zone": "b"}}}));
        assert_eq!(
            misfits(&selector, &b),
            ["node(s) didn't match Pod's node affinity/selector"]
        );
        let affinity = |expressions: serde_json::Value| {
            pod(
                json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": expressions},
                ]}}}}}),
            )
        };
        for (expressions, fits) in [
            (
                json!([{"key": "zone", "operator": "In", "values": ["a", "c"]}]),
                true,
            ),
            (
                json!([{"key": "zone", "operator": "NotIn", "values": ["a"]}]),
                false,
            ),
            (json!([{"key": "zone", "operator": "Exists"}]), true),
            (json!([{"key": "gpu", "operator": "DoesNotExist"}]), true),
            (json!([{"key": "gpu", "operator": "Exists"}]), false),
            (
                json!([{"key": "zone", "operator": "Gt", "values": ["1"]}]),
                false,
            ),
            (json!([]), false),
        ] {
            assert_eq!(
                misfits(&affinity(expressions.clone()), &b).is_empty(),
                fits,
                "{expressions}"
            );
        }
        let by_name = pod(
            json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["b"]}]},
            ]}}}}}),
        );
        assert!(misfits(&by_name, &b).is_empty());
        assert!(!misfits(&by_name, &node("c", json!({}))).is_empty());
    }

    #[test]
    fn requests_count_against_allocatable_and_ports_against_each_other() {
        let mut a = node("a", json!({}));
        let big = pod(
            json!({"spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "1500m", "memory": "600Mi"}}}]}}),
        );
        assert!(misfits(&big, &a).is_empty());
        a.add(&big);
        assert_eq!(
            misfits(&big, &a),
            ["Insufficient cpu", "Insufficient memory"]
        );
        // A limit without a request is the request.
        let limited = pod(
            json!({"spec": {"containers": [{"name": "c", "resources": {"limits": {"cpu": "1"}}}]}}),
        );
        assert_eq!(misfits(&limited, &a), ["Insufficient cpu"]);
        let small = pod(json!({}));
        a.add(&small);
        a.add(&small);
        assert_eq!(misfits(&small, &a), ["Too many pods"]);

        let mut b = node("b", json!({}));
        let port = |ip: Option<&str>| {
            let mut p = json!({"containerPort": 8080, "hostPort": 80});
            if let Some(ip) = ip {
                p["hostIP"] = json!(ip);
            }
            pod(json!({"spec": {"containers": [{"name": "c", "ports": [p]}]}}))
        };
        b.add(&port(Some("127.0.0.2")));
        assert!(misfits(&port(Some("127.0.0.3")), &b).is_empty());
        assert_eq!(
            misfits(&port(None), &b),
            ["node(s) didn't have free ports for the requested pod ports"]
        );
    }

    #[test]
    fn siblings_spread_before_free_room_counts() {
        let owned = pod(
            json!({"metadata": {"ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "rs-1", "controller": true}]}}),
        );
        let mut a = node("a", json!({}));
        let b = node("b", json!({}));
        assert_eq!(score(&owned, &a), score(&owned, &b));
        a.add(&owned);
        assert!(score(&owned, &b) > score(&owned, &a));
        // Without an owner, the emptier node wins.
        let plain = pod(json!({}));
        assert!(score(&plain, &b) > score(&plain, &a));
    }

    #[test]
    fn huge_numbers_from_a_node_or_pod_do_not_overflow() {
        let big = node(
            "a",
            json!({"status": {"allocatable": {"cpu": "9000000000000", "memory": "8Ei", "pods": "110"}}}),
        );
        let greedy = pod(
            json!({"spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": "9000000000000", "memory": "8Ei"}}}]}}),
        );
        let mut info = big.clone();
        info.add(&greedy);
        info.add(&greedy);
        let _ = misfits(&greedy, &info);
        for p in [&greedy, &pod(json!({}))] {
            let (_, least) = score(p, &big);
            assert!((0..=100).contains(&least), "{least}");
        }
    }

    #[test]
    fn the_failure_message_reads_as_kube_schedulers() {
        let reasons: BTreeMap<String, usize> = [
            (
                "node(s) didn't match Pod's node affinity/selector".to_owned(),
                2,
            ),
            ("Insufficient cpu".to_owned(), 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            explain(3, &reasons),
            "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) didn't match Pod's node affinity/selector. preemption: not attempted: Brink does not preempt pods."
        );
        assert_eq!(
            explain(0, &BTreeMap::new()),
            "no nodes available to schedule pods"
        );
    }
}
