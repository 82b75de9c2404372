//! Mounting and serving: our own mount(2) (through `fusemount`) and
//! `fuser::Session::from_fd`, so fuser never unmounts anything (its own mount
//! path unmounts the mountpoint a second time after an external umount, which
//! would take away the EFS mount efscache is stacked on).

use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::fs::Fs;
use crate::fuse::EfsFuse;

/// Mount identity as it appears in mountinfo.
pub const SUBTYPE: &str = "efscache";

pub fn fsname(backend: &Path) -> String {
    format!("efscache:{}", backend.display())
}

/// A mounted, not yet serving, FUSE session.
pub struct Mounted {
    session: fuser::Session<EfsFuse>,
}

/// Mounts `fs` at `mountpoint`. Returns once the kernel handshake is done, so
/// the mount answers requests as soon as `serve` runs.
pub fn mount(
    fs: Arc<Fs>,
    backend: &Path,
    mountpoint: &Path,
    pool_threads: usize,
    event_threads: usize,
) -> io::Result<Mounted> {
    let spec = fusemount::MountSpec {
        fsname: fsname(backend),
        subtype: SUBTYPE.into(),
        allow_other: true,
        default_permissions: true,
        read_only: false,
    };
    let fd = fusemount::mount(mountpoint, &spec)?;
    let mut config = fuser::Config::default();
    config.n_threads = Some(event_threads.max(1));
    config.clone_fd = true;
    let fuse = EfsFuse::new(fs, pool_threads);
    let entries = fuse.kernel_entries();
    let session = match fuser::Session::from_fd(fuse, fd, fuser::SessionACL::All, config) {
        Ok(s) => s,
        Err(e) => {
            let _ = fusemount::unmount_if_ours(mountpoint, SUBTYPE, Some(&spec.fsname), true);
            return Err(e);
        }
    };
    entries.connect(session.notifier());
    Ok(Mounted { session })
}

impl Mounted {
    /// Serves requests until the filesystem is unmounted.
    pub fn serve(self) -> io::Result<()> {
        self.session.run()
    }
}
