//! Who is asking, and may they: authentication (client certificates under the site CA,
//! bearer tokens from a static token file, bootstrap tokens from `kube-system` Secrets) and authorization (RBAC evaluated as
//! Kubernetes evaluates it, over the Roles, ClusterRoles and bindings in the watch cache,
//! with `system:masters` allowed everything as in Kubernetes).
//!
//! Owns identities and decisions; it reads RBAC objects from the cache and never writes.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::cache::Cache;

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
}

/// The group Kubernetes gives every authenticated user.
pub const AUTHENTICATED: &str = "system:authenticated";
/// The group whose members may do anything, bypassing RBAC.
pub const MASTERS: &str = "system:masters";

impl User {
    fn with_authenticated(mut self) -> Self {
        if !self.groups.iter().any(|g| g == AUTHENTICATED) {
            self.groups.push(AUTHENTICATED.to_owned());
        }
        self
    }

    /// The user a verified client certificate names: CN is the user, each O a group.
    pub fn from_certificate(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let subject = cert.subject();
        let name = subject.iter_common_name().next()?.as_str().ok()?.to_owned();
        let groups = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok().map(str::to_owned))
            .collect();
        Some(
            Self {
                name,
                uid: String::new(),
                groups,
            }
            .with_authenticated(),
        )
    }
}

/// Why a token file could not be read.
#[derive(Debug, thiserror::Error)]
#[error("token file {path}: {message}")]
pub struct TokenFileError {
    pub path: String,
    pub message: String,
}

/// Static bearer tokens, in kube-apiserver's `--token-auth-file` format: one
/// `token,user,uid[,"group1,group2"]` per line.
#[derive(Debug, Default, Clone)]
pub struct Tokens(HashMap<String, User>);

impl Tokens {
    pub fn read(path: &Path) -> Result<Self, TokenFileError> {
        let err = |message: String| TokenFileError {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::parse(&text).map_err(err)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut tokens = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (head, groups) = match line.split_once(",\"") {
                Some((head, rest)) => (
                    head,
                    rest.strip_suffix('"')
                        .ok_or_else(|| format!("line {}: unterminated group list", i + 1))?
                        .split(',')
                        .map(|g| g.trim().to_owned())
                        .filter(|g| !g.is_empty())
                        .collect(),
                ),
                None => (line, Vec::new()),
            };
            let fields: Vec<&str> = head.split(',').map(str::trim).collect();
            let (token, name, uid, groups) = match fields.as_slice() {
                [token, name, uid] => (*token, *name, *uid, groups),
                [token, name, uid, group] if groups.is_empty() => {
                    (*token, *name, *uid, vec![(*group).to_owned()])
                }
                _ => {
                    return Err(format!(
                        "line {}: expected token,user,uid[,\"groups\"]",
                        i + 1
                    ));
                }
            };
            if token.len() < 8 || name.is_empty() {
                return Err(format!(
                    "line {}: a token has at least 8 characters and a user",
                    i + 1
                ));
            }
            tokens.insert(
                token.to_owned(),
                User {
                    name: name.to_owned(),
                    uid: uid.to_owned(),
                    groups,
                }
                .with_authenticated(),
            );
        }
        Ok(Self(tokens))
    }

    pub fn find(&self, token: &str) -> Option<&User> {
        self.0.get(token)
    }
}

/// The group every bootstrap token's user is in.
pub const BOOTSTRAPPERS: &str = "system:bootstrappers";

/// The user a Kubernetes bootstrap token (`abcdef.0123456789abcdef`) names, from its
/// Secret `kube-system/bootstrap-token-<id>` as kube-apiserver's bootstrap authenticator
/// reads it: type `bootstrap.kubernetes.io/token`, `usage-bootstrap-authentication:
/// "true"`, the secret matching, not expired and not being deleted. The user is
/// `system:bootstrap:<id>` in `system:bootstrappers` and the Secret's
/// `auth-extra-groups` (each under `system:bootstrappers:`).
pub fn bootstrap_user(cache: &Cache, token: &str, now: jiff::Timestamp) -> Option<User> {
    let token = brink_proto::bootstrap::BootstrapToken::parse(token).ok()?;
    let secrets = super::kinds::find("", "v1", "secrets")?;
    let object = cache.get(&secrets.key(Some("kube-system"), &token.secret_name()))?;
    let stored = StoredToken::read(&object, now)?;
    if stored.token.id != token.id
        || !same_secret(stored.token.secret.as_bytes(), token.secret.as_bytes())
        || !stored.authentication
    {
        return None;
    }
    let mut groups = vec![BOOTSTRAPPERS.to_owned()];
    for extra in stored.extra_groups.split(',') {
        let extra = extra.trim();
        if extra.is_empty() {
            continue;
        }
        // A group outside the bootstrappers' namespace invalidates the token.
        extra.strip_prefix("system:bootstrappers:")?;
        groups.push(extra.to_owned());
    }
    Some(
        User {
            name: format!("system:bootstrap:{}", token.id),
            uid: String::new(),
            groups,
        }
        .with_authenticated(),
    )
}

/// A bootstrap token's Secret, read as Kubernetes reads it: only a Secret of type
/// `bootstrap.kubernetes.io/token`, not being deleted and not expired, is a token.
pub struct StoredToken {
    pub token: brink_proto::bootstrap::BootstrapToken,
    /// `usage-bootstrap-authentication: "true"`.
    pub authentication: bool,
    /// `usage-bootstrap-signing: "true"`: cluster-info carries its signature.
    pub signing: bool,
    pub extra_groups: String,
}

impl StoredToken {
    pub fn read(object: &Value, now: jiff::Timestamp) -> Option<Self> {
        if object.get("type").and_then(Value::as_str) != Some("bootstrap.kubernetes.io/token")
            || object.pointer("/metadata/deletionTimestamp").is_some()
        {
            return None;
        }
        let field = |name: &str| -> Option<String> {
            use base64::Engine as _;
            let encoded = object.pointer(&format!("/data/{name}"))?.as_str()?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()?;
            String::from_utf8(bytes).ok()
        };
        if let Some(expiration) = field("expiration") {
            // An expiration that does not parse is treated as expired, as Kubernetes does.
            let at: jiff::Timestamp = expiration.parse().ok()?;
            if at <= now {
                return None;
            }
        }
        let token = brink_proto::bootstrap::BootstrapToken::parse(&format!(
            "{}.{}",
            field("token-id")?,
            field("token-secret")?
        ))
        .ok()?;
        // The Secret's name must carry the ID, or any Secret could claim any token.
        if object.pointer("/metadata/name").and_then(Value::as_str) != Some(&token.secret_name()) {
            return None;
        }
        Some(Self {
            token,
            authentication: field("usage-bootstrap-authentication").as_deref() == Some("true"),
            signing: field("usage-bootstrap-signing").as_deref() == Some("true"),
            extra_groups: field("auth-extra-groups").unwrap_or_default(),
        })
    }
}

/// Compares secrets in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The group every node's credential carries.
pub const NODES: &str = "system:nodes";

/// The node a user is, when it is one (`system:node:<name>` in `system:nodes`).
pub fn node_name(user: &User) -> Option<&str> {
    user.groups
        .iter()
        .any(|g| g == NODES)
        .then(|| user.name.strip_prefix("system:node:"))
        .flatten()
        .filter(|n| !n.is_empty())
}

/// The Node authorizer (before RBAC, as in Kubernetes): a node reads Nodes, writes only
/// its own Node, its status and its Lease, asks for certificates and writes Events; it
/// reads the pods bound to it (listing and watching them only through
/// `fieldSelector=spec.nodeName=<node>`), writes their status and deletes them, and
/// reads the ConfigMaps and Secrets those pods use, one by name (a list or watch names
/// it with `fieldSelector=metadata.name=<name>`, as kube-apiserver reads it). What it does
/// not allow, RBAC may (nothing, by default). Creates carry no name here;
/// [`node_may_create`] checks the body's.
fn node_allows(cache: &Cache, user: &User, attrs: &Attributes<'_>) -> bool {
    let Some(node) = node_name(user) else {
        return false;
    };
    let Some(r) = &attrs.resource else {
        return false;
    };
    let own = r.name.is_none_or(|n| n == node);
    let read = matches!(attrs.verb, "get" | "list" | "watch");
    let write = matches!(attrs.verb, "create" | "update" | "patch");
    let namespace = r.namespace.unwrap_or("");
    // The one object a request is about: its name, or the name its field selector pins.
    let one = r
        .name
        .or_else(|| selected(r.field_selector, "metadata.name"));
    let pod = |name: &str| cache.get(&format!("/registry/core/pods/{namespace}/{name}"));
    let bound = || one.and_then(pod).is_some_and(|p| pod_bound_to(&p, node));
    match (r.group, r.resource, r.subresource) {
        ("", "nodes", None) => read || (write && own),
        ("", "nodes", Some("status")) => (read || write) && own,
        ("", "pods", None) => match attrs.verb {
            "get" | "delete" => bound(),
            "list" | "watch" => selected(r.field_selector, "spec.nodeName") == Some(node),
            _ => false,
        },
        ("", "pods", Some("status")) => matches!(attrs.verb, "get" | "update" | "patch") && bound(),
        ("", resource @ ("configmaps" | "secrets"), None) => {
            read && one.is_some_and(|name| {
                let (pods, _) = cache.list(&format!("/registry/core/pods/{namespace}/"));
                pods.iter()
                    .filter(|p| pod_bound_to(p, node))
                    .any(|p| pod_references(p, resource, name))
            })
        }
        ("coordination.k8s.io", "leases", None) => {
            r.namespace == Some("kube-node-lease") && (matches!(attrs.verb, "get") || write) && own
        }
        ("certificates.k8s.io", "certificatesigningrequests", None) => {
            read || attrs.verb == "create"
        }
        ("", "events", None) | ("events.k8s.io", "events", None) => {
            matches!(attrs.verb, "create" | "update" | "patch")
        }
        _ => false,
    }
}

/// The value a field selector requires of `field` (`field=value` or `field==value`).
fn selected<'a>(selector: Option<&'a str>, field: &str) -> Option<&'a str> {
    selector?.split(',').find_map(|term| {
        let (key, value) = term.split_once('=')?;
        (key.trim() == field).then(|| value.trim_start_matches('=').trim())
    })
}

fn pod_bound_to(pod: &Value, node: &str) -> bool {
    pod.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node)
}

/// Whether a pod uses the ConfigMap or Secret `name`: its volumes (projected sources
/// too), its containers' env and envFrom, its image pull secrets.
fn pod_references(pod: &Value, resource: &str, name: &str) -> bool {
    let named = |v: Option<&Value>, field: &str| {
        v.and_then(|v| v.get(field)).and_then(Value::as_str) == Some(name)
    };
    let list = |v: Option<&Value>| v.and_then(Value::as_array).cloned().unwrap_or_default();
    let spec = pod.get("spec");
    let (volume_key, volume_name, env_key, pull_secrets) = match resource {
        "configmaps" => ("configMap", "name", "configMapKeyRef", false),
        _ => ("secret", "secretName", "secretKeyRef", true),
    };
    let env_from_key = if pull_secrets {
        "secretRef"
    } else {
        "configMapRef"
    };
    let volumes = list(spec.and_then(|s| s.get("volumes")));
    let in_volumes = volumes.iter().any(|v| {
        named(v.get(volume_key), volume_name)
            || list(v.pointer("/projected/sources"))
                .iter()
                .any(|source| named(source.get(volume_key), "name"))
    });
    let containers = ["containers", "initContainers", "ephemeralContainers"]
        .iter()
        .flat_map(|k| list(spec.and_then(|s| s.get(*k))))
        .collect::<Vec<_>>();
    let in_env = containers.iter().any(|c| {
        list(c.get("env"))
            .iter()
            .any(|e| named(e.pointer("/valueFrom").and_then(|f| f.get(env_key)), "name"))
            || list(c.get("envFrom"))
                .iter()
                .any(|e| named(e.get(env_from_key), "name"))
    });
    let in_pull_secrets = pull_secrets
        && list(spec.and_then(|s| s.get("imagePullSecrets")))
            .iter()
            .any(|s| named(Some(s), "name"));
    in_volumes || in_env || in_pull_secrets
}

/// NodeRestriction for creates: a node creates only its own Node and Lease.
pub fn node_may_create(user: &User, kind_resource: &str, name: &str) -> Result<(), String> {
    match node_name(user) {
        Some(node) if matches!(kind_resource, "nodes" | "leases") && name != node => Err(format!(
            "node {node:?} is not allowed to modify {} {name:?}",
            kind_resource.trim_end_matches('s')
        )),
        _ => Ok(()),
    }
}

/// What a request asks to do, as RBAC sees it.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    pub verb: &'a str,
    /// Resource requests: group, resource, subresource, name, namespace.
    pub resource: Option<ResourceAttributes<'a>>,
    /// Non-resource requests: the path.
    pub path: &'a str,
}

#[derive(Debug, Clone)]
pub struct ResourceAttributes<'a> {
    pub group: &'a str,
    pub resource: &'a str,
    pub subresource: Option<&'a str>,
    pub name: Option<&'a str>,
    pub namespace: Option<&'a str>,
    /// A list's or watch's `fieldSelector`, where the Node authorizer reads which node's
    /// pods, or which one object, it asks for.
    pub field_selector: Option<&'a str>,
}

fn strings(value: Option<&Value>) -> Vec<&str> {
    value
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn rule_allows(rule: &Value, attrs: &Attributes<'_>) -> bool {
    let verbs = strings(rule.get("verbs"));
    if !verbs.iter().any(|v| *v == "*" || *v == attrs.verb) {
        return false;
    }
    match &attrs.resource {
        Some(r) => {
            let groups = strings(rule.get("apiGroups"));
            if !groups.iter().any(|g| *g == "*" || *g == r.group) {
                return false;
            }
            let wanted = match r.subresource {
                Some(sub) => format!("{}/{sub}", r.resource),
                None => r.resource.to_owned(),
            };
            let resources = strings(rule.get("resources"));
            let resource_ok = resources.iter().any(|x| {
                *x == "*"
                    || *x == wanted
                    || r.subresource
                        .is_some_and(|sub| x.strip_prefix("*/") == Some(sub))
            });
            if !resource_ok {
                return false;
            }
            let names = strings(rule.get("resourceNames"));
            names.is_empty() || r.name.is_some_and(|n| names.contains(&n))
        }
        None => strings(rule.get("nonResourceURLs")).iter().any(|u| {
            *u == "*"
                || *u == attrs.path
                || u.strip_suffix('*')
                    .is_some_and(|prefix| attrs.path.starts_with(prefix))
        }),
    }
}

fn subject_matches(subject: &Value, user: &User) -> bool {
    let name = subject.get("name").and_then(Value::as_str).unwrap_or("");
    match subject.get("kind").and_then(Value::as_str) {
        Some("User") => name == user.name,
        Some("Group") => user.groups.iter().any(|g| g == name),
        Some("ServiceAccount") => {
            let namespace = subject
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("");
            user.name == format!("system:serviceaccount:{namespace}:{name}")
        }
        _ => false,
    }
}

const RBAC: &str = "/registry/rbac.authorization.k8s.io/";

fn role_rules(cache: &Cache, role_ref: &Value, namespace: Option<&str>) -> Vec<Value> {
    let name = role_ref.get("name").and_then(Value::as_str).unwrap_or("");
    let key = match (role_ref.get("kind").and_then(Value::as_str), namespace) {
        (Some("ClusterRole"), _) => format!("{RBAC}clusterroles/{name}"),
        (Some("Role"), Some(ns)) => format!("{RBAC}roles/{ns}/{name}"),
        _ => return Vec::new(),
    };
    cache
        .get(&key)
        .and_then(|role| role.get("rules").and_then(Value::as_array).cloned())
        .unwrap_or_default()
}

/// Allows or refuses; the refusal says why in Kubernetes' words.
pub fn authorize(cache: &Cache, user: &User, attrs: &Attributes<'_>) -> Result<(), String> {
    if user.groups.iter().any(|g| g == MASTERS) {
        return Ok(());
    }
    if node_allows(cache, user, attrs) {
        return Ok(());
    }
    let bound = |binding: &Value| {
        binding
            .get("subjects")
            .and_then(Value::as_array)
            .is_some_and(|s| s.iter().any(|s| subject_matches(s, user)))
    };
    let (cluster_bindings, _) = cache.list(&format!("{RBAC}clusterrolebindings/"));
    for binding in cluster_bindings.iter().filter(|b| bound(b)) {
        if let Some(role_ref) = binding.get("roleRef")
            && role_rules(cache, role_ref, None)
                .iter()
                .any(|rule| rule_allows(rule, attrs))
        {
            return Ok(());
        }
    }
    if let Some(ns) = attrs.resource.as_ref().and_then(|r| r.namespace) {
        let (bindings, _) = cache.list(&format!("{RBAC}rolebindings/{ns}/"));
        for binding in bindings.iter().filter(|b| bound(b)) {
            if let Some(role_ref) = binding.get("roleRef")
                && role_rules(cache, role_ref, Some(ns))
                    .iter()
                    .any(|rule| rule_allows(rule, attrs))
            {
                return Ok(());
            }
        }
    }
    Err(match &attrs.resource {
        Some(r) => {
            let resource = match r.subresource {
                Some(sub) => format!("{}/{sub}", r.resource),
                None => r.resource.to_owned(),
            };
            let head = match r.name {
                Some(name) => format!("{resource} {name:?} is forbidden"),
                None => format!("{resource} is forbidden"),
            };
            let scope = match r.namespace {
                Some(ns) => format!(" in the namespace {ns:?}"),
                None => " at the cluster scope".to_owned(),
            };
            format!(
                "{head}: User {:?} cannot {} resource {resource:?} in API group {:?}{scope}",
                user.name, attrs.verb, r.group
            )
        }
        None => format!(
            "forbidden: User {:?} cannot {} path {:?}",
            user.name, attrs.verb, attrs.path
        ),
    })
}

/// The default ClusterRoles and bindings every site starts with, as Kubernetes
/// bootstraps them (fewer rules: the resources Brink serves).
pub fn default_rbac() -> Vec<Value> {
    use serde_json::json;
    let role = |name: &str, rules: Value| {
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
            "rules": rules,
        })
    };
    let binding = |name: &str, role: &str, group: &str| {
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}],
        })
    };
    let user_binding = |name: &str, role: &str, user: &str| {
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        })
    };
    let read = json!(["get", "list", "watch"]);
    let write = json!(["create", "update", "patch", "delete", "deletecollection"]);
    let namespaced_read = json!([
        {"apiGroups": [""], "resources": ["pods", "pods/log", "pods/status", "services", "services/status", "endpoints", "configmaps", "events", "serviceaccounts", "namespaces", "namespaces/status"], "verbs": read},
        {"apiGroups": ["apps"], "resources": ["deployments", "deployments/status", "deployments/scale", "replicasets", "replicasets/status", "replicasets/scale", "daemonsets", "daemonsets/status"], "verbs": read},
        {"apiGroups": ["batch"], "resources": ["jobs", "jobs/status"], "verbs": read},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": read},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": read},
        {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gateways", "gateways/status", "httproutes", "httproutes/status", "referencegrants"], "verbs": read},
    ]);
    let edit_rules = json!([
        {"apiGroups": [""], "resources": ["pods", "services", "endpoints", "configmaps", "secrets", "events", "serviceaccounts"], "verbs": write},
        {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
        {"apiGroups": ["apps"], "resources": ["deployments", "deployments/scale", "replicasets", "replicasets/scale", "daemonsets"], "verbs": write},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": write},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": write},
        {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gateways", "httproutes", "referencegrants"], "verbs": write},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": read},
    ]);
    let mut edit = namespaced_read.as_array().cloned().unwrap_or_default();
    edit.extend(edit_rules.as_array().cloned().unwrap_or_default());
    let mut admin = edit.clone();
    admin.push(json!({"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"]}));
    vec![
        role(
            "cluster-admin",
            json!([
                {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                {"nonResourceURLs": ["*"], "verbs": ["*"]},
            ]),
        ),
        role("admin", Value::Array(admin)),
        role("edit", Value::Array(edit)),
        role("view", namespaced_read),
        role(
            "system:discovery",
            json!([{"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*", "/version", "/version/", "/healthz", "/livez", "/readyz"], "verbs": ["get"]}]),
        ),
        // Nodes joining with a token Brink made may ask for their certificates (the
        // approval is Brink's: see `certificates`), as kubeadm binds its bootstrappers.
        role(
            "system:node-bootstrapper",
            json!([{"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"], "verbs": ["create", "get", "list", "watch"]}]),
        ),
        binding(
            "brink:node-bootstrap",
            "system:node-bootstrapper",
            brink_proto::bootstrap::NODE_TOKEN_GROUP,
        ),
        // kube-scheduler's rules, fewer: what Brink's scheduler does through the API.
        role(
            "system:kube-scheduler",
            json!([
                {"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": [""], "resources": ["pods/binding", "bindings"], "verbs": ["create"]},
                {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch", "update"]},
                {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch", "update"]},
                {"apiGroups": ["node.k8s.io"], "resources": ["runtimeclasses"], "verbs": ["get", "list", "watch"]},
            ]),
        ),
        user_binding(
            "system:kube-scheduler",
            "system:kube-scheduler",
            "system:kube-scheduler",
        ),
        // The controllers Brink runs, under one identity (kube-controller-manager's
        // controllers each have their own service account; Brink's share a process).
        role(
            "system:kube-controller-manager",
            json!([
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "delete", "patch"]},
                {"apiGroups": [""], "resources": ["pods/status", "nodes/status"], "verbs": ["patch", "update"]},
                {"apiGroups": [""], "resources": ["services", "namespaces"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "patch", "update"]},
                {"apiGroups": ["apps"], "resources": ["deployments", "replicasets", "daemonsets"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
                {"apiGroups": ["apps"], "resources": ["deployments/status", "replicasets/status", "daemonsets/status"], "verbs": ["patch", "update"]},
                {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "patch", "update"]},
                {"apiGroups": ["batch"], "resources": ["jobs/status"], "verbs": ["patch", "update"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
                {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch", "update"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "list", "watch"]},
            ]),
        ),
        // What every node's Gateway data plane reads (a kubelet's system:node role reads
        // Services too; the Gateway API kinds are Brink's addition).
        role(
            "system:brink-node",
            json!([
                {"apiGroups": [""], "resources": ["services", "namespaces"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gatewayclasses", "gateways", "httproutes", "referencegrants"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gatewayclasses/status", "gateways/status", "httproutes/status"], "verbs": ["patch", "update"]},
                {"apiGroups": ["node.k8s.io"], "resources": ["runtimeclasses"], "verbs": ["get", "list", "watch"]},
            ]),
        ),
        binding("system:brink-node", "system:brink-node", NODES),
        user_binding(
            "system:kube-controller-manager",
            "system:kube-controller-manager",
            "system:kube-controller-manager",
        ),
        binding("cluster-admin", "cluster-admin", MASTERS),
        binding("system:discovery", "system:discovery", AUTHENTICATED),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attrs<'a>(verb: &'a str, resource: &'a str, namespace: Option<&'a str>) -> Attributes<'a> {
        Attributes {
            verb,
            resource: Some(ResourceAttributes {
                group: "",
                resource,
                subresource: None,
                name: None,
                namespace,
                field_selector: None,
            }),
            path: "",
        }
    }

    #[test]
    fn a_node_writes_only_its_own_node_and_lease() {
        let node = User {
            name: "system:node:a".into(),
            uid: String::new(),
            groups: vec![NODES.into(), AUTHENTICATED.into()],
        };
        let cache = Cache::new(Default::default());
        let ask = |verb, group, resource, sub, name, ns| Attributes {
            verb,
            resource: Some(ResourceAttributes {
                group,
                resource,
                subresource: sub,
                name,
                namespace: ns,
                field_selector: None,
            }),
            path: "",
        };
        assert!(node_allows(
            &cache,
            &node,
            &ask("patch", "", "nodes", None, Some("a"), None)
        ));
        assert!(node_allows(
            &cache,
            &node,
            &ask("patch", "", "nodes", Some("status"), Some("a"), None)
        ));
        assert!(node_allows(
            &cache,
            &node,
            &ask("list", "", "nodes", None, None, None)
        ));
        assert!(!node_allows(
            &cache,
            &node,
            &ask("patch", "", "nodes", None, Some("b"), None)
        ));
        assert!(!node_allows(
            &cache,
            &node,
            &ask("delete", "", "nodes", None, Some("a"), None)
        ));
        let lease = |name, ns| {
            ask(
                "update",
                "coordination.k8s.io",
                "leases",
                None,
                Some(name),
                Some(ns),
            )
        };
        assert!(node_allows(&cache, &node, &lease("a", "kube-node-lease")));
        assert!(!node_allows(&cache, &node, &lease("b", "kube-node-lease")));
        assert!(!node_allows(&cache, &node, &lease("a", "default")));
        assert!(!node_allows(
            &cache,
            &node,
            &ask("get", "", "secrets", None, Some("s"), Some("default"))
        ));
        // Not a node: the group and the name prefix both matter.
        let pretender = User {
            groups: vec![AUTHENTICATED.into()],
            ..node.clone()
        };
        assert!(!node_allows(
            &cache,
            &pretender,
            &ask("patch", "", "nodes", None, Some("a"), None)
        ));
        assert_eq!(node_may_create(&node, "nodes", "a"), Ok(()));
        assert!(node_may_create(&node, "leases", "b").is_err());
        assert_eq!(node_may_create(&pretender, "nodes", "b"), Ok(()));
    }

    #[test]
    fn a_node_finds_its_pods_and_what_they_use() {
        assert_eq!(
            selected(
                Some("spec.nodeName=a,status.phase!=Failed"),
                "spec.nodeName"
            ),
            Some("a")
        );
        assert_eq!(
            selected(Some("metadata.name==x"), "metadata.name"),
            Some("x")
        );
        assert_eq!(selected(Some("spec.nodeName!=a"), "spec.nodeName"), None);
        assert_eq!(selected(None, "spec.nodeName"), None);
        let pod = json!({"spec": {
            "nodeName": "a",
            "volumes": [
                {"name": "v", "configMap": {"name": "settings"}},
                {"name": "p", "projected": {"sources": [{"secret": {"name": "projected-key"}}]}},
                {"name": "s", "secret": {"secretName": "keys"}},
            ],
            "containers": [{"name": "c", "env": [{"name": "E", "valueFrom": {"configMapKeyRef": {"name": "env-cm", "key": "k"}}}],
                             "envFrom": [{"secretRef": {"name": "env-secret"}}]}],
            "imagePullSecrets": [{"name": "pull"}],
        }});
        assert!(pod_bound_to(&pod, "a") && !pod_bound_to(&pod, "b"));
        for name in ["settings", "env-cm"] {
            assert!(pod_references(&pod, "configmaps", name), "{name}");
        }
        for name in ["keys", "projected-key", "env-secret", "pull"] {
            assert!(pod_references(&pod, "secrets", name), "{name}");
        }
        assert!(!pod_references(&pod, "secrets", "settings"));
        assert!(!pod_references(&pod, "configmaps", "keys"));
        assert!(!pod_references(&pod, "configmaps", "other"));
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"0123", b"0123"));
        assert!(!same_secret(b"0123", b"0124"));
        assert!(!same_secret(b"0123", b"012"));
    }

    #[test]
    fn rules_match_verbs_groups_resources_names_and_paths() {
        let rule =
            json!({"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]});
        assert!(rule_allows(&rule, &attrs("list", "pods", Some("a"))));
        assert!(!rule_allows(&rule, &attrs("delete", "pods", Some("a"))));
        assert!(!rule_allows(&rule, &attrs("list", "secrets", Some("a"))));
        let mut log = attrs("get", "pods", Some("a"));
        if let Some(r) = log.resource.as_mut() {
            r.subresource = Some("log");
        }
        assert!(rule_allows(&rule, &log));
        let named = json!({"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["x"], "verbs": ["get"]});
        let mut get_x = attrs("get", "configmaps", Some("a"));
        assert!(!rule_allows(&named, &get_x));
        if let Some(r) = get_x.resource.as_mut() {
            r.name = Some("x");
        }
        assert!(rule_allows(&named, &get_x));
        let paths = json!({"nonResourceURLs": ["/apis/*", "/version"], "verbs": ["get"]});
        let path = |p| Attributes {
            verb: "get",
            resource: None,
            path: p,
        };
        assert!(rule_allows(&paths, &path("/apis/apps/v1")));
        assert!(rule_allows(&paths, &path("/version")));
        assert!(!rule_allows(&paths, &path("/metrics")));
    }

    #[test]
    fn token_files_read_as_kube_apiserver_reads_them() {
        let tokens = Tokens::parse(
            "# comment\nsecret-token-1,alice,u1,\"dev,ops\"\nsecret-token-2,bob,u2\n",
        )
        .expect("parse");
        let alice = tokens.find("secret-token-1").expect("alice");
        assert_eq!(alice.name, "alice");
        assert_eq!(alice.groups, ["dev", "ops", AUTHENTICATED]);
        assert!(tokens.find("nope").is_none());
        for bad in ["short,x,y", "tok-long-enough", "tok-long-enough,u,1,\"a"] {
            assert!(Tokens::parse(bad).is_err(), "{bad}");
        }
    }
}
