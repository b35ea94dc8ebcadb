//! The queue-depth gauge: how many messages wait in guildgate's queues.

use super::Broker;

/// How often [`sample_queue_depths`] samples.
pub const QUEUE_DEPTH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);

/// Samples the ready messages of guildgate's work and dead-letter queues into
/// `guildgate_queue_depth{queue=…}` every `interval` (passive declares, on a channel of
/// its own), until `shutdown`. A broker outage skips samples; it never ends the task.
pub async fn sample_queue_depths(
    broker: Broker,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    interval: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let names = broker.names().clone();
    let queues: Vec<String> = names
        .work_queues()
        .into_iter()
        .chain(names.dead_queues())
        .collect();
    loop {
        let sample = async {
            // `try_channel`, not `channel`: a sample is not worth waiting for the broker.
            if let Ok(ch) = broker.try_channel().await {
                for q in &queues {
                    match super::declared_state(&ch, q).await {
                        Ok(d) => {
                            metrics
                                .queue_depth
                                .get_or_create(&vec![("queue", q.clone())])
                                .set(i64::from(d.message_count()));
                        }
                        // A failed passive declare closes the channel; try again next time.
                        Err(e) => {
                            tracing::debug!(queue = %q, error = %e, "cannot sample the queue depth");
                            break;
                        }
                    }
                }
                let _ = super::bounded("channel.close", ch.close(200, "sampled".into())).await;
            }
        };
        // A sample waits on the broker: shutdown does not wait for it.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = sample => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
