//! Store behaviour on real database files in a temporary directory.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::{Database, Error, NewQuote, Options, Store, latest_version, seed_quotes};

fn temp_db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("quotes.db");
    (dir, path)
}

fn open(path: &Path) -> (Database, Store) {
    let (db, _) = Database::open(path, Options::default()).expect("open");
    let store = db.connect().expect("connect");
    (db, store)
}

fn quote(text: &str) -> NewQuote {
    NewQuote::new(text, "Test Author").expect("valid quote")
}

#[test]
fn new_database_is_seeded_once_and_migrations_recorded() {
    let (_dir, path) = temp_db();
    let (_, first) = Database::open(&path, Options::default()).unwrap();
    assert_eq!(first.applied, vec![1, 2]);
    assert_eq!(first.schema_version, latest_version());
    let (_, second) = Database::open(&path, Options::default()).unwrap();
    assert!(second.applied.is_empty());
    let (_, store) = open(&path);
    assert_eq!(store.count().unwrap(), seed_quotes().count() as i64);
}

#[test]
fn database_is_in_wal_mode_with_full_sync() {
    let (_dir, path) = temp_db();
    let (_db, store) = open(&path);
    let mode: String = store
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    let sync: i64 = store
        .conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(sync, 2, "synchronous must be FULL (2)");
}

#[test]
fn deleted_seed_quotes_do_not_come_back() {
    let (_dir, path) = temp_db();
    let (_db, mut store) = open(&path);
    let first = store.list(None, 1).unwrap().quotes[0].id;
    assert!(store.delete(first).unwrap());
    assert!(!store.delete(first).unwrap(), "second delete finds nothing");
    drop(store);
    let (_db, store) = open(&path);
    assert_eq!(store.get(first).unwrap(), None);
}

#[test]
fn created_quote_reads_back_with_a_fresh_id() {
    let (_dir, path) = temp_db();
    let (_db, mut store) = open(&path);
    let created = store.create(&quote("  Measure twice.  ")).unwrap();
    assert_eq!(created.text, "Measure twice.");
    assert!(created.created_at.ends_with('Z'), "{}", created.created_at);
    assert_eq!(store.get(created.id).unwrap(), Some(created.clone()));
    // Ids are never reused, even for the newest row after a delete.
    assert!(store.delete(created.id).unwrap());
    let again = store.create(&quote("Cut once.")).unwrap();
    assert!(again.id > created.id);
}

#[test]
fn pages_cover_every_quote_exactly_once_in_order() {
    let (_dir, path) = temp_db();
    let (_db, mut store) = open(&path);
    for i in 0..37 {
        store.create(&quote(&format!("extra {i}"))).unwrap();
    }
    let total = store.count().unwrap() as usize;
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.list(after, 7).unwrap();
        assert!(page.quotes.len() <= 7);
        seen.extend(page.quotes.iter().map(|q| q.id));
        match page.next {
            Some(next) => {
                assert_eq!(Some(&next), seen.last());
                after = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(seen.len(), total);
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "ids strictly increase"
    );
}

#[test]
fn list_limit_is_clamped() {
    let (_dir, path) = temp_db();
    let (_db, store) = open(&path);
    assert_eq!(store.list(None, 0).unwrap().quotes.len(), 1);
    assert_eq!(
        store.list(None, 10_000).unwrap().quotes.len(),
        seed_quotes().count().min(100)
    );
}

#[test]
fn random_pick_is_uniform_over_sparse_ids() {
    let (_dir, path) = temp_db();
    let (_db, mut store) = open(&path);
    // Leave five quotes spread over a wide id range, so most draws miss.
    let ids: Vec<_> = store
        .list(None, 100)
        .unwrap()
        .quotes
        .iter()
        .map(|q| q.id)
        .collect();
    let keep = [
        ids[0],
        ids[1],
        ids[30],
        ids[ids.len() - 2],
        ids[ids.len() - 1],
    ];
    for id in ids.iter().filter(|id| !keep.contains(id)) {
        store.delete(*id).unwrap();
    }
    let draws = 5000;
    let mut hits: HashMap<i64, usize> = HashMap::new();
    for _ in 0..draws {
        *hits.entry(store.random().unwrap().unwrap().id).or_default() += 1;
    }
    assert_eq!(
        hits.len(),
        keep.len(),
        "every remaining quote is drawn: {hits:?}"
    );
    // Expected 1000 each, standard deviation about 28: 150 is more than five of them.
    for (id, n) in &hits {
        assert!(
            (850..=1150).contains(n),
            "quote {id} drawn {n} times of {draws}"
        );
    }
}

#[test]
fn random_on_an_empty_table_is_none() {
    let (_dir, path) = temp_db();
    let (_db, mut store) = open(&path);
    for q in store.list(None, 100).unwrap().quotes {
        store.delete(q.id).unwrap();
    }
    assert_eq!(store.random().unwrap(), None);
}

#[test]
fn garbage_file_is_refused_as_corrupt() {
    let (_dir, path) = temp_db();
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let err = Database::open(&path, Options::default()).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    // Refusing must not have rewritten the file.
    assert_eq!(std::fs::read(&path).unwrap(), vec![0x5a; 8192]);
}

#[test]
fn damaged_pages_are_refused_as_corrupt() {
    let (_dir, path) = temp_db();
    {
        let (_db, mut store) = open(&path);
        for i in 0..400 {
            store
                .create(&quote(&format!("{i} {}", "padding ".repeat(40))))
                .unwrap();
        }
        // Closing the last connection checkpoints the WAL into the main file.
    }
    assert!(std::fs::metadata(&path).unwrap().len() > 16 * 4096);
    let mut file = OpenOptions::new().write(true).open(&path).unwrap();
    for page in [3u64, 7, 11] {
        file.seek(SeekFrom::Start(page * 4096)).unwrap();
        file.write_all(&[0xff; 4096]).unwrap();
    }
    drop(file);
    let err = Database::open(&path, Options::default()).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
}

#[test]
fn newer_schema_is_refused() {
    let (_dir, path) = temp_db();
    let (_db, store) = open(&path);
    store
        .conn
        .execute(
            "INSERT INTO schema_migrations (version, name) VALUES (99, 'future')",
            [],
        )
        .unwrap();
    drop(store);
    let err = Database::open(&path, Options::default()).unwrap_err();
    assert!(
        matches!(err, Error::SchemaTooNew { found: 99, .. }),
        "{err:?}"
    );
}

#[test]
fn full_storage_refuses_the_write_and_keeps_every_quote() {
    let (_dir, path) = temp_db();
    drop(open(&path));
    let size = std::fs::metadata(&path).unwrap().len();
    let options = Options {
        max_size: Some(size + 8 * 4096),
        ..Options::default()
    };
    let (db, _) = Database::open(&path, options).unwrap();
    let mut store = db.connect().unwrap();
    let mut stored = Vec::new();
    let err = loop {
        match store.create(&quote(&format!("{} {}", stored.len(), "x".repeat(900)))) {
            Ok(q) => stored.push(q),
            Err(err) => break err,
        }
        assert!(stored.len() < 10_000, "the size limit never took effect");
    };
    assert!(matches!(err, Error::Full { .. }), "{err:?}");
    assert!(!stored.is_empty());
    for q in &stored {
        assert_eq!(store.get(q.id).unwrap().as_ref(), Some(q));
    }
    assert_eq!(
        store.count().unwrap(),
        (seed_quotes().count() + stored.len()) as i64
    );
}

#[test]
fn concurrent_first_opens_seed_exactly_once() {
    for _ in 0..20 {
        concurrent_first_open_round();
    }
}

fn concurrent_first_open_round() {
    let (_dir, path) = temp_db();
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || Database::open(&path, Options::default()).map(|(_, r)| r))
        })
        .collect();
    let reports: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().unwrap().expect("open"))
        .collect();
    assert_eq!(reports.iter().filter(|r| !r.applied.is_empty()).count(), 1);
    let (_db, store) = open(&path);
    assert_eq!(store.count().unwrap(), seed_quotes().count() as i64);
}

#[test]
fn restore_undoes_a_newer_schema_and_exports_every_row_written_since_the_snapshot() {
    let (dir, path) = temp_db();
    let (_, mut store) = open(&path);
    let before = store.count().unwrap();
    let snap = dir.path().join("snapshot.db");
    assert_eq!(
        crate::snapshot(&path, &snap, std::time::Duration::from_secs(5)).unwrap(),
        before.unsigned_abs()
    );
    // A trial release migrates the schema and writes through its own connection, which stays
    // open across the restore (as a replica would).
    store
        .conn
        .execute_batch("ALTER TABLE quotes ADD COLUMN lang TEXT; CREATE TABLE extra(x);")
        .unwrap();
    let a = store.create(&quote("written during the trial")).unwrap();
    store
        .conn
        .execute("UPDATE quotes SET lang = 'en' WHERE id = ?1", [a.id])
        .unwrap();
    store.create(&quote("second trial quote")).unwrap();
    let export = dir.path().join("trial-quotes.jsonl");
    let report = crate::restore(&path, &snap, &export, std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(report.exported, 2);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["text"], "written during the trial");
    assert_eq!(lines[0]["lang"], "en");
    assert_eq!(lines[1]["text"], "second trial quote");
    // The old release opens the restored file as if the trial never happened.
    let (_, reopened) = Database::open(&path, Options::default()).unwrap();
    assert_eq!(reopened.schema_version, latest_version());
    let (_, fresh) = open(&path);
    assert_eq!(fresh.count().unwrap(), before);
    let has_extra: i64 = fresh
        .conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'extra'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(has_extra, 0, "tables the trial created are gone");
}

#[test]
fn a_restore_of_many_steps_puts_back_exactly_the_snapshot() {
    let (dir, path) = temp_db();
    let (_, mut store) = open(&path);
    // About 1 MiB: several restore steps of 64 pages, and more than the snapshot's cache.
    store.conn.execute_batch("BEGIN").unwrap();
    for i in 0..1000 {
        store
            .create(&quote(&format!("{i:03} {}", "x".repeat(990))))
            .unwrap();
    }
    store.conn.execute_batch("COMMIT").unwrap();
    let before = store.count().unwrap();
    let snap = dir.path().join("snapshot.db");
    let busy = std::time::Duration::from_secs(5);
    crate::snapshot(&path, &snap, busy).unwrap();
    assert!(std::fs::metadata(&snap).unwrap().len() > 3 * 64 * 4096);
    store
        .conn
        .execute("DELETE FROM quotes WHERE id % 2 = 0", [])
        .unwrap();
    store.create(&quote("written during the trial")).unwrap();
    let export = dir.path().join("trial-quotes.jsonl");
    let report = crate::restore(&path, &snap, &export, busy).unwrap();
    assert_eq!(report.exported, 1);
    let (_, fresh) = open(&path);
    assert_eq!(fresh.count().unwrap(), before);
    let check: String = fresh
        .conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[test]
fn a_restore_done_again_never_replaces_the_first_export() {
    let (dir, path) = temp_db();
    let (_, mut store) = open(&path);
    let snap = dir.path().join("snapshot.db");
    crate::snapshot(&path, &snap, std::time::Duration::from_secs(5)).unwrap();
    store.create(&quote("only in the first export")).unwrap();
    let export = dir.path().join("trial-quotes.jsonl");
    let busy = std::time::Duration::from_secs(5);
    assert_eq!(
        crate::restore(&path, &snap, &export, busy)
            .unwrap()
            .exported,
        1
    );
    // The same restore again (as after a cut that came once the first had finished): nothing
    // is left to export, and the first export, the only copy of its row, stays.
    let error = crate::restore(&path, &snap, &export, busy).unwrap_err();
    assert!(
        error.to_string().contains("never replaced")
            && error.to_string().contains("trial-quotes.jsonl"),
        "{error}"
    );
    assert!(
        std::fs::read_to_string(&export)
            .unwrap()
            .contains("only in the first export")
    );
}

#[test]
fn snapshot_of_a_missing_database_is_an_error_naming_it() {
    let (dir, path) = temp_db();
    let error = crate::snapshot(
        &path,
        &dir.path().join("s.db"),
        std::time::Duration::from_secs(1),
    )
    .unwrap_err();
    assert!(error.to_string().contains("quotes.db"), "{error}");
}
