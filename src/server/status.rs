//! The one mapping from domain errors to gRPC status codes, following the
//! CSI specification's error tables. Exhaustive on purpose: a new error
//! variant must be given its code here.

use tonic::{Code, Status};

use crate::backend::BackendError;
use crate::os::resize::ResizeError;
use crate::volume::Error;

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::MissingField(_) | Error::InvalidField { .. } => Code::InvalidArgument,
            Error::VolumeNotFound(_)
            | Error::SnapshotNotFound(_)
            | Error::NodeNotFound(_)
            | Error::NotAVolumePath { .. } => Code::NotFound,
            Error::NameConflict { .. } | Error::Incompatible { .. } => Code::AlreadyExists,
            Error::Precondition { .. } => Code::FailedPrecondition,
            Error::CapacityOutOfRange(_) => Code::OutOfRange,
            Error::TopologyUnsatisfiable(_) | Error::AttachLimit { .. } | Error::NoSpace(_) => {
                Code::ResourceExhausted
            }
            Error::Busy(_) | Error::InvalidToken(_) => Code::Aborted,
            Error::Backend(b) => match b {
                BackendError::Missing { .. } => Code::NotFound,
                BackendError::Resize(r) => match r {
                    ResizeError::Shrink { .. } => Code::OutOfRange,
                    ResizeError::MissingCapability { .. } | ResizeError::Unsupported { .. } => {
                        Code::FailedPrecondition
                    }
                    ResizeError::Grow { .. }
                    | ResizeError::Open { .. }
                    | ResizeError::NotRegularFile { .. }
                    | ResizeError::SetLength { .. } => Code::Internal,
                },
                BackendError::SizeMismatch { .. }
                | BackendError::Io { .. }
                | BackendError::Pool { .. }
                | BackendError::Loop(_)
                | BackendError::Copy { .. }
                | BackendError::Btrfs(_)
                | BackendError::Quota(_) => Code::Internal,
            },
            Error::State(_)
            | Error::Mount(_)
            | Error::Loop(_)
            | Error::Command(_)
            | Error::MountTable(_)
            | Error::Io { .. } => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
