//! Ingest of payment events: [`decode()`] turns AMQP bytes into the domain's
//! [`Event`](crate::domain::event::Event), [`consumer`] takes them off the queue and
//! [`apply`] writes what they mean.

pub mod apply;
pub mod consumer;
pub mod decode;
pub mod retention;

pub use decode::{DecodeError, Decoded, decode};
