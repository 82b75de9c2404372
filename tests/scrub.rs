//! `efscache scrub` on prepared backend trees: every kind of damage next to
//! innocent look-alikes, the report before and after `--fix` and
//! `--purge-rsync-temps`, symlinks and mount points that must not be
//! entered, and the refusal to scrub through an efscache mount.

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

const DAY: u64 = 86_400;

/// Sets mtime and atime to `ago` before now (ctime becomes now: only the
/// kernel sets it).
fn make_old(p: &Path, ago: Duration) {
    let t = SystemTime::now() - ago;
    let d = t.duration_since(UNIX_EPOCH).unwrap();
    let ts = libc::timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: d.subsec_nanos() as i64,
    };
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path and two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [ts, ts].as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(rc, 0, "utimensat {}", p.display());
}

fn file(p: &Path, data: &[u8], mode: u32, age_days: u64) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    if age_days > 0 {
        make_old(p, Duration::from_secs(age_days * DAY));
    }
}

/// The prepared tree. Returns the paths (relative) of what must survive
/// every step.
fn prepare(root: &Path, outside: &Path) -> Vec<&'static str> {
    // Damaged-looking (report only).
    file(&root.join("d/empty"), b"", 0o644, 3);
    file(&root.join("d/zero-mode"), b"data", 0o000, 3);
    // efscache temp files: an orphan, one being written (fresh).
    file(&root.join("d/.efscache.web-01.1a2b3c.7"), b"partial", 0o644, 3);
    file(&root.join("d/sub/.efscache.web-02.ff00.1"), b"in flight", 0o600, 0);
    // rsync temp files: stale, fresh.
    file(&root.join(".data.csv.Ab12Cd"), b"half a csv", 0o600, 3);
    file(&root.join("d/.fresh.Xy12Zz"), b"being written", 0o600, 0);
    // Innocent look-alikes, all old.
    file(&root.join(".notes.backup"), b"my notes", 0o600, 3);
    file(&root.join(".a.ABCDEFG"), b"seven", 0o600, 3);
    file(&root.join(".x.abc123"), b"group bits", 0o640, 3);
    file(&root.join("d/.efscache.conf"), b"a user's file", 0o600, 3);
    file(&root.join("d/regular"), b"regular", 0o644, 3);
    // Symlinks are never followed: one to a directory outside with an old
    // orphan in it, one to the root itself.
    file(&outside.join(".efscache.h.1.1"), b"not ours to touch", 0o600, 3);
    std::os::unix::fs::symlink(outside, root.join("d/escape")).unwrap();
    std::os::unix::fs::symlink(".", root.join("loop")).unwrap();
    vec![
        "d/empty",
        "d/zero-mode",
        "d/sub/.efscache.web-02.ff00.1",
        "d/.fresh.Xy12Zz",
        ".notes.backup",
        ".a.ABCDEFG",
        ".x.abc123",
        "d/.efscache.conf",
        "d/regular",
        "d/escape",
        "loop",
    ]
}

fn scrub(root: &Path, args: &[&str]) -> (i32, serde_json::Value) {
    let o: Output = Command::new(BIN)
        .arg("scrub")
        .arg(root)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.code().unwrap(), v)
}

/// (path, action) of a list in the report.
fn listed(v: &serde_json::Value, key: &str) -> Vec<(String, String)> {
    let mut l: Vec<(String, String)> = v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    l.sort();
    l
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut l: Vec<(String, String)> = v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    l.sort();
    l
}

fn assert_survivors(root: &Path, survivors: &[&str]) {
    for p in survivors {
        assert!(root.join(p).symlink_metadata().is_ok(), "{p} was removed");
    }
}

#[test]
fn report_then_fix_then_purge_rsync_temps() {
    let s = Scratch::new();
    let (root, outside) = (s.path("backend"), s.path("src"));
    let survivors = prepare(&root, &outside);

    // Report only.
    let (code, v) = scrub(&root, &["--min-idle", "0s"]);
    assert_eq!(code, 2, "findings reported");
    assert_eq!(
        listed(&v, "damaged"),
        pairs(&[("d/empty", "reported"), ("d/zero-mode", "reported")])
    );
    let damaged = v["damaged"].as_array().unwrap();
    let reasons: Vec<_> = damaged.iter().map(|f| f["reasons"].clone()).collect();
    assert!(reasons.contains(&serde_json::json!(["empty"])));
    assert!(reasons.contains(&serde_json::json!(["mode 000"])));
    assert_eq!(
        listed(&v, "efscache_temps"),
        pairs(&[
            ("d/.efscache.web-01.1a2b3c.7", "reported"),
            ("d/sub/.efscache.web-02.ff00.1", "recent")
        ])
    );
    assert_eq!(
        listed(&v, "rsync_temps"),
        pairs(&[(".data.csv.Ab12Cd", "reported"), ("d/.fresh.Xy12Zz", "recent")])
    );
    assert_eq!(v["removed"], 0);
    assert_eq!(v["errors"].as_array().unwrap().len(), 0);
    assert_eq!(v["dirs"], 3, "root, d, d/sub; symlinked dirs not entered");
    assert_eq!(v["others"], 2, "the two symlinks");
    assert!(root.join("d/.efscache.web-01.1a2b3c.7").exists());

    // The default --min-idle keeps files whose inode changed recently (the
    // whole tree was just made): nothing is removed.
    let (_, v) = scrub(&root, &["--fix", "--purge-rsync-temps"]);
    assert_eq!(v["removed"], 0);
    assert_eq!(
        listed(&v, "efscache_temps"),
        pairs(&[
            ("d/.efscache.web-01.1a2b3c.7", "busy"),
            ("d/sub/.efscache.web-02.ff00.1", "recent")
        ])
    );

    // --fix: the efscache orphan goes, the rsync temp stays.
    let (code, v) = scrub(&root, &["--fix", "--min-idle", "0s"]);
    assert_eq!(code, 2, "rsync temp and damaged files are still there");
    assert_eq!(v["removed"], 1);
    assert_eq!(
        listed(&v, "efscache_temps"),
        pairs(&[
            ("d/.efscache.web-01.1a2b3c.7", "removed"),
            ("d/sub/.efscache.web-02.ff00.1", "recent")
        ])
    );
    assert!(!root.join("d/.efscache.web-01.1a2b3c.7").exists());
    assert!(root.join(".data.csv.Ab12Cd").exists());
    assert!(outside.join(".efscache.h.1.1").exists(), "followed a symlink");

    // --purge-rsync-temps: the stale rsync temp goes.
    let (_, v) = scrub(&root, &["--purge-rsync-temps", "--min-idle", "0s"]);
    assert_eq!(listed(&v, "rsync_temps").len(), 2);
    assert_eq!(v["removed"], 1);
    assert!(!root.join(".data.csv.Ab12Cd").exists());

    // After: only the fresh temp files and the damaged-looking files.
    let (code, v) = scrub(&root, &["--min-idle", "0s"]);
    assert_eq!(code, 2, "damaged-looking files stay reported");
    assert_eq!(
        listed(&v, "efscache_temps"),
        pairs(&[("d/sub/.efscache.web-02.ff00.1", "recent")])
    );
    assert_eq!(listed(&v, "rsync_temps"), pairs(&[("d/.fresh.Xy12Zz", "recent")]));
    assert_eq!(listed(&v, "damaged").len(), 2);
    assert_survivors(&root, &survivors);
    assert!(outside.join(".efscache.h.1.1").exists());

    // A shorter --older-than makes the fresh ones stale too.
    std::fs::remove_file(root.join("d/empty")).unwrap();
    std::fs::remove_file(root.join("d/zero-mode")).unwrap();
    make_old(&root.join("d/.fresh.Xy12Zz"), Duration::from_secs(7200));
    make_old(&root.join("d/sub/.efscache.web-02.ff00.1"), Duration::from_secs(7200));
    let (code, v) = scrub(
        &root,
        &["--older-than", "1h", "--min-idle", "0s", "--fix", "--purge-rsync-temps"],
    );
    assert_eq!(code, 0, "nothing left: {v}");
    assert_eq!(v["removed"], 2);
}

#[test]
fn text_report_explains_and_walks_in_parallel() {
    let s = Scratch::new();
    let root = s.path("backend");
    prepare(&root, &s.path("src"));
    for i in 0..200 {
        file(&root.join(format!("many/d{}/f{i}", i % 17)), b"x", 0o644, 0);
    }
    let o = Command::new(BIN)
        .args(["scrub", "--threads", "8", "--min-idle", "0s"])
        .arg(&root)
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(2), "{t}");
    assert!(t.contains("21 directories, 211 files"), "{t}");
    assert!(t.contains("looks damaged only if you did not expect it"), "{t}");
    assert!(
        t.contains("stale (remove with --fix)  d/.efscache.web-01.1a2b3c.7"),
        "{t}"
    );
    assert!(
        t.contains("stale (remove with --purge-rsync-temps)  .data.csv.Ab12Cd"),
        "{t}"
    );
    assert!(
        t.contains("recent (kept: newer than --older-than)  d/.fresh.Xy12Zz"),
        "{t}"
    );
    assert!(!t.contains(".notes.backup"), "{t}");
    assert!(o.stderr.is_empty(), "no progress display off a terminal");
}

/// A file system mounted inside the tree is not entered.
#[test]
fn mount_points_inside_the_tree_are_not_entered() {
    let s = Scratch::new();
    let root = s.path("backend");
    let inner = root.join("inner");
    std::fs::create_dir(&inner).unwrap();
    run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "scrub-test"])
        .arg(&inner));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = fusemount::unmount(&self.0, true);
        }
    }
    let _u = Unmount(inner.clone());
    file(&inner.join(".efscache.h.1.1"), b"another file system", 0o600, 3);
    let (code, v) = scrub(&root, &["--fix", "--min-idle", "0s"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["skipped_mounts"], serde_json::json!(["inner"]));
    assert!(inner.join(".efscache.h.1.1").exists());
}

/// Scrubbing through an efscache mount is refused with a pointer to the
/// backend; the backend itself can be scrubbed while mounted elsewhere.
#[test]
fn refuses_to_scrub_through_an_efscache_mount() {
    let s = Scratch::new();
    file(&s.path("backend/d/.efscache.h.1.1"), b"orphan", 0o600, 3);
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "");
    for p in [s.path("mnt"), s.path("mnt/d")] {
        let o = Command::new(BIN)
            .args(["scrub", "--fix", "--min-idle", "0s"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(
            err.contains("inside the efscache mount")
                && err.contains(&format!("scrub the backend {}", s.path("backend").display())),
            "{err}"
        );
        assert!(o.stdout.is_empty());
    }
    assert!(s.path("backend/d/.efscache.h.1.1").exists());
    let (code, v) = scrub(&s.path("backend"), &["--fix", "--min-idle", "0s"]);
    assert_eq!(code, 0, "{v}");
    assert!(!s.path("backend/d/.efscache.h.1.1").exists());
    m.umount();
}

/// A file damaged on the backend (mode 000, empty: the field report's
/// symptom) that efscache could not replace (EPERM on chown): its good copy
/// is kept, scrub shows it, and `--fix --cache-dir` re-publishes it with its
/// owner, mode and times, once; a copy whose file changed after the failure
/// (replaced, or changed in place and still damaged-looking) is not used.
#[test]
fn fix_republishes_a_damaged_file_from_the_copy_efscache_kept() {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let s = Scratch::new();
    let (backend, mnt, cache) = (s.path("backend"), s.path("mnt"), s.path("cache"));
    file(&backend.join("d/report.csv"), b"", 0o000, 3);
    file(&backend.join("d/other.csv"), b"", 0o000, 3);
    file(&backend.join("d/third.csv"), b"", 0o000, 3);
    let m = Mount::start(
        &backend,
        &mnt,
        &cache,
        "debounce=0ms,fault_rate=1.0,fault_ops=chown,fault_errno=EPERM",
    );
    let mtime = 1_700_000_000;
    for (name, data) in [
        ("report.csv", &b"a,b\n1,2\n"[..]),
        ("other.csv", b"x\n"),
        ("third.csv", b"3\n"),
    ] {
        let p = mnt.join("d").join(name);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&p).unwrap();
        f.write_all(data).unwrap();
        std::os::unix::fs::fchown(&f, Some(1000), Some(1000)).unwrap();
        f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime)).unwrap();
    }
    let out = Command::new(BIN).arg("sync").arg(&mnt).output().unwrap();
    assert!(!out.status.success(), "the publishes were expected to fail (EPERM)");
    // While the mount runs, its staged copies are its own.
    let cache_arg = cache.to_str().unwrap();
    let (_, v) = scrub(&backend, &["--fix", "--cache-dir", cache_arg, "--min-idle", "0s"]);
    assert!(listed(&v, "damaged").iter().all(|(_, a)| a == "copy_in_use"), "{v}");
    let _ = Command::new(BIN).arg("umount").arg(&mnt).output().unwrap();
    drop(m);
    assert_eq!(std::fs::metadata(backend.join("d/report.csv")).unwrap().len(), 0);

    // Without --cache-dir: report only. With it: the copy is shown.
    let all = |action: &str| -> Vec<(String, String)> {
        ["d/other.csv", "d/report.csv", "d/third.csv"]
            .iter()
            .map(|p| (p.to_string(), action.to_string()))
            .collect()
    };
    let (code, v) = scrub(&backend, &[]);
    assert_eq!(code, 2);
    assert_eq!(listed(&v, "damaged"), all("reported"));
    let (code, v) = scrub(&backend, &["--cache-dir", cache_arg]);
    assert_eq!(code, 2);
    assert_eq!(listed(&v, "damaged"), all("copy_kept"));
    assert_eq!(
        std::fs::metadata(backend.join("d/report.csv")).unwrap().len(),
        0,
        "changed without --fix"
    );

    // other.csv is replaced by another client, third.csv changed in place
    // (still damaged-looking): their copies must not be used.
    std::fs::write(backend.join("d/other.csv.new"), "theirs\n").unwrap();
    std::fs::rename(backend.join("d/other.csv.new"), backend.join("d/other.csv")).unwrap();
    std::fs::set_permissions(backend.join("d/third.csv"), std::fs::Permissions::from_mode(0o000)).unwrap();
    // Changed within --min-idle: someone may be writing it; kept.
    let (code, v) = scrub(&backend, &["--fix", "--cache-dir", cache_arg]);
    assert_eq!(code, 2, "{v}");
    assert!(listed(&v, "damaged").iter().all(|(_, a)| a == "busy"), "{v}");
    let idle0 = ["--fix", "--cache-dir", cache_arg, "--min-idle", "0s"];
    let (code, v) = scrub(&backend, &idle0);
    assert_eq!(code, 2, "{v}");
    assert_eq!(
        listed(&v, "damaged"),
        [
            ("d/report.csv".into(), "republished".into()),
            ("d/third.csv".into(), "copy_outdated".into())
        ]
    );
    assert_eq!(std::fs::metadata(backend.join("d/third.csv")).unwrap().len(), 0);
    let p = backend.join("d/report.csv");
    let md = std::fs::metadata(&p).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"a,b\n1,2\n");
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid(), md.mtime()),
        (0o640, 1000, 1000, mtime as i64)
    );
    assert_eq!(std::fs::read(backend.join("d/other.csv")).unwrap(), b"theirs\n");
    let names: Vec<String> = std::fs::read_dir(backend.join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with(".efscache.")), "{names:?}");
    // The copy is used once.
    assert!(cache.join("lost+found/republished").read_dir().unwrap().count() == 2);
    let (code, v) = scrub(&backend, &idle0);
    assert_eq!(
        (code, listed(&v, "damaged")),
        (2, vec![("d/third.csv".into(), "copy_outdated".into())])
    );
}
