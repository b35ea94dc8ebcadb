//! SQL the merchant API adds, one file per aggregate. Entitlement rows are the
//! [`crate::store::setup::Entitlement`] type; the queries here are the API's (filtered,
//! paginated, per business) on top of what `store::setup` already has.

pub mod entitlements;
pub mod grants;
pub mod guilds;
pub mod keys;
pub mod messages;
pub mod translations;

/// A page of a list: `LIMIT`/`OFFSET` from `page_size`/`page_number`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    pub limit: i64,
    pub offset: i64,
}
