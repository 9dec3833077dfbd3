//! The configuration file (TOML), its defaults, and its validation into [`Settings`].
//!
//! Every key is optional. An error names the file, the key and the reason; the supervisor
//! then exits with [`edge_proto::exit::CONFIG`], which the systemd unit does not restart on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

pub use ota_agent::{Settings as Ota, SettingsFile as OtaFile};
pub use replica_model::{Probe, ProbeAction, Probes, RestartPolicy};

/// The directory of the running supervisor binary: where the factory release lives (the
/// default of `ota.factory_bin`). Here, not in `process`, so that configuration imports no
/// process code.
fn own_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {origin}: `{key}` {reason}")]
    Invalid {
        origin: String,
        key: String,
        reason: String,
    },
}

/// The file as written: every field optional, unknown keys refused (a typo is an error,
/// not a silently ignored setting).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Public address, the "Service" (default `127.0.0.1:8080`).
    pub listen: Option<SocketAddr>,
    /// Prometheus metrics address (default `127.0.0.1:9180`; `""` turns it off).
    pub admin_listen: Option<String>,
    /// Directory for the database, the control socket and OTA state (default `./data`).
    pub data_dir: Option<PathBuf>,
    /// Control socket path (default `<data_dir>/supervisor.sock`).
    pub control_socket: Option<PathBuf>,
    /// Numeric group id allowed to use the control socket besides its owner (mode 0660).
    pub control_gid: Option<u32>,
    /// Replicas to run (default 3).
    pub replicas: Option<u32>,
    /// Upper bound for `scale` (default 16).
    pub max_replicas: Option<u32>,
    /// Client connections the router keeps open from one address (default 64): more are
    /// closed at once, so that one client cannot take every slot. Raise it when many clients
    /// share an address (behind a NAT, or a load generator on loopback).
    pub max_connections_per_peer: Option<u32>,
    /// Directory of trusted OTA public keys (default `/etc/quote-edge/keys`).
    pub trusted_keys: Option<PathBuf>,
    #[serde(default)]
    pub service: ServiceFile,
    #[serde(default)]
    pub probes: ProbesFile,
    #[serde(default)]
    pub restart: RestartFile,
    #[serde(default)]
    pub resources: ResourcesFile,
    #[serde(default)]
    pub watchdog: WatchdogFile,
    #[serde(default)]
    pub ota: OtaFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    /// Program to run; a bare name is looked up next to the supervisor binary
    /// (default `quote-service`).
    pub command: Option<PathBuf>,
    /// Arguments; `{port}`, `{replica}`, `{index}` and `{data_dir}` are substituted.
    pub args: Option<Vec<String>>,
    /// Environment, substituted the same way. Replaces the default set when given.
    pub env: Option<BTreeMap<String, String>>,
    /// SIGTERM → SIGKILL grace for an orderly stop (default 5s).
    #[serde(default, with = "humantime_serde")]
    pub stop_grace: Option<Duration>,
    /// SIGTERM → SIGKILL grace for a replica that failed liveness (default 500ms).
    #[serde(default, with = "humantime_serde")]
    pub hung_grace: Option<Duration>,
    /// Captured output lines kept per replica for `logs` (default 500).
    pub log_lines: Option<u32>,
    /// The user the replicas, their exec probes and the release's database tool run as: a
    /// name from /etc/passwd (its primary group too) or `"UID:GID"` (default: the supervisor's
    /// own). Needs CAP_SETUID, CAP_SETGID and CAP_KILL; the children get no capability.
    pub user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbesFile {
    pub startup: Option<ProbeFile>,
    pub liveness: Option<ProbeFile>,
    pub readiness: Option<ProbeFile>,
}

/// One probe, with Kubernetes' names and meaning. Exactly one of `http`, `tcp`, `exec`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeFile {
    /// HTTP GET of this path on the replica's port; 200–399 is success.
    pub http: Option<String>,
    /// A TCP connect to the replica's port.
    pub tcp: Option<bool>,
    /// A command; exit 0 is success. `{port}` etc. are substituted.
    pub exec: Option<Vec<String>>,
    /// Set to false to disable this probe.
    pub enabled: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub initial_delay: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub period: Option<Duration>,
    /// Default 200ms. The readiness probe's is also how long the router waits on a request
    /// before it reports a replica that answered nothing else meanwhile (in-band detection;
    /// off from 10s, the router's own upstream timeout).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    pub success_threshold: Option<u32>,
    pub failure_threshold: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartFile {
    /// Delay before the second restart; it doubles each time (default 250ms). The first
    /// restart is immediate.
    #[serde(default, with = "humantime_serde")]
    pub backoff: Option<Duration>,
    /// Longest delay (default 30s).
    #[serde(default, with = "humantime_serde")]
    pub max_backoff: Option<Duration>,
    /// Random spread added to each delay, as a fraction (default 0.2).
    pub jitter: Option<f64>,
    /// A replica healthy this long has its backoff reset (default 60s).
    #[serde(default, with = "humantime_serde")]
    pub reset_after: Option<Duration>,
    /// More restarts than this within `budget_window` mark the slot crash-looping (default 5).
    pub budget: Option<u32>,
    /// (default 60s)
    #[serde(default, with = "humantime_serde")]
    pub budget_window: Option<Duration>,
}

/// Per-replica limits (Kubernetes' "limits"). Absent means unlimited.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesFile {
    /// Hard memory limit (`memory.max`); past it the kernel OOM-kills the replica.
    pub memory_max: Option<ByteSize>,
    /// Throttling threshold (`memory.high`), below `memory_max`.
    pub memory_high: Option<ByteSize>,
    /// CPU limit in cores, e.g. 0.5 (`cpu.max`).
    pub cpu_max: Option<f64>,
    /// Most tasks (threads) (`pids.max`).
    pub pids_max: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchdogFile {
    /// Hardware watchdog device, e.g. `/dev/watchdog` (default: none).
    pub device: Option<PathBuf>,
    /// Timeout programmed into the device (default 15s).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resources {
    pub memory_max: Option<u64>,
    pub memory_high: Option<u64>,
    /// (quota, period) in microseconds for `cpu.max`.
    pub cpu_max: Option<(u64, u64)>,
    pub pids_max: Option<u32>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        *self == Resources::default()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub command: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub stop_grace: Duration,
    pub hung_grace: Duration,
    pub log_lines: usize,
    pub user: Option<RunAs>,
}

/// `service.user`, resolved: who the replicas run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// Where `service.user` names are looked up.
const PASSWD: &str = "/etc/passwd";

impl RunAs {
    /// `UID:GID`, or a name looked up in `passwd` (the text of /etc/passwd).
    fn resolve(name: &str, passwd: &Passwd) -> Result<RunAs, String> {
        if let Some((uid, gid)) = name.split_once(':') {
            return match (uid.parse(), gid.parse()) {
                (Ok(uid), Ok(gid)) => Ok(RunAs { uid, gid }),
                _ => Err(format!("{name:?} is neither a user name nor UID:GID")),
            };
        }
        let text = passwd().map_err(|e| format!("cannot read {PASSWD} to find {name:?}: {e}"))?;
        text.lines()
            .filter_map(|line| {
                let mut fields = line.split(':');
                let (user, _, uid, gid) = (
                    fields.next()?,
                    fields.next()?,
                    fields.next()?,
                    fields.next()?,
                );
                (user == name).then(|| Some((uid.parse().ok()?, gid.parse().ok()?)))?
            })
            .next()
            .map(|(uid, gid)| RunAs { uid, gid })
            .ok_or_else(|| format!("names no user of {PASSWD}: {name:?}"))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HardwareWatchdog {
    pub device: PathBuf,
    pub timeout: Duration,
}

/// Everything the supervisor needs, validated: no field can hold a value that cannot work.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub control_socket: PathBuf,
    pub control_gid: Option<u32>,
    pub replicas: u32,
    pub max_replicas: u32,
    pub max_connections_per_peer: usize,
    pub trusted_keys: PathBuf,
    pub service: ServiceSpec,
    pub probes: Probes,
    pub restart: RestartPolicy,
    pub resources: Resources,
    pub watchdog: Option<HardwareWatchdog>,
    pub ota: Ota,
}

/// Command-line values that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub replicas: Option<u32>,
    pub data_dir: Option<PathBuf>,
    pub trusted_keys: Option<PathBuf>,
    /// `ota.depot`.
    pub depot: Option<String>,
}

/// Reads and validates `path`, or the built-in defaults when `path` is `None`.
pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Settings, ConfigError> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            parse(&text, path, overrides)
        }
        None => validate(
            File::default(),
            "(built-in defaults)",
            overrides,
            &system_passwd,
        ),
    }
}

/// Validates configuration text; `path` names it in errors.
pub fn parse(text: &str, path: &Path, overrides: &Overrides) -> Result<Settings, ConfigError> {
    parse_with_users(text, path, overrides, &system_passwd)
}

/// [`parse`], with `service.user` looked up in the text `passwd` returns instead of
/// /etc/passwd (a device image's users, checked on the host that builds it).
pub fn parse_with_users(
    text: &str,
    path: &Path,
    overrides: &Overrides,
    passwd: &Passwd,
) -> Result<Settings, ConfigError> {
    let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    validate(file, &path.display().to_string(), overrides, passwd)
}

/// Reads the text of a passwd(5) file, when a user name must be looked up.
pub type Passwd = dyn Fn() -> std::io::Result<String>;

/// This machine's users.
fn system_passwd() -> std::io::Result<String> {
    std::fs::read_to_string(PASSWD)
}

/// The default environment of a replica: the quote-service's variables.
pub fn default_env() -> BTreeMap<String, String> {
    [
        ("QUOTE_LISTEN", "127.0.0.1:{port}"),
        ("QUOTE_INSTANCE", "{replica}"),
        ("QUOTE_DB", "{data_dir}/quotes.db"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// Edge defaults: probe every 250 ms with a 200 ms timeout and act on the second failure,
/// where Kubernetes uses 10 s, 1 s and 3.
fn default_probe(kind: &str) -> (ProbeAction, Duration, u32) {
    match kind {
        // Startup polls fast (a replica is ready in tens of milliseconds) for up to 20 s.
        "startup" => (
            ProbeAction::Http {
                path: "/healthz".into(),
            },
            Duration::from_millis(20),
            1000,
        ),
        "liveness" => (
            ProbeAction::Http {
                path: "/healthz".into(),
            },
            Duration::from_millis(250),
            2,
        ),
        _ => (
            ProbeAction::Http {
                path: "/readyz".into(),
            },
            Duration::from_millis(250),
            2,
        ),
    }
}

/// A key of the file whose value cannot work, before the file's name is known to it.
struct Invalid {
    key: String,
    reason: String,
}

fn invalid(key: &str, reason: String) -> Invalid {
    Invalid {
        key: key.to_owned(),
        reason,
    }
}

/// The whole file into `Settings`: each table is checked by its own function below, and the
/// first error is named with the file (`origin`), the key and the reason.
fn validate(
    file: File,
    origin: &str,
    overrides: &Overrides,
    passwd: &Passwd,
) -> Result<Settings, ConfigError> {
    let named = |e: Invalid| ConfigError::Invalid {
        origin: origin.to_owned(),
        key: e.key,
        reason: e.reason,
    };
    let listen = overrides
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
    let admin_listen = match file.admin_listen.as_deref() {
        None => Some(SocketAddr::from(([127, 0, 0, 1], 9180))),
        Some("") => None,
        Some(text) => Some(text.parse().map_err(|e| {
            named(invalid(
                "admin_listen",
                format!("is not an address like 127.0.0.1:9180 ({e})"),
            ))
        })?),
    };
    let data_dir = overrides
        .data_dir
        .clone()
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from("./data"));
    let control_socket = file
        .control_socket
        .unwrap_or_else(|| data_dir.join("supervisor.sock"));
    let max_replicas = file.max_replicas.unwrap_or(16);
    if max_replicas == 0 || max_replicas > 256 {
        return Err(named(invalid(
            "max_replicas",
            format!("must be 1 to 256, got {max_replicas}"),
        )));
    }
    let per_peer = file
        .max_connections_per_peer
        .unwrap_or(crate::proxy::MAX_CONNECTIONS_PER_PEER as u32);
    if !(1..=65_536).contains(&per_peer) {
        return Err(named(invalid(
            "max_connections_per_peer",
            format!("must be 1 to 65536, got {per_peer}"),
        )));
    }
    let replicas = overrides.replicas.or(file.replicas).unwrap_or(3);
    if replicas > max_replicas {
        return Err(named(invalid(
            "replicas",
            format!("is {replicas}, above max_replicas ({max_replicas})"),
        )));
    }
    let probes = Probes {
        startup: probe("startup", file.probes.startup, origin)?,
        liveness: probe("liveness", file.probes.liveness, origin)?,
        readiness: probe("readiness", file.probes.readiness, origin)?,
    };
    let mut ota = file.ota;
    if let Some(depot) = &overrides.depot {
        ota.depot = Some(depot.clone());
    }
    let ota = ota
        .validate(&data_dir, own_dir())
        .map_err(|e| named(invalid(&format!("ota.{}", e.key), e.reason)))?;
    Ok(Settings {
        listen,
        admin_listen,
        control_socket,
        control_gid: file.control_gid,
        replicas,
        max_replicas,
        max_connections_per_peer: per_peer as usize,
        trusted_keys: overrides
            .trusted_keys
            .clone()
            .or(file.trusted_keys)
            .unwrap_or_else(|| PathBuf::from("/etc/quote-edge/keys")),
        service: service(file.service, passwd).map_err(named)?,
        probes,
        restart: restart(file.restart).map_err(named)?,
        resources: resources(file.resources).map_err(named)?,
        watchdog: watchdog(file.watchdog).map_err(named)?,
        ota,
        data_dir,
    })
}

/// `[service]`: the replica's command, environment (never the supervisor's systemd protocol)
/// and stop graces.
fn service(s: ServiceFile, passwd: &Passwd) -> Result<ServiceSpec, Invalid> {
    let command = s.command.unwrap_or_else(|| PathBuf::from("quote-service"));
    if command.as_os_str().is_empty() {
        return Err(invalid("service.command", "must not be empty".into()));
    }
    let env = s.env.unwrap_or_else(default_env);
    for key in env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(invalid(
                &format!("service.env.{key}"),
                "is not a valid environment variable name".into(),
            ));
        }
        if key == "NOTIFY_SOCKET" || key.starts_with("WATCHDOG_") {
            return Err(invalid(
                &format!("service.env.{key}"),
                "belongs to the supervisor's systemd protocol and is never passed to replicas"
                    .into(),
            ));
        }
    }
    let log_lines = s.log_lines.unwrap_or(500);
    if !(1..=100_000).contains(&log_lines) {
        return Err(invalid(
            "service.log_lines",
            format!("must be 1 to 100000, got {log_lines}"),
        ));
    }
    let user = match s.user {
        None => None,
        Some(name) => {
            Some(RunAs::resolve(&name, passwd).map_err(|reason| invalid("service.user", reason))?)
        }
    };
    Ok(ServiceSpec {
        user,
        command,
        args: s.args.unwrap_or_default(),
        env,
        stop_grace: s.stop_grace.unwrap_or(Duration::from_secs(5)),
        hung_grace: s.hung_grace.unwrap_or(Duration::from_millis(500)),
        log_lines: log_lines as usize,
    })
}

/// `[restart]`: the backoff and the crash-loop budget.
fn restart(r: RestartFile) -> Result<RestartPolicy, Invalid> {
    let backoff = r.backoff.unwrap_or(Duration::from_millis(250));
    let max_backoff = r.max_backoff.unwrap_or(Duration::from_secs(30));
    if max_backoff < backoff {
        return Err(invalid(
            "restart.max_backoff",
            format!("({max_backoff:?}) is shorter than restart.backoff ({backoff:?})"),
        ));
    }
    let jitter = r.jitter.unwrap_or(0.2);
    if !(0.0..=1.0).contains(&jitter) {
        return Err(invalid(
            "restart.jitter",
            format!("must be between 0 and 1, got {jitter}"),
        ));
    }
    Ok(RestartPolicy {
        backoff,
        max_backoff,
        jitter,
        reset_after: r.reset_after.unwrap_or(Duration::from_secs(60)),
        budget: r.budget.unwrap_or(5),
        budget_window: r.budget_window.unwrap_or(Duration::from_secs(60)),
    })
}

/// `[resources]`: a replica's limits (cgroup v2, or rlimits).
fn resources(r: ResourcesFile) -> Result<Resources, Invalid> {
    let memory_max = r.memory_max.map(|b| b.as_u64());
    let memory_high = r.memory_high.map(|b| b.as_u64());
    for (key, value) in [
        ("resources.memory_max", memory_max),
        ("resources.memory_high", memory_high),
    ] {
        if value.is_some_and(|v| v < 1 << 20) {
            return Err(invalid(key, "must be at least 1 MiB".into()));
        }
    }
    if let (Some(high), Some(max)) = (memory_high, memory_max)
        && high > max
    {
        return Err(invalid(
            "resources.memory_high",
            "is above resources.memory_max; it must be lower to throttle before the OOM kill"
                .into(),
        ));
    }
    let cpu_max = match r.cpu_max {
        None => None,
        Some(cores) if cores > 0.0 && cores <= 1024.0 => {
            let period = 100_000u64;
            Some((((cores * period as f64).round() as u64).max(1000), period))
        }
        Some(cores) => {
            return Err(invalid(
                "resources.cpu_max",
                format!("must be a number of cores above 0, got {cores}"),
            ));
        }
    };
    if r.pids_max == Some(0) {
        return Err(invalid("resources.pids_max", "must be at least 1".into()));
    }
    Ok(Resources {
        memory_max,
        memory_high,
        cpu_max,
        pids_max: r.pids_max,
    })
}

/// `[watchdog]`: the hardware watchdog, when a device is named.
fn watchdog(w: WatchdogFile) -> Result<Option<HardwareWatchdog>, Invalid> {
    let Some(device) = w.device else {
        return Ok(None);
    };
    let timeout = w.timeout.unwrap_or(Duration::from_secs(15));
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&timeout) {
        return Err(invalid(
            "watchdog.timeout",
            format!("must be 1s to 1h, got {timeout:?}"),
        ));
    }
    Ok(Some(HardwareWatchdog { device, timeout }))
}

fn probe(kind: &str, file: Option<ProbeFile>, origin: &str) -> Result<Option<Probe>, ConfigError> {
    let file = file.unwrap_or_default();
    let key = |field: &str| format!("probes.{kind}.{field}");
    let invalid = |field: &str, reason: String| ConfigError::Invalid {
        origin: origin.to_owned(),
        key: key(field),
        reason,
    };
    if file.enabled == Some(false) {
        return Ok(None);
    }
    let (default_action, default_period, default_failures) = default_probe(kind);
    let given = [
        file.http.is_some(),
        file.tcp == Some(true),
        file.exec.is_some(),
    ];
    let action = match given.iter().filter(|g| **g).count() {
        0 => default_action,
        1 => {
            if let Some(path) = file.http {
                if !path.starts_with('/') {
                    return Err(invalid(
                        "http",
                        format!("must be a path starting with '/', got {path:?}"),
                    ));
                }
                ProbeAction::Http { path }
            } else if let Some(command) = file.exec {
                if command.is_empty() {
                    return Err(invalid("exec", "must name a command".into()));
                }
                ProbeAction::Exec { command }
            } else {
                ProbeAction::Tcp
            }
        }
        _ => {
            return Err(invalid(
                "http",
                "only one of `http`, `tcp` and `exec` may be set".into(),
            ));
        }
    };
    let period = file.period.unwrap_or(default_period);
    let timeout = file.timeout.unwrap_or(Duration::from_millis(200));
    if period < Duration::from_millis(10) {
        return Err(invalid(
            "period",
            format!("must be at least 10ms, got {period:?}"),
        ));
    }
    if timeout.is_zero() {
        return Err(invalid("timeout", "must be above zero".into()));
    }
    let threshold = |field: &str, value: Option<u32>, default: u32| {
        NonZeroU32::new(value.unwrap_or(default))
            .ok_or_else(|| invalid(field, "must be at least 1".into()))
    };
    let success_threshold = threshold("success_threshold", file.success_threshold, 1)?;
    if kind != "readiness" && success_threshold.get() != 1 {
        return Err(invalid(
            "success_threshold",
            "must be 1 for startup and liveness probes (as in Kubernetes)".into(),
        ));
    }
    Ok(Some(Probe {
        action,
        initial_delay: file.initial_delay.unwrap_or_default(),
        period,
        timeout,
        success_threshold,
        failure_threshold: threshold(
            "failure_threshold",
            file.failure_threshold,
            default_failures,
        )?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Settings, ConfigError> {
        parse(
            text,
            Path::new("/etc/quote-edge/supervisor.toml"),
            &Overrides::default(),
        )
    }

    #[test]
    fn the_shipped_example_is_exactly_the_defaults() {
        let example = include_str!("../../../image/overlay/etc/quote-edge/supervisor.toml");
        let from_file = parse_str(example).expect("the example parses");
        let defaults = load(None, &Overrides::default()).unwrap();
        assert_eq!(from_file, defaults);
    }

    #[test]
    fn the_device_images_configurations_are_valid() {
        for (name, text) in [
            (
                "image/recipe/supervisor.toml",
                include_str!("../../../image/recipe/supervisor.toml"),
            ),
            (
                "image/recipe/qemu/supervisor.toml",
                include_str!("../../../image/recipe/qemu/supervisor.toml"),
            ),
        ] {
            let settings = parse_with_users(text, Path::new(name), &Overrides::default(), &|| {
                Ok(::tests::image_passwd())
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                settings.ota.remount_sticks,
                "{name}: receipts go back to the stick"
            );
            assert_eq!(settings.replicas, 3, "{name}");
            // The replicas are not the supervisor, and their tool writes where they may.
            let user = settings
                .service
                .user
                .expect("the replicas run as their own user");
            assert_eq!((user.uid, user.gid), (951, 951), "quote-replica");
            assert_eq!(
                settings.ota.database_dir,
                Some(settings.data_dir.join("db")),
                "{name}"
            );
            assert!(settings.service.env["QUOTE_DB"].starts_with("{data_dir}/db/"));
        }
    }

    #[test]
    fn the_replicas_user_is_a_passwd_name_or_uid_gid_and_a_typo_names_the_key() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\n\
                      quote-replica:x:951:952::/:/usr/sbin/nologin\n";
        let with = |user: &str| {
            parse_with_users(
                &format!("[service]\nuser = {user:?}\n"),
                Path::new("s.toml"),
                &Overrides::default(),
                &|| Ok(passwd.to_owned()),
            )
        };
        let user = with("quote-replica").unwrap().service.user.unwrap();
        assert_eq!((user.uid, user.gid), (951, 952), "its primary group");
        let user = with("65534:65534").unwrap().service.user.unwrap();
        assert_eq!((user.uid, user.gid), (65534, 65534));
        for (bad, reason) in [
            (
                "quote-replcia",
                "names no user of /etc/passwd: \"quote-replcia\"",
            ),
            ("1:x", "\"1:x\" is neither a user name nor UID:GID"),
        ] {
            assert_eq!(
                with(bad).unwrap_err().to_string(),
                format!("config s.toml: `service.user` {reason}")
            );
        }
        // No user: the file is not even read.
        let none = parse_with_users("", Path::new("s.toml"), &Overrides::default(), &|| {
            panic!("read without a user")
        });
        assert_eq!(none.unwrap().service.user, None);
    }

    #[test]
    fn flags_override_the_file() {
        let overrides = Overrides {
            listen: Some("0.0.0.0:9000".parse().unwrap()),
            replicas: Some(5),
            data_dir: Some(PathBuf::from("/var/lib/q")),
            trusted_keys: None,
            depot: Some("http://depot:8088".into()),
        };
        let s = parse(
            "replicas = 2\nlisten = \"127.0.0.1:1\"\n",
            Path::new("f.toml"),
            &overrides,
        )
        .unwrap();
        assert_eq!((s.replicas, s.listen.port()), (5, 9000));
        assert_eq!(
            s.control_socket,
            PathBuf::from("/var/lib/q/supervisor.sock")
        );
        assert_eq!(s.ota.depot.as_deref(), Some("http://depot:8088"));
    }

    #[test]
    fn errors_name_the_file_the_key_and_the_reason() {
        let cases = [
            ("replicass = 3", "replicass"),
            ("replicas = 40", "`replicas` is 40, above max_replicas (16)"),
            (
                "max_connections_per_peer = 0",
                "`max_connections_per_peer` must be 1 to 65536, got 0",
            ),
            (
                "[probes.liveness]\nperiod = \"2ms\"",
                "`probes.liveness.period` must be at least 10ms",
            ),
            (
                "[ota]\ndepot = \"https://depot:8088\"",
                "`ota.depot` must be http://HOST[:PORT]",
            ),
            (
                "[ota]\npoll_interval = \"10ms\"",
                "`ota.poll_interval` (10ms) must be at least 1s",
            ),
            (
                "[probes.readiness]\nhttp = \"readyz\"",
                "`probes.readiness.http` must be a path",
            ),
            ("[probes.startup]\nhttp = \"/a\"\ntcp = true", "only one of"),
            (
                "[probes.liveness]\nsuccess_threshold = 2",
                "must be 1 for startup and liveness",
            ),
            (
                "[probes.readiness]\nfailure_threshold = 0",
                "`probes.readiness.failure_threshold` must be at least 1",
            ),
            ("[probes.liveness]\ntimeout = \"soon\"", "timeout"),
            (
                "[restart]\nbackoff = \"10s\"\nmax_backoff = \"1s\"",
                "`restart.max_backoff`",
            ),
            (
                "[restart]\njitter = 2.0",
                "`restart.jitter` must be between 0 and 1",
            ),
            (
                "[resources]\nmemory_max = \"64MiB\"\nmemory_high = \"1GiB\"",
                "`resources.memory_high` is above",
            ),
            ("[resources]\nmemory_max = \"12 parsecs\"", "memory_max"),
            ("[resources]\ncpu_max = -1", "`resources.cpu_max`"),
            (
                "[service]\nenv = { NOTIFY_SOCKET = \"x\" }",
                "`service.env.NOTIFY_SOCKET`",
            ),
            (
                "[watchdog]\ndevice = \"/dev/watchdog\"\ntimeout = \"0s\"",
                "`watchdog.timeout`",
            ),
            (
                "admin_listen = \"localhost\"",
                "`admin_listen` is not an address",
            ),
            ("listen = [1, 2]", "listen"),
        ];
        for (text, needle) in cases {
            let err = parse_str(text).expect_err(text).to_string();
            assert!(
                err.contains("/etc/quote-edge/supervisor.toml"),
                "{text}: {err}"
            );
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = load(
            Some(Path::new("/nonexistent/sup.toml")),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/sup.toml"));
    }

    #[test]
    fn sizes_and_cores_become_kernel_units() {
        let s =
            parse_str("[resources]\nmemory_max = \"64MiB\"\ncpu_max = 0.5\npids_max = 32").unwrap();
        assert_eq!(s.resources.memory_max, Some(64 << 20));
        assert_eq!(s.resources.cpu_max, Some((50_000, 100_000)));
    }
}
