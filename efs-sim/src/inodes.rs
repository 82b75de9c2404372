//! The inode table: FUSE node ids ↔ backing inodes.
//!
//! Each inode the kernel knows about is reached through an `O_PATH` fd, so
//! renames, hard links and unlinks in the backing directory never invalidate
//! it, and no path is ever resolved twice. Entries are counted like the kernel
//! counts lookups and dropped when `forget` brings the count to zero.
//!
//! The kernel may know far more inodes than the process may hold open files
//! (a tree of 200,000 files; the hard limit here can be 20,000). So, as an NFS
//! server does, an inode keeps a file handle (`name_to_handle_at`) and its fd
//! only while it is among the most recently opened ones ([`FdCache`]); an
//! evicted one is reopened by handle on next use. Where the backing
//! filesystem or the process cannot do handles, fds stay open.
//!
//! Node ids equal the backing inode numbers wherever that is unambiguous (same
//! device as the root, not the root itself), so `st_ino` and readdir's `d_ino`
//! agree with the backing directory; the root is node 1, and anything else
//! (other devices, a backing inode numbered 1) gets a synthetic id.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::sys;

/// FUSE's root node id.
pub const ROOT: u64 = 1;
/// Synthetic node ids start here, far above real inode numbers.
const SYNTHETIC_BASE: u64 = 1 << 63;

/// One backing inode.
pub struct Inode {
    /// The FUSE node id (also reported as `st_ino`).
    pub nodeid: u64,
    /// `st_mode & S_IFMT` of the backing object.
    pub fmt: u32,
    /// An `O_PATH | O_NOFOLLOW` fd on the backing object, while open.
    fd: Mutex<Option<Arc<OwnedFd>>>,
    /// How to open it again once `cache` closed it (None: never closed).
    handle: Option<sys::Handle>,
    cache: Arc<FdCache>,
}

impl Inode {
    /// An `O_PATH` fd on the backing object (reopened by handle if it was
    /// closed; ESTALE if the object is gone).
    pub fn fd(self: &Arc<Self>) -> io::Result<Arc<OwnedFd>> {
        let mut slot = self.fd.lock();
        if let Some(fd) = &*slot {
            return Ok(fd.clone());
        }
        let handle = self
            .handle
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESTALE))?;
        // (open_by_handle_at needs CAP_DAC_READ_SEARCH, which a request
        // running as its caller does not have.)
        let fd = Arc::new(sys::as_server(|| {
            sys::open_by_handle(self.cache.mount.as_fd(), handle)
        })?);
        *slot = Some(fd.clone());
        drop(slot);
        self.cache.opened(self);
        Ok(fd)
    }

    pub fn is_dir(&self) -> bool {
        self.fmt == libc::S_IFDIR
    }
}

/// Whether `inode` is still the object whose handle is `handle` (None: no
/// handle to compare; then whether `inode`'s object still exists).
fn same_object(inode: &Inode, handle: Option<&sys::Handle>) -> bool {
    match (&inode.handle, handle) {
        (Some(old), Some(new)) => old == new,
        // Without handles the inode keeps its fd open: a removed object has
        // no links left.
        _ => match &*inode.fd.lock() {
            Some(fd) => sys::fstat(fd.as_fd()).is_ok_and(|st| st.st_nlink > 0),
            None => false,
        },
    }
}

impl std::fmt::Debug for Inode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inode").field("nodeid", &self.nodeid).finish()
    }
}

/// The open `O_PATH` fds of inodes that can be reopened by handle: at most
/// `limit`, the oldest opened closed first.
pub struct FdCache {
    /// Any fd on the backing filesystem, for `open_by_handle_at`.
    mount: Arc<OwnedFd>,
    /// Whether file handles work here (filesystem and privileges).
    handles: bool,
    limit: usize,
    opened: Mutex<VecDeque<Weak<Inode>>>,
}

impl FdCache {
    /// Notes that `inode` opened its fd; closes the oldest ones beyond the
    /// limit (a request using one keeps its own reference until it is done).
    fn opened(&self, inode: &Arc<Inode>) {
        let mut q = self.opened.lock();
        q.push_back(Arc::downgrade(inode));
        while q.len() > self.limit {
            let Some(old) = q.pop_front() else { break };
            if let Some(old) = old.upgrade()
                && old.handle.is_some()
            {
                *old.fd.lock() = None;
            }
        }
    }
}

struct Slot {
    inode: Arc<Inode>,
    key: (u64, u64),
    nlookup: u64,
}

struct Tables {
    by_id: HashMap<u64, Slot>,
    by_key: HashMap<(u64, u64), u64>,
    next_synthetic: u64,
}

/// The table.
pub struct Inodes {
    root_key: (u64, u64),
    tables: Mutex<Tables>,
    cache: Arc<FdCache>,
}

impl Inodes {
    /// A table holding only the root, `root` being an `O_PATH` handle on the
    /// backing directory and `st` its attributes; at most `max_fds` fds of
    /// other inodes stay open where file handles work.
    pub fn new(root: OwnedFd, st: &libc::stat, max_fds: usize) -> Inodes {
        let key = (st.st_dev, st.st_ino);
        let root = Arc::new(root);
        // open_by_handle_at wants a real fd on the filesystem, not O_PATH.
        // Handles work if the root's can be opened again (the filesystem
        // supports them and the process may use them: CAP_DAC_READ_SEARCH).
        let mount = sys::openat(root.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0);
        let probe = mount.and_then(|m| {
            sys::handle_of(root.as_fd()).and_then(|h| sys::open_by_handle(m.as_fd(), &h))?;
            Ok(m)
        });
        let (mount, handles) = match probe {
            Ok(m) => (Arc::new(m), true),
            Err(e) => {
                tracing::info!(error = %e, "no file handles on the backing filesystem: one open fd per inode the kernel knows");
                (root.clone(), false)
            }
        };
        let cache = Arc::new(FdCache {
            mount,
            handles,
            limit: max_fds.max(16),
            opened: Mutex::new(VecDeque::new()),
        });
        let mut by_id = HashMap::new();
        by_id.insert(
            ROOT,
            Slot {
                inode: Arc::new(Inode {
                    nodeid: ROOT,
                    fmt: st.st_mode & libc::S_IFMT,
                    fd: Mutex::new(Some(root)),
                    handle: None,
                    cache: cache.clone(),
                }),
                key,
                nlookup: 1,
            },
        );
        let mut by_key = HashMap::new();
        by_key.insert(key, ROOT);
        Inodes {
            root_key: key,
            tables: Mutex::new(Tables {
                by_id,
                by_key,
                next_synthetic: SYNTHETIC_BASE,
            }),
            cache,
        }
    }

    /// The inode with node id `nodeid`, if the kernel may still refer to it.
    pub fn get(&self, nodeid: u64) -> Option<Arc<Inode>> {
        self.tables.lock().by_id.get(&nodeid).map(|s| s.inode.clone())
    }

    /// Registers one kernel lookup of the object behind `fd` (attributes `st`)
    /// and returns its inode; `fd` is kept if the object was new.
    ///
    /// An inode number the backing filesystem gave again to a new object
    /// (the old one was removed behind our back, e.g. directly in the backing
    /// directory, as another NFS client would) gets a new node id: the old
    /// one stays stale (ESTALE) for the kernel's references to it, as an NFS
    /// file handle, which carries the inode's generation, does.
    pub fn lookup(&self, fd: OwnedFd, st: &libc::stat) -> Arc<Inode> {
        let key = (st.st_dev, st.st_ino);
        // Objects on other filesystems (mounted inside the backing
        // directory) keep their fds: handles open on the root's.
        let handle = (self.cache.handles && key.0 == self.root_key.0)
            .then(|| sys::handle_of(fd.as_fd()).ok())
            .flatten();
        let mut t = self.tables.lock();
        if let Some(&id) = t.by_key.get(&key)
            && let Some(slot) = t.by_id.get_mut(&id)
            && same_object(&slot.inode, handle.as_ref())
        {
            slot.nlookup += 1;
            return slot.inode.clone();
        }
        let nodeid = if key.0 == self.root_key.0 && key.1 != ROOT && !t.by_id.contains_key(&key.1) {
            key.1
        } else {
            let id = t.next_synthetic;
            t.next_synthetic += 1;
            id
        };
        let evictable = handle.is_some();
        let inode = Arc::new(Inode {
            nodeid,
            fmt: st.st_mode & libc::S_IFMT,
            fd: Mutex::new(Some(Arc::new(fd))),
            handle,
            cache: self.cache.clone(),
        });
        if evictable {
            self.cache.opened(&inode);
        }
        t.by_id.insert(
            nodeid,
            Slot {
                inode: inode.clone(),
                key,
                nlookup: 1,
            },
        );
        t.by_key.insert(key, nodeid);
        inode
    }

    /// Drops `n` kernel lookups of `nodeid`; the root is never dropped.
    pub fn forget(&self, nodeid: u64, n: u64) {
        if nodeid == ROOT {
            return;
        }
        let mut t = self.tables.lock();
        let Some(slot) = t.by_id.get_mut(&nodeid) else {
            return;
        };
        slot.nlookup = slot.nlookup.saturating_sub(n);
        if slot.nlookup == 0 {
            let key = slot.key;
            t.by_id.remove(&nodeid);
            if t.by_key.get(&key) == Some(&nodeid) {
                t.by_key.remove(&key);
            }
        }
    }

    /// The number to show as `d_ino` for a directory entry with backing inode
    /// number `ino` (the node id it has or would get, for same-device entries).
    pub fn display_ino(&self, ino: u64) -> u64 {
        if ino == self.root_key.1 { ROOT } else { ino }
    }

    /// How many inodes the kernel currently holds (the root included).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.tables.lock().by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::BorrowedFd;

    fn open(dir: &std::path::Path) -> (OwnedFd, libc::stat) {
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        let fd = sys::openat(
            // SAFETY: AT_FDCWD is a valid dirfd for the duration of this call.
            unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) },
            &c,
            libc::O_PATH,
            0,
        )
        .unwrap();
        let st = sys::fstat(fd.as_fd()).unwrap();
        (fd, st)
    }

    #[test]
    fn old_fds_are_closed_and_reopened_by_handle() {
        let dir = tempfile::tempdir().unwrap();
        let (root, rst) = open(dir.path());
        let table = Inodes::new(root, &rst, 64);
        if !table.cache.handles {
            eprintln!("skipping: no file handles on {}", dir.path().display());
            return;
        }
        let count_fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let before = count_fds();
        let mut inodes = Vec::new();
        for i in 0..300 {
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, b"x").unwrap();
            let (fd, st) = open(&p);
            inodes.push((table.lookup(fd, &st), st.st_ino));
        }
        // (Other tests run threads in this process too: allow some slack.)
        assert!(count_fds() < before + 64 + 32, "{} fds open", count_fds() - before);
        for (inode, ino) in &inodes {
            let st = sys::fstat(inode.fd().unwrap().as_fd()).unwrap();
            assert_eq!(st.st_ino, *ino, "reopened by handle: the same file");
        }
        std::fs::remove_file(dir.path().join("f0")).unwrap();
        for (inode, _) in &inodes[1..80] {
            drop(inode.fd().unwrap()); // f0's fd goes out of the cache
        }
        let gone = inodes[0].0.fd().map(|_| ()).map_err(|e| e.raw_os_error());
        assert_eq!(gone, Err(Some(libc::ESTALE)), "a removed file is stale, as on NFS");
    }

    /// An inode number given again to a new object (here: the same key
    /// presented with another object's fd) is a new node; the old node id
    /// still names the old object.
    #[test]
    fn a_recycled_inode_number_is_a_new_node() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("old")).unwrap();
        std::fs::create_dir(dir.path().join("new")).unwrap();
        let (root, rst) = open(dir.path());
        let table = Inodes::new(root, &rst, 1000);
        let (old_fd, old_st) = open(&dir.path().join("old"));
        let old = table.lookup(old_fd, &old_st);
        std::fs::remove_dir(dir.path().join("old")).unwrap();
        // The backing filesystem reuses old's inode number for "new".
        let (new_fd, _) = open(&dir.path().join("new"));
        let new = table.lookup(new_fd, &old_st);
        assert_ne!(new.nodeid, old.nodeid, "the removed directory's node id was reused");
        assert!(table.get(old.nodeid).is_some(), "the kernel still holds the old one");
        let (again_fd, _) = open(&dir.path().join("new"));
        let again = table.lookup(again_fd, &old_st);
        assert!(Arc::ptr_eq(&new, &again), "the next lookup finds the new node");
        table.forget(old.nodeid, 1);
        let (third_fd, _) = open(&dir.path().join("new"));
        assert!(Arc::ptr_eq(&new, &table.lookup(third_fd, &old_st)));
    }

    #[test]
    fn lookups_are_counted_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let (root, rst) = open(dir.path());
        let table = Inodes::new(root, &rst, 1000);
        let (f1, st) = open(&dir.path().join("f"));
        let a = table.lookup(f1, &st);
        assert_eq!(a.nodeid, st.st_ino);
        let (f2, st2) = open(&dir.path().join("f"));
        let b = table.lookup(f2, &st2);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(table.len(), 2);
        table.forget(a.nodeid, 1);
        assert!(table.get(a.nodeid).is_some());
        table.forget(a.nodeid, 1);
        assert!(table.get(a.nodeid).is_none());
        table.forget(ROOT, 100);
        assert!(table.get(ROOT).is_some());
        assert_eq!(table.display_ino(rst.st_ino), ROOT);
    }
}
