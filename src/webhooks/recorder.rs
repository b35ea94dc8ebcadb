//! Group commit of attempt records. Each delivery must be recorded before its job is
//! settled, and one commit per delivery made the database the bottleneck; instead the
//! workers hand their records to one task that writes whatever has queued up in one
//! statement and answers each worker once it has committed. Under light load a batch
//! is a single record, so nothing waits for a timer. Holds ([`messages::Held`]) go
//! the same way: a held message's job is acked only after its hold committed.

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::messages::{self, Held, Recorded};

/// Why a record was not written; the worker holds its job and tries again.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RecordError {
    #[error("database: {0}")]
    Db(String),
    #[error("the recorder stopped")]
    Stopped,
}

/// What a worker hands over.
#[derive(Clone, Debug)]
enum Write {
    Attempt(Recorded),
    Hold(Held),
}

struct Request {
    write: Write,
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
        self.submit(Write::Attempt(record)).await
    }

    /// Holds one message; returns once it has committed.
    pub async fn hold(&self, held: Held) -> Result<(), RecordError> {
        self.submit(Write::Hold(held)).await
    }

    async fn submit(&self, write: Write) -> Result<(), RecordError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { write, reply })
            .await
            .map_err(|_| RecordError::Stopped)?;
        rx.await.map_err(|_| RecordError::Stopped)?
    }
}

async fn run(pool: PgPool, mut rx: mpsc::Receiver<Request>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        let (mut records, mut holds) = (Vec::new(), Vec::new());
        for r in &batch {
            match &r.write {
                Write::Attempt(a) => records.push(a.clone()),
                Write::Hold(p) => holds.push(p.clone()),
            }
        }
        let result = write(&pool, &records, &holds)
            .await
            .map_err(|e| RecordError::Db(e.to_string()));
        for r in batch.drain(..) {
            let _ = r.reply.send(result.clone());
        }
    }
}

/// One statement for each kind present, in one transaction when both are (a statement
/// alone is its own transaction: no extra round trips on the busy path).
async fn write(pool: &PgPool, records: &[Recorded], holds: &[Held]) -> Result<(), sqlx::Error> {
    match (records.is_empty(), holds.is_empty()) {
        (_, true) => messages::record_attempts(&mut *pool.acquire().await?, records).await,
        (true, false) => messages::hold_many(&mut *pool.acquire().await?, holds).await,
        (false, false) => {
            let mut tx = pool.begin().await?;
            messages::record_attempts(&mut tx, records).await?;
            messages::hold_many(&mut tx, holds).await?;
            tx.commit().await
        }
    }
}
