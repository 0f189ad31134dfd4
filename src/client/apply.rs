//! `stowage apply -f host-volumes.yaml`: the headless reconciler. The logic
//! lives in the `stowage-sidecars` crate; this module gives it a CSI
//! plugin (the [`Plugin`] port over plain CSI calls and capability
//! discovery, nothing stowage-specific) and the command line. Publications
//! go through the client's recorded publish/unpublish, so `stowage volume
//! unpublish` sees what apply published.

use std::path::{Path, PathBuf};
use std::time::Duration;

use stowage_sidecars::plugin::{CreateVolume, CreatedVolume, PublishRequest};
use stowage_sidecars::reconcile::{ApplyOptions, Event, Summary};
use stowage_sidecars::spec::{AccessMode, VolumeMode};
use stowage_sidecars::state::{self, StateStore};
use stowage_sidecars::watch::{Stop, WatchOptions, now_secs};
use stowage_sidecars::{Capability, Lookup, Plugin, SnapshotInfo, VolumesFile};

use super::publish::{
    CapabilityArgs, DEFAULT_STAGING_ROOT, PublishSpec, load_record, publish_volume,
    unpublish_volume,
};
use super::secrets::{Secrets, SecretsArgs};
use super::volume::AccessModeArg;
use super::{CallLimit, ClientError, DEFAULT_ENDPOINT, GlobalArgs, OutputFormat, Session, rpc};
use crate::csi;
use crate::csi::controller_service_capability::rpc::Type as ControllerRpc;
use crate::csi::node_service_capability::rpc::Type as NodeRpc;

/// Where the reconciler keeps its state by default.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/stowage-apply/state.json";

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// The volumes file (YAML).
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Only validate the file (no endpoint needed); exit 2 when invalid.
    #[arg(long, conflicts_with_all = ["dry_run", "prune", "watch"])]
    pub check: bool,
    /// Print the plan; change nothing.
    #[arg(long, conflicts_with = "watch")]
    pub dry_run: bool,
    /// Unpublish and delete volumes this reconciler created that are no
    /// longer in the file.
    #[arg(long)]
    pub prune: bool,
    /// Keep running: re-apply when the file changes and every --interval.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: how often to re-apply an unchanged file (s, m, h, d).
    #[arg(long, default_value = "30s", value_parser = parse_interval)]
    pub interval: Duration,
    /// With --watch: serve GET /healthz (the plugin's Probe) on HOST:PORT.
    #[arg(long, requires = "watch", value_name = "HOST:PORT")]
    pub health_addr: Option<String>,
    /// The reconciler's state file.
    #[arg(long, default_value = DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
    /// The directory holding staging directories and publication records
    /// (shared with `stowage volume publish|unpublish`).
    #[arg(long, default_value = DEFAULT_STAGING_ROOT)]
    pub staging_root: PathBuf,
    /// Passed as the secrets of every CreateVolume, DeleteVolume,
    /// CreateSnapshot, DeleteSnapshot and NodeStageVolume (read once, at
    /// start).
    #[command(flatten)]
    pub secrets: SecretsArgs,
    #[command(flatten)]
    pub globals: GlobalArgs,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    stowage_sidecars::schedule::parse_duration(s)
        .map(Duration::from_secs)
        .map_err(|e| e.to_string())
}

/// A CSI plugin behind an endpoint, connected on first use (so a sidecar
/// started before its plugin waits instead of failing). Clones share the
/// connection once made.
#[derive(Debug, Clone)]
pub struct CsiPlugin {
    endpoint: String,
    controller_endpoint: Option<String>,
    /// How long each call may wait for its answer (`--request-timeout`).
    call_limit: CallLimit,
    staging_root: PathBuf,
    /// The calls' secrets (`--secrets-file`); none by default.
    secrets: Secrets,
    session: Option<Session>,
}

impl CsiPlugin {
    pub fn new(endpoint: &str, staging_root: &Path) -> CsiPlugin {
        CsiPlugin {
            endpoint: endpoint.to_owned(),
            controller_endpoint: None,
            call_limit: CallLimit::default(),
            staging_root: staging_root.to_owned(),
            secrets: Secrets::default(),
            session: None,
        }
    }

    async fn s(&mut self) -> Result<&mut Session, ClientError> {
        if self.session.is_none() {
            self.session = Some(
                Session::connect_split(
                    &self.endpoint,
                    self.controller_endpoint.as_deref(),
                    self.call_limit,
                )
                .await?,
            );
        }
        Ok(self.session.as_mut().expect("connected above"))
    }
}

fn access_mode(a: AccessMode) -> AccessModeArg {
    match a {
        AccessMode::Rwo => AccessModeArg::Rwo,
        AccessMode::Rwop => AccessModeArg::Rwop,
        AccessMode::Rox => AccessModeArg::Rox,
        AccessMode::Rwx => AccessModeArg::Rwx,
    }
}

/// The client's capability flags for a declared capability.
fn capability_args(c: &Capability) -> CapabilityArgs {
    CapabilityArgs {
        block: c.mode == VolumeMode::Block,
        fs: (!c.fs.is_empty()).then(|| c.fs.clone()),
        access_mode: Some(access_mode(c.access_mode)),
    }
}

fn csi_capability(c: &Capability) -> csi::VolumeCapability {
    capability_args(c).csi()
}

/// NOT_FOUND counts as done (deleting what is gone succeeds).
fn gone_is_done<T>(call: &'static str, r: Result<T, tonic::Status>) -> Result<(), ClientError> {
    match r {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
        Err(s) => Err(rpc(call)(s)),
    }
}

/// How long a call is repeated while the plugin answers ABORTED.
const ABORTED_WAIT: Duration = Duration::from_secs(60);

/// Repeats an idempotent call while the plugin answers ABORTED: "an
/// operation for this volume is already in progress", which the CSI spec
/// says to retry with exponential backoff (after a kill -9 the plugin may
/// still be finishing the killed applier's call). Gives up after
/// [`ABORTED_WAIT`] with the last answer.
macro_rules! retry_aborted {
    ($call:expr) => {{
        let deadline = tokio::time::Instant::now() + ABORTED_WAIT;
        let mut delay = Duration::from_millis(100);
        loop {
            match $call {
                Err(ClientError::Rpc { status, .. })
                    if status.code() == tonic::Code::Aborted
                        && tokio::time::Instant::now() + delay < deadline =>
                {
                    tracing::debug!(message = status.message(), retry_in = ?delay, "ABORTED");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                r => break r,
            }
        }
    }};
}

/// The calls themselves; the `Plugin` impl below adds the retry on ABORTED.
impl CsiPlugin {
    async fn create_volume_once(
        &mut self,
        req: &CreateVolume,
    ) -> Result<CreatedVolume, ClientError> {
        let secrets = self.secrets.to_csi();
        let s = self.s().await?;
        let accessibility_requirements = s.local_topology().await?;
        let v = s
            .controller
            .create_volume(csi::CreateVolumeRequest {
                name: req.name.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: req.bytes,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![csi_capability(&req.capability)],
                parameters: req.parameters.clone().into_iter().collect(),
                mutable_parameters: req.mutable_parameters.clone().into_iter().collect(),
                accessibility_requirements,
                secrets,
                ..Default::default()
            })
            .await
            .map_err(rpc("CreateVolume"))?
            .into_inner()
            .volume
            .ok_or(ClientError::EmptyResponse {
                call: "CreateVolume",
                what: "volume",
            })?;
        // So that `stowage volume publish` of it knows its access type.
        super::volume::remember(
            &self.staging_root,
            &v.volume_id,
            &req.name,
            &capability_args(&req.capability),
        );
        Ok(CreatedVolume {
            id: v.volume_id,
            capacity_bytes: v.capacity_bytes,
        })
    }

    async fn modify_volume_once(
        &mut self,
        id: &str,
        mutable_parameters: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), ClientError> {
        self.s().await?.modify_volume(id, mutable_parameters).await
    }

    async fn delete_volume_once(&mut self, id: &str) -> Result<(), ClientError> {
        let secrets = self.secrets.to_csi();
        let r = self
            .s()
            .await?
            .controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.to_owned(),
                secrets,
            })
            .await;
        gone_is_done("DeleteVolume", r)?;
        super::created::remove(&self.staging_root, id)
    }

    async fn publish_once(&mut self, req: &PublishRequest<'_>) -> Result<(), ClientError> {
        let spec = PublishSpec {
            id: req.volume_id.to_owned(),
            target: req.target.to_owned(),
            readonly: req.read_only,
            capability: capability_args(req.capability),
            staging_root: self.staging_root.clone(),
            node_stage_secrets: self.secrets.clone(),
        };
        publish_volume(self.s().await?, &spec).await.map(drop)
    }

    async fn unpublish_once(&mut self, volume_id: &str, target: &Path) -> Result<(), ClientError> {
        let root = self.staging_root.clone();
        unpublish_volume(self.s().await?, volume_id, target, &root)
            .await
            .map(drop)
    }

    async fn expand_once(
        &mut self,
        volume_id: &str,
        bytes: i64,
        published_at: Option<&Path>,
        capability: &Capability,
    ) -> Result<i64, ClientError> {
        let staging = load_record(&self.staging_root, volume_id)?.and_then(|r| r.staging_path);
        let s = self.s().await?;
        let range = csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        };
        let mut capacity = bytes;
        let controller = s
            .controller_rpcs()
            .await?
            .contains(&ControllerRpc::ExpandVolume);
        let mut node_required = true;
        if controller {
            let r = s
                .controller
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: volume_id.to_owned(),
                    capacity_range: Some(range),
                    volume_capability: Some(csi_capability(capability)),
                    ..Default::default()
                })
                .await
                .map_err(rpc("ControllerExpandVolume"))?
                .into_inner();
            capacity = r.capacity_bytes;
            node_required = r.node_expansion_required;
        }
        if !node_required {
            return Ok(capacity);
        }
        // The node must grow it: an expansion the plugin cannot finish is an
        // error, never reported as done.
        if !s.node_rpcs().await?.contains(&NodeRpc::ExpandVolume) {
            return Err(ClientError::Local(if controller {
                format!(
                    "volume {volume_id:?} needs node expansion, but the plugin's node does not offer EXPAND_VOLUME"
                )
            } else {
                "the plugin offers no volume expansion (EXPAND_VOLUME on neither controller nor node)"
                    .to_owned()
            }));
        }
        let Some(path) = published_at else {
            return Err(ClientError::Local(format!(
                "volume {volume_id:?} needs node expansion and is not published; it grows once published"
            )));
        };
        let r = s
            .node
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: volume_id.to_owned(),
                volume_path: path.display().to_string(),
                capacity_range: Some(range),
                staging_target_path: staging.map(|p| p.display().to_string()).unwrap_or_default(),
                volume_capability: Some(csi_capability(capability)),
                ..Default::default()
            })
            .await
            .map_err(rpc("NodeExpandVolume"))?
            .into_inner();
        Ok(capacity.max(r.capacity_bytes))
    }

    /// CreateSnapshot, repeated with the same name every
    /// [`SNAPSHOT_READY_POLL`] while the snapshot is not ready_to_use ("the
    /// CO MAY call CreateSnapshot again to check readiness"), for at most
    /// [`SNAPSHOT_READY_WAIT`]; the last answer is returned, ready or not.
    async fn create_snapshot_once(
        &mut self,
        volume_id: &str,
        name: &str,
    ) -> Result<SnapshotInfo, ClientError> {
        let req = csi::CreateSnapshotRequest {
            source_volume_id: volume_id.to_owned(),
            name: name.to_owned(),
            secrets: self.secrets.to_csi(),
            ..Default::default()
        };
        let deadline = tokio::time::Instant::now() + SNAPSHOT_READY_WAIT;
        let mut snap = create_snapshot_call(self.s().await?, req.clone()).await?;
        while !snap.ready_to_use && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(SNAPSHOT_READY_POLL).await;
            snap = match create_snapshot_call(self.s().await?, req.clone()).await {
                Ok(snap) => snap,
                // Another call on the same name or volume is in flight.
                Err(ClientError::Rpc { status, .. }) if status.code() == tonic::Code::Aborted => {
                    continue;
                }
                Err(e) => return Err(e),
            };
        }
        Ok(SnapshotInfo {
            id: snap.snapshot_id,
            ready: snap.ready_to_use,
            creation_time: snap.creation_time.map(|t| t.seconds),
        })
    }

    async fn delete_snapshot_once(&mut self, snapshot_id: &str) -> Result<(), ClientError> {
        let secrets = self.secrets.to_csi();
        let r = self
            .s()
            .await?
            .controller
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: snapshot_id.to_owned(),
                secrets,
            })
            .await;
        gone_is_done("DeleteSnapshot", r)
    }
}

impl Plugin for CsiPlugin {
    type Error = ClientError;

    async fn probe(&mut self) -> Result<bool, ClientError> {
        let r = self
            .s()
            .await?
            .identity
            .probe(csi::ProbeRequest {})
            .await
            .map_err(rpc("Probe"))?;
        Ok(r.into_inner().ready.unwrap_or(true))
    }

    async fn lookup_volume(&mut self, id: &str) -> Result<Lookup, ClientError> {
        let s = self.s().await?;
        let rpcs = s.controller_rpcs().await?;
        if !rpcs.contains(&ControllerRpc::GetVolume) && !rpcs.contains(&ControllerRpc::ListVolumes)
        {
            return Ok(Lookup::Unknown);
        }
        match super::volume::get(s, id).await {
            Ok(v) => Ok(Lookup::Present {
                capacity_bytes: v.capacity_bytes,
            }),
            Err(ClientError::NotFound { .. }) => Ok(Lookup::Absent),
            Err(ClientError::Rpc { status, .. }) if status.code() == tonic::Code::NotFound => {
                Ok(Lookup::Absent)
            }
            Err(e) => Err(e),
        }
    }

    async fn publications(&mut self, volume_id: &str) -> Result<Vec<PathBuf>, ClientError> {
        Ok(load_record(&self.staging_root, volume_id)?
            .map(|r| r.targets.into_iter().map(|t| t.path).collect())
            .unwrap_or_default())
    }

    async fn create_volume(&mut self, req: &CreateVolume) -> Result<CreatedVolume, ClientError> {
        retry_aborted!(self.create_volume_once(req).await)
    }

    async fn delete_volume(&mut self, id: &str) -> Result<(), ClientError> {
        retry_aborted!(self.delete_volume_once(id).await)
    }

    async fn publish(&mut self, req: &PublishRequest<'_>) -> Result<(), ClientError> {
        retry_aborted!(self.publish_once(req).await)
    }

    async fn unpublish(&mut self, volume_id: &str, target: &Path) -> Result<(), ClientError> {
        retry_aborted!(self.unpublish_once(volume_id, target).await)
    }

    async fn expand(
        &mut self,
        volume_id: &str,
        bytes: i64,
        published_at: Option<&Path>,
        capability: &Capability,
    ) -> Result<i64, ClientError> {
        retry_aborted!(
            self.expand_once(volume_id, bytes, published_at, capability)
                .await
        )
    }

    async fn modify_volume(
        &mut self,
        volume_id: &str,
        mutable_parameters: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), ClientError> {
        retry_aborted!(self.modify_volume_once(volume_id, mutable_parameters).await)
    }

    async fn create_snapshot(
        &mut self,
        volume_id: &str,
        name: &str,
    ) -> Result<SnapshotInfo, ClientError> {
        retry_aborted!(self.create_snapshot_once(volume_id, name).await)
    }

    async fn delete_snapshot(&mut self, snapshot_id: &str) -> Result<(), ClientError> {
        retry_aborted!(self.delete_snapshot_once(snapshot_id).await)
    }
}

/// How often a scheduled snapshot's readiness is asked for.
const SNAPSHOT_READY_POLL: Duration = Duration::from_millis(500);
/// How long a pass waits for a scheduled snapshot to become ready before
/// reporting it pending (asked again on the next pass).
const SNAPSHOT_READY_WAIT: Duration = Duration::from_secs(30);

async fn create_snapshot_call(
    s: &mut Session,
    req: csi::CreateSnapshotRequest,
) -> Result<csi::Snapshot, ClientError> {
    s.controller
        .create_snapshot(req)
        .await
        .map_err(rpc("CreateSnapshot"))?
        .into_inner()
        .snapshot
        .ok_or(ClientError::EmptyResponse {
            call: "CreateSnapshot",
            what: "snapshot",
        })
}

/// Why `stowage apply` stopped before or around a pass.
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    State(#[from] stowage_sidecars::StateError),
    #[error("cannot serve /healthz on {addr}")]
    Health {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `stowage apply`; returns the exit code: 0 converged (or a valid
/// file with --check), 1 when an action failed, 2 for bad usage or an
/// invalid file.
pub fn run(args: ApplyArgs, outer: &GlobalArgs) -> u8 {
    let g = args.globals.or(outer);
    let format = g.output.unwrap_or_default();
    let file = match VolumesFile::load(&args.file) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("stowage: {}: {e}", args.file.display());
            return 2;
        }
    };
    if args.check {
        match format {
            OutputFormat::Json => println!(
                "{}",
                serde_json::json!({ "valid": true, "volumes": file.volumes.len() })
            ),
            OutputFormat::Table => println!(
                "{}: valid ({} volume{})",
                args.file.display(),
                file.volumes.len(),
                if file.volumes.len() == 1 { "" } else { "s" }
            ),
        }
        return 0;
    }
    let endpoint = g
        .endpoint
        .clone()
        .unwrap_or_else(|| DEFAULT_ENDPOINT.into());
    if let Err(e) = crate::server::Endpoint::parse(&endpoint) {
        eprintln!("stowage: {e}");
        return 2;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stowage: cannot start the async runtime: {e}");
            return 1;
        }
    };
    if let Some(c) = &g.controller_endpoint
        && let Err(e) = crate::server::Endpoint::parse(c)
    {
        eprintln!("stowage: --controller-endpoint: {e}");
        return 2;
    }
    let mut plugin = CsiPlugin::new(&endpoint, &args.staging_root);
    plugin.controller_endpoint = g.controller_endpoint.clone();
    plugin.call_limit = g.call_limit();
    plugin.secrets = match args.secrets.load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stowage: {}", ClientError::from(e).report());
            return 2;
        }
    };
    let result = rt.block_on(async {
        if args.watch {
            watch(plugin, file, &args, format).await.map(|()| 0)
        } else {
            once(plugin, file, &args, format).await
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "stowage: {}",
                stowage_sidecars::error_chain(&e as &(dyn std::error::Error + 'static))
            );
            1
        }
    }
}

fn printer(format: OutputFormat, json_lines: bool) -> impl FnMut(&Event) {
    move |e: &Event| match format {
        OutputFormat::Table => println!("{e}"),
        OutputFormat::Json if json_lines => {
            if let Ok(line) = serde_json::to_string(e) {
                println!("{line}");
            }
        }
        OutputFormat::Json => {}
    }
}

async fn once(
    mut plugin: CsiPlugin,
    file: VolumesFile,
    args: &ApplyArgs,
    format: OutputFormat,
) -> Result<u8, ApplyError> {
    // A dry run reads the state without the lock (it is replaced
    // atomically, so any read is whole) and never writes it.
    let store = if args.dry_run {
        None
    } else {
        Some(StateStore::open(&args.state_file)?)
    };
    let state = match &store {
        Some(s) => s.load()?,
        None => state::read(&args.state_file)?,
    };
    let opts = ApplyOptions {
        dry_run: args.dry_run,
        prune: args.prune,
        now: now_secs(),
        stop: None,
    };
    let mut report = printer(format, false);
    let summary: Summary = stowage_sidecars::apply(
        &mut plugin,
        &file,
        store.as_ref(),
        state,
        &opts,
        &mut report,
    )
    .await?;
    match format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&summary).map_err(ClientError::Json)?
        ),
        OutputFormat::Table if summary.events.is_empty() => {
            println!(
                "{}",
                if args.dry_run {
                    "no changes planned"
                } else {
                    "nothing to do: converged"
                }
            )
        }
        OutputFormat::Table => {}
    }
    Ok(if summary.converged { 0 } else { 1 })
}

async fn watch(
    mut plugin: CsiPlugin,
    file: VolumesFile,
    args: &ApplyArgs,
    format: OutputFormat,
) -> Result<(), ApplyError> {
    let store = StateStore::open(&args.state_file)?;
    let stop = Stop::default();
    stop.on_signals().map_err(|source| ClientError::Io {
        what: "cannot install signal handlers".into(),
        source,
    })?;
    let mut health = None;
    if let Some(addr) = &args.health_addr {
        let listener = tokio::net::TcpListener::bind(addr.as_str())
            .await
            .map_err(|source| ApplyError::Health {
                addr: addr.clone(),
                source,
            })?;
        tracing::info!(addr = %addr, "serving /healthz");
        health = Some(tokio::spawn(stowage_sidecars::health::serve(
            listener,
            plugin.clone(),
        )));
    }
    let opts = WatchOptions {
        file: args.file.clone(),
        interval: args.interval,
        prune: args.prune,
    };
    let mut report = printer(format, true);
    stowage_sidecars::watch::watch(&mut plugin, &store, file, &opts, &stop, &mut report).await;
    if let Some(h) = health {
        h.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code) -> ClientError {
        ClientError::Rpc {
            call: "Test",
            status: tonic::Status::new(code, "test"),
        }
    }

    #[tokio::test]
    async fn aborted_calls_are_repeated_and_other_errors_returned_at_once() {
        let mut calls = 0;
        let r: Result<u32, ClientError> = retry_aborted!({
            calls += 1;
            if calls < 3 {
                Err(status(tonic::Code::Aborted))
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r.unwrap(), 3);

        let mut calls = 0;
        let r: Result<(), ClientError> = retry_aborted!({
            calls += 1;
            Err(status(tonic::Code::FailedPrecondition))
        });
        assert!(matches!(r, Err(ClientError::Rpc { status, .. })
            if status.code() == tonic::Code::FailedPrecondition));
        assert_eq!(calls, 1);
    }
}
