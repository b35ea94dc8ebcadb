//! RabbitMQ: the connection every task shares, confirmed publishing, and topology.
//!
//! Recovery is ours, not lapin's: when the connection breaks, every task that used it
//! sees an error, asks [`Broker::channel`] again, and that call reconnects (with
//! backoff) and re-declares the topology once for everybody. Deliveries that were in
//! flight are redelivered by the broker, and every consumer is idempotent.
//!
//! With a cluster (`amqp.urls`) the connection goes to one node, picked at random so
//! that replicas spread over the nodes; when it breaks, the reconnect tries the next
//! node first, then the others in turn.

pub mod depths;
pub mod topology;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use secrecy::ExposeSecret;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
pub use topology::Names;

/// Header carrying a dead-letter reason (human-readable).
pub const REASON_HEADER: &str = "x-guildgate-reason";
/// Header carrying a dead-letter reason code (stable label).
pub const REASON_CODE_HEADER: &str = "x-guildgate-reason-code";
/// Header carrying the attempt count of a retried job.
pub const ATTEMPT_HEADER: &str = "x-guildgate-attempt";
/// Header counting how often in a row a webhook job was deferred without an attempt
/// (absent: never).
pub const DEFERRALS_HEADER: &str = "x-guildgate-deferrals";
/// Header counting how often a message was replayed from a dead-letter queue.
pub const REPLAYS_HEADER: &str = "x-guildgate-replays";
/// Header naming the queue a message was dead-lettered from.
pub const SOURCE_QUEUE_HEADER: &str = "x-guildgate-source-queue";
/// Header keeping a payment event's original routing key (its type) across a replay,
/// which goes through the default exchange.
pub const ROUTING_KEY_HEADER: &str = "x-guildgate-routing-key";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused (nacked) a publish to {0}")]
    Nacked(String),
    #[error("shutting down")]
    ShuttingDown,
    #[error("the consumer was cancelled or its channel closed")]
    ConsumerEnded,
}

/// The shared broker connection. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    settings: Settings,
    names: Names,
    /// The shared connection, with its generation.
    conn: Mutex<Option<(Connection, Generation)>>,
    /// The generation the next connection gets.
    generations: std::sync::atomic::AtomicU64,
    /// The nodes to connect to (one without a cluster).
    nodes: Vec<secrecy::SecretString>,
    /// The node a connect tries first.
    next_node: std::sync::atomic::AtomicUsize,
    /// Set once the topology was declared on the current connection (readiness).
    ready: std::sync::atomic::AtomicBool,
    /// Declare the topology on every (re)connect.
    declare: bool,
}

impl Broker {
    pub fn new(settings: &Settings, name: &str) -> Self {
        Self::build(settings, name, true)
    }

    /// A broker that never declares topology (`serve --no-declare`, read-only tools).
    pub fn without_declare(settings: &Settings, name: &str) -> Self {
        Self::build(settings, name, false)
    }

    fn build(settings: &Settings, name: &str, declare: bool) -> Self {
        let nodes = settings.amqp.nodes();
        Self {
            inner: Arc::new(Inner {
                name: name.to_string(),
                settings: settings.clone(),
                names: Names::from_settings(settings),
                conn: Mutex::new(None),
                generations: 0.into(),
                next_node: rand::random_range(0..nodes.len()).into(),
                nodes,
                ready: false.into(),
                declare,
            }),
        }
    }

    pub fn names(&self) -> &Names {
        &self.inner.names
    }

    /// Connected, with the topology declared.
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A new channel on the current connection, connecting first if needed (once; the
    /// error is returned to the caller, which decides how to wait).
    pub async fn try_channel(&self) -> Result<Channel, lapin::Error> {
        self.open_channel().await.map(|(ch, _)| ch)
    }

    /// [`Self::try_channel`], with the generation of the connection the channel is on.
    async fn open_channel(&self) -> Result<(Channel, Generation), lapin::Error> {
        let mut guard = self.inner.conn.lock().await;
        if let Some((conn, generation)) = guard.as_ref() {
            if conn.status().connected() {
                match bounded("channel.open", conn.create_channel()).await {
                    Ok(ch) => return Ok((ch, *generation)),
                    // The broker blocked publishers (a memory or disk alarm) and stopped
                    // reading: a new connection would be held the same way.
                    Err(e) if conn.status().blocked() => return Err(e),
                    Err(e) => tracing::warn!(error = %e, "channel creation failed; reconnecting"),
                }
            }
            self.inner
                .ready
                .store(false, std::sync::atomic::Ordering::Relaxed);
            if let Some((conn, _)) = guard.take() {
                close_in_background(conn);
            }
            // The node was lost: the next one is tried first.
            self.inner
                .next_node
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let conn = self.connect_some_node().await?;
        let prepared = async {
            let ch = bounded("channel.open", conn.create_channel()).await?;
            if self.inner.declare {
                // Many round trips, some creating quorum queues: bounded as a whole,
                // generously.
                bounded_for(
                    DECLARE_TIMEOUT,
                    "declaring the topology",
                    topology::declare(&ch, &self.inner.names, &self.inner.settings),
                )
                .await?;
            }
            Ok::<_, lapin::Error>(ch)
        }
        .await;
        let ch = match prepared {
            Ok(ch) => ch,
            Err(e) => {
                // A node that accepts connections but cannot serve (a paused minority,
                // a node still starting): the next try starts elsewhere.
                self.inner
                    .next_node
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                close_in_background(conn);
                return Err(e);
            }
        };
        tracing::info!(
            connection = %self.inner.name,
            node = %self.node(),
            declared = self.inner.declare,
            "connected to RabbitMQ"
        );
        self.inner
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let generation = Generation(
            self.inner
                .generations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        *guard = Some((conn, generation));
        Ok((ch, generation))
    }

    /// The node a connection goes to now (`host:port`): the one connected to, or the
    /// one the next connect tries first.
    pub fn node(&self) -> String {
        crate::config::node_label(&self.inner.nodes[self.current_node()])
    }

    fn current_node(&self) -> usize {
        self.inner
            .next_node
            .load(std::sync::atomic::Ordering::Relaxed)
            % self.inner.nodes.len()
    }

    /// A connection to the first node that answers, from [`Self::current_node`] on,
    /// each node tried once; the error of the last one when none does. Each try is
    /// bounded, so a half-open network path cannot hang every task behind the lock.
    async fn connect_some_node(&self) -> Result<Connection, lapin::Error> {
        let nodes = &self.inner.nodes;
        let per_node = (CONNECT_TIMEOUT / nodes.len() as u32).max(MIN_NODE_TIMEOUT);
        let first = self.current_node();
        let mut last = None;
        for i in 0..nodes.len() {
            let k = (first + i) % nodes.len();
            let props = ConnectionProperties::default()
                .with_connection_name(LongString::from(self.inner.name.as_str()));
            let tried = bounded_for(
                per_node,
                "the connect",
                Connection::connect(nodes[k].expose_secret(), props),
            )
            .await;
            match tried {
                Ok(conn) => {
                    self.inner
                        .next_node
                        .store(k, std::sync::atomic::Ordering::Relaxed);
                    return Ok(conn);
                }
                Err(e) => {
                    if nodes.len() > 1 {
                        tracing::warn!(
                            node = %crate::config::node_label(&nodes[k]),
                            error = %e,
                            "RabbitMQ node unreachable; trying the next"
                        );
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one node"))
    }

    /// A channel, waiting with backoff (forever, or until `shutdown`) while the broker is
    /// unreachable. An outage pauses work; it never fails it.
    pub async fn channel(&self, shutdown: &CancellationToken) -> Result<Channel, BrokerError> {
        self.channel_on(shutdown).await.map(|(ch, _)| ch)
    }

    /// [`Self::channel`], with the generation of the connection the channel is on.
    async fn channel_on(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<(Channel, Generation), BrokerError> {
        let mut backoff = reconnect_backoff();
        loop {
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return Err(BrokerError::ShuttingDown),
                opened = self.open_channel() => opened,
            };
            match opened {
                Ok(opened) => return Ok(opened),
                Err(e) => {
                    let wait = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = %e, retry_in = ?wait, "RabbitMQ unavailable");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(BrokerError::ShuttingDown),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// A channel in publisher-confirm mode.
    pub async fn confirm_channel(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Channel, BrokerError> {
        loop {
            let (ch, generation) = self.channel_on(shutdown).await?;
            let selected = tokio::select! {
                _ = shutdown.cancelled() => return Err(BrokerError::ShuttingDown),
                r = bounded("confirm.select", ch.confirm_select(ConfirmSelectOptions::default())) => r,
            };
            match selected {
                Ok(()) => return Ok(ch),
                Err(e) => {
                    tracing::warn!(error = %e, "confirm.select failed; retrying");
                    self.stopped_answering(&e, generation).await;
                }
            }
        }
    }

    /// Subscribes to `queue` with `prefetch` unacknowledged deliveries, retrying until
    /// it works or `shutdown`: the consuming channel, its consumer, and a confirm
    /// channel for what the consumer publishes (dead letters, retries, fan-out).
    pub async fn subscribe(
        &self,
        queue: &str,
        consumer_tag: &str,
        prefetch: u16,
        shutdown: &CancellationToken,
    ) -> Result<Subscribed, BrokerError> {
        use lapin::options::{BasicConsumeOptions, BasicQosOptions};
        loop {
            let (ch, generation) = self.channel_on(shutdown).await?;
            let publisher = self.confirm_channel(shutdown).await?;
            let r = async {
                bounded(
                    "basic.qos",
                    ch.basic_qos(prefetch, BasicQosOptions::default()),
                )
                .await?;
                // A quorum queue answers a consume once it has a leader: an election
                // takes seconds, so this one gets longer.
                bounded_for(
                    CONSUME_TIMEOUT,
                    "basic.consume",
                    ch.basic_consume(
                        queue.into(),
                        consumer_tag.into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    ),
                )
                .await
            };
            let r = tokio::select! {
                _ = shutdown.cancelled() => return Err(BrokerError::ShuttingDown),
                r = r => r,
            };
            match r {
                Ok(consumer) => {
                    return Ok(Subscribed {
                        channel: ch,
                        consumer,
                        publisher,
                        generation,
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot subscribe to {queue}; retrying");
                    self.stopped_answering(&e, generation).await;
                    tokio::select! {
                        _ = shutdown.cancelled() => return Err(BrokerError::ShuttingDown),
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }

    /// Whether `ch` still answers: a passive declare of `queue` on it, bounded. A
    /// channel whose connection stopped carrying the broker's answers without breaking
    /// fails this within [`RPC_TIMEOUT`], where its consumer would otherwise wait
    /// until the missed heartbeats are noticed (twice the negotiated interval), and
    /// the connection is replaced. A connection the
    /// broker blocked for an alarm passes: it answers again once the alarm clears.
    pub async fn probe(
        &self,
        ch: &Channel,
        generation: Generation,
        queue: &str,
    ) -> Result<(), lapin::Error> {
        match declared_state(ch, queue).await {
            Ok(_) => Ok(()),
            Err(e) if is_timed_out(&e) && !self.stopped_answering(&e, generation).await => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// After a round trip on a channel of connection `generation` failed with `e`:
    /// whether that connection is to be taken for one that stopped answering. Only a
    /// timeout says so, and not while the broker blocks the connection for an alarm
    /// (it stops reading until the alarm clears; a new connection would fare no
    /// better). If it is still the shared connection, it is forgotten, so the next
    /// channel comes from a new one, and closed in the background; if it was
    /// replaced already, the answer is yes and the newer one is left alone.
    async fn stopped_answering(&self, e: &lapin::Error, generation: Generation) -> bool {
        if !is_timed_out(e) {
            return false;
        }
        let mut guard = self.inner.conn.lock().await;
        match guard.as_ref() {
            Some((conn, current)) if *current == generation => {
                if conn.status().blocked() {
                    return false;
                }
            }
            _ => return true,
        }
        let (conn, _) = guard.take().expect("checked above");
        drop(guard);
        tracing::warn!(error = %e, "RabbitMQ connection stopped answering; reconnecting");
        self.inner
            .ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        close_in_background(conn);
        true
    }

    /// Closes the connection (tests, shutdown).
    pub async fn close(&self) {
        if let Some((conn, _)) = self.inner.conn.lock().await.take() {
            // Bounded: a connection that broke may never answer the close.
            let _ =
                tokio::time::timeout(Duration::from_secs(5), conn.close(200, "bye".into())).await;
        }
    }
}

/// Which connection of a [`Broker`] a channel was opened on: each connection gets the
/// next number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Generation(u64);

/// A subscription: the consuming channel, its consumer, a confirm channel for what
/// the consumer publishes (dead letters, retries, fan-out), and the connection the
/// consuming channel is on.
pub struct Subscribed {
    pub channel: Channel,
    pub consumer: lapin::Consumer,
    pub publisher: Channel,
    pub generation: Generation,
}

/// Closes a connection that was given up, without waiting: if the broker still
/// listens, it gets its unacked deliveries back at once.
fn close_in_background(conn: Connection) {
    tokio::spawn(async move {
        let _ = bounded("connection.close", conn.close(200, "given up".into())).await;
    });
}

/// How long one round trip on a channel (opening it, QoS, a probe, an ack) may take
/// before the connection is taken for one that stopped answering.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// A consume on a quorum queue waits for its leader (an election takes seconds).
const CONSUME_TIMEOUT: Duration = Duration::from_secs(30);
/// A publisher confirm waits for a majority of the queue's replicas to write it.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Declaring the whole topology, quorum queues created on a fresh cluster included.
const DECLARE_TIMEOUT: Duration = Duration::from_secs(60);

/// `rpc`, failing with a timed-out I/O error after [`RPC_TIMEOUT`]: a connection
/// that stopped answering (or an I/O loop that ended without failing what it had
/// queued) must not hold a task, or the connection lock, forever.
pub async fn bounded<T>(
    what: &'static str,
    rpc: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, lapin::Error> {
    bounded_for(RPC_TIMEOUT, what, rpc).await
}

async fn bounded_for<T>(
    limit: Duration,
    what: &'static str,
    rpc: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, lapin::Error> {
    tokio::time::timeout(limit, rpc)
        .await
        .unwrap_or_else(|_| Err(timed_out(what)))
}

/// `queue` as the broker holds it (its message count, its consumers): a passive
/// declare on `ch`, bounded like every round trip. A queue that does not exist fails
/// it, and closes `ch`.
pub async fn declared_state(ch: &Channel, queue: &str) -> Result<lapin::Queue, lapin::Error> {
    bounded(
        "queue.declare (passive)",
        ch.queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
}

fn timed_out(what: &str) -> lapin::Error {
    lapin::Error::from(lapin::ErrorKind::IOError(Arc::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("RabbitMQ did not answer {what} in time"),
    ))))
}

fn is_timed_out(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::IOError(io) if io.kind() == std::io::ErrorKind::TimedOut)
}

/// How long one connect may take in all, shared by the nodes tried...
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// ...but at least this per node.
const MIN_NODE_TIMEOUT: Duration = Duration::from_secs(3);

/// Exponential from 100 ms to 5 s, never giving up.
pub fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// A message to publish to one of guildgate's own queues (through the default exchange).
#[derive(Clone, Debug)]
pub struct Outgoing<'a> {
    pub exchange: Cow<'a, str>,
    pub routing_key: Cow<'a, str>,
    pub message_id: &'a str,
    pub body: &'a [u8],
    pub headers: FieldTable,
    pub kind: Option<&'a str>,
}

impl<'a> Outgoing<'a> {
    pub fn to_queue(queue: &'a str, message_id: &'a str, body: &'a [u8]) -> Self {
        Self {
            exchange: Cow::Borrowed(""),
            routing_key: Cow::Borrowed(queue),
            message_id,
            body,
            headers: FieldTable::default(),
            kind: None,
        }
    }

    /// A parked copy of a message that came from `source_queue`: published through the
    /// dead-letter exchange to `<source_queue>.dead`, keeping `headers` and adding why
    /// (`x-guildgate-reason`, `x-guildgate-reason-code`), from where and when. The
    /// caller publishes it with [`publish_confirmed`] before acking the original, so a
    /// crash in between leaves a copy in both places, never in neither.
    pub fn parked(
        names: &Names,
        source_queue: &str,
        message_id: &'a str,
        body: &'a [u8],
        headers: FieldTable,
        code: &str,
        reason: &str,
    ) -> Self {
        Self {
            exchange: Cow::Owned(names.dead_letter_exchange()),
            routing_key: Cow::Owned(Names::dead(source_queue)),
            message_id,
            body,
            headers,
            kind: None,
        }
        .header(REASON_HEADER, header_str(reason))
        .header(REASON_CODE_HEADER, header_str(code))
        .header(SOURCE_QUEUE_HEADER, header_str(source_queue))
        .header(
            "x-guildgate-dead-at",
            AMQPValue::LongLongInt(chrono::Utc::now().timestamp()),
        )
    }

    pub fn header(mut self, key: &str, value: AMQPValue) -> Self {
        self.headers.insert(ShortString::from(key), value);
        self
    }

    /// Keeps the replay count (`x-guildgate-replays`) of the delivery this message
    /// continues, if it has one: a job republished to a retry tier is still the message
    /// an operator replayed, and the replay ceiling of `guildgate dlq replay` counts
    /// across its rounds.
    pub fn carrying_replays(self, from: Option<&FieldTable>) -> Self {
        match header_int(from, REPLAYS_HEADER) {
            Some(n) => self.header(REPLAYS_HEADER, AMQPValue::LongLongInt(n)),
            None => self,
        }
    }
}

/// Publishes persistent messages on a confirm channel and waits until the broker has
/// taken responsibility for all of them (acked). A nack or a returned (unroutable)
/// message is an error: the caller keeps its copy and retries.
pub async fn publish_confirmed(ch: &Channel, messages: &[Outgoing<'_>]) -> Result<(), BrokerError> {
    let mut confirms = Vec::with_capacity(messages.len());
    for m in messages {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id(m.message_id.into())
            .with_headers(m.headers.clone());
        if let Some(kind) = m.kind {
            props = props.with_type(kind.into());
        }
        let confirm = ch
            .basic_publish(
                m.exchange.as_ref().into(),
                m.routing_key.as_ref().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                m.body,
                props,
            )
            .await?;
        confirms.push((m.routing_key.as_ref(), confirm));
    }
    for (rk, confirm) in confirms {
        // Each answer bounded: a connection that stopped carrying the broker's answers
        // fails the publish (the caller keeps its copy and publishes it again, with
        // the same id) instead of holding it forever.
        let c = bounded_for(CONFIRM_TIMEOUT, "a publisher confirm", confirm).await?;
        if !c.is_ack() || c.take_message().is_some() {
            return Err(BrokerError::Nacked(rk.to_string()));
        }
    }
    Ok(())
}

/// A message's AMQP `message_id`, if it has one.
pub fn message_id(props: &BasicProperties) -> Option<String> {
    props.message_id().as_ref().map(|m| m.to_string())
}

/// A string header value.
pub fn header_str(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

/// Reads a header as text, whichever string type the publisher used.
pub fn header_text(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    let v = headers?.inner().get(key)?;
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Reads an integer header.
pub fn header_int(headers: Option<&FieldTable>, key: &str) -> Option<i64> {
    let v = headers?.inner().get(key)?;
    match v {
        AMQPValue::LongLongInt(i) => Some(*i),
        AMQPValue::LongInt(i) => Some(*i as i64),
        AMQPValue::ShortInt(i) => Some(*i as i64),
        AMQPValue::LongUInt(i) => Some(*i as i64),
        AMQPValue::ShortShortInt(i) => Some(*i as i64),
        _ => None,
    }
}
