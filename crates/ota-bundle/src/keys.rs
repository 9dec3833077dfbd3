//! Ed25519 keys in one-line text files, key ids, and the device's trusted set.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::BundleError;

const SECRET_TAG: &str = "quote-edge-ed25519-secret";
const PUBLIC_TAG: &str = "quote-edge-ed25519";

/// The first 8 bytes of BLAKE3(public key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.public().id())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl SecretKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Result<SecretKey, BundleError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| BundleError::Key {
            path: PathBuf::from("(random source)"),
            reason: e.to_string(),
        })?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey(SigningKey::from_bytes(&seed))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    pub fn to_line(&self) -> String {
        format!("{SECRET_TAG} {}\n", hex::encode(self.0.to_bytes()))
    }

    pub fn load(path: &Path) -> Result<SecretKey, BundleError> {
        let text = read_key_file(path)?;
        let hex = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .as_slice()
            .strip_prefix(&[SECRET_TAG])
            .and_then(|rest| rest.first().copied())
            .ok_or_else(|| {
                key_error(
                    path,
                    &format!("not a secret key (expected `{SECRET_TAG} <64 hex>`)"),
                )
            })?;
        Ok(SecretKey::from_seed(decode32(path, hex)?))
    }
}

impl PublicKey {
    pub fn from_bytes(path: &Path, bytes: [u8; 32]) -> Result<PublicKey, BundleError> {
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| key_error(path, "not a valid Ed25519 public key"))
    }

    pub fn id(&self) -> KeyId {
        let hash = blake3::hash(self.0.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&hash.as_bytes()[..8]);
        KeyId(id)
    }

    /// Strict verification (RFC 8032 with the canonical-encoding checks).
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        self.0.verify_strict(message, &signature).is_ok()
    }

    /// The key as 64 hex digits (as in key files and key-set documents).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }

    /// A key from 64 hex digits.
    pub fn from_hex(text: &str) -> Result<PublicKey, BundleError> {
        let path = Path::new("(key set)");
        PublicKey::from_bytes(path, decode32(path, text)?)
    }

    pub fn to_line(&self, comment: &str) -> String {
        format!(
            "{PUBLIC_TAG} {} {comment}\n",
            hex::encode(self.0.as_bytes())
        )
    }

    pub fn load(path: &Path) -> Result<PublicKey, BundleError> {
        PublicKey::from_line(path, &read_key_file(path)?)
    }

    /// A key from its line (`to_line`'s format; the comment is ignored). `path` names where the
    /// line came from, for the error.
    pub fn from_line(path: &Path, text: &str) -> Result<PublicKey, BundleError> {
        let mut words = text.split_whitespace();
        if words.next() != Some(PUBLIC_TAG) {
            return Err(key_error(
                path,
                &format!("not a public key (expected `{PUBLIC_TAG} <64 hex> [comment]`)"),
            ));
        }
        let hex = words
            .next()
            .ok_or_else(|| key_error(path, "the key is missing"))?;
        PublicKey::from_bytes(path, decode32(path, hex)?)
    }
}

/// The keys a device trusts, and how many distinct ones must sign a bundle.
#[derive(Debug, Clone)]
pub struct TrustedKeys {
    keys: BTreeMap<KeyId, PublicKey>,
    threshold: usize,
}

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = PublicKey>, threshold: usize) -> TrustedKeys {
        TrustedKeys {
            keys: keys.into_iter().map(|k| (k.id(), k)).collect(),
            threshold: threshold.max(1),
        }
    }

    /// Every `*.pub` in `dir`, and the `threshold` file if there is one (default 1).
    pub fn load_dir(dir: &Path) -> Result<TrustedKeys, BundleError> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| key_error(dir, &format!("cannot list trusted keys: {e}")))?;
        let mut keys = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| key_error(dir, &e.to_string()))?.path();
            if path.extension().is_some_and(|e| e == "pub") {
                let key = PublicKey::load(&path)?;
                if let Some((_, first)) = keys
                    .iter()
                    .find(|(k, _): &&(PublicKey, PathBuf)| k.id() == key.id())
                {
                    return Err(key_error(
                        &path,
                        &format!(
                            "is key {}, already trusted as {} (a threshold counts distinct keys)",
                            key.id(),
                            first.display()
                        ),
                    ));
                }
                keys.push((key, path));
            }
        }
        if keys.is_empty() {
            return Err(key_error(dir, "holds no *.pub trusted keys"));
        }
        let threshold_path = dir.join("threshold");
        let threshold = match std::fs::read_to_string(&threshold_path) {
            Ok(text) => text
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|t| (1..=keys.len()).contains(t))
                .ok_or_else(|| {
                    key_error(
                        &threshold_path,
                        &format!("must be a number from 1 to {}", keys.len()),
                    )
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
            Err(e) => return Err(key_error(&threshold_path, &e.to_string())),
        };
        Ok(TrustedKeys::new(
            keys.into_iter().map(|(k, _)| k),
            threshold,
        ))
    }

    pub fn get(&self, id: &KeyId) -> Option<&PublicKey> {
        self.keys.get(id)
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }

    pub fn ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }
}

fn read_key_file(path: &Path) -> Result<String, BundleError> {
    // Key files are one short line; refuse anything large before reading it.
    let meta = std::fs::metadata(path).map_err(|e| key_error(path, &e.to_string()))?;
    if meta.len() > 4096 {
        return Err(key_error(path, "is too large to be a key file"));
    }
    std::fs::read_to_string(path).map_err(|e| key_error(path, &e.to_string()))
}

fn decode32(path: &Path, text: &str) -> Result<[u8; 32], BundleError> {
    let bytes = hex::decode(text).map_err(|_| key_error(path, "the key is not hexadecimal"))?;
    bytes
        .try_into()
        .map_err(|_| key_error(path, "the key is not 32 bytes"))
}

fn key_error(path: &Path, reason: &str) -> BundleError {
    BundleError::Key {
        path: path.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_key_trusted_twice_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let line = SecretKey::from_seed([5; 32]).public().to_line("vendor");
        std::fs::write(dir.path().join("a.pub"), &line).unwrap();
        std::fs::write(dir.path().join("b.pub"), &line).unwrap();
        std::fs::write(dir.path().join("threshold"), "2").unwrap();
        let error = TrustedKeys::load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains("already trusted as")
                && error.contains("a.pub")
                && error.contains("b.pub"),
            "{error}"
        );
    }
}
