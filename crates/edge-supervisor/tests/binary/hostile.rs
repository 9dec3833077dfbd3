//! The supervisor against a hostile network and a hard kill: more idle and half-sent client
//! connections than it has descriptors, and SIGKILL.

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{fake_replicas, ready, supervisor};

/// A supervisor process, killed when the test ends however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn restarts(status: &serde_json::Value) -> u64 {
    status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["restarts"].as_u64().unwrap())
        .sum()
}

/// A client connection from `source` (any 127.x.y.z: loopback takes every one).
async fn connect(source: [u8; 4], to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    tokio::time::timeout(Duration::from_secs(2), socket.connect(to))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

/// Under qemu-user every process runs 10 to 20 times slower and probes time out under any
/// load: what this file checks is the same logic on every architecture, and it runs natively
/// (README's command, CI's first pass). Says so loudly; CI's emulated pass skips these tests
/// by name (`.ci/run`), since under `CI=true` a skip is a failure.
fn emulated() -> bool {
    let emulated = tests::emulated();
    if emulated {
        tests::skip("under an emulator: the hostile-network tests run natively");
    }
    emulated
}

#[test]
fn more_idle_and_half_sent_connections_than_descriptors_stop_nothing_else() {
    if emulated() {
        return;
    }
    // This test's own client sockets need more descriptors than the supervisor gets.
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let config = fake_replicas(dir.path(), 3);
    // systemd's default soft limit, as the unit would give without LimitNOFILE.
    let (program, args) =
        tests::service_command(std::path::Path::new(env!("CARGO_BIN_EXE_edge-supervisor")));
    let _supervisor = Running(
        std::process::Command::new("prlimit")
            .args(["--nofile=1024:1024", "--", &program])
            .args(args)
            .args(["run", "--config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prlimit (util-linux)"),
    );
    let before = ready(&data, 3);
    let public: SocketAddr = before["listen"].as_str().unwrap().parse().unwrap();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // 1,500 connections from 20 addresses (75 each, past the per-address cap), every other
        // one with half a request sent: more than the 1,024 descriptors the supervisor has.
        let mut attack = Vec::new();
        let started = Instant::now();
        'open: for address in 0..20u8 {
            for i in 0..75 {
                if started.elapsed() > Duration::from_secs(60) {
                    break 'open;
                }
                let Ok(mut stream) = connect([127, 0, 1, address + 1], public).await else {
                    continue;
                };
                if i % 2 == 0 {
                    let _ = stream
                        .write_all(b"GET /quotes HTTP/1.1\r\nHost: x\r\n")
                        .await;
                }
                attack.push(stream);
            }
        }
        assert!(
            attack.len() >= 1_000,
            "only {} connections opened",
            attack.len()
        );

        // A client from another address is answered while the attack holds (it may wait in
        // the accept queue: how long is measured by tests/bench, not asserted here).
        let mut client = connect([127, 0, 0, 2], public).await.unwrap();
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut answer))
            .await
            .expect("the client is answered within 60 s")
            .unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );

        // Every attacking connection is closed by the router, at the latest after the header
        // timeout of the last one accepted.
        for (i, stream) in attack.iter_mut().enumerate() {
            let mut rest = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut rest)).await;
            assert!(
                closed.is_ok(),
                "attacking connection {i} still open after 60 s"
            );
        }
    });

    // Nothing else suffered: the control socket answers, every replica stayed ready, none
    // was restarted.
    let after = ready(&data, 3);
    assert_eq!(restarts(&after), restarts(&before), "{after}");
}

#[test]
fn replicas_die_with_a_supervisor_killed_by_sigkill() {
    if emulated() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let config = fake_replicas(dir.path(), 2);
    let mut child = supervisor()
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = ready(&data, 2);
    let pids: Vec<u64> = status["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    child.kill().unwrap();
    child.wait().unwrap();
    // Dead: gone from /proc, or a zombie waiting for whoever adopted it to reap it.
    let alive = |pid: &u64| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit(") ")
                .next()
                .is_some_and(|rest| !rest.starts_with('Z'))
        })
    };
    let until = Instant::now() + Duration::from_secs(30);
    while pids.iter().any(alive) {
        assert!(
            Instant::now() < until,
            "replicas {pids:?} outlived their supervisor"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
