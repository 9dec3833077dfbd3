//! The keys a device trusts: the factory set, then the key sets accepted since, each verified
//! against the set before it.

use std::path::{Path, PathBuf};

use ota_bundle::TrustedKeys;

use crate::agent::UpdateError;

/// The public half of `ota/keys/test-signing.key`, the repository's throwaway key: its secret
/// is public, so a device that trusts it runs whatever anyone signs.
pub const REPOSITORY_TEST_KEY: &str =
    "276372dbe336c2e087e1bf4e68011065e37fa00a0dd60e79a39c41d1e94ac72c";

/// Whether the keys trusted now (the factory set and the key sets accepted since) include the
/// repository's test key. Keys that cannot be loaded trust nothing, so they do not.
pub fn trusts_test_key(keys_dir: &Path, ota_dir: &Path, product: &str) -> bool {
    let test_key = ota_bundle::PublicKey::from_hex(REPOSITORY_TEST_KEY)
        .expect("the repository's test key is a valid key");
    load_trust(keys_dir, ota_dir, product)
        .is_ok_and(|(trusted, _)| trusted.get(&test_key.id()).is_some())
}

/// Reads a signed document of `kind`, bounded; None (logged) if unreadable or malformed.
pub(crate) fn read_doc(path: &Path, kind: &str) -> Option<ota_bundle::SignedDoc> {
    use std::io::Read;
    let mut bytes = Vec::new();
    crate::inbox::open_untrusted(path)
        .ok()?
        .take(ota_bundle::MAX_DOC_LEN + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    match ota_bundle::SignedDoc::parse(&bytes, kind) {
        Ok(doc) => Some(doc),
        Err(error) => {
            tracing::warn!(file = %path.display(), %error, "not a usable document");
            None
        }
    }
}

/// The keys trusted now: the factory set from `keys_dir` (on the device, the read-only root),
/// then every accepted key set `<ota>/keysets/<N>.keyset` in order, each re-verified against
/// the set before it. Returns the keys and the serial of the newest set (0: the factory's).
pub fn load_trust(
    keys_dir: &Path,
    ota_dir: &Path,
    product: &str,
) -> Result<(TrustedKeys, u64), UpdateError> {
    let mut trusted = TrustedKeys::load_dir(keys_dir).map_err(UpdateError::Keys)?;
    let mut serial = 0;
    loop {
        let path = ota_dir
            .join("keysets")
            .join(format!("{}.keyset", serial + 1));
        if !path.exists() {
            return Ok((trusted, serial));
        }
        let doc = read_doc(&path, "keyset").ok_or_else(|| {
            UpdateError::Keys(ota_bundle::BundleError::Manifest(format!(
                "the accepted key set {} is unreadable",
                path.display()
            )))
        })?;
        let (_, next) = ota_bundle::KeySet::verify_next(&doc, &trusted, serial, product)
            .map_err(UpdateError::Keys)?;
        trusted = next;
        serial += 1;
    }
}

/// Accepts key sets found in the inboxes, in serial order: each must be signed by a threshold
/// of the keys trusted before it. Returns the serials accepted.
pub(crate) fn accept_keysets(
    dirs: &[PathBuf],
    keys_dir: &Path,
    ota_dir: &Path,
    product: &str,
) -> Vec<u64> {
    let mut found: Vec<ota_bundle::SignedDoc> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "keyset"))
        .filter_map(|p| read_doc(&p, "keyset"))
        .collect();
    let mut accepted = Vec::new();
    while !found.is_empty() {
        let Ok((trusted, serial)) = load_trust(keys_dir, ota_dir, product) else {
            return accepted;
        };
        let next = found.iter().position(|doc| {
            ota_bundle::KeySet::verify_next(doc, &trusted, serial, product).is_ok()
        });
        let Some(i) = next else { break };
        let doc = found.remove(i);
        let dir = ota_dir.join("keysets");
        let path = dir.join(format!("{}.keyset", serial + 1));
        match std::fs::create_dir_all(&dir).and_then(|()| {
            durable::replace(&mut durable::StdFs, &path, doc.to_text().as_bytes())
                .map_err(std::io::Error::other)
        }) {
            Ok(()) => {
                tracing::warn!(
                    serial = serial + 1,
                    "key set accepted: trusted keys rotated"
                );
                accepted.push(serial + 1);
            }
            Err(error) => {
                tracing::error!(%error, "cannot keep the key set");
                break;
            }
        }
    }
    accepted
}
