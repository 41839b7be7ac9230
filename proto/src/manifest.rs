//! Manifests: YAML or JSON text, several documents per file, into validated `v1` Pods,
//! ConfigMaps, Secrets, Services and Namespaces, and Gateway API GatewayClasses,
//! Gateways, HTTPRoutes and ReferenceGrants.
//!
//! Parsing is strict the way `kubectl apply` is with server-side field validation: a YAML
//! syntax error, a field of the wrong type, a field Kubernetes does not know, or a value
//! Brink cannot honour (a UDP port, an `exec` probe) is an error naming the source, the
//! document and the field. A file with any error yields no objects at all, so a half-valid
//! file never starts half its pods.

use std::collections::HashSet;
use std::fmt;

use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use gateway_api::httproutes::HttpRoute;
use gateway_api::referencegrants::ReferenceGrant;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Pod, Probe, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use thiserror::Error;

use crate::meta::{FieldError, field_err, is_dns_label, validate_name_and_namespace};
use crate::quantity::parse_bytes;

/// The most containers one pod may hold: each is an instance, a log file and a share of
/// its sandbox, and Kubernetes' own object size limit would allow thousands.
pub const MAX_CONTAINERS: usize = 64;
/// The restart policies Kubernetes defines; anything else is refused.
pub const RESTART_POLICIES: [&str; 3] = ["Always", "OnFailure", "Never"];
/// The image pull policies Kubernetes defines.
pub const PULL_POLICIES: [&str; 3] = ["Always", "IfNotPresent", "Never"];
/// Downward-API fields a wasm container may read through `env[].valueFrom.fieldRef`.
pub const SUPPORTED_FIELD_REFS: [&str; 4] = [
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
];

/// What is wrong with a manifest, and where.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// The file (or other source) the text came from.
    pub source_name: String,
    /// 1-based index of the YAML document within the source.
    pub document: usize,
    /// Dotted path of the field at fault, when one is known (`spec.containers[0].image`).
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.source_name, self.document)?;
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A validated pod and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct PodManifest {
    pub pod: Pod,
    pub document: usize,
}

impl PodManifest {
    /// `namespace/name`, the pod's identity on a node.
    pub fn key(&self) -> String {
        pod_key(&self.pod)
    }
}

/// One validated object of a kind Brink reads from manifests.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Pod(Box<PodManifest>),
    ConfigMap(ConfigMap),
    Secret(Secret),
    Service(Box<Service>),
    Namespace(Namespace),
    GatewayClass(Box<GatewayClass>),
    Gateway(Box<Gateway>),
    HttpRoute(Box<crate::gateway::RouteManifest>),
    ReferenceGrant(Box<ReferenceGrant>),
}

impl Object {
    /// The object's kind, as a manifest spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Pod(_) => "Pod",
            Object::ConfigMap(_) => "ConfigMap",
            Object::Secret(_) => "Secret",
            Object::Service(_) => "Service",
            Object::Namespace(_) => "Namespace",
            Object::GatewayClass(_) => "GatewayClass",
            Object::Gateway(_) => "Gateway",
            Object::HttpRoute(_) => "HTTPRoute",
            Object::ReferenceGrant(_) => "ReferenceGrant",
        }
    }

    /// `namespace/name` (just `name` for cluster-scoped kinds), unique among objects of
    /// one kind.
    pub fn key(&self) -> String {
        match self {
            Object::Pod(p) => p.key(),
            Object::ConfigMap(c) => object_key(&c.metadata),
            Object::Secret(s) => object_key(&s.metadata),
            Object::Service(s) => object_key(&s.metadata),
            Object::Namespace(n) => n.metadata.name.clone().unwrap_or_default(),
            Object::GatewayClass(c) => c.metadata.name.clone().unwrap_or_default(),
            Object::Gateway(g) => object_key(&g.metadata),
            Object::HttpRoute(r) => object_key(&r.route.metadata),
            Object::ReferenceGrant(g) => object_key(&g.metadata),
        }
    }
}

/// `namespace/name` of a validated object's metadata.
pub fn object_key(metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        metadata.namespace.as_deref().unwrap_or("default"),
        metadata.name.as_deref().unwrap_or_default()
    )
}

/// `namespace/name` of a validated pod.
pub fn pod_key(pod: &Pod) -> String {
    object_key(&pod.metadata)
}

/// Parses every document in `text`. Empty documents are skipped. Any error anywhere means
/// no objects from this source.
pub fn parse_manifests(source_name: &str, text: &str) -> Result<Vec<Object>, ManifestError> {
    let mut objects = Vec::new();
    let mut keys = HashSet::new();
    crate::meta::check_nesting(text, crate::meta::MAX_NESTING).map_err(|message| {
        ManifestError {
            source_name: source_name.to_string(),
            document: 1,
            field: None,
            message,
        }
    })?;
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc_no = index + 1;
        let err = |field: Option<String>, message: String| ManifestError {
            source_name: source_name.to_string(),
            document: doc_no,
            field,
            message,
        };
        let value = serde_yaml::Value::deserialize(document)
            .map_err(|e| err(None, format!("invalid YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let object = parse_object(value, doc_no).map_err(|e| err(Some(e.field), e.message))?;
        if !keys.insert((object.kind(), object.key())) {
            return Err(err(
                Some("metadata.name".into()),
                format!(
                    "{} {} is defined twice in this file",
                    object.kind(),
                    object.key()
                ),
            ));
        }
        objects.push(object);
    }
    Ok(objects)
}

/// The kinds Brink reads, and the apiVersions each may carry (the first is the one to
/// write).
const KINDS: [(&str, &[&str]); 9] = [
    ("Pod", &["v1"]),
    ("ConfigMap", &["v1"]),
    ("Secret", &["v1"]),
    ("Service", &["v1"]),
    ("Namespace", &["v1"]),
    (
        "GatewayClass",
        &[
            "gateway.networking.k8s.io/v1",
            "gateway.networking.k8s.io/v1beta1",
        ],
    ),
    (
        "Gateway",
        &[
            "gateway.networking.k8s.io/v1",
            "gateway.networking.k8s.io/v1beta1",
        ],
    ),
    (
        "HTTPRoute",
        &[
            "gateway.networking.k8s.io/v1",
            "gateway.networking.k8s.io/v1beta1",
        ],
    ),
    (
        "ReferenceGrant",
        &[
            "gateway.networking.k8s.io/v1beta1",
            "gateway.networking.k8s.io/v1",
        ],
    ),
];

fn parse_object(value: serde_yaml::Value, document: usize) -> Result<Object, FieldError> {
    let serde_yaml::Value::Mapping(map) = &value else {
        return Err(field_err(
            "",
            "a manifest must be a mapping with apiVersion and kind",
        ));
    };
    let text_field = |name: &str| map.get(name).and_then(|v| v.as_str()).map(str::to_string);
    let kind = text_field("kind").ok_or_else(|| field_err("kind", "required"))?;
    let api_version =
        text_field("apiVersion").ok_or_else(|| field_err("apiVersion", "required"))?;
    let Some((_, expected)) = KINDS.iter().find(|(k, _)| *k == kind) else {
        let known: Vec<&str> = KINDS.iter().map(|(k, _)| *k).collect();
        return Err(field_err(
            "kind",
            format!(
                "kind {kind:?} is not supported here (only {})",
                known.join(", ")
            ),
        ));
    };
    if !expected.contains(&api_version.as_str()) {
        return Err(field_err(
            "apiVersion",
            format!(
                "a {kind} has apiVersion {:?}, not {api_version:?}",
                expected[0]
            ),
        ));
    }
    match kind.as_str() {
        "ConfigMap" => {
            let mut config_map: ConfigMap = strict(value)?;
            crate::config::validate_config_map(&mut config_map)?;
            Ok(Object::ConfigMap(config_map))
        }
        "Secret" => {
            let mut secret: Secret = strict(value)?;
            crate::config::validate_secret(&mut secret)?;
            Ok(Object::Secret(secret))
        }
        "Service" => {
            let mut service: Service = strict(value)?;
            crate::gateway::validate_service(&mut service)?;
            Ok(Object::Service(Box::new(service)))
        }
        "Namespace" => {
            let mut namespace: Namespace = strict(value)?;
            crate::gateway::validate_namespace(&mut namespace)?;
            Ok(Object::Namespace(namespace))
        }
        "GatewayClass" => {
            let mut class: GatewayClass = strict(without_type_fields(value))?;
            crate::gateway::validate_gateway_class(&mut class)?;
            Ok(Object::GatewayClass(Box::new(class)))
        }
        "Gateway" => {
            let mut gateway: Gateway = strict(without_type_fields(value))?;
            crate::gateway::validate_gateway(&mut gateway)?;
            Ok(Object::Gateway(Box::new(gateway)))
        }
        "ReferenceGrant" => {
            let mut grant: ReferenceGrant = strict(without_type_fields(value))?;
            crate::gateway::validate_reference_grant(&mut grant)?;
            Ok(Object::ReferenceGrant(Box::new(grant)))
        }
        "HTTPRoute" => {
            let value = without_type_fields(value);
            let metadata = value
                .get("metadata")
                .cloned()
                .ok_or_else(|| field_err("metadata", "required"))
                .and_then(|m| {
                    strict::<ObjectMeta>(m).map_err(|e| FieldError {
                        field: format!("metadata.{}", e.field),
                        ..e
                    })
                });
            let parent_refs = value
                .get("spec")
                .and_then(|s| s.get("parentRefs"))
                .cloned()
                .and_then(|refs| serde_yaml::from_value(refs).ok());
            let parsed = strict::<HttpRoute>(value);
            let route = crate::gateway::route_from_parse(parsed, metadata, parent_refs)?;
            Ok(Object::HttpRoute(Box::new(route)))
        }
        _ => {
            let mut value = value;
            yaml11_octal_modes(&mut value);
            let mut pod: Pod = strict(value)?;
            validate_pod(&mut pod)?;
            Ok(Object::Pod(Box::new(PodManifest { pod, document })))
        }
    }
}

/// The generated Gateway API types carry no type fields (they are checked above, and
/// v1beta1 has the same schema as v1).
fn without_type_fields(mut value: serde_yaml::Value) -> serde_yaml::Value {
    if let Some(map) = value.as_mapping_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    value
}

/// File modes in volume sources (`defaultMode: 0400`) are octal in the YAML 1.1 that
/// kubectl reads; the YAML 1.2 parser here sees a string. Only these fields are rewritten,
/// so text elsewhere (a ConfigMap value "0644") stays text.
fn yaml11_octal_modes(pod: &mut serde_yaml::Value) {
    fn octal(value: &mut serde_yaml::Value) {
        let Some(text) = value.as_str() else { return };
        let digits = text
            .strip_prefix("0o")
            .or_else(|| text.strip_prefix('0').filter(|d| !d.is_empty()));
        if let Some(mode) = digits.and_then(|d| i64::from_str_radix(d, 8).ok()) {
            *value = serde_yaml::Value::Number(mode.into());
        }
    }
    let volumes = pod
        .get_mut("spec")
        .and_then(|s| s.get_mut("volumes"))
        .and_then(|v| v.as_sequence_mut());
    for volume in volumes.into_iter().flatten() {
        for source in ["configMap", "secret"] {
            let Some(source) = volume.get_mut(source) else {
                continue;
            };
            if let Some(mode) = source.get_mut("defaultMode") {
                octal(mode);
            }
            let items = source.get_mut("items").and_then(|i| i.as_sequence_mut());
            for item in items.into_iter().flatten() {
                if let Some(mode) = item.get_mut("mode") {
                    octal(mode);
                }
            }
        }
    }
}

/// Deserializes `value` as `T`, refusing fields `T` does not know and naming the field at
/// fault either way.
fn strict<T: serde::de::DeserializeOwned>(value: serde_yaml::Value) -> Result<T, FieldError> {
    let mut unknown = Vec::new();
    let mut record_unknown = |path: serde_ignored::Path<'_>| {
        unknown.push(bracket_indices(&path.to_string()));
    };
    let deserializer = serde_ignored::Deserializer::new(value, &mut record_unknown);
    let object: T = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = bracket_indices(&e.path().to_string());
        field_err(field, e.into_inner().to_string())
    })?;
    if let Some(first) = unknown.into_iter().next() {
        return Err(field_err(first, "unknown field"));
    }
    Ok(object)
}

/// `spec.containers.0.image` → `spec.containers[0].image`, as kubectl prints paths.
fn bracket_indices(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 4);
    // serde_ignored writes `?` for the Option and newtype layers of a path.
    let segments = path
        .split('.')
        .map(|s| s.trim_start_matches('?'))
        .filter(|s| !s.is_empty());
    for (i, segment) in segments.enumerate() {
        if segment.chars().all(|c| c.is_ascii_digit()) && !segment.is_empty() {
            out.push('[');
            out.push_str(segment);
            out.push(']');
        } else {
            if i > 0 {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

/// Checks what the type system cannot, and fills in the defaults Kubernetes' API server
/// would (namespace, restartPolicy, imagePullPolicy, grace period).
pub fn validate_pod(pod: &mut Pod) -> Result<(), FieldError> {
    validate_name_and_namespace(&mut pod.metadata)?;
    if let Some(value) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::outbound::ALLOWED_OUTBOUND_HOSTS))
    {
        crate::outbound::parse_allowed_hosts(value).map_err(|e| {
            field_err(
                format!(
                    "metadata.annotations[{}]",
                    crate::outbound::ALLOWED_OUTBOUND_HOSTS
                ),
                e,
            )
        })?;
    }
    let spec = pod
        .spec
        .as_mut()
        .ok_or_else(|| field_err("spec", "required"))?;
    let policy = spec.restart_policy.get_or_insert_with(|| "Always".into());
    if !RESTART_POLICIES.contains(&policy.as_str()) {
        return Err(field_err(
            "spec.restartPolicy",
            format!("unsupported value {policy:?}: expected one of Always, OnFailure, Never"),
        ));
    }
    let grace = spec.termination_grace_period_seconds.get_or_insert(30);
    if *grace < 0 {
        return Err(field_err(
            "spec.terminationGracePeriodSeconds",
            "must not be negative",
        ));
    }
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(field_err("spec.initContainers", "not supported yet"));
    }
    if spec
        .ephemeral_containers
        .as_ref()
        .is_some_and(|c| !c.is_empty())
    {
        return Err(field_err("spec.ephemeralContainers", "not supported"));
    }
    let volumes = crate::volumes::validate_volumes(spec.volumes.as_deref().unwrap_or_default())?;
    if spec.containers.is_empty() {
        return Err(field_err(
            "spec.containers",
            "at least one container is required",
        ));
    }
    if spec.containers.len() > MAX_CONTAINERS {
        return Err(field_err(
            "spec.containers",
            format!(
                "{} containers: a Brink pod holds at most {MAX_CONTAINERS}",
                spec.containers.len()
            ),
        ));
    }
    let mut names = HashSet::new();
    let mut host_ports = HashSet::new();
    for (i, container) in spec.containers.iter_mut().enumerate() {
        let at = |field: &str| format!("spec.containers[{i}].{field}");
        validate_container(container, &at)?;
        crate::volumes::validate_mounts(
            container.volume_mounts.as_deref().unwrap_or_default(),
            &volumes,
            &|f: &str| at(&format!("volumeMounts{f}")),
        )?;
        if !names.insert(container.name.clone()) {
            return Err(field_err(
                at("name"),
                format!("duplicate container name {:?}", container.name),
            ));
        }
        for (j, port) in container.ports.iter().flatten().enumerate() {
            if let Some(host_port) = port.host_port
                && !host_ports.insert(host_port)
            {
                return Err(field_err(
                    at(&format!("ports[{j}].hostPort")),
                    format!("host port {host_port} is used twice in this pod"),
                ));
            }
        }
    }
    Ok(())
}

fn validate_container(
    container: &mut Container,
    at: &dyn Fn(&str) -> String,
) -> Result<(), FieldError> {
    if !is_dns_label(&container.name) {
        return Err(field_err(
            at("name"),
            format!("{:?} is not a valid container name", container.name),
        ));
    }
    match container.image.as_deref() {
        None => return Err(field_err(at("image"), "required")),
        Some(image) if image.trim().is_empty() => {
            return Err(field_err(at("image"), "must not be empty"));
        }
        Some(_) => {}
    }
    let image = container.image.clone().unwrap_or_default();
    let pull_policy = container.image_pull_policy.get_or_insert_with(|| {
        // Kubernetes' default: Always for `:latest` or untagged, IfNotPresent otherwise.
        let untagged = !image.contains('@')
            && image
                .rsplit('/')
                .next()
                .is_some_and(|last| !last.contains(':'));
        if image.ends_with(":latest") || (untagged && !image.starts_with("oci:")) {
            "Always".into()
        } else {
            "IfNotPresent".into()
        }
    });
    if !PULL_POLICIES.contains(&pull_policy.as_str()) {
        return Err(field_err(
            at("imagePullPolicy"),
            format!("unsupported value {pull_policy:?}: expected Always, IfNotPresent or Never"),
        ));
    }
    for (j, port) in container.ports.iter().flatten().enumerate() {
        let field = |f: &str| at(&format!("ports[{j}].{f}"));
        if !(1..=65535).contains(&port.container_port) {
            return Err(field_err(
                field("containerPort"),
                "must be between 1 and 65535",
            ));
        }
        if let Some(host_port) = port.host_port
            && !(1..=65535).contains(&host_port)
        {
            return Err(field_err(field("hostPort"), "must be between 1 and 65535"));
        }
        if let Some(protocol) = port.protocol.as_deref()
            && protocol != "TCP"
        {
            return Err(field_err(
                field("protocol"),
                format!("unsupported value {protocol:?}: wasm services speak HTTP over TCP"),
            ));
        }
        if let Some(ip) = port.host_ip.as_deref()
            && ip.parse::<std::net::IpAddr>().is_err()
        {
            return Err(field_err(
                field("hostIP"),
                format!("{ip:?} is not an IP address"),
            ));
        }
    }
    if let Some(resources) = &container.resources {
        for (kind, list) in [
            ("limits", &resources.limits),
            ("requests", &resources.requests),
        ] {
            if let Some(memory) = list.as_ref().and_then(|l| l.get("memory")) {
                parse_bytes(&memory.0).map_err(|e| {
                    field_err(at(&format!("resources.{kind}.memory")), e.to_string())
                })?;
            }
            if let Some(cpu) = list.as_ref().and_then(|l| l.get("cpu")) {
                crate::quantity::parse_cpu_millis(&cpu.0)
                    .map_err(|e| field_err(at(&format!("resources.{kind}.cpu")), e.to_string()))?;
            }
        }
    }
    for (j, env) in container.env.iter().flatten().enumerate() {
        let field = |f: &str| at(&format!("env[{j}].{f}"));
        if env.name.is_empty() || env.name.contains('=') {
            return Err(field_err(
                field("name"),
                format!("invalid name {:?}", env.name),
            ));
        }
        if let Some(from) = &env.value_from {
            match &from.field_ref {
                Some(r) if SUPPORTED_FIELD_REFS.contains(&r.field_path.as_str()) => {}
                Some(r) => {
                    return Err(field_err(
                        field("valueFrom.fieldRef.fieldPath"),
                        format!(
                            "unsupported value {:?}: expected one of {}",
                            r.field_path,
                            SUPPORTED_FIELD_REFS.join(", ")
                        ),
                    ));
                }
                None => {
                    return Err(field_err(
                        field("valueFrom"),
                        "only fieldRef is supported yet",
                    ));
                }
            }
        }
    }
    if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err(field_err(at("envFrom"), "not supported yet"));
    }
    for (name, probe) in [
        ("readinessProbe", &container.readiness_probe),
        ("livenessProbe", &container.liveness_probe),
        ("startupProbe", &container.startup_probe),
    ] {
        if let Some(probe) = probe {
            validate_probe(probe, container, &|f: &str| at(&format!("{name}.{f}")))?;
        }
    }
    Ok(())
}

fn validate_probe(
    probe: &Probe,
    container: &Container,
    at: &dyn Fn(&str) -> String,
) -> Result<(), FieldError> {
    if probe.exec.is_some() || probe.tcp_socket.is_some() || probe.grpc.is_some() {
        return Err(field_err(
            at(""),
            "only httpGet probes are supported for wasm containers",
        ));
    }
    let Some(http) = &probe.http_get else {
        return Err(field_err(at("httpGet"), "required"));
    };
    if let IntOrString::String(name) = &http.port
        && !container
            .ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some(name.as_str()))
    {
        return Err(field_err(
            at("httpGet.port"),
            format!("no container port is named {name:?}"),
        ));
    }
    if let Some(scheme) = http.scheme.as_deref()
        && scheme != "HTTP"
    {
        return Err(field_err(at("httpGet.scheme"), "only HTTP is supported"));
    }
    for (f, v) in [
        ("periodSeconds", probe.period_seconds),
        ("timeoutSeconds", probe.timeout_seconds),
        ("failureThreshold", probe.failure_threshold),
        ("successThreshold", probe.success_threshold),
    ] {
        if v.is_some_and(|v| v < 1) {
            return Err(field_err(at(f), "must be at least 1"));
        }
    }
    if probe.initial_delay_seconds.is_some_and(|v| v < 0) {
        return Err(field_err(at("initialDelaySeconds"), "must not be negative"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: hello
spec:
  containers:
  - name: hello
    image: 127.0.0.1:5000/demo/hello:v1
    ports:
    - containerPort: 8080
      hostPort: 18080
    resources:
      limits:
        memory: 64Mi
---
apiVersion: v1
kind: Pod
metadata:
  name: job
  namespace: batch
spec:
  restartPolicy: Never
  containers:
  - name: job
    image: oci:/tmp/layout:job
    args: ["--exit", "3"]
"#;

    fn error_of(text: &str) -> ManifestError {
        match parse_manifests("pods.yaml", text) {
            Ok(objects) => panic!("expected an error, got {} objects", objects.len()),
            Err(e) => e,
        }
    }

    fn pods_of(text: &str) -> Vec<PodManifest> {
        parse_manifests("pods.yaml", text)
            .expect("valid manifests")
            .into_iter()
            .filter_map(|o| match o {
                Object::Pod(p) => Some(*p),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn parses_several_documents_and_fills_defaults() {
        let pods = pods_of(GOOD);
        assert_eq!(pods.len(), 2);
        assert_eq!(pods[0].key(), "default/hello");
        assert_eq!(pods[1].key(), "batch/job");
        let spec = pods[0].pod.spec.as_ref().expect("spec");
        assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
        assert_eq!(spec.termination_grace_period_seconds, Some(30));
        assert_eq!(
            spec.containers[0].image_pull_policy.as_deref(),
            Some("IfNotPresent")
        );
    }

    #[test]
    fn empty_documents_are_skipped() {
        let pods = parse_manifests("x.yaml", "---\n---\n").expect("empty is fine");
        assert!(pods.is_empty());
    }

    #[test]
    fn yaml_syntax_error_names_file_and_document_and_yields_nothing() {
        let text = format!("{GOOD}\n---\nkind: Pod\n  bad: [indent\n");
        let e = error_of(&text);
        assert_eq!(e.source_name, "pods.yaml");
        assert_eq!(e.document, 3);
        assert!(e.message.contains("invalid YAML"), "{e}");
    }

    #[test]
    fn wrong_field_type_names_the_field() {
        let text = GOOD.replace("containerPort: 8080", "containerPort: eighty");
        let e = error_of(&text);
        assert_eq!(e.document, 1);
        assert_eq!(
            e.field.as_deref(),
            Some("spec.containers[0].ports[0].containerPort")
        );
    }

    #[test]
    fn unknown_field_is_refused_by_name() {
        let text = GOOD.replace("    image: oci", "    imagee: x\n    image: oci");
        let e = error_of(&text);
        assert_eq!(e.document, 2);
        assert_eq!(e.field.as_deref(), Some("spec.containers[0].imagee"));
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn missing_image_is_refused() {
        let text = GOOD.replace("    image: 127.0.0.1:5000/demo/hello:v1\n", "");
        let e = error_of(&text);
        assert_eq!(e.field.as_deref(), Some("spec.containers[0].image"));
    }

    #[test]
    fn unknown_enum_values_are_refused() {
        let e = error_of(&GOOD.replace("restartPolicy: Never", "restartPolicy: Sometimes"));
        assert_eq!(e.field.as_deref(), Some("spec.restartPolicy"));
        let e = error_of(&GOOD.replace("hostPort: 18080", "hostPort: 18080\n      protocol: UDP"));
        assert_eq!(
            e.field.as_deref(),
            Some("spec.containers[0].ports[0].protocol")
        );
    }

    #[test]
    fn bad_values_are_refused() {
        let cases = [
            ("name: hello", "name: Hello_World", "metadata.name"),
            (
                "memory: 64Mi",
                "memory: lots",
                "spec.containers[0].resources.limits.memory",
            ),
            (
                "hostPort: 18080",
                "hostPort: 70000",
                "spec.containers[0].ports[0].hostPort",
            ),
            (
                "kind: Pod\nmetadata:\n  name: hello",
                "kind: Deployment\nmetadata:\n  name: hello",
                "kind",
            ),
        ];
        for (from, to, field) in cases {
            let e = error_of(&GOOD.replacen(from, to, 1));
            assert_eq!(e.field.as_deref(), Some(field), "{from} -> {to}: {e}");
        }
    }

    #[test]
    fn duplicate_pods_in_one_file_are_refused() {
        let one = GOOD.split("---").next().unwrap_or_default();
        let e = error_of(&format!("{one}\n---\n{one}"));
        assert!(e.message.contains("defined twice"), "{e}");
    }

    #[test]
    fn garbage_never_panics() {
        let inputs = [
            "\u{0}\u{1}\u{2}",
            "[]",
            "42",
            "\"text\"",
            "{kind: Pod}",
            "kind: Pod\napiVersion: v1",
            "kind: Pod\napiVersion: v1\nspec: 5",
            "&a [*a]",
            "{{{{",
            "- - - -",
            "kind: Pod\napiVersion: v1\nmetadata: {name: a}\nspec: {containers: [{}]}",
        ];
        for input in inputs {
            assert!(
                parse_manifests("g.yaml", input).is_err(),
                "{input:?} should be refused"
            );
        }
    }

    const VOLUMES: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  greeting: hello
binaryData:
  blob: AAEC
---
apiVersion: v1
kind: Secret
metadata:
  name: token
  namespace: apps
stringData:
  token: s3cret
---
apiVersion: v1
kind: Pod
metadata:
  name: reader
spec:
  volumes:
  - name: scratch
    emptyDir: {}
  - name: settings
    configMap:
      name: settings
      items:
      - key: greeting
        path: conf/greeting.txt
        mode: 0400
  - name: token
    secret:
      secretName: token
      defaultMode: 0440
  - name: shared
    hostPath:
      path: /srv/shared
      type: DirectoryOrCreate
  containers:
  - name: reader
    image: oci:/tmp/layout:job
    volumeMounts:
    - name: scratch
      mountPath: /data
    - name: settings
      mountPath: /config
      readOnly: true
    - name: shared
      mountPath: /shared/
"#;

    #[test]
    fn config_maps_secrets_and_volumes_parse() {
        let objects = parse_manifests("v.yaml", VOLUMES).expect("valid manifests");
        let kinds: Vec<_> = objects.iter().map(|o| (o.kind(), o.key())).collect();
        assert_eq!(
            kinds,
            [
                ("ConfigMap", "default/settings".to_string()),
                ("Secret", "apps/token".to_string()),
                ("Pod", "default/reader".to_string()),
            ]
        );
        let Object::Pod(pod) = &objects[2] else {
            panic!("a pod")
        };
        let volumes = pod.pod.spec.as_ref().and_then(|s| s.volumes.clone());
        let volumes = volumes.unwrap_or_default();
        let items = volumes[1].config_map.as_ref().and_then(|c| c.items.clone());
        assert_eq!(
            items.unwrap_or_default()[0].mode,
            Some(0o400),
            "YAML 1.1 octal"
        );
        let secret = volumes[2].secret.as_ref();
        assert_eq!(secret.and_then(|s| s.default_mode), Some(0o440));
        let Object::Secret(secret) = &objects[1] else {
            panic!("a secret")
        };
        assert_eq!(secret.type_.as_deref(), Some("Opaque"));
        assert!(secret.string_data.is_none());
        let token = secret.data.as_ref().and_then(|d| d.get("token"));
        assert_eq!(token.map(|t| t.0.as_slice()), Some(&b"s3cret"[..]));
        let Object::ConfigMap(config) = &objects[0] else {
            panic!("a config map")
        };
        let blob = config.binary_data.as_ref().and_then(|d| d.get("blob"));
        assert_eq!(blob.map(|b| b.0.as_slice()), Some(&[0u8, 1, 2][..]));
    }

    #[test]
    fn bad_volumes_and_mounts_are_refused_by_field() {
        let cases = [
            (
                "    emptyDir: {}",
                "    emptyDir: {medium: Memory}",
                "spec.volumes[0].emptyDir.medium",
            ),
            (
                "    emptyDir: {}",
                "    emptyDir: {sizeLimit: 1Gi}",
                "spec.volumes[0].emptyDir.sizeLimit",
            ),
            (
                "    emptyDir: {}",
                "    nfs: {server: a, path: /x}",
                "spec.volumes[0].nfs",
            ),
            (
                "    emptyDir: {}",
                "    emptyDir: {}\n    hostPath: {path: /x}",
                "spec.volumes[0].hostPath",
            ),
            (
                "  - name: scratch\n",
                "  - name: Scratch\n",
                "spec.volumes[0].name",
            ),
            (
                "        path: conf/greeting.txt",
                "        path: ../escape",
                "spec.volumes[1].configMap.items[0].path",
            ),
            (
                "        mode: 0400",
                "        mode: 01777",
                "spec.volumes[1].configMap.items[0].mode",
            ),
            (
                "      defaultMode: 0440",
                "      defaultMode: -1",
                "spec.volumes[2].secret.defaultMode",
            ),
            (
                "      path: /srv/shared",
                "      path: /srv/../etc",
                "spec.volumes[3].hostPath.path",
            ),
            (
                "      type: DirectoryOrCreate",
                "      type: Socket",
                "spec.volumes[3].hostPath.type",
            ),
            (
                "    - name: scratch\n      mountPath: /data",
                "    - name: nothing\n      mountPath: /data",
                "spec.containers[0].volumeMounts[0].name",
            ),
            (
                "      mountPath: /data",
                "      mountPath: data",
                "spec.containers[0].volumeMounts[0].mountPath",
            ),
            (
                "      mountPath: /data",
                "      mountPath: /config",
                "spec.containers[0].volumeMounts[1].mountPath",
            ),
            (
                "      mountPath: /data",
                "      mountPath: /data\n      subPath: x",
                "spec.containers[0].volumeMounts[0].subPath",
            ),
            (
                "      mountPath: /data",
                "      mountPath: /data\n      mountPropagation: Bidirectional",
                "spec.containers[0].volumeMounts[0].mountPropagation",
            ),
            ("  greeting: hello", "  bad/key: hello", "data[bad/key]"),
            ("  blob: AAEC", "  greeting: AAEC", "binaryData[greeting]"),
            ("  blob: AAEC", "  blob: '***'", "binaryData.blob"),
        ];
        for (from, to, field) in cases {
            assert!(VOLUMES.contains(from), "{from:?} is not in the fixture");
            match parse_manifests("v.yaml", &VOLUMES.replacen(from, to, 1)) {
                Ok(_) => panic!("{from} -> {to} should be refused"),
                Err(e) => assert_eq!(e.field.as_deref(), Some(field), "{from} -> {to}: {e}"),
            }
        }
    }

    #[test]
    fn tls_secrets_need_a_certificate_and_a_key() {
        let text = "apiVersion: v1\nkind: Secret\nmetadata: {name: t}\ntype: kubernetes.io/tls\nstringData: {tls.crt: x}\n";
        let e = error_of(text);
        assert_eq!(e.field.as_deref(), Some("data[tls.key]"));
        let ok = text.replace("{tls.crt: x}", "{tls.crt: x, tls.key: y}");
        assert!(parse_manifests("t.yaml", &ok).is_ok());
    }

    #[test]
    fn the_same_name_in_two_kinds_is_fine_but_twice_in_one_is_not() {
        let config = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n";
        let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: a}\n";
        assert!(parse_manifests("a.yaml", &format!("{config}---\n{secret}")).is_ok());
        let e = error_of(&format!("{config}---\n{config}"));
        assert!(
            e.message.contains("ConfigMap default/a is defined twice"),
            "{e}"
        );
    }
}
