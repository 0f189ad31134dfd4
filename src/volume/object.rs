//! The controller's side of volumes whose storage is remote (the object
//! backend): no pool storage, no topology; the S3 service is reached with
//! the request's credentials, which are never recorded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::controller::{CAPACITY_ENFORCED_KEY, Controller, CreateVolume, choose_size};
use super::error::{Error, Result};
use super::id::{SnapshotId, Uuid, VolumeId};
use super::params::Parameters;
use super::record::{ContentSource, SnapshotRecord, VolumeRecord};
use crate::backend::object::s3::{S3Error, S3ErrorKind};
use crate::backend::object::{self, Location, ObjectParams, OnDelete, credentials_from_secrets};
use crate::state::Table;

/// Says in volume_context that the capacity is only recorded.
pub const CAPACITY_NOTE_KEY: &str = "stowage.csi.dev/capacity-note";

impl From<S3Error> for Error {
    fn from(e: S3Error) -> Self {
        Error::ObjectStore(e)
    }
}

pub(super) fn location_of(rec: &VolumeRecord) -> Result<Location> {
    Location::from_context(&rec.volume_context)
        .map(|(l, _)| l)
        .map_err(|r| Error::precondition(&rec.id, format!("its record names no location: {r}")))
}

impl Controller {
    /// CreateVolume of an object volume: idempotent by name (a repeat
    /// makes sure the bucket exists, so a create cut short is completed).
    pub(super) fn create_object_volume(&self, req: CreateVolume) -> Result<VolumeRecord> {
        let params =
            Parameters::parse(&req.parameters).map_err(|r| Error::invalid("parameters", r))?;
        let backend = params.backend;
        let op =
            ObjectParams::parse(&req.parameters).map_err(|r| Error::invalid("parameters", r))?;
        let creds = credentials_from_secrets(&req.secrets, "provisioner")
            .map_err(|r| Error::invalid("secrets", r))?;
        for c in &req.capabilities {
            c.supported_by(backend)
                .map_err(|r| Error::invalid("volume_capabilities", r))?;
        }
        let mutable = super::params::MutableParameters::parse(&req.mutable_parameters, backend)
            .map_err(|r| Error::invalid("mutable_parameters", r))?;
        let _g = self.guard(format!("name:{}", req.name))?;
        if let Some(rec) = self.record_by_name(&req.name) {
            self.check_compatible(&rec, &req, backend, None)?;
            object::remote::create(&location_of(&rec)?, &creds)?;
            return Ok(rec);
        }
        let size = choose_size(req.required_bytes, req.limit_bytes, 0, 0, |s| s)
            .map_err(Error::CapacityOutOfRange)?;
        let id = VolumeId {
            backend,
            node: self.node_id().to_owned(),
            uuid: Uuid::new_random(),
        };
        let loc = op.location(id.uuid);
        // Where the content comes from (the same S3 service).
        let source = match &req.content_source {
            None => None,
            Some(ContentSource::Snapshot(raw)) => {
                let s = self.restore_source(raw)?;
                let from = s.location.clone().ok_or_else(|| {
                    Error::invalid(
                        "volume_content_source",
                        format!("snapshot {} is not of an object volume", s.id),
                    )
                })?;
                Some((from, s.size_bytes))
            }
            Some(ContentSource::Volume(raw)) => {
                let v = self.lookup(raw)?;
                if v.id.backend != backend {
                    return Err(Error::invalid(
                        "volume_content_source",
                        format!(
                            "volume {} is a {} volume, not an object volume",
                            v.id, v.id.backend
                        ),
                    ));
                }
                Some((location_of(&v)?, v.capacity_bytes))
            }
        };
        if let Some((from, _)) = &source
            && from.endpoint != loc.endpoint
        {
            return Err(Error::invalid(
                "volume_content_source",
                format!(
                    "the source lives at {}, the new volume at {}: copies stay on one S3 service",
                    from.endpoint, loc.endpoint
                ),
            ));
        }
        let size = source.as_ref().map_or(size, |(_, s)| size.max(*s));
        let mut volume_context = loc.to_context(op.mounter);
        volume_context.insert("stowage.csi.dev/backend".into(), backend.as_str().into());
        volume_context.insert(CAPACITY_ENFORCED_KEY.into(), "false".into());
        if let Some(retain) = mutable.retain {
            volume_context.insert(object::CTX_ON_DELETE.into(), on_delete_str(retain).into());
        }
        volume_context.insert(
            CAPACITY_NOTE_KEY.into(),
            "capacity is recorded and reported, not enforced: the S3 service holds what is written"
                .into(),
        );
        let rec = VolumeRecord {
            id: id.clone(),
            name: req.name.clone(),
            capacity_bytes: size,
            fs_type: None,
            capabilities: req.capabilities.clone(),
            parameters: Parameters::defining(&req.parameters),
            volume_context,
            created_at: super::controller::now_secs(),
            attachments: BTreeMap::new(),
            content_source: req.content_source.clone(),
            thick: false,
        };
        // Record first: a crash after it leaves a record whose repeated
        // CreateVolume makes the bucket; never a bucket no record names.
        self.store.put(Table::Volumes, &id.uuid.to_hex(), &rec)?;
        let made = object::remote::create(&loc, &creds)
            .map_err(Error::from)
            .and_then(|()| match &source {
                None => Ok(()),
                Some((from, _)) => {
                    object::remote::copy(from, &loc, &creds, Arc::new(AtomicBool::new(false)), None)
                        .map(drop)
                        .map_err(Error::from)
                }
            });
        if let Err(e) = made {
            if e_is_not_ours(&e) {
                let _ = self.store.delete(Table::Volumes, &id.uuid.to_hex());
            } else {
                let _ = object::remote::delete(&loc, &creds);
                let _ = self.store.delete(Table::Volumes, &id.uuid.to_hex());
            }
            return Err(e);
        }
        self.index_insert(rec.clone());
        tracing::info!(volume = %id, name = %req.name, bucket = %loc.bucket, prefix = %loc.prefix, "object volume created");
        Ok(rec)
    }

    /// DeleteVolume of an object volume: empties and removes its bucket or
    /// prefix (or keeps them, onDelete=retain), then forgets it.
    pub(super) fn delete_object_volume(
        &self,
        rec: &VolumeRecord,
        secrets: &BTreeMap<String, String>,
    ) -> Result<()> {
        let op =
            ObjectParams::parse(&rec.parameters).map_err(|r| Error::precondition(&rec.id, r))?;
        let on_delete = match rec
            .volume_context
            .get(object::CTX_ON_DELETE)
            .map(String::as_str)
        {
            Some("retain") => OnDelete::Retain,
            Some(_) => OnDelete::Delete,
            None => op.on_delete,
        };
        if on_delete == OnDelete::Delete {
            let creds = credentials_from_secrets(secrets, "provisioner")
                .map_err(|r| Error::invalid("secrets", r))?;
            object::remote::delete(&location_of(rec)?, &creds)?;
        }
        self.store.delete(Table::Volumes, &rec.id.uuid.to_hex())?;
        self.index_remove(rec.id.uuid);
        tracing::info!(volume = %rec.id, retained = (on_delete == OnDelete::Retain), "object volume deleted");
        Ok(())
    }

    /// Starts (or restarts, after a plugin restart or a failure) the
    /// server-side copy of an object snapshot in the background; the
    /// snapshot turns ready when it finishes.
    pub(super) fn start_object_copy(
        self: &Arc<Self>,
        rec: SnapshotRecord,
        from: Location,
        creds: crate::backend::object::Credentials,
        vol_guard: super::inflight::InFlightGuard,
    ) -> Result<()> {
        let to = rec
            .location
            .clone()
            .ok_or_else(|| Error::precondition(&rec.id, "object snapshot without a location"))?;
        let job = Arc::new(super::snapshot::CopyJob::default());
        if !self.snapshot_copy_begin(&rec, Arc::clone(&job)) {
            // One is running already.
            return Ok(());
        }
        let this = Arc::clone(self);
        let cancel = job.cancel_flag();
        let id = rec.id.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("object-snapshot-{}", rec.id.uuid))
            .spawn(move || {
                let _vol_guard = vol_guard;
                let r = object::remote::copy(&from, &to, &creds, Arc::clone(&cancel), None);
                let cancelled = cancel.load(Ordering::Relaxed);
                if cancelled || r.is_err() {
                    // Nothing of a cancelled or failed copy stays.
                    if let Err(e) = object::remote::delete(&to, &creds) {
                        tracing::error!(snapshot = %rec.id, error = %e, "cannot remove the objects of an unfinished snapshot copy");
                    }
                }
                this.finish_copy(rec, r.map(drop).map_err(Error::from), &job);
                job.finish_pub();
            });
        if let Err(e) = spawned {
            self.snapshot_copy_abandon(&id);
            return Err(Error::io("spawn copy thread for", format!("snapshot {id}"))(e));
        }
        Ok(())
    }

    /// DeleteSnapshot's S3 step for an object snapshot (after its copy, if
    /// any, was cancelled).
    pub(super) fn delete_object_snapshot(
        &self,
        rec: &SnapshotRecord,
        secrets: &BTreeMap<String, String>,
    ) -> Result<()> {
        let Some(loc) = &rec.location else {
            return Ok(());
        };
        let creds = credentials_from_secrets(secrets, "provisioner")
            .map_err(|r| Error::invalid("secrets", r))?;
        object::remote::delete(loc, &creds)?;
        Ok(())
    }

    /// The record and location a new object snapshot of `vol` gets: a new
    /// UUID, or `reuse` (a failed copy's, made anew).
    pub(super) fn object_snapshot_record(
        &self,
        vol: &VolumeRecord,
        name: &str,
        reuse: Option<Uuid>,
    ) -> Result<(SnapshotRecord, Location)> {
        let from = location_of(vol)?;
        let uuid = reuse.unwrap_or_else(Uuid::new_random);
        let rec = SnapshotRecord {
            id: SnapshotId {
                backend: vol.id.backend,
                node: vol.id.node.clone(),
                uuid,
            },
            name: name.to_owned(),
            source_volume_id: vol.id.to_string(),
            size_bytes: vol.capacity_bytes,
            fs_type: None,
            created_at: super::snapshot::now(),
            ready: false,
            group: None,
            location: Some(from.snapshot(uuid)),
            failed: None,
        };
        Ok((rec, from))
    }
}

fn on_delete_str(retain: bool) -> &'static str {
    if retain { "retain" } else { "delete" }
}

impl Controller {
    /// ModifyVolume of an object volume: `onDelete`.
    pub(super) fn modify_object_volume(
        &self,
        mut rec: VolumeRecord,
        mutable: &super::params::MutableParameters,
    ) -> Result<()> {
        let Some(retain) = mutable.retain else {
            return Ok(());
        };
        rec.volume_context
            .insert(object::CTX_ON_DELETE.into(), on_delete_str(retain).into());
        self.store
            .put(Table::Volumes, &rec.id.uuid.to_hex(), &rec)?;
        tracing::info!(volume = %rec.id, retain, "object volume modified");
        self.index_insert(rec);
        Ok(())
    }
}

/// An error after which the location must not be removed: it was never
/// ours (someone else's bucket) or could not be reached.
fn e_is_not_ours(e: &Error) -> bool {
    matches!(
        e,
        Error::ObjectStore(S3Error {
            kind: S3ErrorKind::AlreadyExists
                | S3ErrorKind::PermissionDenied
                | S3ErrorKind::Unavailable
                | S3ErrorKind::NotFound
                | S3ErrorKind::InvalidArgument,
            ..
        })
    )
}
