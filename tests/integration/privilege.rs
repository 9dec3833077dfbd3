//! Least privilege off the device: `service.user` runs the replicas, their exec probes and the
//! release's database tool as another user, with no capability and only the configured
//! environment, both under a root supervisor and under one that is not root and holds only the
//! ambient capabilities of the device's unit (edge-supervisor.service), as systemd gives them.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edge_proto::{Reply, Request, Status};

use crate::supervisor::{Supervisor, alive};

/// Who the replicas run as in these tests: `nobody` on Debian.
const REPLICA: (u32, u32) = (65534, 65534);
/// Who the unprivileged supervisor runs as (no passwd entry is needed for a number).
const SUPERVISOR: (u32, u32) = (65533, 65533);
const DEADLINE: Duration = Duration::from_secs(60);

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A data directory as the device's tmpfiles.d makes it: the supervisor's, searchable by the
/// replicas (0711), with `db/` the replicas' own.
fn data_dir(owner: (u32, u32)) -> tempfile::TempDir {
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("db");
    for dir in [data.path(), &db] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    std::os::unix::fs::chown(data.path(), Some(owner.0), Some(owner.1)).unwrap();
    std::os::unix::fs::chown(&db, Some(REPLICA.0), Some(REPLICA.1)).unwrap();
    data
}

/// `[service]` for quote-service as `REPLICA`, its database in `db/`, with a startup probe that
/// passes only when the probe itself runs as that user. Liveness is lenient: these tests are
/// about users and capabilities, and under qemu-user beside the other tests a replica can be
/// slow to answer (restarted for it, it never settled as 2 ready in CI once).
fn replica_config() -> String {
    let (command, args) = tests::service_command(&tests::workspace_binary("quote-service"));
    format!(
        "[service]\ncommand = {command:?}\nargs = {args:?}\nuser = \"{}:{}\"\n\
         env = {{ QUOTE_LISTEN = \"127.0.0.1:{{port}}\", QUOTE_INSTANCE = \"{{replica}}\", \
         QUOTE_DB = \"{{data_dir}}/db/quotes.db\" }}\n\
         [probes.startup]\nexec = [\"sh\", \"-c\", \"test \\\"$(id -u)\\\" = {}\"]\n\
         period = \"50ms\"\ntimeout = \"2s\"\n\
         [probes.liveness]\ntimeout = \"5s\"\nfailure_threshold = 10\n",
        REPLICA.0, REPLICA.1, REPLICA.0
    )
}

/// A line of /proc/PID/status, e.g. `CapEff`, without its name.
fn proc_status(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// Every replica runs as `REPLICA` (real, effective, saved, file system), in no supplementary
/// group, with every capability set empty, and its environment is `PATH`, the readiness socket
/// and the configuration's variables: nothing of the test's (CARGO_*, HOME, ...).
fn assert_unprivileged(pids: &[u32]) {
    assert!(!pids.is_empty());
    let uid = format!("{0}\t{0}\t{0}\t{0}", REPLICA.0);
    let gid = format!("{0}\t{0}\t{0}\t{0}", REPLICA.1);
    for &pid in pids {
        assert_eq!(proc_status(pid, "Uid"), uid, "replica {pid}");
        assert_eq!(proc_status(pid, "Gid"), gid, "replica {pid}");
        assert_eq!(proc_status(pid, "Groups"), "", "replica {pid}");
        for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            assert_eq!(
                proc_status(pid, set),
                "0000000000000000",
                "{set} of replica {pid}"
            );
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let mut keys: Vec<String> = environ
            .split(|b| *b == 0)
            .filter(|v| !v.is_empty())
            .map(|v| {
                String::from_utf8_lossy(v)
                    .split('=')
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "NOTIFY_SOCKET",
                "PATH",
                "QUOTE_DB",
                "QUOTE_INSTANCE",
                "QUOTE_LISTEN"
            ],
            "the environment of replica {pid}"
        );
    }
}

fn replica_pids(status: &Status) -> Vec<u32> {
    status.replicas.iter().filter_map(|r| r.pid).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_supervisor_runs_its_replicas_as_the_service_user_with_nothing_of_its_own() {
    if !is_root() {
        tests::skip("starting replicas as another user needs root");
        return;
    }
    let data = data_dir((0, 0));
    let sup = Supervisor::start_in(2, &replica_config(), data.path()).await;
    // Ready means the exec startup probe ran as the replicas' user too.
    let status = sup.all_ready(2).await;
    assert_unprivileged(&replica_pids(&status));
    // Replicas of another user can reach the readiness socket (the word stays a hint).
    let ready = std::fs::metadata(data.path().join("ready.sock")).unwrap();
    assert_eq!(ready.permissions().mode() & 0o777, 0o666);
    // The database is the replicas': made by them, in their directory.
    let db = std::fs::metadata(data.path().join("db/quotes.db")).unwrap();
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&db),
            std::os::unix::fs::MetadataExt::gid(&db)
        ),
        REPLICA
    );
    let pids = sup.stop().await;
    assert_eq!(pids.len(), 2);
}

/// The device's privilege model, off the device: the supervisor not root, with the ambient
/// capabilities edge-supervisor.service gives it (setpriv does what systemd does), starts its
/// replicas as another user, restarts one (CAP_KILL: signals to another user's process), and
/// stops them all on SIGTERM. Without its ambient set cleared in the child, each replica would
/// hold CAP_SETUID, CAP_SETGID and CAP_KILL.
#[test]
fn an_unprivileged_supervisor_with_ambient_capabilities_starts_restarts_and_stops_its_replicas() {
    if !is_root() {
        tests::skip("setpriv to another user needs root");
        return;
    }
    let data = data_dir(SUPERVISOR);
    let config = data.path().join("supervisor.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"\"\nreplicas = 2\n\
             trusted_keys = {:?}\n{}",
            data.path().join("keys"),
            replica_config()
        ),
    )
    .unwrap();
    // Readable by the supervisor's user whatever the umask: an in-process supervisor of
    // another test sets 0177 for a moment while it binds its control socket.
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (program, args) = tests::service_command(&tests::workspace_binary("edge-supervisor"));
    let caps = "+setuid,+setgid,+kill";
    let mut supervisor = Killed(
        Command::new("setpriv")
            .arg(format!("--reuid={}", SUPERVISOR.0))
            .arg(format!("--regid={}", SUPERVISOR.1))
            .args(["--clear-groups", "--inh-caps", caps, "--ambient-caps", caps])
            .arg(format!("--bounding-set=-all,{caps}"))
            .arg("--")
            .arg(program)
            .args(args)
            .args(["run", "--config"])
            .arg(&config)
            .args(["--data-dir"])
            .arg(data.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("setpriv (util-linux)"),
    );
    let socket = data.path().join("supervisor.sock");
    let ask = |request: Request| -> Option<Reply> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(edge_supervisor::control::request(&socket, &request))
            .ok()
    };
    let wait_for = |what: &str, condition: &dyn Fn(&Status) -> bool| -> Status {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(Reply::Status(status)) = ask(Request::Status)
                && condition(&status)
            {
                return *status;
            }
            assert!(Instant::now() < until, "never saw {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let ready = |s: &Status| s.ready == 2 && s.replicas.len() == 2;
    let status = wait_for("2 ready", &ready);
    let sup_pid = supervisor.0.id();
    let own = format!("{0}\t{0}\t{0}\t{0}", SUPERVISOR.0);
    assert_eq!(
        proc_status(sup_pid, "Uid"),
        own,
        "the supervisor is not root"
    );
    // CAP_KILL (5), CAP_SETGID (6), CAP_SETUID (7).
    assert_eq!(proc_status(sup_pid, "CapAmb"), "00000000000000e0");
    let before = replica_pids(&status);
    assert_unprivileged(&before);

    // A restart signals a process of another user: CAP_KILL at work.
    let first = status.replicas[0].id.clone();
    match ask(Request::Restart {
        replica: first.clone(),
    }) {
        Some(Reply::Accepted { .. }) => {}
        other => panic!("restart {first}: {other:?}"),
    }
    let status = wait_for("the restarted replica ready again", &|s| {
        ready(s) && !replica_pids(s).contains(&before[0])
    });
    assert_unprivileged(&replica_pids(&status));
    assert!(
        !alive(before[0]),
        "the old replica {} was stopped",
        before[0]
    );

    // SIGTERM: the supervisor stops every replica before it exits.
    let now = replica_pids(&status);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(sup_pid as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let exit = supervisor.0.wait().unwrap();
    assert!(exit.success(), "the supervisor exited with {exit}");
    for pid in now {
        assert!(!alive(pid), "replica {pid} outlived the supervisor");
    }
}

/// The supervisor's process, killed if the test ends early (a failed assertion), so that it and
/// its replicas do not outlive the test.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
