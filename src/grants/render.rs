//! The grant object and the `entitlement_grant.*` webhook body, exactly as the platform
//! shapes them (`tests/fixtures/contract/api/grant.json`, `tests/fixtures/contract/webhooks/`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::link::LinkBuilder;
use crate::domain::{Grant, GrantEventType};

pub use crate::domain::grant::ts;

/// A grant, as the platform shapes it (`tests/fixtures/contract/api/grant.json`): the
/// REST grant object and, with `payload_type` in front, a webhook's `data`. Its fields
/// in the platform's order, borrowed from a [`Grant`]. The OpenAPI document names it
/// `GrantView`.
#[derive(Serialize, ToSchema)]
#[schema(as = GrantView)]
pub struct GrantObject<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    payload_type: Option<&'static str>,
    id: &'a str,
    business_id: &'a str,
    brand_id: &'a str,
    entitlement_id: &'a str,
    customer_id: &'a str,
    payment_id: Option<&'a str>,
    subscription_id: Option<&'a str>,
    /// `Pending`, `Delivered`, `Failed` or `Revoked`.
    #[schema(value_type = GrantStatusName)]
    status: &'a str,
    /// Always `discord`.
    #[schema(value_type = DiscordIntegration)]
    integration_type: &'static str,
    /// Always null for Discord (the platform's `LicenseKeyGrant` object for `license_key`
    /// entitlements only).
    #[schema(value_type = Option<Object>)]
    license_key: Option<()>,
    /// Always null for Discord (the platform's `DigitalProductDelivery` object for
    /// `digital_files` entitlements only).
    #[schema(value_type = Option<Object>)]
    digital_product_delivery: Option<()>,
    /// Always null for Discord (the platform fills it for `feature_flag` only). Present
    /// on every grant so a client reading it finds the key, as on the platform's other
    /// integrations.
    #[schema(value_type = Option<Object>)]
    feature: Option<()>,
    delivered_at: Option<String>,
    revoked_at: Option<String>,
    /// `manual`, `refund`, `subscription_cancelled`, …
    revocation_reason: Option<&'a str>,
    /// Why a `Failed` grant failed (`discord_role_hierarchy`, …).
    error_code: Option<&'a str>,
    error_message: Option<&'a str>,
    /// Where the customer connects their Discord account.
    oauth_url: String,
    oauth_expires_at: String,
    #[schema(value_type = Object)]
    metadata: &'a Value,
    created_at: String,
    updated_at: String,
}

/// The integration type of every entitlement and grant guildgate serves: `discord`
/// (the OpenAPI document's closed set for the field).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiscordIntegration {
    Discord,
}

/// A grant's status, capitalised as on the platform's grant objects (the OpenAPI
/// document's closed set for the field).
#[derive(Serialize, ToSchema)]
pub enum GrantStatusName {
    Pending,
    Delivered,
    Failed,
    Revoked,
}

impl<'a> GrantObject<'a> {
    fn of(g: &'a Grant, links: &LinkBuilder, payload_type: Option<&'static str>) -> Self {
        Self {
            payload_type,
            id: &g.id,
            business_id: &g.business_id,
            brand_id: &g.brand_id,
            entitlement_id: &g.entitlement_id,
            customer_id: &g.customer_id,
            payment_id: g.payment_id.as_deref(),
            subscription_id: g.subscription_id.as_deref(),
            status: g.status.as_str(),
            integration_type: "discord",
            license_key: None,
            digital_product_delivery: None,
            feature: None,
            delivered_at: g.delivered_at.map(ts),
            revoked_at: g.revoked_at.map(ts),
            revocation_reason: g
                .revocation_reason
                .map(crate::domain::RevocationReason::as_str),
            error_code: g.error_code.as_deref(),
            error_message: g.error_message.as_deref(),
            oauth_url: links.url(&g.business_id, &g.id, &g.oauth_nonce, g.oauth_expires_at),
            oauth_expires_at: ts(g.oauth_expires_at),
            metadata: &g.metadata,
            created_at: ts(g.created_at),
            updated_at: ts(g.updated_at),
        }
    }
}

/// An `entitlement_grant.*` webhook body.
#[derive(Serialize)]
struct WebhookBody<'a> {
    business_id: &'a str,
    #[serde(rename = "type")]
    event_type: &'static str,
    timestamp: String,
    data: GrantObject<'a>,
}

/// The REST grant object.
pub fn grant_object(g: &Grant, links: &LinkBuilder) -> Value {
    serde_json::to_value(GrantObject::of(g, links, None)).expect("a grant object serializes")
}

/// The webhook body for `event` of grant `g`, stamped `at`, as the bytes sent: rendered
/// straight from the grant, with no JSON value in between (ingest renders one per grant
/// transition).
pub fn webhook_body(
    g: &Grant,
    event: GrantEventType,
    at: DateTime<Utc>,
    links: &LinkBuilder,
) -> Vec<u8> {
    serde_json::to_vec(&WebhookBody {
        business_id: &g.business_id,
        event_type: event.as_str(),
        timestamp: ts(at),
        data: GrantObject::of(g, links, Some("EntitlementGrant")),
    })
    .expect("a webhook body serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use serde_json::json;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/contract");

    fn fixture(path: &str) -> Value {
        serde_json::from_slice(&std::fs::read(format!("{FIXTURES}/{path}")).unwrap()).unwrap()
    }

    fn keys(v: &Value) -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    }

    fn sample() -> Grant {
        let t: DateTime<Utc> = "2026-05-01T10:31:00Z".parse().unwrap();
        Grant {
            id: "grant_DiscordPending5L".into(),
            business_id: "bus_H4ekzPSlcg".into(),
            brand_id: "brd_3hQp".into(),
            entitlement_id: "ent_9Xc2Lw7QpR".into(),
            customer_id: "cus_8wM2kq1Zr7".into(),
            payment_id: None,
            subscription_id: Some("sub_0NXzr8fEJ4".into()),
            status: crate::domain::GrantStatus::Pending,
            delivered_at: None,
            revoked_at: None,
            revocation_reason: None,
            error_code: None,
            error_message: None,
            oauth_nonce: "n_1".into(),
            oauth_expires_at: "2026-05-08T10:31:00Z".parse().unwrap(),
            metadata: json!({}),
            created_at: t,
            updated_at: t,
            applied_user_id: None,
            applied_guild_id: None,
            applied_role_id: None,
            intent_user_id: None,
            intent_guild_id: None,
            intent_role_id: None,
            ends_at: None,
            ends_reason: None,
        }
    }

    #[test]
    fn grant_object_matches_the_fixture_shape_and_values() {
        let s = Settings::load_with_env(None, Some(Default::default())).unwrap();
        let links = LinkBuilder::from_settings(&s);
        let ours = grant_object(&sample(), &links);
        let theirs = fixture("api/grant.json");
        assert_eq!(keys(&ours), keys(&theirs));
        for (k, v) in theirs.as_object().unwrap() {
            if k != "oauth_url" {
                assert_eq!(&ours[k], v, "{k}");
            }
        }
    }

    #[test]
    fn webhook_matches_the_fixture() {
        let s = Settings::load_with_env(None, Some(Default::default())).unwrap();
        let links = LinkBuilder::from_settings(&s);
        let bytes = webhook_body(
            &sample(),
            GrantEventType::Created,
            "2026-05-01T10:31:00Z".parse().unwrap(),
            &links,
        );
        let ours: Value = serde_json::from_slice(&bytes).unwrap();
        let mut theirs = fixture("webhooks/entitlement_grant.created.json");
        theirs["data"]["oauth_url"] = ours["data"]["oauth_url"].clone();
        assert_eq!(ours, theirs);
        // The platform's key order too, envelope and data: the bytes are sent as rendered.
        let order = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(order(&ours), order(&theirs));
        assert_eq!(order(&ours["data"]), order(&theirs["data"]));
        assert_eq!(order(&ours["data"])[0], "payload_type");
    }
}
