//! Small signed documents beside bundles (`ota/FORMAT.md`, "Key sets and permits"):
//!
//! - a **key set** (`*.keyset`): the keys a device trusts from now on and their threshold, with a
//!   serial number. Set N+1 is accepted only when signed by a threshold of set N, so keys rotate
//!   and are revoked offline, with no X.509 and no expiry that could lock a device out;
//! - a **downgrade permit** (`*.permit`): lets one device (by its device key id) install one
//!   bundle (by its manifest digest) below its anti-rollback floor.
//!
//! Text format, every size bounded: a first line `quote-edge-signed v1 <kind>`, one line of
//! canonical JSON (the document), then one `sig <key id hex> <signature hex>` line per signature
//! over `"quote-edge <kind> v1\n" + JSON`.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::{BundleError, KeyId, PublicKey, SecretKey, TrustedKeys};

/// Largest document file read.
pub const MAX_DOC_LEN: u64 = 64 * 1024;
const MAX_DOC_SIGNATURES: usize = 16;
const MAX_KEYS: usize = 16;

fn doc_error(reason: impl Into<String>) -> BundleError {
    BundleError::Manifest(reason.into())
}

/// A parsed (not yet verified) signed document.
#[derive(Debug, Clone)]
pub struct SignedDoc {
    pub kind: String,
    pub json: String,
    pub signatures: Vec<(KeyId, [u8; 64])>,
}

impl SignedDoc {
    /// The document's identity: the BLAKE3 of its signed JSON, whatever signatures it carries
    /// (adding or reordering signatures does not make another document).
    pub fn id(&self) -> String {
        crate::chunk_hash(self.json.as_bytes())
    }

    /// Parses a document of `kind`; nothing in the JSON is trusted yet.
    pub fn parse(bytes: &[u8], kind: &str) -> Result<SignedDoc, BundleError> {
        if bytes.len() as u64 > MAX_DOC_LEN {
            return Err(doc_error(format!(
                "a {kind} is at most {MAX_DOC_LEN} bytes"
            )));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| doc_error("not UTF-8 text"))?;
        let mut lines = text.lines();
        let header = format!("quote-edge-signed v1 {kind}");
        if lines.next() != Some(header.as_str()) {
            return Err(doc_error(format!(
                "not a {kind} (the first line is not {header:?})"
            )));
        }
        let json = lines
            .next()
            .ok_or_else(|| doc_error("the document line is missing"))?
            .to_owned();
        let mut signatures = Vec::new();
        for line in lines.filter(|l| !l.trim().is_empty()) {
            let words: Vec<&str> = line.split(' ').collect();
            let ["sig", id, sig] = words.as_slice() else {
                return Err(doc_error(format!("not a signature line: {line:?}")));
            };
            let id: [u8; 8] = hex::decode(id)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| doc_error("a key id is not 16 hex digits"))?;
            let sig: [u8; 64] = hex::decode(sig)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| doc_error("a signature is not 128 hex digits"))?;
            if signatures.iter().any(|(seen, _)| *seen == KeyId(id)) {
                return Err(BundleError::DuplicateSignature(KeyId(id)));
            }
            signatures.push((KeyId(id), sig));
            if signatures.len() > MAX_DOC_SIGNATURES {
                return Err(doc_error(format!(
                    "more than {MAX_DOC_SIGNATURES} signatures"
                )));
            }
        }
        Ok(SignedDoc {
            kind: kind.to_owned(),
            json,
            signatures,
        })
    }

    fn message(&self) -> Vec<u8> {
        let mut message = format!("quote-edge {} v1\n", self.kind).into_bytes();
        message.extend_from_slice(self.json.as_bytes());
        message
    }

    /// The distinct trusted keys whose signatures verify; refused below the threshold.
    pub fn verify(&self, trusted: &TrustedKeys) -> Result<Vec<KeyId>, BundleError> {
        let message = self.message();
        let mut valid = BTreeSet::new();
        for (id, sig) in &self.signatures {
            if let Some(key) = trusted.get(id)
                && key.verify(&message, sig)
            {
                valid.insert(*id);
            }
        }
        if valid.len() < trusted.threshold() {
            return Err(BundleError::NotEnoughSignatures {
                valid: valid.len(),
                needed: trusted.threshold(),
                bundle_keys: self
                    .signatures
                    .iter()
                    .map(|(id, _)| id.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                trusted_keys: trusted
                    .ids()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(valid.into_iter().collect())
    }

    /// Adds `key`'s signature (replacing an earlier one by the same key).
    pub fn sign(&mut self, key: &SecretKey) {
        let id = key.public().id();
        let sig = key.sign(&self.message());
        self.signatures.retain(|(i, _)| *i != id);
        self.signatures.push((id, sig));
    }

    /// The file's text.
    pub fn to_text(&self) -> String {
        let mut text = format!("quote-edge-signed v1 {}\n{}\n", self.kind, self.json);
        for (id, sig) in &self.signatures {
            text.push_str(&format!("sig {id} {}\n", hex::encode(sig)));
        }
        text
    }

    /// An unsigned document of `kind` holding `value` as one line of JSON.
    pub fn new(kind: &str, value: &impl Serialize) -> SignedDoc {
        SignedDoc {
            kind: kind.to_owned(),
            json: serde_json::to_string(value).expect("documents serialise"),
            signatures: Vec::new(),
        }
    }
}

/// The keys trusted from `serial` on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySet {
    pub format: u32,
    pub product: String,
    pub serial: u64,
    pub threshold: usize,
    /// Hex Ed25519 public keys.
    pub keys: Vec<String>,
}

impl KeySet {
    /// An unsigned key-set document for `keys`.
    pub fn document(
        product: &str,
        serial: u64,
        threshold: usize,
        keys: &[PublicKey],
    ) -> Result<SignedDoc, BundleError> {
        let set = KeySet {
            format: 1,
            product: product.to_owned(),
            serial,
            threshold,
            keys: keys.iter().map(PublicKey::to_hex).collect(),
        };
        set.trusted()?;
        Ok(SignedDoc::new("keyset", &set))
    }

    /// Accepts `doc` as the set after `current` (whose serial is `serial`): it must be for
    /// `product`, have serial `serial + 1`, be well formed (distinct keys), and be signed by a
    /// threshold of `current` and by a threshold of its own keys (as TUF rotates its root: the
    /// new keys are proven held, so a typo cannot lock the vendor out). Returns the new set and
    /// its trusted keys.
    pub fn verify_next(
        doc: &SignedDoc,
        current: &TrustedKeys,
        serial: u64,
        product: &str,
    ) -> Result<(KeySet, TrustedKeys), BundleError> {
        doc.verify(current)?;
        let set: KeySet = serde_json::from_str(&doc.json)
            .map_err(|e| doc_error(format!("the key set is not valid: {e}")))?;
        if set.format != 1 {
            return Err(doc_error(format!("key set format {} is not 1", set.format)));
        }
        if set.product != product {
            return Err(doc_error(format!(
                "the key set is for product {:?}, this device is {product:?}",
                set.product
            )));
        }
        if set.serial != serial + 1 {
            return Err(doc_error(format!(
                "the key set has serial {}, the device expects {} (sets are applied in order)",
                set.serial,
                serial + 1
            )));
        }
        let trusted = set.trusted()?;
        doc.verify(&trusted).map_err(|error| {
            doc_error(format!(
                "the key set must also be signed by {} of its own keys, to prove they are held: {error}",
                trusted.threshold()
            ))
        })?;
        Ok((set, trusted))
    }

    fn trusted(&self) -> Result<TrustedKeys, BundleError> {
        if self.keys.is_empty() || self.keys.len() > MAX_KEYS {
            return Err(doc_error(format!("a key set has 1 to {MAX_KEYS} keys")));
        }
        if !(1..=self.keys.len()).contains(&self.threshold) {
            return Err(doc_error(format!(
                "threshold {} is not 1 to {}",
                self.threshold,
                self.keys.len()
            )));
        }
        let keys = self
            .keys
            .iter()
            .map(|k| PublicKey::from_hex(k))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, key) in keys.iter().enumerate() {
            if keys[..i].iter().any(|k| k.id() == key.id()) {
                return Err(doc_error(format!(
                    "the key set lists key {} twice (a threshold counts distinct keys)",
                    key.id()
                )));
            }
        }
        Ok(TrustedKeys::new(keys, self.threshold))
    }
}

/// Permission for one device to install one bundle below its anti-rollback floor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Permit {
    pub format: u32,
    pub product: String,
    /// The device's key id (16 hex digits; `edge-supervisor` writes it into every receipt).
    pub device: String,
    /// The bundle's manifest digest.
    pub bundle: String,
    /// The bundle's version, for people reading the permit.
    pub version: String,
}

impl Permit {
    pub fn document(permit: &Permit) -> SignedDoc {
        SignedDoc::new("permit", permit)
    }

    /// Checks that `doc` is a permit, signed by a threshold of `trusted`, for exactly this
    /// device and bundle.
    pub fn verify(
        doc: &SignedDoc,
        trusted: &TrustedKeys,
        product: &str,
        device: &str,
        bundle: &str,
    ) -> Result<Permit, BundleError> {
        doc.verify(trusted)?;
        let permit: Permit = serde_json::from_str(&doc.json)
            .map_err(|e| doc_error(format!("the permit is not valid: {e}")))?;
        if permit.format != 1 || permit.product != product {
            return Err(doc_error("the permit is not for this product"));
        }
        if permit.device != device {
            return Err(doc_error(format!(
                "the permit is for device {}, this is {device}",
                permit.device
            )));
        }
        if permit.bundle != bundle {
            return Err(doc_error("the permit is for another bundle"));
        }
        Ok(permit)
    }
}

/// An install receipt (kind `receipt`): what one device says of one finished update, signed by
/// that device's own key (not a release key). Its JSON is kept exactly as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// The id of the device key that signs the receipt.
    pub device: String,
    pub from: String,
    pub to: String,
    /// `committed`, `rolled_back` or `refused`.
    pub result: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The bundle's file name, for people.
    pub bundle: Option<String>,
    /// The bundle's manifest digest, when it was read: what was installed, for machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_digest: Option<String>,
    /// Unix seconds (the device clock, for reading, not for trust).
    pub started_at: u64,
    pub finished_at: u64,
    /// Bytes of an interrupted install found intact and kept (it resumed, not restarted).
    pub resumed_bytes: u64,
    /// Bytes the target slot already held from its older release: compared, not rewritten.
    pub unchanged_bytes: u64,
}

impl Receipt {
    /// The unsigned document of this receipt.
    pub fn document(&self) -> SignedDoc {
        SignedDoc::new("receipt", self)
    }

    /// Verifies a receipt document against the enrolled device keys (`devices`, threshold 1):
    /// a valid signature by one of them, and by the very device the receipt names. Returns what
    /// it says.
    pub fn verify(bytes: &[u8], devices: &TrustedKeys) -> Result<Receipt, BundleError> {
        let doc = SignedDoc::parse(bytes, "receipt")?;
        let signers = doc.verify(devices)?;
        let receipt: Receipt = serde_json::from_str(&doc.json)
            .map_err(|e| doc_error(format!("the receipt is not valid: {e}")))?;
        if !signers.iter().any(|id| id.to_string() == receipt.device) {
            return Err(doc_error(format!(
                "the receipt names device {}, but is signed by {}",
                receipt.device,
                signers
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(receipt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn signed(mut doc: SignedDoc, by: &[&SecretKey]) -> SignedDoc {
        for k in by {
            doc.sign(k);
        }
        SignedDoc::parse(doc.to_text().as_bytes(), &doc.kind).unwrap()
    }

    #[test]
    fn a_key_set_needs_a_threshold_of_the_previous_set_and_the_next_serial() {
        let current = TrustedKeys::new([key(1).public(), key(2).public()], 2);
        let doc = KeySet::document("quote-edge", 1, 1, &[key(3).public()]).unwrap();
        let one = signed(doc.clone(), &[&key(1)]);
        assert!(matches!(
            KeySet::verify_next(&one, &current, 0, "quote-edge"),
            Err(BundleError::NotEnoughSignatures {
                valid: 1,
                needed: 2,
                ..
            })
        ));
        // Signed by the current set alone: the new keys are not proven held.
        let old_only = signed(doc.clone(), &[&key(1), &key(2)]);
        let error = KeySet::verify_next(&old_only, &current, 0, "quote-edge").unwrap_err();
        assert!(
            error.to_string().contains("signed by 1 of its own keys"),
            "{error}"
        );
        let both = signed(doc.clone(), &[&key(1), &key(2), &key(3)]);
        let (set, trusted) = KeySet::verify_next(&both, &current, 0, "quote-edge").unwrap();
        assert_eq!((set.serial, trusted.threshold()), (1, 1));
        assert!(trusted.get(&key(3).public().id()).is_some());
        assert!(
            trusted.get(&key(1).public().id()).is_none(),
            "key 1 revoked"
        );
        let replay = KeySet::verify_next(&both, &current, 1, "quote-edge").unwrap_err();
        assert!(replay.to_string().contains("serial 1"), "{replay}");
        let other = KeySet::verify_next(&both, &current, 0, "other").unwrap_err();
        assert!(other.to_string().contains("product"), "{other}");
        // A signature does not survive a changed document.
        let mut tampered = both.clone();
        tampered.json = tampered.json.replace("\"threshold\":1", "\"threshold\":1 ");
        assert!(KeySet::verify_next(&tampered, &current, 0, "quote-edge").is_err());
    }

    #[test]
    fn thresholds_count_distinct_keys_and_duplicates_are_refused() {
        // A key listed twice would make a threshold of 2 look reachable with one key.
        let mut set = KeySet {
            format: 1,
            product: "quote-edge".into(),
            serial: 1,
            threshold: 2,
            keys: vec![key(3).public().to_hex(), key(3).public().to_hex()],
        };
        let error = set.trusted().unwrap_err();
        assert!(error.to_string().contains("twice"), "{error}");
        set.keys[1] = key(4).public().to_hex();
        assert!(set.trusted().is_ok());
        // Two signatures by one key are refused, not counted once and not skipped.
        let doc = KeySet::document("quote-edge", 1, 1, &[key(3).public()]).unwrap();
        let text = signed(doc, &[&key(1)]).to_text();
        let sig_line = text.lines().last().unwrap().to_owned();
        let twice = format!("{text}\n{sig_line}\n");
        let error = SignedDoc::parse(twice.as_bytes(), "keyset").unwrap_err();
        assert!(
            matches!(error, BundleError::DuplicateSignature(_)),
            "{error}"
        );
    }

    #[test]
    fn a_permit_binds_one_device_and_one_bundle() {
        let trusted = TrustedKeys::new([key(1).public()], 1);
        let permit = Permit {
            format: 1,
            product: "quote-edge".into(),
            device: "00112233aabbccdd".into(),
            bundle: "ab".repeat(32),
            version: "1.0.0".into(),
        };
        let doc = signed(Permit::document(&permit), &[&key(1)]);
        let ok = |device: &str, bundle: &str| {
            Permit::verify(&doc, &trusted, "quote-edge", device, bundle).map(|_| ())
        };
        assert!(ok("00112233aabbccdd", &"ab".repeat(32)).is_ok());
        assert!(ok("ffffffffffffffff", &"ab".repeat(32)).is_err());
        assert!(ok("00112233aabbccdd", &"cd".repeat(32)).is_err());
        let unsigned = signed(Permit::document(&permit), &[&key(9)]);
        assert!(
            Permit::verify(
                &unsigned,
                &trusted,
                "quote-edge",
                "00112233aabbccdd",
                &"ab".repeat(32)
            )
            .is_err()
        );
    }

    #[test]
    fn garbage_and_oversized_documents_are_refused_with_a_reason() {
        for (bytes, why) in [
            (b"hello".to_vec(), "not a keyset"),
            (vec![b'x'; 70_000], "at most"),
            (
                b"quote-edge-signed v1 keyset\n{}\nsig zz 00\n".to_vec(),
                "key id",
            ),
        ] {
            let error = SignedDoc::parse(&bytes, "keyset").unwrap_err();
            assert!(error.to_string().contains(why), "{error}");
        }
    }
}
