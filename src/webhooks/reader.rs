//! Group read of delivery targets. Every job reads its message and endpoint before it
//! is sent, and one query per job (each with its own pool connection) made the read the
//! largest share of the database's work; instead the workers hand their message ids to
//! one task that reads whatever has queued up with one query and answers each worker.
//! Under light load a batch is a single id, so nothing waits for a timer. (Parked
//! messages are read by the pull that takes them, [`super::parking`], and come here
//! only when that read is more than a second old or failed.)

use std::collections::HashMap;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::store::messages::{self, DeliveryTarget};

/// Why a target was not read; the worker holds its job and tries again.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error("database: {0}")]
    Db(String),
    #[error("the reader stopped")]
    Stopped,
}

struct Request {
    message_id: String,
    reply: oneshot::Sender<Result<Option<DeliveryTarget>, ReadError>>,
}

/// A handle to the reader task. Cheap to clone; the task ends with the last handle.
#[derive(Clone)]
pub struct Reader {
    tx: mpsc::Sender<Request>,
}

impl Reader {
    /// Starts the task (inside a Tokio runtime). `max_batch` bounds one query.
    pub fn spawn(pool: PgPool, max_batch: usize) -> Self {
        let (tx, rx) = mpsc::channel(max_batch.max(1) * 4);
        tokio::spawn(run(pool, rx, max_batch.max(1)));
        Self { tx }
    }

    /// The message and its endpoint; `None` when the message does not exist (its
    /// endpoint was deleted, with its messages).
    pub async fn target(&self, message_id: &str) -> Result<Option<DeliveryTarget>, ReadError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request {
                message_id: message_id.to_string(),
                reply,
            })
            .await
            .map_err(|_| ReadError::Stopped)?;
        rx.await.map_err(|_| ReadError::Stopped)?
    }
}

async fn run(pool: PgPool, mut rx: mpsc::Receiver<Request>, max_batch: usize) {
    let mut batch = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        let ids: Vec<String> = batch.iter().map(|r| r.message_id.clone()).collect();
        match read(&pool, &ids).await {
            Ok(mut found) => {
                for r in batch.drain(..) {
                    // A message asked for twice (a duplicate job) gets a copy each.
                    let t = found.get(&r.message_id).cloned();
                    let _ = r.reply.send(Ok(t));
                }
                found.clear();
            }
            Err(e) => {
                for r in batch.drain(..) {
                    let _ = r.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

async fn read(pool: &PgPool, ids: &[String]) -> Result<HashMap<String, DeliveryTarget>, ReadError> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| ReadError::Db(e.to_string()))?;
    let targets = messages::targets(&mut conn, ids)
        .await
        .map_err(|e| ReadError::Db(e.to_string()))?;
    Ok(targets.into_iter().map(|t| (t.id.clone(), t)).collect())
}
