//! The merchant REST API, compatible with the payment platform's entitlements API (same
//! paths, JSON and pagination as `tests/fixtures/contract/api/`), so a merchant's integration
//! works against either.
//!
//! - [`auth`]: `Authorization: Bearer <api key>` → the business; [`keys`]: key format.
//! - [`entitlements`], [`translations`], [`products`], [`grants`], [`discord`],
//!   [`application`] (a business's own bot),
//!   [`webhooks`]: the routes, one file per resource, each parsing its input into typed
//!   values at the edge.
//! - The routes are registered, and documented, by [`crate::web::openapi`]; errors are
//!   [`crate::web::error::ApiError`].
//! - `store`: the SQL the API adds; [`values`]: the closed sets of values of some
//!   string fields, as the document states them.
//!
//! Every object belongs to one business; a query always names the caller's business, so
//! another business's object is simply not found (404).

pub mod application;
pub mod auth;
pub mod discord;
pub mod entitlements;
pub mod grants;
pub mod keys;
pub mod products;
pub mod settings;
pub mod translations;
pub mod values;
pub mod webhooks;

use serde::{Deserialize, Serialize};

use crate::store::Page;
use crate::web::error::ApiError;

/// `page_size` when the merchant gives none, and the most it may ask for (the platform's).
pub const DEFAULT_PAGE_SIZE: u32 = 10;
pub const MAX_PAGE_SIZE: u32 = 100;

/// `page_size`/`page_number` (0-based, like the platform's) into a page.
pub fn page(page_size: Option<u32>, page_number: Option<u32>) -> Result<Page, ApiError> {
    let size = page_size.unwrap_or(DEFAULT_PAGE_SIZE);
    if size == 0 || size > MAX_PAGE_SIZE {
        return Err(ApiError::field(
            "page_size",
            format!("must be between 1 and {MAX_PAGE_SIZE}"),
        ));
    }
    let number = i64::from(page_number.unwrap_or(0));
    Ok(Page {
        limit: i64::from(size),
        offset: number * i64::from(size),
    })
}

/// A list answer: `{"items": [...]}`, like the platform's.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Items<T> {
    pub items: Vec<T>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging() {
        assert_eq!(
            page(None, None).unwrap(),
            Page {
                limit: 10,
                offset: 0
            }
        );
        assert_eq!(
            page(Some(5), Some(2)).unwrap(),
            Page {
                limit: 5,
                offset: 10
            }
        );
        assert!(page(Some(0), None).is_err());
        assert!(page(Some(101), None).is_err());
        assert_eq!(
            page(Some(100), Some(u32::MAX)).unwrap().offset,
            100 * i64::from(u32::MAX)
        );
    }
}
