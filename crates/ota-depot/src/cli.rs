//! The command line: `serve`, and the operator's commands, which talk to a depot over HTTP.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use depot_proto::client::{Client, ClientError};
use depot_proto::exit;
use ota_bundle::{PublicKey, TrustedKeys};

use crate::depot::{Depot, DepotError};
use crate::server::{self, AppState};
use crate::store::{SqliteStore, StoreError};

#[derive(Debug, Parser)]
#[command(
    name = "ota-depot",
    version,
    about = "The fleet's update depot: signed rollouts in waves, on an air-gapped network"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve bundles, rollouts and the status page.
    Serve(ServeArgs),
    /// Upload a bundle and publish its signed rollout plan; prints the rollout id.
    Publish {
        #[command(flatten)]
        depot: AdminArgs,
        bundle: PathBuf,
        plan: PathBuf,
    },
    /// Show every rollout, its waves and the fleet.
    Status {
        #[arg(long, env = "OTA_DEPOT_URL")]
        depot: String,
        /// The status document as JSON (depot-proto's `Status`).
        #[arg(long)]
        json: bool,
    },
    /// Stop offering a rollout (devices already installing finish).
    Halt(ControlArgs),
    /// Run a halted rollout again: only reports from now on count against its error gate.
    Resume(ControlArgs),
    /// Stop a rollout for good.
    Abort(ControlArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where devices and operators reach the depot (`0.0.0.0:8088`; port 0 picks one, logged).
    #[arg(long)]
    pub listen: SocketAddr,
    /// The depot's database, bundles and admin token.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The release keys (`*.pub` and an optional `threshold`), as on the devices.
    #[arg(long)]
    pub trusted_keys: PathBuf,
    /// Only these devices may enroll: device public key lines (`edge-supervisor device-key`).
    /// Without it, a device enrolls on its first signed request.
    #[arg(long)]
    pub devices: Option<PathBuf>,
    /// The operator's token file [default: DATA_DIR/admin.token, made on first start, 0600].
    #[arg(long)]
    pub admin_token: Option<PathBuf>,
    /// Largest bundle accepted.
    #[arg(long, default_value = "2GiB")]
    pub max_bundle_size: bytesize::ByteSize,
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    #[arg(long, env = "OTA_DEPOT_URL")]
    pub depot: String,
    /// The depot's admin token file (`serve`'s `--admin-token`).
    #[arg(long, env = "OTA_DEPOT_TOKEN_FILE")]
    pub token_file: PathBuf,
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    #[command(flatten)]
    pub depot: AdminArgs,
    /// The rollout id (`publish` printed it; `status` lists them).
    pub id: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Depot(#[from] DepotError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Client(e) => e.exit_code(),
            CliError::Config { .. } | CliError::Depot(_) => exit::CONFIG,
            CliError::Store(_) | CliError::Io { .. } => exit::IO,
        }
    }
}

/// Runs a command; returns the exit code (errors are written to stderr).
pub fn main(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        other => operator(other, &mut std::io::stdout().lock()),
    };
    match result {
        Ok(()) => exit::OK,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "ota-depot: {error}");
            error.exit_code()
        }
    }
}

const TIMEOUT: Duration = Duration::from_secs(60);

fn admin_client(args: &AdminArgs) -> Result<Client, CliError> {
    let token = std::fs::read_to_string(&args.token_file).map_err(|e| CliError::Config {
        path: args.token_file.clone(),
        reason: format!("cannot read the admin token: {e}"),
    })?;
    Ok(Client::new(&args.depot, TIMEOUT).with_token(token.trim().to_owned()))
}

/// The operator's commands (everything but `serve`), writing what they print to `out`.
pub fn operator(command: Command, out: &mut dyn Write) -> Result<(), CliError> {
    let io = |e| CliError::Io {
        what: "standard output".into(),
        source: e,
    };
    match command {
        Command::Serve(_) => unreachable!("serve is not an operator command"),
        Command::Publish {
            depot,
            bundle,
            plan,
        } => {
            let client = admin_client(&depot)?;
            let plan_bytes = std::fs::read(&plan).map_err(|e| CliError::Config {
                path: plan.clone(),
                reason: format!("cannot read the plan: {e}"),
            })?;
            let accepted = client.upload_bundle(&bundle)?;
            let published = client.publish_plan(&plan_bytes)?;
            writeln!(out, "{}", published.id).map_err(io)?;
            let _ = writeln!(
                std::io::stderr(),
                "rollout {} of {} {} (bundle {}), waves of {:?} devices",
                published.id,
                accepted.product,
                published.version,
                accepted.digest,
                published.waves
            );
        }
        Command::Status { depot, json } => {
            let status = Client::new(&depot, TIMEOUT).status()?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&status).expect("status serialises")
                )
                .map_err(io)?;
            } else {
                print_status(&status, out).map_err(io)?;
            }
        }
        Command::Halt(args) => control(&args, "halt", out)?,
        Command::Resume(args) => control(&args, "resume", out)?,
        Command::Abort(args) => control(&args, "abort", out)?,
    }
    Ok(())
}

fn control(args: &ControlArgs, verb: &str, out: &mut dyn Write) -> Result<(), CliError> {
    let status = admin_client(&args.depot)?.control(args.id, verb)?;
    writeln!(out, "rollout {}: {}", status.id, status.state.as_str()).map_err(|e| CliError::Io {
        what: "standard output".into(),
        source: e,
    })
}

fn print_status(status: &depot_proto::wire::Status, out: &mut dyn Write) -> std::io::Result<()> {
    for r in &status.rollouts {
        writeln!(
            out,
            "rollout {}  {} {}  {}{}",
            r.id,
            r.product,
            r.version,
            r.state.as_str(),
            r.reason
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default()
        )?;
        for (i, w) in r.waves.iter().enumerate() {
            writeln!(
                out,
                "  wave {i}: {:?}, {} devices: {} committed, {} failed, {} pending",
                w.state, w.size, w.committed, w.failed, w.pending
            )?;
        }
        writeln!(
            out,
            "  {} bundle bytes served in {} responses",
            r.bytes_served, r.downloads
        )?;
    }
    writeln!(out, "devices: {}", status.devices)
}

/// Reads `--devices`: one device public key line per device (`edge-supervisor device-key`),
/// blank lines and `#` comments allowed; a bad line is named by its number.
pub fn read_allow_list(path: &Path) -> Result<Vec<PublicKey>, CliError> {
    let config = |reason: String| CliError::Config {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| config(e.to_string()))?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = PublicKey::from_line(path, line)
            .map_err(|e| config(format!("line {}: not a device key line ({e})", n + 1)))?;
        keys.push(key);
    }
    Ok(keys)
}

/// The admin token: read, or made (32 random bytes in hex, mode 0600) on first start.
fn admin_token(path: &Path) -> Result<String, CliError> {
    let config = |reason: String| CliError::Config {
        path: path.to_owned(),
        reason,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim().to_owned();
            if token.len() < 32 {
                return Err(config(
                    "the admin token must be at least 32 characters".into(),
                ));
            }
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes).map_err(|e| config(e.to_string()))?;
            let token = hex::encode(bytes);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| config(e.to_string()))?;
            file.write_all(format!("{token}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| config(e.to_string()))?;
            tracing::info!(path = %path.display(), "admin token made");
            Ok(token)
        }
        Err(e) => Err(config(e.to_string())),
    }
}

fn serve(args: ServeArgs) -> Result<(), CliError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let dir_error = |path: &Path, e: std::io::Error| CliError::Config {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let bundles = args.data_dir.join("bundles");
    let incoming = args.data_dir.join("incoming");
    for dir in [&bundles, &incoming] {
        durable::create_dir_all(dir).map_err(|e| dir_error(dir, e))?;
    }
    // Uploads cut off by a crash are never resumed: remove them.
    for entry in std::fs::read_dir(&incoming).map_err(|e| dir_error(&incoming, e))? {
        let path = entry.map_err(|e| dir_error(&incoming, e))?.path();
        let _ = std::fs::remove_file(path);
    }
    let trusted = TrustedKeys::load_dir(&args.trusted_keys).map_err(|e| CliError::Config {
        path: args.trusted_keys.clone(),
        reason: e.to_string(),
    })?;
    let allow = args.devices.as_deref().map(read_allow_list).transpose()?;
    let token_path = args
        .admin_token
        .clone()
        .unwrap_or_else(|| args.data_dir.join("admin.token"));
    let token = admin_token(&token_path)?;
    let store = SqliteStore::open(&args.data_dir.join("depot.db"))?;
    let depot = Depot::open(Box::new(store), trusted, allow, &bundles)?;
    let state = AppState::new(depot, token, &incoming, args.max_bundle_size.as_u64());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .map_err(|e| CliError::Io {
            what: "the async runtime".into(),
            source: e,
        })?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| CliError::Io {
                what: format!("cannot listen on {}", args.listen),
                source: e,
            })?;
        let local = listener.local_addr().map_err(|e| CliError::Io {
            what: "the listener".into(),
            source: e,
        })?;
        tracing::info!(address = %local, "listening");
        server::serve(listener, server::app(state, &bundles), shutdown())
            .await
            .map_err(|e| CliError::Io {
                what: "the server".into(),
                source: e,
            })
    })
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping");
}
