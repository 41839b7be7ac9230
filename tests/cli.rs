//! The CLI's bad-input paths: every one ends in a clear message and a non-zero exit, and
//! changes nothing.

mod common;

use common::*;

fn fails_with(args: &[&str], needle: &str) {
    let out = brink(args);
    assert!(
        !out.status.success(),
        "brink {args:?} should fail; stdout: {}",
        stdout(&out)
    );
    let err = stderr(&out);
    assert!(
        err.contains(needle),
        "brink {args:?}: expected {needle:?} in:\n{err}"
    );
    assert!(!err.contains("panicked"), "brink {args:?} panicked:\n{err}");
}

#[test]
fn push_refuses_missing_files_garbage_and_bad_references() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"#!/bin/sh\necho not wasm\n").expect("write");
    let garbage = garbage.to_str().expect("utf-8");
    let layout = dir.path().join("layout");
    let layout_ref = format!("oci:{}:v1", layout.display());

    fails_with(
        &["push", "/nonexistent/app.wasm", &layout_ref],
        "/nonexistent/app.wasm",
    );
    fails_with(&["push", garbage, &layout_ref], "not a wasm binary");
    assert!(
        !layout.exists(),
        "a refused push must not create the layout"
    );
    let hello = example("hello");
    let hello = hello.to_str().expect("utf-8");
    fails_with(
        &["push", hello, "Not A Reference"],
        "invalid image reference",
    );
    fails_with(
        &[
            "push",
            hello,
            &format!("oci:{}@sha256:{}", layout.display(), "a".repeat(64)),
        ],
        "takes a tag",
    );
}

#[test]
fn push_of_garbage_to_a_registry_leaves_it_empty() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm\x01\0\0\0\xff\xff\xff").expect("write");
    let reference = format!("{}:v1", registry.reference("demo/garbage"));
    fails_with(
        &["push", garbage.to_str().expect("utf-8"), &reference],
        "invalid wasm module",
    );
    let tags = http_get(registry.addr, "/v2/demo/garbage/tags/list").expect("registry");
    assert_eq!(tags.status, 404, "nothing was published: {}", tags.body);
}

#[test]
fn pull_reports_what_is_wrong() {
    let registry = Registry::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().to_str().expect("utf-8");
    fails_with(
        &[
            "pull",
            &format!("{}:v1", registry.reference("demo/nothing")),
            "--data-dir",
            data,
        ],
        "manifest unknown",
    );
    fails_with(
        &["pull", "oci:/nonexistent/layout:v1", "--data-dir", data],
        "index.json",
    );
    // Loopback only, even if the reference were (wrongly) accepted.
    fails_with(
        &[
            "pull",
            &format!("{}/UPPER/case", registry.addr),
            "--data-dir",
            data,
        ],
        "invalid image reference",
    );
}

#[test]
fn clients_explain_an_unreachable_node() {
    let port = free_port();
    fails_with(
        &["get", "pods", "--node", &format!("127.0.0.1:{port}")],
        "cannot reach the node",
    );
    fails_with(
        &["logs", "x", "--node", &format!("127.0.0.1:{port}")],
        "cannot reach the node",
    );
}

#[test]
fn node_refuses_bad_flags_before_doing_anything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");
    let manifests = dir.path().to_str().expect("utf-8");
    fails_with(
        &["node", "--manifests", "/nonexistent", "--data-dir", data],
        "not a directory",
    );
    let pin = format!("sha256:{}", "a".repeat(64));
    let cases: [(&[&str], &str); 14] = [
        (
            &[
                "--server",
                "https://127.0.0.1:1",
                "--token",
                "nope",
                "--discovery-token-ca-cert-hash",
                &pin,
            ],
            "--token",
        ),
        (
            &[
                "--server",
                "https://127.0.0.1:1",
                "--token",
                "abcdef.0123456789abcdef",
                "--discovery-token-ca-cert-hash",
                "md5:00",
            ],
            "must be sha256:",
        ),
        (&["--node-lease-renew", "0s"], "must be positive"),
        (&["--node-name", "Bad_Name"], "not a valid node name"),
        (&["--epoch-tick", "0s"], "--epoch-tick"),
        (&["--request-deadline", "soon"], "request-deadline"),
        (&["--max-instances", "0"], "--max-instances"),
        (
            &["--gateway-max-header-bytes", "10"],
            "--gateway-max-header-bytes",
        ),
        (
            &["--gateway-controller-name", "nope"],
            "--gateway-controller-name",
        ),
        (&["--gateway-address", "not-an-ip"], "gateway-address"),
        (
            &["--register-with-taints", "x=y"],
            "expected key[=value]:Effect",
        ),
        (&["--gateway-status-recheck", "0s"], "must be positive"),
        (&["--in-cluster"], "not inside a pod with a ServiceAccount"),
        (
            &["--in-cluster", "--kubeconfig", "/nonexistent"],
            "cannot be used with",
        ),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["node", "--manifests", manifests, "--data-dir", data];
        args.extend_from_slice(flags);
        fails_with(&args, needle);
    }
    assert!(
        !dir.path().join("data").exists(),
        "refused flags must not create state"
    );
}

#[test]
fn unbuilt_commands_say_so() {
    fails_with(&["chaos"], "not implemented yet");
}

#[test]
fn server_refuses_bad_flags_before_writing_anything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("member");
    let data = data.to_str().expect("utf-8");
    fails_with(&["server", "--join", "127.0.0.1:1"], "--token");
    fails_with(
        &[
            "server",
            "--join",
            "127.0.0.1:1",
            "--token",
            "not-a-token",
            "--data-dir",
            data,
        ],
        "--token",
    );
    fails_with(&["server", "--data-dir", data], "--init");
    for (flag, value) in [
        ("--wal-bytes", "10"),
        ("--snapshot-entries", "0"),
        ("--raft-tick", "0s"),
        ("--compact-interval", "soon"),
        ("--scheduler-retry", "0s"),
        ("--scheduler-parallel-bindings", "0"),
        ("--controller-resync", "0s"),
        ("--node-grace-period", "0s"),
        ("--default-toleration-seconds", "soon"),
    ] {
        fails_with(&["server", "--init", "--data-dir", data, flag, value], flag);
    }
    assert!(
        !std::path::Path::new(data).exists(),
        "a refused start left a data directory behind"
    );
}

#[test]
fn push_and_pull_use_docker_config_credentials() {
    let registry = Registry::start_with_basic_auth("edge", "s3cret");
    let dir = tempfile::tempdir().expect("tempdir");
    let reference = format!("{}:v1", registry.reference("demo/private"));
    let hello = example("hello");
    let hello = hello.to_str().expect("utf-8");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");

    // Anonymous: refused by the registry, and said so.
    let anonymous = brink(&["push", hello, &reference]);
    assert!(!anonymous.status.success());
    assert!(
        stderr(&anonymous).to_lowercase().contains("unauthorized"),
        "{}",
        stderr(&anonymous)
    );
    // Wrong password: refused too.
    let wrong = docker_config(&dir.path().join("wrong"), registry.addr, "edge", "guess");
    let out = brink_with_env(
        &["pull", &reference, "--data-dir", data],
        &[("DOCKER_CONFIG", &wrong)],
    );
    assert!(!out.status.success());

    let config = docker_config(dir.path(), registry.addr, "edge", "s3cret");
    let pushed = brink_with_env(&["push", hello, &reference], &[("DOCKER_CONFIG", &config)]);
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    let digest = stdout(&pushed).trim().to_string();
    let pulled = brink_with_env(
        &["pull", &reference, "--data-dir", data],
        &[("DOCKER_CONFIG", &config)],
    );
    assert!(pulled.status.success(), "{}", stderr(&pulled));
    assert!(stdout(&pulled).contains(&digest), "{}", stdout(&pulled));
}
