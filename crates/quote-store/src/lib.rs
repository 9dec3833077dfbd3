//! The quote database: SQLite on flash, set up so that an acknowledged write survives a power cut.
//!
//! [`Database::open`] checks and migrates a database file once per process; [`Database::connect`]
//! hands out further [`Store`] connections to the same file. Several processes (the replicas)
//! share one file: WAL lets readers run beside one writer, and `busy_timeout` queues writers.
//!
//! Architecture invariant: this crate knows no HTTP. It validates its own invariants
//! ([`NewQuote::new`]) so that no caller can store a quote the schema would refuse.

mod db;
mod error;
mod migrate;
mod quote;
mod snapshot;

pub use db::{Database, OpenReport, Options, Store};
pub use error::{Error, ValidationError};
pub use migrate::{MIGRATIONS, Migration, latest_version};
pub use quote::{
    AUTHOR_MAX_CHARS, LIST_LIMIT_MAX, NewQuote, Page, Quote, QuoteId, TEXT_MAX_CHARS, seed_quotes,
};
pub use snapshot::{RestoreReport, SnapshotError, restore, snapshot};

#[cfg(test)]
mod tests;
