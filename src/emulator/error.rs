//! The emulator's typed API errors and how each one goes on the wire.
//!
//! Contract (API.md §2, §13): 401 has an empty body; every other error is an RFC 7807
//! `application/problem+json` body shaped like the SDK's `ProblemDetails`, and 422 adds `errors`
//! (the SDK's `ValidationProblem`). No error carries `Retry-After`: the SDK retries any status
//! that does, so only injected 429/503 faults (see `faults`) set it.

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use super::wire::Problem;

/// Field path -> messages, in the ASP.NET `ValidationProblemDetails` style the SDK models.
pub(crate) type FieldErrors = BTreeMap<String, Vec<String>>;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("missing or unknown api key")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("one or more fields are invalid")]
    Validation(FieldErrors),
}

impl ApiError {
    /// A 422 with a single field message.
    pub(crate) fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        let mut errors = FieldErrors::new();
        errors.insert(field.into(), vec![message.into()]);
        ApiError::Validation(errors)
    }
}

/// Accumulates field errors so a request reports all of them at once, as Credyt does.
#[derive(Default)]
pub(crate) struct Errors(FieldErrors);

impl Errors {
    pub(crate) fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.entry(field.into()).or_default().push(message.into());
    }

    pub(crate) fn into_result(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.0))
        }
    }
}

/// A problem+json response for `status` (used by errors and injected faults alike).
pub(crate) fn problem_response(
    status: StatusCode,
    detail: Option<String>,
    errors: Option<FieldErrors>,
) -> HttpResponse {
    let (kind, title) = match status.as_u16() {
        400 => (
            "https://tools.ietf.org/html/rfc9110#section-15.5.1",
            "Bad Request",
        ),
        403 => (
            "https://tools.ietf.org/html/rfc9110#section-15.5.4",
            "Forbidden",
        ),
        404 => (
            "https://tools.ietf.org/html/rfc9110#section-15.5.5",
            "Not Found",
        ),
        409 => (
            "https://tools.ietf.org/html/rfc9110#section-15.5.10",
            "Conflict",
        ),
        422 => (
            "https://tools.ietf.org/html/rfc9110#section-15.5.21",
            "One or more fields are invalid.",
        ),
        429 => (
            "https://tools.ietf.org/html/rfc6585#section-4",
            "Too Many Requests",
        ),
        503 => (
            "https://tools.ietf.org/html/rfc9110#section-15.6.4",
            "Service Unavailable",
        ),
        _ => (
            "https://tools.ietf.org/html/rfc9110#section-15.6.1",
            "Internal Server Error",
        ),
    };
    let body = Problem {
        kind,
        title,
        status: status.as_u16(),
        detail,
        errors,
    };
    HttpResponse::build(status)
        .content_type("application/problem+json")
        .json(body)
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }

    fn error_response(&self) -> HttpResponse {
        match self {
            // Credyt declares 401 without a schema: answer with no body at all.
            ApiError::Unauthorized => HttpResponse::Unauthorized().finish(),
            ApiError::Validation(errors) => {
                problem_response(self.status_code(), None, Some(errors.clone()))
            }
            ApiError::Forbidden(d)
            | ApiError::BadRequest(d)
            | ApiError::NotFound(d)
            | ApiError::Conflict(d) => problem_response(self.status_code(), Some(d.clone()), None),
        }
    }
}
