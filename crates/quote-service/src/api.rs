//! The router: quote routes, health routes, the OpenAPI document, and the layers around them.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router, middleware};
use quote_store::{LIST_LIMIT_MAX, NewQuote, Quote, QuoteId};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{AppError, ErrorBody};
use crate::health;
use crate::metrics::{observe, tag_route};
use crate::state::AppState;

/// Largest request body accepted, in bytes.
pub const BODY_LIMIT: usize = 16 * 1024;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "quote-edge quote service",
        description = "Quotes on an embedded SQLite database or a shared PostgreSQL one. Every response names the replica \
                       that served it in `X-Served-By`."
    ),
    components(schemas(ErrorBody))
)]
struct ApiDoc;

/// The service's router over `state`.
pub fn app(state: AppState) -> Router {
    let (router, api) = routed();
    let api = Arc::new(api.to_json().unwrap_or_else(|_| "{}".to_owned()));
    router
        .route(
            "/openapi.json",
            get(move || async move { ([(header::CONTENT_TYPE, "application/json")], (*api).clone()) }),
        )
        .route_layer(middleware::from_fn(tag_route))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

fn routed() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_quotes, create_quote))
        .routes(routes!(random_quote))
        .routes(routes!(get_quote, delete_quote))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::version))
        .routes(routes!(health::metrics))
        .split_for_parts()
}

/// A quote as the API returns it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QuoteBody {
    pub id: QuoteId,
    pub text: String,
    pub author: String,
    /// RFC 3339 UTC time the quote was stored.
    pub created_at: String,
    /// The replica that answered.
    pub served_by: String,
}

impl QuoteBody {
    fn new(quote: Quote, state: &AppState) -> Self {
        QuoteBody {
            id: quote.id,
            text: quote.text,
            author: quote.author,
            created_at: quote.created_at,
            served_by: state.instance().to_owned(),
        }
    }
}

/// One page of quotes.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct QuotePage {
    pub quotes: Vec<QuoteBody>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next: Option<QuoteId>,
    pub served_by: String,
}

/// A new quote. Each field is trimmed of surrounding white space; what is left must be 1 to
/// its maximum characters with no control character but a new line or a tab. The schema states
/// a little less than that (the field as sent, with at least one character that is not white
/// space, and no other control character anywhere), so what it allows is always accepted.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateQuote {
    /// 1 to 1000 characters after trimming.
    #[schema(
        min_length = 1,
        max_length = 1000,
        pattern = r"^[^\u0000-\u0008\u000B-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u0008\u000B-\u001F\u007F-\u009F]*$"
    )]
    pub text: String,
    /// 1 to 200 characters after trimming.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u0008\u000B-\u001F\u007F-\u009F]*[^\s\u0000-\u001F\u007F-\u009F][^\u0000-\u0008\u000B-\u001F\u007F-\u009F]*$"
    )]
    pub author: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// Return quotes with an id greater than this (the previous page's `next`; 0 or absent:
    /// from the first quote).
    #[param(value_type = Option<i64>, minimum = 0, maximum = 9_223_372_036_854_775_807_i64)]
    pub after: Option<QuoteId>,
}

/// JSON body extractor whose rejections are [`AppError`]s (400, 413, 415 with a JSON body).
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(AppError))]
struct JsonBody<T>(T);

/// Path extractor whose rejections are [`AppError`]s.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(AppError))]
struct PathParam<T>(T);

/// Query extractor whose rejections are [`AppError`]s.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(AppError))]
struct QueryParams<T>(T);

/// Proof that the request may write: present when no admin token is configured, or when
/// the request carries it. Extracted before the body, so a refused request is not parsed.
struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let Some(token) = state.admin_token() else {
            return Ok(Admin);
        };
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
        match presented {
            Some(presented) if token.matches(presented) => Ok(Admin),
            _ => Err(AppError::Unauthorized),
        }
    }
}

fn checked_id(id: QuoteId) -> Result<QuoteId, AppError> {
    if id < 1 {
        return Err(AppError::BadRequest(format!(
            "the quote id must be a positive integer, got {id}"
        )));
    }
    Ok(id)
}

fn no_quote(id: QuoteId) -> AppError {
    AppError::NotFound(format!("there is no quote with id {id}"))
}

/// List quotes, oldest first, one page at a time.
#[utoipa::path(get, path = "/quotes", params(ListParams), responses(
    (status = 200, body = QuotePage),
    (status = 400, body = ErrorBody, description = "bad `limit` or `after`, or another parameter"),
    (status = 500, body = ErrorBody, description = "internal error (logged)"),
    (status = 503, body = ErrorBody, description = "the database is not open, busy or unreachable"),
))]
async fn list_quotes(
    State(state): State<AppState>,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<QuotePage>, AppError> {
    let limit = params.limit.unwrap_or(20);
    if !(1..=LIST_LIMIT_MAX).contains(&limit) {
        return Err(AppError::BadRequest(format!(
            "`limit` must be between 1 and {LIST_LIMIT_MAX}, got {limit}"
        )));
    }
    if let Some(after) = params.after.filter(|after| *after < 0) {
        return Err(AppError::BadRequest(format!(
            "`after` must not be negative, got {after}"
        )));
    }
    let page = state
        .query(move |s| async move { s.list(params.after, limit).await })
        .await?;
    Ok(Json(QuotePage {
        quotes: page
            .quotes
            .into_iter()
            .map(|q| QuoteBody::new(q, &state))
            .collect(),
        next: page.next,
        served_by: state.instance().to_owned(),
    }))
}

/// A quote drawn uniformly at random.
#[utoipa::path(get, path = "/quotes/random", responses(
    (status = 200, body = QuoteBody),
    (status = 404, body = ErrorBody, description = "there are no quotes"),
    (status = 500, body = ErrorBody, description = "internal error (logged)"),
    (status = 503, body = ErrorBody, description = "the database is not open, busy or unreachable"),
))]
async fn random_quote(State(state): State<AppState>) -> Result<Json<QuoteBody>, AppError> {
    match state.query(|s| async move { s.random().await }).await? {
        Some(quote) => Ok(Json(QuoteBody::new(quote, &state))),
        None => Err(AppError::NotFound("there are no quotes".to_owned())),
    }
}

/// One quote.
#[utoipa::path(get, path = "/quotes/{id}", params(("id" = i64, Path, description = "quote id", minimum = 1, maximum = 9_223_372_036_854_775_807_i64)), responses(
    (status = 200, body = QuoteBody),
    (status = 400, body = ErrorBody, description = "the id is not a positive integer"),
    (status = 404, body = ErrorBody, description = "no quote has this id"),
    (status = 500, body = ErrorBody, description = "internal error (logged)"),
    (status = 503, body = ErrorBody, description = "the database is not open, busy or unreachable"),
))]
async fn get_quote(
    State(state): State<AppState>,
    PathParam(id): PathParam<QuoteId>,
) -> Result<Json<QuoteBody>, AppError> {
    let id = checked_id(id)?;
    match state.query(move |s| async move { s.get(id).await }).await? {
        Some(quote) => Ok(Json(QuoteBody::new(quote, &state))),
        None => Err(no_quote(id)),
    }
}

/// Store a new quote. When the answer is 201, the quote is committed and on disk.
#[utoipa::path(post, path = "/quotes", request_body = CreateQuote, responses(
    (status = 201, body = QuoteBody, headers(("location" = String, description = "/quotes/{id}"))),
    (status = 400, body = ErrorBody, description = "malformed JSON, a missing, unknown or repeated field"),
    (status = 401, body = ErrorBody, description = "an admin token is configured and was not presented"),
    (status = 413, body = ErrorBody, description = "body over 16 KiB"),
    (status = 415, body = ErrorBody, description = "not `application/json`"),
    (status = 422, body = ErrorBody, description = "empty or oversized field"),
    (status = 500, body = ErrorBody, description = "internal error (logged); nothing acknowledged"),
    (status = 503, body = ErrorBody, description = "the database is not open, busy or unreachable; nothing written"),
    (status = 507, body = ErrorBody, description = "storage full; nothing written"),
))]
async fn create_quote(
    State(state): State<AppState>,
    _admin: Admin,
    JsonBody(body): JsonBody<CreateQuote>,
) -> Result<Response, AppError> {
    let new = NewQuote::new(&body.text, &body.author)?;
    let quote = state
        .query(move |s| async move { s.create(&new).await })
        .await?;
    let location = format!("/quotes/{}", quote.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(QuoteBody::new(quote, &state)),
    )
        .into_response())
}

/// Delete a quote.
#[utoipa::path(delete, path = "/quotes/{id}", params(("id" = i64, Path, description = "quote id", minimum = 1, maximum = 9_223_372_036_854_775_807_i64)), responses(
    (status = 204, description = "deleted"),
    (status = 400, body = ErrorBody, description = "the id is not a positive integer"),
    (status = 401, body = ErrorBody, description = "an admin token is configured and was not presented"),
    (status = 404, body = ErrorBody, description = "no quote has this id"),
    (status = 500, body = ErrorBody, description = "internal error (logged)"),
    (status = 503, body = ErrorBody, description = "the database is not open, busy or unreachable; nothing deleted"),
))]
async fn delete_quote(
    State(state): State<AppState>,
    _admin: Admin,
    PathParam(id): PathParam<QuoteId>,
) -> Result<StatusCode, AppError> {
    let id = checked_id(id)?;
    if state
        .query(move |s| async move { s.delete(id).await })
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(no_quote(id))
    }
}

async fn not_found(method: Method, uri: Uri) -> AppError {
    AppError::NotFound(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri, _headers: HeaderMap) -> Response {
    let body = ErrorBody {
        error: format!("{method} is not allowed on {}", uri.path()),
    };
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}
