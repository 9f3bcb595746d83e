//! The tenant-facing HTTP API: routes, wire payloads -> domain, and the one error table.
//!
//! Contract:
//! - `POST /events` is Credyt-compatible (the official SDK's `send_usage` works unchanged):
//!   204 with no body when every event was accepted or already seen; 422 ValidationProblem
//!   naming `events[i].field` when any event is invalid, and then nothing of the request is
//!   accepted; 400 unparseable; 401 bad key; 404 unknown customer; 413; 415; 422 exceeds_burst;
//!   429; 431; 502/503. Bodies may be gzip-compressed ([`body`]).
//! - `POST /v1/events` takes the same body and answers 200 with one result per event
//!   (`accepted` with its fees, `duplicate`, or `rejected` with a stable code).
//! - `POST /v1/quote` prices one event without accepting it ([`crate::pricing::Quote`]).
//! - `POST /v1/balance/check` answers whether an end user's balance covers an amount, or a
//!   prospective event priced with the tenant's book, as balance gating would judge it now
//!   ([`crate::balance`]); it records and holds nothing.
//! - Amounts in every JSON answer are decimal strings (`"0.50"`), never JSON numbers.
//! - The tenant key comes in `X-CREDYT-API-KEY` (what the SDK sends) or `Authorization: Bearer`.
//! - With traces on, each request to these three routes is a server span ([`trace`]) that
//!   continues the caller's trace (`traceparent`), with the tenant, the event and outcome
//!   counts and the status as attributes.

pub mod body;
pub mod conn;
pub mod finish;
pub mod pipeline;
pub mod problem;
pub mod sink;
pub mod trace;
pub mod wire;

use std::sync::Arc;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;

use crate::config::Settings;
use crate::domain::Fee;
use crate::identity::{Identity, Tenants};
use crate::outcome::{Outcome, Rejection};
use crate::pricing::{Pricing, Quote};
use crate::telemetry::metrics::{Endpoint, Metrics};
use crate::telemetry::traces;

use body::read_body;
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
    /// This proxy's metrics (see `telemetry::metrics`).
    pub metrics: Arc<Metrics>,
    /// Balance gating (used only for tenants with `gate` on).
    pub gate: Arc<crate::balance::Gate>,
}

pub type State = Arc<AppState>;

/// Registers the tenant-facing routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/events", web::post().to(post_events))
        .route("/v1/events", web::post().to(post_v1_events))
        .route("/v1/quote", web::post().to(post_quote))
        .route("/v1/balance/check", web::post().to(post_balance_check))
        .route("/healthz", web::get().to(healthz));
}

/// Times a handler and counts its answer under its route pattern (a bounded label).
async fn timed<F>(
    state: &AppState,
    endpoint: Endpoint,
    handler: F,
) -> Result<HttpResponse, ApiError>
where
    F: std::future::Future<Output = Result<HttpResponse, ApiError>>,
{
    use actix_web::ResponseError;
    let started = std::time::Instant::now();
    let result = handler.await;
    let status = match &result {
        Ok(resp) => resp.status(),
        Err(e) => e.status_code(),
    };
    state
        .metrics
        .http
        .observe_request(endpoint, status.as_u16(), started.elapsed());
    result
}

async fn healthz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    timed(&state, Endpoint::Healthz, async {
        Ok(HttpResponse::Ok().finish())
    })
    .await
}

/// Answers unknown paths and methods with problem+json: 404 `not_found`, or for a known path
/// 405 `method_not_allowed` with `Allow`. Counted under the endpoint of a known path (a wrong
/// method), or `other`: never under the path asked for.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    not_served(&req, None)
}

/// [`not_found`], with the methods of a path the gateway serves too (`Allow` then names both
/// kinds; e.g. `/events`: `GET` through the gateway, `POST` here).
pub fn not_served(req: &HttpRequest, gateway_allow: Option<&'static str>) -> HttpResponse {
    use actix_web::ResponseError;
    let started = std::time::Instant::now();
    let (endpoint, allow) = match req.path() {
        "/events" => (Some(Endpoint::Events), "POST"),
        "/v1/events" => (Some(Endpoint::V1Events), "POST"),
        "/v1/quote" => (Some(Endpoint::V1Quote), "POST"),
        "/v1/balance/check" => (Some(Endpoint::V1BalanceCheck), "POST"),
        "/healthz" => (Some(Endpoint::Healthz), "GET"),
        _ => (None, ""),
    };
    let allow = gateway_allow.unwrap_or(allow);
    let resp = if endpoint.is_some() || gateway_allow.is_some() {
        ApiError::MethodNotAllowed { allow }.error_response()
    } else {
        ApiError::NotFound.error_response()
    };
    if let Some(state) = req.app_data::<web::Data<AppState>>() {
        state.metrics.http.observe_request(
            endpoint.unwrap_or(Endpoint::Other),
            resp.status().as_u16(),
            started.elapsed(),
        );
    }
    resp
}

/// The tenant key of a request: `X-CREDYT-API-KEY` or `Authorization: Bearer`.
pub(crate) fn api_key(req: &HttpRequest) -> Option<&str> {
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

/// The tenant of a request (401 first, before its body is read) and its body.
async fn tenant_and_body(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<(Arc<crate::identity::Tenant>, web::BytesMut), ApiError> {
    let tenant = pipeline::authenticate(state, api_key(req))?;
    traces::record_current(traces::attr::TENANT, tenant.id.as_str());
    let body = read_body(req, payload, state.settings.server.max_body_bytes).await?;
    Ok((tenant, body))
}

async fn run(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
    mode: Mode,
) -> Result<Vec<Outcome>, ApiError> {
    let state: State = state.into_inner();
    let (tenant, body) = tenant_and_body(&state, &req, payload).await?;
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
    let metrics = state.clone();
    timed(&metrics, Endpoint::Events, async move {
        run(state, req, payload, Mode::Atomic).await?;
        Ok(HttpResponse::NoContent().finish())
    })
    .await
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
    let metrics = state.clone();
    timed(&metrics, Endpoint::V1Events, v1_events(state, req, payload)).await
}

async fn v1_events(
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

/// `POST /v1/quote`: the price breakdown of one event (a Credyt usage event object), without
/// accepting it; the same [`Quote`] shape `credyt-proxy quote` prints.
async fn post_quote(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    timed(&state, Endpoint::V1Quote, quote(&state, req, payload)).await
}

async fn quote(
    state: &AppState,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let (tenant, body) = tenant_and_body(state, &req, payload).await?;
    let event: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let event = one_event(state, event)?;
    let query = QuoteQuery::parse(req.query_string())?;
    let pricing = state.pricing.current();
    let quote = match (query.total, &state.sink) {
        (Some(total), _) => Quote::build_with(
            &pricing,
            tenant.id.as_str(),
            &event,
            crate::pricing::quote::Totals::AsIf(total),
        )?,
        (None, Sink::Durable(outbox)) if query.names_customer() => {
            let account = state.identity.account(&tenant).await?;
            let customer = match (query.customer_id, query.customer_external_id) {
                (Some(id), _) => crate::domain::CustomerId::new(id.as_str()),
                (None, Some(ext)) => {
                    state
                        .identity
                        .customer_by_external_id(&account, &ext, false)
                        .await?
                }
                (None, None) => return Err(ApiError::BadJson("no customer".into())),
            };
            // A point read of the outbox's totals (memory, else one fjall lookup).
            let lookup = |part: &crate::pricing::period::PeriodPart| {
                outbox
                    .running_total(&part.key(tenant.id.as_str(), customer.as_str()))
                    .map_err(|e| crate::pricing::QuoteError::Totals(e.to_string()))
            };
            Quote::build_with(
                &pricing,
                tenant.id.as_str(),
                &event,
                crate::pricing::quote::Totals::Recorded(&lookup),
            )?
        }
        _ => Quote::build(&pricing, tenant.id.as_str(), &event)?,
    };
    Ok(HttpResponse::Ok().json(quote))
}

/// One usage event object, validated as `events[0]` of an events request is (a rejection
/// names `events[0].<field>`).
fn one_event(
    state: &AppState,
    event: serde_json::Value,
) -> Result<crate::domain::UsageEvent, ApiError> {
    let wrapped = serde_json::json!({ "customer_id": "one", "events": [event] });
    let bytes = serde_json::to_vec(&wrapped).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let parsed = wire::parse_request(&bytes, &state.settings.ingest, chrono::Utc::now())?;
    parsed
        .events
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::BadJson("no event".into()))?
        .map_err(|r| ApiError::Validation(vec![r]))
}

/// `POST /v1/balance/check` body: an end user (as in an events request) and either an amount
/// in an asset or a prospective event.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRequest {
    customer_id: Option<String>,
    customer_external_id: Option<String>,
    amount: Option<serde_json::Value>,
    asset: Option<String>,
    event: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct CheckLineBody {
    asset: std::sync::Arc<str>,
    #[serde(with = "rust_decimal::serde::str")]
    available: rust_decimal::Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    required: rust_decimal::Decimal,
    allowed: bool,
}

#[derive(Serialize)]
struct CheckResponse {
    allowed: bool,
    /// The asset that decides (the first that falls short, else the first required); absent
    /// when nothing is required.
    #[serde(skip_serializing_if = "Option::is_none")]
    asset: Option<std::sync::Arc<str>>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "rust_decimal::serde::str_option"
    )]
    available: Option<rust_decimal::Decimal>,
    #[serde(with = "rust_decimal::serde::str")]
    required: rust_decimal::Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    min_available: rust_decimal::Decimal,
    /// Whether the tenant's events are gated (without gating the answer is informational).
    gated: bool,
    assets: Vec<CheckLineBody>,
}

async fn post_balance_check(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    timed(
        &state,
        Endpoint::V1BalanceCheck,
        balance_check(&state, req, payload),
    )
    .await
}

fn invalid(field: &str, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::Validation(vec![Rejection {
        code,
        field: field.into(),
        message: message.into(),
    }])
}

async fn balance_check(
    state: &AppState,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    use rust_decimal::Decimal;
    let (tenant, body) = tenant_and_body(state, &req, payload).await?;
    let check: CheckRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadJson(e.to_string()))?;
    let required: Vec<(Arc<str>, Decimal)> = match (check.amount, check.asset, check.event) {
        (Some(amount), Some(asset), None) => {
            let text = match &amount {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                _ => {
                    return Err(invalid(
                        "amount",
                        "invalid_amount",
                        "amount must be a decimal",
                    ))
                }
            };
            let amount = Decimal::from_str_exact(text.trim())
                .ok()
                .filter(|a| !a.is_sign_negative())
                .ok_or_else(|| {
                    invalid(
                        "amount",
                        "invalid_amount",
                        "amount must be a decimal of at least 0",
                    )
                })?;
            let asset = asset.trim();
            if asset.is_empty() || asset.len() > 32 {
                return Err(invalid(
                    "asset",
                    "invalid_asset",
                    "asset must be an asset code, e.g. USD",
                ));
            }
            vec![(Arc::from(asset), amount)]
        }
        (None, None, Some(event)) => {
            let event = one_event(state, event)?;
            let fees = state
                .pricing
                .current()
                .price(tenant.id.as_str(), &event)
                .map_err(|e| invalid("event", e.code(), e.to_string()))?;
            fees.into_iter()
                .filter(|f| !f.amount.is_zero())
                .map(|f| (f.asset, f.amount))
                .collect()
        }
        _ => {
            return Err(invalid(
                "amount",
                "invalid_check",
                "give either amount and asset, or event",
            ))
        }
    };
    let account = state.identity.account(&tenant).await?;
    let customer = match (check.customer_id, check.customer_external_id) {
        (Some(id), None) => {
            state
                .identity
                .check_customer(&account, &crate::domain::CustomerId::new(id.as_str()))
                .await?
        }
        (None, Some(ext)) => {
            state
                .identity
                .customer_by_external_id(&account, &ext, false)
                .await?
        }
        _ => {
            return Err(invalid(
                "customer_id",
                "invalid_customer",
                "give either customer_id or customer_external_id",
            ))
        }
    };
    let policy = tenant.gate.clone().unwrap_or(crate::balance::GatePolicy {
        min_available: Decimal::ZERO,
        on_unknown: crate::balance::OnUnknown::Deny,
    });
    let lines = if required.is_empty() {
        Vec::new()
    } else {
        state
            .gate
            .check(&policy, &account, &customer, &required)
            .await
            .map_err(ApiError::BalanceUnavailable)?
    };
    let deciding = lines.iter().find(|l| !l.allowed).or(lines.first());
    let resp = CheckResponse {
        allowed: lines.iter().all(|l| l.allowed),
        asset: deciding.map(|l| l.asset.clone()),
        available: deciding.map(|l| l.available),
        required: deciding.map_or(Decimal::ZERO, |l| l.required),
        min_available: policy.min_available,
        gated: tenant.gate.is_some(),
        assets: lines
            .into_iter()
            .map(|l| CheckLineBody {
                asset: l.asset,
                available: l.available,
                required: l.required,
                allowed: l.allowed,
            })
            .collect(),
    };
    Ok(HttpResponse::Ok().json(resp))
}

/// The query of `POST /v1/quote`: whose running totals to rate period-tiered prices against
/// (`customer_id` or `customer_external_id`), or `total`, "as if the total were N".
#[derive(Debug, Default, serde::Deserialize)]
struct QuoteQuery {
    customer_id: Option<String>,
    customer_external_id: Option<String>,
    #[serde(skip)]
    total: Option<rust_decimal::Decimal>,
    #[serde(rename = "total")]
    total_text: Option<String>,
}

impl QuoteQuery {
    fn parse(query: &str) -> Result<QuoteQuery, ApiError> {
        let invalid = |field: &str, message: String| {
            ApiError::Validation(vec![Rejection {
                code: "invalid_query",
                field: field.into(),
                message,
            }])
        };
        let mut q: QuoteQuery = web::Query::<QuoteQuery>::from_query(query)
            .map_err(|e| invalid("query", e.to_string()))?
            .into_inner();
        if let Some(text) = &q.total_text {
            let total = crate::pricing::money::parse_decimal(text, false)
                .map_err(|e| invalid("total", format!("total: {e}")))?;
            if total.is_sign_negative() && !total.is_zero() {
                return Err(invalid("total", format!("total: {total} is negative")));
            }
            q.total = Some(total);
        }
        Ok(q)
    }

    fn names_customer(&self) -> bool {
        self.customer_id.is_some() || self.customer_external_id.is_some()
    }
}
