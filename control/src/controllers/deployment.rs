//! The Deployment controller: one ReplicaSet per pod template (named and labelled by the
//! template's hash, `pod-template-hash`), scaled as the strategy says: RollingUpdate
//! (the new set grows by at most maxSurge above the replicas, old sets shrink while at
//! least replicas − maxUnavailable pods stay available) or Recreate (old sets to zero,
//! then the new one up). Revisions are numbered on the sets (`deployment.kubernetes.io/
//! revision`), so `kubectl rollout history|undo` work; at most revisionHistoryLimit old
//! empty sets are kept. Status carries the counts and the Available and Progressing
//! conditions `kubectl rollout status` reads.
//!
//! Not done (said here so nobody relies on it): proportional scaling of a rollout in
//! progress (a scale during a rollout lands on the new set), progressDeadlineSeconds
//! (no ProgressDeadlineExceeded), adoption of orphaned sets.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::{Resource as _, ResourceExt as _};
use serde_json::{Value, json};

use super::{ControllerSettings, ReconcileError, controller_uid, safe_hash};

pub const COMPONENT: &str = "deployment-controller";
pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const TEMPLATE_HASH: &str = "pod-template-hash";

struct Context {
    client: kube::Client,
    sets: Store<ReplicaSet>,
    settings: ControllerSettings,
}

/// Runs the Deployment controller until its watches end.
pub async fn run(client: kube::Client, settings: ControllerSettings) {
    let (sets, follower) = super::follow(Api::<ReplicaSet>::all(client.clone()), || {});
    if sets.wait_until_ready().await.is_err() {
        return;
    }
    let context = Arc::new(Context {
        client: client.clone(),
        sets,
        settings,
    });
    let controller = Controller::new(Api::<Deployment>::all(client.clone()), Default::default())
        .owns(Api::<ReplicaSet>::all(client), Default::default())
        .run(reconcile, super::retry_later, context);
    super::drive(controller, "deployment").await;
    follower.abort();
}

/// maxSurge and maxUnavailable as pod counts (surge rounds up, unavailability down;
/// both zero would never progress, so unavailability becomes one), as Kubernetes does.
pub fn surge_and_unavailable(
    replicas: i32,
    surge: Option<&IntOrString>,
    unavailable: Option<&IntOrString>,
) -> (i32, i32) {
    let resolve = |v: Option<&IntOrString>, round_up: bool| -> i32 {
        match v {
            None => {
                let quarter = f64::from(replicas) * 0.25;
                (if round_up {
                    quarter.ceil()
                } else {
                    quarter.floor()
                }) as i32
            }
            Some(IntOrString::Int(n)) => *n,
            Some(IntOrString::String(s)) => {
                let percent: f64 = s.trim_end_matches('%').parse().unwrap_or(25.0);
                let value = f64::from(replicas) * percent / 100.0;
                (if round_up {
                    value.ceil()
                } else {
                    value.floor()
                }) as i32
            }
        }
    };
    let surge = resolve(surge, true).max(0);
    let mut unavailable = resolve(unavailable, false).clamp(0, replicas.max(0));
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    (surge, unavailable)
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn available(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}

/// The hash that names a template's ReplicaSet.
pub fn template_hash(d: &Deployment) -> String {
    let template = d.spec.as_ref().map(|s| &s.template);
    let count = d
        .status
        .as_ref()
        .and_then(|s| s.collision_count)
        .unwrap_or(0);
    let mut bytes = serde_json::to_vec(&template).unwrap_or_default();
    bytes.extend(count.to_le_bytes());
    safe_hash(&bytes)
}

/// The ReplicaSet for `d`'s current template.
fn new_set(
    d: &Deployment,
    hash: &str,
    replicas: i32,
    revision: i64,
) -> Result<ReplicaSet, ReconcileError> {
    let spec = d
        .spec
        .clone()
        .ok_or_else(|| ReconcileError::Invalid("the Deployment has no spec".into()))?;
    let owner = d
        .controller_owner_ref(&())
        .ok_or_else(|| ReconcileError::Invalid("the Deployment has no name or uid".into()))?;
    let mut template = spec.template.clone();
    let mut labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    labels.insert(TEMPLATE_HASH.into(), hash.into());
    template
        .metadata
        .get_or_insert_with(Default::default)
        .labels = Some(labels.clone());
    let mut selector: LabelSelector = spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(BTreeMap::new)
        .insert(TEMPLATE_HASH.into(), hash.into());
    let annotations: BTreeMap<String, String> = [
        (REVISION.to_owned(), revision.to_string()),
        (
            "deployment.kubernetes.io/desired-replicas".to_owned(),
            spec.replicas.unwrap_or(1).to_string(),
        ),
    ]
    .into_iter()
    .collect();
    Ok(ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{}-{hash}", d.name_any())),
            namespace: d.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::apps::v1::ReplicaSetSpec {
            replicas: Some(replicas),
            min_ready_seconds: spec.min_ready_seconds,
            selector,
            template: Some(template),
        }),
        status: None,
    })
}

/// What a pass decides: each set's new replica count, by name.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub scale: BTreeMap<String, i32>,
}

/// The rolling update's next step over `new` and `old` (oldest first), as the
/// Kubernetes deployment controller computes it.
pub fn rolling(
    replicas: i32,
    surge: i32,
    unavailable: i32,
    new: &ReplicaSet,
    old: &[&ReplicaSet],
) -> Plan {
    let mut plan = Plan::default();
    let mut new_replicas = spec_replicas(new);
    let total: i32 = old.iter().map(|r| spec_replicas(r)).sum::<i32>() + new_replicas;
    if new_replicas < replicas {
        let max_total = replicas + surge;
        if total < max_total {
            new_replicas += (max_total - total).min(replicas - new_replicas);
        }
    } else if new_replicas > replicas {
        new_replicas = replicas;
    }
    if new_replicas != spec_replicas(new) {
        plan.scale.insert(new.name_any(), new_replicas);
    }
    // Old sets shrink only while enough pods stay available.
    let all: i32 = old.iter().map(|r| spec_replicas(r)).sum::<i32>() + new_replicas;
    let min_available = replicas - unavailable;
    let new_unavailable = (spec_replicas(new) - available(new)).max(0);
    let mut room = all - min_available - new_unavailable;
    if room <= 0 {
        return plan;
    }
    let mut counts: Vec<i32> = old.iter().map(|r| spec_replicas(r)).collect();
    // First the old pods that are not available anyway.
    for (i, rs) in old.iter().enumerate() {
        if room <= 0 {
            break;
        }
        let unhealthy = (counts[i] - available(rs)).max(0).min(room);
        counts[i] -= unhealthy;
        room -= unhealthy;
    }
    // Then available ones, as long as min_available holds.
    let available_now: i32 = old
        .iter()
        .map(|r| available(r).min(spec_replicas(r)))
        .sum::<i32>()
        + available(new);
    let mut can = (available_now - min_available).min(room);
    for (i, _) in old.iter().enumerate() {
        if can <= 0 {
            break;
        }
        let down = counts[i].min(can);
        counts[i] -= down;
        can -= down;
    }
    for (rs, count) in old.iter().zip(counts) {
        if count != spec_replicas(rs) {
            plan.scale.insert(rs.name_any(), count);
        }
    }
    plan
}

async fn scale(
    ctx: &Context,
    d: &Deployment,
    rs: &ReplicaSet,
    to: i32,
) -> Result<(), ReconcileError> {
    let from = spec_replicas(rs);
    let namespace = rs.namespace().unwrap_or_default();
    let sets: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({
        "metadata": {
            "uid": rs.uid(),
            "annotations": {"deployment.kubernetes.io/desired-replicas": d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).to_string()},
        },
        "spec": {"replicas": to},
    });
    let params = PatchParams {
        field_manager: Some(COMPONENT.into()),
        ..Default::default()
    };
    sets.patch(&rs.name_any(), &params, &Patch::Merge(patch))
        .await?;
    let (verb, what) = if to > from {
        ("up", "Scaled up")
    } else {
        ("down", "Scaled down")
    };
    tracing::info!(set = %rs.name_any(), from, to, "scaled {verb}");
    super::record(
        &ctx.client,
        COMPONENT,
        &d.object_ref(&()),
        "Normal",
        "ScalingReplicaSet",
        &format!("{what} replica set {} from {from} to {to}", rs.name_any()),
    )
    .await;
    Ok(())
}

fn condition(kind: &str, ok: bool, reason: &str, message: &str, previous: Option<&Value>) -> Value {
    let now = crate::apiserver::handler::now_rfc3339();
    let status = if ok { "True" } else { "False" };
    // The transition time moves only when the status does.
    let since = previous
        .filter(|p| p.get("status").and_then(Value::as_str) == Some(status))
        .and_then(|p| p.get("lastTransitionTime").cloned())
        .unwrap_or_else(|| json!(now));
    json!({"type": kind, "status": status, "reason": reason, "message": message,
           "lastUpdateTime": now, "lastTransitionTime": since})
}

async fn reconcile(d: Arc<Deployment>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let Some(spec) = d.spec.clone() else {
        return Ok(Action::await_change());
    };
    let namespace = d.namespace().unwrap_or_else(|| "default".into());
    let uid = d.uid().unwrap_or_default();
    let mut sets: Vec<Arc<ReplicaSet>> = ctx
        .sets
        .state()
        .into_iter()
        .filter(|rs| rs.namespace().as_deref() == Some(&namespace))
        .filter(|rs| controller_uid(&rs.metadata) == Some(&uid))
        .collect();
    sets.sort_by_key(|rs| {
        (
            revision(rs),
            rs.metadata.creation_timestamp.as_ref().map(|t| t.0),
        )
    });
    let hash = template_hash(&d);
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let max_revision = sets.iter().map(|rs| revision(rs)).max().unwrap_or(0);
    let new = sets
        .iter()
        .find(|rs| rs.labels().get(TEMPLATE_HASH) == Some(&hash))
        .cloned();
    let old: Vec<&ReplicaSet> = sets
        .iter()
        .filter(|rs| rs.labels().get(TEMPLATE_HASH) != Some(&hash))
        .map(|rs| rs.as_ref())
        .collect();
    let set_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &namespace);
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    let rolling_update = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.clone());
    let (surge, unavailable) = surge_and_unavailable(
        replicas,
        rolling_update.as_ref().and_then(|r| r.max_surge.as_ref()),
        rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.as_ref()),
    );
    let paused = spec.paused.unwrap_or(false);
    let Some(new) = new else {
        if paused {
            return Ok(Action::requeue(ctx.settings.resync));
        }
        // A new template: its set starts at what the strategy allows now.
        let old_total: i32 = old.iter().map(|rs| spec_replicas(rs)).sum();
        let start = if recreate {
            0
        } else {
            (replicas + surge - old_total).clamp(0, replicas)
        };
        let set = new_set(&d, &hash, start, max_revision + 1)?;
        match set_api.create(&PostParams::default(), &set).await {
            Ok(created) => {
                let message = format!(
                    "Scaled up replica set {} from 0 to {start}",
                    created.name_any()
                );
                super::record(
                    &ctx.client,
                    COMPONENT,
                    &d.object_ref(&()),
                    "Normal",
                    "ScalingReplicaSet",
                    &message,
                )
                .await;
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(Action::requeue(std::time::Duration::from_millis(200)));
    };
    // A template rolled back to is the newest revision again.
    if revision(&new) < max_revision || revision(&new) == 0 {
        let patch =
            json!({"metadata": {"annotations": {REVISION: (max_revision + 1).max(1).to_string()}}});
        set_api
            .patch(
                &new.name_any(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await?;
    }
    if !paused {
        if recreate {
            let old_running: i32 = old
                .iter()
                .map(|rs| rs.status.as_ref().map_or(0, |s| s.replicas))
                .sum();
            for rs in &old {
                if spec_replicas(rs) > 0 {
                    scale(&ctx, &d, rs, 0).await?;
                }
            }
            if old_running == 0
                && old.iter().all(|rs| spec_replicas(rs) == 0)
                && spec_replicas(&new) != replicas
            {
                scale(&ctx, &d, &new, replicas).await?;
            }
        } else {
            let plan = rolling(replicas, surge, unavailable, &new, &old);
            for (name, to) in &plan.scale {
                if let Some(rs) = sets.iter().find(|rs| rs.name_any() == *name) {
                    scale(&ctx, &d, rs, *to).await?;
                }
            }
        }
        // Revision history: the oldest empty sets beyond the limit go.
        let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
        let empty: Vec<&&ReplicaSet> = old
            .iter()
            .filter(|rs| {
                spec_replicas(rs) == 0 && rs.status.as_ref().is_none_or(|s| s.replicas == 0)
            })
            .collect();
        for rs in empty.iter().take(empty.len().saturating_sub(limit)) {
            let params = DeleteParams::default();
            match set_api.delete(&rs.name_any(), &params).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    // Status from the sets as the watch last saw them.
    let count = |f: fn(&ReplicaSet) -> i32| sets.iter().map(|rs| f(rs)).sum::<i32>();
    let total = count(|rs| rs.status.as_ref().map_or(0, |s| s.replicas));
    let ready = count(|rs| {
        rs.status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
    });
    let available_total = count(available);
    let updated = new.status.as_ref().map_or(0, |s| s.replicas);
    let complete = updated == replicas
        && total == replicas
        && available_total == replicas
        && spec_replicas(&new) == replicas;
    let previous = |kind: &str| -> Option<Value> {
        let conditions = serde_json::to_value(d.status.as_ref()?.conditions.as_ref()?).ok()?;
        conditions
            .as_array()?
            .iter()
            .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
            .cloned()
    };
    let available_ok = available_total >= replicas - unavailable;
    let available_condition = if available_ok {
        condition(
            "Available",
            true,
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.",
            previous("Available").as_ref(),
        )
    } else {
        condition(
            "Available",
            false,
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.",
            previous("Available").as_ref(),
        )
    };
    let progressing = if complete {
        condition(
            "Progressing",
            true,
            "NewReplicaSetAvailable",
            &format!(
                "ReplicaSet {:?} has successfully progressed.",
                new.name_any()
            ),
            previous("Progressing").as_ref(),
        )
    } else {
        condition(
            "Progressing",
            true,
            "ReplicaSetUpdated",
            &format!("ReplicaSet {:?} is progressing.", new.name_any()),
            previous("Progressing").as_ref(),
        )
    };
    let status = json!({
        "observedGeneration": d.metadata.generation,
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available_total,
        "unavailableReplicas": (replicas - available_total).max(0),
    });
    let current = d.status.as_ref().map(|s| {
        json!({
            "observedGeneration": s.observed_generation,
            "replicas": s.replicas.unwrap_or(0),
            "updatedReplicas": s.updated_replicas.unwrap_or(0),
            "readyReplicas": s.ready_replicas.unwrap_or(0),
            "availableReplicas": s.available_replicas.unwrap_or(0),
            "unavailableReplicas": s.unavailable_replicas.unwrap_or(0),
        })
    });
    let reasons_changed = |kind: &str, now: &Value| {
        previous(kind).is_none_or(|p| {
            p.get("reason") != now.get("reason") || p.get("status") != now.get("status")
        })
    };
    if current.as_ref() != Some(&status)
        || reasons_changed("Available", &available_condition)
        || reasons_changed("Progressing", &progressing)
    {
        let mut status = status;
        status["conditions"] = json!([available_condition, progressing]);
        let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
        super::write_status(&deployments, &d.name_any(), &uid, COMPONENT, status).await?;
    }
    // The deployment carries its newest revision, as Kubernetes' does.
    let newest = revision(&new).max(max_revision).to_string();
    if d.annotations().get(REVISION) != Some(&newest) {
        let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({"metadata": {"annotations": {REVISION: newest}}});
        deployments
            .patch(&d.name_any(), &PatchParams::default(), &Patch::Merge(patch))
            .await?;
    }
    Ok(Action::requeue(if complete {
        ctx.settings.resync
    } else {
        ctx.settings.settle
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, replicas: i32, available: i32) -> ReplicaSet {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {}},
            "status": {"replicas": replicas, "availableReplicas": available},
        }))
        .expect("rs")
    }

    #[test]
    fn surge_and_unavailability_round_as_kubernetes_does() {
        assert_eq!(surge_and_unavailable(4, None, None), (1, 1));
        assert_eq!(surge_and_unavailable(10, None, None), (3, 2));
        let pct = |s: &str| IntOrString::String(s.into());
        assert_eq!(
            surge_and_unavailable(3, Some(&pct("50%")), Some(&pct("0%"))),
            (2, 0)
        );
        assert_eq!(
            surge_and_unavailable(3, Some(&IntOrString::Int(0)), Some(&IntOrString::Int(0))),
            (0, 1)
        );
    }

    #[test]
    fn a_rolling_update_walks_from_old_to_new_without_losing_availability() {
        // 4 replicas, surge 1, unavailable 1.
        let old = set("old", 4, 4);
        let new = set("new", 0, 0);
        let plan = rolling(4, 1, 1, &new, &[&old]);
        // Up by the surge, down by what stays available: 5 at most, 3 at least.
        assert_eq!(plan.scale.get("new"), Some(&1));
        assert_eq!(plan.scale.get("old"), Some(&3));
        // New pods not yet available: old ones wait.
        let old = set("old", 3, 3);
        let new = set("new", 2, 0);
        let plan = rolling(4, 1, 1, &new, &[&old]);
        assert_eq!(plan.scale.get("old"), None, "{plan:?}");
        // New pods available: the old set goes on down.
        let new = set("new", 2, 2);
        let plan = rolling(4, 1, 1, &new, &[&old]);
        assert_eq!(plan.scale.get("new"), None);
        assert_eq!(plan.scale.get("old"), Some(&1), "{plan:?}");
        // Finished: nothing to do.
        let new = set("new", 4, 4);
        let done = set("old", 0, 0);
        assert_eq!(rolling(4, 1, 1, &new, &[&done]), Plan::default());
        // Scaled: only the new set moves.
        assert_eq!(rolling(6, 2, 1, &new, &[&done]).scale.get("new"), Some(&6));
        assert_eq!(rolling(2, 1, 0, &new, &[&done]).scale.get("new"), Some(&2));
    }

    #[test]
    fn broken_old_pods_go_first() {
        // Old pods that are not available can go at once, even below min availability.
        let old = set("old", 4, 0);
        let new = set("new", 1, 1);
        let plan = rolling(4, 1, 1, &new, &[&old]);
        assert_eq!(plan.scale.get("old"), Some(&2), "{plan:?}");
    }

    #[test]
    fn a_template_names_its_set() {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "d-1"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": "a"}]}}},
        }))
        .expect("deployment");
        let hash = template_hash(&d);
        let rs = new_set(&d, &hash, 1, 1).expect("set");
        assert_eq!(rs.name_any(), format!("web-{hash}"));
        assert_eq!(rs.labels().get(TEMPLATE_HASH), Some(&hash));
        assert_eq!(
            rs.annotations().get(REVISION).map(String::as_str),
            Some("1")
        );
        let selector = &rs.spec.as_ref().expect("spec").selector;
        assert_eq!(
            selector
                .match_labels
                .as_ref()
                .and_then(|m| m.get(TEMPLATE_HASH)),
            Some(&hash)
        );
        let mut changed = d.clone();
        if let Some(spec) = changed.spec.as_mut()
            && let Some(pod) = spec.template.spec.as_mut()
        {
            pod.containers[0].image = Some("b".into());
        }
        assert_ne!(template_hash(&changed), hash);
    }
}
