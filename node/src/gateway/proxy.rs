//! One request through the gateway: match, filters, a backend by weight, a ready
//! endpoint, and the response back, with the status codes the Gateway API asks for
//! (404 no route, 500 invalid reference or unresolvable filter, 503 no ready endpoint,
//! 504 timeout).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};

use super::endpoints::BackendMap;
use super::table::{
    BackendTarget, Cors, Filter, PathMatch, PathModifier, RequestFacts, RouteTable, RuleTarget,
};
use crate::runtime::{HttpBody, text_response};

/// Request bodies as the data plane passes them on.
pub type GatewayBody = http_body_util::combinators::UnsyncBoxBody<Bytes, hyper::Error>;

/// Mirrored requests carry their body only up to this size; bigger (or unsized) bodies
/// are not mirrored, so mirroring never holds up or changes the primary request.
pub const MIRROR_BODY_LIMIT: u64 = 1024 * 1024;

/// What a listener knows of its connection.
#[derive(Debug, Clone, Copy)]
pub struct Downstream {
    pub port: u16,
    pub https: bool,
}

/// Serves one request against `table` and `backends`.
pub async fn handle(
    table: Arc<RouteTable>,
    backends: Arc<BackendMap>,
    downstream: Downstream,
    request: Request<GatewayBody>,
) -> Response<HttpBody> {
    let Some(port) = table.ports.get(&downstream.port) else {
        return text_response(StatusCode::NOT_FOUND, "no listener on this port\n");
    };
    let host_header = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let host = host_only(&host_header);
    let found = {
        let facts = RequestFacts {
            host: &host,
            path: request.uri().path(),
            query: request.uri().query(),
            method: request.method(),
            headers: request.headers(),
        };
        port.lookup(&facts)
    };
    let Some(found) = found else {
        return text_response(StatusCode::NOT_FOUND, "no route matches\n");
    };
    let rule = found.target;
    let prefix = match &found.route_match.path {
        PathMatch::Prefix(p) => Some(p.as_str()),
        _ => None,
    };
    let served = serve_rule(
        rule,
        prefix,
        backends,
        downstream,
        host,
        host_header,
        request,
    );
    match rule.request_timeout {
        Some(limit) => match tokio::time::timeout(limit, served).await {
            Ok(response) => response,
            Err(_) => text_response(StatusCode::GATEWAY_TIMEOUT, "request timeout\n"),
        },
        None => served.await,
    }
}

/// `example.com:8080` → `example.com` (IPv6 literals keep their brackets), lowercased,
/// without a trailing dot.
fn host_only(host: &str) -> String {
    let host = if host.starts_with('[') {
        host.split_once(']')
            .map_or(host, |(h, _)| h)
            .trim_start_matches('[')
    } else {
        host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

async fn serve_rule(
    rule: &RuleTarget,
    matched_prefix: Option<&str>,
    backends: Arc<BackendMap>,
    downstream: Downstream,
    host: String,
    host_header: String,
    request: Request<GatewayBody>,
) -> Response<HttpBody> {
    let cors = rule.filters.iter().find_map(|f| match f {
        Filter::Cors(c) => Some(c),
        _ => None,
    });
    let origin = request.headers().get(header::ORIGIN).cloned();
    if let (Some(cors), Some(origin)) = (cors, &origin)
        && request.method() == hyper::Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return preflight(cors, origin, request.headers());
    }
    if let Some(fault) = &rule.fault {
        return text_response(StatusCode::INTERNAL_SERVER_ERROR, format!("{fault}\n"));
    }
    for filter in &rule.filters {
        if let Filter::Redirect(redirect) = filter {
            return redirect_response(redirect, &request, &host, downstream, matched_prefix);
        }
    }
    let Some(backend) = pick_backend(rule) else {
        return text_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the matched rule has no backend to send to\n",
        );
    };
    // A redirect on the backendRef picked answers as a rule's redirect does.
    for filter in &backend.filters {
        if let Filter::Redirect(redirect) = filter {
            return redirect_response(redirect, &request, &host, downstream, matched_prefix);
        }
    }
    let (mut parts, body) = request.into_parts();
    // The backend sees an origin-form URI and a Host header, whatever the client spoke.
    if !parts.headers.contains_key(header::HOST)
        && let Ok(value) = HeaderValue::from_str(&host_header)
    {
        parts.headers.insert(header::HOST, value);
    }
    let mut path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let mut pending = Pending::default();
    pending.apply(
        &rule.filters,
        &mut parts.headers,
        &mut path_and_query,
        matched_prefix,
    );
    pending.apply(
        &backend.filters,
        &mut parts.headers,
        &mut path_and_query,
        matched_prefix,
    );
    let Pending {
        response_filters,
        mirrors,
    } = pending;
    // Rebuilt only when a filter changed it or the client sent an absolute form.
    let unchanged = parts.uri.scheme().is_none()
        && parts.uri.path_and_query().map(|p| p.as_str()) == Some(path_and_query.as_str());
    if !unchanged {
        parts.uri = match Uri::try_from(path_and_query.as_str()) {
            Ok(uri) => uri,
            Err(_) => {
                return text_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the rewritten path is not a valid URI\n",
                );
            }
        };
    }
    let mut body = body;
    if !mirrors.is_empty() {
        body = send_mirrors(&mirrors, &backends, &parts, body).await;
    }
    let key_port = match &backend.target {
        BackendTarget::Service { key, port } => (key.clone(), *port),
        BackendTarget::Invalid(why) => {
            return text_response(StatusCode::INTERNAL_SERVER_ERROR, format!("{why}\n"));
        }
    };
    let no_endpoint = || {
        text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "no ready endpoint for Service {} port {}\n",
                key_port.0, key_port.1
            ),
        )
    };
    let Some(set) = backends.get(&key_port).cloned() else {
        return no_endpoint();
    };
    let request = Request::from_parts(parts, body);
    // An endpoint that is stopping (this map predates its leaving) or restarting its
    // sandbox hands the request back unsent; each endpoint is tried at most once.
    let call = async move {
        let mut request = request;
        for endpoint in set.in_turn() {
            match endpoint.service.try_handle(request).await {
                Ok(response) => return response,
                Err(unsent) => request = unsent,
            }
        }
        no_endpoint()
    };
    let mut response = match rule.backend_timeout {
        Some(limit) => match tokio::time::timeout(limit, call).await {
            Ok(response) => response,
            Err(_) => {
                return text_response(StatusCode::GATEWAY_TIMEOUT, "backend request timeout\n");
            }
        },
        None => call.await,
    };
    for filter in response_filters {
        if let Filter::ResponseHeaders(m) = filter {
            m.apply(response.headers_mut());
        }
    }
    if let (Some(cors), Some(origin)) = (cors, &origin) {
        add_cors_headers(cors, origin, response.headers_mut());
    }
    response
}

/// What request filters leave for later: response modifiers and mirror targets.
#[derive(Default)]
struct Pending<'a> {
    response_filters: Vec<&'a Filter>,
    mirrors: Vec<BackendTarget>,
}

impl<'a> Pending<'a> {
    /// Applies the request side of `filters` (rule level, then backend level) in order.
    fn apply(
        &mut self,
        filters: &'a [Filter],
        headers: &mut HeaderMap,
        path_and_query: &mut String,
        matched_prefix: Option<&str>,
    ) {
        for filter in filters {
            match filter {
                Filter::RequestHeaders(m) => m.apply(headers),
                Filter::Rewrite(rewrite) => {
                    apply_rewrite(rewrite, headers, path_and_query, matched_prefix)
                }
                Filter::Mirror(mirror) => {
                    if sample(mirror.share_ppm) {
                        self.mirrors.push(mirror.backend.clone());
                    }
                }
                Filter::ResponseHeaders(_) => self.response_filters.push(filter),
                Filter::Redirect(_) | Filter::Cors(_) => {}
            }
        }
    }
}

fn pick_backend(rule: &RuleTarget) -> Option<&super::table::WeightedBackend> {
    if rule.total_weight == 0 {
        return None;
    }
    let mut ticket = fastrand::u64(0..rule.total_weight);
    for backend in &rule.backends {
        let w = u64::from(backend.weight);
        if ticket < w {
            return Some(backend);
        }
        ticket -= w;
    }
    None
}

fn sample(share_ppm: u32) -> bool {
    share_ppm >= 1_000_000 || fastrand::u32(0..1_000_000) < share_ppm
}

/// Replaces a matched prefix: `/prefix/one` → `/one` on `/prefix/one/two` gives
/// `/one/two`; `/strip` → `/` on `/strip/x` gives `/x`.
fn replace_prefix(path: &str, prefix: &str, replacement: &str) -> String {
    let rest = path.get(prefix.len()..).unwrap_or("");
    let joined = if replacement.ends_with('/') && (rest.starts_with('/') || rest.is_empty()) {
        format!("{}{rest}", replacement.trim_end_matches('/'))
    } else {
        format!("{replacement}{rest}")
    };
    if joined.is_empty() {
        "/".into()
    } else {
        joined
    }
}

fn modify_path(path: &str, modifier: &PathModifier, matched_prefix: Option<&str>) -> String {
    match modifier {
        PathModifier::Full(full) => full.clone(),
        PathModifier::Prefix(replacement) => match matched_prefix {
            Some(prefix) => replace_prefix(path, prefix, replacement),
            None => path.to_string(),
        },
    }
}

fn apply_rewrite(
    rewrite: &super::table::Rewrite,
    headers: &mut HeaderMap,
    path_and_query: &mut String,
    matched_prefix: Option<&str>,
) {
    if let Some(hostname) = &rewrite.hostname
        && let Ok(value) = HeaderValue::from_str(hostname)
    {
        headers.insert(header::HOST, value);
    }
    if let Some(modifier) = &rewrite.path {
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (path_and_query.clone(), None),
        };
        let new_path = modify_path(&path, modifier, matched_prefix);
        *path_and_query = match query {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
    }
}

fn redirect_response(
    redirect: &super::table::Redirect,
    request: &Request<GatewayBody>,
    host: &str,
    downstream: Downstream,
    matched_prefix: Option<&str>,
) -> Response<HttpBody> {
    let request_scheme = if downstream.https { "https" } else { "http" };
    let scheme = redirect.scheme.as_deref().unwrap_or(request_scheme);
    let hostname = redirect.hostname.as_deref().unwrap_or(host);
    let port = redirect.port.unwrap_or(match redirect.scheme.as_deref() {
        Some("http") => 80,
        Some("https") => 443,
        _ => downstream.port,
    });
    let default_port = (scheme == "http" && port == 80) || (scheme == "https" && port == 443);
    let path = request.uri().path();
    let path = match &redirect.path {
        Some(modifier) => modify_path(path, modifier, matched_prefix),
        None => path.to_string(),
    };
    let query = request
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let location = if default_port {
        format!("{scheme}://{hostname}{path}{query}")
    } else {
        format!("{scheme}://{hostname}:{port}{path}{query}")
    };
    let mut response = text_response(
        StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::FOUND),
        "",
    );
    match HeaderValue::from_str(&location) {
        Ok(value) => {
            response.headers_mut().insert(header::LOCATION, value);
            response
        }
        Err(_) => text_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the redirect location is not a valid header\n",
        ),
    }
}

fn origin_allowed(cors: &Cors, origin: &HeaderValue) -> bool {
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    cors.allow_origins.iter().any(|allowed| {
        if allowed == "*" {
            return true;
        }
        // `https://*.example.com`: a wildcard in the host's first label.
        match allowed.split_once("*.") {
            Some((scheme, suffix)) => {
                origin.starts_with(scheme)
                    && origin[scheme.len()..].ends_with(&format!(".{suffix}"))
            }
            None => allowed.eq_ignore_ascii_case(origin),
        }
    })
}

fn preflight(cors: &Cors, origin: &HeaderValue, request: &HeaderMap) -> Response<HttpBody> {
    let mut response = text_response(StatusCode::OK, "");
    response.headers_mut().remove(header::CONTENT_TYPE);
    if !origin_allowed(cors, origin) {
        return response;
    }
    let headers = response.headers_mut();
    add_cors_headers(cors, origin, headers);
    let join = |values: &[String]| HeaderValue::from_str(&values.join(", ")).ok();
    // With credentials a browser takes `*` literally, so the spec has the gateway name
    // what the preflight asked for instead.
    let allowed = |values: &[String], asked: header::HeaderName| {
        let wildcard = values.iter().any(|v| v == "*");
        if wildcard && cors.allow_credentials {
            request.get(asked).cloned()
        } else {
            join(values)
        }
    };
    if let Some(v) = allowed(&cors.allow_methods, header::ACCESS_CONTROL_REQUEST_METHOD)
        .filter(|v| !v.is_empty())
    {
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, v);
    }
    if let Some(v) = allowed(&cors.allow_headers, header::ACCESS_CONTROL_REQUEST_HEADERS)
        .filter(|v| !v.is_empty())
    {
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v);
    }
    if let Some(age) = cors.max_age {
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(age));
    }
    response
}

fn add_cors_headers(cors: &Cors, origin: &HeaderValue, headers: &mut HeaderMap) {
    if !origin_allowed(cors, origin) {
        return;
    }
    let wildcard = cors.allow_origins.iter().any(|o| o == "*") && !cors.allow_credentials;
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        if wildcard {
            HeaderValue::from_static("*")
        } else {
            origin.clone()
        },
    );
    if cors.allow_credentials {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    if !cors.expose_headers.is_empty()
        && let Ok(v) = HeaderValue::from_str(&cors.expose_headers.join(", "))
    {
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
    }
    if !wildcard {
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// Sends copies of the request to mirror backends (answers are dropped) and gives back
/// the body for the primary request. A body of unknown or excessive size is not copied.
async fn send_mirrors(
    mirrors: &[BackendTarget],
    backends: &Arc<BackendMap>,
    parts: &hyper::http::request::Parts,
    body: GatewayBody,
) -> GatewayBody {
    let size = body.size_hint().exact();
    let copyable = body.is_end_stream() || size.is_some_and(|s| s <= MIRROR_BODY_LIMIT);
    if !copyable {
        tracing::debug!("request body too large or unsized: not mirrored");
        return body;
    }
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            tracing::debug!(error = %e, "request body failed while buffering for a mirror");
            return empty_body();
        }
    };
    for target in mirrors {
        let BackendTarget::Service { key, port } = target else {
            continue;
        };
        let Some(endpoint) = backends
            .get(&(key.clone(), *port))
            .and_then(|s| s.pick())
            .cloned()
        else {
            continue;
        };
        let mut copy = Request::new(full_body(bytes.clone()));
        *copy.method_mut() = parts.method.clone();
        *copy.uri_mut() = parts.uri.clone();
        *copy.headers_mut() = parts.headers.clone();
        tokio::spawn(async move {
            let response = endpoint.service.handle(copy).await;
            // Drain, so the backend finishes; the answer goes nowhere.
            let _ =
                tokio::time::timeout(Duration::from_secs(30), response.into_body().collect()).await;
        });
    }
    full_body(bytes)
}

fn full_body(bytes: Bytes) -> GatewayBody {
    Full::new(bytes)
        .map_err(|never: std::convert::Infallible| match never {})
        .boxed_unsync()
}

fn empty_body() -> GatewayBody {
    full_body(Bytes::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_replacement_keeps_the_rest() {
        assert_eq!(
            replace_prefix("/prefix/one/two", "/prefix/one", "/one"),
            "/one/two"
        );
        assert_eq!(
            replace_prefix("/strip-prefix/three", "/strip-prefix", "/"),
            "/three"
        );
        assert_eq!(replace_prefix("/strip-prefix", "/strip-prefix", "/"), "/");
        assert_eq!(
            replace_prefix("/prefix/one/", "/prefix/one", "/one"),
            "/one/"
        );
        assert_eq!(replace_prefix("/a/b", "", "/x"), "/x/a/b");
        assert_eq!(replace_prefix("/a/b", "/a", "/x/"), "/x/b");
    }

    #[test]
    fn hosts_lose_ports_and_case() {
        assert_eq!(host_only("Example.COM:8080"), "example.com");
        assert_eq!(host_only("example.com."), "example.com");
        assert_eq!(host_only("[::1]:80"), "::1");
        assert_eq!(host_only(""), "");
    }

    #[test]
    fn cors_origins_match_exactly_or_by_wildcard() {
        let cors = Cors {
            allow_origins: vec!["https://foo.example".into(), "https://*.bar.example".into()],
            ..Default::default()
        };
        let ok = |o: &str| origin_allowed(&cors, &HeaderValue::from_str(o).unwrap());
        assert!(ok("https://foo.example"));
        assert!(ok("https://a.bar.example"));
        assert!(!ok("https://bar.example"));
        assert!(!ok("http://a.bar.example"));
        assert!(!ok("https://evil.example"));
    }
}
