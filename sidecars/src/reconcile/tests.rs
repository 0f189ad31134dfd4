//! The reconciler's logic against an in-memory plugin: planning, intents
//! across a simulated crash, refusals, snapshot schedules and pruning.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::*;
use crate::plugin::{CreatedVolume, SnapshotInfo};

#[derive(Debug, Default)]
struct World {
    /// name → (id, capacity, capability)
    volumes: BTreeMap<String, (String, i64, Capability)>,
    published: BTreeSet<(String, PathBuf)>,
    /// name → (id, volume id)
    snapshots: BTreeMap<String, (String, String)>,
    next: u32,
    mutations: Vec<String>,
    /// Make the named call do its work, then report an error (a lost
    /// answer, as when the applier is killed right after the call).
    lose_answer_of: Option<&'static str>,
    /// Snapshots (by name) still copying in the background: CreateSnapshot
    /// answers `ready: false` for them.
    copying: BTreeSet<String>,
    /// volume id → mutable parameters given (create or modify).
    mutable: BTreeMap<String, BTreeMap<String, String>>,
    /// Make expand grow the volume, then fail with this (the node could
    /// not grow the filesystem), every time.
    node_expand_error: Option<String>,
    /// Make create fail with this (the plugin cannot be reached).
    create_error: Option<String>,
}

#[derive(Debug, Clone, Default)]
struct Fake(Arc<Mutex<World>>);

#[derive(Debug, thiserror::Error)]
#[error("fake: {0}")]
struct FakeError(String);

impl Fake {
    fn w(&self) -> std::sync::MutexGuard<'_, World> {
        self.0.lock().unwrap()
    }

    fn lost(&self, call: &'static str) -> Result<(), FakeError> {
        let mut w = self.w();
        w.mutations.push(call.to_owned());
        if w.lose_answer_of == Some(call) {
            w.lose_answer_of = None;
            return Err(FakeError(format!("{call}: connection lost")));
        }
        Ok(())
    }
}

impl Plugin for Fake {
    type Error = FakeError;

    async fn probe(&mut self) -> Result<bool, FakeError> {
        Ok(true)
    }

    async fn create_volume(&mut self, req: &CreateVolume) -> Result<CreatedVolume, FakeError> {
        if let Some(e) = self.w().create_error.clone() {
            return Err(FakeError(e));
        }
        let v = {
            let mut w = self.w();
            if let Some((id, cap, c)) = w.volumes.get(&req.name).cloned() {
                if c != req.capability || cap < req.bytes {
                    return Err(FakeError("ALREADY_EXISTS".into()));
                }
                CreatedVolume {
                    id,
                    capacity_bytes: cap,
                }
            } else {
                w.next += 1;
                let id = format!("vol-{}", w.next);
                w.volumes.insert(
                    req.name.clone(),
                    (id.clone(), req.bytes, req.capability.clone()),
                );
                w.mutable.insert(id.clone(), req.mutable_parameters.clone());
                CreatedVolume {
                    id,
                    capacity_bytes: req.bytes,
                }
            }
        };
        self.lost("create")?;
        Ok(v)
    }

    async fn lookup_volume(&mut self, id: &str) -> Result<Lookup, FakeError> {
        Ok(self
            .w()
            .volumes
            .values()
            .find(|v| v.0 == id)
            .map(|v| Lookup::Present {
                capacity_bytes: v.1,
            })
            .unwrap_or(Lookup::Absent))
    }

    async fn delete_volume(&mut self, id: &str) -> Result<(), FakeError> {
        self.w().volumes.retain(|_, v| v.0 != id);
        self.lost("delete")
    }

    async fn publish(&mut self, req: &PublishRequest<'_>) -> Result<(), FakeError> {
        self.w()
            .published
            .insert((req.volume_id.to_owned(), req.target.to_owned()));
        self.lost("publish")
    }

    async fn unpublish(&mut self, volume_id: &str, target: &Path) -> Result<(), FakeError> {
        self.w()
            .published
            .remove(&(volume_id.to_owned(), target.to_owned()));
        self.lost("unpublish")
    }

    async fn publications(&mut self, volume_id: &str) -> Result<Vec<PathBuf>, FakeError> {
        Ok(self
            .w()
            .published
            .iter()
            .filter(|(v, _)| v == volume_id)
            .map(|(_, t)| t.clone())
            .collect())
    }

    async fn expand(
        &mut self,
        volume_id: &str,
        bytes: i64,
        _published_at: Option<&Path>,
        _capability: &Capability,
    ) -> Result<i64, FakeError> {
        for v in self.w().volumes.values_mut() {
            if v.0 == volume_id {
                v.1 = v.1.max(bytes);
            }
        }
        let node_error = self.w().node_expand_error.clone();
        if let Some(e) = node_error {
            self.w().mutations.push("expand".into());
            return Err(FakeError(e));
        }
        self.lost("expand")?;
        Ok(bytes)
    }

    async fn modify_volume(
        &mut self,
        volume_id: &str,
        mutable_parameters: &BTreeMap<String, String>,
    ) -> Result<(), FakeError> {
        self.w()
            .mutable
            .entry(volume_id.to_owned())
            .or_default()
            .extend(mutable_parameters.clone());
        self.lost("modify")
    }

    async fn create_snapshot(
        &mut self,
        volume_id: &str,
        name: &str,
    ) -> Result<SnapshotInfo, FakeError> {
        let id = {
            let mut w = self.w();
            w.next += 1;
            let fresh = format!("snap-{}", w.next);
            w.snapshots
                .entry(name.to_owned())
                .or_insert((fresh, volume_id.to_owned()))
                .0
                .clone()
        };
        self.lost("snapshot")?;
        Ok(SnapshotInfo {
            id,
            ready: !self.w().copying.contains(name),
            creation_time: Some(1),
        })
    }

    async fn delete_snapshot(&mut self, snapshot_id: &str) -> Result<(), FakeError> {
        self.w().snapshots.retain(|_, s| s.0 != snapshot_id);
        self.lost("delete_snapshot")
    }
}

struct Harness {
    fake: Fake,
    _dir: tempfile::TempDir,
    store: StateStore,
}

impl Harness {
    fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("state.json")).unwrap();
        Harness {
            fake: Fake::default(),
            _dir: dir,
            store,
        }
    }

    async fn run(&mut self, yaml: &str, opts: ApplyOptions) -> Summary {
        let file = VolumesFile::parse(yaml).unwrap();
        let state = self.store.load().unwrap();
        let mut sink = |_: &Event| {};
        apply(
            &mut self.fake,
            &file,
            Some(&self.store),
            state,
            &opts,
            &mut sink,
        )
        .await
        .unwrap()
    }

    async fn apply_at(&mut self, yaml: &str, now: u64) -> Summary {
        self.run(
            yaml,
            ApplyOptions {
                now,
                ..Default::default()
            },
        )
        .await
    }

    async fn plan(&mut self, yaml: &str, now: u64) -> Summary {
        self.run(
            yaml,
            ApplyOptions {
                dry_run: true,
                now,
                ..Default::default()
            },
        )
        .await
    }

    fn state(&self) -> State {
        self.store.load().unwrap()
    }
}

fn kinds(s: &Summary) -> Vec<String> {
    s.events
        .iter()
        .map(|e| {
            let v = serde_json::to_value(e).unwrap();
            format!(
                "{}:{}:{}",
                e.volume,
                v["action"].as_str().unwrap(),
                v["outcome"].as_str().unwrap()
            )
        })
        .collect()
}

const TWO: &str = "\
volumes:
  - name: a
    size: 1Mi
    target: /t/a
    snapshots: {every: 10s, keep: 2}
  - name: b
    size: 2Mi
    mode: block
    target: /t/b
";

#[tokio::test]
async fn from_empty_everything_is_created_published_and_snapshotted_once() {
    let mut h = Harness::new();
    let plan = h.plan(TWO, 100).await;
    assert_eq!(
        kinds(&plan),
        [
            "a:create:planned",
            "a:publish:planned",
            "a:snapshot:planned",
            "b:create:planned",
            "b:publish:planned"
        ]
    );
    assert!(h.fake.w().mutations.is_empty(), "a dry run mutates nothing");
    assert!(h.state().volumes.is_empty(), "a dry run writes no state");

    let s = h.apply_at(TWO, 100).await;
    assert!(s.converged, "{s:?}");
    assert_eq!(
        kinds(&s),
        [
            "a:create:done",
            "a:publish:done",
            "a:snapshot:done",
            "b:create:done",
            "b:publish:done"
        ]
    );
    assert_eq!(s.events[0].to_string(), "created volume a (vol-1)");
    assert_eq!(s.events[1].to_string(), "published a at /t/a");
    assert_eq!(s.events[2].to_string(), "snapshot a-100 of a (snap-2)");
    let st = h.state();
    assert_eq!(st.volumes["a"].volume_id.as_deref(), Some("vol-1"));
    assert!(st.volumes.values().all(|v| v.intent.is_none()));

    // A rerun in the same slot plans and does nothing visible, but
    // re-asserts the publications.
    assert!(h.plan(TWO, 105).await.events.is_empty());
    h.fake.w().mutations.clear();
    let again = h.apply_at(TWO, 105).await;
    assert!(again.converged && again.events.is_empty(), "{again:?}");
    assert_eq!(h.fake.w().mutations, ["publish", "publish"]);
    assert_eq!(h.fake.w().volumes.len(), 2);
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_is_repeated_with_the_recorded_size() {
    let mut h = Harness::new();
    h.fake.w().lose_answer_of = Some("create");
    let s = h.apply_at(TWO, 100).await;
    assert!(!s.converged);
    let st = h.state();
    assert_eq!(st.volumes["a"].intent, Some(Intent::Create));
    assert_eq!(st.volumes["a"].volume_id, None);
    // b was still attempted.
    assert!(st.volumes["b"].volume_id.is_some());

    // The file grew meanwhile: the create is repeated as recorded (1Mi),
    // giving the same volume, then expanded.
    let grown = TWO.replacen("size: 1Mi", "size: 4Mi", 1);
    let s = h.apply_at(&grown, 100).await;
    assert!(s.converged, "{s:?}");
    assert_eq!(
        kinds(&s)[..3],
        ["a:create:done", "a:publish:done", "a:expand:done"]
    );
    assert!(
        s.events[0].to_string().contains("resuming"),
        "{}",
        s.events[0]
    );
    let w = h.fake.w();
    assert_eq!(w.volumes.len(), 2);
    assert_eq!(w.volumes["a"].1, 4 << 20);
}

/// An expansion whose answer was lost is finished to its recorded size on
/// the next run even if the file now asks for less; the smaller size is
/// then refused, never reported as converged.
#[tokio::test]
async fn an_interrupted_expansion_is_finished_and_a_later_shrink_refused() {
    let mut h = Harness::new();
    assert!(h.apply_at(TWO, 100).await.converged);
    h.fake.w().lose_answer_of = Some("expand");
    let grown = TWO.replacen("size: 1Mi", "size: 4Mi", 1);
    let s = h.apply_at(&grown, 100).await;
    assert!(!s.converged);
    assert_eq!(
        h.state().volumes["a"].intent,
        Some(Intent::Expand { bytes: 4 << 20 })
    );
    // Back to the old size before the next run.
    let s = h.apply_at(TWO, 100).await;
    assert!(!s.converged, "{s:?}");
    let k = kinds(&s);
    assert!(k.contains(&"a:expand:done".to_owned()), "{k:?}");
    assert!(k.contains(&"a:refuse:refused".to_owned()), "{k:?}");
    assert_eq!(h.state().volumes["a"].intent, None);
    assert_eq!(h.fake.w().volumes["a"].1, 4 << 20);
}

/// Changed CreateVolume parameters of an existing volume are reported as
/// refused (the run does not converge) while the volume stays published.
#[tokio::test]
async fn changed_parameters_are_refused_not_ignored() {
    let mut h = Harness::new();
    let with = TWO.replacen(
        "    target: /t/b\n",
        "    target: /t/b\n    parameters: {backend: block}\n",
        1,
    );
    assert!(h.apply_at(&with, 100).await.converged);
    let changed = with.replacen("backend: block", "backend: dir", 1);
    let s = h.apply_at(&changed, 100).await;
    assert!(!s.converged, "{s:?}");
    let k = kinds(&s);
    assert!(k.contains(&"b:refuse:refused".to_owned()), "{k:?}");
    assert!(!k.iter().any(|e| e.starts_with("a:")), "{k:?}");
    assert!(
        h.fake
            .w()
            .published
            .iter()
            .any(|(_, t)| t == Path::new("/t/b"))
    );
    // Restored in the file: converged again.
    assert!(h.apply_at(&with, 100).await.converged);
}

#[tokio::test]
async fn a_lost_snapshot_answer_records_the_snapshot_on_the_next_run() {
    let mut h = Harness::new();
    h.fake.w().lose_answer_of = Some("snapshot");
    assert!(!h.apply_at(TWO, 100).await.converged);
    assert!(matches!(
        h.state().volumes["a"].intent,
        Some(Intent::Snapshot { slot: 100, .. })
    ));
    // Even in a later slot the interrupted one is finished under its name,
    // then the current slot's is taken.
    let s = h.apply_at(TWO, 110).await;
    assert_eq!(kinds(&s), ["a:snapshot:done", "a:snapshot:done"]);
    let names: Vec<String> = h.state().volumes["a"]
        .snapshots
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(names, ["a-100", "a-110"]);
    assert_eq!(h.fake.w().snapshots.len(), 2);
}

/// A snapshot still copying in the background (CSI CreateSnapshot:
/// `ready_to_use` false) is not counted as taken: the pass is not
/// converged, the older snapshot it would replace under `keep` is kept,
/// and the same CreateSnapshot is repeated until it reports ready.
#[tokio::test]
async fn a_snapshot_not_ready_to_use_is_not_recorded_and_prunes_nothing() {
    const ONE: &str = "\
volumes:
  - name: a
    size: 1Mi
    target: /t/a
    snapshots: {every: 10s, keep: 1}
";
    let mut h = Harness::new();
    assert!(h.apply_at(ONE, 100).await.converged);
    h.fake.w().copying.insert("a-110".into());
    let s = h.apply_at(ONE, 110).await;
    assert!(!s.converged, "{:?}", kinds(&s));
    assert_eq!(kinds(&s), ["a:snapshot:pending"]);
    let rec = &h.state().volumes["a"];
    let names: Vec<&str> = rec.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["a-100"], "only ready snapshots are recorded");
    assert_eq!(
        rec.intent,
        Some(Intent::Snapshot {
            name: "a-110".into(),
            slot: 110
        })
    );
    assert!(h.fake.w().snapshots.contains_key("a-100"), "not pruned");

    // Still copying on the next pass: asked again under the same name,
    // nothing taken for the new slot meanwhile.
    let s = h.apply_at(ONE, 115).await;
    assert_eq!(kinds(&s), ["a:snapshot:pending"]);
    assert_eq!(h.fake.w().snapshots.len(), 2);

    h.fake.w().copying.clear();
    let s = h.apply_at(ONE, 115).await;
    assert!(s.converged, "{:?}", kinds(&s));
    assert_eq!(kinds(&s), ["a:snapshot:done", "a:prune_snapshot:done"]);
    let w = h.fake.w();
    assert_eq!(w.snapshots.keys().collect::<Vec<_>>(), ["a-110"]);
}

/// A pending snapshot's intent is not overwritten by a later step's (an
/// expansion asked for meanwhile): the snapshot is finished first, so it is
/// recorded and pruned in its turn rather than orphaned on the plugin.
#[tokio::test]
async fn a_pending_snapshot_is_finished_before_an_expansion_takes_the_intent() {
    let one = |size: &str| {
        format!(
            "volumes:\n  - name: a\n    size: {size}\n    target: /t/a\n    \
             snapshots: {{every: 10s, keep: 1}}\n"
        )
    };
    let mut h = Harness::new();
    assert!(h.apply_at(&one("1Mi"), 100).await.converged);
    h.fake.w().copying.insert("a-110".into());
    assert!(!h.apply_at(&one("1Mi"), 110).await.converged);
    // Grown while the snapshot still copies: the expansion waits.
    let s = h.apply_at(&one("2Mi"), 125).await;
    assert_eq!(kinds(&s), ["a:snapshot:pending"]);
    assert!(matches!(
        h.state().volumes["a"].intent,
        Some(Intent::Snapshot { slot: 110, .. })
    ));

    h.fake.w().copying.clear();
    let s = h.apply_at(&one("2Mi"), 130).await;
    assert!(s.converged, "{:?}", kinds(&s));
    assert_eq!(
        kinds(&s),
        [
            "a:snapshot:done",
            "a:expand:done",
            "a:snapshot:done",
            "a:prune_snapshot:done",
            "a:prune_snapshot:done"
        ]
    );
    let w = h.fake.w();
    assert_eq!(
        w.snapshots.keys().collect::<Vec<_>>(),
        ["a-130"],
        "no snapshot left unrecorded"
    );
    assert_eq!(w.volumes["a"].1, 2 << 20);
}

/// An expansion interrupted after the controller grew the volume, then a
/// target change (whose unpublish takes the intent slot): the expansion is
/// still repeated at the new target, so the node side (the filesystem)
/// grows too, instead of being skipped because the capacity already fits.
#[tokio::test]
async fn an_interrupted_expansion_is_repeated_after_a_target_change() {
    let one = |size: &str, target: &str| {
        format!("volumes:\n  - name: a\n    size: {size}\n    target: {target}\n")
    };
    let mut h = Harness::new();
    assert!(h.apply_at(&one("1Mi", "/t/a"), 100).await.converged);
    h.fake.w().lose_answer_of = Some("expand");
    assert!(!h.apply_at(&one("2Mi", "/t/a"), 100).await.converged);
    let expands = |h: &Harness| {
        h.fake
            .w()
            .mutations
            .iter()
            .filter(|m| *m == "expand")
            .count()
    };
    assert_eq!(expands(&h), 1);
    let s = h.apply_at(&one("2Mi", "/t/b"), 100).await;
    assert!(s.converged, "{:?}", kinds(&s));
    assert_eq!(expands(&h), 2, "{:?}", kinds(&s));
    assert_eq!(h.state().volumes["a"].size_bytes, 2 << 20);
}

#[tokio::test]
async fn scheduled_snapshots_are_pruned_to_keep_and_only_recorded_ones() {
    let mut h = Harness::new();
    h.apply_at(TWO, 100).await;
    // A snapshot somebody else took is never pruned.
    h.fake
        .w()
        .snapshots
        .insert("manual".into(), ("snap-x".into(), "vol-1".into()));
    for now in [110, 115, 120, 130] {
        assert!(h.apply_at(TWO, now).await.converged);
    }
    let names: Vec<String> = h.state().volumes["a"]
        .snapshots
        .iter()
        .map(|s| s.name.clone())
        .collect();
    assert_eq!(names, ["a-120", "a-130"]);
    let w = h.fake.w();
    let mut left: Vec<&String> = w.snapshots.keys().collect();
    left.sort();
    assert_eq!(left, ["a-120", "a-130", "manual"]);
}

#[tokio::test]
async fn changes_that_would_destroy_data_are_refused() {
    let mut h = Harness::new();
    h.apply_at(TWO, 100).await;
    let s = h
        .apply_at(&TWO.replace("mode: block", "mode: mount"), 100)
        .await;
    assert!(!s.converged);
    assert_eq!(kinds(&s), ["b:refuse:refused"]);
    assert!(
        s.events[0].to_string().contains("cannot change"),
        "{}",
        s.events[0]
    );

    let s = h
        .apply_at(&TWO.replace("size: 2Mi", "size: 1Mi"), 100)
        .await;
    assert_eq!(kinds(&s), ["b:refuse:refused"]);
    assert!(s.events[0].to_string().contains("shrinking"));
    assert_eq!(h.fake.w().volumes["b"].1, 2 << 20);
}

#[tokio::test]
async fn a_new_target_is_published_after_the_old_one_is_unpublished() {
    let mut h = Harness::new();
    h.apply_at(TWO, 100).await;
    let moved = TWO.replace("target: /t/b", "target: /t/b2\n    readOnly: true");
    let s = h.apply_at(&moved, 100).await;
    assert_eq!(kinds(&s), ["b:unpublish:done", "b:publish:done"]);
    assert_eq!(s.events[1].to_string(), "published b at /t/b2 (read-only)");
    let w = h.fake.w();
    let targets: Vec<&PathBuf> = w.published.iter().map(|(_, t)| t).collect();
    assert_eq!(targets, [Path::new("/t/a"), Path::new("/t/b2")]);
}

#[tokio::test]
async fn volumes_that_left_the_file_are_left_alone_unless_pruned() {
    let mut h = Harness::new();
    h.apply_at(TWO, 100).await;
    // A foreign volume the reconciler never recorded.
    h.fake
        .w()
        .volumes
        .insert("foreign".into(), ("vol-f".into(), 1, Capability::default()));
    let only_a = "volumes:\n  - name: a\n    size: 1Mi\n    target: /t/a\n    snapshots: {every: 10s, keep: 2}\n";
    let s = h.apply_at(only_a, 100).await;
    assert_eq!(kinds(&s), ["b:left_alone:done"]);
    assert_eq!(
        s.events[0].to_string(),
        "left alone: b (vol-3) (not in the file; --prune removes it)"
    );
    assert!(s.converged);

    let plan = h
        .run(
            only_a,
            ApplyOptions {
                dry_run: true,
                prune: true,
                now: 100,
                stop: None,
            },
        )
        .await;
    assert_eq!(kinds(&plan), ["b:delete:planned"]);
    assert!(h.fake.w().volumes.contains_key("b"));

    h.fake.w().lose_answer_of = Some("unpublish");
    let pruning = ApplyOptions {
        prune: true,
        now: 100,
        ..Default::default()
    };
    assert!(!h.run(only_a, pruning.clone()).await.converged);
    assert_eq!(h.state().volumes["b"].intent, Some(Intent::Delete));
    // The interrupted deletion finishes even without --prune.
    let s = h.apply_at(only_a, 100).await;
    assert_eq!(kinds(&s), ["b:delete:done"]);
    let w = h.fake.w();
    assert!(!w.volumes.contains_key("b"));
    assert!(w.volumes.contains_key("foreign"));
    assert!(w.published.iter().all(|(v, _)| v != "vol-3"));
    drop(w);
    assert!(!h.state().volumes.contains_key("b"));
}

#[tokio::test]
async fn a_vanished_volume_is_created_again() {
    let mut h = Harness::new();
    h.apply_at(TWO, 100).await;
    h.fake.w().volumes.remove("b");
    let s = h.apply_at(TWO, 100).await;
    assert_eq!(
        kinds(&s),
        ["b:vanished:done", "b:create:done", "b:publish:done"]
    );
    assert!(s.converged);
}

#[tokio::test]
async fn a_stop_request_ends_the_pass_before_the_next_step() {
    let mut h = Harness::new();
    let stop = Arc::new(AtomicBool::new(true));
    let s = h
        .run(
            TWO,
            ApplyOptions {
                now: 100,
                stop: Some(stop),
                ..Default::default()
            },
        )
        .await;
    assert!(s.stopped && !s.converged);
    assert!(h.fake.w().mutations.is_empty());
}

/// `mutableParameters` are given to CreateVolume, and a change in the file
/// is applied once with ControllerModifyVolume (planned on a dry run,
/// repeated when its answer was lost).
#[tokio::test]
async fn mutable_parameters_are_created_with_and_modified_when_they_change() {
    let file = |p: &str| {
        format!(
            "volumes:\n  - name: a\n    size: 1Mi\n    target: /t/a\n    mutableParameters: {{provisioning: {p}}}\n"
        )
    };
    let mut h = Harness::new();
    assert!(h.apply_at(&file("thin"), 100).await.converged);
    let thin = BTreeMap::from([("provisioning".to_owned(), "thin".to_owned())]);
    assert_eq!(h.fake.w().mutable["vol-1"], thin);
    assert_eq!(h.state().volumes["a"].mutable_parameters, thin);
    assert!(h.apply_at(&file("thin"), 100).await.events.is_empty());

    let plan = h.plan(&file("thick"), 100).await;
    assert_eq!(kinds(&plan), ["a:modify:planned"]);
    assert_eq!(
        plan.events[0].to_string(),
        "would change a's mutable parameters to provisioning=thick"
    );
    assert_eq!(
        h.fake.w().mutable["vol-1"],
        thin,
        "a dry run changes nothing"
    );

    h.fake.w().lose_answer_of = Some("modify");
    let s = h.apply_at(&file("thick"), 100).await;
    assert_eq!(kinds(&s), ["a:modify:failed"]);
    assert!(
        s.events[0]
            .to_string()
            .starts_with("FAILED to change a's mutable parameters"),
        "{}",
        s.events[0]
    );
    let s = h.apply_at(&file("thick"), 100).await;
    assert_eq!(kinds(&s), ["a:modify:done"]);
    assert_eq!(h.fake.w().mutable["vol-1"]["provisioning"], "thick");
    assert!(h.apply_at(&file("thick"), 100).await.events.is_empty());
}

/// A node that cannot grow the filesystem: the first pass says the volume
/// grew and its filesystem did not (not "expanded"), and later passes and
/// dry runs describe what is left (the filesystem), never "from 2Mi to
/// 2Mi".
#[tokio::test]
async fn an_expansion_the_node_cannot_finish_is_reported_as_it_stands() {
    let one = |size: &str| format!("volumes:\n  - name: a\n    size: {size}\n    target: /t/a\n");
    let mut h = Harness::new();
    assert!(h.apply_at(&one("1Mi"), 100).await.converged);
    h.fake.w().node_expand_error = Some("read-only filesystem".into());
    let s = h.apply_at(&one("2Mi"), 100).await;
    assert_eq!(kinds(&s), ["a:expand:failed"]);
    assert_eq!(
        s.events[0].to_string(),
        "FAILED to expand a from 1Mi to 2Mi: the volume has 2Mi but its filesystem was not \
         grown: fake: read-only filesystem"
    );
    let plan = h.plan(&one("2Mi"), 100).await;
    assert_eq!(
        plan.events[0].to_string(),
        "would grow the filesystem of a to 2Mi (the volume already has 2Mi)"
    );
    let s = h.apply_at(&one("2Mi"), 100).await;
    assert_eq!(
        s.events[0].to_string(),
        "FAILED to grow the filesystem of a to 2Mi (the volume already has 2Mi): \
         fake: read-only filesystem"
    );
    h.fake.w().node_expand_error = None;
    let s = h.apply_at(&one("2Mi"), 100).await;
    assert!(s.converged, "{:?}", kinds(&s));
    assert_eq!(
        s.events[0].to_string(),
        "grew the filesystem of a to 2Mi (the volume already has 2Mi)"
    );
}

/// A call that failed never reads as done: "FAILED to create volume a",
/// not "FAILED: created volume a".
#[tokio::test]
async fn a_failed_create_does_not_read_as_created() {
    let mut h = Harness::new();
    h.fake.w().create_error = Some("cannot connect to unix:///x.sock".into());
    let s = h
        .apply_at(
            "volumes:\n  - name: ok1\n    size: 1Mi\n    target: /t/a\n",
            100,
        )
        .await;
    assert_eq!(
        s.events[0].to_string(),
        "FAILED to create volume ok1 of 1Mi: fake: cannot connect to unix:///x.sock"
    );
}
