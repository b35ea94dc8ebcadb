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

/// `purpose` of grant OAuth states, so no other signed state is accepted in their place.
pub const PURPOSE: &str = "grant-oauth";

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
    redirect_uri: String,
    signer: StateSigner,
    pub ttl: chrono::Duration,
}

impl LinkBuilder {
    pub fn from_settings(s: &Settings) -> Self {
        let redirect_uri = s.oauth_redirect_uri();
        let mut url = url::Url::parse(&s.discord.authorize_url).expect("validated on load");
        url.query_pairs_mut()
            .append_pair("client_id", &s.discord.client_id)
            .append_pair("response_type", "code")
            .append_pair("scope", "identify guilds.join")
            .append_pair("redirect_uri", &redirect_uri)
            .append_pair("state", "");
        let prefix: String = url.into();
        // Settings reject an authorize URL with a fragment, which would follow the query.
        assert!(prefix.ends_with("&state="), "validated on load");
        Self {
            prefix,
            redirect_uri,
            signer: StateSigner::new(s.secrets.state_signing_key.clone()),
            ttl: chrono::Duration::from_std(s.discord.oauth_link_ttl)
                .unwrap_or(chrono::Duration::days(7)),
        }
    }

    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// The `oauth_url` of a grant.
    pub fn url(&self, grant_id: &str, nonce: &str, expires_at: DateTime<Utc>) -> String {
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
        let mut url = String::with_capacity(self.prefix.len() + state.len());
        url.push_str(&self.prefix);
        url.push_str(&state);
        url
    }

    /// Checks a `state` from the callback.
    pub fn verify(&self, state: &str, now: DateTime<Utc>) -> Result<GrantState, StateError> {
        self.signer.verify(PURPOSE, state, now.timestamp())
    }

    /// A fresh link nonce.
    pub fn new_nonce() -> String {
        crate::ids::mint("n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_has_the_platform_shape_and_its_state_verifies() {
        let s = Settings::load_with_env(None, Some(Default::default())).unwrap();
        let b = LinkBuilder::from_settings(&s);
        let exp: DateTime<Utc> = "2030-01-01T00:00:00Z".parse().unwrap();
        let u = b.url("grant_X", "n_1", exp);
        assert!(u.starts_with("https://discord.com/oauth2/authorize?client_id=1100000000000000001&response_type=code&scope=identify+guilds.join&redirect_uri=http%3A%2F%2F127.0.0.1%3A8080%2Foauth%2Fdiscord%2Fcallback&state="), "{u}");
        assert_eq!(u, b.url("grant_X", "n_1", exp), "deterministic");
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
    fn an_authorize_url_with_a_query_keeps_it_and_the_state_still_verifies() {
        let env = [(
            "GUILDGATE_DISCORD__AUTHORIZE_URL".to_string(),
            "https://discord.example/oauth2/authorize?prompt=none".to_string(),
        )];
        let s = Settings::load_with_env(None, Some(env.into_iter().collect())).unwrap();
        let b = LinkBuilder::from_settings(&s);
        let exp: DateTime<Utc> = "2030-01-01T00:00:00Z".parse().unwrap();
        let u = url::Url::parse(&b.url("grant_Y", "n_2", exp)).unwrap();
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
