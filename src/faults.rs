//! Fault injection, for the tests that prove nothing is lost when a process dies at the
//! worst moment. Production code asks a [`Faults`] at each such point; the default,
//! [`NoFaults`], never fails, and only tests pass in one that does. No production struct
//! carries a test hook as a public field.

use std::fmt::Debug;
use std::sync::Arc;

/// The points where a step can be made to fail as if the process died right there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Point {
    /// The Discord syncer, after recording what it is about to give and before any
    /// Discord call.
    BeforeDiscord,
    /// The Discord syncer, after its Discord calls and before recording them.
    AfterDiscord,
    /// The outbox relay, after publishing a batch and before deleting its rows.
    AfterPublish,
    /// Webhook delivery, after the endpoint answered and before recording the attempt.
    AfterSend,
    /// Webhook delivery, a read of the targets of parked messages just pulled (a
    /// database failure there, not a crash).
    PulledRead,
    /// Webhook delivery, the answer to putting pulled messages back in parking, lost
    /// after the put-back committed (a connection that drops then).
    PutBackAnswer,
    /// Webhook delivery, a stopping puller handing back what it leaves parked (a
    /// database failure there, not a crash).
    HandBack,
}

/// Whether a step fails at a point.
pub trait Faults: Send + Sync + Debug {
    /// Asked once each time a step passes `point`; `true` makes it fail there.
    fn fails(&self, point: Point) -> bool;
}

/// No fault anywhere: what every process runs with.
#[derive(Debug, Default)]
pub struct NoFaults;

impl Faults for NoFaults {
    fn fails(&self, _: Point) -> bool {
        false
    }
}

/// Shared by the parts of one process.
pub type SharedFaults = Arc<dyn Faults>;

/// [`NoFaults`], shared.
pub fn none() -> SharedFaults {
    Arc::new(NoFaults)
}
