//! The headless counterparts of the Kubernetes CSI sidecars: a reconciler
//! that makes a CSI plugin's volumes match a declarative file
//! (provision, stage/publish, expand, scheduled snapshots, prune), and a
//! `/healthz` endpoint backed by the plugin's Probe, served by a small
//! HTTP/1.1 server that the driver's `/metrics` endpoint uses too.
//!
//! Everything here speaks to the plugin through the [`Plugin`] port, which
//! is CSI-shaped and small, so the logic works against any CSI driver and
//! is tested without one. This crate never depends on the `stowage` crate:
//! the binary implements the port over gRPC (`stowage::client::apply`).

pub mod health;
pub mod http;
pub mod plugin;
pub mod reconcile;
pub mod schedule;
pub mod size;
pub mod spec;
pub mod state;
pub mod watch;

pub use plugin::{Capability, Lookup, Plugin, SnapshotInfo};
pub use reconcile::{Action, ApplyOptions, Event, Outcome, Report, apply};
pub use spec::{AccessMode, SpecError, VolumeMode, VolumeSpec, VolumesFile};
pub use state::{State, StateError, StateStore};

/// The error and its causes on one line, for logs and reports.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
