//! The per-key in-flight guard: one operation at a time per volume (and per
//! name for creates). A second caller is refused at once (ABORTED), never
//! queued; the key is released when the guard drops, on error or panic too.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The set of keys with an operation in flight.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Holds a key until dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    /// Takes `key`, or returns None if an operation already holds it.
    pub fn try_acquire(&self, key: String) -> Option<InFlightGuard> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if !keys.insert(key.clone()) {
            return None;
        }
        Some(InFlightGuard {
            keys: Arc::clone(&self.keys),
            key,
        })
    }

    /// How many keys are held right now.
    pub fn len(&self) -> usize {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_release() {
        let f = InFlight::default();
        let g = f.try_acquire("v1".into()).unwrap();
        assert!(f.try_acquire("v1".into()).is_none());
        let g2 = f.try_acquire("v2".into()).unwrap();
        assert_eq!(f.len(), 2);
        drop(g2);
        drop(g);
        assert!(f.is_empty());
        assert!(f.try_acquire("v1".into()).is_some());
    }

    #[test]
    fn released_on_panic() {
        let f = InFlight::default();
        let f2 = f.clone();
        let r = std::panic::catch_unwind(move || {
            let _g = f2.try_acquire("v".into()).unwrap();
            panic!("boom");
        });
        assert!(r.is_err());
        assert!(f.try_acquire("v".into()).is_some());
    }
}
