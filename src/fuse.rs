//! The FUSE adapter: converts each kernel request into a call on `Fs` and the
//! result into a reply or an errno. No state, no policy. Calls that need the
//! backend (`FsError::WouldBlock`) are retried on the blocking pool, so the
//! event-loop threads never wait on the backend. Only `fuse*.rs` names fuser.

pub mod session;

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::backend::{Kind, Timespec};
use crate::error::{FsError, FsResult};
use crate::fs::{AttrOut, Fs};
use crate::namespace::SetAttr;

/// Threads that run requests which wait on the backend.
pub struct BlockingPool {
    tx: crossbeam::channel::Sender<Box<dyn FnOnce() + Send>>,
}

impl BlockingPool {
    pub fn new(threads: usize) -> BlockingPool {
        let (tx, rx) = crossbeam::channel::unbounded::<Box<dyn FnOnce() + Send>>();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("efscache-io-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                })
                .expect("spawn blocking pool thread");
        }
        BlockingPool { tx }
    }
    fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        let _ = self.tx.send(Box::new(job));
    }
}

pub struct EfsFuse {
    fs: Arc<Fs>,
    pool: BlockingPool,
    backing: Arc<Backing>,
    watchdog: Arc<Watchdog>,
    entries: KernelEntries,
}

/// Tells the kernel to drop what it cached of names and files a late result
/// changed: a create, link, rename or removal, or an attribute change (a
/// truncate), that the watchdog answered EIO and that then happened after
/// all (the kernel may hold the name as missing, or as the old object, or
/// the file's old size and pages, for as long as `Fs::absence_ttl` or the
/// attribute TTL allowed).
#[derive(Clone, Default)]
pub struct KernelEntries(Arc<std::sync::OnceLock<fuser::Notifier>>);

impl KernelEntries {
    /// Set once the session exists (its notifier writes to the FUSE device).
    pub fn connect(&self, notifier: fuser::Notifier) {
        let _ = self.0.set(notifier);
    }

    fn forget(&self, parent: INodeNo, name: &OsStr) {
        if let Some(n) = self.0.get()
            // (ENOENT: the kernel had no entry for it.)
            && let Err(e) = n.inval_entry(parent, name)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::debug!(error = %e, "cannot invalidate a kernel directory entry");
        }
    }

    /// Drops the kernel's cached attributes and pages of `ino`.
    fn forget_inode(&self, ino: INodeNo) {
        if let Some(n) = self.0.get()
            && let Err(e) = n.inval_inode(ino, 0, 0)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::debug!(error = %e, "cannot invalidate a kernel inode");
        }
    }
}

/// Answers requests that waited on the backend longer than the request
/// timeout with EIO. A process whose request the daemon has read cannot be
/// killed until it gets an answer (fuser does not act on FUSE_INTERRUPT), so
/// a stalled backend must never hold a reply back for good. The late result,
/// if one ever comes, is undone and dropped.
type OnTimeout = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Watchdog {
    next: std::sync::atomic::AtomicU64,
    /// Requests on the blocking pool: their deadline and their error reply.
    waiting: parking_lot::Mutex<std::collections::HashMap<u64, (std::time::Instant, OnTimeout)>>,
}

impl Watchdog {
    fn start(timeout: std::time::Duration) -> Arc<Watchdog> {
        let w = Arc::new(Watchdog::default());
        let weak = Arc::downgrade(&w);
        let tick = (timeout / 4).clamp(std::time::Duration::from_millis(50), std::time::Duration::from_secs(1));
        std::thread::Builder::new()
            .name("efscache-watchdog".into())
            .spawn(move || {
                while let Some(w) = weak.upgrade() {
                    w.expire(std::time::Instant::now());
                    drop(w);
                    std::thread::sleep(tick);
                }
            })
            .expect("spawn watchdog thread");
        w
    }

    fn watch(&self, deadline: std::time::Instant, on_timeout: OnTimeout) -> u64 {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.waiting.lock().insert(id, (deadline, on_timeout));
        id
    }

    fn unwatch(&self, id: u64) {
        self.waiting.lock().remove(&id);
    }

    fn expire(&self, now: std::time::Instant) {
        let expired: Vec<OnTimeout> = {
            let mut w = self.waiting.lock();
            let ids: Vec<u64> = w.iter().filter(|(_, (d, _))| *d <= now).map(|(id, _)| *id).collect();
            ids.into_iter().filter_map(|id| w.remove(&id)).map(|(_, f)| f).collect()
        };
        for f in expired {
            f();
        }
    }
}

/// One kernel backing file per inode while any passthrough handle of it is
/// open (the kernel refuses two different backing files for one inode).
#[derive(Default)]
struct Backing {
    by_ino: parking_lot::Mutex<std::collections::HashMap<u64, (Arc<fuser::BackingId>, usize)>>,
    /// Passthrough handles and their inode.
    handles: parking_lot::Mutex<std::collections::HashMap<u64, u64>>,
}

impl Backing {
    /// The backing id for `ino`, registering `file` with the kernel if the
    /// inode has none yet.
    fn acquire(
        &self,
        ino: u64,
        fh: u64,
        register: impl FnOnce() -> std::io::Result<fuser::BackingId>,
    ) -> std::io::Result<Arc<fuser::BackingId>> {
        let mut map = self.by_ino.lock();
        let id = match map.get_mut(&ino) {
            Some((id, n)) => {
                *n += 1;
                id.clone()
            }
            None => {
                let id = Arc::new(register()?);
                map.insert(ino, (id.clone(), 1));
                id
            }
        };
        self.handles.lock().insert(fh, ino);
        Ok(id)
    }

    fn release(&self, fh: u64) {
        let Some(ino) = self.handles.lock().remove(&fh) else {
            return;
        };
        let mut map = self.by_ino.lock();
        if let Some((_, n)) = map.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                map.remove(&ino); // drops the BackingId: the kernel closes it
            }
        }
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn time(t: Timespec) -> SystemTime {
    t.to_system_time()
}

fn timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Timespec { sec, nsec }
        }
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

/// The entry that tells the kernel a name does not exist (node id 0).
fn no_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn file_attr(a: &AttrOut) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.attr.size,
        // Zero blocks for a non-empty file means "not known yet" (a file still
        // being written through passthrough): report it dense, never as holes.
        blocks: if a.attr.blocks == 0 && a.attr.size > 0 {
            a.attr.size.div_ceil(512)
        } else {
            a.attr.blocks
        },
        atime: time(a.attr.atime),
        mtime: time(a.attr.mtime),
        ctime: time(a.attr.ctime),
        crtime: time(a.attr.ctime),
        kind: file_type(a.kind),
        perm: a.attr.perm as u16,
        nlink: a.nlink,
        uid: a.attr.uid,
        gid: a.attr.gid,
        rdev: a.attr.rdev as u32,
        blksize: 1 << 20,
        flags: 0,
    }
}

fn time_or_now(t: Option<TimeOrNow>) -> Option<Timespec> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(st) => timespec(st),
        TimeOrNow::Now => Timespec::now(),
    })
}

impl EfsFuse {
    pub fn new(fs: Arc<Fs>, pool_threads: usize) -> EfsFuse {
        let watchdog = Watchdog::start(fs.config().request_timeout);
        EfsFuse {
            fs,
            pool: BlockingPool::new(pool_threads),
            backing: Arc::default(),
            watchdog,
            entries: KernelEntries::default(),
        }
    }

    /// See `KernelEntries`.
    pub fn kernel_entries(&self) -> KernelEntries {
        self.entries.clone()
    }

    /// Runs `op` inline; if it must wait on the backend, runs it again on the
    /// blocking pool. `done` sends the reply either way.
    fn run<T: Send + 'static, R: Send + 'static>(
        &self,
        reply: R,
        op: impl Fn(&Fs, bool) -> FsResult<T> + Send + 'static,
        done: impl FnOnce(R, FsResult<T>) + Send + 'static,
    ) {
        self.run_undoable(reply, op, done, |_, _| {});
    }

    /// `run`, for ops whose success hands the kernel something (a handle, a
    /// lookup reference): `undo` takes it back when the reply had already
    /// gone out as a timeout.
    fn run_undoable<T: Send + 'static, R: Send + 'static>(
        &self,
        reply: R,
        op: impl Fn(&Fs, bool) -> FsResult<T> + Send + 'static,
        done: impl FnOnce(R, FsResult<T>) + Send + 'static,
        undo: impl FnOnce(&Fs, T) + Send + 'static,
    ) {
        match op(&self.fs, false) {
            Err(FsError::WouldBlock) => {
                type Slot<R, D> = Arc<parking_lot::Mutex<Option<(R, D)>>>;
                let slot: Slot<R, _> = Arc::new(parking_lot::Mutex::new(Some((reply, done))));
                let timeout = self.fs.config().request_timeout;
                let on_timeout = {
                    let slot = slot.clone();
                    Box::new(move || {
                        let taken = slot.lock().take();
                        if let Some((reply, done)) = taken {
                            tracing::warn!(?timeout, "a request waited on the backend too long: answered EIO");
                            done(reply, Err(FsError::TimedOut));
                        }
                    })
                };
                let id = self.watchdog.watch(std::time::Instant::now() + timeout, on_timeout);
                let (fs, watchdog) = (self.fs.clone(), self.watchdog.clone());
                self.pool.spawn(move || {
                    if slot.lock().is_none() {
                        return; // answered (EIO) while it waited for a thread: not run
                    }
                    let r = op(&fs, true);
                    watchdog.unwatch(id);
                    let taken = slot.lock().take();
                    match (taken, r) {
                        (Some((reply, done)), r) => done(reply, r),
                        (None, Ok(v)) => undo(&fs, v),
                        (None, Err(_)) => {}
                    }
                });
            }
            r => done(reply, r),
        }
    }

    /// Creates `name` in `parent` (mknod, mkdir, symlink, link).
    fn entry(
        &self,
        reply: ReplyEntry,
        (parent, name): (INodeNo, std::ffi::OsString),
        op: impl Fn(&Fs, bool) -> FsResult<AttrOut> + Send + 'static,
    ) {
        let ttl = self.fs.kernel_ttl();
        let entries = self.entries.clone();
        self.run_undoable(
            reply,
            op,
            move |reply, r| match r {
                Ok(a) => reply.entry(&ttl, &file_attr(&a), Generation(0)),
                Err(e) => reply.error(errno(&e)),
            },
            move |fs, a| {
                fs.unlookup(a.ino);
                entries.forget(parent, &name);
            },
        );
    }

    /// Changes the names `changed` (unlink, rmdir, rename).
    fn empty(
        &self,
        reply: ReplyEmpty,
        changed: Vec<(INodeNo, std::ffi::OsString)>,
        op: impl Fn(&Fs, bool) -> FsResult<()> + Send + 'static,
    ) {
        let entries = self.entries.clone();
        self.run_undoable(
            reply,
            op,
            |reply, r| match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            },
            move |_, ()| {
                for (parent, name) in &changed {
                    entries.forget(*parent, name);
                }
            },
        );
    }
}

impl fuser::Filesystem for EfsFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // PARALLEL_DIROPS: else the kernel serialises lookups in one directory.
        // ATOMIC_O_TRUNC: open(O_TRUNC) arrives as one request, not open + setattr.
        // Not SETXATTR_EXT (fuser 0.18 panics on it), not WRITEBACK_CACHE.
        for cap in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_BIG_WRITES,
            InitFlags::FUSE_MAX_PAGES,
        ] {
            if config.add_capabilities(cap).is_err() {
                tracing::debug!(?cap, "kernel lacks FUSE capability");
            }
        }
        // Passthrough: the kernel does the data I/O of open staged files on the
        // staging file itself. It needs max_stack_depth >= 1 (fuser sends 0)
        // and excludes the kernel writeback cache, which is not requested.
        if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(1).is_ok() {
            self.fs.enable_passthrough();
            tracing::info!("FUSE passthrough enabled for staged files");
        } else {
            tracing::info!("FUSE passthrough unavailable: serving file I/O through the daemon");
        }
        // POSIX ACLs where the backend keeps them: the kernel then checks
        // permissions with them, and leaves the umask to efscache (a default
        // ACL replaces it), which keeps mode and ACLs consistent (`xattr`).
        if self.fs.capabilities().xattrs.acls {
            match config.add_capabilities(InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK) {
                Ok(()) => tracing::info!("POSIX ACLs enabled"),
                Err(e) => {
                    tracing::warn!(missing = ?e, "kernel lacks FUSE POSIX ACL support: ACLs are stored but not enforced")
                }
            }
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_owned();
        let ttl = self.fs.kernel_ttl();
        let fs = self.fs.clone();
        self.run_undoable(
            reply,
            move |fs, b| fs.lookup(parent.0, &name, b),
            move |reply, r| match r {
                Ok(a) => reply.entry(&ttl, &file_attr(&a), Generation(0)),
                // A missing name is cached by the kernel (node id 0 means
                // "none") while the listing that lacks it is trusted: rsync
                // looks up each file's final name before it exists in its
                // generator and, seconds later, in its receiver. (The
                // kernel looks up again before a create and a rename onto
                // it whatever it holds.)
                Err(e) if e.errno() == libc::ENOENT => match fs.absence_ttl(parent.0) {
                    t if t.is_zero() => reply.error(errno(&e)),
                    t => reply.entry(&t, &no_entry(), Generation(0)),
                },
                Err(e) => reply.error(errno(&e)),
            },
            |fs, a| fs.unlookup(a.ino),
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = self.fs.kernel_ttl();
        self.run(
            reply,
            move |fs, b| fs.getattr(ino.0, b),
            move |reply, r| match r {
                Ok(a) => reply.attr(&ttl, &file_attr(&a)),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ch = SetAttr {
            perm: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: time_or_now(atime),
            mtime: time_or_now(mtime),
        };
        let ttl = self.fs.kernel_ttl();
        let entries = self.entries.clone();
        self.run_undoable(
            reply,
            move |fs, b| fs.setattr(ino.0, ch.clone(), b),
            move |reply, r| match r {
                Ok(a) => reply.attr(&ttl, &file_attr(&a)),
                Err(e) => reply.error(errno(&e)),
            },
            // Made after its EIO (e.g. a truncate that waited for the
            // file's copy): the kernel still has the old size and pages.
            move |_, _| entries.forget_inode(ino),
        );
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.run(
            reply,
            move |fs, b| fs.readlink(ino.0, b),
            |reply, r| match r {
                Ok(t) => reply.data(std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str())),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let (name, uid, gid) = (name.to_owned(), req.uid(), req.gid());
        self.entry(reply, (parent, name.clone()), move |fs, b| {
            fs.mknod(parent.0, &name, mode, umask, rdev as u64, uid, gid, b)
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let (name, uid, gid) = (name.to_owned(), req.uid(), req.gid());
        self.entry(reply, (parent, name.clone()), move |fs, b| {
            fs.mkdir(parent.0, &name, mode & 0o7777, umask, uid, gid, b)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.empty(reply, vec![(parent, name.clone())], move |fs, b| {
            fs.unlink(parent.0, &name, b)
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.empty(reply, vec![(parent, name.clone())], move |fs, b| {
            fs.rmdir(parent.0, &name, b)
        });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let (name, target, uid, gid) = (
            link_name.to_owned(),
            target.as_os_str().to_owned(),
            req.uid(),
            req.gid(),
        );
        self.entry(reply, (parent, name.clone()), move |fs, b| {
            fs.symlink(parent.0, &name, &target, uid, gid, b)
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, newname) = (name.to_owned(), newname.to_owned());
        let changed = vec![(parent, name.clone()), (newparent, newname.clone())];
        self.empty(reply, changed, move |fs, b| {
            fs.rename(parent.0, &name, newparent.0, &newname, flags.bits(), b)
        });
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let newname = newname.to_owned();
        self.entry(reply, (newparent, newname.clone()), move |fs, b| {
            fs.link(ino.0, newparent.0, &newname, b)
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (fs, backing, entries) = (self.fs.clone(), self.backing.clone(), self.entries.clone());
        self.run_undoable(reply, move |fs, b| fs.open(ino.0, flags.0, b), move |reply, r| match r {
            Ok(o) => match o.backing {
                Some(file) => match backing.acquire(ino.0, o.fh, || reply.open_backing(&*file)) {
                    Ok(id) => reply.opened_passthrough(FileHandle(o.fh), FopenFlags::empty(), &id),
                    Err(e) => {
                        tracing::warn!(error = %e, "kernel refused a passthrough backing file; serving I/O instead");
                        fs.passthrough_refused(o.fh);
                        reply.opened(FileHandle(o.fh), FopenFlags::empty())
                    }
                },
                None => reply.opened(FileHandle(o.fh), FopenFlags::empty()),
            },
            Err(e) => reply.error(errno(&e)),
        },
        move |fs, o| {
            fs.release(o.fh);
            if flags.0 & libc::O_TRUNC != 0 {
                entries.forget_inode(ino); // it was cut after all
            }
        },
        );
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.run(
            reply,
            move |fs, b| fs.read(fh.0, offset, size, b),
            |reply, r| match r {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The kernel has cleared setuid/setgid already if the writer may
        // not keep them (no KILLPRIV negotiated: a setattr before the write).
        match self.fs.write_as(fh.0, offset, data, false) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Nothing to do at close: staged data is local and published later,
    /// and locks are the kernel's. ENOSYS tells the kernel to stop sending
    /// FLUSH, which saves every close(2) a round trip to this daemon.
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.backing.release(fh.0);
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.empty(reply, Vec::new(), move |fs, b| fs.fsync(fh.0, b));
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        self.run(
            reply,
            move |fs, b| fs.readdir(ino.0, offset, false, b),
            |mut reply, r| match r {
                Ok(entries) => {
                    for e in entries {
                        if reply.add(INodeNo(e.ino), e.offset, file_type(e.kind), &e.name) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, reply: ReplyDirectoryPlus) {
        let ttl = self.fs.kernel_ttl();
        let fs = self.fs.clone();
        self.run_undoable(
            reply,
            move |fs, b| fs.readdir(ino.0, offset, true, b),
            move |mut reply, r| match r {
                Ok(entries) => {
                    let mut full = false;
                    for e in entries {
                        let dots = e.offset <= 2;
                        if !full {
                            let a = e.attr.as_ref().expect("readdirplus fills attributes");
                            full = reply.add(INodeNo(e.ino), e.offset, &e.name, &ttl, &file_attr(a), Generation(0));
                        }
                        // The kernel takes no reference for entries that did not fit.
                        if full && !dots {
                            fs.unlookup(e.ino);
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(errno(&e)),
            },
            |fs, entries| {
                for e in entries.iter().filter(|e| e.offset > 2) {
                    fs.unlookup(e.ino);
                }
            },
        );
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.empty(reply, Vec::new(), move |fs, b| fs.fsyncdir(b));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.run(
            reply,
            |fs, b| fs.statfs(b),
            |reply, r| match r {
                Ok(s) => reply.statfs(
                    s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
                ),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: fuser::ReplyXattr) {
        let name = name.to_owned();
        self.run(
            reply,
            move |fs, b| fs.getxattr(ino.0, &name, b),
            move |reply, r| xattr_reply(reply, size, r),
        );
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        let privileged = req.uid() == 0;
        self.run(
            reply,
            move |fs, b| fs.listxattr(ino.0, privileged, b),
            move |reply, r| xattr_reply(reply, size, r),
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let (name, value) = (name.to_owned(), value.to_vec());
        self.empty(reply, Vec::new(), move |fs, b| {
            fs.setxattr(ino.0, &name, Some(&value), flags, b)
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_owned();
        self.empty(reply, Vec::new(), move |fs, b| fs.setxattr(ino.0, &name, None, 0, b));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.fs.fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn lseek(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: fuser::ReplyLseek) {
        self.run(
            reply,
            move |fs, b| fs.seek_hole_data(fh.0, offset, whence, b),
            |reply, r| match r {
                Ok(o) => reply.offset(o),
                Err(e) => reply.error(errno(&e)),
            },
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok(); // mounted with default_permissions: the kernel checks
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (name, uid, gid) = (name.to_owned(), req.uid(), req.gid());
        let ttl = self.fs.kernel_ttl();
        let (fs, backing) = (self.fs.clone(), self.backing.clone());
        let (entries, created) = (self.entries.clone(), name.clone());
        self.run_undoable(
            reply,
            move |fs, b| fs.create(parent.0, &name, mode & 0o7777, umask, flags, uid, gid, b),
            move |reply, r| match r {
                Ok((a, o)) => {
                    let (attr, fh) = (file_attr(&a), FileHandle(o.fh));
                    match o.backing {
                        Some(file) => match backing.acquire(a.ino, o.fh, || reply.open_backing(&*file)) {
                            Ok(id) => reply.created_passthrough(&ttl, &attr, Generation(0), fh, FopenFlags::empty(), &id),
                            Err(e) => {
                                tracing::warn!(error = %e, "kernel refused a passthrough backing file; serving I/O instead");
                                fs.passthrough_refused(o.fh);
                                reply.created(&ttl, &attr, Generation(0), fh, FopenFlags::empty())
                            }
                        },
                        None => reply.created(&ttl, &attr, Generation(0), fh, FopenFlags::empty()),
                    }
                }
                Err(e) => reply.error(errno(&e)),
            },
            move |fs, (a, o)| {
                fs.release(o.fh);
                fs.unlookup(a.ino);
                entries.forget(parent, &created);
                if flags & libc::O_TRUNC != 0 {
                    entries.forget_inode(INodeNo(a.ino)); // an existing file, cut after all
                }
            },
        );
    }
}

/// getxattr/listxattr replies: the size alone when asked for it (`size` 0),
/// ERANGE when the caller's buffer is too small.
fn xattr_reply(reply: fuser::ReplyXattr, size: u32, r: FsResult<Vec<u8>>) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(&e)),
    }
}
