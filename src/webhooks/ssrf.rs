//! The SSRF guard: merchants choose webhook URLs, so guildgate must not become a way to
//! reach its own network. Only `https` URLs whose host resolves to public addresses are
//! accepted, unless `webhooks.allow_private_targets` (tests, local development), which
//! also allows `http`, loopback and private ranges.
//!
//! The URL is checked when an endpoint is saved ([`check_on_save`]) and again at every
//! connection: [`GuardedResolver`] is the HTTP client's DNS resolver and hands it only
//! vetted addresses, so a name that later resolves to a private address (DNS rebinding)
//! is refused, and the client connects to exactly the address that was checked. IP
//! literals never reach a resolver, so [`check_target`] checks them before sending.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::LazyLock;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

use crate::shares::Shares;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SsrfError {
    #[error("not a valid URL")]
    Invalid,
    #[error("only https URLs are accepted")]
    Scheme,
    #[error("URLs with a user name or password are not accepted")]
    Credentials,
    #[error("the URL has no host")]
    NoHost,
    /// An IP literal the merchant gave.
    #[error("{0} is not a public address")]
    NotPublic(IpAddr),
    /// A name that resolves to an address that is not public or, under the strict
    /// policy, does not resolve: which, and where to, is the operator's network.
    #[error("the host does not resolve to public addresses only")]
    ResolvesNotPublic,
    #[error("the host does not resolve: {0}")]
    Unresolvable(String),
}

/// What targets are allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetPolicy {
    pub allow_private: bool,
}

impl TargetPolicy {
    /// Whether the client may connect to `ip`.
    pub fn allows(self, ip: IpAddr) -> bool {
        self.allow_private || is_public(ip)
    }
}

/// Checks scheme, credentials and (for IP literals) the address, without DNS.
pub fn check_target(url: &Url, policy: TargetPolicy) -> Result<(), SsrfError> {
    match url.scheme() {
        "https" => {}
        "http" if policy.allow_private => {}
        _ => return Err(SsrfError::Scheme),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(SsrfError::Credentials);
    }
    match url.host() {
        None => Err(SsrfError::NoHost),
        Some(Host::Ipv4(ip)) => allow(IpAddr::V4(ip), policy),
        Some(Host::Ipv6(ip)) => allow(IpAddr::V6(ip), policy),
        Some(Host::Domain(_)) => Ok(()),
    }
}

fn allow(ip: IpAddr, policy: TargetPolicy) -> Result<(), SsrfError> {
    if policy.allows(ip) {
        Ok(())
    } else {
        Err(SsrfError::NotPublic(ip))
    }
}

/// How long the check on save waits for a name to resolve, and for its turn to.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Lookups of names on save running at once in a process, at most. Each holds one of
/// the runtime's blocking threads until the system resolver answers, which a name
/// server that never answers makes tens of seconds, past the request's end: unbounded,
/// a merchant saving such names in a loop could take every blocking thread, and with
/// them the delivery workers' lookups.
pub const MAX_LOOKUPS_ON_SAVE: usize = 16;

/// Of those, at most this many for one business, so that one business's names whose
/// server never answers leave the others turns of their own.
pub const MAX_LOOKUPS_ON_SAVE_PER_BUSINESS: usize = 4;

/// The turns of lookups on save ([`MAX_LOOKUPS_ON_SAVE`], per business
/// [`MAX_LOOKUPS_ON_SAVE_PER_BUSINESS`]) and how long each may take.
#[derive(Debug)]
pub struct Lookups {
    turns: tokio::sync::Semaphore,
    per_business: Shares,
    timeout: Duration,
}

/// Why a lookup on save found nothing to check.
#[derive(Debug, PartialEq, Eq)]
enum LookupFailed {
    /// No turn in time: too many lookups at once.
    Busy(String),
    /// The resolver did not answer in time.
    NoAnswer,
    /// The resolver answered that it cannot resolve the name.
    NotFound(String),
}

impl Lookups {
    pub fn new(at_once: usize, per_business: usize, timeout: Duration) -> Self {
        Self {
            turns: tokio::sync::Semaphore::new(at_once),
            per_business: Shares::each(per_business),
            timeout,
        }
    }

    /// The addresses `host` resolves to, from a blocking thread that holds the turns
    /// (the process's and `business`'s) until the resolver answers, even after this
    /// gave up waiting for it.
    async fn resolve(
        &'static self,
        business: &str,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, LookupFailed> {
        let mine = self.per_business.take(business).ok_or_else(|| {
            LookupFailed::Busy(format!(
                "{host}: too many of this business's names are being looked up; try again"
            ))
        })?;
        let turn = tokio::time::timeout(self.timeout, self.turns.acquire())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                LookupFailed::Busy(format!(
                    "{host}: too many names are being looked up; try again"
                ))
            })?;
        let name = host.to_string();
        let lookup = tokio::task::spawn_blocking(move || {
            let _turns = (turn, mine);
            std::net::ToSocketAddrs::to_socket_addrs(&(name.as_str(), port))
                .map(Iterator::collect::<Vec<SocketAddr>>)
        });
        match tokio::time::timeout(self.timeout, lookup).await {
            Err(_) => Err(LookupFailed::NoAnswer),
            Ok(Err(e)) => Err(LookupFailed::NotFound(e.to_string())),
            Ok(Ok(found)) => found.map_err(|e| LookupFailed::NotFound(e.to_string())),
        }
    }
}

/// The process's lookups on save.
static LOOKUPS_ON_SAVE: LazyLock<Lookups> = LazyLock::new(|| {
    Lookups::new(
        MAX_LOOKUPS_ON_SAVE,
        MAX_LOOKUPS_ON_SAVE_PER_BUSINESS,
        LOOKUP_TIMEOUT,
    )
});

/// What a lookup on save of `host` means under `policy`. Under the strict policy a name
/// that does not resolve and one that resolves to an address that is not public get
/// the same answer, which tells neither where it resolved nor whether it does: the
/// operator's internal names stay unmapped.
fn judge(
    host: &str,
    found: Result<Vec<SocketAddr>, LookupFailed>,
    policy: TargetPolicy,
) -> Result<(), SsrfError> {
    match found {
        Err(LookupFailed::Busy(why)) => Err(SsrfError::Unresolvable(why)),
        Err(LookupFailed::NoAnswer) => Err(SsrfError::Unresolvable(format!(
            "{host}: no answer in time"
        ))),
        Err(LookupFailed::NotFound(e)) if policy.allow_private => Err(SsrfError::Unresolvable(e)),
        Err(LookupFailed::NotFound(_)) => Err(SsrfError::ResolvesNotPublic),
        Ok(addrs) if addrs.is_empty() && policy.allow_private => {
            Err(SsrfError::Unresolvable(host.to_string()))
        }
        Ok(addrs) if !addrs.is_empty() && addrs.iter().all(|a| policy.allows(a.ip())) => Ok(()),
        Ok(_) => Err(SsrfError::ResolvesNotPublic),
    }
}

/// The check made when an endpoint of `business` is saved: [`check_target`], then
/// every address the host resolves to must be allowed (`judge`). A name that does not
/// resolve within [`LOOKUP_TIMEOUT`] is refused, and so is one that waited that long
/// for a turn to be looked up ([`MAX_LOOKUPS_ON_SAVE`],
/// [`MAX_LOOKUPS_ON_SAVE_PER_BUSINESS`]).
pub async fn check_on_save(
    raw: &str,
    policy: TargetPolicy,
    business: &str,
) -> Result<Url, SsrfError> {
    check_on_save_with(raw, policy, business, &LOOKUPS_ON_SAVE).await
}

async fn check_on_save_with(
    raw: &str,
    policy: TargetPolicy,
    business: &str,
    lookups: &'static Lookups,
) -> Result<Url, SsrfError> {
    let url = Url::parse(raw).map_err(|_| SsrfError::Invalid)?;
    check_target(&url, policy)?;
    if let Some(Host::Domain(host)) = url.host() {
        let port = url.port_or_known_default().unwrap_or(443);
        judge(host, lookups.resolve(business, host, port).await, policy)?;
    }
    Ok(url)
}

/// The HTTP client's resolver: resolves with the system resolver and keeps only the
/// addresses the policy allows; none left is a connection error.
#[derive(Clone, Copy, Debug)]
pub struct GuardedResolver {
    pub policy: TargetPolicy,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> =
                all.into_iter().filter(|a| policy.allows(a.ip())).collect();
            if allowed.is_empty() {
                return Err(Box::new(SsrfError::Unresolvable(format!(
                    "{host} resolves to no public address"
                )))
                    as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Whether an address is on the public internet, checked against the IANA IPv4 and IPv6
/// Special-Purpose Address Registries: not private, loopback, link-local, unique-local,
/// multicast, unspecified, shared (CGNAT), documentation, benchmarking, discard-only,
/// reserved or otherwise special, including IPv4 addresses embedded in IPv6 (mapped,
/// NAT64, 6to4; IPv4-translated and local-use NAT64 addresses are refused outright).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0 // "this network", includes 0.0.0.0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast (deprecated, RFC 7526)
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let seg = ip.segments();
    // NAT64 (64:ff9b::/96) reaches the embedded IPv4 address.
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
        let [a, b] = seg[6].to_be_bytes();
        let [c, d] = seg[7].to_be_bytes();
        return is_public_v4(Ipv4Addr::new(a, b, c, d));
    }
    // 6to4 (2002::/16) carries an IPv4 address in bits 16..48.
    if seg[0] == 0x2002 {
        let [a, b] = seg[1].to_be_bytes();
        let [c, d] = seg[2].to_be_bytes();
        return is_public_v4(Ipv4Addr::new(a, b, c, d));
    }
    // Only global unicast (2000::/3) is on the internet. Outside it lie the loopback and
    // unspecified addresses, IPv4-compatible (::/96) and IPv4-translated
    // (::ffff:0:0:0/96, RFC 2765) addresses, discard-only 100::/64 (RFC 6666), the dummy
    // prefix 100:0:0:1::/64 (RFC 9780), local-use NAT64 64:ff9b:1::/48 (RFC 8215),
    // segment-routing SIDs 5f00::/16 (RFC 9602), unique-local fc00::/7, link-local
    // fe80::/10, site-local fec0::/10, multicast ff00::/8 and every block still
    // reserved by the IETF.
    if seg[0] & 0xe000 != 0x2000 {
        return false;
    }
    let special = match seg[0] {
        // IETF protocol assignments 2001::/23 (Teredo, benchmarking, ORCHID, anycast
        // services) and documentation 2001:db8::/32
        0x2001 => seg[1] < 0x0200 || seg[1] == 0x0db8,
        // documentation 3fff::/20 (RFC 9637)
        first => first & 0xfff0 == 0x3ff0,
    };
    !special
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: TargetPolicy = TargetPolicy {
        allow_private: false,
    };
    const LOCAL: TargetPolicy = TargetPolicy {
        allow_private: true,
    };

    #[test]
    fn classifies_addresses() {
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
            "2001:db8::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} must not be public");
        }
        for ip in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip} is public");
        }
    }

    /// One address from each block of the IANA special-purpose registries that is not
    /// globally reachable, or that embeds an address which is not.
    #[test]
    fn refuses_the_special_purpose_blocks_of_the_iana_registries() {
        for ip in [
            // IPv4
            "0.1.2.3",
            "192.0.0.9",
            "192.0.0.170",
            "192.0.2.1",
            "192.88.99.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.7",
            "240.0.0.1",
            // IPv4-compatible, mapped and translated (RFC 2765)
            "::a00:1",
            "::ffff:192.168.0.1",
            "::ffff:0:a00:1",
            "::ffff:0:7f00:1",
            "::ffff:0:808:808",
            // NAT64: well-known prefix to a private address, local-use prefix (RFC 8215)
            "64:ff9b::a00:1",
            "64:ff9b:1::a00:1",
            "64:ff9b:1::808:808",
            "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
            // discard-only (RFC 6666) and dummy (RFC 9780) prefixes
            "100::",
            "100::1",
            "100::ffff:ffff:ffff:ffff",
            "100:0:0:1::1",
            // IETF protocol assignments 2001::/23: Teredo, benchmarking, ORCHID
            "2001::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:2::1",
            "2001:10::1",
            "2001:20::1",
            "2001:1ff::1",
            // documentation, old and new (RFC 9637)
            "2001:db8:ffff::1",
            "3fff::1",
            "3fff:fff:ffff::1",
            // 6to4 of a private address
            "2002:c0a8:1::1",
            // segment-routing SIDs (RFC 9602), site-local, reserved blocks
            "5f00::1",
            "fec0::1",
            "4000::1",
            "8000::1",
            "e000::1",
            "ff0e::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} must not be public");
        }
        for ip in [
            "8.8.8.8",
            "192.0.1.1",
            "192.88.98.1",
            "198.20.0.1",
            "2001:4860:4860::8888",
            "2001:200::1",
            "2a00:1450:4001::1",
            "2600::1",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip} is public");
        }
    }

    #[test]
    fn checks_scheme_credentials_and_literals() {
        let u = |s: &str| Url::parse(s).unwrap();
        assert_eq!(check_target(&u("https://1.1.1.1/hook"), STRICT), Ok(()));
        assert_eq!(
            check_target(&u("http://1.1.1.1/hook"), STRICT),
            Err(SsrfError::Scheme)
        );
        assert_eq!(
            check_target(&u("ftp://1.1.1.1/hook"), LOCAL),
            Err(SsrfError::Scheme)
        );
        assert_eq!(
            check_target(&u("https://127.0.0.1/hook"), STRICT),
            Err(SsrfError::NotPublic("127.0.0.1".parse().unwrap()))
        );
        assert_eq!(
            check_target(&u("https://[::1]/hook"), STRICT),
            Err(SsrfError::NotPublic("::1".parse().unwrap()))
        );
        assert_eq!(
            check_target(&u("https://u:p@example.com/"), STRICT),
            Err(SsrfError::Credentials)
        );
        assert_eq!(check_target(&u("http://127.0.0.1:9/hook"), LOCAL), Ok(()));
        for literal in ["[::ffff:0:a9fe:a9fe]", "[64:ff9b:1::a9fe:a9fe]", "[100::1]"] {
            assert!(
                matches!(
                    check_target(&u(&format!("https://{literal}/hook")), STRICT),
                    Err(SsrfError::NotPublic(_))
                ),
                "{literal}"
            );
        }
    }

    #[tokio::test]
    async fn lookups_on_save_wait_their_turn_a_bounded_time() {
        static ONE: LazyLock<Lookups> =
            LazyLock::new(|| Lookups::new(1, 1, Duration::from_millis(200)));
        let local = |b: &'static str| check_on_save_with("http://localhost:1/hook", LOCAL, b, &ONE);
        // The process's one turn taken: nobody's lookup goes.
        let held = ONE.turns.acquire().await.unwrap();
        match local("bus_A").await {
            Err(SsrfError::Unresolvable(m)) => assert!(m.contains("too many names"), "{m}"),
            other => panic!("{other:?}"),
        }
        drop(held);
        assert!(local("bus_A").await.is_ok());
        assert_eq!(ONE.turns.available_permits(), 1, "the turn is given back");
        // A business's one turn taken: its next lookup is refused, another's goes.
        let mine = ONE.per_business.take("bus_A").unwrap();
        match local("bus_A").await {
            Err(SsrfError::Unresolvable(m)) => assert!(m.contains("this business"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(local("bus_B").await.is_ok());
        drop(mine);
        assert!(local("bus_A").await.is_ok());
        assert!(ONE.per_business.idle(), "every business's turns given back");
    }

    #[test]
    fn a_name_refused_on_save_does_not_tell_where_it_resolves_or_whether() {
        let private: SocketAddr = "10.1.2.3:443".parse().unwrap();
        let public: SocketAddr = "1.1.1.1:443".parse().unwrap();
        let not_found = || Err(LookupFailed::NotFound("no such name".into()));
        assert_eq!(
            judge("a.example", Ok(vec![private]), STRICT),
            Err(SsrfError::ResolvesNotPublic)
        );
        assert_eq!(
            judge("a.example", not_found(), STRICT),
            Err(SsrfError::ResolvesNotPublic),
            "the same answer"
        );
        assert_eq!(
            judge("a.example", Ok(vec![]), STRICT),
            Err(SsrfError::ResolvesNotPublic)
        );
        assert_eq!(
            judge("a.example", Ok(vec![public, private]), STRICT),
            Err(SsrfError::ResolvesNotPublic)
        );
        assert_eq!(judge("a.example", Ok(vec![public]), STRICT), Ok(()));
        assert_eq!(
            judge("a.example", not_found(), LOCAL),
            Err(SsrfError::Unresolvable("no such name".into())),
            "local development is told"
        );
        assert!(!SsrfError::ResolvesNotPublic.to_string().contains("10."));
    }

    #[tokio::test]
    async fn names_are_resolved_on_save() {
        assert!(matches!(
            check_on_save("https://localhost/hook", STRICT, "bus_A").await,
            Err(SsrfError::ResolvesNotPublic)
        ));
        assert!(
            check_on_save("http://localhost:1/hook", LOCAL, "bus_A")
                .await
                .is_ok()
        );
        assert_eq!(
            check_on_save("not a url", LOCAL, "bus_A").await,
            Err(SsrfError::Invalid)
        );
    }

    #[tokio::test]
    async fn the_resolver_drops_private_addresses() {
        let strict = GuardedResolver { policy: STRICT };
        assert!(strict.resolve("localhost".parse().unwrap()).await.is_err());
        let local = GuardedResolver { policy: LOCAL };
        let addrs: Vec<SocketAddr> = local
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()));
    }
}
