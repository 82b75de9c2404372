//! Good copies of files efscache could not publish, and re-publishing them.
//!
//! When a publish fails for good (EPERM on chown, ENAMETOOLONG, ...), the
//! daemon keeps the staged data in `<cache_dir>/lost+found/failed/` and, next
//! to it, `<copy>.publish.json`: the backend and the publish (names, owner,
//! mode, times, size). Once the cause is fixed, `efscache scrub --fix
//! --cache-dir DIR` re-publishes such a copy over a damaged-looking backend
//! file (mode 000 or empty) of the same name, through the same atomic
//! publish as the daemon's (temp name, data, owner/mode/times, rename), and
//! only if the backend file is still the one the scrub examined.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::posix::PosixBackend;
use crate::backend::{Backend, RelPath, XattrCaps};
use crate::flush::Action;
use crate::flush::publish::{self, TempNames};
use crate::journal::Header;

/// What a kept copy's publish needs: written next to the copy.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeptPublish {
    pub backend: PathBuf,
    pub backend_root_ino: u64,
    pub action: Action,
}

/// The sidecar of the copy at `copy`.
fn sidecar(copy: &Path) -> PathBuf {
    let mut s = copy.as_os_str().to_owned();
    s.push(".publish.json");
    PathBuf::from(s)
}

/// Records what re-publishing the copy kept at `copy` needs (a publish only).
pub fn record(copy: &Path, header: &Header, action: &Action) -> io::Result<()> {
    if !matches!(action, Action::Publish { .. }) {
        return Ok(());
    }
    let meta = KeptPublish {
        backend: header.backend.clone(),
        backend_root_ino: header.backend_root_ino,
        action: action.clone(),
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
    Failed(io::Error),
}

impl KeptCopies {
    /// Reads the copies kept in `cache`'s `lost+found/failed/` (none: empty).
    /// When several belong at the same path, the newest one counts.
    pub fn load(cache: &Path) -> io::Result<KeptCopies> {
        let mut out = KeptCopies {
            cache: cache.to_path_buf(),
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
            let meta: KeptPublish = match std::fs::read(&p).map(|b| serde_json::from_slice(&b)) {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    tracing::warn!(path = %p.display(), error = %e, "unreadable record of a kept copy");
                    continue;
                }
                Err(e) => return Err(e),
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
            let when = std::fs::metadata(&copy).and_then(|m| m.modified()).ok();
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
    /// backend inode `seen_ino`. On success the copy and its record move to
    /// `lost+found/republished/`.
    pub fn republish(&self, abs: &Path, seen_ino: u64) -> Option<Outcome> {
        let k = self.by_path.get(abs)?;
        Some(self.publish(k, seen_ino).unwrap_or_else(Outcome::Failed))
    }

    fn publish(&self, k: &Kept, seen_ino: u64) -> io::Result<Outcome> {
        let Action::Publish { size, .. } = &k.meta.action else {
            return Ok(Outcome::CopyIncomplete);
        };
        let data = File::open(&k.copy)?;
        if *size == 0 || data.metadata()?.len() != *size {
            return Ok(Outcome::CopyIncomplete);
        }
        let backend = PosixBackend::open(&k.meta.backend)?;
        if backend.stat(&RelPath::root())?.ino != k.meta.backend_root_ino {
            return Err(io::Error::other(format!(
                "{} is not the backend the copy was kept for (another file system is mounted there?)",
                k.meta.backend.display()
            )));
        }
        let temps = TempNames::new(&crate::run::hostname(), &format!("{:x}", std::process::id()));
        let r = publish::execute(
            &backend,
            &temps,
            &k.meta.action,
            Some(seen_ino),
            XattrCaps::default(),
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
