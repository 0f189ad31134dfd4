//! `--watch`: the reconciler as a long-running sidecar. Waits for the
//! plugin to be ready, applies, then re-applies when the file's content
//! changes (polled every second) and every interval. A file that stops
//! parsing is logged and the last good one kept: nothing is torn down
//! because of a typo. SIGTERM/SIGINT end it after the current step.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use crate::plugin::Plugin;
use crate::reconcile::{ApplyOptions, Report, apply};
use crate::spec::VolumesFile;
use crate::state::StateStore;

/// How the watcher runs.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub file: PathBuf,
    pub interval: Duration,
    pub prune: bool,
}

/// A stop request, set by a signal (or a test) and seen between steps.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    pub flag: Arc<AtomicBool>,
    pub notify: Arc<Notify>,
}

impl Stop {
    pub fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Sleeps for `d`, or less when a stop is requested. True if stopped.
    async fn sleep(&self, d: Duration) -> bool {
        let notified = self.notify.notified();
        if self.requested() {
            return true;
        }
        tokio::select! {
            _ = notified => true,
            _ = tokio::time::sleep(d) => self.requested(),
        }
    }

    /// Requests a stop on SIGTERM or SIGINT.
    pub fn on_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let me = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping after the current step"),
                _ = int.recv() => tracing::info!("SIGINT: stopping after the current step"),
            }
            me.request();
        });
        Ok(())
    }
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Waits until Probe says ready, backing off from 0.5 s to 10 s between
/// tries. False when stopped first.
pub async fn wait_ready<P: Plugin>(plugin: &mut P, stop: &Stop) -> bool {
    let mut delay = Duration::from_millis(500);
    loop {
        match crate::health::check(plugin).await {
            Ok(()) => return true,
            Err(reason) => tracing::warn!(%reason, retry_in = ?delay, "plugin not ready"),
        }
        if stop.sleep(delay).await {
            return false;
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Runs until stopped. `first` is the file as already validated at start.
pub async fn watch<P: Plugin>(
    plugin: &mut P,
    store: &StateStore,
    first: VolumesFile,
    opts: &WatchOptions,
    stop: &Stop,
    report: &mut dyn Report,
) {
    if !wait_ready(plugin, stop).await {
        return;
    }
    let mut good = first;
    let mut last_hash = std::fs::read(&opts.file).ok().map(|b| hash(&b));
    let mut due = true;
    let mut next = Instant::now();
    while !stop.requested() {
        match std::fs::read(&opts.file) {
            Ok(bytes) => {
                let h = hash(&bytes);
                if last_hash != Some(h) {
                    last_hash = Some(h);
                    match VolumesFile::parse(&String::from_utf8_lossy(&bytes)) {
                        Ok(f) => {
                            tracing::info!(file = %opts.file.display(), "volumes file changed");
                            good = f;
                            due = true;
                        }
                        Err(e) => tracing::error!(
                            file = %opts.file.display(),
                            error = %e,
                            "volumes file no longer parses; keeping the last good one"
                        ),
                    }
                }
            }
            Err(e) => {
                tracing::warn!(file = %opts.file.display(), error = %e, "cannot read the volumes file")
            }
        }
        if due || Instant::now() >= next {
            due = false;
            let apply_opts = ApplyOptions {
                dry_run: false,
                prune: opts.prune,
                now: now_secs(),
                stop: Some(stop.flag.clone()),
            };
            let result = match store.load() {
                Ok(state) => apply(plugin, &good, Some(store), state, &apply_opts, report).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(s) if s.converged => {
                    tracing::info!(actions = s.events.len(), "applied; converged")
                }
                Ok(s) if s.stopped => tracing::info!("apply stopped"),
                Ok(s) => tracing::warn!(
                    failed = s.events.iter().filter(|e| e.is_failure()).count(),
                    pending = s.events.iter().filter(|e| e.is_pending()).count(),
                    "applied; some actions failed or are pending (retried at the next interval)"
                ),
                Err(e) => tracing::error!(error = %crate::error_chain(&e), "apply failed"),
            }
            next = Instant::now() + opts.interval;
        }
        if stop.sleep(Duration::from_secs(1)).await {
            break;
        }
    }
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}
