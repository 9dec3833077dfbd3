//! The `ota` binary as a release engineer uses it: keygen, pack, verify, sign, inspect, and
//! what a tampered bundle looks like to them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use ota::exit;

fn ota(args: &[&str]) -> Output {
    tests::command(Path::new(env!("CARGO_BIN_EXE_ota")))
        .args(args)
        .output()
        .expect("run ota")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn release(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("bin/quote-service"), vec![0x7f; 300_000]).unwrap();
    std::fs::set_permissions(
        dir.join("bin/quote-service"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(dir.join("etc/supervisor.toml"), "replicas = 3\n").unwrap();
}

#[test]
fn keygen_pack_verify_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).display().to_string();
    let out = ota(&["keygen", "--out", &d("release")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mode = std::fs::metadata(d("release.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let again = ota(&["keygen", "--out", &d("release")]);
    assert_eq!(
        again.status.code(),
        Some(74),
        "keygen never overwrites a key"
    );

    release(&dir.path().join("rel"));
    let out = ota(&[
        "pack",
        "--key",
        &d("release.key"),
        "--version",
        "1.4.0",
        "--security-version",
        "3",
        "--level",
        "3",
        "--out",
        &d("r.bundle"),
        &d("rel"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("2 files"),
        "{}",
        text(&out.stdout)
    );

    let out = ota(&["verify", "--key", &d("release.pub"), &d("r.bundle")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("OK: quote-edge 1.4.0 (security version 3), 2 files"),
        "{}",
        text(&out.stdout)
    );

    let out = ota(&["inspect", "--json", &d("r.bundle")]);
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON");
    assert_eq!(json["version"], "1.4.0");
    assert_eq!(json["verified"], false);
    assert_eq!(json["security_version"], 3);
    assert_eq!(json["files"][0]["path"], "bin/quote-service");
    assert_eq!(json["files"][0]["mode"], "755");
}

#[test]
fn a_tampered_bundle_is_refused_with_where_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).display().to_string();
    assert!(ota(&["keygen", "--out", &d("k")]).status.success());
    release(&dir.path().join("rel"));
    assert!(
        ota(&[
            "pack",
            "--key",
            &d("k.key"),
            "--version",
            "1",
            "--level",
            "3",
            "--out",
            &d("r.bundle"),
            &d("rel")
        ])
        .status
        .success()
    );
    let mut bytes = std::fs::read(d("r.bundle")).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0xff;
    std::fs::write(d("bad.bundle"), &bytes).unwrap();
    let out = ota(&["verify", "--key", &d("k.pub"), &d("bad.bundle")]);
    assert_eq!(out.status.code(), Some(exit::REFUSED));
    let err = text(&out.stderr);
    assert!(
        err.contains("chunk 0 of etc/supervisor.toml") && err.contains("offset"),
        "{err}"
    );

    std::fs::write(
        d("garbage.bundle"),
        b"not a bundle, just some text in a file",
    )
    .unwrap();
    let out = ota(&["verify", "--key", &d("k.pub"), &d("garbage.bundle")]);
    assert_eq!(out.status.code(), Some(exit::REFUSED));
    assert!(text(&out.stderr).contains("not a quote-edge bundle"));
}

#[test]
fn two_of_three_signing() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).display().to_string();
    let keys = dir.path().join("trusted");
    std::fs::create_dir(&keys).unwrap();
    for name in ["a", "b", "c"] {
        assert!(ota(&["keygen", "--out", &d(name)]).status.success());
        std::fs::copy(d(&format!("{name}.pub")), keys.join(format!("{name}.pub"))).unwrap();
    }
    std::fs::write(keys.join("threshold"), "2\n").unwrap();
    release(&dir.path().join("rel"));
    assert!(
        ota(&[
            "pack",
            "--key",
            &d("a.key"),
            "--version",
            "2",
            "--level",
            "3",
            "--out",
            &d("r.bundle"),
            &d("rel")
        ])
        .status
        .success()
    );
    let keys = keys.display().to_string();
    let out = ota(&["verify", "--keys", &keys, &d("r.bundle")]);
    assert_eq!(out.status.code(), Some(exit::REFUSED));
    assert!(
        text(&out.stderr).contains("signed by 1 of the trusted keys, 2 needed"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        ota(&["sign", "--key", &d("c.key"), &d("r.bundle")])
            .status
            .success()
    );
    let out = ota(&["verify", "--keys", &keys, &d("r.bundle")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// `ota rollout`: a plan names the bundle by its manifest digest and carries the waves and
/// gates; it verifies against the release keys (two of two here, the second signature added
/// with `sign-doc`), and a bad wave list is a usage error naming the field.
#[test]
fn a_rollout_plan_names_its_bundle_and_needs_the_release_keys() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).display().to_string();
    for name in ["a", "b"] {
        assert!(ota(&["keygen", "--out", &d(name)]).status.success());
    }
    release(&dir.path().join("rel"));
    let packed = ota(&[
        "pack",
        "--key",
        &d("a.key"),
        "--version",
        "2.0.0",
        "--security-version",
        "1",
        "--level",
        "3",
        "--out",
        &d("r.bundle"),
        &d("rel"),
    ]);
    assert!(packed.status.success(), "{}", text(&packed.stderr));
    let plan = |waves: &str| {
        ota(&[
            "rollout",
            "--key",
            &d("a.key"),
            "--bundle",
            &d("r.bundle"),
            "--waves",
            waves,
            "--success-threshold",
            "90",
            "--error-threshold",
            "10",
            "--out",
            &d("r.plan"),
        ])
    };
    let bad = plan("1,10%,50%");
    assert_eq!(bad.status.code(), Some(exit::USAGE));
    assert!(
        text(&bad.stderr).contains("`waves`: the last wave must be 100%"),
        "{}",
        text(&bad.stderr)
    );
    let made = plan("1,25%,100%");
    assert!(made.status.success(), "{}", text(&made.stderr));
    assert!(
        text(&made.stdout).contains("rollout signed by 1 key(s)"),
        "{}",
        text(&made.stdout)
    );

    let bytes = std::fs::read(d("r.plan")).unwrap();
    let keys = |names: &[&str]| {
        ota_bundle::TrustedKeys::new(
            names.iter().map(|n| {
                ota_bundle::PublicKey::load(&dir.path().join(format!("{n}.pub"))).unwrap()
            }),
            names.len(),
        )
    };
    let digest = ota_bundle::read_manifest_and_digest_unverified(std::io::BufReader::new(
        std::fs::File::open(d("r.bundle")).unwrap(),
    ))
    .unwrap()
    .2;
    let plan = ota_bundle::Plan::verify(&bytes, &keys(&["a"]), "quote-edge").unwrap();
    assert_eq!(plan.bundle, digest);
    assert_eq!(plan.version, "2.0.0");
    assert_eq!(plan.cover(20), [1, 5, 20]);
    // Two of two: refused until b signs too.
    assert!(ota_bundle::Plan::verify(&bytes, &keys(&["a", "b"]), "quote-edge").is_err());
    let signed = ota(&["sign-doc", "--key", &d("b.key"), &d("r.plan")]);
    assert!(signed.status.success(), "{}", text(&signed.stderr));
    let bytes = std::fs::read(d("r.plan")).unwrap();
    assert!(ota_bundle::Plan::verify(&bytes, &keys(&["a", "b"]), "quote-edge").is_ok());
}
