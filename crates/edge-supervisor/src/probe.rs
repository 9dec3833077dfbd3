//! Probes against one replica: an HTTP GET, a TCP connect, or a command. Each runs under its
//! timeout; a probe that cannot finish in time is a failure, like in Kubernetes.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{Probe, ProbeAction};

/// Runs one probe against `127.0.0.1:port`. `Err` says what failed.
pub async fn run(probe: &Probe, port: u16, fill: impl Fn(&str) -> String) -> Result<(), String> {
    match tokio::time::timeout(probe.timeout, attempt(&probe.action, port, fill)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {}", humanize(probe.timeout))),
    }
}

async fn attempt(
    action: &ProbeAction,
    port: u16,
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
            let status = tokio::process::Command::new(&program)
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

/// A minimal HTTP/1.1 GET: success is a 2xx or 3xx status line, as in Kubernetes.
async fn http_get(port: u16, path: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect to port {port}: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: edge-supervisor-probe\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send to port {port}: {e}"))?;
    // The status line fits in the first read; nothing after it matters.
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < 12 {
        let n = stream
            .read(&mut head[len..])
            .await
            .map_err(|e| format!("read from port {port}: {e}"))?;
        if n == 0 {
            return Err(format!(
                "port {port} closed the connection without an answer"
            ));
        }
        len += n;
    }
    let line = String::from_utf8_lossy(&head[..len]);
    let status: u16 = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            format!(
                "not an HTTP answer: {:?}",
                line.lines().next().unwrap_or("")
            )
        })?;
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("GET {path} answered {status}"))
    }
}

fn humanize(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;
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
        assert_eq!(run(&http, port, str::to_owned).await, Ok(()));
        let (port, _t) = server(Some("HTTP/1.1 503 Service Unavailable\r\n\r\n")).await;
        assert_eq!(
            run(&http, port, str::to_owned).await,
            Err("GET /healthz answered 503".into())
        );
        let (port, _t) = server(Some("garbage that is long enough\r\n")).await;
        assert!(
            run(&http, port, str::to_owned)
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
            run(&probe(ProbeAction::Tcp), port, str::to_owned).await,
            Ok(())
        );
        let closed = crate::process::free_port().unwrap();
        assert!(
            run(&probe(ProbeAction::Tcp), closed, str::to_owned)
                .await
                .is_err()
        );
        let ok = probe(ProbeAction::Exec {
            command: vec!["sh".into(), "-c".into(), "exit {port}".into()],
        });
        assert_eq!(run(&ok, 0, |w| w.replace("{port}", "0")).await, Ok(()));
        assert!(
            run(&ok, 0, |w| w.replace("{port}", "3"))
                .await
                .unwrap_err()
                .contains("exit")
        );
    }
}
