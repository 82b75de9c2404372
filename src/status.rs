//! `efscache status`: what the daemon reports, and how the CLI prints it.

use std::sync::atomic::Ordering;
use std::time::Instant;

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
        "queued_ops": sched.queued_ops,
        "in_flight": sched.in_flight,
        "retry_waiting": sched.retry_waiting,
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
        "journal": journal,
        "recovery": recovery,
        "config": cfg,
    })
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
    out.push_str(&format!(
        "queue         {} ops queued, {} in flight, {} waiting to retry\n",
        n("queued_ops"),
        n("in_flight"),
        n("retry_waiting")
    ));
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
                " -- CANNOT WRITE: new changes are not crash-safe; check the cache dir's disk"
            } else {
                ""
            }
        ));
    }
    let r = &v["recovery"];
    if r.is_object() {
        out.push_str(&format!(
            "recovered     {} journaled ops replayed, {} files/dirs taken back, {} temp files removed, {} not recoverable (at mount)\n",
            r["ops"].as_u64().unwrap_or(0),
            r["states"].as_u64().unwrap_or(0),
            r["orphans_removed"].as_u64().unwrap_or(0),
            r["failed"].as_u64().unwrap_or(0)
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
