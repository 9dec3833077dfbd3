//! Several processes sharing one SQLite file, and writers killed with SIGKILL.
//!
//! A process kill leaves the kernel's page cache intact, so these tests prove that an id is
//! printed (acknowledged) only after its commit, and that the WAL recovers after an abrupt
//! stop. Power cuts, which also lose the page cache, are tested on the QEMU image.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Stdio};

use quote_store::{Database, Options, seed_quotes};

fn writer(db: &Path, tag: &str, count: u64) -> Child {
    tests::command(Path::new(env!("CARGO_BIN_EXE_quote-writer")))
        .args([db.to_str().unwrap(), tag, &count.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn quote-writer")
}

/// The ids a writer printed, read through one buffer for the whole life of the child: a
/// second reader would miss whatever the first had buffered but not yet returned.
fn acknowledged(child: &mut Child) -> impl Iterator<Item = i64> + use<> {
    BufReader::new(child.stdout.take().expect("stdout is piped and read once"))
        .lines()
        .map(|line| line.unwrap().parse().expect("an id per line"))
}

fn finish(child: &mut Child) -> (std::process::ExitStatus, String) {
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    (child.wait().unwrap(), stderr)
}

#[test]
fn three_processes_writing_one_file_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let per_writer = 150;
    // All three also race to create, check and migrate the new file.
    let mut children: Vec<_> = ["alpha", "beta", "gamma"]
        .iter()
        .map(|tag| (*tag, writer(&db, tag, per_writer)))
        .collect();
    let mut all_ids = BTreeSet::new();
    for (tag, child) in &mut children {
        let ids: Vec<i64> = acknowledged(child).collect();
        let (status, stderr) = finish(child);
        assert!(status.success(), "{tag}: {stderr}");
        assert_eq!(ids.len() as u64, per_writer, "{tag}");
        all_ids.extend(ids);
    }
    assert_eq!(
        all_ids.len() as u64,
        3 * per_writer,
        "ids are unique across processes"
    );

    let (database, _) = Database::open(&db, Options::default()).unwrap();
    let store = database.connect().unwrap();
    assert_eq!(
        store.count().unwrap(),
        seed_quotes().count() as i64 + all_ids.len() as i64
    );
    for id in &all_ids {
        assert!(
            store.get(*id).unwrap().is_some(),
            "quote {id} acknowledged but missing"
        );
    }
}

#[test]
fn kill_9_mid_writes_loses_no_acknowledged_quote() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("killed.db");
    let mut acked = Vec::new();
    for round in 0..3 {
        let tag = format!("round{round}");
        let mut child = writer(&db, &tag, 1_000_000);
        let mut lines = acknowledged(&mut child);
        let before_kill: Vec<i64> = lines.by_ref().take(200 + round * 37).collect();
        child.kill().unwrap(); // SIGKILL, mid-stream.
        // Ids printed between the last read and the kill were acknowledged too, and so were
        // any the reader had buffered already: the same reader goes on to the end.
        let after_kill: Vec<i64> = lines.collect();
        let status = child.wait().unwrap();
        assert!(!status.success(), "the writer was killed, not finished");
        // The writer numbers its quotes in order, so the n-th id of a round has text n.
        for (n, id) in before_kill.into_iter().chain(after_kill).enumerate() {
            acked.push((id, format!("{tag} #{n}")));
        }
    }
    // The file must open cleanly (integrity check on) and hold every acknowledged quote.
    let (database, _) =
        Database::open(&db, Options::default()).expect("killed writers left a sound database");
    let store = database.connect().unwrap();
    for (id, text) in &acked {
        let quote = store
            .get(*id)
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged quote {id} lost"));
        assert_eq!(&quote.text, text);
    }
}
