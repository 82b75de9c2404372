//! `Fs`: the POSIX semantics of every operation, over the overlay namespace,
//! the staging area and the flush scheduler. Returns plain values or an
//! `FsError`; knows nothing of FUSE.
//!
//! Operations that may need the backend take `may_block`: when it is false and
//! the answer needs backend I/O, they return `FsError::WouldBlock` and the
//! caller retries on a thread that may block (the FUSE event loops never wait
//! on the backend).
//!
//! Lock order: `ns` before `handles` before the scheduler's state. No lock is
//! held across backend I/O.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::backend::{Backend, Kind, Known, RelPath, StatFs, Timespec};
use crate::error::{FsError, FsResult};
use crate::flush::publish::{self, Published, TempNames};
use crate::flush::{self, Action, Failure, FlushOp, Outcome, Scheduler};
use crate::journal::{Header, Journal, PendingState};
use crate::namespace::{Attr, ConflictOutcome, Content, Effects, Ino, Namespace, ROOT, SetAttr, Stamp, XattrCache};
use crate::staging::Staging;
use crate::xattr::{self, Acl, Xattrs};

/// Tunables of the filesystem core (from the mount options).
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// How long cached metadata is trusted before revalidation.
    pub attr_ttl: Duration,
    /// How long a published file's staged copy is kept (see [`Fs::linger`]).
    pub keep_clean: Duration,
    /// Trust the cache for the whole mount (no other writers).
    pub exclusive: bool,
    /// Quiet time after the last close before a file is published.
    pub debounce: Duration,
    /// fsync(2) waits for the publish to the backend (else: local disk only).
    pub fsync_remote: bool,
    /// Parallel stats when loading a directory.
    pub meta_parallel: usize,
    /// Most a request that needs the backend waits (then EIO).
    pub request_timeout: Duration,
    /// Budget for staged data (None: the cache disk's free space).
    pub cache_size: Option<u64>,
    /// Keep extended attributes where the backend has them.
    pub xattrs: bool,
}

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            attr_ttl: Duration::from_secs(30),
            keep_clean: Duration::from_secs(5),
            exclusive: false,
            debounce: Duration::from_millis(500),
            fsync_remote: false,
            meta_parallel: 64,
            request_timeout: Duration::from_secs(60),
            cache_size: None,
            xattrs: true,
        }
    }
}

/// An inode as reported to the kernel.
#[derive(Clone, Debug)]
pub struct AttrOut {
    pub ino: Ino,
    pub kind: Kind,
    pub attr: Attr,
    pub nlink: u32,
}

/// One readdir entry.
#[derive(Clone, Debug)]
pub struct DirEntryOut {
    pub ino: Ino,
    pub offset: u64,
    pub kind: Kind,
    pub name: OsString,
    /// Filled for readdirplus (and then the entry counts as a lookup).
    pub attr: Option<AttrOut>,
}

enum Handle {
    /// Staged content: all I/O on the local staging file, by the kernel
    /// directly (`passthrough`) or served by the daemon.
    Staged {
        ino: Ino,
        file: Arc<File>,
        write: bool,
        passthrough: bool,
    },
    /// Clean content read from the backend.
    Remote { ino: Ino, file: Arc<File> },
}

/// An open file handle, and the staging file the kernel should do the I/O on
/// itself (FUSE passthrough), if any.
pub struct Opened {
    pub fh: u64,
    pub backing: Option<Arc<File>>,
}

/// What `status` shows of the filesystem core.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct FsStatus {
    pub inodes: usize,
    pub dirty_files: usize,
    pub open_for_write: usize,
    pub waiting_debounce: usize,
    pub pending_bytes: u64,
    pub dirty_dirs: usize,
    /// Publish temp files on the backend whose removal failed, to be removed
    /// again (see `TempNames::remove_leftovers`).
    #[serde(default)]
    pub temps_to_remove: usize,
}

/// The result of a `sync` barrier.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SyncReport {
    pub complete: bool,
    pub failures: Vec<Failure>,
    /// Files still open for writing (their content so far is not published).
    pub open_files: Vec<String>,
}

pub struct Fs {
    ns: Mutex<Namespace>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    pub sched: Arc<Scheduler>,
    pub backend: Arc<dyn Backend>,
    staging: Staging,
    temps: TempNames,
    cfg: FsConfig,
    /// The kernel accepted FUSE passthrough for this mount.
    passthrough: std::sync::atomic::AtomicBool,
    /// Set once journaling starts (after recovery; absent in tests without one).
    journal: OnceLock<Arc<Journal>>,
    /// Writers held back because the cache budget is used up, and how many
    /// times that happened (for `status`).
    writers_waiting_for_space: AtomicU64,
    writers_throttled: AtomicU64,
    /// What the backend accepts (probed at mount; absent: everything).
    capabilities: OnceLock<crate::backend::Capabilities>,
    /// What recovery did (null: nothing to recover), for `status`.
    recovery: Mutex<serde_json::Value>,
    /// Staging files no longer needed, kept while the journal is unhealthy:
    /// it may still name them (see `discard_staging`).
    deferred_discards: Mutex<Vec<u64>>,
}

/// The debounce while writers wait for cache space: long enough for a
/// close-then-rename (rsync's temp files) to settle first.
const PRESSURE_DEBOUNCE: Duration = Duration::from_millis(20);

/// Cache use, for `status`.
#[derive(Debug, serde::Serialize)]
pub struct CacheStatus {
    pub used_bytes: u64,
    pub peak_used_bytes: u64,
    pub limit_bytes: Option<u64>,
    pub disk_available_bytes: u64,
    pub disk_low: bool,
    pub writers_waiting: u64,
    pub writers_throttled: u64,
    /// Published files whose local copy is kept a while (`keep_clean`).
    pub clean_copies: u64,
}

fn io_err(e: io::Error) -> FsError {
    FsError::Io(e)
}

impl Fs {
    pub fn new(
        backend: Arc<dyn Backend>,
        staging: Staging,
        sched: Arc<Scheduler>,
        temps: TempNames,
        cfg: FsConfig,
    ) -> FsResult<Fs> {
        let root = backend.stat(&RelPath::root()).map_err(io_err)?;
        Ok(Fs {
            ns: Mutex::new(Namespace::new(&root)),
            handles: Mutex::new(HashMap::new()),
            deferred_discards: Mutex::new(Vec::new()),
            next_fh: AtomicU64::new(1),
            sched,
            backend,
            staging,
            temps,
            cfg,
            passthrough: std::sync::atomic::AtomicBool::new(false),
            journal: OnceLock::new(),
            writers_waiting_for_space: AtomicU64::new(0),
            writers_throttled: AtomicU64::new(0),
            capabilities: OnceLock::new(),
            recovery: Mutex::new(serde_json::Value::Null),
        })
    }

    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    /// TTL for entries and attributes handed to the kernel: never longer than
    /// the daemon's own (long only in exclusive mode).
    pub fn kernel_ttl(&self) -> Duration {
        if self.cfg.exclusive {
            Duration::from_secs(3600)
        } else {
            self.cfg.attr_ttl
        }
    }

    fn attr_out(ns: &Namespace, ino: Ino) -> FsResult<AttrOut> {
        let i = ns.get(ino)?;
        Ok(AttrOut {
            ino,
            kind: i.kind,
            attr: i.attr.clone(),
            nlink: ns.nlink(ino)?,
        })
    }

    /// Applies effects of an overlay change (the caller holds the namespace
    /// lock, so this happens in the order the overlay changed): journal the
    /// ops and the pending state of every touched object, then queue the ops
    /// and drop staging files nothing refers to any more. EIO when the
    /// journal could not record it: the change is made and will be
    /// published, but a crash before that would lose it, so it must not be
    /// acknowledged (and the journal refuses changes from then on).
    fn apply(&self, ns: &mut Namespace, mut fx: Effects) -> FsResult<()> {
        let mut journaled = Ok(());
        let mut touched = std::mem::take(&mut ns.touched);
        let moved_dir = std::mem::replace(&mut ns.moved_dir, false);
        let retimed = std::mem::take(&mut ns.retimed_now);
        if let Some(j) = self.journal.get()
            && (!fx.ops.is_empty() || !touched.is_empty() || !retimed.is_empty())
        {
            let mut tx = j.begin();
            // With the op that retimes them: a replay checks what was
            // expected of them by inode number only (see `Namespace::retimed`).
            for b in retimed {
                tx.retimed(b);
            }
            for op in &mut fx.ops {
                tx.op(op);
            }
            if moved_dir {
                // Everything tracked below the moved directory has new paths
                // (objects freed since were cleared when they were freed).
                touched.extend(tx.tracked().into_iter().filter(|i| ns.get(*i).is_ok()));
            }
            touched.sort_unstable();
            touched.dedup();
            for ino in touched {
                tx.state(ino, ns.pending_state(ino), ns.pending_expect(ino));
            }
            journaled = tx.commit();
        }
        for op in fx.ops {
            self.sched.enqueue(op);
        }
        for id in fx.discard {
            self.discard_staging(id);
        }
        for (id, clean) in std::mem::take(&mut ns.clean_marks) {
            self.staging.mark_clean(id, clean);
        }
        journaled.map_err(|_| FsError::Io(io::Error::from_raw_os_error(libc::EIO)))
    }

    /// Marks `ino`'s content changed and journals it as of unknown size
    /// before its staged data is cut or extended: the size the journal
    /// holds for it (of its last close, or of its queued publish) no longer
    /// holds then, and a crash between the two must not leave a journal
    /// that takes the new length for data lost in a machine crash. The
    /// state with the new size follows once the change is made.
    fn journal_resizing(&self, ns: &mut Namespace, ino: Ino) -> FsResult<()> {
        ns.mark_dirty(ino)?;
        let Some(j) = self.journal.get() else {
            return Ok(());
        };
        let Some(mut state) = ns.pending_state(ino) else {
            return Ok(()); // removed: nothing of it is published any more
        };
        let PendingState::File { size, .. } = &mut state else {
            return Ok(());
        };
        if size.take().is_none() {
            return Ok(()); // open for writing: journaled without a size already
        }
        let mut tx = j.begin();
        tx.state(ino, Some(state), ns.pending_expect(ino));
        tx.commit().map_err(|_| {
            // Refused, but marked dirty above: still to publish at its close
            // (or now, if nobody writes it).
            if ns.get(ino).is_ok_and(|i| i.writers == 0) {
                ns.file_quiet(ino, Instant::now());
            }
            FsError::Io(io::Error::from_raw_os_error(libc::EIO))
        })
    }

    /// How long a published file's staged copy is kept, so that reopening,
    /// rewriting or reading it soon after costs no backend trip (a program
    /// that writes a file and opens it again, fio's layout-then-write). The
    /// copy is trusted like the cached attributes are: no longer than
    /// `attr_ttl`, unless the mount is exclusive. Zero: dropped at once.
    fn linger(&self) -> Duration {
        if self.cfg.exclusive {
            self.cfg.keep_clean
        } else {
            self.cfg.keep_clean.min(self.cfg.attr_ttl)
        }
    }

    /// Drops every clean copy kept after its publish (at unmount: the cache
    /// dir then holds only what is not on the backend yet).
    pub fn drop_clean_copies(&self) {
        let mut ns = self.ns.lock();
        let mut fx = Effects::default();
        ns.expire_lingering(None, &mut fx);
        let _ = self.apply(&mut ns, fx); // drops copies: nothing to acknowledge
    }

    /// Removes a staging file nothing refers to any more, once the journal
    /// says so too: while it is unhealthy its last records may still name the
    /// file (a replay after a crash needs it), so the removal waits for
    /// `reset_unhealthy_journal`.
    fn discard_staging(&self, id: u64) {
        // (Decided under the list's lock: `reset_unhealthy_journal` empties it
        // and makes the journal healthy under the same lock.)
        let mut deferred = self.deferred_discards.lock();
        if self.journal.get().is_some_and(|j| !j.healthy()) {
            deferred.push(id);
        } else {
            drop(deferred);
            self.staging.remove(id);
        }
    }

    /// At an unmount that left nothing to publish: replaces a journal that
    /// stopped at a failed write with an empty one (everything it could name
    /// is on the backend), and removes the staging files kept for it. False
    /// when the journal was healthy.
    pub fn reset_unhealthy_journal(&self) -> io::Result<bool> {
        let Some(j) = self.journal.get().filter(|j| !j.healthy()) else {
            return Ok(false);
        };
        let mut deferred = self.deferred_discards.lock();
        j.replace_with_empty()?;
        for id in std::mem::take(&mut *deferred) {
            self.staging.remove(id);
        }
        Ok(true)
    }

    /// Changes are refused once the journal cannot record them.
    fn check_journal(&self) -> FsResult<()> {
        match self.journal.get() {
            Some(j) if !j.healthy() => Err(FsError::Io(io::Error::from_raw_os_error(libc::EIO))),
            _ => Ok(()),
        }
    }

    /// Starts journaling (once, before serving): a new journal holding the
    /// pending state the overlay has now, and the ops `carried_ops` rebuilt
    /// from an earlier run's journal (they get new sequence numbers),
    /// replaces `<cache>/journal`.
    pub fn start_journal(
        &self,
        cache: &std::path::Path,
        header: Header,
        carried_ops: &mut [FlushOp],
    ) -> std::io::Result<Arc<Journal>> {
        let mut ns = self.ns.lock();
        let mut inos: Vec<Ino> = ns
            .dirty_files
            .iter()
            .chain(ns.dirty_dir_attrs.iter())
            .copied()
            .collect();
        inos.sort_unstable();
        inos.dedup();
        let states: Vec<(PendingState, Option<Known>)> = inos
            .into_iter()
            .filter_map(|i| Some((ns.pending_state(i)?, ns.pending_expect(i))))
            .collect();
        let j = Arc::new(Journal::create(cache, header, states)?);
        if !carried_ops.is_empty() || !ns.retimed_now.is_empty() {
            let mut tx = j.begin();
            // Files the replayed ops retime in place (see `apply`).
            for b in ns.retimed_now.drain(..) {
                tx.retimed(b);
            }
            for op in carried_ops.iter_mut() {
                tx.op(op);
            }
            if let Err(e) = tx.commit() {
                return Err(io::Error::other(format!(
                    "cannot write the recovered ops into the new journal: {e}"
                )));
            }
        }
        j.install(cache)?;
        ns.touched.clear();
        ns.moved_dir = false;
        let _ = self.journal.set(j.clone());
        Ok(j)
    }

    // ---- recovery -------------------------------------------------------------

    /// The overlay, for rebuilding it from a dead instance's journal before
    /// serving (`recovery`).
    pub(crate) fn namespace(&self) -> parking_lot::MutexGuard<'_, Namespace> {
        self.ns.lock()
    }

    /// What recovering the journal of an earlier run did, for `status`.
    pub fn set_recovery_report(&self, report: serde_json::Value) {
        *self.recovery.lock() = report;
    }

    /// What recovery did (null: there was nothing to recover).
    pub fn recovery_status(&self) -> serde_json::Value {
        self.recovery.lock().clone()
    }

    pub fn temp_names(&self) -> &TempNames {
        &self.temps
    }

    /// New staging ids start above `id` (files kept from an earlier run).
    pub fn reserve_staging_ids(&self, id: u64) {
        self.ns.lock().reserve_staging_ids(id);
    }

    pub fn staging(&self) -> &Staging {
        &self.staging
    }

    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.get()
    }

    /// Staging ids the overlay refers to (everything else in staging is left over).
    pub fn staging_in_use(&self) -> std::collections::HashSet<u64> {
        self.ns.lock().inodes().filter_map(|i| i.staged_id()).collect()
    }

    // ---- metadata cache -------------------------------------------------

    /// How long the kernel may take a name missing from `dir` for missing:
    /// as long as this daemon trusts its listing of `dir`, so a name another
    /// client creates shows up no later than it would in a listing. (The
    /// rsync receiver's lookup of each file's final name, seconds after its
    /// generator's, is then answered by the kernel.)
    pub fn absence_ttl(&self, dir: Ino) -> Duration {
        let ttl = self.kernel_ttl();
        if self.cfg.exclusive {
            return ttl;
        }
        let loaded = self.ns.lock().dir(dir).ok().and_then(|d| d.loaded);
        loaded.map_or(Duration::ZERO, |t| {
            self.cfg.attr_ttl.saturating_sub(t.elapsed()).min(ttl)
        })
    }

    fn fresh(&self, loaded: Option<Instant>) -> bool {
        loaded.is_some_and(|t| self.cfg.exclusive || t.elapsed() < self.cfg.attr_ttl)
    }

    /// Waits until no pending op could move `ino`'s backend path.
    fn wait_path_stable(&self, ino: Ino) -> FsResult<()> {
        if ino == ROOT {
            return Ok(());
        }
        let keys = self.ns.lock().read_keys(ino)?;
        if !self.sched.conflicts(&keys) {
            return Ok(());
        }
        let (tx, rx) = crossbeam::channel::bounded(1);
        self.sched.enqueue(FlushOp::new(keys, Action::Barrier(tx)));
        // Bounded like the request that waits (its answer is EIO by then,
        // see `fuse::Watchdog`): the thread must not wait on forever, e.g.
        // behind the publish of a file another process keeps open.
        match rx.recv_timeout(self.cfg.request_timeout) {
            Ok(()) => Ok(()),
            Err(crossbeam::channel::RecvTimeoutError::Timeout) => Err(FsError::TimedOut),
            Err(crossbeam::channel::RecvTimeoutError::Disconnected) => {
                Err(FsError::Io(io::Error::from_raw_os_error(libc::EIO)))
            }
        }
    }

    /// Makes sure `dir`'s listing is loaded and fresh.
    ///
    /// A listing during which this mount changed the directory is not merged
    /// (see below) and the directory is listed once more; when that one is
    /// overlapped too, the overlay stands until `attr_ttl`, as while changes
    /// are pending. A directory this mount keeps changing so costs at most
    /// two listings per `attr_ttl`.
    pub fn ensure_loaded(&self, dir: Ino, may_block: bool) -> FsResult<()> {
        let mut overlapped = false;
        loop {
            let Some(changes) = self.listing_needed(dir)? else {
                return Ok(());
            };
            if !may_block {
                return Err(FsError::WouldBlock);
            }
            self.wait_path_stable(dir)?;
            let path = self.ns.lock().path_of(dir)?;
            let listing = crate::meta::load_dir(&*self.backend, &path, self.cfg.meta_parallel).map_err(io_err)?;
            let mut ns = self.ns.lock();
            let big = listing.len() >= 4096;
            if ns.dir(dir)?.loaded.is_some() {
                if self.sched.dir_busy(dir) {
                    return Ok(()); // changed while we listed: keep the overlay
                }
                if ns.dir(dir)?.changes() != changes {
                    // Changed while we listed, by a change already on the
                    // backend or another reload that merged first: the
                    // listing may predate it, and merging it would drop a
                    // name just made or bring back one just removed.
                    if !overlapped {
                        overlapped = true;
                        continue;
                    }
                    ns.get_mut(dir)?.dir.as_mut().expect("dir").loaded = Some(Instant::now());
                    return Ok(());
                }
            }
            let r = ns.merge_listing(dir, listing, Instant::now());
            drop(ns);
            if big {
                // A big listing leaves freed memory in the allocator's
                // per-thread arenas; give it back so the cache's footprint
                // is what it holds.
                // SAFETY: malloc_trim has no preconditions.
                unsafe { libc::malloc_trim(0) };
            }
            return r;
        }
    }

    /// Whether `dir` must be listed from the backend: None when its listing
    /// is fresh, or when pending changes make the overlay authoritative for
    /// now; else the count of its entries' changes, taken while nothing was
    /// pending (any change from then on, even one whose ops reach the
    /// backend before the listing is back, keeps the listing from being
    /// merged).
    fn listing_needed(&self, dir: Ino) -> FsResult<Option<u64>> {
        let mut ns = self.ns.lock();
        let d = ns.dir(dir)?;
        if self.fresh(d.loaded) {
            return Ok(None);
        }
        // (Its own queued changes count too, e.g. its times, which may
        // wait behind the publish of a file still open for writing: a
        // re-listing would wait for them.)
        let own_ops_queued = || dir != ROOT && ns.read_keys(dir).is_ok_and(|k| self.sched.conflicts(&k));
        if d.loaded.is_some()
            && (self.sched.dir_busy(dir) || ns.dirs_with_unqueued_files().contains(&dir) || own_ops_queued())
        {
            // Pending changes make the overlay authoritative for now.
            ns.get_mut(dir)?.dir.as_mut().expect("dir").loaded = Some(Instant::now());
            return Ok(None);
        }
        Ok(Some(d.changes()))
    }

    // ---- lookups and attributes ------------------------------------------

    pub fn lookup(&self, parent: Ino, name: &OsStr, may_block: bool) -> FsResult<AttrOut> {
        if name.len() > 255 {
            return Err(FsError::NameTooLong);
        }
        self.ensure_loaded(parent, may_block)?;
        let mut ns = self.ns.lock();
        let ino = ns.lookup(parent, name)?.ok_or(FsError::NotFound)?;
        ns.add_lookup(ino);
        if ns.get(ino)?.writers == 0 {
            return Self::attr_out(&ns, ino);
        }
        // The kernel applies the attributes of a reply: they must include
        // what writers wrote through passthrough, past the daemon.
        drop(ns);
        self.refresh_from_staging(ino);
        Self::attr_out(&self.ns.lock(), ino)
    }

    pub fn forget(&self, ino: Ino, n: u64) {
        let mut fx = Effects::default();
        let mut ns = self.ns.lock();
        ns.forget(ino, n, &mut fx);
        let _ = self.apply(&mut ns, fx); // nothing to acknowledge (a failure is logged; the journal turns unhealthy)
    }

    pub fn getattr(&self, ino: Ino, may_block: bool) -> FsResult<AttrOut> {
        self.refresh_from_staging(ino);
        self.refresh_blocks(ino);
        let (path, stale) = {
            let ns = self.ns.lock();
            let i = ns.get(ino)?;
            let stale = !self.cfg.exclusive
                && i.kind != Kind::Dir
                && i.on_backend
                && i.content == Content::Remote
                && i.fetched.is_some_and(|t| t.elapsed() >= self.cfg.attr_ttl)
                && !i.links.is_empty();
            if !stale {
                return Self::attr_out(&ns, ino);
            }
            (ns.path_of(ino)?, stale)
        };
        if stale && !may_block {
            return Err(FsError::WouldBlock);
        }
        self.wait_path_stable(ino)?;
        let queued_before = self.sched.enqueued_total();
        let st = self.backend.stat(&path);
        let mut ns = self.ns.lock();
        if let Ok(st) = st {
            let i = ns.get_mut(ino)?;
            if i.content == Content::Remote && i.backend_ino == Some(st.ino) {
                i.attr = Attr::from_stat(&st);
                // (Settled: nothing was queued since the path was stable.)
                i.saw_backend(&st, self.sched.enqueued_total() == queued_before);
            }
            i.fetched = Some(Stamp::now());
        }
        Self::attr_out(&ns, ino)
    }

    pub fn setattr(&self, ino: Ino, ch: SetAttr, may_block: bool) -> FsResult<AttrOut> {
        self.check_journal()?;
        // The reply's attributes replace the kernel's: a writer's passthrough
        // writes (whose release may not have arrived yet: it is asynchronous)
        // must be in them, or a chmod right after a close shows size 0.
        self.refresh_from_staging(ino);
        if let Some(size) = ch.size {
            self.truncate(ino, size, may_block)?;
        }
        if ch.atime.is_some() || ch.mtime.is_some() {
            // The staging file carries the times too, set before the overlay:
            // writes through passthrough are seen through its mtime, and a
            // release arriving after the utimens must not undo it.
            let staged = self.ns.lock().get(ino)?.staged_id();
            if let Some(id) = staged {
                let mut times = std::fs::FileTimes::new();
                if let Some(t) = ch.atime {
                    times = times.set_accessed(t.to_system_time());
                }
                if let Some(t) = ch.mtime {
                    times = times.set_modified(t.to_system_time());
                }
                if let Ok(f) = self.staging.open_rw(id) {
                    f.set_times(times).map_err(io_err)?;
                }
            }
        }
        let mut fx = Effects::default();
        let mut ns = self.ns.lock();
        if let Some(perm) = ch.perm {
            self.chmod_acl(&mut ns, ino, perm)?;
        }
        ns.set_attrs(ino, &ch, &mut fx)?;
        self.apply(&mut ns, fx)?;
        Self::attr_out(&ns, ino)
    }

    fn truncate(&self, ino: Ino, size: u64, may_block: bool) -> FsResult<()> {
        {
            let ns = self.ns.lock();
            let i = ns.get(ino)?;
            match i.kind {
                Kind::Dir => return Err(FsError::IsDir),
                Kind::File => {}
                _ => return Err(FsError::Invalid),
            }
        }
        let (mut ns, staged) = loop {
            let id = self.stage(ino, size > 0, true, may_block)?;
            // Under the lock, so a publish finishing now cannot drop the staging file.
            let mut ns = self.ns.lock();
            if ns.get(ino)?.staged_id() != Some(id) {
                continue;
            }
            let f = self.staging.open_rw(id).map_err(io_err)?;
            self.journal_resizing(&mut ns, ino)?;
            f.set_len(size).map_err(io_err)?;
            self.staging.set_size(id, size);
            break (ns, f);
        };
        ns.mark_dirty(ino)?;
        let i = ns.get_mut(ino)?;
        i.attr.size = size;
        let now = Timespec::now();
        i.attr.mtime = now;
        i.attr.ctime = now;
        stamp_staging(&staged, &i.attr);
        if i.writers == 0 {
            ns.file_quiet(ino, Instant::now());
        }
        self.apply(&mut ns, Effects::default())
    }

    /// Gives a regular file staged content and returns its staging id; copies
    /// the backend data first when `keep_data` (blocking). `changing`: the
    /// caller changes the staged data in place next (a copy of published
    /// content is made durable first).
    fn stage(&self, ino: Ino, keep_data: bool, changing: bool, may_block: bool) -> FsResult<u64> {
        let (backend_xattrs, path) = loop {
            // The staged file carries the backend file's extended attributes
            // (its publish replaces that file).
            let backend_xattrs = self.xattrs_for_staging(ino, may_block)?;
            let mut ns = self.ns.lock();
            let i = ns.get(ino)?;
            if let Content::Staged { id, dirty } = i.content {
                // A copy of published content, or a closed, unpublished
                // change that will replace a backend file (its journaled
                // size is dropped while it is open for writing), about to be
                // changed in place: see `durable_before_journaled`. (While
                // it is open for writing, the journal holds no size already.)
                let replaces_backend_file = !dirty
                    || (i.writers == 0
                        && !i.foreign_writer
                        && (i.publish_queued > 0 || i.backend_ino.is_some() || ns.pending_expect(ino).is_some()));
                drop(ns);
                if keep_data && changing && replaces_backend_file {
                    durable_before_journaled(&self.staging, id)?;
                }
                return Ok(id);
            }
            if backend_xattrs.is_none() && i.xattrs.is_none() && self.capabilities().xattrs.any() {
                // It was staged when asked, and its publish has finished
                // since: its attributes are the backend's now. Ask again.
                continue;
            }
            if !keep_data || i.attr.size == 0 {
                let id = ns.new_staging_id();
                let f = self.staging.create(id).map_err(io_err)?;
                self.stage_xattrs(&mut ns, ino, id, &backend_xattrs)?;
                stamp_staging(&f, &ns.get(ino)?.attr);
                let i = ns.get_mut(ino)?;
                i.content = Content::Staged { id, dirty: false };
                return Ok(id);
            }
            break (backend_xattrs, ns.path_of(ino)?);
        };
        if !may_block {
            return Err(FsError::WouldBlock);
        }
        self.wait_path_stable(ino)?;
        let queued_before = self.sched.enqueued_total();
        let src = self.backend.open_read(&path).map_err(io_err)?;
        // The version copied (a network file system answers this from the
        // open's reply): the next publish replaces exactly that.
        let copied = self.backend.stat_file(&src).map_err(io_err)?;
        let id = self.ns.lock().new_staging_id();
        let dst = self.staging.create(id).map_err(io_err)?;
        copy_up(&*self.backend, &src, &dst).map_err(io_err)?;
        dst.sync_data().map_err(io_err)?; // see `durable_before_journaled`
        self.staging.set_size(id, dst.metadata().map_err(io_err)?.len());
        let mut ns = self.ns.lock();
        let i = ns.get_mut(ino)?;
        if let Content::Staged { id: other, .. } = i.content {
            drop(ns);
            self.staging.remove(id); // someone else staged it meanwhile
            return Ok(other);
        }
        if let Err(e) = self.stage_xattrs(&mut ns, ino, id, &backend_xattrs) {
            drop(ns);
            self.staging.remove(id);
            return Err(e);
        }
        let i = ns.get_mut(ino)?;
        stamp_staging(&dst, &i.attr);
        i.content = Content::Staged { id, dirty: false };
        i.saw_backend(&copied, self.sched.enqueued_total() == queued_before);
        Ok(id)
    }

    /// The extended attributes a backend file about to be staged has (None:
    /// the backend keeps none, or the file is staged already).
    fn xattrs_for_staging(&self, ino: Ino, may_block: bool) -> FsResult<Option<Xattrs>> {
        if !self.capabilities().xattrs.any() {
            return Ok(None);
        }
        {
            let ns = self.ns.lock();
            let i = ns.get(ino)?;
            if i.staged_id().is_some() {
                return Ok(None);
            }
            if let Some(c) = &i.xattrs
                && self.fresh(Some(c.loaded))
            {
                return Ok(Some(c.map.clone()));
            }
        }
        self.load_xattrs(ino, may_block).map(Some)
    }

    /// Writes a file's extended attributes onto its new staging file `id`
    /// (the overlay's own, if it changed them since `loaded` was read); from
    /// now on the staging file holds them.
    fn stage_xattrs(&self, ns: &mut Namespace, ino: Ino, id: u64, loaded: &Option<Xattrs>) -> FsResult<()> {
        let i = ns.get_mut(ino)?;
        let current = i.xattrs.take().map(|c| c.map);
        for (name, value) in current.as_ref().or(loaded.as_ref()).into_iter().flatten() {
            self.staging.set_xattr(id, name, Some(value)).map_err(io_err)?;
        }
        Ok(())
    }

    pub fn readlink(&self, ino: Ino, may_block: bool) -> FsResult<OsString> {
        let path = {
            let ns = self.ns.lock();
            let i = ns.get(ino)?;
            if i.kind != Kind::Symlink {
                return Err(FsError::Invalid);
            }
            if let Some(t) = ns.symlink_target(ino) {
                return Ok(t.to_os_string());
            }
            ns.path_of(ino)?
        };
        if !may_block {
            return Err(FsError::WouldBlock);
        }
        self.wait_path_stable(ino)?;
        let t = self.backend.read_link(&path).map_err(io_err)?;
        self.ns.lock().set_symlink_target(ino, &t);
        Ok(t)
    }

    // ---- namespace changes -------------------------------------------------

    fn change<T>(
        &self,
        parent: Ino,
        may_block: bool,
        f: impl FnOnce(&mut Namespace, &mut Effects) -> FsResult<T>,
    ) -> FsResult<T> {
        self.change_or_undo(parent, may_block, f, |_, _, _| {})
    }

    /// `change` for a change whose reply hands the kernel a new lookup
    /// reference to the object (mkdir, mknod, symlink, link). When the
    /// journal refuses the change, the reply is an error and the kernel never
    /// holds that reference: it is dropped, so the object can be freed.
    fn change_entry(
        &self,
        parent: Ino,
        may_block: bool,
        f: impl FnOnce(&mut Namespace, &mut Effects) -> FsResult<AttrOut>,
    ) -> FsResult<AttrOut> {
        self.change_or_undo(parent, may_block, f, |ns, out, fx| ns.forget(out.ino, 1, fx))
    }

    fn change_or_undo<T>(
        &self,
        parent: Ino,
        may_block: bool,
        f: impl FnOnce(&mut Namespace, &mut Effects) -> FsResult<T>,
        undo_reply: impl FnOnce(&mut Namespace, &T, &mut Effects),
    ) -> FsResult<T> {
        self.check_journal()?;
        self.ensure_loaded(parent, may_block)?;
        let mut fx = Effects::default();
        let mut ns = self.ns.lock();
        let r = f(&mut ns, &mut fx);
        let journaled = self.apply(&mut ns, fx);
        let v = r?;
        if let Err(e) = journaled {
            let mut fx = Effects::default();
            undo_reply(&mut ns, &v, &mut fx);
            let _ = self.apply(&mut ns, fx); // failing anyway
            return Err(e);
        }
        Ok(v)
    }

    /// The permission bits and ACLs of a new object in `parent`: a default
    /// ACL there takes the place of the umask (and a new directory inherits
    /// it as its own default ACL); without one, the umask applies.
    fn new_object_mode(
        &self,
        parent: Ino,
        perm: u32,
        umask: u32,
        is_dir: bool,
        may_block: bool,
    ) -> FsResult<(u32, Xattrs)> {
        let Some(default) = self.default_acl(parent, may_block)? else {
            return Ok((perm & !(umask & 0o777), Xattrs::new()));
        };
        let (perm, access) = default.create_masq(perm);
        let mut acls = Xattrs::new();
        if let Some(a) = access {
            acls.insert(OsString::from(xattr::ACL_ACCESS), a.to_bytes());
        }
        if is_dir {
            acls.insert(OsString::from(xattr::ACL_DEFAULT), default.to_bytes());
        }
        Ok((perm, acls))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn mkdir(
        &self,
        parent: Ino,
        name: &OsStr,
        perm: u32,
        umask: u32,
        uid: u32,
        gid: u32,
        may_block: bool,
    ) -> FsResult<AttrOut> {
        self.ensure_loaded(parent, may_block)?;
        let (perm, acls) = self.new_object_mode(parent, perm, umask, true, may_block)?;
        self.change_entry(parent, may_block, |ns, fx| {
            let gid = inherit_gid(ns, parent, gid)?;
            let perm = perm | (ns.get(parent)?.attr.perm & libc::S_ISGID);
            let ino = ns.mkdir(parent, name, perm & 0o7777, uid, gid, fx)?;
            for (n, v) in acls {
                ns.set_xattr(ino, &n, Some(v), fx)?;
            }
            Self::attr_out(ns, ino)
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &self,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
        may_block: bool,
    ) -> FsResult<AttrOut> {
        let kind = Kind::from_mode(mode).ok_or(FsError::Invalid)?;
        if kind == Kind::File {
            // O_EXCL: mknod of an existing name is EEXIST, never an open of it.
            let flags = libc::O_WRONLY | libc::O_EXCL;
            let (out, opened) = self.create(parent, name, mode & 0o7777, umask, flags, uid, gid, may_block)?;
            self.release(opened.fh);
            return Ok(out);
        }
        if kind == Kind::Dir || kind == Kind::Symlink {
            return Err(FsError::Invalid);
        }
        // Refused now, with the backend's errno, not later in the flush.
        if let Some(errno) = self.capabilities().refuses(kind) {
            return Err(FsError::Io(io::Error::from_raw_os_error(errno)));
        }
        self.ensure_loaded(parent, may_block)?;
        let (perm, acls) = self.new_object_mode(parent, mode & 0o7777, umask, false, may_block)?;
        self.change_entry(parent, may_block, |ns, fx| {
            let gid = inherit_gid(ns, parent, gid)?;
            let ino = ns.mknod(parent, name, kind, perm, rdev, uid, gid, fx)?;
            for (n, v) in acls {
                ns.set_xattr(ino, &n, Some(v), fx)?;
            }
            Self::attr_out(ns, ino)
        })
    }

    pub fn symlink(
        &self,
        parent: Ino,
        name: &OsStr,
        target: &OsStr,
        uid: u32,
        gid: u32,
        may_block: bool,
    ) -> FsResult<AttrOut> {
        if target.len() > crate::backend::EFS_MAX_SYMLINK {
            return Err(FsError::NameTooLong);
        }
        self.change_entry(parent, may_block, |ns, fx| {
            let gid = inherit_gid(ns, parent, gid)?;
            let ino = ns.symlink(parent, name, target, uid, gid, fx)?;
            Self::attr_out(ns, ino)
        })
    }

    pub fn unlink(&self, parent: Ino, name: &OsStr, may_block: bool) -> FsResult<()> {
        self.change(parent, may_block, |ns, fx| ns.unlink(parent, name, fx))
    }

    /// The directory named `name` in `parent`, if there is one.
    fn child_dir(&self, parent: Ino, name: &OsStr) -> FsResult<Option<Ino>> {
        let ns = self.ns.lock();
        Ok(match ns.lookup(parent, name)? {
            Some(c) if ns.get(c)?.kind == Kind::Dir => Some(c),
            _ => None,
        })
    }

    pub fn rmdir(&self, parent: Ino, name: &OsStr, may_block: bool) -> FsResult<()> {
        self.ensure_loaded(parent, may_block)?;
        if let Some(child) = self.child_dir(parent, name)? {
            self.ensure_loaded(child, may_block)?;
        }
        self.change(parent, may_block, |ns, fx| ns.rmdir(parent, name, fx))
    }

    pub fn rename(
        &self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
        flags: u32,
        may_block: bool,
    ) -> FsResult<()> {
        if flags & !(libc::RENAME_NOREPLACE) != 0 {
            return Err(FsError::Invalid); // RENAME_EXCHANGE / WHITEOUT: not supported
        }
        self.ensure_loaded(newparent, may_block)?;
        if let Some(t) = self.child_dir(newparent, newname)? {
            self.ensure_loaded(t, may_block)?;
        }
        self.change(parent, may_block, |ns, fx| {
            ns.rename(
                parent,
                name,
                newparent,
                newname,
                flags & libc::RENAME_NOREPLACE != 0,
                fx,
            )
        })
    }

    pub fn link(&self, ino: Ino, newparent: Ino, newname: &OsStr, may_block: bool) -> FsResult<AttrOut> {
        self.change_entry(newparent, may_block, |ns, fx| {
            ns.link(ino, newparent, newname, fx)?;
            ns.add_lookup(ino);
            Self::attr_out(ns, ino)
        })
    }

    // ---- files ---------------------------------------------------------------

    fn new_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, h);
        fh
    }

    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &self,
        parent: Ino,
        name: &OsStr,
        perm: u32,
        umask: u32,
        flags: i32,
        uid: u32,
        gid: u32,
        may_block: bool,
    ) -> FsResult<(AttrOut, Opened)> {
        self.check_journal()?;
        self.ensure_loaded(parent, may_block)?;
        let (perm, acls) = self.new_object_mode(parent, perm, umask, false, may_block)?;
        let mut ns = self.ns.lock();
        if let Some(existing) = ns.lookup(parent, name)? {
            if flags & libc::O_EXCL != 0 {
                return Err(FsError::Exists);
            }
            drop(ns);
            let opened = self.open(existing, flags, may_block)?;
            let mut ns = self.ns.lock();
            ns.add_lookup(existing);
            let out = Self::attr_out(&ns, existing)?;
            return Ok((out, opened));
        }
        if self.over_cache_budget() {
            drop(ns);
            self.wait_for_cache_space(may_block)?;
            ns = self.ns.lock();
            if ns.lookup(parent, name)?.is_some() {
                drop(ns);
                return self.create(parent, name, perm, 0, flags, uid, gid, may_block);
            }
        }
        let gid = inherit_gid(&ns, parent, gid)?;
        let ino = ns.create_file(parent, name, perm & 0o7777, uid, gid)?;
        let id = ns.get(ino)?.staged_id().expect("new file is staged");
        // Undoes the new file (the request fails, so the kernel gets no
        // entry: its lookup reference goes too).
        let undo = |ns: &mut Namespace| {
            let mut fx = Effects::default();
            let _ = ns.unlink(parent, name, &mut fx);
            ns.forget(ino, 1, &mut fx);
            let _ = self.apply(ns, fx); // failing anyway
        };
        let created = self.staging.create(id).and_then(|f| {
            for (n, v) in &acls {
                self.staging.set_xattr(id, n, Some(v))?;
            }
            Ok(f)
        });
        let file = match created {
            Ok(f) => f,
            Err(e) => {
                undo(&mut ns);
                return Err(io_err(e));
            }
        };
        stamp_staging(&file, &ns.get(ino)?.attr);
        let i = ns.get_mut(ino)?;
        i.opens += 1;
        i.writers += 1;
        if let Err(e) = self.apply(&mut ns, Effects::default()) {
            // Not crash-safe: undone, as if the create had failed.
            let i = ns.get_mut(ino)?;
            i.opens -= 1;
            i.writers -= 1;
            undo(&mut ns);
            return Err(e);
        }
        let out = Self::attr_out(&ns, ino)?;
        drop(ns);
        let file = Arc::new(file);
        let passthrough = self.passthrough_enabled();
        let fh = self.new_handle(Handle::Staged {
            ino,
            file: file.clone(),
            write: true,
            passthrough,
        });
        Ok((
            out,
            Opened {
                fh,
                backing: passthrough.then_some(file),
            },
        ))
    }

    /// What the backend accepts, as probed at mount (`probe_capabilities`).
    pub fn set_capabilities(&self, caps: crate::backend::Capabilities) {
        let _ = self.capabilities.set(caps);
    }

    pub fn capabilities(&self) -> crate::backend::Capabilities {
        self.capabilities.get().copied().unwrap_or_default()
    }

    /// Whether staged data has used up its budget (`cache_size`) or the
    /// cache disk is nearly full.
    fn over_cache_budget(&self) -> bool {
        self.cfg.cache_size.is_some_and(|limit| self.staging.used() >= limit) || self.staging.disk_low()
    }

    /// Holds a writer back, before it opens, while the cache is over budget
    /// and publishes can free space: it proceeds once they have, when nothing
    /// left could be freed (all dirty data is in files open for writing), or
    /// after half the request timeout (a stalled backend), so it never gets
    /// ENOSPC while the local disk has room. Writes through passthrough
    /// bypass the daemon, so this is the one place the budget can act.
    fn wait_for_cache_space(&self, may_block: bool) -> FsResult<()> {
        if !self.over_cache_budget() {
            return Ok(());
        }
        if !may_block {
            return Err(FsError::WouldBlock);
        }
        struct Waiting<'a>(&'a AtomicU64);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.writers_waiting_for_space.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.writers_waiting_for_space);
        self.writers_throttled.fetch_add(1, Ordering::Relaxed);
        let deadline = Instant::now() + self.cfg.request_timeout / 2;
        loop {
            if !self.over_cache_budget() || !self.cache_can_free() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    used = self.staging.used(),
                    "cache over budget and the backend is not draining it: letting a writer through"
                );
                return Ok(());
            }
            self.tick(false);
            self.staging.wait_freed(Duration::from_millis(20));
        }
    }

    /// Whether publishing could free cache space: an op is running, or a
    /// dirty file is closed (so its publish is due or queued).
    fn cache_can_free(&self) -> bool {
        if self.sched.in_flight() > 0 {
            return true;
        }
        let ns = self.ns.lock();
        ns.lingering_freeable() || ns.dirty_files.iter().any(|i| ns.get(*i).is_ok_and(|i| i.writers == 0))
    }

    pub fn cache_status(&self) -> CacheStatus {
        CacheStatus {
            used_bytes: self.staging.used(),
            peak_used_bytes: self.staging.peak_used(),
            limit_bytes: self.cfg.cache_size,
            disk_available_bytes: self.staging.disk_available(),
            disk_low: self.staging.disk_low(),
            writers_waiting: self.writers_waiting_for_space.load(Ordering::Relaxed),
            writers_throttled: self.writers_throttled.load(Ordering::Relaxed),
            clean_copies: self.ns.lock().lingering_count() as u64,
        }
    }

    /// Turns FUSE passthrough on (the kernel granted it at init).
    pub fn enable_passthrough(&self) {
        self.passthrough.store(true, Ordering::Relaxed);
    }

    pub fn passthrough_enabled(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// The kernel refused a backing file for `fh`: serve its I/O instead (and
    /// stop offering passthrough, whose set-up evidently does not work here).
    pub fn passthrough_refused(&self, fh: u64) {
        self.passthrough.store(false, Ordering::Relaxed);
        if let Some(Handle::Staged { passthrough, .. }) = self.handles.lock().get_mut(&fh) {
            *passthrough = false;
        }
    }

    /// Whether `ino` has handles open, and if so whether they use passthrough
    /// (the kernel refuses to mix the two on one inode).
    fn open_mode(&self, ino: Ino) -> Option<bool> {
        self.handles.lock().values().find_map(|h| match h {
            Handle::Staged {
                ino: i, passthrough, ..
            } if *i == ino => Some(*passthrough),
            Handle::Remote { ino: i, .. } if *i == ino => Some(false),
            _ => None,
        })
    }

    /// Size and mtime of a file written through passthrough come from its
    /// staging file: the daemon does not see those writes. (Nothing to do
    /// unless a writer has it open.)
    fn refresh_from_staging(&self, ino: Ino) {
        if !self.ns.lock().get(ino).is_ok_and(|i| i.writers > 0) {
            return;
        }
        let file = self.handles.lock().values().find_map(|h| match h {
            Handle::Staged {
                ino: i,
                file,
                passthrough: true,
                ..
            } if *i == ino => Some(file.clone()),
            _ => None,
        });
        let Some(file) = file else { return };
        use std::os::unix::fs::MetadataExt;
        // fstat under the namespace lock, so a concurrent utimens (which sets
        // the staging file's times first) is never overwritten by stale ones.
        let mut ns = self.ns.lock();
        let Ok(md) = file.metadata() else { return };
        if let Some(id) = ns.get(ino).ok().and_then(|i| i.staged_id()) {
            self.staging.set_size(id, md.len());
        }
        if let Ok(i) = ns.get_mut(ino) {
            let mtime = Timespec {
                sec: md.mtime(),
                nsec: md.mtime_nsec() as u32,
            };
            // A passthrough write happened (the staging file is stamped with
            // the overlay's times otherwise): it changed ctime too.
            if mtime != i.attr.mtime || md.len() != i.attr.size {
                let ctime = Timespec {
                    sec: md.ctime(),
                    nsec: md.ctime_nsec() as u32,
                };
                i.attr.ctime = i.attr.ctime.max(ctime);
            }
            i.attr.size = md.len();
            i.attr.blocks = md.blocks();
            i.attr.mtime = mtime;
        }
    }

    /// The blocks a staged file really uses (holes and preallocation show,
    /// as tools like `cp --sparse` and `du` expect): one local fstat.
    fn refresh_blocks(&self, ino: Ino) {
        use std::os::unix::fs::MetadataExt;
        let Some(id) = self.ns.lock().get(ino).ok().and_then(|i| i.staged_id()) else {
            return;
        };
        let Ok(md) = std::fs::metadata(self.staging.path(id)) else {
            return;
        };
        let mut ns = self.ns.lock();
        if let Ok(i) = ns.get_mut(ino)
            && i.staged_id() == Some(id)
        {
            i.attr.blocks = md.blocks();
        }
    }

    pub fn open(&self, ino: Ino, flags: i32, may_block: bool) -> FsResult<Opened> {
        let acc = flags & libc::O_ACCMODE;
        let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        let trunc = write && flags & libc::O_TRUNC != 0;
        let (kind, content) = {
            let ns = self.ns.lock();
            let i = ns.get(ino)?;
            (i.kind, i.content)
        };
        if kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        if kind != Kind::File {
            return Err(FsError::NotSupported); // fifos and devices are opened by the kernel
        }
        if write {
            self.check_journal()?;
            self.wait_for_cache_space(may_block)?;
        }
        if write || content != Content::Remote {
            let (mut ns, file) = loop {
                let id = self.stage(ino, !trunc, write, may_block)?;
                // Open and count the handle under the lock: a publish finishing
                // now drops the staging copy only of files nobody has open.
                let ns = self.ns.lock();
                if ns.get(ino)?.staged_id() != Some(id) {
                    continue;
                }
                let file = if write {
                    self.staging.open_rw(id)
                } else {
                    self.staging.open_read(id)
                };
                break (ns, file.map_err(io_err)?);
            };
            if trunc {
                self.journal_resizing(&mut ns, ino)?;
                file.set_len(0).map_err(io_err)?;
                if let Some(id) = ns.get(ino)?.staged_id() {
                    self.staging.set_size(id, 0);
                }
                ns.mark_dirty(ino)?;
                let i = ns.get_mut(ino)?;
                i.attr.size = 0;
                let now = Timespec::now();
                i.attr.mtime = now;
                i.attr.ctime = now;
                stamp_staging(&file, &i.attr);
            }
            let passthrough = self.passthrough_enabled() && self.open_mode(ino) != Some(false);
            if write {
                // The content counts as changed from now: writes through
                // passthrough bypass the daemon, and one it serves reaches
                // the staged file before the journal (whose size for a
                // queued publish of it would no longer hold).
                ns.mark_dirty(ino)?;
            }
            let i = ns.get_mut(ino)?;
            i.opens += 1;
            if write {
                i.writers += 1;
                ns.debounce.remove(&ino);
                // Journaled as open for writing from now on: the size at the
                // last close no longer describes the staged data (recovery
                // must not refuse what this writer writes before a crash).
                ns.touched.push(ino);
            }
            let journaled = self.apply(&mut ns, Effects::default());
            drop(ns);
            let file = Arc::new(file);
            let fh = self.new_handle(Handle::Staged {
                ino,
                file: file.clone(),
                write,
                passthrough,
            });
            if let Err(e) = journaled {
                self.release(fh); // as if closed at once: counted and queued as usual
                return Err(e);
            }
            return Ok(Opened {
                fh,
                backing: passthrough.then_some(file),
            });
        }
        if !may_block {
            return Err(FsError::WouldBlock);
        }
        self.wait_path_stable(ino)?;
        let path = self.ns.lock().path_of(ino)?;
        let file = self.backend.open_read(&path).map_err(io_err)?;
        self.ns.lock().get_mut(ino)?.opens += 1;
        let fh = self.new_handle(Handle::Remote {
            ino,
            file: Arc::new(file),
        });
        Ok(Opened { fh, backing: None })
    }

    /// The file a read through handle `fh` reads, and whether it is the
    /// backend's (else a staging file).
    fn read_source(&self, fh: u64) -> FsResult<(Arc<File>, bool)> {
        let (file, remote, ino) = match self.handles.lock().get(&fh).ok_or(FsError::BadHandle)? {
            Handle::Staged { file, ino, .. } => (file.clone(), false, *ino),
            Handle::Remote { file, ino } => (file.clone(), true, *ino),
        };
        // Opened when the file was only on the backend, and changed through
        // the mount since (staged): reads see this mount's version, as every
        // other reader does.
        if remote
            && let Some(id) = self.ns.lock().get(ino)?.staged_id()
            && let Ok(f) = self.staging.open_read(id)
        {
            return Ok((Arc::new(f), false));
        }
        Ok((file, remote))
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32, may_block: bool) -> FsResult<Vec<u8>> {
        let (file, remote) = self.read_source(fh)?;
        if remote && !may_block {
            return Err(FsError::WouldBlock);
        }
        let mut buf = vec![0u8; size as usize];
        let n = if remote {
            self.backend.read_at(&file, &mut buf, offset)
        } else {
            read_full(&file, &mut buf, offset)
        }
        .map_err(io_err)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// `lseek(SEEK_DATA|SEEK_HOLE)` (the kernel answers the other kinds).
    pub fn seek_hole_data(&self, fh: u64, offset: i64, whence: i32, may_block: bool) -> FsResult<i64> {
        let (file, remote) = self.read_source(fh)?;
        if remote {
            if !may_block {
                return Err(FsError::WouldBlock);
            }
            return self.backend.seek_hole_data(&file, offset, whence).map_err(io_err);
        }
        crate::backend::posix::seek_hole_data(&file, offset, whence).map_err(io_err)
    }

    /// `fallocate(2)` on an open file: done on its staging file, so holes
    /// carry over to the publish (which copies data extents only; a
    /// preallocated range reads as zeros and is not copied either).
    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        let (ino, file) = match self.handles.lock().get(&fh).ok_or(FsError::BadHandle)? {
            Handle::Staged {
                ino, file, write: true, ..
            } => (*ino, file.clone()),
            _ => return Err(FsError::BadHandle),
        };
        self.check_journal()?;
        // Passthrough writes so far first, so the times stamped below are current.
        self.refresh_from_staging(ino);
        crate::staging::fallocate(&file, mode, offset, len).map_err(io_err)?;
        use std::os::unix::fs::MetadataExt;
        let md = file.metadata().map_err(io_err)?;
        let mut ns = self.ns.lock();
        ns.mark_dirty(ino)?;
        if let Some(id) = ns.get(ino)?.staged_id() {
            self.staging.set_size(id, md.len());
        }
        let i = ns.get_mut(ino)?;
        i.attr.size = md.len();
        i.attr.blocks = md.blocks();
        let changes_content = libc::FALLOC_FL_PUNCH_HOLE
            | libc::FALLOC_FL_ZERO_RANGE
            | libc::FALLOC_FL_COLLAPSE_RANGE
            | libc::FALLOC_FL_INSERT_RANGE;
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 || mode & changes_content != 0 {
            let now = Timespec::now();
            i.attr.mtime = now;
            i.attr.ctime = now;
        }
        stamp_staging(&file, &i.attr);
        ns.touched.push(ino);
        self.apply(&mut ns, Effects::default())
    }

    /// A write that clears setuid/setgid itself, as a writer without
    /// CAP_FSETID sees it (what the kernel does before a write through the
    /// mount, done here for callers that are not the kernel).
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.write_as(fh, offset, data, true)
    }

    /// A served write (not through passthrough). `clear_setid`: the write
    /// clears setuid (and setgid with group execute) itself. Through FUSE it
    /// does not: the kernel sends a setattr clearing them before the write
    /// of a process without CAP_FSETID, and keeps them for one with it.
    pub fn write_as(&self, fh: u64, offset: u64, data: &[u8], clear_setid: bool) -> FsResult<u32> {
        let (ino, file) = match self.handles.lock().get(&fh).ok_or(FsError::BadHandle)? {
            Handle::Staged {
                ino, file, write: true, ..
            } => (*ino, file.clone()),
            _ => return Err(FsError::BadHandle),
        };
        file.write_all_at(data, offset).map_err(io_err)?;
        let mut ns = self.ns.lock();
        ns.mark_dirty(ino)?;
        let end = offset + data.len() as u64;
        if let Some(id) = ns.get(ino)?.staged_id() {
            self.staging.grown_to(id, end);
        }
        let i = ns.get_mut(ino)?;
        if end > i.attr.size {
            i.attr.size = end;
        }
        // At least the blocks just written (holes are only known from a stat).
        i.attr.blocks = (i.attr.blocks + data.len().div_ceil(512) as u64).min(i.attr.size.div_ceil(512));
        let now = Timespec::now();
        i.attr.mtime = now;
        i.attr.ctime = now;
        // Setuid, and setgid with group execute (should_remove_suid in the
        // kernel).
        let kill = if clear_setid {
            libc::S_ISUID | if i.attr.perm & 0o010 != 0 { libc::S_ISGID } else { 0 }
        } else {
            0
        };
        let perm = i.attr.perm & !kill;
        if perm != i.attr.perm {
            i.attr.perm = perm;
            ns.touched.push(ino); // the mode is part of the journaled state
        }
        if !ns.touched.is_empty() {
            self.apply(&mut ns, Effects::default())?;
        }
        Ok(data.len() as u32)
    }

    pub fn release(&self, fh: u64) {
        let Some((ino, write, passthrough)) = self.handles.lock().get(&fh).map(|h| match h {
            Handle::Staged {
                ino,
                write,
                passthrough,
                ..
            } => (*ino, *write, *passthrough),
            Handle::Remote { ino, .. } => (*ino, false, false),
        }) else {
            return;
        };
        if write && passthrough {
            // Size and mtime from the file, while this handle still holds it.
            self.refresh_from_staging(ino);
        }
        self.handles.lock().remove(&fh);
        let mut fx = Effects::default();
        let mut ns = self.ns.lock();
        if let Ok(i) = ns.get_mut(ino) {
            i.opens = i.opens.saturating_sub(1);
            if write {
                i.writers = i.writers.saturating_sub(1);
            }
            let (writers, opens, content) = (i.writers, i.opens, i.content);
            if writers == 0 {
                ns.file_quiet(ino, Instant::now());
            }
            // A staged copy nobody uses and that is not waiting for a publish
            // goes back to being read from the backend (unless it is kept
            // after its publish: the tick drops it in time).
            if let Content::Staged { id, dirty: false } = content
                && opens == 0
                && !ns.get(ino).is_ok_and(|i| i.publish_queued > 0)
                && !ns.is_lingering(ino)
            {
                let i = ns.get_mut(ino).expect("exists");
                i.content = Content::Remote;
                i.xattrs = None;
                fx.discard.push(id);
            }
            ns.maybe_free(ino, &mut fx);
        }
        let _ = self.apply(&mut ns, fx); // nothing to acknowledge (a failure is logged; the journal turns unhealthy)
    }

    /// fsync: local durability of the staged data, and with `fsync=remote`
    /// also the publish to the backend.
    pub fn fsync(&self, fh: u64, may_block: bool) -> FsResult<()> {
        let (ino, file) = match self.handles.lock().get(&fh).ok_or(FsError::BadHandle)? {
            Handle::Staged { ino, file, .. } => (*ino, file.clone()),
            Handle::Remote { .. } => return Ok(()),
        };
        // Not on an event-loop thread: syncing a big file takes a while.
        if !may_block {
            return Err(FsError::WouldBlock);
        }
        // The file's name and owner are in the journal: it must be durable
        // too. The committer syncs it while this thread syncs the data, so
        // the cache disk can commit both at once.
        if let Some(j) = self.journal.get() {
            j.start_sync();
        }
        file.sync_data().map_err(io_err)?;
        self.sync_journal()?;
        if !self.cfg.fsync_remote {
            return Ok(());
        }
        // The publish goes ahead although the file is open for writing (the
        // caller's own handle, at least): fsync asks for what it holds now,
        // with the size and mtime its passthrough writes gave it.
        self.refresh_from_staging(ino);
        let failed_before = self.sched.failures_on(ino);
        let queued = {
            let mut ns = self.ns.lock();
            let mut fx = Effects::default();
            let publish = ns.queue_publish(ino)?;
            if publish.is_some() && ns.get(ino)?.writers > 0 {
                ns.still_dirty(ino)?;
            }
            fx.ops.extend(publish);
            ns.get_mut(ino)?.fsync_waiters += 1;
            self.apply(&mut ns, fx)
        };
        // Bounded like any request that waits on the backend (the watchdog
        // answers EIO then; this thread must not stay behind for good).
        let deadline = Instant::now() + self.cfg.request_timeout;
        let cleared = queued.is_ok() && self.sched.wait_key_clear(&flush::Key::Ino(ino), Some(deadline));
        if let Ok(i) = self.ns.lock().get_mut(ino) {
            i.fsync_waiters -= 1;
        }
        queued?;
        if !cleared {
            return Err(FsError::TimedOut);
        }
        // The publish is over, with every op on the file queued before
        // the wait ended. One of them may have failed for good or lost a
        // conflict (the publish, or a change of the file's attributes or
        // names): then the file is not on the backend as fsync asked, and
        // fsync says so.
        if self.sched.failures_on(ino) > failed_before {
            return Err(FsError::Io(io::Error::from_raw_os_error(libc::EIO)));
        }
        Ok(())
    }

    /// fsyncdir: the directory's entries are in the journal.
    pub fn fsyncdir(&self, may_block: bool) -> FsResult<()> {
        if !may_block {
            return Err(FsError::WouldBlock);
        }
        self.sync_journal()
    }

    fn sync_journal(&self) -> FsResult<()> {
        match self.journal.get() {
            Some(j) => j.sync().map_err(io_err),
            None => Ok(()),
        }
    }

    pub fn statfs(&self, may_block: bool) -> FsResult<StatFs> {
        if !may_block {
            return Err(FsError::WouldBlock);
        }
        self.backend.statfs().map_err(io_err)
    }

    // ---- extended attributes ---------------------------------------------------

    /// Refuses a name whose namespace the backend (or the cache disk) cannot keep.
    fn check_xattr_name(&self, name: &OsStr) -> FsResult<()> {
        let caps = self.capabilities().xattrs;
        if !caps.any() {
            return Err(FsError::NoXattrs);
        }
        if !caps.allows(xattr::classify(name)) {
            return Err(FsError::NotSupported);
        }
        Ok(())
    }

    /// Loads the extended attributes of an object whose content is not
    /// staged from the backend (after any queued op that changes them) and
    /// keeps them; returns what the overlay holds then.
    fn load_xattrs(&self, ino: Ino, may_block: bool) -> FsResult<Xattrs> {
        {
            let ns = self.ns.lock();
            let i = ns.get(ino)?;
            if i.links.is_empty() && ino != ROOT {
                // Unlinked while open: no backend path; what the overlay has.
                return Ok(i.xattrs.as_ref().map(|c| c.map.clone()).unwrap_or_default());
            }
        }
        if !may_block {
            return Err(FsError::WouldBlock);
        }
        // After the queued ops that change the object (for the root, which
        // no rename can move, its own attribute ops).
        if ino == ROOT {
            let keys = vec![(flush::Key::Ino(ROOT), flush::Access::Shared)];
            if self.sched.conflicts(&keys) {
                let (tx, rx) = crossbeam::channel::bounded(1);
                self.sched.enqueue(FlushOp::new(keys, Action::Barrier(tx)));
                rx.recv()
                    .map_err(|_| FsError::Io(io::Error::from_raw_os_error(libc::EIO)))?;
            }
        } else {
            self.wait_path_stable(ino)?;
        }
        let path = match self.ns.lock().path_of(ino) {
            Ok(p) => p,
            Err(FsError::NotFound) => return Ok(Xattrs::new()), // unlinked meanwhile
            Err(e) => return Err(e),
        };
        let caps = self.capabilities().xattrs;
        let mut loaded: Xattrs = match self.backend.list_xattrs(&path) {
            // Only what this mount can keep (an NFS client lists
            // `system.nfs4_acl`, a security module its labels).
            Ok(v) => v
                .into_iter()
                .filter(|(n, _)| caps.allows(xattr::classify(n)) && !xattr::is_host_label(n))
                .collect(),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Xattrs::new(),
            Err(e) => return Err(io_err(e)),
        };
        let mut ns = self.ns.lock();
        // A directory's chmod reaches the backend only once its entries
        // settle: until then its ACL follows the overlay's mode.
        let pending_mode = ns
            .dirty_dir_attrs
            .contains(&ino)
            .then(|| ns.get(ino).map(|i| i.attr.perm));
        if let Some(Ok(perm)) = pending_mode
            && let Some(acl) = loaded
                .get(OsStr::new(xattr::ACL_ACCESS))
                .and_then(|v| Acl::parse(v).ok())
        {
            loaded.insert(xattr::ACL_ACCESS.into(), acl.chmod(perm).to_bytes());
        }
        let i = ns.get_mut(ino)?;
        match &i.xattrs {
            // Loaded by someone else, or changed here, meanwhile: that is newer.
            Some(c) if self.fresh(Some(c.loaded)) => Ok(c.map.clone()),
            _ => {
                i.xattrs = Some(XattrCache::new(loaded.clone()));
                Ok(loaded)
            }
        }
    }

    /// Runs `f` on an object's extended attributes: a staged file's from its
    /// staging file, any other object's from the overlay (loaded first if
    /// needed).
    fn read_xattrs<T>(&self, ino: Ino, may_block: bool, f: impl Fn(&Xattrs) -> T) -> FsResult<T> {
        {
            let ns = self.ns.lock();
            let i = ns.get(ino)?;
            if let Some(id) = i.staged_id() {
                // Under the lock: a publish finishing now cannot drop the file.
                return Ok(f(&self.staging.xattrs(id).map_err(io_err)?));
            }
            if let Some(c) = &i.xattrs
                && self.fresh(Some(c.loaded))
            {
                return Ok(f(&c.map));
            }
        }
        let map = self.load_xattrs(ino, may_block)?;
        // Staged meanwhile: ask again (the staging file has them now).
        if self.ns.lock().get(ino)?.staged_id().is_some() {
            return self.read_xattrs(ino, may_block, f);
        }
        Ok(f(&map))
    }

    pub fn getxattr(&self, ino: Ino, name: &OsStr, may_block: bool) -> FsResult<Vec<u8>> {
        self.check_xattr_name(name)?;
        {
            // The kernel asks for `security.capability` before every write
            // to a file (staged, then): one local getxattr, not a listing.
            let ns = self.ns.lock();
            if let Some(id) = ns.get(ino)?.staged_id() {
                return self.staging.xattr(id, name).map_err(io_err)?.ok_or(FsError::NoAttr);
            }
        }
        self.read_xattrs(ino, may_block, |m| m.get(name).cloned())?
            .ok_or(FsError::NoAttr)
    }

    /// The names, NUL-terminated (`trusted.*` only for privileged callers).
    pub fn listxattr(&self, ino: Ino, privileged: bool, may_block: bool) -> FsResult<Vec<u8>> {
        if !self.capabilities().xattrs.any() {
            return Err(FsError::NoXattrs);
        }
        self.read_xattrs(ino, may_block, |m| xattr::list_bytes(m.keys(), privileged))
    }

    /// setxattr(2) (`value: Some`, with `XATTR_CREATE`/`XATTR_REPLACE`
    /// `flags`) and removexattr(2) (`None`). An access ACL sets the mode's
    /// permission bits, and is not kept at all when the mode says it all,
    /// as on a local filesystem.
    pub fn setxattr(&self, ino: Ino, name: &OsStr, value: Option<&[u8]>, flags: i32, may_block: bool) -> FsResult<()> {
        self.check_xattr_name(name)?;
        self.check_journal()?;
        tracing::debug!(ino, ?name, set = value.is_some(), flags, "setxattr");
        let is_access_acl = name == xattr::ACL_ACCESS;
        let acl = match (value, xattr::classify(name)) {
            (Some(v), xattr::Class::Acl) => Some(Acl::parse(v).map_err(|_| FsError::Invalid)?),
            _ => None,
        };
        // What to store: an access ACL equal to a mode is not stored; an
        // empty default ACL is a removal.
        let (store, new_perm) = match (&acl, is_access_acl) {
            (Some(acl), true) => {
                let perm = self.ns.lock().get(ino)?.attr.perm;
                let (mode, keep) = acl.equiv_mode(perm);
                (keep.map(|a| a.to_bytes()), Some(mode))
            }
            (Some(acl), false) if acl.0.is_empty() => (None, None),
            _ => (value.map(<[u8]>::to_vec), None),
        };
        let exists_before = |had: bool| -> FsResult<()> {
            match (value.is_some(), had) {
                (true, true) if flags & libc::XATTR_CREATE != 0 => Err(FsError::Exists),
                (true, false) if flags & libc::XATTR_REPLACE != 0 => Err(FsError::NoAttr),
                // Removing an ACL that is not there (`setfacl -b`) is fine,
                // as on a local filesystem.
                (false, false) if xattr::classify(name) == xattr::Class::Acl => Ok(()),
                (false, false) => Err(FsError::NoAttr),
                _ => Ok(()),
            }
        };
        let mut just_loaded = false;
        loop {
            let mut fx = Effects::default();
            let mut ns = self.ns.lock();
            let i = ns.get(ino)?;
            if let Some(id) = i.staged_id() {
                let unpublished = i.is_dirty();
                let had = self.staging.xattr(id, name).map_err(io_err)?.is_some();
                exists_before(had)?;
                if store.is_some() || had {
                    self.staging.set_xattr(id, name, store.as_deref()).map_err(io_err)?;
                    if unpublished {
                        // Published with the content, from the staging file.
                        ns.get_mut(ino)?.attr.ctime = Timespec::now();
                        ns.touched.push(ino);
                    } else {
                        // Its publish is queued, running or done: the backend
                        // file gets the change by an op of its own after it
                        // (changing the content instead would make a running
                        // publish start over under ops that expect it done).
                        ns.set_xattr(ino, name, store.clone(), &mut fx)?;
                    }
                }
            } else if let Some(c) = i.xattrs.as_ref().filter(|c| just_loaded || self.fresh(Some(c.loaded))) {
                let had = c.map.contains_key(name);
                exists_before(had)?;
                if store.is_some() || had {
                    ns.set_xattr(ino, name, store.clone(), &mut fx)?;
                }
            } else {
                drop(ns);
                self.load_xattrs(ino, may_block)?;
                just_loaded = true;
                continue;
            }
            if let Some(perm) = new_perm.filter(|p| *p != ns.get(ino).map_or(*p, |i| i.attr.perm)) {
                let ch = SetAttr {
                    perm: Some(perm),
                    ..Default::default()
                };
                ns.set_attrs(ino, &ch, &mut fx)?;
            }
            return self.apply(&mut ns, fx);
        }
    }

    /// chmod of an object with an access ACL: the ACL's owner, group class
    /// and other entries follow the new mode (as the backend's own chmod
    /// does to its copy).
    fn chmod_acl(&self, ns: &mut Namespace, ino: Ino, perm: u32) -> FsResult<()> {
        if !self.capabilities().xattrs.acls {
            return Ok(());
        }
        let name = OsStr::new(xattr::ACL_ACCESS);
        let i = ns.get_mut(ino)?;
        if let Some(id) = i.staged_id() {
            if let Some(v) = self.staging.xattr(id, name).map_err(io_err)?
                && let Ok(acl) = Acl::parse(&v)
            {
                let v = acl.chmod(perm).to_bytes();
                self.staging.set_xattr(id, name, Some(&v)).map_err(io_err)?;
            }
        } else if let Some(c) = i.xattrs.as_mut()
            && let Some(acl) = c.map.get(name).and_then(|v| Acl::parse(v).ok())
        {
            c.map.insert(name.to_owned(), acl.chmod(perm).to_bytes());
        }
        Ok(())
    }

    /// The default ACL of directory `dir` (None: it has none, or the
    /// backend keeps no ACLs), loading its extended attributes if needed.
    fn default_acl(&self, dir: Ino, may_block: bool) -> FsResult<Option<Acl>> {
        if !self.capabilities().xattrs.acls {
            return Ok(None);
        }
        let v = self.read_xattrs(dir, may_block, |m| m.get(OsStr::new(xattr::ACL_DEFAULT)).cloned())?;
        Ok(v.and_then(|v| Acl::parse(&v).ok()))
    }

    // ---- directories -----------------------------------------------------------

    pub fn readdir(&self, dir: Ino, offset: u64, plus: bool, may_block: bool) -> FsResult<Vec<DirEntryOut>> {
        self.ensure_loaded(dir, may_block)?;
        if plus {
            // The attributes go to the kernel's cache: a file being written
            // through passthrough must have its current size and mtime in
            // them (as a lookup's reply does), not the ones of its open.
            let writing: Vec<Ino> = {
                let ns = self.ns.lock();
                let d = ns.dir(dir)?;
                d.listing_after(offset.max(2))
                    .take(1024)
                    .map(|(_, ino, _)| ino)
                    .filter(|i| ns.get(*i).is_ok_and(|i| i.writers > 0))
                    .collect()
            };
            for ino in writing {
                self.refresh_from_staging(ino);
            }
        }
        let mut ns = self.ns.lock();
        let d = ns.dir(dir)?;
        let parent = if dir == ROOT {
            ROOT
        } else {
            ns.get(dir)?.links.first().map_or(ROOT, |l| l.0)
        };
        let mut out = Vec::new();
        if offset < 1 {
            out.push((dir, 1, OsString::from(".")));
        }
        if offset < 2 {
            out.push((parent, 2, OsString::from("..")));
        }
        for (cookie, ino, name) in d.listing_after(offset.max(2)).take(1024) {
            out.push((ino, cookie, name.to_os_string()));
        }
        let mut entries = Vec::with_capacity(out.len());
        for (ino, off, name) in out {
            let kind = ns.get(ino)?.kind;
            let dots = off <= 2;
            let attr = if plus {
                if !dots {
                    ns.add_lookup(ino);
                }
                Some(Self::attr_out(&ns, ino)?)
            } else {
                None
            };
            entries.push(DirEntryOut {
                ino,
                offset: off,
                kind,
                name,
                attr,
            });
        }
        Ok(entries)
    }

    /// Undo the lookup counts of readdirplus entries the kernel did not take.
    pub fn unlookup(&self, ino: Ino) {
        self.forget(ino, 1);
    }

    // ---- flushing ----------------------------------------------------------------

    /// Queues what has become due: files quiet for the debounce time (all of
    /// them with `force`), and directory attributes once nothing is pending
    /// inside the directory.
    pub fn tick(&self, force: bool) {
        let now = Instant::now();
        let debounce = if self.writers_waiting_for_space.load(Ordering::Relaxed) > 0 {
            self.cfg.debounce.min(PRESSURE_DEBOUNCE)
        } else {
            self.cfg.debounce
        };
        let mut ns = self.ns.lock();
        let mut fx = Effects::default();
        // Under cache pressure, clean copies go first.
        let keep = (!self.over_cache_budget()).then(|| self.linger());
        ns.expire_lingering(keep, &mut fx);
        let due: Vec<Ino> = ns
            .debounce
            .iter()
            .filter(|(_, t)| force || now.duration_since(**t) >= debounce)
            .map(|(i, _)| *i)
            .collect();
        for ino in due {
            match ns.queue_publish(ino) {
                Ok(op) => fx.ops.extend(op),
                Err(e) => tracing::warn!(ino, error = %e, "cannot queue publish"),
            }
        }
        if !ns.dirty_dir_attrs.is_empty() {
            let mut busy = ns.dirs_with_unqueued_files();
            // The publishes just queued are not in the scheduler yet.
            busy.extend(fx.ops.iter().flat_map(|op| op.changed_dirs()));
            // Nor while an op holds the directory itself (any op below it
            // does, shared): the times op takes it exclusively and would
            // wait behind that op, and every later op behind the times op.
            // A publish waiting for a writer to close its file could hold
            // the whole tree up that way.
            // (Gathered once from the ops just queued: a tick can queue
            // thousands of publishes.)
            busy.extend(
                fx.ops
                    .iter()
                    .flat_map(|op| op.keys.iter())
                    .filter_map(|(k, _)| match k {
                        flush::Key::Ino(i) => Some(*i),
                        _ => None,
                    }),
            );
            let held = |d: Ino| self.sched.conflicts(&[(flush::Key::Ino(d), flush::Access::Exclusive)]);
            let ready: Vec<Ino> = ns
                .dirty_dir_attrs
                .iter()
                .copied()
                .filter(|d| !(busy.contains(d) || self.sched.dir_busy(*d) || held(*d)))
                .collect();
            for d in ready {
                match ns.queue_dir_attrs(d) {
                    Ok(op) => fx.ops.extend(op),
                    Err(e) => tracing::warn!(ino = d, error = %e, "cannot queue directory attributes"),
                }
            }
        }
        let _ = self.apply(&mut ns, fx); // nothing to acknowledge (a failure is logged; the journal turns unhealthy)
    }

    /// Runs flush ops until the scheduler shuts down (one call per worker thread).
    pub fn run_worker(&self) {
        while let Some(lent) = self.sched.next() {
            // A publish copies the content as it is when the copy starts, and
            // only while nobody has the file open for writing (writes through
            // passthrough are invisible to the daemon); a change during the
            // copy (a new open bumps the generation) means: copy again.
            let mut published_generation = 0;
            let mut expect = lent.expect;
            // A file removed (no name left) while its publish waited: its
            // content is never published, so no writer is waited for.
            let mut unnamed = false;
            let writer_busy = match &lent.action {
                Action::Publish { ino, staging, .. } => {
                    let (busy, foreign) = match self.ns.lock().get_with_replaces(*ino) {
                        Ok((i, replaces)) => {
                            published_generation = i.generation;
                            // What the first name holds on the backend now:
                            // this file as last published or loaded, or the
                            // older file it was renamed over.
                            expect = i.known().or(replaces);
                            // A retry may follow a rename that did happen (an
                            // error after it): the name then holds this mount's
                            // own new file. Only a first attempt is checked.
                            if lent.attempts > 0 {
                                expect = None;
                            }
                            unnamed = i.links.is_empty();
                            let writing = i.writers > 0 && i.fsync_waiters == 0;
                            (writing && !unnamed, i.foreign_writer && !unnamed)
                        }
                        Err(_) => (false, false),
                    };
                    busy || (foreign && self.foreign_writer_active(*ino, *staging))
                }
                _ => false,
            };
            if let Action::Rename { .. } = &lent.action
                && expect.is_none()
                && let Some(src) = lent.objects.first()
            {
                // A source renamed while its publish was queued has its
                // backend inode now: that publish ran first.
                expect = self.ns.lock().get(*src).ok().and_then(|i| i.known());
            }
            // (A version recorded before this mount changed the file's mtime
            // itself no longer holds.)
            let expect = expect.map(|k| self.ns.lock().checkable(k));
            let pub_ino = match &lent.action {
                Action::Publish { ino, .. } => Some(*ino),
                _ => None,
            };
            let started = Instant::now();
            let result = if unnamed {
                Ok(Published {
                    superseded: true,
                    ..Default::default()
                })
            } else if writer_busy {
                Err(io::Error::other(flush::WriterBusy))
            } else {
                publish::execute(
                    &*self.backend,
                    &self.temps,
                    &lent.action,
                    expect,
                    lent.attempts > 0,
                    self.capabilities(),
                    |id| match self.staging.open_read(id) {
                        Ok(f) => Ok(Some(f)),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                        Err(e) => Err(e),
                    },
                    || {
                        pub_ino.is_some_and(|ino| {
                            self.ns.lock().get(ino).is_ok_and(|i| {
                                i.generation == published_generation && (i.writers == 0 || i.fsync_waiters > 0)
                            })
                        })
                    },
                )
            };
            if !writer_busy && let Some(k) = Action::KINDS.iter().position(|k| *k == lent.action.name()) {
                self.sched.stats.latency[k].record(started.elapsed());
            }
            let conflict_with = match &result {
                Err(e) => publish::conflict(e).map(|c| c.found.clone()),
                Ok(_) => None,
            };
            // An op on an object whose publish found it already removed (so
            // it never reached the backend): nothing left to do.
            let result = match result {
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOENT)
                        && matches!(
                            lent.action,
                            Action::Rename { .. }
                                | Action::Link { .. }
                                | Action::SetAttr { .. }
                                | Action::SetXattr { .. }
                        )
                        && self.all_removed(&lent.objects) =>
                {
                    Ok(Published::default())
                }
                r => r,
            };
            let (outcome, published) = match result {
                Ok(p) => (Outcome::Done, Some(p)),
                Err(e) if flush::is_transient(&e) => (Outcome::Retry(e), None),
                Err(e) => (Outcome::Failed(e), None),
            };
            let failed = matches!(outcome, Outcome::Failed(_)) && conflict_with.is_none();
            // The new backend identity is known before the keys are released:
            // the next op on this file checks against it.
            if let (
                Some(ino),
                Some(Published {
                    backend: Some(b),
                    superseded: false,
                    ..
                }),
            ) = (pub_ino, &published)
            {
                // (Its version is not what a queued change of its mtime
                // will leave.)
                let version = if self.sched.retime_pending(ino) { 0 } else { b.version };
                self.ns.lock().set_backend(ino, Known { version, ..*b });
            }
            // Recorded before the op's keys are released: an op that depends
            // on this one can only have run once this one is marked done.
            if !matches!(outcome, Outcome::Retry(_))
                && let (Some(j), Some(seq)) = (self.journal.get(), lent.journal_seq)
            {
                j.done(seq);
            }
            self.remove_leftover_temps(Duration::from_secs(1));
            let Some(op) = self.sched.finish(lent, outcome) else {
                continue;
            };
            let mut discard = None;
            let mut failed_copy = None;
            {
                let mut ns = self.ns.lock();
                // Attribute changes leave the parent's entries (and mtime) alone.
                if !matches!(
                    op.action,
                    Action::SetAttr { .. } | Action::SetXattr { .. } | Action::Barrier(_)
                ) {
                    for d in op.changed_dirs() {
                        ns.entries_changed_on_backend(d);
                    }
                }
                if let (Action::Publish { ino, staging, .. }, Some(theirs)) = (&op.action, &conflict_with) {
                    match ns.publish_conflict(*ino, theirs, self.sched.retime_pending(*ino)) {
                        ConflictOutcome::BackendWins => self.keep_conflicting_copy(*staging, &op.action, false),
                        ConflictOutcome::StillOpen => self.keep_conflicting_copy(*staging, &op.action, true),
                        ConflictOutcome::ChangedAgain => {}
                    }
                } else if let Action::Publish { ino, staging, .. } = &op.action {
                    match published {
                        Some(p) if !p.superseded => {
                            self.sched.stats.files_published.fetch_add(1, Ordering::Relaxed);
                            self.sched.stats.bytes_published.fetch_add(p.bytes, Ordering::Relaxed);
                            let linger = !self.linger().is_zero() && !self.over_cache_budget();
                            discard = ns.publish_done(*ino, published_generation, linger);
                        }
                        _ => {
                            ns.publish_abandoned(*ino);
                            if failed {
                                failed_copy = self.keep_failed_copy(*staging, &op.action);
                            }
                        }
                    }
                }
                let _ = self.apply(&mut ns, Effects::default()); // nothing to acknowledge (a failure is logged; the journal turns unhealthy)
            }
            if let Some(kept) = failed_copy {
                // Off the namespace lock: it asks the backend.
                self.record_failed_copy(&kept, &op.action);
            }
            if let Some(id) = discard {
                self.discard_staging(id);
            }
            self.sched.settled();
        }
    }

    /// Whether every object is gone from the overlay or has no name left.
    fn all_removed(&self, objects: &[Ino]) -> bool {
        let ns = self.ns.lock();
        !objects.is_empty() && objects.iter().all(|o| ns.get(*o).map_or(true, |i| i.links.is_empty()))
    }

    /// Keeps a copy (a hard link: no data is copied) of a file whose publish
    /// failed for good in `<cache_dir>/lost+found/failed/`: the overlay may
    /// drop its staged copy later, the data must outlive that.
    fn keep_failed_copy(&self, staging: u64, action: &Action) -> Option<std::path::PathBuf> {
        let path = action.path().map(|p| p.display()).unwrap_or_default();
        match self.staging.link_aside(staging, "failed", &path) {
            Ok(kept) => {
                tracing::warn!(path = %path, kept = %kept.display(), "a copy of the file that could not be published is kept");
                Some(kept)
            }
            Err(e) => {
                tracing::error!(path = %path, error = %e, "cannot keep a copy of a file that could not be published");
                None
            }
        }
    }

    /// What `efscache scrub --fix --cache-dir` needs to publish a copy kept
    /// by `keep_failed_copy` once the cause is fixed (asks the backend).
    fn record_failed_copy(&self, kept: &std::path::Path, action: &Action) {
        if let Some(j) = self.journal.get()
            && let Err(e) = crate::repair::record(kept, j.header(), action, &*self.backend)
        {
            tracing::warn!(kept = %kept.display(), error = %e, "cannot record how to re-publish a kept copy");
        }
    }

    /// Moves this mount's version of a file that lost a conflict out of
    /// staging into `<cache_dir>/lost+found/conflicts/` (never deleted).
    ///
    /// With `still_open`, the file is in use through the mount and keeps its
    /// staged copy: a hard link is kept instead. So does a journal that may
    /// still name it (see `discard_staging`): the staging file goes once that
    /// allows.
    fn keep_conflicting_copy(&self, staging: u64, action: &Action, still_open: bool) {
        let path = action.path().map(|p| p.display()).unwrap_or_default();
        let kept = if still_open {
            self.staging.link_aside(staging, "conflicts", &path)
        } else if self.journal.get().is_some_and(|j| !j.healthy()) {
            let kept = self.staging.link_aside(staging, "conflicts", &path);
            if kept.is_ok() {
                self.discard_staging(staging);
            }
            kept
        } else {
            self.staging.keep_aside(staging, "conflicts", &path)
        };
        match kept {
            Ok(kept) => tracing::warn!(
                path = %path,
                kept = %kept.display(),
                "another client replaced this file on the backend: its version stays; this mount's version is kept aside"
            ),
            Err(e) => {
                tracing::error!(path = %path, error = %e, "cannot keep this mount's version of a conflicting file aside")
            }
        }
    }

    /// Whether a writer from a dead mount still has the staging file of
    /// adopted file `ino` open (then its publish waits); forgets the writer
    /// once it is gone.
    fn foreign_writer_active(&self, ino: Ino, staging: u64) -> bool {
        if self.staging.open_for_write_elsewhere(staging) {
            return true;
        }
        let mut ns = self.ns.lock();
        ns.foreign_writer_gone(ino);
        let _ = self.apply(&mut ns, Effects::default()); // nothing to acknowledge (a failure is logged; the journal turns unhealthy)
        false
    }

    /// Removes this mount's temp files whose removal failed earlier (at most
    /// once per `every`); their directories get their times back (see
    /// `entries_changed_on_backend`). Returns (removed, left).
    fn remove_leftover_temps(&self, every: Duration) -> (usize, usize) {
        let (removed, left) = self.temps.remove_leftovers(&*self.backend, every);
        if !removed.is_empty() {
            let mut ns = self.ns.lock();
            for path in &removed {
                if let Some((dir, _)) = path.split_last()
                    && let Ok(Some(d)) = ns.resolve(&dir)
                {
                    ns.entries_changed_on_backend(d);
                }
            }
            let _ = self.apply(&mut ns, Effects::default()); // nothing to acknowledge (a failure is logged; the journal turns unhealthy)
        }
        (removed.len(), left)
    }

    /// The `sync` barrier: publishes everything accepted so far and waits for
    /// it (files still open for writing are reported, not waited for).
    pub fn sync(&self, deadline: Option<Instant>) -> SyncReport {
        if let Err(e) = self.sync_journal() {
            tracing::warn!(error = %e, "cannot sync the journal");
        }
        let complete = loop {
            self.tick(true);
            // Queue first: a finishing op may still re-dirty a directory, but
            // once nothing is queued nothing can until someone changes the tree.
            // Publishes of files open for writing wait for the close; those
            // files are reported, not waited for.
            let waiting = if self.sched.queued() == 0 {
                Some(Vec::new())
            } else {
                self.sched.only_waiting_for_writers()
            };
            let idle = waiting.as_ref().is_some_and(|inos| {
                let ns = self.ns.lock();
                inos.iter().all(|i| ns.get(*i).is_ok_and(|i| i.writers > 0))
            });
            let pending = {
                let ns = self.ns.lock();
                // Directories waiting only for files still open for writing
                // (unqueued, or whose queued publish waits for the close) do
                // not hold up the barrier (those files are reported instead).
                let held_open: std::collections::HashSet<Ino> = ns
                    .dirty_files
                    .iter()
                    .chain(waiting.iter().flatten())
                    .filter_map(|i| ns.get(*i).ok())
                    .filter(|i| i.writers > 0)
                    .flat_map(|i| i.links.iter().map(|(p, _)| *p))
                    .collect();
                !ns.debounce.is_empty() || ns.dirty_dir_attrs.iter().any(|d| !held_open.contains(d))
            };
            // Temp files whose removal failed are removed before the
            // barrier holds (none may stay behind on the backend).
            let (removed, left) = self.remove_leftover_temps(Duration::from_millis(500));
            if idle && !pending && removed == 0 && left == 0 {
                break true;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break false;
            }
            let step = Instant::now() + Duration::from_millis(20);
            self.sched.wait_idle(Some(deadline.map_or(step, |d| d.min(step))));
        };
        let ns = self.ns.lock();
        let mut open_files = Vec::new();
        for ino in &ns.dirty_files {
            if ns.get(*ino).is_ok_and(|i| i.writers > 0) {
                open_files.push(ns.path_of(*ino).map(|p| p.display()).unwrap_or_default());
            }
        }
        SyncReport {
            complete,
            failures: self.sched.failures(),
            open_files,
        }
    }

    /// `sync` for a caller that may have just closed files (`efscache
    /// sync` right after a copy, an unmount). close(2) returns before the
    /// kernel's RELEASE of the file reaches the daemon, so a file closed
    /// just before may still count as open for writing, and would be left
    /// unpublished: give such files a moment to be released, and sync again.
    pub fn sync_after_closes(&self, deadline: Option<Instant>) -> SyncReport {
        let grace = Instant::now() + Duration::from_secs(1);
        loop {
            let report = self.sync(deadline);
            if report.open_files.is_empty() || !report.complete || Instant::now() >= grace {
                return report;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn status(&self) -> FsStatus {
        let ns = self.ns.lock();
        let mut pending_bytes = 0;
        let mut open_for_write = 0;
        for i in ns.inodes() {
            if i.is_dirty() || i.publish_queued > 0 {
                pending_bytes += i.attr.size;
            }
            if i.writers > 0 {
                open_for_write += 1;
            }
        }
        FsStatus {
            inodes: ns.len(),
            dirty_files: ns.dirty_files.len(),
            open_for_write,
            waiting_debounce: ns.debounce.len(),
            pending_bytes,
            dirty_dirs: ns.dirty_dir_attrs.len(),
            temps_to_remove: self.temps.leftover_count(),
        }
    }
}

/// Probes what the backend accepts (once, at mount, before anything is
/// replayed or served). Extended attributes count only where the cache
/// disk can hold them too (a staged file keeps them there), and only with
/// `xattrs` (the `noxattr` option turns them off).
pub fn probe_capabilities(
    backend: &dyn Backend,
    staging: &Staging,
    temps: &TempNames,
    xattrs: bool,
) -> crate::backend::Capabilities {
    let mut caps = crate::backend::Capabilities::probe(backend, || temps.next(), |p| temps.remove(backend, p));
    caps.xattrs = if xattrs {
        caps.xattrs.intersect(staging.probe_xattrs())
    } else {
        crate::backend::XattrCaps::default()
    };
    tracing::info!(xattrs = ?caps.xattrs, "extended attribute namespaces kept");
    caps
}

/// New objects in a setgid directory take the directory's group.
fn inherit_gid(ns: &Namespace, parent: Ino, gid: u32) -> FsResult<u32> {
    let p = ns.get(parent)?;
    Ok(if p.attr.perm & libc::S_ISGID != 0 {
        p.attr.gid
    } else {
        gid
    })
}

/// Reads until `buf` is full or end of file (a local staging file).
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Copies a backend file into staging with large reads.
fn copy_up(backend: &dyn Backend, src: &File, dst: &File) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = backend.read_at(src, &mut buf, off)?;
        if n == 0 {
            break;
        }
        dst.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// Flushes a staging file that holds content the backend already has (a
/// copy-up, or the copy kept after a publish), or a closed change of a file
/// the backend has, to the cache disk before it is opened for writing. That
/// open journals a state naming the file without a size, and after a
/// machine crash recovery publishes whatever the file then holds: content
/// still in the page cache could come back short or empty and replace the
/// intact backend file. (A closed change's state holds its size, so
/// recovery refuses a short copy; the open drops it.) Writes made after the
/// open are the writer's to fsync, as on any file system.
fn durable_before_journaled(staging: &Staging, id: u64) -> FsResult<()> {
    staging.open_rw(id).and_then(|f| f.sync_data()).map_err(io_err)
}

/// Gives a staging file the overlay's atime and mtime. The kernel stamps
/// staging files with its own (coarser) clock; the overlay's times come from
/// the daemon's. Without this, taking size and mtime back from the staging
/// file after passthrough writes (`refresh_from_staging`) would move the
/// mtime of a file that was never written to.
fn stamp_staging(file: &File, attr: &Attr) {
    let times = std::fs::FileTimes::new()
        .set_accessed(attr.atime.to_system_time())
        .set_modified(attr.mtime.to_system_time());
    if let Err(e) = file.set_times(times) {
        tracing::debug!(error = %e, "cannot set a staging file's times");
    }
}
