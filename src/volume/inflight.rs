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
        assert!(f.try_acquire("v2".into()).is_some());
        drop(g);
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
