//! Handlers driven with `oneshot`: status codes, bodies, and that refused requests write nothing.
//!
//! One suite, two backends: every test that is about the API, not about one backend, runs
//! against SQLite and against a real PostgreSQL (`on_both_backends!`).

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use proptest::prelude::*;
use quote_service::{AppState, app};
use quote_store::{Database, NewQuote, Options, Storage, seed_quotes};
use serde_json::{Value, json};
use tower::ServiceExt;

const INSTANCE: &str = "replica-test";

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    #[cfg(feature = "postgres")]
    Postgres,
}

/// Generates, for each named `async fn name(backend: Backend)`, the tests `sqlite::name`
/// and `postgres::name`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Sqlite).await } )*
        }
        #[cfg(feature = "postgres")]
        mod postgres {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Postgres).await } )*
        }
    };
}

on_both_backends!(
    every_response_names_the_replica,
    created_quote_is_served_back_at_its_location,
    listing_pages_through_all_quotes,
    bad_list_parameters_are_named,
    ids_are_checked,
    refused_writes_say_why_and_store_nothing,
    delete_removes_once,
    ids_are_never_reused,
    random_is_404_when_there_are_no_quotes,
    admin_token_guards_writes_only,
    metrics_count_requests_by_route_and_status,
);

struct Fixture {
    _dir: Option<tempfile::TempDir>,
    storage: Storage,
    state: AppState,
}

impl Fixture {
    /// A new, migrated and seeded database on `backend`; `None` when PostgreSQL is not
    /// installed here (the harness said so; under `CI=true` it failed instead).
    async fn new(backend: Backend) -> Option<Self> {
        Self::with(backend, None).await
    }

    async fn with(backend: Backend, token: Option<&str>) -> Option<Self> {
        let (dir, storage) = match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let (db, _) =
                    Database::open(&dir.path().join("quotes.db"), Options::default()).unwrap();
                (Some(dir), Storage::sqlite(db, 2))
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres => (None, postgres_storage().await?),
        };
        let state = AppState::new(INSTANCE, token.and_then(quote_service_token));
        state.attach_storage(storage.clone());
        Some(Fixture {
            _dir: dir,
            storage,
            state,
        })
    }

    fn app(&self) -> Router {
        app(self.state.clone())
    }

    async fn count(&self) -> i64 {
        self.storage.count().await.unwrap()
    }
}

/// A fresh database on the shared test server.
#[cfg(feature = "postgres")]
pub(crate) async fn postgres_storage() -> Option<Storage> {
    let pg = tests::postgres::Postgres::shared()?;
    let url = pg.url(&pg.create_database());
    let quote_store::Target::Postgres(target) = quote_store::Target::parse(&url, None).unwrap()
    else {
        unreachable!("a postgres:// URL is a PostgreSQL target");
    };
    let (storage, _) = quote_store::PgStorage::open(&target, 2).await.unwrap();
    Some(Storage::Postgres(storage))
}

fn quote_service_token(token: &str) -> Option<quote_service::AdminToken> {
    quote_service::AdminToken::new(token)
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

async fn send(app: Router, request: Request<Body>) -> Reply {
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
    }
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

fn post_json(uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.into())
        .unwrap()
}

fn error_text(reply: &Reply) -> &str {
    reply.body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error body: {:?}", reply.body))
}

async fn every_response_names_the_replica(backend: Backend) {
    let Some(f) = Fixture::new(backend).await else {
        return;
    };
    for request in [
        get("/quotes/random"),
        get("/quotes/1"),
        get("/quotes/999999"),
        get("/quotes/abc"),
        get("/nowhere"),
        Request::put("/quotes").body(Body::empty()).unwrap(),
        get("/metrics"),
    ] {
        let uri = request.uri().clone();
        let reply = send(f.app(), request).await;
        assert_eq!(
            reply
                .headers
                .get("x-served-by")
                .map(|v| v.to_str().unwrap()),
            Some(INSTANCE),
            "{uri} answered {}",
            reply.status
        );
    }
    let reply = send(f.app(), get("/quotes/1")).await;
    assert_eq!(reply.body["served_by"], INSTANCE);
}

async fn created_quote_is_served_back_at_its_location(backend: Backend) {
    let Some(f) = Fixture::new(backend).await else {
        return;
    };
    let body = json!({"text": "Premature optimization is the root of all evil.", "author": "Donald Knuth"});
    let reply = send(f.app(), post_json("/quotes", body.to_string())).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    let location = reply.headers[header::LOCATION].to_str().unwrap().to_owned();
    assert_eq!(location, format!("/quotes/{}", reply.body["id"]));
    let fetched = send(f.app(), get(&location)).await;
    assert_eq!(fetched.status, StatusCode::OK);
    for key in ["id", "text", "author", "created_at"] {
        assert_eq!(fetched.body[key], reply.body[key], "{key}");
    }
}

async fn listing_pages_through_all_quotes(backend: Backend) {
    let Some(f) = Fixture::new(backend).await else {
        return;
    };
    let mut after: Option<i64> = None;
    let mut seen = 0;
    loop {
        let uri = match after {
            Some(a) => format!("/quotes?limit=25&after={a}"),
            None => "/quotes?limit=25".to_owned(),
        };
        let reply = send(f.app(), get(&uri)).await;
        assert_eq!(reply.status, StatusCode::OK);
        seen += reply.body["quotes"].as_array().unwrap().len();
        match reply.body["next"].as_i64() {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, seed_quotes().count());
}

async fn bad_list_parameters_are_named(backend: Backend) {
    let Some(f) = Fixture::new(backend).await else {
        return;
    };
    for (uri, needle) in [
        ("/quotes?limit=0", "limit"),
        ("/quotes?limit=101", "limit"),
        ("/quotes?limit=abc", "limit"),
        ("/quotes?after=-1", "after"),
        ("/quotes?page=2", "page"),
    ] {
        let reply = send(f.app(), get(uri)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{uri}");
        assert!(
            error_text(&reply).contains(needle),
            "{uri}: {}",
            error_text(&reply)
        );
    }
}

async fn ids_are_checked(backend: Backend) {
    let Some(f) = Fixture::new(backend).await else {
        return;
    };
    for (uri, status) in [
        ("/quotes/abc", StatusCode::BAD_REQUEST),
        ("/quotes/-3", StatusCode::BAD_REQUEST),
        ("/quotes/0", StatusCode::BAD_REQUEST),
        ("/quotes/99999999999999999999", StatusCode::BAD_REQUEST),
        ("/quotes/424242", StatusCode::NOT_FOUND),
    ] {
        let reply = send(f.app(), get(uri)).await;
        assert_eq!(reply.status, status, "{uri}");
        assert!(!error_text(&reply).is_empty());
    }
}

async fn refused_writes_say_why_and_store_nothing(backend: Backend) {
    let Some(f) = Fixture::new(backend).await else {
        return;
    };
    let before = f.count().await;
    let long_text = "x".repeat(1001);
    let huge = format!(r#"{{"text":"{}","author":"a"}}"#, "y".repeat(17 * 1024));
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            post_json("/quotes", "{not json"),
            StatusCode::BAD_REQUEST,
            "malformed JSON",
        ),
        (
            post_json("/quotes", r#"{"text":"t"}"#),
            StatusCode::BAD_REQUEST,
            "author",
        ),
        (
            post_json("/quotes", r#"{"text":"t","author":"a","extra":1}"#),
            StatusCode::BAD_REQUEST,
            "extra",
        ),
        (
            post_json("/quotes", r#"{"text":5,"author":"a"}"#),
            StatusCode::BAD_REQUEST,
            "text",
        ),
        (
            post_json("/quotes", r#"{"text":"   ","author":"a"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "text",
        ),
        (
            post_json("/quotes", r#"{"text":"t","author":""}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "author",
        ),
        (
            post_json(
                "/quotes",
                format!(r#"{{"text":"{long_text}","author":"a"}}"#),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            "1000",
        ),
        (
            post_json("/quotes", huge),
            StatusCode::PAYLOAD_TOO_LARGE,
            "16384",
        ),
        (
            Request::post("/quotes")
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Body::from(r#"{"text":"t","author":"a"}"#))
                .unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/json",
        ),
    ];
    for (request, status, needle) in cases {
        let reply = send(f.app(), request).await;
        assert_eq!(reply.status, status, "{:?}", reply.body);
        assert!(
            error_text(&reply).contains(needle),
            "{status}: {}",
            error_text(&reply)
        );
    }
    assert_eq!(f.count().await, before, "a refused request wrote something");
}

async fn delete_removes_once(backend: Backend) {
    let Some(f) = Fixture::new(backend).await else {
        return;
    };
    let delete = || Request::delete("/quotes/3").body(Body::empty()).unwrap();
    assert_eq!(send(f.app(), delete()).await.status, StatusCode::NO_CONTENT);
    assert_eq!(send(f.app(), delete()).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        send(f.app(), get("/quotes/3")).await.status,
        StatusCode::NOT_FOUND
    );
}

async fn ids_are_never_reused(backend: Backend) {
    let Some(f) = Fixture::new(backend).await else {
        return;
    };
    let create = |n: u32| {
        post_json(
            "/quotes",
            json!({"text": format!("q{n}"), "author": "a"}).to_string(),
        )
    };
    let first = send(f.app(), create(1)).await.body["id"].as_i64().unwrap();
    let delete = Request::delete(format!("/quotes/{first}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(f.app(), delete).await.status, StatusCode::NO_CONTENT);
    let second = send(f.app(), create(2)).await.body["id"].as_i64().unwrap();
    assert!(
        second > first,
        "id {first} was deleted, then {second} handed out"
    );
    let gone = send(f.app(), get(&format!("/quotes/{first}"))).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
}

async fn random_is_404_when_there_are_no_quotes(backend: Backend) {
    let Some(f) = Fixture::new(backend).await else {
        return;
    };
    for q in f.storage.list(None, 100).await.unwrap().quotes {
        f.storage.delete(q.id).await.unwrap();
    }
    let reply = send(f.app(), get("/quotes/random")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

async fn admin_token_guards_writes_only(backend: Backend) {
    let Some(f) = Fixture::with(backend, Some("s3cret-token")).await else {
        return;
    };
    let before = f.count().await;
    let body = r#"{"text":"Guarded.","author":"Tester"}"#;
    let with_auth = |auth: Option<&str>| {
        let mut request = post_json("/quotes", body);
        if let Some(auth) = auth {
            request
                .headers_mut()
                .insert(header::AUTHORIZATION, auth.parse().unwrap());
        }
        request
    };
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cret-toke"),
        Some("s3cret-token"),
        Some("Basic s3cret-token"),
    ] {
        let reply = send(f.app(), with_auth(auth)).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(reply.headers[header::WWW_AUTHENTICATE], "Bearer");
    }
    let delete = Request::delete("/quotes/1").body(Body::empty()).unwrap();
    assert_eq!(send(f.app(), delete).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(f.count().await, before);
    assert_eq!(send(f.app(), get("/quotes/1")).await.status, StatusCode::OK);
    let reply = send(f.app(), with_auth(Some("Bearer s3cret-token"))).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(f.count().await, before + 1);
}

#[tokio::test]
async fn readiness_follows_database_and_draining() {
    let state = AppState::new(INSTANCE, None);
    let reply = send(app(state.clone()), get("/readyz")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.body["reason"], "database not open");
    assert_eq!(
        send(app(state.clone()), get("/healthz")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(app(state.clone()), get("/quotes/1")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    let dir = tempfile::tempdir().unwrap();
    let (db, _) = Database::open(&dir.path().join("q.db"), Options::default()).unwrap();
    state.attach_database(db, 1);
    assert_eq!(
        send(app(state.clone()), get("/readyz")).await.status,
        StatusCode::OK
    );
    let health = send(app(state.clone()), get("/healthz")).await;
    assert_eq!(
        (health.status, health.body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );

    state.start_draining();
    let reply = send(app(state.clone()), get("/readyz")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.body["reason"], "draining");
    // Draining is not death: liveness and in-flight work still succeed.
    assert_eq!(
        send(app(state.clone()), get("/healthz")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(app(state), get("/quotes/1")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn full_storage_is_507_and_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    drop(Database::open(&path, Options::default()).unwrap());
    let size = std::fs::metadata(&path).unwrap().len();
    let (db, _) = Database::open(
        &path,
        Options {
            max_size: Some(size + 4 * 4096),
            ..Options::default()
        },
    )
    .unwrap();
    let state = AppState::new(INSTANCE, None);
    state.attach_database(db.clone(), 1);
    let mut created = 0;
    let reply = loop {
        let body = json!({"text": format!("{created} {}", "z".repeat(900)), "author": "Filler"});
        let reply = send(app(state.clone()), post_json("/quotes", body.to_string())).await;
        if reply.status != StatusCode::CREATED {
            break reply;
        }
        created += 1;
        assert!(created < 1000, "the size limit never took effect");
    };
    assert_eq!(
        reply.status,
        StatusCode::INSUFFICIENT_STORAGE,
        "{:?}",
        reply.body
    );
    assert!(error_text(&reply).contains("full"));
    let count = db.connect().unwrap().count().unwrap();
    assert_eq!(count, seed_quotes().count() as i64 + created);
}

async fn metrics_count_requests_by_route_and_status(backend: Backend) {
    let Some(f) = Fixture::new(backend).await else {
        return;
    };
    send(f.app(), get("/quotes/1")).await;
    send(f.app(), get("/quotes/2")).await;
    send(f.app(), get("/quotes/abc")).await;
    let response = f.app().oneshot(get("/metrics")).await.unwrap();
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains(
            r#"quote_http_requests_total{method="GET",route="/quotes/{id}",status="200"} 2"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"quote_http_requests_total{method="GET",route="/quotes/{id}",status="400"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains("quote_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("quote_db_errors_total 0"), "{text}");
}

#[tokio::test]
async fn openapi_documents_every_route() {
    let Some(f) = Fixture::new(Backend::Sqlite).await else {
        return;
    };
    let reply = send(f.app(), get("/openapi.json")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body["openapi"].as_str().unwrap().starts_with("3."));
    let paths = reply.body["paths"].as_object().unwrap();
    for (path, method) in [
        ("/quotes", "get"),
        ("/quotes", "post"),
        ("/quotes/random", "get"),
        ("/quotes/{id}", "get"),
        ("/quotes/{id}", "delete"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/version", "get"),
        ("/metrics", "get"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing"
        );
    }
    assert!(
        reply.body["components"]["schemas"]
            .get("QuoteBody")
            .is_some()
    );
}

#[tokio::test]
async fn version_reports_the_build() {
    let Some(f) = Fixture::new(Backend::Sqlite).await else {
        return;
    };
    let reply = send(f.app(), get("/version")).await;
    assert_eq!(reply.body["version"], quote_service::VERSION);
    assert_eq!(reply.body["instance"], INSTANCE);
}

/// The API accepts exactly what the store's rules accept, and writes exactly then.
fn api_accepts_exactly_valid_quotes(backend: Backend) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some(f) = runtime.block_on(Fixture::new(backend)) else {
        return;
    };
    let config = ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    };
    let strategy = ("\\PC{0,1010}|[ \t]{0,3}", "\\PC{0,205}");
    proptest::test_runner::TestRunner::new(config)
        .run(&strategy, |(text, author)| {
            runtime.block_on(async {
                let before = f.count().await;
                let body = json!({"text": text, "author": author}).to_string();
                let reply = send(f.app(), post_json("/quotes", body)).await;
                let valid = NewQuote::new(&text, &author).is_ok();
                prop_assert_eq!(
                    reply.status == StatusCode::CREATED,
                    valid,
                    "{:?}",
                    reply.body
                );
                if !valid {
                    prop_assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
                }
                prop_assert_eq!(f.count().await, before + i64::from(valid));
                Ok(())
            })
        })
        .unwrap();
}

#[test]
fn api_accepts_exactly_valid_quotes_on_sqlite() {
    api_accepts_exactly_valid_quotes(Backend::Sqlite);
}

#[cfg(feature = "postgres")]
#[test]
fn api_accepts_exactly_valid_quotes_on_postgres() {
    api_accepts_exactly_valid_quotes(Backend::Postgres);
}
