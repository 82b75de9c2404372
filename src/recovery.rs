//! Recovery after a crash (`kill -9`, OOM, power loss): finish what the
//! journal says was accepted, while the new mount already serves.
//!
//! Before the first reply (`start_fs`): the old journal is read and its
//! pending work is carried into the new journal (so a crash during recovery
//! loses nothing), and a `RecoveryGate` is put up: the listings of the
//! directories that work changes, and changes to the names on the way to
//! it, wait until recovery is done. Everything else is served at once.
//!
//! In the background (`recover`):
//! 1. Publish temp files the dead instance left in the directories of its
//!    unfinished publishes are removed (no tree walk).
//! 2. The pending ops run against the backend, in journal order under their
//!    original scheduler keys (so in parallel wherever the original run
//!    could have been), each marked done in the new journal. Every op is
//!    idempotent; an op whose source is already gone was applied before the
//!    crash (or superseded by newer staged content) and counts as done.
//! 3. The pending state (files with unpublished staged content, directory
//!    attributes) is taken back into the overlay (`Fs::adopt`), whose names
//!    are valid now that every op has run; the gate opens.
use std::collections::HashSet;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::backend::{AttrSet, Backend, RelPath};
use crate::flush::publish::{self, TempNames};
use crate::flush::{self, Action, Failure, FlushOp, Outcome, RetryPolicy, Scheduler};
use crate::fs::{Fs, FsConfig};

pub mod gate;
use crate::journal::{self, Header, Journal, PendingState};
use crate::namespace::Ino;
use crate::staging::Staging;
use gate::RecoveryGate;

/// How replay runs.
#[derive(Clone, Debug)]
pub struct ReplayConfig {
    pub workers: usize,
    pub dir_concurrency: usize,
    pub retry: RetryPolicy,
}

/// What the journal of an earlier run still has to do for this backend.
struct Pending {
    header: Header,
    ops: Vec<FlushOp>,
    states: Vec<PendingState>,
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
        "recovering changes from the journal of an earlier run (in the background; the mount serves meanwhile)"
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
    }))
}

/// A directory's identity (dev, ino) when its times were read, and the
/// times to put back.
type DirTimes = ((u64, u64), AttrSet);

/// What the overlay must not show or change until recovery is done: the
/// listings of directories whose entries the recovered work changes, every
/// name on the way to a recovered path (renaming or removing one would pull
/// the path from under a replayed op), and the directories whose journaled
/// attributes are still to be taken back (their attributes and their
/// listing: an entry created there would give them a newer mtime the old
/// one must not undo), the root's when recovered ops change it.
fn gate_for(ops: &[FlushOp], states: &[PendingState]) -> RecoveryGate {
    let mut dirs: std::collections::HashMap<RelPath, usize> = std::collections::HashMap::new();
    let mut objs: std::collections::HashMap<RelPath, usize> = std::collections::HashMap::new();
    let mut attrs = HashSet::new();
    let mut entries = HashSet::new();
    let mut on_path = |p: &RelPath| {
        for k in 1..=p.0.len() {
            entries.insert(RelPath(p.0[..k].to_vec()));
        }
    };
    for op in ops {
        let paths = op.action.paths();
        for p in &paths {
            on_path(p);
        }
        if let Some(obj) = attr_op_path(&op.action) {
            *objs.entry(obj.clone()).or_default() += 1;
        }
        for d in op_dirs(&op.action) {
            *dirs.entry(d).or_default() += 1;
        }
    }
    // Taken-back state holds its directories until recovery ends (one op
    // that is never done).
    for s in states {
        match s {
            PendingState::File { paths, .. } => {
                for p in paths {
                    on_path(p);
                    if let Some((d, _)) = p.split_last() {
                        *dirs.entry(d).or_default() += 1;
                    }
                }
            }
            PendingState::Dir { path, .. } => {
                on_path(path);
                *dirs.entry(path.clone()).or_default() += 1;
                attrs.insert(path.clone());
            }
        }
    }
    RecoveryGate::new(dirs, objs, entries, attrs)
}

/// The object whose attributes an op changes (without changing entries).
fn attr_op_path(action: &Action) -> Option<&RelPath> {
    match action {
        Action::SetAttr { path, .. } | Action::SetXattr { path, .. } => Some(path),
        _ => None,
    }
}

/// The directories whose entries an op changes (the parents of its paths).
fn op_dirs(action: &Action) -> HashSet<RelPath> {
    if attr_op_path(action).is_some() {
        return HashSet::new();
    }
    action
        .paths()
        .into_iter()
        .filter_map(|p| p.split_last().map(|(d, _)| d))
        .collect()
}

/// The highest overlay inode number the dead instance used (new objects of
/// this mount get higher ones, so journal records of the two never mix).
fn max_ino(ops: &[FlushOp], states: &[PendingState]) -> u64 {
    let keys = ops.iter().flat_map(|op| op.keys.iter()).map(|(k, _)| match k {
        flush::Key::Ino(i) | flush::Key::Name(i, _) => *i,
    });
    keys.chain(states.iter().map(|s| s.ino())).max().unwrap_or(0)
}

/// Replays `ops` (journaled in the running mount's journal) against the
/// backend, in journal order under their original scheduler keys (in
/// parallel wherever the original run could have been), after removing the
/// publish temp files the dead instance left in the directories of its
/// unfinished publishes. Returns the ops run, the failures and the orphans
/// removed.
fn replay(
    fs: &Fs,
    old: &Header,
    ops: Vec<FlushOp>,
    states: &[PendingState],
    cfg: &ReplayConfig,
) -> (usize, Vec<Failure>, usize) {
    let backend = &*fs.backend;
    let mut publish_dirs: HashSet<RelPath> = HashSet::new();
    for op in &ops {
        if let Action::Publish { paths, .. } = &op.action {
            publish_dirs.extend(paths.iter().filter_map(|p| p.split_last().map(|(d, _)| d)));
        }
    }
    // Replayed ops (and the orphan cleanup) change directories' times on the
    // backend; the running daemon would re-apply the overlay's times after
    // them, so replay does too.
    let dir_times: Mutex<std::collections::HashMap<RelPath, DirTimes>> = Mutex::new(
        dir_times_to_restore(&ops, states, backend)
            .into_iter()
            .map(|(d, id, a)| (d, (id, a)))
            .collect(),
    );
    // Puts a directory's times back (once; if it is still the one they were
    // read from).
    let restore_times = |dir: &RelPath| {
        let Some(((dev, ino), attrs)) = dir_times.lock().remove(dir) else {
            return;
        };
        match backend.stat(dir) {
            Ok(st) if (st.dev, st.ino) == (dev, ino) => {
                if let Err(e) = backend.set_attrs(dir, &attrs, false) {
                    tracing::warn!(path = %dir.display(), error = %e, "cannot restore a directory's times after the replay");
                }
            }
            _ => {} // moved or removed by the replay: its times are not ours to set
        }
    };
    // The last replayed op in a directory is done: its times go back and
    // its listing is served.
    let gate = fs.recovery_gate();
    let op_finished = |action: &Action| {
        let Some(gate) = gate else { return };
        if let Some(obj) = attr_op_path(action)
            && gate.obj_done(obj)
        {
            fs.refresh_attrs(obj);
            gate.release(obj);
        }
        for d in op_dirs(action) {
            if gate.op_done(&d) {
                restore_times(&d);
                fs.refresh_attrs(&d);
                gate.release(&d);
            }
        }
    };
    // Temp files of publishes the dead instance had in flight, removed before
    // the replay moves anything: a publish in flight held its directory's
    // key, so nothing had moved the directory since, but a replayed rename
    // of that directory would.
    let mut orphans_removed = 0;
    for dir in &publish_dirs {
        let Ok(names) = backend.list_names(dir) else { continue };
        for n in names {
            if n.as_encoded_bytes().starts_with(old.temp_prefix.as_bytes()) {
                match backend.unlink(&dir.join(&n)) {
                    Ok(()) => orphans_removed += 1,
                    Err(e) => {
                        tracing::warn!(path = %dir.join(&n).display(), error = %e, "cannot remove an orphaned publish temp file")
                    }
                }
            }
        }
    }
    let sched = Arc::new(Scheduler::new(cfg.dir_concurrency, cfg.retry));
    let total = ops.len();
    for op in ops {
        sched.enqueue(op);
    }
    let started = Instant::now();
    let journal = fs.journal().expect("journaling started before the replay");
    let xattrs = fs.capabilities().xattrs;
    std::thread::scope(|scope| {
        for _ in 0..cfg.workers.max(1) {
            scope.spawn(|| {
                replay_worker(
                    &sched,
                    journal,
                    backend,
                    fs.staging(),
                    fs.temp_names(),
                    xattrs,
                    &op_finished,
                )
            });
        }
        while !sched.wait_idle(Some(Instant::now() + Duration::from_secs(5))) {
            let left = sched.queued().min(total);
            fs.recovery_progress(total - left, total);
            tracing::warn!(
                done = total - left,
                total,
                retries = sched.stats.retries.load(std::sync::atomic::Ordering::Relaxed),
                "replaying the journal (waiting for the backend)"
            );
        }
        sched.shutdown();
    });
    let failures = sched.failures();
    // Directories still held (they have state to take back); a listing of
    // their parent may have shown their times while in flux.
    let left: Vec<RelPath> = dir_times.lock().keys().cloned().collect();
    for dir in left {
        restore_times(&dir);
        fs.refresh_attrs(&dir);
    }
    tracing::warn!(
        ops = total,
        failed = failures.len(),
        orphans_removed,
        seconds = started.elapsed().as_secs_f64(),
        "journal replayed"
    );
    (total, failures, orphans_removed)
}

/// Directories whose entries the replay changes, with the times they must
/// have afterwards: those of the last journaled attribute change of the
/// directory, else those it has now. Directories with pending state are left
/// out (taking that state back applies its times later).
fn dir_times_to_restore(
    ops: &[crate::flush::FlushOp],
    states: &[PendingState],
    backend: &dyn Backend,
) -> Vec<(RelPath, (u64, u64), AttrSet)> {
    let pending: HashSet<&RelPath> = states
        .iter()
        .filter_map(|s| match s {
            PendingState::Dir { path, .. } => Some(path),
            PendingState::File { .. } => None,
        })
        .collect();
    let parent = |p: &RelPath| p.split_last().map(|(d, _)| d);
    let mut changed: Vec<RelPath> = Vec::new();
    let mut set_later: std::collections::HashMap<RelPath, AttrSet> = std::collections::HashMap::new();
    for op in ops {
        match &op.action {
            Action::Mkdir { path, .. }
            | Action::Rmdir { path }
            | Action::Unlink { path }
            | Action::Symlink { path, .. }
            | Action::Mknod { path, .. } => changed.extend(parent(path)),
            Action::Rename { from, to, .. } => changed.extend(parent(from).into_iter().chain(parent(to))),
            Action::Link { new, .. } => changed.extend(parent(new)),
            Action::Publish { paths, .. } => changed.extend(paths.iter().filter_map(parent)),
            Action::SetAttr { path, attrs } if attrs.mtime.is_some() => {
                set_later.insert(path.clone(), attrs.clone());
            }
            Action::SetAttr { .. } | Action::SetXattr { .. } | Action::Barrier(_) => {}
        }
    }
    changed.sort_by(|a, b| a.0.cmp(&b.0));
    changed.dedup();
    let mut out = Vec::new();
    for dir in changed {
        if pending.contains(&dir) {
            continue;
        }
        let Ok(st) = backend.stat(&dir) else { continue };
        let attrs = set_later.remove(&dir).map_or(
            AttrSet {
                atime: Some(st.atime),
                mtime: Some(st.mtime),
                ..Default::default()
            },
            |a| AttrSet {
                atime: a.atime,
                mtime: a.mtime,
                ..Default::default()
            },
        );
        out.push((dir, (st.dev, st.ino), attrs));
    }
    out
}

/// Brings up the filesystem core over `backend` with the cache dir `cache`,
/// ready to serve: probes the backend, reads the journal an earlier run left
/// (if any) and starts a new journal that carries its pending work. That
/// work is recovered in the background (`recover`): the mount serves at
/// once, and only what the recovered work touches waits for it (see
/// `RecoveryGate`). Without pending work, staging files nothing refers to
/// are moved into `lost+found` at once.
#[allow(clippy::too_many_arguments)]
pub fn start_fs(
    cache: &Path,
    backend: Arc<dyn Backend>,
    staging: Staging,
    sched: Arc<Scheduler>,
    temps: TempNames,
    header: Header,
    fs_cfg: FsConfig,
    replay_cfg: &ReplayConfig,
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
        mut ops,
        states,
    }) = pending
    else {
        fs.start_journal(cache, header, Vec::new(), &mut [])
            .map_err(journal_err)?;
        keep_leftovers(cache, fs.staging(), &fs.staging_in_use(), u64::MAX);
        if let Err(e) = fs.staging().rescan() {
            tracing::warn!(error = %e, "cannot measure the staging area");
        }
        return Ok(fs);
    };
    // The carried states are journaled under inode numbers no object of
    // this mount ever has (a backend-derived number could be a live object
    // reached through a hard link, whose changes would replace the record),
    // and new objects get numbers above them.
    let base = max_ino(&ops, &states).max(1 << 63);
    let mut states = states;
    for (k, s) in states.iter_mut().enumerate() {
        s.set_ino(base + 1 + k as u64);
    }
    fs.reserve_inos(base + states.len() as u64 + 1);
    // From the first reply on, a crash leaves the recovered work in the new
    // journal (the ops renumbered), with whatever this mount adds after it.
    fs.start_journal(cache, header, states.clone(), &mut ops)
        .map_err(journal_err)?;
    // The root's own pending attributes need no listing: taken back at once
    // (its attribute op waits for the end of recovery, see `Fs::tick`; its
    // listing and attributes wait where recovered ops change them).
    let all_states = states.clone();
    let (root_state, states): (Vec<_>, Vec<_>) = states
        .into_iter()
        .partition(|s| matches!(s, PendingState::Dir { path, .. } if path.0.is_empty()));
    fs.begin_recovery(gate_for(&ops, &states));
    let early: Vec<_> = root_state.iter().map(|s| s.ino()).collect();
    for (st, why) in fs.adopt(root_state) {
        tracing::error!(state = ?st, reason = %why, "pending change could not be taken back after the crash");
    }
    let (bg, cache, cfg) = (fs.clone(), cache.to_path_buf(), replay_cfg.clone());
    let h = std::thread::Builder::new()
        .name("efscache-recovery".into())
        .spawn(move || recover(&bg, &cache, &old, ops, all_states, states, early, &cfg, max_staged))
        .map_err(|e| format!("cannot start recovery: {e}"))?;
    fs.set_recovery_handle(h);
    Ok(fs)
}

/// The background half of a recovery: replay the carried ops, take the
/// pending state back into the overlay (its names are valid once every op
/// has run), clear the dead instance's records, move staging files nothing
/// refers to aside, and open the gate.
#[allow(clippy::too_many_arguments)]
fn recover(
    fs: &Arc<Fs>,
    cache: &Path,
    old: &Header,
    ops: Vec<FlushOp>,
    all_states: Vec<PendingState>,
    states: Vec<PendingState>,
    adopted_early: Vec<Ino>,
    cfg: &ReplayConfig,
    max_staged: u64,
) {
    let started = Instant::now();
    let _recovering = fs.recovery_thread();
    // Whatever happens here, the gate opens in the end (a panic included).
    struct Opens<'a>(&'a Fs, bool);
    impl Drop for Opens<'_> {
        fn drop(&mut self) {
            if !self.1 {
                tracing::error!("recovery stopped before it was done; the rest is left for the next mount");
                self.0.end_recovery(
                    serde_json::json!({"running": false, "failed": 1, "error": "recovery stopped early"}),
                );
            }
        }
    }
    let mut opens = Opens(fs, false);
    let (total, failures, orphans_removed) = replay(fs, old, ops, &all_states, cfg);
    for f in &failures {
        tracing::error!(op = %f.op, path = %f.path, error = %f.error, "a journaled change could not be applied; its data (if any) is kept in lost+found");
    }
    let mut old_inos: Vec<_> = states.iter().map(|s| s.ino()).collect();
    let adopted = states.len() + adopted_early.len();
    old_inos.extend(adopted_early);
    let not_adopted = fs.adopt(states);
    for (st, why) in &not_adopted {
        tracing::error!(state = ?st, reason = %why, "pending change could not be taken back after the crash; its data (if any) is kept in lost+found");
    }
    // The dead instance's records name its own inode numbers; the overlay
    // re-recorded what it took back under its own.
    fs.forget_states(&old_inos);
    keep_leftovers(cache, fs.staging(), &fs.staging_in_use(), max_staged);
    if let Err(e) = fs.staging().rescan() {
        tracing::warn!(error = %e, "cannot measure the staging area");
    }
    if let Some(j) = fs.journal()
        && let Err(e) = j.sync()
    {
        tracing::error!(error = %e, "cannot sync the journal after recovery");
    }
    let seconds = started.elapsed().as_secs_f64();
    tracing::warn!(ops = total, states = adopted, seconds, "recovery done");
    opens.1 = true;
    fs.end_recovery(serde_json::json!({
        "running": false,
        "ops": total,
        "ops_done": total,
        "states": adopted,
        "orphans_removed": orphans_removed,
        "failed": failures.len() + not_adopted.len(),
        "failures": failures,
        "seconds": seconds,
    }));
}

/// Moves staging files that nothing refers to after recovery aside (nothing
/// is deleted: data a crash could not account for stays inspectable).
///
/// Only ids up to `max_id` count: files this mount staged since it started
/// serving (higher ids) are never leftovers.
fn keep_leftovers(cache: &Path, staging: &Staging, in_use: &std::collections::HashSet<u64>, max_id: u64) {
    let Ok(rd) = std::fs::read_dir(cache.join("staging")) else {
        return;
    };
    let left: Vec<_> = rd
        .flatten()
        .filter(|e| {
            let id = Staging::id_of(&e.file_name());
            if id.is_some_and(|id| id > max_id) {
                return false;
            }
            !id.is_some_and(|id| in_use.contains(&id) && e.path() == staging.path(id))
        })
        .collect();
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

/// Runs replayed ops until the scheduler shuts down.
fn replay_worker(
    sched: &Scheduler,
    journal: &Journal,
    backend: &dyn Backend,
    staging: &Staging,
    temps: &TempNames,
    xattrs: crate::backend::XattrCaps,
    finished: &(dyn Fn(&Action) + Sync),
) {
    while let Some(lent) = sched.next() {
        let result = publish::execute(
            backend,
            temps,
            &lent.action,
            None, // what this mount knew of other clients died with it
            xattrs,
            |id| staged_for_replay(staging, &lent.action, id),
            || true,
        );
        // The staged copy of a file now on the backend is no longer needed
        // (no pending state refers to it: such publishes are not replayed).
        let published = match (&lent.action, &result) {
            (Action::Publish { staging: id, .. }, Ok(p)) if !p.superseded => Some(*id),
            _ => None,
        };
        let outcome = match already_applied(&lent.action, result) {
            Ok(_) => Outcome::Done,
            Err(e) if flush::is_transient(&e) => Outcome::Retry(e),
            Err(e) => Outcome::Failed(e),
        };
        if !matches!(outcome, Outcome::Retry(_))
            && let Some(seq) = lent.journal_seq
        {
            journal.done(seq);
            // Only once the done mark no longer refers to it.
            if let Some(id) = published {
                staging.remove(id);
            }
        }
        if let Some(op) = sched.finish(lent, outcome) {
            finished(&op.action);
            sched.settled();
        }
    }
}

/// The staged data of a replayed publish, unless it lost its tail (a machine
/// crash before the data reached the disk): that is never published; the
/// file is kept in lost+found.
fn staged_for_replay(staging: &Staging, action: &Action, id: u64) -> io::Result<Option<std::fs::File>> {
    let f = match staging.open_read(id) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if let Action::Publish { size, paths, .. } = action {
        let len = f.metadata()?.len();
        if len != *size {
            tracing::error!(
                path = %paths.first().map(|p| p.display()).unwrap_or_default(),
                staged = len,
                expected = size,
                "staged data is incomplete (lost in a machine crash before it was fsynced); not published, kept in lost+found"
            );
            return Ok(None);
        }
    }
    Ok(Some(f))
}

/// An op whose source is gone was applied before the crash (or its object
/// was superseded by newer staged content, published later): done.
fn already_applied(action: &Action, r: io::Result<publish::Published>) -> io::Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(e)
            if e.raw_os_error() == Some(libc::ENOENT)
                && matches!(
                    action,
                    Action::Rename { .. } | Action::Link { .. } | Action::SetAttr { .. } | Action::SetXattr { .. }
                ) =>
        {
            tracing::debug!(op = action.name(), path = %action.path().map(|p| p.display()).unwrap_or_default(), "already applied before the crash");
            Ok(())
        }
        Err(e) => Err(e),
    }
}
