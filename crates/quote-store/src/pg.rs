//! The PostgreSQL backend (cargo feature `postgres`): the cluster variant, where several
//! replicas share one server.
//!
//! A `deadpool-postgres` pool of `tokio-postgres` connections: connections broken by an
//! outage are dropped on their next checkout and replaced, so the service reconnects
//! without a restart. The same migrations as SQLite, under a transaction-scoped advisory
//! lock, so replicas starting at once on an empty database migrate exactly once.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row, Statement};

use crate::Error;
use crate::db::OpenReport;
use crate::error::TargetError;
use crate::migrate::{MIGRATIONS, Step, latest_version};
use crate::quote::{LIST_LIMIT_MAX, NewQuote, Page, Quote, QuoteId, seed_quotes};

/// The advisory lock key that serialises migrations: "quote-ed" as ASCII in an i64.
const MIGRATION_LOCK: i64 = i64::from_be_bytes(*b"quote-ed");
/// How long a connection attempt may take before the database counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a request waits for a free pooled connection.
const WAIT_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed `postgres://` URL and its password. Displays without the password.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    shown: String,
}

impl PgTarget {
    pub(crate) fn parse(url: &str, password_file: Option<&Path>) -> Result<PgTarget, TargetError> {
        // tokio-postgres's parse errors name the option, never its value.
        let mut config =
            tokio_postgres::Config::from_str(url).map_err(|e| TargetError::BadUrl {
                reason: e.to_string(),
            })?;
        if let Some(path) = password_file {
            let text = std::fs::read(path).map_err(|source| TargetError::PasswordFile {
                path: path.to_owned(),
                source,
            })?;
            // A Secret written by `kubectl create secret --from-file` often ends in a newline.
            let password = text.strip_suffix(b"\n").unwrap_or(&text);
            let password = password.strip_suffix(b"\r").unwrap_or(password);
            config.password(password);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("quote-service");
        }
        let shown = shown(&config);
        Ok(PgTarget { config, shown })
    }
}

/// `postgres://user@host:port/db`: what logs and errors may say about the target.
fn shown(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    format!(
        "postgres://{}@{}/{}",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

impl fmt::Display for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgTarget({})", self.shown)
    }
}

/// A migrated PostgreSQL database behind a connection pool. Cheap to clone.
#[derive(Clone)]
pub struct PgStorage {
    pool: Pool,
    shown: std::sync::Arc<str>,
}

impl fmt::Debug for PgStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgStorage({})", self.shown)
    }
}

const COLUMNS: &str = "id, text, author, created_at";

fn quote_from_row(row: &Row) -> Result<Quote, tokio_postgres::Error> {
    Ok(Quote {
        id: row.try_get(0)?,
        text: row.try_get(1)?,
        author: row.try_get(2)?,
        created_at: row.try_get(3)?,
    })
}

/// Classifies a PostgreSQL error as SQLite's are classified: a full disk and lock conflicts
/// are conditions, a connection that failed is an outage, the rest a query failure.
fn query_error(op: &'static str, source: tokio_postgres::Error) -> Error {
    if let Some(db) = source.as_db_error() {
        let code = db.code();
        if *code == SqlState::DISK_FULL {
            return Error::Full { op };
        }
        if *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::LOCK_NOT_AVAILABLE
        {
            return Error::Busy { op };
        }
        if code.code().starts_with("08") || code.code().starts_with("57P") {
            // Connection exceptions and an administrator's shutdown: the server is going away.
            return Error::Unreachable {
                op,
                reason: source.to_string(),
            };
        }
        return Error::Postgres { op, source };
    }
    let io = std::error::Error::source(&source).is_some_and(|s| s.is::<std::io::Error>());
    if source.is_closed() || io || source.to_string().starts_with("timeout") {
        return Error::Unreachable {
            op,
            reason: source.to_string(),
        };
    }
    Error::Postgres { op, source }
}

fn pool_error(op: &'static str, error: PoolError) -> Error {
    match error {
        PoolError::Backend(source) => query_error(op, source),
        PoolError::Closed => Error::Closing { op },
        PoolError::Timeout(_) => Error::Unreachable {
            op,
            reason: "no database connection became available in time".to_owned(),
        },
        other => Error::Unreachable {
            op,
            reason: other.to_string(),
        },
    }
}

/// A cached prepared statement on `client`, errors classified for `op`.
async fn prepared(client: &Object, op: &'static str, sql: &str) -> Result<Statement, Error> {
    client
        .prepare_cached(sql)
        .await
        .map_err(|e| query_error(op, e))
}

/// Runs `sql` (cached) with `params` and maps every row to a quote.
async fn quotes(
    client: &Object,
    op: &'static str,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Quote>, Error> {
    let stmt = prepared(client, op, sql).await?;
    let rows = client
        .query(&stmt, params)
        .await
        .map_err(|e| query_error(op, e))?;
    rows.iter()
        .map(quote_from_row)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| query_error(op, e))
}

impl PgStorage {
    /// Connects, refuses a schema newer than this build, and applies missing migrations.
    /// `connections` is the pool size. A server that does not answer is
    /// [`Error::Unreachable`]: the caller retries with backoff.
    pub async fn open(
        target: &PgTarget,
        connections: usize,
    ) -> Result<(PgStorage, OpenReport), Error> {
        let manager = Manager::from_config(
            target.config.clone(),
            NoTls,
            ManagerConfig {
                // `Fast` checks only that the connection is not closed: a server restart
                // closes every connection, and the next checkout replaces it.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(connections.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| Error::Unreachable {
                op: "open",
                reason: e.to_string(),
            })?;
        let storage = PgStorage {
            pool,
            shown: target.shown.as_str().into(),
        };
        let mut client = storage.client("open").await?;
        let applied = migrate(&mut client, &storage.shown).await?;
        let schema_version: i32 = client
            .query_one("SELECT MAX(version) FROM schema_migrations", &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| query_error("schema version", e))?;
        Ok((
            storage,
            OpenReport {
                applied,
                schema_version: u32::try_from(schema_version).unwrap_or(0),
            },
        ))
    }

    async fn client(&self, op: &'static str) -> Result<Object, Error> {
        self.pool.get().await.map_err(|e| pool_error(op, e))
    }

    pub(crate) async fn create(&self, quote: &NewQuote) -> Result<Quote, Error> {
        let op = "create";
        let client = self.client(op).await?;
        // One statement in autocommit: with synchronous_commit on (the default), the answer
        // comes after the WAL record is flushed on the server.
        let sql = format!("INSERT INTO quotes (text, author) VALUES ($1, $2) RETURNING {COLUMNS}");
        let params: [&(dyn ToSql + Sync); 2] = [&quote.text(), &quote.author()];
        quotes(&client, op, &sql, &params)
            .await?
            .pop()
            // An INSERT ... RETURNING answers one row; anything else is a bug, not an outage.
            .ok_or(Error::Task { op })
    }

    pub(crate) async fn get(&self, id: QuoteId) -> Result<Option<Quote>, Error> {
        let client = self.client("get").await?;
        get_with(&client, id).await
    }

    pub(crate) async fn list(&self, after: Option<QuoteId>, limit: u32) -> Result<Page, Error> {
        let op = "list";
        let limit = limit.clamp(1, LIST_LIMIT_MAX);
        // One more row than asked tells whether there is a next page.
        let fetch = i64::from(limit) + 1;
        let client = self.client(op).await?;
        let sql = format!("SELECT {COLUMNS} FROM quotes WHERE id > $1 ORDER BY id LIMIT $2");
        let rows = quotes(&client, op, &sql, &[&after.unwrap_or(0), &fetch]).await?;
        Ok(Page::from_rows(rows, limit as usize))
    }

    pub(crate) async fn delete(&self, id: QuoteId) -> Result<bool, Error> {
        let op = "delete";
        let client = self.client(op).await?;
        let stmt = prepared(&client, op, "DELETE FROM quotes WHERE id = $1").await?;
        let n = client
            .execute(&stmt, &[&id])
            .await
            .map_err(|e| query_error(op, e))?;
        Ok(n > 0)
    }

    /// The same draw as SQLite's [`crate::Store::random`] (a uniform id between the bounds,
    /// kept if it exists, so every existing id is equally likely), one round trip per draw:
    /// the server reads the bounds from the index's two ends and draws. After a few misses in
    /// a sparse table, a uniform offset into the index.
    pub(crate) async fn random(&self) -> Result<Option<Quote>, Error> {
        const DRAWS: usize = 8;
        let op = "random";
        let client = self.client(op).await?;
        let draw = format!(
            "SELECT {COLUMNS} FROM quotes WHERE id = \
             (SELECT MIN(id) + floor(random() * (MAX(id) - MIN(id) + 1))::bigint FROM quotes)"
        );
        for _ in 0..DRAWS {
            if let Some(quote) = quotes(&client, op, &draw, &[]).await?.pop() {
                return Ok(Some(quote));
            }
        }
        let count = count_with(&client).await?;
        if count == 0 {
            return Ok(None);
        }
        let sql = format!("SELECT {COLUMNS} FROM quotes ORDER BY id LIMIT 1 OFFSET $1");
        Ok(quotes(&client, op, &sql, &[&fastrand::i64(0..count)])
            .await?
            .pop())
    }

    pub(crate) async fn count(&self) -> Result<i64, Error> {
        let client = self.client("count").await?;
        count_with(&client).await
    }

    pub(crate) async fn ping(&self) -> Result<(), Error> {
        let op = "ping";
        let client = self.client(op).await?;
        client
            .simple_query("SELECT 1")
            .await
            .map(drop)
            .map_err(|e| query_error(op, e))
    }
}

async fn get_with(client: &Object, id: QuoteId) -> Result<Option<Quote>, Error> {
    let sql = format!("SELECT {COLUMNS} FROM quotes WHERE id = $1");
    Ok(quotes(client, "get", &sql, &[&id]).await?.pop())
}

async fn count_with(client: &Object) -> Result<i64, Error> {
    let op = "count";
    let stmt = prepared(client, op, "SELECT COUNT(*) FROM quotes").await?;
    client
        .query_one(&stmt, &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| query_error(op, e))
}

/// Applies the missing migrations in one transaction that first takes an advisory lock:
/// replicas starting together queue on the lock, and each later one finds the work done.
/// The lock is transaction-scoped, so it is released by the commit or by a dropped
/// connection, never leaked.
async fn migrate(client: &mut Object, database: &str) -> Result<Vec<u32>, Error> {
    let op = "migrate";
    let tx = client.transaction().await.map_err(|e| query_error(op, e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| query_error(op, e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             name       TEXT NOT NULL,
             applied_at TEXT NOT NULL
                 DEFAULT (to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))
         );",
    )
    .await
    .map_err(|e| query_error(op, e))?;
    let current: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| query_error(op, e))?;
    let current = u32::try_from(current).unwrap_or(0);
    let known = latest_version();
    if current > known {
        return Err(Error::SchemaTooNew {
            path: database.into(),
            found: current,
            known,
        });
    }
    let mut applied = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
        let fail = |source| Error::MigratePostgres {
            database: database.to_owned(),
            version: migration.version,
            name: migration.name,
            source,
        };
        match migration.step {
            Step::Sql { postgres, .. } => tx.batch_execute(postgres).await.map_err(fail)?,
            Step::Seed => {
                let insert = tx
                    .prepare("INSERT INTO quotes (text, author) VALUES ($1, $2)")
                    .await
                    .map_err(fail)?;
                for (text, author) in seed_quotes() {
                    tx.execute(&insert, &[&text, &author]).await.map_err(fail)?;
                }
            }
        }
        let version = i32::try_from(migration.version).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &migration.name],
        )
        .await
        .map_err(fail)?;
        applied.push(migration.version);
    }
    tx.commit().await.map_err(|e| query_error(op, e))?;
    Ok(applied)
}
