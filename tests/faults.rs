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

/// Lost replies: a third of the backend's creates, mkdirs, links, renames
/// and unlinks are carried out but answer EIO (as when a network drops an
/// NFS reply). The retries converge, and no publish temp file stays behind:
/// one whose create "failed" is removed at once, one whose removal failed
/// is removed later, before `sync` returns.
#[test]
fn lost_replies_leave_no_temp_files_behind() {
    let s = Scratch::new();
    make_tree(&s.path("src"), 17, None);
    let m = Mount::start(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        "debounce=0ms,fault_rate=0.15,fault_ops=create:mknod:mkdir:link:rename:unlink,fault_errno=EIO,fault_reply_lost,fault_seed=11",
    );
    rsync(&s.path("src"), &s.path("mnt/dst"));
    m.sync();
    assert!(
        counter(&m, "retries") > 0,
        "no injected error was retried: the test exercised nothing"
    );
    assert_eq!(m.status()["failures"], serde_json::json!([]));
    m.umount();
    // (Extra names, temp files included, make the trees differ; the
    // capability probe's objects would be in the backend root.)
    assert_same_tree(&s.path("src"), &s.path("backend/dst"));
    let root: Vec<_> = std::fs::read_dir(s.path("backend"))
        .expect("backend")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        root,
        vec![std::ffi::OsString::from("dst")],
        "the backend root holds only dst"
    );
}

/// Renames through the mount while half of the backend's renames are
/// carried out but answer EIO: of files on the backend (`a` to `b`), of
/// files rewritten just before (`c` to `e`: the rename waits behind their
/// publish, which gives them a new backend inode) and of new files onto
/// names whose files are still open (`n` to `t`). Each retry that finds
/// its source gone and the target holding the file it renamed takes the
/// rename as done: no conflict is reported, and every name ends up right.
#[test]
fn renames_whose_replies_are_lost_are_not_taken_for_conflicts() {
    const N: usize = 20;
    let s = Scratch::new();
    let (mnt, backend) = (s.path("mnt"), s.path("backend"));
    let m = Mount::start(
        &backend,
        &mnt,
        &s.path("cache"),
        "debounce=0ms,fault_rate=0.5,fault_ops=rename,fault_errno=EIO,fault_reply_lost,fault_seed=3",
    );
    let at = |name: String| mnt.join("d").join(name);
    std::fs::create_dir(mnt.join("d")).unwrap();
    for i in 0..N {
        for p in ["a", "c", "t"] {
            std::fs::write(at(format!("{p}{i}")), format!("{p} {i}")).unwrap();
        }
    }
    m.sync();
    let retries = counter(&m, "retries");
    // (Open, the replaced files stay known to the daemon with their inodes.)
    let held: Vec<std::fs::File> = (0..N)
        .map(|i| std::fs::File::open(at(format!("t{i}"))).unwrap())
        .collect();
    for i in 0..N {
        std::fs::write(at(format!("c{i}")), format!("c {i} rewritten")).unwrap();
        std::fs::write(at(format!("n{i}")), format!("n {i}")).unwrap();
    }
    // Their publishes are queued by now, and many wait to retry a rename.
    std::thread::sleep(std::time::Duration::from_millis(100));
    for i in 0..N {
        std::fs::rename(at(format!("a{i}")), at(format!("b{i}"))).unwrap();
        std::fs::rename(at(format!("c{i}")), at(format!("e{i}"))).unwrap();
        std::fs::rename(at(format!("n{i}")), at(format!("t{i}"))).unwrap();
    }
    m.sync();
    assert!(
        counter(&m, "retries") > retries,
        "no rename was retried: the test exercised nothing"
    );
    assert_eq!(m.status()["failures"], serde_json::json!([]));
    drop(held);
    m.umount();
    let mut names: Vec<String> = std::fs::read_dir(backend.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..N)
        .flat_map(|i| ["b", "e", "t"].map(|p| format!("{p}{i}")))
        .collect();
    want.sort();
    assert_eq!(names, want);
    let on_backend = |name: String| std::fs::read_to_string(backend.join("d").join(name)).unwrap();
    for i in 0..N {
        assert_eq!(on_backend(format!("b{i}")), format!("a {i}"));
        assert_eq!(on_backend(format!("e{i}")), format!("c {i} rewritten"));
        assert_eq!(on_backend(format!("t{i}")), format!("n {i}"));
    }
}

/// A third of the backend's renames and unlinks fail (before they happen): a
/// publish whose rename fails cannot always remove its temp file at once
/// either. Such temp files are removed later, before `sync` returns.
#[test]
fn temp_files_whose_removal_failed_are_removed_before_sync_returns() {
    let s = Scratch::new();
    small_files(&s.path("src"), 4, 25, 9);
    let m = Mount::start(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        "debounce=0ms,fault_rate=0.3,fault_ops=rename:unlink,fault_errno=EIO,fault_seed=4",
    );
    rsync(&s.path("src"), &s.path("mnt/dst"));
    m.sync();
    assert!(
        counter(&m, "retries") > 0,
        "no injected error was retried: the test exercised nothing"
    );
    m.umount();
    assert_same_tree(&s.path("src"), &s.path("backend/dst"));
}

/// A backend that is full for a while, again and again (bursts of 50
/// creates and mkdirs in a row fail with ENOSPC) slows the flush down; it
/// never fails a write into the mount, and nothing is reported failed.
#[test]
fn backend_enospc_bursts_are_retried_not_reported_to_writers() {
    let s = Scratch::new();
    small_files(&s.path("src"), 10, 40, 21);
    let m = Mount::start(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        "debounce=0ms,fault_rate=0.02,fault_burst=50,fault_ops=create:mkdir,fault_errno=ENOSPC,fault_seed=5",
    );
    rsync(&s.path("src"), &s.path("mnt/dst"));
    m.sync();
    // A burst of 50 failures reaches several publishes at once, each
    // retried more than once.
    let retries = counter(&m, "retries");
    assert!(
        retries >= 50,
        "only {retries} retries: no burst of ENOSPC was exercised"
    );
    assert_eq!(m.status()["failures"], serde_json::json!([]));
    m.umount();
    assert_same_tree(&s.path("src"), &s.path("backend/dst"));
}

/// Early in an rsync of 1,000 files (after the first 300 backend requests,
/// while the flush is under way) every backend request hangs for a minute
/// (a network partition): rsync still finishes without error, its writes
/// landing in staging, and the queue drains once the backend answers again.
#[test]
fn rsync_through_a_backend_stall() {
    let s = Scratch::new();
    small_files(&s.path("src"), 20, 50, 33);
    // The stall begins early in the copy and outlasts it by far, even on a
    // slow machine: the copy must complete while every backend request hangs.
    let m = Mount::start(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        "debounce=0ms,fault_stall_after=300,fault_stall=60s",
    );
    rsync(&s.path("src"), &s.path("mnt/dst"));
    let during = backend_requests(&m);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        backend_requests(&m),
        during,
        "the backend answered again before rsync returned: the stall did not cover the copy"
    );
    assert!(
        m.status()["pending_files"].as_u64().unwrap_or(0) > 0,
        "everything was published before the stall: {}",
        m.status()
    );
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

    // Once the stall is over (it began a little after `t`), the same read
    // succeeds: retried while the backend may still be catching up, but
    // never anything but the whole file.
    while t.elapsed() < stall {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let got = loop {
        match std::fs::read(&file) {
            Ok(got) => break got,
            Err(e) if e.raw_os_error() == Some(libc::EIO) && t.elapsed() < stall * 3 => {
                std::thread::sleep(std::time::Duration::from_millis(200))
            }
            Err(e) => panic!("read after the stall: {e}"),
        }
    };
    assert_eq!(got, data, "read after the stall");
    m.umount();
}

/// Permanent backend errors (EPERM on every chown) are not retried: they are
/// listed by `status`, `sync` exits non-zero naming the file, a copy of its
/// data is kept, and the rest of the queue (including ops in the same
/// directory) goes through.
#[test]
fn permanent_failures_are_reported_and_block_nothing_else() {
    use std::io::Write;
    let s = Scratch::new();
    let (backend, mnt, cache) = (s.path("backend"), s.path("mnt"), s.path("cache"));
    let m = Mount::start(
        &backend,
        &mnt,
        &cache,
        "debounce=0ms,fault_rate=1.0,fault_ops=chown,fault_errno=EPERM",
    );
    std::fs::create_dir(backend.join("d")).unwrap();
    std::fs::write(mnt.join("d/mine.txt"), "root's file").unwrap();
    // Owned by another user before its first close: its publish needs a chown.
    let mut f = std::fs::File::create(mnt.join("d/theirs.txt")).unwrap();
    f.write_all(b"uid 1000's file").unwrap();
    std::os::unix::fs::fchown(&f, Some(1000), Some(1000)).unwrap();
    drop(f);
    std::fs::write(mnt.join("d/after.txt"), "written after").unwrap();
    std::fs::rename(mnt.join("d/mine.txt"), mnt.join("d/mine2.txt")).unwrap();

    let out = Command::new(common::BIN).arg("sync").arg(&mnt).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "sync succeeded despite a permanent failure");
    assert!(stderr.contains("d/theirs.txt"), "sync does not name the file: {stderr}");
    // (Directory attribute ops, which also set the owner, fail the same way.)
    let failures = m.status()["failures"].clone();
    let files: Vec<&str> = failures
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["op"] == "publish")
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(files, ["d/theirs.txt"], "{failures}");
    assert!(failures.as_array().unwrap().iter().all(|f| f["errno"] == libc::EPERM));
    let retries = counter(&m, "retries");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(counter(&m, "retries"), retries, "a permanent failure is being retried");
    let out = Command::new(common::BIN).arg("umount").arg(&mnt).output().unwrap();
    assert!(!out.status.success() && !common::is_efscache_mounted(&mnt));
    drop(m);

    assert_eq!(
        std::fs::read_to_string(backend.join("d/mine2.txt")).unwrap(),
        "root's file"
    );
    assert_eq!(
        std::fs::read_to_string(backend.join("d/after.txt")).unwrap(),
        "written after"
    );
    assert!(!backend.join("d/mine.txt").exists());
    assert!(
        !backend.join("d/theirs.txt").exists(),
        "a file published without its owner"
    );
    let kept: Vec<String> = std::fs::read_dir(cache.join("lost+found/failed"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.to_string_lossy().ends_with(".publish.json"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert_eq!(kept, ["uid 1000's file"]);
    // With what `scrub --fix --cache-dir` needs to publish it later.
    assert_eq!(
        std::fs::read_dir(cache.join("lost+found/failed")).unwrap().count(),
        2,
        "the kept copy has no .publish.json record"
    );
}

/// A backend that hangs while a mount starts (an EFS outage during a boot
/// or a restart after a crash) fails the mount after `request_timeout` with
/// a message, instead of hanging it; the journal keeps the pending work and
/// the next mount publishes it.
#[test]
fn a_backend_hanging_at_mount_time_fails_the_mount_and_loses_nothing() {
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("backend")).unwrap();
    let mut m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=1h");
    std::fs::write(s.path("mnt/pending"), b"acknowledged").unwrap();
    m.kill9();
    drop(m);
    let t = std::time::Instant::now();
    let out = common::try_mount(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        "fault_stall_after=0,fault_stall=1h,request_timeout=2s",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the mount succeeded over a hanging backend");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(30),
        "the mount took {:?}",
        t.elapsed()
    );
    assert!(
        err.contains("did not answer") && err.contains("nothing is lost"),
        "{err}"
    );
    assert!(!common::is_efscache_mounted(&s.path("mnt")));
    // The daemon that gave up exits (its thread stuck on the backend with
    // it) and frees the cache dir: the next mount recovers everything.
    let t = std::time::Instant::now();
    while !Command::new("flock")
        .args(["-n", "-E", "99"])
        .arg(s.path("cache/lock"))
        .arg("true")
        .status()
        .is_ok_and(|st| st.success())
    {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "the failed daemon still holds the cache dir"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "");
    m.sync();
    m.umount();
    assert_eq!(std::fs::read(s.path("backend/pending")).unwrap(), b"acknowledged");
}

/// A name the backend refuses as too long (ENAMETOOLONG on the publish's
/// rename) is a permanent failure like EPERM: reported by name, not retried,
/// and nothing else waits for it.
#[test]
fn a_name_too_long_for_the_backend_is_reported_not_retried() {
    let s = Scratch::new();
    let (backend, mnt, cache) = (s.path("backend"), s.path("mnt"), s.path("cache"));
    std::fs::create_dir_all(&backend).unwrap();
    let m = Mount::start(&backend, &mnt, &cache, "debounce=0ms");
    std::fs::write(mnt.join("first"), "published").unwrap();
    m.sync();
    drop(m);
    let m = Mount::start(
        &backend,
        &mnt,
        &cache,
        "debounce=0ms,fault_rate=1.0,fault_ops=rename,fault_errno=ENAMETOOLONG",
    );
    std::fs::write(mnt.join("long-name"), "refused").unwrap();
    std::fs::create_dir(mnt.join("dir")).unwrap();
    let out = Command::new(common::BIN).arg("sync").arg(&mnt).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "sync succeeded despite a permanent failure");
    assert!(stderr.contains("long-name"), "sync does not name the file: {stderr}");
    let failures = m.status()["failures"].clone();
    assert!(
        failures
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["errno"] == libc::ENAMETOOLONG),
        "{failures}"
    );
    let retries = counter(&m, "retries");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(counter(&m, "retries"), retries, "a permanent failure is being retried");
    assert!(backend.join("dir").is_dir(), "the mkdir waited for the failed publish");
    assert!(!backend.join("long-name").exists());
    let _ = Command::new(common::BIN)
        .args(["umount", "--timeout", "1s"])
        .arg(&mnt)
        .output();
}

/// Every kind of request that waits on the backend gives up after
/// `request_timeout` during a stall (EIO), and its process stays killable:
/// a directory's first listing, opening a clean file for writing (it is
/// copied into the cache first) and fsync with `fsync=remote`. New files in
/// a directory the mount has listed are written meanwhile. (In one it has
/// not, a create must ask the backend what the name holds: EIO too.)
#[test]
fn requests_that_wait_on_a_stalled_backend_fail_in_time() {
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("backend/unlisted")).unwrap();
    std::fs::write(s.path("backend/unlisted/x"), b"x").unwrap();
    std::fs::write(s.path("backend/clean"), b"on the backend").unwrap();
    // The stall starts once the mount is up and has listed its root. No
    // xattrs, as on EFS (else a create first asks for the directory's
    // default ACL).
    let probe = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "noxattr");
    std::fs::read_dir(s.path("mnt")).unwrap().for_each(drop);
    let listed = backend_requests(&probe);
    probe.umount();
    let _m = Mount::start(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        &format!("noxattr,request_timeout=2s,fsync=remote,fault_stall_after={listed},fault_stall=40s"),
    );
    std::fs::read_dir(s.path("mnt")).unwrap().for_each(drop);
    let t = std::time::Instant::now();
    let eio = |what: &str, r: std::io::Result<()>| match r {
        Ok(()) => panic!("{what} succeeded while the backend hung"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}"),
    };
    eio(
        "listing",
        std::fs::read_dir(s.path("mnt/unlisted")).and_then(|mut d| d.try_for_each(|e| e.map(drop))),
    );
    eio(
        "open for writing",
        std::fs::OpenOptions::new()
            .append(true)
            .open(s.path("mnt/clean"))
            .map(|_| ()),
    );
    // A new file is written at once; its fsync waits for the publish.
    let mut f = std::fs::File::create(s.path("mnt/new")).unwrap();
    std::io::Write::write_all(&mut f, b"new").unwrap();
    eio("fsync=remote", f.sync_all());
    drop(f);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(30),
        "requests waited {:?} on a backend that hangs for 40 s",
        t.elapsed()
    );
    // A process stuck in such a request dies when killed.
    let mut ls = Command::new("ls").arg(s.path("mnt/unlisted")).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    ls.kill().unwrap();
    let killed = std::time::Instant::now();
    while ls.try_wait().unwrap().is_none() {
        assert!(
            killed.elapsed() < std::time::Duration::from_secs(10),
            "a killed ls stayed stuck"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = Command::new(common::BIN)
        .args(["umount", "--timeout", "1s"])
        .arg(s.path("mnt"))
        .output();
}

/// A mount (with `options`, each followed by a comma) whose backend stalls
/// for 4 s once `look` has been done through it: a first mount counts the
/// backend requests `look` makes. Requests time out after 1 s.
fn mount_stalling_after(s: &Scratch, options: &str, look: impl Fn(&Path)) -> Mount {
    let probe = Mount::start(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        options.trim_end_matches(','),
    );
    look(&s.path("mnt"));
    let looked = backend_requests(&probe);
    probe.umount();
    let m = Mount::start(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        &format!("{options}request_timeout=1s,fault_stall_after={looked},fault_stall=4s"),
    );
    look(&s.path("mnt"));
    m
}

/// A truncate of a file only the backend has waits for the file's copy; on
/// a stalled backend it is answered EIO after `request_timeout`, then
/// happens once the backend is back. The mount shows the new size at once:
/// the kernel, which kept the old size when it got the EIO, is told to
/// forget it.
#[test]
fn a_truncate_made_after_its_request_timed_out_shows_at_once() {
    let s = Scratch::new();
    std::fs::write(s.path("backend/clean"), b"on the backend").unwrap();
    let look = |mnt: &Path| assert_eq!(std::fs::metadata(mnt.join("clean")).unwrap().len(), 14);
    let m = mount_stalling_after(&s, "noxattr,", look);
    let t = std::time::Instant::now();
    // truncate(2) by path: a setattr, without an open for writing.
    let path = std::ffi::CString::new(s.path("mnt/clean").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let truncated = match unsafe { libc::truncate(path.as_ptr(), 5) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    };
    match truncated {
        Ok(()) => panic!("the truncate did not wait on the stalled backend: the test exercised nothing"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    while std::fs::metadata(s.path("backend/clean")).unwrap().len() != 5 {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "the truncate never reached the backend"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        std::fs::metadata(s.path("mnt/clean")).unwrap().len(),
        5,
        "the kernel still shows the size from before the truncate"
    );
    assert_eq!(std::fs::read(s.path("mnt/clean")).unwrap(), b"on th");
    m.umount();
}

/// A mkdir that waits on a stalled backend (for its parent's default ACL)
/// is answered EIO after `request_timeout`, then happens once the backend
/// is back: the new directory shows through the mount at once, although
/// the kernel had cached the name as missing just before (the daemon tells
/// it to forget that).
#[test]
fn a_name_made_after_its_request_timed_out_shows_at_once() {
    let s = Scratch::new();
    std::fs::create_dir(s.path("backend/d")).unwrap();
    let look = |mnt: &Path| {
        std::fs::read_dir(mnt.join("d")).unwrap().for_each(drop);
        assert!(!mnt.join("d/x").exists());
    };
    let m = mount_stalling_after(&s, "", look);
    let t = std::time::Instant::now();
    match std::fs::create_dir(s.path("mnt/d/x")) {
        Ok(()) => panic!("the mkdir did not wait on the stalled backend: the test exercised nothing"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    // The stall ends 4 s after it began; the mkdir then completes on the
    // backend, and the mount shows it well within the 30 s the kernel would
    // otherwise trust its cached miss (attr_ttl).
    while !s.path("backend/d/x").is_dir() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "the mkdir never reached the backend"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let shown = std::time::Instant::now();
    while std::fs::metadata(s.path("mnt/d/x")).is_err() {
        assert!(
            shown.elapsed() < std::time::Duration::from_secs(5),
            "still hidden by the kernel's cached lookup"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(std::fs::metadata(s.path("mnt/d/x")).unwrap().is_dir());
    m.sync();
    assert!(s.path("backend/d/x").is_dir());
    m.umount();
}

/// An op the backend keeps refusing with a transient error is retried, and
/// `efscache status` names it and the backend's error while it waits (not
/// only a growing retry count).
#[test]
fn status_names_the_op_that_keeps_being_retried() {
    let s = Scratch::new();
    let mut m = Mount::start(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        "debounce=0ms,fault_rate=1.0,fault_ops=mkdir,fault_errno=ESTALE",
    );
    assert!(m.status()["last_retry"].is_null(), "{}", m.status());
    std::fs::create_dir(s.path("mnt/stuck")).unwrap();
    let t = std::time::Instant::now();
    while counter(&m, "retries") < 2 {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "no retries: {}",
            m.status()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let r = &m.status()["last_retry"];
    assert_eq!(r["op"], "mkdir", "{r}");
    assert!(r["path"].as_str().unwrap().ends_with("stuck"), "{r}");
    assert!(r["error"].as_str().unwrap().contains("Stale file handle"), "{r}");
    assert!(r["attempts"].as_u64().unwrap() >= 1, "{r}");
    let text = run(Command::new(common::BIN).arg("status").arg(s.path("mnt")));
    assert!(text.contains("RETRYING mkdir") && text.contains("stuck"), "{text}");
    m.kill9();
    drop(m);
    assert!(
        !s.path("backend/stuck").exists(),
        "the refused mkdir reached the backend"
    );
}

/// A cache dir on a 4 MiB tmpfs, unmounted when dropped (after the mount on
/// it: declare it first).
struct SmallCacheDisk(std::path::PathBuf);

impl SmallCacheDisk {
    fn new(path: std::path::PathBuf) -> SmallCacheDisk {
        std::fs::create_dir_all(&path).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "efscache-test-cache"])
            .arg(&path));
        SmallCacheDisk(path)
    }
}

impl Drop for SmallCacheDisk {
    fn drop(&mut self) {
        let _ = fusemount::unmount(&self.0, true);
    }
}

/// Fills the cache disk, then makes changes until the journal cannot record
/// one (its last page full too); returns how many were acknowledged and
/// removes the filler again (space is back, the journal stays unhealthy).
fn break_the_journal(s: &Scratch, cache: &Path) -> usize {
    let mut filler = std::fs::File::create(cache.join("filler")).unwrap();
    while std::io::Write::write_all(&mut filler, &[7u8; 65536]).is_ok() {}
    let _ = std::io::Write::write_all(&mut filler, &[7u8; 512]); // the last partial block
    let mut made = 0;
    let refused = loop {
        match std::fs::create_dir(s.path(&format!("mnt/d{made}"))) {
            Ok(()) if made < 2000 => made += 1,
            Ok(()) => panic!("a journal on a full disk took every change"),
            Err(e) => break e,
        }
    };
    assert_eq!(refused.raw_os_error(), Some(libc::EIO), "{refused}");
    drop(filler);
    std::fs::remove_file(cache.join("filler")).unwrap();
    made
}

/// The cache dir's disk fills up: the journal cannot record a change, so
/// that change and every later one fail with EIO instead of being
/// acknowledged without crash safety (also once space is back: the mount
/// says to remount), fsync fails, and status says why. What was
/// acknowledged before still reaches the backend, an unmount that published
/// everything leaves an empty journal, and the next mount works.
#[test]
fn a_journal_that_cannot_be_written_refuses_changes_and_loses_nothing() {
    let s = Scratch::new();
    let cache = s.path("cache");
    let _disk = SmallCacheDisk::new(cache.clone());
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &cache, "debounce=0ms");
    std::fs::write(s.path("mnt/before"), b"acknowledged before the disk filled").unwrap();
    let mut held = std::fs::File::create(s.path("mnt/held")).unwrap();
    std::io::Write::write_all(&mut held, b"written before, open throughout").unwrap();
    let made = break_the_journal(&s, &cache);
    assert!(
        made > 0,
        "the first change after the disk filled was refused: nothing to check"
    );
    let v = m.status();
    assert_eq!(v["journal"]["healthy"], false, "{v}");

    for (what, r) in [
        ("mkdir", std::fs::create_dir(s.path("mnt/after"))),
        ("create", std::fs::write(s.path("mnt/new"), b"x")),
        (
            "chmod",
            std::fs::set_permissions(
                s.path("mnt/before"),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            ),
        ),
        ("fsync", held.sync_all()),
    ] {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}");
    }
    let out = Command::new(common::BIN)
        .arg("status")
        .arg(s.path("mnt"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("CANNOT WRITE"), "{text}");

    drop(held);
    m.sync();
    let backend = |p: &str| std::fs::read_to_string(s.path("backend").join(p)).ok();
    assert_eq!(
        backend("before").as_deref(),
        Some("acknowledged before the disk filled")
    );
    assert_eq!(backend("held").as_deref(), Some("written before, open throughout"));
    for i in 0..made {
        assert!(
            s.path(&format!("backend/d{i}")).is_dir(),
            "acknowledged mkdir d{i} is missing"
        );
    }
    m.umount();

    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &cache, "debounce=0ms");
    assert_eq!(m.status()["journal"]["healthy"], true);
    assert_eq!(
        m.recovery(),
        serde_json::Value::Null,
        "a clean unmount left work in the journal"
    );
    std::fs::create_dir(s.path("mnt/after")).expect("mkdir on the next mount");
    m.umount();
}

/// The same, but the daemon is killed after the journal broke: the journal
/// it left ends at its last whole record, so the next mount recovers every
/// change acknowledged before, and nothing is reported lost. The file is
/// published after the journal broke (its debounce), so the journal still
/// names its staging file, which must have been kept.
#[test]
fn a_crash_after_the_journal_broke_loses_nothing_acknowledged() {
    let s = Scratch::new();
    let cache = s.path("cache");
    let _disk = SmallCacheDisk::new(cache.clone());
    std::fs::create_dir_all(s.path("backend")).unwrap();
    std::fs::write(s.path("backend/existing"), b"the old content").unwrap();
    let mut m = Mount::start(&s.path("backend"), &s.path("mnt"), &cache, "debounce=2s,keep_clean=0");
    std::fs::write(s.path("mnt/before"), b"acknowledged before the disk filled").unwrap();
    std::fs::write(s.path("mnt/existing"), b"rewritten before the disk filled").unwrap();
    let made = break_the_journal(&s, &cache);
    assert!(!s.path("backend/before").exists(), "published before the journal broke");
    // Published now, with neither their done marks nor their states' ends
    // journaled (the rewritten file's state still expects the old one).
    let t = std::time::Instant::now();
    let backend = |p: &str| std::fs::read_to_string(s.path("backend").join(p)).ok();
    while !s.path("backend/before").exists()
        || backend("existing").as_deref() != Some("rewritten before the disk filled")
    {
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "not published");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    m.kill9();
    drop(m);

    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &cache, "debounce=0ms");
    m.sync();
    let r = m.recovery();
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(m.status()["failures"], serde_json::json!([]));
    assert_eq!(
        backend("before").as_deref(),
        Some("acknowledged before the disk filled")
    );
    assert_eq!(backend("existing").as_deref(), Some("rewritten before the disk filled"));
    for i in 0..made {
        assert!(
            s.path(&format!("backend/d{i}")).is_dir(),
            "acknowledged mkdir d{i} is missing"
        );
    }
    let lost = std::fs::read_dir(cache.join("lost+found"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(lost, 0, "recovery put something in lost+found");
    m.umount();
}
