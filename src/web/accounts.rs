//! Linking a customer's Discord account to them, which the OAuth callback and the access
//! page's account switch both do, and revoking the tokens of the account they left.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::AppState;
use crate::discord::client::{TokenSet, User};
use crate::discord::{Bot, DiscordError};
use crate::outbox::queue_syncs;
use crate::store::links::LinkRow;
use crate::store::{grants, links};
use crate::sync::worker::revoke_tokens;

/// What a Discord error while authorizing a customer's account means for the page they
/// see, on the OAuth callback and on an account switch alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthorizeFailure {
    /// Discord refused the code (spent or too old): authorizing again can work.
    Refused,
    /// Too many requests wait for Discord in this process; nothing was sent.
    Busy,
    /// Discord is out of reach, or refused guildgate's own request (an application's
    /// secret reset, say): authorizing again would fail the same way.
    Unavailable,
}

/// Classifies `e`, met `during` a flow ("OAuth callback", "account switch"), and logs
/// it: a refusal that is not the customer's doing as an error, for operators.
pub fn authorize_failure(e: &DiscordError, during: &str) -> AuthorizeFailure {
    match e {
        DiscordError::BadUserToken => {
            tracing::warn!(error = %e, during, "Discord refused the customer's authorization");
            AuthorizeFailure::Refused
        }
        // The client logged it already, with what it waited.
        DiscordError::Busy { .. } => AuthorizeFailure::Busy,
        DiscordError::Unexpected { .. } => {
            tracing::error!(error = %e, during, "Discord refused guildgate's request");
            AuthorizeFailure::Unavailable
        }
        _ => {
            tracing::warn!(error = %e, during, "Discord did not answer");
            AuthorizeFailure::Unavailable
        }
    }
}

/// The link row of the account a customer of `business` just authorized with `bot`:
/// Discord's tokens sealed for the customer's row, expiring with the access token,
/// issued by `bot`'s application.
pub fn authorized_row(
    st: &AppState,
    bot: &Bot,
    (business, customer): (&str, &str),
    user: &User,
    tokens: &TokenSet,
    now: DateTime<Utc>,
) -> LinkRow {
    LinkRow::new(
        business,
        customer,
        user.id.to_string(),
        links::SealedTokens::seal(
            &st.cipher,
            business,
            customer,
            &tokens.access_token,
            tokens.refresh_token.as_ref(),
        ),
        now + chrono::Duration::from_std(tokens.expires_in).unwrap_or_default(),
        tokens.scope.clone(),
    )
    .issued_by(bot.issuer())
}

/// What linking an account changed.
pub struct Linked {
    /// The account the customer had linked before, when it was another one: its tokens
    /// are to be revoked once the transaction commits ([`revoke_left_tokens`]).
    pub previous: Option<LinkRow>,
    /// Another customer of the business has this account linked too.
    pub shared: bool,
}

/// Links `row`'s account (with its `names`: username, display name) to its customer, in
/// the caller's transaction, and queues a sync of every live grant of the customer: a
/// different account moves their access (each grant records what it applied, and its
/// sync removes that from the old account). Every grant link the customer was given
/// before stops working (a new nonce): links in older emails cannot move the access
/// later, only the grants' current links and the access page can (a grant that another
/// transaction holds at that moment keeps its link). The history of
/// `history_grant` records `linked` or `switched`; without one, every live grant's
/// does.
///
/// Takes the customer's lock ([`links::lock_customer`]) first, unless the caller took it
/// before locking any of their grants, and waits for no other grant of theirs.
pub async fn link_account(
    tx: &mut PgConnection,
    row: &LinkRow,
    names: (&str, Option<&str>),
    history_grant: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Linked, sqlx::Error> {
    let (business, customer) = (row.business_id.as_str(), row.customer_id.as_str());
    links::lock_customer(tx, business, customer).await?;
    let spent = grants::spend_links_of_customer(
        tx,
        business,
        customer,
        &crate::grants::link::LinkBuilder::new_nonce(),
        now,
    )
    .await?;
    let previous = links::link_of(tx, business, customer)
        .await?
        .filter(|l| l.discord_user_id != row.discord_user_id);
    links::upsert_link(tx, row, Some(names), now).await?;
    // People buy twice under two emails: the link is made, and the page says so.
    let shared = links::linked_elsewhere(tx, business, customer, &row.discord_user_id).await?;
    let live = grants::live_grant_ids(tx, business, customer).await?;
    let kept = u64::try_from(live.len())
        .unwrap_or(u64::MAX)
        .saturating_sub(spent);
    if kept > 0 {
        tracing::info!(
            customer_id = customer,
            kept,
            "grants being changed at that moment keep their links"
        );
    }
    queue_syncs(tx, &live).await?;
    let (event, mut detail) = match &previous {
        Some(old) => (
            "switched",
            serde_json::json!({ "from_discord_user_id": old.discord_user_id }),
        ),
        None => ("linked", serde_json::json!({})),
    };
    detail["discord_user_id"] = row.discord_user_id.clone().into();
    detail["also_linked_to_another_customer"] = shared.into();
    let recorded: Vec<&str> = match history_grant {
        Some(g) => vec![g],
        None => live.iter().map(String::as_str).collect(),
    };
    for g in recorded {
        crate::store::history::record(tx, g, now, event, detail.clone()).await?;
    }
    Ok(Linked { previous, shared })
}

/// Revokes at Discord the tokens of the account a customer left. Best effort: they are
/// no longer stored anywhere, so a revoke that fails is logged and dropped rather than
/// holding up the customer's page.
pub async fn revoke_left_tokens(st: &AppState, old: LinkRow, customer_id: &str) {
    let access = old.access_token(&st.cipher).ok();
    let refresh = old.refresh_token(&st.cipher).and_then(Result::ok);
    // Only the application that issued them can revoke them.
    let bot = match st
        .bots
        .of_application(&old.business_id, old.client_id.as_deref())
        .await
    {
        Ok(Some(bot)) => bot,
        Ok(None) => {
            tracing::info!(
                customer_id,
                "the tokens of the Discord account the customer left belong to an application the business no longer uses; dropping them"
            );
            return;
        }
        Err(e) => {
            tracing::warn!(customer_id, error = %e, "cannot revoke the tokens of the Discord account the customer left; dropping them");
            return;
        }
    };
    match revoke_tokens(&bot.side, access.as_ref(), refresh.as_ref()).await {
        Ok(()) => {
            tracing::info!(
                customer_id,
                "revoked the tokens of the Discord account the customer left"
            )
        }
        Err(e) => {
            tracing::warn!(customer_id, error = %e, "cannot revoke the tokens of the Discord account the customer left; dropping them")
        }
    }
}
