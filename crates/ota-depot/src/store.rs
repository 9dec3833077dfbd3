//! Where the depot keeps what it must not forget: enrolled devices, verified bundles, rollouts
//! (their signed plan and progress), each member's wave and report. [`Store`] is the interface;
//! [`SqliteStore`] the embedded default (one file, WAL, `synchronous=FULL`). A PostgreSQL store
//! for the cluster would implement the same trait (ARCHITECTURE.md, "ota-depot").
//!
//! Every method returns only once what it wrote is durable, and [`Store::record`] writes a report
//! and the decision it caused in one transaction: a depot killed at any instant restarts with
//! every acknowledged report and the decisions they caused, never one without the other.

use std::path::{Path, PathBuf};

use depot_proto::wire::{MemberState, RolloutState};
use rusqlite::{Connection, OptionalExtension, params};

use crate::gates::Progress;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the depot database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("the depot database {path} holds a bad value: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

impl StoreError {
    /// True when the disk is full: the request may be retried once space is freed.
    pub fn is_full(&self) -> bool {
        matches!(
            self,
            StoreError::Sqlite {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            } if e.code == rusqlite::ErrorCode::DiskFull
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDevice {
    pub id: String,
    pub public_key: String,
    pub product: Option<String>,
    pub version: Option<String>,
    pub enrolled_at: u64,
    pub last_seen: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBundle {
    pub digest: String,
    pub product: String,
    pub version: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRollout {
    pub id: u64,
    pub plan: String,
    pub progress: Progress,
    /// The last report sequence number when it last ran (published or resumed): the error gate
    /// counts only reports after it.
    pub resume_mark: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMember {
    pub rollout: u64,
    pub device: String,
    pub wave: u32,
    pub state: MemberState,
    /// The report sequence number of its terminal report (0 before one).
    pub seq: u64,
}

/// Everything, read at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub devices: Vec<StoredDevice>,
    pub bundles: Vec<StoredBundle>,
    pub rollouts: Vec<StoredRollout>,
    pub members: Vec<StoredMember>,
    /// The highest report sequence number so far.
    pub last_seq: u64,
}

/// The depot's storage. Methods are blocking; the server calls them off its async threads.
pub trait Store: Send {
    fn load(&mut self) -> Result<Loaded, StoreError>;
    fn enroll(&mut self, device: &StoredDevice) -> Result<(), StoreError>;
    fn seen(&mut self, id: &str, product: &str, version: &str, at: u64) -> Result<(), StoreError>;
    fn add_bundle(&mut self, bundle: &StoredBundle) -> Result<(), StoreError>;
    /// Stores a new rollout and its members (device, wave); returns its id.
    fn add_rollout(
        &mut self,
        plan: &str,
        progress: &Progress,
        resume_mark: u64,
        members: &[(String, u32)],
    ) -> Result<u64, StoreError>;
    fn add_member(&mut self, rollout: u64, device: &str, wave: u32) -> Result<(), StoreError>;
    /// A member's terminal report (with the receipt that proves it, if any) and the rollout's
    /// progress after it, in one transaction; returns the report's sequence number.
    fn record(
        &mut self,
        rollout: u64,
        device: &str,
        state: MemberState,
        receipt: Option<&str>,
        at: u64,
        progress: &Progress,
    ) -> Result<u64, StoreError>;
    fn set_progress(
        &mut self,
        rollout: u64,
        progress: &Progress,
        resume_mark: u64,
    ) -> Result<(), StoreError>;
}

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL UNIQUE,
    product TEXT,
    version TEXT,
    enrolled_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
);
CREATE TABLE bundles (
    digest TEXT PRIMARY KEY,
    product TEXT NOT NULL,
    version TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    plan TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'halted', 'completed', 'aborted')),
    open INTEGER NOT NULL CHECK (open >= 1),
    reason TEXT,
    resume_mark INTEGER NOT NULL
);
CREATE TABLE members (
    rollout INTEGER NOT NULL REFERENCES rollouts(id),
    device TEXT NOT NULL,
    wave INTEGER NOT NULL,
    state TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (rollout, device)
);
CREATE TABLE reports (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout INTEGER NOT NULL REFERENCES rollouts(id),
    device TEXT NOT NULL,
    state TEXT NOT NULL,
    receipt TEXT,
    at INTEGER NOT NULL
);
";

/// The embedded store: one SQLite file (`<data dir>/depot.db`).
pub struct SqliteStore {
    path: PathBuf,
    conn: Connection,
}

impl SqliteStore {
    /// Opens (or creates) the database; a file from a newer build is refused.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let sql = |source| StoreError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(sql)?;
        match version {
            0 => {
                conn.execute_batch(&format!(
                    "BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                ))
                .map_err(sql)?;
            }
            SCHEMA_VERSION => {}
            newer => {
                return Err(StoreError::Corrupt {
                    path: path.to_owned(),
                    reason: format!(
                        "schema version {newer}, this build knows {SCHEMA_VERSION}: refusing to touch it"
                    ),
                });
            }
        }
        Ok(SqliteStore {
            path: path.to_owned(),
            conn,
        })
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> StoreError + use<> {
        let path = self.path.clone();
        move |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        }
    }

    /// Every row of `query`, mapped.
    fn rows<T>(
        &self,
        query: &str,
        map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, StoreError> {
        let sql = self.sql();
        let mut stmt = self.conn.prepare(query).map_err(&sql)?;
        stmt.query_map([], map)
            .and_then(|rows| rows.collect())
            .map_err(&sql)
    }

    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }
}

impl Store for SqliteStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        let mut loaded = Loaded {
            devices: self.rows(
                "SELECT id, public_key, product, version, enrolled_at, last_seen FROM devices ORDER BY id",
                |r| {
                    Ok(StoredDevice {
                        id: r.get(0)?,
                        public_key: r.get(1)?,
                        product: r.get(2)?,
                        version: r.get(3)?,
                        enrolled_at: r.get(4)?,
                        last_seen: r.get(5)?,
                    })
                },
            )?,
            bundles: self.rows(
                "SELECT digest, product, version, size FROM bundles ORDER BY digest",
                |r| {
                    Ok(StoredBundle {
                        digest: r.get(0)?,
                        product: r.get(1)?,
                        version: r.get(2)?,
                        size: r.get(3)?,
                    })
                },
            )?,
            ..Loaded::default()
        };
        let rollouts = self.rows(
            "SELECT id, plan, state, open, reason, resume_mark FROM rollouts ORDER BY id",
            |r| {
                let state: String = r.get(2)?;
                let rollout = StoredRollout {
                    id: r.get(0)?,
                    plan: r.get(1)?,
                    progress: Progress {
                        state: RolloutState::Running,
                        open: r.get(3)?,
                        reason: r.get(4)?,
                    },
                    resume_mark: r.get(5)?,
                };
                Ok((rollout, state))
            },
        )?;
        for (mut rollout, state) in rollouts {
            rollout.progress.state = RolloutState::parse(&state).ok_or_else(|| {
                self.corrupt(format!("rollout {} has state {state:?}", rollout.id))
            })?;
            loaded.rollouts.push(rollout);
        }
        let members = self.rows(
            "SELECT rollout, device, wave, state, seq FROM members ORDER BY rollout, device",
            |r| {
                let state: String = r.get(3)?;
                let member = StoredMember {
                    rollout: r.get(0)?,
                    device: r.get(1)?,
                    wave: r.get(2)?,
                    state: MemberState::Waiting,
                    seq: r.get(4)?,
                };
                Ok((member, state))
            },
        )?;
        for (mut member, state) in members {
            member.state = MemberState::parse(&state).ok_or_else(|| {
                self.corrupt(format!(
                    "member {} of rollout {} has state {state:?}",
                    member.device, member.rollout
                ))
            })?;
            loaded.members.push(member);
        }
        loaded.last_seq = self
            .conn
            .query_row("SELECT MAX(seq) FROM reports", [], |r| {
                r.get::<_, Option<u64>>(0)
            })
            .map_err(self.sql())?
            .unwrap_or(0);
        Ok(loaded)
    }

    fn enroll(&mut self, device: &StoredDevice) -> Result<(), StoreError> {
        let sql = self.sql();
        self.conn
            .execute(
                "INSERT INTO devices (id, public_key, product, version, enrolled_at, last_seen) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![device.id, device.public_key, device.product, device.version, device.enrolled_at, device.last_seen],
            )
            .map_err(sql)?;
        Ok(())
    }

    fn seen(&mut self, id: &str, product: &str, version: &str, at: u64) -> Result<(), StoreError> {
        let sql = self.sql();
        self.conn
            .execute(
                "UPDATE devices SET product = ?2, version = ?3, last_seen = ?4 WHERE id = ?1",
                params![id, product, version, at],
            )
            .map_err(sql)?;
        Ok(())
    }

    fn add_bundle(&mut self, bundle: &StoredBundle) -> Result<(), StoreError> {
        let sql = self.sql();
        self.conn
            .execute(
                "INSERT OR IGNORE INTO bundles (digest, product, version, size) VALUES (?1, ?2, ?3, ?4)",
                params![bundle.digest, bundle.product, bundle.version, bundle.size],
            )
            .map_err(sql)?;
        Ok(())
    }

    fn add_rollout(
        &mut self,
        plan: &str,
        progress: &Progress,
        resume_mark: u64,
        members: &[(String, u32)],
    ) -> Result<u64, StoreError> {
        let sql = self.sql();
        let tx = self.conn.transaction().map_err(&sql)?;
        tx.execute(
            "INSERT INTO rollouts (plan, state, open, reason, resume_mark) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![plan, progress.state.as_str(), progress.open, progress.reason, resume_mark],
        )
        .map_err(&sql)?;
        let id = tx.last_insert_rowid() as u64;
        {
            let mut insert = tx
                .prepare("INSERT INTO members (rollout, device, wave, state) VALUES (?1, ?2, ?3, 'waiting')")
                .map_err(&sql)?;
            for (device, wave) in members {
                insert.execute(params![id, device, wave]).map_err(&sql)?;
            }
        }
        tx.commit().map_err(&sql)?;
        Ok(id)
    }

    fn add_member(&mut self, rollout: u64, device: &str, wave: u32) -> Result<(), StoreError> {
        let sql = self.sql();
        self.conn
            .execute(
                "INSERT OR IGNORE INTO members (rollout, device, wave, state) VALUES (?1, ?2, ?3, 'waiting')",
                params![rollout, device, wave],
            )
            .map_err(sql)?;
        Ok(())
    }

    fn record(
        &mut self,
        rollout: u64,
        device: &str,
        state: MemberState,
        receipt: Option<&str>,
        at: u64,
        progress: &Progress,
    ) -> Result<u64, StoreError> {
        let sql = self.sql();
        let tx = self.conn.transaction().map_err(&sql)?;
        tx.execute(
            "INSERT INTO reports (rollout, device, state, receipt, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![rollout, device, state.as_str(), receipt, at],
        )
        .map_err(&sql)?;
        let seq = tx.last_insert_rowid() as u64;
        let changed = tx
            .execute(
                "UPDATE members SET state = ?3, seq = ?4 WHERE rollout = ?1 AND device = ?2",
                params![rollout, device, state.as_str(), seq],
            )
            .map_err(&sql)?;
        if changed != 1 {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                reason: format!("device {device} is not a member of rollout {rollout}"),
            });
        }
        tx.execute(
            "UPDATE rollouts SET state = ?2, open = ?3, reason = ?4 WHERE id = ?1",
            params![
                rollout,
                progress.state.as_str(),
                progress.open,
                progress.reason
            ],
        )
        .map_err(&sql)?;
        tx.commit().map_err(&sql)?;
        Ok(seq)
    }

    fn set_progress(
        &mut self,
        rollout: u64,
        progress: &Progress,
        resume_mark: u64,
    ) -> Result<(), StoreError> {
        let sql = self.sql();
        self.conn
            .execute(
                "UPDATE rollouts SET state = ?2, open = ?3, reason = ?4, resume_mark = ?5 WHERE id = ?1",
                params![rollout, progress.state.as_str(), progress.open, progress.reason, resume_mark],
            )
            .map_err(sql)?;
        Ok(())
    }
}

/// A store's last acknowledged report, for tests: `(rollout, device, state)` by sequence.
pub fn last_report(path: &Path) -> Result<Option<(u64, String, String)>, StoreError> {
    let sql = |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open(path).map_err(sql)?;
    conn.query_row(
        "SELECT rollout, device, state FROM reports ORDER BY seq DESC LIMIT 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .optional()
    .map_err(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_and_its_decision_are_read_back_together_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("depot.db");
        let mut store = SqliteStore::open(&path).unwrap();
        store
            .enroll(&StoredDevice {
                id: "00aa".into(),
                public_key: "k".into(),
                product: Some("quote-edge".into()),
                version: Some("1.0.0".into()),
                enrolled_at: 5,
                last_seen: 5,
            })
            .unwrap();
        let running = Progress {
            state: RolloutState::Running,
            open: 1,
            reason: None,
        };
        let id = store
            .add_rollout("plan text", &running, 0, &[("00aa".into(), 0)])
            .unwrap();
        let halted = Progress {
            state: RolloutState::Halted,
            open: 1,
            reason: Some("1 of 1 reports failed".into()),
        };
        let seq = store
            .record(
                id,
                "00aa",
                MemberState::RolledBack,
                Some("receipt"),
                9,
                &halted,
            )
            .unwrap();
        drop(store);
        let loaded = SqliteStore::open(&path).unwrap().load().unwrap();
        assert_eq!(loaded.rollouts[0].progress, halted);
        assert_eq!(loaded.members[0].state, MemberState::RolledBack);
        assert_eq!((loaded.members[0].seq, loaded.last_seq), (seq, seq));
        assert_eq!(
            last_report(&path).unwrap(),
            Some((id, "00aa".into(), "rolled_back".into()))
        );
        // A member that does not exist: the report is not kept, nor the decision.
        let mut store = SqliteStore::open(&path).unwrap();
        assert!(
            store
                .record(id, "ffff", MemberState::Committed, None, 10, &running)
                .is_err()
        );
        assert_eq!(store.load().unwrap().rollouts[0].progress, halted);
        drop(store);
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 2).unwrap();
        drop(conn);
        let error = SqliteStore::open(&path).err().unwrap();
        assert!(error.to_string().contains("schema version 2"), "{error}");
    }
}
