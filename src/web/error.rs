//! The one error type of the merchant API. Every failure becomes `{code, message}`
//! (`tests/fixtures/contract/api/error.json`) with its status; a 422 for several problems at once
//! (a Discord misconfiguration can have more than one) also lists each in `errors`.
//!
//! 5xx answers are logged here with their cause and shown to the merchant without it:
//! a database error message can name tables, hosts or values that are not theirs to see.

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, QueryRejection, RawPathParamsRejection};
use axum::extract::{FromRequest, FromRequestParts, Query, RawPathParams, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

/// One thing wrong with a request, as shown to the merchant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// Stable, machine-readable (`invalid_field`, `discord_role_hierarchy`, …).
    pub code: String,
    /// What is wrong and how to fix it, in a sentence or two.
    pub message: String,
}

impl Problem {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    /// Every problem, when there is more than one (the first is `code`/`message`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<Problem>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON, or not JSON at all where JSON was expected (400).
    #[error("{0}")]
    Malformed(String),
    /// No API key, or not a valid one (401).
    #[error("missing or invalid API key")]
    Unauthorized,
    /// Not found, or not this business's (404: another business's object is never 403,
    /// so ids cannot be probed).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// No route has this path (404), or none takes this method on it (405): answered in
    /// the same shape as every other error, so an SDK's error names what was wrong.
    #[error("no route {method} {path}")]
    NoRoute {
        method: String,
        path: String,
        /// The path exists with other methods.
        other_methods: bool,
    },
    /// The request conflicts with the current state (409).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// The body exceeds `http.max_body_bytes` (413).
    #[error("request body too large")]
    TooLarge,
    /// Well-formed but invalid: a field, or the Discord configuration (422).
    #[error("{}", .0.first().map(|p| p.message.as_str()).unwrap_or("invalid request"))]
    Invalid(Vec<Problem>),
    /// A service guildgate depends on (Discord) cannot answer right now (503).
    #[error("{0}")]
    Unavailable(String),
    /// Too many requests wait for Discord in this process; this one was not sent (503,
    /// `Retry-After`).
    #[error("{0}")]
    DiscordBusy(String),
    /// The business made more requests than `api.requests_per_second`/`api.burst`
    /// allow (429, `Retry-After`).
    #[error("rate limited for {retry_after:?}")]
    RateLimited { retry_after: std::time::Duration },
    /// The request took longer than `http.request_timeout` and was abandoned (503).
    #[error("request timed out")]
    Timeout,
    /// `http.max_concurrent_requests` requests are being handled already, or every
    /// connection of the HTTP pool stayed taken for its acquire timeout (503,
    /// `Retry-After`).
    #[error("too many concurrent requests")]
    Overloaded,
    /// PostgreSQL cancelled a statement of the request after
    /// `database.http_statement_timeout` (503); the transaction rolled back.
    #[error("a statement ran past the HTTP pool's statement timeout")]
    QueryTimeout,
    /// Anything else: logged, shown as a bare 500.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A 429 told to come back after `retry_after`: what a refusal of
    /// [`crate::web::limits::Limits`] answers.
    pub fn rate_limited(retry_after: std::time::Duration) -> Self {
        ApiError::RateLimited { retry_after }
    }

    /// A 422 naming `field`.
    pub fn field(field: &str, message: impl std::fmt::Display) -> Self {
        ApiError::Invalid(vec![Problem::new(
            "invalid_field",
            format!("{field}: {message}"),
        )])
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::NoRoute {
                other_methods: false,
                ..
            } => StatusCode::NOT_FOUND,
            ApiError::NoRoute { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unavailable(_)
            | ApiError::DiscordBusy(_)
            | ApiError::Timeout
            | ApiError::Overloaded
            | ApiError::QueryTimeout => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn body(&self) -> ErrorBody {
        let one = |code: &str, message: String| ErrorBody {
            code: code.into(),
            message,
            errors: Vec::new(),
        };
        match self {
            ApiError::Malformed(m) => one("malformed_request", m.clone()),
            ApiError::Unauthorized => one(
                "unauthorized",
                "Send a valid API key as `Authorization: Bearer <key>`.".into(),
            ),
            ApiError::NotFound(what) => one("not_found", format!("No such {what}.")),
            ApiError::NoRoute {
                method,
                path,
                other_methods,
            } => {
                // The path is the caller's own input: shown, but not at any length.
                let shown: String = path.chars().take(200).collect();
                if *other_methods {
                    one(
                        "method_not_allowed",
                        format!("{method} is not a method of {shown}; the routes and their methods are listed at /openapi.json."),
                    )
                } else {
                    one(
                        "not_found",
                        format!("There is no route {method} {shown}; the routes are listed at /openapi.json."),
                    )
                }
            }
            ApiError::Conflict { code, message } => one(code, message.clone()),
            ApiError::TooLarge => one(
                "payload_too_large",
                "The request body is larger than this server accepts.".into(),
            ),
            ApiError::Invalid(problems) => {
                let first = problems
                    .first()
                    .cloned()
                    .unwrap_or_else(|| Problem::new("invalid_request", "invalid request"));
                ErrorBody {
                    code: first.code,
                    message: first.message,
                    errors: if problems.len() > 1 {
                        problems.clone()
                    } else {
                        Vec::new()
                    },
                }
            }
            ApiError::Unavailable(m) => one("service_unavailable", m.clone()),
            ApiError::DiscordBusy(m) => one("discord_busy", m.clone()),
            ApiError::RateLimited { retry_after } => one(
                "rate_limited",
                format!(
                    "Too many requests for this account; try again in {} s (Retry-After).",
                    retry_secs(*retry_after)
                ),
            ),
            ApiError::Timeout => one(
                "request_timeout",
                "The request took too long and was abandoned; nothing it had not finished was saved. Try again.".into(),
            ),
            ApiError::Overloaded => one(
                "overloaded",
                "The server is handling too many requests right now. Try again in a moment.".into(),
            ),
            ApiError::QueryTimeout => one(
                "query_timeout",
                "A database statement of this request ran longer than this server allows and was cancelled; nothing was saved. For a list, ask for a smaller page (page_size) or an earlier page_number; otherwise try again shortly.".into(),
            ),
            ApiError::Internal(_) => one(
                "internal_error",
                "Something went wrong on our side; it was logged. Try again later.".into(),
            ),
        }
    }
}

/// Whole seconds to wait, as `Retry-After` says it: rounded up, at least 1.
pub fn retry_secs(d: std::time::Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

impl ApiError {
    /// The `Retry-After` of answers that have one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after } => Some(retry_secs(*retry_after)),
            ApiError::DiscordBusy(_) | ApiError::Overloaded => Some(1),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            // Load, not a fault: counted in metrics, not logged as an error each time.
            ApiError::DiscordBusy(_)
            | ApiError::Timeout
            | ApiError::Overloaded
            | ApiError::QueryTimeout => {
                tracing::warn!(error = %self, %status, "API request refused under load")
            }
            _ if status.is_server_error() => {
                tracing::error!(error = %self, %status, "API request failed")
            }
            _ => {}
        }
        let retry_after = self.retry_after();
        let mut r = (status, axum::Json(self.body())).into_response();
        if let Some(secs) = retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        r
    }
}

impl From<crate::discord::bots::BotError> for ApiError {
    fn from(e: crate::discord::bots::BotError) -> Self {
        match e {
            crate::discord::bots::BotError::Db(e) => e.into(),
            crate::discord::bots::BotError::Sealed => ApiError::Conflict {
                code: "discord_application_unreadable",
                message: "The secrets of this business's Discord application cannot be decrypted with the configured keys. Register the application again with PUT /discord/application.".into(),
            },
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if matches!(e, sqlx::Error::PoolTimedOut) {
            ApiError::Overloaded
        } else if crate::store::is_statement_timeout(&e) {
            ApiError::QueryTimeout
        } else {
            ApiError::Internal(format!("database: {e}"))
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonDataError(e) => {
                // axum names the path of the offending field ("integration_config.guild_id:
                // invalid type …"); keep that, drop axum's generic preamble.
                let text = e.body_text();
                let detail = text
                    .strip_prefix("Failed to deserialize the JSON body into the target type: ")
                    .unwrap_or(&text);
                ApiError::Invalid(vec![Problem::new("invalid_field", detail)])
            }
            JsonRejection::JsonSyntaxError(e) => {
                ApiError::Malformed(format!("The body is not valid JSON: {}", e.body_text()))
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::Malformed(
                "Send the body as JSON with `Content-Type: application/json`.".into(),
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge,
            other => ApiError::Malformed(other.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        let text = r.body_text();
        let detail = text
            .strip_prefix("Failed to deserialize query string: ")
            .unwrap_or(&text);
        ApiError::Invalid(vec![Problem::new("invalid_query", detail)])
    }
}

/// `Json<T>` whose rejections are [`ApiError`]s, and which takes only a JSON object:
/// serde fills a struct from an array by position, so `["name", "discord", {…}]` would
/// otherwise pass for an entitlement.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Content type, size limit and syntax as axum checks them; the text is kept.
        let axum::Json(raw) = axum::Json::<Box<RawValue>>::from_request(req, state).await?;
        Ok(ApiJson(body_of(&raw)?))
    }
}

/// An optional JSON body: an empty (or all-whitespace) body is `T::default()`, and needs
/// no `Content-Type`; any other body gets the checks of [`ApiJson`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OptionalApiJson<T>(pub T);

impl<T, S> FromRequest<S> for OptionalApiJson<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge
            } else {
                ApiError::Malformed(r.body_text())
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalApiJson(T::default()));
        }
        let raw: Box<RawValue> = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::Malformed(format!("The body is not valid JSON: {e}")))?;
        Ok(OptionalApiJson(body_of(&raw)?))
    }
}

/// What every JSON body must be before it is read into `T`: an object, without U+0000 in
/// any string or key (PostgreSQL can store neither; see [`crate::nul`]).
fn body_of<T: DeserializeOwned>(raw: &RawValue) -> Result<T, ApiError> {
    let text = raw.get().trim_start();
    if !text.starts_with('{') {
        let found = match text.as_bytes().first() {
            Some(b'[') => "an array",
            Some(b'"') => "a string",
            Some(b't' | b'f') => "a boolean",
            Some(b'n') => "null",
            _ => "a number",
        };
        return Err(ApiError::Invalid(vec![Problem::new(
            "invalid_body",
            format!("The body must be a JSON object, not {found}."),
        )]));
    }
    if let Some(at) = crate::nul::find_in_json(text.as_bytes()) {
        return Err(ApiError::Invalid(vec![Problem::new(
            "invalid_field",
            at.to_string(),
        )]));
    }
    let axum::Json(v) = axum::Json::<T>::from_bytes(text.as_bytes())?;
    Ok(v)
}

/// Routes whose answers are HTML pages for a person's browser, never the error shape.
pub const BROWSER_PAGES: &[&str] = &[
    "/oauth/discord/callback",
    "/discord/bot/callback",
    "/access",
    "/access/connect",
    "/access/restore",
    "/access/switch",
    "/access/switch/confirm",
];

/// Middleware of every API route: refuses a path or query parameter holding U+0000
/// (PostgreSQL can store neither; see [`crate::nul`]), and a path parameter whose
/// percent-encoding is not UTF-8, with a 422 naming it, before the handler runs (else
/// the handler's `Path` would answer the latter with axum's plain-text 400, outside the
/// error shape). Bodies are checked by [`ApiJson`].
///
/// The pages browsers are sent to ([`BROWSER_PAGES`]) are left to their handlers, which
/// answer with a page a person can read: a parameter holding U+0000 there is an altered
/// link, refused by its signature before anything is stored.
pub async fn refuse_bad_params(
    path: Result<RawPathParams, RawPathParamsRejection>,
    req: Request,
    next: Next,
) -> Response {
    const NUL: &str = "must not contain U+0000 (the NUL character)";
    if BROWSER_PAGES.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    match &path {
        Ok(params) => {
            if let Some((name, _)) = params
                .iter()
                .find(|(_, value)| crate::nul::contains_nul(value))
            {
                return ApiError::field(name, NUL).into_response();
            }
        }
        Err(RawPathParamsRejection::InvalidUtf8InPathParam(e)) => {
            // axum keeps the parameter's name to itself but for its message:
            // "Invalid UTF-8 in `name`".
            let text = e.body_text();
            let name = text.split('`').nth(1).unwrap_or("path parameter");
            return ApiError::field(name, "must be percent-encoded UTF-8").into_response();
        }
        // No parameters matched (a route without any): nothing to check.
        Err(_) => {}
    }
    let query = url::form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes());
    for (name, value) in query {
        if crate::nul::contains_nul(&name) || crate::nul::contains_nul(&value) {
            let name = name.replace('\0', "\\u0000");
            return ApiError::Invalid(vec![Problem::new(
                "invalid_query",
                format!("{name}: {NUL}"),
            )])
            .into_response();
        }
    }
    next.run(req).await
}

/// `Query<T>` whose rejections are [`ApiError`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Query(v) = Query::<T>::from_request_parts(parts, state).await?;
        Ok(ApiQuery(v))
    }
}

impl<T: Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// What handlers return.
pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn retry_after_is_whole_seconds_rounded_up() {
        assert_eq!(retry_secs(Duration::ZERO), 1);
        assert_eq!(retry_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_secs(Duration::from_millis(2001)), 3);
    }
}
