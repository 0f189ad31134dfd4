//! Shared pieces of the benchmarks: a CSI client for any driver's socket
//! (capability discovery, the lifecycle calls with arbitrary parameters),
//! argument parsing, and statistics. Nothing here is stowage-specific, so
//! every benchmark can be pointed at another driver with `--endpoint`.

#![allow(dead_code, clippy::disallowed_methods)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod fio;

use stowage::csi;
use stowage::csi::controller_client::ControllerClient;
use stowage::csi::identity_client::IdentityClient;
use stowage::csi::node_client::NodeClient;
use tonic::transport::Channel;

pub use csi::volume_capability::access_mode::Mode;

/// Connects to `unix:///path`, `unix:/path`, `/path` or `tcp://host:port`.
pub async fn connect(endpoint: &str) -> Channel {
    let endpoint = if endpoint.starts_with('/') {
        format!("unix://{endpoint}")
    } else {
        endpoint.to_owned()
    };
    stowage::client::channel(&endpoint)
        .await
        .expect("connect to the CSI endpoint")
}

/// What a driver offers, discovered through CSI calls only.
#[derive(Debug, Clone)]
pub struct Driver {
    pub name: String,
    pub node_id: String,
    pub topology: Option<csi::Topology>,
    pub stage: bool,
    pub controller_publish: bool,
    pub snapshots: bool,
    pub clone: bool,
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

impl Driver {
    pub async fn discover(endpoint: &str) -> Driver {
        let ch = connect(endpoint).await;
        let mut identity = IdentityClient::new(ch.clone());
        let mut controller = ControllerClient::new(ch.clone());
        let mut node = NodeClient::new(ch);
        let name = identity
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .expect("GetPluginInfo")
            .into_inner()
            .name;
        let info = node
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
            .expect("NodeGetInfo")
            .into_inner();
        use csi::controller_service_capability::rpc::Type as C;
        use csi::node_service_capability::rpc::Type as N;
        let ncaps: Vec<i32> = node
            .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
            .await
            .expect("NodeGetCapabilities")
            .into_inner()
            .capabilities
            .into_iter()
            .filter_map(|c| {
                c.r#type
                    .map(|csi::node_service_capability::Type::Rpc(r)| r.r#type)
            })
            .collect();
        let ccaps: Vec<i32> = controller
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await
            .map(|r| {
                r.into_inner()
                    .capabilities
                    .into_iter()
                    .filter_map(|c| {
                        c.r#type
                            .map(|csi::controller_service_capability::Type::Rpc(r)| r.r#type)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Driver {
            name,
            node_id: info.node_id,
            topology: info.accessible_topology,
            stage: ncaps.contains(&(N::StageUnstageVolume as i32)),
            controller_publish: ccaps.contains(&(C::PublishUnpublishVolume as i32)),
            snapshots: ccaps.contains(&(C::CreateDeleteSnapshot as i32)),
            clone: ccaps.contains(&(C::CloneVolume as i32)),
            identity,
            controller,
            node,
        }
    }
}

/// The volume shape a benchmark asks for.
#[derive(Debug, Clone)]
pub struct VolumeSpec {
    pub block: bool,
    pub fs_type: String,
    pub size: i64,
    pub parameters: HashMap<String, String>,
}

impl VolumeSpec {
    pub fn capability(&self) -> csi::VolumeCapability {
        use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
        csi::VolumeCapability {
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
            access_type: Some(if self.block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume {
                    fs_type: self.fs_type.clone(),
                    mount_flags: vec![],
                    volume_mount_group: String::new(),
                })
            }),
        }
    }

    pub fn create_request(&self, name: &str, d: &Driver) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: self.size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![self.capability()],
            parameters: self.parameters.clone(),
            accessibility_requirements: d.topology.clone().map(|t| csi::TopologyRequirement {
                requisite: vec![t.clone()],
                preferred: vec![t],
            }),
            ..Default::default()
        }
    }
}

/// A volume made usable at a target path, as a CO would.
#[derive(Debug, Clone)]
pub struct Published {
    pub volume: csi::Volume,
    pub publish_context: HashMap<String, String>,
    pub staging: PathBuf,
    pub target: PathBuf,
}

/// Create → [ControllerPublish] → [Stage] → Publish, for setting up data
/// benchmarks (no timing).
pub async fn provision(d: &mut Driver, spec: &VolumeSpec, name: &str, work: &Path) -> Published {
    let volume = d
        .controller
        .create_volume(spec.create_request(name, d))
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume");
    let mut publish_context = HashMap::new();
    if d.controller_publish {
        publish_context = d
            .controller
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: volume.volume_id.clone(),
                node_id: d.node_id.clone(),
                volume_capability: Some(spec.capability()),
                volume_context: volume.volume_context.clone(),
                ..Default::default()
            })
            .await
            .expect("ControllerPublishVolume")
            .into_inner()
            .publish_context;
    }
    let staging = work.join(format!("{name}-staging"));
    let target = work.join(format!("{name}-target"));
    std::fs::create_dir_all(&staging).unwrap();
    if d.stage {
        d.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: volume.volume_id.clone(),
                publish_context: publish_context.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(spec.capability()),
                volume_context: volume.volume_context.clone(),
                ..Default::default()
            })
            .await
            .expect("NodeStageVolume");
    }
    d.node
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            publish_context: publish_context.clone(),
            staging_target_path: if d.stage {
                staging.display().to_string()
            } else {
                String::new()
            },
            target_path: target.display().to_string(),
            volume_capability: Some(spec.capability()),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        })
        .await
        .expect("NodePublishVolume");
    Published {
        volume,
        publish_context,
        staging,
        target,
    }
}

/// Undoes [`provision`].
pub async fn teardown(d: &mut Driver, p: &Published) {
    let id = p.volume.volume_id.clone();
    d.node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: p.target.display().to_string(),
        })
        .await
        .expect("NodeUnpublishVolume");
    if d.stage {
        d.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: p.staging.display().to_string(),
            })
            .await
            .expect("NodeUnstageVolume");
    }
    if d.controller_publish {
        d.controller
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: id.clone(),
                node_id: d.node_id.clone(),
                ..Default::default()
            })
            .await
            .expect("ControllerUnpublishVolume");
    }
    d.controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        })
        .await
        .expect("DeleteVolume");
}

/// `--flag value` lookups over the bench's arguments.
pub struct Args(pub Vec<String>);

impl Args {
    pub fn from_env() -> Self {
        Args(std::env::args().skip(1).collect())
    }
    pub fn value(&self, flag: &str) -> Option<String> {
        let i = self.0.iter().position(|a| a == flag)?;
        self.0.get(i + 1).cloned()
    }
    pub fn values(&self, flag: &str) -> Vec<String> {
        self.0
            .windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    }
    pub fn flag(&self, flag: &str) -> bool {
        self.0.iter().any(|a| a == flag)
    }
    /// `KEY=VALUE` pairs given with `--param`.
    pub fn params(&self) -> HashMap<String, String> {
        self.values("--param")
            .into_iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
            })
            .collect()
    }
}

/// Parses `64Mi`, `1Gi`, `4096`.
pub fn parse_size(s: &str) -> i64 {
    let (num, mult) = if let Some(n) = s.strip_suffix("Ki") {
        (n, 1 << 10)
    } else if let Some(n) = s.strip_suffix("Mi") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("Gi") {
        (n, 1 << 30)
    } else if let Some(n) = s.strip_suffix("Ti") {
        (n, 1i64 << 40)
    } else {
        (s, 1)
    };
    num.parse::<i64>().expect("size") * mult
}

/// Order statistics of a sample of durations.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Summary {
    pub n: usize,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

pub fn summarize(samples: &[Duration]) -> Summary {
    let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let q = |p: f64| {
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    Summary {
        n: v.len(),
        median_ms: q(0.5),
        p90_ms: q(0.9),
        p99_ms: q(0.99),
    }
}

/// The resident set size of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
