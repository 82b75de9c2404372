//! Model-based property tests of the filesystem core, without a FUSE mount.
//!
//! Random sequences of create/write/rename/unlink/mkdir/rmdir/link/symlink/
//! setattr (and rsync's temp-then-rename pattern) are applied both to
//! efscache's overlay (`Fs`, called the way the FUSE adapter calls it: first
//! without blocking, then again on `WouldBlock`) and to a plain in-memory model.
//! Every op must succeed, or fail with the same errno, as in the model; the
//! overlay must show the model's tree (lookup, readdir, read, readlink, attrs,
//! nlink, stable inode numbers); and after `sync` the backend directory, read
//! directly with `std::fs`, must equal the model exactly: paths (no temp
//! names), kinds, contents, modes, numeric owners, mtimes (the model's where it
//! set them, else the overlay's), symlink targets, nlink and hard-link groups;
//! nothing may be left dirty, staged or referenced. Flushing is interleaved
//! with the ops (ticks, syncs, debounce 0, a paused scheduler so publishes stay
//! queued while files are renamed, removed or rewritten). The second property
//! also remounts: a fresh `Fs` over the flushed backend must show the same tree
//! and go on agreeing with the model. The third also crashes: a simulated
//! `kill -9` of the daemon between two steps (open files vanish unreleased,
//! nothing is synced, queued or running publishes are cut off; see
//! `Harness::crash`), then a new mount over the same cache dir, which
//! recovers from the journal: it must show the model's tree at once, and the
//! backend must end up exactly as the acknowledged ops define it, with no
//! publish temp file left. Every mount is brought up like the daemon's
//! (`recovery::start_fs`), so the journal is written in every case.
//!
//! Known bugs are pinned by `regression_*` tests (ignored while open); see
//! `KNOWN_BUGS` for how the properties steer around them meanwhile.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use efscache::backend::{Backend, Kind, PosixBackend, Timespec};
use efscache::error::{FsError, FsResult};
use efscache::flush::publish::TempNames;
use efscache::flush::{Access, Action, Key, RetryPolicy, SchedSnapshot, Scheduler, TEMP_PREFIX};
use efscache::fs::{AttrOut, Fs, FsConfig};
use efscache::journal::{self, Header};
use efscache::namespace::{Ino, ROOT, SetAttr};
use efscache::recovery;
use efscache::staging::Staging;
use proptest::prelude::*;
use tempfile::TempDir;

// ---- names and paths ---------------------------------------------------------

const NAMES: [&str; 4] = ["a", "b", "c", "d"];
/// rsync's temp name (`.name.XXXXXX`) for each of `NAMES`.
const TEMPS: [&str; 4] = [".a.Xq7Tz1", ".b.Xq7Tz1", ".c.Xq7Tz1", ".d.Xq7Tz1"];
const TARGETS: [&str; 4] = ["t", "../x", "a/b", "/abs/target"];
const FILE_PERMS: [u32; 8] = [0o644, 0o600, 0o755, 0o444, 0o000, 0o4755, 0o2755, 0o1640];
const DIR_PERMS: [u32; 6] = [0o755, 0o700, 0o2775, 0o1777, 0o555, 0o000];
const OWNERS: [u32; 3] = [0, 1000, 65534];

/// A path in the test tree: names below the root.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct P(Vec<&'static str>);

impl fmt::Debug for P {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}", self.0.join("/"))
    }
}

impl P {
    fn root() -> P {
        P(Vec::new())
    }
    fn is_root(&self) -> bool {
        self.0.is_empty()
    }
    fn parent(&self) -> P {
        P(self.0[..self.0.len().saturating_sub(1)].to_vec())
    }
    fn name(&self) -> &'static str {
        self.0.last().expect("the root has no name")
    }
    fn join(&self, name: &'static str) -> P {
        let mut v = self.0.clone();
        v.push(name);
        P(v)
    }
    /// `self` is strictly below `other`.
    fn below(&self, other: &P) -> bool {
        self.0.len() > other.0.len() && self.0.starts_with(&other.0)
    }
    /// rsync's temp name next to `self`.
    fn rsync_temp(&self) -> P {
        let i = NAMES.iter().position(|n| *n == self.name()).unwrap_or(0);
        self.parent().join(TEMPS[i])
    }
    fn strings(&self) -> Vec<String> {
        self.0.iter().map(|s| s.to_string()).collect()
    }
}

fn mtime_of(t: u32) -> Timespec {
    Timespec {
        sec: 1_500_000_000 + i64::from(t) * 86_400,
        nsec: (t.wrapping_mul(123_456_789)) % 1_000_000_000,
    }
}

// ---- known bugs ------------------------------------------------------------------

/// Known bugs in the core, each pinned by an ignored `regression_*` test below.
/// While one is open the properties steer around it (so they stay green and keep
/// finding other bugs); delete its entry once its regression test passes. Run
/// with `EFSCACHE_MODEL_AVOID=none` to drive straight into all of them.
const KNOWN_BUGS: &[Bug] = &[];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    /// `sync` can return before a worker's bookkeeping of the last op re-dirties
    /// a directory's times (see `regression_sync_waits_for_directory_times`).
    /// While open, the harness syncs again until nothing is dirty.
    SyncRace,
    /// A publish that runs after its file changed and was queued again drops
    /// the staging copy the next publish needs, so the file's newest mode and
    /// mtime never reach the backend (see
    /// `regression_second_publish_keeps_latest_attrs`). While open, the flush
    /// queue is drained before an existing file is changed.
    PublishDropsNextPublish,
    /// Ops queued behind the publish of a file (rename, link, setattr) fail
    /// permanently with ENOENT when the file is removed (and forgotten) before
    /// the publish runs, so the publish finds no staged data and creates
    /// nothing: `sync` reports failures although the backend ends up right
    /// (see `regression_rename_before_removal_of_unpublished_file`). While
    /// open, ENOENT failures are tolerated; the backend must still be right.
    RemovedBeforePublish,
    /// A publish queued before its file was reopened for writing retries until
    /// the file is closed, and `sync` waited for it (see
    /// `regression_sync_with_a_reopened_file_whose_publish_is_queued`, which
    /// passes now: `sync` reports such files and returns). (Fixed.) With the
    /// steering off, long property runs found five more bugs around such
    /// files, all fixed (see
    /// `regression_publish_of_a_file_reopened_then_replaced_is_superseded_after_a_crash`,
    /// `regression_retime_queued_behind_a_publish_is_no_conflict`,
    /// `regression_crash_after_utimes_of_a_replaced_hard_link`,
    /// `regression_rename_after_a_publish_that_lost_its_content_mid_copy`,
    /// `regression_sync_with_a_removed_open_file_whose_publish_is_queued`);
    /// the first "hang" was the harness waiting for a queue that held such
    /// a publish. The three properties then passed 2,000 cases each.
    ReopenedFileBlocksSync,
    /// Recovery removes the publish temp files of the dead mount (of the
    /// publishes running at the kill) only after it has replayed the journal,
    /// so ops replayed in their directories still find them there: a
    /// replayed rmdir of the directory fails with ENOTEMPTY and the
    /// directory stays (see `regression_orphan_blocks_a_replayed_rmdir`); a
    /// replayed rename of the directory takes the temp file along, where the
    /// cleanup never looks, so it stays for good (see
    /// `regression_orphan_in_a_renamed_directory_is_removed`); and the
    /// cleanup's unlink resets the directory's mtime after a replayed utimes
    /// (see `regression_orphan_cleanup_keeps_directory_times`). While open, a
    /// crash leaves no temp file in a directory that a pending op removes,
    /// renames, replaces or gives an mtime set by utimes.
    OrphansRemovedAfterReplay,
    /// A replayed op that changes a directory's entries on the backend (the
    /// publish of a rewritten file: temp file + rename) leaves the
    /// directory's mtime at the time of recovery, where the running daemon
    /// re-applies the overlay's times (see
    /// `regression_replay_keeps_directory_mtime`). While open, the flush
    /// queue is drained before a crash when some directory has an mtime set
    /// by utimes.
    ReplayRetimesDir,
    /// A directory or symlink created in a setgid directory whose setgid bit
    /// was just cleared, or whose group was just changed, is created on the
    /// backend before that chmod/chown is applied there (directory
    /// attributes wait until the work inside is done), so it inherits the
    /// directory's old group (and a directory the setgid bit); its owner is
    /// then not set, because it equals the daemon's own ids (see
    /// `regression_new_objects_in_a_setgid_directory_whose_mode_or_group_changed`).
    /// While open, no directory or symlink is created in a directory that had
    /// the setgid bit during the case and lost it or changed its group since.
    SetgidLingers,
    /// `ln d b`, then `b` is replaced by a new file (rsync: temp file renamed
    /// over it) that is not published yet, then `mv d b`: on the backend `d`
    /// and `b` are still links of one file, where rename(2) does nothing, so
    /// `d` stays (see
    /// `regression_rename_onto_a_replaced_hard_link_removes_the_source`).
    /// While open, a file is never renamed onto a name that was its link
    /// earlier in the case (and now names something else).
    RenameOverOwnLink,
    /// A write that clears setuid/setgid of a file whose content is already
    /// unpublished is not journaled, so a crash while the file is open gives
    /// the bits back (see
    /// `regression_write_clearing_setuid_survives_a_crash`). While open, such
    /// a write is followed by a chmod to the mode it left (which journals it).
    WriteClearsSetuidUnjournaled,
}

fn avoid(bug: Bug) -> bool {
    std::env::var("EFSCACHE_MODEL_AVOID").map_or(true, |v| v != "none") && KNOWN_BUGS.contains(&bug)
}

// ---- the model ---------------------------------------------------------------

type Id = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Body {
    Dir,
    File(Vec<u8>),
    Symlink(&'static str),
}

#[derive(Clone, Debug)]
struct Obj {
    body: Body,
    perm: u32,
    uid: u32,
    gid: u32,
    /// Set explicitly (utimes) and not changed since.
    mtime: Option<Timespec>,
}

impl Obj {
    fn kind(&self) -> Kind {
        match self.body {
            Body::Dir => Kind::Dir,
            Body::File(_) => Kind::File,
            Body::Symlink(_) => Kind::Symlink,
        }
    }
}

/// Why the model refuses an op.
#[derive(Clone, Debug, PartialEq, Eq)]
enum No {
    /// The op fails with one of these errnos (several when the VFS and
    /// efscache check conditions in different orders: the kernel answers
    /// the first of its own before efscache sees the request).
    Fail(Vec<i32>),
    /// The kernel never sends this request to a FUSE filesystem (it follows
    /// a symlink, or answers itself): not tested.
    Skip,
}

type MRes<T> = Result<T, No>;

fn fail<T>(e: i32) -> MRes<T> {
    Err(No::Fail(vec![e]))
}

/// The filesystem as POSIX (and efscache's documented semantics) says it is.
#[derive(Clone, Debug)]
struct Model {
    /// Every name, the root included (as the empty path), and the object it names.
    tree: BTreeMap<P, Id>,
    objs: HashMap<Id, Obj>,
    next: Id,
}

impl Model {
    fn new(root: Obj) -> Model {
        Model {
            tree: BTreeMap::from([(P::root(), 0)]),
            objs: HashMap::from([(0, root)]),
            next: 1,
        }
    }
    fn obj(&self, id: Id) -> &Obj {
        &self.objs[&id]
    }
    fn is_dir(&self, id: Id) -> bool {
        self.obj(id).body == Body::Dir
    }
    /// Resolves every component before the last one, as the VFS does (which
    /// follows a symlink there: such paths leave the model and are skipped).
    fn walk_parent(&self, p: &P) -> MRes<Id> {
        let mut id = 0;
        for i in 1..p.0.len() {
            match self.tree.get(&P(p.0[..i].to_vec())) {
                None => return fail(libc::ENOENT),
                Some(&c) if matches!(self.obj(c).body, Body::Symlink(_)) => return Err(No::Skip),
                Some(&c) if !self.is_dir(c) => return fail(libc::ENOTDIR),
                Some(&c) => id = c,
            }
        }
        Ok(id)
    }
    fn lookup(&self, p: &P) -> MRes<Id> {
        self.walk_parent(p)?;
        self.tree.get(p).copied().ok_or(()).or_else(|_| fail(libc::ENOENT))
    }
    fn children(&self, dir: &P) -> BTreeMap<&'static str, Id> {
        self.tree
            .iter()
            .filter(|(q, _)| q.0.len() == dir.0.len() + 1 && q.0.starts_with(&dir.0))
            .map(|(q, id)| (q.name(), *id))
            .collect()
    }
    fn names(&self, id: Id) -> Vec<P> {
        self.tree
            .iter()
            .filter(|(_, i)| **i == id)
            .map(|(p, _)| p.clone())
            .collect()
    }
    fn nlink(&self, id: Id) -> u32 {
        if self.is_dir(id) {
            let p = &self.names(id)[0];
            2 + self.children(p).values().filter(|c| self.is_dir(**c)).count() as u32
        } else {
            self.names(id).len() as u32
        }
    }
    /// The directory's entries changed: its explicitly set mtime is gone.
    fn touch(&mut self, dir: Id) {
        self.objs.get_mut(&dir).expect("dir").mtime = None;
    }
    fn add(&mut self, p: &P, obj: Obj) -> Id {
        let id = self.next;
        self.next += 1;
        self.objs.insert(id, obj);
        self.tree.insert(p.clone(), id);
        id
    }
    /// Group that new objects in `parent` get (setgid directories pass theirs on).
    fn new_gid(&self, parent: Id, gid: u32) -> u32 {
        let p = self.obj(parent);
        if p.perm & libc::S_ISGID != 0 { p.gid } else { gid }
    }
    /// Drops objects that have no name and are not held open.
    fn gc(&mut self, open: &[Id]) {
        let named: BTreeSet<Id> = self.tree.values().copied().collect();
        self.objs.retain(|id, _| named.contains(id) || open.contains(id));
    }

    fn create(&mut self, p: &P, excl: bool, trunc: bool, perm: u32, uid: u32, gid: u32) -> MRes<Id> {
        let parent = self.walk_parent(p)?;
        if let Some(&id) = self.tree.get(p) {
            if excl {
                return fail(libc::EEXIST);
            }
            match self.obj(id).body {
                Body::Dir => return fail(libc::EISDIR),
                Body::Symlink(_) => return Err(No::Skip), // the kernel follows it
                Body::File(_) => {}
            }
            if trunc {
                self.set_size(id, 0);
            }
            return Ok(id);
        }
        let gid = self.new_gid(parent, gid);
        self.touch(parent);
        Ok(self.add(
            p,
            Obj {
                body: Body::File(Vec::new()),
                perm: perm & 0o7777,
                uid,
                gid,
                mtime: None,
            },
        ))
    }

    fn open(&mut self, p: &P, trunc: bool) -> MRes<Id> {
        let id = self.lookup(p)?;
        match self.obj(id).body {
            Body::Dir => fail(libc::EISDIR),
            Body::Symlink(_) => Err(No::Skip),
            Body::File(_) => {
                if trunc {
                    self.set_size(id, 0);
                }
                Ok(id)
            }
        }
    }

    fn set_size(&mut self, id: Id, size: usize) {
        let o = self.objs.get_mut(&id).expect("file");
        let Body::File(data) = &mut o.body else {
            panic!("not a file")
        };
        data.resize(size, 0);
        o.mtime = None;
    }

    /// A write through an open handle (data not empty).
    fn write(&mut self, id: Id, offset: usize, buf: &[u8]) {
        let o = self.objs.get_mut(&id).expect("file");
        let Body::File(data) = &mut o.body else {
            panic!("not a file")
        };
        if data.len() < offset + buf.len() {
            data.resize(offset + buf.len(), 0);
        }
        data[offset..offset + buf.len()].copy_from_slice(buf);
        o.mtime = None;
        // Writes clear setuid, and setgid when group-executable (efscache's documented behaviour).
        let sgid = if o.perm & 0o010 != 0 { libc::S_ISGID } else { 0 };
        o.perm &= !(libc::S_ISUID | sgid);
    }

    fn truncate(&mut self, p: &P, size: usize) -> MRes<()> {
        let id = self.lookup(p)?;
        match self.obj(id).body {
            Body::Dir => fail(libc::EISDIR),
            Body::Symlink(_) => Err(No::Skip),
            Body::File(_) => {
                self.set_size(id, size);
                Ok(())
            }
        }
    }

    fn mkdir(&mut self, p: &P, perm: u32, uid: u32, gid: u32) -> MRes<()> {
        let parent = self.walk_parent(p)?;
        if self.tree.contains_key(p) {
            return fail(libc::EEXIST);
        }
        let perm = (perm | self.obj(parent).perm & libc::S_ISGID) & 0o7777;
        let gid = self.new_gid(parent, gid);
        self.touch(parent);
        self.add(
            p,
            Obj {
                body: Body::Dir,
                perm,
                uid,
                gid,
                mtime: None,
            },
        );
        Ok(())
    }

    fn symlink(&mut self, p: &P, target: &'static str, uid: u32, gid: u32) -> MRes<()> {
        let parent = self.walk_parent(p)?;
        if self.tree.contains_key(p) {
            return fail(libc::EEXIST);
        }
        let gid = self.new_gid(parent, gid);
        self.touch(parent);
        self.add(
            p,
            Obj {
                body: Body::Symlink(target),
                perm: 0o777,
                uid,
                gid,
                mtime: None,
            },
        );
        Ok(())
    }

    fn unlink(&mut self, p: &P) -> MRes<()> {
        let parent = self.walk_parent(p)?;
        let id = self.tree.get(p).copied().ok_or(()).or_else(|_| fail(libc::ENOENT))?;
        if self.is_dir(id) {
            return fail(libc::EISDIR);
        }
        self.tree.remove(p);
        self.touch(parent);
        Ok(())
    }

    fn rmdir(&mut self, p: &P) -> MRes<()> {
        let parent = self.walk_parent(p)?;
        let id = self.tree.get(p).copied().ok_or(()).or_else(|_| fail(libc::ENOENT))?;
        if !self.is_dir(id) {
            return fail(libc::ENOTDIR);
        }
        if !self.children(p).is_empty() {
            return fail(libc::ENOTEMPTY);
        }
        self.tree.remove(p);
        self.touch(parent);
        Ok(())
    }

    fn rename(&mut self, from: &P, to: &P, noreplace: bool) -> MRes<()> {
        let from_parent = self.walk_parent(from)?;
        let to_parent = self.walk_parent(to)?;
        let src = self.tree.get(from).copied().ok_or(()).or_else(|_| fail(libc::ENOENT))?;
        let dst = self.tree.get(to).copied();
        let src_dir = self.is_dir(src);
        let kind_err = |m: &Model, d: Id| -> Option<i32> {
            match (src_dir, m.is_dir(d)) {
                (true, false) => Some(libc::ENOTDIR),
                (false, true) => Some(libc::EISDIR),
                (true, true) if !m.children(to).is_empty() => Some(libc::ENOTEMPTY),
                _ => None,
            }
        };
        // The order of checks in Linux's do_renameat2/vfs_rename.
        let vfs = if noreplace && dst.is_some() {
            Some(libc::EEXIST)
        } else if src_dir && to.below(from) {
            Some(libc::EINVAL)
        } else if dst.is_some() && from.below(to) {
            Some(libc::ENOTEMPTY)
        } else if dst == Some(src) {
            None
        } else {
            dst.and_then(|d| kind_err(self, d))
        };
        // The order of checks in efscache.
        let efs = if dst == Some(src) {
            None
        } else if src_dir && to.below(from) {
            Some(libc::EINVAL)
        } else if noreplace && dst.is_some() {
            Some(libc::EEXIST)
        } else {
            dst.and_then(|d| kind_err(self, d))
        };
        match (vfs, efs) {
            (None, None) => {}
            (Some(a), Some(b)) => return Err(No::Fail(vec![a, b])),
            _ => return Err(No::Skip), // only the VFS refuses it: never reaches efscache
        }
        if dst == Some(src) {
            return Ok(()); // rename(2): the same file, nothing happens
        }
        let moved: Vec<(P, Id)> = self
            .tree
            .range(from.clone()..)
            .take_while(|(q, _)| q.0.starts_with(&from.0))
            .map(|(q, id)| (q.clone(), *id))
            .collect();
        if dst.is_some() {
            self.tree.remove(to);
        }
        for (q, _) in &moved {
            self.tree.remove(q);
        }
        for (q, id) in moved {
            let mut n = to.0.clone();
            n.extend_from_slice(&q.0[from.0.len()..]);
            self.tree.insert(P(n), id);
        }
        self.touch(from_parent);
        self.touch(to_parent);
        Ok(())
    }

    fn link(&mut self, from: &P, to: &P) -> MRes<()> {
        let src = self.lookup(from)?;
        let to_parent = self.walk_parent(to)?;
        match (self.tree.contains_key(to), self.is_dir(src)) {
            (true, true) => return Err(No::Fail(vec![libc::EEXIST, libc::EPERM])),
            (true, false) => return fail(libc::EEXIST),
            (false, true) => return fail(libc::EPERM),
            (false, false) => {}
        }
        self.tree.insert(to.clone(), src);
        self.touch(to_parent);
        Ok(())
    }

    fn setattr(&mut self, p: &P, ch: &Change) -> MRes<()> {
        let id = self.lookup(p)?;
        let o = self.objs.get_mut(&id).expect("obj");
        if let Some(perm) = ch.perm {
            if matches!(o.body, Body::Symlink(_)) {
                return Err(No::Skip); // chmod follows symlinks
            }
            o.perm = perm & 0o7777;
        }
        if let Some((u, g)) = ch.owner {
            o.uid = u;
            o.gid = g;
        }
        if let Some(t) = ch.mtime {
            o.mtime = Some(t);
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default)]
struct Change {
    perm: Option<u32>,
    owner: Option<(u32, u32)>,
    mtime: Option<Timespec>,
}

// ---- ops -----------------------------------------------------------------------

const SLOTS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    /// open(O_CREAT|O_WRONLY[|O_EXCL][|O_TRUNC]), write `data`, then close or keep open in a slot.
    Create {
        path: P,
        excl: bool,
        trunc: bool,
        data: Vec<u8>,
        keep: Option<usize>,
        perm: u32,
        owner: u32,
    },
    /// open(O_RDWR[|O_TRUNC]) kept in a slot.
    Open {
        path: P,
        trunc: bool,
        slot: usize,
    },
    Write {
        slot: usize,
        offset: u64,
        data: Vec<u8>,
    },
    Close {
        slot: usize,
    },
    /// open(O_RDWR[|O_TRUNC]), write, close.
    Rewrite {
        path: P,
        trunc: bool,
        offset: u64,
        data: Vec<u8>,
    },
    Truncate {
        path: P,
        size: u64,
    },
    Mkdir {
        path: P,
        perm: u32,
        owner: u32,
    },
    Symlink {
        path: P,
        target: &'static str,
    },
    Unlink {
        path: P,
    },
    Rmdir {
        path: P,
    },
    Rename {
        from: P,
        to: P,
        noreplace: bool,
    },
    Link {
        from: P,
        to: P,
    },
    Chmod {
        path: P,
        perm: u32,
    },
    Chown {
        path: P,
        uid: u32,
        gid: u32,
    },
    Utimes {
        path: P,
        t: u32,
    },
    /// rsync: create `.name.XXXXXX` exclusively, write, close, chmod, utimes, rename over `name`.
    RsyncPut {
        path: P,
        data: Vec<u8>,
        perm: u32,
        t: u32,
    },
    Read {
        path: P,
    },
    CheckAll,
    Tick,
    TickForce,
    Sync,
    /// Flush workers stop taking ops (queued publishes stay queued) until
    /// `Resume`, a sync, or a request that must wait for the backend.
    Pause,
    Resume,
    /// The kernel drops every inode reference it can.
    ForgetAll,
    /// Sync, verify, and mount a fresh `Fs` over the backend.
    Remount,
    /// `kill -9` of the daemon, and a new mount over the same cache dir.
    Crash(Crash),
}

/// How a simulated `kill -9` lands (see `Harness::crash`).
#[derive(Clone, Debug)]
struct Crash {
    /// Queue the publish of every closed file first (a forced tick), so the
    /// kill finds publishes queued (or, free-running, in flight).
    queue: bool,
    /// Free-running cases only: resume the workers, wait until one is running
    /// an op (if any is queued), then this many microseconds more, so the
    /// kill lands among running backend ops.
    run_us: Option<u16>,
    /// The last backend op ran, but its `Done` never reached the journal.
    lose_done: bool,
    /// Publishes that could have been running had created their temp files.
    temps: bool,
}

fn crash() -> impl Strategy<Value = Crash> {
    (
        prop::bool::weighted(0.7),
        prop::option::weighted(0.6, prop_oneof![2 => 0..20u16, 1 => 0..500u16]),
        prop::bool::weighted(0.3),
        prop::bool::weighted(0.7),
    )
        .prop_map(|(queue, run_us, lose_done, temps)| Crash {
            queue,
            run_us,
            lose_done,
            temps,
        })
}

fn path() -> impl Strategy<Value = P> {
    let n = || (0..NAMES.len()).prop_map(|i| NAMES[i]);
    prop_oneof![
        5 => n().prop_map(|a| P(vec![a])),
        3 => (n(), n()).prop_map(|(a, b)| P(vec![a, b])),
        1 => (n(), n(), n()).prop_map(|(a, b, c)| P(vec![a, b, c])),
    ]
}

fn path_or_root() -> impl Strategy<Value = P> {
    prop_oneof![9 => path(), 1 => Just(P::root())]
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 1..7)
}

fn file_perm() -> impl Strategy<Value = u32> {
    (0..FILE_PERMS.len()).prop_map(|i| FILE_PERMS[i])
}

fn owner() -> impl Strategy<Value = u32> {
    (0..OWNERS.len()).prop_map(|i| OWNERS[i])
}

fn op(remounts: bool, crashes: bool) -> impl Strategy<Value = Op> {
    let crash_or_check = if crashes {
        crash().prop_map(Op::Crash).boxed()
    } else {
        Just(Op::CheckAll).boxed()
    };
    prop_oneof![
        10 => (path(), any::<bool>(), any::<bool>(), prop::collection::vec(any::<u8>(), 0..7),
               prop::option::weighted(0.3, 0..SLOTS), file_perm(), owner())
            .prop_map(|(path, excl, trunc, data, keep, perm, owner)| Op::Create { path, excl, trunc, data, keep, perm, owner }),
        3 => (path(), any::<bool>(), 0..SLOTS).prop_map(|(path, trunc, slot)| Op::Open { path, trunc, slot }),
        5 => (0..SLOTS, 0..6u64, data()).prop_map(|(slot, offset, data)| Op::Write { slot, offset, data }),
        4 => (0..SLOTS).prop_map(|slot| Op::Close { slot }),
        4 => (path(), any::<bool>(), 0..6u64, data())
            .prop_map(|(path, trunc, offset, data)| Op::Rewrite { path, trunc, offset, data }),
        2 => (path(), 0..9u64).prop_map(|(path, size)| Op::Truncate { path, size }),
        8 => (path(), (0..DIR_PERMS.len()).prop_map(|i| DIR_PERMS[i]), owner())
            .prop_map(|(path, perm, owner)| Op::Mkdir { path, perm, owner }),
        2 => (path(), (0..TARGETS.len()).prop_map(|i| TARGETS[i])).prop_map(|(path, target)| Op::Symlink { path, target }),
        5 => path().prop_map(|path| Op::Unlink { path }),
        4 => path().prop_map(|path| Op::Rmdir { path }),
        10 => (path(), path(), prop::bool::weighted(0.2))
            .prop_map(|(from, to, noreplace)| Op::Rename { from, to, noreplace }),
        4 => (path(), path()).prop_map(|(from, to)| Op::Link { from, to }),
        3 => (path_or_root(), prop_oneof![file_perm(), (0..DIR_PERMS.len()).prop_map(|i| DIR_PERMS[i])])
            .prop_map(|(path, perm)| Op::Chmod { path, perm }),
        2 => (path_or_root(), owner(), owner()).prop_map(|(path, uid, gid)| Op::Chown { path, uid, gid }),
        3 => (path_or_root(), 0..50u32).prop_map(|(path, t)| Op::Utimes { path, t }),
        6 => (path(), prop::collection::vec(any::<u8>(), 0..7), file_perm(), 0..50u32)
            .prop_map(|(path, data, perm, t)| Op::RsyncPut { path, data, perm, t }),
        2 => path().prop_map(|path| Op::Read { path }),
        2 => Just(Op::CheckAll),
        3 => Just(Op::Tick),
        4 => Just(Op::TickForce),
        2 => Just(Op::Sync),
        3 => Just(Op::Pause),
        2 => Just(Op::Resume),
        2 => Just(Op::ForgetAll),
        2 => Just(if remounts { Op::Remount } else { Op::CheckAll }),
        6 => crash_or_check,
    ]
}

/// How one test case runs the core.
#[derive(Clone, Debug)]
struct Cfg {
    /// Debounce 0 (publish as soon as a tick sees a closed file) or an hour (only forced ticks and syncs).
    debounce_zero: bool,
    /// Trust the cache (exclusive) or revalidate directories on every access (TTL 0).
    exclusive: bool,
    workers: usize,
    /// Lists with readdirplus (which takes lookup references).
    plus: bool,
    /// Forget every reference after each op, like a kernel under memory pressure.
    eager_forget: bool,
    /// Flush workers run concurrently with the ops (races, not reproducible), or
    /// only when the sequence says so (`Resume`, `Sync`, or a request that must
    /// wait for the backend), which makes a case reproducible and shrinkable.
    free_running: bool,
}

fn cfg() -> impl Strategy<Value = Cfg> {
    (
        any::<bool>(),
        any::<bool>(),
        1..4usize,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(debounce_zero, exclusive, workers, plus, eager_forget, free_running)| Cfg {
                debounce_zero,
                exclusive,
                workers,
                plus,
                eager_forget,
                free_running,
            },
        )
}

// ---- driving the core ------------------------------------------------------------

static UMASK: Once = Once::new();

/// The daemon runs with umask 0 so backend objects get exact modes; do the same.
fn daemon_umask() {
    UMASK.call_once(|| {
        // SAFETY: umask cannot fail and touches no memory.
        unsafe { libc::umask(0) };
    });
}

fn retry_policy() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(1),
        max: Duration::from_millis(10),
    }
}

/// One "mount": an `Fs` over a cache dir, brought up the way the daemon does
/// it (`recovery::start_fs`: replay of the journal an earlier mount left in
/// the cache dir, then a new journal), and its flush workers.
struct Mount {
    fs: Arc<Fs>,
    sched: Arc<Scheduler>,
    workers: Vec<JoinHandle<()>>,
    cache: PathBuf,
    /// The cache dir, when the mount owns it (else it outlives the mount).
    _own_cache: Option<TempDir>,
    /// Prefix of this mount's publish temp names.
    temp_prefix: String,
}

impl Mount {
    /// A mount with a fresh cache dir of its own.
    fn new(backend_dir: &Path, cfg: &Cfg, instance: usize) -> Mount {
        let cache = TempDir::new().expect("cache dir");
        let mut m = Mount::start(backend_dir, cache.path(), cfg, instance);
        m._own_cache = Some(cache);
        m
    }

    /// A mount over `cache`, recovering what an earlier mount left there.
    fn start(backend_dir: &Path, cache: &Path, cfg: &Cfg, instance: usize) -> Mount {
        let backend: Arc<dyn Backend> = Arc::new(PosixBackend::open(backend_dir).expect("backend"));
        let sched = Arc::new(Scheduler::new(4, retry_policy()));
        let temps = TempNames::new("host", &format!("m{instance}"));
        let temp_prefix = temps.prefix().to_string();
        let header = Header {
            backend: backend_dir.to_path_buf(),
            backend_root_ino: std::fs::metadata(backend_dir).expect("stat backend").ino(),
            temp_prefix: temp_prefix.clone(),
        };
        let fs_cfg = FsConfig {
            attr_ttl: if cfg.exclusive {
                Duration::from_secs(3600)
            } else {
                Duration::ZERO
            },
            exclusive: cfg.exclusive,
            debounce: if cfg.debounce_zero {
                Duration::ZERO
            } else {
                Duration::from_secs(3600)
            },
            fsync_remote: false,
            meta_parallel: 2,
            // A request that cannot complete fails the case quickly.
            request_timeout: Duration::from_secs(10),
            ..FsConfig::default()
        };
        let fs = recovery::start_fs(
            cache,
            backend,
            Staging::open(cache).expect("staging"),
            sched.clone(),
            temps,
            header,
            fs_cfg,
        )
        .unwrap_or_else(|e| panic!("start_fs: {e}"));
        let workers = (0..cfg.workers)
            .map(|_| {
                let fs = fs.clone();
                std::thread::spawn(move || fs.run_worker())
            })
            .collect();
        Mount {
            fs,
            sched,
            workers,
            cache: cache.to_path_buf(),
            _own_cache: None,
            temp_prefix,
        }
    }

    /// What `start_fs` recovered from the journal (null: nothing was
    /// pending).
    fn recovery(&self) -> serde_json::Value {
        self.fs.recovery_status()
    }

    /// Lets the flush workers run the ops recovery queued, and the
    /// directory times they re-apply after them (as the daemon's tick
    /// does); returns what recovery did.
    fn settle(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(
                self.sched.wait_idle(Some(deadline)),
                "the recovered ops did not run: {}",
                self.fs.recovery_status()
            );
            self.fs.tick(false);
            if self.sched.queued() == 0 {
                break;
            }
        }
        self.fs.recovery_status()
    }

    fn staging_files(&self) -> Vec<String> {
        std::fs::read_dir(self.cache.join("staging"))
            .expect("staging dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// `kill -9` of the daemon: the workers stop taking ops (one already
    /// running finishes: the kill may land just after a backend op), and the
    /// overlay is dropped with whatever it had not flushed. Nothing is synced,
    /// drained or released; only what is in the cache dir survives.
    fn kill(mut self) {
        self.sched.shutdown();
        for w in self.workers.drain(..) {
            w.join().expect("flush worker panicked");
        }
        // The last reference: the overlay, its open staging files and its
        // journal are gone once this mount is dropped.
        assert_eq!(Arc::strong_count(&self.fs), 1, "the killed Fs is still referenced");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.sched.set_paused(false);
        self.sched.shutdown();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    fh: u64,
    ino: Ino,
    id: Id,
}

struct Harness {
    backend_dir: TempDir,
    cfg: Cfg,
    mount: Option<Mount>,
    mounts: usize,
    model: Model,
    slots: [Option<Slot>; SLOTS],
    /// Lookup references the "kernel" holds, per inode.
    refs: HashMap<Ino, u64>,
    /// The inode number each object showed first (stable for the life of a mount).
    inos: HashMap<Id, Ino>,
    paused: bool,
    /// Alternates between two ways of doing the same thing.
    alt: bool,
    step: usize,
    op: String,
    /// The cache dir every mount of the case uses (a crashed mount's journal
    /// and staging files are there for the next one).
    cache: TempDir,
    /// Directories that had the setgid bit at some point, with their group
    /// when first seen so (see `Bug::SetgidLingers`).
    had_setgid: HashMap<Id, u32>,
    /// Every name each object had at some point (see `Bug::RenameOverOwnLink`).
    ever_named: HashMap<Id, BTreeSet<P>>,
}

fn same<T, U: fmt::Debug>(m: &MRes<T>, r: &FsResult<U>) -> bool {
    match (m, r) {
        (Ok(_), Ok(_)) => true,
        (Err(No::Fail(errs)), Err(e)) => errs.contains(&e.errno()),
        _ => false,
    }
}

fn show<T>(m: &MRes<T>) -> String {
    match m {
        Ok(_) => "Ok".into(),
        Err(No::Fail(e)) => format!(
            "Err({})",
            e.iter().map(|e| errno_name(*e)).collect::<Vec<_>>().join("|")
        ),
        Err(No::Skip) => "Skip".into(),
    }
}

fn errno_name(e: i32) -> String {
    match e {
        libc::ENOENT => "ENOENT".into(),
        libc::EEXIST => "EEXIST".into(),
        libc::ENOTDIR => "ENOTDIR".into(),
        libc::EISDIR => "EISDIR".into(),
        libc::ENOTEMPTY => "ENOTEMPTY".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EPERM => "EPERM".into(),
        e => format!("errno {e}"),
    }
}

impl Harness {
    fn new(cfg: Cfg) -> Harness {
        daemon_umask();
        let backend_dir = TempDir::new().expect("backend dir");
        let meta = std::fs::symlink_metadata(backend_dir.path()).expect("stat backend");
        let root = Obj {
            body: Body::Dir,
            perm: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: None,
        };
        let cache = TempDir::new().expect("cache dir");
        let mount = Mount::start(backend_dir.path(), cache.path(), &cfg, 0);
        assert!(mount.recovery().is_null(), "a fresh cache dir has nothing to recover");
        let paused = !cfg.free_running;
        mount.sched.set_paused(paused);
        let mut h = Harness {
            backend_dir,
            cfg,
            mount: Some(mount),
            mounts: 1,
            model: Model::new(root),
            slots: [None; SLOTS],
            refs: HashMap::new(),
            inos: HashMap::new(),
            paused,
            alt: false,
            step: 0,
            op: "setup".into(),
            cache,
            had_setgid: HashMap::new(),
            ever_named: HashMap::new(),
        };
        h.check_path(&P::root());
        h
    }

    fn fs(&self) -> Arc<Fs> {
        self.mount.as_ref().expect("mounted").fs.clone()
    }
    fn mount(&self) -> &Mount {
        self.mount.as_ref().expect("mounted")
    }

    fn ctx(&self) -> String {
        format!("step {} ({}), {:?}", self.step, self.op, self.cfg)
    }

    /// Calls the core the way the FUSE adapter does: first without blocking,
    /// then, if it must wait for the backend, again on a thread that may block.
    fn call<T>(&mut self, f: impl Fn(&Fs, bool) -> FsResult<T>) -> FsResult<T> {
        let fs = self.fs();
        match f(&fs, false) {
            Err(FsError::WouldBlock) => {
                // Waiting for the backend needs running flush workers.
                if self.cfg.free_running {
                    self.resume();
                } else {
                    self.drain();
                }
                let r = f(&fs, true);
                assert!(
                    !matches!(r, Err(FsError::WouldBlock)),
                    "{}: WouldBlock with may_block",
                    self.ctx()
                );
                r
            }
            r => r,
        }
    }

    fn pause(&mut self) {
        self.mount().sched.set_paused(true);
        self.paused = true;
    }
    fn resume(&mut self) {
        if self.paused {
            self.mount().sched.set_paused(false);
            self.paused = false;
        }
    }
    /// See `Bug::PublishDropsNextPublish` and `Bug::ReopenedFileBlocksSync`:
    /// lets queued publishes finish before an existing file changes.
    fn settle_publishes(&mut self) {
        if !(avoid(Bug::PublishDropsNextPublish) || avoid(Bug::ReopenedFileBlocksSync)) {
            return;
        }
        if !self.cfg.free_running {
            self.drain();
            return;
        }
        self.resume();
        let drained = self.wait_drained();
        assert!(drained, "{}: flush queue did not drain", self.ctx());
        std::thread::sleep(Duration::from_millis(1)); // see `drain`
    }

    /// Waits until nothing is queued, or all that is queued waits for files
    /// still open for writing here (their publish runs after the close, as
    /// `sync` reports them): true, or false after 20 s.
    fn wait_drained(&self) -> bool {
        let sched = &self.mount().sched;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if sched.wait_idle(Some(Instant::now() + Duration::from_millis(20))) {
                return true;
            }
            if sched.only_waiting_for_writers().is_some() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
        }
    }

    /// Lets the flush workers run everything queued, then stops them again.
    fn drain(&mut self) {
        self.resume();
        let drained = self.wait_drained();
        assert!(drained, "{}: flush queue did not drain", self.ctx());
        // A worker finishes an op (in the scheduler) before it records the
        // result in the namespace: give it that moment.
        std::thread::sleep(Duration::from_millis(2));
        self.pause();
    }

    fn take_ref(&mut self, ino: Ino) {
        *self.refs.entry(ino).or_default() += 1;
    }

    fn forget_all(&mut self) {
        let fs = self.fs();
        let open: Vec<Ino> = self.slots.iter().flatten().map(|s| s.ino).collect();
        for (ino, n) in self.refs.iter_mut() {
            // An open file keeps one reference (the kernel's inode is pinned by the file).
            let keep = u64::from(open.contains(ino)).min(*n);
            fs.forget(*ino, *n - keep);
            *n = keep;
        }
        self.refs.retain(|_, n| *n > 0);
    }

    fn open_ids(&self) -> Vec<Id> {
        self.slots.iter().flatten().map(|s| s.id).collect()
    }

    // ---- path resolution through the overlay (what the kernel does with lookups)

    fn lookup(&mut self, parent: Ino, name: &str) -> FsResult<AttrOut> {
        let r = self.call(|fs, b| fs.lookup(parent, OsStr::new(name), b));
        if let Ok(a) = &r {
            self.take_ref(a.ino);
        }
        r
    }

    fn resolve_parent(&mut self, p: &P) -> FsResult<Ino> {
        let mut ino = ROOT;
        for name in &p.0[..p.0.len().saturating_sub(1)] {
            let a = self.lookup(ino, name)?;
            if a.kind != Kind::Dir {
                // The VFS walks only through directories (symlinks are skipped by the model).
                return Err(FsError::NotDir);
            }
            ino = a.ino;
        }
        Ok(ino)
    }

    fn resolve(&mut self, p: &P) -> FsResult<AttrOut> {
        if p.is_root() {
            return self.call(|fs, b| fs.getattr(ROOT, b));
        }
        let parent = self.resolve_parent(p)?;
        self.lookup(parent, p.name())
    }

    fn agree<T, U: fmt::Debug>(&self, what: &str, m: &MRes<T>, r: &FsResult<U>) {
        assert!(
            same(m, r),
            "{}: {what}: the model says {}, efscache says {:?}",
            self.ctx(),
            show(m),
            r.as_ref().map_err(|e| (errno_name(e.errno()), e.to_string()))
        );
    }

    // ---- ops ---------------------------------------------------------------------

    fn run(&mut self, op: &Op) {
        self.op = format!("{op:?}");
        self.apply(op.clone());
        let open = self.open_ids();
        self.model.gc(&open);
        for (id, o) in &self.model.objs {
            if o.body == Body::Dir && o.perm & libc::S_ISGID != 0 {
                self.had_setgid.entry(*id).or_insert(o.gid);
            }
        }
        for (p, id) in &self.model.tree {
            self.ever_named.entry(*id).or_default().insert(p.clone());
        }
        if self.cfg.eager_forget {
            self.forget_all();
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Create {
                path,
                excl,
                trunc,
                data,
                keep,
                perm,
                owner,
            } => {
                if let Some((fh, ino, id)) = self.create(&path, excl, trunc, perm, owner) {
                    if !data.is_empty() {
                        self.write_fh(fh, ino, id, 0, &data);
                    }
                    match keep {
                        Some(slot) => self.put_slot(slot, Slot { fh, ino, id }),
                        None => self.fs().release(fh),
                    }
                }
                self.check_around(&[&path]);
            }
            Op::Open { path, trunc, slot } => {
                if let Some(s) = self.open(&path, trunc) {
                    self.put_slot(slot, s);
                }
                self.check_around(&[&path]);
            }
            Op::Write { slot, offset, data } => {
                if let Some(s) = self.slots[slot] {
                    self.write_fh(s.fh, s.ino, s.id, offset, &data);
                }
            }
            Op::Close { slot } => self.close(slot),
            Op::Rewrite {
                path,
                trunc,
                offset,
                data,
            } => {
                if let Some(s) = self.open(&path, trunc) {
                    self.write_fh(s.fh, s.ino, s.id, offset, &data);
                    self.fs().release(s.fh);
                }
                self.check_around(&[&path]);
            }
            Op::Truncate { path, size } => {
                self.settle_publishes();
                let m = self.model.truncate(&path, size as usize);
                if m != Err(No::Skip) {
                    let r = self.resolve(&path).and_then(|a| {
                        self.call(|fs, b| {
                            fs.setattr(
                                a.ino,
                                SetAttr {
                                    size: Some(size),
                                    ..Default::default()
                                },
                                b,
                            )
                        })
                    });
                    self.agree("truncate", &m, &r);
                }
                self.check_around(&[&path]);
            }
            Op::Mkdir { path, perm, owner } => {
                if self.setgid_may_linger(&path) {
                    return;
                }
                self.mkdir(&path, perm, owner);
                self.check_around(&[&path]);
            }
            Op::Symlink { path, target } => {
                if self.setgid_may_linger(&path) {
                    return;
                }
                let m = self.model.symlink(&path, target, 0, 0);
                if m == Err(No::Skip) {
                    return;
                }
                let r = self.resolve_parent(&path).and_then(|parent| {
                    self.call(|fs, b| fs.symlink(parent, OsStr::new(path.name()), OsStr::new(target), 0, 0, b))
                });
                self.agree("symlink", &m, &r);
                if let Ok(a) = r {
                    self.take_ref(a.ino);
                }
                self.check_around(&[&path]);
            }
            Op::Unlink { path } => {
                self.unlink(&path);
                self.check_around(&[&path]);
            }
            Op::Rmdir { path } => {
                let m = self.model.rmdir(&path);
                if m == Err(No::Skip) {
                    return;
                }
                let r = self
                    .resolve_parent(&path)
                    .and_then(|parent| self.call(|fs, b| fs.rmdir(parent, OsStr::new(path.name()), b)));
                self.agree("rmdir", &m, &r);
                self.check_around(&[&path]);
            }
            Op::Rename { from, to, noreplace } => {
                self.rename(&from, &to, noreplace);
                self.check_around(&[&from, &to]);
            }
            Op::Link { from, to } => {
                let m = self.model.link(&from, &to);
                if m == Err(No::Skip) {
                    return;
                }
                let r = self.resolve(&from).and_then(|src| {
                    let parent = self.resolve_parent(&to)?;
                    self.call(|fs, b| fs.link(src.ino, parent, OsStr::new(to.name()), b))
                });
                self.agree("link", &m, &r);
                if let Ok(a) = r {
                    self.take_ref(a.ino);
                }
                self.check_around(&[&from, &to]);
            }
            Op::Chmod { path, perm } => {
                self.setattr(
                    &path,
                    Change {
                        perm: Some(perm),
                        ..Default::default()
                    },
                );
                self.check_around(&[&path]);
            }
            Op::Chown { path, uid, gid } => {
                self.setattr(
                    &path,
                    Change {
                        owner: Some((uid, gid)),
                        ..Default::default()
                    },
                );
                self.check_around(&[&path]);
            }
            Op::Utimes { path, t } => {
                self.setattr(
                    &path,
                    Change {
                        mtime: Some(mtime_of(t)),
                        ..Default::default()
                    },
                );
                self.check_around(&[&path]);
            }
            Op::RsyncPut { path, data, perm, t } => {
                let tmp = path.rsync_temp();
                if let Some((fh, ino, id)) = self.create(&tmp, true, false, 0o600, 0) {
                    if !data.is_empty() {
                        self.write_fh(fh, ino, id, 0, &data);
                    }
                    self.fs().release(fh);
                    self.setattr(
                        &tmp,
                        Change {
                            perm: Some(perm),
                            mtime: Some(mtime_of(t)),
                            ..Default::default()
                        },
                    );
                    if !self.rename(&tmp, &path, false) {
                        self.unlink(&tmp);
                    }
                }
                self.check_around(&[&path, &tmp]);
            }
            Op::Read { path } => {
                self.check_path(&path);
            }
            Op::CheckAll => {
                self.check_all();
            }
            Op::Tick => self.fs().tick(false),
            Op::TickForce => self.fs().tick(true),
            Op::Sync => self.sync(),
            Op::Pause if self.cfg.free_running => self.pause(),
            Op::Resume if self.cfg.free_running => self.resume(),
            Op::Pause => {}
            Op::Resume => self.drain(),
            Op::ForgetAll => self.forget_all(),
            Op::Remount => self.remount(),
            Op::Crash(c) => self.crash(&c),
        }
    }

    /// See `Bug::SetgidLingers`: `p`'s directory had the setgid bit during
    /// the case and has lost it or changed its group since (the backend may
    /// still have the old state).
    fn setgid_may_linger(&self, p: &P) -> bool {
        avoid(Bug::SetgidLingers)
            && self.model.walk_parent(p).is_ok_and(|d| {
                let o = self.model.obj(d);
                self.had_setgid
                    .get(&d)
                    .is_some_and(|g| o.perm & libc::S_ISGID == 0 || o.gid != *g)
            })
    }

    fn create(&mut self, p: &P, excl: bool, trunc: bool, perm: u32, owner: u32) -> Option<(u64, Ino, Id)> {
        // Half the time, reach an existing name the way the kernel does when it
        // has the name cached (lookup, then open), else with FUSE_CREATE.
        let existing = self.alt && !excl && self.model.lookup(p).is_ok();
        self.alt = !self.alt;
        if self.model.lookup(p).is_ok() {
            self.settle_publishes();
        }
        let m = self.model.create(p, excl, trunc, perm, owner, owner);
        if m == Err(No::Skip) {
            return None;
        }
        let mut flags = libc::O_WRONLY | libc::O_CREAT;
        if excl {
            flags |= libc::O_EXCL;
        }
        if trunc {
            flags |= libc::O_TRUNC;
        }
        let r = if existing {
            self.resolve(p).and_then(|a| {
                let fh = self.call(|fs, b| fs.open(a.ino, flags & !libc::O_CREAT, b).map(|o| o.fh))?;
                Ok((a, fh))
            })
        } else {
            self.resolve_parent(p).and_then(|parent| {
                self.call(|fs, b| {
                    fs.create(parent, OsStr::new(p.name()), perm, 0, flags, owner, owner, b)
                        .map(|(a, o)| (a, o.fh))
                })
            })
        };
        self.agree("create", &m, &r);
        let (Ok(id), Ok((a, fh))) = (m, r) else {
            return None;
        };
        if !existing {
            self.take_ref(a.ino); // resolve took it otherwise
        }
        Some((fh, a.ino, id))
    }

    fn open(&mut self, p: &P, trunc: bool) -> Option<Slot> {
        self.settle_publishes();
        let m = self.model.open(p, trunc);
        if m == Err(No::Skip) {
            return None;
        }
        let flags = libc::O_RDWR | if trunc { libc::O_TRUNC } else { 0 };
        let r = self.resolve(p).and_then(|a| {
            self.call(|fs, b| fs.open(a.ino, flags, b).map(|o| o.fh))
                .map(|fh| (a.ino, fh))
        });
        self.agree("open", &m, &r);
        let (Ok(id), Ok((ino, fh))) = (m, r) else {
            return None;
        };
        Some(Slot { fh, ino, id })
    }

    fn write_fh(&mut self, fh: u64, ino: Ino, id: Id, offset: u64, data: &[u8]) {
        let r = self.fs().write(fh, offset, data);
        assert_eq!(r.ok(), Some(data.len() as u32), "{}: write", self.ctx());
        let before = self.model.obj(id).perm;
        self.model.write(id, offset as usize, data);
        let after = self.model.obj(id).perm;
        if after != before && avoid(Bug::WriteClearsSetuidUnjournaled) {
            let r = self.call(|fs, b| {
                let ch = SetAttr {
                    perm: Some(after),
                    ..Default::default()
                };
                fs.setattr(ino, ch, b)
            });
            assert!(r.is_ok(), "{}: chmod to the mode after the write: {r:?}", self.ctx());
        }
    }

    fn put_slot(&mut self, slot: usize, s: Slot) {
        self.close(slot);
        self.slots[slot] = Some(s);
    }

    fn close(&mut self, slot: usize) {
        if let Some(s) = self.slots[slot].take() {
            self.fs().release(s.fh);
            let open = self.open_ids();
            self.model.gc(&open);
        }
    }

    fn close_all(&mut self) {
        for slot in 0..SLOTS {
            self.close(slot);
        }
    }

    fn mkdir(&mut self, p: &P, perm: u32, owner: u32) {
        let m = self.model.mkdir(p, perm, owner, owner);
        if m == Err(No::Skip) {
            return;
        }
        let r = self
            .resolve_parent(p)
            .and_then(|parent| self.call(|fs, b| fs.mkdir(parent, OsStr::new(p.name()), perm, 0, owner, owner, b)));
        self.agree("mkdir", &m, &r);
        if let Ok(a) = r {
            self.take_ref(a.ino);
        }
    }

    fn unlink(&mut self, p: &P) {
        let m = self.model.unlink(p);
        if m == Err(No::Skip) {
            return;
        }
        let r = self
            .resolve_parent(p)
            .and_then(|parent| self.call(|fs, b| fs.unlink(parent, OsStr::new(p.name()), b)));
        self.agree("unlink", &m, &r);
        let open = self.open_ids();
        self.model.gc(&open);
    }

    /// True if the rename happened.
    fn rename(&mut self, from: &P, to: &P, noreplace: bool) -> bool {
        if avoid(Bug::RenameOverOwnLink)
            && let (Some(src), Some(dst)) = (self.model.tree.get(from), self.model.tree.get(to))
            && dst != src
            && self.ever_named.get(src).is_some_and(|n| n.contains(to))
        {
            return false;
        }
        let m = self.model.rename(from, to, noreplace);
        if m == Err(No::Skip) {
            return false;
        }
        let flags = if noreplace { libc::RENAME_NOREPLACE } else { 0 };
        let r = self.resolve_parent(from).and_then(|fp| {
            let tp = self.resolve_parent(to)?;
            self.call(|fs, b| fs.rename(fp, OsStr::new(from.name()), tp, OsStr::new(to.name()), flags, b))
        });
        self.agree("rename", &m, &r);
        let open = self.open_ids();
        self.model.gc(&open);
        r.is_ok()
    }

    fn setattr(&mut self, p: &P, ch: Change) {
        self.settle_publishes();
        let m = self.model.setattr(p, &ch);
        if m == Err(No::Skip) {
            return;
        }
        let sa = SetAttr {
            perm: ch.perm,
            uid: ch.owner.map(|o| o.0),
            gid: ch.owner.map(|o| o.1),
            size: None,
            atime: ch.mtime,
            mtime: ch.mtime,
        };
        let r = self
            .resolve(p)
            .and_then(|a| self.call(|fs, b| fs.setattr(a.ino, sa.clone(), b)));
        self.agree("setattr", &m, &r);
    }

    fn sync(&mut self) {
        self.resume();
        let mut r = self.fs().sync(Some(Instant::now() + Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(2)); // see `drain`
        // See `Bug::SyncRace`: sync again until the workers' bookkeeping has
        // settled (clean on two checks in a row).
        let mut clean = 0;
        for _ in 0..100 {
            if !(avoid(Bug::SyncRace) && r.complete) || clean == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
            let st = self.fs().status();
            if st.dirty_dirs == 0 && st.waiting_debounce == 0 {
                clean += 1;
                continue;
            }
            clean = 0;
            let again = self.fs().sync(Some(Instant::now() + Duration::from_secs(5)));
            r.complete = again.complete;
            r.failures = again.failures;
        }
        if !self.cfg.free_running {
            self.pause();
        }
        assert!(r.complete, "{}: sync did not complete: {r:?}", self.ctx());
        let failures: Vec<_> = r
            .failures
            .iter()
            .filter(|f| !(avoid(Bug::RemovedBeforePublish) && f.errno == libc::ENOENT))
            .collect();
        assert!(failures.is_empty(), "{}: sync reports failures: {r:?}", self.ctx());
        if self.slots.iter().all(Option::is_none) {
            assert!(r.open_files.is_empty(), "{}: {r:?}", self.ctx());
            let mtimes = self.check_all();
            self.check_backend(&mtimes);
        }
    }

    /// Closes everything, syncs, verifies overlay and backend, and checks that
    /// nothing leaked (inodes, staging files, dirty state).
    fn finish(&mut self) {
        self.close_all();
        self.sync();
        self.forget_all();
        let st = self.fs().status();
        assert_eq!(st.dirty_files, 0, "{}: {st:?}", self.ctx());
        assert_eq!(st.waiting_debounce, 0, "{}: {st:?}", self.ctx());
        assert_eq!(st.open_for_write, 0, "{}: {st:?}", self.ctx());
        assert_eq!(st.dirty_dirs, 0, "{}: {st:?}", self.ctx());
        assert_eq!(
            st.inodes,
            self.model.objs.len(),
            "{}: inodes in the overlay vs live objects: {st:?}",
            self.ctx()
        );
        // Published files' copies are kept a while (keep_clean); unmount drops them.
        self.fs().drop_clean_copies();
        let staged = self.mount().staging_files();
        assert!(staged.is_empty(), "{}: staging files left: {staged:?}", self.ctx());
    }

    /// A clean unmount (everything flushed) and a new mount over the same
    /// backend and cache dir, which must find nothing to recover.
    fn remount(&mut self) {
        self.finish();
        self.mount = None;
        self.refs.clear();
        self.inos.clear();
        self.paused = false;
        let m = Mount::start(self.backend_dir.path(), self.cache.path(), &self.cfg, self.mounts);
        self.mounts += 1;
        assert!(
            m.recovery().is_null(),
            "{}: the journal of a flushed mount still has pending work: {}",
            self.ctx(),
            m.recovery()
        );
        self.mount = Some(m);
        if !self.cfg.free_running {
            self.pause();
        }
        self.check_all();
    }

    /// `kill -9` of the daemon between two steps, and a new mount over the
    /// same cache dir and backend. The kernel's open files are gone without
    /// a release (what was written through them stays written), so are its
    /// lookup references; everything acknowledged must survive, so the model
    /// does not change. The new mount must show the model's tree at once,
    /// before anything is flushed.
    fn crash(&mut self, c: &Crash) {
        if c.queue {
            self.fs().tick(true);
        }
        // See `Bug::ReplayRetimesDir`.
        let retimed_dir = self
            .model
            .objs
            .values()
            .any(|o| o.body == Body::Dir && o.mtime.is_some());
        if retimed_dir && avoid(Bug::ReplayRetimesDir) {
            self.drain();
            if self.cfg.free_running {
                self.resume();
            }
        }
        if let Some(us) = c.run_us
            && self.cfg.free_running
        {
            self.resume();
            let sched = self.mount().sched.clone();
            let spin = Instant::now();
            while spin.elapsed() < Duration::from_millis(5) && sched.queued() > 0 && sched.snapshot().in_flight == 0 {
                std::hint::spin_loop();
            }
            let spin = Instant::now();
            while spin.elapsed() < Duration::from_micros(u64::from(us)) {
                std::hint::spin_loop();
            }
        }
        let m = self.mount.take().expect("mounted");
        let snap = m.sched.snapshot();
        let prefix = m.temp_prefix.clone();
        self.slots = [None; SLOTS];
        self.model.gc(&[]);
        m.kill();
        self.refs.clear();
        self.inos.clear();
        self.paused = false;
        let lost_done = c.lose_done && self.lose_last_done();
        let temps = if c.temps { self.leave_publish_temps(&prefix) } else { 0 };
        let m = Mount::start(self.backend_dir.path(), self.cache.path(), &self.cfg, self.mounts);
        self.mounts += 1;
        self.mount = Some(m);
        if !self.cfg.free_running {
            self.pause();
        }
        // Everything is visible through the new overlay from the start,
        // before (or while) the flush workers run the recovered ops.
        self.check_all();
        let rec = self.mount().recovery();
        assert_eq!(
            rec["failed"].as_u64().unwrap_or(0),
            0,
            "{}: recovery could not apply every acknowledged change: {rec}",
            self.ctx()
        );
        if temps > 0 {
            assert_eq!(
                rec["orphans_removed"].as_u64(),
                Some(temps as u64),
                "{}: orphaned publish temp files removed: {rec}",
                self.ctx()
            );
        }
        CRASH_STATS.record(&snap, lost_done, temps, &rec);
    }

    /// The kill came after the last backend op ran but before its `Done`
    /// reached the journal: cuts the journal's last record if it is such a
    /// `Done` (the replay then runs that op a second time). True if it did.
    fn lose_last_done(&self) -> bool {
        let path = journal::journal_path(self.cache.path());
        let data = std::fs::read(&path).expect("read journal");
        // The format (see `efscache::journal`): magic and version (12 bytes),
        // then records, each `len: u32 LE, crc32: u32 LE, payload`.
        let mut pos = 12;
        let mut last = None;
        while pos + 8 <= data.len() {
            let len = u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4 bytes")) as usize;
            last = Some(pos);
            pos += 8 + len;
        }
        assert_eq!(pos, data.len(), "{}: the killed mount left a torn journal", self.ctx());
        let Some(last) = last else { return false };
        let pending = |r: &journal::Replay| -> BTreeSet<u64> { r.ops.iter().filter_map(|o| o.journal_seq).collect() };
        let before = journal::read(self.cache.path())
            .expect("read journal")
            .expect("a journal");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(last as u64))
            .expect("cut the journal");
        // Only a `Done` may go: its op is pending again, nothing else changed.
        let after = journal::read(self.cache.path()).ok().flatten();
        let was_done = after.as_ref().is_some_and(|a| {
            let (b, a2) = (pending(&before), pending(a));
            b.is_subset(&a2) && a2.len() == b.len() + 1 && a.states == before.states
        });
        if !was_done {
            std::fs::write(&path, &data).expect("restore the journal");
        }
        was_done
    }

    /// The kill came while publishes were running: each publish the workers
    /// could have been running (no earlier pending op in the journal conflicts
    /// with it), up to one per worker, had created its temp file (named with
    /// the dead mount's `prefix`) in its directory on the backend. Returns how
    /// many temp files it left.
    fn leave_publish_temps(&self, prefix: &str) -> usize {
        let Some(r) = journal::read(self.cache.path()).expect("read journal") else {
            return 0;
        };
        let conflict = |(k, a): &(Key, Access), (k2, a2): &(Key, Access)| {
            k == k2 && (*a == Access::Exclusive || *a2 == Access::Exclusive)
        };
        let mut left = 0;
        for (i, op) in r.ops.iter().enumerate() {
            if left == self.cfg.workers {
                break;
            }
            let runnable = !r.ops[..i]
                .iter()
                .any(|e| e.keys.iter().any(|ek| op.keys.iter().any(|k| conflict(k, ek))));
            let Action::Publish { paths, .. } = &op.action else {
                continue;
            };
            let Some((dir, _)) = paths.first().and_then(|p| p.split_last()) else {
                continue;
            };
            // Times from a utimes (`mtime_of`), not the overlay's clock.
            let explicit = |t: &Option<Timespec>| t.is_some_and(|t| t.sec < mtime_of(1000).sec);
            let hit_by_replay = r.ops.iter().any(|e| match &e.action {
                Action::SetAttr { path, attrs } => *path == dir && explicit(&attrs.mtime),
                Action::Rename { from, to, .. } => dir.0.starts_with(&from.0) || dir.0.starts_with(&to.0),
                Action::Rmdir { path } => dir.0.starts_with(&path.0),
                _ => false,
            });
            if hit_by_replay && avoid(Bug::OrphansRemovedAfterReplay) {
                continue;
            }
            // Only where the directory exists (and is one) on the backend.
            let mut full = self.backend_dir.path().to_path_buf();
            let mut exists = true;
            for c in &dir.0 {
                full.push(c);
                exists &= std::fs::symlink_metadata(&full).is_ok_and(|m| m.is_dir());
                if !exists {
                    break;
                }
            }
            if runnable && exists {
                std::fs::write(full.join(format!("{prefix}{:x}", 0xdead0 + left)), b"partial").expect("temp file");
                left += 1;
            }
        }
        left
    }

    // ---- checks ------------------------------------------------------------------

    /// Checks the paths an op touched and their parent directories' listings.
    fn check_around(&mut self, paths: &[&P]) {
        let mut all = BTreeSet::new();
        for p in paths {
            all.insert((*p).clone());
            all.insert(p.parent());
        }
        for p in all {
            self.check_path(&p);
        }
    }

    /// Checks one path against the model; returns the object and its inode.
    fn check_path(&mut self, p: &P) -> Option<(Id, AttrOut)> {
        let want = self.model.lookup(p);
        if want == Err(No::Skip) {
            return None;
        }
        let got = self.resolve(p);
        match (want, got) {
            (Ok(id), Ok(a)) => {
                self.check_obj(p, id, &a);
                Some((id, a))
            }
            (Err(No::Fail(e)), Err(g)) if e.contains(&g.errno()) => None,
            (w, g) => panic!(
                "{}: lookup {p:?}: the model says {}, efscache says {:?}",
                self.ctx(),
                show(&w),
                g.map(|a| a.ino).map_err(|e| e.to_string())
            ),
        }
    }

    fn check_obj(&mut self, p: &P, id: Id, a: &AttrOut) {
        let o = self.model.obj(id).clone();
        let ctx = format!("{}: {p:?}", self.ctx());
        assert_eq!(a.kind, o.kind(), "{ctx}: kind");
        if p.is_root() {
            assert_eq!(a.ino, ROOT, "{ctx}: root inode");
        }
        let prev = *self.inos.entry(id).or_insert(a.ino);
        assert_eq!(a.ino, prev, "{ctx}: inode number changed");
        assert_eq!(
            a.attr.perm, o.perm,
            "{ctx}: mode {:o} vs model {:o}",
            a.attr.perm, o.perm
        );
        assert_eq!((a.attr.uid, a.attr.gid), (o.uid, o.gid), "{ctx}: owner");
        if let Some(t) = o.mtime {
            assert_eq!(a.attr.mtime, t, "{ctx}: mtime");
        }
        assert_eq!(a.nlink, self.model.nlink(id), "{ctx}: nlink");
        match &o.body {
            Body::File(data) => {
                assert_eq!(a.attr.size, data.len() as u64, "{ctx}: size");
                let got = self.read_all(a.ino);
                assert_eq!(&got, data, "{ctx}: content");
            }
            Body::Symlink(t) => {
                let got = self.call(|fs, b| fs.readlink(a.ino, b));
                assert_eq!(got.ok().as_deref(), Some(OsStr::new(t)), "{ctx}: symlink target");
            }
            Body::Dir => {
                let entries = self.list(a.ino);
                let want = self.model.children(p);
                let names: BTreeSet<&str> = entries.keys().map(String::as_str).collect();
                let want_names: BTreeSet<&str> = want.keys().copied().collect();
                assert_eq!(names, want_names, "{ctx}: listing");
                for (name, (ino, kind)) in &entries {
                    let cid = want[name.as_str()];
                    assert_eq!(*kind, self.model.obj(cid).kind(), "{ctx}: kind of entry {name}");
                    let prev = *self.inos.entry(cid).or_insert(*ino);
                    assert_eq!(*ino, prev, "{ctx}: inode number of entry {name}");
                }
            }
        }
    }

    fn read_all(&mut self, ino: Ino) -> Vec<u8> {
        let fh = self
            .call(|fs, b| fs.open(ino, libc::O_RDONLY, b).map(|o| o.fh))
            .unwrap_or_else(|e| panic!("{}: open for reading: {e}", self.ctx()));
        let mut out = Vec::new();
        loop {
            let off = out.len() as u64;
            let chunk = self
                .call(|fs, b| fs.read(fh, off, 5, b))
                .unwrap_or_else(|e| panic!("{}: read: {e}", self.ctx()));
            let n = chunk.len();
            out.extend(chunk);
            if n < 5 {
                break;
            }
        }
        self.fs().release(fh);
        out
    }

    /// A directory's entries (name -> inode, kind), checking "." and "..".
    fn list(&mut self, dir: Ino) -> BTreeMap<String, (Ino, Kind)> {
        let plus = self.cfg.plus;
        let mut out = BTreeMap::new();
        let mut off = 0;
        loop {
            let batch = self
                .call(|fs, b| fs.readdir(dir, off, plus, b))
                .unwrap_or_else(|e| panic!("{}: readdir: {e}", self.ctx()));
            let Some(last) = batch.last() else { break };
            off = last.offset;
            for e in batch {
                let name = e.name.to_string_lossy().into_owned();
                if name == "." {
                    assert_eq!(e.ino, dir, "{}: '.'", self.ctx());
                    continue;
                }
                if name == ".." {
                    continue;
                }
                if plus {
                    self.take_ref(e.ino);
                }
                assert!(
                    out.insert(name.clone(), (e.ino, e.kind)).is_none(),
                    "{}: {name} listed twice",
                    self.ctx()
                );
            }
        }
        out
    }

    /// Checks the whole overlay; returns the overlay's mtime of every object.
    fn check_all(&mut self) -> HashMap<Id, Timespec> {
        let paths: Vec<P> = self.model.tree.keys().cloned().collect();
        let mut by_ino: HashMap<Ino, Id> = HashMap::new();
        let mut mtimes = HashMap::new();
        for p in paths {
            let (id, a) = self
                .check_path(&p)
                .unwrap_or_else(|| panic!("{}: {p:?} missing", self.ctx()));
            let other = *by_ino.entry(a.ino).or_insert(id);
            assert_eq!(
                other,
                id,
                "{}: {p:?} shares inode {} with another object",
                self.ctx(),
                a.ino
            );
            mtimes.insert(id, a.attr.mtime);
        }
        mtimes
    }

    /// The backend directory, read directly, equals the model.
    fn check_backend(&self, overlay_mtimes: &HashMap<Id, Timespec>) {
        let ctx = self.ctx();
        let mut found: BTreeMap<Vec<String>, std::fs::Metadata> = BTreeMap::new();
        walk(self.backend_dir.path(), &mut Vec::new(), &mut found);
        let temps: Vec<_> = found
            .keys()
            .filter(|k| k.last().is_some_and(|n| n.starts_with(TEMP_PREFIX)))
            .collect();
        assert!(
            temps.is_empty(),
            "{ctx}: publish temp files left on the backend: {temps:?}"
        );
        let want: BTreeMap<Vec<String>, Id> = self.model.tree.iter().map(|(p, id)| (p.strings(), *id)).collect();
        let extra: Vec<_> = found.keys().filter(|k| !want.contains_key(*k)).collect();
        let missing: Vec<_> = want.keys().filter(|k| !found.contains_key(*k)).collect();
        assert!(
            extra.is_empty() && missing.is_empty(),
            "{ctx}: backend tree differs: extra {extra:?}, missing {missing:?}"
        );
        let mut identity: HashMap<Id, (u64, u64)> = HashMap::new();
        let mut ids: HashMap<(u64, u64), Id> = HashMap::new();
        for (path, meta) in &found {
            let id = want[path];
            let o = self.model.obj(id);
            let ctx = format!("{ctx}: backend /{}", path.join("/"));
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                Kind::Dir
            } else if ft.is_symlink() {
                Kind::Symlink
            } else if ft.is_file() {
                Kind::File
            } else {
                panic!("{ctx}: unexpected file type {ft:?}")
            };
            assert_eq!(kind, o.kind(), "{ctx}: kind");
            if kind != Kind::Symlink {
                assert_eq!(
                    meta.mode() & 0o7777,
                    o.perm,
                    "{ctx}: mode {:o} vs {:o}",
                    meta.mode() & 0o7777,
                    o.perm
                );
            }
            assert_eq!((meta.uid(), meta.gid()), (o.uid, o.gid), "{ctx}: owner");
            let mtime = Timespec {
                sec: meta.mtime(),
                nsec: meta.mtime_nsec() as u32,
            };
            if let Some(t) = o.mtime {
                assert_eq!(mtime, t, "{ctx}: mtime");
            }
            if let Some(t) = overlay_mtimes.get(&id) {
                assert_eq!(mtime, *t, "{ctx}: mtime differs from the overlay's");
            }
            assert_eq!(meta.nlink() as u32, self.model.nlink(id), "{ctx}: nlink");
            let full: PathBuf = path
                .iter()
                .fold(self.backend_dir.path().to_path_buf(), |acc, c| acc.join(c));
            match &o.body {
                Body::File(data) => {
                    let got = std::fs::read(&full).expect("read backend file");
                    assert_eq!(&got, data, "{ctx}: content");
                }
                Body::Symlink(t) => {
                    let got = std::fs::read_link(&full).expect("readlink");
                    assert_eq!(got.as_os_str(), OsStr::new(t), "{ctx}: symlink target");
                }
                Body::Dir => {}
            }
            let key = (meta.dev(), meta.ino());
            let prev = *identity.entry(id).or_insert(key);
            assert_eq!(prev, key, "{ctx}: names of one file are different backend files");
            let other = *ids.entry(key).or_insert(id);
            assert_eq!(other, id, "{ctx}: different files share a backend inode");
        }
    }
}

fn walk(dir: &Path, prefix: &mut Vec<String>, out: &mut BTreeMap<Vec<String>, std::fs::Metadata>) {
    if prefix.is_empty() {
        out.insert(Vec::new(), std::fs::symlink_metadata(dir).expect("stat backend root"));
    }
    for e in std::fs::read_dir(dir).expect("read backend dir") {
        let e = e.expect("backend entry");
        let name = e.file_name().to_string_lossy().into_owned();
        let meta = std::fs::symlink_metadata(e.path()).expect("stat backend entry");
        prefix.push(name);
        out.insert(prefix.clone(), meta.clone());
        if meta.is_dir() {
            walk(&e.path(), prefix, out);
        }
        prefix.pop();
    }
}

/// What the simulated crashes of this test run hit (printed by the crash
/// property with `EFSCACHE_MODEL_STATS=1`).
struct CrashStats {
    crashes: AtomicU64,
    /// ... that left pending work in the journal.
    pending: AtomicU64,
    /// ... with backend ops queued, or running, at the kill.
    queued: AtomicU64,
    in_flight: AtomicU64,
    lost_done: AtomicU64,
    temps: AtomicU64,
    /// Journaled ops the recoveries replayed, and pending states they took back.
    replayed: AtomicU64,
    adopted: AtomicU64,
}

static CRASH_STATS: CrashStats = CrashStats {
    crashes: AtomicU64::new(0),
    pending: AtomicU64::new(0),
    queued: AtomicU64::new(0),
    in_flight: AtomicU64::new(0),
    lost_done: AtomicU64::new(0),
    temps: AtomicU64::new(0),
    replayed: AtomicU64::new(0),
    adopted: AtomicU64::new(0),
};

impl CrashStats {
    fn record(&self, at_kill: &SchedSnapshot, lost_done: bool, temps: usize, rec: &serde_json::Value) {
        let add = |c: &AtomicU64, n: u64| c.fetch_add(n, Ordering::Relaxed);
        add(&self.crashes, 1);
        add(&self.pending, u64::from(!rec.is_null()));
        add(&self.queued, u64::from(at_kill.queued_ops > 0));
        add(&self.in_flight, u64::from(at_kill.in_flight > 0));
        add(&self.lost_done, u64::from(lost_done));
        add(&self.temps, temps as u64);
        add(&self.replayed, rec["ops"].as_u64().unwrap_or(0));
        add(&self.adopted, rec["states"].as_u64().unwrap_or(0));
    }
    fn report(&self) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "crashes {}: with work pending {}, ops queued {}, running {}; Done lost {}; temp files left {}; recovery replayed {} ops, took back {} files/dirs",
            get(&self.crashes),
            get(&self.pending),
            get(&self.queued),
            get(&self.in_flight),
            get(&self.lost_done),
            get(&self.temps),
            get(&self.replayed),
            get(&self.adopted)
        )
    }
}

/// Runs `ops` and the final sync and checks; returns the harness for more checks.
fn run_case(cfg: Cfg, ops: &[Op]) -> Harness {
    let mut h = Harness::new(cfg);
    for (i, op) in ops.iter().enumerate() {
        h.step = i;
        h.run(op);
    }
    h.step = ops.len();
    h.op = "final sync".into();
    h.finish();
    h
}

fn config() -> ProptestConfig {
    config_with(64)
}

fn config_with(cases: u32) -> ProptestConfig {
    ProptestConfig {
        // PROPTEST_CASES=n runs more (or fewer) cases.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(cases),
        // Failures are reported, never written next to the sources.
        failure_persistence: None,
        max_shrink_iters: 4000,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Overlay and model agree after every op; after sync the backend equals the model.
    #[test]
    fn overlay_and_backend_agree_with_model(cfg in cfg(), ops in prop::collection::vec(op(false, false), 1..40)) {
        run_case(cfg, &ops);
    }

    /// The same, with remounts: a fresh `Fs` over the flushed backend shows the
    /// model's tree through its own lookup/readdir/read, and further ops on
    /// objects loaded from the backend keep agreeing.
    #[test]
    fn remount_shows_the_same_tree(cfg in cfg(), ops in prop::collection::vec(op(true, false), 1..40)) {
        let mut ops = ops;
        ops.push(Op::Remount);
        run_case(cfg, &ops);
    }

}

proptest! {
    // Crashes are the newest and least explored part: more and longer cases.
    #![proptest_config(config_with(192))]

    /// The same, with crashes (`kill -9` of the daemon) at random points,
    /// each followed by a new mount over the same cache dir: the new mount
    /// shows the model's tree at once, and after the final sync the backend
    /// holds exactly what the acknowledged ops define. Every case crashes at
    /// least once.
    #[test]
    fn crash_recovery_keeps_every_acknowledged_change(
        cfg in cfg(),
        ops in prop::collection::vec(op(true, true), 1..50),
        at in any::<prop::sample::Index>(),
        extra in crash(),
    ) {
        let mut ops = ops;
        if !ops.iter().any(|o| matches!(o, Op::Crash(_))) {
            ops.insert(at.index(ops.len() + 1), Op::Crash(extra));
        }
        run_case(cfg, &ops);
        if std::env::var_os("EFSCACHE_MODEL_STATS").is_some() {
            eprintln!("{}", CRASH_STATS.report());
        }
    }
}

// ---- crash scenarios ---------------------------------------------------------------

fn p(names: &[&'static str]) -> P {
    P(names.to_vec())
}

/// Reproducible configurations (the flush workers run only when the ops say so).
fn scenario_cfgs() -> Vec<Cfg> {
    let mut out = Vec::new();
    for (debounce_zero, exclusive, workers) in [(false, true, 1), (true, false, 2), (false, false, 3), (true, true, 1)]
    {
        out.push(Cfg {
            debounce_zero,
            exclusive,
            workers,
            plus: !exclusive,
            eager_forget: workers == 3,
            free_running: false,
        });
    }
    out
}

/// Ways a kill lands: between steps with nothing queued by it, with every
/// publish queued (some of them with their temp files on the backend, as if
/// running), and just after the last backend op but before its `Done`.
fn scenario_crashes() -> Vec<Crash> {
    let c = |queue, lose_done, temps| Crash {
        queue,
        run_us: None,
        lose_done,
        temps,
    };
    vec![
        c(false, false, false),
        c(true, false, true),
        c(false, true, false),
        c(true, true, true),
    ]
}

/// The backend, read directly: relative path -> file content (None for
/// directories and symlinks).
fn backend_files(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut found = BTreeMap::new();
    walk(root, &mut Vec::new(), &mut found);
    found
        .into_iter()
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, meta)| {
            let rel = k.join("/");
            let data = meta
                .is_file()
                .then(|| std::fs::read(root.join(&rel)).expect("read backend file"));
            (rel, data)
        })
        .collect()
}

/// rsync's update of an existing file: create `.a.Xq7Tz1`, write, close,
/// rename over `a`; the daemon is killed before or after the rename, with
/// the temp file's publish queued or not. The new mount shows the new
/// content at once (checked by the harness after the crash), and after the
/// final sync the backend has exactly `a` = "new": no temp name, no old
/// content, no publish temp file.
#[test]
fn crash_in_an_rsync_rename_chain() {
    let (a, tmp) = (p(&["a"]), p(&[".a.Xq7Tz1"]));
    let mut runs = 0;
    for cfg in scenario_cfgs() {
        for crash in scenario_crashes() {
            for tick_before_rename in [false, true] {
                for crash_after_rename in [false, true] {
                    let mut ops = vec![
                        Op::Create {
                            path: a.clone(),
                            excl: false,
                            trunc: false,
                            data: b"old".to_vec(),
                            keep: None,
                            perm: 0o644,
                            owner: 0,
                        },
                        Op::Sync,
                        Op::Create {
                            path: tmp.clone(),
                            excl: true,
                            trunc: false,
                            data: b"new".to_vec(),
                            keep: None,
                            perm: 0o600,
                            owner: 0,
                        },
                    ];
                    if tick_before_rename {
                        ops.push(Op::TickForce);
                    }
                    if !crash_after_rename {
                        ops.push(Op::Crash(crash.clone()));
                    }
                    ops.push(Op::Rename {
                        from: tmp.clone(),
                        to: a.clone(),
                        noreplace: false,
                    });
                    if crash_after_rename {
                        ops.push(Op::Crash(crash.clone()));
                    }
                    ops.push(Op::Read { path: a.clone() });
                    let h = run_case(cfg.clone(), &ops);
                    assert_eq!(
                        backend_files(h.backend_dir.path()),
                        BTreeMap::from([("a".to_string(), Some(b"new".to_vec()))]),
                        "{ops:?}, {cfg:?}"
                    );
                    runs += 1;
                }
            }
        }
    }
    assert_eq!(runs, 64);
}

/// A directory with dirty children is renamed, then the daemon is killed: a
/// file rewritten in place, a new file still open for writing (written to
/// after the rename), a subdirectory chmod'ed, a new hard link. Every change
/// survives under the new names, nothing is left under the old ones.
#[test]
fn crash_after_a_directory_rename_with_dirty_children() {
    let mut runs = 0;
    for cfg in scenario_cfgs() {
        for crash in scenario_crashes() {
            for tick_before_rename in [false, true] {
                let mut ops = vec![
                    Op::Mkdir {
                        path: p(&["a"]),
                        perm: 0o755,
                        owner: 0,
                    },
                    Op::Create {
                        path: p(&["a", "b"]),
                        excl: true,
                        trunc: false,
                        data: b"1".to_vec(),
                        keep: None,
                        perm: 0o644,
                        owner: 0,
                    },
                    Op::Mkdir {
                        path: p(&["a", "c"]),
                        perm: 0o755,
                        owner: 0,
                    },
                    Op::Create {
                        path: p(&["a", "c", "d"]),
                        excl: true,
                        trunc: false,
                        data: b"2".to_vec(),
                        keep: None,
                        perm: 0o644,
                        owner: 0,
                    },
                    Op::Sync,
                    Op::Rewrite {
                        path: p(&["a", "b"]),
                        trunc: true,
                        offset: 0,
                        data: b"xy".to_vec(),
                    },
                    Op::Create {
                        path: p(&["a", "c", "a"]),
                        excl: true,
                        trunc: false,
                        data: b"new".to_vec(),
                        keep: Some(0),
                        perm: 0o640,
                        owner: 1000,
                    },
                    Op::Chmod {
                        path: p(&["a", "c"]),
                        perm: 0o700,
                    },
                    Op::Link {
                        from: p(&["a", "c", "d"]),
                        to: p(&["a", "d"]),
                    },
                ];
                if tick_before_rename {
                    ops.push(Op::TickForce);
                }
                ops.extend([
                    Op::Rename {
                        from: p(&["a"]),
                        to: p(&["b"]),
                        noreplace: false,
                    },
                    Op::Write {
                        slot: 0,
                        offset: 3,
                        data: b"+".to_vec(),
                    },
                    Op::Crash(crash.clone()),
                    Op::CheckAll,
                ]);
                let h = run_case(cfg.clone(), &ops);
                let want: BTreeMap<String, Option<Vec<u8>>> = [
                    ("b", None),
                    ("b/b", Some(&b"xy"[..])),
                    ("b/c", None),
                    ("b/c/a", Some(b"new+")),
                    ("b/c/d", Some(b"2")),
                    ("b/d", Some(b"2")),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec)))
                .collect();
                assert_eq!(backend_files(h.backend_dir.path()), want, "{ops:?}, {cfg:?}");
                let meta = std::fs::metadata(h.backend_dir.path().join("b/c")).expect("stat b/c");
                assert_eq!(meta.mode() & 0o7777, 0o700, "mode of b/c, {ops:?}, {cfg:?}");
                let meta = std::fs::metadata(h.backend_dir.path().join("b/c/a")).expect("stat b/c/a");
                assert_eq!(
                    (meta.mode() & 0o7777, meta.uid()),
                    (0o640, 1000),
                    "b/c/a, {ops:?}, {cfg:?}"
                );
                runs += 1;
            }
        }
    }
    assert_eq!(runs, 32);
}

/// A new file's publish is queued (or, with temp files, running), then the
/// file and its directory are removed, or the file is renamed away and the
/// directory replaced by another one, and the daemon is killed: the replay
/// must not bring anything back nor leave anything behind.
#[test]
fn crash_with_removals_queued_behind_a_publish() {
    let mut runs = 0;
    for cfg in scenario_cfgs() {
        for crash in scenario_crashes() {
            for replace in [false, true] {
                let mut ops = vec![
                    Op::Mkdir {
                        path: p(&["a"]),
                        perm: 0o755,
                        owner: 0,
                    },
                    Op::Mkdir {
                        path: p(&["b"]),
                        perm: 0o700,
                        owner: 0,
                    },
                    Op::Sync,
                    Op::Create {
                        path: p(&["a", "c"]),
                        excl: true,
                        trunc: false,
                        data: b"1".to_vec(),
                        keep: None,
                        perm: 0o644,
                        owner: 0,
                    },
                    Op::TickForce,
                ];
                if replace {
                    ops.extend([
                        Op::Rename {
                            from: p(&["a", "c"]),
                            to: p(&["c"]),
                            noreplace: false,
                        },
                        Op::Rename {
                            from: p(&["b"]),
                            to: p(&["a"]),
                            noreplace: false,
                        },
                    ]);
                } else {
                    ops.extend([Op::Unlink { path: p(&["a", "c"]) }, Op::Rmdir { path: p(&["a"]) }]);
                }
                ops.push(Op::Crash(crash.clone()));
                let h = run_case(cfg.clone(), &ops);
                let want: BTreeMap<String, Option<Vec<u8>>> = if replace {
                    BTreeMap::from([("a".to_string(), None), ("c".to_string(), Some(b"1".to_vec()))])
                } else {
                    BTreeMap::from([("b".to_string(), None)])
                };
                assert_eq!(backend_files(h.backend_dir.path()), want, "{ops:?}, {cfg:?}");
                runs += 1;
            }
        }
    }
    assert_eq!(runs, 32);
}

/// Runs `before` then a crash of every scenario kind, in every scenario
/// configuration, and checks the backend holds exactly `want` after recovery.
fn assert_backend_after_each_crash(before: &[Op], want: &[(&str, &[u8])]) {
    let want: BTreeMap<String, Option<Vec<u8>>> = want.iter().map(|(k, v)| (k.to_string(), Some(v.to_vec()))).collect();
    for cfg in scenario_cfgs() {
        for crash in scenario_crashes() {
            let mut ops = before.to_vec();
            ops.extend([Op::Crash(crash), Op::CheckAll]);
            let h = run_case(cfg.clone(), &ops);
            assert_eq!(backend_files(h.backend_dir.path()), want, "{ops:?}, {cfg:?}");
        }
    }
}

fn create_f(data: &[u8]) -> Op {
    Op::Create {
        path: p(&["f"]),
        excl: true,
        trunc: false,
        data: data.to_vec(),
        keep: None,
        perm: 0o644,
        owner: 0,
    }
}

/// A closed, unpublished file is opened again with O_TRUNC and rewritten
/// shorter, and the daemon is killed before the writer closes it: the journal
/// must say the file is open for writing, or recovery would take the shorter
/// staged data for data lost in a machine crash and refuse to publish it.
#[test]
fn crash_while_an_unpublished_file_is_rewritten_shorter() {
    let before = [
        create_f(b"0123456789"),
        Op::Open {
            path: p(&["f"]),
            trunc: true,
            slot: 0,
        },
        Op::Write {
            slot: 0,
            offset: 0,
            data: b"abc".to_vec(),
        },
    ];
    assert_backend_after_each_crash(&before, &[("f", b"abc")]);
}

/// A file's publish is queued, the file is rewritten longer and closed, and
/// its second publish is queued behind the first (same staging file); then
/// the daemon is killed. The first publish's recorded size no longer matches
/// the staging file: replay must publish the newest content through the
/// last publish, not refuse the first as "incomplete" and lose the data.
#[test]
fn crash_with_two_publishes_of_one_staging_file_queued() {
    let longer: &[u8] = b"a longer content than before";
    let before = [
        create_f(b"0123456789"),
        Op::Pause,
        Op::TickForce,
        Op::Rewrite {
            path: p(&["f"]),
            trunc: true,
            offset: 0,
            data: longer.to_vec(),
        },
        Op::TickForce,
    ];
    assert_backend_after_each_crash(&before, &[("f", longer)]);
}

// ---- regression tests for known bugs ----------------------------------------------

/// A mount for the regression tests: debounce 0, exclusive, two free-running workers.
fn regression_mount(backend: &Path) -> Mount {
    daemon_umask();
    let cfg = Cfg {
        debounce_zero: true,
        exclusive: true,
        workers: 2,
        plus: false,
        eager_forget: false,
        free_running: true,
    };
    Mount::new(backend, &cfg, 0)
}

/// Runs `f` on its own thread; None if it has not returned after `limit`
/// (a deadlocked thread is left behind).
fn returns_within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => Some(v),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the operation panicked"),
    }
}

fn name(s: &str) -> &OsStr {
    OsStr::new(s)
}

/// Creates `n` with `data` and closes it; returns its inode.
fn put(fs: &Fs, n: &str, data: &[u8]) -> Ino {
    let (a, opened) = fs
        .create(ROOT, name(n), 0o644, 0, libc::O_WRONLY | libc::O_CREAT, 0, 0, true)
        .expect("create");
    let fh = opened.fh;
    fs.write(fh, 0, data).expect("write");
    fs.release(fh);
    a.ino
}

fn sync_ok(fs: &Fs) {
    let r = fs.sync(Some(Instant::now() + Duration::from_secs(10)));
    assert!(r.complete && r.failures.is_empty(), "sync: {r:?}");
}

/// Syncs until the backend's op counts stop changing, so a count taken next
/// holds only what follows.
fn settle(fs: &Fs) {
    let mut last = None;
    for _ in 0..100 {
        sync_ok(fs);
        std::thread::sleep(Duration::from_millis(20));
        let now = fs.backend.stats().snapshot().ops;
        if last.as_ref() == Some(&now) {
            return;
        }
        last = Some(now);
    }
    panic!("the backend kept changing after sync: {last:?}");
}

/// (Fixed.) `rmdir` of an existing directory never returned: `Fs::rmdir` held the
/// namespace guard of `self.ns.lock().lookup(..)` (the `if let` scrutinee of a
/// let chain) while the chain's second condition called `self.ns.lock()` again.
/// `Fs::rename` onto an existing name had the same pattern (next test).
#[test]
fn regression_rmdir_deadlocks() {
    let dir = TempDir::new().expect("tempdir");
    let m = regression_mount(dir.path());
    let fs = m.fs.clone();
    let r = returns_within(Duration::from_secs(5), move || {
        fs.mkdir(ROOT, name("a"), 0o755, 0, 0, 0, true).expect("mkdir");
        fs.rmdir(ROOT, name("a"), true).map_err(|e| e.errno())
    });
    let Some(r) = r else {
        std::mem::forget(m); // its workers wait for the namespace lock forever
        panic!("mkdir a; rmdir a: rmdir did not return (deadlock)");
    };
    assert_eq!(r, Ok(()));
}

/// (Fixed.) `rename` onto an existing name (rsync's temp-then-rename) never returned; see above.
#[test]
fn regression_rename_over_existing_deadlocks() {
    let dir = TempDir::new().expect("tempdir");
    let m = regression_mount(dir.path());
    let fs = m.fs.clone();
    let r = returns_within(Duration::from_secs(5), move || {
        put(&fs, ".a.Xq7Tz1", b"new");
        put(&fs, "a", b"old");
        fs.rename(ROOT, name(".a.Xq7Tz1"), ROOT, name("a"), 0, true)
            .map_err(|e| e.errno())
    });
    let Some(r) = r else {
        std::mem::forget(m);
        panic!("create .a.Xq7Tz1; create a; rename .a.Xq7Tz1 -> a: rename did not return (deadlock)");
    };
    assert_eq!(r, Ok(()));
}

/// (Fixed.) chmod/utimes of the mount's root directory (what `rsync -a src/
/// /mnt/efs/` does last) was queued as a SetAttr of the empty path, which the
/// backend refused (EINVAL from `at_parent` of the root).
#[test]
fn regression_root_setattr_is_flushed() {
    let dir = TempDir::new().expect("tempdir");
    let m = regression_mount(dir.path());
    let t = mtime_of(7);
    m.fs.setattr(
        ROOT,
        SetAttr {
            perm: Some(0o750),
            mtime: Some(t),
            atime: Some(t),
            ..Default::default()
        },
        true,
    )
    .expect("setattr");
    sync_ok(&m.fs);
    let meta = std::fs::metadata(dir.path()).expect("stat");
    assert_eq!(meta.mode() & 0o7777, 0o750);
    assert_eq!((meta.mtime(), meta.mtime_nsec() as u32), (t.sec, t.nsec));
}

/// (Fixed.) A publish is queued (on_backend is set at once), then a chmod queues a
/// SetAttr behind it; the file is written again before the publish runs, so the
/// publish is abandoned as superseded and creates nothing. The SetAttr then
/// fails with ENOENT and `sync` reports a permanent failure, although the next
/// publish does put the file (with the mode) on the backend.
#[test]
fn regression_setattr_after_abandoned_publish() {
    let dir = TempDir::new().expect("tempdir");
    let m = regression_mount(dir.path());
    let fs = &m.fs;
    m.sched.set_paused(true);
    let ino = put(fs, "a", b"1");
    fs.tick(true); // the publish of "a" is queued
    fs.setattr(
        ino,
        SetAttr {
            perm: Some(0o640),
            ..Default::default()
        },
        true,
    )
    .expect("chmod");
    let fh = fs.open(ino, libc::O_RDWR, true).expect("open").fh;
    fs.write(fh, 0, b"2").expect("write");
    fs.release(fh);
    m.sched.set_paused(false);
    sync_ok(fs);
    let meta = std::fs::metadata(dir.path().join("a")).expect("stat a");
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!(std::fs::read(dir.path().join("a")).expect("read"), b"2");
}

/// (Fixed.) Same cause: a rename queued behind an abandoned publish fails with ENOENT.
#[test]
fn regression_rename_after_abandoned_publish() {
    let dir = TempDir::new().expect("tempdir");
    let m = regression_mount(dir.path());
    let fs = &m.fs;
    m.sched.set_paused(true);
    let ino = put(fs, "a", b"1");
    fs.tick(true);
    let fh = fs.open(ino, libc::O_RDWR, true).expect("open").fh;
    fs.write(fh, 0, b"2").expect("write");
    fs.release(fh);
    fs.rename(ROOT, name("a"), ROOT, name("b"), 0, true).expect("rename");
    m.sched.set_paused(false);
    sync_ok(fs);
    assert_eq!(std::fs::read(dir.path().join("b")).expect("read"), b"2");
    assert!(!dir.path().join("a").exists());
}

/// (Fixed.) `create` of a name that exists took a lookup reference before
/// opening the file; when the open failed (EISDIR) or had to block (WouldBlock,
/// then the FUSE layer calls again) the reference was never returned, so the
/// inode (and any staged copy) outlived its last name and the kernel's forget.
#[test]
fn regression_create_of_existing_name_leaks_lookup() {
    let dir = TempDir::new().expect("tempdir");
    let m = regression_mount(dir.path());
    let fs = &m.fs;
    let ino = put(fs, "a", b"data"); // the kernel holds 1 reference
    sync_ok(fs); // "a" is clean on the backend: opening it for writing needs the backend
    let flags = libc::O_WRONLY | libc::O_CREAT;
    // The FUSE adapter: first without blocking, then again on the blocking pool.
    let (a, opened) = match fs.create(ROOT, name("a"), 0o644, 0, flags, 0, 0, false) {
        Err(FsError::WouldBlock) => fs.create(ROOT, name("a"), 0o644, 0, flags, 0, 0, true),
        r => r,
    }
    .expect("create");
    assert_eq!(a.ino, ino);
    fs.release(opened.fh); // the kernel now holds 2 references
    fs.unlink(ROOT, name("a"), true).expect("unlink");
    fs.forget(ino, 2);
    assert_eq!(fs.status().inodes, 1, "only the root should be left: {:?}", fs.status());
    // An existing directory: the open fails, no reference may stay behind.
    let d = fs.mkdir(ROOT, name("d"), 0o755, 0, 0, 0, true).expect("mkdir"); // 1 reference
    let r = fs
        .create(ROOT, name("d"), 0o644, 0, flags, 0, 0, true)
        .map(|(a, o)| (a, o.fh));
    assert_eq!(r.map_err(|e| e.errno()).err(), Some(libc::EISDIR));
    fs.rmdir(ROOT, name("d"), true).expect("rmdir");
    fs.forget(d.ino, 1);
    assert_eq!(fs.status().inodes, 1, "only the root should be left: {:?}", fs.status());
}

/// nlink of objects loaded from the backend counted only what the overlay had
/// listed so far: a directory showed 2 until its own listing was loaded, and
/// a file hard-linked from another directory showed 1 until that directory
/// was loaded (tar, cp -a and rsync -H use st_nlink > 1 to find hard links).
/// (Fixed.)
#[test]
fn regression_nlink_before_directory_is_listed() {
    daemon_umask();
    let dir = TempDir::new().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("d/sub")).expect("mkdir");
    std::fs::write(dir.path().join("x"), b"x").expect("write");
    std::fs::hard_link(dir.path().join("x"), dir.path().join("d/y")).expect("link");
    let m = regression_mount(dir.path());
    let fs = &m.fs;
    let root = fs.getattr(ROOT, true).expect("getattr /");
    let x = fs.lookup(ROOT, name("x"), true).expect("lookup x");
    let d = fs.lookup(ROOT, name("d"), true).expect("lookup d");
    let got = (root.nlink, x.nlink, d.nlink);
    let meta = |p: &str| std::fs::symlink_metadata(dir.path().join(p)).expect("stat").nlink() as u32;
    assert_eq!(got, (meta(""), meta("x"), meta("d")), "nlink of /, /x, /d");
}

/// (Fixed.) A mount like the daemon's default (not exclusive), here with TTL 0 so every
/// access revalidates. chown of a directory loaded from the backend waits in
/// `dirty_dir_attrs`; the next lookup in its parent reloads the parent and
/// `merge_listing` overwrites the directory's attributes with the backend's, so
/// the chown is gone from the overlay and never reaches the backend.
#[test]
fn regression_dir_attrs_survive_revalidation() {
    daemon_umask();
    let dir = TempDir::new().expect("tempdir");
    std::fs::create_dir(dir.path().join("d")).expect("mkdir");
    let cfg = Cfg {
        debounce_zero: true,
        exclusive: false,
        workers: 2,
        plus: false,
        eager_forget: false,
        free_running: true,
    };
    let m = Mount::new(dir.path(), &cfg, 0);
    let fs = &m.fs;
    let d = fs.lookup(ROOT, name("d"), true).expect("lookup d");
    let t = mtime_of(3);
    fs.setattr(
        d.ino,
        SetAttr {
            uid: Some(1000),
            gid: Some(1000),
            perm: Some(0o700),
            atime: Some(t),
            mtime: Some(t),
            ..Default::default()
        },
        true,
    )
    .expect("setattr");
    let again = fs.lookup(ROOT, name("d"), true).expect("lookup d again");
    assert_eq!(
        (again.attr.uid, again.attr.gid, again.attr.perm, again.attr.mtime),
        (1000, 1000, 0o700, t),
        "overlay after revalidation"
    );
    sync_ok(fs);
    let meta = std::fs::metadata(dir.path().join("d")).expect("stat");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (1000, 1000, 0o700),
        "backend"
    );
}

/// (Fixed.) `sync` publishes everything and reports files still open for writing; but
/// creating a file marks its directory's times dirty, and directory attributes
/// wait until no file in the directory is unpublished, so `sync` loops until
/// its deadline (forever without one) while any file is open for writing.
#[test]
fn regression_sync_with_a_file_open_for_writing() {
    let dir = TempDir::new().expect("tempdir");
    let m = regression_mount(dir.path());
    let fs = &m.fs;
    put(fs, "done", b"1");
    let (_, opened) = fs
        .create(ROOT, name("log"), 0o644, 0, libc::O_WRONLY | libc::O_CREAT, 0, 0, true)
        .expect("create");
    let fh = opened.fh;
    fs.write(fh, 0, b"x").expect("write");
    let r = fs.sync(Some(Instant::now() + Duration::from_secs(3)));
    assert!(r.complete, "sync: {r:?}");
    assert_eq!(r.open_files, vec!["log".to_string()]);
    assert_eq!(std::fs::read(dir.path().join("done")).expect("read"), b"1");
    fs.release(fh);
}

/// `sync` returns as soon as the scheduler's queue is empty, but a worker
/// records an op's effects in the namespace only after it has reported the op
/// finished to the scheduler: `entries_changed_on_backend` then marks the
/// directory's times for re-application. When the last op was a publish that
/// changed a directory's entries on the backend (a rewritten file: temp file +
/// rename), `sync` can return "complete" in that window, leaving the backend
/// directory with the publish's mtime instead of the overlay's (and the
/// directory still dirty).
#[test]
fn regression_sync_waits_for_directory_times() {
    let dir = TempDir::new().expect("tempdir");
    let m = regression_mount(dir.path());
    let fs = &m.fs;
    let ino = put(fs, "f", b"0");
    sync_ok(fs);
    let mut bad = Vec::new();
    for i in 0..2000u32 {
        let fh = fs.open(ino, libc::O_RDWR | libc::O_TRUNC, true).expect("open").fh;
        fs.write(fh, 0, &i.to_le_bytes()).expect("write");
        fs.release(fh);
        sync_ok(fs);
        let st = fs.status();
        let root = fs.getattr(ROOT, true).expect("getattr");
        let meta = std::fs::metadata(dir.path()).expect("stat");
        let backend = Timespec {
            sec: meta.mtime(),
            nsec: meta.mtime_nsec() as u32,
        };
        if st.dirty_dirs != 0 || backend != root.attr.mtime {
            bad.push((i, st.dirty_dirs, backend, root.attr.mtime));
        }
    }
    assert!(
        bad.is_empty(),
        "after sync: (iteration, dirty dirs, backend / mtime, overlay / mtime): {bad:?}"
    );
}

/// (Fixed.) Rewriting an existing file changes no directory entry, so its directory's
/// mtime must not change (and the overlay indeed keeps it). But the publish
/// writes a temp file next to it and renames it over the file, which sets the
/// backend directory's mtime to the publish time; `entries_changed_on_backend`
/// re-applies the overlay's times only to directories touched through this
/// mount (`times_explicit`), so a directory that existed before the mount keeps
/// the wrong mtime on the backend, and the overlay and backend disagree.
#[test]
fn regression_rewrite_keeps_directory_mtime() {
    daemon_umask();
    let dir = TempDir::new().expect("tempdir");
    std::fs::create_dir(dir.path().join("d")).expect("mkdir");
    std::fs::write(dir.path().join("d/f"), b"old").expect("write");
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_500_000_000);
    std::fs::File::open(dir.path().join("d"))
        .and_then(|f| f.set_modified(t))
        .expect("set mtime of d");
    let m = regression_mount(dir.path());
    let fs = &m.fs;
    let d = fs.lookup(ROOT, name("d"), true).expect("lookup d");
    let f = fs.lookup(d.ino, name("f"), true).expect("lookup f");
    let fh = fs.open(f.ino, libc::O_RDWR, true).expect("open").fh;
    fs.write(fh, 0, b"new").expect("write");
    fs.release(fh);
    sync_ok(fs);
    let overlay = fs.getattr(d.ino, true).expect("getattr d").attr.mtime;
    let meta = std::fs::metadata(dir.path().join("d")).expect("stat d");
    assert_eq!(std::fs::read(dir.path().join("d/f")).expect("read"), b"new");
    assert_eq!(overlay.sec, 1_500_000_000, "overlay mtime of d");
    assert_eq!(meta.mtime(), 1_500_000_000, "backend mtime of d");
}

/// (Fixed.) rsync -a --numeric-ids copies a root-owned file into a setgid directory of
/// group 1000: the new file first gets the directory's group, then rsync
/// chowns it to 0:0. The publish creates the temp file on the backend (where it
/// inherits group 1000) and skips the chown because 0:0 are the daemon's own
/// ids, so the backend file keeps group 1000.
#[test]
fn regression_group_in_setgid_directory() {
    daemon_umask();
    let dir = TempDir::new().expect("tempdir");
    let d = dir.path().join("d");
    std::fs::create_dir(&d).expect("mkdir");
    std::os::unix::fs::chown(&d, Some(1000), Some(1000)).expect("chown");
    std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o2775)).expect("chmod");
    let m = regression_mount(dir.path());
    let fs = &m.fs;
    let d = fs.lookup(ROOT, name("d"), true).expect("lookup d");
    let (f, opened) = fs
        .create(d.ino, name("f"), 0o644, 0, libc::O_WRONLY | libc::O_CREAT, 0, 0, true)
        .expect("create");
    let fh = opened.fh;
    assert_eq!(f.attr.gid, 1000, "inherited from the setgid directory");
    fs.write(fh, 0, b"x").expect("write");
    fs.release(fh);
    let a = fs
        .setattr(
            f.ino,
            SetAttr {
                uid: Some(0),
                gid: Some(0),
                ..Default::default()
            },
            true,
        )
        .expect("chown");
    assert_eq!((a.attr.uid, a.attr.gid), (0, 0));
    sync_ok(fs);
    let meta = std::fs::metadata(dir.path().join("d/f")).expect("stat");
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "owner on the backend");
}

/// (Fixed.) `ln x z; ln x y` are queued as Link ops that find their source by path
/// ("x") when they run, but lock only the object and the new name. rsync then
/// replaces x (temp file renamed over it); the publish of the new x locks the
/// name x, not the old object, so it overtakes the second Link, which then
/// links the *new* x as y: y loses the old content.
#[test]
fn regression_link_source_replaced_before_link_runs() {
    daemon_umask();
    let dir = TempDir::new().expect("tempdir");
    let cfg = Cfg {
        debounce_zero: true,
        exclusive: true,
        workers: 1,
        plus: false,
        eager_forget: false,
        free_running: true,
    };
    let m = Mount::new(dir.path(), &cfg, 0);
    let fs = &m.fs;
    let x = put(fs, "x", b"old");
    sync_ok(fs);
    m.sched.set_paused(true);
    fs.link(x, ROOT, name("z"), true).expect("link z");
    fs.link(x, ROOT, name("y"), true).expect("link y");
    put(fs, ".x.Xq7Tz1", b"new");
    fs.rename(ROOT, name(".x.Xq7Tz1"), ROOT, name("x"), 0, true)
        .expect("rename over x");
    fs.tick(true);
    m.sched.set_paused(false);
    sync_ok(fs);
    let read = |n: &str| std::fs::read(dir.path().join(n)).expect("read");
    assert_eq!(
        (read("x"), read("y"), read("z")),
        (b"new".to_vec(), b"old".to_vec(), b"old".to_vec())
    );
}

/// (Fixed.) `Fs::open` for writing takes the file's staging id (`stage`), opens that
/// staging file and only then, under a second namespace lock, counts the open.
/// A publish of the file that finishes in between sees `opens == 0`, turns the
/// content back to `Remote` and deletes the staging file: the writes then go to
/// a deleted file, `mark_dirty` finds no staged content, and they are lost (the
/// file reads, and stays, as the backend's old content).
#[test]
fn regression_open_racing_a_finishing_publish_loses_writes() {
    let dir = TempDir::new().expect("tempdir");
    let m = regression_mount(dir.path());
    let fs = &m.fs;
    let ino = put(fs, "f", b"start");
    let mut bad = Vec::new();
    for i in 0..3000u32 {
        fs.tick(true); // publish the previous content, racing the open below
        // Vary the delay so that some publishes end inside the open's window.
        let spin = Instant::now();
        while spin.elapsed() < Duration::from_micros(u64::from(i % 400)) {
            std::hint::spin_loop();
        }
        let data = i.to_le_bytes();
        let opened = match fs.open(ino, libc::O_RDWR, false) {
            Err(FsError::WouldBlock) => fs.open(ino, libc::O_RDWR, true),
            r => r,
        };
        let opened = match opened {
            Ok(o) => o,
            Err(e) => {
                // The staging file was deleted under the open.
                bad.push(format!("{i}: open failed: {e}"));
                continue;
            }
        };
        fs.write(opened.fh, 0, &data).expect("write");
        fs.release(opened.fh);
        let r = fs.open(ino, libc::O_RDONLY, true).expect("open for reading");
        let got = fs.read(r.fh, 0, 64, true).expect("read");
        fs.release(r.fh);
        if got[..4.min(got.len())] != data {
            bad.push(format!("{i}: wrote {data:?}, read back {got:?}"));
        }
    }
    assert!(bad.is_empty(), "{} of 3000 rewrites went wrong: {bad:?}", bad.len());
}

/// (Fixed.) A chmod/chown/utimes of an object changes no directory entry, but its
/// SetAttr op holds the object's name key, so `changed_dirs` counts the parent
/// as changed: the parent's times are sent again, whose SetAttr marks the
/// grandparent, and so on up to the root. A chmod of /a/b/c costs three extra
/// utimensat round trips (b, a, root), one after the other.
#[test]
fn regression_child_setattr_does_not_retime_ancestors() {
    let dir = TempDir::new().expect("tempdir");
    let m = regression_mount(dir.path());
    let fs = &m.fs;
    let a = fs.mkdir(ROOT, name("a"), 0o755, 0, 0, 0, true).expect("mkdir a");
    let b = fs.mkdir(a.ino, name("b"), 0o755, 0, 0, 0, true).expect("mkdir b");
    let c = fs.mkdir(b.ino, name("c"), 0o755, 0, 0, 0, true).expect("mkdir c");
    settle(fs);
    let before = fs.backend.stats().snapshot();
    fs.setattr(
        c.ino,
        SetAttr {
            perm: Some(0o700),
            ..Default::default()
        },
        true,
    )
    .expect("chmod");
    settle(fs);
    let after = fs.backend.stats().snapshot();
    let ops: Vec<(&str, u64)> = ["chmod", "chown", "utimens"]
        .into_iter()
        .map(|k| (k, after.get(k) - before.get(k)))
        .collect();
    assert_eq!(
        ops,
        vec![("chmod", 1), ("chown", 0), ("utimens", 0)],
        "backend ops for one chmod"
    );
}

/// A publish is queued (with the file's attributes of that moment), the file
/// is then truncated and chmod'ed, and a second publish is queued before the
/// first runs. The first publish copies the content as it is when it runs,
/// finds the generation unchanged since the second was queued, and
/// `publish_done` turns the content back to `Remote` and drops the staging
/// file; the second publish then finds no staging file and does nothing. The
/// backend keeps the first publish's (old) mode and mtime.
#[test]
fn regression_second_publish_keeps_latest_attrs() {
    daemon_umask();
    let dir = TempDir::new().expect("tempdir");
    let cfg = Cfg {
        debounce_zero: true,
        exclusive: true,
        workers: 1,
        plus: false,
        eager_forget: false,
        free_running: true,
    };
    let m = Mount::new(dir.path(), &cfg, 0);
    let fs = &m.fs;
    m.sched.set_paused(true);
    let ino = put(fs, "f", b"12345");
    fs.tick(true); // publish 1, with mode 0644
    let change = |ch: SetAttr| fs.setattr(ino, ch, true).expect("setattr");
    change(SetAttr {
        size: Some(2),
        ..Default::default()
    });
    let a = change(SetAttr {
        perm: Some(0o600),
        ..Default::default()
    });
    fs.tick(true); // publish 2, with mode 0600 and the truncate's mtime
    m.sched.set_paused(false);
    sync_ok(fs);
    let meta = std::fs::metadata(dir.path().join("f")).expect("stat");
    assert_eq!(std::fs::read(dir.path().join("f")).expect("read"), b"12");
    assert_eq!(meta.mode() & 0o7777, 0o600, "mode");
    assert_eq!(
        Timespec {
            sec: meta.mtime(),
            nsec: meta.mtime_nsec() as u32
        },
        a.attr.mtime,
        "mtime"
    );
}

/// (Fixed.) The publish of a new file is queued (the file now counts as on the
/// backend), then the file is renamed (a Rename op queued behind the publish)
/// and removed; once the kernel forgets it, its staging file is deleted. The
/// publish then finds no data and creates nothing, and the Rename fails with
/// ENOENT: `sync` reports a permanent failure for a file that no longer exists.
#[test]
fn regression_rename_before_removal_of_unpublished_file() {
    let dir = TempDir::new().expect("tempdir");
    let m = regression_mount(dir.path());
    let fs = &m.fs;
    m.sched.set_paused(true);
    let ino = put(fs, "c", b""); // the kernel holds 1 reference
    fs.tick(true); // the publish of "c" is queued
    fs.rename(ROOT, name("c"), ROOT, name("d"), 0, true).expect("rename");
    fs.unlink(ROOT, name("d"), true).expect("unlink");
    fs.forget(ino, 1);
    m.sched.set_paused(false);
    sync_ok(fs);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "backend: {left:?}");
}

/// (Fixed.) A file's publish is queued, then the file is opened for writing again
/// before the publish runs. The publish refuses to copy while a writer has the
/// file open (EAGAIN, retried with backoff), so it stays queued until the file
/// is closed, and `sync`, which should report the open file and return, waits
/// for it until its deadline (forever without one).
#[test]
fn regression_sync_with_a_reopened_file_whose_publish_is_queued() {
    let dir = TempDir::new().expect("tempdir");
    let m = regression_mount(dir.path());
    let fs = &m.fs;
    m.sched.set_paused(true);
    let ino = put(fs, "f", b"1");
    fs.tick(true); // the publish of "f" is queued
    let opened = fs.open(ino, libc::O_RDWR, true).expect("open");
    m.sched.set_paused(false);
    let r = fs.sync(Some(Instant::now() + Duration::from_secs(3)));
    fs.release(opened.fh);
    assert!(r.complete, "sync: {r:?}");
    assert!(r.failures.is_empty(), "sync: {r:?}");
}

/// A file's publish is queued; the file is opened for writing again and
/// written, renamed, and closed. The queued publish (held back while the
/// file is open) finds the content changed and publishes nothing; the
/// rename behind it must not then fail on the missing source.
#[test]
fn rename_of_a_reopened_file_whose_publish_is_queued() {
    let dir = TempDir::new().expect("tempdir");
    let m = regression_mount(dir.path());
    let fs = &m.fs;
    m.sched.set_paused(true);
    let ino = put(fs, "f", b"1");
    fs.tick(true); // the publish of "f" is queued
    let opened = fs.open(ino, libc::O_RDWR, true).expect("open");
    fs.write(opened.fh, 1, b"2").expect("write");
    fs.rename(ROOT, name("f"), ROOT, name("g"), 0, true).expect("rename");
    m.sched.set_paused(false);
    std::thread::sleep(Duration::from_millis(300)); // the publish waits for the writer
    fs.release(opened.fh);
    fs.tick(true);
    sync_ok(fs);
    assert_eq!(std::fs::read(dir.path().join("g")).expect("read g"), b"12");
    assert!(!dir.path().join("f").exists());
}

/// A new file's publish is running (copying 64 MiB) when the file is opened
/// for writing again; then it is renamed. The publish used to give up as
/// "superseded" (the content changed under the copy), so the file never
/// reached the backend under its old name, and the rename queued behind
/// the publish failed for good with ENOENT: `sync` reported it, although
/// the file's next publish then created it under the new name. The publish
/// now waits for the writer and runs again. (Found by the model with the
/// `ReopenedFileBlocksSync` steering off.)
#[test]
fn regression_rename_after_a_publish_that_lost_its_content_mid_copy() {
    let dir = TempDir::new().expect("tempdir");
    let m = regression_mount(dir.path());
    let fs = &m.fs;
    m.sched.set_paused(true);
    let big = vec![7u8; 64 << 20];
    let ino = put(fs, "f", &big);
    fs.tick(true); // the publish of "f" is queued
    m.sched.set_paused(false);
    let t = Instant::now();
    while m.sched.in_flight() == 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the publish never started");
        std::thread::yield_now();
    }
    let opened = fs.open(ino, libc::O_RDWR, true).expect("open"); // mid-copy
    fs.write(opened.fh, 0, b"new").expect("write");
    fs.rename(ROOT, name("f"), ROOT, name("g"), 0, true).expect("rename");
    fs.release(opened.fh);
    fs.tick(true);
    sync_ok(fs);
    let g = std::fs::read(dir.path().join("g")).expect("read g");
    assert_eq!((g.len(), &g[..3]), (64 << 20, &b"new"[..]));
    assert!(!dir.path().join("f").exists());
}

/// (Fixed.) A kill -9 lands while a publish runs: its temp file is in the directory,
/// and the directory's times (an acknowledged utimes) are queued behind the
/// publish. Recovery replays the publish and then the times, and only then
/// removes the dead mount's temp file: that unlink sets the directory's
/// mtime to the time of recovery. The utimes is lost, on the backend and in
/// the new overlay (which loads the directory from the backend).
#[test]
fn regression_orphan_cleanup_keeps_directory_times() {
    daemon_umask();
    let backend = TempDir::new().expect("tempdir");
    let cache = TempDir::new().expect("tempdir");
    let cfg = Cfg {
        debounce_zero: false,
        exclusive: true,
        workers: 1,
        plus: false,
        eager_forget: false,
        free_running: true,
    };
    let m = Mount::start(backend.path(), cache.path(), &cfg, 0);
    m.sched.set_paused(true);
    put(&m.fs, "a", b"data");
    let t = mtime_of(0);
    m.fs.setattr(
        ROOT,
        SetAttr {
            atime: Some(t),
            mtime: Some(t),
            ..Default::default()
        },
        true,
    )
    .expect("utimes /");
    m.fs.tick(true); // queues the publish of "a" and, behind it, the times of "/"
    // kill -9 while the publish runs: it has created its temp file.
    let temp = backend.path().join(format!("{}1", m.temp_prefix));
    m.kill();
    std::fs::write(&temp, b"partial").expect("temp file");
    let m = Mount::start(backend.path(), cache.path(), &cfg, 1);
    assert_eq!(m.settle()["orphans_removed"].as_u64(), Some(1), "{}", m.settle());
    assert!(!temp.exists());
    assert_eq!(std::fs::read(backend.path().join("a")).expect("read a"), b"data");
    let meta = std::fs::metadata(backend.path()).expect("stat /");
    let backend_mtime = Timespec {
        sec: meta.mtime(),
        nsec: meta.mtime_nsec() as u32,
    };
    let overlay_mtime = m.fs.getattr(ROOT, true).expect("getattr /").attr.mtime;
    assert_eq!((backend_mtime, overlay_mtime), (t, t), "mtime of / (backend, overlay)");
}

/// A file is rewritten and its publish queued, then the daemon is killed;
/// before the remount another client replaces the file on the backend. The
/// recovered publish must not overwrite that client's file (the expected
/// backend inode is journaled with the op): the backend's version stays and
/// this mount's is kept aside. Before the journal carried it, the replay
/// only knew the file found at the remount and replaced it.
#[test]
fn regression_conflict_check_survives_a_crash() {
    theirs_stays_after_a_crash(true, false);
}

/// As `regression_conflict_check_survives_a_crash`, with the other client
/// rewriting `f` in place (same inode): the journal carries the size and
/// mtime this mount knew too (format 5), so the recovered publish notices.
#[test]
fn an_in_place_change_before_the_remount_is_caught_by_the_recovered_publish() {
    theirs_stays_after_a_crash(true, true);
    theirs_stays_after_a_crash(false, true);
}

/// The same for a file whose publish was not queued yet at the crash (still
/// in its debounce): its pending state did not say which backend object its
/// publish replaces, so the recovered publish took whatever the name held
/// at the remount for the file it was meant to replace, and overwrote the
/// other client's version. (Fixed: journaled with the state, format 4.)
#[test]
fn regression_conflict_check_of_an_unqueued_file_survives_a_crash() {
    theirs_stays_after_a_crash(false, false);
}

/// `f` is rewritten through the mount (its publish `queued` at the kill, or
/// still in its debounce), the daemon is killed, another client replaces
/// `f` on the backend (or rewrites it `in_place`), and a new mount
/// recovers: the other client's file stays, and this mount's version is
/// kept aside once.
fn theirs_stays_after_a_crash(queued: bool, in_place: bool) {
    daemon_umask();
    let backend = TempDir::new().expect("tempdir");
    let cache = TempDir::new().expect("tempdir");
    std::fs::write(backend.path().join("f"), b"old").expect("write");
    let cfg = Cfg {
        debounce_zero: false,
        exclusive: true,
        workers: 1,
        plus: false,
        eager_forget: false,
        free_running: true,
    };
    let m = Mount::start(backend.path(), cache.path(), &cfg, 0);
    let f = m.fs.lookup(ROOT, name("f"), true).expect("lookup f");
    if queued {
        m.sched.set_paused(true);
    }
    let fh = m.fs.open(f.ino, libc::O_RDWR | libc::O_TRUNC, true).expect("open").fh;
    m.fs.write(fh, 0, b"mine").expect("write");
    m.fs.release(fh); // closed: waits out its (hour-long) debounce
    if queued {
        m.fs.tick(true); // the publish of f is queued
    }
    m.kill();
    if in_place {
        // Another client rewrites f (same inode, same size) while no daemon runs.
        std::fs::write(backend.path().join("f"), b"the").expect("write");
        std::fs::write(backend.path().join("f"), b"theirs").expect("write");
    } else {
        // Another client replaces f (a new inode) while no daemon runs.
        std::fs::write(backend.path().join("f.theirs"), b"theirs").expect("write");
        std::fs::rename(backend.path().join("f.theirs"), backend.path().join("f")).expect("rename");
    }
    let m = Mount::start(backend.path(), cache.path(), &cfg, 1);
    if !queued {
        m.fs.tick(true);
    }
    m.settle();
    assert_eq!(std::fs::read(backend.path().join("f")).expect("read f"), b"theirs");
    let kept: Vec<_> = walk_files(&cache.path().join("lost+found"))
        .into_iter()
        .filter(|p| std::fs::read(p).is_ok_and(|d| d == b"mine"))
        .collect();
    assert_eq!(kept.len(), 1, "this mount's version is kept aside once: {kept:?}");
}

/// A file's publish is queued; the file is opened again with O_TRUNC (and
/// stays open), then rsync replaces it (temp file renamed over it); then
/// the daemon is killed. The journaled publish names a staged size (1)
/// that the open changed (0), and the file's pending state is gone (it
/// has no name), so recovery took the size difference for data lost in a
/// machine crash and reported the publish as failed. The later pending
/// state of the same staged file, journaled at the open, says otherwise:
/// the publish is superseded. (Found by the crash property with the
/// `ReopenedFileBlocksSync` steering off.)
#[test]
fn regression_publish_of_a_file_reopened_then_replaced_is_superseded_after_a_crash() {
    daemon_umask();
    let backend = TempDir::new().expect("tempdir");
    let cache = TempDir::new().expect("tempdir");
    let cfg = Cfg {
        debounce_zero: false,
        exclusive: false,
        workers: 1,
        plus: false,
        eager_forget: false,
        free_running: true,
    };
    let m = Mount::start(backend.path(), cache.path(), &cfg, 0);
    m.sched.set_paused(true);
    let old = put(&m.fs, "b", b"\0");
    m.fs.tick(true); // the publish of b (1 byte) is queued
    let _open = m.fs.open(old, libc::O_RDWR | libc::O_TRUNC, true).expect("open");
    put(&m.fs, ".b.XXXXXX", b"");
    m.fs.rename(ROOT, name(".b.XXXXXX"), ROOT, name("b"), 0, true)
        .expect("rename");
    m.kill();
    let m = Mount::start(backend.path(), cache.path(), &cfg, 1);
    m.fs.tick(true);
    let recovery = m.settle();
    assert_eq!(recovery["failed"], 0, "recovery: {recovery}");
    sync_ok(&m.fs);
    assert_eq!(std::fs::read(backend.path().join("b")).expect("read b"), b"");
}

/// A hard-linked file (/c and /b/c) is replaced under one name by rsync
/// while the other name stays, on a mount that revalidates every access.
/// Taking the file's link count afresh from the backend (which still had
/// both names: the replacing publish was queued) counted /c as a name in a
/// directory not loaded yet, so /b/c showed nlink 2. (Found by the crash
/// property; such unseen names are now only ever counted down.)
#[test]
fn regression_nlink_of_a_link_whose_twin_was_replaced() {
    daemon_umask();
    let cfg = Cfg {
        debounce_zero: false,
        exclusive: false,
        workers: 1,
        plus: false,
        eager_forget: false,
        free_running: false,
    };
    let ops = vec![
        Op::Create {
            path: p(&["c"]),
            excl: false,
            trunc: false,
            data: vec![],
            keep: None,
            perm: 0o644,
            owner: 0,
        },
        Op::Crash(Crash {
            queue: true,
            run_us: None,
            lose_done: false,
            temps: false,
        }),
        Op::Mkdir {
            path: p(&["b"]),
            perm: 0o755,
            owner: 0,
        },
        Op::Link {
            from: p(&["c"]),
            to: p(&["b", "c"]),
        },
        Op::Open {
            path: p(&["a"]),
            trunc: false,
            slot: 0,
        },
        Op::RsyncPut {
            path: p(&["c"]),
            data: vec![],
            perm: 0o644,
            t: 0,
        },
        Op::Rename {
            from: p(&["a"]),
            to: p(&["b", "c"]),
            noreplace: false,
        },
    ];
    run_case(cfg, &ops);
}

/// A file's publish is queued, the file is opened for writing (and stays
/// open), then removed: the publish waited for the writer although the
/// file had no name left, and `sync` never completed (the directory's times
/// waited behind it, and the file, nameless, was not reported as open).
/// (Found by the model with the `ReopenedFileBlocksSync` steering off.)
#[test]
fn regression_sync_with_a_removed_open_file_whose_publish_is_queued() {
    let dir = TempDir::new().expect("tempdir");
    let m = regression_mount(dir.path());
    let fs = &m.fs;
    m.sched.set_paused(true);
    let ino = put(fs, "d", b"");
    fs.tick(true); // the publish of "d" is queued
    let opened = fs.open(ino, libc::O_RDWR, true).expect("open");
    fs.unlink(ROOT, name("d"), true).expect("unlink");
    m.sched.set_paused(false);
    let r = fs.sync(Some(Instant::now() + Duration::from_secs(5)));
    fs.release(opened.fh);
    assert!(r.complete && r.failures.is_empty(), "sync: {r:?}");
    assert!(!dir.path().join("d").exists());
}

/// A file's publish is queued, then its mtime is set (utimes: a queued
/// in-place change), then it is rewritten. The publish recorded the version
/// it left (its own mtime), although the queued utimes changed it after, so
/// the rewrite's publish took the file for one another client had changed
/// in place: a false conflict. (Found by the remount property.)
#[test]
fn regression_retime_queued_behind_a_publish_is_no_conflict() {
    let cfg = Cfg {
        debounce_zero: false,
        exclusive: true,
        workers: 1,
        plus: false,
        eager_forget: false,
        free_running: false,
    };
    let ops = vec![
        Op::RsyncPut {
            path: p(&["b"]),
            data: vec![],
            perm: 0o644,
            t: 0,
        },
        Op::Link {
            from: p(&["b"]),
            to: p(&["c"]),
        },
        Op::TickForce,
        Op::Utimes { path: p(&["b"]), t: 1 },
        Op::Create {
            path: p(&["b"]),
            excl: false,
            trunc: true,
            data: vec![],
            keep: None,
            perm: 0o644,
            owner: 0,
        },
        Op::Remount,
    ];
    run_case(cfg, &ops);
}

/// A hard-linked file (/c and /a on the backend) is replaced at /c by rsync
/// (the publish will check that /c still holds the old file, with the
/// version loaded), then the old file's mtime is set through /a (a queued
/// in-place utimes, which runs before that publish). The publish found the
/// mtime changed and took it for another client's in-place change: a false
/// conflict. A version recorded before this mount set the file's mtime
/// itself is no longer relied on (`Namespace::checkable`). (Found by the
/// crash property with all steering off.)
#[test]
fn regression_crash_after_utimes_of_a_replaced_hard_link() {
    let cfg = Cfg {
        debounce_zero: false,
        exclusive: false,
        workers: 1,
        plus: false,
        eager_forget: false,
        free_running: false,
    };
    let ops = vec![
        Op::Crash(Crash {
            queue: false,
            run_us: None,
            lose_done: false,
            temps: false,
        }),
        Op::Create {
            path: p(&["c"]),
            excl: false,
            trunc: false,
            data: vec![],
            keep: None,
            perm: 0o644,
            owner: 0,
        },
        Op::Link {
            from: p(&["c"]),
            to: p(&["a"]),
        },
        Op::Remount,
        Op::RsyncPut {
            path: p(&["c"]),
            data: vec![],
            perm: 0o644,
            t: 0,
        },
        Op::Utimes { path: p(&["a"]), t: 0 },
    ];
    run_case(cfg, &ops);
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A file in a directory whose mtime was set (as rsync -a leaves it) is
/// rewritten in place, and the daemon is killed while the publish is queued.
/// Recovery replays the publish (a temp file renamed over the file), which
/// sets the directory's mtime on the backend to the time of recovery. The
/// running daemon re-applies the overlay's times after such an op
/// (`entries_changed_on_backend`); the replay does not, and the journal has
/// no pending state for the directory. Its mtime, which nothing acknowledged
/// changed, was lost (on the backend and in the new overlay). (Fixed.)
#[test]
fn regression_replay_keeps_directory_mtime() {
    daemon_umask();
    let backend = TempDir::new().expect("tempdir");
    let cache = TempDir::new().expect("tempdir");
    std::fs::create_dir(backend.path().join("d")).expect("mkdir");
    std::fs::write(backend.path().join("d/f"), b"old").expect("write");
    let t = mtime_of(0);
    std::fs::File::open(backend.path().join("d"))
        .and_then(|f| f.set_modified(t.to_system_time()))
        .expect("set mtime of d");
    let cfg = Cfg {
        debounce_zero: false,
        exclusive: true,
        workers: 1,
        plus: false,
        eager_forget: false,
        free_running: true,
    };
    let m = Mount::start(backend.path(), cache.path(), &cfg, 0);
    let fs = &m.fs;
    let d = fs.lookup(ROOT, name("d"), true).expect("lookup d");
    let f = fs.lookup(d.ino, name("f"), true).expect("lookup f");
    m.sched.set_paused(true);
    let fh = fs.open(f.ino, libc::O_RDWR, true).expect("open").fh;
    fs.write(fh, 0, b"new").expect("write");
    fs.release(fh);
    fs.tick(true); // the publish of d/f is queued
    m.kill();
    let m = Mount::start(backend.path(), cache.path(), &cfg, 1);
    assert_eq!(m.settle()["ops"].as_u64(), Some(1), "{}", m.settle());
    assert_eq!(std::fs::read(backend.path().join("d/f")).expect("read"), b"new");
    let meta = std::fs::metadata(backend.path().join("d")).expect("stat d");
    let backend_mtime = Timespec {
        sec: meta.mtime(),
        nsec: meta.mtime_nsec() as u32,
    };
    let d = m.fs.lookup(ROOT, name("d"), true).expect("lookup d");
    assert_eq!((backend_mtime, d.attr.mtime), (t, t), "mtime of d (backend, overlay)");
}

/// (Fixed.) The daemon is killed while the publish of the new file `a/f` runs (its
/// temp file is in `a` already), with `rm a/f; rmdir a` queued behind it.
/// Recovery replays the publish, the unlink and the rmdir, which fails with
/// ENOTEMPTY: the dead mount's temp file is still in `a`, removed only after
/// the replay. The acknowledged rmdir is lost: `a` stays on the backend
/// (and recovery reports a failure).
#[test]
fn regression_orphan_blocks_a_replayed_rmdir() {
    daemon_umask();
    let backend = TempDir::new().expect("tempdir");
    let cache = TempDir::new().expect("tempdir");
    std::fs::create_dir(backend.path().join("a")).expect("mkdir");
    let cfg = Cfg {
        debounce_zero: false,
        exclusive: true,
        workers: 1,
        plus: false,
        eager_forget: false,
        free_running: true,
    };
    let m = Mount::start(backend.path(), cache.path(), &cfg, 0);
    let fs = &m.fs;
    let a = fs.lookup(ROOT, name("a"), true).expect("lookup a");
    m.sched.set_paused(true);
    let (_, opened) = fs
        .create(a.ino, name("f"), 0o644, 0, libc::O_WRONLY | libc::O_CREAT, 0, 0, true)
        .expect("create a/f");
    fs.write(opened.fh, 0, b"data").expect("write");
    fs.release(opened.fh);
    fs.tick(true); // the publish of a/f is queued
    fs.unlink(a.ino, name("f"), true).expect("rm a/f");
    fs.rmdir(ROOT, name("a"), true).expect("rmdir a");
    // kill -9 while the publish runs: it has created its temp file in a.
    let temp = format!("{}1", m.temp_prefix);
    m.kill();
    std::fs::write(backend.path().join("a").join(&temp), b"partial").expect("temp file");
    let m = Mount::start(backend.path(), cache.path(), &cfg, 1);
    assert_eq!(m.settle()["failed"].as_u64(), Some(0), "{}", m.settle());
    assert!(!backend.path().join("a").exists(), "a is still on the backend");
}

/// (Fixed.) The daemon is killed while the publish of `a/f` runs (its temp file is in
/// `a` already) and a rename of `a` to `b` waits behind it. Recovery replays
/// the publish and the rename, which moves the dead mount's temp file to
/// `b`, and then looks for temp files in `a`, the directory the publish
/// named: there are none. The temp file stays in `b` on the backend for
/// good (hidden by the overlay, so `b` can never be removed through the
/// mount: rmdir fails on the backend with ENOTEMPTY).
#[test]
fn regression_orphan_in_a_renamed_directory_is_removed() {
    daemon_umask();
    let backend = TempDir::new().expect("tempdir");
    let cache = TempDir::new().expect("tempdir");
    std::fs::create_dir(backend.path().join("a")).expect("mkdir");
    let cfg = Cfg {
        debounce_zero: false,
        exclusive: true,
        workers: 1,
        plus: false,
        eager_forget: false,
        free_running: true,
    };
    let m = Mount::start(backend.path(), cache.path(), &cfg, 0);
    let fs = &m.fs;
    let a = fs.lookup(ROOT, name("a"), true).expect("lookup a");
    m.sched.set_paused(true);
    let (_, opened) = fs
        .create(a.ino, name("f"), 0o644, 0, libc::O_WRONLY | libc::O_CREAT, 0, 0, true)
        .expect("create a/f");
    fs.write(opened.fh, 0, b"data").expect("write");
    fs.release(opened.fh);
    fs.tick(true); // the publish of a/f is queued
    fs.rename(ROOT, name("a"), ROOT, name("b"), 0, true)
        .expect("rename a b");
    // kill -9 while the publish runs: it has created its temp file in a.
    let temp = format!("{}1", m.temp_prefix);
    m.kill();
    std::fs::write(backend.path().join("a").join(&temp), b"partial").expect("temp file");
    let m = Mount::start(backend.path(), cache.path(), &cfg, 1);
    m.settle(); // the recovered ops run in the background
    assert_eq!(std::fs::read(backend.path().join("b/f")).expect("read b/f"), b"data");
    let left: Vec<_> = std::fs::read_dir(backend.path().join("b"))
        .expect("list b")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("f")], "backend b/ ({})", m.settle());
}

/// (Fixed.) `mkdir -m 2775 d` (group 1000), `chmod 755 d`, then a directory and a
/// symlink are created in `d` by root. The overlay gives both root's group
/// (`d` is no longer setgid). On the backend, `d`'s chmod waits until the
/// work inside `d` is done, so both are created while the backend's `d` is
/// still setgid: they get group 1000 (and the directory the setgid bit), and
/// the owner 0:0 is never applied because it equals the daemon's own ids.
/// Likewise after `chown 0:0` of a setgid directory of group 1000.
#[test]
fn regression_new_objects_in_a_setgid_directory_whose_mode_or_group_changed() {
    daemon_umask();
    let dir = TempDir::new().expect("tempdir");
    let m = regression_mount(dir.path());
    let fs = &m.fs;
    let d = fs.mkdir(ROOT, name("d"), 0o2775, 0, 1000, 1000, true).expect("mkdir d");
    fs.setattr(
        d.ino,
        SetAttr {
            perm: Some(0o755),
            ..Default::default()
        },
        true,
    )
    .expect("chmod d");
    let sub = fs.mkdir(d.ino, name("sub"), 0o755, 0, 0, 0, true).expect("mkdir d/sub");
    let link = fs
        .symlink(d.ino, name("l"), name("t"), 0, 0, true)
        .expect("symlink d/l");
    assert_eq!((sub.attr.perm, sub.attr.gid, link.attr.gid), (0o755, 0, 0), "overlay");
    // The same after `chown 0:0 e` of a setgid directory `e` of group 1000.
    let e = fs.mkdir(ROOT, name("e"), 0o2775, 0, 1000, 1000, true).expect("mkdir e");
    fs.setattr(
        e.ino,
        SetAttr {
            uid: Some(0),
            gid: Some(0),
            ..Default::default()
        },
        true,
    )
    .expect("chown e");
    let esub = fs.mkdir(e.ino, name("sub"), 0o755, 0, 0, 0, true).expect("mkdir e/sub");
    assert_eq!((esub.attr.perm, esub.attr.gid), (0o2755, 0), "overlay");
    sync_ok(fs);
    let meta = |p: &str| std::fs::symlink_metadata(dir.path().join(p)).expect("stat");
    let (sub, link, esub) = (meta("d/sub"), meta("d/l"), meta("e/sub"));
    assert_eq!(
        (format!("{:o}", sub.mode() & 0o7777), sub.gid(), link.gid(), esub.gid()),
        ("755".to_string(), 0, 0, 0),
        "backend: mode and group of d/sub, group of d/l, group of e/sub"
    );
}

/// (Fixed.) `ln d b` (both on the backend), then rsync replaces `b` (a temp file
/// renamed over it; not published yet), then `mv d b`. The overlay drops the
/// unpublished `b` and renames `d` over it: only `b` is left, with `d`'s
/// content. The backend still has `d` and `b` as links of one file, and the
/// queued rename(2) of one link onto another of the same file does nothing:
/// `d` stays on the backend.
#[test]
fn regression_rename_onto_a_replaced_hard_link_removes_the_source() {
    daemon_umask();
    let dir = TempDir::new().expect("tempdir");
    let cfg = Cfg {
        debounce_zero: false,
        exclusive: true,
        workers: 2,
        plus: false,
        eager_forget: false,
        free_running: true,
    };
    let m = Mount::new(dir.path(), &cfg, 0);
    let fs = &m.fs;
    let d = put(fs, "d", b"old");
    fs.link(d, ROOT, name("b"), true).expect("ln d b");
    sync_ok(fs);
    put(fs, ".b.Xq7Tz1", b"new");
    fs.rename(ROOT, name(".b.Xq7Tz1"), ROOT, name("b"), 0, true)
        .expect("mv .b.Xq7Tz1 b");
    fs.rename(ROOT, name("d"), ROOT, name("b"), 0, true).expect("mv d b");
    sync_ok(fs);
    let mut left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec!["b".to_string()], "backend");
    assert_eq!(std::fs::read(dir.path().join("b")).expect("read b"), b"old");
}

/// (Fixed.) A setuid file (new, so its content is unpublished) is written to, which
/// clears its setuid bit, and the daemon is killed while the file is still
/// open. The journal still has the file's mode from before the write (a
/// write journals the file's state only when it makes the file dirty, and
/// this one already was), so after recovery the file is setuid again: in
/// the new overlay and, once published, on the backend.
#[test]
fn regression_write_clearing_setuid_survives_a_crash() {
    daemon_umask();
    let backend = TempDir::new().expect("tempdir");
    let cache = TempDir::new().expect("tempdir");
    let cfg = Cfg {
        debounce_zero: false,
        exclusive: true,
        workers: 1,
        plus: false,
        eager_forget: false,
        free_running: true,
    };
    let m = Mount::start(backend.path(), cache.path(), &cfg, 0);
    let (a, opened) =
        m.fs.create(ROOT, name("f"), 0o4755, 0, libc::O_WRONLY | libc::O_CREAT, 0, 0, true)
            .expect("create");
    assert_eq!(a.attr.perm, 0o4755);
    m.fs.write(opened.fh, 0, b"x").expect("write");
    let written = m.fs.getattr(a.ino, true).expect("getattr").attr.perm;
    assert_eq!(format!("{written:o}"), "755", "mode after the write");
    m.kill(); // the file is still open
    let m = Mount::start(backend.path(), cache.path(), &cfg, 1);
    let f = m.fs.lookup(ROOT, name("f"), true).expect("lookup f");
    assert_eq!(
        format!("{:o}", f.attr.perm),
        "755",
        "mode after recovery ({})",
        m.settle()
    );
}

/// The same in a subdirectory (its times were journaled only once the
/// publish was in the scheduler, and the tick that queued the publish
/// cleared them again as having nothing to apply).
#[test]
fn regression_crash_mid_publish_keeps_subdirectory_times() {
    let s = p(&["s"]);
    let d = p(&["s", "d"]);
    let ops = vec![
        Op::Mkdir {
            path: s.clone(),
            perm: 0o755,
            owner: 0,
        },
        Op::Create {
            path: d.clone(),
            excl: false,
            trunc: false,
            data: vec![],
            keep: None,
            perm: 0o644,
            owner: 0,
        },
        Op::Utimes { path: s.clone(), t: 0 },
        Op::Remount,
        Op::Rewrite {
            path: d.clone(),
            trunc: false,
            offset: 0,
            data: vec![0],
        },
        Op::Crash(Crash {
            queue: true,
            run_us: None,
            lose_done: false,
            temps: true,
        }),
    ];
    let cfg = Cfg {
        debounce_zero: false,
        exclusive: false,
        workers: 1,
        plus: false,
        eager_forget: false,
        free_running: false,
    };
    run_case(cfg, &ops);
}

/// (Fixed.) A publish in flight at the kill has created its temp file in
/// the directory, which changed the directory's mtime on the backend;
/// recovery put back the times the directory had when it started (those of
/// the temp file's creation), not the overlay's (here set by utimes and
/// already applied), because the journal held no pending state for a
/// directory whose times were already on the backend. Queuing a publish now
/// journals its directories' times.
#[test]
fn regression_crash_mid_publish_keeps_directory_times() {
    let d = p(&["d"]);
    let ops = vec![
        Op::Create {
            path: d.clone(),
            excl: false,
            trunc: false,
            data: vec![],
            keep: None,
            perm: 0o644,
            owner: 0,
        },
        Op::Utimes { path: p(&[]), t: 0 },
        Op::Remount,
        Op::Rewrite {
            path: d.clone(),
            trunc: false,
            offset: 0,
            data: vec![0],
        },
        Op::Crash(Crash {
            queue: true,
            run_us: None,
            lose_done: false,
            temps: true,
        }),
    ];
    let cfg = Cfg {
        debounce_zero: false,
        exclusive: false,
        workers: 1,
        plus: false,
        eager_forget: false,
        free_running: false,
    };
    run_case(cfg, &ops);
}

/// (Fixed.) `b` (published) gets a hard link `c`; rsync replaces `b` with a
/// new file, whose publish is queued; then `mv c b`. The new file is freed
/// at once (no kernel reference left), so its publish finds no data and
/// does nothing, and the queued backend rename runs between two links of
/// one file, which rename(2) leaves alone: `c` stayed on the backend. A
/// backend rename now drops the old name when both names are one file.
/// (Found by the crash property; no crash is needed.)
#[test]
fn regression_rename_between_links_after_a_superseded_publish() {
    let ops = vec![
        Op::Create {
            path: p(&["b"]),
            excl: false,
            trunc: true,
            data: vec![249, 71, 76, 67, 70],
            keep: Some(0),
            perm: 1517,
            owner: 1000,
        },
        Op::Remount,
        Op::Link {
            from: p(&["b"]),
            to: p(&["c"]),
        },
        Op::RsyncPut {
            path: p(&["b"]),
            data: vec![],
            perm: 2541,
            t: 4,
        },
        Op::TickForce,
        Op::Rename {
            from: p(&["c"]),
            to: p(&["b"]),
            noreplace: false,
        },
    ];
    let cfg = Cfg {
        debounce_zero: false,
        exclusive: false,
        workers: 1,
        plus: false,
        eager_forget: true,
        free_running: true,
    };
    run_case(cfg, &ops);
}

/// (Fixed.) A symlink is created and its op runs, but the kill comes before
/// its done mark reaches the journal. Recovery found the link already there
/// and queued its create again, which replaces an existing link with a new
/// one (a new backend inode the overlay did not know); the next unlink of
/// the link then saw "another client's" file and left it. Recovery now
/// queues only the link's attributes.
#[test]
fn regression_recovered_symlink_keeps_its_inode() {
    let ops = vec![
        Op::Symlink {
            path: p(&["a"]),
            target: "/abs/target",
        },
        Op::Crash(Crash {
            queue: false,
            run_us: Some(396),
            lose_done: true,
            temps: false,
        }),
        Op::Unlink { path: p(&["a"]) },
    ];
    let cfg = Cfg {
        debounce_zero: false,
        exclusive: false,
        workers: 1,
        plus: false,
        eager_forget: true,
        free_running: true,
    };
    run_case(cfg, &ops);
}

/// (Fixed.) `ln c b` (published), then rsync replaces `c` (temp file
/// renamed over it) and `b`'s mtime is set in place, and the daemon is
/// killed before `c`'s publish: the publish after recovery expected the
/// content version `b`/`c` had before the utimes (journaled with it or with
/// `c`'s pending state), took this mount's own utimes for another client's
/// change, and kept the old file at `c` (found by proptest, shrunk). The
/// running daemon checked the inode number only (`Namespace::retimed`); the
/// journal now says so too (`Retimed`). With `c`'s publish queued before the
/// utimes or after it (at the kill), or not queued (its pending state
/// expects what the name held).
#[test]
fn regression_utimes_of_a_link_whose_other_name_was_replaced_survives_a_crash() {
    let (b, c) = (p(&["b"]), p(&["c"]));
    let put = |path: &P| Op::RsyncPut {
        path: path.clone(),
        data: vec![],
        perm: 0o644,
        t: 0,
    };
    for (queued_before, queue_at_kill) in [(false, true), (false, false), (true, false), (true, true)] {
        let mut ops = vec![
            put(&c),
            Op::Link {
                from: c.clone(),
                to: b.clone(),
            },
            Op::Tick,
            put(&c),
        ];
        if queued_before {
            ops.push(Op::Tick);
        }
        ops.push(Op::Utimes { path: b.clone(), t: 1 });
        ops.push(Op::Crash(Crash {
            queue: queue_at_kill,
            run_us: None,
            lose_done: false,
            temps: false,
        }));
        let cfg = Cfg {
            debounce_zero: true,
            exclusive: false,
            workers: 1,
            plus: false,
            eager_forget: false,
            free_running: false,
        };
        run_case(cfg, &ops);
    }
}
