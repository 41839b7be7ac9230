//! User-namespace ID ranges (issue 3; the sandbox that uses them lands next): every pod gets
//! its own block of [`IDS_PER_POD`] host uids and gids from a configured pool, never
//! overlapping another live pod's block, as KEP-127 (`hostUsers: false`) allocates them.
//!
//! Allocations are recorded in sled and flushed before they are handed out, so after an
//! agent restart a pod gets the same range back and no range is given twice. Ranges of pods
//! that are gone are freed with [`IdRanges::release`] or, after a restart, [`IdRanges::retain`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use thiserror::Error;

/// Host IDs per pod: a full 16-bit range, so uid 0..65535 inside maps one to one.
pub const IDS_PER_POD: u32 = 65_536;

/// A pod's block of host IDs: inside uid/gid 0 is `first` outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub first: u32,
    pub count: u32,
}

#[derive(Debug, Error)]
pub enum IdRangeError {
    #[error("all {0} user-namespace ID ranges are in use")]
    Exhausted(u32),
    #[error(
        "the ID pool does not fit in 32-bit IDs: base {base} + {ranges} ranges of {IDS_PER_POD}"
    )]
    PoolTooLarge { base: u32, ranges: u32 },
    #[error("ID range records in {path}: {message}")]
    Store { path: String, message: String },
}

/// The pool and its allocations.
pub struct IdRanges {
    base: u32,
    ranges: u32,
    tree: sled::Db,
    path: String,
    /// pod uid → range index; mirrors the store.
    allocated: Mutex<BTreeMap<String, u32>>,
}

impl IdRanges {
    /// Opens the records at `path` for a pool of `ranges` blocks starting at host ID `base`.
    /// Records outside the pool (the pool shrank) or that cannot be read are errors naming
    /// the file: handing out a range that may still be in use would be worse than stopping.
    /// Blocking: call from `spawn_blocking` or at start-up.
    pub fn open(path: &Path, base: u32, ranges: u32) -> Result<Self, IdRangeError> {
        let end = u64::from(base) + u64::from(ranges) * u64::from(IDS_PER_POD);
        if end > u64::from(u32::MAX) {
            return Err(IdRangeError::PoolTooLarge { base, ranges });
        }
        let display = path.display().to_string();
        let store_err = |message: String| IdRangeError::Store {
            path: display.clone(),
            message,
        };
        let tree = sled::open(path).map_err(|e| store_err(e.to_string()))?;
        let mut allocated = BTreeMap::new();
        for entry in tree.iter() {
            let (key, value) = entry.map_err(|e| store_err(e.to_string()))?;
            let pod = String::from_utf8(key.to_vec())
                .map_err(|_| store_err("a pod uid is not UTF-8".into()))?;
            let index = <[u8; 4]>::try_from(value.as_ref())
                .map(u32::from_be_bytes)
                .map_err(|_| store_err(format!("the record of pod {pod} is not a range index")))?;
            if index >= ranges {
                return Err(store_err(format!(
                    "pod {pod} holds range {index}, outside the pool of {ranges}"
                )));
            }
            if allocated.values().any(|&i| i == index) {
                return Err(store_err(format!("range {index} is recorded twice")));
            }
            allocated.insert(pod, index);
        }
        Ok(Self {
            base,
            ranges,
            tree,
            path: display,
            allocated: Mutex::new(allocated),
        })
    }

    fn range(&self, index: u32) -> IdRange {
        IdRange {
            first: self.base + index * IDS_PER_POD,
            count: IDS_PER_POD,
        }
    }

    fn store_err(&self, message: impl ToString) -> IdRangeError {
        IdRangeError::Store {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    /// The pod's range: the one it already holds, or the lowest free one, recorded durably
    /// before it is returned. Blocking.
    pub fn allocate(&self, pod_uid: &str) -> Result<IdRange, IdRangeError> {
        let mut allocated = self
            .allocated
            .lock()
            .map_err(|_| self.store_err("lock poisoned"))?;
        if let Some(&index) = allocated.get(pod_uid) {
            return Ok(self.range(index));
        }
        let used: std::collections::BTreeSet<u32> = allocated.values().copied().collect();
        let index = (0..self.ranges)
            .find(|i| !used.contains(i))
            .ok_or(IdRangeError::Exhausted(self.ranges))?;
        self.tree
            .insert(pod_uid.as_bytes(), &index.to_be_bytes())
            .and_then(|_| self.tree.flush())
            .map_err(|e| self.store_err(e))?;
        allocated.insert(pod_uid.to_string(), index);
        Ok(self.range(index))
    }

    /// Frees a pod's range (the pod is gone). Blocking.
    pub fn release(&self, pod_uid: &str) -> Result<(), IdRangeError> {
        let mut allocated = self
            .allocated
            .lock()
            .map_err(|_| self.store_err("lock poisoned"))?;
        if allocated.remove(pod_uid).is_some() {
            self.tree
                .remove(pod_uid.as_bytes())
                .and_then(|_| self.tree.flush())
                .map_err(|e| self.store_err(e))?;
        }
        Ok(())
    }

    /// Frees the ranges of every pod not in `live` (after a restart, pods that did not come
    /// back). Blocking.
    pub fn retain(&self, live: &[&str]) -> Result<(), IdRangeError> {
        let stale: Vec<String> = {
            let allocated = self
                .allocated
                .lock()
                .map_err(|_| self.store_err("lock poisoned"))?;
            allocated
                .keys()
                .filter(|k| !live.contains(&k.as_str()))
                .cloned()
                .collect()
        };
        for pod in stale {
            self.release(&pod)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u32 = 1_000_000;

    fn disjoint(a: IdRange, b: IdRange) -> bool {
        a.first + a.count <= b.first || b.first + b.count <= a.first
    }

    #[test]
    fn pods_get_disjoint_ranges_and_keep_them_across_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ids.sled");
        let (a, b) = {
            let ids = IdRanges::open(&path, BASE, 8).expect("open");
            let a = ids.allocate("pod-a").expect("a");
            let b = ids.allocate("pod-b").expect("b");
            assert_eq!(a.first, BASE);
            assert_eq!(a.count, IDS_PER_POD);
            assert!(disjoint(a, b));
            assert_eq!(
                ids.allocate("pod-a").expect("again"),
                a,
                "a pod keeps its range"
            );
            (a, b)
        };
        let ids = IdRanges::open(&path, BASE, 8).expect("reopen");
        assert_eq!(ids.allocate("pod-b").expect("b after restart"), b);
        let c = ids.allocate("pod-c").expect("c");
        assert!(
            disjoint(c, a) && disjoint(c, b),
            "no range is given twice after a restart"
        );
    }

    #[test]
    fn released_ranges_are_reused_and_the_pool_runs_out_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids = IdRanges::open(&dir.path().join("ids.sled"), BASE, 2).expect("open");
        let a = ids.allocate("a").expect("a");
        ids.allocate("b").expect("b");
        assert!(matches!(ids.allocate("c"), Err(IdRangeError::Exhausted(2))));
        ids.release("a").expect("release");
        assert_eq!(ids.allocate("c").expect("c"), a);
        ids.retain(&["c"]).expect("retain");
        assert_eq!(ids.allocate("d").expect("d").first, BASE + IDS_PER_POD);
    }

    #[test]
    fn bad_pools_and_records_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            IdRanges::open(&dir.path().join("x.sled"), u32::MAX - 10, 1),
            Err(IdRangeError::PoolTooLarge { .. })
        ));
        let path = dir.path().join("ids.sled");
        {
            let ids = IdRanges::open(&path, BASE, 8).expect("open");
            for pod in ["a", "b", "c", "d", "e"] {
                ids.allocate(pod).expect("allocate");
            }
        }
        // The pool shrank below a recorded range: refuse rather than hand it out again.
        let err = IdRanges::open(&path, BASE, 2).err().expect("refused");
        assert!(err.to_string().contains("outside the pool"), "{err}");
        {
            let db = sled::open(&path).expect("db");
            db.insert("garbage", b"xy".as_slice()).expect("insert");
            db.flush().expect("flush");
        }
        let err = IdRanges::open(&path, BASE, 8).err().expect("refused");
        assert!(err.to_string().contains("not a range index"), "{err}");
    }
}
