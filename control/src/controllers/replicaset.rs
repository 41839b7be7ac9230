//! The ReplicaSet controller: keeps `spec.replicas` active pods made from the template,
//! owned (controller reference) by the ReplicaSet, and reports their counts in status.
//! Pods it has created or deleted and its watch has not shown yet are counted as
//! expected (kube's expectations), so a quick second reconcile does not make twice as
//! many. Surplus pods go in kube's order: unscheduled, then pending, then not ready,
//! then the newest.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::{Resource as _, ResourceExt as _};
use serde_json::json;

use super::{ControllerSettings, ReconcileError, is_active, is_available};

/// The component name on its Events.
pub const COMPONENT: &str = "replicaset-controller";

struct Context {
    client: kube::Client,
    pods: Store<Pod>,
    settings: ControllerSettings,
    /// By ReplicaSet uid.
    expectations: super::Expectations,
}

/// Runs the ReplicaSet controller until its watches end.
pub async fn run(client: kube::Client, settings: ControllerSettings) {
    let Some((pods, follower)) = super::pod_store(&client).await else {
        return;
    };
    let context = Arc::new(Context {
        client: client.clone(),
        pods,
        settings,
        expectations: Default::default(),
    });
    let controller = Controller::new(Api::<ReplicaSet>::all(client.clone()), Default::default())
        .owns(Api::<Pod>::all(client), Default::default())
        .run(reconcile, super::retry_later, context);
    super::drive(controller, "replicaset").await;
    follower.abort();
}

/// The order surplus pods are deleted in: smaller goes first.
fn deletion_rank(
    pod: &Pod,
) -> (
    bool,
    u8,
    bool,
    std::cmp::Reverse<Option<k8s_openapi::jiff::Timestamp>>,
) {
    let scheduled = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty());
    let phase = match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Pending") | None => 0,
        Some("Running") => 2,
        _ => 1,
    };
    let ready = super::ready_since(pod).is_some();
    let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
    (scheduled, phase, ready, std::cmp::Reverse(created))
}

async fn reconcile(rs: Arc<ReplicaSet>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    if rs.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = rs.namespace().unwrap_or_else(|| "default".into());
    let uid = rs.uid().unwrap_or_default();
    let owned = super::owned_pods(&ctx.pods, &namespace, &uid);
    let active: Vec<&Arc<Pod>> = owned.iter().filter(|p| is_active(p)).collect();
    let seen: BTreeSet<String> = owned.iter().map(|p| p.name_any()).collect();
    let live: BTreeSet<String> = active.iter().map(|p| p.name_any()).collect();
    let (expected_creates, expected_deletes) =
        ctx.expectations
            .settle(&uid, &seen, &live, ctx.settings.expectation_timeout);
    let counted = active
        .iter()
        .filter(|p| !expected_deletes.contains(&p.name_any()))
        .count()
        + expected_creates;
    let want = rs
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1)
        .max(0) as usize;
    let reference = rs.object_ref(&());
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    if counted < want {
        let template = super::pod_from_template(
            rs.as_ref(),
            rs.spec.as_ref().and_then(|s| s.template.clone()),
        )?;
        let n = (want - counted).min(ctx.settings.burst);
        let results = futures::stream::iter(0..n)
            .map(|_| {
                let (pods, template) = (pods.clone(), template.clone());
                async move { pods.create(&PostParams::default(), &template).await }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        for result in results {
            match result {
                Ok(pod) => {
                    let name = pod.name_any();
                    ctx.expectations.created(&uid, &name);
                    super::record(
                        &ctx.client,
                        COMPONENT,
                        &reference,
                        "Normal",
                        "SuccessfulCreate",
                        &format!("Created pod: {name}"),
                    )
                    .await;
                }
                Err(e) => {
                    super::record(
                        &ctx.client,
                        COMPONENT,
                        &reference,
                        "Warning",
                        "FailedCreate",
                        &format!("Error creating: {e}"),
                    )
                    .await;
                    return Err(e.into());
                }
            }
        }
    } else if counted > want {
        let mut victims: Vec<&Arc<Pod>> = active
            .iter()
            .copied()
            .filter(|p| !expected_deletes.contains(&p.name_any()))
            .collect();
        victims.sort_by_key(|p| deletion_rank(p));
        for pod in victims
            .into_iter()
            .take((counted - want).min(ctx.settings.burst))
        {
            let name = pod.name_any();
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: pod.uid(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match pods.delete(&name, &params).await {
                Ok(_) => {
                    ctx.expectations.deleted(&uid, &name);
                    super::record(
                        &ctx.client,
                        COMPONENT,
                        &reference,
                        "Normal",
                        "SuccessfulDelete",
                        &format!("Deleted pod: {name}"),
                    )
                    .await;
                }
                Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    // Status, written only when it changed.
    let min_ready = rs
        .spec
        .as_ref()
        .and_then(|s| s.min_ready_seconds)
        .unwrap_or(0);
    let now = k8s_openapi::jiff::Timestamp::now();
    let selector = rs
        .spec
        .as_ref()
        .map(|s| s.selector.clone())
        .unwrap_or_default();
    let ready = active
        .iter()
        .filter(|p| super::ready_since(p).is_some())
        .count();
    let available = active
        .iter()
        .filter(|p| is_available(p, min_ready, now))
        .count();
    let labelled = active
        .iter()
        .filter(|p| super::selector_matches(&selector, &p.labels().clone()))
        .count();
    let status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": labelled,
        "readyReplicas": ready,
        "availableReplicas": available,
        "observedGeneration": rs.metadata.generation,
    });
    let current = rs.status.as_ref().map(|s| {
        json!({
            "replicas": s.replicas,
            "fullyLabeledReplicas": s.fully_labeled_replicas.unwrap_or(0),
            "readyReplicas": s.ready_replicas.unwrap_or(0),
            "availableReplicas": s.available_replicas.unwrap_or(0),
            "observedGeneration": s.observed_generation,
        })
    });
    if current.as_ref() != Some(&status) {
        let sets: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &namespace);
        super::write_status(&sets, &rs.name_any(), &uid, COMPONENT, status).await?;
    }
    // Until every wanted pod is there and available (pods that are ready become
    // available after minReadySeconds), look again soon.
    let settled = counted == want && expected_creates == 0 && expected_deletes.is_empty();
    if !settled || available < want {
        return Ok(Action::requeue(ctx.settings.settle));
    }
    Ok(Action::requeue(ctx.settings.resync))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(node: Option<&str>, phase: &str, ready: bool, created: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "creationTimestamp": created},
            "spec": {"containers": [], "nodeName": node},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        }))
        .expect("pod")
    }

    #[test]
    fn surplus_pods_go_unscheduled_pending_unready_newest_first() {
        let old_ready = pod(Some("n"), "Running", true, "2026-01-01T00:00:00Z");
        let new_ready = pod(Some("n"), "Running", true, "2026-01-02T00:00:00Z");
        let unready = pod(Some("n"), "Running", false, "2026-01-01T00:00:00Z");
        let pending = pod(Some("n"), "Pending", false, "2026-01-01T00:00:00Z");
        let unscheduled = pod(None, "Pending", false, "2026-01-01T00:00:00Z");
        let ranks: Vec<_> = [&unscheduled, &pending, &unready, &new_ready, &old_ready]
            .into_iter()
            .map(deletion_rank)
            .collect();
        assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{ranks:?}");
    }

    #[test]
    fn pods_come_from_the_template_and_name_their_owner() {
        let rs: ReplicaSet = serde_json::from_value(json!({
            "metadata": {"name": "web-abc", "namespace": "shop", "uid": "rs-1"},
            "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}}},
        }))
        .expect("rs");
        let pod = crate::controllers::pod_from_template(
            &rs,
            rs.spec.as_ref().and_then(|s| s.template.clone()),
        )
        .expect("pod");
        assert_eq!(pod.metadata.generate_name.as_deref(), Some("web-abc-"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(
            crate::controllers::controller_uid(&pod.metadata),
            Some("rs-1")
        );
        assert_eq!(pod.labels().get("app").map(String::as_str), Some("web"));
        let bare: ReplicaSet = serde_json::from_value(
            json!({"metadata": {"name": "x", "uid": "u"}, "spec": {"selector": {}}}),
        )
        .expect("rs");
        assert!(
            crate::controllers::pod_from_template(
                &bare,
                bare.spec.as_ref().and_then(|s| s.template.clone())
            )
            .is_err()
        );
    }
}
