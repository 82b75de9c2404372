//! The backend: the directory efscache caches (the EFS mount), reached only
//! through `*at()` calls relative to a root fd opened before the mount.
//!
//! This module owns the typed interface (`Backend`), backend paths
//! (`RelPath`: components below the root, never `..`), the attributes read
//! from the backend (`Stat`), and the per-kind operation counters that
//! `efscache status` reports. The syscalls themselves live in `posix`.

pub mod fault;
pub mod posix;

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};

pub use posix::PosixBackend;

/// A path below the backend root, as components. Empty means the root itself.
/// Components are single names: never empty, never `.` or `..`, never containing `/`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct RelPath(pub Vec<OsString>);

impl RelPath {
    pub fn root() -> Self {
        RelPath(Vec::new())
    }
    pub fn join(&self, name: &OsStr) -> Self {
        let mut v = self.0.clone();
        v.push(name.to_owned());
        RelPath(v)
    }
    /// The parent path and final name; None for the root.
    pub fn split_last(&self) -> Option<(RelPath, &OsStr)> {
        let (last, rest) = self.0.split_last()?;
        Some((RelPath(rest.to_vec()), last.as_os_str()))
    }
    /// For messages: `a/b/c` with non-UTF-8 bytes escaped.
    pub fn display(&self) -> String {
        if self.0.is_empty() {
            return ".".into();
        }
        let mut s = String::new();
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                s.push('/');
            }
            s.push_str(&String::from_utf8_lossy(c.as_bytes()).escape_debug().to_string());
        }
        s
    }
}

/// Kinds of backend objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return None,
        })
    }
    pub fn type_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
        }
    }
}

/// A timestamp with nanoseconds, as stat(2) reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

impl Timespec {
    pub fn to_system_time(self) -> std::time::SystemTime {
        let epoch = std::time::UNIX_EPOCH;
        if self.sec >= 0 {
            epoch + std::time::Duration::new(self.sec as u64, self.nsec)
        } else {
            epoch - std::time::Duration::new(self.sec.unsigned_abs(), 0) + std::time::Duration::new(0, self.nsec)
        }
    }

    /// This time as a backend that keeps times to `granularity_ns`
    /// nanoseconds stores it.
    pub fn truncated(self, granularity_ns: u32) -> Timespec {
        let g = granularity_ns.max(1);
        Timespec {
            sec: self.sec,
            nsec: self.nsec / g * g,
        }
    }

    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        }
    }
}

/// A backend file as this mount last knew it: its inode number, and the
/// version of its content (`content_version`; 0: unknown). A publish or
/// unlink checks both just before it replaces or removes the file, so a file
/// another client replaced (new inode) or rewrote in place (same inode, new
/// size or mtime) is not overwritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Known {
    pub ino: u64,
    pub version: u64,
}

impl Known {
    /// Only the inode number is known.
    pub fn ino(ino: u64) -> Known {
        Known { ino, version: 0 }
    }

    /// Whether `st` may be the file this mount knew: the same inode, and the
    /// same content version where both are known.
    pub fn matches(&self, st: &Stat) -> bool {
        let v = st.content_version();
        st.ino == self.ino && (self.version == 0 || v == 0 || v == self.version)
    }
}

/// A fingerprint (never 0) of a file's size and mtime: what any write
/// changes. `mtime` must be at the backend's time granularity (as stat(2)
/// reports it there). Stable across versions of efscache: the journal keeps it.
pub fn content_version(size: u64, mtime: Timespec) -> u64 {
    // splitmix64 over the three fields.
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let h = mix(mix(mix(size) ^ mtime.sec as u64) ^ u64::from(mtime.nsec));
    h.max(1)
}

/// What efscache needs to know about a backend object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (no type bits).
    pub perm: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
}

impl Stat {
    /// See `content_version` (0 for anything but a regular file: only files
    /// are rewritten in place).
    pub fn content_version(&self) -> u64 {
        if self.kind == Kind::File {
            content_version(self.size, self.mtime)
        } else {
            0
        }
    }

    pub fn known(&self) -> Known {
        Known {
            ino: self.ino,
            version: self.content_version(),
        }
    }
}

/// Attributes applied to an object on the backend after it was created.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttrSet {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<Timespec>,
    pub mtime: Option<Timespec>,
}

impl AttrSet {
    /// Takes the fields `newer` has.
    pub fn merge(&mut self, newer: &AttrSet) {
        self.perm = newer.perm.or(self.perm);
        self.uid = newer.uid.or(self.uid);
        self.gid = newer.gid.or(self.gid);
        self.atime = newer.atime.or(self.atime);
        self.mtime = newer.mtime.or(self.mtime);
    }

    pub fn is_empty(&self) -> bool {
        *self == AttrSet::default()
    }
}

/// Backend statfs figures, passed through to `df`.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// The operations efscache performs on the backend. Every path is relative to
/// the backend root and resolved without following symlinks or leaving the root.
pub trait Backend: Send + Sync {
    /// The names in a directory (one sweep; `.` and `..` excluded).
    fn list_names(&self, dir: &RelPath) -> io::Result<Vec<OsString>>;
    /// lstat of one object.
    fn stat(&self, path: &RelPath) -> io::Result<Stat>;
    /// `stat` answered by the server, not from the client's attribute cache
    /// (the check before replacing or removing a file another client may
    /// have changed; an NFS client may trust cached attributes for a
    /// minute).
    fn stat_fresh(&self, path: &RelPath) -> io::Result<Stat> {
        self.stat(path)
    }
    fn read_link(&self, path: &RelPath) -> io::Result<OsString>;
    fn open_read(&self, path: &RelPath) -> io::Result<File>;
    fn statfs(&self) -> io::Result<StatFs>;

    /// Creates `dir/name` exclusively with `perm` and returns it open for writing.
    fn create_exclusive(&self, dir: &RelPath, name: &OsStr, perm: u32) -> io::Result<File>;
    fn mkdir(&self, path: &RelPath, perm: u32) -> io::Result<()>;
    fn rmdir(&self, path: &RelPath) -> io::Result<()>;
    fn unlink(&self, path: &RelPath) -> io::Result<()>;
    /// A plain rename(2): NFS refuses every rename flag (the Linux client
    /// answers EINVAL without asking the server), so `RENAME_NOREPLACE` is
    /// checked in the overlay and never sent.
    fn rename(&self, from: &RelPath, to: &RelPath) -> io::Result<()>;
    fn symlink(&self, target: &OsStr, path: &RelPath) -> io::Result<()>;
    fn link(&self, existing: &RelPath, new: &RelPath) -> io::Result<()>;
    fn mknod(&self, path: &RelPath, kind: Kind, perm: u32, rdev: u64) -> io::Result<()>;
    /// Applies owner, mode and times to an object (not following a symlink;
    /// callers leave `perm` unset for symlinks, whose mode cannot change).
    /// With `fresh` (the object was just created by efscache), owner changes to
    /// the daemon's own ids are skipped: the object already has them.
    fn set_attrs(&self, path: &RelPath, attrs: &AttrSet, fresh: bool) -> io::Result<()>;
    /// Attributes of a file efscache just created (NFS answers from the
    /// attributes that came back with the create).
    fn stat_file(&self, file: &File) -> io::Result<Stat>;
    /// Applies owner, mode and times through an open fd (saves a path walk).
    fn set_attrs_fd(&self, file: &File, attrs: &AttrSet) -> io::Result<()>;
    /// Reads from a file opened with `open_read` until `buf` is full or end of file.
    fn read_at(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// `lseek(SEEK_DATA|SEEK_HOLE)` on a file opened with `open_read`.
    fn seek_hole_data(&self, file: &File, offset: i64, whence: i32) -> io::Result<i64>;
    /// Writes all of `data` at `offset` into a file created by `create_exclusive`.
    fn write_at(&self, file: &File, data: &[u8], offset: u64) -> io::Result<()>;
    fn set_len(&self, file: &File, len: u64) -> io::Result<()>;
    /// Closes a written file (NFS commits its data here and reports write errors).
    fn close_file(&self, file: File) -> io::Result<()>;
    /// Every extended attribute of an object (not following a symlink).
    /// Backends without extended attributes answer `EOPNOTSUPP`.
    fn list_xattrs(&self, _path: &RelPath) -> io::Result<Vec<(OsString, Vec<u8>)>> {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    /// Sets (`Some`) or removes (`None`; absent is fine) one extended
    /// attribute of an object (not following a symlink).
    fn set_xattr(&self, _path: &RelPath, _name: &OsStr, _value: Option<&[u8]>) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    /// Sets one extended attribute through an fd from `create_exclusive`.
    fn set_xattr_fd(&self, _file: &File, _name: &OsStr, _value: &[u8]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    /// Counters of the requests made so far.
    fn stats(&self) -> &BackendStats;
}

macro_rules! op_kinds {
    ($($name:ident),* $(,)?) => {
        /// Kinds of backend requests, as counted for `efscache status`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[allow(non_camel_case_types)]
        pub enum OpKind { $($name),* }
        impl OpKind {
            pub const ALL: &'static [OpKind] = &[$(OpKind::$name),*];
            pub fn name(self) -> &'static str {
                match self { $(OpKind::$name => stringify!($name)),* }
            }
        }
    };
}
op_kinds!(
    readdir,
    stat,
    readlink,
    open,
    read,
    statfs,
    create,
    write,
    close,
    mkdir,
    rmdir,
    unlink,
    rename,
    symlink,
    link,
    mknod,
    chown,
    chmod,
    utimens,
    truncate,
    listxattr,
    getxattr,
    setxattr,
    removexattr,
);

const _: () = assert!(OpKind::ALL.len() == 24, "BackendStats::counts has one slot per kind");

/// Per-kind request counters (lock-free; read by `status`).
#[derive(Debug, Default)]
pub struct BackendStats {
    counts: [AtomicU64; 24],
    bytes_written: AtomicU64,
    bytes_read: AtomicU64,
}

impl BackendStats {
    pub fn count(&self, kind: OpKind) {
        self.counts[kind as usize].fetch_add(1, Ordering::Relaxed);
    }
    pub fn add_written(&self, n: u64) {
        self.bytes_written.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_read(&self, n: u64) {
        self.bytes_read.fetch_add(n, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> BackendCounts {
        BackendCounts {
            ops: OpKind::ALL
                .iter()
                .map(|k| (k.name().to_string(), self.counts[*k as usize].load(Ordering::Relaxed)))
                .collect(),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
        }
    }
}

/// A point-in-time copy of the counters.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct BackendCounts {
    pub ops: std::collections::BTreeMap<String, u64>,
    pub bytes_written: u64,
    pub bytes_read: u64,
}

impl BackendCounts {
    pub fn total(&self) -> u64 {
        self.ops.values().sum()
    }
    pub fn get(&self, kind: &str) -> u64 {
        self.ops.get(kind).copied().unwrap_or(0)
    }
}

/// Validates one name component for use in a backend path.
pub fn valid_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    !b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/') && !b.contains(&0)
}

/// EFS's limits (AWS, Amazon EFS User Guide, "Troubleshooting file operation
/// errors": "You can have up to 177 hard links in a file", "A symlink can be
/// up to 4080 bytes in size"). The mount refuses what would exceed them at
/// the syscall (EMLINK, ENAMETOOLONG) instead of accepting a change that
/// would fail for good in the flush.
pub const EFS_MAX_LINKS: usize = 177;
pub const EFS_MAX_SYMLINK: usize = 4080;

/// A name the Linux NFS client gave a file unlinked or renamed over while
/// still open on this host (`nfs_sillyrename`: `.nfs`, 16 hex digits of the
/// file id, 8 of a counter). It goes away at the file's last close, and
/// until then it keeps its directory from being removed.
pub fn is_nfs_silly_name(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.len() == 28 && b.starts_with(b".nfs") && b[4..].iter().all(u8::is_ascii_hexdigit)
}

/// What the backend accepts, probed once at mount: a refused kind of object
/// then fails at the syscall through the mount, with the backend's errno,
/// instead of later in the flush.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Capabilities {
    /// errno the backend refuses block/char device nodes with (EFS: EPERM).
    pub devices_refused: Option<i32>,
    pub fifos_refused: Option<i32>,
    pub sockets_refused: Option<i32>,
    /// Extended attribute namespaces both the backend and the cache disk
    /// accept; names in any other namespace fail with `EOPNOTSUPP` at the
    /// syscall.
    pub xattrs: XattrCaps,
    /// The backend keeps file times to this many nanoseconds (None: not
    /// found out), so this mount knows the mtime a publish leaves there.
    pub time_granularity_ns: Option<u32>,
}

/// Which extended attribute namespaces are usable (see `crate::xattr::Class`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct XattrCaps {
    pub user: bool,
    pub trusted: bool,
    pub security: bool,
    /// POSIX ACLs (`system.posix_acl_access`/`_default`).
    pub acls: bool,
}

impl XattrCaps {
    pub fn allows(&self, class: crate::xattr::Class) -> bool {
        use crate::xattr::Class;
        match class {
            Class::User => self.user,
            Class::Trusted => self.trusted,
            Class::Security => self.security,
            Class::Acl => self.acls,
            Class::Unsupported => false,
        }
    }
    /// Whether any namespace is usable.
    pub fn any(&self) -> bool {
        self.user || self.trusted || self.security || self.acls
    }
    pub fn intersect(self, o: XattrCaps) -> XattrCaps {
        XattrCaps {
            user: self.user && o.user,
            trusted: self.trusted && o.trusted,
            security: self.security && o.security,
            acls: self.acls && o.acls,
        }
    }

    /// Tries one name of each namespace with `set` (on a scratch file).
    /// Only a success counts: a namespace that fails for any reason is
    /// refused at the syscall rather than accepted and lost in the flush.
    pub fn probe(mut set: impl FnMut(&OsStr, &[u8]) -> io::Result<()>) -> XattrCaps {
        let mut ok = |name: &str, value: &[u8]| match set(OsStr::new(name), value) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(name, error = %e, "extended attribute namespace refused");
                false
            }
        };
        XattrCaps {
            user: ok("user.efscache.probe", b"1"),
            trusted: ok("trusted.efscache.probe", b"1"),
            security: ok("security.efscache.probe", b"1"),
            acls: ok(
                crate::xattr::ACL_ACCESS,
                &crate::xattr::Acl::from_mode(0o600).to_bytes(),
            ),
        }
    }
}

/// Sets a file's mtime with every nanosecond digit non-zero and reads it
/// back: how many nanoseconds the backend keeps (1, 10, ..., 10^9), or None
/// when it does something else with them (rounds) or the probe fails.
fn probe_time_granularity(backend: &dyn Backend, f: &File) -> Option<u32> {
    let probe = Timespec {
        sec: 1_000_000_000,
        nsec: 123_456_789,
    };
    let times = AttrSet {
        atime: Some(probe),
        mtime: Some(probe),
        ..Default::default()
    };
    let kept = backend
        .set_attrs_fd(f, &times)
        .and_then(|()| backend.stat_file(f))
        .map(|st| st.mtime);
    let found = (0..=9)
        .map(|e| 10u32.pow(e))
        .find(|g| kept.as_ref().is_ok_and(|t| *t == probe.truncated(*g)));
    if found.is_none() {
        tracing::debug!(
            ?kept,
            "backend time granularity unknown: in-place changes by other clients to files this mount published are not detected"
        );
    }
    found
}

impl Capabilities {
    /// The errno to refuse `kind` with, if the backend refuses it.
    pub fn refuses(&self, kind: Kind) -> Option<i32> {
        match kind {
            Kind::CharDev | Kind::BlockDev => self.devices_refused,
            Kind::Fifo => self.fifos_refused,
            Kind::Socket => self.sockets_refused,
            Kind::File | Kind::Dir | Kind::Symlink => None,
        }
    }

    /// Creates (and removes, with `remove`) one object of each special kind
    /// under a temp name in the backend root. Only a definite refusal
    /// counts: any other error (no write access to the root, an outage)
    /// leaves the kind allowed, and the flush reports what fails.
    pub fn probe(backend: &dyn Backend, temp_name: impl Fn() -> OsString, remove: impl Fn(RelPath)) -> Capabilities {
        let try_kind = |kind: Kind, rdev: u64| {
            let path = RelPath::root().join(&temp_name());
            let made = backend.mknod(&path, kind, 0o600, rdev);
            if !matches!(&made, Err(e) if e.raw_os_error() == Some(libc::EEXIST)) {
                remove(path); // (an error may come after the object was made)
            }
            match made {
                Ok(()) => None,
                Err(e) => match e.raw_os_error() {
                    Some(n @ (libc::EPERM | libc::EOPNOTSUPP | libc::EINVAL)) => Some(n),
                    // The kernel's ENOTSUPP and EBADTYPE, which the Linux NFS
                    // client passes on for a server's NFS4ERR_NOTSUPP and
                    // NFS4ERR_BADTYPE (EFS does not document which it returns
                    // for a device node); applications get EOPNOTSUPP.
                    Some(524 | 527) => Some(libc::EOPNOTSUPP),
                    _ => {
                        tracing::debug!(?kind, error = %e, "backend probe inconclusive");
                        None
                    }
                },
            }
        };
        let root_before = backend.stat(&RelPath::root());
        // Extended attributes and time granularity, on one probe file.
        let (xattrs, time_granularity_ns) = {
            let name = temp_name();
            let (caps, granularity, ours) = match backend.create_exclusive(&RelPath::root(), &name, 0o600) {
                Ok(f) => {
                    let caps = XattrCaps::probe(|n, v| backend.set_xattr_fd(&f, n, v));
                    let granularity = probe_time_granularity(backend, &f);
                    let _ = backend.close_file(f);
                    (caps, granularity, true)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot probe the backend's extended attributes: refusing them");
                    // (An error may come after the file was made.)
                    (XattrCaps::default(), None, e.raw_os_error() != Some(libc::EEXIST))
                }
            };
            if ours {
                remove(RelPath::root().join(&name));
            }
            (caps, granularity)
        };
        let caps = Capabilities {
            devices_refused: try_kind(Kind::CharDev, libc::makedev(1, 3)),
            fifos_refused: try_kind(Kind::Fifo, 0),
            sockets_refused: try_kind(Kind::Socket, 0),
            xattrs,
            time_granularity_ns,
        };
        // The probe changed the root's times: put them back (the overlay
        // already holds them, and the root is the user's directory).
        if let Ok(st) = root_before {
            let times = AttrSet {
                atime: Some(st.atime),
                mtime: Some(st.mtime),
                ..Default::default()
            };
            if let Err(e) = backend.set_attrs(&RelPath::root(), &times, false) {
                tracing::debug!(error = %e, "cannot restore the backend root's times after the probe");
            }
        }
        tracing::info!(?caps, "backend capabilities");
        caps
    }
}
