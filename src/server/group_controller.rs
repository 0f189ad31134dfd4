//! The CSI GroupController service: crash-consistent snapshots of several
//! volumes at once.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{self, Redact};
use super::{Driver, blocking};
use crate::csi;
use crate::csi::group_controller_server::GroupController;
use crate::csi::group_controller_service_capability::rpc::Type as Rpc;
use crate::volume::Error;
use crate::volume::controller::Controller;
use crate::volume::group::GroupSnapshot;

#[derive(Debug, Clone)]
pub struct GroupControllerService {
    pub(super) driver: Arc<Driver>,
}

impl GroupControllerService {
    fn controller(&self) -> Arc<Controller> {
        Arc::clone(
            self.driver
                .controller
                .as_ref()
                .expect("served with a controller"),
        )
    }
}

fn to_group(g: &GroupSnapshot) -> csi::VolumeGroupSnapshot {
    csi::VolumeGroupSnapshot {
        group_snapshot_id: g.record.id.clone(),
        snapshots: g
            .members
            .iter()
            .map(|s| {
                let mut pb = super::controller::to_snapshot(s);
                pb.group_snapshot_id = g.record.id.clone();
                pb
            })
            .collect(),
        creation_time: Some(prost_types::Timestamp {
            seconds: g.record.created_at.0,
            nanos: g.record.created_at.1,
        }),
        ready_to_use: g.members.iter().all(|m| m.ready),
    }
}

/// GroupControllerGetCapabilities' answer.
pub fn capabilities() -> csi::GroupControllerGetCapabilitiesResponse {
    csi::GroupControllerGetCapabilitiesResponse {
        capabilities: vec![csi::GroupControllerServiceCapability {
            r#type: Some(csi::group_controller_service_capability::Type::Rpc(
                csi::group_controller_service_capability::Rpc {
                    r#type: Rpc::CreateDeleteGetVolumeGroupSnapshot as i32,
                },
            )),
        }],
    }
}

impl GroupControllerService {
    pub fn new(driver: Arc<Driver>) -> Self {
        Self { driver }
    }
}

#[tonic::async_trait]
impl GroupController for GroupControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _req: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities()))
    }

    async fn create_volume_group_snapshot(
        &self,
        req: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(request = ?r.redacted(), "CreateVolumeGroupSnapshot");
        convert::required_str("name", &r.name)?;
        if r.source_volume_ids.is_empty() {
            return Err(Error::MissingField("source_volume_ids").into());
        }
        if r.source_volume_ids.iter().any(String::is_empty) {
            return Err(Error::invalid("source_volume_ids", "an entry is empty").into());
        }
        let c = self.controller();
        blocking("CreateVolumeGroupSnapshot", move || {
            let g = c.create_group_snapshot(
                &r.name,
                &r.source_volume_ids,
                &convert::map(&r.parameters),
            )?;
            Ok(csi::CreateVolumeGroupSnapshotResponse {
                group_snapshot: Some(to_group(&g)),
            })
        })
        .await
    }

    async fn delete_volume_group_snapshot(
        &self,
        req: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(request = ?r.redacted(), "DeleteVolumeGroupSnapshot");
        convert::required_str("group_snapshot_id", &r.group_snapshot_id)?;
        let c = self.controller();
        blocking("DeleteVolumeGroupSnapshot", move || {
            c.delete_group_snapshot(&r.group_snapshot_id, &r.snapshot_ids)
                .map(|()| csi::DeleteVolumeGroupSnapshotResponse {})
        })
        .await
    }

    async fn get_volume_group_snapshot(
        &self,
        req: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let r = req.into_inner();
        convert::required_str("group_snapshot_id", &r.group_snapshot_id)?;
        let c = self.controller();
        blocking("GetVolumeGroupSnapshot", move || {
            let g = c.get_group_snapshot(&r.group_snapshot_id, &r.snapshot_ids)?;
            Ok(csi::GetVolumeGroupSnapshotResponse {
                group_snapshot: Some(to_group(&g)),
            })
        })
        .await
    }
}
