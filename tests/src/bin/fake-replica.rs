//! Test program: a replica that misbehaves on purpose, for the supervisor's tests.
//!
//! `fake-replica PORT NAME MODES INDEX`: serves `GET /` (its name), `/healthz`, `/readyz`, and
//! `/sleep/MS` (its name, after MS milliseconds: a slow answer, the rest served meanwhile) on
//! 127.0.0.1:PORT. MODES is a comma-separated list, one per replica index (the last one
//! applies to higher indexes), each one of:
//! - `ok`: healthy and ready;
//! - `exit:N`: exits with code N at once (a crash loop);
//! - `never-ready`: alive, but `/readyz` always answers 503;
//! - `flap:MS`: readiness alternates every MS milliseconds;
//! - `hog:MIB`: ready, then allocates and touches MIB mebibytes per 100 ms, up to 1 GiB
//!   (a cap so that a limit that fails to act cannot take the test machine down).
//!
//! A hung replica is made by the tests themselves, with SIGSTOP.

use std::io::Write;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, name, modes, index] = args.as_slice() else {
        let _ = writeln!(
            std::io::stderr(),
            "usage: fake-replica PORT NAME MODES INDEX"
        );
        return std::process::ExitCode::from(2);
    };
    let modes: Vec<&str> = modes.split(',').collect();
    let index: usize = index.parse().unwrap_or(0);
    let mode = modes
        .get(index)
        .or(modes.last())
        .copied()
        .unwrap_or("ok")
        .to_owned();
    let _ = writeln!(
        std::io::stderr(),
        "fake-replica {name} on port {port}, mode {mode}"
    );
    if let Some(code) = mode.strip_prefix("exit:") {
        return std::process::ExitCode::from(code.parse::<u8>().unwrap_or(1));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(serve(port.clone(), name.clone(), mode));
    std::process::ExitCode::SUCCESS
}

async fn serve(port: String, name: String, mode: String) {
    let started = Instant::now();
    let ready_mode = mode.clone();
    let slow_name = name.clone();
    let app = Router::new()
        .route("/", get(move || async move { name }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/sleep/{ms}",
            get(move |axum::extract::Path(ms): axum::extract::Path<u64>| {
                let name = slow_name.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
                    name
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let mode = ready_mode.clone();
                async move {
                    let ready = match mode.split_once(':') {
                        _ if mode == "never-ready" => false,
                        Some(("flap", ms)) => {
                            let period = ms.parse::<u128>().unwrap_or(500).max(1);
                            (started.elapsed().as_millis() / period).is_multiple_of(2)
                        }
                        _ => true,
                    };
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        );
    if let Some(mib) = mode
        .strip_prefix("hog:")
        .and_then(|m| m.parse::<usize>().ok())
    {
        std::thread::spawn(move || {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                if hoard.len() * mib < 1024 {
                    // Touch every page so the memory is really resident.
                    hoard.push(vec![0x5a; mib << 20]);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}"))
        .await
        .expect("bind");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal");
        term.recv().await;
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .expect("serve");
}
