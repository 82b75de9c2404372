//! efscache as mount(8)'s and umount(8)'s helper (`mount.efscache`,
//! `umount.efscache`, the same binary under other names), its record in
//! /run/mount/utab so that a plain `umount` drains first, and `efscache
//! install` (binary, helper links, systemd unit).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::cli::{self, Helper};
use crate::{config, fuse, run};

const UNIT: &str = include_str!("../mount-helpers/efscache@.service");
const UNIT_NAME: &str = "efscache@.service";
const UNIT_BIN: &str = "/usr/local/bin/efscache";

fn io_err(p: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", p.display())
}

/// Writes `data` to `dst` through a temp file in the same directory and a
/// rename (a running binary is replaced, never rewritten in place).
fn replace_file(dst: &Path, data: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dst.with_file_name(format!(".efscache-install.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, dst)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", dst.display())
    })
}

/// `efscache install` (or `--uninstall`): the binary, the mount helpers and
/// the systemd unit, all below `root`.
pub(crate) fn install(
    root: &Path,
    bindir: &Path,
    sbindir: &Path,
    unitdir: &Path,
    uninstall: bool,
) -> Result<i32, String> {
    for d in [bindir, sbindir, unitdir] {
        if !d.is_absolute() {
            return Err(format!("{} must be an absolute path", d.display()));
        }
    }
    let under = |p: &Path| root.join(p.strip_prefix("/").expect("absolute"));
    let bin_target = bindir.join("efscache");
    let bin = under(&bin_target);
    let helpers: Vec<PathBuf> = cli::MOUNT_HELPERS
        .iter()
        .chain(&cli::UMOUNT_HELPERS)
        .map(|h| under(sbindir).join(h))
        .collect();
    let unit = under(unitdir).join(UNIT_NAME);
    if uninstall {
        for h in &helpers {
            // Only links to our binary: anything else there is not ours.
            if std::fs::read_link(h).is_ok_and(|t| t == bin_target) {
                std::fs::remove_file(h).map_err(io_err(h))?;
                println!("removed {}", h.display());
            }
        }
        if std::fs::read_to_string(&unit).is_ok_and(|u| u.contains("efscache mount --foreground")) {
            std::fs::remove_file(&unit).map_err(io_err(&unit))?;
            println!("removed {}", unit.display());
        }
        if bin.exists() {
            std::fs::remove_file(&bin).map_err(io_err(&bin))?;
            println!("removed {}", bin.display());
        }
        println!(
            "cache dirs (/var/cache/efscache, cache_dir=) are left alone: remove them only when `efscache status` showed nothing pending before the unmount"
        );
        return Ok(0);
    }
    for d in [bin.parent(), helpers[0].parent(), unit.parent()].into_iter().flatten() {
        std::fs::create_dir_all(d).map_err(io_err(d))?;
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let same = |a: &Path, b: &Path| {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
    };
    if same(&exe, &bin) {
        println!("{} is this binary already", bin.display());
    } else {
        let data = std::fs::read(&exe).map_err(io_err(&exe))?;
        if std::fs::read(&bin).is_ok_and(|old| old == data) {
            println!("{} is up to date", bin.display());
        } else {
            replace_file(&bin, &data, 0o755)?;
            println!("installed {}", bin.display());
        }
    }
    for h in &helpers {
        if std::fs::read_link(h).is_ok_and(|t| t == bin_target) {
            continue;
        }
        let tmp = h.with_file_name(format!(".efscache-install.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&bin_target, &tmp)
            .and_then(|()| std::fs::rename(&tmp, h))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                format!("cannot link {}: {e}", h.display())
            })?;
        println!("linked {} -> {}", h.display(), bin_target.display());
    }
    let unit_text = UNIT.replace(UNIT_BIN, &bin_target.to_string_lossy());
    if std::fs::read_to_string(&unit).ok().as_deref() != Some(unit_text.as_str()) {
        replace_file(&unit, unit_text.as_bytes(), 0o644)?;
        println!("wrote {}", unit.display());
        if root == Path::new("/") && Path::new("/run/systemd/system").exists() {
            println!("run `systemctl daemon-reload` to load it");
        }
    }
    Ok(0)
}

/// Runs efscache called as a mount(8) or umount(8) helper; `args` are the
/// arguments after argv[0].
pub fn helper_main(helper: Helper, args: &[OsString]) -> Result<i32, String> {
    match helper {
        Helper::Mount => mount_helper(args),
        Helper::Umount => umount_helper(args),
    }
}

/// Quotes a word for a shell command line shown to the user.
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-=,:+@%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// What `mount -f` checks without mounting: the mount would get this far.
fn fake_check(cfg: &config::Config) -> Result<(), String> {
    let dir = |p: &Path, what: &str| match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{what} {} is not a directory", p.display())),
        Err(e) => Err(format!("{what} {}: {e}", p.display())),
    };
    dir(&cfg.backend, "backend")?;
    if let Some(top) = fusemount::top_mount_at(&cfg.mountpoint).ok().flatten()
        && top.is_fuse_subtype(fuse::session::SUBTYPE)
        && std::fs::metadata(&cfg.mountpoint).is_ok()
    {
        return Err(format!(
            "{} is already served by a running efscache ({})",
            cfg.mountpoint.display(),
            top.source
        ));
    }
    dir(&cfg.mountpoint, "mountpoint")?;
    if let Some(c) = &cfg.cache_dir {
        for (what, p) in [("backend", &cfg.backend), ("mountpoint", &cfg.mountpoint)] {
            if c.starts_with(p) {
                return Err(format!(
                    "cache_dir {} lies inside the {what} {}",
                    c.display(),
                    p.display()
                ));
            }
        }
    }
    Ok(())
}

/// `mount.efscache SOURCE DIR [-sfnv] [-o OPTIONS]`: mounts like `efscache
/// mount` (returns once the mount serves requests).
fn mount_helper(args: &[OsString]) -> Result<i32, String> {
    let a = cli::parse_mount_helper(args)?;
    let (mut cfg, skipped) = cli::helper_config(&a)?;
    for o in &skipped {
        eprintln!("mount.efscache: ignoring unknown option '{o}' (-s)");
    }
    cfg.backend =
        fusemount::absolute_mount_path(&cfg.backend).map_err(|e| format!("backend {}: {e}", cfg.backend.display()))?;
    cfg.mountpoint = fusemount::absolute_mount_path(&cfg.mountpoint)
        .map_err(|e| format!("mountpoint {}: {e}", cfg.mountpoint.display()))?;
    let opts = cli::options_string(&cfg);
    let cmd = format!(
        "efscache mount {} {}{}",
        sh_quote(&cfg.backend.to_string_lossy()),
        sh_quote(&cfg.mountpoint.to_string_lossy()),
        if opts.is_empty() {
            String::new()
        } else {
            format!(" -o {}", sh_quote(&opts))
        }
    );
    if a.fake {
        fake_check(&cfg)?;
        println!("mount.efscache: would run: {cmd}");
        return Ok(0);
    }
    if a.verbose {
        println!("mount.efscache: running: {cmd}");
    }
    crate::init_logging(cfg.log_file.as_deref());
    let (backend, mp) = (cfg.backend.clone(), cfg.mountpoint.clone());
    run::mount(cfg)?;
    if !a.no_mtab {
        register_umount_helper(&backend, &mp);
    }
    if a.verbose {
        println!("mount.efscache: {} is mounted and serving", mp.display());
    }
    Ok(0)
}

/// `umount.fuse.efscache DIR [-flnrv]`: drains (bounded by the mount's
/// drain_timeout) and unmounts, like `efscache umount`. `-f` and `-l` skip
/// the drain (pending work stays in the journal for the next mount); `-l`
/// detaches lazily.
fn umount_helper(args: &[OsString]) -> Result<i32, String> {
    let a = cli::parse_umount_helper(args)?;
    crate::init_logging(None);
    let mp = crate::mountpoint(&a.dir)?;
    if a.force || a.lazy {
        return match fusemount::unmount_if_ours(&mp, fuse::session::SUBTYPE, None, a.lazy) {
            Ok(true) => {
                if a.verbose {
                    println!(
                        "umount.efscache: {} unmounted without draining; pending work stays in the journal",
                        mp.display()
                    );
                }
                Ok(0)
            }
            Ok(false) => Err(format!("{} is not an efscache mount", mp.display())),
            Err(e) => Err(format!("cannot unmount {}: {e}", mp.display())),
        };
    }
    let code = crate::umount(&mp, None)?;
    if a.verbose {
        println!("umount.efscache: {} drained and unmounted", mp.display());
    }
    Ok(code)
}

/// libmount's table of userspace mount options.
const UTAB: &str = "/run/mount/utab";
/// Where umount(8) looks for `umount.<helper>`.
const UMOUNT_HELPER: &str = "/sbin/umount.efscache";

/// libmount's escaping of a utab field (space, tab, newline, backslash).
fn utab_escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            ' ' | '\t' | '\n' | '\\' => format!("\\{:03o}", c as u32),
            c => c.to_string(),
        })
        .collect()
}

/// The utab lines naming `helper=efscache` for `target` (and `source`, when given).
fn utab_helper_lines(utab: &str, source: Option<&str>, target: &Path) -> usize {
    let target = format!("TARGET={}", utab_escape(&target.to_string_lossy()));
    let source = source.map(|s| format!("SRC={}", utab_escape(s)));
    utab.lines()
        .filter(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.contains(&target.as_str())
                && source.as_deref().is_none_or(|s| f.contains(&s))
                && f.iter().any(|x| {
                    x.strip_prefix("OPTS=")
                        .is_some_and(|o| o.split(',').any(|o| o == "helper=efscache"))
                })
        })
        .count()
}

/// Records `helper=efscache` for the new mount in /run/mount/utab (through
/// `mount --fake`, as libfuse does), so that a plain `umount MOUNTPOINT` runs
/// `umount.efscache`, which drains first: for a FUSE mount umount(8) reads the
/// type with statfs(2) ("fuse", no subtype) and would otherwise never look for
/// `umount.fuse.efscache`. Best effort: without it `umount` still works, it
/// just leaves pending work to the journal instead of draining.
pub(crate) fn register_umount_helper(backend: &Path, mp: &Path) {
    if !Path::new(UMOUNT_HELPER).exists() {
        return; // not installed: umount(8) could not run it
    }
    let source = fuse::session::fsname(backend);
    let utab = std::fs::read_to_string(UTAB).unwrap_or_default();
    if utab_helper_lines(&utab, Some(&source), mp) > 0 {
        return; // left by an earlier mount of the same backend here: it applies
    }
    let out = std::process::Command::new("mount")
        .args([
            "--no-canonicalize",
            "-i",
            "-f",
            "-t",
            "fuse.efscache",
            "-o",
            "helper=efscache",
        ])
        .arg(&source)
        .arg(mp)
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "efscache: warning: cannot record the umount helper for {} ({}); `efscache umount` still drains",
            mp.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!(
            "efscache: warning: cannot run mount(8) to record the umount helper for {}: {e}",
            mp.display()
        ),
    }
}

/// Drops the utab entries `register_umount_helper` made for `mp` (while it is
/// still mounted: `umount --fake` needs the mount to find them).
pub(crate) fn unregister_umount_helper(mp: &Path) {
    let utab = std::fs::read_to_string(UTAB).unwrap_or_default();
    for _ in 0..utab_helper_lines(&utab, None, mp) {
        let ok = std::process::Command::new("umount")
            .args(["--fake", "-i", "-c"])
            .arg(mp)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utab_lines_are_matched_by_target_source_and_helper() {
        let utab = "SRC=efscache:/b TARGET=/m ROOT=/ OPTS=helper=efscache\n\
                    SRC=efscache:/b TARGET=/m\\040x ROOT=/ OPTS=x,helper=efscache\n\
                    SRC=/dev/sda1 TARGET=/m ROOT=/ OPTS=helper=udisks2\n\
                    SRC=efscache:/c TARGET=/m ROOT=/ OPTS=helper=efscache\n";
        assert_eq!(utab_helper_lines(utab, Some("efscache:/b"), Path::new("/m")), 1);
        assert_eq!(utab_helper_lines(utab, None, Path::new("/m")), 2);
        assert_eq!(utab_helper_lines(utab, Some("efscache:/b"), Path::new("/m x")), 1);
        assert_eq!(utab_helper_lines(utab, Some("efscache:/d"), Path::new("/m")), 0);
        assert_eq!(sh_quote("/a/b,c=d"), "/a/b,c=d");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
    }
}
