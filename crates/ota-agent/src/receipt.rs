//! Install receipts: a small signed JSON document per finished update (committed, rolled back
//! or refused), kept on the device and written back beside the bundle (on a read-only stick,
//! remounted read-write for that one write when configured), so that an offline fleet carries
//! its audit trail home on the USB stick.
//!
//! The device signs with its own Ed25519 key (`<data_dir>/ota/device.key`, made on first use,
//! mode 0600); the device id is that key's id, so a receipt names and authenticates its device.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ota_bundle::SecretKey;
use serde::Serialize;

/// What one receipt says.
#[derive(Debug, Clone, Serialize)]
pub struct Receipt {
    /// Filled in by [`write`]: the device key's id.
    pub device: String,
    pub from: String,
    pub to: String,
    /// `committed`, `rolled_back` or `refused`.
    pub result: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub bundle: Option<String>,
    /// Unix seconds (the device clock, for reading, not for trust).
    pub started_at: u64,
    pub finished_at: u64,
    /// Bytes of an interrupted install found intact and kept (it resumed, not restarted).
    pub resumed_bytes: u64,
    /// Bytes the target slot already held from its older release: compared, not rewritten.
    pub unchanged_bytes: u64,
}

#[derive(Debug, Serialize)]
struct Signed<'a> {
    receipt: &'a Receipt,
    /// Hex Ed25519 public key of the device.
    key: String,
    /// Hex signature over "quote-edge receipt v1\n" followed by the `receipt` JSON.
    signature: String,
}

/// Domain-separates receipt signatures from bundle signatures.
pub const RECEIPT_DOMAIN: &[u8] = b"quote-edge receipt v1\n";

#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("device key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("cannot write the receipt {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn device_key(path: &Path) -> Result<SecretKey, ReceiptError> {
    let key_error = |reason: String| ReceiptError::Key {
        path: path.to_owned(),
        reason,
    };
    if path.exists() {
        return SecretKey::load(path).map_err(|e| key_error(e.to_string()));
    }
    let key = SecretKey::generate().map_err(|e| key_error(e.to_string()))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| key_error(e.to_string()))?;
    file.write_all(key.to_line().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| key_error(e.to_string()))?;
    Ok(key)
}

/// This device's id: its device key's id (16 hex digits), the key made on first use.
pub fn device_id(key_path: &Path) -> Result<String, ReceiptError> {
    Ok(device_key(key_path)?.public().id().to_string())
}

/// Signs `receipt` and writes it into each of `dirs` (created if missing); the first
/// directory must work, the others (a stick) are tried and logged, and never through a link.
/// A read-only mount holding one of the others is remounted read-write for the write and
/// read-only again right after, but only a mount strictly below one of `remount_under` (the
/// inbox directories where sticks are mounted; empty: never).
pub fn write(
    key_path: &Path,
    mut receipt: Receipt,
    dirs: &[PathBuf],
    remount_under: &[PathBuf],
) -> Result<(), ReceiptError> {
    let key = device_key(key_path)?;
    let public = key.public();
    receipt.device = public.id().to_string();
    let body = serde_json::to_vec(&receipt).expect("a receipt serialises");
    let mut message = RECEIPT_DOMAIN.to_vec();
    message.extend_from_slice(&body);
    let signed = Signed {
        receipt: &receipt,
        key: public
            .to_line("")
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned(),
        signature: hex::encode(key.sign(&message)),
    };
    let text = serde_json::to_string_pretty(&signed).expect("a receipt serialises") + "\n";
    let stem = format!(
        "{}-{}-{}",
        receipt.finished_at, receipt.device, receipt.result
    );
    // Never over an earlier receipt: two updates can end within the same second.
    let write_one = |dir: &Path| -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        for n in 0u32.. {
            let path = match n {
                0 => dir.join(format!("{stem}.json")),
                n => dir.join(format!("{stem}-{n}.json")),
            };
            let mut file = match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => continue,
                other => other?,
            };
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            return Ok(path);
        }
        unreachable!("the loop returns or fails by n = 1000")
    };
    for (i, dir) in dirs.iter().enumerate() {
        // A stick is anyone's: its `receipts` (or the bundle's directory) may be a link to
        // anywhere on the device.
        if i > 0
            && dir.ancestors().take(2).any(|d| {
                d.symlink_metadata()
                    .is_ok_and(|m| m.file_type().is_symlink())
            })
        {
            tracing::warn!(dir = %dir.display(), "receipt not copied: the directory is a link");
            continue;
        }
        let mut result = write_one(dir);
        if i > 0
            && !remount_under.is_empty()
            && matches!(&result, Err(e) if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem)
        {
            result = with_writable_mount(dir, remount_under, || write_one(dir));
        }
        match result {
            Ok(path) => tracing::info!(receipt = %path.display(), "install receipt written"),
            Err(source) if i == 0 => {
                return Err(ReceiptError::Write {
                    path: dir.join(format!("{stem}.json")),
                    source,
                });
            }
            Err(error) => {
                tracing::info!(dir = %dir.display(), %error, "receipt not copied next to the bundle")
            }
        }
    }
    Ok(())
}

/// Runs `f` with the mount holding `dir` remounted read-write, and remounts it read-only
/// afterwards whatever `f` did; refuses unless that mount point lies strictly below one of
/// `under`. util-linux's `mount` does the remount (the image has it; the supervisor runs as
/// root there).
fn with_writable_mount<T>(
    dir: &Path,
    under: &[PathBuf],
    f: impl FnOnce() -> std::io::Result<T>,
) -> std::io::Result<T> {
    let existing = dir.ancestors().find(|d| d.exists()).unwrap_or(dir);
    let existing = existing.canonicalize()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let target = mount_point_in(&mountinfo, &existing).ok_or_else(|| {
        std::io::Error::other(format!("no mount point for {}", existing.display()))
    })?;
    let below = |root: &PathBuf| {
        root.canonicalize()
            .is_ok_and(|root| target.starts_with(&root) && target != root)
    };
    if !under.iter().any(below) {
        return Err(std::io::Error::other(format!(
            "{} is not a stick mounted below an inbox: not remounted",
            target.display()
        )));
    }
    remount(&target, "rw")?;
    let result = f();
    if let Err(error) = remount(&target, "ro") {
        tracing::warn!(mount = %target.display(), %error, "cannot remount the stick read-only");
    }
    result
}

fn remount(target: &Path, mode: &str) -> std::io::Result<()> {
    let status = std::process::Command::new("mount")
        .arg("-o")
        .arg(format!("remount,{mode}"))
        .arg(target)
        .stdin(std::process::Stdio::null())
        .status()?;
    if status.success() {
        tracing::info!(mount = %target.display(), mode, "stick remounted");
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "mount -o remount,{mode} {}: {status}",
            target.display()
        )))
    }
}

/// The mount point in `mountinfo` (the text of /proc/self/mountinfo) that holds `path`: the
/// longest one that is a prefix of it. Mount points are octal-escaped there (`\040` = space).
fn mount_point_in(mountinfo: &str, path: &Path) -> Option<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|escaped| {
            PathBuf::from(
                <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(unescape_octal(
                    escaped,
                )),
            )
        })
        .filter(|point| path.starts_with(point))
        .max_by_key(|point| point.as_os_str().len())
}

fn unescape_octal(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes.get(i + 1..i + 4).and_then(|d| {
            d.iter()
                .all(|b| (b'0'..=b'7').contains(b))
                .then(|| d.iter().fold(0u32, |n, b| n * 8 + u32::from(b - b'0')))
        });
        match code {
            Some(code) if bytes[i] == b'\\' && code <= 0xff => {
                out.push(code as u8);
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:2 / / ro,relatime shared:1 - ext4 /dev/vda2 ro
30 22 254:3 / /var/lib/quote-edge rw,relatime shared:2 - ext4 /dev/vda3 rw
40 22 0:25 / /run rw,nosuid,nodev shared:5 - tmpfs tmpfs rw
51 40 8:1 / /run/quote-edge/usb/sda1 ro,nosuid,nodev,noexec shared:30 - vfat /dev/sda1 ro
52 40 8:17 / /run/quote-edge/usb/my\\040stick ro shared:31 - vfat /dev/sdb1 ro
";

    #[test]
    fn the_stick_is_the_longest_mount_point_holding_the_bundle() {
        let at = |p: &str| mount_point_in(MOUNTINFO, Path::new(p));
        assert_eq!(
            at("/run/quote-edge/usb/sda1/updates"),
            Some("/run/quote-edge/usb/sda1".into())
        );
        assert_eq!(
            at("/run/quote-edge/usb/sda1"),
            Some("/run/quote-edge/usb/sda1".into())
        );
        // A name that merely starts like a mount point is not inside it.
        assert_eq!(at("/run/quote-edge/usb/sda10"), Some("/run".into()));
        assert_eq!(
            at("/var/lib/quote-edge/ota/inbox"),
            Some("/var/lib/quote-edge".into())
        );
        assert_eq!(at("/etc"), Some("/".into()));
    }

    #[test]
    fn only_a_mount_below_an_inbox_is_ever_remounted() {
        // The temporary directory is no mount point: the mount holding it is an ancestor.
        let inbox = tempfile::tempdir().unwrap();
        let mut called = false;
        let result = with_writable_mount(inbox.path(), &[inbox.path().to_owned()], || {
            called = true;
            Ok(())
        });
        let error = result.unwrap_err().to_string();
        assert!(error.contains("not remounted"), "{error}");
        assert!(!called);
    }

    #[test]
    fn a_receipt_is_never_written_through_a_link_on_the_stick() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("etc");
        let stick = dir.path().join("stick");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::create_dir_all(&stick).unwrap();
        std::os::unix::fs::symlink(&elsewhere, stick.join("receipts")).unwrap();
        let receipt = Receipt {
            device: String::new(),
            from: "1.0.0".into(),
            to: "2.0.0".into(),
            result: "committed".into(),
            reason: String::new(),
            bundle: Some("update.bundle".into()),
            started_at: 1,
            finished_at: 2,
            resumed_bytes: 0,
            unchanged_bytes: 0,
        };
        let mine = dir.path().join("receipts");
        let dirs = [mine.clone(), stick.join("receipts")];
        write(&dir.path().join("device.key"), receipt, &dirs, &[stick]).unwrap();
        assert_eq!(std::fs::read_dir(&mine).unwrap().count(), 1);
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn escaped_mount_points_are_decoded() {
        assert_eq!(
            mount_point_in(
                MOUNTINFO,
                Path::new("/run/quote-edge/usb/my stick/x.bundle")
            ),
            Some("/run/quote-edge/usb/my stick".into())
        );
        assert_eq!(unescape_octal(r"a\134b\9"), br"a\b\9");
        assert_eq!(unescape_octal(r"caf\303\251"), "café".as_bytes());
    }
}
