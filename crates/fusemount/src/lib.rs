//! Mounting FUSE filesystems without libfuse or fusermount, and reading mountinfo.
//!
//! fuser 0.18's own mount path unmounts the mountpoint a second time on teardown
//! after an external `umount`; when a FUSE filesystem is stacked on another mount
//! at the same path (efscache over EFS) that second umount(2) removes the lower
//! filesystem. Mounting with mount(2) ourselves and serving the fd with
//! `fuser::Session::from_fd` means nothing but an explicit call here ever
//! unmounts, and every unmount first checks mountinfo that the top mount at the
//! path is the one we mean.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// What to mount: the options that end up in the kernel's mount data and in mountinfo.
#[derive(Debug, Clone)]
pub struct MountSpec {
    /// Shown as the mount source in mountinfo (e.g. `efscache:/mnt/efs`).
    pub fsname: String,
    /// Shown as `fuse.<subtype>` in mountinfo.
    pub subtype: String,
    /// Let every user use the mount (the kernel's `allow_other`).
    pub allow_other: bool,
    /// Let the kernel check permissions from the attributes we report.
    pub default_permissions: bool,
    /// Mount read-only.
    pub read_only: bool,
}

/// Opens `/dev/fuse` and mounts it at `mountpoint`; returns the session fd.
///
/// Requires CAP_SYS_ADMIN (root). The returned fd is handed to
/// `fuser::Session::from_fd`; dropping it before the handshake aborts the mount.
pub fn mount(mountpoint: &Path, spec: &MountSpec) -> io::Result<OwnedFd> {
    let dev = CString::new("/dev/fuse").expect("static path");
    // SAFETY: `dev` is a valid NUL-terminated string; open has no other preconditions.
    let raw = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!("cannot open /dev/fuse: {err} (is the fuse module loaded?)"),
        ));
    }
    // SAFETY: `raw` was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!("fd={},rootmode=40000,user_id={uid},group_id={gid}", fd.as_raw_fd());
    if spec.allow_other {
        data.push_str(",allow_other");
    }
    if spec.default_permissions {
        data.push_str(",default_permissions");
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if spec.read_only {
        flags |= libc::MS_RDONLY;
    }
    let source = cstring(spec.fsname.as_bytes())?;
    let target = cstring(mountpoint.as_os_str().as_bytes())?;
    let data_c = cstring(data.as_bytes())?;
    let fstype = cstring(format!("fuse.{}", spec.subtype).as_bytes())?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data_c.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!("mount(2) at {} failed: {err}", mountpoint.display()),
        ));
    }
    Ok(fd)
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_id: u64,
    pub parent_id: u64,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

impl MountInfo {
    /// True for a FUSE mount of the given subtype (`fuse.<subtype>`).
    pub fn is_fuse_subtype(&self, subtype: &str) -> bool {
        self.fstype == format!("fuse.{subtype}")
    }
}

/// Parses `/proc/self/mountinfo`.
pub fn mountinfo() -> io::Result<Vec<MountInfo>> {
    let text = std::fs::read("/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text))
}

/// Parses mountinfo text (see proc(5)); malformed lines are skipped.
pub fn parse_mountinfo(text: &[u8]) -> Vec<MountInfo> {
    let mut out = Vec::new();
    for line in text.split(|b| *b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == b"-") else {
            continue;
        };
        if fields.len() < sep + 3 || sep < 5 {
            continue;
        }
        let num = |b: &[u8]| std::str::from_utf8(b).ok()?.parse::<u64>().ok();
        let (Some(mount_id), Some(parent_id)) = (num(fields[0]), num(fields[1])) else {
            continue;
        };
        out.push(MountInfo {
            mount_id,
            parent_id,
            mount_point: PathBuf::from(OsString::from_vec(unescape(fields[4]))),
            fstype: String::from_utf8_lossy(&unescape(fields[sep + 1])).into_owned(),
            source: String::from_utf8_lossy(&unescape(fields[sep + 2])).into_owned(),
        });
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 4 <= field.len() {
            let oct = &field[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = (oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0');
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// The topmost mount whose mount point is exactly `path` (the one a path lookup reaches).
pub fn top_mount_at(path: &Path) -> io::Result<Option<MountInfo>> {
    let all = mountinfo()?;
    Ok(top_of(&all, path))
}

/// Among `all`, the mount at `path` that no other mount at `path` is stacked on.
pub fn top_of(all: &[MountInfo], path: &Path) -> Option<MountInfo> {
    let at: Vec<&MountInfo> = all.iter().filter(|m| m.mount_point == path).collect();
    at.iter()
        .find(|m| !at.iter().any(|o| o.parent_id == m.mount_id))
        .map(|m| (*m).clone())
}

/// Detaches the mount at `path` with umount2(2). With `lazy`, uses MNT_DETACH
/// (works for a dead FUSE mount whose daemon is gone).
pub fn unmount(path: &Path, lazy: bool) -> io::Result<()> {
    let target = cstring(path.as_os_str().as_bytes())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `target` is a valid NUL-terminated string.
    let rc = unsafe { libc::umount2(target.as_ptr(), flags) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unmounts `path` only if the top mount there is a FUSE mount of `subtype`
/// whose source is `fsname` (when given). Returns Ok(false) when the top mount is
/// something else, so a caller can never take away the filesystem underneath.
pub fn unmount_if_ours(path: &Path, subtype: &str, fsname: Option<&str>, lazy: bool) -> io::Result<bool> {
    match top_mount_at(path)? {
        Some(m) if m.is_fuse_subtype(subtype) && fsname.is_none_or(|f| m.source == f) => {
            unmount(path, lazy)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Canonical absolute form of a path for mountinfo comparisons, without
/// following a final component that may be a dead FUSE mount (stat on it fails
/// with ENOTCONN): the parent is canonicalized, the last name appended.
pub fn absolute_mount_path(path: &Path) -> io::Result<PathBuf> {
    if let Ok(p) = std::fs::canonicalize(path) {
        return Ok(p);
    }
    let name: &OsStr = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no final component"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(std::fs::canonicalize(parent)?.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_unescapes_mountinfo() {
        let text = b"22 1 0:21 / /mnt/a\\040b rw,relatime shared:1 - fuse.efscache efscache:/x rw\n\
                     23 22 0:22 / /mnt/a\\040b rw - fuse.efscache efscache:/y rw\n\
                     bogus line\n";
        let all = parse_mountinfo(text);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(all[0].fstype, "fuse.efscache");
        let top = top_of(&all, Path::new("/mnt/a b")).unwrap();
        assert_eq!(top.mount_id, 23);
        assert_eq!(top.source, "efscache:/y");
    }
}
