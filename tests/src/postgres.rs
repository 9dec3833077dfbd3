//! A real PostgreSQL server for tests: Debian's server binaries, a throwaway cluster in a
//! temporary directory, run as an unprivileged user, on loopback only, stopped afterwards.
//!
//! Where the binaries are missing, [`Postgres::start`] says so loudly and returns `None`
//! (the caller skips); with `CI=true` it panics instead, so CI cannot pass by skipping.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The superuser's password; tests check that it never leaks.
pub const PASSWORD: &str = "pg-test-secret-7f3a91";
/// Failsafe for waiting on the server's "ready" line; reaching it fails the test.
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `postgres` and stops it (SIGINT, fast shutdown) when its stdin says so: a `pause`
/// line keeps the cluster's files (the owner restarts it or deletes them); end of file, which
/// is what the pipe gives when the test process died without running destructors (a shared
/// server in a `static`, an abort), also deletes `$CLUSTER_DIR`.
const WRAPPER: &str = r#""$@" </dev/null &
pid=$!
if read -r _; then keep=1; else keep=; fi
kill -INT $pid 2>/dev/null
wait $pid
[ -n "$keep" ] || rm -rf "$CLUSTER_DIR""#;

/// One PostgreSQL cluster. Dropping it stops the server and deletes its files.
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    user: Option<String>,
    running: Option<Running>,
    log: Arc<Mutex<Vec<String>>>,
}

struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// Debian's newest server binaries: `/usr/lib/postgresql/<version>/bin`.
fn server_bin() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

fn uid_of(user: &str) -> u32 {
    let out = Command::new("id")
        .args(["-u", user])
        .output()
        .expect("run id");
    assert!(out.status.success(), "no user {user}");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a uid")
}

/// Runs `command` to completion; its trimmed stdout, or a panic with its stderr.
fn checked(command: &mut Command, what: &str) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Postgres {
    /// Initialises and starts a new cluster, or `None` (said loudly) without the binaries.
    pub fn start() -> Option<Postgres> {
        // Under qemu-user (the aarch64 pass) the PostgreSQL client is not in what ships: the
        // device's binaries are built without the `postgres` feature, and the cluster's image
        // is tested natively. Said loudly, as the power-cut harness does.
        // CI's emulated pass skips them by name (`.ci/run`).
        if crate::emulated() {
            crate::skip("under an emulator: the PostgreSQL tests run natively");
            return None;
        }
        let Some(bin) = server_bin() else {
            assert!(
                !crate::in_ci(),
                "CI=true but the PostgreSQL server binaries are missing \
                 (/usr/lib/postgresql/*/bin): the PostgreSQL tests must run in CI"
            );
            #[allow(clippy::print_stderr, reason = "a skipped test must be visible")]
            {
                eprintln!(
                    "\n*** SKIPPED: PostgreSQL tests: no /usr/lib/postgresql/*/bin/initdb \
                     (apt-get install postgresql) ***\n"
                );
            }
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("quote-edge-pg-")
            .tempdir()
            .expect("temporary directory");
        // PostgreSQL refuses to run as root: the cluster belongs to `nobody`.
        let user = is_root().then(|| "nobody".to_owned());
        if let Some(user) = &user {
            std::os::unix::fs::chown(dir.path(), Some(uid_of(user)), None)
                .expect("chown the cluster directory");
        }
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, PASSWORD).expect("write the password file");
        if let Some(user) = &user {
            std::os::unix::fs::chown(&pwfile, Some(uid_of(user)), None).expect("chown pwfile");
        }
        let mut pg = Postgres {
            bin,
            dir,
            port: free_port(),
            user,
            running: None,
            log: Arc::new(Mutex::new(Vec::new())),
        };
        let data = pg.data();
        let mut initdb = pg.as_owner(&pg.bin.join("initdb"));
        initdb
            .args([
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "-U",
                "postgres",
            ])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("-D")
            .arg(&data);
        checked(&mut initdb, "initdb");
        std::fs::remove_file(&pwfile).expect("remove the password file");
        pg.resume();
        Some(pg)
    }

    /// One server shared by every test of this process (each test takes its own database
    /// with [`Postgres::create_database`]). Stopped when the process exits: see `WRAPPER`.
    pub fn shared() -> Option<&'static Postgres> {
        static SHARED: OnceLock<Option<Postgres>> = OnceLock::new();
        SHARED.get_or_init(Postgres::start).as_ref()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A command run as the cluster's owner.
    fn as_owner(&self, program: &Path) -> Command {
        let mut words = self.as_owner_args(program);
        let mut command = Command::new(words.remove(0));
        command.args(words);
        command
    }

    /// `setpriv` rather than `runuser`: it execs in place, so the wrapper's `$!` is the server
    /// itself and SIGINT reaches it (runuser would ignore SIGINT and wait).
    fn as_owner_args(&self, program: &Path) -> Vec<String> {
        let program = program.display().to_string();
        match &self.user {
            Some(user) => vec![
                "setpriv".into(),
                format!("--reuid={user}"),
                "--regid=nogroup".into(),
                "--clear-groups".into(),
                program,
            ],
            None => vec![program],
        }
    }

    /// Starts the server (again) on the same port and data, and returns once it accepts
    /// connections: its own "ready to accept connections" log line is the event.
    pub fn resume(&mut self) {
        assert!(self.running.is_none(), "the server is already running");
        let mut child = Command::new("sh")
            .args(["-c", WRAPPER, "sh"])
            .args(self.as_owner_args(&self.bin.join("postgres")))
            .arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.data().display()))
            .args(["-c", "max_connections=200", "-c", "fsync=off"])
            .env("CLUSTER_DIR", self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start postgres");
        let stdin = child.stdin.take();
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = channel();
        let log = Arc::clone(&self.log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("ready to accept connections") {
                    let _ = tx.send(());
                }
                log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        self.running = Some(Running { child, stdin });
        self.wait_ready(&rx);
    }

    fn wait_ready(&self, ready: &Receiver<()>) {
        if ready.recv_timeout(DEADLINE).is_err() {
            panic!(
                "postgres did not become ready; its log:\n{}",
                self.log
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .join("\n")
            );
        }
    }

    /// Stops the server (fast shutdown) and waits until it has exited; the data stays.
    pub fn pause(&mut self) {
        if let Some(mut running) = self.running.take() {
            // The wrapper's signal to stop the server, keep the files, and wait.
            if let Some(mut stdin) = running.stdin.take() {
                let _ = stdin.write_all(b"pause\n");
            }
            let _ = running.child.wait();
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A fresh, empty database; returns its name.
    pub fn create_database(&self) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        name
    }

    /// Runs `sql` in `database` as the superuser; returns psql's output (unaligned, no headers).
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let mut psql = Command::new(self.bin.join("psql"));
        psql.args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .arg("-p")
        .arg(self.port.to_string())
        .arg("-d")
        .arg(database)
        .arg("-c")
        .arg(sql)
        .env("PGPASSWORD", PASSWORD);
        checked(&mut psql, &format!("psql {sql:?}"))
    }

    /// `postgres://postgres:PASSWORD@127.0.0.1:PORT/DATABASE`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// The same URL without the password (for `QUOTE_DB_PASSWORD_FILE`).
    pub fn url_without_password(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The server's log so far, for a failing test's message.
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// `pgbench`, `psql` and friends, next to the server.
    pub fn bin(&self) -> &Path {
        &self.bin
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.pause();
    }
}
