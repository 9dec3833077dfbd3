//! `ota`: parse the command line, run, map the outcome to an exit code.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ota::Cli::parse();
    let code = match ota::run(cli.command, &mut std::io::stdout().lock()) {
        Ok(()) => ota::exit::OK,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "ota: {error}");
            error.exit_code()
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
