//! Issue 13's benchmark: a site with its scheduler, controllers and nodes, in one run.
//!
//!   cargo bench --bench site
//!
//! 1. Scheduler throughput: `SITE_PODS` (5,000) pods created while no scheduler runs,
//!    onto `SITE_NODES` (500) Node objects the benchmark registers Ready; then
//!    `brink scheduler` starts and the time until every pod is bound (seen by a watch)
//!    gives pods/s. kube-scheduler cannot run here; its published figure (about
//!    100–300 pods/s on clusters of this size) is printed beside Brink's.
//! 2. Pod startup: three `brink node` processes (each its own 127.0.0.x, ID pool and
//!    data directory) joined to a fresh site; `STARTUP_PODS` (100) hello pods created
//!    one after another; create → Ready seen by a watch, p50/p99 (Kubernetes' SLO is
//!    p99 ≤ 5 s).
//! 3. The node agents' RSS idle and with those pods running.
//! 4. API writes an idle node makes per minute (its Lease, and nothing else), counted
//!    from a watch of everything over `IDLE_SECONDS` (30).
//!
//! Figures go to stdout; nothing here passes or fails on a number.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Site {
    _server: Process,
    dir: PathBuf,
    api: SocketAddr,
}

fn start_site(root: &Path, extra: &[&str]) -> Site {
    let dir = root.join("member");
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let store = format!("127.0.0.1:{}", free_port());
    let child = Command::new(brink_bin())
        .args(["server", "--init", "--data-dir"])
        .arg(&dir)
        .args([
            "--listen",
            &store,
            "--peer-listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .args(["--api-listen", &api.to_string(), "--raft-tick", "20ms"])
        .args(extra)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("brink server");
    let site = Site {
        _server: Process(child),
        dir,
        api,
    };
    let kubeconfig = site.kubeconfig();
    wait_for("the site's API", || {
        Command::new("kubectl")
            .args(["get", "--raw", "/readyz"])
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .ok()
            .filter(|o| o.status.success())
    });
    site
}

impl Site {
    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("pki/admin.kubeconfig")
    }

    async fn client(&self) -> kube::Client {
        let config = kube::config::Kubeconfig::read_from(self.kubeconfig()).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
            .await
            .expect("config");
        kube::Client::try_from(config).expect("client")
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn scheduler_throughput(root: &Path) {
    let nodes_n: usize = env_or("SITE_NODES", 500);
    let pods_n: usize = env_or("SITE_PODS", 5000);
    let site = start_site(
        &root.join("scheduler"),
        &["--disable-scheduler", "--node-grace-period", "1h"],
    );
    let client = site.client().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let ready = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}],
                                  "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
                                  "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110"}}});
    futures::stream::iter(0..nodes_n)
        .for_each_concurrent(32, |i| {
            let (nodes, ready) = (nodes.clone(), ready.clone());
            async move {
                let name = format!("bench-{i:04}");
                let node: Node =
                    serde_json::from_value(json!({"metadata": {"name": name}})).expect("node");
                nodes
                    .create(&PostParams::default(), &node)
                    .await
                    .expect("create node");
                nodes
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&ready))
                    .await
                    .expect("node status");
            }
        })
        .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let created = Instant::now();
    futures::stream::iter(0..pods_n)
        .for_each_concurrent(64, |i| {
            let pods = pods.clone();
            async move {
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("p-{i:05}")},
                    "spec": {"containers": [{"name": "c", "image": "oci:/nowhere:x",
                                             "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]},
                }))
                .expect("pod");
                pods.create(&PostParams::default(), &pod).await.expect("create pod");
            }
        })
        .await;
    let creating = created.elapsed();
    let list = pods.list(&ListParams::default()).await.expect("list");
    let version = list.metadata.resource_version.unwrap_or_default();
    let mut scheduler = Process(
        Command::new(brink_bin())
            .args(["scheduler", "--kubeconfig"])
            .arg(site.kubeconfig())
            .args(["--parallel-bindings", "64"])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("brink scheduler"),
    );
    let started = Instant::now();
    let mut bound = 0usize;
    let mut first: Option<Duration> = None;
    let mut stream = pods
        .watch(&WatchParams::default().timeout(290), &version)
        .await
        .expect("watch")
        .boxed();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut seen = std::collections::HashSet::new();
    while bound < pods_n && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Ok(Some(Ok(WatchEvent::Modified(pod)))) => {
                if pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .is_some()
                    && seen.insert(pod.metadata.name.clone().unwrap_or_default())
                {
                    first.get_or_insert(started.elapsed());
                    bound += 1;
                }
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let took = started.elapsed();
    let _ = scheduler.0.kill();
    println!("## scheduler throughput");
    println!(
        "  {pods_n} pods created in {:.1} s while no scheduler ran; {nodes_n} Ready nodes",
        creating.as_secs_f64()
    );
    let first = first.unwrap_or_default();
    let binding = (took - first).as_secs_f64().max(f64::EPSILON);
    println!(
        "  brink scheduler: {bound} bound in {:.2} s from its process start ({:.0} pods/s); the first after {:.2} s (start and initial list), then {:.0} pods/s",
        took.as_secs_f64(),
        bound as f64 / took.as_secs_f64(),
        first.as_secs_f64(),
        bound as f64 / binding
    );
    println!(
        "  kube-scheduler (published, not run here): ~100-300 pods/s; ratio of the binding rate to 200 pods/s: {:.1}x",
        bound as f64 / binding / 200.0
    );
}

async fn pod_startup(root: &Path) {
    let pods_n: usize = env_or("STARTUP_PODS", 100);
    let idle_seconds: u64 = env_or("IDLE_SECONDS", 30);
    let site = start_site(&root.join("startup"), &[]);
    let token = brink(&[
        "server",
        "token",
        "create",
        "--data-dir",
        site.dir.to_str().expect("utf-8"),
        "--print-join-command",
    ]);
    let printed = stdout(&token);
    let secret = printed.lines().next().unwrap_or_default().to_owned();
    let pin = printed
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_owned();
    let server = format!("https://{}", site.api);
    let images = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(images.path(), "hello");
    // Joining needs cluster-info signed for the token (the leader's sweep, ~1 s).
    std::thread::sleep(Duration::from_secs(2));
    let nodes: Vec<Process> = (0..3u32)
        .map(|i| {
            let ip = format!("127.0.0.{}", i + 2);
            let dir = root.join(format!("node-{i}"));
            Process(
                Command::new(brink_bin())
                    .args(["node", "--data-dir", dir.to_str().expect("utf-8")])
                    .args(["--node-name", &format!("edge-{i}")])
                    .args(["--kubelet-addr", &format!("{ip}:{}", free_port())])
                    .args(["--host-port-address", &ip, "--gateway-address", &ip])
                    .args([
                        "--id-pool-base",
                        &(1_000_000 + i * 256 * 65_536).to_string(),
                        "--id-pool-ranges",
                        "256",
                    ])
                    .args([
                        "--server",
                        &server,
                        "--token",
                        &secret,
                        "--discovery-token-ca-cert-hash",
                        &pin,
                    ])
                    .env("RUST_LOG", "error")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("brink node"),
            )
        })
        .collect();
    let client = site.client().await;
    let node_api: Api<Node> = Api::all(client.clone());
    let started = Instant::now();
    loop {
        let list = node_api.list(&ListParams::default()).await.expect("nodes");
        let ready = list
            .items
            .iter()
            .filter(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        if ready == 3 {
            break;
        }
        assert!(started.elapsed() < WAIT, "the three nodes did not join");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let idle_rss: Vec<u64> = nodes.iter().map(|n| rss_kib(n.0.id())).collect();

    // Idle writes: everything a watch sees for a while, by kind.
    let everything = client.clone();
    let idle = async {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::all(everything.clone());
        let nodes: Api<Node> = Api::all(everything.clone());
        let pods: Api<Pod> = Api::all(everything);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let (lv, nv, pv) = (
            leases
                .list(&ListParams::default())
                .await
                .expect("leases")
                .metadata
                .resource_version
                .unwrap_or_default(),
            nodes
                .list(&ListParams::default())
                .await
                .expect("nodes")
                .metadata
                .resource_version
                .unwrap_or_default(),
            pods.list(&ListParams::default())
                .await
                .expect("pods")
                .metadata
                .resource_version
                .unwrap_or_default(),
        );
        let mut l = leases
            .watch(&WatchParams::default(), &lv)
            .await
            .expect("watch")
            .boxed();
        let mut n = nodes
            .watch(&WatchParams::default(), &nv)
            .await
            .expect("watch")
            .boxed();
        let mut p = pods
            .watch(&WatchParams::default(), &pv)
            .await
            .expect("watch")
            .boxed();
        let until = tokio::time::Instant::now() + Duration::from_secs(idle_seconds);
        loop {
            tokio::select! {
                Some(Ok(WatchEvent::Modified(_))) = l.next() => *counts.entry("leases").or_default() += 1,
                Some(Ok(WatchEvent::Modified(_))) = n.next() => *counts.entry("nodes").or_default() += 1,
                Some(Ok(WatchEvent::Modified(_))) = p.next() => *counts.entry("pods").or_default() += 1,
                () = tokio::time::sleep_until(until) => break,
            }
        }
        counts
    };
    let counts = idle.await;
    let total: usize = counts.values().sum();

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let version = pods
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(290), &version)
        .await
        .expect("watch")
        .boxed();
    let mut created: HashMap<String, Instant> = HashMap::new();
    for i in 0..pods_n {
        let name = format!("start-{i:03}");
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "hello", "image": hello}]},
        }))
        .expect("pod");
        created.insert(name, Instant::now());
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("create");
    }
    let mut latencies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while latencies.len() < pods_n && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
            Ok(Some(Ok(WatchEvent::Modified(pod)))) => {
                let ready = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let name = pod.metadata.name.clone().unwrap_or_default();
                if ready && let Some(at) = created.remove(&name) {
                    latencies.push(at.elapsed().as_secs_f64() * 1000.0);
                }
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    latencies.sort_by(f64::total_cmp);
    let busy_rss: Vec<u64> = nodes.iter().map(|n| rss_kib(n.0.id())).collect();
    println!(
        "## pod startup ({} of {pods_n} pods on 3 nodes)",
        latencies.len()
    );
    println!(
        "  create -> Ready seen by a watch: p50 {:.0} ms, p99 {:.0} ms (goals 50/200 ms; Kubernetes' SLO p99 <= 5 s)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    println!("## node agent RSS");
    println!(
        "  idle: {:?} MiB",
        idle_rss.iter().map(|k| k / 1024).collect::<Vec<_>>()
    );
    println!(
        "  with {} pods across them: {:?} MiB",
        latencies.len(),
        busy_rss.iter().map(|k| k / 1024).collect::<Vec<_>>()
    );
    println!("## API writes by idle nodes");
    println!(
        "  {total} writes by 3 idle nodes in {idle_seconds} s ({counts:?}): {:.1} per node per minute",
        total as f64 / 3.0 * 60.0 / idle_seconds as f64
    );
    drop(nodes);
}

fn main() {
    let root = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        scheduler_throughput(root.path()).await;
        pod_startup(root.path()).await;
    });
}
