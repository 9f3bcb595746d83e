//! The one table that maps every error of the tenant-facing API to an HTTP answer.
//!
//! Bodies are RFC 7807 `application/problem+json` with a stable `code`; validation failures are
//! Credyt's `ValidationProblem` shape (`errors`: field path -> messages) so the official SDK reads
//! them. 5xx bodies say what happened in general terms only; the cause chain goes to the log.

use std::collections::BTreeMap;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::identity::IdentityError;
use crate::outbox::OutboxError;
use crate::outcome::Rejection;
use crate::pricing::QuoteError;
use crate::ratelimit::{RateLimited, Refusal};
use crate::upstream::UpstreamError;
use crate::webhooks::verify::SignatureError;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// Every way a tenant request can fail as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or unknown api key")]
    Unauthorized,
    #[error("request body is not valid json: {0}")]
    BadJson(String),
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error("content encoding `{0}` is not supported; send gzip or identity")]
    UnsupportedEncoding(String),
    #[error("request body is not valid gzip: {0}")]
    BadEncoding(String),
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("one or more events are invalid")]
    Validation(Vec<Rejection>),
    #[error("rate limit exceeded")]
    RateLimited(RateLimited),
    /// More events in one request than the tenant's burst: it can never pass, so not a 429.
    #[error("the request has {events} events, more than this tenant's burst of {burst}; send at most {burst} events per request")]
    ExceedsBurst { events: u32, burst: u32 },
    #[error("{0}")]
    Identity(#[from] IdentityError),
    #[error("credyt is unavailable")]
    Upstream(#[source] UpstreamError),
    #[error("events could not be recorded: {0}")]
    Outbox(#[source] OutboxError),
    #[error("not accepting events: {0}")]
    Unavailable(&'static str),
    #[error("not found")]
    NotFound,
    /// A known path asked with another method; `allow` lists the path's methods.
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
    /// Too many header fields, or too many bytes of them (ours, or actix's HTTP/1 codec's).
    #[error("request header fields are too large: at most {max_fields} fields of at most {max_bytes} bytes in all")]
    HeadersTooLarge { max_fields: usize, max_bytes: usize },
    /// The request is not HTTP/1.1 the codec could parse (answered by actix's codec).
    #[error("the request is not valid HTTP/1.1")]
    MalformedRequest,
    /// The request head did not arrive in time (answered by actix's codec).
    #[error("the request head did not arrive in time")]
    RequestTimeout,
    /// An error the HTTP layer answered without saying more.
    #[error("internal error")]
    Internal,
    /// A webhook whose `Credyt-Signature` does not verify (the relay listener).
    #[error("{0}")]
    Signature(SignatureError),
    /// A Credyt endpoint the tenant may not call through the gateway.
    #[error("{0}")]
    EndpointNotAllowed(String),
    /// A signed webhook body that is not a Credyt webhook envelope (the relay listener).
    #[error("{0}")]
    InvalidWebhook(String),
    /// `/events`: an event the end user's balance cannot pay for (balance gating).
    #[error("events[{index}] (`{event_id}`) needs {} {} but {} is available for the end user (at least {} must remain); nothing of the request was accepted", .shortfall.required, .shortfall.asset, .shortfall.available, .shortfall.min_available)]
    InsufficientBalance {
        index: usize,
        event_id: String,
        shortfall: crate::balance::Shortfall,
    },
    /// Balance gating could not read the end user's balance and the tenant's `on_unknown` is
    /// `deny`.
    #[error("{0}")]
    BalanceUnavailable(#[source] crate::balance::GateError),
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::RateLimited(r) => ApiError::RateLimited(r),
            Refusal::ExceedsBurst { events, burst } => ApiError::ExceedsBurst {
                events,
                burst: burst.get(),
            },
        }
    }
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: String,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<BTreeMap<String, Vec<String>>>,
}

/// The `type` URI of a problem code.
fn type_uri(code: &str) -> String {
    format!("https://credyt-proxy.dev/problems/{code}")
}

/// The `application/problem+json` body of a problem without field errors, for answers built
/// outside [`ApiError`]'s table (the admin port has its own, see `crate::admin`).
pub fn problem_body(status: StatusCode, title: &str, code: &str, detail: String) -> Vec<u8> {
    let body = Problem {
        kind: type_uri(code),
        title,
        status: status.as_u16(),
        detail,
        code,
        errors: None,
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

impl ApiError {
    /// The stable snake_case code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::BadJson(_) => "invalid_json",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::UnsupportedEncoding(_) => "unsupported_encoding",
            ApiError::BadEncoding(_) => "invalid_encoding",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::Validation(_) => "validation_failed",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::ExceedsBurst { .. } => "exceeds_burst",
            ApiError::Identity(e) => e.code(),
            ApiError::Upstream(e) if e.is_retryable() => "upstream_unavailable",
            ApiError::Upstream(_) => "upstream_rejected",
            ApiError::Outbox(e) => e.code(),
            ApiError::Unavailable(_) => "unavailable",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::HeadersTooLarge { .. } => "headers_too_large",
            ApiError::MalformedRequest => "malformed_request",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::Internal => "internal_error",
            ApiError::Signature(SignatureError::Missing) => "missing_signature",
            ApiError::Signature(SignatureError::Malformed(_)) => "malformed_signature",
            ApiError::Signature(SignatureError::Stale { .. }) => "stale_signature",
            ApiError::Signature(SignatureError::Mismatch) => "invalid_signature",
            ApiError::InvalidWebhook(_) => "invalid_webhook",
            ApiError::EndpointNotAllowed(_) => "endpoint_not_allowed",
            ApiError::InsufficientBalance { .. } => "insufficient_balance",
            ApiError::BalanceUnavailable(_) => "balance_unavailable",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "Unauthorized",
            ApiError::BadJson(_) => "Bad Request",
            ApiError::UnsupportedMediaType | ApiError::UnsupportedEncoding(_) => {
                "Unsupported Media Type"
            }
            ApiError::BadEncoding(_) => "Bad Request",
            ApiError::PayloadTooLarge { .. } => "Payload Too Large",
            ApiError::Validation(_) => "One or more validation errors occurred.",
            ApiError::RateLimited(_) => "Too Many Requests",
            ApiError::ExceedsBurst { .. } => "Unprocessable Content",
            ApiError::Identity(IdentityError::Upstream(e)) if e.is_retryable() => {
                "Service Unavailable"
            }
            ApiError::Identity(IdentityError::Upstream(_)) => "Bad Gateway",
            ApiError::Identity(_) => "Not Found",
            ApiError::Upstream(e) if e.is_retryable() => "Service Unavailable",
            ApiError::Upstream(_) => "Bad Gateway",
            ApiError::Outbox(e) if e.is_retryable() => "Service Unavailable",
            ApiError::Outbox(_) => "Internal Server Error",
            ApiError::Unavailable(_) => "Service Unavailable",
            ApiError::NotFound => "Not Found",
            ApiError::MethodNotAllowed { .. } => "Method Not Allowed",
            ApiError::HeadersTooLarge { .. } => "Request Header Fields Too Large",
            ApiError::MalformedRequest => "Bad Request",
            ApiError::RequestTimeout => "Request Timeout",
            ApiError::Internal => "Internal Server Error",
            ApiError::Signature(SignatureError::Malformed(_)) => "Bad Request",
            ApiError::Signature(_) => "Unauthorized",
            ApiError::InvalidWebhook(_) => "Bad Request",
            ApiError::EndpointNotAllowed(_) => "Forbidden",
            ApiError::InsufficientBalance { .. } => "Payment Required",
            ApiError::BalanceUnavailable(_) => "Service Unavailable",
        }
    }

    /// Seconds a client should wait before retrying, for 429 and retryable 503s.
    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited(r) => Some(r.retry_after_secs()),
            ApiError::Upstream(e) if e.is_retryable() => Some(
                e.retry_after()
                    .map(|d| d.as_secs().clamp(1, 60))
                    .unwrap_or(1),
            ),
            ApiError::Outbox(e) if e.is_retryable() => {
                Some(e.retry_after().map(|d| d.as_secs().max(1)).unwrap_or(1))
            }
            ApiError::Identity(IdentityError::Upstream(e)) if e.is_retryable() => Some(
                e.retry_after()
                    .map(|d| d.as_secs().clamp(1, 60))
                    .unwrap_or(1),
            ),
            ApiError::Unavailable(_) | ApiError::BalanceUnavailable(_) => Some(1),
            _ => None,
        }
    }
}

/// A failed quote, as `POST /v1/quote` answers it: unparseable JSON is 400 `invalid_json`;
/// anything else is 422 `validation_failed` naming the field and the specific code.
impl From<QuoteError> for ApiError {
    fn from(e: QuoteError) -> Self {
        match e {
            QuoteError::InvalidJson(m) => ApiError::BadJson(m),
            QuoteError::Totals(_) => ApiError::Unavailable("the running total could not be read"),
            other => ApiError::Validation(vec![Rejection {
                code: other.code(),
                field: "event".into(),
                message: other.to_string(),
            }]),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::BadJson(_) => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMediaType | ApiError::UnsupportedEncoding(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            ApiError::BadEncoding(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::ExceedsBurst { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Identity(IdentityError::Upstream(e)) if e.is_retryable() => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Identity(IdentityError::Upstream(_)) => StatusCode::BAD_GATEWAY,
            ApiError::Identity(_) => StatusCode::NOT_FOUND,
            ApiError::Upstream(e) if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ApiError::Outbox(e) if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Outbox(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::MalformedRequest => StatusCode::BAD_REQUEST,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Signature(SignatureError::Malformed(_)) => StatusCode::BAD_REQUEST,
            ApiError::Signature(_) => StatusCode::UNAUTHORIZED,
            ApiError::InvalidWebhook(_) => StatusCode::BAD_REQUEST,
            ApiError::EndpointNotAllowed(_) => StatusCode::FORBIDDEN,
            ApiError::InsufficientBalance { .. } => StatusCode::PAYMENT_REQUIRED,
            ApiError::BalanceUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), error = %self, cause = ?std::error::Error::source(self), "request failed");
        }
        let mut resp = HttpResponse::build(status);
        resp.insert_header((header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON)));
        if let Some(secs) = self.retry_after() {
            resp.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        if let ApiError::UnsupportedEncoding(_) = self {
            // RFC 9110 15.5.16: a 415 about the content coding says which codings are accepted.
            resp.insert_header((header::ACCEPT_ENCODING, super::body::ACCEPTED_ENCODINGS));
        }
        if let ApiError::Unauthorized = self {
            // RFC 9110 15.5.2: a 401 carries a challenge (the key is read from the SDK's
            // `X-CREDYT-API-KEY` as well).
            resp.insert_header((
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"credyt-proxy\""),
            ));
        }
        if let ApiError::MethodNotAllowed { allow } = self {
            // RFC 9110 15.5.6: a 405 names the methods the resource has.
            resp.insert_header((header::ALLOW, *allow));
        }
        if let ApiError::RateLimited(r) = self {
            resp.insert_header(("RateLimit-Policy", r.policy_header()));
            resp.insert_header(("RateLimit", r.ratelimit_header()));
        }
        resp.body(self.problem_json())
    }
}

impl ApiError {
    /// A 4xx: the request's fault.
    pub fn is_client_error(&self) -> bool {
        self.status_code().is_client_error()
    }

    /// The problem+json body of this error.
    pub fn problem_json(&self) -> Vec<u8> {
        let status = self.status_code();
        let detail = match self {
            ApiError::Upstream(_) | ApiError::Identity(IdentityError::Upstream(_)) => {
                "the billing service did not confirm the request; retry with the same event ids"
                    .to_string()
            }
            ApiError::Outbox(e) if e.is_retryable() => {
                "the events were not recorded; retry with the same event ids".to_string()
            }
            ApiError::Outbox(_) => "internal error".to_string(),
            ApiError::BalanceUnavailable(_) => {
                "the end user's balance could not be read from the billing service; nothing was accepted; retry with the same event ids".to_string()
            }
            other => other.to_string(),
        };
        let errors = match self {
            ApiError::Validation(rejections) => {
                let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for r in rejections {
                    map.entry(r.field.clone())
                        .or_default()
                        .push(format!("{} ({})", r.message, r.code));
                }
                Some(map)
            }
            ApiError::InsufficientBalance {
                index, shortfall, ..
            } => Some(BTreeMap::from([(
                format!("events[{index}]"),
                vec![format!(
                    "{} {} needed, {} available ({})",
                    shortfall.required,
                    shortfall.asset,
                    shortfall.available,
                    "insufficient_balance"
                )],
            )])),
            _ => None,
        };
        let body = Problem {
            kind: type_uri(self.code()),
            title: self.title(),
            status: status.as_u16(),
            detail,
            code: self.code(),
            errors,
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }
}
