//! The per-key in-flight guard: one operation at a time per volume (and per
//! name for creates). A second caller is refused at once (ABORTED), never
//! queued; the key is released when the guard drops, on error or panic too.
//!
//! A key may also be held by the driver's own background work (the
//! controller's round of repairs of replicated volumes): that is no
//! concurrent operation of the CO's, so a call finding it waits for the
//! key ([`InFlight::acquire_after_background`]) instead of being refused,
//! and background work never takes a key a call holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Who holds a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// A request (a CO's call).
    Call,
    /// The driver's own background work.
    Background,
}

#[derive(Debug, Default)]
struct Keys {
    held: Mutex<HashMap<String, Holder>>,
    /// Notified whenever a key is released.
    released: tokio::sync::Notify,
}

/// The set of keys with an operation in flight.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    keys: Arc<Keys>,
}

/// Holds a key until dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    keys: Arc<Keys>,
    key: String,
}

/// Why [`InFlight::acquire_after_background`] did not take its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Another call holds it.
    ByCall,
    /// Background work still held it when the wait was over.
    ByBackground,
}

impl InFlight {
    fn take(&self, key: &str, holder: Holder) -> Result<InFlightGuard, Holder> {
        let mut held = lock(&self.keys.held);
        if let Some(h) = held.get(key) {
            return Err(*h);
        }
        held.insert(key.to_owned(), holder);
        Ok(InFlightGuard {
            keys: Arc::clone(&self.keys),
            key: key.to_owned(),
        })
    }

    /// Takes `key`, or returns None if an operation already holds it.
    pub fn try_acquire(&self, key: String) -> Option<InFlightGuard> {
        self.take(&key, Holder::Call).ok()
    }

    /// Takes `key` for background work, or returns None if anything holds
    /// it (the work leaves that key for later).
    pub fn try_acquire_background(&self, key: String) -> Option<InFlightGuard> {
        self.take(&key, Holder::Background).ok()
    }

    /// Takes `key` for a call: refused at once if another call holds it;
    /// held by background work, waits up to `wait` for it to be released.
    /// Returns the guard and how long it waited for background work (zero
    /// when the key was free).
    pub async fn acquire_after_background(
        &self,
        key: String,
        wait: Duration,
    ) -> Result<(InFlightGuard, Duration), Held> {
        let began = tokio::time::Instant::now();
        let until = began + wait;
        let mut first = true;
        loop {
            // Registered before the key is looked at: a release between
            // the look and the wait still wakes it.
            let released = self.keys.released.notified();
            match self.take(&key, Holder::Call) {
                Ok(g) if first => return Ok((g, Duration::ZERO)),
                Ok(g) => return Ok((g, began.elapsed())),
                Err(Holder::Call) => return Err(Held::ByCall),
                Err(Holder::Background) if tokio::time::Instant::now() >= until => {
                    return Err(Held::ByBackground);
                }
                Err(Holder::Background) => {}
            }
            first = false;
            let _ = tokio::time::timeout_at(until, released).await;
        }
    }

    /// How many keys are held right now.
    pub fn len(&self) -> usize {
        lock(&self.keys.held).len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        lock(&self.keys.held).remove(&self.key);
        self.keys.released.notify_waiters();
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

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_call_waits_for_background_work_and_is_refused_by_another_call() {
        let f = InFlight::default();
        let bg = f.try_acquire_background("v".into()).unwrap();
        assert!(f.try_acquire_background("v".into()).is_none());
        assert!(
            f.try_acquire("v".into()).is_none(),
            "try_acquire never waits"
        );
        // Background work released after 3 s: the call gets the key then.
        let f2 = f.clone();
        let waiting = tokio::spawn(async move {
            f2.acquire_after_background("v".into(), Duration::from_secs(10))
                .await
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !waiting.is_finished(),
            "the call waits while background work holds the key"
        );
        drop(bg);
        let (g, waited) = waiting.await.unwrap().expect("taken once released");
        assert_eq!(waited, Duration::from_secs(3));
        // Held by a call: another call is refused at once, background work too.
        assert_eq!(
            f.acquire_after_background("v".into(), Duration::from_secs(10))
                .await
                .err(),
            Some(Held::ByCall)
        );
        assert!(f.try_acquire_background("v".into()).is_none());
        drop(g);
        // Background work that outlasts the wait: refused, saying so.
        let _bg = f.try_acquire_background("v".into()).unwrap();
        let began = tokio::time::Instant::now();
        assert_eq!(
            f.acquire_after_background("v".into(), Duration::from_secs(2))
                .await
                .err(),
            Some(Held::ByBackground)
        );
        assert_eq!(began.elapsed(), Duration::from_secs(2));
        // Other keys are free throughout.
        let (_w, waited) = f
            .acquire_after_background("w".into(), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(waited, Duration::ZERO, "a free key is taken at once");
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
