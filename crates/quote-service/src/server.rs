//! Running the service: bind, open the database beside serving, drain on SIGTERM.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quote_store::{Database, Options, Storage, Target};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};

use crate::config::Settings;
use crate::state::AppState;
use crate::{app, exit};

/// Why the service stopped other than by a clean shutdown.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create the database directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Database(#[from] quote_store::Error),
    #[error("the database could not be opened: its task ended abnormally")]
    DatabaseTask,
    #[error("the server failed: {0}")]
    Serve(#[source] io::Error),
}

impl RunError {
    /// The process exit code for this failure (see [`crate::exit`]).
    pub fn exit_code(&self) -> i32 {
        use quote_store::Error as StoreError;
        match self {
            RunError::Database(StoreError::Corrupt { .. } | StoreError::SchemaTooNew { .. }) => {
                exit::DATA
            }
            RunError::DataDir { .. } | RunError::Bind { .. } | RunError::Database(_) => exit::IO,
            RunError::DatabaseTask | RunError::Serve(_) => exit::FAILURE,
        }
    }
}

/// Runs the service until SIGTERM or SIGINT. The listener is bound first, so a supervisor's
/// probes get answers (liveness yes, readiness not yet) while the database is checked and
/// migrated; a database that fails to open stops the service with its error.
pub async fn run(settings: Settings) -> Result<(), RunError> {
    if let Target::Sqlite(path) = &settings.db
        && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).map_err(|source| RunError::DataDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: settings.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(RunError::Serve)?;
    tracing::info!(%addr, instance = %settings.instance, version = crate::VERSION, "listening");

    let state = AppState::new(settings.instance, settings.admin_token);
    let (failed_tx, failed_rx) = oneshot::channel();
    tokio::spawn(open_database(
        state.clone(),
        settings.db,
        settings.db_max_size,
        settings.db_connections.get(),
        failed_tx,
    ));
    let failure = Arc::new(std::sync::Mutex::new(None));
    let stop = {
        let failure = Arc::clone(&failure);
        async move {
            tokio::select! {
                () = shutdown_signal() => {}
                Ok(error) = failed_rx => {
                    *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
                }
            }
        }
    };
    serve(listener, state, stop, settings.shutdown_grace)
        .await
        .map_err(RunError::Serve)?;
    let failure = failure.lock().unwrap_or_else(|e| e.into_inner()).take();
    match failure {
        Some(error) => Err(error),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

async fn open_database(
    state: AppState,
    target: Target,
    max_size: Option<u64>,
    connections: usize,
    failed: oneshot::Sender<RunError>,
) {
    // Without the `postgres` feature the match has one arm; it stays a match so that both
    // builds read the same.
    #[cfg_attr(
        not(feature = "postgres"),
        allow(clippy::infallible_destructuring_match)
    )]
    let path = match target {
        Target::Sqlite(path) => path,
        #[cfg(feature = "postgres")]
        Target::Postgres(pg) => return open_postgres(state, *pg, connections, failed).await,
    };
    let options = Options {
        max_size,
        ..Options::default()
    };
    let opened = tokio::task::spawn_blocking({
        let path = path.clone();
        move || Database::open(&path, options)
    })
    .await;
    match opened {
        Ok(Ok((database, report))) => {
            // Attach before saying so: whoever reads "ready" may send a request at once.
            state.attach_storage(Storage::sqlite(database, connections));
            tracing::info!(
                path = %path.display(),
                schema_version = report.schema_version,
                applied = ?report.applied,
                "database open; ready"
            );
            tell_ready();
        }
        Ok(Err(error)) => {
            let _ = failed.send(RunError::Database(error));
        }
        Err(_) => {
            let _ = failed.send(RunError::DatabaseTask);
        }
    }
}

/// Says `READY=1` on `NOTIFY_SOCKET` (sd_notify's protocol), with this process's pid, which
/// is how edge-supervisor tells replicas apart; without the variable nothing is sent. A hint
/// only: the supervisor still probes, and keeps polling a replica whose word is lost.
fn tell_ready() {
    use sd_notify::NotifyState;
    if let Err(error) =
        sd_notify::notify(&[NotifyState::Ready, NotifyState::MainPid(std::process::id())])
    {
        tracing::debug!(%error, "cannot say ready on NOTIFY_SOCKET");
    }
}

/// PostgreSQL: connects and migrates, retrying with backoff while the server does not answer
/// (readiness says "database not open" meanwhile, liveness stays 200), then watches it.
/// Any other failure (a refused password, a schema newer than this build) stops the service.
#[cfg(feature = "postgres")]
async fn open_postgres(
    state: AppState,
    target: quote_store::PgTarget,
    connections: usize,
    failed: oneshot::Sender<RunError>,
) {
    let mut backoff = Backoff::default();
    loop {
        match quote_store::PgStorage::open(&target, connections).await {
            Ok((storage, report)) => {
                let storage = Storage::Postgres(storage);
                state.attach_storage(storage.clone());
                tracing::info!(
                    db = %target,
                    schema_version = report.schema_version,
                    applied = ?report.applied,
                    "database open; ready"
                );
                tell_ready();
                tokio::spawn(watch_database(state, storage));
                return;
            }
            Err(error) if error.is_unreachable() => {
                state.metrics().db_unreachable();
                let wait = backoff.next_wait();
                tracing::warn!(db = %target, %error, retry_in = ?wait, "database unreachable; readiness 503");
                tokio::time::sleep(wait).await;
            }
            Err(error) => {
                let _ = failed.send(RunError::Database(error));
                return;
            }
        }
    }
}

/// How often a reachable remote database is checked.
#[cfg(feature = "postgres")]
const PROBE_PERIOD: Duration = Duration::from_secs(1);
/// How long a check may take before the database counts as unreachable.
#[cfg(feature = "postgres")]
const PROBE_DEADLINE: Duration = Duration::from_secs(2);

/// Checks a remote database for as long as the process runs: readiness follows its answers,
/// and while it does not answer, checks back off (each one may open a new connection).
#[cfg(feature = "postgres")]
async fn watch_database(state: AppState, storage: Storage) {
    let mut backoff = Backoff::default();
    let mut reachable = true;
    loop {
        let error = match tokio::time::timeout(PROBE_DEADLINE, storage.ping()).await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some(format!("no answer within {PROBE_DEADLINE:?}")),
        };
        let wait = match error {
            None => {
                backoff = Backoff::default();
                state.metrics().db_reachable();
                state.set_reachable(true);
                if !reachable {
                    tracing::info!("database answers again; readiness 200");
                }
                reachable = true;
                PROBE_PERIOD
            }
            Some(error) => {
                state.metrics().db_unreachable();
                state.set_reachable(false);
                let wait = backoff.next_wait();
                if reachable {
                    tracing::warn!(%error, retry_in = ?wait, "database unreachable; readiness 503");
                }
                reachable = false;
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Exponential backoff with jitter, from 100 ms to 5 s: replicas that lost the database
/// together do not all reconnect in the same instant.
#[cfg(feature = "postgres")]
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

#[cfg(feature = "postgres")]
impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn next_wait(&mut self) -> Duration {
        let base = Self::FIRST
            .saturating_mul(1 << self.failures.min(16))
            .min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        // 75 % to 100 % of the base.
        base.mul_f64(0.75 + fastrand::f64() / 4.0)
    }
}

/// Serves `state` on `listener` until `shutdown` completes; then readiness turns 503 at once,
/// new connections are refused, and in-flight requests get up to `grace` to finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> io::Result<()> {
    let draining = Arc::new(Notify::new());
    let server = axum::serve(listener, app(state.clone())).with_graceful_shutdown({
        let draining = Arc::clone(&draining);
        async move {
            shutdown.await;
            state.start_draining();
            tracing::info!(grace = ?grace, "draining");
            draining.notify_one();
        }
    });
    tokio::select! {
        result = server => result,
        () = async { draining.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace = ?grace, "requests still in flight after the grace period; exiting anyway");
            Ok(())
        }
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    tokio::select! {
        _ = async { match term.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {}
        _ = async { match int.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {}
    }
}
