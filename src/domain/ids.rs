//! Identifiers. Ids that arrive from outside (events, URLs) are checked once, at the
//! edge, and carried as newtypes with private fields; ids guildgate mints itself
//! (`ent_…`, `grant_…`) come from [`mint`].

use std::fmt;

use rand::Rng;
use rand::distr::Alphanumeric;

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{0} is empty")]
    Empty(&'static str),
    #[error("{0} is longer than 128 characters")]
    TooLong(&'static str),
    #[error("{0} may contain only letters, digits, '_', '-', '.' and ':'")]
    BadCharacter(&'static str),
}

fn check(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty(kind));
    }
    if s.len() > 128 {
        return Err(IdError::TooLong(kind));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
    {
        return Err(IdError::BadCharacter(kind));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $label:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check($label, &s)?;
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(/// A merchant on the payment platform (`bus_…`).
    BusinessId, "business_id");
id_type!(/// A customer of a merchant (`cus_…`).
    CustomerId, "customer_id");
id_type!(/// A product (`pdt_…`).
    ProductId, "product_id");
id_type!(/// A payment (`pay_…`).
    PaymentId, "payment_id");
id_type!(/// A subscription (`sub_…`).
    SubscriptionId, "subscription_id");
id_type!(/// A brand of a merchant (`brd_…`).
    BrandId, "brand_id");
id_type!(/// An entitlement guildgate stores (`ent_…`).
    EntitlementId, "entitlement_id");
id_type!(/// A grant guildgate stores (`grant_…`).
    GrantId, "grant_id");
id_type!(/// A payment event's id: the AMQP `message_id`, or `sha256:<hex>` of the body.
    EventId, "event_id");

/// A new random id: `prefix` + `_` + 20 alphanumerics (about 119 bits).
pub fn mint(prefix: &str) -> String {
    let tail: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(20)
        .map(char::from)
        .collect();
    format!("{prefix}_{tail}")
}

impl GrantId {
    pub fn mint() -> Self {
        Self(mint("grant"))
    }
}

impl EntitlementId {
    pub fn mint() -> Self {
        Self(mint("ent"))
    }
}

/// A Discord id (snowflake): digits only, parsed once at the edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Snowflake(u64);

impl Snowflake {
    pub fn new(id: u64) -> Self {
        Self(id)
    }

    pub fn parse(s: &str) -> Option<Self> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok().map(Self)
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Snowflake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Snowflake {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Discord sends snowflakes as strings; accept numbers too.
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            N(u64),
        }
        match Raw::deserialize(d)? {
            Raw::S(s) => {
                Snowflake::parse(&s).ok_or_else(|| serde::de::Error::custom("bad snowflake"))
            }
            Raw::N(n) => Ok(Snowflake(n)),
        }
    }
}

impl serde::Serialize for Snowflake {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_platform_ids() {
        for s in ["pay_2IjeQm4hqU", "sub_0NXzr8fEJ4", "a:b.c-d_e"] {
            assert!(PaymentId::parse(s).is_ok(), "{s}");
        }
    }

    #[test]
    fn refuses_hostile_ids() {
        assert_eq!(PaymentId::parse(""), Err(IdError::Empty("payment_id")));
        assert_eq!(
            PaymentId::parse("x".repeat(129)),
            Err(IdError::TooLong("payment_id"))
        );
        for s in ["'; DROP TABLE grants;--", "<script>", "a b", "é"] {
            assert_eq!(
                PaymentId::parse(s),
                Err(IdError::BadCharacter("payment_id")),
                "{s}"
            );
        }
    }

    #[test]
    fn minted_ids_are_valid_and_distinct() {
        let a = GrantId::mint();
        let b = GrantId::mint();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("grant_"));
        assert!(GrantId::parse(a.as_str()).is_ok());
    }
}
