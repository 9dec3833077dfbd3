//! The command line: `run` starts the supervisor; the other subcommands talk to a running
//! one over its control socket.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use edge_proto::client::Client;
use edge_proto::{Reply, Request, Status, exit};

use crate::config::{self, Overrides};

/// edge-supervisor: keeps N replicas of a service alive, probes them, and routes to the
/// ready ones (the kubelet and the Service of the device).
#[derive(Debug, Parser)]
#[command(name = "edge-supervisor", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the supervisor (the default configuration runs 3 replicas of quote-service).
    Run(RunArgs),
    /// Show the replicas and their state.
    Status {
        /// The status document as JSON (schema: edge_proto::Status).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Run this many replicas.
    Scale {
        replicas: u32,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Replace one replica (e.g. replica-1).
    Restart {
        replica: String,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Print a replica's captured output.
    Logs {
        replica: String,
        /// How many of the last lines.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: u32,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Install an update bundle.
    Apply {
        bundle: PathBuf,
        #[command(flatten)]
        socket: SocketArgs,
    },
    /// Print this device's public key (made on first use), which signs its install receipts:
    /// save the line as `<device id>.pub` where the fleet verifies receipts
    /// (`ota receipt verify --device-keys DIR`).
    DeviceKey {
        /// The supervisor's data directory (the key is `<DIR>/ota/device.key`).
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML); without it, the built-in defaults.
    #[arg(long, env = "EDGE_SUPERVISOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Public address (overrides the file).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Replicas to run (overrides the file).
    #[arg(long)]
    pub replicas: Option<u32>,
    /// Data directory: database, control socket, OTA state (overrides the file).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Directory of trusted OTA public keys (overrides the file).
    #[arg(long)]
    pub trusted_keys: Option<PathBuf>,
    /// A fleet depot to poll for updates, `http://HOST:PORT` (overrides `ota.depot`).
    #[arg(long)]
    pub depot: Option<String>,
    /// Only check the configuration, print the result, and exit.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Args)]
pub struct SocketArgs {
    /// The supervisor's data directory (its socket is `<DIR>/supervisor.sock`).
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// The control socket, if not in the data directory.
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

impl SocketArgs {
    pub fn path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("supervisor.sock"))
    }
}

impl RunArgs {
    pub fn settings(&self) -> Result<config::Settings, config::ConfigError> {
        let overrides = Overrides {
            listen: self.listen,
            replicas: self.replicas,
            data_dir: self.data_dir.clone(),
            trusted_keys: self.trusted_keys.clone(),
            depot: self.depot.clone(),
        };
        config::load(self.config.as_deref(), &overrides)
    }
}

/// `device-key`: the public line of the device key, made if missing.
fn device_key(data_dir: &std::path::Path) -> i32 {
    let dir = data_dir.join("ota");
    if let Err(error) = std::fs::create_dir_all(&dir) {
        let _ = writeln!(
            std::io::stderr(),
            "cannot create {}: {error}",
            dir.display()
        );
        return exit::IO;
    }
    match ota_agent::receipt::device_public_line(&dir.join("device.key")) {
        Ok(line) => {
            let _ = writeln!(std::io::stdout(), "{line}");
            exit::OK
        }
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "{error}");
            exit::IO
        }
    }
}

/// Runs a client subcommand; returns the process exit code.
pub fn client(command: Command) -> i32 {
    let (socket, request, json) = match command {
        Command::Run(_) => return exit::USAGE,
        Command::DeviceKey { data_dir } => return device_key(&data_dir),
        Command::Status { json, socket } => (socket.path(), Request::Status, json),
        Command::Scale { replicas, socket } => (socket.path(), Request::Scale { replicas }, false),
        Command::Restart { replica, socket } => {
            (socket.path(), Request::Restart { replica }, false)
        }
        Command::Logs {
            replica,
            lines,
            socket,
        } => (
            socket.path(),
            Request::Logs {
                replica,
                lines: Some(lines),
            },
            false,
        ),
        Command::Apply { bundle, socket } => {
            let bundle = std::path::absolute(&bundle).unwrap_or(bundle);
            (
                socket.path(),
                Request::Apply {
                    bundle: bundle.display().to_string(),
                },
                false,
            )
        }
    };
    let mut client = Client::new(socket);
    if let Request::Logs {
        lines: Some(lines), ..
    } = &request
    {
        client = client.max_reply_bytes(logs_reply_bound(*lines));
    }
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    match client.request(&request) {
        Err(error) => {
            let _ = writeln!(err, "edge-supervisor: {error}");
            exit::UNREACHABLE
        }
        Ok(Reply::Error { kind, message }) => {
            let _ = writeln!(err, "edge-supervisor: refused ({kind:?}): {message}");
            exit::REFUSED
        }
        Ok(Reply::Status(status)) if json => {
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&status).unwrap_or_default()
            );
            exit::OK
        }
        Ok(Reply::Status(status)) => {
            let _ = write!(out, "{}", render_status(&status));
            exit::OK
        }
        Ok(Reply::Accepted { message }) => {
            let _ = writeln!(out, "{message}");
            exit::OK
        }
        Ok(Reply::Logs { lines, .. }) => {
            for line in lines {
                let _ = writeln!(out, "[{} {}] {}", line.pid, line.stream, line.line);
            }
            exit::OK
        }
    }
}

/// The longest reply to a request for `lines` log lines: each line is at most
/// `process::MAX_LINE` bytes plus the truncation mark, which JSON may escape to six bytes a
/// byte (`\u0000`), plus its other fields. Never below the default bound.
fn logs_reply_bound(lines: u32) -> u64 {
    let per_line = (crate::process::MAX_LINE as u64 + 64) * 6 + 128;
    edge_proto::client::MAX_REPLY_BYTES.max(u64::from(lines).saturating_mul(per_line))
}

/// The human-readable status table.
pub fn render_status(status: &Status) -> String {
    let mut text = format!(
        "edge-supervisor {} on {}: {}, {}/{} ready, limits: {}\n",
        status.version,
        status.listen,
        status.state,
        status.ready,
        status.desired,
        status.limits.mode
    );
    text.push_str(&format!(
        "{:<11} {:<9} {:<6} {:>8} {:>6} {:>9}  {}\n",
        "REPLICA", "STATE", "READY", "PID", "PORT", "RESTARTS", "LAST EXIT"
    ));
    for r in &status.replicas {
        let last = r
            .last_exit
            .as_ref()
            .map_or("-".to_owned(), |e| match (e.code, e.signal) {
                (Some(code), _) => format!("{} {code}", e.reason),
                (_, Some(signal)) => format!("{} {signal}", e.reason),
                _ => e.reason.to_string(),
            });
        let looping = if r.crash_looping {
            " (crash looping)"
        } else {
            ""
        };
        text.push_str(&format!(
            "{:<11} {:<9} {:<6} {:>8} {:>6} {:>9}  {last}{looping}\n",
            r.id,
            r.state,
            if r.ready { "yes" } else { "no" },
            r.pid.map_or("-".to_owned(), |p| p.to_string()),
            r.port.map_or("-".to_owned(), |p| p.to_string()),
            r.restarts,
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_proto::{LogLine, LogStream};

    #[test]
    fn the_longest_logs_reply_fits_the_bound_the_command_reads() {
        // The worst line: as long as capture keeps, every byte a control character that JSON
        // writes as `\u0001`, then the truncation mark; every number at its widest.
        let worst = "\u{1}".repeat(crate::process::MAX_LINE) + " [truncated]";
        for lines in [1, 100, 500] {
            let reply = Reply::Logs {
                replica: "replica-1".repeat(100),
                lines: (0..lines)
                    .map(|_| LogLine {
                        at_ms: u64::MAX,
                        stream: LogStream::Stderr,
                        pid: u32::MAX,
                        line: worst.clone(),
                    })
                    .collect(),
            };
            let bytes = serde_json::to_vec(&reply).unwrap().len() as u64 + 1;
            assert!(
                bytes <= logs_reply_bound(lines),
                "{lines} lines: {bytes} bytes"
            );
        }
    }
}
