//! Load isolation at the HTTP edge, so that one caller's load cannot take the service
//! from the others:
//!
//! - [`protect`]: every request is answered within `http.request_timeout`, and at most
//!   `http.max_concurrent_requests` are handled at once; one more is refused at once
//!   (503 `overloaded`) rather than queued behind them.
//! - [`Limits`]: keyed GCRA rate limits (`governor`): the merchant API per business
//!   (`api.requests_per_second`, `api.burst`, checked after authentication), the
//!   customer's OAuth callback per link and per client address (`oauth.*`).
//! - [`ClientIp`]: the client's address, from `X-Forwarded-For` only when the peer is
//!   one of `http.trusted_proxies`.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Uri, header};
use axum::response::{IntoResponse, Response};
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::{BoxError, ServiceBuilder};

use super::AppState;
use crate::config::{HttpSettings, Settings};
use crate::shares::{Share, Shares};
use crate::web::error::{ApiError, BROWSER_PAGES};

/// Wraps every route of `router` in the request timeout and the concurrency limit.
/// The timeout is inside the limit, so an abandoned request frees its place at once.
/// A refused request to a page a browser is sent to gets `try_again`'s page.
pub fn protect<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    settings: &HttpSettings,
    try_again: fn(&HeaderMap) -> Response,
) -> Router<S> {
    router.layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(
                move |uri: Uri, headers: HeaderMap, err: BoxError| {
                    refusal(uri, headers, err, try_again)
                },
            ))
            .load_shed()
            .layer(GlobalConcurrencyLimitLayer::new(
                settings.max_concurrent_requests,
            ))
            .timeout(settings.request_timeout),
    )
}

/// What a request refused by [`protect`] is answered: in the API's error shape, or for
/// the pages a person's browser is sent to ([`BROWSER_PAGES`]) `try_again`'s page, with
/// the same status and `Retry-After`.
async fn refusal(
    uri: Uri,
    headers: HeaderMap,
    err: BoxError,
    try_again: fn(&HeaderMap) -> Response,
) -> Response {
    let refused = if err.is::<tower::timeout::error::Elapsed>() {
        ApiError::Timeout
    } else if err.is::<tower::load_shed::error::Overloaded>() {
        ApiError::Overloaded
    } else {
        ApiError::Internal(err.to_string())
    };
    if !BROWSER_PAGES.contains(&uri.path()) {
        return refused.into_response();
    }
    tracing::warn!(error = %refused, path = uri.path(), "page request refused under load");
    let mut page = try_again(&headers);
    if let Some(secs) = refused.retry_after() {
        page.headers_mut().insert(header::RETRY_AFTER, secs.into());
    }
    page
}

/// The keyed rate limits of one process.
pub struct Limits {
    business: DefaultKeyedRateLimiter<String>,
    link: DefaultKeyedRateLimiter<String>,
    address: DefaultKeyedRateLimiter<IpAddr>,
    application: DefaultKeyedRateLimiter<String>,
    replays: DefaultKeyedRateLimiter<String>,
    key_reads: DefaultKeyedRateLimiter<IpAddr>,
    page_views: DefaultKeyedRateLimiter<String>,
    /// Each business's requests being handled (`api.max_in_flight_per_business`).
    in_flight: Shares,
    page_views_by_address: DefaultKeyedRateLimiter<IpAddr>,
    /// The most messages one replay may count (the replay budget's burst).
    replay_burst: NonZeroU32,
    trusted_proxies: Vec<IpNet>,
}

/// Views of one customer's access page per minute and process: a person reloading it
/// never comes near; each view costs three reads on the pool every tenant shares.
pub const PAGE_VIEWS_PER_MINUTE: u32 = 60;

/// Views of access pages per client address (its network, [`network_of`]) per minute
/// and process, whoever's they are.
pub const PAGE_VIEWS_PER_ADDRESS_PER_MINUTE: u32 = 300;

/// Checks of a business's Discord application credentials per hour and process: each
/// check asks Discord, and wrong credentials earn 401s, which Discord counts against
/// the address every business shares.
pub const APPLICATION_CHECKS_PER_HOUR: u32 = 10;

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("trusted_proxies", &self.trusted_proxies)
            .finish_non_exhaustive()
    }
}

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

/// `n` per `window`, all of them at once if unused, coming back one by one.
fn per_window(n: u32, window: Duration) -> Quota {
    let n = nonzero(n);
    let each = (window / n.get()).max(Duration::from_nanos(1));
    Quota::with_period(each)
        .expect("a positive period")
        .allow_burst(n)
}

/// What a limit per client address counts: an IPv4 address, or the /64 network of an
/// IPv6 one (the smallest a site is given: one client holds all of its 2^64 addresses,
/// and would otherwise get a budget per address). An IPv4-mapped IPv6 address counts as
/// its IPv4 address.
pub fn network_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from_bits(
                v6.to_bits() & !((1u128 << 64) - 1),
            )),
        },
    }
}

/// `Ok`, or how long until the next request of `key` is allowed.
fn check<K>(limiter: &DefaultKeyedRateLimiter<K>, key: &K) -> Result<(), Duration>
where
    K: Clone + Eq + std::hash::Hash,
{
    limiter
        .check_key(key)
        .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
}

impl Limits {
    pub fn from_settings(s: &Settings) -> Self {
        let api =
            Quota::per_second(nonzero(s.api.requests_per_second)).allow_burst(nonzero(s.api.burst));
        let window = s.oauth.callback_window;
        Self {
            business: RateLimiter::keyed(api),
            link: RateLimiter::keyed(per_window(s.oauth.callback_attempts, window)),
            address: RateLimiter::keyed(per_window(s.oauth.address_attempts, window)),
            application: RateLimiter::keyed(per_window(
                APPLICATION_CHECKS_PER_HOUR,
                Duration::from_secs(3600),
            )),
            replays: RateLimiter::keyed(per_window(
                s.webhooks.replays_per_hour,
                Duration::from_secs(3600),
            )),
            replay_burst: nonzero(s.webhooks.replays_per_hour),
            key_reads: RateLimiter::keyed(
                Quota::per_second(nonzero(s.api.key_reads_per_address_per_second)).allow_burst(
                    nonzero(s.api.key_reads_per_address_per_second.saturating_mul(5)),
                ),
            ),
            in_flight: Shares::each(
                usize::try_from(s.api.max_in_flight_per_business).unwrap_or(usize::MAX),
            ),
            page_views: RateLimiter::keyed(per_window(
                PAGE_VIEWS_PER_MINUTE,
                Duration::from_secs(60),
            )),
            page_views_by_address: RateLimiter::keyed(per_window(
                PAGE_VIEWS_PER_ADDRESS_PER_MINUTE,
                Duration::from_secs(60),
            )),
            trusted_proxies: s.http.trusted_proxy_nets(),
        }
    }

    /// One view of the access page of `customer` (`business:customer`), from `ip`.
    pub fn check_page_view(&self, customer: &str, ip: Option<IpAddr>) -> Result<(), Duration> {
        if let Some(ip) = ip {
            check(&self.page_views_by_address, &network_of(ip))?;
        }
        check(&self.page_views, &customer.to_string())
    }

    /// One merchant API request of `business`.
    pub fn check_business(&self, business: &str) -> Result<(), Duration> {
        check(&self.business, &business.to_string())
    }

    /// A request of `business` starts being handled: its place, held until dropped, or
    /// `None` if `api.max_in_flight_per_business` of its requests are already.
    pub fn enter(&self, business: &str) -> Option<Share> {
        self.in_flight.take(business)
    }

    /// One OAuth callback with the link `link` (grant id and nonce).
    pub fn check_link(&self, link: &str) -> Result<(), Duration> {
        check(&self.link, &link.to_string())
    }

    /// One check of `business`'s Discord application credentials.
    pub fn check_application(&self, business: &str) -> Result<(), Duration> {
        check(&self.application, &business.to_string())
    }

    /// The most messages one business may send again in an hour.
    pub fn replay_budget(&self) -> u32 {
        self.replay_burst.get()
    }

    /// `messages` webhook messages of `business` sent again (at most
    /// [`Limits::replay_budget`]; more counts as that).
    pub fn check_replays(&self, business: &str, messages: u32) -> Result<(), Duration> {
        let n = nonzero(messages).min(self.replay_burst);
        match self.replays.check_key_n(&business.to_string(), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(self.replays.clock().now())),
            // Not reachable: `n` is at most the burst.
            Err(_) => Err(Duration::from_secs(3600)),
        }
    }

    /// One read of an API key the process does not know, for a request from `ip` (its
    /// network, [`network_of`]).
    pub fn check_key_read(&self, ip: IpAddr) -> Result<(), Duration> {
        check(&self.key_reads, &network_of(ip))
    }

    /// One OAuth callback from `ip` (its network, [`network_of`]).
    pub fn check_address(&self, ip: IpAddr) -> Result<(), Duration> {
        check(&self.address, &network_of(ip))
    }

    /// Forgets keys whose limit is back to full, so the maps hold only recent callers.
    pub fn forget_idle(&self) {
        self.business.retain_recent();
        self.link.retain_recent();
        self.address.retain_recent();
        self.application.retain_recent();
        self.replays.retain_recent();
        self.key_reads.retain_recent();
        self.page_views.retain_recent();
        self.page_views_by_address.retain_recent();
        self.page_views.shrink_to_fit();
        self.page_views_by_address.shrink_to_fit();
        self.key_reads.shrink_to_fit();
        self.application.shrink_to_fit();
        self.replays.shrink_to_fit();
        self.business.shrink_to_fit();
        self.link.shrink_to_fit();
        self.address.shrink_to_fit();
    }

    /// Calls [`Limits::forget_idle`] every `every` until `shutdown`.
    pub async fn forget_idle_every(
        &self,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => self.forget_idle(),
            }
        }
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }

    /// The client's address: the peer's, unless the peer is a trusted proxy; then the
    /// nearest address in `X-Forwarded-For` (read from the right) that is not a trusted
    /// proxy itself. Entries a client could have written (left of an untrusted one) are
    /// never believed; an entry that is not an address ends the walk.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusted(peer) {
            return peer;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop.parse::<IpAddr>() {
                Ok(ip) => {
                    client = ip;
                    if !self.trusted(ip) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        client
    }
}

/// The client's address (see [`Limits::client_ip`]); `None` when the server was not
/// started with connection info (a router called directly, without a socket).
#[derive(Clone, Copy, Debug)]
pub struct ClientIp(pub Option<IpAddr>);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        Ok(ClientIp(
            peer.map(|p| state.limits.client_ip(p, &parts.headers)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(trusted: &str) -> Limits {
        let s = Settings::load_with_env(
            None,
            Some(
                [
                    (
                        "GUILDGATE_HTTP__TRUSTED_PROXIES".to_string(),
                        trusted.into(),
                    ),
                    ("GUILDGATE_API__REQUESTS_PER_SECOND".into(), "1".into()),
                    ("GUILDGATE_API__BURST".into(), "2".into()),
                ]
                .into_iter()
                .collect(),
            ),
        )
        .unwrap();
        Limits::from_settings(&s)
    }

    fn xff(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", v.parse().unwrap());
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let l = limits("10.0.0.0/8");
        // An untrusted peer: the header is the client's own words.
        assert_eq!(
            l.client_ip(ip("203.0.113.9"), &xff("198.51.100.1")),
            ip("203.0.113.9")
        );
        // A trusted proxy: the nearest untrusted hop, not what the client wrote before it.
        assert_eq!(
            l.client_ip(ip("10.0.0.2"), &xff("1.2.3.4, 198.51.100.1, 10.0.0.7")),
            ip("198.51.100.1")
        );
        // No header, or garbage in it: the last address believed.
        assert_eq!(
            l.client_ip(ip("10.0.0.2"), &HeaderMap::new()),
            ip("10.0.0.2")
        );
        assert_eq!(
            l.client_ip(ip("10.0.0.2"), &xff("198.51.100.1, junk")),
            ip("10.0.0.2")
        );
        // Nothing trusted (the default): never.
        assert_eq!(
            limits("").client_ip(ip("10.0.0.2"), &xff("198.51.100.1")),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn each_business_has_its_own_budget() {
        let l = limits("");
        assert!(l.check_business("bus_A").is_ok());
        assert!(l.check_business("bus_A").is_ok());
        let wait = l.check_business("bus_A").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(l.check_business("bus_B").is_ok());
    }

    #[test]
    fn an_ipv6_client_has_one_budget_for_its_network() {
        let l = limits("");
        // 60 callbacks per window by default: spent from addresses of one /64.
        for n in 0..60u32 {
            let addr = ip(&format!("2001:db8:1:2::{n:x}"));
            assert!(l.check_address(addr).is_ok(), "{addr}");
        }
        assert!(l.check_address(ip("2001:db8:1:2:ffff::1")).is_err());
        assert!(
            l.check_address(ip("2001:db8:1:3::1")).is_ok(),
            "another /64"
        );
        assert_eq!(network_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(network_of(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(
            network_of(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
    }

    #[test]
    fn a_business_has_its_own_places_in_flight() {
        let l = limits("");
        let mine: Vec<Share> = (0..8).map(|_| l.enter("bus_A").unwrap()).collect();
        assert!(l.enter("bus_A").is_none(), "the ninth waits for one to end");
        assert!(l.enter("bus_B").is_some(), "another business has its own");
        drop(mine);
        assert!(l.enter("bus_A").is_some());
        assert!(l.in_flight.idle(), "idle businesses forgotten");
    }

    #[test]
    fn a_window_quota_allows_its_count_at_once() {
        let q = per_window(10, Duration::from_secs(600));
        assert_eq!(q.burst_size().get(), 10);
        assert_eq!(q.replenish_interval(), Duration::from_secs(60));
    }
}
