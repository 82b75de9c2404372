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
