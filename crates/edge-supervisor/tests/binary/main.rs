//! The `edge-supervisor` binary: the systemd notify protocol, exit codes, the CLI.

mod cli;
mod hostile;
mod systemd;

use std::path::Path;
use std::process::Command;

/// The binary, through `QUOTE_EDGE_TEST_RUNNER` when the tests run under an emulator.
pub fn supervisor() -> Command {
    tests::command(Path::new(env!("CARGO_BIN_EXE_edge-supervisor")))
}

/// A config whose replicas are the workspace's fake replica (`tests/src/bin/fake-replica.rs`,
/// healthy and ready), probed by TCP: enough for the supervisor's own behaviour. The same
/// fake replica the integration tests use, found beside this test executable.
pub fn fake_replicas(dir: &Path, replicas: u32) -> std::path::PathBuf {
    let (program, mut args) = tests::service_command(&tests::workspace_binary("fake-replica"));
    args.extend(["{port}", "{replica}", "ok", "{index}"].map(str::to_owned));
    let config = format!(
        r#"listen = "127.0.0.1:0"
admin_listen = ""
data_dir = "{dir}"
replicas = {replicas}
[service]
command = "{program}"
args = {args}
stop_grace = "2s"
[probes.startup]
tcp = true
[probes.liveness]
tcp = true
[probes.readiness]
tcp = true
"#,
        dir = dir.display(),
        args = serde_json::to_string(&args).unwrap(),
    );
    let path = dir.join("supervisor.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// `status --json` of the supervisor with data directory `data`, when it answers.
pub fn status(data: &str) -> Option<serde_json::Value> {
    let out = supervisor()
        .args(["status", "--json", "--data-dir", data])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Waits (up to 60 s) until `n` replicas are ready; the status then.
pub fn ready(data: &str, n: u64) -> serde_json::Value {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(status) = status(data).filter(|s| s["ready"] == n) {
            return status;
        }
        assert!(
            std::time::Instant::now() < until,
            "{n} replicas never ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
