//! Prometheus text exposition of the daemon's status (`efscache metrics`):
//! gauges for pending work and cache use, counters for what was published
//! and retried, backend requests by kind, and flush op latency histograms.
//! The text is made from `status --json`, so the two never disagree.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets; EFS ops take
/// milliseconds, a stalled backend tens of seconds.
pub const BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A latency histogram updated lock-free by the flush workers.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket (not cumulative); the last slot counts what exceeds every bound.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS.iter().position(|b| secs <= *b).unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// `{"buckets": [[le, cumulative count], ...], "count": n, "sum_s": s}`;
    /// the last bucket's `le` is `"+Inf"`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut total = 0;
        let mut buckets = Vec::new();
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            let le = BUCKETS
                .get(i)
                .map_or(serde_json::json!("+Inf"), |b| serde_json::json!(b));
            buckets.push(serde_json::json!([le, total]));
        }
        serde_json::json!({
            "buckets": buckets,
            "count": total,
            "sum_s": self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        })
    }
}

/// Gauges and counters taken straight from status fields:
/// (metric, status key, help, is a counter).
const SIMPLE: &[(&str, &str, &str, bool)] = &[
    (
        "efscache_pending_files",
        "pending_files",
        "Files accepted but not yet on the backend.",
        false,
    ),
    (
        "efscache_pending_bytes",
        "pending_bytes",
        "Bytes of files not yet on the backend.",
        false,
    ),
    (
        "efscache_open_for_write_files",
        "open_for_write",
        "Files open for writing (published after close).",
        false,
    ),
    (
        "efscache_queued_ops",
        "queued_ops",
        "Backend ops queued or running.",
        false,
    ),
    ("efscache_in_flight_ops", "in_flight", "Backend ops running now.", false),
    (
        "efscache_retry_waiting_ops",
        "retry_waiting",
        "Ops waiting out a retry backoff.",
        false,
    ),
    (
        "efscache_dirty_dirs",
        "dirty_dirs",
        "Directories whose attributes are not yet on the backend.",
        false,
    ),
    (
        "efscache_cached_inodes",
        "cached_inodes",
        "Inodes in the metadata cache.",
        false,
    ),
    (
        "efscache_published_files_total",
        "published_files",
        "Files published to the backend.",
        true,
    ),
    (
        "efscache_published_bytes_total",
        "published_bytes",
        "Bytes published to the backend.",
        true,
    ),
    ("efscache_ops_done_total", "ops_done", "Backend ops completed.", true),
    (
        "efscache_retries_total",
        "retries",
        "Backend op attempts that failed and were retried.",
        true,
    ),
    (
        "efscache_failed_ops_total",
        "failed",
        "Backend ops that failed for good (see efscache status).",
        true,
    ),
];

fn sample(out: &mut String, name: &str, labels: &str, v: f64) {
    let _ = writeln!(out, "{name}{labels} {v}");
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Renders `status --json` output as Prometheus text (version 0.0.4).
pub fn prometheus(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let num = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    for (name, key, help, counter) in SIMPLE {
        header(&mut out, name, help, if *counter { "counter" } else { "gauge" });
        sample(&mut out, name, "", num(&v[*key]));
    }
    let cache = &v["cache"];
    header(
        &mut out,
        "efscache_cache_used_bytes",
        "Bytes held in staging files.",
        "gauge",
    );
    sample(&mut out, "efscache_cache_used_bytes", "", num(&cache["used_bytes"]));
    if let Some(l) = cache["limit_bytes"].as_f64() {
        header(
            &mut out,
            "efscache_cache_limit_bytes",
            "The cache_size budget.",
            "gauge",
        );
        sample(&mut out, "efscache_cache_limit_bytes", "", l);
    }
    header(
        &mut out,
        "efscache_cache_writers_waiting",
        "Writers waiting at open for cache space.",
        "gauge",
    );
    sample(
        &mut out,
        "efscache_cache_writers_waiting",
        "",
        num(&cache["writers_waiting"]),
    );
    header(&mut out, "efscache_journal_bytes", "Size of the journal file.", "gauge");
    sample(&mut out, "efscache_journal_bytes", "", num(&v["journal"]["bytes"]));
    header(
        &mut out,
        "efscache_journal_healthy",
        "1 while the journal can be written.",
        "gauge",
    );
    sample(
        &mut out,
        "efscache_journal_healthy",
        "",
        if v["journal"]["healthy"] == false { 0.0 } else { 1.0 },
    );
    if let Some(ops) = v["backend_ops"]["ops"].as_object() {
        let name = "efscache_backend_requests_total";
        header(&mut out, name, "Requests made to the backend, by kind.", "counter");
        for (kind, n) in ops {
            sample(&mut out, name, &format!("{{kind=\"{kind}\"}}"), num(n));
        }
    }
    if let Some(ops) = v["flush_latency"].as_object() {
        let name = "efscache_flush_op_duration_seconds";
        header(
            &mut out,
            name,
            "Time a flush op spent on the backend, by op.",
            "histogram",
        );
        for (op, h) in ops {
            for b in h["buckets"].as_array().into_iter().flatten() {
                let le = match &b[0] {
                    serde_json::Value::String(s) => s.clone(),
                    x => x.to_string(),
                };
                sample(
                    &mut out,
                    &format!("{name}_bucket"),
                    &format!("{{op=\"{op}\",le=\"{le}\"}}"),
                    num(&b[1]),
                );
            }
            sample(
                &mut out,
                &format!("{name}_sum"),
                &format!("{{op=\"{op}\"}}"),
                num(&h["sum_s"]),
            );
            sample(
                &mut out,
                &format!("{name}_count"),
                &format!("{{op=\"{op}\"}}"),
                num(&h["count"]),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_inf() {
        let h = Histogram::default();
        for ms in [0.5, 3.0, 3.0, 70.0, 90_000.0] {
            h.record(Duration::from_secs_f64(ms / 1000.0));
        }
        let j = h.to_json();
        let b = j["buckets"].as_array().unwrap();
        assert_eq!(b[0], serde_json::json!([0.001, 1]));
        assert_eq!(b[2], serde_json::json!([0.005, 3]));
        assert_eq!(b[6], serde_json::json!([0.1, 4]));
        assert_eq!(b.last().unwrap(), &serde_json::json!(["+Inf", 5]));
        assert_eq!(j["count"], 5);
        let text = prometheus(&serde_json::json!({"flush_latency": {"publish": j}, "published_files": 7}));
        assert!(
            text.contains("efscache_flush_op_duration_seconds_bucket{op=\"publish\",le=\"0.005\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("efscache_flush_op_duration_seconds_bucket{op=\"publish\",le=\"+Inf\"} 5\n"));
        assert!(text.contains("efscache_flush_op_duration_seconds_count{op=\"publish\"} 5\n"));
        assert!(text.contains("# TYPE efscache_published_files_total counter\nefscache_published_files_total 7\n"));
    }
}
