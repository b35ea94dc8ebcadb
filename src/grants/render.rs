//! The grant object and the `entitlement_grant.*` webhook body, exactly as the platform
//! shapes them (`shared/fixtures/api/grant.json`, `shared/fixtures/webhooks/`).

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use super::link::LinkBuilder;
use super::{Grant, GrantEventType};

/// Timestamps as the platform writes them: RFC 3339, whole seconds, `Z`.
pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn opt_ts(t: Option<DateTime<Utc>>) -> Value {
    t.map(|t| Value::String(ts(t))).unwrap_or(Value::Null)
}

/// The REST grant object.
pub fn grant_object(g: &Grant, links: &LinkBuilder) -> Value {
    json!({
        "id": g.id,
        "business_id": g.business_id,
        "brand_id": g.brand_id,
        "entitlement_id": g.entitlement_id,
        "customer_id": g.customer_id,
        "payment_id": g.payment_id,
        "subscription_id": g.subscription_id,
        "status": g.status,
        "integration_type": "discord",
        "license_key": null,
        "digital_product_delivery": null,
        "delivered_at": opt_ts(g.delivered_at),
        "revoked_at": opt_ts(g.revoked_at),
        "revocation_reason": g.revocation_reason,
        "error_code": g.error_code,
        "error_message": g.error_message,
        "oauth_url": links.url(&g.id, &g.oauth_nonce, g.oauth_expires_at),
        "oauth_expires_at": ts(g.oauth_expires_at),
        "metadata": g.metadata,
        "created_at": ts(g.created_at),
        "updated_at": ts(g.updated_at),
    })
}

/// The webhook body for `event` of grant `g`, stamped `at`.
pub fn webhook_body(
    g: &Grant,
    event: GrantEventType,
    at: DateTime<Utc>,
    links: &LinkBuilder,
) -> Value {
    let mut data = grant_object(g, links);
    let obj = data.as_object_mut().expect("grant object");
    // `payload_type` comes first in the platform's bodies; serde_json keeps insertion
    // order only with preserve_order, so rebuild the map with it in front.
    let mut ordered = serde_json::Map::new();
    ordered.insert(
        "payload_type".into(),
        Value::String("EntitlementGrant".into()),
    );
    ordered.extend(std::mem::take(obj));
    json!({
        "business_id": g.business_id,
        "type": event.as_str(),
        "timestamp": ts(at),
        "data": Value::Object(ordered),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures");

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
            brand_id: Some("brd_3hQp".into()),
            entitlement_id: "ent_9Xc2Lw7QpR".into(),
            customer_id: "cus_8wM2kq1Zr7".into(),
            payment_id: None,
            subscription_id: Some("sub_0NXzr8fEJ4".into()),
            status: "Pending".into(),
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
        let ours = webhook_body(
            &sample(),
            GrantEventType::Created,
            "2026-05-01T10:31:00Z".parse().unwrap(),
            &links,
        );
        let mut theirs = fixture("webhooks/entitlement_grant.created.json");
        theirs["data"]["oauth_url"] = ours["data"]["oauth_url"].clone();
        assert_eq!(ours, theirs);
        let first = ours["data"].as_object().unwrap().keys().next().unwrap();
        assert_eq!(first, "payload_type");
    }
}
