//! Executes one flush op against the backend. Publishing a file:
//! temp name in the final directory (`O_CREAT|O_EXCL`, final mode without
//! setuid/setgid) -> data -> owner, setuid/setgid, times -> extended
//! attributes (ACLs) -> close -> `renameat`
//! over the final name; further hard links via link + rename. Every failure
//! path removes the temp file (including a failed create, which the backend
//! may have carried out before failing); a removal that fails is retried
//! later (`TempNames::remove_leftovers`) and holds up `sync` until it is
//! done. Ops are idempotent, so a retry (or a replay after a crash)
//! converges.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::backend::{AttrSet, Backend, Capabilities, Kind, Known, RelPath};
use crate::flush::{Action, TEMP_PREFIX};

/// Makes unique temp names: `.efscache.<host>.<instance>.<n>`. Derived from an
/// id, never from the final name, so they fit NAME_MAX whatever the final name
/// is, and one host's cleanup can tell its own temp files from another's.
#[derive(Debug)]
pub struct TempNames {
    prefix: String,
    next: AtomicU64,
    /// Temp files this instance made whose removal failed (a backend
    /// error): removed later, so none stays behind.
    leftovers: Mutex<Vec<RelPath>>,
    /// When `remove_leftovers` last tried.
    last_try: Mutex<Option<Instant>>,
}

impl TempNames {
    pub fn new(host: &str, instance: &str) -> TempNames {
        let host: String = host
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(64)
            .collect();
        TempNames {
            prefix: format!("{TEMP_PREFIX}{host}.{instance}."),
            next: AtomicU64::new(1),
            leftovers: Mutex::new(Vec::new()),
            last_try: Mutex::new(None),
        }
    }
    /// The prefix every temp name of this instance starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn next(&self) -> OsString {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}{n:x}", self.prefix).into()
    }

    /// Removes a temp file (or probe object) of this instance now, or notes
    /// it for `remove_leftovers`. Nothing there is fine: a failed create may
    /// or may not have made it.
    pub fn remove(&self, backend: &dyn Backend, path: RelPath) {
        match backend.unlink(&path) {
            Ok(()) => {}
            Err(e) if nothing_there(&e) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove temp file; trying again later");
                self.leftovers.lock().push(path);
            }
        }
    }

    /// Tries again to remove the temp files whose removal failed, at most
    /// once per `every`; returns the ones it removed (their directories'
    /// times changed) and how many are left. A permanent error (a read-only
    /// or forbidding backend) ends the attempts, with an error naming the
    /// file: nothing this mount can do removes it then.
    pub fn remove_leftovers(&self, backend: &dyn Backend, every: Duration) -> (Vec<RelPath>, usize) {
        {
            let mut last = self.last_try.lock();
            if self.leftovers.lock().is_empty() || last.is_some_and(|t| t.elapsed() < every) {
                return (Vec::new(), self.leftovers.lock().len());
            }
            *last = Some(Instant::now());
        }
        // (Entries stay listed while being tried: a concurrent `sync` must
        // not see none left before they are gone.)
        let list = self.leftovers.lock().clone();
        let mut removed = Vec::new();
        let mut settled = Vec::new();
        for path in list {
            match backend.unlink(&path) {
                Ok(()) => removed.push(path.clone()),
                Err(e) if nothing_there(&e) => {}
                Err(e) if crate::flush::is_transient(&e) => {
                    tracing::debug!(path = %path.display(), error = %e, "still cannot remove temp file");
                    continue;
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot remove temp file and giving up: remove it by hand (`efscache scrub --fix` finds it)");
                }
            }
            settled.push(path);
        }
        let mut left = self.leftovers.lock();
        left.retain(|p| !settled.contains(p));
        (removed, left.len())
    }

    /// How many temp files wait for `remove_leftovers`.
    pub fn leftover_count(&self) -> usize {
        self.leftovers.lock().len()
    }
}

/// What a publish produced.
#[derive(Debug, Default)]
pub struct Published {
    /// The published file as it is on the backend now.
    pub backend: Option<Known>,
    pub bytes: u64,
    /// The staged content is gone (the file was removed): nothing to publish.
    pub superseded: bool,
}

/// Another client replaced the backend object this mount meant to replace
/// or remove (its inode number is not the one this mount knew), or rewrote
/// it in place (its size or mtime is not).
#[derive(Debug)]
pub struct Conflict {
    pub expected: Known,
    /// What the backend has under the name now.
    pub found: crate::backend::Stat,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.found.ino == self.expected.ino {
            write!(
                f,
                "changed in place on the backend by another client since this mount last saw it (inode {}: size or mtime differ)",
                self.found.ino
            )
        } else {
            write!(
                f,
                "replaced on the backend by another client since this mount last saw it (inode {} became {})",
                self.expected.ino, self.found.ino
            )
        }
    }
}

impl std::error::Error for Conflict {}

/// The conflict an op ended with, if that is why it failed.
pub fn conflict(e: &io::Error) -> Option<&Conflict> {
    e.get_ref().and_then(|e| e.downcast_ref::<Conflict>())
}

/// Fails with a `Conflict` when `path` holds a backend object other than
/// `expected` (absent is fine: nothing of anyone's is replaced). Checked
/// just before the change: NFS has no compare-and-swap, so a change in the
/// instant between check and rename still wins the race.
fn check_unchanged(backend: &dyn Backend, path: &RelPath, expected: Option<Known>) -> io::Result<()> {
    let Some(expected) = expected else {
        return Ok(());
    };
    match backend.stat_fresh(path) {
        Ok(st) if !expected.matches(&st) => Err(io::Error::other(Conflict { expected, found: st })),
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(e),
        _ => Ok(()),
    }
}

/// Runs `action`. `expect` (unlink and publish) is the backend file the
/// target name must still hold, if this mount knows it; for a rename, the
/// object its source holds (a retry compares it with the target's). `caps`: what the
/// backend keeps; of extended attributes, a published file gets exactly its
/// staged ones, its ACL included, not one its backend directory would give
/// it; others are never sent.
/// `content` opens the staged data of a publish (None: the
/// staging file is gone, the file was removed meanwhile); `still_current`
/// says whether the staged content is unchanged since the copy started
/// (otherwise the publish fails with `WriterBusy` and is tried again once
/// nobody writes the file). `retry`: an
/// earlier attempt failed, possibly after it was carried out (a lost reply).
#[allow(clippy::too_many_arguments)]
pub fn execute(
    backend: &dyn Backend,
    temps: &TempNames,
    action: &Action,
    expect: Option<Known>,
    retry: bool,
    caps: Capabilities,
    content: impl FnOnce(u64) -> io::Result<Option<File>>,
    still_current: impl FnOnce() -> bool,
) -> io::Result<Published> {
    match action {
        Action::Mkdir { path, perm, uid, gid } => {
            match backend.mkdir(path, *perm) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // A retry after the mkdir reached the backend: fine if it is a directory.
                    if backend.stat(path)?.kind != Kind::Dir {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
            let attrs = AttrSet {
                perm: Some(*perm),
                uid: Some(*uid),
                gid: Some(*gid),
                ..Default::default()
            };
            set_new_object_attrs(backend, path, attrs)?;
            Ok(Published::default())
        }
        Action::Rmdir { path } => ignore_enoent(backend.rmdir(path).map_err(|e| silly_renames_left(backend, path, e))),
        Action::Unlink { path } => {
            check_unchanged(backend, path, expect)?;
            ignore_enoent(backend.unlink(path))
        }
        // `noreplace` was the overlay's to check (Backend::rename).
        Action::Rename { from, to, .. } => {
            match backend.rename(from, to).map_err(|e| silly_renames_left(backend, to, e)) {
                // An earlier attempt did it and only its reply was lost: the
                // target is there, and is the object the source held (where
                // this mount knows which one that was). If not, another
                // client removed the source and put something else at the
                // target: reported, not taken as done.
                Err(e) if retry && e.raw_os_error() == Some(libc::ENOENT) => {
                    let st = backend.stat(to).map_err(|_| e)?;
                    if let Some(k) = expect
                        && k.ino != st.ino
                    {
                        return Err(io::Error::other(Conflict {
                            expected: Known::ino(k.ino),
                            found: st,
                        }));
                    }
                    return Ok(Published::default());
                }
                r => r?,
            }
            // The overlay renamed one object over another; on the backend
            // both names can be links of one file (the other object's
            // publish was superseded), and rename(2) then does nothing: the
            // old name must still go.
            if let Ok(a) = backend.stat(from)
                && let Ok(b) = backend.stat(to)
                && (a.dev, a.ino) == (b.dev, b.ino)
            {
                ignore_enoent(backend.unlink(from))?;
            }
            Ok(Published::default())
        }
        Action::Symlink { path, target, attrs } => {
            match backend.symlink(target, path) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // A retry after the link was made (its reply lost), or
                    // something put at the name since this mount looked:
                    // replaced (as a publish replaces a file another client
                    // created there), unless it is the object this mount
                    // expected to be gone and it changed. An error here is
                    // retried like any other, never taken for done.
                    // (Gone again meanwhile: the name is free.)
                    let ours = match backend.stat(path) {
                        Ok(st) => st.kind == Kind::Symlink && backend.read_link(path)? == *target,
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => false,
                        Err(e) => return Err(e),
                    };
                    if !ours {
                        check_unchanged(backend, path, expect)?;
                        ignore_enoent(backend.unlink(path))?;
                        backend.symlink(target, path)?;
                    }
                }
                Err(e) => return Err(e),
            }
            set_new_object_attrs(backend, path, attrs.clone())?;
            Ok(Published::default())
        }
        Action::Link { existing, new } => match backend.link(existing, new) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                let (a, b) = (backend.stat(existing)?, backend.stat(new)?);
                if (a.dev, a.ino) == (b.dev, b.ino) {
                    Ok(Published::default())
                } else {
                    Err(e)
                }
            }
            r => r.map(|_| Published::default()),
        },
        Action::Mknod {
            path,
            kind,
            perm,
            rdev,
            attrs,
        } => {
            match backend.mknod(path, *kind, *perm, *rdev) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                r => r?,
            }
            let mut a = attrs.clone();
            a.perm = Some(*perm);
            set_new_object_attrs(backend, path, a)?;
            Ok(Published::default())
        }
        Action::SetAttr { path, attrs } => backend.set_attrs(path, attrs, false).map(|_| Published::default()),
        Action::SetXattr { path, name, value } => backend
            .set_xattr(path, name, value.as_deref())
            .map(|_| Published::default()),
        Action::Publish {
            staging, paths, attrs, ..
        } => {
            let Some(src) = content(*staging)? else {
                return Ok(Published {
                    superseded: true,
                    ..Default::default()
                });
            };
            publish_file(backend, temps, &src, paths, attrs, expect, caps, still_current)
        }
        Action::Barrier(tx) => {
            let _ = tx.send(());
            Ok(Published::default())
        }
    }
}

/// Gives an object efscache just created (directory, symlink, special
/// file) its owner and mode where they differ from what it got: a directory
/// that is setgid on the backend (perhaps still, while its chmod or chown
/// waits behind the work inside it) hands new objects its group, and a new
/// directory its setgid bit. One stat; a chown or chmod only when needed.
fn set_new_object_attrs(backend: &dyn Backend, path: &RelPath, mut attrs: AttrSet) -> io::Result<()> {
    let st = backend.stat(path)?;
    if attrs.uid == Some(st.uid) && attrs.gid == Some(st.gid) {
        attrs.uid = None;
        attrs.gid = None;
    }
    // chown clears setuid/setgid: then such a mode must be set again after it.
    let chown = attrs.uid.is_some();
    let keep_perm = attrs.perm.is_some_and(|p| p != st.perm || chown && p & 0o6000 != 0);
    if !keep_perm || st.kind == Kind::Symlink {
        attrs.perm = None;
    }
    if attrs.is_empty() {
        return Ok(());
    }
    backend.set_attrs(path, &attrs, false)
}

/// A directory that is not empty on the backend although the overlay found it
/// empty may hold only files the NFS client renamed to `.nfs*` because this
/// host still has them open (see `is_nfs_silly_name`, hidden from listings):
/// that clears once they are closed, so it is an error to retry, not a
/// failure. Not for ever: one renamed longer ago than `SILLY_RENAME_PATIENCE`
/// may be a leftover of a client that crashed (NFS never removes those), and
/// the op then fails, naming it.
fn silly_renames_left(backend: &dyn Backend, dir: &RelPath, e: io::Error) -> io::Error {
    if e.raw_os_error() != Some(libc::ENOTEMPTY) && e.raw_os_error() != Some(libc::EEXIST) {
        return e;
    }
    let Ok(names) = backend.list_names(dir) else { return e };
    if names.is_empty() || !names.iter().all(|n| crate::backend::is_nfs_silly_name(n)) {
        return e;
    }
    let now = crate::backend::Timespec::now();
    for n in &names {
        // (The rename that gave it the name set its ctime.)
        if let Ok(st) = backend.stat(&dir.join(n))
            && now.sec - st.ctime.sec > SILLY_RENAME_PATIENCE.as_secs() as i64
        {
            tracing::warn!(
                dir = ?dir,
                name = %n.to_string_lossy(),
                "not empty on the backend: it holds a file the NFS client renamed while it was open, over an hour ago; if no process still has it open (a client that crashed leaves these), remove it on the backend"
            );
            return e; // ENOTEMPTY: a failure to report
        }
    }
    io::Error::other(
        "not empty on the backend: it holds files the NFS client renamed to .nfs* while they are open on this host; retried until they are closed",
    )
}

/// How long a directory's removal waits for `.nfs*` files in it to go away.
const SILLY_RENAME_PATIENCE: Duration = Duration::from_secs(3600);

fn ignore_enoent(r: io::Result<()>) -> io::Result<Published> {
    match r {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(Published::default()),
        r => r.map(|_| Published::default()),
    }
}

/// Removes a temp file when dropped unless disarmed (every failure path).
struct TempGuard<'a> {
    backend: &'a dyn Backend,
    temps: &'a TempNames,
    path: Option<RelPath>,
}

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            self.temps.remove(self.backend, p);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn publish_file(
    backend: &dyn Backend,
    temps: &TempNames,
    src: &File,
    paths: &[RelPath],
    attrs: &AttrSet,
    expect: Option<Known>,
    caps: Capabilities,
    still_current: impl FnOnce() -> bool,
) -> io::Result<Published> {
    let first = paths
        .first()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let (dir, _) = first
        .split_last()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let perm = attrs.perm.unwrap_or(0o600);
    let temp_name = temps.next();
    let temp = dir.join(&temp_name);
    // The temp name is hidden, so it may carry the final mode at once (saves a
    // chmod); setuid/setgid only after the owner is set (chown clears them).
    let mut guard = TempGuard {
        backend,
        temps,
        path: Some(temp.clone()),
    };
    let dst = match backend.create_exclusive(&dir, &temp_name, perm & 0o1777) {
        Ok(f) => f,
        Err(e) => {
            // The backend may have created it before failing (a lost reply,
            // an error after the create): the guard removes the name. Unless
            // the name was taken already: then it is not ours.
            if e.raw_os_error() == Some(libc::EEXIST) {
                guard.path = None;
            }
            return Err(e);
        }
    };
    // One fstat: the owner the new file got (a set-gid directory gives its
    // group) decides whether a chown is needed, and its inode number is kept.
    // Before the data: a network file system's client still holds the
    // attributes the create returned, so this costs no round trip (after a
    // write it has to ask).
    let st = backend.stat_file(&dst)?;
    // The size copied (and so published): the staging file may change once
    // the publish is past its last `still_current` check.
    let len = src.metadata()?.len();
    let bytes = copy_data(src, len, &dst, backend)?;
    let owner_differs = attrs.uid.is_some_and(|u| u != st.uid) || attrs.gid.is_some_and(|g| g != st.gid);
    let post = AttrSet {
        perm: (perm & 0o6000 != 0).then_some(perm),
        uid: if owner_differs { attrs.uid } else { None },
        gid: if owner_differs { attrs.gid } else { None },
        atime: attrs.atime,
        mtime: attrs.mtime,
    };
    backend.set_attrs_fd(&dst, &post)?;
    // Extended attributes (and ACLs) after the owner: chown drops
    // security.capability. Setting them leaves the times alone.
    let keep = caps.xattrs;
    // (No local listxattr per publish where the backend keeps none: EFS.)
    let xattrs = if keep.any() {
        crate::staging::file_xattrs(src)?
    } else {
        Vec::new()
    };
    let acl = std::ffi::OsStr::new(crate::xattr::ACL_ACCESS);
    if keep.acls && !xattrs.iter().any(|(n, _)| n == acl) {
        // The temp file may have inherited its directory's default ACL: an
        // ACL that is just the mode removes it.
        let minimal = crate::xattr::Acl::from_mode(perm).to_bytes();
        backend.set_xattr_fd(&dst, acl, &minimal)?;
    }
    for (name, value) in xattrs {
        if keep.allows(crate::xattr::classify(&name)) {
            backend.set_xattr_fd(&dst, &name, &value)?;
        }
    }
    backend.close_file(dst)?;
    let backend_ino = st.ino;
    if !still_current() {
        // Changed during the copy (opened for writing, truncated): publish
        // again once nobody writes it. Not dropped: the ops queued behind
        // this publish (a rename of the file, a link to it) need the file
        // there; its next publish would only come after them.
        return Err(io::Error::other(crate::flush::WriterBusy));
    }
    check_unchanged(backend, first, expect)?;
    backend.rename(&temp, first)?;
    guard.path = None;
    for other in &paths[1..] {
        let (odir, _) = other
            .split_last()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let t = odir.join(&temps.next());
        let mut g = TempGuard {
            backend,
            temps,
            path: Some(t.clone()),
        };
        if let Err(e) = backend.link(first, &t) {
            if e.raw_os_error() == Some(libc::EEXIST) {
                g.path = None; // not ours
            }
            return Err(e);
        }
        backend.rename(&t, other)?;
        g.path = None;
    }
    // What the backend has now: this file, with the staged size and the
    // mtime just set (as the backend keeps it). Unknown if either is.
    let version = match (attrs.mtime, caps.time_granularity_ns) {
        (Some(mtime), Some(g)) => crate::backend::content_version(len, mtime.truncated(g)),
        _ => 0,
    };
    Ok(Published {
        backend: Some(Known {
            ino: backend_ino,
            version,
        }),
        bytes,
        superseded: false,
    })
}

/// Copies the first `len` bytes of the staged data with large reads and
/// writes, skipping holes (SEEK_DATA/SEEK_HOLE) so sparse files stay sparse.
fn copy_data(src: &File, len: u64, dst: &File, backend: &dyn Backend) -> io::Result<u64> {
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK.min(len.max(1) as usize)];
    let mut pos: u64 = 0;
    let mut written = 0;
    while pos < len {
        // SAFETY: the fd is open; lseek has no memory-safety preconditions.
        let data = unsafe { libc::lseek(src.as_raw_fd(), pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len } else { (hole as u64).min(len) };
        if end <= data as u64 {
            break;
        }
        let mut off = data as u64;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], off)?;
            backend.write_at(dst, &buf[..n], off)?;
            off += n as u64;
            written += n as u64;
        }
        pos = end;
    }
    if pos < len || written == 0 && len > 0 {
        backend.set_len(dst, len)?; // trailing hole
    }
    Ok(written)
}

/// The path cannot hold a file of ours: nothing by that name, or its
/// directory is gone or is no longer a directory (another client replaced it,
/// with a symlink say, which the path walk refuses to follow).
fn nothing_there(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::posix::PosixBackend;

    fn rel(name: &str) -> RelPath {
        RelPath(vec![name.into()])
    }

    /// A second attempt at renaming `a` to `b`, the first one's outcome unknown.
    fn retried_rename(backend: &PosixBackend, source: Option<Known>) -> io::Result<Published> {
        let action = Action::Rename {
            from: rel("a"),
            to: rel("b"),
            noreplace: false,
        };
        let temps = TempNames::new("host", "1");
        execute(
            backend,
            &temps,
            &action,
            source,
            true,
            Capabilities::default(),
            |_| Ok(None),
            || true,
        )
    }

    #[test]
    fn a_retried_rename_whose_source_is_gone_is_done_only_if_the_target_is_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        std::fs::write(at("a"), b"ours").unwrap();
        let backend = PosixBackend::open(dir.path()).unwrap();
        let ours = Known::ino(backend.stat(&rel("a")).unwrap().ino);

        // The first attempt renamed; only its reply was lost.
        std::fs::rename(at("a"), at("b")).unwrap();
        assert!(retried_rename(&backend, Some(ours)).is_ok());
        assert!(retried_rename(&backend, None).is_ok());

        // Another client put its own file at the target (made while ours
        // still exists, so it cannot reuse our inode number).
        std::fs::write(at("theirs"), b"theirs").unwrap();
        std::fs::rename(at("theirs"), at("b")).unwrap();
        let e = retried_rename(&backend, Some(ours)).unwrap_err();
        assert!(conflict(&e).is_some(), "{e}");
        assert_eq!(std::fs::read(at("b")).unwrap(), b"theirs");
        // (Not knowing the source's inode, the target's presence is all there is.)
        assert!(retried_rename(&backend, None).is_ok());

        // Nothing at either name: the source's ENOENT stands.
        std::fs::remove_file(at("b")).unwrap();
        let e = retried_rename(&backend, Some(ours)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }

    fn make_symlink(backend: &dyn Backend, expect: Option<Known>) -> io::Result<Published> {
        let action = Action::Symlink {
            path: rel("l"),
            target: "ours".into(),
            attrs: AttrSet::default(),
        };
        let temps = TempNames::new("host", "1");
        execute(
            backend,
            &temps,
            &action,
            expect,
            true,
            Capabilities::default(),
            |_| Ok(None),
            || true,
        )
    }

    /// A symlink whose name is taken on the backend: a retry finding its own
    /// link is done; something else there is replaced, unless it is what
    /// this mount expected gone and it changed; a failure to remove it is
    /// an error to retry, never a link taken for made.
    #[test]
    fn a_symlink_over_a_taken_name() {
        use std::path::Path;
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        let target = || std::fs::read_link(at("l")).ok();
        let backend = PosixBackend::open(dir.path()).unwrap();

        std::os::unix::fs::symlink("ours", at("l")).unwrap();
        make_symlink(&backend, None).expect("a retry after the link was made");
        assert_eq!(target().as_deref(), Some(Path::new("ours")));

        std::fs::remove_file(at("l")).unwrap();
        std::fs::write(at("l"), b"theirs").unwrap();
        let theirs = Known::ino(backend.stat(&rel("l")).unwrap().ino);
        let unlink_fails = crate::backend::fault::FaultBackend::new(
            Box::new(PosixBackend::open(dir.path()).unwrap()),
            crate::config::FaultConfig {
                rate: 1.0,
                ops: vec!["unlink".into()],
                ..Default::default()
            },
        );
        let e = make_symlink(&unlink_fails, None).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
        assert_eq!(
            std::fs::read(at("l")).unwrap(),
            b"theirs",
            "kept while the unlink fails"
        );

        // Expected gone but changed since (another client's new file): kept.
        let e = make_symlink(&backend, Some(Known::ino(theirs.ino + 1))).unwrap_err();
        assert!(conflict(&e).is_some(), "{e}");
        assert_eq!(std::fs::read(at("l")).unwrap(), b"theirs");

        make_symlink(&backend, Some(theirs)).expect("replaces what it expected");
        assert_eq!(target().as_deref(), Some(Path::new("ours")));
        std::fs::write(at("m"), b"x").unwrap();
        std::fs::rename(at("m"), at("l")).unwrap();
        make_symlink(&backend, None).expect("replaces what another client made");
        assert_eq!(target().as_deref(), Some(Path::new("ours")));
    }
}
