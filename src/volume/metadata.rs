//! Changed-block metadata for block volume snapshots: the allocated ranges
//! of one snapshot, and the ranges that differ between two snapshots of
//! the same volume. On pools that share extents the delta comes from
//! extent maps (FIEMAP: O(changed extents)); elsewhere from comparing
//! content (O(data)).

use super::controller::Controller;
use super::error::{Error, Result};
use super::id::BackendKind;
use super::record::SnapshotRecord;
use crate::backend::BackendError;
use crate::os::cow;
use crate::os::pool::Strategy;

/// Granularity of content comparison (the filesystems' block size).
pub const BLOCK: u64 = 4096;

/// Ranges `(offset, length)` over a snapshot of `capacity` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranges {
    pub capacity: u64,
    pub ranges: Vec<(u64, u64)>,
}

impl Ranges {
    /// The ranges at or after `offset` (the first one clipped to start
    /// there). OUT_OF_RANGE past the end of the snapshot.
    pub fn from_offset(mut self, offset: u64) -> Result<Self> {
        if offset > self.capacity {
            return Err(Error::CapacityOutOfRange(format!(
                "starting_offset {offset} is past the snapshot's {} bytes",
                self.capacity
            )));
        }
        self.ranges = self
            .ranges
            .into_iter()
            .filter(|(o, l)| o + l > offset)
            .map(|(o, l)| {
                if o < offset {
                    (offset, l - (offset - o))
                } else {
                    (o, l)
                }
            })
            .collect();
        Ok(self)
    }
}

fn cow_err(what: &str, err: cow::CowError) -> Error {
    Error::Backend(BackendError::Copy {
        backend: BackendKind::Block,
        what: what.to_owned(),
        err,
    })
}

impl Controller {
    fn block_snapshot(&self, raw: &str) -> Result<SnapshotRecord> {
        let s = self.get_snapshot(raw)?;
        if !s.id.backend.profile().block_metadata() || !s.ready {
            return Err(Error::invalid(
                "snapshot_id",
                format!("{raw} is not a ready snapshot of a block volume"),
            ));
        }
        Ok(s)
    }

    /// GetMetadataAllocated: the ranges of the snapshot that hold data.
    pub fn allocated_ranges(&self, raw: &str) -> Result<Ranges> {
        let s = self.block_snapshot(raw)?;
        let path = self.backends.block.snapshot_image(s.id.uuid);
        let ranges = cow::allocated_ranges(&path).map_err(|e| cow_err("allocated ranges of", e))?;
        Ok(Ranges {
            capacity: s.size_bytes,
            ranges: ranges
                .into_iter()
                .filter(|(o, _)| *o < s.size_bytes)
                .map(|(o, l)| (o, l.min(s.size_bytes - o)))
                .collect(),
        })
    }

    /// GetMetadataDelta: the ranges where `target` differs from `base`
    /// (two snapshots of the same volume).
    pub fn delta_ranges(&self, base_raw: &str, target_raw: &str) -> Result<Ranges> {
        let base = self.block_snapshot(base_raw)?;
        let target = self.block_snapshot(target_raw)?;
        if base.source_volume_id != target.source_volume_id {
            return Err(Error::invalid(
                "base_snapshot_id",
                "base and target are snapshots of different volumes",
            ));
        }
        let a = self.backends.block.snapshot_image(base.id.uuid);
        let b = self.backends.block.snapshot_image(target.id.uuid);
        let ranges = if self.backends.strategy == Strategy::Copy {
            cow::differing_ranges(&a, &b, BLOCK).map_err(|e| cow_err("compare", e))?
        } else {
            let ea = cow::fiemap(&a).map_err(|e| cow_err("map extents of", e))?;
            let eb = cow::fiemap(&b).map_err(|e| cow_err("map extents of", e))?;
            cow::changed_ranges(&ea, &eb)
        };
        let capacity = target.size_bytes;
        Ok(Ranges {
            capacity,
            ranges: ranges
                .into_iter()
                .filter(|(o, _)| *o < capacity)
                .map(|(o, l)| (o, l.min(capacity - o)))
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_offset_clips_and_skips() {
        let r = Ranges {
            capacity: 100,
            ranges: vec![(0, 10), (20, 10), (50, 50)],
        };
        assert_eq!(
            r.clone().from_offset(25).unwrap().ranges,
            vec![(25, 5), (50, 50)]
        );
        assert_eq!(r.clone().from_offset(0).unwrap().ranges, r.ranges);
        assert!(r.clone().from_offset(100).unwrap().ranges.is_empty());
        assert!(r.from_offset(101).is_err());
    }
}
