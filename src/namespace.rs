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
use std::time::Instant;

use crate::backend::{AttrSet, Kind, RelPath, Stat, Timespec};
use crate::error::{FsError, FsResult};
use crate::flush::{Access, Action, FlushOp, Key};
use crate::journal::PendingState;
use crate::xattr::Xattrs;

pub type Ino = u64;
pub const ROOT: Ino = 1;
/// Inode numbers for objects not (yet) on the backend have the top bit set, so
/// they never collide with numbers derived from backend inode numbers.
const SYNTHETIC_BASE: u64 = 1 << 63;

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

/// Where a regular file's data lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// On the backend, read through the backend.
    Remote,
    /// In the staging area under this id; `dirty` until a publish of it is queued.
    Staged { id: u64, dirty: bool },
}

#[derive(Clone, Debug)]
pub struct Dentry {
    pub ino: Ino,
    /// Readdir cookie: entries are listed in cookie order, so offsets stay valid
    /// while the directory changes.
    pub cookie: u64,
    /// Only for entries of files absent from the backend: the backend still has
    /// an older object under this name (the file was renamed over it), which
    /// must be removed if this entry goes away before the file is published.
    pub shadows: bool,
    /// The backend inode number of that older object, when known: a publish
    /// or unlink that replaces it first checks that it is still the one
    /// there (another client may have replaced it since).
    pub shadow_ino: Option<u64>,
}

#[derive(Clone, Debug, Default)]
pub struct Dir {
    pub entries: BTreeMap<OsString, Dentry>,
    pub by_cookie: BTreeMap<u64, OsString>,
    next_cookie: u64,
    /// When the listing was last loaded from (or known equal to) the backend.
    pub loaded: Option<Instant>,
    pub subdirs: u32,
}

impl Dir {
    fn insert(&mut self, name: OsString, ino: Ino, shadows: bool, shadow_ino: Option<u64>) {
        self.next_cookie += 1;
        let cookie = self.next_cookie + 2; // 1 and 2 are "." and ".."
        let dentry = Dentry {
            ino,
            cookie,
            shadows,
            shadow_ino: shadow_ino.filter(|_| shadows),
        };
        if let Some(old) = self.entries.insert(name.clone(), dentry) {
            self.by_cookie.remove(&old.cookie);
        }
        self.by_cookie.insert(cookie, name);
    }
    fn remove(&mut self, name: &OsStr) -> Option<Dentry> {
        let d = self.entries.remove(name)?;
        self.by_cookie.remove(&d.cookie);
        Some(d)
    }
}

#[derive(Clone, Debug)]
pub struct Inode {
    pub ino: Ino,
    pub kind: Kind,
    pub attr: Attr,
    /// Names of this inode: (parent, name). One for directories; files may have several.
    pub links: Vec<(Ino, OsString)>,
    /// True once the backend has this object or a queued op will create it.
    pub on_backend: bool,
    /// The backend's inode number, once known.
    pub backend_ino: Option<u64>,
    pub content: Content,
    pub symlink_target: Option<OsString>,
    pub dir: Option<Box<Dir>>,
    /// The kernel's lookup count (FUSE forget protocol).
    pub lookups: u64,
    pub opens: u32,
    pub writers: u32,
    /// Bumped whenever the content may change (open for writing, truncate, write),
    /// so a publish can tell whether it copied the latest content.
    pub generation: u64,
    /// When attributes were last read from the backend.
    pub fetched: Option<Instant>,
    /// Publishes of the staged content queued or running (the staged copy is
    /// kept until the last of them is done).
    pub publish_queued: u32,
    /// The attributes the backend will have once the queued ops ran (None:
    /// unknown), so attribute flushes send only what differs.
    pub backend_attr: AttrSet,
    /// For a file not on the backend yet: the backend inode number of the
    /// older object its first publish replaces (checked before replacing).
    pub replaces: Option<u64>,
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
            links: Vec::new(),
            on_backend: false,
            backend_ino: None,
            content: Content::Remote,
            symlink_target: None,
            dir: (kind == Kind::Dir).then(Box::default),
            lookups: 0,
            opens: 0,
            writers: 0,
            generation: 0,
            fetched: None,
            publish_queued: 0,
            backend_attr: AttrSet::default(),
            foreign_writer: false,
            replaces: None,
            xattrs: None,
        }
    }
    /// A directory created through the mount: empty (so loaded), created
    /// on the backend by a queued mkdir with this mode and owner.
    fn new_dir(ino: Ino, perm: u32, uid: u32, gid: u32) -> Inode {
        let mut i = Inode::new(ino, Kind::Dir, Attr::new(perm, uid, gid));
        i.on_backend = true;
        i.xattrs = Some(XattrCache::new(Xattrs::new()));
        i.backend_attr = AttrSet {
            perm: Some(perm),
            uid: Some(uid),
            gid: Some(gid),
            atime: None,
            mtime: None,
        };
        i.dir.as_mut().expect("dir").loaded = Some(Instant::now());
        i
    }

    pub fn nlink(&self) -> u32 {
        match &self.dir {
            Some(d) => 2 + d.subdirs,
            None => self.links.len() as u32,
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
    by_backend: HashMap<u64, Ino>,
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
    /// A directory moved: the paths of everything below it changed.
    pub moved_dir: bool,
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
        let mut inodes = HashMap::new();
        let mut r = Inode::new(ROOT, Kind::Dir, Attr::from_stat(root));
        r.on_backend = true;
        r.backend_ino = Some(root.ino);
        r.lookups = 1;
        inodes.insert(ROOT, Box::new(r));
        let mut by_backend = HashMap::new();
        by_backend.insert(root.ino, ROOT);
        Namespace {
            inodes,
            by_backend,
            next_synthetic: SYNTHETIC_BASE,
            next_staging: 1,
            debounce: HashMap::new(),
            dirty_files: HashSet::new(),
            dirty_dir_attrs: HashSet::new(),
            root_backend_ino: root.ino,
            touched: Vec::new(),
            moved_dir: false,
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
        let ino = if backend_ino == self.root_backend_ino {
            ROOT
        } else if backend_ino < SYNTHETIC_BASE && backend_ino > ROOT {
            backend_ino
        } else {
            self.new_ino()
        };
        self.by_backend.insert(backend_ino, ino);
        ino
    }

    /// Records that a published file now has `backend_ino` on the backend.
    pub fn set_backend_ino(&mut self, ino: Ino, backend_ino: u64) {
        self.by_backend.insert(backend_ino, ino);
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.backend_ino = Some(backend_ino);
        }
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
            if check_name(&name).is_err() {
                continue; // publish temp files (reserved prefix) are never shown
            }
            seen.insert(name.clone());
            let existing = self.dir(dir)?.entries.get(&name).map(|d| d.ino);
            let ino = self.ino_for_backend(st.ino);
            if let Some(cur) = existing {
                if cur != ino {
                    continue; // the overlay has another object here (pending change): it wins
                }
                let attrs_pending = self.dirty_dir_attrs.contains(&cur);
                let i = self.get_mut(cur)?;
                if i.kind == st.kind && i.content == Content::Remote && i.writers == 0 && !attrs_pending {
                    i.attr = Attr::from_stat(&st);
                    i.fetched = Some(now);
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
            let gone: Vec<(OsString, Ino)> = self
                .dir(dir)?
                .entries
                .iter()
                .filter(|(n, _)| !seen.contains(*n))
                .map(|(n, d)| (n.clone(), d.ino))
                .collect();
            for (name, ino) in gone {
                let i = self.get(ino)?;
                let untouched = i.on_backend
                    && i.content == Content::Remote
                    && i.opens == 0
                    && i.dir.as_ref().is_none_or(|d| d.entries.is_empty());
                if untouched {
                    self.detach(dir, &name)?;
                }
            }
        }
        self.dir_mut(dir)?.loaded = Some(now);
        Ok(())
    }

    fn add_backend_entry(&mut self, dir: Ino, name: OsString, ino: Ino, st: &Stat, now: Instant) -> FsResult<()> {
        let inode = self.inodes.entry(ino).or_insert_with(|| {
            let mut i = Inode::new(ino, st.kind, Attr::from_stat(st));
            i.on_backend = true;
            i.backend_ino = Some(st.ino);
            i.fetched = Some(now);
            i.backend_attr = i.attr.to_set(st.kind);
            Box::new(i)
        });
        inode.links.push((dir, name.clone()));
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
            comps.push(n.clone());
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
            (Key::Name(*p, n.clone()), Access::Shared),
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
    fn attach(&mut self, parent: Ino, name: &OsStr, mut inode: Inode) -> FsResult<Ino> {
        let ino = inode.ino;
        self.touched.push(ino);
        inode.links.push((parent, name.to_owned()));
        self.inodes.insert(ino, Box::new(inode));
        self.link_entry(parent, name, ino)?;
        Ok(ino)
    }

    /// Adds the entry `name` in `parent` for the existing inode `ino`, whose
    /// links already name it.
    fn link_entry(&mut self, parent: Ino, name: &OsStr, ino: Ino) -> FsResult<()> {
        let is_dir = self.get(ino)?.kind == Kind::Dir;
        let d = self.dir_mut(parent)?;
        d.insert(name.to_owned(), ino, false, None);
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
        i.symlink_target = Some(target.to_owned());
        i.on_backend = true;
        i.xattrs = Some(XattrCache::new(Xattrs::new()));
        // The backend object gets the overlay's times, so both agree.
        let attrs = i.attr.to_set(Kind::Symlink);
        i.backend_attr = attrs.clone();
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
        i.backend_attr = attrs.clone();
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
        if let Some(pos) = i.links.iter().position(|(p, n)| *p == dir && n == name) {
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
        let (on_backend, backend_ino) = (i.on_backend, i.backend_ino.filter(|_| i.publish_queued == 0));
        let path = self.path_for(parent, name)?;
        let d = self.detach(parent, name)?;
        if on_backend {
            let mut op = self.op(&[(parent, name)], &[ino], Action::Unlink { path })?;
            op.expect_ino = backend_ino;
            fx.ops.push(op);
        } else if d.shadows {
            let mut op = self.op(&[(parent, name)], &[], Action::Unlink { path })?;
            op.expect_ino = d.shadow_ino;
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
        let mut replaced_ino = None;
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
            let tdent = self.dir(newparent)?.entries.get(newname).expect("dst exists").clone();
            replaced_shadows = ti.on_backend || tdent.shadows;
            // (Unknown while a publish of the target is queued or running:
            // it brings a new one.)
            replaced_ino = if ti.on_backend {
                ti.backend_ino.filter(|_| ti.publish_queued == 0)
            } else {
                tdent.shadow_ino
            };
            if !ti.on_backend && tdent.shadows {
                shadowed_on_backend = tdent.shadow_ino;
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
        {
            let shadows = !src_on_backend && replaced_shadows;
            let d = self.dir_mut(newparent)?;
            d.insert(newname.to_owned(), src, shadows, replaced_ino);
            if src_is_dir {
                d.subdirs += 1;
            }
        }
        if src_is_dir {
            self.moved_dir = true;
        }
        self.touched.push(src);
        let s = self.get_mut(src)?;
        s.links.push((newparent, newname.to_owned()));
        s.attr.ctime = Timespec::now();
        let src_backend_ino = self.get(src)?.backend_ino;
        let src_publishing = self.get(src)?.publish_queued > 0;
        if src_on_backend && !src_publishing && shadowed_on_backend.is_some() && shadowed_on_backend == src_backend_ino
        {
            // On the backend the new name already is this very file (a hard
            // link the overlay had replaced with an unpublished file), and
            // rename(2) between two links of one file does nothing: drop the
            // old name instead.
            let mut op = FlushOp::new(keys, Action::Unlink { path: from });
            op.expect_ino = src_backend_ino;
            fx.ops.push(op);
        } else if src_on_backend {
            fx.ops.push(FlushOp::new(keys, Action::Rename { from, to, noreplace }));
        } else if sdent.shadows {
            // The backend's older object under the old name must go.
            let mut op = self.op(&[(parent, name)], &[], Action::Unlink { path: from })?;
            op.expect_ino = sdent.shadow_ino;
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
        if i.links.len() >= 65000 {
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
        self.dir_mut(newparent)?.insert(newname.to_owned(), ino, false, None);
        self.touched.push(ino);
        let i = self.get_mut(ino)?;
        i.links.push((newparent, newname.to_owned()));
        i.attr.ctime = Timespec::now();
        if on_backend {
            let new = self.path_for(newparent, newname)?;
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
            let diff = attr.diff(kind, &self.get(ino)?.backend_attr);
            if !diff.is_empty() {
                let path = self.path_of(ino)?;
                let keys = self.attr_keys(ino)?;
                fx.ops.push(FlushOp::new(keys, Action::SetAttr { path, attrs: diff }));
                self.get_mut(ino)?.backend_attr = attr.to_set(kind);
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
        let names: Vec<(Ino, OsString)> = i.links.clone();
        let attrs = i.attr.to_set(Kind::File);
        let mut paths = Vec::new();
        for (p, n) in &names {
            paths.push(self.path_for(*p, n)?);
        }
        let names_ref: Vec<(Ino, &OsStr)> = names.iter().map(|(p, n)| (*p, n.as_os_str())).collect();
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
            if let Some(d) = self.dir_mut(*p)?.entries.get_mut(n) {
                if k == 0 && d.shadows {
                    replaces = d.shadow_ino;
                }
                d.shadows = false;
                d.shadow_ino = None;
            }
        }
        let i = self.get_mut(ino)?;
        if i.backend_ino.is_none() {
            i.replaces = replaces;
        }
        // What the publish will expect the name to hold (see `run_worker`),
        // journaled with the op; unknown while an earlier publish of the
        // file is in flight (it brings a new object).
        let expect = if i.publish_queued == 0 {
            i.backend_ino.or(i.replaces)
        } else {
            None
        };
        let mut op = op;
        op.expect_ino = expect;
        i.on_backend = true;
        i.content = Content::Staged { id, dirty: false };
        i.publish_queued += 1;
        i.backend_attr = i.attr.to_set(Kind::File);
        Ok(Some(op))
    }

    /// A publish finished. Returns the staging id to discard when the staged
    /// copy is no longer needed (content unchanged since and nobody has it open).
    /// (The new backend inode number was recorded before the op's keys were
    /// released, see `set_backend_ino`: recording it here could overwrite a
    /// later publish's.)
    pub fn publish_done(&mut self, ino: Ino, generation: u64) -> Option<u64> {
        let i = self.inodes.get_mut(&ino)?;
        i.replaces = None;
        i.publish_queued = i.publish_queued.saturating_sub(1);
        match i.content {
            Content::Staged { id, dirty: false }
                if i.generation == generation && i.opens == 0 && i.publish_queued == 0 =>
            {
                i.content = Content::Remote;
                i.xattrs = None; // the published ones, read back when asked
                Some(id)
            }
            _ => None,
        }
    }

    /// A publish ended without publishing (content changed meanwhile, file
    /// removed, or a permanent failure that `status` reports).
    /// A publish found the file replaced on the backend by another client
    /// (`theirs`): unless it changed again or is open, the backend's version
    /// wins and the file reads from the backend again.
    pub fn publish_conflict(&mut self, ino: Ino, theirs: &crate::backend::Stat) -> ConflictOutcome {
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
        i.replaces = None;
        i.attr = Attr::from_stat(theirs);
        i.fetched = Some(Instant::now());
        self.set_backend_ino(ino, theirs.ino);
        self.touched.push(ino);
        ConflictOutcome::BackendWins
    }

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
        let attrs = i.attr.diff(Kind::Dir, &i.backend_attr);
        if attrs.is_empty() {
            return Ok(None);
        }
        let full = i.attr.to_set(Kind::Dir);
        let path = self.path_of(dir)?;
        self.get_mut(dir)?.backend_attr = full;
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
            i.backend_attr.mtime = None;
            i.backend_attr.atime = None;
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

    /// After a crash: takes back a file whose staged content was never
    /// published, under `names` (parents loaded). What the backend has under
    /// those names is shadowed: the publish replaces it. Staging ids that
    /// nothing refers to any more are added to `discard`.
    pub fn adopt_file(
        &mut self,
        names: &[(Ino, OsString)],
        staging: u64,
        attr: Attr,
        foreign_writer: bool,
        now: Instant,
        discard: &mut Vec<u64>,
    ) -> FsResult<Ino> {
        for (p, n) in names {
            check_name(n)?;
            if let Some(old) = self.lookup(*p, n)?
                && self.get(old)?.kind == Kind::Dir
            {
                return Err(FsError::IsDir);
            }
        }
        let ino = self.new_ino();
        let mut i = Inode::new(ino, Kind::File, attr);
        i.content = Content::Staged {
            id: staging,
            dirty: true,
        };
        i.foreign_writer = foreign_writer;
        self.inodes.insert(ino, Box::new(i));
        for (p, n) in names {
            let (shadows, shadow_ino) = match self.lookup(*p, n)? {
                Some(old) => {
                    let old_ino = self.get(old)?.backend_ino;
                    self.detach(*p, n)?;
                    let mut fx = Effects::default();
                    self.maybe_free(old, &mut fx);
                    discard.append(&mut fx.discard);
                    (true, old_ino)
                }
                None => (false, None),
            };
            self.dir_mut(*p)?.insert(n.clone(), ino, shadows, shadow_ino);
            self.get_mut(ino)?.links.push((*p, n.clone()));
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
    /// directory its paths go through loaded). `expect`: the backend inode
    /// number its name had when it was queued (journaled for unlinks and
    /// publishes). `staged`: for a publish, its staged copy. Staging ids
    /// that nothing refers to any more are added to `discard`.
    pub fn replay(
        &mut self,
        action: Action,
        expect: Option<u64>,
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
        expect: Option<u64>,
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
                let loaded = i.backend_ino.filter(|_| i.content == Content::Remote);
                let mut op = self.op(&[(parent, &name)], &[ino], Action::Unlink { path })?;
                op.expect_ino = expect.or(loaded);
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
                    let expect = self.get(src)?.backend_ino;
                    let mut op = self.op(&[(sp, &sn)], &[src], Action::Unlink { path: from })?;
                    op.expect_ino = expect;
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
                self.get_mut(src)?.links.push((dp, dn.clone()));
                self.link_entry(dp, &dn, src)?;
                self.touched.push(src);
                self.entries_replayed(sp);
                self.entries_replayed(dp);
                Ok(Replayed::Queue(FlushOp::new(
                    keys,
                    Action::Rename { from, to, noreplace },
                )))
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
                i.symlink_target = Some(target.clone());
                i.on_backend = true;
                i.xattrs = Some(XattrCache::new(Xattrs::new()));
                i.backend_attr = attrs.clone();
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
                i.backend_attr = i.attr.to_set(kind);
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
                self.get_mut(src)?.links.push((np, nn.clone()));
                self.link_entry(np, &nn, src)?;
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
                i.backend_attr.merge(&attrs);
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
                i.backend_attr = i.attr.to_set(Kind::File);
                self.inodes.insert(ino, Box::new(i));
                for (k, (d, n)) in names.iter().enumerate() {
                    if let Some(old) = self.lookup(*d, n)? {
                        if k == 0 {
                            let replaces = self.replaced_by_publish(old, expect, size, &attrs)?;
                            self.get_mut(ino)?.replaces = replaces;
                        }
                        self.detach(*d, n)?;
                        self.maybe_free(old, fx);
                    } else if k == 0 {
                        self.get_mut(ino)?.replaces = expect;
                    }
                    self.get_mut(ino)?.links.push((*d, n.clone()));
                    self.link_entry(*d, n, ino)?;
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
        i.backend_attr.merge(attrs);
        Ok(Some(Replayed::Queue(self.op(&[(parent, name)], &[ino], action())?)))
    }

    /// What a replayed publish checks its first name still holds before it
    /// replaces `old` (loaded from the backend there now): what the dead
    /// mount expected (`expect`) if that is `old`, or if `old` is not this
    /// very publish already done (same size and mtime: the crash came
    /// before its done mark); another client's file then wins the check.
    fn replaced_by_publish(&self, old: Ino, expect: Option<u64>, size: u64, attrs: &AttrSet) -> FsResult<Option<u64>> {
        let o = self.get(old)?;
        let loaded = o.backend_ino.filter(|_| o.content == Content::Remote);
        let Some(expected) = expect else { return Ok(loaded) };
        let ours_done = o.attr.size == size && Some(o.attr.mtime) == attrs.mtime;
        Ok(if loaded == Some(expected) || ours_done {
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
        let names: Vec<(Ino, OsString)> = self.get(ino)?.links.clone();
        let names_ref: Vec<(Ino, &OsStr)> = names.iter().map(|(p, n)| (*p, n.as_os_str())).collect();
        self.keys(&names_ref, &[ino])
    }
}
