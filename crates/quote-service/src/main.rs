//! `quote-service`: parse the command line, set up logging, run.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use quote_service::{Cli, exit, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
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
