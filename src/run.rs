//! Lifecycle of a mount: check the mountpoint, open the backend root before
//! mounting over it, open staging, start the flush workers and the control
//! socket, mount, serve, and drain on the way out.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::fault::FaultBackend;
use crate::backend::{Backend, PosixBackend};
use crate::config::{Config, FsyncMode};
use crate::control::{self, Request};
use crate::flush::publish::TempNames;
use crate::flush::{RetryPolicy, Scheduler};
use crate::fs::{Fs, FsConfig};
use crate::fuse::session::{self, SUBTYPE};
use crate::journal::Header;
use crate::recovery;
use crate::staging::Staging;

/// Environment variable carrying the readiness pipe fd to a background daemon.
const READY_FD_ENV: &str = "EFSCACHE_READY_FD";

/// Default cache dir for a mountpoint: one per mount, under /var/cache/efscache.
pub fn default_cache_dir(mountpoint: &Path) -> PathBuf {
    let sock = control::socket_path(mountpoint);
    let id = sock
        .file_stem()
        .expect("socket has a name")
        .to_string_lossy()
        .into_owned();
    PathBuf::from("/var/cache/efscache").join(id)
}

fn abs(p: &Path, what: &str) -> Result<PathBuf, String> {
    fusemount::absolute_mount_path(p).map_err(|e| format!("{what} {}: {e}", p.display()))
}

/// `efscache mount`: returns once the mount serves requests. Without
/// `foreground`, the daemon continues in the background.
pub fn mount(mut cfg: Config) -> Result<(), String> {
    cfg.mountpoint = abs(&cfg.mountpoint, "mountpoint")?;
    cfg.backend = abs(&cfg.backend, "backend")?;
    if cfg.foreground {
        let ready = std::env::var(READY_FD_ENV)
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .map(|fd| {
                // SAFETY: the parent passed us this fd number for our exclusive use.
                unsafe { OwnedFd::from_raw_fd(fd) }
            });
        // SAFETY: unsetting our own environment before any thread is started.
        unsafe { std::env::remove_var(READY_FD_ENV) };
        return run_daemon(cfg, ready);
    }
    spawn_background(&cfg)
}

/// Starts `efscache mount --foreground` detached and waits for it to report
/// "ready" (or an error) through a pipe.
fn spawn_background(cfg: &Config) -> Result<(), String> {
    let mut fds = [0; 2];
    // SAFETY: fds points to two ints; O_CLOEXEC only on the read end below.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and are owned here.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: setting FD_CLOEXEC on our own read end.
    unsafe { libc::fcntl(fds[0], libc::F_SETFD, libc::FD_CLOEXEC) };
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("mount")
        .arg("--foreground")
        .arg(&cfg.backend)
        .arg(&cfg.mountpoint);
    let opts = crate::cli::options_string(cfg);
    if !opts.is_empty() {
        cmd.arg("-o").arg(opts);
    }
    cmd.env(READY_FD_ENV, fds[1].to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe; runs in the child before exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot start the daemon: {e}"))?;
    drop(w);
    let mut msg = String::new();
    let _ = std::fs::File::from(r).read_to_string(&mut msg);
    match msg.trim_end() {
        "ok" => Ok(()),
        "" => {
            let status = child.wait().map_err(|e| e.to_string())?;
            Err(format!(
                "the daemon exited before the mount was ready ({status}); run with --foreground to see why"
            ))
        }
        m => {
            let _ = child.wait();
            Err(m.trim_start_matches("error: ").to_string())
        }
    }
}

fn report(ready: &mut Option<OwnedFd>, msg: &str) {
    if let Some(fd) = ready.take() {
        let _ = std::fs::File::from(fd).write_all(msg.as_bytes());
    }
}

/// Checks what is mounted at the mountpoint now: a dead efscache mount (after
/// kill -9) is detached; a live one is refused; anything else (EFS itself)
/// is left alone.
fn clear_dead_mount(mountpoint: &Path) -> Result<(), String> {
    let top = fusemount::top_mount_at(mountpoint).map_err(|e| format!("cannot read mountinfo: {e}"))?;
    let Some(top) = top else { return Ok(()) };
    if !top.is_fuse_subtype(SUBTYPE) {
        return Ok(());
    }
    match std::fs::metadata(mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            tracing::warn!(mountpoint = %mountpoint.display(), "detaching a dead efscache mount");
            fusemount::unmount(mountpoint, true)
                .map_err(|e| format!("cannot detach the dead efscache mount at {}: {e}", mountpoint.display()))
        }
        _ => Err(format!(
            "{} is already served by a running efscache ({}); use `efscache umount {}` first",
            mountpoint.display(),
            top.source,
            mountpoint.display()
        )),
    }
}

fn check_cache_dir(cache: &Path, cfg: &Config) -> Result<(), String> {
    for (what, p) in [("backend", &cfg.backend), ("mountpoint", &cfg.mountpoint)] {
        if cache.starts_with(p) {
            return Err(format!(
                "cache_dir {} lies inside the {what} {}; put it on local disk, e.g. cache_dir=/var/cache/efscache/NAME",
                cache.display(),
                p.display()
            ));
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(cache)
        .map_err(|e| format!("cannot create cache_dir {}: {e}", cache.display()))?;
    let md = std::fs::metadata(cache).map_err(|e| format!("cache_dir {}: {e}", cache.display()))?;
    if !md.is_dir() {
        return Err(format!("cache_dir {} is not a directory", cache.display()));
    }
    // Others able to write there could change staged data or the journal,
    // which this daemon publishes as root: refused, not silently fixed (the
    // directory may be shared on purpose, and only its owner can tell).
    if md.mode() & 0o022 != 0 {
        return Err(format!(
            "cache_dir {} is group/world writable (mode {:04o}): other users could change staged data; \
             make it private with `chmod 700 {}` or choose another cache_dir",
            cache.display(),
            md.mode() & 0o7777,
            cache.display()
        ));
    }
    Ok(())
}

/// Holds an exclusive lock on the cache dir for the life of the daemon: two
/// daemons sharing one journal would corrupt it.
fn lock_cache_dir(cache: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let path = cache.join("lock");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "cache_dir {} is in use by another running efscache; give each mount its own cache_dir",
            cache.display()
        ));
    }
    std::mem::forget(f); // held until the process exits
    Ok(())
}

pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is writable for its length.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return "host".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end])
        .split('.')
        .next()
        .unwrap_or("host")
        .to_string()
}

/// Blocks the termination signals in this thread (and the threads it starts),
/// so one thread can wait for them with sigwait.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn run_daemon(cfg: Config, mut ready: Option<OwnedFd>) -> Result<(), String> {
    let r = start(&cfg, &mut ready);
    match r {
        Ok(mounted) => mounted.run(),
        Err(e) => {
            report(&mut ready, &format!("error: {e}\n"));
            Err(e)
        }
    }
}

struct Running {
    fs: Arc<Fs>,
    sched: Arc<Scheduler>,
    mounted: session::Mounted,
    socket: PathBuf,
}

fn start(cfg: &Config, ready: &mut Option<OwnedFd>) -> Result<Running, String> {
    let sigset = block_signals();
    // SAFETY: umask has no failure mode; created backend objects get exact modes.
    unsafe { libc::umask(0) };
    let md = std::fs::metadata(&cfg.mountpoint);
    match md {
        Ok(m) if !m.is_dir() => return Err(format!("mountpoint {} is not a directory", cfg.mountpoint.display())),
        Err(e) if e.raw_os_error() != Some(libc::ENOTCONN) => {
            return Err(format!("mountpoint {}: {e}", cfg.mountpoint.display()));
        }
        _ => {}
    }
    clear_dead_mount(&cfg.mountpoint)?;
    if cfg.backend != cfg.mountpoint {
        clear_dead_mount(&cfg.backend).ok();
    }
    let md = std::fs::metadata(&cfg.backend).map_err(|e| format!("backend {}: {e}", cfg.backend.display()))?;
    if !md.is_dir() {
        return Err(format!("backend {} is not a directory", cfg.backend.display()));
    }
    // Opened before the mount: afterwards the path means efscache itself.
    let backend =
        PosixBackend::open(&cfg.backend).map_err(|e| format!("cannot open backend {}: {e}", cfg.backend.display()))?;
    let cache = match &cfg.cache_dir {
        Some(c) => {
            // Created if missing (0700), but never inside the backend or the
            // mountpoint: checked on the plain absolute path first.
            let plain = std::path::absolute(c).map_err(|e| format!("cache_dir {}: {e}", c.display()))?;
            if !plain.exists() {
                check_cache_dir(&plain, cfg)?;
            }
            abs(c, "cache_dir")?
        }
        None => default_cache_dir(&cfg.mountpoint),
    };
    check_cache_dir(&cache, cfg)?;
    lock_cache_dir(&cache)?;
    let staging = Staging::open(&cache).map_err(|e| format!("cannot open staging in {}: {e}", cache.display()))?;
    let backend: Arc<dyn Backend> = if cfg.faults.active() {
        tracing::warn!(faults = ?cfg.faults, "backend fault injection is on (a testing option)");
        Arc::new(FaultBackend::new(Box::new(backend), cfg.faults.clone()))
    } else {
        Arc::new(backend)
    };
    let sched = Arc::new(Scheduler::new(
        cfg.dir_concurrency,
        RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        },
    ));
    let instance = format!(
        "{:x}{:x}",
        std::process::id(),
        Instant::now().elapsed().subsec_nanos()
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos())
    );
    let temps = TempNames::new(&hostname(), &instance);
    let root_ino = md.ino(); // the directory just opened (stat'ed before the mount)
    let header = Header {
        backend: cfg.backend.clone(),
        backend_root_ino: root_ino,
        temp_prefix: temps.prefix().to_string(),
    };
    let fs_cfg = FsConfig {
        attr_ttl: cfg.attr_ttl,
        keep_clean: cfg.keep_clean,
        exclusive: cfg.exclusive,
        debounce: cfg.debounce,
        fsync_remote: cfg.fsync == FsyncMode::Remote,
        meta_parallel: cfg.meta_parallel,
        request_timeout: cfg.request_timeout,
        cache_size: cfg.cache_size,
        xattrs: cfg.xattrs,
    };
    let fs = {
        let (dir, watched, sched) = (cache.clone(), backend.clone(), sched.clone());
        let start = move || recovery::start_fs(&dir, watched, staging, sched, temps, header, fs_cfg);
        start_fs_bounded(start, &*backend, &cache, cfg)?
    };
    if !cfg.journal_sync.is_zero() {
        fs.journal()
            .expect("journaling started")
            .spawn_committer(cfg.journal_sync);
    }
    for i in 0..cfg.flushers {
        let fs = fs.clone();
        let nice = cfg.flush_nice;
        std::thread::Builder::new()
            .name(format!("efscache-flush-{i}"))
            .spawn(move || {
                lower_thread_priority(nice);
                fs.run_worker()
            })
            .map_err(|e| e.to_string())?;
    }
    {
        let fs = fs.clone();
        let period = (cfg.debounce / 4).clamp(Duration::from_millis(5), Duration::from_millis(100));
        std::thread::Builder::new()
            .name("efscache-tick".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(period);
                    fs.tick(false);
                }
            })
            .map_err(|e| e.to_string())?;
    }
    let socket = control::socket_path(&cfg.mountpoint);
    let mounted = session::mount(
        fs.clone(),
        &cfg.backend,
        &cfg.mountpoint,
        cfg.io_threads,
        cfg.threads,
        &cfg.fuse_cpus,
    )
    .map_err(|e| format!("cannot mount {}: {e}", cfg.mountpoint.display()))?;
    let handler = control_handler(fs.clone(), cfg.clone());
    control::serve(&socket, handler).map_err(|e| format!("control socket {}: {e}", socket.display()))?;
    signal_thread(sigset, fs.clone(), cfg.clone());
    tracing::info!(backend = %cfg.backend.display(), mountpoint = %cfg.mountpoint.display(), cache = %cache.display(), "mounted");
    report(ready, "ok\n");
    Ok(Running {
        fs,
        sched,
        mounted,
        socket,
    })
}

impl Running {
    fn run(self) -> Result<(), String> {
        let served = self.mounted.serve();
        // Unmounted: by us after a drain (SIGTERM, `efscache umount`) or from
        // outside. What is not on the backend yet stays in the journal for the
        // next mount (which must be able to start at once, so no draining
        // here): stop taking ops and let the running ones finish.
        self.sched.set_paused(true);
        if !self
            .sched
            .wait_running_done(Some(Instant::now() + Duration::from_secs(60)))
        {
            tracing::warn!("backend ops still running after 60s; they are redone by the next mount");
        }
        let status = self.fs.status();
        let left = self.sched.queued() + status.dirty_files + status.dirty_dirs;
        if left > 0 {
            tracing::warn!(
                left,
                "unmounted with changes not yet on the backend; they stay in the journal and the next mount publishes them"
            );
        }
        for f in self.sched.failures() {
            tracing::error!(op = %f.op, path = %f.path, error = %f.error, "not published");
        }
        if left == 0 {
            match self.fs.reset_unhealthy_journal() {
                Ok(true) => tracing::warn!(
                    "the journal, which stopped at a failed write, was replaced with an empty one: everything is on the backend"
                ),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot replace the journal that stopped at a failed write; the next mount replays it")
                }
            }
        } else if self.fs.journal().is_some_and(|j| !j.healthy()) {
            tracing::error!(
                "the journal stopped at a failed write and changes are left: the next mount replays what it holds, and reports what it cannot place (see cache_dir/lost+found)"
            );
        }
        if let Some(j) = self.fs.journal()
            && j.healthy()
            && let Err(e) = j.sync()
        {
            tracing::error!(error = %e, "cannot sync the journal");
        }
        self.fs.drop_clean_copies();
        self.sched.shutdown();
        let _ = std::fs::remove_file(&self.socket);
        served.map_err(|e| format!("FUSE session ended with an error: {e}"))
    }
}

/// Lowers the calling thread's CPU priority by `steps` nice steps (Linux
/// keeps a nice value per thread). The flush workers run behind the threads
/// that answer applications: on a machine with few cores, rsync and the FUSE
/// threads get the CPU first and publishing uses what is left. With 2 cores
/// that made both the copy and the time until it was on the backend shorter
/// (docs/BENCHMARKS.md, "Publishing at a lower CPU priority").
fn lower_thread_priority(steps: usize) {
    if steps == 0 {
        return;
    }
    // SAFETY: getpriority/setpriority on the calling thread's own id; errno
    // is cleared first because -1 is also a valid priority.
    let (now, err) = unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        let err = *libc::__errno_location();
        if err == 0 {
            let want = (now + steps as i32).min(19);
            if libc::setpriority(libc::PRIO_PROCESS, tid, want) == 0 {
                return;
            }
        }
        (now, std::io::Error::last_os_error())
    };
    tracing::warn!(nice = now, %err, "cannot lower the flush worker's CPU priority; publishing competes with applications for CPU");
}

/// Starts the filesystem (probing the backend and recovering the last run's
/// journal). A backend that answers nothing for `request_timeout` (an EFS
/// outage) fails the mount with a message instead of hanging it, and the
/// journal stays for the next attempt; a long recovery that keeps getting
/// answers takes as long as it needs. (A thread left waiting on the backend
/// ends with the process.)
fn start_fs_bounded(
    start: impl FnOnce() -> Result<Arc<Fs>, String> + Send + 'static,
    watched: &dyn Backend,
    cache: &Path,
    cfg: &Config,
) -> Result<Arc<Fs>, String> {
    let (tx, rx) = crossbeam::channel::bounded(1);
    std::thread::Builder::new()
        .name("efscache-start".into())
        .spawn(move || {
            let _ = tx.send(start());
        })
        .map_err(|e| format!("cannot start: {e}"))?;
    let mut answered = watched.stats().snapshot().total();
    loop {
        match rx.recv_timeout(cfg.request_timeout) {
            Ok(started) => return started,
            Err(crossbeam::channel::RecvTimeoutError::Disconnected) => {
                return Err("the start-up thread ended without a result".into());
            }
            Err(crossbeam::channel::RecvTimeoutError::Timeout) => {
                let now = watched.stats().snapshot().total();
                if now == answered {
                    break;
                }
                answered = now;
                tracing::info!(
                    backend_requests = now,
                    "still starting: the backend answers, recovery goes on"
                );
            }
        }
    }
    Err(format!(
        "the backend {} did not answer within {} (request_timeout) while the mount was starting; \
         nothing was mounted and nothing is lost (pending work stays in {}); mount again once the backend answers",
        cfg.backend.display(),
        crate::status::human_duration(cfg.request_timeout),
        cache.display()
    ))
}

/// Drains (bounded) and unmounts the mount this daemon serves (on SIGTERM).
fn drain_and_unmount(fs: &Fs, cfg: &Config) {
    let report = fs.sync_after_closes(Some(Instant::now() + cfg.drain_timeout));
    if !report.complete {
        tracing::warn!("drain timed out; pending work stays queued until the daemon exits");
    }
    if let Err(e) = unmount(&cfg.mountpoint) {
        tracing::error!(error = %e, "cannot unmount on signal");
    }
}

/// Unmounts an efscache mount at `mountpoint` (never anything else there).
pub fn unmount(mountpoint: &Path) -> Result<(), String> {
    match fusemount::unmount_if_ours(mountpoint, SUBTYPE, None, false) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!("the top mount at {} is not efscache", mountpoint.display())),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(format!(
            "{} is busy: a process still uses the mount (see `fuser -vm {}`)",
            mountpoint.display(),
            mountpoint.display()
        )),
        Err(e) => Err(format!("cannot unmount {}: {e}", mountpoint.display())),
    }
}

fn control_handler(fs: Arc<Fs>, cfg: Config) -> Arc<dyn Fn(Request) -> serde_json::Value + Send + Sync> {
    let started = Instant::now();
    Arc::new(move |req| match req {
        Request::Status => crate::status::collect(&fs, &cfg, started, &fs.recovery_status()),
        Request::Sync { timeout_ms } => {
            let deadline = timeout_ms.map(|ms| Instant::now() + Duration::from_millis(ms));
            serde_json::to_value(fs.sync_after_closes(deadline)).expect("report serializes")
        }
        Request::Drain { timeout_ms } => {
            let limit = timeout_ms.map_or(cfg.drain_timeout, Duration::from_millis);
            serde_json::to_value(fs.sync_after_closes(Some(Instant::now() + limit))).expect("report serializes")
        }
    })
}

fn signal_thread(set: libc::sigset_t, fs: Arc<Fs>, cfg: Config) {
    let _ = std::thread::Builder::new()
        .name("efscache-signals".into())
        .spawn(move || {
            loop {
                let mut sig = 0;
                // SAFETY: set holds the signals blocked in every thread; sig is a valid out-pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                // Once the session has ended (unmounted from outside, e.g. by
                // systemd before it signals the unit), there is nothing to
                // drain into: the daemon is already finishing up.
                if fs.sched.is_paused() {
                    tracing::info!(signal = sig, "already unmounted; exiting once running ops are done");
                    continue;
                }
                tracing::info!(signal = sig, "draining and unmounting");
                drain_and_unmount(&fs, &cfg);
            }
        });
}
