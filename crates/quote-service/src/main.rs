//! `quote-service`: parse the command line, set up logging, run.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use quote_service::{Cli, Command, exit, run};
use quote_store::Target;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    if let Some(command) = &cli.command {
        return maintenance(command, &cli.db, cli.db_password_file.as_deref());
    }
    let settings = match cli.into_settings() {
        Ok(settings) => settings,
        Err(error) => {
            tracing::error!(%error, "bad configuration");
            return code(exit::CONFIG);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.worker_threads.get())
        .max_blocking_threads(settings.db_connections.get() + 2)
        .thread_name("quote-service")
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return code(exit::FAILURE);
        }
    };
    let result = runtime.block_on(run(settings));
    // A query still waiting on a lock after the grace period must not hold the exit:
    // dropping the runtime would wait for blocking tasks without bound.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => code(exit::OK),
        Err(error) => {
            tracing::error!(%error, "quote-service stopped");
            code(error.exit_code())
        }
    }
}

/// `snapshot` and `restore`: one line of outcome in the log, exit 0 or [`exit::IO`]; both
/// work on a SQLite file only ([`exit::CONFIG`] for a PostgreSQL URL, saying so).
fn maintenance(command: &Command, db: &str, password_file: Option<&Path>) -> ExitCode {
    let name = match command {
        Command::Snapshot { .. } => "snapshot",
        Command::Restore { .. } => "restore",
    };
    let file = Target::parse(db, password_file)
        .and_then(|target| target.sqlite_file(name).map(Path::to_path_buf));
    let db = match &file {
        Ok(path) => path.as_path(),
        Err(error) => {
            tracing::error!(%error, "database maintenance refused; nothing was changed");
            return code(exit::CONFIG);
        }
    };
    let busy = Duration::from_secs(10);
    let result = match command {
        Command::Snapshot { to } => quote_store::snapshot(db, to, busy).map(|quotes| {
            tracing::info!(db = %db.display(), to = %to.display(), quotes, "snapshot taken");
        }),
        Command::Restore { from, export } => {
            quote_store::restore(db, from, export, busy).map(|report| {
                tracing::info!(db = %db.display(), from = %from.display(), export = %export.display(),
                    exported = report.exported, "snapshot restored");
            })
        }
    };
    match result {
        Ok(()) => code(exit::OK),
        Err(error) => {
            tracing::error!(%error, "database maintenance failed; the database is unchanged");
            code(exit::IO)
        }
    }
}

/// Logs go to stderr (the supervisor or journald captures them); `QUOTE_LOG` sets the
/// filter, e.g. `info` or `quote_service=debug` (default `info`).
fn init_logging() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter: Targets = std::env::var("QUOTE_LOG")
        .ok()
        .and_then(|spec| spec.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .with_filter(filter),
        )
        .init();
}

fn code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
