//! The only home of backend syscalls. Every access is relative to the root fd
//! opened before efscache mounts on top of the backend path, and resolves paths
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)` (or,
//! where openat2 is missing, a walk one component at a time with `O_NOFOLLOW`),
//! so another client turning a directory into a symlink can never make efscache
//! read or write outside the backend, and the daemon never re-enters its own
//! mount through a path.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{AttrSet, Backend, BackendStats, Kind, OpKind, RelPath, Stat, StatFs, Timespec};

/// A backend directory tree reached through a root directory fd.
#[derive(Debug)]
pub struct PosixBackend {
    root: OwnedFd,
    stats: BackendStats,
    /// False once openat2 answered ENOSYS; then paths are walked by hand.
    have_openat2: AtomicBool,
    euid: u32,
    egid: u32,
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains a NUL byte"))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn ts(sec: i64, nsec: i64) -> Timespec {
    Timespec { sec, nsec: nsec as u32 }
}

fn stat_from(st: &libc::stat) -> io::Result<Stat> {
    let kind =
        Kind::from_mode(st.st_mode).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unknown file type"))?;
    Ok(Stat {
        dev: st.st_dev,
        ino: st.st_ino,
        kind,
        perm: st.st_mode & 0o7777,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: ts(st.st_atime, st.st_atime_nsec),
        mtime: ts(st.st_mtime, st.st_mtime_nsec),
        ctime: ts(st.st_ctime, st.st_ctime_nsec),
    })
}

fn stat_from_statx(st: &libc::statx) -> io::Result<Stat> {
    let mode = st.stx_mode as u32;
    let kind = Kind::from_mode(mode).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unknown file type"))?;
    let t = |t: libc::statx_timestamp| ts(t.tv_sec, t.tv_nsec as i64);
    Ok(Stat {
        dev: libc::makedev(st.stx_dev_major, st.stx_dev_minor),
        ino: st.stx_ino,
        kind,
        perm: mode & 0o7777,
        nlink: st.stx_nlink,
        uid: st.stx_uid,
        gid: st.stx_gid,
        rdev: libc::makedev(st.stx_rdev_major, st.stx_rdev_minor),
        size: st.stx_size,
        blocks: st.stx_blocks,
        atime: t(st.stx_atime),
        mtime: t(st.stx_mtime),
        ctime: t(st.stx_ctime),
    })
}

fn timespec(t: Option<Timespec>) -> libc::timespec {
    match t {
        Some(t) => libc::timespec {
            tv_sec: t.sec,
            tv_nsec: t.nsec as i64,
        },
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    }
}

impl PosixBackend {
    /// Opens the backend root. Must be called before anything is mounted on
    /// top of `path`: afterwards the path would name the mount, not the backend.
    pub fn open(path: &Path) -> io::Result<PosixBackend> {
        let c = cstr(path.as_os_str())?;
        // SAFETY: `c` is a valid NUL-terminated path.
        let fd = check(unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by open and is owned by nobody else.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: geteuid/getegid cannot fail.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Ok(PosixBackend {
            root,
            stats: BackendStats::default(),
            have_openat2: AtomicBool::new(true),
            euid,
            egid,
        })
    }

    /// The (dev, ino) of the backend root, for telling it apart from our own mount.
    pub fn root_stat(&self) -> io::Result<Stat> {
        self.fstat(self.root.as_raw_fd())
    }

    fn fstat(&self, fd: RawFd) -> io::Result<Stat> {
        // SAFETY: zeroed stat is a valid out-buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fd is open for the duration of the call; st is a valid out-pointer.
        check(unsafe { libc::fstat(fd, &mut st) })?;
        stat_from(&st)
    }

    /// Opens `path` below the root with `flags`, never following a symlink and
    /// never leaving the root. The root itself is reopened through ".".
    fn open_beneath(&self, path: &RelPath, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
        for c in &path.0 {
            if !super::valid_name(c) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
        }
        let joined: OsString = if path.0.is_empty() {
            ".".into()
        } else {
            OsString::from_vec(path.0.iter().map(|c| c.as_bytes()).collect::<Vec<_>>().join(&b'/'))
        };
        let c = cstr(&joined)?;
        if self.have_openat2.load(Ordering::Relaxed) {
            // SAFETY: open_how is plain data; all-zero is a valid value.
            let mut how: libc::open_how = unsafe { std::mem::zeroed() };
            how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
            how.mode = mode as u64;
            how.resolve =
                libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_XDEV | libc::RESOLVE_NO_MAGICLINKS;
            // SAFETY: `c` and `how` are valid for the call; size matches the struct.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    self.root.as_raw_fd(),
                    c.as_ptr(),
                    &how as *const libc::open_how,
                    std::mem::size_of::<libc::open_how>(),
                )
            };
            if rc >= 0 {
                // SAFETY: a non-negative return is a new fd we own.
                return Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) });
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ENOSYS) {
                return Err(err);
            }
            self.have_openat2.store(false, Ordering::Relaxed);
        }
        // Fallback: walk one component at a time, refusing symlinks at every step.
        let mut dir: Option<OwnedFd> = None;
        let n = path.0.len();
        if n == 0 {
            let dot = cstr(OsStr::new("."))?;
            // SAFETY: root fd is open; `dot` is a valid string.
            let fd =
                check(unsafe { libc::openat(self.root.as_raw_fd(), dot.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
            // SAFETY: new fd we own.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        for (i, comp) in path.0.iter().enumerate() {
            let last = i + 1 == n;
            let c = cstr(comp)?;
            let f = if last {
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC
            } else {
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC
            };
            let base = dir.as_ref().map_or(self.root.as_raw_fd(), |d| d.as_raw_fd());
            // SAFETY: base is an open directory fd; `c` is valid.
            let fd = check(unsafe { libc::openat(base, c.as_ptr(), f, mode) })?;
            // SAFETY: new fd we own.
            dir = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        Ok(dir.expect("non-empty path"))
    }

    /// Runs `f` with the parent directory fd of `path` and its final name.
    fn at_parent<T>(&self, path: &RelPath, f: impl FnOnce(RawFd, &CString) -> io::Result<T>) -> io::Result<T> {
        let (parent, name) = path
            .split_last()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if !super::valid_name(name) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let c = cstr(name)?;
        if parent.0.is_empty() {
            return f(self.root.as_raw_fd(), &c);
        }
        let dir = self.open_beneath(&parent, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        f(dir.as_raw_fd(), &c)
    }

    /// Applies owner, mode and times through an fd.
    fn apply_fd(&self, fd: RawFd, attrs: &AttrSet, chown: bool) -> io::Result<()> {
        if chown {
            self.stats.count(OpKind::chown);
            // SAFETY: fd is open; -1 leaves an id unchanged.
            check(unsafe { libc::fchown(fd, attrs.uid.unwrap_or(u32::MAX), attrs.gid.unwrap_or(u32::MAX)) })?;
        }
        if let Some(perm) = attrs.perm {
            self.stats.count(OpKind::chmod);
            // SAFETY: fd is open.
            check(unsafe { libc::fchmod(fd, perm) })?;
        }
        if attrs.atime.is_some() || attrs.mtime.is_some() {
            self.stats.count(OpKind::utimens);
            let times = [timespec(attrs.atime), timespec(attrs.mtime)];
            // SAFETY: fd open, times points to two timespecs.
            check(unsafe { libc::futimens(fd, times.as_ptr()) })?;
        }
        Ok(())
    }

    fn needs_chown(&self, attrs: &AttrSet) -> bool {
        attrs.uid.is_some_and(|u| u != self.euid) || attrs.gid.is_some_and(|g| g != self.egid)
    }
}

impl Backend for PosixBackend {
    fn list_names(&self, dir: &RelPath) -> io::Result<Vec<OsString>> {
        self.stats.count(OpKind::readdir);
        let fd = self.open_beneath(dir, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let raw = fd.as_raw_fd();
        std::mem::forget(fd); // closedir below closes it
        // SAFETY: raw is an open directory fd; ownership passes to the DIR stream.
        let dirp = unsafe { libc::fdopendir(raw) };
        if dirp.is_null() {
            let err = io::Error::last_os_error();
            // SAFETY: fdopendir failed, so we still own raw.
            unsafe { libc::close(raw) };
            return Err(err);
        }
        let mut names = Vec::new();
        let result = loop {
            // SAFETY: errno is thread-local; resetting it distinguishes end-of-dir from errors.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: dirp is a valid open DIR stream.
            let ent = unsafe { libc::readdir64(dirp) };
            if ent.is_null() {
                let e = io::Error::last_os_error();
                break if e.raw_os_error().unwrap_or(0) == 0 {
                    Ok(())
                } else {
                    Err(e)
                };
            }
            // SAFETY: d_name of a returned entry is a NUL-terminated string inside the entry.
            let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
            let b = name.to_bytes();
            if b != b"." && b != b".." {
                names.push(OsString::from_vec(b.to_vec()));
            }
        };
        // SAFETY: dirp is valid and closed exactly once.
        unsafe { libc::closedir(dirp) };
        result.map(|_| names)
    }

    fn stat(&self, path: &RelPath) -> io::Result<Stat> {
        self.stats.count(OpKind::stat);
        if path.0.is_empty() {
            return self.fstat(self.root.as_raw_fd());
        }
        self.at_parent(path, |dir, name| {
            // SAFETY: zeroed stat is a valid out-buffer.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: dir is open, name valid, st a valid out-pointer.
            check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
            stat_from(&st)
        })
    }

    /// With `AT_STATX_FORCE_SYNC` the NFS client asks the server for the
    /// attributes. The directory first: a change of its entries (a file
    /// renamed over the name) makes the client drop the names it cached in
    /// it, so the name is then looked up again instead of answered with the
    /// file it held before.
    fn stat_fresh(&self, path: &RelPath) -> io::Result<Stat> {
        self.stats.count(OpKind::stat);
        if path.0.is_empty() {
            return self.fstat(self.root.as_raw_fd());
        }
        self.at_parent(path, |dir, name| {
            // SAFETY: zeroed statx is a valid out-buffer.
            let mut st: libc::statx = unsafe { std::mem::zeroed() };
            let flags = libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_FORCE_SYNC;
            // SAFETY: dir is an open fd (AT_EMPTY_PATH: the fd itself), st a valid out-pointer.
            check(unsafe {
                libc::statx(
                    dir,
                    c"".as_ptr(),
                    flags | libc::AT_EMPTY_PATH,
                    libc::STATX_BASIC_STATS,
                    &mut st,
                )
            })?;
            // SAFETY: dir is open, name valid, st a valid out-pointer.
            check(unsafe { libc::statx(dir, name.as_ptr(), flags, libc::STATX_BASIC_STATS, &mut st) })?;
            stat_from_statx(&st)
        })
    }

    fn read_link(&self, path: &RelPath) -> io::Result<OsString> {
        self.stats.count(OpKind::readlink);
        self.at_parent(path, |dir, name| {
            let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
            // SAFETY: buf has buf.len() bytes of writable space.
            let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            buf.truncate(n as usize);
            Ok(OsString::from_vec(buf))
        })
    }

    fn open_read(&self, path: &RelPath) -> io::Result<File> {
        self.stats.count(OpKind::open);
        let fd = self.open_beneath(path, libc::O_RDONLY, 0)?;
        Ok(File::from(fd))
    }

    fn statfs(&self) -> io::Result<StatFs> {
        self.stats.count(OpKind::statfs);
        // SAFETY: zeroed statvfs is a valid out-buffer.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: root fd is open; s is a valid out-pointer.
        check(unsafe { libc::fstatvfs(self.root.as_raw_fd(), &mut s) })?;
        Ok(StatFs {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: s.f_namemax as u32,
            frsize: s.f_frsize as u32,
        })
    }

    fn create_exclusive(&self, dir: &RelPath, name: &OsStr, perm: u32) -> io::Result<File> {
        self.stats.count(OpKind::create);
        self.at_parent(&dir.join(name), |d, name| {
            // SAFETY: d is an open directory fd, name a valid string.
            let fd = check(unsafe {
                libc::openat(
                    d,
                    name.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    perm,
                )
            })?;
            // SAFETY: a new fd we own.
            Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
        })
    }

    fn mkdir(&self, path: &RelPath, perm: u32) -> io::Result<()> {
        self.stats.count(OpKind::mkdir);
        self.at_parent(path, |d, name| {
            // SAFETY: d open, name valid.
            check(unsafe { libc::mkdirat(d, name.as_ptr(), perm) }).map(drop)
        })
    }

    fn rmdir(&self, path: &RelPath) -> io::Result<()> {
        self.stats.count(OpKind::rmdir);
        self.at_parent(path, |d, name| {
            // SAFETY: d open, name valid.
            check(unsafe { libc::unlinkat(d, name.as_ptr(), libc::AT_REMOVEDIR) }).map(drop)
        })
    }

    fn unlink(&self, path: &RelPath) -> io::Result<()> {
        self.stats.count(OpKind::unlink);
        self.at_parent(path, |d, name| {
            // SAFETY: d open, name valid.
            check(unsafe { libc::unlinkat(d, name.as_ptr(), 0) }).map(drop)
        })
    }

    fn rename(&self, from: &RelPath, to: &RelPath) -> io::Result<()> {
        self.stats.count(OpKind::rename);
        self.at_parent(from, |fd_from, name_from| {
            self.at_parent(to, |fd_to, name_to| {
                // SAFETY: both dir fds are open and names valid.
                check(unsafe { libc::renameat(fd_from, name_from.as_ptr(), fd_to, name_to.as_ptr()) }).map(drop)
            })
        })
    }

    fn symlink(&self, target: &OsStr, path: &RelPath) -> io::Result<()> {
        self.stats.count(OpKind::symlink);
        let t = cstr(target)?;
        self.at_parent(path, |d, name| {
            // SAFETY: strings valid; d open.
            check(unsafe { libc::symlinkat(t.as_ptr(), d, name.as_ptr()) }).map(drop)
        })
    }

    fn link(&self, existing: &RelPath, new: &RelPath) -> io::Result<()> {
        self.stats.count(OpKind::link);
        self.at_parent(existing, |fd_old, name_old| {
            self.at_parent(new, |fd_new, name_new| {
                // SAFETY: fds open; names valid; flags 0 never follows a symlink.
                check(unsafe { libc::linkat(fd_old, name_old.as_ptr(), fd_new, name_new.as_ptr(), 0) }).map(drop)
            })
        })
    }

    fn mknod(&self, path: &RelPath, kind: Kind, perm: u32, rdev: u64) -> io::Result<()> {
        self.stats.count(OpKind::mknod);
        self.at_parent(path, |d, name| {
            // SAFETY: d open, name valid.
            check(unsafe { libc::mknodat(d, name.as_ptr(), kind.type_bits() | perm, rdev) }).map(drop)
        })
    }

    fn set_attrs(&self, path: &RelPath, attrs: &AttrSet, fresh: bool) -> io::Result<()> {
        let chown = if fresh {
            self.needs_chown(attrs)
        } else {
            attrs.uid.is_some() || attrs.gid.is_some()
        };
        if path.0.is_empty() {
            // The backend root itself: through an fd (it has no parent here).
            let fd = self.open_beneath(path, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            return self.apply_fd(fd.as_raw_fd(), attrs, chown);
        }
        self.at_parent(path, |d, name| {
            if chown {
                self.stats.count(OpKind::chown);
                let uid = attrs.uid.unwrap_or(u32::MAX);
                let gid = attrs.gid.unwrap_or(u32::MAX);
                // SAFETY: d open, name valid; -1 leaves an id unchanged.
                check(unsafe { libc::fchownat(d, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })?;
            }
            if let Some(perm) = attrs.perm {
                self.stats.count(OpKind::chmod);
                // SAFETY: d open, name valid.
                check(unsafe { libc::fchmodat(d, name.as_ptr(), perm, 0) })?;
            }
            if attrs.atime.is_some() || attrs.mtime.is_some() {
                self.stats.count(OpKind::utimens);
                let times = [timespec(attrs.atime), timespec(attrs.mtime)];
                // SAFETY: d open, name valid, times points to two timespecs.
                check(unsafe { libc::utimensat(d, name.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })?;
            }
            Ok(())
        })
    }

    fn stat_file(&self, file: &File) -> io::Result<Stat> {
        self.fstat(file.as_raw_fd())
    }

    fn set_attrs_fd(&self, file: &File, attrs: &AttrSet) -> io::Result<()> {
        self.apply_fd(file.as_raw_fd(), attrs, attrs.uid.is_some() || attrs.gid.is_some())
    }

    fn seek_hole_data(&self, file: &File, offset: i64, whence: i32) -> io::Result<i64> {
        self.stats.count(OpKind::read);
        seek_hole_data(file, offset, whence)
    }

    fn read_at(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        self.stats.count(OpKind::read);
        let mut n = 0;
        while n < buf.len() {
            match file.read_at(&mut buf[n..], offset + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.stats.add_read(n as u64);
        Ok(n)
    }

    fn write_at(&self, file: &File, data: &[u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.stats.count(OpKind::write);
        file.write_all_at(data, offset)?;
        self.stats.add_written(data.len() as u64);
        Ok(())
    }

    fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        self.stats.count(OpKind::truncate);
        file.set_len(len)
    }

    fn close_file(&self, file: File) -> io::Result<()> {
        self.stats.count(OpKind::close);
        let raw = std::os::fd::IntoRawFd::into_raw_fd(file);
        // SAFETY: we own raw; close reports the deferred write-back error NFS returns on close.
        check(unsafe { libc::close(raw) }).map(drop)
    }

    fn list_xattrs(&self, path: &RelPath) -> io::Result<Vec<(OsString, Vec<u8>)>> {
        self.stats.count(OpKind::listxattr);
        let (_fd, proc_path) = self.proc_path(path)?;
        let mut out = Vec::new();
        for name in xattr::list_deref(&proc_path)? {
            self.stats.count(OpKind::getxattr);
            // A name removed since the listing is simply not there.
            if let Some(v) = xattr::get_deref(&proc_path, &name)? {
                out.push((name, v));
            }
        }
        Ok(out)
    }

    fn set_xattr(&self, path: &RelPath, name: &OsStr, value: Option<&[u8]>) -> io::Result<()> {
        let (_fd, proc_path) = self.proc_path(path)?;
        match value {
            Some(v) => {
                self.stats.count(OpKind::setxattr);
                xattr::set_deref(&proc_path, name, v)
            }
            None => {
                self.stats.count(OpKind::removexattr);
                match xattr::remove_deref(&proc_path, name) {
                    Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
                    r => r,
                }
            }
        }
    }

    fn set_xattr_fd(&self, file: &File, name: &OsStr, value: &[u8]) -> io::Result<()> {
        use xattr::FileExt;
        self.stats.count(OpKind::setxattr);
        file.set_xattr(name, value)
    }

    fn stats(&self) -> &BackendStats {
        &self.stats
    }
}

impl PosixBackend {
    /// An `O_PATH` fd of the object at `path` (reached as every path is, never
    /// following a symlink), and its `/proc/self/fd` name: the xattr calls on
    /// that name act on the object itself, symlinks and special files included,
    /// without resolving `path` again.
    fn proc_path(&self, path: &RelPath) -> io::Result<(OwnedFd, std::path::PathBuf)> {
        let fd = self.open_beneath(path, libc::O_PATH, 0)?;
        let p = std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        Ok((fd, p))
    }
}

/// `lseek(SEEK_DATA|SEEK_HOLE)`; other `whence` values are refused.
pub fn seek_hole_data(file: &File, offset: i64, whence: i32) -> io::Result<i64> {
    if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: the fd is open; lseek has no memory preconditions. Only pread and
    // pwrite are used on these files, so moving the offset disturbs nothing.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `stat_fresh` answers what `stat` does (it only bypasses a client's
    /// attribute cache), without following a symlink.
    #[test]
    fn a_fresh_stat_is_a_stat() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"data").unwrap();
        std::os::unix::fs::symlink("f", dir.path().join("l")).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let b = PosixBackend::open(dir.path()).unwrap();
        for name in ["f", "l", "d"] {
            let p = RelPath(vec![name.into()]);
            assert_eq!(
                format!("{:?}", b.stat_fresh(&p).unwrap()),
                format!("{:?}", b.stat(&p).unwrap()),
                "{name}"
            );
        }
        let root = RelPath(vec![]);
        assert_eq!(b.stat_fresh(&root).unwrap().ino, b.stat(&root).unwrap().ino);
        let gone = b.stat_fresh(&RelPath(vec!["gone".into()])).unwrap_err();
        assert_eq!(gone.raw_os_error(), Some(libc::ENOENT));
    }
}
