//! Backend faults (injected with the `fault_*` mount options): errors on a
//! share of the backend's writes and renames, full-backend errors, and a
//! stall in which every backend request hangs. rsync into the mount must
//! finish without error, and after `sync` the backend must equal the source.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Mount, Rng, Scratch, assert_same_tree, make_tree, run, small_files};

fn rsync(src: &Path, dst: &Path) {
    run(Command::new("rsync")
        .args(["-aH", "--numeric-ids"])
        .arg(format!("{}/", src.display()))
        .arg(dst));
}

fn counter(m: &Mount, key: &str) -> u64 {
    m.status()[key].as_u64().unwrap_or(0)
}

/// 5% of the backend's writes and renames fail with EIO: every failure is
/// retried, nothing is reported as failed, and the backend ends complete.
#[test]
fn rsync_through_backend_eio_on_writes_and_renames() {
    let s = Scratch::new();
    make_tree(&s.path("src"), 11, None);
    small_files(&s.path("src"), 20, 100, 12);
    let m = Mount::start(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        "debounce=20ms,fault_rate=0.05,fault_ops=write:rename,fault_errno=EIO,fault_seed=3",
    );
    rsync(&s.path("src"), &s.path("mnt/dst"));
    m.sync();
    let retries = counter(&m, "retries");
    assert!(retries > 0, "no injected error was retried: the test exercised nothing");
    assert_eq!(m.status()["failures"], serde_json::json!([]));
    m.umount();
    assert_same_tree(&s.path("src"), &s.path("backend/dst"));
    eprintln!("{retries} retries after injected EIO");
}

/// A backend that is full for a while (ENOSPC on a third of its creates and
/// mkdirs) slows the flush down; it never fails a write into the mount.
#[test]
fn backend_enospc_is_retried_not_reported_to_writers() {
    let s = Scratch::new();
    small_files(&s.path("src"), 10, 40, 21);
    let m = Mount::start(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        "debounce=0ms,fault_rate=0.3,fault_ops=create:mkdir,fault_errno=ENOSPC,fault_seed=5",
    );
    rsync(&s.path("src"), &s.path("mnt/dst"));
    m.sync();
    assert!(counter(&m, "retries") > 0, "no injected ENOSPC was retried");
    assert_eq!(m.status()["failures"], serde_json::json!([]));
    m.umount();
    assert_same_tree(&s.path("src"), &s.path("backend/dst"));
}

/// Early in an rsync of 2,000 files (after the first 300 backend requests,
/// while the flush is under way) every backend request hangs for 10 seconds
/// (a network partition): rsync still finishes without error, its writes
/// landing in staging, and the queue drains once the backend answers again.
#[test]
fn rsync_through_a_ten_second_backend_stall() {
    let s = Scratch::new();
    small_files(&s.path("src"), 20, 100, 33);
    let m = Mount::start(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        "debounce=0ms,fault_stall_after=300,fault_stall=10s",
    );
    rsync(&s.path("src"), &s.path("mnt/dst"));
    m.sync();
    assert_eq!(m.status()["failures"], serde_json::json!([]));
    m.umount();
    assert_same_tree(&s.path("src"), &s.path("backend/dst"));
}

/// Total backend requests the daemon has made (all kinds).
fn backend_requests(m: &Mount) -> u64 {
    let st = m.status();
    st["backend_ops"]["ops"]
        .as_object()
        .map_or(0, |o| o.values().filter_map(|v| v.as_u64()).sum())
}

/// A backend that stops answering holds readers of clean files at most the
/// request timeout: then they get EIO (never 0 bytes or stale data), a killed
/// reader goes away, and once the backend is back the same read succeeds.
#[test]
fn a_stalled_backend_never_holds_a_reader_for_good() {
    let s = Scratch::new();
    let data = Rng(5).bytes(64 << 10);
    std::fs::create_dir(s.path("backend/dir")).unwrap();
    std::fs::write(s.path("backend/dir/file.dat"), &data).unwrap();
    // How many requests a mount makes before the first access: the stall
    // starts right after them.
    let probe = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "");
    let at_start = backend_requests(&probe);
    probe.umount();
    let stall = std::time::Duration::from_secs(25);
    let m = Mount::start(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        &format!("request_timeout=2s,fault_stall_after={at_start},fault_stall=25s"),
    );
    let t = std::time::Instant::now();
    let file = s.path("mnt/dir/file.dat");
    match std::fs::read(&file) {
        Ok(got) => panic!("read during the stall returned {} bytes instead of failing", got.len()),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    assert!(t.elapsed() < stall, "the reader waited for the whole stall");

    let mut cat = Command::new("cat")
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    cat.kill().unwrap();
    let killed = std::time::Instant::now();
    while cat.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < stall, "a killed reader stayed stuck in the mount");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    eprintln!("killed reader exited {:?} after SIGKILL", killed.elapsed());

    while t.elapsed() < stall + std::time::Duration::from_secs(1) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(std::fs::read(&file).unwrap(), data, "read after the stall");
    m.umount();
}
