//! The replicas' word that they are ready: a datagram socket in the spirit of sd_notify(3).
//! Each replica gets `NOTIFY_SOCKET` pointing here and sends `READY=1` and `MAINPID=<its pid>`
//! once it can serve; the dispatcher then runs its startup probe at once instead of at the next
//! poll. The word is a hint, never trusted: a probe still decides (see
//! `replica_model::Model::notified`), so a lying sender costs one probe. A replica that never
//! speaks (an older release, a wrapper that forks) is polled as before.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::UnixDatagram;

/// The largest datagram read; sd_notify messages are a few lines.
const MAX_DATAGRAM: usize = 4096;

/// The bound socket and its path, removed again when dropped.
#[derive(Debug)]
pub struct ReadySocket {
    path: PathBuf,
    socket: UnixDatagram,
}

impl ReadySocket {
    /// Binds `ready.sock` in `dir`, the control socket's directory (a stale one from a killed
    /// supervisor is replaced). `None`, with a warning, when that fails: replicas are then
    /// polled only.
    pub fn bind(dir: &Path) -> Option<ReadySocket> {
        let path = dir.join("ready.sock");
        let _ = std::fs::remove_file(&path);
        // Writable by everyone who can reach the directory, like systemd's own notify socket:
        // replicas may run as another user (`service.user`), and a word is only a hint.
        let bound = UnixDatagram::bind(&path).and_then(|socket| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
            Ok(socket)
        });
        match bound {
            Ok(socket) => Some(ReadySocket { path, socket }),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "no readiness socket; replicas are polled only");
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads words until the socket fails; `ready(pid)` for each `READY=1` naming its sender.
    pub async fn serve(self, ready: impl Fn(u32)) {
        let mut buf = vec![0; MAX_DATAGRAM];
        loop {
            match self.socket.recv(&mut buf).await {
                Ok(n) => {
                    if let Some(pid) = parse(&buf[..n]) {
                        ready(pid);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "readiness socket failed; replicas are polled only");
                    return;
                }
            }
        }
    }
}

impl Drop for ReadySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The pid of a datagram saying `READY=1` with `MAINPID=<pid>` (lines of `KEY=VALUE`, in any
/// order, as sd_notify sends them); `None` for anything else.
pub fn parse(datagram: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(datagram).ok()?;
    let mut ready = false;
    let mut pid = None;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("READY", "1")) => ready = true,
            Some(("MAINPID", n)) => pid = n.parse().ok().filter(|&p| p > 0),
            _ => {}
        }
    }
    pid.filter(|_| ready)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn only_ready_with_a_pid_is_a_word() {
        assert_eq!(parse(b"READY=1\nMAINPID=4242\n"), Some(4242));
        assert_eq!(parse(b"MAINPID=7\nSTATUS=serving\nREADY=1"), Some(7));
        assert_eq!(parse(b"READY=1\n"), None, "no sender named");
        assert_eq!(parse(b"MAINPID=7\n"), None, "not ready");
        assert_eq!(parse(b"READY=0\nMAINPID=7\n"), None);
        assert_eq!(parse(b"READY=1\nMAINPID=0\n"), None);
        assert_eq!(parse(b"READY=1\nMAINPID=-3\n"), None);
        assert_eq!(parse(b"READY=1\nMAINPID=99999999999\n"), None);
        assert_eq!(parse(&[0xff, 0xfe]), None);
    }
}
