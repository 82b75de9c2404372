//! The worker pool that serves requests.
//!
//! fuser's event-loop threads only decode a request and hand it here; a worker
//! waits out the request's cost, does the real syscall and sends the reply from
//! its own thread. The number of workers is the number of requests in flight
//! (`--max-inflight`): more arrive, they queue.

use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of threads draining one queue. An idle worker sleeps on a
/// condition variable at once: a channel whose receivers spin and yield
/// before they sleep cost the emulator about a fifth of its CPU, taken
/// from the client it emulates a server for (the same cores).
pub struct Pool {
    queue: Arc<Queue>,
}

#[derive(Default)]
struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
}

impl Queue {
    fn take(&self) -> Job {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(job) = jobs.pop_front() {
                return job;
            }
            jobs = self.ready.wait(jobs).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Pool {
    /// Starts `workers` threads (at least one).
    pub fn new(workers: usize) -> std::io::Result<Pool> {
        let queue = Arc::new(Queue::default());
        for i in 0..workers.max(1) {
            let queue = queue.clone();
            thread::Builder::new()
                .name(format!("efs-sim-w{i}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    // Sleeps are the emulated latencies: wake up on time
                    // (the default timer slack adds 50 µs to each).
                    // SAFETY: PR_SET_TIMERSLACK only changes this thread's slack.
                    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
                    loop {
                        let job = queue.take();
                        // A panicking job loses its reply (fuser answers EIO);
                        // the worker lives on.
                        let _ = panic::catch_unwind(AssertUnwindSafe(job));
                    }
                })?;
        }
        Ok(Pool { queue })
    }

    /// Queues a job for the next idle worker.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let mut jobs = self.queue.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.push_back(Box::new(job));
        drop(jobs);
        self.queue.ready.notify_one();
    }
}
