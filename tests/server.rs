//! `brink server` as a real process: a single voter's store through its API and through
//! `brink store`, restarts, kill -9 under load with every acknowledged write checked
//! afterwards, and garbage requests refused without a change.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

struct Server {
    addr: SocketAddr,
    peer: SocketAddr,
    dir: std::path::PathBuf,
    child: Option<Child>,
    /// Flags given on every start.
    extra: Vec<String>,
    _tmp: tempfile::TempDir,
}

impl Server {
    fn init() -> Server {
        Self::init_with(&[])
    }

    fn init_with(extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut server = Server {
            addr: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            peer: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            dir: tmp.path().join("member"),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            _tmp: tmp,
        };
        server.spawn(true);
        server
    }

    fn spawn(&mut self, init: bool) {
        let mut command = Command::new(brink_bin());
        command
            .arg("server")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--listen", &self.addr.to_string(), "--raft-tick", "20ms"])
            .args(["--peer-listen", &self.peer.to_string()])
            .args(["--api-listen", &format!("127.0.0.1:{}", free_port())])
            .args(&self.extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if init {
            command.arg("--init");
        }
        self.child = Some(command.spawn().expect("brink server"));
        wait_for("the member to be ready", || {
            http_json(self.addr, "GET", "/readyz", None)
                .ok()
                .filter(|(status, _)| *status == 200)
        });
        // The API server writes the site's system namespaces and default RBAC once; the
        // tests here count revisions and compare whole ranges, so they start after the
        // last of those writes.
        wait_for("the API server's bootstrap objects", || {
            let path = "/v0/get?key=/registry/rbac.authorization.k8s.io/clusterrolebindings/system:discovery";
            http_json(self.addr, "GET", path, None)
                .ok()
                .filter(|(status, _)| *status == 200)
        });
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM: a clean stop.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    fn store(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["store", "--server"];
        let addr = self.addr.to_string();
        all.push(&addr);
        all.extend_from_slice(args);
        brink(&all)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn create(addr: SocketAddr, key: &str, value: &str) -> std::io::Result<(u16, String)> {
    let body =
        serde_json::json!({"ops": [{"op": "create", "key": key, "value": value}]}).to_string();
    http_json(addr, "POST", "/v0/txn", Some(&body))
}

#[test]
fn a_single_voter_serves_the_store_and_keeps_it_across_restarts() {
    let mut server = Server::init();
    let out = server.store(&["create", "/pods/default/a", "one"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let first: u64 = stdout(&out)
        .trim()
        .trim_start_matches("revision ")
        .parse()
        .expect("revision");
    // Create twice: refused, nothing changes.
    let out = server.store(&["create", "/pods/default/a", "again"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("409"), "{}", stderr(&out));
    // Compare-and-set: a stale revision is refused, the current one wins.
    let out = server.store(&["put", "/pods/default/a", "two", "--expect-mod", "999"]);
    assert!(stderr(&out).contains("modRevision is"), "{}", stderr(&out));
    let out = server.store(&[
        "put",
        "/pods/default/a",
        "two",
        "--expect-mod",
        &first.to_string(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    server.store(&["put", "/pods/default/b", "bee"]);
    server.store(&["put", "/nodes/n1", "node"]);
    let got: Value =
        serde_json::from_str(&stdout(&server.store(&["get", "/pods/default/a"]))).expect("json");
    assert_eq!(
        (got["value"].as_str(), got["version"].as_u64()),
        (Some("two"), Some(2))
    );
    let listed = stdout(&server.store(&["list", "/pods/", "--limit", "1"]));
    assert_eq!(listed.lines().count(), 2, "pages are followed: {listed}");
    // A watch from the beginning sees every change under the prefix, in order.
    let (status, body) = http_json(
        server.addr,
        "GET",
        "/v0/watch?prefix=/pods/&after=0&timeoutSeconds=1",
        None,
    )
    .unwrap();
    assert_eq!(status, 200);
    let events: Value = serde_json::from_str(&body).expect("json");
    let revisions: Vec<u64> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(revisions.len(), 3, "{body}");
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");

    // A clean stop and a restart keep everything; --init refuses a used directory.
    server.stop();
    let out = brink(&[
        "server",
        "--init",
        "--data-dir",
        server.dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:1",
    ]);
    assert!(
        stderr(&out).contains("already holds a member's data"),
        "{}",
        stderr(&out)
    );
    server.spawn(false);
    let got: Value =
        serde_json::from_str(&stdout(&server.store(&["get", "/pods/default/a"]))).expect("json");
    assert_eq!(got["value"], "two");
    let metrics = http_json(server.addr, "GET", "/metrics", None).unwrap().1;
    assert!(metrics.contains("brink_raft_is_leader 1"), "{metrics}");
}

/// A value from the member's `/metrics`.
fn metric(addr: SocketAddr, name: &str) -> Option<u64> {
    let (_, text) = http_json(addr, "GET", "/metrics", None).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn watch_status(addr: SocketAddr, after: u64) -> u16 {
    let path = format!("/v0/watch?prefix=/c/&after={after}&timeoutSeconds=1");
    http_json(addr, "GET", &path, None).expect("watch").0
}

#[test]
fn the_leader_compacts_history_on_its_interval_and_it_stays_compacted() {
    let mut server = Server::init_with(&["--compact-interval", "300ms"]);
    let revision = |(status, body): (u16, String)| {
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body).expect("json")["revision"]
            .as_u64()
            .expect("revision")
    };
    let first = revision(create(server.addr, "/c/a", "1").unwrap());
    let second = revision(create(server.addr, "/c/b", "2").unwrap());
    // Both writes were timed from arrival to applied.
    assert!(metric(server.addr, "brink_raft_commit_seconds_count") >= Some(2));
    // The compaction after next drops what is older than the revision seen an interval
    // earlier: a watch from before `second` is then gone, one from `second` is not.
    wait_for("history to be compacted past the first write", || {
        (metric(server.addr, "brink_store_compacted_revision")? >= second).then_some(())
    });
    assert_eq!(watch_status(server.addr, first - 1), 410);
    assert_eq!(watch_status(server.addr, second - 1), 200);
    let (status, body) = http_json(server.addr, "GET", "/v0/get?key=/c/a", None).unwrap();
    assert_eq!(
        status, 200,
        "compaction drops history, never values: {body}"
    );
    server.kill9();
    server.extra = vec!["--compact-interval".into(), "0s".into()];
    server.spawn(false);
    assert_eq!(
        watch_status(server.addr, first - 1),
        410,
        "compaction survives a restart"
    );
}

#[test]
fn kill_9_under_load_loses_no_acknowledged_write() {
    // Small snapshot settings, so that kills also land while snapshots are written and
    // the log truncated.
    let mut server = Server::init_with(&["--snapshot-entries", "50", "--catch-up-entries", "10"]);
    let mut acknowledged: Vec<(String, u64)> = Vec::new();
    for round in 0..3 {
        let addr = server.addr;
        let writers: Vec<_> = (0..8)
            .map(|w| {
                std::thread::spawn(move || {
                    let mut acked = Vec::new();
                    for i in 0.. {
                        let key = format!("/load/{round}/{w}/{i}");
                        match create(addr, &key, "v") {
                            Ok((200, body)) => {
                                let revision = serde_json::from_str::<Value>(&body)
                                    .ok()
                                    .and_then(|v| v["revision"].as_u64())
                                    .expect("a revision with every acknowledgement");
                                acked.push((key, revision));
                            }
                            // Killed mid-request, or refused while going down: not
                            // acknowledged, so nothing is promised.
                            _ => break,
                        }
                    }
                    acked
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(400 + 300 * round));
        server.kill9();
        for writer in writers {
            acknowledged.extend(writer.join().expect("writer"));
        }
        server.spawn(false);
    }
    assert!(
        acknowledged.len() > 100,
        "the load was too light to mean anything: {}",
        acknowledged.len()
    );
    let mut revisions = std::collections::HashSet::new();
    for (key, revision) in &acknowledged {
        let (status, body) =
            http_json(server.addr, "GET", &format!("/v0/get?key={key}"), None).unwrap();
        assert_eq!(status, 200, "acknowledged write {key} lost after kill -9");
        let value: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["modRevision"].as_u64(), Some(*revision), "{key}");
        assert!(
            revisions.insert(*revision),
            "revision {revision} acknowledged twice"
        );
    }
}

#[test]
fn garbage_requests_are_refused_and_change_nothing() {
    let server = Server::init();
    let before = http_json(server.addr, "GET", "/v0/range?prefix=/", None)
        .unwrap()
        .1;
    for body in [
        "",
        "not json",
        "{}",
        "{\"ops\": []}",
        "{\"ops\": [{\"op\": \"explode\", \"key\": \"/a\", \"value\": \"x\"}]}",
        "{\"ops\": [{\"op\": \"create\", \"key\": \"\", \"value\": \"x\"}]}",
        "{\"ops\": [{\"op\": \"create\", \"key\": \"/a\"}]}",
        "{\"ops\": [{\"op\": \"delete\", \"key\": \"/a\", \"value\": \"x\"}]}",
        "{\"ops\": [{\"op\": \"create\", \"key\": \"/a\", \"value\": \"x\", \"extra\": 1}]}",
        "{\"ops\": [{\"op\": \"create\", \"key\": \"/a\", \"value\": \"x\"}, {\"op\": \"update\", \"key\": \"/a\", \"value\": \"y\"}]}",
    ] {
        let (status, answer) = http_json(server.addr, "POST", "/v0/txn", Some(body)).unwrap();
        assert!(
            status == 400 || status == 409,
            "{body:?} → {status} {answer}"
        );
    }
    let long_key = format!("/{}", "k".repeat(2000));
    let (status, _) = create(server.addr, &long_key, "x").unwrap();
    assert_eq!(status, 400);
    for path in [
        "/v0/range?prefix=/&continue=garbage",
        "/v0/get",
        "/v0/watch?prefix=/&after=x",
        // Not percent-encoded UTF-8: refused, not read as U+FFFD.
        "/v0/get?key=%FF",
        "/v0/range?prefix=%C3",
    ] {
        let (status, _) = http_json(server.addr, "GET", path, None).unwrap();
        assert_eq!(status, 400, "{path}");
    }
    assert_eq!(
        http_json(server.addr, "GET", "/v0/range?prefix=/", None)
            .unwrap()
            .1,
        before
    );
    // Flags that cannot work are refused before anything starts.
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("never");
    let data = data.to_str().unwrap();
    for (flags, needle) in [
        (&["--raft-tick", "0s"][..], "--raft-tick"),
        (
            &["--election-ticks", "2", "--heartbeat-ticks", "2"][..],
            "--election-ticks",
        ),
        (&["--join", "127.0.0.1:1"][..], "cannot be used with"),
        (&["--peer-listen", "0.0.0.0:2380"][..], "--advertise-peer"),
        (&["--request-timeout", "0s"][..], "--request-timeout"),
    ] {
        let mut args = vec!["server", "--init", "--data-dir", data];
        args.extend_from_slice(flags);
        let out = brink(&args);
        assert!(stderr(&out).contains(needle), "{flags:?}: {}", stderr(&out));
    }
    for (flags, needle) in [
        (&["--join", "127.0.0.1:1"][..], "--token"),
        (
            &["--join", "127.0.0.1:1", "--token", "brink1.00.00"][..],
            "join token is malformed",
        ),
    ] {
        let mut args = vec!["server", "--data-dir", data];
        args.extend_from_slice(flags);
        let out = brink(&args);
        assert!(stderr(&out).contains(needle), "{flags:?}: {}", stderr(&out));
    }
    let out = brink(&["server", "--data-dir", data]);
    assert!(
        stderr(&out).contains("bootstrap a cluster with --init"),
        "{}",
        stderr(&out)
    );
    assert!(
        !dir.path().join("never").exists(),
        "refused flags must not create state"
    );
}
