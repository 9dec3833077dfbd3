//! Bench and test program: the OTA agent's install data path alone
//! (`ota_agent::install_once`): admission checks, verification, the slot writer, the journal,
//! the slot marked ready, the state saved; no snapshot, no switch.
//!
//! Usage: `ota-install KEYS_DIR BUNDLE DATA_DIR`. Prints the slot's directory and the bytes
//! written; exit 1 on refusal, with the reason.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [keys, bundle, data_dir] = args.as_slice() else {
        let _ = writeln!(
            std::io::stderr(),
            "usage: ota-install KEYS_DIR BUNDLE DATA_DIR"
        );
        return ExitCode::from(2);
    };
    let data_dir = Path::new(data_dir);
    match ota_agent::install_once(data_dir, Path::new(keys), "quote-edge", Path::new(bundle)) {
        Ok(installed) => {
            let slot = ota_agent::Layout::new(data_dir).slot(installed.slot);
            let _ = writeln!(std::io::stdout(), "{} {}", slot.display(), installed.bytes);
            ExitCode::SUCCESS
        }
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "ota-install: {error}");
            ExitCode::FAILURE
        }
    }
}
