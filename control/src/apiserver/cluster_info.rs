//! `kube-public/cluster-info`: what a joining node may read before it trusts anything
//! (the site's CA and API address, as a kubeconfig), and the bootstrap signer's
//! signatures over it, one `jws-kubeconfig-<id>` per token that allows signing. A node
//! checks the signature with its token and the CA with its pin: kubeadm's token
//! discovery. Anyone may read this one object (kube-apiserver's anonymous access, here
//! limited to it); everything else still needs credentials.
//!
//! Owns the object's content and its signatures ([`signed`], pure; [`sweep`] on the
//! leader); must not touch other objects.

use std::sync::Arc;

use base64::Engine as _;
use serde_json::{Value, json};

use super::ApiState;
use super::auth::StoredToken;
use crate::store::{Applied, Command, Op};

/// The one path an anonymous client may GET.
pub const PATH: &str = "/api/v1/namespaces/kube-public/configmaps/cluster-info";
const NAMESPACE: &str = "kube-public";
const NAME: &str = "cluster-info";
/// The Role and RoleBinding that let anonymous clients read it (kubeadm's names).
const READER: &str = "kubeadm:bootstrap-signer-clusterinfo";

/// The kubeconfig cluster-info carries: the CA and the API's address, nothing secret.
pub fn kubeconfig(ca_pem: &str, server: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: {ca}\n    server: https://{server}\n  name: \"\"\ncontexts: null\ncurrent-context: \"\"\nkind: Config\npreferences: {{}}\nusers: null\n"
    )
}

/// The ConfigMap (unsigned) and the RBAC that lets anyone read it, by storage key.
pub fn bootstrap_objects(ca_pem: &str, server: &str) -> Vec<(String, Value)> {
    vec![
        (
            format!("/registry/core/configmaps/{NAMESPACE}/{NAME}"),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": NAME, "namespace": NAMESPACE},
                   "data": {"kubeconfig": kubeconfig(ca_pem, server)}}),
        ),
        (
            format!("/registry/rbac.authorization.k8s.io/roles/{NAMESPACE}/{READER}"),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": {"name": READER, "namespace": NAMESPACE},
                   "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                              "resourceNames": [NAME], "verbs": ["get"]}]}),
        ),
        (
            format!("/registry/rbac.authorization.k8s.io/rolebindings/{NAMESPACE}/{READER}"),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": READER, "namespace": NAMESPACE},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": READER},
                   "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                                 "name": "system:anonymous"}]}),
        ),
    ]
}

/// cluster-info with exactly the signatures the tokens call for (a signature for each
/// unexpired token that allows signing, no others); None when it already has them.
pub fn signed(cluster_info: &Value, tokens: &[StoredToken]) -> Option<Value> {
    let payload = cluster_info.pointer("/data/kubeconfig")?.as_str()?;
    let mut data = serde_json::Map::new();
    data.insert("kubeconfig".into(), json!(payload));
    for t in tokens.iter().filter(|t| t.signing) {
        data.insert(
            brink_proto::bootstrap::signature_key(&t.token.id),
            json!(brink_proto::bootstrap::sign_detached(payload, &t.token)),
        );
    }
    // Other keys an operator added stay.
    if let Some(old) = cluster_info.get("data").and_then(Value::as_object) {
        for (k, v) in old {
            if !k.starts_with("jws-kubeconfig-") && !data.contains_key(k) {
                data.insert(k.clone(), v.clone());
            }
        }
    }
    let data = Value::Object(data);
    if cluster_info.get("data") == Some(&data) {
        return None;
    }
    let mut next = cluster_info.clone();
    next["data"] = data;
    Some(next)
}

/// One sweep on the leader: re-signs cluster-info when the tokens changed.
pub async fn sweep(state: &Arc<ApiState>) {
    let (Some(configmaps), Some(secrets)) = (
        super::kinds::find("", "v1", "configmaps"),
        super::kinds::find("", "v1", "secrets"),
    ) else {
        return;
    };
    let key = configmaps.key(Some(NAMESPACE), NAME);
    let Some(current) = state.cache.get(&key) else {
        return;
    };
    let now = jiff::Timestamp::now();
    let tokens: Vec<StoredToken> = state
        .cache
        .list(&secrets.prefix(Some("kube-system")))
        .0
        .iter()
        .filter_map(|s| StoredToken::read(s, now))
        .collect();
    let Some(mut next) = signed(&current, &tokens) else {
        return;
    };
    let expect = current
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .and_then(|r| r.parse().ok());
    if let Some(m) = next.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    let Ok(data) = serde_json::to_vec(&next) else {
        return;
    };
    let op = Op::Update {
        key: key.into_bytes(),
        data,
        expect_mod: expect,
    };
    match state.replica.propose(Command { ops: vec![op] }).await {
        Ok(Applied::Done { .. }) => tracing::info!(tokens = tokens.len(), "cluster-info signed"),
        Ok(_) => tracing::debug!("cluster-info: lost a race; next sweep"),
        Err(e) => tracing::debug!(error = %e, "cluster-info: write failed; next sweep"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use brink_proto::bootstrap::{BootstrapToken, verify_detached};

    fn stored(text: &str, signing: bool) -> StoredToken {
        StoredToken {
            token: BootstrapToken::parse(text).expect("token"),
            authentication: true,
            signing,
            extra_groups: String::new(),
        }
    }

    #[test]
    fn each_signing_token_signs_the_kubeconfig_and_no_other_stays() {
        let (_, info) = bootstrap_objects("PEM", "10.0.0.1:6443").remove(0);
        let payload = info["data"]["kubeconfig"]
            .as_str()
            .expect("kubeconfig")
            .to_owned();
        assert!(
            payload.contains("server: https://10.0.0.1:6443"),
            "{payload}"
        );
        let a = stored("aaaaaa.0123456789abcdef", true);
        let b = stored("bbbbbb.0123456789abcdef", false);
        let once = signed(&info, &[a, b]).expect("signs");
        let jws = once["data"]["jws-kubeconfig-aaaaaa"]
            .as_str()
            .expect("signature");
        assert!(verify_detached(
            jws,
            &payload,
            &BootstrapToken::parse("aaaaaa.0123456789abcdef").expect("t")
        ));
        assert!(
            once["data"].get("jws-kubeconfig-bbbbbb").is_none(),
            "not for signing"
        );
        assert_eq!(
            signed(&once, &[stored("aaaaaa.0123456789abcdef", true)]),
            None,
            "settled"
        );
        // The token goes: so does its signature.
        let gone = signed(&once, &[]).expect("unsigns");
        assert_eq!(gone["data"].as_object().map(|d| d.len()), Some(1));
    }
}
