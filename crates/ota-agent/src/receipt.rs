//! Install receipts: a small signed document per finished update (committed, rolled back or
//! refused), kept on the device and written back beside the bundle (on a read-only stick,
//! remounted read-write for that one write when configured), so that an offline fleet carries
//! its audit trail home on the USB stick.
//!
//! A receipt is a signed document like a key set (`ota/FORMAT.md`, kind `receipt`): its JSON
//! line is stored exactly as signed, with the device's signature. The device signs with its own
//! Ed25519 key (`<data_dir>/ota/device.key`, made on first use, mode 0600); the key is not in
//! the receipt: `ota receipt verify --device-keys DIR` checks receipts against the public keys
//! enrolled from each device (`edge-supervisor device-key`), and that the signer is the device
//! the receipt names.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ota_bundle::SecretKey;
use rustix::mount::MountFlags;

pub use ota_bundle::Receipt;

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

pub(crate) fn device_key(path: &Path) -> Result<SecretKey, ReceiptError> {
    let key_error = |reason: String| ReceiptError::Key {
        path: path.to_owned(),
        reason,
    };
    if path.exists() {
        return SecretKey::load(path).map_err(|e| key_error(e.to_string()));
    }
    let key = SecretKey::generate().map_err(|e| key_error(e.to_string()))?;
    // Whole or absent after a cut, never a name on an empty file (a device whose key changed
    // or broke would sign receipts no fleet recognises, or none): written under a temporary
    // name with mode 0600, fsynced, named without replacing anything, the directory fsynced.
    let temp = path.with_extension("key.tmp");
    let made = (|| -> std::io::Result<bool> {
        let _ = std::fs::remove_file(&temp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(key.to_line().as_bytes())?;
        failpoint::sync("device_key.synced", || file.sync_all())?;
        if !place(&temp, path)? {
            std::fs::remove_file(&temp)?;
            return Ok(false);
        }
        failpoint::sync("device_key.dir_synced", || {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            std::fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
        })?;
        Ok(true)
    })()
    .map_err(|e| key_error(e.to_string()))?;
    if !made {
        // Made meanwhile by someone else: that one is the device's key.
        return SecretKey::load(path).map_err(|e| key_error(e.to_string()));
    }
    Ok(key)
}

/// This device's public key as a trusted-key line (`quote-edge-ed25519 <hex> <comment>`), the
/// key made on first use: what a fleet enrolls to verify the device's receipts.
pub fn device_public_line(key_path: &Path) -> Result<String, ReceiptError> {
    let public = device_key(key_path)?.public();
    let id = public.id();
    Ok(public.to_line(&format!("device {id}")))
}

/// This device's id: its device key's id (16 hex digits), the key made on first use.
pub fn device_id(key_path: &Path) -> Result<String, ReceiptError> {
    Ok(device_key(key_path)?.public().id().to_string())
}

/// A receipt to write, and where: saved in the OTA state together with the outcome it reports
/// (`State::receipt_due`), so that a power cut before it is written leaves it due, to be written
/// at the next start. Writing one twice leaves one file: the signature is deterministic, and an
/// identical receipt already under its name counts as written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Due {
    pub receipt: Receipt,
    /// The device's `receipts/` first, then the stick's, if any.
    pub dirs: Vec<PathBuf>,
    /// The depot offer the update came from: the receipt is posted to it once written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<crate::source::DepotOffer>,
}

impl Due {
    /// The form the state file keeps.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a receipt serialises")
    }

    pub fn from_json(json: &str) -> Result<Due, serde_json::Error> {
        serde_json::from_str(json)
    }
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
) -> Result<String, ReceiptError> {
    let key = device_key(key_path)?;
    receipt.device = key.public().id().to_string();
    let mut doc = receipt.document();
    doc.sign(&key);
    let text = doc.to_text();
    let stem = format!(
        "{}-{}-{}",
        receipt.finished_at, receipt.device, receipt.result
    );
    // Never over an earlier receipt: two updates can end within the same second.
    let write_one = |dir: &Path| -> std::io::Result<PathBuf> {
        durable::create_dir_all(dir)?;
        // Whole or absent after a cut, never a name on an empty file: written under a
        // temporary name, fsynced, named without replacing anything (never over an earlier
        // receipt: two updates can end within the same second), the directory fsynced.
        let temp = dir.join(format!(".{stem}.receipt.tmp"));
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(text.as_bytes())?;
        failpoint::sync("receipt.synced", || file.sync_all())?;
        drop(file);
        for n in 0u32..1000 {
            let path = match n {
                0 => dir.join(format!("{stem}.receipt")),
                n => dir.join(format!("{stem}-{n}.receipt")),
            };
            if place(&temp, &path)? {
                // The receipt's name too: a receipt is what a fleet counts.
                failpoint::sync("receipt.dir_synced", || {
                    std::fs::File::open(dir)?.sync_all()
                })?;
                return Ok(path);
            }
            // This very receipt, written before a cut: synced again, not written twice.
            if same(&path, &text) {
                std::fs::remove_file(&temp)?;
                std::fs::File::open(&path)?.sync_all()?;
                std::fs::File::open(dir)?.sync_all()?;
                return Ok(path);
            }
        }
        let _ = std::fs::remove_file(&temp);
        Err(std::io::Error::other(
            "1000 receipts of the same second and result already",
        ))
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
        if i == 0 && result.is_ok() {
            failpoint::hit("receipt.written");
        }
        match result {
            Ok(path) => tracing::info!(receipt = %path.display(), "install receipt written"),
            Err(source) if i == 0 => {
                return Err(ReceiptError::Write {
                    path: dir.join(format!("{stem}.receipt")),
                    source,
                });
            }
            Err(error) => {
                tracing::info!(dir = %dir.display(), %error, "receipt not copied next to the bundle")
            }
        }
    }
    Ok(text)
}

/// Gives `temp` the name `path` unless that name is taken (`renameat2` with
/// `RENAME_NOREPLACE`; where the file system refuses the flag, a rename after a look, enough
/// for the agent, the one writer). False: the name is taken, `temp` is left as it was.
fn place(temp: &Path, path: &Path) -> std::io::Result<bool> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    use rustix::io::Errno;
    match renameat_with(CWD, temp, CWD, path, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(true),
        Err(Errno::EXIST) => Ok(false),
        Err(Errno::INVAL | Errno::NOSYS) => {
            if path.symlink_metadata().is_ok() {
                return Ok(false);
            }
            std::fs::rename(temp, path).map(|()| true)
        }
        Err(error) => Err(error.into()),
    }
}

/// Whether the file at `path` holds exactly `text` (read no further than that).
fn same(path: &Path, text: &str) -> bool {
    use std::io::Read;
    let mut held = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(text.len() as u64 + 1).read_to_end(&mut held))
        .is_ok_and(|_| held == text.as_bytes())
}

/// Runs `f` with the mount holding `dir` remounted read-write, and remounts it read-only
/// afterwards whatever `f` did; refuses unless that mount point lies strictly below one of
/// `under`. The supervisor runs as root on the device, which a remount needs.
fn with_writable_mount<T>(
    dir: &Path,
    under: &[PathBuf],
    f: impl FnOnce() -> std::io::Result<T>,
) -> std::io::Result<T> {
    let existing = dir.ancestors().find(|d| d.exists()).unwrap_or(dir);
    let existing = existing.canonicalize()?;
    let mounts = std::fs::read_to_string(mountinfo::MOUNTINFO)?;
    let mount = mountinfo::mount_holding(&mounts, &existing).ok_or_else(|| {
        std::io::Error::other(format!("no mount point for {}", existing.display()))
    })?;
    let target = &mount.mount_point;
    let below = |root: &PathBuf| {
        root.canonicalize()
            .is_ok_and(|root| target.starts_with(&root) && *target != root)
    };
    if !under.iter().any(below) {
        return Err(std::io::Error::other(format!(
            "{} is not a stick mounted below an inbox: not remounted",
            target.display()
        )));
    }
    remount(&mount, true)?;
    let result = f();
    if let Err(error) = remount(&mount, false) {
        tracing::warn!(mount = %target.display(), %error, "cannot remount the stick read-only");
    }
    result
}

fn remount(mount: &mountinfo::Mount, writable: bool) -> std::io::Result<()> {
    let mode = if writable { "read-write" } else { "read-only" };
    rustix::mount::mount_remount(&mount.mount_point, remount_flags(mount, writable), "").map_err(
        |errno| {
            std::io::Error::new(
                std::io::Error::from(errno).kind(),
                format!(
                    "cannot remount {} {mode}: {errno}",
                    mount.mount_point.display()
                ),
            )
        },
    )?;
    tracing::info!(mount = %mount.mount_point.display(), mode, "stick remounted");
    Ok(())
}

/// The flags for a remount of `mount`: its own, but for read-only. A remount sets every
/// per-mount flag anew, so whatever is not passed is cleared: without these, a stick mounted
/// `nosuid,nodev,noexec` would lose all three while it is writable (util-linux's `mount -o
/// remount,rw` carries them over the same way).
fn remount_flags(mount: &mountinfo::Mount, writable: bool) -> MountFlags {
    let mut flags = mount
        .options
        .iter()
        .chain(&mount.super_options)
        .map(|option| match option.as_str() {
            "nosuid" => MountFlags::NOSUID,
            "nodev" => MountFlags::NODEV,
            "noexec" => MountFlags::NOEXEC,
            "noatime" => MountFlags::NOATIME,
            "nodiratime" => MountFlags::NODIRATIME,
            "relatime" => MountFlags::RELATIME,
            "nosymfollow" => MountFlags::NOSYMFOLLOW,
            "sync" => MountFlags::SYNCHRONOUS,
            "dirsync" => MountFlags::DIRSYNC,
            "lazytime" => MountFlags::LAZYTIME,
            _ => MountFlags::empty(),
        })
        .fold(MountFlags::empty(), |all, flag| all | flag);
    flags.set(MountFlags::RDONLY, !writable);
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remount_keeps_the_sticks_own_flags_and_changes_only_read_only() {
        let stick = mountinfo::Mount::parse(
            "51 40 8:1 / /run/quote-edge/usb/my\\040stick ro,nosuid,nodev,noexec,relatime \
             shared:30 - vfat /dev/sda1 ro,fmask=0022",
        )
        .unwrap();
        let kept =
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC | MountFlags::RELATIME;
        assert_eq!(remount_flags(&stick, true), kept);
        assert_eq!(remount_flags(&stick, false), kept | MountFlags::RDONLY);
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

    fn receipt(to: &str) -> Receipt {
        Receipt {
            device: String::new(),
            from: "1.0.0".into(),
            to: to.into(),
            result: "committed".into(),
            reason: String::new(),
            bundle: Some("update.bundle".into()),
            bundle_digest: Some("ab".repeat(32)),
            started_at: 1,
            finished_at: 2,
            resumed_bytes: 0,
            unchanged_bytes: 7,
        }
    }

    /// The enrolled keys: `edge-supervisor device-key`'s lines, one file per device.
    fn enrolled(dir: &Path, keys: &[&Path]) -> ota_bundle::TrustedKeys {
        for (i, key) in keys.iter().enumerate() {
            std::fs::write(
                dir.join(format!("{i}.pub")),
                device_public_line(key).unwrap(),
            )
            .unwrap();
        }
        ota_bundle::TrustedKeys::load_dir(dir).unwrap()
    }

    #[test]
    fn a_receipt_verifies_against_its_enrolled_device_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let (key, other_key) = (dir.path().join("device.key"), dir.path().join("other.key"));
        let out = dir.path().join("receipts");
        write(&key, receipt("2.0.0"), std::slice::from_ref(&out), &[]).unwrap();
        let path = std::fs::read_dir(&out)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        assert!(
            path.to_string_lossy().ends_with("-committed.receipt"),
            "{path:?}"
        );
        let bytes = std::fs::read(&path).unwrap();
        let enrolled_dir = dir.path().join("devices");
        std::fs::create_dir(&enrolled_dir).unwrap();
        let devices = enrolled(&enrolled_dir, &[&key]);
        let got = Receipt::verify(&bytes, &devices).unwrap();
        assert_eq!(got.to, "2.0.0");
        assert_eq!(got.device, device_id(&key).unwrap());
        assert_eq!(got.bundle_digest, Some("ab".repeat(32)));
        // The signed line is stored verbatim: any change breaks the signature.
        let text = String::from_utf8(bytes.clone()).unwrap();
        let forged = text.replace("\"to\":\"2.0.0\"", "\"to\":\"9.0.0\"");
        assert_ne!(forged, text);
        assert!(Receipt::verify(forged.as_bytes(), &devices).is_err());
        // Another device's key does not verify it.
        let others_dir = dir.path().join("others");
        std::fs::create_dir(&others_dir).unwrap();
        let others = enrolled(&others_dir, &[&other_key]);
        assert!(Receipt::verify(&bytes, &others).is_err());
    }

    #[test]
    fn a_due_receipt_written_again_after_a_cut_leaves_one_file_and_a_new_one_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("device.key");
        let out = dir.path().join("receipts");
        let due = Due {
            receipt: receipt("2.0.0"),
            dirs: vec![out.clone()],
            report: None,
        };
        // What the state file keeps gives back the same receipt.
        let again = Due::from_json(&due.to_json()).unwrap();
        assert_eq!(again, due);
        write(&key, due.receipt, &due.dirs, &[]).unwrap();
        write(&key, again.receipt, &again.dirs, &[]).unwrap();
        let count = || std::fs::read_dir(&out).unwrap().count();
        assert_eq!(count(), 1, "the same receipt written twice is one file");
        // Another receipt ending in the same second (another update) is never lost: its own file.
        let mut other = receipt("2.0.0");
        other.reason = "another update".into();
        write(&key, other, std::slice::from_ref(&out), &[]).unwrap();
        assert_eq!(count(), 2);
    }

    #[test]
    fn what_a_cut_leaves_half_written_is_never_taken_for_a_receipt_or_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("device.key");
        let out = dir.path().join("receipts");
        std::fs::create_dir(&out).unwrap();
        // Cuts before the renames: temporary files with part of their content.
        std::fs::write(dir.path().join("device.key.tmp"), b"").unwrap();
        let id = device_id(&key).unwrap();
        let stem = format!("2-{id}-committed");
        std::fs::write(
            out.join(format!(".{stem}.receipt.tmp")),
            b"quote-edge-signed",
        )
        .unwrap();
        write(&key, receipt("2.0.0"), std::slice::from_ref(&out), &[]).unwrap();
        let names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].ends_with("-committed.receipt"), "{names:?}");
        assert_eq!(device_id(&key).unwrap(), id, "the key was made whole, once");
        assert!(!dir.path().join("device.key.tmp").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_receipt_naming_another_device_is_refused_even_if_signed_by_an_enrolled_one() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.key"), dir.path().join("b.key"));
        let devices_dir = dir.path().join("devices");
        std::fs::create_dir(&devices_dir).unwrap();
        let devices = enrolled(&devices_dir, &[&a, &b]);
        // Device A signs a receipt that claims to be B's.
        let mut claimed = receipt("2.0.0");
        claimed.device = device_id(&b).unwrap();
        let mut doc = claimed.document();
        doc.sign(&device_key(&a).unwrap());
        let error = Receipt::verify(doc.to_text().as_bytes(), &devices).unwrap_err();
        assert!(error.to_string().contains("but is signed by"), "{error}");
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
            bundle_digest: None,
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

    /// A real remount, in a mount namespace of this test's own thread (root may make one; the
    /// device's supervisor is root too): a read-only tmpfs stands for a stick whose mount point
    /// has a space, which mountinfo writes as `\040`.
    #[test]
    fn a_stick_is_writable_only_for_the_write_and_keeps_nosuid_nodev_noexec() {
        let inbox = tempfile::tempdir().unwrap();
        let inbox = inbox.path().canonicalize().unwrap();
        // A thread of its own: the namespace ends with it, whatever runs the test.
        std::thread::spawn(move || {
            #[allow(deprecated)] // the replacement is `unsafe` for `FILES`, unused here
            let unshared = rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNS);
            if unshared == Err(rustix::io::Errno::PERM) {
                // CI runs this as root: a skip there would hide a broken setup.
                assert!(
                    !std::env::var("CI").is_ok_and(|v| v == "true"),
                    "CI=true and this test would be skipped: a mount namespace needs root"
                );
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED: a mount namespace needs root (CAP_SYS_ADMIN); CI runs this as root"
                );
                return;
            }
            unshared.unwrap();
            // Nothing mounted here may reach the namespace the test started in.
            use rustix::mount::MountPropagationFlags as Propagation;
            rustix::mount::mount_change("/", Propagation::PRIVATE | Propagation::REC).unwrap();
            let stick = inbox.join("my stick");
            std::fs::create_dir(&stick).unwrap();
            let sticky = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
            rustix::mount::mount("tmpfs", &stick, "tmpfs", sticky | MountFlags::RDONLY, None)
                .unwrap();
            let options = || {
                let mounts = std::fs::read_to_string(mountinfo::MOUNTINFO).unwrap();
                let mount = mountinfo::mount_holding(&mounts, &stick).unwrap();
                assert_eq!(mount.mount_point, stick);
                mount.options
            };
            let receipts = stick.join("receipts");
            let during = with_writable_mount(&receipts, std::slice::from_ref(&inbox), || {
                std::fs::create_dir(&receipts)?;
                std::fs::write(receipts.join("r.json"), b"{}")?;
                Ok(options())
            })
            .unwrap();
            let after = options();
            for flag in ["nosuid", "nodev", "noexec"] {
                assert!(during.iter().any(|o| o == flag), "{during:?}");
                assert!(after.iter().any(|o| o == flag), "{after:?}");
            }
            assert!(during.iter().any(|o| o == "rw"), "{during:?}");
            assert!(after.iter().any(|o| o == "ro"), "{after:?}");
            assert_eq!(std::fs::read(receipts.join("r.json")).unwrap(), b"{}");
        })
        .join()
        .unwrap();
    }
}
