//! The scoped Credyt gateway: a tenant uses the Credyt API with its own key, confined to its
//! own connected account.
//!
//! # Contract
//!
//! * **Only listed endpoints** ([`table::ENDPOINTS`]) are passed through, each in a group the
//!   platform allows per tenant (`gateway.allow` in the tenants file; default: every group
//!   but those that move money). Everything else under a Credyt resource (accounts, webhooks,
//!   top-ups, assets, vendors, billing portal, and any endpoint not in the table) answers 403
//!   `endpoint_not_allowed` without calling Credyt; a path that is no Credyt path is 404.
//! * **Confinement.** The request to Credyt is built afresh ([`crate::upstream::gateway`]):
//!   the platform key and the tenant's own account (from [`Identity::account`], never from the
//!   request) in `X-CREDYT-ACCOUNT`; of the tenant's request only the method, the matched
//!   path (decoded and encoded again), the query without any `x-credyt-*` or key parameter,
//!   `Content-Type` and the body. No other header is forwarded, so no spelling of an account
//!   or key header, and no method override, reaches Credyt. Ids in paths and bodies are
//!   Credyt's to judge within the tenant's account (another account's `cust_` is a 404
//!   there). Redirects are never followed and nothing is cached across requests.
//! * **Answers** go back as Credyt sent them: status, body (streamed), `Content-Type`,
//!   `Retry-After`, and `Location` turned into a path on the proxy (the 303 of
//!   `GET /customers?external_id=`). A transport failure is 503 `upstream_unavailable`.
//! * **Limits.** Each call takes one cell of the tenant's own gateway quota (`gateway.rate_limit`
//!   in its tenants-file entry, else `[gateway]`), separate from its events: 429 with the same
//!   headers as events. Bodies are limited to `server.max_body_bytes` (413) and must be JSON
//!   (415).
//! * **Identity.** A successful `PATCH /customers/{id}` forgets the identity caches' mappings of
//!   that customer's old and new external ids, so the next usage event by either is resolved
//!   afresh.
//! * **Observed.** Counted by operation and status class; calls of endpoints that move money
//!   are counted on their own and logged with the tenant and the transaction id; each call is
//!   a client span like the other calls to Credyt.

pub mod table;

use std::collections::HashMap;
use std::sync::Arc;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use parking_lot::Mutex;

use crate::domain::{CustomerId, TenantId};
use crate::identity::{Identity, Tenant, Tenants};
use crate::ingest::problem::ApiError;
use crate::ratelimit::{TenantLimiter, TenantQuota};
use crate::telemetry::metrics::GatewayMetrics;
use crate::upstream::gateway::PassThrough;
use crate::upstream::CredytClient;

use table::{Endpoint, Matched};

/// The gateway's shared state (app data of the tenant port).
pub struct Gateway {
    tenants: Arc<Tenants>,
    identity: Arc<Identity>,
    client: CredytClient,
    default_quota: TenantQuota,
    max_body_bytes: usize,
    /// Each tenant's gateway limiter, with the quota it was made for (a reload that changes
    /// the quota replaces it).
    limiters: Mutex<HashMap<TenantId, (TenantQuota, Arc<TenantLimiter>)>>,
    metrics: GatewayMetrics,
    /// Told of wallet adjustments and charges made through the gateway.
    gate: Option<Arc<crate::balance::Gate>>,
}

impl Gateway {
    pub fn new(
        tenants: Arc<Tenants>,
        identity: Arc<Identity>,
        client: CredytClient,
        default_quota: TenantQuota,
        max_body_bytes: usize,
        metrics: GatewayMetrics,
    ) -> Gateway {
        Gateway {
            tenants,
            identity,
            client,
            default_quota,
            max_body_bytes,
            limiters: Mutex::new(HashMap::new()),
            metrics,
            gate: None,
        }
    }

    /// Tells balance gating of the wallet adjustments and charges made through the gateway.
    pub fn with_gate(mut self, gate: Arc<crate::balance::Gate>) -> Gateway {
        self.gate = Some(gate);
        self
    }

    fn limiter(&self, tenant: &Tenant) -> Arc<TenantLimiter> {
        let quota = tenant.gateway.rate_limit.unwrap_or(self.default_quota);
        let mut limiters = self.limiters.lock();
        match limiters.get(&tenant.id) {
            Some((q, l)) if *q == quota => l.clone(),
            _ => {
                let l = Arc::new(TenantLimiter::new(quota));
                limiters.insert(tenant.id.clone(), (quota, l.clone()));
                l
            }
        }
    }
}

/// The ingest routes' paths: a method they do not serve is theirs to answer (405).
const INGEST_PATHS: &[&str] = &["/events", "/v1/events", "/v1/quote", "/healthz"];

/// The tenant port's default service: a gateway endpoint, a denied Credyt endpoint, or the
/// ingest's 404/405.
pub async fn handle(
    req: HttpRequest,
    payload: web::Payload,
    gateway: web::Data<Gateway>,
) -> HttpResponse {
    let matched = table::match_path(req.method().as_str(), req.path());
    if !matches!(matched, Matched::Endpoint(..)) {
        // A path the table (or the ingest) has, asked with another method: 405 naming them.
        let ingest = INGEST_PATHS.contains(&req.path());
        let allow = table::allow_for(req.path(), req.path() == "/events");
        if ingest || allow.is_some() || matched == Matched::NotCredyt {
            return crate::ingest::not_served(&req, allow);
        }
    }
    let operation = match &matched {
        Matched::Endpoint(e, _) => e.operation,
        _ => "denied",
    };
    let result = serve(&gateway, &req, payload, matched).await;
    let resp = result.unwrap_or_else(|e| actix_web::ResponseError::error_response(&e));
    gateway.metrics.observe(operation, resp.status().as_u16());
    resp
}

async fn serve(
    gateway: &Gateway,
    req: &HttpRequest,
    payload: web::Payload,
    matched: Matched,
) -> Result<HttpResponse, ApiError> {
    let table = gateway.tenants.current();
    let tenant = crate::ingest::api_key(req)
        .and_then(|key| table.authenticate(key))
        .cloned()
        .ok_or(ApiError::Unauthorized)?;
    let (endpoint, ids) = match matched {
        Matched::Endpoint(e, ids) if tenant.gateway.allows(e.group) => (e, ids),
        Matched::Endpoint(e, _) => {
            return Err(ApiError::EndpointNotAllowed(format!(
                "{} {} is not allowed for this tenant (it needs `{}` in its gateway.allow)",
                req.method(),
                req.path(),
                e.group.as_str()
            )))
        }
        _ => {
            return Err(ApiError::EndpointNotAllowed(format!(
                "{} {} is not an endpoint tenants may call through the proxy",
                req.method(),
                req.path()
            )))
        }
    };
    gateway.limiter(&tenant).check(1).map_err(ApiError::from)?;
    let body = match req.method().as_str() {
        "POST" | "PATCH" => Some(read_json_body(req, payload, gateway.max_body_bytes).await?),
        _ => None,
    };
    let account = gateway.identity.account(&tenant).await?;
    let path = upstream_path(endpoint, &ids);
    let query = clean_query(req.query_string());
    // A customer whose external id changes: the id the caches may know it by, read first.
    let renamed = match (endpoint.operation, &body) {
        ("customers.update", Some((_, bytes))) => {
            let new = serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .and_then(|v| {
                    v.get("external_id")
                        .and_then(|e| e.as_str())
                        .map(str::to_string)
                });
            match new {
                Some(new) => {
                    let customer = CustomerId::new(ids[0].as_str());
                    let old = gateway.identity.external_id_of(&account, &customer).await?;
                    Some((customer, old, new))
                }
                None => None,
            }
        }
        _ => None,
    };
    let money_tx = endpoint
        .group
        .moves_money()
        .then(|| transaction_id(body.as_ref().map(|(_, b)| b.as_ref())));
    let resp = gateway
        .client
        .passthrough(PassThrough {
            method: reqwest::Method::from_bytes(req.method().as_str().as_bytes())
                .map_err(|_| ApiError::Internal)?,
            operation: endpoint.operation,
            path: &path,
            query: query.as_deref(),
            account: &account,
            tenant: tenant.id.as_str(),
            body,
        })
        .await
        .map_err(ApiError::Upstream)?;
    let status = resp.status();
    if let Some(tx) = money_tx {
        // The end user's balance moved (or may have, whatever the answer): gating reads it
        // again before judging the next event.
        if let (Some(gate), Some(customer)) = (&gateway.gate, ids.first()) {
            gate.invalidate(&account, &CustomerId::new(customer.as_str()));
        }
        gateway.metrics.money_call(endpoint.operation);
        tracing::info!(
            tenant = %tenant.id,
            operation = endpoint.operation,
            transaction_id = tx.as_deref().unwrap_or("-"),
            status = status.as_u16(),
            "money moved through the gateway"
        );
    }
    if let Some((customer, old, new)) = renamed {
        if status.is_success() {
            gateway
                .identity
                .forget_customer(&account, &customer, old.as_deref(), Some(&new))
                .await;
        }
    }
    Ok(answer(resp, gateway.client.base_path()))
}

/// The path sent upstream: the endpoint's pattern with its ids encoded again.
fn upstream_path(endpoint: &Endpoint, ids: &[String]) -> String {
    let mut ids = ids.iter();
    let mut path = String::new();
    for p in endpoint.pattern {
        path.push('/');
        if *p == "*" {
            path.push_str(&table::encode_segment(
                ids.next().map_or("", String::as_str),
            ));
        } else {
            path.push_str(p);
        }
    }
    path
}

/// The query without any parameter that names a Credyt account or key, in any spelling.
fn clean_query(query: &str) -> Option<String> {
    if query.is_empty() {
        return None;
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            let name = percent_decode_lossy(name).to_ascii_lowercase();
            let name = name.trim();
            !(name.starts_with("x-credyt")
                || name.starts_with("x_credyt")
                || name.contains("api_key")
                || name.contains("api-key")
                || name.contains("apikey"))
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

fn percent_decode_lossy(s: &str) -> String {
    let s = s.replace('+', " ");
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match decoded {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn read_json_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<(reqwest::header::HeaderValue, bytes::Bytes), ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .filter(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            })
        })
        .cloned()
        .ok_or(ApiError::UnsupportedMediaType)?;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| ApiError::MalformedRequest)?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&body)
        .map_err(|e| ApiError::BadJson(e.to_string()))?;
    let content_type = reqwest::header::HeaderValue::from_bytes(content_type.as_bytes())
        .map_err(|_| ApiError::UnsupportedMediaType)?;
    Ok((content_type, body.freeze()))
}

/// `transaction_id` of a money-moving request body, for the log.
fn transaction_id(body: Option<&[u8]>) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body?).ok()?;
    v.get("transaction_id")?.as_str().map(str::to_string)
}

/// Credyt's answer as the tenant's: status, the headers that matter, the body streamed.
fn answer(resp: reqwest::Response, base_path: &str) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(resp.status().as_u16())
        .unwrap_or(actix_web::http::StatusCode::BAD_GATEWAY);
    let mut out = HttpResponse::build(status);
    let headers = resp.headers();
    for name in [reqwest::header::CONTENT_TYPE, reqwest::header::RETRY_AFTER] {
        if let Some(v) = headers.get(&name).and_then(|v| v.to_str().ok()) {
            out.insert_header((name.as_str(), v.to_string()));
        }
    }
    if let Some(location) = headers
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| proxy_location(l, resp.url(), base_path))
    {
        out.insert_header((header::LOCATION, location));
    }
    out.streaming(resp.bytes_stream())
}

/// A `Location` of Credyt's as a path on the proxy (relative, so it resolves against the
/// proxy's own address): `None` for one outside Credyt's API.
fn proxy_location(location: &str, request_url: &reqwest::Url, base_path: &str) -> Option<String> {
    let target = request_url.join(location).ok()?;
    if target.origin() != request_url.origin() {
        return None;
    }
    let path = target.path().strip_prefix(base_path)?;
    if !path.starts_with('/') {
        return None;
    }
    Some(match target.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn account_and_key_parameters_never_leave_the_query() {
        assert_eq!(clean_query(""), None);
        assert_eq!(
            clean_query("external_id=u1&X-CREDYT-ACCOUNT=acc_2&limit=5"),
            Some("external_id=u1&limit=5".into())
        );
        assert_eq!(clean_query("x%2Dcredyt%2Daccount=acc_2"), None);
        assert_eq!(
            clean_query("X_Credyt_Account=acc_2&api_key=k&apiKey=k"),
            None
        );
        assert_eq!(
            clean_query("x-credyt-api-key=k&offset=0"),
            Some("offset=0".into())
        );
    }

    #[test]
    fn locations_become_paths_on_the_proxy() {
        let url = reqwest::Url::parse("http://credyt.example/v1/customers?external_id=u").unwrap();
        assert_eq!(
            proxy_location("/v1/customers/cust_1", &url, "/v1").as_deref(),
            Some("/customers/cust_1")
        );
        assert_eq!(
            proxy_location("http://credyt.example/v1/customers/cust_1", &url, "/v1").as_deref(),
            Some("/customers/cust_1")
        );
        assert_eq!(proxy_location("https://evil.example/x", &url, "/v1"), None);
        assert_eq!(proxy_location("/other/x", &url, "/v1"), None);
    }

    #[test]
    fn upstream_paths_are_encoded_again() {
        let (e, ids) = match table::match_path("GET", "/customers/c%201/wallet/default%3AUSD") {
            Matched::Endpoint(e, ids) => (e, ids),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            upstream_path(e, &ids),
            "/customers/c%201/wallet/default:USD"
        );
    }
}
