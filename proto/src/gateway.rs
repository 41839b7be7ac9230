//! Gateway API and Service objects as Brink reads them from manifests: the checks the
//! API server's schema and CEL rules make, so a node sees only what Kubernetes would have
//! stored.
//!
//! One difference, on purpose: an HTTPRoute whose *values* are wrong (an unknown enum
//! value, an invalid regular expression, filters that cannot go together) is still read,
//! marked invalid with the reason, so the data plane reports it `Accepted=False` and the
//! other objects of its file keep working. Structural faults (YAML, unknown fields, bad
//! metadata) still refuse the whole file, as for every kind.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use gateway_api::gatewayclasses::GatewayClass;
use gateway_api::gateways::Gateway;
use gateway_api::httproutes::{
    HttpRoute, HttpRouteParentRefs, HttpRouteRules, HttpRouteRulesBackendRefsFilters,
    HttpRouteRulesFilters, HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParamsType, HttpRouteSpec,
};
use gateway_api::referencegrants::ReferenceGrant;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::meta::{FieldError, field_err, is_dns_label, validate_name_and_namespace};

/// The Gateway API group.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// At most this many listeners per Gateway (the CRD's limit).
pub const MAX_LISTENERS: usize = 64;
/// At most this many rules per HTTPRoute (the CRD's limit).
pub const MAX_RULES: usize = 16;
/// At most this many matches in one HTTPRoute, over all its rules (the CRD's limit).
pub const MAX_MATCHES: usize = 128;
/// At most this many parentRefs per route (the CRD's limit).
pub const MAX_PARENT_REFS: usize = 32;
/// A regular expression in a match may compile to at most this many bytes, so a hostile
/// pattern cannot make the data plane huge.
pub const MAX_REGEX_BYTES: usize = 64 * 1024;

/// An HTTPRoute as read: the route, and why it cannot be accepted when its values are
/// wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteManifest {
    pub route: HttpRoute,
    /// Set when a value is wrong: the route attaches nowhere and says so in its status.
    pub invalid: Option<FieldError>,
}

/// Checks a GatewayClass (cluster-scoped: a namespace is dropped, as the API server does).
pub fn validate_gateway_class(class: &mut GatewayClass) -> Result<(), FieldError> {
    class.metadata.namespace = None;
    let name = class.metadata.name.as_deref().unwrap_or_default();
    if !crate::meta::is_dns_subdomain(name) {
        return Err(field_err(
            "metadata.name",
            format!("{name:?} is not a valid name"),
        ));
    }
    if class.spec.controller_name.is_empty() {
        return Err(field_err("spec.controllerName", "required"));
    }
    Ok(())
}

/// Checks a Gateway the way its CRD schema does. Listener problems the data plane can
/// report (an unsupported protocol, a missing certificate) are left to its status.
pub fn validate_gateway(gateway: &mut Gateway) -> Result<(), FieldError> {
    validate_name_and_namespace(&mut gateway.metadata)?;
    if gateway.spec.gateway_class_name.is_empty() {
        return Err(field_err("spec.gatewayClassName", "required"));
    }
    let listeners = &gateway.spec.listeners;
    if listeners.is_empty() || listeners.len() > MAX_LISTENERS {
        return Err(field_err(
            "spec.listeners",
            format!("a Gateway has 1 to {MAX_LISTENERS} listeners"),
        ));
    }
    let mut names = HashSet::new();
    for (i, listener) in listeners.iter().enumerate() {
        let at = |f: &str| format!("spec.listeners[{i}].{f}");
        if !is_dns_label(&listener.name) {
            return Err(field_err(at("name"), "must be a DNS label"));
        }
        if !names.insert(listener.name.as_str()) {
            return Err(field_err(
                at("name"),
                format!("listener name {:?} is used twice", listener.name),
            ));
        }
        if !(1..=65535).contains(&listener.port) {
            return Err(field_err(at("port"), "must be 1 to 65535"));
        }
        if listener.protocol.is_empty() {
            return Err(field_err(at("protocol"), "required"));
        }
        if let Some(hostname) = &listener.hostname
            && !is_valid_hostname(hostname)
        {
            return Err(field_err(
                at("hostname"),
                format!("{hostname:?} is not a hostname (or *.wildcard); IPs are not allowed"),
            ));
        }
        if (listener.protocol == "HTTPS" || listener.protocol == "TLS") && listener.tls.is_none() {
            return Err(field_err(at("tls"), "required for HTTPS and TLS listeners"));
        }
        if listener.protocol == "HTTP" && listener.tls.is_some() {
            return Err(field_err(at("tls"), "must not be set for HTTP listeners"));
        }
    }
    Ok(())
}

/// Checks a ReferenceGrant.
pub fn validate_reference_grant(grant: &mut ReferenceGrant) -> Result<(), FieldError> {
    validate_name_and_namespace(&mut grant.metadata)?;
    if grant.spec.from.is_empty() {
        return Err(field_err("spec.from", "at least one entry is required"));
    }
    if grant.spec.to.is_empty() {
        return Err(field_err("spec.to", "at least one entry is required"));
    }
    for (i, from) in grant.spec.from.iter().enumerate() {
        if from.kind.is_empty() {
            return Err(field_err(format!("spec.from[{i}].kind"), "required"));
        }
        if !is_dns_label(&from.namespace) {
            return Err(field_err(
                format!("spec.from[{i}].namespace"),
                "must be a namespace name",
            ));
        }
    }
    for (i, to) in grant.spec.to.iter().enumerate() {
        if to.kind.is_empty() {
            return Err(field_err(format!("spec.to[{i}].kind"), "required"));
        }
    }
    Ok(())
}

/// Checks a Namespace (its labels feed `allowedRoutes` selectors). As Kubernetes does,
/// every namespace carries `kubernetes.io/metadata.name`.
pub fn validate_namespace(namespace: &mut Namespace) -> Result<(), FieldError> {
    namespace.metadata.namespace = None;
    let name = namespace.metadata.name.clone().unwrap_or_default();
    if !is_dns_label(&name) {
        return Err(field_err(
            "metadata.name",
            format!("{name:?} is not a valid namespace"),
        ));
    }
    namespace
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("kubernetes.io/metadata.name".into(), name);
    Ok(())
}

/// Checks a Service and fills in the API server's defaults (type ClusterIP, protocol TCP,
/// targetPort = port). Only ClusterIP services exist here: the gateway reaches them.
pub fn validate_service(service: &mut Service) -> Result<(), FieldError> {
    validate_name_and_namespace(&mut service.metadata)?;
    let spec = service.spec.get_or_insert_with(Default::default);
    match spec.type_.as_deref() {
        None | Some("ClusterIP") => spec.type_ = Some("ClusterIP".into()),
        Some(other) => {
            return Err(field_err(
                "spec.type",
                format!("{other:?} services are not implemented; use ClusterIP (the default)"),
            ));
        }
    }
    let mut ports = HashSet::new();
    let mut names = HashSet::new();
    let count = spec.ports.as_ref().map_or(0, Vec::len);
    for (i, port) in spec.ports.iter_mut().flatten().enumerate() {
        let at = |f: &str| format!("spec.ports[{i}].{f}");
        if !(1..=65535).contains(&port.port) {
            return Err(field_err(at("port"), "must be 1 to 65535"));
        }
        let protocol = port.protocol.get_or_insert_with(|| "TCP".into());
        if !["TCP", "UDP", "SCTP"].contains(&protocol.as_str()) {
            return Err(field_err(
                at("protocol"),
                format!("unknown protocol {protocol:?}"),
            ));
        }
        if !ports.insert((port.port, protocol.clone())) {
            return Err(field_err(
                at("port"),
                format!("port {} is listed twice", port.port),
            ));
        }
        match &port.name {
            Some(name) if !is_dns_label(name) => {
                return Err(field_err(at("name"), "must be a DNS label"));
            }
            Some(name) if !names.insert(name.clone()) => {
                return Err(field_err(
                    at("name"),
                    format!("name {name:?} is used twice"),
                ));
            }
            None if count > 1 => {
                return Err(field_err(
                    at("name"),
                    "required when a Service has several ports",
                ));
            }
            _ => {}
        }
        match &port.target_port {
            None => port.target_port = Some(IntOrString::Int(port.port)),
            Some(IntOrString::Int(p)) if !(1..=65535).contains(p) => {
                return Err(field_err(at("targetPort"), "must be 1 to 65535"));
            }
            Some(IntOrString::String(name)) if !is_dns_label(name) || name.len() > 15 => {
                return Err(field_err(at("targetPort"), "must be a port number or name"));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Reads an HTTPRoute. `strict` is the typed parse of the whole document; when it failed
/// on a value (not on structure), the route is rebuilt from its metadata and parentRefs
/// and marked invalid with that error, so its parents can report it.
pub fn route_from_parse(
    parsed: Result<HttpRoute, FieldError>,
    metadata: Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, FieldError>,
    parent_refs: Option<Vec<HttpRouteParentRefs>>,
) -> Result<RouteManifest, FieldError> {
    match parsed {
        Ok(mut route) => {
            validate_name_and_namespace(&mut route.metadata)?;
            validate_parent_refs(route.spec.parent_refs.as_deref().unwrap_or_default())?;
            let invalid = validate_route_spec(&route.spec).err();
            Ok(RouteManifest { route, invalid })
        }
        Err(error) if error.message.starts_with("unknown field") => Err(error),
        Err(error) => {
            let mut metadata = metadata?;
            validate_name_and_namespace(&mut metadata)?;
            // Without parents nobody would ever hear of the fault: refuse the file.
            let parent_refs = parent_refs.ok_or_else(|| error.clone())?;
            validate_parent_refs(&parent_refs)?;
            let route = HttpRoute {
                metadata,
                spec: HttpRouteSpec {
                    parent_refs: Some(parent_refs),
                    ..Default::default()
                },
                status: None,
            };
            Ok(RouteManifest {
                route,
                invalid: Some(error),
            })
        }
    }
}

fn validate_parent_refs(refs: &[HttpRouteParentRefs]) -> Result<(), FieldError> {
    if refs.len() > MAX_PARENT_REFS {
        return Err(field_err(
            "spec.parentRefs",
            format!("at most {MAX_PARENT_REFS} parentRefs"),
        ));
    }
    for (i, parent) in refs.iter().enumerate() {
        if parent.name.is_empty() {
            return Err(field_err(format!("spec.parentRefs[{i}].name"), "required"));
        }
    }
    Ok(())
}

/// The checks the HTTPRoute CRD's schema and CEL rules make on values. The first fault
/// found, with its field.
pub fn validate_route_spec(spec: &HttpRouteSpec) -> Result<(), FieldError> {
    for (i, hostname) in spec.hostnames.iter().flatten().enumerate() {
        if !is_valid_hostname(hostname) {
            return Err(field_err(
                format!("spec.hostnames[{i}]"),
                format!("{hostname:?} is not a hostname (or *.wildcard); IPs are not allowed"),
            ));
        }
    }
    let rules = spec.rules.as_deref().unwrap_or_default();
    if rules.len() > MAX_RULES {
        return Err(field_err(
            "spec.rules",
            format!("at most {MAX_RULES} rules"),
        ));
    }
    let matches: usize = rules
        .iter()
        .map(|r| r.matches.as_ref().map_or(1, Vec::len))
        .sum();
    if matches > MAX_MATCHES {
        return Err(field_err(
            "spec.rules",
            format!("at most {MAX_MATCHES} matches over all rules"),
        ));
    }
    for (r, rule) in rules.iter().enumerate() {
        validate_rule(rule, &format!("spec.rules[{r}]"))?;
    }
    Ok(())
}

fn validate_rule(rule: &HttpRouteRules, at: &str) -> Result<(), FieldError> {
    let mut all_prefix = true;
    for (m, route_match) in rule.matches.iter().flatten().enumerate() {
        let at = format!("{at}.matches[{m}]");
        let path_type = route_match
            .path
            .as_ref()
            .and_then(|p| p.r#type.clone())
            .unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix);
        all_prefix &= path_type == HttpRouteRulesMatchesPathType::PathPrefix;
        let value = route_match
            .path
            .as_ref()
            .and_then(|p| p.value.as_deref())
            .unwrap_or("/");
        match path_type {
            HttpRouteRulesMatchesPathType::RegularExpression => compile_regex(value)
                .map(drop)
                .map_err(|e| field_err(format!("{at}.path.value"), e))?,
            _ => check_path(value).map_err(|e| field_err(format!("{at}.path.value"), e))?,
        };
        let mut names = HashSet::new();
        for (h, header) in route_match.headers.iter().flatten().enumerate() {
            let at = format!("{at}.headers[{h}]");
            if !is_header_name(&header.name) {
                return Err(field_err(format!("{at}.name"), "not an HTTP header name"));
            }
            if !names.insert(header.name.to_ascii_lowercase()) {
                return Err(field_err(
                    format!("{at}.name"),
                    format!("header {:?} is matched twice", header.name),
                ));
            }
            if header.r#type == Some(HttpRouteRulesMatchesHeadersType::RegularExpression) {
                compile_regex(&header.value).map_err(|e| field_err(format!("{at}.value"), e))?;
            }
        }
        let mut names = HashSet::new();
        for (q, query) in route_match.query_params.iter().flatten().enumerate() {
            let at = format!("{at}.queryParams[{q}]");
            if query.name.is_empty() || !names.insert(query.name.clone()) {
                return Err(field_err(
                    format!("{at}.name"),
                    "query parameter names must be set and distinct",
                ));
            }
            if query.r#type == Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression) {
                compile_regex(&query.value).map_err(|e| field_err(format!("{at}.value"), e))?;
            }
        }
    }
    validate_filters(
        rule.filters.iter().flatten().map(Filter::Rule),
        all_prefix,
        &format!("{at}.filters"),
    )?;
    for (b, backend) in rule.backend_refs.iter().flatten().enumerate() {
        let at = format!("{at}.backendRefs[{b}]");
        let core = backend.group.as_deref().unwrap_or("").is_empty();
        let service = backend.kind.as_deref().unwrap_or("Service") == "Service";
        if core && service && backend.port.is_none() {
            return Err(field_err(
                format!("{at}.port"),
                "required when the backend is a Service",
            ));
        }
        if let Some(port) = backend.port
            && !(1..=65535).contains(&port)
        {
            return Err(field_err(format!("{at}.port"), "must be 1 to 65535"));
        }
        if let Some(weight) = backend.weight
            && !(0..=1_000_000).contains(&weight)
        {
            return Err(field_err(format!("{at}.weight"), "must be 0 to 1000000"));
        }
        validate_filters(
            backend.filters.iter().flatten().map(Filter::Backend),
            all_prefix,
            &format!("{at}.filters"),
        )?;
    }
    if let Some(timeouts) = &rule.timeouts {
        let request = timeouts
            .request
            .as_deref()
            .map(|t| parse_duration(t).map_err(|e| field_err(format!("{at}.timeouts.request"), e)))
            .transpose()?;
        let backend = timeouts
            .backend_request
            .as_deref()
            .map(|t| {
                parse_duration(t).map_err(|e| field_err(format!("{at}.timeouts.backendRequest"), e))
            })
            .transpose()?;
        if let (Some(request), Some(backend)) = (request, backend)
            && !request.is_zero()
            && backend > request
        {
            return Err(field_err(
                format!("{at}.timeouts.backendRequest"),
                "must not be longer than timeouts.request",
            ));
        }
    }
    Ok(())
}

/// A rule-level or backendRef-level filter (the generated types differ; the schema is
/// the same).
enum Filter<'a> {
    Rule(&'a HttpRouteRulesFilters),
    Backend(&'a HttpRouteRulesBackendRefsFilters),
}

impl Filter<'_> {
    fn as_rule(&self) -> Result<HttpRouteRulesFilters, String> {
        match self {
            Filter::Rule(f) => Ok((*f).clone()),
            Filter::Backend(f) => backend_filter_as_rule(f),
        }
    }
}

/// A backendRef-level filter as a rule-level one, through JSON: the generated types
/// differ, the schema is the same.
pub fn backend_filter_as_rule(
    filter: &HttpRouteRulesBackendRefsFilters,
) -> Result<HttpRouteRulesFilters, String> {
    serde_json::to_value(filter)
        .and_then(serde_json::from_value)
        .map_err(|e| e.to_string())
}

/// The name a generated enum value has on the wire (`URLRewrite`, `https`, `GET`).
pub fn wire_name<T: serde::Serialize>(value: &T) -> Option<String> {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
}

fn validate_filters<'a>(
    filters: impl Iterator<Item = Filter<'a>>,
    all_prefix: bool,
    at: &str,
) -> Result<(), FieldError> {
    let mut seen = HashSet::new();
    for (i, filter) in filters.enumerate() {
        let at = format!("{at}[{i}]");
        let f = filter.as_rule().map_err(|e| field_err(&at, e))?;
        let type_name = wire_name(&f.r#type).unwrap_or_default();
        let set: Vec<&str> = [
            ("RequestHeaderModifier", f.request_header_modifier.is_some()),
            (
                "ResponseHeaderModifier",
                f.response_header_modifier.is_some(),
            ),
            ("RequestMirror", f.request_mirror.is_some()),
            ("RequestRedirect", f.request_redirect.is_some()),
            ("URLRewrite", f.url_rewrite.is_some()),
            ("ExtensionRef", f.extension_ref.is_some()),
            ("CORS", f.cors.is_some()),
        ]
        .into_iter()
        .filter(|(_, present)| *present)
        .map(|(name, _)| name)
        .collect();
        if set != [type_name.as_str()] {
            return Err(field_err(
                &at,
                format!(
                    "a filter of type {type_name} must set exactly its own field (set: {set:?})"
                ),
            ));
        }
        if type_name != "RequestMirror"
            && type_name != "ExtensionRef"
            && !seen.insert(type_name.clone())
        {
            return Err(field_err(
                &at,
                format!("{type_name} may appear once per rule"),
            ));
        }
        if let Some(redirect) = &f.request_redirect {
            if let Some(code) = redirect.status_code
                && ![301, 302, 303, 307, 308].contains(&code)
            {
                return Err(field_err(
                    format!("{at}.requestRedirect.statusCode"),
                    format!("{code} is not a redirect status (301, 302, 303, 307, 308)"),
                ));
            }
            if let Some(port) = redirect.port
                && !(1..=65535).contains(&port)
            {
                return Err(field_err(
                    format!("{at}.requestRedirect.port"),
                    "must be 1 to 65535",
                ));
            }
            if let Some(hostname) = &redirect.hostname
                && !is_valid_hostname(hostname)
            {
                return Err(field_err(
                    format!("{at}.requestRedirect.hostname"),
                    "not a hostname",
                ));
            }
            if let Some(path) = &redirect.path {
                check_path_modifier(
                    wire_name(&path.r#type),
                    path.replace_full_path.as_deref(),
                    path.replace_prefix_match.as_deref(),
                    all_prefix,
                    &format!("{at}.requestRedirect.path"),
                )?;
            }
        }
        if let Some(rewrite) = &f.url_rewrite {
            if let Some(hostname) = &rewrite.hostname
                && !is_valid_hostname(hostname)
            {
                return Err(field_err(
                    format!("{at}.urlRewrite.hostname"),
                    "not a hostname",
                ));
            }
            if let Some(path) = &rewrite.path {
                check_path_modifier(
                    wire_name(&path.r#type),
                    path.replace_full_path.as_deref(),
                    path.replace_prefix_match.as_deref(),
                    all_prefix,
                    &format!("{at}.urlRewrite.path"),
                )?;
            }
        }
        if let Some(modifier) = &f.request_header_modifier {
            let names = modifier
                .set
                .iter()
                .flatten()
                .map(|h| &h.name)
                .chain(modifier.add.iter().flatten().map(|h| &h.name))
                .chain(modifier.remove.iter().flatten());
            check_header_names(names, &format!("{at}.requestHeaderModifier"))?;
        }
        if let Some(modifier) = &f.response_header_modifier {
            let names = modifier
                .set
                .iter()
                .flatten()
                .map(|h| &h.name)
                .chain(modifier.add.iter().flatten().map(|h| &h.name))
                .chain(modifier.remove.iter().flatten());
            check_header_names(names, &format!("{at}.responseHeaderModifier"))?;
        }
        if let Some(mirror) = &f.request_mirror {
            if let Some(percent) = mirror.percent
                && !(0..=100).contains(&percent)
            {
                return Err(field_err(
                    format!("{at}.requestMirror.percent"),
                    "must be 0 to 100",
                ));
            }
            if let Some(fraction) = &mirror.fraction {
                let denominator = fraction.denominator.unwrap_or(100);
                if denominator < 1 || fraction.numerator < 0 || fraction.numerator > denominator {
                    return Err(field_err(
                        format!("{at}.requestMirror.fraction"),
                        "needs 0 <= numerator <= denominator, denominator >= 1",
                    ));
                }
                if mirror.percent.is_some() {
                    return Err(field_err(
                        format!("{at}.requestMirror"),
                        "percent and fraction cannot both be set",
                    ));
                }
            }
            let backend = &mirror.backend_ref;
            let core = backend.group.as_deref().unwrap_or("").is_empty();
            if core
                && backend.kind.as_deref().unwrap_or("Service") == "Service"
                && backend.port.is_none()
            {
                return Err(field_err(
                    format!("{at}.requestMirror.backendRef.port"),
                    "required when the backend is a Service",
                ));
            }
        }
    }
    if seen.contains("RequestRedirect") && seen.contains("URLRewrite") {
        return Err(field_err(
            at,
            "RequestRedirect and URLRewrite cannot be used together",
        ));
    }
    Ok(())
}

fn check_path_modifier(
    type_: Option<String>,
    full: Option<&str>,
    prefix: Option<&str>,
    all_prefix: bool,
    at: &str,
) -> Result<(), FieldError> {
    let type_ = type_.unwrap_or_default();
    match (type_.as_str(), full, prefix) {
        ("ReplaceFullPath", Some(path), None) => {
            check_path(path).map_err(|e| field_err(format!("{at}.replaceFullPath"), e))
        }
        ("ReplacePrefixMatch", None, Some(path)) => {
            if !all_prefix {
                return Err(field_err(
                    format!("{at}.replacePrefixMatch"),
                    "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
                ));
            }
            check_path(path).map_err(|e| field_err(format!("{at}.replacePrefixMatch"), e))
        }
        _ => Err(field_err(
            at,
            format!(
                "type {type_} must set exactly its own field (replaceFullPath or replacePrefixMatch)"
            ),
        )),
    }
}

fn check_header_names<'a>(
    names: impl Iterator<Item = &'a String>,
    at: &str,
) -> Result<(), FieldError> {
    let mut seen = HashSet::new();
    for name in names {
        if !is_header_name(name) {
            return Err(field_err(
                at,
                format!("{name:?} is not an HTTP header name"),
            ));
        }
        if !seen.insert(name.to_ascii_lowercase()) {
            return Err(field_err(at, format!("header {name:?} is named twice")));
        }
    }
    Ok(())
}

/// A path value in a match or a path modifier: absolute, and none of the forms the CRD
/// forbids (they would let a route match differently from what the backend sees).
pub fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} must start with '/'"));
    }
    if path.len() > 1024 {
        return Err("at most 1024 characters".into());
    }
    for bad in ["//", "/./", "/../", "%2f", "%2F", "#"] {
        if path.contains(bad) {
            return Err(format!("{path:?} must not contain {bad:?}"));
        }
    }
    if path.ends_with("/..") || path.ends_with("/.") {
        return Err(format!("{path:?} must not end with '/.' or '/..'"));
    }
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(format!("{path:?} holds a control character or space"));
    }
    Ok(())
}

/// Compiles a match's regular expression (RE2 syntax, anchored to the whole value by the
/// matcher), bounded in size.
pub fn compile_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(MAX_REGEX_BYTES)
        .build()
        .map_err(|e| format!("invalid regular expression {pattern:?}: {e}"))
}

/// A Gateway API duration (`1h2m3s4ms`, at most four parts).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    gateway_api::Duration::from_str(text)
        .map(|d| Duration::from_millis(d.as_millis().min(u64::MAX as u128) as u64))
        .map_err(|e| format!("{text:?} is not a duration like 10s or 1m30s: {e}"))
}

/// An RFC 1123 hostname, or `*.` followed by one; never an IP address.
pub fn is_valid_hostname(hostname: &str) -> bool {
    let name = hostname.strip_prefix("*.").unwrap_or(hostname);
    if name.is_empty() || name.len() > 253 || name.parse::<std::net::IpAddr>().is_ok() {
        return false;
    }
    name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    })
}

/// An HTTP header name (an RFC 7230 token).
pub fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: brink}
spec: {controllerName: brink.dev/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: infra}
spec:
  gatewayClassName: brink
  listeners:
  - {name: http, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: allow, namespace: default}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: infra}]
  to: [{group: "", kind: Service}]
"#;

    fn route(spec: &str) -> Result<Vec<crate::Object>, crate::ManifestError> {
        crate::parse_manifests(
            "r.yaml",
            &format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{name: web, namespace: infra}}]\n{spec}"
            ),
        )
    }

    fn invalid_reason(spec: &str) -> String {
        let objects = route(spec).unwrap();
        let crate::Object::HttpRoute(r) = &objects[0] else {
            panic!("not a route")
        };
        let e = r.invalid.clone().expect("route should be invalid");
        format!("{}: {}", e.field, e.message)
    }

    #[test]
    fn gateway_objects_parse_with_defaults() {
        let objects = crate::parse_manifests("g.yaml", GOOD).unwrap();
        let kinds: Vec<_> = objects.iter().map(|o| (o.kind(), o.key())).collect();
        assert_eq!(
            kinds,
            [
                ("GatewayClass", "brink".to_string()),
                ("Gateway", "infra/web".into()),
                ("Service", "default/echo".into()),
                ("ReferenceGrant", "default/allow".into())
            ]
        );
        let crate::Object::Service(service) = &objects[2] else {
            panic!()
        };
        let port = &service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
        assert_eq!(port.protocol.as_deref(), Some("TCP"));
        assert_eq!(port.target_port, Some(IntOrString::Int(8080)));
    }

    #[test]
    fn a_good_route_is_valid() {
        let objects = route(
            "  hostnames: [example.com]\n  rules:\n  - matches: [{path: {type: Exact, value: /a}}, {headers: [{name: x-v, value: '1'}]}]\n    backendRefs: [{name: echo, port: 80, weight: 2}]\n",
        )
        .unwrap();
        let crate::Object::HttpRoute(r) = &objects[0] else {
            panic!()
        };
        assert_eq!(r.invalid, None);
        assert_eq!(r.route.metadata.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn wrong_values_make_an_invalid_route_not_a_file_error() {
        let cases = [
            (
                "  rules:\n  - matches: [{path: {type: Fuzzy, value: /a}}]\n",
                "unknown variant",
            ),
            (
                "  rules:\n  - matches: [{path: {type: RegularExpression, value: '(['}}]\n",
                "invalid regular expression",
            ),
            (
                "  rules:\n  - filters:\n    - {type: RequestRedirect, requestRedirect: {statusCode: 301}}\n    - {type: URLRewrite, urlRewrite: {hostname: a.b}}\n",
                "cannot be used together",
            ),
            ("  rules:\n  - backendRefs: [{name: echo}]\n", "port"),
            (
                "  rules:\n  - matches: [{path: {value: 'a'}}]\n",
                "must start with '/'",
            ),
            (
                "  rules:\n  - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 200}}]\n",
                "not a redirect status",
            ),
            (
                "  rules:\n  - filters: [{type: RequestHeaderModifier, responseHeaderModifier: {}}]\n",
                "exactly its own field",
            ),
            (
                "  rules:\n  - matches: [{path: {type: Exact, value: /a}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]\n",
                "PathPrefix",
            ),
            (
                "  rules:\n  - timeouts: {request: 1s, backendRequest: 2s}\n",
                "not be longer",
            ),
            ("  hostnames: ['1.2.3.4']\n", "IPs are not allowed"),
        ];
        for (spec, expected) in cases {
            let reason = invalid_reason(spec);
            assert!(reason.contains(expected), "{spec}: {reason}");
        }
    }

    #[test]
    fn structural_faults_refuse_the_file() {
        assert!(
            route("  rules:\n  - bogus: 1\n")
                .unwrap_err()
                .to_string()
                .contains("unknown field")
        );
        let no_parents = crate::parse_manifests(
            "r.yaml",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  rules: [{matches: [{method: FETCH}]}]\n",
        );
        assert!(no_parents.is_err());
        let bad_name = crate::parse_manifests(
            "r.yaml",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: R_1}\nspec: {}\n",
        );
        assert!(bad_name.unwrap_err().to_string().contains("metadata.name"));
        let garbage = [
            "apiVersion: gateway.networking.k8s.io/v2\nkind: Gateway\nmetadata: {name: g}\n",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {gatewayClassName: c, listeners: []}\n",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {gatewayClassName: c, listeners: [{name: a, port: 0, protocol: HTTP}]}\n",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {gatewayClassName: c, listeners: [{name: a, port: 80, protocol: HTTP}, {name: a, port: 81, protocol: HTTP}]}\n",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec: {gatewayClassName: c, listeners: [{name: a, port: 443, protocol: HTTPS}]}\n",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {type: NodePort}\n",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80}, {port: 81}]}\n",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, targetPort: -1}]}\n",
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata: {name: g}\nspec: {from: [], to: []}\n",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: c}\nspec: {controllerName: ''}\n",
        ];
        for text in garbage {
            assert!(crate::parse_manifests("g.yaml", text).is_err(), "{text}");
        }
    }

    #[test]
    fn hostnames_follow_the_spec() {
        for ok in ["example.com", "*.example.com", "a-b.c", "x"] {
            assert!(is_valid_hostname(ok), "{ok}");
        }
        for bad in [
            "", "*", "*.", "1.2.3.4", "Ex.com", "a..b", "-a.com", "a.*.com", "**.a",
        ] {
            assert!(!is_valid_hostname(bad), "{bad}");
        }
    }

    #[test]
    fn paths_refuse_what_the_crd_refuses() {
        assert!(check_path("/").is_ok());
        assert!(check_path("/a/b/").is_ok());
        for bad in [
            "", "a", "/a//b", "/a/./b", "/a/../b", "/a%2fb", "/a#b", "/a/..", "/a/.",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn regexes_are_bounded_and_anchored() {
        let re = compile_regex("/v[0-9]+/.*").unwrap();
        assert!(re.is_match("/v2/x"));
        assert!(!re.is_match("/api/v2/x"));
        assert!(compile_regex("(").is_err());
        assert!(compile_regex("a{1000}{1000}").is_err());
    }

    #[test]
    fn durations_parse_as_the_api_says() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(
            parse_duration("1m500ms").unwrap(),
            Duration::from_millis(60_500)
        );
        for bad in ["", "10", "1d", "-1s", "1.5s", "1h1h1h1h1h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
