//! Online snapshots for updates: copy the live database aside before a new release runs, and
//! put it back if the release is rolled back, exporting the rows written in between so that
//! nothing is lost silently.
//!
//! Both work on a database other processes are using: the snapshot is one read transaction
//! (`VACUUM INTO`), the restore one write transaction (SQLite's backup API into the live file),
//! so a power cut leaves either the old or the restored content, never a mix.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, types::ValueRef};

/// What went wrong while taking or restoring a snapshot; the live database is unchanged.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {op} {path}: {source}")]
    Sqlite {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Moving a finished copy or export into place (fsync, rename, fsync of the directory).
    #[error(transparent)]
    Persist(#[from] durable::Error),
}

/// What [`restore`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// Rows of `quotes` in the live database and not in the snapshot, written to the export.
    pub exported: u64,
}

fn sqlite(op: &'static str, path: &Path) -> impl FnOnce(rusqlite::Error) -> SnapshotError {
    let path = path.to_owned();
    move |source| SnapshotError::Sqlite { op, path, source }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_owned();
    move |source| SnapshotError::Io { op, path, source }
}

/// The page cache of the connection taking a snapshot, in KiB (SQLite's default is 2 MiB). VACUUM
/// INTO gives the copy the same cache, so this bounds the memory a snapshot takes on a small
/// device, and the copy is written to flash as it goes rather than all at its end.
const SNAPSHOT_CACHE_KIB: u32 = 256;

/// Pages copied per step of a restore. The destination's write transaction stays open from the
/// first step to the last (SQLite's backup API commits it only when the copy is done), so a cut
/// between steps leaves the old content; steps only let the copy be watched.
const RESTORE_STEP_PAGES: std::ffi::c_int = 64;

fn open(path: &Path, flags: OpenFlags, busy: Duration) -> Result<Connection, SnapshotError> {
    let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(sqlite("open", path))?;
    conn.busy_timeout(busy).map_err(sqlite("configure", path))?;
    Ok(conn)
}

/// Copies the live database `db` to `to` (replaced atomically: temporary file, fsync, rename,
/// fsync of the directory). Returns the number of quotes in the copy.
pub fn snapshot(db: &Path, to: &Path, busy: Duration) -> Result<u64, SnapshotError> {
    #[cfg_attr(not(feature = "failpoints"), expect(unused_mut))]
    let mut conn = open(db, OpenFlags::SQLITE_OPEN_READ_ONLY, busy)?;
    conn.pragma_update(None, "cache_size", -i64::from(SNAPSHOT_CACHE_KIB))
        .map_err(sqlite("configure", db))?;
    let tmp = to.with_extension("tmp");
    remove_if_present(&tmp)?;
    #[cfg(feature = "failpoints")]
    watch_copy(&mut conn, &tmp);
    let target = tmp.to_str().ok_or_else(|| SnapshotError::Io {
        op: "name",
        path: tmp.clone(),
        source: std::io::Error::other("the snapshot path is not UTF-8"),
    })?;
    conn.execute("VACUUM INTO ?1", [target])
        .map_err(sqlite("copy into", &tmp))?;
    drop(conn);
    let copy = open(&tmp, OpenFlags::SQLITE_OPEN_READ_ONLY, busy)?;
    let quotes: i64 = copy
        .query_row("SELECT COUNT(*) FROM quotes", [], |row| row.get(0))
        .map_err(sqlite("count the quotes in", &tmp))?;
    drop(copy);
    durable::persist(&mut durable::StdFs, &tmp, to)?;
    Ok(quotes.unsigned_abs())
}

/// Puts the snapshot back into the live database `db`, in one transaction, after writing the
/// `quotes` rows that the snapshot lacks to `export` as JSON lines (one object per row, every
/// column by name), synced before the restore begins. An existing `export` is never replaced:
/// after a restore cut short once it was done, it may be the only copy of those rows.
pub fn restore(
    db: &Path,
    snapshot: &Path,
    export: &Path,
    busy: Duration,
) -> Result<RestoreReport, SnapshotError> {
    // Anything but "not found" (it exists, or cannot be looked at) is not a free name.
    if !export
        .symlink_metadata()
        .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
    {
        return Err(SnapshotError::Io {
            op: "write the export to",
            path: export.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "it exists, and an earlier export is never replaced",
            ),
        });
    }
    let source = open(snapshot, OpenFlags::SQLITE_OPEN_READ_ONLY, busy)?;
    let mut live = open(db, OpenFlags::SQLITE_OPEN_READ_WRITE, busy)?;
    let exported = export_new_rows(&live, snapshot, export)?;
    let backup =
        rusqlite::backup::Backup::new(&source, &mut live).map_err(sqlite("restore", db))?;
    #[cfg(feature = "failpoints")]
    let mut restoring_hit = false;
    // A replica holding the write lock makes the first step busy: retry within the busy
    // timeout. Once a step has copied pages, the destination stays locked until the last.
    let started = std::time::Instant::now();
    loop {
        use rusqlite::backup::StepResult;
        match backup
            .step(RESTORE_STEP_PAGES)
            .map_err(sqlite("restore", db))?
        {
            StepResult::Done => break,
            StepResult::More => {
                // Provably mid-restore: pages copied, more to come, nothing committed.
                #[cfg(feature = "failpoints")]
                if !restoring_hit {
                    restoring_hit = true;
                    failpoint::hit("store.restoring");
                }
            }
            StepResult::Busy | StepResult::Locked if started.elapsed() < busy => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => {
                return Err(SnapshotError::Sqlite {
                    op: "restore (the database stayed locked)",
                    path: db.to_owned(),
                    source: rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                        None,
                    ),
                });
            }
        }
    }
    drop(backup);
    // Leave the restored content in the main file, not only in the WAL.
    live.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .map_err(sqlite("checkpoint", db))?;
    Ok(RestoreReport { exported })
}

/// The fail point `store.vacuuming`, reached once, provably in the middle of the copy: while the
/// `VACUUM INTO` statement runs (SQLite calls the progress handler only then) and once its
/// output has bytes in the file.
#[cfg(feature = "failpoints")]
fn watch_copy(conn: &mut Connection, tmp: &Path) {
    let tmp = tmp.to_owned();
    let mut reached = false;
    conn.progress_handler(
        100,
        Some(move || {
            if !reached && std::fs::metadata(&tmp).is_ok_and(|m| m.len() > 0) {
                reached = true;
                failpoint::hit("store.vacuuming");
            }
            false
        }),
    )
    .expect("a progress handler is always accepted");
}

fn export_new_rows(
    live: &Connection,
    snapshot: &Path,
    export: &Path,
) -> Result<u64, SnapshotError> {
    let name = snapshot.to_str().ok_or_else(|| SnapshotError::Io {
        op: "name",
        path: snapshot.to_owned(),
        source: std::io::Error::other("the snapshot path is not UTF-8"),
    })?;
    live.execute("ATTACH DATABASE ?1 AS snap", [name])
        .map_err(sqlite("attach", snapshot))?;
    let result: Result<u64, SnapshotError> = (|| {
        let mut stmt = live
            .prepare(
                "SELECT * FROM main.quotes WHERE id NOT IN (SELECT id FROM snap.quotes) ORDER BY id",
            )
            .map_err(sqlite("read the new quotes from", export))?;
        let columns: Vec<String> = stmt.column_names().map(str::to_owned).collect();
        let tmp = export.with_extension("tmp");
        let mut out = std::io::BufWriter::new(File::create(&tmp).map_err(io("create", &tmp))?);
        let mut rows = stmt
            .query([])
            .map_err(sqlite("read the new quotes from", export))?;
        let mut count = 0;
        while let Some(row) = rows
            .next()
            .map_err(sqlite("read the new quotes from", export))?
        {
            let mut object = serde_json::Map::new();
            for (i, column) in columns.iter().enumerate() {
                let value = match row.get_ref(i).map_err(sqlite("read a column of", export))? {
                    ValueRef::Null => serde_json::Value::Null,
                    ValueRef::Integer(n) => n.into(),
                    ValueRef::Real(x) => x.into(),
                    ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
                    ValueRef::Blob(b) => b
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                        .into(),
                };
                object.insert(column.clone(), value);
            }
            serde_json::to_writer(&mut out, &object).map_err(|e| SnapshotError::Io {
                op: "write",
                path: tmp.clone(),
                source: e.into(),
            })?;
            out.write_all(b"\n").map_err(io("write", &tmp))?;
            count += 1;
        }
        // Flushed and closed here; `persist` fsyncs it before the rename.
        out.into_inner().map_err(|e| SnapshotError::Io {
            op: "write",
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        durable::persist(&mut durable::StdFs, &tmp, export)?;
        Ok(count)
    })();
    let detached = live
        .execute("DETACH DATABASE snap", [])
        .map_err(sqlite("detach", snapshot));
    let count = result?;
    detached?;
    Ok(count)
}

fn remove_if_present(path: &Path) -> Result<(), SnapshotError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", path)(e)),
        _ => Ok(()),
    }
}
