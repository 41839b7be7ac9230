//! OpenAPI documents: `/openapi/v3` (the root listing each group-version's document,
//! and each document), and `/openapi/v2` as JSON for clients that accept it.
//!
//! Schemas come from the Kubernetes types themselves (k8s-openapi's and gateway-api's
//! JSON Schema implementations, with Kubernetes' names and descriptions, so `kubectl
//! explain` reads them), each kind marked with `x-kubernetes-group-version-kind`, and
//! lists merged by key marked with `x-kubernetes-patch-merge-key` and
//! `-patch-strategy` (the keys `patch` uses). Paths carry one operation per verb with
//! the `fieldValidation` parameter and the patch content types, which is how kubectl
//! learns that the server validates fields itself.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use schemars::generate::{SchemaGenerator, SchemaSettings};
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};

use super::discovery::{KUBE_MAJOR, KUBE_MINOR};
use super::kinds::{self, KINDS, Kind};

/// Adds `kind`'s schema to the generator; returns its definition's name.
fn add_schema(generator: &mut SchemaGenerator, kind: &Kind) -> Option<String> {
    use k8s_openapi::api::{
        apps::v1 as apps, batch::v1 as batch, certificates::v1 as certs,
        coordination::v1 as coordination, core::v1 as core, discovery::v1 as discovery,
        events::v1 as events, node::v1 as node, rbac::v1 as rbac,
    };
    macro_rules! schema {
        ($t:ty) => {{
            generator.subschema_for::<$t>();
            <$t as schemars::JsonSchema>::schema_name().into_owned()
        }};
    }
    Some(match (kind.group, kind.kind) {
        ("", "Namespace") => schema!(core::Namespace),
        ("", "Pod") => schema!(core::Pod),
        ("", "Node") => schema!(core::Node),
        ("", "Service") => schema!(core::Service),
        ("", "Endpoints") => schema!(core::Endpoints),
        ("", "ConfigMap") => schema!(core::ConfigMap),
        ("", "Secret") => schema!(core::Secret),
        ("", "Event") => schema!(core::Event),
        ("", "ServiceAccount") => schema!(core::ServiceAccount),
        ("apps", "Deployment") => schema!(apps::Deployment),
        ("apps", "ReplicaSet") => schema!(apps::ReplicaSet),
        ("apps", "DaemonSet") => schema!(apps::DaemonSet),
        ("batch", "Job") => schema!(batch::Job),
        ("coordination.k8s.io", "Lease") => schema!(coordination::Lease),
        ("discovery.k8s.io", "EndpointSlice") => schema!(discovery::EndpointSlice),
        ("events.k8s.io", "Event") => schema!(events::Event),
        ("node.k8s.io", "RuntimeClass") => schema!(node::RuntimeClass),
        ("certificates.k8s.io", "CertificateSigningRequest") => {
            schema!(certs::CertificateSigningRequest)
        }
        ("rbac.authorization.k8s.io", "Role") => schema!(rbac::Role),
        ("rbac.authorization.k8s.io", "RoleBinding") => schema!(rbac::RoleBinding),
        ("rbac.authorization.k8s.io", "ClusterRole") => schema!(rbac::ClusterRole),
        ("rbac.authorization.k8s.io", "ClusterRoleBinding") => schema!(rbac::ClusterRoleBinding),
        ("gateway.networking.k8s.io", "GatewayClass") => {
            schema!(gateway_api::gatewayclasses::GatewayClass)
        }
        ("gateway.networking.k8s.io", "Gateway") => schema!(gateway_api::gateways::Gateway),
        ("gateway.networking.k8s.io", "HTTPRoute") => {
            schema!(gateway_api::httproutes::HttpRoute)
        }
        ("gateway.networking.k8s.io", "ReferenceGrant") => {
            schema!(gateway_api::referencegrants::ReferenceGrant)
        }
        _ => return None,
    })
}

/// The merge key of a list property, from the patch module's table; whether the
/// elements have a field is read from their schema (following a `$ref`).
fn merge_key(
    property: &str,
    items: &Value,
    definitions: &Map<String, Value>,
) -> Option<&'static str> {
    let target = items
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.rsplit('/').next())
        .and_then(|name| definitions.get(name))
        .unwrap_or(items);
    super::patch::merge_key(property, |field| {
        target.pointer(&format!("/properties/{field}")).is_some()
    })
}

/// Marks list properties with the merge keys and strategies strategic merge uses.
fn add_patch_extensions(definitions: &mut Map<String, Value>) {
    let snapshot = definitions.clone();
    for schema in definitions.values_mut() {
        let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
            continue;
        };
        for (name, property) in properties.iter_mut() {
            if property.get("type").and_then(Value::as_str) != Some("array") {
                continue;
            }
            let items = property.get("items").cloned().unwrap_or(Value::Null);
            if let Some(key) = merge_key(name, &items, &snapshot) {
                property["x-kubernetes-patch-merge-key"] = json!(key);
                property["x-kubernetes-patch-strategy"] = json!("merge");
            } else if super::patch::merges_primitives(name) {
                property["x-kubernetes-patch-strategy"] = json!("merge");
            }
        }
    }
}

fn gvk(kind: &Kind) -> Value {
    json!({"group": kind.group, "version": kind.version, "kind": kind.kind})
}

fn query(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "description": description, "schema": {"type": "string", "uniqueItems": true}})
}

fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": {"type": "string", "uniqueItems": true}})
}

fn schema_ref(name: &str, v3: bool) -> Value {
    if v3 {
        json!({"$ref": format!("#/components/schemas/{name}")})
    } else {
        json!({"$ref": format!("#/definitions/{name}")})
    }
}

/// The paths of one kind: its collection and its items.
fn paths_for(kind: &Kind, schema: &str, v3: bool, paths: &mut Map<String, Value>) {
    let base = if kind.group.is_empty() {
        format!("/api/{}", kind.version)
    } else {
        format!("/apis/{}/{}", kind.group, kind.version)
    };
    let collection = if kind.namespaced {
        format!("{base}/namespaces/{{namespace}}/{}", kind.resource)
    } else {
        format!("{base}/{}", kind.resource)
    };
    let item = format!("{collection}/{{name}}");
    let mut common = vec![query("pretty", "If 'true', the output is pretty printed.")];
    if kind.namespaced {
        common.push(path_param("namespace"));
    }
    let operation = |action: &str, verb: &str, extra: Vec<Value>, body: bool, patch: bool| {
        let id = format!("{verb}{}{}", kind.group.replace('.', ""), kind.kind);
        let mut op = json!({
            "operationId": id,
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": gvk(kind),
            "parameters": extra,
            "responses": {"200": if v3 {
                json!({"description": "OK", "content": {"application/json": {"schema": schema_ref(schema, true)}, "application/yaml": {"schema": schema_ref(schema, true)}}})
            } else {
                json!({"description": "OK", "schema": schema_ref(schema, false)})
            }},
        });
        if body && v3 {
            let content_types: Vec<&str> = if patch {
                vec![
                    "application/json-patch+json",
                    "application/merge-patch+json",
                    "application/strategic-merge-patch+json",
                    "application/apply-patch+yaml",
                ]
            } else {
                vec!["application/json", "application/yaml"]
            };
            let body_schema = if patch {
                json!({"type": "object", "description": "A patch in one of the content types."})
            } else {
                schema_ref(schema, true)
            };
            let content: Map<String, Value> = content_types
                .into_iter()
                .map(|c| (c.to_owned(), json!({"schema": body_schema})))
                .collect();
            op["requestBody"] = json!({"content": content, "required": true});
        }
        op
    };
    let write_params = || {
        vec![
            query(
                "dryRun",
                "When present, indicates that modifications should not be persisted. Valid value: All.",
            ),
            query(
                "fieldManager",
                "A name associated with the actor or entity making these changes.",
            ),
            query(
                "fieldValidation",
                "How the server handles unknown or duplicate fields: Ignore, Warn (the default) or Strict.",
            ),
        ]
    };
    let mut patch_params = write_params();
    patch_params.push(json!({"name": "force", "in": "query", "description": "Force is going to \"force\" Apply requests.", "schema": {"type": "boolean", "uniqueItems": true}}));
    let list_params = vec![
        query(
            "labelSelector",
            "A selector to restrict the list of returned objects by their labels.",
        ),
        query(
            "fieldSelector",
            "A selector to restrict the list of returned objects by their fields.",
        ),
        query(
            "resourceVersion",
            "resourceVersion sets a constraint on what resource versions a request may be served from.",
        ),
        query(
            "resourceVersionMatch",
            "How resourceVersion is applied to list calls.",
        ),
        query(
            "limit",
            "The maximum number of responses to return for a list call.",
        ),
        query(
            "continue",
            "The continue option should be set when retrieving more results from the server.",
        ),
        query("watch", "Watch for changes to the described resources."),
        query(
            "allowWatchBookmarks",
            "Requests watch events with type BOOKMARK.",
        ),
        query(
            "sendInitialEvents",
            "Starts the watch stream with synthetic events of the current state.",
        ),
        query("timeoutSeconds", "Timeout for the list/watch call."),
    ];
    let mut collection_ops = json!({
        "parameters": common,
        "get": operation("list", "list", list_params, false, false),
        "post": operation("post", "create", write_params(), true, false),
    });
    if !v3 {
        collection_ops["post"]["consumes"] = json!(["*/*"]);
    }
    let mut item_common = common.clone();
    item_common.push(path_param("name"));
    let mut item_ops = json!({
        "parameters": item_common,
        "get": operation("get", "read", vec![], false, false),
        "put": operation("put", "replace", write_params(), true, false),
        "patch": operation("patch", "patch", patch_params, true, true),
        "delete": operation("delete", "delete", vec![query("gracePeriodSeconds", "The duration in seconds before the object should be deleted."), query("propagationPolicy", "Whether and how garbage collection will be performed.")], false, false),
    });
    if !v3 {
        item_ops["patch"]["consumes"] = json!([
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
            "application/apply-patch+yaml"
        ]);
    }
    paths.insert(collection, collection_ops);
    paths.insert(item, item_ops);
}

/// One document over `kinds`, in OpenAPI 3 or Swagger 2 form.
fn document(selected: &[&'static Kind], v3: bool) -> Value {
    let settings = if v3 {
        SchemaSettings::openapi3()
    } else {
        SchemaSettings::draft07().with(|s| {
            s.definitions_path = "/definitions".into();
            s.meta_schema = None;
        })
    };
    let mut generator = settings.into_generator();
    let named: Vec<(&Kind, String)> = selected
        .iter()
        .filter_map(|k| add_schema(&mut generator, k).map(|name| (*k, name)))
        .collect();
    let mut definitions = generator.take_definitions(true);
    for (kind, name) in &named {
        if let Some(schema) = definitions.get_mut(name) {
            let entry = schema
                .as_object_mut()
                .map(|m| {
                    m.entry("x-kubernetes-group-version-kind")
                        .or_insert_with(|| json!([]))
                        .clone()
                })
                .unwrap_or(json!([]));
            let mut list = entry.as_array().cloned().unwrap_or_default();
            if !list.contains(&gvk(kind)) {
                list.push(gvk(kind));
            }
            schema["x-kubernetes-group-version-kind"] = json!(list);
        }
    }
    add_patch_extensions(&mut definitions);
    let mut paths = Map::new();
    for (kind, name) in &named {
        paths_for(kind, name, v3, &mut paths);
    }
    let info = json!({"title": "Kubernetes (served by Brink)", "version": format!("v{KUBE_MAJOR}.{KUBE_MINOR}.0")});
    if v3 {
        json!({"openapi": "3.0.0", "info": info, "paths": paths, "components": {"schemas": definitions}})
    } else {
        json!({"swagger": "2.0", "info": info, "paths": paths, "definitions": definitions})
    }
}

/// `api/v1`, `apis/apps/v1`: how the v3 root names a group-version.
fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

struct V3 {
    documents: BTreeMap<String, (Vec<u8>, String)>,
}

fn v3() -> &'static V3 {
    static DOCS: OnceLock<V3> = OnceLock::new();
    DOCS.get_or_init(|| {
        let mut documents = BTreeMap::new();
        for group in kinds::groups() {
            let version = KINDS
                .iter()
                .find(|k| k.group == group)
                .map_or("v1", |k| k.version);
            let selected: Vec<&'static Kind> = KINDS
                .iter()
                .filter(|k| k.group == group && k.version == version)
                .collect();
            let body = serde_json::to_vec(&document(&selected, true)).unwrap_or_default();
            let hash = hex::encode(&Sha256::digest(&body)[..16]).to_uppercase();
            documents.insert(gv_path(group, version), (body, hash));
        }
        V3 { documents }
    })
}

/// `/openapi/v3`: where each group-version's document is.
pub fn v3_root() -> Value {
    let paths: Map<String, Value> = v3()
        .documents
        .iter()
        .map(|(gv, (_, hash))| {
            (
                gv.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={hash}")}),
            )
        })
        .collect();
    json!({"paths": paths})
}

/// `/openapi/v3/<gv>`: the document's JSON bytes.
pub fn v3_document(gv: &str) -> Option<&'static [u8]> {
    v3().documents.get(gv).map(|(body, _)| body.as_slice())
}

/// `/openapi/v2`, as JSON.
pub fn v2() -> &'static [u8] {
    static DOC: OnceLock<Vec<u8>> = OnceLock::new();
    DOC.get_or_init(|| {
        let all: Vec<&'static Kind> = KINDS.iter().collect();
        serde_json::to_vec(&document(&all, false)).unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_carry_what_kubectl_looks_for() {
        let root = v3_root();
        let url = root["paths"]["api/v1"]["serverRelativeURL"]
            .as_str()
            .expect("api/v1 listed");
        assert!(url.starts_with("/openapi/v3/api/v1?hash="));
        let doc: Value =
            serde_json::from_slice(v3_document("api/v1").expect("api/v1")).expect("json");
        let pod_item = &doc["paths"]["/api/v1/namespaces/{namespace}/pods/{name}"];
        assert_eq!(
            pod_item["patch"]["x-kubernetes-group-version-kind"]["kind"],
            "Pod"
        );
        let params = pod_item["patch"]["parameters"].as_array().expect("params");
        assert!(params.iter().any(|p| p["name"] == "fieldValidation"));
        assert!(
            pod_item["patch"]["requestBody"]["content"]
                .get("application/strategic-merge-patch+json")
                .is_some()
        );
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        let pod = &schemas["io.k8s.api.core.v1.Pod"];
        assert_eq!(pod["x-kubernetes-group-version-kind"][0]["kind"], "Pod");
        let containers = &schemas["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"];
        assert_eq!(containers["x-kubernetes-patch-merge-key"], "name");
        let ports = &schemas["io.k8s.api.core.v1.Container"]["properties"]["ports"];
        assert_eq!(ports["x-kubernetes-patch-merge-key"], "containerPort");
        let apps: Value =
            serde_json::from_slice(v3_document("apis/apps/v1").expect("apps")).expect("json");
        assert!(
            apps["paths"]
                .get("/apis/apps/v1/namespaces/{namespace}/deployments")
                .is_some()
        );
        let v2: Value = serde_json::from_slice(v2()).expect("v2 json");
        assert_eq!(v2["swagger"], "2.0");
        assert!(
            v2["definitions"]
                .get("io.k8s.api.apps.v1.Deployment")
                .is_some()
        );
    }
}
