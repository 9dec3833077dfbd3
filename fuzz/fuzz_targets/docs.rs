//! Any bytes as a key set or a permit: parsing and verification against a fixed trusted set.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ota_bundle::{KeySet, Permit, SecretKey, SignedDoc, TrustedKeys};

fuzz_target!(|data: &[u8]| {
    let trusted = TrustedKeys::new([SecretKey::from_seed([42; 32]).public()], 1);
    if let Ok(doc) = SignedDoc::parse(data, "keyset") {
        let _ = KeySet::verify_next(&doc, &trusted, 0, "quote-edge");
        let _ = doc.to_text();
    }
    if let Ok(doc) = SignedDoc::parse(data, "permit") {
        let _ = Permit::verify(&doc, &trusted, "quote-edge", "0011223344556677", "00");
    }
});
