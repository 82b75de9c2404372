//! Recovery after a crash (`kill -9`, OOM, power loss): the new mount shows
//! everything the dead one had acknowledged from its first reply on, and
//! the backend catches up in the background like after any change.
//!
//! Before the first reply (`start_fs`):
//! 1. The old journal is read.
//! 2. The overlay is rebuilt (`Rebuild`): every pending op is applied to it
//!    in journal order (`Namespace::replay`), loading the directories its
//!    paths go through from the backend as it is now; an op the backend
//!    already shows done (the crash came between it and its done mark) is
//!    dropped, every other one gets the scheduler keys of this overlay. The
//!    pending state (files with unpublished staged content, directory
//!    attributes) is then taken back under the names it had.
//! 3. The publish temp files the dead instance left in the directories just
//!    loaded are removed, before any op can move those directories.
//! 4. A new journal holding the rebuilt ops and the overlay's pending state
//!    replaces the old one (a crash from here on loses nothing), and the ops
//!    are queued for the flush workers like this mount's own: the overlay
//!    keeps a directory authoritative while ops in it are pending, and a
//!    publish checks that the backend file it replaces is the one loaded.
use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{Backend, Kind, Known, RelPath, Timespec};
use crate::flush::publish::TempNames;
use crate::flush::{Action, FlushOp, Scheduler};
use crate::fs::{Fs, FsConfig};
use crate::journal::{self, Header, PendingState};
use crate::namespace::{AdoptedFile, Attr, Ino, ROOT, Replayed, StagedCopy};
use crate::staging::Staging;

/// What the journal of an earlier run still has to do for this backend.
struct Pending {
    header: Header,
    ops: Vec<FlushOp>,
    states: Vec<PendingState>,
    /// See `journal::Replay::state_expects`.
    state_expects: HashMap<Ino, Known>,
    /// See `journal::Replay::rewritten`.
    rewritten: HashSet<u64>,
}
/// Reads the journal in `cache` (if any). Refuses one with pending work for
/// another backend than `current`.
fn read_pending(cache: &Path, current: &Header) -> Result<Option<Pending>, String> {
    let Some(r) = journal::read(cache).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let pending = r.ops.len() + r.states.len();
    let same_backend = r.header.backend == current.backend && r.header.backend_root_ino == current.backend_root_ino;
    if !same_backend {
        if pending == 0 {
            return Ok(None);
        }
        return Err(format!(
            "cache_dir {} holds {pending} changes not yet on backend {} (root inode {}), not {}; \
             mount that backend with this cache_dir to finish them, or give this mount another cache_dir",
            cache.display(),
            r.header.backend.display(),
            r.header.backend_root_ino,
            current.backend.display()
        ));
    }
    if pending == 0 {
        return Ok(None);
    }
    tracing::warn!(
        ops = r.ops.len(),
        files_and_dirs = r.states.len(),
        records = r.records,
        "recovering changes from the journal of an earlier run"
    );
    // Staged content that was changed again after its publish was queued is
    // published (as the newer content) from the pending state instead; and
    // only the last queued publish of a staging file carries its current
    // content (and size): an earlier one (its file was closed, reopened,
    // rewritten and closed again) would be refused as incomplete.
    let restaged: HashSet<u64> = r
        .states
        .iter()
        .filter_map(|s| match s {
            PendingState::File { staging, .. } => Some(*staging),
            PendingState::Dir { .. } => None,
        })
        .collect();
    let mut last_publish: std::collections::HashMap<u64, Option<u64>> = std::collections::HashMap::new();
    for op in &r.ops {
        if let Action::Publish { staging, .. } = &op.action {
            last_publish.insert(*staging, op.journal_seq);
        }
    }
    let ops = r
        .ops
        .into_iter()
        .filter(|op| match &op.action {
            Action::Publish { staging: id, .. } => {
                !restaged.contains(id) && last_publish.get(id) == Some(&op.journal_seq)
            }
            _ => true,
        })
        .collect();
    Ok(Some(Pending {
        header: r.header,
        ops,
        states: r.states,
        state_expects: r.state_expects,
        rewritten: r.rewritten,
    }))
}

/// Brings up the filesystem core over `backend` with the cache dir `cache`,
/// ready to serve: probes the backend, rebuilds the overlay from the
/// journal an earlier run left (if any, see the module docs), starts a new
/// journal that carries its pending work and queues that work. Staging
/// files nothing refers to are moved into `lost+found`.
#[allow(clippy::too_many_arguments)]
pub fn start_fs(
    cache: &Path,
    backend: Arc<dyn Backend>,
    staging: Staging,
    sched: Arc<Scheduler>,
    temps: TempNames,
    header: Header,
    fs_cfg: FsConfig,
) -> Result<Arc<Fs>, String> {
    // What the backend keeps decides how replayed publishes are done.
    let caps = crate::fs::probe_capabilities(&*backend, &staging, &temps, fs_cfg.xattrs);
    let pending = read_pending(cache, &header)?;
    let max_staged = staging.ids().unwrap_or_default().into_iter().max().unwrap_or(0);
    let fs = Arc::new(Fs::new(backend, staging, sched, temps, fs_cfg).map_err(|e| format!("backend root: {e}"))?);
    fs.set_capabilities(caps);
    fs.reserve_staging_ids(max_staged);
    let journal_err = |e: io::Error| format!("cannot write the journal in {}: {e}", cache.display());
    let Some(Pending {
        header: old,
        ops,
        states,
        state_expects,
        rewritten,
    }) = pending
    else {
        fs.start_journal(cache, header, &mut []).map_err(journal_err)?;
        keep_leftovers(cache, fs.staging(), &fs.staging_in_use(), &HashSet::new());
        if let Err(e) = fs.staging().rescan() {
            tracing::warn!(error = %e, "cannot measure the staging area");
        }
        return Ok(fs);
    };
    let started = Instant::now();
    // Staging files the old journal names are never deleted as clean copies,
    // even if they cannot be taken back (then they go to lost+found).
    let named: HashSet<u64> = ops
        .iter()
        .filter_map(|op| match &op.action {
            Action::Publish { staging, .. } => Some(*staging),
            _ => None,
        })
        .chain(states.iter().filter_map(|st| match st {
            PendingState::File { staging, .. } => Some(*staging),
            _ => None,
        }))
        .collect();
    let mut rb = Rebuild::new(&fs, &old.temp_prefix);
    let total = ops.len();
    let mut queued = Vec::new();
    for op in ops {
        let what = (
            op.action.name(),
            op.action.path().map(|p| p.display()).unwrap_or_default(),
        );
        let later_rewritten = op.journal_seq.is_some_and(|seq| rewritten.contains(&seq));
        match rb.replay(op.action, op.expect, later_rewritten) {
            Ok(Some(op)) => queued.push(op),
            Ok(None) => {}
            Err(_) if rb.fatal.is_some() => break,
            Err(e) => {
                tracing::error!(op = what.0, path = %what.1, error = %e, "a journaled change cannot be replayed; its data (if any) is kept in lost+found");
                rb.failures
                    .push(serde_json::json!({"op": what.0, "path": what.1, "error": e}));
            }
        }
    }
    let adopted = states.len();
    for st in states {
        if rb.fatal.is_some() {
            break;
        }
        if let Err(e) = rb.adopt(&st, state_expects.get(&st.ino()).copied()) {
            tracing::error!(state = ?st, reason = %e, "pending change could not be taken back after the crash; its data (if any) is kept in lost+found");
            rb.failures
                .push(serde_json::json!({"state": format!("{st:?}"), "error": e}));
        }
    }
    if let Some(e) = rb.fatal {
        // Nothing was changed yet: the old journal and staging files stay.
        return Err(format!(
            "cannot recover the changes of the last run: {e}; nothing is lost (the journal in {} is unchanged): \
             mount again once the backend answers",
            cache.display()
        ));
    }
    // The dead instance's temp files go before anything can move their
    // directories (a replayed rename would take them along).
    let mut orphans_removed = 0;
    for p in &rb.orphans {
        match fs.backend.unlink(p) {
            Ok(()) => orphans_removed += 1,
            Err(e) => tracing::warn!(path = %p.display(), error = %e, "cannot remove an orphaned publish temp file"),
        }
    }
    // From the first reply on, a crash leaves the recovered work in the new
    // journal, with whatever this mount adds after it.
    fs.start_journal(cache, header, &mut queued).map_err(journal_err)?;
    if let Some(j) = fs.journal()
        && let Err(e) = j.sync()
    {
        return Err(format!("cannot sync the journal in {}: {e}", cache.display()));
    }
    for id in std::mem::take(&mut rb.discard) {
        fs.staging().remove(id);
    }
    keep_leftovers(cache, fs.staging(), &fs.staging_in_use(), &named);
    if let Err(e) = fs.staging().rescan() {
        tracing::warn!(error = %e, "cannot measure the staging area");
    }
    let seconds = started.elapsed().as_secs_f64();
    tracing::warn!(
        ops = total,
        queued = queued.len(),
        already_applied = rb.applied,
        superseded = rb.superseded,
        states = adopted,
        orphans_removed,
        failed = rb.failures.len(),
        seconds,
        "overlay rebuilt from the journal; the backend catches up in the background"
    );
    fs.set_recovery_report(serde_json::json!({
        "ops": total,
        "ops_queued": queued.len(),
        "ops_already_applied": rb.applied,
        "ops_superseded": rb.superseded,
        "states": adopted,
        "orphans_removed": orphans_removed,
        "failed": rb.failures.len(),
        "failures": rb.failures,
        "seconds": seconds,
    }));
    for op in queued {
        fs.sched.enqueue(op);
    }
    Ok(fs)
}

/// The overlay being rebuilt from a dead instance's journal (see the module
/// docs).
struct Rebuild<'a> {
    fs: &'a Fs,
    /// Where each directory loaded from the backend (or listed in one) is on
    /// the backend now: replayed renames move it in the overlay only.
    backend_path: HashMap<Ino, RelPath>,
    /// The dead instance's publish temp prefix.
    old_prefix: &'a str,
    /// Its temp files found in the directories loaded.
    orphans: Vec<RelPath>,
    /// Ops the backend already showed done.
    applied: usize,
    /// Publishes of content that was replaced or removed since.
    superseded: usize,
    /// Why the rebuild cannot go on (the backend or the cache disk does not
    /// answer): the mount fails and the old journal stays as it is.
    fatal: Option<String>,
    failures: Vec<serde_json::Value>,
    /// Staging ids no replayed file refers to any more (removed once the
    /// new journal no longer names them).
    discard: Vec<u64>,
}

impl<'a> Rebuild<'a> {
    fn new(fs: &'a Fs, old_prefix: &'a str) -> Rebuild<'a> {
        Rebuild {
            fs,
            backend_path: HashMap::from([(ROOT, RelPath::root())]),
            old_prefix,
            orphans: Vec::new(),
            applied: 0,
            superseded: 0,
            fatal: None,
            failures: Vec::new(),
            discard: Vec::new(),
        }
    }

    /// Loads `dir`'s listing from the backend, if the overlay has none yet.
    fn load(&mut self, dir: Ino) -> Result<(), String> {
        if self.fs.namespace().is_loaded(dir).map_err(|e| e.to_string())? {
            return Ok(());
        }
        let path = self
            .backend_path
            .get(&dir)
            .cloned()
            .ok_or("a directory on the way is not on the backend")?;
        let listing = self.list(&path)?;
        let mut subdirs = Vec::new();
        for (name, st) in &listing {
            if name.as_encoded_bytes().starts_with(self.old_prefix.as_bytes()) {
                self.orphans.push(path.join(name));
            } else if st.kind == Kind::Dir {
                subdirs.push(name.clone());
            }
        }
        let mut ns = self.fs.namespace();
        ns.merge_listing(dir, listing, Instant::now())
            .map_err(|e| e.to_string())?;
        for name in subdirs {
            if let Ok(Some(ino)) = ns.lookup(dir, &name) {
                self.backend_path.insert(ino, path.join(&name));
            }
        }
        Ok(())
    }

    /// The backend listing of `path`, retried a few times; an error that is
    /// not about that directory (it is gone or no directory) is fatal.
    fn list(&mut self, path: &RelPath) -> Result<Vec<(std::ffi::OsString, crate::backend::Stat)>, String> {
        let mut wait = std::time::Duration::from_millis(200);
        loop {
            match crate::meta::load_dir(&*self.fs.backend, path, self.fs.config().meta_parallel) {
                Ok(l) => return Ok(l),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                    return Err(format!("cannot list {}: {e}", path.display()));
                }
                Err(e) if wait > std::time::Duration::from_secs(2) => {
                    let why = format!("cannot list {} on the backend: {e}", path.display());
                    self.fatal = Some(why.clone());
                    return Err(why);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot list a directory to recover the journal; retrying");
                    std::thread::sleep(wait);
                    wait *= 2;
                }
            }
        }
    }

    /// Loads every directory on the way to `dir` and `dir` itself: its
    /// inode, or None where a name on the way is missing or no directory
    /// (replaying the op then says what is wrong).
    fn load_dirs(&mut self, dir: &RelPath) -> Result<Option<Ino>, String> {
        let mut cur = ROOT;
        self.load(cur)?;
        for name in &dir.0 {
            let next = {
                let ns = self.fs.namespace();
                match ns.lookup(cur, name) {
                    Ok(Some(n)) if ns.get(n).is_ok_and(|i| i.kind == Kind::Dir) => n,
                    _ => return Ok(None),
                }
            };
            self.load(next)?;
            cur = next;
        }
        Ok(Some(cur))
    }

    /// Applies one journaled op to the overlay: the op to queue, or None
    /// when there is nothing left to do. `later_rewritten`: see
    /// `journal::Replay::rewritten`.
    fn replay(
        &mut self,
        action: Action,
        expect: Option<Known>,
        later_rewritten: bool,
    ) -> Result<Option<FlushOp>, String> {
        for p in action.paths() {
            if let Some((dir, _)) = p.split_last() {
                self.load_dirs(&dir)?;
            }
        }
        let staged = match &action {
            Action::Publish { staging, size, .. } => match self.staged_copy(*staging, *size, later_rewritten)? {
                Some(c) => Some(c),
                // Superseded (rewritten and published again, or removed):
                // what the backend has under the name stays.
                None => {
                    self.superseded += 1;
                    return Ok(None);
                }
            },
            _ => None,
        };
        match self.fs.namespace().replay(action, expect, staged, &mut self.discard) {
            Ok(Replayed::Queue(op)) => Ok(Some(op)),
            Ok(Replayed::Applied) => {
                self.applied += 1;
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// The staged copy of a replayed publish, unless it lost its tail (a
    /// machine crash before the data reached the disk): that is never
    /// published, the file is kept in lost+found. None: it is gone, or its
    /// file was written again after (`later_rewritten`) and has another
    /// size now: superseded by that later change.
    fn staged_copy(&mut self, id: u64, size: u64, later_rewritten: bool) -> Result<Option<StagedCopy>, String> {
        use std::os::unix::fs::MetadataExt;
        let md = match std::fs::metadata(self.fs.staging().path(id)) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.cache_failed(e)),
        };
        if md.len() != size && later_rewritten {
            return Ok(None);
        }
        if md.len() != size {
            return Err(format!(
                "staged data has {} bytes, not the {size} it had when closed (lost in a machine crash before fsync?)",
                md.len()
            ));
        }
        Ok(Some(StagedCopy { blocks: md.blocks() }))
    }

    /// The cache dir's disk failed: fatal.
    fn cache_failed(&mut self, e: io::Error) -> String {
        let why = format!("cannot read the staging area: {e}");
        self.fatal = Some(why.clone());
        why
    }

    /// The loaded directory at `path`.
    fn dir(&mut self, path: &RelPath) -> Result<Ino, String> {
        self.load_dirs(path)?
            .ok_or_else(|| format!("{}: no such directory", path.display()))
    }

    /// Takes back pending state: a file with unpublished staged content
    /// under its names (`expect`: what its first name held on the backend
    /// when the state was recorded), or a directory's attributes.
    fn adopt(&mut self, st: &PendingState, expect: Option<Known>) -> Result<(), String> {
        match st {
            PendingState::File {
                paths,
                perm,
                uid,
                gid,
                staging,
                size,
                ..
            } => {
                let mut names = Vec::new();
                for p in paths {
                    let (dir, name) = p.split_last().ok_or("the backend root is not a file")?;
                    names.push((self.dir(&dir)?, name.to_owned()));
                }
                use std::os::unix::fs::MetadataExt;
                let staged = self.fs.staging();
                let md = match std::fs::metadata(staged.path(*staging)) {
                    Ok(md) => md,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(format!("staged data: {e}")),
                    Err(e) => return Err(self.cache_failed(e)),
                };
                if size.is_some_and(|s| s != md.len()) {
                    return Err(format!(
                        "staged data has {} bytes, not the {} it had when closed (lost in a machine crash before fsync?)",
                        md.len(),
                        size.unwrap_or(0)
                    ));
                }
                let foreign = size.is_none() && staged.open_for_write_elsewhere(*staging);
                let attr = Attr {
                    perm: *perm,
                    uid: *uid,
                    gid: *gid,
                    size: md.len(),
                    blocks: md.blocks(),
                    rdev: 0,
                    atime: Timespec {
                        sec: md.atime(),
                        nsec: md.atime_nsec() as u32,
                    },
                    mtime: Timespec {
                        sec: md.mtime(),
                        nsec: md.mtime_nsec() as u32,
                    },
                    ctime: Timespec::now(),
                };
                let file = AdoptedFile {
                    staging: *staging,
                    attr,
                    foreign_writer: foreign,
                    expect,
                };
                self.fs
                    .namespace()
                    .adopt_file(&names, file, Instant::now(), &mut self.discard)
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
            PendingState::Dir { path, attrs, .. } => {
                let d = self.dir(path)?;
                self.fs.namespace().adopt_dir_attrs(d, attrs).map_err(|e| e.to_string())
            }
        }
    }
}

/// Moves staging files that nothing refers to aside, before serving
/// (data a crash could not account for stays inspectable). Only clean
/// copies kept after their publish (marked, see `Staging::mark_clean`) that
/// the old journal does not name (`named`) are deleted: the backend has
/// their content.
fn keep_leftovers(cache: &Path, staging: &Staging, in_use: &HashSet<u64>, named: &HashSet<u64>) {
    let Ok(rd) = std::fs::read_dir(cache.join("staging")) else {
        return;
    };
    let mut left: Vec<_> = rd
        .flatten()
        .filter(|e| {
            let id = Staging::id_of(&e.file_name());
            !id.is_some_and(|id| in_use.contains(&id) && e.path() == staging.path(id))
        })
        .collect();
    left.retain(|e| {
        let named = Staging::id_of(&e.file_name()).is_some_and(|id| named.contains(&id));
        let clean = !named && e.metadata().is_ok_and(|m| m.is_file() && Staging::is_marked_clean(&m));
        !(clean && std::fs::remove_file(e.path()).is_ok())
    });
    if left.is_empty() {
        return;
    }
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let dest = cache.join("lost+found").join(secs.to_string());
    if std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dest)
        .is_ok()
    {
        for e in &left {
            let _ = std::fs::rename(e.path(), dest.join(e.file_name()));
        }
        tracing::warn!(count = left.len(), dir = %dest.display(), "staging files from an earlier run were moved aside");
    }
}
