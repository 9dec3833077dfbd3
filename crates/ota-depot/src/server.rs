//! The depot's HTTP server (axum): the device API (nonce, signed poll and report), the
//! operator's API (upload, publish, halt, resume, abort: bearer token), the status JSON and
//! page, and the bundles as static files with `Range`.
//!
//! Architecture invariant: a refused request changes nothing: the token is checked before the
//! body is read, the nonce taken back and the signature checked before the body is parsed, and
//! the depot's verbs change memory only after the store made the change durable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use depot_proto::auth::{self, AuthError};
use depot_proto::wire::{ErrorBody, Nonce, Poll, Report};
use http_body_util::BodyExt;
use tokio::io::AsyncWriteExt;

use crate::depot::{Depot, DepotError};

/// How long a nonce may wait for its signed request.
pub const NONCE_TTL: Duration = Duration::from_secs(60);
/// Most nonces outstanding; past it the oldest is dropped (its device asks again).
pub const MAX_NONCES: usize = 4096;
/// Largest signed request body (a report carries a receipt).
pub const MAX_REQUEST: usize = 64 * 1024;

/// The depot shared by the handlers. The depot's verbs run on the blocking pool (they fsync).
#[derive(Clone)]
pub struct AppState {
    depot: Arc<Mutex<Depot>>,
    nonces: Arc<Mutex<Nonces>>,
    token: Arc<String>,
    incoming: Arc<PathBuf>,
    max_bundle: u64,
}

impl AppState {
    /// `incoming` must be on the bundle directory's file system (an upload is renamed into it).
    pub fn new(depot: Depot, token: String, incoming: &Path, max_bundle: u64) -> AppState {
        AppState {
            depot: Arc::new(Mutex::new(depot)),
            nonces: Arc::new(Mutex::new(Nonces::default())),
            token: Arc::new(token),
            incoming: Arc::new(incoming.to_owned()),
            max_bundle,
        }
    }

    async fn with_depot<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Depot) -> Result<T, DepotError> + Send + 'static,
    ) -> Result<T, AppError> {
        let depot = self.depot.clone();
        tokio::task::spawn_blocking(move || f(&mut depot.lock().expect("depot lock")))
            .await
            .map_err(|e| AppError::Internal(format!("depot task: {e}")))?
            .map_err(AppError::from)
    }
}

/// Single-use nonces, in memory: a restart forgets them, and devices ask for new ones.
#[derive(Default)]
pub struct Nonces {
    issued: HashMap<String, Instant>,
}

impl Nonces {
    pub fn issue(&mut self, now: Instant) -> String {
        if self.issued.len() >= MAX_NONCES {
            self.issued
                .retain(|_, at| now.duration_since(*at) < NONCE_TTL);
        }
        if self.issued.len() >= MAX_NONCES
            && let Some(oldest) = self
                .issued
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(n, _)| n.clone())
        {
            self.issued.remove(&oldest);
        }
        let mut bytes = [0u8; auth::NONCE_LEN / 2];
        getrandom::fill(&mut bytes).expect("the system's random source");
        let nonce = hex::encode(bytes);
        self.issued.insert(nonce.clone(), now);
        nonce
    }

    /// Takes a nonce back: true once, for a nonce issued less than [`NONCE_TTL`] ago.
    pub fn take(&mut self, nonce: &str, now: Instant) -> bool {
        self.issued
            .remove(nonce)
            .is_some_and(|at| now.duration_since(at) < NONCE_TTL)
    }
}

/// Every failure, rendered as a status and a JSON `{"error"}`.
#[derive(Debug)]
pub enum AppError {
    Auth(AuthError),
    Unauthorized,
    Depot(DepotError),
    BadRequest(String),
    TooLarge(u64),
    Internal(String),
}

impl From<DepotError> for AppError {
    fn from(e: DepotError) -> AppError {
        AppError::Depot(e)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            AppError::Auth(e) => (StatusCode::UNAUTHORIZED, e.to_string()),
            AppError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "this needs the depot's admin token (Authorization: Bearer)".to_owned(),
            ),
            AppError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            AppError::TooLarge(max) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the bundle is over the depot's limit of {max} bytes (--max-bundle-size)"),
            ),
            AppError::Depot(e) => match e {
                DepotError::NotEnrolled(_) => (StatusCode::FORBIDDEN, e.to_string()),
                DepotError::NotFound(_) => (StatusCode::NOT_FOUND, e.to_string()),
                DepotError::Conflict(_) => (StatusCode::CONFLICT, e.to_string()),
                DepotError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
                DepotError::Store(ref s) if s.is_full() => {
                    tracing::error!(error = %e, "storage full");
                    (
                        StatusCode::INSUFFICIENT_STORAGE,
                        "the depot's disk is full".to_owned(),
                    )
                }
                DepotError::Io { ref source, .. } if source.raw_os_error() == Some(28) => {
                    tracing::error!(error = %e, "storage full");
                    (
                        StatusCode::INSUFFICIENT_STORAGE,
                        "the depot's disk is full".to_owned(),
                    )
                }
                DepotError::Store(_) | DepotError::Io { .. } => {
                    tracing::error!(error = %e, "internal error");
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal error".to_owned(),
                    )
                }
            },
            AppError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error".to_owned(),
                )
            }
        };
        (status, axum::Json(ErrorBody { error: message })).into_response()
    }
}

/// The router over `state`, serving bundles from `bundle_dir`.
pub fn app(state: AppState, bundle_dir: &Path) -> Router {
    let bundles = Router::new()
        .nest_service("/bundles", tower_http::services::ServeDir::new(bundle_dir))
        .layer(middleware::from_fn_with_state(state.clone(), count_served));
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/v1/status", get(status))
        .route("/api/v1/nonce", get(nonce))
        .route("/api/v1/poll", post(poll))
        .route("/api/v1/report", post(report))
        .route("/api/v1/rollouts", post(publish))
        .route("/api/v1/rollouts/{id}/{verb}", post(control))
        .layer(DefaultBodyLimit::max(MAX_REQUEST))
        .route("/api/v1/bundles", post(upload))
        .merge(bundles)
        .with_state(state)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn status(
    State(state): State<AppState>,
) -> Result<axum::Json<depot_proto::wire::Status>, AppError> {
    Ok(axum::Json(state.with_depot(|d| Ok(d.status())).await?))
}

async fn page(State(state): State<AppState>) -> Result<Html<String>, AppError> {
    let status = state.with_depot(|d| Ok(d.status())).await?;
    Ok(Html(crate::page::render(&status)))
}

async fn nonce(State(state): State<AppState>) -> axum::Json<Nonce> {
    let nonce = state.nonces.lock().expect("nonces").issue(Instant::now());
    axum::Json(Nonce { nonce })
}

/// The signed request's checks, in order: the three headers, the nonce taken back, the
/// signature over method, path, nonce and body. Returns the device key and the parsed body.
fn verify_signed<T: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    path: &str,
    body: &[u8],
) -> Result<(ota_bundle::PublicKey, T), AppError> {
    let header = |name: &'static str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or(AppError::Auth(AuthError::Missing(name)))
    };
    let key = header(auth::KEY_HEADER)?;
    let nonce = header(auth::NONCE_HEADER)?;
    let signature = header(auth::SIGNATURE_HEADER)?;
    if !state
        .nonces
        .lock()
        .expect("nonces")
        .take(nonce, Instant::now())
    {
        return Err(AppError::Auth(AuthError::Replayed));
    }
    let public = auth::verify(key, signature, "POST", path, nonce, body).map_err(AppError::Auth)?;
    let parsed = serde_json::from_slice(body)
        .map_err(|e| AppError::BadRequest(format!("the body of {path} is not valid: {e}")))?;
    Ok((public, parsed))
}

async fn poll(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<axum::Json<depot_proto::wire::PollReply>, AppError> {
    let (public, poll): (_, Poll) = verify_signed(&state, &headers, "/api/v1/poll", &body)?;
    let reply = state
        .with_depot(move |d| d.poll(&public, &poll, unix_now()))
        .await?;
    Ok(axum::Json(reply))
}

async fn report(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<axum::Json<depot_proto::wire::ReportReply>, AppError> {
    let (public, report): (_, Report) = verify_signed(&state, &headers, "/api/v1/report", &body)?;
    let reply = state
        .with_depot(move |d| d.report(&public, &report, unix_now()))
        .await?;
    Ok(axum::Json(reply))
}

fn authorised(state: &AppState, headers: &HeaderMap) -> Result<(), AppError> {
    use subtle::ConstantTimeEq;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(state.token.as_bytes())) && !given.is_empty() {
        Ok(())
    } else {
        Err(AppError::Unauthorized)
    }
}

/// Streams an upload to a temporary file (bounded by `--max-bundle-size`), then verifies it
/// whole before it is kept.
async fn upload(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<depot_proto::wire::BundleAccepted>, AppError> {
    authorised(&state, &headers)?;
    // Refused on its declared length before a byte of the body is read (a client that sent
    // `Expect: 100-continue` then sends none).
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > state.max_bundle) {
        return Err(AppError::TooLarge(state.max_bundle));
    }
    let mut name = [0u8; 8];
    getrandom::fill(&mut name).expect("the system's random source");
    let temp = state
        .incoming
        .join(format!("upload-{}.part", hex::encode(name)));
    let written = receive(&temp, body, state.max_bundle).await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(e);
    }
    // Verified without the depot's lock (seconds for a big bundle: polls and reports go on),
    // with the keys as they are now; then kept under it.
    let trusted = state.depot.lock().expect("depot lock").trusted().clone();
    let checked = temp.clone();
    let stored =
        tokio::task::spawn_blocking(move || crate::depot::verify_upload(&checked, &trusted))
            .await
            .map_err(|e| AppError::Internal(format!("verify task: {e}")))??;
    let accepted = state
        .with_depot(move |d| d.add_bundle(&temp, stored))
        .await?;
    tracing::info!(digest = %accepted.digest, version = %accepted.version, size = accepted.size, "bundle accepted");
    Ok(axum::Json(accepted))
}

async fn receive(temp: &Path, body: Body, max: u64) -> Result<(), AppError> {
    let io = |e: std::io::Error| {
        AppError::Depot(DepotError::Io {
            path: temp.to_owned(),
            source: e,
        })
    };
    let mut file = tokio::fs::File::create(temp).await.map_err(io)?;
    let mut body = body;
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| AppError::BadRequest(format!("the upload broke off: {e}")))?;
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            if total > max {
                return Err(AppError::TooLarge(max));
            }
            file.write_all(&data).await.map_err(io)?;
        }
    }
    file.flush().await.map_err(io)?;
    Ok(())
}

async fn publish(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<axum::Json<depot_proto::wire::Published>, AppError> {
    authorised(&state, &headers)?;
    Ok(axum::Json(
        state.with_depot(move |d| d.publish(&body)).await?,
    ))
}

async fn control(
    State(state): State<AppState>,
    headers: HeaderMap,
    UrlPath((id, verb)): UrlPath<(u64, String)>,
) -> Result<axum::Json<depot_proto::wire::RolloutStatus>, AppError> {
    authorised(&state, &headers)?;
    Ok(axum::Json(
        state.with_depot(move |d| d.control(id, &verb)).await?,
    ))
}

/// Counts each bundle response's bytes (its `Content-Length`) against the rollouts of that
/// bundle, and logs who asked when the device named itself.
async fn count_served(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let digest = request
        .uri()
        .path()
        .rsplit('/')
        .next()
        .and_then(|f| f.strip_suffix(".bundle"))
        .map(str::to_owned);
    let downloader = request
        .headers()
        .get(auth::DOWNLOADER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let range = request
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let response = next.run(request).await;
    if let Some(digest) = digest
        && response.status().is_success()
    {
        let bytes = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        tracing::info!(%digest, bytes, range = ?range, downloader = ?downloader, "bundle served");
        state
            .depot
            .lock()
            .expect("depot lock")
            .served(&digest, bytes);
    }
    response
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_taken_back_once_and_not_after_it_expired() {
        let mut nonces = Nonces::default();
        let t0 = Instant::now();
        let a = nonces.issue(t0);
        assert_eq!(a.len(), auth::NONCE_LEN);
        assert!(nonces.take(&a, t0));
        assert!(!nonces.take(&a, t0), "a nonce is single use");
        let b = nonces.issue(t0);
        assert!(!nonces.take(&b, t0 + NONCE_TTL), "expired");
        assert!(!nonces.take("never issued", t0));
        // Bounded: past the cap the oldest goes.
        let first = nonces.issue(t0);
        for i in 0..MAX_NONCES {
            nonces.issue(t0 + Duration::from_millis(1 + i as u64));
        }
        assert!(nonces.issued.len() <= MAX_NONCES);
        assert!(!nonces.take(&first, t0 + Duration::from_secs(1)));
    }
}
