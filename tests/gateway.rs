//! The Gateway API data plane, conformance-style: for each behaviour of the GATEWAY-HTTP
//! profile and the extended features Brink implements, manifests plus requests with the
//! responses the spec expects, against the real binary and `echo` pods (which report the
//! path, host, method and headers they received and their own pod name, so each check
//! knows which backend answered).
//!
//! Layout, as the upstream suite's base manifests: namespaces `gateway-conformance-infra`,
//! `-app-backend` and `-web-backend`; echo pods `infra-backend-v1..v3` (infra),
//! `app-backend-v1` and `web-backend`, each behind a Service of its name on port 8080;
//! GatewayClass `brink`; Gateway `same-namespace` (routes from its own namespace) and
//! `all-namespaces` (routes from everywhere), each with one HTTP listener.

mod common;

use common::*;
use serde_json::Value;

const INFRA: &str = "gateway-conformance-infra";
const APP: &str = "gateway-conformance-app-backend";
const WEB: &str = "gateway-conformance-web-backend";

/// A node with the base manifests running and every echo pod ready.
struct Site {
    node: Node,
    /// Port of `same-namespace`'s listener.
    same: u16,
    /// Port of `all-namespaces`'s listener.
    all: u16,
    _layout: tempfile::TempDir,
}

fn echo_pod(namespace: &str, name: &str, image: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    app: {name}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: echo\n    image: {image}\n    env:\n    - name: POD_NAME\n      valueFrom:\n        fieldRef:\n          fieldPath: metadata.name\n    - name: POD_NAMESPACE\n      valueFrom:\n        fieldRef:\n          fieldPath: metadata.namespace\n    ports:\n    - containerPort: 3000\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  selector:\n    app: {name}\n  ports:\n  - port: 8080\n    targetPort: 3000\n"
    )
}

fn gateway(name: &str, port: u16, from: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\n  namespace: {INFRA}\nspec:\n  gatewayClassName: brink\n  listeners:\n  - name: http\n    port: {port}\n    protocol: HTTP\n    allowedRoutes:\n      namespaces:\n        from: {from}\n"
    )
}

impl Site {
    fn start() -> Site {
        Site::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Site {
        let layout = tempfile::tempdir().expect("tempdir");
        let echo = layout_image(layout.path(), "echo");
        let mut args = vec!["--gateway-address", "127.0.0.1"];
        args.extend_from_slice(extra);
        let node = Node::start_with(&args);
        let (same, all) = (free_port(), free_port());
        let mut base = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {INFRA}\n  labels:\n    gateway-conformance: infra\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {APP}\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {WEB}\n  labels:\n    gateway-conformance: web-backend\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata:\n  name: brink\nspec:\n  controllerName: brink.dev/gateway-controller\n---\n{}---\n{}",
            gateway("same-namespace", same, "Same"),
            gateway("all-namespaces", all, "All"),
        );
        for (namespace, name) in [
            (INFRA, "infra-backend-v1"),
            (INFRA, "infra-backend-v2"),
            (INFRA, "infra-backend-v3"),
            (APP, "app-backend-v1"),
            (WEB, "web-backend"),
        ] {
            base.push_str("---\n");
            base.push_str(&echo_pod(namespace, name, &echo));
        }
        node.write_manifest("base.yaml", &base);
        let site = Site {
            node,
            same,
            all,
            _layout: layout,
        };
        for name in ["infra-backend-v1", "infra-backend-v2", "infra-backend-v3"] {
            site.wait_pod_ready(INFRA, name);
        }
        site.wait_pod_ready(APP, "app-backend-v1");
        site.wait_pod_ready(WEB, "web-backend");
        site.wait_gateway_programmed("same-namespace");
        site.wait_gateway_programmed("all-namespaces");
        site
    }

    fn wait_pod_ready(&self, namespace: &str, name: &str) {
        wait_for(&format!("pod {namespace}/{name} ready"), || {
            self.node
                .pods()
                .into_iter()
                .find(|p| p["metadata"]["name"] == name && p["metadata"]["namespace"] == namespace)
                .filter(|p| container_status(p)["ready"] == true)
        });
    }

    fn objects(&self, plural: &str) -> Vec<Value> {
        let r = self
            .node
            .get(&format!("/apis/gateway.networking.k8s.io/v1/{plural}"));
        let list: Value = serde_json::from_str(&r.body).expect("list JSON");
        list["items"].as_array().cloned().unwrap_or_default()
    }

    fn object(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        self.objects(plural).into_iter().find(|o| {
            o["metadata"]["name"] == name
                && (plural == "gatewayclasses" || o["metadata"]["namespace"] == namespace)
        })
    }

    fn wait_gateway_programmed(&self, name: &str) -> Value {
        wait_for(&format!("gateway {name} programmed"), || {
            self.object("gateways", INFRA, name)
                .filter(|g| condition(&g["status"]["conditions"], "Programmed")["status"] == "True")
        })
    }

    /// Waits until the route's status has a parent whose `type` condition has `status`
    /// and `reason`; returns the route.
    fn wait_route(
        &self,
        namespace: &str,
        name: &str,
        type_: &str,
        status: &str,
        reason: &str,
    ) -> Value {
        wait_for(
            &format!("route {namespace}/{name} {type_}={status} ({reason})"),
            || {
                self.object("httproutes", namespace, name).filter(|r| {
                    r["status"]["parents"].as_array().is_some_and(|parents| {
                        parents.iter().any(|p| {
                            let c = condition(&p["conditions"], type_);
                            c["status"] == status && c["reason"] == reason
                        })
                    })
                })
            },
        )
    }

    fn accepted(&self, namespace: &str, name: &str) -> Value {
        self.wait_route(namespace, name, "Accepted", "True", "Accepted")
    }
}

/// The condition of `type_` in a JSON conditions array (Null when absent).
fn condition(conditions: &Value, type_: &str) -> Value {
    conditions
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .cloned()
        .unwrap_or(Value::Null)
}

/// A listener's entry in a Gateway's status (Null when absent).
fn listener_status(gateway: &Value, name: &str) -> Value {
    gateway["status"]["listeners"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

fn route(namespace: &str, name: &str, parent: &str, spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  parentRefs:\n  - name: {parent}\n    namespace: {INFRA}\n{spec}"
    )
}

/// What the echo backend's replies say.
trait EchoReply {
    fn header(&self, name: &str) -> Option<&str>;
    /// The echo backend's report of what it received.
    fn echo(&self) -> Value;
    fn pod(&self) -> String;
}

impl EchoReply for HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn echo(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not an echo reply ({e}): {} {}", self.status, self.body))
    }

    fn pod(&self) -> String {
        self.echo()["pod"].as_str().unwrap_or_default().to_string()
    }
}

type Reply = HttpResponse;

/// One request over a fresh connection to a gateway port, with any method, Host and
/// headers.
fn send(port: u16, method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    try_send(port, method, host, path, headers)
        .unwrap_or_else(|e| panic!("{method} {host}{path}: {e}"))
}

fn try_send(
    port: u16,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Reply> {
    http_request(([127, 0, 0, 1], port).into(), method, host, path, headers)
}

fn get(port: u16, host: &str, path: &str) -> Reply {
    send(port, "GET", host, path, &[])
}

/// Waits until a request gets `status` (routes take effect asynchronously, as on any
/// implementation), then returns that reply.
fn eventually(port: u16, host: &str, path: &str, headers: &[(&str, &str)], status: u16) -> Reply {
    wait_for(&format!("{host}{path} to answer {status}"), || {
        try_send(port, "GET", host, path, headers)
            .ok()
            .filter(|r| r.status == status)
    })
}

/// Waits until `host``path` is answered by `pod`.
fn eventually_pod(port: u16, host: &str, path: &str, headers: &[(&str, &str)], pod: &str) -> Reply {
    wait_for(&format!("{host}{path} to reach {pod}"), || {
        try_send(port, "GET", host, path, headers)
            .ok()
            .filter(|r| r.status == 200 && r.pod() == pod)
    })
}

/// A request table row: (host, path, headers) → the pod that must answer (or a status).
type Case<'a> = (
    &'a str,
    &'a str,
    &'a [(&'a str, &'a str)],
    Result<&'a str, u16>,
);

fn check_table(port: u16, cases: &[Case<'_>]) {
    for (host, path, headers, expected) in cases {
        let reply = send(port, "GET", host, path, headers);
        match expected {
            Ok(pod) => {
                assert_eq!(
                    reply.status, 200,
                    "{host}{path} {headers:?}: {}",
                    reply.body
                );
                assert_eq!(
                    reply.pod(),
                    *pod,
                    "{host}{path} {headers:?} went to the wrong backend"
                );
                assert_eq!(
                    reply.echo()["path"],
                    *path,
                    "the backend sees the path unchanged"
                );
            }
            Err(status) => assert_eq!(
                reply.status, *status,
                "{host}{path} {headers:?}: {}",
                reply.body
            ),
        }
    }
}

#[test]
fn routes_match_with_the_specs_precedence() {
    let site = Site::start();
    let s = site.same;
    // HTTPRouteSimpleSameNamespace, HTTPExactPathMatching, HTTPRouteMatching,
    // HTTPRouteHeaderMatching, HTTPRouteQueryParamMatching, HTTPRouteMethodMatching,
    // path RegularExpression.
    site.node.write_manifest(
        "matching.yaml",
        &route(INFRA, "matching", "same-namespace", "  rules:\n  - matches:\n    - path: {type: Exact, value: /exact}\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n  - matches:\n    - path: {type: PathPrefix, value: /v2}\n    - headers: [{name: version, value: two}]\n    backendRefs: [{name: infra-backend-v2, port: 8080}]\n  - matches:\n    - path: {type: PathPrefix, value: /v2/deep/}\n      headers: [{name: Color, value: blue}]\n      queryParams: [{name: animal, value: whale}]\n    backendRefs: [{name: infra-backend-v3, port: 8080}]\n  - matches:\n    - path: {type: PathPrefix, value: /method}\n      method: POST\n    backendRefs: [{name: infra-backend-v3, port: 8080}]\n  - matches:\n    - path: {type: RegularExpression, value: '/re/[0-9]+'}\n    backendRefs: [{name: infra-backend-v3, port: 8080}]\n  - matches:\n    - path: {type: PathPrefix, value: /}\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n"),
    );
    site.accepted(INFRA, "matching");
    eventually_pod(s, "example.com", "/exact", &[], "infra-backend-v1");
    let v1 = Ok("infra-backend-v1");
    let v2 = Ok("infra-backend-v2");
    let v3 = Ok("infra-backend-v3");
    check_table(
        s,
        &[
            ("example.com", "/exact", &[], v1),
            ("example.com", "/exact/", &[], v1),
            ("example.com", "/v2", &[], v2),
            ("example.com", "/v2/", &[], v2),
            ("example.com", "/v2/example", &[], v2),
            ("example.com", "/v2example", &[], v1),
            ("example.com", "/other", &[("version", "two")], v2),
            ("example.com", "/other", &[("version", "Two")], v1),
            (
                "example.com",
                "/v2/deep/x?animal=whale",
                &[("color", "blue")],
                v3,
            ),
            (
                "example.com",
                "/v2/deep/x?animal=dolphin",
                &[("color", "blue")],
                v2,
            ),
            (
                "example.com",
                "/v2/deep/x?animal=whale",
                &[("color", "red")],
                v2,
            ),
            ("example.com", "/re/42", &[], v3),
            ("example.com", "/re/x42", &[], v1),
            ("example.com", "/re/42/more", &[], v1),
        ],
    );
    assert_eq!(
        send(s, "POST", "example.com", "/method", &[]).pod(),
        "infra-backend-v3"
    );
    assert_eq!(get(s, "example.com", "/method").pod(), "infra-backend-v1");

    // HTTPRouteMatchingAcrossRoutes and hostnames: the most specific hostname first,
    // then the matches' precedence across routes, then the oldest route.
    site.node.write_manifest(
        "hosts.yaml",
        &format!(
            "{}---\n{}---\n{}",
            route(INFRA, "exact-host", "same-namespace", "  hostnames: [a.example.org]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /only}}]\n    backendRefs: [{name: infra-backend-v2, port: 8080}]\n"),
            route(INFRA, "wildcard-host", "same-namespace", "  hostnames: ['*.example.org']\n  rules:\n  - backendRefs: [{name: infra-backend-v3, port: 8080}]\n"),
            route(INFRA, "header-route", "same-namespace", "  hostnames: [b.example.org]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /}, headers: [{name: x-pick, value: one}]}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n"),
        ),
    );
    for name in ["exact-host", "wildcard-host", "header-route"] {
        site.accepted(INFRA, name);
    }
    eventually_pod(s, "a.example.org", "/only", &[], "infra-backend-v2");
    check_table(
        s,
        &[
            ("a.example.org", "/only", &[], v2),
            ("a.example.org", "/elsewhere", &[], v3),
            ("A.Example.Org:8080", "/only/x", &[], v2),
            ("deep.a.example.org", "/only", &[], v3),
            ("b.example.org", "/x", &[("x-pick", "one")], v1),
            ("b.example.org", "/x", &[], v3),
            ("example.org", "/exact", &[], v1),
        ],
    );
    // The echo backend sees the Host it was asked for, and the method.
    let reply = get(s, "a.example.org:1234", "/only?x=1");
    assert_eq!(reply.echo()["host"], "a.example.org:1234");
    assert_eq!(reply.echo()["path"], "/only?x=1");
    assert_eq!(reply.echo()["method"], "GET");

    // Nothing matches: 404, on a host no route covers of the other gateway too.
    site.node.write_manifest(
        "narrow.yaml",
        &route(INFRA, "narrow", "all-namespaces", "  hostnames: [narrow.example.net]\n  rules:\n  - matches: [{path: {type: Exact, value: /one}}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n"),
    );
    site.accepted(INFRA, "narrow");
    eventually_pod(
        site.all,
        "narrow.example.net",
        "/one",
        &[],
        "infra-backend-v1",
    );
    assert_eq!(get(site.all, "narrow.example.net", "/two").status, 404);
    assert_eq!(get(site.all, "other.example.net", "/one").status, 404);
    assert!(site.node.metric("brink_gateway_not_found_total") >= 2);
}

#[test]
fn status_reports_attachment_and_references_with_the_specs_reasons() {
    let site = Site::start();
    // GatewayClass and Gateway status.
    let class = site.object("gatewayclasses", "", "brink").expect("class");
    assert_eq!(
        condition(&class["status"]["conditions"], "Accepted")["status"],
        "True"
    );
    assert_eq!(
        condition(&class["status"]["conditions"], "SupportedVersion")["status"],
        "True"
    );
    let gw = site.wait_gateway_programmed("same-namespace");
    assert_eq!(
        condition(&gw["status"]["conditions"], "Accepted")["reason"],
        "Accepted"
    );
    assert_eq!(gw["status"]["addresses"][0]["value"], "127.0.0.1");
    let listener = &gw["status"]["listeners"][0];
    for (type_, status) in [
        ("Accepted", "True"),
        ("ResolvedRefs", "True"),
        ("Conflicted", "False"),
        ("Programmed", "True"),
    ] {
        assert_eq!(
            condition(&listener["conditions"], type_)["status"],
            status,
            "{type_}: {listener}"
        );
    }
    assert_eq!(listener["supportedKinds"][0]["kind"], "HTTPRoute");
    assert_eq!(listener["attachedRoutes"], 0);

    // HTTPRouteCrossNamespace: all-namespaces takes a route from web-backend;
    // same-namespace refuses it (NotAllowedByListeners).
    site.node.write_manifest(
        "cross.yaml",
        &format!(
            "{}---\n{}",
            route(
                WEB,
                "cross-ns",
                "all-namespaces",
                "  rules:\n  - backendRefs: [{name: web-backend, port: 8080}]\n"
            ),
            route(
                WEB,
                "not-allowed",
                "same-namespace",
                "  rules:\n  - backendRefs: [{name: web-backend, port: 8080}]\n"
            ),
        ),
    );
    let r = site.accepted(WEB, "cross-ns");
    assert_eq!(
        r["status"]["parents"][0]["controllerName"],
        "brink.dev/gateway-controller"
    );
    assert_eq!(
        r["status"]["parents"][0]["parentRef"]["name"],
        "all-namespaces"
    );
    // Group and kind as the CRD defaults them, though the file names neither.
    assert_eq!(
        r["status"]["parents"][0]["parentRef"]["group"],
        "gateway.networking.k8s.io"
    );
    assert_eq!(r["status"]["parents"][0]["parentRef"]["kind"], "Gateway");
    eventually_pod(site.all, "x", "/", &[], "web-backend");
    site.wait_route(
        WEB,
        "not-allowed",
        "Accepted",
        "False",
        "NotAllowedByListeners",
    );
    let gw = wait_for("attachedRoutes 1", || {
        site.object("gateways", INFRA, "all-namespaces")
            .filter(|g| g["status"]["listeners"][0]["attachedRoutes"] == 1)
    });
    assert_eq!(gw["status"]["listeners"][0]["name"], "http");

    // Invalid references: unknown kind, missing Service, cross-namespace without a
    // ReferenceGrant: ResolvedRefs=False with the reason, and 500 for their requests.
    site.node.write_manifest(
        "invalid.yaml",
        &format!(
            "{}---\n{}---\n{}",
            route(INFRA, "unknown-kind", "same-namespace", "  hostnames: [kind.example]\n  rules:\n  - backendRefs: [{group: unknown.example, kind: Widget, name: w, port: 8080}]\n"),
            route(INFRA, "missing", "same-namespace", "  hostnames: [missing.example]\n  rules:\n  - backendRefs: [{name: no-such-service, port: 8080}]\n"),
            route(INFRA, "cross-backend", "same-namespace", "  hostnames: [cross.example]\n  rules:\n  - backendRefs: [{name: app-backend-v1, namespace: gateway-conformance-app-backend, port: 8080}]\n"),
        ),
    );
    for (name, reason, host) in [
        ("unknown-kind", "InvalidKind", "kind.example"),
        ("missing", "BackendNotFound", "missing.example"),
        ("cross-backend", "RefNotPermitted", "cross.example"),
    ] {
        let r = site.wait_route(INFRA, name, "ResolvedRefs", "False", reason);
        assert_eq!(
            condition(&r["status"]["parents"][0]["conditions"], "Accepted")["status"],
            "True"
        );
        eventually(site.same, host, "/", &[], 500);
    }
    // HTTPRouteReferenceGrant: the grant makes the cross-namespace backend resolve.
    site.node.write_manifest(
        "grant.yaml",
        &format!("apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata:\n  name: allow-infra\n  namespace: {APP}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: {INFRA}}}]\n  to: [{{group: '', kind: Service, name: app-backend-v1}}]\n"),
    );
    site.wait_route(
        INFRA,
        "cross-backend",
        "ResolvedRefs",
        "True",
        "ResolvedRefs",
    );
    eventually_pod(site.same, "cross.example", "/", &[], "app-backend-v1");

    // Parent refs that match nothing: a sectionName or port the Gateway lacks.
    site.node.write_manifest(
        "parents.yaml",
        &format!(
            "{}---\n{}",
            route(
                INFRA,
                "bad-section",
                "same-namespace",
                "  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n"
            )
            .replace(
                "    namespace: gateway-conformance-infra\n",
                "    namespace: gateway-conformance-infra\n    sectionName: nope\n"
            ),
            route(
                INFRA,
                "bad-port",
                "same-namespace",
                "  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n"
            )
            .replace(
                "    namespace: gateway-conformance-infra\n",
                "    namespace: gateway-conformance-infra\n    port: 1\n"
            ),
        ),
    );
    site.wait_route(
        INFRA,
        "bad-section",
        "Accepted",
        "False",
        "NoMatchingParent",
    );
    site.wait_route(INFRA, "bad-port", "Accepted", "False", "NoMatchingParent");

    // An invalid value (unknown match type, bad regex, incompatible filters) marks the
    // route Accepted=False UnsupportedValue and leaves its file's other objects alone.
    site.node.write_manifest(
        "values.yaml",
        &format!(
            "{}---\n{}---\n{}",
            route(INFRA, "bad-enum", "same-namespace", "  rules:\n  - matches: [{path: {type: Fuzzy, value: /x}}]\n"),
            route(INFRA, "bad-regex", "same-namespace", "  rules:\n  - matches: [{path: {type: RegularExpression, value: '(['}}]\n"),
            route(INFRA, "good-neighbour", "same-namespace", "  hostnames: [neighbour.example]\n  rules:\n  - backendRefs: [{name: infra-backend-v2, port: 8080}]\n"),
        ),
    );
    let r = site.wait_route(INFRA, "bad-enum", "Accepted", "False", "UnsupportedValue");
    let message =
        condition(&r["status"]["parents"][0]["conditions"], "Accepted")["message"].to_string();
    assert!(message.contains("Fuzzy"), "{message}");
    site.wait_route(INFRA, "bad-regex", "Accepted", "False", "UnsupportedValue");
    site.accepted(INFRA, "good-neighbour");
    eventually_pod(site.same, "neighbour.example", "/", &[], "infra-backend-v2");

    // HTTPRouteObservedGenerationBump: an edit bumps generation and observedGeneration,
    // and the new rule takes effect.
    let before = site.accepted(INFRA, "good-neighbour");
    assert_eq!(before["metadata"]["generation"], 1);
    site.node.write_manifest(
        "values.yaml",
        &route(INFRA, "good-neighbour", "same-namespace", "  hostnames: [neighbour.example]\n  rules:\n  - backendRefs: [{name: infra-backend-v3, port: 8080}]\n"),
    );
    let after = wait_for("generation 2 observed", || {
        site.object("httproutes", INFRA, "good-neighbour").filter(|r| {
            condition(&r["status"]["parents"][0]["conditions"], "Accepted")["observedGeneration"] == 2
        })
    });
    assert_eq!(after["metadata"]["generation"], 2);
    assert_eq!(
        after["metadata"]["creationTimestamp"],
        before["metadata"]["creationTimestamp"]
    );
    eventually_pod(site.same, "neighbour.example", "/", &[], "infra-backend-v3");
    assert!(
        site.object("httproutes", INFRA, "bad-enum").is_none(),
        "removed with its file's edit"
    );

    // brink get prints what kubectl prints for these kinds.
    let table = stdout(&site.node.brink(&["get", "gateways", "-n", INFRA]));
    assert!(
        has_row(&table, "same-namespace", "brink   127.0.0.1   True"),
        "{table}"
    );
    let table = stdout(&site.node.brink(&["get", "httproutes", "-n", INFRA]));
    assert!(
        has_row(&table, "good-neighbour", "[neighbour.example]"),
        "{table}"
    );
    let yaml =
        stdout(
            &site
                .node
                .brink(&["get", "httproutes", "not-allowed", "-n", WEB, "-o", "yaml"]),
        );
    assert!(yaml.contains("reason: NotAllowedByListeners"), "{yaml}");
    assert!(yaml.contains("kind: HTTPRoute"), "{yaml}");
    let err = stderr(&site.node.brink(&["get", "gateways", "nope", "-n", INFRA]));
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn listeners_conflict_select_namespaces_and_follow_gateway_edits() {
    let site = Site::start();
    let port = free_port();
    // Two listeners on one port with the same hostname, and a protocol clash on another
    // port: every party is Conflicted, none serves.
    let clash = free_port();
    site.node.write_manifest(
        "conflicts.yaml",
        &format!("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: conflicted\n  namespace: {INFRA}\nspec:\n  gatewayClassName: brink\n  listeners:\n  - {{name: one, port: {port}, protocol: HTTP, hostname: dup.example}}\n  - {{name: two, port: {port}, protocol: HTTP, hostname: dup.example}}\n  - {{name: three, port: {port}, protocol: HTTP, hostname: fine.example, allowedRoutes: {{namespaces: {{from: Selector, selector: {{matchLabels: {{gateway-conformance: web-backend}}}}}}}}}}\n  - {{name: four, port: {clash}, protocol: HTTP}}\n  - {{name: five, port: {clash}, protocol: HTTPS, tls: {{certificateRefs: [{{name: nothing}}]}}}}\n  - {{name: six, port: {}, protocol: UDP}}\n", free_port()),
    );
    let gw = wait_for("conflicted gateway status", || {
        site.object("gateways", INFRA, "conflicted")
            .filter(|g| g["status"]["listeners"].is_array())
    });
    let listener = |name: &str| listener_status(&gw, name);
    for name in ["one", "two"] {
        let c = condition(&listener(name)["conditions"], "Conflicted");
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some("True"), Some("HostnameConflict")),
            "{name}"
        );
    }
    for name in ["four", "five"] {
        let c = condition(&listener(name)["conditions"], "Conflicted");
        assert_eq!(c["reason"], "ProtocolConflict", "{name}");
    }
    assert_eq!(
        condition(&listener("six")["conditions"], "Accepted")["reason"],
        "UnsupportedProtocol"
    );
    assert_eq!(
        condition(&listener("three")["conditions"], "Programmed")["status"],
        "True"
    );
    assert_eq!(
        condition(&gw["status"]["conditions"], "Accepted")["reason"],
        "ListenersNotValid"
    );

    // allowedRoutes Selector: web-backend's namespace is labelled, app-backend's is not.
    site.node.write_manifest(
        "selected.yaml",
        &format!(
            "{}---\n{}",
            route(WEB, "selected", "conflicted", "  hostnames: [fine.example]\n  rules:\n  - backendRefs: [{name: web-backend, port: 8080}]\n"),
            route(APP, "unselected", "conflicted", "  hostnames: [fine.example]\n  rules:\n  - backendRefs: [{name: app-backend-v1, port: 8080}]\n"),
        ),
    );
    site.accepted(WEB, "selected");
    site.wait_route(
        APP,
        "unselected",
        "Accepted",
        "False",
        "NotAllowedByListeners",
    );
    eventually_pod(port, "fine.example", "/", &[], "web-backend");
    assert_eq!(
        get(port, "dup.example", "/").status,
        404,
        "a conflicted listener serves nothing"
    );

    // HTTPRouteListenerHostnameMatching / NoMatchingListenerHostname.
    site.node.write_manifest(
        "hostless.yaml",
        &route(WEB, "wrong-host", "conflicted", "  hostnames: [other.example]\n  rules:\n  - backendRefs: [{name: web-backend, port: 8080}]\n").replace("    namespace: gateway-conformance-infra\n", "    namespace: gateway-conformance-infra\n    sectionName: three\n"),
    );
    site.wait_route(
        WEB,
        "wrong-host",
        "Accepted",
        "False",
        "NoMatchingListenerHostname",
    );

    // GatewayModifyListeners: a new listener opens its port, a removed one closes it.
    let added = free_port();
    site.node.write_manifest(
        "modify.yaml",
        &format!(
            "{}---\n{}",
            gateway("modify", added, "Same"),
            route(
                INFRA,
                "on-modify",
                "modify",
                "  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n"
            )
        ),
    );
    site.accepted(INFRA, "on-modify");
    eventually_pod(added, "m.example", "/", &[], "infra-backend-v1");
    site.node.write_manifest(
        "modify.yaml",
        &route(
            INFRA,
            "on-modify",
            "modify",
            "  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n",
        ),
    );
    wait_for("the removed gateway's port to close", || {
        try_send(added, "GET", "m.example", "/", &[])
            .is_err()
            .then_some(())
    });
    let r = wait_for("route without its gateway", || {
        site.object("httproutes", INFRA, "on-modify")
            .filter(|r| r["status"]["parents"] == serde_json::json!([]))
    });
    assert_eq!(r["metadata"]["name"], "on-modify");
}

#[test]
fn filters_rewrite_redirect_modify_and_mirror() {
    let site = Site::start();
    let s = site.same;
    site.node.write_manifest(
        "filters.yaml",
        &route(INFRA, "filters", "same-namespace", concat!(
            "  hostnames: [filters.example]\n  rules:\n",
            // HTTPRouteRequestHeaderModifier (rule level) and ResponseHeaderModifier.
            "  - matches: [{path: {type: PathPrefix, value: /headers}}]\n",
            "    filters:\n",
            "    - type: RequestHeaderModifier\n      requestHeaderModifier:\n        set: [{name: X-Header-Set, value: set-overwrites}]\n        add: [{name: X-Header-Add, value: added}]\n        remove: [X-Header-Remove]\n",
            "    - type: ResponseHeaderModifier\n      responseHeaderModifier:\n        set: [{name: X-Response-Set, value: resp}]\n        remove: [content-type]\n",
            "    backendRefs:\n    - name: infra-backend-v1\n      port: 8080\n      filters:\n      - type: RequestHeaderModifier\n        requestHeaderModifier:\n          add: [{name: X-Backend, value: v1}]\n",
            // RequestRedirect: scheme, hostname, port, path prefix and full, status codes.
            "  - matches: [{path: {type: PathPrefix, value: /redirect-prefix}}]\n",
            "    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /replacement}, statusCode: 301}}]\n",
            "  - matches: [{path: {type: PathPrefix, value: /redirect-full}}]\n",
            "    filters: [{type: RequestRedirect, requestRedirect: {hostname: elsewhere.example, path: {type: ReplaceFullPath, replaceFullPath: /full}, statusCode: 308}}]\n",
            "  - matches: [{path: {type: PathPrefix, value: /redirect-https}}]\n",
            "    filters: [{type: RequestRedirect, requestRedirect: {scheme: https}}]\n",
            "  - matches: [{path: {type: PathPrefix, value: /redirect-port}}]\n",
            "    filters: [{type: RequestRedirect, requestRedirect: {port: 8443}}]\n",
            // A redirect on a backendRef answers as a rule's does.
            "  - matches: [{path: {type: PathPrefix, value: /redirect-backend}}]\n",
            "    backendRefs: [{name: infra-backend-v1, port: 8080, filters: [{type: RequestRedirect, requestRedirect: {hostname: elsewhere.example, statusCode: 301}}]}]\n",
            // URLRewrite: hostname and path prefix / full.
            "  - matches: [{path: {type: PathPrefix, value: /prefix/one}}]\n",
            "    filters: [{type: URLRewrite, urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /one}}}]\n",
            "    backendRefs: [{name: infra-backend-v2, port: 8080}]\n",
            "  - matches: [{path: {type: PathPrefix, value: /strip}}]\n",
            "    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]\n",
            "    backendRefs: [{name: infra-backend-v2, port: 8080}]\n",
            "  - matches: [{path: {type: PathPrefix, value: /full}}]\n",
            "    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /replaced}}}]\n",
            "    backendRefs: [{name: infra-backend-v2, port: 8080}]\n",
            // ExtensionRef Brink cannot resolve: 500, never a skipped filter.
            "  - matches: [{path: {type: PathPrefix, value: /extension}}]\n",
            "    filters: [{type: ExtensionRef, extensionRef: {group: example.com, kind: Magic, name: m}}]\n",
            "    backendRefs: [{name: infra-backend-v2, port: 8080}]\n",
            // RequestMirror: every request to v1 is also sent to v3.
            "  - matches: [{path: {type: PathPrefix, value: /mirror}}]\n",
            "    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: infra-backend-v3, port: 8080}}}]\n",
            "    backendRefs: [{name: infra-backend-v1, port: 8080}]\n",
            "  - matches: [{path: {type: PathPrefix, value: /mirror-half}}]\n",
            "    filters: [{type: RequestMirror, requestMirror: {percent: 50, backendRef: {name: infra-backend-v3, port: 8080}}}]\n",
            "    backendRefs: [{name: infra-backend-v1, port: 8080}]\n",
            // CORS.
            "  - matches: [{path: {type: PathPrefix, value: /cors}}]\n",
            "    filters: [{type: CORS, cors: {allowOrigins: ['https://www.foo.com', 'https://*.bar.com'], allowMethods: [GET, OPTIONS], allowHeaders: [x-header-1], exposeHeaders: [x-header-3], maxAge: 3600, allowCredentials: true}}]\n",
            "    backendRefs: [{name: infra-backend-v1, port: 8080}]\n",
            "  - matches: [{path: {type: PathPrefix, value: /cors-any}}]\n",
            "    filters: [{type: CORS, cors: {allowOrigins: ['*'], allowMethods: ['*'], allowHeaders: ['*'], allowCredentials: true}}]\n",
            "    backendRefs: [{name: infra-backend-v1, port: 8080}]\n",
        )),
    );
    site.wait_route(INFRA, "filters", "ResolvedRefs", "False", "InvalidKind");
    let h = "filters.example";
    eventually(s, h, "/headers", &[], 200);

    let reply = send(
        s,
        "GET",
        h,
        "/headers",
        &[
            ("X-Header-Set", "original"),
            ("X-Header-Remove", "gone"),
            ("X-Header-Add", "first"),
        ],
    );
    let headers = &reply.echo()["headers"];
    assert_eq!(
        headers["X-Header-Set"],
        serde_json::json!(["set-overwrites"])
    );
    assert_eq!(
        headers["X-Header-Add"],
        serde_json::json!(["first", "added"])
    );
    assert!(headers.get("X-Header-Remove").is_none(), "{headers}");
    assert_eq!(
        headers["X-Backend"],
        serde_json::json!(["v1"]),
        "backendRef filters apply"
    );
    assert_eq!(reply.header("x-response-set"), Some("resp"));
    assert_eq!(
        reply.header("content-type"),
        None,
        "response header removed"
    );

    let r = get(s, h, "/redirect-prefix/rest?q=1");
    assert_eq!(
        (r.status, r.header("location")),
        (
            301,
            Some(&*format!("http://filters.example:{s}/replacement/rest?q=1"))
        )
    );
    let r = get(s, h, "/redirect-full/x");
    assert_eq!(
        (r.status, r.header("location")),
        (308, Some(&*format!("http://elsewhere.example:{s}/full")))
    );
    let r = get(s, h, "/redirect-https");
    assert_eq!(
        (r.status, r.header("location")),
        (302, Some("https://filters.example/redirect-https"))
    );
    let r = get(s, h, "/redirect-port");
    assert_eq!(
        r.header("location"),
        Some("http://filters.example:8443/redirect-port")
    );
    let r = get(s, h, "/redirect-backend/x");
    assert_eq!(
        (r.status, r.header("location")),
        (
            301,
            Some(&*format!("http://elsewhere.example:{s}/redirect-backend/x"))
        )
    );

    let e = get(s, h, "/prefix/one/two").echo();
    assert_eq!(
        (e["path"].as_str(), e["host"].as_str()),
        (Some("/one/two"), Some("rewritten.example"))
    );
    assert_eq!(get(s, h, "/strip/three").echo()["path"], "/three");
    assert_eq!(get(s, h, "/strip").echo()["path"], "/");
    assert_eq!(get(s, h, "/full/a?b=c").echo()["path"], "/replaced?b=c");

    assert_eq!(get(s, h, "/extension").status, 500);

    // The mirror gets a copy (its answer goes nowhere): v1 answers, v3 logs it.
    let reply = get(s, h, "/mirror/once");
    assert_eq!(reply.pod(), "infra-backend-v1");
    wait_for("the mirrored copy in v3's log", || {
        let logs = stdout(&site.node.brink(&["logs", "infra-backend-v3", "-n", INFRA]));
        logs.contains("echo: GET filters.example /mirror/once")
            .then_some(())
    });
    let v2_logs = stdout(&site.node.brink(&["logs", "infra-backend-v2", "-n", INFRA]));
    assert!(
        !v2_logs.contains("/mirror/once"),
        "only the mirror gets a copy: {v2_logs}"
    );
    // A 50% mirror copies about half: 200 requests, five standard deviations either side.
    for _ in 0..200 {
        assert_eq!(get(s, h, "/mirror-half").status, 200);
    }
    let mirrored = || {
        stdout(&site.node.brink(&["logs", "infra-backend-v3", "-n", INFRA]))
            .matches("/mirror-half")
            .count()
    };
    wait_for("the half mirror's copies", || {
        (mirrored() >= 65).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    let copies = mirrored();
    assert!(
        (65..=135).contains(&copies),
        "{copies} of 200 mirrored at 50%"
    );

    // CORS: a preflight from an allowed origin, one from a stranger, and a simple request.
    let pre = send(
        s,
        "OPTIONS",
        h,
        "/cors",
        &[
            ("Origin", "https://app.bar.com"),
            ("Access-Control-Request-Method", "GET"),
        ],
    );
    assert_eq!(pre.status, 200);
    assert_eq!(
        pre.header("access-control-allow-origin"),
        Some("https://app.bar.com")
    );
    assert_eq!(pre.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(
        pre.header("access-control-allow-methods"),
        Some("GET, OPTIONS")
    );
    assert_eq!(pre.header("access-control-max-age"), Some("3600"));
    let stranger = send(
        s,
        "OPTIONS",
        h,
        "/cors",
        &[
            ("Origin", "https://evil.example"),
            ("Access-Control-Request-Method", "GET"),
        ],
    );
    assert_eq!(stranger.header("access-control-allow-origin"), None);
    // Wildcards with credentials: the preflight's own method, headers and origin come
    // back, never `*`.
    let any = send(
        s,
        "OPTIONS",
        h,
        "/cors-any",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "PUT"),
            ("Access-Control-Request-Headers", "x-a, x-b"),
        ],
    );
    assert_eq!(
        any.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(any.header("access-control-allow-methods"), Some("PUT"));
    assert_eq!(any.header("access-control-allow-headers"), Some("x-a, x-b"));
    assert_eq!(any.header("access-control-allow-credentials"), Some("true"));
    let simple = send(s, "GET", h, "/cors", &[("Origin", "https://www.foo.com")]);
    assert_eq!(simple.pod(), "infra-backend-v1");
    assert_eq!(
        simple.header("access-control-allow-origin"),
        Some("https://www.foo.com")
    );
    assert_eq!(
        simple.header("access-control-expose-headers"),
        Some("x-header-3")
    );
}

#[test]
fn backends_are_weighted_and_failures_get_the_specs_codes() {
    let site = Site::start();
    let s = site.same;
    // HTTPRouteWeight: 70/30/0 over hundreds of requests.
    site.node.write_manifest(
        "weights.yaml",
        &route(INFRA, "weights", "same-namespace", "  hostnames: [weights.example]\n  rules:\n  - backendRefs:\n    - {name: infra-backend-v1, port: 8080, weight: 70}\n    - {name: infra-backend-v2, port: 8080, weight: 30}\n    - {name: infra-backend-v3, port: 8080, weight: 0}\n"),
    );
    site.accepted(INFRA, "weights");
    eventually(s, "weights.example", "/", &[], 200);
    let total = 500;
    let mut counts = std::collections::HashMap::new();
    for _ in 0..total {
        *counts
            .entry(get(s, "weights.example", "/").pod())
            .or_insert(0) += 1;
    }
    let share = |pod: &str| f64::from(*counts.get(pod).unwrap_or(&0)) / f64::from(total);
    // Five standard deviations of a binomial(500, 0.7) are ±0.10: this fails on a
    // broken picker, not on bad luck.
    assert!((share("infra-backend-v1") - 0.7).abs() < 0.1, "{counts:?}");
    assert!((share("infra-backend-v2") - 0.3).abs() < 0.1, "{counts:?}");
    assert_eq!(
        share("infra-backend-v3"),
        0.0,
        "weight 0 gets nothing: {counts:?}"
    );

    // All weights zero, or no backendRefs at all: 500.
    site.node.write_manifest(
        "zero.yaml",
        &format!(
            "{}---\n{}",
            route(INFRA, "zero", "same-namespace", "  hostnames: [zero.example]\n  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080, weight: 0}]\n"),
            route(INFRA, "none", "same-namespace", "  hostnames: [none.example]\n  rules:\n  - matches: [{path: {value: /}}]\n"),
        ),
    );
    eventually(s, "zero.example", "/", &[], 500);
    eventually(s, "none.example", "/", &[], 500);

    // A Service whose pods are not ready (none match its selector): 503.
    site.node.write_manifest(
        "empty.yaml",
        &format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: nobody\n  namespace: {INFRA}\nspec:\n  selector: {{app: nobody}}\n  ports: [{{port: 8080}}]\n---\n{}",
            route(INFRA, "empty", "same-namespace", "  hostnames: [empty.example]\n  rules:\n  - backendRefs: [{name: nobody, port: 8080}]\n")),
    );
    site.wait_route(INFRA, "empty", "ResolvedRefs", "True", "ResolvedRefs");
    eventually(s, "empty.example", "/", &[], 503);
    // What an operator looks at when a route answers 503: the Service and its endpoints.
    let table = stdout(&site.node.brink(&["get", "endpoints", "-n", INFRA]));
    assert!(has_row(&table, "nobody", "<none>"), "{table}");
    assert!(
        has_row(&table, "infra-backend-v1", "infra-backend-v1:8080"),
        "{table}"
    );
    let table = stdout(&site.node.brink(&["get", "svc", "-n", INFRA]));
    assert!(has_row(&table, "nobody", "ClusterIP"), "{table}");
    assert!(has_row(&table, "nobody", "8080/TCP"), "{table}");

    // One valid and one invalid backend (cross-namespace, no ReferenceGrant): the invalid
    // one's share of requests gets 500, the rest are served.
    site.node.write_manifest(
        "two.yaml",
        &route(INFRA, "two", "same-namespace", "  hostnames: [two.example]\n  rules:\n  - backendRefs:\n    - {name: infra-backend-v1, port: 8080}\n    - {name: app-backend-v1, namespace: gateway-conformance-app-backend, port: 8080}\n"),
    );
    site.wait_route(INFRA, "two", "ResolvedRefs", "False", "RefNotPermitted");
    let statuses: Vec<u16> = (0..60).map(|_| get(s, "two.example", "/").status).collect();
    assert!(
        statuses.contains(&500) && statuses.contains(&200),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 500 || *s == 200),
        "{statuses:?}"
    );

    // timeouts.request and timeouts.backendRequest shorter than the backend takes: 504
    // (the echo guest holds its answer for `delay` ms).
    site.node.write_manifest(
        "slow.yaml",
        &route(INFRA, "slow", "same-namespace", "  hostnames: [slow.example]\n  rules:\n  - matches: [{path: {value: /request}}]\n    timeouts: {request: 300ms}\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n  - matches: [{path: {value: /backend}}]\n    timeouts: {request: 10s, backendRequest: 300ms}\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n"),
    );
    site.accepted(INFRA, "slow");
    eventually(s, "slow.example", "/request", &[], 200);
    assert_eq!(get(s, "slow.example", "/request?delay=3000").status, 504);
    assert_eq!(get(s, "slow.example", "/backend?delay=3000").status, 504);
    assert_eq!(get(s, "slow.example", "/request?delay=10").status, 200);

    // Each outcome is counted on /metrics.
    for name in [
        "brink_gateway_invalid_backend_total",
        "brink_gateway_unavailable_total",
        "brink_gateway_timeouts_total",
    ] {
        assert!(site.node.metric(name) >= 1, "{name}");
    }
    assert!(site.node.metric("brink_gateway_requests_total") >= 500);
}

/// A self-signed certificate for `names`, as PEM (certificate, key).
fn certificate(names: &[&str]) -> (String, String) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = rcgen::generate_simple_self_signed(names).expect("certificate");
    (cert.cert.pem(), cert.signing_key.serialize_pem())
}

fn tls_secret(namespace: &str, name: &str, cert: &str, key: &str) -> String {
    let indent = |pem: &str| {
        pem.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(cert),
        indent(key)
    )
}

/// curl through the gateway: (status, HTTP version, body).
fn curl(args: &[&str]) -> (u16, String, String) {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "-",
            "-w",
            "\n%{http_code} %{http_version}",
        ])
        .args(args)
        .output()
        .expect("run curl (scripts/test installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut tail = tail.split_whitespace();
    let status = tail.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let version = tail.next().unwrap_or_default().to_string();
    (status, version, body.to_string())
}

#[test]
fn https_listeners_terminate_tls_and_speak_http2() {
    let site = Site::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = certificate(&["secure.example", "*.wild.example"]);
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert).expect("ca file");
    let ca = ca.to_str().expect("utf-8").to_string();
    let (https, refused, granted) = (free_port(), free_port(), free_port());
    site.node.write_manifest(
        "tls.yaml",
        &format!(
            "{}---\n{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: secure\n  namespace: {INFRA}\nspec:\n  gatewayClassName: brink\n  listeners:\n  - {{name: https, port: {https}, protocol: HTTPS, tls: {{certificateRefs: [{{name: site-cert}}]}}}}\n  - {{name: other-ns, port: {refused}, protocol: HTTPS, tls: {{certificateRefs: [{{name: web-cert, namespace: {WEB}}}]}}}}\n  - {{name: missing, port: {refused}, protocol: HTTPS, hostname: missing.example, tls: {{certificateRefs: [{{name: no-such-secret}}]}}}}\n---\n{}",
            tls_secret(INFRA, "site-cert", &cert, &key),
            tls_secret(WEB, "web-cert", &cert, &key),
            route(INFRA, "secure", "secure", "  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n"),
        ),
    );
    let gw = wait_for("secure gateway status", || {
        site.object("gateways", INFRA, "secure")
            .filter(|g| g["status"]["listeners"].is_array())
    });
    let listener = |name: &str| listener_status(&gw, name);
    assert_eq!(
        condition(&listener("https")["conditions"], "Programmed")["status"],
        "True"
    );
    // GatewaySecretMissingReferenceGrant and GatewayInvalidTLSConfiguration.
    let c = condition(&listener("other-ns")["conditions"], "ResolvedRefs");
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("RefNotPermitted"))
    );
    let c = condition(&listener("missing")["conditions"], "ResolvedRefs");
    assert_eq!(c["reason"], "InvalidCertificateRef");
    assert_eq!(
        condition(&listener("missing")["conditions"], "Programmed")["status"],
        "False"
    );
    site.accepted(INFRA, "secure");

    // HTTPRouteHTTPSListener: TLS terminated with the Secret's certificate, HTTP/2 by
    // ALPN, HTTP/1.1 when the client asks for it.
    let url = format!("https://secure.example:{https}/tls");
    let resolve = format!("secure.example:{https}:127.0.0.1");
    let (status, version, body) = wait_for("HTTPS through the gateway", || {
        Some(curl(&["--cacert", &ca, "--resolve", &resolve, &url])).filter(|r| r.0 == 200)
    });
    assert_eq!(version, "2", "ALPN should pick h2");
    let echo: Value = serde_json::from_str(&body).expect("echo JSON");
    assert_eq!(
        (echo["pod"].as_str(), echo["path"].as_str()),
        (Some("infra-backend-v1"), Some("/tls"))
    );
    let (status1, version1, _) = curl(&["--http1.1", "--cacert", &ca, "--resolve", &resolve, &url]);
    assert_eq!((status1, version1.as_str()), (200, "1.1"));
    assert_eq!(status, 200);
    // A wildcard name of the same certificate verifies too.
    let wild = format!("a.wild.example:{https}:127.0.0.1");
    let (status, _, _) = curl(&[
        "--cacert",
        &ca,
        "--resolve",
        &wild,
        &format!("https://a.wild.example:{https}/"),
    ]);
    assert_eq!(status, 200);

    // h2c by prior knowledge on a plain HTTP listener.
    site.node.write_manifest(
        "h2c.yaml",
        &route(INFRA, "h2c", "same-namespace", "  hostnames: [h2c.example]\n  rules:\n  - backendRefs: [{name: infra-backend-v2, port: 8080}]\n"),
    );
    site.accepted(INFRA, "h2c");
    let url = format!("http://127.0.0.1:{}/h2c", site.same);
    let (status, version, body) = wait_for("h2c through the gateway", || {
        Some(curl(&[
            "--http2-prior-knowledge",
            "-H",
            "Host: h2c.example",
            &url,
        ]))
        .filter(|r| r.0 == 200)
    });
    assert_eq!((status, version.as_str()), (200, "2"));
    let echo: Value = serde_json::from_str(&body).expect("echo JSON");
    assert_eq!(echo["pod"], "infra-backend-v2");

    // GatewaySecretReferenceGrantSpecific: a grant for the Secret makes the listener
    // resolve; its Gateway's generation moves with the edit.
    let before = site.object("gateways", INFRA, "secure").expect("gateway");
    site.node.write_manifest(
        "grant.yaml",
        &format!("apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata:\n  name: cert\n  namespace: {WEB}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: Gateway, namespace: {INFRA}}}]\n  to: [{{group: '', kind: Secret, name: web-cert}}]\n"),
    );
    wait_for("the granted certificate to resolve", || {
        site.object("gateways", INFRA, "secure").filter(|g| {
            g["status"]["listeners"].as_array().is_some_and(|l| {
                l.iter().any(|l| {
                    l["name"] == "other-ns"
                        && condition(&l["conditions"], "ResolvedRefs")["status"] == "True"
                })
            })
        })
    });
    assert_eq!(before["metadata"]["generation"], 1);
    let text = std::fs::read_to_string(site.node.manifests.join("tls.yaml")).expect("manifest");
    site.node.write_manifest(
        "tls.yaml",
        &text.replace(
            "name: missing, port",
            &format!("name: added, port: {granted}, protocol: HTTP}}\n  - {{name: missing, port"),
        ),
    );
    let after = wait_for("the Gateway's generation 2 observed", || {
        site.object("gateways", INFRA, "secure").filter(|g| {
            condition(&g["status"]["conditions"], "Accepted")["observedGeneration"] == 2
        })
    });
    assert_eq!(after["metadata"]["generation"], 2);
}

#[test]
fn route_edits_under_load_drop_no_request() {
    let site = Site::start();
    let s = site.same;
    let spec = |backend: &str| {
        format!(
            "  hostnames: [live.example]\n  rules:\n  - backendRefs: [{{name: {backend}, port: 8080}}]\n"
        )
    };
    site.node.write_manifest(
        "live.yaml",
        &route(INFRA, "live", "same-namespace", &spec("infra-backend-v1")),
    );
    site.accepted(INFRA, "live");
    eventually_pod(s, "live.example", "/", &[], "infra-backend-v1");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeMap::new();
            let mut failures = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match try_send(s, "GET", "live.example", "/", &[]) {
                    Ok(r) if r.status == 200 => *seen.entry(r.pod()).or_insert(0) += 1,
                    Ok(r) => failures.push(format!("{} {}", r.status, r.body)),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (seen, failures)
        })
    };
    // Flip the route's backend back and forth, and open and close another Gateway's port
    // beside it, while requests keep coming.
    for i in 0..6 {
        let backend = if i % 2 == 0 {
            "infra-backend-v2"
        } else {
            "infra-backend-v1"
        };
        site.node.write_manifest(
            "live.yaml",
            &route(INFRA, "live", "same-namespace", &spec(backend)),
        );
        eventually_pod(s, "live.example", "/", &[], backend);
        if i % 2 == 0 {
            site.node
                .write_manifest("extra.yaml", &gateway("extra", free_port(), "Same"));
        } else {
            site.node.remove_manifest("extra.yaml");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (seen, failures) = load.join().expect("load thread");
    assert!(
        failures.is_empty(),
        "requests failed during edits: {failures:?}"
    );
    assert!(
        seen.len() == 2 && seen.values().sum::<u32>() > 20,
        "{seen:?}"
    );
}

#[test]
fn route_kinds_and_reference_grant_scope() {
    let site = Site::start();
    // GatewayInvalidRouteKind and HTTPRouteDisallowedKind: a listener that allows only
    // kinds Brink does not serve resolves no kinds and attaches no HTTPRoute.
    let (port, grpc_only) = (free_port(), free_port());
    site.node.write_manifest(
        "kinds.yaml",
        &format!("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: kinds\n  namespace: {INFRA}\nspec:\n  gatewayClassName: brink\n  listeners:\n  - {{name: invalid, port: {port}, protocol: HTTP, hostname: invalid.example, allowedRoutes: {{kinds: [{{kind: FooRoute}}]}}}}\n  - {{name: grpc, port: {grpc_only}, protocol: HTTP, allowedRoutes: {{kinds: [{{kind: GRPCRoute}}]}}}}\n  - {{name: mixed, port: {port}, protocol: HTTP, hostname: mixed.example, allowedRoutes: {{kinds: [{{kind: HTTPRoute}}, {{kind: FooRoute}}]}}}}\n---\n{}",
            route(INFRA, "to-grpc-only", "kinds", "  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n").replace("    namespace: gateway-conformance-infra\n", "    namespace: gateway-conformance-infra\n    sectionName: grpc\n")),
    );
    let gw = wait_for("kinds gateway status", || {
        site.object("gateways", INFRA, "kinds")
            .filter(|g| g["status"]["listeners"].is_array())
    });
    let listener = |name: &str| listener_status(&gw, name);
    let invalid = listener("invalid");
    assert_eq!(
        condition(&invalid["conditions"], "ResolvedRefs")["reason"],
        "InvalidRouteKinds"
    );
    assert_eq!(invalid["supportedKinds"], serde_json::json!([]));
    let mixed = listener("mixed");
    assert_eq!(
        condition(&mixed["conditions"], "ResolvedRefs")["reason"],
        "InvalidRouteKinds"
    );
    assert_eq!(mixed["supportedKinds"][0]["kind"], "HTTPRoute");
    site.wait_route(
        INFRA,
        "to-grpc-only",
        "Accepted",
        "False",
        "NotAllowedByListeners",
    );

    // HTTPRouteInvalidReferenceGrant: a grant in the wrong namespace allows nothing;
    // GatewaySecretReferenceGrantAllInNamespace's route twin: a grant without a name
    // allows every Service of its namespace.
    site.node.write_manifest(
        "grants.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata:\n  name: misplaced\n  namespace: {INFRA}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: {INFRA}}}]\n  to: [{{group: '', kind: Service}}]\n---\n{}",
            route(INFRA, "wrong-grant", "same-namespace", "  hostnames: [grant.example]\n  rules:\n  - backendRefs: [{name: web-backend, namespace: gateway-conformance-web-backend, port: 8080}]\n"),
        ),
    );
    site.wait_route(
        INFRA,
        "wrong-grant",
        "ResolvedRefs",
        "False",
        "RefNotPermitted",
    );
    eventually(site.same, "grant.example", "/", &[], 500);
    site.node.write_manifest(
        "grants2.yaml",
        &format!("apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata:\n  name: all-services\n  namespace: {WEB}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: {INFRA}}}]\n  to: [{{group: '', kind: Service}}]\n"),
    );
    site.wait_route(INFRA, "wrong-grant", "ResolvedRefs", "True", "ResolvedRefs");
    eventually_pod(site.same, "grant.example", "/", &[], "web-backend");

    // GatewayClassObservedGenerationBump: an edit of the class shows in its conditions.
    let base = std::fs::read_to_string(site.node.manifests.join("base.yaml")).expect("base");
    site.node.write_manifest(
        "base.yaml",
        &base.replace(
            "  controllerName: brink.dev/gateway-controller\n",
            "  controllerName: brink.dev/gateway-controller\n  description: edited\n",
        ),
    );
    let class = wait_for("class generation 2 observed", || {
        site.object("gatewayclasses", "", "brink").filter(|c| {
            condition(&c["status"]["conditions"], "Accepted")["observedGeneration"] == 2
        })
    });
    assert_eq!(class["metadata"]["generation"], 2);
    // A class of another controller gets no status from this node, and its Gateways
    // are left alone.
    site.node.write_manifest(
        "foreign.yaml",
        &format!("apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata:\n  name: foreign\nspec:\n  controllerName: example.com/other\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: foreign\n  namespace: {INFRA}\nspec:\n  gatewayClassName: foreign\n  listeners: [{{name: http, port: {}, protocol: HTTP}}]\n", free_port()),
    );
    let foreign = wait_for("the foreign gateway listed", || {
        site.object("gateways", INFRA, "foreign")
    });
    assert!(
        foreign.get("status").is_none_or(Value::is_null),
        "{foreign}"
    );
    let class = site
        .object("gatewayclasses", "", "foreign")
        .expect("foreign class");
    assert!(class.get("status").is_none_or(Value::is_null), "{class}");
}

#[test]
fn garbage_requests_are_refused_and_change_nothing() {
    let site = Site::start();
    let s = site.same;
    site.node.write_manifest(
        "garbage.yaml",
        &route(INFRA, "garbage", "same-namespace", "  rules:\n  - matches: [{path: {type: PathPrefix, value: /ok}, queryParams: [{name: q, value: 'a b'}]}]\n    backendRefs: [{name: infra-backend-v1, port: 8080}]\n"),
    );
    site.accepted(INFRA, "garbage");
    eventually(s, "x", "/ok?q=a%20b", &[], 200);
    // Bytes that are not HTTP, a request line with no version, a header without a
    // colon: each gets a 400 or a closed connection, never a crash.
    for raw in [
        &b"\x16\x03\x01\x00\xa5garbage\r\n\r\n"[..],
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ] {
        use std::io::{Read as _, Write as _};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", s)).expect("connect");
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .expect("timeout");
        let _ = stream.write_all(raw);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty()
                || text.starts_with("HTTP/1.1 400")
                || text.starts_with("HTTP/1.1 404"),
            "{raw:?} → {text}"
        );
    }
    // Odd but legal requests: bad percent escapes, a host with a port and a trailing
    // dot, a path that climbs: matched or not, as the rules say.
    assert_eq!(get(s, "x", "/ok?q=%zz").status, 404);
    assert_eq!(get(s, "X.:99", "/ok?q=a+b").pod(), "infra-backend-v1");
    assert_eq!(get(s, "x", "/../ok?q=a%20b").status, 404);
    assert_eq!(get(s, "x", "/elsewhere").status, 404);
    // A huge header block is refused by the server, and the node goes on.
    let big = "v".repeat(200_000);
    let reply = try_send(s, "GET", "x", "/ok?q=a%20b", &[("x-big", &big)]);
    assert!(
        reply.is_err()
            || reply
                .as_ref()
                .is_ok_and(|r| r.status == 431 || r.status == 400)
    );
    assert_eq!(get(s, "x", "/ok?q=a%20b").pod(), "infra-backend-v1");
}

#[test]
fn route_age_decides_ties_and_survives_a_restart() {
    let mut site = Site::start();
    let s = site.same;
    let rule = |backend: &str| {
        format!(
            "  hostnames: [tie.example]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /tie}}}}]\n    backendRefs: [{{name: {backend}, port: 8080}}]\n"
        )
    };
    // zeta first, alpha later: the same match, so the older route wins although alpha
    // sorts first by name.
    site.node.write_manifest(
        "zeta.yaml",
        &route(INFRA, "zeta", "same-namespace", &rule("infra-backend-v2")),
    );
    let zeta = site.accepted(INFRA, "zeta");
    eventually_pod(s, "tie.example", "/tie", &[], "infra-backend-v2");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    site.node.write_manifest(
        "alpha.yaml",
        &route(INFRA, "alpha", "same-namespace", &rule("infra-backend-v3")),
    );
    site.accepted(INFRA, "alpha");
    for _ in 0..20 {
        assert_eq!(get(s, "tie.example", "/tie").pod(), "infra-backend-v2");
    }
    // After a restart the ages come back from the data directory, so the order holds.
    site.node.restart();
    site.wait_pod_ready(INFRA, "infra-backend-v2");
    site.wait_gateway_programmed("same-namespace");
    let again = site.accepted(INFRA, "zeta");
    assert_eq!(
        again["metadata"]["creationTimestamp"],
        zeta["metadata"]["creationTimestamp"]
    );
    eventually_pod(s, "tie.example", "/tie", &[], "infra-backend-v2");
    for _ in 0..20 {
        assert_eq!(get(s, "tie.example", "/tie").pod(), "infra-backend-v2");
    }
    // Removing the older route hands the path to the younger one.
    site.node.remove_manifest("zeta.yaml");
    eventually_pod(s, "tie.example", "/tie", &[], "infra-backend-v3");
}

#[test]
fn a_port_in_use_is_reported_and_retried_until_it_opens() {
    let site = Site::start();
    let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind");
    let port = taken.local_addr().expect("addr").port();
    site.node.write_manifest(
        "busy.yaml",
        &format!(
            "{}---\n{}",
            gateway("busy", port, "Same"),
            route(
                INFRA,
                "busy",
                "busy",
                "  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n"
            )
        ),
    );
    let gw = wait_for("busy gateway status", || {
        site.object("gateways", INFRA, "busy")
            .filter(|g| g["status"]["listeners"].is_array())
    });
    let listener = listener_status(&gw, "http");
    let accepted = condition(&listener["conditions"], "Accepted");
    assert_eq!(
        (accepted["status"].as_str(), accepted["reason"].as_str()),
        (Some("False"), Some("PortUnavailable"))
    );
    assert_eq!(
        condition(&gw["status"]["conditions"], "Programmed")["reason"],
        "NoResources"
    );
    // The port is freed; the node tries again on its own (--gateway-port-retry), with no
    // object changing.
    drop(taken);
    site.wait_gateway_programmed("busy");
    eventually_pod(port, "any.example", "/", &[], "infra-backend-v1");
}

#[test]
fn listener_hostnames_pick_listeners_and_certificates() {
    let site = Site::start();
    // HTTPRouteListenerHostnameMatching: four listeners on one port, each with its route.
    let port = free_port();
    let listeners = [
        ("listener-1", "bar.com", "infra-backend-v1"),
        ("listener-2", "foo.bar.com", "infra-backend-v2"),
        ("listener-3", "*.bar.com", "infra-backend-v3"),
        ("listener-4", "*.foo.com", "app-backend-v1"),
    ];
    let mut text = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: hostnames\n  namespace: {INFRA}\nspec:\n  gatewayClassName: brink\n  listeners:\n"
    );
    for (name, host, _) in listeners {
        text.push_str(&format!("  - {{name: {name}, port: {port}, protocol: HTTP, hostname: '{host}', allowedRoutes: {{namespaces: {{from: All}}}}}}\n"));
    }
    for (name, _, backend) in listeners {
        let namespace = if backend.starts_with("app") {
            APP
        } else {
            INFRA
        };
        text.push_str("---\n");
        text.push_str(
            &route(
                namespace,
                &format!("route-{name}"),
                "hostnames",
                &format!("  rules:\n  - backendRefs: [{{name: {backend}, port: 8080}}]\n"),
            )
            .replace(
                "    namespace: gateway-conformance-infra\n",
                &format!("    namespace: gateway-conformance-infra\n    sectionName: {name}\n"),
            ),
        );
    }
    site.node.write_manifest("hostnames.yaml", &text);
    for (name, _, backend) in listeners {
        let namespace = if backend.starts_with("app") {
            APP
        } else {
            INFRA
        };
        site.accepted(namespace, &format!("route-{name}"));
    }
    eventually_pod(port, "bar.com", "/", &[], "infra-backend-v1");
    check_table(
        port,
        &[
            ("bar.com", "/", &[], Ok("infra-backend-v1")),
            ("foo.bar.com", "/", &[], Ok("infra-backend-v2")),
            ("baz.bar.com", "/", &[], Ok("infra-backend-v3")),
            ("boo.bar.com", "/", &[], Ok("infra-backend-v3")),
            (
                "multiple.prefixes.bar.com",
                "/",
                &[],
                Ok("infra-backend-v3"),
            ),
            ("foo.foo.com", "/", &[], Ok("app-backend-v1")),
            ("no.matching.host", "/", &[], Err(404)),
            ("foo.com", "/", &[], Err(404)),
        ],
    );
    let gw = site
        .object("gateways", INFRA, "hostnames")
        .expect("gateway");
    for (name, _, _) in listeners {
        assert_eq!(listener_status(&gw, name)["attachedRoutes"], 1, "{name}");
    }

    // Two HTTPS listeners on one port with their own certificates: SNI picks each; a
    // certificate that is not PEM, a grant for another Secret, and a grant for every
    // Secret of a namespace.
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_a, key_a) = certificate(&["a.example"]);
    let (cert_b, key_b) = certificate(&["b.example"]);
    let (ca_a, ca_b) = (dir.path().join("a.pem"), dir.path().join("b.pem"));
    std::fs::write(&ca_a, &cert_a).expect("ca a");
    std::fs::write(&ca_b, &cert_b).expect("ca b");
    let (https, other) = (free_port(), free_port());
    site.node.write_manifest(
        "sni.yaml",
        &format!(
            "{}---\n{}---\n{}---\n{}---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: garbled\n  namespace: {INFRA}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: not a certificate\n  tls.key: not a key\n---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata:\n  name: other-secret-only\n  namespace: {WEB}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: Gateway, namespace: {INFRA}}}]\n  to: [{{group: '', kind: Secret, name: not-this-one}}]\n---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata:\n  name: all-secrets\n  namespace: {APP}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: Gateway, namespace: {INFRA}}}]\n  to: [{{group: '', kind: Secret}}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: sni\n  namespace: {INFRA}\nspec:\n  gatewayClassName: brink\n  listeners:\n  - {{name: a, port: {https}, protocol: HTTPS, hostname: a.example, tls: {{certificateRefs: [{{name: cert-a}}]}}}}\n  - {{name: b, port: {https}, protocol: HTTPS, hostname: b.example, tls: {{certificateRefs: [{{name: cert-b, namespace: {APP}}}]}}}}\n  - {{name: garbled, port: {other}, protocol: HTTPS, hostname: g.example, tls: {{certificateRefs: [{{name: garbled}}]}}}}\n  - {{name: wrong-grant, port: {other}, protocol: HTTPS, hostname: w.example, tls: {{certificateRefs: [{{name: web-cert, namespace: {WEB}}}]}}}}\n---\n{}",
            tls_secret(INFRA, "cert-a", &cert_a, &key_a),
            tls_secret(APP, "cert-b", &cert_b, &key_b),
            tls_secret(WEB, "web-cert", &cert_a, &key_a),
            // A key that does not belong to its certificate is refused too.
            tls_secret(INFRA, "mismatched", &cert_a, &key_b),
            route(INFRA, "sni", "sni", "  rules:\n  - backendRefs: [{name: infra-backend-v2, port: 8080}]\n"),
        ),
    );
    let gw = wait_for("sni gateway status", || {
        site.object("gateways", INFRA, "sni")
            .filter(|g| g["status"]["listeners"].is_array())
    });
    for (name, status, reason) in [
        ("a", "True", "ResolvedRefs"),
        ("b", "True", "ResolvedRefs"),
        ("garbled", "False", "InvalidCertificateRef"),
        ("wrong-grant", "False", "RefNotPermitted"),
    ] {
        let c = condition(&listener_status(&gw, name)["conditions"], "ResolvedRefs");
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some(status), Some(reason)),
            "{name}: {c}"
        );
    }
    site.accepted(INFRA, "sni");
    for (host, ca) in [("a.example", &ca_a), ("b.example", &ca_b)] {
        let resolve = format!("{host}:{https}:127.0.0.1");
        let url = format!("https://{host}:{https}/");
        let ca = ca.to_str().expect("utf-8");
        let (status, _, body) = wait_for(&format!("HTTPS to {host}"), || {
            Some(curl(&["--cacert", ca, "--resolve", &resolve, &url])).filter(|r| r.0 == 200)
        });
        assert_eq!(status, 200);
        assert!(body.contains("infra-backend-v2"), "{body}");
    }
    // The other listener's certificate does not verify as this host's.
    let (status, _, _) = curl(&[
        "--cacert",
        ca_b.to_str().expect("utf-8"),
        "--resolve",
        &format!("a.example:{https}:127.0.0.1"),
        &format!("https://a.example:{https}/"),
    ]);
    assert_eq!(
        status, 0,
        "a.example must be served a.example's certificate"
    );
    // A key that does not fit its certificate.
    site.node.write_manifest(
        "mismatch.yaml",
        &format!("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: mismatch\n  namespace: {INFRA}\nspec:\n  gatewayClassName: brink\n  listeners:\n  - {{name: m, port: {}, protocol: HTTPS, tls: {{certificateRefs: [{{name: mismatched}}]}}}}\n", free_port()),
    );
    let gw = wait_for("mismatch gateway status", || {
        site.object("gateways", INFRA, "mismatch")
            .filter(|g| g["status"]["listeners"].is_array())
    });
    let c = condition(&listener_status(&gw, "m")["conditions"], "ResolvedRefs");
    assert_eq!(c["reason"], "InvalidCertificateRef");
    assert!(
        c["message"]
            .as_str()
            .unwrap_or_default()
            .contains("do not fit"),
        "{c}"
    );
}

#[test]
fn requests_in_flight_finish_when_their_route_or_gateway_goes() {
    let site = Site::start();
    let port = free_port();
    site.node.write_manifest(
        "going.yaml",
        &format!(
            "{}---\n{}",
            gateway("going", port, "Same"),
            route(
                INFRA,
                "going",
                "going",
                "  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n"
            )
        ),
    );
    site.accepted(INFRA, "going");
    eventually_pod(port, "x", "/", &[], "infra-backend-v1");
    // A slow request (under the test node's 1 s guest deadline) starts, then its route
    // and its Gateway are removed: the port stops taking new connections, and the request
    // in flight still gets its answer.
    let slow = std::thread::spawn(move || {
        let reply = try_send(port, "GET", "x", "/?delay=800", &[]);
        (reply, std::time::Instant::now())
    });
    std::thread::sleep(std::time::Duration::from_millis(150));
    site.node.remove_manifest("going.yaml");
    wait_for("the port to close", || {
        try_send(port, "GET", "x", "/", &[]).is_err().then_some(())
    });
    let closed_at = std::time::Instant::now();
    let (reply, answered_at) = slow.join().expect("slow request");
    let reply = reply.expect("the request in flight was dropped");
    assert!(
        closed_at < answered_at,
        "the port closed only after the answer"
    );
    assert_eq!(
        (reply.status, reply.pod()),
        (200, "infra-backend-v1".to_string())
    );
}

#[test]
fn a_certificate_edit_is_served_without_a_restart() {
    let site = Site::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (old_cert, old_key) = certificate(&["live.example"]);
    let (new_cert, new_key) = certificate(&["live.example"]);
    let (old_ca, new_ca) = (dir.path().join("old.pem"), dir.path().join("new.pem"));
    std::fs::write(&old_ca, &old_cert).expect("old ca");
    std::fs::write(&new_ca, &new_cert).expect("new ca");
    let port = free_port();
    let gateway = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: live-tls\n  namespace: {INFRA}\nspec:\n  gatewayClassName: brink\n  listeners:\n  - {{name: https, port: {port}, protocol: HTTPS, tls: {{certificateRefs: [{{name: live-cert}}]}}}}\n---\n{}",
        route(
            INFRA,
            "live-tls",
            "live-tls",
            "  rules:\n  - backendRefs: [{name: infra-backend-v1, port: 8080}]\n"
        )
    );
    site.node.write_manifest("live-tls.yaml", &gateway);
    site.node.write_manifest(
        "cert.yaml",
        &tls_secret(INFRA, "live-cert", &old_cert, &old_key),
    );
    site.accepted(INFRA, "live-tls");
    let resolve = format!("live.example:{port}:127.0.0.1");
    let url = format!("https://live.example:{port}/");
    let with_ca = |ca: &std::path::Path| {
        curl(&[
            "--cacert",
            ca.to_str().expect("utf-8"),
            "--resolve",
            &resolve,
            &url,
        ])
        .0
    };
    wait_for("the first certificate served", || {
        (with_ca(&old_ca) == 200).then_some(())
    });
    // The Secret is replaced; the port stays open and serves the new certificate.
    site.node.write_manifest(
        "cert.yaml",
        &tls_secret(INFRA, "live-cert", &new_cert, &new_key),
    );
    wait_for("the new certificate served", || {
        (with_ca(&new_ca) == 200).then_some(())
    });
    assert_ne!(with_ca(&old_ca), 200, "the old certificate must be gone");
}
