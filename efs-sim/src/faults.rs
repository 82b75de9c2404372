//! Fault injection: errors on a fraction of chosen operations, a stall (every
//! request hangs for a while, as during a network partition), and a crash.
//!
//! Decisions are deterministic for a given `--seed`: whether the k-th request
//! of a kind fails depends only on (seed, kind, k), not on how requests of
//! different kinds interleave.

use std::collections::HashSet;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::stats::OpKind;

/// Errno names accepted by `--fail-errno` (a number is accepted too).
const ERRNOS: &[(&str, i32)] = &[
    ("EIO", libc::EIO),
    ("ENOSPC", libc::ENOSPC),
    ("ETIMEDOUT", libc::ETIMEDOUT),
    ("EDQUOT", libc::EDQUOT),
    ("EACCES", libc::EACCES),
    ("EPERM", libc::EPERM),
    ("ESTALE", libc::ESTALE),
    ("EAGAIN", libc::EAGAIN),
    ("EROFS", libc::EROFS),
    ("ENOTCONN", libc::ENOTCONN),
    ("EREMOTEIO", libc::EREMOTEIO),
    ("ENOMEM", libc::ENOMEM),
    ("EFBIG", libc::EFBIG),
    ("EINTR", libc::EINTR),
];

/// Parses an errno name (`EIO`) or number (`5`).
pub fn parse_errno(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.parse::<i32>() {
        return if n > 0 {
            Ok(n)
        } else {
            Err(format!("errno must be positive, got {n}"))
        };
    }
    let upper = s.to_ascii_uppercase();
    ERRNOS
        .iter()
        .find(|(name, _)| *name == upper)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = ERRNOS.iter().map(|(n, _)| *n).collect();
            format!("unknown errno {s:?} (known: {})", names.join(", "))
        })
}

/// Parses `--fail-ops`: comma-separated op names, or `all`.
pub fn parse_ops(s: &str) -> Result<HashSet<OpKind>, String> {
    let mut set = HashSet::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part == "all" {
            set.extend(OpKind::ALL.iter().copied().filter(|k| k.is_backend_request()));
            continue;
        }
        match OpKind::from_name(part) {
            Some(k) if k.is_backend_request() => {
                set.insert(k);
            }
            _ => {
                let names: Vec<&str> = OpKind::ALL
                    .iter()
                    .filter(|k| k.is_backend_request())
                    .map(|k| k.name())
                    .collect();
                return Err(format!("unknown op {part:?} (known: all, {})", names.join(", ")));
            }
        }
    }
    Ok(set)
}

/// What to inject.
#[derive(Debug, Clone, Default)]
pub struct FaultConfig {
    /// Probability that a request of a chosen kind fails.
    pub fail_rate: f64,
    /// The kinds that may fail.
    pub fail_ops: HashSet<OpKind>,
    /// The errno they fail with.
    pub fail_errno: i32,
    /// Each drawn failure also fails the next `fail_burst - 1` requests of
    /// its kind (0 and 1: single failures).
    pub fail_burst: u64,
    /// Seed of the decisions.
    pub seed: u64,
    /// After this many requests a stall starts...
    pub stall_after: Option<u64>,
    /// ...and lasts this long.
    pub stall: Duration,
    /// After this many requests the process exits without unmounting.
    pub crash_after: Option<u64>,
}

/// What the arrival of a request means for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// Position of this request among this kind's requests (0-based).
    pub kind_seq: u64,
    /// The process must crash now, before serving this request.
    pub crash: bool,
}

/// Runtime state of fault injection.
pub struct Faults {
    cfg: FaultConfig,
    arrivals: AtomicU64,
    per_kind: Vec<AtomicU64>,
    stall_until: OnceLock<Instant>,
}

impl Faults {
    pub fn new(cfg: FaultConfig) -> Faults {
        Faults {
            cfg,
            arrivals: AtomicU64::new(0),
            per_kind: OpKind::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            stall_until: OnceLock::new(),
        }
    }

    /// Counts an arriving request; starts the stall window when its time has come.
    pub fn arrive(&self, kind: OpKind) -> Arrival {
        let kind_seq = self.per_kind[kind as usize].fetch_add(1, Ordering::Relaxed);
        if !kind.is_backend_request() {
            return Arrival { kind_seq, crash: false };
        }
        let n = self.arrivals.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(after) = self.cfg.stall_after
            && n > after
        {
            let stall = self.cfg.stall;
            self.stall_until.get_or_init(|| Instant::now() + stall);
        }
        let crash = self.cfg.crash_after.is_some_and(|after| n > after);
        Arrival { kind_seq, crash }
    }

    /// Blocks while the stall window is open.
    pub fn wait_stall(&self) {
        if let Some(&until) = self.stall_until.get() {
            let now = Instant::now();
            if now < until {
                std::thread::sleep(until - now);
            }
        }
    }

    /// The errno to inject into this request, if any.
    pub fn inject(&self, kind: OpKind, kind_seq: u64) -> Option<i32> {
        if self.cfg.fail_rate <= 0.0 || !self.cfg.fail_ops.contains(&kind) {
            return None;
        }
        // The k-th request fails if it, or one of the `fail_burst - 1`
        // before it of its kind, drew a failure: failures come in runs.
        let first = kind_seq.saturating_sub(self.cfg.fail_burst.max(1) - 1);
        let fails = (first..=kind_seq).any(|k| unit(mix(self.cfg.seed, kind as u64, k)) < self.cfg.fail_rate);
        fails.then_some(self.cfg.fail_errno)
    }
}

/// splitmix64 finaliser over the three inputs.
fn mix(seed: u64, kind: u64, seq: u64) -> u64 {
    let mut z = seed
        .wrapping_add(kind.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(seq.wrapping_mul(0xD1B5_4A32_D192_ED03))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Maps 64 random bits to [0, 1).
fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rate: f64, seed: u64) -> FaultConfig {
        FaultConfig {
            fail_rate: rate,
            fail_ops: parse_ops("create,write").unwrap(),
            fail_errno: libc::EIO,
            seed,
            ..FaultConfig::default()
        }
    }

    #[test]
    fn rate_is_respected_and_deterministic() {
        let f = Faults::new(cfg(0.3, 7));
        let fails: Vec<bool> = (0..10_000).map(|i| f.inject(OpKind::Create, i).is_some()).collect();
        let n = fails.iter().filter(|b| **b).count();
        assert!((2_700..3_300).contains(&n), "{n}");
        let g = Faults::new(cfg(0.3, 7));
        let again: Vec<bool> = (0..10_000).map(|i| g.inject(OpKind::Create, i).is_some()).collect();
        assert_eq!(fails, again);
        assert_eq!(f.inject(OpKind::Rename, 1), None);
    }

    #[test]
    fn bursts_follow_each_drawn_failure() {
        let single = Faults::new(cfg(0.01, 9));
        let burst = Faults::new(FaultConfig {
            fail_burst: 20,
            ..cfg(0.01, 9)
        });
        let drawn: Vec<u64> = (0..5_000)
            .filter(|i| single.inject(OpKind::Create, *i).is_some())
            .collect();
        assert!(!drawn.is_empty());
        for d in &drawn {
            for k in *d..*d + 20 {
                assert!(
                    burst.inject(OpKind::Create, k).is_some(),
                    "request {k} after failure {d}"
                );
            }
        }
        let fails = (0..5_000)
            .filter(|i| burst.inject(OpKind::Create, *i).is_some())
            .count();
        assert!(fails >= drawn.len() * 10, "{fails} failures for {} draws", drawn.len());
    }

    #[test]
    fn parses_errnos_and_ops() {
        assert_eq!(parse_errno("enospc"), Ok(libc::ENOSPC));
        assert_eq!(parse_errno("110"), Ok(110));
        assert!(parse_errno("EWHAT").is_err());
        assert!(parse_ops("create,bogus").is_err());
        assert!(parse_ops("forget").is_err());
        assert!(parse_ops("all").unwrap().contains(&OpKind::Rename));
    }

    #[test]
    fn stall_starts_after_n_and_crash_after_m() {
        let f = Faults::new(FaultConfig {
            stall_after: Some(2),
            stall: Duration::from_millis(50),
            crash_after: Some(3),
            ..FaultConfig::default()
        });
        assert!(!f.arrive(OpKind::Getattr).crash);
        assert!(f.stall_until.get().is_none());
        f.arrive(OpKind::Forget);
        f.arrive(OpKind::Getattr);
        assert!(f.stall_until.get().is_none());
        assert!(!f.arrive(OpKind::Getattr).crash);
        assert!(f.stall_until.get().is_some());
        let t = Instant::now();
        f.wait_stall();
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert!(f.arrive(OpKind::Getattr).crash);
    }
}
