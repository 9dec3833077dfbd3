//! Install receipts: a small signed JSON document per finished update (committed, rolled back
//! or refused), kept on the device and written back next to the bundle when that directory is
//! writable, so that an offline fleet carries its audit trail home on the USB stick.
//!
//! The device signs with its own Ed25519 key (`<data_dir>/ota/device.key`, made on first use,
//! mode 0600); the device id is that key's id, so a receipt names and authenticates its device.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ota_bundle::SecretKey;
use serde::Serialize;

/// What one receipt says.
#[derive(Debug, Clone, Serialize)]
pub struct Receipt {
    /// Filled in by [`write`]: the device key's id.
    pub device: String,
    pub from: String,
    pub to: String,
    /// `committed`, `rolled_back` or `refused`.
    pub result: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub bundle: Option<String>,
    /// Unix seconds (the device clock, for reading, not for trust).
    pub started_at: u64,
    pub finished_at: u64,
    /// Bytes of an interrupted install found intact and kept (it resumed, not restarted).
    pub resumed_bytes: u64,
}

#[derive(Debug, Serialize)]
struct Signed<'a> {
    receipt: &'a Receipt,
    /// Hex Ed25519 public key of the device.
    key: String,
    /// Hex signature over "quote-edge receipt v1\n" followed by the `receipt` JSON.
    signature: String,
}

/// Domain-separates receipt signatures from bundle signatures.
pub const RECEIPT_DOMAIN: &[u8] = b"quote-edge receipt v1\n";

#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("device key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("cannot write the receipt {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn device_key(path: &Path) -> Result<SecretKey, ReceiptError> {
    let key_error = |reason: String| ReceiptError::Key {
        path: path.to_owned(),
        reason,
    };
    if path.exists() {
        return SecretKey::load(path).map_err(|e| key_error(e.to_string()));
    }
    let key = SecretKey::generate().map_err(|e| key_error(e.to_string()))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| key_error(e.to_string()))?;
    file.write_all(key.to_line().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| key_error(e.to_string()))?;
    Ok(key)
}

/// This device's id: its device key's id (16 hex digits), the key made on first use.
pub fn device_id(key_path: &Path) -> Result<String, ReceiptError> {
    Ok(device_key(key_path)?.public().id().to_string())
}

/// Signs `receipt` and writes it into each of `dirs` (created if missing); the first
/// directory must work, the others (a read-only stick) are tried and logged.
pub fn write(key_path: &Path, mut receipt: Receipt, dirs: &[PathBuf]) -> Result<(), ReceiptError> {
    let key = device_key(key_path)?;
    let public = key.public();
    receipt.device = public.id().to_string();
    let body = serde_json::to_vec(&receipt).expect("a receipt serialises");
    let mut message = RECEIPT_DOMAIN.to_vec();
    message.extend_from_slice(&body);
    let signed = Signed {
        receipt: &receipt,
        key: public
            .to_line("")
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned(),
        signature: hex::encode(key.sign(&message)),
    };
    let text = serde_json::to_string_pretty(&signed).expect("a receipt serialises") + "\n";
    let name = format!(
        "{}-{}-{}.json",
        receipt.finished_at, receipt.device, receipt.result
    );
    for (i, dir) in dirs.iter().enumerate() {
        let path = dir.join(&name);
        let result = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&path, &text))
            .and_then(|()| std::fs::File::open(&path)?.sync_all());
        match result {
            Ok(()) => tracing::info!(receipt = %path.display(), "install receipt written"),
            Err(source) if i == 0 => return Err(ReceiptError::Write { path, source }),
            Err(error) => {
                tracing::info!(dir = %dir.display(), %error, "receipt not copied next to the bundle")
            }
        }
    }
    Ok(())
}
