//! Which bot speaks for a business: its own Discord application, if it registered one
//! (`PUT /discord/application`), else the shared bot of the configuration.
//!
//! Every bot has its own clients, so its own budgets: Discord's global limit and its
//! buckets are per bot, and so are the rings of the budget shared by every process
//! ([`SharedLimits`] is keyed by the application's id). The invalid-request count is
//! Discord's per address, so every bot adds to the same one.
//!
//! Which business has which application is kept in memory ([`Directory`]), read again
//! from the database every few seconds and at once in the process that changes it: the
//! grant's `oauth_url` is rendered where no database is at hand. A bot's secrets are
//! read and decrypted when it is first used, and again after its row changed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use sqlx::PgPool;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

use super::client::{AppKeys, DiscordClient};
use super::ratelimit::Budget;
use super::shared::SharedLimits;
use crate::config::DiscordSettings;
use crate::crypto::{DecryptError, TokenCipher};
use crate::metrics::Metrics;
use crate::store::applications;
pub use crate::store::applications::AppRow;

/// How often every process reads again which business has which application.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// The associated data binding an application's secret to its row and column.
pub fn secret_aad(business_id: &str, column: &str) -> Vec<u8> {
    format!("discord_applications\0{column}\0{business_id}").into_bytes()
}

/// One bot: the clients of one application.
#[derive(Clone, Debug)]
pub struct Bot {
    /// The side budget's client (API handlers, OAuth callbacks, reconcile reads).
    pub side: DiscordClient,
    /// The syncer's client: its own budget, and the memory of stops.
    pub syncer: DiscordClient,
    /// A business's own application, not the shared one.
    pub own: bool,
}

impl Bot {
    fn new(
        settings: &DiscordSettings,
        keys: &AppKeys,
        pool: &PgPool,
        metrics: &Arc<Metrics>,
        own: bool,
    ) -> Self {
        let side = DiscordClient::side_of(settings, keys, metrics.clone())
            .shared(SharedLimits::new(pool.clone(), &keys.client_id));
        let syncer = side
            .with_budget(Budget::syncer(settings.side_requests_per_s))
            .with_stops();
        Self { side, syncer, own }
    }

    /// The same bot, its calls made for `business`.
    fn for_business(self, business: &str) -> Self {
        Self {
            side: self.side.for_business(business),
            syncer: self.syncer.for_business(business),
            own: self.own,
        }
    }

    /// The application's id (also its bot user's id).
    pub fn client_id(&self) -> &str {
        self.side.client_id()
    }

    /// What a link records of the application its tokens were issued to: the client id
    /// of a business's own, `None` for the shared one.
    pub fn issuer(&self) -> Option<String> {
        self.own.then(|| self.client_id().to_string())
    }
}

/// A business's own application in the directory: its client id and last change.
pub type Entry = (String, DateTime<Utc>);

/// Which business has its own application: business id to its [`Entry`].
#[derive(Clone, Debug, Default)]
pub struct Directory(Arc<RwLock<HashMap<String, Entry>>>);

impl Directory {
    /// The client id of `business`'s own application, if it has one.
    pub fn client_id_of(&self, business: &str) -> Option<String> {
        self.0
            .read()
            .expect("directory lock")
            .get(business)
            .map(|(c, _)| c.clone())
    }

    fn entry(&self, business: &str) -> Option<Entry> {
        self.0
            .read()
            .expect("directory lock")
            .get(business)
            .cloned()
    }

    fn replace(&self, all: HashMap<String, Entry>) {
        *self.0.write().expect("directory lock") = all;
    }

    pub(crate) fn set(&self, business: &str, entry: Option<Entry>) {
        let mut map = self.0.write().expect("directory lock");
        match entry {
            Some(e) => map.insert(business.to_string(), e),
            None => map.remove(business),
        };
    }
}

/// The credentials of a stored application, opened.
pub fn keys_of(row: &AppRow, cipher: &TokenCipher) -> Result<AppKeys, DecryptError> {
    let open = |stored: &[u8], column: &str| {
        cipher.decrypt(
            stored,
            Some(&row.key_id),
            &secret_aad(&row.business_id, column),
        )
    };
    Ok(AppKeys {
        client_id: row.client_id.clone(),
        client_secret: open(&row.client_secret_enc, "client_secret_enc")?,
        bot_token: open(&row.bot_token_enc, "bot_token_enc")?,
    })
}

/// Every bot a process speaks with. Cheap to clone.
#[derive(Clone)]
pub struct Bots {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    cipher: TokenCipher,
    settings: DiscordSettings,
    metrics: Arc<Metrics>,
    shared: Bot,
    directory: Directory,
    /// Built bots by client id, with the change of the row they were built from.
    own: Mutex<HashMap<String, (DateTime<Utc>, Bot)>>,
    /// Each business's seats on the shared bot's side budget ([`DiscordClient::seated`]).
    seats: std::sync::Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// How many side calls one business may have waiting or under way at once on the shared
/// bot, in one process: half the side budget's requests per second (at least two), so a
/// business alone still fills the budget and one asking more leaves the rest to others.
pub fn seats_per_business(side_requests_per_s: u32) -> usize {
    (side_requests_per_s as usize).div_ceil(2).max(2)
}

impl std::fmt::Debug for Bots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bots")
            .field("shared", &self.inner.shared.client_id())
            .finish_non_exhaustive()
    }
}

/// Why a business's bot cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BotError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The stored secrets do not open with any configured key.
    #[error(
        "the secrets of the business's Discord application cannot be decrypted (wrong key); register the application again"
    )]
    Sealed,
}

impl Bots {
    /// The shared bot of `settings`, and the businesses' own ones as they are used.
    /// Spawns bucket actors: call it inside a tokio runtime.
    pub fn new(
        pool: PgPool,
        cipher: TokenCipher,
        settings: &DiscordSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        let shared = Bot::new(
            settings,
            &AppKeys::of_settings(settings),
            &pool,
            &metrics,
            false,
        );
        Self {
            inner: Arc::new(Inner {
                pool,
                cipher,
                settings: settings.clone(),
                metrics,
                shared,
                directory: Directory::default(),
                own: Mutex::default(),
                seats: Default::default(),
            }),
        }
    }

    /// The shared bot.
    pub fn shared(&self) -> &Bot {
        &self.inner.shared
    }

    /// Which business has its own application (for links rendered without a database).
    pub fn directory(&self) -> Directory {
        self.inner.directory.clone()
    }

    /// The bot of `business`: its own application's, else the shared one, whose side
    /// calls take the business's seats. Either way its calls count their invalid
    /// answers as the business's too (see [`DiscordClient::for_business`]).
    pub async fn of_business(&self, business: &str) -> Result<Bot, BotError> {
        let bot = match self.inner.directory.entry(business) {
            None => self.shared_for(business),
            Some((client_id, changed)) => self.own(&client_id, changed).await?,
        };
        Ok(bot.for_business(business))
    }

    /// The shared bot, its side calls seated as `business`'s.
    fn shared_for(&self, business: &str) -> Bot {
        let seats = self
            .inner
            .seats
            .lock()
            .expect("seats lock")
            .entry(business.to_string())
            .or_insert_with(|| {
                Arc::new(Semaphore::new(seats_per_business(
                    self.inner.settings.side_requests_per_s,
                )))
            })
            .clone();
        let shared = &self.inner.shared;
        Bot {
            side: shared.side.seated(seats),
            ..shared.clone()
        }
    }

    /// The bot of the application `client_id` names (`None`: the shared one), as long as
    /// it is the shared one or `business`'s own; `None` when `business` no longer has
    /// that application (its tokens cannot be refreshed or revoked any more).
    pub async fn of_application(
        &self,
        business: &str,
        client_id: Option<&str>,
    ) -> Result<Option<Bot>, BotError> {
        let shared = self.inner.shared.client_id();
        let bot = match client_id {
            None => Some(self.shared_for(business)),
            Some(c) if c == shared => Some(self.shared_for(business)),
            Some(c) => match self.inner.directory.entry(business) {
                Some((own, changed)) if own == c => Some(self.own(&own, changed).await?),
                _ => None,
            },
        };
        Ok(bot.map(|b| b.for_business(business)))
    }

    async fn own(&self, client_id: &str, changed: DateTime<Utc>) -> Result<Bot, BotError> {
        let mut own = self.inner.own.lock().await;
        if let Some((at, bot)) = own.get(client_id)
            && *at >= changed
        {
            return Ok(bot.clone());
        }
        let row = applications::of_client(&self.inner.pool, client_id).await?;
        let Some(row) = row else {
            // Removed since the directory was read: the shared bot, as it will say.
            return Ok(self.inner.shared.clone());
        };
        let keys = keys_of(&row, &self.inner.cipher).map_err(|_| BotError::Sealed)?;
        let bot = Bot::new(
            &self.inner.settings,
            &keys,
            &self.inner.pool,
            &self.inner.metrics,
            true,
        );
        own.insert(client_id.to_string(), (row.updated_at, bot.clone()));
        Ok(bot)
    }

    /// A client for an application `business` has not registered yet (checking its
    /// credentials): a side budget of its own application, so nothing is taken from any
    /// registered bot, and the invalid answers it earns counted with every other
    /// process's, and as the business's.
    pub fn probe(&self, business: &str, keys: &AppKeys) -> DiscordClient {
        DiscordClient::side_of(&self.inner.settings, keys, self.inner.metrics.clone())
            .shared(SharedLimits::new(self.inner.pool.clone(), &keys.client_id))
            .for_business(business)
    }

    /// This process changed `business`'s application: use the change at once.
    pub fn changed(&self, business: &str, entry: Option<Entry>) {
        self.inner.directory.set(business, entry);
    }

    /// Reads again which business has which application.
    pub async fn refresh(&self) -> Result<(), sqlx::Error> {
        let rows = applications::directory(&self.inner.pool).await?;
        let all: HashMap<_, _> = rows.into_iter().map(|(b, c, u)| (b, (c, u))).collect();
        let registered: HashSet<&String> = all.values().map(|(c, _)| c).collect();
        let mut own = self.inner.own.lock().await;
        own.retain(|client, _| registered.contains(client));
        self.inner.directory.replace(all);
        Ok(())
    }

    /// Reads the directory again every [`REFRESH_EVERY`] until `shutdown`.
    pub async fn keep_fresh(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "cannot read the businesses' Discord applications; keeping the last ones read");
            }
        }
    }
}

/// Seals a business's application secrets for its row.
pub fn seal(
    cipher: &TokenCipher,
    business_id: &str,
    secret: &SecretString,
    column: &str,
) -> Vec<u8> {
    use secrecy::ExposeSecret;
    cipher.encrypt(secret.expose_secret(), &secret_aad(business_id, column))
}
