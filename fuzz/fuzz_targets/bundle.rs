//! Any bytes as a bundle: the unverified manifest reader, and the verifying reader with a
//! trusted key, walking every chunk to a sink. Must never panic, hang or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ota_bundle::{Bundle, Chunked, SecretKey, TrustedKeys};

fuzz_target!(|data: &[u8]| {
    let _ = ota_bundle::read_manifest_and_digest_unverified(data);
    // The seed corpus is signed by this key, so mutations get past the signature check only
    // when they leave the signed part alone: the payload and trailing bytes are what is fuzzed.
    let trusted = TrustedKeys::new([SecretKey::from_seed([42; 32]).public()], 1);
    if let Ok(bundle) = Bundle::open(data, &trusted) {
        let mut total = 0u64;
        let _ = bundle.chunks(|_, _, chunk| {
            if let Chunked::Data(bytes) = chunk {
                total += bytes.len() as u64;
            }
            Ok::<(), ()>(())
        });
    }
});
