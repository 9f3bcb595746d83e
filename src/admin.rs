//! The operator port, separate from tenant traffic: `/livez`, `/readyz`, `/metrics`, the
//! dead letters of the running proxy under `/admin/` (bearer token), and `/openapi.json`.
//!
//! Contract: `/livez` answers 200 while the process serves at all. `/readyz` is a latch: 503
//! until configuration, tenants, pricing (and the outbox, when durable) are loaded, 200 after,
//! and 503 again once shutdown begins so the sidecar's pod stops receiving traffic first.
//! `/metrics` is Prometheus text (0.0.4; OpenMetrics when `Accept` asks for it), every metric
//! defined in `telemetry::metrics`; the reference is `docs/operations.md`. `/openapi.json`
//! answers the OpenAPI 3.1 document of both ports (`application/json`, no token): the committed
//! `docs/openapi.json`, built into the binary, byte for byte.
//!
//! Dead letters (records Credyt refused for good, see [`crate::outbox`]):
//!
//! * `GET /admin/dead-letters[?limit=N][&after=SEQ]`: 200 `{"dead_letters": [...]}`, oldest
//!   sequence first, at most `limit` (default 1000, at most 10 000) with a sequence number
//!   above `after`; `next_after` (pass it as `after`) when more follow. Amounts are decimal
//!   strings, never floats.
//! * `POST /admin/dead-letters/replay` with `{"seqs": [1, 2]}` or `{"all": true}`: moves them
//!   back to pending (the forwarder sends them again under their own transaction ids, so
//!   Credyt applies each at most once); 200 `{"replayed": N}`. Unknown numbers are skipped.
//!
//! Both need `Authorization: Bearer <admin.token>` (compared in constant time). Errors are
//! problem+json with a stable `code`: 403 `admin_disabled` (no token configured), 401
//! `unauthorized` (`WWW-Authenticate: Bearer`), 404 `no_outbox` (`ack = "upstream"`), 400
//! `invalid_request`, and the outbox's own codes (503 with `Retry-After` when a retry may
//! work). The offline `credyt-proxy dlq` command does the same with the proxy stopped.
//!
//! Every path answers its one method; another method is 405 `method_not_allowed` with `Allow`,
//! an unknown path 404 `not_found` (both problem+json).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::config::{AckMode, Settings};
use crate::domain::Delivery;
use crate::ingest::problem::{problem_body, PROBLEM_JSON};
use crate::ingest::AppState;
use crate::outbox::{DeadCode, DeadLetter, Outbox, OutboxError};
use crate::telemetry::metrics::{OPENMETRICS_TEXT, PROMETHEUS_TEXT};
use crate::upstream::credentials::Credentials;
use crate::upstream::forwarder::ForwarderStats;

/// Dead letters in one listing when the query names no `limit`.
pub const DEFAULT_LIST_LIMIT: usize = 1000;
/// Most dead letters in one listing, and most sequence numbers in one replay.
pub const MAX_LIST_LIMIT: usize = 10_000;

/// The readiness latch.
#[derive(Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn set_draining(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

pub struct AdminState {
    pub app: Arc<AppState>,
    pub readiness: Arc<Readiness>,
    /// Whether Credyt accepts the platform key.
    pub credentials: Arc<Credentials>,
    /// The forwarder's figures, when it runs.
    pub forwarder: Option<Arc<ForwarderStats>>,
    /// SHA-256 of `admin.token`; `None` disables `/admin/...`. Presented tokens are hashed
    /// too, so the constant-time compare is over equal lengths and leaks not even the length.
    token_digest: Option<[u8; 32]>,
    /// The webhook relay's outbox, when the relay is configured.
    webhooks: Option<Outbox>,
    /// Replays run one at a time: two replays of the same record in one commit group would
    /// both find it still dead and count it twice.
    replays: tokio::sync::Mutex<()>,
}

/// Which dead letters an `/admin/...` request is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    /// The outbox's: charges and usage events Credyt did not take.
    Events,
    /// The webhook relay's: webhooks no tenant owns or whose tenant never acknowledged them.
    Webhooks,
}

impl AdminState {
    pub fn new(
        app: Arc<AppState>,
        readiness: Arc<Readiness>,
        credentials: Arc<Credentials>,
        forwarder: Option<Arc<ForwarderStats>>,
        webhooks: Option<Outbox>,
    ) -> Self {
        let token_digest = app
            .settings
            .admin
            .token
            .as_ref()
            .map(|t| Sha256::digest(t.expose().as_bytes()).into());
        Self {
            app,
            readiness,
            credentials,
            forwarder,
            token_digest,
            webhooks,
            replays: tokio::sync::Mutex::new(()),
        }
    }

    /// Checks the bearer token, then that there is an outbox to work on.
    fn authorize(&self, req: &HttpRequest, store: Store) -> Result<&Outbox, AdminError> {
        let expected = self.token_digest.as_ref().ok_or(AdminError::Disabled)?;
        let presented = bearer_token(req).ok_or(AdminError::Unauthorized)?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        if !bool::from(digest.ct_eq(expected)) {
            let peer = req.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::warn!(
                peer,
                path = req.path(),
                "admin request with a wrong token refused"
            );
            return Err(AdminError::Unauthorized);
        }
        match store {
            Store::Events => self.app.outbox.as_ref().ok_or(AdminError::NoOutbox),
            Store::Webhooks => self.webhooks.as_ref().ok_or(AdminError::NoRelay),
        }
    }
}

/// Says at start whether the dead-letter endpoints are usable.
pub fn log_dead_letter_endpoints(settings: &Settings) {
    match (&settings.admin.token, settings.ingest.ack) {
        (None, _) => tracing::info!(
            "admin dead-letter endpoints disabled: no admin token (set CREDYT_PROXY__ADMIN__TOKEN)"
        ),
        (Some(_), AckMode::Upstream) => tracing::info!(
            "admin dead-letter endpoints answer 404: ack = \"upstream\" keeps no outbox"
        ),
        (Some(_), AckMode::Durable) => tracing::info!("admin dead-letter endpoints enabled"),
    }
}

/// The token of `Authorization: Bearer <token>` (the scheme is case-insensitive).
fn bearer_token(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The OpenAPI document of the tenant API and this port, as committed (`docs/openapi.json`).
pub const OPENAPI_JSON: &str = include_str!("../docs/openapi.json");

pub fn routes(cfg: &mut web::ServiceConfig) {
    // Each path answers its one method; any other is 405 with `Allow` (RFC 9110 15.5.6).
    cfg.service(
        web::resource("/livez")
            .route(web::get().to(|| async { text(StatusCode::OK, "ok") }))
            .default_service(web::to(|| method_not_allowed("GET"))),
    )
    .service(
        web::resource("/readyz")
            .route(web::get().to(readyz))
            .default_service(web::to(|| method_not_allowed("GET"))),
    )
    .service(
        web::resource("/metrics")
            .route(web::get().to(metrics))
            .default_service(web::to(|| method_not_allowed("GET"))),
    )
    .service(
        web::resource("/openapi.json")
            .route(web::get().to(openapi))
            .default_service(web::to(|| method_not_allowed("GET"))),
    )
    .service(
        web::resource("/admin/dead-letters")
            .route(web::get().to(list_dead_letters))
            .default_service(web::to(|| method_not_allowed("GET"))),
    )
    .service(
        web::resource("/admin/dead-letters/replay")
            .route(web::post().to(replay_dead_letters))
            .default_service(web::to(|| method_not_allowed("POST"))),
    )
    .service(
        web::resource("/admin/webhooks/dead-letters")
            .route(web::get().to(list_webhook_dead_letters))
            .default_service(web::to(|| method_not_allowed("GET"))),
    )
    .service(
        web::resource("/admin/webhooks/dead-letters/replay")
            .route(web::post().to(replay_webhook_dead_letters))
            .default_service(web::to(|| method_not_allowed("POST"))),
    )
    .default_service(web::to(not_found));
}

/// Every way an `/admin/...` request can fail, mapped to problem+json in one place.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("the dead-letter endpoints are disabled: no admin token is configured (admin.token, CREDYT_PROXY__ADMIN__TOKEN)")]
    Disabled,
    #[error("missing or wrong admin token (Authorization: Bearer <token>)")]
    Unauthorized,
    #[error("there is no outbox: with ingest.ack = \"upstream\" nothing is dead-lettered")]
    NoOutbox,
    #[error("the webhook relay is not configured ([webhooks] credyt_secrets)")]
    NoRelay,
    #[error("{0}")]
    BadRequest(String),
    #[error("dead letters could not be read or replayed: {0}")]
    Outbox(#[source] OutboxError),
    #[error("the dead-letter read did not finish")]
    Blocking(#[source] tokio::task::JoinError),
    #[error("not found")]
    NotFound,
    /// A known path asked with another method; `allow` lists the path's methods.
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
}

impl AdminError {
    /// The stable snake_case code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::Disabled => "admin_disabled",
            AdminError::Unauthorized => "unauthorized",
            AdminError::NoOutbox => "no_outbox",
            AdminError::NoRelay => "no_webhook_relay",
            AdminError::BadRequest(_) => "invalid_request",
            AdminError::Outbox(e) => e.code(),
            AdminError::Blocking(_) => "internal",
            AdminError::NotFound => "not_found",
            AdminError::MethodNotAllowed { .. } => "method_not_allowed",
        }
    }
}

impl ResponseError for AdminError {
    fn status_code(&self) -> StatusCode {
        match self {
            AdminError::Disabled => StatusCode::FORBIDDEN,
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::NoOutbox | AdminError::NoRelay | AdminError::NotFound => {
                StatusCode::NOT_FOUND
            }
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::Outbox(e) if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            AdminError::Outbox(_) | AdminError::Blocking(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AdminError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let detail = if status.is_server_error() {
            tracing::warn!(code = self.code(), error = %self, cause = ?std::error::Error::source(self), "admin request failed");
            "the outbox could not be read or written; see the proxy's log".to_string()
        } else {
            self.to_string()
        };
        let mut resp = HttpResponse::build(status);
        resp.insert_header((header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON)));
        match self {
            AdminError::Unauthorized => {
                resp.insert_header((
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"credyt-proxy admin\""),
                ));
            }
            AdminError::MethodNotAllowed { allow } => {
                resp.insert_header((header::ALLOW, *allow));
            }
            AdminError::Outbox(e) if e.is_retryable() => {
                let secs = e.retry_after().map_or(1, |d| d.as_secs().max(1));
                resp.insert_header((header::RETRY_AFTER, secs.to_string()));
            }
            _ => {}
        }
        let title = status.canonical_reason().unwrap_or("Error");
        resp.body(problem_body(status, title, self.code(), detail))
    }
}

async fn not_found() -> HttpResponse {
    AdminError::NotFound.error_response()
}

async fn method_not_allowed(allow: &'static str) -> HttpResponse {
    AdminError::MethodNotAllowed { allow }.error_response()
}

/// The query of `GET /admin/dead-letters`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<usize>,
    after: Option<u64>,
}

fn parse_list_query(query: &str) -> Result<(Option<u64>, usize), AdminError> {
    let q = web::Query::<ListQuery>::from_query(query)
        .map_err(|e| AdminError::BadRequest(format!("invalid query: {e}")))?
        .into_inner();
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if !(1..=MAX_LIST_LIMIT).contains(&limit) {
        return Err(AdminError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIST_LIMIT}"
        )));
    }
    Ok((q.after, limit))
}

/// One dead letter as the admin API (and `credyt-proxy dlq list`) shows it.
#[derive(Debug, Serialize)]
pub struct DeadLetterView {
    seq: u64,
    delivery: DeliveryView,
    /// Stable: `refused`, `conflict` or `retries_exhausted`.
    code: DeadCode,
    reason: String,
    upstream_status: Option<u16>,
    upstream_body: Option<String>,
    at: DateTime<Utc>,
}

/// The delivery of a dead letter: who, which event, what (amount as a decimal string).
#[derive(Debug, Serialize)]
struct DeliveryView {
    /// `charge` (a priced fee) or `usage` (an event forwarded for Credyt to price).
    kind: &'static str,
    tenant: String,
    account: String,
    customer: String,
    event_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    transaction_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    price_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    amount: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    asset: Option<String>,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(l: DeadLetter) -> Self {
        let delivery = match l.delivery {
            Delivery::Charge(d) => DeliveryView {
                kind: "charge",
                tenant: d.tenant.to_string(),
                account: d.account.to_string(),
                customer: d.customer.to_string(),
                event_id: d.event_id.to_string(),
                event_type: None,
                transaction_id: Some(d.transaction_id),
                price_id: Some(d.fee.price_id.to_string()),
                // Display of a Decimal: its exact digits, scale kept ("0.50").
                amount: Some(d.fee.amount.to_string()),
                asset: Some(d.fee.asset.to_string()),
            },
            Delivery::Usage(u) => DeliveryView {
                kind: "usage",
                tenant: u.tenant.to_string(),
                account: u.account.to_string(),
                customer: u.customer.to_string(),
                event_id: u.event.id.to_string(),
                event_type: Some(u.event.event_type),
                transaction_id: None,
                price_id: None,
                amount: None,
                asset: None,
            },
            Delivery::Webhook(w) => DeliveryView {
                kind: "webhook",
                tenant: w.tenant.map(|t| t.to_string()).unwrap_or_default(),
                account: w.account.map(|a| a.to_string()).unwrap_or_default(),
                customer: w.customer.map(|c| c.id.to_string()).unwrap_or_default(),
                event_id: w.id.to_string(),
                event_type: Some(w.topic),
                transaction_id: None,
                price_id: None,
                amount: None,
                asset: None,
            },
        };
        DeadLetterView {
            seq: l.seq,
            delivery,
            code: l.code,
            reason: l.reason,
            upstream_status: l.upstream_status,
            upstream_body: l.upstream_body,
            at: l.at,
        }
    }
}

#[derive(Debug, Serialize)]
struct DeadLetterPage {
    dead_letters: Vec<DeadLetterView>,
    /// Present when more dead letters follow: the `after` of the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after: Option<u64>,
}

async fn list_dead_letters(
    state: web::Data<AdminState>,
    req: HttpRequest,
) -> Result<HttpResponse, AdminError> {
    list(state, req, Store::Events).await
}

async fn list_webhook_dead_letters(
    state: web::Data<AdminState>,
    req: HttpRequest,
) -> Result<HttpResponse, AdminError> {
    list(state, req, Store::Webhooks).await
}

async fn list(
    state: web::Data<AdminState>,
    req: HttpRequest,
    store: Store,
) -> Result<HttpResponse, AdminError> {
    let outbox = state.authorize(&req, store)?.clone();
    let (after, limit) = parse_list_query(req.query_string())?;
    // A read of the store: blocking.
    let (letters, more) =
        tokio::task::spawn_blocking(move || outbox.dead_letters_page(after, limit))
            .await
            .map_err(AdminError::Blocking)?
            .map_err(AdminError::Outbox)?;
    let next_after = more.then(|| letters.last().map(|l| l.seq)).flatten();
    let page = DeadLetterPage {
        dead_letters: letters.into_iter().map(DeadLetterView::from).collect(),
        next_after,
    };
    Ok(HttpResponse::Ok().json(page))
}

/// What `POST /admin/dead-letters/replay` moves back to pending.
#[derive(Debug, PartialEq, Eq)]
enum ReplayTarget {
    Seqs(Vec<u64>),
    All,
}

fn parse_replay(body: &[u8]) -> Result<ReplayTarget, AdminError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        seqs: Option<Vec<u64>>,
        all: Option<bool>,
    }
    const FORMS: &str = r#"the body must be exactly one of {"seqs": [1, 2]} or {"all": true}"#;
    let raw: Raw = serde_json::from_slice(body)
        .map_err(|e| AdminError::BadRequest(format!("{FORMS}: {e}")))?;
    match (raw.seqs, raw.all) {
        (Some(seqs), None) if seqs.is_empty() => Err(AdminError::BadRequest(
            "seqs must name at least one dead letter".into(),
        )),
        (Some(seqs), None) if seqs.len() > MAX_LIST_LIMIT => Err(AdminError::BadRequest(format!(
            "at most {MAX_LIST_LIMIT} seqs in one replay"
        ))),
        (Some(seqs), None) => Ok(ReplayTarget::Seqs(seqs)),
        (None, Some(true)) => Ok(ReplayTarget::All),
        _ => Err(AdminError::BadRequest(FORMS.into())),
    }
}

async fn replay_dead_letters(
    state: web::Data<AdminState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, AdminError> {
    replay(state, req, body, Store::Events).await
}

async fn replay_webhook_dead_letters(
    state: web::Data<AdminState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, AdminError> {
    replay(state, req, body, Store::Webhooks).await
}

async fn replay(
    state: web::Data<AdminState>,
    req: HttpRequest,
    body: web::Bytes,
    store: Store,
) -> Result<HttpResponse, AdminError> {
    let outbox = state.authorize(&req, store)?;
    let target = parse_replay(&body)?;
    let _one_at_a_time = state.replays.lock().await;
    let replayed = match &target {
        ReplayTarget::All => outbox.replay(None).await,
        ReplayTarget::Seqs(seqs) => outbox.replay(Some(seqs)).await,
    }
    .map_err(AdminError::Outbox)?;
    tracing::info!(
        replayed,
        all = target == ReplayTarget::All,
        webhooks = store == Store::Webhooks,
        "dead letters replayed through the admin port"
    );
    Ok(HttpResponse::Ok().json(serde_json::json!({ "replayed": replayed })))
}

async fn readyz(state: web::Data<AdminState>) -> HttpResponse {
    let poisoned = state
        .app
        .outbox
        .as_ref()
        .is_some_and(|o| o.stats().poisoned);
    if poisoned {
        // Writes are refused until a restart: take this replica out of rotation.
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "outbox stopped after a failed write",
        )
    } else if state.credentials.is_refused() {
        // Nothing could reach Credyt: take this replica out until the key works.
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "credyt refused the platform key",
        )
    } else if state.readiness.is_ready() {
        text(StatusCode::OK, "ready")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// A plain-text answer (the probes'), with its content type.
fn text(status: StatusCode, body: &'static str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type(header::ContentType::plaintext())
        .body(body)
}

/// `GET /openapi.json`: the committed document, as is.
async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type(header::ContentType::json())
        .body(OPENAPI_JSON)
}

/// `GET /metrics`: Prometheus text 0.0.4, or OpenMetrics when the scraper's `Accept` asks for
/// it (Prometheus does). Everything in it is defined in `telemetry::metrics`.
async fn metrics(state: web::Data<AdminState>, req: HttpRequest) -> HttpResponse {
    // Brings the cache's count up to date (moka counts lazily).
    state.app.identity.cached_customers().await;
    let openmetrics = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    match state.app.metrics.encode(openmetrics) {
        Ok(body) => HttpResponse::Ok()
            .content_type(if openmetrics {
                OPENMETRICS_TEXT
            } else {
                PROMETHEUS_TEXT
            })
            .body(body),
        Err(e) => {
            tracing::warn!(error = %e, "metrics could not be encoded");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics could not be encoded",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;
    use actix_web::test::TestRequest;

    #[test]
    fn admin_replay_body_is_exactly_one_of_two_forms() {
        assert_eq!(
            parse_replay(br#"{"seqs": [3, 1]}"#).unwrap(),
            ReplayTarget::Seqs(vec![3, 1])
        );
        assert_eq!(
            parse_replay(br#"{"all": true}"#).unwrap(),
            ReplayTarget::All
        );
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"all": false}"#,
            r#"{"all": true, "seqs": [1]}"#,
            r#"{"seqs": []}"#,
            r#"{"seqs": [-1]}"#,
            r#"{"seqs": [1.5]}"#,
            r#"{"seqs": "1"}"#,
            r#"{"all": true, "force": true}"#,
        ] {
            let err = parse_replay(bad.as_bytes()).unwrap_err();
            assert_eq!(err.code(), "invalid_request", "{bad}");
        }
        let many = format!(
            "{{\"seqs\": {:?}}}",
            (0..=MAX_LIST_LIMIT as u64).collect::<Vec<_>>()
        );
        assert!(parse_replay(many.as_bytes()).is_err());
    }

    #[test]
    fn admin_list_query_has_bounded_limit_and_optional_after() {
        assert_eq!(parse_list_query("").unwrap(), (None, DEFAULT_LIST_LIMIT));
        assert_eq!(parse_list_query("limit=10&after=7").unwrap(), (Some(7), 10));
        assert_eq!(
            parse_list_query("limit=10000").unwrap(),
            (None, MAX_LIST_LIMIT)
        );
        for bad in ["limit=0", "limit=10001", "limit=x", "after=-1", "page=2"] {
            assert_eq!(
                parse_list_query(bad).unwrap_err().code(),
                "invalid_request",
                "{bad}"
            );
        }
    }

    #[test]
    fn admin_bearer_token_is_read_from_the_authorization_header() {
        let token = |value: Option<&str>| {
            let mut req = TestRequest::default();
            if let Some(v) = value {
                req = req.insert_header((header::AUTHORIZATION, v));
            }
            bearer_token(&req.to_http_request()).map(str::to_string)
        };
        assert_eq!(token(Some("Bearer abc")), Some("abc".into()));
        assert_eq!(token(Some("bearer  abc ")), Some("abc".into()));
        assert_eq!(token(None), None);
        assert_eq!(token(Some("Basic abc")), None);
        assert_eq!(token(Some("Bearer ")), None);
        assert_eq!(token(Some("abc")), None);
    }

    #[test]
    fn admin_errors_are_problem_json_with_stable_codes() {
        for (err, status, code) in [
            (AdminError::Disabled, 403, "admin_disabled"),
            (AdminError::Unauthorized, 401, "unauthorized"),
            (AdminError::NoOutbox, 404, "no_outbox"),
            (AdminError::BadRequest("x".into()), 400, "invalid_request"),
            (
                AdminError::Outbox(OutboxError::Poisoned),
                503,
                "outbox_poisoned",
            ),
        ] {
            let resp = err.error_response();
            assert_eq!(resp.status().as_u16(), status, "{err}");
            assert_eq!(
                resp.headers().get(header::CONTENT_TYPE).unwrap(),
                PROBLEM_JSON
            );
            assert_eq!(
                resp.headers().contains_key(header::WWW_AUTHENTICATE),
                status == 401
            );
            let body = resp.into_body().try_into_bytes().unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["code"], code);
            assert_eq!(body["status"], status);
        }
    }
}
