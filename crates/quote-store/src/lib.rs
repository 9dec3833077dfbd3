//! The quote database: SQLite on flash, set up so that an acknowledged write survives a power cut;
//! or, with the `postgres` feature, a PostgreSQL server shared by a cluster's replicas.
//!
//! [`Database::open`] checks and migrates a database file once per process; [`Database::connect`]
//! hands out further [`Store`] connections to the same file. Several processes (the replicas)
//! share one file: WAL lets readers run beside one writer, and `busy_timeout` queues writers.
//!
//! [`Storage`] is the one interface the service uses, over either backend; [`Target`] is what
//! `--db` names (a path or a `postgres://` URL).
//!
//! Architecture invariant: this crate knows no HTTP. It validates its own invariants
//! ([`NewQuote::new`]) so that no caller can store a quote the schema would refuse.

mod db;
mod error;
mod migrate;
#[cfg(feature = "postgres")]
mod pg;
mod quote;
mod snapshot;
mod storage;

pub use db::{Database, OpenReport, Options, Store};
pub use error::{Error, TargetError, ValidationError};
pub use migrate::{MIGRATIONS, Migration, latest_version};
#[cfg(feature = "postgres")]
pub use pg::{PgStorage, PgTarget};
pub use quote::{
    AUTHOR_MAX_CHARS, LIST_LIMIT_MAX, NewQuote, Page, Quote, QuoteId, TEXT_MAX_CHARS, seed_quotes,
};
pub use snapshot::{RestoreReport, SnapshotError, restore, snapshot};
pub use storage::{SqliteStorage, Storage, Target};

#[cfg(test)]
mod tests;
