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
    assert_eq!(after["cache"]["used_bytes"], 0, "published files still use cache space");
}
