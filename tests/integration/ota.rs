//! The OTA agent's install data path end to end (`ota-install`, over
//! `ota_agent::install_once`): a packed release is written into a slot only from verified
//! chunks; a tampered bundle leaves nothing unverified in either slot.

use std::path::Path;
use std::process::Output;

use ota_bundle::{PackOptions, SecretKey, pack};

/// Installs `bundle` into a device whose data directory is `data_dir`, trusting the keys in
/// `keys`.
fn install(keys: &Path, bundle: &Path, data_dir: &Path) -> Output {
    tests::command(Path::new(env!("CARGO_BIN_EXE_ota-install")))
        .args([keys, bundle, data_dir])
        .output()
        .expect("run ota-install")
}

/// Both slot directories of a device's data directory.
fn slots(data_dir: &Path) -> [std::path::PathBuf; 2] {
    ["a", "b"].map(|s| data_dir.join("ota/slots").join(s))
}

fn release(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let files = vec![
        (
            "bin/quote-service".to_owned(),
            (0..2_500_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect::<Vec<u8>>(),
        ),
        ("etc/supervisor.toml".to_owned(), b"replicas = 3\n".to_vec()),
    ];
    for (path, content) in &files {
        std::fs::create_dir_all(dir.join(path).parent().unwrap()).unwrap();
        std::fs::write(dir.join(path), content).unwrap();
    }
    files
}

fn packed(
    dir: &Path,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    Vec<(String, Vec<u8>)>,
) {
    let files = release(&dir.join("release"));
    let key = SecretKey::from_seed([4; 32]);
    let public = dir.join("keys");
    std::fs::create_dir_all(&public).unwrap();
    std::fs::write(public.join("k.pub"), key.public().to_line("test")).unwrap();
    let options = PackOptions {
        product: "quote-edge".into(),
        version: "2.0.0".into(),
        security_version: 2,
        issued_at: 0,
        level: 3,
    };
    let bundle = dir.join("r.bundle");
    pack(&dir.join("release"), &bundle, &options, &key, |_, _| {}).unwrap();
    (public, bundle, files)
}

#[test]
fn a_verified_bundle_lands_in_the_slot_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (public, bundle, files) = packed(dir.path());
    let out = install(&public, &bundle, &dir.path().join("data"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let slot = Path::new(stdout.split(' ').next().unwrap());
    assert!(
        slot.starts_with(dir.path().join("data/ota/slots")),
        "{stdout}"
    );
    for (path, content) in &files {
        assert_eq!(&std::fs::read(slot.join(path)).unwrap(), content, "{path}");
    }
}

#[test]
fn a_tampered_payload_never_puts_an_unverified_byte_in_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    let (public, bundle, files) = packed(dir.path());
    let bytes = std::fs::read(&bundle).unwrap();
    let original = &files[0].1;
    // Corrupt each chunk of the big file in turn (positions inside its frames).
    let payload_start = bytes.len() - ota_payload_len(&bytes);
    for (n, at) in [
        payload_start + 100,
        payload_start + 1_200_000.min(ota_payload_len(&bytes) / 2),
        bytes.len() - 40,
    ]
    .into_iter()
    .enumerate()
    {
        let mut tampered = bytes.clone();
        tampered[at] ^= 0x20;
        let path = dir.path().join(format!("t{n}.bundle"));
        std::fs::write(&path, &tampered).unwrap();
        let data_dir = dir.path().join(format!("data-t{n}"));
        let out = install(&public, &path, &data_dir);
        assert_eq!(out.status.code(), Some(1), "tampering at {at} was accepted");
        // Refused while verifying, naming the chunk and the file (not, say, for a full disk).
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("of bin/quote-service"),
            "tampering at {at}: {stderr}"
        );
        // Whatever reached a slot is a verified prefix of the original, never altered bytes.
        for slot in slots(&data_dir) {
            if let Ok(written) = std::fs::read(slot.join("bin/quote-service")) {
                assert!(
                    original.starts_with(&written),
                    "tampering at {at}: unverified bytes in the slot"
                );
                assert_eq!(written.len() % (1 << 20), 0, "only whole verified chunks");
            }
        }
    }
}

/// The payload length from the header (bytes 20..28).
fn ota_payload_len(bundle: &[u8]) -> usize {
    u64::from_le_bytes(bundle[20..28].try_into().unwrap()) as usize
}
