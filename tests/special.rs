//! Special files: fifos, sockets and device nodes through the mount reach the
//! backend with their kind, mode, owner and device numbers; a backend that
//! refuses a kind (EFS refuses device nodes) makes the syscall fail at once,
//! with the backend's errno, never later in the flush.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use common::{EfsSim, Mount, Scratch, run};

fn mknod(path: &Path, mode: u32, dev: u64) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; mknod has no memory preconditions.
    if unsafe { libc::mknod(c.as_ptr(), mode, dev) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn fifos_sockets_and_devices_are_published_with_their_ids() {
    let s = Scratch::new();
    let src = s.path("src");
    mknod(&src.join("fifo"), libc::S_IFIFO | 0o640, 0).unwrap();
    mknod(&src.join("sock"), libc::S_IFSOCK | 0o600, 0).unwrap();
    mknod(&src.join("null"), libc::S_IFCHR | 0o666, libc::makedev(1, 3)).unwrap();
    mknod(&src.join("blk"), libc::S_IFBLK | 0o660, libc::makedev(7, 200)).unwrap();
    for (name, uid, gid) in [("fifo", 1000, 100), ("null", 0, 5), ("blk", 0, 6)] {
        std::os::unix::fs::lchown(src.join(name), Some(uid), Some(gid)).unwrap();
    }
    // Old times: rsync compares times to the second, and would leave a
    // special file created in the same second with its creation time.
    for name in ["fifo", "sock", "null", "blk", ""] {
        run(Command::new("touch")
            .args(["-h", "-d", "2021-03-04 05:06:07.123456789"])
            .arg(src.join(name)));
    }
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=0ms");
    assert_eq!(m.status()["capabilities"]["devices_refused"], serde_json::Value::Null);
    run(Command::new("rsync")
        .args(["-a", "--numeric-ids", "--devices", "--specials"])
        .arg(format!("{}/", src.display()))
        .arg(s.path("mnt/dst")));
    m.sync();
    m.umount();
    common::assert_same_tree(&src, &s.path("backend/dst"));
    let md = std::fs::symlink_metadata(s.path("backend/dst/blk")).unwrap();
    assert!(md.file_type().is_block_device());
    assert_eq!(md.rdev(), libc::makedev(7, 200));
    assert!(
        std::fs::symlink_metadata(s.path("backend/dst/sock"))
            .unwrap()
            .file_type()
            .is_socket()
    );
}

#[test]
fn a_backend_that_refuses_devices_refuses_them_at_the_syscall() {
    let s = Scratch::new();
    std::fs::create_dir(s.path("efs")).unwrap();
    let sim = EfsSim::start(&s.path("backend"), &s.path("efs"), "efs-typical");
    let m = Mount::start(&s.path("efs"), &s.path("mnt"), &s.path("cache"), "debounce=0ms");
    assert_eq!(m.status()["capabilities"]["devices_refused"], libc::EPERM);
    let err = mknod(&s.path("mnt/null"), libc::S_IFCHR | 0o666, libc::makedev(1, 3)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert!(!s.path("mnt/null").exists(), "a refused device node is visible");
    // Fifos are fine on EFS.
    mknod(&s.path("mnt/fifo"), libc::S_IFIFO | 0o644, 0).unwrap();
    m.sync();
    assert_eq!(m.status()["failures"], serde_json::json!([]));
    m.umount();
    assert!(
        std::fs::symlink_metadata(s.path("backend/fifo"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    drop(sim);
}
