//! Probes against one replica: an HTTP GET, a TCP connect, or a command. Each runs under its
//! timeout; a probe that cannot finish in time is a failure, like in Kubernetes.

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::{Probe, ProbeAction, RunAs};

/// Runs one probe against `127.0.0.1:port`. `Err` says what failed.
pub async fn run(
    probe: &Probe,
    port: u16,
    user: Option<&RunAs>,
    fill: impl Fn(&str) -> String,
) -> Result<(), String> {
    match tokio::time::timeout(probe.timeout, attempt(&probe.action, port, user, fill)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(probe.timeout)
        )),
    }
}

async fn attempt(
    action: &ProbeAction,
    port: u16,
    user: Option<&RunAs>,
    fill: impl Fn(&str) -> String,
) -> Result<(), String> {
    match action {
        ProbeAction::Tcp => TcpStream::connect(("127.0.0.1", port))
            .await
            .map(drop)
            .map_err(|e| format!("connect to port {port}: {e}")),
        ProbeAction::Http { path } => http_get(port, path).await,
        ProbeAction::Exec { command } => {
            let mut words = command.iter().map(|w| fill(w));
            let program = words.next().unwrap_or_default();
            // Run as the replica runs (a Kubernetes exec probe runs in the container).
            let mut command = std::process::Command::new(&program);
            crate::process::clean_env(&mut command);
            crate::process::run_as(&mut command, user);
            let status = tokio::process::Command::from(command)
                .args(words)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| format!("cannot run {program}: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("{program} exited with {status}"))
            }
        }
    }
}

/// An HTTP/1.1 GET with the hyper client the router already links: success is a 2xx or 3xx
/// status, as in Kubernetes. The body is not read; the connection is closed after the head.
async fn http_get(port: u16, path: &str) -> Result<(), String> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect to port {port}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with port {port}: {e}"))?;
    // The connection task ends when `sender` is dropped (or the replica closes it).
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
        .header(hyper::header::USER_AGENT, "edge-supervisor-probe")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("not an HTTP answer from port {port}: {e}"))?;
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("GET {path} answered {}", status.as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn probe(action: ProbeAction) -> Probe {
        Probe {
            action,
            initial_delay: Duration::ZERO,
            period: Duration::from_millis(100),
            timeout: Duration::from_millis(300),
            success_threshold: NonZeroU32::MIN,
            failure_threshold: NonZeroU32::MIN,
        }
    }

    /// A one-connection server that answers with `reply`, or never answers if `None`.
    async fn server(reply: Option<&'static str>) -> (u16, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            match reply {
                Some(reply) => {
                    let _ = stream.write_all(reply.as_bytes()).await;
                }
                None => std::future::pending::<()>().await,
            }
        });
        (port, task)
    }

    #[tokio::test]
    async fn http_success_and_failure_follow_the_status_code() {
        let http = probe(ProbeAction::Http {
            path: "/healthz".into(),
        });
        let (port, _t) = server(Some("HTTP/1.1 204 No Content\r\n\r\n")).await;
        assert_eq!(run(&http, port, None, str::to_owned).await, Ok(()));
        let (port, _t) = server(Some("HTTP/1.1 503 Service Unavailable\r\n\r\n")).await;
        assert_eq!(
            run(&http, port, None, str::to_owned).await,
            Err("GET /healthz answered 503".into())
        );
        let (port, _t) = server(Some("garbage that is long enough\r\n")).await;
        assert!(
            run(&http, port, None, str::to_owned)
                .await
                .unwrap_err()
                .contains("not an HTTP answer")
        );
    }

    #[tokio::test]
    async fn a_silent_server_fails_by_timeout() {
        let (port, _t) = server(None).await;
        let err = run(
            &probe(ProbeAction::Http { path: "/".into() }),
            port,
            None,
            str::to_owned,
        )
        .await
        .unwrap_err();
        assert_eq!(err, "no answer within 300ms");
    }

    #[tokio::test]
    async fn tcp_and_exec_probes() {
        let (port, _t) = server(Some("")).await;
        assert_eq!(
            run(&probe(ProbeAction::Tcp), port, None, str::to_owned).await,
            Ok(())
        );
        let closed = crate::process::free_port().unwrap();
        assert!(
            run(&probe(ProbeAction::Tcp), closed, None, str::to_owned)
                .await
                .is_err()
        );
        let ok = probe(ProbeAction::Exec {
            command: vec!["sh".into(), "-c".into(), "exit {port}".into()],
        });
        assert_eq!(
            run(&ok, 0, None, |w: &str| w.replace("{port}", "0")).await,
            Ok(())
        );
        assert!(
            run(&ok, 0, None, |w: &str| w.replace("{port}", "3"))
                .await
                .unwrap_err()
                .contains("exit")
        );
    }
}
