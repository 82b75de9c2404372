//! Shared helpers for tests that mount efscache for real: a mount guard that
//! always unmounts (even when a test panics), tree generation and comparison,
//! and status queries.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_efscache");

/// A scratch area: backend dir, mountpoint, cache dir, source dir.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("efscache-test")
            .tempdir_in("/tmp")
            .expect("tempdir");
        for d in ["backend", "mnt", "cache", "src"] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        Scratch { dir }
    }
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
}

/// A running efscache daemon (foreground child) and its mount. Dropping it
/// unmounts (lazily if needed) and reaps the daemon.
pub struct Mount {
    pub child: Option<Child>,
    pub backend: PathBuf,
    pub mountpoint: PathBuf,
    pub cache: PathBuf,
}

/// `efscache mount -o cache_dir=CACHE[,OPTS] BACKEND MOUNTPOINT`, for a
/// mount that is expected to fail: its output.
#[allow(dead_code)]
pub fn try_mount(backend: &Path, mountpoint: &Path, cache: &Path, opts: &str) -> std::process::Output {
    let mut o = format!("cache_dir={}", cache.display());
    if !opts.is_empty() {
        o = format!("{o},{opts}");
    }
    Command::new(BIN)
        .args(["mount", "-o", &o])
        .arg(backend)
        .arg(mountpoint)
        .output()
        .expect("run efscache mount")
}

pub fn is_efscache_mounted(mp: &Path) -> bool {
    fusemount::top_mount_at(mp)
        .ok()
        .flatten()
        .is_some_and(|m| m.is_fuse_subtype("efscache"))
}

impl Mount {
    pub fn start(backend: &Path, mountpoint: &Path, cache: &Path, opts: &str) -> Mount {
        let mut o = format!("cache_dir={}", cache.display());
        if !opts.is_empty() {
            o.push(',');
            o.push_str(opts);
        }
        let child = Command::new(BIN)
            .args(["mount", "--foreground", "-o", &o])
            .arg(backend)
            .arg(mountpoint)
            .stdin(Stdio::null())
            .spawn()
            .expect("start efscache");
        let mut m = Mount {
            child: Some(child),
            backend: backend.into(),
            mountpoint: mountpoint.into(),
            cache: cache.into(),
        };
        // Generous: a debug build on a loaded machine rebuilds a large
        // journal slowly, and the mount appears only after that.
        let limit = Duration::from_secs(120);
        let t = Instant::now();
        while !is_efscache_mounted(mountpoint) {
            if let Some(exit) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("efscache mount exited before mounting: {exit}");
            }
            assert!(t.elapsed() < limit, "efscache did not mount within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The control socket comes up just after the mount appears.
        while !Command::new(BIN)
            .args(["status", "--json"])
            .arg(mountpoint)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            assert!(
                t.elapsed() < limit,
                "efscache's control socket did not answer within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn sync(&self) {
        let out = Command::new(BIN)
            .arg("sync")
            .arg(&self.mountpoint)
            .output()
            .expect("efscache sync");
        assert!(
            out.status.success(),
            "efscache sync failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(BIN)
            .args(["status", "--json"])
            .arg(&self.mountpoint)
            .output()
            .expect("status");
        assert!(
            out.status.success(),
            "efscache status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    /// What recovering the last run's journal did (null: nothing to
    /// recover).
    pub fn recovery(&self) -> serde_json::Value {
        self.status()["recovery"].clone()
    }

    pub fn backend_op(&self, kind: &str) -> u64 {
        self.status()["backend_ops"]["ops"][kind].as_u64().unwrap_or(0)
    }

    /// `efscache umount`, then waits for the daemon to exit.
    pub fn umount(mut self) {
        let out = Command::new(BIN)
            .arg("umount")
            .arg(&self.mountpoint)
            .output()
            .expect("efscache umount");
        assert!(
            out.status.success(),
            "efscache umount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(mut c) = self.child.take() {
            let t = Instant::now();
            loop {
                if c.try_wait().expect("wait").is_some() {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "daemon did not exit after umount"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILL the daemon (the mount stays, dead).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_efscache_mounted(&self.mountpoint) {
            let _ = fusemount::unmount(&self.mountpoint, true);
        }
        if let Some(mut c) = self.child.take() {
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A tmpfs mounted at `scratch/efs`, standing in for the EFS mount that
/// efscache is stacked on; lazily unmounted when dropped (also on panic).
pub struct LowerMount {
    pub path: PathBuf,
}

impl LowerMount {
    pub fn new(s: &Scratch) -> LowerMount {
        let path = s.path("efs");
        std::fs::create_dir(&path).expect("mkdir efs");
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "efs-stand-in"])
            .arg(&path));
        LowerMount { path }
    }
}

impl Drop for LowerMount {
    fn drop(&mut self) {
        let _ = fusemount::unmount(&self.path, true);
    }
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{:?} failed: {}{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A deterministic pseudo-random generator (no external state, reproducible).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let t = [
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: valid path and two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), t.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(rc, 0, "utimensat {}", p.display());
}

fn lchown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).expect("lchown");
}

/// Generates the test tree of the core issue under `root`: deep and wide
/// directories; files of 0 B, 1 B, 4 KiB, 1 MiB (and `big` bytes if given);
/// symlinks (one dangling); hard-link groups; empty dirs; names with spaces,
/// newlines, non-UTF-8 bytes and 255-byte names; varied owners, modes and
/// nanosecond mtimes (also on directories).
pub fn make_tree(root: &Path, seed: u64, big: Option<usize>) {
    let mut rng = Rng(seed | 1);
    let mut dirs = vec![root.to_path_buf()];
    let mut deep = root.to_path_buf();
    for i in 0..12 {
        deep = deep.join(format!("deep{i}"));
        std::fs::create_dir(&deep).unwrap();
        dirs.push(deep.clone());
    }
    for i in 0..20 {
        let d = root.join(format!("wide{i:02}"));
        std::fs::create_dir(&d).unwrap();
        dirs.push(d);
    }
    let special: Vec<OsString> = vec![
        "with space".into(),
        "new\nline".into(),
        OsString::from_vec(vec![b'b', b'a', b'd', 0xff, 0xfe]),
        OsString::from("n".repeat(255)),
        "-dash".into(),
    ];
    for (i, name) in special.iter().enumerate() {
        std::fs::write(root.join(name), rng.bytes(i * 100)).unwrap();
    }
    let sizes = [0usize, 1, 4096, 1 << 20, 17, 12345];
    let mut n = 0;
    for d in dirs.clone() {
        for _ in 0..6 {
            let size = sizes[rng.below(sizes.len() as u64) as usize];
            let p = d.join(format!("f{n}"));
            n += 1;
            std::fs::write(&p, rng.bytes(size)).unwrap();
            let mode = [0o644, 0o600, 0o755, 0o640, 0o4755, 0o2750][rng.below(6) as usize];
            lchown(
                &p,
                [0, 1000, 1234][rng.below(3) as usize],
                [0, 100, 4321][rng.below(3) as usize],
            );
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
            set_mtime(
                &p,
                1_500_000_000 + rng.below(100_000_000) as i64,
                rng.below(1_000_000_000) as i64,
            );
        }
    }
    if let Some(b) = big {
        let p = root.join("big.bin");
        std::fs::write(&p, rng.bytes(b)).unwrap();
    }
    std::os::unix::fs::symlink("f0", root.join("link-to-f0")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling")).unwrap();
    std::os::unix::fs::symlink("../wide00", root.join("wide01").join("up")).unwrap();
    lchown(&root.join("dangling"), 1000, 1000);
    set_mtime(&root.join("link-to-f0"), 1_400_000_000, 5);
    set_mtime(&root.join("dangling"), 1_400_000_001, 999_999_999);
    set_mtime(&root.join("wide01").join("up"), 1_400_000_002, 0);
    // Hard-link groups, one spanning directories.
    std::fs::hard_link(root.join("f0"), root.join("f0.hard")).unwrap();
    std::fs::hard_link(root.join("f0"), root.join("wide05").join("f0.hard2")).unwrap();
    std::fs::write(root.join("wide03").join("pair"), b"pair").unwrap();
    std::fs::hard_link(root.join("wide03").join("pair"), root.join("wide03").join("pair2")).unwrap();
    for i in 0..3 {
        let e = root.join(format!("empty{i}"));
        std::fs::create_dir(&e).unwrap();
    }
    std::fs::set_permissions(
        root.join("empty1"),
        std::os::unix::fs::PermissionsExt::from_mode(0o2775),
    )
    .unwrap();
    lchown(&root.join("empty2"), 1000, 1000);
    // Directory times last (children changed them).
    let mut all_dirs: Vec<PathBuf> = walk(root)
        .into_iter()
        .filter(|(_, m)| m.is_dir())
        .map(|(p, _)| root.join(p))
        .collect();
    all_dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for d in all_dirs {
        set_mtime(
            &d,
            1_600_000_000 + rng.below(1000) as i64,
            rng.below(1_000_000_000) as i64,
        );
    }
}

/// `dirs` directories of `per_dir` small files (1 byte to 16 KiB).
pub fn small_files(root: &Path, dirs: usize, per_dir: usize, seed: u64) {
    let mut rng = Rng(seed | 1);
    for d in 0..dirs {
        let dir = root.join(format!("small{d:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..per_dir {
            let len = 1 + rng.below(16 << 10) as usize;
            std::fs::write(dir.join(format!("file{f:03}.dat")), rng.bytes(len)).unwrap();
        }
        // An old time: rsync compares directory times to the second, so a
        // source directory from this very second would not get its time
        // re-applied after rsync's own changes inside it.
        let old = std::fs::FileTimes::new()
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::new(1_600_000_000 + d as u64, 123));
        std::fs::File::open(&dir).unwrap().set_times(old).unwrap();
    }
}

/// Every path below `root` (relative), with its lstat metadata.
pub fn walk(root: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        for e in std::fs::read_dir(&abs).unwrap_or_else(|e| panic!("read_dir {}: {e}", abs.display())) {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let m = std::fs::symlink_metadata(root.join(&r)).unwrap();
            if m.is_dir() {
                stack.push(r.clone());
            }
            out.push((r, m));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A description of a tree that two trees must share: kind, mode, numeric
/// owner, size, mtime (ns), content hash, symlink target, and hard-link
/// groups (as the set of paths sharing an inode). Root's own times excluded.
pub fn describe(root: &Path) -> BTreeMap<PathBuf, String> {
    let entries = walk(root);
    let mut groups: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    for (p, m) in &entries {
        if m.is_file() && m.nlink() > 1 {
            groups.entry((m.dev(), m.ino())).or_default().push(p.clone());
        }
    }
    let mut out = BTreeMap::new();
    for (p, m) in entries {
        let kind = if m.is_dir() {
            "dir".to_string()
        } else if m.file_type().is_symlink() {
            format!("link->{:?}", std::fs::read_link(root.join(&p)).unwrap())
        } else if m.is_file() {
            let data = std::fs::read(root.join(&p)).unwrap();
            format!("file len={} hash={:016x}", data.len(), fnv(&data))
        } else {
            format!("special {:o}", m.mode() & libc::S_IFMT)
        };
        let links = groups
            .get(&(m.dev(), m.ino()))
            .map(|g| format!(" links={g:?}"))
            .unwrap_or_default();
        let mode = if m.file_type().is_symlink() {
            0
        } else {
            m.mode() & 0o7777
        };
        let line = format!(
            "{kind} mode={mode:o} uid={} gid={} mtime={}.{:09}{links}",
            m.uid(),
            m.gid(),
            m.mtime(),
            m.mtime_nsec()
        );
        out.insert(p, line);
    }
    out
}

pub fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Asserts two trees are equal, printing the first differences.
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let a = describe(expected);
    let b = describe(actual);
    if a != b {
        let mut diffs = Vec::new();
        for (p, l) in &a {
            match b.get(p) {
                None => diffs.push(format!("missing {p:?}: {l}")),
                Some(m) if m != l => diffs.push(format!("differs {p:?}:\n   want {l}\n   got  {m}")),
                _ => {}
            }
        }
        for p in b.keys() {
            if !a.contains_key(p) {
                diffs.push(format!("extra {p:?}: {}", b[p]));
            }
        }
        panic!(
            "trees differ ({} differences):\n{}",
            diffs.len(),
            diffs.iter().take(30).cloned().collect::<Vec<_>>().join("\n")
        );
    }
}

/// efs-sim over a scratch directory, unmounted when dropped.
pub struct EfsSim {
    child: Child,
    mountpoint: PathBuf,
}

impl EfsSim {
    pub fn start(backing: &Path, mountpoint: &Path, profile: &str) -> EfsSim {
        let sim = Path::new(BIN).with_file_name("efs-sim");
        assert!(
            sim.exists(),
            "{} is missing: build the workspace (cargo test --workspace)",
            sim.display()
        );
        let child = Command::new(sim)
            .args(["--profile", profile])
            .arg(backing)
            .arg(mountpoint)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let sim = EfsSim {
            child,
            mountpoint: mountpoint.into(),
        };
        let t = Instant::now();
        while !fusemount::top_mount_at(mountpoint)
            .ok()
            .flatten()
            .is_some_and(|m| m.is_fuse_subtype("efs-sim"))
        {
            assert!(t.elapsed() < Duration::from_secs(20), "efs-sim did not mount");
            std::thread::sleep(Duration::from_millis(20));
        }
        sim
    }
}

impl Drop for EfsSim {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
