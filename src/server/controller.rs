//! The CSI Controller service: converts requests, calls the domain's
//! [`crate::volume::controller::Controller`], converts back.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{self, Redact};
use super::{Driver, blocking};
use crate::csi;
use crate::csi::controller_server::Controller as ControllerRpc;
use crate::csi::controller_service_capability::rpc::Type as Rpc;
use crate::volume::controller::{Condition, Controller, CreateVolume, PublishVolume};
use crate::volume::record::{ContentSource, SnapshotRecord, VolumeRecord};
use crate::volume::{Error, TOPOLOGY_NODE_KEY};

#[derive(Debug, Clone)]
pub struct ControllerService {
    pub(super) driver: Arc<Driver>,
}

/// The controller capabilities stowage advertises: every one it implements.
pub const CAPABILITIES: &[Rpc] = &[
    Rpc::CreateDeleteVolume,
    Rpc::PublishUnpublishVolume,
    Rpc::ListVolumes,
    Rpc::GetCapacity,
    Rpc::PublishReadonly,
    Rpc::CreateDeleteSnapshot,
    Rpc::ListSnapshots,
    Rpc::GetSnapshot,
    Rpc::CloneVolume,
    Rpc::ModifyVolume,
    Rpc::ExpandVolume,
    Rpc::ListVolumesPublishedNodes,
    Rpc::GetVolume,
    Rpc::VolumeCondition,
    Rpc::SingleNodeMultiWriter,
];

/// ControllerGetCapabilities' answer.
pub fn capabilities() -> csi::ControllerGetCapabilitiesResponse {
    csi::ControllerGetCapabilitiesResponse {
        capabilities: CAPABILITIES
            .iter()
            .map(|t| csi::ControllerServiceCapability {
                r#type: Some(csi::controller_service_capability::Type::Rpc(
                    csi::controller_service_capability::Rpc { r#type: *t as i32 },
                )),
            })
            .collect(),
    }
}

impl ControllerService {
    pub fn new(driver: Arc<Driver>) -> Self {
        Self { driver }
    }

    fn controller(&self) -> Arc<Controller> {
        Arc::clone(
            self.driver
                .controller
                .as_ref()
                .expect("controller service runs with a controller"),
        )
    }
}

fn to_volume(rec: &VolumeRecord) -> csi::Volume {
    let mut volume_context: std::collections::HashMap<String, String> =
        rec.volume_context.clone().into_iter().collect();
    volume_context.insert(
        crate::volume::controller::NAME_KEY.to_owned(),
        rec.name.clone(),
    );
    csi::Volume {
        capacity_bytes: rec.capacity_bytes as i64,
        volume_id: rec.id.to_string(),
        volume_context,
        content_source: rec
            .content_source
            .as_ref()
            .map(|s| csi::VolumeContentSource {
                r#type: Some(match s {
                    ContentSource::Snapshot(id) => csi::volume_content_source::Type::Snapshot(
                        csi::volume_content_source::SnapshotSource {
                            snapshot_id: id.clone(),
                        },
                    ),
                    ContentSource::Volume(id) => csi::volume_content_source::Type::Volume(
                        csi::volume_content_source::VolumeSource {
                            volume_id: id.clone(),
                        },
                    ),
                }),
            }),
        // Remote storage (object volumes) is reachable from every node.
        accessible_topology: if rec.id.backend.profile().node_local() {
            vec![csi::Topology {
                segments: [(TOPOLOGY_NODE_KEY.to_owned(), rec.id.node.clone())]
                    .into_iter()
                    .collect(),
            }]
        } else {
            Vec::new()
        },
    }
}

pub(super) fn to_snapshot(s: &SnapshotRecord) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: s.size_bytes as i64,
        snapshot_id: s.id.to_string(),
        source_volume_id: s.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created_at.0,
            nanos: s.created_at.1,
        }),
        ready_to_use: s.ready,
        group_snapshot_id: s.group.clone().unwrap_or_default(),
    }
}

fn to_condition(c: &Condition) -> csi::VolumeCondition {
    csi::VolumeCondition {
        abnormal: c.abnormal,
        message: c.message.clone(),
    }
}

impl TryFrom<&csi::CreateVolumeRequest> for CreateVolume {
    type Error = Error;
    fn try_from(r: &csi::CreateVolumeRequest) -> Result<Self, Error> {
        convert::required_str("name", &r.name)?;
        if r.name.len() > 128 * 4 || r.name.contains('\0') {
            return Err(Error::invalid("name", "name is too long or contains NUL"));
        }
        let capabilities = convert::capabilities("volume_capabilities", &r.volume_capabilities)?;
        let content_source = match r.volume_content_source.as_ref().map(|s| &s.r#type) {
            None => None,
            Some(Some(csi::volume_content_source::Type::Snapshot(s))) => {
                convert::required_str(
                    "volume_content_source.snapshot.snapshot_id",
                    &s.snapshot_id,
                )?;
                Some(ContentSource::Snapshot(s.snapshot_id.clone()))
            }
            Some(Some(csi::volume_content_source::Type::Volume(v))) => {
                convert::required_str("volume_content_source.volume.volume_id", &v.volume_id)?;
                Some(ContentSource::Volume(v.volume_id.clone()))
            }
            Some(None) => {
                return Err(Error::invalid(
                    "volume_content_source",
                    "type (snapshot or volume) is required",
                ));
            }
        };
        let (required_bytes, limit_bytes) = convert::capacity(r.capacity_range.as_ref())?;
        let (requisite, preferred) = r
            .accessibility_requirements
            .as_ref()
            .map(|t| {
                (
                    convert::topologies(&t.requisite),
                    convert::topologies(&t.preferred),
                )
            })
            .unwrap_or_default();
        Ok(CreateVolume {
            name: r.name.clone(),
            required_bytes,
            limit_bytes,
            capabilities,
            parameters: convert::map(&r.parameters),
            requisite,
            preferred,
            content_source,
            mutable_parameters: convert::map(&r.mutable_parameters),
            secrets: convert::map(&r.secrets),
        })
    }
}

impl TryFrom<&csi::ControllerPublishVolumeRequest> for PublishVolume {
    type Error = Error;
    fn try_from(r: &csi::ControllerPublishVolumeRequest) -> Result<Self, Error> {
        convert::required_str("volume_id", &r.volume_id)?;
        convert::required_str("node_id", &r.node_id)?;
        Ok(PublishVolume {
            volume_id: r.volume_id.clone(),
            node_id: r.node_id.clone(),
            capability: convert::capability("volume_capability", r.volume_capability.as_ref())?,
            read_only: r.readonly,
        })
    }
}

#[tonic::async_trait]
impl ControllerRpc for ControllerService {
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(request = ?r.redacted(), "CreateVolume");
        let cmd = CreateVolume::try_from(&r)?;
        let c = self.controller();
        blocking("CreateVolume", move || {
            c.create_volume(cmd).map(|rec| csi::CreateVolumeResponse {
                volume: Some(to_volume(&rec)),
            })
        })
        .await
    }

    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(request = ?r.redacted(), "DeleteVolume");
        convert::required_str("volume_id", &r.volume_id)?;
        let c = self.controller();
        blocking("DeleteVolume", move || {
            c.delete_volume(&r.volume_id, &convert::map(&r.secrets))
                .map(|()| csi::DeleteVolumeResponse {})
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(request = ?r.redacted(), "ControllerPublishVolume");
        let cmd = PublishVolume::try_from(&r)?;
        let c = self.controller();
        blocking("ControllerPublishVolume", move || {
            c.publish(cmd)
                .map(|ctx| csi::ControllerPublishVolumeResponse {
                    publish_context: ctx.into_iter().collect(),
                })
        })
        .await
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(request = ?r.redacted(), "ControllerUnpublishVolume");
        convert::required_str("volume_id", &r.volume_id)?;
        let c = self.controller();
        blocking("ControllerUnpublishVolume", move || {
            c.unpublish(&r.volume_id, &r.node_id)
                .map(|()| csi::ControllerUnpublishVolumeResponse {})
        })
        .await
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(request = ?r.redacted(), "ValidateVolumeCapabilities");
        convert::required_str("volume_id", &r.volume_id)?;
        let caps = convert::capabilities("volume_capabilities", &r.volume_capabilities)?;
        let c = self.controller();
        blocking("ValidateVolumeCapabilities", move || {
            let params = convert::map(&r.parameters);
            Ok(match c.validate(&r.volume_id, &caps, &params)? {
                None => csi::ValidateVolumeCapabilitiesResponse {
                    confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                        volume_context: r.volume_context.clone(),
                        volume_capabilities: r.volume_capabilities.clone(),
                        parameters: r.parameters.clone(),
                        mutable_parameters: Default::default(),
                    }),
                    message: String::new(),
                },
                Some(reason) => csi::ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: reason,
                },
            })
        })
        .await
    }

    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        if r.max_entries < 0 {
            return Err(Error::invalid("max_entries", "must not be negative").into());
        }
        let c = self.controller();
        blocking("ListVolumes", move || {
            let page = c.list(r.max_entries as usize, &r.starting_token)?;
            Ok(csi::ListVolumesResponse {
                entries: page
                    .entries
                    .iter()
                    .map(|(rec, cond)| csi::list_volumes_response::Entry {
                        volume: Some(to_volume(rec)),
                        status: Some(csi::list_volumes_response::VolumeStatus {
                            published_node_ids: rec.attachments.keys().cloned().collect(),
                            volume_condition: Some(to_condition(cond)),
                        }),
                    })
                    .collect(),
                next_token: page.next_token.unwrap_or_default(),
            })
        })
        .await
    }

    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let r = req.into_inner();
        let caps = r
            .volume_capabilities
            .iter()
            .map(|cap| convert::capability("volume_capabilities", Some(cap)))
            .collect::<Result<Vec<_>, _>>()?;
        let c = self.controller();
        blocking("GetCapacity", move || {
            let topo = r
                .accessible_topology
                .as_ref()
                .map(|t| convert::map(&t.segments));
            let cap = c.capacity(&caps, &convert::map(&r.parameters), topo.as_ref())?;
            Ok(csi::GetCapacityResponse {
                available_capacity: cap.available as i64,
                maximum_volume_size: cap.maximum_volume_size.map(|v| v as i64),
                minimum_volume_size: None,
            })
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities()))
    }

    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let r = req.into_inner();
        convert::required_str("volume_id", &r.volume_id)?;
        let c = self.controller();
        blocking("ControllerGetVolume", move || {
            let (rec, cond) = c.get(&r.volume_id)?;
            Ok(csi::ControllerGetVolumeResponse {
                volume: Some(to_volume(&rec)),
                status: Some(csi::controller_get_volume_response::VolumeStatus {
                    published_node_ids: rec.attachments.keys().cloned().collect(),
                    volume_condition: Some(to_condition(&cond)),
                }),
            })
        })
        .await
    }

    async fn create_snapshot(
        &self,
        req: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(request = ?r.redacted(), "CreateSnapshot");
        convert::required_str("name", &r.name)?;
        convert::required_str("source_volume_id", &r.source_volume_id)?;
        let c = self.controller();
        blocking("CreateSnapshot", move || {
            let s = c.create_snapshot(
                &r.name,
                &r.source_volume_id,
                &convert::map(&r.parameters),
                &convert::map(&r.secrets),
            )?;
            Ok(csi::CreateSnapshotResponse {
                snapshot: Some(to_snapshot(&s)),
            })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        req: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(request = ?r.redacted(), "DeleteSnapshot");
        convert::required_str("snapshot_id", &r.snapshot_id)?;
        let c = self.controller();
        blocking("DeleteSnapshot", move || {
            c.delete_snapshot(&r.snapshot_id, &convert::map(&r.secrets))
                .map(|()| csi::DeleteSnapshotResponse {})
        })
        .await
    }

    async fn list_snapshots(
        &self,
        req: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        if r.max_entries < 0 {
            return Err(Error::invalid("max_entries", "must not be negative").into());
        }
        let c = self.controller();
        blocking("ListSnapshots", move || {
            let page = c.list_snapshots(
                r.max_entries as usize,
                &r.starting_token,
                &r.snapshot_id,
                &r.source_volume_id,
            )?;
            Ok(csi::ListSnapshotsResponse {
                entries: page
                    .entries
                    .iter()
                    .map(|s| csi::list_snapshots_response::Entry {
                        snapshot: Some(to_snapshot(s)),
                    })
                    .collect(),
                next_token: page.next_token.unwrap_or_default(),
            })
        })
        .await
    }

    async fn get_snapshot(
        &self,
        req: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let r = req.into_inner();
        convert::required_str("snapshot_id", &r.snapshot_id)?;
        let c = self.controller();
        blocking("GetSnapshot", move || {
            let s = c.get_snapshot(&r.snapshot_id)?;
            Ok(csi::GetSnapshotResponse {
                snapshot: Some(to_snapshot(&s)),
            })
        })
        .await
    }

    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(request = ?r.redacted(), "ControllerExpandVolume");
        convert::required_str("volume_id", &r.volume_id)?;
        if r.capacity_range.is_none() {
            return Err(Error::MissingField("capacity_range").into());
        }
        let (required, limit) = convert::capacity(r.capacity_range.as_ref())?;
        let c = self.controller();
        blocking("ControllerExpandVolume", move || {
            let (size, node) = c.expand_volume(&r.volume_id, required, limit)?;
            Ok(csi::ControllerExpandVolumeResponse {
                capacity_bytes: size as i64,
                node_expansion_required: node,
            })
        })
        .await
    }

    async fn controller_modify_volume(
        &self,
        req: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(request = ?r.redacted(), "ControllerModifyVolume");
        convert::required_str("volume_id", &r.volume_id)?;
        // REQUIRED by the spec: a modify that names nothing to change is a
        // malformed request, not a no-op.
        if r.mutable_parameters.is_empty() {
            return Err(Error::MissingField("mutable_parameters").into());
        }
        let c = self.controller();
        blocking("ControllerModifyVolume", move || {
            c.modify_volume(&r.volume_id, &convert::map(&r.mutable_parameters))
                .map(|()| csi::ControllerModifyVolumeResponse {})
        })
        .await
    }
}
