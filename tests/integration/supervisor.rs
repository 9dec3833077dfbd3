//! The supervisor run in-process against real quote-service replicas and fake ones that
//! crash, hang (SIGSTOP), never get ready, or eat memory. Waits are on conditions observed
//! through the control socket, with a deadline that only fails a test, never paces it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use edge_proto::{ErrorKind, ExitReason, LimitsMode, ReplicaState, Reply, Request, Status};
use edge_supervisor::config::{self, Overrides};
use edge_supervisor::supervisor::{Bound, RunError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const DEADLINE: Duration = Duration::from_secs(60);

pub(crate) struct Supervisor {
    pub(crate) addr: SocketAddr,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), RunError>>>,
    pub(crate) admin: Option<SocketAddr>,
    data: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

fn fake_replica() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fake-replica"))
}

/// `[service]` for the fake replica with one mode per replica index.
fn fake_service(modes: &str) -> String {
    let (command, mut args) = tests::service_command(&fake_replica());
    args.extend(["{port}", "{replica}", modes, "{index}"].map(str::to_owned));
    format!("[service]\ncommand = {command:?}\nargs = {args:?}\nenv = {{}}\nstop_grace = \"2s\"\n")
}

/// `[service]` for the real quote-service on the default environment.
fn quote_service() -> String {
    let (command, args) = tests::service_command(&tests::workspace_binary("quote-service"));
    format!("[service]\ncommand = {command:?}\nargs = {args:?}\n")
}

impl Supervisor {
    pub(crate) async fn start(replicas: u32, config: &str) -> Supervisor {
        let dir = tempfile::tempdir().unwrap();
        let mut sup = Supervisor::start_in(replicas, config, dir.path()).await;
        sup._dir = Some(dir);
        sup
    }

    /// As [`Supervisor::start`], with the data directory at `data` (created if missing).
    pub(crate) async fn start_in(replicas: u32, config: &str, data: &Path) -> Supervisor {
        // The admin endpoint is off unless the test's configuration turns it on.
        let admin = if config.contains("admin_listen") {
            ""
        } else {
            "admin_listen = \"\"\n"
        };
        let text = format!("listen = \"127.0.0.1:0\"\n{admin}replicas = {replicas}\n{config}");
        let overrides = Overrides {
            data_dir: Some(data.to_owned()),
            ..Overrides::default()
        };
        let settings =
            config::parse(&text, Path::new("test.toml"), &overrides).expect("valid test config");
        let socket = settings.control_socket.clone();
        let bound = Bound::bind(settings).await.expect("bind");
        let addr = bound.public_addr();
        let admin = bound.admin_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(bound.run(async move {
            let _ = stopped.await;
        }));
        Supervisor {
            addr,
            socket,
            stop: Some(stop),
            task: Some(task),
            admin,
            data: data.to_owned(),
            _dir: None,
        }
    }

    pub(crate) fn data_dir(&self) -> &Path {
        &self.data
    }

    pub(crate) async fn ask(&self, request: Request) -> Reply {
        edge_supervisor::control::request(&self.socket, &request)
            .await
            .expect("control socket")
    }

    pub(crate) async fn status(&self) -> Status {
        match self.ask(Request::Status).await {
            Reply::Status(status) => *status,
            other => panic!("not a status: {other:?}"),
        }
    }

    /// Waits until `condition` holds for the status, and returns that status.
    pub(crate) async fn wait_for(&self, what: &str, condition: impl Fn(&Status) -> bool) -> Status {
        let until = Instant::now() + DEADLINE;
        loop {
            let status = self.status().await;
            if condition(&status) {
                return status;
            }
            assert!(
                Instant::now() < until,
                "never saw {what}; last status: {status:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) async fn all_ready(&self, n: u32) -> Status {
        self.wait_for(&format!("{n} ready"), |s| {
            s.ready == n && s.replicas.len() == n as usize
        })
        .await
    }

    pub(crate) async fn stop(mut self) -> Vec<u32> {
        let pids: Vec<u32> = self
            .status()
            .await
            .replicas
            .iter()
            .filter_map(|r| r.pid)
            .collect();
        let _ = self.stop.take().unwrap().send(());
        self.task
            .take()
            .unwrap()
            .await
            .unwrap()
            .expect("clean stop");
        pids
    }
}

fn pid_of(status: &Status, replica: &str) -> u32 {
    status
        .replicas
        .iter()
        .find(|r| r.id == replica)
        .and_then(|r| r.pid)
        .expect("replica has a process")
}

fn signal(pid: u32, name: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name} {pid}");
}

pub(crate) fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// One request on a fresh connection: (status, X-Served-By, body).
pub(crate) async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String, String)> {
    request_with(addr, method, path, body, "").await
}

/// As [`request`], with `headers` (each line ending in `\r\n`) added to the head.
pub(crate) async fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    headers: &str,
) -> std::io::Result<(u16, String, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("no answer within 10 s"))??;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let served_by = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-served-by: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    Ok((status, served_by, body.to_owned()))
}

pub(crate) async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String, String)> {
    request(addr, "GET", path, "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_spreads_requests_over_replicas_that_share_one_database() {
    let sup = Supervisor::start(3, &quote_service()).await;
    sup.all_ready(3).await;
    let (status, _, body) = request(
        sup.addr,
        "POST",
        "/quotes",
        r#"{"text":"Same data, any replica.","author":"Test"}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 201, "{body}");
    let id = body
        .split("\"id\":")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap()
        .to_owned();
    let mut servers = std::collections::BTreeSet::new();
    for _ in 0..9 {
        let (status, served_by, body) = get(sup.addr, &format!("/quotes/{id}")).await.unwrap();
        assert_eq!(status, 200);
        assert!(body.contains("Same data, any replica."), "{body}");
        servers.insert(served_by);
    }
    assert_eq!(
        servers.into_iter().collect::<Vec<_>>(),
        ["replica-0", "replica-1", "replica-2"]
    );
    // A request for the server as a whole (asterisk-form) reaches a replica as such, as
    // through any HTTP proxy, rather than a URI the router made up.
    let (status, served_by, body) = request(sup.addr, "OPTIONS", "*", "").await.unwrap();
    assert!(
        served_by.starts_with("replica-") && status < 500,
        "OPTIONS *: {status} from {served_by:?}: {body}"
    );
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_says_it_is_ready_is_probed_then_not_after_its_startup_delay() {
    // The first startup probe is due an hour after the spawn: only quote-service's `READY=1`
    // on the supervisor's readiness socket can bring a replica into rotation before that.
    let config = format!(
        "{}[probes.startup]\ninitial_delay = \"1h\"\n",
        quote_service()
    );
    let sup = Supervisor::start(2, &config).await;
    let status = sup.all_ready(2).await;
    for replica in &status.replicas {
        let pid = replica.pid.expect("running");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let socket = format!(
            "NOTIFY_SOCKET={}",
            sup.data_dir().join("ready.sock").display()
        );
        assert!(
            String::from_utf8_lossy(&environ).contains(&socket),
            "replica {pid} was not given {socket}"
        );
    }
    // A replaced replica says it again: the word is per process.
    let pid = pid_of(&status, "replica-0");
    signal(pid, "KILL");
    sup.wait_for("replica-0 replaced and ready", |s| {
        s.ready == 2 && s.replicas.iter().all(|r| r.pid.is_some_and(|p| p != pid))
    })
    .await;
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_under_a_client_loop_fails_no_request() {
    let sup = Supervisor::start(3, &quote_service()).await;
    let before = sup.all_ready(3).await;
    let victim = pid_of(&before, "replica-1");
    let done = Arc::new(AtomicUsize::new(0));
    let client = {
        let done = Arc::clone(&done);
        let addr = sup.addr;
        tokio::spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..300 {
                match get(addr, "/quotes/random").await {
                    Ok((200, _, _)) => {}
                    other => failures.push(format!("{other:?}")),
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
            failures
        })
    };
    while done.load(Ordering::SeqCst) < 100 {
        tokio::task::yield_now().await;
    }
    signal(victim, "KILL");
    let failures = client.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} failed requests: {failures:?}",
        failures.len()
    );
    let after = sup
        .wait_for("replica-1 replaced and ready", |s| {
            s.ready == 3 && pid_of(s, "replica-1") != victim
        })
        .await;
    let r1 = &after.replicas[1];
    assert_eq!(r1.restarts, 1);
    assert_eq!(
        r1.last_exit.as_ref().map(|e| (e.reason.as_str(), e.signal)),
        Some(("signal", Some(9)))
    );
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_replica_leaves_rotation_and_is_replaced() {
    let sup = Supervisor::start(3, &fake_service("ok")).await;
    let before = sup.all_ready(3).await;
    let hung = pid_of(&before, "replica-1");
    signal(hung, "STOP");
    let after = sup
        .wait_for("a replacement for the hung replica", |s| {
            s.ready == 3 && pid_of(s, "replica-1") != hung
        })
        .await;
    assert_eq!(
        after.replicas[1]
            .last_exit
            .as_ref()
            .map(|e| e.reason.as_str()),
        Some("liveness")
    );
    for _ in 0..30 {
        let (status, _, _) = get(sup.addr, "/")
            .await
            .expect("no request reaches the hung process");
        assert_eq!(status, 200);
    }
    // The hung process is SIGKILLed after the hung grace, even though it is stopped.
    let until = Instant::now() + DEADLINE;
    while alive(hung) {
        assert!(
            Instant::now() < until,
            "the hung replica {hung} was never killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sup.stop().await;
}

/// Healthy fake replicas whose probes run once at the start and then not for an hour, so that
/// whatever happens to the rotation during a test was done by something else; a readiness
/// timeout of 1 s (the router's silence delay too), far above any answer of a healthy fake on
/// a busy machine; the admin endpoint on for the metrics.
fn fakes_probed_hourly() -> String {
    format!(
        "admin_listen = \"127.0.0.1:0\"\n[probes.liveness]\nperiod = \"1h\"\n\
         [probes.readiness]\nperiod = \"1h\"\ntimeout = \"1s\"\n{}",
        fake_service("ok")
    )
}

/// A counter or gauge from the admin endpoint's `/metrics`.
async fn metric(sup: &Supervisor, name: &str) -> u64 {
    let (_, _, text) = get(sup.admin.expect("admin endpoint on"), "/metrics")
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_silent_under_requests_leaves_the_rotation_before_any_periodic_probe() {
    let sup = Supervisor::start(3, &fakes_probed_hourly()).await;
    let before = sup.all_ready(3).await;
    let hung = pid_of(&before, "replica-1");
    signal(hung, "STOP");
    // Round robin: three requests at once reach three replicas, one of them the stopped one.
    let addr = sup.addr;
    let first: Vec<_> = (0..3)
        .map(|_| tokio::spawn(async move { get(addr, "/").await }))
        .collect();
    let out = sup
        .wait_for("replica-1 out of rotation", |s| !s.replicas[1].ready)
        .await;
    assert_eq!(pid_of(&out, "replica-1"), hung, "out, not restarted");
    assert!(metric(&sup, "edge_supervisor_silent_ejections_total").await >= 1);
    for _ in 0..30 {
        // The fake replica's body is its name.
        let (status, _, name) = get(sup.addr, "/").await.unwrap();
        assert_eq!(status, 200);
        assert_ne!(name, "replica-1", "a request reached the silent replica");
    }
    // The unanswered request was waiting, not lost: woken, the replica answers it.
    signal(hung, "CONT");
    let mut served = Vec::new();
    for request in first {
        let (status, _, name) = request.await.unwrap().unwrap();
        assert_eq!(status, 200);
        served.push(name);
    }
    served.sort();
    assert_eq!(served, ["replica-0", "replica-1", "replica-2"]);
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_answer_takes_its_replica_out_only_until_the_confirming_probe_passes() {
    let sup = Supervisor::start(3, &fakes_probed_hourly()).await;
    sup.all_ready(3).await;
    for _ in 0..60 {
        let (status, _, _) = get(sup.addr, "/").await.unwrap();
        assert_eq!(status, 200);
    }
    let ejections = "edge_supervisor_silent_ejections_total";
    assert_eq!(
        metric(&sup, ejections).await,
        0,
        "fast answers eject nobody"
    );
    // Nothing else is sent meanwhile, so the replica looks silent while it sleeps.
    let (status, _, name) = get(sup.addr, "/sleep/3000").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        name.starts_with("replica-"),
        "answered by its replica: {name:?}"
    );
    // Reported 2 s before the answer came; waited for all the same, not assumed.
    let until = Instant::now() + DEADLINE;
    while metric(&sup, ejections).await == 0 {
        assert!(Instant::now() < until, "the slow replica was never ejected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(&sup, "edge_supervisor_proxy_retries_total").await,
        0,
        "the slow request was waited for, not sent again"
    );
    // Back in rotation although no periodic probe runs for an hour: the confirming one did it.
    sup.all_ready(3).await;
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_backs_off_and_says_so() {
    let config = format!(
        "{}[restart]\nbackoff = \"10ms\"\nmax_backoff = \"300ms\"\njitter = 0.0\nbudget = 4\nbudget_window = \"60s\"\n",
        fake_service("exit:3")
    );
    let sup = Supervisor::start(1, &config).await;
    let status = sup
        .wait_for("a crash loop", |s| s.replicas[0].crash_looping)
        .await;
    let r = &status.replicas[0];
    assert!(r.restarts >= 5, "{r:?}");
    let last = r.last_exit.as_ref().unwrap();
    assert_eq!((last.reason.as_str(), last.code), ("exit", Some(3)));
    // Past the budget every restart waits the longest delay; before it, delays doubled from 0.
    if let Some(wait) = r.next_start_in_seconds {
        assert!(wait <= 0.3 + 1e-6, "{wait}");
    }
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_never_becomes_ready_gets_no_traffic() {
    let sup = Supervisor::start(2, &fake_service("ok,never-ready")).await;
    let status = sup
        .wait_for("replica-0 ready, replica-1 running unready", |s| {
            s.replicas.len() == 2
                && s.replicas[0].ready
                && s.replicas[1].state == ReplicaState::Running
                && !s.replicas[1].ready
        })
        .await;
    assert_eq!(status.ready, 1);
    for _ in 0..20 {
        let (code, _, body) = get(sup.addr, "/").await.unwrap();
        assert_eq!((code, body.as_str()), (200, "replica-0"));
    }
    assert_eq!(
        sup.status().await.replicas[1].restarts,
        0,
        "readiness never restarts a replica"
    );
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_is_stopped_by_its_limit_and_replaced() {
    if tests::emulated() {
        // Under qemu-user the limit lands on the emulator, whose memory is not the program's;
        // limits on aarch64 are proven with cgroup v2 in the QEMU system guest instead.
        tests::skip("under an emulator: an rlimit cannot bound the emulated program");
        return;
    }
    let config = format!(
        "{}[resources]\nmemory_max = \"96MiB\"\n",
        fake_service("hog:16")
    );
    let sup = Supervisor::start(1, &config).await;
    let status = sup
        .wait_for("the hog to be stopped", |s| s.replicas[0].restarts >= 1)
        .await;
    let reason = status.replicas[0].last_exit.as_ref().unwrap().reason;
    match status.limits.mode {
        // Where cgroup v2 is delegated (the device image), the kernel's OOM killer acts.
        LimitsMode::CgroupV2 => assert_eq!(reason, ExitReason::OomKill),
        // Elsewhere the fallback is said plainly, and the allocation failure ends the process.
        mode => {
            assert_eq!(mode, LimitsMode::Rlimit);
            assert!(
                status
                    .limits
                    .note
                    .as_deref()
                    .unwrap_or("")
                    .contains("falling back"),
                "{:?}",
                status.limits
            );
            assert!(
                reason == ExitReason::Signal || reason == ExitReason::Exit,
                "{reason}"
            );
        }
    }
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_restart_and_logs_through_the_control_socket() {
    let sup = Supervisor::start(2, &fake_service("ok")).await;
    sup.all_ready(2).await;
    assert!(matches!(
        sup.ask(Request::Scale { replicas: 3 }).await,
        Reply::Accepted { .. }
    ));
    sup.all_ready(3).await;
    assert!(matches!(
        sup.ask(Request::Scale { replicas: 1 }).await,
        Reply::Accepted { .. }
    ));
    let one = sup.all_ready(1).await;
    assert_eq!(one.replicas[0].id, "replica-0");
    let old = pid_of(&one, "replica-0");
    assert!(matches!(
        sup.ask(Request::Restart {
            replica: "replica-0".into()
        })
        .await,
        Reply::Accepted { .. }
    ));
    sup.wait_for("replica-0 replaced", |s| {
        s.ready == 1 && pid_of(s, "replica-0") != old
    })
    .await;
    match sup
        .ask(Request::Logs {
            replica: "replica-0".into(),
            lines: Some(50),
        })
        .await
    {
        Reply::Logs { lines, .. } => assert!(
            lines
                .iter()
                .any(|l| l.line.contains("fake-replica replica-0")),
            "{lines:?}"
        ),
        other => panic!("{other:?}"),
    }
    let refused = [
        (
            Request::Logs {
                replica: "replica-7".into(),
                lines: None,
            },
            ErrorKind::UnknownReplica,
        ),
        (
            Request::Restart {
                replica: "replica-7".into(),
            },
            ErrorKind::UnknownReplica,
        ),
        (Request::Scale { replicas: 999 }, ErrorKind::OutOfRange),
        (
            Request::Apply {
                bundle: "/nonexistent.bundle".into(),
            },
            ErrorKind::BadRequest,
        ),
    ];
    for (request, expected) in refused {
        match sup.ask(request.clone()).await {
            Reply::Error { kind, .. } => assert_eq!(kind, expected, "{request:?}"),
            other => panic!("{request:?} answered {other:?}"),
        }
    }
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_has_the_documented_shape() {
    let sup = Supervisor::start(2, &fake_service("ok")).await;
    let status = sup.all_ready(2).await;
    let mut json = serde_json::to_value(&status).unwrap();
    // Volatile values out; the shape and the stable values stay.
    json["uptime_seconds"] = 0.into();
    json["listen"] = "ADDR".into();
    for r in json["replicas"].as_array_mut().unwrap() {
        r["pid"] = "PID".into();
        r["port"] = "PORT".into();
    }
    let actual = serde_json::to_string_pretty(&json).unwrap();
    let expected_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/snapshots/status.json");
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
    assert_eq!(
        actual.trim(),
        expected.trim(),
        "status JSON changed; if on purpose, update {}",
        expected_path.display()
    );
    sup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_leaves_nothing_running() {
    let sup = Supervisor::start(3, &fake_service("ok")).await;
    sup.all_ready(3).await;
    let pids = sup.stop().await;
    assert_eq!(pids.len(), 3);
    for pid in pids {
        assert!(!alive(pid), "replica {pid} outlived the supervisor");
    }
}

/// The device image's replica environment (`[service.env]` of image/recipe/supervisor.toml),
/// run as the image runs it: writes need the admin token that the first boot leaves in the
/// data directory, reads stay open, and the database has a size cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_replicas_need_the_admin_token_for_writes_and_cap_the_database() {
    // Both images: the Pi's configuration and the QEMU variant's own.
    for recipe in ["supervisor.toml", "qemu/supervisor.toml"] {
        image_replicas_need_the_token(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../image/recipe")
                .join(recipe),
        )
        .await;
    }
}

async fn image_replicas_need_the_token(recipe: &Path) {
    let data = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    // Its users are the image's (sysusers.d), not this machine's.
    let image = config::parse_with_users(
        &std::fs::read_to_string(recipe).unwrap(),
        recipe,
        &Overrides {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            replicas: None,
            data_dir: Some(data.path().to_owned()),
            trusted_keys: Some(keys.path().to_owned()),
            depot: None,
        },
        &|| Ok(tests::image_passwd()),
    )
    .unwrap_or_else(|e| panic!("{} does not load: {e}", recipe.display()));
    // The database directory, as the image's tmpfiles.d makes it.
    std::fs::create_dir(data.path().join("db")).unwrap();
    let env = &image.service.env;
    assert_eq!(
        env.get("QUOTE_ADMIN_TOKEN_FILE").map(String::as_str),
        Some("{data_dir}/admin-token"),
        "{}: {env:?}",
        recipe.display()
    );
    let cap: u64 = env["QUOTE_DB_MAX_SIZE"].parse().expect("a size in bytes");
    assert!(
        (1 << 20..=256 << 20).contains(&cap),
        "a cap of {cap} bytes: between 1 MiB and 256 MiB"
    );

    // What quote-edge-admin-token.service leaves at first boot.
    let token = "5e1f0c2d9a7b48e6b3c1d0f9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9";
    std::fs::write(data.path().join("admin-token"), token).unwrap();
    let (command, args) = tests::service_command(&tests::workspace_binary("quote-service"));
    let env_table = env
        .iter()
        .map(|(k, v)| format!("{k} = {v:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let config =
        format!("[service]\ncommand = {command:?}\nargs = {args:?}\nenv = {{ {env_table} }}\n");
    let sup = Supervisor::start_in(2, &config, data.path()).await;
    sup.all_ready(2).await;

    let quote = r#"{"text":"Only the holder of the device writes.","author":"image"}"#;
    let (status, _, body) = request(sup.addr, "POST", "/quotes", quote).await.unwrap();
    assert_eq!(status, 401, "a write without the token: {body}");
    let wrong = "Authorization: Bearer 0000\r\n";
    let (status, _, body) = request_with(sup.addr, "POST", "/quotes", quote, wrong)
        .await
        .unwrap();
    assert_eq!(status, 401, "a write with a wrong token: {body}");
    let (status, _, body) = request_with(sup.addr, "DELETE", "/quotes/1", "", wrong)
        .await
        .unwrap();
    assert_eq!(status, 401, "a delete with a wrong token: {body}");
    let bearer = format!("Authorization: Bearer {token}\r\n");
    let (status, _, body) = request_with(sup.addr, "POST", "/quotes", quote, &bearer)
        .await
        .unwrap();
    assert_eq!(status, 201, "a write with the token: {body}");
    let (status, _, _) = get(sup.addr, "/quotes/1").await.unwrap();
    assert_eq!(status, 200, "reads stay open");
}
