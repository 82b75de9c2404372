//! The recovery gate: while a crashed instance's work is recovered in the
//! background, the requests that would see or disturb it wait, and nothing
//! else does.
//!
//! - `Listing` of a directory whose entries recovered work still changes
//!   (or that holds recovered files or attributes still to be taken back):
//!   released when the last replayed op in it is done and its times are
//!   put back, or, for taken-back state, when recovery ends.
//! - `Entry`: renaming or removing a name on the way to recovered work
//!   would pull a path from under a replayed op: until recovery ends.
//! - `Attrs` of such a directory (its times are in flux on the backend
//!   meanwhile), of an object whose replayed attribute ops are not done yet
//!   (released with the last one), and of a directory whose journaled
//!   attributes are still to be taken back (until recovery ends).
//! - `ChildAttrs`: a listing with attributes (readdirplus) of a directory
//!   holding something behind `Attrs`.
//!
//! Pure bookkeeping plus a condition variable: no I/O.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::backend::RelPath;

/// What a request does to a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gated {
    Listing,
    Entry,
    Attrs,
    ChildAttrs,
}

#[derive(Debug, Default)]
struct State {
    open: bool,
    /// Directories behind `Listing`, with how many replayed ops in them are
    /// not done yet (0: done, times not put back yet). Taken-back state
    /// holds its directories until the gate opens.
    dirs: HashMap<RelPath, usize>,
    /// Objects behind `Attrs` with how many replayed attribute ops on them
    /// are not done yet.
    objs: HashMap<RelPath, usize>,
    /// How many paths behind `Attrs` (or `Listing`) each directory holds.
    children: HashMap<RelPath, usize>,
}

#[derive(Debug)]
pub struct RecoveryGate {
    /// Bumped whenever recovery settles something (a directory's last op,
    /// an object's last attribute op, a release): a listing read across a
    /// bump may hold attributes from before it.
    epoch: AtomicU64,
    /// Set once recovery is done (read without the lock on every request).
    opened: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
    entries: HashSet<RelPath>,
    /// Behind `Attrs` until the gate opens (besides the `dirs`).
    attrs: HashSet<RelPath>,
}

fn parent(p: &RelPath) -> Option<RelPath> {
    p.split_last().map(|(d, _)| d)
}

impl RecoveryGate {
    /// `dirs`: directory -> replayed ops changing its entries (taken-back
    /// state counts one that is never done: it waits for the end); `objs`:
    /// object -> replayed ops changing its attributes; `attrs`: held until
    /// the end.
    pub fn new(
        dirs: HashMap<RelPath, usize>,
        objs: HashMap<RelPath, usize>,
        entries: HashSet<RelPath>,
        attrs: HashSet<RelPath>,
    ) -> RecoveryGate {
        let mut children: HashMap<RelPath, usize> = HashMap::new();
        let held: HashSet<&RelPath> = dirs.keys().chain(objs.keys()).chain(attrs.iter()).collect();
        for p in held {
            if let Some(d) = parent(p) {
                *children.entry(d).or_default() += 1;
            }
        }
        RecoveryGate {
            epoch: AtomicU64::new(0),
            opened: AtomicBool::new(false),
            state: Mutex::new(State {
                open: false,
                dirs,
                objs,
                children,
            }),
            changed: Condvar::new(),
            entries,
            attrs,
        }
    }

    pub fn is_open(&self) -> bool {
        self.opened.load(Ordering::Acquire)
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    fn behind(&self, st: &State, what: Gated, p: &RelPath) -> bool {
        if st.open {
            return false;
        }
        match what {
            Gated::Listing => st.dirs.contains_key(p),
            Gated::Entry => self.entries.contains(p),
            Gated::Attrs => self.attrs.contains(p) || st.dirs.contains_key(p) || st.objs.contains_key(p),
            Gated::ChildAttrs => st.children.get(p).is_some_and(|n| *n > 0),
        }
    }

    /// Whether a request doing `what` to `p` must wait.
    pub fn blocks(&self, what: Gated, p: &RelPath) -> bool {
        self.behind(&self.state.lock(), what, p)
    }

    /// Waits until `p` is released for `what` or `deadline`; true if it is.
    pub fn wait(&self, what: Gated, p: &RelPath, deadline: Instant) -> bool {
        let mut st = self.state.lock();
        while self.behind(&st, what, p) {
            if self.changed.wait_until(&mut st, deadline).timed_out() {
                return !self.behind(&st, what, p);
            }
        }
        true
    }

    /// Waits until the gate opens (or `deadline`); true if it is open.
    pub fn wait_open(&self, deadline: Option<Instant>) -> bool {
        let mut st = self.state.lock();
        while !st.open {
            match deadline {
                Some(d) => {
                    if self.changed.wait_until(&mut st, d).timed_out() {
                        return st.open;
                    }
                }
                None => self.changed.wait(&mut st),
            }
        }
        true
    }

    /// A replayed op changing the entries of `dir` is done; true when it was
    /// the last one (then put the directory's times back and `release` it).
    pub fn op_done(&self, dir: &RelPath) -> bool {
        self.count_down(|st| &mut st.dirs, dir)
    }

    /// A replayed op changing the attributes of `obj` is done; true when it
    /// was the last one (then `release` it).
    pub fn obj_done(&self, obj: &RelPath) -> bool {
        self.count_down(|st| &mut st.objs, obj)
    }

    fn count_down(&self, map: impl FnOnce(&mut State) -> &mut HashMap<RelPath, usize>, p: &RelPath) -> bool {
        let mut st = self.state.lock();
        let last = match map(&mut st).get_mut(p) {
            Some(n) if *n > 0 => {
                *n -= 1;
                *n == 0
            }
            _ => false,
        };
        if last {
            self.epoch.fetch_add(1, Ordering::SeqCst);
        }
        last
    }

    /// `path` is final as far as replayed ops go (its listing if it was
    /// held for its entries, its attributes if for them): served.
    pub fn release(&self, path: &RelPath) {
        let mut st = self.state.lock();
        let mut changed = false;
        if st.dirs.get(path) == Some(&0) {
            st.dirs.remove(path);
            changed = true;
        }
        if st.objs.get(path) == Some(&0) {
            st.objs.remove(path);
            changed = true;
        }
        if !changed {
            return;
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let still_held = st.dirs.contains_key(path) || st.objs.contains_key(path) || self.attrs.contains(path);
        if !still_held
            && let Some(d) = parent(path)
            && let Some(n) = st.children.get_mut(&d)
        {
            *n = n.saturating_sub(1);
        }
        self.changed.notify_all();
    }

    /// Recovery is done: everything is served.
    pub fn open(&self) {
        self.state.lock().open = true;
        self.opened.store(true, Ordering::Release);
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath(s.split('/').filter(|c| !c.is_empty()).map(Into::into).collect())
    }

    #[test]
    fn a_directory_is_released_after_its_last_op_and_the_rest_when_it_opens() {
        let dirs = HashMap::from([(p("a"), 2), (p("b"), 1)]);
        let objs = HashMap::from([(p("d"), 1)]);
        let g = RecoveryGate::new(dirs, objs, HashSet::from([p("a"), p("a/x")]), HashSet::from([p("c")]));
        assert!(g.blocks(Gated::Attrs, &p("d")));
        assert!(!g.blocks(Gated::Listing, &p("d")));
        assert!(g.obj_done(&p("d")));
        g.release(&p("d"));
        assert!(!g.blocks(Gated::Attrs, &p("d")));
        assert!(g.blocks(Gated::Listing, &p("a")));
        assert!(!g.blocks(Gated::Listing, &p("elsewhere")));
        assert!(g.blocks(Gated::ChildAttrs, &p("")), "the root holds a, b and c");
        assert!(!g.op_done(&p("a")));
        assert!(g.op_done(&p("a")));
        assert!(g.blocks(Gated::Listing, &p("a")), "held until its times are back");
        g.release(&p("a"));
        assert!(!g.blocks(Gated::Listing, &p("a")));
        assert!(!g.blocks(Gated::Attrs, &p("a")));
        assert!(g.blocks(Gated::Entry, &p("a/x")), "names stay until the end");
        assert!(g.blocks(Gated::Attrs, &p("c")));
        assert!(g.op_done(&p("b")));
        g.release(&p("b"));
        assert!(g.blocks(Gated::ChildAttrs, &p("")), "c is still pending");
        g.open();
        for what in [Gated::Listing, Gated::Entry, Gated::Attrs, Gated::ChildAttrs] {
            assert!(!g.blocks(what, &p("a/x")));
            assert!(!g.blocks(what, &p("c")));
        }
        assert!(g.wait_open(None));
    }
}
