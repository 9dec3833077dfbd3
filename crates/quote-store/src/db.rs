//! Opening, checking and querying the database file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

use crate::quote::{LIST_LIMIT_MAX, NewQuote, Page, Quote, QuoteId};
use crate::{Error, migrate};

/// How a database is opened. The defaults suit a few processes sharing one file on flash.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long a statement waits for another process's write lock before failing (default 5 s).
    pub busy_timeout: Duration,
    /// Size the WAL file is truncated back to after a checkpoint, in bytes (default 4 MiB),
    /// so the journal on flash stays bounded.
    pub journal_size_limit: u64,
    /// Run `PRAGMA quick_check` before serving (default on). A corrupt file is refused.
    pub integrity_check: bool,
    /// Largest size the database may grow to, in bytes (default: unbounded). Past it a write
    /// fails with [`Error::Full`] and nothing is written, as on a full disk.
    pub max_size: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            busy_timeout: Duration::from_secs(5),
            journal_size_limit: 4 << 20,
            integrity_check: true,
            max_size: None,
        }
    }
}

/// What [`Database::open`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Migrations applied by this open (empty when another process or an earlier start did it).
    pub applied: Vec<u32>,
    /// Schema version after the open.
    pub schema_version: u32,
}

/// A database file that passed its integrity check and is migrated.
#[derive(Debug, Clone)]
pub struct Database {
    path: PathBuf,
    options: Options,
}

impl Database {
    /// Opens `path` (creating it if absent), refuses it if corrupt or newer than this build,
    /// switches it to WAL and applies missing migrations.
    pub fn open(path: &Path, options: Options) -> Result<(Database, OpenReport), Error> {
        let db = Database {
            path: path.to_owned(),
            options,
        };
        let mut conn = db.raw_connection()?;
        if db.options.integrity_check {
            db.check_integrity(&conn)?;
        }
        // WAL is a property of the file: set once here, every later connection inherits it.
        // Switching needs an exclusive lock, and SQLite may answer BUSY at once, without its
        // busy handler, while other processes open the same new file: retry within the timeout.
        let started = std::time::Instant::now();
        let mode: String = loop {
            match conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)) {
                Ok(mode) => break mode,
                Err(source)
                    if source.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                        && started.elapsed() < db.options.busy_timeout =>
                {
                    std::thread::sleep(Duration::from_millis(5 + fastrand::u64(..10)));
                }
                Err(source) => return Err(db.corrupt_or("journal_mode", source)),
            }
        };
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Configure {
                path: db.path.clone(),
                setting: "journal_mode",
                source: rusqlite::Error::InvalidParameterName(format!(
                    "SQLite kept journal mode {mode:?} instead of WAL"
                )),
            });
        }
        db.configure(&conn)?;
        let applied = migrate::migrate(&mut conn, &db.path)?;
        let schema_version = conn
            .query_row("SELECT MAX(version) FROM schema_migrations", [], |row| {
                row.get(0)
            })
            .map_err(|source| Error::query("schema version", source))?;
        Ok((
            db,
            OpenReport {
                applied,
                schema_version,
            },
        ))
    }

    /// Another connection to the same, already checked, database.
    pub fn connect(&self) -> Result<Store, Error> {
        let conn = self.raw_connection()?;
        self.configure(&conn)?;
        Ok(Store { conn })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn raw_connection(&self) -> Result<Connection, Error> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn =
            Connection::open_with_flags(&self.path, flags).map_err(|source| Error::Open {
                path: self.path.clone(),
                source,
            })?;
        // Before anything else touches the file, so that even the first statement waits
        // for another process's lock instead of failing.
        conn.busy_timeout(self.options.busy_timeout)
            .map_err(|source| self.configure_error("busy_timeout", source))?;
        Ok(conn)
    }

    /// Per-connection settings for durability on flash.
    fn configure(&self, conn: &Connection) -> Result<(), Error> {
        // FULL: a commit returns only after the WAL is fsynced, so an acknowledged write
        // survives a power cut (NORMAL would only guarantee consistency).
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|source| self.configure_error("synchronous", source))?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(|source| self.configure_error("foreign_keys", source))?;
        let limit = i64::try_from(self.options.journal_size_limit).unwrap_or(i64::MAX);
        conn.query_row(&format!("PRAGMA journal_size_limit = {limit}"), [], |_| {
            Ok(())
        })
        .map_err(|source| self.configure_error("journal_size_limit", source))?;
        if let Some(max) = self.options.max_size {
            let page_size: i64 = conn
                .query_row("PRAGMA page_size", [], |row| row.get(0))
                .map_err(|source| self.configure_error("page_size", source))?;
            let pages = (max / page_size.max(1).unsigned_abs()).max(1);
            conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))
                .map_err(|source| self.configure_error("max_page_count", source))?;
        }
        Ok(())
    }

    fn check_integrity(&self, conn: &Connection) -> Result<(), Error> {
        let rows: Result<Vec<String>, _> = conn
            .prepare("PRAGMA quick_check")
            .and_then(|mut stmt| stmt.query_map([], |row| row.get(0))?.collect());
        match rows {
            Ok(rows) if rows.len() == 1 && rows[0] == "ok" => Ok(()),
            Ok(rows) => Err(Error::Corrupt {
                path: self.path.clone(),
                details: rows.join("; "),
            }),
            Err(source) => Err(self.corrupt_or("quick_check", source)),
        }
    }

    /// A file that is not a database, or a malformed one, is corruption; anything else
    /// (permissions, I/O) is reported as itself.
    fn corrupt_or(&self, setting: &'static str, source: rusqlite::Error) -> Error {
        use rusqlite::ErrorCode;
        match source.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => Error::Corrupt {
                path: self.path.clone(),
                details: source.to_string(),
            },
            _ => self.configure_error(setting, source),
        }
    }

    fn configure_error(&self, setting: &'static str, source: rusqlite::Error) -> Error {
        Error::Configure {
            path: self.path.clone(),
            setting,
            source,
        }
    }
}

/// One connection to the database. Not shared between threads: a caller keeps a few of them.
#[derive(Debug)]
pub struct Store {
    pub(crate) conn: Connection,
}

const COLUMNS: &str = "id, text, author, created_at";

fn quote_from_row(row: &Row<'_>) -> rusqlite::Result<Quote> {
    Ok(Quote {
        id: row.get(0)?,
        text: row.get(1)?,
        author: row.get(2)?,
        created_at: row.get(3)?,
    })
}

impl Store {
    /// Stores a quote. When this returns, the quote is on disk (WAL fsynced).
    pub fn create(&mut self, quote: &NewQuote) -> Result<Quote, Error> {
        self.conn
            .prepare_cached(&format!(
                "INSERT INTO quotes (text, author) VALUES (?1, ?2) RETURNING {COLUMNS}"
            ))
            .and_then(|mut stmt| {
                stmt.query_row(params![quote.text(), quote.author()], quote_from_row)
            })
            .map_err(|source| Error::query("create", source))
    }

    pub fn get(&self, id: QuoteId) -> Result<Option<Quote>, Error> {
        self.conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM quotes WHERE id = ?1"))
            .and_then(|mut stmt| stmt.query_row([id], quote_from_row).optional())
            .map_err(|source| Error::query("get", source))
    }

    /// Quotes with an id greater than `after`, in id order. `limit` is clamped to
    /// 1..=[`LIST_LIMIT_MAX`]. Keyset pagination: a page costs the same wherever it is.
    pub fn list(&self, after: Option<QuoteId>, limit: u32) -> Result<Page, Error> {
        let limit = limit.clamp(1, LIST_LIMIT_MAX);
        // One more row than asked tells whether there is a next page.
        let fetch = i64::from(limit) + 1;
        let limit = limit as usize;
        let quotes = self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM quotes WHERE id > ?1 ORDER BY id LIMIT ?2"
            ))
            .and_then(|mut stmt| {
                stmt.query_map(params![after.unwrap_or(0), fetch], quote_from_row)?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(|source| Error::query("list", source))?;
        Ok(Page::from_rows(quotes, limit))
    }

    /// Deletes a quote; `false` if there was none with that id.
    pub fn delete(&mut self, id: QuoteId) -> Result<bool, Error> {
        self.conn
            .prepare_cached("DELETE FROM quotes WHERE id = ?1")
            .and_then(|mut stmt| stmt.execute([id]))
            .map(|n| n > 0)
            .map_err(|source| Error::query("delete", source))
    }

    /// A quote drawn uniformly at random, or `None` if there are none.
    ///
    /// Draws an id between the smallest and largest and keeps it if it exists (each
    /// existing id is equally likely on every draw, so the pick is uniform); after a few
    /// misses in a sparse table it falls back to a uniform offset into the index. Never
    /// `ORDER BY RANDOM()`, which reads and sorts the whole table.
    pub fn random(&self) -> Result<Option<Quote>, Error> {
        const DRAWS: usize = 8;
        let err = |source| Error::query("random", source);
        let bounds: (Option<QuoteId>, Option<QuoteId>) = self
            .conn
            .prepare_cached("SELECT MIN(id), MAX(id) FROM quotes")
            .and_then(|mut stmt| stmt.query_row([], |row| Ok((row.get(0)?, row.get(1)?))))
            .map_err(err)?;
        let (Some(min), Some(max)) = bounds else {
            return Ok(None);
        };
        for _ in 0..DRAWS {
            if let Some(quote) = self.get(fastrand::i64(min..=max))? {
                return Ok(Some(quote));
            }
        }
        let count = self.count()?;
        if count == 0 {
            return Ok(None);
        }
        let offset = fastrand::i64(0..count);
        self.conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM quotes ORDER BY id LIMIT 1 OFFSET ?1"
            ))
            .and_then(|mut stmt| stmt.query_row([offset], quote_from_row).optional())
            .map_err(err)
    }

    pub fn count(&self) -> Result<i64, Error> {
        self.conn
            .prepare_cached("SELECT COUNT(*) FROM quotes")
            .and_then(|mut stmt| stmt.query_row([], |row| row.get(0)))
            .map_err(|source| Error::query("count", source))
    }

    /// A cheap read that touches the file, for liveness checks.
    pub fn ping(&self) -> Result<(), Error> {
        self.conn
            .prepare_cached("SELECT MAX(id) FROM quotes")
            .and_then(|mut stmt| stmt.query_row([], |_| Ok(())))
            .map_err(|source| Error::query("ping", source))
    }
}
