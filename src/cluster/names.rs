//! The controller's index of CSI volume names: which node holds the
//! volume of each name. A CreateVolume must find an existing volume of its
//! name wherever it was made (the CSI name is the idempotency key); asking
//! every node on every create costs a round trip to all of them, so the
//! controller keeps this index instead. It is soft state like the rest:
//! each node's names are loaded from the node (Agent.ListNames) when it
//! first registers with this controller, and the creates and deletes the
//! controller routes keep it current (only the controller may call a
//! node's agent API). Until every fresh node is loaded, lookups fall back
//! to asking every node.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

#[derive(Debug, Default)]
struct Inner {
    /// name → (node, volume id)
    by_name: HashMap<String, (String, String)>,
    /// volume id → name
    by_volume: HashMap<String, String>,
    loaded: HashSet<String>,
    loading: HashSet<String>,
    /// Volumes deleted while a load was running (its snapshot may still
    /// list them); cleared when no load runs.
    deleted_during_load: HashSet<String>,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct NameIndex {
    inner: Mutex<Inner>,
}

impl NameIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims the load of `node`'s names: true when it is neither loaded
    /// nor being loaded.
    pub fn start_loading(&self, node: &str) -> bool {
        let mut i = self.lock();
        !i.loaded.contains(node) && i.loading.insert(node.to_owned())
    }

    /// Adds what the node listed and marks it loaded.
    pub fn finish_loading(&self, node: &str, volumes: Vec<(String, String)>) {
        let mut i = self.lock();
        for (name, volume) in volumes {
            if i.deleted_during_load.contains(&volume) {
                continue;
            }
            i.by_volume.insert(volume.clone(), name.clone());
            i.by_name.insert(name, (node.to_owned(), volume));
        }
        i.loading.remove(node);
        i.loaded.insert(node.to_owned());
        if i.loading.is_empty() {
            i.deleted_during_load.clear();
        }
    }

    /// A load that failed: the next registration tries again.
    pub fn abort_loading(&self, node: &str) {
        let mut i = self.lock();
        i.loading.remove(node);
        if i.loading.is_empty() {
            i.deleted_during_load.clear();
        }
    }

    pub fn is_loaded(&self, node: &str) -> bool {
        self.lock().loaded.contains(node)
    }

    /// The node holding the volume named `name`, if known.
    pub fn node_of(&self, name: &str) -> Option<String> {
        self.lock().by_name.get(name).map(|(n, _)| n.clone())
    }

    /// A volume this controller created (or found) on `node`.
    pub fn insert(&self, name: &str, node: &str, volume: &str) {
        let mut i = self.lock();
        i.by_volume.insert(volume.to_owned(), name.to_owned());
        i.by_name
            .insert(name.to_owned(), (node.to_owned(), volume.to_owned()));
    }

    /// A volume this controller deleted.
    pub fn remove_volume(&self, volume: &str) {
        let mut i = self.lock();
        if let Some(name) = i.by_volume.remove(volume)
            && i.by_name.get(&name).is_some_and(|(_, v)| v == volume)
        {
            i.by_name.remove(&name);
        }
        if !i.loading.is_empty() {
            i.deleted_during_load.insert(volume.to_owned());
        }
    }

    /// Forgets a node's names (the node was forgotten).
    pub fn unload(&self, node: &str) {
        let mut i = self.lock();
        i.loaded.remove(node);
        let gone: Vec<String> = i
            .by_name
            .iter()
            .filter(|(_, (n, _))| n == node)
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some((_, v)) = i.by_name.remove(&name) {
                i.by_volume.remove(&v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_inserts_deletes_and_forgets() {
        let x = NameIndex::default();
        assert!(x.start_loading("a"));
        assert!(!x.start_loading("a"), "one load at a time");
        // Deleted while the load's snapshot was taken: not resurrected.
        x.remove_volume("va2");
        x.finish_loading(
            "a",
            vec![("one".into(), "va1".into()), ("two".into(), "va2".into())],
        );
        assert!(x.is_loaded("a") && !x.start_loading("a"));
        assert_eq!(x.node_of("one").as_deref(), Some("a"));
        assert_eq!(x.node_of("two"), None);
        x.insert("three", "b", "vb3");
        assert_eq!(x.node_of("three").as_deref(), Some("b"));
        x.remove_volume("vb3");
        assert_eq!(x.node_of("three"), None);
        // A name re-created elsewhere is not removed by the old id.
        x.insert("one", "b", "vb1");
        x.remove_volume("va1");
        assert_eq!(x.node_of("one").as_deref(), Some("b"));
        x.unload("b");
        assert_eq!(x.node_of("one"), None);
        assert!(x.start_loading("b"));
        x.abort_loading("b");
        assert!(!x.is_loaded("b") && x.start_loading("b"));
    }
}
