//! SQL the Discord side needs: customers' linked accounts (`discord_links`) and the
//! grant updates the syncer and the OAuth callback make.

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgConnection;

use crate::crypto::{DecryptError, TokenCipher};
use crate::domain::Grant;

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

/// Live grants other than `except_grant`, of any customer or business, that hold (or
/// are about to hold) an access of one of `accounts` (`(guild, Discord user)` pairs).
pub async fn other_holders(
    conn: &mut PgConnection,
    accounts: &[(String, String)],
    except_grant: &str,
) -> Result<Vec<Grant>, sqlx::Error> {
    let (guilds, users): (Vec<String>, Vec<String>) = accounts.iter().cloned().unzip();
    sqlx::query_as(
        "SELECT g.* FROM unnest($1::text[], $2::text[]) AS a (guild_id, user_id)
         JOIN grants g ON (g.applied_guild_id = a.guild_id AND g.applied_user_id = a.user_id)
                       OR (g.intent_guild_id = a.guild_id AND g.intent_user_id = a.user_id)
         WHERE g.id <> $3 AND g.status <> 'Revoked'",
    )
    .bind(&guilds)
    .bind(&users)
    .bind(except_grant)
    .fetch_all(conn)
    .await
}

/// An access of a Discord account (`role_id` `None`: the membership) as recorded in
/// `discord_holdings`.
pub type AccessKey = (String, String, Option<String>);

/// The accesses of `accounts` guildgate found already there when it first gave them.
pub async fn found_accesses(
    conn: &mut PgConnection,
    accounts: &[(String, String)],
) -> Result<Vec<AccessKey>, sqlx::Error> {
    let (guilds, users): (Vec<String>, Vec<String>) = accounts.iter().cloned().unzip();
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT h.guild_id, h.user_id, h.role_id
         FROM unnest($1::text[], $2::text[]) AS a (guild_id, user_id)
         JOIN discord_holdings h ON h.guild_id = a.guild_id AND h.user_id = a.user_id
         WHERE h.found",
    )
    .bind(&guilds)
    .bind(&users)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(g, u, r)| (g, u, (!r.is_empty()).then_some(r)))
        .collect())
}

/// The accesses of `accounts` recorded before a call to Discord whose answer was never
/// recorded (a run died in between), with when they were about to be given.
pub async fn unsettled_accesses(
    conn: &mut PgConnection,
    accounts: &[(String, String)],
) -> Result<Vec<(AccessKey, DateTime<Utc>)>, sqlx::Error> {
    let (guilds, users): (Vec<String>, Vec<String>) = accounts.iter().cloned().unzip();
    let rows: Vec<(String, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT h.guild_id, h.user_id, h.role_id, h.since
         FROM unnest($1::text[], $2::text[]) AS a (guild_id, user_id)
         JOIN discord_holdings h ON h.guild_id = a.guild_id AND h.user_id = a.user_id
         WHERE NOT h.settled",
    )
    .bind(&guilds)
    .bind(&users)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(g, u, r, since)| ((g, u, (!r.is_empty()).then_some(r)), since))
        .collect())
}

/// Records accesses about to be given, unsettled (counted as added by guildgate) until
/// Discord's answer says whether they were there already; returns those that were not
/// recorded before.
pub async fn hold(
    conn: &mut PgConnection,
    accesses: &[AccessKey],
    now: DateTime<Utc>,
) -> Result<Vec<AccessKey>, sqlx::Error> {
    let mut created = Vec::new();
    for (g, u, r) in accesses {
        let done = sqlx::query(
            "INSERT INTO discord_holdings (guild_id, user_id, role_id, found, since, settled)
             VALUES ($1, $2, $3, false, $4, false) ON CONFLICT DO NOTHING",
        )
        .bind(g)
        .bind(u)
        .bind(r.as_deref().unwrap_or(""))
        .bind(now)
        .execute(&mut *conn)
        .await?;
        if done.rows_affected() == 1 {
            created.push((g.clone(), u.clone(), r.clone()));
        }
    }
    Ok(created)
}

/// Records whether accesses were found already there (`true`: the answers showed them
/// before guildgate gave them) or added by guildgate (`false`: Discord added them now),
/// settling them.
pub async fn set_found(
    conn: &mut PgConnection,
    accesses: &[AccessKey],
    found: bool,
) -> Result<(), sqlx::Error> {
    for (g, u, r) in accesses {
        sqlx::query(
            "UPDATE discord_holdings SET found = $4, settled = true
             WHERE guild_id = $1 AND user_id = $2 AND role_id = $3",
        )
        .bind(g)
        .bind(u)
        .bind(r.as_deref().unwrap_or(""))
        .bind(found)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// `access` was let go by its last holder: removed at Discord, so forget it, and the
/// account's membership record once no live grant holds anything of that account in
/// the server any more. An access found already there stays recorded as found (it is
/// still there, and not guildgate's: reconcile does not count it as drift).
pub async fn forget_holding(
    conn: &mut PgConnection,
    access: &AccessKey,
) -> Result<(), sqlx::Error> {
    let (g, u, r) = access;
    sqlx::query(
        "DELETE FROM discord_holdings
         WHERE guild_id = $1 AND user_id = $2 AND role_id = $3 AND NOT found",
    )
    .bind(g)
    .bind(u)
    .bind(r.as_deref().unwrap_or(""))
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "DELETE FROM discord_holdings h
         WHERE h.guild_id = $1 AND h.user_id = $2 AND h.role_id = '' AND NOT h.found
         AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.status <> 'Revoked'
             AND ((g.applied_guild_id = $1 AND g.applied_user_id = $2)
               OR (g.intent_guild_id = $1 AND g.intent_user_id = $2)))",
    )
    .bind(g)
    .bind(u)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records what a grant is about to apply beside what it holds (an account switch, a
/// role change), before the call to Discord.
pub async fn set_intent(
    conn: &mut PgConnection,
    id: &str,
    intent: &AccessKey,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE grants SET intent_guild_id = $2, intent_user_id = $3, intent_role_id = $4, updated_at = $5
         WHERE id = $1",
    )
    .bind(id)
    .bind(&intent.0)
    .bind(&intent.1)
    .bind(&intent.2)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
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

/// Ids of every live grant of a customer (to sync after they linked an account).
pub async fn live_grant_ids(
    conn: &mut PgConnection,
    business_id: &str,
    customer_id: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM grants WHERE business_id = $1 AND customer_id = $2 AND status <> 'Revoked' ORDER BY created_at",
    )
    .bind(business_id)
    .bind(customer_id)
    .fetch_all(conn)
    .await
}

/// Records what a grant applied in Discord (`None`: nothing any more); it is about to
/// apply nothing else.
pub async fn set_applied(
    conn: &mut PgConnection,
    id: &str,
    applied: Option<(String, String, Option<String>)>,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let (u, g, r) = match applied {
        Some((u, g, r)) => (Some(u), Some(g), r),
        None => (None, None, None),
    };
    sqlx::query(
        "UPDATE grants SET applied_user_id = $2, applied_guild_id = $3, applied_role_id = $4,
             intent_user_id = NULL, intent_guild_id = NULL, intent_role_id = NULL, updated_at = $5
         WHERE id = $1",
    )
    .bind(id)
    .bind(u)
    .bind(g)
    .bind(r)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// `Pending`/`Failed` → `Delivered`; `None` if the grant was in another status.
pub async fn mark_delivered(
    conn: &mut PgConnection,
    id: &str,
    now: DateTime<Utc>,
) -> Result<Option<Grant>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE grants SET status = 'Delivered', delivered_at = $2, error_code = NULL, error_message = NULL, updated_at = $2
         WHERE id = $1 AND status IN ('Pending', 'Failed')
         RETURNING *",
    )
    .bind(id)
    .bind(now)
    .fetch_optional(conn)
    .await
}

/// `Pending` → `Failed` with an error (returns the grant), or, for a grant already
/// `Failed`, refreshes its error (returns `None`: no second `failed` webhook).
pub async fn mark_failed(
    conn: &mut PgConnection,
    id: &str,
    code: &str,
    message: &str,
    now: DateTime<Utc>,
) -> Result<Option<Grant>, sqlx::Error> {
    let moved: Option<Grant> = sqlx::query_as(
        "UPDATE grants SET status = 'Failed', error_code = $2, error_message = $3, updated_at = $4
         WHERE id = $1 AND status = 'Pending'
         RETURNING *",
    )
    .bind(id)
    .bind(code)
    .bind(message)
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    if moved.is_none() {
        sqlx::query(
            "UPDATE grants SET error_code = $2, error_message = $3, updated_at = $4 WHERE id = $1 AND status = 'Failed'",
        )
        .bind(id)
        .bind(code)
        .bind(message)
        .bind(now)
        .execute(conn)
        .await?;
    }
    Ok(moved)
}

/// Gives a grant a new link nonce (and expiry): the old `oauth_url` stops working.
pub async fn set_nonce(
    conn: &mut PgConnection,
    id: &str,
    nonce: &str,
    expires_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Grant, sqlx::Error> {
    sqlx::query_as(
        "UPDATE grants SET oauth_nonce = $2, oauth_expires_at = $3, updated_at = $4 WHERE id = $1 RETURNING *",
    )
    .bind(id)
    .bind(nonce)
    .bind(expires_at)
    .bind(now)
    .fetch_one(conn)
    .await
}

/// A new nonce and expiry for a `Pending` grant whose link expired; `None` if it is
/// not (any more) pending and expired.
pub async fn renew_nonce_if_expired(
    conn: &mut PgConnection,
    id: &str,
    nonce: &str,
    expires_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Option<Grant>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE grants SET oauth_nonce = $2, oauth_expires_at = $3, updated_at = $4
         WHERE id = $1 AND status = 'Pending' AND oauth_expires_at <= $4 RETURNING *",
    )
    .bind(id)
    .bind(nonce)
    .bind(expires_at)
    .bind(now)
    .fetch_optional(conn)
    .await
}
