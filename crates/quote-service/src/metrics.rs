//! Prometheus metrics and the middleware that records them, names the replica in every
//! response, and logs internal errors once.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing::Instrument;

use crate::error::InternalCause;
use crate::state::AppState;

/// The header naming the replica that answered.
pub const SERVED_BY: &str = "x-served-by";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    db_errors: Counter,
    // Only a remote database (the `postgres` feature) is ever unreachable; without it
    // these stay at 0 and 1, so dashboards read the same for either build.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    db_unreachable: Counter,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    db_reachable: Gauge,
    in_flight: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn latency_histogram() -> Histogram {
    // 100 µs to about 1.6 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("quote");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let db_errors = Counter::default();
        let in_flight = Gauge::default();
        let db_unreachable = Counter::default();
        let db_reachable = Gauge::default();
        db_reachable.set(1);
        registry.register(
            "http_requests",
            "HTTP requests by method, route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from request to response head, by route",
            latency.clone(),
        );
        registry.register(
            "db_errors",
            "Database operations that failed",
            db_errors.clone(),
        );
        registry.register(
            "db_unreachable",
            "Checks and connection attempts that found the database unreachable",
            db_unreachable.clone(),
        );
        registry.register(
            "db_reachable",
            "1 while the database answers, 0 while it does not",
            db_reachable.clone(),
        );
        registry.register(
            "http_requests_in_flight",
            "Requests received and not yet answered",
            in_flight.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            db_errors,
            db_unreachable,
            db_reachable,
            in_flight,
        }
    }
}

impl Metrics {
    pub(crate) fn db_error(&self) {
        self.db_errors.inc();
    }

    /// One failed reachability check or connection attempt.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn db_unreachable(&self) {
        self.db_unreachable.inc();
        self.db_reachable.set(0);
    }

    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn db_reachable(&self) {
        self.db_reachable.set(1);
    }

    /// The Prometheus text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The route a request matched, carried out to [`observe`] in the response extensions
/// (a layer around the whole router runs before routing and cannot see it directly).
#[derive(Debug, Clone)]
struct RouteTag(String);

/// Route layer: tags the response with the matched route template.
pub(crate) async fn tag_route(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(RouteTag(route));
    }
    response
}

/// Outermost layer: a span per request, metrics, `X-Served-By`, and the one log line of a 500.
pub(crate) async fn observe(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let span = tracing::debug_span!("request", %method, path = %request.uri().path());
    let metrics = state.metrics();
    let in_flight = InFlight::enter(&metrics.in_flight);
    let mut response = next.run(request).instrument(span.clone()).await;
    drop(in_flight);
    let route = response
        .extensions()
        .get::<RouteTag>()
        .map_or_else(|| "unmatched".to_owned(), |tag| tag.0.clone());
    let status = response.status().as_u16();
    metrics
        .requests
        .get_or_create(&RequestLabels {
            method,
            route: route.clone(),
            status,
        })
        .inc();
    metrics
        .latency
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    if let Some(InternalCause(cause)) = response.extensions().get::<InternalCause>() {
        span.in_scope(|| tracing::error!(%route, %cause, "request failed"));
    }
    if let Ok(value) = HeaderValue::from_str(state.instance()) {
        response.headers_mut().insert(SERVED_BY, value);
    }
    response
}

/// Counts a request in flight until dropped, also when the client goes away mid-request.
struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    fn enter(gauge: &'a Gauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
