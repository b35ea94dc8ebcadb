//! Grants: what a customer was given, its lifecycle, and how it is shown to merchants.
//!
//! - [`decide`]: the pure core, `(facts, event) -> effects`.
//! - [`link`]: the customer's signed OAuth link.
//! - [`render`]: the Dodo-compatible JSON of a grant and of its webhooks.

pub mod backfill;
pub mod history;
pub mod link;
pub mod render;
pub mod timers;
