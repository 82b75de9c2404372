//! The command line: clap definitions and mount(8)-style `-o` parsing into a
//! `Config`. No FUSE, no I/O.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, FsyncMode};

#[derive(Parser, Debug)]
#[command(
    name = "efscache",
    version,
    about = "Write-back cache for AWS EFS: makes rsync and other small-file writers fast and safe",
    long_about = "efscache mounts over an EFS (or any NFS/POSIX) directory. Writes land on local disk \
and are published to the backend in parallel, each file atomically (temp name + rename), so \
readers on other hosts never see partial files. Metadata is answered from a batch-loaded cache.\n\n\
Typical use:\n  efscache mount /mnt/efs /mnt/efs        # stack on the EFS mount itself\n  \
rsync -aH --numeric-ids src/ /mnt/efs/dst/\n  efscache sync /mnt/efs                  # barrier: everything is on EFS\n  \
efscache umount /mnt/efs"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Mount efscache over BACKEND at MOUNTPOINT (they may be the same path).
    #[command(
        long_about = "Mount efscache over BACKEND at MOUNTPOINT. BACKEND may be the mountpoint \
itself: efscache opens it before mounting on top.\n\nOptions (-o, comma separated):\n  \
cache_dir=PATH       staging and state on local disk (default /var/cache/efscache/<id>)\n  \
flushers=N           parallel publish workers (default 32)\n  \
dir_concurrency=N    publishes in flight per backend directory (default 4)\n  \
debounce=DUR         quiet time after close before a file is published (default 500ms)\n  \
attr_ttl=DUR         how long cached metadata is trusted (default 30s)\n  \
exclusive            no other writers: trust the cache for the whole mount\n  \
fsync=local|remote   what fsync(2) waits for (default local)\n  \
meta_parallel=N      parallel stats when loading a directory (default 64)\n  \
drain_timeout=DUR    how long umount/SIGTERM wait for pending work (default 10m)\n  \
journal_sync=DUR     how often the journal is fdatasync'ed (default 5ms; 0: on fsync/sync only)\n  \
cache_size=SIZE      budget for unpublished data, e.g. 20G (default: the cache disk's free space);\n                       \
when it is used up, new writers wait for publishes (see docs/CONFIGURATION.md)\n  \
request_timeout=DUR  most a request waits on an unresponsive backend before EIO (default 60s)\n  \
threads=N, io_threads=N, log_file=PATH\n  \
fault_*=...          backend fault injection for tests (see docs/CONFIGURATION.md)\n\
Every change is journaled in cache_dir before it is acknowledged; after a crash, mount again\n\
with the same cache_dir and efscache finishes the job.\n\
Generic mount options (defaults, _netdev, nofail, x-systemd.*, ...) are accepted and ignored.\n\
Durations: 250ms, 2s, 5m, 1h."
    )]
    Mount {
        backend: PathBuf,
        mountpoint: PathBuf,
        /// Mount options, comma separated (see above).
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Stay in the foreground (systemd, debugging).
        #[arg(short = 'f', long)]
        foreground: bool,
    },
    /// Publish pending work (bounded by --timeout), then unmount.
    Umount {
        mountpoint: PathBuf,
        /// How long to wait for pending work (default: the mount's drain_timeout).
        #[arg(long, value_name = "DUR")]
        timeout: Option<String>,
    },
    /// Block until everything accepted so far is on the backend.
    Sync {
        mountpoint: PathBuf,
        #[arg(long, value_name = "DUR")]
        timeout: Option<String>,
    },
    /// Show pending work, progress, failures and backend operation counts.
    Status {
        mountpoint: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Mount efscache over a scratch backend, rsync a sample tree in, sync,
    /// verify the backend, unmount: the whole path in one command.
    Demo {
        /// Number of files in the sample tree.
        #[arg(long, default_value_t = 2000)]
        files: usize,
        /// Keep the scratch directory for inspection.
        #[arg(long)]
        keep: bool,
    },
}

/// Builds a Config from `mount` arguments.
pub fn mount_config(
    backend: PathBuf,
    mountpoint: PathBuf,
    options: &[String],
    foreground: bool,
) -> Result<Config, String> {
    let mut cfg = Config::new(backend, mountpoint);
    for o in options {
        cfg.apply_options(o)?;
    }
    cfg.foreground |= foreground;
    Ok(cfg)
}

/// The `-o` string that reproduces `cfg` (for the background daemon).
pub fn options_string(cfg: &Config) -> String {
    let d = Config::new(cfg.backend.clone(), cfg.mountpoint.clone());
    let mut o = Vec::new();
    if let Some(c) = &cfg.cache_dir {
        o.push(format!("cache_dir={}", c.display()));
    }
    let ms = |d: std::time::Duration| format!("{}ms", d.as_millis());
    if cfg.flushers != d.flushers {
        o.push(format!("flushers={}", cfg.flushers));
    }
    if cfg.dir_concurrency != d.dir_concurrency {
        o.push(format!("dir_concurrency={}", cfg.dir_concurrency));
    }
    if cfg.meta_parallel != d.meta_parallel {
        o.push(format!("meta_parallel={}", cfg.meta_parallel));
    }
    if cfg.threads != d.threads {
        o.push(format!("threads={}", cfg.threads));
    }
    if cfg.request_timeout != d.request_timeout {
        o.push(format!("request_timeout={}", ms(cfg.request_timeout)));
    }
    if let Some(b) = cfg.cache_size {
        o.push(format!("cache_size={b}"));
    }
    if cfg.io_threads != d.io_threads {
        o.push(format!("io_threads={}", cfg.io_threads));
    }
    o.push(format!("debounce={}", ms(cfg.debounce)));
    o.push(format!("attr_ttl={}", ms(cfg.attr_ttl)));
    o.push(format!("drain_timeout={}", ms(cfg.drain_timeout)));
    if cfg.exclusive {
        o.push("exclusive".into());
    }
    if cfg.fsync == FsyncMode::Remote {
        o.push("fsync=remote".into());
    }
    if let Some(l) = &cfg.log_file {
        o.push(format!("log_file={}", l.display()));
    }
    if cfg.journal_sync != d.journal_sync {
        o.push(format!("journal_sync={}", ms(cfg.journal_sync)));
    }
    let f = &cfg.faults;
    let fd = crate::config::FaultConfig::default();
    if f.delay != fd.delay {
        o.push(format!("fault_delay={}", ms(f.delay)));
    }
    if f.rate != fd.rate {
        o.push(format!("fault_rate={}", f.rate));
    }
    if !f.ops.is_empty() {
        o.push(format!("fault_ops={}", f.ops.join(":")));
    }
    if f.errno != fd.errno
        && let Some((n, _)) = crate::config::FAULT_ERRNOS.iter().find(|(_, e)| *e == f.errno)
    {
        o.push(format!("fault_errno={n}"));
    }
    if let Some(n) = f.stall_after {
        o.push(format!("fault_stall_after={n}"));
    }
    if f.stall != fd.stall {
        o.push(format!("fault_stall={}", ms(f.stall)));
    }
    if f.seed != fd.seed {
        o.push(format!("fault_seed={}", f.seed));
    }
    o.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_string_round_trips() {
        let cfg = mount_config(
            "/b".into(),
            "/m".into(),
            &["cache_dir=/c,flushers=7,exclusive,fsync=remote,debounce=3s,fault_delay=5ms,fault_rate=0.05,fault_ops=write:rename,fault_errno=ENOSPC,fault_stall_after=100,fault_stall=2s,fault_seed=9,cache_size=64M,request_timeout=5s".into()],
            false,
        )
        .unwrap();
        let again = mount_config("/b".into(), "/m".into(), &[options_string(&cfg)], false).unwrap();
        assert_eq!(format!("{:?}", cfg), format!("{:?}", again));
    }
}
