//! The command line: clap definitions and mount(8)-style `-o` parsing into a
//! `Config`. No FUSE, no I/O.

use std::path::{Path, PathBuf};

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
flush_nice=N         how many nice steps below the application's requests publishing runs,\n                       \
so a busy CPU answers rsync first (default 10; 0: same priority)\n  \
fuse_cpus=LIST       confine the threads that answer the kernel to these CPUs (0, 0-1, 0:2);\n                       \
run the writer there too (taskset -c 0 rsync ...): on small VMs a request\n                       \
answered on the writer's own CPU costs a fraction of one that wakes another\n  \
dir_concurrency=N    publishes in flight per backend directory (default 4)\n  \
debounce=DUR         quiet time after close before a file is published (default 500ms)\n  \
attr_ttl=DUR         how long cached metadata is trusted (default 30s)\n  \
keep_clean=DUR       how long a published file's local copy is kept, so reopening or reading it\n                       \
costs no backend trip (default 5s, at most attr_ttl unless exclusive; 0: drop at once)\n  \
exclusive            no other writers: trust the cache for the whole mount\n  \
noxattr              refuse extended attributes and ACLs even where the backend keeps them\n                       \
(they cost one daemon round trip per write(2); EFS has none anyway)\n  \
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
    #[command(
        long_about = "Show pending work, progress, failures and backend operation counts.\n\n\
With --watch the view is redrawn every --interval with the publish rate and an estimate of the \
time until everything is on the backend; it ends on Ctrl-C, or with --until-drained once nothing \
is pending (exit 0, or 1 if some change could not be published). --json prints the daemon's \
status object (with --watch: one object per line)."
    )]
    Status {
        mountpoint: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Refresh until interrupted (Ctrl-C).
        #[arg(long)]
        watch: bool,
        /// Like --watch, and end once nothing is pending.
        #[arg(long)]
        until_drained: bool,
        /// Refresh period of --watch.
        #[arg(long, value_name = "DUR", default_value = "1s")]
        interval: String,
        /// Wait up to DUR for the daemon to answer (e.g. right after it was started).
        #[arg(long, value_name = "DUR")]
        wait: Option<String>,
        /// With --wait: give up as soon as process PID (the starting daemon) has exited.
        #[arg(long, value_name = "PID", requires = "wait")]
        wait_pid: Option<u32>,
    },
    /// Print the status as Prometheus metrics, or write them for
    /// node_exporter's textfile collector.
    #[command(
        long_about = "Print the daemon's counters as Prometheus text: pending files and bytes, queued ops, \
cache use, published files and bytes, retries, failures, backend requests by kind, and a histogram of \
the time each kind of flush op spends on the backend (efscache_flush_op_duration_seconds).\n\n\
For node_exporter's textfile collector, run it from cron or a systemd timer:\n  \
efscache metrics /mnt/efs --textfile /var/lib/node_exporter/textfile_collector/efscache.prom\n\
The file is replaced atomically, so the collector never reads half of it."
    )]
    Metrics {
        mountpoint: PathBuf,
        /// Write to this file (atomically, through a temp file) instead of stdout.
        #[arg(long, value_name = "PATH")]
        textfile: Option<PathBuf>,
    },
    /// Find damaged-looking files and stale temp files on a backend tree
    /// (never through an efscache mount).
    #[command(
        long_about = "Walk a backend tree (the EFS path itself, not an efscache mount over it) and report:\n  \
damaged-looking files: mode 000, or zero bytes (empty files are normal; they look damaged only if\n    \
you did not expect them). Report only, except where efscache kept a good copy of the file (its\n    \
publish failed, e.g. EPERM on chown): with --cache-dir the copy is shown, and --fix re-publishes it\n    \
over the damaged file (atomically, only if the file did not change meanwhile).\n  \
orphaned efscache temp files (.efscache.<host>.<instance>.<n>) left by a daemon that died while\n    \
publishing. --fix removes those older than --older-than.\n  \
stale rsync temp files (.NAME.XXXXXX: six letters/digits of mixed case or with digits, no group or\n    \
other permission bits) older than --older-than. --purge-rsync-temps removes them.\n\
Age is the time since the last change of the file's content or times (mtime); a candidate whose\n\
inode changed (ctime) less than --min-idle ago is kept, since a publish or an rsync sets old times\n\
on its temp file just before renaming it. Symlinks are never followed and the walk stays on the\n\
filesystem of PATH. Each removal is one unlink, so an interrupted scrub leaves nothing half-done.\n\
Exit status: 0 nothing to report, 2 findings reported, 1 error."
    )]
    Scrub {
        path: PathBuf,
        /// Machine-readable report.
        #[arg(long)]
        json: bool,
        /// Remove orphaned efscache temp files older than --older-than.
        #[arg(long)]
        fix: bool,
        /// Remove stale rsync temp files older than --older-than.
        #[arg(long)]
        purge_rsync_temps: bool,
        /// The cache dir of the efscache mount of this backend: a
        /// damaged-looking file whose publish failed and whose good copy
        /// efscache kept there (lost+found/failed) is shown, and --fix
        /// re-publishes the copy over it (atomically, only if the file did
        /// not change meanwhile).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Minimum age (mtime) of a temp file to count as stale: 30m, 12h, 1d, ...
        #[arg(long, value_name = "DUR", default_value = "1d")]
        older_than: String,
        /// Keep candidates whose inode changed (ctime) less than DUR ago.
        #[arg(long, value_name = "DUR", default_value = "10m")]
        min_idle: String,
        /// Directories read in parallel.
        #[arg(long, value_name = "N", default_value_t = 16)]
        threads: usize,
        /// No progress display, even on a terminal.
        #[arg(long)]
        quiet: bool,
    },
    /// Install the binary, the mount(8)/umount(8) helpers and the systemd unit.
    #[command(
        long_about = "Install efscache: copies this binary to BINDIR/efscache, links the mount(8) and \
umount(8) helpers SBINDIR/mount.efscache, mount.fuse.efscache, umount.efscache and \
umount.fuse.efscache to it, and writes the systemd template unit UNITDIR/efscache@.service. \
Every path is taken below --root (default /), so a package build or a test can install into a \
staging tree. Idempotent; the binary is replaced atomically, so running daemons are not disturbed."
    )]
    Install {
        /// Install below this directory instead of /.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        #[arg(long, value_name = "DIR", default_value = "/usr/local/bin")]
        bindir: PathBuf,
        #[arg(long, value_name = "DIR", default_value = "/sbin")]
        sbindir: PathBuf,
        #[arg(long, value_name = "DIR", default_value = "/etc/systemd/system")]
        unitdir: PathBuf,
        /// Remove what install puts there (the cache dirs are left alone).
        #[arg(long)]
        uninstall: bool,
    },
    /// Mount efscache over a scratch backend, rsync a sample tree in, sync,
    /// verify the backend, unmount: the whole path in one command, timed
    /// against rsync directly onto the same emulated EFS. For the full
    /// benchmark suite, see benches/run.sh (docs/BENCHMARKS.md).
    Demo {
        /// Number of files in the generated sample tree.
        #[arg(long, default_value_t = 2000)]
        files: usize,
        /// Copy this tree instead of a generated one.
        #[arg(long, value_name = "PATH")]
        tree: Option<PathBuf>,
        /// efs-sim's cost profile for the emulated EFS.
        #[arg(long, default_value = "efs-typical", value_parser = ["efs-typical", "cross-az", "local"])]
        profile: String,
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
    // Absolute and canonical, as mountinfo shows them: the fsname
    // (`efscache:BACKEND`), the utab entry that makes umount(8) drain, and
    // the journal's record of its backend then name the same paths whatever
    // the working directory was.
    let absolute = |p: PathBuf| fusemount::absolute_mount_path(&p).unwrap_or(p);
    let mut cfg = Config::new(absolute(backend), absolute(mountpoint));
    for o in options {
        cfg.apply_options(o)?;
    }
    // (The background daemon does not keep the working directory.)
    let relative_to_here = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    cfg.cache_dir = cfg.cache_dir.take().map(relative_to_here);
    cfg.log_file = cfg.log_file.take().map(relative_to_here);
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
    // In the largest unit that holds it exactly (`mount -fv` shows these).
    let ms = |d: std::time::Duration| {
        let ms = d.as_millis();
        match ms {
            0 => "0s".to_string(),
            _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
            _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
            _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
            _ => format!("{ms}ms"),
        }
    };
    if cfg.flushers != d.flushers {
        o.push(format!("flushers={}", cfg.flushers));
    }
    if cfg.flush_nice != d.flush_nice {
        o.push(format!("flush_nice={}", cfg.flush_nice));
    }
    if !cfg.fuse_cpus.is_empty() {
        o.push(format!("fuse_cpus={}", crate::config::cpu_list_string(&cfg.fuse_cpus)));
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
    if cfg.keep_clean != d.keep_clean {
        o.push(format!("keep_clean={}", ms(cfg.keep_clean)));
    }
    o.push(format!("drain_timeout={}", ms(cfg.drain_timeout)));
    if cfg.exclusive {
        o.push("exclusive".into());
    }
    if !cfg.xattrs {
        o.push("noxattr".into());
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
    if f.reply_lost {
        o.push("fault_reply_lost".into());
    }
    o.join(",")
}

/// The mount(8)/umount(8) helper names efscache answers to (argv[0]).
/// `mount -t efscache` runs `mount.efscache`, `-t fuse.efscache` runs
/// `mount.fuse.efscache`; umount(8) looks up `umount.<type>` with the type
/// from mountinfo, which is always `fuse.efscache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Helper {
    Mount,
    Umount,
}

pub const MOUNT_HELPERS: [&str; 2] = ["mount.efscache", "mount.fuse.efscache"];
pub const UMOUNT_HELPERS: [&str; 2] = ["umount.efscache", "umount.fuse.efscache"];

/// Which helper `argv0` names, if any.
pub fn helper_for(argv0: &std::ffi::OsStr) -> Option<Helper> {
    let name = Path::new(argv0).file_name()?.to_str()?;
    if MOUNT_HELPERS.contains(&name) {
        Some(Helper::Mount)
    } else if UMOUNT_HELPERS.contains(&name) {
        Some(Helper::Umount)
    } else {
        None
    }
}

/// `mount.efscache SOURCE DIR [-sfnv] [-o OPTIONS] [-t TYPE]`, as mount(8) calls it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MountHelperArgs {
    pub source: PathBuf,
    pub dir: PathBuf,
    /// Every `-o` argument, in order.
    pub options: Vec<String>,
    /// `-f`: check and print what would be done, mount nothing.
    pub fake: bool,
    /// `-v`
    pub verbose: bool,
    /// `-s`: skip options efscache does not know (with a warning).
    pub sloppy: bool,
    /// `-n`: do not record the mount in /run/mount/utab.
    pub no_mtab: bool,
}

/// `umount.fuse.efscache DIR [-flnrv] [-t TYPE]`, as umount(8) calls it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UmountHelperArgs {
    pub dir: PathBuf,
    /// `-f`: unmount at once, without waiting for pending work.
    pub force: bool,
    /// `-l`: detach lazily, without waiting for pending work.
    pub lazy: bool,
    pub verbose: bool,
}

/// Splits getopt-style helper arguments: single-letter flags (bundled or
/// not), options taking a value (`-o X` or `-oX`) and positionals.
fn helper_getopt(
    args: &[std::ffi::OsString],
    flags: &str,
    valued: &str,
    mut on_flag: impl FnMut(char, Option<String>) -> Result<(), String>,
) -> Result<Vec<PathBuf>, String> {
    let mut positional = Vec::new();
    let mut it = args.iter();
    let mut only_positional = false;
    while let Some(a) = it.next() {
        let bytes = a.as_encoded_bytes();
        if only_positional || bytes.len() < 2 || bytes[0] != b'-' {
            positional.push(PathBuf::from(a));
            continue;
        }
        if bytes == b"--" {
            only_positional = true;
            continue;
        }
        let s = a
            .to_str()
            .ok_or_else(|| format!("option {} is not valid UTF-8", a.to_string_lossy()))?;
        for (i, c) in s[1..].char_indices() {
            if valued.contains(c) {
                let rest = &s[1 + i + c.len_utf8()..];
                let val = if rest.is_empty() {
                    it.next()
                        .ok_or_else(|| format!("option -{c} needs a value"))?
                        .to_str()
                        .ok_or_else(|| format!("the value of -{c} is not valid UTF-8"))?
                        .to_string()
                } else {
                    rest.to_string()
                };
                on_flag(c, Some(val))?;
                break;
            } else if flags.contains(c) {
                on_flag(c, None)?;
            } else {
                return Err(format!("unknown flag -{c}"));
            }
        }
    }
    Ok(positional)
}

fn check_helper_type(t: &str) -> Result<(), String> {
    match t {
        "efscache" | "fuse.efscache" => Ok(()),
        t => Err(format!(
            "called for filesystem type '{t}'; expected efscache or fuse.efscache"
        )),
    }
}

/// Parses the arguments mount(8) passes to `mount.efscache` (after argv[0]).
pub fn parse_mount_helper(args: &[std::ffi::OsString]) -> Result<MountHelperArgs, String> {
    let mut a = MountHelperArgs::default();
    let pos = helper_getopt(args, "sfnvrw", "otN", |c, v| {
        match c {
            's' => a.sloppy = true,
            'f' => a.fake = true,
            'v' => a.verbose = true,
            'n' => a.no_mtab = true,
            'w' => {}
            'r' => return Err("efscache cannot be mounted read-only (-r)".into()),
            'o' => a.options.push(v.unwrap_or_default()),
            't' => check_helper_type(&v.unwrap_or_default())?,
            'N' => return Err("mounting in another namespace (-N) is not supported".into()),
            _ => unreachable!("only the flags passed to helper_getopt"),
        }
        Ok(())
    })?;
    match <[PathBuf; 2]>::try_from(pos) {
        Ok([source, dir]) => {
            a.source = source;
            a.dir = dir;
            Ok(a)
        }
        Err(_) => Err("usage: mount.efscache BACKEND MOUNTPOINT [-sfnv] [-o OPTIONS]".into()),
    }
}

/// Parses the arguments umount(8) passes to `umount.fuse.efscache`.
pub fn parse_umount_helper(args: &[std::ffi::OsString]) -> Result<UmountHelperArgs, String> {
    let mut a = UmountHelperArgs::default();
    let pos = helper_getopt(args, "flnrvd", "tN", |c, v| {
        match c {
            'f' => a.force = true,
            'l' => a.lazy = true,
            'v' => a.verbose = true,
            'n' | 'r' | 'd' => {}
            't' => check_helper_type(&v.unwrap_or_default())?,
            'N' => return Err("unmounting in another namespace (-N) is not supported".into()),
            _ => unreachable!("only the flags passed to helper_getopt"),
        }
        Ok(())
    })?;
    match <[PathBuf; 1]>::try_from(pos) {
        Ok([dir]) => {
            a.dir = dir;
            Ok(a)
        }
        Err(_) => Err("usage: umount.fuse.efscache MOUNTPOINT [-flnrv]".into()),
    }
}

/// The Config a helper mounts with: the `-o` lists in order. With `sloppy`,
/// options efscache does not know are dropped (returned as the second value)
/// instead of failing; a bad value of a known option always fails.
pub fn helper_config(a: &MountHelperArgs) -> Result<(Config, Vec<String>), String> {
    let mut cfg = Config::new(a.source.clone(), a.dir.clone());
    let mut skipped = Vec::new();
    for list in &a.options {
        for opt in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            match cfg.apply_options(opt) {
                Ok(()) => {}
                Err(e) if a.sloppy && e.starts_with(UNKNOWN_OPTION) => skipped.push(opt.to_string()),
                Err(e) => return Err(e),
            }
        }
    }
    if cfg.foreground {
        return Err("option 'foreground' cannot be used from mount(8): the mount would never return".into());
    }
    Ok((cfg, skipped))
}

/// How `Config::apply_options` starts its message for an option it does not know.
const UNKNOWN_OPTION: &str = "unknown option";

/// Parses a duration for the CLI: everything `parse_duration` takes, plus
/// whole days (`1d`, `7d`).
pub fn parse_cli_duration(what: &str, v: &str) -> Result<std::time::Duration, String> {
    if let Some(days) = v.strip_suffix('d')
        && let Ok(n) = days.parse::<u64>()
    {
        return Ok(std::time::Duration::from_secs(n * 86_400));
    }
    crate::config::parse_duration(what, v)
        .map_err(|_| format!("{what} {v}: expected a duration like 500ms, 30s, 10m, 12h or 1d"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_string_round_trips() {
        let cfg = mount_config(
            "/b".into(),
            "/m".into(),
            &["cache_dir=/c,flushers=7,flush_nice=3,fuse_cpus=0-1:3,exclusive,fsync=remote,debounce=3s,fault_delay=5ms,fault_rate=0.05,fault_ops=write:rename,fault_errno=ENOSPC,fault_stall_after=100,fault_stall=2s,fault_seed=9,cache_size=64M,request_timeout=5s".into()],
            false,
        )
        .unwrap();
        let again = mount_config("/b".into(), "/m".into(), &[options_string(&cfg)], false).unwrap();
        assert_eq!(format!("{:?}", cfg), format!("{:?}", again));
    }

    fn args(v: &[&str]) -> Vec<std::ffi::OsString> {
        v.iter().map(Into::into).collect()
    }

    #[test]
    fn helper_names() {
        use std::ffi::OsStr;
        assert_eq!(helper_for(OsStr::new("/sbin/mount.efscache")), Some(Helper::Mount));
        assert_eq!(helper_for(OsStr::new("mount.fuse.efscache")), Some(Helper::Mount));
        assert_eq!(
            helper_for(OsStr::new("/usr/sbin/umount.fuse.efscache")),
            Some(Helper::Umount)
        );
        assert_eq!(helper_for(OsStr::new("umount.efscache")), Some(Helper::Umount));
        assert_eq!(helper_for(OsStr::new("/usr/local/bin/efscache")), None);
        assert_eq!(helper_for(OsStr::new("mount.efscache2")), None);
    }

    #[test]
    fn mount_helper_arguments() {
        let a = parse_mount_helper(&args(&["/b", "/m", "-vr"]));
        assert_eq!(a.unwrap_err(), "efscache cannot be mounted read-only (-r)");
        let a = parse_mount_helper(&args(&[
            "/b",
            "/m",
            "-sn",
            "-o",
            "cache_dir=/c,_netdev",
            "-fv",
            "-odebounce=1s",
        ]))
        .unwrap();
        assert_eq!(a.source, PathBuf::from("/b"));
        assert_eq!(a.dir, PathBuf::from("/m"));
        assert_eq!(a.options, ["cache_dir=/c,_netdev", "debounce=1s"]);
        assert!(a.fake && a.verbose && a.sloppy);
        let a = parse_mount_helper(&args(&["-t", "fuse.efscache", "/b", "/m"])).unwrap();
        assert!(!a.fake && a.options.is_empty());
        assert!(parse_mount_helper(&args(&["-t", "nfs", "/b", "/m"])).is_err());
        assert!(parse_mount_helper(&args(&["/b"])).unwrap_err().starts_with("usage"));
        assert!(
            parse_mount_helper(&args(&["/b", "/m", "-x"]))
                .unwrap_err()
                .contains("-x")
        );
        assert!(parse_mount_helper(&args(&["/b", "/m", "-o"])).is_err());
        let a = parse_mount_helper(&args(&["/b", "--", "-odd name"])).unwrap();
        assert_eq!(a.dir, PathBuf::from("-odd name"));
    }

    #[test]
    fn umount_helper_arguments() {
        let a = parse_umount_helper(&args(&["/m", "-n", "-v"])).unwrap();
        assert_eq!(a.dir, PathBuf::from("/m"));
        assert!(a.verbose && !a.lazy && !a.force);
        let a = parse_umount_helper(&args(&["-l", "/m", "-t", "fuse.efscache"])).unwrap();
        assert!(a.lazy);
        assert!(parse_umount_helper(&args(&["/m", "/n"])).is_err());
    }

    #[test]
    fn helper_config_validates_and_sloppy_skips_only_unknown_options() {
        let mut a = parse_mount_helper(&args(&["/b", "/m", "-o", "flushers=8,defaults,_netdev,bogus"])).unwrap();
        assert!(helper_config(&a).unwrap_err().contains("bogus"));
        a.sloppy = true;
        let (cfg, skipped) = helper_config(&a).unwrap();
        assert_eq!(cfg.flushers, 8);
        assert_eq!(skipped, ["bogus"]);
        a.options = vec!["flushers=many".into()];
        assert!(
            helper_config(&a).unwrap_err().contains("flushers"),
            "bad values fail even with -s"
        );
        a.options = vec!["foreground".into()];
        assert!(helper_config(&a).is_err());
    }

    #[test]
    fn cli_durations_take_days() {
        assert_eq!(parse_cli_duration("--older-than", "2d").unwrap().as_secs(), 2 * 86_400);
        assert_eq!(parse_cli_duration("--older-than", "90m").unwrap().as_secs(), 5400);
        assert!(parse_cli_duration("--older-than", "soon").is_err());
    }
}
