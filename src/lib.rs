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
pub mod journal;
pub mod meta;
pub mod namespace;
pub mod recovery;
pub mod run;
pub mod staging;
pub mod status;

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

fn mountpoint(p: &Path) -> Result<std::path::PathBuf, String> {
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
            run::mount(cfg)?;
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
        Cmd::Status { mountpoint: mp, json } => {
            init_logging(None);
            let v = control::call(&mountpoint(&mp)?, &control::Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            } else {
                print!("{}", status::render(&v));
            }
            Ok(0)
        }
        Cmd::Umount {
            mountpoint: mp,
            timeout,
        } => {
            init_logging(None);
            umount(&mountpoint(&mp)?, timeout_ms(&timeout)?)
        }
        Cmd::Demo { files, keep } => {
            init_logging(None);
            demo::run(files, keep)
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

fn umount(mp: &Path, timeout_ms: Option<u64>) -> Result<i32, String> {
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
