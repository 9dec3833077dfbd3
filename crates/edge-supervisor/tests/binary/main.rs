//! The `edge-supervisor` binary: the systemd notify protocol, exit codes, the CLI.

mod cli;
mod systemd;

use std::path::Path;
use std::process::Command;

/// The binary, through `QUOTE_EDGE_TEST_RUNNER` when the tests run under an emulator.
pub fn supervisor() -> Command {
    tests::command(Path::new(env!("CARGO_BIN_EXE_edge-supervisor")))
}

/// A config whose replicas are Python's tiny HTTP server, probed by TCP: enough for the
/// supervisor's own behaviour, with no dependency on the rest of the workspace.
pub fn python_replicas(dir: &Path, replicas: u32) -> std::path::PathBuf {
    let config = format!(
        r#"listen = "127.0.0.1:0"
admin_listen = ""
data_dir = "{dir}"
replicas = {replicas}
[service]
command = "python3"
args = ["-m", "http.server", "{{port}}", "--bind", "127.0.0.1", "--directory", "{dir}"]
env = {{ PYTHONUNBUFFERED = "1" }}
stop_grace = "2s"
[probes.startup]
tcp = true
[probes.liveness]
tcp = true
[probes.readiness]
tcp = true
"#,
        dir = dir.display()
    );
    let path = dir.join("supervisor.toml");
    std::fs::write(&path, config).unwrap();
    path
}
