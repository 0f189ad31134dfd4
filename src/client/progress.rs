//! A one-line status for long client operations (a snapshot copied in the
//! background, a restore, a first stage that formats): a spinner, what is
//! awaited and the seconds elapsed, redrawn in place on a terminal and
//! cleared at the end. It must never write anything when its sink is not a
//! terminal, so pipes and scripts see only the result on stdout. On a
//! terminal, Ctrl-C clears the line before the process dies of SIGINT.

use std::future::Future;
use std::io::{IsTerminal, Stderr, Write};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How often the line is redrawn while something is awaited.
const REDRAW_EVERY: Duration = Duration::from_millis(100);

/// The longest line drawn, in characters: longer lines would wrap, and a
/// carriage return cannot redraw a wrapped line in place.
const MAX_WIDTH: usize = 79;

const SPINNER: [char; 4] = ['-', '\\', '|', '/'];

/// Erases the current terminal line and returns to its start.
const CLEAR_LINE: &str = "\r\x1b[2K";

/// A status line on `W` (stderr unless a test injects a buffer). Shared by
/// reference: the operation changes the label while [`Progress::track`]
/// redraws it, so the state sits behind a mutex never held across an await.
#[derive(Debug)]
pub struct Progress<W: Write = Stderr> {
    inner: Mutex<Line<W>>,
    /// SIGINT, caught while a line may be drawn so that Ctrl-C can clear it
    /// first (see [`Progress::track`]); `None` off a terminal, where the
    /// default disposition is left alone.
    interrupt: Mutex<Option<tokio::signal::unix::Signal>>,
}

#[derive(Debug)]
struct Line<W> {
    /// `None` when the sink is not a terminal: nothing is ever written.
    sink: Option<W>,
    label: String,
    started: Instant,
    frame: usize,
    drawn: bool,
}

impl Progress<Stderr> {
    /// A status line on stderr, drawn only when stderr is a terminal. On a
    /// terminal, and inside a tokio runtime, SIGINT is caught from now on
    /// (before anything is drawn) and acted on while [`Progress::track`]
    /// awaits.
    pub fn stderr() -> Progress<Stderr> {
        use tokio::signal::unix::{SignalKind, signal};
        let err = std::io::stderr();
        let tty = err.is_terminal();
        let p = Progress::new(err, tty);
        if tty && tokio::runtime::Handle::try_current().is_ok() {
            *lock(&p.interrupt) = signal(SignalKind::interrupt()).ok();
        }
        p
    }

    /// A status line that is never drawn (for library callers).
    pub fn silent() -> Progress<Stderr> {
        Progress::new(std::io::stderr(), false)
    }
}

impl<W: Write> Progress<W> {
    /// A status line on `sink`; `is_terminal` false makes it write nothing.
    pub fn new(sink: W, is_terminal: bool) -> Progress<W> {
        Progress {
            inner: Mutex::new(Line {
                sink: is_terminal.then_some(sink),
                label: String::new(),
                started: Instant::now(),
                frame: 0,
                drawn: false,
            }),
            interrupt: Mutex::new(None),
        }
    }

    fn line(&self) -> MutexGuard<'_, Line<W>> {
        lock(&self.inner)
    }

    /// Says what is awaited now, and redraws.
    pub fn set(&self, label: impl Into<String>) {
        let mut l = self.line();
        l.label = label.into();
        l.draw();
    }

    /// Advances the spinner and redraws.
    pub fn tick(&self) {
        let mut l = self.line();
        l.frame = l.frame.wrapping_add(1);
        l.draw();
    }

    /// Erases the line, if one is drawn; drawing again later is allowed.
    pub fn clear(&self) {
        self.line().clear();
    }

    /// Awaits `fut`, redrawing the line (with the label current at each
    /// redraw) until it completes. The line stays up afterwards: clear it
    /// before printing results. A Ctrl-C caught meanwhile (or since the
    /// last call) clears the line and ends the process by SIGINT, as the
    /// default disposition would have, so the shell sees an interrupt; the
    /// publication records are written before each step for this case.
    pub async fn track<F: Future>(&self, fut: F) -> F::Output {
        let silent = self.line().sink.is_none();
        if silent {
            return fut.await;
        }
        // Taken out for the await (a std mutex is not held across one) and
        // put back after, so a signal between two calls is not lost.
        let mut interrupt = lock(&self.interrupt).take();
        let mut ticks = tokio::time::interval(REDRAW_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => {
                    *lock(&self.interrupt) = interrupt;
                    return out;
                }
                _ = ticks.tick() => self.tick(),
                Some(()) = async {
                    match interrupt.as_mut() {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.clear();
                    die_of_sigint();
                }
            }
        }
    }
}

/// A mutex's guard even after a panic while it was held: a status line
/// has nothing inconsistent worth refusing.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ends the process as an uncaught SIGINT would: the default disposition
/// back, then the signal raised (exit status 130 should that not end it).
fn die_of_sigint() -> ! {
    use nix::sys::signal::{SigHandler, Signal, raise, signal};
    // SAFETY: installing SIG_DFL runs no code in signal context and
    // replaces only tokio's handler, which this process no longer needs.
    let _ = unsafe { signal(Signal::SIGINT, SigHandler::SigDfl) };
    let _ = raise(Signal::SIGINT);
    std::process::exit(130)
}

impl<W: Write> Drop for Progress<W> {
    fn drop(&mut self) {
        self.line().clear();
    }
}

impl<W: Write> Line<W> {
    fn draw(&mut self) {
        let text = render(self.frame, self.started.elapsed(), &self.label);
        let Some(sink) = self.sink.as_mut() else {
            return;
        };
        // A status line that cannot be written is not worth failing for.
        let _ = write!(sink, "{CLEAR_LINE}{text}").and_then(|()| sink.flush());
        self.drawn = true;
    }

    fn clear(&mut self) {
        if !self.drawn {
            return;
        }
        if let Some(sink) = self.sink.as_mut() {
            let _ = sink
                .write_all(CLEAR_LINE.as_bytes())
                .and_then(|()| sink.flush());
        }
        self.drawn = false;
    }
}

/// The status text: spinner frame, label and whole seconds elapsed,
/// shortened to [`MAX_WIDTH`] characters.
fn render(frame: usize, elapsed: Duration, label: &str) -> String {
    let spinner = SPINNER[frame % SPINNER.len()];
    let suffix = format!(" ({}s)", elapsed.as_secs());
    let room = MAX_WIDTH - 2 - suffix.chars().count();
    let label: String = if label.chars().count() > room {
        let mut s: String = label.chars().take(room - 1).collect();
        s.push('…');
        s
    } else {
        label.to_owned()
    };
    format!("{spinner} {label}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_written_when_the_sink_is_not_a_terminal() {
        let mut buf = Vec::new();
        {
            let p = Progress::new(&mut buf, false);
            p.set("creating volume a");
            p.tick();
            p.set("still creating");
            p.clear();
            p.set("drawn again, then dropped");
        }
        assert!(buf.is_empty(), "{:?}", String::from_utf8_lossy(&buf));
    }

    #[test]
    fn a_terminal_gets_the_line_redrawn_in_place_and_cleared() {
        let mut buf = Vec::new();
        {
            let p = Progress::new(&mut buf, true);
            p.set("creating volume a");
            p.tick();
            p.set("waiting for snapshot s");
            p.clear();
            // Cleared once: a second clear writes nothing more.
            p.clear();
        }
        let text = String::from_utf8(buf).unwrap();
        let draws: Vec<&str> = text.split(CLEAR_LINE).collect();
        // Three draws, each starting with the erase sequence, then one clear.
        assert_eq!(draws.len(), 5, "{text:?}");
        assert_eq!(draws[0], "");
        assert!(draws[1].starts_with("- creating volume a ("), "{text:?}");
        assert!(draws[2].starts_with("\\ creating volume a ("), "{text:?}");
        assert!(draws[3].contains("waiting for snapshot s"), "{text:?}");
        assert_eq!(draws[4], "", "cleared last: {text:?}");
        assert!(!text.contains('\n'), "redrawn in place: {text:?}");
    }

    #[test]
    fn dropping_a_drawn_line_clears_it() {
        let mut buf = Vec::new();
        {
            let p = Progress::new(&mut buf, true);
            p.set("x");
        }
        assert!(String::from_utf8(buf).unwrap().ends_with(CLEAR_LINE));
    }

    #[test]
    fn the_line_shows_elapsed_seconds_and_fits_the_width() {
        assert_eq!(
            render(0, Duration::from_millis(3_700), "copying"),
            "- copying (3s)"
        );
        assert_eq!(render(2, Duration::ZERO, "x"), "| x (0s)");
        let long = render(1, Duration::from_secs(12), &"v".repeat(200));
        assert_eq!(long.chars().count(), MAX_WIDTH, "{long}");
        assert!(long.ends_with("v… (12s)"), "{long}");
    }

    #[tokio::test]
    async fn track_returns_the_output_and_writes_nothing_off_a_terminal() {
        let mut buf = Vec::new();
        {
            let p = Progress::new(&mut buf, false);
            p.set("sleeping");
            let out = p
                .track(async {
                    tokio::time::sleep(REDRAW_EVERY * 2).await;
                    7
                })
                .await;
            assert_eq!(out, 7);
        }
        assert!(buf.is_empty());
    }
}
