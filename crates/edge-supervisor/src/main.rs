//! `edge-supervisor`: parse the command line, then run the supervisor or a control command.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use edge_proto::exit;
use edge_supervisor::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => run(&args),
        other => edge_supervisor::cli::client(other),
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn run(args: &edge_supervisor::cli::RunArgs) -> i32 {
    init_logging();
    let settings = match args.settings() {
        Ok(settings) => settings,
        Err(error) => {
            tracing::error!("{error}");
            return exit::CONFIG;
        }
    };
    if args.check {
        let _ = writeln!(std::io::stdout(), "configuration is valid:\n{settings:#?}");
        return exit::OK;
    }
    // Two workers for the dispatcher, probes, control socket and admin endpoint; the router
    // runs its own accept loops, one per core on threads of their own (supervisor.rs).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("edge-supervisor")
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return exit::FAILURE;
        }
    };
    let result = runtime.block_on(edge_supervisor::supervisor::run(settings));
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => exit::OK,
        Err(error) => {
            tracing::error!("{error}");
            error.exit_code()
        }
    }
}

/// Logs go to stderr (journald on the device); `EDGE_LOG` sets the filter (default `info`).
fn init_logging() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter: Targets = std::env::var("EDGE_LOG")
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
