//! The Credyt client: one `reqwest::Client`, requests as types, errors classified for retry.
//!
//! Contract: every call carries the platform key in `X-CREDYT-API-KEY`; calls on a connected
//! account carry that account's id in `X-CREDYT-ACCOUNT`, which callers take from the identity
//! mapping only (never from a tenant's request). Each error says whether it is worth retrying
//! ([`UpstreamError::is_retryable`]) and how long Credyt asked us to wait
//! ([`UpstreamError::retry_after`]). Charges and usage posts are idempotent at Credyt (on
//! `transaction_id` / event `id`), so a retry of the same record can never move money twice.
//!
//! When traces are on, every call is a client span (see `crate::telemetry::traces`) and carries
//! its `traceparent`; a call that delivers records links to the tenant requests that accepted
//! them.
//!
//! This module shares no code with `crate::emulator`: the emulator is the independent fake that
//! checks what this client sends.

pub mod breaker;
pub mod concurrency;
pub mod credentials;
pub mod forward;
pub mod forwarder;
pub mod gateway;
pub mod platform;
pub mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::Either;
use reqwest::StatusCode;
use tracing::Instrument;

use crate::config::CredytSettings;
use crate::domain::{AccountId, CustomerId, Debit, ForwardedUsage, TraceContext};
use crate::telemetry::metrics::{Operation, UpstreamMetrics};
use crate::telemetry::traces::{self, Call};

/// Why the client could not be built (at startup).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the http client could not be built: {0}")]
    Http(#[from] reqwest::Error),
    #[error("credyt.base_url is not a URL: {0}")]
    BaseUrl(String),
    #[error("the platform API key cannot be sent as a header")]
    ApiKey,
    #[error("the platform API key file cannot be used: {0}")]
    KeyFile(String),
}

/// Why a call to Credyt failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("credyt unreachable: {0}")]
    Transport(#[source] reqwest::Error),
    #[error("credyt answered {status}")]
    Status {
        status: StatusCode,
        retry_after: Option<Duration>,
        body: String,
    },
    #[error("credyt answer could not be read: {0}")]
    Decode(String),
    /// A record that is not a Credyt call (a relayed webhook) reached the Credyt forwarder: a
    /// bug, refused for good so that it is kept as a dead letter rather than sent or lost.
    #[error("not a credyt call: a relayed webhook reached the credyt forwarder")]
    NotCredyt,
}

impl UpstreamError {
    /// Network errors, timeouts, 408, 429 and 5xx. Not a 409: Credyt answers a replayed
    /// `transaction_id` with its original result, so a conflict means the id was used with a
    /// different body, and sending the same body again cannot change that.
    pub fn is_retryable(&self) -> bool {
        match self {
            UpstreamError::Transport(_) => true,
            UpstreamError::Status { status, .. } => {
                status.is_server_error()
                    || matches!(
                        *status,
                        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS
                    )
            }
            UpstreamError::Decode(_) | UpstreamError::NotCredyt => false,
        }
    }

    /// 401 or 403: the platform key (or its access to an account) was refused. Never a reason
    /// to give a record up: the key may be fixed (see the `credentials` module).
    pub fn is_auth_refused(&self) -> bool {
        matches!(
            self.status(),
            Some(StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
        )
    }

    /// Whether Credyt is asking us to slow down or not keeping up: 429, 503, a timeout or a
    /// broken connection (what the forwarder's concurrency backs off on).
    pub fn is_backpressure(&self) -> bool {
        match self {
            UpstreamError::Transport(_) => true,
            UpstreamError::Status { status, .. } => matches!(
                *status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            ),
            UpstreamError::Decode(_) | UpstreamError::NotCredyt => false,
        }
    }

    /// Whether the failure says Credyt is unwell (what opens the circuit breaker): transport
    /// errors and 5xx. A 429 is an answer from a healthy Credyt about our rate.
    pub fn is_outage(&self) -> bool {
        match self {
            UpstreamError::Transport(_) => true,
            UpstreamError::Status { status, .. } => status.is_server_error(),
            UpstreamError::Decode(_) | UpstreamError::NotCredyt => false,
        }
    }

    /// The wait Credyt asked for (`Retry-After`), if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            UpstreamError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn status(&self) -> Option<StatusCode> {
        match self {
            UpstreamError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// A bounded label for metrics and logs.
    pub fn class(&self) -> &'static str {
        match self {
            UpstreamError::Transport(e) if e.is_timeout() => "timeout",
            UpstreamError::Transport(_) => "transport",
            UpstreamError::Status { status, .. } if status.as_u16() == 429 => "429",
            UpstreamError::Status { status, .. } if status.as_u16() == 409 => "409",
            UpstreamError::Status { status, .. } if self.is_auth_refused() => "auth",
            UpstreamError::Status { status, .. } if status.is_server_error() => "5xx",
            UpstreamError::Status { .. } => "4xx",
            UpstreamError::Decode(_) | UpstreamError::NotCredyt => "decode",
        }
    }
}

/// An error and its causes, `: `-separated (for messages that must say what really failed,
/// e.g. `connection refused` under a transport error).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A call to Credyt run inside its client span.
type TracedCall<'f, T> = Pin<Box<dyn Future<Output = Result<T, UpstreamError>> + Send + 'f>>;

/// One call inside its client span when traces are on; otherwise the call itself, unwrapped.
/// Not an `async fn`: the untraced call is returned as it is and the traced one boxed, so a
/// call's future (which sits inside the request path's future, also when the identity cache
/// answers) is no larger than before (an extra layer moved it on every request).
fn traced<'l, 'f, F, T>(
    call: Call,
    tenant: Option<&str>,
    records: usize,
    links: impl Iterator<Item = &'l TraceContext>,
    fut: F,
) -> Either<F, TracedCall<'f, T>>
where
    F: Future<Output = Result<T, UpstreamError>> + Send + 'f,
    T: Send + 'f,
{
    let span = traces::client_span(call, tenant, records, links);
    if span.is_disabled() {
        return Either::Left(fut);
    }
    Either::Right(Box::pin(async move {
        let result = fut.instrument(span.clone()).await;
        if let Err(e) = &result {
            traces::record_error(&span, e.class());
        }
        result
    }))
}

const API_KEY: &str = "X-CREDYT-API-KEY";
const ACCOUNT: &str = "X-CREDYT-ACCOUNT";

/// Parses `Retry-After`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3; a date in the past
/// is no wait).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The Credyt API client. Cheap to clone (shared state behind `Arc`s).
#[derive(Clone)]
pub struct CredytClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    http: reqwest::Client,
    /// For the tenant gateway: never follows a redirect (the tenant gets Credyt's answer as
    /// it is, a 303 included, and the proxy never fetches a URL Credyt names).
    passthrough: reqwest::Client,
    /// The base URL, parsed once: a request only sets its path (parsing the whole URL, host
    /// and IDNA included, was ~2% of the core in an end-to-end run).
    base: reqwest::Url,
    /// The base URL's path, without a trailing `/`, that every request's path follows.
    base_path: String,
    key: credentials::PlatformKey,
    /// Calls by operation and status class, and their durations.
    metrics: Option<UpstreamMetrics>,
}

impl CredytClient {
    /// A client whose idle pool keeps `max_idle_per_host` connections (the forwarder sizes it
    /// to its largest concurrency: connections reopened per call cost a third of its CPU).
    pub fn new(settings: &CredytSettings) -> Result<CredytClient, ClientError> {
        Self::with_metrics(settings, None)
    }

    /// [`CredytClient::new`], counting every call into `metrics`.
    pub fn with_metrics(
        settings: &CredytSettings,
        metrics: Option<UpstreamMetrics>,
    ) -> Result<CredytClient, ClientError> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.connect_timeout)
            .pool_max_idle_per_host(settings.max_idle_per_host)
            .tcp_nodelay(true)
            .user_agent(concat!("credyt-proxy/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let passthrough = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.connect_timeout)
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("credyt-proxy/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let base = reqwest::Url::parse(&settings.base_url)
            .map_err(|e| ClientError::BaseUrl(e.to_string()))?;
        let base_path = base.path().trim_end_matches('/').to_string();
        let source = match &settings.api_key_file {
            Some(path) => credentials::KeySource::File(path.clone()),
            None => credentials::KeySource::Fixed(settings.api_key.clone()),
        };
        let key = credentials::PlatformKey::new(source)?;
        Ok(CredytClient {
            inner: Arc::new(ClientInner {
                http,
                passthrough,
                base,
                base_path,
                key,
                metrics,
            }),
        })
    }

    /// The base URL's path (without a trailing `/`) that every request's path follows.
    pub fn base_path(&self) -> &str {
        &self.inner.base_path
    }

    /// The platform key this client sends.
    pub fn key(&self) -> &credentials::PlatformKey {
        &self.inner.key
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        account: Option<&AccountId>,
    ) -> reqwest::RequestBuilder {
        let inner = &self.inner;
        let mut url = inner.base.clone();
        url.set_path(&format!("{}{}", inner.base_path, path));
        let mut req = inner
            .http
            .request(method, url)
            .header(API_KEY, inner.key.value())
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(account) = account {
            req = req.header(ACCOUNT, account.as_str());
        }
        req
    }

    /// Sends one call of `operation`; counts it by status class with the time until its
    /// status and headers came (an error answer's body included).
    async fn send(
        &self,
        operation: Operation,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, UpstreamError> {
        let Some(metrics) = &self.inner.metrics else {
            return Self::send_unobserved(req).await;
        };
        let started = std::time::Instant::now();
        let result = Self::send_unobserved(req).await;
        let status = match &result {
            Ok(resp) => Some(resp.status().as_u16()),
            Err(e) => e.status().map(|s| s.as_u16()),
        };
        metrics.observe(operation, status, started.elapsed());
        result
    }

    async fn send_unobserved(
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, UpstreamError> {
        let req = if traces::active() {
            let mut headers = reqwest::header::HeaderMap::new();
            traces::inject(&mut headers);
            req.headers(headers)
        } else {
            req
        };
        let resp = req.send().await.map_err(UpstreamError::Transport)?;
        let status = resp.status();
        traces::record_current(traces::attr::STATUS, status.as_u16());
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let body = resp.text().await.unwrap_or_default();
        Err(UpstreamError::Status {
            status,
            retry_after,
            body: body.chars().take(2048).collect(),
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        resp: reqwest::Response,
    ) -> Result<T, UpstreamError> {
        let bytes = resp.bytes().await.map_err(UpstreamError::Transport)?;
        serde_json::from_slice(&bytes).map_err(|e| UpstreamError::Decode(e.to_string()))
    }

    /// `GET /accounts/self`: validates the platform key.
    pub async fn account_context(&self) -> Result<wire::AccountContext, UpstreamError> {
        let call = async {
            let resp = self
                .send(
                    Operation::AccountContext,
                    self.request(reqwest::Method::GET, "/accounts/self", None),
                )
                .await?;
            Self::json(resp).await
        };
        traced(
            Operation::AccountContext.call(),
            None,
            0,
            std::iter::empty(),
            call,
        )
        .await
    }

    /// `GET /accounts?external_id=`: the connected account of a tenant, if it exists.
    pub async fn find_account(
        &self,
        external_id: &str,
    ) -> Result<Option<AccountId>, UpstreamError> {
        let call = async {
            let req = self
                .request(reqwest::Method::GET, "/accounts", None)
                .query(&[("external_id", external_id), ("limit", "1")]);
            let page: wire::Page<wire::ConnectedAccount> =
                Self::json(self.send(Operation::FindAccount, req).await?).await?;
            Ok(page
                .items
                .into_iter()
                .find(|a| a.external_id.as_deref() == Some(external_id))
                .map(|a| AccountId::new(a.id)))
        };
        traced(
            Operation::FindAccount.call(),
            None,
            0,
            std::iter::empty(),
            call,
        )
        .await
    }

    /// `GET /customers?external_id=` on `account`, following its 303 to the customer.
    pub async fn find_customer(
        &self,
        account: &AccountId,
        external_id: &str,
    ) -> Result<Option<CustomerId>, UpstreamError> {
        let call = async {
            let req = self
                .request(reqwest::Method::GET, "/customers", Some(account))
                .query(&[("external_id", external_id)]);
            match self.send(Operation::FindCustomer, req).await {
                Ok(resp) => {
                    let customer: wire::Customer = Self::json(resp).await?;
                    Ok(Some(CustomerId::new(customer.id)))
                }
                Err(UpstreamError::Status { status, .. }) if status == StatusCode::NOT_FOUND => {
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        };
        traced(
            Operation::FindCustomer.call(),
            None,
            0,
            std::iter::empty(),
            call,
        )
        .await
    }

    /// `GET /customers/{id}` on `account`: the customer's external id (`Some(None)`: it has
    /// none) if it belongs to that account, `None` if it does not.
    pub async fn customer_external_id(
        &self,
        account: &AccountId,
        customer: &CustomerId,
    ) -> Result<Option<Option<String>>, UpstreamError> {
        let call = async {
            let path = format!("/customers/{}", urlencode(customer.as_str()));
            match self
                .send(
                    Operation::CustomerExists,
                    self.request(reqwest::Method::GET, &path, Some(account)),
                )
                .await
            {
                Ok(resp) => {
                    let found: wire::Customer = Self::json(resp).await?;
                    Ok((found.id == customer.as_str()).then_some(found.external_id))
                }
                Err(UpstreamError::Status { status, .. }) if status == StatusCode::NOT_FOUND => {
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        };
        traced(
            Operation::CustomerExists.call(),
            None,
            0,
            std::iter::empty(),
            call,
        )
        .await
    }

    /// `POST /customers` on `account`. A 409 (created meanwhile by another replica) is answered
    /// by looking the customer up.
    pub async fn create_customer(
        &self,
        account: &AccountId,
        external_id: &str,
    ) -> Result<CustomerId, UpstreamError> {
        let call = async {
            let body = wire::CreateCustomer {
                name: external_id,
                external_id,
            };
            let req = self
                .request(reqwest::Method::POST, "/customers", Some(account))
                .json(&body);
            match self.send(Operation::CreateCustomer, req).await {
                Ok(resp) => {
                    let created: wire::Created = Self::json(resp).await?;
                    Ok(CustomerId::new(created.id))
                }
                Err(UpstreamError::Status { status, .. }) if status == StatusCode::CONFLICT => self
                    .find_customer(account, external_id)
                    .await?
                    .ok_or_else(|| UpstreamError::Decode("customer conflict but not found".into())),
                Err(e) => Err(e),
            }
        };
        traced(
            Operation::CreateCustomer.call(),
            None,
            0,
            std::iter::empty(),
            call,
        )
        .await
    }

    /// `GET /customers/{id}/wallet` on `account`: the available balance of each of the
    /// customer's wallet accounts. A customer Credyt does not know (404) has none.
    pub async fn wallet(
        &self,
        account: &AccountId,
        customer: &CustomerId,
    ) -> Result<Vec<wire::WalletAccount>, UpstreamError> {
        let call = async {
            let path = format!("/customers/{}/wallet", urlencode(customer.as_str()));
            match self
                .send(
                    Operation::WalletBalance,
                    self.request(reqwest::Method::GET, &path, Some(account)),
                )
                .await
            {
                Ok(resp) => {
                    let wallet: wire::Wallet = Self::json(resp).await?;
                    Ok(wallet.accounts)
                }
                Err(UpstreamError::Status { status, .. }) if status == StatusCode::NOT_FOUND => {
                    Ok(Vec::new())
                }
                Err(e) => Err(e),
            }
        };
        traced(
            Operation::WalletBalance.call(),
            None,
            0,
            std::iter::empty(),
            call,
        )
        .await
    }

    /// `POST /customers/{id}/wallet/charges`: one fee. Success means Credyt has it (a replayed
    /// `transaction_id` answers the original 201).
    pub async fn charge(&self, debit: &Debit) -> Result<(), UpstreamError> {
        let call = async {
            let path = format!(
                "/customers/{}/wallet/charges",
                urlencode(debit.customer.as_str())
            );
            let body = wire::ChargeRequest::from_debit(debit);
            let req = self
                .request(reqwest::Method::POST, &path, Some(&debit.account))
                .json(&body);
            self.send(Operation::Charge, req).await.map(drop)
        };
        traced(
            Operation::Charge.call(),
            Some(debit.tenant.as_str()),
            1,
            debit.trace.iter(),
            call,
        )
        .await
    }

    /// One charge for several fees of one customer and asset (coalescing): the exact sum, under
    /// the batch's own deterministic `transaction_id`, with the events listed in metadata.
    pub async fn charge_coalesced(
        &self,
        batch: uuid::Uuid,
        debits: &[&Debit],
    ) -> Result<(), UpstreamError> {
        let call = async {
            let Some(first) = debits.first() else {
                return Ok(());
            };
            let path = format!(
                "/customers/{}/wallet/charges",
                urlencode(first.customer.as_str())
            );
            let body = wire::ChargeRequest::coalesced(batch, debits);
            let req = self
                .request(reqwest::Method::POST, &path, Some(&first.account))
                .json(&body);
            self.send(Operation::ChargeCoalesced, req).await.map(drop)
        };
        traced(
            Operation::ChargeCoalesced.call(),
            debits.first().map(|d| d.tenant.as_str()),
            debits.len(),
            debits.iter().filter_map(|d| d.trace.as_ref()),
            call,
        )
        .await
    }

    /// `POST /events`: usage events of one customer, priced by Credyt itself.
    pub async fn send_usage(&self, usage: &[&ForwardedUsage]) -> Result<(), UpstreamError> {
        let call = async {
            let Some(first) = usage.first() else {
                return Ok(());
            };
            let body = wire::UsageRequest::new(&first.customer, usage.iter().map(|u| &u.event));
            let req = self
                .request(reqwest::Method::POST, "/events", Some(&first.account))
                .json(&body);
            self.send(Operation::Usage, req).await.map(drop)
        };
        traced(
            Operation::Usage.call(),
            usage.first().map(|u| u.tenant.as_str()),
            usage.len(),
            usage.iter().filter_map(|u| u.trace.as_ref()),
            call,
        )
        .await
    }
}

/// Percent-encodes a path segment (ids are opaque to us; never trust them to be URL-safe).
fn urlencode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base_url: &str) -> CredytClient {
        CredytClient::new(&CredytSettings {
            base_url: base_url.into(),
            api_key: crate::config::Secret::new("key_platform"),
            api_key_file: None,
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            max_idle_per_host: 1,
        })
        .unwrap()
    }

    /// A request's path follows the base URL's own path; the key is sent, marked sensitive.
    #[test]
    fn requests_go_under_the_base_url() {
        for (base, want) in [
            ("http://127.0.0.1:9", "http://127.0.0.1:9/customers/c%2F1"),
            (
                "https://h.example/api",
                "https://h.example/api/customers/c%2F1",
            ),
            (
                "https://h.example/api/",
                "https://h.example/api/customers/c%2F1",
            ),
        ] {
            let path = format!("/customers/{}", urlencode("c/1"));
            let req = client(base)
                .request(reqwest::Method::GET, &path, Some(&AccountId::new("acc_1")))
                .build()
                .unwrap();
            assert_eq!(req.url().as_str(), want);
            let key = req.headers().get(API_KEY).unwrap();
            assert_eq!(key, "key_platform");
            assert!(key.is_sensitive());
            assert_eq!(req.headers().get(ACCOUNT).unwrap(), "acc_1");
        }
    }

    #[test]
    fn a_base_url_that_does_not_parse_fails_at_startup() {
        let err = CredytClient::new(&CredytSettings {
            base_url: "http://exa mple".into(),
            api_key: crate::config::Secret::new("k"),
            api_key_file: None,
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            max_idle_per_host: 1,
        })
        .err()
        .unwrap();
        assert!(matches!(err, ClientError::BaseUrl(_)), "{err}");
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(urlencode("cust_4abc"), "cust_4abc");
        assert_eq!(urlencode("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn classification() {
        let e = |s: u16| UpstreamError::Status {
            status: StatusCode::from_u16(s).unwrap(),
            retry_after: None,
            body: String::new(),
        };
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(e(s).is_retryable(), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 422] {
            assert!(!e(s).is_retryable(), "{s}");
        }
        for s in [401, 403] {
            assert!(e(s).is_auth_refused(), "{s}");
        }
        assert!(e(429).is_backpressure() && e(503).is_backpressure());
        assert!(!e(500).is_backpressure() && !e(429).is_outage());
        assert!(e(500).is_outage() && e(503).is_outage());
    }

    /// `Retry-After` in both of its forms (RFC 9110 §10.2.3), and the obsolete date forms
    /// recipients must accept.
    #[test]
    fn retry_after_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_797_000_000);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        let in_90s = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&in_90s, now),
            Some(Duration::from_secs(90))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }
}
