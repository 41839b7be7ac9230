//! From objects to a data plane: which GatewayClasses and Gateways are this node's, which
//! listeners are valid, which routes attach where, the route table of every port, and
//! the status of every object, with the Gateway API's condition types and reasons.
//!
//! Pure: no I/O, no clock but the one passed in. Listener binding happens afterwards, so
//! [`Compiled::finish`] folds the bind results into the Gateways' status.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use brink_proto::gateway::{GROUP, compile_regex, parse_duration, wire_name};
use gateway_api::gatewayclasses::GatewayClassStatus;
use gateway_api::gateways::{
    Gateway, GatewayListeners, GatewayListenersAllowedRoutesNamespacesFrom, GatewayStatus,
    GatewayStatusAddresses, GatewayStatusListeners, GatewayStatusListenersSupportedKinds,
};
use gateway_api::httproutes::{
    HttpRoute, HttpRouteParentRefs, HttpRouteRules, HttpRouteRulesFilters,
    HttpRouteRulesFiltersType, HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesPathType,
    HttpRouteRulesMatchesQueryParamsType, HttpRouteStatus, HttpRouteStatusParents,
    HttpRouteStatusParentsParentRef,
};
use hyper::Method;
use hyper::header::{HeaderName, HeaderValue};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use k8s_openapi::jiff::Timestamp;
use rustls::sign::CertifiedKey;

use super::table::{
    Attached, BackendTarget, Cors, Filter, HeaderModifier, ListenerTable, Mirror, PathMatch,
    PathModifier, PortTable, Protocol, Redirect, Rewrite, RouteMatch, RuleTarget, ValueMatch,
    WeightedBackend, wildcard_matches,
};
use crate::source::GatewayObjects;

/// What the compiler needs besides the objects.
pub struct Inputs<'a> {
    pub objects: &'a GatewayObjects,
    /// Secrets by `namespace/name` (TLS certificates).
    pub secrets: &'a BTreeMap<String, Secret>,
    /// The `controllerName` of the GatewayClasses this node implements.
    pub controller: &'a str,
    /// The address written into Gateways' status.
    pub address: IpAddr,
    pub now: Timestamp,
}

/// Why a condition is False (or Conflicted True): its reason and message.
type Problem = (&'static str, String);
/// A match attached under an effective hostname (`None`: any host).
type HostMatch = (Option<String>, Attached);
/// A listener (by index) a route attaches to, with the effective hostnames.
type Placement = (usize, Vec<Option<String>>);
/// Certificates of a port by listener hostname (`None`: the listener without one).
type Certificates = Vec<(Option<String>, Arc<CertifiedKey>)>;

/// One port's plan: its table and, for HTTPS, its certificates.
pub struct PortPlan {
    pub table: PortTable,
    pub certificates: Certificates,
}

/// The result of a compile, before listeners are bound.
pub struct Compiled {
    pub ports: BTreeMap<u16, PortPlan>,
    pub classes: BTreeMap<String, GatewayClassStatus>,
    pub routes: BTreeMap<String, HttpRouteStatus>,
    gateways: BTreeMap<String, GatewayDraft>,
}

/// A Gateway's status, waiting for its listeners' bind results.
struct GatewayDraft {
    generation: Option<i64>,
    accepted: Result<&'static str, (&'static str, String)>,
    listeners: Vec<ListenerState>,
    address: IpAddr,
}

/// A listener as the compiler judged it.
#[derive(Clone)]
struct ListenerState {
    gateway_namespace: String,
    name: String,
    port: u16,
    protocol: Option<Protocol>,
    hostname: Option<String>,
    supported_kinds: Vec<String>,
    /// Accepted=False: (reason, message).
    not_accepted: Option<Problem>,
    /// ResolvedRefs=False: (reason, message).
    unresolved: Option<Problem>,
    /// Conflicted=True: (reason, message).
    conflicted: Option<Problem>,
    certificate: Option<Arc<CertifiedKey>>,
    allowed_from: GatewayListenersAllowedRoutesNamespacesFrom,
    selector: Option<LabelSelector>,
    attached_routes: i32,
}

impl ListenerState {
    /// May routes attach (it is accepted and not conflicted)?
    fn accepting(&self) -> bool {
        self.not_accepted.is_none() && self.conflicted.is_none() && self.protocol.is_some()
    }

    /// Will it serve (also: its references resolve)?
    fn serving(&self) -> bool {
        self.accepting() && self.unresolved.is_none()
    }
}

/// A condition as the API writes it; `lastTransitionTime` is settled by
/// [`carry_transition_times`].
pub fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: Time(now),
    }
}

/// Keeps a condition's `lastTransitionTime` while its status stays the same, as the API
/// machinery's `SetStatusCondition` does.
pub fn carry_transition_times(previous: &[Condition], current: &mut [Condition]) {
    for c in current {
        if let Some(old) = previous.iter().find(|o| o.type_ == c.type_)
            && old.status == c.status
        {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }
}

pub fn compile(inputs: &Inputs<'_>) -> Compiled {
    let objects = inputs.objects;
    let now = inputs.now;
    // GatewayClasses this node implements.
    let mut classes = BTreeMap::new();
    for (name, class) in &objects.classes {
        if class.spec.controller_name != inputs.controller {
            continue;
        }
        let accepted = if class.spec.parameters_ref.is_some() {
            condition(
                "Accepted",
                false,
                "InvalidParameters",
                "Brink's GatewayClass takes no parameters",
                class.metadata.generation,
                now,
            )
        } else {
            condition(
                "Accepted",
                true,
                "Accepted",
                "Brink serves Gateways of this class",
                class.metadata.generation,
                now,
            )
        };
        let ok = accepted.status == "True";
        classes.insert(
            name.clone(),
            (
                ok,
                GatewayClassStatus {
                    conditions: Some(vec![
                        accepted,
                        // No CRDs to read standalone: the types are built in, so the
                        // version is always one Brink serves.
                        condition(
                            "SupportedVersion",
                            true,
                            "SupportedVersion",
                            "Gateway API v1 types are built into Brink",
                            class.metadata.generation,
                            now,
                        ),
                    ]),
                    supported_features: None,
                },
            ),
        );
    }

    // Gateways of those classes, oldest first.
    let mut gateways: Vec<(&String, &Gateway)> = objects
        .gateways
        .iter()
        .filter(|(_, g)| classes.contains_key(&g.spec.gateway_class_name))
        .collect();
    gateways.sort_by_key(|(key, g)| (created(&g.metadata), *key));
    let mut drafts: BTreeMap<String, GatewayDraft> = BTreeMap::new();
    for (key, gateway) in &gateways {
        let class_ok = classes
            .get(&gateway.spec.gateway_class_name)
            .is_some_and(|(ok, _)| *ok);
        let namespace = gateway.metadata.namespace.clone().unwrap_or_default();
        let listeners: Vec<ListenerState> = gateway
            .spec
            .listeners
            .iter()
            .map(|l| judge_listener(key, &namespace, l, inputs))
            .collect();
        let unsupported_address = gateway.spec.addresses.iter().flatten().find(|a| {
            a.value.as_deref().and_then(|v| v.parse::<IpAddr>().ok()) != Some(inputs.address)
        });
        let accepted = if !class_ok {
            Err((
                "Invalid",
                format!(
                    "GatewayClass {} is not accepted",
                    gateway.spec.gateway_class_name
                ),
            ))
        } else if let Some(address) = unsupported_address {
            Err((
                "UnsupportedAddress",
                format!(
                    "address {:?} is not this node's gateway address {}",
                    address.value.as_deref().unwrap_or_default(),
                    inputs.address
                ),
            ))
        } else {
            Ok("Accepted")
        };
        drafts.insert(
            (*key).clone(),
            GatewayDraft {
                generation: gateway.metadata.generation,
                accepted,
                listeners,
                address: inputs.address,
            },
        );
    }
    mark_conflicts(&mut drafts);

    // Routes, oldest first.
    let mut routes: Vec<_> = objects.routes.iter().collect();
    routes.sort_by_key(|(key, r)| (created(&r.route.metadata), *key));
    let mut route_status = BTreeMap::new();
    // (gateway, listener index) → attached matches.
    let mut attached: HashMap<(String, usize), Vec<HostMatch>> = HashMap::new();
    for (key, manifest) in routes {
        let route = &manifest.route;
        let namespace = route.metadata.namespace.clone().unwrap_or_default();
        let generation = route.metadata.generation;
        let created = created(&route.metadata);
        let compiled_rules = match &manifest.invalid {
            Some(_) => Vec::new(),
            None => compile_rules(key, &namespace, route, inputs),
        };
        let resolved = compiled_rules
            .iter()
            .find_map(|r| r.problem.clone())
            .map_or_else(
                || {
                    condition(
                        "ResolvedRefs",
                        true,
                        "ResolvedRefs",
                        "all references resolved",
                        generation,
                        now,
                    )
                },
                |(reason, message)| {
                    condition("ResolvedRefs", false, reason, message, generation, now)
                },
            );
        let hostnames = route.spec.hostnames.clone().unwrap_or_default();
        let mut parents = Vec::new();
        let mut seen_parents = HashSet::new();
        for parent in route.spec.parent_refs.iter().flatten() {
            let group = parent.group.as_deref().unwrap_or(GROUP);
            let kind = parent.kind.as_deref().unwrap_or("Gateway");
            if group != GROUP || kind != "Gateway" {
                continue;
            }
            let gateway_key = format!(
                "{}/{}",
                parent.namespace.as_deref().unwrap_or(&namespace),
                parent.name
            );
            let Some(draft) = drafts.get_mut(&gateway_key) else {
                // Not a Gateway of ours (or none at all): not ours to report on.
                continue;
            };
            if !seen_parents.insert(parent_identity(parent)) {
                continue;
            }
            let accepted = attach_route(
                manifest.invalid.as_ref(),
                parent,
                &namespace,
                &hostnames,
                draft,
                &gateway_key,
                objects,
            );
            let accepted = match accepted {
                Ok(places) => {
                    for (index, hosts) in places {
                        let slot = attached.entry((gateway_key.clone(), index)).or_default();
                        for host in hosts {
                            for rule in &compiled_rules {
                                for (match_index, m) in rule.matches.iter().enumerate() {
                                    slot.push((
                                        host.clone(),
                                        Attached {
                                            route_match: m.clone(),
                                            target: rule.target.clone(),
                                            created,
                                            match_index,
                                        },
                                    ));
                                }
                            }
                        }
                    }
                    condition("Accepted", true, "Accepted", "attached", generation, now)
                }
                Err((reason, message)) => {
                    condition("Accepted", false, reason, message, generation, now)
                }
            };
            parents.push(HttpRouteStatusParents {
                conditions: vec![accepted, resolved.clone()],
                controller_name: inputs.controller.to_string(),
                parent_ref: status_parent_ref(parent),
            });
        }
        route_status.insert(key.clone(), HttpRouteStatus { parents });
    }

    // Tables per port, from the listeners that serve.
    let mut by_port: BTreeMap<u16, (Protocol, Vec<ListenerTable>, Certificates)> = BTreeMap::new();
    for (key, draft) in &drafts {
        if draft.accepted.is_err() {
            continue;
        }
        for (index, listener) in draft.listeners.iter().enumerate() {
            let Some(protocol) = listener.protocol.filter(|_| listener.serving()) else {
                continue;
            };
            let entries = attached.remove(&(key.clone(), index)).unwrap_or_default();
            let port = by_port
                .entry(listener.port)
                .or_insert_with(|| (protocol, Vec::new(), Vec::new()));
            if let Some(cert) = &listener.certificate {
                port.2.push((listener.hostname.clone(), cert.clone()));
            }
            port.1.push(ListenerTable::new(
                key.clone(),
                listener.name.clone(),
                listener.hostname.clone(),
                entries,
            ));
        }
    }
    let ports = by_port
        .into_iter()
        .map(|(port, (protocol, listeners, certificates))| {
            (
                port,
                PortPlan {
                    table: PortTable::new(protocol, listeners),
                    certificates,
                },
            )
        })
        .collect();
    Compiled {
        ports,
        classes: classes.into_iter().map(|(k, (_, s))| (k, s)).collect(),
        routes: route_status,
        gateways: drafts,
    }
}

impl Compiled {
    /// The Gateways' status, now that ports were bound (`bind_errors`: port → why not).
    pub fn finish(
        &self,
        bind_errors: &HashMap<u16, String>,
        now: Timestamp,
    ) -> BTreeMap<String, GatewayStatus> {
        let mut out = BTreeMap::new();
        for (key, draft) in &self.gateways {
            let generation = draft.generation;
            let mut listeners = Vec::new();
            let mut programmed_any = false;
            let mut invalid_any = false;
            for l in &draft.listeners {
                let bind_error = bind_errors.get(&l.port);
                let mut conditions = Vec::new();
                match (&l.not_accepted, bind_error) {
                    (Some((reason, message)), _) => conditions.push(condition(
                        "Accepted",
                        false,
                        reason,
                        message.clone(),
                        generation,
                        now,
                    )),
                    (None, Some(error)) => conditions.push(condition(
                        "Accepted",
                        false,
                        "PortUnavailable",
                        format!("port {}: {error}", l.port),
                        generation,
                        now,
                    )),
                    (None, None) => conditions.push(condition(
                        "Accepted",
                        true,
                        "Accepted",
                        "listener accepted",
                        generation,
                        now,
                    )),
                }
                conditions.push(match &l.unresolved {
                    Some((reason, message)) => condition(
                        "ResolvedRefs",
                        false,
                        reason,
                        message.clone(),
                        generation,
                        now,
                    ),
                    None => condition(
                        "ResolvedRefs",
                        true,
                        "ResolvedRefs",
                        "all references resolved",
                        generation,
                        now,
                    ),
                });
                conditions.push(match &l.conflicted {
                    Some((reason, message)) => {
                        condition("Conflicted", true, reason, message.clone(), generation, now)
                    }
                    None => condition(
                        "Conflicted",
                        false,
                        "NoConflicts",
                        "no conflicts",
                        generation,
                        now,
                    ),
                });
                let programmed = draft.accepted.is_ok() && l.serving() && bind_error.is_none();
                programmed_any |= programmed;
                invalid_any |=
                    l.not_accepted.is_some() || l.conflicted.is_some() || bind_error.is_some();
                conditions.push(if programmed {
                    condition(
                        "Programmed",
                        true,
                        "Programmed",
                        format!("serving on port {}", l.port),
                        generation,
                        now,
                    )
                } else {
                    condition(
                        "Programmed",
                        false,
                        "Invalid",
                        "listener is not served",
                        generation,
                        now,
                    )
                });
                listeners.push(GatewayStatusListeners {
                    attached_routes: l.attached_routes,
                    conditions,
                    name: l.name.clone(),
                    supported_kinds: Some(
                        l.supported_kinds
                            .iter()
                            .map(|k| GatewayStatusListenersSupportedKinds {
                                group: Some(GROUP.into()),
                                kind: k.clone(),
                            })
                            .collect(),
                    ),
                });
            }
            let all_invalid = !draft.listeners.is_empty()
                && draft.listeners.iter().all(|l| {
                    l.not_accepted.is_some()
                        || l.conflicted.is_some()
                        || bind_errors.contains_key(&l.port)
                });
            let accepted = match &draft.accepted {
                Err((reason, message)) => {
                    condition("Accepted", false, reason, message.clone(), generation, now)
                }
                Ok(_) if all_invalid => condition(
                    "Accepted",
                    false,
                    "ListenersNotValid",
                    "no listener is valid",
                    generation,
                    now,
                ),
                Ok(_) if invalid_any => condition(
                    "Accepted",
                    true,
                    "ListenersNotValid",
                    "some listeners are not valid",
                    generation,
                    now,
                ),
                Ok(reason) => condition(
                    "Accepted",
                    true,
                    reason,
                    "Gateway accepted",
                    generation,
                    now,
                ),
            };
            let programmed = if programmed_any {
                condition(
                    "Programmed",
                    true,
                    "Programmed",
                    format!("serving on {}", draft.address),
                    generation,
                    now,
                )
            } else if draft
                .listeners
                .iter()
                .any(|l| bind_errors.contains_key(&l.port))
            {
                condition(
                    "Programmed",
                    false,
                    "NoResources",
                    "no listener port could be opened",
                    generation,
                    now,
                )
            } else {
                condition(
                    "Programmed",
                    false,
                    "Invalid",
                    "no listener is served",
                    generation,
                    now,
                )
            };
            out.insert(
                key.clone(),
                GatewayStatus {
                    addresses: programmed_any.then(|| {
                        vec![GatewayStatusAddresses {
                            r#type: Some("IPAddress".into()),
                            value: draft.address.to_string(),
                        }]
                    }),
                    attached_listener_sets: None,
                    conditions: Some(vec![accepted, programmed]),
                    listeners: Some(listeners),
                },
            );
        }
        out
    }
}

fn created(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Timestamp {
    meta.creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

fn judge_listener(
    gateway: &str,
    namespace: &str,
    listener: &GatewayListeners,
    inputs: &Inputs<'_>,
) -> ListenerState {
    let protocol = match listener.protocol.as_str() {
        "HTTP" => Some(Protocol::Http),
        "HTTPS" => Some(Protocol::Https),
        _ => None,
    };
    let not_accepted = protocol.is_none().then(|| {
        (
            "UnsupportedProtocol",
            format!(
                "protocol {} is not supported (HTTP and HTTPS are)",
                listener.protocol
            ),
        )
    });
    let allowed = listener.allowed_routes.as_ref();
    let (supported_kinds, bad_kinds) = match allowed.and_then(|a| a.kinds.as_ref()) {
        None => (
            if protocol.is_some() {
                vec!["HTTPRoute".to_string()]
            } else {
                Vec::new()
            },
            Vec::new(),
        ),
        Some(kinds) => {
            let (good, bad): (Vec<_>, Vec<_>) = kinds.iter().partition(|k| {
                k.group.as_deref().unwrap_or(GROUP) == GROUP && k.kind == "HTTPRoute"
            });
            (
                good.into_iter().map(|k| k.kind.clone()).collect::<Vec<_>>(),
                bad.into_iter().map(|k| k.kind.clone()).collect::<Vec<_>>(),
            )
        }
    };
    let mut unresolved = (!bad_kinds.is_empty()).then(|| {
        (
            "InvalidRouteKinds",
            format!("route kinds {bad_kinds:?} are not supported (HTTPRoute is)"),
        )
    });
    let mut certificate = None;
    if protocol == Some(Protocol::Https) && unresolved.is_none() {
        match load_certificate(gateway, namespace, listener, inputs) {
            Ok(cert) => certificate = Some(cert),
            Err(problem) => unresolved = Some(problem),
        }
    }
    let namespaces = allowed.and_then(|a| a.namespaces.as_ref());
    ListenerState {
        gateway_namespace: namespace.to_string(),
        name: listener.name.clone(),
        port: u16::try_from(listener.port).unwrap_or(0),
        protocol,
        hostname: listener.hostname.clone(),
        supported_kinds,
        not_accepted,
        unresolved,
        conflicted: None,
        certificate,
        allowed_from: namespaces
            .and_then(|n| n.from.clone())
            .unwrap_or(GatewayListenersAllowedRoutesNamespacesFrom::Same),
        selector: namespaces.and_then(|n| n.selector.as_ref()).map(|s| LabelSelector {
            match_labels: s.match_labels.clone(),
            match_expressions: s.match_expressions.as_ref().map(|exprs| {
                exprs
                    .iter()
                    .map(|e| k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                        key: e.key.clone(),
                        operator: e.operator.clone(),
                        values: e.values.clone(),
                    })
                    .collect()
            }),
        }),
        attached_routes: 0,
    }
}

/// The certificate of an HTTPS listener, or why it has none.
fn load_certificate(
    gateway: &str,
    namespace: &str,
    listener: &GatewayListeners,
    inputs: &Inputs<'_>,
) -> Result<Arc<CertifiedKey>, Problem> {
    let tls = listener.tls.as_ref();
    if let Some(mode) = tls.and_then(|t| t.mode.as_ref())
        && *mode != gateway_api::gateways::GatewayListenersTlsMode::Terminate
    {
        return Err((
            "InvalidCertificateRef",
            "an HTTPS listener terminates TLS (mode Passthrough needs a TLS listener)".into(),
        ));
    }
    let refs = tls.and_then(|t| t.certificate_refs.as_ref());
    let Some(first) = refs.and_then(|r| r.first()) else {
        return Err(("InvalidCertificateRef", "no certificateRefs".into()));
    };
    let group = first.group.as_deref().unwrap_or("");
    let kind = first.kind.as_deref().unwrap_or("Secret");
    if !group.is_empty() || kind != "Secret" {
        return Err((
            "InvalidCertificateRef",
            format!(
                "certificateRef {group}/{kind} {}: only Secrets are supported",
                first.name
            ),
        ));
    }
    let secret_namespace = first.namespace.as_deref().unwrap_or(namespace);
    if secret_namespace != namespace
        && !granted(
            inputs.objects,
            namespace,
            "Gateway",
            secret_namespace,
            "",
            "Secret",
            &first.name,
        )
    {
        return Err((
            "RefNotPermitted",
            format!(
                "Secret {secret_namespace}/{} is in another namespace and no ReferenceGrant allows Gateway {gateway} to use it",
                first.name
            ),
        ));
    }
    let key = format!("{secret_namespace}/{}", first.name);
    let Some(secret) = inputs.secrets.get(&key) else {
        return Err(("InvalidCertificateRef", format!("Secret {key} not found")));
    };
    if secret.type_.as_deref() != Some("kubernetes.io/tls") {
        return Err((
            "InvalidCertificateRef",
            format!("Secret {key} is not of type kubernetes.io/tls"),
        ));
    }
    let data = secret.data.clone().unwrap_or_default();
    let (Some(cert), Some(private)) = (data.get("tls.crt"), data.get("tls.key")) else {
        return Err((
            "InvalidCertificateRef",
            format!("Secret {key} lacks tls.crt or tls.key"),
        ));
    };
    certified_key(&cert.0, &private.0)
        .map_err(|e| ("InvalidCertificateRef", format!("Secret {key}: {e}")))
}

/// A PEM certificate chain and private key, checked to belong together.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.crt is not PEM certificates: {e:?}"))?;
    if chain.is_empty() {
        return Err("tls.crt holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("tls.key is not a PEM private key: {e:?}"))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider)
        .map(Arc::new)
        .map_err(|e| format!("certificate and key do not fit: {e}"))
}

/// Listeners on one port conflict when their protocols differ, or when two share a
/// hostname. Every party to a conflict is marked; none wins.
fn mark_conflicts(drafts: &mut BTreeMap<String, GatewayDraft>) {
    let mut by_port: BTreeMap<u16, Vec<(String, usize)>> = BTreeMap::new();
    for (key, draft) in drafts.iter() {
        if draft.accepted.is_err() {
            continue;
        }
        for (i, l) in draft.listeners.iter().enumerate() {
            if l.not_accepted.is_none() {
                by_port.entry(l.port).or_default().push((key.clone(), i));
            }
        }
    }
    for (port, members) in by_port {
        let protocols: HashSet<_> = members
            .iter()
            .map(|(k, i)| drafts[k].listeners[*i].protocol)
            .collect();
        let mut marks: Vec<(String, usize, &'static str, String)> = Vec::new();
        if protocols.len() > 1 {
            for (k, i) in &members {
                marks.push((
                    k.clone(),
                    *i,
                    "ProtocolConflict",
                    format!("port {port} is used with different protocols"),
                ));
            }
        } else {
            let mut hosts: HashMap<Option<String>, Vec<(String, usize)>> = HashMap::new();
            for (k, i) in &members {
                hosts
                    .entry(drafts[k].listeners[*i].hostname.clone())
                    .or_default()
                    .push((k.clone(), *i));
            }
            for (host, group) in hosts.into_iter().filter(|(_, g)| g.len() > 1) {
                let names: Vec<String> = group
                    .iter()
                    .map(|(k, i)| format!("{k}/{}", drafts[k].listeners[*i].name))
                    .collect();
                for (k, i) in group {
                    marks.push((
                        k,
                        i,
                        "HostnameConflict",
                        format!(
                            "listeners {} share port {port} and hostname {}",
                            names.join(", "),
                            host.as_deref().unwrap_or("(any)")
                        ),
                    ));
                }
            }
        }
        for (k, i, reason, message) in marks {
            if let Some(l) = drafts.get_mut(&k).and_then(|d| d.listeners.get_mut(i)) {
                l.conflicted = Some((reason, message));
            }
        }
    }
}

/// Where a route attaches under one parentRef: listener indexes with the effective
/// hostnames (`None`: any host), or why it attaches nowhere.
fn attach_route(
    invalid: Option<&brink_proto::meta::FieldError>,
    parent: &HttpRouteParentRefs,
    route_namespace: &str,
    hostnames: &[String],
    draft: &mut GatewayDraft,
    gateway: &str,
    objects: &GatewayObjects,
) -> Result<Vec<Placement>, Problem> {
    if let Some(fault) = invalid {
        return Err((
            "UnsupportedValue",
            format!("{}: {}", fault.field, fault.message),
        ));
    }
    if draft.accepted.is_err() {
        return Err((
            "NoMatchingParent",
            format!("Gateway {gateway} is not accepted"),
        ));
    }
    let candidates: Vec<usize> = draft
        .listeners
        .iter()
        .enumerate()
        .filter(|(_, l)| parent.section_name.as_ref().is_none_or(|s| *s == l.name))
        .filter(|(_, l)| parent.port.is_none_or(|p| i32::from(l.port) == p))
        .map(|(i, _)| i)
        .collect();
    if candidates.is_empty() {
        return Err((
            "NoMatchingParent",
            format!(
                "Gateway {gateway} has no listener{}{}",
                parent
                    .section_name
                    .as_ref()
                    .map(|s| format!(" named {s}"))
                    .unwrap_or_default(),
                parent
                    .port
                    .map(|p| format!(" on port {p}"))
                    .unwrap_or_default()
            ),
        ));
    }
    let accepting: Vec<usize> = candidates
        .iter()
        .copied()
        .filter(|i| draft.listeners[*i].accepting())
        .collect();
    if accepting.is_empty() {
        return Err((
            "NoMatchingParent",
            "the listeners it names are invalid or conflicted".into(),
        ));
    }
    let allowed: Vec<usize> = accepting
        .into_iter()
        .filter(|i| {
            let l = &draft.listeners[*i];
            l.supported_kinds.iter().any(|k| k == "HTTPRoute")
                && namespace_allowed(l, route_namespace, objects)
        })
        .collect();
    if allowed.is_empty() {
        return Err((
            "NotAllowedByListeners",
            format!(
                "no listener of Gateway {gateway} allows HTTPRoutes from namespace {route_namespace}"
            ),
        ));
    }
    let mut places = Vec::new();
    for i in allowed {
        let l = &mut draft.listeners[i];
        if let Some(hosts) = intersect_hostnames(l.hostname.as_deref(), hostnames) {
            l.attached_routes += 1;
            places.push((i, hosts));
        }
    }
    if places.is_empty() {
        return Err((
            "NoMatchingListenerHostname",
            "no hostname of the route matches a listener's hostname".into(),
        ));
    }
    Ok(places)
}

fn namespace_allowed(l: &ListenerState, route_namespace: &str, objects: &GatewayObjects) -> bool {
    match l.allowed_from {
        GatewayListenersAllowedRoutesNamespacesFrom::All => true,
        GatewayListenersAllowedRoutesNamespacesFrom::Same => route_namespace == l.gateway_namespace,
        GatewayListenersAllowedRoutesNamespacesFrom::Selector => {
            let default_labels = BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                route_namespace.to_string(),
            )]);
            let labels = objects
                .namespaces
                .get(route_namespace)
                .and_then(|n| n.metadata.labels.as_ref())
                .unwrap_or(&default_labels);
            l.selector
                .as_ref()
                .is_some_and(|s| selector_matches(s, labels))
        }
    }
}

/// A label selector against labels, as Kubernetes evaluates it (an empty selector
/// matches everything; an unknown operator matches nothing).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// The hostnames a route serves on a listener: `Some(vec![None])` for any host, `None`
/// when they do not intersect.
pub fn intersect_hostnames(
    listener: Option<&str>,
    route: &[String],
) -> Option<Vec<Option<String>>> {
    let Some(listener) = listener else {
        if route.is_empty() {
            return Some(vec![None]);
        }
        return Some(route.iter().cloned().map(Some).collect());
    };
    if route.is_empty() {
        return Some(vec![Some(listener.to_string())]);
    }
    let mut out: Vec<Option<String>> = Vec::new();
    for host in route {
        let effective = match (listener.strip_prefix('*'), host.strip_prefix('*')) {
            _ if host == listener => Some(host.clone()),
            (Some(l_suffix), None) => wildcard_matches(l_suffix, host).then(|| host.clone()),
            (None, Some(h_suffix)) => {
                wildcard_matches(h_suffix, listener).then(|| listener.to_string())
            }
            (Some(l_suffix), Some(h_suffix)) => {
                if l_suffix.ends_with(h_suffix) {
                    Some(listener.to_string())
                } else if h_suffix.ends_with(l_suffix) {
                    Some(host.clone())
                } else {
                    None
                }
            }
            (None, None) => None,
        };
        if let Some(e) = effective
            && !out.contains(&Some(e.clone()))
        {
            out.push(Some(e));
        }
    }
    (!out.is_empty()).then_some(out)
}

fn parent_identity(p: &HttpRouteParentRefs) -> String {
    format!(
        "{:?}/{:?}/{}/{:?}/{:?}/{:?}",
        p.group, p.kind, p.name, p.namespace, p.section_name, p.port
    )
}

/// A parentRef as route status reports it, with the group and kind the CRD defaults
/// (a route read from a file has neither).
fn status_parent_ref(p: &HttpRouteParentRefs) -> HttpRouteStatusParentsParentRef {
    HttpRouteStatusParentsParentRef {
        group: Some(
            p.group
                .clone()
                .unwrap_or_else(|| "gateway.networking.k8s.io".into()),
        ),
        kind: Some(p.kind.clone().unwrap_or_else(|| "Gateway".into())),
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        port: p.port,
        section_name: p.section_name.clone(),
    }
}

/// Whether a ReferenceGrant in `to_namespace` lets `from_kind` objects of `from_namespace`
/// refer to the `to_group`/`to_kind` object `to_name`.
fn granted(
    objects: &GatewayObjects,
    from_namespace: &str,
    from_kind: &str,
    to_namespace: &str,
    to_group: &str,
    to_kind: &str,
    to_name: &str,
) -> bool {
    objects.grants.values().any(|grant| {
        grant.metadata.namespace.as_deref() == Some(to_namespace)
            && grant
                .spec
                .from
                .iter()
                .any(|f| f.group == GROUP && f.kind == from_kind && f.namespace == from_namespace)
            && grant.spec.to.iter().any(|t| {
                t.group == to_group
                    && t.kind == to_kind
                    && t.name.as_deref().is_none_or(|n| n == to_name)
            })
    })
}

/// A rule compiled for the table.
struct CompiledRule {
    target: Arc<RuleTarget>,
    matches: Vec<Arc<RouteMatch>>,
    /// ResolvedRefs=False: (reason, message), the first found.
    problem: Option<Problem>,
}

fn compile_rules(
    key: &str,
    namespace: &str,
    route: &HttpRoute,
    inputs: &Inputs<'_>,
) -> Vec<CompiledRule> {
    route
        .spec
        .rules
        .iter()
        .flatten()
        .enumerate()
        .map(|(index, rule)| compile_rule(key, namespace, index, rule, inputs))
        .collect()
}

fn compile_rule(
    key: &str,
    namespace: &str,
    index: usize,
    rule: &HttpRouteRules,
    inputs: &Inputs<'_>,
) -> CompiledRule {
    let mut problem: Option<Problem> = None;
    let mut fault: Option<String> = None;
    let note = |p: (&'static str, String), problem: &mut Option<Problem>| {
        if problem.is_none() {
            *problem = Some(p);
        }
    };
    let matches = match rule.matches.as_deref() {
        None | Some([]) => vec![Arc::new(RouteMatch {
            path: PathMatch::Prefix(String::new()),
            method: None,
            headers: Vec::new(),
            query: Vec::new(),
        })],
        Some(matches) => matches
            .iter()
            .filter_map(|m| {
                let path_type = m
                    .path
                    .as_ref()
                    .and_then(|p| p.r#type.clone())
                    .unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix);
                let value = m
                    .path
                    .as_ref()
                    .and_then(|p| p.value.clone())
                    .unwrap_or("/".into());
                let path = match path_type {
                    HttpRouteRulesMatchesPathType::Exact => PathMatch::Exact(value),
                    HttpRouteRulesMatchesPathType::PathPrefix => {
                        PathMatch::Prefix(value.trim_end_matches('/').to_string())
                    }
                    HttpRouteRulesMatchesPathType::RegularExpression => {
                        PathMatch::Regex(compile_regex(&value).ok()?)
                    }
                };
                let method = m
                    .method
                    .as_ref()
                    .and_then(|method| Method::from_bytes(wire_name(method)?.as_bytes()).ok());
                let headers = m
                    .headers
                    .iter()
                    .flatten()
                    .filter_map(|h| {
                        let name =
                            HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes()).ok()?;
                        let value = match h.r#type {
                            Some(HttpRouteRulesMatchesHeadersType::RegularExpression) => {
                                ValueMatch::Regex(compile_regex(&h.value).ok()?)
                            }
                            _ => ValueMatch::Exact(h.value.clone()),
                        };
                        Some((name, value))
                    })
                    .collect();
                let query = m
                    .query_params
                    .iter()
                    .flatten()
                    .filter_map(|q| {
                        let value = match q.r#type {
                            Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression) => {
                                ValueMatch::Regex(compile_regex(&q.value).ok()?)
                            }
                            _ => ValueMatch::Exact(q.value.clone()),
                        };
                        Some((q.name.clone(), value))
                    })
                    .collect();
                Some(Arc::new(RouteMatch {
                    path,
                    method,
                    headers,
                    query,
                }))
            })
            .collect(),
    };
    let mut filters = Vec::new();
    for f in rule.filters.iter().flatten() {
        match convert_filter(f, namespace, inputs) {
            Ok(filter) => filters.push(filter),
            Err(FilterFault { reason, message }) => {
                note((reason, message.clone()), &mut problem);
                fault.get_or_insert(message);
            }
        }
    }
    let mut backends = Vec::new();
    for b in rule.backend_refs.iter().flatten() {
        let (target, issue) = resolve_backend(
            b.group.as_deref(),
            b.kind.as_deref(),
            &b.name,
            b.namespace.as_deref(),
            b.port,
            namespace,
            inputs,
        );
        if let Some(issue) = issue {
            note(issue, &mut problem);
        }
        let mut backend_filters = Vec::new();
        for f in b.filters.iter().flatten() {
            let converted = brink_proto::gateway::backend_filter_as_rule(f)
                .map_err(|message| FilterFault {
                    reason: "UnsupportedValue",
                    message,
                })
                .and_then(|f| convert_filter(&f, namespace, inputs));
            match converted {
                Ok(filter) => backend_filters.push(filter),
                Err(FilterFault { reason, message }) => {
                    note((reason, message.clone()), &mut problem);
                    fault.get_or_insert(message);
                }
            }
        }
        backends.push(WeightedBackend {
            weight: b.weight.unwrap_or(1).max(0) as u32,
            target,
            filters: backend_filters,
        });
    }
    let timeout = |t: Option<&String>| {
        t.and_then(|t| parse_duration(t).ok())
            .filter(|d| !d.is_zero())
    };
    let timeouts = rule.timeouts.as_ref();
    let total_weight = backends.iter().map(|b| u64::from(b.weight)).sum();
    CompiledRule {
        target: Arc::new(RuleTarget {
            route: key.to_string(),
            rule: index,
            filters,
            backends,
            total_weight,
            request_timeout: timeout(timeouts.and_then(|t| t.request.as_ref())),
            backend_timeout: timeout(timeouts.and_then(|t| t.backend_request.as_ref())),
            fault,
        }),
        matches,
        problem,
    }
}

struct FilterFault {
    reason: &'static str,
    message: String,
}

fn header_pairs(
    pairs: impl Iterator<Item = (String, String)>,
) -> Result<Vec<(HeaderName, HeaderValue)>, FilterFault> {
    pairs
        .map(|(name, value)| {
            let n = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes());
            let v = HeaderValue::from_str(&value);
            match (n, v) {
                (Ok(n), Ok(v)) => Ok((n, v)),
                _ => Err(FilterFault {
                    reason: "UnsupportedValue",
                    message: format!("header {name:?}: {value:?} is not a valid header"),
                }),
            }
        })
        .collect()
}

fn path_modifier(full: Option<&String>, prefix: Option<&String>) -> Option<PathModifier> {
    full.cloned()
        .map(PathModifier::Full)
        .or_else(|| prefix.cloned().map(PathModifier::Prefix))
}

fn convert_filter(
    f: &HttpRouteRulesFilters,
    namespace: &str,
    inputs: &Inputs<'_>,
) -> Result<Filter, FilterFault> {
    match f.r#type {
        HttpRouteRulesFiltersType::RequestHeaderModifier
        | HttpRouteRulesFiltersType::ResponseHeaderModifier => {
            let (set, add, remove) = match (&f.request_header_modifier, &f.response_header_modifier)
            {
                (Some(m), _) => (
                    m.set
                        .iter()
                        .flatten()
                        .map(|h| (h.name.clone(), h.value.clone()))
                        .collect::<Vec<_>>(),
                    m.add
                        .iter()
                        .flatten()
                        .map(|h| (h.name.clone(), h.value.clone()))
                        .collect::<Vec<_>>(),
                    m.remove.clone().unwrap_or_default(),
                ),
                (None, Some(m)) => (
                    m.set
                        .iter()
                        .flatten()
                        .map(|h| (h.name.clone(), h.value.clone()))
                        .collect(),
                    m.add
                        .iter()
                        .flatten()
                        .map(|h| (h.name.clone(), h.value.clone()))
                        .collect(),
                    m.remove.clone().unwrap_or_default(),
                ),
                (None, None) => (Vec::new(), Vec::new(), Vec::new()),
            };
            let modifier = HeaderModifier {
                set: header_pairs(set.into_iter())?,
                add: header_pairs(add.into_iter())?,
                remove: remove
                    .iter()
                    .filter_map(|n| HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()).ok())
                    .collect(),
            };
            Ok(
                if f.r#type == HttpRouteRulesFiltersType::RequestHeaderModifier {
                    Filter::RequestHeaders(modifier)
                } else {
                    Filter::ResponseHeaders(modifier)
                },
            )
        }
        HttpRouteRulesFiltersType::RequestRedirect => {
            let r = f.request_redirect.clone().unwrap_or_default();
            let path = r.path.as_ref().and_then(|p| {
                path_modifier(
                    p.replace_full_path.as_ref(),
                    p.replace_prefix_match.as_ref(),
                )
            });
            Ok(Filter::Redirect(Redirect {
                scheme: r.scheme.as_ref().and_then(wire_name),
                hostname: r.hostname.clone(),
                path,
                port: r.port.and_then(|p| u16::try_from(p).ok()),
                status: r
                    .status_code
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(302),
            }))
        }
        HttpRouteRulesFiltersType::UrlRewrite => {
            let r = f.url_rewrite.clone().unwrap_or_default();
            let path = r.path.as_ref().and_then(|p| {
                path_modifier(
                    p.replace_full_path.as_ref(),
                    p.replace_prefix_match.as_ref(),
                )
            });
            Ok(Filter::Rewrite(Rewrite {
                hostname: r.hostname.clone(),
                path,
            }))
        }
        HttpRouteRulesFiltersType::RequestMirror => {
            let Some(m) = &f.request_mirror else {
                return Err(FilterFault {
                    reason: "UnsupportedValue",
                    message: "RequestMirror without requestMirror".into(),
                });
            };
            let b = &m.backend_ref;
            let (backend, issue) = resolve_backend(
                b.group.as_deref(),
                b.kind.as_deref(),
                &b.name,
                b.namespace.as_deref(),
                b.port,
                namespace,
                inputs,
            );
            if let Some((reason, message)) = issue {
                return Err(FilterFault { reason, message });
            }
            let share_ppm = match (m.percent, &m.fraction) {
                (Some(p), _) => p.clamp(0, 100) as u32 * 10_000,
                (None, Some(f)) => {
                    let d = i64::from(f.denominator.unwrap_or(100).max(1));
                    (i64::from(f.numerator.max(0)) * 1_000_000 / d).min(1_000_000) as u32
                }
                (None, None) => 1_000_000,
            };
            Ok(Filter::Mirror(Mirror { backend, share_ppm }))
        }
        HttpRouteRulesFiltersType::Cors => {
            let c = f.cors.clone().unwrap_or_default();
            Ok(Filter::Cors(Cors {
                allow_origins: c.allow_origins.unwrap_or_default(),
                allow_methods: c.allow_methods.unwrap_or_default(),
                allow_headers: c.allow_headers.unwrap_or_default(),
                expose_headers: c.expose_headers.unwrap_or_default(),
                allow_credentials: c.allow_credentials.unwrap_or(false),
                max_age: c.max_age,
            }))
        }
        HttpRouteRulesFiltersType::ExtensionRef => {
            let e = f.extension_ref.clone().unwrap_or_default();
            Err(FilterFault {
                reason: "InvalidKind",
                message: format!(
                    "ExtensionRef {}/{} {}: Brink has no extension filters; requests get 500",
                    e.group, e.kind, e.name
                ),
            })
        }
    }
}

/// A backendRef (or a mirror's), resolved as far as objects go: endpoints are looked up
/// per request.
fn resolve_backend(
    group: Option<&str>,
    kind: Option<&str>,
    name: &str,
    namespace: Option<&str>,
    port: Option<i32>,
    route_namespace: &str,
    inputs: &Inputs<'_>,
) -> (BackendTarget, Option<Problem>) {
    let group = group.unwrap_or("");
    let kind = kind.unwrap_or("Service");
    let namespace = namespace.unwrap_or(route_namespace);
    let fail = |reason: &'static str, message: String| {
        (
            BackendTarget::Invalid(message.clone()),
            Some((reason, message)),
        )
    };
    if !group.is_empty() || kind != "Service" {
        return fail(
            "InvalidKind",
            format!("backend {group}/{kind} {name}: only Services are supported"),
        );
    }
    if namespace != route_namespace
        && !granted(
            inputs.objects,
            route_namespace,
            "HTTPRoute",
            namespace,
            "",
            "Service",
            name,
        )
    {
        return fail(
            "RefNotPermitted",
            format!(
                "Service {namespace}/{name} is in another namespace and no ReferenceGrant allows it"
            ),
        );
    }
    let key = format!("{namespace}/{name}");
    let Some(service) = inputs.objects.services.get(&key) else {
        return fail("BackendNotFound", format!("Service {key} not found"));
    };
    let Some(port) = port.and_then(|p| u16::try_from(p).ok()) else {
        return fail("BackendNotFound", format!("Service {key}: no port given"));
    };
    let has_port = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .is_some_and(|ports| ports.iter().any(|p| p.port == i32::from(port)));
    if !has_port {
        return fail(
            "BackendNotFound",
            format!("Service {key} has no port {port}"),
        );
    }
    (BackendTarget::Service { key, port }, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_intersection_follows_the_spec() {
        let r = |hosts: &[&str]| hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>();
        let some = |hosts: &[&str]| {
            Some(
                hosts
                    .iter()
                    .map(|h| Some(h.to_string()))
                    .collect::<Vec<_>>(),
            )
        };
        assert_eq!(intersect_hostnames(None, &[]), Some(vec![None]));
        assert_eq!(intersect_hostnames(Some("a.com"), &[]), some(&["a.com"]));
        assert_eq!(
            intersect_hostnames(
                Some("*.example.com"),
                &r(&[
                    "test.example.com",
                    "test.example.net",
                    "*.example.com",
                    "example.com"
                ])
            ),
            some(&["test.example.com", "*.example.com"])
        );
        assert_eq!(
            intersect_hostnames(Some("test.example.com"), &r(&["*.example.com"])),
            some(&["test.example.com"])
        );
        assert_eq!(
            intersect_hostnames(Some("*.example.com"), &r(&["*.foo.example.com"])),
            some(&["*.foo.example.com"])
        );
        assert_eq!(
            intersect_hostnames(Some("*.foo.example.com"), &r(&["*.example.com"])),
            some(&["*.foo.example.com"])
        );
        assert_eq!(intersect_hostnames(Some("a.com"), &r(&["b.com"])), None);
    }

    #[test]
    fn selectors_evaluate_like_kubernetes() {
        let labels = BTreeMap::from([("env".to_string(), "prod".to_string())]);
        let sel = |json: serde_json::Value| serde_json::from_value::<LabelSelector>(json).unwrap();
        assert!(selector_matches(&sel(serde_json::json!({})), &labels));
        assert!(selector_matches(
            &sel(serde_json::json!({"matchLabels": {"env": "prod"}})),
            &labels
        ));
        assert!(!selector_matches(
            &sel(serde_json::json!({"matchLabels": {"env": "dev"}})),
            &labels
        ));
        assert!(selector_matches(
            &sel(
                serde_json::json!({"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "x"]}]})
            ),
            &labels
        ));
        assert!(selector_matches(
            &sel(
                serde_json::json!({"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]})
            ),
            &labels
        ));
        assert!(!selector_matches(
            &sel(serde_json::json!({"matchExpressions": [{"key": "env", "operator": "Bogus"}]})),
            &labels
        ));
    }

    #[test]
    fn transition_times_stay_while_status_stays() {
        let t0 = Timestamp::from_second(100).unwrap();
        let t1 = Timestamp::from_second(200).unwrap();
        let old = vec![condition("Accepted", true, "Accepted", "", Some(1), t0)];
        let mut same = vec![condition("Accepted", true, "Accepted", "", Some(2), t1)];
        carry_transition_times(&old, &mut same);
        assert_eq!(same[0].last_transition_time.0, t0);
        let mut flipped = vec![condition(
            "Accepted",
            false,
            "NotAllowedByListeners",
            "",
            Some(2),
            t1,
        )];
        carry_transition_times(&old, &mut flipped);
        assert_eq!(flipped[0].last_transition_time.0, t1);
    }
}
