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
//! 3. `PathPrefix` paths, longest first (the path and then its prefixes at segment
//!    boundaries, so `/foo` matches `/foo`, `/foo/` and `/foo/bar`, never `/foobar`),
//!
//! and among matches of one path: with a method first, then more header matches, then
//! more query matches, then the older route (`creationTimestamp`, in standalone mode the
//! persisted first-seen time), then namespace/name, then rule and match order.
//!
//! The cost of a lookup depends on the path's depth and the number of rules sharing one
//! path, not on the number of routes: a hash probe for the host, then one per path
//! prefix into a small per-host map whose entries lie side by side.

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

/// One match entry. Entries of one path key are stored in precedence order, so the
/// order itself is only needed while building (and kept out of the hot data).
#[derive(Debug, Clone)]
struct Entry {
    route_match: Arc<RouteMatch>,
    target: Arc<RuleTarget>,
}

/// An entry and its precedence, while a table is built.
type Ordered = (Order, Entry);

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

/// Hash maps of the table: keys are configuration (route hostnames and paths), so a
/// fast hasher is safe; requests only look up.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Where a path key's entries are in [`PathIndex::entries`].
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    exact: (u32, u32),
    prefix: (u32, u32),
}

/// The entries of one hostname. Exact paths and prefixes share one small map from the
/// path to its entries, which lie side by side in one vector: a lookup probes the map
/// with the path and then with each of its prefixes at a segment boundary, longest first.
/// Few cache lines per lookup, however many routes the table holds.
#[derive(Debug, Default)]
struct PathIndex {
    keys: FastMap<Box<str>, Slot>,
    entries: Vec<Entry>,
    regex: Vec<Entry>,
}

/// Builds a [`PathIndex`]: entries grouped by path key before they are laid out.
#[derive(Default)]
struct PathIndexBuilder {
    exact: HashMap<String, Vec<Ordered>>,
    prefix: HashMap<String, Vec<Ordered>>,
    regex: Vec<Ordered>,
}

/// The request facts matching needs.
pub struct RequestFacts<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

/// A successful lookup, borrowed from the table it was found in.
pub struct Found<'t> {
    pub target: &'t RuleTarget,
    pub route_match: &'t RouteMatch,
}

impl PathIndexBuilder {
    fn insert(&mut self, entry: Ordered) {
        match &entry.1.route_match.path {
            PathMatch::Exact(path) => self.exact.entry(path.clone()).or_default().push(entry),
            PathMatch::Regex(_) => self.regex.push(entry),
            PathMatch::Prefix(prefix) => self
                .prefix
                .entry(normalize_prefix(prefix))
                .or_default()
                .push(entry),
        }
    }

    fn build(self) -> PathIndex {
        let mut index = PathIndex::default();
        let mut slots: HashMap<String, Slot> = HashMap::new();
        let lay_out = |entries: Vec<Ordered>, index: &mut PathIndex| {
            let mut entries = entries;
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let start = index.entries.len() as u32;
            index.entries.extend(entries.into_iter().map(|(_, e)| e));
            (start, index.entries.len() as u32)
        };
        for (path, entries) in self.exact {
            slots.entry(path).or_default().exact = lay_out(entries, &mut index);
        }
        for (prefix, entries) in self.prefix {
            slots.entry(prefix).or_default().prefix = lay_out(entries, &mut index);
        }
        index.keys = slots
            .into_iter()
            .map(|(k, v)| (k.into_boxed_str(), v))
            .collect();
        let mut regex = self.regex;
        let pattern_len = |e: &Entry| match &e.route_match.path {
            PathMatch::Regex(re) => re.as_str().len(),
            _ => 0,
        };
        regex.sort_by(|a, b| {
            pattern_len(&b.1)
                .cmp(&pattern_len(&a.1))
                .then_with(|| a.0.cmp(&b.0))
        });
        index.regex = regex.into_iter().map(|(_, e)| e).collect();
        index
    }
}

/// A prefix as a path key: no trailing slash, no empty segments (`/` is the empty key).
fn normalize_prefix(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len());
    for segment in segments(prefix) {
        out.push('/');
        out.push_str(segment);
    }
    out
}

impl PathIndex {
    fn lookup<'t>(
        &'t self,
        facts: &RequestFacts<'_>,
        query: &[(String, String)],
    ) -> Option<Found<'t>> {
        fn hit<'t>(
            mut entries: impl Iterator<Item = &'t Entry>,
            facts: &RequestFacts<'_>,
            query: &[(String, String)],
        ) -> Option<Found<'t>> {
            entries
                .find(|e| conditions_match(&e.route_match, facts, query))
                .map(|e| Found {
                    target: &e.target,
                    route_match: &e.route_match,
                })
        }
        let slice = |(start, end): (u32, u32)| {
            self.entries
                .get(start as usize..end as usize)
                .unwrap_or_default()
        };
        if let Some(slot) = self.keys.get(facts.path)
            && let Some(found) = hit(slice(slot.exact).iter(), facts, query)
        {
            return Some(found);
        }
        if !self.regex.is_empty() {
            let matching = self.regex.iter().filter(|e| match &e.route_match.path {
                PathMatch::Regex(re) => re.is_match(facts.path),
                _ => false,
            });
            if let Some(found) = hit(matching, facts, query) {
                return Some(found);
            }
        }
        // The path's prefixes at segment boundaries, longest first: `/a/b/` → `/a/b`,
        // `/a`, ``. A path with empty segments is normalized first (rarely needed).
        let normalized;
        let mut candidate = facts.path.trim_end_matches('/');
        if candidate.contains("//") {
            normalized = normalize_prefix(candidate);
            candidate = &normalized;
        }
        loop {
            if let Some(slot) = self.keys.get(candidate)
                && let Some(found) = hit(slice(slot.prefix).iter(), facts, query)
            {
                return Some(found);
            }
            if candidate.is_empty() {
                return None;
            }
            candidate = candidate.rfind('/').map_or("", |i| &candidate[..i]);
        }
    }
}

/// A path's segments after the leading slash, ignoring empty ones (`/a/b/` → `a`, `b`;
/// `/` → nothing).
fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
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

/// The routes of one listener, by hostname.
#[derive(Debug, Default)]
struct HostIndex {
    exact: FastMap<Box<str>, u32>,
    /// Wildcard suffixes (`.example.com` for `*.example.com`), longest first.
    wildcard: Vec<(Box<str>, u32)>,
    any: Option<u32>,
    paths: Vec<PathIndex>,
}

impl HostIndex {
    fn lookup<'t>(
        &'t self,
        facts: &RequestFacts<'_>,
        query: &[(String, String)],
    ) -> Option<Found<'t>> {
        let path = |i: u32| self.paths.get(i as usize);
        if let Some(index) = self.exact.get(facts.host).and_then(|i| path(*i))
            && let Some(found) = index.lookup(facts, query)
        {
            return Some(found);
        }
        for (suffix, i) in &self.wildcard {
            if wildcard_matches(suffix, facts.host)
                && let Some(found) = path(*i).and_then(|index| index.lookup(facts, query))
            {
                return Some(found);
            }
        }
        path(self.any?)?.lookup(facts, query)
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
        let mut exact: HashMap<String, PathIndexBuilder> = HashMap::new();
        let mut wildcard: HashMap<String, PathIndexBuilder> = HashMap::new();
        let mut any: Option<PathIndexBuilder> = None;
        for (host, a) in attached {
            let m = &a.route_match;
            let order = Order {
                no_method: m.method.is_none(),
                fewer_headers: std::cmp::Reverse(m.headers.len()),
                fewer_query: std::cmp::Reverse(m.query.len()),
                created: a.created,
                route: a.target.route.clone(),
                rule: a.target.rule,
                match_index: a.match_index,
            };
            let entry = Entry {
                route_match: a.route_match,
                target: a.target,
            };
            let builder = match host {
                None => any.get_or_insert_with(Default::default),
                Some(h) => match h.strip_prefix('*') {
                    Some(suffix) => wildcard.entry(suffix.to_string()).or_default(),
                    None => exact.entry(h).or_default(),
                },
            };
            builder.insert((order, entry));
        }
        let mut routes = HostIndex::default();
        for (host, builder) in exact {
            routes
                .exact
                .insert(host.into_boxed_str(), routes.paths.len() as u32);
            routes.paths.push(builder.build());
        }
        let mut wildcards: Vec<(String, PathIndexBuilder)> = wildcard.into_iter().collect();
        wildcards.sort_by(|(a, _), (b, _)| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        for (suffix, builder) in wildcards {
            routes
                .wildcard
                .push((suffix.into_boxed_str(), routes.paths.len() as u32));
            routes.paths.push(builder.build());
        }
        if let Some(builder) = any {
            routes.any = Some(routes.paths.len() as u32);
            routes.paths.push(builder.build());
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
    pub fn lookup(&self, facts: &RequestFacts<'_>) -> Option<Found<'_>> {
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
        // Empty segments and trailing slashes do not change which prefix matches.
        assert_eq!(lookup(&table, "x", "/foo//bar/x").as_deref(), Some("d#0"));
        assert_eq!(lookup(&table, "x", "//foo").as_deref(), Some("b#0"));
        assert_eq!(lookup(&table, "x", "/foo/bar//").as_deref(), Some("d#0"));
        assert_eq!(lookup(&table, "x", "").as_deref(), Some("a#0"));
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
