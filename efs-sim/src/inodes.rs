//! The inode table: FUSE node ids ↔ backing inodes.
//!
//! Each inode the kernel knows about is held by an `O_PATH` fd, so renames,
//! hard links and unlinks in the backing directory never invalidate it, and no
//! path is ever resolved twice. Entries are counted like the kernel counts
//! lookups and dropped when `forget` brings the count to zero.
//!
//! Node ids equal the backing inode numbers wherever that is unambiguous (same
//! device as the root, not the root itself), so `st_ino` and readdir's `d_ino`
//! agree with the backing directory; the root is node 1, and anything else
//! (other devices, a backing inode numbered 1) gets a synthetic id.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use parking_lot::Mutex;

/// FUSE's root node id.
pub const ROOT: u64 = 1;
/// Synthetic node ids start here, far above real inode numbers.
const SYNTHETIC_BASE: u64 = 1 << 63;

/// One backing inode.
#[derive(Debug)]
pub struct Inode {
    /// The FUSE node id (also reported as `st_ino`).
    pub nodeid: u64,
    /// An `O_PATH | O_NOFOLLOW` handle on the backing object.
    pub fd: OwnedFd,
    /// `st_mode & S_IFMT` of the backing object.
    pub fmt: u32,
}

impl Inode {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn is_dir(&self) -> bool {
        self.fmt == libc::S_IFDIR
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
}

impl Inodes {
    /// A table holding only the root, `root` being an `O_PATH` handle on the
    /// backing directory and `st` its attributes.
    pub fn new(root: OwnedFd, st: &libc::stat) -> Inodes {
        let key = (st.st_dev, st.st_ino);
        let mut by_id = HashMap::new();
        by_id.insert(
            ROOT,
            Slot {
                inode: Arc::new(Inode {
                    nodeid: ROOT,
                    fd: root,
                    fmt: st.st_mode & libc::S_IFMT,
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
        }
    }

    /// The inode with node id `nodeid`, if the kernel may still refer to it.
    pub fn get(&self, nodeid: u64) -> Option<Arc<Inode>> {
        self.tables.lock().by_id.get(&nodeid).map(|s| s.inode.clone())
    }

    /// Registers one kernel lookup of the object behind `fd` (attributes `st`)
    /// and returns its inode; `fd` is kept if the object was new.
    pub fn lookup(&self, fd: OwnedFd, st: &libc::stat) -> Arc<Inode> {
        let key = (st.st_dev, st.st_ino);
        let mut t = self.tables.lock();
        if let Some(&id) = t.by_key.get(&key)
            && let Some(slot) = t.by_id.get_mut(&id)
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
        let inode = Arc::new(Inode {
            nodeid,
            fd,
            fmt: st.st_mode & libc::S_IFMT,
        });
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
    use crate::sys;

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
    fn lookups_are_counted_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"x").unwrap();
        let (root, rst) = open(dir.path());
        let table = Inodes::new(root, &rst);
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
