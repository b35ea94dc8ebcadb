//! Re-encrypting customers' stored tokens with the current key
//! (`guildgate keys rotate-tokens`), after `secrets.token_encryption_key` changed.
//!
//! Safe to run while `serve` runs, and to run again: it takes the links not yet on the
//! current key in batches, in key order, and writes each one back only if nobody wrote
//! it since it was read (same `token_version` and key id). A link written meanwhile was
//! written by a refresh or a re-link, with the current key of that process. The
//! `token_version` is not bumped: a refresh that read the link before the re-encryption
//! still stores its new tokens.

use serde::Serialize;
use sqlx::PgPool;

use crate::crypto::TokenCipher;
use crate::store::links::{self, SealedTokens};

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RotationReport {
    /// Links re-encrypted with the current key.
    pub reencrypted: u64,
    /// Links and applications written by someone else between the read and the write
    /// (left as written).
    pub changed_meanwhile: u64,
    /// Links no configured key decrypts (left as they are; their customers must
    /// authorize again).
    pub unreadable: u64,
    /// Links still not on the current key after the run.
    pub remaining: i64,
    /// Businesses' own Discord applications whose secrets were re-encrypted.
    pub applications_reencrypted: u64,
    /// Applications no configured key decrypts (left as they are: the business
    /// registers its application again).
    pub applications_unreadable: u64,
    /// Applications still not on the current key after the run.
    pub applications_remaining: i64,
}

/// Re-encrypts every link not on `cipher`'s current key, `batch` links per transaction.
pub async fn rotate_tokens(
    pool: &PgPool,
    cipher: &TokenCipher,
    batch: i64,
) -> Result<RotationReport, sqlx::Error> {
    let current = cipher.key_id();
    let mut report = RotationReport::default();
    let mut after = (String::new(), String::new());
    loop {
        let rows = links::not_sealed_with(pool, current, (&after.0, &after.1), batch).await?;
        let Some(last) = rows.last() else { break };
        after = (last.business_id.clone(), last.customer_id.clone());
        let mut tx = pool.begin().await?;
        for row in &rows {
            let access = row.access_token(cipher);
            let refresh = row.refresh_token(cipher).transpose();
            let (Ok(access), Ok(refresh)) = (access, refresh) else {
                tracing::warn!(
                    business_id = %row.business_id,
                    customer_id = %row.customer_id,
                    key_id = row.token_key_id.as_deref().unwrap_or("none"),
                    "no configured key decrypts this customer's tokens"
                );
                report.unreadable += 1;
                continue;
            };
            let sealed = SealedTokens::seal(
                cipher,
                &row.business_id,
                &row.customer_id,
                &access,
                refresh.as_ref(),
            );
            let done = links::reseal(&mut tx, row, &sealed).await?;
            if done {
                report.reencrypted += 1;
            } else {
                report.changed_meanwhile += 1;
            }
        }
        tx.commit().await?;
    }
    rotate_applications(pool, cipher, &mut report).await?;
    report.remaining = links::count_not_sealed_with(pool, current).await?;
    report.applications_remaining = i64::try_from(
        crate::store::applications::not_on_key(pool, current)
            .await?
            .len(),
    )
    .unwrap_or(i64::MAX);
    Ok(report)
}

/// Re-encrypts the secrets of businesses' own Discord applications not on the current
/// key, each written back only if it did not change since it was read.
async fn rotate_applications(
    pool: &PgPool,
    cipher: &TokenCipher,
    report: &mut RotationReport,
) -> Result<(), sqlx::Error> {
    use crate::discord::bots::{keys_of, seal};
    use crate::store::applications;
    for row in applications::not_on_key(pool, cipher.key_id()).await? {
        let Ok(keys) = keys_of(&row, cipher) else {
            tracing::warn!(business_id = %row.business_id, key_id = %row.key_id, "no configured key decrypts this business's Discord application");
            report.applications_unreadable += 1;
            continue;
        };
        let mut conn = pool.acquire().await?;
        let resealed = applications::reseal(
            &mut conn,
            &row,
            &seal(
                cipher,
                &row.business_id,
                &keys.client_secret,
                "client_secret_enc",
            ),
            &seal(cipher, &row.business_id, &keys.bot_token, "bot_token_enc"),
            cipher.key_id(),
        )
        .await?;
        if resealed {
            report.applications_reencrypted += 1;
        } else {
            report.changed_meanwhile += 1;
        }
    }
    Ok(())
}
