//! What only the PostgreSQL backend has: replicas migrating one shared database at once, a
//! database that goes away and comes back, and a password that must never be repeated.

use std::net::SocketAddr;

use quote_store::{Error, PgStorage, PgTarget, Target, seed_quotes};
use tests::postgres::{PASSWORD, Postgres};

use crate::process::{Service, http};

fn target(url: &str) -> PgTarget {
    match Target::parse(url, None).unwrap() {
        Target::Postgres(target) => *target,
        Target::Sqlite(path) => panic!("{url} parsed as the file {}", path.display()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn three_replicas_starting_at_once_on_an_empty_database_migrate_exactly_once() {
    let Some(pg) = Postgres::shared() else {
        return;
    };
    let name = pg.create_database();
    let target = target(&pg.url(&name));
    let open = || {
        let target = target.clone();
        tokio::spawn(async move { PgStorage::open(&target, 1).await })
    };
    let (a, b, c) = tokio::join!(open(), open(), open());
    let mut applied: Vec<Vec<u32>> = [a, b, c]
        .into_iter()
        .map(|r| r.unwrap().unwrap().1.applied)
        .collect();
    applied.sort();
    assert_eq!(applied, vec![vec![], vec![], vec![1, 2]]);
    assert_eq!(
        pg.psql(
            &name,
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_migrations"
        ),
        "1,2"
    );
    assert_eq!(
        pg.psql(&name, "SELECT COUNT(*) FROM quotes"),
        seed_quotes().count().to_string(),
        "seeded more than once"
    );
}

#[tokio::test]
async fn a_schema_newer_than_the_build_is_refused() {
    let Some(pg) = Postgres::shared() else {
        return;
    };
    let name = pg.create_database();
    let target = target(&pg.url(&name));
    PgStorage::open(&target, 1).await.unwrap();
    pg.psql(
        &name,
        "INSERT INTO schema_migrations (version, name) VALUES (99, 'from the future')",
    );
    let err = PgStorage::open(&target, 1).await.unwrap_err();
    assert!(
        matches!(err, Error::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
    assert!(!err.to_string().contains(PASSWORD), "{err}");
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, None).unwrap()
}

fn post(addr: SocketAddr, text: &str) -> (u16, String) {
    let body = format!(r#"{{"text":"{text}","author":"Outage Test"}}"#);
    http(addr, "POST", "/quotes", Some(&body)).unwrap()
}

/// The metric's value in the OpenMetrics text.
fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

#[test]
fn readiness_follows_the_database_and_liveness_ignores_it_without_a_restart() {
    let Some(mut pg) = Postgres::start() else {
        return;
    };
    let name = pg.create_database();
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let env = [("QUOTE_DB_PASSWORD_FILE", password_file.to_str().unwrap())];
    let mut seen = Vec::new();

    // Started while the database is down: alive, not ready, and it connects once it is up.
    pg.pause();
    let url = pg.url_without_password(&name);
    let mut service = Service::start_with_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "--db",
            &url,
            "--instance",
            "pg-0",
        ],
        &env,
    );
    let line = service.wait_for_log("listening");
    let addr: SocketAddr = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("addr="))
        .expect("address in the listening line")
        .parse()
        .unwrap();
    service.wait_for_log("database unreachable");
    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert_eq!(get(addr, "/healthz").0, 200);
    pg.resume();
    service.wait_for_log("database open");
    assert_eq!(get(addr, "/readyz").0, 200);
    let (status, body) = post(addr, "before the outage");
    assert_eq!(status, 201, "{body}");
    seen.push(body);

    // The database goes away: readiness 503, liveness 200, requests 503, failures counted.
    pg.pause();
    service.wait_for_log("database unreachable");
    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("database unreachable"), "{body}");
    let (status, body) = get(addr, "/healthz");
    assert_eq!(status, 200, "liveness must not follow the database: {body}");
    for (status, body) in [get(addr, "/quotes/1"), post(addr, "during the outage")] {
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("unreachable"), "{body}");
        seen.push(body);
    }
    let (_, metrics) = get(addr, "/metrics");
    assert!(
        metric(&metrics, "quote_db_unreachable_total") >= 1,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "quote_db_reachable"), 0, "{metrics}");

    // It comes back: ready again, same process, and the data from before is there.
    pg.resume();
    service.wait_for_log("database answers again");
    assert_eq!(get(addr, "/readyz").0, 200);
    assert!(
        service.child.try_wait().unwrap().is_none(),
        "the process restarted"
    );
    let (status, body) = post(addr, "after the outage");
    assert_eq!(status, 201, "{body}");
    let (status, body) = get(addr, "/quotes?limit=100&after=50");
    assert_eq!(status, 200);
    assert!(
        body.contains("before the outage") && body.contains("after the outage"),
        "{body}"
    );
    assert!(
        !body.contains("during the outage"),
        "a refused write was stored: {body}"
    );
    for path in ["/version", "/metrics", "/openapi.json", "/nowhere"] {
        seen.push(get(addr, path).1);
    }

    service.signal("TERM");
    assert_eq!(service.wait_exit().code(), Some(0));
    seen.extend(service.log.iter().cloned());
    for text in &seen {
        assert!(!text.contains(PASSWORD), "the password leaked: {text}");
    }
}

#[test]
fn the_password_never_appears_in_logs_or_errors() {
    let Some(pg) = Postgres::shared() else {
        return;
    };
    let name = pg.create_database();
    // Served with the password in the URL: the log names the database without it.
    let (mut service, addr) = Service::ready_on(&pg.url(&name), &[], &[]);
    let (status, version) = get(addr, "/version");
    assert_eq!(status, 200);
    service.signal("TERM");
    assert_eq!(service.wait_exit().code(), Some(0));
    let log = service.log.join("\n");
    assert!(
        log.contains(&format!(
            "postgres://postgres@127.0.0.1:{}/{name}",
            pg.port()
        )),
        "{log}"
    );

    // A wrong password stops the service (retrying cannot help) without repeating it.
    let wrong = "not-the-password-31337";
    let url = format!("postgres://postgres:{wrong}@127.0.0.1:{}/{name}", pg.port());
    let mut refused = Service::start(&["--listen", "127.0.0.1:0", "--db", &url]);
    assert_eq!(refused.wait_exit().code(), Some(quote_service::exit::IO));
    let refused_log = refused.log.join("\n");
    assert!(
        refused_log.contains("password authentication failed"),
        "{refused_log}"
    );

    // A malformed URL is a configuration error that does not quote the URL back.
    let url = format!("postgres://postgres:{wrong}@127.0.0.1:notaport/{name}");
    let mut bad = Service::start(&["--listen", "127.0.0.1:0", "--db", &url]);
    assert_eq!(bad.wait_exit().code(), Some(quote_service::exit::CONFIG));
    let bad_log = bad.log.join("\n");
    assert!(bad_log.contains("not valid"), "{bad_log}");

    for text in [&log, &version] {
        assert!(!text.contains(PASSWORD), "the password leaked: {text}");
    }
    for text in [&refused_log, &bad_log] {
        assert!(!text.contains(wrong), "the password leaked: {text}");
    }
}

#[test]
fn snapshot_and_restore_on_postgres_are_refused_saying_why() {
    let url = "postgres://quote@127.0.0.1:5432/quotes";
    for args in [
        vec!["--db", url, "snapshot", "--to", "/nonexistent/snap.db"],
        vec![
            "--db",
            url,
            "restore",
            "--from",
            "/nonexistent/a",
            "--export",
            "/nonexistent/b",
        ],
    ] {
        let mut service = Service::start(&args);
        assert_eq!(
            service.wait_exit().code(),
            Some(quote_service::exit::CONFIG)
        );
        let log = service.log.join("\n");
        assert!(
            log.contains("SQLite file only") && log.contains("pg_dump"),
            "{log}"
        );
    }
}

#[tokio::test]
async fn random_in_a_sparse_table_returns_only_existing_quotes_and_each_of_them() {
    let Some(storage) = crate::api::postgres_storage().await else {
        return;
    };
    let ids: Vec<i64> = storage
        .list(None, 100)
        .await
        .unwrap()
        .quotes
        .iter()
        .map(|q| q.id)
        .collect();
    let keep = [ids[0], ids[ids.len() - 1]];
    for id in ids.iter().filter(|id| !keep.contains(id)) {
        assert!(storage.delete(*id).await.unwrap());
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let quote = storage.random().await.unwrap().expect("two quotes left");
        assert!(keep.contains(&quote.id), "drew deleted id {}", quote.id);
        seen.insert(quote.id);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), keep.to_vec());
}
