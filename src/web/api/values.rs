//! The closed sets of values some string fields take, for the OpenAPI document only: the
//! fields stay strings in the views (they come from the database as text), and these
//! say which strings, so a generated client or the platform's SDK types them exactly.

use serde::Serialize;
use utoipa::ToSchema;

pub use crate::grants::render::{DiscordIntegration, GrantStatusName};

/// A live grant's status in a customer's entitlements, lower case as the platform writes
/// that list (revoked grants are not listed).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HeldStatus {
    Pending,
    Delivered,
    Failed,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names the document gives are the ones the server writes.
    #[test]
    fn values_are_the_wire_values() {
        assert_eq!(
            serde_json::to_value(DiscordIntegration::Discord).unwrap(),
            crate::web::api::entitlements::DISCORD
        );
        for (name, status) in [
            (
                GrantStatusName::Pending,
                crate::domain::GrantStatus::Pending,
            ),
            (
                GrantStatusName::Delivered,
                crate::domain::GrantStatus::Delivered,
            ),
            (GrantStatusName::Failed, crate::domain::GrantStatus::Failed),
            (
                GrantStatusName::Revoked,
                crate::domain::GrantStatus::Revoked,
            ),
        ] {
            assert_eq!(serde_json::to_value(name).unwrap(), status.as_str());
        }
        for (held, status) in [
            (HeldStatus::Pending, "Pending"),
            (HeldStatus::Delivered, "Delivered"),
            (HeldStatus::Failed, "Failed"),
        ] {
            assert_eq!(serde_json::to_value(held).unwrap(), status.to_lowercase());
        }
    }
}
