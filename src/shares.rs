//! Each business's share of something a process has a fixed amount of: at most so many
//! held at once per business, counted until dropped, so that one business's load takes
//! its share and leaves the rest to the others. Per process: a mutex around a small map
//! of the businesses holding any, held for a lookup. It shares out:
//!
//! - the delivery workers ([`Shares::of_workers`], used by `webhooks::deliver`): while a
//!   business's requests hold its share of worker slots (a quarter of the workers, at
//!   least one), its further requests give their worker slot back as they start, as a
//!   request taking longer than `webhooks::deliver::STALLED_AFTER` does. Its endpoints'
//!   in-flight caps still bound them, so it delivers as fast as before; but a business
//!   whose endpoints answer just under a second, several endpoints at their caps, keeps
//!   a quarter of the workers, not most of them. The share counts requests being sent
//!   and jobs waiting for their turn of an endpoint's `rate_limit` (up to a second
//!   each), or in its line behind one that does: with the share full, such a job goes if
//!   its turn is free now and is otherwise held until a booked time instead of waiting
//!   in a worker. The prefetch (twice the workers) still bounds the jobs in hand, so
//!   several businesses far over their shares at once can fill it;
//! - the merchant API's requests in flight (`api.max_in_flight_per_business`, in
//!   `web::limits`);
//! - the name lookups of webhook URLs on save (`webhooks::ssrf`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What each business holds, per process. Cheap to clone; clones count together.
#[derive(Clone, Debug)]
pub struct Shares {
    share: usize,
    held: Arc<Mutex<HashMap<String, usize>>>,
}

/// One counted against a business's share until dropped.
#[must_use = "a share is counted until dropped"]
#[derive(Debug)]
pub struct Share {
    shares: Shares,
    business: String,
}

impl Shares {
    /// At most `share` for each business (at least one).
    pub fn each(share: usize) -> Self {
        Shares {
            share: share.max(1),
            held: Arc::default(),
        }
    }

    /// The shares of `workers` workers: a quarter each, at least one.
    pub fn of_workers(workers: usize) -> Self {
        Self::each(workers / 4)
    }

    /// How many one business may hold.
    pub fn share(&self) -> usize {
        self.share
    }

    /// Counts one more against `business`, unless it holds its share already.
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

    /// How many `business` holds now.
    pub fn held(&self, business: &str) -> usize {
        let held = self.held.lock().expect("shares lock");
        held.get(business).copied().unwrap_or(0)
    }

    /// No business holds any: nothing is kept for the businesses that held some.
    pub fn idle(&self) -> bool {
        self.held.lock().expect("shares lock").is_empty()
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
