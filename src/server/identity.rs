//! The CSI Identity service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Driver;
use crate::csi;
use crate::csi::identity_server::Identity;
use crate::csi::plugin_capability::service::Type as ServiceType;

#[derive(Debug, Clone)]
pub struct IdentityService {
    pub(super) driver: Arc<Driver>,
}

fn service(t: ServiceType) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(csi::plugin_capability::Type::Service(
            csi::plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

/// GetPluginCapabilities' answer: the plugin's, in every mode.
pub fn capabilities() -> csi::GetPluginCapabilitiesResponse {
    let mut capabilities = vec![
        service(ServiceType::ControllerService),
        service(ServiceType::VolumeAccessibilityConstraints),
        service(ServiceType::GroupControllerService),
        service(ServiceType::SnapshotMetadataService),
    ];
    capabilities.push(csi::PluginCapability {
        r#type: Some(csi::plugin_capability::Type::VolumeExpansion(
            csi::plugin_capability::VolumeExpansion {
                r#type: csi::plugin_capability::volume_expansion::Type::Online as i32,
            },
        )),
    });
    csi::GetPluginCapabilitiesResponse { capabilities }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _req: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: self.driver.name.clone(),
            vendor_version: crate::VENDOR_VERSION.to_owned(),
            manifest: [
                (
                    "pool-filesystem".to_owned(),
                    self.driver.strategy.fs.to_string(),
                ),
                (
                    "snapshot-strategy".to_owned(),
                    self.driver.strategy.strategy.to_string(),
                ),
            ]
            .into(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        // The plugin as a whole, whatever this instance serves: "All
        // instances of the same version ... SHALL return the same set of
        // capabilities, regardless of ... which RPCs an instance is
        // serving" (CSI spec, GetPluginCapabilities).
        Ok(Response::new(capabilities()))
    }

    async fn probe(
        &self,
        _req: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let driver = Arc::clone(&self.driver);
        let ready = tokio::task::spawn_blocking(move || driver.check_ready())
            .await
            .map_err(|e| Status::internal(format!("probe failed: {e}")))?;
        if let Err(reason) = &ready {
            tracing::warn!(%reason, "probe: not ready");
        }
        Ok(Response::new(csi::ProbeResponse {
            ready: Some(ready.is_ok()),
        }))
    }
}
