//! API keys: their text form, parsing, and hashing. A key is `gg_<id>_<secret>` where
//! `<id>` names its row (`key_<id>`) and `<secret>` is 40 random alphanumerics (about
//! 238 bits). Only SHA-256 of the secret is stored; the text is shown once, at creation.

use rand::Rng;
use rand::distr::Alphanumeric;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "gg_";
const ID_LEN: usize = 20;
const SECRET_LEN: usize = 40;

/// A key as presented by a client, split into its row id and its secret. `Debug` is
/// redacted so a key never reaches a log.
pub struct PresentedKey {
    pub id: String,
    secret: SecretString,
}

impl std::fmt::Debug for PresentedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresentedKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn random(n: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

impl PresentedKey {
    /// Splits `gg_<id>_<secret>`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix(PREFIX)?;
        let (id, secret) = rest.split_once('_')?;
        let alnum =
            |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_alphanumeric());
        if !alnum(id, ID_LEN) || !alnum(secret, SECRET_LEN) {
            return None;
        }
        Some(Self {
            id: format!("key_{id}"),
            secret: SecretString::from(secret.to_string()),
        })
    }

    /// Whether this key's secret hashes to `stored`, compared in constant time.
    pub fn matches(&self, stored: &[u8]) -> bool {
        hash(self.secret.expose_secret()).ct_eq(stored).into()
    }
}

/// A freshly minted key: the row id, the hash to store, and the text to show once.
pub struct NewKey {
    pub id: String,
    pub hash: Vec<u8>,
    pub text: SecretString,
}

impl NewKey {
    pub fn mint() -> Self {
        let id = random(ID_LEN);
        let secret = random(SECRET_LEN);
        Self {
            id: format!("key_{id}"),
            hash: hash(&secret),
            text: SecretString::from(format!("{PREFIX}{id}_{secret}")),
        }
    }
}

fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_keys_parse_and_match_only_their_hash() {
        let k = NewKey::mint();
        let p = PresentedKey::parse(k.text.expose_secret()).unwrap();
        assert_eq!(p.id, k.id);
        assert!(p.matches(&k.hash));
        let other = NewKey::mint();
        assert!(!p.matches(&other.hash));
        assert!(!p.matches(&[]));
        assert!(!format!("{p:?}").contains(&k.text.expose_secret()[25..]));
    }

    #[test]
    fn refuses_other_shapes() {
        for bad in [
            "",
            "gg_",
            "gg_abc_def",
            "Bearer x",
            "gg_aaaaaaaaaaaaaaaaaaaa_short",
        ] {
            assert!(PresentedKey::parse(bad).is_none(), "{bad}");
        }
    }
}
