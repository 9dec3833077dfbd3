//! Shared helpers for the workspace integration tests and their fake programs.

pub mod crashfs;
pub mod depot;
pub mod postgres;

use std::path::Path;
use std::process::Command;

/// Whether the tests run in CI (`CI=true`), where every test must run: a skip is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether the tests run under an emulator (`QUOTE_EDGE_TEST_RUNNER`, the aarch64 pass).
pub fn emulated() -> bool {
    std::env::var("QUOTE_EDGE_TEST_RUNNER").is_ok_and(|r| !r.is_empty())
}

/// For a test that cannot run here: says so loudly, and the caller returns. Under `CI=true`
/// it fails instead, naming why: CI runs as root on a machine that has what every test needs,
/// so a skip there hides a broken setup (a test CI must not run is skipped by name in
/// `.ci/run`, where the list can be read).
pub fn skip(why: &str) {
    assert!(!in_ci(), "CI=true and this test would be skipped: {why}");
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {why} ***\n");
}

/// A command that runs one of our binaries. When the tests themselves run under an emulator
/// (aarch64 under qemu-user), `QUOTE_EDGE_TEST_RUNNER` names it (for example
/// `qemu-aarch64-static`), and the child runs through it too: without binfmt_misc the kernel
/// cannot exec a foreign binary directly.
pub fn command(program: &Path) -> Command {
    let (program, args) = service_command(program);
    let mut command = Command::new(program);
    command.args(args);
    command
}

/// A binary of another workspace package, next to the test executable
/// (`target/<triple>/<profile>/`). `cargo test --workspace` builds it because its package has
/// integration tests; `cargo test -p tests` alone may not.
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built; run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

/// The program and leading arguments that start `program`: itself, or the emulator named by
/// `QUOTE_EDGE_TEST_RUNNER` followed by the program (what a supervisor config needs).
pub fn service_command(program: &Path) -> (String, Vec<String>) {
    let runner = std::env::var("QUOTE_EDGE_TEST_RUNNER").unwrap_or_default();
    let mut words: Vec<String> = runner.split_whitespace().map(str::to_owned).collect();
    if words.is_empty() {
        return (program.display().to_string(), Vec::new());
    }
    let first = words.remove(0);
    words.push(program.display().to_string());
    (first, words)
}

/// The device image's users as passwd(5) lines: what systemd-sysusers makes at image build from
/// `image/overlay/usr/lib/sysusers.d/quote-edge.conf` (`u NAME ID`: a user and a group of that id).
pub fn image_passwd() -> String {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../image/overlay/usr/lib/sysusers.d/quote-edge.conf");
    std::fs::read_to_string(&conf)
        .unwrap_or_else(|e| panic!("{}: {e}", conf.display()))
        .lines()
        .filter_map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["u", name, id, ..] => Some(format!("{name}:x:{id}:{id}::/:/usr/sbin/nologin\n")),
                _ => None,
            },
        )
        .collect()
}
