//! The flush scheduler: brings the backend to the overlay's state, in parallel
//! and always in a valid order.
//!
//! Every backend change is a `FlushOp` holding *keys*: the directory entries
//! and objects it changes (exclusive) and the ancestor directories whose paths
//! it walks (shared). Ops take their keys in the order they were queued (FIFO
//! per key), so an op runs only after every earlier op it conflicts with has
//! finished, and ops that do not conflict run in parallel on N workers. The
//! result is always what running the ops one by one in queue order would give:
//! a parent directory exists before its children, a rename of a file happens
//! after its publish, a directory rename waits for the work inside it.
//!
//! Lock order: namespace (in `Fs`) before `Scheduler::state`. Workers never
//! hold either lock across backend I/O.

pub mod publish;

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::backend::{AttrSet, Kind, Known, RelPath};
use crate::namespace::Ino;

/// Names of publish temp files on the backend start with this prefix (see `publish`).
pub const TEMP_PREFIX: &str = ".efscache.";

/// What an op locks.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Key {
    /// An object (file, directory) by overlay inode.
    Ino(Ino),
    /// One name in one directory.
    Name(Ino, OsString),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Access {
    Shared,
    Exclusive,
}

/// A backend change. Paths are the backend paths at the moment the op runs
/// (its keys guarantee nothing that would move them runs in between).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Action {
    Mkdir {
        path: RelPath,
        perm: u32,
        uid: u32,
        gid: u32,
    },
    Rmdir {
        path: RelPath,
    },
    Unlink {
        path: RelPath,
    },
    Rename {
        from: RelPath,
        to: RelPath,
        /// RENAME_NOREPLACE, checked by the overlay when the op was made
        /// (kept for the journal's format; the backend gets a plain rename).
        noreplace: bool,
    },
    Symlink {
        path: RelPath,
        target: OsString,
        attrs: AttrSet,
    },
    Link {
        existing: RelPath,
        new: RelPath,
    },
    Mknod {
        path: RelPath,
        kind: Kind,
        perm: u32,
        rdev: u64,
        attrs: AttrSet,
    },
    SetAttr {
        path: RelPath,
        attrs: AttrSet,
    },
    /// Publish a staged file under `paths` (the first one created, the others linked).
    Publish {
        ino: Ino,
        staging: u64,
        /// The staged size when the publish was queued (a replay after a
        /// machine crash refuses staged data that lost its tail).
        size: u64,
        paths: Vec<RelPath>,
        attrs: AttrSet,
    },
    /// Set (`value: Some`) or remove an extended attribute of an existing
    /// backend object (directories, symlinks, special files, files whose
    /// content is not staged; staged files carry theirs into the publish).
    SetXattr {
        path: RelPath,
        name: OsString,
        value: Option<Vec<u8>>,
    },
    /// No backend change: signals once every earlier conflicting op is done
    /// (a clean file's backend path is valid again after a pending rename).
    /// Never journaled.
    #[serde(skip)]
    Barrier(crossbeam::channel::Sender<()>),
}

impl Action {
    /// Names of the op kinds that reach the backend.
    pub const KINDS: [&'static str; 10] = [
        "mkdir", "rmdir", "unlink", "rename", "symlink", "link", "mknod", "setattr", "publish", "setxattr",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Action::Mkdir { .. } => "mkdir",
            Action::Rmdir { .. } => "rmdir",
            Action::Unlink { .. } => "unlink",
            Action::Rename { .. } => "rename",
            Action::Symlink { .. } => "symlink",
            Action::Link { .. } => "link",
            Action::Mknod { .. } => "mknod",
            Action::SetAttr { .. } => "setattr",
            Action::Publish { .. } => "publish",
            Action::SetXattr { .. } => "setxattr",
            Action::Barrier(_) => "barrier",
        }
    }
    /// Every backend path the op names (a rename's and a link's source
    /// first).
    pub fn paths(&self) -> Vec<&RelPath> {
        match self {
            Action::Mkdir { path, .. }
            | Action::Rmdir { path }
            | Action::Unlink { path }
            | Action::Symlink { path, .. }
            | Action::Mknod { path, .. }
            | Action::SetAttr { path, .. }
            | Action::SetXattr { path, .. } => vec![path],
            Action::Rename { from, to, .. } => vec![from, to],
            Action::Link { existing, new } => vec![existing, new],
            Action::Publish { paths, .. } => paths.iter().collect(),
            Action::Barrier(_) => Vec::new(),
        }
    }
    /// The path an operator should look at when this op fails (a rename's
    /// or link's new name, a publish's first).
    pub fn path(&self) -> Option<&RelPath> {
        match self {
            Action::Publish { paths, .. } => paths.first(),
            _ => self.paths().last().copied(),
        }
    }
}

#[derive(Debug)]
pub struct FlushOp {
    pub keys: Vec<(Key, Access)>,
    pub action: Action,
    /// The op's record in the journal, once it has one.
    pub journal_seq: Option<u64>,
    /// For an unlink: the backend file the name must still hold (the one
    /// this mount knew), else another client replaced or rewrote it and it is
    /// left alone. For a publish: what its first name held when it was
    /// queued (the worker checks the overlay's current knowledge instead).
    /// For a rename: the object its source holds (what a retry must find at
    /// the target; the worker reads it if unknown when queued). Journaled,
    /// so recovery checks against it too.
    pub expect: Option<Known>,
}

impl FlushOp {
    pub fn new(keys: Vec<(Key, Access)>, action: Action) -> FlushOp {
        FlushOp {
            keys,
            action,
            journal_seq: None,
            expect: None,
        }
    }

    /// The overlay objects the op is about: its exclusive inode keys, in the
    /// order it named them (shared inode keys are ancestors).
    fn objects(&self) -> impl Iterator<Item = Ino> + '_ {
        self.keys.iter().filter_map(|(k, a)| match (k, a) {
            (Key::Ino(i), Access::Exclusive) => Some(*i),
            _ => None,
        })
    }

    /// The objects whose mtime this op sets on the backend in place (an
    /// attribute change with an mtime).
    fn retimed(&self) -> impl Iterator<Item = Ino> + '_ {
        let retimes = matches!(&self.action, Action::SetAttr { attrs, .. } if attrs.mtime.is_some());
        self.objects().filter(move |_| retimes)
    }

    /// The directory most of the op's backend work happens in (for spreading
    /// work across directories).
    fn home_dir(&self) -> Ino {
        self.keys
            .iter()
            .find_map(|(k, _)| match k {
                Key::Name(d, _) => Some(*d),
                Key::Ino(_) => None,
            })
            .unwrap_or(crate::namespace::ROOT)
    }
    /// Directories whose entries the op changes.
    pub fn changed_dirs(&self) -> HashSet<Ino> {
        self.keys
            .iter()
            .filter_map(|(k, _)| match k {
                Key::Name(d, _) => Some(*d),
                Key::Ino(_) => None,
            })
            .collect()
    }
}

#[derive(Debug, Default)]
struct KeyLock {
    shared: usize,
    exclusive: bool,
    waiting: VecDeque<(u64, Access)>,
}

impl KeyLock {
    fn compatible(&self, a: Access) -> bool {
        match a {
            Access::Shared => !self.exclusive,
            Access::Exclusive => !self.exclusive && self.shared == 0,
        }
    }
    fn hold(&mut self, a: Access) {
        match a {
            Access::Shared => self.shared += 1,
            Access::Exclusive => self.exclusive = true,
        }
    }
}

#[derive(Debug)]
struct Entry {
    op: FlushOp,
    blocked_on: usize,
    attempts: u32,
    home: Ino,
    /// Its last attempt found the file open for writing (`WriterBusy`).
    waiting_for_writer: bool,
}

/// How often a publish waiting for its file's writer looks again.
const WRITER_POLL: Duration = Duration::from_millis(50);

/// Why a publish did not start, or did not finish: its file is open for
/// writing (the data may change under a copy), or changed during the copy.
/// Tried again soon, without counting as a failed attempt.
#[derive(Debug)]
pub struct WriterBusy;

impl std::fmt::Display for WriterBusy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the file is open for writing")
    }
}

impl std::error::Error for WriterBusy {}

/// A permanently failed op, as `status` and `sync` report it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    pub op: String,
    pub path: String,
    pub errno: i32,
    pub error: String,
}

/// A backend op waiting to be tried again, and why (`status` shows the
/// latest, so an op that keeps failing is visible, not only counted).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Retrying {
    pub op: String,
    pub path: String,
    pub error: String,
    pub attempts: u32,
}

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    entries: HashMap<u64, Entry>,
    locks: HashMap<Key, KeyLock>,
    /// Ready ops by home directory, and the directories that have some, in turn.
    ready: HashMap<Ino, VecDeque<u64>>,
    ready_dirs: VecDeque<Ino>,
    ready_count: usize,
    /// Ops waiting out a retry backoff: (due, seq).
    retry: Vec<(Instant, u64)>,
    /// When the one worker that sleeps with a timeout (to move due retries
    /// back to ready) wakes up; the other idle workers sleep until notified,
    /// so a due retry wakes one thread, not all of them.
    timer: Option<Instant>,
    in_flight: usize,
    in_flight_per_dir: HashMap<Ino, usize>,
    /// Queued or running ops that change entries of a directory.
    pending_per_dir: HashMap<Ino, usize>,
    pending_publishes: usize,
    /// Queued or running ops that set a file's mtime on the backend, per
    /// file (see `retime_pending`).
    retimes: HashMap<Ino, u32>,
    failures: Vec<Failure>,
    /// Permanent failures per object the failed op held exclusively (never
    /// cleared: a waiter compares the count before and after its op).
    failed_on: HashMap<Ino, u64>,
    /// The most recent backend error that sent an op back to wait and retry.
    last_retry: Option<Retrying>,
    /// Finished ops whose caller has not yet recorded the result in the
    /// namespace (see `settled`): still work in progress for `sync`.
    settling: usize,
    shutdown: bool,
    /// Workers stop taking new ops (drain ended or paused).
    paused: bool,
}

/// Counters for `status`.
#[derive(Debug, Default)]
pub struct FlushStats {
    pub ops_done: AtomicU64,
    pub files_published: AtomicU64,
    pub bytes_published: AtomicU64,
    pub retries: AtomicU64,
    pub failed: AtomicU64,
    /// Time each kind of op spent on the backend (every attempt), indexed
    /// like `Action::KINDS`.
    pub latency: [crate::metrics::Histogram; Action::KINDS.len()],
}

/// Retry policy for transient backend errors.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

pub struct Scheduler {
    state: Mutex<State>,
    /// Signalled when an op becomes ready or the scheduler shuts down.
    work: Condvar,
    /// Signalled when an op finishes (for `sync` and drain).
    done: Condvar,
    pub stats: FlushStats,
    per_dir_limit: usize,
    retry: RetryPolicy,
}

/// How an executed op ended.
pub enum Outcome {
    Done,
    /// Transient failure: retry after a backoff, keeping the op's place.
    Retry(std::io::Error),
    /// Permanent failure: report it and let dependent ops proceed.
    Failed(std::io::Error),
}

impl Scheduler {
    pub fn new(per_dir_limit: usize, retry: RetryPolicy) -> Scheduler {
        Scheduler {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            done: Condvar::new(),
            stats: FlushStats::default(),
            per_dir_limit: per_dir_limit.max(1),
            retry,
        }
    }

    /// Queues an op behind every earlier op it conflicts with.
    pub fn enqueue(&self, mut op: FlushOp) {
        // An op may name one key twice (e.g. shared via two paths): keep the
        // strongest, in the order the op named them (`Lent::objects`).
        let mut at: HashMap<Key, usize> = HashMap::new();
        let mut keys: Vec<(Key, Access)> = Vec::with_capacity(op.keys.len());
        for (k, a) in op.keys.drain(..) {
            match at.get(&k) {
                Some(&i) if a == Access::Exclusive => keys[i].1 = Access::Exclusive,
                Some(_) => {}
                None => {
                    at.insert(k.clone(), keys.len());
                    keys.push((k, a));
                }
            }
        }
        op.keys = keys;
        let mut st = self.state.lock();
        let seq = st.next_seq;
        st.next_seq += 1;
        let mut blocked = 0;
        for (k, a) in &op.keys {
            let lock = st.locks.entry(k.clone()).or_default();
            if lock.waiting.is_empty() && lock.compatible(*a) {
                lock.hold(*a);
            } else {
                lock.waiting.push_back((seq, *a));
                blocked += 1;
            }
        }
        for d in op.changed_dirs() {
            *st.pending_per_dir.entry(d).or_default() += 1;
        }
        if matches!(op.action, Action::Publish { .. }) {
            st.pending_publishes += 1;
        }
        for i in op.retimed() {
            *st.retimes.entry(i).or_default() += 1;
        }
        let home = op.home_dir();
        st.entries.insert(
            seq,
            Entry {
                op,
                blocked_on: blocked,
                attempts: 0,
                home,
                waiting_for_writer: false,
            },
        );
        if blocked == 0 {
            Self::make_ready(&mut st, seq, home);
            self.work.notify_one();
        }
    }

    fn make_ready(st: &mut State, seq: u64, home: Ino) {
        let q = st.ready.entry(home).or_default();
        if q.is_empty() {
            st.ready_dirs.push_back(home);
        }
        q.push_back(seq);
        st.ready_count += 1;
    }

    /// Takes the next op to run, preferring directories with few ops in flight.
    /// Blocks until one is available; None on shutdown.
    pub fn next(&self) -> Option<Lent> {
        let mut st = self.state.lock();
        loop {
            if st.shutdown {
                return None;
            }
            let now = Instant::now();
            // Backoffs that are due become ready again.
            let mut due = Vec::new();
            st.retry.retain(|(t, s)| {
                if *t <= now {
                    due.push(*s);
                    false
                } else {
                    true
                }
            });
            let woken = due.len();
            for s in due {
                let home = st.entries[&s].home;
                Self::make_ready(&mut st, s, home);
            }
            if st.timer.is_some_and(|t| t <= now) {
                st.timer = None;
            }
            // This worker takes one; others for the rest.
            for _ in 1..woken {
                self.work.notify_one();
            }
            if !st.paused
                && let Some(seq) = self.pick(&mut st)
            {
                let e = st.entries.get_mut(&seq).expect("ready op exists");
                let home = e.home;
                let attempts = e.attempts;
                let (journal_seq, expect) = (e.op.journal_seq, e.op.expect);
                let objects = e.op.objects().collect();
                // The op is lent to the worker; the entry keeps its keys.
                let action = std::mem::replace(&mut e.op.action, Action::Rmdir { path: RelPath::root() });
                st.in_flight += 1;
                *st.in_flight_per_dir.entry(home).or_default() += 1;
                if !st.retry.is_empty() && st.timer.is_none() {
                    self.work.notify_one(); // someone must keep the retries' time
                }
                return Some(Lent {
                    seq,
                    action,
                    attempts,
                    journal_seq,
                    expect,
                    objects,
                });
            }
            let due = st.retry.iter().map(|(t, _)| *t).min();
            match due {
                // Become the timed sleeper unless one wakes up early enough.
                Some(due) if st.timer.is_none_or(|t| t > due) => {
                    let due = due.max(now + Duration::from_millis(1));
                    st.timer = Some(due);
                    self.work.wait_until(&mut st, due);
                    if st.timer == Some(due) {
                        st.timer = None;
                    }
                }
                _ => self.work.wait(&mut st),
            }
        }
    }

    fn pick(&self, st: &mut State) -> Option<u64> {
        for _ in 0..st.ready_dirs.len() {
            let dir = st.ready_dirs.pop_front()?;
            let busy = st.in_flight_per_dir.get(&dir).copied().unwrap_or(0);
            if busy >= self.per_dir_limit {
                st.ready_dirs.push_back(dir);
                continue;
            }
            let q = st.ready.get_mut(&dir).expect("ready dir has a queue");
            let seq = q.pop_front().expect("ready queue not empty");
            if q.is_empty() {
                st.ready.remove(&dir);
            } else {
                st.ready_dirs.push_back(dir);
            }
            st.ready_count -= 1;
            return Some(seq);
        }
        None
    }

    /// Reports the end of an op taken with `next`. Returns the finished op
    /// (with its action restored) when it will not run again.
    pub fn finish(&self, lent: Lent, outcome: Outcome) -> Option<FlushOp> {
        let seq = lent.seq;
        let mut st = self.state.lock();
        st.in_flight -= 1;
        let home = st.entries[&seq].home;
        if let Some(c) = st.in_flight_per_dir.get_mut(&home) {
            *c -= 1;
            if *c == 0 {
                st.in_flight_per_dir.remove(&home);
            }
        }
        let e = st.entries.get_mut(&seq).expect("finished op exists");
        e.op.action = lent.action;
        match outcome {
            Outcome::Retry(err) if err.get_ref().is_some_and(|r| r.is::<WriterBusy>()) => {
                // No backend failure: look again soon (the check costs no
                // backend request), so the publish follows the close closely.
                e.waiting_for_writer = true;
                st.retry.push((Instant::now() + WRITER_POLL, seq));
                self.work.notify_one();
                return None;
            }
            Outcome::Retry(err) => {
                e.attempts += 1;
                e.waiting_for_writer = false;
                let backoff = backoff(self.retry, e.attempts, seq);
                let path = e.op.action.path().map(|p| p.display().to_string()).unwrap_or_default();
                if e.attempts >= 8 && e.attempts.is_power_of_two() {
                    // Backoff caps at `retry.max`: this is a few minutes in.
                    tracing::warn!(op = e.op.action.name(), path = %path, attempts = e.attempts, error = %err, "backend op still failing; retrying (efscache status shows the latest error)");
                } else {
                    tracing::debug!(op = e.op.action.name(), attempts = e.attempts, ?backoff, error = %err, "backend op failed, will retry");
                }
                st.last_retry = Some(Retrying {
                    op: e.op.action.name().to_string(),
                    path,
                    error: err.to_string(),
                    attempts: e.attempts,
                });
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
                st.retry.push((Instant::now() + backoff, seq));
                self.work.notify_one();
                return None;
            }
            Outcome::Failed(err) => {
                let path = e.op.action.path().map(|p| p.display()).unwrap_or_default();
                tracing::warn!(op = e.op.action.name(), path = %path, errno = err.raw_os_error(), error = %err, "backend op failed permanently");
                let f = Failure {
                    op: e.op.action.name().to_string(),
                    path,
                    errno: err.raw_os_error().unwrap_or(libc::EIO),
                    error: err.to_string(),
                };
                let objects: Vec<Ino> = e.op.objects().collect();
                st.failures.push(f);
                for i in objects {
                    *st.failed_on.entry(i).or_default() += 1;
                }
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
            }
            // A barrier is no backend op.
            Outcome::Done if matches!(e.op.action, Action::Barrier(_)) => {}
            Outcome::Done => {
                self.stats.ops_done.fetch_add(1, Ordering::Relaxed);
            }
        }
        let e = st.entries.remove(&seq).expect("finished op exists");
        for i in e.op.retimed() {
            if let Some(c) = st.retimes.get_mut(&i) {
                *c -= 1;
                if *c == 0 {
                    st.retimes.remove(&i);
                }
            }
        }
        let ready_before = st.ready_count;
        for d in e.op.changed_dirs() {
            if let Some(c) = st.pending_per_dir.get_mut(&d) {
                *c -= 1;
                if *c == 0 {
                    st.pending_per_dir.remove(&d);
                }
            }
        }
        if matches!(e.op.action, Action::Publish { .. }) {
            st.pending_publishes -= 1;
        }
        for (k, a) in &e.op.keys {
            self.release(&mut st, k, *a);
        }
        st.settling += 1;
        // Wake a worker per op the released keys made ready, and one for an
        // op that waited for this directory's in-flight slot.
        let wake = (st.ready_count - ready_before).max(usize::from(st.ready_count > 0));
        for _ in 0..wake {
            self.work.notify_one();
        }
        self.done.notify_all();
        Some(e.op)
    }

    /// The caller of `finish` has recorded the op's result (every `Some`
    /// returned by `finish` must be followed by one call).
    pub fn settled(&self) {
        self.state.lock().settling -= 1;
        self.done.notify_all();
    }

    fn release(&self, st: &mut State, key: &Key, a: Access) {
        let mut granted = Vec::new();
        {
            let lock = st.locks.get_mut(key).expect("held key has a lock");
            match a {
                Access::Shared => lock.shared -= 1,
                Access::Exclusive => lock.exclusive = false,
            }
            while let Some((s, acc)) = lock.waiting.front().copied() {
                if !lock.compatible(acc) {
                    break;
                }
                lock.waiting.pop_front();
                lock.hold(acc);
                granted.push(s);
            }
            if lock.shared == 0 && !lock.exclusive && lock.waiting.is_empty() {
                st.locks.remove(key);
            }
        }
        for s in granted {
            let e = st.entries.get_mut(&s).expect("waiting op exists");
            e.blocked_on -= 1;
            if e.blocked_on == 0 {
                let home = e.home;
                Self::make_ready(st, s, home);
            }
        }
    }

    /// Whether any queued or running op changes entries of `dir`.
    pub fn dir_busy(&self, dir: Ino) -> bool {
        self.state.lock().pending_per_dir.contains_key(&dir)
    }

    /// Whether any queued or running op holds or waits for one of `keys` in a
    /// conflicting way (cheap check before queueing a `Barrier`).
    pub fn conflicts(&self, keys: &[(Key, Access)]) -> bool {
        let st = self.state.lock();
        keys.iter().any(|(k, a)| {
            st.locks
                .get(k)
                .is_some_and(|l| !l.waiting.is_empty() || !l.compatible(*a))
        })
    }

    /// Ops queued, running, or finished but not yet recorded.
    pub fn queued(&self) -> usize {
        let st = self.state.lock();
        st.entries.len() + st.settling
    }

    /// If what is still queued can only move once some files are closed
    /// (nothing runs or is ready, and every op waiting to retry is a publish
    /// that found its file open for writing, so every blocked op waits behind
    /// one): the inodes of those files.
    pub fn only_waiting_for_writers(&self) -> Option<Vec<Ino>> {
        let st = self.state.lock();
        if st.in_flight > 0 || st.settling > 0 || st.ready_count > 0 || st.retry.is_empty() {
            return None;
        }
        st.retry
            .iter()
            .map(|(_, seq)| match st.entries.get(seq) {
                Some(Entry {
                    waiting_for_writer: true,
                    op:
                        FlushOp {
                            action: Action::Publish { ino, .. },
                            ..
                        },
                    ..
                }) => Some(*ino),
                _ => None,
            })
            .collect()
    }

    /// Whether an op that sets the mtime of `ino` on the backend is queued
    /// or running: what the file's content version will be is then not
    /// known (see `backend::Known`).
    pub fn retime_pending(&self, ino: Ino) -> bool {
        self.state.lock().retimes.contains_key(&ino)
    }

    /// How many ops were ever queued: unchanged over an interval means
    /// nothing was queued in it.
    pub fn enqueued_total(&self) -> u64 {
        self.state.lock().next_seq
    }

    /// Ops running now.
    pub fn in_flight(&self) -> usize {
        self.state.lock().in_flight
    }

    pub fn snapshot(&self) -> SchedSnapshot {
        let st = self.state.lock();
        SchedSnapshot {
            queued_ops: st.entries.len(),
            in_flight: st.in_flight,
            pending_publishes: st.pending_publishes,
            retry_waiting: st.retry.len(),
            // Only while something waits to retry: afterwards it is history.
            last_retry: if st.retry.is_empty() {
                None
            } else {
                st.last_retry.clone()
            },
            failures: st.failures.clone(),
        }
    }

    pub fn failures(&self) -> Vec<Failure> {
        self.state.lock().failures.clone()
    }

    /// How many ops holding `ino` exclusively (its publishes, attribute
    /// changes, links, renames and removals of its names) have failed for
    /// good (or lost a conflict) so far.
    pub fn failures_on(&self, ino: Ino) -> u64 {
        self.state.lock().failed_on.get(&ino).copied().unwrap_or(0)
    }

    pub fn clear_failures(&self) {
        self.state.lock().failures.clear();
    }

    /// Waits until no op is queued or running, or `deadline` passes. True if idle.
    pub fn wait_idle(&self, deadline: Option<Instant>) -> bool {
        self.wait_until(deadline, |st| st.entries.is_empty() && st.settling == 0)
    }

    /// Waits until no queued or running op holds or waits for `key`.
    pub fn wait_key_clear(&self, key: &Key, deadline: Option<Instant>) -> bool {
        self.wait_until(deadline, |st| !st.locks.contains_key(key))
    }

    /// Waits (woken by finishing ops) until `done` holds or `deadline` passes.
    fn wait_until(&self, deadline: Option<Instant>, done: impl Fn(&State) -> bool) -> bool {
        let mut st = self.state.lock();
        loop {
            if done(&st) {
                return true;
            }
            match deadline {
                Some(d) if Instant::now() >= d => return false,
                Some(d) => {
                    self.done.wait_until(&mut st, d);
                }
                None => self.done.wait(&mut st),
            }
        }
    }

    /// Wakes waiters of `wait_idle` (e.g. when new work may have been queued).
    pub fn poke(&self) {
        self.done.notify_all();
    }

    /// Waits until no op is running (queued ones may remain), or `deadline` passes.
    pub fn wait_running_done(&self, deadline: Option<Instant>) -> bool {
        self.wait_until(deadline, |st| st.in_flight == 0 && st.settling == 0)
    }

    pub fn set_paused(&self, paused: bool) {
        self.state.lock().paused = paused;
        self.work.notify_all();
    }

    /// Whether workers have stopped taking ops (the mount is gone).
    pub fn is_paused(&self) -> bool {
        self.state.lock().paused
    }

    pub fn shutdown(&self) {
        self.state.lock().shutdown = true;
        self.work.notify_all();
        self.done.notify_all();
    }
}

/// An op lent to a worker: its action, and how often it was tried before.
pub struct Lent {
    pub seq: u64,
    pub action: Action,
    pub attempts: u32,
    /// The op's journal record (see `FlushOp::journal_seq`).
    pub journal_seq: Option<u64>,
    /// See `FlushOp::expect`.
    pub expect: Option<Known>,
    /// The overlay objects the op is about (its exclusive `Key::Ino` keys,
    /// in the order the op named them: a rename's source first).
    pub objects: Vec<Ino>,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SchedSnapshot {
    pub queued_ops: usize,
    pub in_flight: usize,
    pub pending_publishes: usize,
    pub retry_waiting: usize,
    /// The latest error that sent an op to retry, while any op waits to.
    pub last_retry: Option<Retrying>,
    pub failures: Vec<Failure>,
}

/// Exponential backoff with deterministic jitter (from the op's sequence number).
fn backoff(p: RetryPolicy, attempts: u32, seq: u64) -> Duration {
    let base = p.initial.saturating_mul(1u32 << attempts.min(16).saturating_sub(1));
    let base = base.min(p.max);
    let jitter = (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 1000;
    base + base.mul_f64(jitter as f64 / 4000.0)
}

/// Whether a backend error is worth retrying (outage, timeout, full backend)
/// or permanent (the op can never succeed as it is).
pub fn is_transient(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EIO)
            | Some(libc::ETIMEDOUT)
            | Some(libc::EAGAIN)
            | Some(libc::EINTR)
            | Some(libc::ENOSPC)
            | Some(libc::EDQUOT)
            | Some(libc::ESTALE)
            | Some(libc::ECONNRESET)
            | Some(libc::ENETDOWN)
            | Some(libc::ENETUNREACH)
            | Some(libc::EHOSTUNREACH)
            | Some(libc::ENOTCONN)
            | Some(libc::EBUSY)
            | Some(libc::ENFILE)
            | Some(libc::EMFILE)
            | Some(libc::ENOMEM)
    ) || (err.raw_os_error().is_none() && publish::conflict(err).is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::ROOT;

    fn op(keys: Vec<(Key, Access)>) -> FlushOp {
        FlushOp::new(keys, Action::Rmdir { path: RelPath::root() })
    }

    fn sched() -> Scheduler {
        Scheduler::new(
            2,
            RetryPolicy {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(2),
            },
        )
    }

    #[test]
    fn conflicting_ops_run_in_queue_order_and_others_in_parallel() {
        let s = sched();
        let a = Key::Name(ROOT, "a".into());
        s.enqueue(op(vec![
            (a.clone(), Access::Exclusive),
            (Key::Ino(ROOT), Access::Shared),
        ]));
        s.enqueue(op(vec![
            (a.clone(), Access::Exclusive),
            (Key::Ino(ROOT), Access::Shared),
        ]));
        s.enqueue(op(vec![
            (Key::Name(ROOT, "b".into()), Access::Exclusive),
            (Key::Ino(ROOT), Access::Shared),
        ]));
        let l1 = s.next().unwrap();
        let l3 = s.next().unwrap();
        assert_eq!((l1.seq, l3.seq), (0, 2), "the second op on 'a' waits for the first");
        s.finish(l3, Outcome::Done);
        s.settled();
        assert_eq!(s.snapshot().in_flight, 1);
        s.finish(l1, Outcome::Done);
        s.settled();
        let l2 = s.next().unwrap();
        assert_eq!(l2.seq, 1);
        s.finish(l2, Outcome::Done);
        s.settled();
        assert!(s.wait_idle(Some(Instant::now())));
    }

    #[test]
    fn a_lent_ops_objects_keep_the_order_the_op_named_them_in() {
        let s = sched();
        // (As a rename over an existing file: source 9, target 3.)
        s.enqueue(op(vec![
            (Key::Name(ROOT, "a".into()), Access::Exclusive),
            (Key::Name(ROOT, "b".into()), Access::Exclusive),
            (Key::Ino(9), Access::Exclusive),
            (Key::Ino(3), Access::Shared),
            (Key::Ino(3), Access::Exclusive),
            (Key::Ino(ROOT), Access::Shared),
            (Key::Ino(9), Access::Shared),
        ]));
        let l = s.next().unwrap();
        assert_eq!(l.objects, vec![9, 3]);
        s.finish(l, Outcome::Done);
        s.settled();
    }

    #[test]
    fn exclusive_directory_key_waits_for_shared_holders_and_blocks_later_ones() {
        let s = sched();
        s.enqueue(op(vec![(Key::Ino(5), Access::Shared)]));
        s.enqueue(op(vec![(Key::Ino(5), Access::Exclusive)]));
        s.enqueue(op(vec![(Key::Ino(5), Access::Shared)]));
        let a = s.next().unwrap();
        assert_eq!(a.seq, 0);
        assert_eq!(s.snapshot().in_flight, 1);
        s.finish(a, Outcome::Done);
        s.settled();
        let b = s.next().unwrap();
        assert_eq!(b.seq, 1);
        s.finish(b, Outcome::Done);
        s.settled();
        let c = s.next().unwrap();
        assert_eq!(c.seq, 2);
        s.finish(c, Outcome::Done);
        s.settled();
    }

    #[test]
    fn transient_failure_keeps_the_op_and_its_place() {
        let s = sched();
        let k = Key::Name(ROOT, "x".into());
        s.enqueue(op(vec![(k.clone(), Access::Exclusive)]));
        s.enqueue(op(vec![(k, Access::Exclusive)]));
        let a = s.next().unwrap();
        let first = a.seq;
        s.finish(a, Outcome::Retry(std::io::Error::from_raw_os_error(libc::EIO)));
        let again = s.next().unwrap();
        assert_eq!(again.seq, first, "the retried op runs before the op queued after it");
        s.finish(again, Outcome::Failed(std::io::Error::from_raw_os_error(libc::EPERM)));
        s.settled();
        assert_eq!(s.failures().len(), 1);
        let b = s.next().unwrap();
        assert_eq!(b.seq, 1);
        s.finish(b, Outcome::Done);
        s.settled();
        assert_eq!(s.stats.retries.load(Ordering::Relaxed), 1);
    }
}
