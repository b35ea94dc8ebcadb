//! Small cryptographic pieces guildgate owns: signed, expiring `state` values for OAuth
//! redirects, and encryption of customers' Discord tokens at rest.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit};
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
        Ok(env.body)
    }
}

/// Encrypts customers' OAuth tokens at rest with XChaCha20-Poly1305 (random 192-bit
/// nonce per value, stored in front of the ciphertext).
#[derive(Clone)]
pub struct TokenCipher {
    cipher: XChaCha20Poly1305,
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
    /// From the configured key: base64 of exactly 32 bytes.
    pub fn from_base64(key: &SecretString) -> Result<Self, String> {
        let bytes = STANDARD
            .decode(key.expose_secret().trim())
            .map_err(|_| "must be base64".to_string())?;
        if bytes.len() != 32 {
            return Err(format!("must decode to 32 bytes, not {}", bytes.len()));
        }
        Ok(Self {
            cipher: XChaCha20Poly1305::new_from_slice(&bytes).expect("32-byte key"),
        })
    }

    pub fn encrypt(&self, plaintext: &str) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), plaintext.as_bytes())
            .expect("encryption of a short token cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        out
    }

    pub fn decrypt(&self, stored: &[u8]) -> Result<SecretString, DecryptError> {
        if stored.len() < 24 {
            return Err(DecryptError);
        }
        let (nonce, ct) = stored.split_at(24);
        let pt = self
            .cipher
            .decrypt(XNonce::from_slice(nonce), ct)
            .map_err(|_| DecryptError)?;
        String::from_utf8(pt)
            .map(SecretString::from)
            .map_err(|_| DecryptError)
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

    #[test]
    fn token_cipher_round_trips_and_detects_corruption() {
        let c = TokenCipher::from_base64(&SecretString::from(STANDARD.encode([7u8; 32]))).unwrap();
        let a = c.encrypt("access-token");
        let b = c.encrypt("access-token");
        assert_ne!(a, b, "nonces differ");
        assert_eq!(c.decrypt(&a).unwrap().expose_secret(), "access-token");
        let mut bad = a.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(c.decrypt(&bad).is_err());
        assert!(TokenCipher::from_base64(&SecretString::from("c2hvcnQ=")).is_err());
    }
}
