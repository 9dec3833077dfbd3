//! Shared helpers for the workspace integration tests and their fake programs.

use std::path::Path;
use std::process::Command;

/// A command that runs one of our binaries. When the tests themselves run under an emulator
/// (aarch64 under qemu-user), `QUOTE_EDGE_TEST_RUNNER` names it (for example
/// `qemu-aarch64-static`), and the child runs through it too: without binfmt_misc the kernel
/// cannot exec a foreign binary directly.
pub fn command(program: &Path) -> Command {
    let runner = std::env::var("QUOTE_EDGE_TEST_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(emulator) => {
            let mut command = Command::new(emulator);
            command.args(words).arg(program);
            command
        }
        None => Command::new(program),
    }
}
