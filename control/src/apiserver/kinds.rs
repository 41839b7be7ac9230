//! The resources the API server serves: group, version, plural, kind, scope, short names
//! and subresources, as discovery reports them and as request paths name them.
//!
//! One table, read by discovery, routing, storage keys and Table output. Adding a
//! resource is adding a row (and, when it has rules of its own, a validation in
//! `validate`).

/// One served resource.
#[derive(Debug, PartialEq, Eq)]
pub struct Kind {
    /// The API group ("" for the core group).
    pub group: &'static str,
    pub version: &'static str,
    /// The plural lower-case name that paths use.
    pub resource: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Subresources served (`status`, `scale`, `binding`, `log`, `approval`).
    pub subresources: &'static [&'static str],
    /// Objects of this kind have a `spec` whose changes bump `metadata.generation`.
    pub has_spec: bool,
}

impl Kind {
    /// `v1` or `apps/v1`, as `apiVersion` spells it.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The group as storage keys spell it (`core` for the core group).
    pub fn storage_group(&self) -> &'static str {
        if self.group.is_empty() {
            "core"
        } else {
            self.group
        }
    }

    /// `pods` or `deployments.apps`, as error messages name a resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.to_owned()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    pub fn has_subresource(&self, name: &str) -> bool {
        self.subresources.contains(&name)
    }

    /// The key prefix of every object of this kind, or of those in one namespace.
    pub fn prefix(&self, namespace: Option<&str>) -> String {
        match (self.namespaced, namespace) {
            (true, Some(ns)) => {
                format!("/registry/{}/{}/{ns}/", self.storage_group(), self.resource)
            }
            _ => format!("/registry/{}/{}/", self.storage_group(), self.resource),
        }
    }

    /// The storage key of one object.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        format!("{}{name}", self.prefix(namespace))
    }
}

const WORKLOADS: &[&str] = &["all"];

macro_rules! kind {
    ($group:expr, $version:expr, $resource:expr, $singular:expr, $kind:expr, $namespaced:expr,
     short: [$($short:expr),*], cat: $cat:expr, sub: [$($sub:expr),*], spec: $spec:expr) => {
        Kind {
            group: $group,
            version: $version,
            resource: $resource,
            singular: $singular,
            kind: $kind,
            namespaced: $namespaced,
            short_names: &[$($short),*],
            categories: $cat,
            subresources: &[$($sub),*],
            has_spec: $spec,
        }
    };
}

/// Every served resource, groups in the order discovery lists them.
pub static KINDS: &[Kind] = &[
    kind!("", "v1", "namespaces", "namespace", "Namespace", false, short: ["ns"], cat: &[], sub: ["status", "finalize"], spec: false),
    kind!("", "v1", "pods", "pod", "Pod", true, short: ["po"], cat: WORKLOADS, sub: ["status", "binding", "eviction", "log"], spec: true),
    kind!("", "v1", "nodes", "node", "Node", false, short: ["no"], cat: &[], sub: ["status"], spec: true),
    kind!("", "v1", "services", "service", "Service", true, short: ["svc"], cat: WORKLOADS, sub: ["status"], spec: true),
    kind!("", "v1", "endpoints", "endpoints", "Endpoints", true, short: ["ep"], cat: &[], sub: [], spec: false),
    kind!("", "v1", "configmaps", "configmap", "ConfigMap", true, short: ["cm"], cat: &[], sub: [], spec: false),
    kind!("", "v1", "secrets", "secret", "Secret", true, short: [], cat: &[], sub: [], spec: false),
    kind!("", "v1", "events", "event", "Event", true, short: ["ev"], cat: &[], sub: [], spec: false),
    kind!("", "v1", "serviceaccounts", "serviceaccount", "ServiceAccount", true, short: ["sa"], cat: &[], sub: [], spec: false),
    kind!("apps", "v1", "deployments", "deployment", "Deployment", true, short: ["deploy"], cat: WORKLOADS, sub: ["status", "scale"], spec: true),
    kind!("apps", "v1", "replicasets", "replicaset", "ReplicaSet", true, short: ["rs"], cat: WORKLOADS, sub: ["status", "scale"], spec: true),
    kind!("apps", "v1", "daemonsets", "daemonset", "DaemonSet", true, short: ["ds"], cat: WORKLOADS, sub: ["status"], spec: true),
    kind!("batch", "v1", "jobs", "job", "Job", true, short: [], cat: WORKLOADS, sub: ["status"], spec: true),
    kind!("coordination.k8s.io", "v1", "leases", "lease", "Lease", true, short: [], cat: &[], sub: [], spec: true),
    kind!("discovery.k8s.io", "v1", "endpointslices", "endpointslice", "EndpointSlice", true, short: [], cat: &[], sub: [], spec: false),
    kind!("events.k8s.io", "v1", "events", "event", "Event", true, short: ["ev"], cat: &[], sub: [], spec: false),
    kind!("node.k8s.io", "v1", "runtimeclasses", "runtimeclass", "RuntimeClass", false, short: [], cat: &[], sub: [], spec: false),
    kind!("certificates.k8s.io", "v1", "certificatesigningrequests", "certificatesigningrequest", "CertificateSigningRequest", false, short: ["csr"], cat: &[], sub: ["status", "approval"], spec: true),
    kind!("rbac.authorization.k8s.io", "v1", "roles", "role", "Role", true, short: [], cat: &[], sub: [], spec: false),
    kind!("rbac.authorization.k8s.io", "v1", "rolebindings", "rolebinding", "RoleBinding", true, short: [], cat: &[], sub: [], spec: false),
    kind!("rbac.authorization.k8s.io", "v1", "clusterroles", "clusterrole", "ClusterRole", false, short: [], cat: &[], sub: [], spec: false),
    kind!("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "clusterrolebinding", "ClusterRoleBinding", false, short: [], cat: &[], sub: [], spec: false),
    kind!("gateway.networking.k8s.io", "v1", "gatewayclasses", "gatewayclass", "GatewayClass", false, short: ["gc"], cat: &["gateway-api"], sub: ["status"], spec: true),
    kind!("gateway.networking.k8s.io", "v1", "gateways", "gateway", "Gateway", true, short: ["gtw"], cat: &["gateway-api"], sub: ["status"], spec: true),
    kind!("gateway.networking.k8s.io", "v1", "httproutes", "httproute", "HTTPRoute", true, short: [], cat: &["gateway-api"], sub: ["status"], spec: true),
    kind!("gateway.networking.k8s.io", "v1", "referencegrants", "referencegrant", "ReferenceGrant", true, short: ["refgrant"], cat: &["gateway-api"], sub: [], spec: true),
];

/// The groups served, in discovery order (the core group first, as "").
pub fn groups() -> Vec<&'static str> {
    let mut groups: Vec<&'static str> = Vec::new();
    for kind in KINDS {
        if !groups.contains(&kind.group) {
            groups.push(kind.group);
        }
    }
    groups
}

/// The resource `resource` of `group`/`version`.
pub fn find(group: &str, version: &str, resource: &str) -> Option<&'static Kind> {
    KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.resource == resource)
}

/// Whether `group`/`version` is served at all.
pub fn serves_version(group: &str, version: &str) -> bool {
    KINDS
        .iter()
        .any(|k| k.group == group && k.version == version)
}

/// The kind `kind` of `apiVersion` (`v1`, `apps/v1`).
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static Kind> {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    KINDS
        .iter()
        .find(|k| k.group == group && k.version == version && k.kind == kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_resource_is_unique_and_named_as_kubernetes_names_it() {
        for (i, a) in KINDS.iter().enumerate() {
            assert_eq!(a.resource, a.resource.to_lowercase(), "{}", a.resource);
            for b in &KINDS[i + 1..] {
                assert!(
                    !(a.group == b.group && a.resource == b.resource),
                    "{} served twice",
                    a.qualified()
                );
            }
        }
        let pods = find("", "v1", "pods").expect("pods");
        assert_eq!(
            pods.key(Some("default"), "web"),
            "/registry/core/pods/default/web"
        );
        let deployments = by_kind("apps/v1", "Deployment").expect("deployments");
        assert_eq!(deployments.qualified(), "deployments.apps");
        assert_eq!(
            find("", "v1", "nodes").expect("nodes").key(None, "n1"),
            "/registry/core/nodes/n1"
        );
        assert!(by_kind("apps/v2", "Deployment").is_none());
    }
}
