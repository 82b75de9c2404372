//! POSIX details through a real mount: times (utimensat with UTIME_NOW and
//! UTIME_OMIT, nanoseconds surviving the publish) and concurrency (writers
//! and a lister in one directory while it is flushed, rename storms of
//! directories with unpublished children).

mod common;

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{Mount, Scratch};

fn utimens(path: &Path, atime: libc::timespec, mtime: libc::timespec) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let times = [atime, mtime];
    // SAFETY: a NUL-terminated path and a two-element array, as utimensat wants.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(
        r,
        0,
        "utimensat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

fn times(path: &Path) -> ((i64, i64), (i64, i64)) {
    let md = std::fs::symlink_metadata(path).unwrap();
    ((md.atime(), md.atime_nsec()), (md.mtime(), md.mtime_nsec()))
}

#[test]
fn utimensat_now_omit_and_nanoseconds_survive_the_publish() {
    let s = Scratch::new();
    let (mnt, backend) = (s.path("mnt"), s.path("backend"));
    let m = Mount::start(&backend, &mnt, &s.path("cache"), "debounce=0ms");
    std::fs::create_dir(mnt.join("dir")).unwrap();
    std::fs::write(mnt.join("dir/file"), "x").unwrap();
    std::os::unix::fs::symlink("file", mnt.join("dir/link")).unwrap();
    for name in ["dir/file", "dir/link", "dir"] {
        let p = mnt.join(name);
        utimens(&p, ts(1_234_567_890, 123_456_789), ts(1_300_000_000, 987_654_321));
        assert_eq!(
            times(&p),
            ((1_234_567_890, 123_456_789), (1_300_000_000, 987_654_321)),
            "{name}"
        );
        // UTIME_OMIT keeps atime; a new mtime with nanoseconds.
        utimens(&p, ts(0, libc::UTIME_OMIT), ts(1_400_000_000, 1));
        assert_eq!(
            times(&p),
            ((1_234_567_890, 123_456_789), (1_400_000_000, 1)),
            "{name} after OMIT"
        );
    }
    // UTIME_NOW: the current time, for mtime only.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    utimens(&mnt.join("dir/file"), ts(0, libc::UTIME_OMIT), ts(0, libc::UTIME_NOW));
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let ((asec, _), (msec, _)) = times(&mnt.join("dir/file"));
    assert_eq!(asec, 1_234_567_890, "atime changed by UTIME_OMIT");
    assert!(
        (before..=after).contains(&msec),
        "UTIME_NOW gave mtime {msec}, not within [{before}, {after}]"
    );
    let through_mount: Vec<_> = ["dir/file", "dir/link", "dir"]
        .iter()
        .map(|n| times(&mnt.join(n)))
        .collect();
    m.sync();
    m.umount();
    let on_backend: Vec<_> = ["dir/file", "dir/link", "dir"]
        .iter()
        .map(|n| times(&backend.join(n)))
        .collect();
    // atime of the file: reading it is not this test's business, mtimes are.
    for (i, name) in ["dir/file", "dir/link", "dir"].iter().enumerate() {
        assert_eq!(on_backend[i].1, through_mount[i].1, "{name}: mtime on the backend");
    }
    assert_eq!(on_backend[1].0, through_mount[1].0, "link: atime on the backend");
}

/// Four writers create files (temp + rename, as rsync does) in one directory
/// while a lister reads it over and over and the flush publishes: no listing
/// has a duplicate, and after `sync` the backend has exactly the final names.
#[test]
fn writers_and_a_lister_in_one_directory_while_it_is_flushed() {
    let s = Scratch::new();
    let (mnt, backend) = (s.path("mnt"), s.path("backend"));
    let m = Mount::start(&backend, &mnt, &s.path("cache"), "debounce=0ms");
    std::fs::create_dir(mnt.join("shared")).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let lister = {
        let (dir, done) = (mnt.join("shared"), done.clone());
        std::thread::spawn(move || {
            let mut listings = 0;
            while !done.load(Ordering::Relaxed) {
                let mut seen = BTreeSet::new();
                for e in std::fs::read_dir(&dir).unwrap() {
                    let name = e.unwrap().file_name();
                    assert!(seen.insert(name.clone()), "{name:?} listed twice in one listing");
                }
                listings += 1;
            }
            listings
        })
    };
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let dir = mnt.join("shared");
            std::thread::spawn(move || {
                for i in 0..250 {
                    let tmp = dir.join(format!(".w{w}-f{i}.tmp"));
                    std::fs::write(&tmp, format!("writer {w} file {i}")).unwrap();
                    std::fs::rename(&tmp, dir.join(format!("w{w}-f{i}"))).unwrap();
                    if i % 10 == 0 {
                        std::fs::remove_file(dir.join(format!("w{w}-f{}", i / 2))).unwrap();
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let listings = lister.join().unwrap();
    eprintln!("{listings} listings while writing");
    let mut expected = BTreeSet::new();
    for w in 0..4 {
        for i in 0..250 {
            expected.insert(format!("w{w}-f{i}"));
        }
        for i in (0..250).step_by(10) {
            expected.remove(&format!("w{w}-f{}", i / 2));
        }
    }
    let names = |d: &Path| -> BTreeSet<String> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(&mnt.join("shared")), expected, "through the mount");
    m.sync();
    m.umount();
    assert_eq!(names(&backend.join("shared")), expected, "on the backend");
    for n in &expected {
        let (w, i) = n[1..].split_once("-f").unwrap();
        assert_eq!(
            std::fs::read_to_string(backend.join("shared").join(n)).unwrap(),
            format!("writer {w} file {i}")
        );
    }
}

/// Directories full of unpublished files are moved around, renamed over
/// empty ones and back, while the flush runs: after `sync` the backend has
/// exactly the final tree, with no stale names.
#[test]
fn rename_storm_of_directories_with_unpublished_children() {
    let s = Scratch::new();
    let (mnt, backend) = (s.path("mnt"), s.path("backend"));
    let m = Mount::start(&backend, &mnt, &s.path("cache"), "debounce=20ms,fault_delay=1ms");
    for d in 0..6 {
        let dir = mnt.join(format!("d{d}/sub"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..20 {
            std::fs::write(dir.join(format!("f{f}")), format!("d{d} f{f}")).unwrap();
        }
    }
    // A rotation d0 -> d1 -> ... -> d5 -> d0 through a spare name, repeated,
    // with a move into and out of a subdirectory on the way.
    for round in 0..10 {
        std::fs::rename(mnt.join("d5"), mnt.join("spare")).unwrap();
        for d in (0..5).rev() {
            std::fs::rename(mnt.join(format!("d{d}")), mnt.join(format!("d{}", d + 1))).unwrap();
        }
        std::fs::rename(mnt.join("spare"), mnt.join("d0")).unwrap();
        std::fs::rename(mnt.join("d3/sub"), mnt.join("d2/moved")).unwrap();
        std::fs::rename(mnt.join("d2/moved"), mnt.join("d3/sub")).unwrap();
        std::fs::create_dir(mnt.join(format!("empty{round}"))).unwrap();
        std::fs::rename(mnt.join("d4"), mnt.join(format!("empty{round}"))).unwrap();
        std::fs::rename(mnt.join(format!("empty{round}")), mnt.join("d4")).unwrap();
        std::fs::write(mnt.join(format!("d1/sub/new{round}")), format!("round {round}")).unwrap();
    }
    let tree = |root: &Path| -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = common::walk(root)
            .into_iter()
            .map(|(p, md)| {
                let content = if md.is_file() {
                    std::fs::read_to_string(root.join(&p)).unwrap()
                } else {
                    "dir".into()
                };
                (p.to_string_lossy().into_owned(), content)
            })
            .collect();
        out.sort();
        out
    };
    let expected = tree(&mnt);
    assert_eq!(expected.len(), 6 * 2 + 6 * 20 + 10, "names through the mount");
    m.sync();
    m.umount();
    assert_eq!(tree(&backend), expected, "backend differs from the mount");
}

/// Opening a published file for writing and closing it without writing (as
/// `touch` does before it sets the times) keeps its mtime, through the mount
/// and on the backend (the file is published again, unchanged).
#[test]
fn an_open_for_writing_without_writes_keeps_the_mtime() {
    let s = Scratch::new();
    let (mnt, backend) = (s.path("mnt"), s.path("backend"));
    std::fs::write(backend.join("f"), "backend content").unwrap();
    utimens(&backend.join("f"), ts(1_000_000_000, 5), ts(1_100_000_000, 7));
    let m = Mount::start(&backend, &mnt, &s.path("cache"), "debounce=0ms");
    drop(std::fs::OpenOptions::new().write(true).open(mnt.join("f")).unwrap());
    assert_eq!(times(&mnt.join("f")).1, (1_100_000_000, 7), "mtime through the mount");
    m.sync();
    m.umount();
    assert_eq!(std::fs::read_to_string(backend.join("f")).unwrap(), "backend content");
    assert_eq!(times(&backend.join("f")).1, (1_100_000_000, 7), "mtime on the backend");
}
