//! The overlay namespace: inodes, directory entries and per-inode state, in memory.
//!
//! This is the filesystem as users see it. Each change to it that the backend
//! must eventually see is returned as `FlushOp`s (in the order the changes were
//! made) for the flush scheduler, so the backend can always be brought to the
//! same tree. Regular files created through the mount stay *absent* from the
//! backend's future until their publish is queued: renaming or removing them
//! before then costs the backend nothing (rsync's temp files never reach it).
//!
//! Locking: the whole namespace sits behind one mutex in `Fs`. Lock order:
//! namespace, then scheduler. Neither is ever held across backend I/O.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::num::NonZeroU64;
use std::sync::OnceLock;

use smallvec::SmallVec;
use std::time::{Duration, Instant};

use crate::backend::{AttrSet, Kind, Known, RelPath, Stat, Timespec};
use crate::error::{FsError, FsResult};
use crate::flush::{Access, Action, FlushOp, Key};
use crate::journal::PendingState;
pub use crate::name::Name;
use crate::xattr::Xattrs;

pub type Ino = u64;
pub const ROOT: Ino = 1;
/// Inode numbers for objects not (yet) on the backend have the top bit set, so
/// they never collide with numbers derived from backend inode numbers.
const SYNTHETIC_BASE: u64 = 1 << 63;

/// A moment, in 8 bytes where `Option<Instant>` takes 16 (one per cached
/// inode): nanoseconds since the first stamp of the process, plus one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp(NonZeroU64);

impl Stamp {
    fn epoch() -> Instant {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        *EPOCH.get_or_init(Instant::now)
    }

    pub fn at(t: Instant) -> Stamp {
        let ns = t.saturating_duration_since(Stamp::epoch()).as_nanos();
        Stamp(NonZeroU64::new(u64::try_from(ns).unwrap_or(u64::MAX - 1) + 1).expect("non-zero"))
    }

    pub fn now() -> Stamp {
        Stamp::at(Instant::now())
    }

    pub fn elapsed(self) -> Duration {
        let t = Stamp::epoch() + Duration::from_nanos(self.0.get() - 1);
        t.elapsed()
    }
}

/// Attributes as the overlay reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub blocks: u64,
    pub rdev: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
}

impl Attr {
    pub fn from_stat(st: &Stat) -> Attr {
        Attr {
            perm: st.perm,
            uid: st.uid,
            gid: st.gid,
            size: st.size,
            blocks: st.blocks,
            rdev: st.rdev,
            atime: st.atime,
            mtime: st.mtime,
            ctime: st.ctime,
        }
    }
    fn new(perm: u32, uid: u32, gid: u32) -> Attr {
        let now = Timespec::now();
        Attr {
            perm,
            uid,
            gid,
            size: 0,
            blocks: 0,
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
        }
    }
    /// The fields of `self` the backend (with attributes `known`) lacks.
    pub fn diff(&self, kind: Kind, known: &AttrSet) -> AttrSet {
        let want = self.to_set(kind);
        let pick = |w: Option<u32>, k: Option<u32>| if w == k { None } else { w };
        let pick_t = |w: Option<Timespec>, k: Option<Timespec>| if w == k { None } else { w };
        let mut d = AttrSet {
            perm: pick(want.perm, known.perm),
            uid: pick(want.uid, known.uid),
            gid: pick(want.gid, known.gid),
            atime: None,
            mtime: pick_t(want.mtime, known.mtime),
        };
        if d.mtime.is_some() || pick_t(want.atime, known.atime).is_some() {
            // utimensat sets both; send both so neither is lost.
            d.atime = want.atime;
            d.mtime = want.mtime;
        }
        if d.uid.is_some() || d.gid.is_some() {
            // chown may clear setuid/setgid: restore the mode after it.
            d.uid = want.uid;
            d.gid = want.gid;
            if want.perm.is_some_and(|p| p & 0o6000 != 0) {
                d.perm = want.perm;
            }
        }
        d
    }

    /// Takes the fields `set` has.
    fn apply(&mut self, set: &AttrSet) {
        if let Some(p) = set.perm {
            self.perm = p;
        }
        if let Some(u) = set.uid {
            self.uid = u;
        }
        if let Some(g) = set.gid {
            self.gid = g;
        }
        if let Some(t) = set.atime {
            self.atime = t;
        }
        if let Some(t) = set.mtime {
            self.mtime = t;
        }
    }

    /// Everything a publish or attribute flush sets on the backend.
    pub fn to_set(&self, kind: Kind) -> AttrSet {
        AttrSet {
            perm: (kind != Kind::Symlink).then_some(self.perm),
            uid: Some(self.uid),
            gid: Some(self.gid),
            atime: Some(self.atime),
            mtime: Some(self.mtime),
        }
    }
}

/// An `AttrSet` in 40 bytes instead of 72 (one per cached inode): flags for
/// the fields that are known, and the times without `Timespec`'s padding.
#[derive(Clone, Copy, Debug, Default)]
struct PackedAttrSet {
    atime_sec: i64,
    mtime_sec: i64,
    perm: u32,
    uid: u32,
    gid: u32,
    atime_nsec: u32,
    mtime_nsec: u32,
    /// Which fields are known: bits PERM, UID, GID, ATIME, MTIME.
    known: u8,
}

impl PackedAttrSet {
    const PERM: u8 = 1;
    const UID: u8 = 2;
    const GID: u8 = 4;
    const ATIME: u8 = 8;
    const MTIME: u8 = 16;

    fn pack(a: &AttrSet) -> PackedAttrSet {
        let bit = |known: bool, b: u8| if known { b } else { 0 };
        let atime = a.atime.unwrap_or_default();
        let mtime = a.mtime.unwrap_or_default();
        PackedAttrSet {
            atime_sec: atime.sec,
            mtime_sec: mtime.sec,
            perm: a.perm.unwrap_or(0),
            uid: a.uid.unwrap_or(0),
            gid: a.gid.unwrap_or(0),
            atime_nsec: atime.nsec,
            mtime_nsec: mtime.nsec,
            known: bit(a.perm.is_some(), Self::PERM)
                | bit(a.uid.is_some(), Self::UID)
                | bit(a.gid.is_some(), Self::GID)
                | bit(a.atime.is_some(), Self::ATIME)
                | bit(a.mtime.is_some(), Self::MTIME),
        }
    }

    fn unpack(&self) -> AttrSet {
        let has = |b: u8| self.known & b != 0;
        AttrSet {
            perm: has(Self::PERM).then_some(self.perm),
            uid: has(Self::UID).then_some(self.uid),
            gid: has(Self::GID).then_some(self.gid),
            atime: has(Self::ATIME).then_some(Timespec {
                sec: self.atime_sec,
                nsec: self.atime_nsec,
            }),
            mtime: has(Self::MTIME).then_some(Timespec {
                sec: self.mtime_sec,
                nsec: self.mtime_nsec,
            }),
        }
    }
}

/// Where a regular file's data lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// On the backend, read through the backend.
    Remote,
    /// In the staging area under this id; `dirty` until a publish of it is queued.
    Staged { id: u64, dirty: bool },
}

/// An inode's names: (parent, name).
pub type Links = SmallVec<[(Ino, Name); 1]>;

/// A directory entry as callers see it.
#[derive(Clone, Copy, Debug)]
pub struct Dentry {
    pub ino: Ino,
    /// Readdir cookie: entries are listed in cookie order, so offsets stay valid
    /// while the directory changes.
    pub cookie: u64,
    /// Only for entries of files absent from the backend: the backend still has
    /// an older object under this name (the file was renamed over it), which
    /// must be removed if this entry goes away before the file is published.
    pub shadows: bool,
    /// That older object, when known: a publish or unlink that replaces it
    /// first checks that it is still the one there (another client may have
    /// replaced or rewritten it since).
    pub shadow: Option<Known>,
}

/// What the name index stores per entry (kept small: a cached directory of
/// millions of entries is mostly this).
#[derive(Clone, Copy, Debug)]
struct Slot {
    ino: Ino,
    cookie: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Dir {
    entries: BTreeMap<Name, Slot>,
    by_cookie: BTreeMap<u64, Name>,
    /// The entries that shadow an older backend object (see
    /// `Dentry::shadows`), with what this mount knows of it. Rare, so kept
    /// apart from `entries`.
    shadows: HashMap<Name, Option<Known>>,
    next_cookie: u64,
    /// When the listing was last loaded from (or known equal to) the backend.
    pub loaded: Option<Instant>,
    pub subdirs: u32,
    /// The backend's link count, for `nlink` until the listing is loaded.
    backend_nlink: u32,
    /// Counts the changes to its entries: a listing taken before one of them
    /// must not be merged (see `Fs::ensure_loaded`).
    changes: u64,
}

impl Dir {
    /// How many times its entries have changed (a count to compare).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    fn insert(&mut self, name: Name, ino: Ino, shadows: bool, shadow: Option<Known>) {
        self.changes = self.changes.wrapping_add(1);
        self.next_cookie += 1;
        let cookie = self.next_cookie + 2; // 1 and 2 are "." and ".."
        if let Some(old) = self.entries.insert(name.clone(), Slot { ino, cookie }) {
            self.by_cookie.remove(&old.cookie);
        }
        if shadows {
            self.shadows.insert(name.clone(), shadow);
        } else {
            self.shadows.remove(&name);
        }
        self.by_cookie.insert(cookie, name);
    }

    fn remove(&mut self, name: &OsStr) -> Option<Dentry> {
        let d = self.get(name)?;
        self.changes = self.changes.wrapping_add(1);
        self.entries.remove(name);
        self.shadows.remove(name);
        self.by_cookie.remove(&d.cookie);
        Some(d)
    }

    /// The entry `name`.
    pub fn get(&self, name: &OsStr) -> Option<Dentry> {
        let slot = self.entries.get(name)?;
        let shadow = self.shadows.get(name);
        Some(Dentry {
            ino: slot.ino,
            cookie: slot.cookie,
            shadows: shadow.is_some(),
            shadow: shadow.copied().flatten(),
        })
    }

    /// The inode the entry `name` names.
    pub fn ino(&self, name: &OsStr) -> Option<Ino> {
        self.entries.get(name).map(|s| s.ino)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Every entry: name and inode, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&Name, Ino)> {
        self.entries.iter().map(|(n, s)| (n, s.ino))
    }

    /// Entries with a cookie above `after`, in cookie order.
    pub fn listing_after(&self, after: u64) -> impl Iterator<Item = (u64, Ino, &Name)> {
        self.by_cookie
            .range(after.saturating_add(1)..)
            .map(|(c, n)| (*c, self.entries[n].ino, n))
    }

    /// Forgets that `name` shadows an older backend object (its publish now
    /// replaces it); returns that object if it did and it was known.
    fn clear_shadow(&mut self, name: &OsStr) -> Option<Known> {
        self.shadows.remove(name).flatten()
    }
}

#[derive(Clone, Debug)]
pub struct Inode {
    pub ino: Ino,
    pub kind: Kind,
    pub attr: Attr,
    /// Names of this inode: (parent, name). One for directories; files may
    /// have several (stored inline while there is one).
    pub links: Links,
    /// True once the backend has this object or a queued op will create it.
    pub on_backend: bool,
    /// The backend's inode number, once known.
    pub backend_ino: Option<u64>,
    /// The content version (`backend::content_version`) the backend file
    /// has once the queued ops ran, if known (0: unknown; e.g. while this
    /// mount's own change of its mtime is queued).
    pub backend_version: u64,
    pub content: Content,
    pub dir: Option<Box<Dir>>,
    /// The kernel's lookup count (FUSE forget protocol).
    pub lookups: u64,
    pub opens: u32,
    pub writers: u32,
    /// Bumped whenever the content may change (open for writing, truncate, write),
    /// so a publish can tell whether it copied the latest content.
    pub generation: u64,
    /// When attributes were last read from the backend.
    pub fetched: Option<Stamp>,
    /// Publishes of the staged content queued or running (the staged copy is
    /// kept until the last of them is done).
    pub publish_queued: u32,
    /// `fsync` calls (with `fsync=remote`) waiting for this file's publish:
    /// it goes ahead although the file is open for writing, with what the
    /// file holds then (see `Fs::fsync`).
    pub fsync_waiters: u32,
    /// The attributes the backend will have once the queued ops ran (None:
    /// unknown), so attribute flushes send only what differs.
    backend_attr: PackedAttrSet,
    /// Adopted after a crash while a process of the dead mount may still
    /// write to its staging file through passthrough: publish only once that
    /// file is no longer open for writing.
    pub foreign_writer: bool,
    /// Extended attributes, when known, of an object whose content is not
    /// staged (a staged file keeps its own on its staging file): loaded
    /// from the backend on first use, or given by the overlay (new objects).
    pub xattrs: Option<Box<XattrCache>>,
}

/// An object's extended attributes as the overlay knows them.
#[derive(Clone, Debug)]
pub struct XattrCache {
    pub map: Xattrs,
    /// When they were loaded from the backend or last changed here.
    pub loaded: Instant,
}

impl XattrCache {
    pub fn new(map: Xattrs) -> Box<XattrCache> {
        Box::new(XattrCache {
            map,
            loaded: Instant::now(),
        })
    }
}

impl Inode {
    fn new(ino: Ino, kind: Kind, attr: Attr) -> Inode {
        Inode {
            ino,
            kind,
            attr,
            links: Links::new(),
            on_backend: false,
            backend_ino: None,
            backend_version: 0,
            content: Content::Remote,
            dir: (kind == Kind::Dir).then(Box::default),
            lookups: 0,
            opens: 0,
            writers: 0,
            generation: 0,
            fetched: None,
            publish_queued: 0,
            backend_attr: PackedAttrSet::default(),
            foreign_writer: false,
            fsync_waiters: 0,
            xattrs: None,
        }
    }
    /// A directory created through the mount: empty (so loaded), created
    /// on the backend by a queued mkdir with this mode and owner.
    /// `st` was just read from the backend for this object. A known
    /// version that differs is another client's change, shown from now on.
    /// An unknown one (this mount's own change of the mtime is queued, or
    /// ran since) becomes known only if `settled`: none of this mount's
    /// changes can have run after `st` was read.
    pub fn saw_backend(&mut self, st: &Stat, settled: bool) {
        if self.backend_ino == Some(st.ino) && (self.backend_version != 0 || settled) {
            self.backend_version = st.content_version();
        }
    }

    /// What this mount knows of the backend object, if anything.
    pub fn known(&self) -> Option<Known> {
        self.backend_ino.map(|ino| Known {
            ino,
            version: self.backend_version,
        })
    }

    fn new_dir(ino: Ino, perm: u32, uid: u32, gid: u32) -> Inode {
        let mut i = Inode::new(ino, Kind::Dir, Attr::new(perm, uid, gid));
        i.on_backend = true;
        i.xattrs = Some(XattrCache::new(Xattrs::new()));
        i.set_backend_attr(&AttrSet {
            perm: Some(perm),
            uid: Some(uid),
            gid: Some(gid),
            atime: None,
            mtime: None,
        });
        i.dir.as_mut().expect("dir").loaded = Some(Instant::now());
        i
    }

    /// What the backend will have once the queued ops ran (see the field).
    pub fn backend_attr(&self) -> AttrSet {
        self.backend_attr.unpack()
    }

    pub fn set_backend_attr(&mut self, attrs: &AttrSet) {
        self.backend_attr = PackedAttrSet::pack(attrs);
    }

    fn merge_backend_attr(&mut self, newer: &AttrSet) {
        let mut b = self.backend_attr();
        b.merge(newer);
        self.set_backend_attr(&b);
    }

    /// The link count: for a directory, 2 and one per subdirectory (the
    /// backend's count until its listing is loaded); for anything else its
    /// names, plus `unseen` names on the backend in directories not loaded
    /// yet (tar, cp -a and rsync -H look for hard links by st_nlink > 1).
    pub fn nlink(&self, unseen: u32) -> u32 {
        match &self.dir {
            Some(d) if d.loaded.is_some() => 2 + d.subdirs,
            Some(d) => d.backend_nlink.max(2),
            None => self.links.len() as u32 + unseen,
        }
    }
    pub fn staged_id(&self) -> Option<u64> {
        match self.content {
            Content::Staged { id, .. } => Some(id),
            Content::Remote => None,
        }
    }
    pub fn is_dirty(&self) -> bool {
        matches!(self.content, Content::Staged { dirty: true, .. })
    }
}

/// A file taken back after a crash (see `Namespace::adopt_file`).
pub struct AdoptedFile {
    pub staging: u64,
    pub attr: Attr,
    /// A process of the dead mount may still write to its staging file.
    pub foreign_writer: bool,
    /// What its first name held on the backend before the crash.
    pub expect: Option<Known>,
}

/// What became of a file whose publish lost a conflict.
pub enum ConflictOutcome {
    /// The backend's version is the file now; this mount's staged copy is
    /// to be moved aside.
    BackendWins,
    /// Still open through the mount: it keeps its staged copy (a copy is to
    /// be kept aside too); its next publish checks again.
    StillOpen,
    /// Changed again since: its next publish checks again.
    ChangedAgain,
}

/// Changes requested by setattr.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Timespec>,
    pub mtime: Option<Timespec>,
}

/// What a staging file must do after an overlay change.
#[derive(Debug, Default)]
pub struct Effects {
    pub ops: Vec<FlushOp>,
    /// Staging ids no longer referenced by any inode: delete them.
    pub discard: Vec<u64>,
}

pub struct Namespace {
    /// Boxed: the table stays small and dense; an inode is a few hundred bytes.
    inodes: HashMap<Ino, Box<Inode>>,
    /// Backend inode number -> overlay inode, so hard links share one inode and a
    /// published file keeps the number it had before its publish.
    /// Only where the two differ: most backend objects keep their own
    /// number (see `ino_for_backend`), and a table of 10 million identities
    /// would cost 10 million slots.
    by_backend: HashMap<u64, Ino>,
    /// Symlink targets, once known (read from the backend or given at
    /// creation). Apart from the inodes: most are not symlinks.
    symlinks: HashMap<Ino, Box<OsStr>>,
    /// For a file not on the backend yet: the backend inode number of the
    /// older object its first publish replaces (checked before replacing).
    /// Apart from the inodes: few files have one at a time.
    replaces: HashMap<Ino, Known>,
    /// Backend files (inode numbers) whose mtime this mount set in place
    /// (utimes of a file it did not rewrite): a content version recorded
    /// for one of them before that may be stale, so they are checked by
    /// inode number only (see `checkable`).
    retimed: HashSet<u64>,
    /// Names a file loaded from the backend has there in directories not
    /// loaded yet (its backend link count less the names loaded so far), so
    /// its `nlink` is right before they are. Only hard-linked files have one.
    /// Only ever lowered: a fresh backend count cannot be taken as is while
    /// this mount's own link changes may still be queued, so a link another
    /// client removes in a directory not loaded here still counts.
    unseen_links: HashMap<Ino, u32>,
    next_synthetic: u64,
    next_staging: u64,
    /// Closed files whose new content waits for its publish, with the time they went quiet.
    pub debounce: HashMap<Ino, Instant>,
    /// Files with unpublished content (open for writing or waiting in `debounce`).
    pub dirty_files: HashSet<Ino>,
    /// Directories whose attributes (times, mode, owner) must be applied on the backend.
    pub dirty_dir_attrs: HashSet<Ino>,
    root_backend_ino: u64,
    /// Objects whose pending state (see `pending_state`) may have changed
    /// since the caller last journaled it.
    pub touched: Vec<Ino>,
    /// Backend objects whose mtime this mount just set in place, for the
    /// journal (`Record::Retimed`; see `retimed`).
    pub retimed_now: Vec<u64>,
    /// A directory moved: the paths of everything below it changed.
    pub moved_dir: bool,
    /// Published files whose staged copy is kept a while for reads and
    /// rewrites (see `Fs::linger`): staging id, since when (the publish).
    lingering: HashMap<Ino, (u64, Instant)>,
    /// The same, oldest first (entries no longer in `lingering` are skipped).
    linger_order: std::collections::VecDeque<(Ino, u64, Instant)>,
    /// Staging files to mark as clean copies (true) or unmark (false); the
    /// mark tells recovery that a leftover is a copy of published content,
    /// safe to delete. Applied by the caller, like `touched`.
    pub clean_marks: Vec<(u64, bool)>,
}

fn check_name(name: &OsStr) -> FsResult<()> {
    use std::os::unix::ffi::OsStrExt;
    if name.len() > 255 {
        return Err(FsError::NameTooLong);
    }
    if !crate::backend::valid_name(name) {
        return Err(FsError::Invalid);
    }
    // The publish temp prefix is reserved: such names would be mistaken for
    // orphaned temp files by cleanup.
    if name.as_bytes().starts_with(crate::flush::TEMP_PREFIX.as_bytes()) {
        return Err(FsError::Invalid);
    }
    Ok(())
}

impl Namespace {
    /// A namespace whose root is the backend root with attributes `root`.
    pub fn new(root: &Stat) -> Namespace {
        Stamp::epoch(); // before any instant a stamp is taken of
        let mut inodes = HashMap::new();
        let mut r = Inode::new(ROOT, Kind::Dir, Attr::from_stat(root));
        r.on_backend = true;
        r.backend_ino = Some(root.ino);
        r.lookups = 1;
        r.dir.as_mut().expect("dir").backend_nlink = root.nlink;
        inodes.insert(ROOT, Box::new(r));
        let mut by_backend = HashMap::new();
        by_backend.insert(root.ino, ROOT);
        Namespace {
            inodes,
            by_backend,
            symlinks: HashMap::new(),
            replaces: HashMap::new(),
            retimed: HashSet::new(),
            unseen_links: HashMap::new(),
            next_synthetic: SYNTHETIC_BASE,
            next_staging: 1,
            debounce: HashMap::new(),
            dirty_files: HashSet::new(),
            dirty_dir_attrs: HashSet::new(),
            root_backend_ino: root.ino,
            touched: Vec::new(),
            retimed_now: Vec::new(),
            moved_dir: false,
            lingering: HashMap::new(),
            linger_order: std::collections::VecDeque::new(),
            clean_marks: Vec::new(),
        }
    }

    pub fn get(&self, ino: Ino) -> FsResult<&Inode> {
        self.inodes.get(&ino).map(|b| &**b).ok_or(FsError::BadHandle)
    }
    pub fn get_mut(&mut self, ino: Ino) -> FsResult<&mut Inode> {
        self.inodes.get_mut(&ino).map(|b| &mut **b).ok_or(FsError::BadHandle)
    }
    pub fn len(&self) -> usize {
        self.inodes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.inodes.is_empty()
    }
    pub fn inodes(&self) -> impl Iterator<Item = &Inode> {
        self.inodes.values().map(|b| &**b)
    }

    pub fn new_staging_id(&mut self) -> u64 {
        let id = self.next_staging;
        self.next_staging += 1;
        id
    }

    fn new_ino(&mut self) -> Ino {
        self.next_synthetic += 1;
        self.next_synthetic
    }

    /// The overlay inode number for a backend object: derived from the backend's
    /// inode number, so it is stable across remounts.
    fn ino_for_backend(&mut self, backend_ino: u64) -> Ino {
        if let Some(i) = self.by_backend.get(&backend_ino) {
            return *i;
        }
        if let Some(ino) = self.own_number(backend_ino) {
            return ino;
        }
        let ino = self.new_ino();
        self.by_backend.insert(backend_ino, ino);
        ino
    }

    /// The overlay number a backend object gets unless `by_backend` says
    /// otherwise: its backend number, when that cannot collide with the
    /// root's or with synthetic numbers.
    fn own_number(&self, backend_ino: u64) -> Option<Ino> {
        (backend_ino < SYNTHETIC_BASE && backend_ino > ROOT && backend_ino != self.root_backend_ino)
            .then_some(backend_ino)
    }

    /// Records that a published file now is `backend` on the backend.
    pub fn set_backend(&mut self, ino: Ino, backend: Known) {
        if self.own_number(backend.ino) == Some(ino) {
            self.by_backend.remove(&backend.ino);
        } else {
            self.by_backend.insert(backend.ino, ino);
        }
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.backend_ino = Some(backend.ino);
            i.backend_version = backend.version;
        }
    }

    /// The link count of `ino` (see `Inode::nlink`).
    pub fn nlink(&self, ino: Ino) -> FsResult<u32> {
        let unseen = self.unseen_links.get(&ino).copied().unwrap_or(0);
        Ok(self.get(ino)?.nlink(unseen))
    }

    /// The target of the symlink `ino`, once known.
    pub fn symlink_target(&self, ino: Ino) -> Option<&OsStr> {
        self.symlinks.get(&ino).map(|t| &**t)
    }

    pub fn set_symlink_target(&mut self, ino: Ino, target: &OsStr) {
        if self.inodes.contains_key(&ino) {
            self.symlinks.insert(ino, target.into());
        }
    }

    /// What a conflict check can rely on of `k` (see `retimed`).
    pub fn checkable(&self, k: Known) -> Known {
        if self.retimed.contains(&k.ino) {
            Known::ino(k.ino)
        } else {
            k
        }
    }

    /// See the field.
    pub fn replaces(&self, ino: Ino) -> Option<Known> {
        self.replaces.get(&ino).copied()
    }

    /// The inode with what its first publish replaces (see `replaces`).
    pub fn get_with_replaces(&self, ino: Ino) -> FsResult<(&Inode, Option<Known>)> {
        Ok((self.get(ino)?, self.replaces(ino)))
    }

    fn set_replaces(&mut self, ino: Ino, replaces: Option<Known>) {
        match replaces {
            Some(r) => self.replaces.insert(ino, r),
            None => self.replaces.remove(&ino),
        };
    }

    pub fn dir(&self, ino: Ino) -> FsResult<&Dir> {
        self.get(ino)?.dir.as_deref().ok_or(FsError::NotDir)
    }
    fn dir_mut(&mut self, ino: Ino) -> FsResult<&mut Dir> {
        self.get_mut(ino)?.dir.as_deref_mut().ok_or(FsError::NotDir)
    }

    pub fn is_loaded(&self, dir: Ino) -> FsResult<bool> {
        Ok(self.dir(dir)?.loaded.is_some())
    }

    /// Merges a backend listing of `dir` taken when the directory was not yet
    /// loaded (or is being revalidated while nothing in it is pending).
    pub fn merge_listing(&mut self, dir: Ino, listing: Vec<(OsString, Stat)>, now: Instant) -> FsResult<()> {
        let reload = self.is_loaded(dir)?;
        let mut seen = HashSet::new();
        for (name, st) in listing {
            if check_name(&name).is_err() || crate::backend::is_nfs_silly_name(&name) {
                // Publish temp files (reserved prefix) are never shown, nor
                // the NFS client's names for files removed while open.
                continue;
            }
            let existing = self.dir(dir)?.ino(&name);
            seen.insert(name.clone());
            let ino = self.ino_for_backend(st.ino);
            if let Some(cur) = existing
                && cur != ino
                && reload
                && !self.inodes.contains_key(&ino)
                // (Known to be another backend object: an object this mount
                // made itself may not have its backend inode number yet.)
                && self.get(cur)?.backend_ino.is_some_and(|b| b != st.ino)
                && self.untouched_backend_object(cur)?
            {
                // Another client put a new object under the name (a file
                // renamed over it, as rsync and editors do): this mount has
                // nothing of its own there, so the name now means the new one.
                self.detach(dir, &name)?;
                self.add_backend_entry(dir, name, ino, &st, now)?;
                continue;
            }
            if let Some(cur) = existing {
                if cur != ino {
                    continue; // the overlay has another object here (pending change): it wins
                }
                let attrs_pending = self.dirty_dir_attrs.contains(&cur);
                let i = self.get_mut(cur)?;
                if i.kind == st.kind && i.content == Content::Remote && i.writers == 0 && !attrs_pending {
                    i.attr = Attr::from_stat(&st);
                    i.fetched = Some(Stamp::at(now));
                    i.saw_backend(&st, false);
                    if let Some(d) = i.dir.as_mut() {
                        d.backend_nlink = st.nlink;
                    }
                }
                continue;
            }
            if reload && self.inodes.contains_key(&ino) {
                continue;
            }
            self.add_backend_entry(dir, name, ino, &st, now)?;
        }
        if reload {
            // Names gone from the backend disappear, unless the overlay changed them.
            let gone: Vec<(Name, Ino)> = self
                .dir(dir)?
                .iter()
                .filter(|(n, _)| !seen.contains(&***n))
                .map(|(n, ino)| (n.clone(), ino))
                .collect();
            for (name, ino) in gone {
                if self.untouched_backend_object(ino)? {
                    self.detach(dir, &name)?;
                }
            }
        }
        self.dir_mut(dir)?.loaded = Some(now);
        Ok(())
    }

    /// Whether `ino` is only what the backend has: nothing of this mount's
    /// is pending on it or below it, and nobody has it open (a reload may
    /// then drop or replace its name).
    fn untouched_backend_object(&self, ino: Ino) -> FsResult<bool> {
        let i = self.get(ino)?;
        Ok(i.on_backend
            && i.content == Content::Remote
            && i.opens == 0
            && !self.dirty_dir_attrs.contains(&ino)
            && i.dir.as_ref().is_none_or(|d| d.is_empty()))
    }

    fn add_backend_entry(&mut self, dir: Ino, name: OsString, ino: Ino, st: &Stat, now: Instant) -> FsResult<()> {
        let name = Name::from(name);
        let known = self.inodes.contains_key(&ino);
        let inode = self.inodes.entry(ino).or_insert_with(|| {
            let mut i = Inode::new(ino, st.kind, Attr::from_stat(st));
            i.on_backend = true;
            i.backend_ino = Some(st.ino);
            i.backend_version = st.content_version();
            i.fetched = Some(Stamp::at(now));
            i.set_backend_attr(&i.attr.to_set(st.kind));
            if let Some(d) = i.dir.as_mut() {
                d.backend_nlink = st.nlink;
            }
            Box::new(i)
        });
        inode.links.push((dir, name.clone()));
        if st.kind != Kind::Dir {
            if !known && st.nlink > 1 {
                self.unseen_links.insert(ino, st.nlink - 1);
            } else if known && let Some(n) = self.unseen_links.get_mut(&ino) {
                *n -= 1;
                if *n == 0 {
                    self.unseen_links.remove(&ino);
                }
            }
        }
        let inode = self.get(ino)?;
        let is_dir = inode.kind == Kind::Dir;
        let d = self.dir_mut(dir)?;
        d.insert(name, ino, false, None);
        if is_dir {
            d.subdirs += 1;
        }
        Ok(())
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> FsResult<Option<Ino>> {
        Ok(self.dir(parent)?.entries.get(name).map(|d| d.ino))
    }

    /// Backend path of an inode (its first name), or None if unlinked.
    pub fn path_of(&self, ino: Ino) -> FsResult<RelPath> {
        let mut comps = Vec::new();
        let mut cur = ino;
        while cur != ROOT {
            let i = self.get(cur)?;
            let (p, n) = i.links.first().ok_or(FsError::NotFound)?;
            comps.push(n.to_os_string());
            cur = *p;
            if comps.len() > 4096 {
                return Err(FsError::Invalid);
            }
        }
        comps.reverse();
        Ok(RelPath(comps))
    }

    /// The directory and all its ancestors up to the root.
    fn ancestors(&self, dir: Ino) -> FsResult<Vec<Ino>> {
        let mut out = vec![dir];
        let mut cur = dir;
        while cur != ROOT {
            cur = self.get(cur)?.links.first().ok_or(FsError::NotFound)?.0;
            out.push(cur);
        }
        Ok(out)
    }

    /// Keys for an op that changes the entries `names` and the objects `objects`:
    /// the entries and objects exclusively, every ancestor directory shared (so a
    /// rename of an ancestor waits for the op, and the op for the rename).
    fn keys(&self, names: &[(Ino, &OsStr)], objects: &[Ino]) -> FsResult<Vec<(Key, Access)>> {
        let mut keys = Vec::new();
        let mut shared = HashSet::new();
        for (dir, name) in names {
            keys.push((Key::Name(*dir, (*name).to_owned()), Access::Exclusive));
            shared.extend(self.ancestors(*dir)?);
        }
        for o in objects {
            shared.remove(o);
            keys.push((Key::Ino(*o), Access::Exclusive));
        }
        keys.extend(shared.into_iter().map(|d| (Key::Ino(d), Access::Shared)));
        Ok(keys)
    }

    fn op(&self, names: &[(Ino, &OsStr)], objects: &[Ino], action: Action) -> FsResult<FlushOp> {
        Ok(FlushOp::new(self.keys(names, objects)?, action))
    }

    /// Keys that an access to an existing object's backend path must wait for:
    /// pending renames of any ancestor or of the object itself.
    pub fn read_keys(&self, ino: Ino) -> FsResult<Vec<(Key, Access)>> {
        let i = self.get(ino)?;
        let (p, n) = i.links.first().ok_or(FsError::NotFound)?;
        let mut keys = vec![
            (Key::Name(*p, n.to_os_string()), Access::Shared),
            (Key::Ino(ino), Access::Shared),
        ];
        keys.extend(self.ancestors(*p)?.into_iter().map(|d| (Key::Ino(d), Access::Shared)));
        Ok(keys)
    }

    /// The directory's entries changed: new mtime, and the backend gets the
    /// overlay's times once the backend's own changes in it are done.
    fn touch_dir(&mut self, dir: Ino) {
        self.touched.push(dir);
        if let Some(i) = self.inodes.get_mut(&dir) {
            let now = Timespec::now();
            i.attr.mtime = now;
            i.attr.ctime = now;
            self.dirty_dir_attrs.insert(dir);
        }
    }

    fn insert_new(&mut self, parent: Ino, name: &OsStr, mut inode: Inode) -> FsResult<Ino> {
        check_name(name)?;
        if self.lookup(parent, name)?.is_some() {
            return Err(FsError::Exists);
        }
        inode.lookups = 1;
        let ino = self.attach(parent, name, inode)?;
        self.touch_dir(parent);
        Ok(ino)
    }

    /// Adds a new inode under `name` in `parent` (which has no such entry).
    fn attach(&mut self, parent: Ino, name: &OsStr, inode: Inode) -> FsResult<Ino> {
        let ino = inode.ino;
        self.touched.push(ino);
        self.inodes.insert(ino, Box::new(inode));
        self.add_link(parent, name, ino)?;
        Ok(ino)
    }

    /// Gives the existing inode `ino` the name `name` in `parent` (which has
    /// no such entry): a link and a directory entry sharing one `Name`.
    fn add_link(&mut self, parent: Ino, name: &OsStr, ino: Ino) -> FsResult<()> {
        let name = Name::from(name);
        let i = self.get_mut(ino)?;
        i.links.push((parent, name.clone()));
        let is_dir = i.kind == Kind::Dir;
        let d = self.dir_mut(parent)?;
        d.insert(name, ino, false, None);
        if is_dir {
            d.subdirs += 1;
        }
        Ok(())
    }

    pub fn mkdir(
        &mut self,
        parent: Ino,
        name: &OsStr,
        perm: u32,
        uid: u32,
        gid: u32,
        fx: &mut Effects,
    ) -> FsResult<Ino> {
        let ino = self.new_ino();
        let i = Inode::new_dir(ino, perm, uid, gid);
        self.insert_new(parent, name, i)?;
        self.dirty_dir_attrs.insert(ino);
        let path = self.path_of(ino)?;
        fx.ops
            .push(self.op(&[(parent, name)], &[ino], Action::Mkdir { path, perm, uid, gid })?);
        Ok(ino)
    }

    /// A new regular file with empty staged content (absent from the backend).
    pub fn create_file(&mut self, parent: Ino, name: &OsStr, perm: u32, uid: u32, gid: u32) -> FsResult<Ino> {
        let ino = self.new_ino();
        let id = self.new_staging_id();
        let mut i = Inode::new(ino, Kind::File, Attr::new(perm, uid, gid));
        i.content = Content::Staged { id, dirty: true };
        self.insert_new(parent, name, i)?;
        self.dirty_files.insert(ino);
        Ok(ino)
    }

    pub fn symlink(
        &mut self,
        parent: Ino,
        name: &OsStr,
        target: &OsStr,
        uid: u32,
        gid: u32,
        fx: &mut Effects,
    ) -> FsResult<Ino> {
        let ino = self.new_ino();
        let mut i = Inode::new(ino, Kind::Symlink, Attr::new(0o777, uid, gid));
        i.attr.size = target.len() as u64;
        self.symlinks.insert(ino, target.into());
        i.on_backend = true;
        i.xattrs = Some(XattrCache::new(Xattrs::new()));
        // The backend object gets the overlay's times, so both agree.
        let attrs = i.attr.to_set(Kind::Symlink);
        i.set_backend_attr(&attrs);
        self.insert_new(parent, name, i)?;
        let path = self.path_of(ino)?;
        fx.ops.push(self.op(
            &[(parent, name)],
            &[ino],
            Action::Symlink {
                path,
                target: target.to_owned(),
                attrs,
            },
        )?);
        Ok(ino)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn mknod(
        &mut self,
        parent: Ino,
        name: &OsStr,
        kind: Kind,
        perm: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
        fx: &mut Effects,
    ) -> FsResult<Ino> {
        let ino = self.new_ino();
        let mut i = Inode::new(ino, kind, Attr::new(perm, uid, gid));
        i.attr.rdev = rdev;
        i.on_backend = true;
        i.xattrs = Some(XattrCache::new(Xattrs::new()));
        let mut attrs = i.attr.to_set(kind);
        i.set_backend_attr(&attrs);
        attrs.perm = None; // set at mknod
        self.insert_new(parent, name, i)?;
        let path = self.path_of(ino)?;
        fx.ops.push(self.op(
            &[(parent, name)],
            &[ino],
            Action::Mknod {
                path,
                kind,
                perm,
                rdev,
                attrs,
            },
        )?);
        Ok(ino)
    }

    /// Removes the entry `name` from `dir` and the link from its inode; frees
    /// the inode if nothing refers to it any more.
    fn detach(&mut self, dir: Ino, name: &OsStr) -> FsResult<Dentry> {
        let d = self.dir_mut(dir)?.remove(name).ok_or(FsError::NotFound)?;
        self.touched.push(d.ino);
        let i = self.get_mut(d.ino)?;
        if let Some(pos) = i.links.iter().position(|(p, n)| *p == dir && **n == *name) {
            i.links.remove(pos);
        }
        if i.kind == Kind::Dir {
            self.dir_mut(dir)?.subdirs -= 1;
        }
        Ok(d)
    }

    /// Drops an inode that has no names, no kernel references and no open
    /// handles; returns its staging id to discard.
    pub fn maybe_free(&mut self, ino: Ino, fx: &mut Effects) {
        let Some(i) = self.inodes.get(&ino) else { return };
        self.touched.push(ino);
        if ino == ROOT || !i.links.is_empty() || i.lookups > 0 || i.opens > 0 {
            if i.links.is_empty() {
                // Unlinked but still referenced: its content will never be published.
                self.debounce.remove(&ino);
                self.dirty_files.remove(&ino);
            }
            return;
        }
        let i = self.inodes.remove(&ino).expect("present");
        self.symlinks.remove(&ino);
        self.replaces.remove(&ino);
        self.unseen_links.remove(&ino);
        if let Some(b) = i.backend_ino
            && self.by_backend.get(&b) == Some(&ino)
        {
            self.by_backend.remove(&b);
        }
        self.debounce.remove(&ino);
        self.dirty_files.remove(&ino);
        self.dirty_dir_attrs.remove(&ino);
        if let Some(id) = i.staged_id() {
            fx.discard.push(id);
        }
    }

    pub fn unlink(&mut self, parent: Ino, name: &OsStr, fx: &mut Effects) -> FsResult<()> {
        let ino = self.lookup(parent, name)?.ok_or(FsError::NotFound)?;
        let i = self.get(ino)?;
        if i.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        // The backend object this name has now; unknown while a publish of
        // the file is queued or running (it brings a new one).
        let (on_backend, known) = (i.on_backend, i.known().filter(|_| i.publish_queued == 0));
        let path = self.path_for(parent, name)?;
        let d = self.detach(parent, name)?;
        if on_backend {
            let mut op = self.op(&[(parent, name)], &[ino], Action::Unlink { path })?;
            op.expect = known;
            fx.ops.push(op);
        } else if d.shadows {
            let mut op = self.op(&[(parent, name)], &[], Action::Unlink { path })?;
            op.expect = d.shadow;
            fx.ops.push(op);
        }
        self.get_mut(ino)?.attr.ctime = Timespec::now();
        self.touch_dir(parent);
        self.maybe_free(ino, fx);
        Ok(())
    }

    pub fn rmdir(&mut self, parent: Ino, name: &OsStr, fx: &mut Effects) -> FsResult<()> {
        let ino = self.lookup(parent, name)?.ok_or(FsError::NotFound)?;
        let i = self.get(ino)?;
        let d = i.dir.as_ref().ok_or(FsError::NotDir)?;
        if d.loaded.is_none() {
            return Err(FsError::WouldBlock);
        }
        if !d.entries.is_empty() {
            return Err(FsError::NotEmpty);
        }
        let path = self.path_for(parent, name)?;
        self.detach(parent, name)?;
        fx.ops.push(self.op(&[(parent, name)], &[ino], Action::Rmdir { path })?);
        self.touch_dir(parent);
        self.maybe_free(ino, fx);
        Ok(())
    }

    fn path_for(&self, parent: Ino, name: &OsStr) -> FsResult<RelPath> {
        Ok(self.path_of(parent)?.join(name))
    }

    fn is_ancestor(&self, maybe_ancestor: Ino, of: Ino) -> FsResult<bool> {
        Ok(self.ancestors(of)?.contains(&maybe_ancestor))
    }

    pub fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        newparent: Ino,
        newname: &OsStr,
        noreplace: bool,
        fx: &mut Effects,
    ) -> FsResult<()> {
        check_name(newname)?;
        let src = self.lookup(parent, name)?.ok_or(FsError::NotFound)?;
        let dst = self.lookup(newparent, newname)?;
        if dst == Some(src) {
            return Ok(()); // rename(2): same inode, nothing to do
        }
        let s = self.get(src)?;
        let src_is_dir = s.kind == Kind::Dir;
        if src_is_dir && self.is_ancestor(src, newparent)? {
            return Err(FsError::Invalid);
        }
        let mut replaced_shadows = false;
        let mut replaced = None;
        // The backend object the replaced name still has, if it is not the
        // replaced overlay file itself (that one was never published).
        let mut shadowed_on_backend = None;
        if let Some(t) = dst {
            if noreplace {
                return Err(FsError::Exists);
            }
            let ti = self.get(t)?;
            match (src_is_dir, &ti.dir) {
                (true, None) => return Err(FsError::NotDir),
                (false, Some(_)) => return Err(FsError::IsDir),
                (true, Some(d)) if d.loaded.is_none() => return Err(FsError::WouldBlock),
                (true, Some(d)) if !d.entries.is_empty() => return Err(FsError::NotEmpty),
                _ => {}
            }
            let tdent = self.dir(newparent)?.get(newname).expect("dst exists");
            replaced_shadows = ti.on_backend || tdent.shadows;
            // (Unknown while a publish of the target is queued or running:
            // it brings a new one.)
            replaced = if ti.on_backend {
                ti.known().filter(|_| ti.publish_queued == 0)
            } else {
                tdent.shadow
            };
            if !ti.on_backend && tdent.shadows {
                shadowed_on_backend = tdent.shadow.map(|k| k.ino);
            }
        }
        let src_on_backend = self.get(src)?.on_backend;
        let from = self.path_for(parent, name)?;
        let to = self.path_for(newparent, newname)?;
        // Overlay first, then the op (its keys reflect the tree before the move,
        // which is the tree the backend will have when the op runs).
        let mut objects = vec![src];
        if let Some(t) = dst {
            objects.push(t);
        }
        let keys = self.keys(&[(parent, name), (newparent, newname)], &objects)?;
        let sdent = self.detach(parent, name)?;
        if let Some(t) = dst {
            self.detach(newparent, newname)?;
            self.get_mut(t)?.attr.ctime = Timespec::now();
        }
        let newname_shared = Name::from(newname);
        {
            let shadows = !src_on_backend && replaced_shadows;
            let d = self.dir_mut(newparent)?;
            d.insert(newname_shared.clone(), src, shadows, replaced);
            if src_is_dir {
                d.subdirs += 1;
            }
        }
        if src_is_dir {
            self.moved_dir = true;
        }
        self.touched.push(src);
        let s = self.get_mut(src)?;
        s.links.push((newparent, newname_shared));
        s.attr.ctime = Timespec::now();
        let src_known = self.get(src)?.known();
        let src_backend_ino = src_known.map(|k| k.ino);
        let src_publishing = self.get(src)?.publish_queued > 0;
        if src_on_backend && !src_publishing && shadowed_on_backend.is_some() && shadowed_on_backend == src_backend_ino
        {
            // On the backend the new name already is this very file (a hard
            // link the overlay had replaced with an unpublished file), and
            // rename(2) between two links of one file does nothing: drop the
            // old name instead.
            let mut op = FlushOp::new(keys, Action::Unlink { path: from });
            op.expect = src_known;
            fx.ops.push(op);
        } else if src_on_backend {
            let mut op = FlushOp::new(keys, Action::Rename { from, to, noreplace });
            // What a retry finds at the target if an attempt whose reply was
            // lost did the rename (a queued publish gives the file a new
            // backend inode first: then the worker reads it when the rename
            // runs).
            op.expect = src_known.filter(|_| !src_publishing);
            fx.ops.push(op);
        } else if sdent.shadows {
            // The backend's older object under the old name must go.
            let mut op = self.op(&[(parent, name)], &[], Action::Unlink { path: from })?;
            op.expect = sdent.shadow;
            fx.ops.push(op);
        }
        self.touch_dir(parent);
        self.touch_dir(newparent);
        if let Some(t) = dst {
            self.maybe_free(t, fx);
        }
        Ok(())
    }

    pub fn link(&mut self, ino: Ino, newparent: Ino, newname: &OsStr, fx: &mut Effects) -> FsResult<()> {
        let i = self.get(ino)?;
        if i.kind == Kind::Dir {
            return Err(FsError::NotPermitted);
        }
        if i.links.is_empty() {
            return Err(FsError::NotFound);
        }
        if self.nlink(ino)? as usize >= crate::backend::EFS_MAX_LINKS {
            return Err(FsError::TooManyLinks);
        }
        let on_backend = i.on_backend;
        let existing = self.path_of(ino)?;
        // The source name is locked too: a later rename over it must not run
        // before the link, or the link would name the wrong file.
        let (sp, sn) = self.get(ino)?.links[0].clone();
        let keys = self.keys(&[(newparent, newname), (sp, &sn)], &[ino])?;
        check_name(newname)?;
        if self.lookup(newparent, newname)?.is_some() {
            return Err(FsError::Exists);
        }
        let newname = Name::from(newname);
        self.dir_mut(newparent)?.insert(newname.clone(), ino, false, None);
        self.touched.push(ino);
        let i = self.get_mut(ino)?;
        i.links.push((newparent, newname.clone()));
        i.attr.ctime = Timespec::now();
        if on_backend {
            let new = self.path_for(newparent, &newname)?;
            fx.ops.push(FlushOp::new(keys, Action::Link { existing, new }));
        }
        self.touch_dir(newparent);
        Ok(())
    }

    /// Applies attribute changes (not size: the caller handles content) and
    /// queues what the backend needs.
    pub fn set_attrs(&mut self, ino: Ino, ch: &SetAttr, fx: &mut Effects) -> FsResult<Attr> {
        self.touched.push(ino);
        let i = self.get_mut(ino)?;
        let now = Timespec::now();
        let meta_change =
            ch.perm.is_some() || ch.uid.is_some() || ch.gid.is_some() || ch.atime.is_some() || ch.mtime.is_some();
        if let Some(p) = ch.perm {
            i.attr.perm = p & 0o7777;
        }
        if let Some(u) = ch.uid {
            i.attr.uid = u;
        }
        if let Some(g) = ch.gid {
            i.attr.gid = g;
        }
        if let Some(t) = ch.atime {
            i.attr.atime = t;
        }
        if let Some(t) = ch.mtime {
            i.attr.mtime = t;
        }
        if meta_change || ch.size.is_some() {
            i.attr.ctime = now;
        }
        let attr = i.attr.clone();
        if !meta_change {
            return Ok(attr);
        }
        let (kind, on_backend, pending_content) = (i.kind, i.on_backend, self.dirty_files.contains(&ino));
        if kind == Kind::Dir {
            // Applied once the directory's entries have settled on the backend.
            self.dirty_dir_attrs.insert(ino);
        } else if on_backend && !pending_content {
            let diff = attr.diff(kind, &self.get(ino)?.backend_attr());
            if !diff.is_empty() {
                let path = self.path_of(ino)?;
                let keys = self.attr_keys(ino)?;
                let retimed = diff.mtime.is_some();
                fx.ops.push(FlushOp::new(keys, Action::SetAttr { path, attrs: diff }));
                let i = self.get_mut(ino)?;
                i.set_backend_attr(&attr.to_set(kind));
                if retimed {
                    // The backend's mtime will be this mount's own: the
                    // version it will have is not known exactly.
                    i.backend_version = 0;
                    if let Some(b) = i.backend_ino {
                        self.retimed.insert(b);
                        self.retimed_now.push(b);
                    }
                }
            }
        }
        Ok(attr)
    }

    /// Queues setting (`Some`) or removing an extended attribute of an
    /// object whose content is not staged, and records it in the overlay.
    pub fn set_xattr(&mut self, ino: Ino, name: &OsStr, value: Option<Vec<u8>>, fx: &mut Effects) -> FsResult<()> {
        self.touched.push(ino);
        let i = self.get_mut(ino)?;
        i.attr.ctime = Timespec::now();
        let cache = i.xattrs.get_or_insert_with(|| XattrCache::new(Xattrs::new()));
        match &value {
            Some(v) => {
                cache.map.insert(name.to_owned(), v.clone());
            }
            None => {
                cache.map.remove(name);
            }
        }
        cache.loaded = Instant::now();
        if !i.on_backend || (i.links.is_empty() && ino != ROOT) {
            return Ok(()); // nothing on the backend (any more) to change
        }
        let keys = self.attr_keys(ino)?;
        let path = self.path_of(ino)?;
        fx.ops.push(FlushOp::new(
            keys,
            Action::SetXattr {
                path,
                name: name.to_owned(),
                value,
            },
        ));
        Ok(())
    }

    /// A file's content changes: from now on it has unpublished content.
    pub fn mark_dirty(&mut self, ino: Ino) -> FsResult<()> {
        if !self.dirty_files.contains(&ino) {
            self.touched.push(ino);
        }
        if let Some((id, _)) = self.lingering.remove(&ino) {
            self.clean_marks.push((id, false));
        }
        let i = self.get_mut(ino)?;
        if let Content::Staged { id, .. } = i.content {
            i.content = Content::Staged { id, dirty: true };
        }
        i.generation += 1;
        self.debounce.remove(&ino);
        self.dirty_files.insert(ino);
        Ok(())
    }

    /// The last writer closed a dirty file: start its quiet period.
    pub fn file_quiet(&mut self, ino: Ino, now: Instant) {
        self.touched.push(ino);
        if self
            .inodes
            .get(&ino)
            .is_some_and(|i| i.is_dirty() && !i.links.is_empty())
        {
            self.debounce.insert(ino, now);
        }
    }

    /// Builds the publish op of a dirty, closed file and marks its content as
    /// queued. The file joins the backend's future under all its current names.
    pub fn queue_publish(&mut self, ino: Ino) -> FsResult<Option<FlushOp>> {
        self.touched.push(ino);
        self.debounce.remove(&ino);
        self.dirty_files.remove(&ino);
        let i = self.get(ino)?;
        let Content::Staged { id, dirty: true } = i.content else {
            return Ok(None);
        };
        if i.links.is_empty() {
            return Ok(None);
        }
        let names = i.links.clone();
        let attrs = i.attr.to_set(Kind::File);
        let mut paths = Vec::new();
        for (p, n) in &names {
            paths.push(self.path_for(*p, n)?);
        }
        let names_ref: Vec<(Ino, &OsStr)> = names.iter().map(|(p, n)| (*p, &**n)).collect();
        let op = self.op(
            &names_ref,
            &[ino],
            Action::Publish {
                ino,
                staging: id,
                size: i.attr.size,
                paths,
                attrs,
            },
        )?;
        // The publish changes its directories' entries (and times) on the
        // backend; the overlay's times go back after it. Journaled now, so
        // a crash while it runs cannot leave the backend's.
        for (p, _) in &names {
            if self.dirty_dir_attrs.insert(*p) {
                self.touched.push(*p);
            }
        }
        let mut replaces = None;
        for (k, (p, n)) in names.iter().enumerate() {
            let shadowed = self.dir_mut(*p)?.clear_shadow(n);
            if k == 0 {
                replaces = shadowed;
            }
        }
        if self.get(ino)?.backend_ino.is_none() {
            self.set_replaces(ino, replaces);
        }
        let replaces = self.replaces(ino);
        let i = self.get_mut(ino)?;
        // What the publish will expect the name to hold (see `run_worker`),
        // journaled with the op; unknown while an earlier publish of the
        // file is in flight (it brings a new object).
        let expect = if i.publish_queued == 0 {
            i.known().or(replaces)
        } else {
            None
        };
        let mut op = op;
        op.expect = expect;
        i.on_backend = true;
        i.content = Content::Staged { id, dirty: false };
        i.publish_queued += 1;
        i.set_backend_attr(&i.attr.to_set(Kind::File));
        Ok(Some(op))
    }

    /// Marks `ino`'s staged content as still to publish, without a new
    /// generation: a publish queued while it is open for writing (for an
    /// fsync) copies what it holds then, and what is written after that,
    /// unseen by the daemon through passthrough, is published at the close.
    pub fn still_dirty(&mut self, ino: Ino) -> FsResult<()> {
        let i = self.get_mut(ino)?;
        if let Content::Staged { id, .. } = i.content {
            i.content = Content::Staged { id, dirty: true };
        }
        self.dirty_files.insert(ino);
        self.touched.push(ino);
        Ok(())
    }

    /// A publish finished. Returns the staging id to discard when the staged
    /// copy is no longer needed (content unchanged since and nobody has it open).
    /// (The new backend inode number was recorded before the op's keys were
    /// released, see `set_backend_ino`: recording it here could overwrite a
    /// later publish's.)
    pub fn publish_done(&mut self, ino: Ino, generation: u64, linger: bool) -> Option<u64> {
        self.replaces.remove(&ino);
        if self.dirty_files.contains(&ino) {
            // Written again meanwhile: its pending state now knows what its
            // next publish replaces (see `pending_expect`).
            self.touched.push(ino);
        }
        let i = self.inodes.get_mut(&ino)?;
        i.publish_queued = i.publish_queued.saturating_sub(1);
        match i.content {
            // The staged copy is exactly what the backend now holds: it may
            // be kept (even while open; a conflict or a failed publish never
            // gets here, so a copy that lost is never kept).
            Content::Staged { id, dirty: false } if i.generation == generation && i.publish_queued == 0 => {
                if linger {
                    self.linger(ino, id);
                    None
                } else if i.opens == 0 {
                    i.content = Content::Remote;
                    i.xattrs = None; // the published ones, read back when asked
                    Some(id)
                } else {
                    None // dropped at the last close
                }
            }
            _ => None,
        }
    }

    /// Keeps the clean staged copy `id` of `ino` (just published) until
    /// `expire_lingering`. Its time runs from this first call: a copy is
    /// never trusted longer than that, however often it is used.
    fn linger(&mut self, ino: Ino, id: u64) {
        if self.lingering.get(&ino).is_some_and(|(old, _)| *old == id) {
            return;
        }
        let now = Instant::now();
        self.lingering.insert(ino, (id, now));
        self.linger_order.push_back((ino, id, now));
        self.clean_marks.push((id, true));
    }

    /// Whether `ino`'s staged copy is kept after its publish.
    pub fn is_lingering(&self, ino: Ino) -> bool {
        self.lingering.contains_key(&ino)
    }

    /// Clean copies kept after their publish.
    pub fn lingering_count(&self) -> usize {
        self.lingering.len()
    }

    /// Whether dropping kept copies would free cache space now (some are not open).
    pub fn lingering_freeable(&self) -> bool {
        self.lingering.iter().any(|(ino, (id, _))| {
            self.inodes
                .get(ino)
                .is_some_and(|i| i.opens == 0 && i.content == (Content::Staged { id: *id, dirty: false }))
        })
    }

    /// Drops the clean copies kept longer than `keep` that nobody has open:
    /// those files read from the backend again. One in use is looked at again
    /// later. With None (the FUSE session has ended) every clean copy not
    /// waiting for a publish goes, open or not: no handle can be used any
    /// more, and the kernel's releases of the last closes may not have
    /// arrived before the session ended.
    pub fn expire_lingering(&mut self, keep: Option<Duration>, fx: &mut Effects) {
        let now = Instant::now();
        let mut in_use = Vec::new();
        while let Some(&(ino, id, since)) = self.linger_order.front() {
            if keep.is_some_and(|k| now.duration_since(since) < k) {
                break;
            }
            self.linger_order.pop_front();
            if self.lingering.get(&ino) != Some(&(id, since)) {
                continue; // dirty again or replaced by a newer entry
            }
            match self.inodes.get_mut(&ino) {
                Some(i) if i.content == (Content::Staged { id, dirty: false }) => {
                    if (i.opens > 0 && keep.is_some()) || i.publish_queued > 0 {
                        in_use.push((ino, id, since));
                        continue;
                    }
                    i.content = Content::Remote;
                    i.xattrs = None;
                    fx.discard.push(id);
                }
                // Removed: its copy went with it.
                _ => {}
            }
            self.lingering.remove(&ino);
        }
        self.linger_order.extend(in_use);
    }

    /// A publish found the file replaced or changed on the backend by another
    /// client (`theirs`): unless it changed again or is open, the backend's version
    /// wins and the file reads from the backend again.
    /// (`retime_pending`: see `Scheduler::retime_pending`.)
    pub fn publish_conflict(
        &mut self,
        ino: Ino,
        theirs: &crate::backend::Stat,
        retime_pending: bool,
    ) -> ConflictOutcome {
        let Some(i) = self.inodes.get_mut(&ino) else {
            return ConflictOutcome::ChangedAgain;
        };
        i.publish_queued = i.publish_queued.saturating_sub(1);
        if !matches!(i.content, Content::Staged { dirty: false, .. }) || i.publish_queued > 0 {
            return ConflictOutcome::ChangedAgain;
        }
        if i.opens > 0 {
            return ConflictOutcome::StillOpen;
        }
        i.content = Content::Remote;
        i.xattrs = None;
        i.attr = Attr::from_stat(theirs);
        i.fetched = Some(Stamp::now());
        self.replaces.remove(&ino);
        let mut known = theirs.known();
        if retime_pending {
            known.version = 0;
        }
        self.set_backend(ino, known);
        self.touched.push(ino);
        ConflictOutcome::BackendWins
    }

    /// A publish ended without publishing (content changed meanwhile, file
    /// removed, or a permanent failure that `status` reports).
    pub fn publish_abandoned(&mut self, ino: Ino) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.publish_queued = i.publish_queued.saturating_sub(1);
        }
    }

    /// The queued directory attribute op for `dir`.
    pub fn queue_dir_attrs(&mut self, dir: Ino) -> FsResult<Option<FlushOp>> {
        self.touched.push(dir);
        self.dirty_dir_attrs.remove(&dir);
        let i = self.get(dir)?;
        if i.links.is_empty() && dir != ROOT {
            return Ok(None);
        }
        let attrs = i.attr.diff(Kind::Dir, &i.backend_attr());
        if attrs.is_empty() {
            return Ok(None);
        }
        let full = i.attr.to_set(Kind::Dir);
        let path = self.path_of(dir)?;
        self.get_mut(dir)?.set_backend_attr(&full);
        let i = self.get(dir)?;
        let keys = if dir == ROOT {
            vec![(Key::Ino(ROOT), Access::Exclusive)]
        } else {
            let (p, n) = i.links[0].clone();
            self.keys(&[(p, &n)], &[dir])?
        };
        Ok(Some(FlushOp::new(keys, Action::SetAttr { path, attrs })))
    }

    /// The backend changed the entries of `dir` (an op in it finished).
    pub fn entries_changed_on_backend(&mut self, dir: Ino) {
        if let Some(i) = self.inodes.get_mut(&dir) {
            let mut b = i.backend_attr();
            b.mtime = None;
            b.atime = None;
            i.set_backend_attr(&b);
        }
        // The backend just set the directory's mtime to "now": give it the
        // overlay's times again once its entries settle.
        if self.inodes.contains_key(&dir) {
            self.dirty_dir_attrs.insert(dir);
            self.touched.push(dir);
        }
    }

    /// Parents of files whose content is not yet queued for publishing.
    pub fn dirs_with_unqueued_files(&self) -> HashSet<Ino> {
        let mut out = HashSet::new();
        for ino in &self.dirty_files {
            if let Some(i) = self.inodes.get(ino) {
                out.extend(i.links.iter().map(|(p, _)| *p));
            }
        }
        out
    }

    /// What the journal must hold for `ino` beyond its queued ops: the names
    /// and owner of unpublished staged content, or directory attributes not
    /// yet applied.
    pub fn pending_state(&self, ino: Ino) -> Option<PendingState> {
        let i = self.inodes.get(&ino)?;
        if i.links.is_empty() && ino != ROOT {
            return None;
        }
        if self.dirty_files.contains(&ino) {
            let Content::Staged { id, .. } = i.content else {
                return None;
            };
            let paths = i
                .links
                .iter()
                .map(|(p, n)| self.path_for(*p, n))
                .collect::<FsResult<Vec<_>>>()
                .ok()?;
            let closed = i.writers == 0 && !i.foreign_writer;
            return Some(PendingState::File {
                ino,
                paths,
                perm: i.attr.perm,
                uid: i.attr.uid,
                gid: i.attr.gid,
                staging: id,
                size: closed.then_some(i.attr.size),
            });
        }
        if self.dirty_dir_attrs.contains(&ino) {
            return Some(PendingState::Dir {
                ino,
                path: self.path_of(ino).ok()?,
                attrs: i.attr.to_set(Kind::Dir),
            });
        }
        None
    }

    /// For a file with unpublished content: the backend object its next
    /// publish replaces under its first name, when known. Journaled with its
    /// pending state, so a publish after a crash still checks against what
    /// was there before the crash, not what another client left since.
    /// (Unknown while a publish of it is in flight: that brings a new one.)
    pub fn pending_expect(&self, ino: Ino) -> Option<Known> {
        let i = self.inodes.get(&ino)?;
        if !self.dirty_files.contains(&ino) || i.publish_queued > 0 {
            return None;
        }
        if let Some(b) = i.known().or(self.replaces(ino)) {
            return Some(b);
        }
        let (p, n) = i.links.first()?;
        self.dir(*p).ok()?.get(n)?.shadow
    }

    /// After a crash: takes back a file whose staged content was never
    /// published, under `names` (parents loaded). What the backend has under
    /// those names is shadowed: the publish replaces it (after checking that
    /// the first name still holds `file.expect`, when known). Staging ids
    /// that nothing refers to any more are added to `discard`.
    pub fn adopt_file(
        &mut self,
        names: &[(Ino, OsString)],
        file: AdoptedFile,
        now: Instant,
        discard: &mut Vec<u64>,
    ) -> FsResult<Ino> {
        let AdoptedFile {
            staging,
            attr,
            foreign_writer,
            expect,
        } = file;
        for (p, n) in names {
            check_name(n)?;
            if let Some(old) = self.lookup(*p, n)?
                && self.get(old)?.kind == Kind::Dir
            {
                return Err(FsError::IsDir);
            }
        }
        let (size, mtime) = (attr.size, attr.mtime);
        let ino = self.new_ino();
        let mut i = Inode::new(ino, Kind::File, attr);
        i.content = Content::Staged {
            id: staging,
            dirty: true,
        };
        i.foreign_writer = foreign_writer;
        self.inodes.insert(ino, Box::new(i));
        for (k, (p, n)) in names.iter().enumerate() {
            let (shadows, shadow) = match self.lookup(*p, n)? {
                Some(old) => {
                    let o = self.get(old)?;
                    let old_known = o.known();
                    // This very content, published before the crash but
                    // not journaled as done (the journal had stopped at a
                    // failed write): the name holds ours, not another
                    // client's file (as `replaced_by_publish` judges).
                    let ours_done = o.content == Content::Remote && o.attr.size == size && kept_as(o.attr.mtime, mtime);
                    self.detach(*p, n)?;
                    let mut fx = Effects::default();
                    self.maybe_free(old, &mut fx);
                    discard.append(&mut fx.discard);
                    let expected = if k == 0 && !ours_done {
                        expect.or(old_known)
                    } else {
                        old_known
                    };
                    (true, expected)
                }
                None => (false, None),
            };
            let n = Name::from(n.as_os_str());
            self.dir_mut(*p)?.insert(n.clone(), ino, shadows, shadow);
            self.get_mut(ino)?.links.push((*p, n));
        }
        self.next_staging = self.next_staging.max(staging + 1);
        self.dirty_files.insert(ino);
        self.file_quiet(ino, now);
        Ok(ino)
    }

    /// After a crash: directory attributes that were never applied.
    pub fn adopt_dir_attrs(&mut self, dir: Ino, attrs: &AttrSet) -> FsResult<()> {
        if self.get(dir)?.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let ch = SetAttr {
            perm: attrs.perm,
            uid: attrs.uid,
            gid: attrs.gid,
            size: None,
            atime: attrs.atime,
            mtime: attrs.mtime,
        };
        // For a directory this only marks its attributes as due (no op).
        self.set_attrs(dir, &ch, &mut Effects::default())?;
        Ok(())
    }

    /// New staging ids start above `id` (ids of files kept from a crash).
    pub fn reserve_staging_ids(&mut self, id: u64) {
        self.next_staging = self.next_staging.max(id + 1);
    }

    /// A file adopted with a possible writer from a dead mount: that writer is gone.
    pub fn foreign_writer_gone(&mut self, ino: Ino) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.foreign_writer = false;
            self.touched.push(ino);
        }
    }

    /// Kernel lookup count bookkeeping.
    pub fn add_lookup(&mut self, ino: Ino) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.lookups += 1;
        }
    }
    pub fn forget(&mut self, ino: Ino, n: u64, fx: &mut Effects) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.lookups = i.lookups.saturating_sub(n);
            self.maybe_free(ino, fx);
        }
    }
}

/// What became of an op a crashed instance journaled but did not finish,
/// once replayed into the overlay (see `Namespace::replay`).
#[derive(Debug)]
pub enum Replayed {
    /// Still to run on the backend: the op, with the keys it holds in this
    /// overlay (a publish names this overlay's inode).
    Queue(FlushOp),
    /// The backend already shows it: the crash came between the op and its
    /// done mark.
    Applied,
}

/// The staged copy a replayed publish brings: its blocks as the staging
/// file has them (its size is checked against the op by the caller).
#[derive(Clone, Copy, Debug)]
pub struct StagedCopy {
    pub blocks: u64,
}

// ---- recovery: the overlay rebuilt from a dead instance's journal -------------
//
// The overlay starts as the backend's tree; the ops the dead instance
// journaled and did not finish are applied to it in journal order, so it
// shows what that instance had acknowledged before it serves anything. An op
// whose effect the backend already shows (a rename whose source is gone, a
// mkdir whose directory exists) ran before the crash: the scheduler finished
// every op that conflicts with an unfinished one only after it, so nothing
// else can have changed those names.
impl Namespace {
    /// The object at `path`, through loaded directories (None: a name on
    /// the way is missing; `WouldBlock`: a directory on the way is not
    /// loaded yet).
    pub fn resolve(&self, path: &RelPath) -> FsResult<Option<Ino>> {
        let mut cur = ROOT;
        for name in &path.0 {
            let d = self.dir(cur)?;
            if d.loaded.is_none() {
                return Err(FsError::WouldBlock);
            }
            match d.entries.get(name.as_os_str()) {
                Some(e) => cur = e.ino,
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// The loaded directory holding `path`, and its last name.
    fn parent_of(&self, path: &RelPath) -> FsResult<(Ino, OsString)> {
        let (dir, name) = path.split_last().ok_or(FsError::Invalid)?;
        let d = self.resolve(&dir)?.ok_or(FsError::NotFound)?;
        if self.dir(d)?.loaded.is_none() {
            return Err(FsError::WouldBlock);
        }
        Ok((d, name.to_owned()))
    }

    /// A replayed op changed `dir`'s entries: its times (as loaded, or as
    /// journaled) go back once its entries settle on the backend.
    fn entries_replayed(&mut self, dir: Ino) {
        self.dirty_dir_attrs.insert(dir);
    }

    /// Applies a journaled op of a dead instance to the overlay (every
    /// directory its paths go through loaded). `expect`: the backend file
    /// its name held when it was queued (journaled for unlinks and
    /// publishes; for renames, the one its source held). `staged`: for a publish, its staged copy. Staging ids
    /// that nothing refers to any more are added to `discard`.
    pub fn replay(
        &mut self,
        action: Action,
        expect: Option<Known>,
        staged: Option<StagedCopy>,
        discard: &mut Vec<u64>,
    ) -> FsResult<Replayed> {
        let mut fx = Effects::default();
        let r = self.replay_one(action, expect, staged, &mut fx);
        discard.append(&mut fx.discard);
        r
    }

    fn replay_one(
        &mut self,
        action: Action,
        expect: Option<Known>,
        staged: Option<StagedCopy>,
        fx: &mut Effects,
    ) -> FsResult<Replayed> {
        match action {
            Action::Mkdir { path, perm, uid, gid } => {
                let (parent, name) = self.parent_of(&path)?;
                let set = AttrSet {
                    perm: Some(perm),
                    uid: Some(uid),
                    gid: Some(gid),
                    ..Default::default()
                };
                if let Some(op) = self.replay_existing(parent, &name, Kind::Dir, &set, || Action::Mkdir {
                    path: path.clone(),
                    perm,
                    uid,
                    gid,
                })? {
                    return Ok(op);
                }
                let ino = self.new_ino();
                let i = Inode::new_dir(ino, perm, uid, gid);
                self.attach(parent, &name, i)?;
                self.dirty_dir_attrs.insert(ino);
                self.entries_replayed(parent);
                let op = self.op(&[(parent, &name)], &[ino], Action::Mkdir { path, perm, uid, gid })?;
                Ok(Replayed::Queue(op))
            }
            Action::Rmdir { path } => {
                let (parent, name) = self.parent_of(&path)?;
                let Some(dir) = self.lookup(parent, &name)? else {
                    return Ok(Replayed::Applied);
                };
                if self.get(dir)?.kind != Kind::Dir {
                    return Err(FsError::NotDir);
                }
                let op = self.op(&[(parent, &name)], &[dir], Action::Rmdir { path })?;
                self.detach(parent, &name)?;
                self.maybe_free(dir, fx);
                self.entries_replayed(parent);
                Ok(Replayed::Queue(op))
            }
            Action::Unlink { path } => {
                let (parent, name) = self.parent_of(&path)?;
                let Some(ino) = self.lookup(parent, &name)? else {
                    return Ok(Replayed::Applied);
                };
                let i = self.get(ino)?;
                if i.kind == Kind::Dir {
                    return Err(FsError::IsDir);
                }
                // Removes the object the dead mount knew, or else the one
                // loaded now, only if it is still there (another client may
                // have replaced it).
                let loaded = i.known().filter(|_| i.content == Content::Remote);
                let mut op = self.op(&[(parent, &name)], &[ino], Action::Unlink { path })?;
                op.expect = expect.or(loaded);
                self.detach(parent, &name)?;
                self.maybe_free(ino, fx);
                self.entries_replayed(parent);
                Ok(Replayed::Queue(op))
            }
            Action::Rename { from, to, noreplace } => {
                let (sp, sn) = self.parent_of(&from)?;
                let (dp, dn) = self.parent_of(&to)?;
                let Some(src) = self.lookup(sp, &sn)? else {
                    return Ok(Replayed::Applied);
                };
                let dst = self.lookup(dp, &dn)?;
                if dst == Some(src) {
                    // Two names of one backend file: rename(2) would do
                    // nothing; the old name goes, as in the live mount.
                    let expect = self.get(src)?.known();
                    let mut op = self.op(&[(sp, &sn)], &[src], Action::Unlink { path: from })?;
                    op.expect = expect;
                    self.detach(sp, &sn)?;
                    self.entries_replayed(sp);
                    return Ok(Replayed::Queue(op));
                }
                let mut objects = vec![src];
                objects.extend(dst);
                let keys = self.keys(&[(sp, &sn), (dp, &dn)], &objects)?;
                if let Some(t) = dst {
                    self.detach(dp, &dn)?;
                    self.maybe_free(t, fx);
                }
                self.detach(sp, &sn)?;
                self.add_link(dp, &dn, src)?;
                self.touched.push(src);
                self.entries_replayed(sp);
                self.entries_replayed(dp);
                let mut op = FlushOp::new(keys, Action::Rename { from, to, noreplace });
                // (As in the live mount: unknown while a publish is queued.)
                let loaded = Some(self.get(src)?)
                    .filter(|i| i.publish_queued == 0)
                    .and_then(|i| i.known());
                op.expect = expect.or(loaded);
                Ok(Replayed::Queue(op))
            }
            Action::Symlink { path, target, attrs } => {
                let (parent, name) = self.parent_of(&path)?;
                // (Not the symlink again: its create replaces an existing
                // link, a new backend object the overlay would not know.)
                if let Some(op) = self.replay_existing(parent, &name, Kind::Symlink, &attrs, || Action::SetAttr {
                    path: path.clone(),
                    attrs: attrs.clone(),
                })? {
                    return Ok(op);
                }
                let ino = self.new_ino();
                let mut i = Inode::new(ino, Kind::Symlink, Attr::new(0o777, 0, 0));
                i.attr.apply(&attrs);
                i.attr.size = target.len() as u64;
                self.symlinks.insert(ino, target.as_os_str().into());
                i.on_backend = true;
                i.xattrs = Some(XattrCache::new(Xattrs::new()));
                i.set_backend_attr(&attrs);
                self.attach(parent, &name, i)?;
                self.entries_replayed(parent);
                let op = self.op(&[(parent, &name)], &[ino], Action::Symlink { path, target, attrs })?;
                Ok(Replayed::Queue(op))
            }
            Action::Mknod {
                path,
                kind,
                perm,
                rdev,
                attrs,
            } => {
                let (parent, name) = self.parent_of(&path)?;
                let mut set = attrs.clone();
                set.perm = Some(perm);
                if let Some(op) = self.replay_existing(parent, &name, kind, &set, || Action::Mknod {
                    path: path.clone(),
                    kind,
                    perm,
                    rdev,
                    attrs: attrs.clone(),
                })? {
                    return Ok(op);
                }
                let ino = self.new_ino();
                let mut i = Inode::new(ino, kind, Attr::new(perm, 0, 0));
                i.attr.apply(&attrs);
                i.attr.rdev = rdev;
                i.on_backend = true;
                i.xattrs = Some(XattrCache::new(Xattrs::new()));
                i.set_backend_attr(&i.attr.to_set(kind));
                self.attach(parent, &name, i)?;
                self.entries_replayed(parent);
                let action = Action::Mknod {
                    path,
                    kind,
                    perm,
                    rdev,
                    attrs,
                };
                Ok(Replayed::Queue(self.op(&[(parent, &name)], &[ino], action)?))
            }
            Action::Link { existing, new } => {
                let (np, nn) = self.parent_of(&new)?;
                if self.lookup(np, &nn)?.is_some() {
                    return Ok(Replayed::Applied);
                }
                let (sp, sn) = self.parent_of(&existing)?;
                let Some(src) = self.lookup(sp, &sn)? else {
                    // Superseded: the file was rewritten since and is taken
                    // back (and published) under all its names.
                    return Ok(Replayed::Applied);
                };
                if self.get(src)?.kind == Kind::Dir {
                    return Err(FsError::NotPermitted);
                }
                let keys = self.keys(&[(np, &nn), (sp, &sn)], &[src])?;
                self.add_link(np, &nn, src)?;
                self.touched.push(src);
                self.entries_replayed(np);
                Ok(Replayed::Queue(FlushOp::new(keys, Action::Link { existing, new })))
            }
            Action::SetAttr { path, attrs } => {
                let Some(ino) = self.resolve(&path)? else {
                    return Ok(Replayed::Applied); // gone from the backend since
                };
                let i = self.get_mut(ino)?;
                i.attr.apply(&attrs);
                i.merge_backend_attr(&attrs);
                if attrs.mtime.is_some() {
                    i.backend_version = 0; // see `set_attrs`
                    if let Some(b) = i.backend_ino {
                        self.retimed.insert(b);
                        self.retimed_now.push(b);
                    }
                }
                let keys = self.attr_keys(ino)?;
                Ok(Replayed::Queue(FlushOp::new(keys, Action::SetAttr { path, attrs })))
            }
            Action::SetXattr { path, name, value } => {
                let Some(ino) = self.resolve(&path)? else {
                    return Ok(Replayed::Applied);
                };
                if let Some(cache) = self.get_mut(ino)?.xattrs.as_mut() {
                    match &value {
                        Some(v) => cache.map.insert(name.clone(), v.clone()),
                        None => cache.map.remove(&name),
                    };
                }
                let keys = self.attr_keys(ino)?;
                Ok(Replayed::Queue(FlushOp::new(
                    keys,
                    Action::SetXattr { path, name, value },
                )))
            }
            Action::Publish {
                ino: _,
                staging,
                size,
                paths,
                attrs,
            } => {
                let staged = staged.ok_or(FsError::NotFound)?;
                let mut names = Vec::new();
                for p in &paths {
                    let (d, n) = self.parent_of(p)?;
                    if let Some(old) = self.lookup(d, &n)?
                        && self.get(old)?.kind == Kind::Dir
                    {
                        return Err(FsError::IsDir);
                    }
                    names.push((d, n));
                }
                let ino = self.new_ino();
                let mut attr = Attr::new(0o600, 0, 0);
                attr.apply(&attrs);
                attr.size = size;
                attr.blocks = staged.blocks;
                let mut i = Inode::new(ino, Kind::File, attr);
                i.content = Content::Staged {
                    id: staging,
                    dirty: false,
                };
                i.on_backend = true;
                i.publish_queued = 1;
                i.set_backend_attr(&i.attr.to_set(Kind::File));
                self.inodes.insert(ino, Box::new(i));
                for (k, (d, n)) in names.iter().enumerate() {
                    if let Some(old) = self.lookup(*d, n)? {
                        if k == 0 {
                            let replaces = self.replaced_by_publish(old, expect, size, &attrs)?;
                            self.set_replaces(ino, replaces);
                        }
                        self.detach(*d, n)?;
                        self.maybe_free(old, fx);
                    } else if k == 0 {
                        self.set_replaces(ino, expect);
                    }
                    self.add_link(*d, n, ino)?;
                    self.entries_replayed(*d);
                }
                self.touched.push(ino);
                self.next_staging = self.next_staging.max(staging + 1);
                let names_ref: Vec<(Ino, &OsStr)> = names.iter().map(|(p, n)| (*p, n.as_os_str())).collect();
                let action = Action::Publish {
                    ino,
                    staging,
                    size,
                    paths,
                    attrs,
                };
                Ok(Replayed::Queue(self.op(&names_ref, &[ino], action)?))
            }
            Action::Barrier(_) => Ok(Replayed::Applied),
        }
    }

    /// A replayed create whose name exists: with the right kind, the create
    /// ran before the crash, but maybe not the owner, mode and times that
    /// follow it. The overlay takes them from the op, and `action` (the
    /// create again, idempotent, or just its attributes) is queued.
    fn replay_existing(
        &mut self,
        parent: Ino,
        name: &OsStr,
        kind: Kind,
        attrs: &AttrSet,
        action: impl FnOnce() -> Action,
    ) -> FsResult<Option<Replayed>> {
        // (`action` is built only when the op is queued again.)
        let Some(ino) = self.lookup(parent, name)? else {
            return Ok(None);
        };
        let i = self.get_mut(ino)?;
        if i.kind != kind {
            return Err(FsError::Exists);
        }
        i.attr.apply(attrs);
        i.merge_backend_attr(attrs);
        Ok(Some(Replayed::Queue(self.op(&[(parent, name)], &[ino], action())?)))
    }

    /// What a replayed publish checks its first name still holds before it
    /// replaces `old` (loaded from the backend there now): `old`, if it is
    /// what the dead mount expected (`expect`) or this very publish already
    /// done (same size and mtime: the crash came before its done mark);
    /// otherwise what the dead mount expected, so another client's file wins
    /// the check.
    fn replaced_by_publish(
        &self,
        old: Ino,
        expect: Option<Known>,
        size: u64,
        attrs: &AttrSet,
    ) -> FsResult<Option<Known>> {
        let o = self.get(old)?;
        let loaded = o.known().filter(|_| o.content == Content::Remote);
        let Some(expected) = expect else { return Ok(loaded) };
        let as_expected =
            loaded.is_some_and(|l| l.ino == expected.ino && (expected.version == 0 || l.version == expected.version));
        let ours_done = o.attr.size == size && attrs.mtime.is_some_and(|m| kept_as(o.attr.mtime, m));
        Ok(if as_expected || ours_done {
            loaded
        } else {
            Some(expected)
        })
    }

    /// Keys of an op that changes an object's attributes.
    fn attr_keys(&self, ino: Ino) -> FsResult<Vec<(Key, Access)>> {
        if ino == ROOT {
            return Ok(vec![(Key::Ino(ROOT), Access::Exclusive)]);
        }
        let names = self.get(ino)?.links.clone();
        let names_ref: Vec<(Ino, &OsStr)> = names.iter().map(|(p, n)| (*p, &**n)).collect();
        self.keys(&names_ref, &[ino])
    }
}

/// Whether `stored` is the time `set` as a backend keeping times to some
/// power of ten of nanoseconds stores it.
fn kept_as(stored: Timespec, set: Timespec) -> bool {
    (0..=9).any(|e| stored == set.truncated(10u32.pow(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn time() -> impl Strategy<Value = Option<Timespec>> {
        proptest::option::of((any::<i64>(), 0u32..1_000_000_000).prop_map(|(sec, nsec)| Timespec { sec, nsec }))
    }

    proptest! {
        #[test]
        fn a_packed_attr_set_unpacks_to_what_was_packed(
            perm in proptest::option::of(0u32..0o10000),
            uid in proptest::option::of(any::<u32>()),
            gid in proptest::option::of(any::<u32>()),
            atime in time(),
            mtime in time(),
        ) {
            let a = AttrSet { perm, uid, gid, atime, mtime };
            prop_assert_eq!(PackedAttrSet::pack(&a).unpack(), a);
        }
    }
}
