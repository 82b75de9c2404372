//! What the Linux NFS client refuses, efscache must not send: on EFS a
//! refused op is not a passing failure but a change that never lands. efs-sim
//! `efs-typical` refuses the same (see efs-sim/README.md, "Refusals").

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use common::{EfsSim, Mount, Scratch};

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    let (f, t) = (
        CString::new(from.as_os_str().as_bytes()).unwrap(),
        CString::new(to.as_os_str().as_bytes()).unwrap(),
    );
    // SAFETY: valid NUL-terminated paths.
    match unsafe { libc::renameat2(libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), flags) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// `mv` tries renameat2(RENAME_NOREPLACE) first; the Linux NFS client answers
/// any rename flag with EINVAL. The overlay checks the flag, so the backend
/// gets a plain rename, and the move lands.
#[test]
fn a_rename_with_noreplace_lands_on_a_backend_that_refuses_rename_flags() {
    let s = Scratch::new();
    std::fs::create_dir(s.path("efs")).unwrap();
    let sim = EfsSim::start(&s.path("backend"), &s.path("efs"), "efs-typical");
    let m = Mount::start(&s.path("efs"), &s.path("mnt"), &s.path("cache"), "debounce=0ms");
    std::fs::write(s.path("mnt/a"), b"moved with noreplace").unwrap();
    std::fs::write(s.path("mnt/taken"), b"stays").unwrap();
    std::fs::create_dir(s.path("mnt/d")).unwrap();
    std::fs::write(s.path("mnt/d/inside"), b"in a moved dir").unwrap();
    std::fs::write(s.path("mnt/m"), b"moved by mv").unwrap();
    m.sync(); // all of it on the backend first: the renames are backend renames

    renameat2(&s.path("mnt/a"), &s.path("mnt/b"), libc::RENAME_NOREPLACE).expect("rename a b");
    renameat2(&s.path("mnt/d"), &s.path("mnt/e"), libc::RENAME_NOREPLACE).expect("rename d e");
    let taken = renameat2(&s.path("mnt/b"), &s.path("mnt/taken"), libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(taken.raw_os_error(), Some(libc::EEXIST), "{taken}");
    let out = Command::new("mv")
        .arg(s.path("mnt/m"))
        .arg(s.path("mnt/n"))
        .output()
        .unwrap();
    assert!(out.status.success(), "mv: {}", String::from_utf8_lossy(&out.stderr));
    m.sync();
    assert_eq!(m.status()["failures"], serde_json::json!([]), "failed backend ops");

    let backend = |p: &str| std::fs::read_to_string(s.path("backend").join(p)).ok();
    assert_eq!(backend("b").as_deref(), Some("moved with noreplace"));
    assert_eq!(backend("e/inside").as_deref(), Some("in a moved dir"));
    assert_eq!(backend("n").as_deref(), Some("moved by mv"));
    assert_eq!(backend("taken").as_deref(), Some("stays"));
    for gone in ["a", "d", "m"] {
        assert!(!s.path("backend").join(gone).exists(), "{gone} is still on the backend");
    }
    m.umount();
    drop(sim);
}

/// The Linux NFS client renames a file that is unlinked (or renamed over)
/// while this host still has it open to `.nfsXXXX...`, until its last close.
/// Such names are not shown through the mount, and a directory removed
/// through the mount that holds only them on the backend is removed there
/// once they are gone, not reported as failed.
#[test]
fn files_the_nfs_client_renamed_while_open_are_hidden_and_wait_for_their_close() {
    let s = Scratch::new();
    let silly = ".nfs00000000000a1b2c00000001";
    std::fs::create_dir_all(s.path("backend/d")).unwrap();
    std::fs::write(s.path("backend/d").join(silly), b"still open somewhere").unwrap();
    std::fs::write(s.path("backend/d/.nfs-not-silly"), b"a user's file").unwrap();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=0ms");
    let names: Vec<String> = std::fs::read_dir(s.path("mnt/d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![".nfs-not-silly".to_string()], "listing through the mount");

    std::fs::remove_file(s.path("mnt/d/.nfs-not-silly")).unwrap();
    std::fs::remove_dir(s.path("mnt/d")).expect("rmdir of a directory empty but for .nfs* files");
    // The "open file" closes a moment later: its .nfs name goes away.
    let silly_path = s.path("backend/d").join(silly);
    let closer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(500));
        std::fs::remove_file(silly_path).unwrap();
    });
    m.sync();
    closer.join().unwrap();
    assert_eq!(m.status()["failures"], serde_json::json!([]));
    assert!(!s.path("backend/d").exists(), "the directory is still on the backend");
    m.umount();
}

/// EFS allows 177 hard links per file and symlinks of up to 4080 bytes: the
/// mount refuses more at the syscall (EMLINK, ENAMETOOLONG), instead of
/// accepting a change that would fail for good on EFS.
#[test]
fn efs_limits_on_links_and_symlinks_are_refused_at_the_syscall() {
    let s = Scratch::new();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=0ms");
    std::fs::write(s.path("mnt/f"), b"linked").unwrap();
    for i in 1..177 {
        std::fs::hard_link(s.path("mnt/f"), s.path(&format!("mnt/l{i}"))).unwrap();
    }
    let e = std::fs::hard_link(s.path("mnt/f"), s.path("mnt/l177")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EMLINK), "{e}");

    let longest = "t".repeat(4080);
    std::os::unix::fs::symlink(&longest, s.path("mnt/ok")).unwrap();
    let e = std::os::unix::fs::symlink(format!("{longest}t"), s.path("mnt/too-long")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG), "{e}");
    m.sync();
    assert_eq!(m.status()["failures"], serde_json::json!([]));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(s.path("backend/f")).unwrap().nlink(), 177);
    m.umount();
}
