//! SQL of customers' linked Discord accounts (`discord_links`), their tokens sealed
//! for their row.

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgConnection;

use crate::crypto::{DecryptError, TokenCipher};

/// A customer's linked Discord account, tokens still encrypted.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct LinkRow {
    pub business_id: String,
    pub customer_id: String,
    pub discord_user_id: String,
    pub access_token_enc: Vec<u8>,
    pub refresh_token_enc: Option<Vec<u8>>,
    pub expires_at: DateTime<Utc>,
    pub scopes: String,
    /// Bumped by every write of the tokens; a refresh stores its tokens only over the
    /// version it read.
    pub token_version: i64,
    /// The key that encrypted the tokens; `None`: stored before keys had ids, without
    /// associated data.
    pub token_key_id: Option<String>,
    /// The application the tokens were issued to; `None`: the shared one.
    pub client_id: Option<String>,
}

/// The associated data that binds a token ciphertext to its row and column, so a
/// ciphertext copied to another customer's row (or from one column to the other)
/// does not decrypt.
pub fn token_aad(business_id: &str, customer_id: &str, column: &str) -> Vec<u8> {
    format!("discord_links\0{column}\0{business_id}\0{customer_id}").into_bytes()
}

/// A customer's tokens encrypted for their row with the current key.
#[derive(Clone, Debug)]
pub struct SealedTokens {
    pub access_token_enc: Vec<u8>,
    pub refresh_token_enc: Option<Vec<u8>>,
    pub token_key_id: String,
}

impl SealedTokens {
    pub fn seal(
        cipher: &TokenCipher,
        business_id: &str,
        customer_id: &str,
        access_token: &SecretString,
        refresh_token: Option<&SecretString>,
    ) -> Self {
        Self {
            access_token_enc: cipher.encrypt(
                access_token.expose_secret(),
                &token_aad(business_id, customer_id, "access_token_enc"),
            ),
            refresh_token_enc: refresh_token.map(|r| {
                cipher.encrypt(
                    r.expose_secret(),
                    &token_aad(business_id, customer_id, "refresh_token_enc"),
                )
            }),
            token_key_id: cipher.key_id().to_string(),
        }
    }
}

impl LinkRow {
    /// A link of `customer_id` of `business_id` to `discord_user_id` with `tokens`.
    pub fn new(
        business_id: &str,
        customer_id: &str,
        discord_user_id: String,
        tokens: SealedTokens,
        expires_at: DateTime<Utc>,
        scopes: String,
    ) -> Self {
        Self {
            business_id: business_id.to_string(),
            customer_id: customer_id.to_string(),
            discord_user_id,
            access_token_enc: tokens.access_token_enc,
            refresh_token_enc: tokens.refresh_token_enc,
            expires_at,
            scopes,
            token_version: 0,
            token_key_id: Some(tokens.token_key_id),
            client_id: None,
        }
    }

    /// The same link, its tokens issued to `client_id`'s application (`None`: the
    /// shared one).
    pub fn issued_by(mut self, client_id: Option<String>) -> Self {
        self.client_id = client_id;
        self
    }

    fn open(
        &self,
        cipher: &TokenCipher,
        stored: &[u8],
        column: &str,
    ) -> Result<SecretString, DecryptError> {
        cipher.decrypt(
            stored,
            self.token_key_id.as_deref(),
            &token_aad(&self.business_id, &self.customer_id, column),
        )
    }

    pub fn access_token(&self, cipher: &TokenCipher) -> Result<SecretString, DecryptError> {
        self.open(cipher, &self.access_token_enc, "access_token_enc")
    }

    /// `None` when Discord gave no refresh token.
    pub fn refresh_token(
        &self,
        cipher: &TokenCipher,
    ) -> Option<Result<SecretString, DecryptError>> {
        let stored = self.refresh_token_enc.as_deref()?;
        Some(self.open(cipher, stored, "refresh_token_enc"))
    }
}

/// Serialises the changes to one customer's linked account until the transaction ends:
/// of two callbacks or switches of the customer at once, the second sees what the first
/// linked. Taken before any of the customer's grants is locked.
pub async fn lock_customer(
    conn: &mut PgConnection,
    business_id: &str,
    customer_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended('customer-link:' || $1 || ':' || $2, 0))",
    )
    .bind(business_id)
    .bind(customer_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The linked account of a customer of a business.
pub async fn link_of(
    conn: &mut PgConnection,
    business_id: &str,
    customer_id: &str,
) -> Result<Option<LinkRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT business_id, customer_id, discord_user_id, access_token_enc, refresh_token_enc, expires_at, scopes,
             token_version, token_key_id, client_id
         FROM discord_links WHERE business_id = $1 AND customer_id = $2",
    )
    .bind(business_id)
    .bind(customer_id)
    .fetch_optional(conn)
    .await
}

/// Stores (or replaces) a customer's linked account: the account they just authorized
/// wins over whatever was stored (`token_version` of `l` is ignored and bumped), with
/// its `names` (username, display name) as Discord gave them, if known.
pub async fn upsert_link(
    conn: &mut PgConnection,
    l: &LinkRow,
    names: Option<(&str, Option<&str>)>,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO discord_links (business_id, customer_id, discord_user_id, access_token_enc,
             refresh_token_enc, expires_at, scopes, created_at, updated_at, token_key_id,
             username, global_name, client_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, $11, $12)
         ON CONFLICT (business_id, customer_id) DO UPDATE SET
             username = EXCLUDED.username, global_name = EXCLUDED.global_name,
             discord_user_id = EXCLUDED.discord_user_id, access_token_enc = EXCLUDED.access_token_enc,
             refresh_token_enc = EXCLUDED.refresh_token_enc, expires_at = EXCLUDED.expires_at,
             scopes = EXCLUDED.scopes, updated_at = EXCLUDED.updated_at,
             token_key_id = EXCLUDED.token_key_id, client_id = EXCLUDED.client_id,
             token_version = discord_links.token_version + 1,
             needs_authorization_since = NULL",
    )
    .bind(&l.business_id)
    .bind(&l.customer_id)
    .bind(&l.discord_user_id)
    .bind(&l.access_token_enc)
    .bind(&l.refresh_token_enc)
    .bind(l.expires_at)
    .bind(&l.scopes)
    .bind(now)
    .bind(&l.token_key_id)
    .bind(names.map(|n| n.0))
    .bind(names.and_then(|n| n.1))
    .bind(&l.client_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Stores the tokens a refresh of `read` returned, only if the link is still `read`'s:
/// the same Discord user at the same `token_version`. `false` when the customer linked
/// again (possibly another account) meanwhile: that newer link stays as it is.
pub async fn store_refreshed(
    conn: &mut PgConnection,
    read: &LinkRow,
    tokens: &SealedTokens,
    expires_at: DateTime<Utc>,
    scopes: &str,
    now: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE discord_links SET access_token_enc = $5, refresh_token_enc = $6, expires_at = $7,
             scopes = $8, updated_at = $9, token_key_id = $10, token_version = token_version + 1
         WHERE business_id = $1 AND customer_id = $2 AND discord_user_id = $3 AND token_version = $4",
    )
    .bind(&read.business_id)
    .bind(&read.customer_id)
    .bind(&read.discord_user_id)
    .bind(read.token_version)
    .bind(&tokens.access_token_enc)
    .bind(&tokens.refresh_token_enc)
    .bind(expires_at)
    .bind(scopes)
    .bind(now)
    .bind(&tokens.token_key_id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Whether another customer of the business has `discord_user_id` linked too.
pub async fn linked_elsewhere(
    conn: &mut PgConnection,
    business_id: &str,
    customer_id: &str,
    discord_user_id: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM discord_links
         WHERE business_id = $1 AND customer_id <> $2 AND discord_user_id = $3)",
    )
    .bind(business_id)
    .bind(customer_id)
    .bind(discord_user_id)
    .fetch_one(conn)
    .await
}

/// At most `limit` links whose tokens are not sealed with the key `key_id`, after the
/// link `after` (business, customer), in that order.
pub async fn not_sealed_with(
    pool: &sqlx::PgPool,
    key_id: &str,
    after: (&str, &str),
    limit: i64,
) -> Result<Vec<LinkRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT business_id, customer_id, discord_user_id, access_token_enc, refresh_token_enc,
             expires_at, scopes, token_version, token_key_id, client_id
         FROM discord_links
         WHERE token_key_id IS DISTINCT FROM $1 AND (business_id, customer_id) > ($2, $3)
         ORDER BY business_id, customer_id
         LIMIT $4",
    )
    .bind(key_id)
    .bind(after.0)
    .bind(after.1)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Writes `row`'s tokens sealed anew, only if the link did not change since `row` was
/// read; `false` if it did.
pub async fn reseal(
    conn: &mut PgConnection,
    row: &LinkRow,
    sealed: &SealedTokens,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE discord_links SET access_token_enc = $5, refresh_token_enc = $6, token_key_id = $7
         WHERE business_id = $1 AND customer_id = $2 AND token_version = $3
           AND token_key_id IS NOT DISTINCT FROM $4",
    )
    .bind(&row.business_id)
    .bind(&row.customer_id)
    .bind(row.token_version)
    .bind(&row.token_key_id)
    .bind(&sealed.access_token_enc)
    .bind(&sealed.refresh_token_enc)
    .bind(&sealed.token_key_id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// How many links are not sealed with the key `key_id`.
pub async fn count_not_sealed_with(pool: &sqlx::PgPool, key_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM discord_links WHERE token_key_id IS DISTINCT FROM $1")
        .bind(key_id)
        .fetch_one(pool)
        .await
}
