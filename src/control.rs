//! The control socket: `efscache sync`, `status` and `umount` talk to the
//! daemon through a root-only Unix socket (0600 in a 0700 directory, peer
//! credentials checked). One JSON request line, one JSON reply line.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const RUN_DIR: &str = "/run/efscache";

/// The socket of the daemon serving `mountpoint` (an absolute, canonical path).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    // FNV-1a: stable across builds, and keeps the path under the 108-byte limit.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in mountpoint.as_os_str().as_encoded_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Path::new(RUN_DIR).join(format!("{h:016x}.sock"))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Publish everything accepted so far; wait up to `timeout_ms` (None: no limit).
    Sync {
        timeout_ms: Option<u64>,
    },
    /// The drain before an unmount: like `Sync`, bounded by `timeout_ms` or
    /// else the mount's `drain_timeout`.
    Drain {
        timeout_ms: Option<u64>,
    },
}

/// The daemon side: answers requests with `handler`.
pub fn serve(path: &Path, handler: Arc<dyn Fn(Request) -> serde_json::Value + Send + Sync>) -> std::io::Result<()> {
    let dir = path.parent().expect("socket has a parent");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("efscache-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let handler = handler.clone();
                let _ = std::thread::Builder::new()
                    .name("efscache-control-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(conn, &*handler) {
                            tracing::debug!(error = %e, "control connection ended");
                        }
                    });
            }
        })?;
    Ok(())
}

fn peer_uid(s: &UnixStream) -> std::io::Result<u32> {
    // SAFETY: zeroed ucred is a valid out-buffer of the size passed.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is an open socket; cred/len point to valid memory.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

fn answer(conn: UnixStream, handler: &dyn Fn(Request) -> serde_json::Value) -> std::io::Result<()> {
    let mut w = conn.try_clone()?;
    if peer_uid(&conn)? != 0 {
        writeln!(
            w,
            "{}",
            serde_json::json!({"error": "permission denied: only root may control efscache"})
        )?;
        return Ok(());
    }
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => handler(req),
        Err(e) => serde_json::json!({"error": format!("bad request: {e}")}),
    };
    writeln!(w, "{reply}")?;
    Ok(())
}

/// The client side: sends one request to the daemon of `mountpoint`.
pub fn call(mountpoint: &Path, req: &Request) -> Result<serde_json::Value, String> {
    let path = socket_path(mountpoint);
    let conn = UnixStream::connect(&path).map_err(|e| {
        format!(
            "cannot reach the efscache daemon for {} ({}: {e}); is it mounted with efscache, and are you root?",
            mountpoint.display(),
            path.display()
        )
    })?;
    let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
    let mut w = conn.try_clone().map_err(|e| e.to_string())?;
    writeln!(w, "{}", serde_json::to_string(req).expect("request serializes")).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| format!("daemon did not answer: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("bad reply from daemon: {e}"))?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(err.to_string());
    }
    Ok(v)
}
