//! Shared helpers for tests that mount efs-sim for real: a guard that always
//! kills the server and unmounts (even when a test panics), and a reader for
//! the stats file.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_efs-sim");

/// Real mounts need root and /dev/fuse; elsewhere the tests skip themselves.
pub fn can_mount() -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: needs root and /dev/fuse");
        return false;
    }
    true
}

/// A running efs-sim over a fresh backing directory.
pub struct Sim {
    pub child: Option<Child>,
    pub backing: PathBuf,
    pub mnt: PathBuf,
    pub stats_file: PathBuf,
    dir: tempfile::TempDir,
}

pub fn is_mounted(mnt: &Path) -> bool {
    fusemount::top_mount_at(mnt)
        .ok()
        .flatten()
        .is_some_and(|m| m.is_fuse_subtype("efs-sim"))
}

impl Sim {
    /// Starts efs-sim with `args` (profile, knobs) and waits for the mount.
    pub fn start(args: &[&str]) -> Sim {
        Sim::start_with(args, |_| {})
    }

    /// Like [`Sim::start`], after `prepare` has filled the backing directory.
    pub fn start_with(args: &[&str], prepare: impl FnOnce(&Path)) -> Sim {
        let dir = tempfile::Builder::new()
            .prefix("efs-sim-test")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let backing = dir.path().join("backing");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&backing).expect("mkdir backing");
        std::fs::create_dir(&mnt).expect("mkdir mnt");
        prepare(&backing);
        let stats_file = dir.path().join("stats.json");
        let child = Command::new(BIN)
            .args(args)
            .arg("--stats-file")
            .arg(&stats_file)
            .arg(&backing)
            .arg(&mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start efs-sim");
        let mut sim = Sim {
            child: Some(child),
            backing,
            mnt,
            stats_file,
            dir,
        };
        let t = Instant::now();
        while !is_mounted(&sim.mnt) {
            if let Some(child) = sim.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("efs-sim exited before mounting: {status}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "efs-sim did not mount within 20s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        sim
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn scratch(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Sends `sig` to the server.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill on the pid of our own child process.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for the server to exit (up to `limit`) and returns its status and stderr.
    pub fn wait(&mut self, limit: Duration) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let t = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return (status, err);
            }
            if t.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("efs-sim did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, wait for a clean exit, and return the final stats and stderr.
    pub fn stop(&mut self) -> (Stats, String) {
        self.signal(libc::SIGTERM);
        let (status, err) = self.wait(Duration::from_secs(20));
        assert!(status.success(), "efs-sim exited with {status}: {err}");
        assert!(!is_mounted(&self.mnt), "efs-sim left its mount behind");
        (self.read_stats(), err)
    }

    pub fn read_stats(&self) -> Stats {
        Stats(std::fs::read_to_string(&self.stats_file).expect("stats file"))
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mnt) {
            let _ = fusemount::unmount(&self.mnt, true);
        }
    }
}

/// The stats file's JSON, read with plain string search (the schema is fixed).
pub struct Stats(pub String);

impl Stats {
    /// Field `field` of op `op`, e.g. `("create", "count")`.
    pub fn op(&self, op: &str, field: &str) -> u64 {
        let key = format!("\"{op}\": {{");
        let start = self.0.find(&key).unwrap_or_else(|| panic!("no {op} in {}", self.0)) + key.len();
        let obj = &self.0[start..start + self.0[start..].find('}').expect("object end")];
        let fkey = format!("\"{field}\": ");
        let at = obj.find(&fkey).unwrap_or_else(|| panic!("no {field} in {obj}")) + fkey.len();
        obj[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("bad {field} in {obj}"))
    }

    /// A top-level integer field, e.g. `requests`.
    pub fn top(&self, field: &str) -> u64 {
        let key = format!("\"{field}\": ");
        let at = self.0.find(&key).unwrap_or_else(|| panic!("no {field}")) + key.len();
        self.0[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("bad {field}"))
    }
}
