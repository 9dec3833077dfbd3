//! Before a replica runs from a slot: the slot's files are the ones its bundle signed. The slot
//! lives on the writable data partition, so it is checked again, not trusted because it was
//! verified once at install: the signed head of the bundle (header, manifest, signatures) is
//! kept beside the slot, verified against the keys trusted now, and every file of the manifest
//! is hashed and compared. A file's identity (inode, size, times) is remembered after a
//! successful check, so that a replica restart costs a `stat`, not a hash, until the file
//! changes.
//!
//! Architecture invariant: a program in a slot runs only after its bytes matched a manifest
//! that the trusted keys signed.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ota_bundle::{Bundle, TrustedKeys};
use ota_slots::SlotName;

use crate::agent::Layout;

/// Why a slot may not run.
#[derive(Debug, thiserror::Error)]
#[error("slot {slot} may not run: {reason}")]
pub struct Tampered {
    pub slot: &'static str,
    pub reason: String,
}

/// What identifies a file's content without reading it: any write or `chmod` changes `ctime`,
/// and user space cannot set it back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Fingerprint {
        Fingerprint {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// A slot checked in full, and the files as they were then.
#[derive(Debug, Clone)]
pub(crate) struct Verified {
    files: Vec<(PathBuf, Fingerprint)>,
}

impl Verified {
    /// Whether every file is still the one checked (a `stat` each).
    pub(crate) fn unchanged(&self) -> bool {
        self.files.iter().all(|(path, print)| {
            std::fs::symlink_metadata(path).is_ok_and(|meta| Fingerprint::of(&meta) == *print)
        })
    }
}

/// Checks `slot` in full: its kept bundle head verified against `trusted`, then every file of
/// the manifest (a regular file, not a link, its size, mode and whole-file digest).
pub(crate) fn verify_slot(
    layout: &Layout,
    slot: SlotName,
    trusted: &TrustedKeys,
) -> Result<Verified, Tampered> {
    let tampered = |reason: String| Tampered {
        slot: slot.as_str(),
        reason,
    };
    let head_path = layout.head(slot);
    let head = std::fs::File::open(&head_path).map_err(|e| {
        tampered(format!(
            "its signed manifest {} cannot be read: {e}",
            head_path.display()
        ))
    })?;
    // Bounded: the header, the largest manifest and the most signatures a bundle may have.
    let bound = (ota_bundle::HEADER_LEN
        + ota_bundle::MAX_MANIFEST_LEN as usize
        + ota_bundle::MAX_SIGNATURES as usize * ota_bundle::SIGNATURE_LEN) as u64;
    let bundle = Bundle::open(std::io::BufReader::new(head.take(bound)), trusted)
        .map_err(|e| tampered(format!("its kept manifest does not verify: {e}")))?;
    let dir = layout.slot(slot);
    let mut files = Vec::with_capacity(bundle.manifest.files.len());
    for entry in &bundle.manifest.files {
        let path = dir.join(&entry.path);
        let print = check_file(&path, entry)
            .map_err(|reason| tampered(format!("{}: {reason}", entry.path)))?;
        files.push((path, print));
    }
    Ok(Verified { files })
}

/// One file against its manifest entry; its fingerprint when it matches.
fn check_file(path: &Path, entry: &ota_bundle::FileEntry) -> Result<Fingerprint, String> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| format!("cannot be opened: {e}"))?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    if meta.len() != entry.size {
        return Err(format!(
            "is {} bytes, the manifest says {}",
            meta.len(),
            entry.size
        ));
    }
    if meta.mode() & 0o7777 != entry.mode {
        return Err(format!(
            "has mode {:o}, the manifest says {:o}",
            meta.mode() & 0o7777,
            entry.mode
        ));
    }
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| format!("cannot be read: {e}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    if hasher.finalize().to_hex().as_str() != entry.digest {
        return Err("its content does not match the signed digest".into());
    }
    Ok(Fingerprint::of(&meta))
}
