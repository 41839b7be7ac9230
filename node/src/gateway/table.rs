//! The route table: what a request on a gateway port is matched against, built once per
//! change and read without locks on every request.
//!
//! Lookup follows the Gateway API's precedence. A port's listeners are picked by the
//! request's host (an exact listener hostname, then the longest wildcard, then a listener
//! without a hostname). Within the listener, route hostnames are tried the same way, most
//! specific first, falling back to less specific ones when no rule matches. Within one
//! hostname, matches are tried in this order:
//!
//! 1. `Exact` paths (a hash lookup),
//! 2. `RegularExpression` paths (longest pattern first; the spec leaves their place to
//!    implementations),
//! 3. `PathPrefix` paths, longest first (a trie over path segments, so `/foo` matches
//!    `/foo`, `/foo/` and `/foo/bar`, never `/foobar`),
//!
//! and among matches of one path: with a method first, then more header matches, then
//! more query matches, then the older route (`creationTimestamp`, in standalone mode the
//! persisted first-seen time), then namespace/name, then rule and match order.
//!
//! The cost of a lookup depends on the path's depth and the number of rules sharing one
//! path, not on the number of routes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use k8s_openapi::jiff::Timestamp;
use regex::Regex;

/// How a path is matched.
#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// A prefix without its trailing slash (`/` is the empty prefix).
    Prefix(String),
    Regex(Regex),
}

/// How a header or query value is matched.
#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => v == value,
            ValueMatch::Regex(r) => r.is_match(value),
        }
    }
}

/// One match of a rule: a path and the conditions beside it.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub method: Option<Method>,
    pub headers: Vec<(HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
}

/// A header modifier, as the filter says: set, add, remove (in that order).
#[derive(Debug, Clone, Default)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// How a redirect or rewrite changes the path.
#[derive(Debug, Clone)]
pub enum PathModifier {
    Full(String),
    Prefix(String),
}

#[derive(Debug, Clone)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: u16,
}

#[derive(Debug, Clone)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone)]
pub struct Mirror {
    pub backend: BackendTarget,
    /// Mirrored share of requests, in parts per million.
    pub share_ppm: u32,
}

#[derive(Debug, Clone, Default)]
pub struct Cors {
    pub allow_origins: Vec<String>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub allow_credentials: bool,
    pub max_age: Option<i32>,
}

/// A filter of a rule or a backend.
#[derive(Debug, Clone)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Mirror),
    Cors(Cors),
}

/// Where a backendRef leads.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendTarget {
    /// A Service port (`namespace/name`), resolved to ready pods on every request.
    Service { key: String, port: u16 },
    /// A reference that cannot be followed: requests for it get 500.
    Invalid(String),
}

#[derive(Debug, Clone)]
pub struct WeightedBackend {
    pub weight: u32,
    pub target: BackendTarget,
    pub filters: Vec<Filter>,
}

/// What a matched rule does.
#[derive(Debug, Clone)]
pub struct RuleTarget {
    /// `namespace/name` of the route.
    pub route: String,
    pub rule: usize,
    pub filters: Vec<Filter>,
    pub backends: Vec<WeightedBackend>,
    pub total_weight: u64,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    /// Set when the rule cannot be served as written (an unresolvable ExtensionRef):
    /// every request it matches gets 500, never a skipped filter.
    pub fault: Option<String>,
}

/// One match entry, with what orders it against others on the same path.
#[derive(Debug, Clone)]
struct Entry {
    order: Order,
    route_match: Arc<RouteMatch>,
    target: Arc<RuleTarget>,
}

/// Precedence among entries on one path (smaller first).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Order {
    pub no_method: bool,
    pub fewer_headers: std::cmp::Reverse<usize>,
    pub fewer_query: std::cmp::Reverse<usize>,
    pub created: Timestamp,
    pub route: String,
    pub rule: usize,
    pub match_index: usize,
}

/// A rule's match attached under a hostname, as compiled from routes.
#[derive(Debug, Clone)]
pub struct Attached {
    pub route_match: Arc<RouteMatch>,
    pub target: Arc<RuleTarget>,
    pub created: Timestamp,
    pub match_index: usize,
}

/// The entries of one hostname.
#[derive(Debug, Default)]
struct PathIndex {
    exact: HashMap<String, Vec<Entry>>,
    regex: Vec<(usize, Entry)>,
    prefix: PrefixNode,
}

#[derive(Debug, Default)]
struct PrefixNode {
    entries: Vec<Entry>,
    children: HashMap<String, PrefixNode>,
}

/// The request facts matching needs.
pub struct RequestFacts<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

/// A successful lookup.
pub struct Found {
    pub target: Arc<RuleTarget>,
    pub route_match: Arc<RouteMatch>,
}

impl PathIndex {
    fn insert(&mut self, entry: Entry) {
        match &entry.route_match.path {
            PathMatch::Exact(path) => self.exact.entry(path.clone()).or_default().push(entry),
            PathMatch::Regex(re) => {
                let len = re.as_str().len();
                self.regex.push((len, entry));
            }
            PathMatch::Prefix(prefix) => {
                let mut node = &mut self.prefix;
                for segment in segments(prefix) {
                    node = node.children.entry(segment.to_string()).or_default();
                }
                node.entries.push(entry);
            }
        }
    }

    fn sort(&mut self) {
        for entries in self.exact.values_mut() {
            entries.sort_by(|a, b| a.order.cmp(&b.order));
        }
        self.regex
            .sort_by(|(la, a), (lb, b)| lb.cmp(la).then_with(|| a.order.cmp(&b.order)));
        fn sort_node(node: &mut PrefixNode) {
            node.entries.sort_by(|a, b| a.order.cmp(&b.order));
            for child in node.children.values_mut() {
                sort_node(child);
            }
        }
        sort_node(&mut self.prefix);
    }

    fn lookup(&self, facts: &RequestFacts<'_>, query: &[(String, String)]) -> Option<Found> {
        fn hit<'e>(
            mut entries: impl Iterator<Item = &'e Entry>,
            facts: &RequestFacts<'_>,
            query: &[(String, String)],
        ) -> Option<Found> {
            entries
                .find(|e| conditions_match(&e.route_match, facts, query))
                .map(|e| Found {
                    target: e.target.clone(),
                    route_match: e.route_match.clone(),
                })
        }
        if let Some(entries) = self.exact.get(facts.path)
            && let Some(found) = hit(entries.iter(), facts, query)
        {
            return Some(found);
        }
        if !self.regex.is_empty() {
            let matching =
                self.regex
                    .iter()
                    .map(|(_, e)| e)
                    .filter(|e| match &e.route_match.path {
                        PathMatch::Regex(re) => re.is_match(facts.path),
                        _ => false,
                    });
            if let Some(found) = hit(matching, facts, query) {
                return Some(found);
            }
        }
        // Walk down the trie as far as the path goes, then try the deepest node first.
        let mut chain = vec![&self.prefix];
        let mut node = &self.prefix;
        for segment in segments(facts.path) {
            match node.children.get(segment) {
                Some(child) => {
                    chain.push(child);
                    node = child;
                }
                None => break,
            }
        }
        chain
            .into_iter()
            .rev()
            .find_map(|node| hit(node.entries.iter(), facts, query))
    }
}

/// A path's segments after the leading slash, ignoring one trailing slash (`/a/b/` →
/// `a`, `b`; `/` → nothing).
fn segments(path: &str) -> impl Iterator<Item = &str> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    trimmed.split('/').filter(|s| !s.is_empty())
}

fn conditions_match(m: &RouteMatch, facts: &RequestFacts<'_>, query: &[(String, String)]) -> bool {
    if let Some(method) = &m.method
        && method != facts.method
    {
        return false;
    }
    for (name, value) in &m.headers {
        let mut values = facts.headers.get_all(name).iter();
        let Some(first) = values.next() else {
            return false;
        };
        let mut joined = String::from_utf8_lossy(first.as_bytes()).into_owned();
        for more in values {
            joined.push(',');
            joined.push_str(&String::from_utf8_lossy(more.as_bytes()));
        }
        if !value.matches(&joined) {
            return false;
        }
    }
    for (name, value) in &m.query {
        // The first parameter of a name counts, as the spec says.
        match query.iter().find(|(n, _)| n == name) {
            Some((_, v)) if value.matches(v) => {}
            _ => return false,
        }
    }
    true
}

/// The routes of one hostname pattern kind, for one listener.
#[derive(Debug, Default)]
struct HostIndex {
    exact: HashMap<String, PathIndex>,
    /// Wildcard suffixes (`.example.com` for `*.example.com`), longest first.
    wildcard: Vec<(String, PathIndex)>,
    any: Option<PathIndex>,
}

impl HostIndex {
    fn lookup(&self, facts: &RequestFacts<'_>, query: &[(String, String)]) -> Option<Found> {
        if let Some(index) = self.exact.get(facts.host)
            && let Some(found) = index.lookup(facts, query)
        {
            return Some(found);
        }
        for (suffix, index) in &self.wildcard {
            if wildcard_matches(suffix, facts.host)
                && let Some(found) = index.lookup(facts, query)
            {
                return Some(found);
            }
        }
        self.any.as_ref()?.lookup(facts, query)
    }
}

/// `suffix` is `.example.com` for `*.example.com`: it matches `a.example.com` and
/// `a.b.example.com`, never `example.com`.
pub fn wildcard_matches(suffix: &str, host: &str) -> bool {
    host.len() > suffix.len() && host.ends_with(suffix)
}

/// One listener's routes.
#[derive(Debug)]
pub struct ListenerTable {
    /// `namespace/name` of its Gateway and its name (for logs and metrics).
    pub gateway: String,
    pub name: String,
    pub hostname: Option<String>,
    routes: HostIndex,
}

impl ListenerTable {
    /// Builds a listener's index from its attached matches, each under the effective
    /// hostnames (`None`: any host).
    pub fn new(
        gateway: String,
        name: String,
        hostname: Option<String>,
        attached: Vec<(Option<String>, Attached)>,
    ) -> Self {
        let mut routes = HostIndex::default();
        let mut wildcard: HashMap<String, PathIndex> = HashMap::new();
        for (host, a) in attached {
            let m = &a.route_match;
            let entry = Entry {
                order: Order {
                    no_method: m.method.is_none(),
                    fewer_headers: std::cmp::Reverse(m.headers.len()),
                    fewer_query: std::cmp::Reverse(m.query.len()),
                    created: a.created,
                    route: a.target.route.clone(),
                    rule: a.target.rule,
                    match_index: a.match_index,
                },
                route_match: a.route_match,
                target: a.target,
            };
            let index = match host {
                None => routes.any.get_or_insert_with(Default::default),
                Some(h) => match h.strip_prefix('*') {
                    Some(suffix) => wildcard.entry(suffix.to_string()).or_default(),
                    None => routes.exact.entry(h).or_default(),
                },
            };
            index.insert(entry);
        }
        routes.wildcard = wildcard.into_iter().collect();
        routes
            .wildcard
            .sort_by(|(a, _), (b, _)| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        for index in routes.exact.values_mut() {
            index.sort();
        }
        for (_, index) in routes.wildcard.iter_mut() {
            index.sort();
        }
        if let Some(index) = routes.any.as_mut() {
            index.sort();
        }
        Self {
            gateway,
            name,
            hostname,
            routes,
        }
    }
}

/// Whether a port serves plain HTTP or terminates TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Https,
}

/// Everything served on one port.
#[derive(Debug)]
pub struct PortTable {
    pub protocol: Protocol,
    exact: HashMap<String, ListenerTable>,
    wildcard: Vec<(String, ListenerTable)>,
    any: Option<ListenerTable>,
}

impl PortTable {
    /// Listeners must not conflict (one per hostname); the compiler guarantees it.
    pub fn new(protocol: Protocol, listeners: Vec<ListenerTable>) -> Self {
        let mut table = Self {
            protocol,
            exact: HashMap::new(),
            wildcard: Vec::new(),
            any: None,
        };
        for listener in listeners {
            match listener.hostname.clone() {
                None => table.any = Some(listener),
                Some(h) => match h.strip_prefix('*') {
                    Some(suffix) => table.wildcard.push((suffix.to_string(), listener)),
                    None => {
                        table.exact.insert(h, listener);
                    }
                },
            }
        }
        table
            .wildcard
            .sort_by(|(a, _), (b, _)| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        table
    }

    /// The listener a host belongs to.
    pub fn listener(&self, host: &str) -> Option<&ListenerTable> {
        if let Some(l) = self.exact.get(host) {
            return Some(l);
        }
        if let Some((_, l)) = self
            .wildcard
            .iter()
            .find(|(suffix, _)| wildcard_matches(suffix, host))
        {
            return Some(l);
        }
        self.any.as_ref()
    }

    /// The rule serving a request, if any.
    pub fn lookup(&self, facts: &RequestFacts<'_>) -> Option<Found> {
        let listener = self.listener(facts.host)?;
        let query = parse_query(facts.query);
        listener.routes.lookup(facts, &query)
    }
}

/// `a=1&b=%20x` → pairs, percent-decoded (`+` is a space, as forms encode it).
pub fn parse_query(query: Option<&str>) -> Vec<(String, String)> {
    let Some(query) = query else {
        return Vec::new();
    };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(name), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// All ports' tables; swapped whole on every change.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub ports: HashMap<u16, PortTable>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(route: &str, rule: usize) -> Arc<RuleTarget> {
        Arc::new(RuleTarget {
            route: route.into(),
            rule,
            filters: Vec::new(),
            backends: Vec::new(),
            total_weight: 0,
            request_timeout: None,
            backend_timeout: None,
            fault: None,
        })
    }

    fn attach(route: &str, rule: usize, path: PathMatch, age: i64) -> Attached {
        Attached {
            route_match: Arc::new(RouteMatch {
                path,
                method: None,
                headers: Vec::new(),
                query: Vec::new(),
            }),
            target: target(route, rule),
            created: Timestamp::from_second(age).unwrap(),
            match_index: 0,
        }
    }

    fn lookup(table: &PortTable, host: &str, path: &str) -> Option<String> {
        let (path, query) = path
            .split_once('?')
            .map_or((path, None), |(p, q)| (p, Some(q)));
        let headers = HeaderMap::new();
        let facts = RequestFacts {
            host,
            path,
            query,
            method: &Method::GET,
            headers: &headers,
        };
        table
            .lookup(&facts)
            .map(|f| format!("{}#{}", f.target.route, f.target.rule))
    }

    #[test]
    fn exact_beats_longest_prefix_beats_shorter_prefix() {
        let listener = ListenerTable::new(
            "g".into(),
            "l".into(),
            None,
            vec![
                (None, attach("a", 0, PathMatch::Prefix(String::new()), 1)),
                (None, attach("b", 0, PathMatch::Prefix("/foo".into()), 1)),
                (None, attach("c", 0, PathMatch::Exact("/foo/bar".into()), 1)),
                (
                    None,
                    attach("d", 0, PathMatch::Prefix("/foo/bar".into()), 1),
                ),
            ],
        );
        let table = PortTable::new(Protocol::Http, vec![listener]);
        assert_eq!(lookup(&table, "x", "/foo/bar").as_deref(), Some("c#0"));
        assert_eq!(lookup(&table, "x", "/foo/bar/").as_deref(), Some("d#0"));
        assert_eq!(lookup(&table, "x", "/foo/baz").as_deref(), Some("b#0"));
        assert_eq!(lookup(&table, "x", "/foo").as_deref(), Some("b#0"));
        assert_eq!(lookup(&table, "x", "/foobar").as_deref(), Some("a#0"));
    }

    #[test]
    fn older_routes_win_ties_then_names() {
        let listener = ListenerTable::new(
            "g".into(),
            "l".into(),
            None,
            vec![
                (None, attach("ns/b", 0, PathMatch::Prefix("/x".into()), 5)),
                (None, attach("ns/z", 0, PathMatch::Prefix("/x".into()), 1)),
                (None, attach("ns/a", 0, PathMatch::Prefix("/y".into()), 5)),
                (None, attach("ns/b", 1, PathMatch::Prefix("/y".into()), 5)),
            ],
        );
        let table = PortTable::new(Protocol::Http, vec![listener]);
        assert_eq!(lookup(&table, "h", "/x").as_deref(), Some("ns/z#0"));
        assert_eq!(lookup(&table, "h", "/y").as_deref(), Some("ns/a#0"));
    }

    #[test]
    fn hostnames_most_specific_first_with_fallback() {
        let listener = ListenerTable::new(
            "g".into(),
            "l".into(),
            None,
            vec![
                (
                    Some("a.example.com".into()),
                    attach("exact", 0, PathMatch::Exact("/only".into()), 1),
                ),
                (
                    Some("*.example.com".into()),
                    attach("wild", 0, PathMatch::Prefix(String::new()), 1),
                ),
                (
                    Some("*.b.example.com".into()),
                    attach("wild2", 0, PathMatch::Prefix(String::new()), 1),
                ),
                (None, attach("any", 0, PathMatch::Prefix(String::new()), 1)),
            ],
        );
        let table = PortTable::new(Protocol::Http, vec![listener]);
        assert_eq!(
            lookup(&table, "a.example.com", "/only").as_deref(),
            Some("exact#0")
        );
        assert_eq!(
            lookup(&table, "a.example.com", "/other").as_deref(),
            Some("wild#0")
        );
        assert_eq!(
            lookup(&table, "x.b.example.com", "/").as_deref(),
            Some("wild2#0")
        );
        assert_eq!(lookup(&table, "example.com", "/").as_deref(), Some("any#0"));
    }

    #[test]
    fn listeners_are_picked_by_host() {
        let l1 = ListenerTable::new(
            "g".into(),
            "one".into(),
            Some("one.example.com".into()),
            vec![(
                Some("one.example.com".into()),
                attach("r1", 0, PathMatch::Prefix(String::new()), 1),
            )],
        );
        let l2 = ListenerTable::new(
            "g".into(),
            "wild".into(),
            Some("*.example.com".into()),
            vec![(
                Some("*.example.com".into()),
                attach("r2", 0, PathMatch::Prefix(String::new()), 1),
            )],
        );
        let table = PortTable::new(Protocol::Http, vec![l1, l2]);
        assert_eq!(
            lookup(&table, "one.example.com", "/").as_deref(),
            Some("r1#0")
        );
        assert_eq!(
            lookup(&table, "two.example.com", "/").as_deref(),
            Some("r2#0")
        );
        assert_eq!(lookup(&table, "other.net", "/"), None);
    }

    #[test]
    fn conditions_order_and_query_decoding() {
        let mut with_query = attach("q", 0, PathMatch::Prefix(String::new()), 9);
        Arc::get_mut(&mut with_query.route_match).unwrap().query =
            vec![("animal".into(), ValueMatch::Exact("big whale".into()))];
        let plain = attach("plain", 0, PathMatch::Prefix(String::new()), 1);
        let listener = ListenerTable::new(
            "g".into(),
            "l".into(),
            None,
            vec![(None, plain), (None, with_query)],
        );
        let table = PortTable::new(Protocol::Http, vec![listener]);
        assert_eq!(
            lookup(&table, "h", "/?animal=big+whale").as_deref(),
            Some("q#0")
        );
        assert_eq!(
            lookup(&table, "h", "/?animal=big%20whale&animal=x").as_deref(),
            Some("q#0")
        );
        assert_eq!(
            lookup(&table, "h", "/?animal=dolphin").as_deref(),
            Some("plain#0")
        );
        assert_eq!(
            parse_query(Some("a=%zz&b=%4")),
            vec![("a".into(), "%zz".into()), ("b".into(), "%4".into())]
        );
    }
}
