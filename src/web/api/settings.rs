//! `GET/PATCH /business/settings` (a guildgate extension): the business's settings of
//! delivery email — the language of its emails, the support address they answer to,
//! and the days on which a customer who has not connected Discord yet is reminded.

use axum::extract::State;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Merchant;
use super::entitlements::present;
use crate::grants::render::ts;
use crate::i18n::Lang;
use crate::store::email::{self as db, BusinessSettings};
use crate::web::AppState;
use crate::web::error::{ApiError, ApiJson, ApiResult, ErrorBody, Problem};

/// The most reminder days a business may set.
const MAX_REMINDERS: usize = 5;
/// The latest reminder day.
const MAX_REMINDER_DAY: i64 = 90;

/// The languages an email can be written in.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema)]
pub enum EmailLocale {
    #[serde(rename = "en")]
    En,
    #[serde(rename = "de")]
    De,
    #[serde(rename = "fr")]
    Fr,
    #[serde(rename = "es")]
    Es,
    #[serde(rename = "pt-BR")]
    PtBr,
    #[serde(rename = "ja")]
    Ja,
}

/// A business's delivery-email settings.
#[derive(Debug, Serialize, ToSchema)]
pub struct SettingsView {
    /// The language of the business's emails.
    #[schema(value_type = EmailLocale)]
    pub default_locale: String,
    /// `Reply-To` of the business's emails; `null`: none (replies go to the sender).
    #[schema(example = "help@example.com")]
    pub support_email: Option<String>,
    /// Days after a grant was made on which its customer is reminded while it still
    /// waits for their Discord account (each at most once), ascending; empty: never.
    #[schema(example = json!([3, 7]))]
    pub reminder_days: Vec<i32>,
    /// Whether this guildgate sends email at all (its operator configured SMTP).
    pub email_enabled: bool,
    /// RFC 3339, whole seconds, UTC: the last change; `null`: never changed.
    pub updated_at: Option<String>,
}

/// A change of settings: absent fields stay as they are.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchSettings {
    #[serde(default)]
    #[schema(value_type = Option<EmailLocale>)]
    pub default_locale: Option<String>,
    /// `null` removes it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, format = Email)]
    pub support_email: Option<Option<String>>,
    /// At most 5 days, each from 1 to 90 (a repeated day is kept once).
    #[serde(default)]
    #[schema(value_type = Option<Vec<ReminderDay>>, max_items = 5)]
    pub reminder_days: Option<Vec<i64>>,
}

/// A reminder day in the schema: a whole number of days from 1 to 90.
pub struct ReminderDay;

impl utoipa::PartialSchema for ReminderDay {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::Integer))
            .minimum(Some(1))
            .maximum(Some(MAX_REMINDER_DAY))
            .description(Some("Days after the grant was made"))
            .into()
    }
}

impl ToSchema for ReminderDay {}

fn view(s: BusinessSettings, email_enabled: bool) -> SettingsView {
    SettingsView {
        default_locale: s.default_locale,
        support_email: s.support_email,
        reminder_days: s.reminder_days,
        email_enabled,
        updated_at: s.updated_at.map(ts),
    }
}

/// The settings after a patch, or every problem with it.
fn apply(mut s: BusinessSettings, p: PatchSettings) -> Result<BusinessSettings, ApiError> {
    let mut problems = Vec::new();
    let mut bad = |field: &str, msg: &str| {
        problems.push(Problem::new("invalid_field", format!("{field}: {msg}")));
    };
    if let Some(l) = p.default_locale {
        match Lang::parse(&l) {
            Some(lang) => s.default_locale = lang.tag().to_string(),
            None => bad("default_locale", "must be one of en, de, fr, es, pt-BR, ja"),
        }
    }
    if let Some(e) = p.support_email {
        match e.map(|e| crate::email::address(Some(&e))) {
            None => s.support_email = None,
            Some(Some(addr)) => s.support_email = Some(addr),
            Some(None) => bad(
                "support_email",
                "must be an email address, or null for none",
            ),
        }
    }
    if let Some(mut days) = p.reminder_days {
        let given = days.len();
        days.sort_unstable();
        days.dedup();
        if given > MAX_REMINDERS || days.iter().any(|d| !(1..=MAX_REMINDER_DAY).contains(d)) {
            bad(
                "reminder_days",
                "must be at most 5 whole days, each from 1 to 90",
            );
        } else {
            s.reminder_days = days.into_iter().map(|d| d as i32).collect();
        }
    }
    if problems.is_empty() {
        Ok(s)
    } else {
        Err(ApiError::Invalid(problems))
    }
}

/// The business's delivery-email settings (a guildgate extension).
#[utoipa::path(get, path = "/business/settings", tag = "business",
    responses((status = 200, body = SettingsView), (status = 401, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn get(
    merchant: Merchant,
    State(state): State<AppState>,
) -> ApiResult<ApiJson<SettingsView>> {
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    let s = db::settings(&mut conn, merchant.business()).await?;
    Ok(ApiJson(view(s, state.settings.email.enabled())))
}

/// Change the business's delivery-email settings (a guildgate extension).
#[utoipa::path(patch, path = "/business/settings", tag = "business",
    request_body = PatchSettings,
    responses(
        (status = 200, body = SettingsView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 422, description = "A field is invalid (one problem each in `errors`)", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn update(
    merchant: Merchant,
    State(state): State<AppState>,
    ApiJson(patch): ApiJson<PatchSettings>,
) -> ApiResult<ApiJson<SettingsView>> {
    let now = Utc::now();
    let mut tx = state.pool.begin(merchant.caller()).await?;
    // Serializes concurrent changes of one business (the row may not exist yet).
    db::lock_settings(&mut tx, merchant.business()).await?;
    let current = db::settings(&mut tx, merchant.business()).await?;
    let next = apply(current, patch)?;
    db::save_settings(&mut tx, merchant.business(), &next, now).await?;
    tx.commit().await?;
    let saved = BusinessSettings {
        updated_at: Some(now),
        ..next
    };
    Ok(ApiJson(view(saved, state.settings.email.enabled())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_changes_what_it_names_and_refuses_what_is_wrong() {
        let s = apply(
            BusinessSettings::default(),
            PatchSettings {
                default_locale: Some("PT-br".into()),
                support_email: Some(Some(" help@acme.test ".into())),
                reminder_days: Some(vec![7, 3, 7]),
            },
        )
        .unwrap();
        assert_eq!(s.default_locale, "pt-BR");
        assert_eq!(s.support_email.as_deref(), Some("help@acme.test"));
        assert_eq!(s.reminder_days, vec![3, 7]);
        let cleared = apply(
            s.clone(),
            PatchSettings {
                support_email: Some(None),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(cleared.support_email, None);
        assert_eq!(cleared.reminder_days, vec![3, 7]);
        let ApiError::Invalid(problems) = apply(
            s,
            PatchSettings {
                default_locale: Some("it".into()),
                support_email: Some(Some("nope".into())),
                reminder_days: Some(vec![0, 1, 2, 3, 4, 5]),
            },
        )
        .unwrap_err() else {
            panic!()
        };
        assert_eq!(problems.len(), 3);
    }
}
