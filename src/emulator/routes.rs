//! The emulated Credyt REST API (accounts, customers, wallet, events, webhooks).
//!
//! Contract: every handler authenticates with [`Ctx::from_request`] (401 empty body for a
//! missing/unknown key, 403 problem for a foreign `X-CREDYT-ACCOUNT`), works on exactly one
//! partition, locks it briefly, and answers the status and body the SDK expects (201 creates,
//! 200 reads, 204 PATCH/DELETE/`POST /events`). Threshold crossings are handed to the
//! webhook deliverer after the partition lock is released.

use std::collections::HashMap;
use std::sync::Arc;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::{ApiError, Errors};
use super::ids::{new_id, random_body};
use super::state::{
    parse_wallet_account_id, MovementKind, NewCustomer, Partition, Platform, StoredEvent,
};
use super::webhooks::Destination;
use super::wire::*;
use super::Shared;

type ApiResult = Result<HttpResponse, ApiError>;

const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 100;

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    // The router tries resources in order, running a regular expression for each dynamic one:
    // the hottest route (charges) goes first. No route before it can match its paths.
    cfg.route(
        "/customers/{customer_id}/wallet/charges",
        web::post().to(create_charge),
    )
    .route("/accounts", web::post().to(create_account))
    .route("/accounts", web::get().to(list_accounts))
    .route("/accounts/self", web::get().to(account_context))
    .route("/accounts/{account_id}", web::get().to(get_account))
    .route("/customers", web::post().to(create_customer))
    .route("/customers", web::get().to(list_customers))
    .route("/customers/{customer_id}", web::get().to(get_customer))
    .route("/customers/{customer_id}", web::patch().to(update_customer))
    .route("/customers/{customer_id}/wallet", web::get().to(get_wallet))
    .route(
        "/customers/{customer_id}/wallet/adjustments",
        web::post().to(create_adjustment),
    )
    .route(
        "/customers/{customer_id}/wallet/transactions/{transaction_id}",
        web::get().to(get_transaction),
    )
    .route(
        "/customers/{customer_id}/wallet/{account_id}",
        web::get().to(get_wallet_account),
    )
    .route("/events", web::post().to(send_usage))
    .route("/events", web::get().to(list_events))
    .route("/events/{event_id}", web::get().to(get_event))
    .route("/top-ups", web::post().to(payments_restricted))
    .route(
        "/billing-portal/sessions",
        web::post().to(payments_restricted),
    )
    .route("/webhooks", web::post().to(create_webhook))
    .route("/webhooks", web::get().to(list_webhooks))
    .route("/webhooks/{webhook_id}", web::get().to(get_webhook))
    .route("/webhooks/{webhook_id}", web::patch().to(update_webhook))
    .route("/webhooks/{webhook_id}", web::delete().to(delete_webhook));
}

/// The authenticated caller: its platform and the partition `X-CREDYT-ACCOUNT` selects.
pub(crate) struct Ctx {
    pub platform: Arc<Platform>,
    pub partition: Arc<Partition>,
}

impl Ctx {
    pub fn from_request(shared: &Shared, req: &HttpRequest) -> Result<Ctx, ApiError> {
        let key = header_str(req, "x-credyt-api-key").ok_or(ApiError::Unauthorized)?;
        let platform = shared.store.platform(key).ok_or(ApiError::Unauthorized)?;
        let partition = shared
            .store
            .resolve(&platform, header_str(req, "x-credyt-account"))?;
        Ok(Ctx {
            platform,
            partition,
        })
    }

    /// Platform-level operations (accounts, webhooks) refuse to act for a connected account.
    fn require_platform(&self, what: &str) -> Result<(), ApiError> {
        if self.partition.connected {
            return Err(ApiError::Forbidden(format!(
                "{what} is only available to the platform account, not to connected account {}.",
                self.partition.id
            )));
        }
        Ok(())
    }
}

fn header_str<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Parses a JSON body; unparseable -> 400 problem (the SDK reads it as `ProblemDetails`).
pub(crate) fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("The request body is not valid: {e}.")))
}

pub(crate) fn query_map(req: &HttpRequest) -> Result<HashMap<String, String>, ApiError> {
    web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::BadRequest(format!("The query string is not valid: {e}.")))
}

/// `offset`/`limit` (default 20, max 100).
fn paging(query: &HashMap<String, String>) -> Result<(usize, usize), ApiError> {
    let mut errors = Errors::default();
    let mut read = |name: &str, default: usize, min: usize| -> usize {
        match query.get(name) {
            None => default,
            Some(raw) => match raw.parse::<usize>() {
                Ok(v) if v >= min => v,
                _ => {
                    errors.add(name, format!("{name} must be an integer >= {min}."));
                    default
                }
            },
        }
    };
    let offset = read("offset", 0, 0);
    let limit = read("limit", DEFAULT_LIMIT, 1);
    errors.into_result()?;
    Ok((offset, limit.min(MAX_LIMIT)))
}

fn page<T>(all: Vec<T>, offset: usize, limit: usize) -> Page<T> {
    let total_count = all.len();
    Page {
        items: all.into_iter().skip(offset).take(limit).collect(),
        total_count,
        limit,
        offset,
    }
}

fn created<T: serde::Serialize>(body: &T) -> HttpResponse {
    HttpResponse::Created().json(body)
}

fn required_string(errors: &mut Errors, field: &str, value: &Option<String>) {
    if value.as_deref().is_none_or(|v| v.trim().is_empty()) {
        errors.add(field, format!("{field} is required."));
    }
}

// ---- accounts -------------------------------------------------------------------------------

fn account_wire(p: &Partition) -> ConnectedAccount {
    ConnectedAccount {
        id: p.id.clone(),
        external_id: p.external_id.clone(),
        name: p.name.clone(),
        created_at: p.created_at,
        metadata: p.metadata.clone(),
    }
}

async fn create_account(
    shared: web::Data<Shared>,
    req: HttpRequest,
    body: web::Bytes,
) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    ctx.require_platform("Creating accounts")?;
    let body: CreateAccountRequest = parse_body(&body)?;
    let mut errors = Errors::default();
    required_string(&mut errors, "name", &body.name);
    errors.into_result()?;
    let account = shared.store.create_account(
        &ctx.platform,
        None,
        body.name.unwrap_or_default(),
        body.external_id,
        body.metadata,
    )?;
    Ok(created(&IdOnly {
        id: account.id.clone(),
    }))
}

async fn list_accounts(shared: web::Data<Shared>, req: HttpRequest) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    ctx.require_platform("Listing accounts")?;
    let query = query_map(&req)?;
    let (offset, limit) = paging(&query)?;
    let external = query.get("external_id");
    let all: Vec<ConnectedAccount> = shared
        .store
        .connected_accounts(&ctx.platform)
        .iter()
        .filter(|p| external.is_none_or(|e| p.external_id.as_ref() == Some(e)))
        .map(|p| account_wire(p))
        .collect();
    Ok(HttpResponse::Ok().json(page(all, offset, limit)))
}

async fn get_account(
    shared: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<String>,
) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    let id = path.into_inner();
    match shared.store.partition(&id) {
        Some(p) if p.connected && p.platform_account_id == ctx.platform.own.id => {
            Ok(HttpResponse::Ok().json(account_wire(&p)))
        }
        _ => Err(ApiError::NotFound(format!("Account {id} was not found."))),
    }
}

async fn account_context(shared: web::Data<Shared>, req: HttpRequest) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    Ok(HttpResponse::Ok().json(AccountContext {
        account_id: ctx.partition.id.clone(),
        environment: "test",
        org_id: ctx.platform.org_id.clone(),
        name: ctx.partition.name.clone(),
    }))
}

// ---- customers ------------------------------------------------------------------------------

async fn create_customer(
    shared: web::Data<Shared>,
    req: HttpRequest,
    body: web::Bytes,
) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    let body: CreateCustomerRequest = parse_body(&body)?;
    let mut errors = Errors::default();
    required_string(&mut errors, "name", &body.name);
    // No products exist in the emulator, so any requested subscription names a missing product.
    if body.subscriptions.as_ref().is_some_and(|s| !s.is_empty()) {
        errors.add(
            "subscriptions[0].products",
            "The emulator has no products: subscriptions cannot be created.",
        );
    }
    let _ = body.external_accounts;
    errors.into_result()?;
    let id = ctx.partition.data.lock().create_customer(NewCustomer {
        id: None,
        name: body.name.unwrap_or_default(),
        external_id: body.external_id,
        email: body.email,
        metadata: body.metadata,
    })?;
    Ok(created(&CreateCustomerResponse {
        id,
        subscriptions: Vec::new(),
    }))
}

fn summary(c: &super::state::Customer) -> CustomerSummary {
    CustomerSummary {
        id: c.id.clone(),
        external_id: c.external_id.clone(),
        name: c.name.clone(),
        email: c.email.clone(),
        active_subscription_count: 0,
    }
}

async fn list_customers(shared: web::Data<Shared>, req: HttpRequest) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    let query = query_map(&req)?;
    let other_filters = ["customer_id", "email", "name", "status"]
        .iter()
        .any(|k| query.contains_key(*k));
    if let (Some(external), false) = (query.get("external_id"), other_filters) {
        // A lookup by external id alone redirects to the customer (API.md §4).
        let data = ctx.partition.data.lock();
        let Some(&index) = data.by_external.get(external) else {
            return Err(ApiError::NotFound(format!(
                "Customer with external_id '{external}' was not found."
            )));
        };
        let location = format!("/customers/{}", data.customers[index].id);
        return Ok(HttpResponse::SeeOther()
            .insert_header((header::LOCATION, location))
            .finish());
    }
    let (offset, limit) = paging(&query)?;
    if let Some(status) = query.get("status") {
        if status != "active" && status != "inactive" {
            return Err(ApiError::field(
                "status",
                "status must be active or inactive.",
            ));
        }
    }
    let all: Vec<CustomerSummary> = {
        let data = ctx.partition.data.lock();
        data.customers
            .iter()
            .filter(|c| {
                query.get("customer_id").is_none_or(|v| &c.id == v)
                    && query
                        .get("external_id")
                        .is_none_or(|v| c.external_id.as_ref() == Some(v))
                    && query
                        .get("email")
                        .is_none_or(|v| c.email.as_ref() == Some(v))
                    && query.get("name").is_none_or(|v| &c.name == v)
                    // Nobody has an active subscription in the emulator.
                    && query.get("status").is_none_or(|v| v == "inactive")
            })
            .map(summary)
            .collect()
    };
    Ok(HttpResponse::Ok().json(page(all, offset, limit)))
}

async fn get_customer(
    shared: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<String>,
) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    let data = ctx.partition.data.lock();
    let c = data.customer(&path)?;
    let body = GetCustomerResponse {
        summary: summary(c),
        created_at: c.created_at,
        metadata: c.metadata.clone(),
        subscriptions: Vec::new(),
        external_accounts: Vec::new(),
    };
    drop(data);
    Ok(HttpResponse::Ok().json(body))
}

async fn update_customer(
    shared: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    let body: UpdateCustomerRequest = parse_body(&body)?;
    ctx.partition
        .data
        .lock()
        .update_customer(&path, body.name, body.external_id, body.email)?;
    Ok(HttpResponse::NoContent().finish())
}

// ---- wallet ---------------------------------------------------------------------------------

async fn get_wallet(
    shared: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<String>,
) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    let data = ctx.partition.data.lock();
    let accounts = data
        .customer(&path)?
        .wallet
        .iter()
        .map(|w| WalletAccountSummary {
            id: w.id(),
            name: w.name.clone(),
            asset: w.asset.clone(),
            available: w.available,
        })
        .collect();
    drop(data);
    Ok(HttpResponse::Ok().json(GetWalletResponse { accounts }))
}

/// Path segments arrive decoded by the router, but decode `%3A` defensively as well.
fn decode_colon(raw: &str) -> String {
    raw.replace("%3A", ":").replace("%3a", ":")
}

async fn get_wallet_account(
    shared: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    let (customer_id, raw) = path.into_inner();
    let account_id = decode_colon(&raw);
    let data = ctx.partition.data.lock();
    let customer = data.customer(&customer_id)?;
    let not_found = || ApiError::NotFound(format!("Wallet account {account_id} was not found."));
    let (name, asset) = parse_wallet_account_id(&account_id).ok_or_else(not_found)?;
    let w = customer
        .wallet
        .iter()
        .find(|w| w.name.eq_ignore_ascii_case(name) && w.asset.eq_ignore_ascii_case(asset))
        .ok_or_else(not_found)?;
    let body = WalletAccountDetails {
        summary: WalletAccountSummary {
            id: w.id(),
            name: w.name.clone(),
            asset: w.asset.clone(),
            available: w.available,
        },
        pending_in: Decimal::ZERO,
        pending_out: Decimal::ZERO,
    };
    drop(data);
    Ok(HttpResponse::Ok().json(body))
}

const ADJUSTMENT_REASONS: [&str; 4] = ["gift", "external_topup", "external_refund", "other"];

async fn create_adjustment(
    shared: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> ApiResult {
    movement(
        shared,
        req,
        path.into_inner(),
        body,
        MovementKind::Adjustment,
    )
    .await
}

async fn create_charge(
    shared: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> ApiResult {
    movement(shared, req, path.into_inner(), body, MovementKind::Charge).await
}

async fn movement(
    shared: web::Data<Shared>,
    req: HttpRequest,
    customer_id: String,
    body: web::Bytes,
    kind: MovementKind,
) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    let body: MovementRequest = parse_body(&body)?;
    let transaction_id = body.transaction_id.clone().unwrap_or_default();
    // Validated before locking, but only reported after the replay check: a replay answers the
    // original result whatever the payload (API.md §12.3).
    let validated = validate_movement(kind, body);
    let default_threshold = *shared.store.default_threshold.read();
    let (response, hit) = {
        let mut data = ctx.partition.data.lock();
        // An unknown customer is a 404 even for a known transaction id.
        data.customer(&customer_id)?;
        if let Some(original) = data.transactions.get(&transaction_id) {
            let body = MovementResponse {
                id: original.id.clone(),
                created_at: original.created_at,
            };
            drop(data);
            return Ok(created(&body));
        }
        data.apply_movement(&ctx.partition, &customer_id, validated?, default_threshold)?
    };
    if let Some(hit) = hit {
        let destinations = ctx.platform.data.lock().webhooks.clone();
        shared.deliverer.dispatch(&destinations, &hit);
    }
    Ok(created(&response))
}

fn validate_movement(
    kind: MovementKind,
    body: MovementRequest,
) -> Result<super::state::Movement, ApiError> {
    let mut errors = Errors::default();
    required_string(&mut errors, "transaction_id", &body.transaction_id);
    required_string(&mut errors, "asset", &body.asset);
    match (kind, body.amount) {
        (_, None) => errors.add("amount", "amount is required."),
        (MovementKind::Charge, Some(a)) if a <= Decimal::ZERO => {
            errors.add("amount", "amount must be greater than 0.")
        }
        (MovementKind::Adjustment, Some(a)) if a.is_zero() => {
            errors.add("amount", "amount must not be 0.")
        }
        _ => {}
    }
    if kind == MovementKind::Adjustment {
        match body.reason.as_deref() {
            None => errors.add("reason", "reason is required."),
            Some(r) if !ADJUSTMENT_REASONS.contains(&r) => errors.add(
                "reason",
                "reason must be one of gift, external_topup, external_refund, other.",
            ),
            Some(_) => {}
        }
    }
    if body
        .asset
        .as_deref()
        .is_some_and(|a| a.contains(':') || a.chars().any(char::is_whitespace))
    {
        errors.add("asset", "asset is not a valid asset code.");
    }
    errors.into_result()?;
    let amount = body.amount.unwrap_or_default();
    Ok(super::state::Movement {
        kind,
        transaction_id: body.transaction_id.unwrap_or_default(),
        account_name: body
            .account_name
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| "default".to_owned()),
        asset: body.asset.unwrap_or_default(),
        delta: if kind == MovementKind::Charge {
            -amount
        } else {
            amount
        },
        amount,
        description: body.description.or(body.subject),
        metadata: body.metadata,
    })
}

async fn get_transaction(
    shared: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    let (customer_id, transaction_id) = path.into_inner();
    let data = ctx.partition.data.lock();
    data.customer(&customer_id)?;
    let t = data
        .transactions
        .get(&transaction_id)
        .filter(|t| t.customer_id == customer_id)
        .ok_or_else(|| {
            ApiError::NotFound(format!("Transaction {transaction_id} was not found."))
        })?;
    let body = GetTransactionResponse {
        id: t.id.clone(),
        kind: match t.kind {
            MovementKind::Adjustment => "adjustment",
            MovementKind::Charge => "fee",
        },
        account_id: t.account_id.clone(),
        asset: t.asset.clone(),
        amount: t.amount,
        description: t.description.clone(),
        metadata: t.metadata.clone(),
        created_at: t.created_at,
        executed_at: t.created_at,
    };
    drop(data);
    Ok(HttpResponse::Ok().json(body))
}

// ---- usage events ---------------------------------------------------------------------------

/// Accepted `occurred_at` window (API.md §12.8).
const GRACE_PAST_DAYS: i64 = 7;
const GRACE_FUTURE_MINUTES: i64 = 5;

fn validate_event(i: usize, event: &Value, now: DateTime<Utc>, errors: &mut Errors) {
    let at = |f: &str| format!("events[{i}].{f}");
    let Some(obj) = event.as_object() else {
        errors.add(format!("events[{i}]"), "event must be an object.");
        return;
    };
    for field in ["id", "event_type"] {
        if obj
            .get(field)
            .and_then(Value::as_str)
            .is_none_or(|s| s.trim().is_empty())
        {
            errors.add(at(field), format!("{field} is required."));
        }
    }
    match obj.get("occurred_at").and_then(Value::as_str) {
        None => errors.add(at("occurred_at"), "occurred_at is required."),
        Some(raw) => match DateTime::parse_from_rfc3339(raw) {
            Err(_) => errors.add(
                at("occurred_at"),
                "occurred_at must be an RFC 3339 date-time.",
            ),
            Ok(t) => {
                let t = t.with_timezone(&Utc);
                if t < now - ChronoDuration::days(GRACE_PAST_DAYS) {
                    errors.add(
                        at("occurred_at"),
                        "occurred_at is outside the grace period.",
                    );
                } else if t > now + ChronoDuration::minutes(GRACE_FUTURE_MINUTES) {
                    errors.add(at("occurred_at"), "occurred_at is in the future.");
                }
            }
        },
    }
    for field in ["subject", "description"] {
        if obj
            .get(field)
            .is_some_and(|v| !v.is_string() && !v.is_null())
        {
            errors.add(at(field), format!("{field} must be a string."));
        }
    }
    match obj.get("data") {
        None | Some(Value::Null) => {}
        Some(Value::Object(data)) => {
            for (k, v) in data {
                if !(v.is_string() || v.is_boolean() || v.is_number()) {
                    errors.add(
                        at(&format!("data.{k}")),
                        "data values must be strings, booleans or numbers.",
                    );
                }
            }
        }
        Some(_) => errors.add(at("data"), "data must be an object."),
    }
    match obj.get("costs") {
        None | Some(Value::Null) => {}
        Some(Value::Array(costs)) => {
            for (j, cost) in costs.iter().enumerate() {
                let c = |f: &str| at(&format!("costs[{j}].{f}"));
                if cost.get("id").and_then(Value::as_str).is_none() {
                    errors.add(c("id"), "id is required.");
                }
                if cost
                    .get("amount")
                    .is_none_or(|a| serde_json::from_value::<Decimal>(a.clone()).is_err())
                {
                    errors.add(c("amount"), "amount is required and must be a number.");
                }
                if cost.get("vendor_id").is_none() && cost.get("vendor_external_id").is_none() {
                    errors.add(
                        c("vendor_id"),
                        "vendor_id or vendor_external_id is required.",
                    );
                }
            }
        }
        Some(_) => errors.add(at("costs"), "costs must be an array."),
    }
}

async fn send_usage(shared: web::Data<Shared>, req: HttpRequest, body: web::Bytes) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    let body: Map<String, Value> = parse_body(&body)?;
    let now = Utc::now();
    let mut errors = Errors::default();
    let customer_id = body.get("customer_id").and_then(Value::as_str);
    let customer_external_id = body.get("customer_external_id").and_then(Value::as_str);
    if customer_id.is_none() && customer_external_id.is_none() {
        errors.add(
            "customer_id",
            "customer_id or customer_external_id is required.",
        );
    }
    let events = match body.get("events") {
        Some(Value::Array(events)) if !events.is_empty() => events.as_slice(),
        _ => {
            errors.add("events", "events must be a non-empty array.");
            &[]
        }
    };
    for (i, event) in events.iter().enumerate() {
        validate_event(i, event, now, &mut errors);
    }
    errors.into_result()?;
    let mut data = ctx.partition.data.lock();
    let index = match (customer_id, customer_external_id) {
        (Some(id), _) => data.by_id.get(id).copied(),
        (None, Some(ext)) => data.by_external.get(ext).copied(),
        (None, None) => None,
    };
    let Some(index) = index else {
        let who = customer_id.or(customer_external_id).unwrap_or_default();
        return Err(ApiError::NotFound(format!("Customer {who} was not found.")));
    };
    let customer_id = data.customers[index].id.clone();
    for event in events {
        let Some(obj) = event.as_object() else {
            continue;
        };
        let id = obj
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        // Idempotent per account: a known event id is never stored (or billed) twice.
        if data.events.contains_key(&id) {
            continue;
        }
        data.event_order.push(id.clone());
        data.events.insert(
            id,
            StoredEvent {
                customer_id: customer_id.clone(),
                created_at: now,
                body: obj.clone(),
            },
        );
    }
    drop(data);
    Ok(HttpResponse::NoContent().finish())
}

/// `GET /events`: newest submission first; no event has fees (the emulator prices nothing).
async fn list_events(shared: web::Data<Shared>, req: HttpRequest) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    let query = query_map(&req)?;
    let (offset, limit) = paging(&query)?;
    let has_fees = parse_bool(&query, "has_fees")?;
    let mut errors = Errors::default();
    let mut date = |name: &str| -> Option<chrono::NaiveDate> {
        let raw = query.get(name)?;
        match chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d") {
            Ok(d) => Some(d),
            Err(_) => {
                errors.add(name, format!("{name} must be a date (YYYY-MM-DD)."));
                None
            }
        }
    };
    let period_from = date("period_from");
    let period_to = date("period_to");
    errors.into_result()?;
    let event_types: Option<Vec<&str>> = query
        .get("event_types")
        .map(|t| t.split(',').map(str::trim).collect());
    let text =
        |obj: &Map<String, Value>, k: &str| obj.get(k).and_then(Value::as_str).map(str::to_owned);
    let data = ctx.partition.data.lock();
    let external_filter = query.get("customer_external_id").map(|ext| {
        data.by_external
            .get(ext)
            .map(|&i| data.customers[i].id.clone())
            .unwrap_or_default()
    });
    let all: Vec<Value> = data
        .event_order
        .iter()
        .rev()
        .filter_map(|id| data.events.get(id).map(|e| (id, e)))
        .filter(|(id, e)| {
            let occurred = text(&e.body, "occurred_at")
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc).date_naive());
            query.get("event_id").is_none_or(|v| v == *id)
                && query.get("customer_id").is_none_or(|v| *v == e.customer_id)
                && external_filter.as_ref().is_none_or(|v| *v == e.customer_id)
                && query
                    .get("subject")
                    .is_none_or(|v| text(&e.body, "subject").as_ref() == Some(v))
                && event_types.as_ref().is_none_or(|types| {
                    text(&e.body, "event_type").is_some_and(|t| types.contains(&t.as_str()))
                })
                && has_fees.is_none_or(|h| !h)
                && period_from.is_none_or(|from| occurred.is_some_and(|o| o >= from))
                && period_to.is_none_or(|to| occurred.is_some_and(|o| o <= to))
        })
        .map(|(id, e)| {
            let external_id = data
                .by_id
                .get(&e.customer_id)
                .and_then(|&i| data.customers[i].external_id.clone())
                .unwrap_or_default();
            let mut item = Map::new();
            item.insert("id".into(), Value::String(id.clone()));
            item.insert("customer_id".into(), Value::String(e.customer_id.clone()));
            item.insert("external_id".into(), Value::String(external_id));
            for k in ["event_type", "subject", "description", "occurred_at"] {
                if let Some(v) = e.body.get(k) {
                    item.insert(k.into(), v.clone());
                }
            }
            item.insert(
                "created_at".into(),
                serde_json::to_value(e.created_at).unwrap_or(Value::Null),
            );
            item.insert("has_fees".into(), Value::Bool(false));
            Value::Object(item)
        })
        .collect();
    drop(data);
    Ok(HttpResponse::Ok().json(page(all, offset, limit)))
}

async fn get_event(
    shared: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<String>,
) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    let data = ctx.partition.data.lock();
    let stored = data
        .events
        .get(path.as_str())
        .ok_or_else(|| ApiError::NotFound(format!("Event {} was not found.", path.as_str())))?;
    let mut body = stored.body.clone();
    body.insert(
        "customer_id".into(),
        Value::String(stored.customer_id.clone()),
    );
    body.insert(
        "created_at".into(),
        serde_json::to_value(stored.created_at).unwrap_or(Value::Null),
    );
    // The emulator has no products, so no event is priced.
    body.insert("fees".into(), Value::Array(Vec::new()));
    drop(data);
    Ok(HttpResponse::Ok().json(body))
}

// ---- webhooks -------------------------------------------------------------------------------

fn valid_url(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
}

async fn create_webhook(
    shared: web::Data<Shared>,
    req: HttpRequest,
    body: web::Bytes,
) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    ctx.require_platform("Webhook endpoints")?;
    let body: CreateWebhookRequest = parse_body(&body)?;
    let mut errors = Errors::default();
    match body.url.as_deref() {
        None => errors.add("url", "url is required."),
        Some(u) if !valid_url(u) => errors.add("url", "url must be an absolute http(s) URL."),
        Some(_) => {}
    }
    if body.topics.as_ref().is_some_and(Vec::is_empty) {
        errors.add("topics", "topics must not be empty.");
    }
    errors.into_result()?;
    let now = Utc::now();
    let destination = Destination {
        id: new_id("whd"),
        url: body.url.unwrap_or_default(),
        topics: body.topics.unwrap_or_else(|| vec!["*".to_owned()]),
        connect: body.connect.unwrap_or(false),
        enabled: true,
        secret: format!("whsec_{}", random_body(32)),
        created_at: now,
        updated_at: now,
    };
    let response = CreateWebhookResponse {
        id: destination.id.clone(),
        secret: destination.secret.clone(),
        created_at: now,
    };
    ctx.platform.data.lock().webhooks.push(destination);
    Ok(created(&response))
}

fn parse_bool(query: &HashMap<String, String>, name: &str) -> Result<Option<bool>, ApiError> {
    match query.get(name).map(String::as_str) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(_) => Err(ApiError::field(
            name,
            format!("{name} must be true or false."),
        )),
    }
}

async fn list_webhooks(shared: web::Data<Shared>, req: HttpRequest) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    ctx.require_platform("Webhook endpoints")?;
    let query = query_map(&req)?;
    let enabled = parse_bool(&query, "enabled")?;
    let connect = parse_bool(&query, "connect")?;
    let items: Vec<WebhookDestinationWire> = ctx
        .platform
        .data
        .lock()
        .webhooks
        .iter()
        .filter(|d| {
            enabled.is_none_or(|e| d.enabled == e) && connect.is_none_or(|c| d.connect == c)
        })
        .map(|d| d.to_wire(false))
        .collect();
    let total_count = items.len();
    Ok(HttpResponse::Ok().json(WebhookList { items, total_count }))
}

fn webhook_not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("Webhook {id} was not found."))
}

async fn get_webhook(
    shared: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<String>,
) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    ctx.require_platform("Webhook endpoints")?;
    let wire = ctx
        .platform
        .data
        .lock()
        .webhooks
        .iter()
        .find(|d| d.id == *path)
        .map(|d| d.to_wire(true))
        .ok_or_else(|| webhook_not_found(&path))?;
    Ok(HttpResponse::Ok().json(wire))
}

async fn update_webhook(
    shared: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    ctx.require_platform("Webhook endpoints")?;
    let body: UpdateWebhookRequest = parse_body(&body)?;
    let mut errors = Errors::default();
    if body.url.as_deref().is_some_and(|u| !valid_url(u)) {
        errors.add("url", "url must be an absolute http(s) URL.");
    }
    if body.topics.as_ref().is_some_and(Vec::is_empty) {
        errors.add("topics", "topics must not be empty.");
    }
    errors.into_result()?;
    let mut data = ctx.platform.data.lock();
    let d = data
        .webhooks
        .iter_mut()
        .find(|d| d.id == *path)
        .ok_or_else(|| webhook_not_found(&path))?;
    if let Some(url) = body.url {
        d.url = url;
    }
    if let Some(topics) = body.topics {
        d.topics = topics;
    }
    if let Some(enabled) = body.enabled {
        d.enabled = enabled;
    }
    d.updated_at = Utc::now();
    let wire = d.to_wire(true);
    drop(data);
    Ok(HttpResponse::Ok().json(wire))
}

async fn delete_webhook(
    shared: web::Data<Shared>,
    req: HttpRequest,
    path: web::Path<String>,
) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    ctx.require_platform("Webhook endpoints")?;
    let mut data = ctx.platform.data.lock();
    let before = data.webhooks.len();
    data.webhooks.retain(|d| d.id != *path);
    if data.webhooks.len() == before {
        return Err(webhook_not_found(&path));
    }
    Ok(HttpResponse::NoContent().finish())
}

/// Built-in top-ups and portal sessions: refused on connected accounts (C4P restriction,
/// API.md §9); the emulator has no payment rails, so the platform gets "not emulated".
async fn payments_restricted(shared: web::Data<Shared>, req: HttpRequest) -> ApiResult {
    let ctx = Ctx::from_request(&shared, &req)?;
    if ctx.partition.connected {
        return Err(ApiError::field(
            "X-CREDYT-ACCOUNT",
            "Top-ups and billing portal sessions are not supported on connected accounts; \
             fund wallets with adjustments (external_topup).",
        ));
    }
    not_found(shared, req).await
}

/// Anything not emulated: an authenticated 404 problem.
pub(crate) async fn not_found(shared: web::Data<Shared>, req: HttpRequest) -> ApiResult {
    Ctx::from_request(&shared, &req)?;
    Err(ApiError::NotFound(format!(
        "{} {} is not emulated.",
        req.method(),
        req.path()
    )))
}
