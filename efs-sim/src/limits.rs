//! Shared limits a request waits on before it is served: an ops/s cap, the
//! client's bandwidth, and the per-directory limit on concurrent namespace
//! changes.
//!
//! Rate limits are virtual-time queues: each request reserves the next free
//! slot of a shared clock and sleeps until its slot ends, so concurrent
//! requests share the rate instead of each getting all of it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// A virtual-time queue: serves `units` at `rate` units/s, in arrival order.
pub struct Pacer {
    rate: f64,
    next_free: Mutex<Instant>,
}

impl Pacer {
    /// `rate` <= 0 means unlimited.
    pub fn new(rate: f64) -> Pacer {
        Pacer {
            rate,
            next_free: Mutex::new(Instant::now()),
        }
    }

    /// Reserves `units` and sleeps until they have "passed".
    pub fn take(&self, units: f64) {
        if self.rate <= 0.0 || units <= 0.0 {
            return;
        }
        let cost = Duration::from_secs_f64(units / self.rate);
        let done = {
            let mut next = self.next_free.lock();
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + cost;
            *next
        };
        sleep_until(done);
    }
}

/// Sleeps until `t` (returns at once if `t` has passed).
pub fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

struct Gate {
    inflight: Mutex<usize>,
    freed: Condvar,
}

struct GateSlot {
    gate: Arc<Gate>,
    /// Holders plus waiters; the slot is dropped from the map at zero.
    users: usize,
}

/// At most `limit` namespace changes in flight per directory (keyed by the
/// directory's inode number); the rest wait in the order the OS wakes them.
pub struct DirGates {
    limit: usize,
    gates: Mutex<HashMap<u64, GateSlot>>,
}

/// Held while a namespace change runs; releases its directories on drop.
pub struct DirPermit<'a> {
    owner: &'a DirGates,
    dirs: Vec<(u64, Arc<Gate>)>,
}

impl DirGates {
    /// `limit` 0 means unlimited.
    pub fn new(limit: usize) -> DirGates {
        DirGates {
            limit,
            gates: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for a slot in each of `dirs` (deduplicated, taken in ascending
    /// order so two renames between the same directories cannot deadlock).
    pub fn acquire(&self, dirs: &[u64]) -> DirPermit<'_> {
        let mut permit = DirPermit {
            owner: self,
            dirs: Vec::new(),
        };
        if self.limit == 0 {
            return permit;
        }
        let mut sorted: Vec<u64> = dirs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        for dir in sorted {
            let gate = {
                let mut map = self.gates.lock();
                let slot = map.entry(dir).or_insert_with(|| GateSlot {
                    gate: Arc::new(Gate {
                        inflight: Mutex::new(0),
                        freed: Condvar::new(),
                    }),
                    users: 0,
                });
                slot.users += 1;
                slot.gate.clone()
            };
            {
                let mut inflight = gate.inflight.lock();
                while *inflight >= self.limit {
                    gate.freed.wait(&mut inflight);
                }
                *inflight += 1;
            }
            permit.dirs.push((dir, gate));
        }
        permit
    }

    fn release(&self, dir: u64, gate: &Gate) {
        {
            let mut inflight = gate.inflight.lock();
            *inflight -= 1;
            gate.freed.notify_one();
        }
        let mut map = self.gates.lock();
        if let Some(slot) = map.get_mut(&dir) {
            slot.users -= 1;
            if slot.users == 0 {
                map.remove(&dir);
            }
        }
    }
}

impl Drop for DirPermit<'_> {
    fn drop(&mut self) {
        for (dir, gate) in self.dirs.drain(..) {
            self.owner.release(dir, &gate);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn pacer_spreads_requests() {
        let p = Pacer::new(1000.0);
        let t = Instant::now();
        for _ in 0..50 {
            p.take(1.0);
        }
        assert!(t.elapsed() >= Duration::from_millis(45));
        let unlimited = Pacer::new(0.0);
        let t = Instant::now();
        unlimited.take(1e9);
        assert!(t.elapsed() < Duration::from_millis(10));
    }

    #[test]
    fn gate_limits_per_directory_only() {
        let gates = Arc::new(DirGates::new(1));
        let peak_same = Arc::new(AtomicUsize::new(0));
        let now_same = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for i in 0..8u64 {
            let (gates, peak, now) = (gates.clone(), peak_same.clone(), now_same.clone());
            threads.push(std::thread::spawn(move || {
                // Half the threads rename between dirs 1 and 2, in both directions.
                let dirs = if i % 2 == 0 { vec![1, 2] } else { vec![2, 1] };
                let _p = gates.acquire(&dirs);
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
                now.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(peak_same.load(Ordering::SeqCst), 1);
        assert!(gates.gates.lock().is_empty());
        // Different directories do not wait for each other.
        let a = gates.acquire(&[10]);
        let b = gates.acquire(&[11]);
        drop((a, b));
    }
}
