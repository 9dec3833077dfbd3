//! Running the service: bind, open the database beside serving, drain on SIGTERM.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quote_store::{Database, Options};
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
    if let Some(dir) = settings.db.parent().filter(|d| !d.as_os_str().is_empty()) {
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
    path: PathBuf,
    max_size: Option<u64>,
    connections: usize,
    failed: oneshot::Sender<RunError>,
) {
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
            state.attach_database(database, connections);
            tracing::info!(
                path = %path.display(),
                schema_version = report.schema_version,
                applied = ?report.applied,
                "database open; ready"
            );
        }
        Ok(Err(error)) => {
            let _ = failed.send(RunError::Database(error));
        }
        Err(_) => {
            let _ = failed.send(RunError::DatabaseTask);
        }
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
