//! Containment: no backend access leaves the backend root, whatever another
//! client plants in the backend tree; only root can use the control socket.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{BIN, Mount, Scratch};

/// Another client replaces a directory efscache has already loaded with a
/// symlink (to an absolute path outside, and a relative one climbing out
/// with `..`; both name a real, writable directory). Publishing into it, and
/// renaming there, must fail rather than follow the link: nothing appears
/// outside the backend.
#[test]
fn planted_symlinks_never_lead_a_flush_outside_the_backend() {
    let s = Scratch::new();
    let backend = s.path("backend");
    let outside = s.path("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o777)).unwrap();
    for d in ["abs", "rel"] {
        std::fs::create_dir(backend.join(d)).unwrap();
    }
    let m = Mount::start(&backend, &s.path("mnt"), &s.path("cache"), "debounce=1h,exclusive");
    // Load both directories into the cache.
    for d in ["abs", "rel"] {
        assert_eq!(std::fs::read_dir(s.path("mnt").join(d)).unwrap().count(), 0);
    }
    // The other client's move.
    std::fs::remove_dir(backend.join("abs")).unwrap();
    std::os::unix::fs::symlink(&outside, backend.join("abs")).unwrap();
    std::fs::remove_dir(backend.join("rel")).unwrap();
    std::fs::create_dir(backend.join("sub")).unwrap();
    std::os::unix::fs::symlink("../../outside", backend.join("sub/up")).unwrap();
    std::os::unix::fs::symlink("../outside", backend.join("rel")).unwrap();
    assert!(backend.join("rel").join(".").is_dir() && backend.join("sub/up").join(".").is_dir());
    // Writes through the mount land in staging; their publish must not follow.
    std::fs::write(s.path("mnt/abs/escaped"), b"must stay inside").unwrap();
    std::fs::write(s.path("mnt/rel/escaped2"), b"must stay inside").unwrap();
    std::fs::create_dir(s.path("mnt/abs/newdir")).unwrap();
    std::fs::write(s.path("mnt/rel/to-move"), b"must stay inside").unwrap();
    std::fs::rename(s.path("mnt/rel/to-move"), s.path("mnt/rel/moved")).unwrap();
    std::fs::rename(s.path("mnt/abs/escaped"), s.path("mnt/abs/renamed")).unwrap();
    let out = Command::new(BIN)
        .args(["sync", "--timeout", "5s"])
        .arg(s.path("mnt"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "sync claimed success for files it cannot have published"
    );
    assert!(
        err.contains("abs/renamed") || err.contains("rel/moved") || err.contains("timed out"),
        "sync output: {err}"
    );
    drop(m);
    let leaked: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(leaked.is_empty(), "efscache wrote outside the backend: {leaked:?}");
    assert!(!s.path("escaped2").exists() && !s.dir.path().parent().unwrap().join("escaped2").exists());
}

/// The control socket answers root only.
#[test]
fn control_socket_refuses_other_users() {
    let s = Scratch::new();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN, "status"])
        .arg(s.path("mnt"))
        .output()
        .expect("setpriv (util-linux)");
    assert!(!out.status.success(), "a non-root user got the status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("root") || err.contains("ermission"),
        "unclear error: {err}"
    );
    // Root still can.
    assert!(m.status()["pid"].as_u64().is_some());
    m.umount();
}
