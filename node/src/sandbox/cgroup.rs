//! cgroup limits for sandboxes: each sandbox process goes into `pod-<uid>` under the
//! agent's own subtree, with a memory cap, a pids cap and (when every container has a CPU
//! limit) a CPU quota; an OOM kill there is reported as `OOMKilled`.
//!
//! cgroup v2 is used where the agent's cgroup offers the controllers (the agent may have
//! to move itself into a leaf, as systemd's delegation asks). Hosts still on a v1 or
//! hybrid layout (Debian 10, Ubuntu 20.04, many edge images, this project's CI) get the
//! same limits through the v1 memory, pids and cpu hierarchies. Where neither works the
//! node says why once and sandboxes run with their rlimits only.
//!
//! Owns only directories under the agent's subtree (`brink-<hash of the data dir>`, so two
//! agents on one host never share one); never touches another cgroup's settings.

use std::path::{Path, PathBuf};

/// CFS period for CPU quotas (the kernel's default, as Kubernetes uses).
pub const CPU_PERIOD_US: u64 = 100_000;
/// How often removing a pod's cgroup is retried while the kernel still counts its tasks.
const REMOVE_ATTEMPTS: u32 = 50;
const REMOVE_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// Why cgroups cannot be used, or a pod's cgroup could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{0}")]
    Unavailable(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which cgroup layout limits are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// The agent's subtree name: one per data directory, stable across restarts (so the next
/// run finds what a crashed one left) and distinct between agents on one host.
pub fn subtree_name(data_dir: &Path) -> String {
    let hash = crate::fnv::fnv64(data_dir.as_os_str().as_encoded_bytes());
    format!("brink-{:08x}", hash as u32)
}

/// The limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// CPU in thousandths of a core; `None` for no quota.
    pub cpu_millis: Option<u64>,
}

/// The agent's subtree in each hierarchy it limits with.
#[derive(Debug, Clone)]
pub struct Cgroups {
    version: Version,
    memory: PathBuf,
    pids: Option<PathBuf>,
    cpu: Option<PathBuf>,
}

/// One mounted cgroup hierarchy, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    /// The path inside the hierarchy that is mounted (`/` unless in a cgroup namespace).
    root: String,
    mount_point: PathBuf,
    v2: bool,
    controllers: Vec<String>,
}

/// `\040` and friends, as mountinfo escapes paths.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let Some(digits) = octal {
            let code = digits.iter().fold(0u32, |n, d| n * 8 + u32::from(d - b'0'));
            out.push(u8::try_from(code).unwrap_or(b'?'));
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(point), Some(fstype)) = (left.get(3), left.get(4), right.first())
        else {
            continue;
        };
        let v2 = *fstype == "cgroup2";
        if !v2 && *fstype != "cgroup" {
            continue;
        }
        let controllers = right
            .get(2)
            .map(|opts| {
                opts.split(',')
                    .filter(|o| matches!(*o, "memory" | "pids" | "cpu"))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        mounts.push(Mount {
            root: unescape(root),
            mount_point: PathBuf::from(unescape(point)),
            v2,
            controllers,
        });
    }
    mounts
}

/// `/proc/self/cgroup`: (controllers, path) per line; v2's line has no controllers.
fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            let controllers = controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some((controllers, path.to_string()))
        })
        .collect()
}

/// The directory of cgroup `path` in `mount`, if the mount shows it.
fn dir_in(mount: &Mount, path: &str) -> Option<PathBuf> {
    let root = mount.root.trim_end_matches('/');
    let relative = path.strip_prefix(root)?;
    if !(relative.is_empty() || relative.starts_with('/')) {
        return None;
    }
    Some(mount.mount_point.join(relative.trim_start_matches('/')))
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io(path))
}

impl Cgroups {
    /// Finds the agent's cgroups and makes its subtree `name` in them.
    pub fn set_up(name: &str) -> Result<Self, CgroupError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(io(Path::new("/proc/self/mountinfo")))?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(io(Path::new("/proc/self/cgroup")))?;
        let mounts = parse_mountinfo(&mountinfo);
        let own = parse_proc_cgroup(&own);
        let v2 = Self::set_up_v2(&mounts, &own, name);
        match v2 {
            Ok(cgroups) => Ok(cgroups),
            Err(v2_reason) => Self::set_up_v1(&mounts, &own, name).map_err(|v1_reason| {
                CgroupError::Unavailable(format!("cgroup v2: {v2_reason}; cgroup v1: {v1_reason}"))
            }),
        }
    }

    fn set_up_v2(
        mounts: &[Mount],
        own: &[(Vec<String>, String)],
        name: &str,
    ) -> Result<Self, CgroupError> {
        let unavailable = |m: String| CgroupError::Unavailable(m);
        let mount = mounts
            .iter()
            .find(|m| m.v2)
            .ok_or_else(|| unavailable("no cgroup2 file system is mounted".into()))?;
        let path = own
            .iter()
            .find(|(c, _)| c.is_empty())
            .map(|(_, p)| p.clone())
            .ok_or_else(|| unavailable("the agent has no cgroup v2 path".into()))?;
        let dir = dir_in(mount, &path)
            .ok_or_else(|| unavailable(format!("the agent's cgroup {path} is not visible")))?;
        let offered = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        let offered: Vec<&str> = offered.split_whitespace().collect();
        for needed in ["memory", "pids"] {
            if !offered.contains(&needed) {
                return Err(unavailable(format!(
                    "the {needed} controller is not offered to {} (controllers: {:?})",
                    dir.display(),
                    offered.join(" ")
                )));
            }
        }
        let wanted: Vec<&str> = ["memory", "pids", "cpu"]
            .into_iter()
            .filter(|c| offered.contains(c))
            .collect();
        // A cgroup with processes cannot hand controllers to children ("no internal
        // processes"): the agent moves itself into a leaf of its own first.
        let enable = |dir: &Path| -> Result<(), CgroupError> {
            let control = dir.join("cgroup.subtree_control");
            for c in &wanted {
                write(&control, &format!("+{c}"))?;
            }
            Ok(())
        };
        if enable(&dir).is_err() {
            let leaf = dir.join(format!("{name}-agent"));
            std::fs::create_dir_all(&leaf).map_err(io(&leaf))?;
            write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
            enable(&dir).map_err(|e| {
                unavailable(format!(
                    "cannot enable controllers in {} even after moving the agent to {}: {e} \
                     (other processes share the agent's cgroup; give it one of its own, e.g. \
                     systemd's Delegate=yes)",
                    dir.display(),
                    leaf.display()
                ))
            })?;
        }
        let subtree = dir.join(name);
        std::fs::create_dir_all(&subtree).map_err(io(&subtree))?;
        enable(&subtree)?;
        Ok(Self {
            version: Version::V2,
            memory: subtree.clone(),
            pids: Some(subtree.clone()),
            cpu: wanted.contains(&"cpu").then_some(subtree),
        })
    }

    fn set_up_v1(
        mounts: &[Mount],
        own: &[(Vec<String>, String)],
        name: &str,
    ) -> Result<Self, CgroupError> {
        let subtree = |controller: &str| -> Option<PathBuf> {
            let mount = mounts
                .iter()
                .find(|m| !m.v2 && m.controllers.iter().any(|c| c == controller))?;
            let (_, path) = own
                .iter()
                .find(|(c, _)| c.iter().any(|c| c == controller))?;
            let dir = dir_in(mount, path)?.join(name);
            std::fs::create_dir_all(&dir).ok()?;
            Some(dir)
        };
        let memory = subtree("memory")
            .ok_or_else(|| CgroupError::Unavailable("no writable v1 memory hierarchy".into()))?;
        Ok(Self {
            version: Version::V1,
            memory,
            pids: subtree("pids"),
            cpu: subtree("cpu"),
        })
    }

    /// What is limited, for the start-up log line.
    pub fn describe(&self) -> String {
        let mut limited = vec!["memory"];
        if self.pids.is_some() {
            limited.push("pids");
        }
        if self.cpu.is_some() {
            limited.push("cpu");
        }
        format!(
            "cgroup {} ({}) under {}",
            self.version,
            limited.join(", "),
            self.memory.display()
        )
    }

    /// Removes pod cgroups a previous run of the agent left (their sandboxes died with
    /// it).
    pub fn remove_stale(&self) {
        for subtree in self.subtrees() {
            let Ok(entries) = std::fs::read_dir(subtree) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("pod-") || name.starts_with("spare-") {
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
    }

    /// Removes the agent's (empty) subtree when it stops, so stopped agents leave nothing
    /// behind. Blocking; harmless if a pod's cgroup is still there.
    pub fn remove_subtree(&self) {
        self.remove_stale();
        for subtree in self.subtrees() {
            let _ = std::fs::remove_dir(subtree);
        }
    }

    fn subtrees(&self) -> Vec<&PathBuf> {
        let mut all = vec![&self.memory];
        for dir in [&self.pids, &self.cpu].into_iter().flatten() {
            if !all.contains(&dir) {
                all.push(dir);
            }
        }
        all
    }

    /// Makes `pod-<name>` with `limits`. Blocking.
    pub fn create(&self, name: &str, limits: &CgroupLimits) -> Result<PodCgroup, CgroupError> {
        self.create_leaf(&format!("pod-{name}"), limits)
    }

    /// Makes a cgroup for a spare sandbox; [`PodCgroup::adopt`] gives it to a pod.
    pub fn create_spare(
        &self,
        name: &str,
        limits: &CgroupLimits,
    ) -> Result<PodCgroup, CgroupError> {
        self.create_leaf(&format!("spare-{name}"), limits)
    }

    fn create_leaf(&self, leaf: &str, limits: &CgroupLimits) -> Result<PodCgroup, CgroupError> {
        let mut dirs = Vec::new();
        for subtree in self.subtrees() {
            let dir = subtree.join(leaf);
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(&dir)(e)),
            }
            dirs.push(dir);
        }
        let mut cgroup = PodCgroup {
            version: self.version,
            memory: self.memory.join(leaf),
            pids: self.pids.as_ref().map(|p| p.join(leaf)),
            cpu: self.cpu.as_ref().map(|c| c.join(leaf)),
            dirs,
            oom_kills_before: 0,
        };
        cgroup.set_limits(limits)?;
        cgroup.oom_kills_before = cgroup.oom_kills();
        Ok(cgroup)
    }
}

/// One sandbox's cgroup (a directory per hierarchy).
#[derive(Debug)]
pub struct PodCgroup {
    version: Version,
    memory: PathBuf,
    pids: Option<PathBuf>,
    cpu: Option<PathBuf>,
    /// Every directory, once each (on v2 they are all one).
    dirs: Vec<PathBuf>,
    /// The OOM-kill count when it was made (a re-used directory keeps its count).
    oom_kills_before: u64,
}

impl PodCgroup {
    /// Writes the limits. Blocking.
    pub fn set_limits(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        let quota = limits
            .cpu_millis
            .map(|m| (m.saturating_mul(CPU_PERIOD_US) / 1000).max(1000));
        let memory = &self.memory;
        match self.version {
            Version::V2 => {
                write(&memory.join("memory.max"), &limits.memory_bytes.to_string())?;
                // Swap would let a sandbox outgrow its cap silently; a kernel without swap
                // accounting has no such file, which is fine.
                let _ = std::fs::write(memory.join("memory.swap.max"), "0");
                write(&memory.join("pids.max"), &limits.pids.to_string())?;
                if self.cpu.is_some() {
                    let quota = quota.map_or("max".to_string(), |q| q.to_string());
                    write(&memory.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                }
            }
            Version::V1 => {
                // The memory+swap limit may never be below the memory limit: growing, it
                // must go first (EINVAL otherwise); shrinking, second.
                let limit = memory.join("memory.limit_in_bytes");
                let memsw = memory.join("memory.memsw.limit_in_bytes");
                let bytes = limits.memory_bytes.to_string();
                if std::fs::write(&limit, &bytes).is_err() {
                    let _ = std::fs::write(&memsw, &bytes);
                    write(&limit, &bytes)?;
                }
                let _ = std::fs::write(&memsw, &bytes);
                if let Some(pids) = &self.pids {
                    write(&pids.join("pids.max"), &limits.pids.to_string())?;
                }
                if let Some(cpu) = &self.cpu {
                    write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                    let quota = quota.map_or("-1".to_string(), |q| q.to_string());
                    write(&cpu.join("cpu.cfs_quota_us"), &quota)?;
                }
            }
        }
        Ok(())
    }

    /// Gives a spare's cgroup (its process already inside) to pod `name`: renamed to
    /// `pod-<name>` (a rename moves no process, so it costs nothing) with the pod's
    /// limits. Blocking.
    pub fn adopt(&mut self, name: &str, limits: &CgroupLimits) -> Result<(), CgroupError> {
        let leaf = format!("pod-{name}");
        let renamed = |dir: &Path| dir.parent().map(|p| p.join(&leaf));
        for dir in &mut self.dirs {
            let Some(target) = renamed(dir) else { continue };
            // An empty cgroup of the pod's last sandbox may linger; it goes first.
            let _ = std::fs::remove_dir(&target);
            std::fs::rename(&*dir, &target).map_err(io(&target))?;
            *dir = target;
        }
        for path in [
            Some(&mut self.memory),
            self.pids.as_mut(),
            self.cpu.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            if let Some(target) = renamed(path) {
                *path = target;
            }
        }
        self.set_limits(limits)?;
        self.oom_kills_before = self.oom_kills();
        Ok(())
    }

    /// Moves process `pid` in. Blocking.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    fn oom_kills(&self) -> u64 {
        let file = match self.version {
            Version::V2 => "memory.events",
            Version::V1 => "memory.oom_control",
        };
        std::fs::read_to_string(self.memory.join(file))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Whether the kernel's OOM killer struck in this cgroup since it was made.
    pub fn oom_killed(&self) -> bool {
        self.oom_kills() > self.oom_kills_before
    }

    /// Removes the directories once the process is gone. Blocking.
    pub fn remove(&self) {
        for dir in &self.dirs {
            for _ in 0..REMOVE_ATTEMPTS {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(REMOVE_PAUSE),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
32 31 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
33 31 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
34 31 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
35 31 0:30 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
36 31 0:31 /nested /sys/fs/cgroup/odd\\040dir rw - cgroup cgroup rw,cpuacct
";

    #[test]
    fn mountinfo_and_proc_cgroup_parse_into_dirs() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.len(), 5);
        assert_eq!(mounts[1].controllers, ["memory"]);
        assert!(mounts[3].v2);
        assert_eq!(mounts[4].mount_point, Path::new("/sys/fs/cgroup/odd dir"));
        let own = parse_proc_cgroup("4:memory:/process_api/abc\n1:cpu:/\n0::/\n");
        assert_eq!(
            own[0],
            (vec!["memory".to_string()], "/process_api/abc".into())
        );
        assert_eq!(own[2].0.len(), 0);
        assert_eq!(
            dir_in(&mounts[1], "/process_api/abc"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"))
        );
        // A path outside a namespaced mount's root is not visible through it.
        assert_eq!(dir_in(&mounts[4], "/elsewhere"), None);
        assert_eq!(
            dir_in(&mounts[4], "/nested/x"),
            Some(PathBuf::from("/sys/fs/cgroup/odd dir/x"))
        );
        assert_eq!(dir_in(&mounts[4], "/nestedx"), None);
    }

    #[test]
    fn garbage_mountinfo_and_cgroup_files_yield_nothing() {
        for text in ["", "\u{0}\u{1}", "a - b", "1 2 3\n - cgroup", "::::\n:"] {
            let _ = parse_mountinfo(text);
            let _ = parse_proc_cgroup(text);
        }
        assert!(parse_mountinfo("1 2 3 4 5 - ext4 /dev/sda rw").is_empty());
        assert_eq!(unescape("a\\04"), "a\\04");
        assert_eq!(unescape("\\"), "\\");
    }
}
