//! `/entitlements/{id}/translations`: an entitlement's name and description in other
//! locales, as the platform's `entitlements.translations` serves them, and the `locale`
//! query parameter of entitlement reads, which shows them instead of the base text.
//!
//! A locale is one of the platform's codes (its `GET /locales`, the checkout's locales):
//! a translation saved here under any other code could not be saved on the platform, so
//! a merchant moving back would lose it. Reads are lenient, as the platform's are: an
//! unknown code shows the base text. A region tag (`pt-BR`) falls back to its language
//! (`pt`), so a storefront can pass the visitor's tag as it is.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Items;
use super::auth::Merchant;
use super::entitlements::{EntitlementView, MAX_DESCRIPTION, MAX_NAME};
use crate::grants::render::ts;
use crate::store::entitlements as entitlements_db;
use crate::store::translations::{self as db, Translation};
use crate::web::AppState;
use crate::web::error::{ApiError, ApiJson, ApiResult, ErrorBody, Problem};

macro_rules! locales {
    ($($variant:ident = $code:literal),* $(,)?) => {
        /// A locale a translation can have: a code of the platform's `GET /locales`.
        // Each code is its variant's name in lower case, which the schema derive reads
        // from `rename_all` (a per-variant rename made in a macro is lost to it).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
        #[serde(rename_all = "lowercase")]
        #[schema(example = "fr")]
        pub enum Locale {
            $($variant,)*
        }

        impl Locale {
            /// Every locale, in the platform's order.
            pub const ALL: &[Locale] = &[$(Locale::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Locale::$variant => $code,)*
                }
            }

            pub fn parse(code: &str) -> Option<Self> {
                match code {
                    $($code => Some(Locale::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

locales! {
    Ar = "ar", Ca = "ca", Zh = "zh", Nl = "nl", En = "en", Fr = "fr", De = "de",
    He = "he", Id = "id", It = "it", Ja = "ja", Ka = "ka", Ko = "ko", Ms = "ms",
    Pl = "pl", Pt = "pt", Ro = "ro", Ru = "ru", Es = "es", Sv = "sv", Th = "th",
    Tr = "tr",
}

/// A path's `locale`, or a 422 naming it.
fn locale(code: &str) -> Result<Locale, ApiError> {
    Locale::parse(code).ok_or_else(|| {
        let shown: String = code.chars().take(50).collect();
        ApiError::field(
            "locale",
            format!(
                "{shown:?} is not a supported locale; use one of {}",
                Locale::ALL
                    .iter()
                    .map(|l| l.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })
}

/// The translation of an entitlement in one locale.
#[derive(Debug, Serialize, ToSchema)]
pub struct TranslationView {
    pub locale: Locale,
    /// The translated name; `null`: the name has no translation (the base name shows).
    pub name: Option<String>,
    /// The translated description; `null`: the description has no translation.
    pub description: Option<String>,
    /// RFC 3339, whole seconds, UTC: the last change.
    pub updated_at: String,
}

impl TranslationView {
    fn from(t: &Translation) -> Option<Self> {
        Some(Self {
            // Only codes of `Locale` are ever written.
            locale: Locale::parse(&t.locale)?,
            name: t.name.clone(),
            description: t.description.clone(),
            updated_at: ts(t.updated_at),
        })
    }
}

/// `PUT /entitlements/{id}/translations/{locale}`: the whole translation of the locale;
/// a field absent or `null` has no translation. The platform's `activation_message` and
/// `instructions` belong to license-key and digital-file entitlements and are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct PutTranslation {
    #[serde(default)]
    #[schema(
        example = "Rôle Discord des mécènes",
        min_length = 1,
        max_length = 255,
        pattern = r"\S"
    )]
    pub name: Option<String>,
    #[serde(default)]
    #[schema(max_length = 2000)]
    pub description: Option<String>,
}

fn check(body: &PutTranslation) -> Result<(), ApiError> {
    let mut problems = Vec::new();
    let mut bad = |field: &str, msg: String| {
        problems.push(Problem::new("invalid_field", format!("{field}: {msg}")));
    };
    if let Some(name) = &body.name {
        if name.trim().is_empty() {
            bad(
                "name",
                "must not be empty (send null for no translation)".into(),
            );
        } else if name.chars().count() > MAX_NAME {
            bad("name", format!("must be at most {MAX_NAME} characters"));
        }
    }
    if body
        .description
        .as_ref()
        .is_some_and(|d| d.chars().count() > MAX_DESCRIPTION)
    {
        bad(
            "description",
            format!("must be at most {MAX_DESCRIPTION} characters"),
        );
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid(problems))
    }
}

/// The `locale` values of a query (`?locale=fr&locale=de`); `None` when there is none.
fn locales_of(query: Option<&str>) -> Option<Vec<String>> {
    let wanted: Vec<String> = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k == "locale")
        .map(|(_, v)| v.into_owned())
        .collect();
    (!wanted.is_empty()).then_some(wanted)
}

/// List the translations of an entitlement, by locale.
#[utoipa::path(get, path = "/entitlements/{id}/translations", tag = "entitlements",
    params(
        ("id" = String, Path, description = "Entitlement id (`ent_…`)"),
        ("locale" = Option<Vec<String>>, Query, description = "Only these locales (`?locale=fr&locale=de`); none: every locale. A code with no translation is simply not in the answer."),
    ),
    responses((status = 200, body = Items<TranslationView>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(
    merchant: Merchant,
    State(state): State<AppState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<ApiJson<Items<TranslationView>>> {
    let wanted = locales_of(query.as_deref());
    let mut conn = state.pool.acquire(merchant.caller()).await?;
    entitlements_db::get(&mut conn, merchant.business(), &id, false)
        .await?
        .ok_or(ApiError::NotFound("entitlement"))?;
    let rows = db::list(&mut conn, &id, wanted.as_deref()).await?;
    Ok(ApiJson(Items {
        items: rows.iter().filter_map(TranslationView::from).collect(),
    }))
}

/// Create or replace the translation of one locale: 201 for a new locale, 200 for a
/// replaced one.
#[utoipa::path(put, path = "/entitlements/{id}/translations/{locale}", tag = "entitlements",
    params(
        ("id" = String, Path, description = "Entitlement id (`ent_…`)"),
        ("locale" = Locale, Path, description = "A code of the platform's `GET /locales`"),
    ),
    request_body = PutTranslation,
    responses(
        (status = 201, description = "A new locale", body = TranslationView),
        (status = 200, description = "The locale's translation was replaced", body = TranslationView),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, description = "`locale` is not a supported code, or a field is invalid (`invalid_field`, naming it)", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn put(
    merchant: Merchant,
    State(state): State<AppState>,
    Path((id, code)): Path<(String, String)>,
    ApiJson(body): ApiJson<PutTranslation>,
) -> ApiResult<impl IntoResponse> {
    let locale = locale(&code)?;
    check(&body)?;
    let mut tx = state.pool.begin(merchant.caller()).await?;
    // Locked: a translation is not added to an entitlement being deleted.
    entitlements_db::get(&mut tx, merchant.business(), &id, true)
        .await?
        .ok_or(ApiError::NotFound("entitlement"))?;
    let (saved, created) = db::put(
        &mut tx,
        &id,
        locale.as_str(),
        body.name.as_deref(),
        body.description.as_deref(),
        Utc::now(),
    )
    .await?;
    tx.commit().await?;
    let view = TranslationView::from(&saved)
        .ok_or_else(|| ApiError::Internal("a saved locale is not a locale".into()))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, ApiJson(view)))
}

/// Delete the translation of one locale.
#[utoipa::path(delete, path = "/entitlements/{id}/translations/{locale}", tag = "entitlements",
    params(
        ("id" = String, Path, description = "Entitlement id (`ent_…`)"),
        ("locale" = Locale, Path, description = "A code of the platform's `GET /locales`"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such entitlement for this business, or it has no translation in this locale (`not_found`)", body = ErrorBody),
        (status = 422, description = "`locale` is not a supported code (`invalid_field`)", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn delete(
    merchant: Merchant,
    State(state): State<AppState>,
    Path((id, code)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let locale = locale(&code)?;
    let mut tx = state.pool.begin(merchant.caller()).await?;
    entitlements_db::get(&mut tx, merchant.business(), &id, true)
        .await?
        .ok_or(ApiError::NotFound("entitlement"))?;
    if !db::delete(&mut tx, &id, locale.as_str()).await? {
        return Err(ApiError::NotFound("translation"));
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The locales a read with `?locale=code` looks for, best first: the code itself, then
/// its language (`pt-BR` → `pt`).
fn candidates(code: &str) -> Vec<String> {
    let mut out = vec![code.to_owned()];
    if let Some((language, _)) = code.split_once('-')
        && !language.is_empty()
    {
        out.push(language.to_owned());
    }
    out
}

/// Something shown with an entitlement's name and description, which a read with
/// `?locale=` shows translated.
pub trait Localized {
    /// The entitlement whose translations apply.
    fn entitlement_id(&self) -> &str;
    /// Where its name and description are.
    fn texts(&mut self) -> (&mut String, &mut Option<String>);
}

impl Localized for EntitlementView {
    fn entitlement_id(&self) -> &str {
        &self.id
    }
    fn texts(&mut self) -> (&mut String, &mut Option<String>) {
        (&mut self.name, &mut self.description)
    }
}

/// Shows `views` in `locale`: each field with a translation (the exact locale's, else
/// its language's) replaces the base text; the rest stays as it is. No locale, an empty
/// one, or one with no translation leaves them unchanged, as on the platform.
pub async fn localize<V: Localized>(
    conn: &mut sqlx::PgConnection,
    views: &mut [V],
    locale: Option<&str>,
) -> Result<(), sqlx::Error> {
    let Some(code) = locale.filter(|c| !c.is_empty()) else {
        return Ok(());
    };
    if views.is_empty() {
        return Ok(());
    }
    let wanted = candidates(code);
    let mut ids: Vec<String> = views
        .iter()
        .map(|v| v.entitlement_id().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    let found = db::of_entitlements(conn, &ids, &wanted).await?;
    let best = |id: &str, field: fn(&Translation) -> Option<&String>| {
        wanted.iter().find_map(|l| {
            found
                .iter()
                .find(|t| t.entitlement_id == id && &t.locale == l)
                .and_then(field)
                .cloned()
        })
    };
    for v in views.iter_mut() {
        let id = v.entitlement_id().to_owned();
        let (name, description) = v.texts();
        if let Some(translated) = best(&id, |t| t.name.as_ref()) {
            *name = translated;
        }
        if let Some(translated) = best(&id, |t| t.description.as_ref()) {
            *description = Some(translated);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locales_are_the_platforms_codes() {
        assert_eq!(Locale::ALL.len(), 22);
        for l in Locale::ALL {
            assert_eq!(Locale::parse(l.as_str()), Some(*l));
            assert_eq!(serde_json::to_value(l).unwrap(), l.as_str());
        }
        let schema = serde_json::to_value(<Locale as utoipa::PartialSchema>::schema()).unwrap();
        let documented: Vec<&str> = schema["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let codes: Vec<&str> = Locale::ALL.iter().map(|l| l.as_str()).collect();
        assert_eq!(documented, codes);
        for bad in ["", "FR", "pt-BR", "fr ", "xx", "français"] {
            assert_eq!(Locale::parse(bad), None, "{bad}");
        }
        let e = locale("pt-BR").unwrap_err();
        assert!(e.to_string().starts_with("locale: "), "{e}");
    }

    #[test]
    fn a_region_tag_falls_back_to_its_language() {
        assert_eq!(candidates("fr"), ["fr"]);
        assert_eq!(candidates("pt-BR"), ["pt-BR", "pt"]);
        assert_eq!(candidates("-x"), ["-x"]);
    }

    #[test]
    fn the_list_filter_takes_repeated_locales() {
        assert_eq!(locales_of(None), None);
        assert_eq!(locales_of(Some("")), None);
        assert_eq!(
            locales_of(Some("locale=fr&x=1&locale=de")),
            Some(vec!["fr".to_owned(), "de".to_owned()])
        );
    }
}
