//! Liveness, readiness, version and metrics endpoints: what a supervisor probes.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::state::AppState;

/// How long the database may take to answer a liveness check.
const LIVENESS_DEADLINE: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, `starting` (database not open yet) or `failing`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct VersionInfo {
    pub service: &'static str,
    pub version: &'static str,
    pub instance: String,
    /// The database schema version this build migrates to.
    pub schema_version: u32,
}

/// Liveness: the event loop answers, and an embedded database answers within a deadline.
///
/// A remote database (PostgreSQL) is not asked: its outage is not this process's fault, and
/// a failing liveness probe would restart every replica at once for nothing. Readiness
/// reports it instead.
#[utoipa::path(get, path = "/healthz", responses(
    (status = 200, body = Health), (status = 503, body = Health)))]
pub(crate) async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let ok = |status| {
        (
            StatusCode::OK,
            Json(Health {
                status,
                error: None,
            }),
        )
    };
    match state.storage() {
        None => return ok("starting"),
        Some(storage) if !storage.is_embedded() => return ok("ok"),
        Some(_) => {}
    }
    let ping = state.query(|s| async move { s.ping().await });
    let error = match tokio::time::timeout(LIVENESS_DEADLINE, ping).await {
        Ok(Ok(())) => return ok("ok"),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("the database did not answer within {LIVENESS_DEADLINE:?}"),
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(Health {
            status: "failing",
            error: Some(error),
        }),
    )
}

/// Readiness: 503 until the database is open and migrated, while it does not answer, and
/// once draining.
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub(crate) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let reason = if state.is_draining() {
        Some("draining")
    } else if state.storage().is_none() {
        Some("database not open")
    } else if !state.is_reachable() {
        Some("database unreachable")
    } else {
        None
    };
    let status = if reason.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        status,
        Json(Readiness {
            ready: reason.is_none(),
            reason,
        }),
    )
}

/// The running version.
#[utoipa::path(get, path = "/version", responses((status = 200, body = VersionInfo)))]
pub(crate) async fn version(State(state): State<AppState>) -> Json<VersionInfo> {
    Json(VersionInfo {
        service: "quote-service",
        version: crate::VERSION,
        instance: state.instance().to_owned(),
        schema_version: quote_store::latest_version(),
    })
}

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "application/openmetrics-text")))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics().encode(),
    )
        .into_response()
}
