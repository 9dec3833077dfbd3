//! Replica processes: spawning (own process group, own port, sanitised environment),
//! capturing their output into a bounded in-memory ring, and signalling their group.
//!
//! Nothing here writes to disk: captured lines live in memory only (this is flash).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use edge_proto::{LogLine, LogStream};
use replica_model::Signal;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

use crate::config::{RunAs, ServiceSpec};

/// Longest captured line; the rest of a longer line is dropped and marked.
pub(crate) const MAX_LINE: usize = 4096;

/// What a replica's process is started with.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// `service.user`: who it runs as (default: the supervisor's user).
    pub user: Option<RunAs>,
}

/// The values substituted into a replica's command, arguments, environment and exec probes:
/// `{port}`, `{replica}`, `{index}`, `{data_dir}`, and `{release}` (the directory holding the
/// programs of the release the replica runs: the factory one, or a slot's `bin/`).
#[derive(Debug, Clone)]
pub struct Placeholders {
    port: String,
    replica: String,
    index: String,
    data_dir: String,
    release: PathBuf,
}

impl Placeholders {
    pub fn new(data_dir: &Path, index: usize, port: u16, release: &Path) -> Self {
        Placeholders {
            port: port.to_string(),
            replica: replica_model::replica_id(index),
            index: index.to_string(),
            data_dir: data_dir.display().to_string(),
            release: release.to_owned(),
        }
    }

    pub fn fill(&self, text: &str) -> String {
        text.replace("{port}", &self.port)
            .replace("{replica}", &self.replica)
            .replace("{index}", &self.index)
            .replace("{data_dir}", &self.data_dir)
            .replace("{release}", &self.release.display().to_string())
    }
}

/// Resolves the program and fills in the placeholders of its arguments and environment.
pub fn launch(spec: &ServiceSpec, values: &Placeholders) -> Launch {
    Launch {
        program: resolve_program(&spec.command, values),
        args: spec.args.iter().map(|a| values.fill(a)).collect(),
        env: spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), values.fill(v)))
            .collect(),
        user: spec.user.clone(),
    }
}

/// The environment a child that runs release code starts from: `PATH` alone (the rest is the
/// configuration's), so that nothing of the supervisor's own leaks into it: not systemd's
/// `NOTIFY_SOCKET` or `WATCHDOG_*` (a replica that had them could send READY or WATCHDOG in the
/// supervisor's name), not its credentials or flags. Only the power-cut harness's fail points
/// pass (failpoints builds).
pub(crate) fn clean_env(command: &mut std::process::Command) {
    command
        .env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| k == "PATH"))
        .envs(failpoint::inherited());
}

/// Runs `command` as `service.user` when one is set, without the supervisor's capabilities.
pub(crate) fn run_as(command: &mut std::process::Command, user: Option<&RunAs>) {
    if let Some(user) = user {
        sys::run_as(command, user);
    }
}

/// How the OTA agent runs a release's database tool: the replica command of the release in a
/// directory (index 0, port 0), with a clean environment but `PATH` and the service's own.
pub fn release_command(spec: &ServiceSpec, data_dir: &Path) -> ota_agent::ReleaseCommand {
    let (spec, data_dir) = (spec.clone(), data_dir.to_owned());
    ota_agent::ReleaseCommand::new(move |release: &Path| {
        let launch = launch(&spec, &Placeholders::new(&data_dir, 0, 0, release));
        let mut command = std::process::Command::new(&launch.program);
        clean_env(&mut command);
        command.args(&launch.args).envs(&launch.env);
        run_as(&mut command, launch.user.as_ref());
        command
    })
}

/// A bare program name is looked for in the release's directory first (the factory release is
/// the supervisor's own directory, by default), then on `PATH`; placeholders are filled in.
pub fn resolve_program(command: &Path, values: &Placeholders) -> PathBuf {
    if command.components().count() == 1 {
        let inside = values.release.join(command);
        if inside.is_file() {
            return inside;
        }
    }
    PathBuf::from(values.fill(&command.to_string_lossy()))
}

/// A free port on 127.0.0.1 for a new replica, from the kernel's ephemeral range.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// Captured output of every replica, a bounded ring per replica id.
#[derive(Debug, Clone)]
pub struct LogRing {
    capacity: usize,
    lines: Arc<Mutex<HashMap<String, VecDeque<LogLine>>>>,
}

impl LogRing {
    pub fn new(capacity: usize) -> Self {
        LogRing {
            capacity: capacity.max(1),
            lines: Arc::default(),
        }
    }

    pub fn push(&self, replica: &str, line: LogLine) {
        let mut all = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let ring = all.entry(replica.to_owned()).or_default();
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(line);
    }

    /// The last `n` lines of one replica, oldest first.
    pub fn tail(&self, replica: &str, n: usize) -> Vec<LogLine> {
        let all = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        all.get(replica)
            .map(|ring| {
                ring.iter()
                    .skip(ring.len().saturating_sub(n))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Starts a replica in its own process group with its output captured, told where to say it
/// is ready (`ready_socket`). Returns the pid and a future that resolves when the process has
/// exited.
pub fn spawn(
    launch: &Launch,
    replica: &str,
    logs: &LogRing,
    echo: bool,
    ready_socket: Option<&Path>,
) -> std::io::Result<(
    u32,
    impl Future<Output = std::io::Result<ExitStatus>> + Send + 'static,
)> {
    let mut command = std::process::Command::new(&launch.program);
    clean_env(&mut command);
    run_as(&mut command, launch.user.as_ref());
    sys::die_with_supervisor(&mut command);
    let mut command = Command::from(command);
    command
        .args(&launch.args)
        .envs(&launch.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so a signal reaches everything it started, and a terminal's
        // Ctrl-C reaches only the supervisor, which then stops replicas in order.
        .process_group(0)
        .kill_on_drop(false);
    // Not systemd's socket (`clean_env` left it out) but the supervisor's own: see `ready.rs`.
    if let Some(path) = ready_socket {
        command.env("NOTIFY_SOCKET", path);
    }
    let mut child = command.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| std::io::Error::other("the process exited before it was seen"))?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(capture(
            out,
            LogStream::Stdout,
            pid,
            replica.to_owned(),
            logs.clone(),
            echo,
        ));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(capture(
            err,
            LogStream::Stderr,
            pid,
            replica.to_owned(),
            logs.clone(),
            echo,
        ));
    }
    Ok((pid, async move { child.wait().await }))
}

/// A replica killed with the supervisor (`PR_SET_PDEATHSIG`), so that a supervisor killed with
/// SIGKILL leaves no orphan holding the database and memory. One of the two `unsafe` blocks
/// of the workspace (the other is the watchdog ioctl): std offers no safe way to run code
/// between fork and exec.
#[allow(unsafe_code)]
mod sys {
    use std::os::unix::process::CommandExt;

    use rustix::process::{Signal, getpid, getppid, set_parent_process_death_signal};

    use crate::config::RunAs;

    /// Runs the child as `user`, with no supplementary group (std drops them before setuid)
    /// and no capability: the supervisor's ambient and inheritable ones (CAP_SETUID, CAP_KILL,
    /// ...) survive a setuid between two non-root users and the exec, so the child empties
    /// its permitted, effective and inheritable sets (dropping is always allowed), which
    /// empties the ambient set too (a capability is ambient only while permitted and
    /// inheritable). A non-root user with no ambient and no inheritable capability gets none
    /// from exec, not even from a file's capabilities.
    pub fn run_as(command: &mut std::process::Command, user: &RunAs) {
        use rustix::thread::{CapabilitySet, CapabilitySets, set_capabilities};
        command.uid(user.uid).gid(user.gid);
        // SAFETY: runs in the child between fork and exec (after std's setgid/setuid): one
        // capset, no allocation, no lock.
        unsafe {
            command.pre_exec(|| {
                set_capabilities(
                    None,
                    CapabilitySets {
                        effective: CapabilitySet::empty(),
                        permitted: CapabilitySet::empty(),
                        inheritable: CapabilitySet::empty(),
                    },
                )?;
                Ok(())
            });
        }
    }

    pub fn die_with_supervisor(command: &mut std::process::Command) {
        let supervisor = getpid();
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe calls are allowed: it makes two system calls (prctl, getppid),
        // allocates nothing and takes no lock. The death signal follows the thread that forked:
        // the dispatcher's runtime thread, which lives as long as the supervisor.
        unsafe {
            command.pre_exec(move || {
                set_parent_process_death_signal(Some(Signal::KILL))?;
                // The supervisor died before the line above: the signal will never come.
                if getppid() != Some(supervisor) {
                    return Err(std::io::Error::other("the supervisor is gone"));
                }
                Ok(())
            });
        }
    }
}

async fn capture(
    stream: impl AsyncRead + Unpin,
    name: LogStream,
    pid: u32,
    replica: String,
    logs: LogRing,
    echo: bool,
) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match read_line_bounded(&mut reader, &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
        if echo {
            tracing::info!(target: "replica", replica = %replica, pid, "{line}");
        }
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        logs.push(
            &replica,
            LogLine {
                at_ms,
                stream: name,
                pid,
                line,
            },
        );
    }
}

/// Reads one line, keeping at most [`MAX_LINE`] bytes of it; returns bytes consumed.
async fn read_line_bounded<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut consumed = 0;
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(consumed);
        }
        let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = MAX_LINE.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..take.min(room)]);
        if take > room && !buf.ends_with(b" [truncated]") {
            buf.extend_from_slice(b" [truncated]");
        }
        reader.consume(take);
        consumed += take;
        if done {
            return Ok(consumed);
        }
    }
}

/// Signals a replica's whole process group. A group that is already gone is not an error.
pub fn signal_group(pid: u32, signal: Signal) -> std::io::Result<()> {
    let Some(pgid) = rustix::process::Pid::from_raw(pid as i32) else {
        return Ok(());
    };
    let signal = match signal {
        Signal::Term => rustix::process::Signal::TERM,
        Signal::Kill => rustix::process::Signal::KILL,
    };
    match rustix::process::kill_process_group(pgid, signal) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_cut_and_marked() {
        let text = format!("{}\nshort\n", "x".repeat(10_000));
        let mut reader = BufReader::with_capacity(64, text.as_bytes());
        let mut buf = Vec::new();
        let n = read_line_bounded(&mut reader, &mut buf).await.unwrap();
        assert_eq!(n, 10_001);
        assert!(buf.len() <= MAX_LINE + 12 && buf.ends_with(b" [truncated]"));
        buf.clear();
        read_line_bounded(&mut reader, &mut buf).await.unwrap();
        assert_eq!(buf, b"short\n");
    }

    #[test]
    fn the_ring_keeps_the_newest_lines() {
        let ring = LogRing::new(3);
        for i in 0..5 {
            ring.push(
                "replica-0",
                LogLine {
                    at_ms: i,
                    stream: LogStream::Stdout,
                    pid: 1,
                    line: i.to_string(),
                },
            );
        }
        let lines: Vec<_> = ring
            .tail("replica-0", 10)
            .into_iter()
            .map(|l| l.line)
            .collect();
        assert_eq!(lines, ["2", "3", "4"]);
        assert_eq!(ring.tail("replica-0", 1)[0].line, "4");
        assert!(ring.tail("replica-9", 10).is_empty());
    }

    #[test]
    fn placeholders_are_filled_in() {
        let spec = ServiceSpec {
            command: PathBuf::from("/bin/true"),
            args: vec![
                "--port={port}".into(),
                "{replica}".into(),
                "{release}/tool".into(),
            ],
            env: crate::config::default_env(),
            stop_grace: std::time::Duration::from_secs(1),
            hung_grace: std::time::Duration::from_secs(1),
            log_lines: 10,
            user: None,
        };
        let values = Placeholders::new(Path::new("/data"), 2, 41000, Path::new("/rel/bin"));
        let l = launch(&spec, &values);
        assert_eq!(l.args, ["--port=41000", "replica-2", "/rel/bin/tool"]);
        assert_eq!(l.program, Path::new("/bin/true"));
        assert_eq!(l.env["QUOTE_LISTEN"], "127.0.0.1:41000");
        assert_eq!(l.env["QUOTE_DB"], "/data/quotes.db");
        assert_eq!(l.env["QUOTE_INSTANCE"], "replica-2");
    }

    #[test]
    fn a_bare_program_name_is_found_in_the_release_directory_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("quote-service"), b"").unwrap();
        let values = Placeholders::new(Path::new("/data"), 0, 1, dir.path());
        assert_eq!(
            resolve_program(Path::new("quote-service"), &values),
            dir.path().join("quote-service")
        );
        assert_eq!(
            resolve_program(Path::new("not-in-the-release"), &values),
            Path::new("not-in-the-release"),
            "left to PATH"
        );
        assert_eq!(
            resolve_program(Path::new("{release}/x"), &values),
            dir.path().join("x")
        );
    }
}
