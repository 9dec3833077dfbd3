//! Watchdogs: systemd's (`sd_notify` READY, STATUS, WATCHDOG, STOPPING) and an optional
//! hardware watchdog device. Both are fed only from the dispatcher loop, so a hung loop
//! stops the feeding and the watchdog fires.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The supervisor's side of systemd's notify protocol. Without `NOTIFY_SOCKET` every call
/// is a no-op.
#[derive(Debug, Default)]
pub struct Systemd {
    ready_sent: bool,
    last_status: String,
}

impl Systemd {
    /// How often to send WATCHDOG=1: half of `WatchdogSec`, if systemd asked for it.
    pub fn watchdog_interval() -> Option<Duration> {
        sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
    }

    /// Sends READY=1 once, and STATUS= whenever the text changes.
    pub fn update(&mut self, ready: u32, desired: u32) {
        let status = format!("{ready}/{desired} replicas ready");
        if status != self.last_status {
            let mut states = vec![sd_notify::NotifyState::Status(&status)];
            if ready > 0 && !self.ready_sent {
                states.push(sd_notify::NotifyState::Ready);
                self.ready_sent = true;
            }
            if let Err(error) = sd_notify::notify(&states) {
                tracing::warn!(%error, "cannot notify systemd");
            }
            self.last_status = status;
        }
    }

    pub fn ping() {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
    }

    pub fn stopping() {
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("stopping"),
        ]);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error(
        "the hardware watchdog {device} is busy: another process has it open (usually systemd, \
         through RuntimeWatchdogSec=); let one of them own it"
    )]
    Busy { device: PathBuf },
    #[error("cannot open the hardware watchdog {device}: {source}")]
    Open {
        device: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set the hardware watchdog {device} timeout to {timeout:?}: {source}")]
    Timeout {
        device: PathBuf,
        timeout: Duration,
        #[source]
        source: std::io::Error,
    },
}

/// An open hardware watchdog. Once opened, the machine resets unless it is fed within the
/// timeout; a clean stop disarms it with the magic close ('V').
#[derive(Debug)]
pub struct HardwareWatchdog {
    device: PathBuf,
    file: File,
}

impl HardwareWatchdog {
    pub fn open(device: &Path, timeout: Duration) -> Result<Self, WatchdogError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(device)
            .map_err(|source| {
                if source.raw_os_error() == Some(16) {
                    WatchdogError::Busy {
                        device: device.to_owned(),
                    }
                } else {
                    WatchdogError::Open {
                        device: device.to_owned(),
                        source,
                    }
                }
            })?;
        let seconds = timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
        sys::set_timeout(&file, seconds).map_err(|source| WatchdogError::Timeout {
            device: device.to_owned(),
            timeout,
            source,
        })?;
        Ok(HardwareWatchdog {
            device: device.to_owned(),
            file,
        })
    }

    pub fn feed(&mut self) {
        if let Err(error) = self.file.write_all(b"\0") {
            tracing::warn!(device = %self.device.display(), %error, "cannot feed the hardware watchdog");
        }
    }

    /// Disarms the watchdog on a clean stop (drivers without `nowayout` honour it).
    pub fn close(mut self) {
        let _ = self.file.write_all(b"V");
    }
}

/// The watchdog ioctl, one of the two `unsafe` blocks of the workspace (with `process::sys`):
/// std and rustix offer no safe
/// wrapper for `WDIOC_SETTIMEOUT`.
#[allow(unsafe_code)]
mod sys {
    use std::fs::File;
    use std::os::raw::c_int;

    use rustix::ioctl::{Updater, ioctl, opcode};

    /// `WDIOC_SETTIMEOUT` from linux/watchdog.h: `_IOWR('W', 6, int)`.
    const SET_TIMEOUT: rustix::ioctl::Opcode = opcode::read_write::<c_int>(b'W', 6);

    pub fn set_timeout(file: &File, seconds: c_int) -> std::io::Result<()> {
        let mut value = seconds;
        // SAFETY: WDIOC_SETTIMEOUT reads and writes back one `int`, which `value` is, and the
        // kernel does not keep the pointer past the call.
        unsafe { ioctl(file, Updater::<SET_TIMEOUT, c_int>::new(&mut value)) }?;
        Ok(())
    }

    #[cfg(test)]
    #[test]
    fn the_opcode_matches_the_kernel_header() {
        assert_eq!(SET_TIMEOUT as u64, 0xC004_5706);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_is_named_in_the_error() {
        let err =
            HardwareWatchdog::open(Path::new("/nonexistent/watchdog"), Duration::from_secs(5))
                .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/watchdog"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_a_watchdog_is_refused_when_setting_the_timeout() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = HardwareWatchdog::open(file.path(), Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, WatchdogError::Timeout { .. }), "{err}");
    }
}
