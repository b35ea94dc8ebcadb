//! Slow endpoints: phases whose receivers answer after a fixed latency, to see what
//! waiting for them costs. An endpoint's ideal rate is its in-flight cap divided by its
//! latency (`webhooks.max_in_flight_per_endpoint` requests out at once, each taking the
//! latency); each phase reports every endpoint's rate against it, the machine's CPU per
//! 1,000 deliveries, and how often a job went through the broker again per delivery
//! (republished: deferred to the back of the queue or a retry tier, or released from
//! PostgreSQL through the outbox).
//!
//! - Three phases of one endpoint answering in 50 ms, 200 ms and 1 s, each with enough
//!   events to take about `GUILDGATE_BENCH_SLOW_SECONDS` (15) at the ideal rate: the
//!   backlog of one endpoint is where waiting costs most. After the 50 ms phase, the
//!   same number of events to one endpoint answering at once, published at the pace
//!   the 50 ms endpoint was served ("paced"): what deliveries cost at that rate with
//!   nothing to wait for, since at 150 deliveries/s every request, answer and commit
//!   wakes the process, the broker and the database for itself alone.
//! - Rounds of two phases, alternating: five endpoints answering at once ("fast"), then
//!   the same number of events to five such endpoints beside five slow ones (50 ms,
//!   100 ms, 200 ms, 500 ms, 1 s; "mixed"), each in a business of its own with enough
//!   events to take `GUILDGATE_BENCH_SLOW_SECONDS` at its ideal rate, so that each
//!   endpoint's rate is measured over the same span. The slow businesses' events are
//!   published and fanned out first, so their backlog is there when the fast ones
//!   start. The fast endpoints' rate in the mixed phase against the fast phase is what
//!   the slow ones cost them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use guildgate::metrics::Metrics;
use lapin::Connection;
use serde_json::json;
use sqlx::PgConnection;

use crate::measure::{Cpu, Split, Wal, median};

/// One receiver: answers 200 after its latency, counting what it got and when.
#[derive(Default)]
pub struct Receiver {
    hits: AtomicU64,
    /// When the first and the last request arrived.
    span: Mutex<Option<(Instant, Instant)>>,
}

impl Receiver {
    fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

async fn receiver(latency: Duration) -> (String, Arc<Receiver>) {
    let r = Arc::new(Receiver::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new()
        .route(
            "/hook",
            axum::routing::post(move |State(r): State<Arc<Receiver>>| async move {
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
                let now = Instant::now();
                let mut span = r.span.lock().unwrap();
                *span = Some((span.map_or(now, |(first, _)| first), now));
                r.hits.fetch_add(1, Ordering::Relaxed);
                "ok"
            }),
        )
        .with_state(r.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, r)
}

/// What the phases share.
pub struct Bench<'a> {
    pub conn: &'a mut PgConnection,
    pub publisher: &'a Connection,
    pub queue: String,
    pub metrics: Arc<Metrics>,
    /// `webhooks.max_in_flight_per_endpoint`.
    pub cap: usize,
    pub tag: usize,
    /// The machine's CPU seconds per second with guildgate idle, measured again before
    /// each one-endpoint phase and each round (the machine drifts): a slow phase lasts
    /// long for few deliveries, and the machine's idle load (PostgreSQL,
    /// the broker, guildgate's timers) would otherwise dominate its CPU per delivery.
    pub idle_cpu: f64,
}

/// An endpoint of a phase: its latency, its receiver and its business (an index into
/// the phase's businesses).
struct Endpoint {
    latency: Duration,
    business: usize,
    receiver: Arc<Receiver>,
}

/// What one phase measured.
pub struct Measured {
    pub deliveries: u64,
    pub elapsed: Duration,
    /// Per endpoint: latency, deliveries, deliveries/s (from its first answer to its
    /// last: the rate once its backlog is there, without the time to publish and fan
    /// out the events).
    rates: Vec<(Duration, u64, f64)>,
    pub cpu_per_k: Option<f64>,
    /// The same less the machine's idle load over the phase.
    pub busy_cpu_per_k: Option<f64>,
    /// PostgreSQL's, RabbitMQ's and this process's share of it (idle load included):
    /// steadier than the figure above idle when a phase is long for few deliveries.
    pub split_per_k: Option<[f64; 3]>,
    pub republishes_per_delivery: f64,
    /// PostgreSQL's write-ahead log per delivery, read a second after the phase.
    pub wal: Wal,
    outcomes: String,
}

impl Measured {
    /// The lowest rate against the ideal over the endpoints answering in 50 ms or more.
    pub fn worst_ratio(&self, cap: usize) -> Option<f64> {
        self.rates
            .iter()
            .filter(|(l, _, _)| *l >= Duration::from_millis(50))
            .map(|(l, _, rate)| rate / (cap as f64 / l.as_secs_f64()))
            .min_by(f64::total_cmp)
    }

    /// Deliveries/s of the endpoints answering at once, together.
    pub fn fast_rate(&self) -> f64 {
        let fast: Vec<_> = self.rates.iter().filter(|(l, _, _)| l.is_zero()).collect();
        let n: u64 = fast.iter().map(|(_, n, _)| n).sum();
        let slowest = fast
            .iter()
            .map(|(_, n, r)| n.saturating_sub(1) as f64 / r)
            .fold(0.0, f64::max);
        n as f64 / slowest.max(1e-3)
    }

    pub fn print(&self, name: &str, cap: usize) {
        println!(
            "{name}: {} deliveries in {:.2} s; republished {:.3} per delivery{}",
            self.deliveries,
            self.elapsed.as_secs_f64(),
            self.republishes_per_delivery,
            self.cpu_per_k
                .zip(self.busy_cpu_per_k)
                .map(|(c, b)| format!(
                    "; machine CPU {c:.0} ms per 1,000 deliveries, {b:.0} above idle"
                ))
                .unwrap_or_default()
        );
        println!(
            "  PostgreSQL's WAL per delivery: {:.1} records, {:.2} KB",
            self.wal.records,
            self.wal.bytes / 1000.0
        );
        if let Some([pg, mq, me]) = self.split_per_k {
            println!(
                "  CPU per 1,000 deliveries by process: PostgreSQL {pg:.0} ms, RabbitMQ {mq:.0} ms, this process {me:.0} ms"
            );
        }
        for (latency, n, rate) in &self.rates {
            let ideal = (!latency.is_zero())
                .then(|| cap as f64 / latency.as_secs_f64())
                .map(|ideal| format!(" = {:.2} of the ideal {ideal:.0}/s", rate / ideal))
                .unwrap_or_default();
            println!(
                "  endpoint answering in {:>4} ms: {n} in {:.0}/s{ideal}",
                latency.as_millis(),
                rate
            );
        }
        println!("  attempts: {}", self.outcomes);
    }
}

/// The counters a phase reads before and after: webhook jobs relayed from the outbox,
/// and the delivery outcomes.
fn counters(m: &Metrics) -> (u64, Vec<(&'static str, u64)>) {
    let relayed = m
        .outbox_relayed
        .get_or_create(&vec![("kind", "webhook".to_string())])
        .get();
    let outcomes = crate::attempt_counts(
        m,
        &[
            "delivered",
            "deferred",
            "parked",
            "pulled",
            "put_back",
            "held",
            "paced",
        ],
    );
    (relayed, outcomes)
}

impl Bench<'_> {
    /// Creates one endpoint per latency, in business `business`, with its receiver.
    async fn endpoints(
        &mut self,
        phase: &str,
        business: usize,
        latencies: &[Duration],
    ) -> Vec<Endpoint> {
        let mut out = Vec::new();
        for latency in latencies {
            let (url, receiver) = receiver(*latency).await;
            crate::add_endpoint(
                self.conn,
                &format!("bus_{phase}_{}_{business}", self.tag),
                url,
            )
            .await;
            out.push(Endpoint {
                latency: *latency,
                business,
                receiver,
            });
        }
        out
    }

    /// Publishes `events[b]` grant events to business `b` (those of the businesses
    /// after the first one first) and waits until every endpoint has them all.
    async fn phase(
        &mut self,
        phase: &str,
        endpoints: Vec<Endpoint>,
        events: &[usize],
        pace: Option<f64>,
    ) -> Measured {
        self.tag += 1;
        let businesses: Vec<String> = (0..events.len())
            .map(|b| format!("bus_{phase}_{}_{b}", self.tag - 1))
            .collect();
        let (relayed_before, outcomes_before) = counters(&self.metrics);
        let wal = Wal::read(&mut *self.conn).await;
        let (cpu, split) = (Cpu::now(), Split::now());
        let ch = self.publisher.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        let started = Instant::now();
        // The other businesses' events first, fanned out before the first business's
        // are published: in the mixed phase, the slow endpoints then have their whole
        // backlog while the fast ones are served. Published in one go, the businesses'
        // events went through the fan-out side by side, and the slow endpoints' jobs
        // reached the workers over a second, many behind fast ones: the 50 ms endpoint
        // was fed at about its ideal rate, so it could not reach it.
        let order: Vec<(usize, usize)> = (1..events.len())
            .flat_map(|b| (0..events[b]).map(move |i| (b, i)))
            .chain((0..events[0]).map(|i| (0, i)))
            .collect();
        let published: Vec<(&str, String)> = order
            .iter()
            .map(|(b, i)| {
                (
                    businesses[*b].as_str(),
                    format!("grant_{phase}_{}_{b}_{i}", self.tag),
                )
            })
            .collect();
        let (others, first) = published.split_at(events[1..].iter().sum());
        crate::publish_events_paced(&ch, &self.queue, others, pace).await;
        for (b, business) in businesses.iter().enumerate().skip(1) {
            let of_it = endpoints.iter().filter(|e| e.business == b).count();
            self.wait_for_messages(business, events[b] * of_it).await;
        }
        crate::publish_events_paced(&ch, &self.queue, first, pace).await;
        let _ = ch.close(200, "done".into()).await;
        let want: u64 = endpoints.iter().map(|e| events[e.business] as u64).sum();
        let deadline = Instant::now() + Duration::from_secs(600);
        while endpoints.iter().map(|e| e.receiver.hits()).sum::<u64>() < want {
            assert!(Instant::now() < deadline, "deliveries did not complete");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = started.elapsed();
        let cpu_per_k = Cpu::ms_per_k_since(cpu, want).map(|(machine, _)| machine);
        let split_per_k = Split::ms_per_k_since(split, want);
        let idle_per_k = self.idle_cpu * elapsed.as_secs_f64() * 1000.0 / (want as f64 / 1000.0);
        let busy_cpu_per_k = cpu_per_k.map(|c| c - idle_per_k);
        let (relayed, outcomes) = counters(&self.metrics);
        let wal = Wal::read_after_quiet(&mut *self.conn)
            .await
            .per_unit_since(wal, want as usize);
        let outcomes_delta: Vec<(&str, u64)> = outcomes
            .iter()
            .zip(&outcomes_before)
            .map(|((l, n), (_, b))| (*l, n - b))
            .collect();
        let deferred = outcomes_delta
            .iter()
            .find(|(l, _)| *l == "deferred")
            .map_or(0, |(_, n)| *n);
        // Every message's first job is relayed once; any other relayed job is a release.
        let released = (relayed - relayed_before).saturating_sub(want);
        let rates = endpoints
            .iter()
            .map(|e| {
                let (first, last) = e
                    .receiver
                    .span
                    .lock()
                    .unwrap()
                    .unwrap_or((started, started));
                let n = e.receiver.hits();
                // Answers, so n - 1 intervals between the first and the last.
                let secs = last.saturating_duration_since(first).as_secs_f64();
                (e.latency, n, n.saturating_sub(1) as f64 / secs.max(1e-3))
            })
            .collect();
        Measured {
            deliveries: want,
            elapsed,
            rates,
            cpu_per_k,
            busy_cpu_per_k,
            split_per_k,
            republishes_per_delivery: (deferred + released) as f64 / want as f64,
            wal,
            outcomes: outcomes_delta
                .iter()
                .map(|(l, n)| format!("{l} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

impl Bench<'_> {
    /// Waits until `business` has `n` webhook messages: its events are fanned out.
    async fn wait_for_messages(&mut self, business: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (have,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM webhook_messages m
                 JOIN webhook_endpoints e ON e.id = m.endpoint_id
                 WHERE e.business_id = $1",
            )
            .bind(business)
            .fetch_one(&mut *self.conn)
            .await
            .unwrap();
            if usize::try_from(have).unwrap_or(0) >= n {
                return;
            }
            assert!(Instant::now() < deadline, "the events were not fanned out");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Measures the machine's idle load again ([`Bench::idle_cpu`]) and says it.
    async fn measure_idle(&mut self) {
        self.idle_cpu = idle_cpu().await;
        // Something else busy on the machine (a build, another bench) would be taken
        // for guildgate's idle load and subtracted from the phase that follows: read
        // again a few times, and say so if it stays high.
        for _ in 0..3 {
            if self.idle_cpu <= BUSY_IDLE {
                break;
            }
            println!(
                "machine CPU with guildgate idle: {:.0} ms per second, busy with something else; reading again",
                self.idle_cpu * 1000.0
            );
            self.idle_cpu = self.idle_cpu.min(idle_cpu().await);
        }
        println!(
            "machine CPU with guildgate idle: {:.0} ms per second{}",
            self.idle_cpu * 1000.0,
            if self.idle_cpu > BUSY_IDLE {
                " (the machine is busy with something else: the figures above idle are not to be trusted)"
            } else {
                ""
            }
        );
    }
}

/// Idle load above which the machine is taken to be busy with something other than
/// guildgate (CPU seconds per second): an idle guildgate, PostgreSQL and RabbitMQ take
/// 15–50 ms per second here.
const BUSY_IDLE: f64 = 0.2;

/// The machine's CPU seconds per second over a few idle seconds.
async fn idle_cpu() -> f64 {
    let (before, started) = (Cpu::now(), Instant::now());
    tokio::time::sleep(Duration::from_secs(5)).await;
    match (before, Cpu::now()) {
        (Some(b), Some(a)) => (a.machine_s - b.machine_s) / started.elapsed().as_secs_f64(),
        _ => 0.0,
    }
}

/// Runs the phases; returns the last line's figures.
pub async fn run(mut b: Bench<'_>, fast_events: usize, rounds: usize) -> serde_json::Value {
    let seconds: f64 = std::env::var("GUILDGATE_BENCH_SLOW_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15.0);
    let ms = Duration::from_millis;
    let cap = b.cap;
    let mut phases = Vec::new();
    // The 50 ms endpoint's CPU per delivery above idle against the paced phase's.
    let mut of_paced = None;
    for latency in [ms(50), ms(200), ms(1000)] {
        let name = format!("{}ms", latency.as_millis());
        let events = (seconds * cap as f64 / latency.as_secs_f64()).ceil() as usize;
        b.measure_idle().await;
        let eps = b.endpoints(&name, 0, &[latency]).await;
        let m = b.phase(&name, eps, &[events], None).await;
        m.print(&format!("one endpoint answering in {name}"), cap);
        let pace = (latency == ms(50))
            .then(|| m.rates.first().map(|r| r.2))
            .flatten();
        let slow_cpu = m.busy_cpu_per_k;
        phases.push((name, m));
        if let Some(pace) = pace {
            // The same deliveries at the same pace to an endpoint that answers at once:
            // what delivering at that rate costs with nothing to wait for, to tell the
            // cost of a slow endpoint's waiting from the cost of a low rate.
            b.measure_idle().await;
            let eps = b.endpoints("paced", 0, &[Duration::ZERO]).await;
            let p = b.phase("paced", eps, &[events], Some(pace)).await;
            p.print(
                &format!("one endpoint answering at once, fed at the 50 ms endpoint's {pace:.0}/s"),
                cap,
            );
            of_paced = slow_cpu.zip(p.busy_cpu_per_k).map(|(s, p)| s / p);
            if let Some(r) = of_paced {
                println!("  the 50 ms endpoint's CPU per delivery above idle: {r:.2} times this");
            }
            phases.push(("paced".into(), p));
        }
    }
    let slow = [ms(50), ms(100), ms(200), ms(500), ms(1000)];
    // Each slow endpoint's backlog takes `seconds` at its ideal rate, so each rate is
    // measured over the same span (given the 1 s endpoint's count, the 50 ms endpoint's
    // rate was over 0.75 s, its start included).
    let events: Vec<usize> = std::iter::once(fast_events)
        .chain(
            slow.iter()
                .map(|l| (seconds * cap as f64 / l.as_secs_f64()).ceil() as usize),
        )
        .collect();
    let (mut fast_rates, mut mixed_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut fast_cpu, mut worst_mixed) = (Vec::new(), Vec::new());
    let mut mixed_cpu = Vec::new();
    for round in 1..=rounds {
        b.measure_idle().await;
        let eps = b.endpoints("fast", 0, &[Duration::ZERO; 5]).await;
        let fast = b.phase("fast", eps, &[fast_events], None).await;
        fast.print(
            &format!("round {round}, 5 endpoints answering at once"),
            cap,
        );
        let mut eps = b.endpoints("mixed", 0, &[Duration::ZERO; 5]).await;
        for (i, latency) in slow.iter().enumerate() {
            eps.extend(b.endpoints("mixed", i + 1, &[*latency]).await);
        }
        let mixed = b.phase("mixed", eps, &events, None).await;
        mixed.print(
            &format!("round {round}, the same beside 5 endpoints answering in 50 ms to 1 s"),
            cap,
        );
        fast_rates.push(fast.fast_rate());
        mixed_rates.push(mixed.fast_rate());
        ratios.push(mixed.fast_rate() / fast.fast_rate());
        fast_cpu.extend(fast.busy_cpu_per_k);
        mixed_cpu.extend(mixed.busy_cpu_per_k);
        worst_mixed.extend(mixed.worst_ratio(cap));
        phases.push((format!("mixed{round}"), mixed));
    }
    let fast_cpu = median(&mut fast_cpu);
    println!(
        "fast endpoints: median {:.0}/s alone, {:.0}/s beside slow ones; median of the rounds' ratios {:.2}; CPU above idle {fast_cpu:.0} ms per 1,000 deliveries alone, {:.0} in the mixed phases",
        median(&mut fast_rates),
        median(&mut mixed_rates),
        median(&mut ratios),
        median(&mut mixed_cpu),
    );
    let mut out = serde_json::Map::new();
    for (name, m) in &phases {
        out.insert(
            name.clone(),
            json!({
                "worst_endpoint_of_ideal": m.worst_ratio(cap).map(|r| (r * 100.0).round() / 100.0),
                "republishes_per_delivery": (m.republishes_per_delivery * 1000.0).round() / 1000.0,
                "cpu_ms_per_1000": m.cpu_per_k.map(f64::round),
                "cpu_above_idle_ms_per_1000": m.busy_cpu_per_k.map(f64::round),
                "cpu_ms_per_1000_by_process": m.split_per_k.map(|[pg, mq, me]| json!({
                    "postgres": pg.round(),
                    "rabbitmq": mq.round(),
                    "this_process": me.round(),
                })),
                "wal_records_per_delivery": (m.wal.records * 10.0).round() / 10.0,
                "wal_bytes_per_delivery": m.wal.bytes.round(),
                "cpu_of_fast": m.busy_cpu_per_k.map(|c| (c / fast_cpu * 100.0).round() / 100.0),
            }),
        );
        if name == "50ms"
            && let Some(r) = of_paced
            && let Some(o) = out.get_mut(name.as_str()).and_then(|v| v.as_object_mut())
        {
            o.insert("cpu_of_paced".into(), json!((r * 100.0).round() / 100.0));
        }
    }
    out.insert(
        "fast_beside_slow_ratio".into(),
        json!((median(&mut ratios) * 100.0).round() / 100.0),
    );
    out.insert(
        "mixed_worst_endpoint_of_ideal".into(),
        json!((median(&mut worst_mixed) * 100.0).round() / 100.0),
    );
    serde_json::Value::Object(out)
}
