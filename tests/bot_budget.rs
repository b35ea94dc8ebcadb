//! One bot, one budget: the bot's Discord limits shared by every process through
//! PostgreSQL. Each "process" here is a Discord client of its own over one database, as
//! replicas and CLI runs are. The sandbox Discord runs on a runtime (and thread) of its
//! own, so the arrival times it records are not those of the clients' scheduler.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use guildgate::config::Settings;
use guildgate::discord::DiscordClient;
use guildgate::discord::invalid::InvalidRequests;
use guildgate::discord::ratelimit::Budget;
use guildgate::discord::shared::{SIDE, SharedLimits};
use guildgate::domain::Snowflake;
use guildgate::metrics::Metrics;
use sandbox_discord::{GuildSpec, Sandbox, SandboxConfig, UserSpec, permissions};

/// A sandbox Discord served by a runtime on a thread of its own; stops when the sender
/// is dropped.
fn sandbox_apart() -> (Sandbox, tokio::sync::oneshot::Sender<()>) {
    let (give, take) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            give.send(Sandbox::start(SandboxConfig::default()).await)
                .unwrap();
            let _ = stopped.await;
        });
    });
    (take.recv().unwrap(), stop)
}

/// A database shared by the "processes" of one test.
async fn shared_db() -> (common::TestDb, sqlx::PgPool) {
    let db = common::TestDb::create().await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    guildgate::store::migrate(&pool).await.unwrap();
    (db, pool)
}

/// Three processes on one bot, each at full demand: one replica's syncer, another
/// replica's side budget and a `guildgate reconcile` run. Alone, each stays under its own
/// budget (45 + 5 + 5 requests per second), which together is more than Discord's 50.
/// Sharing the bot's budget in the database keeps them under the sandbox's global limit
/// (50 requests per second, counted from the first arrival as Discord does): no global
/// 429, never more than 50 bot requests in any second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_on_one_bot_share_its_global_limit() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (sandbox, _stop) = sandbox_apart();
    let (db, pool) = shared_db().await;
    let env = common::world::sandbox_env(&sandbox)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let s = Settings::load_with_env(None, Some(env)).unwrap().discord;
    let process = |metrics: Arc<Metrics>| {
        DiscordClient::side(&s, metrics).shared(SharedLimits::new(pool.clone(), &s.client_id))
    };
    let syncer_metrics = Metrics::new();
    let syncer = process(syncer_metrics.clone()).with_budget(Budget::syncer(s.side_requests_per_s));
    let replica = process(Metrics::new());
    let reconcile = process(Metrics::new());
    // Enough servers that the per-route buckets (5 per second each) never hold anyone
    // back: only the global limit does.
    let guilds: Vec<u64> = (0..24)
        .map(|i| {
            let spec =
                GuildSpec::new(format!("G{i}")).with_bot_permissions(permissions::MANAGE_ROLES);
            sandbox.add_guild(spec).guild_id
        })
        .collect();
    let user = Snowflake::new(sandbox.add_user(UserSpec::new("una")));
    sandbox.reset_stats();
    let busy = Duration::from_secs(4);
    let until = std::time::Instant::now() + busy;
    // What the syncer sent while every process wanted more than the bot allows.
    let sent_while_busy = {
        let m = syncer_metrics.clone();
        tokio::spawn(async move {
            tokio::time::sleep(busy).await;
            common::worker::sample(&m.render(), "guildgate_discord_requests_total", &[])
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for (client, workers) in [(syncer, 48), (replica, 6), (reconcile, 6)] {
        for k in 0..workers {
            let client = client.clone();
            let guilds = guilds.clone();
            tasks.spawn(async move {
                let mut i = k;
                while std::time::Instant::now() < until {
                    let g = Snowflake::new(guilds[i % guilds.len()]);
                    // Side callers that wait too long are told "busy": that is fine here.
                    let _ = client.member(g, user).await;
                    i += 7;
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    let sent_while_busy = sent_while_busy.await.unwrap();
    // The syncer's share: Discord's 50 per second less the side budget's.
    let share = f64::from(50 - s.side_requests_per_s);
    let used = sent_while_busy / busy.as_secs_f64() / share;
    eprintln!(
        "the syncer sent {:.1} requests/s under full demand: {:.0} % of its share ({share:.1}/s)",
        sent_while_busy / busy.as_secs_f64(),
        used * 100.0
    );

    let stats = sandbox.stats();
    let mut bot: Vec<_> = sandbox
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/guilds/"))
        .map(|r| r.at)
        .collect();
    bot.sort();
    // Discord's global window is a second from the first request it counts; the next
    // starts with the first request after it. The most any such window held:
    let mut busiest = 0;
    let mut i = 0;
    while i < bot.len() {
        let n = bot[i..]
            .iter()
            .take_while(|u| **u - bot[i] < Duration::from_secs(1))
            .count();
        busiest = busiest.max(n);
        i += n;
    }
    // The most any second held, wherever it starts. Stricter than Discord, and noisy:
    // the sandbox stamps a burst's requests one after another as its one thread gets to
    // them, so it is printed, not asserted.
    let sliding = bot
        .iter()
        .enumerate()
        .map(|(i, t)| {
            bot[i..]
                .iter()
                .take_while(|u| **u - *t < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    let synced = common::worker::sample(
        &syncer_metrics.render(),
        "guildgate_discord_requests_total",
        &[],
    );
    eprintln!(
        "{} bot requests ({synced} by the syncer), at most {busiest} in any of Discord's windows ({sliding} in any sliding second), {} global 429s",
        bot.len(),
        stats.global_rate_limited
    );
    assert_eq!(stats.global_rate_limited, 0, "{stats:?}");
    assert_eq!(stats.global_violations, 0, "{stats:?}");
    assert!(
        busiest <= 50,
        "{busiest} bot requests in one of Discord's windows"
    );
    assert!(
        bot.len() > 100,
        "the clients did call Discord: {}",
        bot.len()
    );
    pool.close().await;
    db.drop_db().await;
}

/// Longer than any request of these tests takes.
const LEASE: Duration = Duration::from_secs(60);

/// A slot is held while its request is in flight and free again a window after the
/// answer, so a request that took long to reach Discord never shares a window there
/// with the next request of its slot; a taker that died frees it when its lease ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_is_free_a_window_after_its_answer_or_its_lease() {
    let (db, pool) = shared_db().await;
    let limits = SharedLimits::new(pool.clone(), "bot-a");
    let window = Duration::from_secs(1);
    let in_flight = limits.take(SIDE, 1, window, LEASE).await.unwrap().unwrap();
    // In flight for longer than a window: still taken.
    tokio::time::sleep(window + Duration::from_millis(500)).await;
    let wait = limits.take(SIDE, 1, window, LEASE).await.unwrap();
    assert!(
        wait.as_ref().is_err_and(|w| *w == window),
        "a slot in flight is no sooner free than a window from now: {wait:?}"
    );
    // Answered: free a window after the answer.
    in_flight.release().await;
    let released: bool = sqlx::query_scalar(
        "SELECT taken_at <= clock_timestamp() FROM discord_budget_slots WHERE bot = 'bot-a'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(released, "released once its release is awaited");
    let wait = limits
        .take(SIDE, 1, window, LEASE)
        .await
        .unwrap()
        .expect_err("a window has not passed since the answer");
    assert!(wait <= window, "{wait:?}");
    tokio::time::sleep(wait).await;
    assert!(limits.take(SIDE, 1, window, LEASE).await.unwrap().is_ok());

    // A taker that dies with its request in flight never releases its slot: it is
    // free a window after the lease ends.
    let dying = SharedLimits::new(pool.clone(), "bot-b");
    let lease = Duration::from_millis(500);
    std::mem::forget(dying.take(SIDE, 1, window, lease).await.unwrap().unwrap());
    let wait = dying.take(SIDE, 1, window, lease).await.unwrap();
    assert!(wait.is_err(), "{wait:?}");
    tokio::time::sleep(lease + window + Duration::from_millis(100)).await;
    assert!(dying.take(SIDE, 1, window, lease).await.unwrap().is_ok());
    pool.close().await;
    db.drop_db().await;
}

/// A request that waited out a global 429 after taking its slot may find the slot's
/// lease over: it renews the lease while the slot is still its own, and once another
/// process has taken the slot it waits for a slot of its own again before it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_whose_lease_ran_out_is_renewed_or_taken_again() {
    let (db, pool) = shared_db().await;
    let limits = SharedLimits::new(pool.clone(), "bot-a");
    let (window, lease) = (Duration::from_millis(200), Duration::from_millis(400));
    // Times under the database's clock, which the slots use, so that a busy machine
    // slowing the test down between two statements cannot change what they show.
    let db_now = || async {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>("SELECT clock_timestamp()")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    // The end of the one slot's lease (or the time of its answer).
    let leased_until = || async {
        sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
            "SELECT taken_at FROM discord_budget_slots WHERE bot = 'bot-a'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let chrono_of = |d: Duration| chrono::Duration::from_std(d).unwrap();
    let mut first = limits.take_waiting("test", SIDE, 1, window, lease).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = db_now().await;
    first.renew().await;
    assert!(
        leased_until().await >= before + chrono_of(lease),
        "renewed within its lease: leased from the renewal again"
    );
    // The lease runs out, a window passes, and another process takes the one slot.
    tokio::time::sleep(lease + window + Duration::from_millis(100)).await;
    let other = limits.take_waiting("test", SIDE, 1, window, lease).await;
    let others_until = leased_until().await;
    first.renew().await;
    let renewed_at = db_now().await;
    assert!(
        renewed_at >= others_until + chrono_of(window) - chrono_of(Duration::from_millis(50)),
        "the slot another took is not used again before its lease and a window end: \
         renewed at {renewed_at}, the other's lease until {others_until}"
    );
    other.release().await;
    first.release().await;
    pool.close().await;
    db.drop_db().await;
}

/// A ring of N slots lets N requests through in any window, however many processes
/// take from it at once, and says how long the others wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_budget_grants_its_slots_once_per_window() {
    let (db, pool) = shared_db().await;
    let processes: Vec<_> = (0..3)
        .map(|_| SharedLimits::new(pool.clone(), "bot-a"))
        .collect();
    // Long beside the takes themselves, which a busy machine can stretch to seconds:
    // no slot comes free again while they run.
    let window = Duration::from_secs(60);
    let started = std::time::Instant::now();
    let mut takes = tokio::task::JoinSet::new();
    for i in 0..12 {
        let p = processes[i % 3].clone();
        takes.spawn(async move { p.take(SIDE, 5, window, LEASE).await.unwrap() });
    }
    let answers = takes.join_all().await;
    let spread = started.elapsed();
    let granted = answers.iter().filter(|a| a.is_ok()).count();
    assert_eq!(granted, 5, "{answers:?}");
    for wait in answers.iter().filter_map(|a| a.as_ref().err()) {
        // Until the oldest slot, stamped since `started`, is a window old: at least a
        // window less the time the takes took, at most a window, give or take the time
        // between a taker's clock reading and a slot another taker stamped a moment
        // later.
        assert!(
            *wait + Duration::from_millis(50) >= window.saturating_sub(spread)
                && *wait <= window + Duration::from_millis(50),
            "{wait:?} after takes that took {spread:?}"
        );
    }
    // Another bot has a budget of its own.
    let other = SharedLimits::new(pool.clone(), "bot-b");
    assert!(other.take(SIDE, 5, window, LEASE).await.unwrap().is_ok());
    // A global 429 seen by one process stops every process of that bot.
    processes[0]
        .block_for(Duration::from_secs(30))
        .await
        .unwrap();
    let wait = processes[1]
        .take(SIDE, 5, Duration::ZERO, LEASE)
        .await
        .unwrap();
    assert!(
        wait.as_ref().is_err_and(|w| *w > Duration::from_secs(25)),
        "{wait:?}"
    );
    assert!(
        other
            .take(SIDE, 5, Duration::ZERO, LEASE)
            .await
            .unwrap()
            .is_ok()
    );
    pool.close().await;
    db.drop_db().await;
}

/// One business's invalid answers, wherever they were earned, stop its calls in every
/// process at its share of the ceiling, and no other business's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_business_share_of_invalid_answers_counts_in_every_process() {
    let (db, pool) = shared_db().await;
    let process = || InvalidRequests::new(10, 2).shared(SharedLimits::new(pool.clone(), "bot"));
    let (one, two) = (process(), process());
    // Enough answers of others that the whole count could hold a business's share.
    one.for_business("bus_b").record().await;
    one.record().await;
    one.for_business("bus_a").record().await;
    assert!(
        two.for_business("bus_a").check().await.is_ok(),
        "one of two"
    );
    two.for_business("bus_a").record().await;
    let wait = process().for_business("bus_a").check().await.unwrap_err();
    assert!(
        wait > Duration::from_secs(590) && wait <= Duration::from_secs(610),
        "{wait:?}"
    );
    assert!(process().for_business("bus_b").check().await.is_ok());
    assert!(process().check().await.is_ok());
    pool.close().await;
    db.drop_db().await;
}

/// Discord bans an address for invalid answers of every process behind it: each process
/// stops at the ceiling counting the others' answers too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_answers_of_every_process_count_against_the_ceiling() {
    let (db, pool) = shared_db().await;
    let process = || InvalidRequests::new(3, 3).shared(SharedLimits::new(pool.clone(), "bot"));
    let (a, b) = (process(), process());
    a.record().await;
    a.record().await;
    assert!(b.check().await.is_ok(), "two of three");
    assert_eq!(b.record().await, 3);
    let wait = process().check().await.unwrap_err();
    assert!(
        wait > Duration::from_secs(590) && wait <= Duration::from_secs(610),
        "{wait:?}"
    );
    pool.close().await;
    db.drop_db().await;
}
