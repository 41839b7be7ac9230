//! Issue 12's benchmark: the Kubernetes API of one `brink server` beside the same
//! writes straight to its store, in one run, with ratios.
//!
//!   cargo bench --bench api
//!
//! 1. Pod creates/s, p50 and p99 with 16 and 256 clients through the API (HTTPS with
//!    the admin certificate, HTTP/1.1 keep-alive, one connection per client, each
//!    client sequential), beside creates of the same JSON straight to the store's API.
//! 2. `list` of 10,000 pods: `resourceVersion=0` and consistent (linearizable), p50/p99.
//! 3. 1,000 concurrent watchers: write acknowledged → event received, p50/p99.
//! 4. The server's RSS with those pods stored.
//!
//! `BENCH_SECONDS` (default 5) per load point. Figures go to stdout; nothing here passes
//! or fails on a number.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Server {
    child: Child,
    store: SocketAddr,
    api: SocketAddr,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(root: &Path) -> Server {
    let dir = root.join("member");
    let _ = std::fs::remove_dir_all(&dir);
    let store: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let child = Command::new(brink_bin())
        .args(["server", "--init", "--data-dir"])
        .arg(&dir)
        .args(["--listen", &store.to_string()])
        .args(["--peer-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--api-listen", &api.to_string()])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("brink server");
    let server = Server {
        child,
        store,
        api,
        dir,
    };
    wait_for("the member", || {
        http_json(server.store, "GET", "/readyz", None)
            .ok()
            .filter(|(s, _)| *s == 200)
    });
    server
}

/// The admin identity from the kubeconfig `--init` wrote.
fn tls(server: &Server) -> Arc<rustls::ClientConfig> {
    use base64::Engine as _;
    let text =
        std::fs::read_to_string(server.dir.join("pki/admin.kubeconfig")).expect("kubeconfig");
    let field = |name: &str| {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .expect("field");
        let data = line.split_once(':').expect("value").1.trim();
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .expect("base64")
    };
    let ca = CertificateDer::from_pem_slice(&field("certificate-authority-data:")).expect("ca");
    let cert = CertificateDer::from_pem_slice(&field("client-certificate-data:")).expect("cert");
    let key = PrivateKeyDer::from_pem_slice(&field("client-key-data:")).expect("key");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert], key)
            .expect("client auth"),
    )
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr, tls: Option<Arc<rustls::ClientConfig>>) -> Sender {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = tcp.set_nodelay(true);
    match tls {
        Some(config) => {
            let name = ServerName::from(addr.ip());
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .expect("tls");
            let (sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .expect("handshake");
            tokio::spawn(conn);
            sender
        }
        None => {
            let (sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .expect("handshake");
            tokio::spawn(conn);
            sender
        }
    }
}

async fn send(
    sender: &mut Sender,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Option<(u16, Bytes)> {
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "bench")
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .ok()?;
    let response = sender.send_request(request).await.ok()?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.ok()?.to_bytes();
    Some((status, bytes))
}

struct Figures {
    count: usize,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn figures(mut latencies: Vec<f64>, seconds: f64, errors: u64) -> Figures {
    latencies.sort_by(|a, b| a.total_cmp(b));
    Figures {
        count: latencies.len(),
        per_sec: latencies.len() as f64 / seconds,
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        errors,
    }
}

fn pod(name: &str, namespace: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": {"app": "bench"}},
           "spec": {"containers": [{"name": "web", "image": "registry.example/hello:1"}]}})
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// `clients` sequential clients for `seconds`, each making a create with `make`.
fn load(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    clients: usize,
    seconds: u64,
    expect: u16,
    make: Arc<dyn Fn(usize, u64) -> (String, String) + Send + Sync>,
) -> Figures {
    runtime().block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let make = make.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let mut sender = connect(addr, tls.clone()).await;
                    let (mut latencies, mut errors, mut i) = (Vec::new(), 0u64, 0u64);
                    while Instant::now() < deadline {
                        let (path, body) = make(c, i);
                        i += 1;
                        let started = Instant::now();
                        match send(&mut sender, "POST", &path, Some(body)).await {
                            Some((status, _)) if status == expect => {
                                latencies.push(started.elapsed().as_secs_f64() * 1e3)
                            }
                            Some(_) => errors += 1,
                            None => {
                                errors += 1;
                                sender = connect(addr, tls.clone()).await;
                            }
                        }
                    }
                    (latencies, errors)
                })
            })
            .collect();
        let (mut all, mut errors) = (Vec::new(), 0);
        for t in tasks {
            let (l, e) = t.await.expect("client");
            all.extend(l);
            errors += e;
        }
        figures(all, seconds as f64, errors)
    })
}

fn creates(server: &Server, clients: usize, seconds: u64, round: &str) -> (Figures, Figures) {
    let tls = tls(server);
    let round_api = round.to_owned();
    let api = load(
        server.api,
        Some(tls),
        clients,
        seconds,
        201,
        Arc::new(move |c, i| {
            let name = format!("{round_api}-c{c}-{i}");
            (
                "/api/v1/namespaces/default/pods".to_owned(),
                pod(&name, "default").to_string(),
            )
        }),
    );
    let round_store = round.to_owned();
    let store = load(
        server.store,
        None,
        clients,
        seconds,
        200,
        Arc::new(move |c, i| {
            let name = format!("{round_store}-c{c}-{i}");
            let value = pod(&name, "default").to_string();
            (
                "/v0/txn".to_owned(),
                json!({"ops": [{"op": "create", "key": format!("/bench/{name}"), "value": value}]})
                    .to_string(),
            )
        }),
    );
    (api, store)
}

/// Fills namespace `ns` with `count` pods (64 clients).
fn fill(server: &Server, ns: &str, count: u64) {
    let tls = tls(server);
    let addr = server.api;
    let ns = ns.to_owned();
    runtime().block_on(async move {
        let mut sender = connect(addr, Some(tls.clone())).await;
        let _ = send(
            &mut sender,
            "POST",
            "/api/v1/namespaces",
            Some(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
                    .to_string(),
            ),
        )
        .await;
        let clients = 64u64;
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let tls = tls.clone();
                let ns = ns.clone();
                tokio::spawn(async move {
                    let mut sender = connect(addr, Some(tls)).await;
                    let mut i = c;
                    while i < count {
                        let body = pod(&format!("p{i}"), &ns).to_string();
                        let _ = send(
                            &mut sender,
                            "POST",
                            &format!("/api/v1/namespaces/{ns}/pods"),
                            Some(body),
                        )
                        .await;
                        i += clients;
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
}

fn lists(server: &Server, ns: &str, rv0: bool, rounds: usize) -> (Figures, usize) {
    let tls = tls(server);
    let addr = server.api;
    let path = format!(
        "/api/v1/namespaces/{ns}/pods{}",
        if rv0 { "?resourceVersion=0" } else { "" }
    );
    runtime().block_on(async move {
        let mut sender = connect(addr, Some(tls)).await;
        let (mut latencies, mut items) = (Vec::new(), 0);
        let started_all = Instant::now();
        for _ in 0..rounds {
            let started = Instant::now();
            if let Some((200, body)) = send(&mut sender, "GET", &path, None).await {
                latencies.push(started.elapsed().as_secs_f64() * 1e3);
                items = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["items"].as_array().map(Vec::len))
                    .unwrap_or(0);
            }
        }
        let seconds = started_all.elapsed().as_secs_f64();
        (figures(latencies, seconds, 0), items)
    })
}

/// `watchers` watches, then `writes` configmap creates one at a time: for every
/// (watcher, write), acknowledged → received.
fn watchers(server: &Server, watchers: usize, writes: usize) -> Figures {
    let tls = tls(server);
    let addr = server.api;
    runtime().block_on(async move {
        let mut sender = connect(addr, Some(tls.clone())).await;
        let _ = send(
            &mut sender,
            "POST",
            "/api/v1/namespaces",
            Some(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "watch"}})
                    .to_string(),
            ),
        )
        .await;
        let (_, list) = send(
            &mut sender,
            "GET",
            "/api/v1/namespaces/watch/configmaps",
            None,
        )
        .await
        .expect("list");
        let rv = serde_json::from_slice::<Value>(&list)
            .ok()
            .and_then(|v| v["metadata"]["resourceVersion"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
        let ready = Arc::new(tokio::sync::Barrier::new(watchers + 1));
        for _ in 0..watchers {
            let tls = tls.clone();
            let rv = rv.clone();
            let seen = seen_tx.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                let mut sender = connect(addr, Some(tls)).await;
                let request = hyper::Request::builder()
                    .uri(format!(
                        "/api/v1/namespaces/watch/configmaps?watch=true&resourceVersion={rv}"
                    ))
                    .header("host", "bench")
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                let response = sender.send_request(request).await.expect("watch");
                ready.wait().await;
                let mut body = response.into_body();
                let mut buffer = Vec::new();
                while let Some(Ok(frame)) = body.frame().await {
                    let at = Instant::now();
                    if let Ok(data) = frame.into_data() {
                        buffer.extend_from_slice(&data);
                        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = buffer.drain(..=end).collect();
                            if let Ok(event) = serde_json::from_slice::<Value>(&line)
                                && let Some(name) = event["object"]["metadata"]["name"].as_str()
                            {
                                let _ = seen.send((name.to_owned(), at));
                            }
                        }
                    }
                }
            });
        }
        drop(seen_tx);
        ready.wait().await;
        let mut acked = std::collections::HashMap::new();
        let started_all = Instant::now();
        for i in 0..writes {
            let name = format!("cm{i}");
            let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}})
                .to_string();
            if let Some((201, _)) = send(
                &mut sender,
                "POST",
                "/api/v1/namespaces/watch/configmaps",
                Some(body),
            )
            .await
            {
                acked.insert(name, Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut latencies = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while latencies.len() < watchers * acked.len() {
            match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
                Ok(Some((name, at))) => {
                    if let Some(ack) = acked.get(&name) {
                        latencies.push(at.saturating_duration_since(*ack).as_secs_f64() * 1e3);
                    }
                }
                _ => break,
            }
        }
        let missing = (watchers * acked.len()).saturating_sub(latencies.len()) as u64;
        figures(latencies, started_all.elapsed().as_secs_f64(), missing)
    })
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds: u64 = env_or("BENCH_SECONDS", 5);
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-api");
    let _ = std::fs::create_dir_all(&root);
    let server = start(&root);
    println!("Kubernetes API of one member, release build ({seconds} s per load point)");
    fill(&server, "list", 10_000);
    println!(
        "{:<40} {:.1} MiB",
        "server RSS, 10,000 pods stored",
        rss_mib(server.child.id())
    );
    for (label, rv0) in [
        ("list 10,000 pods, RV=0", true),
        ("list 10,000 pods, consistent", false),
    ] {
        let (f, items) = lists(&server, "list", rv0, 30);
        println!(
            "{label:<40} items {items:>6}  p50 {:>8.1} ms  p99 {:>8.1} ms",
            f.p50_ms, f.p99_ms
        );
    }
    let f = watchers(&server, 1000, 50);
    println!(
        "{:<40} events {:>6}  p50 {:>8.1} ms  p99 {:>8.1} ms  missing {}",
        "1,000 watchers, ack -> event", f.count, f.p50_ms, f.p99_ms, f.errors
    );
    println!(
        "{:<28} {:>10} {:>9} {:>9} {:>7} | {:>10} {:>9} {:>9} | {:>6}",
        "creates", "API /s", "p50 ms", "p99 ms", "errors", "store /s", "p50 ms", "p99 ms", "ratio"
    );
    for clients in [16, 256] {
        let (api, store) = creates(&server, clients, seconds, &format!("r{clients}"));
        println!(
            "{:<28} {:>10.0} {:>9.2} {:>9.2} {:>7} | {:>10.0} {:>9.2} {:>9.2} | {:>5.2}x",
            format!("pod creates, {clients} clients"),
            api.per_sec,
            api.p50_ms,
            api.p99_ms,
            api.errors,
            store.per_sec,
            store.p50_ms,
            store.p99_ms,
            api.per_sec / store.per_sec
        );
    }
    println!(
        "{:<40} {:.1} MiB",
        "server RSS after the create rounds",
        rss_mib(server.child.id())
    );
}
