//! The HTTP handlers' database pool, shared out among those asking.
//!
//! Every connection a handler takes is asked for on behalf of a [`Caller`]: a business
//! (the merchant API once its key is known, its customers' pages, its bot installs), or
//! a client's network for the reads that come before any business is known (an API key
//! this process has not read in the last few seconds, an OAuth callback's grant). Clients' networks count together, as one
//! caller beside the businesses, so that many addresses cannot outrank a business. The
//! pool's connections (`database.http_max_connections`) go out by these rules:
//!
//! - **A share each.** No business, and not the clients' networks together, holds more
//!   than `database.http_max_connections_per_caller` (at most the pool) at once, so one
//!   business's slow requests (deep pages, locks waited for) leave the rest of the pool
//!   to the others.
//! - **The fewest first.** When requests wait, a connection given back goes to the
//!   waiting caller that holds the fewest, the one that asked first among equals (among
//!   clients' networks, then the network holding the fewest); a business's own requests
//!   are served in the order they asked. Several businesses filling the pool together
//!   therefore make another wait for the next connection given back, not behind all of
//!   their requests. A request waits so for each of its steps that reads or writes (an
//!   API request reads its key first, then runs its handler's).
//! - **Five seconds at most.** A step that waits 5 s for its turn is refused
//!   ([`sqlx::Error::PoolTimedOut`]: 503 `overloaded` with `Retry-After`).
//! - **Counted while busy.** A connection counts against its caller until it is free
//!   again: a request abandoned mid-statement (its client gone, or
//!   `http.request_timeout`) leaves the statement running until it ends or reaches
//!   `database.http_statement_timeout`, and its connection is counted until then (at
//!   most that timeout and 5 s more); a commit runs to its end though its request is
//!   abandoned.
//!
//! A handler that needs a transaction takes one with [`HttpPool::begin`], never with
//! `begin` on a connection of [`HttpPool::acquire`]: only the former's `BEGIN` runs to its
//! end whatever happens to the request (see there); a store function's own `BEGIN` on it
//! is a savepoint, which a cut rolls back with the whole transaction.
//!
//! The rules are kept per process by a small gate in front of the pool: a mutex around
//! the callers holding or waiting for a connection, held while the next is chosen
//! (a pass over the callers waiting).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::limits::network_of;
use crate::config::DatabaseSettings;

/// How long a step waits for its connection before it is refused.
const WAIT: Duration = Duration::from_secs(5);

/// Beyond the statement timeout, how long a connection given back is waited for before
/// its turn is handed on anyway.
const SETTLE_MARGIN: Duration = Duration::from_secs(5);

/// On whose behalf a connection is taken.
#[derive(Clone, Copy, Debug)]
pub enum Caller<'a> {
    /// A business, authenticated.
    Business(&'a str),
    /// A client's network (its address, an IPv6 address's /64); `None` when the server
    /// has no connection info (a router called without a socket).
    Address(Option<IpAddr>),
}

/// Whose share a turn counts against (`group`), and whose line it waits in (`key`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Who {
    group: String,
    key: String,
}

impl Caller<'_> {
    fn who(&self) -> Who {
        match self {
            Caller::Business(b) => {
                let key = format!("business:{b}");
                Who {
                    group: key.clone(),
                    key,
                }
            }
            Caller::Address(ip) => Who {
                group: "addresses".into(),
                key: match ip {
                    Some(ip) => format!("address:{}", network_of(*ip)),
                    None => "address:-".into(),
                },
            },
        }
    }
}

/// The handlers' pool: every connection taken on behalf of a [`Caller`] (see the
/// module). Cheap to clone; clones share the pool and its gate.
#[derive(Clone)]
pub struct HttpPool {
    pool: PgPool,
    gate: Arc<Gate>,
    /// How long a connection given back may still be busy with a statement.
    settle: Duration,
}

impl HttpPool {
    /// Shares out `pool`, of `database.http_max_connections`, at most
    /// `database.http_max_connections_per_caller` per caller.
    pub fn new(pool: PgPool, settings: &DatabaseSettings, waiting: Gauge) -> Self {
        HttpPool {
            pool,
            gate: Gate::new(
                settings.http_max_connections as usize,
                settings.http_max_connections_per_caller as usize,
                waiting,
            ),
            settle: settings.http_statement_timeout + SETTLE_MARGIN,
        }
    }

    /// A connection for `caller`, once its turn comes.
    pub async fn acquire(&self, caller: Caller<'_>) -> Result<HttpConn, sqlx::Error> {
        let deadline = Instant::now() + WAIT;
        let turn = self.gate.enter(caller.who(), deadline).await?;
        let conn = within(deadline, self.pool.acquire()).await?;
        Ok(HttpConn {
            conn: Some(conn),
            turn: Some(turn),
            settle: self.settle,
        })
    }

    /// A transaction for `caller`, once its turn comes.
    ///
    /// `BEGIN` runs to its end in a task of its own, unbounded but for the pool's own
    /// wait for a connection (5 s): sqlx 0.9.0 gives a connection whose `BEGIN` was cut
    /// short back to the pool inside that transaction, where the next borrower's
    /// statements would run in it. A transaction whose request went away meanwhile is
    /// dropped in that task, which rolls it back.
    pub async fn begin(&self, caller: Caller<'_>) -> Result<HttpTx, sqlx::Error> {
        let turn = self.gate.enter(caller.who(), Instant::now() + WAIT).await?;
        let (pool, settle) = (self.pool.clone(), self.settle);
        joined(
            tokio::spawn(async move {
                let tx = pool.begin().await?;
                Ok(HttpTx {
                    tx: Some(tx),
                    turn: Some(turn),
                    settle,
                })
            })
            .await,
        )
    }

    /// Closes the pool (shutdown).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// `f`, refused as a pool that stayed full once `deadline` passes.
async fn within<T>(
    deadline: Instant,
    f: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    tokio::time::timeout_at(deadline, f)
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
}

/// Gives `turn` back once the transaction `conn` is free: after the statement still
/// running for a request abandoned mid-statement (at most `settle`). Then the
/// transaction is dropped, which rolls it back as its connection goes back to the pool.
fn settle(mut conn: Transaction<'static, Postgres>, turn: Turn, settle: Duration) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        drop(conn);
        drop(turn);
        return;
    };
    rt.spawn(async move {
        let _ = tokio::time::timeout(settle, conn.ping()).await;
        drop(conn);
        drop(turn);
    });
}

/// A pooled connection counted against its caller's share until it is dropped and free.
pub struct HttpConn {
    conn: Option<PoolConnection<Postgres>>,
    turn: Option<Turn>,
    settle: Duration,
}

impl Deref for HttpConn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.conn.as_ref().expect("held until dropped")
    }
}

impl DerefMut for HttpConn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_mut().expect("held until dropped")
    }
}

impl Drop for HttpConn {
    fn drop(&mut self) {
        let (Some(mut conn), Some(turn)) = (self.conn.take(), self.turn.take()) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            drop(conn);
            drop(turn);
            return;
        };
        // What dropping it would do, awaited: the pool tests the connection (which waits
        // for a statement still running) and takes it back; then the turn is handed on.
        // One round trip, as for any pooled connection.
        let back = conn.return_to_pool();
        drop(conn);
        let settle = self.settle;
        rt.spawn(async move {
            let _ = tokio::time::timeout(settle, back).await;
            drop(turn);
        });
    }
}

/// A transaction counted against its caller's share until committed, rolled back or
/// dropped (which rolls it back) and its connection is free.
pub struct HttpTx {
    tx: Option<Transaction<'static, Postgres>>,
    turn: Option<Turn>,
    settle: Duration,
}

impl HttpTx {
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        let tx = self.tx.take().expect("held until committed");
        finish(tx.commit(), self.turn.take()).await
    }

    pub async fn rollback(mut self) -> Result<(), sqlx::Error> {
        let tx = self.tx.take().expect("held until rolled back");
        finish(tx.rollback(), self.turn.take()).await
    }
}

/// Runs a transaction's last statement to its end and then gives `turn` back, even if
/// the request waiting for it is abandoned meanwhile: the connection is busy until then.
async fn finish(
    last: impl Future<Output = Result<(), sqlx::Error>> + Send + 'static,
    turn: Option<Turn>,
) -> Result<(), sqlx::Error> {
    let ended = tokio::spawn(async move {
        let r = last.await;
        drop(turn);
        r
    });
    joined(ended.await)
}

/// What a task of [`HttpPool::begin`] or [`finish`] returned; its panic goes on.
fn joined<T>(r: Result<Result<T, sqlx::Error>, tokio::task::JoinError>) -> Result<T, sqlx::Error> {
    match r {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(sqlx::Error::Io(std::io::Error::other(e))),
    }
}

impl Deref for HttpTx {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.tx.as_ref().expect("held until committed")
    }
}

impl DerefMut for HttpTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.tx.as_mut().expect("held until committed")
    }
}

impl Drop for HttpTx {
    fn drop(&mut self) {
        if let (Some(tx), Some(turn)) = (self.tx.take(), self.turn.take()) {
            settle(tx, turn, self.settle);
        }
    }
}

/// Who holds and who waits, per process.
struct Gate {
    share: usize,
    /// Requests waiting for their turn, exported as
    /// `guildgate_http_database_waiting`.
    waiting: Gauge,
    state: Mutex<Lines>,
}

#[derive(Default)]
struct Lines {
    free: usize,
    /// Turns held, by group (the share) and by key (the order within a group).
    held: HashMap<String, usize>,
    held_keys: HashMap<String, usize>,
    /// Each waiting key's requests, in the order they asked.
    lines: HashMap<String, Line>,
    /// Numbers the requests as they ask.
    next: u64,
}

struct Line {
    group: String,
    waiters: VecDeque<Waiter>,
}

struct Waiter {
    number: u64,
    tx: oneshot::Sender<Turn>,
}

impl Lines {
    fn held(&self, who: &Who) -> (usize, usize) {
        (
            self.held.get(&who.group).copied().unwrap_or(0),
            self.held_keys.get(&who.key).copied().unwrap_or(0),
        )
    }
}

/// One connection counted against a caller until dropped.
struct Turn {
    gate: Arc<Gate>,
    who: Who,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.gate.give_back(&self.who);
    }
}

/// Takes a request out of its line if it is still there (it stopped waiting: timed
/// out, or its request was abandoned).
struct Asking<'a> {
    gate: &'a Arc<Gate>,
    key: &'a str,
    number: u64,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        let Some(line) = s.lines.get_mut(self.key) else {
            return;
        };
        let before = line.waiters.len();
        line.waiters.retain(|w| w.number != self.number);
        let gone = before - line.waiters.len();
        if line.waiters.is_empty() {
            s.lines.remove(self.key);
        }
        drop(s);
        self.gate.waiting.dec_by(gone as i64);
    }
}

fn decrement(map: &mut HashMap<String, usize>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

impl Gate {
    fn new(size: usize, share: usize, waiting: Gauge) -> Arc<Self> {
        Arc::new(Gate {
            share: share.clamp(1, size.max(1)),
            waiting,
            state: Mutex::new(Lines {
                free: size.max(1),
                ..Lines::default()
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lines> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for `who`'s turn until `deadline`.
    async fn enter(self: &Arc<Self>, who: Who, deadline: Instant) -> Result<Turn, sqlx::Error> {
        let (tx, rx) = oneshot::channel();
        let number = {
            let mut s = self.lock();
            if s.lines.is_empty() && s.free > 0 && s.held(&who).0 < self.share {
                return Ok(self.take(&mut s, who));
            }
            let number = s.next;
            s.next += 1;
            s.lines
                .entry(who.key.clone())
                .or_insert_with(|| Line {
                    group: who.group.clone(),
                    waiters: VecDeque::new(),
                })
                .waiters
                .push_back(Waiter { number, tx });
            self.waiting.inc();
            number
        };
        let _asking = Asking {
            gate: self,
            key: &who.key,
            number,
        };
        self.hand_on();
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(turn)) => Ok(turn),
            // Dropped unsent only if the gate went away; or waited too long.
            Ok(Err(_)) | Err(_) => Err(sqlx::Error::PoolTimedOut),
        }
    }

    fn take(self: &Arc<Self>, s: &mut Lines, who: Who) -> Turn {
        s.free -= 1;
        *s.held.entry(who.group.clone()).or_default() += 1;
        *s.held_keys.entry(who.key.clone()).or_default() += 1;
        Turn {
            gate: self.clone(),
            who,
        }
    }

    fn give_back(self: &Arc<Self>, who: &Who) {
        {
            let mut s = self.lock();
            s.free += 1;
            decrement(&mut s.held, &who.group);
            decrement(&mut s.held_keys, &who.key);
        }
        self.hand_on();
    }

    /// Gives free connections to the waiting callers under their share: the group
    /// holding the fewest first (the one whose request asked first among equals), then
    /// within it the key holding the fewest, then the request that asked first.
    fn hand_on(self: &Arc<Self>) {
        loop {
            let (tx, turn) = {
                let mut s = self.lock();
                if s.free == 0 {
                    return;
                }
                let Some(key) = s.next_key(self.share) else {
                    return;
                };
                let line = s.lines.get_mut(&key).expect("a line of the key found");
                let group = line.group.clone();
                let waiter = line.waiters.pop_front().expect("a line is never empty");
                if line.waiters.is_empty() {
                    s.lines.remove(&key);
                }
                let turn = self.take(&mut s, Who { group, key });
                (waiter.tx, turn)
            };
            self.waiting.dec();
            // A request that stopped waiting meanwhile: its turn, dropped here, is
            // given back and handed on again.
            let _ = tx.send(turn);
        }
    }
}

impl Lines {
    /// The key whose request goes next, of the groups under `share`.
    fn next_key(&self, share: usize) -> Option<String> {
        let held = |map: &HashMap<String, usize>, k: &str| map.get(k).copied().unwrap_or(0);
        // Each group's first request, of its keys' first.
        let mut groups: HashMap<&str, u64> = HashMap::new();
        for line in self.lines.values() {
            let first = line.waiters.front().map_or(u64::MAX, |w| w.number);
            let g = groups.entry(line.group.as_str()).or_insert(first);
            *g = (*g).min(first);
        }
        let (group, _) = groups
            .into_iter()
            .filter(|(g, _)| held(&self.held, g) < share)
            .min_by_key(|(g, first)| (held(&self.held, g), *first))?;
        self.lines
            .iter()
            .filter(|(_, line)| line.group == group)
            .min_by_key(|(key, line)| {
                let first = line.waiters.front().map_or(u64::MAX, |w| w.number);
                (held(&self.held_keys, key), first)
            })
            .map(|(key, _)| key.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(size: usize, share: usize) -> Arc<Gate> {
        Gate::new(size, share, Gauge::default())
    }

    fn business(b: &str) -> Who {
        Caller::Business(b).who()
    }

    fn address(ip: &str) -> Who {
        Caller::Address(Some(ip.parse().unwrap())).who()
    }

    async fn enter(g: &Arc<Gate>, who: Who) -> Result<Turn, sqlx::Error> {
        g.enter(who, Instant::now() + WAIT).await
    }

    /// Asks for `who`'s turn in the background, once the asking is in line.
    async fn ask(g: &Arc<Gate>, who: Who) -> tokio::task::JoinHandle<Result<Turn, String>> {
        let before = g.waiting.get();
        let gate = g.clone();
        let h = tokio::spawn(async move { enter(&gate, who).await.map_err(|e| e.to_string()) });
        while g.waiting.get() == before && !h.is_finished() {
            tokio::task::yield_now().await;
        }
        h
    }

    fn counts(g: &Arc<Gate>) -> (usize, usize, usize) {
        let s = g.lock();
        (s.free, s.held.values().sum(), s.lines.len())
    }

    #[tokio::test]
    async fn a_caller_holds_at_most_its_share() {
        let g = gate(3, 2);
        let a1 = enter(&g, business("a")).await.unwrap();
        let _a2 = enter(&g, business("a")).await.unwrap();
        let a3 = ask(&g, business("a")).await;
        assert!(!a3.is_finished(), "a third of a's waits though one is free");
        let _b = enter(&g, business("b")).await.unwrap();
        drop(a1);
        let _a3 = a3.await.unwrap().unwrap();
        assert_eq!(g.waiting.get(), 0);
    }

    #[tokio::test]
    async fn the_caller_holding_the_fewest_goes_first() {
        let g = gate(2, 2);
        let a1 = enter(&g, business("a")).await.unwrap();
        let a2 = enter(&g, business("a")).await.unwrap();
        let a3 = ask(&g, business("a")).await;
        let a4 = ask(&g, business("a")).await;
        let b = ask(&g, business("b")).await;
        drop(a1);
        let b = b.await.unwrap().unwrap();
        assert!(
            !a3.is_finished() && !a4.is_finished(),
            "b asked last but held none"
        );
        drop(a2);
        let a3 = a3.await.unwrap().unwrap();
        assert!(
            !a4.is_finished(),
            "a's own requests in the order they asked"
        );
        drop(b);
        drop(a3);
        a4.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn among_equals_the_first_to_ask_goes_first() {
        let g = gate(1, 1);
        let held = enter(&g, business("x")).await.unwrap();
        let c = ask(&g, business("c")).await;
        let b = ask(&g, business("b")).await;
        drop(held);
        let c = c.await.unwrap().unwrap();
        assert!(!b.is_finished());
        drop(c);
        b.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn clients_networks_share_one_share() {
        let g = gate(4, 2);
        let _n1 = enter(&g, address("192.0.2.1")).await.unwrap();
        let _n2 = enter(&g, address("192.0.2.2")).await.unwrap();
        let n3 = ask(&g, address("192.0.2.3")).await;
        assert!(
            !n3.is_finished(),
            "the networks' share is full, though two are free"
        );
        let _a = enter(&g, business("a")).await.unwrap();
    }

    #[tokio::test]
    async fn clients_networks_rank_together_then_each_by_what_it_holds() {
        let g = gate(4, 4);
        let _n1 = enter(&g, address("192.0.2.1")).await.unwrap();
        let n2 = enter(&g, address("192.0.2.2")).await.unwrap();
        let a1 = enter(&g, business("a")).await.unwrap();
        let b1 = enter(&g, business("b")).await.unwrap();
        let n1_again = ask(&g, address("192.0.2.1")).await;
        let n3 = ask(&g, address("192.0.2.3")).await;
        let a2 = ask(&g, business("a")).await;
        // The networks hold two together, the business one: it goes first.
        drop(b1);
        let _a2 = a2.await.unwrap().unwrap();
        assert!(!n1_again.is_finished() && !n3.is_finished());
        // Among the networks, the one holding none goes first.
        drop(a1);
        let _n3 = n3.await.unwrap().unwrap();
        assert!(!n1_again.is_finished());
        drop(n2);
        let _n1_again = n1_again.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn among_equal_groups_the_first_to_ask_goes_first() {
        let g = gate(3, 3);
        let _n1 = enter(&g, address("192.0.2.1")).await.unwrap();
        let _a1 = enter(&g, business("a")).await.unwrap();
        let x = enter(&g, business("x")).await.unwrap();
        let a2 = ask(&g, business("a")).await;
        let n2 = ask(&g, address("192.0.2.2")).await;
        // The networks hold one together, as the business does: a's request asked first.
        drop(x);
        let _a2 = a2.await.unwrap().unwrap();
        assert!(!n2.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_five_seconds_at_most_and_leaves_its_line() {
        let g = gate(1, 1);
        let held = enter(&g, business("a")).await.unwrap();
        let err = enter(&g, business("b")).await.err().expect("refused");
        assert!(matches!(err, sqlx::Error::PoolTimedOut), "{err}");
        assert_eq!(g.waiting.get(), 0);
        assert_eq!(counts(&g), (0, 1, 0), "no line left behind");
        drop(held);
        let _b = enter(&g, business("b")).await.unwrap();
    }

    #[tokio::test]
    async fn an_abandoned_request_hands_its_turn_on() {
        let g = gate(1, 1);
        let held = enter(&g, business("a")).await.unwrap();
        let gone = ask(&g, business("b")).await;
        let c = ask(&g, business("c")).await;
        gone.abort();
        let _ = gone.await;
        drop(held);
        let _c = c.await.unwrap().unwrap();
        assert_eq!(counts(&g), (0, 1, 0));
        assert_eq!(g.waiting.get(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_turn_sent_to_a_request_abandoned_before_it_read_it_is_handed_on() {
        let g = gate(1, 1);
        let held = enter(&g, business("a")).await.unwrap();
        let b = ask(&g, business("b")).await;
        let c = ask(&g, business("c")).await;
        // b's turn is sent now, but b does not run before it is abandoned.
        drop(held);
        b.abort();
        let _ = b.await;
        let _c = c.await.unwrap().unwrap();
        assert_eq!(counts(&g), (0, 1, 0));
    }

    #[tokio::test]
    async fn a_share_is_never_more_than_the_pool_nor_less_than_one() {
        assert_eq!(gate(2, 6).share, 2);
        assert_eq!(gate(4, 0).share, 1);
    }

    #[test]
    fn a_network_is_one_key_and_networks_one_group() {
        assert_eq!(address("2001:db8::1"), address("2001:db8::ffff"));
        assert_ne!(address("192.0.2.1").key, address("192.0.2.2").key);
        assert_eq!(address("192.0.2.1").group, address("192.0.2.2").group);
        assert_ne!(business("addresses").group, address("192.0.2.1").group);
    }
}
