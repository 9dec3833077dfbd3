//! systemd's notify protocol, with the test playing systemd: a datagram socket in
//! `NOTIFY_SOCKET`, and `WATCHDOG_USEC` asking for keep-alives.

use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::{fake_replicas, supervisor};

/// Collects notify messages until `done` says so (or fails the test at the deadline).
fn collect_until(socket: &UnixDatagram, seen: &mut Vec<String>, done: impl Fn(&[String]) -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    let mut buf = [0u8; 4096];
    while !done(seen) {
        assert!(Instant::now() < until, "notify messages so far: {seen:?}");
        if let Ok(n) = socket.recv(&mut buf) {
            seen.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_owned),
            );
        }
    }
}

#[test]
fn ready_status_watchdog_and_stopping_reach_systemd_and_never_the_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let config = fake_replicas(dir.path(), 2);
    let mut child = supervisor()
        .args(["run", "--config", config.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .env("SUPERVISOR_ONLY", "1")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let mut seen = Vec::new();
    collect_until(&socket, &mut seen, |s| s.iter().any(|m| m == "READY=1"));
    collect_until(&socket, &mut seen, |s| {
        s.iter().any(|m| m == "STATUS=2/2 replicas ready")
    });
    let pings_before = seen.iter().filter(|m| *m == "WATCHDOG=1").count();
    collect_until(&socket, &mut seen, |s| {
        s.iter().filter(|m| *m == "WATCHDOG=1").count() >= pings_before + 3
    });

    // The replicas' environment has none of the supervisor's variables, systemd's included.
    let status = supervisor()
        .args([
            "status",
            "--json",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    for replica in status["replicas"].as_array().unwrap() {
        let pid = replica["pid"].as_u64().unwrap();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        assert!(
            environ.contains("QUOTE_INSTANCE=replica-"),
            "the configured env reached the replica: {environ:?}"
        );
        // A clean environment: nothing of the supervisor's own but PATH.
        assert!(
            !environ.contains("SUPERVISOR_ONLY="),
            "replica {pid} inherited the supervisor's environment: {environ:?}"
        );
        let systemd = format!("NOTIFY_SOCKET={}", notify_path.display());
        let own = format!("NOTIFY_SOCKET={}", dir.path().join("ready.sock").display());
        for private in [systemd.as_str(), "WATCHDOG_USEC="] {
            assert!(
                !environ.contains(private),
                "replica {pid} inherited {private}"
            );
        }
        assert!(
            environ.contains(&own),
            "replica {pid} was not given the supervisor's readiness socket ({own})"
        );
    }

    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    collect_until(&socket, &mut seen, |s| s.iter().any(|m| m == "STOPPING=1"));
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(edge_proto::exit::OK));
    assert!(
        !dir.path().join("supervisor.sock").exists(),
        "the control socket is removed on a clean stop"
    );
}
