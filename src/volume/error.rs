//! The domain's typed error. `server::status` maps each variant to a gRPC
//! code in one exhaustive match that follows the CSI error table.

use std::path::PathBuf;

use crate::backend::BackendError;
use crate::os::command::CommandError;
use crate::os::filesystem::MkfsError;
use crate::os::loopdev::LoopError;
use crate::os::mount::MountError;
use crate::os::mountinfo::MountTableError;
use crate::state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is required")]
    MissingField(&'static str),
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("volume {0:?} does not exist")]
    VolumeNotFound(String),
    #[error("snapshot {0:?} does not exist")]
    SnapshotNotFound(String),
    #[error("node {0:?} is not known to this controller")]
    NodeNotFound(String),
    #[error("{path} is not a staging or target path of volume {volume}")]
    NotAVolumePath { volume: String, path: String },
    #[error("volume name {name:?} is taken by {existing} with different arguments: {reason}")]
    NameConflict {
        name: String,
        existing: String,
        reason: String,
    },
    #[error("volume {volume} is already {what} with different arguments: {reason}")]
    Incompatible {
        volume: String,
        what: &'static str,
        reason: String,
    },
    #[error("volume {volume}: {reason}")]
    Precondition { volume: String, reason: String },
    #[error("capacity: {0}")]
    CapacityOutOfRange(String),
    #[error("not enough space in the pool: {0}")]
    NoSpace(String),
    #[error("cannot provision on the requested topology: {0}")]
    TopologyUnsatisfiable(String),
    #[error("node {node} already has the maximum of {max} volumes published")]
    AttachLimit { node: String, max: u64 },
    #[error("an operation on {0} is already in progress")]
    Busy(String),
    /// Something the operation needs (another node) cannot be reached now;
    /// the CO retries.
    #[error("{0}")]
    Unavailable(String),
    #[error("starting_token {0:?} was not issued by this plugin")]
    InvalidToken(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error(transparent)]
    Loop(#[from] LoopError),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Mkfs(Box<MkfsError>),
    #[error(transparent)]
    MountTable(#[from] MountTableError),
    #[error("S3: {0}")]
    ObjectStore(crate::backend::object::s3::S3Error),
    #[error("{what} {path}: {err}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
}

impl From<MkfsError> for Error {
    fn from(e: MkfsError) -> Self {
        Error::Mkfs(Box::new(e))
    }
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidField {
            field,
            reason: reason.into(),
        }
    }

    pub fn precondition(volume: impl ToString, reason: impl Into<String>) -> Self {
        Error::Precondition {
            volume: volume.to_string(),
            reason: reason.into(),
        }
    }

    pub fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |err| Error::Io { what, path, err }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
