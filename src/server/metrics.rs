//! Metrics and health over HTTP (`serve --metrics-address`): Prometheus
//! text at `/metrics`, and `/healthz` (the checks of Probe). Per-RPC
//! counts, codes and latencies are measured by a tower layer around the
//! gRPC server, so handlers know nothing of it; the driver's state (pool,
//! volumes, stagings, loop devices, state logs) is read at scrape time.
//! Nothing here changes the driver's state or sees a request's fields
//! beyond its method name.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use stowage_sidecars::http::Reply;
use tonic::Code;

use super::Driver;

/// Every CSI v1.12 RPC by its method name (the names are unique across the
/// services). Any other path is counted as `unknown`, so a client cannot
/// grow the label set.
pub const METHODS: [&str; 32] = [
    // Identity
    "GetPluginInfo",
    "GetPluginCapabilities",
    "Probe",
    // Controller
    "CreateVolume",
    "DeleteVolume",
    "ControllerPublishVolume",
    "ControllerUnpublishVolume",
    "ValidateVolumeCapabilities",
    "ListVolumes",
    "GetCapacity",
    "ControllerGetCapabilities",
    "CreateSnapshot",
    "DeleteSnapshot",
    "ListSnapshots",
    "GetSnapshot",
    "ControllerExpandVolume",
    "ControllerGetVolume",
    "ControllerModifyVolume",
    // GroupController
    "GroupControllerGetCapabilities",
    "CreateVolumeGroupSnapshot",
    "DeleteVolumeGroupSnapshot",
    "GetVolumeGroupSnapshot",
    // SnapshotMetadata
    "GetMetadataAllocated",
    "GetMetadataDelta",
    // Node
    "NodeStageVolume",
    "NodeUnstageVolume",
    "NodePublishVolume",
    "NodeUnpublishVolume",
    "NodeGetVolumeStats",
    "NodeExpandVolume",
    "NodeGetCapabilities",
    "NodeGetInfo",
];

/// The label for a request path `/package.Service/Method`.
pub fn method_label(path: &str) -> &'static str {
    let known = path
        .strip_prefix("/csi.v1.")
        .and_then(|p| p.split_once('/'))
        .and_then(|(_, m)| METHODS.iter().find(|k| **k == m));
    known.copied().unwrap_or("unknown")
}

/// The `grpc-status` of a header or trailer map, if it has one.
fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    Some(Code::from_i32(v))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    method: &'static str,
    code: &'static str,
}

/// Per-RPC series, updated by [`RpcMetricsLayer`].
#[derive(Debug)]
pub struct RpcMetrics {
    requests: Family<CodeLabels, Counter>,
    aborted: Family<MethodLabels, Counter>,
    in_flight: Family<MethodLabels, Gauge>,
    duration: Family<MethodLabels, Histogram>,
    /// Handles into the families for each of [`METHODS`] and then
    /// `unknown`, made on a method's first request: a request then costs
    /// a few atomic operations and one short lock, no label hashing.
    slots: Vec<OnceLock<MethodSeries>>,
}

/// One method's series (clones of the families' entries share them).
#[derive(Debug)]
struct MethodSeries {
    in_flight: Gauge,
    duration: Histogram,
    aborted: Counter,
    /// By gRPC code number, each made on its first use.
    codes: [OnceLock<Counter>; 17],
}

/// Latency buckets (seconds): from a bind mount (well under a millisecond)
/// to mkfs, e2fsck or a copy of a large volume (minutes).
const DURATION_BUCKETS: [f64; 17] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The label of slot `i` (see [`RpcMetrics::slots`]).
fn slot_label(i: usize) -> &'static str {
    METHODS.get(i).copied().unwrap_or("unknown")
}

/// The slot of a request path `/package.Service/Method`.
fn method_slot(path: &str) -> usize {
    let label = method_label(path);
    METHODS
        .iter()
        .position(|m| *m == label)
        .unwrap_or(METHODS.len())
}

impl RpcMetrics {
    /// Registers the per-RPC series in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Arc::new(RpcMetrics {
            requests: Family::default(),
            aborted: Family::default(),
            in_flight: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            slots: (0..=METHODS.len()).map(|_| OnceLock::new()).collect(),
        });
        registry.register(
            "rpc_requests",
            "gRPC requests answered, by method and gRPC status code",
            m.requests.clone(),
        );
        registry.register(
            "rpc_aborted",
            "gRPC requests answered ABORTED (an operation on the same volume, snapshot or name was in flight, or its mount was busy)",
            m.aborted.clone(),
        );
        registry.register(
            "rpc_in_flight",
            "gRPC requests being answered now",
            m.in_flight.clone(),
        );
        registry.register_with_unit(
            "rpc_duration",
            "Time from a request's arrival to its gRPC status",
            Unit::Seconds,
            m.duration.clone(),
        );
        // ABORTED is the operator's "is something stuck" signal: present
        // from the start, at 0, for the RPCs that take the in-flight guard.
        for method in &METHODS[3..] {
            let _ = m.aborted.get_or_create(&MethodLabels { method });
        }
        m
    }

    /// The layer that feeds these series.
    pub fn layer(self: &Arc<Self>) -> RpcMetricsLayer {
        RpcMetricsLayer {
            metrics: Some(Arc::clone(self)),
        }
    }

    fn series(&self, slot: usize) -> &MethodSeries {
        self.slots[slot].get_or_init(|| {
            let labels = MethodLabels {
                method: slot_label(slot),
            };
            MethodSeries {
                in_flight: self.in_flight.get_or_create_owned(&labels),
                duration: self.duration.get_or_create_owned(&labels),
                aborted: self.aborted.get_or_create_owned(&labels),
                codes: Default::default(),
            }
        })
    }

    fn count(&self, slot: usize, series: &MethodSeries, code: Code) {
        let Some(cell) = usize::try_from(code as i32)
            .ok()
            .and_then(|i| series.codes.get(i))
        else {
            return;
        };
        cell.get_or_init(|| {
            self.requests.get_or_create_owned(&CodeLabels {
                method: slot_label(slot),
                code: crate::server::convert::code_name(code),
            })
        })
        .inc();
    }
}

/// One RPC being measured; records its outcome once: when its status is
/// known, or as CANCELLED if the response is dropped before that.
#[derive(Debug)]
struct Call {
    metrics: Arc<RpcMetrics>,
    slot: usize,
    start: Instant,
    done: bool,
}

impl Call {
    fn start(metrics: Arc<RpcMetrics>, slot: usize) -> Self {
        metrics.series(slot).in_flight.inc();
        Call {
            metrics,
            slot,
            start: Instant::now(),
            done: false,
        }
    }

    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let m = &self.metrics;
        let series = m.series(self.slot);
        series.in_flight.dec();
        m.count(self.slot, series, code);
        if code == Code::Aborted {
            series.aborted.inc();
        }
        series.duration.observe(self.start.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

/// The tower layer that measures every RPC. Without metrics (the default)
/// it passes requests and responses through, the body wrapped but never
/// looked at.
#[derive(Debug, Clone, Default)]
pub struct RpcMetricsLayer {
    metrics: Option<Arc<RpcMetrics>>,
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See [`RpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Option<Arc<RpcMetrics>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let call = self
            .metrics
            .as_ref()
            .map(|m| Call::start(Arc::clone(m), method_slot(req.uri().path())));
        let response = self.inner.call(req);
        Box::pin(async move {
            let Some(mut call) = call else {
                return response.await.map(|r| r.map(MeteredBody::bare));
            };
            match response.await {
                Ok(resp) => {
                    // Trailers-only (every error tonic returns): the
                    // status is in the headers. Otherwise it comes in the
                    // trailers, after the body.
                    let call = match grpc_status(resp.headers()) {
                        Some(code) => {
                            call.finish(code);
                            None
                        }
                        None => Some(call),
                    };
                    Ok(resp.map(|body| MeteredBody { inner: body, call }))
                }
                Err(e) => {
                    call.finish(Code::Unknown);
                    Err(e)
                }
            }
        })
    }
}

/// A response body that records its RPC's status from the trailers.
#[derive(Debug)]
pub struct MeteredBody<B> {
    inner: B,
    call: Option<Call>,
}

impl<B> MeteredBody<B> {
    fn bare(inner: B) -> Self {
        MeteredBody { inner, call: None }
    }
}

impl<B: Body + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(call) = this.call.as_mut() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                        call.finish(code);
                    }
                }
                // A body that ends or fails without a status: the client
                // sees UNKNOWN (gRPC's rule for a missing status).
                Poll::Ready(Some(Err(_)) | None) => call.finish(Code::Unknown),
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The driver's state, encoded at each scrape.
#[derive(Debug)]
struct DriverCollector {
    driver: Arc<Driver>,
}

/// Encodes one gauge family with a sample per label set.
fn gauges<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: &[(L, i64)],
) -> Result<(), std::fmt::Error> {
    let mut family =
        enc.encode_descriptor(name, help, unit, ConstGauge::new(0i64).metric_type())?;
    for (labels, v) in samples {
        ConstGauge::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// Encodes one counter family from labelled samples.
fn counters<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: &[(L, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family =
        enc.encode_descriptor(name, help, unit, ConstCounter::new(0u64).metric_type())?;
    for (labels, v) in samples {
        ConstCounter::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// Encodes one unlabelled gauge.
fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, unit, g.metric_type())?)
}

fn signed(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for DriverCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let d = &self.driver;
        match d.pool_capacity() {
            Ok((total, free)) => {
                gauge(
                    &mut enc,
                    "pool_capacity",
                    "Size of the pool's filesystem.",
                    Some(&Unit::Bytes),
                    signed(total),
                )?;
                gauge(
                    &mut enc,
                    "pool_free",
                    "Bytes new volumes can still get (what GetCapacity reports).",
                    Some(&Unit::Bytes),
                    signed(free),
                )?;
            }
            Err(e) => tracing::debug!(error = %e, "metrics: cannot statvfs the pool"),
        }
        let mut in_flight: Vec<([(&str, &str); 1], i64)> = Vec::new();
        if let Some(c) = &d.controller {
            let inv = c.inventory();
            let by_backend = |v: &[(crate::volume::BackendKind, u64)]| {
                v.iter()
                    .map(|(k, n)| ([("backend", k.to_string())], signed(*n)))
                    .collect::<Vec<_>>()
            };
            gauges(
                &mut enc,
                "volumes",
                "Volumes by backend.",
                None,
                &by_backend(&inv.volumes),
            )?;
            gauges(
                &mut enc,
                "snapshots",
                "Snapshots by backend (ready or still being copied).",
                None,
                &by_backend(&inv.snapshots),
            )?;
            gauge(
                &mut enc,
                "background_copies",
                "Snapshot copies running in the background (pools without extent sharing).",
                None,
                signed(inv.copies_running),
            )?;
            in_flight.push(([("service", "controller")], signed(inv.in_flight)));
        }
        if let Some(n) = &d.node {
            let inv = n.inventory();
            gauge(
                &mut enc,
                "staged_volumes",
                "Volumes staged on this node.",
                None,
                signed(inv.staged),
            )?;
            gauge(
                &mut enc,
                "publications",
                "Publications (volume and target path) on this node.",
                None,
                signed(inv.published),
            )?;
            if let Some(l) = inv.loop_devices {
                gauge(
                    &mut enc,
                    "loop_devices_attached",
                    "Loop devices attached to images in the pool.",
                    None,
                    signed(l),
                )?;
            }
            in_flight.push(([("service", "node")], signed(inv.in_flight)));
            replicated(&mut enc, n.replicated())?;
        }
        if let Some(r) = &d.replicas {
            let unreadable: Vec<_> = r
                .unreadable_counts()
                .into_iter()
                .map(|(u, n)| ([("volume", format!("replicated:{u}"))], signed(n as u64)))
                .collect();
            let mut checked = Vec::new();
            for (u, c) in r.all_checked() {
                let volume = format!("replicated:{u}");
                for (by, at) in [("scrub", c.scrub.done), ("node", c.read.done)] {
                    checked.push((
                        [("volume", volume.clone()), ("by", by.to_owned())],
                        signed(at),
                    ));
                }
            }
            gauges(
                &mut enc,
                "replica_checked_timestamp",
                "When this node's copy was last read whole, in seconds since the Unix epoch (0: never): by an engine's scrub pass, which compared it with the other copies (by=scrub), or by this node while the volume was not published (by=node).",
                Some(&Unit::Seconds),
                &checked,
            )?;
            gauges(
                &mut enc,
                "replica_unreadable_regions",
                "Regions (1 MiB) of this node's copy its disk could not read while the volume was not published; the next engine rebuilds them here.",
                None,
                &unreadable,
            )?;
        }
        gauges(
            &mut enc,
            "operations_in_flight",
            "Volumes, snapshots and names held by an operation in flight (a second operation on one is ABORTED).",
            None,
            &in_flight,
        )?;

        let logs = d.store.log_stats();
        let table = |t: crate::state::Table| [("table", t.name())];
        let samples = |f: &dyn Fn(&crate::state::LogStats) -> Option<u64>| {
            logs.iter()
                .filter_map(|s| f(s).map(|v| (table(s.table), signed(v))))
                .collect::<Vec<_>>()
        };
        gauges(
            &mut enc,
            "state_log_file",
            "Size of each state table's log file, zero-filled space ahead included.",
            Some(&Unit::Bytes),
            &samples(&|s| Some(s.file_bytes)),
        )?;
        gauges(
            &mut enc,
            "state_log_used",
            "Bytes of entries in each state table's log, superseded ones included (tables this process writes).",
            Some(&Unit::Bytes),
            &samples(&|s| s.used_bytes),
        )?;
        gauges(
            &mut enc,
            "state_log_live",
            "Bytes the live records of each state table take (a log is compacted when it is 4 times that and over 4 MiB).",
            Some(&Unit::Bytes),
            &samples(&|s| s.live_bytes),
        )?;
        counters(
            &mut enc,
            "state_log_compactions",
            "Compactions of each state table's log since the server started.",
            None,
            &logs
                .iter()
                .map(|s| (table(s.table), s.compactions))
                .collect::<Vec<_>>(),
        )
    }
}

/// The engines of replicated volumes on this node (a heal's too, unless a
/// publication's engine runs for the same volume here): each copy's state
/// as the engine sees it, the epoch, and the bytes rebuilt (a counter: its
/// rate is the rebuild rate).
fn replicated(
    enc: &mut DescriptorEncoder,
    engines: &crate::backend::replicated::engines::Engines,
) -> Result<(), std::fmt::Error> {
    use crate::backend::replicated::engine::CopyPhase;
    let mut in_sync = Vec::new();
    let mut rebuilding = Vec::new();
    let mut dirty = Vec::new();
    let mut errors = Vec::new();
    let mut epoch = Vec::new();
    let mut rebuilt = Vec::new();
    let mut repairs = Vec::new();
    let mut scrubbed = Vec::new();
    let mut passes = Vec::new();
    let mut unresolved = Vec::new();
    let published = engines.volumes();
    let statuses = published
        .iter()
        .filter_map(|&u| engines.status(u).map(|st| (u, st)))
        .chain(
            engines
                .heals()
                .into_iter()
                .filter(|u| !published.contains(u))
                .filter_map(|u| engines.heal_status(u).map(|st| (u, st))),
        );
    for (uuid, st) in statuses {
        let volume = format!("replicated:{uuid}");
        for c in &st.copies {
            let labels = [("volume", volume.clone()), ("copy", c.node.clone())];
            in_sync.push((
                labels.clone(),
                i64::from(c.phase == CopyPhase::InSync && !c.failing),
            ));
            rebuilding.push((labels.clone(), i64::from(c.phase == CopyPhase::Rebuilding)));
            errors.push((
                labels.clone(),
                st.errors.get(&c.node).map_or(0, |e| e.count),
            ));
            repairs.push((
                labels.clone(),
                st.scrub.repairs.get(&c.node).copied().unwrap_or(0),
            ));
            dirty.push((labels, signed(c.dirty as u64)));
        }
        scrubbed.push(([("volume", volume.clone())], st.scrub.regions));
        passes.push(([("volume", volume.clone())], st.scrub.passes));
        unresolved.push(([("volume", volume.clone())], st.scrub.unresolved));
        epoch.push(([("volume", volume.clone())], signed(st.epoch)));
        rebuilt.push(([("volume", volume)], st.rebuild_bytes));
    }
    gauges(
        enc,
        "replicated_copy_in_sync",
        "1 when the copy is in the replicated volume's in-sync set (writes wait for it), as the engine on this node sees it.",
        None,
        &in_sync,
    )?;
    gauges(
        enc,
        "replicated_copy_rebuilding",
        "1 while the copy is being rebuilt.",
        None,
        &rebuilding,
    )?;
    gauges(
        enc,
        "replicated_copy_dirty_regions",
        "Regions (1 MiB) the copy may lack: what its rebuild still has to copy.",
        None,
        &dirty,
    )?;
    gauges(
        enc,
        "replicated_epoch",
        "The epoch of the engine serving the volume on this node (fencing).",
        None,
        &epoch,
    )?;
    counters(
        enc,
        "replicated_copy_call_errors",
        "Calls from the engine on this node to the copy that failed (an error, no answer in time): each marks the copy failing.",
        None,
        &errors,
    )?;
    counters(
        enc,
        "replicated_scrub_repairs",
        "Regions (1 MiB) a scrub found the copy could not read or held other bytes than a majority of the copies; each was written again there.",
        None,
        &repairs,
    )?;
    counters(
        enc,
        "replicated_scrub_regions",
        "Regions (1 MiB) the scrub checked on every copy in sync.",
        None,
        &scrubbed,
    )?;
    counters(
        enc,
        "replicated_scrub_passes",
        "Scrub passes that reached the volume's last region.",
        None,
        &passes,
    )?;
    counters(
        enc,
        "replicated_scrub_unresolved",
        "Regions the scrub could not repair: the copies in sync disagreed with no majority, or the copy of a one-copy volume could not read them.",
        None,
        &unresolved,
    )?;
    counters(
        enc,
        "replicated_rebuild",
        "Bytes sent to copies being rebuilt since the engine started (its rate is the rebuild rate).",
        Some(&Unit::Bytes),
        &rebuilt,
    )
}

/// The routing controller's view of its nodes, encoded at each scrape.
#[derive(Debug)]
struct RouterCollector {
    registry: Arc<crate::cluster::registry::Registry>,
    replicated: crate::cluster::replicated::VolumeHealth,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

impl Collector for RouterCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = std::time::Instant::now();
        let nodes = self.registry.all();
        let node = |n: &crate::cluster::registry::NodeEntry| NodeLabels { node: n.id.clone() };
        gauges(
            &mut enc,
            "cluster_node_fresh",
            "1 while the node registers on time, 0 once it missed three periods",
            None,
            &nodes
                .iter()
                .map(|n| (node(n), i64::from(n.fresh(now))))
                .collect::<Vec<_>>(),
        )?;
        gauges(
            &mut enc,
            "cluster_node_cordoned",
            "1 while no new volumes are placed on the node",
            None,
            &nodes
                .iter()
                .map(|n| (node(n), i64::from(n.cordoned)))
                .collect::<Vec<_>>(),
        )?;
        gauges(
            &mut enc,
            "cluster_node_draining",
            "1 while every replicated volume's member moves off the node (stowage node drain)",
            None,
            &nodes
                .iter()
                .map(|n| (node(n), i64::from(n.draining)))
                .collect::<Vec<_>>(),
        )?;
        gauges(
            &mut enc,
            "cluster_node_pool_free",
            "free bytes of the node's pool, as it last registered",
            Some(&Unit::Bytes),
            &nodes
                .iter()
                .map(|n| (node(n), signed(n.free_bytes)))
                .collect::<Vec<_>>(),
        )?;
        gauges(
            &mut enc,
            "cluster_node_pool_size",
            "size in bytes of the node's pool, as it last registered",
            Some(&Unit::Bytes),
            &nodes
                .iter()
                .map(|n| (node(n), signed(n.total_bytes)))
                .collect::<Vec<_>>(),
        )?;
        gauges(
            &mut enc,
            "replicated_volume_abnormal",
            "1 while the replicated volume's condition is abnormal (a copy out of sync; of a volume not published, a region a disk could not read, or copies in sync whose bytes differ), as the controller last looked",
            None,
            &self
                .replicated
                .all()
                .into_iter()
                .map(|(volume, abnormal)| ([("volume", volume)], i64::from(abnormal)))
                .collect::<Vec<_>>(),
        )
    }
}

/// What `/healthz` answers: ready, or the reason it is not.
type HealthCheck = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The registry, the layer to put around the gRPC server, and the health
/// check of what is served (a driver, or the routing controller).
pub struct Metrics {
    registry: Registry,
    health: HealthCheck,
    rpc: Arc<RpcMetrics>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The driver's (`--mode all` and `node`): RPCs, pool and volumes.
    pub fn new(driver: Arc<Driver>) -> Arc<Self> {
        let health = {
            let d = Arc::clone(&driver);
            Box::new(move || d.check_ready()) as HealthCheck
        };
        Self::with(Box::new(DriverCollector { driver }), health)
    }

    /// The routing controller's (`--mode controller`): RPCs and the nodes
    /// it knows. It is healthy while it runs: nodes come and go.
    pub fn for_router(
        registry: Arc<crate::cluster::registry::Registry>,
        replicated: crate::cluster::replicated::VolumeHealth,
    ) -> Arc<Self> {
        Self::with(
            Box::new(RouterCollector {
                registry,
                replicated,
            }),
            Box::new(|| Ok(())),
        )
    }

    fn with(collector: Box<dyn Collector>, health: HealthCheck) -> Arc<Self> {
        let mut registry = Registry::with_prefix("stowage");
        let rpc = RpcMetrics::register(&mut registry);
        registry.register_collector(collector);
        Arc::new(Metrics {
            registry,
            health,
            rpc,
        })
    }

    /// The layer that feeds this registry's per-RPC series.
    pub fn layer(&self) -> RpcMetricsLayer {
        self.rpc.layer()
    }

    /// The exposition, in the Prometheus text format (0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String fails only if a collector does.
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::warn!(error = %e, "metrics: encoding failed");
        }
        out
    }

    /// GET `path`: `/metrics`, `/healthz`, or 404. Scrapes and health
    /// checks make syscalls, so they run on the blocking pool.
    pub async fn answer(self: Arc<Self>, path: String) -> Reply {
        let work = move || match path.as_str() {
            "/metrics" => Reply {
                status: 200,
                content_type: prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                body: self.render(),
            },
            "/healthz" => match (self.health)() {
                Ok(()) => Reply::text(200, "ok\n"),
                Err(reason) => Reply::text(503, format!("{reason}\n")),
            },
            _ => Reply::not_found(),
        };
        tokio::task::spawn_blocking(work)
            .await
            .unwrap_or_else(|e| Reply::text(500, format!("{e}\n")))
    }

    /// Serves `/metrics` and `/healthz` on `listener` until the task is
    /// dropped.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        stowage_sidecars::http::serve(listener, move |path| Arc::clone(&self).answer(path)).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::convert::Infallible;

    use super::*;

    #[test]
    fn every_csi_rpc_has_its_label() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
        let mut compiler = protox::Compiler::new([&dir]).unwrap();
        compiler.open_file(dir.join("csi.proto")).unwrap();
        let mut in_proto = BTreeSet::new();
        for service in compiler.descriptor_pool().services() {
            for m in service.methods() {
                let path = format!("/{}/{}", service.full_name(), m.name());
                assert_eq!(method_label(&path), m.name(), "{path}");
                in_proto.insert(m.name().to_owned());
            }
        }
        let listed: BTreeSet<String> = METHODS.iter().map(|m| m.to_string()).collect();
        assert_eq!(listed, in_proto, "METHODS is exactly the CSI RPCs");
        // The ABORTED series are created for every RPC after Identity's.
        assert_eq!(
            METHODS[..3],
            ["GetPluginInfo", "GetPluginCapabilities", "Probe"]
        );
    }

    #[test]
    fn unknown_paths_share_one_label() {
        for p in [
            "/csi.v1.Controller/Nope",
            "/other.Service/CreateVolume",
            "/",
            "",
            "/csi.v1.Controller",
        ] {
            assert_eq!(method_label(p), "unknown", "{p}");
        }
    }

    type Frames = std::array::IntoIter<Result<Frame<tonic::codegen::Bytes>, Infallible>, 2>;
    type TestBody = http_body_util::StreamBody<tokio_stream::Iter<Frames>>;

    /// A response whose status is in its trailers (`Some`) or, trailers-only,
    /// in its headers.
    fn response(
        trailer: Option<&'static str>,
        header: Option<&'static str>,
    ) -> http::Response<TestBody> {
        let mut trailers = http::HeaderMap::new();
        if let Some(code) = trailer {
            trailers.insert("grpc-status", http::HeaderValue::from_static(code));
        }
        let frames = tokio_stream::iter([
            Ok(Frame::data(tonic::codegen::Bytes::from_static(b"x"))),
            Ok(Frame::trailers(trailers)),
        ]);
        let mut r = http::Response::new(http_body_util::StreamBody::new(frames));
        if let Some(code) = header {
            r.headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static(code));
        }
        r
    }

    fn exposition(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, registry).unwrap();
        out
    }

    /// Sends one request for `path` whose answer is `resp`, reading the
    /// body to its end unless `read` is false (the client went away).
    async fn one(layer: &RpcMetricsLayer, path: &str, resp: http::Response<TestBody>, read: bool) {
        use http_body_util::BodyExt;
        use tower::{Layer, ServiceExt};
        let resp = std::sync::Mutex::new(Some(resp));
        let svc = layer.layer(tower::service_fn(move |_req: http::Request<()>| {
            let r = resp.lock().unwrap().take().unwrap();
            async move { Ok::<_, Infallible>(r) }
        }));
        let req = http::Request::builder().uri(path).body(()).unwrap();
        let body = svc.oneshot(req).await.unwrap().into_body();
        if read {
            body.collect().await.unwrap();
        }
    }

    #[tokio::test]
    async fn the_layer_counts_codes_from_trailers_headers_and_cancellation() {
        let mut registry = Registry::default();
        let layer = RpcMetrics::register(&mut registry).layer();
        let create = "/csi.v1.Controller/CreateVolume";
        one(&layer, create, response(Some("0"), None), true).await;
        one(&layer, create, response(Some("0"), None), true).await;
        one(&layer, create, response(None, Some("10")), true).await;
        one(
            &layer,
            "/csi.v1.Node/NodeStageVolume",
            response(Some("5"), None),
            true,
        )
        .await;
        // Dropped before its trailers: CANCELLED.
        one(
            &layer,
            "/csi.v1.Node/NodeStageVolume",
            response(Some("0"), None),
            false,
        )
        .await;
        // No status anywhere: UNKNOWN.
        one(&layer, "/x.Y/Z", response(None, None), true).await;

        let text = exposition(&registry);
        let has = |line: &str| text.lines().any(|l| l == line);
        for line in [
            r#"rpc_requests_total{method="CreateVolume",code="OK"} 2"#,
            r#"rpc_requests_total{method="CreateVolume",code="ABORTED"} 1"#,
            r#"rpc_requests_total{method="NodeStageVolume",code="NOT_FOUND"} 1"#,
            r#"rpc_requests_total{method="NodeStageVolume",code="CANCELLED"} 1"#,
            r#"rpc_requests_total{method="unknown",code="UNKNOWN"} 1"#,
            r#"rpc_aborted_total{method="CreateVolume"} 1"#,
            r#"rpc_aborted_total{method="NodeStageVolume"} 0"#,
            r#"rpc_in_flight{method="CreateVolume"} 0"#,
            r#"rpc_in_flight{method="NodeStageVolume"} 0"#,
            r#"rpc_duration_seconds_count{method="CreateVolume"} 3"#,
            r#"rpc_duration_seconds_count{method="NodeStageVolume"} 2"#,
        ] {
            assert!(has(line), "{line} missing from:\n{text}");
        }
        assert_eq!(text.matches("rpc_requests_total{").count(), 5, "{text}");
    }

    #[tokio::test]
    async fn the_inert_layer_passes_responses_through() {
        use http_body_util::BodyExt;
        use tower::{Layer, ServiceExt};
        let svc =
            RpcMetricsLayer::default().layer(tower::service_fn(|_req: http::Request<()>| async {
                Ok::<_, Infallible>(response(Some("3"), None))
            }));
        let req = http::Request::builder()
            .uri("/csi.v1.Identity/Probe")
            .body(())
            .unwrap();
        let collected = svc
            .oneshot(req)
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap();
        assert_eq!(
            collected.trailers().and_then(grpc_status),
            Some(Code::InvalidArgument)
        );
        assert_eq!(&collected.to_bytes()[..], b"x");
    }

    #[test]
    fn status_codes_are_read_from_headers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", "10".parse().unwrap());
        assert_eq!(grpc_status(&h), Some(Code::Aborted));
        assert_eq!(crate::server::convert::code_name(Code::Aborted), "ABORTED");
        h.insert("grpc-status", "x".parse().unwrap());
        assert_eq!(grpc_status(&h), None);
    }
}
