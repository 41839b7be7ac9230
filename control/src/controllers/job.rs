//! The Job controller: runs pods from the template until `completions` have succeeded,
//! at most `parallelism` at a time, and gives up once more than `backoffLimit` have
//! failed (with restartPolicy OnFailure a failure is a container restart), as the
//! Kubernetes Job controller does for NonIndexed jobs. Status carries active,
//! succeeded, failed, ready, start and completion times and the Complete or Failed
//! condition (with SuccessCriteriaMet or FailureTarget first, as Kubernetes 1.31+
//! writes them) that `kubectl wait --for=condition=complete` reads.
//!
//! Not done (said here): Indexed completion mode, pod failure policies, backoff delays
//! between failed pods, activeDeadlineSeconds, ttlSecondsAfterFinished, suspend.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::{Resource as _, ResourceExt as _};
use serde_json::{Value, json};

use super::{ControllerSettings, ReconcileError, is_active};

pub const COMPONENT: &str = "job-controller";

struct Context {
    client: kube::Client,
    pods: Store<Pod>,
    settings: ControllerSettings,
    expectations: super::Expectations,
}

/// Runs the Job controller until its watches end.
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
    let controller = Controller::new(Api::<Job>::all(client.clone()), Default::default())
        .owns(Api::<Pod>::all(client), Default::default())
        .run(reconcile, super::retry_later, context);
    super::drive(controller, "job").await;
    follower.abort();
}

/// Where a Job stands, from its pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub active: usize,
    pub ready: usize,
    pub succeeded: usize,
    /// Failed pods, plus container restarts under restartPolicy OnFailure.
    pub failed: usize,
}

pub fn count(pods: &[&Pod]) -> Counts {
    let phase = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default()
    };
    let restarts: usize = pods
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.restart_policy.as_deref()) == Some("OnFailure"))
        .flat_map(|p| {
            p.status
                .iter()
                .flat_map(|s| s.container_statuses.iter().flatten())
        })
        .map(|c| c.restart_count.max(0) as usize)
        .sum();
    Counts {
        active: pods.iter().filter(|p| is_active(p)).count(),
        ready: pods
            .iter()
            .filter(|p| is_active(p) && super::ready_since(p).is_some())
            .count(),
        succeeded: pods.iter().filter(|p| phase(p) == "Succeeded").count(),
        failed: pods.iter().filter(|p| phase(p) == "Failed").count() + restarts,
    }
}

/// What the Job should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Start this many more pods.
    Start(usize),
    /// Done: every completion succeeded.
    Complete,
    /// Given up: more failures than backoffLimit.
    Fail,
    Wait,
}

pub fn step(completions: usize, parallelism: usize, backoff_limit: usize, c: Counts) -> Step {
    if c.succeeded >= completions {
        return Step::Complete;
    }
    if c.failed > backoff_limit {
        return Step::Fail;
    }
    let wanted = parallelism.min(completions - c.succeeded);
    if c.active < wanted {
        Step::Start(wanted - c.active)
    } else {
        Step::Wait
    }
}

fn condition(kind: &str, reason: &str, message: &str) -> Value {
    let now = crate::apiserver::handler::now_rfc3339();
    json!({"type": kind, "status": "True", "reason": reason, "message": message,
           "lastProbeTime": now, "lastTransitionTime": now})
}

async fn reconcile(job: Arc<Job>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let finished = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| matches!(c.type_.as_str(), "Complete" | "Failed") && c.status == "True")
        });
    if finished {
        return Ok(Action::await_change());
    }
    let Some(spec) = job.spec.clone() else {
        return Ok(Action::await_change());
    };
    let namespace = job.namespace().unwrap_or_else(|| "default".into());
    let uid = job.uid().unwrap_or_default();
    let state = super::owned_pods(&ctx.pods, &namespace, &uid);
    let owned: Vec<&Pod> = state.iter().map(|p| p.as_ref()).collect();
    let counts = count(&owned);
    let seen: BTreeSet<String> = owned.iter().map(|p| p.name_any()).collect();
    let live: BTreeSet<String> = owned
        .iter()
        .filter(|p| is_active(p))
        .map(|p| p.name_any())
        .collect();
    let (expected, _) =
        ctx.expectations
            .settle(&uid, &seen, &live, ctx.settings.expectation_timeout);
    let completions = spec.completions.unwrap_or(1).max(0) as usize;
    let parallelism = spec.parallelism.unwrap_or(1).max(0) as usize;
    let backoff_limit = spec.backoff_limit.unwrap_or(6).max(0) as usize;
    let counted = Counts {
        active: counts.active + expected,
        ..counts
    };
    let reference = job.object_ref(&());
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut conditions: Vec<Value> = Vec::new();
    let now = crate::apiserver::handler::now_rfc3339();
    let mut completion_time = None;
    match step(completions, parallelism, backoff_limit, counted) {
        Step::Start(n) => {
            let template = super::pod_from_template(
                job.as_ref(),
                job.spec.as_ref().map(|s| s.template.clone()),
            )?;
            for _ in 0..n.min(ctx.settings.burst) {
                match pods.create(&PostParams::default(), &template).await {
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
        }
        Step::Complete => {
            completion_time = Some(now.clone());
            conditions.push(condition(
                "SuccessCriteriaMet",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
            ));
            conditions.push(condition(
                "Complete",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
            ));
            super::record(
                &ctx.client,
                COMPONENT,
                &reference,
                "Normal",
                "Completed",
                "Job completed",
            )
            .await;
        }
        Step::Fail => {
            // The pods still running go: the Job has failed.
            for pod in owned.iter().filter(|p| is_active(p)) {
                match pods.delete(&pod.name_any(), &DeleteParams::default()).await {
                    Ok(_) | Err(kube::Error::Api(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let message = "Job has reached the specified backoff limit";
            conditions.push(condition("FailureTarget", "BackoffLimitExceeded", message));
            conditions.push(condition("Failed", "BackoffLimitExceeded", message));
            super::record(
                &ctx.client,
                COMPONENT,
                &reference,
                "Warning",
                "BackoffLimitExceeded",
                message,
            )
            .await;
        }
        Step::Wait => {}
    }
    let start_time = job
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .and_then(|t| serde_json::to_value(t).ok())
        .unwrap_or_else(|| json!(now));
    let mut status = json!({
        "active": if conditions.is_empty() { counts.active } else { 0 },
        "ready": counts.ready,
        "succeeded": counts.succeeded,
        "failed": counts.failed,
        "startTime": start_time,
    });
    if !conditions.is_empty() {
        status["conditions"] = json!(conditions);
    }
    if let Some(at) = completion_time {
        status["completionTime"] = json!(at);
    }
    let current = job.status.as_ref().map(|s| {
        json!({
            "active": s.active.unwrap_or(0),
            "ready": s.ready.unwrap_or(0),
            "succeeded": s.succeeded.unwrap_or(0),
            "failed": s.failed.unwrap_or(0),
            "startTime": start_time,
        })
    });
    if current.as_ref() != Some(&status) {
        let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
        super::write_status(&jobs, &job.name_any(), &uid, COMPONENT, status).await?;
    }
    Ok(Action::requeue(ctx.settings.settle))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(active: usize, succeeded: usize, failed: usize) -> Counts {
        Counts {
            active,
            ready: 0,
            succeeded,
            failed,
        }
    }

    #[test]
    fn a_job_runs_parallelism_pods_until_completions_succeed() {
        assert_eq!(step(1, 1, 6, counts(0, 0, 0)), Step::Start(1));
        assert_eq!(step(5, 2, 6, counts(0, 0, 0)), Step::Start(2));
        assert_eq!(step(5, 2, 6, counts(2, 0, 0)), Step::Wait);
        assert_eq!(step(5, 2, 6, counts(1, 3, 0)), Step::Start(1));
        assert_eq!(step(5, 2, 6, counts(1, 4, 0)), Step::Wait);
        assert_eq!(step(5, 3, 6, counts(0, 4, 0)), Step::Start(1));
        assert_eq!(step(5, 2, 6, counts(0, 5, 0)), Step::Complete);
    }

    #[test]
    fn more_failures_than_the_backoff_limit_fail_it() {
        assert_eq!(step(1, 1, 2, counts(0, 0, 2)), Step::Start(1));
        assert_eq!(step(1, 1, 2, counts(0, 0, 3)), Step::Fail);
        assert_eq!(step(1, 1, 0, counts(0, 0, 1)), Step::Fail);
    }

    #[test]
    fn restarts_under_on_failure_count_as_failures() {
        let pod = |policy: &str, phase: &str, restarts: i32| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "p"},
                "spec": {"restartPolicy": policy, "containers": []},
                "status": {"phase": phase, "containerStatuses": [{"name": "c", "image": "", "imageID": "", "ready": false, "restartCount": restarts}]},
            }))
            .expect("pod")
        };
        let a = pod("OnFailure", "Running", 2);
        let b = pod("Never", "Failed", 0);
        let c = pod("Never", "Succeeded", 0);
        let d = pod("Never", "Running", 5);
        assert_eq!(
            count(&[&a, &b, &c, &d]),
            Counts {
                active: 2,
                ready: 0,
                succeeded: 1,
                failed: 3
            }
        );
    }
}
