//! Extended attributes and POSIX ACLs (SEMANTICS.md, "Extended attributes
//! and ACLs"): `rsync -aHAX` through the mount lands them on the backend,
//! ACLs are enforced and inherited through the mount as on a local
//! filesystem, they survive `kill -9`, and a backend without them (EFS)
//! refuses them at the syscall, never later in the flush.

mod common;

use std::path::Path;
use std::process::Command;

use common::{EfsSim, Mount, Scratch, run};

/// Runs a shell script in `dir` (set -e).
fn sh(dir: &Path, script: &str) -> String {
    run(Command::new("sh").arg("-ec").arg(script).current_dir(dir))
}

/// `getfattr` (every namespace, symlinks themselves) and `getfacl` of the
/// tree under `dir`, one block per file, sorted by path: the two trees
/// compare equal when every object has the same xattrs and ACLs.
fn xattr_listing(dir: &Path) -> String {
    let mut blocks: Vec<String> = Vec::new();
    for cmd in ["getfattr -R -P -h -d -m - -e hex .", "getfacl -R -P -n ."] {
        let out = run(Command::new("sh").arg("-c").arg(cmd).current_dir(dir));
        blocks.extend(
            out.split("\n\n")
                .map(|b| b.trim().to_string())
                .filter(|b| !b.is_empty()),
        );
    }
    blocks.sort();
    blocks.join("\n\n")
}

/// A tree with user/trusted/security xattrs, access and default ACLs, a
/// hard link, a symlink with an xattr of its own.
fn make_source(src: &Path) {
    sh(
        src,
        "mkdir -p dst/d/sub dst/empty
         printf one > dst/f1
         printf two > dst/f2
         printf three > dst/d/f3
         : > dst/zero
         ln dst/f1 dst/d/f1-link
         ln -s f1 dst/ln
         setfattr -n user.a -v 1 dst/f1
         setfattr -n user.bin -v 0x00ff7f80 dst/f1
         setfattr -n trusted.t -v secret dst/f1
         setfattr -n security.s -v label dst/f2
         setfattr -n user.dir -v dirvalue dst/d
         setfattr -h -n trusted.link -v 1 dst/ln
         setfattr -n user.empty dst/zero
         setfacl -m u:1000:rw,g:100:r dst/f2
         setfacl -m u:1000:rwx dst/d
         setfacl -d -m u:1000:rwx,g:100:rx dst/d
         printf four > dst/d/sub/f4
         touch -h -d '2022-02-02 02:02:02' dst/ln dst/d/sub dst/d dst/empty dst",
    );
}

#[test]
fn rsync_xattrs_and_acls_reach_the_backend() {
    let s = Scratch::new();
    let src = s.path("src");
    make_source(&src);
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=0ms");
    let caps = &m.status()["capabilities"]["xattrs"];
    for ns in ["user", "trusted", "security", "acls"] {
        assert_eq!(caps[ns], true, "local backend: {ns} xattrs probed as missing: {caps}");
    }
    run(Command::new("rsync")
        .args(["-aHAX", "--numeric-ids"])
        .arg(src.join("dst/"))
        .arg(s.path("mnt/dst")));
    // Through the mount, before and after the publish.
    assert_eq!(xattr_listing(&s.path("mnt/dst")), xattr_listing(&src.join("dst")));
    m.sync();
    assert_eq!(xattr_listing(&s.path("mnt/dst")), xattr_listing(&src.join("dst")));
    // A second run finds nothing to change, xattrs and ACLs included.
    let again = run(Command::new("rsync")
        .args(["-aHAX", "--numeric-ids", "--itemize-changes"])
        .arg(src.join("dst/"))
        .arg(s.path("mnt/dst")));
    assert_eq!(again.trim(), "", "second rsync -aHAX changed something");
    m.umount();
    assert_eq!(xattr_listing(&s.path("backend/dst")), xattr_listing(&src.join("dst")));
    common::assert_same_tree(&src.join("dst"), &s.path("backend/dst"));
}

#[test]
fn acls_are_enforced_and_inherited_as_on_a_local_filesystem() {
    let s = Scratch::new();
    // The same steps in a local directory and through the mount.
    let steps = "mkdir d
        setfacl -d -m u:1000:rwx,g:100:rx,m::rwx d
        touch d/new
        mkdir d/sub
        mkdir -m 700 d/private
        umask 077; touch d/masked; umask 022
        touch plain
        printf secret > f
        chmod 600 f
        setfacl -m u:1000:r f
        printf mode > g
        setfacl -m u:1000:rwx g
        chmod 640 g
        printf gone > h
        setfacl -m u:1000:r h
        setfacl -b h";
    sh(&s.path("src"), steps);
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=0ms");
    sh(&s.path("mnt"), steps);
    let modes = |dir: &Path| sh(dir, "stat -c '%n %A' d d/new d/sub d/private d/masked plain f g h");
    assert_eq!(xattr_listing(&s.path("mnt")), xattr_listing(&s.path("src")));
    assert_eq!(modes(&s.path("mnt")), modes(&s.path("src")));
    // The kernel checks the ACL: user 1000 may read f, user 1001 may not.
    let read_as = |uid: u32| {
        Command::new("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
                "cat".into(),
            ])
            .arg(s.path("mnt/f"))
            .output()
            .unwrap()
    };
    let ok = read_as(1000);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert_eq!(ok.stdout, b"secret");
    assert!(!read_as(1001).status.success(), "the ACL let user 1001 read");
    m.sync();
    m.umount();
    assert_eq!(xattr_listing(&s.path("backend")), xattr_listing(&s.path("src")));
    assert_eq!(modes(&s.path("backend")), modes(&s.path("src")));
}

#[test]
fn rewriting_a_backend_file_keeps_its_xattrs() {
    let s = Scratch::new();
    sh(
        &s.path("backend"),
        "printf old > append; setfattr -n user.k -v kept append
         printf old > trunc; setfattr -n user.k -v kept trunc; setfacl -m u:1000:rw trunc
         printf old > clean; setfattr -n user.k -v kept clean",
    );
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=0ms");
    sh(
        &s.path("mnt"),
        "printf new >> append
         printf new > trunc
         setfattr -n user.k2 -v added clean
         setfattr -x user.k clean
         chmod 600 trunc",
    );
    m.sync();
    let view = xattr_listing(&s.path("mnt"));
    m.umount();
    assert_eq!(xattr_listing(&s.path("backend")), view);
    let b = sh(
        &s.path("backend"),
        "cat append trunc; getfattr -n user.k --only-values append trunc",
    );
    assert_eq!(b, "oldnewnewkeptkept");
    assert_eq!(
        sh(&s.path("backend"), "getfattr -d clean | grep user"),
        "user.k2=\"added\"\n"
    );
    // chmod rewrote the ACL's mask, as a local chmod does.
    assert!(sh(&s.path("backend"), "getfacl -c trunc").contains("mask::---"));
}

#[test]
fn xattrs_survive_kill9() {
    let s = Scratch::new();
    // A long debounce: the file is still unpublished when the daemon dies.
    let mut m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=1h");
    sh(
        &s.path("mnt"),
        "mkdir d
         printf data > d/f
         setfattr -n user.file -v 1 d/f
         setfacl -m u:1000:r d/f
         setfattr -n user.dir -v 2 d",
    );
    let before = xattr_listing(&s.path("mnt"));
    m.kill9();
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=0ms");
    assert_eq!(xattr_listing(&s.path("mnt")), before);
    m.sync();
    m.umount();
    assert_eq!(xattr_listing(&s.path("backend")), before);
}

/// What a setfattr/setfacl through the mount answered.
fn refused(dir: &Path, cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).current_dir(dir).output().unwrap();
    assert!(!out.status.success(), "{cmd} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_backend_without_xattrs_refuses_them_at_the_syscall() {
    let s = Scratch::new();
    std::fs::create_dir(s.path("efs")).unwrap();
    let sim = EfsSim::start(&s.path("backend"), &s.path("efs"), "efs-typical");
    let m = Mount::start(&s.path("efs"), &s.path("mnt"), &s.path("cache"), "debounce=0ms");
    assert_eq!(m.status()["capabilities"]["xattrs"]["user"], false);
    sh(&s.path("mnt"), "printf x > f; mkdir d");
    for cmd in [
        "setfattr -n user.a -v 1 f",
        "setfacl -m u:1000:r f",
        "setfattr -n user.a -v 1 d",
    ] {
        let e = refused(&s.path("mnt"), cmd);
        assert!(e.contains("Operation not supported"), "{cmd}: {e}");
    }
    m.sync();
    assert_eq!(m.status()["failures"], serde_json::json!([]));
    m.umount();
    drop(sim);

    // `noxattr` refuses them on a backend that has them.
    let m = Mount::start(&s.path("src"), &s.path("mnt"), &s.path("cache2"), "noxattr");
    sh(&s.path("mnt"), "printf x > g");
    let e = refused(&s.path("mnt"), "setfattr -n user.a -v 1 g");
    assert!(e.contains("Operation not supported"), "{e}");
    m.umount();
}

#[test]
fn the_root_expired_caches_and_flags_behave() {
    let s = Scratch::new();
    // attr_ttl=0: every cached attribute has expired when it is next used.
    let m = Mount::start(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        "debounce=0ms,attr_ttl=0ms",
    );
    sh(
        &s.path("mnt"),
        "setfattr -n user.root -v r .
         setfacl -d -m u:1000:rwx .
         touch inherits
         mkdir d
         setfattr -n user.one -v 1 d
         setfattr -n user.two -v 2 d
         setfattr -x user.one d",
    );
    // XATTR_CREATE on an existing name, XATTR_REPLACE on a missing one.
    let py = "import os, errno\n\
        for flag, name, want in ((os.XATTR_CREATE, 'user.two', errno.EEXIST), (os.XATTR_REPLACE, 'user.none', errno.ENODATA)):\n\
        \x20   try:\n\
        \x20       os.setxattr('d', name, b'x', flag)\n\
        \x20       print('no error for', name)\n\
        \x20   except OSError as e:\n\
        \x20       print(name, e.errno == want)\n";
    let out = run(Command::new("python3").args(["-c", py]).current_dir(s.path("mnt")));
    assert_eq!(out, "user.two True\nuser.none True\n");
    let e = refused(&s.path("mnt"), "setfattr -n system.other -v 1 d");
    assert!(e.contains("Operation not supported"), "{e}");
    assert!(sh(&s.path("mnt"), "getfacl -cn inherits").contains("user:1000:rwx"));
    let view = xattr_listing(&s.path("mnt"));
    m.sync();
    assert_eq!(xattr_listing(&s.path("mnt")), view);
    m.umount();
    assert_eq!(xattr_listing(&s.path("backend")), view);
    assert_eq!(sh(&s.path("backend"), "getfattr -n user.root --only-values ."), "r");
}

#[test]
fn queued_xattr_ops_are_replayed_after_kill9() {
    let s = Scratch::new();
    // Every backend mkdir and symlink fails (EIO, retried) until the kill:
    // the xattr ops queued behind them stay in the journal.
    let mut m = Mount::start(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        "debounce=0ms,fault_rate=1,fault_ops=mkdir:symlink,fault_errno=EIO",
    );
    sh(
        &s.path("mnt"),
        "mkdir d
         setfattr -n user.dir -v 1 d
         setfacl -m u:1000:rx d
         ln -s target l
         setfattr -h -n trusted.link -v 2 l",
    );
    let before = xattr_listing(&s.path("mnt"));
    assert!(m.status()["queued_ops"].as_u64().unwrap() >= 3, "{}", m.status());
    m.kill9();
    drop(m);
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "");
    assert_eq!(m.recovery()["failed"], 0);
    assert_eq!(xattr_listing(&s.path("mnt")), before);
    m.sync();
    m.umount();
    assert_eq!(xattr_listing(&s.path("backend")), before);
}
