//! The contract between the supervisor and whatever talks to it: the control-socket protocol,
//! the `status --json` document, and the process exit codes.
//!
//! Architecture invariant: this crate has no I/O and no dependencies beyond serde, except the
//! control-socket client, `client`, behind the `client` feature: the one place that speaks
//! the protocol from the caller's side, so that every program speaks it the same way. Anything
//! here is a promise to other programs (scripts, the OTA agent, the image tests): fields are
//! only ever added, never renamed or removed, within one `PROTOCOL_VERSION`.
//!
//! The control socket speaks JSON lines: the client writes one [`Request`], the supervisor
//! answers with one [`Reply`] and closes the connection.

use std::fmt;

use serde::{Deserialize, Serialize};

#[cfg(feature = "client")]
pub mod client;

/// A closed set of words on the wire: a serde enum whose JSON form is its `as_str`, shown the
/// same way by `Display` (the human `status` table prints what `--json` carries).
macro_rules! wire_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The word on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum! {
    /// The supervisor as a whole.
    pub enum SupervisorState {
        /// No replica is ready yet.
        Starting = "starting",
        /// At least one replica is ready.
        Running = "running",
        /// Shutting down: replicas are being stopped.
        Stopping = "stopping",
    }
}

wire_enum! {
    /// What the OTA agent is doing.
    #[derive(Default)]
    pub enum UpdateState {
        #[default]
        Idle = "idle",
        /// Verifying the bundle and writing the inactive slot.
        Installing = "installing",
        /// The running release snapshots the database.
        Snapshotting = "snapshotting",
        /// Replicas are being replaced by the new release.
        RollingOut = "rolling_out",
        /// Every replica of the new release is ready; the trial time runs.
        Trial = "trial",
        /// The health commands run.
        Checking = "checking",
        /// The new release is stopped, the database restored, the previous release started.
        RollingBack = "rolling_back",
        /// The outcome is saved; its signed receipt is being written (on a stick, perhaps).
        Recording = "recording",
    }
}

wire_enum! {
    /// How an update ended.
    pub enum UpdateOutcome {
        /// Tried and committed: the new release runs.
        Committed = "committed",
        /// Tried and rolled back: the previous release runs, the database restored.
        RolledBack = "rolled_back",
        /// Writing the slot failed (a damaged bundle, a full disk): nothing changed.
        InstallFailed = "install_failed",
        /// Refused before the slot was touched (signature, product, downgrade, space...).
        Refused = "refused",
    }
}

wire_enum! {
    /// A replica slot.
    pub enum ReplicaState {
        /// Backoff before the next start.
        Waiting = "waiting",
        /// Started; the startup probe has not passed yet.
        Starting = "starting",
        /// Started and probed by liveness and readiness.
        Running = "running",
        /// Asked to stop (SIGTERM, then SIGKILL after the grace).
        Stopping = "stopping",
    }
}

wire_enum! {
    /// Why a replica process ended.
    pub enum ExitReason {
        /// It exited (`code`).
        Exit = "exit",
        /// A signal killed it (`signal`).
        Signal = "signal",
        /// The kernel's OOM killer, within the replica's cgroup.
        OomKill = "oom_kill",
        /// It failed its liveness probe and was replaced.
        Liveness = "liveness",
        /// It did not pass its startup probe in time.
        StartupTimeout = "startup_timeout",
        /// It could not be started.
        SpawnFailed = "spawn_failed",
        /// It was asked to stop.
        Stopped = "stopped",
    }
}

wire_enum! {
    /// Which output of a replica a line came from.
    pub enum LogStream {
        Stdout = "stdout",
        Stderr = "stderr",
    }
}

wire_enum! {
    /// How replica limits are enforced.
    pub enum LimitsMode {
        /// cgroup v2 per replica (memory.max, cpu.max, pids.max).
        CgroupV2 = "cgroup-v2",
        /// setrlimit per process (no cgroup v2 delegation here).
        Rlimit = "rlimit",
        /// No limits configured.
        None = "none",
    }
}

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
    pub state: SupervisorState,
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
    pub state: UpdateState,
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

/// How the last update ended, for a version (for `refused`, the bundle's path), with the
/// reason of a failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateResult {
    pub result: UpdateOutcome,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub mode: LimitsMode,
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
    pub state: ReplicaState,
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
    /// With `code` for `exit`, `signal` for `signal`.
    pub reason: ExitReason,
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
    pub stream: LogStream,
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

    /// The words on the wire are a promise to scripts: pinned here, one by one.
    #[test]
    fn enums_keep_their_wire_words() {
        fn words<T: Serialize>(all: &[T]) -> Vec<String> {
            all.iter()
                .map(|v| {
                    serde_json::to_value(v)
                        .unwrap()
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect()
        }
        assert_eq!(
            words(SupervisorState::ALL),
            ["starting", "running", "stopping"]
        );
        assert_eq!(
            words(UpdateState::ALL),
            [
                "idle",
                "installing",
                "snapshotting",
                "rolling_out",
                "trial",
                "checking",
                "rolling_back",
                "recording"
            ]
        );
        assert_eq!(
            words(UpdateOutcome::ALL),
            ["committed", "rolled_back", "install_failed", "refused"]
        );
        assert_eq!(
            words(ReplicaState::ALL),
            ["waiting", "starting", "running", "stopping"]
        );
        assert_eq!(
            words(ExitReason::ALL),
            [
                "exit",
                "signal",
                "oom_kill",
                "liveness",
                "startup_timeout",
                "spawn_failed",
                "stopped"
            ]
        );
        assert_eq!(words(LogStream::ALL), ["stdout", "stderr"]);
        assert_eq!(words(LimitsMode::ALL), ["cgroup-v2", "rlimit", "none"]);
        // Display shows the same word, and an unknown word is refused, not defaulted.
        assert_eq!(UpdateState::RollingOut.to_string(), "rolling_out");
        assert!(serde_json::from_str::<UpdateState>(r#""paused""#).is_err());
    }

    #[test]
    fn unknown_fields_in_requests_are_refused() {
        let err =
            serde_json::from_str::<Request>(r#"{"command":"scale","replicas":2,"force":true}"#);
        assert!(err.is_err());
    }
}
