//! Conversions from protobuf messages to the domain's typed commands.
//! Every required field is checked here, before anything is looked up, so
//! a malformed request always gets INVALID_ARGUMENT.

use std::collections::{BTreeMap, HashMap};

use crate::csi;
use crate::volume::paths::checked_path;
use crate::volume::{AccessMode, AccessType, Capability, Error};

pub type Result<T> = std::result::Result<T, Error>;

pub fn required_str(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        Err(Error::MissingField(field))
    } else {
        Ok(())
    }
}

pub fn path(field: &'static str, value: &str) -> Result<std::path::PathBuf> {
    required_str(field, value)?;
    checked_path(value).map_err(|r| Error::invalid(field, r))
}

pub fn map(m: &HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn access_mode(
    field: &'static str,
    m: Option<&csi::volume_capability::AccessMode>,
) -> Result<AccessMode> {
    use csi::volume_capability::access_mode::Mode;
    let m = m.ok_or(Error::MissingField(field))?;
    Ok(match Mode::try_from(m.mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::MultiNodeReaderOnly) => AccessMode::MultiNodeReaderOnly,
        Ok(Mode::MultiNodeSingleWriter) => AccessMode::MultiNodeSingleWriter,
        Ok(Mode::MultiNodeMultiWriter) => AccessMode::MultiNodeMultiWriter,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Ok(Mode::Unknown) | Err(_) => {
            return Err(Error::invalid(
                field,
                format!("unknown access mode {}", m.mode),
            ));
        }
    })
}

/// Converts one capability; `field` names it in errors.
pub fn capability(field: &'static str, c: Option<&csi::VolumeCapability>) -> Result<Capability> {
    use csi::volume_capability::AccessType as Pb;
    let c = c.ok_or(Error::MissingField(field))?;
    let access_type = match &c.access_type {
        Some(Pb::Mount(m)) => {
            // volume_mount_group (VOLUME_MOUNT_GROUP) is read by the node
            // requests themselves: it is not part of the capability.
            if m.mount_flags.iter().any(|f| f.contains('\0')) {
                return Err(Error::invalid(field, "mount flag contains a NUL byte"));
            }
            AccessType::Mount {
                fs_type: (!m.fs_type.is_empty()).then(|| m.fs_type.clone()),
                mount_flags: m.mount_flags.clone(),
            }
        }
        Some(Pb::Block(_)) => AccessType::Block,
        None => {
            return Err(Error::invalid(
                field,
                "access_type (mount or block) is required",
            ));
        }
    };
    Ok(Capability {
        access_type,
        access_mode: access_mode(field, c.access_mode.as_ref())?,
    })
}

/// Converts a non-empty list of capabilities.
pub fn capabilities(field: &'static str, cs: &[csi::VolumeCapability]) -> Result<Vec<Capability>> {
    if cs.is_empty() {
        return Err(Error::MissingField(field));
    }
    cs.iter().map(|c| capability(field, Some(c))).collect()
}

/// Back to protobuf, for responses.
pub fn to_pb_capability(c: &Capability) -> csi::VolumeCapability {
    use csi::volume_capability::access_mode::Mode;
    use csi::volume_capability::{AccessType as Pb, BlockVolume, MountVolume};
    let mode = match c.access_mode {
        AccessMode::SingleNodeWriter => Mode::SingleNodeWriter,
        AccessMode::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
        AccessMode::MultiNodeReaderOnly => Mode::MultiNodeReaderOnly,
        AccessMode::MultiNodeSingleWriter => Mode::MultiNodeSingleWriter,
        AccessMode::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
        AccessMode::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
        AccessMode::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
    };
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(match &c.access_type {
            AccessType::Mount {
                fs_type,
                mount_flags,
            } => Pb::Mount(MountVolume {
                fs_type: fs_type.clone().unwrap_or_default(),
                mount_flags: mount_flags.clone(),
                volume_mount_group: String::new(),
            }),
            AccessType::Block => Pb::Block(BlockVolume {}),
        }),
    }
}

/// Capacity range: zero means "unset" in protobuf.
pub fn capacity(r: Option<&csi::CapacityRange>) -> Result<(Option<u64>, Option<u64>)> {
    let Some(r) = r else {
        return Ok((None, None));
    };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(Error::CapacityOutOfRange(
            "capacity_range must not be negative".into(),
        ));
    }
    let nz = |v: i64| (v > 0).then_some(v as u64);
    Ok((nz(r.required_bytes), nz(r.limit_bytes)))
}

/// Topology segments as maps.
pub fn topologies(ts: &[csi::Topology]) -> Vec<BTreeMap<String, String>> {
    ts.iter().map(|t| map(&t.segments)).collect()
}

/// Strips `secrets` from a request before it is logged.
pub trait Redact: Clone {
    fn redacted(&self) -> Self;
}

macro_rules! redact_secrets {
    ($($t:ty),* $(,)?) => {$(
        impl Redact for $t {
            fn redacted(&self) -> Self {
                let mut r = self.clone();
                if !r.secrets.is_empty() {
                    r.secrets = [("<redacted>".to_owned(), String::new())].into_iter().collect();
                }
                r
            }
        }
    )*};
}

macro_rules! nothing_secret {
    ($($t:ty),* $(,)?) => {$(
        impl Redact for $t {
            fn redacted(&self) -> Self {
                self.clone()
            }
        }
    )*};
}

redact_secrets!(
    csi::CreateVolumeRequest,
    csi::DeleteVolumeRequest,
    csi::ControllerPublishVolumeRequest,
    csi::ControllerUnpublishVolumeRequest,
    csi::ValidateVolumeCapabilitiesRequest,
    csi::ControllerModifyVolumeRequest,
    csi::CreateSnapshotRequest,
    csi::DeleteSnapshotRequest,
    csi::ListSnapshotsRequest,
    csi::GetSnapshotRequest,
    csi::ControllerExpandVolumeRequest,
    csi::NodeStageVolumeRequest,
    csi::NodePublishVolumeRequest,
    csi::NodeExpandVolumeRequest,
    csi::CreateVolumeGroupSnapshotRequest,
    csi::DeleteVolumeGroupSnapshotRequest,
    csi::GetVolumeGroupSnapshotRequest,
);

nothing_secret!(
    csi::ListVolumesRequest,
    csi::ControllerGetVolumeRequest,
    csi::GetCapacityRequest,
    csi::ControllerGetCapabilitiesRequest,
    csi::NodeUnstageVolumeRequest,
    csi::NodeUnpublishVolumeRequest,
    csi::NodeGetVolumeStatsRequest,
    csi::NodeGetCapabilitiesRequest,
    csi::NodeGetInfoRequest,
    csi::GetPluginInfoRequest,
    csi::GetPluginCapabilitiesRequest,
    csi::ProbeRequest,
);

/// The canonical upper-case name of a gRPC code, as the CSI spec writes it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
