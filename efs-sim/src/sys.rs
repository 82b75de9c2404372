//! Thin, safe wrappers over the Linux syscalls the passthrough needs.
//!
//! Everything here works relative to file descriptors (`*at` calls, `O_PATH`
//! handles, `/proc/self/fd` re-opens), never by absolute path, so the emulator
//! never walks through its own mountpoint. Each wrapper returns `io::Result` and
//! leaves errno translation to the caller.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// An empty path, for the `AT_EMPTY_PATH` forms of `*at` calls.
const EMPTY: &CStr = c"";

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn check_size(rc: libc::ssize_t) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// A file name from the kernel as a C string; names containing NUL are invalid.
pub fn cname(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)`.
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string and `dir` a live fd for the call.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    let fd = check(fd)?;
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `O_PATH` handle on `name` in `dir`, not following a final symlink.
pub fn open_path(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// Re-opens the file behind an `O_PATH` handle with real open flags, through
/// `/proc/self/fd` (the only way to turn an `O_PATH` fd into an I/O fd).
pub fn reopen(proc_fd: BorrowedFd<'_>, fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    let name = fd_name(fd);
    openat(
        proc_fd,
        &name,
        flags & !(libc::O_NOFOLLOW | libc::O_CREAT | libc::O_EXCL),
        0,
    )
}

/// `access(2)` on the object behind `fd` with the thread's filesystem
/// credentials (`AT_EACCESS`: without it the kernel would check the real uid,
/// the server's).
pub fn access_fd(proc_fd: BorrowedFd<'_>, fd: BorrowedFd<'_>, mask: i32) -> io::Result<()> {
    let name = fd_name(fd);
    // SAFETY: `name` is NUL-terminated and `proc_fd` a live fd for the call.
    check(unsafe { libc::faccessat(proc_fd.as_raw_fd(), name.as_ptr(), mask, libc::AT_EACCESS) })?;
    Ok(())
}

/// The name of `fd` inside `/proc/self/fd`.
pub fn fd_name(fd: BorrowedFd<'_>) -> CString {
    CString::new(fd.as_raw_fd().to_string()).expect("decimal digits contain no NUL")
}

/// `fstatat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`: the attributes of the
/// object behind any fd, `O_PATH` included.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` points to writable memory of the right size; EMPTY is NUL-terminated.
    check(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// `fstatvfs(fd)`.
pub fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `st` points to writable memory of the right size.
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// `mkdirat(dir, name, mode)`.
pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd and NUL-terminated name.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) })?;
    Ok(())
}

/// `mknodat(dir, name, mode, rdev)`.
pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    // SAFETY: valid fd and NUL-terminated name.
    check(unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            name.as_ptr(),
            mode as libc::mode_t,
            rdev as libc::dev_t,
        )
    })?;
    Ok(())
}

/// `symlinkat(target, dir, name)`.
pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid fd and NUL-terminated strings.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })?;
    Ok(())
}

/// `unlinkat(dir, name, flags)` (`AT_REMOVEDIR` for rmdir).
pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<()> {
    // SAFETY: valid fd and NUL-terminated name.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })?;
    Ok(())
}

/// `renameat2(old_dir, old, new_dir, new, flags)`.
pub fn renameat2(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: valid fds and NUL-terminated names.
    check(unsafe {
        libc::renameat2(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            flags,
        )
    })?;
    Ok(())
}

/// Links the object behind `fd` (any fd, `O_PATH` included) as `name` in `dir`.
pub fn link_fd(proc_fd: BorrowedFd<'_>, fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // Through /proc/self/fd (following the magic link) rather than
    // AT_EMPTY_PATH, which needs CAP_DAC_READ_SEARCH: a caller's request
    // runs without it (see `Caller::assume`).
    let src = fd_name(fd);
    // SAFETY: valid fds and NUL-terminated names.
    check(unsafe {
        libc::linkat(
            proc_fd.as_raw_fd(),
            src.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })?;
    Ok(())
}

/// Runs `f` with the server's filesystem credentials (fsuid 0, and with
/// it the filesystem capabilities), for what the server does on its own
/// account inside a caller's request: reopening an inode by file handle.
pub fn as_server<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: plain syscalls on integers; setfsuid returns the previous id.
    let prev = unsafe { libc::syscall(libc::SYS_setfsuid, 0) } as u32;
    let r = f();
    if prev != 0 {
        // SAFETY: as above.
        unsafe { libc::syscall(libc::SYS_setfsuid, prev) };
    }
    r
}

/// The target of the symlink behind an `O_PATH` fd.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is writable for `buf.len()` bytes; EMPTY is NUL-terminated.
    let n =
        check_size(unsafe { libc::readlinkat(fd.as_raw_fd(), EMPTY.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    buf.truncate(n);
    Ok(buf)
}

/// `fchownat(fd, "", uid, gid, AT_EMPTY_PATH)`; `u32::MAX` leaves an id unchanged.
pub fn chown_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid fd; EMPTY is NUL-terminated.
    check(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

/// chmod of the object behind an `O_PATH` fd, through `/proc/self/fd`.
pub fn chmod_fd(proc_fd: BorrowedFd<'_>, fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let name = fd_name(fd);
    // SAFETY: valid fd and NUL-terminated name.
    check(unsafe { libc::fchmodat(proc_fd.as_raw_fd(), name.as_ptr(), mode as libc::mode_t, 0) })?;
    Ok(())
}

/// `fchmod` on an open (non-`O_PATH`) fd.
pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: valid fd.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) })?;
    Ok(())
}

/// truncate of the file behind an `O_PATH` fd, through `/proc/self/fd`.
pub fn truncate_fd(proc_fd: BorrowedFd<'_>, fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let file = reopen(proc_fd, fd, libc::O_WRONLY)?;
    ftruncate(file.as_raw_fd(), size)
}

/// `ftruncate(fd, size)`.
pub fn ftruncate(fd: RawFd, size: u64) -> io::Result<()> {
    let size = libc::off_t::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on an fd the caller keeps open.
    check(unsafe { libc::ftruncate(fd, size) })?;
    Ok(())
}

/// A timestamp for [`utimens_fd`]: `None` leaves it unchanged, `Some(None)` is "now".
pub type TimeSpec = Option<Option<(i64, i64)>>;

fn timespec(t: TimeSpec) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(None) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(Some((sec, nsec))) => libc::timespec {
            tv_sec: sec as libc::time_t,
            tv_nsec: nsec as _,
        },
    }
}

/// `utimensat(fd, "", times, AT_EMPTY_PATH)`: sets atime/mtime of the object
/// behind any fd (symlinks included), with nanosecond precision.
pub fn utimens_fd(fd: BorrowedFd<'_>, atime: TimeSpec, mtime: TimeSpec) -> io::Result<()> {
    let times = [timespec(atime), timespec(mtime)];
    // SAFETY: `times` holds two timespecs as utimensat requires; EMPTY is NUL-terminated.
    check(unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

/// `pread` into a fresh buffer of up to `size` bytes.
pub fn pread(fd: RawFd, size: usize, offset: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let mut done = 0;
    while done < size {
        // SAFETY: the destination range lies inside `buf`.
        let n = check_size(unsafe {
            libc::pread(
                fd,
                buf[done..].as_mut_ptr().cast(),
                size - done,
                (offset + done as u64) as libc::off_t,
            )
        })?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    Ok(buf)
}

/// `pwrite` of all of `data` at `offset`.
pub fn pwrite(fd: RawFd, data: &[u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        // SAFETY: the source range lies inside `data`.
        let n = check_size(unsafe {
            libc::pwrite(
                fd,
                data[done..].as_ptr().cast(),
                data.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        })?;
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        done += n;
    }
    Ok(done)
}

/// `fallocate(fd, mode, offset, len)`.
pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an fd the caller keeps open.
    check(unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) })?;
    Ok(())
}

/// `lseek(fd, offset, whence)` (SEEK_DATA / SEEK_HOLE included).
pub fn lseek(fd: RawFd, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall on an fd the caller keeps open.
    let rc = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// `copy_file_range` between two open fds at explicit offsets.
pub fn copy_file_range(
    fd_in: RawFd,
    off_in: u64,
    fd_out: RawFd,
    off_out: u64,
    len: u64,
    flags: u32,
) -> io::Result<usize> {
    let mut off_in = off_in as libc::loff_t;
    let mut off_out = off_out as libc::loff_t;
    // SAFETY: the offsets point to live locals; the fds stay open for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_copy_file_range,
            fd_in,
            &mut off_in as *mut libc::loff_t,
            fd_out,
            &mut off_out as *mut libc::loff_t,
            len as libc::size_t,
            flags as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

/// One entry of a directory listing.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: u8,
}

/// Lists the directory behind `dir` (an `O_PATH` handle), "." and ".." included.
pub fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<DirEntry>> {
    let fd = openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let raw = fd.as_raw_fd();
    // SAFETY: `raw` is a directory fd; on success fdopendir takes ownership of it.
    let stream = unsafe { libc::fdopendir(raw) };
    if stream.is_null() {
        return Err(io::Error::last_os_error());
    }
    // The DIR stream owns the fd now.
    std::mem::forget(fd);
    let mut out = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; resetting it distinguishes end-of-stream from errors.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is a live DIR* owned by this function.
        let ent = unsafe { libc::readdir64(stream) };
        if ent.is_null() {
            // SAFETY: reading the thread-local errno.
            let errno = unsafe { *libc::__errno_location() };
            break if errno == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(errno))
            };
        }
        // SAFETY: readdir64 returned a valid entry whose d_name is NUL-terminated and
        // stays valid until the next readdir64 call on this stream.
        let (name, ino, kind) = unsafe {
            let e = &*ent;
            (CStr::from_ptr(e.d_name.as_ptr()).to_bytes().to_vec(), e.d_ino, e.d_type)
        };
        out.push(DirEntry { name, ino, kind });
    };
    // SAFETY: `stream` is live and closed exactly once.
    unsafe { libc::closedir(stream) };
    result.map(|()| out)
}

/// Path-based xattr calls on the object behind an `O_PATH` fd, via `/proc/self/fd/N`.
pub mod xattr {
    use super::*;

    fn proc_path(fd: BorrowedFd<'_>) -> CString {
        CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in path")
    }

    /// `getxattr`; with `size` 0 returns the value's size and no data.
    pub fn get(fd: BorrowedFd<'_>, name: &CStr, size: usize) -> io::Result<(usize, Vec<u8>)> {
        let path = proc_path(fd);
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` is writable for `size` bytes (a null pointer is fine for 0).
        let n = check_size(unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), size) })?;
        buf.truncate(n.min(size));
        Ok((n, buf))
    }

    /// `listxattr`; with `size` 0 returns the list's size and no data.
    pub fn list(fd: BorrowedFd<'_>, size: usize) -> io::Result<(usize, Vec<u8>)> {
        let path = proc_path(fd);
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` is writable for `size` bytes.
        let n = check_size(unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), size) })?;
        buf.truncate(n.min(size));
        Ok((n, buf))
    }

    /// `setxattr`.
    pub fn set(fd: BorrowedFd<'_>, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
        let path = proc_path(fd);
        // SAFETY: `value` is readable for its length; strings are NUL-terminated.
        check(unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), flags) })?;
        Ok(())
    }

    /// `removexattr`.
    pub fn remove(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
        let path = proc_path(fd);
        // SAFETY: strings are NUL-terminated.
        check(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) })?;
        Ok(())
    }
}

/// Sets the process umask (0 so the modes the kernel sends are applied as is).
pub fn set_umask(mask: u32) {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask as libc::mode_t) };
}

fn nofile_rlimit() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid out-pointer.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim)
}

/// The current RLIMIT_NOFILE (soft).
pub fn nofile_limit() -> u64 {
    nofile_rlimit().map_or(1024, |l| l.rlim_cur)
}

/// Raises RLIMIT_NOFILE as far as allowed: the inode table keeps up to half
/// of it open (see `inodes`), every inode where file handles do not work.
pub fn raise_nofile_limit() -> u64 {
    let Some(lim) = nofile_rlimit() else {
        return 0;
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(lim.rlim_max);
    let want = nr_open.max(lim.rlim_max);
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: want,
    };
    // SAFETY: `new` is a valid in-pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
        return want;
    }
    let soft = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: `soft` is a valid in-pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } == 0 {
        lim.rlim_max
    } else {
        lim.rlim_cur
    }
}

/// Who a request comes from, as FUSE reports it: the AUTH_SYS credentials
/// an NFS request carries (uid, gid, and the supplementary groups, read
/// from the calling process).
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// While alive, the calling thread's filesystem credentials are a caller's:
/// fsuid, fsgid and supplementary groups. The backing filesystem then checks
/// every access as an NFS server checks a client's request, and new objects
/// belong to the caller. Dropping it gives the thread the server's own back.
pub struct AsCaller {
    saved_groups: Option<Vec<libc::gid_t>>,
}

impl Caller {
    /// The server itself (root): no switch.
    pub const SERVER: Caller = Caller { uid: 0, gid: 0, pid: 0 };

    /// Takes on this caller's credentials for the current thread. Root
    /// callers keep the server's (root may do anything an NFS server without
    /// root squashing allows).
    pub fn assume(&self) -> io::Result<AsCaller> {
        if self.uid == 0 {
            return Ok(AsCaller { saved_groups: None });
        }
        let saved = thread_groups()?;
        let groups = process_groups(self.pid);
        let guard = AsCaller {
            saved_groups: Some(saved),
        };
        // Raw syscalls: credentials are per thread in the kernel, and glibc's
        // setgroups would change every thread of the process.
        // SAFETY: `groups` is a valid array of `groups.len()` gids.
        let rc = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // setfsuid/setfsgid report no errors: ask back (an invalid id
        // changes nothing and returns the current one).
        // SAFETY: plain syscalls on integers.
        unsafe {
            libc::syscall(libc::SYS_setfsgid, self.gid);
            libc::syscall(libc::SYS_setfsuid, self.uid);
            let (g, u) = (
                libc::syscall(libc::SYS_setfsgid, u32::MAX) as u32,
                libc::syscall(libc::SYS_setfsuid, u32::MAX) as u32,
            );
            if (g, u) != (self.gid, self.uid) {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
        }
        Ok(guard)
    }
}

impl Drop for AsCaller {
    fn drop(&mut self) {
        let Some(groups) = &self.saved_groups else { return };
        // fsuid back to 0 first: that restores the filesystem capabilities.
        // SAFETY: plain syscalls; `groups` is a valid array.
        unsafe {
            libc::syscall(libc::SYS_setfsuid, 0);
            libc::syscall(libc::SYS_setfsgid, 0);
            libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr());
        }
    }
}

/// The current thread's supplementary groups.
fn thread_groups() -> io::Result<Vec<libc::gid_t>> {
    // SAFETY: a zero-length query returns the count only.
    let n = check(unsafe { libc::getgroups(0, std::ptr::null_mut()) })?;
    let mut groups = vec![0; n as usize];
    // SAFETY: `groups` has room for `n` gids.
    let n = check(unsafe { libc::getgroups(n, groups.as_mut_ptr()) })?;
    groups.truncate(n as usize);
    Ok(groups)
}

/// The supplementary groups of process (or thread) `pid`, from
/// /proc/PID/status; none if it is gone or not visible (kernel-initiated
/// requests have pid 0).
fn process_groups(pid: u32) -> Vec<libc::gid_t> {
    if pid == 0 {
        return Vec::new();
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

/// A file handle (`name_to_handle_at`): a `struct file_handle` with its
/// bytes, kept as u32s for the struct's alignment.
#[derive(Debug, PartialEq, Eq)]
pub struct Handle(Box<[u32]>);

/// Room for the largest handle the kernel gives (MAX_HANDLE_SZ).
const MAX_HANDLE_BYTES: usize = 128;

/// The file handle of the object behind `fd` (any kind, `O_PATH` included).
pub fn handle_of(fd: BorrowedFd<'_>) -> io::Result<Handle> {
    let header = std::mem::size_of::<libc::file_handle>();
    let mut buf = vec![0u32; (header + MAX_HANDLE_BYTES).div_ceil(4)];
    let fh = buf.as_mut_ptr().cast::<libc::file_handle>();
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `fh` points to a buffer with room for the header and
    // MAX_HANDLE_BYTES of handle, aligned for `file_handle`; EMPTY is
    // NUL-terminated; `fd` is live for the call.
    unsafe {
        (*fh).handle_bytes = MAX_HANDLE_BYTES as u32;
        check(libc::name_to_handle_at(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            fh,
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        ))?;
        let used = header + (*fh).handle_bytes as usize;
        buf.truncate(used.div_ceil(4));
    }
    Ok(Handle(buf.into_boxed_slice()))
}

/// Opens (`O_PATH | O_NOFOLLOW`) the object with handle `h` on the
/// filesystem of `mount`; ESTALE if it no longer exists.
pub fn open_by_handle(mount: BorrowedFd<'_>, h: &Handle) -> io::Result<OwnedFd> {
    // SAFETY: `h` holds a complete `file_handle` written by name_to_handle_at
    // (the kernel only reads it); `mount` is live for the call.
    let fd = check(unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            h.0.as_ptr().cast::<libc::file_handle>().cast_mut(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a new fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
