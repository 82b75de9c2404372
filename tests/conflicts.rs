//! Other writers: a file that another client replaced or rewrote in place on
//! the backend after this mount loaded it is neither overwritten nor unlinked
//! by a late publish or unlink. The backend's version stays, `sync` names the file and fails,
//! and this mount's version is kept in the cache's lost+found.

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use common::{BIN, Mount, Scratch};

/// Another client's write: a new file renamed over the name (as rsync,
/// editors and most tools do).
fn replace_on_backend(path: &Path, data: &str) {
    let tmp = path.with_extension("other-client-tmp");
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `efscache sync` fails naming `d/NAME` for each of `names`, `status`
/// lists exactly that many failures, and `efscache umount` reports them
/// too (exit 1) and unmounts. Returns sync's message.
fn sync_and_umount_report_conflicts(m: Mount, names: &[&str]) -> String {
    let mnt = m.mountpoint.clone();
    let out = Command::new(BIN).arg("sync").arg(&mnt).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("sync: {stderr}");
    assert!(!out.status.success(), "sync succeeded despite conflicts");
    for name in names {
        assert!(
            stderr.contains(&format!("d/{name}")),
            "sync does not name d/{name}: {stderr}"
        );
    }
    let failures = m.status()["failures"].as_array().unwrap().len();
    assert_eq!(failures, names.len(), "status lists {failures} failures");
    let out = Command::new(BIN).arg("umount").arg(&mnt).output().unwrap();
    assert!(!out.status.success() && !common::is_efscache_mounted(&mnt));
    drop(m);
    stderr
}

/// The contents of this mount's versions kept in `lost+found/conflicts`, sorted.
fn kept_conflicts(cache: &Path) -> Vec<String> {
    let mut kept: Vec<String> = std::fs::read_dir(cache.join("lost+found/conflicts"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    kept.sort();
    kept
}

#[test]
fn a_file_replaced_by_another_client_is_not_overwritten_or_unlinked() {
    let s = Scratch::new();
    let (backend, mnt, cache) = (s.path("backend"), s.path("mnt"), s.path("cache"));
    std::fs::create_dir(backend.join("d")).unwrap();
    for (name, data) in [
        ("renamed-over", "v1"),
        ("in-place", "v1"),
        ("removed", "v1"),
        ("untouched", "v1"),
    ] {
        std::fs::write(backend.join("d").join(name), data).unwrap();
    }
    // Nothing is published before `sync`, and the listing is not re-read.
    let m = Mount::start(&backend, &mnt, &cache, "debounce=1h,attr_ttl=1h");
    assert_eq!(std::fs::read_to_string(mnt.join("d/renamed-over")).unwrap(), "v1");
    assert_eq!(std::fs::read_to_string(mnt.join("d/in-place")).unwrap(), "v1");
    assert_eq!(std::fs::read_to_string(mnt.join("d/removed")).unwrap(), "v1");

    // This mount: rsync-style temp + rename, an in-place rewrite, an unlink,
    // and a change to a file nobody else touches.
    std::fs::write(mnt.join("d/.renamed-over.XXXXXX"), "ours").unwrap();
    std::fs::rename(mnt.join("d/.renamed-over.XXXXXX"), mnt.join("d/renamed-over")).unwrap();
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(mnt.join("d/in-place"))
        .unwrap();
    f.write_all(b"ours too").unwrap();
    drop(f);
    std::fs::write(mnt.join("d/untouched"), "ours alone").unwrap();

    // Another client, directly on the backend, before the publishes (and
    // before the unlink, which is not held back like a publish).
    replace_on_backend(&backend.join("d/renamed-over"), "theirs");
    replace_on_backend(&backend.join("d/in-place"), "theirs too");
    replace_on_backend(&backend.join("d/removed"), "theirs, new");
    std::fs::remove_file(mnt.join("d/removed")).unwrap();

    sync_and_umount_report_conflicts(m, &["renamed-over", "in-place", "removed"]);

    let read = |p: &str| std::fs::read_to_string(backend.join(p)).unwrap();
    assert_eq!(read("d/renamed-over"), "theirs");
    assert_eq!(read("d/in-place"), "theirs too");
    assert_eq!(read("d/removed"), "theirs, new");
    assert_eq!(read("d/untouched"), "ours alone");

    // This mount's versions are kept, not lost.
    assert_eq!(kept_conflicts(&cache), ["ours", "ours too"]);

    // A new mount shows the backend's versions and has nothing left to do.
    let m = Mount::start(&backend, &mnt, &cache, "");
    assert_eq!(std::fs::read_to_string(mnt.join("d/renamed-over")).unwrap(), "theirs");
    assert_eq!(std::fs::read_to_string(mnt.join("d/removed")).unwrap(), "theirs, new");
    m.sync();
    m.umount();
    assert_eq!(read("d/renamed-over"), "theirs");
}

/// Another client's write to the file itself (same inode): truncate and
/// write, as `>`, `cp` onto an existing file or an application's save in
/// place do.
fn edit_in_place(path: &Path, data: &str) {
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap());
    std::fs::write(path, data).unwrap();
    let after = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap());
    assert_eq!(ino, after, "the edit must keep the inode");
}

#[test]
fn a_file_another_client_rewrote_in_place_is_not_overwritten_or_unlinked() {
    let s = Scratch::new();
    let (backend, mnt, cache) = (s.path("backend"), s.path("mnt"), s.path("cache"));
    std::fs::create_dir(backend.join("d")).unwrap();
    for name in ["rewritten", "appended", "removed", "seen-first", "retimed"] {
        std::fs::write(backend.join("d").join(name), "v1").unwrap();
    }
    let m = Mount::start(&backend, &mnt, &cache, "debounce=1h,attr_ttl=1h");
    for name in ["rewritten", "appended", "removed", "seen-first", "retimed"] {
        assert_eq!(std::fs::read_to_string(mnt.join("d").join(name)).unwrap(), "v1");
    }
    let append = |name: &str, data: &str| {
        let mut f = OpenOptions::new().append(true).open(mnt.join("d").join(name)).unwrap();
        f.write_all(data.as_bytes()).unwrap();
    };
    // A file this mount publishes, so what it expects there next comes from
    // its own publish (the mtime as the backend keeps it), not from a stat.
    std::fs::write(mnt.join("d/published"), "ours 1").unwrap();
    // A file whose mtime only this mount sets (by utimes), then rewrites:
    // no conflict.
    let touch = Command::new("touch")
        .args(["-m", "-d", "2001-02-03 04:05:06.123456789"])
        .arg(mnt.join("d/retimed"))
        .status()
        .unwrap();
    assert!(touch.success());
    m.sync();
    let published_ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(backend.join("d/published")).unwrap());

    // Changed here first, then by the other client before the publish:
    // the same size ("v2"), so only the mtime tells.
    std::fs::write(mnt.join("d/rewritten"), "ours").unwrap();
    edit_in_place(&backend.join("d/rewritten"), "v2");
    // Copied up (to append) here, then changed there.
    append("appended", "+ours");
    edit_in_place(&backend.join("d/appended"), "theirs");
    // Changed there, then removed here.
    edit_in_place(&backend.join("d/removed"), "theirs");
    std::fs::remove_file(mnt.join("d/removed")).unwrap();
    // Published here, changed there, rewritten here within keep_clean.
    edit_in_place(&backend.join("d/published"), "theirs 2");
    std::fs::write(mnt.join("d/published"), "ours 2").unwrap();
    // Not a conflict: a change there that this mount copies up before
    // changing the file builds on theirs.
    edit_in_place(&backend.join("d/seen-first"), "theirs");
    append("seen-first", "+ours");
    std::fs::write(mnt.join("d/retimed"), "ours").unwrap();

    let stderr = sync_and_umount_report_conflicts(m, &["rewritten", "appended", "removed", "published"]);
    assert!(stderr.contains("changed in place"), "{stderr}");

    let read = |p: &str| std::fs::read_to_string(backend.join(p)).unwrap();
    assert_eq!(read("d/rewritten"), "v2");
    assert_eq!(read("d/appended"), "theirs");
    assert_eq!(read("d/removed"), "theirs");
    assert_eq!(read("d/published"), "theirs 2");
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(backend.join("d/published")).unwrap()),
        published_ino
    );
    assert_eq!(read("d/seen-first"), "theirs+ours");
    assert_eq!(read("d/retimed"), "ours");

    assert_eq!(kept_conflicts(&cache), ["ours", "ours 2", "v1+ours"]);
}

/// A file another client replaced (renamed a new file over it) while this
/// mount had nothing of its own pending on it: after `attr_ttl` the mount
/// shows the new file, size and content, not the old one's attributes with
/// the new one's bytes.
#[test]
fn a_file_another_client_replaced_is_seen_after_attr_ttl() {
    use std::time::{Duration, Instant};
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("backend/d")).unwrap();
    std::fs::write(s.path("backend/d/f"), "old").unwrap();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "attr_ttl=1s");
    assert_eq!(std::fs::read_to_string(s.path("mnt/d/f")).unwrap(), "old");
    let listed = Instant::now();
    replace_on_backend(&s.path("backend/d/f"), "the new, longer content");
    std::thread::sleep((listed + Duration::from_millis(2500)).saturating_duration_since(Instant::now()));
    let _ = std::fs::read_dir(s.path("mnt/d")).unwrap().count(); // the listing is reloaded
    std::thread::sleep(Duration::from_millis(1200)); // the kernel's cached entry expires
    assert_eq!(
        std::fs::read_to_string(s.path("mnt/d/f")).unwrap(),
        "the new, longer content",
        "the mount still shows the replaced file"
    );
    m.umount();
}
