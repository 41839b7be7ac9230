//! Issue 2's benchmark: Brink beside its peer on this machine, in one run, with ratios.
//!
//!   cargo bench --bench node
//!
//! 1. Requests/s and p50/p99 of the hello component through Brink's host port and through
//!    `wasmtime serve` (wasmtime-cli of the same wasmtime version, installed by this bench
//!    under target/bench-tools), with the same `wrk` load.
//! 2. Cold start, manifest written → first 200: with the artifact cached, and pulled from a
//!    local registry (a 2 MB artifact: hello padded with a custom section).
//! 3. The node's resident memory idle and with 100 idle hello pods.
//! 4. (issue 3) hello through the sandboxed path vs the in-process path, sandbox start
//!    time, and memory per idle sandbox with 100 hello pods, each in its own sandbox.
//!
//! 5. (issue 4) hello through a Gateway listener vs through its host port vs `wasmtime
//!    serve`; route lookup cost with 10, 1,000 and 10,000 routes (two shapes: one host
//!    each, and one host with a path each); the time a route edit takes to serve under
//!    load.
//!
//! `BENCH_ONLY=gateway` (comma-separated sections) runs one part.
//! Figures go to stdout; nothing here passes or fails on a number.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const WASMTIME_VERSION: &str = "48.0.8";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().expect("addr")
}

/// wasmtime-cli of the engine's version, built once into target/bench-tools.
fn wasmtime_cli() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-tools");
    let bin = root.join("bin/wasmtime");
    let current = Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| stdout(&o));
    if !current.is_some_and(|v| v.contains(WASMTIME_VERSION)) {
        eprintln!("installing wasmtime-cli {WASMTIME_VERSION} (once; slow on 2 cores)…");
        let status = Command::new(env!("CARGO"))
            .args([
                "install",
                "--locked",
                "--version",
                WASMTIME_VERSION,
                "wasmtime-cli",
                "--root",
            ])
            .arg(&root)
            .status()
            .expect("cargo install wasmtime-cli");
        assert!(status.success(), "installing wasmtime-cli failed");
    }
    bin
}

struct Load {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

fn parse_latency(value: &str) -> f64 {
    let value = value.trim();
    let (number, unit) = value.split_at(
        value
            .find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(value.len()),
    );
    let n: f64 = number.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        _ => f64::NAN,
    }
}

/// Runs wrk against `url` and reads requests/s and the p50/p99 latencies.
fn wrk(url: &str, seconds: u32, connections: u32) -> Load {
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
            url,
        ])
        .output()
        .expect("wrk is not installed: apt-get install wrk");
    let text = stdout(&out);
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if let Some(errors) = errors {
        eprintln!("wrk reported: {errors}");
    }
    Load {
        rps: field("Requests/sec:").parse().unwrap_or(f64::NAN),
        p50_us: parse_latency(&field("50%")),
        p99_us: parse_latency(&field("99%")),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// hello with a custom section appended, to make an artifact of about `size` bytes.
fn padded_hello(dir: &Path, size: usize) -> PathBuf {
    let mut wasm = std::fs::read(example("hello")).expect("hello.wasm");
    let name = b"brink-bench-padding";
    let payload_len = size.saturating_sub(wasm.len() + name.len() + 8);
    let mut section = Vec::new();
    let leb = |mut n: usize, out: &mut Vec<u8>| loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    };
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name);
    body.extend(std::iter::repeat_n(0u8, payload_len));
    section.push(0u8);
    leb(body.len(), &mut section);
    section.extend_from_slice(&body);
    wasm.extend_from_slice(&section);
    let path = dir.join("hello-2mb.wasm");
    std::fs::write(&path, wasm).expect("write padded hello");
    path
}

fn wait_200(port: u16) -> Duration {
    let start = Instant::now();
    loop {
        if http_get(addr(port), "/").is_ok_and(|r| r.status == 200) {
            return start.elapsed();
        }
        assert!(start.elapsed() < WAIT, "no 200 on port {port}");
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Cold starts: writes a fresh pod per run and times manifest → first 200.
fn cold_starts(
    node: &Node,
    image: &str,
    runs: usize,
    label: &str,
    fresh_image: impl Fn(usize) -> String,
) -> Vec<f64> {
    let mut times = Vec::new();
    for i in 0..runs {
        let port = free_port();
        let name = format!("{label}-{i}");
        let image = if image.is_empty() {
            fresh_image(i)
        } else {
            image.to_string()
        };
        let start = Instant::now();
        node.write_manifest(
            &format!("{name}.yaml"),
            &service_pod(&name, &image, port, &[]),
        );
        let _ = wait_200(port);
        times.push(start.elapsed().as_secs_f64() * 1e3);
        node.remove_manifest(&format!("{name}.yaml"));
        node.wait_gone(&name);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times
}

fn main() {
    let seconds: u32 = env_or("BENCH_SECONDS", 10);
    let connections: u32 = env_or("BENCH_CONNECTIONS", 32);
    let runs: usize = env_or("BENCH_COLD_RUNS", 20);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |section: &str| only.is_empty() || only.split(',').any(|s| s == section);
    println!("# brink node benchmark (release build; wrk -t2 -c{connections} -d{seconds}s)\n");
    if run("throughput") {
        throughput(seconds, connections);
    }
    if run("cold") {
        cold(runs);
    }
    if run("memory") {
        memory();
    }
    if run("sandbox") {
        sandbox(seconds, connections);
    }
    if run("gateway") {
        gateway(seconds, connections);
    }
    if run("lookup") {
        route_lookups();
    }
}

/// The Gateway API objects that route `hello.example` (and any host) to the hello pod.
fn hello_gateway(port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: hello}}\nspec:\n  selector: {{app: hello}}\n  ports: [{{port: 80, targetPort: 8080}}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: brink}}\nspec: {{controllerName: brink.dev/gateway-controller}}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: bench}}\nspec:\n  gatewayClassName: brink\n  listeners: [{{name: http, port: {port}, protocol: HTTP}}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: hello}}\nspec:\n  parentRefs: [{{name: bench}}]\n  rules:\n  - backendRefs: [{{name: hello, port: 80}}]\n"
    )
}

fn gateway(seconds: u32, connections: u32) {
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    // BENCH_GATEWAY_FLAGS: extra node flags, to compare settings in one binary.
    let extra = std::env::var("BENCH_GATEWAY_FLAGS").unwrap_or_default();
    let mut flags = vec![
        "--request-deadline",
        "10s",
        "--gateway-address",
        "127.0.0.1",
    ];
    flags.extend(extra.split_whitespace());
    let node = Node::start_with(&flags);
    let (host_port, gateway_port) = (free_port(), free_port());
    let pod = service_pod("hello", &hello, host_port, &[]).replace(
        "metadata:\n  name: hello\n",
        "metadata:\n  name: hello\n  labels: {app: hello}\n",
    );
    node.write_manifest(
        "hello.yaml",
        &format!("{pod}---\n{}", hello_gateway(gateway_port)),
    );
    node.wait_ready("hello");
    let _ = wait_200(gateway_port);
    let url = |port: u16| format!("http://127.0.0.1:{port}/");
    let _warm = wrk(&url(gateway_port), 2, connections);
    let _warm = wrk(&url(host_port), 2, connections);
    // Three rounds, alternating, and the median of each figure: one run's tail on a
    // shared 2-core machine says little.
    let mut gateway_runs = Vec::new();
    let mut host_port_runs = Vec::new();
    for _ in 0..3 {
        gateway_runs.push(wrk(&url(gateway_port), seconds, connections));
        host_port_runs.push(wrk(&url(host_port), seconds, connections));
    }
    let through_gateway = median_load(&gateway_runs);
    let through_host_port = median_load(&host_port_runs);
    let wasmtime = wasmtime_cli();
    let serve_port = free_port();
    let mut serve = Command::new(&wasmtime)
        .args([
            "serve",
            "-Scli",
            "--addr",
            &format!("127.0.0.1:{serve_port}"),
        ])
        .arg(example("hello"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("wasmtime serve");
    let _ = wait_200(serve_port);
    let _warm = wrk(&url(serve_port), 2, connections);
    let peer = wrk(&url(serve_port), seconds, connections);
    let _ = serve.kill();
    let _ = serve.wait();
    println!(
        "## hello through a Gateway listener vs its host port (median of 3 alternating runs) vs `wasmtime serve` {WASMTIME_VERSION}"
    );
    println!("| path | requests/s | p50 µs | p99 µs |\n|---|---|---|---|");
    for (label, load) in [
        (
            "gateway (HTTPRoute → Service → sandboxed pod)",
            &through_gateway,
        ),
        ("host port (same pod)", &through_host_port),
        ("wasmtime serve", &peer),
    ] {
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} |",
            load.rps, load.p50_us, load.p99_us
        );
    }
    println!(
        "ratio gateway / host port: throughput {:.2}x, p99 added {:.0} µs (goal: >= 0.9x, <= 100 µs)",
        through_gateway.rps / through_host_port.rps,
        through_gateway.p99_us - through_host_port.p99_us
    );
    println!(
        "ratio gateway / wasmtime serve: throughput {:.2}x, p99 {:.2}x (goal: >= 1.0x)\n",
        through_gateway.rps / peer.rps,
        through_gateway.p99_us / peer.p99_us
    );

    // A route edit under load: from the file written to the first request that reaches
    // the new path, while wrk keeps the gateway busy.
    let load = {
        let target = url(gateway_port);
        std::thread::spawn(move || wrk(&target, 8, connections))
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut effect_ms = Vec::new();
    for i in 0..10 {
        let path = format!("/edit-{i}");
        let route = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: edit}}\nspec:\n  parentRefs: [{{name: bench}}]\n  hostnames: [edit.example]\n  rules:\n  - matches: [{{path: {{type: Exact, value: {path}}}}}]\n    backendRefs: [{{name: hello, port: 80}}]\n"
        );
        let start = Instant::now();
        node.write_manifest("edit.yaml", &route);
        loop {
            let ok = raw_get(gateway_port, "edit.example", &path) == Some(200);
            if ok || start.elapsed() > Duration::from_secs(10) {
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        effect_ms.push(start.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(200));
    }
    let during = load.join().expect("load");
    let effect_ms = {
        let mut v = effect_ms;
        v.sort_by(|a, b| a.total_cmp(b));
        v
    };
    println!("## a route edit under load (manifest written → first 200 on the new path)");
    println!(
        "p50 {:.1} ms, max {:.1} ms over {} edits, with wrk at {:.0} req/s (p99 {:.0} µs) meanwhile\n",
        percentile(&effect_ms, 0.5),
        effect_ms.last().copied().unwrap_or(f64::NAN),
        effect_ms.len(),
        during.rps,
        during.p99_us
    );
    drop(node);
}

/// The median of each figure over several runs.
fn median_load(runs: &[Load]) -> Load {
    let median = |f: &dyn Fn(&Load) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        percentile(&v, 0.5)
    };
    Load {
        rps: median(&|l| l.rps),
        p50_us: median(&|l| l.p50_us),
        p99_us: median(&|l| l.p99_us),
    }
}

/// One GET over a fresh connection; its status.
fn raw_get(port: u16, host: &str, path: &str) -> Option<u16> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr(port)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// A Zipf(1) sampler over ranks 0..n (a few hosts get most requests, as real traffic
/// does), driven by a xorshift generator so runs are repeatable.
struct Zipf {
    cdf: Vec<f64>,
    state: u64,
}

impl Zipf {
    fn new(n: usize) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for rank in 1..=n {
            total += 1.0 / rank as f64;
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Self {
            cdf,
            state: 0x9E37_79B9_7F4A_7C15,
        }
    }

    fn next(&mut self) -> usize {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let u = (self.state >> 11) as f64 / (1u64 << 53) as f64;
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

/// The route table's lookup alone, in this process: p50/p99 per lookup as the number of
/// routes grows, with requests spread evenly over every route (the worst case for
/// caches) and skewed as real traffic is (Zipf).
fn route_lookups() {
    use brink_node::gateway::compile::{Inputs, compile};
    use brink_node::gateway::table::RequestFacts;
    println!("## route lookup cost (in-process, one lookup = listener + host + path + conditions)");
    println!(
        "| routes | shape | requests | compile ms | lookup p50 ns | lookup p99 ns |\n|---|---|---|---|---|---|"
    );
    let mut p99_by_shape: std::collections::BTreeMap<(&str, &str), Vec<f64>> = Default::default();
    for count in [10usize, 1_000, 10_000] {
        for shape in ["host each", "path each"] {
            let mut text = String::from(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: brink}\nspec: {controllerName: brink.dev/gateway-controller}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec:\n  gatewayClassName: brink\n  listeners: [{name: http, port: 80, protocol: HTTP}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  selector: {app: s}\n  ports: [{port: 80}]\n",
            );
            for i in 0..count {
                let (hosts, prefix) = if shape == "host each" {
                    (format!("[r{i}.example.com]"), "/api".to_string())
                } else {
                    ("[shared.example.com]".to_string(), format!("/r{i}"))
                };
                text.push_str(&format!(
                    "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r{i}}}\nspec:\n  parentRefs: [{{name: g}}]\n  hostnames: {hosts}\n  rules:\n  - matches: [{{path: {{type: Exact, value: {prefix}/exact}}}}]\n    backendRefs: [{{name: s, port: 80}}]\n  - matches: [{{path: {{type: PathPrefix, value: {prefix}/v1}}, headers: [{{name: x-version, value: beta}}]}}]\n    backendRefs: [{{name: s, port: 80}}]\n  - matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]\n    backendRefs: [{{name: s, port: 80}}]\n"
                ));
            }
            let mut objects = brink_node::source::GatewayObjects::default();
            for object in brink_proto::parse_manifests("bench", &text).expect("bench manifests") {
                let key = object.key();
                match object {
                    brink_proto::Object::GatewayClass(c) => {
                        objects.classes.insert(key, *c);
                    }
                    brink_proto::Object::Gateway(g) => {
                        objects.gateways.insert(key, *g);
                    }
                    brink_proto::Object::Service(s) => {
                        objects.services.insert(key, *s);
                    }
                    brink_proto::Object::HttpRoute(r) => {
                        objects.routes.insert(key, *r);
                    }
                    _ => {}
                }
            }
            let secrets = Default::default();
            let start = Instant::now();
            let compiled = compile(&Inputs {
                objects: &objects,
                secrets: &secrets,
                controller: "brink.dev/gateway-controller",
                address: std::net::IpAddr::from([127, 0, 0, 1]),
                now: k8s_openapi::jiff::Timestamp::now(),
            });
            let compile_ms = start.elapsed().as_secs_f64() * 1e3;
            let table = &compiled.ports[&80].table;
            let headers = {
                let mut h = hyper::HeaderMap::new();
                h.insert("x-version", hyper::header::HeaderValue::from_static("beta"));
                h
            };
            let method = hyper::Method::GET;
            for pattern in ["uniform", "zipf"] {
                let mut zipf = Zipf::new(count);
                let mut samples = Vec::with_capacity(200_000);
                let mut misses = 0;
                for n in 0..200_000usize {
                    let i = if pattern == "uniform" {
                        (n * 7919) % count
                    } else {
                        zipf.next()
                    };
                    let (host, path) = if shape == "host each" {
                        (format!("r{i}.example.com"), "/api/v1/items".to_string())
                    } else {
                        ("shared.example.com".to_string(), format!("/r{i}/v1/items"))
                    };
                    let facts = RequestFacts {
                        host: &host,
                        path: &path,
                        query: None,
                        method: &method,
                        headers: &headers,
                    };
                    let t = Instant::now();
                    let found = table.lookup(&facts);
                    let ns = t.elapsed().as_nanos() as f64;
                    if found.is_none() {
                        misses += 1;
                    }
                    samples.push(ns);
                }
                assert_eq!(misses, 0, "every lookup should match");
                samples.sort_by(|a, b| a.total_cmp(b));
                let p99 = percentile(&samples, 0.99);
                p99_by_shape.entry((shape, pattern)).or_default().push(p99);
                println!(
                    "| {count} | {shape} | {pattern} | {compile_ms:.1} | {:.0} | {p99:.0} |",
                    percentile(&samples, 0.5)
                );
            }
        }
    }
    for ((shape, pattern), p99s) in p99_by_shape {
        println!(
            "p99 growth 10 → 10,000 routes ({shape}, {pattern}): {:.2}x (goal: <= 2x)",
            p99s.last().unwrap_or(&f64::NAN) / p99s.first().unwrap_or(&f64::NAN)
        );
    }
    println!();
}

/// A field of /proc/PID/smaps_rollup in KiB (Rss, Pss, Private_Dirty, ...).
fn smaps_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(&format!("{field}:"))
                    .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
            })
        })
        .unwrap_or(0)
}

/// Issue 3: what the sandbox costs, against the in-process path, in one run.
fn sandbox(seconds: u32, connections: u32) {
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    let url = |port: u16| format!("http://127.0.0.1:{port}/");
    let mut loads = Vec::new();
    for (label, flags) in [
        ("in-process", &["--isolation", "in-process"][..]),
        ("sandboxed", &[][..]),
    ] {
        let mut args = vec!["--request-deadline", "10s"];
        args.extend_from_slice(flags);
        let node = Node::start_with(&args);
        let port = free_port();
        node.write_manifest("hello.yaml", &service_pod("hello", &hello, port, &[]));
        node.wait_ready("hello");
        let _warm = wrk(&url(port), 2, connections);
        loads.push((label, wrk(&url(port), seconds, connections)));
    }
    println!("## hello: sandboxed path vs in-process path (same node binary, same load)");
    println!("| path | requests/s | p50 µs | p99 µs |\n|---|---|---|---|");
    for (label, load) in &loads {
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} |",
            load.rps, load.p50_us, load.p99_us
        );
    }
    let (inproc, sandboxed) = (&loads[0].1, &loads[1].1);
    println!(
        "ratio sandboxed / in-process: throughput {:.2}x, p99 {:.2}x (goal: throughput >= 0.8x)\n",
        sandboxed.rps / inproc.rps,
        sandboxed.p99_us / inproc.p99_us
    );

    // 100 hello pods, each in its own sandbox: start times from the node's log, memory
    // from the sandboxes' own accounting.
    let node = Node::start_with(&["--manifest-poll-interval", "100ms"]);
    std::thread::sleep(Duration::from_secs(1));
    let pid = node.pid().expect("node pid");
    let idle = rss_kib(pid);
    // Sandbox start times in ms, in the order the node logged them.
    let start_times = |node: &Node| -> Vec<f64> {
        node.log()
            .lines()
            .filter(|l| l.contains("sandbox ready"))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("start_us="))
                    .and_then(|v| v.parse::<f64>().ok())
            })
            .map(|us| us / 1e3)
            .collect()
    };
    let sorted = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v
    };
    // One pod at a time: what one sandbox start costs on an otherwise idle node.
    let sequential = cold_starts(&node, &hello, 20, "one-at-a-time", |_| String::new());
    let alone = sorted(start_times(&node));
    println!("## sandbox start");
    println!(
        "one at a time, {} starts (spawn → jail → artifacts loaded → ready): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (goal p99 <= 10 ms); manifest → first 200: p50 {:.1} ms, p99 {:.1} ms",
        alone.len(),
        percentile(&alone, 0.5),
        percentile(&alone, 0.99),
        percentile(&alone, 1.0),
        percentile(&sequential, 0.5),
        percentile(&sequential, 0.99)
    );
    let mut manifests = String::new();
    for i in 0..100 {
        manifests.push_str(&service_pod(&format!("idle-{i}"), &hello, free_port(), &[]));
        manifests.push_str("---\n");
    }
    node.write_manifest("hundred.yaml", &manifests);
    wait_for("100 sandboxes", || {
        (sandbox_pids(pid).len() == 100).then_some(())
    });
    wait_for("100 ready pods", || {
        let ready = node
            .pods()
            .iter()
            .filter(|p| container_status(p)["ready"] == true)
            .count();
        (ready == 100).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let pids = sandbox_pids(pid);
    let sum = |field: &str| pids.iter().map(|p| smaps_kib(*p, field)).sum::<u64>() as f64;
    let n = pids.len() as f64;
    // The batch's starts are the ones logged after the one-at-a-time runs.
    let starts = sorted(start_times(&node).split_off(alone.len()));
    println!("## 100 idle hello pods, each in its own sandbox");
    println!(
        "100 sandboxes started at once on 2 cores, {} starts: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        starts.len(),
        percentile(&starts, 0.5),
        percentile(&starts, 0.99),
        percentile(&starts, 1.0)
    );
    println!("| per idle sandbox | KiB |\n|---|---|");
    println!(
        "| RSS (counts shared pages in full) | {:.0} |",
        sum("Rss") / n
    );
    println!(
        "| PSS (shared pages split among sharers) | {:.0} |",
        sum("Pss") / n
    );
    println!(
        "| private (Private_Clean + Private_Dirty) | {:.0} |",
        (sum("Private_Clean") + sum("Private_Dirty")) / n
    );
    println!(
        "agent RSS: {:.1} MiB idle, {:.1} MiB with 100 sandboxed pods",
        idle as f64 / 1024.0,
        rss_kib(pid) as f64 / 1024.0
    );
    println!("goal: <= 4 MB per idle sandbox\n");
}

/// Requests through Brink's host port vs `wasmtime serve`, same guest, same load.
fn throughput(seconds: u32, connections: u32) {
    // 1. Throughput: Brink's host port vs wasmtime serve.
    let wasmtime = wasmtime_cli();
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    let node = Node::start_with(&["--request-deadline", "10s"]);
    let brink_port = free_port();
    node.write_manifest("hello.yaml", &service_pod("hello", &hello, brink_port, &[]));
    node.wait_ready("hello");
    let _warm = wrk(&format!("http://127.0.0.1:{brink_port}/"), 2, connections);
    let brink_load = wrk(
        &format!("http://127.0.0.1:{brink_port}/"),
        seconds,
        connections,
    );

    let url = |port: u16| format!("http://127.0.0.1:{port}/");
    // wasmtime serve as shipped compiles no epoch checks; Brink always has its CPU
    // deadline. So the peer runs twice: as shipped, and with the same 10 s deadline.
    let mut peers = Vec::new();
    for (label, extra) in [
        ("wasmtime serve", None),
        ("wasmtime serve -Wtimeout=10s", Some("-Wtimeout=10s")),
    ] {
        let port = free_port();
        let mut serve = Command::new(&wasmtime);
        serve.args(["serve", "-Scli", "--addr", &format!("127.0.0.1:{port}")]);
        serve.args(extra);
        let mut serve = serve
            .arg(example("hello"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("wasmtime serve");
        let _ = wait_200(port);
        let _warm = wrk(&url(port), 2, connections);
        peers.push((label, wrk(&url(port), seconds, connections)));
        let _ = serve.kill();
        let _ = serve.wait();
    }

    println!("## hello: requests through Brink's host port vs `wasmtime serve` {WASMTIME_VERSION}");
    println!("| server | requests/s | p50 µs | p99 µs |\n|---|---|---|---|");
    println!(
        "| brink | {:.0} | {:.0} | {:.0} |",
        brink_load.rps, brink_load.p50_us, brink_load.p99_us
    );
    for (label, peer) in &peers {
        println!(
            "| {label} | {:.0} | {:.0} | {:.0} |",
            peer.rps, peer.p50_us, peer.p99_us
        );
    }
    for (label, peer) in &peers {
        println!(
            "ratio brink / {label}: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x",
            brink_load.rps / peer.rps,
            brink_load.p50_us / peer.p50_us,
            brink_load.p99_us / peer.p99_us
        );
    }
    println!("goal: throughput >= 1.0x\n");
    node.remove_manifest("hello.yaml");
    node.wait_gone("hello");
}

/// Manifest written → first 200, cached and pulled.
fn cold(runs: usize) {
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    let node = Node::start();
    let cached = cold_starts(&node, &hello, runs, "cached", |_| String::new());
    println!("## cold start, manifest written → first 200 ({runs} runs; the first run compiles)");
    println!("| artifact | p50 ms | p99 ms | max ms |\n|---|---|---|---|");
    println!(
        "| cached (compiled in memory) | {:.1} | {:.1} | {:.1} |",
        percentile(&cached, 0.5),
        percentile(&cached, 0.99),
        percentile(&cached, 1.0)
    );
    let registry = Registry::start();
    let big = padded_hello(layout.path(), 2 << 20);
    let pulled = cold_starts(&node, "", runs.min(10), "pulled", |i| {
        let reference = format!("{}:v{i}", registry.reference("bench/hello2mb"));
        // A distinct digest per run (the padding differs), so each run really downloads
        // and compiles.
        let mut bytes = std::fs::read(&big).expect("padded");
        let last = bytes.len() - 1;
        bytes[last] = i as u8;
        let path = layout.path().join(format!("hello-2mb-{i}.wasm"));
        std::fs::write(&path, bytes).expect("write");
        let out = brink(&["push", path.to_str().expect("utf-8"), &reference]);
        assert!(out.status.success(), "{}", stderr(&out));
        reference
    });
    println!(
        "| 2 MB from the local registry (download + compile) | {:.1} | {:.1} | {:.1} |\n",
        percentile(&pulled, 0.5),
        percentile(&pulled, 0.99),
        percentile(&pulled, 1.0)
    );
    println!("goals: cached p50 <= 20 ms, p99 <= 100 ms; pulled p50 <= 200 ms\n");
}

/// The node's resident memory, idle and with 100 idle hello pods.
fn memory() {
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    let node = Node::start_with(&["--manifest-poll-interval", "100ms"]);
    std::thread::sleep(Duration::from_secs(2));
    let pid = node.pid().expect("node pid");
    let idle = rss_kib(pid);
    let mut manifests = String::new();
    for i in 0..100 {
        manifests.push_str(&service_pod(&format!("idle-{i}"), &hello, free_port(), &[]));
        manifests.push_str("---\n");
    }
    node.write_manifest("hundred.yaml", &manifests);
    wait_for("100 ready pods", || {
        let ready = node
            .pods()
            .iter()
            .filter(|p| {
                p["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            })
            .count();
        (ready == 100).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let loaded = rss_kib(pid);
    println!("## node resident memory");
    println!("| state | RSS MiB |\n|---|---|");
    println!("| idle | {:.1} |", idle as f64 / 1024.0);
    println!(
        "| 100 idle hello pods | {:.1} (+{:.1}) |",
        loaded as f64 / 1024.0,
        (loaded.saturating_sub(idle)) as f64 / 1024.0
    );
    println!("goals: <= 20 MB idle, <= 50 MB more for 100 pods");
}
