//! `brink get` and `brink logs`: clients of a node's kubelet endpoint, printing what
//! kubectl prints.

use std::io::Write as _;
use std::net::SocketAddr;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, ValueEnum};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;

use crate::table;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    Wide,
    Json,
    Yaml,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Resource {
    #[value(alias = "pod", alias = "po")]
    Pods,
    #[value(alias = "gatewayclass", alias = "gc")]
    Gatewayclasses,
    #[value(alias = "gateway", alias = "gtw")]
    Gateways,
    #[value(alias = "httproute")]
    Httproutes,
    #[value(alias = "service", alias = "svc")]
    Services,
    #[value(alias = "ep")]
    Endpoints,
}

impl Resource {
    /// The API group path and plural of the list on the kubelet endpoint, and the kind of
    /// one item (pods have their own path and printer).
    fn api_path(self) -> Option<(&'static str, &'static str, &'static str)> {
        const GATEWAY: &str = "/apis/gateway.networking.k8s.io/v1";
        match self {
            Resource::Pods => None,
            Resource::Gatewayclasses => Some((GATEWAY, "gatewayclasses", "GatewayClass")),
            Resource::Gateways => Some((GATEWAY, "gateways", "Gateway")),
            Resource::Httproutes => Some((GATEWAY, "httproutes", "HTTPRoute")),
            Resource::Services => Some(("/api/v1", "services", "Service")),
            Resource::Endpoints => Some(("/api/v1", "endpoints", "Endpoints")),
        }
    }
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// What to list.
    resource: Resource,
    /// Only this object.
    name: Option<String>,
    /// The node's kubelet endpoint.
    #[arg(long, default_value = "127.0.0.1:10250", env = "BRINK_NODE")]
    node: SocketAddr,
    /// Namespace to list.
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// List every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Output format.
    #[arg(short, long)]
    output: Option<Output>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The pod.
    pod: String,
    /// The container (may be left out when the pod has one).
    #[arg(short, long)]
    container: Option<String>,
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// The node's kubelet endpoint.
    #[arg(long, default_value = "127.0.0.1:10250", env = "BRINK_NODE")]
    node: SocketAddr,
    /// Only the last N lines.
    #[arg(long)]
    tail: Option<u64>,
    /// Prefix each line with its timestamp.
    #[arg(long)]
    timestamps: bool,
    /// Keep streaming new lines.
    #[arg(short, long)]
    follow: bool,
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn fetch(
    node: SocketAddr,
    path: &str,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let uri: hyper::Uri = format!("http://{node}{path}")
        .parse()
        .context("request URI")?;
    let response = client()
        .get(uri)
        .await
        .with_context(|| format!("cannot reach the node at {node} (is `brink node` running?)"))?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("message")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        anyhow::bail!("{status}: {}", message.trim());
    }
    Ok(response)
}

async fn fetch_pods(node: SocketAddr) -> anyhow::Result<Vec<Pod>> {
    let body = fetch(node, "/pods")
        .await?
        .into_body()
        .collect()
        .await?
        .to_bytes();
    let list: serde_json::Value =
        serde_json::from_slice(&body).context("the node sent an invalid PodList")?;
    let items = list.get("items").cloned().unwrap_or_default();
    serde_json::from_value(items).context("the node sent an invalid PodList")
}

pub async fn get(args: GetArgs) -> anyhow::Result<()> {
    if let Some((group, plural, kind)) = args.resource.api_path() {
        return get_objects(args, group, plural, kind).await;
    }
    let mut pods: Vec<Pod> = fetch_pods(args.node)
        .await?
        .into_iter()
        .filter(|p| {
            args.all_namespaces || p.metadata.namespace.as_deref() == Some(args.namespace.as_str())
        })
        .filter(|p| args.name.is_none() || p.metadata.name == args.name)
        .collect();
    if let Some(name) = &args.name
        && pods.is_empty()
    {
        anyhow::bail!("pods {name:?} not found in namespace {}", args.namespace);
    }
    let mut out = std::io::stdout().lock();
    match args.output {
        Some(Output::Json) => {
            let value = single_or_list(&mut pods, args.name.is_some());
            writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        }
        Some(Output::Yaml) => {
            let value = single_or_list(&mut pods, args.name.is_some());
            write!(out, "{}", serde_yaml::to_string(&value)?)?;
        }
        wide => {
            if pods.is_empty() {
                eprintln!("No resources found in {} namespace.", args.namespace);
                return Ok(());
            }
            let wide = matches!(wide, Some(Output::Wide));
            write!(out, "{}", table::pods(&pods, wide, args.all_namespaces))?;
        }
    }
    Ok(())
}

/// Gateway API objects with the status the node's data plane computed, and Services
/// with their local Endpoints.
async fn get_objects(args: GetArgs, group: &str, plural: &str, kind: &str) -> anyhow::Result<()> {
    let body = fetch(args.node, &format!("{group}/{plural}"))
        .await?
        .into_body()
        .collect()
        .await?
        .to_bytes();
    let list: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("the node sent an invalid {kind}List"))?;
    let cluster_scoped = args.resource == Resource::Gatewayclasses;
    let mut items: Vec<serde_json::Value> = list
        .get("items")
        .and_then(|i| i.as_array())
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|o| {
            cluster_scoped
                || args.all_namespaces
                || o.pointer("/metadata/namespace").and_then(|n| n.as_str())
                    == Some(&args.namespace)
        })
        .filter(|o| {
            args.name.is_none()
                || o.pointer("/metadata/name").and_then(|n| n.as_str()) == args.name.as_deref()
        })
        .collect();
    if let Some(name) = &args.name
        && items.is_empty()
    {
        if cluster_scoped {
            anyhow::bail!("{plural} {name:?} not found");
        }
        anyhow::bail!(
            "{plural} {name:?} not found in namespace {}",
            args.namespace
        );
    }
    let value = if args.name.is_some() && items.len() == 1 {
        items.remove(0)
    } else {
        serde_json::json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items})
    };
    let mut out = std::io::stdout().lock();
    match args.output {
        Some(Output::Json) => writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?,
        Some(Output::Yaml) => write!(out, "{}", serde_yaml::to_string(&value)?)?,
        _ => {
            let items = match value.get("items").and_then(|i| i.as_array()) {
                Some(items) => items.clone(),
                None => vec![value],
            };
            if items.is_empty() {
                if cluster_scoped {
                    eprintln!("No resources found");
                } else {
                    eprintln!("No resources found in {} namespace.", args.namespace);
                }
                return Ok(());
            }
            let with_namespace = args.all_namespaces && !cluster_scoped;
            write!(
                out,
                "{}",
                table::objects(args.resource, &items, with_namespace)
            )?;
        }
    }
    Ok(())
}

/// One named pod prints as a Pod, anything else as a List, as kubectl does.
fn single_or_list(pods: &mut Vec<Pod>, named: bool) -> serde_json::Value {
    if named && pods.len() == 1 {
        let pod = pods.remove(0);
        let mut value = serde_json::to_value(&pod).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.insert("apiVersion".into(), "v1".into());
            map.insert("kind".into(), "Pod".into());
        }
        value
    } else {
        serde_json::json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": pods})
    }
}

pub async fn logs(args: LogsArgs) -> anyhow::Result<()> {
    let container = match args.container {
        Some(c) => c,
        None => {
            let pods = fetch_pods(args.node).await?;
            let pod = pods
                .iter()
                .find(|p| {
                    p.metadata.name.as_deref() == Some(args.pod.as_str())
                        && p.metadata.namespace.as_deref() == Some(args.namespace.as_str())
                })
                .with_context(|| {
                    format!(
                        "pods {:?} not found in namespace {}",
                        args.pod, args.namespace
                    )
                })?;
            let names: Vec<String> = pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
                .collect();
            match names.as_slice() {
                [one] => one.clone(),
                _ => anyhow::bail!(
                    "pod {} has several containers; choose one with -c: {}",
                    args.pod,
                    names.join(", ")
                ),
            }
        }
    };
    let mut path = format!(
        "/containerLogs/{}/{}/{container}?timestamps={}&follow={}",
        args.namespace, args.pod, args.timestamps, args.follow
    );
    if let Some(tail) = args.tail {
        path.push_str(&format!("&tailLines={tail}"));
    }
    let mut body = fetch(args.node, &path).await?.into_body();
    let mut out = std::io::stdout();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            out.write_all(&data)?;
            out.flush()?;
        }
    }
    Ok(())
}
