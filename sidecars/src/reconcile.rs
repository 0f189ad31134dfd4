//! One reconciliation pass: make the plugin's world match a volumes file.
//! Every mutating call is preceded by a durable intent in the state file,
//! so a pass killed at any instant converges on the next one; a dry run
//! walks the same path against an in-memory copy and calls nothing that
//! mutates. A failure stops only its own volume; the others are attempted.
//!
//! Never touched: volumes the state file does not record (foreign ones),
//! and data, when the file asks for something only a rebuild could give
//! (a different mode, filesystem or access mode, or a smaller size).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::plugin::{Capability, CreateVolume, Lookup, Plugin, PublishRequest};
use crate::schedule::{due, slot_start, snapshot_name, to_prune};
use crate::size::human_size;
use crate::spec::{VolumeSpec, VolumesFile};
use crate::state::{
    Intent, Publication, ScheduledSnapshot, State, StateError, StateStore, VolumeState,
};

/// How a pass runs.
#[derive(Debug, Clone, Default)]
pub struct ApplyOptions {
    /// Report what would be done; call nothing that mutates, write nothing.
    pub dry_run: bool,
    /// Unpublish and delete recorded volumes that left the file.
    pub prune: bool,
    /// Now, in unix seconds (the snapshot slot clock).
    pub now: u64,
    /// Set to stop after the current step (SIGTERM in `--watch`).
    pub stop: Option<Arc<AtomicBool>>,
}

/// What the reconciler does (or would do) to one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// CreateVolume (`resumed`: repeated with the arguments recorded before
    /// an interrupted run).
    Create {
        bytes: i64,
        volume_id: Option<String>,
        resumed: bool,
    },
    /// The recorded volume is gone from the plugin; it is created again.
    Vanished {
        volume_id: String,
    },
    Publish {
        target: PathBuf,
        read_only: bool,
    },
    Unpublish {
        target: PathBuf,
    },
    /// ControllerExpandVolume (and NodeExpandVolume where the plugin's
    /// node must grow the filesystem too).
    Expand {
        from: i64,
        to: i64,
        /// The volume already had `to` (an earlier pass grew it and its
        /// filesystem was not grown yet): only the node's part is left.
        filesystem_only: bool,
        /// On a failure: the capacity the plugin reports afterwards, when
        /// it reached `to` (the volume grew, its filesystem did not).
        #[serde(skip_serializing_if = "Option::is_none")]
        reached: Option<i64>,
    },
    /// ControllerModifyVolume with the file's mutable parameters.
    Modify {
        mutable_parameters: BTreeMap<String, String>,
    },
    Snapshot {
        snapshot: String,
        snapshot_id: Option<String>,
    },
    PruneSnapshot {
        snapshot: String,
        snapshot_id: String,
    },
    /// DeleteVolume (`--prune`); its scheduled snapshots are kept.
    Delete {
        volume_id: Option<String>,
        kept_snapshots: Vec<String>,
    },
    /// Recorded, not in the file, and no `--prune`.
    LeftAlone {
        volume_id: Option<String>,
    },
    /// The file asks for something that would destroy data.
    Refuse {
        reason: String,
    },
}

/// How an action turned out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Dry run: would be done.
    Planned,
    Done,
    Failed {
        error: String,
    },
    /// Reported, not applied.
    Refused,
    /// Made, but not finished yet (a snapshot still copying in the
    /// background); the call is repeated on the next pass.
    Pending {
        reason: String,
    },
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub volume: String,
    #[serde(flatten)]
    pub action: Action,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Event {
    /// Whether this event makes the pass unsuccessful.
    pub fn is_failure(&self) -> bool {
        matches!(self.outcome, Outcome::Failed { .. } | Outcome::Refused)
    }

    /// Whether this event leaves work for a later pass.
    pub fn is_pending(&self) -> bool {
        matches!(self.outcome, Outcome::Pending { .. })
    }
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = &self.volume;
        let id = |id: &Option<String>| match id {
            Some(id) => format!(" ({id})"),
            None => String::new(),
        };
        let what = match &self.action {
            Action::Create {
                bytes,
                volume_id,
                resumed,
            } => format!(
                "{} volume {v}{}{}",
                self.verb("created", "create"),
                id(volume_id),
                if *resumed {
                    format!(", resuming an interrupted create of {}", human_size(*bytes))
                } else if volume_id.is_none() {
                    format!(" of {}", human_size(*bytes))
                } else {
                    String::new()
                }
            ),
            Action::Vanished { volume_id } => {
                format!("volume {v} ({volume_id}) is gone from the plugin; it is created again")
            }
            Action::Publish { target, read_only } => format!(
                "{} {v} at {}{}",
                self.verb("published", "publish"),
                target.display(),
                if *read_only { " (read-only)" } else { "" }
            ),
            Action::Unpublish { target } => format!(
                "{} {v} from {}",
                self.verb("unpublished", "unpublish"),
                target.display()
            ),
            Action::Expand {
                to,
                filesystem_only: true,
                ..
            } => format!(
                "{} the filesystem of {v} to {} (the volume already has {})",
                self.verb("grew", "grow"),
                human_size(*to),
                human_size(*to)
            ),
            Action::Expand {
                from, to, reached, ..
            } => format!(
                "{} {v} from {} to {}{}",
                self.verb("expanded", "expand"),
                human_size(*from),
                human_size(*to),
                match reached {
                    Some(r) => format!(
                        ": the volume has {} but its filesystem was not grown",
                        human_size(*r)
                    ),
                    None => String::new(),
                }
            ),
            Action::Modify { mutable_parameters } => format!(
                "{} {v}'s mutable parameters to {}",
                self.verb("changed", "change"),
                mutable_parameters
                    .iter()
                    .map(|(k, val)| format!("{k}={val}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Action::Snapshot {
                snapshot,
                snapshot_id,
            } => format!(
                "{} {snapshot} of {v}{}",
                self.verb("snapshot", "take snapshot"),
                id(snapshot_id)
            ),
            Action::PruneSnapshot {
                snapshot,
                snapshot_id,
            } => format!(
                "{} {snapshot} of {v} ({snapshot_id})",
                self.verb("pruned snapshot", "prune snapshot")
            ),
            Action::Delete {
                volume_id,
                kept_snapshots,
            } => format!(
                "{} {v}{}{}",
                self.verb("unpublished/deleted", "unpublish/delete"),
                id(volume_id),
                if kept_snapshots.is_empty() {
                    String::new()
                } else {
                    format!("; kept its snapshots {}", kept_snapshots.join(", "))
                }
            ),
            Action::LeftAlone { volume_id } => {
                format!(
                    "left alone: {v}{} (not in the file; --prune removes it)",
                    id(volume_id)
                )
            }
            Action::Refuse { reason } => format!("refused: {v}: {reason}"),
        };
        match &self.outcome {
            // Actions with a verb already say "FAILED to …".
            Outcome::Failed { error } if self.has_verb() => write!(f, "{what}: {error}"),
            Outcome::Failed { error } => write!(f, "FAILED: {what}: {error}"),
            Outcome::Pending { reason } => write!(f, "{what}: {reason}"),
            _ => f.write_str(&what),
        }
    }
}

impl Event {
    /// The action's verb as the outcome puts it: "would create", "FAILED
    /// to create" (never a past tense for something that did not happen),
    /// or "created".
    fn verb(&self, done: &'static str, planned: &'static str) -> String {
        match self.outcome {
            Outcome::Planned => format!("would {planned}"),
            Outcome::Failed { .. } => format!("FAILED to {planned}"),
            _ => done.to_owned(),
        }
    }

    /// Whether the action's text starts with [`Event::verb`].
    fn has_verb(&self) -> bool {
        !matches!(
            self.action,
            Action::Vanished { .. } | Action::LeftAlone { .. } | Action::Refuse { .. }
        )
    }
}

/// Receives events as they happen (table output prints each at once).
pub trait Report {
    fn event(&mut self, event: &Event);
}

impl<F: FnMut(&Event)> Report for F {
    fn event(&mut self, event: &Event) {
        self(event)
    }
}

/// The result of a pass.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub dry_run: bool,
    /// No action failed, was refused or is pending (and the pass was not
    /// stopped).
    pub converged: bool,
    pub stopped: bool,
    pub events: Vec<Event>,
}

/// Why a volume's steps ended early.
enum Halt {
    /// Reported as an event; go on with the next volume.
    Failed,
    Stopped,
    State(StateError),
}

impl From<StateError> for Halt {
    fn from(e: StateError) -> Halt {
        Halt::State(e)
    }
}

struct Pass<'a, P: Plugin> {
    plugin: &'a mut P,
    /// None on a dry run.
    store: Option<&'a StateStore>,
    state: State,
    opts: &'a ApplyOptions,
    report: &'a mut dyn Report,
    events: Vec<Event>,
}

/// Runs one pass. `state` is what the store holds (or, for a dry run, what
/// was read without the lock); with a store, every change is saved before
/// the call it announces. Only an error of the state file itself ends the
/// pass early: plugin errors are events.
pub async fn apply<P: Plugin>(
    plugin: &mut P,
    file: &VolumesFile,
    store: Option<&StateStore>,
    state: State,
    opts: &ApplyOptions,
    report: &mut dyn Report,
) -> Result<Summary, StateError> {
    let store = if opts.dry_run { None } else { store };
    let mut pass = Pass {
        plugin,
        store,
        state,
        opts,
        report,
        events: Vec::new(),
    };
    let mut stopped = false;
    let declared: Vec<&str> = file.volumes.iter().map(|v| v.name.as_str()).collect();
    let leaving: Vec<String> = pass
        .state
        .volumes
        .keys()
        .filter(|n| !declared.contains(&n.as_str()))
        .cloned()
        .collect();
    let mut halts = Vec::new();
    for spec in &file.volumes {
        halts.push(pass.converge(spec).await);
    }
    for name in &leaving {
        halts.push(pass.leave(name).await);
    }
    for h in halts {
        match h {
            Ok(()) | Err(Halt::Failed) => {}
            Err(Halt::Stopped) => stopped = true,
            Err(Halt::State(e)) => return Err(e),
        }
    }
    let converged = !stopped && !pass.events.iter().any(|e| e.is_failure() || e.is_pending());
    Ok(Summary {
        dry_run: opts.dry_run,
        converged,
        stopped,
        events: pass.events,
    })
}

fn capability(spec: &VolumeSpec) -> Capability {
    Capability {
        mode: spec.mode,
        fs: spec.fs.clone(),
        access_mode: spec.access_mode,
    }
}

impl<P: Plugin> Pass<'_, P> {
    fn emit(&mut self, volume: &str, action: Action, outcome: Outcome) {
        let e = Event {
            volume: volume.to_owned(),
            action,
            outcome,
        };
        self.report.event(&e);
        self.events.push(e);
    }

    fn done(&self) -> Outcome {
        if self.opts.dry_run {
            Outcome::Planned
        } else {
            Outcome::Done
        }
    }

    fn fail(&mut self, volume: &str, action: Action, e: P::Error) -> Halt {
        let error = crate::error_chain(&e);
        self.emit(volume, action, Outcome::Failed { error });
        Halt::Failed
    }

    /// Saves the state (nothing on a dry run), unless a stop was asked for:
    /// called before every mutating call, so a stop lands between steps.
    fn checkpoint(&mut self) -> Result<(), Halt> {
        if let Some(stop) = &self.opts.stop
            && stop.load(Ordering::SeqCst)
        {
            return Err(Halt::Stopped);
        }
        self.save()
    }

    fn save(&mut self) -> Result<(), Halt> {
        if let Some(store) = self.store {
            store.save(&self.state)?;
        }
        Ok(())
    }

    fn rec(&mut self, name: &str) -> &mut VolumeState {
        self.state
            .volumes
            .get_mut(name)
            .expect("the volume's record exists while it is converged")
    }

    /// Brings one declared volume to its spec.
    async fn converge(&mut self, spec: &VolumeSpec) -> Result<(), Halt> {
        let name = spec.name.as_str();
        let want_cap = capability(spec);
        // Interrupted steps that the normal path below does not repeat.
        if let Some(intent) = self.state.volumes.get(name).and_then(|r| r.intent.clone()) {
            match intent {
                Intent::Delete => self.delete(name).await?,
                Intent::Unpublish { target } => self.unpublish(name, &target).await?,
                Intent::PruneSnapshot { name: snap } => self.prune_snapshot(name, &snap).await?,
                Intent::Create | Intent::Expand { .. } | Intent::Snapshot { .. } => {}
            }
        }
        let mut observed = None;
        match self.state.volumes.get(name).cloned() {
            None => {
                self.state.volumes.insert(
                    name.to_owned(),
                    VolumeState {
                        volume_id: None,
                        size_bytes: spec.size_bytes,
                        capacity_bytes: 0,
                        capability: want_cap.clone(),
                        parameters: spec.parameters.clone(),
                        mutable_parameters: spec.mutable_parameters.clone(),
                        published: None,
                        snapshots: vec![],
                        intent: Some(Intent::Create),
                    },
                );
                self.create(name, false).await?;
            }
            Some(r) if r.volume_id.is_none() => self.create(name, true).await?,
            Some(r) => {
                let id = r.volume_id.clone().unwrap_or_default();
                match self.plugin.lookup_volume(&id).await {
                    Ok(Lookup::Absent) => {
                        self.emit(
                            name,
                            Action::Vanished {
                                volume_id: id.clone(),
                            },
                            Outcome::Done,
                        );
                        let rec = self.rec(name);
                        rec.volume_id = None;
                        rec.published = None;
                        rec.intent = Some(Intent::Create);
                        rec.size_bytes = spec.size_bytes;
                        rec.capability = want_cap.clone();
                        rec.parameters = spec.parameters.clone();
                        rec.mutable_parameters = spec.mutable_parameters.clone();
                        self.create(name, false).await?;
                    }
                    Ok(Lookup::Present { capacity_bytes }) => observed = Some(capacity_bytes),
                    Ok(Lookup::Unknown) => {}
                    Err(e) => {
                        return Err(self.fail(
                            name,
                            Action::Refuse {
                                reason: "cannot tell whether the volume exists".into(),
                            },
                            e,
                        ));
                    }
                }
            }
        }
        let rec = self.rec(name).clone();
        if rec.capability != want_cap {
            let reason = format!(
                "the file asks for {} but the volume was created as {}; \
                 a volume's mode, filesystem and access mode cannot change \
                 (create a new volume and copy the data)",
                describe(&want_cap),
                describe(&rec.capability)
            );
            self.emit(name, Action::Refuse { reason }, Outcome::Refused);
            return Err(Halt::Failed);
        }
        // CreateVolume parameters are fixed at creation; a change is
        // reported (the volume keeps working as created) rather than ignored.
        let parameters = if rec.parameters != spec.parameters {
            let reason = format!(
                "the file's parameters {:?} differ from the {:?} the volume was \
                 created with; parameters cannot change after creation \
                 (restore them in the file, or create a new volume)",
                spec.parameters, rec.parameters
            );
            self.emit(name, Action::Refuse { reason }, Outcome::Refused);
            Err(Halt::Failed)
        } else {
            Ok(())
        };
        // A pending snapshot holds the one intent slot: it is finished
        // first, and until it is, the steps that record an intent of their
        // own (a target change, an expansion, the next snapshot) wait, lest
        // the snapshot be forgotten on the plugin. An unchanged
        // publication is still re-asserted.
        if let Some(Intent::Snapshot { name: snap, slot }) = self.rec(name).intent.clone() {
            let finished = match self.snapshot(name, &snap, slot).await {
                Ok(finished) => Ok(finished),
                Err(Halt::Failed) => Err(Halt::Failed),
                Err(other) => return Err(other),
            };
            if !matches!(finished, Ok(true)) {
                let unchanged = Publication {
                    target: spec.target.clone(),
                    read_only: spec.read_only,
                };
                if self.rec(name).published.as_ref() == Some(&unchanged) {
                    self.publish(name, spec).await?;
                }
                return finished.and(parameters);
            }
        }
        self.publish(name, spec).await?;
        // A refused or failed expansion or modification does not hold
        // back the snapshots.
        let expanded = match self.expand(name, spec, observed).await {
            Err(Halt::Failed) => Err(Halt::Failed),
            Err(other) => return Err(other),
            Ok(()) => Ok(()),
        };
        let modified = match self.modify(name, spec).await {
            Err(Halt::Failed) => Err(Halt::Failed),
            Err(other) => return Err(other),
            Ok(()) => Ok(()),
        };
        self.snapshots(name, spec).await?;
        expanded.and(modified).and(parameters)
    }

    /// CreateVolume with the arguments recorded in the volume's state.
    async fn create(&mut self, name: &str, resumed: bool) -> Result<(), Halt> {
        let rec = self.rec(name).clone();
        let req = CreateVolume {
            name: name.to_owned(),
            bytes: rec.size_bytes,
            capability: rec.capability.clone(),
            parameters: rec.parameters.clone(),
            mutable_parameters: rec.mutable_parameters.clone(),
        };
        self.checkpoint()?;
        let action = |volume_id| Action::Create {
            bytes: req.bytes,
            volume_id,
            resumed,
        };
        if self.opts.dry_run {
            let rec = self.rec(name);
            rec.volume_id = Some(format!("<new {name}>"));
            rec.capacity_bytes = req.bytes;
            rec.intent = None;
            self.emit(name, action(None), Outcome::Planned);
            return Ok(());
        }
        let v = match self.plugin.create_volume(&req).await {
            Ok(v) => v,
            Err(e) => return Err(self.fail(name, action(None), e)),
        };
        let rec = self.rec(name);
        rec.volume_id = Some(v.id.clone());
        rec.capacity_bytes = v.capacity_bytes;
        rec.intent = None;
        self.save()?;
        self.emit(name, action(Some(v.id)), Outcome::Done);
        Ok(())
    }

    fn id(&mut self, name: &str) -> String {
        self.rec(name).volume_id.clone().unwrap_or_default()
    }

    /// Publishes at the spec's target, unpublishing a previous target (or
    /// read-only flag) first. An unchanged publication is re-asserted
    /// silently (publish is idempotent), so a lost mount comes back.
    async fn publish(&mut self, name: &str, spec: &VolumeSpec) -> Result<(), Halt> {
        let want = Publication {
            target: spec.target.clone(),
            read_only: spec.read_only,
        };
        if let Some(old) = self.rec(name).published.clone()
            && old != want
        {
            self.unpublish(name, &old.target).await?;
        }
        let announced = self.rec(name).published.as_ref() != Some(&want);
        let action = Action::Publish {
            target: want.target.clone(),
            read_only: want.read_only,
        };
        // Recorded before the call: a crash leaves the target known, and
        // the next pass re-asserts (or undoes) it.
        self.rec(name).published = Some(want.clone());
        self.checkpoint()?;
        if self.opts.dry_run {
            if announced {
                self.emit(name, action, Outcome::Planned);
            }
            return Ok(());
        }
        let id = self.id(name);
        let cap = self.rec(name).capability.clone();
        let req = PublishRequest {
            volume_id: &id,
            target: &want.target,
            read_only: want.read_only,
            capability: &cap,
        };
        match self.plugin.publish(&req).await {
            Ok(()) if announced => self.emit(name, action, Outcome::Done),
            Ok(()) => {}
            Err(e) => return Err(self.fail(name, action, e)),
        }
        Ok(())
    }

    async fn unpublish(&mut self, name: &str, target: &Path) -> Result<(), Halt> {
        let action = Action::Unpublish {
            target: target.to_owned(),
        };
        self.rec(name).intent = Some(Intent::Unpublish {
            target: target.to_owned(),
        });
        self.checkpoint()?;
        if !self.opts.dry_run {
            let id = self.id(name);
            if let Err(e) = self.plugin.unpublish(&id, target).await {
                return Err(self.fail(name, action, e));
            }
        }
        let rec = self.rec(name);
        if rec.published.as_ref().is_some_and(|p| p.target == target) {
            rec.published = None;
        }
        rec.intent = None;
        self.save()?;
        let outcome = self.done();
        self.emit(name, action, outcome);
        Ok(())
    }

    /// Grows the volume to the spec's size; a smaller size is refused.
    async fn expand(
        &mut self,
        name: &str,
        spec: &VolumeSpec,
        observed: Option<i64>,
    ) -> Result<(), Halt> {
        let rec = self.rec(name).clone();
        let current = observed.unwrap_or(rec.capacity_bytes);
        let pending = match rec.intent {
            Some(Intent::Expand { bytes }) => bytes,
            _ => 0,
        };
        if spec.size_bytes < rec.size_bytes && pending == 0 {
            let reason = format!(
                "size {} is smaller than the {} it has; shrinking is refused",
                human_size(spec.size_bytes),
                human_size(rec.size_bytes)
            );
            self.emit(name, Action::Refuse { reason }, Outcome::Refused);
            return Err(Halt::Failed);
        }
        let goal = spec.size_bytes.max(pending);
        // `size_bytes` moves only when an expansion completes: below the
        // file's size it means one was begun and not finished (its intent
        // may have been replaced by a target change's unpublish), so the
        // idempotent call is repeated even if the controller's capacity
        // already fits; the node side may still be to do.
        if goal <= current && pending == 0 && rec.size_bytes >= spec.size_bytes {
            if rec.size_bytes != spec.size_bytes || rec.capacity_bytes != current {
                let r = self.rec(name);
                r.size_bytes = spec.size_bytes;
                r.capacity_bytes = current;
                self.save()?;
            }
            return Ok(());
        }
        // The controller already has the size (an earlier pass grew it):
        // what is left is the node's part, and the report says so rather
        // than "from 20Gi to 20Gi".
        let filesystem_only = current >= goal;
        self.rec(name).intent = Some(Intent::Expand { bytes: goal });
        self.checkpoint()?;
        let capacity = if self.opts.dry_run {
            goal
        } else {
            let id = rec.volume_id.clone().unwrap_or_default();
            let at = rec.published.as_ref().map(|p| p.target.clone());
            match self
                .plugin
                .expand(&id, goal, at.as_deref(), &rec.capability)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    // Where the volume got to, so the report tells the
                    // real state (grown, filesystem not) once.
                    let reached = match self.plugin.lookup_volume(&id).await {
                        Ok(Lookup::Present { capacity_bytes })
                            if capacity_bytes >= goal && !filesystem_only =>
                        {
                            Some(capacity_bytes)
                        }
                        _ => None,
                    };
                    return Err(self.fail(
                        name,
                        Action::Expand {
                            from: current,
                            to: goal,
                            filesystem_only,
                            reached,
                        },
                        e,
                    ));
                }
            }
        };
        let r = self.rec(name);
        r.size_bytes = goal;
        r.capacity_bytes = capacity;
        r.intent = None;
        self.save()?;
        let outcome = self.done();
        self.emit(
            name,
            Action::Expand {
                from: current,
                to: capacity,
                filesystem_only,
                reached: None,
            },
            outcome,
        );
        // An interrupted expansion was finished to its recorded size; a file
        // that asks for less meanwhile is a shrink, refused like any other.
        if spec.size_bytes < goal {
            let reason = format!(
                "size {} is smaller than the {} it has; shrinking is refused",
                human_size(spec.size_bytes),
                human_size(goal)
            );
            self.emit(name, Action::Refuse { reason }, Outcome::Refused);
            return Err(Halt::Failed);
        }
        Ok(())
    }

    /// ControllerModifyVolume when the file's mutable parameters differ
    /// from those the volume was last given (a key only removed from the
    /// file is forgotten, not undone: CSI has no call to unset one). The
    /// record changes only once the call succeeded, so an interrupted or
    /// failed call is repeated on the next pass.
    async fn modify(&mut self, name: &str, spec: &VolumeSpec) -> Result<(), Halt> {
        let had = self.rec(name).mutable_parameters.clone();
        if had == spec.mutable_parameters {
            return Ok(());
        }
        let changed = spec
            .mutable_parameters
            .iter()
            .any(|(k, v)| had.get(k) != Some(v));
        if changed {
            let action = Action::Modify {
                mutable_parameters: spec.mutable_parameters.clone(),
            };
            self.checkpoint()?;
            if !self.opts.dry_run {
                let id = self.id(name);
                if let Err(e) = self
                    .plugin
                    .modify_volume(&id, &spec.mutable_parameters)
                    .await
                {
                    return Err(self.fail(name, action, e));
                }
            }
            let outcome = self.done();
            self.emit(name, action, outcome);
        }
        self.rec(name).mutable_parameters = spec.mutable_parameters.clone();
        self.save()
    }

    /// Takes the current slot's snapshot when due (an interrupted one was
    /// finished by [`Pass::converge`] before anything else), and prunes recorded scheduled snapshots beyond `keep`.
    async fn snapshots(&mut self, name: &str, spec: &VolumeSpec) -> Result<(), Halt> {
        let Some(sched) = spec.snapshots else {
            return Ok(());
        };
        let slot = slot_start(self.opts.now, sched.every_secs);
        if due(&self.rec(name).snapshots, slot) {
            let snap = snapshot_name(name, slot);
            self.rec(name).intent = Some(Intent::Snapshot {
                name: snap.clone(),
                slot,
            });
            if !self.snapshot(name, &snap, slot).await? {
                return Ok(());
            }
        }
        for old in to_prune(&self.rec(name).snapshots, sched.keep) {
            self.prune_snapshot(name, &old.name).await?;
        }
        Ok(())
    }

    /// CreateSnapshot `snap` (intent already set), then records it once
    /// it is ready to use. False when it is not yet (copying in the
    /// background): the intent stays, so the next pass asks again, and
    /// nothing is pruned meanwhile.
    async fn snapshot(&mut self, name: &str, snap: &str, slot: u64) -> Result<bool, Halt> {
        self.checkpoint()?;
        let (id, creation_time) = if self.opts.dry_run {
            (None, None)
        } else {
            let vol = self.id(name);
            match self.plugin.create_snapshot(&vol, snap).await {
                Ok(s) if !s.ready => {
                    let action = Action::Snapshot {
                        snapshot: snap.to_owned(),
                        snapshot_id: Some(s.id),
                    };
                    let reason = "not ready to use yet (copying in the background); \
                                  checked again on the next pass"
                        .to_owned();
                    self.emit(name, action, Outcome::Pending { reason });
                    return Ok(false);
                }
                Ok(s) => (Some(s.id), s.creation_time),
                Err(e) => {
                    let action = Action::Snapshot {
                        snapshot: snap.to_owned(),
                        snapshot_id: None,
                    };
                    return Err(self.fail(name, action, e));
                }
            }
        };
        let rec = self.rec(name);
        rec.snapshots.retain(|s| s.name != snap);
        rec.snapshots.push(ScheduledSnapshot {
            name: snap.to_owned(),
            id: id.clone().unwrap_or_default(),
            slot,
            creation_time,
        });
        rec.intent = None;
        self.save()?;
        let outcome = self.done();
        self.emit(
            name,
            Action::Snapshot {
                snapshot: snap.to_owned(),
                snapshot_id: id,
            },
            outcome,
        );
        Ok(true)
    }

    /// DeleteSnapshot of a recorded scheduled snapshot, then forgets it.
    async fn prune_snapshot(&mut self, name: &str, snap: &str) -> Result<(), Halt> {
        let Some(s) = self
            .rec(name)
            .snapshots
            .iter()
            .find(|s| s.name == snap)
            .cloned()
        else {
            self.rec(name).intent = None;
            return self.save();
        };
        let action = Action::PruneSnapshot {
            snapshot: s.name.clone(),
            snapshot_id: s.id.clone(),
        };
        self.rec(name).intent = Some(Intent::PruneSnapshot {
            name: s.name.clone(),
        });
        self.checkpoint()?;
        if !self.opts.dry_run
            && let Err(e) = self.plugin.delete_snapshot(&s.id).await
        {
            return Err(self.fail(name, action, e));
        }
        let rec = self.rec(name);
        rec.snapshots.retain(|x| x.name != snap);
        rec.intent = None;
        self.save()?;
        let outcome = self.done();
        self.emit(name, action, outcome);
        Ok(())
    }

    /// A recorded volume that is not in the file: deleted with `--prune`
    /// (or when an interrupted deletion is pending), otherwise reported.
    async fn leave(&mut self, name: &str) -> Result<(), Halt> {
        let rec = self.rec(name).clone();
        if self.opts.prune || rec.intent == Some(Intent::Delete) {
            return self.delete(name).await;
        }
        self.emit(
            name,
            Action::LeftAlone {
                volume_id: rec.volume_id,
            },
            Outcome::Done,
        );
        Ok(())
    }

    /// Unpublishes the volume everywhere this host has it published, then
    /// DeleteVolume, then forgets it. Its scheduled snapshots are kept.
    async fn delete(&mut self, name: &str) -> Result<(), Halt> {
        let rec = self.rec(name).clone();
        let kept: Vec<String> = rec.snapshots.iter().map(|s| s.id.clone()).collect();
        let action = |volume_id: Option<String>| Action::Delete {
            volume_id,
            kept_snapshots: kept.clone(),
        };
        if rec.volume_id.is_none() {
            if rec.intent != Some(Intent::Create) && rec.intent != Some(Intent::Delete) {
                // Never asked for: nothing can exist.
                self.state.volumes.remove(name);
                return self.save();
            }
            // An interrupted create may have made the volume: CreateVolume
            // with the recorded arguments is the only plain-CSI way to learn
            // its id (and is a no-op when it exists).
            self.create(name, true).await?;
        }
        let id = self.id(name);
        self.rec(name).intent = Some(Intent::Delete);
        self.checkpoint()?;
        if self.opts.dry_run {
            self.state.volumes.remove(name);
            self.emit(name, action(Some(id)), Outcome::Planned);
            return Ok(());
        }
        let mut targets = match self.plugin.publications(&id).await {
            Ok(t) => t,
            Err(e) => return Err(self.fail(name, action(Some(id)), e)),
        };
        if let Some(p) = rec.published.as_ref()
            && !targets.contains(&p.target)
        {
            targets.push(p.target.clone());
        }
        for t in targets {
            if let Err(e) = self.plugin.unpublish(&id, &t).await {
                return Err(self.fail(name, Action::Unpublish { target: t }, e));
            }
            self.rec(name).published = None;
        }
        if let Err(e) = self.plugin.delete_volume(&id).await {
            return Err(self.fail(name, action(Some(id)), e));
        }
        self.state.volumes.remove(name);
        self.save()?;
        self.emit(name, action(Some(id)), Outcome::Done);
        Ok(())
    }
}

fn describe(c: &Capability) -> String {
    let mode = match c.mode {
        crate::spec::VolumeMode::Mount if c.fs.is_empty() => "mount (plugin's filesystem)".into(),
        crate::spec::VolumeMode::Mount => format!("mount ({})", c.fs),
        crate::spec::VolumeMode::Block => "block".into(),
    };
    format!("{mode}, {}", c.access_mode.as_str())
}

#[cfg(test)]
mod tests;
