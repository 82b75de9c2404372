//! Real-mount tests of the core: rsync fidelity, write-back behaviour,
//! identity, metadata loading, stacking safety and bad input. Every test
//! mounts through `common::Mount`, which unmounts on every path.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn rsync(src: &Path, dst: &Path, extra: &[&str]) -> String {
    let mut c = Command::new("rsync");
    c.args(["-aH", "--numeric-ids"])
        .args(extra)
        .arg(format!("{}/", src.display()))
        .arg(dst);
    run(&mut c)
}

/// SEMANTICS.md "Fidelity": after `sync` the backend equals what rsync -aH
/// --numeric-ids writing directly would produce; rsync's temp names never
/// reach the backend; a second rsync transfers nothing and writes no data.
#[test]
fn rsync_tree_is_published_faithfully_and_resync_is_free() {
    let s = Scratch::new();
    make_tree(&s.path("src"), 7, Some(64 << 20));
    // Record every name created on the backend while the rsync runs.
    let mut watch = Command::new("inotifywait")
        .args(["-m", "-r", "-e", "create,moved_to", "--format", "%f"])
        .arg(s.path("backend"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("inotifywait (package inotify-tools)");
    struct Reap(u32);
    impl Drop for Reap {
        fn drop(&mut self) {
            // SAFETY: signalling the watcher this test started (already reaped is harmless).
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
    let _reap = Reap(watch.id());
    // Start only once every watch is in place (inotifywait says so on stderr).
    let mut said = String::new();
    // (Its stderr stays open until the end, so a later message cannot kill it.)
    let mut stderr_lines = std::io::BufReader::new(watch.stderr.take().unwrap()).lines();
    for line in stderr_lines.by_ref() {
        let line = line.expect("inotifywait's stderr");
        said += &line;
        if line.contains("Watches established") {
            break;
        }
    }
    assert!(
        said.contains("Watches established"),
        "inotifywait did not start: {said}"
    );
    // The default debounce: rsync renames its temp file right after closing
    // it, but on a loaded machine "right after" took longer than 50 ms.
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "");
    rsync(&s.path("src"), &s.path("mnt").join("dst"), &[]);
    m.sync();
    assert_same_tree(&s.path("src"), &s.path("backend").join("dst"));
    assert_same_tree(&s.path("src"), &s.path("mnt").join("dst"));

    std::thread::sleep(Duration::from_millis(300));
    let _ = watch.kill();
    let mut raw = Vec::new();
    watch.stdout.take().unwrap().read_to_end(&mut raw).unwrap();
    let names = String::from_utf8_lossy(&raw);
    let _ = watch.wait();
    let created: Vec<&str> = names.lines().collect();
    assert!(created.len() > 50, "inotify saw the publishes: {}", created.len());
    for n in &created {
        // rsync's temp files are ".NAME.XXXXXX"; efscache's own are ".efscache.*".
        let rsync_temp = n.starts_with('.') && !n.starts_with(".efscache.") && n.len() > 8;
        assert!(!rsync_temp, "an rsync temp name reached the backend: {n:?}");
    }

    // Second rsync: nothing to transfer, no backend data writes.
    let (writes, creates) = (m.backend_op("write"), m.backend_op("create"));
    let changes = rsync(&s.path("src"), &s.path("mnt").join("dst"), &["--itemize-changes"]);
    assert_eq!(changes.trim(), "", "second rsync changed something");
    m.sync();
    assert_eq!(
        m.backend_op("write"),
        writes,
        "no-change rsync wrote data to the backend"
    );
    assert_eq!(
        m.backend_op("create"),
        creates,
        "no-change rsync created files on the backend"
    );
    let after: Vec<String> = std::fs::read_dir(s.path("backend").join("dst"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".efscache."))
        .collect();
    assert!(after.is_empty(), "temp files left: {after:?}");
    m.umount();
}

/// Write-back: renames, unlinks, truncates and chmods of files that are still
/// waiting for their publish; read-your-writes; a directory rename with
/// dirty children; a file created and removed before its flush never reaches
/// the backend.
#[test]
fn changes_to_unpublished_files_land_correctly() {
    let s = Scratch::new();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=1h");
    let mnt = s.path("mnt");
    std::fs::create_dir_all(mnt.join("d/sub")).unwrap();
    std::fs::write(mnt.join("d/a"), b"aaaa").unwrap();
    std::fs::write(mnt.join("d/b"), b"bbbbbbbb").unwrap();
    std::fs::write(mnt.join("d/sub/c"), b"cc").unwrap();
    std::fs::write(mnt.join("d/gone"), b"never published").unwrap();
    std::fs::write(mnt.join("d/t"), b"truncate me please").unwrap();
    // Read-your-writes while dirty.
    assert_eq!(std::fs::read(mnt.join("d/a")).unwrap(), b"aaaa");
    std::fs::rename(mnt.join("d/a"), mnt.join("d/a2")).unwrap();
    std::fs::remove_file(mnt.join("d/gone")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("d/t"))
        .unwrap()
        .set_len(8)
        .unwrap();
    std::fs::set_permissions(mnt.join("d/b"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::rename(mnt.join("d"), mnt.join("e")).unwrap();
    std::fs::rename(mnt.join("e/sub"), mnt.join("sub2")).unwrap();
    assert!(
        !s.path("backend").join("e/a2").exists(),
        "nothing published before sync (debounce=1h)"
    );
    assert_eq!(std::fs::read(mnt.join("e/t")).unwrap(), b"truncate");
    m.sync();
    let b = s.path("backend");
    assert_eq!(std::fs::read(b.join("e/a2")).unwrap(), b"aaaa");
    assert_eq!(std::fs::read(b.join("e/t")).unwrap(), b"truncate");
    assert_eq!(std::fs::metadata(b.join("e/b")).unwrap().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read(b.join("sub2/c")).unwrap(), b"cc");
    for gone in ["d", "e/a", "e/gone", "e/sub"] {
        assert!(!b.join(gone).exists(), "{gone} should not exist on the backend");
    }
    // Changes after the publish: rewrite in place, rename over, unlink.
    std::fs::write(mnt.join("e/b"), b"new content").unwrap();
    std::fs::write(mnt.join("e/.tmp.XXXXXX"), b"replacement").unwrap();
    std::fs::rename(mnt.join("e/.tmp.XXXXXX"), mnt.join("e/a2")).unwrap();
    std::fs::remove_file(mnt.join("e/t")).unwrap();
    m.sync();
    assert_eq!(std::fs::read(b.join("e/b")).unwrap(), b"new content");
    assert_eq!(std::fs::read(b.join("e/a2")).unwrap(), b"replacement");
    assert!(!b.join("e/t").exists());
    assert!(!b.join("e/.tmp.XXXXXX").exists());
    assert_same_tree(&b, &mnt);
    m.umount();
}

/// Identity: hard links share one inode number (made through the mount and
/// existing on the backend); a write through one name shows through the
/// other; st_ino is stable across a publish and, for backend files, across a
/// remount.
#[test]
fn inode_numbers_are_stable_and_hard_links_share_one() {
    let s = Scratch::new();
    std::fs::write(s.path("backend/old"), b"old").unwrap();
    std::fs::hard_link(s.path("backend/old"), s.path("backend/old.link")).unwrap();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=1h");
    let mnt = s.path("mnt");
    let ino = |p: &str| std::fs::symlink_metadata(mnt.join(p)).unwrap().ino();
    assert_eq!(ino("old"), ino("old.link"));
    let old_ino = ino("old");
    std::fs::write(mnt.join("new"), b"v1").unwrap();
    std::fs::hard_link(mnt.join("new"), mnt.join("new.link")).unwrap();
    assert_eq!(ino("new"), ino("new.link"));
    let before = ino("new");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(mnt.join("new.link"))
        .unwrap();
    f.write_all(b"+more").unwrap();
    drop(f);
    assert_eq!(std::fs::read(mnt.join("new")).unwrap(), b"v1+more");
    m.sync();
    assert_eq!(ino("new"), before, "st_ino changed across the publish");
    let b = s.path("backend");
    assert_eq!(
        std::fs::metadata(b.join("new")).unwrap().ino(),
        std::fs::metadata(b.join("new.link")).unwrap().ino()
    );
    assert_eq!(std::fs::read(b.join("new.link")).unwrap(), b"v1+more");
    m.umount();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "");
    assert_eq!(ino("old"), old_ino, "a backend file's st_ino changed across a remount");
    m.umount();
}

/// Loading a directory of 10,000 entries costs one directory sweep; later
/// lookups and misses cost no backend call (exclusive mode).
#[test]
fn big_directory_loads_in_one_sweep_and_then_costs_nothing() {
    let s = Scratch::new();
    let d = s.path("backend/big");
    std::fs::create_dir(&d).unwrap();
    for i in 0..10_000 {
        std::fs::write(d.join(format!("file{i:05}")), b"x").unwrap();
    }
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "exclusive");
    // (The mount itself stats the root, and probes what the backend accepts.)
    let (sweeps_at_mount, stats_at_mount) = (m.backend_op("readdir"), m.backend_op("stat"));
    let list = run(Command::new("ls").arg("-l").arg(s.path("mnt/big")));
    assert_eq!(list.lines().count(), 10_001);
    let (sweeps, stats) = (m.backend_op("readdir"), m.backend_op("stat"));
    assert_eq!(sweeps - sweeps_at_mount, 2, "one sweep of the root and one of big/");
    assert!(stats - stats_at_mount <= 10_001, "stats: {}", stats - stats_at_mount);
    for i in (0..10_000).step_by(7) {
        std::fs::symlink_metadata(s.path("mnt/big").join(format!("file{i:05}"))).unwrap();
    }
    assert!(std::fs::symlink_metadata(s.path("mnt/big/nope")).is_err());
    let after = m.status()["backend_ops"]["ops"].clone();
    assert_eq!(after["readdir"].as_u64(), Some(sweeps));
    assert_eq!(
        after["stat"].as_u64(),
        Some(stats),
        "lookups after the load reached the backend"
    );
    m.umount();
}

/// A directory listed while entries are added and removed returns no
/// duplicates and skips no entry that existed throughout.
#[test]
fn readdir_offsets_stay_valid_while_the_directory_changes() {
    let s = Scratch::new();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "");
    let d = s.path("mnt/dir");
    std::fs::create_dir(&d).unwrap();
    for i in 0..3000 {
        std::fs::File::create(d.join(format!("keep{i:04}"))).unwrap();
        std::fs::File::create(d.join(format!("drop{i:04}"))).unwrap();
    }
    let mut seen = HashSet::new();
    let mut it = std::fs::read_dir(&d).unwrap();
    for _ in 0..200 {
        let n = it.next().unwrap().unwrap().file_name();
        assert!(seen.insert(n.clone()), "duplicate {n:?}");
    }
    for i in 0..3000 {
        std::fs::remove_file(d.join(format!("drop{i:04}"))).unwrap();
        std::fs::File::create(d.join(format!("added{i:04}"))).unwrap();
    }
    for e in it {
        let n = e.unwrap().file_name();
        assert!(seen.insert(n.clone()), "duplicate {n:?}");
    }
    for i in 0..3000 {
        let k = std::ffi::OsString::from(format!("keep{i:04}"));
        assert!(seen.contains(&k), "skipped {k:?}");
    }
    m.umount();
}

/// Known hazard: efscache stacked on another mount at the same path; an
/// external umount of efscache must never take the lower mount with it.
#[test]
fn stacked_on_another_mount_an_external_umount_leaves_the_lower_one() {
    let s = Scratch::new();
    let lower_mount = common::LowerMount::new(&s);
    let lower = lower_mount.path.clone();
    std::fs::write(lower.join("precious"), b"on efs").unwrap();
    let mut m = Mount::start(&lower, &lower, &s.path("cache"), "debounce=10ms");
    std::fs::write(lower.join("through-cache"), b"cached").unwrap();
    m.sync();
    run(Command::new("umount").arg(&lower));
    let mut child = m.child.take().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "daemon exit after external umount: {status}");
    let top = fusemount::top_mount_at(&lower)
        .unwrap()
        .expect("lower mount still there");
    assert_eq!(top.fstype, "tmpfs", "the lower mount must survive");
    assert_eq!(std::fs::read(lower.join("precious")).unwrap(), b"on efs");
    assert_eq!(std::fs::read(lower.join("through-cache")).unwrap(), b"cached");
}

/// Bad input: a clear one-line error, a non-zero exit, nothing mounted.
#[test]
fn bad_input_is_refused_clearly() {
    let s = Scratch::new();
    std::fs::write(s.path("afile"), b"x").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["-o".into(), "flushers=0".into()], "between 1 and 1024"),
        (vec!["-o".into(), "nosuchoption".into()], "unknown option"),
        (vec!["-o".into(), "debounce=soon".into()], "duration"),
        (
            vec!["-o".into(), "fuse_cpus=1023".into()],
            "CPU 1023 is not one this daemon may run on",
        ),
        (
            vec!["-o".into(), format!("cache_dir={}", s.path("backend/cache").display())],
            "inside the backend",
        ),
    ];
    for (extra, needle) in cases {
        let out = Command::new(BIN)
            .arg("mount")
            .args(&extra)
            .arg(s.path("backend"))
            .arg(s.path("mnt"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(!is_efscache_mounted(&s.path("mnt")));
    }
    for (backend, needle) in [
        (s.path("missing"), "No such file"),
        (s.path("afile"), "not a directory"),
    ] {
        let out = Command::new(BIN)
            .arg("mount")
            .arg(&backend)
            .arg(s.path("mnt"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{}: {err}",
            backend.display()
        );
        assert!(!is_efscache_mounted(&s.path("mnt")));
    }
    let out = Command::new(BIN).arg("sync").arg(s.path("mnt")).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the efscache daemon"));
}

/// FUSE passthrough carries the data of open staged files (the kernel here
/// supports it), and fio's verified writes through it land intact.
#[test]
fn fio_writes_through_passthrough_verify_and_publish() {
    let s = Scratch::new();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=50ms");
    assert_eq!(m.status()["data_path"], "passthrough");
    // Global options (the directory) come before the first job. Large files
    // sequential and random, and four jobs of four small files each.
    let jobs = [
        "--name=seq",
        "--rw=write",
        "--bs=1M",
        "--size=32M",
        "--name=rand",
        "--rw=randwrite",
        "--bs=4k",
        "--size=8M",
        "--name=small",
        "--rw=randwrite",
        "--bs=4k",
        "--size=256k",
        "--numjobs=4",
        "--nrfiles=4",
    ];
    let fio = |dir: &Path, extra: &[&str]| {
        run(Command::new("fio")
            .current_dir(s.path("cache"))
            .arg(format!("--directory={}", dir.display()))
            .args(["--verify=crc32c", "--do_verify=1"])
            .args(extra)
            .args(jobs));
    };
    fio(&s.path("mnt"), &[]);
    m.sync();
    // fio checks its own checksums again, reading the backend directly.
    fio(&s.path("backend"), &["--verify_only"]);
    let files: Vec<_> = std::fs::read_dir(s.path("mnt")).unwrap().collect();
    assert_eq!(files.len(), 2 + 16, "every fio file is in the mount");
    for f in files {
        let name = f.unwrap().file_name();
        let a = std::fs::read(s.path("mnt").join(&name)).unwrap();
        let b = std::fs::read(s.path("backend").join(&name)).unwrap();
        assert!(a == b, "{name:?} differs between the mount and the backend");
    }
    m.umount();
}

/// A `cache_dir=` that does not exist yet is created, 0700 (fstab lines name
/// one before anything made it); one inside the backend is still refused.
#[test]
fn a_missing_cache_dir_is_created_private() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    let cache = s.path("var/cache/efscache/new");
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &cache, "");
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    m.umount();
    let inside = s.path("backend/cache");
    let out = Command::new(BIN)
        .args(["mount", "-o"])
        .arg(format!("cache_dir={}", inside.display()))
        .arg(s.path("backend"))
        .arg(s.path("mnt"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lies inside the backend"),
        "{out:?}"
    );
    assert!(!inside.exists(), "a refused cache dir was created inside the backend");
    assert!(!is_efscache_mounted(&s.path("mnt")));
}

#[test]
fn a_cache_dir_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    let cache = s.path("shared-cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::create_dir_all(s.path("backend")).unwrap();
    for mode in [0o777, 0o770, 0o1777] {
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = common::try_mount(&s.path("backend"), &s.path("mnt"), &cache, "");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "mounted with a cache dir of mode {mode:o}");
        assert!(
            err.contains("group/world writable") && err.contains("chmod 700"),
            "{err}"
        );
        assert!(!is_efscache_mounted(&s.path("mnt")));
        let now = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o7777;
        assert_eq!(now, mode, "the cache dir's mode was changed behind the owner's back");
    }
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    Mount::start(&s.path("backend"), &s.path("mnt"), &cache, "").umount();
}

/// A name another client creates on the backend shows through the mount
/// within `attr_ttl` of the listing that lacked it, also when it was looked
/// up (and found missing) late in that listing's life: the kernel caches a
/// missing name only as long as the daemon trusts the listing.
#[test]
fn a_name_another_client_creates_appears_within_attr_ttl_of_the_listing() {
    use std::time::Instant;
    let sleep_until = |t: Instant| std::thread::sleep(t.saturating_duration_since(Instant::now()));
    let s = Scratch::new();
    std::fs::create_dir(s.path("backend/d")).unwrap();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "attr_ttl=2s");
    assert_eq!(std::fs::read_dir(s.path("mnt/d")).unwrap().count(), 0);
    // (After the listing, which a slow machine may take long to load: the
    // daemon trusts it from when it was loaded, before this.)
    let listed = Instant::now();
    sleep_until(listed + Duration::from_millis(1500));
    assert!(!s.path("mnt/d/new").exists());
    std::fs::write(s.path("backend/d/new"), "theirs").unwrap();
    sleep_until(listed + Duration::from_millis(3200));
    let seen = std::fs::read_to_string(s.path("mnt/d/new")).expect("still hidden by the kernel's cached lookup");
    assert_eq!(seen, "theirs");
    m.umount();
}

/// `efscache sync` right after a close publishes the file just closed:
/// close(2) returns before the kernel tells the daemon (RELEASE), so sync
/// gives files still open for writing a moment to be released instead of
/// leaving them out (here the close lands while sync already runs).
#[test]
fn sync_right_after_a_close_publishes_the_closed_file() {
    let s = Scratch::new();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=1h");
    let mut f = std::fs::File::create(s.path("mnt/f")).unwrap();
    f.write_all(b"closed during the sync").unwrap();
    let closer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(f);
    });
    m.sync();
    closer.join().unwrap();
    assert_eq!(
        std::fs::read_to_string(s.path("backend/f")).ok().as_deref(),
        Some("closed during the sync"),
        "sync returned without the file closed while it ran"
    );
    m.umount();
}

/// With `fsync=remote`, fsync publishes a file that is still open for
/// writing (by the caller itself, as in write, fsync, close), and what is
/// written after the fsync is published after the close.
#[test]
fn fsync_remote_publishes_a_file_still_open_for_writing() {
    let s = Scratch::new();
    let opts = "fsync=remote,request_timeout=10s,debounce=1h";
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), opts);
    let backend = || std::fs::read_to_string(s.path("backend/f")).ok();
    let mtime = |p: &str| std::fs::metadata(s.path(p)).unwrap().modified().unwrap();
    let mut f = std::fs::File::create(s.path("mnt/f")).unwrap();
    std::thread::sleep(Duration::from_millis(20)); // the write's mtime differs from the create's
    f.write_all(b"before the fsync").unwrap();
    f.sync_all().expect("fsync=remote of a file open for writing");
    assert_eq!(backend().as_deref(), Some("before the fsync"));
    assert_eq!(
        mtime("backend/f"),
        mtime("mnt/f"),
        "published with the mtime of its open"
    );
    f.write_all(b", after it").unwrap();
    f.sync_all().expect("a second fsync");
    assert_eq!(backend().as_deref(), Some("before the fsync, after it"));
    f.write_all(b", then closed").unwrap();
    drop(f);
    m.sync();
    assert_eq!(backend().as_deref(), Some("before the fsync, after it, then closed"));
    m.umount();
}

/// With `fsync=remote`, an fsync whose publish fails for good (the backend
/// refuses it) returns EIO: the data is not on the backend.
#[test]
fn fsync_remote_reports_a_publish_that_failed() {
    let s = Scratch::new();
    let opts = "fsync=remote,request_timeout=10s,debounce=1h,fault_rate=1,fault_ops=create,fault_errno=EACCES";
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), opts);
    let mut f = std::fs::File::create(s.path("mnt/f")).unwrap();
    f.write_all(b"refused by the backend").unwrap();
    let e = f.sync_all().expect_err("fsync=remote of a file the backend refuses");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(!s.path("backend/f").exists());
    drop(f);
    drop(m); // failures stay: no clean unmount to assert on
}

/// A listing (readdirplus, which hands the kernel attributes to cache) of a
/// directory with a file being written through passthrough shows the size
/// the writes gave it, not the size at its open.
#[test]
fn a_listing_shows_the_size_of_a_file_being_written() {
    let s = Scratch::new();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "");
    let mut f = std::fs::File::create(s.path("mnt/f")).unwrap();
    f.write_all(&[7u8; 100]).unwrap();
    let names: Vec<_> = std::fs::read_dir(s.path("mnt"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.iter().any(|n| n == "f"), "{names:?}");
    assert_eq!(
        std::fs::metadata(s.path("mnt/f")).unwrap().len(),
        100,
        "size after a listing"
    );
    drop(f);
    m.umount();
}

/// A reader that opened a file when it was only on the backend reads what a
/// writer through the mount made of it since (once the kernel's cached pages
/// are dropped, its reads come to the daemon).
#[test]
fn a_reader_opened_before_a_rewrite_reads_the_new_content() {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("backend")).unwrap();
    std::fs::write(s.path("backend/f"), vec![b'a'; 8192]).unwrap();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=1h");
    let reader = std::fs::File::open(s.path("mnt/f")).unwrap();
    std::fs::write(s.path("mnt/f"), vec![b'b'; 8192]).unwrap();
    // SAFETY: a valid open fd; advice only.
    unsafe { libc::posix_fadvise(reader.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut buf = [0u8; 4096];
    let n = reader.read_at(&mut buf, 4096).unwrap();
    assert_eq!(n, 4096);
    assert!(
        buf.iter().all(|b| *b == b'b'),
        "the reader sees the backend's old content"
    );
    drop(reader);
    m.umount();
}

/// The same for `lseek(SEEK_HOLE)`: a handle opened when the file was only
/// on the backend finds the holes of what a writer through the mount made
/// of it since, not those of the backend's old file.
#[test]
fn a_reader_opened_before_a_rewrite_finds_the_new_holes() {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("backend")).unwrap();
    std::fs::write(s.path("backend/f"), vec![b'a'; 12288]).unwrap();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=1h");
    let reader = std::fs::File::open(s.path("mnt/f")).unwrap();
    let seek_hole = |f: &std::fs::File| {
        // SAFETY: a valid open fd.
        unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) }
    };
    assert_eq!(seek_hole(&reader), 12288, "the backend's file has no hole");
    // Rewritten with a hole in the middle: 4 KiB of data, 4 KiB of hole, 4 KiB of data.
    let w = std::fs::File::create(s.path("mnt/f")).unwrap();
    w.write_all_at(&[b'b'; 4096], 0).unwrap();
    w.write_all_at(&[b'b'; 4096], 8192).unwrap();
    drop(w);
    assert_eq!(seek_hole(&reader), 4096, "the reader finds the backend's old holes");
    drop(reader);
    m.umount();
}

/// A write clears setuid and setgid (with group execute) unless the writer
/// is root (CAP_FSETID), as on a local filesystem; the kernel does it, with
/// a setattr before the write.
#[test]
fn a_write_clears_setuid_unless_the_writer_is_root() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("backend")).unwrap();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "allow_other");
    std::fs::set_permissions(s.path("mnt"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mode = |f: &str| std::fs::metadata(s.path("mnt").join(f)).unwrap().permissions().mode() & 0o7777;
    for f in ["by-root", "by-nobody"] {
        std::fs::write(s.path("mnt").join(f), b"x").unwrap();
        std::fs::set_permissions(s.path("mnt").join(f), std::fs::Permissions::from_mode(0o6777)).unwrap();
    }
    let append = |f: &str, as_nobody: bool| {
        let path = s.path("mnt").join(f);
        let mut c = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh"]);
            c
        } else {
            Command::new("sh")
        };
        let out = c.arg("-c").arg("printf y >> \"$0\"").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "append to {f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    append("by-root", false);
    append("by-nobody", true);
    assert_eq!(format!("{:o}", mode("by-root")), "6777", "root's write kept the bits");
    assert_eq!(
        format!("{:o}", mode("by-nobody")),
        "777",
        "another user's write cleared them"
    );
    m.sync();
    let backend = |f: &str| {
        std::fs::metadata(s.path("backend").join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!((backend("by-root"), backend("by-nobody")), (0o6777, 0o777));
    m.umount();
}

/// Each of the daemon's threads: its name and the contents of its
/// `/proc/PID/task/TID/<file>`.
fn daemon_threads(pid: u32, file: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let (Ok(comm), Ok(text)) = (
            std::fs::read_to_string(t.path().join("comm")),
            std::fs::read_to_string(t.path().join(file)),
        ) else {
            continue; // the thread ended meanwhile
        };
        out.push((comm.trim().to_string(), text));
    }
    out
}

/// The nice value of each of the daemon's threads, by thread name.
fn thread_nice(pid: u32) -> Vec<(String, i64)> {
    daemon_threads(pid, "stat")
        .into_iter()
        .map(|(name, stat)| {
            // Fields after the parenthesised name start with field 3 (state);
            // nice is field 19.
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            (name, after.split(' ').nth(16).unwrap().parse().unwrap())
        })
        .collect()
}

/// CONFIGURATION.md `flush_nice`: publishing runs 10 nice steps below the
/// threads that answer applications by default; `flush_nice=0` keeps it level.
#[test]
fn flush_workers_run_at_a_lower_cpu_priority() {
    for (opts, steps) in [("", 10), ("flush_nice=0", 0)] {
        let s = Scratch::new();
        let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), opts);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let (base, flush) = loop {
            let threads = thread_nice(m.pid());
            let base = threads.iter().find(|(n, _)| n == "efscache").expect("main thread").1;
            let flush: Vec<i64> = threads
                .iter()
                .filter(|(n, _)| n.starts_with("efscache-flush"))
                .map(|t| t.1)
                .collect();
            let want = (base + steps).min(19);
            if flush.len() == 32 && flush.iter().all(|&n| n == want) || std::time::Instant::now() > deadline {
                break (base, flush);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(flush.len(), 32, "flush workers found ({opts:?})");
        assert!(
            flush.iter().all(|&n| n == (base + steps).min(19)),
            "{opts:?}: flush workers' nice {flush:?}, daemon's {base}"
        );
        let fuse: Vec<i64> = thread_nice(m.pid())
            .into_iter()
            .filter(|(n, _)| !n.starts_with("efscache-flush"))
            .map(|t| t.1)
            .collect();
        assert!(
            fuse.iter().all(|&n| n == base),
            "{opts:?}: other threads' nice {fuse:?}"
        );
        m.umount();
    }
}

/// Each of the daemon's threads, by name, with the CPUs it may run on as
/// /proc writes them (`0`, `0-1`).
fn thread_cpus(pid: u32) -> Vec<(String, String)> {
    daemon_threads(pid, "status")
        .into_iter()
        .map(|(name, status)| {
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .expect("Cpus_allowed_list")
                .trim()
                .to_string();
            (name, cpus)
        })
        .collect()
}

/// CONFIGURATION.md `fuse_cpus`: the threads that answer the kernel's
/// requests run only on the listed CPUs; every other thread keeps the CPUs
/// the daemon was started with, and requests are still answered.
#[test]
fn fuse_cpus_confines_the_request_threads_and_nothing_else() {
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string();
    let s = Scratch::new();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "fuse_cpus=0");
    std::fs::write(s.path("mnt/answered"), b"yes").unwrap();
    assert_eq!(std::fs::read(s.path("mnt/answered")).unwrap(), b"yes");
    let threads = thread_cpus(m.pid());
    let fuse: Vec<&(String, String)> = threads.iter().filter(|(n, _)| n.starts_with("fuser-")).collect();
    assert_eq!(fuse.len(), 4, "event loops: {threads:?}");
    assert!(fuse.iter().all(|(_, c)| c == "0"), "event loops not on CPU 0: {fuse:?}");
    let flush: Vec<&(String, String)> = threads
        .iter()
        .filter(|(n, _)| n.starts_with("efscache-flush") || n.starts_with("efscache-io"))
        .collect();
    assert!(flush.len() >= 64, "flush and io threads: {threads:?}");
    assert!(
        flush.iter().all(|(_, c)| *c == own),
        "flush and io threads should keep the daemon's CPUs ({own}): {flush:?}"
    );
    m.umount();
    let out = try_mount(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "fuse_cpus=0,1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("fuse_cpus=0:2"), "{err}");
    assert!(!is_efscache_mounted(&s.path("mnt")));
}
