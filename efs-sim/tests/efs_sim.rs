//! efs-sim's own behaviour on real FUSE mounts: latencies overlap across
//! concurrent requests, counts are right, faults come at the requested rate,
//! a stall hangs requests and then clears, refusals match EFS, and an rsync
//! onto the mount lands exactly in the backing directory.
#![deny(clippy::undocumented_unsafe_blocks)]

mod common;

use std::ffi::CString;
use std::fs;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Sim, can_mount, is_mounted};

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL")
}

#[test]
fn concurrent_requests_overlap_their_latency() {
    if !can_mount() {
        return;
    }
    const N: usize = 64;
    const LAT_MS: u64 = 20;
    let sim = Sim::start_with(
        &["--profile", "local", "--read-latency-ms", "20", "--max-inflight", "128"],
        |b| {
            for i in 0..N {
                fs::write(b.join(format!("f{i}")), b"x").expect("seed file");
            }
            fs::write(b.join("serial"), b"x").expect("seed file");
        },
    );
    // One stat on its own pays the latency (a lookup round trip).
    let t = Instant::now();
    fs::metadata(sim.path("serial")).expect("stat");
    assert!(
        t.elapsed() >= Duration::from_millis(LAT_MS),
        "latency not applied: {:?}",
        t.elapsed()
    );
    // 64 in parallel cost about one latency, certainly far less than 64.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(N + 1));
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let p = sim.path(&format!("f{i}"));
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                fs::metadata(p).expect("stat");
            })
        })
        .collect();
    barrier.wait();
    let t = Instant::now();
    for th in threads {
        th.join().expect("stat thread");
    }
    let wall = t.elapsed();
    assert!(
        wall < Duration::from_millis(16 * LAT_MS),
        "64 parallel stats took {wall:?}; latencies do not overlap"
    );
}

#[test]
fn counts_every_request_by_kind() {
    if !can_mount() {
        return;
    }
    const N: usize = 50;
    let mut sim = Sim::start(&["--profile", "local"]);
    fs::create_dir(sim.path("d")).expect("mkdir");
    for i in 0..N {
        let mut f = fs::File::create(sim.path(&format!("d/f{i}"))).expect("create");
        f.write_all(b"hello").expect("write");
    }
    for i in 0..N {
        fs::remove_file(sim.path(&format!("d/f{i}"))).expect("unlink");
    }
    let (stats, stderr) = sim.stop();
    assert!(stats.op("create", "count") >= N as u64);
    assert!(stats.op("write", "count") >= N as u64);
    assert_eq!(stats.op("write", "bytes"), 5 * N as u64);
    assert!(stats.op("flush", "count") >= N as u64);
    assert!(stats.op("unlink", "count") >= N as u64);
    assert_eq!(stats.op("mkdir", "count"), 1);
    assert_eq!(stats.op("create", "errors"), 0);
    assert!(stats.top("requests") >= 4 * N as u64);
    assert!(
        stderr.contains("create") && stderr.contains("p99_ms"),
        "no summary on stderr: {stderr}"
    );
}

#[test]
fn counts_requests_as_an_nfs_client_sends_them() {
    if !can_mount() {
        return;
    }
    const N: usize = 20;
    let mut sim = Sim::start(&["--profile", "local"]);
    fs::create_dir(sim.path("d")).expect("mkdir"); // its lookup: not sent by NFS
    // A stat of a missing name is a LOOKUP on NFS too, even when the name is
    // created later: only the kernel's lookup right before the create is not.
    assert!(fs::symlink_metadata(sim.path("d/missing")).is_err());
    assert!(fs::symlink_metadata(sim.path("d/g")).is_err());
    fs::write(sim.path("d/g"), b"g").expect("create g");
    for i in 0..N {
        // temp file + rename, as a publish: the lookups of the temp name and
        // of the rename target are FUSE's alone.
        fs::write(sim.path(&format!("d/.tmp{i}")), b"data").expect("create temp");
        fs::rename(sim.path(&format!("d/.tmp{i}")), sim.path(&format!("d/f{i}"))).expect("rename");
    }
    let (stats, _) = sim.stop();
    assert_eq!(
        stats.op("lookup", "not_nfs"),
        2 * N as u64 + 2,
        "mkdir, create of g, 2 per publish"
    );
    let not_nfs: u64 = ["lookup", "getattr"].iter().map(|k| stats.op(k, "not_nfs")).sum();
    assert_eq!(stats.top("nfs_requests") + not_nfs, stats.top("requests"));
}

/// A lookup that finds nothing is answered at once. If the caller's next
/// request creates that name (the kernel's lookup before a create, which an
/// NFS client does not send) the lookup costs nothing; any other next request
/// pays the lookup's latency on top of its own.
#[test]
fn a_missing_name_is_paid_for_unless_it_is_created_next() {
    if !can_mount() {
        return;
    }
    let mut sim = Sim::start(&["--profile", "local", "--read-latency-ms", "300"]);
    fs::create_dir(sim.path("d")).expect("mkdir"); // its lookup: free
    let t = Instant::now();
    assert!(fs::symlink_metadata(sim.path("d/missing")).is_err());
    // This lookup pays for the one before: at least 300 ms in all.
    assert!(fs::symlink_metadata(sim.path("d/missing2")).is_err());
    let two_misses = t.elapsed();
    // This lookup pays for missing2; the create after it owes nothing.
    fs::write(sim.path("d/new"), b"x").expect("create");
    let (stats, _) = sim.stop();
    assert!(
        two_misses >= Duration::from_millis(300),
        "the first miss was never paid for: {two_misses:?}"
    );
    assert_eq!(stats.op("lookup", "not_nfs"), 2, "the lookups before mkdir and create");
    assert_eq!(stats.op("lookup", "round_trips"), 2, "missing and missing2");
    assert!(
        stats.op("lookup", "max_ms") >= 300,
        "the debt was not added to the next request"
    );
}

fn create_many(sim: &Sim, dir: &str, n: usize) -> Vec<Option<i32>> {
    fs::create_dir(sim.path(dir)).expect("mkdir");
    (0..n)
        .map(|i| {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(sim.path(&format!("{dir}/f{i}")))
                .err()
                .map(|e| e.raw_os_error().unwrap_or(-1))
        })
        .collect()
}

#[test]
fn faults_come_at_the_requested_rate_and_are_deterministic() {
    if !can_mount() {
        return;
    }
    const N: usize = 200;
    let args = [
        "--profile",
        "local",
        "--fail-rate",
        "0.5",
        "--fail-ops",
        "create",
        "--fail-errno",
        "ENOSPC",
        "--seed",
        "1",
    ];
    let mut sim = Sim::start(&args);
    let outcomes = create_many(&sim, "d", N);
    let failed = outcomes.iter().filter(|o| o.is_some()).count();
    assert!(
        outcomes.iter().flatten().all(|e| *e == libc::ENOSPC),
        "unexpected errno: {outcomes:?}"
    );
    assert!(
        (N * 3 / 10..=N * 7 / 10).contains(&failed),
        "{failed} of {N} creates failed at rate 0.5"
    );
    // A failed create left nothing behind.
    let landed = fs::read_dir(sim.backing.join("d")).expect("ls").count();
    assert_eq!(landed, N - failed);
    let (stats, _) = sim.stop();
    assert_eq!(stats.op("create", "injected"), failed as u64);
    assert_eq!(stats.op("mkdir", "injected"), 0);

    // Same seed, same sequence of creates: the same ones fail.
    let sim2 = Sim::start(&args);
    assert_eq!(create_many(&sim2, "d", N), outcomes);
}

#[test]
fn stall_hangs_requests_then_clears() {
    if !can_mount() {
        return;
    }
    let sim = Sim::start(&["--profile", "local", "--stall-after", "10", "--stall-secs", "2"]);
    let mut times = Vec::new();
    for i in 0..30 {
        let t = Instant::now();
        let r = fs::metadata(sim.path(&format!("missing{i}")));
        assert!(r.is_err());
        times.push(t.elapsed());
    }
    let slowest = times.iter().max().copied().unwrap_or_default();
    assert!(slowest >= Duration::from_millis(1500), "no request hung: {times:?}");
    let hung = times.iter().position(|t| *t >= Duration::from_millis(1500));
    assert!(hung.is_some_and(|i| i >= 5), "stalled too early: {times:?}");
    for t in &times[times.len() - 5..] {
        assert!(*t < Duration::from_millis(500), "stall did not clear: {times:?}");
    }
    // Service is back: writes work again.
    fs::write(sim.path("after"), b"ok").expect("write after stall");
    assert_eq!(fs::read(sim.backing.join("after")).expect("read"), b"ok");
}

#[test]
fn efs_typical_refuses_xattrs_devices_and_rename_flags() {
    if !can_mount() {
        return;
    }
    let sim = Sim::start(&["--profile", "efs-typical"]);
    let f = sim.path("f");
    fs::write(&f, b"x").expect("write");
    let cf = cpath(&f);
    let (name, value) = (c"user.test", b"1");
    // SAFETY: valid NUL-terminated strings and a readable value buffer.
    let rc = unsafe { libc::setxattr(cf.as_ptr(), name.as_ptr(), value.as_ptr().cast(), 1, 0) };
    assert_eq!(rc, -1);
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EOPNOTSUPP));
    let mut buf = [0u8; 64];
    // SAFETY: `buf` is writable for its length.
    let rc = unsafe { libc::listxattr(cf.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert_eq!(rc, -1);
    let dev = cpath(&sim.path("null"));
    // SAFETY: valid path; mknod of a char device (1,3).
    let rc = unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(1, 3)) };
    assert_eq!(rc, -1);
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EPERM));
    let fifo = cpath(&sim.path("fifo"));
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    assert!(
        fs::symlink_metadata(sim.backing.join("fifo"))
            .expect("fifo in backing")
            .file_type()
            .is_fifo()
    );
    // Rename flags: EINVAL, as from the Linux NFS client; a plain rename works.
    let g = cpath(&sim.path("g"));
    // SAFETY: valid paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cf.as_ptr(),
            libc::AT_FDCWD,
            g.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(rc, -1);
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EINVAL));
    assert!(f.exists() && !sim.path("g").exists());
    fs::rename(&f, sim.path("g")).expect("plain rename");
}

/// EFS's limits: 177 hard links to a file, symlink targets of 4080 bytes;
/// the local profile has neither.
#[test]
fn efs_typical_keeps_efs_limits_on_links_and_symlinks() {
    if !can_mount() {
        return;
    }
    for (profile, limited) in [("efs-typical", true), ("local", false)] {
        let sim = Sim::start(&["--profile", profile, "--meta-latency-ms", "0"]);
        let f = sim.path("f");
        fs::write(&f, b"x").expect("write");
        for i in 1..177 {
            fs::hard_link(&f, sim.path(&format!("l{i}"))).expect("link below the limit");
        }
        let r = fs::hard_link(&f, sim.path("l177"));
        let long = "t".repeat(4081);
        let s = std::os::unix::fs::symlink(&long, sim.path("s"));
        if limited {
            assert_eq!(
                r.expect_err("178th link").raw_os_error(),
                Some(libc::EMLINK),
                "{profile}"
            );
            assert_eq!(s.expect_err("long symlink").raw_os_error(), Some(libc::ENAMETOOLONG));
            std::os::unix::fs::symlink(&long[..4080], sim.path("s")).expect("4080-byte target");
            assert_eq!(fs::symlink_metadata(sim.backing.join("f")).expect("f").nlink(), 177);
        } else {
            r.expect("178th link without limits");
            s.expect("long symlink without limits");
        }
    }
}

#[test]
fn new_entries_belong_to_the_caller() {
    if !can_mount() {
        return;
    }
    let sim = Sim::start(&["--profile", "local"]);
    let pubdir = sim.path("pub");
    fs::create_dir(&pubdir).expect("mkdir");
    fs::set_permissions(&pubdir, fs::Permissions::from_mode(0o1777)).expect("chmod");
    let status = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c"])
        .arg("echo x > f && mkdir d && ln -s f l && touch -d @1000000000.123456789 f")
        .current_dir(&pubdir)
        .status();
    let Ok(status) = status else {
        eprintln!("skipping: setpriv not available");
        return;
    };
    assert!(status.success());
    for name in ["f", "d", "l"] {
        let m = fs::symlink_metadata(sim.backing.join("pub").join(name)).expect("stat");
        assert_eq!((m.uid(), m.gid()), (65534, 65534), "{name}");
    }
    let m = fs::metadata(sim.backing.join("pub/f")).expect("stat");
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_000_000_000, 123_456_789));
    assert_eq!(m.mode() & 0o777, 0o644);
}

/// Runs `script` in `dir` as uid/gid 65534 with the supplementary groups
/// `groups` (comma-separated, may be empty); None if setpriv is missing.
fn as_nobody(dir: &Path, groups: &str, script: &str) -> Option<std::process::Output> {
    let groups_arg = if groups.is_empty() {
        "--clear-groups".to_string()
    } else {
        format!("--groups={groups}")
    };
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", &groups_arg, "sh", "-c", script])
        .current_dir(dir)
        .output()
        .ok()
}

#[test]
fn the_server_checks_permissions_with_the_callers_groups() {
    if !can_mount() {
        return;
    }
    let sim = Sim::start(&["--profile", "local"]);
    // Owned by root, group 4242: open to that group only.
    let team = sim.path("team");
    fs::create_dir(&team).expect("mkdir");
    std::os::unix::fs::chown(&team, Some(0), Some(4242)).expect("chown");
    fs::set_permissions(&team, fs::Permissions::from_mode(0o770)).expect("chmod");
    fs::write(sim.path("rootfile"), b"r").expect("write");
    fs::set_permissions(sim.path("rootfile"), fs::Permissions::from_mode(0o644)).expect("chmod");

    let Some(out) = as_nobody(&sim.path(""), "", "echo x > team/f") else {
        eprintln!("skipping: setpriv not available");
        return;
    };
    assert!(!out.status.success(), "outside the group: create refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    assert!(!sim.backing.join("team/f").exists());

    let out = as_nobody(
        &sim.path(""),
        "4242",
        "echo x > team/f && test -w team && cd team && ln f g",
    )
    .expect("setpriv");
    assert!(out.status.success(), "a member of the group may: {out:?}");
    assert_eq!(fs::metadata(sim.backing.join("team/g")).expect("linked").nlink(), 2);
    let m = fs::metadata(sim.backing.join("team/f")).expect("created");
    assert_eq!((m.uid(), m.gid()), (65534, 65534));

    let out = as_nobody(&sim.path(""), "", "chmod 777 rootfile").expect("setpriv");
    assert!(!out.status.success(), "chmod of another user's file refused");
    assert_eq!(
        fs::metadata(sim.backing.join("rootfile")).expect("stat").mode() & 0o777,
        0o644
    );
    let out = as_nobody(&sim.path(""), "", "test -w rootfile").expect("setpriv");
    assert!(!out.status.success(), "access(W_OK) answers as the server checks");
}

/// More inodes than efs-sim keeps descriptors for: the others are reopened
/// by file handle, also inside a non-root caller's request.
#[test]
fn inodes_beyond_the_descriptor_budget_are_reopened_for_any_caller() {
    if !can_mount() {
        return;
    }
    let sim = Sim::start(&["--profile", "local", "--max-inode-fds", "16"]);
    let d = sim.path("d");
    fs::create_dir(&d).expect("mkdir");
    for i in 0..100 {
        fs::write(d.join(format!("f{i}")), format!("{i}")).expect("write");
    }
    let Some(out) = as_nobody(&d, "", "cat f* | wc -c && ls -l | wc -l") else {
        eprintln!("skipping: setpriv not available");
        return;
    };
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let counts: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(counts, ["190", "101"], "every file read and listed: {out:?}");
}

#[test]
fn external_unmount_ends_the_server_cleanly() {
    if !can_mount() {
        return;
    }
    let mut sim = Sim::start(&["--profile", "local"]);
    fs::write(sim.path("f"), b"x").expect("write");
    fusemount::unmount(&sim.mnt, false).expect("umount");
    let (status, stderr) = sim.wait(Duration::from_secs(10));
    assert!(status.success(), "{status}: {stderr}");
    assert!(sim.read_stats().op("create", "count") >= 1);
}

#[test]
fn crash_leaves_a_dead_mount() {
    if !can_mount() {
        return;
    }
    let mut sim = Sim::start(&["--profile", "local", "--crash-after", "5"]);
    for i in 0..10 {
        let _ = fs::metadata(sim.path(&format!("x{i}")));
    }
    let (status, _) = sim.wait(Duration::from_secs(10));
    assert!(!status.success());
    let err = fs::metadata(sim.path("x")).expect_err("dead mount");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN));
    assert!(is_mounted(&sim.mnt));
    // Dropping `sim` detaches the dead mount.
}

/// Builds a small tree with every kind of entry rsync -aH carries.
fn make_tree(src: &Path) {
    fs::create_dir_all(src.join("a/b/c")).expect("mkdir");
    let mut seed = 12345u64;
    for i in 0..40 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let len = 1 + (seed >> 33) as usize % 65536;
        let data: Vec<u8> = (0..len).map(|j| (j as u64 ^ seed) as u8).collect();
        let dir = if i % 3 == 0 { "a" } else { "a/b" };
        fs::write(src.join(format!("{dir}/f{i}")), data).expect("write");
    }
    fs::write(src.join("a/b/c/x"), b"hard").expect("write");
    fs::hard_link(src.join("a/b/c/x"), src.join("a/hl")).expect("link");
    std::os::unix::fs::symlink("../f0", src.join("a/b/sl")).expect("symlink");
    std::os::unix::fs::symlink("/nonexistent", src.join("dangling")).expect("symlink");
    fs::set_permissions(src.join("a/f3"), fs::Permissions::from_mode(0o600)).expect("chmod");
    fs::set_permissions(src.join("a/b/f1"), fs::Permissions::from_mode(0o755)).expect("chmod");
    std::os::unix::fs::chown(src.join("a/b/f2"), Some(1234), Some(5678)).expect("chown");
    let fifo = cpath(&src.join("a/fifo"));
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let f = fs::File::create(src.join("a/sparse")).expect("create");
    f.set_len(1 << 20).expect("truncate");
    let t = Command::new("touch")
        .args(["-d", "2011-01-01 00:00:01.25"])
        .arg(src.join("a/b"))
        .status()
        .expect("touch");
    assert!(t.success());
}

fn rsync_diff(src: &Path, dst: &Path) -> String {
    let out = Command::new("rsync")
        .args(["-aHn", "--numeric-ids", "-i", "--delete"])
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display()))
        .output()
        .expect("rsync -n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn rsync_onto_the_mount_lands_exactly() {
    if !can_mount() {
        return;
    }
    if Command::new("rsync").arg("--version").output().is_err() {
        eprintln!("skipping: rsync not installed");
        return;
    }
    let sim = Sim::start(&["--profile", "efs-typical"]);
    let src = sim.scratch("src");
    make_tree(&src);
    let out = Command::new("rsync")
        .args(["-aH", "--numeric-ids"])
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", sim.path("dst").display()))
        .output()
        .expect("rsync");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let backing_dst = sim.backing.join("dst");
    assert_eq!(rsync_diff(&src, &backing_dst), "", "backing differs from source");
    assert_eq!(rsync_diff(&src, &sim.path("dst")), "", "mount differs from source");
    // Spot checks rsync's quick check would not catch.
    for rel in ["a/f0", "a/b/f1", "a/b/c/x"] {
        assert_eq!(
            fs::read(src.join(rel)).expect("src"),
            fs::read(backing_dst.join(rel)).expect("dst"),
            "{rel}"
        );
    }
    let (x, hl) = (
        fs::metadata(backing_dst.join("a/b/c/x")).expect("x"),
        fs::metadata(backing_dst.join("a/hl")).expect("hl"),
    );
    assert_eq!(x.ino(), hl.ino(), "hard link not preserved");
    let (s, d) = (
        fs::metadata(src.join("a/b")).expect("src dir"),
        fs::metadata(backing_dst.join("a/b")).expect("dst dir"),
    );
    assert_eq!((s.mtime(), s.mtime_nsec()), (d.mtime(), d.mtime_nsec()));
    let via_mount = fs::metadata(sim.path("dst/a/b/c/x")).expect("x via mount");
    assert_eq!(via_mount.ino(), x.ino(), "st_ino differs from the backing inode");
    assert_eq!(fs::metadata(backing_dst.join("a/b/f2")).expect("f2").uid(), 1234);
    // Rename with RENAME_NOREPLACE refuses to overwrite; plain rename replaces.
    let (a, b) = (cpath(&sim.path("dst/a/f0")), cpath(&sim.path("dst/a/f3")));
    // SAFETY: valid paths; renameat2 with AT_FDCWD.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(rc, -1);
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EEXIST));
    fs::rename(sim.path("dst/a/f0"), sim.path("dst/a/f3")).expect("rename");
    assert!(!backing_dst.join("a/f0").exists());
    // O_EXCL create of an existing name fails.
    let e = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(sim.path("dst/a/f3"))
        .expect_err("exists");
    assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
}
