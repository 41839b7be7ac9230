//! certificates.k8s.io for nodes: approving and signing the certificate requests a node
//! makes for itself, as kube-controller-manager's `csrapproving` and `csrsigning`
//! controllers do for kubelets.
//!
//! - `kubernetes.io/kube-apiserver-client-kubelet` (a node's client certificate): approved
//!   when asked with a token `brink server token` made (TLS bootstrap) or by the node
//!   itself (renewal), and only for exactly `CN=system:node:<name>, O=system:nodes`,
//!   client usages and no alternative names.
//! - `kubernetes.io/kubelet-serving` (its kubelet endpoint): approved when the node asks
//!   for itself, for its own name and IP addresses. (Kubernetes leaves these to an
//!   operator; Brink's nodes need them to serve logs with no one at hand.)
//!
//! Signed certificates carry only what Brink decides (subject, names, usages, validity);
//! nothing else a request asks for is honoured. Owns the decisions ([`step`], pure) and
//! one sweep over the cache on the leader ([`sweep`]); must not touch other kinds.

use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Value, json};

use super::ApiState;
use crate::peers::pki::SiteCa;
use crate::store::{Applied, Command, Op};

/// A node's client certificate.
pub const KUBELET_CLIENT: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// A node's kubelet serving certificate.
pub const KUBELET_SERVING: &str = "kubernetes.io/kubelet-serving";
/// Every node's certificate carries this organization.
pub const NODES_GROUP: &str = "system:nodes";
/// A node's user name: this prefix and the node's name.
pub const NODE_USER_PREFIX: &str = "system:node:";

/// What a request asks for, read from its PKCS#10 text.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Requested {
    common_name: String,
    organizations: Vec<String>,
    dns: Vec<String>,
    ips: Vec<std::net::IpAddr>,
    other_names: bool,
}

fn request_pem(csr: &Value) -> Result<String, String> {
    let encoded = csr
        .pointer("/spec/request")
        .and_then(Value::as_str)
        .ok_or("spec.request is missing")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "spec.request is not base64")?;
    String::from_utf8(bytes).map_err(|_| "spec.request is not PEM text".to_owned())
}

fn read_request(pem_text: &str) -> Result<Requested, String> {
    use x509_parser::prelude::FromDer as _;
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(pem_text.as_bytes())
        .map(|d: rustls::pki_types::CertificateSigningRequestDer<'_>| d.as_ref().to_vec())
        .map_err(|_| "spec.request is not a PEM certificate request".to_owned())?;
    let (_, request) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| format!("spec.request is not a certificate request: {e}"))?;
    let subject = &request.certification_request_info.subject;
    let text = |a: &x509_parser::x509::AttributeTypeAndValue<'_>| {
        a.as_str().map(str::to_owned).unwrap_or_default()
    };
    let mut out = Requested {
        common_name: subject
            .iter_common_name()
            .next()
            .map(text)
            .unwrap_or_default(),
        organizations: subject.iter_organization().map(text).collect(),
        dns: Vec::new(),
        ips: Vec::new(),
        other_names: false,
    };
    for ext in request.requested_extensions().into_iter().flatten() {
        if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                match name {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        out.dns.push((*d).to_owned())
                    }
                    x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                        4 => out.ips.push(std::net::IpAddr::from(
                            <[u8; 4]>::try_from(*b).unwrap_or_default(),
                        )),
                        16 => out.ips.push(std::net::IpAddr::from(
                            <[u8; 16]>::try_from(*b).unwrap_or_default(),
                        )),
                        _ => out.other_names = true,
                    },
                    _ => out.other_names = true,
                }
            }
        }
    }
    Ok(out)
}

fn strings(value: Option<&Value>) -> Vec<&str> {
    value
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn has_condition(csr: &Value, kind: &str) -> bool {
    csr.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(|c| c["type"] == kind))
}

/// Whether a request is one Brink approves by itself, and why (reason, message).
fn approval(csr: &Value, requested: &Requested) -> Option<&'static str> {
    let signer = csr.pointer("/spec/signerName").and_then(Value::as_str)?;
    let user = csr.pointer("/spec/username").and_then(Value::as_str)?;
    let groups = strings(csr.pointer("/spec/groups"));
    let usages = strings(csr.pointer("/spec/usages"));
    let node = requested.common_name.strip_prefix(NODE_USER_PREFIX)?;
    if node.is_empty() || requested.organizations != [NODES_GROUP] || requested.other_names {
        return None;
    }
    let only = |allowed: &[&str], needed: &str| {
        usages.contains(&needed) && usages.iter().all(|u| allowed.contains(u))
    };
    match signer {
        KUBELET_CLIENT
            if requested.dns.is_empty()
                && requested.ips.is_empty()
                && only(
                    &["digital signature", "key encipherment", "client auth"],
                    "client auth",
                )
                && (groups.contains(&brink_proto::bootstrap::NODE_TOKEN_GROUP)
                    || user == requested.common_name) =>
        {
            Some("Auto approving kubelet client certificate after SubjectAccessReview.")
        }
        KUBELET_SERVING
            if user == requested.common_name
                && (!requested.dns.is_empty() || !requested.ips.is_empty())
                && requested.dns.iter().all(|d| d == node)
                && only(
                    &["digital signature", "key encipherment", "server auth"],
                    "server auth",
                ) =>
        {
            Some(
                "Auto approving kubelet serving certificate for the node's own name and addresses.",
            )
        }
        _ => None,
    }
}

fn condition(kind: &str, reason: &str, message: &str, now: &str) -> Value {
    json!({
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastUpdateTime": now,
        "lastTransitionTime": now,
    })
}

fn push_condition(csr: &mut Value, c: Value) {
    if !csr["status"].is_object() {
        csr["status"] = json!({});
    }
    match csr["status"]["conditions"].as_array_mut() {
        Some(list) => list.push(c),
        None => csr["status"]["conditions"] = json!([c]),
    }
}

/// How long signed certificates are valid, and today's date: what signing needs.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub today: jiff::civil::Date,
    pub days: i32,
}

/// The next write for one CertificateSigningRequest, if any: approve it, sign it, or
/// mark it failed. Pure but for the CA's signature.
pub fn step(csr: &Value, ca: &SiteCa, validity: Validity, now: &str) -> Option<Value> {
    let signer = csr.pointer("/spec/signerName").and_then(Value::as_str)?;
    if !matches!(signer, KUBELET_CLIENT | KUBELET_SERVING)
        || has_condition(csr, "Denied")
        || has_condition(csr, "Failed")
        || csr.pointer("/status/certificate").is_some()
    {
        return None;
    }
    let requested = request_pem(csr).and_then(|p| read_request(&p).map(|r| (p, r)));
    let mut next = csr.clone();
    if !has_condition(csr, "Approved") {
        let (_, requested) = requested.ok()?;
        let message = approval(csr, &requested)?;
        push_condition(
            &mut next,
            condition("Approved", "AutoApproved", message, now),
        );
        return Some(next);
    }
    // Approved (by Brink or an operator): sign what Brink allows for this signer.
    let signed = requested.and_then(|(pem, r)| {
        if approval_shape_ok(signer, &r) {
            let until = validity
                .today
                .checked_add(jiff::Span::new().days(validity.days))
                .map_err(|e| e.to_string())?;
            let since = validity.today.yesterday().map_err(|e| e.to_string())?;
            let ymd = |d: jiff::civil::Date| (i32::from(d.year()), d.month() as u8, d.day() as u8);
            ca.sign_request(
                &pem,
                &r.common_name,
                &r.organizations,
                (r.dns.clone(), r.ips.clone()),
                signer == KUBELET_SERVING,
                (ymd(since), ymd(until)),
            )
            .map_err(|e| e.to_string())
        } else {
            Err(format!(
                "{signer} signs only CN=system:node:<name>, O=system:nodes certificates{}",
                if signer == KUBELET_SERVING {
                    " naming the node's own name and addresses"
                } else {
                    " without alternative names"
                }
            ))
        }
    });
    match signed {
        Ok(pem) => {
            next["status"]["certificate"] =
                json!(base64::engine::general_purpose::STANDARD.encode(pem));
        }
        Err(why) => push_condition(
            &mut next,
            condition("Failed", "SignerValidationFailure", &why, now),
        ),
    }
    Some(next)
}

/// The subject and names a signer accepts, whoever approved the request.
fn approval_shape_ok(signer: &str, r: &Requested) -> bool {
    let Some(node) = r.common_name.strip_prefix(NODE_USER_PREFIX) else {
        return false;
    };
    !node.is_empty()
        && r.organizations == [NODES_GROUP]
        && !r.other_names
        && match signer {
            KUBELET_CLIENT => r.dns.is_empty() && r.ips.is_empty(),
            _ => r.dns.iter().all(|d| d == node),
        }
}

/// One sweep on the leader: every request's next step, each written with
/// compare-and-set. Returns the writes that took.
pub async fn sweep(state: &Arc<ApiState>, ca: &SiteCa) -> usize {
    let Some(kind) = super::kinds::find("certificates.k8s.io", "v1", "certificatesigningrequests")
    else {
        return 0;
    };
    let now = super::handler::now_rfc3339();
    let validity = Validity {
        today: jiff::Zoned::now().date(),
        days: state.settings.node_certificate_days,
    };
    let mut done = 0;
    for (key, csr) in state.cache.list_keyed(&kind.prefix(None)) {
        let Some(next) = step(&csr, ca, validity, &now) else {
            continue;
        };
        let expect = csr
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .and_then(|r| r.parse().ok());
        let mut stored = next;
        if let Some(m) = stored.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        let Ok(data) = serde_json::to_vec(&stored) else {
            continue;
        };
        let op = Op::Update {
            key: key.clone().into_bytes(),
            data,
            expect_mod: expect,
        };
        match state.replica.propose(Command { ops: vec![op] }).await {
            Ok(Applied::Done { .. }) => {
                tracing::info!(csr = %key, "certificate request approved or signed");
                done += 1;
            }
            Ok(_) => tracing::debug!(csr = %key, "certificates: lost a race; next sweep"),
            Err(e) => {
                tracing::debug!(csr = %key, error = %e, "certificates: write failed; next sweep");
                break;
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(cn: &str, orgs: &[&str], names: &[&str]) -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        for o in orgs {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, *o);
        }
        params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem")
    }

    fn csr(signer: &str, pem: &str, user: &str, groups: &[&str], usages: &[&str]) -> Value {
        json!({
            "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"name": "c", "resourceVersion": "3"},
            "spec": {"signerName": signer, "username": user, "groups": groups, "usages": usages,
                     "request": base64::engine::general_purpose::STANDARD.encode(pem)}
        })
    }

    const VALID: Validity = Validity {
        today: jiff::civil::date(2026, 12, 2),
        days: 365,
    };

    #[test]
    fn a_bootstrapping_node_is_approved_then_signed() {
        let ca = SiteCa::generate().expect("ca");
        let pem = request("system:node:shop-7", &[NODES_GROUP], &[]);
        let c = csr(
            KUBELET_CLIENT,
            &pem,
            "system:bootstrap:abcdef",
            &[
                "system:bootstrappers",
                brink_proto::bootstrap::NODE_TOKEN_GROUP,
            ],
            &["digital signature", "client auth"],
        );
        let approved = step(&c, &ca, VALID, "now").expect("approves");
        assert_eq!(approved["status"]["conditions"][0]["type"], "Approved");
        assert_eq!(
            approved["status"]["conditions"][0]["reason"],
            "AutoApproved"
        );
        let signed = step(&approved, &ca, VALID, "now").expect("signs");
        let cert = base64::engine::general_purpose::STANDARD
            .decode(
                signed["status"]["certificate"]
                    .as_str()
                    .expect("certificate"),
            )
            .expect("base64");
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(&cert)
            .map(|d: rustls::pki_types::CertificateDer<'_>| d.as_ref().to_vec())
            .expect("pem");
        let (_, x) = x509_parser::parse_x509_certificate(&der).expect("x509");
        assert_eq!(
            x.subject()
                .iter_common_name()
                .next()
                .and_then(|c| c.as_str().ok()),
            Some("system:node:shop-7")
        );
        assert_eq!(x.validity().not_after.to_datetime().year(), 2027);
        assert_eq!(step(&signed, &ca, VALID, "now"), None, "done");
    }

    #[test]
    fn requests_brink_does_not_approve_stay_pending() {
        let ca = SiteCa::generate().expect("ca");
        let bootstrap = [
            "system:bootstrappers",
            brink_proto::bootstrap::NODE_TOKEN_GROUP,
        ];
        let client = ["digital signature", "client auth"];
        let cases = [
            // Not a node's subject.
            csr(
                KUBELET_CLIENT,
                &request("admin", &["system:masters"], &[]),
                "system:bootstrap:a",
                &bootstrap,
                &client,
            ),
            csr(
                KUBELET_CLIENT,
                &request("system:node:x", &[NODES_GROUP, "system:masters"], &[]),
                "system:bootstrap:a",
                &bootstrap,
                &client,
            ),
            // Names on a client certificate.
            csr(
                KUBELET_CLIENT,
                &request("system:node:x", &[NODES_GROUP], &["x"]),
                "system:bootstrap:a",
                &bootstrap,
                &client,
            ),
            // Neither a Brink token nor the node itself.
            csr(
                KUBELET_CLIENT,
                &request("system:node:x", &[NODES_GROUP], &[]),
                "mallory",
                &["system:authenticated"],
                &client,
            ),
            // Server usage asked of the client signer.
            csr(
                KUBELET_CLIENT,
                &request("system:node:x", &[NODES_GROUP], &[]),
                "system:bootstrap:a",
                &bootstrap,
                &["server auth"],
            ),
            // A serving certificate for another name, or asked by someone else.
            csr(
                KUBELET_SERVING,
                &request("system:node:x", &[NODES_GROUP], &["kubernetes.default"]),
                "system:node:x",
                &[],
                &["digital signature", "server auth"],
            ),
            csr(
                KUBELET_SERVING,
                &request("system:node:x", &[NODES_GROUP], &["x"]),
                "system:node:y",
                &[],
                &["digital signature", "server auth"],
            ),
            // Garbage.
            csr(
                KUBELET_CLIENT,
                "not a request",
                "system:bootstrap:a",
                &bootstrap,
                &client,
            ),
            // Another signer.
            csr(
                "example.com/other",
                &request("system:node:x", &[NODES_GROUP], &[]),
                "system:bootstrap:a",
                &bootstrap,
                &client,
            ),
        ];
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(step(c, &ca, VALID, "now"), None, "case {i}");
        }
    }

    #[test]
    fn an_approved_request_of_the_wrong_shape_fails_rather_than_signs() {
        let ca = SiteCa::generate().expect("ca");
        let mut c = csr(
            KUBELET_CLIENT,
            &request("admin", &["system:masters"], &[]),
            "someone",
            &[],
            &["client auth"],
        );
        push_condition(&mut c, condition("Approved", "ByHand", "ok", "now"));
        let failed = step(&c, &ca, VALID, "now").expect("a verdict");
        assert!(failed["status"].get("certificate").is_none());
        assert_eq!(failed["status"]["conditions"][1]["type"], "Failed");
        assert_eq!(
            failed["status"]["conditions"][1]["reason"],
            "SignerValidationFailure"
        );
    }

    #[test]
    fn a_node_gets_a_serving_certificate_for_its_own_name_and_address() {
        let ca = SiteCa::generate().expect("ca");
        let pem = request(
            "system:node:shop-7",
            &[NODES_GROUP],
            &["shop-7", "10.0.0.7"],
        );
        let c = csr(
            KUBELET_SERVING,
            &pem,
            "system:node:shop-7",
            &["system:nodes"],
            &["digital signature", "key encipherment", "server auth"],
        );
        let approved = step(&c, &ca, VALID, "now").expect("approves");
        let signed = step(&approved, &ca, VALID, "now").expect("signs");
        assert!(signed["status"]["certificate"].is_string());
    }
}
