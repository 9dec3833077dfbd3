//! Power cuts during an update: the real `edge-supervisor` binary (built with the `failpoints`
//! feature) is aborted at every write, fsync and rename of the update path, and at random byte
//! offsets of the payload stream, then started again. Each time the device must come up on a
//! consistent slot with every acknowledged quote, and finish the update: committed (a good
//! bundle) or rolled back (one whose release crashes).
//!
//! The fail points are not listed here: a first update of each bundle runs in counting mode
//! (`QUOTE_EDGE_FAILPOINT_RECORD`), which records every point reached, how often, and how many
//! release bytes the slot had received by then. The harness then cuts at each point, once
//! per time it is reached, and fails if a point in the code (a `failpoint::hit("…")` in
//! `crates/`) is reached by no update: a new point is cut without editing this file.
//!
//! Cuts during the recovery from a cut: the power-on after a cut in the payload (the install
//! resumes), after one right after an install began (the slot is abandoned) and after one
//! during a rollback is counted too, and cut at every point it reaches. A release still on
//! trial at the third start since (`max_trial_boots`) must be rolled back at that start.
//!
//! Every cut inside the payload (at a random byte, or right after a journal mark) must resume
//! from the last journal mark before the cut, exactly: the receipt's `resumed_bytes` is that
//! mark's offset as the counting run recorded it, so a resume that starts over, or keeps less
//! than it could, fails.
//!
//! The database starts with about 700 KiB of quotes, so that the snapshot and the restore of each
//! update are long enough to be cut in the middle: the release's database tool (a child of the
//! supervisor) has its own points, `store.vacuuming` (while `VACUUM INTO` runs, its copy partly
//! written) and `store.restoring` (pages copied, more to come). A child cannot take the device
//! down by dying, so it freezes and leaves a file saying so (`QUOTE_EDGE_FAILPOINT_HALT`); the
//! harness then cuts the power.
//!
//! The supervisor runs as PID 1 of its own PID namespace (`unshare --pid --fork`), so when it
//! aborts the kernel kills its replicas with it, as a power cut would. Its data directory is a
//! crash disk (`tests::crashfs`, FUSE): after the last process is gone, the disk drops every
//! write, truncate, create, rename and unlink that was not fsynced (a file's content at its
//! fsync, a name at its directory's), as the page cache is lost with the power. A missing fsync
//! therefore fails the harness: `QUOTE_EDGE_FAILPOINT_SKIP_SYNC=NAME` (a failpoints build only)
//! leaves one out on purpose, and `a_missing_fsync_fails_the_power_cut_harness` shows it.
//!
//! `QUOTE_EDGE_POWERCUT_RANDOM` sets how many random payload offsets are tried (default 8; CI's
//! power-cut pass runs 100), from a seed printed at the start; `QUOTE_EDGE_POWERCUT_SEED`
//! replays one. The harness runs natively only: under an emulator it skips, loudly, and CI's
//! emulated pass skips it by name.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use edge_proto::client::Client;
use edge_proto::{Reply, Request, Status, UpdateState};
use tests::crashfs::CrashFs;

use crate::update::{CRASHES, Fixture, GOOD};

const DEADLINE: Duration = Duration::from_secs(90);
const PAYLOAD: usize = 6 << 20;
/// Quotes one update may be written during, at most.
const MAX_TRIAL_WRITES: usize = 2000;
/// Quotes of 1,000 characters the database starts with (about 700 KiB): more than the snapshot's
/// page cache (256 KiB) and than one restore step (64 pages), so both can be cut midway.
const SEEDED_QUOTES: usize = 600;

struct Device {
    /// The data partition: a disk that drops what was not synced at each power-off. Declared
    /// before `root` so that it is unmounted before its mount point is removed.
    disk: Mutex<CrashFs>,
    /// Changes the power-offs dropped, added up.
    dropped: Mutex<usize>,
    /// `<root>/data` is the disk; the config, the control socket and the fail point records
    /// live beside it, off the disk.
    data: PathBuf,
    root: tempfile::TempDir,
    config: PathBuf,
    addr: SocketAddr,
    skip_sync: Option<&'static str>,
}

/// The fixture, the database every device starts with, and the fsync the supervisor leaves
/// out, if any (the harness must then fail).
struct Bench {
    fx: Fixture,
    database: PathBuf,
    skip_sync: Option<&'static str>,
}

impl Bench {
    fn new(skip_sync: Option<&'static str>) -> Bench {
        let fx = Fixture::new();
        let database = fx.dir.path().join("seeded.db");
        let (db, _) = quote_store::Database::open(&database, quote_store::Options::default())
            .expect("a new database");
        drop(db);
        let mut conn = rusqlite::Connection::open(&database).unwrap();
        let tx = conn.transaction().unwrap();
        for i in 0..SEEDED_QUOTES {
            let text = format!("{i:04} {}", "seeded quote ".repeat(77));
            tx.execute(
                "INSERT INTO quotes (text, author) VALUES (?1, 'Seed')",
                [&text[..1000]],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        // One self-contained file: the WAL folded into it.
        conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
        drop(conn);
        Bench {
            fx,
            database,
            skip_sync,
        }
    }
}

impl Device {
    fn new(bench: &Bench) -> Device {
        Device::with_ota(bench, "")
    }

    /// A device whose `[ota]` section also holds `ota`.
    fn with_ota(bench: &Bench, ota: &str) -> Device {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let disk = CrashFs::mount(&data).expect("the crash disk mounts (root, /dev/fuse)");
        std::fs::copy(&bench.database, data.join("quotes.db")).unwrap();
        disk.sync_all();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let config = root.path().join("supervisor.toml");
        let text = format!(
            "listen = \"{addr}\"\nadmin_listen = \"\"\nreplicas = 1\ndata_dir = {data:?}\n\
             control_socket = {:?}\n{}",
            root.path().join("supervisor.sock"),
            bench.fx.config(&format!("trial = \"300ms\"\n{ota}"))
        );
        std::fs::write(&config, text).unwrap();
        Device {
            disk: Mutex::new(disk),
            dropped: Mutex::new(0),
            data,
            root,
            config,
            addr,
            skip_sync: bench.skip_sync,
        }
    }

    /// The power goes: every process of the device is killed, then the disk loses everything
    /// that was not synced.
    fn off(&self, power: Power) {
        drop(power);
        let dropped = self
            .disk
            .lock()
            .unwrap()
            .power_cut()
            .expect("the crash disk remounts after a cut");
        *self.dropped.lock().unwrap() += dropped.nodes;
    }

    /// Starts the supervisor in its own PID namespace, with a fail point or in counting mode.
    fn power_on(&self, fault: Fault<'_>) -> Power {
        let (program, args) = tests::service_command(&tests::workspace_binary("edge-supervisor"));
        let mut command = Command::new("unshare");
        command
            .args(["--pid", "--fork", "--kill-child"])
            .arg(program)
            .args(args)
            .args(["run", "--config"])
            .arg(&self.config)
            .env(
                "EDGE_LOG",
                std::env::var("POWERCUT_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if std::env::var("POWERCUT_LOG").is_ok() {
                Stdio::inherit()
            } else {
                Stdio::null()
            });
        if let Some(name) = self.skip_sync {
            command.env("QUOTE_EDGE_FAILPOINT_SKIP_SYNC", name);
        }
        match fault {
            Fault::None => {}
            Fault::Cut(point) => {
                command.env("QUOTE_EDGE_FAILPOINT", point);
            }
            Fault::Record(file) => {
                command.env("QUOTE_EDGE_FAILPOINT_RECORD", file);
            }
        }
        let _ = std::fs::remove_file(self.root.path().join("supervisor.sock"));
        let _ = std::fs::remove_file(self.halt_file());
        command.env("QUOTE_EDGE_FAILPOINT_HALT", self.halt_file());
        Power(
            command
                .spawn()
                .expect("unshare (util-linux) runs the supervisor"),
        )
    }

    fn status(&self) -> Option<Status> {
        // A process that died mid-accept leaves a socket that connects and never answers.
        let socket = self.root.path().join("supervisor.sock");
        let ask = Client::new(socket).timeout(Duration::from_secs(5));
        match ask.request(&Request::Status) {
            Ok(Reply::Status(status)) => Some(*status),
            _ => None,
        }
    }

    /// Where a frozen child of the supervisor says that it reached its fail point.
    fn halt_file(&self) -> PathBuf {
        self.root.path().join("halted")
    }

    /// Polls the status until `condition`, or the device stops at its fail point: the process
    /// ended, or a child froze there (returns None then).
    fn wait(
        &self,
        child: &mut Power,
        what: &str,
        condition: impl Fn(&Status) -> bool,
    ) -> Option<Status> {
        let until = Instant::now() + DEADLINE;
        loop {
            if self.halt_file().exists() {
                return None;
            }
            if let Some(status) = self.status()
                && condition(&status)
            {
                return Some(status);
            }
            if child.0.try_wait().unwrap().is_some() {
                return None;
            }
            assert!(
                Instant::now() < until,
                "never saw {what}: {:?}",
                self.status()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Posts quotes until `stop` is set or the device stops answering (at most
    /// `MAX_TRIAL_WRITES`); returns the acknowledged ones (id, text).
    fn write_until_stopped(&self, stop: &std::sync::atomic::AtomicBool) -> Vec<(String, String)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut acknowledged = Vec::new();
        for n in 0..MAX_TRIAL_WRITES {
            if stop.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            let text = format!("written during the update {n}");
            let body = format!(r#"{{"text":"{text}","author":"Power cut"}}"#);
            match runtime.block_on(crate::supervisor::request(
                self.addr, "POST", "/quotes", &body,
            )) {
                Ok((201, _, body)) => acknowledged.push((id_of(&body), text)),
                // Not acknowledged (a replica out of rotation during the rollout): either way.
                // Paced, so that a release refusing writes does not spend them all at once.
                Ok((status, _, _)) if status != 0 => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                // No answer: the device is off.
                _ => break,
            }
        }
        acknowledged
    }

    /// The bytes the update's install kept from before a cut, as its receipt says (the device
    /// keeps one receipt per update; these devices make one update).
    fn resumed_bytes(&self) -> u64 {
        let receipts: String = std::fs::read_dir(self.data.join("ota/receipts"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "receipt"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .collect();
        receipts
            .split("\"resumed_bytes\":")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .expect("the receipt counts the resumed bytes")
    }

    fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (status, _, body) = runtime
            .block_on(crate::supervisor::request(self.addr, method, path, body))
            .unwrap();
        (status, body)
    }
}

/// What the supervisor is started with.
#[derive(Clone, Copy)]
enum Fault<'a> {
    None,
    /// `NAME:N` or `slot.bytes:K`: killed there.
    Cut(&'a str),
    /// Counting mode: every fail point reached is appended to this file.
    Record(&'a Path),
}

/// A powered device: killed (with everything in its PID namespace) when dropped, so that a
/// failing test leaves nothing running.
struct Power(Child);

impl Drop for Power {
    fn drop(&mut self) {
        // The namespace's PID 1 (the supervisor) is killed, not `unshare`: the kernel then
        // kills every other process of the namespace and reaps them all before PID 1 is gone,
        // and only then does `unshare` return. When `wait` returns, nothing holds the disk.
        let pid = self.0.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"));
        let mut killed = false;
        for child in children.unwrap_or_default().split_whitespace() {
            if let Some(child) = child.parse().ok().and_then(rustix::process::Pid::from_raw) {
                killed |=
                    rustix::process::kill_process(child, rustix::process::Signal::KILL).is_ok();
            }
        }
        if !killed {
            // PID 1 already gone, or not found: `unshare --kill-child` takes it down with it.
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Every file under `dir` (relative path, content, permission bits).
fn files_of(dir: &Path) -> Vec<(PathBuf, Vec<u8>, u32)> {
    use std::os::unix::fs::PermissionsExt;
    crate::update::walk(dir)
        .into_iter()
        .map(|(path, meta)| {
            let content = std::fs::read(&path).unwrap();
            let relative = path.strip_prefix(dir).unwrap().to_owned();
            (relative, content, meta.permissions().mode() & 0o777)
        })
        .collect()
}

/// The id in a created quote's JSON.
fn id_of(body: &str) -> String {
    body.split("\"id\":")
        .nth(1)
        .and_then(|rest| rest.split([',', '}']).next())
        .expect("a created quote has an id")
        .to_owned()
}

/// Delivers `bundle` to a powered device through its inbox, as a careful copy does: written
/// beside the inbox, fsynced, renamed in, both directories fsynced (on the crash disk, a bundle
/// that was not synced would be lost at the cut, and the update with it).
fn deliver(device: &Device, bundle: &Path) {
    let sync = |path: &Path| std::fs::File::open(path).unwrap().sync_all().unwrap();
    let inbox = device.data.join("ota/inbox");
    for dir in [device.data.join("ota"), inbox.clone()] {
        if !dir.exists() {
            std::fs::create_dir(&dir).unwrap();
            sync(dir.parent().unwrap());
        }
    }
    let staged = device.data.join("update.bundle.part");
    std::fs::copy(bundle, &staged).unwrap();
    sync(&staged);
    std::fs::rename(&staged, inbox.join("update.bundle")).unwrap();
    sync(&inbox);
    sync(&device.data);
}

/// One fail point reached in counting mode: its name and the release bytes the slot writer had
/// been given by then.
struct Hit {
    name: String,
    bytes: u64,
}

/// What one whole update of `bundle` reaches, in order, recorded in counting mode.
fn discover(bench: &Bench, bundle: &Path, expect: &str) -> Vec<Hit> {
    let device = Device::new(bench);
    let record = device.root.path().join("failpoints.log");
    let mut child = device.power_on(Fault::Record(&record));
    device
        .wait(&mut child, "the first replica", |s| s.ready == 1)
        .expect("started in counting mode");
    deliver(&device, bundle);
    device
        .wait(&mut child, "the counted update to end", ended_as(expect))
        .expect("the supervisor died in counting mode");
    device.off(child);
    read_hits(&record)
}

/// The points a counting-mode run recorded in `record`.
fn read_hits(record: &Path) -> Vec<Hit> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let (name, bytes) = line.rsplit_once(' ').expect("NAME BYTES");
            Hit {
                name: name.to_owned(),
                bytes: bytes.parse().expect("a byte count"),
            }
        })
        .collect()
}

/// One cut to make: where, in the update of which bundle (and its release), how that update
/// must end, and where its journal marks fell.
struct Planned<'a> {
    /// One point, or several: a cut at each next one during the recovery from the one before.
    points: Vec<String>,
    bundle: (&'a Path, &'a Path),
    expect: &'a str,
    /// What the reason of that end must say, if anything.
    reason: Option<&'a str>,
    marks: Vec<u64>,
}

/// Every `NAME:N` a cut can be aimed at: each point, once per time the update reached it.
fn points_of(hits: &[Hit]) -> Vec<String> {
    let mut seen: Vec<(&str, u64)> = Vec::new();
    hits.iter()
        .map(|hit| {
            let n = match seen.iter_mut().find(|(name, _)| *name == hit.name) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    seen.push((&hit.name, 1));
                    1
                }
            };
            format!("{}:{n}", hit.name)
        })
        .collect()
}

/// The release bytes each journal mark kept, in order.
fn marks_of(hits: &[Hit]) -> Vec<u64> {
    hits.iter()
        .filter(|h| h.name == "journal.recorded")
        .map(|h| h.bytes)
        .collect()
}

/// Every fail point named in the code: each `hit("area.step")` under `crates/`.
fn points_in_code() -> Vec<String> {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates");
    let mut names: Vec<String> = crate::update::walk(&crates)
        .into_iter()
        .filter(|(path, _)| path.extension().is_some_and(|e| e == "rs"))
        .flat_map(|(path, _)| {
            let text = std::fs::read_to_string(&path).unwrap();
            text.split("hit(\"")
                .skip(1)
                .filter_map(|rest| rest.split_once('"').map(|(name, _)| name.to_owned()))
                // A point's name is `area.step`; prose about `hit("…")` is not a point.
                .filter(|name| {
                    name.contains('.')
                        && name
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || "._".contains(c))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The release bytes a resumed install must have kept after a cut at `point`: the last journal
/// mark at or before it (0: nothing to resume, the install starts over). `None` for a point
/// this check does not cover (a cut before or after the payload's writes).
fn must_keep(point: &str, marks: &[u64]) -> Option<u64> {
    let (name, n) = point.rsplit_once(':')?;
    let n: u64 = n.parse().ok()?;
    match name {
        "slot.bytes" => Some(marks.iter().copied().filter(|m| *m <= n).max().unwrap_or(0)),
        "journal.recorded" => marks.get(usize::try_from(n).ok()? - 1).copied(),
        _ => None,
    }
}

/// A device serving, its update over with result `expect`.
fn ended_as(expect: &str) -> impl Fn(&Status) -> bool + '_ {
    move |s| {
        s.ready == 1
            && s.update.state == UpdateState::Idle
            && s.update
                .last_result
                .as_ref()
                .is_some_and(|r| r.result.as_str() == expect)
    }
}

/// What one run of [`cut`] found.
struct Cut {
    /// A line for the log.
    line: String,
    /// The bytes the install resumed with, when that was checked.
    resumed: Option<u64>,
    /// What the power-on after the cuts reached, when it ran in counting mode.
    recovery: Vec<Hit>,
    /// Quotes acknowledged while the update ran, and how many of them only an export kept.
    written: usize,
    exported: usize,
    /// Unsynced changes the disk dropped at this run's power-offs.
    dropped: usize,
}

/// One power cut, or several in a row: write quotes, deliver the bundle, cut at `points[0]`;
/// power on again with a cut at each next point (a cut during the recovery from a cut); then
/// power on (in counting mode if `count_recovery`) and check: every acknowledged quote is there,
/// no slot is left half-installed, the update ended as `expect`; for a committed update, the
/// slot holds exactly the release (`release`), bytes and modes; for one cut inside the payload,
/// the install resumed from the last journal mark before it (`marks`).
fn cut(
    bench: &Bench,
    (bundle, release): (&Path, &Path),
    points: &[String],
    (expect, reason): (&str, Option<&str>),
    marks: &[u64],
    count_recovery: bool,
) -> Cut {
    let point = points.join(" then ");
    let point = point.as_str();
    let device = Device::new(bench);
    let mut child = device.power_on(Fault::Cut(&points[0]));
    device
        .wait(&mut child, "the first replica", |s| s.ready == 1)
        .expect("started");
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let (status, body) = device.http(
                "POST",
                "/quotes",
                &format!(r#"{{"text":"acknowledged {i}","author":"Power cut"}}"#),
            );
            assert_eq!(status, 201, "{body}");
            id_of(&body)
        })
        .collect();
    deliver(&device, bundle);
    // Quotes written while the update runs, until the cut: each one acknowledged must survive,
    // in the database or, after a rollback, in the export of the trial's quotes.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (ended, trial) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| device.write_until_stopped(&stop));
        let ended = device.wait(&mut child, "the cut", |s| {
            s.update.state == UpdateState::Idle && s.update.last_result.is_some()
        });
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        (ended, writer.join().expect("the writer"))
    });
    let mut reached = ended.is_none();
    device.off(child);
    for again in &points[1..] {
        // Cut again while the device recovers from the cut before.
        let mut child = device.power_on(Fault::Cut(again));
        let ended = device.wait(&mut child, "the next cut", ended_as(expect));
        reached &= ended.is_none();
        device.off(child);
    }

    let record = device.root.path().join("recovery.log");
    let mut child = device.power_on(if count_recovery {
        Fault::Record(&record)
    } else {
        Fault::None
    });
    let status = device
        .wait(
            &mut child,
            &format!("the update {expect} after a cut at {point}"),
            ended_as(expect),
        )
        .unwrap_or_else(|| panic!("the supervisor died after the cut at {point}"));
    if let Some(reason) = reason {
        let said = status
            .update
            .last_result
            .as_ref()
            .and_then(|r| r.reason.clone());
        assert!(
            said.as_deref().is_some_and(|s| s.contains(reason)),
            "after cuts at {point}: the reason should say {reason:?}: {said:?}"
        );
    }
    for id in &ids {
        let (code, body) = device.http("GET", &format!("/quotes/{id}"), "");
        assert_eq!(code, 200, "quote {id} lost after a cut at {point}: {body}");
    }
    let exports: String = std::fs::read_dir(device.data.join("ota/rollback"))
        .map(|dir| {
            dir.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
                .map(|e| std::fs::read_to_string(e.path()).unwrap())
                .collect()
        })
        .unwrap_or_default();
    let mut exported = 0;
    for (id, text) in &trial {
        let (code, body) = device.http("GET", &format!("/quotes/{id}"), "");
        if code == 200 && body.contains(&format!("\"{text}\"")) {
            continue;
        }
        assert!(
            expect != "committed",
            "after a cut at {point}, committed: the acknowledged quote {id} ({text}) is not in the \
             database: {code} {body}"
        );
        assert!(
            exports.contains(&format!("\"{text}\"")),
            "after a cut at {point}, rolled back: the acknowledged quote {id} ({text}) is neither \
             in the database nor in an export of the trial's quotes"
        );
        exported += 1;
    }
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(device.data.join("ota/state.json")).unwrap())
            .unwrap();
    for slot in ["a", "b"] {
        assert_ne!(
            state["slots"][slot]["status"], "installing",
            "half state after a cut at {point}: {state}"
        );
        if expect == "committed" && state["slots"][slot]["version"] == "2.0.0" {
            let installed = files_of(&device.data.join("ota/slots").join(slot));
            let wanted = files_of(release);
            let summary = |f: &[(PathBuf, Vec<u8>, u32)]| {
                f.iter()
                    .map(|(p, b, m)| format!("{} {} bytes {m:o}", p.display(), b.len()))
                    .collect::<Vec<_>>()
            };
            assert!(
                installed == wanted,
                "slot {slot} after a cut at {point}: {:?}, the release: {:?}",
                summary(&installed),
                summary(&wanted)
            );
        }
    }
    // Exactly one receipt of this outcome: none lost to a cut before it was written (it is
    // saved as due with the outcome), none written twice by the start after one.
    let receipts: Vec<String> = std::fs::read_dir(device.data.join("ota/receipts"))
        .map(|dir| {
            dir.flatten()
                // A receipt is a `*.receipt`; a temporary file a cut left is not one.
                .filter(|e| e.path().extension().is_some_and(|x| x == "receipt"))
                .map(|e| std::fs::read_to_string(e.path()).unwrap())
                .filter(|r| r.contains(&format!("\"result\":\"{expect}\"")))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        receipts.len(),
        1,
        "after cuts at {point}: {} receipts of the {expect} update, wanted 1: {receipts:?}",
        receipts.len()
    );
    // A payload cut resumes from its mark; cuts once the release is on trial (the agent's
    // steps after the switch, the trial resumed at each start) must not make the receipt
    // forget it. (A cut before the switch, at `agent.snapshotted`, offers the bundle again:
    // a new install, which finds the bytes unchanged rather than resumed.)
    const ON_TRIAL: [&str; 4] = [
        "agent.rolled_out",
        "agent.drained",
        "agent.restored",
        "agent.checked",
    ];
    let on_trial = |p: &String| ON_TRIAL.iter().any(|t| p.starts_with(&format!("{t}:")));
    let resumed = match points {
        [first, later @ ..] if later.iter().all(on_trial) => must_keep(first, marks),
        _ => None,
    }
    .filter(|_| reached)
    .map(|kept| {
        let resumed = device.resumed_bytes();
        assert_eq!(
            resumed, kept,
            "cut at {point}: the install resumed with {resumed} bytes kept, but the last journal \
             mark before the cut kept {kept} (marks: {marks:?})"
        );
        resumed
    });
    let version = &status.update.version;
    assert!(
        status
            .replicas
            .iter()
            .all(|r| r.release.as_ref() == Some(version)),
        "{status:?}"
    );
    device.off(child);
    let recovery = if count_recovery {
        read_hits(&record)
    } else {
        Vec::new()
    };
    let line = format!(
        "{point}: {}{}{}; {} quotes written during the update, {exported} of them exported",
        if reached { "" } else { "not reached, " },
        version,
        resumed.map_or(String::new(), |r| format!(", resumed with {r} bytes kept")),
        trial.len()
    );
    let dropped = *device.dropped.lock().unwrap();
    Cut {
        line,
        resumed,
        recovery,
        written: trial.len(),
        exported,
        dropped,
    }
}

/// Whether the harness can run here; a skip (a failure under `CI=true`) when it cannot.
fn runnable() -> bool {
    let isolated = Command::new("unshare")
        .args(["--pid", "--fork", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !isolated {
        tests::skip("`unshare --pid` needs root (CAP_SYS_ADMIN); CI runs this as root");
        return false;
    }
    if let Some(why) = CrashFs::unavailable() {
        tests::skip(&why);
        return false;
    }
    if tests::emulated() {
        // Under qemu-user a whole device (supervisor, replicas, probes) runs 10-20 times slower
        // and its timing is not the device's; the harness checks logic that is the same on
        // every architecture, and runs natively (README's command, and CI's power-cut pass).
        tests::skip("under an emulator: the power-cut harness runs natively");
        return false;
    }
    true
}

#[test]
fn a_power_cut_at_any_step_of_an_update_ends_on_a_consistent_release_with_the_data() {
    if runnable() {
        // `QUOTE_EDGE_POWERCUT_SKIP_SYNC=NAME` runs the whole harness with one fsync left out,
        // to see which cut notices (it must fail then).
        let skip = std::env::var("QUOTE_EDGE_POWERCUT_SKIP_SYNC").ok();
        power_cuts(skip.map(|s| &*s.leak()));
    }
}

/// The proof that the crash disk makes fsyncs matter: with an fsync of the update path left
/// out (a failpoints build's test-only switch), the harness fails at a cut.
/// `state.synced`: the state file renamed into place before its content is on disk, so a cut
/// leaves an empty state; `journal.synced`: a journal mark whose record was never written, so
/// the install cannot resume from it.
#[test]
fn a_missing_fsync_fails_the_power_cut_harness() {
    if !runnable() {
        return;
    }
    for name in ["state.synced", "journal.synced"] {
        let failed = std::panic::catch_unwind(|| power_cuts(Some(name)))
            .expect_err("the harness passed with an fsync left out");
        let message = failed
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| failed.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        assert!(
            message.contains("cut at"),
            "with the fsync {name} left out, the harness failed, but not at a cut: {message}"
        );
        let _ = writeln!(
            std::io::stderr(),
            "with the fsync {name} left out, the harness failed as it must: {message}"
        );
    }
}

/// A power cut in the middle of a download from a fleet depot: the next power-on resumes the
/// install from its journal's last mark and asks the depot only for the rest (a `Range`
/// request from that mark's place in the bundle), commits, and posts its receipt, which counts
/// the bytes kept.
#[test]
fn a_power_cut_mid_download_from_a_depot_resumes_from_the_journal() {
    if !runnable() {
        return;
    }
    let bench = Bench::new(None);
    let fx = &bench.fx;
    // A payload that does not compress, so that where a request starts in the bundle says how
    // much of the payload it skips.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let noise: Vec<u8> = (0..PAYLOAD)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let (bundle, _) = release_2_0_0(fx, "noise", &[("data.bin", noise)]);
    let size = std::fs::metadata(&bundle).unwrap().len();
    // Where the journal marks fall is the bundle's business, not the source's: counted once
    // from the inbox.
    let marks = marks_of(&discover(&bench, &bundle, "committed"));
    let mark = *marks.first().expect("a journal mark in a 6 MiB payload");

    let depot = crate::depot::start_depot(fx);
    let device = Device::with_ota(
        &bench,
        &format!("depot = \"{}\"\npoll_interval = \"1s\"\n", depot.url),
    );
    let depot_until = |what: &str, condition: &dyn Fn(&depot_proto::wire::Status) -> bool| {
        let until = Instant::now() + DEADLINE;
        loop {
            let status = depot.status();
            if condition(&status) {
                return status;
            }
            assert!(Instant::now() < until, "never saw {what}: {status:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let point = format!("slot.bytes:{}", mark + (256 << 10));
    let mut child = device.power_on(Fault::Cut(&point));
    device
        .wait(&mut child, "the first replica", |s| s.ready == 1)
        .expect("started");
    depot_until("the device enrolled", &|s| s.devices == 1);
    let admin = depot.admin();
    admin.upload_bundle(&bundle).unwrap();
    admin
        .publish_plan(crate::depot::plan(fx, &bundle, "100%").as_bytes())
        .unwrap();
    let ended = device.wait(&mut child, &format!("the cut at {point}"), |_| false);
    assert!(ended.is_none(), "the device was not cut at {point}");
    device.off(child);
    // The depot logs each bundle response as it starts it: what it sent after the power-on.
    let before = depot.log().len();

    let mut child = device.power_on(Fault::None);
    device
        .wait(&mut child, "2.0.0 committed", ended_as("committed"))
        .expect("the device died after the cut");
    depot_until("the rollout completed", &|s| {
        s.rollouts[0].state == depot_proto::wire::RolloutState::Completed
    });
    let served: Vec<(u64, Option<u64>)> = depot.log()[before..]
        .iter()
        .filter(|line| line.contains("bundle served"))
        .map(|line| {
            let field = |name: &str| line.split(name).nth(1).map(|rest| rest.to_owned());
            let bytes = field(" bytes=")
                .and_then(|r| r.split(' ').next()?.parse().ok())
                .expect("a served line counts its bytes");
            let from = field("range=Some(\"bytes=").and_then(|r| r.split('-').next()?.parse().ok());
            (bytes, from)
        })
        .collect();
    let resumed = device.resumed_bytes();
    assert_eq!(
        resumed, mark,
        "resumed with {resumed} release bytes kept; the journal's mark before the cut kept {mark}"
    );
    // The rest was asked for from the mark's place in the bundle: past the head and past the
    // payload the mark kept (incompressible, so about as many bundle bytes). Only the head is
    // read from byte 0.
    let rest = served
        .iter()
        .filter_map(|(_, from)| *from)
        .filter(|from| *from > 0)
        .min()
        .expect("a Range request past the head after the power-on");
    assert!(
        rest > mark,
        "after the power-on the download went on from byte {rest} of the bundle; the journal \
         kept {mark} bytes of payload: {served:?}"
    );
    // Sent after the power-on: the rest, and the head's part (read once to resume, once to keep
    // it beside the slot), nothing more.
    let again: u64 = served.iter().map(|(bytes, _)| bytes).sum();
    let head_parts = 2 * ota_agent::depot::HEAD_PART;
    assert!(
        again <= size - rest + head_parts,
        "{again} bytes sent after the power-on for a {size}-byte bundle resumed from byte {rest}: \
         {served:?}"
    );
    let _ = writeln!(
        std::io::stderr(),
        "cut at {point} mid-download: after the power-on the depot sent {again} bytes of a \
         {size}-byte bundle (the rest from byte {rest}, and the head), {} requests; resumed with \
         {resumed} payload bytes kept",
        served.len()
    );
}

/// A good 2.0.0 release named `name` with `share` files beside its service, and its bundle
/// signed with the fixture's key: (bundle, release directory).
fn release_2_0_0(
    fx: &crate::update::Fixture,
    name: &str,
    share: &[(&str, Vec<u8>)],
) -> (PathBuf, PathBuf) {
    let rel = crate::update::release(&fx.dir.path().join(name), GOOD);
    std::fs::create_dir_all(rel.join("share")).unwrap();
    for (file, bytes) in share {
        std::fs::write(rel.join("share").join(file), bytes).unwrap();
    }
    let out = fx.dir.path().join(format!("{name}.bundle"));
    let options = ota_bundle::PackOptions {
        product: "quote-edge".into(),
        version: "2.0.0".into(),
        security_version: 2,
        issued_at: 2_000,
        level: 3,
    };
    ota_bundle::pack(&rel, &out, &options, &fx.key, |_, _| {}).unwrap();
    (out, rel)
}

/// The whole harness; `skip_sync` names an fsync the supervisor leaves out.
fn power_cuts(skip_sync: Option<&'static str>) {
    let seed: u64 = std::env::var("QUOTE_EDGE_POWERCUT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let _ = writeln!(
        std::io::stderr(),
        "power cuts: seed {seed} (QUOTE_EDGE_POWERCUT_SEED={seed} replays the random offsets)"
    );
    let bench = Bench::new(skip_sync);
    let fx = &bench.fx;
    let good = (
        fx.bundle_with_data(GOOD, "2.0.0", 2, "quote-edge", PAYLOAD),
        fx.dir.path().join(format!("{GOOD}-2.0.0-quote-edge")),
    );
    let bad = (
        fx.bundle(CRASHES, "2.0.0", 2, "quote-edge"),
        fx.dir.path().join(format!("{CRASHES}-2.0.0-quote-edge")),
    );
    // A release whose first journal mark falls exactly at a file boundary (share/a.bin ends
    // at 4 MiB plus the script): the resume starts at share/b.bin and must find share/a.bin
    // finished (length, mode).
    let boundary = {
        let bytes = |n: usize, seed: u32| -> Vec<u8> {
            (0..n as u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) as u8)
                .collect()
        };
        release_2_0_0(
            fx,
            "boundary",
            &[
                ("a.bin", bytes(4 << 20, 1)),
                ("b.bin", bytes((1 << 20) + 5, 2)),
            ],
        )
    };
    let bundles = [
        ("good", (good.0.as_path(), good.1.as_path()), "committed"),
        (
            "crashing",
            (bad.0.as_path(), bad.1.as_path()),
            "rolled_back",
        ),
        (
            "boundary",
            (boundary.0.as_path(), boundary.1.as_path()),
            "committed",
        ),
    ];

    // Counting mode first: what each update reaches, and where its journal marks fall.
    let mut reached_anywhere: Vec<String> = Vec::new();
    let mut plan: Vec<Planned> = Vec::new();
    let mut found = Vec::new();
    let mut log = Vec::new();
    for (what, bundle, expect) in bundles {
        let hits = discover(&bench, bundle.0, expect);
        let marks = marks_of(&hits);
        if what == "boundary" {
            // What the bundle is for: its one mark falls where share/a.bin ends.
            let size = |p: &Path| std::fs::metadata(p).unwrap().len();
            let before_b: u64 = crate::update::walk(bundle.1)
                .iter()
                .filter(|(p, _)| !p.ends_with("share/b.bin"))
                .map(|(p, _)| size(p))
                .sum();
            assert_eq!(marks, [before_b], "the boundary bundle's journal marks");
        }
        let points = points_of(&hits);
        found.push(format!(
            "{what}: {} points reached, journal marks at {marks:?}",
            points.len()
        ));
        reached_anywhere.extend(hits.iter().map(|h| h.name.clone()));
        plan.extend(points.into_iter().map(|point| Planned {
            points: vec![point],
            bundle,
            expect,
            reason: None,
            marks: marks.clone(),
        }));
        // Cuts during the recovery from a cut: the recovery is counted first (after a cut in
        // the payload past a journal mark, the install resumes; after one right after the
        // install began, the slot is abandoned and the install starts over; after one during
        // a rollback, the rollback goes on), then cut at each point it reaches.
        let firsts: Vec<String> = match what {
            "good" => vec![
                format!("slot.bytes:{}", marks[0] + 4096),
                "state.renamed:1".into(),
            ],
            "crashing" => vec!["agent.drained:1".into()],
            _ => vec![],
        };
        for first in firsts {
            let counted = cut(
                &bench,
                bundle,
                std::slice::from_ref(&first),
                (expect, None),
                &marks,
                true,
            );
            log.push(counted.line);
            reached_anywhere.extend(counted.recovery.iter().map(|h| h.name.clone()));
            found.push(format!(
                "{what}, recovering from a cut at {first}: {} points",
                counted.recovery.len()
            ));
            plan.extend(
                points_of(&counted.recovery)
                    .into_iter()
                    .map(|then| Planned {
                        points: vec![first.clone(), then],
                        bundle,
                        expect,
                        reason: None,
                        marks: marks.clone(),
                    }),
            );
        }
        if what == "good" {
            // A release still on trial when the supervisor starts for the third time since
            // (`max_trial_boots` = 3) is rolled back at that start, its database restored: a
            // cut during the trial, then one during each trial resumed at the next two starts.
            plan.push(Planned {
                points: vec![
                    "agent.rolled_out:1".into(),
                    "agent.checked:1".into(),
                    "agent.checked:1".into(),
                ],
                bundle,
                expect: "rolled_back",
                reason: Some("on trial through 3 supervisor starts"),
                marks: marks.clone(),
            });
            let random: usize = std::env::var("QUOTE_EDGE_POWERCUT_RANDOM")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(8);
            // xorshift64: never 0 from a nonzero state.
            let mut rng = seed | 1;
            for _ in 0..random {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let at = rng % PAYLOAD as u64;
                plan.push(Planned {
                    points: vec![format!("slot.bytes:{at}")],
                    bundle,
                    expect,
                    reason: None,
                    marks: marks.clone(),
                });
            }
        }
    }
    let in_code = points_in_code();
    let never: Vec<&String> = in_code
        .iter()
        .filter(|p| !reached_anywhere.contains(p))
        .collect();
    assert!(
        never.is_empty(),
        "fail points in the code that no update reaches, so no cut tests them: {never:?} \
         (found: {found:?})"
    );

    let mut resumes = Vec::new();
    let (mut written, mut exported, mut dropped) = (0, 0, 0);
    for p in &plan {
        let done = cut(
            &bench,
            p.bundle,
            &p.points,
            (p.expect, p.reason),
            &p.marks,
            false,
        );
        log.push(done.line);
        resumes.extend(done.resumed);
        written += done.written;
        exported += done.exported;
        dropped += done.dropped;
    }
    // The writes are what the check above is about: some must have been acknowledged, and
    // some rollbacks must have had trial quotes to export.
    assert!(
        written > 0 && exported > 0,
        "{written} quotes acknowledged during the updates, {exported} exported: the trial-write \
         check checked nothing"
    );
    // The disk must have had something to drop, or the cuts tested only what a process abort
    // tests.
    assert!(
        dropped > 0,
        "the crash disk dropped no unsynced change at any cut"
    );
    let unreached: Vec<&String> = log.iter().filter(|l| l.contains("not reached")).collect();
    assert!(
        unreached.is_empty(),
        "fail points never reached: {unreached:?} (is target/debug/edge-supervisor built with \
         the failpoints feature? `cargo test --workspace` builds it so)"
    );
    let _ = writeln!(
        std::io::stderr(),
        "{} fail points in the code, all reached; {}\n{} power cuts (seed {seed}), all \
         consistent; payload cuts that resumed from a journal mark: {} of {}, each from the \
         last mark before the cut; {written} quotes acknowledged during the updates, none lost, \
         {exported} of them kept by a rollback's export; {dropped} unsynced changes dropped by \
         the crash disk at the power-offs\n{}",
        in_code.len(),
        found.join("; "),
        log.len(),
        resumes.iter().filter(|r| **r > 0).count(),
        resumes.len(),
        log.join("\n")
    );
}
