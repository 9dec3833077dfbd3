//! The supervisor's Prometheus metrics, and the admin HTTP endpoint that serves them.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestartLabels {
    pub replica: String,
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

/// Every metric the supervisor exports (prefix `edge_supervisor_`).
pub struct Metrics {
    registry: Registry,
    pub restarts: Family<RestartLabels, Counter>,
    pub ready: Gauge,
    pub desired: Gauge,
    pub crash_looping: Gauge,
    pub probe_seconds: Family<KindLabels, Histogram, fn() -> Histogram>,
    pub probe_failures: Family<KindLabels, Counter>,
    pub proxied: Family<CodeLabels, Counter>,
    pub proxy_errors: Family<KindLabels, Counter>,
    pub proxy_retries: Counter,
    pub silent_ejections: Counter,
    pub accept_errors: Counter,
    pub connections_refused: Counter,
    pub oom_kills: Counter,
    pub update_results: Family<ResultLabels, Counter>,
    pub update_in_progress: Gauge,
    pub security_version: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn probe_histogram() -> Histogram {
    // 100 µs to about 0.8 s: probe timeouts are a few hundred milliseconds.
    Histogram::new(exponential_buckets(0.0001, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("edge_supervisor");
        let m = Metrics {
            restarts: Family::default(),
            ready: Gauge::default(),
            desired: Gauge::default(),
            crash_looping: Gauge::default(),
            probe_seconds: Family::new_with_constructor(probe_histogram as fn() -> Histogram),
            probe_failures: Family::default(),
            proxied: Family::default(),
            proxy_errors: Family::default(),
            proxy_retries: Counter::default(),
            silent_ejections: Counter::default(),
            accept_errors: Counter::default(),
            connections_refused: Counter::default(),
            oom_kills: Counter::default(),
            update_results: Family::default(),
            update_in_progress: Gauge::default(),
            security_version: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "restarts",
            "Replica restarts by replica and reason",
            m.restarts.clone(),
        );
        registry.register("replicas_ready", "Replicas in rotation", m.ready.clone());
        registry.register("replicas_desired", "Replicas wanted", m.desired.clone());
        registry.register(
            "replicas_crash_looping",
            "Replica slots past their restart budget",
            m.crash_looping.clone(),
        );
        registry.register(
            "probe_duration_seconds",
            "Probe latency by kind",
            m.probe_seconds.clone(),
        );
        registry.register(
            "probe_failures",
            "Failed probes by kind",
            m.probe_failures.clone(),
        );
        registry.register(
            "proxied_requests",
            "Requests answered through the router, by status class",
            m.proxied.clone(),
        );
        registry.register(
            "proxy_errors",
            "Requests the router could not forward, by kind",
            m.proxy_errors.clone(),
        );
        registry.register(
            "proxy_retries",
            "Requests retried on another replica after a refused or broken connection",
            m.proxy_retries.clone(),
        );
        registry.register(
            "silent_ejections",
            "Replicas taken out of rotation because the router saw them leave a request unanswered for the readiness probe's timeout while answering nothing else",
            m.silent_ejections.clone(),
        );
        registry.register(
            "accept_errors",
            "Failed accepts on the public address (out of descriptors and the like)",
            m.accept_errors.clone(),
        );
        registry.register(
            "connections_refused",
            "Client connections closed at once: too many open from the same address",
            m.connections_refused.clone(),
        );
        registry.register(
            "oom_kills",
            "Replicas killed by the kernel for exceeding memory.max",
            m.oom_kills.clone(),
        );
        registry.register(
            "update_results",
            "Updates ended, by result: committed, rolled_back, install_failed, refused",
            m.update_results.clone(),
        );
        registry.register(
            "update_in_progress",
            "1 while the OTA agent installs, tries or rolls back an update",
            m.update_in_progress.clone(),
        );
        registry.register(
            "security_version",
            "The highest committed security version (the anti-rollback floor)",
            m.security_version.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Admin connections open at once; more wait in the accept queue.
const ADMIN_CONNECTIONS: usize = 16;

/// Serves `GET /metrics` (OpenMetrics text) and `GET /status` (the status JSON, asked of the
/// dispatcher like any control request) on the admin address. Read-only.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    control: tokio::sync::mpsc::Sender<crate::control::ControlRequest>,
) {
    // A few scrapers at a time: the admin address is for an operator and Prometheus.
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS));
    loop {
        let slot = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "admin: accept failed; backing off");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        let metrics = Arc::clone(&metrics);
        let control = control.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = Arc::clone(&metrics);
                let control = control.clone();
                async move {
                    let (code, kind, body) = match req.uri().path() {
                        "/metrics" => (
                            StatusCode::OK,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            metrics.encode(),
                        ),
                        "/status" => (StatusCode::OK, "application/json", status(&control).await),
                        _ => (
                            StatusCode::NOT_FOUND,
                            "text/plain",
                            "try /metrics or /status\n".to_owned(),
                        ),
                    };
                    Response::builder()
                        .status(code)
                        .header("content-type", kind)
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(crate::proxy::HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn status(control: &tokio::sync::mpsc::Sender<crate::control::ControlRequest>) -> String {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let request = crate::control::ControlRequest {
        request: edge_proto::Request::Status,
        reply,
    };
    if control.send(request).await.is_err() {
        return r#"{"error":"the supervisor is stopping"}"#.to_owned();
    }
    match answer.await {
        Ok(edge_proto::Reply::Status(status)) => serde_json::to_string(&status).unwrap_or_default(),
        _ => r#"{"error":"the supervisor is stopping"}"#.to_owned(),
    }
}
