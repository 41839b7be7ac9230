//! One API request, from its path to its answer: routing (`/api/v1/...`,
//! `/apis/GROUP/VERSION/...`, namespaced or not, subresources), authorization, and the
//! verbs (get, list, watch, create, update, patch, delete) over the store and the watch
//! cache. Every error is a `Status`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use serde_json::{Value, json};

use super::admit::{FieldValidation, admit};
use super::auth::{Attributes, ResourceAttributes, User, authorize};
use super::cache::decode;
use super::kinds::{self, Kind};
use super::select::{FieldSelector, LabelSelector};
use super::status::{ApiError, success};
use super::{ApiState, discovery, managed, openapi, patch, protobuf, table, watch};
use crate::consensus::replica::ReplicaError;
use crate::store::{Applied, Command, Op, Refusal, StoreError};

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into()).boxed_unsync()
}

/// The content type of aggregated discovery, which kubectl checks exactly.
const AGGREGATED_V2: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";
const AGGREGATED_V2BETA1: &str =
    "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList";

/// How many times a write that lost a compare-and-set race is tried again when the
/// client did not pin a resourceVersion.
const WRITE_ATTEMPTS: usize = 8;
/// The longest field manager name kube-apiserver accepts.
const MAX_FIELD_MANAGER: usize = 128;

/// The longest deletion grace period honoured (a year; a client may ask for more).
const MAX_GRACE_SECONDS: i64 = 365 * 24 * 3600;

pub fn json_response(code: u16, value: &Value, warnings: &[String]) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(full(body));
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    for w in warnings {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - {:?}", w.replace('"', "'"))) {
            response.headers_mut().append("warning", v);
        }
    }
    response
}

pub fn error_response(e: &ApiError) -> Response<Body> {
    let mut response = json_response(e.code, &e.to_status(), &[]);
    if let Some(seconds) = e.details.retry_after
        && let Ok(v) = HeaderValue::from_str(&seconds.to_string())
    {
        response.headers_mut().insert("retry-after", v);
    }
    response
}

/// A JSON document already encoded (the OpenAPI documents, built once).
fn bytes_response(body: &'static [u8]) -> Response<Body> {
    let mut response = Response::new(full(Bytes::from_static(body)));
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    response
}

fn text_response(code: u16, text: &str) -> Response<Body> {
    let mut response = Response::new(full(text.to_owned()));
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// One query component, percent-decoded (`+` is a space); invalid escapes or UTF-8 are
/// refused rather than read as U+FFFD.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The query string, decoded. Invalid percent-encoding or UTF-8 is a 400.
pub fn parse_query(query: Option<&str>) -> Result<HashMap<String, String>, ApiError> {
    let mut out = HashMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match (percent_decode(key), percent_decode(value)) {
            (Some(k), Some(v)) => {
                out.insert(k, v);
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "invalid query string: {pair:?} is not percent-encoded UTF-8"
                )));
            }
        }
    }
    Ok(out)
}

/// What a path names.
#[derive(Debug, Clone)]
pub struct Target {
    pub kind: &'static Kind,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
    /// The legacy `/watch/` path prefix.
    pub watch_path: bool,
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('%')
}

/// Routes a resource path, or says it names nothing served.
pub fn route(segments: &[&str]) -> Result<Option<Target>, ApiError> {
    let (group, version, rest) = match segments {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Ok(None),
    };
    if rest.is_empty() {
        return Ok(None);
    }
    let (watch_path, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        _ => (false, rest),
    };
    let find = |resource: &str| kinds::find(group, version, resource);
    let namespaces_is_object = |sub: &[&str]| match sub {
        [] => true,
        [s] => find("namespaces").is_some_and(|k| k.has_subresource(s)),
        _ => false,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, tail @ ..] if group.is_empty() && !namespaces_is_object(tail) => {
            (Some((*ns).to_owned()), tail)
        }
        ["namespaces", ns, tail @ ..] if !group.is_empty() => (Some((*ns).to_owned()), tail),
        _ => (None, rest),
    };
    let (resource, name, sub) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(*name), None),
        [resource, name, sub] => (*resource, Some(*name), Some(*sub)),
        _ => return Ok(None),
    };
    let Some(kind) = find(resource) else {
        return Ok(None);
    };
    if kind.namespaced != namespace.is_some() && name.is_some() {
        return Ok(None);
    }
    if !kind.namespaced && namespace.is_some() {
        return Ok(None);
    }
    if let Some(sub) = sub
        && !kind.has_subresource(sub)
    {
        return Ok(None);
    }
    for s in namespace.iter().map(String::as_str).chain(name) {
        if !segment_ok(s) {
            return Err(ApiError::bad_request(format!("invalid path segment {s:?}")));
        }
    }
    Ok(Some(Target {
        kind,
        namespace,
        name: name.map(str::to_owned),
        subresource: sub.map(str::to_owned),
        watch_path,
    }))
}

fn replica_error(e: ReplicaError) -> ApiError {
    match e {
        ReplicaError::Timeout(_) => {
            ApiError::timeout(format!("{e}: the request may or may not have been applied"))
        }
        e => ApiError::unavailable(e.to_string()),
    }
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Gone { asked, compacted } => {
            ApiError::expired(format!("too old resource version: {asked} ({compacted})"))
        }
        StoreError::BadContinue => ApiError::bad_request("invalid continue token"),
        e => ApiError::internal(e.to_string()),
    }
}

/// Reads the store off the async threads.
async fn blocking<T: Send + 'static>(
    state: &ApiState,
    f: impl FnOnce(&crate::store::Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let replica = state.replica.clone();
    tokio::task::spawn_blocking(move || f(replica.store()))
        .await
        .map_err(|_| ApiError::internal("a store read failed"))?
        .map_err(store_error)
}

/// A consistent read point: a ReadIndex round, then the cache caught up to it.
pub(super) async fn consistent(state: &ApiState) -> Result<u64, ApiError> {
    state.replica.read_barrier().await.map_err(replica_error)?;
    let revision = *state.replica.subscribe_revision().borrow();
    if !state
        .cache
        .wait_for(revision, state.settings.cache_wait)
        .await
    {
        return Err(ApiError::timeout(
            "the watch cache did not catch up with the store in time",
        ));
    }
    Ok(revision)
}

/// Reads one stored object, consistently.
async fn read_object(state: &ApiState, key: &str) -> Result<Option<(Value, u64)>, ApiError> {
    state.replica.read_barrier().await.map_err(replica_error)?;
    let k = key.to_owned();
    let value = blocking(state, move |s| s.get(k.as_bytes())).await?;
    Ok(value.and_then(|v| decode(&v.data, v.mod_revision).map(|o| (o, v.mod_revision))))
}

enum Written {
    Done(u64),
    Refused(Refusal),
}

async fn write(state: &ApiState, ops: Vec<Op>) -> Result<Written, ApiError> {
    match state.replica.propose(Command { ops }).await {
        Ok(Applied::Done { revision }) => Ok(Written::Done(revision)),
        Ok(Applied::Refused(r)) => Ok(Written::Refused(r)),
        Ok(Applied::AlreadyApplied) => Err(ApiError::internal("the write was replayed")),
        Err(e) => Err(replica_error(e)),
    }
}

/// The bytes stored for an object: JSON without its resourceVersion.
fn encode(object: &Value, max: usize) -> Result<Vec<u8>, ApiError> {
    let mut object = object.clone();
    if let Some(m) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("selfLink");
    }
    let bytes = serde_json::to_vec(&object).map_err(|e| ApiError::internal(e.to_string()))?;
    if bytes.len() > max {
        return Err(ApiError::too_large(format!(
            "the object is {} bytes; at most {max} may be stored",
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn set_rv(object: &mut Value, revision: u64) {
    if let Some(m) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), json!(revision.to_string()));
    }
}

pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn name_of(object: &Value) -> String {
    object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

const GENERATE_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Decodes a request body as JSON or YAML.
fn decode_body(content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    if media == protobuf::MEDIA_TYPE {
        return protobuf::decode(body).map_err(|e| ApiError::bad_request(e.to_string()));
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("the request body is not UTF-8"))?;
    brink_proto::meta::check_nesting(text, brink_proto::meta::MAX_NESTING)
        .map_err(|e| ApiError::bad_request(format!("the request body is {e}")))?;
    match media {
        "" | "application/json" | "*/*" => serde_json::from_str(text)
            .map_err(|e| ApiError::bad_request(format!("the request body is not JSON: {e}"))),
        "application/yaml" | "application/x-yaml" | "text/yaml" => {
            let yaml: serde_yaml::Value = serde_yaml::from_str(text)
                .map_err(|e| ApiError::bad_request(format!("the request body is not YAML: {e}")))?;
            serde_json::to_value(yaml).map_err(|e| {
                ApiError::bad_request(format!("the request body is not an object: {e}"))
            })
        }
        other => Err(ApiError::unsupported_media_type(other)),
    }
}

/// Checks apiVersion, kind, name and namespace of a body against the path.
fn check_identity(
    target: &Target,
    object: &mut Value,
    name_from_path: Option<&str>,
) -> Result<(), ApiError> {
    let kind = target.kind;
    if !object.is_object() {
        return Err(ApiError::bad_request("the request body must be an object"));
    }
    let api_version = object.get("apiVersion").and_then(Value::as_str);
    let kind_name = object.get("kind").and_then(Value::as_str);
    match (api_version, kind_name) {
        (None, _) | (_, None) => {
            // kube-apiserver fills both in from the path when they are missing.
            object["apiVersion"] = json!(kind.api_version());
            object["kind"] = json!(kind.kind);
        }
        (Some(v), Some(k)) if v == kind.api_version() && k == kind.kind => {}
        (Some(v), Some(k)) => {
            return Err(ApiError::bad_request(match kinds::by_kind(v, k) {
                Some(_) => format!(
                    "the API version in the data ({v}) does not match the expected API version ({}) or the kind ({k}) is not {}",
                    kind.api_version(),
                    kind.kind
                ),
                None => format!("no kind {k:?} is registered for version {v:?}"),
            }));
        }
    }
    if !object.get("metadata").is_some_and(Value::is_object) {
        if object.get("metadata").is_some_and(|m| !m.is_null()) {
            return Err(ApiError::bad_request("metadata must be an object"));
        }
        object["metadata"] = json!({});
    }
    let metadata = &mut object["metadata"];
    if let Some(path_name) = name_from_path {
        match metadata.get("name").and_then(Value::as_str) {
            None => metadata["name"] = json!(path_name),
            Some(n) if n != path_name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({path_name})"
                )));
            }
            _ => {}
        }
    }
    if kind.namespaced {
        let path_ns = target.namespace.as_deref().unwrap_or("default");
        match metadata.get("namespace").and_then(Value::as_str) {
            None | Some("") => metadata["namespace"] = json!(path_ns),
            Some(ns) if ns != path_ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The object without metadata and status: what a change of bumps `generation`.
fn spec_part(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    o
}

/// What a create resets in status, as each kind's strategy does.
fn reset_status_on_create(kind: &Kind, object: &mut Value) {
    match (kind.group, kind.resource) {
        ("", "pods") => {
            object["status"] = json!({"phase": "Pending"});
        }
        ("", "namespaces") | ("", "nodes") => {}
        _ if kind.has_subresource("status") => {
            if let Some(m) = object.as_object_mut() {
                m.remove("status");
            }
        }
        _ => {}
    }
}

/// A request, parsed once.
pub struct Call<'a> {
    pub state: &'a Arc<ApiState>,
    pub user: &'a User,
    pub method: Method,
    pub query: HashMap<String, String>,
    pub accept: String,
    pub content_type: String,
    /// The `User-Agent` header: names the field manager of a write that names none.
    pub user_agent: String,
    pub body: Bytes,
}

impl Call<'_> {
    pub(super) fn q(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }

    fn dry_run(&self) -> Result<bool, ApiError> {
        match self.q("dryRun") {
            None | Some("") => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "dryRun {other:?} is not All"
            ))),
        }
    }

    /// The field manager of a write: `fieldManager`, else the client's name from its
    /// `User-Agent` (as kube-apiserver does: `kubectl/v1.32.0 (...)` is `kubectl`).
    fn field_manager(&self) -> Result<String, ApiError> {
        let manager = match self.q("fieldManager") {
            Some(m) if !m.is_empty() => m.to_owned(),
            _ => {
                let agent = self.user_agent.split('/').next().unwrap_or("").trim();
                let agent: String = agent.chars().take(MAX_FIELD_MANAGER).collect();
                if agent.is_empty() {
                    "unknown".to_owned()
                } else {
                    agent
                }
            }
        };
        if manager.len() > MAX_FIELD_MANAGER || manager.chars().any(char::is_control) {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "fieldManager: Invalid value: {manager:?}: must be at most {MAX_FIELD_MANAGER} printable characters"
                ),
            ));
        }
        Ok(manager)
    }

    /// The body's media type, parameters dropped (`application/json; charset=utf-8` is
    /// `application/json`).
    fn media_type(&self) -> String {
        self.content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned()
    }

    fn wants_table(&self) -> bool {
        self.accept.contains("as=Table")
    }

    fn wants_partial(&self) -> bool {
        self.accept.contains("as=PartialObjectMetadata")
    }
}

/// Answers a non-resource path, or None when it is a resource path.
pub fn non_resource(state: &ApiState, path: &str, accept: &str) -> Option<Response<Body>> {
    let aggregated = |core: bool| {
        let (version, content_type) = if accept.contains("v=v2;")
            || accept.contains("v=v2,")
            || accept.ends_with("v=v2")
            || accept.contains(AGGREGATED_V2)
        {
            ("v2", AGGREGATED_V2)
        } else {
            ("v2beta1", AGGREGATED_V2BETA1)
        };
        let mut response = json_response(200, &discovery::aggregated(core, version), &[]);
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static(content_type));
        response
            .headers_mut()
            .insert("vary", HeaderValue::from_static("Accept"));
        response
    };
    let wants_aggregated = accept.contains("as=APIGroupDiscoveryList");
    Some(match path {
        "/healthz" | "/livez" => text_response(200, "ok"),
        "/readyz" => match (
            state.replica.leader(),
            state.cache.is_ready(),
            state.bootstrapped.load(Ordering::Acquire),
        ) {
            (Some(_), true, true) => text_response(200, "ok"),
            (None, _, _) => text_response(503, "[-]raft: no leader known\nreadyz check failed"),
            (_, false, _) => {
                text_response(503, "[-]watch-cache: not loaded yet\nreadyz check failed")
            }
            (_, _, false) => text_response(
                503,
                "[-]poststarthook/bootstrap: system namespaces and RBAC not written yet\nreadyz check failed",
            ),
        },
        "/version" | "/version/" => json_response(200, &discovery::version(), &[]),
        "/api" | "/api/" if wants_aggregated => aggregated(true),
        "/apis" | "/apis/" if wants_aggregated => aggregated(false),
        "/api" | "/api/" => json_response(
            200,
            &discovery::core_versions(&state.settings.advertise),
            &[],
        ),
        "/apis" | "/apis/" => json_response(200, &discovery::groups(), &[]),
        "/openapi/v3" | "/openapi/v3/" => json_response(200, &openapi::v3_root(), &[]),
        "/openapi/v2" | "/openapi/v2/" | "/swagger.json" => {
            // Served as JSON only: a client that accepts nothing but the protobuf
            // form is told so.
            if !accept.is_empty() && !accept.contains("json") && !accept.contains("*/*") {
                error_response(&ApiError::new(
                    406,
                    "NotAcceptable",
                    "Brink serves /openapi/v2 as application/json only; /openapi/v3 is complete",
                ))
            } else {
                bytes_response(openapi::v2())
            }
        }
        _ => {
            let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
            if let Some(gv) = path.strip_prefix("/openapi/v3/") {
                return Some(match openapi::v3_document(gv) {
                    Some(body) => bytes_response(body),
                    None => error_response(&ApiError::no_route()),
                });
            }
            match segments.as_slice() {
                ["api", version] => match discovery::resource_list("", version) {
                    Some(doc) => json_response(200, &doc, &[]),
                    None => error_response(&ApiError::no_route()),
                },
                ["apis", group] => match discovery::group(group) {
                    Some(doc) => json_response(200, &doc, &[]),
                    None => error_response(&ApiError::no_route()),
                },
                ["apis", group, version] => match discovery::resource_list(group, version) {
                    Some(doc) => json_response(200, &doc, &[]),
                    None => error_response(&ApiError::no_route()),
                },
                _ => return None,
            }
        }
    })
}

/// Which RBAC verb a request is.
fn verb_of(method: &Method, target: &Target, watching: bool) -> &'static str {
    match *method {
        Method::GET | Method::HEAD if watching => "watch",
        Method::GET | Method::HEAD if target.name.is_none() => "list",
        Method::GET | Method::HEAD => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if target.name.is_none() => "deletecollection",
        Method::DELETE => "delete",
        _ => "unknown",
    }
}

/// Serves a resource request.
pub async fn resource(call: Call<'_>, target: Target) -> Response<Body> {
    let watching = target.watch_path || matches!(call.q("watch"), Some("true") | Some("1"));
    let verb = verb_of(&call.method, &target, watching);
    let attrs = Attributes {
        verb,
        resource: Some(ResourceAttributes {
            group: target.kind.group,
            resource: target.kind.resource,
            subresource: target.subresource.as_deref(),
            name: target.name.as_deref(),
            namespace: target.namespace.as_deref(),
            field_selector: call.q("fieldSelector"),
        }),
        path: "",
    };
    if let Err(why) = authorize(&call.state.cache, call.user, &attrs) {
        return error_response(&ApiError::forbidden(why));
    }
    let result = match (verb, target.subresource.as_deref()) {
        ("watch", None) => return watch::serve(call, target).await,
        ("list", None) => list(&call, &target).await,
        ("get", None) | ("get", Some("status")) | ("get", Some("scale")) => {
            get(&call, &target).await
        }
        ("get", Some("log")) => pod_log(&call, &target).await,
        ("create", None) => create(&call, &target).await,
        ("create", Some("binding")) => bind(&call, &target).await,
        ("create", Some("eviction")) => evict(&call, &target).await,
        ("update", None)
        | ("update", Some("status"))
        | ("update", Some("approval"))
        | ("update", Some("finalize")) => update(&call, &target).await,
        ("patch", None) | ("patch", Some("status")) => patch_object(&call, &target).await,
        ("delete", None) => delete(&call, &target).await,
        ("deletecollection", None) => delete_collection(&call, &target).await,
        ("update", Some("scale")) | ("patch", Some("scale")) => write_scale(&call, &target).await,
        _ => Err(ApiError::method_not_allowed(format!(
            "{} is not supported on {}",
            call.method,
            target.kind.qualified()
        ))),
    };
    match result {
        Ok(response) => response,
        Err(e) => error_response(&e),
    }
}

fn respond_object(
    call: &Call<'_>,
    target: &Target,
    code: u16,
    object: &Value,
    warnings: &[String],
) -> Response<Body> {
    if target.subresource.as_deref() == Some("scale") {
        return json_response(code, &scale_of(object), warnings);
    }
    if call.wants_table() {
        let t = table::table(
            target.kind,
            &[object],
            object
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or(""),
            None,
            call.q("includeObject").unwrap_or("Metadata"),
        );
        return json_response(code, &t, warnings);
    }
    if call.wants_partial() {
        return json_response(code, &table::partial_metadata(object), warnings);
    }
    json_response(code, object, warnings)
}

async fn get(call: &Call<'_>, target: &Target) -> Result<Response<Body>, ApiError> {
    let name = target.name.as_deref().unwrap_or("");
    let key = target.kind.key(target.namespace.as_deref(), name);
    let object = match call.q("resourceVersion") {
        Some("0") => call.state.cache.get(&key).map(|o| (*o).clone()),
        _ => read_object(call.state, &key).await?.map(|(o, _)| o),
    };
    let Some(object) = object else {
        return Err(ApiError::not_found(target.kind, name));
    };
    if target.subresource.as_deref() == Some("scale") {
        return Ok(json_response(200, &scale_of(&object), &[]));
    }
    Ok(respond_object(call, target, 200, &object, &[]))
}

fn scale_of(object: &Value) -> Value {
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": object.pointer("/metadata/name"),
            "namespace": object.pointer("/metadata/namespace"),
            "uid": object.pointer("/metadata/uid"),
            "resourceVersion": object.pointer("/metadata/resourceVersion"),
            "creationTimestamp": object.pointer("/metadata/creationTimestamp"),
        },
        "spec": {"replicas": object.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(1)},
        "status": {
            "replicas": object.pointer("/status/replicas").and_then(Value::as_i64).unwrap_or(0),
            "selector": selector_text(object),
        },
    })
}

/// A workload's `spec.selector` as the Scale's `status.selector` string (`app=web`).
fn selector_text(object: &Value) -> String {
    let mut parts: Vec<String> = object
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    for e in object
        .pointer("/spec/selector/matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = e.get("key").and_then(Value::as_str).unwrap_or("");
        let values: Vec<&str> = e
            .get("values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        parts.push(
            match e.get("operator").and_then(Value::as_str).unwrap_or("") {
                "In" => format!("{key} in ({})", values.join(",")),
                "NotIn" => format!("{key} notin ({})", values.join(",")),
                "Exists" => key.to_owned(),
                _ => format!("!{key}"),
            },
        );
    }
    parts.join(",")
}

/// One of the patch formats, applied in place.
type PatchFn = fn(&mut Value, &[u8]) -> Result<(), patch::PatchError>;

/// `PUT` or `PATCH` on `/scale`: the Scale view of the workload is replaced or patched,
/// and only its `spec.replicas` reaches the workload (as kube-apiserver does).
async fn write_scale(call: &Call<'_>, target: &Target) -> Result<Response<Body>, ApiError> {
    let name = target.name.clone().unwrap_or_default();
    let patching = call.method == Method::PATCH;
    let media = call.media_type();
    let apply_patch: Option<PatchFn> = match (patching, media.as_str()) {
        (false, _) => None,
        (true, "application/json-patch+json") => Some(patch::json_patch),
        (true, "application/merge-patch+json") => Some(patch::merge_patch),
        (true, "application/strategic-merge-patch+json") => Some(patch::strategic_merge_patch),
        (true, other) => return Err(ApiError::unsupported_media_type(other)),
    };
    let body = if patching {
        Value::Null
    } else {
        decode_body(&call.content_type, &call.body)?
    };
    let raw = call.body.clone();
    read_modify_write(
        call,
        target,
        move |old| {
            let current = scale_of(old);
            let wanted = match apply_patch {
                Some(apply) => {
                    let mut doc = current.clone();
                    apply(&mut doc, &raw).map_err(|e| {
                        ApiError::new(422, "Invalid", format!("Scale {name:?} is invalid: {e}"))
                    })?;
                    doc
                }
                None => body.clone(),
            };
            let replicas = wanted
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .filter(|r| (0..=i64::from(i32::MAX)).contains(r))
                .ok_or_else(|| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!(
                            "Scale.autoscaling {name:?} is invalid: spec.replicas: Invalid value: {}: must be greater than or equal to 0",
                            wanted.pointer("/spec/replicas").unwrap_or(&Value::Null)
                        ),
                    )
                })?;
            let mut next = old.clone();
            next["spec"]["replicas"] = json!(replicas);
            // A replaced Scale pins the workload's resourceVersion when it names one; a
            // patch pins it only by changing it (as patches of the object itself do).
            let named = wanted
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .filter(|rv| !rv.is_empty());
            let stored = current
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str);
            let pinned = named.filter(|rv| !patching || Some(*rv) != stored);
            match pinned {
                Some(rv) => next["metadata"]["resourceVersion"] = json!(rv),
                None => {
                    if let Some(m) = next.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.remove("resourceVersion");
                    }
                }
            }
            Ok(next)
        },
        Origin::Update,
        None,
    )
    .await
}

/// Continue tokens of cache lists: the revision of the first page and the last key.
fn encode_continue(revision: u64, key: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&json!({"rv": revision, "start": key})).unwrap_or_default())
}

fn decode_continue(token: &str) -> Option<(u64, String)> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    Some((v.get("rv")?.as_u64()?, v.get("start")?.as_str()?.to_owned()))
}

pub struct Selection {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selection {
    pub fn parse(call: &Call<'_>, kind: &Kind) -> Result<Self, ApiError> {
        Ok(Self {
            labels: LabelSelector::parse(call.q("labelSelector").unwrap_or(""))
                .map_err(ApiError::bad_request)?,
            fields: FieldSelector::parse(call.q("fieldSelector").unwrap_or(""), kind)
                .map_err(ApiError::bad_request)?,
        })
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.labels.matches(object) && self.fields.matches(object)
    }
}

async fn list(call: &Call<'_>, target: &Target) -> Result<Response<Body>, ApiError> {
    let kind = target.kind;
    let selection = Selection::parse(call, kind)?;
    let limit: usize = match call.q("limit") {
        None | Some("") => 0,
        Some(l) => l
            .parse()
            .map_err(|_| ApiError::bad_request(format!("limit {l:?} is not a number")))?,
    };
    let prefix = kind.prefix(target.namespace.as_deref());
    let continue_from = match call.q("continue") {
        None | Some("") => None,
        Some(token) => {
            let (rv, start) = decode_continue(token)
                .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            if !start.starts_with(&prefix) {
                return Err(ApiError::bad_request("invalid continue token"));
            }
            let compacted = blocking(call.state, |s| s.compacted()).await?;
            if rv < compacted {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results.",
                ));
            }
            Some(start)
        }
    };
    let rv_param = call.q("resourceVersion").unwrap_or("");
    let rv_match = call.q("resourceVersionMatch").unwrap_or("");
    match rv_match {
        "" | "NotOlderThan" | "Exact" => {}
        other => {
            return Err(ApiError::bad_request(format!(
                "resourceVersionMatch {other:?} is not NotOlderThan or Exact"
            )));
        }
    }
    if !rv_match.is_empty() && rv_param.is_empty() {
        return Err(ApiError::bad_request(
            "resourceVersionMatch is forbidden unless resourceVersion is provided",
        ));
    }
    if rv_match == "Exact" {
        let wanted: u64 = rv_param
            .parse()
            .map_err(|_| ApiError::bad_request("resourceVersion must be a number"))?;
        if wanted != call.state.cache.revision() {
            return Err(ApiError::expired(format!(
                "Brink serves exact-revision lists only at the current revision ({}); asked {wanted}",
                call.state.cache.revision()
            )));
        }
    } else if rv_param.is_empty() {
        consistent(call.state).await?;
    } else if rv_param != "0" {
        let wanted: u64 = rv_param
            .parse()
            .map_err(|_| ApiError::bad_request("resourceVersion must be a number"))?;
        if !call
            .state
            .cache
            .wait_for(wanted, call.state.settings.cache_wait)
            .await
        {
            return Err(ApiError::timeout(format!(
                "Too large resource version: {wanted}, current: {}",
                call.state.cache.revision()
            )));
        }
    }
    let (all, revision) = call.state.cache.list(&prefix);
    let keyed = all.iter().filter(|o| {
        continue_from.as_ref().is_none_or(|start| {
            kind.key(
                o.pointer("/metadata/namespace").and_then(Value::as_str),
                o.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
            )
            .as_str()
                > start.as_str()
        })
    });
    let mut items: Vec<&Value> = Vec::new();
    let mut more = false;
    for object in keyed {
        if !selection.matches(object) {
            continue;
        }
        if limit > 0 && items.len() == limit {
            more = true;
            break;
        }
        items.push(object);
    }
    let continue_token = more.then(|| {
        let last = items.last().copied().unwrap_or(&Value::Null);
        encode_continue(
            revision,
            &kind.key(
                last.pointer("/metadata/namespace").and_then(Value::as_str),
                &name_of(last),
            ),
        )
    });
    let rv = revision.to_string();
    if call.wants_table() {
        let t = table::table(
            kind,
            &items,
            &rv,
            continue_token.as_deref(),
            call.q("includeObject").unwrap_or("Metadata"),
        );
        return Ok(json_response(200, &t, &[]));
    }
    let mut metadata = json!({"resourceVersion": rv});
    if let Some(token) = continue_token {
        metadata["continue"] = json!(token);
    }
    /// A list serialized straight from the cache's objects (no copy of them).
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct ListOut<T: serde::Serialize> {
        kind: String,
        api_version: String,
        metadata: Value,
        items: Vec<T>,
    }
    let body = if call.wants_partial() {
        serde_json::to_vec(&ListOut {
            kind: "PartialObjectMetadataList".into(),
            api_version: "meta.k8s.io/v1".into(),
            metadata,
            items: items
                .iter()
                .map(|o| table::partial_metadata(o))
                .collect::<Vec<_>>(),
        })
    } else {
        serde_json::to_vec(&ListOut {
            kind: format!("{}List", kind.kind),
            api_version: kind.api_version(),
            metadata,
            items,
        })
    }
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut response = Response::new(full(body));
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    Ok(response)
}

/// The namespace exists and is not being deleted (NamespaceLifecycle admission).
async fn check_namespace(call: &Call<'_>, target: &Target) -> Result<(), ApiError> {
    let Some(ns) = target
        .namespace
        .as_deref()
        .filter(|_| target.kind.namespaced)
    else {
        return Ok(());
    };
    let namespaces =
        kinds::find("", "v1", "namespaces").ok_or_else(|| ApiError::internal("no namespaces"))?;
    // The watch cache answers for namespaces it holds (as kube-apiserver's admission
    // reads an informer); one it does not hold yet may have been created a moment ago,
    // so that case is read from the store.
    let key = namespaces.key(None, ns);
    let found = match call.state.cache.get(&key) {
        Some(n) => Some(((*n).clone(), 0)),
        None => read_object(call.state, &key).await?,
    };
    match found {
        None => Err(ApiError::not_found(namespaces, ns)),
        Some((n, _))
            if n.pointer("/metadata/deletionTimestamp").is_some()
                && !matches!(target.kind.resource, "events") =>
        {
            Err(ApiError::forbidden(format!(
                "{} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                target.kind.qualified()
            )))
        }
        Some(_) => Ok(()),
    }
}

async fn create(call: &Call<'_>, target: &Target) -> Result<Response<Body>, ApiError> {
    let object = decode_body(&call.content_type, &call.body)?;
    create_object(call, target, object, Origin::Update).await
}

/// How a write came, for `managedFields`: an ordinary write (the writer owns what it
/// changed) or a server-side apply (the applier owns what its configuration sets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Update,
    Apply,
}

fn writer<'a>(
    manager: &'a str,
    target: &'a Target,
    api_version: &'a str,
    now: &'a str,
) -> managed::Writer<'a> {
    managed::Writer {
        manager,
        api_version,
        subresource: target.subresource.as_deref(),
        now,
    }
}

async fn create_object(
    call: &Call<'_>,
    target: &Target,
    mut object: Value,
    origin: Origin,
) -> Result<Response<Body>, ApiError> {
    let kind = target.kind;
    let validation = FieldValidation::parse(call.q("fieldValidation"))?;
    let dry_run = call.dry_run()?;
    let manager = call.field_manager()?;
    check_identity(target, &mut object, None)?;
    let metadata = &mut object["metadata"];
    if metadata
        .get("name")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        let Some(base) = metadata.get("generateName").and_then(Value::as_str) else {
            return Err(ApiError::invalid_field(
                kind,
                "",
                "metadata.name",
                "Required value: name or generateName is required",
            ));
        };
        let suffix: String = (0..5)
            .map(|_| GENERATE_ALPHABET[fastrand::usize(..GENERATE_ALPHABET.len())] as char)
            .collect();
        let base: String = base.chars().take(58).collect();
        metadata["name"] = json!(format!("{base}{suffix}"));
    }
    if let Some(m) = metadata.as_object_mut() {
        m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        m.insert("creationTimestamp".into(), json!(now_rfc3339()));
        for gone in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
            "managedFields",
        ] {
            m.remove(gone);
        }
        if kind.has_spec {
            m.insert("generation".into(), json!(1));
        } else {
            m.remove("generation");
        }
    }
    reset_status_on_create(kind, &mut object);
    if kind.group == "certificates.k8s.io" && object["spec"].is_object() {
        // Who asks is the requester, whatever the body says (the approver trusts it).
        object["spec"]["username"] = json!(call.user.name);
        object["spec"]["uid"] = json!(call.user.uid);
        object["spec"]["groups"] = json!(call.user.groups);
        if let Some(spec) = object["spec"].as_object_mut() {
            spec.remove("extra");
        }
    }
    if kind.group == "batch" && kind.resource == "jobs" {
        job_selector(&mut object);
    }
    if kind.group.is_empty() && kind.resource == "pods" {
        runtime_class(&call.state.cache, &mut object)?;
        default_tolerations(&mut object, call.state.settings.default_toleration_seconds);
    }
    // An applier owns what it sent, not what defaulting adds; a creator owns it all.
    let applied = (origin == Origin::Apply).then(|| managed::fields_of(&object));
    let (mut object, warnings) = admit(kind, object, validation)?;
    let now = now_rfc3339();
    let api_version = kind.api_version();
    let w = writer(&manager, target, &api_version, &now);
    let entries = match applied {
        Some(fields) => vec![managed::Entry {
            manager: manager.clone(),
            operation: "Apply".into(),
            api_version: api_version.clone(),
            time: Some(now.clone()),
            subresource: None,
            fields,
        }],
        None => {
            let mut entries = Vec::new();
            managed::track_update(&mut entries, &w, &json!({}), &object);
            entries
        }
    };
    managed::store(&mut object, &entries);
    let name = name_of(&object);
    super::auth::node_may_create(call.user, kind.resource, &name).map_err(ApiError::forbidden)?;
    check_namespace(call, target).await?;
    let key = kind.key(
        object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str),
        &name,
    );
    let data = encode(&object, call.state.settings.max_object_bytes)?;
    if dry_run {
        return Ok(respond_object(call, target, 201, &object, &warnings));
    }
    match write(
        call.state,
        vec![Op::Create {
            key: key.into_bytes(),
            data,
        }],
    )
    .await?
    {
        Written::Done(revision) => {
            set_rv(&mut object, revision);
            Ok(respond_object(call, target, 201, &object, &warnings))
        }
        Written::Refused(Refusal::AlreadyExists { .. }) => {
            Err(ApiError::already_exists(kind, &name))
        }
        Written::Refused(r) => Err(ApiError::internal(format!(
            "the store refused the create: {r:?}"
        ))),
    }
}

/// Builds the object an update stores from the old one and what the client sent.
fn merge_update(
    kind: &Kind,
    subresource: Option<&str>,
    old: &Value,
    mut new: Value,
) -> Result<Value, ApiError> {
    let name = name_of(old);
    if let (Some(want), Some(have)) = (
        new.pointer("/metadata/uid").and_then(Value::as_str),
        old.pointer("/metadata/uid").and_then(Value::as_str),
    ) && want != have
    {
        return Err(ApiError::conflict(
            kind,
            &name,
            &format!(
                "Precondition failed: UID in precondition: {want}, UID in object meta: {have}"
            ),
        ));
    }
    match subresource {
        Some("status") => {
            // A status write changes status only.
            let mut merged = old.clone();
            // Ownership travels with a status write (server-side apply of status).
            if let Some(fields) = new.pointer("/metadata/managedFields") {
                merged["metadata"]["managedFields"] = fields.clone();
            }
            match new.get("status") {
                Some(status) => merged["status"] = status.clone(),
                None => {
                    if let Some(m) = merged.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            return Ok(merged);
        }
        Some("approval") => {
            let mut merged = old.clone();
            merged["status"]["conditions"] = new
                .pointer("/status/conditions")
                .cloned()
                .unwrap_or(json!([]));
            return Ok(merged);
        }
        _ => {}
    }
    // Fields the server owns come from the stored object.
    for field in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match old.pointer(&format!("/metadata/{field}")) {
            Some(v) => new["metadata"][field] = v.clone(),
            None => {
                if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.remove(field);
                }
            }
        }
    }
    if kind.has_subresource("status") && !matches!(kind.resource, "namespaces") {
        match old.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    if kind.group == "certificates.k8s.io" {
        // A request's spec (what is asked, and who asked) never changes.
        new["spec"] = old.get("spec").cloned().unwrap_or(Value::Null);
    }
    if kind.has_spec && spec_part(&new) != spec_part(old) {
        let generation = old
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        new["metadata"]["generation"] = json!(generation + 1);
    }
    // Spec fields Kubernetes never lets change on a pod.
    if kind.resource == "pods" && kind.group.is_empty() {
        let old_node = old.pointer("/spec/nodeName");
        if old_node.is_some() && new.pointer("/spec/nodeName") != old_node {
            return Err(ApiError::invalid_field(
                kind,
                &name,
                "spec.nodeName",
                "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing tolerations), `spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
            ));
        }
    }
    Ok(new)
}

/// The stored form of an update: either a new value or, for an object whose deletion
/// was waiting only on finalizers now gone, its removal.
pub(super) fn finalized(object: &Value) -> bool {
    object.pointer("/metadata/deletionTimestamp").is_some()
        && object
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        && object
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            == 0
}

/// Reads, changes and writes back one object with compare-and-set, trying again when a
/// concurrent write won and the client did not pin a resourceVersion.
async fn read_modify_write(
    call: &Call<'_>,
    target: &Target,
    change: impl Fn(&Value) -> Result<Value, ApiError>,
    origin: Origin,
    create_if_missing: Option<&Value>,
) -> Result<Response<Body>, ApiError> {
    let kind = target.kind;
    let name = target.name.as_deref().unwrap_or("");
    let key = kind.key(target.namespace.as_deref(), name);
    let validation = FieldValidation::parse(call.q("fieldValidation"))?;
    let dry_run = call.dry_run()?;
    let manager = call.field_manager()?;
    let api_version = kind.api_version();
    for _ in 0..WRITE_ATTEMPTS {
        let Some((old, old_revision)) = read_object(call.state, &key).await? else {
            if let Some(object) = create_if_missing {
                return create_object(call, target, object.clone(), origin).await;
            }
            return Err(ApiError::not_found(kind, name));
        };
        let mut new = change(&old)?;
        check_identity(target, &mut new, Some(name))?;
        let pinned = new
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("resourceVersion {s:?} is not valid"))
                })
            })
            .transpose()?;
        if let Some(rv) = pinned
            && rv != old_revision
        {
            return Err(ApiError::modified(kind, name));
        }
        let merged = merge_update(kind, target.subresource.as_deref(), &old, new)?;
        let (mut merged, warnings) = admit(kind, merged, validation)?;
        if origin == Origin::Update {
            let now = now_rfc3339();
            let mut entries = ownership_before(kind, name, &old, &merged)?;
            managed::track_update(
                &mut entries,
                &writer(&manager, target, &api_version, &now),
                &old,
                &merged,
            );
            managed::store(&mut merged, &entries);
        }
        if dry_run {
            set_rv(&mut merged, old_revision);
            return Ok(respond_object(call, target, 200, &merged, &warnings));
        }
        let ops = if finalized(&merged) {
            vec![Op::Delete {
                key: key.clone().into_bytes(),
                expect_mod: Some(old_revision),
            }]
        } else {
            let data = encode(&merged, call.state.settings.max_object_bytes)?;
            vec![Op::Update {
                key: key.clone().into_bytes(),
                data,
                expect_mod: Some(old_revision),
            }]
        };
        match write(call.state, ops).await? {
            Written::Done(revision) => {
                set_rv(&mut merged, revision);
                return Ok(respond_object(call, target, 200, &merged, &warnings));
            }
            Written::Refused(Refusal::Conflict { .. }) if pinned.is_none() => continue,
            Written::Refused(Refusal::Conflict { .. }) => {
                return Err(ApiError::modified(kind, name));
            }
            Written::Refused(Refusal::NotFound { .. }) => {
                return Err(ApiError::not_found(kind, name));
            }
            Written::Refused(r) => {
                return Err(ApiError::internal(format!(
                    "the store refused the write: {r:?}"
                )));
            }
        }
    }
    Err(ApiError::modified(kind, name))
}

/// The ownership an ordinary write starts from: the stored object's, or what the client
/// wrote into `managedFields` when it changed them (kubectl does, to hand fields from
/// client-side to server-side apply). `[{}]` clears them, as in Kubernetes.
fn ownership_before(
    kind: &Kind,
    name: &str,
    old: &Value,
    new: &Value,
) -> Result<Vec<managed::Entry>, ApiError> {
    let incoming = new.pointer("/metadata/managedFields");
    let stored = old.pointer("/metadata/managedFields");
    let given = incoming
        .filter(|i| *i != stored.unwrap_or(&Value::Null))
        .filter(|i| i.as_array().is_none_or(|a| !a.is_empty()));
    match given {
        Some(list) if *list == json!([{}]) => Ok(Vec::new()),
        Some(_) => managed::entries(new).map_err(|e| {
            ApiError::invalid_field(kind, name, "metadata.managedFields", &e.to_string())
        }),
        None => Ok(managed::entries(old).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "stored managedFields unreadable; starting afresh");
            Vec::new()
        })),
    }
}

async fn update(call: &Call<'_>, target: &Target) -> Result<Response<Body>, ApiError> {
    let body = decode_body(&call.content_type, &call.body)?;
    // PUT creates a missing object only for kinds Kubernetes allows it for; Brink does
    // for none but leases and events, which clients upsert.
    let upsert =
        matches!(target.kind.resource, "leases" | "events") && target.subresource.is_none();
    read_modify_write(
        call,
        target,
        |_| Ok(body.clone()),
        Origin::Update,
        upsert.then_some(&body),
    )
    .await
}

/// Server-side apply: the body is the manager's whole configuration of the object.
async fn apply_patch(
    call: &Call<'_>,
    target: &Target,
    text: &str,
) -> Result<Response<Body>, ApiError> {
    let kind = target.kind;
    let name = target.name.clone().unwrap_or_default();
    if call.q("fieldManager").is_none_or(str::is_empty) {
        return Err(ApiError::bad_request(
            "PATCH, application/apply-patch+yaml: fieldManager is required for apply requests",
        ));
    }
    let force = match call.q("force") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "force {other:?} is not true or false"
            )));
        }
    };
    let yaml: serde_yaml::Value = serde_yaml::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("the apply configuration is not YAML: {e}")))?;
    let mut config = serde_json::to_value(yaml).map_err(|e| {
        ApiError::bad_request(format!("the apply configuration is not an object: {e}"))
    })?;
    if !config.is_object()
        || config.get("apiVersion").and_then(Value::as_str).is_none()
        || config.get("kind").and_then(Value::as_str).is_none()
    {
        return Err(ApiError::bad_request(
            "the apply configuration must be an object with apiVersion and kind",
        ));
    }
    check_identity(target, &mut config, Some(&name))?;
    if config.pointer("/metadata/managedFields").is_some() {
        return Err(ApiError::bad_request(
            "metadata.managedFields must be nil in an apply configuration",
        ));
    }
    let manager = call.field_manager()?;
    let api_version = kind.api_version();
    let subresource = target.subresource.clone();
    let change = |old: &Value| {
        let mut live = old.clone();
        if let Some(m) = live.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        let mut entries = managed::entries(old).unwrap_or_default();
        let now = now_rfc3339();
        let w = managed::Writer {
            manager: &manager,
            api_version: &api_version,
            subresource: subresource.as_deref(),
            now: &now,
        };
        let mut merged = match managed::apply(&live, &config, &mut entries, &w, force) {
            // kubectl moving an object from client-side to server-side apply takes the
            // fields its last client-side configuration set, as kube-apiserver lets it.
            Err(conflicts) if manager == "kubectl" => {
                let taken = managed::taken_over_from_client_side_apply(old, &api_version);
                match taken {
                    Some(taken) if conflicts.0.iter().all(|(_, p)| taken.contains(p)) => {
                        managed::apply(&live, &config, &mut entries, &w, true)
                    }
                    _ => Err(conflicts),
                }
            }
            other => other,
        }
        .map_err(|c| ApiError::apply_conflict(kind, &name, &c))?;
        managed::store(&mut merged, &entries);
        Ok(merged)
    };
    // Applying to a missing object creates it (not through a subresource).
    let create = subresource.is_none().then_some(&config);
    read_modify_write(call, target, change, Origin::Apply, create).await
}

async fn patch_object(call: &Call<'_>, target: &Target) -> Result<Response<Body>, ApiError> {
    let media = call.media_type();
    let text = std::str::from_utf8(&call.body)
        .map_err(|_| ApiError::bad_request("the patch is not UTF-8"))?;
    brink_proto::meta::check_nesting(text, brink_proto::meta::MAX_NESTING)
        .map_err(|e| ApiError::bad_request(format!("the patch is {e}")))?;
    let apply: PatchFn = match media.as_str() {
        "application/json-patch+json" => patch::json_patch,
        "application/merge-patch+json" => patch::merge_patch,
        "application/strategic-merge-patch+json" => patch::strategic_merge_patch,
        "application/apply-patch+yaml" => return apply_patch(call, target, text).await,
        _ if call.q("force").is_some() => {
            return Err(ApiError::new(
                422,
                "Invalid",
                "PatchOptions.meta.k8s.io \"\" is invalid: force: Forbidden: may not be specified for non-apply patch",
            ));
        }
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json; got {other:?}"
                ),
            ));
        }
    };
    let body = call.body.clone();
    let kind = target.kind;
    let name = target.name.clone().unwrap_or_default();
    read_modify_write(
        call,
        target,
        move |old| {
            let mut doc = old.clone();
            apply(&mut doc, &body).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("{} {name:?} is invalid: {e}", kind.kind),
                )
            })?;
            // The patch sees the stored resourceVersion (JSON patches `test` it, kubectl's
            // managedFields upgrade `replace`s it); it pins one only by changing it, so a
            // patch that leaves it alone is retried on a newer object.
            let stored = old.pointer("/metadata/resourceVersion");
            if doc.pointer("/metadata/resourceVersion") == stored
                && let Some(m) = doc.get_mut("metadata").and_then(Value::as_object_mut)
            {
                m.remove("resourceVersion");
            }
            Ok(doc)
        },
        Origin::Update,
        None,
    )
    .await
}

#[derive(Default)]
struct DeleteOptions {
    grace_period: Option<i64>,
    propagation: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
}

fn delete_options(call: &Call<'_>) -> Result<DeleteOptions, ApiError> {
    let mut options = DeleteOptions::default();
    if !call.body.is_empty() {
        let body = decode_body(&call.content_type, &call.body)?;
        options.grace_period = body.get("gracePeriodSeconds").and_then(Value::as_i64);
        options.propagation = body
            .get("propagationPolicy")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if body.get("orphanDependents").and_then(Value::as_bool) == Some(true) {
            options.propagation = Some("Orphan".into());
        }
        options.uid = body
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(str::to_owned);
        options.resource_version = body
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    if let Some(g) = call.q("gracePeriodSeconds") {
        options.grace_period = Some(
            g.parse()
                .map_err(|_| ApiError::bad_request("gracePeriodSeconds must be a number"))?,
        );
    }
    if let Some(p) = call.q("propagationPolicy") {
        options.propagation = Some(p.to_owned());
    }
    match options.propagation.as_deref() {
        None | Some("Background") | Some("Foreground") | Some("Orphan") => Ok(options),
        Some(other) => Err(ApiError::bad_request(format!(
            "propagationPolicy {other:?} is not Background, Foreground or Orphan"
        ))),
    }
}

async fn delete(call: &Call<'_>, target: &Target) -> Result<Response<Body>, ApiError> {
    let options = delete_options(call)?;
    let dry_run = call.dry_run()?;
    let kind = target.kind;
    let name = target.name.as_deref().unwrap_or("");
    let key = kind.key(target.namespace.as_deref(), name);
    for _ in 0..WRITE_ATTEMPTS {
        let Some((old, revision)) = read_object(call.state, &key).await? else {
            return Err(ApiError::not_found(kind, name));
        };
        if let Some(uid) = &options.uid
            && old.pointer("/metadata/uid").and_then(Value::as_str) != Some(uid)
        {
            return Err(ApiError::conflict(
                kind,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    old.pointer("/metadata/uid")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                ),
            ));
        }
        if let Some(rv) = &options.resource_version
            && *rv != revision.to_string()
        {
            return Err(ApiError::conflict(
                kind,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {revision}"
                ),
            ));
        }
        let mut finalizers: Vec<Value> = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        match options.propagation.as_deref() {
            Some("Foreground") if !finalizers.contains(&json!("foregroundDeletion")) => {
                finalizers.push(json!("foregroundDeletion"))
            }
            Some("Orphan") if !finalizers.contains(&json!("orphan")) => {
                finalizers.push(json!("orphan"))
            }
            _ => {}
        }
        // A pod on a node is deleted gracefully: marked, then removed when its node
        // confirms (or at once with a grace period of 0, or when it never ran).
        let is_pod = kind.group.is_empty() && kind.resource == "pods";
        let phase = old
            .pointer("/status/phase")
            .and_then(Value::as_str)
            .unwrap_or("");
        let grace = if is_pod
            && old.pointer("/spec/nodeName").is_some()
            && !matches!(phase, "Succeeded" | "Failed")
        {
            options
                .grace_period
                .unwrap_or_else(|| {
                    old.pointer("/spec/terminationGracePeriodSeconds")
                        .and_then(Value::as_i64)
                        .unwrap_or(30)
                })
                .max(0)
        } else {
            0
        };
        let namespace_kind = kind.group.is_empty() && kind.resource == "namespaces";
        let immediate = finalizers.is_empty() && grace == 0 && !namespace_kind;
        let (ops, mut answer, code) = if immediate {
            (
                vec![Op::Delete {
                    key: key.clone().into_bytes(),
                    expect_mod: Some(revision),
                }],
                old.clone(),
                200,
            )
        } else {
            let mut marked = old.clone();
            if old.pointer("/metadata/deletionTimestamp").is_none() {
                let now = jiff::Timestamp::now();
                let at = now
                    .checked_add(jiff::SignedDuration::from_secs(
                        grace.min(MAX_GRACE_SECONDS),
                    ))
                    .unwrap_or(now);
                marked["metadata"]["deletionTimestamp"] =
                    json!(at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
                marked["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            } else if old
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .is_some_and(|g| grace < g)
            {
                marked["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            }
            if !finalizers.is_empty() {
                marked["metadata"]["finalizers"] = json!(finalizers);
            }
            if namespace_kind {
                marked["status"] = json!({"phase": "Terminating"});
            }
            if marked == old {
                return Ok(respond_object(call, target, 202, &old, &[]));
            }
            let data = encode(&marked, call.state.settings.max_object_bytes)?;
            (
                vec![Op::Update {
                    key: key.clone().into_bytes(),
                    data,
                    expect_mod: Some(revision),
                }],
                marked,
                202,
            )
        };
        if dry_run {
            return Ok(respond_object(call, target, code, &answer, &[]));
        }
        match write(call.state, ops).await? {
            Written::Done(new_revision) => {
                set_rv(&mut answer, new_revision);
                if namespace_kind {
                    call.state.namespace_deleted.notify_one();
                }
                call.state.gc_wake.notify_one();
                if immediate && !kind.has_spec && !is_pod {
                    return Ok(json_response(200, &success(kind, name), &[]));
                }
                return Ok(respond_object(call, target, code, &answer, &[]));
            }
            Written::Refused(Refusal::Conflict { .. }) => continue,
            Written::Refused(Refusal::NotFound { .. }) => {
                return Err(ApiError::not_found(kind, name));
            }
            Written::Refused(r) => {
                return Err(ApiError::internal(format!(
                    "the store refused the delete: {r:?}"
                )));
            }
        }
    }
    Err(ApiError::modified(kind, name))
}

async fn delete_collection(call: &Call<'_>, target: &Target) -> Result<Response<Body>, ApiError> {
    let selection = Selection::parse(call, target.kind)?;
    consistent(call.state).await?;
    let (all, _) = call
        .state
        .cache
        .list(&target.kind.prefix(target.namespace.as_deref()));
    let mut deleted = Vec::new();
    for object in all.iter().filter(|o| selection.matches(o)) {
        let one = Target {
            kind: target.kind,
            namespace: object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .map(str::to_owned),
            name: Some(name_of(object)),
            subresource: None,
            watch_path: false,
        };
        match delete(call, &one).await {
            Ok(_) => deleted.push((**object).clone()),
            Err(e) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(json_response(
        200,
        &json!({"kind": format!("{}List", target.kind.kind), "apiVersion": target.kind.api_version(), "metadata": {}, "items": deleted}),
        &[],
    ))
}

/// RuntimeClass admission: a pod naming a RuntimeClass gets its scheduling rules (the
/// nodeSelector merged, the tolerations added), as kube-apiserver's RuntimeClass plugin
/// does; a class that does not exist, or a nodeSelector that contradicts it, refuses the
/// pod with kube-apiserver's words.
fn runtime_class(cache: &super::Cache, pod: &mut Value) -> Result<(), ApiError> {
    let Some(class) = pod
        .pointer("/spec/runtimeClassName")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return Ok(());
    };
    let Some(stored) = cache.get(&format!("/registry/node.k8s.io/runtimeclasses/{class}")) else {
        return Err(ApiError::forbidden(format!(
            "pod rejected: RuntimeClass {class:?} not found"
        )));
    };
    if let Some(selector) = stored
        .pointer("/scheduling/nodeSelector")
        .and_then(Value::as_object)
    {
        if !pod
            .pointer("/spec/nodeSelector")
            .is_some_and(Value::is_object)
        {
            pod["spec"]["nodeSelector"] = json!({});
        }
        for (key, value) in selector {
            match pod["spec"]["nodeSelector"].get(key) {
                Some(existing) if existing != value => {
                    return Err(ApiError::forbidden(format!(
                        "pod rejected: conflict: runtimeClass.scheduling.nodeSelector[{key}] = {}; pod.spec.nodeSelector[{key}] = {}",
                        value.as_str().unwrap_or_default(),
                        existing.as_str().unwrap_or_default()
                    )));
                }
                _ => pod["spec"]["nodeSelector"][key] = value.clone(),
            }
        }
    }
    let extra: Vec<Value> = stored
        .pointer("/scheduling/tolerations")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !extra.is_empty() {
        let mut tolerations: Vec<Value> = pod
            .pointer("/spec/tolerations")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for t in extra {
            if !tolerations.contains(&t) {
                tolerations.push(t);
            }
        }
        pod["spec"]["tolerations"] = json!(tolerations);
    }
    Ok(())
}

/// DefaultTolerationSeconds: a pod that does not say how long it stays on a not-ready
/// or unreachable node stays `seconds`, then is evicted.
fn default_tolerations(pod: &mut Value, seconds: i64) {
    if !pod.get("spec").is_some_and(Value::is_object) {
        return;
    }
    let mut tolerations: Vec<Value> = pod
        .pointer("/spec/tolerations")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        let covered = tolerations.iter().any(|t| {
            let effect = t.get("effect").and_then(Value::as_str).unwrap_or("");
            let operator = t.get("operator").and_then(Value::as_str).unwrap_or("Equal");
            let tkey = t.get("key").and_then(Value::as_str).unwrap_or("");
            (effect.is_empty() || effect == "NoExecute")
                && (tkey == key || (tkey.is_empty() && operator == "Exists"))
        });
        if !covered {
            tolerations.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds}));
        }
    }
    pod["spec"]["tolerations"] = json!(tolerations);
}

/// A Job without `manualSelector` gets the selector and pod labels kube-apiserver gives
/// it: the Job's uid and name, so `kubectl logs job/NAME` and `get pods -l` find its pods.
fn job_selector(job: &mut Value) {
    if job.pointer("/spec/manualSelector").and_then(Value::as_bool) == Some(true)
        || !job.get("spec").is_some_and(Value::is_object)
    {
        return;
    }
    let uid = job.pointer("/metadata/uid").cloned().unwrap_or(Value::Null);
    let name = job
        .pointer("/metadata/name")
        .cloned()
        .unwrap_or(Value::Null);
    job["spec"]["selector"] = json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
    if !job
        .pointer("/spec/template/metadata")
        .is_some_and(Value::is_object)
    {
        if !job.pointer("/spec/template").is_some_and(Value::is_object) {
            job["spec"]["template"] = json!({});
        }
        job["spec"]["template"]["metadata"] = json!({});
    }
    let labels = &mut job["spec"]["template"]["metadata"]["labels"];
    if !labels.is_object() {
        *labels = json!({});
    }
    for (key, value) in [
        ("batch.kubernetes.io/controller-uid", &uid),
        ("batch.kubernetes.io/job-name", &name),
        ("controller-uid", &uid),
        ("job-name", &name),
    ] {
        labels[key] = value.clone();
    }
}

/// `pods/eviction` (what `kubectl drain` posts): the pod is deleted with the Eviction's
/// deleteOptions. Brink has no PodDisruptionBudgets, so no eviction is refused for one
/// (said in the README); a pod that is gone is NotFound, as in Kubernetes.
async fn evict(call: &Call<'_>, target: &Target) -> Result<Response<Body>, ApiError> {
    let eviction = decode_body(&call.content_type, &call.body)?;
    let name = target.name.clone().unwrap_or_default();
    if let Some(named) = eviction.pointer("/metadata/name").and_then(Value::as_str)
        && named != name
    {
        return Err(ApiError::bad_request(format!(
            "name in URL does not match name in Eviction object: {name} vs {named}"
        )));
    }
    let options = eviction
        .get("deleteOptions")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let inner = Call {
        state: call.state,
        user: call.user,
        method: Method::DELETE,
        query: call
            .query
            .iter()
            .filter(|(k, _)| k.as_str() == "dryRun")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        accept: "application/json".into(),
        content_type: "application/json".into(),
        user_agent: call.user_agent.clone(),
        body: Bytes::from(serde_json::to_vec(&options).unwrap_or_default()),
    };
    let plain = Target {
        subresource: None,
        ..target.clone()
    };
    delete(&inner, &plain).await?;
    Ok(json_response(
        201,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        &[],
    ))
}

/// `pods/log`: from the node running the pod (see [`super::pod_log`]).
async fn pod_log(call: &Call<'_>, target: &Target) -> Result<Response<Body>, ApiError> {
    let name = target.name.clone().unwrap_or_default();
    let key = target.kind.key(target.namespace.as_deref(), &name);
    let Some((pod, _)) = read_object(call.state, &key).await? else {
        return Err(ApiError::not_found(target.kind, &name));
    };
    let container = super::pod_log::container(&pod, &name, call.q("container"))?;
    let Some(node) = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    else {
        return Err(ApiError::bad_request(format!(
            "pod {name} does not have a host assigned"
        )));
    };
    if call.q("previous").is_some_and(|p| p == "true") {
        return Err(ApiError::bad_request(
            "previous=true is not supported by Brink nodes yet: a restarted container's log continues in one file",
        ));
    }
    let address = call
        .state
        .cache
        .get(&format!("/registry/core/nodes/{node}"))
        .and_then(|n| super::pod_log::kubelet_address(&n))
        .ok_or_else(|| {
            ApiError::unavailable(format!(
                "node {node:?} has no address the API server can reach its kubelet endpoint at"
            ))
        })?;
    let mut query = Vec::new();
    for (key, wanted) in [
        ("tailLines", "tailLines"),
        ("timestamps", "timestamps"),
        ("follow", "follow"),
    ] {
        if let Some(value) = call.q(key) {
            if key == "tailLines" && value.parse::<u64>().is_err() {
                return Err(ApiError::bad_request(format!(
                    "tailLines must be a number, not {value:?}"
                )));
            }
            let value: String = value
                .chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .collect();
            query.push(format!("{wanted}={value}"));
        }
    }
    let namespace = target.namespace.as_deref().unwrap_or("default");
    let path = format!(
        "/containerLogs/{namespace}/{name}/{container}{}{}",
        if query.is_empty() { "" } else { "?" },
        query.join("&")
    );
    super::pod_log::proxy(&address, &path).await
}

/// `pods/binding`: sets `spec.nodeName` once, as one compare-and-set.
async fn bind(call: &Call<'_>, target: &Target) -> Result<Response<Body>, ApiError> {
    let binding = decode_body(&call.content_type, &call.body)?;
    let node = binding
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::invalid_field(
                target.kind,
                target.name.as_deref().unwrap_or(""),
                "target.name",
                "Required value",
            )
        })?
        .to_owned();
    let kind = target.kind;
    let name = target.name.clone().unwrap_or_default();
    let key = kind.key(target.namespace.as_deref(), &name);
    let Some((mut pod, revision)) = read_object(call.state, &key).await? else {
        return Err(ApiError::not_found(kind, &name));
    };
    if let Some(existing) = pod.pointer("/spec/nodeName").and_then(Value::as_str) {
        return Err(ApiError::conflict(
            kind,
            &name,
            &format!("pod {name} is already assigned to node {existing:?}"),
        ));
    }
    if pod.pointer("/metadata/deletionTimestamp").is_some() {
        return Err(ApiError::conflict(
            kind,
            &name,
            "pod is being deleted, cannot be assigned to a host",
        ));
    }
    pod["spec"]["nodeName"] = json!(node);
    // As kube-apiserver's binding: the pod says it is scheduled (replacing the
    // Unschedulable condition a scheduler may have left while it waited).
    let scheduled =
        json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": now_rfc3339()});
    let mut conditions: Vec<Value> = pod
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    conditions.retain(|c| c.get("type").and_then(Value::as_str) != Some("PodScheduled"));
    conditions.push(scheduled);
    if !pod.get("status").is_some_and(Value::is_object) {
        pod["status"] = json!({});
    }
    pod["status"]["conditions"] = json!(conditions);
    let data = encode(&pod, call.state.settings.max_object_bytes)?;
    match write(
        call.state,
        vec![Op::Update {
            key: key.into_bytes(),
            data,
            expect_mod: Some(revision),
        }],
    )
    .await?
    {
        Written::Done(_) => Ok(json_response(
            201,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
            &[],
        )),
        Written::Refused(_) => Err(ApiError::modified(kind, &name)),
    }
}

/// Reads a request body up to `max` bytes within `wait`.
pub async fn read_body(
    body: hyper::body::Incoming,
    max: usize,
    wait: Duration,
) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, max);
    match tokio::time::timeout(wait, limited.collect()).await {
        Err(_) => Err(ApiError::new(
            408,
            "Timeout",
            "the request body did not arrive in time",
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(
            format!("the request body is larger than {max} bytes"),
        )),
        Ok(Err(e)) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Serves one HTTP request.
pub async fn serve_request(
    state: Arc<ApiState>,
    user: Option<User>,
    request: Request<hyper::body::Incoming>,
) -> Response<Body> {
    use tracing::Instrument as _;
    let request_id = state.requests.fetch_add(1, Ordering::Relaxed);
    let span = tracing::debug_span!("api", request = request_id, method = %request.method(), path = %request.uri().path());
    serve_request_in_span(state, user, request, request_id)
        .instrument(span)
        .await
}

/// A request header as text ("" when absent or not text).
fn header_text(headers: &http::HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

async fn serve_request_in_span(
    state: Arc<ApiState>,
    user: Option<User>,
    request: Request<hyper::body::Incoming>,
    request_id: u64,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let accept = header_text(&parts.headers, "accept");
    // Health and version answer without credentials, as Kubernetes' public-info-viewer
    // role allows; everything else needs a user.
    let public = matches!(
        path.as_str(),
        "/healthz" | "/livez" | "/readyz" | "/version"
    );
    let user = match user.or_else(|| {
        parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .and_then(|t| {
                state.tokens.find(t).cloned().or_else(|| {
                    super::auth::bootstrap_user(&state.cache, t, jiff::Timestamp::now())
                })
            })
    }) {
        Some(user) => user,
        // cluster-info is how a joining node learns the CA it then checks against its
        // pin: readable without credentials, through RBAC like any request.
        None if public || (parts.method == Method::GET && path == super::cluster_info::PATH) => {
            User {
                name: "system:anonymous".into(),
                uid: String::new(),
                groups: vec!["system:unauthenticated".into()],
            }
        }
        None => return error_response(&ApiError::unauthorized()),
    };
    if public && let Some(response) = non_resource(&state, &path, &accept) {
        return response;
    }
    let query = match parse_query(parts.uri.query()) {
        Ok(q) => q,
        Err(e) => return error_response(&e),
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let target = match route(&segments) {
        Ok(t) => t,
        Err(e) => return error_response(&e),
    };
    let Some(target) = target else {
        let attrs = Attributes {
            verb: "get",
            resource: None,
            path: &path,
        };
        if let Err(why) = authorize(&state.cache, &user, &attrs) {
            return error_response(&ApiError::forbidden(why));
        }
        if parts.method != Method::GET && parts.method != Method::HEAD {
            return error_response(&ApiError::method_not_allowed(format!(
                "{} is not allowed on {path}",
                parts.method
            )));
        }
        return non_resource(&state, &path, &accept)
            .unwrap_or_else(|| error_response(&ApiError::no_route()));
    };
    let body = match read_body(
        body,
        state.settings.max_body_bytes,
        state.settings.body_read_timeout,
    )
    .await
    {
        Ok(b) => b,
        Err(e) => return error_response(&e),
    };
    let content_type = header_text(&parts.headers, "content-type");
    let user_agent = header_text(&parts.headers, "user-agent");
    let mutating = !matches!(parts.method, Method::GET | Method::HEAD);
    let method = parts.method.clone();
    let kind = target.kind.qualified();
    let name = target.name.clone().unwrap_or_default();
    let namespace = target.namespace.clone().unwrap_or_default();
    let response = resource(
        Call {
            state: &state,
            user: &user,
            method: parts.method,
            query,
            accept,
            content_type,
            user_agent,
            body,
        },
        target,
    )
    .await;
    if mutating {
        tracing::info!(
            target: "brink::audit",
            request = request_id,
            user = %user.name,
            verb = %method,
            resource = %kind,
            namespace = %namespace,
            name = %name,
            code = response.status().as_u16(),
            "audit"
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_as_kube_apiserver_routes_them() {
        let r = |p: &str| {
            let segments: Vec<&str> = p.trim_matches('/').split('/').collect();
            route(&segments).expect("route").map(|t| {
                (
                    t.kind.resource,
                    t.namespace,
                    t.name,
                    t.subresource,
                    t.watch_path,
                )
            })
        };
        assert_eq!(r("/api/v1/pods"), Some(("pods", None, None, None, false)));
        assert_eq!(
            r("/api/v1/namespaces/a/pods/p/status"),
            Some((
                "pods",
                Some("a".into()),
                Some("p".into()),
                Some("status".into()),
                false
            ))
        );
        assert_eq!(
            r("/api/v1/namespaces/a"),
            Some(("namespaces", None, Some("a".into()), None, false))
        );
        assert_eq!(
            r("/api/v1/namespaces/a/finalize"),
            Some((
                "namespaces",
                None,
                Some("a".into()),
                Some("finalize".into()),
                false
            ))
        );
        assert_eq!(
            r("/api/v1/namespaces"),
            Some(("namespaces", None, None, None, false))
        );
        assert_eq!(
            r("/apis/apps/v1/namespaces/x/deployments/d/scale"),
            Some((
                "deployments",
                Some("x".into()),
                Some("d".into()),
                Some("scale".into()),
                false
            ))
        );
        assert_eq!(
            r("/api/v1/watch/namespaces/a/pods"),
            Some(("pods", Some("a".into()), None, None, true))
        );
        assert_eq!(
            r("/api/v1/nodes/n1"),
            Some(("nodes", None, Some("n1".into()), None, false))
        );
        // Cluster-scoped kinds have no namespace; namespaced ones need one to name an object.
        assert_eq!(r("/api/v1/namespaces/a/nodes/n1"), None);
        assert_eq!(r("/api/v1/pods/p"), None);
        assert_eq!(r("/api/v1/namespaces/a/pods/p/exec"), None);
        assert_eq!(r("/apis/apps/v2/deployments"), None);
        assert_eq!(r("/api/v1/widgets"), None);
        assert!(route(&["api", "v1", "namespaces", "..", "pods"]).is_err());
    }

    #[test]
    fn bodies_are_checked_against_the_path() {
        let pods = kinds::find("", "v1", "pods").expect("pods");
        let target = Target {
            kind: pods,
            namespace: Some("a".into()),
            name: None,
            subresource: None,
            watch_path: false,
        };
        let mut wrong_kind =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
        assert_eq!(
            check_identity(&target, &mut wrong_kind, None)
                .expect_err("kind")
                .code,
            400
        );
        let mut wrong_ns =
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "namespace": "b"}});
        assert_eq!(
            check_identity(&target, &mut wrong_ns, None)
                .expect_err("ns")
                .code,
            400
        );
        let mut unknown = json!({"apiVersion": "v9", "kind": "Pod", "metadata": {}});
        assert!(
            check_identity(&target, &mut unknown, None)
                .expect_err("v9")
                .message
                .contains("no kind")
        );
        let mut fine = json!({"metadata": {"name": "x"}});
        check_identity(&target, &mut fine, None).expect("fills in");
        assert_eq!(fine["metadata"]["namespace"], "a");
        assert_eq!(fine["kind"], "Pod");
        for bad in ["[", "{\"a\": }", "\u{0}"] {
            assert!(decode_body("application/json", bad.as_bytes()).is_err());
        }
        assert_eq!(
            decode_body("application/vnd.kubernetes.protobuf", b"x")
                .expect_err("protobuf")
                .code,
            400
        );
        assert_eq!(
            decode_body("application/cbor", b"x")
                .expect_err("cbor")
                .code,
            415
        );
        assert!(decode_body("application/json", "[".repeat(100_000).as_bytes()).is_err());
        assert!(decode_body("application/json", &[0xff, 0xfe]).is_err());
        assert!(parse_query(Some("key=%FF")).is_err());
        assert!(parse_query(Some("key=%4")).is_err());
        let q = parse_query(Some("labelSelector=app%3Dweb%2Ctier+in+(a)&limit=5")).expect("query");
        assert_eq!(q["labelSelector"], "app=web,tier in (a)");
        assert_eq!(q["limit"], "5");
    }
}
