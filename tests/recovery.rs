//! Recovery (SEMANTICS.md, Durability): a mount over the journal of a
//! killed daemon shows every change that daemon acknowledged from its first
//! reply, while the backend catches up in the background; changes made
//! meanwhile queue behind the recovered ones, and a kill before the backend
//! caught up loses nothing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Mount, Scratch};

const FILES: usize = 100;

/// Leaves `FILES` publishes (and the mkdir of `deep/work` they wait behind)
/// in the journal of a killed daemon: every backend mkdir fails (EIO, so it
/// is retried for ever) until the kill.
fn journal_with_pending_ops(s: &Scratch) {
    let (backend, mnt, cache) = (s.path("backend"), s.path("mnt"), s.path("cache"));
    std::fs::create_dir_all(backend.join("deep")).unwrap();
    std::fs::create_dir_all(backend.join("other")).unwrap();
    std::fs::write(backend.join("other/x"), b"untouched").unwrap();
    let mut m = Mount::start(
        &backend,
        &mnt,
        &cache,
        "debounce=0ms,fault_rate=1,fault_ops=mkdir,fault_errno=EIO",
    );
    std::fs::create_dir(mnt.join("deep/work")).unwrap();
    for i in 0..FILES {
        std::fs::write(mnt.join(format!("deep/work/f{i}")), format!("file {i}")).unwrap();
    }
    // Every publish is queued (behind the mkdir) before the kill.
    let t = Instant::now();
    while m.status()["queued_ops"].as_u64().unwrap_or(0) < FILES as u64 + 1 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "publishes not queued: {}",
            m.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    m.kill9();
    drop(m);
    assert!(!backend.join("deep/work").exists(), "the mkdir reached the backend");
}

fn check_published(backend: &Path) {
    for i in 0..FILES {
        assert_eq!(
            std::fs::read(backend.join(format!("f{i}"))).unwrap(),
            format!("file {i}").as_bytes(),
            "f{i}"
        );
    }
    let names: Vec<_> = std::fs::read_dir(backend)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), FILES, "stray names on the backend: {names:?}");
}

#[test]
fn a_remount_shows_every_acknowledged_change_while_the_backend_catches_up() {
    let s = Scratch::new();
    journal_with_pending_ops(&s);
    let (backend, mnt, cache) = (s.path("backend"), s.path("mnt"), s.path("cache"));
    // A slow backend: the ~600 requests of the recovered work take seconds
    // on 2 workers.
    let m = Mount::start(&backend, &mnt, &cache, "flushers=2,fault_delay=30ms");
    // Every recovered file is there, with its size and content, before the
    // backend has it.
    let mut names: Vec<String> = std::fs::read_dir(mnt.join("deep/work"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), FILES, "{names:?}");
    for i in 0..FILES {
        let f = mnt.join(format!("deep/work/f{i}"));
        let want = format!("file {i}");
        assert_eq!(std::fs::metadata(&f).unwrap().len(), want.len() as u64, "size of f{i}");
        assert_eq!(std::fs::read(&f).unwrap(), want.as_bytes(), "f{i}");
    }
    assert!(
        !backend.join("deep/work").exists() || m.status()["queued_ops"].as_u64().unwrap_or(0) > 0,
        "the backend caught up before the check: {}",
        m.status()
    );
    let rec = m.recovery();
    assert_eq!(rec["failed"], 0, "{rec}");
    // The mkdir and the publishes (and directory times) were still to do.
    assert!(rec["ops_queued"].as_u64().unwrap_or(0) > FILES as u64, "{rec}");
    // What the recovered work does not touch answers at once; changes made
    // now queue behind the recovered ones.
    assert_eq!(std::fs::read(mnt.join("other/x")).unwrap(), b"untouched");
    std::fs::write(mnt.join("other/new"), b"written during recovery").unwrap();
    std::fs::rename(mnt.join("deep"), mnt.join("deep2")).unwrap();
    assert_eq!(std::fs::read_dir(mnt.join("deep2/work")).unwrap().count(), FILES);
    m.sync();
    // The staged copies of what was published are gone, not kept aside.
    let kept = if cache.join("lost+found").exists() {
        common::walk(&cache.join("lost+found"))
    } else {
        Vec::new()
    };
    assert!(kept.is_empty(), "replayed files kept in lost+found: {kept:?}");
    m.umount();
    check_published(&backend.join("deep2/work"));
    assert_eq!(
        std::fs::read(backend.join("other/new")).unwrap(),
        b"written during recovery"
    );
    assert!(!backend.join("deep").exists());
}

#[test]
fn a_kill_during_recovery_loses_nothing() {
    let s = Scratch::new();
    journal_with_pending_ops(&s);
    let (backend, mnt, cache) = (s.path("backend"), s.path("mnt"), s.path("cache"));
    let mut m = Mount::start(&backend, &mnt, &cache, "flushers=2,fault_delay=30ms");
    std::fs::write(mnt.join("other/new"), b"written during recovery").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let queued = m.status()["queued_ops"].as_u64().unwrap_or(0);
    assert!(queued > 0, "the backend caught up before the kill: {}", m.status());
    m.kill9();
    drop(m);
    let m = Mount::start(&backend, &mnt, &cache, "");
    assert_eq!(m.recovery()["failed"], 0);
    m.sync();
    m.umount();
    check_published(&backend.join("deep/work"));
    assert_eq!(
        std::fs::read(backend.join("other/new")).unwrap(),
        b"written during recovery"
    );
    let strays: Vec<_> = common::walk(&backend)
        .into_iter()
        .filter(|(p, _)| p.to_string_lossy().contains(".efscache."))
        .collect();
    assert!(strays.is_empty(), "publish temp files left: {strays:?}");
}

#[test]
fn a_backend_that_cannot_be_listed_fails_the_mount_and_loses_nothing() {
    let s = Scratch::new();
    journal_with_pending_ops(&s);
    let (backend, mnt, cache) = (s.path("backend"), s.path("mnt"), s.path("cache"));
    let journal = std::fs::read(cache.join("journal")).unwrap();
    // Every directory listing fails: the rebuild cannot see the backend.
    let out = common::try_mount(&backend, &mnt, &cache, "fault_rate=1,fault_ops=readdir,fault_errno=EIO");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the mount succeeded without the backend's listings"
    );
    assert!(
        err.contains("cannot recover the changes of the last run") && err.contains("nothing is lost"),
        "unclear error: {err}"
    );
    assert!(!common::is_efscache_mounted(&mnt), "something was mounted");
    assert!(
        std::fs::read(cache.join("journal")).unwrap() == journal,
        "the failed mount changed the journal"
    );
    // Once the backend answers, everything is recovered.
    let m = Mount::start(&backend, &mnt, &cache, "");
    assert_eq!(m.recovery()["failed"], 0, "{}", m.recovery());
    m.sync();
    m.umount();
    check_published(&backend.join("deep/work"));
}

/// 100,000 files pending in the journal of a killed daemon are all there,
/// with their size, mode and mtime, from the first request the new mount
/// answers: the overlay is rebuilt before the mount is ready, and only the
/// publishing waits. Prints how long the mount took to come up.
#[test]
fn a_hundred_thousand_pending_files_are_visible_from_the_first_reply() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    const N: usize = 100_000;
    const DIRS: usize = 100;
    let s = Scratch::new();
    let (backend, mnt, cache) = (s.path("backend"), s.path("mnt"), s.path("cache"));
    std::fs::create_dir_all(&backend).unwrap();
    let mut m = Mount::start(&backend, &mnt, &cache, "debounce=1h");
    let t = Instant::now();
    for d in 0..DIRS {
        std::fs::create_dir(mnt.join(format!("d{d}"))).unwrap();
    }
    for i in 0..N {
        let f = mnt.join(format!("d{}/f{i}", i % DIRS));
        std::fs::write(&f, format!("{i:x}")).unwrap();
        if i % 7 == 0 {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        }
    }
    eprintln!("{N} files written through the mount in {:?}", t.elapsed());
    let want: Vec<(u64, u32, i64)> = (0..N)
        .map(|i| {
            let md = std::fs::metadata(mnt.join(format!("d{}/f{i}", i % DIRS))).unwrap();
            (md.len(), md.mode(), md.mtime_nsec() + md.mtime() * 1_000_000_000)
        })
        .collect();
    m.kill9();
    drop(m);
    let t = Instant::now();
    let m = Mount::start(&backend, &mnt, &cache, "debounce=1h");
    let up = t.elapsed();
    let first = std::fs::metadata(mnt.join("d0/f0")).unwrap();
    eprintln!(
        "remount over {N} pending files: mounted and first reply in {:?} (mount {up:?})",
        t.elapsed()
    );
    assert_eq!(first.len(), want[0].0);
    for (i, w) in want.iter().enumerate() {
        let md = std::fs::metadata(mnt.join(format!("d{}/f{i}", i % DIRS))).unwrap();
        let got = (md.len(), md.mode(), md.mtime_nsec() + md.mtime() * 1_000_000_000);
        assert_eq!(&got, w, "f{i} after recovery");
    }
    let rec = m.recovery();
    assert_eq!(rec["failed"], 0, "{rec}");
    assert!(
        !backend.join("d0/f0").exists(),
        "the file was published: nothing was recovered"
    );
    // The backend catching up is tested above with fewer files.
    let mut m = m;
    m.kill9();
}
