//! `meta.k8s.io/v1` Table output: what `kubectl get` prints comes from the server. The
//! columns are kube-apiserver's for each kind (priority 1 columns show with `-o wide`);
//! kinds without their own get NAME and AGE (as "Created At").

use serde_json::{Value, json};

use super::kinds::Kind;

fn s<'a>(object: &'a Value, pointer: &str) -> &'a str {
    object
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn count(object: &Value, pointer: &str) -> usize {
    match object.pointer(pointer) {
        Some(Value::Array(a)) => a.len(),
        Some(Value::Object(m)) => m.len(),
        _ => 0,
    }
}

fn int(object: &Value, pointer: &str) -> i64 {
    object.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn or_none(v: &str) -> Value {
    json!(if v.is_empty() { "<none>" } else { v })
}

/// Columns: (name, type, format, priority, description).
type Column = (&'static str, &'static str, &'static str, u8, &'static str);

const NAME: Column = (
    "Name",
    "string",
    "name",
    0,
    "Name must be unique within a namespace.",
);
const AGE: Column = (
    "Age",
    "string",
    "",
    0,
    "CreationTimestamp is a timestamp representing the server time when this object was created.",
);

/// How long ago `timestamp` was, as kubectl prints ages (`5s`, `3m2s`, `4h`, `2d`).
pub fn age(timestamp: &str) -> String {
    let Ok(then) = timestamp.parse::<jiff::Timestamp>() else {
        return "<unknown>".into();
    };
    let secs = (jiff::Timestamp::now().as_second() - then.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 8 * 3600 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s if s < 8 * 86400 => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn pod_cells(pod: &Value) -> Vec<Value> {
    let total = count(pod, "/spec/containers");
    let statuses = pod
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let ready = statuses
        .iter()
        .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
        .count();
    let restarts: i64 = statuses
        .iter()
        .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
        .sum();
    let mut status = s(pod, "/status/phase").to_owned();
    if !s(pod, "/status/reason").is_empty() {
        status = s(pod, "/status/reason").to_owned();
    }
    // kubectl's printPod: the last container with something to say names the status.
    let mut running = false;
    for c in statuses.iter().rev() {
        let at = |path: &str| c.pointer(path).and_then(Value::as_str).unwrap_or("");
        if !at("/state/waiting/reason").is_empty() {
            status = at("/state/waiting/reason").to_owned();
        } else if let Some(terminated) = c.pointer("/state/terminated") {
            status = match terminated.get("reason").and_then(Value::as_str) {
                Some(reason) if !reason.is_empty() => reason.to_owned(),
                _ => match terminated.get("signal").and_then(Value::as_i64) {
                    Some(signal) if signal != 0 => format!("Signal:{signal}"),
                    _ => format!(
                        "ExitCode:{}",
                        terminated
                            .get("exitCode")
                            .and_then(Value::as_i64)
                            .unwrap_or(0)
                    ),
                },
            };
        } else if c.get("ready").and_then(Value::as_bool) == Some(true)
            && c.pointer("/state/running").is_some()
        {
            running = true;
        }
    }
    if status == "Completed" && running {
        let ready = pod
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|c| {
                c.iter().any(|c| {
                    c.get("type").and_then(Value::as_str) == Some("Ready")
                        && c.get("status").and_then(Value::as_str) == Some("True")
                })
            });
        status = if ready { "Running" } else { "NotReady" }.to_owned();
    }
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        status = "Terminating".into();
    }
    if status.is_empty() {
        status = "Pending".into();
    }
    vec![
        json!(s(pod, "/metadata/name")),
        json!(format!("{ready}/{total}")),
        json!(status),
        json!(restarts.to_string()),
        json!(age(s(pod, "/metadata/creationTimestamp"))),
        or_none(s(pod, "/status/podIP")),
        or_none(s(pod, "/spec/nodeName")),
        or_none(s(pod, "/status/nominatedNodeName")),
        json!("<none>"),
    ]
}

/// The status of the condition of `kind` in `status.conditions` ("" when there is none).
fn condition_status<'a>(object: &'a Value, kind: &str) -> &'a str {
    object
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
        .and_then(|c| c.get("status").and_then(Value::as_str))
        .unwrap_or("")
}

fn node_cells(node: &Value) -> Vec<Value> {
    let conditions = node
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut status = match conditions
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
        .and_then(|c| c.get("status").and_then(Value::as_str))
    {
        Some("True") => "Ready".to_owned(),
        Some(_) => "NotReady".to_owned(),
        None => "Unknown".to_owned(),
    };
    if node.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    let roles: Vec<String> = node
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|l| {
            l.keys()
                .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let address = |kind: &str| {
        node.pointer("/status/addresses")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .find(|x| x.get("type").and_then(Value::as_str) == Some(kind))
            })
            .and_then(|x| x.get("address").and_then(Value::as_str))
            .unwrap_or("<none>")
            .to_owned()
    };
    vec![
        json!(s(node, "/metadata/name")),
        json!(status),
        json!(if roles.is_empty() {
            "<none>".to_owned()
        } else {
            roles.join(",")
        }),
        json!(age(s(node, "/metadata/creationTimestamp"))),
        json!(s(node, "/status/nodeInfo/kubeletVersion")),
        json!(address("InternalIP")),
        json!(address("ExternalIP")),
        or_none(s(node, "/status/nodeInfo/osImage")),
        or_none(s(node, "/status/nodeInfo/kernelVersion")),
        or_none(s(node, "/status/nodeInfo/containerRuntimeVersion")),
    ]
}

fn service_ports(svc: &Value) -> String {
    let ports: Vec<String> = svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|ports| {
            ports
                .iter()
                .map(|p| {
                    let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
                    let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                    match p.get("nodePort").and_then(Value::as_i64) {
                        Some(n) => format!("{port}:{n}/{proto}"),
                        None => format!("{port}/{proto}"),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    if ports.is_empty() {
        "<none>".into()
    } else {
        ports.join(",")
    }
}

fn selector(object: &Value, pointer: &str) -> String {
    object
        .pointer(pointer)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "<none>".into())
}

fn containers_and_images(object: &Value, pointer: &str) -> (String, String) {
    let containers = object
        .pointer(pointer)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let names = containers
        .iter()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join(",");
    let images = containers
        .iter()
        .filter_map(|c| c.get("image").and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join(",");
    (names, images)
}

/// The columns and one row's cells for `kind`.
fn columns_and_cells(kind: &Kind, object: &Value) -> (Vec<Column>, Vec<Value>) {
    let name = json!(s(object, "/metadata/name"));
    let created = json!(age(s(object, "/metadata/creationTimestamp")));
    match (kind.group, kind.resource) {
        ("", "pods") => (
            vec![
                NAME,
                (
                    "Ready",
                    "string",
                    "",
                    0,
                    "The aggregate readiness state of this pod for accepting traffic.",
                ),
                (
                    "Status",
                    "string",
                    "",
                    0,
                    "The aggregate status of the containers in this pod.",
                ),
                (
                    "Restarts",
                    "string",
                    "",
                    0,
                    "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted.",
                ),
                AGE,
                ("IP", "string", "", 1, "The IP address assigned to the pod"),
                (
                    "Node",
                    "string",
                    "",
                    1,
                    "The name of the node the pod is assigned to",
                ),
                (
                    "Nominated Node",
                    "string",
                    "",
                    1,
                    "The name of the node nominated by the scheduler",
                ),
                (
                    "Readiness Gates",
                    "string",
                    "",
                    1,
                    "The readiness gates of the pod",
                ),
            ],
            pod_cells(object),
        ),
        ("", "nodes") => (
            vec![
                NAME,
                ("Status", "string", "", 0, "The status of the node"),
                ("Roles", "string", "", 0, "The roles of the node"),
                AGE,
                (
                    "Version",
                    "string",
                    "",
                    0,
                    "Kubelet Version reported by the node.",
                ),
                (
                    "Internal-IP",
                    "string",
                    "",
                    1,
                    "List of internal IPs for the node.",
                ),
                (
                    "External-IP",
                    "string",
                    "",
                    1,
                    "List of external IPs for the node.",
                ),
                (
                    "OS-Image",
                    "string",
                    "",
                    1,
                    "OS Image reported by the node from /etc/os-release.",
                ),
                (
                    "Kernel-Version",
                    "string",
                    "",
                    1,
                    "Kernel Version reported by the node.",
                ),
                (
                    "Container-Runtime",
                    "string",
                    "",
                    1,
                    "Container Runtime Version reported by the node.",
                ),
            ],
            node_cells(object),
        ),
        ("", "namespaces") => (
            vec![
                NAME,
                ("Status", "string", "", 0, "The status of the namespace"),
                AGE,
            ],
            vec![name, json!(s(object, "/status/phase")), created],
        ),
        ("", "configmaps") => (
            vec![
                NAME,
                (
                    "Data",
                    "string",
                    "",
                    0,
                    "Data contains the configuration data.",
                ),
                AGE,
            ],
            vec![
                name,
                json!(count(object, "/data") + count(object, "/binaryData")),
                created,
            ],
        ),
        ("", "secrets") => (
            vec![
                NAME,
                ("Type", "string", "", 0, "The type of the secret"),
                (
                    "Data",
                    "string",
                    "",
                    0,
                    "The number of entries in the secret",
                ),
                AGE,
            ],
            vec![
                name,
                json!(s(object, "/type")),
                json!(count(object, "/data")),
                created,
            ],
        ),
        ("", "services") => (
            vec![
                NAME,
                ("Type", "string", "", 0, "The type of the service."),
                (
                    "Cluster-IP",
                    "string",
                    "",
                    0,
                    "The IP address of the service.",
                ),
                (
                    "External-IP",
                    "string",
                    "",
                    0,
                    "The external IP addresses of the service.",
                ),
                ("Port(s)", "string", "", 0, "The ports of the service."),
                AGE,
                ("Selector", "string", "", 1, "The selector of the service."),
            ],
            vec![
                name,
                json!(match s(object, "/spec/type") {
                    "" => "ClusterIP",
                    t => t,
                }),
                or_none(s(object, "/spec/clusterIP")),
                json!("<none>"),
                json!(service_ports(object)),
                created,
                json!(selector(object, "/spec/selector")),
            ],
        ),
        ("apps", "deployments") => {
            let (containers, images) =
                containers_and_images(object, "/spec/template/spec/containers");
            (
                vec![
                    NAME,
                    (
                        "Ready",
                        "string",
                        "",
                        0,
                        "Number of the pod with ready state",
                    ),
                    (
                        "Up-to-date",
                        "string",
                        "",
                        0,
                        "Total number of non-terminated pods targeted by this deployment that have the desired template spec.",
                    ),
                    (
                        "Available",
                        "string",
                        "",
                        0,
                        "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.",
                    ),
                    AGE,
                    (
                        "Containers",
                        "string",
                        "",
                        1,
                        "Names of each container in the template.",
                    ),
                    (
                        "Images",
                        "string",
                        "",
                        1,
                        "Images referenced by each container in the template.",
                    ),
                    ("Selector", "string", "", 1, "Label selector for pods."),
                ],
                vec![
                    name,
                    json!(format!(
                        "{}/{}",
                        int(object, "/status/readyReplicas"),
                        object
                            .pointer("/spec/replicas")
                            .and_then(Value::as_i64)
                            .unwrap_or(1)
                    )),
                    json!(int(object, "/status/updatedReplicas")),
                    json!(int(object, "/status/availableReplicas")),
                    created,
                    json!(containers),
                    json!(images),
                    json!(selector(object, "/spec/selector/matchLabels")),
                ],
            )
        }
        ("apps", "replicasets") => (
            vec![
                NAME,
                ("Desired", "integer", "", 0, "Number of desired pods."),
                ("Current", "integer", "", 0, "Number of actual replicas."),
                ("Ready", "integer", "", 0, "Number of ready replicas."),
                AGE,
            ],
            vec![
                name,
                json!(
                    object
                        .pointer("/spec/replicas")
                        .and_then(Value::as_i64)
                        .unwrap_or(1)
                ),
                json!(int(object, "/status/replicas")),
                json!(int(object, "/status/readyReplicas")),
                created,
            ],
        ),
        ("batch", "jobs") => (
            vec![
                NAME,
                ("Status", "string", "", 0, "Status of the job."),
                (
                    "Completions",
                    "string",
                    "",
                    0,
                    "The completion status of the job.",
                ),
                (
                    "Duration",
                    "string",
                    "",
                    0,
                    "Time required to complete the job.",
                ),
                AGE,
            ],
            vec![
                name,
                json!(if int(object, "/status/succeeded") > 0 {
                    "Complete"
                } else {
                    "Running"
                }),
                json!(format!(
                    "{}/{}",
                    int(object, "/status/succeeded"),
                    object
                        .pointer("/spec/completions")
                        .and_then(Value::as_i64)
                        .unwrap_or(1)
                )),
                json!(""),
                created,
            ],
        ),
        ("", "events") => (
            vec![
                ("Last Seen", "string", "", 0, "Time of the last occurrence."),
                ("Type", "string", "", 0, "Type of this event."),
                (
                    "Reason",
                    "string",
                    "",
                    0,
                    "Short, machine understandable string that gives the reason for this event being generated.",
                ),
                (
                    "Object",
                    "string",
                    "",
                    0,
                    "The object that this event is about.",
                ),
                (
                    "Message",
                    "string",
                    "",
                    0,
                    "A human-readable description of the status of this operation.",
                ),
            ],
            vec![
                json!(age(match s(object, "/lastTimestamp") {
                    "" => s(object, "/metadata/creationTimestamp"),
                    t => t,
                })),
                json!(s(object, "/type")),
                json!(s(object, "/reason")),
                json!(format!(
                    "{}/{}",
                    s(object, "/involvedObject/kind").to_lowercase(),
                    s(object, "/involvedObject/name")
                )),
                json!(s(object, "/message")),
            ],
        ),
        ("certificates.k8s.io", "certificatesigningrequests") => {
            let mut condition: Vec<String> = object
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|c| c.get("type").and_then(Value::as_str).map(str::to_owned))
                .collect();
            if object.pointer("/status/certificate").is_some() {
                condition.push("Issued".into());
            }
            let condition = if condition.is_empty() {
                "Pending".to_owned()
            } else {
                condition.join(",")
            };
            let duration = object
                .pointer("/spec/expirationSeconds")
                .and_then(Value::as_u64)
                .map(|secs| match secs {
                    s if s % 3600 == 0 => format!("{}h", s / 3600),
                    s if s % 60 == 0 => format!("{}m", s / 60),
                    s => format!("{s}s"),
                })
                .unwrap_or_else(|| "<none>".into());
            (
                vec![
                    NAME,
                    AGE,
                    ("SignerName", "string", "", 0, "The name of the signer"),
                    (
                        "Requestor",
                        "string",
                        "",
                        0,
                        "The user who asked for the certificate",
                    ),
                    (
                        "RequestedDuration",
                        "string",
                        "",
                        0,
                        "How long the certificate was asked to be valid",
                    ),
                    (
                        "Condition",
                        "string",
                        "",
                        0,
                        "Approved, Denied, Failed, Issued or Pending",
                    ),
                ],
                vec![
                    name,
                    created,
                    json!(s(object, "/spec/signerName")),
                    json!(s(object, "/spec/username")),
                    json!(duration),
                    json!(condition),
                ],
            )
        }
        // The Gateway API CRDs' additionalPrinterColumns.
        ("gateway.networking.k8s.io", "gatewayclasses") => (
            vec![
                NAME,
                ("Controller", "string", "", 0, "spec.controllerName"),
                (
                    "Accepted",
                    "string",
                    "",
                    0,
                    "The Accepted condition's status",
                ),
                AGE,
                ("Description", "string", "", 1, "spec.description"),
            ],
            vec![
                name,
                json!(s(object, "/spec/controllerName")),
                json!(condition_status(object, "Accepted")),
                created,
                json!(s(object, "/spec/description")),
            ],
        ),
        ("gateway.networking.k8s.io", "gateways") => {
            let addresses: Vec<&str> = object
                .pointer("/status/addresses")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|a| a.get("value").and_then(Value::as_str))
                .collect();
            (
                vec![
                    NAME,
                    ("Class", "string", "", 0, "spec.gatewayClassName"),
                    ("Address", "string", "", 0, "status.addresses[*].value"),
                    (
                        "Programmed",
                        "string",
                        "",
                        0,
                        "The Programmed condition's status",
                    ),
                    AGE,
                ],
                vec![
                    name,
                    json!(s(object, "/spec/gatewayClassName")),
                    json!(addresses.join(",")),
                    json!(condition_status(object, "Programmed")),
                    created,
                ],
            )
        }
        ("gateway.networking.k8s.io", "httproutes") => {
            let hostnames: Vec<&str> = object
                .pointer("/spec/hostnames")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            (
                vec![NAME, ("Hostnames", "string", "", 0, "spec.hostnames"), AGE],
                vec![name, json!(hostnames.join(",")), created],
            )
        }
        _ => (vec![NAME, AGE], vec![name, created]),
    }
}

/// The metadata-only form of an object that a Table row carries.
pub fn partial_metadata(object: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object.get("metadata").cloned().unwrap_or(json!({})),
    })
}

/// A Table of `objects`; `include_object` is `None`, `Metadata` (the default) or
/// `Object`.
pub fn table(
    kind: &Kind,
    objects: &[&Value],
    resource_version: &str,
    continue_token: Option<&str>,
    include_object: &str,
) -> Value {
    let empty = json!({"metadata": {}});
    let (columns, _) = columns_and_cells(kind, objects.first().copied().unwrap_or(&empty));
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let (_, cells) = columns_and_cells(kind, o);
            let object = match include_object {
                "None" => Value::Null,
                "Object" => (*o).clone(),
                _ => partial_metadata(o),
            };
            json!({"cells": cells, "object": object})
        })
        .collect();
    let mut metadata = json!({"resourceVersion": resource_version});
    if let Some(token) = continue_token {
        metadata["continue"] = json!(token);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": columns.iter().map(|(name, ty, format, priority, description)| json!({
            "name": name, "type": ty, "format": format, "description": description, "priority": priority,
        })).collect::<Vec<_>>(),
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::kinds::find;

    #[test]
    fn pod_rows_read_as_kubectl_prints_them() {
        let pods = find("", "v1", "pods").expect("pods");
        let pod = json!({"metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "n1"},
            "status": {"phase": "Running", "containerStatuses": [{"ready": true, "restartCount": 2}, {"ready": false, "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        let t = table(pods, &[&pod], "5", None, "Metadata");
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "web");
        assert_eq!(cells[1], "1/2");
        assert_eq!(cells[2], "CrashLoopBackOff");
        assert_eq!(cells[3], "3");
        assert_eq!(cells[6], "n1");
        assert_eq!(t["columnDefinitions"][1]["name"], "Ready");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(age("garbage"), "<unknown>");
        // A finished pod shows its container's end, as kubectl's printPod does.
        let status = |phase: &str, containers: serde_json::Value| {
            let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}, {"name": "b"}]},
                             "status": {"phase": phase, "containerStatuses": containers,
                                        "conditions": [{"type": "Ready", "status": "True"}]}});
            table(pods, &[&pod], "5", None, "Metadata")["rows"][0]["cells"][2].clone()
        };
        let done = json!({"state": {"terminated": {"reason": "Completed", "exitCode": 0}}});
        let crashed = json!({"state": {"terminated": {"exitCode": 3}}});
        let running = json!({"ready": true, "state": {"running": {}}});
        assert_eq!(status("Succeeded", json!([done, done])), "Completed");
        assert_eq!(status("Failed", json!([crashed, done])), "ExitCode:3");
        assert_eq!(status("Running", json!([running, done])), "Running");
        assert_eq!(status("Running", json!([running, running])), "Running");
    }
}
