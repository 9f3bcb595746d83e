//! The control API under `/_emulator/` (same platform-key auth as the emulated API).
//!
//! Contract:
//! - `GET /_emulator/state`: the caller platform's accounts, customers and wallet accounts with
//!   exact balances and per wallet account the count and exact sum of charges and adjustments.
//!   Amounts are JSON numbers written exactly (parse them with arbitrary precision).
//! - `GET /_emulator/requests?limit=N`: newest N (default 100) logged requests + counters.
//! - `GET|PUT|DELETE /_emulator/faults`: read, replace, clear the fault rules.
//! - `PUT /_emulator/thresholds`: default threshold and/or per-customer thresholds.
//! - `GET /_emulator/webhooks`: the webhook delivery log.
//! - `POST /_emulator/reset`: forget all data, logs, faults, then re-apply applied seeds.

use actix_web::{web, HttpRequest, HttpResponse};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{Map, Value};

use super::error::{ApiError, Errors};
use super::faults::FaultSet;
use super::routes::{parse_body, query_map, Ctx};
use super::state::Partition;
use super::Shared;

type ApiResult = Result<HttpResponse, ApiError>;

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/_emulator")
            .route("/state", web::get().to(state))
            .route("/requests", web::get().to(requests))
            .route("/faults", web::get().to(get_faults))
            .route("/faults", web::put().to(put_faults))
            .route("/faults", web::delete().to(delete_faults))
            .route("/thresholds", web::put().to(put_thresholds))
            .route("/webhooks", web::get().to(deliveries))
            .route("/reset", web::post().to(reset)),
    );
}

#[derive(Serialize)]
struct StateView {
    platform_account_id: String,
    #[serde(with = "rust_decimal::serde::arbitrary_precision_option")]
    default_threshold: Option<Decimal>,
    accounts: Vec<AccountView>,
}

#[derive(Serialize)]
struct AccountView {
    id: String,
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    external_id: Option<String>,
    /// false for the platform's own account.
    connected: bool,
    customers: Vec<CustomerView>,
    transactions: usize,
    events: usize,
}

#[derive(Serialize)]
struct CustomerView {
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    external_id: Option<String>,
    name: String,
    #[serde(with = "rust_decimal::serde::arbitrary_precision_option")]
    threshold: Option<Decimal>,
    wallet: Vec<WalletView>,
}

#[derive(Serialize)]
struct WalletView {
    id: String,
    asset: String,
    #[serde(with = "rust_decimal::serde::arbitrary_precision")]
    available: Decimal,
    charges: Tally,
    adjustments: Tally,
}

#[derive(Serialize)]
struct Tally {
    count: u64,
    #[serde(with = "rust_decimal::serde::arbitrary_precision")]
    total: Decimal,
}

fn account_view(p: &Partition) -> AccountView {
    let data = p.data.lock();
    let customers = data
        .customers
        .iter()
        .map(|c| CustomerView {
            id: c.id.clone(),
            external_id: c.external_id.clone(),
            name: c.name.clone(),
            threshold: c.threshold,
            wallet: c
                .wallet
                .iter()
                .map(|w| WalletView {
                    id: w.id(),
                    asset: w.asset.clone(),
                    available: w.available,
                    charges: Tally {
                        count: w.charge_count,
                        total: w.charge_total,
                    },
                    adjustments: Tally {
                        count: w.adjustment_count,
                        total: w.adjustment_total,
                    },
                })
                .collect(),
        })
        .collect();
    AccountView {
        id: p.id.clone(),
        name: p.name.clone(),
        external_id: p.external_id.clone(),
        connected: p.connected,
        customers,
        transactions: data.transactions.len(),
        events: data.events.len(),
    }
}

async fn state(shared: web::Data<Shared>, req: HttpRequest) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    let mut accounts = vec![account_view(&ctx.platform.own)];
    for p in shared.store.connected_accounts(&ctx.platform) {
        accounts.push(account_view(&p));
    }
    Ok(HttpResponse::Ok().json(StateView {
        platform_account_id: ctx.platform.own.id.clone(),
        default_threshold: *shared.store.default_threshold.read(),
        accounts,
    }))
}

async fn requests(shared: web::Data<Shared>, req: HttpRequest) -> ApiResult {
    Ctx::from_request(&shared, &req)?;
    let query = query_map(&req)?;
    let limit = match query.get("limit") {
        None => 100,
        Some(raw) => raw
            .parse::<usize>()
            .map_err(|_| ApiError::field("limit", "limit must be a non-negative integer."))?,
    };
    let (records, counters, total) = shared.requests.snapshot(limit);
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "requests": records,
        "counters": counters,
        "total": total,
    })))
}

async fn get_faults(shared: web::Data<Shared>, req: HttpRequest) -> ApiResult {
    Ctx::from_request(&shared, &req)?;
    Ok(HttpResponse::Ok().json(shared.faults.current()))
}

async fn put_faults(shared: web::Data<Shared>, req: HttpRequest, body: web::Bytes) -> ApiResult {
    Ctx::from_request(&shared, &req)?;
    let set: FaultSet = parse_body(&body)?;
    set.validate().into_result()?;
    shared.faults.replace(set.clone());
    Ok(HttpResponse::Ok().json(set))
}

async fn delete_faults(shared: web::Data<Shared>, req: HttpRequest) -> ApiResult {
    Ctx::from_request(&shared, &req)?;
    shared.faults.replace(FaultSet::default());
    Ok(HttpResponse::NoContent().finish())
}

/// Reads an optional nullable decimal: absent -> None, null -> Some(None).
fn nullable_decimal(
    obj: &Map<String, Value>,
    key: &str,
    field: &str,
    errors: &mut Errors,
) -> Option<Option<Decimal>> {
    match obj.get(key) {
        None => None,
        Some(Value::Null) => Some(None),
        Some(v) => match serde_json::from_value::<Decimal>(v.clone()) {
            Ok(d) => Some(Some(d)),
            Err(_) => {
                errors.add(field, format!("{key} must be a number or null."));
                None
            }
        },
    }
}

/// Body: `{"default_threshold"?: number|null, "customers"?: [{"customer_id", "threshold": number|null}]}`;
/// customers are looked up in the partition `X-CREDYT-ACCOUNT` selects.
async fn put_thresholds(
    shared: web::Data<Shared>,
    req: HttpRequest,
    body: web::Bytes,
) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    let body: Map<String, Value> = parse_body(&body)?;
    let mut errors = Errors::default();
    let default = nullable_decimal(&body, "default_threshold", "default_threshold", &mut errors);
    let mut updates = Vec::new();
    match body.get("customers") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let Some(obj) = item.as_object() else {
                    errors.add(format!("customers[{i}]"), "must be an object.");
                    continue;
                };
                let id = obj.get("customer_id").and_then(Value::as_str);
                if id.is_none() {
                    errors.add(
                        format!("customers[{i}].customer_id"),
                        "customer_id is required.",
                    );
                }
                let field = format!("customers[{i}].threshold");
                match nullable_decimal(obj, "threshold", &field, &mut errors) {
                    None if !obj.contains_key("threshold") => {
                        errors.add(field, "threshold is required (number or null).")
                    }
                    None => {}
                    Some(t) => updates.push((id.unwrap_or_default().to_owned(), t)),
                }
            }
        }
        Some(_) => errors.add("customers", "customers must be an array."),
    }
    errors.into_result()?;
    {
        let mut data = ctx.partition.data.lock();
        for (id, _) in &updates {
            data.customer(id)?;
        }
        for (id, threshold) in updates {
            data.customer_mut(&id)?.threshold = threshold;
        }
    }
    if let Some(default) = default {
        *shared.store.default_threshold.write() = default;
    }
    Ok(HttpResponse::NoContent().finish())
}

async fn deliveries(shared: web::Data<Shared>, req: HttpRequest) -> ApiResult {
    Ctx::from_request(&shared, &req)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "deliveries": shared.deliverer.records() })))
}

async fn reset(shared: web::Data<Shared>, req: HttpRequest) -> ApiResult {
    Ctx::from_request(&shared, &req)?;
    shared
        .reset()
        .map_err(|e| ApiError::BadRequest(format!("re-applying seeds failed: {e}")))?;
    Ok(HttpResponse::NoContent().finish())
}
