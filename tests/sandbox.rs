//! The sandbox under attack: a native probe runs inside exactly the jail a pod gets
//! (`brink sandbox-probe`, the same launch code and seccomp filter) and tries what an
//! escaped guest would; and pods on a real node get disjoint, durable ID ranges, a
//! `hostUsers` policy, and a sandbox that dies alone. Needs root, as the node does.

mod common;

use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

/// What a probe run printed: its events, in order.
struct ProbeRun {
    events: Vec<Value>,
}

impl ProbeRun {
    fn started(&self) -> &Value {
        &self.events[0]
    }

    fn output(&self) -> String {
        self.events
            .iter()
            .filter(|e| e["event"] == "output")
            .filter_map(|e| e["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn end(&self) -> &Value {
        self.events.last().expect("an end event")
    }

    /// The number after `key=` in the probe's output.
    fn number(&self, key: &str) -> u64 {
        let prefix = format!("{key}=");
        self.output()
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&prefix).and_then(|n| n.parse().ok()))
            .unwrap_or_else(|| panic!("no {key}= in {:?}", self.output()))
    }

    fn seccomp_killed(&self) -> bool {
        self.end()["seccomp_killed"] == true
    }
}

fn probe(data_dir: &std::path::Path, flags: &[&str], attack: &[&str]) -> ProbeRun {
    let mut args = vec!["sandbox-probe", "--data-dir"];
    let dir = data_dir.to_str().expect("utf-8 path");
    args.push(dir);
    args.extend_from_slice(flags);
    args.extend_from_slice(attack);
    let out = brink(&args);
    assert!(out.status.success(), "probe failed: {}", stderr(&out));
    let events: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON event"))
        .collect();
    assert_eq!(
        events.first().map(|e| e["event"].clone()),
        Some("started".into())
    );
    ProbeRun { events }
}

/// A probe that stays in its jail until dropped, for inspection from the host.
struct IdleProbe {
    child: std::process::Child,
    pid: u32,
    first_id: u64,
}

impl IdleProbe {
    fn start(data_dir: &std::path::Path, flags: &[&str]) -> IdleProbe {
        let mut child = Command::new(brink_bin())
            .args(["sandbox-probe", "--data-dir"])
            .arg(data_dir)
            .args(flags)
            .arg("idle")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the probe");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let started: Value =
            serde_json::from_str(&lines.next().expect("started").expect("read")).expect("json");
        let idle: Value =
            serde_json::from_str(&lines.next().expect("idle").expect("read")).expect("json");
        assert_eq!(idle["text"], "idle", "{idle}");
        IdleProbe {
            pid: started["pid"].as_u64().expect("pid") as u32,
            first_id: started["first_id"].as_u64().unwrap_or(0),
            child,
        }
    }
}

impl Drop for IdleProbe {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"");
        }
        let _ = self.child.wait();
    }
}

#[test]
fn uid_0_inside_is_the_pods_first_id_outside_with_no_privileges_left() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inside = probe(dir.path(), &[], &["id"]);
    assert_eq!(inside.output(), "uid=0 gid=0 pid=1");
    assert_eq!(inside.started()["first_id"], 1_000_000);

    let live = IdleProbe::start(dir.path(), &["--pod-uid", "live"]);
    let pid = live.pid;
    let first = live.first_id.to_string();
    // The host sees the mapped uid and gid, in every slot.
    let uid = proc_status(pid, "Uid");
    assert!(uid.split_whitespace().all(|u| u == first), "Uid: {uid}");
    let gid = proc_status(pid, "Gid");
    assert!(gid.split_whitespace().all(|g| g == first), "Gid: {gid}");
    assert_eq!(proc_status(pid, "Groups"), "", "no supplementary groups");
    let map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).expect("uid_map");
    assert_eq!(
        map.split_whitespace().collect::<Vec<_>>(),
        ["0", first.as_str(), "65536"]
    );
    let setgroups = std::fs::read_to_string(format!("/proc/{pid}/setgroups")).expect("setgroups");
    assert_eq!(setgroups.trim(), "deny");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(proc_status(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    assert_eq!(proc_status(pid, "Seccomp"), "2", "seccomp filter mode");
    // Its own namespaces, every one of them.
    for ns in ["user", "mnt", "pid", "ipc", "uts", "net", "cgroup"] {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("own ns");
        let its = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("its ns");
        assert_ne!(mine, its, "{ns} namespace is shared with the host");
    }
}

#[test]
fn the_probe_cannot_read_root_only_files_or_write_the_hosts_etc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = tempfile::tempdir().expect("host dir");
    std::fs::set_permissions(host.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let secret = host.path().join("secret");
    std::fs::write(&secret, "root only\n").expect("secret");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let public = host.path().join("public");
    std::fs::write(&public, "anyone\n").expect("public");
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let bind = format!("{}:/host", host.path().display());

    // The bind works (a world-readable file reads), so the refusal is the ID mapping's.
    let readable = probe(dir.path(), &["--bind", &bind], &["read", "/host/public"]);
    assert!(
        readable.output().starts_with("ok: 7"),
        "{}",
        readable.output()
    );
    let denied = probe(dir.path(), &["--bind", &bind], &["read", "/host/secret"]);
    assert!(
        denied.output().contains("Permission denied"),
        "{}",
        denied.output()
    );
    // Nothing of the host is reachable by path unless bound.
    let shadow = probe(dir.path(), &[], &["read", "/etc/shadow"]);
    assert!(shadow.output().starts_with("error"), "{}", shadow.output());

    let etc_bind = "/etc:/host-etc";
    let name = format!("brink-probe-{}", std::process::id());
    let write = probe(
        dir.path(),
        &["--bind", etc_bind],
        &["write", &format!("/host-etc/{name}")],
    );
    assert!(
        write.output().contains("Permission denied"),
        "{}",
        write.output()
    );
    assert!(!std::path::Path::new("/etc").join(&name).exists());
}

#[test]
fn mount_unshare_bpf_keyctl_sockets_and_forks_are_killed_by_seccomp() {
    let dir = tempfile::tempdir().expect("tempdir");
    for attack in ["mount", "unshare", "bpf", "keyctl", "socket", "fork"] {
        let run = probe(dir.path(), &[], &[attack]);
        assert!(
            run.seccomp_killed(),
            "{attack} was not killed: {:?}",
            run.events
        );
        assert_eq!(run.end()["signal"], 31, "{attack}: SIGSYS");
        assert!(
            run.end()["describe"]
                .as_str()
                .unwrap_or_default()
                .contains("seccomp"),
            "{attack}: the kill is reported as seccomp's"
        );
        assert_eq!(run.output(), "", "{attack} returned to the probe");
    }
}

#[test]
fn the_probe_cannot_signal_or_trace_the_agent_or_another_pods_sandbox() {
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    let mut node = Node::start();
    let port = free_port();
    node.write_manifest("hello.yaml", &service_pod("hello", &hello, port, &[]));
    node.wait_ready("hello");
    let node_pid = node.pid().expect("node pid");
    let sandboxes = sandbox_pids(node_pid);
    assert_eq!(sandboxes.len(), 1, "one sandbox for one pod");
    let other = sandboxes[0];

    let dir = tempfile::tempdir().expect("tempdir");
    for (attack, target) in [
        ("kill", node_pid),
        ("kill", other),
        ("ptrace", node_pid),
        ("ptrace", other),
    ] {
        let run = probe(dir.path(), &[], &[attack, &target.to_string()]);
        assert!(run.seccomp_killed(), "{attack} {target}: {:?}", run.events);
    }
    assert!(node.alive(), "the agent survived");
    assert_eq!(
        sandbox_pids(node_pid),
        vec![other],
        "the pod's sandbox survived"
    );
    assert_eq!(http_get(addr(port), "/").expect("hello").status, 200);
}

#[test]
fn the_sandbox_has_only_loopback_and_its_own_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let live = IdleProbe::start(dir.path(), &[]);
        let links = Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", live.pid))
            .args(["ip", "-o", "link", "show"])
            .output()
            .expect("nsenter");
        assert!(links.status.success(), "{}", stderr(&links));
        let names: Vec<String> = stdout(&links)
            .lines()
            .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_string()))
            .collect();
        assert_eq!(names, ["lo"]);
    }

    let threads = probe(dir.path(), &["--max-threads", "16"], &["threads", "100"]);
    let started = threads.number("started");
    assert!(started < 16, "{}", threads.output());
    assert!(
        threads
            .output()
            .contains("Resource temporarily unavailable")
    );

    let limit: u64 = 128 << 20;
    let memory = probe(
        dir.path(),
        &["--max-data-bytes", &limit.to_string()],
        &["memory", &(1u64 << 30).to_string()],
    );
    let allocated = memory.number("allocated");
    assert!(allocated < limit, "{}", memory.output());
    assert!(memory.output().contains("Cannot allocate memory"));
}

/// `pid`'s cgroup directory for `controller`: its v1 hierarchy's, or its v2 cgroup.
fn cgroup_dir(pid: u32, controller: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("proc cgroup");
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, list, path) = (parts.next(), parts.next(), parts.next());
        if let (Some(list), Some(path)) = (list, path)
            && list.split(',').any(|c| c == controller)
        {
            return format!("/sys/fs/cgroup/{controller}{path}").into();
        }
    }
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup");
    format!("/sys/fs/cgroup{path}").into()
}

fn cgroup_value(dir: &std::path::Path, v1: &str, v2: &str) -> String {
    std::fs::read_to_string(dir.join(v1))
        .or_else(|_| std::fs::read_to_string(dir.join(v2)))
        .unwrap_or_else(|e| panic!("{} has neither {v1} nor {v2}: {e}", dir.display()))
        .trim()
        .to_string()
}

#[test]
fn a_sandbox_over_its_cgroup_memory_is_oom_killed_and_its_pids_are_capped() {
    let dir = tempfile::tempdir().expect("tempdir");
    // RLIMIT_DATA far above the cgroup's limit, so the cgroup is what stops it.
    let memory = probe(
        dir.path(),
        &[
            "--cgroup-memory",
            &(64u64 << 20).to_string(),
            "--max-data-bytes",
            &(2u64 << 30).to_string(),
        ],
        &["memory", &(1u64 << 30).to_string()],
    );
    let end = memory.end();
    assert_eq!(end["oom_killed"], true, "{end}");
    assert_eq!(end["reason"], "OOMKilled", "{end}");
    assert_eq!(end["signal"], 9, "{end}");

    let threads = probe(
        dir.path(),
        &[
            "--cgroup-memory",
            &(256u64 << 20).to_string(),
            "--cgroup-pids",
            "8",
            "--max-threads",
            "1000",
        ],
        &["threads", "100"],
    );
    let started = threads.number("started");
    assert!(started < 8, "{}", threads.output());
    assert_eq!(threads.end()["oom_killed"], false);
}

#[test]
fn a_pods_sandbox_runs_in_its_own_cgroup_with_the_pods_limits() {
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    let node = Node::start();
    let port = free_port();
    let manifest = service_pod("limited", &hello, port, &[])
        + "    resources:\n      limits:\n        memory: 32Mi\n        cpu: 250m\n";
    node.write_manifest("limited.yaml", &manifest);
    let pod = node.wait_ready("limited");
    assert!(
        node.log().contains("sandboxes get cgroup limits"),
        "{}",
        node.log()
    );
    let uid = pod["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let pid = sandbox_pids(node.pid().expect("pid"))[0];
    let memory = cgroup_dir(pid, "memory");
    assert!(
        memory.ends_with(format!("pod-{uid}")),
        "{}",
        memory.display()
    );
    // The containers' limit plus the default 64 MiB sandbox overhead.
    let limit = cgroup_value(&memory, "memory.limit_in_bytes", "memory.max");
    assert_eq!(limit, ((32u64 << 20) + (64u64 << 20)).to_string());
    let pids = cgroup_dir(pid, "pids");
    assert_eq!(cgroup_value(&pids, "pids.max", "pids.max"), "64");
    let cpu = cgroup_dir(pid, "cpu");
    let quota = cgroup_value(&cpu, "cpu.cfs_quota_us", "cpu.max");
    assert!(quota == "25000" || quota == "25000 100000", "{quota}");
    assert_eq!(http_get(addr(port), "/").expect("served").status, 200);

    node.remove_manifest("limited.yaml");
    node.wait_gone("limited");
    wait_for("the pod's cgroup to be removed", || {
        (!memory.exists() && !pids.exists()).then_some(())
    });
}

#[test]
fn a_garbled_frame_closes_that_sandbox_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = probe(dir.path(), &[], &["garble"]);
    let describe = run.end()["describe"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(describe.contains("garbled frame"), "{describe}");
    assert!(describe.contains("protocol version"), "{describe}");
}

#[test]
fn pods_get_disjoint_ranges_that_survive_an_agent_restart() {
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    let mut node = Node::start();
    let (a, b) = (free_port(), free_port());
    node.write_manifest("a.yaml", &service_pod("a", &hello, a, &[]));
    node.write_manifest("b.yaml", &service_pod("b", &hello, b, &[]));
    node.wait_ready("a");
    node.wait_ready("b");
    let first_ids = |node: &Node| -> Vec<(u32, u64)> {
        let pids = wait_for("two sandboxes", || {
            let pids = sandbox_pids(node.pid().expect("pid"));
            (pids.len() == 2).then_some(pids)
        });
        let mut ids: Vec<(u32, u64)> = pids
            .iter()
            .map(|pid| {
                let uid: u64 = proc_status(*pid, "Uid")
                    .split_whitespace()
                    .next()
                    .and_then(|u| u.parse().ok())
                    .expect("uid");
                (*pid, uid)
            })
            .collect();
        ids.sort_by_key(|(_, uid)| *uid);
        ids
    };
    let before = first_ids(&node);
    let (low, high) = (before[0].1, before[1].1);
    assert!(low >= 1_000_000, "{before:?}");
    assert!(high >= low + 65_536, "ranges overlap: {before:?}");
    for port in [a, b] {
        assert_eq!(http_get(addr(port), "/").expect("hello").status, 200);
    }

    node.restart();
    node.wait_ready("a");
    node.wait_ready("b");
    let after = first_ids(&node);
    assert_eq!(
        before.iter().map(|(_, u)| *u).collect::<Vec<_>>(),
        after.iter().map(|(_, u)| *u).collect::<Vec<_>>(),
        "the same ranges after a restart"
    );
}

#[test]
fn host_users_is_refused_on_a_default_node_and_allowed_by_policy() {
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    let port = free_port();
    let manifest =
        service_pod("root", &hello, port, &[]).replace("spec:\n", "spec:\n  hostUsers: true\n");
    let node = Node::start();
    node.write_manifest("root.yaml", &manifest);
    let pod = node.wait_phase("root", "Failed");
    assert_eq!(pod["status"]["reason"], "HostUsersNotAllowed", "{pod}");
    assert!(
        pod["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("--allow-host-users")
    );
    assert!(
        http_get(addr(port), "/").is_err(),
        "nothing serves the port"
    );
    let table = stdout(&node.brink(&["get", "pods"]));
    assert!(has_row(&table, "root", "HostUsersNotAllowed"), "{table}");

    let allowing = Node::start_with(&["--allow-host-users"]);
    allowing.write_manifest("root.yaml", &manifest);
    allowing.wait_ready("root");
    assert_eq!(http_get(addr(port), "/").expect("served").status, 200);
}

#[test]
fn a_host_without_user_namespaces_refuses_pods_instead_of_running_them_unconfined() {
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    // user.max_user_namespaces is per user namespace: 0 in a namespace of the node's own
    // turns user namespaces off for it alone.
    let node = Node::start_wrapped(
        &[
            "unshare",
            "--user",
            "--map-root-user",
            "sh",
            "-c",
            "echo 0 > /proc/sys/user/max_user_namespaces && exec \"$0\" \"$@\"",
        ],
        &[],
    );
    let port = free_port();
    node.write_manifest("hello.yaml", &service_pod("hello", &hello, port, &[]));
    let pod = node.wait_phase("hello", "Failed");
    assert_eq!(
        pod["status"]["reason"], "UserNamespacesUnavailable",
        "{pod}"
    );
    assert!(
        pod["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("max_user_namespaces"),
        "{pod}"
    );
    assert!(http_get(addr(port), "/").is_err());
}

#[test]
fn a_killed_sandbox_fails_its_container_and_is_restarted_alone() {
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    let mut node = Node::start();
    let (victim, bystander) = (free_port(), free_port());
    node.write_manifest("victim.yaml", &service_pod("victim", &hello, victim, &[]));
    node.write_manifest(
        "bystander.yaml",
        &service_pod("bystander", &hello, bystander, &[]),
    );
    node.wait_ready("victim");
    node.wait_ready("bystander");
    let node_pid = node.pid().expect("pid");
    let sandboxes = sandbox_pids(node_pid);
    assert_eq!(sandboxes.len(), 2);
    // Each sandbox's host name is its pod's name.
    let victim_pid = *sandboxes
        .iter()
        .find(|pid| {
            let uts = Command::new("nsenter")
                .arg(format!("--uts=/proc/{pid}/ns/uts"))
                .arg("hostname")
                .output()
                .expect("nsenter");
            stdout(&uts).trim() == "victim"
        })
        .expect("the victim's sandbox");
    let killed = Command::new("kill")
        .args(["-KILL", &victim_pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());

    let pod = node.wait_pod("victim", "a restart", |p| {
        container_status(p)["restartCount"].as_i64() >= Some(1)
            && container_status(p)["ready"] == true
    });
    let last = &container_status(&pod)["lastState"]["terminated"];
    assert_eq!(last["exitCode"], 137, "{pod}");
    assert!(
        last["message"]
            .as_str()
            .unwrap_or_default()
            .contains("SIGKILL"),
        "{pod}"
    );
    assert_eq!(
        http_get(addr(victim), "/").expect("victim again").status,
        200
    );
    let other = node.pod("bystander").expect("bystander");
    assert_eq!(container_status(&other)["restartCount"], 0);
    assert!(node.alive());
}

#[test]
fn no_sandbox_outlives_its_agent() {
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    let job = layout_image(layout.path(), "job");
    let mut node = Node::start();
    node.write_manifest(
        "hello.yaml",
        &service_pod("hello", &hello, free_port(), &[]),
    );
    node.write_manifest(
        "spin.yaml",
        &job_pod(
            "spin",
            &job,
            "Never",
            &["--lines", "1000", "--sleep-ms", "100"],
        ),
    );
    node.wait_ready("hello");
    let node_pid = node.pid().expect("pid");
    let sandboxes = wait_for("two sandboxes", || {
        let pids = sandbox_pids(node_pid);
        (pids.len() == 2).then_some(pids)
    });
    // SIGKILL: the agent gets no chance to clean up; the sandboxes must go by themselves.
    Command::new("kill")
        .args(["-KILL", &node_pid.to_string()])
        .status()
        .expect("kill");
    node.stop();
    wait_for("every sandbox gone", || {
        sandboxes
            .iter()
            .all(|pid| {
                !std::path::Path::new(&format!("/proc/{pid}")).exists()
                    || proc_status(*pid, "State").starts_with('Z')
            })
            .then_some(())
    });
}

fn addr(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn a_compiled_artifact_the_sandbox_cannot_load_is_compiled_again() {
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    let mut node = Node::start();
    let port = free_port();
    node.write_manifest("hello.yaml", &service_pod("hello", &hello, port, &[]));
    node.wait_ready("hello");
    node.stop();
    // Garble every compiled artifact on disk: the agent only checks that the file exists,
    // the sandbox is the one that maps it and finds it unusable.
    let mut garbled = 0;
    for dir in std::fs::read_dir(node.data_dir.join("compiled")).expect("compiled dir") {
        for file in std::fs::read_dir(dir.expect("entry").path()).expect("engine dir") {
            let path = file.expect("entry").path();
            if path.extension().is_some_and(|e| e == "cwasm") {
                std::fs::write(&path, b"not a compiled artifact").expect("garble");
                garbled += 1;
            }
        }
    }
    assert_eq!(garbled, 1);
    node.restart();
    node.wait_ready("hello");
    assert_eq!(http_get(addr(port), "/").expect("hello").status, 200);
    assert_eq!(node.metric("brink_compilations_total"), 1, "compiled again");
    assert!(
        node.log().contains("compiled artifact"),
        "the failure is logged"
    );
}
