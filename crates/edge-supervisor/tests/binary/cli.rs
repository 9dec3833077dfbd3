//! Exit codes and the control subcommands, as a script would see them.

use std::process::Stdio;
use std::time::Duration;

use edge_proto::exit;

use crate::{fake_replicas, ready, supervisor};

#[test]
fn a_configuration_error_exits_with_the_code_systemd_will_not_restart_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "replicas = 3\n[probes.liveness]\nperiodd = \"1s\"\n",
    )
    .unwrap();
    let out = supervisor()
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(exit::CONFIG));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml") && stderr.contains("periodd") && stderr.contains("line 3"),
        "{stderr}"
    );
}

#[test]
fn the_supervisor_refuses_to_start_trusting_the_repository_test_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = fake_replicas(dir.path(), 1);
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/../../ota/keys");
    let child = supervisor()
        .args(["run", "--config", config.to_str().unwrap()])
        .args(["--trusted-keys", keys])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A supervisor that does not refuse runs until stopped: stop it after 30 s, so that the
    // test fails on the exit code instead of hanging.
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let pid = child.id().to_string();
    let guard = std::thread::spawn(move || {
        if finished.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = std::process::Command::new("kill").arg(&pid).status();
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = done.send(());
    guard.join().unwrap();
    assert_eq!(out.status.code(), Some(exit::CONFIG));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the repository's test key 276372dbe336c2e0")
            && stderr.contains("allow_test_key = true"),
        "{stderr}"
    );
    // No replica was started: the refusal comes before the first spawn.
    assert!(!stderr.contains("replica-1"), "{stderr}");
}

#[test]
fn control_commands_without_a_supervisor_say_it_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let out = supervisor()
        .args(["status", "--data-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(exit::UNREACHABLE));
    assert!(String::from_utf8_lossy(&out.stderr).contains("supervisor.sock"));
}

#[test]
fn status_scale_and_refusals_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = fake_replicas(dir.path(), 1);
    let mut child = supervisor()
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let data = dir.path().to_str().unwrap();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--data-dir", data]);
        supervisor().args(&all).output().unwrap()
    };
    ready(data, 1);
    let table = String::from_utf8_lossy(&run(&["status"]).stdout).into_owned();
    assert!(
        table.contains("REPLICA") && table.contains("replica-0") && table.contains("running"),
        "{table}"
    );

    let out = run(&["scale", "2"]);
    assert_eq!(out.status.code(), Some(exit::OK));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "scaling to 2 replicas"
    );
    let out = run(&["scale", "500"]);
    assert_eq!(out.status.code(), Some(exit::REFUSED));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_replicas"));
    let out = run(&["restart", "replica-9"]);
    assert_eq!(out.status.code(), Some(exit::REFUSED));

    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert_eq!(child.wait().unwrap().code(), Some(exit::OK));
}
