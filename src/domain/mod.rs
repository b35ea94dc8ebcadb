//! The domain: guildgate's values and rules, with no I/O. Nothing here imports sqlx,
//! lapin, reqwest or axum, reads a clock of its own or touches the network; the store
//! maps these types to SQL, the edges (ingest, the web, the Discord client) to and from
//! their wire formats.
//!
//! - [`ids`]: typed ids, and Discord's snowflakes.
//! - [`event`]: the payment events guildgate acts on.
//! - [`grant`]: a grant, its status and reasons, and its webhook types.
//! - [`decide`]: `(facts, event) -> effects`, what an event does to grants.
//! - [`plan`]: `(grant, entitlement, link, member, other grants) -> Discord calls`.
//! - [`compare`]: a server's members against the grants, as drift findings.
//! - [`retry`]: the one retry schedule of every queue.

pub mod compare;
pub mod decide;
pub mod event;
pub mod grant;
pub mod ids;
pub mod plan;
pub mod retry;

pub use grant::{Grant, GrantEventType, GrantStatus, RevocationReason};
pub use ids::Snowflake;

#[cfg(test)]
mod tests {
    /// No file of the domain (its tests aside) names an I/O crate, reads the clock or
    /// touches the file system, the network or the environment.
    #[test]
    fn the_domain_does_no_io() {
        let crates = [
            "sqlx", "lapin", "reqwest", "axum", "hyper", "tokio", "lettre",
        ];
        let calls = [
            "Utc::now",
            "Instant::now",
            "SystemTime::now",
            "std::fs",
            "std::net",
            "std::env",
        ];
        let files = crate::tests::sources("domain");
        let read = files.len();
        for (path, source) in files {
            let text = source.split("#[cfg(test)]").next().unwrap_or_default();
            let needles = crates
                .iter()
                .map(|c| format!("{c}::"))
                .chain(calls.iter().map(|c| c.to_string()));
            for needle in needles {
                assert!(
                    !text.contains(&needle),
                    "src/{} uses {needle}: the domain does no I/O",
                    path.display()
                );
            }
        }
        assert!(read >= 8, "read only {read} files of src/domain");
    }
}
