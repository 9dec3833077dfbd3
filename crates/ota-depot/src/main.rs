//! `ota-depot`: parse the command line, run, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ota_depot::cli::Cli::parse();
    let code = ota_depot::cli::main(cli);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
