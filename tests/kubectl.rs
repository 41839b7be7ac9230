//! The Kubernetes API of `brink server` driven by real, unchanged `kubectl` builds (two
//! minor versions where the machine has them side by side, else the one installed): the
//! session an operator would type, with the answers checked as they read them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

struct Site {
    dir: PathBuf,
    store: std::net::SocketAddr,
    api: String,
    child: Child,
    _tmp: tempfile::TempDir,
}

impl Site {
    fn init(extra: &[&str]) -> Site {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("member");
        let store: std::net::SocketAddr =
            format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let api = format!("127.0.0.1:{}", free_port());
        let child = Command::new(brink_bin())
            .arg("server")
            .arg("--init")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen", &store.to_string(), "--raft-tick", "20ms"])
            .args(["--peer-listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--api-listen", &api])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("brink server");
        let site = Site {
            dir,
            store,
            api,
            child,
            _tmp: tmp,
        };
        wait_for("the member to be ready", || {
            http_json(site.store, "GET", "/readyz", None)
                .ok()
                .filter(|(status, _)| *status == 200)
        });
        // The API is ready once its bootstrap objects are in the cache.
        let bin = kubectl_builds().remove(0);
        let config = site.kubeconfig();
        wait_for("the API to be ready", || {
            Command::new(&bin)
                .args(["get", "--raw", "/readyz"])
                .env("KUBECONFIG", &config)
                .output()
                .ok()
                .filter(|o| o.status.success())
        });
        site
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("pki/admin.kubeconfig")
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kubectl builds to drive: `kubectl.1.32` and `kubectl.1.30` beside the dispatcher
/// when present (the dispatcher would pick one by the server's version), else `kubectl`.
fn kubectl_builds() -> Vec<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("kubectl"))
                .find(|k| k.exists())
        })
        .unwrap_or_default()
        .expect("kubectl is not installed: scripts/test installs Debian's kubernetes-client");
    let real = std::fs::canonicalize(&on_path).unwrap_or(on_path.clone());
    let dir = real.parent().map(Path::to_path_buf).unwrap_or_default();
    let builds: Vec<PathBuf> = ["kubectl.1.32", "kubectl.1.30"]
        .iter()
        .map(|b| dir.join(b))
        .filter(|b| b.exists())
        .collect();
    if builds.is_empty() {
        vec![real]
    } else {
        builds
    }
}

struct Kubectl<'a> {
    bin: &'a Path,
    config: PathBuf,
}

impl Kubectl<'_> {
    fn run(&self, args: &[&str]) -> Output {
        self.run_with_stdin(args, None)
    }

    fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        self.run_with_env(args, stdin, &[])
    }

    /// `kubectl edit` with `script` as the editor (it gets the file to change).
    fn edit(&self, args: &[&str], script: &str) -> Output {
        let path = self
            .config
            .with_file_name(format!("editor-{}.sh", fastrand::u64(..)));
        std::fs::write(&path, format!("#!/bin/sh\nset -e\n{script}\n")).expect("editor");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let editor = path.to_str().expect("utf-8");
        let mut all = vec!["edit"];
        all.extend_from_slice(args);
        self.run_with_env(&all, None, &[("KUBE_EDITOR", editor)])
    }

    fn run_with_env(&self, args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
        let mut command = Command::new(self.bin);
        command
            .args(args)
            .envs(env.iter().copied())
            .env("KUBECONFIG", &self.config)
            .env("HOME", self.config.parent().unwrap_or(Path::new("/tmp")))
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("kubectl");
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write as _;
            pipe.write_all(text.as_bytes()).expect("stdin");
        }
        child.wait_with_output().expect("kubectl output")
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{} {args:?} failed:\n{}\n{}",
            self.bin.display(),
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    /// Runs and expects failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "{args:?} succeeded:\n{}",
            stdout(&out)
        );
        stderr(&out)
    }
}

fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default()
}

fn header(table: &str) -> Vec<&str> {
    table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect()
}

const POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web}
spec:
  containers:
  - name: web
    image: registry.example/hello:1
  - name: side
    image: registry.example/echo:1
";

fn session(k: &Kubectl<'_>, ns: &str) {
    // Discovery and the system namespaces.
    let versions = k.ok(&["api-versions"]);
    for gv in [
        "v1",
        "apps/v1",
        "gateway.networking.k8s.io/v1",
        "rbac.authorization.k8s.io/v1",
    ] {
        assert!(
            versions.lines().any(|l| l == gv),
            "{gv} missing:\n{versions}"
        );
    }
    let resources = k.ok(&["api-resources"]);
    for r in [
        "pods",
        "deployments",
        "httproutes",
        "leases",
        "certificatesigningrequests",
    ] {
        assert!(!row(&resources, r).is_empty(), "{r} missing:\n{resources}");
    }
    let namespaces = k.ok(&["get", "namespaces"]);
    assert_eq!(header(&namespaces), ["NAME", "STATUS", "AGE"]);
    for system in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert_eq!(
            row(&namespaces, system).get(1),
            Some(&"Active"),
            "{namespaces}"
        );
    }

    // Create, read back, list with kubectl's own columns.
    assert!(
        k.ok(&["create", "namespace", ns])
            .contains(&format!("namespace/{ns} created"))
    );
    k.ok(&["-n", ns, "create", "configmap", "cfg", "--from-literal=a=1"]);
    let yaml = k.ok(&["-n", ns, "get", "configmap", "cfg", "-o", "yaml"]);
    assert!(yaml.contains("a: \"1\""), "{yaml}");
    assert!(yaml.contains("resourceVersion: \""), "{yaml}");
    assert!(yaml.contains("uid: "), "{yaml}");
    let cms = k.ok(&["-n", ns, "get", "cm"]);
    assert_eq!(header(&cms), ["NAME", "DATA", "AGE"]);
    assert_eq!(row(&cms, "cfg").get(1), Some(&"1"), "{cms}");
    let again = k.fails(&["-n", ns, "create", "configmap", "cfg"]);
    assert!(
        again.contains("configmaps \"cfg\" already exists"),
        "{again}"
    );

    k.ok(&[
        "-n",
        ns,
        "create",
        "configmap",
        "edit-me",
        "--from-literal=a=1",
    ]);
    // `kubectl edit`: a change is saved; one the server refuses (an invalid label key)
    // is reported and saves nothing; closing the editor without a change changes nothing.
    let edited = k.edit(
        &["-n", ns, "configmap", "edit-me"],
        r#"sed -i 's/^  a: "1"$/  a: "2"/' "$1""#,
    );
    assert!(edited.status.success(), "{}", stderr(&edited));
    assert!(
        stdout(&edited).contains("configmap/edit-me edited"),
        "{}",
        stdout(&edited)
    );
    assert_eq!(
        k.ok(&["-n", ns, "get", "cm", "edit-me", "-o", "jsonpath={.data.a}"]),
        "2"
    );
    let before = k.ok(&[
        "-n",
        ns,
        "get",
        "cm",
        "edit-me",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ]);
    let refused = k.edit(
        &["-n", ns, "configmap", "edit-me"],
        r#"sed -i 's/^  a: "2"$/  a: "3"/; s/^metadata:$/metadata:\n  labels:\n    ..\/a: b/' "$1""#,
    );
    assert!(!refused.status.success(), "{}", stdout(&refused));
    // kubectl shows the causes in the file it reopens; on stderr, as against
    // kube-apiserver, only that the object is invalid and nothing was saved.
    let said = stderr(&refused);
    assert!(said.contains("configmaps \"edit-me\" is invalid"), "{said}");
    assert!(said.contains("no valid changes were saved"), "{said}");
    let unchanged = k.edit(&["-n", ns, "configmap", "edit-me"], "true");
    assert!(unchanged.status.success(), "{}", stderr(&unchanged));
    assert!(
        format!("{}{}", stdout(&unchanged), stderr(&unchanged)).contains("no changes made"),
        "{}",
        stderr(&unchanged)
    );
    assert_eq!(
        k.ok(&[
            "-n",
            ns,
            "get",
            "cm",
            "edit-me",
            "-o",
            "jsonpath={.metadata.resourceVersion}"
        ]),
        before,
        "a refused or empty edit wrote something"
    );
    assert_eq!(
        k.ok(&["-n", ns, "get", "cm", "edit-me", "-o", "jsonpath={.data.a}"]),
        "2"
    );

    k.ok(&["-n", ns, "delete", "configmap", "edit-me"]);

    // A pod from a file: stored Pending (no node has joined), shown with pod columns.
    let pod_file = k.config.with_file_name(format!("{ns}-pod.yaml"));
    std::fs::write(&pod_file, POD).expect("write pod");
    // Client-side apply, validated by the server (kubectl learns that from /openapi/v3).
    let applied = k.ok(&["-n", ns, "apply", "-f", pod_file.to_str().unwrap()]);
    assert!(applied.contains("pod/web created"), "{applied}");
    let pods = k.ok(&["-n", ns, "get", "pods", "-o", "wide"]);
    assert_eq!(
        &header(&pods)[..5],
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    );
    assert!(header(&pods).contains(&"NODE"), "{pods}");
    assert_eq!(&row(&pods, "web")[1..3], ["0/2", "Pending"], "{pods}");
    let policy = k.ok(&[
        "-n",
        ns,
        "get",
        "pod",
        "web",
        "-o",
        "jsonpath={.spec.restartPolicy}",
    ]);
    assert_eq!(policy, "Always", "defaults are filled in");
    // An edited file applied again: one container's image changes; the other container,
    // a label set by hand since and the server's defaults stay.
    k.ok(&["-n", ns, "label", "pod", "web", "handmade=yes"]);
    std::fs::write(&pod_file, POD.replace("hello:1", "hello:2")).expect("write pod");
    let reapplied = k.ok(&["-n", ns, "apply", "-f", pod_file.to_str().unwrap()]);
    assert!(reapplied.contains("pod/web configured"), "{reapplied}");
    let after = k.ok(&[
        "-n",
        ns,
        "get",
        "pod",
        "web",
        "-o",
        "jsonpath={.spec.containers[*].image} {.metadata.labels.handmade} {.spec.restartPolicy}",
    ]);
    assert_eq!(
        after,
        "registry.example/hello:2 registry.example/echo:1 yes Always"
    );
    let unchanged = k.ok(&["-n", ns, "apply", "-f", pod_file.to_str().unwrap()]);
    assert!(unchanged.contains("pod/web unchanged"), "{unchanged}");
    let strict = k.run_with_stdin(
        &["-n", ns, "apply", "-f", "-"],
        Some("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: typo\ndatta:\n  a: b\n"),
    );
    assert!(!strict.status.success());
    assert!(
        stderr(&strict).contains("unknown field \"datta\""),
        "{}",
        stderr(&strict)
    );
    let explain = k.ok(&["explain", "pods.spec.containers.image"]);
    assert!(explain.contains("Container image name"), "{explain}");
    let logs = k.fails(&["-n", ns, "logs", "web", "-c", "web"]);
    // No node has joined this site: nothing runs the pod yet.
    assert!(
        logs.contains("pod web does not have a host assigned"),
        "{logs}"
    );

    // Labels, annotations and all three patch types.
    k.ok(&["-n", ns, "label", "configmap", "cfg", "tier=front"]);
    k.ok(&["-n", ns, "annotate", "configmap", "cfg", "note=hi"]);
    assert_eq!(
        k.ok(&["-n", ns, "get", "cm", "-l", "tier=front", "-o", "name"])
            .trim(),
        "configmap/cfg"
    );
    assert_eq!(
        k.ok(&["-n", ns, "get", "cm", "-l", "tier!=front", "-o", "name"])
            .trim(),
        ""
    );
    k.ok(&[
        "-n",
        ns,
        "patch",
        "configmap",
        "cfg",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"b":"2"}}"#,
    ]);
    k.ok(&[
        "-n",
        ns,
        "patch",
        "configmap",
        "cfg",
        "--type",
        "json",
        "-p",
        r#"[{"op":"add","path":"/data/c","value":"3"}]"#,
    ]);
    k.ok(&[
        "-n",
        ns,
        "patch",
        "configmap",
        "cfg",
        "-p",
        r#"{"data":{"d":"4"}}"#,
    ]);
    let data = k.ok(&["-n", ns, "get", "cm", "cfg", "-o", "jsonpath={.data.a}{.data.b}{.data.c}{.data.d}{.metadata.labels.tier}{.metadata.annotations.note}"]);
    assert_eq!(data, "1234fronthi");
    // Strategic merge on a list keyed by name: one container's image changes, the
    // other container stays.
    k.ok(&[
        "-n",
        ns,
        "patch",
        "pod",
        "web",
        "-p",
        r#"{"spec":{"containers":[{"name":"web","image":"registry.example/hello:2"}]}}"#,
    ]);
    let images = k.ok(&[
        "-n",
        ns,
        "get",
        "pod",
        "web",
        "-o",
        "jsonpath={.spec.containers[*].image}",
    ]);
    assert_eq!(images, "registry.example/hello:2 registry.example/echo:1");
    let bad_patch = k.fails(&[
        "-n",
        ns,
        "patch",
        "configmap",
        "cfg",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/data/nope"}]"#,
    ]);
    assert!(
        bad_patch.contains("Invalid") || bad_patch.contains("invalid"),
        "{bad_patch}"
    );
    let bad_label = k.fails(&["-n", ns, "label", "configmap", "cfg", "../x=y"]);
    assert!(!bad_label.is_empty());

    server_side_apply(k, ns);

    // Gateway API references get the CRD's defaults, as a cluster with the CRDs gives them.
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: r\nspec:\n  parentRefs:\n  - name: gw\n  rules:\n  - backendRefs:\n    - name: web\n      port: 8080\n";
    let applied = k.run_with_stdin(&["-n", ns, "apply", "-f", "-"], Some(route));
    assert!(applied.status.success(), "{}", stderr(&applied));
    assert_eq!(
        k.ok(&["-n", ns, "get", "httproute", "r", "-o", "jsonpath={.spec.parentRefs[0].group}/{.spec.parentRefs[0].kind} {.spec.rules[0].backendRefs[0].kind}"]),
        "gateway.networking.k8s.io/Gateway Service"
    );

    // Selectors the server evaluates.
    let by_field = k.ok(&[
        "-n",
        ns,
        "get",
        "pods",
        "--field-selector",
        "status.phase=Pending",
        "-o",
        "name",
    ]);
    assert_eq!(by_field.trim(), "pod/web");
    let unsupported = k.fails(&["-n", ns, "get", "pods", "--field-selector", "spec.image=x"]);
    assert!(
        unsupported.contains("field label not supported"),
        "{unsupported}"
    );
    let everywhere = k.ok(&["get", "pods", "-A"]);
    assert_eq!(header(&everywhere)[0], "NAMESPACE");

    // A watch sees a change made after it started.
    let mut watch = Command::new(k.bin)
        .args(["-n", ns, "get", "configmaps", "-w", "-o", "name"])
        .env("KUBECONFIG", &k.config)
        .env("HOME", k.config.parent().unwrap_or(Path::new("/tmp")))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl -w");
    let lines = {
        use std::io::BufRead as _;
        let out = watch.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        rx
    };
    assert_eq!(
        lines
            .recv_timeout(Duration::from_secs(20))
            .expect("initial"),
        "configmap/cfg"
    );
    k.ok(&[
        "-n",
        ns,
        "create",
        "configmap",
        "later",
        "--from-literal=x=y",
    ]);
    let seen = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .expect("watch event");
        if line != "configmap/cfg" {
            break line;
        }
    };
    assert_eq!(seen, "configmap/later");
    let _ = watch.kill();
    let _ = watch.wait();

    // Workload objects are stored and shown with their columns (their controllers come
    // with the next release).
    k.ok(&[
        "-n",
        ns,
        "create",
        "deployment",
        "hello",
        "--image=registry.example/hello:1",
        "--replicas=3",
    ]);
    let deployments = k.ok(&["-n", ns, "get", "deployments", "-o", "wide"]);
    assert_eq!(
        &header(&deployments)[..5],
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    );
    assert_eq!(
        row(&deployments, "hello").get(1),
        Some(&"0/3"),
        "{deployments}"
    );
    let generation = k.ok(&[
        "-n",
        ns,
        "get",
        "deploy",
        "hello",
        "-o",
        "jsonpath={.metadata.generation}",
    ]);
    k.ok(&[
        "-n",
        ns,
        "patch",
        "deploy",
        "hello",
        "-p",
        r#"{"spec":{"replicas":4}}"#,
    ]);
    let bumped = k.ok(&[
        "-n",
        ns,
        "get",
        "deploy",
        "hello",
        "-o",
        "jsonpath={.metadata.generation}",
    ]);
    assert_eq!(
        generation.parse::<u64>().unwrap_or(0) + 1,
        bumped.parse::<u64>().unwrap_or(0)
    );
    // kubectl scale goes through the scale subresource; only replicas change.
    let scaled = k.ok(&["-n", ns, "scale", "deployment", "hello", "--replicas=6"]);
    assert!(scaled.contains("deployment.apps/hello scaled"), "{scaled}");
    assert_eq!(
        k.ok(&[
            "-n",
            ns,
            "get",
            "deploy",
            "hello",
            "-o",
            "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].image}"
        ]),
        "6 registry.example/hello:1"
    );
    let scale = k.ok(&[
        "-n",
        ns,
        "get",
        "--raw",
        &format!("/apis/apps/v1/namespaces/{ns}/deployments/hello/scale"),
    ]);
    let scale: serde_json::Value = serde_json::from_str(&scale).expect("a Scale");
    assert_eq!(scale["kind"], "Scale");
    assert_eq!(scale["spec"]["replicas"], 6);
    assert_eq!(scale["status"]["selector"], "app=hello");
    let stale = k.fails(&[
        "-n",
        ns,
        "scale",
        "deployment",
        "hello",
        "--current-replicas=2",
        "--replicas=1",
    ]);
    assert!(
        stale.contains("Expected replicas to be 2, was 6"),
        "{stale}"
    );
    let negative = k.fails(&[
        "-n",
        ns,
        "patch",
        "deploy",
        "hello",
        "--subresource=scale",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":-1}}"#,
    ]);
    assert!(
        negative.contains("spec.replicas: Invalid value: -1: must be greater than or equal to 0"),
        "{negative}"
    );
    k.ok(&[
        "-n",
        ns,
        "create",
        "secret",
        "generic",
        "token",
        "--from-literal=t=s3cr3t",
    ]);
    let secrets = k.ok(&["-n", ns, "get", "secrets"]);
    assert_eq!(row(&secrets, "token").get(1), Some(&"Opaque"), "{secrets}");

    // Owned objects: background, orphan and foreground propagation.
    for (cascade, child_stays) in [
        ("background", false),
        ("orphan", true),
        ("foreground", false),
    ] {
        let owner = format!("owner-{cascade}");
        let child = format!("child-{cascade}");
        k.ok(&["-n", ns, "create", "configmap", &owner]);
        let uid = k.ok(&[
            "-n",
            ns,
            "get",
            "cm",
            &owner,
            "-o",
            "jsonpath={.metadata.uid}",
        ]);
        let manifest = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {child}\n  ownerReferences:\n  - apiVersion: v1\n    kind: ConfigMap\n    name: {owner}\n    uid: {uid}\n    blockOwnerDeletion: true\n"
        );
        let out = k.run_with_stdin(&["-n", ns, "create", "-f", "-"], Some(&manifest));
        assert!(out.status.success(), "{}", stderr(&out));
        k.ok(&[
            "-n",
            ns,
            "delete",
            "configmap",
            &owner,
            &format!("--cascade={cascade}"),
            "--timeout=30s",
        ]);
        assert!(
            k.fails(&["-n", ns, "get", "cm", &owner])
                .contains("not found")
        );
        if child_stays {
            let refs = k.ok(&[
                "-n",
                ns,
                "get",
                "cm",
                &child,
                "-o",
                "jsonpath={.metadata.ownerReferences}",
            ]);
            assert_eq!(refs, "", "an orphan keeps no reference to its owner");
        } else {
            wait_for(&format!("{child} to be collected"), || {
                (!k.run(&["-n", ns, "get", "cm", &child]).status.success()).then_some(())
            });
        }
    }

    // Deletion, and the namespace going with its contents.
    assert!(
        k.ok(&["-n", ns, "delete", "configmap", "cfg"])
            .contains("deleted")
    );
    let gone = k.fails(&["-n", ns, "get", "configmap", "cfg"]);
    assert!(
        gone.contains("NotFound") && gone.contains("configmaps \"cfg\" not found"),
        "{gone}"
    );
    k.ok(&[
        "-n",
        ns,
        "delete",
        "pod",
        "web",
        "--grace-period=0",
        "--force",
    ]);
    k.ok(&["delete", "namespace", ns, "--timeout=60s"]);
    let no_ns = k.fails(&["get", "namespace", ns]);
    assert!(no_ns.contains("NotFound"), "{no_ns}");
    let in_gone_ns = k.fails(&["-n", ns, "create", "configmap", "x"]);
    assert!(
        in_gone_ns.contains(&format!("namespaces \"{ns}\" not found")),
        "{in_gone_ns}"
    );
}

/// Server-side apply as kubectl drives it: create, conflicts with another manager (and
/// with client-side apply's), `--force-conflicts`, a field dropped from the
/// configuration, and the hand-over from client-side apply that kubectl does itself.
fn server_side_apply(k: &Kubectl<'_>, ns: &str) {
    let ns = &format!("{ns}-ssa");
    k.ok(&["create", "namespace", ns]);
    let file = k.config.with_file_name(format!("{ns}-ssa.yaml"));
    let config = |data: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\n  labels: {{team: a}}\ndata:\n{data}"
        )
    };
    let apply = |manager: &str, extra: &[&str], text: &str| {
        std::fs::write(&file, text).expect("write config");
        let mut args = vec![
            "-n",
            ns,
            "apply",
            "--server-side",
            "--field-manager",
            manager,
            "-f",
            file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        k.run(&args)
    };
    let created = apply("ci", &[], &config("  a: \"1\"\n  b: \"2\"\n"));
    assert!(
        stdout(&created).contains("configmap/ssa serverside-applied"),
        "{}{}",
        stdout(&created),
        stderr(&created)
    );
    let managers = k.ok(&[
        "-n",
        ns,
        "get",
        "cm",
        "ssa",
        "--show-managed-fields",
        "-o",
        "jsonpath={range .metadata.managedFields[*]}{.manager}/{.operation} {end}",
    ]);
    assert_eq!(managers.trim(), "ci/Apply");
    // Someone else changes a field ci applied: ci's next apply of it conflicts.
    k.ok(&[
        "-n",
        ns,
        "patch",
        "cm",
        "ssa",
        "-p",
        r#"{"data":{"a":"hand"}}"#,
    ]);
    let conflict = apply("ci", &[], &config("  a: \"1\"\n  b: \"2\"\n"));
    assert!(!conflict.status.success());
    assert!(
        stderr(&conflict).contains(
            "Apply failed with 1 conflict: conflict with \"kubectl-patch\" using v1: .data.a"
        ),
        "{}",
        stderr(&conflict)
    );
    assert_eq!(
        k.ok(&["-n", ns, "get", "cm", "ssa", "-o", "jsonpath={.data.a}"]),
        "hand",
        "a refused apply changes nothing"
    );
    // Forced, it takes the field; b, dropped from the configuration and owned by no one
    // else, goes.
    let forced = apply("ci", &["--force-conflicts"], &config("  a: \"1\"\n"));
    assert!(forced.status.success(), "{}", stderr(&forced));
    assert_eq!(
        k.ok(&["-n", ns, "get", "cm", "ssa", "-o", "jsonpath={.data}"]),
        r#"{"a":"1"}"#
    );
    // Another applier sharing a value is no conflict; setting a different one is.
    assert!(
        apply("other", &[], &config("  a: \"1\"\n"))
            .status
            .success()
    );
    let shared = apply("other", &[], &config("  a: \"2\"\n"));
    assert!(
        stderr(&shared).contains("conflict with \"ci\": .data.a"),
        "{}",
        stderr(&shared)
    );

    // Client-side apply first, then server-side apply by kubectl's own manager: kubectl
    // hands the fields over, so the changed value is no conflict.
    let csa = k.config.with_file_name(format!("{ns}-csa.yaml"));
    std::fs::write(
        &csa,
        config("  a: \"1\"\n").replace("name: ssa", "name: csa"),
    )
    .expect("write");
    k.ok(&["-n", ns, "apply", "-f", csa.to_str().unwrap()]);
    std::fs::write(
        &csa,
        config("  a: \"9\"\n").replace("name: ssa", "name: csa"),
    )
    .expect("write");
    k.ok(&[
        "-n",
        ns,
        "apply",
        "--server-side",
        "-f",
        csa.to_str().unwrap(),
    ]);
    assert_eq!(
        k.ok(&["-n", ns, "get", "cm", "csa", "-o", "jsonpath={.data.a}"]),
        "9"
    );
    k.ok(&["delete", "namespace", ns, "--wait=false"]);
}

#[test]
fn kubectl_sessions_against_a_site() {
    let site = Site::init(&[]);
    let config = site.kubeconfig();
    assert!(config.exists(), "--init writes the admin kubeconfig");
    let text = std::fs::read_to_string(&config).expect("kubeconfig");
    assert!(
        text.contains(&format!("server: https://{}", site.api)),
        "{text}"
    );
    for (i, bin) in kubectl_builds().iter().enumerate() {
        let k = Kubectl {
            bin,
            config: config.clone(),
        };
        session(&k, &format!("shop{i}"));
    }
}

/// A PKCS#10 request (PEM) for `CN=common_name, O=organization`.
fn certificate_request(key: &rcgen::KeyPair, common_name: &str, organization: &str) -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, organization);
    params
        .serialize_request(key)
        .expect("csr")
        .pem()
        .expect("pem")
}

#[test]
fn the_api_refuses_strangers_and_enforces_rbac() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let tokens = tmp.path().join("tokens.csv");
    std::fs::write(
        &tokens,
        "viewer-token-123,vera,u1,\"viewers\"\nnobody-token-456,nobody,u2\n",
    )
    .expect("tokens");
    let site = Site::init(&["--token-auth-file", tokens.to_str().unwrap()]);
    let bin = &kubectl_builds()[0];
    let admin = Kubectl {
        bin,
        config: site.kubeconfig(),
    };
    // A kubeconfig without a client certificate: the token decides who is asking.
    let ca = site.dir.join("pki/ca.crt");
    let stranger_config = tmp.path().join("stranger.kubeconfig");
    std::fs::write(
        &stranger_config,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: s\nclusters:\n- name: s\n  cluster:\n    server: https://{}\n    certificate-authority: {}\ncontexts:\n- name: s\n  context:\n    cluster: s\n    user: s\nusers:\n- name: s\n  user: {{}}\n",
            site.api,
            ca.display()
        ),
    )
    .expect("config");
    let stranger = Kubectl {
        bin,
        config: stranger_config,
    };
    // No credentials at all (kubectl would prompt for a password; curl asks plainly).
    let anonymous = Command::new("curl")
        .args([
            "-s",
            "--cacert",
            ca.to_str().unwrap(),
            &format!("https://{}/api/v1/pods", site.api),
        ])
        .output()
        .expect("curl");
    let status: serde_json::Value = serde_json::from_slice(&anonymous.stdout).expect("a Status");
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["code"], 401);
    assert_eq!(status["reason"], "Unauthorized");
    let health = Command::new("curl")
        .args([
            "-s",
            "--cacert",
            ca.to_str().unwrap(),
            &format!("https://{}/healthz", site.api),
        ])
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&health.stdout),
        "ok",
        "health needs no credentials"
    );
    let forbidden = stranger.fails(&[
        "--token",
        "nobody-token-456",
        "get",
        "configmaps",
        "-n",
        "default",
    ]);
    assert!(
        forbidden.contains("User \"nobody\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"default\""),
        "{forbidden}"
    );
    let wrong_token = stranger.fails(&["--token", "not-a-token-at-all", "get", "pods"]);
    assert!(
        wrong_token.contains("Unauthorized") || wrong_token.contains("provide credentials"),
        "{wrong_token}"
    );
    // The admin binds the viewers group to `view` in one namespace.
    admin.ok(&["create", "namespace", "shop"]);
    admin.ok(&[
        "-n",
        "shop",
        "create",
        "configmap",
        "menu",
        "--from-literal=a=1",
    ]);
    admin.ok(&[
        "-n",
        "shop",
        "create",
        "rolebinding",
        "viewers",
        "--clusterrole=view",
        "--group=viewers",
    ]);
    wait_for("the binding to reach the cache", || {
        stranger
            .run(&[
                "--token",
                "viewer-token-123",
                "-n",
                "shop",
                "get",
                "configmaps",
                "-o",
                "name",
            ])
            .status
            .success()
            .then_some(())
    });
    let listed = stranger.ok(&[
        "--token",
        "viewer-token-123",
        "-n",
        "shop",
        "get",
        "configmaps",
        "-o",
        "name",
    ]);
    assert_eq!(listed.trim(), "configmap/menu");
    let write = stranger.fails(&[
        "--token",
        "viewer-token-123",
        "-n",
        "shop",
        "delete",
        "configmap",
        "menu",
    ]);
    assert!(
        write.contains("cannot delete resource \"configmaps\""),
        "{write}"
    );
    let elsewhere = stranger.fails(&[
        "--token",
        "viewer-token-123",
        "-n",
        "default",
        "get",
        "configmaps",
    ]);
    assert!(elsewhere.contains("forbidden"), "{elsewhere}");
    assert_eq!(
        admin
            .ok(&["-n", "shop", "get", "cm", "menu", "-o", "name"])
            .trim(),
        "configmap/menu"
    );

    // Bootstrap tokens: a Secret in kube-system makes a user in system:bootstrappers
    // (nothing is bound to it here, so the 403 names it); a wrong secret, an expired
    // token, or a token not meant for authentication is nobody.
    let bootstrap = |id: &str, secret: &str, expiration: &str, usage: &str| {
        admin.ok(&[
            "-n",
            "kube-system",
            "create",
            "secret",
            "generic",
            &format!("bootstrap-token-{id}"),
            "--type=bootstrap.kubernetes.io/token",
            &format!("--from-literal=token-id={id}"),
            &format!("--from-literal=token-secret={secret}"),
            &format!("--from-literal=expiration={expiration}"),
            &format!("--from-literal=usage-bootstrap-authentication={usage}"),
            "--from-literal=auth-extra-groups=system:bootstrappers:brink:default-node-token",
        ]);
    };
    bootstrap("abcdef", "0123456789abcdef", "2099-01-01T00:00:00Z", "true");
    bootstrap("expire", "0123456789abcdef", "2001-01-01T00:00:00Z", "true");
    bootstrap(
        "unused",
        "0123456789abcdef",
        "2099-01-01T00:00:00Z",
        "false",
    );
    let as_bootstrap = wait_for("the token's Secret to reach the cache", || {
        let err = stranger.fails(&["--token", "abcdef.0123456789abcdef", "get", "pods"]);
        (!err.contains("Unauthorized") && !err.contains("provide credentials")).then_some(err)
    });
    assert!(
        as_bootstrap.contains("User \"system:bootstrap:abcdef\" cannot list resource \"pods\""),
        "{as_bootstrap}"
    );
    for token in [
        "abcdef.0123456789abcdee",
        "expire.0123456789abcdef",
        "unused.0123456789abcdef",
        "ABCDEF.0123456789abcdef",
    ] {
        let refused = stranger.fails(&["--token", token, "get", "pods"]);
        assert!(
            refused.contains("Unauthorized") || refused.contains("provide credentials"),
            "{token}: {refused}"
        );
    }

    // `brink server token` makes them as kubeadm does: create prints the token and the
    // join command with the CA pin; list hides secrets; delete ends the token.
    let dir = site.dir.to_str().expect("utf-8 path");
    let created = brink(&[
        "server",
        "token",
        "create",
        "--data-dir",
        dir,
        "--ttl",
        "1h",
        "--description",
        "shop 7",
        "--print-join-command",
    ]);
    assert!(created.status.success(), "{}", stderr(&created));
    let printed = stdout(&created);
    let mut lines = printed.lines();
    let token = lines.next().unwrap_or_default().to_owned();
    let join = lines.next().unwrap_or_default();
    assert!(
        join.starts_with(&format!(
            "brink node --server https://{} --token {token} --discovery-token-ca-cert-hash sha256:",
            site.api
        )),
        "{printed}"
    );
    let id = token.split('.').next().unwrap_or_default().to_owned();
    let as_node = wait_for("the new token to authenticate", || {
        let err = stranger.fails(&["--token", &token, "get", "pods"]);
        err.contains(&format!("system:bootstrap:{id}"))
            .then_some(err)
    });
    assert!(as_node.contains("forbidden"), "{as_node}");
    let listed = stdout(&brink(&["server", "token", "list", "--data-dir", dir]));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&format!("{id}.<hidden>")) && l.contains("shop 7")),
        "{listed}"
    );
    assert!(!listed.contains(&token), "list shows no secret: {listed}");

    // TLS bootstrap as a kubelet does it: with the token, ask for a client certificate;
    // Brink approves and signs it, and the certificate then names the node.
    let key = rcgen::KeyPair::generate().expect("key");
    let request = certificate_request(&key, "system:node:shop-7", "system:nodes");
    use base64::Engine as _;
    let csr = format!(
        "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata:\n  name: node-csr-shop-7\nspec:\n  signerName: kubernetes.io/kube-apiserver-client-kubelet\n  usages: [digital signature, client auth]\n  request: {}\n",
        base64::engine::general_purpose::STANDARD.encode(&request)
    );
    let asked = stranger.run_with_stdin(&["--token", &token, "create", "-f", "-"], Some(&csr));
    assert!(asked.status.success(), "{}", stderr(&asked));
    let signed = wait_for("the request to be approved and signed", || {
        let table = admin.ok(&["get", "csr"]);
        let row: Vec<String> = row(&table, "node-csr-shop-7")
            .iter()
            .map(|c| c.to_string())
            .collect();
        (row.last().map(String::as_str) == Some("Approved,Issued")).then_some((table, row))
    });
    assert_eq!(
        header(&signed.0),
        [
            "NAME",
            "AGE",
            "SIGNERNAME",
            "REQUESTOR",
            "REQUESTEDDURATION",
            "CONDITION"
        ]
    );
    assert_eq!(signed.1[3], format!("system:bootstrap:{id}"));
    let certificate = admin.ok(&[
        "get",
        "csr",
        "node-csr-shop-7",
        "-o",
        "jsonpath={.status.certificate}",
    ]);
    let certificate = base64::engine::general_purpose::STANDARD
        .decode(certificate.trim())
        .expect("base64 certificate");
    let cert_file = tmp.path().join("node.crt");
    let key_file = tmp.path().join("node.key");
    std::fs::write(&cert_file, &certificate).expect("cert");
    std::fs::write(&key_file, key.serialize_pem()).expect("key");
    let as_node = stranger.fails(&[
        "--client-certificate",
        cert_file.to_str().unwrap(),
        "--client-key",
        key_file.to_str().unwrap(),
        "get",
        "secrets",
        "-n",
        "kube-system",
    ]);
    assert!(
        as_node.contains("User \"system:node:shop-7\" cannot list resource \"secrets\""),
        "{as_node}"
    );
    // A request for a subject other than a node's is left pending.
    let sneaky = certificate_request(&key, "brink-admin", "system:masters");
    let sneaky_csr = csr.replace("node-csr-shop-7", "sneaky").replace(
        &base64::engine::general_purpose::STANDARD.encode(&request),
        &base64::engine::general_purpose::STANDARD.encode(&sneaky),
    );
    let asked =
        stranger.run_with_stdin(&["--token", &token, "create", "-f", "-"], Some(&sneaky_csr));
    assert!(asked.status.success(), "{}", stderr(&asked));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        row(&admin.ok(&["get", "csr"]), "sneaky").last().copied(),
        Some("Pending")
    );

    let deleted = brink(&["server", "token", "delete", "--data-dir", dir, &id]);
    assert!(deleted.status.success(), "{}", stderr(&deleted));
    wait_for("the deleted token to stop working", || {
        let err = stranger.fails(&["--token", &token, "get", "pods"]);
        (err.contains("Unauthorized") || err.contains("provide credentials")).then_some(())
    });
    let bad = brink(&["server", "token", "delete", "--data-dir", dir, "NOPE"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("is not a token ID"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn bad_api_input_gets_a_status_and_changes_nothing() {
    let site = Site::init(&[]);
    let bin = &kubectl_builds()[0];
    let k = Kubectl {
        bin,
        config: site.kubeconfig(),
    };
    let before = k.ok(&["get", "configmaps", "-A", "-o", "name"]);
    for (body, needle) in [
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: Bad_Name\n",
            "Invalid",
        ),
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n  labels:\n    ../a: b\n",
            "metadata.labels",
        ),
        (
            "apiVersion: v7\nkind: ConfigMap\nmetadata:\n  name: c\n",
            "",
        ),
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata: [1, 2]\n",
            "",
        ),
        (
            &format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: big\n  annotations:\n    a: \"{}\"\n",
                "x".repeat(300 * 1024)
            ),
            "Too long",
        ),
    ] {
        let out = k.run_with_stdin(&["create", "-f", "-", "--validate=false"], Some(body));
        assert!(!out.status.success(), "{body}");
        assert!(stderr(&out).contains(needle), "{}", stderr(&out));
    }
    let deep = format!("{}\n", "[".repeat(100_000));
    let out = k.run_with_stdin(
        &[
            "create",
            "--raw",
            "/api/v1/namespaces/default/configmaps",
            "-f",
            "-",
        ],
        Some(&deep),
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("nested more than") || stderr(&out).contains("BadRequest"),
        "{}",
        stderr(&out)
    );
    // A stale resourceVersion is a conflict.
    k.ok(&["create", "configmap", "c", "--from-literal=a=1"]);
    let stale = "{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{\"name\":\"c\",\"namespace\":\"default\",\"resourceVersion\":\"1\"},\"data\":{\"a\":\"2\"}}";
    let out = k.run_with_stdin(&["replace", "-f", "-", "--validate=false"], Some(stale));
    assert!(
        stderr(&out).contains("the object has been modified"),
        "{}",
        stderr(&out)
    );
    assert_eq!(k.ok(&["get", "cm", "c", "-o", "jsonpath={.data.a}"]), "1");
    let after = k.ok(&["get", "configmaps", "-A", "-o", "name"]);
    assert_eq!(after.lines().count(), before.lines().count() + 1);
    // Paths and queries that name nothing.
    for path in [
        "/api/v1/widgets",
        "/apis/apps/v9/deployments",
        "/api/v1/namespaces/default/pods/x/exec",
    ] {
        let err = k.fails(&["get", "--raw", path]);
        assert!(
            err.contains("NotFound") || err.contains("could not find"),
            "{path}: {err}"
        );
    }
    let err = k.fails(&[
        "get",
        "--raw",
        "/api/v1/namespaces/default/configmaps?labelSelector=%FF",
    ]);
    assert!(
        err.contains("BadRequest") || err.contains("invalid"),
        "{err}"
    );
}

/// A member holds at most `--api-max-watches` watches and refuses more with a 429
/// `Status`; a client that stops reading its watch slows no other client, gives its slot
/// back after `--api-watch-stall`, and resumes from its last resourceVersion without a
/// gap; one that reads too slowly is ended in-stream with 410 Expired (kube-rs relists on
/// that). Raw HTTPS streams, since kube-rs sends a watch only when its stream is polled.
#[test]
fn watches_are_bounded_and_a_stalled_watcher_slows_no_one() {
    use brink_chaos::api::{ApiAccess, WatchLines};
    use serde_json::{Value, json};

    const WATCHES: usize = 2000;
    const WRITES: usize = 300;
    let site = Site::init(&[
        "--api-max-watches",
        &WATCHES.to_string(),
        "--api-watch-lag",
        "16",
        "--api-watch-stall",
        "3s",
    ]);
    let access = ApiAccess::from_kubeconfig(&site.kubeconfig()).expect("kubeconfig");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut admin = access.http2().await.expect("connect");
        for ns in ["w", "flood"] {
            let made = admin
                .call(
                    "POST",
                    "/api/v1/namespaces",
                    Some(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})),
                )
                .await
                .expect("namespace");
            assert_eq!(made.status, 201, "{:?}", made.body);
        }
        let listed = admin
            .call("GET", "/api/v1/namespaces/w/configmaps", None)
            .await
            .expect("list");
        let rv = listed.json()["metadata"]["resourceVersion"]
            .as_str()
            .expect("list resourceVersion")
            .to_owned();
        let watch_w = format!("/api/v1/namespaces/w/configmaps?watch=true&resourceVersion={rv}");

        // 2,000 watches is the member's limit, its own controllers' watches included: a
        // client asking for 2,050 over eleven HTTP/2 connections gets all but those, and
        // each one over is refused with a Status saying why (three of them, on a
        // connection of their own, are given back later).
        let spare = access.http2().await.expect("connect");
        let mut streams = Vec::new();
        for _ in 0..3 {
            let response = spare.clone().open("GET", &watch_w, None).await.expect("watch");
            assert_eq!(response.status(), 200);
            streams.push(WatchLines::new(response));
        }
        let mut connections = Vec::new();
        for _ in 0..10 {
            connections.push(access.http2().await.expect("connect"));
        }
        let mut watchers = Vec::new();
        for i in 0..WATCHES + 50 {
            let mut connection = connections[i % connections.len()].clone();
            let path = watch_w.clone();
            watchers.push(tokio::spawn(async move {
                let response = connection.open("GET", &path, None).await.expect("watch");
                match response.status().as_u16() {
                    200 => Ok(WatchLines::new(response)),
                    status => {
                        let body = http_body_util::BodyExt::collect(response.into_body())
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        Err((status, serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null)))
                    }
                }
            }));
        }
        let mut refused = 0;
        for watcher in watchers {
            match watcher.await.expect("watcher") {
                Ok(stream) => streams.push(stream),
                Err((status, body)) => {
                    refused += 1;
                    assert_eq!(status, 429, "{body}");
                    assert_eq!(body["kind"], "Status", "{body}");
                    assert_eq!(body["reason"], "TooManyRequests", "{body}");
                    assert!(
                        body["message"].as_str().unwrap_or("").contains("watches"),
                        "{body}"
                    );
                }
            }
        }
        assert!(refused >= 50, "{refused} refused");
        assert!(
            streams.len() > WATCHES - 200,
            "only {} watches opened",
            streams.len()
        );
        let refused = admin.call("GET", &watch_w, None).await.expect("watch");
        assert_eq!(refused.status, 429, "{:?}", refused.body);
        // A write reaches every one of them.
        let made = admin
            .call(
                "POST",
                "/api/v1/namespaces/w/configmaps",
                Some(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "seen-by-all"}})),
            )
            .await
            .expect("create");
        assert_eq!(made.status, 201);
        let mut readers = Vec::new();
        for mut stream in streams.drain(..) {
            readers.push(tokio::spawn(async move {
                let event = tokio::time::timeout(Duration::from_secs(60), stream.next())
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(Value::Null);
                (event, stream)
            }));
        }
        for reader in readers {
            let (event, stream) = reader.await.expect("reader");
            assert_eq!(event["type"], "ADDED", "{event}");
            assert_eq!(event["object"]["metadata"]["name"], "seen-by-all", "{event}");
            streams.push(stream);
        }
        // Closing a connection gives its three watches back (once the member saw it go),
        // for the three watchers of the flood below.
        drop(spare);
        drop(streams.drain(..3));

        // Three watchers of the flood: one reads everything, one reads nothing until
        // later (a small socket buffer, so the member feels it at once), one reads an
        // event every half second while the writes go on.
        let flood_rv = admin
            .call("GET", "/api/v1/namespaces/flood/configmaps", None)
            .await
            .expect("list")
            .json()["metadata"]["resourceVersion"]
            .as_str()
            .expect("resourceVersion")
            .to_owned();
        let watch_flood = |rv: &str| {
            format!("/api/v1/namespaces/flood/configmaps?watch=true&resourceVersion={rv}")
        };
        let mut stalled_connection = access
            .http1_with_receive_buffer(Some(4096))
            .await
            .expect("connect");
        let stalled = stalled_connection.open_when_admitted("GET", &watch_flood(&flood_rv), Duration::from_secs(30))
            .await
            .expect("watch");
        assert_eq!(stalled.status(), 200);
        let mut slow_connection = access
            .http1_with_receive_buffer(Some(4096))
            .await
            .expect("connect");
        let slow = slow_connection.open_when_admitted("GET", &watch_flood(&flood_rv), Duration::from_secs(30))
            .await
            .expect("watch");
        assert_eq!(slow.status(), 200);
        let mut fast_connection = access.http2().await.expect("connect");
        let fast = fast_connection.open_when_admitted("GET", &watch_flood(&flood_rv), Duration::from_secs(30))
            .await
            .expect("watch");
        assert_eq!(fast.status(), 200);
        let names = |events: &[Value]| -> Vec<String> {
            events
                .iter()
                .filter(|e| e["type"] == "ADDED")
                .map(|e| e["object"]["metadata"]["name"].as_str().unwrap_or("").to_owned())
                .collect()
        };
        let fast_reader = tokio::spawn(async move {
            let mut stream = WatchLines::new(fast);
            let mut events = Vec::new();
            while events.len() < WRITES {
                match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
                    Ok(Some(event)) => events.push(event),
                    _ => break,
                }
            }
            events
        });
        let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let slow_reader = {
            let writing = writing.clone();
            tokio::spawn(async move {
                let mut stream = WatchLines::new(slow);
                let mut events = Vec::new();
                loop {
                    if writing.load(std::sync::atomic::Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
                        Ok(Some(event)) => events.push(event),
                        _ => break,
                    }
                }
                events
            })
        };
        let filler = "x".repeat(32 * 1024);
        let mut expected = Vec::new();
        for i in 0..WRITES {
            let name = format!("flood-{i:03}");
            let made = admin
                .call(
                    "POST",
                    "/api/v1/namespaces/flood/configmaps",
                    Some(&json!({
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {"name": name},
                        "data": {"filler": filler},
                    })),
                )
                .await
                .expect("create");
            assert_eq!(made.status, 201, "write {i} while a watcher stalls");
            expected.push(name);
        }
        writing.store(false, std::sync::atomic::Ordering::SeqCst);
        // The reading watcher saw every write, in order.
        let fast_events = fast_reader.await.expect("fast reader");
        assert_eq!(names(&fast_events), expected);
        // The slow one was ended in-stream with 410 Expired after an in-order prefix.
        let slow_events = slow_reader.await.expect("slow reader");
        let last = slow_events.last().cloned().unwrap_or(Value::Null);
        assert_eq!(last["type"], "ERROR", "{last}");
        assert_eq!(last["object"]["code"], 410, "{last}");
        assert_eq!(last["object"]["reason"], "Expired", "{last}");
        let slow_names = names(&slow_events);
        assert!(slow_names.len() < WRITES, "the slow watcher was never ended");
        assert_eq!(slow_names[..], expected[..slow_names.len()]);
        // The stalled one gave its slot back: with every other slot taken, a new watch
        // opens once the stall ended it.
        let start = tokio::time::Instant::now();
        let mut probe = access.http2().await.expect("connect");
        let mut fillers = Vec::new();
        loop {
            let response = probe.open("GET", &watch_w, None).await.expect("watch");
            if response.status() == 200 {
                fillers.push(response);
                if fillers.len() == 3 {
                    break;
                }
                continue;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the stalled watch kept its slot"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Read late, its stream is an in-order prefix and then ends; a watch from the
        // last resourceVersion it read brings the rest, with no gap.
        let mut stream = WatchLines::new(stalled);
        let mut stalled_events = Vec::new();
        while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            stalled_events.push(event);
        }
        let mut seen = names(&stalled_events);
        assert!(seen.len() < WRITES, "the stalled watcher was never ended");
        assert_eq!(seen[..], expected[..seen.len()]);
        let resume_rv = stalled_events
            .iter()
            .rev()
            .find_map(|e| e["object"]["metadata"]["resourceVersion"].as_str())
            .unwrap_or(&flood_rv)
            .to_owned();
        drop(fillers);
        let mut again = access.http2().await.expect("connect");
        let resumed = again
            .open("GET", &watch_flood(&resume_rv), None)
            .await
            .expect("watch");
        assert_eq!(resumed.status(), 200);
        let mut stream = WatchLines::new(resumed);
        while seen.len() < WRITES {
            match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
                Ok(Some(event)) => seen.extend(names(std::slice::from_ref(&event))),
                _ => break,
            }
        }
        assert_eq!(seen, expected, "the resumed watch left a gap");
        drop(streams);
    });
}

/// `brink node` started with a node's data directory and extra flags; killed on drop.
struct NodeProcess(Child);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_node(dir: &Path, name: &str, extra: &[&str]) -> NodeProcess {
    let child = Command::new(brink_bin())
        .args(["node", "--data-dir", dir.to_str().expect("utf-8")])
        .args(["--node-name", name, "--node-lease-renew", "1s"])
        .args(["--kubelet-addr", &format!("127.0.0.1:{}", free_port())])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("brink node");
    NodeProcess(child)
}

/// A bootstrap token from `brink server token create` and the CA pin it prints, once
/// the leader has signed cluster-info for it (within a sweep).
fn join_token(site: &Site, admin: &Kubectl<'_>) -> (String, String) {
    let created = brink(&[
        "server",
        "token",
        "create",
        "--data-dir",
        site.dir.to_str().expect("utf-8"),
        "--print-join-command",
    ]);
    assert!(created.status.success(), "{}", stderr(&created));
    let printed = stdout(&created);
    let token = printed.lines().next().unwrap_or_default().to_owned();
    let pin = printed
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_owned();
    wait_for("cluster-info to be signed for the token", || {
        let info = admin.ok(&[
            "-n",
            "kube-public",
            "get",
            "cm",
            "cluster-info",
            "-o",
            "jsonpath={.data}",
        ]);
        info.contains(&format!("jws-kubeconfig-{}", &token[..6]))
            .then_some(())
    });
    (token, pin)
}

/// A node that should refuse to join: its error.
fn refused_join(dir: &Path, extra: &[&str]) -> String {
    let out = Command::new(brink_bin())
        .args(["node", "--data-dir", dir.to_str().expect("utf-8")])
        .args(["--node-name", "refused", "--join-timeout", "5s"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("brink node");
    assert!(!out.status.success(), "joined: {}", stderr(&out));
    assert!(
        !dir.join("kubeconfig").exists(),
        "a refused join leaves no credential"
    );
    stderr(&out)
}

#[test]
fn a_node_joins_with_a_token_and_heartbeats() {
    let site = Site::init(&[]);
    let bin = &kubectl_builds()[0];
    let admin = Kubectl {
        bin,
        config: site.kubeconfig(),
    };
    let (token, pin) = join_token(&site, &admin);
    let server = format!("https://{}", site.api);
    let tmp = tempfile::tempdir().expect("tempdir");

    // Refused: another token, the right ID with a wrong secret, a wrong pin, an expired
    // token, no way to find pods at all.
    let id = &token[..6];
    let wrong_secret = format!("{id}.{}", "0".repeat(16));
    for (args, why) in [
        (
            vec![
                "--token",
                "zzzzzz.0123456789abcdef",
                "--discovery-token-ca-cert-hash",
                &pin,
            ],
            "no signature for token zzzzzz",
        ),
        (
            vec![
                "--token",
                &wrong_secret,
                "--discovery-token-ca-cert-hash",
                &pin,
            ],
            "signature does not match the token",
        ),
        (
            vec![
                "--token",
                &token,
                "--discovery-token-ca-cert-hash",
                &format!("sha256:{}", "0".repeat(64)),
            ],
            "(--discovery-token-ca-cert-hash)",
        ),
        (
            vec![
                "--token",
                &token,
                "--discovery-token-ca-cert-hash",
                "md5:1234",
            ],
            "must be sha256:",
        ),
    ] {
        let dir = tmp.path().join("refused");
        let mut all = vec!["--server", server.as_str()];
        all.extend(args);
        let err = refused_join(&dir, &all);
        assert!(err.contains(why), "{why}: {err}");
    }
    admin.ok(&[
        "-n",
        "kube-system",
        "create",
        "secret",
        "generic",
        "bootstrap-token-expire",
        "--type=bootstrap.kubernetes.io/token",
        "--from-literal=token-id=expire",
        "--from-literal=token-secret=0123456789abcdef",
        "--from-literal=expiration=2001-01-01T00:00:00Z",
        "--from-literal=usage-bootstrap-authentication=true",
        "--from-literal=usage-bootstrap-signing=true",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let expired = refused_join(
        &tmp.path().join("expired"),
        &[
            "--server",
            &server,
            "--token",
            "expire.0123456789abcdef",
            "--discovery-token-ca-cert-hash",
            &pin,
        ],
    );
    assert!(
        expired.contains("no signature for token expire"),
        "{expired}"
    );
    let nowhere = refused_join(&tmp.path().join("nowhere"), &[]);
    assert!(nowhere.contains("say where pods come from"), "{nowhere}");

    // Joined: the node asks for its certificate, keeps it, registers and heartbeats.
    let dir = tmp.path().join("shop-7");
    let node = start_node(
        &dir,
        "shop-7",
        &[
            "--server",
            &server,
            "--token",
            &token,
            "--discovery-token-ca-cert-hash",
            &pin,
        ],
    );
    let nodes = wait_for("the node to be Ready", || {
        let table = admin.ok(&["get", "nodes", "-o", "wide"]);
        (row(&table, "shop-7").get(1) == Some(&"Ready")).then_some(table)
    });
    assert_eq!(
        &header(&nodes)[..6],
        ["NAME", "STATUS", "ROLES", "AGE", "VERSION", "INTERNAL-IP"]
    );
    assert_eq!(row(&nodes, "shop-7")[5], "127.0.0.1", "{nodes}");
    let labels = admin.ok(&["get", "node", "shop-7", "-o", "jsonpath={.metadata.labels}"]);
    for label in [
        "kubernetes.io/os",
        "kubernetes.io/arch",
        "node.kubernetes.io/instance-type",
    ] {
        assert!(labels.contains(label), "{label}: {labels}");
    }
    let allocatable = admin.ok(&[
        "get",
        "node",
        "shop-7",
        "-o",
        "jsonpath={.status.allocatable.pods} {.status.nodeInfo.operatingSystem}",
    ]);
    assert_eq!(allocatable, "110 linux");
    let renewed = |admin: &Kubectl<'_>| {
        admin.ok(&[
            "-n",
            "kube-node-lease",
            "get",
            "lease",
            "shop-7",
            "-o",
            "jsonpath={.spec.holderIdentity} {.spec.renewTime}",
        ])
    };
    let first = wait_for("the lease", || {
        let r = renewed(&admin);
        r.starts_with("shop-7 ").then_some(r)
    });
    wait_for("the lease to be renewed", || {
        (renewed(&admin) != first).then_some(())
    });
    let csrs = admin.ok(&["get", "csr"]);
    assert!(
        csrs.lines()
            .any(|l| l.starts_with("node-csr-shop-7-") && l.ends_with("Approved,Issued")),
        "{csrs}"
    );
    let kubeconfig = dir.join("kubeconfig");
    // The Node authorizer: with its own credential the node writes its own Node and
    // Lease and nothing else.
    let as_node = Kubectl {
        bin,
        config: kubeconfig.clone(),
    };
    as_node.ok(&["label", "node", "shop-7", "shop=7", "--overwrite"]);
    admin.run_with_stdin(
        &["create", "-f", "-"],
        Some("apiVersion: v1\nkind: Node\nmetadata:\n  name: other\n"),
    );
    let lease = |name: &str| {
        format!(
            "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: {name}\n  namespace: kube-node-lease\nspec:\n  holderIdentity: {name}\n"
        )
    };
    for (args, stdin) in [
        (vec!["label", "node", "other", "x=y"], None),
        (vec!["delete", "node", "shop-7"], None),
        (vec!["-n", "kube-system", "get", "secrets"], None),
        (vec!["-n", "default", "create", "configmap", "x"], None),
        (vec!["create", "-f", "-"], Some(lease("other"))),
        (
            vec!["create", "-f", "-"],
            Some("apiVersion: v1\nkind: Node\nmetadata:\n  name: third\n".to_owned()),
        ),
    ] {
        let out = as_node.run_with_stdin(&args, stdin.as_deref());
        assert!(!out.status.success(), "{args:?} allowed to a node");
        assert!(
            stderr(&out).contains("forbidden") || stderr(&out).contains("Forbidden"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&kubeconfig)
            .expect("kubeconfig")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the credential is the node's alone");
    drop(node);

    // Restarted with only its kubeconfig, it needs no token (a deleted one would do).
    let again = start_node(&dir, "shop-7", &node_flags(&kubeconfig));
    let before = renewed(&admin);
    wait_for("the restarted node's lease", || {
        (renewed(&admin) != before).then_some(())
    });
    pods_on_a_joined_node(&admin, &as_node, &dir, again);
}

/// The site's scheduler places pods that name no node, says why when none fits, and
/// binds each pod once even with a second scheduler racing it.
fn scheduled_pods(admin: &Kubectl<'_>, hello: &str, job: &str) {
    admin.ok(&["create", "namespace", "placed"]);
    let pod = |name: &str, image: &str, extra: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: placed\nspec:\n  terminationGracePeriodSeconds: 1\n{extra}  containers:\n  - name: c\n    image: {image}\n"
        )
    };
    let created = admin.run_with_stdin(&["create", "-f", "-"], Some(&pod("anywhere", hello, "")));
    assert!(created.status.success(), "{}", stderr(&created));
    admin.ok(&[
        "-n",
        "placed",
        "wait",
        "--for=condition=Ready",
        "pod/anywhere",
        "--timeout=60s",
    ]);
    let field = |name: &str, path: &str| {
        admin.ok(&[
            "-n",
            "placed",
            "get",
            "pod",
            name,
            "-o",
            &format!("jsonpath={path}"),
        ])
    };
    assert_eq!(field("anywhere", "{.spec.nodeName}"), "shop-7");
    let described = admin.ok(&["-n", "placed", "describe", "pod", "anywhere"]);
    assert!(
        described.contains("Scheduled")
            && described.contains("Successfully assigned placed/anywhere to shop-7"),
        "{described}"
    );
    // RuntimeClass: the site has `brink`; a pod naming it gets its scheduling rules and
    // lands on a Brink node; one naming a class that does not exist is refused.
    assert_eq!(
        admin.ok(&["get", "runtimeclass", "brink", "-o", "jsonpath={.handler}"]),
        "brink"
    );
    admin.run_with_stdin(
        &["create", "-f", "-"],
        Some(&pod("wasm", hello, "  runtimeClassName: brink\n")),
    );
    admin.ok(&[
        "-n",
        "placed",
        "wait",
        "--for=condition=Ready",
        "pod/wasm",
        "--timeout=60s",
    ]);
    assert_eq!(
        field(
            "wasm",
            "{.spec.nodeSelector.runtime\\.brink\\.dev/wasm} {.spec.nodeName}"
        ),
        "true shop-7"
    );
    let refused = admin.run_with_stdin(
        &["create", "-f", "-"],
        Some(&pod("gvisor", hello, "  runtimeClassName: gvisor\n")),
    );
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("pod rejected: RuntimeClass \"gvisor\" not found"),
        "{}",
        stderr(&refused)
    );
    // No node has the label: the pod waits, and kubectl shows kube-scheduler's words.
    admin.run_with_stdin(
        &["create", "-f", "-"],
        Some(&pod("mars", hello, "  nodeSelector:\n    zone: mars\n")),
    );
    let why = "0/2 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 1 node(s) had untolerated taint {node.kubernetes.io/not-ready: }.";
    let described = wait_for("FailedScheduling", || {
        let d = admin.ok(&["-n", "placed", "describe", "pod", "mars"]);
        d.contains("FailedScheduling").then_some(d)
    });
    assert!(described.contains(why), "{described}");
    assert_eq!(
        field("mars", "{.status.conditions[0].reason} {.status.phase}"),
        "Unschedulable Pending"
    );
    let err = admin.fails(&["-n", "placed", "logs", "mars"]);
    assert!(
        err.contains("pod mars does not have a host assigned"),
        "{err}"
    );
    // A node change is what it waited for.
    admin.ok(&["label", "node", "shop-7", "zone=mars"]);
    admin.ok(&[
        "-n",
        "placed",
        "wait",
        "--for=condition=Ready",
        "pod/mars",
        "--timeout=60s",
    ]);

    // A second scheduler races the site's: every pod is bound once.
    let config = admin.config.to_str().expect("utf-8").to_owned();
    let mut second = Command::new(brink_bin())
        .args(["scheduler", "--kubeconfig", &config])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("brink scheduler");
    std::thread::sleep(Duration::from_millis(500));
    let mut many = String::new();
    for i in 0..12 {
        many.push_str(&pod(&format!("race-{i}"), job, "  restartPolicy: Never\n"));
        many.push_str("---\n");
    }
    let created = admin.run_with_stdin(&["create", "-f", "-"], Some(&many));
    assert!(created.status.success(), "{}", stderr(&created));
    wait_for("the racing pods to finish", || {
        let phases = admin.ok(&[
            "-n",
            "placed",
            "get",
            "pods",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.status.phase} {end}",
        ]);
        let done = phases
            .split_whitespace()
            .filter(|p| p.starts_with("race-") && p.ends_with("=Succeeded"))
            .count();
        (done == 12).then_some(())
    });
    let _ = second.kill();
    let _ = second.wait();
    let events: serde_json::Value =
        serde_json::from_str(&admin.ok(&["-n", "placed", "get", "events", "-o", "json"]))
            .expect("events");
    for i in 0..12 {
        let name = format!("race-{i}");
        let scheduled = scheduled_events(&events, &name);
        assert_eq!(scheduled, 1, "{name} was bound {scheduled} times");
    }
}

/// A Deployment through kubectl's rollout verbs: its ReplicaSet makes the pods, the
/// scheduler places them, `rollout status|restart|history|undo` and `scale` work, and
/// deleting it takes everything it owns.
fn deployments(admin: &Kubectl<'_>, hello: &str) {
    admin.ok(&["create", "namespace", "dep"]);
    let manifest = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: dep\nspec:\n  replicas: 3\n  selector:\n    matchLabels:\n      app: web\n  strategy:\n    rollingUpdate:\n      maxSurge: 1\n      maxUnavailable: 1\n  template:\n    metadata:\n      labels:\n        app: web\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: web\n        image: {hello}\n"
    );
    let applied = admin.run_with_stdin(&["apply", "-f", "-"], Some(&manifest));
    assert!(applied.status.success(), "{}", stderr(&applied));
    let rolled = |admin: &Kubectl<'_>| {
        let out = admin.run(&[
            "-n",
            "dep",
            "rollout",
            "status",
            "deployment/web",
            "--timeout=90s",
        ]);
        assert!(
            stdout(&out).contains("successfully rolled out"),
            "{}{}\n{}\n{}",
            stdout(&out),
            stderr(&out),
            admin.ok(&["-n", "dep", "get", "pods,replicasets", "-o", "wide"]),
            admin.ok(&["-n", "dep", "describe", "pods"]),
        );
    };
    rolled(admin);
    let table = admin.ok(&["-n", "dep", "get", "deployment", "web"]);
    assert_eq!(row(&table, "web")[1..4], ["3/3", "3", "3"], "{table}");
    let pods = admin.ok(&["-n", "dep", "get", "pods", "-l", "app=web", "-o", "name"]);
    assert_eq!(pods.lines().count(), 3, "{pods}");
    let sets = admin.ok(&["-n", "dep", "get", "replicasets", "-o", "name"]);
    assert_eq!(sets.lines().count(), 1, "{sets}");

    admin.ok(&["-n", "dep", "scale", "deployment/web", "--replicas=5"]);
    rolled(admin);
    let ready = admin.ok(&[
        "-n",
        "dep",
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.status.readyReplicas}",
    ]);
    assert_eq!(ready, "5");

    // A new template rolls out through a second ReplicaSet; the first empties.
    admin.ok(&["-n", "dep", "rollout", "restart", "deployment/web"]);
    rolled(admin);
    let sets = admin.ok(&[
        "-n",
        "dep",
        "get",
        "replicasets",
        "-o",
        "jsonpath={range .items[*]}{.spec.replicas} {end}",
    ]);
    let mut counts: Vec<&str> = sets.split_whitespace().collect();
    counts.sort();
    assert_eq!(counts, ["0", "5"], "{sets}");
    let history = admin.ok(&["-n", "dep", "rollout", "history", "deployment/web"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");
    let described = admin.ok(&["-n", "dep", "describe", "deployment", "web"]);
    assert!(described.contains("ScalingReplicaSet"), "{described}");
    admin.ok(&["-n", "dep", "rollout", "undo", "deployment/web"]);
    rolled(admin);
    let revision = admin.ok(&[
        "-n",
        "dep",
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}",
    ]);
    assert_eq!(revision, "3");

    // The node's Gateway data plane takes its objects from the API and serves the
    // Deployment's pods.
    let port = free_port();
    let gateway = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: dep\nspec:\n  selector:\n    app: web\n  ports:\n  - port: 80\n    targetPort: 8080\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata:\n  name: brink\nspec:\n  controllerName: brink.dev/gateway-controller\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: edge\n  namespace: dep\nspec:\n  gatewayClassName: brink\n  listeners:\n  - name: http\n    port: {port}\n    protocol: HTTP\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: web\n  namespace: dep\nspec:\n  parentRefs:\n  - name: edge\n  rules:\n  - backendRefs:\n    - name: web\n      port: 80\n"
    );
    let applied = admin.run_with_stdin(&["apply", "-f", "-"], Some(&gateway));
    assert!(applied.status.success(), "{}", stderr(&applied));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let served = wait_for("the gateway to serve the deployment", || {
        http_get(addr, "/").ok().filter(|r| r.status == 200)
    });
    assert!(!served.body.is_empty());
    // One node writes the status the data plane computed; kubectl shows it.
    let mut programmed = String::new();
    for _ in 0..100 {
        programmed = admin.ok(&["-n", "dep", "get", "gateway", "edge"]);
        if row(&programmed, "edge").get(3) == Some(&"True") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        row(&programmed, "edge").get(3),
        Some(&"True"),
        "{programmed}\n{}",
        admin.ok(&["-n", "dep", "get", "gateway", "edge", "-o", "yaml"])
    );
    assert_eq!(
        row(&programmed, "edge")[1..3],
        ["brink", "127.0.0.1"],
        "{programmed}"
    );
    let accepted = admin.ok(&[
        "-n",
        "dep",
        "get",
        "httproute",
        "web",
        "-o",
        "jsonpath={.status.parents[0].conditions[?(@.type==\"Accepted\")].status} {.status.parents[0].parentRef.kind}",
    ]);
    assert_eq!(accepted, "True Gateway");
    admin.ok(&["-n", "dep", "delete", "httproute", "web"]);
    wait_for("the route to go", || {
        http_get(addr, "/").ok().filter(|r| r.status == 404)
    });
    admin.ok(&["-n", "dep", "delete", "gateway", "edge"]);
    admin.ok(&["delete", "gatewayclass", "brink"]);

    // The imperative verbs with images from a registry: create deployment names the
    // container after the image, set image rolls out the new one.
    let registry = Registry::start();
    let v1 = format!("{}:v1", registry.reference("demo/hello"));
    let v2 = format!("{}:v2", registry.reference("demo/hello"));
    push("hello", &v1);
    push("echo", &v2);
    admin.ok(&[
        "-n",
        "dep",
        "create",
        "deployment",
        "hello",
        &format!("--image={v1}"),
        "--replicas=2",
    ]);
    rolled_out(admin, "dep", "deployment/hello");
    admin.ok(&[
        "-n",
        "dep",
        "set",
        "image",
        "deployment/hello",
        &format!("hello={v2}"),
    ]);
    rolled_out(admin, "dep", "deployment/hello");
    // Once the old pods have gone, only the new image runs.
    wait_for("only v2 pods", || {
        let images = admin.ok(&[
            "-n",
            "dep",
            "get",
            "pods",
            "-l",
            "app=hello",
            "-o",
            "jsonpath={.items[*].spec.containers[0].image}",
        ]);
        let all: Vec<&str> = images.split_whitespace().collect();
        (all.len() == 2 && all.iter().all(|i| *i == v2)).then_some(())
    });
    admin.ok(&["-n", "dep", "delete", "deployment", "hello"]);

    // Deleting the Deployment takes its sets and pods.
    admin.ok(&["-n", "dep", "delete", "deployment", "web"]);
    wait_for("the deployment's pods to go", || {
        let left = admin.ok(&["-n", "dep", "get", "pods,replicasets", "-o", "name"]);
        left.trim().is_empty().then_some(())
    });
}

/// A DaemonSet puts one pod on the Ready node; Jobs run to completion (completions and
/// parallelism) or fail past their backoff limit, as kubectl wait sees them.
fn daemons_and_jobs(admin: &Kubectl<'_>, hello: &str, job: &str) {
    admin.ok(&["create", "namespace", "batch"]);
    let daemon = format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: agent\n  namespace: batch\nspec:\n  selector:\n    matchLabels:\n      app: agent\n  template:\n    metadata:\n      labels:\n        app: agent\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: agent\n        image: {hello}\n"
    );
    let applied = admin.run_with_stdin(&["apply", "-f", "-"], Some(&daemon));
    assert!(applied.status.success(), "{}", stderr(&applied));
    rolled_out(admin, "batch", "daemonset/agent");
    let placed = admin.ok(&[
        "-n",
        "batch",
        "get",
        "pods",
        "-l",
        "app=agent",
        "-o",
        "jsonpath={.items[*].spec.nodeName}",
    ]);
    assert_eq!(placed, "shop-7", "one pod, on the one Ready node");
    let counts = admin.ok(&[
        "-n",
        "batch",
        "get",
        "daemonset",
        "agent",
        "-o",
        "jsonpath={.status.desiredNumberScheduled} {.status.numberReady}",
    ]);
    assert_eq!(counts, "1 1");
    // A new template replaces the pod.
    admin.ok(&["-n", "batch", "rollout", "restart", "daemonset/agent"]);
    rolled_out(admin, "batch", "daemonset/agent");
    wait_for("the old daemon pod to go", || {
        let pods = admin.ok(&[
            "-n",
            "batch",
            "get",
            "pods",
            "-l",
            "app=agent",
            "-o",
            "name",
        ]);
        (pods.lines().count() == 1).then_some(())
    });
    let updated = admin.ok(&[
        "-n",
        "batch",
        "get",
        "daemonset",
        "agent",
        "-o",
        "jsonpath={.status.updatedNumberScheduled}",
    ]);
    assert_eq!(updated, "1");

    let job_yaml = |name: &str, completions: u32, parallelism: u32, limit: u32, args: &str| {
        format!(
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: {name}\n  namespace: batch\nspec:\n  completions: {completions}\n  parallelism: {parallelism}\n  backoffLimit: {limit}\n  template:\n    spec:\n      restartPolicy: Never\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: work\n        image: {job}\n        args: [{args}]\n"
        )
    };
    let both = format!(
        "{}---\n{}",
        job_yaml("count", 3, 2, 2, "\"--lines\", \"2\""),
        job_yaml("broken", 1, 1, 1, "\"--exit\", \"3\"")
    );
    let created = admin.run_with_stdin(&["create", "-f", "-"], Some(&both));
    assert!(created.status.success(), "{}", stderr(&created));
    admin.ok(&[
        "-n",
        "batch",
        "wait",
        "--for=condition=complete",
        "job/count",
        "--timeout=90s",
    ]);
    let done = admin.ok(&[
        "-n",
        "batch",
        "get",
        "job",
        "count",
        "-o",
        "jsonpath={.status.succeeded} {.status.failed}",
    ]);
    assert_eq!(done, "3 0");
    let pods = admin.ok(&[
        "-n",
        "batch",
        "get",
        "pods",
        "-l",
        "job-name=count",
        "-o",
        "name",
    ]);
    assert_eq!(pods.lines().count(), 3, "{pods}");
    // kubectl logs job/NAME finds a pod through the Job's generated selector.
    assert_eq!(
        admin.ok(&["-n", "batch", "logs", "job/count"]),
        "job line 1\njob line 2\n"
    );
    admin.ok(&[
        "-n",
        "batch",
        "wait",
        "--for=condition=failed",
        "job/broken",
        "--timeout=90s",
    ]);
    let failed = admin.ok(&[
        "-n",
        "batch",
        "get",
        "job",
        "broken",
        "-o",
        "jsonpath={.status.failed} {.status.conditions[?(@.type==\"Failed\")].reason}",
    ]);
    assert_eq!(failed, "2 BackoffLimitExceeded");
    admin.ok(&["delete", "namespace", "batch", "--wait=false"]);
}

/// `kubectl rollout status` of `target` in `ns` says it rolled out (within 120 s).
fn rolled_out(k: &Kubectl<'_>, ns: &str, target: &str) {
    let out = k.ok(&["-n", ns, "rollout", "status", target, "--timeout=120s"]);
    assert!(out.contains("successfully rolled out"), "{out}");
}

/// A joined node's flags: its own credential, host ports on loopback.
fn node_flags(kubeconfig: &Path) -> Vec<&str> {
    vec![
        "--kubeconfig",
        kubeconfig.to_str().expect("utf-8"),
        "--host-port-address",
        "127.0.0.1",
        "--crash-loop-backoff",
        "200ms",
    ]
}

/// The pods the site binds to node `shop-7` run there, report status through the API,
/// survive the agent restarting, and go when deleted; the node reads only what its
/// pods use.
fn pods_on_a_joined_node(
    admin: &Kubectl<'_>,
    as_node: &Kubectl<'_>,
    dir: &Path,
    node: NodeProcess,
) {
    let images = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(images.path(), "hello");
    let job = layout_image(images.path(), "job");
    let port = free_port();
    admin.ok(&["create", "namespace", "shop"]);
    admin.ok(&[
        "-n",
        "shop",
        "create",
        "secret",
        "generic",
        "unrelated",
        "--from-literal=k=v",
    ]);
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: hello\n  namespace: shop\nspec:\n  nodeName: shop-7\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: hello\n    image: {hello}\n    ports:\n    - containerPort: 8080\n      hostPort: {port}\n    volumeMounts:\n    - name: settings\n      mountPath: /settings\n  volumes:\n  - name: settings\n    configMap:\n      name: settings\n"
    );
    let created = admin.run_with_stdin(&["create", "-f", "-"], Some(&pod));
    assert!(created.status.success(), "{}", stderr(&created));
    let field = |name: &str, path: &str| {
        admin.ok(&[
            "-n",
            "shop",
            "get",
            "pod",
            name,
            "-o",
            &format!("jsonpath={path}"),
        ])
    };
    // Its ConfigMap is missing: the pod waits, and says why, through the API.
    let waiting = wait_for("the pod to wait for its ConfigMap", || {
        let m = field(
            "hello",
            "{.status.containerStatuses[0].state.waiting.message}",
        );
        m.contains("settings").then_some(m)
    });
    assert!(waiting.contains("shop/settings"), "{waiting}");
    // The node reads what its pods use (a missing one is NotFound, not Forbidden) and
    // nothing else.
    let missing = as_node.fails(&["-n", "shop", "get", "configmap", "settings"]);
    assert!(
        missing.contains("NotFound") || missing.contains("not found"),
        "{missing}"
    );
    let mine = as_node.ok(&[
        "get",
        "pods",
        "-A",
        "--field-selector",
        "spec.nodeName=shop-7",
        "-o",
        "name",
    ]);
    assert_eq!(mine.trim(), "pod/hello");
    for args in [
        vec!["-n", "shop", "get", "secret", "unrelated"],
        vec!["-n", "shop", "get", "pods"],
        vec![
            "get",
            "pods",
            "-A",
            "--field-selector",
            "spec.nodeName=elsewhere",
        ],
        vec!["-n", "shop", "get", "configmap", "other"],
    ] {
        let err = as_node.fails(&args);
        assert!(
            err.contains("forbidden") || err.contains("Forbidden"),
            "{args:?}: {err}"
        );
    }
    admin.ok(&[
        "-n",
        "shop",
        "create",
        "configmap",
        "settings",
        "--from-literal=greeting=hi",
    ]);
    admin.ok(&[
        "-n",
        "shop",
        "wait",
        "--for=condition=Ready",
        "pod/hello",
        "--timeout=60s",
    ]);
    let served = http_get(format!("127.0.0.1:{port}").parse().expect("addr"), "/").expect("hello");
    assert_eq!(served.status, 200);
    let wide = admin.ok(&["-n", "shop", "get", "pod", "hello", "-o", "wide"]);
    let hello_row = row(&wide, "hello");
    assert_eq!(hello_row[1..3], ["1/1", "Running"], "{wide}");
    assert!(hello_row.contains(&"shop-7"), "{wide}");
    assert_eq!(field("hello", "{.status.hostIP}"), "127.0.0.1");
    // The node says what a kubelet says, and kubectl describe shows it.
    let described = wait_for("the kubelet's Started event", || {
        let d = admin.ok(&["-n", "shop", "describe", "pod", "hello"]);
        d.contains("Started container hello").then_some(d)
    });
    assert!(described.contains("kubelet"), "{described}");
    let uid = field("hello", "{.metadata.uid}");

    // A pod no Brink node can run is refused by the API itself, saying which field; a
    // run-to-completion pod ends Succeeded.
    let unsupported = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: probes\n  namespace: shop\nspec:\n  nodeName: shop-7\n  containers:\n  - name: c\n    image: IMAGE\n    livenessProbe:\n      exec:\n        command: [\"true\"]\n".replace("IMAGE", &hello);
    let refused = admin.run_with_stdin(&["create", "-f", "-"], Some(&unsupported));
    assert!(!refused.status.success());
    let message = stderr(&refused);
    assert!(
        message.contains("livenessProbe") && message.contains("httpGet"),
        "{message}"
    );
    let run_once = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: once\n  namespace: shop\nspec:\n  nodeName: shop-7\n  restartPolicy: Never\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: once\n    image: {job}\n    args: [\"--lines\", \"2\"]\n"
    );
    admin.run_with_stdin(&["create", "-f", "-"], Some(&run_once));
    wait_for("the run-once pod to succeed", || {
        (field("once", "{.status.phase}") == "Succeeded").then_some(())
    });
    let finished = field(
        "once",
        "{.status.containerStatuses[0].state.terminated.finishedAt}",
    );
    let table = admin.ok(&["-n", "shop", "get", "pods"]);
    assert_eq!(row(&table, "once")[2], "Completed", "{table}");
    // kubectl logs goes through the API server to the node's kubelet endpoint.
    assert_eq!(
        admin.ok(&["-n", "shop", "logs", "once"]),
        "job line 1\njob line 2\n"
    );
    assert_eq!(
        admin.ok(&["-n", "shop", "logs", "once", "--tail=1"]),
        "job line 2\n"
    );
    let err = admin.fails(&["-n", "shop", "logs", "once", "-c", "nope"]);
    assert!(
        err.contains("container nope is not valid for pod once"),
        "{err}"
    );

    // The agent restarts: the running pod comes back under the same uid and restart
    // count, the finished one is not run again.
    drop(node);
    let kubeconfig = dir.join("kubeconfig");
    let node = start_node(dir, "shop-7", &node_flags(&kubeconfig));
    admin.ok(&[
        "-n",
        "shop",
        "wait",
        "--for=condition=Ready",
        "pod/hello",
        "--timeout=60s",
    ]);
    wait_for("hello to serve again", || {
        http_get(format!("127.0.0.1:{port}").parse().expect("addr"), "/")
            .ok()
            .filter(|r| r.status == 200)
    });
    assert_eq!(field("hello", "{.metadata.uid}"), uid);
    assert_eq!(
        field("hello", "{.status.containerStatuses[0].restartCount}"),
        "0"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(field("once", "{.status.phase}"), "Succeeded");
    assert_eq!(
        field(
            "once",
            "{.status.containerStatuses[0].state.terminated.finishedAt}"
        ),
        finished,
        "a finished pod does not run again"
    );

    scheduled_pods(admin, &hello, &job);
    deployments(admin, &hello);
    daemons_and_jobs(admin, &hello, &job);

    // Deleted gracefully: the node stops it, then finishes the deletion.
    admin.ok(&["-n", "shop", "delete", "pod", "hello", "--wait=false"]);
    admin.ok(&[
        "-n",
        "shop",
        "wait",
        "--for=delete",
        "pod/hello",
        "--timeout=30s",
    ]);
    wait_for("hello's port to close", || {
        http_get(format!("127.0.0.1:{port}").parse().expect("addr"), "/")
            .is_err()
            .then_some(())
    });
    // Deleting a finished pod needs no node: it goes at once.
    admin.ok(&["-n", "shop", "delete", "pod", "once"]);
    admin.ok(&[
        "-n",
        "placed",
        "delete",
        "pods",
        "--all",
        "--wait=true",
        "--timeout=60s",
    ]);
    let left = admin.ok(&["-n", "shop", "get", "pods", "-o", "name"]);
    assert_eq!(left.trim(), "", "{left}");
    drop(node);
}

/// Three nodes join one site: a Deployment spreads over them and is served by every
/// node's Gateway (each node its own pods), and when a node is killed its pods are
/// replaced on the others once its grace period and the pods' tolerations pass.
#[test]
fn three_nodes_share_a_site_and_survive_losing_one() {
    let site = Site::init(&[
        "--node-grace-period",
        "3s",
        "--node-monitor-period",
        "500ms",
        "--default-toleration-seconds",
        "2",
    ]);
    let bin = &kubectl_builds()[0];
    let admin = Kubectl {
        bin,
        config: site.kubeconfig(),
    };
    let (token, pin) = join_token(&site, &admin);
    let server = format!("https://{}", site.api);
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(images.path(), "hello");
    // Each node its own address in 127.0.0.0/8, ports, data directory and ID pool.
    let start = |i: u32| {
        let ip = format!("127.0.0.{}", i + 2);
        let dir = tmp.path().join(format!("node-{i}"));
        let child = Command::new(brink_bin())
            .args(["node", "--data-dir", dir.to_str().expect("utf-8")])
            .args([
                "--node-name",
                &format!("edge-{i}"),
                "--node-lease-renew",
                "500ms",
            ])
            .args(["--kubelet-addr", &format!("{ip}:{}", free_port())])
            .args(["--host-port-address", &ip, "--gateway-address", &ip])
            .args([
                "--id-pool-base",
                &(1_000_000 + i * 64 * 65_536).to_string(),
                "--id-pool-ranges",
                "64",
            ])
            .args([
                "--server",
                &server,
                "--token",
                &token,
                "--discovery-token-ca-cert-hash",
                &pin,
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("brink node");
        NodeProcess(child)
    };
    let nodes: Vec<NodeProcess> = (0..3).map(start).collect();
    wait_for("three Ready nodes", || {
        let table = admin.ok(&["get", "nodes"]);
        (table.lines().filter(|l| l.contains(" Ready ")).count() == 3).then_some(())
    });

    admin.ok(&["create", "namespace", "spread"]);
    let port = free_port();
    let manifest = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  namespace: spread\nspec:\n  replicas: 9\n  selector:\n    matchLabels:\n      app: web\n  template:\n    metadata:\n      labels:\n        app: web\n    spec:\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: web\n        image: {hello}\n        env:\n        - name: POD_NAME\n          valueFrom:\n            fieldRef:\n              fieldPath: metadata.name\n\
         ---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: spread\nspec:\n  selector:\n    app: web\n  ports:\n  - port: 80\n    targetPort: 8080\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata:\n  name: brink\nspec:\n  controllerName: brink.dev/gateway-controller\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: edge\n  namespace: spread\nspec:\n  gatewayClassName: brink\n  listeners:\n  - name: http\n    port: {port}\n    protocol: HTTP\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: web\n  namespace: spread\nspec:\n  parentRefs:\n  - name: edge\n  rules:\n  - backendRefs:\n    - name: web\n      port: 80\n"
    );
    let applied = admin.run_with_stdin(&["apply", "-f", "-"], Some(&manifest));
    assert!(applied.status.success(), "{}", stderr(&applied));
    rolled_out(&admin, "spread", "deployment/web");
    let per_node = |admin: &Kubectl<'_>| {
        let placed = admin.ok(&[
            "-n",
            "spread",
            "get",
            "pods",
            "-l",
            "app=web",
            "--field-selector",
            "status.phase=Running",
            "-o",
            "jsonpath={range .items[*]}{.spec.nodeName} {end}",
        ]);
        let mut counts = std::collections::BTreeMap::new();
        for node in placed.split_whitespace() {
            *counts.entry(node.to_owned()).or_insert(0) += 1;
        }
        counts
    };
    let spread = per_node(&admin);
    assert_eq!(
        spread.values().copied().collect::<Vec<_>>(),
        [3, 3, 3],
        "{spread:?}"
    );
    // The Service's EndpointSlice lists the nine pods at their nodes' addresses.
    let slice = wait_for("the service's endpoint slice", || {
        let out = admin.run(&[
            "-n",
            "spread",
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            "jsonpath={range .items[*].endpoints[*]}{.addresses[0]}={.conditions.ready} {end}",
        ]);
        let text = stdout(&out);
        (text
            .split_whitespace()
            .filter(|e| e.ends_with("=true"))
            .count()
            == 9)
            .then_some(text)
    });
    for i in 0..3 {
        assert_eq!(
            slice.matches(&format!("127.0.0.{}=true", i + 2)).count(),
            3,
            "{slice}"
        );
    }
    // Every node's Gateway serves, each with the pods on that node.
    for i in 0..3 {
        let addr: std::net::SocketAddr = format!("127.0.0.{}:{port}", i + 2).parse().expect("addr");
        let served = wait_for("a node's gateway to serve", || {
            http_get(addr, "/").ok().filter(|r| r.status == 200)
        });
        assert!(served.body.contains("web-"), "{}", served.body);
    }

    // A rolling update while a client keeps asking edge-0's gateway: every request is
    // answered 200 (new pods serve once ready, old ones stop after leaving the backends).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        let addr: std::net::SocketAddr = format!("127.0.0.2:{port}").parse().expect("addr");
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0usize, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match http_get(addr, "/") {
                    Ok(r) if r.status == 200 => ok += 1,
                    Ok(r) => failed.push(format!("{} {}", r.status, r.body.trim())),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    };
    admin.ok(&["-n", "spread", "rollout", "restart", "deployment/web"]);
    rolled_out(&admin, "spread", "deployment/web");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = client.join().expect("client");
    assert!(
        ok > 0 && failed.is_empty(),
        "{ok} answered, failed: {failed:?}"
    );

    // edge-2 dies: after its grace period it is unreachable, its pods are evicted after
    // their 2 s toleration and replaced on the other two.
    let mut nodes = nodes;
    drop(nodes.pop());
    wait_for("edge-2 to be marked unreachable", || {
        let taints = admin.ok(&[
            "get",
            "node",
            "edge-2",
            "-o",
            "jsonpath={.spec.taints[*].key}",
        ]);
        taints
            .contains("node.kubernetes.io/unreachable")
            .then_some(())
    });
    let status = admin.ok(&[
        "get",
        "node",
        "edge-2",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
    ]);
    assert_eq!(status, "Unknown");
    let healed = wait_for("nine pods running on the two live nodes", || {
        let counts = per_node(&admin);
        let live: usize = ["edge-0", "edge-1"]
            .iter()
            .filter_map(|n| counts.get(*n))
            .sum();
        (live == 9).then_some(counts)
    });
    // What was on edge-2 stays Terminating: nobody can confirm it stopped (as in
    // Kubernetes), and it no longer counts as a replica.
    let left = admin.ok(&["-n", "spread", "get", "pods", "-o", "wide"]);
    let stranded: Vec<&str> = left.lines().filter(|l| l.contains("edge-2")).collect();
    assert_eq!(
        stranded.len(),
        healed.get("edge-2").copied().unwrap_or(0),
        "{left}"
    );
    assert!(stranded.iter().all(|l| l.contains("Terminating")), "{left}");
    let evictions = admin.ok(&[
        "-n",
        "spread",
        "get",
        "events",
        "-o",
        "jsonpath={range .items[*]}{.reason} {end}",
    ]);
    assert!(evictions.contains("TaintManagerEviction"), "{evictions}");

    // kubectl drain: edge-1 is cordoned and its pods evicted; they come back on edge-0.
    let drained = admin.run(&[
        "drain",
        "edge-1",
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--timeout=90s",
    ]);
    assert!(
        drained.status.success(),
        "{}{}",
        stdout(&drained),
        stderr(&drained)
    );
    assert!(stdout(&drained).contains("drained"), "{}", stdout(&drained));
    let nodes_table = admin.ok(&["get", "nodes"]);
    assert!(
        row(&nodes_table, "edge-1").get(1) == Some(&"Ready,SchedulingDisabled"),
        "{nodes_table}"
    );
    wait_for("nine pods running on edge-0", || {
        let counts = per_node(&admin);
        (counts.get("edge-0") == Some(&9)).then_some(())
    });
    admin.ok(&["uncordon", "edge-1"]);
    let nodes_table = admin.ok(&["get", "nodes"]);
    assert!(
        row(&nodes_table, "edge-1").get(1) == Some(&"Ready"),
        "{nodes_table}"
    );
    drop(nodes);
}

/// The agent as a virtual kubelet under a ServiceAccount with exactly deploy/rbac.yaml:
/// the site enforces that RBAC (no Node authorizer helps a ServiceAccount), so a verb
/// the agent uses and the file lacks fails here.
#[test]
fn the_agent_runs_with_exactly_the_deploy_rbac() {
    let auth = tempfile::tempdir().expect("tempdir");
    let tokens = auth.path().join("tokens.csv");
    std::fs::write(
        &tokens,
        "vk-token-0123456789,system:serviceaccount:brink-system:brink-node,sa-uid,\"system:serviceaccounts,system:serviceaccounts:brink-system\"\n",
    )
    .expect("token file");
    let site = Site::init(&["--token-auth-file", tokens.to_str().expect("utf-8")]);
    let bin = &kubectl_builds()[0];
    let admin = Kubectl {
        bin,
        config: site.kubeconfig(),
    };
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for file in ["rbac.yaml", "classes.yaml"] {
        admin.ok(&["apply", "-f", deploy.join(file).to_str().expect("utf-8")]);
    }
    // A kubeconfig with the ServiceAccount's token and the site's CA.
    let admin_config = std::fs::read_to_string(site.kubeconfig()).expect("admin kubeconfig");
    let ca = admin_config
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority-data: "))
        .expect("CA data");
    let config = auth.path().join("vk.kubeconfig");
    std::fs::write(
        &config,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: site\n  cluster:\n    server: https://{}\n    certificate-authority-data: {ca}\nusers:\n- name: sa\n  user:\n    token: vk-token-0123456789\ncontexts:\n- name: sa\n  context:\n    cluster: site\n    user: sa\ncurrent-context: sa\n",
            site.api
        ),
    )
    .expect("kubeconfig");
    let node_dir = auth.path().join("vk-1");
    let _node = start_node(
        &node_dir,
        "vk-1",
        &[
            "--kubeconfig",
            config.to_str().expect("utf-8"),
            "--host-port-address",
            "127.0.0.1",
        ],
    );
    wait_for("the virtual kubelet to be Ready", || {
        let table = admin.ok(&["get", "nodes"]);
        (row(&table, "vk-1").get(1) == Some(&"Ready")).then_some(())
    });
    let images = tempfile::tempdir().expect("tempdir");
    let hello = layout_image(images.path(), "hello");
    let host_port = free_port();
    let gateway_port = free_port();
    let objects = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: default\ndata:\n  greeting: hi\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: vk-hello\n  namespace: default\n  labels:\n    app: vk\nspec:\n  runtimeClassName: brink\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: hello\n    image: {hello}\n    ports:\n    - containerPort: 8080\n      hostPort: {host_port}\n    volumeMounts:\n    - name: settings\n      mountPath: /settings\n  volumes:\n  - name: settings\n    configMap:\n      name: settings\n\
         ---\napiVersion: v1\nkind: Service\nmetadata:\n  name: vk\n  namespace: default\nspec:\n  selector:\n    app: vk\n  ports:\n  - port: 80\n    targetPort: 8080\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: vk\n  namespace: default\nspec:\n  gatewayClassName: brink\n  listeners:\n  - name: http\n    port: {gateway_port}\n    protocol: HTTP\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: vk\n  namespace: default\nspec:\n  parentRefs:\n  - name: vk\n  rules:\n  - backendRefs:\n    - name: vk\n      port: 80\n"
    );
    let applied = admin.run_with_stdin(&["apply", "-f", "-"], Some(&objects));
    assert!(applied.status.success(), "{}", stderr(&applied));
    admin.ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/vk-hello",
        "--timeout=60s",
    ]);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{gateway_port}").parse().expect("addr");
    wait_for("the gateway to serve", || {
        http_get(addr, "/").ok().filter(|r| r.status == 200)
    });
    wait_for("the gateway's status", || {
        let programmed = admin.ok(&[
            "get",
            "gateway",
            "vk",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Programmed\")].status}",
        ]);
        (programmed == "True").then_some(())
    });
    wait_for("the agent's Started event", || {
        let events = admin.ok(&[
            "get",
            "events",
            "-o",
            "jsonpath={range .items[*]}{.reason}/{.involvedObject.name} {end}",
        ]);
        events.contains("Started/vk-hello").then_some(())
    });
    admin.ok(&["delete", "pod", "vk-hello", "--wait=false"]);
    admin.ok(&["wait", "--for=delete", "pod/vk-hello", "--timeout=30s"]);
    // The ServiceAccount can do what the agent does and not more.
    let as_agent = Kubectl { bin, config };
    for args in [
        vec!["create", "deployment", "x", "--image=y"],
        vec!["delete", "node", "vk-1"],
        vec!["-n", "default", "create", "configmap", "x"],
    ] {
        let err = as_agent.fails(&args);
        assert!(
            err.contains("forbidden") || err.contains("Forbidden"),
            "{args:?}: {err}"
        );
    }
}
