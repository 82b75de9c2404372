//! Errors of the filesystem core, each with its errno.
//!
//! One enum for the layer; `errno()` is exhaustive (no catch-all arm), so a new
//! variant does not compile until someone picks its errno.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument")]
    Invalid,
    #[error("file name too long")]
    NameTooLong,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("operation not supported by efscache or the backend")]
    NotSupported,
    #[error("too many links")]
    TooManyLinks,
    #[error("no space left in the cache")]
    NoSpace,
    #[error("stale handle")]
    BadHandle,
    #[error("no such extended attribute")]
    NoAttr,
    /// The backend keeps no extended attributes at all. ENOSYS makes the
    /// kernel answer EOPNOTSUPP itself from then on, without asking.
    #[error("the backend has no extended attributes")]
    NoXattrs,
    #[error("backend or staging I/O: {0}")]
    Io(#[from] io::Error),
    /// The backend did not answer within the request timeout (EIO, as on an
    /// NFS soft mount); the op may still take effect later.
    #[error("the backend did not answer in time")]
    TimedOut,
    /// Internal: the answer needs backend I/O, so the caller must retry on a
    /// thread that may block. Never reaches the kernel.
    #[error("would block on the backend")]
    WouldBlock,
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Invalid => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::NotPermitted => libc::EPERM,
            FsError::NotSupported => libc::EOPNOTSUPP,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::NoSpace => libc::ENOSPC,
            FsError::BadHandle => libc::EBADF,
            FsError::NoAttr => libc::ENODATA,
            FsError::NoXattrs => libc::ENOSYS,
            FsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            FsError::TimedOut => libc::EIO,
            FsError::WouldBlock => libc::EIO,
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;
