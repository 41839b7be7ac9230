//! Clusters of `brink server` processes on loopback, speaking QUIC with mutual TLS:
//! joining, the leader killed with -9 under a concurrent load whose history is checked
//! for linearizability, a minority and a stale leader that must not answer, members
//! wiped and rejoined, grown to five and shrunk, and a full restart.
//!
//! Faults are signals: SIGKILL for crashes, SIGSTOP/SIGCONT for a member cut off (it
//! neither sends nor answers, as behind a partition). Every wait is a hang guard, never
//! a timing assertion.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use brink_chaos::linearizability::register::{Input, Output, Register};
use brink_chaos::linearizability::{Operation, check};
use common::*;
use serde_json::Value;

/// The raft tick the tests run with (elections in 200 to 400 ms).
const TICK: &str = "20ms";
/// How long a write or linearizable read waits for an answer in these tests.
const REQUEST_TIMEOUT: &str = "2s";
/// Snapshots every 100 entries, keeping 20 behind: under these tests' load every member
/// snapshots and truncates its log many times, and a member that falls behind or comes
/// back empty is sent a snapshot.
const SNAPSHOT_FLAGS: [&str; 4] = ["--snapshot-entries", "100", "--catch-up-entries", "20"];

struct Member {
    api: SocketAddr,
    peer: SocketAddr,
    /// The Kubernetes API (HTTPS).
    kube: SocketAddr,
    dir: PathBuf,
    child: Option<Child>,
    stopped: bool,
}

impl Member {
    fn new(root: &std::path::Path, name: &str) -> Member {
        Member {
            api: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            peer: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            kube: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            dir: root.join(name),
            child: None,
            stopped: false,
        }
    }

    /// The member's log, kept beside its data directory (appended across restarts).
    fn log_file(&self) -> Stdio {
        let path = self.dir.with_extension("log");
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            Ok(f) => Stdio::from(f),
            Err(_) => Stdio::null(),
        }
    }

    /// This member's raft id, from its data directory (once it has one).
    fn id(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.dir.join("member.json")).ok()?;
        serde_json::from_str::<Value>(&text).ok()?["id"].as_u64()
    }

    fn spawn(&mut self, extra: &[&str]) {
        let mut command = Command::new(brink_bin());
        command
            .arg("server")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen", &self.api.to_string()])
            .args(["--peer-listen", &self.peer.to_string()])
            .args(["--api-listen", &self.kube.to_string()])
            .args(["--raft-tick", TICK, "--request-timeout", REQUEST_TIMEOUT])
            .args(SNAPSHOT_FLAGS)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(self.log_file());
        self.child = Some(command.spawn().expect("brink server"));
        self.stopped = false;
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("kill");
            assert!(status.success(), "kill {signal}");
        }
    }

    fn kill9(&mut self) {
        if self.stopped {
            self.signal("-CONT");
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    /// Cut off: SIGSTOP.
    fn freeze(&mut self) {
        self.signal("-STOP");
        self.stopped = true;
    }

    fn thaw(&mut self) {
        self.signal("-CONT");
        self.stopped = false;
    }

    fn alive(&self) -> bool {
        self.child.is_some() && !self.stopped
    }

    fn members(&self) -> Option<Value> {
        match http_json(self.api, "GET", "/v0/members", None) {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// A value from this member's `/metrics`.
    fn metric(&self, name: &str) -> Option<u64> {
        let (_, text) = http_json(self.api, "GET", "/metrics", None).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct Cluster {
    members: Vec<Member>,
    token: String,
    root: tempfile::TempDir,
}

impl Cluster {
    /// A cluster of `n` members: the first bootstraps, each next joins through the one
    /// before it (so joins through followers are exercised too).
    fn start(n: usize) -> Cluster {
        Self::start_with(n, &[])
    }

    /// As `start`, with `extra` flags on every member's first start.
    fn start_with(n: usize, extra: &[&str]) -> Cluster {
        let root = tempfile::tempdir().expect("tempdir");
        let mut first = Member::new(root.path(), "m0");
        first.spawn(&[&["--init"], extra].concat());
        let token_path = first.dir.join("pki/join-token");
        let token = wait_for("the join token", || {
            std::fs::read_to_string(&token_path)
                .ok()
                .filter(|t| !t.trim().is_empty())
        })
        .trim()
        .to_owned();
        let mut cluster = Cluster {
            members: vec![first],
            token,
            root,
        };
        cluster.wait_voters(1);
        for i in 1..n {
            let via = cluster.members[i - 1].peer;
            cluster.join_with(via, extra);
            cluster.wait_voters(i + 1);
        }
        cluster
    }

    /// Adds a member that joins through `via`; returns its index.
    fn join(&mut self, via: SocketAddr) -> usize {
        self.join_with(via, &[])
    }

    fn join_with(&mut self, via: SocketAddr, extra: &[&str]) -> usize {
        let name = format!("m{}", self.members.len());
        let mut m = Member::new(self.root.path(), &name);
        let via = via.to_string();
        m.spawn(
            &[
                &["--join", via.as_str(), "--token", self.token.as_str()],
                extra,
            ]
            .concat(),
        );
        self.members.push(m);
        self.members.len() - 1
    }

    /// Any answering member's view of membership.
    fn view(&self) -> Option<Value> {
        self.members
            .iter()
            .filter(|m| m.alive())
            .find_map(|m| m.members().filter(|v| v["leader"].as_u64().is_some()))
    }

    fn wait_voters(&self, n: usize) -> Value {
        wait_for(&format!("{n} voters"), || {
            self.view()
                .filter(|v| v["voters"].as_array().is_some_and(|a| a.len() == n))
        })
    }

    /// The index of the member that leads, as the alive members agree.
    fn leader(&self) -> usize {
        wait_for("a leader", || {
            let ids: Vec<u64> = self
                .members
                .iter()
                .filter(|m| m.alive())
                .filter_map(|m| m.members().and_then(|v| v["leader"].as_u64()))
                .collect();
            let leader = *ids.first()?;
            if ids.len() * 2 <= self.alive().len() || ids.iter().any(|i| *i != leader) {
                return None;
            }
            self.members
                .iter()
                .position(|m| m.alive() && m.id() == Some(leader))
        })
    }

    fn alive(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].alive())
            .collect()
    }

    fn apis(&self) -> Vec<SocketAddr> {
        self.members.iter().map(|m| m.api).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        // A failed test shows what each member said.
        for m in &self.members {
            let log = std::fs::read_to_string(m.dir.with_extension("log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("---- {} (last 40 lines)", m.dir.display());
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// How a request ended, as a client sees it.
enum Reply {
    /// Never reached the server (connection refused): it cannot have had an effect.
    NotSent,
    /// Sent, but no answer (the server died, or answered that it does not know).
    Unknown,
    Answer(u16, Value),
}

fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Reply {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return Reply::NotSent;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(15)));
    let body = body.map(Value::to_string).unwrap_or_default();
    let sent = write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if sent.is_err() {
        return Reply::Unknown;
    }
    let mut raw = Vec::new();
    if stream.read_to_end(&mut raw).is_err() {
        return Reply::Unknown;
    }
    let text = String::from_utf8_lossy(&raw);
    let Some(status) = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
    else {
        return Reply::Unknown;
    };
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Reply::Answer(status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn txn(op: Value) -> Value {
    serde_json::json!({"ops": [op]})
}

/// A history of operations on several keys, recorded by concurrent clients.
#[derive(Default)]
struct History {
    ops: Vec<(String, Operation<Input, Output>)>,
}

/// Runs `clients` threads against random members of `apis` until `stop`, each doing reads,
/// writes and read-then-compare-and-set on `keys`. Returns the history.
fn run_clients(
    apis: Vec<SocketAddr>,
    keys: &[String],
    clients: usize,
    stop: Arc<AtomicBool>,
    start: Instant,
) -> std::thread::JoinHandle<History> {
    let keys = keys.to_vec();
    std::thread::spawn(move || {
        let history = Arc::new(Mutex::new(History::default()));
        let threads: Vec<_> = (0..clients)
            .map(|client| {
                let (apis, keys, stop, history) =
                    (apis.clone(), keys.clone(), stop.clone(), history.clone());
                std::thread::spawn(move || {
                    let now = || start.elapsed().as_nanos() as u64;
                    let mut rng = fastrand::Rng::with_seed(client as u64 * 7919 + 1);
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = keys[rng.usize(..keys.len())].clone();
                        let api = apis[rng.usize(..apis.len())];
                        seq += 1;
                        let value = format!("c{client}-{seq}");
                        let record = |input: Input, call: u64, output: Option<Output>| {
                            let ret = output.as_ref().map(|_| now());
                            history.lock().unwrap().ops.push((
                                key.clone(),
                                Operation {
                                    client,
                                    call,
                                    ret,
                                    input,
                                    output,
                                },
                            ));
                        };
                        let roll = rng.u8(..10);
                        let call = now();
                        if roll < 5 {
                            let path = format!("/v0/get?key={key}");
                            match request(api, "GET", &path, None) {
                                Reply::Answer(200, v) => {
                                    let got = (
                                        v["value"].as_str().unwrap_or_default().to_owned(),
                                        v["modRevision"].as_u64().unwrap_or_default(),
                                    );
                                    record(Input::Read, call, Some(Output::Value(Some(got))));
                                }
                                Reply::Answer(404, _) => {
                                    record(Input::Read, call, Some(Output::Value(None)))
                                }
                                // A read with no answer constrains nothing: not recorded.
                                _ => std::thread::sleep(Duration::from_millis(20)),
                            }
                        } else if roll < 8 {
                            let body = txn(serde_json::json!({"op": "update", "key": key, "value": value}));
                            match request(api, "POST", "/v0/txn", Some(&body)) {
                                Reply::NotSent => std::thread::sleep(Duration::from_millis(20)),
                                Reply::Answer(200, v) => record(
                                    Input::Write(value),
                                    call,
                                    Some(Output::Written(v["revision"].as_u64().expect("revision"))),
                                ),
                                Reply::Answer(400 | 409, v) => panic!("update refused: {v}"),
                                Reply::Unknown | Reply::Answer(..) => {
                                    record(Input::Write(value), call, None)
                                }
                            }
                        } else {
                            // Read-modify-write: the read is recorded too.
                            let path = format!("/v0/get?key={key}&serializable=true");
                            let Reply::Answer(200, v) = request(api, "GET", &path, None) else {
                                continue;
                            };
                            let Some(expect) = v["modRevision"].as_u64() else {
                                continue;
                            };
                            let call = now();
                            let body = txn(serde_json::json!({"op": "update", "key": key, "value": value, "expectMod": expect}));
                            let input = Input::CompareAndSet {
                                expect,
                                value: value.clone(),
                            };
                            match request(api, "POST", "/v0/txn", Some(&body)) {
                                Reply::NotSent => {}
                                Reply::Answer(200, v) => record(
                                    input,
                                    call,
                                    Some(Output::Written(v["revision"].as_u64().expect("revision"))),
                                ),
                                Reply::Answer(409, _) => record(input, call, Some(Output::Conflict)),
                                Reply::Unknown | Reply::Answer(..) => record(input, call, None),
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("client");
        }
        Arc::try_unwrap(history)
            .ok()
            .expect("clients done")
            .into_inner()
            .unwrap()
    })
}

/// Every event under `prefix` from revision 0, read from `api`.
fn all_events(api: SocketAddr, prefix: &str) -> Vec<Value> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let path = format!("/v0/watch?prefix={prefix}&after={after}&timeoutSeconds=0");
        let (status, body) = http_json(api, "GET", &path, None).expect("watch");
        assert_eq!(status, 200, "{body}");
        let page: Value = serde_json::from_str(&body).expect("json");
        let page = page["events"].as_array().cloned().unwrap_or_default();
        let Some(last) = page.last() else {
            return events;
        };
        after = last["revision"].as_u64().expect("revision");
        events.extend(page);
    }
}

/// A watcher that follows `prefix` from revision 0 across members, moving to another
/// member whenever the one it watches fails, until `stop`.
fn follow(
    apis: Vec<SocketAddr>,
    prefix: &str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(u64, String, String)>> {
    let prefix = prefix.to_owned();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut after = 0u64;
        let mut which = 0usize;
        let mut stop_seen_at: Option<Instant> = None;
        loop {
            if stop.load(Ordering::Relaxed) {
                // One more second to drain what was committed before the stop.
                let at = *stop_seen_at.get_or_insert_with(Instant::now);
                if at.elapsed() > Duration::from_secs(1) {
                    return seen;
                }
            }
            let api = apis[which % apis.len()];
            let path = format!("/v0/watch?prefix={prefix}&after={after}&timeoutSeconds=1");
            match request(api, "GET", &path, None) {
                Reply::Answer(200, page) => {
                    for e in page["events"].as_array().cloned().unwrap_or_default() {
                        let revision = e["revision"].as_u64().expect("revision");
                        seen.push((
                            revision,
                            e["object"]["key"].as_str().unwrap_or_default().to_owned(),
                            e["object"]["value"].as_str().unwrap_or_default().to_owned(),
                        ));
                        after = revision;
                    }
                    // Move between members now and then even when all is well.
                    if fastrand::u8(..4) == 0 {
                        which += 1;
                    }
                }
                _ => {
                    which += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    })
}

/// Checks a history per key (keys are independent registers), and that every
/// acknowledged write is in `events` at its revision, no write is there twice, and the
/// watcher saw a gap-free, in-order prefix of `events`.
fn verify(history: History, events: &[Value], watched: &[(u64, String, String)]) {
    let mut by_key: BTreeMap<String, Vec<Operation<Input, Output>>> = BTreeMap::new();
    for (key, op) in history.ops {
        by_key.entry(key).or_default().push(op);
    }
    let committed: HashMap<u64, (String, String)> = events
        .iter()
        .map(|e| {
            (
                e["revision"].as_u64().expect("revision"),
                (
                    e["object"]["key"].as_str().unwrap_or_default().to_owned(),
                    e["object"]["value"].as_str().unwrap_or_default().to_owned(),
                ),
            )
        })
        .collect();
    let mut values_seen = HashMap::new();
    for (revision, (_, value)) in &committed {
        if let Some(other) = values_seen.insert(value.clone(), *revision) {
            panic!("value {value} was applied twice, at {other} and {revision}");
        }
    }
    let mut acknowledged = 0;
    for (key, ops) in &by_key {
        for op in ops {
            if let (
                Input::Write(v) | Input::CompareAndSet { value: v, .. },
                Some(Output::Written(r)),
            ) = (&op.input, &op.output)
            {
                acknowledged += 1;
                assert_eq!(
                    committed.get(r),
                    Some(&(key.clone(), v.clone())),
                    "acknowledged write {key}={v} at revision {r} is not in the store's history"
                );
            }
        }
        let unknown = ops.iter().filter(|o| o.output.is_none()).count();
        eprintln!(
            "{key}: {} operations ({unknown} without an answer)",
            ops.len()
        );
        if let Err(e) = check(&Register, ops) {
            panic!("{key}: {e}");
        }
    }
    assert!(
        acknowledged > 20,
        "the load made too little progress: {acknowledged} writes"
    );
    let revisions: Vec<u64> = events
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "history out of order"
    );
    assert!(!watched.is_empty(), "the watcher saw nothing");
    for (i, (revision, key, value)) in watched.iter().enumerate() {
        let expected = &events[i];
        assert_eq!(
            (*revision, key.as_str(), value.as_str()),
            (
                expected["revision"].as_u64().unwrap(),
                expected["object"]["key"].as_str().unwrap(),
                expected["object"]["value"].as_str().unwrap()
            ),
            "the watcher's event {i} differs from the store's history (a gap or a duplicate across members)"
        );
    }
}

fn create_keys(api: SocketAddr, keys: &[String], start: Instant) -> History {
    let mut history = History::default();
    for key in keys {
        let call = start.elapsed().as_nanos() as u64;
        let value = format!("init-{key}");
        let body = txn(serde_json::json!({"op": "create", "key": key, "value": value}));
        let Reply::Answer(200, v) = request(api, "POST", "/v0/txn", Some(&body)) else {
            panic!("create {key}");
        };
        history.ops.push((
            key.clone(),
            Operation {
                client: usize::MAX,
                call,
                ret: Some(start.elapsed().as_nanos() as u64),
                input: Input::Write(value),
                output: Some(Output::Written(v["revision"].as_u64().expect("revision"))),
            },
        ));
    }
    history
}

#[test]
fn three_members_lose_nothing_when_the_leader_is_killed_under_load() {
    let mut cluster = Cluster::start(3);
    let start = Instant::now();
    let keys: Vec<String> = (0..3).map(|k| format!("/lin/k{k}")).collect();
    let leader = cluster.leader();
    let mut history = create_keys(cluster.members[leader].api, &keys, start);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = run_clients(cluster.apis(), &keys, 6, stop.clone(), start);
    let watcher = follow(cluster.apis(), "/lin/", stop.clone());
    std::thread::sleep(Duration::from_millis(1500));
    // The leader dies mid-load; a new one takes over; the old one comes back.
    let killed_at = Instant::now();
    cluster.members[leader].kill9();
    let new_leader = cluster.leader();
    assert_ne!(new_leader, leader);
    eprintln!("new leader known after {:?}", killed_at.elapsed());
    std::thread::sleep(Duration::from_millis(1500));
    cluster.members[leader].spawn(&[]);
    std::thread::sleep(Duration::from_millis(1500));
    // And the new leader dies too.
    let second = cluster.leader();
    cluster.members[second].kill9();
    std::thread::sleep(Duration::from_millis(1500));
    cluster.members[second].spawn(&[]);
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    history.ops.extend(clients.join().expect("clients").ops);
    let watched = watcher.join().expect("watcher");
    // Every member ends with the same history.
    let leader = cluster.leader();
    let events = all_events(cluster.members[leader].api, "/lin/");
    for m in &cluster.members {
        wait_for("every member to catch up", || {
            (all_events(m.api, "/lin/") == events).then_some(())
        });
    }
    verify(history, &events, &watched);
}

#[test]
fn a_minority_cannot_commit_and_a_stale_leader_cannot_read() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.leader();
    let api = cluster.members[leader].api;
    let put = |api: SocketAddr, value: &str| {
        request(
            api,
            "POST",
            "/v0/txn",
            Some(&txn(
                serde_json::json!({"op": "update", "key": "/x", "value": value}),
            )),
        )
    };
    let Reply::Answer(200, _) = request(
        api,
        "POST",
        "/v0/txn",
        Some(&txn(
            serde_json::json!({"op": "create", "key": "/x", "value": "one"}),
        )),
    ) else {
        panic!("create")
    };
    // The leader alone: both followers cut off.
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for &f in &followers {
        cluster.members[f].freeze();
    }
    match put(api, "two") {
        // No answer in time, or the leader stepping down (check-quorum) answers it at
        // once: either way the client is told the outcome is unknown.
        Reply::Answer(504 | 503, v) => assert!(
            v.to_string().contains("may or may not have been applied"),
            "{v}"
        ),
        Reply::Answer(status, v) => panic!("a minority committed? {status} {v}"),
        _ => panic!("the leader died"),
    }
    match request(api, "GET", "/v0/get?key=/x", None) {
        Reply::Answer(504 | 503, _) => {}
        Reply::Answer(status, v) => panic!("a minority served a linearizable read: {status} {v}"),
        _ => panic!("the leader died"),
    }
    // A serializable read is served, as asked, from what this member has.
    let Reply::Answer(200, v) = request(api, "GET", "/v0/get?key=/x&serializable=true", None)
    else {
        panic!("serializable read")
    };
    assert_eq!(v["value"], "one");
    for &f in &followers {
        cluster.members[f].thaw();
    }
    // Now the leader is the one cut off: the others elect a new one and move on.
    let leader = cluster.leader();
    cluster.members[leader].freeze();
    let new_leader = cluster.leader();
    let new_api = cluster.members[new_leader].api;
    let written = wait_for("a write through the new leader", || {
        match put(new_api, "three") {
            Reply::Answer(200, v) => v["revision"].as_u64(),
            _ => None,
        }
    });
    cluster.members[leader].thaw();
    // The old leader comes back believing it leads; a linearizable read through it must
    // not return the old value.
    let old_api = cluster.members[leader].api;
    match request(old_api, "GET", "/v0/get?key=/x", None) {
        Reply::Answer(200, v) => {
            assert_eq!(v["value"], "three", "a stale read after revision {written}");
            assert!(v["modRevision"].as_u64().unwrap() >= written);
        }
        Reply::Answer(504 | 503, _) => {}
        other => panic!(
            "unexpected answer: {}",
            matches!(other, Reply::NotSent) as u8
        ),
    }
}

#[test]
fn members_rejoin_after_a_wipe_grow_to_five_shrink_and_restart_whole() {
    let mut cluster = Cluster::start(3);
    let start = Instant::now();
    let keys: Vec<String> = (0..2).map(|k| format!("/lin/k{k}")).collect();
    let mut history = create_keys(cluster.members[cluster.leader()].api, &keys, start);
    let stop = Arc::new(AtomicBool::new(false));
    // Clients talk to the first three members (which stay addressable throughout).
    let clients = run_clients(cluster.apis(), &keys, 4, stop.clone(), start);
    std::thread::sleep(Duration::from_millis(800));

    // A follower loses its disk and comes back at the same address as a new member.
    // The leader's log no longer starts at 1, so the newcomer must be sent a snapshot.
    let leader = cluster.leader();
    wait_for("the leader to truncate its log", || {
        (cluster.members[leader].metric("brink_raft_log_first_index")? > 1).then_some(())
    });
    let wiped = (0..3).find(|&i| i != leader).expect("a follower");
    let old_id = cluster.members[wiped].id().expect("id");
    cluster.members[wiped].kill9();
    std::fs::remove_dir_all(&cluster.members[wiped].dir).expect("wipe");
    let via = cluster.members[leader].peer;
    let token = cluster.token.clone();
    cluster.members[wiped].spawn(&["--join", &via.to_string(), "--token", &token]);
    let view = wait_for("the wiped member to be replaced", || {
        let v = cluster.view()?;
        let voters = v["voters"].as_array()?.clone();
        let new_id = cluster.members[wiped].id()?;
        (voters.len() == 3 && !voters.contains(&old_id.into()) && voters.contains(&new_id.into()))
            .then_some(v)
    });
    eprintln!("after the wipe: {view}");
    let installed = wait_for("the rejoined member's snapshot count", || {
        cluster.members[wiped].metric("brink_raft_snapshots_installed_total")
    });
    assert!(
        installed >= 1,
        "the rejoined member caught up without a snapshot"
    );

    // Grow to five under load, then kill the leader of five.
    let via = cluster.members[cluster.leader()].peer;
    cluster.join(via);
    cluster.wait_voters(4);
    cluster.join(via);
    cluster.wait_voters(5);
    let leader = cluster.leader();
    cluster.members[leader].kill9();
    let _ = cluster.leader();
    cluster.members[leader].spawn(&[]);
    std::thread::sleep(Duration::from_millis(800));

    // Shrink: remove member 4 through the API and stop it.
    let removed_id = cluster.members[4].id().expect("id");
    let leader = cluster.leader();
    let path = format!("/v0/members/remove?id={removed_id}");
    let reply = wait_for("the removal", || {
        match request(cluster.members[leader].api, "POST", &path, None) {
            Reply::Answer(200, v) => Some(v),
            _ => None,
        }
    });
    assert!(
        !reply["voters"]
            .as_array()
            .unwrap()
            .contains(&removed_id.into()),
        "{reply}"
    );
    cluster.members[4].kill9();
    cluster.wait_voters(4);
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    history.ops.extend(clients.join().expect("clients").ops);

    // Everyone stops; everyone starts again with what is on disk.
    for i in 0..4 {
        cluster.members[i].terminate();
    }
    for i in 0..4 {
        cluster.members[i].spawn(&[]);
    }
    let leader = cluster.leader();
    cluster.wait_voters(4);
    let events = all_events(cluster.members[leader].api, "/lin/");
    for m in cluster.members.iter().take(4) {
        wait_for("every member to catch up", || {
            (all_events(m.api, "/lin/") == events).then_some(())
        });
    }
    let watched: Vec<(u64, String, String)> = events
        .iter()
        .map(|e| {
            (
                e["revision"].as_u64().unwrap(),
                e["object"]["key"].as_str().unwrap().to_owned(),
                e["object"]["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    verify(history, &events, &watched);
}

#[test]
fn bad_joins_are_refused_and_change_nothing() {
    let cluster = Cluster::start(1);
    let before = cluster.view().expect("view");
    let root = tempfile::tempdir().expect("tempdir");
    let via = cluster.members[0].peer.to_string();
    // The right CA but a wrong secret.
    let (hash, _) = cluster.token.rsplit_once('.').expect("token");
    let wrong_secret = format!("{hash}.{}", "0".repeat(64));
    // A secret for some other CA.
    let (_, secret) = cluster.token.rsplit_once('.').expect("token");
    let wrong_ca = format!("brink1.{}.{secret}", "ab".repeat(32));
    for (token, needle) in [
        (wrong_secret.as_str(), "join token is wrong"),
        (wrong_ca.as_str(), "not the one the join token pins"),
    ] {
        let dir = root.path().join("never");
        let out = brink(&[
            "server",
            "--join",
            &via,
            "--token",
            token,
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--peer-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--api-listen",
            &format!("127.0.0.1:{}", free_port()),
        ]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(needle), "{}", stderr(&out));
        assert!(
            !dir.join("member.json").exists(),
            "a refused join must leave no member behind"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert_eq!(cluster.view().expect("view")["voters"], before["voters"]);
    // Garbage on the peer port (not QUIC at all) leaves the member serving.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    for i in 0..200u32 {
        let garbage: Vec<u8> = (0..(i % 1300)).map(|j| (i * 31 + j) as u8).collect();
        let _ = socket.send_to(&garbage, cluster.members[0].peer);
    }
    let Reply::Answer(200, _) = request(
        cluster.members[0].api,
        "POST",
        "/v0/txn",
        Some(&txn(
            serde_json::json!({"op": "create", "key": "/after", "value": "ok"}),
        )),
    ) else {
        panic!("the member stopped serving")
    };
}

/// kubectl against one member, with the admin credential `--init` wrote.
fn kubectl(cluster: &Cluster, member: usize, args: &[&str]) -> std::process::Output {
    let first = &cluster.members[0];
    let admin =
        std::fs::read_to_string(first.dir.join("pki/admin.kubeconfig")).expect("kubeconfig");
    let config = cluster.root.path().join(format!("m{member}.kubeconfig"));
    let text = admin.replace(
        &format!("https://{}", first.kube),
        &format!("https://{}", cluster.members[member].kube),
    );
    std::fs::write(&config, text).expect("write kubeconfig");
    Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", &config)
        .env("HOME", cluster.root.path())
        .stdin(Stdio::null())
        .output()
        .expect("kubectl")
}

fn kubectl_ok(cluster: &Cluster, member: usize, args: &[&str]) -> String {
    let out = kubectl(cluster, member, args);
    assert!(out.status.success(), "m{member} {args:?}: {}", stderr(&out));
    stdout(&out)
}

#[test]
fn every_member_serves_the_kubernetes_api_and_watches_resume_on_another() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.leader();
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for i in 0..3 {
        wait_for("the member's API", || {
            kubectl(&cluster, i, &["get", "--raw", "/readyz"])
                .status
                .success()
                .then_some(())
        });
    }
    // A write through one follower is read back at once through the other (a
    // consistent read: ReadIndex, then the follower's cache caught up).
    kubectl_ok(
        &cluster,
        followers[0],
        &["create", "configmap", "c1", "--from-literal=a=1"],
    );
    assert_eq!(
        kubectl_ok(
            &cluster,
            followers[1],
            &["get", "cm", "c1", "-o", "jsonpath={.data.a}"]
        ),
        "1"
    );
    kubectl_ok(
        &cluster,
        followers[1],
        &["patch", "cm", "c1", "-p", r#"{"data":{"a":"2"}}"#],
    );
    assert_eq!(
        kubectl_ok(
            &cluster,
            leader,
            &["get", "cm", "c1", "-o", "jsonpath={.data.a}"]
        ),
        "2"
    );
    // A watcher's place (a resourceVersion from one member) is good on any other: the
    // member it read from dies, changes go on, and a watch from that revision on
    // another member delivers every change in order.
    let list: Value = serde_json::from_str(&kubectl_ok(
        &cluster,
        followers[1],
        &["get", "--raw", "/api/v1/namespaces/default/configmaps"],
    ))
    .expect("list");
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_owned();
    kubectl_ok(&cluster, leader, &["create", "configmap", "w1"]);
    cluster.members[followers[1]].kill9();
    kubectl_ok(&cluster, leader, &["create", "configmap", "w2"]);
    kubectl_ok(&cluster, leader, &["delete", "configmap", "w1"]);
    let raw = kubectl_ok(
        &cluster,
        followers[0],
        &[
            "get",
            "--raw",
            &format!(
                "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv}&timeoutSeconds=2"
            ),
        ],
    );
    let events: Vec<(String, String)> = raw
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("").to_owned(),
                e["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            ("ADDED".into(), "w1".into()),
            ("ADDED".into(), "w2".into()),
            ("DELETED".into(), "w1".into())
        ],
        "{raw}"
    );
    // The stopped member comes back and serves what happened while it was gone.
    cluster.members[followers[1]].spawn(&[]);
    wait_for("the restarted member's API", || {
        let out = kubectl(&cluster, followers[1], &["get", "cm", "w2", "-o", "name"]);
        out.status.success().then(|| stdout(&out))
    });
}

/// A kube-rs client of one member, from the admin kubeconfig with its address.
async fn kube_client(cluster: &Cluster, member: usize) -> kube::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // kubectl() writes the member's kubeconfig as a side effect.
    let _ = kubectl(cluster, member, &["version", "--client"]);
    let path = cluster.root.path().join(format!("m{member}.kubeconfig"));
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    kube::Client::try_from(config).expect("client")
}

fn configmap(name: &str) -> k8s_openapi::api::core::v1::ConfigMap {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name}, "data": {"a": "1"},
    }))
    .expect("configmap")
}

#[test]
fn kube_rs_patches_pages_and_a_reflector_that_follows_a_member_through_kill_compaction_and_restart()
{
    use futures::StreamExt as _;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
    use kube::runtime::{WatchStreamExt as _, reflector, watcher};

    let mut cluster = Cluster::start_with(3, &["--compact-interval", "300ms"]);
    let leader = cluster.leader();
    let watched = (0..3).find(|i| *i != leader).expect("a follower");
    let writer_member = (0..3)
        .find(|i| *i != leader && *i != watched)
        .expect("another");
    for i in 0..3 {
        wait_for("the member's API", || {
            kubectl(&cluster, i, &["get", "--raw", "/readyz"])
                .status
                .success()
                .then_some(())
        });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let client = runtime.block_on(kube_client(&cluster, watched));
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    runtime.block_on(async {
        // Each patch type kube-rs sends.
        cms.create(&PostParams::default(), &configmap("p")).await.expect("create");
        let pp = PatchParams::default();
        cms.patch("p", &pp, &Patch::Merge(serde_json::json!({"data": {"b": "2"}}))).await.expect("merge");
        cms.patch("p", &pp, &Patch::Strategic(serde_json::json!({"data": {"c": "3"}}))).await.expect("strategic");
        let ops = serde_json::from_value(serde_json::json!([{"op": "add", "path": "/data/d", "value": "4"}])).expect("ops");
        let patched = cms.patch("p", &pp, &Patch::Json::<()>(ops)).await.expect("json patch");
        let data = patched.data.unwrap_or_default();
        assert_eq!(
            ["a", "b", "c", "d"].map(|k| data.get(k).cloned().unwrap_or_default()),
            ["1", "2", "3", "4"]
        );
        // Server-side apply: "test" takes data.a from the creator only when forced, and
        // owns what it applied.
        let config = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "p"}, "data": {"a": "applied"}});
        match cms.patch("p", &PatchParams::apply("test"), &Patch::Apply(&config)).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"), "{status:?}");
                assert!(status.message.contains(".data.a"), "{status:?}");
            }
            other => panic!("server-side apply: {other:?}"),
        }
        let applied = cms.patch("p", &PatchParams::apply("test").force(), &Patch::Apply(&config)).await.expect("forced apply");
        assert_eq!(applied.data.unwrap_or_default().get("a").map(String::as_str), Some("applied"));
        let owners: Vec<_> = applied.metadata.managed_fields.unwrap_or_default().into_iter().map(|m| (m.manager.unwrap_or_default(), m.operation.unwrap_or_default())).collect();
        assert!(owners.contains(&("test".into(), "Apply".into())), "{owners:?}");
        // Pages of two, to the end.
        for i in 0..5 {
            cms.create(&PostParams::default(), &configmap(&format!("page-{i}"))).await.expect("create");
        }
        let mut names = Vec::new();
        let mut params = ListParams::default().limit(2);
        loop {
            let page = cms.list(&params).await.expect("page");
            assert!(page.items.len() <= 2);
            names.extend(page.items.iter().filter_map(|c| c.metadata.name.clone()));
            match page.metadata.continue_ {
                Some(token) if !token.is_empty() => params = ListParams::default().limit(2).continue_token(&token),
                _ => break,
            }
        }
        for i in 0..5 {
            assert!(names.contains(&format!("page-{i}")), "{names:?}");
        }
    });
    // A reflector on the watched member.
    let (reader, writer) = reflector::store::<ConfigMap>();
    let inits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = inits.clone();
    let stream = reflector(
        writer,
        watcher(cms.clone(), watcher::Config::default())
            .default_backoff()
            .inspect(move |event| {
                if let Ok(watcher::Event::Init) = event {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            }),
    )
    .applied_objects();
    runtime.spawn(stream.for_each(|_| std::future::ready(())));
    let has = |name: &str| {
        reader
            .state()
            .iter()
            .any(|c| c.metadata.name.as_deref() == Some(name))
    };
    runtime
        .block_on(reader.wait_until_ready())
        .expect("reflector ready");
    kubectl_ok(
        &cluster,
        writer_member,
        &["create", "configmap", "before-kill"],
    );
    wait_for("the reflector to see before-kill", || {
        has("before-kill").then_some(())
    });
    // The watched member dies; the site goes on and compacts past the watcher's place.
    cluster.members[watched].kill9();
    for i in 0..10 {
        kubectl_ok(
            &cluster,
            writer_member,
            &["create", "configmap", &format!("while-down-{i}")],
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    kubectl_ok(
        &cluster,
        writer_member,
        &["delete", "configmap", "before-kill"],
    );
    let compacted_past = kubectl_ok(
        &cluster,
        writer_member,
        &["get", "--raw", "/api/v1/namespaces/default/configmaps"],
    );
    let rv: u64 = serde_json::from_str::<Value>(&compacted_past).expect("list")["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .expect("rv");
    wait_for("history compacted past the kill", || {
        (cluster.members[leader].metric("brink_store_compacted_revision")? >= rv).then_some(())
    });
    // It comes back; the reflector resumes (relisting after the 410 in the stream).
    cluster.members[watched].spawn(&["--compact-interval", "300ms"]);
    wait_for("the reflector to catch up", || {
        ((0..10).all(|i| has(&format!("while-down-{i}"))) && !has("before-kill")).then_some(())
    });
    assert!(
        inits.load(Ordering::Relaxed) >= 2,
        "the watcher relisted after the compaction"
    );
    drop(runtime);
}

/// The scheduler moves with leadership: the leader member is killed while pods are
/// being created and scheduled, and every pod ends bound exactly once (one Scheduled
/// event each, its node never changing), none lost.
#[test]
fn the_leader_dies_while_pods_are_scheduled_and_none_is_bound_twice() {
    let mut cluster = Cluster::start(3);
    for i in 0..3 {
        wait_for("the member's API", || {
            kubectl(&cluster, i, &["get", "--raw", "/readyz"])
                .status
                .success()
                .then_some(())
        });
    }
    let leader = cluster.leader();
    let follower = (0..3).find(|i| *i != leader).expect("a follower");
    // Three Ready nodes, as API objects (no agents: the scheduler only binds).
    for n in 0..3 {
        let name = format!("n{n}");
        let manifest = format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n");
        let path = cluster.root.path().join(format!("{name}.yaml"));
        std::fs::write(&path, &manifest).expect("node manifest");
        kubectl_ok(
            &cluster,
            follower,
            &["create", "-f", path.to_str().expect("utf-8")],
        );
        kubectl_ok(
            &cluster,
            follower,
            &[
                "patch",
                "node",
                &name,
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"status":{"conditions":[{"type":"Ready","status":"True"}],"allocatable":{"cpu":"4","memory":"4Gi","pods":"110"}}}"#,
            ],
        );
    }
    let pod = |i: usize| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p{i:02}\nspec:\n  containers:\n  - name: c\n    image: oci:/nowhere:x\n"
        )
    };
    let create = |cluster: &Cluster, member: usize, i: usize| {
        let path = cluster.root.path().join(format!("p{i:02}.yaml"));
        std::fs::write(&path, pod(i)).expect("pod manifest");
        wait_for("a pod created", || {
            let out = kubectl(
                cluster,
                member,
                &["create", "-f", path.to_str().expect("utf-8")],
            );
            (out.status.success() || stderr(&out).contains("AlreadyExists")).then_some(())
        });
    };
    for i in 0..15 {
        create(&cluster, follower, i);
    }
    cluster.members[leader].kill9();
    for i in 15..30 {
        create(&cluster, follower, i);
    }
    let new_leader = cluster.leader();
    assert_ne!(new_leader, leader);
    let bound = wait_for("every pod bound", || {
        let out = kubectl_ok(
            &cluster,
            follower,
            &[
                "get",
                "pods",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name}={.spec.nodeName} {end}",
            ],
        );
        let pairs: Vec<String> = out.split_whitespace().map(str::to_owned).collect();
        (pairs.len() == 30 && pairs.iter().all(|p| !p.ends_with('='))).then_some(pairs)
    });
    assert_eq!(bound.len(), 30);
    let events: Value = serde_json::from_str(&kubectl_ok(
        &cluster,
        follower,
        &["get", "events", "-o", "json"],
    ))
    .expect("events");
    for i in 0..30 {
        let name = format!("p{i:02}");
        let scheduled = scheduled_events(&events, &name);
        // One binding each; an event may be lost with the member that bound it.
        assert!(scheduled <= 1, "{name} was bound {scheduled} times");
    }
}
