//! Bench and test program: the install data path the OTA agent will run, end to end.
//! Verifies a bundle against one trusted key and writes its verified chunks into a slot
//! directory, syncing files and directories.
//!
//! Usage: `ota-install PUBKEY BUNDLE SLOT_DIR`. Prints the bytes written; exit 1 on refusal.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use ota_bundle::{Bundle, Chunked, PublicKey, TrustedKeys};
use ota_slots::SlotWriter;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [key, bundle, slot] = args.as_slice() else {
        let _ = writeln!(
            std::io::stderr(),
            "usage: ota-install PUBKEY BUNDLE SLOT_DIR"
        );
        return ExitCode::from(2);
    };
    match install(Path::new(key), Path::new(bundle), Path::new(slot)) {
        Ok(bytes) => {
            let _ = writeln!(std::io::stdout(), "{bytes}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "ota-install: {error}");
            ExitCode::FAILURE
        }
    }
}

fn install(key: &Path, bundle: &Path, slot: &Path) -> Result<u64, Box<dyn std::error::Error>> {
    let trusted = TrustedKeys::new([PublicKey::load(key)?], 1);
    let file = std::fs::File::open(bundle)?;
    let bundle = Bundle::open(std::io::BufReader::with_capacity(1 << 20, file), &trusted)?;
    let empty: Vec<(String, u32)> = bundle
        .manifest
        .files
        .iter()
        .filter(|f| f.chunks.is_empty())
        .map(|f| (f.path.clone(), f.mode))
        .collect();
    let mut writer = SlotWriter::create(slot)?;
    bundle
        .chunks(|file, index, chunk| match chunk {
            Chunked::Data(bytes) => writer.chunk(&file.path, file.mode, index, bytes),
            Chunked::Copy { .. } => Err(ota_slots::WriteError::BadPath {
                path: "delta bundles are not supported yet".into(),
            }),
        })
        .map_err(|e| e.to_string())?;
    for (path, mode) in empty {
        writer.empty_file(&path, mode)?;
    }
    Ok(writer.finish()?)
}
