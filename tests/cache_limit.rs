//! The cache budget (`cache_size=`): writers are held back at open while
//! publishes free space, never refused; a single file larger than the budget
//! still goes through.

mod common;

use std::io::Write;
use std::process::Command;

use common::{Mount, Rng, Scratch, assert_same_tree, run};

const MIB: u64 = 1 << 20;

/// 512 MiB of 2 MiB files and one 100 MiB file through a 64 MiB budget. The
/// long debounce would otherwise let every file sit in the cache: the budget
/// is what makes them publish early.
#[test]
fn rsync_of_eight_times_the_cache_budget_completes() {
    let s = Scratch::new();
    let mut rng = Rng(77);
    for d in 0..8 {
        let dir = s.path(&format!("src/d{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..32 {
            let mut data = rng.bytes(4096);
            data.resize(2 * MIB as usize, (f + d) as u8);
            std::fs::write(dir.join(format!("f{f:02}.bin")), data).unwrap();
        }
    }
    {
        let mut big = std::fs::File::create(s.path("src/big.bin")).unwrap();
        let chunk = rng.bytes(MIB as usize);
        for _ in 0..100 {
            big.write_all(&chunk).unwrap();
        }
    }
    let m = Mount::start(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        "cache_size=64M,debounce=30s",
    );
    run(Command::new("rsync")
        .args(["-a", "--numeric-ids"])
        .arg(format!("{}/", s.path("src").display()))
        .arg(s.path("mnt/dst")));
    let cache = m.status()["cache"].clone();
    m.sync();
    let after = m.status();
    // Published files' copies are kept a few seconds (keep_clean), then go.
    wait_for("published files to free their cache space", || {
        m.status()["cache"]["used_bytes"] == 0
    });
    m.umount();
    assert_same_tree(&s.path("src"), &s.path("backend/dst"));

    eprintln!("cache after rsync: {cache}");
    assert_eq!(after["failures"], serde_json::json!([]));
    assert!(
        cache["writers_throttled"].as_u64().unwrap() > 0,
        "no writer was ever held back: the budget did not act"
    );
    // Writers are admitted only under the budget, and rsync has one file open
    // at a time: the cache never holds more than the budget plus the one
    // file being written (the biggest is 100 MiB).
    let peak = cache["peak_used_bytes"].as_u64().unwrap();
    assert!(
        peak <= 64 * MIB + 100 * MIB + 2 * MIB,
        "the cache grew to {} MiB with a 64 MiB budget",
        peak / MIB
    );
}

/// A mount of `s`'s backend (created if missing) at `s/mnt`, cache `s/cache`.
fn mount(s: &Scratch, opts: &str) -> Mount {
    std::fs::create_dir_all(s.path("backend")).unwrap();
    Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), opts)
}

fn append(path: &std::path::Path, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(data).unwrap();
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !done() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A published file's staged copy stays `keep_clean`: a rewrite soon after
/// costs no backend read; once it is dropped, the file reads from the
/// backend again, and what lands there is right both times.
#[test]
fn published_copies_serve_rewrites_then_go_back_to_the_backend() {
    let s = Scratch::new();
    let m = mount(&s, "keep_clean=5s,debounce=10ms");
    let mut expected = Rng(5).bytes(100_000);
    std::fs::write(s.path("mnt/f"), &expected).unwrap();
    m.sync();
    assert_eq!(m.status()["cache"]["clean_copies"], 1, "the published copy is not kept");
    let reads = m.backend_op("read");
    append(&s.path("mnt/f"), b"more");
    expected.extend_from_slice(b"more");
    m.sync();
    assert_eq!(
        m.backend_op("read"),
        reads,
        "the rewrite read the file back from the backend"
    );
    assert_eq!(std::fs::read(s.path("backend/f")).unwrap(), expected);

    wait_for("the kept copy to be dropped", || {
        let c = &m.status()["cache"];
        c["clean_copies"] == 0 && c["used_bytes"] == 0
    });
    append(&s.path("mnt/f"), b"again");
    expected.extend_from_slice(b"again");
    m.sync();
    assert!(
        m.backend_op("read") > reads,
        "a dropped copy must be read from the backend"
    );
    assert_eq!(std::fs::read(s.path("mnt/f")).unwrap(), expected);
    m.umount();
    assert_eq!(std::fs::read(s.path("backend/f")).unwrap(), expected);
    let staged = std::fs::read_dir(s.path("cache/staging")).unwrap().count();
    assert_eq!(staged, 0, "unmount leaves kept copies in the cache dir");
}

/// Kept copies a crash leaves behind are deleted at the next mount (the
/// backend has their content), not moved to lost+found like unaccounted
/// data; a file dirty at the crash is still published.
#[test]
fn kept_copies_left_by_a_crash_are_deleted_not_kept_aside() {
    let s = Scratch::new();
    let opts = "keep_clean=30s,debounce=10ms";
    let mut m = mount(&s, opts);
    for i in 0..20 {
        std::fs::write(s.path(&format!("mnt/f{i}")), format!("file {i}")).unwrap();
    }
    m.sync();
    assert_eq!(m.status()["cache"]["clean_copies"], 20);
    m.kill9();
    drop(m);
    // One of them written again and not yet published at the kill.
    let mut m2 = mount(&s, "keep_clean=30s,debounce=1h");
    append(&s.path("mnt/f3"), b" and more");
    m2.kill9();
    drop(m2);
    let m3 = mount(&s, opts);
    m3.sync();
    let lost = s.path("cache/lost+found");
    let kept_aside = std::fs::read_dir(&lost).map(|d| d.count()).unwrap_or(0);
    assert_eq!(kept_aside, 0, "clean copies were moved to {}", lost.display());
    m3.umount();
    for i in 0..20 {
        let want = if i == 3 {
            "file 3 and more".to_string()
        } else {
            format!("file {i}")
        };
        assert_eq!(std::fs::read_to_string(s.path(&format!("backend/f{i}"))).unwrap(), want);
    }
}

/// Reading a kept copy again and again does not keep it longer: it is
/// trusted for keep_clean after its publish, then the file reads from the
/// backend again (where another client may have changed it meanwhile).
#[test]
fn reads_do_not_extend_how_long_a_copy_is_kept() {
    let s = Scratch::new();
    let m = mount(&s, "keep_clean=3s,attr_ttl=3s,debounce=10ms");
    // The publish comes after the write: timing from here cannot make a
    // copy kept long enough look dropped early, on however slow a machine.
    let published = std::time::Instant::now();
    std::fs::write(s.path("mnt/f"), b"ours").unwrap();
    m.sync();
    assert_eq!(m.status()["cache"]["clean_copies"], 1);
    // Another client rewrites the file in place (same inode): only the kept
    // copy hides it.
    std::fs::write(s.path("backend/f"), b"THEIRS").unwrap();
    let mut seen_theirs = None;
    while published.elapsed() < std::time::Duration::from_secs(15) {
        if std::fs::read(s.path("mnt/f")).unwrap() == b"THEIRS" {
            seen_theirs = Some(published.elapsed());
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    m.umount();
    let after = seen_theirs.expect("the kept copy was served for 15s while being read every 100ms");
    assert!(
        after >= std::time::Duration::from_millis(2900),
        "dropped after {after:?}, before keep_clean"
    );
}
