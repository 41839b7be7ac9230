//! The watch cache: every object under `/registry/` decoded in memory, kept current by
//! one follower of the store's history, with the most recent events kept for watches to
//! start from and one broadcast that fans each change out to every watcher.
//!
//! Lists are served from here (after a ReadIndex round and waiting for the cache to
//! reach the store's revision when the client asked for a consistent read), and so are
//! watches; the store is read directly only for a watch older than the kept events. The
//! cache never writes: writes go through the replica and come back as events.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{broadcast, watch};

use crate::consensus::replica::Replica;
use crate::store::{Event, EventKind, StoreError};

/// Where every API object's key starts.
pub const REGISTRY_PREFIX: &str = "/registry/";

/// What a watcher is told.
#[derive(Debug, Clone, PartialEq, Eq, Copy)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

impl ChangeKind {
    pub fn word(self) -> &'static str {
        match self {
            ChangeKind::Added => "ADDED",
            ChangeKind::Modified => "MODIFIED",
            ChangeKind::Deleted => "DELETED",
        }
    }
}

/// One change to one object, decoded, with `metadata.resourceVersion` set.
#[derive(Debug)]
pub struct Change {
    pub revision: u64,
    pub key: String,
    pub kind: ChangeKind,
    pub object: Arc<Value>,
    /// The object before a modification (watches with selectors need it).
    pub previous: Option<Arc<Value>>,
}

/// What the broadcast carries.
#[derive(Debug, Clone)]
pub enum Broadcast {
    Change(Arc<Change>),
    /// The cache lost its place in the history and listed again: every watcher must
    /// end (with 410) and its client relist.
    Reset,
}

/// The cache's settings.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// Changes kept in memory for watches to start from.
    pub history: usize,
    /// Changes the broadcast holds for its slowest watcher; one further behind is
    /// ended with 410 (its client relists) rather than holding memory for it.
    pub broadcast: usize,
    /// Changes read from the store in one step of the follower.
    pub read_batch: usize,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            history: 10_000,
            broadcast: 4096,
            read_batch: 10_000,
        }
    }
}

#[derive(Default)]
struct CacheState {
    objects: BTreeMap<String, Arc<Value>>,
    /// Mod revisions of the objects, to apply replayed events idempotently.
    revisions: BTreeMap<String, u64>,
    recent: VecDeque<Arc<Change>>,
    revision: u64,
}

/// The cache. Start its follower with [`Cache::follow`].
pub struct Cache {
    state: RwLock<CacheState>,
    revision: watch::Sender<u64>,
    broadcast: broadcast::Sender<Broadcast>,
    settings: CacheSettings,
    ready: watch::Sender<bool>,
}

/// Decodes a stored object and sets its `resourceVersion`.
pub fn decode(data: &[u8], revision: u64) -> Option<Value> {
    let mut object: Value = serde_json::from_slice(data).ok()?;
    let metadata = object.get_mut("metadata")?.as_object_mut()?;
    metadata.insert(
        "resourceVersion".into(),
        Value::String(revision.to_string()),
    );
    Some(object)
}

/// Where a watch begins: the changes after its revision that the cache still has,
/// and the receiver for every later one.
pub struct WatchStart {
    pub backlog: Vec<Arc<Change>>,
    pub receiver: broadcast::Receiver<Broadcast>,
    /// The cache's revision when the watch was registered: changes up to it are in
    /// the backlog (or must be read from the store), later ones arrive on the receiver.
    pub at: u64,
    /// The backlog is incomplete: the changes after the asked revision up to `at` must
    /// be read from the store's history.
    pub from_store: bool,
}

impl Cache {
    pub fn new(settings: CacheSettings) -> Arc<Self> {
        Arc::new(Self {
            state: RwLock::new(CacheState::default()),
            revision: watch::channel(0).0,
            broadcast: broadcast::channel(settings.broadcast.max(1)).0,
            settings,
            ready: watch::channel(false).0,
        })
    }

    /// The revision the cache has caught up to.
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// Whether the first list is loaded.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the cache holds every change up to `revision`, at most `wait`.
    pub async fn wait_for(&self, revision: u64, wait: Duration) -> bool {
        let mut rx = self.revision.subscribe();
        tokio::time::timeout(wait, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Every object whose key starts with `prefix`, in key order, and the revision they
    /// are current at.
    pub fn list(&self, prefix: &str) -> (Vec<Arc<Value>>, u64) {
        let Ok(state) = self.state.read() else {
            return (Vec::new(), 0);
        };
        let items = state
            .objects
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        (items, state.revision)
    }

    /// Every object under `prefix` with its key.
    pub fn list_keyed(&self, prefix: &str) -> Vec<(String, Arc<Value>)> {
        let Ok(state) = self.state.read() else {
            return Vec::new();
        };
        state
            .objects
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// One object, as the cache has it.
    pub fn get(&self, key: &str) -> Option<Arc<Value>> {
        self.state.read().ok()?.objects.get(key).cloned()
    }

    /// Registers a watch for changes after `after`.
    pub fn watch(&self, after: u64) -> Option<WatchStart> {
        let state = self.state.read().ok()?;
        let receiver = self.broadcast.subscribe();
        let oldest = state.recent.front().map_or(state.revision, |c| c.revision);
        let from_store = after.saturating_add(1) < oldest && after < state.revision;
        let backlog = state
            .recent
            .iter()
            .filter(|c| c.revision > after)
            .cloned()
            .collect();
        Some(WatchStart {
            backlog,
            receiver,
            at: state.revision,
            from_store,
        })
    }

    /// Follows the store for as long as the replica runs: loads everything, then applies
    /// each change and tells the watchers.
    pub async fn follow(self: Arc<Self>, replica: Arc<Replica>) {
        let mut revisions = replica.subscribe_revision();
        let mut loaded = false;
        loop {
            if !loaded {
                match self.load(&replica).await {
                    Ok(()) => loaded = true,
                    Err(e) => {
                        tracing::warn!(error = %e, "watch cache: cannot list the store; trying again");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            let from = self.revision();
            let batch = self.settings.read_batch;
            let r = replica.clone();
            let read = tokio::task::spawn_blocking(move || {
                let store = r.store();
                let revision = store.revision()?;
                let events = store.events_after(REGISTRY_PREFIX.as_bytes(), from, batch)?;
                Ok::<_, StoreError>((revision, events))
            })
            .await;
            match read {
                Ok(Ok((revision, events))) => {
                    let full = events.len() >= batch;
                    let caught_up = if full {
                        events.last().map_or(from, |e| e.revision)
                    } else {
                        revision.max(events.last().map_or(0, |e| e.revision))
                    };
                    self.apply(&events, caught_up);
                    if full {
                        continue;
                    }
                    if *revisions.borrow_and_update() > caught_up {
                        continue;
                    }
                    tokio::select! {
                        changed = revisions.changed() => {
                            if changed.is_err() {
                                return;
                            }
                        }
                        // A change the revision channel missed (it keeps only the last
                        // value) is picked up on the next beat anyway.
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Ok(Err(StoreError::Gone { .. })) => {
                    tracing::warn!(
                        from,
                        "watch cache: history compacted past the cache; listing again"
                    );
                    loaded = false;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "watch cache: cannot read the store's history");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(_) => return,
            }
        }
    }

    async fn load(&self, replica: &Arc<Replica>) -> Result<(), String> {
        let r = replica.clone();
        let (revision, page) = tokio::task::spawn_blocking(move || {
            let store = r.store();
            let revision = store.revision()?;
            let page = store.range(REGISTRY_PREFIX.as_bytes(), 0, None)?;
            Ok::<_, StoreError>((revision, page))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let mut objects = BTreeMap::new();
        let mut revisions = BTreeMap::new();
        for (key, value) in page.items {
            let Ok(key) = String::from_utf8(key) else {
                continue;
            };
            match decode(&value.data, value.mod_revision) {
                Some(object) => {
                    revisions.insert(key.clone(), value.mod_revision);
                    objects.insert(key, Arc::new(object));
                }
                None => tracing::warn!(key, "watch cache: a stored object is not JSON; skipped"),
            }
        }
        let was_loaded = self.is_ready();
        {
            let mut state = self
                .state
                .write()
                .map_err(|_| "the cache's lock is poisoned".to_owned())?;
            state.objects = objects;
            state.revisions = revisions;
            state.recent.clear();
            state.revision = revision;
        }
        if was_loaded {
            let _ = self.broadcast.send(Broadcast::Reset);
        }
        self.revision.send_replace(revision);
        self.ready.send_replace(true);
        Ok(())
    }

    fn apply(&self, events: &[Event], caught_up: u64) {
        if let Ok(mut state) = self.state.write() {
            for event in events {
                let Ok(key) = String::from_utf8(event.key.clone()) else {
                    continue;
                };
                let known = state.revisions.get(&key).copied().unwrap_or(0);
                let previous = state.objects.get(&key).cloned();
                let (kind, object) = match &event.kind {
                    EventKind::Put(value) => {
                        if value.mod_revision <= known {
                            continue;
                        }
                        let Some(object) = decode(&value.data, value.mod_revision) else {
                            tracing::warn!(
                                key,
                                "watch cache: a stored object is not JSON; skipped"
                            );
                            continue;
                        };
                        let object = Arc::new(object);
                        let kind = if state.objects.contains_key(&key) {
                            ChangeKind::Modified
                        } else {
                            ChangeKind::Added
                        };
                        state.objects.insert(key.clone(), object.clone());
                        state.revisions.insert(key.clone(), value.mod_revision);
                        (kind, object)
                    }
                    EventKind::Delete(value) => {
                        if event.revision <= known || !state.objects.contains_key(&key) {
                            continue;
                        }
                        state.objects.remove(&key);
                        state.revisions.remove(&key);
                        let Some(object) = decode(&value.data, event.revision) else {
                            continue;
                        };
                        (ChangeKind::Deleted, Arc::new(object))
                    }
                };
                let change = Arc::new(Change {
                    revision: event.revision,
                    key,
                    kind,
                    object,
                    previous,
                });
                state.recent.push_back(change.clone());
                while state.recent.len() > self.settings.history {
                    state.recent.pop_front();
                }
                // Sent under the lock, so a watch registering under the read lock sees
                // each change either in its backlog or on its receiver, never both or
                // neither.
                let _ = self.broadcast.send(Broadcast::Change(change));
            }
            state.revision = state.revision.max(caught_up);
            let revision = state.revision;
            drop(state);
            self.revision.send_replace(revision);
        }
    }
}
