//! End to end: the real `brink` binary running real wasm guests pulled from a real
//! registry (or an OCI layout), checked through real sockets the way a user checks them.

mod common;

use std::net::SocketAddr;

use common::*;

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().expect("addr")
}

#[test]
fn push_pull_run_curl_status_and_logs() {
    let registry = Registry::start();
    let reference = format!("{}:v1", registry.reference("demo/hello"));
    let digest = push("hello", &reference);

    // `brink pull` fetches once, then finds it cached.
    let cache = tempfile::tempdir().expect("tempdir");
    let data = cache.path().to_str().expect("utf-8");
    let first = brink(&["pull", &reference, "--data-dir", data]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(
        stdout(&first).contains(&digest) && stdout(&first).contains("downloaded"),
        "{}",
        stdout(&first)
    );
    let second = brink(&["pull", &reference, "--data-dir", data]);
    assert!(
        stdout(&second).contains("already cached"),
        "{}",
        stdout(&second)
    );

    let node = Node::start();
    let port = free_port();
    node.write_manifest(
        "hello.yaml",
        &service_pod("hello", &reference, port, &[("GREETING", "Bonjour")]),
    );
    let pod = node.wait_ready("hello");

    let response = http_get(addr(port), "/").expect("curl the host port");
    assert_eq!(response.status, 200);
    assert_eq!(response.body, "Bonjour from Brink! (pod hello)\n");

    // Kubernetes-shaped status.
    assert_eq!(pod["status"]["phase"], "Running");
    let status = container_status(&pod);
    assert_eq!(status["ready"], true);
    assert_eq!(status["restartCount"], 0);
    assert!(status["state"]["running"]["startedAt"].is_string());
    assert_eq!(
        status["imageID"],
        format!("{}@{digest}", registry.reference("demo/hello"))
    );
    let conditions: Vec<_> = pod["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap_or_default().to_string(),
                c["status"].clone(),
            )
        })
        .collect();
    for kind in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
        assert!(
            conditions.iter().any(|(k, s)| k == kind && s == "True"),
            "{kind} in {conditions:?}"
        );
    }
    assert_eq!(pod["spec"]["nodeName"], "test-node");

    // kubectl-style table and formats.
    let table = node.brink(&["get", "pods"]);
    assert!(table.status.success(), "{}", stderr(&table));
    let table = stdout(&table);
    assert!(table.starts_with("NAME"), "{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("hello"))
        .expect("a row for hello");
    let cells: Vec<_> = row.split_whitespace().collect();
    assert_eq!(&cells[..4], ["hello", "1/1", "Running", "0"], "{table}");
    let wide = stdout(&node.brink(&["get", "pods", "-o", "wide"]));
    assert!(
        wide.contains("test-node") && wide.contains("127.0.0.1"),
        "{wide}"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout(
        &node.brink(&["get", "pods", "hello", "-o", "json"]),
    ))
    .expect("json");
    assert_eq!(json["kind"], "Pod");
    assert_eq!(json["metadata"]["name"], "hello");
    let yaml = stdout(&node.brink(&["get", "pods", "-o", "yaml"]));
    assert!(
        yaml.contains("kind: List") && yaml.contains("name: hello"),
        "{yaml}"
    );
}

#[test]
fn jobs_report_exit_codes_and_follow_restart_policy() {
    let layout = tempfile::tempdir().expect("tempdir");
    let job = layout_image(layout.path(), "job");
    let p1 = layout_image(layout.path(), "p1-hello");
    let node = Node::start();
    node.write_manifest(
        "jobs.yaml",
        &[
            job_pod("ok", &job, "Never", &["--lines", "3"]),
            job_pod("fails", &job, "Never", &["--exit", "3"]),
            job_pod("retry-ok", &job, "OnFailure", &["--exit", "0"]),
            job_pod("crashes", &job, "Always", &["--exit", "1"]),
            job_pod("preview1", &p1, "Never", &[]),
        ]
        .join("---\n"),
    );

    let ok = node.wait_phase("ok", "Succeeded");
    let terminated = &container_status(&ok)["state"]["terminated"];
    assert_eq!(terminated["exitCode"], 0);
    assert_eq!(terminated["reason"], "Completed");

    let fails = node.wait_phase("fails", "Failed");
    let terminated = &container_status(&fails)["state"]["terminated"];
    assert_eq!(terminated["exitCode"], 3);
    assert_eq!(terminated["reason"], "Error");
    assert_eq!(container_status(&fails)["restartCount"], 0);

    node.wait_phase("retry-ok", "Succeeded");
    let p1 = node.wait_phase("preview1", "Succeeded");
    assert_eq!(container_status(&p1)["state"]["terminated"]["exitCode"], 0);
    let p1_logs = stdout(&node.brink(&["logs", "preview1"]));
    assert_eq!(p1_logs, "hello from wasi preview 1\n");

    // restartPolicy Always on a failing job: CrashLoopBackOff with growing restarts.
    let crashes = node.wait_pod("crashes", "two restarts", |p| {
        container_status(p)["restartCount"].as_i64() >= Some(2)
    });
    assert_eq!(crashes["status"]["phase"], "Running");
    assert_eq!(
        container_status(&crashes)["lastState"]["terminated"]["exitCode"],
        1
    );
    node.wait_pod("crashes", "CrashLoopBackOff", |p| {
        container_status(p)["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    });
    let table = stdout(&node.brink(&["get", "pods"]));
    assert!(has_row(&table, "fails", "Error"), "{table}");
    assert!(has_row(&table, "ok", "Completed"), "{table}");
}

#[test]
fn logs_tail_timestamps_and_follow() {
    let layout = tempfile::tempdir().expect("tempdir");
    let job = layout_image(layout.path(), "job");
    let node = Node::start();
    node.write_manifest(
        "job.yaml",
        &job_pod("lines", &job, "Never", &["--lines", "5", "--stderr"]),
    );
    node.wait_phase("lines", "Succeeded");

    let all = stdout(&node.brink(&["logs", "lines"]));
    let expected: String = (1..=5).map(|i| format!("lines line {i}\n")).collect();
    assert_eq!(all, expected, "stdout and stderr lines, in order");
    assert_eq!(
        stdout(&node.brink(&["logs", "lines", "--tail", "2"])),
        "lines line 4\nlines line 5\n"
    );
    let stamped = stdout(&node.brink(&["logs", "lines", "--tail", "1", "--timestamps"]));
    let (stamp, rest) = stamped.split_once(' ').expect("timestamp then line");
    assert!(
        stamp.starts_with("20") && stamp.ends_with('Z') && stamp.contains('T'),
        "{stamped}"
    );
    assert_eq!(rest, "lines line 5\n");

    // Follow a job while it writes; the stream ends when the container does.
    node.write_manifest(
        "slow.yaml",
        &job_pod(
            "slow",
            &job,
            "Never",
            &["--lines", "8", "--sleep-ms", "150"],
        ),
    );
    node.wait_pod("slow", "running", |p| {
        container_status(p)["state"]["running"].is_object()
    });
    let followed = stdout(&node.brink(&["logs", "slow", "-f"]));
    let expected: String = (1..=8).map(|i| format!("slow line {i}\n")).collect();
    assert_eq!(followed, expected);

    // The endpoint refuses nonsense.
    assert_eq!(
        node.get("/containerLogs/default/lines/lines?tailLines=-1")
            .status,
        400
    );
    assert_eq!(
        node.get("/containerLogs/default/lines/lines?follow=maybe")
            .status,
        400
    );
    assert_eq!(node.get("/containerLogs/default/nope/lines").status, 404);
    assert_eq!(node.get("/containerLogs/default/lines/nope").status, 404);
    let err = node.brink(&["logs", "nope"]);
    assert!(
        !err.status.success() && stderr(&err).contains("not found"),
        "{}",
        stderr(&err)
    );
}

#[test]
fn manifest_directory_changes_start_restart_and_stop_pods() {
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    let node = Node::start();
    let port = free_port();
    node.write_manifest(
        "hello.yaml",
        &service_pod("web", &hello, port, &[("GREETING", "Hi")]),
    );
    let first = node.wait_ready("web");
    assert_eq!(
        http_get(addr(port), "/").expect("curl").body,
        "Hi from Brink! (pod web)\n"
    );

    // An edited spec restarts the pod with the new spec (a new uid, as for static pods).
    node.write_manifest(
        "hello.yaml",
        &service_pod("web", &hello, port, &[("GREETING", "Hej")]),
    );
    let second = node.wait_pod("web", "the edited spec", |p| {
        p["metadata"]["uid"] != first["metadata"]["uid"]
    });
    assert_ne!(second["metadata"]["uid"], first["metadata"]["uid"]);
    wait_for("the new greeting", || {
        http_get(addr(port), "/")
            .ok()
            .filter(|r| r.body == "Hej from Brink! (pod web)\n")
            .map(|_| ())
    });

    // An edit that breaks the file changes nothing: the last good pod keeps serving, and
    // the error is reported.
    let serving = node.pod("web").expect("web");
    node.write_manifest(
        "hello.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web\n",
    );
    wait_for("the broken edit to be reported", || {
        let v: serde_json::Value = serde_json::from_str(&node.get("/debug/manifests").body).ok()?;
        v["errors"].as_array().filter(|e| !e.is_empty()).map(|_| ())
    });
    assert_eq!(
        node.pod("web").expect("web")["metadata"]["uid"],
        serving["metadata"]["uid"]
    );
    assert_eq!(
        http_get(addr(port), "/").expect("curl").body,
        "Hej from Brink! (pod web)\n"
    );

    // A removed file stops its pod and closes its port.
    node.remove_manifest("hello.yaml");
    node.wait_gone("web");
    wait_for("the host port to close", || {
        http_get(addr(port), "/").is_err().then_some(())
    });
}

#[test]
fn graceful_stop_honours_the_grace_period() {
    let layout = tempfile::tempdir().expect("tempdir");
    let job = layout_image(layout.path(), "job");
    let node = Node::start();
    // A job that would run for 100 s; its grace period is 1 s (the default would be 30 s,
    // beyond this test's patience, so the pod only goes away in time if the grace period
    // from the spec is honoured).
    node.write_manifest(
        "long.yaml",
        &job_pod(
            "long",
            &job,
            "Never",
            &["--lines", "1000", "--sleep-ms", "100"],
        ),
    );
    node.wait_pod("long", "running", |p| {
        container_status(p)["state"]["running"].is_object()
    });
    node.remove_manifest("long.yaml");
    node.wait_gone("long");
    wait_for("the worker to report the stop", || {
        node.log().contains("pod stopped").then_some(())
    });
    assert!(
        node.log().contains("code=137"),
        "killed after the grace period:\n{}",
        node.log()
    );
}

#[test]
fn bad_manifests_are_refused_with_file_and_field_and_start_nothing() {
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    let node = Node::start();
    let good_port = free_port();
    node.write_manifest("good.yaml", &service_pod("good", &hello, good_port, &[]));
    node.write_manifest(
        "syntax.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: broken\n spec: [\n",
    );
    // Two pods in one file, the second with a wrong type: neither may start.
    let bad_type = format!(
        "{}---\n{}",
        service_pod("first-of-bad", &hello, free_port(), &[]),
        service_pod("typed", &hello, 1234, &[])
            .replace("containerPort: 8080", "containerPort: eighty")
    );
    node.write_manifest("types.yaml", &bad_type);
    let no_image = service_pod("noimage", &hello, free_port(), &[])
        .replace(&format!("    image: {hello}\n"), "");
    node.write_manifest("noimage.yaml", &no_image);

    node.wait_ready("good");
    let errors: serde_json::Value = wait_for("three manifest errors", || {
        let v: serde_json::Value = serde_json::from_str(&node.get("/debug/manifests").body).ok()?;
        (v["errors"].as_array()?.len() == 3).then_some(v)
    });
    let errors: Vec<String> = errors["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e.as_str().unwrap_or_default().to_string())
        .collect();
    let find = |file: &str| {
        errors
            .iter()
            .find(|e| e.contains(file))
            .cloned()
            .unwrap_or_else(|| panic!("no error for {file}: {errors:?}"))
    };
    assert!(find("syntax.yaml").contains("invalid YAML"));
    let types = find("types.yaml");
    assert!(
        types.contains("document 2") && types.contains("spec.containers[0].ports[0].containerPort"),
        "{types}"
    );
    assert!(find("noimage.yaml").contains("spec.containers[0].image"));
    for name in ["broken", "first-of-bad", "typed", "noimage"] {
        assert!(node.pod(name).is_none(), "{name} must not run");
    }
    // The node said so in its log, too.
    assert!(node.log().contains("types.yaml"), "{}", node.log());
    assert_eq!(
        http_get(addr(good_port), "/")
            .expect("good pod serves")
            .status,
        200
    );
}

#[test]
fn a_missing_image_backs_off_with_the_registry_message() {
    let registry = Registry::start();
    let node = Node::start();
    let missing = format!("{}:v1", registry.reference("demo/missing"));
    node.write_manifest(
        "missing.yaml",
        &service_pod("missing", &missing, free_port(), &[]),
    );
    let pod = node.wait_pod("missing", "ImagePullBackOff", |p| {
        container_status(p)["state"]["waiting"]["reason"] == "ImagePullBackOff"
    });
    let message = container_status(&pod)["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains(&missing), "{message}");
    assert!(
        message.contains("not found") && message.contains("manifest unknown"),
        "{message}"
    );
    assert_eq!(pod["status"]["phase"], "Pending");
    let table = stdout(&node.brink(&["get", "pods"]));
    assert!(table.contains("ImagePullBackOff"), "{table}");
    // It keeps retrying: the pod appears once the image is pushed.
    push("hello", &missing);
    node.wait_ready("missing");
}

#[test]
fn corrupt_and_non_wasm_artifacts_are_refused() {
    let layout = tempfile::tempdir().expect("tempdir");
    let image = layout_image(layout.path(), "hello");
    // Tamper with the wasm layer inside the layout: its digest no longer matches.
    let blobs = layout.path().join("blobs/sha256");
    let wasm_blob = std::fs::read_dir(&blobs)
        .expect("blobs")
        .flatten()
        .map(|e| e.path())
        .find(|p| std::fs::read(p).is_ok_and(|b| b.starts_with(b"\0asm")))
        .expect("the wasm layer");
    let mut bytes = std::fs::read(&wasm_blob).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&wasm_blob, bytes).expect("tamper");

    // A container image layout: one tar+gzip layer.
    let tar_layout = tempfile::tempdir().expect("tempdir");
    let write_blob = |bytes: &[u8]| -> String {
        let digest = format!("sha256:{}", sha256_hex(bytes));
        let dir = tar_layout.path().join("blobs/sha256");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(&digest[7..]), bytes).expect("blob");
        digest
    };
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let layer = b"\x1f\x8b not really a tarball";
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": write_blob(config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": write_blob(layer), "size": layer.len()}],
    })
    .to_string();
    let manifest_digest = write_blob(manifest.as_bytes());
    std::fs::write(
        tar_layout.path().join("index.json"),
        serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}).to_string(),
    )
    .expect("index");

    let node = Node::start();
    node.write_manifest(
        "corrupt.yaml",
        &service_pod("corrupt", &image, free_port(), &[]),
    );
    node.write_manifest(
        "tar.yaml",
        &service_pod(
            "tar",
            &format!("oci:{}:v1", tar_layout.path().display()),
            free_port(),
            &[],
        ),
    );
    let waiting = |p: &serde_json::Value| {
        container_status(p)["state"]["waiting"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    node.wait_pod("corrupt", "a digest error, backing off", |p| {
        waiting(p).contains("digest mismatch")
            && container_status(p)["state"]["waiting"]["reason"] == "ImagePullBackOff"
    });
    let tar = node.wait_pod("tar", "a media type error", |p| {
        waiting(p).contains("application/vnd.oci.image.layer.v1.tar+gzip")
    });
    assert!(waiting(&tar).contains("not wasm"), "{}", waiting(&tar));
    // Nothing was cached from either.
    assert_eq!(node.metric("brink_blob_downloads_total"), 0);
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn a_guest_that_traps_spins_or_overgrows_fails_alone() {
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    let faulty = layout_image(layout.path(), "faulty");
    let node = Node::start();
    let (hello_port, faulty_port) = (free_port(), free_port());
    node.write_manifest("hello.yaml", &service_pod("hello", &hello, hello_port, &[]));
    let limited = service_pod("faulty", &faulty, faulty_port, &[]).replace(
        "    ports:\n",
        "    resources:\n      limits:\n        memory: 32Mi\n    ports:\n",
    );
    node.write_manifest("faulty.yaml", &limited);
    node.wait_ready("hello");
    node.wait_ready("faulty");
    let hello_ok = || assert_eq!(http_get(addr(hello_port), "/").expect("hello").status, 200);

    assert_eq!(http_get(addr(faulty_port), "/").expect("ok").body, "ok\n");
    let trap = http_get(addr(faulty_port), "/trap").expect("trap");
    assert_eq!(trap.status, 500, "{}", trap.body);
    hello_ok();
    let spin = http_get(addr(faulty_port), "/spin").expect("spin");
    assert_eq!(spin.status, 504, "{}", spin.body);
    hello_ok();
    let grow = http_get(addr(faulty_port), "/grow?mb=100").expect("grow");
    assert_eq!(grow.status, 500, "{}", grow.body);
    // Growing within the limit works.
    assert_eq!(
        http_get(addr(faulty_port), "/grow?mb=4")
            .expect("grow a bit")
            .status,
        200
    );
    hello_ok();
    assert_eq!(
        http_get(addr(faulty_port), "/")
            .expect("still serving")
            .status,
        200
    );
    assert_eq!(node.metric("brink_http_deadline_exceeded_total"), 1);
    assert!(node.metric("brink_http_guest_errors_total") >= 2);
    let mut node = node;
    assert!(node.alive());
}

#[test]
fn a_restarted_node_runs_from_its_warm_cache_without_the_registry() {
    let mut registry = Registry::start();
    let reference = format!("{}:v1", registry.reference("demo/hello"));
    push("hello", &reference);
    let mut node = Node::start();
    let port = free_port();
    node.write_manifest("hello.yaml", &service_pod("hello", &reference, port, &[]));
    node.wait_ready("hello");
    assert_eq!(node.metric("brink_blob_downloads_total"), 1);
    assert_eq!(node.metric("brink_compilations_total"), 1);

    registry.stop();
    node.restart();
    node.wait_ready("hello");
    assert_eq!(http_get(addr(port), "/").expect("curl").status, 200);
    // The counters are per process: after the restart nothing was fetched or compiled.
    assert_eq!(node.metric("brink_blob_downloads_total"), 0);
    assert_eq!(node.metric("brink_compilations_total"), 0);
    assert_eq!(node.metric("brink_compile_cache_hits_total"), 1);
}

#[test]
fn two_pods_of_one_digest_download_and_compile_once() {
    let registry = Registry::start();
    let reference = format!("{}:v1", registry.reference("demo/echo"));
    push("echo", &reference);
    let node = Node::start();
    let (a, b) = (free_port(), free_port());
    node.write_manifest(
        "both.yaml",
        &format!(
            "{}---\n{}",
            service_pod("echo-a", &reference, a, &[]),
            service_pod("echo-b", &reference, b, &[])
        ),
    );
    node.wait_ready("echo-a");
    node.wait_ready("echo-b");
    assert_eq!(node.metric("brink_blob_downloads_total"), 1);
    assert_eq!(node.metric("brink_compilations_total"), 1);
    for (port, pod) in [(a, "echo-a"), (b, "echo-b")] {
        let echo: serde_json::Value =
            serde_json::from_str(&http_get(addr(port), "/some/path?x=1").expect("echo").body)
                .expect("echo JSON");
        assert_eq!(echo["pod"], pod);
        assert_eq!(echo["namespace"], "default");
        assert_eq!(echo["path"], "/some/path?x=1");
        assert_eq!(echo["method"], "GET");
    }
}

#[test]
fn a_corrupt_cached_blob_is_deleted_and_fetched_again() {
    let registry = Registry::start();
    let reference = format!("{}:v1", registry.reference("demo/hello"));
    push("hello", &reference);
    let cache = tempfile::tempdir().expect("tempdir");
    let data = cache.path().to_str().expect("utf-8");
    assert!(stdout(&brink(&["pull", &reference, "--data-dir", data])).contains("downloaded"));
    let blobs = cache.path().join("images/blobs/sha256");
    for entry in std::fs::read_dir(&blobs).expect("blobs").flatten() {
        std::fs::write(entry.path(), b"truncated").expect("corrupt");
    }
    let again = brink(&["pull", &reference, "--data-dir", data]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stdout(&again).contains("downloaded"), "{}", stdout(&again));
    let third = brink(&["pull", &reference, "--data-dir", data]);
    assert!(
        stdout(&third).contains("already cached"),
        "{}",
        stdout(&third)
    );
}

#[test]
fn a_host_port_held_by_another_pod_is_reported() {
    let layout = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(layout.path(), "hello");
    let node = Node::start();
    let port = free_port();
    node.write_manifest("a.yaml", &service_pod("first", &hello, port, &[]));
    node.wait_ready("first");
    node.write_manifest("b.yaml", &service_pod("second", &hello, port, &[]));
    let second = node.wait_pod("second", "RunContainerError", |p| {
        container_status(p)["state"]["waiting"]["reason"] == "RunContainerError"
    });
    let message = container_status(&second)["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("already used by default/first"),
        "{message}"
    );
    // When the first pod goes, the second takes the port.
    node.remove_manifest("a.yaml");
    node.wait_ready("second");
    assert_eq!(
        http_get(addr(port), "/").expect("curl").body,
        "Hello from Brink! (pod second)\n"
    );
}

#[test]
fn readiness_probe_gates_ready() {
    let layout = tempfile::tempdir().expect("tempdir");
    let faulty = layout_image(layout.path(), "faulty");
    let node = Node::start();
    let probed = |name: &str, path: &str| {
        service_pod(name, &faulty, free_port(), &[]).replace(
            "    ports:\n",
            &format!("    readinessProbe:\n      httpGet:\n        path: {path}\n        port: 8080\n      periodSeconds: 1\n      failureThreshold: 1\n    ports:\n"),
        )
    };
    node.write_manifest(
        "probes.yaml",
        &format!(
            "{}---\n{}",
            probed("healthy", "/"),
            probed("unhealthy", "/trap")
        ),
    );
    node.wait_ready("healthy");
    let unhealthy = node.wait_pod("unhealthy", "a failed probe", |p| {
        p["status"]["phase"] == "Running" && container_status(p)["state"]["running"].is_object()
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    let unhealthy = node.pod("unhealthy").unwrap_or(unhealthy);
    assert_eq!(container_status(&unhealthy)["ready"], false);
    let table = stdout(&node.brink(&["get", "pods"]));
    assert!(has_row(&table, "unhealthy", "0/1"), "{table}");
}

#[test]
fn brink_up_serves_the_embedded_hello_app() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let kubelet = format!("127.0.0.1:{}", free_port());
    let api = format!("127.0.0.1:{}", free_port());
    let mut child = std::process::Command::new(brink_bin())
        .args([
            "up",
            "--port",
            &port.to_string(),
            "--kubelet-addr",
            &kubelet,
            "--api-listen",
            &api,
            "--store-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--peer-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("brink up");
    let body = wait_for("brink up to serve hello", || {
        http_get(addr(port), "/")
            .ok()
            .filter(|r| r.status == 200)
            .map(|r| r.body)
    });
    // The hello app is a Deployment on a one-member site, and the printed kubeconfig
    // reaches it.
    assert!(body.starts_with("Hello from Brink! (pod hello-"), "{body}");
    let kubeconfig = dir.path().join("server/pki/admin.kubeconfig");
    let pods = std::process::Command::new("kubectl")
        .args(["get", "pods", "-o", "name"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .expect("kubectl");
    assert!(
        stdout(&pods).starts_with("pod/hello-"),
        "{}{}",
        stdout(&pods),
        stderr(&pods)
    );
    // Stopped and started again, it resumes the same site.
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    let mut again = std::process::Command::new(brink_bin())
        .args([
            "up",
            "--port",
            &port.to_string(),
            "--kubelet-addr",
            &kubelet,
            "--api-listen",
            &api,
        ])
        .args(["--store-listen", &format!("127.0.0.1:{}", free_port())])
        .args([
            "--peer-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("brink up");
    let served = wait_for("brink up to serve hello again", || {
        http_get(addr(port), "/").ok().filter(|r| r.status == 200)
    });
    // The same pod, taken up again: stopping the node did not tell the site it finished.
    assert_eq!(served.body, body);
    let after = std::process::Command::new("kubectl")
        .args(["get", "pods", "-o", "name"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .expect("kubectl");
    assert_eq!(stdout(&after), stdout(&pods));
    let _ = again.kill();
    let _ = again.wait();
}

#[test]
fn a_failing_liveness_probe_restarts_the_container() {
    let layout = tempfile::tempdir().expect("tempdir");
    let faulty = layout_image(layout.path(), "faulty");
    let node = Node::start();
    let manifest = service_pod("sick", &faulty, free_port(), &[]).replace(
        "    ports:\n",
        "    livenessProbe:\n      httpGet:\n        path: /trap\n        port: 8080\n      periodSeconds: 1\n      failureThreshold: 2\n    ports:\n",
    );
    node.write_manifest("sick.yaml", &manifest);
    let pod = node.wait_pod("sick", "a liveness restart", |p| {
        container_status(p)["restartCount"].as_i64() >= Some(1)
    });
    let last = &container_status(&pod)["lastState"]["terminated"];
    assert_eq!(last["message"], "Liveness probe failed");
    assert!(node.metric("brink_container_restarts_total") >= 1);
}

#[test]
fn manifest_changes_are_seen_without_waiting_for_the_poll() {
    let layout = tempfile::tempdir().expect("tempdir");
    let job = layout_image(layout.path(), "job");
    // With an hour between polls, only file events can make this pod start.
    let node = Node::start_with(&["--manifest-poll-interval", "1h"]);
    node.write_manifest("job.yaml", &job_pod("evented", &job, "Never", &[]));
    node.wait_phase("evented", "Succeeded");
    node.remove_manifest("job.yaml");
    node.wait_gone("evented");
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks: f64 =
        fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
    ticks / 100.0
}

#[test]
fn an_idle_node_does_not_spin() {
    // Regression: the manifest watcher once woke itself with its own reads and rescanned
    // forever, a full core on an idle node. Idle is ~0 s of CPU; spinning is ~3 s.
    let layout = tempfile::tempdir().expect("tempdir");
    let job = layout_image(layout.path(), "job");
    let node = Node::start_with(&["--manifest-poll-interval", "1h"]);
    node.write_manifest("job.yaml", &job_pod("once", &job, "Never", &[]));
    node.wait_phase("once", "Succeeded");
    let pid = node.pid().expect("pid");
    let before = cpu_seconds(pid);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let used = cpu_seconds(pid) - before;
    assert!(used < 0.5, "an idle node used {used:.2} s of CPU in 3 s");
}

#[test]
fn a_failed_pull_shows_err_image_pull_then_image_pull_back_off() {
    let registry = Registry::start();
    // A 4 s back-off shows ErrImagePull for 2 s: long enough to see in the status.
    let node = Node::start_with(&["--image-pull-backoff", "4s"]);
    let missing = format!("{}:v1", registry.reference("demo/absent"));
    node.write_manifest(
        "absent.yaml",
        &service_pod("absent", &missing, free_port(), &[]),
    );
    let reason = |p: &serde_json::Value| container_status(p)["state"]["waiting"]["reason"].clone();
    let err = node.wait_pod("absent", "ErrImagePull", |p| reason(p) == "ErrImagePull");
    let message = container_status(&err)["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("manifest unknown"), "{message}");
    node.wait_pod("absent", "ImagePullBackOff", |p| {
        reason(p) == "ImagePullBackOff"
    });
}

/// Rewrites the layout's `tag` manifest so its layer (and config) carry other media types,
/// as older tools published wasm; returns the new reference.
fn retype_layout(
    dir: &std::path::Path,
    tag: &str,
    new_tag: &str,
    layer_type: &str,
    config_type: &str,
) -> String {
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).expect("index")).expect("json");
    let entry = index["manifests"]
        .as_array()
        .and_then(|m| {
            m.iter()
                .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        })
        .cloned()
        .expect("tagged manifest");
    let digest = entry["digest"].as_str().expect("digest");
    let blob = |d: &str| dir.join("blobs/sha256").join(&d[7..]);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(digest)).expect("manifest")).expect("json");
    manifest["layers"][0]["mediaType"] = layer_type.into();
    manifest["config"]["mediaType"] = config_type.into();
    let bytes = serde_json::to_vec(&manifest).expect("json");
    let new_digest = format!("sha256:{}", sha256_hex(&bytes));
    std::fs::write(blob(&new_digest), &bytes).expect("write manifest");
    let mut new_entry = entry.clone();
    new_entry["digest"] = new_digest.into();
    new_entry["size"] = bytes.len().into();
    new_entry["annotations"]["org.opencontainers.image.ref.name"] = new_tag.into();
    index["manifests"]
        .as_array_mut()
        .expect("manifests")
        .push(new_entry);
    std::fs::write(&index_path, serde_json::to_vec(&index).expect("json")).expect("write index");
    format!("oci:{}:{new_tag}", dir.display())
}

#[test]
fn legacy_and_runwasi_layer_types_and_digest_references_run() {
    let layout = tempfile::tempdir().expect("tempdir");
    layout_image(layout.path(), "hello");
    let legacy = retype_layout(
        layout.path(),
        "hello",
        "legacy",
        "application/vnd.wasm.content.layer.v1+wasm",
        "application/vnd.wasm.config.v1+json",
    );
    let runwasi = retype_layout(
        layout.path(),
        "hello",
        "runwasi",
        "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
        "application/vnd.oci.image.config.v1+json",
    );
    let registry = Registry::start();
    let repo = registry.reference("demo/hello");
    let digest = push("hello", &format!("{repo}:v1"));
    let by_digest = format!("{repo}@{digest}");

    let node = Node::start();
    let ports = [free_port(), free_port(), free_port()];
    node.write_manifest(
        "kinds.yaml",
        &[
            service_pod("legacy", &legacy, ports[0], &[]),
            service_pod("runwasi", &runwasi, ports[1], &[]),
            service_pod("pinned", &by_digest, ports[2], &[]),
        ]
        .join("---\n"),
    );
    for (name, port) in ["legacy", "runwasi", "pinned"].into_iter().zip(ports) {
        node.wait_ready(name);
        let body = http_get(addr(port), "/").expect("curl").body;
        assert_eq!(body, format!("Hello from Brink! (pod {name})\n"));
    }
    let pinned = node.pod("pinned").expect("pinned");
    assert_eq!(container_status(&pinned)["imageID"], by_digest);
}

#[test]
fn outbound_http_is_denied_unless_the_pod_allows_the_host() {
    let registry = Registry::start();
    let layout = tempfile::tempdir().expect("tempdir");
    let fetch = layout_image(layout.path(), "fetch");
    let node = Node::start();
    let with_annotation = |name: &str, port: u16, allowed: Option<&str>| {
        let pod = service_pod(name, &fetch, port, &[]);
        match allowed {
            None => pod,
            Some(list) => pod.replacen(
                &format!("  name: {name}\n"),
                &format!("  name: {name}\n  annotations:\n    brink.dev/allowed-outbound-hosts: \"{list}\"\n"),
                1,
            ),
        }
    };
    let ports = [free_port(), free_port(), free_port()];
    let upstream = registry.addr.to_string();
    node.write_manifest(
        "fetch.yaml",
        &[
            with_annotation("closed", ports[0], None),
            with_annotation("elsewhere", ports[1], Some("example.com, 127.0.0.1:1")),
            with_annotation("open", ports[2], Some(&upstream)),
        ]
        .join("---\n"),
    );
    let url = format!("/?url=http://{upstream}/v2/");
    for (name, port) in ["closed", "elsewhere", "open"].into_iter().zip(ports) {
        node.wait_ready(name);
        let response = http_get(addr(port), &url).expect("curl");
        if name == "open" {
            assert_eq!(response.status, 200, "{}", response.body);
            assert!(
                response.body.starts_with("upstream 200"),
                "{}",
                response.body
            );
        } else {
            assert_eq!(response.status, 502, "{name}: {}", response.body);
            assert!(
                response.body.contains("HttpRequestDenied"),
                "{name}: {}",
                response.body
            );
        }
    }
    // A malformed allow-list is a manifest error naming the annotation.
    node.write_manifest(
        "bad.yaml",
        &with_annotation("bad", free_port(), Some("http://x/y")),
    );
    wait_for("the bad annotation to be reported", || {
        let v: serde_json::Value = serde_json::from_str(&node.get("/debug/manifests").body).ok()?;
        let errors = v["errors"].as_array()?.clone();
        errors
            .iter()
            .any(|e| {
                e.as_str().is_some_and(|e| {
                    e.contains("metadata.annotations[brink.dev/allowed-outbound-hosts]")
                })
            })
            .then_some(())
    });
    assert!(node.pod("bad").is_none());
}

#[test]
fn an_artifact_that_does_not_compile_is_a_create_container_error() {
    // A layout whose one wasm layer has a component preamble and garbage after it: the
    // pull succeeds (the digest matches), compiling fails, and the container says so.
    let layout = tempfile::tempdir().expect("tempdir");
    let write_blob = |bytes: &[u8]| -> String {
        let digest = format!("sha256:{}", sha256_hex(bytes));
        let dir = layout.path().join("blobs/sha256");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(&digest[7..]), bytes).expect("blob");
        digest
    };
    let config = br#"{"architecture":"wasm","os":"wasip2"}"#;
    let layer = b"\0asm\x0d\0\x01\0 this is not a component";
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.wasm.config.v0+json", "digest": write_blob(config), "size": config.len()},
        "layers": [{"mediaType": "application/wasm", "digest": write_blob(layer), "size": layer.len()}],
    })
    .to_string();
    let digest = write_blob(manifest.as_bytes());
    std::fs::write(
        layout.path().join("index.json"),
        serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "broken"}}]}).to_string(),
    )
    .expect("index");
    let node = Node::start();
    let image = format!("oci:{}:broken", layout.path().display());
    node.write_manifest(
        "broken.yaml",
        &service_pod("broken", &image, free_port(), &[]),
    );
    let pod = node.wait_pod("broken", "CreateContainerError", |p| {
        container_status(p)["state"]["waiting"]["reason"] == "CreateContainerError"
    });
    let message = container_status(&pod)["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains("compiling"), "{message}");
    assert_eq!(pod["status"]["phase"], "Pending");
    let mut node = node;
    assert!(node.alive());
}
