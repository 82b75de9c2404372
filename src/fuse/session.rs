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
    /// CPUs the event loops are confined to (empty: not confined).
    cpus: Vec<usize>,
}

/// Mounts `fs` at `mountpoint`. Returns once the kernel handshake is done, so
/// the mount answers requests as soon as `serve` runs.
pub fn mount(
    fs: Arc<Fs>,
    backend: &Path,
    mountpoint: &Path,
    pool_threads: usize,
    event_threads: usize,
    cpus: &[usize],
) -> io::Result<Mounted> {
    check_cpus(cpus)?;
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
    Ok(Mounted {
        session,
        cpus: cpus.to_vec(),
    })
}

impl Mounted {
    /// Serves requests until the filesystem is unmounted. With `cpus`, the
    /// event loops (threads started here, which inherit this thread's CPU
    /// mask) run only there; this thread gets its mask back afterwards.
    pub fn serve(self) -> io::Result<()> {
        if self.cpus.is_empty() {
            return self.session.run();
        }
        let before = thread_cpus()?;
        set_thread_cpus(&cpu_set(&self.cpus))?;
        let served = self.session.run();
        if let Err(e) = set_thread_cpus(&before) {
            tracing::warn!(error = %e, "cannot restore the main thread's CPU mask");
        }
        served
    }
}

/// Fails, before anything is mounted, when `cpus` names a CPU this process
/// may not run on (offline, or outside a taskset/cgroup mask).
fn check_cpus(cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    let allowed = thread_cpus()?;
    // SAFETY: CPU_ISSET reads a bit of an initialised cpu_set_t; parse_cpu_list
    // keeps every number below CPU_SETSIZE.
    let usable: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &allowed) })
        .collect();
    match cpus.iter().find(|c| !usable.contains(c)) {
        None => Ok(()),
        Some(c) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "fuse_cpus: CPU {c} is not one this daemon may run on (it may: {}); pick from those",
                crate::config::cpu_list_string(&usable)
            ),
        )),
    }
}

fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain bits; zeroed is the empty set. Every number is
    // below CPU_SETSIZE (parse_cpu_list).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        set
    }
}

/// The calling thread's CPU mask.
fn thread_cpus() -> io::Result<libc::cpu_set_t> {
    // SAFETY: sched_getaffinity(0) fills a cpu_set_t of the size passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(set)
    }
}

/// Sets the calling thread's CPU mask (threads it starts later inherit it).
fn set_thread_cpus(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: sched_setaffinity(0) on the calling thread with a valid set.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
