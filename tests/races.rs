//! Changes that race a publish in flight: a slow backend keeps each publish
//! running for a while, and the file is renamed, unlinked or truncated and
//! rewritten at different moments of it. After `sync` the backend holds
//! exactly the last state, with no temp files left.

mod common;

use std::time::Duration;

use common::{Mount, Scratch, walk};

fn settle(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

#[test]
fn rename_unlink_and_rewrite_during_a_publish() {
    let s = Scratch::new();
    let (backend, mnt) = (s.path("backend"), s.path("mnt"));
    // Every backend request takes 15 ms: a publish (create, write, attrs,
    // rename) is in flight for 60 ms or more.
    let m = Mount::start(&backend, &mnt, &s.path("cache"), "debounce=0ms,fault_delay=15ms");
    std::fs::create_dir(mnt.join("d")).unwrap();
    m.sync();
    let delays = [0u64, 5, 20, 40, 70, 110, 160];
    for (k, ms) in delays.iter().enumerate() {
        // Renamed while its publish runs.
        std::fs::write(mnt.join(format!("d/a{k}")), format!("renamed {k}")).unwrap();
        // Unlinked while its publish runs.
        std::fs::write(mnt.join(format!("d/u{k}")), format!("unlinked {k}")).unwrap();
        // Truncated and rewritten while its publish runs.
        std::fs::write(mnt.join(format!("d/t{k}")), vec![b'x'; 256 << 10]).unwrap();
        settle(*ms);
        std::fs::rename(mnt.join(format!("d/a{k}")), mnt.join(format!("d/b{k}"))).unwrap();
        std::fs::remove_file(mnt.join(format!("d/u{k}"))).unwrap();
        std::fs::write(mnt.join(format!("d/t{k}")), format!("rewritten {k}")).unwrap();
    }
    m.sync();
    m.umount();
    for k in 0..delays.len() {
        assert!(
            !backend.join(format!("d/a{k}")).exists(),
            "a{k}: old name survived the rename"
        );
        assert_eq!(
            std::fs::read_to_string(backend.join(format!("d/b{k}"))).unwrap(),
            format!("renamed {k}")
        );
        assert!(
            !backend.join(format!("d/u{k}")).exists(),
            "u{k}: unlinked file came back"
        );
        assert_eq!(
            std::fs::read_to_string(backend.join(format!("d/t{k}"))).unwrap(),
            format!("rewritten {k}"),
            "t{k}"
        );
    }
    let left: Vec<_> = walk(&backend)
        .into_iter()
        .filter(|(p, _)| p.to_string_lossy().contains(".efscache."))
        .collect();
    assert!(left.is_empty(), "temp files left on the backend: {left:?}");
    let names = std::fs::read_dir(backend.join("d")).unwrap().count();
    assert_eq!(names, 2 * delays.len(), "unexpected names on the backend");
}
