//! Benchmark baseline: the smallest axum service shaped like quote-service (a JSON body and an
//! `X-Served-By` header, the same runtime settings) with no database and no middleware.
//! What quote-service costs beyond it is what the database, JSON and middleware cost.
//!
//! Usage: `bench-baseline ADDR`.

use std::io::Write;

use axum::Router;
use axum::routing::get;

fn main() -> std::process::ExitCode {
    let Some(addr) = std::env::args().nth(1) else {
        let _ = writeln!(std::io::stderr(), "usage: bench-baseline ADDR");
        return std::process::ExitCode::from(2);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let app = Router::new().route(
            "/",
            get(|| async {
                (
                    [("content-type", "application/json"), ("x-served-by", "baseline")],
                    r#"{"id":1,"text":"Brevity is the soul of wit.","author":"William Shakespeare","created_at":"2026-01-01T00:00:00.000Z","served_by":"baseline"}"#,
                )
            }),
        );
        let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
        axum::serve(listener, app).await.expect("serve");
    });
    std::process::ExitCode::SUCCESS
}
