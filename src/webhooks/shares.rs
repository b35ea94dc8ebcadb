//! Each business's share of the delivery workers: while a business's requests hold its
//! share of worker slots (a quarter of the workers, at least one), its further requests
//! give their worker slot back as they start, as a request taking longer than
//! [`super::deliver::STALLED_AFTER`] does. Its endpoints' in-flight caps still bound
//! them, so it delivers as fast as before; but a business whose endpoints answer just
//! under a second, several endpoints at their caps, keeps a quarter of the workers,
//! not most of them. The share counts requests being sent and jobs waiting for their
//! turn of an endpoint's `rate_limit` (up to a second each), or in its line behind one
//! that does: with the share full, such a job goes if its turn is free now and is
//! otherwise held until a booked time instead of waiting in a worker. The prefetch
//! (twice the workers) still bounds the jobs in hand, so several businesses far over
//! their shares at once can fill it.
//!
//! Per process, like the workers: a mutex around a small map of the businesses with a
//! request out, held for a lookup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The worker slots each business's requests hold, per process. Cheap to clone.
#[derive(Clone)]
pub struct Shares {
    share: usize,
    held: Arc<Mutex<HashMap<String, usize>>>,
}

/// One worker slot counted against a business's share until dropped.
#[must_use = "a share is counted until dropped"]
pub struct Share {
    shares: Shares,
    business: String,
}

impl Shares {
    /// The shares of `workers` workers: a quarter each, at least one.
    pub fn of_workers(workers: usize) -> Self {
        Shares {
            share: (workers / 4).max(1),
            held: Arc::default(),
        }
    }

    /// How many worker slots one business's requests may hold.
    pub fn share(&self) -> usize {
        self.share
    }

    /// Counts one more worker slot against `business`, unless its requests hold its
    /// share already.
    pub fn take(&self, business: &str) -> Option<Share> {
        let mut held = self.held.lock().expect("shares lock");
        let n = held.entry(business.to_string()).or_default();
        if *n >= self.share {
            return None;
        }
        *n += 1;
        Some(Share {
            shares: self.clone(),
            business: business.to_string(),
        })
    }

    /// The worker slots `business`'s requests hold now.
    pub fn held(&self, business: &str) -> usize {
        let held = self.held.lock().expect("shares lock");
        held.get(business).copied().unwrap_or(0)
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut held = self.shares.held.lock().expect("shares lock");
        if let Some(n) = held.get_mut(&self.business) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.business);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_business_holds_a_quarter_of_the_workers_and_others_their_own() {
        let shares = Shares::of_workers(8);
        assert_eq!(shares.share(), 2);
        let a1 = shares.take("bus_a").expect("first of its share");
        let a2 = shares.take("bus_a").expect("second of its share");
        assert!(shares.take("bus_a").is_none(), "its share is held");
        let b = shares.take("bus_b").expect("another business has its own");
        assert_eq!((shares.held("bus_a"), shares.held("bus_b")), (2, 1));
        drop(a1);
        let a3 = shares.take("bus_a").expect("a share freed is taken again");
        drop((a2, a3, b));
        assert_eq!((shares.held("bus_a"), shares.held("bus_b")), (0, 0));
        assert!(
            shares.held.lock().unwrap().is_empty(),
            "nothing kept once idle"
        );
    }

    #[test]
    fn few_workers_still_give_each_business_one() {
        assert_eq!(Shares::of_workers(1).share(), 1);
        assert_eq!(Shares::of_workers(3).share(), 1);
        assert_eq!(Shares::of_workers(64).share(), 16);
    }
}
