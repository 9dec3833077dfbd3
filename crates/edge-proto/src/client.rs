//! The one client of the control socket (feature `client`): connect, write one [`Request`]
//! line, read one [`Reply`] until the supervisor closes the connection, within a deadline and
//! a size bound. Blocking std I/O: `edge-supervisor`'s subcommands and `ota apply|status` are
//! short-lived command-line programs; async callers run it on a blocking thread.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Reply, Request};

/// How long a request may take, from connecting to the end of the reply, unless set with
/// [`Client::timeout`]. The supervisor answers from its dispatcher loop, which never waits on
/// an update or a replica, so this is only reached by a supervisor that hangs.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest reply read unless set with [`Client::max_reply_bytes`]: a status is a few
/// kilobytes. A logs reply can be longer; its caller sets the bound from the lines it asked for.
pub const MAX_REPLY_BYTES: u64 = 1 << 20;

/// A request that got no reply; every variant names the socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach a supervisor at {path}: {source}")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the supervisor at {path} broke the connection: {source}")]
    Broken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the supervisor at {path} did not answer within {} s", timeout.as_secs_f64())]
    TimedOut { path: PathBuf, timeout: Duration },
    #[error("the supervisor at {path} sent more than {limit} bytes: not a reply")]
    TooLong { path: PathBuf, limit: u64 },
    #[error("the supervisor at {path} sent an answer that is not a reply: {detail}")]
    BadReply { path: PathBuf, detail: String },
}

/// A client for the supervisor at one socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
    max_reply_bytes: u64,
}

impl Client {
    /// A client with [`REPLY_TIMEOUT`] and [`MAX_REPLY_BYTES`].
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
            timeout: REPLY_TIMEOUT,
            max_reply_bytes: MAX_REPLY_BYTES,
        }
    }

    /// The whole request, reply included, must be done within `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// A reply longer than `limit` bytes is refused (and not read further).
    pub fn max_reply_bytes(mut self, limit: u64) -> Client {
        self.max_reply_bytes = limit;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `request` and returns the supervisor's reply.
    pub fn request(&self, request: &Request) -> Result<Reply, ClientError> {
        let deadline = Instant::now() + self.timeout;
        let path = || self.socket.clone();
        let broken = |source: std::io::Error| match source.kind() {
            // What a socket timeout looks like (EAGAIN, or ETIMEDOUT on some systems).
            ErrorKind::WouldBlock | ErrorKind::TimedOut => ClientError::TimedOut {
                path: path(),
                timeout: self.timeout,
            },
            _ => ClientError::Broken {
                path: path(),
                source,
            },
        };
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Unreachable {
                path: path(),
                source,
            })?;
        // Plain data: serialising a request cannot fail.
        let mut line = serde_json::to_vec(request).expect("a request serialises");
        line.push(b'\n');
        left(deadline)
            .and_then(|left| stream.set_write_timeout(Some(left)))
            .and_then(|()| stream.write_all(&line))
            .map_err(broken)?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            // One deadline for the whole reply: a per-read timeout alone would let a
            // supervisor that sends a byte now and then hold the caller for ever.
            left(deadline)
                .and_then(|left| stream.set_read_timeout(Some(left)))
                .map_err(broken)?;
            let n = match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(broken(e)),
            };
            if (answer.len() + n) as u64 > self.max_reply_bytes {
                return Err(ClientError::TooLong {
                    path: path(),
                    limit: self.max_reply_bytes,
                });
            }
            answer.extend_from_slice(&buf[..n]);
        }
        serde_json::from_slice(&answer).map_err(|e| ClientError::BadReply {
            path: path(),
            detail: e.to_string(),
        })
    }
}

/// The time left before `deadline`; a socket timeout of zero would mean "none", so an
/// expired deadline is a timeout error here.
fn left(deadline: Instant) -> std::io::Result<Duration> {
    Some(deadline.saturating_duration_since(Instant::now()))
        .filter(|left| !left.is_zero())
        .ok_or_else(|| ErrorKind::TimedOut.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// A one-connection server on a socket in a fresh directory that reads the request line,
    /// then runs `answer` on the connection.
    fn serve(
        answer: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("supervisor.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            std::io::BufReader::new(&stream)
                .read_line(&mut line)
                .unwrap();
            answer(stream);
            line
        });
        (dir, socket, server)
    }

    #[test]
    fn one_request_line_gets_one_reply() {
        let (_dir, socket, server) = serve(|mut stream| {
            stream
                .write_all(b"{\"reply\":\"accepted\",\"message\":\"ok\"}\n")
                .unwrap();
        });
        let reply = Client::new(&socket)
            .request(&Request::Scale { replicas: 2 })
            .unwrap();
        assert_eq!(
            reply,
            Reply::Accepted {
                message: "ok".into()
            }
        );
        assert_eq!(
            server.join().unwrap(),
            "{\"command\":\"scale\",\"replicas\":2}\n"
        );
    }

    #[test]
    fn no_supervisor_is_unreachable_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("supervisor.sock");
        let error = Client::new(&socket).request(&Request::Status).unwrap_err();
        assert!(matches!(error, ClientError::Unreachable { .. }), "{error}");
        assert!(error.to_string().contains("supervisor.sock"), "{error}");
    }

    #[test]
    fn a_supervisor_that_never_answers_times_out() {
        // The server holds the connection open until the client has given up.
        let (gave_up, wait) = std::sync::mpsc::channel::<()>();
        let (_dir, socket, server) = serve(move |_stream| {
            let _ = wait.recv();
        });
        let started = Instant::now();
        let error = Client::new(&socket)
            .timeout(Duration::from_millis(200))
            .request(&Request::Status)
            .unwrap_err();
        gave_up.send(()).unwrap();
        server.join().unwrap();
        assert!(matches!(error, ClientError::TimedOut { .. }), "{error}");
        assert!(error.to_string().contains("supervisor.sock"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_reply_longer_than_the_bound_is_refused_unread() {
        let (_dir, socket, server) = serve(|mut stream| {
            // The client stops reading and closes: the rest of this write may fail.
            let _ = stream.write_all(&vec![b' '; 64 * 1024]);
        });
        let error = Client::new(&socket)
            .max_reply_bytes(1000)
            .request(&Request::Status)
            .unwrap_err();
        server.join().unwrap();
        assert!(
            matches!(error, ClientError::TooLong { limit: 1000, .. }),
            "{error}"
        );
    }

    #[test]
    fn an_answer_that_is_not_a_reply_is_named() {
        let (_dir, socket, server) = serve(|mut stream| {
            stream.write_all(b"{\"reply\":\"maybe\"}\n").unwrap();
        });
        let error = Client::new(&socket).request(&Request::Status).unwrap_err();
        server.join().unwrap();
        assert!(matches!(error, ClientError::BadReply { .. }), "{error}");
        assert!(error.to_string().contains("not a reply"), "{error}");
    }
}
