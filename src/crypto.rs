//! Small cryptographic pieces guildgate owns: signed, expiring `state` values for OAuth
//! redirects, and encryption of customers' Discord tokens at rest.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Serialize, de::DeserializeOwned};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a signed `state` was refused. The variants are shown to customers as different
/// pages, so they are kept apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("the link is malformed or was altered")]
    Tampered,
    #[error("the link has expired")]
    Expired,
}

/// Signs and verifies `state` values: `base64url(json).base64url(hmac)`.
///
/// Each use has its own `purpose`, mixed into the MAC, so a state minted for one flow
/// (a grant's customer OAuth) can never be accepted by another (the bot install).
#[derive(Clone)]
pub struct StateSigner {
    /// The MAC keyed once; each use clones it (the key's hashing is not redone per state).
    keyed: HmacSha256,
}

impl std::fmt::Debug for StateSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateSigner([REDACTED])")
    }
}

#[derive(Serialize, serde::Deserialize)]
struct Envelope<T> {
    #[serde(flatten)]
    body: T,
    /// Expiry, Unix seconds.
    e: i64,
}

impl StateSigner {
    pub fn new(key: SecretString) -> Self {
        let keyed = <HmacSha256 as Mac>::new_from_slice(key.expose_secret().as_bytes())
            .expect("HMAC takes any key length");
        Self { keyed }
    }

    fn mac(&self, purpose: &str, payload: &str) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(payload.as_bytes());
        mac
    }

    /// A state carrying `body`, valid until `expires_at_unix`.
    pub fn sign<T: Serialize>(&self, purpose: &str, body: T, expires_at_unix: i64) -> String {
        let json = serde_json::to_vec(&Envelope {
            body,
            e: expires_at_unix,
        })
        .expect("state bodies serialize");
        let payload = URL_SAFE_NO_PAD.encode(json);
        let tag = self.mac(purpose, &payload).finalize().into_bytes();
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// The body of a state this signer made for `purpose`, if unaltered and unexpired
    /// at `now_unix`. The MAC is checked (in constant time) before anything is parsed.
    pub fn verify<T: DeserializeOwned>(
        &self,
        purpose: &str,
        state: &str,
        now_unix: i64,
    ) -> Result<T, StateError> {
        self.verify_until(purpose, state, now_unix)
            .map(|(body, _)| body)
    }

    /// [`Self::verify`], with the state's expiry (Unix seconds).
    pub fn verify_until<T: DeserializeOwned>(
        &self,
        purpose: &str,
        state: &str,
        now_unix: i64,
    ) -> Result<(T, i64), StateError> {
        let (payload, tag) = state.split_once('.').ok_or(StateError::Tampered)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| StateError::Tampered)?;
        self.mac(purpose, payload)
            .verify_slice(&tag)
            .map_err(|_| StateError::Tampered)?;
        let json = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| StateError::Tampered)?;
        let env: Envelope<T> = serde_json::from_slice(&json).map_err(|_| StateError::Tampered)?;
        if now_unix >= env.e {
            return Err(StateError::Expired);
        }
        Ok((env.body, env.e))
    }
}

/// One token encryption key and its id.
#[derive(Clone)]
struct TokenKey {
    id: String,
    cipher: XChaCha20Poly1305,
}

impl TokenKey {
    fn from_base64(key: &str) -> Result<Self, String> {
        let bytes = STANDARD
            .decode(key.trim())
            .map_err(|_| "must be base64".to_string())?;
        if bytes.len() != 32 {
            return Err(format!("must decode to 32 bytes, not {}", bytes.len()));
        }
        // The id names the key without revealing it: a prefix of a domain-separated
        // hash of a 256-bit random key.
        let mut h = <Sha256 as sha2::Digest>::new();
        sha2::Digest::update(&mut h, b"guildgate token key id\0");
        sha2::Digest::update(&mut h, &bytes);
        let digest = sha2::Digest::finalize(h);
        let id = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            id,
            cipher: XChaCha20Poly1305::new_from_slice(&bytes).expect("32-byte key"),
        })
    }

    fn open(&self, stored: &[u8], aad: &[u8]) -> Result<SecretString, DecryptError> {
        if stored.len() < 24 {
            return Err(DecryptError);
        }
        let (nonce, ct) = stored.split_at(24);
        let pt = self
            .cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| DecryptError)?;
        String::from_utf8(pt)
            .map(SecretString::from)
            .map_err(|_| DecryptError)
    }
}

/// Encrypts customers' OAuth tokens at rest with XChaCha20-Poly1305 (random 192-bit
/// nonce per value, stored in front of the ciphertext).
///
/// Each ciphertext is bound to where it is stored by associated data (the caller's
/// `aad`, naming the row and column), so it cannot be moved to another row, and is
/// stored with the id of the key that sealed it ([`TokenCipher::key_id`]). New values
/// are sealed with the current key; values sealed with a previous key stay readable
/// while that key is configured, so the key can be changed and the stored values
/// re-encrypted afterwards.
#[derive(Clone)]
pub struct TokenCipher {
    current: TokenKey,
    previous: Vec<TokenKey>,
}

impl std::fmt::Debug for TokenCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCipher([REDACTED])")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("stored token cannot be decrypted (wrong key or corrupted)")]
pub struct DecryptError;

impl TokenCipher {
    /// From the configured key alone: base64 of exactly 32 bytes.
    pub fn from_base64(key: &SecretString) -> Result<Self, String> {
        Self::with_previous(key, &SecretString::from(String::new()))
    }

    /// From the current key and the previous ones (comma-separated base64 of 32 bytes
    /// each; empty for none), which only decrypt.
    pub fn with_previous(current: &SecretString, previous: &SecretString) -> Result<Self, String> {
        let current = TokenKey::from_base64(current.expose_secret())?;
        let previous = previous
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .enumerate()
            .map(|(i, k)| TokenKey::from_base64(k).map_err(|e| format!("key {}: {e}", i + 1)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { current, previous })
    }

    /// The id of the current key, stored with every value it encrypts.
    pub fn key_id(&self) -> &str {
        &self.current.id
    }

    /// Seals `plaintext` for the place `aad` names, with the current key.
    pub fn encrypt(&self, plaintext: &str, aad: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let ct = self
            .current
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad,
                },
            )
            .expect("encryption of a short token cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a value sealed with the key `key_id` for the place `aad` names. `None`
    /// is a value stored before keys had ids, sealed without associated data: every
    /// configured key is tried.
    pub fn decrypt(
        &self,
        stored: &[u8],
        key_id: Option<&str>,
        aad: &[u8],
    ) -> Result<SecretString, DecryptError> {
        let mut keys = std::iter::once(&self.current).chain(&self.previous);
        match key_id {
            Some(id) => keys
                .find(|k| k.id == id)
                .ok_or(DecryptError)?
                .open(stored, aad),
            None => keys
                .find_map(|k| k.open(stored, b"").ok())
                .ok_or(DecryptError),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Body {
        g: String,
    }

    fn signer() -> StateSigner {
        StateSigner::new(SecretString::from("k".repeat(40)))
    }

    #[test]
    fn state_round_trips_until_expiry() {
        let s = signer().sign(
            "grant",
            Body {
                g: "grant_1".into(),
            },
            1000,
        );
        let b: Body = signer().verify("grant", &s, 999).unwrap();
        assert_eq!(b.g, "grant_1");
        assert_eq!(
            signer().verify::<Body>("grant", &s, 1000),
            Err(StateError::Expired)
        );
    }

    #[test]
    fn state_rejects_tampering_other_purpose_and_other_key() {
        let s = signer().sign(
            "grant",
            Body {
                g: "grant_1".into(),
            },
            1000,
        );
        let (payload, tag) = s.split_once('.').unwrap();
        let forged = URL_SAFE_NO_PAD.encode(br#"{"g":"grant_2","e":1000}"#);
        for bad in [
            format!("{forged}.{tag}"),
            format!("{payload}.AAAA"),
            payload.to_string(),
            String::new(),
        ] {
            assert_eq!(
                signer().verify::<Body>("grant", &bad, 0),
                Err(StateError::Tampered),
                "{bad}"
            );
        }
        assert_eq!(
            signer().verify::<Body>("install", &s, 0),
            Err(StateError::Tampered)
        );
        let other = StateSigner::new(SecretString::from("z".repeat(40)));
        assert_eq!(
            other.verify::<Body>("grant", &s, 0),
            Err(StateError::Tampered)
        );
    }

    fn key(b: u8) -> SecretString {
        SecretString::from(STANDARD.encode([b; 32]))
    }

    #[test]
    fn token_cipher_round_trips_and_detects_corruption() {
        let c = TokenCipher::from_base64(&key(7)).unwrap();
        let a = c.encrypt("access-token", b"row 1");
        let b = c.encrypt("access-token", b"row 1");
        assert_ne!(a, b, "nonces differ");
        let id = Some(c.key_id());
        assert_eq!(
            c.decrypt(&a, id, b"row 1").unwrap().expose_secret(),
            "access-token"
        );
        let mut bad = a.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(c.decrypt(&bad, id, b"row 1").is_err());
        assert!(TokenCipher::from_base64(&SecretString::from("c2hvcnQ=")).is_err());
    }

    #[test]
    fn a_token_opens_only_where_it_was_sealed_and_with_its_key() {
        let c = TokenCipher::from_base64(&key(7)).unwrap();
        let a = c.encrypt("access-token", b"row 1");
        assert!(c.decrypt(&a, Some(c.key_id()), b"row 2").is_err());
        assert!(c.decrypt(&a, Some("0000000000000000"), b"row 1").is_err());
        assert!(c.decrypt(&a, None, b"row 1").is_err(), "not a legacy value");
    }

    #[test]
    fn previous_keys_decrypt_and_only_the_current_one_encrypts() {
        let old = TokenCipher::from_base64(&key(1)).unwrap();
        let sealed = old.encrypt("t", b"row");
        let legacy = {
            // A value from before associated data: nonce + ciphertext of the bare token.
            let nonce = [9u8; 24];
            let mut v = nonce.to_vec();
            v.extend(
                old.current
                    .cipher
                    .encrypt(XNonce::from_slice(&nonce), b"t".as_slice())
                    .unwrap(),
            );
            v
        };
        let both = format!(
            " {} ,{}",
            STANDARD.encode([2u8; 32]),
            STANDARD.encode([1u8; 32])
        );
        let new = TokenCipher::with_previous(&key(3), &SecretString::from(both)).unwrap();
        assert_ne!(new.key_id(), old.key_id());
        let read = new.decrypt(&sealed, Some(old.key_id()), b"row").unwrap();
        assert_eq!(read.expose_secret(), "t");
        assert_eq!(
            new.decrypt(&legacy, None, b"row").unwrap().expose_secret(),
            "t"
        );
        let resealed = new.encrypt("t", b"row");
        assert!(old.decrypt(&resealed, Some(new.key_id()), b"row").is_err());
        assert!(TokenCipher::with_previous(&key(3), &SecretString::from("c2hvcnQ=")).is_err());
        let only_new = TokenCipher::from_base64(&key(3)).unwrap();
        assert!(
            only_new
                .decrypt(&sealed, Some(old.key_id()), b"row")
                .is_err()
        );
    }
}
