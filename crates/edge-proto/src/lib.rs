//! The contract between the supervisor and whatever talks to it: the control-socket protocol,
//! the `status --json` document, and the process exit codes.
//!
//! Architecture invariant: this crate has no I/O and no dependencies beyond serde. Anything
//! here is a promise to other programs (scripts, the OTA agent, the image tests): fields are
//! only ever added, never renamed or removed, within one `PROTOCOL_VERSION`.
//!
//! The control socket speaks JSON lines: the client writes one [`Request`], the supervisor
//! answers with one [`Reply`] and closes the connection.

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to [`Request`], [`Reply`] or [`Status`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line the supervisor reads from the control socket.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// A command sent to a running supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The whole state, as [`Status`].
    Status,
    /// Run this many replicas from now on.
    Scale { replicas: u32 },
    /// Replace one replica: its successor is started and ready before it is stopped.
    Restart { replica: String },
    /// The last captured output lines of one replica.
    Logs { replica: String, lines: Option<u32> },
    /// Install an update bundle (the OTA agent).
    Apply { bundle: String },
}

/// The supervisor's answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Status(Box<Status>),
    /// The command was accepted; `message` says what will happen.
    Accepted {
        message: String,
    },
    Logs {
        replica: String,
        lines: Vec<LogLine>,
    },
    /// The command was refused; nothing changed.
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request was not valid JSON or not a known command.
    BadRequest,
    /// No replica by that name.
    UnknownReplica,
    /// Allowed in general, not in the current state (for example while shutting down).
    NotAllowedNow,
    /// A value out of range (for example a replica count above the configured maximum).
    OutOfRange,
    /// The feature is not available in this build or configuration.
    Unavailable,
    /// The caller's credentials are not allowed to use the socket.
    PermissionDenied,
}

/// `edge-supervisor status --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The supervisor's own version.
    pub version: String,
    pub protocol: u32,
    /// `starting`, `running` or `stopping`.
    pub state: String,
    /// The public address clients connect to.
    pub listen: String,
    /// Replicas wanted.
    pub desired: u32,
    /// Replicas in rotation now.
    pub ready: u32,
    /// How limits are enforced: `cgroup-v2`, `rlimit` or `none`, with the reason for a fallback.
    pub limits: Limits,
    pub replicas: Vec<ReplicaStatus>,
    /// Seconds since the supervisor started.
    pub uptime_seconds: f64,
    /// The release running and the OTA agent's state.
    #[serde(default)]
    pub update: UpdateStatus,
}

/// The OTA agent: what runs, what it is doing, how the last update ended.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct UpdateStatus {
    /// The running release's version (`factory` for the release shipped with the device).
    pub version: String,
    /// The slot it runs from (`a`, `b`), none for the factory release.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// `idle`, `installing`, `snapshotting`, `rolling_out`, `trial`, `checking`, `rolling_back`.
    pub state: String,
    /// The version being installed or tried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Bytes written into the slot so far, and in all, while installing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// How the last update ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_result: Option<UpdateResult>,
    /// The highest security version committed (anti-rollback floor).
    pub security_version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    pub total: u64,
}

/// `committed`, `rolled_back` or `install_failed`, for a version, with the reason of a failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateResult {
    pub result: String,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One replica slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// `replica-0`, `replica-1`, …
    pub id: String,
    /// The current process, if one is running.
    pub pid: Option<u32>,
    /// The port the replica listens on, on 127.0.0.1.
    pub port: Option<u16>,
    /// `waiting` (backoff before a start), `starting` (startup probe), `running`, `stopping`.
    pub state: String,
    /// In rotation: the router sends it traffic.
    pub ready: bool,
    /// Restarts of this slot since the supervisor started.
    pub restarts: u32,
    /// Why the previous process ended, if one did.
    pub last_exit: Option<ExitInfo>,
    /// True when restarts exceed the budget: the slot keeps retrying, but slowly.
    pub crash_looping: bool,
    /// Seconds until the next start attempt, while `waiting`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_start_in_seconds: Option<f64>,
    /// The release version this replica runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<String>,
}

/// How and why a replica process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// `exit` (with `code`), `signal` (with `signal`), `oom_kill`, `liveness`, `startup_timeout`,
    /// `spawn_failed`, `stopped` (asked to stop).
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Free text: the spawn error, or the failing probe's last message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One captured line of a replica's stdout or stderr.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub pid: u32,
    pub line: String,
}

/// Exit codes of `edge-supervisor`. The shipped systemd unit lists [`exit::CONFIG`] and
/// [`exit::USAGE`] in `RestartPreventExitStatus=`: restarting cannot fix a bad configuration.
pub mod exit {
    /// Clean shutdown.
    pub const OK: i32 = 0;
    /// An unexpected runtime failure; systemd restarts the supervisor.
    pub const FAILURE: i32 = 1;
    /// Bad command line.
    pub const USAGE: i32 = 2;
    /// The control command was refused by the supervisor.
    pub const REFUSED: i32 = 3;
    /// No supervisor answers on the control socket.
    pub const UNREACHABLE: i32 = 4;
    /// The public or admin address, or the control socket, cannot be bound (`EX_IOERR`).
    pub const IO: i32 = 74;
    /// The configuration is invalid (`EX_CONFIG`).
    pub const CONFIG: i32 = 78;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json_lines() {
        let json = serde_json::to_string(&Request::Scale { replicas: 5 }).unwrap();
        assert_eq!(json, r#"{"command":"scale","replicas":5}"#);
        let parsed: Request = serde_json::from_str(r#"{"command":"status"}"#).unwrap();
        assert_eq!(parsed, Request::Status);
    }

    #[test]
    fn unknown_fields_in_requests_are_refused() {
        let err =
            serde_json::from_str::<Request>(r#"{"command":"scale","replicas":2,"force":true}"#);
        assert!(err.is_err());
    }
}
