//! Versioned schema migrations, applied at open and recorded in `schema_migrations`.
//!
//! Several replicas start at once on one file, so migrating happens inside one
//! `BEGIN IMMEDIATE` transaction: the first process migrates, the others wait on the
//! write lock (busy timeout), then find nothing left to do. PostgreSQL runs the same list
//! (`crate::pg`), each SQL step in its own dialect, under an advisory lock.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior, params};

use crate::{Error, quote::seed_quotes};

/// One schema step. Versions are dense, start at 1 and never change once released.
#[derive(Debug)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub(crate) step: Step,
}

#[derive(Debug)]
pub(crate) enum Step {
    /// The same schema change in each backend's dialect.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    Sql {
        sqlite: &'static str,
        postgres: &'static str,
    },
    /// Loads the seed quotes: data rather than schema, but recorded the same way so a
    /// database is seeded exactly once, on first start, and deleting seeds is final.
    Seed,
}

/// Every migration this build knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "quotes",
        step: Step::Sql {
            sqlite: include_str!("../migrations/0001_quotes.sql"),
            postgres: include_str!("../migrations/0001_quotes.postgres.sql"),
        },
    },
    Migration {
        version: 2,
        name: "seed",
        step: Step::Seed,
    },
];

/// The schema version this build produces.
pub fn latest_version() -> u32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Applies the missing migrations; returns the versions it applied.
pub(crate) fn migrate(conn: &mut Connection, path: &Path) -> Result<Vec<u32>, Error> {
    let query = |source| Error::query("migrate", source);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(query)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version    INTEGER PRIMARY KEY,
             name       TEXT NOT NULL,
             applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
         );",
    )
    .map_err(query)?;
    let current: u32 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |row| row.get(0),
        )
        .map_err(query)?;
    let known = latest_version();
    if current > known {
        return Err(Error::SchemaTooNew {
            path: path.to_owned(),
            found: current,
            known,
        });
    }
    let mut applied = Vec::new();
    for migration in MIGRATIONS.iter().filter(|m| m.version > current) {
        let fail = |source| Error::Migrate {
            path: path.to_owned(),
            version: migration.version,
            name: migration.name,
            source,
        };
        match migration.step {
            Step::Sql { sqlite, .. } => tx.execute_batch(sqlite).map_err(fail)?,
            Step::Seed => {
                let mut insert = tx
                    .prepare("INSERT INTO quotes (text, author) VALUES (?1, ?2)")
                    .map_err(fail)?;
                for (text, author) in seed_quotes() {
                    insert.execute(params![text, author]).map_err(fail)?;
                }
            }
        }
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (?1, ?2)",
            params![migration.version, migration.name],
        )
        .map_err(fail)?;
        applied.push(migration.version);
    }
    tx.commit().map_err(query)?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_dense_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "migration {}", m.name);
        }
    }
}
