//! efscache: a write-back FUSE cache that makes rsync and other small-file
//! writers fast and safe on AWS EFS. See docs/ARCHITECTURE.md for a map.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod error;
pub mod flush;
pub mod fs;
pub mod fuse;
pub mod helpers;
pub mod journal;
pub mod meta;
pub mod metrics;
pub mod name;
pub mod namespace;
pub mod recovery;
pub mod repair;
pub mod run;
pub mod scrub;
pub mod staging;
pub mod status;
pub mod xattr;

use std::path::Path;
use std::time::Duration;

use cli::{Cli, Cmd};

/// Sets up logging: quiet by default (warnings and errors), `EFSCACHE_LOG` or
/// `RUST_LOG` take tracing filter directives (e.g. `EFSCACHE_LOG=debug`).
pub fn init_logging(log_file: Option<&Path>) {
    let filter = std::env::var("EFSCACHE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(filter));
    match log_file.and_then(|p| std::fs::OpenOptions::new().create(true).append(true).open(p).ok()) {
        Some(f) => {
            let _ = builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(f))
                .try_init();
        }
        None => {
            let _ = builder.with_writer(std::io::stderr).try_init();
        }
    }
}

fn timeout_ms(t: &Option<String>) -> Result<Option<u64>, String> {
    t.as_deref()
        .map(|v| config::parse_duration("--timeout", v).map(|d| d.as_millis() as u64))
        .transpose()
}

pub(crate) fn mountpoint(p: &Path) -> Result<std::path::PathBuf, String> {
    fusemount::absolute_mount_path(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// Runs a parsed command line; the error is the one-line message to print.
pub fn main_with(cli: Cli) -> Result<i32, String> {
    match cli.cmd {
        Cmd::Mount {
            backend,
            mountpoint,
            options,
            foreground,
        } => {
            let cfg = cli::mount_config(backend, mountpoint, &options, foreground)?;
            init_logging(cfg.log_file.as_deref());
            let foreground = cfg.foreground;
            let (backend, mp) = (cfg.backend.clone(), cfg.mountpoint.clone());
            run::mount(cfg)?;
            if !foreground {
                helpers::register_umount_helper(&backend, &mp);
            }
            Ok(0)
        }
        Cmd::Sync {
            mountpoint: mp,
            timeout,
        } => {
            init_logging(None);
            let v = control::call(
                &mountpoint(&mp)?,
                &control::Request::Sync {
                    timeout_ms: timeout_ms(&timeout)?,
                },
            )?;
            Ok(print_sync(&v))
        }
        Cmd::Metrics {
            mountpoint: mp,
            textfile,
        } => {
            init_logging(None);
            let v = status_call(&mountpoint(&mp)?, None)?;
            let text = metrics::prometheus(&v);
            match textfile {
                None => print!("{text}"),
                Some(path) => {
                    let tmp = path.with_extension("prom.tmp");
                    std::fs::write(&tmp, &text)
                        .and_then(|()| std::fs::rename(&tmp, &path))
                        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                }
            }
            Ok(0)
        }
        Cmd::Status {
            mountpoint: mp,
            json,
            watch,
            until_drained,
            interval,
            wait,
            wait_pid,
        } => {
            init_logging(None);
            let wait = wait
                .map(|w| cli::parse_cli_duration("--wait", &w))
                .transpose()?
                .map(|d| (d, wait_pid));
            let mp = mountpoint(&mp)?;
            if watch || until_drained {
                let interval = cli::parse_cli_duration("--interval", &interval)?;
                return watch_status(&mp, json, until_drained, interval, wait);
            }
            let v = status_call(&mp, wait)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            } else {
                print!("{}", status::render(&v));
            }
            Ok(0)
        }
        Cmd::Scrub {
            path,
            json,
            fix,
            purge_rsync_temps,
            cache_dir,
            older_than,
            min_idle,
            threads,
            quiet,
        } => {
            init_logging(None);
            let opts = scrub::Options {
                older_than: cli::parse_cli_duration("--older-than", &older_than)?,
                min_idle: cli::parse_cli_duration("--min-idle", &min_idle)?,
                fix,
                purge_rsync_temps,
                cache_dir,
                threads: threads.clamp(1, 256),
                now: std::time::SystemTime::now(),
            };
            run_scrub(&path, &opts, json, quiet)
        }
        Cmd::Install {
            root,
            bindir,
            sbindir,
            unitdir,
            uninstall,
        } => helpers::install(&root, &bindir, &sbindir, &unitdir, uninstall),
        Cmd::Umount {
            mountpoint: mp,
            timeout,
        } => {
            init_logging(None);
            umount(&mountpoint(&mp)?, timeout_ms(&timeout)?)
        }
        Cmd::Demo {
            files,
            tree,
            profile,
            keep,
        } => {
            init_logging(None);
            demo::run(files, tree.as_deref(), &profile, keep)
        }
    }
}

/// Prints a sync report; returns the exit code (1 when something failed or
/// the deadline passed).
fn print_sync(v: &serde_json::Value) -> i32 {
    let mut code = 0;
    if v["complete"] != serde_json::Value::Bool(true) {
        eprintln!("efscache: sync timed out with work still pending (see `efscache status`)");
        code = 1;
    }
    if let Some(f) = v["failures"].as_array() {
        for x in f {
            eprintln!(
                "efscache: not published: {} ({} failed: {})",
                x["path"].as_str().unwrap_or("?"),
                x["op"].as_str().unwrap_or("?"),
                x["error"].as_str().unwrap_or("?")
            );
            code = 1;
        }
    }
    if let Some(o) = v["open_files"].as_array() {
        for x in o {
            eprintln!(
                "efscache: still open for writing (published after close): {}",
                x.as_str().unwrap_or("?")
            );
        }
    }
    code
}

/// `efscache umount`, and the umount(8) helper.
pub(crate) fn umount(mp: &Path, timeout_ms: Option<u64>) -> Result<i32, String> {
    let mounted = |mp: &Path| {
        fusemount::top_mount_at(mp)
            .ok()
            .flatten()
            .is_some_and(|m| m.is_fuse_subtype(fuse::session::SUBTYPE))
    };
    if !mounted(mp) {
        return Err(format!("{} is not an efscache mount", mp.display()));
    }
    let code = match control::call(mp, &control::Request::Drain { timeout_ms }) {
        Ok(v) => print_sync(&v),
        Err(e) => {
            // No daemon (killed): detach the dead mount; pending work stays in
            // the cache dir for the next mount.
            fusemount::unmount(mp, true).map_err(|e2| format!("{e}; detaching failed too: {e2}"))?;
            eprintln!(
                "efscache: the daemon was not running; detached the dead mount at {}",
                mp.display()
            );
            return Ok(0);
        }
    };
    // While still mounted (umount --fake needs the mount); when umount(8)
    // called us, it then drops its own entry for the mount.
    helpers::unregister_umount_helper(mp);
    run::unmount(mp)?;
    // The daemon finishes and exits once the kernel ends the session.
    for _ in 0..200 {
        if !mounted(mp) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(code)
}

/// One status request; with `wait` (how long, and optionally the pid of the
/// starting daemon), retries until the daemon answers, the time has passed
/// or that process has exited.
fn status_call(mp: &Path, wait: Option<(Duration, Option<u32>)>) -> Result<serde_json::Value, String> {
    let deadline = wait.map(|(w, _)| std::time::Instant::now() + w);
    let pid = wait.and_then(|(_, p)| p);
    loop {
        match control::call(mp, &control::Request::Status) {
            Ok(v) => return Ok(v),
            Err(e) if deadline.is_none_or(|d| std::time::Instant::now() >= d) => return Err(e),
            Err(e) if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) => {
                return Err(format!(
                    "process {} exited before the mount was ready: {e}",
                    pid.unwrap_or(0)
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `efscache status --watch` / `--until-drained`: redraws every `interval`
/// (one JSON object per line with `json`). Returns 0 once drained without
/// failures, 1 when drained with failures; runs until interrupted otherwise.
fn watch_status(
    mp: &Path,
    json: bool,
    until_drained: bool,
    interval: Duration,
    wait: Option<(Duration, Option<u32>)>,
) -> Result<i32, String> {
    use std::io::Write;
    let interval = interval.max(Duration::from_millis(100));
    // SAFETY: isatty only inspects the fd.
    let tty = unsafe { libc::isatty(libc::STDOUT_FILENO) } == 1;
    let mut rates = status::Rates::default();
    let mut v = status_call(mp, wait)?;
    loop {
        rates.update(std::time::Instant::now(), &v);
        let mut out = std::io::stdout().lock();
        let written = if json {
            writeln!(out, "{v}")
        } else if tty {
            // Clear the screen and draw the frame from the top, like watch(1).
            write!(out, "\x1b[H\x1b[2J{}", status::render_watch(&v, &rates))
        } else {
            writeln!(out, "{}", status::render_watch(&v, &rates))
        };
        if written.and_then(|()| out.flush()).is_err() {
            return Ok(0); // stdout closed (e.g. piped into head)
        }
        drop(out);
        if until_drained && status::is_drained(&v) {
            return Ok(if v["failed"].as_u64().unwrap_or(0) > 0 { 1 } else { 0 });
        }
        std::thread::sleep(interval);
        v = control::call(mp, &control::Request::Status)
            .map_err(|e| format!("the daemon stopped answering (unmounted?): {e}"))?;
    }
}

/// `efscache scrub`: prints the report (a progress line on a terminal while
/// walking); the exit code is the report's.
fn run_scrub(path: &Path, opts: &scrub::Options, json: bool, quiet: bool) -> Result<i32, String> {
    use std::sync::atomic::Ordering;
    let counters = scrub::Counters::default();
    // SAFETY: isatty only inspects the fd.
    let tty = unsafe { libc::isatty(libc::STDERR_FILENO) } == 1;
    let done = std::sync::atomic::AtomicBool::new(false);
    let report = std::thread::scope(|s| {
        if tty && !quiet {
            s.spawn(|| {
                let bar = indicatif::ProgressBar::new_spinner();
                bar.enable_steady_tick(Duration::from_millis(120));
                while !done.load(Ordering::Relaxed) {
                    bar.set_message(format!(
                        "{} directories, {} files; {} found, {} removed",
                        counters.dirs.load(Ordering::Relaxed),
                        counters.files.load(Ordering::Relaxed),
                        counters.found.load(Ordering::Relaxed),
                        counters.removed.load(Ordering::Relaxed)
                    ));
                    std::thread::sleep(Duration::from_millis(100));
                }
                bar.finish_and_clear();
            });
        }
        let r = scrub::scrub(path, opts, &counters);
        done.store(true, Ordering::Relaxed);
        r
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report).expect("report serializes"));
    } else {
        print!("{}", scrub::render(&report, opts.now, 50));
    }
    Ok(report.exit_code())
}

/// The systemd template unit, with `/usr/local/bin/efscache` standing for
/// the installed binary.
pub use helpers::helper_main;
