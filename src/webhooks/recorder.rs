//! Group commit of attempt records. Each delivery must be recorded before its job is
//! settled, and one commit per delivery made the database the bottleneck; instead the
//! workers hand their records to one task that writes whatever has queued up in one
//! statement and answers each worker once it has committed. Under light load a batch
//! is a single record, so nothing waits for a timer.

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::messages::{self, Recorded};

/// Why a record was not written; the worker holds its job and tries again.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecordError {
    #[error("database: {0}")]
    Db(String),
    #[error("the recorder stopped")]
    Stopped,
}

struct Request {
    record: Recorded,
    reply: oneshot::Sender<Result<(), RecordError>>,
}

/// A handle to the recorder task. Cheap to clone; the task ends with the last handle.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Request>,
}

impl Recorder {
    /// Starts the task (inside a Tokio runtime). `max_batch` bounds one statement.
    pub fn spawn(pool: PgPool, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::channel(max_batch.max(1) * 4);
        tokio::spawn(run(pool, rx, max_batch.max(1)));
        Self { tx }
    }

    /// Records one attempt; returns once it has committed.
    pub async fn record(&self, record: Recorded) -> Result<(), RecordError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { record, reply })
            .await
            .map_err(|_| RecordError::Stopped)?;
        rx.await.map_err(|_| RecordError::Stopped)?
    }
}

async fn run(pool: PgPool, mut rx: mpsc::Receiver<Request>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        let records: Vec<Recorded> = batch.iter().map(|r| r.record.clone()).collect();
        let result = write(&pool, &records).await;
        for r in batch.drain(..) {
            let _ = r.reply.send(result.clone());
        }
    }
}

async fn write(pool: &PgPool, records: &[Recorded]) -> Result<(), RecordError> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| RecordError::Db(e.to_string()))?;
    messages::record_attempts(&mut conn, records)
        .await
        .map_err(|e| RecordError::Db(e.to_string()))
}
