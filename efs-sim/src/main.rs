//! `efs-sim`: an AWS EFS emulator for tests and benchmarks.
//!
//! A FUSE passthrough over a local directory in which every request costs what
//! it costs on EFS (per-class latency, bandwidth, per-directory serialisation
//! of namespace changes), refuses what EFS refuses, can inject faults, and
//! counts every request by kind.
//!
//! This file owns the command line and the process lifecycle: open the backing
//! directory, mount (with `fusemount`, never fuser's own mount code, which
//! unmounts a second time on teardown), serve until unmounted, handle signals,
//! and report the counts.
#![deny(clippy::undocumented_unsafe_blocks)]

mod faults;
mod fs;
mod inodes;
mod limits;
mod pool;
mod profile;
mod reply;
mod stats;
mod sys;

use std::io::{Read as _, Write as _};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;

use crate::faults::FaultConfig;
use crate::fs::{EfsSim, Settings};
use crate::profile::{Costs, ProfileName, Refusals};
use crate::stats::Stats;

/// The FUSE subtype, shown as `fuse.efs-sim` in mountinfo.
const SUBTYPE: &str = "efs-sim";

/// Emulates AWS EFS over a local directory: a FUSE passthrough in which every
/// request costs what it costs on EFS.
#[derive(Debug, Parser)]
#[command(name = "efs-sim", version)]
struct Cli {
    /// Directory whose contents are served.
    backing_dir: PathBuf,
    /// Where to mount (may be the backing directory itself).
    mountpoint: PathBuf,

    /// Cost profile.
    #[arg(long, value_enum, default_value = "efs-typical")]
    profile: ProfileName,
    /// Latency of read-type requests (lookup, getattr, open, read, readdir, ...), ms.
    #[arg(long, value_name = "MS")]
    read_latency_ms: Option<f64>,
    /// Latency of namespace changes (create, mkdir, unlink, rename, link, ...), ms.
    #[arg(long, value_name = "MS")]
    meta_latency_ms: Option<f64>,
    /// Latency of attribute changes (setattr: chmod, chown, utimes, truncate), ms.
    #[arg(long, value_name = "MS")]
    setattr_latency_ms: Option<f64>,
    /// Latency of a data commit (flush/fsync/release after writes), ms.
    #[arg(long, value_name = "MS")]
    commit_latency_ms: Option<f64>,
    /// Per-kind latency overrides, e.g. `create=5.6,unlink=4.6` (ms).
    #[arg(long, value_name = "OP=MS,...")]
    op_latency_ms: Option<String>,
    /// Client bandwidth for reads and writes together, MiB/s (0 = unlimited).
    #[arg(long, value_name = "MIBPS")]
    mibps_cap: Option<f64>,
    /// Metered file operations per second (reads 1, writes and metadata updates 5; 0 = unlimited).
    #[arg(long, value_name = "OPS")]
    ops_cap: Option<f64>,
    /// Requests served at once; more wait in a queue.
    #[arg(long, value_name = "N")]
    max_inflight: Option<usize>,
    /// Namespace changes in flight per parent directory (0 = unlimited).
    #[arg(long, value_name = "N")]
    dir_concurrency: Option<usize>,
    /// How long the kernel caches attributes and entries, ms.
    #[arg(long, value_name = "MS")]
    attr_ttl_ms: Option<u64>,
    /// Allow extended attributes (and ACLs) even where the profile refuses them.
    #[arg(long)]
    xattrs: bool,
    /// Allow block/char device nodes even where the profile refuses them.
    #[arg(long)]
    devices: bool,
    /// Allow rename flags (RENAME_NOREPLACE, RENAME_EXCHANGE) even where the
    /// profile refuses them, as the Linux NFS client does.
    #[arg(long)]
    rename_flags: bool,
    /// Lift EFS's limits on hard links per file (177) and symlink target
    /// length (4080 bytes) where the profile keeps them.
    #[arg(long)]
    no_efs_limits: bool,

    /// Probability that a request of a --fail-ops kind fails.
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    fail_rate: f64,
    /// Kinds that may fail: comma-separated op names (as in the stats) or `all`.
    #[arg(long, value_name = "OPS")]
    fail_ops: Option<String>,
    /// Errno of injected failures: EIO, ENOSPC, ETIMEDOUT, ... or a number.
    #[arg(long, value_name = "ERRNO", default_value = "EIO")]
    fail_errno: String,
    /// Each injected failure also fails the next N-1 requests of its kind
    /// (a full or failing server stays so for a while).
    #[arg(long, value_name = "N", default_value_t = 1)]
    fail_burst: u64,
    /// Seed for the fault decisions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// After this many requests, every request hangs for --stall-secs (once).
    #[arg(long, value_name = "N")]
    stall_after: Option<u64>,
    /// Length of the stall, seconds.
    #[arg(long, value_name = "S", default_value_t = 0.0)]
    stall_secs: f64,
    /// After this many requests, exit at once without unmounting (a crashed server).
    #[arg(long, value_name = "N")]
    crash_after: Option<u64>,

    /// Write the counts as JSON here (refreshed every 200 ms, on SIGUSR1 and on exit).
    #[arg(long, value_name = "PATH")]
    stats_file: Option<PathBuf>,
    /// fuser event-loop threads (they only hand requests to the workers).
    #[arg(long, value_name = "N", default_value_t = 4)]
    fuse_threads: usize,
    /// Descriptors kept open for inodes the kernel knows (the others are
    /// reopened by file handle when asked for). Default: half the open
    /// files limit.
    #[arg(long, value_name = "N")]
    max_inode_fds: Option<usize>,
    /// Mount source shown in mountinfo (default `efs-sim:<backing dir>`).
    #[arg(long)]
    fsname: Option<String>,
    /// Return once mounted, leaving the server in the background; prints its pid.
    #[arg(long)]
    daemon: bool,
}

fn settings(cli: &Cli) -> Result<Settings, String> {
    let mut costs = Costs::of(cli.profile);
    let ms = |v: f64, what: &str| -> Result<Duration, String> {
        if v.is_finite() && v >= 0.0 {
            Ok(Duration::from_secs_f64(v / 1000.0))
        } else {
            Err(format!("{what} must be a non-negative number of ms"))
        }
    };
    if let Some(v) = cli.read_latency_ms {
        costs.read_latency = ms(v, "--read-latency-ms")?;
    }
    if let Some(v) = cli.meta_latency_ms {
        costs.meta_latency = ms(v, "--meta-latency-ms")?;
    }
    if let Some(v) = cli.setattr_latency_ms {
        costs.setattr_latency = ms(v, "--setattr-latency-ms")?;
    }
    if let Some(v) = cli.commit_latency_ms {
        costs.commit_latency = ms(v, "--commit-latency-ms")?;
    }
    if let Some(list) = &cli.op_latency_ms {
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (op, v) = item
                .split_once('=')
                .ok_or_else(|| format!("--op-latency-ms: expected OP=MS, got {item:?}"))?;
            let kind =
                stats::OpKind::from_name(op.trim()).ok_or_else(|| format!("--op-latency-ms: unknown op {op:?}"))?;
            let v: f64 = v
                .trim()
                .parse()
                .map_err(|_| format!("--op-latency-ms: bad number in {item:?}"))?;
            costs.per_op.insert(kind, ms(v, "--op-latency-ms")?);
        }
    }
    if let Some(v) = cli.mibps_cap {
        if !(v.is_finite() && v >= 0.0) {
            return Err("--mibps-cap must be >= 0".into());
        }
        costs.bandwidth = v * 1024.0 * 1024.0;
    }
    if let Some(v) = cli.ops_cap {
        if !(v.is_finite() && v >= 0.0) {
            return Err("--ops-cap must be >= 0".into());
        }
        costs.ops_cap = v;
    }
    if let Some(n) = cli.max_inflight {
        if n == 0 {
            return Err("--max-inflight must be at least 1".into());
        }
        costs.max_inflight = n;
    }
    if let Some(n) = cli.dir_concurrency {
        costs.dir_concurrency = n;
    }
    if let Some(t) = cli.attr_ttl_ms {
        costs.attr_ttl = Duration::from_millis(t);
    }
    let mut refusals = Refusals::of(cli.profile);
    if cli.xattrs {
        refusals.xattrs = false;
    }
    if cli.devices {
        refusals.devices = false;
    }
    if cli.rename_flags {
        refusals.rename_flags = false;
    }
    if cli.no_efs_limits {
        refusals.efs_limits = false;
    }
    if !(0.0..=1.0).contains(&cli.fail_rate) {
        return Err("--fail-rate must be between 0 and 1".into());
    }
    let fail_ops = faults::parse_ops(cli.fail_ops.as_deref().unwrap_or(""))?;
    if cli.fail_rate > 0.0 && fail_ops.is_empty() {
        return Err("--fail-rate needs --fail-ops (op names or `all`)".into());
    }
    if cli.stall_after.is_some() && !(cli.stall_secs.is_finite() && cli.stall_secs > 0.0) {
        return Err("--stall-after needs a positive --stall-secs".into());
    }
    if cli.fuse_threads == 0 {
        return Err("--fuse-threads must be at least 1".into());
    }
    Ok(Settings {
        profile: cli.profile,
        costs,
        refusals,
        faults: FaultConfig {
            fail_rate: cli.fail_rate,
            fail_ops,
            fail_errno: faults::parse_errno(&cli.fail_errno)?,
            fail_burst: cli.fail_burst,
            seed: cli.seed,
            stall_after: cli.stall_after,
            stall: Duration::from_secs_f64(cli.stall_secs.max(0.0)),
            crash_after: cli.crash_after,
        },
        stats_file: cli.stats_file.clone(),
        max_inode_fds: cli.max_inode_fds,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("efs-sim: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let settings = settings(&cli)?;
    let backing = std::fs::canonicalize(&cli.backing_dir)
        .map_err(|e| format!("backing dir {}: {e}", cli.backing_dir.display()))?;
    let mountpoint = fusemount::absolute_mount_path(&cli.mountpoint)
        .map_err(|e| format!("mountpoint {}: {e}", cli.mountpoint.display()))?;
    let fsname = cli
        .fsname
        .clone()
        .unwrap_or_else(|| format!("efs-sim:{}", backing.display()));

    // The backing directory is held by fd from here on, so mounting over it
    // (or anywhere above it) cannot hide it from the server.
    let root = sys::openat(
        // SAFETY: AT_FDCWD is a valid dirfd for the whole call.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(libc::AT_FDCWD) },
        &sys::cname(backing.as_os_str()).map_err(|e| e.to_string())?,
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    )
    .map_err(|e| format!("cannot open backing dir {}: {e}", backing.display()))?;

    // Before any thread exists: fork if asked, and block the signals that the
    // signal thread will wait for (threads inherit the mask).
    let ready = if cli.daemon { Some(daemonize()?) } else { None };
    block_signals();
    sys::set_umask(0);
    sys::raise_nofile_limit();

    let stats = Arc::new(Stats::new(
        settings.profile.as_str(),
        settings.costs.to_json(&settings.refusals),
    ));
    if let Some(path) = &settings.stats_file {
        stats
            .write_json(path)
            .map_err(|e| format!("cannot write stats file {}: {e}", path.display()))?;
    }
    let profile = settings.profile;
    let stats_file = settings.stats_file.clone();
    let fs = EfsSim::new(root, settings, stats.clone()).map_err(|e| e.to_string())?;

    let spec = fusemount::MountSpec {
        fsname: fsname.clone(),
        subtype: SUBTYPE.to_string(),
        allow_other: true,
        // The server checks permissions, as NFS does (see `fs`).
        default_permissions: false,
        read_only: false,
    };
    let fd = fusemount::mount(&mountpoint, &spec).map_err(|e| e.to_string())?;
    let mut config = fuser::Config::default();
    config.n_threads = Some(cli.fuse_threads);
    config.clone_fd = true;
    config.acl = fuser::SessionACL::All;
    let session = match fuser::Session::from_fd(fs, fd, fuser::SessionACL::All, config) {
        Ok(s) => s,
        Err(e) => {
            let _ = fusemount::unmount_if_ours(&mountpoint, SUBTYPE, Some(&fsname), true);
            return Err(format!("FUSE handshake failed: {e}"));
        }
    };
    eprintln!(
        "efs-sim: serving {} at {} (profile {})",
        backing.display(),
        mountpoint.display(),
        profile.as_str()
    );

    let done = Arc::new(AtomicBool::new(false));
    spawn_signal_thread(
        mountpoint.clone(),
        fsname.clone(),
        stats.clone(),
        stats_file.clone(),
        done.clone(),
    )?;
    if let Some(path) = stats_file.clone() {
        spawn_stats_writer(path, stats.clone(), done.clone())?;
    }
    if let Some(ready) = ready {
        signal_ready(ready);
    }

    let result = session.run();
    done.store(true, Ordering::SeqCst);
    final_report(&stats, stats_file.as_deref());
    match result {
        // An unmount from outside while replies were in flight: the kernel
        // refuses them once the connection is gone. The end of the mount,
        // not a failure.
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
        r => r.map_err(|e| format!("session ended with an error: {e}")),
    }
}

/// Prints the summary and rewrites the stats file.
fn final_report(stats: &Stats, stats_file: Option<&Path>) {
    if let Some(path) = stats_file
        && let Err(e) = stats.write_json(path)
    {
        eprintln!("efs-sim: cannot write stats file {}: {e}", path.display());
    }
    eprint!("{}", stats.render_text());
}

/// The signals the signal thread handles.
fn signal_set() -> libc::sigset_t {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset only adds valid signals to it.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1] {
            libc::sigaddset(set.as_mut_ptr(), sig);
        }
        set.assume_init()
    }
}

fn block_signals() {
    let set = signal_set();
    // SAFETY: `set` is initialised; blocking signals in this (only) thread is
    // inherited by every thread spawned later.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// SIGUSR1 prints and writes the counts; SIGTERM/SIGINT/SIGHUP unmount, which
/// ends the session; if users keep a lazily detached mount busy, exit anyway.
fn spawn_signal_thread(
    mountpoint: PathBuf,
    fsname: String,
    stats: Arc<Stats>,
    stats_file: Option<PathBuf>,
    done: Arc<AtomicBool>,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name("efs-sim-signals".into())
        .spawn(move || {
            let set = signal_set();
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is initialised and `sig` is a valid out-pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                if sig == libc::SIGUSR1 {
                    final_report(&stats, stats_file.as_deref());
                    continue;
                }
                eprintln!("efs-sim: signal {sig}, unmounting {}", mountpoint.display());
                match fusemount::unmount_if_ours(&mountpoint, SUBTYPE, Some(&fsname), false) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        let _ = fusemount::unmount_if_ours(&mountpoint, SUBTYPE, Some(&fsname), true);
                    }
                    Err(e) => eprintln!("efs-sim: unmount failed: {e}"),
                }
                for _ in 0..50 {
                    if done.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                eprintln!("efs-sim: mount still busy after unmount; exiting");
                final_report(&stats, stats_file.as_deref());
                std::process::exit(0);
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start signal thread: {e}"))
}

/// Rewrites the stats file every 200 ms when something changed.
fn spawn_stats_writer(path: PathBuf, stats: Arc<Stats>, done: Arc<AtomicBool>) -> Result<(), String> {
    std::thread::Builder::new()
        .name("efs-sim-stats".into())
        .spawn(move || {
            let mut written = stats.generation();
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
                let now = stats.generation();
                if now != written {
                    if let Err(e) = stats.write_json(&path) {
                        tracing::warn!("cannot write stats file {}: {e}", path.display());
                    }
                    written = now;
                }
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start stats writer: {e}"))
}

/// Forks. The parent waits until the child reports the mount ready, prints the
/// child's pid and exits; the child returns the pipe to report on.
fn daemonize() -> Result<OwnedFd, String> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other thread exists yet, so the child is a complete copy.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid > 0 {
        drop(wr);
        let mut byte = [0u8; 1];
        let mut reader = std::fs::File::from(rd);
        let ok = matches!(reader.read(&mut byte), Ok(1));
        if ok {
            println!("{pid}");
            let _ = std::io::stdout().flush();
            std::process::exit(0);
        }
        std::process::exit(1);
    }
    drop(rd);
    // SAFETY: setsid has no preconditions; detaching from the terminal's session.
    unsafe { libc::setsid() };
    // Keep stderr for the report; stdin and stdout go to /dev/null so callers
    // reading our stdout are not held open.
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto the standard descriptors of this process.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
    Ok(wr)
}

fn signal_ready(pipe: OwnedFd) {
    let mut f = std::fs::File::from(pipe);
    let _ = f.write_all(b"R");
}
