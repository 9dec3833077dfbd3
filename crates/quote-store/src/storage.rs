//! The one storage interface the service talks to, over either backend: an embedded SQLite
//! file (the device) or a PostgreSQL server (the cluster).
//!
//! [`Storage`] is an enum rather than a trait object: two backends, known at build time, and
//! async methods without boxing. Both keep the same invariants (see ARCHITECTURE.md):
//! an `Ok` from a write means it is committed and durable, ids are never reused, pages are
//! keyset-ordered by id, and validation happens before either is reached ([`NewQuote`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::error::TargetError;
use crate::quote::{NewQuote, Page, Quote, QuoteId};
use crate::{Database, Error, Store};

/// Where the data lives, as `--db` names it: a file path, or a `postgres://` URL.
#[derive(Clone)]
pub enum Target {
    Sqlite(PathBuf),
    #[cfg(feature = "postgres")]
    Postgres(Box<crate::pg::PgTarget>),
}

impl Target {
    /// Parses a `--db` value. `postgres://` and `postgresql://` URLs (libpq syntax) name a
    /// PostgreSQL database, anything else a SQLite file. The password comes from the URL, or
    /// from `password_file` (a mounted Kubernetes Secret) when given; the file wins.
    pub fn parse(db: &str, password_file: Option<&Path>) -> Result<Target, TargetError> {
        if !(db.starts_with("postgres://") || db.starts_with("postgresql://")) {
            return Ok(Target::Sqlite(PathBuf::from(db)));
        }
        #[cfg(feature = "postgres")]
        {
            crate::pg::PgTarget::parse(db, password_file).map(|pg| Target::Postgres(Box::new(pg)))
        }
        #[cfg(not(feature = "postgres"))]
        {
            let _ = password_file;
            Err(TargetError::PostgresUnsupported)
        }
    }

    /// The SQLite file, or [`TargetError::SqliteOnly`] naming `command` (snapshot, restore).
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))]
    pub fn sqlite_file(&self, command: &'static str) -> Result<&Path, TargetError> {
        match self {
            Target::Sqlite(path) => Ok(path),
            #[cfg(feature = "postgres")]
            Target::Postgres(_) => Err(TargetError::SqliteOnly { command }),
        }
    }
}

/// The path, or the URL without its password: safe to log.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Sqlite(path) => write!(f, "{}", path.display()),
            #[cfg(feature = "postgres")]
            Target::Postgres(pg) => write!(f, "{pg}"),
        }
    }
}

/// Same as [`Display`](fmt::Display): a password never reaches a `{:?}` either.
impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Target({self})")
    }
}

/// A migrated database, shared by every request of one replica. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Storage {
    Sqlite(SqliteStorage),
    #[cfg(feature = "postgres")]
    Postgres(crate::pg::PgStorage),
}

impl Storage {
    /// SQLite: `connections` is how many queries may run at once.
    pub fn sqlite(database: Database, connections: usize) -> Storage {
        Storage::Sqlite(SqliteStorage {
            database: Arc::new(database),
            idle: Arc::new(Mutex::new(Vec::new())),
            permits: Arc::new(Semaphore::new(connections.max(1))),
            writer: Arc::new(Semaphore::new(1)),
        })
    }

    /// Whether the database lives inside this process (SQLite). A remote database's outage
    /// says nothing about this process's health; a stuck local file does.
    pub fn is_embedded(&self) -> bool {
        matches!(self, Storage::Sqlite(_))
    }

    /// Stores a quote. When this returns `Ok`, the quote is committed and durable.
    pub async fn create(&self, quote: &NewQuote) -> Result<Quote, Error> {
        match self {
            Storage::Sqlite(s) => {
                let quote = quote.clone();
                s.write(move |store| store.create(&quote)).await
            }
            #[cfg(feature = "postgres")]
            Storage::Postgres(p) => p.create(quote).await,
        }
    }

    pub async fn get(&self, id: QuoteId) -> Result<Option<Quote>, Error> {
        match self {
            Storage::Sqlite(s) => s.read(move |store| store.get(id)).await,
            #[cfg(feature = "postgres")]
            Storage::Postgres(p) => p.get(id).await,
        }
    }

    /// Quotes with an id greater than `after`, in id order; `limit` is clamped to
    /// 1..=[`crate::LIST_LIMIT_MAX`].
    pub async fn list(&self, after: Option<QuoteId>, limit: u32) -> Result<Page, Error> {
        match self {
            Storage::Sqlite(s) => s.read(move |store| store.list(after, limit)).await,
            #[cfg(feature = "postgres")]
            Storage::Postgres(p) => p.list(after, limit).await,
        }
    }

    /// Deletes a quote; `false` if there was none with that id.
    pub async fn delete(&self, id: QuoteId) -> Result<bool, Error> {
        match self {
            Storage::Sqlite(s) => s.write(move |store| store.delete(id)).await,
            #[cfg(feature = "postgres")]
            Storage::Postgres(p) => p.delete(id).await,
        }
    }

    /// A quote drawn uniformly at random, or `None` if there are none.
    pub async fn random(&self) -> Result<Option<Quote>, Error> {
        match self {
            Storage::Sqlite(s) => s.read(|store| store.random()).await,
            #[cfg(feature = "postgres")]
            Storage::Postgres(p) => p.random().await,
        }
    }

    pub async fn count(&self) -> Result<i64, Error> {
        match self {
            Storage::Sqlite(s) => s.read(|store| store.count()).await,
            #[cfg(feature = "postgres")]
            Storage::Postgres(p) => p.count().await,
        }
    }

    /// A cheap query that proves the database answers.
    pub async fn ping(&self) -> Result<(), Error> {
        match self {
            Storage::Sqlite(s) => s.read(|store| store.ping()).await,
            #[cfg(feature = "postgres")]
            Storage::Postgres(p) => p.ping().await,
        }
    }
}

/// A small pool of SQLite connections: a connection is not shared between threads, so each
/// query borrows one on the blocking pool, and a semaphore bounds how many run at once.
/// Writes of this process also queue on one writer permit, in order, instead of competing
/// for SQLite's file lock, whose busy handler sleeps and retries.
#[derive(Debug, Clone)]
pub struct SqliteStorage {
    database: Arc<Database>,
    idle: Arc<Mutex<Vec<Store>>>,
    permits: Arc<Semaphore>,
    writer: Arc<Semaphore>,
}

impl SqliteStorage {
    async fn read<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, Error> + Send + 'static,
    {
        self.run(None, f).await
    }

    async fn write<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, Error> + Send + 'static,
    {
        let writer = Arc::clone(&self.writer)
            .acquire_owned()
            .await
            .map_err(|_| Error::Closing { op: "write" })?;
        self.run(Some(writer), f).await
    }

    async fn run<T, F>(
        &self,
        writer: Option<tokio::sync::OwnedSemaphorePermit>,
        f: F,
    ) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&mut Store) -> Result<T, Error> + Send + 'static,
    {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| Error::Closing { op: "query" })?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permits = (permit, writer);
            let pooled = this.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let mut store = match pooled {
                Some(store) => store,
                None => this.database.connect()?,
            };
            let result = f(&mut store);
            this.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(store);
            result
        })
        .await
        .map_err(|_| Error::Task { op: "query" })?
    }
}

#[cfg(all(test, feature = "postgres"))]
mod tests {
    use super::*;

    #[test]
    fn a_target_never_shows_its_password() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "from-the-file\n").unwrap();
        for (url, file) in [
            (
                "postgres://quote:in-the-url@db.example:5433/quotes?sslmode=disable",
                None,
            ),
            (
                "postgresql://quote@db.example:5433/quotes",
                Some(file.as_path()),
            ),
        ] {
            let target = Target::parse(url, file).unwrap();
            let shown = format!("{target} {target:?}");
            assert!(
                shown.contains("postgres://quote@db.example:5433/quotes"),
                "{shown}"
            );
            assert!(
                !shown.contains("in-the-url") && !shown.contains("from-the-file"),
                "{shown}"
            );
        }
    }

    #[test]
    fn a_malformed_url_is_refused_without_repeating_it() {
        let err = Target::parse("postgres://quote:hunter2@db:notaport/quotes", None).unwrap_err();
        assert!(matches!(err, TargetError::BadUrl { .. }), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn anything_but_a_postgres_url_is_a_sqlite_file() {
        for db in [
            "./data/quotes.db",
            "/var/lib/quote/q.db",
            "postgres.db",
            "mysql://x",
        ] {
            assert!(
                matches!(Target::parse(db, None), Ok(Target::Sqlite(_))),
                "{db}"
            );
        }
    }
}
