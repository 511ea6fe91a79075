//! The memory budget of request bodies: `max_inflight_body` bytes (48 MiB by default) held at
//! once across every
//! connection, taken as the bytes arrive (never from a `Content-Length` that may be a lie) and
//! given back when the request is answered.
//!
//! Without it, bodies are buffered up to `max_body` before their signature can be checked, so
//! 500 connections each sending a megabyte they never finish held 834 MB: memory on demand,
//! unauthenticated. A request that finds no room is answered 503 `unavailable` with
//! `Retry-After` (the platform retries) and its connection is closed once answered.
//!
//! **Small events are not starved by large ones.** An eighth of the budget is kept for bodies
//! of at most [`SMALL_BODY`] (real events are a few KB): they take from that reserve first and
//! from the rest after. A body that grows past [`SMALL_BODY`] moves what it holds to the rest
//! and may only grow there, so a flood of large bodies never reaches the reserve. A flood of
//! small unsigned bodies can still take all of it; then genuine events get 503 and are retried
//! by the platform, and memory stays bounded either way.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Bodies up to this size may use the reserve.
pub const SMALL_BODY: usize = 64 * 1024;

/// The budget, shared by every worker.
pub struct BodyBudget {
    /// For bodies of any size.
    general: Pool,
    /// Only for bodies of at most [`SMALL_BODY`].
    reserve: Pool,
    total: usize,
}

/// Bytes free in one part of the budget. Nobody ever waits for room (a request that finds
/// none is refused at once), so a counter is all it takes: one atomic write to take and one to
/// give back. A semaphore did the same with an `Arc` clone per request and a lock on every
/// release, writes both HTTP workers made to the same cache lines (perf, README).
struct Pool {
    free: AtomicUsize,
}

impl Pool {
    fn new(bytes: usize) -> Self {
        Self {
            free: AtomicUsize::new(bytes),
        }
    }

    fn available(&self) -> usize {
        self.free.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes; false (and nothing taken) if there are not that many free.
    fn take(&self, n: usize) -> bool {
        n == 0
            || self
                .free
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |free| {
                    free.checked_sub(n)
                })
                .is_ok()
    }

    fn give_back(&self, n: usize) {
        if n > 0 {
            self.free.fetch_add(n, Ordering::AcqRel);
        }
    }
}

/// The part of the budget one request holds; given back when dropped.
#[derive(Default)]
pub struct Held<'b> {
    budget: Option<&'b BodyBudget>,
    general: usize,
    reserve: usize,
}

impl Held<'_> {
    pub fn bytes(&self) -> usize {
        self.general + self.reserve
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(budget) = self.budget {
            budget.general.give_back(self.general);
            budget.reserve.give_back(self.reserve);
        }
    }
}

impl BodyBudget {
    pub fn new(total: usize) -> Self {
        let reserve = total / 8;
        Self {
            general: Pool::new(total - reserve),
            reserve: Pool::new(reserve),
            total,
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes of bodies held now, by every request together.
    pub fn in_use(&self) -> usize {
        let reserve = self.total / 8;
        (self.total - reserve - self.general.available()) + (reserve - self.reserve.available())
    }

    /// True if a body of `len` bytes would fit now. Nothing is taken: a declared length only
    /// lets a request that cannot fit be refused before any of its body is read.
    pub fn could_take(&self, len: usize) -> bool {
        let general = self.general.available();
        if len <= SMALL_BODY {
            general + self.reserve.available() >= len
        } else {
            general >= len
        }
    }

    /// Room for `more` bytes beside what `held` has; false (and nothing taken) if there is none.
    pub fn grow<'b>(&'b self, held: &mut Held<'b>, more: usize) -> bool {
        held.budget = Some(self);
        if held.bytes() + more <= SMALL_BODY {
            if self.reserve.take(more) {
                held.reserve += more;
                return true;
            }
            if self.general.take(more) {
                held.general += more;
                return true;
            }
            return false;
        }
        // Past the small size: everything moves to the general part, or nothing grows.
        if !self.general.take(more + held.reserve) {
            return false;
        }
        held.general += more + held.reserve;
        self.reserve.give_back(std::mem::take(&mut held.reserve));
        true
    }

    /// Gives back `less` of what `held` has (after a copy the buffers it came from are gone).
    pub fn shrink(&self, held: &mut Held<'_>, less: usize) {
        let from_reserve = less.min(held.reserve);
        held.reserve -= from_reserve;
        self.reserve.give_back(from_reserve);
        let from_general = (less - from_reserve).min(held.general);
        held.general -= from_general;
        self.general.give_back(from_general);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_bodies_never_reach_the_reserve_and_small_ones_still_fit() {
        let budget = BodyBudget::new(8 * SMALL_BODY * 8);
        // Large bodies take all the general part, then stop.
        let mut large = Vec::new();
        loop {
            let mut held = Held::default();
            if !budget.grow(&mut held, SMALL_BODY + 1) {
                break;
            }
            large.push(held);
        }
        assert!(!large.is_empty());
        assert!(budget.in_use() <= budget.total() * 7 / 8);
        // A small body still fits, in the reserve.
        let mut small = Held::default();
        assert!(budget.grow(&mut small, 4096));
        // One that grows past the small size needs the general part, which is full: refused,
        // and it keeps only what it had.
        assert!(!budget.grow(&mut small, SMALL_BODY));
        assert_eq!(small.bytes(), 4096);
        drop(large);
        assert!(budget.grow(&mut small, SMALL_BODY));
        assert_eq!(small.bytes(), 4096 + SMALL_BODY);
        drop(small);
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn what_is_held_comes_back_when_shrunk_or_dropped() {
        let budget = BodyBudget::new(1 << 20);
        let mut held = Held::default();
        assert!(budget.grow(&mut held, 1000));
        assert!(budget.grow(&mut held, 100_000));
        assert_eq!(budget.in_use(), 101_000);
        budget.shrink(&mut held, 50_000);
        assert_eq!((held.bytes(), budget.in_use()), (51_000, 51_000));
        drop(held);
        assert_eq!(budget.in_use(), 0);
        let mut too_much = Held::default();
        assert!(!budget.grow(&mut too_much, (1 << 20) + 1));
        assert_eq!(budget.in_use(), 0);
    }
}
