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
use crate::reconcile::{ApplyOptions, Event, Report, apply};
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

/// Passes events on, except a failure that the previous pass reported in
/// the same words (same volume, action and error): a failure that lasts is
/// reported once, when it starts or changes, not on every pass. Each pass
/// still logs how many actions failed.
struct Repeats<'a> {
    inner: &'a mut dyn Report,
    previous: std::collections::HashSet<String>,
    current: std::collections::HashSet<String>,
}

impl Repeats<'_> {
    /// Ends a pass: its failures are the ones the next pass leaves out.
    fn next_pass(&mut self) {
        self.previous = std::mem::take(&mut self.current);
    }
}

impl Report for Repeats<'_> {
    fn event(&mut self, e: &Event) {
        if e.is_failure() {
            let text = e.to_string();
            let repeated = self.previous.contains(&text);
            self.current.insert(text);
            if repeated {
                tracing::debug!(volume = %e.volume, "failing as on the previous pass: {e}");
                return;
            }
        }
        self.inner.event(e);
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
    let mut report = Repeats {
        inner: report,
        previous: Default::default(),
        current: Default::default(),
    };
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
                Ok(state) => {
                    apply(plugin, &good, Some(store), state, &apply_opts, &mut report).await
                }
                Err(e) => Err(e),
            };
            report.next_pass();
            match result {
                Ok(s) if s.converged => {
                    tracing::info!(actions = s.events.len(), "applied; converged")
                }
                Ok(s) if s.stopped => tracing::info!("apply stopped"),
                Ok(s) => tracing::warn!(
                    failed = s.events.iter().filter(|e| e.is_failure()).count(),
                    pending = s.events.iter().filter(|e| e.is_pending()).count(),
                    "applied; some actions failed or are pending (retried at the next interval; \
                     a failure is printed once while it stays the same)"
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{Action, Outcome};

    fn failed(error: &str) -> Event {
        Event {
            volume: "pgdata".into(),
            action: Action::Expand {
                from: 1 << 30,
                to: 2 << 30,
                filesystem_only: true,
                reached: None,
            },
            outcome: Outcome::Failed {
                error: error.into(),
            },
        }
    }

    /// A failure that stays the same is printed on the pass where it
    /// starts, not on the following ones; a changed one, one that returns
    /// after a pass without it, and every success are printed.
    #[test]
    fn a_lasting_failure_is_reported_once() {
        let mut seen = Vec::new();
        let mut sink = |e: &Event| seen.push(e.to_string());
        let mut r = Repeats {
            inner: &mut sink,
            previous: Default::default(),
            current: Default::default(),
        };
        r.event(&failed("read-only"));
        r.next_pass();
        r.event(&failed("read-only"));
        r.next_pass();
        r.event(&failed("out of space"));
        r.next_pass();
        r.next_pass();
        r.event(&failed("out of space"));
        let done = Event {
            outcome: Outcome::Done,
            ..failed("")
        };
        r.event(&done);
        r.event(&done);
        drop(r);
        assert_eq!(seen.len(), 5, "{seen:#?}");
        assert!(seen[0].contains("read-only") && seen[1].contains("out of space"));
        assert!(seen[2].contains("out of space"));
        assert!(seen[3].starts_with("grew") && seen[4].starts_with("grew"));
    }
}
