//! Sparse files: holes made by truncate, `fallocate` (punch hole) and
//! `rsync -S` survive staging and the publish (the backend file keeps its
//! holes), and SEEK_DATA/SEEK_HOLE work through the mount, before and after
//! the publish.

mod common;

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use common::{Mount, Scratch, run};

const MIB: u64 = 1 << 20;

fn seek(path: &Path, offset: i64, whence: i32) -> i64 {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: an open fd; lseek has no memory preconditions.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset, whence) };
    assert!(r >= 0, "lseek {}: {}", path.display(), std::io::Error::last_os_error());
    r
}

/// 16 MiB with data only at 5 MiB (64 KiB) and in the last 4 KiB.
fn make_sparse(path: &Path) {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .unwrap();
    f.set_len(16 * MIB).unwrap();
    f.write_all_at(&vec![7u8; 64 << 10], 5 * MIB).unwrap();
    f.write_all_at(&[9u8; 4096], 16 * MIB - 4096).unwrap();
}

fn assert_sparse(path: &Path, what: &str) {
    let md = std::fs::metadata(path).unwrap();
    assert_eq!(md.len(), 16 * MIB, "{what}: size");
    assert!(
        md.blocks() * 512 < 2 * MIB,
        "{what}: {} KiB allocated: the holes were filled",
        md.blocks() / 2
    );
    assert_eq!(seek(path, 0, libc::SEEK_DATA), (5 * MIB) as i64, "{what}: first data");
    assert_eq!(
        seek(path, (5 * MIB) as i64, libc::SEEK_HOLE),
        (5 * MIB + (64 << 10)) as i64,
        "{what}: hole after it"
    );
}

#[test]
fn holes_survive_staging_and_publish() {
    let s = Scratch::new();
    let (mnt, backend) = (s.path("mnt"), s.path("backend"));
    make_sparse(&s.path("src/sparse.bin"));
    let m = Mount::start(&backend, &mnt, &s.path("cache"), "debounce=1h");

    // Made through the mount: truncate + writes, then a punched hole.
    make_sparse(&mnt.join("made.bin"));
    let f = OpenOptions::new().write(true).open(mnt.join("made.bin")).unwrap();
    f.write_all_at(&vec![1u8; MIB as usize], 10 * MIB).unwrap();
    // SAFETY: an open fd; fallocate has no memory preconditions.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            (10 * MIB) as i64,
            MIB as i64,
        )
    };
    assert_eq!(r, 0, "punch hole: {}", std::io::Error::last_os_error());
    drop(f);
    // Copied in by rsync -S.
    run(Command::new("rsync")
        .args(["-aS"])
        .arg(s.path("src/sparse.bin"))
        .arg(mnt.join("rsynced.bin")));
    // Still staged: through the mount.
    assert_sparse(&mnt.join("made.bin"), "made, staged");
    assert_sparse(&mnt.join("rsynced.bin"), "rsynced, staged");

    m.sync();
    m.umount();
    for name in ["made.bin", "rsynced.bin"] {
        assert_sparse(&backend.join(name), &format!("{name} on the backend"));
        assert_eq!(
            std::fs::read(backend.join(name)).unwrap(),
            std::fs::read(s.path("src/sparse.bin")).unwrap(),
            "{name}: content"
        );
    }
    // Published and clean: SEEK_DATA/SEEK_HOLE answered from the backend.
    let m = Mount::start(&backend, &mnt, &s.path("cache"), "");
    assert_sparse(&mnt.join("made.bin"), "made, clean");
    m.umount();
}
