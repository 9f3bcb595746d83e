//! The tenant-facing HTTP API: routes, wire payloads -> domain, and the one error table.
//!
//! Contract:
//! - `POST /events` is Credyt-compatible (the official SDK's `send_usage` works unchanged):
//!   204 with no body when every event was accepted or already seen; 422 ValidationProblem
//!   naming `events[i].field` when any event is invalid, and then nothing of the request is
//!   accepted; 400 unparseable; 401 bad key; 404 unknown customer; 413; 415; 429; 502/503.
//! - `POST /v1/events` takes the same body and answers 200 with one result per event
//!   (`accepted` with its fees, `duplicate`, or `rejected` with a stable code).
//! - `POST /v1/quote` prices one event without accepting it.
//! - The tenant key comes in `X-CREDYT-API-KEY` (what the SDK sends) or `Authorization: Bearer`.
//! - With traces on, each request to these three routes is a server span ([`trace`]) that
//!   continues the caller's trace (`traceparent`), with the tenant, the event and outcome
//!   counts and the status as attributes.

pub mod finish;
pub mod pipeline;
pub mod problem;
pub mod sink;
pub mod trace;
pub mod wire;

use std::sync::Arc;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::Serialize;

use crate::config::Settings;
use crate::domain::Fee;
use crate::identity::{Identity, Tenants};
use crate::outcome::{Outcome, OutcomeCounters, Rejection};
use crate::pricing::Pricing;
use crate::telemetry::traces;

use pipeline::Mode;
use problem::ApiError;
use sink::Sink;

pub use trace::TraceRequests;

/// Everything a request needs, shared by all workers.
pub struct AppState {
    pub settings: Arc<Settings>,
    pub tenants: Arc<Tenants>,
    pub identity: Arc<Identity>,
    pub pricing: Arc<Pricing>,
    pub sink: Sink,
    /// The outbox, when `ack = "durable"` (for the admin port).
    pub outbox: Option<crate::outbox::Outbox>,
    pub counters: Arc<OutcomeCounters>,
}

pub type State = Arc<AppState>;

/// Registers the tenant-facing routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/events", web::post().to(post_events))
        .route("/v1/events", web::post().to(post_v1_events))
        .route("/v1/quote", web::post().to(post_quote))
        .route(
            "/healthz",
            web::get().to(|| async { HttpResponse::Ok().finish() }),
        );
}

/// Answers unknown paths and methods with problem+json.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    use actix_web::ResponseError;
    let known = ["/events", "/v1/events", "/v1/quote"].contains(&req.path());
    if known {
        ApiError::MethodNotAllowed.error_response()
    } else {
        ApiError::NotFound.error_response()
    }
}

fn api_key(req: &HttpRequest) -> Option<&str> {
    if let Some(v) = req.headers().get("x-credyt-api-key") {
        return v.to_str().ok().map(str::trim);
    }
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// Reads the body within the configured limit, checking the content type first.
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, ApiError> {
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            let essence = v.split(';').next().unwrap_or("").trim();
            essence.eq_ignore_ascii_case("application/json")
        })
        .unwrap_or(false);
    if !json {
        return Err(ApiError::UnsupportedMediaType);
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(1024).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadJson(format!("body could not be read: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

async fn run(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    mode: Mode,
) -> Result<Vec<Outcome>, ApiError> {
    let state: State = state.into_inner();
    let tenant = pipeline::authenticate(&state, api_key(&req))?;
    traces::record_current(traces::attr::TENANT, tenant.id.as_str());
    let body = read_body(&req, payload, state.settings.server.max_body_bytes).await?;
    drop(req);
    // If the client disconnects, actix drops this future; what must still happen once events
    // are being accepted runs to its end anyway (see `finish`).
    let outcomes = pipeline::process(&state, &tenant, body, mode).await?;
    if traces::active() {
        trace::record_outcomes(&outcomes);
    }
    Ok(outcomes)
}

async fn post_events(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    run(state, req, payload, Mode::Atomic).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Serialize)]
struct EventResult<'a> {
    index: usize,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    fees: Option<&'a [Fee]>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    rejection: Option<&'a Rejection>,
}

#[derive(Serialize)]
struct BatchResponse<'a> {
    accepted: usize,
    duplicates: usize,
    rejected: usize,
    results: Vec<EventResult<'a>>,
}

async fn post_v1_events(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let outcomes = run(state, req, payload, Mode::Partial).await?;
    let mut resp = BatchResponse {
        accepted: 0,
        duplicates: 0,
        rejected: 0,
        results: Vec::with_capacity(outcomes.len()),
    };
    for (index, o) in outcomes.iter().enumerate() {
        let (status, fees, rejection) = match o {
            Outcome::Accepted { fees } => {
                resp.accepted += 1;
                ("accepted", Some(fees.as_slice()), None)
            }
            Outcome::Duplicate => {
                resp.duplicates += 1;
                ("duplicate", None, None)
            }
            Outcome::Rejected(r) => {
                resp.rejected += 1;
                ("rejected", None, Some(r))
            }
        };
        resp.results.push(EventResult {
            index,
            status,
            fees,
            rejection,
        });
    }
    Ok(HttpResponse::Ok().json(resp))
}

#[derive(Serialize)]
struct QuoteResponse {
    pricing_version: String,
    pricing_hash: String,
    fees: Vec<Fee>,
}

/// `POST /v1/quote`: the price breakdown of one event (a Credyt usage event object), without
/// accepting it.
async fn post_quote(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let tenant = pipeline::authenticate(&state, api_key(&req))?;
    traces::record_current(traces::attr::TENANT, tenant.id.as_str());
    let body = read_body(&req, payload, state.settings.server.max_body_bytes).await?;
    let event: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let wrapped = serde_json::json!({ "customer_id": "quote", "events": [event] });
    let bytes = serde_json::to_vec(&wrapped).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let parsed = wire::parse_request(&bytes, &state.settings.ingest, chrono::Utc::now())?;
    let event = parsed
        .events
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::BadJson("no event".into()))?
        .map_err(|r| ApiError::Validation(vec![r]))?;
    let pricing = state.pricing.current();
    let fees = pricing.price(tenant.id.as_str(), &event).map_err(|e| {
        ApiError::Validation(vec![Rejection {
            code: e.code(),
            field: "event".into(),
            message: e.to_string(),
        }])
    })?;
    Ok(HttpResponse::Ok().json(QuoteResponse {
        pricing_version: pricing.version().to_string(),
        pricing_hash: pricing.hash().to_string(),
        fees,
    }))
}
