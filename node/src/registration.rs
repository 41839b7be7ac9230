//! The node as a site sees it: its Node object (labels, capacity, conditions, addresses,
//! nodeInfo) and its Lease in `kube-node-lease`, renewed while the node lives, as a
//! kubelet registers and heartbeats.
//!
//! Owns those two objects and nothing else; it talks to the site only through the
//! Kubernetes API. A site it cannot reach is retried with back-off; nothing on the node
//! waits for it.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};

/// The field manager the node writes as.
pub const FIELD_MANAGER: &str = "brink-node";

/// How the node heartbeats.
#[derive(Debug, Clone)]
pub struct RegistrationSettings {
    pub node_name: String,
    /// The address the node is reached at (`InternalIP`).
    pub address: std::net::IpAddr,
    /// The most pods the node runs (`capacity.pods`).
    pub max_pods: u32,
    /// The port of the node's kubelet endpoint (`daemonEndpoints.kubeletEndpoint`):
    /// the API server reads pods' logs there, at the InternalIP.
    pub kubelet_port: u16,
    /// How often the Lease is renewed (`--node-lease-renew`).
    pub lease_renew: Duration,
    /// How often status is written when nothing changed (`--node-status-report`).
    pub status_report: Duration,
    /// Taints the Node is registered with (`--register-with-taints`).
    pub taints: Vec<k8s_openapi::api::core::v1::Taint>,
}

/// What the node reports about itself.
pub fn node_object(s: &RegistrationSettings) -> Node {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|t| t.trim().to_owned())
            .unwrap_or_default()
    };
    let os_image = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| "Linux".into());
    let memory_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let resources: BTreeMap<String, Quantity> = [
        ("cpu", cpus.to_string()),
        ("memory", format!("{memory_kib}Ki")),
        ("pods", s.max_pods.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Quantity(v)))
    .collect();
    let labels: BTreeMap<String, String> = [
        ("kubernetes.io/os", "linux".to_owned()),
        ("kubernetes.io/arch", arch.to_owned()),
        ("kubernetes.io/hostname", s.node_name.clone()),
        ("node.kubernetes.io/instance-type", "brink-wasm".to_owned()),
        (brink_proto::WASM_NODE_LABEL, "true".to_owned()),
        ("beta.kubernetes.io/os", "linux".to_owned()),
        ("beta.kubernetes.io/arch", arch.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Node {
        metadata: ObjectMeta {
            name: Some(s.node_name.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: (!s.taints.is_empty()).then(|| k8s_openapi::api::core::v1::NodeSpec {
            taints: Some(s.taints.clone()),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            capacity: Some(resources.clone()),
            allocatable: Some(resources),
            conditions: Some(conditions(Timestamp::now())),
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: s.address.to_string(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: s.node_name.clone(),
                },
            ]),
            daemon_endpoints: Some(k8s_openapi::api::core::v1::NodeDaemonEndpoints {
                kubelet_endpoint: Some(k8s_openapi::api::core::v1::DaemonEndpoint {
                    port: i32::from(s.kubelet_port),
                }),
            }),
            node_info: Some(NodeSystemInfo {
                architecture: arch.into(),
                operating_system: "linux".into(),
                os_image,
                kernel_version: read("/proc/sys/kernel/osrelease"),
                kubelet_version: format!("v1.36.0-brink.{}", env!("CARGO_PKG_VERSION")),
                kube_proxy_version: String::new(),
                container_runtime_version: format!("brink-wasm://{}", env!("CARGO_PKG_VERSION")),
                machine_id: read("/etc/machine-id"),
                system_uuid: read("/sys/class/dmi/id/product_uuid"),
                boot_id: read("/proc/sys/kernel/random/boot_id"),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

fn conditions(now: Timestamp) -> Vec<NodeCondition> {
    let c = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    };
    vec![
        c(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "brink node has sufficient memory available",
        ),
        c(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "brink node has no disk pressure",
        ),
        c(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "brink node has sufficient PID available",
        ),
        c(
            "Ready",
            "True",
            "KubeletReady",
            "brink node is posting ready status",
        ),
    ]
}

/// Registers the Node (creating it, or taking over one of the same name) and writes its
/// status.
async fn register(nodes: &Api<Node>, node: &Node, name: &str) -> Result<(), kube::Error> {
    match nodes.create(&PostParams::default(), node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e),
    }
    let status = serde_json::json!({"status": node.status});
    nodes
        .patch_status(
            name,
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &Patch::Merge(&status),
        )
        .await
        .map(|_| ())
}

async fn renew_lease(
    leases: &Api<Lease>,
    name: &str,
    duration: Duration,
) -> Result<(), kube::Error> {
    let now = MicroTime(Timestamp::now());
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("kube-node-lease".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(name.to_owned()),
            lease_duration_seconds: Some(i32::try_from(duration.as_secs()).unwrap_or(40)),
            renew_time: Some(now),
            ..Default::default()
        }),
    };
    leases
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await
        .map(|_| ())
}

/// Keeps the Node and its Lease current until `shutdown`: the Lease every `lease_renew`,
/// status every `status_report`; failures are logged and retried on the next beat.
pub async fn run(
    client: kube::Client,
    settings: RegistrationSettings,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let name = settings.node_name.clone();
    // A kubelet's lease lasts four renewals.
    let lease_duration = settings.lease_renew * 4;
    let mut registered = false;
    let mut last_status = tokio::time::Instant::now();
    tokio::pin!(shutdown);
    loop {
        if !registered || last_status.elapsed() >= settings.status_report {
            match register(&nodes, &node_object(&settings), &name).await {
                Ok(()) => {
                    if !registered {
                        tracing::info!(node = %name, "registered with the site");
                    }
                    registered = true;
                    last_status = tokio::time::Instant::now();
                }
                Err(e) => {
                    tracing::warn!(node = %name, error = %e, "cannot register with the site; trying again")
                }
            }
        }
        if registered && let Err(e) = renew_lease(&leases, &name, lease_duration).await {
            tracing::warn!(node = %name, error = %e, "cannot renew the node's lease; trying again");
        }
        // The site marks a node it has not heard from Ready=Unknown; once it hears from
        // it again, the node says it is Ready without waiting for the next report.
        if registered
            && let Ok(node) = nodes.get_status(&name).await
            && !node
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        {
            tracing::info!(node = %name, "the site does not see this node Ready; reporting again");
            match register(&nodes, &node_object(&settings), &name).await {
                Ok(()) => last_status = tokio::time::Instant::now(),
                Err(e) => {
                    tracing::warn!(node = %name, error = %e, "cannot report status; trying again")
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(settings.lease_renew) => {}
            () = &mut shutdown => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_reports_what_kubectl_shows() {
        let node = node_object(&RegistrationSettings {
            node_name: "shop-7".into(),
            address: "10.0.0.7".parse().expect("ip"),
            max_pods: 110,
            kubelet_port: 10250,
            lease_renew: Duration::from_secs(10),
            status_report: Duration::from_secs(300),
            taints: Vec::new(),
        });
        let labels = node.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get("kubernetes.io/os").map(String::as_str),
            Some("linux")
        );
        assert!(labels.contains_key("kubernetes.io/arch"));
        assert!(labels.contains_key("node.kubernetes.io/instance-type"));
        let status = node.status.unwrap_or_default();
        let capacity = status.capacity.unwrap_or_default();
        assert_eq!(capacity.get("pods"), Some(&Quantity("110".into())));
        assert!(capacity.contains_key("cpu") && capacity.contains_key("memory"));
        let ready = status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .expect("Ready");
        assert_eq!(ready.status, "True");
        assert_eq!(status.addresses.unwrap_or_default()[0].address, "10.0.0.7");
    }
}

/// Reads `--register-with-taints`: `key[=value]:Effect`, comma-separated, as the kubelet
/// flag takes them.
pub fn parse_taints(text: &str) -> Result<Vec<k8s_openapi::api::core::v1::Taint>, String> {
    let mut taints = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (key_value, effect) = item
            .rsplit_once(':')
            .ok_or_else(|| format!("{item:?}: expected key[=value]:Effect"))?;
        if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
            return Err(format!(
                "{item:?}: the effect must be NoSchedule, PreferNoSchedule or NoExecute"
            ));
        }
        let (key, value) = match key_value.split_once('=') {
            Some((k, v)) => (k, Some(v.to_owned())),
            None => (key_value, None),
        };
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(format!("{item:?}: a taint needs a key"));
        }
        taints.push(k8s_openapi::api::core::v1::Taint {
            key: key.to_owned(),
            value,
            effect: effect.to_owned(),
            time_added: None,
        });
    }
    Ok(taints)
}

#[cfg(test)]
mod taint_tests {
    use super::*;

    #[test]
    fn taints_read_as_the_kubelet_flag_takes_them() {
        let taints = parse_taints("runtime.brink.dev/wasm=true:NoSchedule, dedicated:NoExecute")
            .expect("taints");
        assert_eq!(taints.len(), 2);
        assert_eq!(taints[0].value.as_deref(), Some("true"));
        assert_eq!(taints[1].key, "dedicated");
        assert!(parse_taints("x=y").is_err());
        assert!(parse_taints("x=y:Sometimes").is_err());
        assert!(parse_taints("=y:NoSchedule").is_err());
        assert_eq!(parse_taints("").map(|t| t.len()), Ok(0));
    }
}
