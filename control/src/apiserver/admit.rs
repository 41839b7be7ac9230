//! Admission of an object into the store: decoding it as its Kubernetes type (unknown
//! fields refused, warned about or dropped as `fieldValidation` asks), the rules `proto`
//! shares with the node (names, labels, annotations, pods, config, services, Gateway API
//! kinds), and the defaults kube-apiserver fills in.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use brink_proto::meta::{FieldError, field_err};

use super::kinds::Kind;
use super::status::{ApiError, Cause};

/// What `fieldValidation` asks for unknown and duplicate fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldValidation {
    Strict,
    Warn,
    Ignore,
}

impl FieldValidation {
    pub fn parse(text: Option<&str>) -> Result<Self, ApiError> {
        match text {
            None | Some("") | Some("Warn") => Ok(Self::Warn),
            Some("Strict") => Ok(Self::Strict),
            Some("Ignore") => Ok(Self::Ignore),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation {other:?} is not Ignore, Warn or Strict"
            ))),
        }
    }
}

fn bracket(path: &str) -> String {
    let mut out = String::new();
    for (i, segment) in path
        .split('.')
        .map(|s| s.trim_start_matches('?'))
        .filter(|s| !s.is_empty())
        .enumerate()
    {
        if segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if i > 0 {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}

/// Decodes `value` as `T`, noting fields `T` does not know.
fn decode<T: DeserializeOwned>(value: Value, kind: &Kind) -> Result<(T, Vec<String>), ApiError> {
    let mut unknown = Vec::new();
    let typed = {
        let mut record = |path: serde_ignored::Path<'_>| unknown.push(bracket(&path.to_string()));
        let de = serde_ignored::Deserializer::new(value, &mut record);
        serde_path_to_error::deserialize::<_, T>(de).map_err(|e| {
            ApiError::bad_request(format!(
                "{} in version {:?} cannot be handled as a {}: {}: {}",
                kind.kind,
                kind.version,
                kind.kind,
                bracket(&e.path().to_string()),
                e.inner()
            ))
        })?
    };
    // Custom resource types (the Gateway API's) read apiVersion and kind without
    // consuming them; they are the object's identity, checked before decoding.
    unknown.retain(|path| path != "apiVersion" && path != "kind");
    Ok((typed, unknown))
}

fn invalid(kind: &Kind, name: &str, e: FieldError) -> ApiError {
    ApiError::invalid(
        kind,
        name,
        vec![Cause {
            reason: "FieldValueInvalid",
            field: e.field,
            message: e.message,
        }],
    )
}

/// A name that is a path segment: what RBAC objects and CSRs may be called.
fn is_path_segment(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('%')
}

/// Names, namespace, labels and annotations of any kind.
fn check_metadata(
    kind: &Kind,
    metadata: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<(), FieldError> {
    let name = metadata.name.clone().ok_or_else(|| {
        field_err(
            "metadata.name",
            "Required value: name or generateName is required",
        )
    })?;
    let path_segment_names =
        kind.group == "rbac.authorization.k8s.io" || kind.group == "certificates.k8s.io";
    let dns_label_names = matches!(kind.resource, "namespaces" | "services");
    let ok = if path_segment_names {
        is_path_segment(&name)
    } else if dns_label_names {
        brink_proto::meta::is_dns_label(&name)
    } else {
        brink_proto::meta::is_dns_subdomain(&name)
    };
    if !ok {
        return Err(field_err(
            "metadata.name",
            format!(
                "Invalid value: {name:?}: a lowercase RFC 1123 {} must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
                if dns_label_names {
                    "label"
                } else {
                    "subdomain"
                }
            ),
        ));
    }
    if kind.namespaced {
        let namespace = metadata.namespace.as_deref().unwrap_or("");
        if !brink_proto::meta::is_dns_label(namespace) {
            return Err(field_err(
                "metadata.namespace",
                format!("Invalid value: {namespace:?}"),
            ));
        }
    } else {
        metadata.namespace = None;
    }
    brink_proto::meta::validate_labels_and_annotations(metadata)
}

fn typed<T>(
    value: Value,
    kind: &Kind,
    check: impl FnOnce(&mut T) -> Result<(), FieldError>,
    metadata: impl Fn(&mut T) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<(Value, Vec<String>), ApiError>
where
    T: DeserializeOwned + Serialize,
{
    let name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let (mut object, unknown): (T, _) = decode(value, kind)?;
    check_metadata(kind, metadata(&mut object)).map_err(|e| invalid(kind, &name, e))?;
    check(&mut object).map_err(|e| invalid(kind, &name, e))?;
    let mut value = serde_json::to_value(&object)
        .map_err(|e| ApiError::internal(format!("re-encoding the object: {e}")))?;
    if value.get("apiVersion").is_none() {
        value["apiVersion"] = json!(kind.api_version());
        value["kind"] = json!(kind.kind);
    }
    Ok((value, unknown))
}

fn none<T>(_: &mut T) -> Result<(), FieldError> {
    Ok(())
}

/// Decodes, checks and defaults `value` as `kind`. Returns the object as it will be
/// stored and the warnings to send (unknown fields under `Warn`).
pub fn admit(
    kind: &Kind,
    value: Value,
    validation: FieldValidation,
) -> Result<(Value, Vec<String>), ApiError> {
    use k8s_openapi::api::{
        apps::v1 as apps, batch::v1 as batch, certificates::v1 as certs,
        coordination::v1 as coordination, core::v1 as core, discovery::v1 as discovery,
        events::v1 as events, node::v1 as node, rbac::v1 as rbac,
    };
    macro_rules! plain {
        ($t:ty) => {
            typed::<$t>(value, kind, none, |o| &mut o.metadata)
        };
    }
    let (object, unknown) = match (kind.group, kind.kind) {
        ("", "Namespace") => typed::<core::Namespace>(
            value,
            kind,
            |ns| {
                ns.status
                    .get_or_insert_with(Default::default)
                    .phase
                    .get_or_insert_with(|| "Active".into());
                let spec = ns.spec.get_or_insert_with(Default::default);
                spec.finalizers
                    .get_or_insert_with(|| vec!["kubernetes".into()]);
                Ok(())
            },
            |o| &mut o.metadata,
        )?,
        ("", "Pod") => typed::<core::Pod>(value, kind, brink_proto::manifest::validate_pod, |o| {
            &mut o.metadata
        })?,
        ("", "Node") => plain!(core::Node)?,
        ("", "Service") => {
            typed::<core::Service>(value, kind, brink_proto::gateway::validate_service, |o| {
                &mut o.metadata
            })?
        }
        ("", "Endpoints") => plain!(core::Endpoints)?,
        ("", "ConfigMap") => {
            typed::<core::ConfigMap>(value, kind, brink_proto::config::validate_config_map, |o| {
                &mut o.metadata
            })?
        }
        ("", "Secret") => {
            typed::<core::Secret>(
                value,
                kind,
                |secret| {
                    // `stringData` is write-only: it lands in `data`, winning over it, as
                    // kube-apiserver stores it.
                    if let Some(strings) = secret.string_data.take() {
                        let data = secret.data.get_or_insert_with(Default::default);
                        for (k, v) in strings {
                            data.insert(k, k8s_openapi::ByteString(v.into_bytes()));
                        }
                    }
                    brink_proto::config::validate_secret(secret)
                },
                |o| &mut o.metadata,
            )?
        }
        ("", "Event") => plain!(core::Event)?,
        ("", "ServiceAccount") => plain!(core::ServiceAccount)?,
        // The defaults kube-apiserver fills in for workloads (kubectl's rollout verbs
        // read them).
        ("apps", "Deployment") => typed::<apps::Deployment>(
            value,
            kind,
            |d| {
                use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
                let spec = d.spec.get_or_insert_with(Default::default);
                spec.replicas.get_or_insert(1);
                spec.revision_history_limit.get_or_insert(10);
                spec.progress_deadline_seconds.get_or_insert(600);
                let strategy = spec.strategy.get_or_insert_with(Default::default);
                let kind = strategy.type_.get_or_insert_with(|| "RollingUpdate".into());
                if kind == "RollingUpdate" {
                    let rolling = strategy.rolling_update.get_or_insert_with(Default::default);
                    rolling
                        .max_surge
                        .get_or_insert_with(|| IntOrString::String("25%".into()));
                    rolling
                        .max_unavailable
                        .get_or_insert_with(|| IntOrString::String("25%".into()));
                }
                Ok(())
            },
            |o| &mut o.metadata,
        )?,
        ("apps", "ReplicaSet") => typed::<apps::ReplicaSet>(
            value,
            kind,
            |rs| {
                rs.spec
                    .get_or_insert_with(Default::default)
                    .replicas
                    .get_or_insert(1);
                Ok(())
            },
            |o| &mut o.metadata,
        )?,
        ("apps", "DaemonSet") => typed::<apps::DaemonSet>(
            value,
            kind,
            |ds| {
                use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
                let spec = ds.spec.get_or_insert_with(Default::default);
                spec.revision_history_limit.get_or_insert(10);
                let strategy = spec.update_strategy.get_or_insert_with(Default::default);
                let kind = strategy.type_.get_or_insert_with(|| "RollingUpdate".into());
                if kind == "RollingUpdate" {
                    let rolling = strategy.rolling_update.get_or_insert_with(Default::default);
                    rolling.max_unavailable.get_or_insert(IntOrString::Int(1));
                    rolling.max_surge.get_or_insert(IntOrString::Int(0));
                }
                Ok(())
            },
            |o| &mut o.metadata,
        )?,
        ("batch", "Job") => typed::<batch::Job>(
            value,
            kind,
            |job| {
                let spec = job.spec.get_or_insert_with(Default::default);
                if spec.completions.is_none() && spec.parallelism.is_none() {
                    spec.completions = Some(1);
                }
                spec.parallelism.get_or_insert(1);
                spec.backoff_limit.get_or_insert(6);
                spec.completion_mode
                    .get_or_insert_with(|| "NonIndexed".into());
                spec.suspend.get_or_insert(false);
                Ok(())
            },
            |o| &mut o.metadata,
        )?,
        ("coordination.k8s.io", "Lease") => plain!(coordination::Lease)?,
        ("discovery.k8s.io", "EndpointSlice") => plain!(discovery::EndpointSlice)?,
        ("events.k8s.io", "Event") => plain!(events::Event)?,
        ("node.k8s.io", "RuntimeClass") => plain!(node::RuntimeClass)?,
        ("certificates.k8s.io", "CertificateSigningRequest") => {
            plain!(certs::CertificateSigningRequest)?
        }
        ("rbac.authorization.k8s.io", "Role") => plain!(rbac::Role)?,
        ("rbac.authorization.k8s.io", "RoleBinding") => plain!(rbac::RoleBinding)?,
        ("rbac.authorization.k8s.io", "ClusterRole") => plain!(rbac::ClusterRole)?,
        ("rbac.authorization.k8s.io", "ClusterRoleBinding") => plain!(rbac::ClusterRoleBinding)?,
        ("gateway.networking.k8s.io", "GatewayClass") => {
            typed::<gateway_api::gatewayclasses::GatewayClass>(
                value,
                kind,
                brink_proto::gateway::validate_gateway_class,
                |o| &mut o.metadata,
            )?
        }
        ("gateway.networking.k8s.io", "Gateway") => typed::<gateway_api::gateways::Gateway>(
            value,
            kind,
            brink_proto::gateway::validate_gateway,
            |o| &mut o.metadata,
        )?,
        ("gateway.networking.k8s.io", "HTTPRoute") => typed::<gateway_api::httproutes::HttpRoute>(
            value,
            kind,
            |r| {
                // The CRD's defaults for references, so clients and status see them.
                for parent in r.spec.parent_refs.iter_mut().flatten() {
                    parent
                        .group
                        .get_or_insert_with(|| "gateway.networking.k8s.io".into());
                    parent.kind.get_or_insert_with(|| "Gateway".into());
                }
                for backend in r
                    .spec
                    .rules
                    .iter_mut()
                    .flatten()
                    .flat_map(|rule| rule.backend_refs.iter_mut().flatten())
                {
                    backend.group.get_or_insert_with(String::new);
                    backend.kind.get_or_insert_with(|| "Service".into());
                }
                brink_proto::gateway::validate_route_spec(&r.spec)
            },
            |o| &mut o.metadata,
        )?,
        ("gateway.networking.k8s.io", "ReferenceGrant") => {
            typed::<gateway_api::referencegrants::ReferenceGrant>(
                value,
                kind,
                brink_proto::gateway::validate_reference_grant,
                |o| &mut o.metadata,
            )?
        }
        _ => {
            return Err(ApiError::internal(format!(
                "no admission for {}",
                kind.qualified()
            )));
        }
    };
    let warnings = match validation {
        FieldValidation::Strict if !unknown.is_empty() => {
            return Err(ApiError::bad_request(format!(
                "strict decoding error: {}",
                unknown
                    .iter()
                    .map(|f| format!("unknown field {f:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        FieldValidation::Warn => unknown
            .into_iter()
            .map(|f| format!("unknown field {f:?}"))
            .collect(),
        _ => Vec::new(),
    };
    Ok((object, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apiserver::kinds::find;

    #[test]
    fn gateway_api_objects_pass_strict_validation_and_get_the_crds_defaults() {
        let routes = find("gateway.networking.k8s.io", "v1", "httproutes").expect("httproutes");
        let route = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "r", "namespace": "default"},
            "spec": {"parentRefs": [{"name": "gw"}], "rules": [{"backendRefs": [{"name": "web", "port": 8080}]}]}});
        let (stored, warnings) = admit(routes, route, FieldValidation::Strict).expect("strict");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(stored["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(stored["kind"], "HTTPRoute");
        assert_eq!(
            stored["spec"]["parentRefs"][0]["group"],
            "gateway.networking.k8s.io"
        );
        assert_eq!(stored["spec"]["parentRefs"][0]["kind"], "Gateway");
        assert_eq!(
            stored["spec"]["rules"][0]["backendRefs"][0]["kind"],
            "Service"
        );
    }

    #[test]
    fn objects_are_decoded_checked_and_defaulted() {
        let cms = find("", "v1", "configmaps").expect("configmaps");
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "default"}, "data": {"k": "v"}, "bogus": 1});
        let (_, warnings) = admit(cms, cm.clone(), FieldValidation::Warn).expect("warn");
        assert_eq!(warnings, ["unknown field \"bogus\""]);
        let e = admit(cms, cm.clone(), FieldValidation::Strict).expect_err("strict");
        assert_eq!(e.code, 400);
        assert!(
            e.message.contains("unknown field \"bogus\""),
            "{}",
            e.message
        );
        let (stored, warnings) = admit(cms, cm, FieldValidation::Ignore).expect("ignore");
        assert!(warnings.is_empty());
        assert!(stored.get("bogus").is_none());

        let pods = find("", "v1", "pods").expect("pods");
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"}, "spec": {"containers": [{"name": "c", "image": "r/x:1"}]}});
        let (stored, _) = admit(pods, pod, FieldValidation::Strict).expect("pod");
        assert_eq!(stored["spec"]["restartPolicy"], "Always");
        assert_eq!(stored["spec"]["terminationGracePeriodSeconds"], 30);

        let bad_label = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "default", "labels": {"../a": "b"}}});
        let e = admit(cms, bad_label, FieldValidation::Strict).expect_err("label");
        assert_eq!(e.code, 422);
        assert_eq!(e.details.causes[0].field, "metadata.labels");
        let wrong_type = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "default"}, "data": [1]});
        assert_eq!(
            admit(cms, wrong_type, FieldValidation::Strict)
                .expect_err("type")
                .code,
            400
        );
        let bad_name = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "Not_A_Name", "namespace": "default"}});
        assert_eq!(
            admit(cms, bad_name, FieldValidation::Strict)
                .expect_err("name")
                .code,
            422
        );
    }
}
