//! Spare sandboxes: processes started ahead of need, exec'd and (where the node has
//! cgroups) already inside a cgroup of their own, waiting for a pod's set-up. A pod's start
//! takes one instead of paying for the exec and for moving a process into a cgroup, which
//! on a v1 host waits out an RCU grace period (milliseconds); the pool refills behind it.
//!
//! A spare has no jail yet and knows nothing of any pod: until its set-up arrives it only
//! waits on its socket. Owns only the spares; a taken spare belongs to its sandbox.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::cgroup::{CgroupLimits, Cgroups, PodCgroup};
use super::spawn::{SandboxProcess, spawn};

/// A started sandbox process waiting for its set-up.
pub struct Spare {
    pub process: SandboxProcess,
    /// Its cgroup, named `spare-<n>` until a pod adopts it.
    pub cgroup: Option<PodCgroup>,
}

impl std::fmt::Debug for Spares {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spares")
            .field("target", &self.target)
            .field("ready", &self.len())
            .finish()
    }
}

/// The pool of spares.
pub struct Spares {
    cgroups: Option<Arc<Cgroups>>,
    /// The limits a spare's cgroup has until it is adopted.
    spare_limits: CgroupLimits,
    target: usize,
    ready: Mutex<VecDeque<Spare>>,
    next: AtomicU64,
    wake: tokio::sync::Notify,
}

impl Spares {
    /// A pool of `target` spares; nothing starts until [`Spares::run`].
    pub fn new(
        cgroups: Option<Arc<Cgroups>>,
        spare_limits: CgroupLimits,
        target: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            cgroups,
            spare_limits,
            target,
            ready: Mutex::new(VecDeque::new()),
            next: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Keeps the pool full until the task is aborted. A spare that cannot be made is
    /// logged and tried again after a pause; pods start without spares meanwhile.
    pub async fn run(self: Arc<Self>) {
        loop {
            while self.len() < self.target {
                match self.make().await {
                    Ok(spare) => {
                        if let Ok(mut ready) = self.ready.lock() {
                            ready.push_back(spare);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start a spare sandbox");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
            self.wake.notified().await;
        }
    }

    fn len(&self) -> usize {
        self.ready.lock().map(|r| r.len()).unwrap_or(usize::MAX)
    }

    async fn make(&self) -> Result<Spare, String> {
        let process = spawn().await.map_err(|e| e.to_string())?;
        let Some(cgroups) = self.cgroups.clone() else {
            return Ok(Spare {
                process,
                cgroup: None,
            });
        };
        let name = format!(
            "{}-{}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let (limits, pid) = (self.spare_limits, process.pid);
        let made = tokio::task::spawn_blocking(move || {
            let cgroup = cgroups.create_spare(&name, &limits)?;
            if let Err(e) = cgroup.add(pid) {
                cgroup.remove();
                return Err(e);
            }
            Ok(cgroup)
        })
        .await;
        match made {
            Ok(Ok(cgroup)) => Ok(Spare {
                process,
                cgroup: Some(cgroup),
            }),
            Ok(Err(e)) => {
                process.kill();
                let _ = process.wait().await;
                Err(format!("cgroup: {e}"))
            }
            Err(e) => {
                process.kill();
                let _ = process.wait().await;
                Err(format!("cgroup task: {e}"))
            }
        }
    }

    /// A spare, if one is ready; the pool refills behind it.
    pub fn take(&self) -> Option<Spare> {
        let spare = self.ready.lock().ok()?.pop_front();
        self.wake.notify_one();
        spare
    }

    /// Kills every spare and removes their cgroups (the agent is stopping).
    pub async fn shutdown(&self) {
        let spares: Vec<Spare> = self
            .ready
            .lock()
            .map(|mut r| r.drain(..).collect())
            .unwrap_or_default();
        for spare in spares {
            spare.process.kill();
            let _ = spare.process.wait().await;
            if let Some(cgroup) = spare.cgroup {
                let _ = tokio::task::spawn_blocking(move || cgroup.remove()).await;
            }
        }
    }
}
