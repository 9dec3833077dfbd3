//! Bundles built and attacked: every byte flipped, every truncation, wrong keys, thresholds,
//! hostile manifests signed by a trusted key (bombs, traversal), and non-files in a release.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use crate::header::HEADER_LEN;
use crate::manifest::Chunk;
use crate::pack::assemble;
use crate::{
    Bundle, BundleError, Chunked, ChunksError, FileEntry, Manifest, PackOptions, SecretKey,
    TrustedKeys, add_signature, pack, signed_message,
};

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

fn trusting(keys: &[&SecretKey], threshold: usize) -> TrustedKeys {
    TrustedKeys::new(keys.iter().map(|k| k.public()), threshold)
}

fn options() -> PackOptions {
    PackOptions {
        product: "quote-edge".into(),
        version: "1.2.3".into(),
        security_version: 7,
        issued_at: 1_764_288_000,
        level: 3,
    }
}

/// A small release: a binary-like file over several chunks, text, an empty file, a nested path.
fn release() -> (tempfile::TempDir, BTreeMap<String, Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let mut files = BTreeMap::new();
    let mut big = Vec::with_capacity(1_300_000);
    let mut x: u32 = 12345;
    for i in 0..1_300_000u32 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        big.push(if i % 3 == 0 {
            (x >> 16) as u8
        } else {
            b'a' + (i % 7) as u8
        });
    }
    files.insert("bin/quote-service".to_owned(), big);
    files.insert(
        "etc/quote-edge/supervisor.toml".to_owned(),
        b"replicas = 3\n".to_vec(),
    );
    files.insert("migrations/empty".to_owned(), Vec::new());
    for (path, content) in &files {
        let full = dir.path().join(path);
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(&full, content).unwrap();
    }
    std::fs::set_permissions(
        dir.path().join("bin/quote-service"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    (dir, files)
}

fn packed() -> (tempfile::TempDir, PathBuf, BTreeMap<String, Vec<u8>>) {
    let (src, files) = release();
    let out = src.path().join("out.bundle");
    let release_dir = src.path().join("release");
    std::fs::create_dir(&release_dir).unwrap();
    for dir in ["bin", "etc", "migrations"] {
        std::fs::rename(src.path().join(dir), release_dir.join(dir)).unwrap();
    }
    pack(&release_dir, &out, &options(), &key(1), |_, _| {}).unwrap();
    (src, out, files)
}

/// Unpacks into memory; the sink asserts that every chunk it is given is what was packed.
fn unpack(
    bytes: &[u8],
    trusted: &TrustedKeys,
    original: &BTreeMap<String, Vec<u8>>,
) -> Result<BTreeMap<String, Vec<u8>>, BundleError> {
    let bundle = Bundle::open(bytes, trusted)?;
    let mut out: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for f in &bundle.manifest.files {
        out.insert(f.path.clone(), Vec::new());
    }
    let result = bundle.chunks(|file: &FileEntry, index, chunk| {
        let Chunked::Data(data) = chunk else {
            panic!("no copy chunks in a full bundle")
        };
        let start = index * crate::CHUNK_SIZE as usize;
        let expected = &original[&file.path][start..start + data.len()];
        assert_eq!(
            data, expected,
            "an unverified byte reached the sink ({} chunk {index})",
            file.path
        );
        out.get_mut(&file.path).unwrap().extend_from_slice(data);
        Ok::<(), ()>(())
    });
    match result {
        Ok(()) => Ok(out),
        Err(ChunksError::Bundle(e)) => Err(e),
        Err(ChunksError::Sink(())) => unreachable!(),
    }
}

#[test]
fn a_packed_release_unpacks_to_the_same_files() {
    let (_dir, out, files) = packed();
    let bytes = std::fs::read(&out).unwrap();
    let got = unpack(&bytes, &trusting(&[&key(1)], 1), &files).unwrap();
    assert_eq!(got, files);
    let bundle = Bundle::open(&bytes[..], &trusting(&[&key(1)], 1)).unwrap();
    let m = &bundle.manifest;
    assert_eq!((m.version.as_str(), m.security_version), ("1.2.3", 7));
    assert_eq!(
        m.files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        [
            "bin/quote-service",
            "etc/quote-edge/supervisor.toml",
            "migrations/empty"
        ]
    );
    assert_eq!(m.files[0].mode, 0o755);
    assert_eq!(m.files[0].chunks.len(), 2);
}

#[test]
fn every_flipped_byte_is_refused_before_any_unverified_byte_is_used() {
    let (_dir, out, files) = packed();
    let bytes = std::fs::read(&out).unwrap();
    let trusted = trusting(&[&key(1)], 1);
    // Every byte of the header and the signature, a stride through the manifest (all of it
    // fails the same signature check) and the payload, and the last byte.
    let header = Bundle::open(&bytes[..], &trusted).unwrap().header;
    let manifest_end = HEADER_LEN + header.manifest_len as usize;
    let payload_start = header.payload_offset() as usize;
    let positions = (0..HEADER_LEN)
        .chain((HEADER_LEN..manifest_end).step_by(7))
        .chain(manifest_end..payload_start)
        .chain((payload_start..bytes.len()).step_by(1021))
        .chain([bytes.len() - 1]);
    for at in positions {
        let mut tampered = bytes.clone();
        tampered[at] ^= 0x01;
        assert!(
            unpack(&tampered, &trusted, &files).is_err(),
            "flipping byte {at} was not noticed"
        );
    }
}

#[test]
fn every_truncation_is_refused_and_says_where() {
    let (_dir, out, files) = packed();
    let bytes = std::fs::read(&out).unwrap();
    let trusted = trusting(&[&key(1)], 1);
    for len in (0..bytes.len())
        .step_by(4099)
        .chain([HEADER_LEN - 1, HEADER_LEN, bytes.len() - 1])
    {
        let err = unpack(&bytes[..len], &trusted, &files).unwrap_err();
        assert!(
            matches!(err, BundleError::Truncated { .. }),
            "cut at {len}: {err}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        unpack(&longer, &trusted, &files).unwrap_err(),
        BundleError::TrailingData { .. }
    ));
}

#[test]
fn an_unknown_key_is_refused_with_both_key_lists() {
    let (_dir, out, files) = packed();
    let bytes = std::fs::read(&out).unwrap();
    let err = unpack(&bytes, &trusting(&[&key(2)], 1), &files).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            BundleError::NotEnoughSignatures {
                valid: 0,
                needed: 1,
                ..
            }
        ),
        "{text}"
    );
    assert!(
        text.contains(&key(1).public().id().to_string())
            && text.contains(&key(2).public().id().to_string()),
        "{text}"
    );
}

#[test]
fn k_of_n_signing_meets_a_threshold() {
    let (_dir, out, files) = packed();
    let trusted = trusting(&[&key(1), &key(2), &key(3)], 2);
    let bytes = std::fs::read(&out).unwrap();
    assert!(matches!(
        unpack(&bytes, &trusted, &files).unwrap_err(),
        BundleError::NotEnoughSignatures {
            valid: 1,
            needed: 2,
            ..
        }
    ));
    assert_eq!(add_signature(&out, &key(3)).unwrap(), 2);
    assert!(add_signature(&out, &key(3)).is_err(), "the same key twice");
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(unpack(&bytes, &trusted, &files).unwrap(), files);
}

#[test]
fn garbage_is_not_a_bundle() {
    let trusted = trusting(&[&key(1)], 1);
    let err = Bundle::open(
        &b"PK\x03\x04 this is a zip file, not a bundle at all"[..],
        &trusted,
    )
    .unwrap_err();
    assert!(matches!(err, BundleError::BadMagic), "{err}");
    let err = Bundle::open(&b""[..], &trusted).unwrap_err();
    assert!(
        matches!(err, BundleError::Truncated { what: "header", .. }),
        "{err}"
    );
}

/// Signs an arbitrary manifest with a *trusted* key: what a compromised or buggy build host
/// could produce. The reader must still refuse it.
fn hostile(manifest: &Manifest, payload: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hostile.bundle");
    let bytes = manifest.to_canonical();
    let signature = (key(1).public().id(), key(1).sign(&signed_message(&bytes)));
    assemble(
        &out,
        &bytes,
        &[signature],
        payload.len() as u64,
        &mut &payload[..],
    )
    .unwrap();
    std::fs::read(out).unwrap()
}

fn one_file_manifest(path: &str, data: &[u8], frame: &[u8], size: u64) -> Manifest {
    Manifest {
        format: 1,
        product: "quote-edge".into(),
        version: "6.6.6".into(),
        security_version: 1,
        issued_at: 0,
        hash: "blake3".into(),
        chunk_size: crate::CHUNK_SIZE,
        base: None,
        files: vec![FileEntry {
            path: path.into(),
            mode: 0o644,
            size,
            digest: blake3::hash(data).to_hex().to_string(),
            chunks: vec![Chunk {
                hash: blake3::hash(data).to_hex().to_string(),
                size,
                csize: Some(frame.len() as u64),
                copy: false,
            }],
        }],
    }
}

#[test]
fn a_decompression_bomb_is_stopped_at_its_declared_size() {
    let big = vec![0u8; crate::CHUNK_SIZE as usize];
    let frame = zstd::bulk::compress(&big, 19).unwrap();
    assert!(
        frame.len() < 200,
        "a megabyte of zeros compresses to {} bytes",
        frame.len()
    );
    // It claims to be 100 bytes.
    let manifest = one_file_manifest("bin/bomb", &big[..100], &frame, 100);
    let bytes = hostile(&manifest, &frame);
    let err = unpack(&bytes, &trusting(&[&key(1)], 1), &BTreeMap::new()).unwrap_err();
    assert!(matches!(err, BundleError::Chunk { index: 0, .. }), "{err}");
    assert!(err.to_string().contains("bin/bomb"), "{err}");
}

#[test]
fn paths_that_leave_the_release_are_refused_even_when_signed() {
    let data = b"root::0:0::/root:/bin/sh\n";
    let frame = zstd::bulk::compress(data, 3).unwrap();
    for path in [
        "../etc/passwd",
        "/etc/passwd",
        "bin/../../x",
        "bin/./x",
        "bin//x",
        "bin\\x",
        "",
    ] {
        let manifest = one_file_manifest(path, data, &frame, data.len() as u64);
        let bytes = hostile(&manifest, &frame);
        let err = Bundle::open(&bytes[..], &trusting(&[&key(1)], 1)).unwrap_err();
        assert!(matches!(err, BundleError::Field { .. }), "{path:?}: {err}");
    }
}

#[test]
fn setuid_modes_and_false_sizes_are_refused_even_when_signed() {
    let data = b"#!/bin/sh\n";
    let frame = zstd::bulk::compress(data, 3).unwrap();
    let mut setuid = one_file_manifest("bin/x", data, &frame, data.len() as u64);
    setuid.files[0].mode = 0o4755;
    let mut wrong_total = one_file_manifest("bin/x", data, &frame, data.len() as u64);
    wrong_total.files[0].size += 1;
    for manifest in [setuid, wrong_total] {
        let err =
            Bundle::open(&hostile(&manifest, &frame)[..], &trusting(&[&key(1)], 1)).unwrap_err();
        assert!(matches!(err, BundleError::Field { .. }), "{err}");
    }
}

#[test]
fn a_non_canonical_manifest_is_refused() {
    let data = b"x";
    let frame = zstd::bulk::compress(data, 3).unwrap();
    let manifest = one_file_manifest("bin/x", data, &frame, 1);
    let pretty = serde_json::to_vec_pretty(&manifest).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pretty.bundle");
    let signature = (key(1).public().id(), key(1).sign(&signed_message(&pretty)));
    assemble(
        &out,
        &pretty,
        &[signature],
        frame.len() as u64,
        &mut &frame[..],
    )
    .unwrap();
    let err =
        Bundle::open(&std::fs::read(&out).unwrap()[..], &trusting(&[&key(1)], 1)).unwrap_err();
    assert!(matches!(err, BundleError::NotCanonical), "{err}");
}

#[test]
fn links_and_devices_in_a_release_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("bin")).unwrap();
    std::fs::write(dir.path().join("bin/real"), b"x").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", dir.path().join("bin/link")).unwrap();
    let err = pack(
        dir.path(),
        &dir.path().join("../x.bundle"),
        &options(),
        &key(1),
        |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    let fifo_dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mkfifo")
        .arg(fifo_dir.path().join("pipe"))
        .status()
        .unwrap();
    assert!(status.success());
    let err = pack(
        fifo_dir.path(),
        Path::new("/tmp/never.bundle"),
        &options(),
        &key(1),
        |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("FIFO"), "{err}");
}

#[test]
fn keys_round_trip_through_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let secret = key(9);
    std::fs::write(dir.path().join("k.key"), secret.to_line()).unwrap();
    std::fs::write(dir.path().join("k.pub"), secret.public().to_line("test")).unwrap();
    assert_eq!(
        SecretKey::load(&dir.path().join("k.key")).unwrap().public(),
        secret.public()
    );
    let trusted = TrustedKeys::load_dir(dir.path()).unwrap();
    assert_eq!(trusted.threshold(), 1);
    std::fs::write(dir.path().join("threshold"), "2\n").unwrap();
    let err = TrustedKeys::load_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("threshold"), "{err}");
    std::fs::write(dir.path().join("bad.pub"), "quote-edge-ed25519 zz\n").unwrap();
    assert!(
        TrustedKeys::load_dir(dir.path())
            .unwrap_err()
            .to_string()
            .contains("bad.pub")
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any bytes at all: the reader returns an error or a verified bundle, never panics, and
    /// never allocates more than the header allows.
    #[test]
    fn arbitrary_bytes_never_panic_the_reader(bytes in proptest::collection::vec(any::<u8>(), 0..2048), magic in any::<bool>()) {
        let mut bytes = bytes;
        if magic && bytes.len() >= 8 {
            bytes[..8].copy_from_slice(crate::MAGIC);
            if bytes.len() >= 10 { bytes[8] = 1; bytes[9] = 0; }
        }
        let _ = Bundle::open(&bytes[..], &trusting(&[&key(1)], 1));
    }

    #[test]
    fn arbitrary_manifests_never_panic_validation(json in "\\PC{0,400}") {
        let _ = Manifest::parse_canonical(json.as_bytes());
    }
}

#[test]
fn the_committed_sample_manifest_and_test_keys_are_valid() {
    let sample: Manifest =
        serde_json::from_str(include_str!("../../../ota/samples/manifest.json")).unwrap();
    sample.validate().unwrap();
    let keys = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ota/keys");
    let secret = SecretKey::load(&keys.join("test-signing.key")).unwrap();
    let public = crate::PublicKey::load(&keys.join("test-signing.pub")).unwrap();
    assert_eq!(secret.public(), public);
}

#[test]
fn resuming_from_any_position_a_walk_handed_out_gives_the_rest_of_the_same_chunks() {
    let (_dir, path, _) = packed();
    let bytes = std::fs::read(&path).unwrap();
    let trusted = trusting(&[&key(1)], 1);
    let mut walk = Vec::new();
    Bundle::open(&bytes[..], &trusted)
        .unwrap()
        .chunks_from(
            Bundle::open(&bytes[..], &trusted).unwrap().start(),
            &[],
            |file, index, chunk, next| {
                let data = match chunk {
                    Chunked::Data(b) => b.to_vec(),
                    Chunked::Copy { .. } => Vec::new(),
                };
                walk.push((file.path.clone(), index, data, next));
                Ok::<(), ()>(())
            },
        )
        .unwrap();
    assert!(walk.len() >= 3, "several chunks to resume between");
    let mut prefixed = 0;
    for cut in 0..walk.len() {
        let from = walk[cut].3;
        // The installer reads back the chunk before the position from the slot.
        let before = &walk[cut].2;
        let bundle = Bundle::open(&bytes[..], &trusted).unwrap();
        if let Some(file) = bundle.manifest.files.get(from.file)
            && bundle.manifest.prefixed(file, from.chunk)
        {
            prefixed += 1;
            let mut wrong = before.clone();
            wrong[0] ^= 1;
            let error = bundle
                .chunks_from(from, &wrong, |_, _, _, _| Ok::<(), ()>(()))
                .unwrap_err();
            let ChunksError::Bundle(error) = error else {
                panic!("{error:?}")
            };
            assert!(error.to_string().contains("resume prefix"), "{error}");
        }
        let mut rest = Vec::new();
        Bundle::open(&bytes[..], &trusted)
            .unwrap()
            .chunks_from(from, before, |file, index, chunk, _| {
                let Chunked::Data(b) = chunk else { panic!() };
                rest.push((file.path.clone(), index, b.to_vec()));
                Ok::<(), ()>(())
            })
            .unwrap();
        let expected: Vec<_> = walk[cut + 1..]
            .iter()
            .map(|(p, i, d, _)| (p.clone(), *i, d.clone()))
            .collect();
        assert_eq!(rest, expected, "resumed after chunk {cut}");
    }
    assert!(prefixed >= 1, "a resume that needs the chunk before it");
    let mut bogus = walk[0].3;
    bogus.offset += 1;
    let error = Bundle::open(&bytes[..], &trusted)
        .unwrap()
        .chunks_from(bogus, &[], |_, _, _, _| Ok::<(), ()>(()))
        .unwrap_err();
    let ChunksError::Bundle(error) = error else {
        panic!("{error:?}")
    };
    assert!(error.to_string().contains("resume position"), "{error}");
}

#[test]
fn a_walk_continued_on_a_reader_from_the_resume_offset_reads_nothing_before_it() {
    let (_dir, path, _) = packed();
    let bytes = std::fs::read(&path).unwrap();
    let trusted = trusting(&[&key(1)], 1);
    let mut positions = Vec::new();
    Bundle::open(&bytes[..], &trusted)
        .unwrap()
        .chunks(|_, _, _| Ok::<(), ()>(()))
        .unwrap();
    let bundle = Bundle::open(&bytes[..], &trusted).unwrap();
    let start = bundle.start();
    bundle
        .chunks_from(start, &[], |_, _, chunk, next| {
            let data = match chunk {
                Chunked::Data(b) => b.to_vec(),
                Chunked::Copy { .. } => Vec::new(),
            };
            positions.push((next, data));
            Ok::<(), ()>(())
        })
        .unwrap();
    for (i, (from, before)) in positions.iter().enumerate() {
        // The head from one connection, the rest from another that starts at the offset: the
        // bytes before it are not there to read.
        let head = Bundle::open(&bytes[..], &trusted).unwrap();
        let tail = &bytes[from.offset as usize..];
        let mut count = 0;
        head.continue_at(tail, from.offset)
            .unwrap()
            .chunks_from(*from, before, |_, _, _, _| {
                count += 1;
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(count, positions.len() - i - 1);
    }
    // A reader positioned after the resume point, or outside the payload, is refused.
    let (second, _) = &positions[1];
    let (first, _) = &positions[0];
    let error = Bundle::open(&bytes[..], &trusted)
        .unwrap()
        .continue_at(&bytes[second.offset as usize..], second.offset)
        .unwrap()
        .chunks_from(*first, &[], |_, _, _, _| Ok::<(), ()>(()))
        .unwrap_err();
    let ChunksError::Bundle(error) = error else {
        panic!("{error:?}")
    };
    assert!(error.to_string().contains("behind the reader"), "{error}");
    let len = bytes.len() as u64;
    assert!(
        Bundle::open(&bytes[..], &trusted)
            .unwrap()
            .continue_at(&[][..], len + 1)
            .is_err()
    );
    assert!(
        Bundle::open(&bytes[..], &trusted)
            .unwrap()
            .continue_at(&bytes[..], 3)
            .is_err()
    );
}

/// A release of one file of `chunks` chunks (the last one short), where chunk `i` is
/// compressible text seeded by `seed(i)`, and a small second file.
fn chunked_release(dir: &Path, chunks: usize, seed: impl Fn(usize) -> u32) {
    let mut data = Vec::new();
    for i in 0..chunks {
        let len = if i + 1 == chunks {
            1000
        } else {
            crate::CHUNK_SIZE as usize
        };
        let mut x = seed(i);
        data.extend((0..len).map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            b'a' + ((x >> 16) % 13) as u8
        }));
    }
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(dir.join("bin/big"), data).unwrap();
    std::fs::write(dir.join("bin/small"), b"small").unwrap();
}

#[test]
fn bundles_are_the_same_bytes_whatever_the_number_of_compression_threads() {
    let dir = tempfile::tempdir().unwrap();
    let (base_dir, new_dir) = (dir.path().join("base"), dir.path().join("new"));
    // Chunks 3 and 7 are the base's (carried as copies, which break the chain of prefixes);
    // the others are new.
    chunked_release(&base_dir, 11, |i| i as u32);
    chunked_release(&new_dir, 11, |i| {
        if i == 3 || i == 7 {
            i as u32
        } else {
            1000 + i as u32
        }
    });
    let base_bundle = dir.path().join("base.bundle");
    pack(&base_dir, &base_bundle, &options(), &key(1), |_, _| {}).unwrap();
    let base = Bundle::open(
        std::fs::read(&base_bundle).unwrap().as_slice(),
        &trusting(&[&key(1)], 1),
    )
    .unwrap()
    .manifest;
    for delta in [None, Some(&base)] {
        let packed: Vec<Vec<u8>> = [1, 2, 3, 8]
            .into_iter()
            .map(|threads| {
                let out = dir.path().join(format!("{threads}.bundle"));
                crate::pack::pack_against(
                    &new_dir,
                    &out,
                    &options(),
                    &key(1),
                    delta,
                    threads,
                    |_, _| {},
                )
                .unwrap();
                std::fs::read(out).unwrap()
            })
            .collect();
        assert!(
            packed.iter().all(|b| *b == packed[0]),
            "threads change the bundle (delta: {})",
            delta.is_some()
        );
        let bundle = Bundle::open(packed[0].as_slice(), &trusting(&[&key(1)], 1)).unwrap();
        let copies = bundle
            .manifest
            .files
            .iter()
            .flat_map(|f| &f.chunks)
            .filter(|c| c.copy)
            .count();
        // In the delta: chunks 3 and 7 of bin/big, and bin/small (unchanged).
        assert_eq!(copies, if delta.is_some() { 3 } else { 0 });
        // Every carried chunk decompresses (with its prefix) and hashes right.
        let mut seen = 0;
        bundle
            .chunks(|_: &FileEntry, _, chunk| {
                if let Chunked::Data(_) = chunk {
                    seen += 1;
                }
                Ok::<(), ()>(())
            })
            .unwrap();
        assert_eq!(seen, 12 - copies);
    }
}
