//! Group commit of what delivery workers must write before settling a job: attempt
//! records ([`messages::Recorded`]) and holds ([`messages::Held`]), each kind by a
//! recorder of its own. Each delivery must be recorded before its job is settled, and
//! one commit per delivery made the database the bottleneck; instead the workers hand
//! their writes to one task that writes whatever has queued up in one statement and
//! answers each worker once it has committed. Under light load a batch is a single
//! write, so a write that someone waits for never waits for a timer.
//!
//! A write nobody waits for ([`Recorder::record_patient`]: the attempt of a message
//! pulled from parking, which has no job in the broker to settle) may wait up to the
//! recorder's linger for others to share its commit, unless the batch fills or a
//! write that someone waits for joins it first. A slow endpoint's attempts end one at
//! a time, milliseconds apart; without the linger each took a statement and a commit
//! of its own.

use std::future::Future;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio::sync::{mpsc, oneshot};

use crate::store::messages::{self, Held, Parked, Recorded};

/// Why a write did not happen; the worker holds its job and tries again.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecordError {
    #[error("database: {0}")]
    Db(String),
    #[error("the recorder stopped")]
    Stopped,
}

/// Something written for many jobs in one statement.
pub trait GroupWrite: Send + Sync + 'static {
    fn write_all(
        conn: &mut PgConnection,
        batch: &[Self],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send
    where
        Self: Sized;
}

impl GroupWrite for Recorded {
    fn write_all(
        conn: &mut PgConnection,
        batch: &[Self],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send {
        messages::record_attempts(conn, batch)
    }
}

impl GroupWrite for Held {
    fn write_all(
        conn: &mut PgConnection,
        batch: &[Self],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send {
        messages::hold_many(conn, batch)
    }
}

impl GroupWrite for Parked {
    fn write_all(
        conn: &mut PgConnection,
        batch: &[Self],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send {
        messages::park_many(conn, batch)
    }
}

struct Request<T> {
    item: T,
    /// Nothing waits for this write but its own task: it may linger.
    patient: bool,
    reply: oneshot::Sender<Result<(), RecordError>>,
}

/// A handle to a recorder task. Cheap to clone; the task ends with the last handle.
pub struct Recorder<T> {
    tx: mpsc::Sender<Request<T>>,
}

impl<T> Clone for Recorder<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<T: GroupWrite> Recorder<T> {
    /// Starts the task (inside a Tokio runtime). `max_batch` bounds one statement.
    pub fn spawn(pool: PgPool, max_batch: usize) -> Self {
        Self::spawn_lingering(pool, max_batch, Duration::ZERO)
    }

    /// As [`Self::spawn`], with patient writes waiting up to `linger` for company.
    pub fn spawn_lingering(pool: PgPool, max_batch: usize, linger: Duration) -> Self {
        let (tx, rx) = mpsc::channel(max_batch.max(1) * 4);
        tokio::spawn(run(pool, rx, max_batch.max(1), linger));
        Self { tx }
    }

    /// Writes one item; returns once it has committed.
    pub async fn record(&self, item: T) -> Result<(), RecordError> {
        self.send(item, false).await
    }

    /// Writes one item that nothing but the caller waits for: it may wait up to the
    /// recorder's linger for other writes to share its commit. Returns once it has
    /// committed.
    pub async fn record_patient(&self, item: T) -> Result<(), RecordError> {
        self.send(item, true).await
    }

    async fn send(&self, item: T, patient: bool) -> Result<(), RecordError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request {
                item,
                patient,
                reply,
            })
            .await
            .map_err(|_| RecordError::Stopped)?;
        rx.await.map_err(|_| RecordError::Stopped)?
    }
}

/// Adds to `batch` (patient writes only) what comes within `linger`, until it holds
/// `max_batch` or a write that someone waits for.
async fn gather<T>(
    rx: &mut mpsc::Receiver<Request<T>>,
    batch: &mut Vec<Request<T>>,
    max_batch: usize,
    linger: Duration,
) {
    let until = tokio::time::Instant::now() + linger;
    let mut seen = 0;
    while batch.len() < max_batch && batch[seen..].iter().all(|r| r.patient) {
        seen = batch.len();
        tokio::select! {
            n = rx.recv_many(batch, max_batch - seen) => if n == 0 { return },
            _ = tokio::time::sleep_until(until) => return,
        }
    }
}

async fn run<T: GroupWrite>(
    pool: PgPool,
    mut rx: mpsc::Receiver<Request<T>>,
    max_batch: usize,
    linger: Duration,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        if !linger.is_zero() {
            gather(&mut rx, &mut batch, max_batch, linger).await;
        }
        let (items, replies): (Vec<T>, Vec<_>) = batch.drain(..).map(|r| (r.item, r.reply)).unzip();
        let result = match pool.acquire().await {
            Ok(mut conn) => T::write_all(&mut conn, &items).await,
            Err(e) => Err(e),
        }
        .map_err(|e| RecordError::Db(e.to_string()));
        for reply in replies {
            let _ = reply.send(result.clone());
        }
    }
}
