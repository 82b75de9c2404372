//! The staging area: local files holding data the backend has not seen yet.
//!
//! Files are keyed by a stable numeric id (never by path, so renames in the
//! overlay never touch staging) and live in `<cache_dir>/staging/`, created
//! 0600 in a 0700 directory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// Opens (creating if needed) the staging directory under `cache_dir`.
    pub fn open(cache_dir: &Path) -> io::Result<Staging> {
        let dir = cache_dir.join("staging");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        Ok(Staging { dir })
    }

    pub fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}"))
    }

    /// Creates an empty staging file (replacing any leftover with the same id).
    pub fn create(&self, id: u64) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(self.path(id))
    }

    /// Opens an existing staging file for reading and writing.
    pub fn open_rw(&self, id: u64) -> io::Result<File> {
        OpenOptions::new().read(true).write(true).open(self.path(id))
    }

    pub fn open_read(&self, id: u64) -> io::Result<File> {
        File::open(self.path(id))
    }

    /// Whether some process has the staging file open for writing: a writer
    /// of a dead mount, still writing through passthrough. The kernel refuses
    /// a read lease exactly then.
    pub fn open_for_write_elsewhere(&self, id: u64) -> bool {
        use std::os::fd::AsRawFd;
        let Ok(f) = self.open_read(id) else { return false };
        // SAFETY: fcntl on an fd we own; F_SETLEASE takes an int argument.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
        if r == 0 {
            // SAFETY: as above.
            unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
            return false;
        }
        io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
    }

    /// Ids of the staging files present, in no particular order.
    pub fn ids(&self) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir)? {
            out.extend(Self::id_of(&e?.file_name()));
        }
        Ok(out)
    }

    /// The id a staging file name stands for (None: not a staging file).
    pub fn id_of(name: &std::ffi::OsStr) -> Option<u64> {
        name.to_str().and_then(|n| u64::from_str_radix(n, 16).ok())
    }

    pub fn remove(&self, id: u64) {
        if let Err(e) = std::fs::remove_file(self.path(id))
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(id, error = %e, "cannot remove staging file");
        }
    }
}
