//! `efscache demo`: the whole path in one command on a fresh machine. Starts
//! efs-sim (an EFS emulator, efs-typical profile) over a scratch directory,
//! rsyncs a sample tree onto it directly, then mounts efscache stacked on the
//! same path (as in production), rsyncs the tree through it, syncs, verifies
//! the emulated EFS against the source and prints the times side by side.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Cleanup {
    efscache: Option<PathBuf>,
    efs_sim: Option<(PathBuf, u32)>,
    scratch: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mp) = self.efscache.take() {
            let _ = fusemount::unmount_if_ours(&mp, crate::fuse::session::SUBTYPE, None, true);
        }
        if let Some((mp, pid)) = self.efs_sim.take() {
            // SAFETY: signalling the efs-sim process this command started.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            for _ in 0..100 {
                if !fusemount::top_mount_at(&mp)
                    .ok()
                    .flatten()
                    .is_some_and(|m| m.is_fuse_subtype("efs-sim"))
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if let Some(s) = self.scratch.take() {
            let _ = std::fs::remove_dir_all(s);
        }
    }
}

fn sh(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A deterministic sample tree: `files` files of 1–64 KiB in directories of 100.
fn make_sample(root: &Path, files: usize) -> Result<u64, String> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut total = 0;
    for i in 0..files {
        let dir = root.join(format!("dir{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let size = 1024 + (x % (63 * 1024)) as usize;
        let data: Vec<u8> = (0..size)
            .map(|k| (x.rotate_left(k as u32 % 64) as u8) ^ (k as u8))
            .collect();
        std::fs::write(dir.join(format!("file{i:05}.dat")), &data).map_err(|e| e.to_string())?;
        total += size as u64;
    }
    Ok(total)
}

fn rsync(src: &Path, dst: &Path) -> Result<Duration, String> {
    let t = Instant::now();
    sh(Command::new("rsync")
        .args(["-aH", "--numeric-ids"])
        .arg(format!("{}/", src.display()))
        .arg(dst))?;
    Ok(t.elapsed())
}

/// Files and bytes of the tree at `root` (regular files only).
fn measure_tree(root: &Path) -> Result<(usize, u64), String> {
    let (mut files, mut bytes) = (0, 0);
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
            let e = e.map_err(|e| format!("{}: {e}", d.display()))?;
            let md = e.metadata().map_err(|err| format!("{}: {err}", e.path().display()))?;
            if md.is_dir() {
                dirs.push(e.path());
            } else if md.is_file() {
                files += 1;
                bytes += md.len();
            }
        }
    }
    Ok((files, bytes))
}

pub fn run(files: usize, tree: Option<&Path>, profile: &str, keep: bool) -> Result<i32, String> {
    if which("rsync").is_none() {
        return Err("rsync is not installed (apt-get install -y rsync fuse3)".into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let sim = exe.with_file_name("efs-sim");
    let scratch = std::env::temp_dir().join(format!("efscache-demo-{}", std::process::id()));
    let mut cleanup = Cleanup {
        efscache: None,
        efs_sim: None,
        scratch: (!keep).then(|| scratch.clone()),
    };
    let (backing, efs, cache) = (scratch.join("efs-backing"), scratch.join("efs"), scratch.join("cache"));
    for d in [&backing, &efs, &cache] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    println!("efscache demo in {}", scratch.display());
    let (src, files, bytes) = match tree {
        Some(t) => {
            let (files, bytes) = measure_tree(t)?;
            (t.to_path_buf(), files, bytes)
        }
        None => {
            let src = scratch.join("src");
            let bytes = make_sample(&src, files)?;
            (src, files, bytes)
        }
    };
    println!(
        "tree {}: {files} files, {:.1} MiB",
        src.display(),
        bytes as f64 / 1048576.0
    );

    let profile = if sim.exists() {
        // The daemon keeps stdout open: read its pid line, do not wait for EOF.
        let mut child = Command::new(&sim)
            .args(["--profile", profile, "--daemon"])
            .arg(&backing)
            .arg(&efs)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: {e}", sim.display()))?;
        let mut out = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
            &mut out,
        )
        .map_err(|e| e.to_string())?;
        let _ = child.wait();
        let pid: u32 = out
            .trim()
            .parse()
            .map_err(|_| format!("efs-sim printed {out:?}, not its pid"))?;
        cleanup.efs_sim = Some((efs.clone(), pid));
        format!("efs-sim {profile}")
    } else {
        println!(
            "(efs-sim not found next to {}: build it with `cargo build --release --workspace`;",
            exe.display()
        );
        println!(" using a plain local directory as the backend instead)");
        std::fs::remove_dir(&efs).ok();
        std::os::unix::fs::symlink(&backing, &efs).map_err(|e| e.to_string())?;
        "local directory".to_string()
    };

    println!("\n1. rsync -aH directly onto the backend ({profile}) ...");
    let direct = rsync(&src, &efs.join("direct"))?;
    println!(
        "   {:.2} s ({:.0} files/s)",
        direct.as_secs_f64(),
        files as f64 / direct.as_secs_f64()
    );

    println!(
        "\n2. efscache mount {} {} (stacked on the same path) ...",
        efs.display(),
        efs.display()
    );
    let opts = format!("cache_dir={},debounce=100ms", cache.display());
    sh(Command::new(&exe).arg("mount").arg(&efs).arg(&efs).arg("-o").arg(&opts))?;
    cleanup.efscache = Some(efs.clone());
    let t0 = Instant::now();
    let returned = rsync(&src, &efs.join("cached"))?;
    println!(
        "   rsync returned after {:.2} s ({:.0} files/s)",
        returned.as_secs_f64(),
        files as f64 / returned.as_secs_f64()
    );
    print!(
        "{}",
        sh(Command::new(&exe).arg("status").arg(&efs))?
            .lines()
            .map(|l| format!("   {l}\n"))
            .collect::<String>()
    );
    sh(Command::new(&exe).arg("sync").arg(&efs))?;
    let durable = t0.elapsed();
    println!(
        "   efscache sync: everything on the backend after {:.2} s",
        durable.as_secs_f64()
    );
    sh(Command::new(&exe).arg("umount").arg(&efs))?;
    cleanup.efscache = None;

    println!("\n3. verifying the backend against the source (checksums) ...");
    let diff = sh(Command::new("rsync")
        .args(["-aHnci", "--numeric-ids", "--delete"])
        .arg(format!("{}/", src.display()))
        .arg(backing.join("cached")))?;
    let bad: Vec<&str> = diff.lines().filter(|l| !l.trim().is_empty()).collect();
    if !bad.is_empty() {
        return Err(format!("the backend differs from the source:\n{}", bad.join("\n")));
    }
    println!("   identical: content, modes, owners, times, links");
    println!("\nsummary ({files} files, {profile}):");
    println!("   direct rsync                {:>8.2} s", direct.as_secs_f64());
    println!(
        "   efscache, rsync returned    {:>8.2} s   {:>5.1}x faster",
        returned.as_secs_f64(),
        direct.as_secs_f64() / returned.as_secs_f64()
    );
    println!(
        "   efscache, durable on EFS    {:>8.2} s   {:>5.1}x faster",
        durable.as_secs_f64(),
        direct.as_secs_f64() / durable.as_secs_f64()
    );
    if keep {
        println!("\nkept {} (efs-sim stopped)", scratch.display());
    }
    Ok(0)
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.exists())
}
