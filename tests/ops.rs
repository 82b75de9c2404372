//! Operations, with real mounts: `efscache install`, the mount(8)/umount(8)
//! helpers driven through fstab, `mount -t efscache` and `umount`, bad
//! options, the systemd unit, the SIGTERM drain the unit relies on, and
//! `status --watch`. Every mount is undone by a guard, also when a test fails.
//!
//! These tests install efscache for real (the binary under test into
//! /usr/local/bin, helper links into /sbin, the unit into
//! /etc/systemd/system): mount(8) only looks for helpers in /sbin. The
//! install is idempotent, so running the tests again is harmless.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;

/// Installs efscache into the real root once per test run.
fn install_for_real() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        run(Command::new(BIN).arg("install"));
    });
}

fn out(cmd: &mut Command) -> Output {
    cmd.output().expect("run command")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn efscache_mounts_at(p: &Path) -> usize {
    fusemount::mountinfo()
        .unwrap()
        .iter()
        .filter(|m| m.mount_point == p && m.is_fuse_subtype("efscache"))
        .count()
}

/// Undoes a mount made through mount(8): `efscache umount` if the test did
/// not get to unmount, else a lazy detach. Never touches anything that is not
/// efscache at that path.
struct HelperMount {
    mp: PathBuf,
}

impl Drop for HelperMount {
    fn drop(&mut self) {
        if is_efscache_mounted(&self.mp) {
            let ok = Command::new(BIN)
                .args(["umount", "--timeout", "10s"])
                .arg(&self.mp)
                .status()
                .is_ok_and(|s| s.success());
            if !ok && is_efscache_mounted(&self.mp) {
                let _ = fusemount::unmount(&self.mp, true);
            }
        }
    }
}

fn daemon_pid(mp: &Path) -> u32 {
    let v: serde_json::Value =
        serde_json::from_str(&run(Command::new(BIN).args(["status", "--json"]).arg(mp))).unwrap();
    v["pid"].as_u64().expect("pid in status") as u32
}

/// Waits (bounded) for a process that is not our child to go away.
fn wait_gone(pid: u32) {
    let t = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "daemon {pid} still running after the unmount"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn install_into_a_root_is_complete_idempotent_and_undone_by_uninstall() {
    let s = Scratch::new();
    let root = s.path("root");
    for _ in 0..2 {
        run(Command::new(BIN).arg("install").arg("--root").arg(&root));
    }
    let bin = root.join("usr/local/bin/efscache");
    assert_eq!(std::fs::read(&bin).unwrap(), std::fs::read(BIN).unwrap());
    assert_eq!(std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777, 0o755);
    for h in [
        "mount.efscache",
        "mount.fuse.efscache",
        "umount.efscache",
        "umount.fuse.efscache",
    ] {
        assert_eq!(
            std::fs::read_link(root.join("sbin").join(h)).unwrap(),
            Path::new("/usr/local/bin/efscache"),
            "{h}"
        );
    }
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/efscache@.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/efscache mount --foreground ${BACKEND} %f -o ${OPTIONS}"));
    let leftovers: Vec<_> = walk(&root)
        .into_iter()
        .filter(|(p, _)| p.to_string_lossy().contains(".efscache-install"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");

    // Another bindir: links and unit follow it.
    run(Command::new(BIN)
        .args(["install", "--bindir", "/opt/efscache/bin", "--root"])
        .arg(&root));
    assert_eq!(
        std::fs::read_link(root.join("sbin/mount.efscache")).unwrap(),
        Path::new("/opt/efscache/bin/efscache")
    );
    run(Command::new(BIN)
        .args(["install", "--uninstall", "--bindir", "/opt/efscache/bin", "--root"])
        .arg(&root));
    assert!(!root.join("sbin/mount.efscache").exists());
    assert!(!root.join("etc/systemd/system/efscache@.service").exists());
    assert!(!root.join("opt/efscache/bin/efscache").exists());
    assert!(bin.exists(), "uninstall removes only what the given layout names");
}

/// An fstab line mounts through mount.efscache; mount returns once the mount
/// serves; a plain `umount` runs the umount helper, which drains before
/// unmounting (with debounce=1h nothing would be published otherwise).
#[test]
fn fstab_mount_serves_and_plain_umount_drains() {
    install_for_real();
    let s = Scratch::new();
    let (b, mp) = (s.path("backend"), s.path("mnt"));
    let fstab = s.path("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# efscache over a plain directory\n{} {} efscache cache_dir={},flushers=8,debounce=1h,_netdev,nofail,x-systemd.requires-mounts-for={} 0 0\n",
            b.display(),
            mp.display(),
            s.path("cache").display(),
            b.display()
        ),
    )
    .unwrap();
    let _guard = HelperMount { mp: mp.clone() };
    run(Command::new("mount").arg("-T").arg(&fstab).arg(&mp));
    // mount(8) returned: the mount serves requests now.
    std::fs::write(mp.join("first"), b"one").unwrap();
    assert_eq!(efscache_mounts_at(&mp), 1);
    run(Command::new(BIN).arg("sync").arg(&mp));
    assert_eq!(std::fs::read(b.join("first")).unwrap(), b"one");

    std::fs::create_dir(mp.join("d")).unwrap();
    std::fs::write(mp.join("d/second"), b"two").unwrap();
    assert!(
        !b.join("d/second").exists(),
        "debounce=1h: nothing published before the drain"
    );
    let pid = daemon_pid(&mp);
    run(Command::new("umount").arg(&mp));
    assert_eq!(efscache_mounts_at(&mp), 0, "still in mountinfo after umount");
    assert_eq!(
        std::fs::read(b.join("d/second")).unwrap(),
        b"two",
        "umount did not drain"
    );
    wait_gone(pid);
    let utab = std::fs::read_to_string("/run/mount/utab").unwrap_or_default();
    assert!(
        !utab.contains(&format!("TARGET={} ", mp.display())),
        "umount left the utab entry: {utab}"
    );
}

/// `efscache mount` given relative paths records the mount for umount(8)
/// under its absolute path (as mountinfo has it), so a plain `umount`
/// still runs the helper and drains; the daemon, which does not keep the
/// working directory, uses the cache dir the relative path named.
#[test]
fn relative_paths_still_let_a_plain_umount_drain() {
    install_for_real();
    let s = Scratch::new();
    let mp = s.path("mnt");
    let _guard = HelperMount { mp: mp.clone() };
    run(Command::new(BIN)
        .args(["mount", "-o", "cache_dir=cache,debounce=1h", "backend", "mnt"])
        .current_dir(s.path("")));
    std::fs::write(mp.join("f"), b"data").unwrap();
    let canon = |p: &str| std::fs::canonicalize(s.path(p)).unwrap();
    assert!(
        canon("cache").join("journal").exists(),
        "the cache dir is not where the path named"
    );
    let utab = std::fs::read_to_string("/run/mount/utab").unwrap_or_default();
    assert!(
        utab.contains(&format!("TARGET={} ", canon("mnt").display())),
        "no absolute utab entry: {utab}"
    );
    run(Command::new("umount").arg(&mp));
    assert_eq!(efscache_mounts_at(&canon("mnt")), 0);
    assert_eq!(
        std::fs::read(s.path("backend/f")).unwrap(),
        b"data",
        "umount did not drain"
    );
}

/// `mount -t efscache` with options on the command line; `umount -v`.
#[test]
fn mount_t_efscache_then_umount() {
    install_for_real();
    let s = Scratch::new();
    let (b, mp) = (s.path("backend"), s.path("mnt"));
    std::fs::write(b.join("old"), b"on the backend before").unwrap();
    let _guard = HelperMount { mp: mp.clone() };
    let o = out(Command::new("mount")
        .args(["-v", "-t", "efscache"])
        .arg(&b)
        .arg(&mp)
        .arg("-o")
        .arg(format!(
            "cache_dir={},debounce=1h,defaults,noatime",
            s.path("cache").display()
        )));
    assert!(o.status.success(), "mount failed: {}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("is mounted and serving"),
        "-v reports: {}",
        text(&o.stdout)
    );
    assert_eq!(std::fs::read(mp.join("old")).unwrap(), b"on the backend before");
    std::fs::write(mp.join("new"), b"new").unwrap();
    run(Command::new("umount").arg("-v").arg(&mp));
    assert_eq!(efscache_mounts_at(&mp), 0);
    assert_eq!(std::fs::read(b.join("new")).unwrap(), b"new");
}

/// Stacked on a lower mount at the same path, `umount` through the helper
/// takes away efscache only.
#[test]
fn umount_of_a_stacked_mount_leaves_the_lower_one() {
    install_for_real();
    let s = Scratch::new();
    let lower = LowerMount::new(&s);
    let _guard = HelperMount { mp: lower.path.clone() };
    run(Command::new("mount")
        .args(["-t", "efscache"])
        .arg(&lower.path)
        .arg(&lower.path)
        .arg("-o")
        .arg(format!("cache_dir={},debounce=1h", s.path("cache").display())));
    std::fs::write(lower.path.join("f"), b"through efscache").unwrap();
    run(Command::new("umount").arg(&lower.path));
    let top = fusemount::top_mount_at(&lower.path)
        .unwrap()
        .expect("the lower mount is still there");
    assert_eq!(top.fstype, "tmpfs");
    assert_eq!(std::fs::read(lower.path.join("f")).unwrap(), b"through efscache");
}

/// Bad input to the mount helper: a clear one-line message, non-zero exit,
/// nothing mounted. `-f` checks and mounts nothing.
#[test]
fn mount_helper_rejects_bad_options_and_fake_mounts_nothing() {
    install_for_real();
    let s = Scratch::new();
    let (b, mp) = (s.path("backend"), s.path("mnt"));
    let _guard = HelperMount { mp: mp.clone() };
    let cache = format!("cache_dir={}", s.path("cache").display());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["-o".into(), format!("{cache},flushers=zero")], "flushers"),
        (vec!["-o".into(), format!("{cache},no_such_option")], "no_such_option"),
        (vec!["-o".into(), format!("{cache},foreground")], "foreground"),
        (
            vec!["-o".into(), format!("cache_dir={}/c", b.display())],
            "inside the backend",
        ),
        (vec!["-N".into(), "/proc/1/ns/mnt".into()], "namespace"),
    ];
    for (extra, want) in cases {
        let o = out(Command::new("/sbin/mount.efscache").arg(&b).arg(&mp).args(&extra));
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{extra:?} was accepted");
        assert!(
            err.starts_with("mount.efscache: ") && err.contains(want),
            "{extra:?}: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert_eq!(efscache_mounts_at(&mp), 0, "{extra:?} mounted something");
    }
    let o = out(Command::new("/sbin/mount.efscache")
        .arg(s.path("missing"))
        .arg(&mp)
        .arg("-o")
        .arg(&cache));
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("missing"), "{}", text(&o.stderr));

    // Through mount(8): its exit status and the helper's message.
    let o = out(Command::new("mount")
        .args(["-t", "efscache"])
        .arg(&b)
        .arg(&mp)
        .arg("-o")
        .arg(format!("{cache},debounce=soon")));
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("debounce=soon"), "{}", text(&o.stderr));
    assert_eq!(efscache_mounts_at(&mp), 0);

    // -f: validate and tell, mount nothing. -s: unknown options are skipped.
    let o = out(Command::new("/sbin/mount.efscache")
        .arg(&b)
        .arg(&mp)
        .args(["-f", "-s", "-o"])
        .arg(format!("{cache},flushers=8,_netdev,no_such_option")));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let said = text(&o.stdout);
    assert!(
        said.contains("would run: efscache mount") && said.contains("flushers=8"),
        "{said}"
    );
    assert!(text(&o.stderr).contains("ignoring unknown option 'no_such_option'"));
    assert_eq!(efscache_mounts_at(&mp), 0, "-f mounted");
    let o = out(Command::new("mount")
        .args(["-f", "-t", "efscache"])
        .arg(&b)
        .arg(s.path("missing"))
        .arg("-o")
        .arg(&cache));
    assert!(!o.status.success(), "-f checks the mountpoint");
}

/// The unit's stop path: SIGTERM makes the foreground daemon drain, unmount
/// and exit 0 (so Restart=on-failure does not restart it).
#[test]
fn sigterm_drains_unmounts_and_exits_cleanly() {
    let s = Scratch::new();
    let mut m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=1h");
    std::fs::write(s.path("mnt/pending"), b"pending").unwrap();
    assert!(!s.path("backend/pending").exists());
    // SAFETY: signalling the daemon this test started.
    assert_eq!(unsafe { libc::kill(m.pid() as i32, libc::SIGTERM) }, 0);
    let mut child = m.child.take().unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "daemon did not exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(!is_efscache_mounted(&s.path("mnt")));
    assert_eq!(std::fs::read(s.path("backend/pending")).unwrap(), b"pending");
}

/// `systemd-analyze verify` accepts the installed unit, warning-free.
/// Needs the `systemd` package (.ci/run installs it); without it the test
/// says so and checks nothing, unless EFSCACHE_REQUIRE_TOOLS is set (as
/// .ci/run does): then a missing tool fails it.
#[test]
fn systemd_unit_verifies() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("EFSCACHE_REQUIRE_TOOLS").is_none(),
            "systemd-analyze is not installed (apt-get install systemd)"
        );
        eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install systemd)");
        return;
    }
    install_for_real();
    let s = Scratch::new();
    let unit = std::fs::read_to_string("/etc/systemd/system/efscache@.service").unwrap();
    let dir = s.path("units");
    std::fs::create_dir(&dir).unwrap();
    let instance = run(Command::new("systemd-escape").args(["--path", "/mnt/efs"]));
    let name = format!("efscache@{}.service", instance.trim());
    assert_eq!(name, "efscache@mnt-efs.service");
    for n in ["efscache@.service", name.as_str()] {
        std::fs::write(dir.join(n), &unit).unwrap();
        let o = out(Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.join(n)));
        assert!(
            o.status.success() && o.stderr.is_empty(),
            "systemd-analyze verify {n}: {}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
    }
    // A broken unit is caught (so the check above means something).
    std::fs::write(
        dir.join(&name),
        unit.replace("/usr/local/bin/efscache mount", "/nonexistent/efscache mount"),
    )
    .unwrap();
    let o = out(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.join(&name)));
    assert!(!o.status.success() || !o.stderr.is_empty());
}

/// `status --until-drained` ends once everything is published; `--json`
/// prints one object per refresh; `--wait` gives up on a path nobody serves.
#[test]
fn status_until_drained_ends_when_published() {
    let s = Scratch::new();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=200ms");
    for i in 0..200 {
        std::fs::write(s.path("mnt").join(format!("f{i}")), vec![b'x'; 1000]).unwrap();
    }
    let o = out(Command::new(BIN)
        .args(["status", "--until-drained", "--interval", "100ms"])
        .arg(&m.mountpoint));
    let shown = text(&o.stdout);
    assert!(o.status.success(), "{}{shown}", text(&o.stderr));
    assert!(shown.contains("pending") && shown.contains("eta"), "{shown}");
    assert!(shown.contains("failed        0"), "{shown}");
    assert!(shown.contains("drained: everything is on the backend"), "{shown}");
    assert_eq!(std::fs::read_dir(s.path("backend")).unwrap().count(), 200);

    std::fs::write(s.path("mnt/one-more"), b"1").unwrap();
    let o = out(Command::new(BIN)
        .args(["status", "--json", "--watch", "--until-drained", "--interval", "100ms"])
        .arg(&m.mountpoint));
    assert!(o.status.success());
    let lines: Vec<serde_json::Value> = text(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let last = lines.last().expect("at least one sample");
    assert_eq!(last["pending_files"], 0);
    assert_eq!(last["queued_ops"], 0);
    assert!(s.path("backend/one-more").exists());

    let o = out(Command::new(BIN).args(["status", "--wait", "300ms"]).arg(s.path("src")));
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("cannot reach the efscache daemon"));
    // --wait-pid: a daemon that died while starting ends the wait at once.
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let o = out(Command::new(BIN)
        .args(["status", "--wait", "10min", "--wait-pid", &pid.to_string()])
        .arg(s.path("src")));
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("exited before the mount was ready"),
        "{}",
        text(&o.stderr)
    );
    m.umount();
}
