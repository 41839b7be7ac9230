//! Discovery documents: `/version`, legacy discovery (`/api`, `/apis`, each
//! group-version's resource list) and aggregated discovery (`apidiscovery.k8s.io` v2 and
//! v2beta1), built from the resource table.

use serde_json::{Value, json};

use super::kinds::{self, KINDS, Kind};

/// The Kubernetes version whose types Brink serves (k8s-openapi's `v1_36`).
pub const KUBE_MAJOR: &str = "1";
pub const KUBE_MINOR: &str = "36";

pub fn version() -> Value {
    json!({
        "major": KUBE_MAJOR,
        "minor": KUBE_MINOR,
        "gitVersion": format!("v{KUBE_MAJOR}.{KUBE_MINOR}.0-brink.{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "",
        "goVersion": "none (Brink is written in Rust)",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, match std::env::consts::ARCH { "x86_64" => "amd64", "aarch64" => "arm64", other => other }),
    })
}

fn verbs(_kind: &Kind) -> Vec<&'static str> {
    vec![
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ]
}

fn sub_verbs(sub: &str) -> Vec<&'static str> {
    match sub {
        "binding" | "eviction" => vec!["create"],
        "log" => vec!["get"],
        "finalize" => vec!["update"],
        _ => vec!["get", "patch", "update"],
    }
}

fn sub_kind<'a>(kind: &'a Kind, sub: &str) -> (&'a str, &'a str, &'a str) {
    // (group, version, kind) of what the subresource takes and returns.
    match sub {
        "binding" => ("", "v1", "Binding"),
        "eviction" => ("policy", "v1", "Eviction"),
        "scale" => ("autoscaling", "v1", "Scale"),
        "log" => ("", "v1", "Pod"),
        _ => (kind.group, kind.version, kind.kind),
    }
}

/// `/api`.
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_doc(group: &str) -> Value {
    let version = KINDS
        .iter()
        .find(|k| k.group == group)
        .map_or("v1", |k| k.version);
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({"name": group, "versions": [gv.clone()], "preferredVersion": gv})
}

/// `/apis`.
pub fn groups() -> Value {
    let groups: Vec<Value> = kinds::groups()
        .into_iter()
        .filter(|g| !g.is_empty())
        .map(group_doc)
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/GROUP`.
pub fn group(group: &str) -> Option<Value> {
    KINDS.iter().any(|k| k.group == group).then(|| {
        let mut doc = group_doc(group);
        doc["kind"] = json!("APIGroup");
        doc["apiVersion"] = json!("v1");
        doc
    })
}

/// `/api/v1` or `/apis/GROUP/VERSION`.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    if !kinds::serves_version(group, version) {
        return None;
    }
    let mut resources = Vec::new();
    for kind in KINDS
        .iter()
        .filter(|k| k.group == group && k.version == version)
    {
        let mut r = json!({
            "name": kind.resource,
            "singularName": kind.singular,
            "namespaced": kind.namespaced,
            "kind": kind.kind,
            "verbs": verbs(kind),
        });
        if !kind.short_names.is_empty() {
            r["shortNames"] = json!(kind.short_names);
        }
        if !kind.categories.is_empty() {
            r["categories"] = json!(kind.categories);
        }
        resources.push(r);
        for sub in kind.subresources {
            let (g, v, k) = sub_kind(kind, sub);
            let mut s = json!({
                "name": format!("{}/{sub}", kind.resource),
                "singularName": "",
                "namespaced": kind.namespaced,
                "kind": k,
                "verbs": sub_verbs(sub),
            });
            if g != group || v != version {
                s["group"] = json!(g);
                s["version"] = json!(v);
            }
            resources.push(s);
        }
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// The aggregated discovery document for the core group (`/api`) or the named groups
/// (`/apis`), in `apidiscovery.k8s.io/<api_version>`.
pub fn aggregated(core: bool, api_version: &str) -> Value {
    let mut items = Vec::new();
    for group in kinds::groups() {
        if group.is_empty() != core {
            continue;
        }
        let version = KINDS
            .iter()
            .find(|k| k.group == group)
            .map_or("v1", |k| k.version);
        let resources: Vec<Value> = KINDS
            .iter()
            .filter(|k| k.group == group && k.version == version)
            .map(|kind| {
                let mut r = json!({
                    "resource": kind.resource,
                    "responseKind": {"group": kind.group, "version": kind.version, "kind": kind.kind},
                    "scope": if kind.namespaced { "Namespaced" } else { "Cluster" },
                    "singularResource": kind.singular,
                    "verbs": verbs(kind),
                });
                if !kind.short_names.is_empty() {
                    r["shortNames"] = json!(kind.short_names);
                }
                if !kind.categories.is_empty() {
                    r["categories"] = json!(kind.categories);
                }
                let subs: Vec<Value> = kind
                    .subresources
                    .iter()
                    .map(|sub| {
                        let (g, v, k) = sub_kind(kind, sub);
                        json!({
                            "subresource": sub,
                            "responseKind": {"group": g, "version": v, "kind": k},
                            "verbs": sub_verbs(sub),
                        })
                    })
                    .collect();
                if !subs.is_empty() {
                    r["subresources"] = json!(subs);
                }
                r
            })
            .collect();
        items.push(json!({
            "metadata": {"name": group, "creationTimestamp": null},
            "versions": [{"version": version, "resources": resources, "freshness": "Current"}],
        }));
    }
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{api_version}"),
        "metadata": {},
        "items": items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_lists_every_resource_once_with_its_subresources() {
        let core = resource_list("", "v1").expect("core");
        let names: Vec<&str> = core["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert!(names.contains(&"pods"));
        assert!(names.contains(&"pods/log"));
        assert!(names.contains(&"namespaces"));
        let apps = resource_list("apps", "v1").expect("apps");
        assert_eq!(apps["groupVersion"], "apps/v1");
        assert!(resource_list("apps", "v2").is_none());
        let all = aggregated(false, "v2");
        assert!(
            all["items"]
                .as_array()
                .expect("items")
                .iter()
                .any(|g| g["metadata"]["name"] == "gateway.networking.k8s.io")
        );
        assert_eq!(aggregated(true, "v2")["items"][0]["metadata"]["name"], "");
    }
}
