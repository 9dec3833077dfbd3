//! The inboxes: `<data_dir>/ota/inbox` and the configured directories (a USB stick's mount
//! point), scanned for bundles worth offering to the agent.

use std::collections::HashMap;
use std::io::BufReader;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bundle files one scan looks at, over every inbox; the rest wait for the next scan.
pub(crate) const MAX_SCAN_FILES: usize = 256;
/// How long one scan may read; the rest wait for the next scan.
pub(crate) const MAX_SCAN_TIME: Duration = Duration::from_secs(5);

/// Opens a file from a stranger's file system (a stick): never through a link, never blocking
/// on a FIFO or a device, and only a regular file.
pub(crate) fn open_untrusted(path: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(file)
}

/// The inbox directories and their immediate subdirectories (where USB sticks get mounted,
/// one directory per stick), except the receipts written there.
pub(crate) fn expand_inboxes(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for dir in dirs {
        all.push(dir.clone());
        if let Ok(entries) = std::fs::read_dir(dir) {
            all.extend(
                entries
                    .flatten()
                    .filter(|e| {
                        e.file_type().is_ok_and(|t| t.is_dir()) && e.file_name() != "receipts"
                    })
                    .map(|e| e.path()),
            );
        }
    }
    all
}

/// Bundles in the inboxes that could be installed: readable manifest, this product, not
/// failed or already in a slot, not below the anti-rollback floor. Best (highest security
/// version, then newest) first. Signatures are checked by the install, not here.
pub(crate) fn scan_inboxes(
    dirs: &[PathBuf],
    judged: &HashMap<PathBuf, (u64, SystemTime)>,
    skip: &[String],
    product: &str,
    floor: u64,
    trusted: Option<&ota_bundle::TrustedKeys>,
) -> Vec<PathBuf> {
    let (mut found, mut unverified) = (Vec::new(), Vec::new());
    let (started, mut looked) = (Instant::now(), 0usize);
    'dirs: for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "bundle") {
                continue;
            }
            looked += 1;
            if looked > MAX_SCAN_FILES || started.elapsed() > MAX_SCAN_TIME {
                tracing::warn!(files = MAX_SCAN_FILES, time = ?MAX_SCAN_TIME, "inbox scan budget spent; the rest waits for the next scan");
                break 'dirs;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let key = (meta.len(), meta.modified().unwrap_or(UNIX_EPOCH));
            if judged.get(&path) == Some(&key) {
                continue;
            }
            let Ok(file) = open_untrusted(&path) else {
                continue;
            };
            // Ranked and filtered on what the trusted keys signed, never on unverified bytes.
            let opened =
                trusted.map(|trusted| ota_bundle::Bundle::open(BufReader::new(file), trusted));
            // Shorter than it says: still being copied (or truncated for good). Not offered, and
            // not judged, so it is looked at again once it has grown; `apply` refuses it at once.
            // The verified head gives the length; only when there is none (no keys, a stranger's
            // signature) is the head read again, unverified, for the length alone.
            let declared = match &opened {
                Some(Ok(bundle)) => Some(Ok(bundle.file_len())),
                _ => open_untrusted(&path)
                    .ok()
                    .map(|f| ota_bundle::declared_len_unverified(BufReader::new(f))),
            };
            let incomplete = match declared {
                Some(Ok(declared)) => meta.len() < declared,
                // It ends inside its own header, manifest or signatures.
                Some(Err(ota_bundle::BundleError::Truncated { .. })) => true,
                _ => false,
            };
            if incomplete {
                tracing::debug!(bundle = %path.display(), "inbox: incomplete, not offered yet");
                continue;
            }
            match opened {
                Some(Ok(bundle)) => {
                    let digest = ota_bundle::manifest_digest(&bundle.manifest_bytes);
                    let manifest = &bundle.manifest;
                    let permit_beside = manifest.security_version < floor
                        && std::fs::read_dir(dir).is_ok_and(|mut e| {
                            e.any(|e| {
                                e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "permit"))
                            })
                        });
                    if manifest.product != product
                        || (manifest.security_version < floor && !permit_beside)
                        || skip.contains(&digest)
                    {
                        tracing::debug!(bundle = %path.display(), "inbox: not offered");
                        continue;
                    }
                    found.push(((manifest.security_version, manifest.issued_at), path));
                }
                // Not signed by the keys trusted now, or not a bundle: offered after every
                // verified one, so that the install refuses it once and says why.
                Some(Err(error)) => {
                    tracing::info!(bundle = %path.display(), %error, "inbox: does not verify; offered last");
                    unverified.push(path);
                }
                None => unverified.push(path),
            }
        }
    }
    let mut offers = rank(found);
    offers.append(&mut unverified);
    offers
}

/// Best first: highest security version, then newest.
fn rank(mut found: Vec<((u64, u64), PathBuf)>) -> Vec<PathBuf> {
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.into_iter().map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A signed bundle of one small file, packed into `dir`.
    fn bundle(dir: &std::path::Path) -> PathBuf {
        signed_bundle(dir, "v2.bundle", 2, 3)
    }

    /// A bundle of security version `sv` signed by the key of seed `key`.
    fn signed_bundle(dir: &std::path::Path, name: &str, sv: u64, key: u8) -> PathBuf {
        let release = dir.join("release");
        std::fs::create_dir_all(release.join("bin")).unwrap();
        std::fs::write(release.join("bin/quote-service"), vec![7u8; 100_000]).unwrap();
        let out = dir.join(name);
        let options = ota_bundle::PackOptions {
            product: "quote-edge".into(),
            version: format!("{sv}.0.0"),
            security_version: sv,
            issued_at: 1,
            level: 3,
        };
        let key = ota_bundle::SecretKey::from_seed([key; 32]);
        ota_bundle::pack(&release, &out, &options, &key, |_, _| {}).unwrap();
        out
    }

    #[test]
    fn a_fifo_or_a_link_named_bundle_neither_hangs_the_scan_nor_is_offered() {
        let dir = tempfile::tempdir().unwrap();
        let real = bundle(dir.path());
        let inbox = dir.path().join("inbox");
        std::fs::create_dir(&inbox).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            inbox.join("fifo.bundle"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        std::os::unix::fs::symlink(&real, inbox.join("link.bundle")).unwrap();
        let found = scan_inboxes(
            std::slice::from_ref(&inbox),
            &HashMap::new(),
            &[],
            "quote-edge",
            0,
            None,
        );
        assert!(found.is_empty(), "{found:?}");
        assert!(open_untrusted(&inbox.join("fifo.bundle")).is_err());
    }

    #[test]
    fn offers_are_ranked_on_what_the_trusted_keys_signed_never_on_unverified_claims() {
        let dir = tempfile::tempdir().unwrap();
        let inbox = dir.path().join("inbox");
        std::fs::create_dir(&inbox).unwrap();
        let trusted =
            ota_bundle::TrustedKeys::new([ota_bundle::SecretKey::from_seed([3; 32]).public()], 1);
        let good = signed_bundle(&inbox, "good.bundle", 2, 3);
        // Claims a far higher security version, signed by a key nobody trusts.
        let stranger = signed_bundle(&inbox, "stranger.bundle", 99, 4);
        let found = scan_inboxes(
            std::slice::from_ref(&inbox),
            &HashMap::new(),
            &[],
            "quote-edge",
            0,
            Some(&trusted),
        );
        assert_eq!(found, vec![good, stranger]);
    }

    #[test]
    fn a_bundle_still_being_copied_is_offered_once_it_is_whole() {
        let dir = tempfile::tempdir().unwrap();
        let whole = std::fs::read(bundle(dir.path())).unwrap();
        let inbox = dir.path().join("inbox");
        std::fs::create_dir(&inbox).unwrap();
        let copying = inbox.join("v2.bundle");
        let scan = || {
            scan_inboxes(
                std::slice::from_ref(&inbox),
                &HashMap::new(),
                &[],
                "quote-edge",
                0,
                None,
            )
        };
        std::fs::write(&copying, &whole[..whole.len() / 2]).unwrap();
        assert!(scan().is_empty(), "half a copy is not offered");
        std::fs::write(&copying, &whole).unwrap();
        assert_eq!(scan(), vec![copying]);
    }
}
