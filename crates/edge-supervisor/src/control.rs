//! The control socket: a Unix socket, mode 0600 (0660 with a configured group), that checks
//! the caller's credentials and carries one JSON-line request and one reply per connection.
//! Requests go to the dispatcher, which owns all state; this module only transports them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use edge_proto::client::{Client, ClientError};
use edge_proto::{ErrorKind, MAX_REQUEST_BYTES, Reply, Request};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// A request on its way to the dispatcher, with the way back.
#[derive(Debug)]
pub struct ControlRequest {
    pub request: Request,
    pub reply: oneshot::Sender<Reply>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another supervisor is already running on {0}")]
    AlreadyRunning(PathBuf),
    #[error("cannot create the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Creates the socket with mode 0600 (or 0660 and group `gid`). A stale socket file left by
/// a crashed supervisor is replaced; a live one is not.
pub fn bind(path: &Path, gid: Option<u32>) -> Result<UnixListener, ControlError> {
    let fail = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::AlreadyRunning(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(fail)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    // Bound, then narrowed to 0600 (0660 for the group). Not with a umask of 0177 around the
    // bind: the umask is the whole process's, and other threads create files meanwhile (the OTA
    // agent's directories, a test's children), which would come out unsearchable. Whoever
    // connects in between is refused anyway: `allowed` checks every peer's credentials.
    let listener = UnixListener::bind(path).map_err(fail)?;
    if let Some(gid) = gid {
        rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
            .map_err(|e| fail(e.into()))?;
    }
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(fail)?;
    Ok(listener)
}

/// Who may use the socket: root, the supervisor's own user, or the configured group. The file
/// mode already keeps others out; this check holds even if the mode is loosened by hand.
fn allowed(stream: &UnixStream, gid: Option<u32>) -> bool {
    let Ok(cred) = stream.peer_cred() else {
        return false;
    };
    let me = rustix::process::geteuid().as_raw();
    cred.uid() == 0 || cred.uid() == me || gid.is_some_and(|g| cred.gid() == g)
}

/// Serves the socket until the process ends.
pub async fn serve(
    listener: UnixListener,
    gid: Option<u32>,
    requests: mpsc::Sender<ControlRequest>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let reply = if allowed(&stream, gid) {
                answer(&mut stream, &requests).await
            } else {
                error(
                    ErrorKind::PermissionDenied,
                    "this user may not control the supervisor",
                )
            };
            send(stream, &reply).await;
        });
    }
}

async fn answer(stream: &mut UnixStream, requests: &mpsc::Sender<ControlRequest>) -> Reply {
    let mut line = Vec::new();
    let mut reader = BufReader::new(stream).take(MAX_REQUEST_BYTES as u64 + 1);
    if let Err(e) = reader.read_until(b'\n', &mut line).await {
        return error(
            ErrorKind::BadRequest,
            &format!("cannot read the request: {e}"),
        );
    }
    if line.len() > MAX_REQUEST_BYTES {
        return error(
            ErrorKind::BadRequest,
            &format!("the request is longer than {MAX_REQUEST_BYTES} bytes"),
        );
    }
    let request: Request = match serde_json::from_slice(&line) {
        Ok(request) => request,
        Err(e) => return error(ErrorKind::BadRequest, &format!("not a request: {e}")),
    };
    let (tx, rx) = oneshot::channel();
    if requests
        .send(ControlRequest { request, reply: tx })
        .await
        .is_err()
    {
        return error(ErrorKind::NotAllowedNow, "the supervisor is stopping");
    }
    rx.await
        .unwrap_or_else(|_| error(ErrorKind::NotAllowedNow, "the supervisor is stopping"))
}

async fn send(mut stream: UnixStream, reply: &Reply) {
    let Ok(mut bytes) = serde_json::to_vec(reply) else {
        return;
    };
    bytes.push(b'\n');
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
}

pub fn error(kind: ErrorKind, message: &str) -> Reply {
    Reply::Error {
        kind,
        message: message.to_owned(),
    }
}

/// The client side, for async callers (tests running a supervisor on their own runtime):
/// `edge_proto`'s one client, on a blocking thread so the runtime keeps serving meanwhile.
/// The command line calls that client directly.
pub async fn request(socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    let client = Client::new(socket);
    let request = request.clone();
    tokio::task::spawn_blocking(move || client.request(&request))
        .await
        .expect("the control client neither panics nor outlives the runtime")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[tokio::test]
    async fn the_socket_is_private_and_answers_through_the_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl/supervisor.sock");
        let listener = bind(&path, None).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(matches!(
            bind(&path, None),
            Err(ControlError::AlreadyRunning(_))
        ));

        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(serve(listener, None, tx));
        tokio::spawn(async move {
            while let Some(ControlRequest { request, reply }) = rx.recv().await {
                let _ = reply.send(Reply::Accepted {
                    message: format!("{request:?}"),
                });
            }
        });
        let reply = super::request(&path, &Request::Scale { replicas: 2 })
            .await
            .unwrap();
        assert_eq!(
            reply,
            Reply::Accepted {
                message: "Scale { replicas: 2 }".into()
            }
        );
    }

    #[tokio::test]
    async fn garbage_and_oversized_requests_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let (tx, _rx) = mpsc::channel(1);
        tokio::spawn(serve(bind(&path, None).unwrap(), None, tx));
        for input in [
            b"{\"command\":\"explode\"}\n".to_vec(),
            vec![b'x'; MAX_REQUEST_BYTES + 10],
        ] {
            let mut stream = UnixStream::connect(&path).await.unwrap();
            stream.write_all(&input).await.unwrap();
            let _ = stream.shutdown().await;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await.unwrap();
            let reply: Reply = serde_json::from_slice(&answer).unwrap();
            assert!(
                matches!(
                    reply,
                    Reply::Error {
                        kind: ErrorKind::BadRequest,
                        ..
                    }
                ),
                "{reply:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_stale_socket_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        bind(&path, None).expect("a dead socket is not another supervisor");
    }
}
