//! The journal: a durable log of every change accepted but not yet on the
//! backend, in `<cache_dir>/journal`.
//!
//! Two kinds of pending work are recorded, both before the reply to the kernel:
//!
//! - **Backend ops** (`Op`), exactly as queued for the flush scheduler, with
//!   their scheduler keys: replaying them in journal order, under the same
//!   keys, is replaying them in an order the scheduler could have chosen. A
//!   worker appends `Done` for an op *before* releasing its keys, so every op
//!   that has no `Done` has no dependent op that already ran: re-running it
//!   (idempotently) is always safe.
//! - **Pending state** (`State`) of objects whose change is not an op yet: a
//!   file with unpublished staged content (its names, owner, mode, staging id)
//!   and a directory whose attributes are still to be applied. Each record
//!   replaces the previous one for the same object; `Clear` ends it.
//!
//! Recovery (see `recovery`) applies the pending ops to a new overlay, then
//! takes the pending state back into it (its names are valid once every op
//! has been applied), before the new mount's first reply.
//!
//! Records are written with write(2) (they survive `kill -9`), batched per
//! filesystem op, and made durable against power loss by a group commit every
//! few milliseconds and on fsync/fsyncdir/`sync`. The file is rewritten with
//! only the live records when it grows well past them.
//!
//! Format: `EFSCJRNL`, a little-endian u32 format version, then records, each
//! `len: u32 LE`, `crc32(payload): u32 LE`, `payload` (postcard). The first
//! record is the `Header`. A torn tail (a record cut short by a crash) ends
//! the journal at the last whole record.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::backend::{AttrSet, Known, RelPath};
use crate::flush::{Access, Action, FlushOp, Key};
use crate::namespace::Ino;

/// 2: ops may be `Action::SetXattr` (version 1 journals read unchanged).
/// 3: an op may be followed by `Expect` (versions 1 and 2 read unchanged).
/// 4: a file's pending state may be followed by `StateExpect` (older
/// versions read unchanged).
/// 5: `Expect` and `StateExpect` may be followed by the content version
/// the file had (`ExpectVersion`, `StateExpectVersion`; older versions read
/// unchanged: their expectations know only the inode number).
/// 6: `Retimed` (older versions read unchanged).
pub const FORMAT_VERSION: u32 = 6;
const MAGIC: &[u8; 8] = b"EFSCJRNL";
/// A journal larger than this and four times its live records is rewritten.
const COMPACT_MIN_BYTES: u64 = 64 << 20;
/// A journal with no live records is reset once it is larger than this.
const RESET_MIN_BYTES: u64 = 1 << 20;
/// Records larger than this are corrupt (a path list is far smaller).
const MAX_RECORD: u32 = 64 << 20;

/// Identifies the backend a journal belongs to, and the temp names its
/// publishes used (for orphan cleanup).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub backend: PathBuf,
    /// Inode number of the backend root.
    pub backend_root_ino: u64,
    /// Prefix of this instance's publish temp names.
    pub temp_prefix: String,
}

/// Work accepted by the overlay that is not (yet) a backend op.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PendingState {
    /// A regular file with unpublished staged content under these names.
    File {
        ino: Ino,
        paths: Vec<RelPath>,
        perm: u32,
        uid: u32,
        gid: u32,
        staging: u64,
        /// The size when the last writer closed it (None while open for writing).
        size: Option<u64>,
    },
    /// A directory whose attributes the backend does not have yet.
    Dir { ino: Ino, path: RelPath, attrs: AttrSet },
}

impl PendingState {
    pub fn ino(&self) -> Ino {
        match self {
            PendingState::File { ino, .. } | PendingState::Dir { ino, .. } => *ino,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Header(Header),
    Op {
        seq: u64,
        keys: Vec<(Key, Access)>,
        action: Action,
    },
    Done {
        seq: u64,
    },
    State(PendingState),
    Clear {
        ino: Ino,
    },
    /// Follows the `Op` with this `seq`: the backend inode number its name
    /// (a rename's: its source) had when the op was queued
    /// (`FlushOp::expect`), so a replay still notices another client's
    /// change made before it.
    Expect {
        seq: u64,
        backend_ino: u64,
    },
    /// Follows the `State` of the file `ino`: the backend inode number its
    /// first name held when the state was recorded (the object its publish
    /// replaces), so the publish after a crash still notices another
    /// client's change made before it.
    StateExpect {
        ino: Ino,
        backend_ino: u64,
    },
    /// Follows an `Expect`: the content version the file had
    /// (`backend::Known::version`), so an in-place change is noticed too.
    ExpectVersion {
        seq: u64,
        version: u64,
    },
    /// This mount set the mtime of the backend file `backend_ino` in place
    /// (a utimes of a file it did not rewrite): every expectation of that
    /// file's content version in the journal, earlier or later, is stale,
    /// and a replay checks its inode number only (as the running mount did:
    /// `Namespace::retimed`).
    Retimed {
        backend_ino: u64,
    },
    /// Follows a `StateExpect`, as `ExpectVersion` follows an `Expect`.
    StateExpectVersion {
        ino: Ino,
        version: u64,
    },
}

/// Why a journal cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{0} is not an efscache journal")]
    NotJournal(PathBuf),
    #[error(
        "{path} has journal format version {found}, newer than this efscache supports ({FORMAT_VERSION}); \
         mount with the efscache version that wrote it"
    )]
    NewerVersion { path: PathBuf, found: u32 },
    #[error("journal {path}: {err}")]
    Io { path: PathBuf, err: io::Error },
}

/// What a journal on disk holds that the backend may not have.
#[derive(Debug)]
pub struct Replay {
    pub header: Header,
    /// Ops without `Done`, in journal order.
    pub ops: Vec<FlushOp>,
    /// The latest pending state of each object.
    pub states: Vec<PendingState>,
    /// For files among `states`: the backend file their first name held
    /// when the state was recorded, where known.
    pub state_expects: HashMap<Ino, Known>,
    /// Journal seqs of publishes among `ops` whose staged file was open
    /// for writing again, or closed with another size, after they were
    /// queued (a later pending state of the same staged file says so): a
    /// different size then is that later change, not data lost in a crash,
    /// and the later state (or the file's removal) supersedes the publish.
    pub rewritten: HashSet<u64>,
    pub records: usize,
    /// A torn tail that was cut off: (offset, bytes dropped).
    pub torn: Option<(u64, u64)>,
}

pub fn journal_path(cache: &Path) -> PathBuf {
    cache.join("journal")
}

fn frame(rec: &Record, out: &mut Vec<u8>) {
    let payload = postcard::to_allocvec(rec).expect("journal records serialize");
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
}

/// A pending state as journaled: its `State` record, then its `StateExpect`.
fn frame_state(s: PendingState, expect: Option<Known>) -> Vec<u8> {
    let ino = s.ino();
    let mut framed = Vec::new();
    frame(&Record::State(s), &mut framed);
    if let Some(k) = expect {
        frame(
            &Record::StateExpect {
                ino,
                backend_ino: k.ino,
            },
            &mut framed,
        );
        if k.version != 0 {
            frame(
                &Record::StateExpectVersion {
                    ino,
                    version: k.version,
                },
                &mut framed,
            );
        }
    }
    framed
}

fn preamble() -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    v
}

/// Reads the journal in `cache` (None if there is none). A torn or corrupt
/// tail is cut off (the file is truncated to its last whole record).
pub fn read(cache: &Path) -> Result<Option<Replay>, JournalError> {
    let path = journal_path(cache);
    let ioerr = |err| JournalError::Io {
        path: path.clone(),
        err,
    };
    let mut f = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ioerr(e)),
    };
    let mut data = Vec::new();
    f.read_to_end(&mut data).map_err(ioerr)?;
    if data.len() < 12 || &data[..8] != MAGIC {
        return Err(JournalError::NotJournal(path));
    }
    let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    if version > FORMAT_VERSION {
        return Err(JournalError::NewerVersion { path, found: version });
    }
    let mut pos = 12usize;
    let mut header = None;
    let mut ops: BTreeMap<u64, FlushOp> = BTreeMap::new();
    let mut states: HashMap<Ino, PendingState> = HashMap::new();
    let mut state_expects: HashMap<Ino, Known> = HashMap::new();
    let mut retimed: HashSet<u64> = HashSet::new();
    let mut rewritten = HashSet::new();
    // The undone publishes of each staging file: (seq, size when queued).
    let mut publishes: HashMap<u64, Vec<(u64, u64)>> = HashMap::new();
    let mut records = 0;
    let mut torn = None;
    while pos < data.len() {
        let rec = parse_record(&data[pos..]);
        let Some((rec, used)) = rec else {
            torn = Some((pos as u64, (data.len() - pos) as u64));
            break;
        };
        pos += used;
        records += 1;
        match rec {
            Record::Header(h) => header = Some(h),
            Record::Op { seq, keys, action } => {
                if let Action::Publish { staging, size, .. } = &action {
                    publishes.entry(*staging).or_default().push((seq, *size));
                }
                let mut op = FlushOp::new(keys, action);
                op.journal_seq = Some(seq);
                ops.insert(seq, op);
            }
            Record::Done { seq } => {
                if let Some(FlushOp {
                    action: Action::Publish { staging, .. },
                    ..
                }) = ops.remove(&seq)
                    && let Some(p) = publishes.get_mut(&staging)
                {
                    p.retain(|(s, _)| *s != seq);
                }
            }
            Record::Expect { seq, backend_ino } => {
                if let Some(op) = ops.get_mut(&seq) {
                    op.expect = Some(Known::ino(backend_ino));
                }
            }
            Record::ExpectVersion { seq, version } => {
                if let Some(Some(k)) = ops.get_mut(&seq).map(|op| op.expect.as_mut()) {
                    k.version = version;
                }
            }
            Record::State(s) => {
                if let PendingState::File { staging, size, .. } = &s {
                    let pending = publishes.get(staging).into_iter().flatten();
                    rewritten.extend(
                        pending
                            .filter(|(_, queued)| *size != Some(*queued))
                            .map(|(seq, _)| *seq),
                    );
                }
                state_expects.remove(&s.ino());
                states.insert(s.ino(), s);
            }
            Record::StateExpect { ino, backend_ino } => {
                if states.contains_key(&ino) {
                    state_expects.insert(ino, Known::ino(backend_ino));
                }
            }
            Record::StateExpectVersion { ino, version } => {
                if let Some(k) = state_expects.get_mut(&ino) {
                    k.version = version;
                }
            }
            Record::Clear { ino } => {
                states.remove(&ino);
                state_expects.remove(&ino);
            }
            Record::Retimed { backend_ino } => {
                retimed.insert(backend_ino);
            }
        }
    }
    let Some(header) = header else {
        return Err(JournalError::NotJournal(path));
    };
    if let Some((off, bytes)) = torn {
        tracing::warn!(journal = %path.display(), records, offset = off, bytes, "journal ends in a torn or corrupt record; recovered every whole record before it");
        f.set_len(off).map_err(ioerr)?;
        f.sync_all().map_err(ioerr)?;
    }
    let ino_only = |k: &mut Known| {
        if retimed.contains(&k.ino) {
            k.version = 0;
        }
    };
    ops.values_mut().filter_map(|op| op.expect.as_mut()).for_each(ino_only);
    state_expects.values_mut().for_each(ino_only);
    let mut states: Vec<PendingState> = states.into_values().collect();
    states.sort_by_key(|s| s.ino());
    Ok(Some(Replay {
        header,
        ops: ops.into_values().collect(),
        states,
        state_expects,
        rewritten,
        records,
        torn,
    }))
}

/// One framed record at the start of `buf` and its length, or None if it is
/// cut short or fails its checksum.
fn parse_record(buf: &[u8]) -> Option<(Record, usize)> {
    if buf.len() < 8 {
        return None;
    }
    let len = u32::from_le_bytes(buf[..4].try_into().ok()?);
    let crc = u32::from_le_bytes(buf[4..8].try_into().ok()?);
    if len > MAX_RECORD || buf.len() < 8 + len as usize {
        return None;
    }
    let payload = &buf[8..8 + len as usize];
    if crc32fast::hash(payload) != crc {
        return None;
    }
    let rec = postcard::from_bytes(payload).ok()?;
    Some((rec, 8 + len as usize))
}

struct Inner {
    file: File,
    /// Where the file lives (it is rewritten there on compaction).
    path: PathBuf,
    len: u64,
    next_seq: u64,
    /// Live records, framed: pending ops by seq, pending state by object.
    ops: BTreeMap<u64, Vec<u8>>,
    states: HashMap<Ino, Vec<u8>>,
    /// Backend files this mount retimed in place (`Record::Retimed`),
    /// framed: kept through compactions, as the mount keeps checking them
    /// by inode number only (`Namespace::retimed`) for as long as it runs.
    retimed: BTreeMap<u64, Vec<u8>>,
    live_bytes: u64,
    /// Records appended so far (for group commit).
    appended: u64,
    compact: bool,
    /// A failed append could not be cut off the file: a reader stops at it,
    /// so nothing more is appended.
    torn: bool,
}

/// The journal of a running mount.
pub struct Journal {
    inner: Mutex<Inner>,
    header: Header,
    /// Records known to be on stable storage.
    synced: Mutex<u64>,
    /// Set when an append failed: changes are no longer durable.
    broken: AtomicBool,
    /// Cost accounting for `status`: appends (write calls), their bytes and
    /// time, and fdatasyncs with their time.
    stats: JournalStats,
    commit_wake: Condvar,
    commit_mutex: Mutex<()>,
}

/// What the journal has cost so far.
#[derive(Debug, Default)]
pub struct JournalStats {
    pub appends: AtomicU64,
    pub bytes: AtomicU64,
    pub append_nanos: AtomicU64,
    pub syncs: AtomicU64,
    pub sync_nanos: AtomicU64,
}

/// Records of one filesystem op, appended with one write.
pub struct Batch<'a> {
    journal: &'a Journal,
    buf: Vec<u8>,
    ops: Vec<(u64, usize, usize)>,
    /// `Retimed` records: (backend inode number, range in buf).
    retimed: Vec<(u64, usize, usize)>,
    states: Vec<(Ino, Option<(usize, usize)>)>,
    inner: parking_lot::MutexGuard<'a, Inner>,
}

impl Batch<'_> {
    /// Records a queued op and gives it its journal sequence number.
    pub fn op(&mut self, op: &mut FlushOp) {
        if matches!(op.action, Action::Barrier(_)) {
            return;
        }
        let seq = self.inner.next_seq;
        self.inner.next_seq += 1;
        op.journal_seq = Some(seq);
        let rec = Record::Op {
            seq,
            keys: op.keys.clone(),
            action: op.action.clone(),
        };
        let start = self.buf.len();
        frame(&rec, &mut self.buf);
        if let Some(k) = op.expect {
            frame(
                &Record::Expect {
                    seq,
                    backend_ino: k.ino,
                },
                &mut self.buf,
            );
            if k.version != 0 {
                frame(
                    &Record::ExpectVersion {
                        seq,
                        version: k.version,
                    },
                    &mut self.buf,
                );
            }
        }
        self.ops.push((seq, start, self.buf.len()));
    }

    /// Records that this mount sets the mtime of the backend file
    /// `backend_ino` in place (see `Record::Retimed`).
    pub fn retimed(&mut self, backend_ino: u64) {
        if self.inner.retimed.contains_key(&backend_ino) {
            return;
        }
        let start = self.buf.len();
        frame(&Record::Retimed { backend_ino }, &mut self.buf);
        self.retimed.push((backend_ino, start, self.buf.len()));
    }

    /// Records the pending state of `ino` (None: it has none any more), with
    /// the backend object a file's publish replaces when known (`expect`).
    /// Writes nothing when it did not change.
    pub fn state(&mut self, ino: Ino, state: Option<PendingState>, expect: Option<Known>) {
        match state {
            Some(s) => {
                let framed = frame_state(s, expect);
                if self.inner.states.get(&ino) == Some(&framed) {
                    return;
                }
                let start = self.buf.len();
                self.buf.extend_from_slice(&framed);
                self.states.push((ino, Some((start, self.buf.len()))));
            }
            None => {
                if !self.inner.states.contains_key(&ino) && !self.states.iter().any(|(i, _)| *i == ino) {
                    return;
                }
                frame(&Record::Clear { ino }, &mut self.buf);
                self.states.push((ino, None));
            }
        }
    }

    /// Objects with a recorded pending state.
    pub fn tracked(&self) -> Vec<Ino> {
        self.inner.states.keys().copied().collect()
    }

    /// Appends the batch with one write(2). On an error the batch is not
    /// in the journal and the journal is unhealthy from then on: the change
    /// it records is not crash-safe and must not be acknowledged.
    pub fn commit(mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let inner = &mut *self.inner;
        self.journal.append(inner, &self.buf)?;
        for (seq, a, b) in self.ops.drain(..) {
            inner.live_bytes += (b - a) as u64;
            inner.ops.insert(seq, self.buf[a..b].to_vec());
        }
        for (backend_ino, a, b) in self.retimed.drain(..) {
            if inner.retimed.insert(backend_ino, self.buf[a..b].to_vec()).is_none() {
                inner.live_bytes += (b - a) as u64;
            }
        }
        for (ino, range) in self.states.drain(..) {
            if let Some(old) = inner.states.remove(&ino) {
                inner.live_bytes -= old.len() as u64;
            }
            if let Some((a, b)) = range {
                inner.live_bytes += (b - a) as u64;
                inner.states.insert(ino, self.buf[a..b].to_vec());
            }
        }
        inner.appended += 1;
        self.journal.maybe_compact(inner);
        Ok(())
    }
}

impl Journal {
    /// Starts a new journal at `<cache>/journal.new` holding `header` and the
    /// given pending state; `install` moves it into place.
    pub fn create(cache: &Path, header: Header, states: Vec<(PendingState, Option<Known>)>) -> io::Result<Journal> {
        let path = cache.join("journal.new");
        let mut live = HashMap::new();
        for (s, expect) in states {
            live.insert(s.ino(), frame_state(s, expect));
        }
        let live_bytes = live.values().map(|f| f.len() as u64).sum();
        let buf = contents(&header, live.values());
        let file = write_file(&path, &buf)?;
        let inner = Inner {
            file,
            path,
            len: buf.len() as u64,
            next_seq: 1,
            ops: BTreeMap::new(),
            states: live,
            retimed: BTreeMap::new(),
            live_bytes,
            appended: 0,
            compact: true,
            torn: false,
        };
        Ok(Journal::with(inner, header))
    }

    fn with(inner: Inner, header: Header) -> Journal {
        Journal {
            inner: Mutex::new(inner),
            header,
            synced: Mutex::new(0),
            broken: AtomicBool::new(false),
            stats: JournalStats::default(),
            commit_wake: Condvar::new(),
            commit_mutex: Mutex::new(()),
        }
    }

    /// Moves a journal made by `create` over `<cache>/journal` (atomically:
    /// until then, the old journal is the one a crash would replay).
    pub fn install(&self, cache: &Path) -> io::Result<()> {
        let mut inner = self.inner.lock();
        inner.file.sync_all()?;
        let dest = journal_path(cache);
        std::fs::rename(&inner.path, &dest)?;
        sync_dir(cache)?;
        inner.path = dest;
        Ok(())
    }

    /// Replaces the journal with one holding only its header, durably, and
    /// makes it healthy again; for a journal that stopped at a failed write,
    /// once everything is on the backend (at unmount).
    pub fn replace_with_empty(&self) -> io::Result<()> {
        let mut inner = self.inner.lock();
        let dir = inner.path.parent().expect("journal is in a directory").to_path_buf();
        let tmp = dir.join("journal.new");
        let buf = contents(&self.header, std::iter::empty());
        let file = write_file(&tmp, &buf)?;
        std::fs::rename(&tmp, &inner.path)?;
        sync_dir(&dir)?;
        inner.file = file;
        inner.len = buf.len() as u64;
        inner.ops.clear();
        inner.states.clear();
        inner.retimed.clear();
        inner.live_bytes = 0;
        inner.torn = false;
        self.broken.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Appends to an existing journal (recovery records `Done` for the ops it
    /// replays); never compacted.
    pub fn resume(cache: &Path, header: Header) -> io::Result<Journal> {
        let path = journal_path(cache);
        let mut file = OpenOptions::new().write(true).open(&path)?;
        let len = file.seek(SeekFrom::End(0))?;
        let inner = Inner {
            file,
            path,
            len,
            next_seq: u64::MAX / 2,
            ops: BTreeMap::new(),
            states: HashMap::new(),
            retimed: BTreeMap::new(),
            live_bytes: 0,
            appended: 0,
            compact: false,
            torn: false,
        };
        Ok(Journal::with(inner, header))
    }

    pub fn begin(&self) -> Batch<'_> {
        Batch {
            journal: self,
            buf: Vec::new(),
            ops: Vec::new(),
            retimed: Vec::new(),
            states: Vec::new(),
            inner: self.inner.lock(),
        }
    }

    /// The op with journal sequence `seq` is on the backend (or failed for
    /// good). Called before the op's keys are released.
    pub fn done(&self, seq: u64) {
        let mut buf = Vec::new();
        frame(&Record::Done { seq }, &mut buf);
        let mut inner = self.inner.lock();
        if self.append(&mut inner, &buf).is_err() {
            return; // the op replays after a crash; it finds its own result
        }
        if let Some(old) = inner.ops.remove(&seq) {
            inner.live_bytes -= old.len() as u64;
        }
        inner.appended += 1;
        self.maybe_compact(&mut inner);
    }

    /// Writes `buf` at the end of the journal. A failed write is cut off
    /// again (a reader stops at a torn record, and would lose everything
    /// appended after it) and leaves the journal unhealthy, and nothing is
    /// appended after it: the file must stay what a crash at that moment
    /// would have left, every record up to one point, never a gap (a record
    /// after a missing one could name what the missing one made).
    fn append(&self, inner: &mut Inner, buf: &[u8]) -> io::Result<()> {
        if inner.torn || !self.healthy() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let t = std::time::Instant::now();
        let result = inner.file.write_all(buf);
        self.stats.appends.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.stats
            .append_nanos
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let Err(e) = result else {
            inner.len += buf.len() as u64;
            return Ok(());
        };
        if !self.broken.swap(true, Ordering::Relaxed) {
            tracing::error!(error = %e, "cannot write the journal: changes are refused (EIO) from now on, as they would not be crash-safe; free or fix the cache dir's disk, then unmount (which publishes everything) and mount again");
        }
        let len = inner.len;
        if let Err(cut) = inner
            .file
            .set_len(len)
            .and_then(|()| inner.file.seek(SeekFrom::Start(len)))
        {
            tracing::error!(error = %cut, "cannot cut a partly written record off the journal: nothing more is appended to it");
            inner.torn = true;
        }
        Err(e)
    }

    pub fn stats(&self) -> &JournalStats {
        &self.stats
    }

    /// The backend this journal belongs to.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// False once an append failed (changes since are not crash-safe).
    pub fn healthy(&self) -> bool {
        !self.broken.load(Ordering::Relaxed)
    }

    /// (file bytes, live records, live bytes) for `status`.
    pub fn usage(&self) -> (u64, usize, u64) {
        let inner = self.inner.lock();
        (inner.len, inner.ops.len() + inner.states.len(), inner.live_bytes)
    }

    /// Makes everything appended so far durable (fdatasync), sharing one sync
    /// among concurrent callers.
    /// Fails once the journal is unhealthy: what it holds may then lack
    /// records (or, after a failed sync, records the kernel dropped).
    pub fn sync(&self) -> io::Result<()> {
        if !self.healthy() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let target = self.inner.lock().appended;
        let _one = self.commit_mutex.lock();
        if *self.synced.lock() >= target {
            return Ok(());
        }
        let (file, appended) = {
            let inner = self.inner.lock();
            (inner.file.try_clone()?, inner.appended)
        };
        let t = std::time::Instant::now();
        if let Err(e) = file.sync_data() {
            // Linux reports a failed writeback once: a later fdatasync would
            // succeed although the records it lost are not on disk.
            if !self.broken.swap(true, Ordering::Relaxed) {
                tracing::error!(error = %e, "cannot sync the journal: changes are refused (EIO) from now on; fix the cache dir's disk, then unmount and mount again");
            }
            return Err(e);
        }
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        self.stats
            .sync_nanos
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let mut s = self.synced.lock();
        *s = (*s).max(appended);
        Ok(())
    }

    /// Asks the committer to sync now instead of at its next period; a
    /// [`Journal::sync`] that follows waits for that sync instead of making
    /// its own.
    pub fn start_sync(&self) {
        self.commit_wake.notify_one();
    }

    /// Group commit: syncs whatever was appended, every `period`.
    pub fn spawn_committer(self: &Arc<Self>, period: Duration) {
        let j = self.clone();
        let _ = std::thread::Builder::new()
            .name("efscache-journal".into())
            .spawn(move || {
                loop {
                    {
                        let mut g = j.commit_mutex.lock();
                        j.commit_wake.wait_for(&mut g, period);
                    }
                    let pending = j.inner.lock().appended > *j.synced.lock();
                    if pending && j.healthy() {
                        let _ = j.sync(); // a failure is logged and makes the journal unhealthy
                    }
                }
            });
    }

    fn maybe_compact(&self, inner: &mut Inner) {
        if !inner.compact {
            return;
        }
        let live = inner.ops.is_empty() && inner.states.is_empty();
        let due = (live && inner.len > RESET_MIN_BYTES)
            || (inner.len > COMPACT_MIN_BYTES && inner.len > 4 * inner.live_bytes);
        if !due {
            return;
        }
        if let Err(e) = self.rewrite(inner) {
            tracing::warn!(error = %e, "cannot compact the journal; it keeps growing");
            inner.compact = inner.len < 16 * COMPACT_MIN_BYTES; // try again later, not on every op
        }
    }

    /// Rewrites the journal with only its live records (atomically). Ops
    /// before states, as appended: a file's state written after its queued
    /// publish is what tells a replay the file changed since
    /// (`Replay::rewritten`), and the live state is the latest.
    fn rewrite(&self, inner: &mut Inner) -> io::Result<()> {
        let dir = inner.path.parent().expect("journal is in a directory").to_path_buf();
        let tmp = dir.join("journal.compact");
        let buf = contents(
            &self.header,
            inner
                .ops
                .values()
                .chain(inner.states.values())
                .chain(inner.retimed.values()),
        );
        let file = write_file(&tmp, &buf)?;
        std::fs::rename(&tmp, &inner.path)?;
        sync_dir(&dir)?;
        tracing::debug!(from = inner.len, to = buf.len(), "journal compacted");
        inner.file = file;
        inner.len = buf.len() as u64;
        inner.appended += 1;
        Ok(())
    }
}

/// A whole journal: preamble, header and the given framed records.
fn contents<'a>(header: &Header, records: impl Iterator<Item = &'a Vec<u8>>) -> Vec<u8> {
    let mut buf = preamble();
    frame(&Record::Header(header.clone()), &mut buf);
    for r in records {
        buf.extend_from_slice(r);
    }
    buf
}

/// Writes a new journal file (0600) and makes it durable.
fn write_file(path: &Path, buf: &[u8]) -> io::Result<File> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(buf)?;
    file.sync_all()?;
    Ok(file)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn header() -> Header {
        Header {
            backend: "/b".into(),
            backend_root_ino: 7,
            temp_prefix: ".efscache.h.1.".into(),
        }
    }

    fn path(s: &str) -> RelPath {
        RelPath(s.split('/').map(OsString::from).collect())
    }

    fn mkdir_op(p: &str) -> FlushOp {
        FlushOp::new(
            vec![(Key::Name(1, p.into()), Access::Exclusive)],
            Action::Mkdir {
                path: path(p),
                perm: 0o755,
                uid: 0,
                gid: 0,
            },
        )
    }

    fn file_state(ino: Ino, p: &str) -> PendingState {
        PendingState::File {
            ino,
            paths: vec![path(p)],
            perm: 0o644,
            uid: 1,
            gid: 2,
            staging: ino,
            size: Some(3),
        }
    }

    fn fresh(dir: &Path) -> Journal {
        let j = Journal::create(dir, header(), vec![]).unwrap();
        j.install(dir).unwrap();
        j
    }

    #[test]
    fn pending_ops_and_states_survive_and_done_ones_do_not() {
        let d = tempfile::tempdir().unwrap();
        let j = fresh(d.path());
        let (mut a, mut b) = (mkdir_op("a"), mkdir_op("b"));
        let mut tx = j.begin();
        tx.op(&mut a);
        tx.op(&mut b);
        tx.state(10, Some(file_state(10, "a/x")), None);
        tx.state(11, Some(file_state(11, "b/y")), None);
        tx.commit().unwrap();
        j.done(a.journal_seq.unwrap());
        let mut tx = j.begin();
        tx.state(11, None, None);
        tx.state(10, Some(file_state(10, "a/z")), None);
        tx.commit().unwrap();
        drop(j);
        let r = read(d.path()).unwrap().unwrap();
        assert_eq!(r.header, header());
        assert_eq!(r.ops.len(), 1);
        assert!(matches!(&r.ops[0].action, Action::Mkdir { path: p, .. } if *p == path("b")));
        assert_eq!(r.ops[0].journal_seq, b.journal_seq);
        assert_eq!(r.states, vec![file_state(10, "a/z")]);
        assert!(r.torn.is_none());
    }

    #[test]
    fn a_states_expected_backend_inode_is_read_back_until_replaced() {
        let d = tempfile::tempdir().unwrap();
        let j = fresh(d.path());
        let mut tx = j.begin();
        let k77 = Known { ino: 77, version: 7 };
        tx.state(10, Some(file_state(10, "a")), Some(k77));
        tx.state(11, Some(file_state(11, "b")), Some(Known::ino(88)));
        tx.state(12, Some(file_state(12, "c")), Some(Known::ino(99)));
        tx.commit().unwrap();
        let mut tx = j.begin();
        tx.state(11, Some(file_state(11, "b2")), None); // unknown now
        tx.state(12, None, None);
        tx.commit().unwrap();
        drop(j);
        let r = read(d.path()).unwrap().unwrap();
        assert_eq!(r.states, vec![file_state(10, "a"), file_state(11, "b2")]);
        assert_eq!(r.state_expects, HashMap::from([(10, k77)]));
        // Carried into a new journal (as after a remount), it stays.
        let d2 = tempfile::tempdir().unwrap();
        let states = r.states.into_iter().map(|s| {
            let e = r.state_expects.get(&s.ino()).copied();
            (s, e)
        });
        Journal::create(d2.path(), header(), states.collect())
            .unwrap()
            .install(d2.path())
            .unwrap();
        let r2 = read(d2.path()).unwrap().unwrap();
        assert_eq!(r2.state_expects, HashMap::from([(10, k77)]));
    }

    #[test]
    fn an_ops_expected_backend_inode_is_read_back() {
        let d = tempfile::tempdir().unwrap();
        let j = fresh(d.path());
        let (mut a, mut b, mut c) = (mkdir_op("a"), mkdir_op("b"), mkdir_op("c"));
        a.expect = Some(Known::ino(42));
        c.expect = Some(Known { ino: 43, version: 9 });
        let mut tx = j.begin();
        tx.op(&mut a);
        tx.op(&mut b);
        tx.op(&mut c);
        tx.commit().unwrap();
        drop(j);
        let r = read(d.path()).unwrap().unwrap();
        let got: Vec<_> = r.ops.iter().map(|o| o.expect).collect();
        assert_eq!(
            got,
            vec![Some(Known::ino(42)), None, Some(Known { ino: 43, version: 9 })]
        );
    }

    /// A file retimed in place by this mount: the expectations of its
    /// content version, journaled before or after, are read back by inode
    /// number only, also after a compaction; others keep their version.
    #[test]
    fn a_retimed_file_is_expected_by_inode_number_only() {
        let d = tempfile::tempdir().unwrap();
        let j = fresh(d.path());
        let (k7, k8) = (Known { ino: 7, version: 70 }, Known { ino: 8, version: 80 });
        let (mut before, mut other) = (mkdir_op("a"), mkdir_op("b"));
        before.expect = Some(k7);
        other.expect = Some(k8);
        let mut tx = j.begin();
        tx.op(&mut before);
        tx.op(&mut other);
        tx.state(10, Some(file_state(10, "x")), Some(k7));
        tx.commit().unwrap();
        let mut tx = j.begin();
        tx.retimed(7);
        tx.commit().unwrap();
        let mut after = mkdir_op("c");
        after.expect = Some(Known { ino: 7, version: 71 });
        let mut tx = j.begin();
        tx.op(&mut after);
        tx.state(11, Some(file_state(11, "y")), Some(Known { ino: 7, version: 72 }));
        tx.commit().unwrap();
        {
            let mut inner = j.inner.lock();
            j.rewrite(&mut inner).unwrap();
        }
        drop(j);
        let r = read(d.path()).unwrap().unwrap();
        let got: Vec<_> = r.ops.iter().map(|o| o.expect).collect();
        assert_eq!(got, vec![Some(Known::ino(7)), Some(k8), Some(Known::ino(7))]);
        assert_eq!(
            r.state_expects,
            HashMap::from([(10, Known::ino(7)), (11, Known::ino(7))])
        );
    }

    #[test]
    fn unchanged_state_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let j = fresh(d.path());
        let mut tx = j.begin();
        tx.state(10, Some(file_state(10, "a")), None);
        tx.commit().unwrap();
        let len = j.usage().0;
        let mut tx = j.begin();
        tx.state(10, Some(file_state(10, "a")), None);
        tx.state(12, None, None);
        tx.commit().unwrap();
        assert_eq!(j.usage().0, len);
    }

    #[test]
    fn torn_tail_is_cut_at_the_last_whole_record() {
        let d = tempfile::tempdir().unwrap();
        let j = fresh(d.path());
        let mut a = mkdir_op("a");
        let mut tx = j.begin();
        tx.op(&mut a);
        tx.commit().unwrap();
        let whole = j.usage().0;
        let mut b = mkdir_op("b");
        let mut tx = j.begin();
        tx.op(&mut b);
        tx.commit().unwrap();
        drop(j);
        let p = journal_path(d.path());
        // Cut the last record in the middle, as a crash during write(2) could.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(whole + 5).unwrap();
        let r = read(d.path()).unwrap().unwrap();
        assert_eq!(r.ops.len(), 1);
        assert_eq!(r.torn, Some((whole, 5)));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), whole);
        // A corrupt byte inside a record ends the journal there too.
        let mut data = std::fs::read(&p).unwrap();
        let n = data.len();
        data[n - 2] ^= 0xff;
        std::fs::write(&p, &data).unwrap();
        let r = read(d.path()).unwrap().unwrap();
        assert!(r.ops.is_empty());
        assert!(r.torn.is_some());
    }

    #[test]
    fn newer_format_is_refused_and_garbage_is_not_a_journal() {
        let d = tempfile::tempdir().unwrap();
        drop(fresh(d.path()));
        let p = journal_path(d.path());
        let mut data = std::fs::read(&p).unwrap();
        data[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        std::fs::write(&p, &data).unwrap();
        let e = read(d.path()).unwrap_err();
        assert!(matches!(e, JournalError::NewerVersion { found, .. } if found == FORMAT_VERSION + 1));
        assert!(e.to_string().contains("newer than this efscache supports"));
        std::fs::write(&p, b"hello world, not a journal").unwrap();
        assert!(matches!(read(d.path()), Err(JournalError::NotJournal(_))));
    }

    #[test]
    fn compaction_keeps_exactly_the_live_records() {
        let d = tempfile::tempdir().unwrap();
        let j = fresh(d.path());
        let mut keep = mkdir_op("keep");
        let mut tx = j.begin();
        tx.op(&mut keep);
        tx.state(5, Some(file_state(5, "s")), None);
        tx.commit().unwrap();
        {
            let mut inner = j.inner.lock();
            j.rewrite(&mut inner).unwrap();
        }
        let mut more = mkdir_op("more");
        let mut tx = j.begin();
        tx.op(&mut more);
        tx.commit().unwrap();
        j.done(keep.journal_seq.unwrap());
        drop(j);
        let r = read(d.path()).unwrap().unwrap();
        assert_eq!(r.ops.len(), 1);
        assert!(matches!(&r.ops[0].action, Action::Mkdir { path: p, .. } if *p == path("more")));
        assert_eq!(r.states, vec![file_state(5, "s")]);
    }

    /// A publish queued with one size, then the file written again (its
    /// state has another size): the replay knows the publish was superseded,
    /// also after a compaction.
    #[test]
    fn a_publish_rewritten_after_it_was_queued_stays_so_through_compaction() {
        let d = tempfile::tempdir().unwrap();
        let j = fresh(d.path());
        let mut publish = FlushOp::new(
            vec![(Key::Ino(5), Access::Exclusive)],
            Action::Publish {
                ino: 5,
                staging: 5,
                size: 9,
                paths: vec![path("s")],
                attrs: AttrSet::default(),
            },
        );
        let mut tx = j.begin();
        tx.op(&mut publish);
        tx.commit().unwrap();
        let mut tx = j.begin();
        tx.state(5, Some(file_state(5, "s")), None); // size 3: written again
        tx.commit().unwrap();
        let seq = publish.journal_seq.unwrap();
        assert!(read(d.path()).unwrap().unwrap().rewritten.contains(&seq));
        {
            let mut inner = j.inner.lock();
            j.rewrite(&mut inner).unwrap();
        }
        drop(j);
        let r = read(d.path()).unwrap().unwrap();
        assert_eq!(r.ops.len(), 1);
        assert!(
            r.rewritten.contains(&seq),
            "compaction lost that the file changed after its publish was queued"
        );
    }
}
