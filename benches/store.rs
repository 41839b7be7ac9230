//! Issue 5's benchmark: three `brink server` members beside three etcd members (Debian's
//! `etcd-server`, fsync on as it ships), on this machine, in one run, with ratios.
//!
//!   cargo bench --bench store
//!
//! Both are driven the same way: HTTP/1.1 with JSON bodies over keep-alive connections to
//! the leader (Brink's store API; etcd's own JSON gateway, `/v3/kv/put` and
//! `/v3/kv/range`), one connection per client, each client sequential. Both keep their
//! data in directories under target/ on the same disk.
//!
//! 1. Writes/s, p50 and p99 with 1, 16 and 256 concurrent clients (each write a new key).
//! 2. Linearizable reads/s, p50 and p99 with 16 and 256 clients.
//! 3. Failover: the leader killed with -9 → the first write acknowledged by another
//!    member, both with their default election settings (several trials each).
//!
//! `BENCH_SECONDS` (default 5) per point, `BENCH_FAILOVERS` (default 5) trials.
//! `BENCH_BRINK_FLAGS` adds flags to every Brink member. Figures go to stdout; nothing
//! here passes or fails on a number.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use serde_json::Value;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn loopback() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().expect("addr")
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

struct Proc {
    api: SocketAddr,
    peer: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Which system a cluster runs.
#[derive(Clone, Copy, PartialEq)]
enum System {
    Brink,
    Etcd,
}

struct Cluster {
    system: System,
    members: Vec<Proc>,
    extra: Vec<String>,
}

fn post(addr: SocketAddr, path: &str, body: &str) -> Option<Value> {
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    use std::io::{Read as _, Write as _};
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    if !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()
}

impl Cluster {
    fn brink(root: &Path, n: usize) -> Cluster {
        let extra: Vec<String> = std::env::var("BENCH_BRINK_FLAGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let mut cluster = Cluster {
            system: System::Brink,
            members: Vec::new(),
            extra,
        };
        for i in 0..n {
            let mut p = Proc {
                api: loopback(),
                peer: loopback(),
                dir: root.join(format!("brink{i}")),
                child: None,
            };
            let join: Vec<String> = if i == 0 {
                vec!["--init".into()]
            } else {
                let token = std::fs::read_to_string(root.join("brink0/pki/join-token"))
                    .expect("token")
                    .trim()
                    .to_owned();
                vec![
                    "--join".into(),
                    cluster.members[0].peer.to_string(),
                    "--token".into(),
                    token,
                ]
            };
            cluster.spawn_brink(&mut p, &join);
            cluster.members.push(p);
            wait_for("brink voters", || {
                let (status, body) =
                    http_json(cluster.members[0].api, "GET", "/v0/members", None).ok()?;
                let v: Value = serde_json::from_str(&body).ok()?;
                (status == 200 && v["voters"].as_array()?.len() == i + 1).then_some(())
            });
        }
        cluster
    }

    fn spawn_brink(&self, p: &mut Proc, extra: &[String]) {
        p.child = Some(
            Command::new(brink_bin())
                .arg("server")
                .arg("--data-dir")
                .arg(&p.dir)
                .args(["--listen", &p.api.to_string()])
                .args(["--peer-listen", &p.peer.to_string()])
                .args(["--api-listen", &format!("127.0.0.1:{}", free_port())])
                .args(&self.extra)
                .args(extra)
                .env("RUST_LOG", "error")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("brink server"),
        );
    }

    fn etcd(root: &Path, n: usize) -> Cluster {
        let mut members: Vec<Proc> = (0..n)
            .map(|i| Proc {
                api: loopback(),
                peer: loopback(),
                dir: root.join(format!("etcd{i}")),
                child: None,
            })
            .collect();
        let initial: Vec<String> = members
            .iter()
            .enumerate()
            .map(|(i, m)| format!("e{i}=http://{}", m.peer))
            .collect();
        let initial = initial.join(",");
        let cluster = Cluster {
            system: System::Etcd,
            members: Vec::new(),
            extra: Vec::new(),
        };
        for (i, m) in members.iter_mut().enumerate() {
            cluster.spawn_etcd(i, m, &initial, "new");
        }
        let cluster = Cluster { members, ..cluster };
        wait_for("an etcd leader", || cluster.leader_of(&[0, 1, 2]));
        cluster
    }

    fn spawn_etcd(&self, i: usize, m: &mut Proc, initial: &str, state: &str) {
        m.child = Some(
            Command::new("etcd")
                .args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(&m.dir)
                .args(["--listen-client-urls", &format!("http://{}", m.api)])
                .args(["--advertise-client-urls", &format!("http://{}", m.api)])
                .args(["--listen-peer-urls", &format!("http://{}", m.peer)])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://{}", m.peer),
                ])
                .args(["--initial-cluster", initial])
                .args(["--initial-cluster-state", state])
                .args(["--log-level", "error"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("etcd (Debian's etcd-server)"),
        );
    }

    /// The index of the leader among `alive`, as they agree.
    fn leader_of(&self, alive: &[usize]) -> Option<usize> {
        match self.system {
            System::Brink => {
                let ids: Vec<u64> = alive
                    .iter()
                    .filter_map(|&i| {
                        let (s, b) =
                            http_json(self.members[i].api, "GET", "/v0/members", None).ok()?;
                        (s == 200)
                            .then(|| serde_json::from_str::<Value>(&b).ok())
                            .flatten()?["leader"]
                            .as_u64()
                    })
                    .collect();
                if ids.len() != alive.len() || ids.iter().any(|&x| x != ids[0]) {
                    return None;
                }
                alive.iter().copied().find(|&i| {
                    std::fs::read_to_string(self.members[i].dir.join("member.json"))
                        .ok()
                        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                        .and_then(|v| v["id"].as_u64())
                        == Some(ids[0])
                })
            }
            System::Etcd => {
                let mut leader = None;
                for &i in alive {
                    let v = post(self.members[i].api, "/v3/maintenance/status", "{}")?;
                    let me = v["header"]["member_id"].as_str()?.to_owned();
                    let l = v["leader"].as_str()?.to_owned();
                    if l == me {
                        leader = Some(i);
                    }
                }
                leader
            }
        }
    }
}

fn write_request(system: System, key: &str) -> (&'static str, String) {
    match system {
        System::Brink => (
            "/v0/txn",
            serde_json::json!({"ops": [{"op": "create", "key": key, "value": "v".repeat(64)}]})
                .to_string(),
        ),
        System::Etcd => (
            "/v3/kv/put",
            serde_json::json!({"key": b64(key), "value": b64(&"v".repeat(64))}).to_string(),
        ),
    }
}

fn read_request(system: System, key: &str) -> (String, Option<String>) {
    match system {
        System::Brink => (format!("/v0/get?key={key}"), None),
        System::Etcd => (
            "/v3/kv/range".into(),
            Some(serde_json::json!({"key": b64(key)}).to_string()),
        ),
    }
}

/// One keep-alive HTTP/1.1 connection.
async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    sender
}

struct Figures {
    ops_per_sec: f64,
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

/// `clients` sequential clients for `seconds`, each sending what `request(client, i)`
/// makes to `addr`.
fn load(
    addr: SocketAddr,
    clients: usize,
    seconds: u64,
    request: Arc<dyn Fn(usize, u64) -> (String, Option<String>) + Send + Sync>,
) -> Figures {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let request = request.clone();
                tokio::spawn(async move {
                    let mut sender = connect(addr).await;
                    let mut latencies = Vec::new();
                    let mut errors = 0u64;
                    let mut i = 0u64;
                    while Instant::now() < deadline {
                        let (path, body) = request(c, i);
                        i += 1;
                        let req = hyper::Request::builder()
                            .method(if body.is_some() { "POST" } else { "GET" })
                            .uri(path)
                            .header("host", addr.to_string())
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body.unwrap_or_default())))
                            .expect("request");
                        let start = Instant::now();
                        match sender.send_request(req).await {
                            Ok(resp) => {
                                let ok = resp.status() == 200;
                                let _ = resp.into_body().collect().await;
                                if ok {
                                    latencies.push(start.elapsed().as_secs_f64() * 1e3);
                                } else {
                                    errors += 1;
                                }
                            }
                            Err(_) => {
                                errors += 1;
                                sender = connect(addr).await;
                            }
                        }
                    }
                    (latencies, errors)
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await.expect("client");
            all.extend(l);
            errors += e;
        }
        all.sort_by(|a, b| a.total_cmp(b));
        Figures {
            ops_per_sec: all.len() as f64 / seconds as f64,
            p50_ms: percentile(&all, 0.50),
            p99_ms: percentile(&all, 0.99),
            errors,
        }
    })
}

fn writes(cluster: &Cluster, clients: usize, seconds: u64, round: &str) -> Figures {
    let leader = cluster.leader_of(&[0, 1, 2]).expect("leader");
    let round = round.to_owned();
    let system = cluster.system;
    let make = Arc::new(move |c: usize, i: u64| {
        let (path, body) = write_request(system, &format!("/bench/{round}/c{c}/{i}"));
        (path.to_owned(), Some(body))
    });
    load(cluster.members[leader].api, clients, seconds, make)
}

fn reads(cluster: &Cluster, clients: usize, seconds: u64) -> Figures {
    let leader = cluster.leader_of(&[0, 1, 2]).expect("leader");
    // Keys the reads find (written by the 1-client write round).
    let system = cluster.system;
    let make = Arc::new(move |_c: usize, i: u64| {
        read_request(system, &format!("/bench/w1/c0/{}", i % 64))
    });
    load(cluster.members[leader].api, clients, seconds, make)
}

/// Kills the leader and measures until another member acknowledges a write; then brings
/// the killed member back and waits for a settled leader.
fn failover(cluster: &mut Cluster, trial: usize) -> Duration {
    let leader = wait_for("a leader", || cluster.leader_of(&[0, 1, 2]));
    // Let the followers' election timers run from a fresh heartbeat, as in steady state.
    std::thread::sleep(Duration::from_millis(500));
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let killed_at = Instant::now();
    cluster.members[leader].kill9();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let mut n = 0u64;
    // Writes go to both survivors, a new attempt every 10 ms, each waiting up to 3 s.
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        for &o in &others {
            n += 1;
            let key = format!("/bench/failover/{trial}/{n}");
            let (path, body) = write_request(cluster.system, &key);
            let addr = cluster.members[o].api;
            let (tx, done) = (tx.clone(), done.clone());
            std::thread::spawn(move || {
                if post(addr, path, &body).is_some() {
                    done.store(true, std::sync::atomic::Ordering::Relaxed);
                    let _ = tx.send(killed_at.elapsed());
                }
            });
        }
        std::thread::sleep(Duration::from_millis(10));
        assert!(killed_at.elapsed() < Duration::from_secs(60), "no failover");
    }
    let took = rx.recv().expect("a time");
    // Back to three members: the killed one restarts from its directory.
    let mut p = std::mem::replace(
        &mut cluster.members[leader],
        Proc {
            api: loopback(),
            peer: loopback(),
            dir: PathBuf::new(),
            child: None,
        },
    );
    match cluster.system {
        System::Brink => cluster.spawn_brink(&mut p, &[]),
        System::Etcd => {
            let initial: Vec<String> = cluster
                .members
                .iter()
                .enumerate()
                .map(|(i, m)| format!("e{i}=http://{}", if i == leader { p.peer } else { m.peer }))
                .collect();
            cluster.spawn_etcd(leader, &mut p, &initial.join(","), "existing");
        }
    }
    cluster.members[leader] = p;
    wait_for("three members again", || cluster.leader_of(&[0, 1, 2]));
    took
}

fn row(what: &str, b: &Figures, e: &Figures) {
    println!(
        "| {what} | {:.0} ({:.2} / {:.2} ms) | {:.0} ({:.2} / {:.2} ms) | **{:.2}×** | {:.2}× |{}",
        b.ops_per_sec,
        b.p50_ms,
        b.p99_ms,
        e.ops_per_sec,
        e.p50_ms,
        e.p99_ms,
        b.ops_per_sec / e.ops_per_sec,
        b.p99_ms / e.p99_ms,
        if b.errors + e.errors > 0 {
            format!(" errors: brink {} etcd {}", b.errors, e.errors)
        } else {
            String::new()
        }
    );
}

fn main() {
    let seconds: u64 = env_or("BENCH_SECONDS", 5);
    let trials: usize = env_or("BENCH_FAILOVERS", 5);
    if Command::new("etcd").arg("--version").output().is_err() {
        eprintln!("etcd is not installed: apt-get install etcd-server");
        std::process::exit(2);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-store");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("bench dir");
    let root = tempfile::tempdir_in(&root).expect("tempdir");
    let mut brink = Cluster::brink(root.path(), 3);
    let mut etcd = Cluster::etcd(root.path(), 3);
    println!("# brink store vs etcd 3.4 (3 members each, same disk; {seconds}s per point)\n");
    println!(
        "| load | Brink ops/s (p50 / p99) | etcd ops/s (p50 / p99) | throughput ratio | p99 ratio |"
    );
    println!("|---|---|---|---|---|");
    for clients in [1usize, 16, 256] {
        let round = format!("w{clients}");
        // Alternate who goes first so that neither always gets the cooler machine.
        let (b, e) = if clients % 2 == 0 {
            let e = writes(&etcd, clients, seconds, &round);
            (writes(&brink, clients, seconds, &round), e)
        } else {
            let b = writes(&brink, clients, seconds, &round);
            (b, writes(&etcd, clients, seconds, &round))
        };
        row(&format!("writes, {clients} clients"), &b, &e);
    }
    for clients in [16usize, 256] {
        let b = reads(&brink, clients, seconds);
        let e = reads(&etcd, clients, seconds);
        row(&format!("linearizable reads, {clients} clients"), &b, &e);
    }
    let mut bt = Vec::new();
    let mut et = Vec::new();
    for trial in 0..trials {
        bt.push(failover(&mut brink, trial).as_secs_f64() * 1e3);
        et.push(failover(&mut etcd, trial).as_secs_f64() * 1e3);
    }
    bt.sort_by(|a, b| a.total_cmp(b));
    et.sort_by(|a, b| a.total_cmp(b));
    let show = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "\nfailover (leader kill -9 → first acknowledged write), ms, {trials} trials:\n  brink: {} (median {:.0})\n  etcd:  {} (median {:.0})\n  median ratio {:.2}×",
        show(&bt),
        percentile(&bt, 0.5),
        show(&et),
        percentile(&et, 0.5),
        percentile(&bt, 0.5) / percentile(&et, 0.5)
    );
}
