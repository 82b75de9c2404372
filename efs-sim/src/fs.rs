//! The FUSE filesystem: a passthrough over the backing directory in which every
//! request costs what it would cost on EFS.
//!
//! [`EfsSim`] implements `fuser::Filesystem`. Each handler copies what it needs
//! out of the request, picks the request's cost ([`Plan`]) and queues a job on
//! the worker [`Pool`]. The worker waits its turn (stall, ops/s cap, directory
//! gate), sleeps the latency, pays for the bytes on the wire, then either
//! injects a fault or does the real syscall, records the outcome and replies
//! from its own thread. Many requests are in flight at once, so 64 parallel
//! stats cost about one latency, not 64. A lookup waits its latency only once
//! it knows its answer: a miss is answered at once and paid for by the
//! caller's next request, unless that request creates the name (the kernel's
//! lookup before a create, which an NFS client does not send; see
//! [`Core::settle`]). Reply payloads and attribute conversion live in `reply`.
//!
//! Permissions are checked by the server, as on NFS: the mount has no
//! `default_permissions`, and each request runs with its caller's filesystem
//! credentials (fsuid, fsgid, supplementary groups: what AUTH_SYS carries;
//! `sys::Caller`), so the backing filesystem decides, and new entries belong
//! to the caller. (With `default_permissions` the kernel would re-fetch a
//! directory's attributes after every change in it, to check the next access:
//! requests an NFS client does not send, since its replies carry the
//! directory's new attributes.) Root callers run as the server, as on an NFS
//! export without root squashing.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;

use crate::faults::{FaultConfig, Faults};
use crate::inodes::{Inode, Inodes};
use crate::limits::{DirGates, Pacer};
use crate::pool::Pool;
use crate::profile::{Class, Costs, ProfileName, Refusals};
use crate::reply::{Entry, Listing, PlusReply, Replier, file_attr, timespec_of, xattr_answer};
use crate::stats::{OpKind, Outcome, Stats};
use crate::sys::{self, Caller};

/// Largest write the kernel may send in one request.
const MAX_WRITE: u32 = 1024 * 1024;

/// Everything the emulator is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub profile: ProfileName,
    pub costs: Costs,
    pub refusals: Refusals,
    pub faults: FaultConfig,
    /// Where `--stats-file` lives (also written on a crash).
    pub stats_file: Option<PathBuf>,
    /// `--max-inode-fds` (None: half the open files limit).
    pub max_inode_fds: Option<usize>,
}

/// An open file.
struct OpenFile {
    file: OwnedFd,
    /// Written since the last commit (flush/fsync): the next one pays commit latency.
    dirty: AtomicBool,
}

/// An open directory: a listing snapshot taken at offset 0, read by offset.
struct DirHandle {
    inode: Arc<Inode>,
    entries: Mutex<Arc<Vec<sys::DirEntry>>>,
}

/// State shared by the event loops and the workers.
pub struct Core {
    pub(crate) inodes: Inodes,
    proc_fd: OwnedFd,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
    costs: Costs,
    refusals: Refusals,
    stats: Arc<Stats>,
    faults: Faults,
    ops_pacer: Pacer,
    wire: Pacer,
    gates: DirGates,
    /// Inodes whose attributes an NFS client would hold fresh from a recent
    /// reply, until when (see [`Core::note_fresh`]).
    fresh: Mutex<HashMap<u64, Instant>>,
    /// Per caller (thread id), the lookup that last answered it ENOENT,
    /// whose latency it has not paid yet (see [`Core::settle`]).
    owed: Mutex<HashMap<u32, Owed>>,
    stats_file: Option<PathBuf>,
}

/// What a request costs and which directories it changes.
struct Plan {
    kind: OpKind,
    class: Class,
    /// Bytes on the wire (reads and writes).
    bytes: u64,
    /// Parent directories whose namespace the request changes.
    dirs: Vec<u64>,
    /// Inodes whose attributes a successful reply would carry back to an NFS
    /// client (post-operation attributes): the changed directories, or the
    /// file written to.
    post_op: Vec<u64>,
    /// The name this request creates or renames onto (parent, name).
    makes: Option<(u64, OsString)>,
    /// The name a lookup looks for (parent, name).
    looks_up: Option<(u64, OsString)>,
}

/// A lookup that found nothing, answered at once: its caller pays its
/// latency with its next request, unless that request creates the name.
struct Owed {
    parent: u64,
    name: OsString,
    latency: Duration,
}

impl Plan {
    fn new(kind: OpKind, class: Class) -> Plan {
        Plan {
            kind,
            class,
            bytes: 0,
            dirs: Vec::new(),
            post_op: Vec::new(),
            makes: None,
            looks_up: None,
        }
    }

    /// The request creates `name` in `parent` (or renames onto it).
    fn makes(mut self, parent: u64, name: &OsStr) -> Plan {
        self.makes = Some((parent, name.to_owned()));
        self
    }

    /// The request looks `name` up in `parent`.
    fn looks_up(mut self, parent: u64, name: &OsStr) -> Plan {
        self.looks_up = Some((parent, name.to_owned()));
        self
    }

    fn bytes(mut self, n: u64) -> Plan {
        self.bytes = n;
        self
    }

    /// The request changes these directories' namespace (and returns their
    /// new attributes).
    fn dirs(mut self, dirs: &[u64]) -> Plan {
        self.dirs = dirs.to_vec();
        self.post_op = dirs.to_vec();
        self
    }

    /// The reply carries these inodes' new attributes.
    fn post_op(mut self, node: u64) -> Plan {
        self.post_op.push(node);
        self
    }
}

/// File operations the request consumes under EFS metering: reading data or
/// metadata is one, writing data or updating metadata is five (AWS knowledge
/// center, "differences between General Purpose and Max I/O performance
/// modes"). Requests answered without a round trip consume none.
fn metered_ops(plan: &Plan) -> f64 {
    match plan.class {
        Class::Free if plan.bytes > 0 => 5.0,
        Class::Free => 0.0,
        Class::Read => 1.0,
        Class::Meta | Class::Setattr | Class::Commit => 5.0,
    }
}

/// The credentials a request comes with.
fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn time_or_now(t: Option<TimeOrNow>) -> sys::TimeSpec {
    t.map(|t| match t {
        TimeOrNow::Now => None,
        TimeOrNow::SpecificTime(st) => Some(timespec_of(st)),
    })
}

impl Core {
    fn inode(&self, nodeid: u64) -> io::Result<Arc<Inode>> {
        self.inodes.get(nodeid).ok_or_else(|| errno(libc::ESTALE))
    }

    fn file(&self, fh: u64) -> io::Result<Arc<OpenFile>> {
        self.files.lock().get(&fh).cloned().ok_or_else(|| errno(libc::EBADF))
    }

    fn entry(&self, nodeid: u64, st: &libc::stat) -> Entry {
        Entry {
            attr: file_attr(nodeid, st),
            ttl: self.costs.attr_ttl,
        }
    }

    /// Looks `name` up in `dir` and counts one kernel lookup of the result.
    pub(crate) fn lookup_entry(&self, dir: &Arc<Inode>, name: &OsStr) -> io::Result<Entry> {
        let fd = sys::open_path(dir.fd()?.as_fd(), &sys::cname(name)?)?;
        let st = sys::fstat(fd.as_fd())?;
        let inode = self.inodes.lookup(fd, &st);
        Ok(self.entry(inode.nodeid, &st))
    }

    /// After creating the object behind `fd` in `parent` as root: gives it to
    /// the caller (the group stays the directory's when the directory is
    /// set-gid), restores set-id bits chown cleared (`mode` as requested), and
    /// counts one kernel lookup.
    fn adopt_new(&self, parent: &Arc<Inode>, fd: OwnedFd, uid: u32, gid: u32, mode: Option<u32>) -> io::Result<Entry> {
        let mut st = sys::fstat(fd.as_fd())?;
        let parent_st = sys::fstat(parent.fd()?.as_fd())?;
        let gid = if parent_st.st_mode & libc::S_ISGID != 0 {
            st.st_gid
        } else {
            gid
        };
        if st.st_uid != uid || st.st_gid != gid {
            sys::chown_fd(fd.as_fd(), uid, gid)?;
            let want = mode.map(|m| m & 0o7777);
            let fmt = st.st_mode & libc::S_IFMT;
            st = sys::fstat(fd.as_fd())?;
            if let Some(want) = want
                && fmt != libc::S_IFLNK
                && fmt != libc::S_IFDIR
                && (st.st_mode & 0o7777) != want
            {
                sys::chmod_fd(self.proc_fd.as_fd(), fd.as_fd(), want)?;
                st = sys::fstat(fd.as_fd())?;
            }
        }
        let inode = self.inodes.lookup(fd, &st);
        Ok(self.entry(inode.nodeid, &st))
    }

    /// Notes that an NFS client would now hold fresh attributes of `nodes`.
    ///
    /// NFS replies to namespace changes and writes carry the post-operation
    /// attributes of the directories or file involved, so the client needs no
    /// GETATTR afterwards. FUSE replies have no room for them: the kernel drops
    /// its cached attributes and asks again. Such a getattr within the
    /// attribute TTL is answered without a round trip.
    fn note_fresh(&self, nodes: &[u64]) {
        if nodes.is_empty() || self.costs.attr_ttl.is_zero() {
            return;
        }
        let until = Instant::now() + self.costs.attr_ttl;
        let mut fresh = self.fresh.lock();
        if fresh.len() > 100_000 {
            let now = Instant::now();
            fresh.retain(|_, t| *t > now);
        }
        for &n in nodes {
            fresh.insert(n, until);
        }
    }

    /// Settles what `pid` owes for a lookup that found nothing, as the
    /// request described by `plan` arrives: returns the latency to add to it.
    ///
    /// The kernel looks a name up before it creates it (create, mkdir, mknod,
    /// symlink, link) or renames onto it; a Linux NFS client does not
    /// (`nfs_lookup` returns early for an exclusive create and for
    /// `LOOKUP_RENAME_TARGET`; an open with `O_CREAT` is one OPEN). Such a
    /// lookup is free and counted as not sent by NFS. Any other next request
    /// pays the lookup's latency: the caller, who waited for the lookup's
    /// reply before sending it, loses the same time as if the lookup had
    /// paid it (a caller that never sends another request pays nothing).
    fn settle(&self, pid: u32, plan: &Plan) -> Duration {
        let Some(owed) = self.owed.lock().remove(&pid) else {
            return Duration::ZERO;
        };
        if plan
            .makes
            .as_ref()
            .is_some_and(|(p, n)| *p == owed.parent && *n == owed.name)
        {
            self.stats.not_sent_by_nfs(OpKind::Lookup);
            return Duration::ZERO;
        }
        self.stats.round_trip(OpKind::Lookup);
        owed.latency
    }

    /// `pid`'s lookup of `name` in `parent` found nothing: it pays later.
    fn owe(&self, pid: u32, parent: u64, name: OsString, latency: Duration) {
        let mut owed = self.owed.lock();
        if owed.len() > 100_000 {
            owed.clear(); // callers that never came back; this bounds a leak
        }
        owed.insert(pid, Owed { parent, name, latency });
    }

    /// Whether the attributes of `node` would still be fresh on an NFS client.
    fn is_fresh(&self, node: u64) -> bool {
        let mut fresh = self.fresh.lock();
        match fresh.get(&node) {
            Some(t) if *t > Instant::now() => true,
            Some(_) => {
                fresh.remove(&node);
                false
            }
            None => false,
        }
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Waits until a request may be served and has "travelled": stall window,
    /// ops/s cap, directory gate, latency, bytes on the wire.
    fn admit(&self, plan: &Plan, latency: Duration) -> crate::limits::DirPermit<'_> {
        self.faults.wait_stall();
        self.ops_pacer.take(metered_ops(plan));
        let permit = self.gates.acquire(&plan.dirs);
        if !latency.is_zero() {
            std::thread::sleep(latency);
        }
        if plan.bytes > 0 {
            self.wire.take(plan.bytes as f64);
        }
        // A partition that opened while this request travelled holds it too.
        self.faults.wait_stall();
        permit
    }

    /// Exits at once, as a crashed server would leave its clients: the mount
    /// stays behind, dead (ENOTCONN), until someone unmounts it.
    fn crash(&self) -> ! {
        if let Some(path) = &self.stats_file {
            let _ = self.stats.write_json(path);
        }
        eprintln!("efs-sim: crashing as requested (--crash-after)");
        eprint!("{}", self.stats.render_text());
        // SAFETY: _exit ends the process immediately; nothing is left to unwind.
        unsafe { libc::_exit(86) }
    }
}

/// The filesystem handed to fuser.
pub struct EfsSim {
    core: Arc<Core>,
    pool: Pool,
}

impl EfsSim {
    /// Builds the filesystem over `root` (an `O_PATH` handle on the backing
    /// directory opened before mounting, so the mount never hides it).
    pub fn new(root: OwnedFd, settings: Settings, stats: Arc<Stats>) -> io::Result<EfsSim> {
        let st = sys::fstat(root.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "backing path is not a directory",
            ));
        }
        let proc_fd = sys::openat(
            // SAFETY: AT_FDCWD is a valid dirfd for the whole call.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(libc::AT_FDCWD) },
            c"/proc/self/fd",
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        let costs = settings.costs;
        let core = Core {
            // Half the descriptors for inodes, the rest for open files.
            inodes: Inodes::new(
                root,
                &st,
                settings.max_inode_fds.unwrap_or((sys::nofile_limit() / 2) as usize),
            ),
            proc_fd,
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            ops_pacer: Pacer::new(costs.ops_cap),
            wire: Pacer::new(costs.bandwidth),
            gates: DirGates::new(costs.dir_concurrency),
            fresh: Mutex::new(HashMap::new()),
            owed: Mutex::new(HashMap::new()),
            refusals: settings.refusals,
            faults: Faults::new(settings.faults),
            stats,
            stats_file: settings.stats_file,
            costs,
        };
        let pool = Pool::new(core.costs.max_inflight)?;
        Ok(EfsSim {
            core: Arc::new(core),
            pool,
        })
    }

    /// Queues one request: the worker admits it, then injects a fault or runs
    /// `work`, records the outcome and replies.
    fn submit<T, R, F>(&self, caller: Caller, plan: Plan, reply: R, work: F)
    where
        T: 'static,
        R: Replier<T>,
        F: FnOnce(&Core) -> io::Result<T> + Send + 'static,
    {
        let arrival = Instant::now();
        let arrived = self.core.faults.arrive(plan.kind);
        if arrived.crash {
            self.core.crash();
        }
        // (Here, in arrival order: a caller sends its next request only
        // after the reply to its lookup, and the lookup recorded what it owes
        // before replying.)
        let owed = if caller.pid == 0 {
            Duration::ZERO
        } else {
            self.core.settle(caller.pid, &plan)
        };
        let core = self.core.clone();
        self.pool.submit(move || {
            let latency = core.costs.latency(plan.kind, plan.class);
            // A lookup's latency waits until its answer is known: one that
            // finds nothing is answered at once and paid for later.
            let defer = plan.looks_up.is_some() && caller.pid != 0;
            let permit = core.admit(&plan, owed + if defer { Duration::ZERO } else { latency });
            if plan.class != Class::Free && !defer {
                core.stats.round_trip(plan.kind);
            }
            let result = match core.faults.inject(plan.kind, arrived.kind_seq) {
                Some(e) => Err((Errno::from_i32(e), Outcome::Injected)),
                None => match caller.assume() {
                    Ok(_as_caller) => work(&core).map_err(|e| (Errno::from(e), Outcome::Failed)),
                    Err(e) => Err((Errno::from(e), Outcome::Failed)),
                },
            };
            if defer {
                match (&result, &plan.looks_up) {
                    (Err((e, Outcome::Failed)), Some((parent, name))) if *e == Errno::ENOENT => {
                        core.owe(caller.pid, *parent, name.clone(), latency)
                    }
                    _ => {
                        core.stats.round_trip(plan.kind);
                        if !latency.is_zero() {
                            std::thread::sleep(latency);
                            // A partition that opened meanwhile holds it too.
                            core.faults.wait_stall();
                        }
                    }
                }
            }
            drop(permit);
            let outcome = match &result {
                Ok(_) => {
                    core.note_fresh(&plan.post_op);
                    Outcome::Ok
                }
                Err((_, o)) => *o,
            };
            core.stats.record(plan.kind, arrival.elapsed(), outcome, plan.bytes);
            match result {
                Ok(v) => reply.ok(v),
                Err((e, _)) => reply.err(e),
            }
        });
    }

    /// Commit class for a handle: pays commit latency only if it wrote since
    /// its last commit (NFS close-to-open); the handle counts as committed.
    fn commit_class(&self, fh: u64, otherwise: Class) -> Class {
        match self.core.files.lock().get(&fh) {
            Some(h) if h.dirty.swap(false, Ordering::AcqRel) => Class::Commit,
            _ => otherwise,
        }
    }

    fn refused_xattr<T: 'static, R: Replier<T>>(&self, kind: OpKind, reply: R) {
        // ENOSYS makes the kernel answer EOPNOTSUPP itself from now on, as the
        // NFS client does for a server without xattr support.
        self.submit(Caller::SERVER, Plan::new(kind, Class::Free), reply, |_| {
            Err(errno(libc::ENOSYS))
        });
    }
}

impl Filesystem for EfsSim {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // PARALLEL_DIROPS: without it the kernel serialises lookups in one
        // directory. DO_READDIRPLUS (always, not AUTO): listings carry
        // attributes, as NFS READDIRPLUS does, so a listing followed by stats
        // costs no lookup per entry.
        for cap in [InitFlags::FUSE_PARALLEL_DIROPS, InitFlags::FUSE_DO_READDIRPLUS] {
            if config.add_capabilities(cap).is_err() {
                tracing::warn!("kernel lacks {cap:?}");
            }
        }
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_owned();
        self.submit(
            caller(req),
            Plan::new(OpKind::Lookup, Class::Read).looks_up(parent.0, &name),
            reply,
            move |core| {
                let dir = core.inode(parent.0)?;
                core.lookup_entry(&dir, &name)
            },
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.inodes.forget(ino.0, nlookup);
        self.core.stats.record(OpKind::Forget, Duration::ZERO, Outcome::Ok, 0);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let class = if self.core.is_fresh(ino.0) {
            self.core.stats.not_sent_by_nfs(OpKind::Getattr);
            Class::Free
        } else {
            Class::Read
        };
        self.submit(caller(req), Plan::new(OpKind::Getattr, class), reply, move |core| {
            let inode = core.inode(ino.0)?;
            let st = match fh.and_then(|fh| core.file(fh.0).ok()) {
                Some(h) => sys::fstat(h.file.as_fd())?,
                None => sys::fstat(inode.fd()?.as_fd())?,
            };
            Ok(core.entry(inode.nodeid, &st))
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.submit(
            caller(req),
            Plan::new(OpKind::Setattr, Class::Setattr).post_op(ino.0),
            reply,
            move |core| {
                let inode = core.inode(ino.0)?;
                let handle = fh.and_then(|fh| core.file(fh.0).ok());
                if uid.is_some() || gid.is_some() {
                    sys::chown_fd(inode.fd()?.as_fd(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
                }
                if let Some(mode) = mode {
                    if inode.fmt == libc::S_IFLNK {
                        return Err(errno(libc::EOPNOTSUPP));
                    }
                    match &handle {
                        Some(h) => sys::fchmod(h.file.as_fd(), mode & 0o7777)?,
                        None => sys::chmod_fd(core.proc_fd.as_fd(), inode.fd()?.as_fd(), mode & 0o7777)?,
                    }
                }
                if let Some(size) = size {
                    match &handle {
                        Some(h) => {
                            sys::ftruncate(h.file.as_raw_fd(), size)?;
                            h.dirty.store(true, Ordering::Release);
                        }
                        None => sys::truncate_fd(core.proc_fd.as_fd(), inode.fd()?.as_fd(), size)?,
                    }
                }
                if atime.is_some() || mtime.is_some() {
                    sys::utimens_fd(inode.fd()?.as_fd(), time_or_now(atime), time_or_now(mtime))?;
                }
                let st = sys::fstat(inode.fd()?.as_fd())?;
                Ok(core.entry(inode.nodeid, &st))
            },
        );
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        self.submit(
            caller(req),
            Plan::new(OpKind::Readlink, Class::Read),
            reply,
            move |core| sys::readlink_fd(core.inode(ino.0)?.fd()?.as_fd()),
        );
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (name, uid, gid) = (name.to_owned(), req.uid(), req.gid());
        let refuse_devices = self.core.refusals.devices;
        self.submit(
            caller(req),
            Plan::new(OpKind::Mknod, Class::Meta)
                .dirs(&[parent.0])
                .makes(parent.0, &name),
            reply,
            move |core| {
                let fmt = mode & libc::S_IFMT;
                if refuse_devices && (fmt == libc::S_IFBLK || fmt == libc::S_IFCHR) {
                    return Err(errno(libc::EPERM));
                }
                let dir = core.inode(parent.0)?;
                let cname = sys::cname(&name)?;
                sys::mknodat(dir.fd()?.as_fd(), &cname, mode, u64::from(rdev))?;
                let fd = sys::open_path(dir.fd()?.as_fd(), &cname)?;
                core.adopt_new(&dir, fd, uid, gid, Some(mode))
            },
        );
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let (name, uid, gid) = (name.to_owned(), req.uid(), req.gid());
        self.submit(
            caller(req),
            Plan::new(OpKind::Mkdir, Class::Meta)
                .dirs(&[parent.0])
                .makes(parent.0, &name),
            reply,
            move |core| {
                let dir = core.inode(parent.0)?;
                let cname = sys::cname(&name)?;
                sys::mkdirat(dir.fd()?.as_fd(), &cname, mode & 0o7777)?;
                let fd = sys::open_path(dir.fd()?.as_fd(), &cname)?;
                core.adopt_new(&dir, fd, uid, gid, None)
            },
        );
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.submit(
            caller(req),
            Plan::new(OpKind::Unlink, Class::Meta).dirs(&[parent.0]),
            reply,
            move |core| {
                let dir = core.inode(parent.0)?;
                sys::unlinkat(dir.fd()?.as_fd(), &sys::cname(&name)?, 0)
            },
        );
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.submit(
            caller(req),
            Plan::new(OpKind::Rmdir, Class::Meta).dirs(&[parent.0]),
            reply,
            move |core| {
                let dir = core.inode(parent.0)?;
                sys::unlinkat(dir.fd()?.as_fd(), &sys::cname(&name)?, libc::AT_REMOVEDIR)
            },
        );
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let (name, uid, gid) = (link_name.to_owned(), req.uid(), req.gid());
        let target: OsString = target.as_os_str().to_owned();
        self.submit(
            caller(req),
            Plan::new(OpKind::Symlink, Class::Meta)
                .dirs(&[parent.0])
                .makes(parent.0, link_name),
            reply,
            move |core| {
                if core.refusals.efs_limits && target.len() > crate::profile::EFS_MAX_SYMLINK {
                    return Err(errno(libc::ENAMETOOLONG));
                }
                let dir = core.inode(parent.0)?;
                let cname = sys::cname(&name)?;
                sys::symlinkat(&sys::cname(&target)?, dir.fd()?.as_fd(), &cname)?;
                let fd = sys::open_path(dir.fd()?.as_fd(), &cname)?;
                core.adopt_new(&dir, fd, uid, gid, None)
            },
        );
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if self.core.refusals.rename_flags && flags.bits() != 0 {
            // The NFS client refuses these without asking the server.
            reply.error(Errno::EINVAL);
            return;
        }
        let (name, newname) = (name.to_owned(), newname.to_owned());
        self.submit(
            caller(req),
            Plan::new(OpKind::Rename, Class::Meta)
                .dirs(&[parent.0, newparent.0])
                .makes(newparent.0, &newname),
            reply,
            move |core| {
                let from = core.inode(parent.0)?;
                let to = core.inode(newparent.0)?;
                sys::renameat2(
                    from.fd()?.as_fd(),
                    &sys::cname(&name)?,
                    to.fd()?.as_fd(),
                    &sys::cname(&newname)?,
                    flags.bits(),
                )
            },
        );
    }

    fn link(&self, req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let newname = newname.to_owned();
        self.submit(
            caller(req),
            Plan::new(OpKind::Link, Class::Meta)
                .dirs(&[newparent.0])
                .makes(newparent.0, &newname),
            reply,
            move |core| {
                let inode = core.inode(ino.0)?;
                let dir = core.inode(newparent.0)?;
                if core.refusals.efs_limits
                    && sys::fstat(inode.fd()?.as_fd())?.st_nlink as u32 >= crate::profile::EFS_MAX_LINKS
                {
                    return Err(errno(libc::EMLINK));
                }
                sys::link_fd(
                    core.proc_fd.as_fd(),
                    inode.fd()?.as_fd(),
                    dir.fd()?.as_fd(),
                    &sys::cname(&newname)?,
                )?;
                core.lookup_entry(&dir, &newname)
            },
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.submit(caller(req), Plan::new(OpKind::Open, Class::Read), reply, move |core| {
            let inode = core.inode(ino.0)?;
            let file = sys::reopen(
                core.proc_fd.as_fd(),
                inode.fd()?.as_fd(),
                flags.0 & !(libc::O_DIRECT | libc::O_TRUNC),
            )?;
            let fh = core.new_fh();
            core.files.lock().insert(
                fh,
                Arc::new(OpenFile {
                    file,
                    dirty: AtomicBool::new(false),
                }),
            );
            Ok(fh)
        });
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.submit(
            caller(req),
            Plan::new(OpKind::Read, Class::Read).bytes(u64::from(size)),
            reply,
            move |core| sys::pread(core.file(fh.0)?.file.as_raw_fd(), size as usize, offset),
        );
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        self.submit(
            caller(req),
            Plan::new(OpKind::Write, Class::Free)
                .bytes(data.len() as u64)
                .post_op(ino.0),
            reply,
            move |core| {
                let h = core.file(fh.0)?;
                let n = sys::pwrite(h.file.as_raw_fd(), &data, offset)?;
                h.dirty.store(true, Ordering::Release);
                Ok(n as u32)
            },
        );
    }

    fn flush(&self, req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        let class = self.commit_class(fh.0, Class::Free);
        self.submit(caller(req), Plan::new(OpKind::Flush, class), reply, |_| Ok(()));
    }

    fn release(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The close round trip (NFSv4 CLOSE), or a commit if data is still
        // uncommitted. The handle goes now, whatever the reply will be.
        let class = self.commit_class(fh.0, Class::Read);
        self.core.files.lock().remove(&fh.0);
        self.submit(caller(req), Plan::new(OpKind::Release, class), reply, |_| Ok(()));
    }

    fn fsync(&self, req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let class = self.commit_class(fh.0, Class::Free);
        self.submit(caller(req), Plan::new(OpKind::Fsync, class), reply, |_| Ok(()));
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // NFS has no open for directories: free.
        self.submit(
            caller(req),
            Plan::new(OpKind::Opendir, Class::Free),
            reply,
            move |core| {
                let inode = core.inode(ino.0)?;
                if !inode.is_dir() {
                    return Err(errno(libc::ENOTDIR));
                }
                let fh = core.new_fh();
                core.dirs.lock().insert(
                    fh,
                    Arc::new(DirHandle {
                        inode,
                        entries: Mutex::new(Arc::new(Vec::new())),
                    }),
                );
                Ok(fh)
            },
        );
    }

    fn readdir(&self, req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        self.submit(
            caller(req),
            Plan::new(OpKind::Readdir, Class::Read),
            reply,
            move |core| core.listing(fh.0, offset),
        );
    }

    fn readdirplus(&self, req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectoryPlus) {
        let Some(dir) = self.core.dirs.lock().get(&fh.0).map(|d| d.inode.clone()) else {
            reply.error(Errno::EBADF);
            return;
        };
        let reply = PlusReply {
            reply,
            core: self.core.clone(),
            dir,
        };
        self.submit(
            caller(req),
            Plan::new(OpKind::Readdirplus, Class::Read),
            reply,
            move |core| core.listing(fh.0, offset),
        );
    }

    fn releasedir(&self, req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.core.dirs.lock().remove(&fh.0);
        self.submit(caller(req), Plan::new(OpKind::Releasedir, Class::Free), reply, |_| {
            Ok(())
        });
    }

    fn fsyncdir(&self, req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Namespace changes on EFS are already durable when they return.
        self.submit(caller(req), Plan::new(OpKind::Fsyncdir, Class::Free), reply, |_| Ok(()));
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        self.submit(
            caller(req),
            Plan::new(OpKind::Statfs, Class::Read),
            reply,
            move |core| sys::fstatvfs(core.inode(ino.0)?.fd()?.as_fd()),
        );
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if self.core.refusals.xattrs {
            return self.refused_xattr(OpKind::Setxattr, reply);
        }
        let (name, value) = (name.to_owned(), value.to_vec());
        self.submit(
            caller(req),
            Plan::new(OpKind::Setxattr, Class::Meta),
            reply,
            move |core| {
                let inode = core.inode(ino.0)?;
                sys::xattr::set(inode.fd()?.as_fd(), &sys::cname(&name)?, &value, flags)
            },
        );
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if self.core.refusals.xattrs {
            return self.refused_xattr(OpKind::Getxattr, reply);
        }
        let name = name.to_owned();
        self.submit(
            caller(req),
            Plan::new(OpKind::Getxattr, Class::Read),
            reply,
            move |core| {
                let inode = core.inode(ino.0)?;
                let (n, data) = sys::xattr::get(inode.fd()?.as_fd(), &sys::cname(&name)?, size as usize)?;
                xattr_answer(size, n, data)
            },
        );
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if self.core.refusals.xattrs {
            return self.refused_xattr(OpKind::Listxattr, reply);
        }
        self.submit(
            caller(req),
            Plan::new(OpKind::Listxattr, Class::Read),
            reply,
            move |core| {
                let inode = core.inode(ino.0)?;
                let (n, data) = sys::xattr::list(inode.fd()?.as_fd(), size as usize)?;
                xattr_answer(size, n, data)
            },
        );
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if self.core.refusals.xattrs {
            return self.refused_xattr(OpKind::Removexattr, reply);
        }
        let name = name.to_owned();
        self.submit(
            caller(req),
            Plan::new(OpKind::Removexattr, Class::Meta),
            reply,
            move |core| {
                let inode = core.inode(ino.0)?;
                sys::xattr::remove(inode.fd()?.as_fd(), &sys::cname(&name)?)
            },
        );
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // access(2) and chdir: the NFS ACCESS call, checked with the
        // caller's credentials.
        self.submit(
            caller(req),
            Plan::new(OpKind::Access, Class::Read),
            reply,
            move |core| {
                let inode = core.inode(ino.0)?;
                sys::access_fd(core.proc_fd.as_fd(), inode.fd()?.as_fd(), mask.bits())
            },
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (name, uid, gid) = (name.to_owned(), req.uid(), req.gid());
        self.submit(
            caller(req),
            Plan::new(OpKind::Create, Class::Meta)
                .dirs(&[parent.0])
                .makes(parent.0, &name),
            reply,
            move |core| {
                let dir = core.inode(parent.0)?;
                let cname = sys::cname(&name)?;
                let flags = flags & !(libc::O_DIRECT | libc::O_NOFOLLOW);
                let perm = mode & 0o7777;
                // Always create exclusively, so only a file made here is given
                // to the caller; an existing one is opened as it is.
                let (file, created) =
                    match sys::openat(dir.fd()?.as_fd(), &cname, flags | libc::O_CREAT | libc::O_EXCL, perm) {
                        Ok(f) => (f, true),
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => (
                            sys::openat(dir.fd()?.as_fd(), &cname, flags & !libc::O_CREAT, 0)?,
                            false,
                        ),
                        Err(e) => return Err(e),
                    };
                let path = sys::reopen(core.proc_fd.as_fd(), file.as_fd(), libc::O_PATH)?;
                let entry = if created {
                    core.adopt_new(&dir, path, uid, gid, Some(perm))?
                } else {
                    let st = sys::fstat(path.as_fd())?;
                    let inode = core.inodes.lookup(path, &st);
                    core.entry(inode.nodeid, &st)
                };
                let fh = core.new_fh();
                core.files.lock().insert(
                    fh,
                    Arc::new(OpenFile {
                        file,
                        dirty: AtomicBool::new(false),
                    }),
                );
                Ok((entry, fh))
            },
        );
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.submit(
            caller(req),
            Plan::new(OpKind::Fallocate, Class::Meta).post_op(ino.0),
            reply,
            move |core| {
                let h = core.file(fh.0)?;
                sys::fallocate(h.file.as_raw_fd(), mode, offset, length)?;
                h.dirty.store(true, Ordering::Release);
                Ok(())
            },
        );
    }

    fn lseek(&self, req: &Request, _ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        self.submit(caller(req), Plan::new(OpKind::Lseek, Class::Read), reply, move |core| {
            sys::lseek(core.file(fh.0)?.file.as_raw_fd(), offset, whence)
        });
    }

    fn copy_file_range(
        &self,
        req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // Server-side copy (NFSv4.2 COPY): one metadata-class round trip.
        self.submit(
            caller(req),
            Plan::new(OpKind::CopyFileRange, Class::Meta).post_op(ino_out.0),
            reply,
            move |core| {
                let src = core.file(fh_in.0)?;
                let dst = core.file(fh_out.0)?;
                let n = sys::copy_file_range(
                    src.file.as_raw_fd(),
                    offset_in,
                    dst.file.as_raw_fd(),
                    offset_out,
                    len,
                    flags.bits() as u32,
                )?;
                dst.dirty.store(true, Ordering::Release);
                Ok(u32::try_from(n).unwrap_or(u32::MAX))
            },
        );
    }
}

impl Core {
    /// The part of a directory handle's snapshot from `offset` on; offset 0
    /// takes a fresh snapshot (opendir or rewinddir).
    fn listing(&self, fh: u64, offset: u64) -> io::Result<Listing> {
        let dir = self.dirs.lock().get(&fh).cloned().ok_or_else(|| errno(libc::EBADF))?;
        let mut entries = dir.entries.lock();
        if offset == 0 {
            let mut list = sys::list_dir(dir.inode.fd()?.as_fd())?;
            for e in &mut list {
                e.ino = self.inodes.display_ino(e.ino);
            }
            *entries = Arc::new(list);
        }
        Ok(Listing {
            entries: entries.clone(),
            start: usize::try_from(offset).unwrap_or(usize::MAX).min(entries.len()),
        })
    }
}
