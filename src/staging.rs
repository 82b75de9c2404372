//! The staging area: local files holding data the backend has not seen yet.
//!
//! Files are keyed by a stable numeric id (never by path, so renames in the
//! overlay never touch staging) and live in `<cache_dir>/staging/`, created
//! 0600 in a 0700 directory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;

#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    space: Space,
}

/// What staging holds, as far as the daemon has seen: bytes per staging file
/// (data written through passthrough counts from the writer's close), and a
/// recent reading of the cache disk's free space.
#[derive(Debug, Default)]
struct Space {
    sizes: Mutex<HashMap<u64, u64>>,
    used: AtomicU64,
    /// The most `used` has been.
    peak: AtomicU64,
    /// (when read, bytes available, bytes the disk keeps free for others)
    disk: Mutex<Option<(Instant, u64, u64)>>,
    /// Signalled whenever a staging file is removed.
    freed: Condvar,
    freed_lock: Mutex<()>,
}

/// How stale the free-space reading may be.
const DISK_READING_TTL: Duration = Duration::from_millis(100);
/// Mode bit that marks a staging file as a clean copy of published content:
/// the sticky bit, which means nothing on a regular file. Setting it keeps
/// the permission bits as they are, so an access ACL stored on the file
/// (which the kernel ties to those bits) stays untouched.
const CLEAN_MARK: u32 = libc::S_ISVTX;

impl Staging {
    /// Opens (creating if needed) the staging directory under `cache_dir`.
    pub fn open(cache_dir: &Path) -> io::Result<Staging> {
        let dir = cache_dir.join("staging");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        Ok(Staging {
            dir,
            space: Space::default(),
        })
    }

    /// Records the size of every staging file present (at start, after
    /// recovery has moved leftovers away).
    pub fn rescan(&self) -> io::Result<()> {
        for id in self.ids()? {
            if let Ok(md) = std::fs::metadata(self.path(id)) {
                self.set_size(id, md.len());
            }
        }
        Ok(())
    }

    /// Records that staging file `id` now holds `bytes`.
    pub fn set_size(&self, id: u64, bytes: u64) {
        let old = self.space.sizes.lock().insert(id, bytes).unwrap_or(0);
        if bytes >= old {
            let now = self.space.used.fetch_add(bytes - old, Ordering::Relaxed) + bytes - old;
            self.space.peak.fetch_max(now, Ordering::Relaxed);
        } else {
            self.space.used.fetch_sub(old - bytes, Ordering::Relaxed);
        }
    }

    /// Records a write that ends at `end` in staging file `id`.
    pub fn grown_to(&self, id: u64, end: u64) {
        let mut sizes = self.space.sizes.lock();
        let s = sizes.entry(id).or_default();
        if end > *s {
            let now = self.space.used.fetch_add(end - *s, Ordering::Relaxed) + end - *s;
            self.space.peak.fetch_max(now, Ordering::Relaxed);
            *s = end;
        }
    }

    /// Bytes held in staging files.
    pub fn used(&self) -> u64 {
        self.space.used.load(Ordering::Relaxed)
    }

    /// The most staging has held since start.
    pub fn peak_used(&self) -> u64 {
        self.space.peak.load(Ordering::Relaxed)
    }

    /// Whether the cache disk is nearly full: less free than 5% of its size
    /// (at most 1 GiB), which efscache leaves to everyone else.
    pub fn disk_low(&self) -> bool {
        let (avail, keep) = self.disk_reading();
        avail < keep
    }

    /// Bytes available on the cache disk.
    pub fn disk_available(&self) -> u64 {
        self.disk_reading().0
    }

    fn disk_reading(&self) -> (u64, u64) {
        let mut d = self.space.disk.lock();
        if let Some((at, avail, keep)) = *d
            && at.elapsed() < DISK_READING_TTL
        {
            return (avail, keep);
        }
        let (avail, keep) = match statvfs(&self.dir) {
            Ok(v) => {
                let frag = v.f_frsize;
                let size = v.f_blocks * frag;
                (v.f_bavail * frag, (size / 20).min(1 << 30))
            }
            Err(_) => (u64::MAX, 0),
        };
        *d = Some((Instant::now(), avail, keep));
        (avail, keep)
    }

    /// Waits until a staging file is removed, or `timeout`.
    pub fn wait_freed(&self, timeout: Duration) {
        let mut g = self.space.freed_lock.lock();
        self.space.freed.wait_for(&mut g, timeout);
    }

    pub fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}"))
    }

    /// Creates an empty staging file (replacing any leftover with the same id).
    pub fn create(&self, id: u64) -> io::Result<File> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(self.path(id))?;
        self.set_size(id, 0);
        Ok(f)
    }

    /// Marks a staging file as a clean copy of published content or
    /// unmarks it. Recovery deletes a marked leftover instead of keeping it
    /// aside: the backend has the same data.
    pub fn mark_clean(&self, id: u64, clean: bool) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.path(id);
        let marked = std::fs::metadata(&path).and_then(|m| {
            let mode = m.permissions().mode() & 0o7777;
            let want = if clean { mode | CLEAN_MARK } else { mode & !CLEAN_MARK };
            if want == mode {
                return Ok(());
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(want))
        });
        if let Err(e) = marked {
            tracing::warn!(id, error = %e, "cannot mark or unmark a staging file as a clean copy");
        }
    }

    /// Whether a staging file carries the clean-copy mark.
    pub fn is_marked_clean(meta: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & CLEAN_MARK != 0
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

    /// Moves staging file `id` to `<cache_dir>/lost+found/<why>/`, named
    /// after the time, the id and `label` (a path, made a file name); returns
    /// where it went.
    pub fn keep_aside(&self, id: u64, why: &str, label: &str) -> io::Result<PathBuf> {
        let to = self.aside_path(id, why, label)?;
        std::fs::rename(self.path(id), &to)?;
        if let Some(old) = self.space.sizes.lock().remove(&id) {
            self.space.used.fetch_sub(old, Ordering::Relaxed);
        }
        Ok(to)
    }

    /// Like `keep_aside`, but the staging file stays too (a hard link).
    pub fn link_aside(&self, id: u64, why: &str, label: &str) -> io::Result<PathBuf> {
        let to = self.aside_path(id, why, label)?;
        std::fs::hard_link(self.path(id), &to)?;
        Ok(to)
    }

    fn aside_path(&self, id: u64, why: &str, label: &str) -> io::Result<PathBuf> {
        let cache = self.dir.parent().unwrap_or(&self.dir);
        let dest = cache.join("lost+found").join(why);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dest)?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        // At most 150 bytes (a name has 255; a `.publish.json` record is
        // written next to it).
        let mut label: String = label.chars().map(|c| if c == '/' { '%' } else { c }).collect();
        let mut end = label.len().min(150);
        while !label.is_char_boundary(end) {
            end -= 1;
        }
        label.truncate(end);
        Ok(dest.join(format!("{secs}-{id:x}-{label}")))
    }

    /// The extended attributes of staging file `id`: they are the file's
    /// own (durable with its data, published with it). Labels the cache
    /// disk's security module adds are not the file's and are left out.
    pub fn xattrs(&self, id: u64) -> io::Result<crate::xattr::Xattrs> {
        let p = self.path(id);
        let mut out = crate::xattr::Xattrs::new();
        for name in xattr::list(&p)? {
            if crate::xattr::is_host_label(&name) {
                continue;
            }
            if let Some(v) = xattr::get(&p, &name)? {
                out.insert(name, v);
            }
        }
        Ok(out)
    }

    /// One extended attribute of staging file `id` (None: not set).
    pub fn xattr(&self, id: u64, name: &std::ffi::OsStr) -> io::Result<Option<Vec<u8>>> {
        xattr::get(self.path(id), name)
    }

    /// Sets (`Some`) or removes (`None`) an extended attribute of staging file `id`.
    pub fn set_xattr(&self, id: u64, name: &std::ffi::OsStr, value: Option<&[u8]>) -> io::Result<()> {
        match value {
            Some(v) => xattr::set(self.path(id), name, v),
            None => xattr::remove(self.path(id), name),
        }
    }

    /// Which extended attribute namespaces the cache disk can hold for staged files.
    pub fn probe_xattrs(&self) -> crate::backend::XattrCaps {
        let p = self.dir.join("xattr-probe");
        let f = match OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&p)
        {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "cannot probe the cache disk's extended attributes: refusing them");
                return crate::backend::XattrCaps::default();
            }
        };
        use xattr::FileExt;
        let caps = crate::backend::XattrCaps::probe(|n, v| f.set_xattr(n, v));
        drop(f);
        let _ = std::fs::remove_file(&p);
        caps
    }

    pub fn remove(&self, id: u64) {
        if let Err(e) = std::fs::remove_file(self.path(id))
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(id, error = %e, "cannot remove staging file");
        }
        if let Some(old) = self.space.sizes.lock().remove(&id) {
            self.space.used.fetch_sub(old, Ordering::Relaxed);
        }
        let _g = self.space.freed_lock.lock();
        self.space.freed.notify_all();
    }
}

fn statvfs(dir: &Path) -> io::Result<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c =
        std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: statvfs writes into a zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut v: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut v) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(v)
    }
}

/// The extended attributes of an open staging file, as `Staging::xattrs`.
pub fn file_xattrs(file: &File) -> io::Result<Vec<(std::ffi::OsString, Vec<u8>)>> {
    use xattr::FileExt;
    let mut out = Vec::new();
    for name in file.list_xattr()? {
        if crate::xattr::is_host_label(&name) {
            continue;
        }
        if let Some(v) = file.get_xattr(&name)? {
            out.push((name, v));
        }
    }
    Ok(out)
}

/// `fallocate(2)` on a staging file (preallocate, punch or zero a range).
pub fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is open; fallocate has no memory preconditions.
    if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
