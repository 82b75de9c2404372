//! `efscache metrics`: Prometheus text with the same counters as `status`,
//! and flush latency histograms that account for every op.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::{BIN, Mount, Scratch, make_tree, run};

/// Metric samples by name with labels (`name{labels}` -> value).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("sample line");
            (k.to_string(), v.parse().expect("value"))
        })
        .collect()
}

#[test]
fn metrics_match_status_and_histograms_count_every_op() {
    let s = Scratch::new();
    make_tree(&s.path("src"), 5, None);
    let m = Mount::start(&s.path("backend"), &s.path("mnt"), &s.path("cache"), "debounce=0ms");
    run(Command::new("rsync")
        .args(["-aH", "--numeric-ids"])
        .arg(format!("{}/", s.path("src").display()))
        .arg(s.path("mnt/dst")));
    m.sync();
    let text = run(Command::new(BIN).arg("metrics").arg(s.path("mnt")));
    let status = m.status();
    let got = samples(&text);
    for (metric, key) in [
        ("efscache_published_files_total", "published_files"),
        ("efscache_published_bytes_total", "published_bytes"),
        ("efscache_ops_done_total", "ops_done"),
        ("efscache_pending_files", "pending_files"),
    ] {
        assert_eq!(got[metric], status[key].as_f64().unwrap(), "{metric}");
    }
    assert!(
        got["efscache_published_files_total"] > 100.0,
        "the rsync published too little"
    );
    assert_eq!(got["efscache_pending_files"], 0.0);
    assert!(got["efscache_backend_requests_total{kind=\"create\"}"] > 0.0);

    // Every op that ran is in its histogram; buckets never decrease.
    let mut histogram_total = 0.0;
    for op in [
        "mkdir", "rmdir", "unlink", "rename", "symlink", "link", "mknod", "setattr", "publish",
    ] {
        let count = got[&format!("efscache_flush_op_duration_seconds_count{{op=\"{op}\"}}")];
        let prefix = format!("efscache_flush_op_duration_seconds_bucket{{op=\"{op}\",le=\"");
        let mut buckets: Vec<(f64, f64)> = got
            .iter()
            .filter_map(|(k, v)| {
                let le = k.strip_prefix(&prefix)?.trim_end_matches("\"}");
                Some((
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    },
                    *v,
                ))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(buckets.len(), 16, "{op}: buckets");
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{op}: buckets decrease: {buckets:?}"
        );
        let inf = got[&format!("efscache_flush_op_duration_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}}")];
        assert_eq!(inf, count, "{op}: +Inf bucket vs count");
        histogram_total += count;
    }
    assert!(
        histogram_total >= got["efscache_ops_done_total"],
        "{histogram_total} timed ops, {} done",
        got["efscache_ops_done_total"]
    );

    // The textfile collector's file is written whole.
    let prom = s.path("cache/../efscache.prom");
    run(Command::new(BIN)
        .arg("metrics")
        .arg(s.path("mnt"))
        .arg("--textfile")
        .arg(&prom));
    let file = std::fs::read_to_string(&prom).unwrap();
    assert!(
        file.contains("# TYPE efscache_flush_op_duration_seconds histogram"),
        "{file}"
    );
    m.umount();
}
