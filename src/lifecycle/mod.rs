//! Grants that change without a payment event: a grace period that ends (the grant
//! timer) and a product that gains an entitlement after it was bought (backfill). Both
//! take ingest's advisory locks, so they and ingest never change the same purchase at
//! once, and write through the outbox like every other change.
//!
//! - [`timers`]: revokes grants whose grace period ran out.
//! - [`backfill`]: gives a newly attached entitlement to the product's earlier buyers.
//! - [`moves`]: hands the grants of an entitlement whose server or role changed to the
//!   syncer again, paced.

pub mod backfill;
pub mod moves;
pub mod timers;
