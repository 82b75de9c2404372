//! What the overlay costs per cached inode, counted by the allocator (not
//! RSS, so the figure is exact and the same on every machine).
//!
//! The daemon's RSS per cached inode is this plus allocator overhead and
//! what the FUSE session holds; docs/BENCHMARKS.md has the RSS figure.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::OsString;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use efscache::backend::{Kind, Stat, Timespec};
use efscache::namespace::{Namespace, ROOT};

/// Counts the bytes live on the heap, rounded up as glibc's malloc rounds
/// a request into a chunk (8 bytes of header, 16-byte steps, 32 at least).
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

fn chunk(size: usize) -> isize {
    (size + 8).div_ceil(16).max(2) as isize * 16
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(chunk(l.size()), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(chunk(l.size()), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn stat(ino: u64, kind: Kind) -> Stat {
    let t = Timespec {
        sec: 1_700_000_000,
        nsec: 1,
    };
    Stat {
        dev: 1,
        ino,
        kind,
        perm: if kind == Kind::Dir { 0o755 } else { 0o644 },
        nlink: if kind == Kind::Dir { 2 } else { 1 },
        uid: 1000,
        gid: 1000,
        rdev: 0,
        size: 4096,
        blocks: 8,
        atime: t,
        mtime: t,
        ctime: t,
    }
}

/// Bytes per inode of a loaded directory of `n` files named like an rsync'd
/// tree's (`file-000001.dat`).
fn bytes_per_inode(n: u64) -> f64 {
    let mut ns = Namespace::new(&stat(2, Kind::Dir));
    let now = Instant::now();
    ns.merge_listing(ROOT, vec![(OsString::from("d"), stat(3, Kind::Dir))], now)
        .unwrap();
    let d = ns.lookup(ROOT, "d".as_ref()).unwrap().unwrap();
    let listing: Vec<(OsString, Stat)> = (0..n)
        .map(|i| (OsString::from(format!("file-{i:06}.dat")), stat(100 + i, Kind::File)))
        .collect();
    let before = LIVE.load(Ordering::Relaxed);
    let listing_bytes: isize = listing.iter().map(|(name, _)| chunk(name.len())).sum::<isize>()
        + chunk(listing.capacity() * std::mem::size_of::<(OsString, Stat)>());
    ns.merge_listing(d, listing, now).unwrap();
    let after = LIVE.load(Ordering::Relaxed);
    assert_eq!(ns.dir(d).unwrap().len(), n as usize);
    (after - before + listing_bytes) as f64 / n as f64
}

#[test]
fn a_cached_inode_costs_at_most_450_heap_bytes() {
    for n in [10_000, 100_000, 300_000] {
        let b = bytes_per_inode(n);
        eprintln!("{n} entries: {b:.0} heap bytes per cached inode");
        assert!(b <= 450.0, "{n} entries: {b:.0} bytes per cached inode (budget 450)");
    }
}
