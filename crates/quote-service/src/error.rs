//! One error type for every handler: bad input becomes a 4xx whose JSON body says what was
//! wrong; internal failures become a generic 500 whose details go to the log, once.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use quote_store::ValidationError;
use serde::Serialize;

/// The JSON body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What was wrong, in words.
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    #[error("{0}")]
    NotFound(String),
    #[error("this request needs `Authorization: Bearer <admin token>`")]
    Unauthorized,
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Unavailable(&'static str),
    #[error(transparent)]
    Store(#[from] quote_store::Error),
    #[error("{0}")]
    Internal(String),
}

/// Placed in the response extensions of a 500 so the logging middleware reports the cause
/// once, with the request's route, while the client sees only a generic message.
#[derive(Debug, Clone)]
pub(crate) struct InternalCause(pub String);

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        use quote_store::Error as StoreError;
        let (status, message) = match &self {
            AppError::BadRequest(_) => (StatusCode::BAD_REQUEST, self.to_string()),
            AppError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, self.to_string()),
            AppError::NotFound(_) => (StatusCode::NOT_FOUND, self.to_string()),
            AppError::Unauthorized => (StatusCode::UNAUTHORIZED, self.to_string()),
            AppError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, self.to_string()),
            AppError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, self.to_string())
            }
            AppError::Unavailable(_) | AppError::Store(StoreError::Busy { .. }) => {
                (StatusCode::SERVICE_UNAVAILABLE, self.to_string())
            }
            AppError::Store(StoreError::Unreachable { .. } | StoreError::Closing { .. }) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the database is unreachable; nothing was written".to_owned(),
            ),
            AppError::Store(StoreError::Full { .. }) => (
                StatusCode::INSUFFICIENT_STORAGE,
                "the device storage is full; the quote was not stored".to_owned(),
            ),
            AppError::Store(_) | AppError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error".to_owned(),
            ),
        };
        let mut response = (status, axum::Json(ErrorBody { error: message })).into_response();
        match status {
            StatusCode::INTERNAL_SERVER_ERROR => {
                response
                    .extensions_mut()
                    .insert(InternalCause(self.to_string()));
            }
            StatusCode::UNAUTHORIZED => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

impl From<JsonRejection> for AppError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => AppError::UnsupportedMediaType(
                "the body must be JSON with `Content-Type: application/json`".to_owned(),
            ),
            JsonRejection::JsonSyntaxError(e) => {
                AppError::BadRequest(format!("malformed JSON: {}", source_text(&e)))
            }
            JsonRejection::JsonDataError(e) => {
                AppError::BadRequest(format!("the JSON is not a quote: {}", source_text(&e)))
            }
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                AppError::TooLarge(format!(
                    "the body is larger than the {} byte limit",
                    crate::api::BODY_LIMIT
                ))
            }
            other => AppError::BadRequest(other.body_text()),
        }
    }
}

impl From<PathRejection> for AppError {
    fn from(rejection: PathRejection) -> Self {
        AppError::BadRequest(format!(
            "the quote id must be a positive integer ({})",
            rejection.body_text()
        ))
    }
}

impl From<QueryRejection> for AppError {
    fn from(rejection: QueryRejection) -> Self {
        AppError::BadRequest(format!("bad query string: {}", source_text(&rejection)))
    }
}

/// The innermost cause, which names the field and position (serde's message), without
/// axum's generic prefix.
fn source_text(error: &dyn std::error::Error) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}
