//! kubectl-style tables.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

/// kubectl's STATUS column: a waiting or terminated container's reason wins over the phase.
pub fn pod_status(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    let mut reason = status
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    if let Some(r) = status.and_then(|s| s.reason.clone()) {
        reason = r;
    }
    let mut running = false;
    for c in status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .rev()
    {
        let Some(state) = &c.state else { continue };
        if let Some(w) = state
            .waiting
            .as_ref()
            .and_then(|w| w.reason.clone())
            .filter(|r| !r.is_empty())
        {
            reason = w;
        } else if let Some(t) = &state.terminated {
            reason = t
                .reason
                .clone()
                .unwrap_or_else(|| format!("ExitCode:{}", t.exit_code));
        } else if state.running.is_some() && c.ready {
            running = true;
        }
    }
    if reason == "Completed" && running {
        reason = "Running".into();
    }
    reason
}

/// `5s`, `3m`, `2h`, `4d`, as kubectl prints ages.
pub fn age(since: Option<Timestamp>) -> String {
    let Some(since) = since else {
        return "<unknown>".into();
    };
    let secs = Timestamp::now()
        .as_second()
        .saturating_sub(since.as_second())
        .max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The True/False/Unknown of a condition in `conditions` (a JSON array), as kubectl's
/// printer columns show it.
fn condition_status(conditions: Option<&serde_json::Value>, type_: &str) -> String {
    conditions
        .and_then(|c| c.as_array())
        .and_then(|c| {
            c.iter()
                .find(|c| c.get("type").and_then(|t| t.as_str()) == Some(type_))
        })
        .and_then(|c| c.get("status").and_then(|s| s.as_str()))
        .unwrap_or("Unknown")
        .to_string()
}

/// Gateway API objects with the printer columns of their CRDs, Services and Endpoints
/// with kubectl's.
pub fn objects(
    resource: crate::client::Resource,
    items: &[serde_json::Value],
    with_namespace: bool,
) -> String {
    use crate::client::Resource;
    let text = |v: &serde_json::Value, pointer: &str| {
        v.pointer(pointer)
            .and_then(|s| s.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let created = |v: &serde_json::Value| {
        v.pointer("/metadata/creationTimestamp")
            .and_then(|t| t.as_str())
            .and_then(|t| t.parse::<Timestamp>().ok())
    };
    let mut header: Vec<&str> = match resource {
        Resource::Gatewayclasses => vec!["NAME", "CONTROLLER", "ACCEPTED", "AGE"],
        Resource::Gateways => vec!["NAME", "CLASS", "ADDRESS", "PROGRAMMED", "AGE"],
        Resource::Services => vec![
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE",
        ],
        Resource::Endpoints => vec!["NAME", "ENDPOINTS", "AGE"],
        _ => vec!["NAME", "HOSTNAMES", "AGE"],
    };
    let list =
        |v: &serde_json::Value, pointer: &str, each: &dyn Fn(&serde_json::Value) -> String| {
            v.pointer(pointer)
                .and_then(|a| a.as_array())
                .map(|a| a.iter().map(each).collect::<Vec<_>>())
                .unwrap_or_default()
        };
    if with_namespace {
        header.insert(0, "NAMESPACE");
    }
    let mut rows = vec![header.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    for item in items {
        let mut row = match resource {
            Resource::Gatewayclasses => vec![
                text(item, "/metadata/name"),
                text(item, "/spec/controllerName"),
                condition_status(item.pointer("/status/conditions"), "Accepted"),
                age(created(item)),
            ],
            Resource::Gateways => vec![
                text(item, "/metadata/name"),
                text(item, "/spec/gatewayClassName"),
                text(item, "/status/addresses/0/value"),
                condition_status(item.pointer("/status/conditions"), "Programmed"),
                age(created(item)),
            ],
            // Brink gives Services no virtual IP: the gateway reaches their pods.
            Resource::Services => vec![
                text(item, "/metadata/name"),
                text(item, "/spec/type"),
                "<none>".into(),
                "<none>".into(),
                list(item, "/spec/ports", &|p| {
                    format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP"))
                })
                .join(","),
                age(created(item)),
            ],
            // Pods have no IP of their own here: an endpoint is shown as pod:port.
            Resource::Endpoints => {
                let mut endpoints = Vec::new();
                for subset in item
                    .pointer("/subsets")
                    .and_then(|s| s.as_array())
                    .into_iter()
                    .flatten()
                {
                    let port = subset.pointer("/ports/0/port").cloned().unwrap_or_default();
                    for address in list(subset, "/addresses", &|a| text(a, "/targetRef/name")) {
                        endpoints.push(format!("{address}:{port}"));
                    }
                }
                let shown = if endpoints.is_empty() {
                    "<none>".to_string()
                } else {
                    endpoints.join(",")
                };
                vec![text(item, "/metadata/name"), shown, age(created(item))]
            }
            _ => vec![
                text(item, "/metadata/name"),
                item.pointer("/spec/hostnames")
                    .and_then(|h| h.as_array())
                    .map(|h| {
                        let names: Vec<&str> = h.iter().filter_map(|n| n.as_str()).collect();
                        format!("[{}]", names.join(","))
                    })
                    .unwrap_or_default(),
                age(created(item)),
            ],
        };
        if with_namespace {
            row.insert(0, text(item, "/metadata/namespace"));
        }
        rows.push(row);
    }
    render(rows)
}

/// The pod table, kubectl's columns.
pub fn pods(pods: &[Pod], wide: bool, with_namespace: bool) -> String {
    let mut rows = Vec::new();
    let mut header = vec!["NAME", "READY", "STATUS", "RESTARTS", "AGE"];
    if with_namespace {
        header.insert(0, "NAMESPACE");
    }
    if wide {
        header.extend(["IP", "NODE"]);
    }
    rows.push(header.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    for pod in pods {
        let status = pod.status.as_ref();
        let statuses = status
            .and_then(|s| s.container_statuses.clone())
            .unwrap_or_default();
        let total = pod.spec.as_ref().map_or(0, |s| s.containers.len());
        let ready = statuses.iter().filter(|c| c.ready).count();
        let restarts: i32 = statuses.iter().map(|c| c.restart_count).sum();
        let mut row = vec![
            pod.metadata.name.clone().unwrap_or_default(),
            format!("{ready}/{total}"),
            pod_status(pod),
            restarts.to_string(),
            age(status.and_then(|s| s.start_time.as_ref()).map(|t| t.0)),
        ];
        if with_namespace {
            row.insert(0, pod.metadata.namespace.clone().unwrap_or_default());
        }
        if wide {
            row.push(
                status
                    .and_then(|s| s.host_ip.clone())
                    .unwrap_or_else(|| "<none>".into()),
            );
            row.push(
                pod.spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_else(|| "<none>".into()),
            );
        }
        rows.push(row);
    }
    render(rows)
}

/// Rows as kubectl aligns them: columns padded, three spaces apart.
/// Left-aligned columns three spaces apart, as kubectl prints them.
pub fn render(rows: Vec<Vec<String>>) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}
