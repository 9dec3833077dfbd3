//! `image/build.sh`'s refusals that need no root, no packages and no image: which OTA keys an
//! image may trust. They run before any other check, so each case ends at its own message.

use std::path::{Path, PathBuf};
use std::process::Output;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `image/build.sh VARIANT` with only the key variables given; binaries pointed at a
/// directory that does not exist, so a run past the key checks stops at once (as root too).
fn build(variant: &str, env: &[(&str, &Path)]) -> Output {
    let mut command = std::process::Command::new("bash");
    command
        .arg(repo().join("image/build.sh"))
        .arg(variant)
        .env_remove("QUOTE_EDGE_TRUSTED_KEYS")
        .env_remove("QUOTE_EDGE_DEV_KEYS")
        .env("QUOTE_EDGE_BIN_DIR", "/nonexistent/quote-edge-bins");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

fn refused(out: &Output, says: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(says), "expected {says:?} in: {stderr}");
}

/// Past the key checks: stopped by one of the checks after them (not root, a missing
/// package, the missing binaries).
fn past_the_keys(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        [
            "must run as root",
            "missing Debian packages",
            "/nonexistent/quote-edge-bins"
        ]
        .iter()
        .any(|later| stderr.contains(later)),
        "{stderr}"
    );
    assert!(
        !stderr.contains("OTA key") && !stderr.contains("test key"),
        "{stderr}"
    );
}

#[test]
fn the_pi_image_needs_release_keys_and_never_takes_the_test_key() {
    refused(&build("rpi", &[]), "no trusted OTA key for the Pi image");
    let test_key = repo().join("ota/keys/test-signing.pub");
    let one = Path::new("1");
    let with_test_key = build(
        "rpi",
        &[
            ("QUOTE_EDGE_TRUSTED_KEYS", &test_key),
            ("QUOTE_EDGE_DEV_KEYS", one),
        ],
    );
    refused(&with_test_key, "a Pi image never trusts it");
    // The same key under another name is still the test key.
    let dir = tempfile::tempdir().unwrap();
    let renamed = dir.path().join("vendor.pub");
    std::fs::copy(&test_key, &renamed).unwrap();
    refused(
        &build("rpi", &[("QUOTE_EDGE_TRUSTED_KEYS", &renamed)]),
        "is the repository's test key",
    );
    let release = dir.path().join("release.pub");
    let key = ota_bundle::SecretKey::from_seed([42; 32]);
    std::fs::write(&release, key.public().to_line("release")).unwrap();
    past_the_keys(&build("rpi", &[("QUOTE_EDGE_TRUSTED_KEYS", &release)]));
}

#[test]
fn the_qemu_image_takes_the_test_key_only_when_asked() {
    refused(&build("qemu", &[]), "or set QUOTE_EDGE_DEV_KEYS=1");
    let test_key = repo().join("ota/keys/test-signing.pub");
    refused(
        &build("qemu", &[("QUOTE_EDGE_TRUSTED_KEYS", &test_key)]),
        "set QUOTE_EDGE_DEV_KEYS=1 to build a development image",
    );
    past_the_keys(&build("qemu", &[("QUOTE_EDGE_DEV_KEYS", Path::new("1"))]));
}

/// The device mounts only FAT and exFAT sticks, with their type given: checked on the rule's
/// text (udev itself runs only in the QEMU checks, whose stick is FAT).
#[test]
fn only_fat_and_exfat_sticks_are_mounted_and_never_probed() {
    let rule = std::fs::read_to_string(
        repo().join("image/overlay/etc/udev/rules.d/80-quote-edge-usb.rules"),
    )
    .unwrap();
    let rule: String = rule
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join(" ");
    assert!(rule.contains(r#"ENV{ID_FS_TYPE}=="vfat|exfat""#), "{rule}");
    assert!(rule.contains("--type=$env{ID_FS_TYPE}"), "{rule}");
    assert!(rule.contains("--options=ro,nodev,nosuid,noexec"), "{rule}");
}

/// The supervisor's unit is sandboxed: `systemd-analyze security` (offline, on the unit file as
/// shipped) rates it at most 2.5 ("OK"), with one capability kept. The QEMU check `sandbox`
/// reads the same rating inside the guest, with the service running in it.
#[test]
fn the_supervisor_unit_is_sandboxed_to_an_exposure_of_at_most_2_5() {
    let unit = repo().join("image/overlay/etc/systemd/system/edge-supervisor.service");
    let Ok(out) = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
    else {
        return tests::skip("systemd-analyze (package systemd) is not installed");
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for edge-supervisor.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in: {text}"));
    assert!(exposure <= 2.5, "exposure {exposure}, aim <= 2.5:\n{text}");
    let unit = std::fs::read_to_string(&unit).unwrap();
    let caps = "CAP_SETUID CAP_SETGID CAP_KILL CAP_SYS_ADMIN";
    for line in [
        "User=quote-edge".to_owned(),
        format!("CapabilityBoundingSet={caps}"),
        format!("AmbientCapabilities={caps}"),
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit has no {line}");
    }
}

/// The image's users, their directories and the stick's owner agree: sysusers.d makes
/// quote-edge (950) and quote-replica (951); the unit runs as quote-edge; tmpfiles.d gives the
/// data directory to quote-edge and db/ to quote-replica; the USB rule mounts sticks for uid
/// 950; the device configurations run the replicas as quote-replica with their tool writing in
/// db/ (checked by edge-supervisor's config tests).
#[test]
fn the_image_users_directories_and_stick_owner_agree() {
    let read = |p: &str| std::fs::read_to_string(repo().join(p)).unwrap();
    let passwd = tests::image_passwd();
    assert!(passwd.contains("quote-edge:x:950:950:"), "{passwd}");
    assert!(passwd.contains("quote-replica:x:951:951:"), "{passwd}");
    let tmpfiles = read("image/overlay/usr/lib/tmpfiles.d/quote-edge.conf");
    let owners: Vec<(&str, &str, &str)> = tmpfiles
        .lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            ["d", path, mode, user, _group, ..] => Some((path, mode, user)),
            _ => None,
        })
        .collect();
    assert_eq!(
        owners,
        [
            ("/var/lib/quote-edge", "0711", "quote-edge"),
            ("/var/lib/quote-edge/db", "0711", "quote-replica"),
        ]
    );
    let rule = read("image/overlay/etc/udev/rules.d/80-quote-edge-usb.rules");
    assert!(rule.contains(",uid=950,gid=950,"), "{rule}");
    let unit = read("image/overlay/etc/systemd/system/edge-supervisor.service");
    assert!(
        !unit.lines().any(|l| l.starts_with("StateDirectory")),
        "StateDirectory= would chown db/ to the supervisor"
    );
}

/// The first boot's admin token (image/overlay/usr/lib/quote-edge/admin-token): 64 hex digits
/// from the random pool, readable by its owner and the replicas' group only, shown on the
/// console once, and kept
/// (never replaced) on later boots.
#[test]
fn the_admin_token_is_made_once_private_and_shown_only_at_first_boot() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("quote-edge");
    // The image's quote-replica group is not this machine's: Debian's nogroup (65534) stands in.
    let run = || {
        let out = std::process::Command::new("sh")
            .arg(repo().join("image/overlay/usr/lib/quote-edge/admin-token"))
            .env("QUOTE_EDGE_DATA", &dir)
            .env("QUOTE_EDGE_REPLICA_GROUP", "nogroup")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let first = run();
    let token = std::fs::read_to_string(dir.join("admin-token")).unwrap();
    assert_eq!(token.len(), 64, "{token:?}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token:?}");
    assert!(first.contains(&token), "the first boot shows it: {first}");
    let meta = std::fs::metadata(dir.join("admin-token")).unwrap();
    let mode = meta.permissions().mode();
    // The owner (root) reads and writes it, the replicas' group reads it, no one else.
    assert_eq!(mode & 0o777, 0o640, "{mode:o}");
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), 65534);
    assert!(!dir.join("admin-token.new").exists());

    let second = run();
    assert!(
        !second.contains(&token),
        "a later boot does not show it: {second}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("admin-token")).unwrap(),
        token
    );
}
