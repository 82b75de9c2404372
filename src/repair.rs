//! Good copies of files efscache could not publish, and re-publishing them.
//!
//! When a publish fails for good (EPERM on chown, ENAMETOOLONG, ...), the
//! daemon keeps the staged data in `<cache_dir>/lost+found/failed/` and, next
//! to it, `<copy>.publish.json`: the backend and the publish (names, owner,
//! mode, times, size). Once the cause is fixed, `efscache scrub --fix
//! --cache-dir DIR` re-publishes such a copy over a damaged-looking backend
//! file (mode 000 or empty) of the same name, through the same atomic
//! publish as the daemon's (temp name, data, owner/mode/times, rename), and
//! only if that file is still exactly what the failed publish left there
//! (same inode, unchanged since: a later publish or another client's change
//! makes the copy outdated) and the copy is no longer a staged file of a
//! running mount.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::posix::PosixBackend;
use crate::backend::{Backend, Capabilities, Known, RelPath, Timespec};
use crate::flush::Action;
use crate::flush::publish::{self, TempNames};
use crate::journal::Header;

/// What a kept copy's publish needs: written next to the copy.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeptPublish {
    pub backend: PathBuf,
    pub backend_root_ino: u64,
    pub action: Action,
    /// What the backend had under the name when the publish failed (None:
    /// nothing).
    pub left: Option<Seen>,
}

/// A backend file as a failed publish left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub ino: u64,
    pub size: u64,
    pub ctime: Timespec,
}

/// The sidecar of the copy at `copy`.
fn sidecar(copy: &Path) -> PathBuf {
    let mut s = copy.as_os_str().to_owned();
    s.push(".publish.json");
    PathBuf::from(s)
}

/// Records what re-publishing the copy kept at `copy` needs (a publish
/// only), with what `backend` has under its name now.
pub fn record(copy: &Path, header: &Header, action: &Action, backend: &dyn Backend) -> io::Result<()> {
    let Action::Publish { paths, .. } = action else {
        return Ok(());
    };
    let left = match paths.first().map(|p| backend.stat(p)) {
        Some(Ok(st)) => Some(Seen {
            ino: st.ino,
            size: st.size,
            ctime: st.ctime,
        }),
        Some(Err(e)) if e.raw_os_error() == Some(libc::ENOENT) => None,
        Some(Err(e)) => return Err(e),
        None => None,
    };
    let meta = KeptPublish {
        backend: header.backend.clone(),
        backend_root_ino: header.backend_root_ino,
        action: action.clone(),
        left,
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(io::Error::other)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(sidecar(copy))?;
    io::Write::write_all(&mut f, &json)
}

/// One kept copy that can be re-published.
#[derive(Debug)]
struct Kept {
    copy: PathBuf,
    meta: KeptPublish,
}

/// The kept copies of a cache dir, by the absolute backend path they belong at.
#[derive(Debug, Default)]
pub struct KeptCopies {
    cache: PathBuf,
    /// A daemon runs with this cache dir (it holds `<cache>/lock`).
    live: bool,
    by_path: HashMap<PathBuf, Kept>,
}

/// What re-publishing a damaged file did.
#[derive(Debug)]
pub enum Outcome {
    /// The good copy is on the backend now.
    Republished,
    /// The backend file changed since it was examined: left alone.
    Changed,
    /// The copy is not complete (or empty): not used.
    CopyIncomplete,
    /// The file changed on the backend after the publish failed (published
    /// again, rewritten by another client): the copy is older, not used.
    CopyOutdated,
    /// The copy is still a staged file of a running mount (which retries or
    /// replaces it): not used.
    CopyInUse,
    Failed(io::Error),
}

impl KeptCopies {
    /// Reads the copies kept in `cache`'s `lost+found/failed/` (none: empty).
    /// When several belong at the same path, the newest one counts.
    pub fn load(cache: &Path) -> io::Result<KeptCopies> {
        let mut out = KeptCopies {
            cache: cache.to_path_buf(),
            live: daemon_running(cache),
            ..Default::default()
        };
        let dir = cache.join("lost+found/failed");
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        let mut found = Vec::new();
        for e in rd {
            let p = e?.path();
            let Some(copy) = p
                .to_str()
                .and_then(|s| s.strip_suffix(".publish.json"))
                .map(PathBuf::from)
            else {
                continue;
            };
            let read = std::fs::read(&p).map_err(|e| e.to_string());
            let meta: KeptPublish = match read.and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string())) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "unreadable record of a kept copy: skipped");
                    continue;
                }
            };
            // Only a file with one name: a hard-link group's other names are
            // not known to be damaged.
            let Action::Publish { paths, .. } = &meta.action else {
                continue;
            };
            if paths.len() != 1 || !copy.exists() {
                continue;
            }
            let at = meta.backend.join(paths[0].0.iter().collect::<PathBuf>());
            // The record is written when the publish failed (the copy keeps
            // the file's own times).
            let when = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
            found.push((at, when, Kept { copy, meta }));
        }
        found.sort_by_key(|(_, when, _)| *when);
        for (at, _, k) in found {
            out.by_path.insert(at, k);
        }
        Ok(out)
    }

    /// Whether a good copy may exist for the backend file at `abs`.
    pub fn has(&self, abs: &Path) -> bool {
        self.by_path.contains_key(abs)
    }

    /// Re-publishes the copy kept for `abs` over it, if `abs` is still the
    /// file the failed publish left there, as the scrub found it (`found`).
    /// On success the copy and its record move to `lost+found/republished/`.
    pub fn republish(&self, abs: &Path, found: Seen) -> Option<Outcome> {
        let k = self.by_path.get(abs)?;
        Some(self.publish(k, found).unwrap_or_else(Outcome::Failed))
    }

    fn publish(&self, k: &Kept, found: Seen) -> io::Result<Outcome> {
        use std::os::unix::fs::MetadataExt;
        let Action::Publish { size, paths, .. } = &k.meta.action else {
            return Ok(Outcome::CopyIncomplete);
        };
        if k.meta.left != Some(found) {
            return Ok(Outcome::CopyOutdated);
        }
        let data = File::open(&k.copy)?;
        let md = data.metadata()?;
        // A second link while a daemon runs: its staging file, which it may
        // still write or publish itself.
        if md.nlink() > 1 && self.live {
            return Ok(Outcome::CopyInUse);
        }
        if *size == 0 || md.len() != *size {
            return Ok(Outcome::CopyIncomplete);
        }
        let backend = PosixBackend::open(&k.meta.backend)?;
        if backend.stat(&RelPath::root())?.ino != k.meta.backend_root_ino {
            return Err(io::Error::other(format!(
                "{} is not the backend the copy was kept for (another file system is mounted there?)",
                k.meta.backend.display()
            )));
        }
        // Still as found (the publish checks the inode again just before
        // its rename).
        match backend.stat(&paths[0]) {
            Ok(st) if st.ino == found.ino && st.size == found.size && st.ctime == found.ctime => {}
            Ok(_) => return Ok(Outcome::Changed),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Outcome::Changed),
            Err(e) => return Err(e),
        }
        let temps = TempNames::new(&crate::run::hostname(), &format!("{:x}", std::process::id()));
        let r = publish::execute(
            &backend,
            &temps,
            &k.meta.action,
            Some(Known::ino(found.ino)),
            false,
            Capabilities::default(),
            |_| Ok(Some(data)),
            || true,
        );
        match r {
            Ok(p) if !p.superseded => {}
            Ok(_) => return Ok(Outcome::CopyIncomplete),
            Err(e) if publish::conflict(&e).is_some() => return Ok(Outcome::Changed),
            Err(e) => return Err(e),
        }
        let done = self.cache.join("lost+found/republished");
        if std::fs::create_dir_all(&done).is_ok()
            && let Some(name) = k.copy.file_name()
        {
            let _ = std::fs::rename(sidecar(&k.copy), sidecar(&done.join(name)));
            let _ = std::fs::rename(&k.copy, done.join(name));
        }
        Ok(Outcome::Republished)
    }
}

/// Whether a daemon holds the cache dir's lock (taken for its whole life).
fn daemon_running(cache: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = File::open(cache.join("lock")) else {
        return false;
    };
    // SAFETY: flock on an fd we own; the shared lock is dropped with it.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}
