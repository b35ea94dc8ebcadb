//! The one retry schedule every queue uses. A queue's retries wait in delay tiers (one
//! broker queue per tier, its TTL the delay), so a retry can wait exactly as long as
//! some tier and no other time. Tiers are meant to ascend.

use std::time::Duration;

/// Where a retry goes: the index of its tier and that tier's delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    pub tier: usize,
    pub delay: Duration,
}

impl Retry {
    /// The retries done once this one is, for a queue that counts the tiers it skipped
    /// as used: `tier + 1`.
    pub fn tiers_used(&self) -> u32 {
        u32::try_from(self.tier).map_or(u32::MAX, |t| t.saturating_add(1))
    }
}

/// The retry after `done` retries that must wait at least `wait` (a `Retry-After`, a
/// recipient's full hour; zero for none): tier `done`, or the first later tier at least
/// `wait` long (the last if none is). `None` once every tier was used.
///
/// A queue that counts the tiers it skipped as used takes `tier + 1` as the retries
/// done; one that counts attempts takes `done + 1`. `next(0, wait, tiers)` rounds a
/// wait up to a tier.
pub fn next(done: u32, wait: Duration, tiers: &[Duration]) -> Option<Retry> {
    let from = usize::try_from(done).ok().filter(|&f| f < tiers.len())?;
    let tier = (from..tiers.len())
        .find(|&j| tiers[j] >= wait)
        .unwrap_or(tiers.len() - 1);
    Some(Retry {
        tier,
        delay: tiers[tier],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn follows_the_tiers_and_skips_the_ones_too_short() {
        let tiers = [s(5), s(30), s(300)];
        let cases = [
            (0, s(0), Some((0, s(5)))),
            (1, s(0), Some((1, s(30)))),
            (2, s(0), Some((2, s(300)))),
            (3, s(0), None),
            (0, s(6), Some((1, s(30)))),
            (0, s(30), Some((1, s(30)))),
            (1, s(1000), Some((2, s(300)))),
            (0, s(1000), Some((2, s(300)))),
            // Never shorter than the tier that is due.
            (2, s(1), Some((2, s(300)))),
        ];
        for (done, wait, want) in cases {
            let got = next(done, wait, &tiers).map(|r| (r.tier, r.delay));
            assert_eq!(got, want, "{done} {wait:?}");
        }
        assert_eq!(next(0, s(1), &[]), None);
        // A wait that skips to the last tier uses them all.
        assert_eq!(next(0, s(1000), &tiers).map(|r| r.tiers_used()), Some(3));
    }
}
