//! rsync options that jobs copying onto EFS use, run for real through a mount
//! over a plain local directory: in-place rewrites, appends, partial and
//! delayed updates, backups, `--link-dest` snapshots, deletions, delta and
//! checksum transfers, temp dirs, `--fsync`, and owner and mode mapping.
//! After each rsync, `efscache sync`, then the backend (not only the mount)
//! is compared with what rsync was asked to produce, `rsync -aHnci --delete`
//! (a dry run with checksums) listing nothing, as `benches/run.sh` checks;
//! nothing of rsync's temp files or directories may be left on it. The
//! source trees have no names starting with a dot, so any such name on the
//! backend is a leftover. Every test mounts through `common::Mount`, which
//! unmounts on every path.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, FileTimes};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::*;

/// Source mtimes: old, whole seconds apart (rsync's quick check compares
/// them to the second), with nanoseconds.
const T0: u64 = 1_600_000_000;
/// Mtimes of changed source files: later than every original one.
const T1: u64 = 1_700_000_000;

/// The directories of `make_source`'s tree ("" is its root).
const DIRS: [&str; 6] = ["", "a", "a/b", "a/b/c", "d", "with space"];

fn set_mtime(path: &Path, secs: u64) {
    let t = UNIX_EPOCH + Duration::new(secs, (secs % 1000) as u32 * 1_000_000 + 4321);
    File::open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        .set_times(FileTimes::new().set_accessed(t).set_modified(t))
        .unwrap_or_else(|e| panic!("set times of {}: {e}", path.display()));
}

/// Writes `data` to `path` (creating its directory) with mtime `mtime`.
fn put(path: &Path, data: &[u8], mtime: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    set_mtime(path, mtime);
}

/// Sets a symlink's own mtime.
fn set_link_mtime(path: &Path, secs: u64) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let t = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 987_654_321,
    };
    // SAFETY: a valid path and two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [t, t].as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(rc, 0, "utimensat {}", path.display());
}

/// Gives every directory of `root` (itself included) and every symlink an
/// old mtime. Called after each change to a source tree: rsync compares
/// times to the second when it decides whether to set them, so a source
/// directory or symlink from the very second rsync creates or changes its
/// copy would not get its time applied (the copy would keep the time of its
/// creation, nanoseconds off; rsync does the same into a local directory).
fn age_dirs_and_links(root: &Path) {
    let entries = walk(root);
    let mut dirs: Vec<PathBuf> = entries
        .iter()
        .filter(|(_, m)| m.is_dir())
        .map(|(p, _)| root.join(p))
        .collect();
    dirs.push(root.to_path_buf());
    for (i, d) in dirs.iter().enumerate() {
        set_mtime(d, T0 - 10_000 + i as u64);
    }
    for (i, (p, _)) in entries.iter().filter(|(_, m)| m.is_symlink()).enumerate() {
        set_link_mtime(&root.join(p), T0 - 20_000 + i as u64);
    }
}

/// A tree of the shape rsync jobs see: nested directories and one with a
/// space in its name, six files in each from 0 bytes to 1.5 MiB, different
/// modes and owners (directories 0755), a symlink, old nanosecond mtimes
/// on files and directories. No hard links and no names starting with a dot.
fn make_source(root: &Path, seed: u64) {
    const SIZES: [usize; 8] = [0, 1, 100, 4096, 20_000, 70_000, 300_000, 1_500_000];
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    for (i, dir) in DIRS.iter().enumerate() {
        for j in 0..6 {
            let p = root.join(dir).join(format!("f{j}"));
            put(
                &p,
                &rng.bytes(SIZES[(i + j * 3) % SIZES.len()]),
                T0 + (i * 10 + j) as u64,
            );
            let mode = [0o644, 0o600, 0o755, 0o640][(i + j) % 4];
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            if (i + j) % 3 == 0 {
                std::os::unix::fs::lchown(&p, Some(1000), Some(100)).unwrap();
            }
        }
    }
    for dir in DIRS {
        std::fs::set_permissions(root.join(dir), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::os::unix::fs::symlink("f0", root.join("a/link")).unwrap();
    age_dirs_and_links(root);
}

/// Rewrites the source file `rel` with new content (about half its size,
/// plus 1000 bytes) and the mtime `mtime`.
fn change(root: &Path, rel: &str, mtime: u64) {
    let p = root.join(rel);
    let old = std::fs::metadata(&p).map_or(0, |m| m.len() as usize);
    let mut rng = Rng(mtime ^ old as u64 ^ 0x5555);
    put(&p, &rng.bytes(old / 2 + 1000), mtime);
}

fn slash(p: &Path) -> String {
    format!("{}/", p.display())
}

/// `rsync -aH EXTRA SRC/ DST`: its stdout. It must succeed and print
/// nothing on stderr (no warning either, such as a failed verification).
fn rsync(src: &Path, dst: &Path, extra: &[&str]) -> String {
    let mut c = Command::new("rsync");
    c.arg("-aH").args(extra).arg(slash(src)).arg(dst);
    let out = c.output().expect("run rsync");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success() && stderr.is_empty(),
        "{c:?}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// `dst` (a directory on the backend) holds exactly what `expected` holds as
/// rsync -aH sees it, content compared by checksum: the dry run `rsync
/// -aHnci --delete EXTRA EXPECTED/ DST/` lists nothing to change.
fn assert_backend_matches(expected: &Path, dst: &Path, extra: &[&str]) {
    let mut c = Command::new("rsync");
    c.args(["-aHnci", "--delete"])
        .args(extra)
        .arg(slash(expected))
        .arg(slash(dst));
    let out = run(&mut c);
    assert!(
        out.trim().is_empty(),
        "{} is not what {} holds; {c:?} lists:\n{out}",
        dst.display(),
        expected.display()
    );
}

/// No name below `dir` starts with a dot: no temp file, partial or holding
/// directory of rsync's, and no publish temp file of efscache's.
fn assert_no_dot_names(dir: &Path) {
    let dots: Vec<PathBuf> = walk(dir)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.components().any(|c| c.as_os_str().as_bytes().starts_with(b".")))
        .collect();
    assert!(dots.is_empty(), "left in {}: {dots:?}", dir.display());
}

/// `efscache sync`, then: the backend's copy `backend_dst` equals `src`
/// (by rsync and by `assert_same_tree`, which also compares nanosecond
/// times, owners and modes) and holds no leftover; so does the mount's.
fn sync_and_check(m: &Mount, src: &Path, backend_dst: &Path, mount_dst: &Path) {
    m.sync();
    assert_backend_matches(src, backend_dst, &[]);
    assert_same_tree(src, backend_dst);
    assert_no_dot_names(backend_dst);
    assert_same_tree(src, mount_dst);
    assert_no_dot_names(mount_dst);
}

/// The files rsync's `--itemize-changes` output says it sent (`>f`), sorted.
fn transferred(itemized: &str) -> Vec<String> {
    let mut v: Vec<String> = itemized
        .lines()
        .filter(|l| l.starts_with(">f"))
        .map(|l| l.split_once(' ').expect("itemized line").1.trim_start().to_string())
        .collect();
    v.sort();
    v
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    v.sort();
    v
}

/// A byte count from rsync's `--stats` output ("Matched data: 1,234 bytes").
fn stat_bytes(stats: &str, label: &str) -> u64 {
    let line = stats
        .lines()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} in rsync's stats:\n{stats}"));
    line[label.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .replace(',', "")
        .parse()
        .unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

fn ino(p: &Path) -> u64 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .ino()
}

fn mount(s: &Scratch, opts: &str) -> Mount {
    Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), opts)
}

/// The files `--inplace` rewrites in each round: one shorter (a prefix of
/// the old content with its first byte changed), one longer (the old
/// content and more), one of the same size (a changed middle and last
/// byte), one emptied and one filled in turn. Returns their names.
fn inplace_round(src: &Path, round: u64) -> Vec<String> {
    let d = src.join("inplace");
    let mut rng = Rng(round * 1_000_003 + 17);
    let old = |n: &str| std::fs::read(d.join(n)).unwrap();
    let mtime = T1 + round * 100;
    let mut shorter = old("shorter");
    shorter.truncate(shorter.len() / 3);
    shorter[0] ^= 0xff;
    let mut longer = old("longer");
    longer.extend(rng.bytes(longer.len() + 100_000));
    let mut same = old("same-size");
    let mid = same.len() / 2;
    same[mid..mid + 4096].copy_from_slice(&rng.bytes(4096));
    *same.last_mut().unwrap() ^= 0x5a;
    let (a, b) = if round % 2 == 1 {
        (Vec::new(), rng.bytes(10_000 * round as usize))
    } else {
        (rng.bytes(77_777), Vec::new())
    };
    put(&d.join("shorter"), &shorter, mtime);
    put(&d.join("longer"), &longer, mtime + 1);
    put(&d.join("same-size"), &same, mtime + 2);
    put(&d.join("flip-a"), &a, mtime + 3);
    put(&d.join("flip-b"), &b, mtime + 4);
    age_dirs_and_links(src);
    sorted(&[
        "inplace/shorter",
        "inplace/longer",
        "inplace/same-size",
        "inplace/flip-a",
        "inplace/flip-b",
    ])
}

/// `--inplace` rewrites published files through their own inode: shorter,
/// longer, same-size, emptied and filled. First while the mount may still
/// hold the files' copies (`keep_clean`), then after a remount with
/// `keep_clean=0`, where each rewrite starts from the backend file.
#[test]
fn rsync_inplace_rewrites_published_files_shorter_longer_and_same_size() {
    let s = Scratch::new();
    let (src, backend_dst, dst) = (s.path("src"), s.path("backend/dst"), s.path("mnt/dst"));
    make_source(&src, 1);
    let mut rng = Rng(5);
    put(&src.join("inplace/shorter"), &rng.bytes(200_000), T0 + 500);
    put(&src.join("inplace/longer"), &rng.bytes(3_000), T0 + 501);
    put(&src.join("inplace/same-size"), &rng.bytes(131_072), T0 + 502);
    put(&src.join("inplace/flip-a"), &rng.bytes(50_000), T0 + 503);
    put(&src.join("inplace/flip-b"), b"", T0 + 504);
    put(&src.join("inplace/untouched"), &rng.bytes(9_000), T0 + 505);
    age_dirs_and_links(&src);
    let round = |m: &Mount, round: u64| {
        let changed = inplace_round(&src, round);
        let inodes: Vec<u64> = changed.iter().map(|n| ino(&dst.join(n))).collect();
        let out = rsync(&src, &dst, &["--inplace", "--itemize-changes"]);
        assert_eq!(transferred(&out), changed, "round {round}: rsync sent:\n{out}");
        let after: Vec<u64> = changed.iter().map(|n| ino(&dst.join(n))).collect();
        assert_eq!(
            after, inodes,
            "round {round}: --inplace replaced a file instead of rewriting it"
        );
        sync_and_check(m, &src, &backend_dst, &dst);
    };
    let m = mount(&s, "");
    rsync(&src, &dst, &[]);
    sync_and_check(&m, &src, &backend_dst, &dst);
    round(&m, 1);
    m.umount();
    let m = mount(&s, "keep_clean=0");
    round(&m, 2);
    m.umount();
}

/// `--append` sends only the new tail of files that grew and writes it onto
/// the end of the published file; `--append-verify` also reads the whole
/// file back (after a remount, from the backend) to check the old part
/// before it appends. Files grow from 0, 1 byte, 10 KB and 1 MiB.
#[test]
fn rsync_append_and_append_verify_grow_published_files() {
    let s = Scratch::new();
    let (src, backend_dst, dst) = (s.path("src"), s.path("backend/dst"), s.path("mnt/dst"));
    let names = ["log/app1", "log/app2", "log/app3", "log/big", "log/same"];
    let mut rng = Rng(11);
    for (i, (n, len)) in names.iter().zip([10_000, 1, 0, 1 << 20, 5_000]).enumerate() {
        put(&src.join(n), &rng.bytes(len), T0 + i as u64);
    }
    age_dirs_and_links(&src);
    let grow = |round: u64| {
        let mut grown = Vec::new();
        let mut total = 0;
        for (i, n) in names[..4].iter().enumerate() {
            let mut data = std::fs::read(src.join(n)).unwrap();
            let more = 1 + i * 40_000 + round as usize * 333;
            data.extend(Rng(round * 100 + i as u64 + 1).bytes(more));
            put(&src.join(n), &data, T1 + round * 10 + i as u64);
            grown.push(n.to_string());
            total += more as u64;
        }
        age_dirs_and_links(&src);
        grown.sort();
        (grown, total)
    };

    let m = mount(&s, "");
    rsync(&src, &dst, &[]);
    sync_and_check(&m, &src, &backend_dst, &dst);
    let (grown, added) = grow(1);
    let out = rsync(&src, &dst, &["--append", "--itemize-changes", "--stats"]);
    assert_eq!(transferred(&out), grown, "{out}");
    assert_eq!(
        stat_bytes(&out, "Literal data:"),
        added,
        "--append sent more than the new tails:\n{out}"
    );
    sync_and_check(&m, &src, &backend_dst, &dst);
    m.umount();

    let m = mount(&s, "keep_clean=0");
    for round in 2..=3 {
        let (grown, added) = grow(round);
        let out = rsync(&src, &dst, &["--append-verify", "--itemize-changes", "--stats"]);
        assert_eq!(transferred(&out), grown, "round {round}: {out}");
        assert_eq!(
            stat_bytes(&out, "Literal data:"),
            added,
            "round {round}: --append-verify sent more than the new tails:\n{out}"
        );
        sync_and_check(&m, &src, &backend_dst, &dst);
    }
    m.umount();
}

/// A process group this test started (rsync and the processes it forks),
/// killed if the test ends before it did.
struct Group {
    pgid: i32,
    gone: bool,
}

impl Group {
    fn signal(&self, sig: i32) -> bool {
        // SAFETY: signals only the process group this test created.
        unsafe { libc::kill(-self.pgid, sig) == 0 }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.gone {
            self.signal(libc::SIGKILL);
        }
    }
}

/// `--partial-dir=.rsync-partial`: an rsync interrupted (SIGINT, as by
/// Ctrl-C) in the middle of a 16 MiB file leaves what it received in
/// `dst/.rsync-partial/`, and that reaches the backend; the next run uses
/// it as the basis (read back through the mount) and removes the file and
/// the directory, through the mount and on the backend.
#[test]
fn rsync_partial_dir_keeps_an_interrupted_file_and_the_resume_removes_it() {
    let s = Scratch::new();
    let (src, backend_dst, dst) = (s.path("src"), s.path("backend/dst"), s.path("mnt/dst"));
    let big = Rng(99).bytes(16 << 20);
    put(&src.join("big.bin"), &big, T0);
    for i in 0..3u64 {
        put(
            &src.join(format!("small{i}")),
            format!("small file {i}").as_bytes(),
            T0 + 1 + i,
        );
    }
    age_dirs_and_links(&src);
    let m = mount(&s, "");
    // 1 MiB/s: big.bin (sent first) takes 16 s.
    let mut child = Command::new("rsync")
        .args(["-aH", "--partial-dir=.rsync-partial", "--bwlimit=1024"])
        .arg(slash(&src))
        .arg(&dst)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start rsync");
    let mut group = Group {
        pgid: child.id() as i32,
        gone: false,
    };
    let t = Instant::now();
    let temp = loop {
        let found = std::fs::read_dir(&dst).ok().and_then(|rd| {
            rd.flatten()
                .find(|e| e.file_name().as_bytes().starts_with(b".big.bin."))
                .map(|e| e.path())
        });
        if let Some(p) = found {
            break p;
        }
        if let Some(exit) = child.try_wait().unwrap() {
            panic!("rsync ended before it wrote big.bin's temp file: {exit}");
        }
        assert!(t.elapsed() < Duration::from_secs(120), "rsync never started big.bin");
        std::thread::sleep(Duration::from_millis(20));
    };
    // Let it receive some data (at most a few seconds; any amount will do).
    let t = Instant::now();
    while std::fs::metadata(&temp).map_or(0, |m| m.len()) < 1 << 20 && t.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(group.signal(libc::SIGINT), "rsync's process group is gone");
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(20), "rsync was not interrupted by the SIGINT: {exit}");
    // The receiver (another process of the group) moves the partial file.
    let t = Instant::now();
    while group.signal(0) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "rsync's processes did not exit after SIGINT"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    group.gone = true;

    let partial = std::fs::read(dst.join(".rsync-partial/big.bin")).expect("rsync kept no partial file");
    assert!(
        !partial.is_empty() && partial.len() < big.len(),
        "partial file of {} bytes",
        partial.len()
    );
    assert!(big.starts_with(&partial), "the partial file is not what rsync sent");
    let temps: Vec<_> = std::fs::read_dir(&dst)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.as_bytes().starts_with(b".big.bin."))
        .collect();
    assert!(temps.is_empty(), "rsync's temp file is still there: {temps:?}");
    m.sync();
    assert!(
        std::fs::read(backend_dst.join(".rsync-partial/big.bin")).ok() == Some(partial.clone()),
        "the partial file did not reach the backend as rsync left it"
    );
    assert!(!backend_dst.join("big.bin").exists());

    let out = rsync(
        &src,
        &dst,
        &["--partial-dir=.rsync-partial", "--no-whole-file", "--stats"],
    );
    let matched = stat_bytes(&out, "Matched data:");
    assert!(
        matched > 0 && matched <= partial.len() as u64,
        "the resume matched {matched} bytes of a {}-byte partial file:\n{out}",
        partial.len()
    );
    assert!(
        !dst.join(".rsync-partial").exists(),
        "the mount still has .rsync-partial"
    );
    sync_and_check(&m, &src, &backend_dst, &dst);
    assert!(!backend_dst.join(".rsync-partial").exists());
    m.umount();
}

/// `--delay-updates` writes every updated file into a holding directory in
/// its directory (`.~tmp~`, or the `--partial-dir`) and renames them all
/// into place at the end, then removes the holding directories. With
/// `debounce=0ms` the held files may reach the backend before they are
/// moved; none of it may stay there. The second round replaces published files
/// after a remount.
#[test]
fn rsync_delay_updates_leaves_no_holding_directory_on_the_backend() {
    let s = Scratch::new();
    let (src, backend_dst, dst) = (s.path("src"), s.path("backend/dst"), s.path("mnt/dst"));
    make_source(&src, 2);
    let m = mount(&s, "debounce=0ms");
    let out = rsync(&src, &dst, &["--delay-updates", "--itemize-changes"]);
    assert_eq!(transferred(&out).len(), 36, "every file is new:\n{out}");
    sync_and_check(&m, &src, &backend_dst, &dst);
    m.umount();

    let m = mount(&s, "debounce=0ms");
    let changed = ["f1", "a/f2", "a/b/c/f3", "with space/f4", "d/f5"];
    for (i, n) in changed.iter().enumerate() {
        change(&src, n, T1 + i as u64);
    }
    put(&src.join("e/new"), b"a new file in a new directory", T1 + 10);
    age_dirs_and_links(&src);
    let out = rsync(
        &src,
        &dst,
        &["--delay-updates", "--partial-dir=.rsync-partial", "--itemize-changes"],
    );
    let mut want: Vec<&str> = changed.to_vec();
    want.push("e/new");
    assert_eq!(transferred(&out), sorted(&want), "{out}");
    sync_and_check(&m, &src, &backend_dst, &dst);
    m.umount();
}

/// The regular files below `root`, each with its content, mode, owner and
/// mtime (`describe`'s line).
fn describe_files(root: &Path) -> BTreeMap<PathBuf, String> {
    describe(root)
        .into_iter()
        .filter(|(_, line)| line.starts_with("file "))
        .collect()
}

/// `--backup --backup-dir=../bak` with `--delete`: each published file that
/// is replaced or deleted (also every file of a deleted directory) is
/// renamed into `bak/` beside the destination, with its content, mode,
/// owner and mtime, while the new versions take their names.
#[test]
fn rsync_backup_dir_moves_replaced_and_deleted_published_files_aside() {
    let s = Scratch::new();
    let (src, backend, mnt) = (s.path("src"), s.path("backend"), s.path("mnt"));
    make_source(&src, 3);
    let m = mount(&s, "");
    rsync(&src, &mnt.join("dst"), &[]);
    sync_and_check(&m, &src, &backend.join("dst"), &mnt.join("dst"));
    let old = s.path("old");
    rsync(&src, &old, &[]);

    change(&src, "a/f1", T1);
    change(&src, "with space/f2", T1 + 1);
    std::fs::remove_file(src.join("d/f3")).unwrap();
    std::fs::remove_dir_all(src.join("a/b/c")).unwrap();
    put(&src.join("d/new"), b"new", T1 + 2);
    age_dirs_and_links(&src);
    rsync(&src, &mnt.join("dst"), &["--delete", "--backup", "--backup-dir=../bak"]);
    sync_and_check(&m, &src, &backend.join("dst"), &mnt.join("dst"));

    let mut moved = vec![
        PathBuf::from("a/f1"),
        PathBuf::from("with space/f2"),
        PathBuf::from("d/f3"),
    ];
    moved.extend((0..6).map(|j| PathBuf::from(format!("a/b/c/f{j}"))));
    let want: BTreeMap<PathBuf, String> = describe_files(&old)
        .into_iter()
        .filter(|(p, _)| moved.contains(p))
        .collect();
    assert_eq!(want.len(), moved.len());
    assert_eq!(describe_files(&backend.join("bak")), want, "the backend's bak/");
    assert_eq!(describe_files(&mnt.join("bak")), want, "the mount's bak/");
    assert_no_dot_names(&backend.join("bak"));
    m.umount();
}

/// `--backup --suffix=~`: each published file that is replaced or deleted
/// is renamed to NAME~ in place (a later run renames the next version over
/// that backup), and the new version takes the name.
#[test]
fn rsync_backup_suffix_renames_replaced_published_files_in_place() {
    let s = Scratch::new();
    let (src, backend_dst, dst) = (s.path("src"), s.path("backend/dst"), s.path("mnt/dst"));
    make_source(&src, 4);
    let m = mount(&s, "");
    rsync(&src, &dst, &[]);
    sync_and_check(&m, &src, &backend_dst, &dst);
    let flags = ["--delete", "--backup", "--suffix=~"];
    // Each round: the files to change and the files to delete. Afterwards
    // NAME~ holds each one's version from before the round, and backups of
    // earlier rounds stay.
    let rounds: [(&[&str], &[&str]); 2] = [(&["a/f1", "d/f2"], &["d/f3"]), (&["a/f1", "a/b/f4"], &[])];
    let mut expected: BTreeMap<PathBuf, String> = BTreeMap::new();
    for (round, (changes, deletes)) in rounds.iter().enumerate() {
        let before = s.path(&format!("before{round}"));
        rsync(&src, &before, &[]);
        let old = describe_files(&before);
        for (i, n) in changes.iter().enumerate() {
            change(&src, n, T1 + (round * 10 + i) as u64);
        }
        for n in deletes.iter() {
            std::fs::remove_file(src.join(n)).unwrap();
        }
        age_dirs_and_links(&src);
        let out = rsync(&src, &dst, &[&flags[..], &["--itemize-changes"][..]].concat());
        assert_eq!(transferred(&out), sorted(changes), "round {round}: {out}");
        m.sync();
        // (Directory times left out: rsync renames the backups after it set
        // the times of their directories, into a local directory too.)
        assert_backend_matches(&src, &backend_dst, &["--exclude=*~", "--omit-dir-times"]);
        for n in changes.iter().chain(deletes.iter()) {
            expected.insert(PathBuf::from(format!("{n}~")), old[Path::new(n)].clone());
        }
        let backups = |root: &Path| -> BTreeMap<PathBuf, String> {
            describe_files(root)
                .into_iter()
                .filter(|(p, _)| p.as_os_str().as_bytes().ends_with(b"~"))
                .collect()
        };
        assert_eq!(backups(&backend_dst), expected, "round {round}: backups on the backend");
        assert_eq!(backups(&dst), expected, "round {round}: backups in the mount");
        assert_no_dot_names(&backend_dst);
    }
    m.umount();
}

/// The hard-link structure of the regular files below `root`: for each, its
/// link count and the first path (in sorted order) that shares its inode.
fn link_structure(root: &Path) -> BTreeMap<PathBuf, (u64, PathBuf)> {
    let files: Vec<(PathBuf, std::fs::Metadata)> = walk(root).into_iter().filter(|(_, m)| m.is_file()).collect();
    let mut first: HashMap<(u64, u64), PathBuf> = HashMap::new();
    for (p, m) in &files {
        first.entry((m.dev(), m.ino())).or_insert_with(|| p.clone());
    }
    files
        .into_iter()
        .map(|(p, m)| {
            let f = first[&(m.dev(), m.ino())].clone();
            (p, (m.nlink(), f))
        })
        .collect()
}

/// Snapshots with `--link-dest=../PREV`: files unchanged since the previous
/// snapshot are hard links to it (made through the mount to published
/// files), changed ones are new files. On the backend (and in the mount)
/// the link counts and shared inodes are exactly those the same rsyncs
/// give on a local directory, across three snapshots and after the oldest
/// is removed.
#[test]
fn rsync_link_dest_snapshots_share_inodes_on_the_backend() {
    let s = Scratch::new();
    let (src, local) = (s.path("src"), s.path("local"));
    let (backend, mnt) = (s.path("backend/snaps"), s.path("mnt/snaps"));
    make_source(&src, 5);
    std::fs::create_dir(&local).unwrap();
    // The same rsync into the mount and into a local directory.
    let snapshot = |name: &str, prev: Option<&str>| {
        let link = prev.map(|p| format!("--link-dest=../{p}"));
        let extra: Vec<&str> = link.iter().map(|l| l.as_str()).collect();
        rsync(&src, &local.join(name), &extra);
        rsync(&src, &mnt.join(name), &extra)
    };
    let check = |m: &Mount, snaps: &[&str]| {
        m.sync();
        for name in snaps {
            assert_backend_matches(&local.join(name), &backend.join(name), &[]);
        }
        let want = link_structure(&local);
        assert_eq!(link_structure(&backend), want, "hard links on the backend");
        assert_eq!(link_structure(&mnt), want, "hard links in the mount");
        assert_no_dot_names(&backend);
        want
    };

    let m = mount(&s, "");
    std::fs::create_dir(&mnt).unwrap();
    snapshot("snap.0", None);
    check(&m, &["snap.0"]);
    change(&src, "a/f1", T1);
    std::fs::set_permissions(src.join("d/f2"), std::fs::Permissions::from_mode(0o604)).unwrap();
    std::fs::remove_file(src.join("with space/f4")).unwrap();
    put(&src.join("d/new"), b"new in snap.1", T1 + 1);
    age_dirs_and_links(&src);
    snapshot("snap.1", Some("snap.0"));
    let links = check(&m, &["snap.0", "snap.1"]);
    assert_eq!(links[Path::new("snap.1/a/f0")].0, 2, "an unchanged file is not linked");
    assert_eq!(links[Path::new("snap.1/a/f1")].0, 1, "a changed file is linked");
    assert_eq!(links[Path::new("snap.1/d/f2")].0, 1, "a file with a new mode is linked");
    m.umount();

    // A fresh mount: the previous snapshot is only on the backend.
    let m = mount(&s, "keep_clean=0");
    change(&src, "d/f0", T1 + 2);
    age_dirs_and_links(&src);
    snapshot("snap.2", Some("snap.1"));
    let links = check(&m, &["snap.0", "snap.1", "snap.2"]);
    assert_eq!(links[Path::new("snap.2/a/f0")].0, 3);
    assert_eq!(links[Path::new("snap.2/d/f0")].0, 1);
    assert_eq!(links[Path::new("snap.1/d/f0")].0, 2);

    // Rotating out the oldest snapshot drops one link of each file.
    std::fs::remove_dir_all(local.join("snap.0")).unwrap();
    std::fs::remove_dir_all(mnt.join("snap.0")).unwrap();
    let links = check(&m, &["snap.1", "snap.2"]);
    assert!(!backend.join("snap.0").exists());
    assert_eq!(links[Path::new("snap.2/a/f0")].0, 2);
    m.umount();
}

/// `--delete` (during the transfer) removes files and whole directories
/// that left the source, and replaces a file by a directory, a directory by
/// a file and a symlink by a file, in published trees.
#[test]
fn rsync_delete_removes_files_and_directories_and_changes_types() {
    let s = Scratch::new();
    let (src, backend_dst, dst) = (s.path("src"), s.path("backend/dst"), s.path("mnt/dst"));
    make_source(&src, 6);
    put(&src.join("gone/deep/er/f"), b"gone", T0);
    put(&src.join("gone/g"), b"gone too", T0);
    put(&src.join("file-then-dir"), b"a file", T0);
    put(&src.join("dir-then-file/inner/x"), b"x", T0);
    put(&src.join("dir-then-file/y"), b"y", T0);
    std::os::unix::fs::symlink("a/f0", src.join("link-then-file")).unwrap();
    age_dirs_and_links(&src);
    let m = mount(&s, "");
    rsync(&src, &dst, &[]);
    sync_and_check(&m, &src, &backend_dst, &dst);
    // The same rsyncs into a local directory say what rsync must do.
    let local = s.path("local");
    rsync(&src, &local, &[]);

    std::fs::remove_dir_all(src.join("gone")).unwrap();
    for n in ["f0", "a/f1", "a/b/c/f2", "with space/f3"] {
        std::fs::remove_file(src.join(n)).unwrap();
    }
    std::fs::remove_file(src.join("file-then-dir")).unwrap();
    put(&src.join("file-then-dir/now-a-dir"), b"inside", T1);
    std::fs::remove_dir_all(src.join("dir-then-file")).unwrap();
    put(&src.join("dir-then-file"), b"now a file", T1 + 1);
    std::fs::remove_file(src.join("link-then-file")).unwrap();
    put(&src.join("link-then-file"), b"now a file too", T1 + 2);
    put(&src.join("a/b/added"), b"added", T1 + 3);
    age_dirs_and_links(&src);
    let want = rsync(&src, &local, &["--delete", "--itemize-changes"]);
    let out = rsync(&src, &dst, &["--delete", "--itemize-changes"]);
    assert_eq!(
        out, want,
        "rsync into the mount did other things than into a local directory"
    );
    for gone in ["gone/", "a/f1", "dir-then-file/inner/x"] {
        assert!(
            out.lines().any(|l| l.starts_with("*deleting") && l.ends_with(gone)),
            "{gone} was not deleted:\n{out}"
        );
    }
    sync_and_check(&m, &src, &backend_dst, &dst);
    m.umount();
}

/// `--delete-excluded` with `--exclude` patterns removes from a published
/// tree what the patterns now hide (log files anywhere, every `cache/`
/// directory), and nothing else.
#[test]
fn rsync_delete_excluded_removes_what_the_excludes_now_hide() {
    let s = Scratch::new();
    let (src, backend_dst, dst) = (s.path("src"), s.path("backend/dst"), s.path("mnt/dst"));
    make_source(&src, 7);
    for dir in ["", "a", "a/b/c", "with space"] {
        put(&src.join(dir).join("run.log"), b"log line\n", T0 + 1);
        put(&src.join(dir).join("cache/blob"), &Rng(3).bytes(30_000), T0 + 2);
        put(&src.join(dir).join("cache/sub/blob"), b"cached", T0 + 3);
    }
    age_dirs_and_links(&src);
    let m = mount(&s, "");
    rsync(&src, &dst, &[]);
    sync_and_check(&m, &src, &backend_dst, &dst);
    assert!(backend_dst.join("a/b/c/cache/sub/blob").exists());
    let local = s.path("local");
    rsync(&src, &local, &[]);

    let excludes = ["--exclude=*.log", "--exclude=cache/"];
    let flags = [
        &excludes[..],
        &["--delete", "--delete-excluded", "--itemize-changes"][..],
    ]
    .concat();
    let want = rsync(&src, &local, &flags);
    let out = rsync(&src, &dst, &flags);
    assert_eq!(
        out, want,
        "rsync into the mount did other things than into a local directory"
    );
    assert!(transferred(&out).is_empty(), "nothing was to be sent:\n{out}");
    let deleted = out.lines().filter(|l| l.starts_with("*deleting")).count();
    // Per directory: run.log, cache/, cache/blob, cache/sub/, cache/sub/blob.
    assert_eq!(deleted, 4 * 5, "{out}");
    m.sync();
    // Excluded names still on the backend would be listed for deletion.
    assert_backend_matches(
        &src,
        &backend_dst,
        &[&excludes[..], &["--delete-excluded"][..]].concat(),
    );
    let hidden: Vec<PathBuf> = walk(&backend_dst)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.extension().is_some_and(|e| e == "log") || p.components().any(|c| c.as_os_str() == "cache"))
        .collect();
    assert!(hidden.is_empty(), "excluded names left on the backend: {hidden:?}");
    let kept = walk(&backend_dst).len();
    // 36 files, a symlink, 5 directories.
    assert_eq!(kept, 36 + 1 + 5, "the backend lost more than the excluded names");
    assert_no_dot_names(&backend_dst);
    m.umount();
}

/// The big files of the delta test, and how each pass changes them.
const DELTA_FILES: [&str; 4] = ["big/one", "big/two", "big/three", "big/four"];

fn delta_changes(src: &Path, pass: u64) -> u64 {
    let mut rng = Rng(pass * 31 + 7);
    let mut total = 0;
    for (i, n) in DELTA_FILES.iter().enumerate() {
        let mut data = std::fs::read(src.join(n)).unwrap();
        match i {
            // A changed middle.
            0 => {
                let at = data.len() / 2;
                data[at..at + 10_000].copy_from_slice(&rng.bytes(10_000));
            }
            // 777 bytes inserted near the start: every later block moves.
            1 => {
                data.splice(1000..1000, rng.bytes(777));
            }
            // 50,000 bytes cut out of the middle.
            2 => {
                data.drain(1_000_000..1_050_000);
            }
            // Appended.
            _ => data.extend(rng.bytes(123_456)),
        }
        total += data.len() as u64;
        put(&src.join(n), &data, T1 + pass * 10 + i as u64);
    }
    age_dirs_and_links(src);
    total
}

/// `--no-whole-file`: rsync reads each published file back through the
/// mount as the basis of its delta and builds the new version from the
/// blocks it matches. After a remount the basis comes from the backend;
/// then `--inplace --no-whole-file` patches the just-published files in
/// place (where it cannot use blocks it has already overwritten, such as
/// those after an insertion). Most of the data must be matched, not sent
/// again.
#[test]
fn rsync_no_whole_file_builds_new_versions_from_the_basis_in_the_mount() {
    let s = Scratch::new();
    let (src, backend_dst, dst) = (s.path("src"), s.path("backend/dst"), s.path("mnt/dst"));
    let mut rng = Rng(13);
    for (i, (n, len)) in DELTA_FILES.iter().zip([4 << 20, 2 << 20, 3 << 20, 1 << 20]).enumerate() {
        put(&src.join(n), &rng.bytes(len), T0 + i as u64);
    }
    put(&src.join("small"), b"unchanged", T0 + 9);
    age_dirs_and_links(&src);
    let m = mount(&s, "");
    rsync(&src, &dst, &[]);
    sync_and_check(&m, &src, &backend_dst, &dst);
    m.umount();

    let m = mount(&s, "");
    // (pass, rsync flags, least share of the data matched, in tenths)
    let passes = [
        (1, &["--no-whole-file"][..], 9),
        (2, &["--no-whole-file", "--inplace"][..], 5),
    ];
    for (pass, flags, tenths) in passes {
        let total = delta_changes(&src, pass);
        let out = rsync(&src, &dst, &[flags, &["--stats", "--itemize-changes"][..]].concat());
        assert_eq!(transferred(&out), sorted(&DELTA_FILES), "pass {pass}: {out}");
        let (matched, literal) = (stat_bytes(&out, "Matched data:"), stat_bytes(&out, "Literal data:"));
        assert_eq!(matched + literal, total, "pass {pass}: {out}");
        assert!(
            matched > total * tenths / 10,
            "pass {pass}: rsync matched only {matched} of {total} bytes against the basis read from the mount:\n{out}"
        );
        sync_and_check(&m, &src, &backend_dst, &dst);
    }
    m.umount();
}

/// `-c`: rsync reads every file of a published tree back (after a remount,
/// from the backend) and finds exactly the files whose content changed
/// while size and mtime stayed, which the quick check misses; after the
/// re-sync the backend has the new content, and a second `-c` run finds
/// nothing.
#[test]
fn rsync_checksum_resync_reads_every_file_back_and_finds_only_real_changes() {
    let s = Scratch::new();
    let (src, backend_dst, dst) = (s.path("src"), s.path("backend/dst"), s.path("mnt/dst"));
    make_source(&src, 8);
    let m = mount(&s, "");
    rsync(&src, &dst, &[]);
    sync_and_check(&m, &src, &backend_dst, &dst);
    m.umount();

    // Same size, same mtime, other bytes.
    let sneaky = ["a/f2", "a/b/f0", "with space/f5"];
    for n in sneaky {
        let p = src.join(n);
        let meta = std::fs::metadata(&p).unwrap();
        assert!(meta.len() > 0, "{n} is empty in this tree");
        let mut data = std::fs::read(&p).unwrap();
        let last = data.len() - 1;
        data[last / 2] ^= 0x01;
        data[last] ^= 0x80;
        std::fs::write(&p, &data).unwrap();
        File::open(&p)
            .unwrap()
            .set_times(FileTimes::new().set_modified(meta.modified().unwrap()))
            .unwrap();
    }
    let m = mount(&s, "keep_clean=0");
    let quick = rsync(&src, &dst, &["--itemize-changes"]);
    assert_eq!(quick.trim(), "", "the quick check found a difference");
    let out = rsync(&src, &dst, &["--checksum", "--itemize-changes"]);
    assert_eq!(transferred(&out), sorted(&sneaky), "{out}");
    assert!(
        out.lines().all(|l| l.starts_with(">fc") && l.len() > 12),
        "-c itemized more than the content changes:\n{out}"
    );
    sync_and_check(&m, &src, &backend_dst, &dst);
    let again = rsync(&src, &dst, &["--checksum", "--itemize-changes"]);
    assert_eq!(again.trim(), "", "a second -c run found differences");
    m.umount();
}

/// `--chmod` and `--chown` (as root) set modes and owners on new files and
/// directories, and later on published ones without sending their data
/// again; the backend ends exactly as the same rsyncs leave a local
/// directory.
#[test]
fn rsync_chmod_and_chown_land_on_the_backend_as_on_a_local_directory() {
    let s = Scratch::new();
    let (src, expect) = (s.path("src"), s.path("expect"));
    let (backend_dst, dst) = (s.path("backend/dst"), s.path("mnt/dst"));
    make_source(&src, 9);
    let m = mount(&s, "");
    let rounds: [(&[&str], u32, u32, u32, u32); 2] = [
        (&["--chmod=D2775,F664", "--chown=1234:4321"], 0o664, 0o2775, 1234, 4321),
        // (Relative changes apply to the source's modes: directories 0755.)
        (
            &["--chmod=F600,Dg-s,Do-rwx", "--chown=2000:3000"],
            0o600,
            0o750,
            2000,
            3000,
        ),
    ];
    for (round, (flags, file_mode, dir_mode, uid, gid)) in rounds.iter().enumerate() {
        rsync(&src, &expect, flags);
        let out = rsync(&src, &dst, &[*flags, &["--itemize-changes"][..]].concat());
        if round == 1 {
            assert!(
                transferred(&out).is_empty(),
                "data sent again for a mode change:\n{out}"
            );
            let retouched = out.lines().filter(|l| l.starts_with(".f")).count();
            assert_eq!(retouched, 36, "every file gets a new mode and owner:\n{out}");
        }
        m.sync();
        assert_backend_matches(&expect, &backend_dst, &[]);
        assert_same_tree(&expect, &backend_dst);
        assert_same_tree(&expect, &dst);
        for (p, meta) in walk(&backend_dst) {
            let mode = meta.mode() & 0o7777;
            if meta.is_file() {
                assert_eq!(mode, *file_mode, "round {round}: mode of {p:?}");
            } else if meta.is_dir() {
                assert_eq!(mode, *dir_mode, "round {round}: mode of {p:?}");
            }
            assert_eq!((meta.uid(), meta.gid()), (*uid, *gid), "round {round}: owner of {p:?}");
        }
    }
    m.umount();
}

/// `--numeric-ids`: owners that have no name on this host (and ones that
/// do) arrive as the same numbers, on files, a directory and a symlink;
/// changing only the owner later re-sends no data.
#[test]
fn rsync_numeric_ids_keep_owner_numbers_with_or_without_a_name() {
    let s = Scratch::new();
    let (src, backend_dst, dst) = (s.path("src"), s.path("backend/dst"), s.path("mnt/dst"));
    let owners = [
        (54321, 54322),
        (65534, 65534),
        (0, 0),
        (1000, 100),
        (4_000_000, 4_000_001),
    ];
    for (i, (uid, gid)) in owners.iter().enumerate() {
        let p = src.join(format!("owned/f{i}"));
        put(&p, format!("owned by {uid}:{gid}").as_bytes(), T0 + i as u64);
        std::os::unix::fs::lchown(&p, Some(*uid), Some(*gid)).unwrap();
    }
    std::fs::create_dir(src.join("owned/dir")).unwrap();
    std::os::unix::fs::lchown(src.join("owned/dir"), Some(4242), Some(4343)).unwrap();
    std::os::unix::fs::symlink("f0", src.join("owned/link")).unwrap();
    std::os::unix::fs::lchown(src.join("owned/link"), Some(777), Some(888)).unwrap();
    age_dirs_and_links(&src);
    let m = mount(&s, "");
    rsync(&src, &dst, &["--numeric-ids"]);
    sync_and_check(&m, &src, &backend_dst, &dst);
    let owner = |p: &str| {
        let meta = std::fs::symlink_metadata(backend_dst.join(p)).unwrap();
        (meta.uid(), meta.gid())
    };
    assert_eq!(owner("owned/f0"), (54321, 54322));
    assert_eq!(owner("owned/f4"), (4_000_000, 4_000_001));
    assert_eq!(owner("owned/dir"), (4242, 4343));
    assert_eq!(owner("owned/link"), (777, 888));

    std::os::unix::fs::lchown(src.join("owned/f1"), Some(999), Some(998)).unwrap();
    std::os::unix::fs::lchown(src.join("owned/link"), Some(5), Some(6)).unwrap();
    let out = rsync(&src, &dst, &["--numeric-ids", "--itemize-changes"]);
    assert!(
        transferred(&out).is_empty(),
        "data sent again for an owner change:\n{out}"
    );
    let changed: Vec<&str> = out.lines().filter(|l| !l.starts_with(".d")).collect();
    assert_eq!(changed.len(), 2, "{out}");
    sync_and_check(&m, &src, &backend_dst, &dst);
    assert_eq!(owner("owned/f1"), (999, 998));
    assert_eq!(owner("owned/link"), (5, 6));
    m.umount();
}

/// `--temp-dir` on another filesystem (local disk, as operators use to
/// keep temp files off EFS): the rename into the mount fails with EXDEV
/// and rsync copies each file into its final name, unlinking a published
/// one first. Nothing stays in the temp dir.
#[test]
fn rsync_temp_dir_outside_the_mount_copies_each_file_into_place() {
    let s = Scratch::new();
    let (src, backend_dst, dst) = (s.path("src"), s.path("backend/dst"), s.path("mnt/dst"));
    let tmp = s.path("rsync-tmp");
    std::fs::create_dir(&tmp).unwrap();
    make_source(&src, 10);
    let m = mount(&s, "");
    let flag = format!("--temp-dir={}", tmp.display());
    rsync(&src, &dst, &[&flag]);
    sync_and_check(&m, &src, &backend_dst, &dst);
    for (i, n) in ["f0", "a/f1", "a/b/c/f5", "with space/f2"].iter().enumerate() {
        change(&src, n, T1 + i as u64);
    }
    age_dirs_and_links(&src);
    let out = rsync(&src, &dst, &[&flag, "--itemize-changes"]);
    assert_eq!(transferred(&out).len(), 4, "{out}");
    sync_and_check(&m, &src, &backend_dst, &dst);
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "rsync left temp files");
    m.umount();
}

/// `--temp-dir` inside the mount: every file is written in one directory
/// and renamed into another. With `debounce=0ms` temp files may be
/// published before their rename; the temp dir ends empty on the backend.
#[test]
fn rsync_temp_dir_inside_the_mount_renames_across_directories() {
    let s = Scratch::new();
    let (src, backend, mnt) = (s.path("src"), s.path("backend"), s.path("mnt"));
    make_source(&src, 11);
    let m = mount(&s, "debounce=0ms");
    let tmp = mnt.join(".rsync-tmp");
    std::fs::create_dir(&tmp).unwrap();
    let flag = format!("--temp-dir={}", tmp.display());
    rsync(&src, &mnt.join("dst"), &[&flag]);
    sync_and_check(&m, &src, &backend.join("dst"), &mnt.join("dst"));
    for (i, n) in ["f0", "a/f1", "a/b/c/f5", "with space/f2", "d/f3"].iter().enumerate() {
        change(&src, n, T1 + i as u64);
    }
    age_dirs_and_links(&src);
    rsync(&src, &mnt.join("dst"), &[&flag]);
    sync_and_check(&m, &src, &backend.join("dst"), &mnt.join("dst"));
    for dir in [backend.join(".rsync-tmp"), tmp] {
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{} holds {left:?}", dir.display());
    }
    m.umount();
}

/// `rsync --fsync` onto a mount with `fsync=remote` (and `debounce=1h`, so
/// that nothing but an fsync publishes before `efscache sync`): each temp
/// file is published by rsync's fsync, while it is still open and before
/// rsync renames it, so every file rsync wrote is on the backend when rsync
/// returns; after the sync the names end right and no temp name stays on
/// the backend, also when the renames replace published files.
#[test]
fn rsync_fsync_onto_fsync_remote_publishes_every_file_under_its_final_name() {
    let s = Scratch::new();
    let (src, backend_dst, dst) = (s.path("src"), s.path("backend/dst"), s.path("mnt/dst"));
    make_source(&src, 12);
    let m = mount(&s, "fsync=remote,debounce=1h");
    let published = || m.status()["published_files"].as_u64().expect("published_files");
    let before = published();
    rsync(&src, &dst, &["--fsync"]);
    let by_fsync = published() - before;
    assert!(
        by_fsync >= 36,
        "rsync returned with {by_fsync} of its 36 files published"
    );
    sync_and_check(&m, &src, &backend_dst, &dst);
    let changed = ["f1", "a/f2", "a/b/f3", "d/f4"];
    for (i, n) in changed.iter().enumerate() {
        change(&src, n, T1 + i as u64);
    }
    age_dirs_and_links(&src);
    let before = published();
    let out = rsync(&src, &dst, &["--fsync", "--itemize-changes"]);
    assert_eq!(transferred(&out), sorted(&changed), "{out}");
    let by_fsync = published() - before;
    assert!(by_fsync >= 4, "rsync returned with {by_fsync} of its 4 files published");
    sync_and_check(&m, &src, &backend_dst, &dst);
    m.umount();
}
