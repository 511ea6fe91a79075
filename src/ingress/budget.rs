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

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bodies up to this size may use the reserve.
pub const SMALL_BODY: usize = 64 * 1024;

/// The budget, shared by every worker.
pub struct BodyBudget {
    /// For bodies of any size.
    general: Arc<Semaphore>,
    /// Only for bodies of at most [`SMALL_BODY`].
    reserve: Arc<Semaphore>,
    total: usize,
}

/// The part of the budget one request holds; given back when dropped.
#[derive(Default)]
pub struct Held {
    general: Option<OwnedSemaphorePermit>,
    reserve: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Held {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl BodyBudget {
    pub fn new(total: usize) -> Self {
        let reserve = total / 8;
        Self {
            general: Arc::new(Semaphore::new(total - reserve)),
            reserve: Arc::new(Semaphore::new(reserve)),
            total,
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes of bodies held now, by every request together.
    pub fn in_use(&self) -> usize {
        let reserve = self.total / 8;
        (self.total - reserve - self.general.available_permits())
            + (reserve - self.reserve.available_permits())
    }

    /// True if a body of `len` bytes would fit now. Nothing is taken: a declared length only
    /// lets a request that cannot fit be refused before any of its body is read.
    pub fn could_take(&self, len: usize) -> bool {
        let general = self.general.available_permits();
        if len <= SMALL_BODY {
            general + self.reserve.available_permits() >= len
        } else {
            general >= len
        }
    }

    /// Room for `more` bytes beside what `held` has; false (and nothing taken) if there is none.
    pub fn grow(&self, held: &mut Held, more: usize) -> bool {
        let total = held.bytes + more;
        let taken = if total <= SMALL_BODY {
            take(&self.reserve, &mut held.reserve, more)
                || take(&self.general, &mut held.general, more)
        } else {
            // Past the small size: everything moves to the general part, or nothing grows.
            let from_reserve = held.reserve.as_ref().map_or(0, |p| p.num_permits());
            let moved = take(&self.general, &mut held.general, more + from_reserve);
            if moved {
                held.reserve = None;
            }
            moved
        };
        if taken {
            held.bytes = total;
        }
        taken
    }

    /// Gives back `less` of what `held` has (after a copy the buffers it came from are gone).
    pub fn shrink(&self, held: &mut Held, less: usize) {
        let mut left = less.min(held.bytes);
        held.bytes -= left;
        for part in [&mut held.reserve, &mut held.general] {
            if let Some(permit) = part {
                let n = left.min(permit.num_permits());
                if n == permit.num_permits() {
                    *part = None;
                } else if n > 0 {
                    drop(permit.split(n));
                }
                left -= n;
            }
        }
    }
}

/// Takes `n` permits of `pool` into `into`; false if there are not that many free.
fn take(pool: &Arc<Semaphore>, into: &mut Option<OwnedSemaphorePermit>, n: usize) -> bool {
    if n == 0 {
        return true;
    }
    let Ok(n32) = u32::try_from(n) else {
        return false;
    };
    match pool.clone().try_acquire_many_owned(n32) {
        Ok(permit) => {
            match into {
                Some(held) => held.merge(permit),
                None => *into = Some(permit),
            }
            true
        }
        Err(_) => false,
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
