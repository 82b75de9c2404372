//! POSIX conformance with pjdfstest (the Rust rewrite; install it with
//! `cargo install pjdfstest --locked`). The suite runs three times with the
//! same configuration (`tests/pjdfstest/pjdfstest.toml`):
//!
//! 1. the baseline: a plain directory on the local disk, the kind of
//!    directory efscache's backend is in these runs;
//! 2. through efscache over such a directory with `debounce=0ms`: files are
//!    published while the suite is still working on them;
//! 3. through efscache with `debounce=1h`: everything the suite does stays
//!    unpublished in the overlay.
//!
//! Every test that passes on the baseline must pass through efscache, except
//! the known failures listed in `KNOWN_FAILURES`, each with its cause (also in
//! docs/SEMANTICS.md, "Conformance"). An entry that passes in every run
//! through efscache fails this test too, so the list only holds what is still
//! true. After each run the mount is synced (no publish may fail) and must
//! equal its backend.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Tests that pass on the baseline but not through efscache: (test name,
/// cause). Remove an entry when its cause is fixed.
const KNOWN_FAILURES: &[(&str, &str)] = &[(
    "link::link_count_max",
    "skipped on FUSE: glibc's pathconf(_PC_LINK_MAX) knows no limit for a \
         FUSE filesystem (answers 127, 'unknown'), so pjdfstest cannot test \
         EMLINK there; not something the daemon can change",
)];

/// The baseline passes about 385 tests; far fewer means the suite was set up
/// wrongly (missing users, wrong configuration), not that all is well.
const MIN_BASELINE_PASSES: usize = 300;

/// Most one run of the suite may take (it takes seconds).
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

fn config_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pjdfstest/pjdfstest.toml")
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `$PJDFSTEST`, else `pjdfstest` on PATH, else in cargo's bin directory.
fn find_pjdfstest() -> PathBuf {
    if let Some(p) = std::env::var_os("PJDFSTEST") {
        let p = PathBuf::from(p);
        assert!(is_executable(&p), "PJDFSTEST={} is not an executable", p.display());
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    std::env::split_paths(&path)
        .chain(cargo_home.map(|h| h.join("bin")))
        .map(|d| d.join("pjdfstest"))
        .find(|p| is_executable(p))
        .unwrap_or_else(|| {
            panic!(
                "pjdfstest is not installed (looked in $PJDFSTEST, PATH and ~/.cargo/bin); \
                 install it with `cargo install pjdfstest --locked`"
            )
        })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Failed,
    Skipped,
}

struct Run {
    label: String,
    outcomes: BTreeMap<String, Outcome>,
    /// The lines pjdfstest prints below a test (failure message, skip reason).
    details: BTreeMap<String, String>,
    summary: String,
    elapsed: Duration,
}

impl Run {
    fn count(&self, o: Outcome) -> usize {
        self.outcomes.values().filter(|v| **v == o).count()
    }
}

/// Parses pjdfstest's report: one line per test, `NAME <spaces> RESULT`, then
/// tab-indented lines about it.
fn parse(out: &str) -> (BTreeMap<String, Outcome>, BTreeMap<String, String>) {
    let mut outcomes = BTreeMap::new();
    let mut details: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in out.lines() {
        if line.starts_with(char::is_whitespace) {
            if let Some(name) = &current {
                let d = details.entry(name.clone()).or_default();
                d.push_str(line);
                d.push('\n');
            }
            continue;
        }
        current = None;
        let Some((name, rest)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        if !name.contains("::") {
            continue;
        }
        let outcome = match rest.trim() {
            "ok" => Outcome::Ok,
            "FAILED" => Outcome::Failed,
            "skipped" => Outcome::Skipped,
            // No expected failures are configured, so these do not occur.
            other => panic!("unknown pjdfstest result {other:?} in line {line:?}"),
        };
        outcomes.insert(name.to_string(), outcome);
        current = Some(name.to_string());
    }
    (outcomes, details)
}

/// Runs the whole suite in `dir`, with `secondary` as the other filesystem
/// (for the EXDEV tests).
fn run_suite(bin: &Path, label: &str, dir: &Path, secondary: &Path) -> Run {
    let t = Instant::now();
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(config_file())
        .arg("-p")
        .arg(dir)
        .arg("-s")
        .arg(secondary)
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for pjdfstest") {
            break Some(st);
        }
        if t.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = t.elapsed();
    let out = out_reader.join().unwrap();
    let err = err_reader.join().unwrap();
    let summary = out
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .map(str::to_string)
        .unwrap_or_else(|| {
            panic!(
                "pjdfstest ({label}) did not finish ({}):\n{out}\n{err}",
                match status {
                    Some(s) => format!("{s}"),
                    None => format!("killed after {RUN_TIMEOUT:?}"),
                }
            )
        });
    let (outcomes, details) = parse(&out);
    assert!(
        !outcomes.is_empty(),
        "no test results from pjdfstest ({label}):\n{out}\n{err}"
    );
    Run {
        label: label.to_string(),
        outcomes,
        details,
        summary,
        elapsed,
    }
}

/// The suite through a fresh efscache mount over a fresh local directory.
fn run_through_efscache(bin: &Path, debounce: &str) -> Run {
    let s = Scratch::new();
    let other_fs = LowerMount::new(&s);
    let m = Mount::start(
        &s.path("backend"),
        &s.path("mnt"),
        &s.path("cache"),
        &format!("debounce={debounce}"),
    );
    let run = run_suite(
        bin,
        &format!("efscache debounce={debounce}"),
        &s.path("mnt"),
        &other_fs.path,
    );
    // Whatever the suite left must reach the backend as it is seen through
    // the mount, and no publish may have failed.
    m.sync();
    assert_same_tree(&s.path("mnt"), &s.path("backend"));
    m.umount();
    run
}

#[test]
fn pjdfstest_passes_through_efscache_as_on_its_backend() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "pjdfstest needs root (it switches users and mounts efscache)"
    );
    let bin = find_pjdfstest();
    let version = run(Command::new(&bin).arg("--version"));

    let baseline = {
        let s = Scratch::new();
        let other_fs = LowerMount::new(&s);
        run_suite(&bin, "baseline (local directory)", &s.path("backend"), &other_fs.path)
    };
    let runs = [run_through_efscache(&bin, "0ms"), run_through_efscache(&bin, "1h")];

    println!(
        "{} ({}), config {}",
        version.trim(),
        bin.display(),
        config_file().display()
    );
    println!(
        "{:<30} {:>6} {:>6} {:>7} {:>8}",
        "run", "passed", "failed", "skipped", "time"
    );
    for r in std::iter::once(&baseline).chain(&runs) {
        println!(
            "{:<30} {:>6} {:>6} {:>7} {:>7.1}s",
            r.label,
            r.count(Outcome::Ok),
            r.count(Outcome::Failed),
            r.count(Outcome::Skipped),
            r.elapsed.as_secs_f64()
        );
        println!("    {}", r.summary);
    }
    let passes = baseline.count(Outcome::Ok);
    assert!(
        passes >= MIN_BASELINE_PASSES,
        "the baseline passed only {passes} tests: is the suite set up right (users nobody/nogroup and \
         daemon/daemon in tests/pjdfstest/pjdfstest.toml)?\n{:#?}",
        baseline.details
    );

    let known: BTreeMap<&str, &str> = KNOWN_FAILURES.iter().copied().collect();
    let mut problems = Vec::new();
    for r in &runs {
        for (name, o) in &baseline.outcomes {
            if *o != Outcome::Ok {
                continue;
            }
            let got = r.outcomes.get(name).copied();
            if got == Some(Outcome::Ok) {
                continue;
            }
            let detail = r.details.get(name).map(String::as_str).unwrap_or("").trim_end();
            let what = match got {
                Some(o) => format!("{o:?}"),
                None => "not run".to_string(),
            };
            if let Some(cause) = known.get(name.as_str()) {
                println!("known failure, {}: {name} {what}\n    cause: {cause}", r.label);
            } else {
                problems.push(format!(
                    "{}: {name} passes on the baseline, {what} through efscache:\n{detail}",
                    r.label
                ));
            }
        }
    }
    for (name, _) in KNOWN_FAILURES {
        let passes_everywhere = runs.iter().all(|r| r.outcomes.get(*name) == Some(&Outcome::Ok));
        if !baseline.outcomes.contains_key(*name) {
            problems.push(format!("KNOWN_FAILURES names {name}, which pjdfstest does not have"));
        } else if passes_everywhere {
            problems.push(format!(
                "{name} passes through efscache now: remove it from KNOWN_FAILURES \
                 (and from docs/SEMANTICS.md, Conformance)"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} conformance problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}
