//! `efscache scrub`: finds damaged-looking files and stale temp files on a
//! backend tree, and removes the temp files on request. It works on the
//! backend path itself and refuses to run through an efscache mount (the
//! overlay would show its own view, and removals would go through the daemon).
//!
//! The walk never follows a symlink and never leaves the filesystem of the
//! root: each directory is opened with `openat(O_NOFOLLOW|O_DIRECTORY)`
//! relative to its parent's fd, entries are examined with
//! `fstatat(AT_SYMLINK_NOFOLLOW)`, and a directory on another device (a mount
//! point) is skipped and reported. Directories are read in parallel by a small
//! pool (EFS answers many requests at once far better than one after another).
//! A removal is one `unlinkat` of an entry re-checked just before, so an
//! interrupted scrub leaves nothing half-done. Owns no daemon state.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::flush::TEMP_PREFIX;

/// What an entry's name says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// `.efscache.<host>.<instance>.<n>`: an efscache publish in flight, or
    /// the orphan of a daemon that died while publishing.
    EfscacheTemp,
    /// `.NAME.XXXXXX`: what rsync writes before renaming onto NAME.
    RsyncTemp,
    Other,
}

/// Classifies a directory entry name (efscache's pattern first: it is exact).
pub fn classify_name(name: &[u8]) -> NameKind {
    if is_efscache_temp(name) {
        NameKind::EfscacheTemp
    } else if is_rsync_temp(name) {
        NameKind::RsyncTemp
    } else {
        NameKind::Other
    }
}

/// `.efscache.<host>.<instance>.<n>` exactly as `flush::publish::TempNames`
/// makes them: host of ASCII letters, digits and '-' (at most 64, possibly
/// empty), instance and n in lower-case hex.
pub fn is_efscache_temp(name: &[u8]) -> bool {
    let Some(rest) = name.strip_prefix(TEMP_PREFIX.as_bytes()) else {
        return false;
    };
    let parts: Vec<&[u8]> = rest.split(|b| *b == b'.').collect();
    let [host, instance, n] = parts[..] else {
        return false;
    };
    let hex = |s: &[u8], max: usize| {
        !s.is_empty() && s.len() <= max && s.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    host.len() <= 64 && host.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-') && hex(instance, 32) && hex(n, 16)
}

/// rsync's temp name `.NAME.XXXXXX`: a leading dot, the final name, a dot and
/// exactly six letters and digits from mkstemp(3). Because a person may well
/// name a file `.notes.backup`, the six characters must also mix at least two
/// of lower case, upper case and digits, as random ones nearly always do
/// (about 1 in 90 real rsync temp names is not recognised: the safe side).
pub fn is_rsync_temp(name: &[u8]) -> bool {
    if name.len() < 9 || name[0] != b'.' {
        return false;
    }
    let (head, suffix) = name.split_at(name.len() - 6);
    let Some((b'.', orig)) = head[1..].split_last() else {
        return false;
    };
    if orig.is_empty() || !suffix.iter().all(u8::is_ascii_alphanumeric) {
        return false;
    }
    let classes = [
        suffix.iter().any(u8::is_ascii_lowercase),
        suffix.iter().any(u8::is_ascii_uppercase),
        suffix.iter().any(u8::is_ascii_digit),
    ];
    classes.iter().filter(|c| **c).count() >= 2
}

/// What to look for and what to remove.
#[derive(Debug, Clone)]
pub struct Options {
    /// A temp file counts as stale once its mtime is at least this old.
    pub older_than: Duration,
    /// ... and its ctime at least this old (a publish or an rsync sets old
    /// times on its temp file just before renaming it).
    pub min_idle: Duration,
    /// Remove stale efscache temp files.
    pub fix: bool,
    /// Remove stale rsync temp files.
    pub purge_rsync_temps: bool,
    /// An efscache cache dir whose kept copies (`lost+found/failed`) `fix`
    /// re-publishes over damaged-looking backend files of the same name.
    pub cache_dir: Option<PathBuf>,
    /// Directories read in parallel.
    pub threads: usize,
    /// The time ages are measured against.
    pub now: SystemTime,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            older_than: Duration::from_secs(86_400),
            min_idle: Duration::from_secs(600),
            fix: false,
            purge_rsync_temps: false,
            cache_dir: None,
            threads: 16,
            now: SystemTime::now(),
        }
    }
}

/// Live counters, for a progress display while the walk runs.
#[derive(Debug, Default)]
pub struct Counters {
    pub dirs: AtomicU64,
    pub files: AtomicU64,
    pub found: AtomicU64,
    pub removed: AtomicU64,
}

/// One file worth reporting.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Relative to the scrubbed root (lossy UTF-8).
    pub path: String,
    #[serde(skip)]
    pub rel: PathBuf,
    pub size: u64,
    /// Permission bits, octal.
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
    pub ctime: i64,
    /// Damaged-looking files: `mode 000`, `empty`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<&'static str>,
    /// `reported`, `removed`, `recent` (newer than --older-than), `busy`
    /// (changed within --min-idle), `changed` (changed while the scrub ran),
    /// `remove_failed`; for damaged-looking files with a copy kept by
    /// efscache (`--cache-dir`): `copy_kept` (re-published by `--fix`),
    /// `republished`, `copy_incomplete`, `copy_outdated`, `copy_in_use`,
    /// `busy`, `hard_linked`, `republish_failed`.
    pub action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A path the walk could not examine.
#[derive(Debug, Clone, Serialize)]
pub struct WalkError {
    pub path: String,
    pub error: String,
}

/// The result of a scrub (the `--json` output).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub root: PathBuf,
    pub dirs: u64,
    pub files: u64,
    /// Symlinks, devices, sockets, fifos.
    pub others: u64,
    pub damaged: Vec<Finding>,
    pub efscache_temps: Vec<Finding>,
    pub rsync_temps: Vec<Finding>,
    pub removed: u64,
    /// Directories on another filesystem, not entered.
    pub skipped_mounts: Vec<String>,
    pub errors: Vec<WalkError>,
    pub older_than_s: u64,
    pub min_idle_s: u64,
    pub fix: bool,
    pub purge_rsync_temps: bool,
}

impl Report {
    /// Temp files old enough to be stale that are still there.
    pub fn stale_left(&self) -> usize {
        self.efscache_temps
            .iter()
            .chain(&self.rsync_temps)
            .filter(|f| matches!(f.action, "reported" | "remove_failed"))
            .count()
    }

    /// 1: something could not be examined or removed; 2: findings to look
    /// at (damaged-looking files, stale temp files left); 0: nothing.
    pub fn exit_code(&self) -> i32 {
        if !self.errors.is_empty()
            || self
                .all()
                .any(|f| matches!(f.action, "remove_failed" | "republish_failed"))
        {
            1
        } else if self.damaged.iter().any(|f| f.action != "republished") || self.stale_left() > 0 {
            2
        } else {
            0
        }
    }

    fn all(&self) -> impl Iterator<Item = &Finding> {
        self.damaged.iter().chain(&self.efscache_temps).chain(&self.rsync_temps)
    }

    fn sort(&mut self) {
        for v in [&mut self.damaged, &mut self.efscache_temps, &mut self.rsync_temps] {
            v.sort_by(|a, b| a.rel.cmp(&b.rel));
        }
        self.skipped_mounts.sort();
        self.errors.sort_by(|a, b| a.path.cmp(&b.path));
    }
}

/// Refuses a root that lies on a FUSE mount of efscache (`mount_id` is the
/// mount the opened root is on).
pub fn refuse_efscache_mount(root: &Path, mount_id: u64, mounts: &[fusemount::MountInfo]) -> Result<(), String> {
    let Some(m) = mounts.iter().find(|m| m.mount_id == mount_id) else {
        return Ok(());
    };
    if !m.is_fuse_subtype(crate::fuse::session::SUBTYPE) {
        return Ok(());
    }
    let backend = m.source.strip_prefix("efscache:").unwrap_or(&m.source);
    let hint = if Path::new(backend) == m.mount_point {
        format!(
            "efscache is stacked on its backend there, so the backend is only reachable after \
             `efscache umount {}` (or mount the EFS file system a second time elsewhere, e.g. /mnt/efs-raw, and scrub that)",
            m.mount_point.display()
        )
    } else {
        format!(
            "scrub the backend {backend} instead, or unmount first (`efscache umount {}`)",
            m.mount_point.display()
        )
    };
    Err(format!(
        "{} is inside the efscache mount at {}: scrub never works through the cache; {hint}",
        root.display(),
        m.mount_point.display()
    ))
}

/// The id of the mount an open fd lives on (`mnt_id` in /proc/self/fdinfo).
fn mount_id_of(fd: &OwnedFd) -> io::Result<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    info.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no mnt_id in fdinfo"))
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn open_dir_at(parent: libc::c_int, name: &OsStr) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: parent is an open directory fd (or AT_FDCWD), c a valid C string.
    let fd = unsafe { libc::openat(parent, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn stat_at(dir: &OwnedFd, name: &OsStr) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    // SAFETY: zeroed stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: dir is an open directory fd, c a valid C string, st writable.
    let rc = unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn stat_fd(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open; st is writable.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// The entries of an open directory (without `.` and `..`), with d_type.
fn read_dir_fd(dir: &OwnedFd) -> io::Result<Vec<(OsString, u8)>> {
    // SAFETY: dup of an fd we hold; the copy is owned by the DIR stream below.
    let dup = unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: dup is an open directory fd we own; fdopendir takes it over.
    let d = unsafe { libc::fdopendir(dup) };
    if d.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so dup is still ours to close.
        unsafe { libc::close(dup) };
        return Err(e);
    }
    let mut out = Vec::new();
    let result = loop {
        // SAFETY: resetting errno to tell end-of-directory from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: d is a valid, open DIR stream used by this thread only.
        let ent = unsafe { libc::readdir64(d) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error() == Some(0) { Ok(()) } else { Err(e) };
        }
        // SAFETY: readdir returned a valid dirent whose d_name is NUL-terminated.
        let (name, kind) = unsafe { (std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()), (*ent).d_type) };
        let name = name.to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push((OsString::from_vec(name.to_vec()), kind));
    };
    // SAFETY: d is open and closed exactly once here (this closes dup).
    unsafe { libc::closedir(d) };
    result.map(|()| out)
}

fn raise_fd_limit() {
    // SAFETY: zeroed rlimit is a valid out-buffer; setrlimit within the hard limit.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

/// Scrubs the tree at `root`. Fails only if the root itself cannot be used
/// (missing, not a directory, on an efscache mount); problems below it are
/// listed in the report's `errors`.
pub fn scrub(root: &Path, opts: &Options, counters: &Counters) -> Result<Report, String> {
    let root = std::fs::canonicalize(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let root_fd = open_dir_at(libc::AT_FDCWD, root.as_os_str()).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTCONN) => format!(
            "{}: {e} (a dead efscache mount? `efscache umount` it, then scrub the backend)",
            root.display()
        ),
        _ => format!("{}: {e}", root.display()),
    })?;
    if let Ok(id) = mount_id_of(&root_fd) {
        let mounts = fusemount::mountinfo().map_err(|e| format!("cannot read mountinfo: {e}"))?;
        refuse_efscache_mount(&root, id, &mounts)?;
    }
    let root_dev = stat_fd(&root_fd)
        .map_err(|e| format!("{}: {e}", root.display()))?
        .st_dev;
    raise_fd_limit();
    let copies = match &opts.cache_dir {
        Some(c) => crate::repair::KeptCopies::load(c).map_err(|e| {
            format!(
                "cannot read the kept copies in {}: {e}",
                c.join("lost+found/failed").display()
            )
        })?,
        None => Default::default(),
    };
    let walk = Walk {
        stack: Mutex::new((
            vec![Job {
                parent: None,
                name: OsString::new(),
                rel: PathBuf::new(),
                fd: Some(root_fd),
            }],
            1,
        )),
        cv: Condvar::new(),
        root_dev,
        root: root.clone(),
        copies,
        opts,
        counters,
        out: Mutex::new(Report {
            root: root.clone(),
            older_than_s: opts.older_than.as_secs(),
            min_idle_s: opts.min_idle.as_secs(),
            fix: opts.fix,
            purge_rsync_temps: opts.purge_rsync_temps,
            ..Report::default()
        }),
    };
    std::thread::scope(|s| {
        for i in 0..opts.threads.max(1) {
            let w = &walk;
            std::thread::Builder::new()
                .name(format!("efscache-scrub-{i}"))
                .spawn_scoped(s, move || w.worker())
                .expect("spawn scrub worker");
        }
    });
    let mut report = walk.out.into_inner().expect("no worker panicked");
    report.dirs = counters.dirs.load(Ordering::Relaxed);
    report.files = counters.files.load(Ordering::Relaxed);
    report.removed = counters.removed.load(Ordering::Relaxed);
    report.sort();
    Ok(report)
}

/// A directory to read: the root (already open) or `name` inside `parent`.
struct Job {
    parent: Option<Arc<OwnedFd>>,
    name: OsString,
    rel: PathBuf,
    fd: Option<OwnedFd>,
}

struct Walk<'a> {
    /// Directories to read (taken last-in first-out, which keeps the number
    /// of open parent fds near depth × threads) and how many are queued or
    /// being read; the walk is over when that reaches 0.
    stack: Mutex<(Vec<Job>, usize)>,
    cv: Condvar,
    root_dev: u64,
    /// The root's absolute path (kept copies are found by absolute path).
    root: PathBuf,
    copies: crate::repair::KeptCopies,
    opts: &'a Options,
    counters: &'a Counters,
    out: Mutex<Report>,
}

fn lossy(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Walk<'_> {
    fn worker(&self) {
        loop {
            let job = {
                let mut g = self.stack.lock().expect("scrub stack");
                loop {
                    if let Some(j) = g.0.pop() {
                        break j;
                    }
                    if g.1 == 0 {
                        return;
                    }
                    g = self.cv.wait(g).expect("scrub stack");
                }
            };
            let children = self.read(job);
            let mut g = self.stack.lock().expect("scrub stack");
            g.1 = g.1 + children.len() - 1;
            g.0.extend(children);
            self.cv.notify_all();
        }
    }

    fn error(&self, rel: &Path, e: impl std::fmt::Display) {
        self.out.lock().expect("report").errors.push(WalkError {
            path: lossy(rel),
            error: e.to_string(),
        });
    }

    /// Reads one directory: examines its files, returns its subdirectories.
    fn read(&self, job: Job) -> Vec<Job> {
        let fd = match (job.fd, &job.parent) {
            (Some(fd), _) => fd,
            (None, Some(parent)) => match open_dir_at(parent.as_raw_fd(), &job.name) {
                Ok(fd) => fd,
                // Removed, or replaced by a symlink or a file, since it was listed.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ELOOP | libc::ENOTDIR)) => {
                    return Vec::new();
                }
                Err(e) => {
                    self.error(&job.rel, e);
                    return Vec::new();
                }
            },
            (None, None) => unreachable!("only the root job has no parent"),
        };
        match stat_fd(&fd) {
            Ok(st) if st.st_dev != self.root_dev => {
                self.out.lock().expect("report").skipped_mounts.push(lossy(&job.rel));
                return Vec::new();
            }
            Ok(_) => {}
            Err(e) => {
                self.error(&job.rel, e);
                return Vec::new();
            }
        }
        self.counters.dirs.fetch_add(1, Ordering::Relaxed);
        let entries = match read_dir_fd(&fd) {
            Ok(v) => v,
            Err(e) => {
                self.error(&job.rel, e);
                return Vec::new();
            }
        };
        let fd = Arc::new(fd);
        let mut dirs = Vec::new();
        let mut others = 0;
        for (name, kind) in entries {
            let rel = job.rel.join(&name);
            let is_dir = match kind {
                libc::DT_DIR => true,
                libc::DT_REG | libc::DT_UNKNOWN => match stat_at(&fd, &name) {
                    Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => true,
                    Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {
                        self.file(&fd, &name, rel, &st);
                        continue;
                    }
                    Ok(_) => false,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                    Err(e) => {
                        self.error(&rel, e);
                        continue;
                    }
                },
                _ => false,
            };
            if is_dir {
                dirs.push(Job {
                    parent: Some(fd.clone()),
                    name,
                    rel,
                    fd: None,
                });
            } else {
                others += 1;
            }
        }
        if others > 0 {
            self.out.lock().expect("report").others += others;
        }
        dirs
    }

    fn file(&self, dir: &OwnedFd, name: &OsStr, rel: PathBuf, st: &libc::stat) {
        self.counters.files.fetch_add(1, Ordering::Relaxed);
        let kind = match classify_name(name.as_bytes()) {
            // rsync creates its temp files with owner bits only; a look-alike
            // with group or other bits is somebody's file.
            NameKind::RsyncTemp if st.st_mode & 0o077 != 0 => NameKind::Other,
            k => k,
        };
        let mut finding = Finding {
            path: lossy(&rel),
            rel,
            size: st.st_size as u64,
            mode: format!("{:04o}", st.st_mode & 0o7777),
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: st.st_mtime,
            ctime: st.st_ctime,
            reasons: Vec::new(),
            action: "reported",
            error: None,
        };
        if kind == NameKind::Other {
            if st.st_mode & 0o7777 == 0 {
                finding.reasons.push("mode 000");
            }
            if st.st_size == 0 {
                finding.reasons.push("empty");
            }
            if !finding.reasons.is_empty() {
                self.counters.found.fetch_add(1, Ordering::Relaxed);
                self.repair(&mut finding, st);
                self.out.lock().expect("report").damaged.push(finding);
            }
            return;
        }
        self.counters.found.fetch_add(1, Ordering::Relaxed);
        let remove = match kind {
            NameKind::EfscacheTemp => self.opts.fix,
            _ => self.opts.purge_rsync_temps,
        };
        if self.age(st.st_mtime, st.st_mtime_nsec) < self.opts.older_than {
            finding.action = "recent";
        } else if self.age(st.st_ctime, st.st_ctime_nsec) < self.opts.min_idle {
            finding.action = "busy";
        } else if remove {
            match self.remove(dir, name, st) {
                Ok(true) => {
                    self.counters.removed.fetch_add(1, Ordering::Relaxed);
                    finding.action = "removed";
                }
                Ok(false) => finding.action = "changed",
                Err(e) => {
                    finding.action = "remove_failed";
                    finding.error = Some(e.to_string());
                }
            }
        }
        let mut out = self.out.lock().expect("report");
        match kind {
            NameKind::EfscacheTemp => out.efscache_temps.push(finding),
            _ => out.rsync_temps.push(finding),
        }
    }

    /// How long ago (from `opts.now`) a file time was.
    fn age(&self, sec: i64, nsec: i64) -> Duration {
        let t = UNIX_EPOCH + Duration::new(sec.max(0) as u64, nsec.clamp(0, 999_999_999) as u32);
        self.opts.now.duration_since(t).unwrap_or_default()
    }

    /// A damaged-looking file with a good copy kept by efscache: noted, and
    /// re-published with `--fix`.
    fn repair(&self, finding: &mut Finding, st: &libc::stat) {
        let abs = self.root.join(&finding.rel);
        if !self.copies.has(&abs) {
            return;
        }
        if !self.opts.fix {
            finding.action = "copy_kept";
            return;
        }
        // Being written by someone (a damaged-looking file may be one that
        // is just being created), or one of several names of a file.
        if self.age(st.st_ctime, st.st_ctime_nsec) < self.opts.min_idle {
            finding.action = "busy";
            return;
        }
        if st.st_nlink > 1 {
            finding.action = "hard_linked";
            return;
        }
        use crate::repair::Outcome;
        let found = crate::repair::Seen {
            ino: st.st_ino,
            size: st.st_size as u64,
            ctime: crate::backend::Timespec {
                sec: st.st_ctime,
                nsec: st.st_ctime_nsec as u32,
            },
        };
        finding.action = match self.copies.republish(&abs, found) {
            Some(Outcome::Republished) => "republished",
            Some(Outcome::Changed) => "changed",
            Some(Outcome::CopyOutdated) => "copy_outdated",
            Some(Outcome::CopyInUse) => "copy_in_use",
            Some(Outcome::CopyIncomplete) | None => "copy_incomplete",
            Some(Outcome::Failed(e)) => {
                finding.error = Some(e.to_string());
                "republish_failed"
            }
        };
    }

    /// Unlinks `name` if it is still the file that was examined (same inode,
    /// not changed since). Ok(false): it changed or went away; left alone.
    fn remove(&self, dir: &OwnedFd, name: &OsStr, seen: &libc::stat) -> io::Result<bool> {
        match stat_at(dir, name) {
            Ok(now)
                if now.st_ino == seen.st_ino
                    && now.st_ctime == seen.st_ctime
                    && now.st_ctime_nsec == seen.st_ctime_nsec =>
            {
                let c = cstr(name)?;
                // SAFETY: dir is an open directory fd, c a valid C string.
                if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } != 0 {
                    let e = io::Error::last_os_error();
                    return if e.raw_os_error() == Some(libc::ENOENT) {
                        Ok(false)
                    } else {
                        Err(e)
                    };
                }
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// "3d 4h", "25m", "12s".
pub fn format_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A path for a line of text: control characters escaped, so a name with a
/// newline cannot forge a line of the report.
fn show(p: &str) -> String {
    p.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// The human-readable report. At most `limit` entries per list.
pub fn render(r: &Report, now: SystemTime, limit: usize) -> String {
    let mut out = String::new();
    let age = |t: i64| {
        let at = UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
        format_age(now.duration_since(at).unwrap_or_default())
    };
    out.push_str(&format!(
        "scrubbed {}: {} directories, {} files, {} other entries\n",
        r.root.display(),
        r.dirs,
        r.files,
        r.others
    ));
    out.push_str(&format!(
        "\ndamaged-looking files: {} (mode 000 or zero bytes; an empty file is normal and looks damaged only if you did not expect it; \
         report only, unless efscache kept a good copy: see --cache-dir)\n",
        r.damaged.len()
    ));
    for f in r.damaged.iter().take(limit) {
        let repair = match f.action {
            "copy_kept" => "  [a good copy is kept: --fix re-publishes it]".to_string(),
            "republished" => "  [re-published from the kept copy]".to_string(),
            "copy_incomplete" => "  [the kept copy is incomplete: not used]".to_string(),
            "copy_outdated" => "  [changed on the backend after the copy was kept: not re-published]".to_string(),
            "copy_in_use" => "  [the copy is still staged by a running efscache: not re-published]".to_string(),
            "busy" => "  [changed within --min-idle: not re-published]".to_string(),
            "hard_linked" => "  [has other names: not re-published]".to_string(),
            "changed" => "  [changed while scrubbing: not re-published]".to_string(),
            "republish_failed" => format!("  [RE-PUBLISH FAILED: {}]", f.error.as_deref().unwrap_or("?")),
            _ => String::new(),
        };
        out.push_str(&format!(
            "  {:<16} {}  (mode {}, {} bytes, uid {} gid {}, modified {} ago){repair}\n",
            f.reasons.join(", "),
            show(&f.path),
            f.mode,
            f.size,
            f.uid,
            f.gid,
            age(f.mtime)
        ));
    }
    more(&mut out, r.damaged.len(), limit);
    let action = |f: &Finding, flag: &str| match f.action {
        "removed" => "removed".to_string(),
        "recent" => "recent (kept: newer than --older-than)".to_string(),
        "busy" => "busy (kept: changed within --min-idle)".to_string(),
        "changed" => "changed while scrubbing (kept)".to_string(),
        "remove_failed" => format!("REMOVE FAILED: {}", f.error.as_deref().unwrap_or("?")),
        _ => format!("stale (remove with {flag})"),
    };
    for (title, list, flag) in [
        (
            "efscache temp files (.efscache.<host>.<instance>.<n>)",
            &r.efscache_temps,
            "--fix",
        ),
        ("rsync temp files (.NAME.XXXXXX)", &r.rsync_temps, "--purge-rsync-temps"),
    ] {
        out.push_str(&format!("\n{title}: {}\n", list.len()));
        for f in list.iter().take(limit) {
            out.push_str(&format!(
                "  {}  {}  ({} bytes, modified {} ago)\n",
                action(f, flag),
                show(&f.path),
                f.size,
                age(f.mtime)
            ));
        }
        more(&mut out, list.len(), limit);
    }
    if r.removed > 0 {
        out.push_str(&format!("\nremoved {} temp files\n", r.removed));
    }
    let republished = r.damaged.iter().filter(|f| f.action == "republished").count();
    if republished > 0 {
        out.push_str(&format!(
            "\nre-published {republished} damaged files from copies kept by efscache\n"
        ));
    }
    if !r.skipped_mounts.is_empty() {
        out.push_str(&format!(
            "\nnot entered (other filesystems): {}\n",
            r.skipped_mounts.iter().map(|p| show(p)).collect::<Vec<_>>().join(", ")
        ));
    }
    if !r.errors.is_empty() {
        out.push_str(&format!("\nerrors: {}\n", r.errors.len()));
        for e in r.errors.iter().take(limit) {
            out.push_str(&format!("  {}: {}\n", show(&e.path), e.error));
        }
        more(&mut out, r.errors.len(), limit);
    }
    out
}

fn more(out: &mut String, n: usize, limit: usize) {
    if n > limit {
        out.push_str(&format!("  ... and {} more (--json lists all)\n", n - limit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn efscache_temp_names_match_exactly() {
        let temps = crate::flush::publish::TempNames::new("web-01.example.com", "1f2e3d4c5b6a");
        let a = temps.next();
        let b = temps.next();
        assert!(is_efscache_temp(a.as_bytes()), "{a:?}");
        assert!(is_efscache_temp(b.as_bytes()), "{b:?}");
        assert!(is_efscache_temp(b".efscache..ab.1"), "empty host");
        for not in [
            &b".efscache.host.ab"[..],
            b".efscache.host.ab.1.2",
            b".efscache.host.AB.1",
            b".efscache.host.ab.",
            b".efscache.ho st.ab.1",
            b"efscache.host.ab.1",
            b".efscache.host.ab.1~",
            b".efscache.host.xyz.1",
        ] {
            assert!(!is_efscache_temp(not), "{}", String::from_utf8_lossy(not));
        }
    }

    #[test]
    fn rsync_temp_names() {
        for yes in [
            &b".notes.txt.aB3xYz"[..],
            b".f.Zq81kP",
            b"..bashrc.a1b2c3",
            b".x.abc123",
            b".with space.QWERT1",
            b".a.b.c.AbCdEf",
        ] {
            assert!(is_rsync_temp(yes), "{}", String::from_utf8_lossy(yes));
        }
        for no in [
            &b".notes.backup"[..],
            b".a.ABCDEFG",
            b".a.ABCDE",
            b".a.BACKUP",
            b".a.123456",
            b"notes.aB3xYz",
            b"..aB3xYz",
            b".a.aB3x-z",
            b".a_aB3xYz",
        ] {
            assert!(!is_rsync_temp(no), "{}", String::from_utf8_lossy(no));
        }
        assert_eq!(classify_name(b".efscache.h.ab.1"), NameKind::EfscacheTemp);
        assert_eq!(classify_name(b".efscache.h.ab.10000a"), NameKind::EfscacheTemp);
        assert_eq!(classify_name(b".x.Ab1234"), NameKind::RsyncTemp);
        assert_eq!(classify_name(b"plain"), NameKind::Other);
    }

    #[test]
    fn refuses_only_an_efscache_mount() {
        let text = b"20 1 0:20 / / rw - ext4 /dev/sda1 rw\n\
                     30 20 0:30 / /mnt/efs rw - nfs4 fs-1:/ rw\n\
                     31 30 0:31 / /mnt/efs rw - fuse.efscache efscache:/mnt/efs rw\n\
                     32 20 0:32 / /mnt/cache rw - fuse.efscache efscache:/mnt/efs-raw rw\n";
        let all = fusemount::parse_mountinfo(text);
        let root = Path::new("/mnt/efs/x");
        assert!(refuse_efscache_mount(root, 30, &all).is_ok());
        assert!(refuse_efscache_mount(root, 20, &all).is_ok());
        assert!(refuse_efscache_mount(root, 99, &all).is_ok());
        let e = refuse_efscache_mount(root, 31, &all).unwrap_err();
        assert!(e.contains("stacked") && e.contains("efscache umount /mnt/efs"), "{e}");
        let e = refuse_efscache_mount(Path::new("/mnt/cache"), 32, &all).unwrap_err();
        assert!(e.contains("scrub the backend /mnt/efs-raw"), "{e}");
    }

    #[test]
    fn ages_read_well() {
        assert_eq!(format_age(Duration::from_secs(5)), "5s");
        assert_eq!(format_age(Duration::from_secs(125)), "2m");
        assert_eq!(format_age(Duration::from_secs(3 * 3600 + 120)), "3h 2m");
        assert_eq!(format_age(Duration::from_secs(2 * 86_400 + 3600)), "2d 1h");
        assert_eq!(show("a\nb"), "a\\nb");
    }
}
