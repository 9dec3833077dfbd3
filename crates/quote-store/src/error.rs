//! Errors of the quote store, named after the operation that failed.

use std::path::PathBuf;

/// A quote that breaks the store's rules; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("`{field}` must not be empty")]
    Empty { field: &'static str },
    #[error("`{field}` is {len} characters long; the maximum is {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("`{field}` must not contain control characters other than newline and tab")]
    ControlCharacter { field: &'static str },
}

/// Everything that can go wrong with the database itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot configure database {path} ({setting}): {source}")]
    Configure {
        path: PathBuf,
        setting: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "database {path} is corrupt and will not be served (integrity check said: {details}); \
         restore it from a backup or move it aside to start empty"
    )]
    Corrupt { path: PathBuf, details: String },
    #[error(
        "database {path} has schema version {found}, newer than the {known} this build knows; \
         refusing to run an older release on a newer database"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: u32,
        known: u32,
    },
    #[error("migration {version} ({name}) failed on {path}: {source}")]
    Migrate {
        path: PathBuf,
        version: u32,
        name: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the storage is full; nothing was written ({op})")]
    Full { op: &'static str },
    #[error(
        "the database stayed locked by another process for longer than the busy timeout ({op})"
    )]
    Busy { op: &'static str },
    #[error("database query failed ({op}): {source}")]
    Query {
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    /// The database server did not answer (connection refused, closed or timed out). Nothing
    /// is known to have been written; the caller may retry once it is reachable again.
    #[error("the database is unreachable ({op}): {reason}")]
    Unreachable { op: &'static str, reason: String },
    #[error("the database connections are closing ({op})")]
    Closing { op: &'static str },
    #[error("a database task ended abnormally ({op})")]
    Task { op: &'static str },
    #[cfg(feature = "postgres")]
    #[error("database query failed ({op}): {}", pg_message(source))]
    Postgres {
        op: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[cfg(feature = "postgres")]
    #[error(
        "migration {version} ({name}) failed on {database}: {}",
        pg_message(source)
    )]
    MigratePostgres {
        database: String,
        version: u32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// A `--db` value that names no usable database. Never repeats a password.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("the PostgreSQL URL in --db is not valid: {reason}")]
    BadUrl { reason: String },
    #[error("cannot read the database password file {path}: {source}")]
    PasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--db names a PostgreSQL database, but this build has no PostgreSQL support \
         (cargo feature `postgres` of quote-service)"
    )]
    PostgresUnsupported,
    #[error(
        "`{command}` works on a SQLite file only; for a PostgreSQL database use \
         pg_dump and pg_restore"
    )]
    SqliteOnly { command: &'static str },
}

impl Error {
    /// Classifies a query error: a full disk and a lock timeout are conditions a caller
    /// reports differently from a bug.
    pub(crate) fn query(op: &'static str, source: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode;
        match source.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => Error::Full { op },
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Error::Busy { op },
            _ => Error::Query { op, source },
        }
    }

    /// Whether the database could not be reached at all (a retry may succeed), as opposed
    /// to a database that answered with an error.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Unreachable { .. })
    }
}

/// The server's own words for an error it reported ("FATAL: password authentication failed
/// for user ..."), which tokio-postgres's `Display` reduces to "db error".
#[cfg(feature = "postgres")]
fn pg_message(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map_or_else(|| error.to_string(), ToString::to_string)
}
