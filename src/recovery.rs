//! Recovery after a crash (`kill -9`, OOM, power loss): bring the backend up
//! to what the journal says was accepted, so the new overlay can be built on
//! it.
//!
//! 1. `replay` runs the journal's pending ops against the backend, in journal
//!    order under their original scheduler keys (so in parallel wherever the
//!    original run could have been), and marks each done in the old journal
//!    (a crash during recovery resumes where it stopped). Every op is
//!    idempotent; an op whose source is already gone was applied before the
//!    crash (or superseded by newer staged content) and counts as done.
//! 2. Publish temp files the dead instance left in the directories of its
//!    unfinished publishes are removed (no tree walk).
//! 3. The caller hands the pending state (files with unpublished staged
//!    content, directory attributes) to the new overlay (`Fs::adopt`), whose
//!    names are valid now that every op has run, and starts a new journal.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{AttrSet, Backend, RelPath};
use crate::flush::publish::{self, TempNames};
use crate::flush::{self, Action, Failure, Outcome, RetryPolicy, Scheduler};
use crate::fs::{Fs, FsConfig};
use crate::journal::{self, Header, Journal, PendingState};
use crate::staging::Staging;

/// What a replay did.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Ops run against the backend.
    pub ops: usize,
    /// Ops that failed for good (their staged data, if any, is kept).
    pub failures: Vec<Failure>,
    /// Pending state to hand to the new overlay.
    pub states: Vec<PendingState>,
    pub orphans_removed: usize,
}

/// How replay runs.
pub struct ReplayConfig {
    pub workers: usize,
    pub dir_concurrency: usize,
    pub retry: RetryPolicy,
}

/// Replays the journal in `cache` (if any) onto `backend`, whose identity is
/// `current`. Refuses a journal with pending work for another backend.
pub fn replay(
    cache: &Path,
    backend: &Arc<dyn Backend>,
    staging: &Staging,
    temps: &TempNames,
    current: &Header,
    cfg: &ReplayConfig,
    backend_acls: bool,
) -> Result<Option<Replayed>, String> {
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
    let journal =
        Arc::new(Journal::resume(cache, r.header.clone()).map_err(|e| format!("cannot reopen the journal: {e}"))?);
    // Staged content that was changed again after its publish was queued is
    // published (as the newer content) from the pending state instead.
    let restaged: HashSet<u64> = r
        .states
        .iter()
        .filter_map(|s| match s {
            PendingState::File { staging, .. } => Some(*staging),
            PendingState::Dir { .. } => None,
        })
        .collect();
    // Only the last queued publish of a staging file carries its current
    // content (and size): an earlier one (its file was closed, reopened,
    // rewritten and closed again) would be refused as incomplete.
    let mut last_publish: std::collections::HashMap<u64, Option<u64>> = std::collections::HashMap::new();
    for op in &r.ops {
        if let Action::Publish { staging, .. } = &op.action {
            last_publish.insert(*staging, op.journal_seq);
        }
    }
    let mut publish_dirs: HashSet<RelPath> = HashSet::new();
    // Replayed ops (and the orphan cleanup) change directories' times on the
    // backend; the running daemon would re-apply the overlay's times after
    // them, so replay does too.
    let dir_times = dir_times_to_restore(&r.ops, &r.states, &**backend);
    let sched = Arc::new(Scheduler::new(cfg.dir_concurrency, cfg.retry));
    let mut total = 0;
    for op in r.ops {
        if let Action::Publish { staging: id, paths, .. } = &op.action {
            publish_dirs.extend(paths.iter().filter_map(|p| p.split_last().map(|(d, _)| d)));
            if restaged.contains(id) || last_publish.get(id) != Some(&op.journal_seq) {
                journal.done(op.journal_seq.expect("journaled op has a seq"));
                continue;
            }
        }
        total += 1;
        sched.enqueue(op);
    }
    // Temp files of publishes the dead instance had in flight, removed before
    // the replay moves anything: a publish in flight held its directory's
    // key, so nothing had moved the directory since, but a replayed rename
    // of that directory would.
    let mut orphans_removed = 0;
    for dir in &publish_dirs {
        let Ok(names) = backend.list_names(dir) else { continue };
        for n in names {
            if n.as_encoded_bytes().starts_with(r.header.temp_prefix.as_bytes()) {
                match backend.unlink(&dir.join(&n)) {
                    Ok(()) => orphans_removed += 1,
                    Err(e) => {
                        tracing::warn!(path = %dir.join(&n).display(), error = %e, "cannot remove an orphaned publish temp file")
                    }
                }
            }
        }
    }
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..cfg.workers.max(1) {
            scope.spawn(|| replay_worker(&sched, &journal, &**backend, staging, temps, backend_acls));
        }
        while !sched.wait_idle(Some(Instant::now() + Duration::from_secs(5))) {
            let left = sched.queued().min(total);
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
    for (dir, (dev, ino), attrs) in dir_times {
        match backend.stat(&dir) {
            Ok(st) if (st.dev, st.ino) == (dev, ino) => {
                if let Err(e) = backend.set_attrs(&dir, &attrs, false) {
                    tracing::warn!(path = %dir.display(), error = %e, "cannot restore a directory's times after the replay");
                }
            }
            _ => {} // moved or removed by the replay: its times are not ours to set
        }
    }
    journal.sync().map_err(|e| format!("cannot sync the journal: {e}"))?;
    tracing::warn!(
        ops = total,
        failed = failures.len(),
        orphans_removed,
        seconds = started.elapsed().as_secs_f64(),
        "journal replayed"
    );
    Ok(Some(Replayed {
        ops: total,
        failures,
        states: r.states,
        orphans_removed,
    }))
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

/// Brings up the filesystem core over `backend` with the cache dir `cache`:
/// replays the journal an earlier run left (if any), takes its pending state
/// back into a new overlay, starts a new journal, and moves staging files
/// nothing refers to into `lost+found`. Returns the core and, after a
/// recovery, what it did (for `status`).
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
) -> Result<(Arc<Fs>, serde_json::Value), String> {
    let started = Instant::now();
    // What the backend keeps decides how replayed publishes are done.
    let caps = crate::fs::probe_capabilities(&*backend, &staging, &temps, fs_cfg.xattrs);
    let replayed = replay(cache, &backend, &staging, &temps, &header, replay_cfg, caps.xattrs.acls)?;
    let max_staged = staging.ids().unwrap_or_default().into_iter().max().unwrap_or(0);
    let fs = Arc::new(Fs::new(backend, staging, sched, temps, fs_cfg).map_err(|e| format!("backend root: {e}"))?);
    fs.set_capabilities(caps);
    fs.reserve_staging_ids(max_staged);
    let mut recovery = serde_json::Value::Null;
    if let Some(r) = replayed {
        for f in &r.failures {
            tracing::error!(op = %f.op, path = %f.path, error = %f.error, "a journaled change could not be applied; its data (if any) is kept in lost+found");
        }
        let states = r.states.len();
        let not_adopted = fs.adopt(r.states);
        for (st, why) in &not_adopted {
            tracing::error!(state = ?st, reason = %why, "pending change could not be taken back after the crash; its data (if any) is kept in lost+found");
        }
        recovery = serde_json::json!({
            "ops": r.ops,
            "states": states,
            "orphans_removed": r.orphans_removed,
            "failed": r.failures.len() + not_adopted.len(),
            "failures": r.failures,
            "seconds": started.elapsed().as_secs_f64(),
        });
    }
    fs.start_journal(cache, header)
        .map_err(|e| format!("cannot write the journal in {}: {e}", cache.display()))?;
    keep_leftovers(cache, fs.staging(), &fs.staging_in_use());
    if let Err(e) = fs.staging().rescan() {
        tracing::warn!(error = %e, "cannot measure the staging area");
    }
    Ok((fs, recovery))
}

/// Moves staging files that nothing refers to after recovery aside (nothing
/// is deleted: data a crash could not account for stays inspectable).
fn keep_leftovers(cache: &Path, staging: &Staging, in_use: &std::collections::HashSet<u64>) {
    let Ok(rd) = std::fs::read_dir(cache.join("staging")) else {
        return;
    };
    let left: Vec<_> = rd
        .flatten()
        .filter(|e| {
            let id = Staging::id_of(&e.file_name());
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
    backend_acls: bool,
) {
    while let Some(lent) = sched.next() {
        let result = publish::execute(
            backend,
            temps,
            &lent.action,
            None, // what this mount knew of other clients died with it
            backend_acls,
            |id| staged_for_replay(staging, &lent.action, id),
            || true,
        );
        let outcome = match already_applied(&lent.action, result) {
            Ok(_) => Outcome::Done,
            Err(e) if flush::is_transient(&e) => Outcome::Retry(e),
            Err(e) => Outcome::Failed(e),
        };
        if !matches!(outcome, Outcome::Retry(_))
            && let Some(seq) = lent.journal_seq
        {
            journal.done(seq);
        }
        if sched.finish(lent, outcome).is_some() {
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
