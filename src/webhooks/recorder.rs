//! Group commit of what delivery workers must write before settling a job: attempt
//! records ([`messages::Recorded`]) and holds ([`messages::Held`]), each kind by a
//! recorder of its own. Each delivery must be recorded before its job is settled, and
//! one commit per delivery made the database the bottleneck; instead the workers hand
//! their writes to one task that writes whatever has queued up in one statement and
//! answers each worker once it has committed. Under light load a batch is a single
//! write, so nothing waits for a timer.

use std::future::Future;

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
        let (tx, rx) = mpsc::channel(max_batch.max(1) * 4);
        tokio::spawn(run(pool, rx, max_batch.max(1)));
        Self { tx }
    }

    /// Writes one item; returns once it has committed.
    pub async fn record(&self, item: T) -> Result<(), RecordError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { item, reply })
            .await
            .map_err(|_| RecordError::Stopped)?;
        rx.await.map_err(|_| RecordError::Stopped)?
    }
}

async fn run<T: GroupWrite>(pool: PgPool, mut rx: mpsc::Receiver<Request<T>>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
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
