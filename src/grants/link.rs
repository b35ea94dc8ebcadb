//! The customer's OAuth link of a grant: Discord's authorize URL with scopes
//! `identify guilds.join`, our callback as `redirect_uri`, and a signed `state` that
//! names the grant and its link nonce and expires with `oauth_expires_at`.
//!
//! The URL is derived, not stored: the same grant, nonce and expiry always give the same
//! URL, so the API and the webhooks show the same link. Renewing a link (after it expired,
//! or after it was used) means a new nonce and expiry on the grant row.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::Settings;
use crate::crypto::{StateError, StateSigner};
use crate::discord::bots::Directory;
use crate::domain::{Grant, GrantStatus};
use crate::store::grants;
use sqlx::PgConnection;

/// `purpose` of grant OAuth states, so no other signed state is accepted in their place.
pub const PURPOSE: &str = "grant-oauth";

/// `purpose` of access-page links.
pub const ACCESS_PURPOSE: &str = "customer-access";

/// What an access-page link carries: one customer of one business.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessToken {
    /// Business id.
    pub b: String,
    /// The platform's customer id.
    pub c: String,
}

/// `purpose` of the OAuth `state` of "use another Discord account".
pub const SWITCH_PURPOSE: &str = "customer-account-switch";
/// `purpose` of the confirmation of a switch.
pub const CONFIRM_PURPOSE: &str = "customer-account-switch-confirm";
/// How long a switch may take: from the access page to Discord and back, and from the
/// confirmation page to the confirm.
pub const SWITCH_TTL_MINUTES: i64 = 15;

/// What the `state` of "use another Discord account" carries: the customer, and until
/// when the access link they came from works.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switching {
    pub b: String,
    pub c: String,
    /// The access link's expiry (Unix seconds): the links back to the access page end
    /// with it, so going through a switch never makes a link last longer. Absent from
    /// the states of releases before it (a quarter of an hour after an upgrade, none is
    /// left): their way back gets a link of [`LinkBuilder::access_ttl`].
    #[serde(default)]
    pub x: Option<i64>,
}

/// What a switch's confirmation carries: the customer and the pending switch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchConfirm {
    pub b: String,
    pub c: String,
    /// The pending switch's id.
    pub p: String,
    /// The access link's expiry, as in [`Switching`].
    #[serde(default)]
    pub x: Option<i64>,
}

/// What a grant's `state` carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GrantState {
    /// Grant id.
    pub g: String,
    /// Link nonce: a used or renewed link no longer matches the grant's current nonce.
    pub n: String,
}

/// Builds and checks grant links.
#[derive(Clone, Debug)]
pub struct LinkBuilder {
    /// The authorize URL with its constant query pairs, ending in `state=`: only the
    /// state differs between links, and it needs no escaping (base64url and `.`).
    prefix: String,
    /// The same prefix cut where the client id goes, for businesses with their own
    /// Discord application (their client id is a snowflake: digits need no escaping).
    around_client: (String, String),
    /// Which business has its own application.
    directory: Directory,
    redirect_uri: String,
    signer: StateSigner,
    pub ttl: chrono::Duration,
    /// `http.public_url`, without a trailing `/`.
    public_url: String,
    /// How long an access-page link works.
    pub access_ttl: chrono::Duration,
}

impl LinkBuilder {
    pub fn from_settings(s: &Settings) -> Self {
        let redirect_uri = s.oauth_redirect_uri();
        let prefix_for = |client_id: &str| -> String {
            let mut url = url::Url::parse(&s.discord.authorize_url).expect("validated on load");
            url.query_pairs_mut()
                .append_pair("client_id", client_id)
                .append_pair("response_type", "code")
                .append_pair("scope", "identify guilds.join")
                .append_pair("redirect_uri", &redirect_uri)
                .append_pair("state", "");
            url.into()
        };
        let prefix = prefix_for(&s.discord.client_id);
        // Settings reject an authorize URL with a fragment, which would follow the query.
        assert!(prefix.ends_with("&state="), "validated on load");
        const MARK: &str = "GUILDGATECLIENTID";
        let marked = prefix_for(MARK);
        let (head, tail) = marked.split_once(MARK).expect("the mark is in the query");
        Self {
            prefix,
            around_client: (head.to_string(), tail.to_string()),
            directory: Directory::default(),
            redirect_uri,
            signer: StateSigner::new(s.secrets.state_signing_key.clone()),
            ttl: chrono::Duration::from_std(s.discord.oauth_link_ttl)
                .unwrap_or(chrono::Duration::days(7)),
            public_url: s.http.public_url.trim_end_matches('/').to_string(),
            access_ttl: chrono::Duration::from_std(s.email.access_link_ttl)
                .unwrap_or(chrono::Duration::days(30)),
        }
    }

    /// The same builder, giving the links of a business with its own Discord application
    /// that application's client id.
    pub fn with_directory(mut self, directory: Directory) -> Self {
        self.directory = directory;
        self
    }

    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// The `oauth_url` of a grant of `business_id`: Discord's authorize URL for the
    /// business's own application if it has one, else for the shared one.
    pub fn url(
        &self,
        business_id: &str,
        grant_id: &str,
        nonce: &str,
        expires_at: DateTime<Utc>,
    ) -> String {
        let state = self.signer.sign(
            PURPOSE,
            GrantState {
                g: grant_id.to_string(),
                n: nonce.to_string(),
            },
            expires_at.timestamp(),
        );
        debug_assert!(
            state
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "a state is form-urlencoded as itself"
        );
        let prefix = self.prefix_of(business_id);
        let mut url = String::with_capacity(prefix.len() + state.len());
        url.push_str(&prefix);
        url.push_str(&state);
        url
    }

    /// The authorize URL up to its `state=` for `business_id`'s application.
    fn prefix_of(&self, business_id: &str) -> std::borrow::Cow<'_, str> {
        match self.directory.client_id_of(business_id) {
            None => std::borrow::Cow::Borrowed(&self.prefix),
            Some(client_id) => {
                let (head, tail) = &self.around_client;
                let encoded: String =
                    url::form_urlencoded::byte_serialize(client_id.as_bytes()).collect();
                std::borrow::Cow::Owned(format!("{head}{encoded}{tail}"))
            }
        }
    }

    /// Checks a `state` from the callback.
    pub fn verify(&self, state: &str, now: DateTime<Utc>) -> Result<GrantState, StateError> {
        self.signer.verify(PURPOSE, state, now.timestamp())
    }

    /// The customer's access page: signed for one customer of one business, working
    /// until `expires_at`.
    pub fn access_url(
        &self,
        business_id: &str,
        customer_id: &str,
        expires_at: DateTime<Utc>,
    ) -> String {
        let token = self.access_token(business_id, customer_id, expires_at);
        format!("{}/access?t={token}", self.public_url)
    }

    /// The signed token of an access link (base64url and `.`: needs no escaping).
    pub fn access_token(
        &self,
        business_id: &str,
        customer_id: &str,
        expires_at: DateTime<Utc>,
    ) -> String {
        self.signer.sign(
            ACCESS_PURPOSE,
            AccessToken {
                b: business_id.to_string(),
                c: customer_id.to_string(),
            },
            expires_at.timestamp(),
        )
    }

    /// Checks an access token.
    pub fn verify_access(
        &self,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<AccessToken, StateError> {
        self.signer.verify(ACCESS_PURPOSE, token, now.timestamp())
    }

    /// Checks an access token; with when it expires.
    pub fn verify_access_until(
        &self,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<(AccessToken, i64), StateError> {
        self.signer
            .verify_until(ACCESS_PURPOSE, token, now.timestamp())
    }

    /// Discord's authorize URL for a customer choosing another account: the `state`
    /// names the customer (not a grant) and lasts [`SWITCH_TTL_MINUTES`]; `prompt=consent`
    /// lets them pick the account.
    pub fn switch_url(&self, who: &Switching, now: DateTime<Utc>) -> String {
        let state = self.signer.sign(
            SWITCH_PURPOSE,
            who,
            (now + chrono::Duration::minutes(SWITCH_TTL_MINUTES)).timestamp(),
        );
        format!("{}{state}&prompt=consent", self.prefix_of(&who.b))
    }

    /// Checks the `state` of a switch coming back from Discord.
    pub fn verify_switch(&self, state: &str, now: DateTime<Utc>) -> Result<Switching, StateError> {
        self.signer.verify(SWITCH_PURPOSE, state, now.timestamp())
    }

    /// The access page's address at the end of a switch: with a token that ends when
    /// the one the customer came with does (`until`, [`Switching::x`]).
    pub fn access_url_back(
        &self,
        business_id: &str,
        customer_id: &str,
        until: Option<i64>,
        now: DateTime<Utc>,
    ) -> String {
        let until = match until {
            Some(x) => DateTime::from_timestamp(x, 0).unwrap_or(now),
            None => now + self.access_ttl,
        };
        self.access_url(business_id, customer_id, until)
    }

    /// The signed confirmation of a pending switch.
    pub fn sign_confirm(&self, c: &SwitchConfirm, now: DateTime<Utc>) -> String {
        self.signer.sign(
            CONFIRM_PURPOSE,
            c.clone(),
            (now + chrono::Duration::minutes(SWITCH_TTL_MINUTES)).timestamp(),
        )
    }

    pub fn verify_confirm(
        &self,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<SwitchConfirm, StateError> {
        self.signer.verify(CONFIRM_PURPOSE, token, now.timestamp())
    }

    /// A fresh link nonce.
    pub fn new_nonce() -> String {
        crate::domain::ids::mint("n")
    }

    /// A fresh link made `now`: a new nonce, and when it expires.
    pub fn fresh(&self, now: DateTime<Utc>) -> (String, DateTime<Utc>) {
        (Self::new_nonce(), now + self.ttl)
    }
}

/// For a `Pending` grant whose link expired: a new nonce and expiry, so its
/// `oauth_url` works again. Any other grant is returned as it is.
pub async fn renew_link(
    conn: &mut PgConnection,
    links: &LinkBuilder,
    grant: &Grant,
    now: DateTime<Utc>,
) -> Result<Grant, sqlx::Error> {
    if grant.status != GrantStatus::Pending || grant.oauth_expires_at > now {
        return Ok(grant.clone());
    }
    let (nonce, expires_at) = links.fresh(now);
    match grants::renew_nonce_if_expired(conn, &grant.id, &nonce, expires_at, now).await? {
        Some(g) => Ok(g),
        // Renewed by a concurrent reader: use theirs.
        None => Ok(grants::get(conn, &grant.id)
            .await?
            .unwrap_or_else(|| grant.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_of_the_release_before_verifies_and_gets_a_full_link_back() {
        let s = Settings::load_with_env(None, Some(Default::default())).unwrap();
        let b = LinkBuilder::from_settings(&s);
        let now = Utc::now();
        // The release before signed the customer alone, in the state and in the
        // confirmation.
        let customer = AccessToken {
            b: "bus_1".into(),
            c: "cus_1".into(),
        };
        let soon = (now + chrono::Duration::minutes(SWITCH_TTL_MINUTES)).timestamp();
        let state = b.signer.sign(SWITCH_PURPOSE, &customer, soon);
        let who = b.verify_switch(&state, now).unwrap();
        assert_eq!(
            (who.b.as_str(), who.c.as_str(), who.x),
            ("bus_1", "cus_1", None)
        );
        let confirm = b.signer.sign(
            CONFIRM_PURPOSE,
            serde_json::json!({"b": "bus_1", "c": "cus_1", "p": "asw_1"}),
            soon,
        );
        assert_eq!(b.verify_confirm(&confirm, now).unwrap().x, None);
        // Its way back is a link of the full lifetime, as that release gave.
        let back = b.access_url_back(&who.b, &who.c, who.x, now);
        let token = back.split_once("?t=").unwrap().1;
        let (_, until) = b.verify_access_until(token, now).unwrap();
        assert_eq!(until, (now + b.access_ttl).timestamp());
        // This release's: the link the customer came with.
        let back = b.access_url_back("bus_1", "cus_1", Some(soon), now);
        let token = back.split_once("?t=").unwrap().1;
        assert_eq!(b.verify_access_until(token, now).unwrap().1, soon);
    }

    #[test]
    fn url_has_the_platform_shape_and_its_state_verifies() {
        let s = Settings::load_with_env(None, Some(Default::default())).unwrap();
        let b = LinkBuilder::from_settings(&s);
        let exp: DateTime<Utc> = "2030-01-01T00:00:00Z".parse().unwrap();
        let u = b.url("bus_1", "grant_X", "n_1", exp);
        assert!(u.starts_with("https://discord.com/oauth2/authorize?client_id=1100000000000000001&response_type=code&scope=identify+guilds.join&redirect_uri=http%3A%2F%2F127.0.0.1%3A8080%2Foauth%2Fdiscord%2Fcallback&state="), "{u}");
        assert_eq!(u, b.url("bus_1", "grant_X", "n_1", exp), "deterministic");
        let state = url::Url::parse(&u)
            .unwrap()
            .query_pairs()
            .find(|(k, _)| k == "state")
            .unwrap()
            .1
            .into_owned();
        let now: DateTime<Utc> = "2029-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            b.verify(&state, now).unwrap(),
            GrantState {
                g: "grant_X".into(),
                n: "n_1".into()
            }
        );
        assert_eq!(b.verify(&state, exp), Err(StateError::Expired));
    }

    #[test]
    fn a_business_with_its_own_application_gets_links_naming_it() {
        let s = Settings::load_with_env(None, Some(Default::default())).unwrap();
        let directory = Directory::default();
        let b = LinkBuilder::from_settings(&s).with_directory(directory.clone());
        let exp: DateTime<Utc> = "2030-01-01T00:00:00Z".parse().unwrap();
        directory.set("bus_own", Some(("1200000000000000077".into(), Utc::now())));
        let own = b.url("bus_own", "grant_X", "n_1", exp);
        let shared = b.url("bus_1", "grant_X", "n_1", exp);
        assert_eq!(
            own,
            shared.replace(
                "client_id=1100000000000000001",
                "client_id=1200000000000000077"
            ),
            "only the client id differs"
        );
        directory.set("bus_own", None);
        assert_eq!(b.url("bus_own", "grant_X", "n_1", exp), shared);
    }

    #[test]
    fn access_links_verify_only_as_access_links() {
        let s = Settings::load_with_env(None, Some(Default::default())).unwrap();
        let b = LinkBuilder::from_settings(&s);
        let exp: DateTime<Utc> = "2030-01-01T00:00:00Z".parse().unwrap();
        let now: DateTime<Utc> = "2029-01-01T00:00:00Z".parse().unwrap();
        let u = b.access_url("bus_1", "cus_1", exp);
        assert!(u.starts_with("http://127.0.0.1:8080/access?t="), "{u}");
        let t = u.split_once("?t=").unwrap().1;
        assert_eq!(
            b.verify_access(t, now).unwrap(),
            AccessToken {
                b: "bus_1".into(),
                c: "cus_1".into()
            }
        );
        assert_eq!(b.verify_access(t, exp), Err(StateError::Expired));
        // A grant's OAuth state is no access token, nor the other way round.
        let oauth = b.url("bus_1", "grant_X", "n_1", exp);
        let state = oauth.split_once("state=").unwrap().1;
        assert_eq!(b.verify_access(state, now), Err(StateError::Tampered));
        assert_eq!(b.verify(t, now), Err(StateError::Tampered));
    }

    #[test]
    fn an_authorize_url_with_a_query_keeps_it_and_the_state_still_verifies() {
        let env = [(
            "GUILDGATE_DISCORD__AUTHORIZE_URL".to_string(),
            "https://discord.example/oauth2/authorize?prompt=none".to_string(),
        )];
        let s = Settings::load_with_env(None, Some(env.into_iter().collect())).unwrap();
        let b = LinkBuilder::from_settings(&s);
        let exp: DateTime<Utc> = "2030-01-01T00:00:00Z".parse().unwrap();
        let u = url::Url::parse(&b.url("bus_1", "grant_Y", "n_2", exp)).unwrap();
        assert_eq!(u.host_str(), Some("discord.example"));
        let pairs: Vec<(String, String)> = u.query_pairs().into_owned().collect();
        let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "prompt",
                "client_id",
                "response_type",
                "scope",
                "redirect_uri",
                "state"
            ]
        );
        assert_eq!(pairs[3].1, "identify guilds.join");
        assert_eq!(pairs[4].1, b.redirect_uri());
        let now: DateTime<Utc> = "2029-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(b.verify(&pairs[5].1, now).unwrap().g, "grant_Y");
    }
}
