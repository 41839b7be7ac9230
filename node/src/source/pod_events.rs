//! The Events a kubelet writes about a pod's containers, read off the changes of its
//! status: `Started` when a container runs (again), `BackOff` when it waits in
//! CrashLoopBackOff or ImagePullBackOff, `Failed` when its image cannot be pulled or it
//! cannot be created, each with a kubelet's words, so `kubectl describe pod` shows them
//! after the scheduler's. Pure: what to say, not where it goes.

use k8s_openapi::api::core::v1::{ContainerStatus, PodStatus};

/// One Event to write: type (`Normal`/`Warning`), reason, message.
pub type PodEvent = (&'static str, &'static str, String);

fn waiting(c: &ContainerStatus) -> Option<(&str, &str)> {
    let w = c.state.as_ref()?.waiting.as_ref()?;
    Some((
        w.reason.as_deref().unwrap_or(""),
        w.message.as_deref().unwrap_or(""),
    ))
}

fn running(c: &ContainerStatus) -> bool {
    c.state.as_ref().is_some_and(|s| s.running.is_some())
}

/// The Events the change from `before` to `now` calls for.
pub fn transitions(pod: &str, before: Option<&PodStatus>, now: &PodStatus) -> Vec<PodEvent> {
    let previous = |name: &str| {
        before
            .and_then(|b| b.container_statuses.as_ref())
            .and_then(|l| l.iter().find(|c| c.name == name))
    };
    let mut events = Vec::new();
    for c in now.container_statuses.iter().flatten() {
        let was = previous(&c.name);
        let restarted = was.is_some_and(|w| w.restart_count != c.restart_count);
        if running(c) && (was.is_none_or(|w| !running(w)) || restarted) {
            events.push(("Normal", "Started", format!("Started container {}", c.name)));
        }
        let Some((reason, message)) = waiting(c) else {
            continue;
        };
        if was.and_then(waiting).is_some_and(|(r, _)| r == reason) {
            continue;
        }
        match reason {
            "CrashLoopBackOff" => events.push((
                "Warning",
                "BackOff",
                format!(
                    "Back-off restarting failed container {} in pod {pod}",
                    c.name
                ),
            )),
            "ImagePullBackOff" => events.push((
                "Warning",
                "BackOff",
                format!("Back-off pulling image {:?}", c.image),
            )),
            "ErrImagePull" => events.push((
                "Warning",
                "Failed",
                format!("Failed to pull image {:?}: {message}", c.image),
            )),
            "CreateContainerError" | "RunContainerError" => {
                events.push(("Warning", "Failed", format!("Error: {message}")))
            }
            _ => {}
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(state: serde_json::Value, restarts: i32) -> PodStatus {
        serde_json::from_value(json!({"containerStatuses": [
            {"name": "web", "image": "oci:x", "imageID": "", "ready": false, "restartCount": restarts, "state": state},
        ]}))
        .expect("status")
    }

    #[test]
    fn a_kubelet_says_started_backoff_and_failed_once_each() {
        let creating = status(json!({"waiting": {"reason": "ContainerCreating"}}), 0);
        let started = status(json!({"running": {}}), 0);
        assert!(transitions("p", None, &creating).is_empty());
        let events = transitions("p", Some(&creating), &started);
        assert_eq!(
            events,
            [("Normal", "Started", "Started container web".to_owned())]
        );
        assert!(transitions("p", Some(&started), &started).is_empty());
        let looping = status(
            json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}}),
            1,
        );
        let events = transitions("p", Some(&started), &looping);
        assert_eq!(events[0].1, "BackOff");
        assert!(
            events[0]
                .2
                .contains("restarting failed container web in pod p")
        );
        assert!(transitions("p", Some(&looping), &looping).is_empty());
        let again = status(json!({"running": {}}), 1);
        assert_eq!(transitions("p", Some(&looping), &again)[0].1, "Started");
        let pull = status(
            json!({"waiting": {"reason": "ErrImagePull", "message": "not found"}}),
            0,
        );
        let events = transitions("p", Some(&creating), &pull);
        assert_eq!(events[0].0, "Warning");
        assert!(events[0].2.contains("not found"));
    }
}
