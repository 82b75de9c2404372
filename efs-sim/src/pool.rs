//! The worker pool that serves requests.
//!
//! fuser's event-loop threads only decode a request and hand it here; a worker
//! waits out the request's cost, does the real syscall and sends the reply from
//! its own thread. The number of workers is the number of requests in flight
//! (`--max-inflight`): more arrive, they queue.

use std::panic::{self, AssertUnwindSafe};
use std::thread;

use crossbeam::channel::{Sender, unbounded};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of threads draining one queue.
pub struct Pool {
    tx: Sender<Job>,
}

impl Pool {
    /// Starts `workers` threads (at least one).
    pub fn new(workers: usize) -> std::io::Result<Pool> {
        let (tx, rx) = unbounded::<Job>();
        for i in 0..workers.max(1) {
            let rx = rx.clone();
            thread::Builder::new()
                .name(format!("efs-sim-w{i}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    // Sleeps are the emulated latencies: wake up on time
                    // (the default timer slack adds 50 µs to each).
                    // SAFETY: PR_SET_TIMERSLACK only changes this thread's slack.
                    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
                    while let Ok(job) = rx.recv() {
                        // A panicking job loses its reply (fuser answers EIO);
                        // the worker lives on.
                        let _ = panic::catch_unwind(AssertUnwindSafe(job));
                    }
                })?;
        }
        Ok(Pool { tx })
    }

    /// Queues a job. Fails only when every worker is gone, which cannot happen
    /// while the pool lives; the job is then dropped, and so its reply, which
    /// fuser answers with EIO.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let _ = self.tx.send(Box::new(job));
    }
}
