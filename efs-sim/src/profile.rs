//! Profiles: what each request costs and what the emulated server refuses.
//!
//! A profile is a set of [`Costs`] (per-class latencies, caps, concurrency
//! limits) and [`Refusals`]. The `efs-typical` figures come from public
//! measurements, cited next to each constant; change one only with a public
//! source named here. Command-line flags override any field.

use std::collections::HashMap;
use std::time::Duration;

use crate::stats::OpKind;

/// The named profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfileName {
    /// Regional EFS, General Purpose mode, client in the same AZ as its mount target.
    EfsTypical,
    /// Like `efs-typical`, with the client in another AZ than the mount target.
    CrossAz,
    /// No delay, no limits, nothing refused: a plain passthrough.
    Local,
}

impl ProfileName {
    /// The name as written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ProfileName::EfsTypical => "efs-typical",
            ProfileName::CrossAz => "cross-az",
            ProfileName::Local => "local",
        }
    }
}

/// Cost model of one mount.
#[derive(Debug, Clone, PartialEq)]
pub struct Costs {
    /// Read-type round trip: lookup, getattr, readlink, open, read, readdir, statfs, lseek.
    pub read_latency: Duration,
    /// Namespace / metadata change round trip: create, mknod, mkdir, unlink,
    /// rmdir, rename, symlink, link, fallocate, xattr changes.
    pub meta_latency: Duration,
    /// Attribute change round trip (setattr: chmod, chown, utimes, truncate).
    pub setattr_latency: Duration,
    /// Data commit on flush (close), fsync or release of a handle that wrote
    /// since its last commit (NFS close-to-open).
    pub commit_latency: Duration,
    /// Per-client bandwidth shared by reads and writes, bytes/s (0 = unlimited).
    pub bandwidth: f64,
    /// Metered file operations per second over the whole mount (0 =
    /// unlimited): a read-type request counts 1, a write or metadata update 5.
    pub ops_cap: f64,
    /// Requests being served at once (the RPC slot table); others queue.
    pub max_inflight: usize,
    /// Namespace changes in flight per parent directory (0 = unlimited).
    pub dir_concurrency: usize,
    /// How long the kernel may cache attributes and directory entries.
    pub attr_ttl: Duration,
    /// Per-kind latencies that replace the class latency (`--op-latency-ms`).
    pub per_op: HashMap<OpKind, Duration>,
}

/// What the emulated server refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusals {
    /// Extended attributes (and so POSIX ACLs, which travel as xattrs) are refused.
    pub xattrs: bool,
    /// Block and character device nodes are refused.
    pub devices: bool,
    /// rename(2) flags (RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT)
    /// are refused with EINVAL: the Linux NFS client refuses any flags
    /// itself (`nfs_rename` in fs/nfs/dir.c), before a request is sent.
    pub rename_flags: bool,
    /// EFS's own limits: at most 177 hard links to a file (a 178th link
    /// fails with EMLINK) and symlink targets of at most 4080 bytes
    /// (ENAMETOOLONG) (AWS, "Troubleshooting: Amazon EFS quotas", in the
    /// EFS user guide).
    pub efs_limits: bool,
}

/// EFS's most hard links to one file.
pub const EFS_MAX_LINKS: u32 = 177;
/// EFS's longest symlink target, in bytes.
pub const EFS_MAX_SYMLINK: usize = 4080;

const MS: f64 = 1e-3;
const MIB: f64 = 1024.0 * 1024.0;

fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(v * MS)
}

// --- efs-typical -------------------------------------------------------------
//
// Read-type operations: AWS, "Amazon EFS performance specifications"
// (docs.aws.amazon.com/efs/latest/ug/performance.html): Regional file systems,
// General Purpose mode, "~1 millisecond (ms)" read latency; juicedata/juicefs
// docs/en/benchmark/mdtest.md measured EFS stat at about 1.1 ms.
const EFS_READ_MS: f64 = 1.0;
// Mutating metadata: the same juicefs mdtest page measured EFS create 5.6 ms,
// remove 4.6 ms, mkdir 5.2 ms; AWS's table gives ~2.7 ms as the write floor.
// 4.5 ms sits inside the 4–5 ms range those figures bracket.
const EFS_META_MS: f64 = 4.5;
// Attribute changes touch one inode, no directory: AWS's performance table
// gives ~2.7 ms for write operations (data and metadata) on Regional file
// systems, which is what setattr is charged.
const EFS_SETATTR_MS: f64 = 2.7;
// Data commit (close-to-open flush or fsync): AWS's ~2.7 ms write latency is a
// floor; 4.4–7.5 ms per committed small write was measured with efs-utils
// 2.0.1, whose release note (aws/efs-utils pull request #210) puts a serial
// create + 8 KiB write + read + close + remove cycle at about 20 ms.
const EFS_COMMIT_MS: f64 = 5.0;
// Per-client throughput: 500 MiB/s (AWS performance table, per-client limit;
// 1,500 MiB/s needs Elastic throughput with efs-proxy / efs-utils 2.x).
const EFS_MIBPS: f64 = 500.0;
// The same table allows hundreds of thousands of IOPS per file system with
// Elastic throughput, far above what one FUSE client on two cores issues: no
// cap by default. AWS meters reads as 1 file operation and writes / metadata
// updates as 5, and General Purpose file systems were once limited to 35,000
// file operations per second (7,000 before 2020; AWS knowledge center,
// "differences between General Purpose and Max I/O performance modes"):
// `--ops-cap 35000` models that.
const EFS_OPS_CAP: f64 = 0.0;
// In-flight requests: the Linux NFSv4.1 client's session slot table holds 64
// slots by default (nfs module parameter max_session_slots).
const EFS_MAX_INFLIGHT: usize = 64;
// Creates in one directory scale poorly: 127 files/s with 128 threads in one
// directory vs 1,136 files/s with 32 threads over 32 directories
// (aws-samples/amazon-efs-tutorial). Modelled as one namespace change in
// flight per parent directory; the others queue.
const EFS_DIR_CONCURRENCY: usize = 1;
// End to end, these figures reproduce the one public measurement of serial
// copies onto EFS: 3,000 files (~150 MB) in 37.96 s with cp -R and 70.21 s
// with rsync -r, 79.0 and 42.7 files/s (devinzuczek.com, "improve AWS EFS
// sparse file throughput with fpsync"). benches/run.sh checks both.
// Attribute / entry cache lifetime in the kernel, like NFS attribute caching.
const EFS_ATTR_TTL_MS: f64 = 1000.0;

// --- cross-az ----------------------------------------------------------------
//
// An estimate, not a measurement: efs-typical plus about 1 ms per round trip
// for the hop to a mount target in another Availability Zone (AWS describes
// inter-AZ latency as single-digit milliseconds; ~1 ms is typical).
const CROSS_AZ_EXTRA_MS: f64 = 1.0;

impl Costs {
    /// The costs of a named profile.
    pub fn of(profile: ProfileName) -> Costs {
        match profile {
            ProfileName::EfsTypical => Costs {
                read_latency: ms(EFS_READ_MS),
                meta_latency: ms(EFS_META_MS),
                setattr_latency: ms(EFS_SETATTR_MS),
                commit_latency: ms(EFS_COMMIT_MS),
                bandwidth: EFS_MIBPS * MIB,
                ops_cap: EFS_OPS_CAP,
                max_inflight: EFS_MAX_INFLIGHT,
                dir_concurrency: EFS_DIR_CONCURRENCY,
                attr_ttl: ms(EFS_ATTR_TTL_MS),
                per_op: HashMap::new(),
            },
            ProfileName::CrossAz => Costs {
                read_latency: ms(EFS_READ_MS + CROSS_AZ_EXTRA_MS),
                meta_latency: ms(EFS_META_MS + CROSS_AZ_EXTRA_MS),
                setattr_latency: ms(EFS_SETATTR_MS + CROSS_AZ_EXTRA_MS),
                commit_latency: ms(EFS_COMMIT_MS + CROSS_AZ_EXTRA_MS),
                ..Costs::of(ProfileName::EfsTypical)
            },
            ProfileName::Local => Costs {
                read_latency: Duration::ZERO,
                meta_latency: Duration::ZERO,
                setattr_latency: Duration::ZERO,
                commit_latency: Duration::ZERO,
                bandwidth: 0.0,
                ops_cap: 0.0,
                max_inflight: 64,
                dir_concurrency: 0,
                attr_ttl: ms(EFS_ATTR_TTL_MS),
                per_op: HashMap::new(),
            },
        }
    }
}

impl Costs {
    /// The settings as a JSON object (for the stats file), latencies in ms.
    pub fn to_json(&self, refusals: &Refusals) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut per_op: Vec<String> = self
            .per_op
            .iter()
            .map(|(k, d)| format!("\"{}\": {:.3}", k.name(), ms(*d)))
            .collect();
        per_op.sort();
        format!(
            "{{\"read_latency_ms\": {:.3}, \"meta_latency_ms\": {:.3}, \"setattr_latency_ms\": {:.3}, \"commit_latency_ms\": {:.3}, \"op_latency_ms\": {{{}}}, \"mibps_cap\": {:.1}, \"ops_cap\": {:.1}, \"max_inflight\": {}, \"dir_concurrency\": {}, \"attr_ttl_ms\": {:.0}, \"xattrs\": {}, \"devices\": {}, \"rename_flags\": {}, \"efs_limits\": {}}}",
            ms(self.read_latency),
            ms(self.meta_latency),
            ms(self.setattr_latency),
            ms(self.commit_latency),
            per_op.join(", "),
            self.bandwidth / MIB,
            self.ops_cap,
            self.max_inflight,
            self.dir_concurrency,
            ms(self.attr_ttl),
            !refusals.xattrs,
            !refusals.devices,
            !refusals.rename_flags,
            refusals.efs_limits,
        )
    }
}

impl Refusals {
    /// What a named profile refuses. EFS refuses xattrs, NFSv4 ACLs and device
    /// nodes (AWS, "Unsupported NFSv4.0 and 4.1 features" in the EFS user guide).
    pub fn of(profile: ProfileName) -> Refusals {
        match profile {
            ProfileName::EfsTypical | ProfileName::CrossAz => Refusals {
                xattrs: true,
                devices: true,
                rename_flags: true,
                efs_limits: true,
            },
            ProfileName::Local => Refusals {
                xattrs: false,
                devices: false,
                rename_flags: false,
                efs_limits: false,
            },
        }
    }
}

/// The latency class of an operation; see [`Costs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// No round trip (answered by the client or free on the server).
    Free,
    /// A read-type round trip.
    Read,
    /// A namespace / metadata change round trip.
    Meta,
    /// An attribute change round trip.
    Setattr,
    /// A data commit.
    Commit,
}

impl Costs {
    /// The latency of one request of kind `kind` charged as `class`: a
    /// per-kind override wins, except that a free request stays free.
    pub fn latency(&self, kind: OpKind, class: Class) -> Duration {
        if class == Class::Free {
            return Duration::ZERO;
        }
        if let Some(d) = self.per_op.get(&kind) {
            return *d;
        }
        match class {
            Class::Free => Duration::ZERO,
            Class::Read => self.read_latency,
            Class::Meta => self.meta_latency,
            Class::Setattr => self.setattr_latency,
            Class::Commit => self.commit_latency,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn efs_typical_is_calibrated() {
        let c = Costs::of(ProfileName::EfsTypical);
        assert_eq!(c.read_latency, Duration::from_millis(1));
        assert!(c.meta_latency >= Duration::from_millis(4) && c.meta_latency <= Duration::from_millis(5));
        assert_eq!(c.bandwidth, 500.0 * 1024.0 * 1024.0);
    }

    #[test]
    fn cross_az_is_slower_and_local_is_free() {
        let t = Costs::of(ProfileName::EfsTypical);
        let x = Costs::of(ProfileName::CrossAz);
        assert!(x.read_latency > t.read_latency && x.meta_latency > t.meta_latency);
        let l = Costs::of(ProfileName::Local);
        assert_eq!(l.latency(OpKind::Create, Class::Meta), Duration::ZERO);
        let mut o = t.clone();
        o.per_op.insert(OpKind::Create, Duration::from_millis(9));
        assert_eq!(o.latency(OpKind::Create, Class::Meta), Duration::from_millis(9));
        assert_eq!(o.latency(OpKind::Create, Class::Free), Duration::ZERO);
        assert_eq!(o.latency(OpKind::Mkdir, Class::Meta), t.meta_latency);
        assert_eq!(l.bandwidth, 0.0);
    }
}
