//! Per-operation counters and latency summaries, and their two renderings: a
//! text table for stderr and a JSON document for `--stats-file`.
//!
//! Every request the kernel sends is recorded once, when its reply has been
//! sent, with its latency measured from arrival (queueing included). `forget`
//! is recorded too but is not a backend round trip (an NFS client forgets
//! inodes without telling the server), so it is left out of `requests`.

use std::fmt::Write as _;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

macro_rules! op_kinds {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// The kinds of FUSE request the emulator serves.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum OpKind { $($variant),* }

        impl OpKind {
            /// Every kind, in report order.
            pub const ALL: &'static [OpKind] = &[$(OpKind::$variant),*];

            /// The name used in reports, flags and the stats file.
            pub fn name(self) -> &'static str {
                match self { $(OpKind::$variant => $name),* }
            }
        }
    };
}

op_kinds! {
    Lookup => "lookup",
    Getattr => "getattr",
    Setattr => "setattr",
    Readlink => "readlink",
    Mknod => "mknod",
    Mkdir => "mkdir",
    Unlink => "unlink",
    Rmdir => "rmdir",
    Symlink => "symlink",
    Rename => "rename",
    Link => "link",
    Open => "open",
    Read => "read",
    Write => "write",
    Flush => "flush",
    Release => "release",
    Fsync => "fsync",
    Opendir => "opendir",
    Readdir => "readdir",
    Readdirplus => "readdirplus",
    Releasedir => "releasedir",
    Fsyncdir => "fsyncdir",
    Statfs => "statfs",
    Setxattr => "setxattr",
    Getxattr => "getxattr",
    Listxattr => "listxattr",
    Removexattr => "removexattr",
    Access => "access",
    Create => "create",
    Fallocate => "fallocate",
    Lseek => "lseek",
    CopyFileRange => "copy_file_range",
    Forget => "forget",
}

impl OpKind {
    /// Parses a name as printed by [`OpKind::name`].
    pub fn from_name(name: &str) -> Option<OpKind> {
        OpKind::ALL.iter().copied().find(|k| k.name() == name)
    }

    /// Whether this kind is a round trip to the (emulated) server.
    pub fn is_backend_request(self) -> bool {
        self != OpKind::Forget
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Histogram resolution: buckets per doubling of the latency in microseconds.
const SUB: f64 = 16.0;
/// Enough buckets for latencies up to 2^40 µs.
const BUCKETS: usize = 40 * SUB as usize;

fn bucket_of(d: Duration) -> usize {
    let us = d.as_secs_f64() * 1e6;
    let idx = ((us + 1.0).log2() * SUB).floor();
    (idx.max(0.0) as usize).min(BUCKETS - 1)
}

/// Upper bound (µs) of a bucket; a percentile read from it errs high by < 4.5%.
fn bucket_upper_us(idx: usize) -> f64 {
    2f64.powf((idx as f64 + 1.0) / SUB) - 1.0
}

struct PerOp {
    count: AtomicU64,
    /// Requests that cost a round trip (the others are answered from what
    /// an NFS client already holds, or cost only bandwidth).
    round_trips: AtomicU64,
    /// Requests a Linux NFS 4.1 client would not have sent for the same
    /// system calls (see [`Stats::not_sent_by_nfs`]).
    not_nfs: AtomicU64,
    errors: AtomicU64,
    injected: AtomicU64,
    bytes: AtomicU64,
    total_ns: AtomicU64,
    max_ns: AtomicU64,
    hist: Box<[AtomicU64]>,
}

impl PerOp {
    fn new() -> PerOp {
        PerOp {
            count: AtomicU64::new(0),
            round_trips: AtomicU64::new(0),
            not_nfs: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            total_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
            hist: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// A point-in-time summary of one kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub round_trips: u64,
    /// Requests an NFS client would not have sent.
    pub not_nfs: u64,
    pub errors: u64,
    pub injected: u64,
    pub bytes: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The operation itself failed (a real errno from the backing filesystem).
    Failed,
    /// The emulator injected the error (`--fail-rate`).
    Injected,
}

/// Counters for every kind; cheap to update from many threads.
pub struct Stats {
    ops: Vec<PerOp>,
    started: Instant,
    /// Bumped on every record; lets the file writer skip unchanged rewrites.
    generation: AtomicU64,
    profile: &'static str,
    /// The effective settings, as a JSON object, repeated in every document.
    config_json: String,
}

impl Stats {
    /// `config_json` is a JSON object describing the effective settings.
    pub fn new(profile: &'static str, config_json: String) -> Stats {
        Stats {
            ops: OpKind::ALL.iter().map(|_| PerOp::new()).collect(),
            started: Instant::now(),
            generation: AtomicU64::new(0),
            profile,
            config_json,
        }
    }

    /// Records one finished request.
    pub fn record(&self, kind: OpKind, latency: Duration, outcome: Outcome, bytes: u64) {
        let op = &self.ops[kind.index()];
        op.count.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Ok => {}
            Outcome::Failed => {
                op.errors.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Injected => {
                op.errors.fetch_add(1, Ordering::Relaxed);
                op.injected.fetch_add(1, Ordering::Relaxed);
            }
        }
        op.bytes.fetch_add(bytes, Ordering::Relaxed);
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        op.total_ns.fetch_add(ns, Ordering::Relaxed);
        op.max_ns.fetch_max(ns, Ordering::Relaxed);
        op.hist[bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Counts one request of `kind` as a round trip (it paid a latency).
    pub fn round_trip(&self, kind: OpKind) {
        self.ops[kind.index()].round_trips.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one request of `kind` that a Linux NFS 4.1 client would not
    /// have sent (FUSE needs it, NFS does not): the kernel's lookup of a name
    /// it is about to create or rename onto, and a getattr answered from the
    /// post-operation attributes an NFS reply carries.
    pub fn not_sent_by_nfs(&self, kind: OpKind) {
        self.ops[kind.index()].not_nfs.fetch_add(1, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// A number that changes whenever anything was recorded.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The summary of one kind.
    pub fn summary(&self, kind: OpKind) -> Summary {
        let op = &self.ops[kind.index()];
        let hist: Vec<u64> = op.hist.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let count = op.count.load(Ordering::Relaxed);
        let in_hist: u64 = hist.iter().sum();
        let pct = |p: f64| -> f64 {
            if in_hist == 0 {
                return 0.0;
            }
            let rank = ((p * in_hist as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, n) in hist.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return bucket_upper_us(i) / 1000.0;
                }
            }
            bucket_upper_us(BUCKETS - 1) / 1000.0
        };
        let total_ns = op.total_ns.load(Ordering::Relaxed);
        let max_ms = op.max_ns.load(Ordering::Relaxed) as f64 / 1e6;
        Summary {
            count,
            round_trips: op.round_trips.load(Ordering::Relaxed),
            not_nfs: op.not_nfs.load(Ordering::Relaxed),
            errors: op.errors.load(Ordering::Relaxed),
            injected: op.injected.load(Ordering::Relaxed),
            bytes: op.bytes.load(Ordering::Relaxed),
            mean_ms: if count == 0 {
                0.0
            } else {
                total_ns as f64 / count as f64 / 1e6
            },
            p50_ms: pct(0.50).min(max_ms),
            p99_ms: pct(0.99).min(max_ms),
            max_ms,
        }
    }

    /// Backend requests so far (everything but `forget`).
    pub fn requests(&self) -> u64 {
        OpKind::ALL
            .iter()
            .filter(|k| k.is_backend_request())
            .map(|k| self.ops[k.index()].count.load(Ordering::Relaxed))
            .sum()
    }

    /// Backend requests so far that an NFS 4.1 client would have sent too.
    pub fn nfs_requests(&self) -> u64 {
        let not_nfs: u64 = self.ops.iter().map(|o| o.not_nfs.load(Ordering::Relaxed)).sum();
        self.requests().saturating_sub(not_nfs)
    }

    /// Requests so far that cost a round trip.
    pub fn round_trips(&self) -> u64 {
        self.ops.iter().map(|o| o.round_trips.load(Ordering::Relaxed)).sum()
    }

    /// The text table printed to stderr (kinds never seen are left out).
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "efs-sim stats ({}, {:.1} s, {} backend requests, {} as an NFS client sends them)",
            self.profile,
            self.started.elapsed().as_secs_f64(),
            self.requests(),
            self.nfs_requests()
        );
        let _ = writeln!(
            out,
            "  {:<16} {:>9} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "op", "count", "errors", "injected", "mean_ms", "p50_ms", "p99_ms", "max_ms"
        );
        for &kind in OpKind::ALL {
            let s = self.summary(kind);
            if s.count == 0 {
                continue;
            }
            let _ = writeln!(
                out,
                "  {:<16} {:>9} {:>7} {:>8} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                kind.name(),
                s.count,
                s.errors,
                s.injected,
                s.mean_ms,
                s.p50_ms,
                s.p99_ms,
                s.max_ms
            );
        }
        out
    }

    /// The JSON document written to `--stats-file`: every kind is present, so
    /// readers can rely on the schema.
    pub fn render_json(&self) -> String {
        let mut out = String::new();
        let total_errors: u64 = OpKind::ALL.iter().map(|&k| self.summary(k).errors).sum();
        let total_injected: u64 = OpKind::ALL.iter().map(|&k| self.summary(k).injected).sum();
        let _ = write!(
            out,
            "{{\n  \"profile\": \"{}\",\n  \"config\": {},\n  \"elapsed_secs\": {:.3},\n  \"requests\": {},\n  \"nfs_requests\": {},\n  \"round_trips\": {},\n  \"errors\": {},\n  \"injected_faults\": {},\n  \"ops\": {{",
            self.profile,
            self.config_json,
            self.started.elapsed().as_secs_f64(),
            self.requests(),
            self.nfs_requests(),
            self.round_trips(),
            total_errors,
            total_injected
        );
        for (i, &kind) in OpKind::ALL.iter().enumerate() {
            let s = self.summary(kind);
            let _ = write!(
                out,
                "{}\n    \"{}\": {{\"count\": {}, \"round_trips\": {}, \"not_nfs\": {}, \"errors\": {}, \"injected\": {}, \"bytes\": {}, \"mean_ms\": {:.4}, \"p50_ms\": {:.4}, \"p99_ms\": {:.4}, \"max_ms\": {:.4}}}",
                if i == 0 { "" } else { "," },
                kind.name(),
                s.count,
                s.round_trips,
                s.not_nfs,
                s.errors,
                s.injected,
                s.bytes,
                s.mean_ms,
                s.p50_ms,
                s.p99_ms,
                s.max_ms
            );
        }
        out.push_str("\n  }\n}\n");
        out
    }

    /// Writes the JSON document to `path` atomically (temp file + rename), so a
    /// reader never sees half a document.
    pub fn write_json(&self, path: &Path) -> io::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        std::fs::write(&tmp, self.render_json())?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for &k in OpKind::ALL {
            assert_eq!(OpKind::from_name(k.name()), Some(k));
        }
        assert_eq!(OpKind::from_name("nope"), None);
    }

    #[test]
    fn summary_percentiles_are_close() {
        let s = Stats::new("test", "{}".into());
        for i in 1..=100u64 {
            s.record(OpKind::Getattr, Duration::from_millis(i), Outcome::Ok, 0);
        }
        s.record(OpKind::Forget, Duration::ZERO, Outcome::Ok, 0);
        let g = s.summary(OpKind::Getattr);
        assert_eq!(g.count, 100);
        assert!((g.mean_ms - 50.5).abs() < 0.01, "{g:?}");
        assert!(g.p50_ms >= 50.0 && g.p50_ms < 50.0 * 1.05, "{g:?}");
        assert!(g.p99_ms >= 99.0 && g.p99_ms <= 100.0, "{g:?}");
        assert_eq!(s.requests(), 100);
    }

    #[test]
    fn json_lists_every_kind() {
        let s = Stats::new("test", "{}".into());
        s.record(OpKind::Create, Duration::from_millis(5), Outcome::Injected, 0);
        let j = s.render_json();
        for &k in OpKind::ALL {
            assert!(j.contains(&format!("\"{}\": {{", k.name())), "{j}");
        }
        assert!(
            j.contains("\"create\": {\"count\": 1, \"round_trips\": 0, \"not_nfs\": 0, \"errors\": 1, \"injected\": 1")
        );
    }
}
