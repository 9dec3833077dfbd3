//! The router: the device's "Service". It listens on the public address and forwards each
//! HTTP request to a ready replica, round robin. A replica that refuses the connection, or
//! breaks it before answering an idempotent request, is skipped and the request goes to the
//! next one, so a replica killed under load costs clients nothing.
//!
//! Architecture invariant: the router only ever reads the set of ready replicas that the
//! dispatcher publishes; it never decides readiness itself.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::{CodeLabels, KindLabels, Metrics};

/// Largest request body the router buffers (it must, to retry on another replica).
pub const MAX_BODY: usize = 1 << 20;

/// A replica in rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub id: String,
    pub port: u16,
}

pub type Body = BoxBody<Bytes, hyper::Error>;

pub struct Router {
    backends: watch::Receiver<Arc<[Backend]>>,
    client: Client<HttpConnector, Full<Bytes>>,
    next: AtomicUsize,
    metrics: Arc<Metrics>,
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
    pub fn new(backends: watch::Receiver<Arc<[Backend]>>, metrics: Arc<Metrics>) -> Self {
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
            next: AtomicUsize::new(0),
            metrics,
        }
    }

    /// Forwards one request.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let response = self.forward(request).await;
        let class = format!("{}xx", response.status().as_u16() / 100);
        self.metrics
            .proxied
            .get_or_create(&CodeLabels { code: class })
            .inc();
        response
    }

    /// The request's body, read whole (a retry sends it again), or the refusal to send back.
    async fn read_body(&self, body: Incoming) -> Result<bytes::Bytes, Response<Body>> {
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
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut headers = parts.headers.clone();
        strip_hop_by_hop(&mut headers);
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last_error = String::new();
        for attempt in 0..backends.len() {
            let backend = &backends[(start + attempt) % backends.len()];
            let mut upstream = Request::new(Full::new(body.clone()));
            *upstream.method_mut() = parts.method.clone();
            *upstream.headers_mut() = headers.clone();
            match format!("http://127.0.0.1:{}{path}", backend.port).parse() {
                Ok(uri) => *upstream.uri_mut() = uri,
                Err(_) => {
                    return self.refuse(
                        StatusCode::BAD_REQUEST,
                        "target",
                        "the request target is not a valid path",
                    );
                }
            }
            match self.client.request(upstream).await {
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

/// Accepts connections until `shutdown` completes, then lets open connections finish their
/// current request for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    router: Arc<Router>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer): (_, SocketAddr) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let router = Arc::clone(&router);
                let service = hyper::service::service_fn(move |request| {
                    let router = Arc::clone(&router);
                    async move { Ok::<_, std::convert::Infallible>(router.handle(request).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%peer, %error, "client connection ended with an error");
                    }
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
