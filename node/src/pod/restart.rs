//! The restart decision for one container that ended, as the kubelet makes it: from the
//! pod's `restartPolicy`, how the container ended, how long it ran and the back-off so
//! far. Pure (no clock, no I/O): the worker measures and sleeps, this decides.

use std::time::Duration;

/// A pod's `restartPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Always,
    OnFailure,
    Never,
}

impl Policy {
    /// The policy a spec names; Kubernetes defaults it to `Always`.
    pub fn from_spec(policy: Option<&str>) -> Self {
        match policy {
            Some("OnFailure") => Self::OnFailure,
            Some("Never") => Self::Never,
            _ => Self::Always,
        }
    }
}

/// The crash-loop back-off: the first wait, its cap, and how long a container must run
/// before the back-off starts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
}

/// What to do with a container that ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Leave it terminated.
    GiveUp,
    /// Start it again after `delay`; a crash after that waits `next`.
    Restart { delay: Duration, next: Duration },
}

/// Decides for a container that exited with `exit_code` after running `ran_for`, while
/// the back-off stood at `current`. A container ended because its pod is stopping never
/// restarts.
pub fn decide(
    policy: Policy,
    exit_code: i32,
    stopping: bool,
    ran_for: Duration,
    current: Duration,
    backoff: &Backoff,
) -> Decision {
    let restart = !stopping
        && match policy {
            Policy::Always => true,
            Policy::OnFailure => exit_code != 0,
            Policy::Never => false,
        };
    if !restart {
        return Decision::GiveUp;
    }
    let delay = if ran_for >= backoff.reset_after {
        backoff.initial
    } else {
        current
    };
    Decision::Restart {
        delay,
        next: next_backoff(delay, backoff.max),
    }
}

/// The wait after `current`: doubled, capped at `max`.
pub fn next_backoff(current: Duration, max: Duration) -> Duration {
    (current * 2).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const B: Backoff = Backoff {
        initial: Duration::from_secs(10),
        max: Duration::from_secs(300),
        reset_after: Duration::from_secs(600),
    };

    #[test]
    fn the_policy_decides_whether_a_container_comes_back() {
        let d = |p, code| decide(p, code, false, S, B.initial, &B);
        let again = Decision::Restart {
            delay: 10 * S,
            next: 20 * S,
        };
        assert_eq!(d(Policy::Always, 0), again);
        assert_eq!(d(Policy::Always, 1), again);
        assert_eq!(d(Policy::OnFailure, 1), again);
        assert_eq!(d(Policy::OnFailure, 0), Decision::GiveUp);
        assert_eq!(d(Policy::Never, 1), Decision::GiveUp);
        assert_eq!(d(Policy::Never, 0), Decision::GiveUp);
    }

    #[test]
    fn a_stopping_pod_restarts_nothing() {
        assert_eq!(
            decide(Policy::Always, 137, true, S, B.initial, &B),
            Decision::GiveUp
        );
    }

    #[test]
    fn the_back_off_doubles_to_its_cap_and_resets_after_a_long_run() {
        let mut current = B.initial;
        let mut delays = Vec::new();
        for _ in 0..7 {
            match decide(Policy::Always, 1, false, S, current, &B) {
                Decision::Restart { delay, next } => {
                    delays.push(delay.as_secs());
                    current = next;
                }
                Decision::GiveUp => panic!("gave up"),
            }
        }
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(
            decide(Policy::Always, 1, false, 600 * S, current, &B),
            Decision::Restart {
                delay: 10 * S,
                next: 20 * S
            }
        );
    }

    #[test]
    fn policies_read_as_kubernetes_defaults_them() {
        assert_eq!(Policy::from_spec(None), Policy::Always);
        assert_eq!(Policy::from_spec(Some("Never")), Policy::Never);
        assert_eq!(Policy::from_spec(Some("OnFailure")), Policy::OnFailure);
        assert_eq!(Policy::from_spec(Some("Always")), Policy::Always);
    }
}
