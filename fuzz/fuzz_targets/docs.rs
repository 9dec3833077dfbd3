//! Any bytes as a key set, a permit or a rollout plan: parsing and verification against a fixed
//! trusted set; and any bytes as a plan's JSON, signed here by that set's key, so that the plan's
//! rules (not only its signatures) meet the fuzzer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ota_bundle::{KeySet, PLAN_KIND, Permit, Plan, SecretKey, SignedDoc, TrustedKeys};

fuzz_target!(|data: &[u8]| {
    let key = SecretKey::from_seed([42; 32]);
    let trusted = TrustedKeys::new([key.public()], 1);
    if let Ok(doc) = SignedDoc::parse(data, "keyset") {
        let _ = KeySet::verify_next(&doc, &trusted, 0, "quote-edge");
        let _ = doc.to_text();
    }
    if let Ok(doc) = SignedDoc::parse(data, "permit") {
        let _ = Permit::verify(&doc, &trusted, "quote-edge", "0011223344556677", "00");
    }
    let _ = Plan::verify(data, &trusted, "quote-edge");
    // The same bytes as the JSON line of a plan the trusted key signed.
    if let Ok(json) = std::str::from_utf8(data)
        && !json.contains('\n')
    {
        let mut doc = SignedDoc {
            kind: PLAN_KIND.to_owned(),
            json: json.to_owned(),
            signatures: Vec::new(),
        };
        doc.sign(&key);
        if let Ok(plan) = Plan::verify(doc.to_text().as_bytes(), &trusted, "quote-edge") {
            // A plan that passed its rules covers every fleet without shrinking.
            for fleet in [0, 1, 7, 1000, u32::MAX] {
                let cover = plan.cover(fleet);
                assert!(cover.windows(2).all(|w| w[0] <= w[1]));
                assert_eq!(cover.last(), Some(&fleet));
            }
        }
    }
});
