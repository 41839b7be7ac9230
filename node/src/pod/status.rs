//! What the node knows about a pod and its containers, and its Kubernetes-shaped
//! `PodStatus` (phase, conditions, containerStatuses with state, lastState, restartCount and
//! imageID). Only the pod's worker writes a record; readers take snapshots.

use k8s_openapi::api::core::v1::{
    ContainerState as K8sState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// Kubernetes pod phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl PodPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            PodPhase::Pending => "Pending",
            PodPhase::Running => "Running",
            PodPhase::Succeeded => "Succeeded",
            PodPhase::Failed => "Failed",
        }
    }
}

/// How a container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminated {
    pub exit_code: i32,
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
}

/// A container's state, as Kubernetes names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
    },
    Terminated(Terminated),
}

#[derive(Debug, Clone)]
pub struct ContainerRecord {
    pub name: String,
    pub image: String,
    pub image_id: String,
    pub state: ContainerState,
    pub last_state: Option<Terminated>,
    pub restart_count: i32,
    pub ready: bool,
    /// True when this container will not be started again (its restart policy says so).
    pub finished: bool,
}

/// Everything the node reports about one pod.
#[derive(Debug, Clone)]
pub struct PodRecord {
    /// The pod as its source gave it, with uid and nodeName filled in.
    pub pod: Pod,
    pub containers: Vec<ContainerRecord>,
    pub start_time: Timestamp,
    pub host_ip: String,
    /// Set once pulls and preparation are done (no init containers yet).
    pub initialized_at: Option<Timestamp>,
    /// When the pod reached its current readiness.
    pub ready_since: Timestamp,
    /// Why the node refused to run the pod at all (reason, message), as a kubelet's
    /// admission failure: the pod is Failed with this reason.
    pub rejected: Option<(String, String)>,
}

impl PodRecord {
    /// A new record for `pod`. A status the pod already carries (an API pod, after the
    /// agent restarted) is taken up: restart counts and start time go on, and a pod that
    /// had finished stays finished instead of running again.
    pub fn new(mut pod: Pod, host_ip: String) -> Self {
        let previous = pod.status.take();
        let mut record = Self::fresh(pod, host_ip);
        if let Some(previous) = &previous {
            record.resume(previous);
        }
        record
    }

    fn fresh(pod: Pod, host_ip: String) -> Self {
        let now = Timestamp::now();
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|c| ContainerRecord {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                image_id: String::new(),
                state: ContainerState::Waiting {
                    reason: "ContainerCreating".into(),
                    message: None,
                },
                last_state: None,
                restart_count: 0,
                ready: false,
                finished: false,
            })
            .collect();
        Self {
            pod,
            containers,
            start_time: now,
            host_ip,
            initialized_at: None,
            ready_since: now,
            rejected: None,
        }
    }

    fn resume(&mut self, previous: &PodStatus) {
        let time = |t: &Option<Time>| t.as_ref().map(|t| t.0);
        if let Some(start) = time(&previous.start_time) {
            self.start_time = start;
            self.ready_since = start;
        }
        let phase = previous.phase.as_deref().unwrap_or_default();
        let terminal = matches!(phase, "Succeeded" | "Failed");
        let statuses = previous.container_statuses.as_deref().unwrap_or_default();
        let mut ended = 0;
        for c in &mut self.containers {
            let Some(status) = statuses.iter().find(|s| s.name == c.name) else {
                continue;
            };
            c.restart_count = status.restart_count.max(0);
            let last = |s: &Option<K8sState>| {
                let t = s.as_ref()?.terminated.as_ref()?;
                Some(Terminated {
                    exit_code: t.exit_code,
                    reason: t.reason.clone().unwrap_or_default(),
                    message: t.message.clone(),
                    started_at: time(&t.started_at).unwrap_or(self.start_time),
                    finished_at: time(&t.finished_at).unwrap_or(self.start_time),
                })
            };
            c.last_state = last(&status.last_state);
            if terminal && let Some(t) = last(&status.state) {
                c.state = ContainerState::Terminated(t);
                c.finished = true;
                ended += 1;
            }
        }
        if terminal && ended < self.containers.len() {
            // Finished without every container's end on record (refused before it
            // ran): it stays refused, with the reason it had.
            self.rejected = Some((
                previous.reason.clone().unwrap_or_else(|| phase.to_owned()),
                previous.message.clone().unwrap_or_default(),
            ));
        }
    }

    /// Whether nothing in the pod will run again.
    pub fn is_terminal(&self) -> bool {
        matches!(self.phase(), PodPhase::Succeeded | PodPhase::Failed)
    }

    pub fn container_mut(&mut self, name: &str) -> Option<&mut ContainerRecord> {
        self.containers.iter_mut().find(|c| c.name == name)
    }

    pub fn all_ready(&self) -> bool {
        !self.containers.is_empty() && self.containers.iter().all(|c| c.ready)
    }

    /// The phase Kubernetes would report for these container states.
    pub fn phase(&self) -> PodPhase {
        if self.rejected.is_some() {
            return PodPhase::Failed;
        }
        if self.containers.iter().all(|c| c.finished) {
            let all_ok = self
                .containers
                .iter()
                .all(|c| matches!(&c.state, ContainerState::Terminated(t) if t.exit_code == 0));
            return if all_ok {
                PodPhase::Succeeded
            } else {
                PodPhase::Failed
            };
        }
        if self.initialized_at.is_none() {
            return PodPhase::Pending;
        }
        let started = self.containers.iter().any(|c| {
            !matches!(&c.state, ContainerState::Waiting { reason, .. } if reason == "ContainerCreating")
        });
        if started {
            PodPhase::Running
        } else {
            PodPhase::Pending
        }
    }

    /// The pod with its status filled in, as `/pods` and `brink get pods` show it.
    pub fn to_pod(&self) -> Pod {
        let mut pod = self.pod.clone();
        pod.status = Some(self.status());
        pod
    }

    pub fn status(&self) -> PodStatus {
        let time = |t: Timestamp| Some(Time(t));
        let condition =
            |kind: &str, ok: bool, since: Timestamp, reason: Option<&str>| PodCondition {
                type_: kind.to_string(),
                status: if ok { "True".into() } else { "False".into() },
                last_transition_time: time(since),
                reason: reason.map(str::to_string),
                ..Default::default()
            };
        let ready = self.all_ready();
        let not_ready = (!ready).then_some("ContainersNotReady");
        let phase = self.phase();
        let initialized = self.initialized_at.is_some();
        PodStatus {
            phase: Some(phase.as_str().into()),
            conditions: Some(vec![
                condition("PodScheduled", true, self.start_time, None),
                condition(
                    "Initialized",
                    initialized,
                    self.initialized_at.unwrap_or(self.start_time),
                    None,
                ),
                condition("ContainersReady", ready, self.ready_since, not_ready),
                condition("Ready", ready, self.ready_since, not_ready),
            ]),
            container_statuses: Some(self.containers.iter().map(container_status).collect()),
            host_ip: Some(self.host_ip.clone()),
            start_time: time(self.start_time),
            reason: self.rejected.as_ref().map(|(reason, _)| reason.clone()),
            message: self.rejected.as_ref().map(|(_, message)| message.clone()),
            ..Default::default()
        }
    }
}

fn terminated(t: &Terminated) -> ContainerStateTerminated {
    ContainerStateTerminated {
        exit_code: t.exit_code,
        reason: Some(t.reason.clone()),
        message: t.message.clone(),
        started_at: Some(Time(t.started_at)),
        finished_at: Some(Time(t.finished_at)),
        ..Default::default()
    }
}

fn container_status(c: &ContainerRecord) -> ContainerStatus {
    let state = match &c.state {
        ContainerState::Waiting { reason, message } => K8sState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: message.clone(),
            }),
            ..Default::default()
        },
        ContainerState::Running { started_at } => K8sState {
            running: Some(ContainerStateRunning {
                started_at: Some(Time(*started_at)),
            }),
            ..Default::default()
        },
        ContainerState::Terminated(t) => K8sState {
            terminated: Some(terminated(t)),
            ..Default::default()
        },
    };
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: c.image_id.clone(),
        ready: c.ready,
        restart_count: c.restart_count,
        started: Some(matches!(c.state, ContainerState::Running { .. })),
        state: Some(state),
        last_state: c.last_state.as_ref().map(|t| K8sState {
            terminated: Some(terminated(t)),
            ..Default::default()
        }),
        ..Default::default()
    }
}
