//! The release's own database tool (`quote-service snapshot|restore`), run the way the
//! supervisor runs the release, and the health commands that end a trial.
//!
//! Architecture invariant: the agent knows no database schema and no process supervision: the
//! supervisor hands it a [`ReleaseCommand`] made from its `[service]` table.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::agent::{Layout, unix_now};

/// How to run the release whose programs are in a directory: the command a replica of that
/// release would get (program, arguments, environment), to which the agent appends a
/// subcommand (`snapshot --to PATH`, `restore --from PATH --export PATH`).
#[derive(Clone)]
pub struct ReleaseCommand(Arc<dyn Fn(&Path) -> Command + Send + Sync>);

impl ReleaseCommand {
    pub fn new(command: impl Fn(&Path) -> Command + Send + Sync + 'static) -> ReleaseCommand {
        ReleaseCommand(Arc::new(command))
    }
}

impl fmt::Debug for ReleaseCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReleaseCommand(..)")
    }
}

/// Why a snapshot or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("there is no snapshot at {0}")]
    NoSnapshot(PathBuf),
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} {subcommand} failed ({status}): {stderr}")]
    Failed {
        program: PathBuf,
        subcommand: String,
        status: ExitStatus,
        /// The last line the tool wrote on stderr.
        stderr: String,
    },
}

/// Why a health command failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("{command:?} exited with {status}")]
    Failed {
        command: Vec<String>,
        status: ExitStatus,
    },
    #[error("cannot run {command:?}: {source}")]
    Spawn {
        command: Vec<String>,
        #[source]
        source: std::io::Error,
    },
    #[error("{command:?} did not finish within {}", humantime::format_duration(*.after))]
    Timeout {
        command: Vec<String>,
        after: Duration,
    },
}

/// Runs `release_dir`'s database tool with `args` appended.
fn database_command(
    command: &ReleaseCommand,
    release_dir: &Path,
    args: &[&str],
) -> Result<(), DatabaseError> {
    let mut command = (command.0)(release_dir);
    let program = PathBuf::from(command.get_program());
    let output = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|child| {
            // A cut while the snapshot or the restore runs (the child dies with the device).
            failpoint::hit("database.running");
            child.wait_with_output()
        })
        .map_err(|source| DatabaseError::Spawn {
            program: program.clone(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(DatabaseError::Failed {
        program,
        subcommand: args.join(" "),
        status: output.status,
        stderr: stderr.lines().last().unwrap_or("").trim().to_owned(),
    })
}

/// Made durably: the snapshot and the exports go in it, and outlive a cut only if its name does.
fn create_dir(path: &Path) -> Result<(), DatabaseError> {
    durable::create_dir_all(path).map_err(|source| DatabaseError::CreateDir {
        path: path.to_owned(),
        source,
    })
}

/// Snapshot of the live database, by the release in `release_dir` (the running one).
pub fn snapshot_database(
    layout: &Layout,
    command: &ReleaseCommand,
    release_dir: &Path,
) -> Result<(), DatabaseError> {
    let to = layout.snapshot();
    if let Some(dir) = to.parent() {
        create_dir(dir)?;
    }
    database_command(
        command,
        release_dir,
        &["snapshot", "--to", &to.to_string_lossy()],
    )
}

/// Puts the snapshot back with the binary in `release_dir`, exporting the trial's quotes to
/// `<ota>/rollback/<unix time>-trial-quotes.jsonl` (or `<unix time>-N-trial-quotes.jsonl`
/// when that name is taken).
pub fn restore_database(
    layout: &Layout,
    command: &ReleaseCommand,
    release_dir: &Path,
) -> Result<(), DatabaseError> {
    let snapshot = layout.snapshot();
    if !snapshot.exists() {
        return Err(DatabaseError::NoSnapshot(snapshot));
    }
    let dir = layout.rollback();
    create_dir(&dir)?;
    // A name no earlier export has: a restore redone within the same second (after a cut
    // during the first, which may have finished) must not replace the first one's export.
    let now = unix_now();
    let export = (0u32..)
        .map(|n| match n {
            0 => dir.join(format!("{now}-trial-quotes.jsonl")),
            n => dir.join(format!("{now}-{n}-trial-quotes.jsonl")),
        })
        .find(|path| {
            path.symlink_metadata()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
        })
        .expect("a free name");
    database_command(
        command,
        release_dir,
        &[
            "restore",
            "--from",
            &snapshot.to_string_lossy(),
            "--export",
            &export.to_string_lossy(),
        ],
    )
}

/// How long one health command may run.
const HEALTH_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the health commands in order; the first failure (exit, or 30 s without an exit) ends.
pub async fn health_commands(commands: Vec<Vec<String>>) -> Result<(), HealthError> {
    for command in commands {
        let run = tokio::process::Command::new(&command[0])
            .args(&command[1..])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(HEALTH_COMMAND_TIMEOUT, run).await {
            Ok(Ok(out)) if out.status.success() => {}
            Ok(Ok(out)) => {
                return Err(HealthError::Failed {
                    command,
                    status: out.status,
                });
            }
            Ok(Err(source)) => return Err(HealthError::Spawn { command, source }),
            Err(_) => {
                return Err(HealthError::Timeout {
                    command,
                    after: HEALTH_COMMAND_TIMEOUT,
                });
            }
        }
    }
    Ok(())
}
