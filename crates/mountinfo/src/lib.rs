//! Reading `/proc/self/mountinfo`: one parser for the lines the kernel writes there, with the
//! octal escapes it puts in names (`\040` for a space, `\011` tab, `\012` newline, `\134`
//! backslash) decoded, and the two questions the device asks of it.
//!
//! Architecture invariant: no I/O and no dependencies: callers read the file and hand in its
//! text, so every case (escaped names, odd optional fields) is tested on strings.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// The mount table of the calling thread's mount namespace: the same as `/proc/self`'s in a
/// process whose threads share one, and the right one in a test whose thread left it.
pub const MOUNTINFO: &str = "/proc/thread-self/mountinfo";

/// One line of mountinfo, as in
/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted (field 5), unescaped.
    pub mount_point: PathBuf,
    /// The file system type (the first field after the ` - ` separator): `ext4`, `cgroup2`, `vfat`.
    pub fs_type: String,
    /// The per-mount options (field 6): `ro` or `rw`, `nosuid`, `nodev`, `noexec`, `relatime`...
    pub options: Vec<String>,
    /// The file system's own options (the last field): `rw`, `sync`, `errors=remount-ro`...
    pub super_options: Vec<String>,
}

impl Mount {
    /// One line of mountinfo, or `None` when it does not have the fields every line has.
    pub fn parse(line: &str) -> Option<Mount> {
        let mut fields = line.split(' ');
        let mount_point = fields.nth(4)?;
        let options = fields.next()?;
        // Zero or more optional fields (`shared:1`, `master:2`), then the separator.
        let mut after = fields.skip_while(|&field| field != "-").skip(1);
        let fs_type = after.next()?;
        let _source = after.next()?;
        let super_options = after.next().unwrap_or("");
        let list = |text: &str| {
            text.split(',')
                .filter(|o| !o.is_empty())
                .map(unescape_lossy)
                .collect()
        };
        Some(Mount {
            mount_point: PathBuf::from(OsString::from_vec(unescape(mount_point))),
            fs_type: unescape_lossy(fs_type),
            options: list(options),
            super_options: list(super_options),
        })
    }

    /// Whether the per-mount options include `option` (`ro`, `nosuid`...).
    pub fn has_option(&self, option: &str) -> bool {
        self.options.iter().any(|o| o == option)
    }
}

/// Every well-formed line of `mountinfo` (the text of the file), in order (parents first).
pub fn mounts(mountinfo: &str) -> impl Iterator<Item = Mount> + '_ {
    mountinfo.lines().filter_map(Mount::parse)
}

/// The first cgroup v2 mount: where the unified hierarchy is.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mounts(mountinfo)
        .find(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point)
}

/// The mount that holds `path`: the one with the longest mount point that is an ancestor of
/// `path` (whole components: `/mnt/a` does not hold `/mnt/ab`). Of two mounts on the same
/// point, the later one, which hides the earlier.
pub fn mount_holding(mountinfo: &str, path: &Path) -> Option<Mount> {
    // `max_by_key` keeps the last of equal keys: the mount on top.
    mounts(mountinfo)
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
}

/// Decodes the kernel's `\ooo` escapes; a backslash not followed by three octal digits (or by
/// a code above 0o377) is kept as it is.
pub fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes.get(i + 1..i + 4).and_then(|d| {
            d.iter()
                .all(|b| (b'0'..=b'7').contains(b))
                .then(|| d.iter().fold(0u32, |n, b| n * 8 + u32::from(b - b'0')))
        });
        match code.and_then(|c| u8::try_from(c).ok()) {
            Some(byte) if bytes[i] == b'\\' => {
                out.push(byte);
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

fn unescape_lossy(field: &str) -> String {
    String::from_utf8_lossy(&unescape(field)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:2 / / ro,relatime shared:1 - ext4 /dev/vda2 ro
30 22 254:3 / /var/lib/quote-edge rw,noatime,nodev,nosuid shared:2 - ext4 /dev/vda3 rw,errors=remount-ro
35 22 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
40 22 0:25 / /run rw,nosuid,nodev shared:5 - tmpfs tmpfs rw
51 40 8:1 / /run/quote-edge/usb/sda1 ro,nosuid,nodev,noexec shared:30 - vfat /dev/sda1 ro
52 40 8:17 / /run/quote-edge/usb/my\\040stick ro shared:31 master:2 - vfat /dev/sdb1 ro,fmask=0022
";

    #[test]
    fn a_line_gives_its_mount_point_type_and_both_option_lists() {
        let mount = mounts(MOUNTINFO).nth(1).unwrap();
        assert_eq!(
            mount,
            Mount {
                mount_point: "/var/lib/quote-edge".into(),
                fs_type: "ext4".into(),
                options: vec![
                    "rw".into(),
                    "noatime".into(),
                    "nodev".into(),
                    "nosuid".into()
                ],
                super_options: vec!["rw".into(), "errors=remount-ro".into()],
            }
        );
        assert!(mount.has_option("nodev") && !mount.has_option("ro"));
    }

    #[test]
    fn any_number_of_optional_fields_comes_before_the_separator() {
        let none = Mount::parse("1 0 0:1 / /a rw - ext4 /dev/a rw").unwrap();
        let two = Mount::parse("1 0 0:1 / /a rw shared:1 master:2 - ext4 /dev/a rw").unwrap();
        assert_eq!(none, two);
        assert_eq!(none.fs_type, "ext4");
    }

    #[test]
    fn a_line_without_the_separator_or_its_fields_is_skipped() {
        for line in [
            "",
            "1 0 0:1 / /a rw",
            "1 0 0:1 / /a rw shared:1 -",
            "garbage",
        ] {
            assert_eq!(Mount::parse(line), None, "{line:?}");
        }
    }

    #[test]
    fn escaped_mount_points_are_decoded() {
        let stick = mounts(MOUNTINFO).last().unwrap();
        assert_eq!(stick.mount_point, Path::new("/run/quote-edge/usb/my stick"));
        assert_eq!(unescape(r"a\134b\9"), br"a\b\9");
        assert_eq!(unescape(r"caf\303\251"), "café".as_bytes());
        assert_eq!(unescape(r"tab\011nl\012"), b"tab\tnl\n");
        // Not an escape: too few digits, not octal, or above one byte.
        assert_eq!(unescape(r"\04 \089 \400"), br"\04 \089 \400");
    }

    #[test]
    fn the_cgroup2_mount_is_found_even_under_an_escaped_name() {
        assert_eq!(cgroup2_mount(MOUNTINFO), Some("/sys/fs/cgroup".into()));
        let v1_and_v2 = "25 30 0:22 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory\n\
                         35 30 0:30 / /sys/fs/cgroup/uni\\040fied rw,nosuid shared:10 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(v1_and_v2),
            Some("/sys/fs/cgroup/uni fied".into())
        );
        assert_eq!(
            cgroup2_mount("25 30 0:22 / /x rw - ext4 /dev/vda rw\n"),
            None
        );
    }

    #[test]
    fn the_mount_holding_a_path_is_the_longest_mount_point_above_it() {
        let at = |p: &str| mount_holding(MOUNTINFO, Path::new(p)).map(|m| m.mount_point);
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
        assert_eq!(
            at("/run/quote-edge/usb/my stick/x.bundle"),
            Some("/run/quote-edge/usb/my stick".into())
        );
    }

    #[test]
    fn of_two_mounts_on_one_point_the_later_one_holds_the_path() {
        let stacked =
            "40 22 0:25 / /run rw - tmpfs tmpfs rw\n41 40 0:26 / /run ro - tmpfs tmpfs ro\n";
        let mount = mount_holding(stacked, Path::new("/run/x")).unwrap();
        assert!(mount.has_option("ro"));
    }
}
