//! Pod volumes on a real node: ConfigMaps, Secrets, emptyDir and hostPath reach the `job`
//! guest as preopened directories inside its sandbox, read-only where they must be, owned
//! by the pod's ID range, kept up to date, and cleaned up with the pod.

mod common;

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use common::*;
use serde_json::Value;

const CONFIG: &str = "apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  greeting: hello from a configmap
---
apiVersion: v1
kind: Secret
metadata:
  name: token
stringData:
  token: s3cret
";

/// A `job` pod (restartPolicy Never) with the given volumes and mounts.
fn volume_pod(name: &str, image: &str, args: &[&str], volumes: &str, mounts: &str) -> String {
    job_pod(name, image, "Never", args).replace(
        "  containers:\n",
        &format!("  volumes:\n{volumes}  containers:\n"),
    ) + &format!("    volumeMounts:\n{mounts}")
}

fn uid_of(pod: &Value) -> String {
    pod["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn logs(node: &Node, pod: &str) -> String {
    stdout(&node.brink(&["logs", pod]))
}

#[test]
fn configmaps_secrets_empty_dirs_and_host_paths_reach_the_sandboxed_guest() {
    let layout = tempfile::tempdir().expect("tempdir");
    let job = layout_image(layout.path(), "job");
    let host = tempfile::tempdir().expect("tempdir");
    let shared = host.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::write(shared.join("hostfile"), "from the host").expect("write");
    let allow = host.path().display().to_string();
    let node = Node::start_with(&["--allow-host-path", &allow]);
    let volumes = format!(
        "  - name: settings\n    configMap:\n      name: settings\n  - name: token\n    secret:\n      secretName: token\n      items:\n      - key: token\n        path: deep/token\n        mode: 0400\n  - name: data\n    emptyDir: {{}}\n  - name: shared\n    hostPath:\n      path: {}\n      type: Directory\n",
        shared.display()
    );
    let mounts = "    - name: settings\n      mountPath: /config\n    - name: token\n      mountPath: /secret\n    - name: data\n      mountPath: /data\n    - name: shared\n      mountPath: /shared\n      readOnly: true\n";
    let reader = volume_pod(
        "reader",
        &job,
        &[
            "--cat",
            "/config/greeting",
            "--cat",
            "/secret/deep/token",
            "--cat",
            "/shared/hostfile",
            "--write",
            "/data/out",
            "written by the guest",
            "--cat",
            "/data/out",
            "--lines",
            "0",
        ],
        &volumes,
        mounts,
    );
    let config_writer = volume_pod(
        "config-writer",
        &job,
        &["--write", "/config/greeting", "overwritten"],
        &volumes,
        mounts,
    );
    let host_writer = volume_pod(
        "host-writer",
        &job,
        &["--write", "/shared/dropped", "x"],
        &volumes,
        mounts,
    );
    let escaper = volume_pod(
        "escaper",
        &job,
        &["--cat", "/config/../../../../etc/hostname"],
        &volumes,
        mounts,
    );
    node.write_manifest(
        "pods.yaml",
        &[CONFIG, &reader, &config_writer, &host_writer, &escaper].join("---\n"),
    );

    let pod = node.wait_phase("reader", "Succeeded");
    let out = logs(&node, "reader");
    assert!(
        out.contains("cat /config/greeting: hello from a configmap"),
        "{out}"
    );
    assert!(out.contains("cat /secret/deep/token: s3cret"), "{out}");
    assert!(out.contains("cat /shared/hostfile: from the host"), "{out}");
    assert!(out.contains("cat /data/out: written by the guest"), "{out}");

    // On the host the emptyDir file belongs to the pod's ID range, not to root.
    let volumes_dir = node
        .data_dir
        .join("pods")
        .join(uid_of(&pod))
        .join("volumes");
    let written = volumes_dir.join("data/out");
    assert_eq!(
        std::fs::read_to_string(&written).expect("the emptyDir file"),
        "written by the guest"
    );
    let meta = std::fs::metadata(&written).expect("metadata");
    assert!(
        meta.uid() >= 1_000_000,
        "owned by the pod's range: {}",
        meta.uid()
    );
    let token = std::fs::metadata(volumes_dir.join("token/deep/token")).expect("secret file");
    assert_eq!(token.mode() & 0o777, 0o400, "the item's mode");

    // Read-only volumes stay read-only, and `..` does not lead out of a volume.
    for name in ["config-writer", "host-writer", "escaper"] {
        let pod = node.wait_phase(name, "Failed");
        assert_eq!(
            container_status(&pod)["state"]["terminated"]["exitCode"],
            4,
            "{name}: {pod}"
        );
    }
    assert!(!shared.join("dropped").exists());
    let config = std::fs::read_to_string(volumes_dir.join("settings/greeting")).expect("config");
    assert_eq!(config, "hello from a configmap");
}

#[test]
fn an_empty_dir_outlives_restarts_and_goes_with_its_pod() {
    let layout = tempfile::tempdir().expect("tempdir");
    let job = layout_image(layout.path(), "job");
    let node = Node::start();
    let counter = job_pod(
        "counter",
        &job,
        "OnFailure",
        &["--count", "/data/n", "--until", "3", "--lines", "0"],
    )
    .replace(
        "  containers:\n",
        "  volumes:\n  - name: data\n    emptyDir: {}\n  containers:\n",
    ) + "    volumeMounts:\n    - name: data\n      mountPath: /data\n";
    node.write_manifest("counter.yaml", &counter);
    let pod = node.wait_phase("counter", "Succeeded");
    assert_eq!(container_status(&pod)["restartCount"], 2, "{pod}");
    assert!(logs(&node, "counter").contains("count 3"));
    let pod_dir = node.data_dir.join("pods").join(uid_of(&pod));
    assert_eq!(
        std::fs::read_to_string(pod_dir.join("volumes/data/n")).expect("count"),
        "3"
    );
    node.remove_manifest("counter.yaml");
    node.wait_gone("counter");
    wait_for("the pod's volumes to be removed", || {
        (!pod_dir.exists()).then_some(())
    });
}

#[test]
fn a_missing_configmap_holds_the_pod_until_it_appears_and_edits_reach_running_guests() {
    // In-process isolation here, so that path is covered too.
    let layout = tempfile::tempdir().expect("tempdir");
    let job = layout_image(layout.path(), "job");
    let node = Node::start_with(&["--isolation", "in-process"]);
    let watcher = volume_pod(
        "watcher",
        &job,
        &[
            "--cat",
            "/config/greeting",
            "--wait-for",
            "/config/greeting",
            "edited",
            "--lines",
            "0",
        ],
        "  - name: settings\n    configMap:\n      name: settings\n",
        "    - name: settings\n      mountPath: /config\n",
    );
    node.write_manifest("watcher.yaml", &watcher);
    // A new pod shows ContainerCreating with no message at first; the wait is for the
    // reason the volume gives.
    let waiting = node.wait_pod("watcher", "ContainerCreating", |p| {
        let waiting = &container_status(p)["state"]["waiting"];
        waiting["reason"] == "ContainerCreating" && waiting["message"].is_string()
    });
    assert_eq!(waiting["status"]["phase"], "Pending");
    let message = container_status(&waiting)["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        message.contains("configmap default/settings not found"),
        "{message}"
    );

    node.write_manifest("config.yaml", CONFIG);
    node.wait_pod("watcher", "running", |p| {
        container_status(p)["state"]["running"].is_object()
    });
    wait_for("the first content in the log", || {
        logs(&node, "watcher")
            .contains("cat /config/greeting: hello from a configmap")
            .then_some(())
    });
    node.write_manifest(
        "config.yaml",
        &CONFIG.replace("hello from a configmap", "edited"),
    );
    node.wait_phase("watcher", "Succeeded");
    assert!(logs(&node, "watcher").contains("saw /config/greeting: edited"));
}

#[test]
fn host_paths_are_refused_unless_the_node_allows_them() {
    let layout = tempfile::tempdir().expect("tempdir");
    let job = layout_image(layout.path(), "job");
    let host = tempfile::tempdir().expect("tempdir");
    let wanted = host.path().join("never-created");
    let node = Node::start();
    let pod = volume_pod(
        "hostpath",
        &job,
        &["--cat", "/host/x"],
        &format!(
            "  - name: host\n    hostPath:\n      path: {}\n      type: DirectoryOrCreate\n",
            wanted.display()
        ),
        "    - name: host\n      mountPath: /host\n",
    );
    node.write_manifest("hostpath.yaml", &pod);
    let pod = node.wait_phase("hostpath", "Failed");
    assert_eq!(pod["status"]["reason"], "HostPathNotAllowed", "{pod}");
    assert!(
        pod["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("--allow-host-path"),
        "{pod}"
    );
    assert!(
        !Path::new(&wanted).exists(),
        "a refused path is not created"
    );
}
