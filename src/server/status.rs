//! The one mapping from domain errors to gRPC status codes, following the
//! CSI specification's error tables. Exhaustive on purpose: a new error
//! variant must be given its code here. Where a system call failed, its
//! errno decides, never the message text: ENOSPC or EDQUOT anywhere is
//! RESOURCE_EXHAUSTED (the pool or a filesystem is full; the CO retries
//! once space is freed), EBUSY from an unmount is ABORTED (something still
//! uses the mount, e.g. a snapshot copy; the CO retries later).

use nix::errno::Errno;
use tonic::{Code, Status};

use crate::backend::{BackendError, is_no_space, loop_errno};
use crate::os::cow::CowError;
use crate::os::filesystem::MkfsError;
use crate::os::mount::MountError;
use crate::os::mountinfo::MountTableError;
use crate::os::resize::ResizeError;
use crate::state::StateError;
use crate::volume::Error;

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = code(&e);
        let message = if code == Code::Aborted && matches!(e, Error::Mount(_)) {
            format!("{e} (still in use; retry later)")
        } else {
            e.to_string()
        };
        Status::new(code, message)
    }
}

/// The gRPC code for a domain error.
pub fn code(e: &Error) -> Code {
    match e {
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
        Error::Unavailable(_) => Code::Unavailable,
        Error::Backend(b) => backend_code(b),
        Error::Mkfs(m) => match **m {
            MkfsError::PoolFull { .. } => Code::ResourceExhausted,
            MkfsError::Failed { .. } => Code::Internal,
        },
        Error::Mount(m) => match m {
            MountError::Unmount {
                errno: Errno::EBUSY,
                ..
            } => Code::Aborted,
            MountError::Unmount { errno, .. }
            | MountError::Bind { errno, .. }
            | MountError::RemountReadOnly { errno, .. }
            | MountError::Remount { errno, .. }
            | MountError::Filesystem { errno, .. } => internal_unless_no_space(Some(*errno)),
            MountError::BadOption(_) => Code::Internal,
        },
        Error::State(s) => internal_unless_no_space(state_errno(s)),
        Error::Loop(l) => internal_unless_no_space(loop_errno(l)),
        Error::MountTable(t) => match t {
            MountTableError::Read(err) => {
                internal_unless_no_space(err.raw_os_error().map(Errno::from_raw))
            }
            MountTableError::Parse(_) => Code::Internal,
        },
        Error::Io { err, .. } => internal_unless_no_space(err.raw_os_error().map(Errno::from_raw)),
        Error::Command(_) => Code::Internal,
        Error::ObjectStore(s) => {
            use crate::backend::object::s3::S3ErrorKind as K;
            match s.kind {
                K::PermissionDenied => Code::PermissionDenied,
                K::Unavailable => Code::Unavailable,
                K::AlreadyExists => Code::AlreadyExists,
                K::NotFound | K::NotEmpty => Code::FailedPrecondition,
                K::InvalidArgument => Code::InvalidArgument,
                K::Cancelled => Code::Aborted,
                K::Other => Code::Internal,
            }
        }
    }
}

fn backend_code(b: &BackendError) -> Code {
    match b {
        BackendError::Missing { .. } => Code::NotFound,
        BackendError::TooLarge { .. } => Code::OutOfRange,
        BackendError::Resize(r) => match r {
            ResizeError::Shrink { .. } | ResizeError::TooLarge { .. } => Code::OutOfRange,
            ResizeError::PoolFull { .. } => Code::ResourceExhausted,
            ResizeError::MissingCapability { .. } | ResizeError::Unsupported { .. } => {
                Code::FailedPrecondition
            }
            ResizeError::Grow { .. }
            | ResizeError::Open { .. }
            | ResizeError::NotRegularFile { .. }
            | ResizeError::SetLength { .. } => internal_unless_no_space(b.errno()),
        },
        // The source changed under a copy that cannot take it as it is
        // (a block image, or a tree entry changing past every retry):
        // nothing is wrong with the volume, and a new attempt may succeed.
        BackendError::Copy {
            err: CowError::Changed { .. } | CowError::SourceShrank { .. },
            ..
        } => Code::Aborted,
        BackendError::SizeMismatch { .. }
        | BackendError::Io { .. }
        | BackendError::Pool { .. }
        | BackendError::Loop(_)
        | BackendError::Copy { .. }
        | BackendError::Btrfs(_)
        | BackendError::Quota(_) => internal_unless_no_space(b.errno()),
    }
}

/// RESOURCE_EXHAUSTED for ENOSPC/EDQUOT, INTERNAL otherwise.
fn internal_unless_no_space(errno: Option<Errno>) -> Code {
    if is_no_space(errno) {
        Code::ResourceExhausted
    } else {
        Code::Internal
    }
}

fn state_errno(s: &StateError) -> Option<Errno> {
    match s {
        StateError::Dir { err, .. }
        | StateError::Write { err, .. }
        | StateError::Read { err, .. } => err.raw_os_error().map(Errno::from_raw),
        StateError::Decode { .. } | StateError::Locked(_) | StateError::BadKey(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::os::command::CommandError;
    use crate::os::resize::FileSizeLimit;
    use crate::volume::{BackendKind, Uuid};

    fn io(errno: Errno) -> std::io::Error {
        std::io::Error::from_raw_os_error(errno as i32)
    }

    fn copy(err: CowError) -> Error {
        Error::Backend(BackendError::Copy {
            backend: BackendKind::Block,
            what: "copy a to b".into(),
            err,
        })
    }

    fn copy_range(errno: Errno) -> Error {
        copy(CowError::CopyRange {
            src: PathBuf::from("/pool/a.img"),
            dst: PathBuf::from("/pool/b.img"),
            offset: 0,
            errno,
        })
    }

    fn write(errno: Errno) -> Error {
        copy(CowError::Write {
            path: PathBuf::from("/pool/b.img"),
            offset: 4096,
            err: io(errno),
        })
    }

    #[test]
    fn a_copy_whose_source_changed_under_it_is_aborted_to_be_retried() {
        let path = PathBuf::from("/pool/volumes/dir/x/slot-3");
        assert_eq!(
            code(&copy(CowError::SourceShrank {
                path: path.clone(),
                offset: 196_608
            })),
            Code::Aborted
        );
        assert_eq!(code(&copy(CowError::Changed { path })), Code::Aborted);
    }

    #[test]
    fn a_copy_that_ran_out_of_space_is_resource_exhausted() {
        for errno in [Errno::ENOSPC, Errno::EDQUOT] {
            assert_eq!(code(&copy_range(errno)), Code::ResourceExhausted);
            assert_eq!(code(&write(errno)), Code::ResourceExhausted);
        }
        assert_eq!(code(&copy_range(Errno::EIO)), Code::Internal);
        assert_eq!(code(&write(Errno::EIO)), Code::Internal);
        let dir = Error::Backend(BackendError::Io {
            backend: BackendKind::Dir,
            uuid: Uuid::new_random(),
            what: "create",
            path: PathBuf::from("/pool/v"),
            err: io(Errno::ENOSPC),
        });
        assert_eq!(code(&dir), Code::ResourceExhausted);
    }

    #[test]
    fn mkfs_on_a_full_pool_is_resource_exhausted() {
        let source = || {
            Box::new(CommandError::Spawn {
                program: "mkfs.xfs".into(),
                err: io(Errno::EIO),
            })
        };
        let full = Error::from(MkfsError::PoolFull {
            fs_type: "xfs".into(),
            device: PathBuf::from("/dev/loop0"),
            image: PathBuf::from("/pool/v.img"),
            full: PathBuf::from("/pool"),
            probe_bytes: 1 << 20,
            source: source(),
        });
        assert_eq!(code(&full), Code::ResourceExhausted);
        let failed = Error::from(MkfsError::Failed {
            fs_type: "xfs".into(),
            device: PathBuf::from("/dev/loop0"),
            source: source(),
        });
        assert_eq!(code(&failed), Code::Internal);
    }

    #[test]
    fn a_file_beyond_the_pools_limit_is_out_of_range() {
        let e = Error::Backend(BackendError::TooLarge {
            backend: BackendKind::Block,
            uuid: Uuid::new_random(),
            path: PathBuf::from("/pool/v.img"),
            requested: 100 << 40,
            limit: FileSizeLimit {
                fs: "ext4".into(),
                max_len: Some((16 << 40) - 4096),
            },
        });
        assert_eq!(code(&e), Code::OutOfRange);
        assert!(
            e.to_string()
                .contains("ext4 filesystem allows files of at most")
        );
    }

    #[test]
    fn a_busy_unmount_is_aborted() {
        let unmount = |errno| {
            Error::Mount(MountError::Unmount {
                target: PathBuf::from("/staging/v"),
                errno,
            })
        };
        let s = Status::from(unmount(Errno::EBUSY));
        assert_eq!(s.code(), Code::Aborted);
        assert!(s.message().contains("retry later"), "{s:?}");
        assert_eq!(code(&unmount(Errno::EPERM)), Code::Internal);
    }

    #[test]
    fn a_full_state_directory_is_resource_exhausted() {
        let e = Error::State(StateError::Write {
            path: PathBuf::from("/state/volumes.log"),
            err: io(Errno::ENOSPC),
        });
        assert_eq!(code(&e), Code::ResourceExhausted);
    }
}
