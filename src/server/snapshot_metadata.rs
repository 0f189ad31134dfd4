//! The CSI SnapshotMetadata service: allocated and changed block ranges of
//! block volume snapshots, streamed in pages of `max_results`.

use std::pin::Pin;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Driver;
use crate::csi;
use crate::csi::snapshot_metadata_server::SnapshotMetadata;
use crate::volume::Error;
use crate::volume::controller::Controller;
use crate::volume::metadata::Ranges;

#[derive(Debug, Clone)]
pub struct SnapshotMetadataService {
    pub(super) driver: Arc<Driver>,
}

/// Ranges per response when the request leaves `max_results` at 0.
const DEFAULT_PAGE: usize = 1024;

/// A server-streaming answer (also the routing controller's).
pub(crate) type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

impl SnapshotMetadataService {
    pub fn new(driver: Arc<Driver>) -> Self {
        Self { driver }
    }

    fn controller(&self) -> Arc<Controller> {
        Arc::clone(
            self.driver
                .controller
                .as_ref()
                .expect("served with a controller"),
        )
    }
}

fn check_paging(starting_offset: i64, max_results: i32) -> Result<(u64, usize), Error> {
    if starting_offset < 0 {
        return Err(Error::invalid("starting_offset", "must not be negative"));
    }
    if max_results < 0 {
        return Err(Error::invalid("max_results", "must not be negative"));
    }
    let page = if max_results == 0 {
        DEFAULT_PAGE
    } else {
        max_results as usize
    };
    Ok((starting_offset as u64, page))
}

/// Splits ranges into pages, one response each (at least one response,
/// possibly empty, so the caller learns the capacity).
fn pages(r: &Ranges, page: usize) -> Vec<(i64, Vec<csi::BlockMetadata>)> {
    let blocks: Vec<csi::BlockMetadata> = r
        .ranges
        .iter()
        .map(|(o, l)| csi::BlockMetadata {
            byte_offset: *o as i64,
            size_bytes: *l as i64,
        })
        .collect();
    if blocks.is_empty() {
        return vec![(r.capacity as i64, vec![])];
    }
    blocks
        .chunks(page)
        .map(|c| (r.capacity as i64, c.to_vec()))
        .collect()
}

async fn compute<F>(rpc: &'static str, f: F) -> Result<Ranges, Status>
where
    F: FnOnce() -> Result<Ranges, Error> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("{rpc} failed: {e}")))?
        .map_err(Status::from)
}

#[tonic::async_trait]
impl SnapshotMetadata for SnapshotMetadataService {
    type GetMetadataAllocatedStream = Stream<csi::GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Stream<csi::GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        req: Request<csi::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let r = req.into_inner();
        super::convert::required_str("snapshot_id", &r.snapshot_id)?;
        let (offset, page) = check_paging(r.starting_offset, r.max_results)?;
        let c = self.controller();
        let ranges = compute("GetMetadataAllocated", move || {
            c.allocated_ranges(&r.snapshot_id)?.from_offset(offset)
        })
        .await?;
        let out: Vec<Result<csi::GetMetadataAllocatedResponse, Status>> = pages(&ranges, page)
            .into_iter()
            .map(|(capacity, block_metadata)| {
                Ok(csi::GetMetadataAllocatedResponse {
                    block_metadata_type: csi::BlockMetadataType::VariableLength as i32,
                    volume_capacity_bytes: capacity,
                    block_metadata,
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(out))))
    }

    async fn get_metadata_delta(
        &self,
        req: Request<csi::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let r = req.into_inner();
        super::convert::required_str("base_snapshot_id", &r.base_snapshot_id)?;
        super::convert::required_str("target_snapshot_id", &r.target_snapshot_id)?;
        let (offset, page) = check_paging(r.starting_offset, r.max_results)?;
        let c = self.controller();
        let ranges = compute("GetMetadataDelta", move || {
            c.delta_ranges(&r.base_snapshot_id, &r.target_snapshot_id)?
                .from_offset(offset)
        })
        .await?;
        let out: Vec<Result<csi::GetMetadataDeltaResponse, Status>> = pages(&ranges, page)
            .into_iter()
            .map(|(capacity, block_metadata)| {
                Ok(csi::GetMetadataDeltaResponse {
                    block_metadata_type: csi::BlockMetadataType::VariableLength as i32,
                    volume_capacity_bytes: capacity,
                    block_metadata,
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(out))))
    }
}
