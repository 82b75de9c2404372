//! Typed configuration: defaults, mount(8)-style `-o` option parsing and
//! validation. Pure: no I/O.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum FsyncMode {
    /// fsync(2) makes the data durable on local disk (the staging file).
    Local,
    /// fsync(2) also waits until the file is published on the backend.
    Remote,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    pub backend: PathBuf,
    pub mountpoint: PathBuf,
    /// Staging files and state; must not lie inside the backend or the mountpoint.
    pub cache_dir: Option<PathBuf>,
    /// Parallel flush workers.
    pub flushers: usize,
    /// How many nice steps below the threads that answer applications the
    /// flush workers run (0: the same CPU priority).
    pub flush_nice: usize,
    /// CPUs the threads that answer the kernel's requests are confined to
    /// (empty: wherever the scheduler puts them).
    pub fuse_cpus: Vec<usize>,
    /// Publishes allowed in flight per backend directory.
    pub dir_concurrency: usize,
    /// Quiet time after the last close before a file is published.
    pub debounce: Duration,
    /// How long cached metadata is trusted.
    pub attr_ttl: Duration,
    /// How long a published file's local copy is kept for reads and rewrites.
    pub keep_clean: Duration,
    /// No other writers: trust the cache for the whole mount.
    pub exclusive: bool,
    /// Keep extended attributes and ACLs where the backend has them (off:
    /// refused, and writes through passthrough cost no daemon round trip).
    pub xattrs: bool,
    pub fsync: FsyncMode,
    /// Parallel stats when loading a directory.
    pub meta_parallel: usize,
    /// FUSE event-loop threads.
    pub threads: usize,
    /// Threads for requests that wait on the backend (reads of clean files, loads).
    pub io_threads: usize,
    /// How long unmount and SIGTERM wait for pending work to reach the backend.
    pub drain_timeout: Duration,
    pub log_file: Option<PathBuf>,
    /// Group commit period of the journal (fdatasync); zero: only on
    /// fsync/fsyncdir/`sync`.
    pub journal_sync: Duration,
    /// Most a request that needs the backend waits before it fails with EIO.
    pub request_timeout: Duration,
    /// Budget for staged (not yet published) data; None: only the cache
    /// filesystem's free space limits it.
    pub cache_size: Option<u64>,
    pub foreground: bool,
    /// Injected backend faults (testing only; off by default).
    pub faults: FaultConfig,
}

/// Backend fault injection, for tests and failure drills: every backend
/// request waits `delay`; requests of the kinds in `ops` (all mutating kinds
/// when empty) fail with `errno` at probability `rate`, each failure followed
/// by `burst - 1` more of those kinds (a full backend stays full a while);
/// after `stall_after` requests, every request hangs for `stall` (a network
/// partition).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FaultConfig {
    pub delay: Duration,
    pub rate: f64,
    pub ops: Vec<String>,
    pub errno: i32,
    pub burst: u64,
    pub stall_after: Option<u64>,
    pub stall: Duration,
    pub seed: u64,
    /// Injected errors come after the request was carried out.
    pub reply_lost: bool,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            delay: Duration::ZERO,
            rate: 0.0,
            ops: Vec::new(),
            errno: libc::EIO,
            burst: 1,
            stall_after: None,
            stall: Duration::ZERO,
            seed: 1,
            reply_lost: false,
        }
    }
}

impl FaultConfig {
    pub fn active(&self) -> bool {
        *self != FaultConfig::default()
    }
}

/// Errno names accepted by `fault_errno`.
pub const FAULT_ERRNOS: &[(&str, i32)] = &[
    ("EIO", libc::EIO),
    ("ENOSPC", libc::ENOSPC),
    ("ETIMEDOUT", libc::ETIMEDOUT),
    ("ESTALE", libc::ESTALE),
    ("EAGAIN", libc::EAGAIN),
    ("EPERM", libc::EPERM),
    ("EACCES", libc::EACCES),
    ("ENAMETOOLONG", libc::ENAMETOOLONG),
];

impl Config {
    pub fn new(backend: PathBuf, mountpoint: PathBuf) -> Config {
        Config {
            backend,
            mountpoint,
            cache_dir: None,
            flushers: 32,
            flush_nice: 10,
            fuse_cpus: Vec::new(),
            dir_concurrency: 4,
            debounce: Duration::from_millis(500),
            attr_ttl: Duration::from_secs(30),
            keep_clean: Duration::from_secs(5),
            exclusive: false,
            xattrs: true,
            fsync: FsyncMode::Local,
            meta_parallel: 64,
            threads: 4,
            io_threads: 32,
            drain_timeout: Duration::from_secs(600),
            log_file: None,
            journal_sync: Duration::from_millis(5),
            request_timeout: Duration::from_secs(60),
            cache_size: None,
            foreground: false,
            faults: FaultConfig::default(),
        }
    }

    /// Applies a comma-separated option list (`-o a,b=c`). Generic mount(8)
    /// options that mean nothing to efscache are accepted and ignored.
    pub fn apply_options(&mut self, opts: &str) -> Result<(), String> {
        for opt in opts.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let (key, val) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt, None),
            };
            fn need<'a>(key: &str, v: Option<&'a str>) -> Result<&'a str, String> {
                v.ok_or_else(|| format!("option '{key}' needs a value ({key}=...)"))
            }
            match key {
                "cache_dir" => self.cache_dir = Some(PathBuf::from(need(key, val)?)),
                "flushers" => self.flushers = parse_count(key, need(key, val)?, 1, 1024)?,
                "flush_nice" => self.flush_nice = parse_count(key, need(key, val)?, 0, 19)?,
                "fuse_cpus" => self.fuse_cpus = parse_cpu_list(key, need(key, val)?)?,
                "dir_concurrency" => self.dir_concurrency = parse_count(key, need(key, val)?, 1, 1024)?,
                "meta_parallel" => self.meta_parallel = parse_count(key, need(key, val)?, 1, 1024)?,
                "threads" => self.threads = parse_count(key, need(key, val)?, 1, 64)?,
                "io_threads" => self.io_threads = parse_count(key, need(key, val)?, 1, 1024)?,
                "debounce" => self.debounce = parse_duration(key, need(key, val)?)?,
                "attr_ttl" => self.attr_ttl = parse_duration(key, need(key, val)?)?,
                "keep_clean" => self.keep_clean = parse_duration(key, need(key, val)?)?,
                "drain_timeout" => self.drain_timeout = parse_duration(key, need(key, val)?)?,
                "exclusive" => self.exclusive = parse_bool(key, val)?,
                "xattr" => self.xattrs = parse_bool(key, val)?,
                "noxattr" if val.is_none() => self.xattrs = false,
                "fsync" => {
                    self.fsync = match need(key, val)? {
                        "local" => FsyncMode::Local,
                        "remote" => FsyncMode::Remote,
                        v => return Err(format!("option fsync={v}: expected fsync=local or fsync=remote")),
                    }
                }
                "log_file" => self.log_file = Some(PathBuf::from(need(key, val)?)),
                "journal_sync" => self.journal_sync = parse_duration(key, need(key, val)?)?,
                "request_timeout" => {
                    self.request_timeout = parse_duration(key, need(key, val)?)?;
                    if self.request_timeout < Duration::from_secs(1) {
                        return Err(format!("option {key}: must be at least 1s"));
                    }
                }
                "cache_size" => self.cache_size = Some(parse_size(key, need(key, val)?)?),
                "fault_delay" => self.faults.delay = parse_duration(key, need(key, val)?)?,
                "fault_rate" => {
                    let v = need(key, val)?;
                    self.faults.rate = v
                        .parse::<f64>()
                        .ok()
                        .filter(|r| (0.0..=1.0).contains(r))
                        .ok_or_else(|| format!("option {key}={v}: expected a probability between 0 and 1"))?;
                }
                "fault_ops" => {
                    self.faults.ops = need(key, val)?.split(':').map(str::to_string).collect();
                    for o in &self.faults.ops {
                        if !crate::backend::OpKind::ALL.iter().any(|k| k.name() == o) {
                            return Err(format!("option fault_ops: unknown backend request kind '{o}'"));
                        }
                    }
                }
                "fault_errno" => {
                    let v = need(key, val)?;
                    self.faults.errno = FAULT_ERRNOS
                        .iter()
                        .find(|(n, _)| *n == v)
                        .map(|(_, e)| *e)
                        .ok_or_else(|| format!("option fault_errno={v}: expected one of EIO, ENOSPC, ETIMEDOUT, ESTALE, EAGAIN, EPERM, EACCES, ENAMETOOLONG"))?;
                }
                "fault_stall_after" => {
                    self.faults.stall_after = Some(parse_count(key, need(key, val)?, 0, usize::MAX)? as u64)
                }
                "fault_stall" => self.faults.stall = parse_duration(key, need(key, val)?)?,
                "fault_burst" => self.faults.burst = parse_count(key, need(key, val)?, 1, usize::MAX)? as u64,
                "fault_seed" => self.faults.seed = parse_count(key, need(key, val)?, 0, usize::MAX)? as u64,
                "fault_reply_lost" => self.faults.reply_lost = parse_bool(key, val)?,
                "foreground" => self.foreground = parse_bool(key, val)?,
                // Always on: every user and pjdfstest's uid switches must work, with
                // the kernel checking permissions.
                "allow_other" | "default_permissions" => {}
                // Generic options mount(8), systemd and fstab pass along.
                "defaults" | "rw" | "_netdev" | "nofail" | "noauto" | "auto" | "user" | "nouser" | "nosuid"
                | "nodev" | "exec" | "noexec" | "relatime" | "noatime" => {}
                k if k.starts_with("x-systemd.") || k.starts_with("x-") || k.starts_with("comment=") => {}
                k if !k.is_empty() && k.chars().all(|c| c.is_ascii_digit() || c == '-') => {
                    return Err(format!(
                        "unknown option '{key}': CPU lists separate their CPUs with ':' (fuse_cpus=0:2), since ',' separates options"
                    ));
                }
                _ => {
                    return Err(format!(
                        "unknown option '{key}' (see `efscache mount --help` for the list)"
                    ));
                }
            }
        }
        Ok(())
    }
}

fn parse_count(key: &str, v: &str, min: usize, max: usize) -> Result<usize, String> {
    let n: usize = v
        .parse()
        .map_err(|_| format!("option {key}={v}: expected a whole number"))?;
    if n < min || n > max {
        return Err(format!("option {key}={v}: must be between {min} and {max}"));
    }
    Ok(n)
}

/// Parses a CPU list as taskset(1) writes it, with `:` instead of `,` (commas
/// separate mount options): `0`, `0-3`, `0:2:4-5`. Sorted, without repeats.
pub fn parse_cpu_list(key: &str, v: &str) -> Result<Vec<usize>, String> {
    let err = || format!("option {key}={v}: expected CPU numbers like 0, 0-3 or 0:2:4-5");
    let mut cpus = Vec::new();
    for part in v.split(':') {
        let (lo, hi): (usize, usize) = match part.split_once('-') {
            Some((a, b)) => (a.parse().map_err(|_| err())?, b.parse().map_err(|_| err())?),
            None => {
                let n = part.parse().map_err(|_| err())?;
                (n, n)
            }
        };
        if lo > hi || hi >= libc::CPU_SETSIZE as usize {
            return Err(err());
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Renders a CPU list the way `parse_cpu_list` reads it.
pub fn cpu_list_string(cpus: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    parts.join(":")
}

fn parse_bool(key: &str, v: Option<&str>) -> Result<bool, String> {
    match v {
        None | Some("1") | Some("true") | Some("yes") | Some("on") => Ok(true),
        Some("0") | Some("false") | Some("no") | Some("off") => Ok(false),
        Some(v) => Err(format!("option {key}={v}: expected a yes/no value")),
    }
}

/// Parses `512M`, `64MiB`, `20G`, `1T` or a bare number of bytes (binary units).
pub fn parse_size(key: &str, v: &str) -> Result<u64, String> {
    let err = || format!("option {key}={v}: expected a size like 512M, 20G or 1T");
    let (num, unit) = v.find(|c: char| !c.is_ascii_digit()).map_or((v, ""), |i| v.split_at(i));
    let n: u64 = num.parse().map_err(|_| err())?;
    let shift = match unit.to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(err()),
    };
    let bytes = n.checked_mul(1 << shift).ok_or_else(err)?;
    if bytes < 1 << 20 {
        return Err(format!("option {key}={v}: must be at least 1M"));
    }
    Ok(bytes)
}

/// Parses `250ms`, `2s`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration(key: &str, v: &str) -> Result<Duration, String> {
    let err = || format!("option {key}={v}: expected a duration like 500ms, 2s, 5m or 1h");
    let (num, unit) = v
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((v, ""), |i| v.split_at(i));
    let n: f64 = num.parse().map_err(|_| err())?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(err()),
    };
    if !secs.is_finite() || !(0.0..=365.0 * 86400.0).contains(&secs) {
        return Err(err());
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config::new("/b".into(), "/m".into())
    }

    #[test]
    fn parses_options_and_ignores_generic_ones() {
        let mut c = cfg();
        c.apply_options(
            "cache_dir=/var/c,flushers=8,flush_nice=0,debounce=250ms,attr_ttl=1m,exclusive,fsync=remote,_netdev,x-systemd.automount",
        )
        .unwrap();
        assert_eq!(c.cache_dir, Some(PathBuf::from("/var/c")));
        assert_eq!(c.flushers, 8);
        assert_eq!(c.flush_nice, 0);
        assert!(c.fuse_cpus.is_empty());
        assert_eq!(c.debounce, Duration::from_millis(250));
        assert_eq!(c.attr_ttl, Duration::from_secs(60));
        assert!(c.exclusive);
        assert_eq!(c.fsync, FsyncMode::Remote);
    }

    #[test]
    fn parses_sizes() {
        for (v, want) in [
            ("64M", 64u64 << 20),
            ("64MiB", 64 << 20),
            ("2g", 2 << 30),
            ("1T", 1 << 40),
            ("1048576", 1 << 20),
        ] {
            assert_eq!(parse_size("cache_size", v), Ok(want), "{v}");
        }
    }

    #[test]
    fn cpu_lists_parse_as_taskset_writes_them_and_render_back() {
        for (text, cpus, rendered) in [
            ("0", vec![0], "0"),
            ("0-3", vec![0, 1, 2, 3], "0-3"),
            ("4:0-1:1", vec![0, 1, 4], "0-1:4"),
            ("2:3:5", vec![2, 3, 5], "2-3:5"),
        ] {
            let got = parse_cpu_list("fuse_cpus", text).unwrap();
            assert_eq!(got, cpus, "{text}");
            assert_eq!(cpu_list_string(&got), rendered, "{text}");
        }
        let mut c = cfg();
        c.apply_options("fuse_cpus=1:0").unwrap();
        assert_eq!(c.fuse_cpus, vec![0, 1]);
    }

    #[test]
    fn rejects_bad_options_with_a_clear_message() {
        for (opt, needle) in [
            ("flushers=0", "between 1 and 1024"),
            ("flushers=x", "whole number"),
            ("flush_nice=20", "between 0 and 19"),
            ("fuse_cpus=", "CPU numbers"),
            ("fuse_cpus=3-1", "CPU numbers"),
            ("fuse_cpus=0,1", "separate their CPUs with ':'"),
            ("fuse_cpus=99999", "CPU numbers"),
            ("debounce=fast", "duration"),
            ("fsync=maybe", "fsync=local or fsync=remote"),
            ("bogus", "unknown option 'bogus'"),
            ("cache_dir", "needs a value"),
            ("cache_size=lots", "size like"),
            ("cache_size=10", "at least 1M"),
            ("request_timeout=100ms", "at least 1s"),
        ] {
            let e = cfg().apply_options(opt).unwrap_err();
            assert!(e.contains(needle), "{opt}: {e}");
        }
    }
}
