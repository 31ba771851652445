//! API errors: a status and `{"error": "..."}`.

use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ringblock_engine::{EngineError, VolumeErrorKind};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, "web API: {}", self.message);
        }
        let mut resp = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// 503 for an SSE stream beyond [`crate::MAX_SSE_STREAMS`], with `Retry-After`.
pub(crate) fn sse_streams_full() -> Response {
    let mut resp = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(ErrorBody {
            error: format!(
                "too many event streams open (at most {}); close one (e.g. another dashboard tab) or retry later",
                crate::MAX_SSE_STREAMS
            ),
        }),
    )
        .into_response();
    resp.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(crate::SSE_RETRY_AFTER_S),
    );
    resp
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = match r.status() {
            // Well-formed JSON of the wrong shape is bad input like any other.
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            s => s,
        };
        let message = match status {
            StatusCode::PAYLOAD_TOO_LARGE => {
                format!("request body larger than {} bytes", crate::MAX_BODY_BYTES)
            }
            _ => r.body_text(),
        };
        Self::new(status, message)
    }
}

/// The status an engine error deserves.
pub fn engine_status(e: &EngineError) -> StatusCode {
    match e {
        EngineError::Volume { kind, .. } => match kind {
            VolumeErrorKind::NotFound => StatusCode::NOT_FOUND,
            VolumeErrorKind::Conflict => StatusCode::CONFLICT,
            VolumeErrorKind::Invalid => StatusCode::BAD_REQUEST,
            VolumeErrorKind::NotPersisted => StatusCode::INTERNAL_SERVER_ERROR,
        },
        EngineError::Shutdown => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        Self::new(engine_status(&e), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verr(kind: VolumeErrorKind) -> EngineError {
        EngineError::Volume {
            volume: "v".into(),
            kind,
            message: "m".into(),
        }
    }

    #[test]
    fn engine_errors_map_to_statuses() {
        let cases = [
            (VolumeErrorKind::NotFound, StatusCode::NOT_FOUND),
            (VolumeErrorKind::Conflict, StatusCode::CONFLICT),
            (VolumeErrorKind::Invalid, StatusCode::BAD_REQUEST),
            (
                VolumeErrorKind::NotPersisted,
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (kind, status) in cases {
            assert_eq!(engine_status(&verr(kind)), status, "{kind:?}");
        }
        assert_eq!(
            engine_status(&EngineError::Shutdown),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
