//! The CSI Node service: converts requests, calls the domain's
//! [`crate::volume::node::Node`], converts back.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{self, Redact};
use super::{Driver, blocking};
use crate::csi;
use crate::csi::node_server::Node as NodeRpc;
use crate::csi::node_service_capability::rpc::Type as Rpc;
use crate::volume::Error;
use crate::volume::node::{Node, PublishVolume, StageVolume, Usage};

#[derive(Debug, Clone)]
pub struct NodeService {
    pub(super) driver: Arc<Driver>,
}

/// The node capabilities stowage advertises.
pub const CAPABILITIES: &[Rpc] = &[
    Rpc::StageUnstageVolume,
    Rpc::GetVolumeStats,
    Rpc::VolumeCondition,
    Rpc::SingleNodeMultiWriter,
    Rpc::ExpandVolume,
    Rpc::VolumeMountGroup,
];

impl NodeService {
    fn node(&self) -> Arc<Node> {
        Arc::clone(
            self.driver
                .node
                .as_ref()
                .expect("node service runs with a node"),
        )
    }
}

/// VOLUME_MOUNT_GROUP: the group id a mount capability names, if any.
fn mount_group(cap: Option<&csi::VolumeCapability>) -> Result<Option<u32>, Error> {
    let Some(csi::volume_capability::AccessType::Mount(m)) =
        cap.and_then(|c| c.access_type.as_ref())
    else {
        return Ok(None);
    };
    if m.volume_mount_group.is_empty() {
        return Ok(None);
    }
    m.volume_mount_group.parse::<u32>().map(Some).map_err(|_| {
        Error::invalid(
            "volume_capability.mount.volume_mount_group",
            format!("{:?} is not a numeric group id", m.volume_mount_group),
        )
    })
}

impl TryFrom<&csi::NodeStageVolumeRequest> for StageVolume {
    type Error = Error;
    fn try_from(r: &csi::NodeStageVolumeRequest) -> Result<Self, Error> {
        convert::required_str("volume_id", &r.volume_id)?;
        Ok(StageVolume {
            volume_id: r.volume_id.clone(),
            staging_path: convert::path("staging_target_path", &r.staging_target_path)?,
            capability: convert::capability("volume_capability", r.volume_capability.as_ref())?,
            grow_fs: r
                .volume_context
                .get(crate::volume::controller::GROW_FS_KEY)
                .is_some_and(|v| v == "true"),
            volume_context: r.volume_context.clone().into_iter().collect(),
            secrets: crate::volume::node::Secrets(r.secrets.clone().into_iter().collect()),
            mount_group: mount_group(r.volume_capability.as_ref())?,
            publish_context: r.publish_context.clone().into_iter().collect(),
        })
    }
}

impl TryFrom<&csi::NodePublishVolumeRequest> for PublishVolume {
    type Error = Error;
    fn try_from(r: &csi::NodePublishVolumeRequest) -> Result<Self, Error> {
        convert::required_str("volume_id", &r.volume_id)?;
        let target_path = convert::path("target_path", &r.target_path)?;
        let capability = convert::capability("volume_capability", r.volume_capability.as_ref())?;
        // "It MUST be set if the Node Plugin implements the
        // STAGE_UNSTAGE_VOLUME node capability"; the spec's error table
        // names its absence: "Staging target path not set",
        // FAILED_PRECONDITION (the CO should stage first).
        let staging_path = if r.staging_target_path.is_empty() {
            if CAPABILITIES.contains(&Rpc::StageUnstageVolume) {
                return Err(Error::precondition(
                    &r.volume_id,
                    "staging_target_path is not set: this plugin stages volumes (STAGE_UNSTAGE_VOLUME); call NodeStageVolume first and pass its path",
                ));
            }
            None
        } else {
            Some(convert::path(
                "staging_target_path",
                &r.staging_target_path,
            )?)
        };
        if staging_path.as_ref() == Some(&target_path) {
            return Err(Error::invalid(
                "target_path",
                "must differ from staging_target_path",
            ));
        }
        Ok(PublishVolume {
            volume_id: r.volume_id.clone(),
            target_path,
            staging_path,
            capability,
            read_only: r.readonly,
            mount_group: mount_group(r.volume_capability.as_ref())?,
        })
    }
}

#[tonic::async_trait]
impl NodeRpc for NodeService {
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(request = ?r.redacted(), "NodeStageVolume");
        let cmd = StageVolume::try_from(&r)?;
        let n = self.node();
        blocking("NodeStageVolume", move || {
            n.stage(cmd).map(|()| csi::NodeStageVolumeResponse {})
        })
        .await
    }

    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(request = ?r.redacted(), "NodeUnstageVolume");
        convert::required_str("volume_id", &r.volume_id)?;
        let path = convert::path("staging_target_path", &r.staging_target_path)?;
        let n = self.node();
        blocking("NodeUnstageVolume", move || {
            n.unstage(&r.volume_id, &path)
                .map(|()| csi::NodeUnstageVolumeResponse {})
        })
        .await
    }

    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(request = ?r.redacted(), "NodePublishVolume");
        let cmd = PublishVolume::try_from(&r)?;
        let n = self.node();
        blocking("NodePublishVolume", move || {
            n.publish(cmd).map(|()| csi::NodePublishVolumeResponse {})
        })
        .await
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(request = ?r.redacted(), "NodeUnpublishVolume");
        convert::required_str("volume_id", &r.volume_id)?;
        let path = convert::path("target_path", &r.target_path)?;
        let n = self.node();
        blocking("NodeUnpublishVolume", move || {
            n.unpublish(&r.volume_id, &path)
                .map(|()| csi::NodeUnpublishVolumeResponse {})
        })
        .await
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        convert::required_str("volume_id", &r.volume_id)?;
        convert::required_str("volume_path", &r.volume_path)?;
        let n = self.node();
        blocking("NodeGetVolumeStats", move || {
            let stats = n.stats(&r.volume_id, &r.volume_path)?;
            use csi::volume_usage::Unit;
            let usage = stats
                .usage
                .iter()
                .map(|u| {
                    let (unit, total, available, used) = match *u {
                        Usage::Bytes {
                            total,
                            available,
                            used,
                        } => (Unit::Bytes, total, available, used),
                        Usage::Inodes {
                            total,
                            available,
                            used,
                        } => (Unit::Inodes, total, available, used),
                    };
                    csi::VolumeUsage {
                        available: i64::try_from(available).unwrap_or(i64::MAX),
                        total: i64::try_from(total).unwrap_or(i64::MAX),
                        used: i64::try_from(used).unwrap_or(i64::MAX),
                        unit: unit as i32,
                    }
                })
                .collect();
            Ok(csi::NodeGetVolumeStatsResponse {
                usage,
                volume_condition: Some(csi::VolumeCondition {
                    abnormal: stats.condition.abnormal,
                    message: stats.condition.message,
                }),
            })
        })
        .await
    }

    async fn node_expand_volume(
        &self,
        req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(request = ?r.redacted(), "NodeExpandVolume");
        convert::required_str("volume_id", &r.volume_id)?;
        convert::required_str("volume_path", &r.volume_path)?;
        let n = self.node();
        blocking("NodeExpandVolume", move || {
            let required = r
                .capacity_range
                .as_ref()
                .map(|c| c.required_bytes.max(0) as u64)
                .filter(|b| *b > 0);
            let size = n.expand(&r.volume_id, &r.volume_path, required)?;
            Ok(csi::NodeExpandVolumeResponse {
                capacity_bytes: size as i64,
            })
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: CAPABILITIES
                .iter()
                .map(|t| csi::NodeServiceCapability {
                    r#type: Some(csi::node_service_capability::Type::Rpc(
                        csi::node_service_capability::Rpc { r#type: *t as i32 },
                    )),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let n = self.node();
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: n.node_id().to_owned(),
            max_volumes_per_node: n.max_volumes_per_node() as i64,
            accessible_topology: Some(csi::Topology {
                segments: n.topology().into_iter().collect(),
            }),
        }))
    }
}
