//! Grants as customers and merchants see them (the grant itself and what changes it
//! are [`crate::domain::grant`] and [`crate::domain::decide`]).
//!
//! - [`link`]: the customer's signed OAuth link, and its renewal.
//! - [`render`]: the Dodo-compatible JSON of a grant and of its webhooks.
//! - [`history`]: a grant's history as the API shows it.

pub mod history;
pub mod link;
pub mod render;
