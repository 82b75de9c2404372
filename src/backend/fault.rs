//! A backend wrapper that injects latency, errors and stalls (the `fault_*`
//! mount options), so crash and outage behaviour can be tested and drilled
//! without a real network. Deterministic for a given `fault_seed` and
//! request order.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::{AttrSet, Backend, BackendStats, Kind, OpKind, RelPath, Stat, StatFs};
use crate::config::FaultConfig;

/// Request kinds that change the backend (the default target of `fault_rate`).
const MUTATING: &[OpKind] = &[
    OpKind::create,
    OpKind::write,
    OpKind::close,
    OpKind::mkdir,
    OpKind::rmdir,
    OpKind::unlink,
    OpKind::rename,
    OpKind::symlink,
    OpKind::link,
    OpKind::mknod,
    OpKind::chown,
    OpKind::chmod,
    OpKind::utimens,
    OpKind::truncate,
    OpKind::setxattr,
    OpKind::removexattr,
];

pub struct FaultBackend {
    inner: Box<dyn Backend>,
    cfg: FaultConfig,
    targets: Vec<OpKind>,
    requests: AtomicU64,
    /// Failures still to come in the current burst (`fault_burst`).
    burst_left: AtomicU64,
    rng: AtomicU64,
    stall_until: OnceLock<Instant>,
}

impl FaultBackend {
    pub fn new(inner: Box<dyn Backend>, cfg: FaultConfig) -> FaultBackend {
        let targets = if cfg.ops.is_empty() {
            MUTATING.to_vec()
        } else {
            OpKind::ALL
                .iter()
                .copied()
                .filter(|k| cfg.ops.iter().any(|o| o == k.name()))
                .collect()
        };
        let seed = cfg.seed.max(1);
        FaultBackend {
            inner,
            cfg,
            targets,
            requests: AtomicU64::new(0),
            burst_left: AtomicU64::new(0),
            rng: AtomicU64::new(seed),
            stall_until: OnceLock::new(),
        }
    }

    fn random(&self) -> f64 {
        // xorshift64*, advanced atomically so concurrent requests draw distinct numbers.
        let mut x = self.rng.load(Ordering::Relaxed);
        loop {
            let mut y = x;
            y ^= y >> 12;
            y ^= y << 25;
            y ^= y >> 27;
            match self
                .rng
                .compare_exchange_weak(x, y, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return (y.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64,
                Err(cur) => x = cur,
            }
        }
    }

    /// Runs one request: delay and stall first, then maybe an injected
    /// error: instead of the request, or (`fault_reply_lost`) after it was
    /// carried out, as when a network drops an NFS reply.
    fn run<T>(&self, kind: OpKind, request: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        match self.enter(kind) {
            Err(e) if self.cfg.reply_lost => {
                drop(request()); // (a file it opened is closed)
                Err(e)
            }
            Err(e) => Err(e),
            Ok(()) => request(),
        }
    }

    /// Delay, stall, and the decision whether to inject an error.
    fn enter(&self, kind: OpKind) -> io::Result<()> {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(after) = self.cfg.stall_after
            && n >= after
        {
            let until = *self.stall_until.get_or_init(|| Instant::now() + self.cfg.stall);
            let now = Instant::now();
            if now < until {
                std::thread::sleep(until - now);
            }
        }
        if !self.cfg.delay.is_zero() {
            std::thread::sleep(self.cfg.delay);
        }
        if self.cfg.rate > 0.0 && self.targets.contains(&kind) {
            let in_burst = self
                .burst_left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
            if in_burst || self.random() < self.cfg.rate {
                if !in_burst {
                    self.burst_left.store(self.cfg.burst - 1, Ordering::Relaxed);
                }
                return Err(io::Error::from_raw_os_error(self.cfg.errno));
            }
        }
        Ok(())
    }
}

impl Backend for FaultBackend {
    fn list_names(&self, dir: &RelPath) -> io::Result<Vec<OsString>> {
        self.run(OpKind::readdir, || self.inner.list_names(dir))
    }
    fn stat(&self, path: &RelPath) -> io::Result<Stat> {
        self.run(OpKind::stat, || self.inner.stat(path))
    }

    fn stat_fresh(&self, path: &RelPath) -> io::Result<Stat> {
        self.run(OpKind::stat, || self.inner.stat_fresh(path))
    }
    fn read_link(&self, path: &RelPath) -> io::Result<OsString> {
        self.run(OpKind::readlink, || self.inner.read_link(path))
    }
    fn open_read(&self, path: &RelPath) -> io::Result<File> {
        self.run(OpKind::open, || self.inner.open_read(path))
    }
    fn statfs(&self) -> io::Result<StatFs> {
        self.run(OpKind::statfs, || self.inner.statfs())
    }
    fn create_exclusive(&self, dir: &RelPath, name: &OsStr, perm: u32) -> io::Result<File> {
        self.run(OpKind::create, || self.inner.create_exclusive(dir, name, perm))
    }
    fn mkdir(&self, path: &RelPath, perm: u32) -> io::Result<()> {
        self.run(OpKind::mkdir, || self.inner.mkdir(path, perm))
    }
    fn rmdir(&self, path: &RelPath) -> io::Result<()> {
        self.run(OpKind::rmdir, || self.inner.rmdir(path))
    }
    fn unlink(&self, path: &RelPath) -> io::Result<()> {
        self.run(OpKind::unlink, || self.inner.unlink(path))
    }
    fn rename(&self, from: &RelPath, to: &RelPath) -> io::Result<()> {
        self.run(OpKind::rename, || self.inner.rename(from, to))
    }
    fn symlink(&self, target: &OsStr, path: &RelPath) -> io::Result<()> {
        self.run(OpKind::symlink, || self.inner.symlink(target, path))
    }
    fn link(&self, existing: &RelPath, new: &RelPath) -> io::Result<()> {
        self.run(OpKind::link, || self.inner.link(existing, new))
    }
    fn mknod(&self, path: &RelPath, kind: Kind, perm: u32, rdev: u64) -> io::Result<()> {
        self.run(OpKind::mknod, || self.inner.mknod(path, kind, perm, rdev))
    }
    fn set_attrs(&self, path: &RelPath, attrs: &AttrSet, fresh: bool) -> io::Result<()> {
        self.run(attr_kind(attrs), || self.inner.set_attrs(path, attrs, fresh))
    }
    fn stat_file(&self, file: &File) -> io::Result<Stat> {
        // Not a request: an NFS client answers fstat of a file it just
        // opened, created or changed from the attributes that reply brought
        // (nor do the backend's own counts include it, so `fault_stall_after`
        // counts what `status` shows).
        self.inner.stat_file(file)
    }
    fn set_attrs_fd(&self, file: &File, attrs: &AttrSet) -> io::Result<()> {
        self.run(attr_kind(attrs), || self.inner.set_attrs_fd(file, attrs))
    }
    fn seek_hole_data(&self, file: &File, offset: i64, whence: i32) -> io::Result<i64> {
        self.run(OpKind::read, || self.inner.seek_hole_data(file, offset, whence))
    }
    fn read_at(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.run(OpKind::read, || self.inner.read_at(file, buf, offset))
    }
    fn write_at(&self, file: &File, data: &[u8], offset: u64) -> io::Result<()> {
        self.run(OpKind::write, || self.inner.write_at(file, data, offset))
    }
    fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        self.run(OpKind::truncate, || self.inner.set_len(file, len))
    }
    fn close_file(&self, file: File) -> io::Result<()> {
        self.run(OpKind::close, || self.inner.close_file(file))
    }
    fn list_xattrs(&self, path: &RelPath) -> io::Result<Vec<(OsString, Vec<u8>)>> {
        self.run(OpKind::listxattr, || self.inner.list_xattrs(path))
    }
    fn set_xattr(&self, path: &RelPath, name: &OsStr, value: Option<&[u8]>) -> io::Result<()> {
        let kind = if value.is_some() {
            OpKind::setxattr
        } else {
            OpKind::removexattr
        };
        self.run(kind, || self.inner.set_xattr(path, name, value))
    }
    fn set_xattr_fd(&self, file: &File, name: &OsStr, value: &[u8]) -> io::Result<()> {
        self.run(OpKind::setxattr, || self.inner.set_xattr_fd(file, name, value))
    }
    fn stats(&self) -> &BackendStats {
        self.inner.stats()
    }
}

/// The kind an attribute request counts as for fault injection: the most
/// privileged change it makes (an owner change fails as chown would).
fn attr_kind(attrs: &AttrSet) -> OpKind {
    if attrs.uid.is_some() || attrs.gid.is_some() {
        OpKind::chown
    } else if attrs.perm.is_some() {
        OpKind::chmod
    } else {
        OpKind::utimens
    }
}
