//! The router: the device's "Service". It listens on the public address and forwards each
//! HTTP request to a ready replica, round robin. A replica that refuses the connection, or
//! breaks it before answering an idempotent request, is skipped and the request goes to the
//! next one, so a replica killed under load costs clients nothing.
//!
//! In-band detection: a replica that leaves a request unanswered for the readiness probe's
//! timeout, and has answered nothing else since that request was sent, is reported *silent*
//! to the dispatcher, which takes it out of the rotation at once and has the readiness probe
//! confirm (like Envoy's outlier detection, confirmed by a probe). Under load a hang then
//! leaves the rotation after one probe timeout instead of `failure_threshold` probe periods.
//! The request itself keeps waiting (up to `UPSTREAM_TIMEOUT`): it may be slow, not lost.
//!
//! Architecture invariant: the router only ever reads the set of ready replicas that the
//! dispatcher publishes; it never decides readiness itself (a silence report is a hint the
//! dispatcher's model acts on, as it does on a probe result).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme, Uri};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::{CodeLabels, KindLabels, Metrics};

/// Largest request body the router buffers (it must, to retry on another replica): the
/// service's own limit (`quote_service::BODY_LIMIT`; a test keeps the two equal), so nothing
/// larger is held in memory only to be refused by the replica.
pub const MAX_BODY: usize = 16 * 1024;

/// How long a client has to send a request's headers, and to start the next request on a
/// kept-alive connection: a slow or idle connection (slowloris) is closed after it.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a replica has to start answering. A request that waits longer gets 504 and is not
/// retried (it may have been applied; a hung replica is the probes' to remove).
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(10);

/// Open client connections allowed from one address by default (`max_connections_per_peer`):
/// one client cannot take every slot.
pub const MAX_CONNECTIONS_PER_PEER: usize = 64;

/// Descriptors kept out of the router's reach for everything else the supervisor opens:
/// replicas' pipes and sockets, probes, the control socket, the admin endpoint, OTA files.
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// A replica in rotation.
#[derive(Debug, Clone)]
pub struct Backend {
    pub id: String,
    pub port: u16,
    /// `127.0.0.1:port`, made once: each request's URI shares it instead of formatting its own.
    authority: Authority,
    /// What the router has seen of this process since it entered the rotation.
    pub health: Arc<Health>,
}

impl Backend {
    /// A replica entering the rotation, with nothing seen yet.
    pub fn new(id: String, port: u16) -> Self {
        let authority = Authority::try_from(format!("127.0.0.1:{port}"))
            .expect("an IPv4 address and a port make an authority");
        Backend {
            id,
            port,
            authority,
            health: Arc::default(),
        }
    }

    /// The URI of `path` on this replica.
    fn uri(&self, path: &PathAndQuery) -> Uri {
        let mut parts = hyper::http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path.clone());
        Uri::from_parts(parts).expect("scheme, authority and path make a URI")
    }
}

/// The same replica process: the health seen is not part of its identity.
impl PartialEq for Backend {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.port == other.port
    }
}

impl Eq for Backend {}

/// The start of the router's clock: `Health` keeps times as nanoseconds since it, in atomics.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn ticks() -> u64 {
    u64::try_from(EPOCH.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The router's view of one replica process, shared by every request to it.
#[derive(Debug, Default)]
pub struct Health {
    /// When its last answer (response head) arrived, in `ticks()`; 0 before the first.
    last_answer: AtomicU64,
    /// When it was last reported silent, in `ticks()`; 0 before the first report. Reports
    /// are spaced by the silence delay: the model may refuse one (another replica is out
    /// already), and a later silence must still be told.
    last_report: AtomicU64,
}

impl Health {
    fn answered(&self) {
        // The latest wins even when two answers race: a stale time could report a live replica.
        self.last_answer.fetch_max(ticks(), Ordering::Relaxed);
    }

    /// Whether a request sent at `sent` and still unanswered at `now` shows the replica
    /// silent (it has answered nothing since) and is due to be reported: at most one report
    /// per `every`, however many requests wait on it.
    fn silent_since(&self, sent: u64, now: u64, every: Duration) -> bool {
        let every = u64::try_from(every.as_nanos()).unwrap_or(u64::MAX);
        self.last_answer.load(Ordering::Relaxed) < sent
            && self
                .last_report
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                    (last == 0 || now.saturating_sub(last) >= every).then_some(now.max(1))
                })
                .is_ok()
    }
}

/// In-band detection: after how long an unanswered request makes its replica suspect, and
/// whom to tell. Off when `after` is not below `UPSTREAM_TIMEOUT` (the request has failed by
/// then anyway).
#[derive(Clone)]
pub struct Silence {
    pub after: Duration,
    pub report: Arc<dyn Fn(&Backend) + Send + Sync>,
}

pub type Body = BoxBody<Bytes, hyper::Error>;

pub struct Router {
    backends: watch::Receiver<Arc<[Backend]>>,
    client: Client<HttpConnector, Full<Bytes>>,
    /// The round-robin position, shared by every accept loop's router: the rotation is one.
    next: Arc<AtomicUsize>,
    silence: Option<Silence>,
    /// `proxied{code="1xx"}` to `"9xx"` (hyper allows 100 to 999), looked up once rather
    /// than per request.
    answered: [prometheus_client::metrics::counter::Counter; 9],
    pub(crate) metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").finish_non_exhaustive()
    }
}

/// Connection-level headers that must not be forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers the sender named in `Connection` are for this hop only, whatever their name.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove("keep-alive");
}

impl Router {
    /// A router over the published `backends`; `silence` turns in-band detection on; `next`
    /// is the round-robin position, shared by the routers of one rotation.
    pub fn new(
        backends: watch::Receiver<Arc<[Backend]>>,
        metrics: Arc<Metrics>,
        silence: Option<Silence>,
        next: Arc<AtomicUsize>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build(connector);
        Router {
            backends,
            client,
            next,
            silence: silence.filter(|s| s.after < UPSTREAM_TIMEOUT),
            answered: std::array::from_fn(|class| {
                metrics
                    .proxied
                    .get_or_create(&CodeLabels {
                        code: format!("{}xx", class + 1),
                    })
                    .clone()
            }),
            metrics,
        }
    }

    /// Sends one request to `backend` and waits for the head of its answer, for at most
    /// `UPSTREAM_TIMEOUT` (`None`). If the silence delay passes first and the replica has
    /// answered nothing since the request was sent, it is reported (at most once per silence
    /// delay); the wait goes on.
    async fn exchange(
        &self,
        backend: &Backend,
        upstream: Request<Full<Bytes>>,
    ) -> Option<Result<Response<Incoming>, hyper_util::client::legacy::Error>> {
        let sent = ticks();
        let mut pending = std::pin::pin!(self.client.request(upstream));
        let mut left = UPSTREAM_TIMEOUT;
        if let Some(silence) = &self.silence {
            match tokio::time::timeout(silence.after, &mut pending).await {
                Ok(answer) => {
                    if answer.is_ok() {
                        backend.health.answered();
                    }
                    return Some(answer);
                }
                Err(_) => {
                    if backend.health.silent_since(sent, ticks(), silence.after) {
                        tracing::warn!(replica = %backend.id, after = ?silence.after, "no answer and nothing else answered: reporting the replica silent");
                        (silence.report)(backend);
                    }
                    left -= silence.after;
                }
            }
        }
        let answer = tokio::time::timeout(left, pending).await.ok()?;
        if answer.is_ok() {
            backend.health.answered();
        }
        Some(answer)
    }

    /// Forwards one request.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let response = self.forward(request).await;
        // A status is 100 to 999; hyper refuses the rest.
        let class = usize::from(response.status().as_u16() / 100).clamp(1, 9) - 1;
        self.answered[class].inc();
        response
    }

    /// The request's body, read whole (a retry sends it again), or the refusal to send back.
    async fn read_body(&self, body: Incoming) -> Result<bytes::Bytes, Response<Body>> {
        if body.is_end_stream() {
            // No body (a GET, most of the traffic): nothing to read or hold.
            return Ok(Bytes::new());
        }
        match Limited::new(body, MAX_BODY).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(error)
                if error
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                Err(self.refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body",
                    &format!("the body is larger than {MAX_BODY} bytes"),
                ))
            }
            Err(error) => Err(self.refuse(
                StatusCode::BAD_REQUEST,
                "body",
                &format!("could not read the request body: {error}"),
            )),
        }
    }

    async fn forward(&self, request: Request<Incoming>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let body = match self.read_body(body).await {
            Ok(body) => body,
            Err(refused) => return refused,
        };
        let backends = self.backends.borrow().clone();
        if backends.is_empty() {
            return self.refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_backend",
                "no replica is ready",
            );
        }
        let idempotent = matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::PUT
                | Method::DELETE
                | Method::TRACE
        );
        let root = PathAndQuery::from_static("/");
        let path = parts.uri.path_and_query().unwrap_or(&root);
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last_error = String::new();
        for attempt in 0..backends.len() {
            let backend = &backends[(start + attempt) % backends.len()];
            let mut upstream = Request::new(Full::new(body.clone()));
            *upstream.method_mut() = parts.method.clone();
            *upstream.headers_mut() = headers.clone();
            *upstream.uri_mut() = backend.uri(path);
            let Some(answer) = self.exchange(backend, upstream).await else {
                tracing::warn!(replica = %backend.id, timeout = ?UPSTREAM_TIMEOUT, "no answer from the replica");
                return self.refuse(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    &format!(
                        "{} did not answer within {}",
                        backend.id,
                        humantime::format_duration(UPSTREAM_TIMEOUT)
                    ),
                );
            };
            match answer {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    return Response::from_parts(parts, body.boxed());
                }
                // A refused connection never delivered the request; an idempotent request
                // may be repeated whatever happened to it.
                Err(error) if error.is_connect() || idempotent => {
                    tracing::debug!(replica = %backend.id, %error, "retrying on another replica");
                    self.metrics.proxy_retries.inc();
                    last_error = format!("{}: {error}", backend.id);
                }
                Err(error) => {
                    tracing::warn!(replica = %backend.id, %error, "a non-idempotent request failed mid-flight");
                    return self.refuse(
                        StatusCode::BAD_GATEWAY,
                        "upstream",
                        &format!("{} failed while handling the request; it may or may not have been applied", backend.id),
                    );
                }
            }
        }
        self.refuse(
            StatusCode::BAD_GATEWAY,
            "upstream",
            &format!("every ready replica failed (last: {last_error})"),
        )
    }

    fn refuse(&self, status: StatusCode, kind: &str, message: &str) -> Response<Body> {
        self.metrics
            .proxy_errors
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
        let body = serde_json::json!({ "error": message }).to_string();
        let mut response = Response::new(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        );
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert("x-served-by", HeaderValue::from_static("edge-supervisor"));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// Client connections the router serves at once, from the descriptor limit: each takes one
/// descriptor and at most one pooled connection to a replica, and `RESERVED_DESCRIPTORS` stay
/// for the rest of the supervisor. More clients wait in the kernel's accept queue, holding no
/// descriptor of ours.
pub fn connection_cap() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let cap = limit.saturating_sub(RESERVED_DESCRIPTORS) / 2;
    usize::try_from(cap.clamp(16, 4096)).unwrap_or(4096)
}

/// Open connections per client address (at most `.1`), released when a connection ends.
#[derive(Debug)]
struct Peers(
    std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    usize,
);

/// One open connection of `peer`, counted until dropped.
struct PeerSlot(Arc<Peers>, std::net::IpAddr);

impl Peers {
    fn enter(self: &Arc<Self>, peer: std::net::IpAddr) -> Option<PeerSlot> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(peer).or_default();
        if *count >= self.1 {
            return None;
        }
        *count += 1;
        Some(PeerSlot(Arc::clone(self), peer))
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.1) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.1);
            }
        }
    }
}

/// Accepts connections until `shutdown` completes, then lets open connections finish their
/// current request for up to `grace`. At most `cap` connections are open at once (the rest
/// wait in the accept queue), at most `per_peer` from one address (more are closed at once);
/// each must send its headers within `HEADER_TIMEOUT`.
/// The router's connection limits, shared by every accept loop: at most `cap` client
/// connections at once, and at most `per_peer` from one address.
#[derive(Clone)]
pub struct Limits {
    slots: Arc<tokio::sync::Semaphore>,
    peers: Arc<Peers>,
}

impl Limits {
    pub fn new(cap: usize, per_peer: usize) -> Self {
        Limits {
            slots: Arc::new(tokio::sync::Semaphore::new(cap)),
            peers: Arc::new(Peers(std::sync::Mutex::default(), per_peer)),
        }
    }
}

/// One accept loop of the router: serves `listener` (several loops may share one listening
/// socket, each on its own thread) within `limits` until `shutdown`, then lets open
/// connections finish for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    router: Arc<Router>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    limits: Limits,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let Limits { slots, peers } = limits;
    let mut accept_errors = 0u32;
    tokio::pin!(shutdown);
    loop {
        // A slot first: without one, the next client waits in the kernel's queue.
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer): (_, SocketAddr) = match accepted {
                    Ok(accepted) => {
                        accept_errors = 0;
                        accepted
                    }
                    Err(error) => {
                        // Out of file descriptors and the like: back off (up to 1 s) instead
                        // of spinning, and say so once per streak.
                        if accept_errors == 0 {
                            tracing::warn!(%error, "accept failed; backing off");
                        }
                        accept_errors = accept_errors.saturating_add(1);
                        router.metrics.accept_errors.inc();
                        let pause = Duration::from_millis(10u64 << accept_errors.min(7));
                        tokio::time::sleep(pause.min(Duration::from_secs(1))).await;
                        continue;
                    }
                };
                let Some(peer_slot) = peers.enter(peer.ip()) else {
                    router.metrics.connections_refused.inc();
                    tracing::debug!(%peer, "too many connections from this address: closed");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let router = Arc::clone(&router);
                let service = hyper::service::service_fn(move |request| {
                    let router = Arc::clone(&router);
                    async move { Ok::<_, std::convert::Infallible>(router.handle(request).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%peer, %error, "client connection ended with an error");
                    }
                    drop((slot, peer_slot));
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "client connections still open after the grace period"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_buffers_no_larger_body_than_the_service_accepts() {
        assert_eq!(MAX_BODY, quote_service::BODY_LIMIT);
    }

    #[test]
    fn a_silent_replica_is_reported_once_per_silence_delay_and_never_after_an_answer() {
        let health = Health::default();
        let every = Duration::from_nanos(200);
        assert!(
            health.silent_since(100, 300, every),
            "nothing answered since 100"
        );
        assert!(!health.silent_since(150, 350, every), "reported 50 ns ago");
        assert!(
            health.silent_since(150, 500, every),
            "due again (the model may have refused)"
        );
        health.last_answer.store(600, Ordering::Relaxed);
        assert!(
            !health.silent_since(550, 900, every),
            "it answered after the request was sent"
        );
    }

    #[test]
    fn an_address_holds_at_most_its_configured_connections_until_one_closes() {
        let peers = Arc::new(Peers(std::sync::Mutex::default(), 2));
        let one: std::net::IpAddr = [127, 0, 0, 1].into();
        let other: std::net::IpAddr = [127, 0, 0, 2].into();
        let first = peers.enter(one).expect("1 of 2");
        let _second = peers.enter(one).expect("2 of 2");
        assert!(peers.enter(one).is_none(), "a third from the same address");
        let _elsewhere = peers
            .enter(other)
            .expect("another address has its own count");
        drop(first);
        assert!(
            peers.enter(one).is_some(),
            "a closed connection frees its place"
        );
    }

    #[test]
    fn headers_named_in_connection_are_not_forwarded() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            "keep-alive, X-Secret-Hop".parse().unwrap(),
        );
        headers.append(header::CONNECTION, "x-other".parse().unwrap());
        headers.insert("x-secret-hop", "1".parse().unwrap());
        headers.insert("x-other", "2".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(header::TE, "trailers".parse().unwrap());
        headers.insert("x-request-id", "abc".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-request-id"]);
    }
}
