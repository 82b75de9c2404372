//! Recovery runs in the background (SEMANTICS.md, Durability): a mount with
//! many journaled ops left by a killed daemon serves at once; what the
//! recovered work does not touch answers while it runs, what it touches
//! waits for it and then shows every acknowledged change, and a kill during
//! the recovery itself loses nothing.

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
fn a_mount_serves_while_it_recovers_and_what_recovery_touches_waits() {
    let s = Scratch::new();
    journal_with_pending_ops(&s);
    let (backend, mnt, cache) = (s.path("backend"), s.path("mnt"), s.path("cache"));
    // A slow backend: the replay of ~600 requests on 2 workers takes seconds.
    let m = Mount::start(&backend, &mnt, &cache, "flushers=2,fault_delay=30ms");
    // Untouched by the recovered work: answered while it runs.
    assert_eq!(std::fs::read(mnt.join("other/x")).unwrap(), b"untouched");
    std::fs::write(mnt.join("other/new"), b"written during recovery").unwrap();
    let rec = m.status()["recovery"].clone();
    assert_eq!(rec["running"], true, "recovery ended before the check: {rec}");
    // A listing the recovered work changes waits for it, and shows all of it.
    let mut names: Vec<String> = std::fs::read_dir(mnt.join("deep/work"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), FILES, "{names:?}");
    // Renaming a directory the recovered work lies in waits for it, then
    // moves everything.
    std::fs::rename(mnt.join("deep"), mnt.join("deep2")).unwrap();
    let rec = m.recovery();
    assert_eq!(rec["failed"], 0, "{rec}");
    assert!(rec["ops"].as_u64().unwrap() > FILES as u64, "{rec}");
    // The staged copies of what the replay published are gone, not kept aside.
    let kept = if cache.join("lost+found").exists() {
        common::walk(&cache.join("lost+found"))
    } else {
        Vec::new()
    };
    assert!(kept.is_empty(), "replayed files kept in lost+found: {kept:?}");
    m.sync();
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
    assert_eq!(m.status()["recovery"]["running"], true);
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
