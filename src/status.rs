//! `efscache status`: what the daemon reports, and how the CLI prints it
//! (once, or as a live view with publish rate and time to drained).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::fs::Fs;

/// The daemon's status as JSON (the `--json` output, stable field names).
pub fn collect(fs: &Fs, cfg: &Config, started: Instant, recovery: &serde_json::Value) -> serde_json::Value {
    let journal = fs.journal().map(|j| {
        let (bytes, live_records, live_bytes) = j.usage();
        serde_json::json!({
            "bytes": bytes,
            "live_records": live_records,
            "live_bytes": live_bytes,
            "healthy": j.healthy(),
            "appends": j.stats().appends.load(Ordering::Relaxed),
            "appended_bytes": j.stats().bytes.load(Ordering::Relaxed),
            "append_ns": j.stats().append_nanos.load(Ordering::Relaxed),
            "syncs": j.stats().syncs.load(Ordering::Relaxed),
            "sync_ns": j.stats().sync_nanos.load(Ordering::Relaxed),
        })
    });
    let st = fs.status();
    let sched = fs.sched.snapshot();
    let s = &fs.sched.stats;
    serde_json::json!({
        "mountpoint": cfg.mountpoint,
        "backend": cfg.backend,
        "pid": std::process::id(),
        "uptime_s": started.elapsed().as_secs_f64(),
        "pending_files": st.dirty_files + sched.pending_publishes,
        "pending_bytes": st.pending_bytes,
        "open_for_write": st.open_for_write,
        "waiting_debounce": st.waiting_debounce,
        "dirty_dirs": st.dirty_dirs,
        "temps_to_remove": st.temps_to_remove,
        "queued_ops": sched.queued_ops,
        "in_flight": sched.in_flight,
        "retry_waiting": sched.retry_waiting,
        "last_retry": sched.last_retry,
        "published_files": s.files_published.load(Ordering::Relaxed),
        "published_bytes": s.bytes_published.load(Ordering::Relaxed),
        "ops_done": s.ops_done.load(Ordering::Relaxed),
        "retries": s.retries.load(Ordering::Relaxed),
        "failed": s.failed.load(Ordering::Relaxed),
        "failures": sched.failures,
        "cached_inodes": st.inodes,
        "data_path": if fs.passthrough_enabled() { "passthrough" } else { "served" },
        "backend_ops": fs.backend.stats().snapshot(),
        "cache": fs.cache_status(),
        "capabilities": fs.capabilities(),
        "flush_latency": crate::flush::Action::KINDS
            .iter()
            .zip(&s.latency)
            .map(|(k, h)| (k.to_string(), h.to_json()))
            .collect::<serde_json::Map<_, _>>(),
        "journal": journal,
        "recovery": recovery,
        "config": cfg,
    })
}

/// The latest error that sent a backend op to retry, while one waits to
/// (empty otherwise): an op that keeps failing shows what the backend says.
fn retrying_line(v: &serde_json::Value) -> String {
    let r = &v["last_retry"];
    if !r.is_object() {
        return String::new();
    }
    format!(
        "  RETRYING {} {}: {} (attempt {}; efscache retries until the backend accepts it)\n",
        r["op"].as_str().unwrap_or("?"),
        r["path"].as_str().unwrap_or("?"),
        r["error"].as_str().unwrap_or("?"),
        r["attempts"].as_u64().unwrap_or(0)
    )
}

/// Human-readable rendering of `collect`'s output.
pub fn render(v: &serde_json::Value) -> String {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let mut out = String::new();
    out.push_str(&format!("mountpoint    {}\n", v["mountpoint"].as_str().unwrap_or("?")));
    out.push_str(&format!("backend       {}\n", v["backend"].as_str().unwrap_or("?")));
    out.push_str(&format!(
        "pending       {} files, {} bytes ({} open for writing, {} waiting to settle)\n",
        n("pending_files"),
        n("pending_bytes"),
        n("open_for_write"),
        n("waiting_debounce")
    ));
    out.push_str(&queue_line(v));
    out.push_str(&format!(
        "published     {} files, {} bytes ({} backend changes)\n",
        n("published_files"),
        n("published_bytes"),
        n("ops_done")
    ));
    out.push_str(&format!(
        "retries       {}\nfailed        {}\n",
        n("retries"),
        n("failed")
    ));
    out.push_str(&retrying_line(v));
    if let Some(fails) = v["failures"].as_array() {
        for f in fails.iter().take(20) {
            out.push_str(&format!(
                "  FAILED {} {}: {}\n",
                f["op"].as_str().unwrap_or("?"),
                f["path"].as_str().unwrap_or("?"),
                f["error"].as_str().unwrap_or("?")
            ));
        }
    }
    let j = &v["journal"];
    if j.is_object() {
        out.push_str(&format!(
            "journal       {} bytes, {} live records{}\n",
            j["bytes"].as_u64().unwrap_or(0),
            j["live_records"].as_u64().unwrap_or(0),
            if j["healthy"].as_bool() == Some(false) {
                " -- CANNOT WRITE: changes are refused (EIO); free or fix the cache dir's disk, then unmount and mount again"
            } else {
                ""
            }
        ));
    }
    let r = &v["recovery"];
    if r.is_object() {
        out.push_str(&format!(
            "recovered     the last run's journal in {:.2} s before serving: {} ops queued again ({} already on the backend), {} files/dirs taken back, {} temp files removed, {} not recoverable (see the log)\n",
            r["seconds"].as_f64().unwrap_or(0.0),
            r["ops_queued"].as_u64().unwrap_or(0),
            r["ops_already_applied"].as_u64().unwrap_or(0),
            r["states"].as_u64().unwrap_or(0),
            r["orphans_removed"].as_u64().unwrap_or(0),
            r["failed"].as_u64().unwrap_or(0)
        ));
    }
    if let Some(c) = render_cache(v) {
        out.push_str(&c);
    }
    if let Some(c) = v.get("capabilities").filter(|c| c.is_object()) {
        let refused: Vec<String> = [
            ("devices_refused", "device nodes"),
            ("fifos_refused", "fifos"),
            ("sockets_refused", "sockets"),
        ]
        .iter()
        .filter_map(|(k, what)| c[*k].as_i64().map(|e| format!("{what} (errno {e})")))
        .collect();
        let x = &c["xattrs"];
        let kept: Vec<&str> = [
            ("user", "user.*"),
            ("trusted", "trusted.*"),
            ("security", "security.*"),
            ("acls", "POSIX ACLs"),
        ]
        .iter()
        .filter(|(k, _)| x[*k].as_bool() == Some(true))
        .map(|(_, what)| *what)
        .collect();
        // The time granularity decides whether another client's in-place
        // change of a file this mount published can be told (SEMANTICS).
        let times = match c["time_granularity_ns"].as_u64() {
            Some(g) => format!("times to {g} ns"),
            None => "time granularity unknown".to_string(),
        };
        out.push_str(&format!(
            "backend       refuses {}; extended attributes: {}; {times}\n",
            if refused.is_empty() {
                "nothing probed".to_string()
            } else {
                refused.join(", ")
            },
            if kept.is_empty() {
                "none (refused with EOPNOTSUPP)".to_string()
            } else {
                kept.join(", ")
            }
        ));
    }
    out.push_str(&format!("cached inodes {}\n", n("cached_inodes")));
    out.push_str(&format!("data path     {}\n", v["data_path"].as_str().unwrap_or("?")));
    if let Some(ops) = v["backend_ops"]["ops"].as_object() {
        let list: Vec<String> = ops
            .iter()
            .filter(|(_, c)| c.as_u64().unwrap_or(0) > 0)
            .map(|(k, c)| format!("{k}={c}"))
            .collect();
        out.push_str(&format!(
            "backend ops   {}\n",
            if list.is_empty() { "none".into() } else { list.join(" ") }
        ));
    }
    out
}

/// The queue's line, the same in `status` and `--watch`.
fn queue_line(v: &serde_json::Value) -> String {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    format!(
        "queue         {} ops queued, {} in flight, {} waiting to retry\n",
        n("queued_ops"),
        n("in_flight"),
        n("retry_waiting")
    )
}

/// "1.5 GiB", "12 KiB", "512 B".
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

/// "2h 05m", "3m 20s", "45s".
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h {:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// The `cache` object (local cache use and backpressure), when the daemon
/// reports one.
fn render_cache(v: &serde_json::Value) -> Option<String> {
    let c = v.get("cache").filter(|c| c.is_object())?;
    let mut parts = Vec::new();
    if let Some(u) = c["used_bytes"].as_u64() {
        match c["limit_bytes"].as_u64() {
            Some(l) if l > 0 => parts.push(format!(
                "{} of {} used ({:.0}%)",
                human_bytes(u),
                human_bytes(l),
                u as f64 * 100.0 / l as f64
            )),
            _ => parts.push(format!("{} used", human_bytes(u))),
        }
    }
    if let Some(p) = c["peak_used_bytes"].as_u64() {
        parts.push(format!("peak {}", human_bytes(p)));
    }
    if let Some(n) = c["clean_copies"].as_u64().filter(|n| *n > 0) {
        parts.push(format!("{n} published files kept for rereading"));
    }
    if let Some(a) = c["disk_available_bytes"].as_u64() {
        let low = if c["disk_low"] == true { " (LOW)" } else { "" };
        parts.push(format!("{} free on the cache disk{low}", human_bytes(a)));
    }
    if let Some(w) = c["writers_waiting"].as_u64().filter(|w| *w > 0) {
        parts.push(format!("{w} writers waiting for space"));
    }
    if let Some(t) = c["writers_throttled"].as_u64().filter(|t| *t > 0) {
        parts.push(format!("{t} opens held back so far"));
    }
    (!parts.is_empty()).then(|| format!("cache         {}\n", parts.join(", ")))
}

/// True when the daemon has nothing left to publish: no pending files or
/// directories, nothing queued, running or waiting to retry.
pub fn is_drained(v: &serde_json::Value) -> bool {
    [
        "pending_files",
        "dirty_dirs",
        "queued_ops",
        "in_flight",
        "retry_waiting",
    ]
    .iter()
    .all(|k| v[*k].as_u64() == Some(0))
        && v["temps_to_remove"].as_u64().unwrap_or(0) == 0
}

/// Publish rates measured between successive status samples (smoothed), and
/// the time to drained they imply.
#[derive(Debug, Default)]
pub struct Rates {
    last: Option<(Instant, u64, u64)>,
    /// Files and bytes published per second.
    pub files_per_s: Option<f64>,
    pub bytes_per_s: Option<f64>,
}

impl Rates {
    /// Weight of the newest sample in the smoothed rate.
    const ALPHA: f64 = 0.3;

    /// Takes a status sample taken at `at`.
    pub fn update(&mut self, at: Instant, v: &serde_json::Value) {
        let files = v["published_files"].as_u64().unwrap_or(0);
        let bytes = v["published_bytes"].as_u64().unwrap_or(0);
        if let Some((t0, f0, b0)) = self.last {
            let dt = at.saturating_duration_since(t0).as_secs_f64();
            if files < f0 || bytes < b0 {
                // Another daemon (a remount): start over.
                self.files_per_s = None;
                self.bytes_per_s = None;
            } else if dt > 0.0 {
                let smooth =
                    |old: Option<f64>, new: f64| Some(old.map_or(new, |o| Self::ALPHA * new + (1.0 - Self::ALPHA) * o));
                self.files_per_s = smooth(self.files_per_s, (files - f0) as f64 / dt);
                self.bytes_per_s = smooth(self.bytes_per_s, (bytes - b0) as f64 / dt);
            }
        }
        self.last = Some((at, files, bytes));
    }

    /// Estimated time until nothing is pending: None while no rate is known
    /// (or nothing is being published).
    pub fn eta(&self, v: &serde_json::Value) -> Option<Duration> {
        if is_drained(v) {
            return Some(Duration::ZERO);
        }
        let files = v["pending_files"].as_u64().unwrap_or(0) as f64;
        let bytes = v["pending_bytes"].as_u64().unwrap_or(0) as f64;
        let by_files = self.files_per_s.filter(|r| *r > 0.0).map(|r| files / r);
        let by_bytes = self.bytes_per_s.filter(|r| *r > 0.0).map(|r| bytes / r);
        let secs = match (by_files, by_bytes) {
            (Some(a), Some(b)) => a.max(b),
            (a, b) => a.or(b)?,
        };
        Some(Duration::from_secs_f64(secs.min(1e9)))
    }
}

/// One frame of `efscache status --watch`.
pub fn render_watch(v: &serde_json::Value, rates: &Rates) -> String {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let mut out = String::new();
    out.push_str(&format!(
        "efscache {} (backend {})\n\n",
        v["mountpoint"].as_str().unwrap_or("?"),
        v["backend"].as_str().unwrap_or("?")
    ));
    out.push_str(&format!(
        "pending       {} files, {} ({} open for writing, {} directories)\n",
        n("pending_files"),
        human_bytes(n("pending_bytes")),
        n("open_for_write"),
        n("dirty_dirs")
    ));
    let rate = match (rates.files_per_s, rates.bytes_per_s) {
        (Some(f), Some(b)) => format!("{f:.0} files/s, {}/s", human_bytes(b as u64)),
        _ => "measuring...".into(),
    };
    out.push_str(&format!("publishing    {rate}\n"));
    let eta = if is_drained(v) {
        "drained: everything is on the backend".to_string()
    } else {
        match rates.eta(v) {
            Some(d) => format!("~{} to drained", human_duration(d)),
            None => "unknown (nothing published in the last interval)".into(),
        }
    };
    out.push_str(&format!("eta           {eta}\n"));
    out.push_str(&queue_line(v));
    out.push_str(&format!(
        "published     {} files, {} since mount\n",
        n("published_files"),
        human_bytes(n("published_bytes"))
    ));
    out.push_str(&format!(
        "retries       {}\nfailed        {}\n",
        n("retries"),
        n("failed")
    ));
    out.push_str(&retrying_line(v));
    if let Some(c) = render_cache(v) {
        out.push_str(&c);
    }
    if v["journal"]["healthy"].as_bool() == Some(false) {
        out.push_str("journal       CANNOT WRITE: changes are refused (EIO); free or fix the cache dir's disk, then unmount and mount again\n");
    }
    if let Some(fails) = v["failures"].as_array() {
        for f in fails.iter().take(5) {
            out.push_str(&format!(
                "  FAILED {} {}: {}\n",
                f["op"].as_str().unwrap_or("?"),
                f["path"].as_str().unwrap_or("?"),
                f["error"].as_str().unwrap_or("?")
            ));
        }
        if fails.len() > 5 {
            out.push_str(&format!("  ... {} more (efscache status)\n", fails.len() - 5));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(pending: u64, files: u64, bytes: u64) -> serde_json::Value {
        json!({
            "mountpoint": "/mnt/efs", "backend": "/mnt/efs",
            "pending_files": pending, "pending_bytes": pending * 1000,
            "dirty_dirs": 0, "queued_ops": pending, "in_flight": 0, "retry_waiting": 0,
            "published_files": files, "published_bytes": bytes,
        })
    }

    #[test]
    fn rates_and_eta() {
        let t = Instant::now();
        let mut r = Rates::default();
        r.update(t, &sample(1000, 0, 0));
        assert_eq!(r.eta(&sample(1000, 0, 0)), None, "no rate from one sample");
        let v = sample(900, 100, 100_000);
        r.update(t + Duration::from_secs(1), &v);
        assert_eq!(r.files_per_s, Some(100.0));
        // 900 files at 100/s, 900 kB at 100 kB/s: 9 s either way.
        assert_eq!(r.eta(&v), Some(Duration::from_secs(9)));
        let v = sample(900, 100, 100_000);
        r.update(t + Duration::from_secs(2), &v);
        assert_eq!(r.files_per_s, Some(70.0), "smoothed");
        r.update(t + Duration::from_secs(3), &sample(0, 5, 5));
        assert_eq!(r.files_per_s, None, "a remount resets the rates");
        let drained = sample(0, 5, 5);
        assert!(is_drained(&drained));
        assert_eq!(r.eta(&drained), Some(Duration::ZERO));
        assert!(render_watch(&drained, &r).contains("drained"));
    }

    #[test]
    fn cache_is_shown_only_when_reported() {
        let mut v = sample(3, 1, 1);
        assert!(!render_watch(&v, &Rates::default()).contains("\ncache "));
        v["cache"] = json!({"used_bytes": 1u64 << 30, "limit_bytes": 4u64 << 30, "peak_used_bytes": 2u64 << 30,
            "disk_available_bytes": 512, "disk_low": true, "writers_waiting": 1, "writers_throttled": 2});
        let out = render_watch(&v, &Rates::default());
        assert!(
            out.contains("cache         1.0 GiB of 4.0 GiB used (25%), peak 2.0 GiB, 512 B free on the cache disk (LOW), 1 writers waiting for space, 2 opens held back so far"),
            "{out}"
        );
        assert!(render(&v).contains("1.0 GiB of 4.0 GiB"));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_duration(Duration::from_secs(7325)), "2h 02m");
        assert_eq!(human_duration(Duration::from_secs(200)), "3m 20s");
    }
}
