//! The real binary: an ephemeral port, SIGTERM with a request in flight, exit codes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// Failsafe for waits on events; reaching it fails the test, it never paces it.
const DEADLINE: Duration = Duration::from_secs(30);

pub(crate) struct Service {
    pub(crate) child: Child,
    lines: Receiver<String>,
    pub(crate) log: Vec<String>,
}

impl Service {
    pub(crate) fn start(args: &[&str]) -> Service {
        Service::start_with_env(args, &[])
    }

    pub(crate) fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Service {
        let mut child = tests::command(Path::new(env!("CARGO_BIN_EXE_quote-service")))
            .args(args)
            .envs(env.iter().copied())
            .env("QUOTE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn quote-service");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Service {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Waits for a log line containing `needle` and returns it.
    pub(crate) fn wait_for_log(&mut self, needle: &str) -> String {
        let until = Instant::now() + DEADLINE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no log line with {needle:?}; got:\n{}", self.log.join("\n")),
            }
        }
    }

    /// Starts on port 0 and waits until the database is open; returns the bound address.
    fn ready(db: &Path, extra: &[&str]) -> (Service, SocketAddr) {
        Service::ready_on(db.to_str().unwrap(), extra, &[])
    }

    /// Like `ready` for any `--db` value, with extra environment variables.
    pub(crate) fn ready_on(
        db: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (Service, SocketAddr) {
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--db",
            db,
            "--instance",
            "proc-0",
        ];
        args.extend_from_slice(extra);
        let mut service = Service::start_with_env(&args, env);
        let line = service.wait_for_log("listening");
        let addr = line
            .split_whitespace()
            .find_map(|word| word.strip_prefix("addr="))
            .expect("address in the listening line")
            .parse()
            .unwrap();
        service.wait_for_log("ready");
        (service, addr)
    }

    pub(crate) fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit: its stderr closing is the event, then `wait` reaps it.
    pub(crate) fn wait_exit(&mut self) -> ExitStatus {
        let until = Instant::now() + DEADLINE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.log.push(line),
                Err(RecvTimeoutError::Disconnected) => return self.child.wait().unwrap(),
                Err(RecvTimeoutError::Timeout) => {
                    panic!("quote-service did not exit:\n{}", self.log.join("\n"))
                }
            }
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 exchange on a fresh connection: (status, body).
pub(crate) fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status line in {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// Holds the database's write lock, so that a POST stays in flight until released.
fn hold_write_lock(db: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    conn
}

/// Waits until the service reports `n` requests in flight (the metrics request included).
fn wait_in_flight(addr: SocketAddr, n: u32) {
    let needle = format!("quote_http_requests_in_flight {n}\n");
    let until = Instant::now() + DEADLINE;
    while Instant::now() < until {
        let (_, metrics) = http(addr, "GET", "/metrics", None).unwrap();
        if metrics.contains(&needle) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("never saw {n} requests in flight");
}

#[test]
fn sigterm_lets_the_request_in_flight_finish_then_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("quotes.db");
    let (mut service, addr) = Service::ready(&db, &["--shutdown-grace", "20s"]);
    let (status, body) = http(addr, "GET", "/quotes/1", None).unwrap();
    assert_eq!(status, 200);
    assert!(body.contains(r#""served_by":"proc-0""#), "{body}");

    let lock = hold_write_lock(&db);
    let post = std::thread::spawn(move || {
        http(
            addr,
            "POST",
            "/quotes",
            Some(r#"{"text":"Finish what you start.","author":"Drain Test"}"#),
        )
    });
    wait_in_flight(addr, 2);
    service.signal("TERM");
    service.wait_for_log("draining");
    lock.execute_batch("COMMIT").unwrap();

    let (status, body) = post
        .join()
        .unwrap()
        .expect("the in-flight POST got an answer");
    assert_eq!(status, 201, "{body}");
    let exit = service.wait_exit();
    assert_eq!(exit.code(), Some(0), "{}", service.log.join("\n"));
    let stored: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM quotes WHERE author = 'Drain Test'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, 1);
}

#[test]
fn a_stuck_request_does_not_hold_shutdown_past_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("quotes.db");
    let (mut service, addr) = Service::ready(&db, &["--shutdown-grace", "200ms"]);
    let lock = hold_write_lock(&db);
    let post = std::thread::spawn(move || {
        http(
            addr,
            "POST",
            "/quotes",
            Some(r#"{"text":"Never acknowledged.","author":"Stuck"}"#),
        )
    });
    wait_in_flight(addr, 2);
    service.signal("TERM");
    // The lock is still held: only the grace period can end the process.
    let exit = service.wait_exit();
    assert_eq!(exit.code(), Some(0));
    assert!(
        service.log.iter().any(|l| l.contains("grace period")),
        "{}",
        service.log.join("\n")
    );
    let answer = post.join().unwrap();
    assert!(
        !matches!(answer, Ok((201, _))),
        "a request cut off by shutdown was acknowledged"
    );
    drop(lock);
}

#[test]
fn a_corrupt_database_is_refused_with_a_data_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("quotes.db");
    std::fs::write(
        &db,
        b"this is not an SQLite database, it is a test of refusal".repeat(100),
    )
    .unwrap();
    let mut service = Service::start(&["--listen", "127.0.0.1:0", "--db", db.to_str().unwrap()]);
    let exit = service.wait_exit();
    assert_eq!(
        exit.code(),
        Some(quote_service::exit::DATA),
        "{}",
        service.log.join("\n")
    );
    let log = service.log.join("\n");
    assert!(
        log.contains("corrupt") && log.contains(db.to_str().unwrap()),
        "{log}"
    );
}

#[test]
fn an_empty_token_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "\n").unwrap();
    let db = dir.path().join("quotes.db");
    let mut service = Service::start(&[
        "--db",
        db.to_str().unwrap(),
        "--admin-token-file",
        token.to_str().unwrap(),
    ]);
    let exit = service.wait_exit();
    assert_eq!(exit.code(), Some(quote_service::exit::CONFIG));
    assert!(service.log.join("\n").contains("is empty"));
    assert!(
        !db.exists(),
        "a bad configuration must not create the database"
    );
}

#[test]
fn a_malformed_listen_address_is_a_usage_error() {
    let mut service = Service::start(&["--listen", "localhost-8080"]);
    let exit = service.wait_exit();
    assert_eq!(exit.code(), Some(quote_service::exit::USAGE));
    assert!(
        service.log.join("\n").contains("--listen"),
        "{}",
        service.log.join("\n")
    );
}

#[test]
fn snapshot_and_restore_commands_round_trip_and_report_failures() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("quotes.db");
    let snap = dir.path().join("snap.db");
    let export = dir.path().join("trial.jsonl");
    let db_arg = db.to_str().unwrap();
    // A missing database is an I/O error naming the file, and creates nothing.
    let mut missing = Service::start(&["--db", db_arg, "snapshot", "--to", snap.to_str().unwrap()]);
    assert_eq!(missing.wait_exit().code(), Some(quote_service::exit::IO));
    assert!(
        missing.log.join("\n").contains(db_arg),
        "{}",
        missing.log.join("\n")
    );
    assert!(!snap.exists() && !db.exists());

    let (mut service, addr) = Service::ready(&db, &[]);
    let mut snapshot =
        Service::start(&["--db", db_arg, "snapshot", "--to", snap.to_str().unwrap()]);
    assert_eq!(
        snapshot.wait_exit().code(),
        Some(0),
        "{}",
        snapshot.log.join("\n")
    );
    let (status, _) = http(
        addr,
        "POST",
        "/quotes",
        Some(r#"{"text":"after the snapshot","author":"Trial"}"#),
    )
    .unwrap();
    assert_eq!(status, 201);
    let mut restore = Service::start(&[
        "--db",
        db_arg,
        "restore",
        "--from",
        snap.to_str().unwrap(),
        "--export",
        export.to_str().unwrap(),
    ]);
    assert_eq!(
        restore.wait_exit().code(),
        Some(0),
        "{}",
        restore.log.join("\n")
    );
    assert!(
        restore.log.join("\n").contains("exported=1"),
        "{}",
        restore.log.join("\n")
    );
    assert!(
        std::fs::read_to_string(&export)
            .unwrap()
            .contains("after the snapshot")
    );
    service.signal("TERM");
    assert_eq!(service.wait_exit().code(), Some(0));
}
