//! The end-to-end harness: a real `docker-registry` on a free loopback port, the real
//! `brink` binary as a node with its own data and manifest directories, the wasm guests
//! built from `examples/`, and a tiny HTTP client over real sockets.
//!
//! Every wait here is a hang guard with a generous limit, never a timing assertion.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long any single wait may take before the test gives up.
pub const WAIT: Duration = Duration::from_secs(60);

pub fn brink_bin() -> &'static str {
    env!("CARGO_BIN_EXE_brink")
}

/// A wasm guest built from `examples/` (`hello`, `echo`, `job`, `faulty`, `p1-hello`).
pub fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("BRINK_EXAMPLES_DIR")).join(format!("{name}.wasm"))
}

/// A loopback port nobody listens on, below the kernel's ephemeral range: a port from that
/// range can be taken by any client socket between now and the moment a node binds it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let span = 12_000u16;
    let base = 20_000u16;
    let offset = (std::process::id() % u32::from(span)) as u16;
    for _ in 0..span {
        let i = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = base + (offset.wrapping_add(i.wrapping_mul(7))) % span;
        // Free for TCP and UDP both (control-plane members speak QUIC over UDP).
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free loopback port between {base} and {}", base + span);
}

/// Runs `brink ARGS` to completion, with no docker credentials unless a test gives some.
pub fn brink(args: &[&str]) -> Output {
    brink_with_env(args, &[])
}

pub fn brink_with_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(brink_bin());
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .env("DOCKER_CONFIG", "/nonexistent");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("run brink")
}

/// A docker config directory holding basic-auth credentials for `registry`.
pub fn docker_config(dir: &Path, registry: SocketAddr, user: &str, password: &str) -> PathBuf {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let config = dir.join("docker");
    std::fs::create_dir_all(&config).expect("docker config dir");
    std::fs::write(
        config.join("config.json"),
        format!(r#"{{"auths": {{"{registry}": {{"auth": "{auth}"}}}}}}"#),
    )
    .expect("docker config");
    config
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Polls `f` until it returns Some, or panics with `what` after [`WAIT`].
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A response from [`http_get`].
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// A GET over a fresh TCP connection (HTTP/1.1, `Connection: close`, chunked bodies decoded).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<HttpResponse> {
    http_request(addr, "GET", &addr.to_string(), path, &[])
}

/// A request with any method, Host and extra headers over a fresh TCP connection
/// (HTTP/1.1, no body, `Connection: close`, chunked bodies decoded).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..pos]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        data = &data[pos + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
    out
}

/// One HTTP/1.1 request with an optional JSON body: (status, body).
pub fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A real OCI registry (Debian's `docker-registry`) on a free loopback port.
pub struct Registry {
    pub addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        Registry::start_inner(None)
    }

    /// A registry that requires HTTP basic auth (htpasswd) for everything.
    pub fn start_with_basic_auth(user: &str, password: &str) -> Registry {
        Registry::start_inner(Some((user, password)))
    }

    fn start_inner(auth: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth_config = match auth {
            None => String::new(),
            Some((user, password)) => {
                let hash = bcrypt::hash(password, 4).expect("bcrypt");
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, format!("{user}:{hash}\n")).expect("htpasswd");
                format!(
                    "auth:\n  htpasswd:\n    realm: brink-test\n    path: {}\n",
                    path.display()
                )
            }
        };
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{auth_config}",
                dir.path().join("data").display()
            ),
        )
        .expect("write registry config");
        let binary = ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("docker-registry is not installed: run scripts/test, which installs it (apt-get install docker-registry)");
        let log_path = dir.path().join("registry.log");
        let log = std::fs::File::create(&log_path).expect("registry log");
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start docker-registry");
        let mut registry = Registry {
            addr,
            child,
            _dir: dir,
        };
        // With auth on, an anonymous /v2/ is a 401: that is the registry being up.
        let expected = if auth.is_some() { 401 } else { 200 };
        let start = Instant::now();
        while !http_get(addr, "/v2/").is_ok_and(|r| r.status == expected) {
            if start.elapsed() > WAIT || matches!(registry.child.try_wait(), Ok(Some(_))) {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                panic!("the registry did not come up; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// `127.0.0.1:PORT/REPO`.
    pub fn reference(&self, repo: &str) -> String {
        format!("{}/{repo}", self.addr)
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Pushes an example guest; returns the manifest digest brink printed.
pub fn push(example_name: &str, reference: &str) -> String {
    let file = example(example_name);
    let out = brink(&["push", file.to_str().expect("utf-8 path"), reference]);
    assert!(out.status.success(), "push failed: {}", stderr(&out));
    let digest = stdout(&out).trim().to_string();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "push printed {digest:?}"
    );
    digest
}

/// A `brink node` process with its own directories.
pub struct Node {
    pub kubelet: SocketAddr,
    pub data_dir: PathBuf,
    pub manifests: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    extra_args: Vec<String>,
    /// A command the node runs under (`unshare ...`), if any.
    wrapper: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Starts a node with short back-offs and a 1 s request deadline, so the failure
    /// paths are reached quickly.
    pub fn start() -> Node {
        Node::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Node {
        Node::start_wrapped(&[], extra)
    }

    /// Starts a node under `wrapper` (its program and arguments, then brink's own).
    pub fn start_wrapped(wrapper: &[&str], extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let manifests = dir.path().join("manifests");
        std::fs::create_dir_all(&manifests).expect("manifests dir");
        let mut node = Node {
            kubelet: format!("127.0.0.1:{}", free_port()).parse().expect("addr"),
            data_dir: dir.path().join("data"),
            manifests,
            log_path: dir.path().join("node.log"),
            child: None,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            _dir: dir,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("node log");
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(brink_bin());
                c
            }
            None => Command::new(brink_bin()),
        };
        let child = command
            .arg("node")
            .arg("--manifests")
            .arg(&self.manifests)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--kubelet-addr", &self.kubelet.to_string()])
            .args([
                "--host-port-address",
                "127.0.0.1",
                "--node-name",
                "test-node",
            ])
            .args([
                "--manifest-poll-interval",
                "100ms",
                "--request-deadline",
                "1s",
            ])
            .args([
                "--image-pull-backoff",
                "200ms",
                "--crash-loop-backoff",
                "200ms",
                "--backoff-max",
                "1s",
            ])
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start brink node");
        self.child = Some(child);
        let kubelet = self.kubelet;
        let start = Instant::now();
        while !http_get(kubelet, "/healthz").is_ok_and(|r| r.status == 200) {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || start.elapsed() > WAIT {
                panic!("the node did not come up; its log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the node with SIGTERM (graceful) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let start = Instant::now();
            while start.elapsed() < WAIT {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True while the node process is alive.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn write_manifest(&self, file: &str, text: &str) {
        // Write then rename, so the node never reads half a file.
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, self.manifests.join(file)).expect("rename manifest");
    }

    pub fn remove_manifest(&self, file: &str) {
        std::fs::remove_file(self.manifests.join(file)).expect("remove manifest");
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        http_get(self.kubelet, path).expect("kubelet endpoint")
    }

    pub fn pods(&self) -> Vec<Value> {
        let response = self.get("/pods");
        assert_eq!(response.status, 200);
        let list: Value = serde_json::from_str(&response.body).expect("PodList JSON");
        assert_eq!(list["kind"], "PodList");
        list["items"].as_array().cloned().unwrap_or_default()
    }

    pub fn pod(&self, name: &str) -> Option<Value> {
        self.pods()
            .into_iter()
            .find(|p| p["metadata"]["name"] == name)
    }

    /// Waits until `name` exists and `check` accepts it; returns it.
    pub fn wait_pod(&self, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        wait_for(&format!("pod {name}: {what}"), || {
            self.pod(name).filter(|p| check(p))
        })
    }

    pub fn wait_phase(&self, name: &str, phase: &str) -> Value {
        self.wait_pod(name, &format!("phase {phase}"), |p| {
            p["status"]["phase"] == phase
        })
    }

    pub fn wait_ready(&self, name: &str) -> Value {
        self.wait_pod(name, "Ready", |p| {
            p["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
    }

    pub fn wait_gone(&self, name: &str) {
        wait_for(&format!("pod {name} to be gone"), || {
            self.pod(name).is_none().then_some(())
        });
    }

    /// One counter from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let text = self.get("/metrics").body;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing from:\n{text}"))
    }

    /// Runs `brink ARGS --node <this node>`.
    pub fn brink(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        let node = self.kubelet.to_string();
        all.extend(["--node", &node]);
        brink(&all)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_node_cgroups(&self.data_dir);
    }
}

/// Removes the cgroup subtree a killed node left (`brink-<FNV-1a of its data dir>` beside
/// this test process's own cgroups, as the node names it), so test runs leave none behind.
fn remove_node_cgroups(data_dir: &Path) {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data_dir.as_os_str().as_encoded_bytes() {
        hash = (hash ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    let name = format!("brink-{:08x}", hash as u32);
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(list), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let base = match list.split(',').next() {
            Some("") | None => "/sys/fs/cgroup".to_string(),
            Some(controller) => format!("/sys/fs/cgroup/{controller}"),
        };
        let subtree = PathBuf::from(format!("{base}{path}")).join(&name);
        if let Ok(entries) = std::fs::read_dir(&subtree) {
            for entry in entries.flatten() {
                let leaf = entry.file_name().to_string_lossy().into_owned();
                if leaf.starts_with("pod-") || leaf.starts_with("spare-") {
                    // The sandboxes died with the node; the kernel may lag a moment.
                    for _ in 0..50 {
                        if std::fs::remove_dir(entry.path()).is_ok() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            let _ = std::fs::remove_dir(&subtree);
        }
    }
}

/// The first container status of a pod.
pub fn container_status(pod: &Value) -> &Value {
    &pod["status"]["containerStatuses"][0]
}

/// A service pod manifest exposing `container_port` on `host_port`.
pub fn service_pod(name: &str, image: &str, host_port: u16, env: &[(&str, &str)]) -> String {
    let mut env_yaml = String::from(
        "    env:\n    - name: POD_NAME\n      valueFrom:\n        fieldRef:\n          fieldPath: metadata.name\n    - name: POD_NAMESPACE\n      valueFrom:\n        fieldRef:\n          fieldPath: metadata.namespace\n",
    );
    for (k, v) in env {
        env_yaml.push_str(&format!("    - name: {k}\n      value: \"{v}\"\n"));
    }
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: {name}\n    image: {image}\n{env_yaml}    ports:\n    - containerPort: 8080\n      hostPort: {host_port}\n"
    )
}

/// A job pod manifest running the `job` example (or another command image) with `args`.
pub fn job_pod(name: &str, image: &str, restart_policy: &str, args: &[&str]) -> String {
    let args = args
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  restartPolicy: {restart_policy}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: {name}\n    image: {image}\n    args: [{args}]\n    env:\n    - name: POD_NAME\n      valueFrom:\n        fieldRef:\n          fieldPath: metadata.name\n"
    )
}

/// Pushes an example guest into an OCI image layout under `dir`; returns `oci:DIR:TAG`.
pub fn layout_image(dir: &Path, example_name: &str) -> String {
    let reference = format!("oci:{}:{example_name}", dir.display());
    push(example_name, &reference);
    reference
}

/// Whether a `brink get pods` table has a row for `name` that contains `text`.
pub fn has_row(table: &str, name: &str, text: &str) -> bool {
    table
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name) && l.contains(text))
}

/// The sandbox processes a node has started (its children running `sandbox-init`).
pub fn sandbox_pids(node_pid: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains("sandbox-init") {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // "pid (comm) state ppid ...": the comm may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        // A spare (started ahead of need, no pod yet) is still the host's root; a pod's
        // sandbox has entered its user namespace and runs as its range's first ID.
        let uid = proc_status(pid, "Uid");
        let spare = uid.split_whitespace().next() == Some("0");
        if ppid == Some(node_pid) && !spare {
            pids.push(pid);
        }
    }
    pids
}

/// A field of /proc/PID/status (`Uid`, `CapEff`, ...), or "" when the process is gone.
pub fn proc_status(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// How many `Scheduled` Events an EventList (JSON) holds for the pod `name`: a pod the
/// scheduler bound once has one.
pub fn scheduled_events(events: &Value, name: &str) -> usize {
    events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["reason"] == "Scheduled" && e["involvedObject"]["name"] == name)
        .count()
}
