//! Every metric of the proxy: names, types, help, labels and buckets, in this one file.
//!
//! Contract:
//! - [`Metrics::new`] builds one registry per running proxy (tests run many proxies in one
//!   process; nothing here is global except [`otel_spans_dropped`], which belongs to the
//!   process-wide trace exporter). The stages get typed handles ([`HttpMetrics`],
//!   [`UpstreamMetrics`], [`IdentityMetrics`], [`OutboxMetrics`], [`EventMetrics`]) and only
//!   ever call `inc` / `observe` on them: an atomic add, or a histogram's short lock.
//! - Figures that already live elsewhere (the outbox's counters, the forwarder's
//!   [`ForwarderStats`], the readiness latch, the key state) are read at scrape time by the
//!   [`LiveState`] collector: nothing is copied on the request path.
//! - Every label value comes from a bounded set defined here: endpoints are the route patterns
//!   (anything else is `other`), status classes, upstream operations, outcome and dead-letter
//!   codes. The one label from configuration, `tenant`, exists only with
//!   `telemetry.per_tenant_metrics = true`, takes its values from the tenants file (only
//!   authenticated tenants reach it) and is capped at `telemetry.max_tenant_labels`: tenants
//!   past the cap share the value `other`. No label ever takes a value from request input.
//! - [`Metrics::encode`] writes the Prometheus text format (version 0.0.4, what `promtool
//!   check metrics` and every Prometheus parse) or, when the scraper asks for it, OpenMetrics.
//!
//! Why `prometheus-client` (the official Rust client of the Prometheus project) rather than
//! `metrics` + `metrics-exporter-prometheus`: an explicit [`Registry`] per proxy instead of a
//! process-global recorder (the integration tests run several proxies in one process, and each
//! must scrape only its own figures), label sets as Rust types (a label value cannot be a
//! stray `String` from a request), and a [`Collector`] to expose figures the outbox and the
//! forwarder already keep without copying them. Since 0.26 it also encodes the Prometheus text
//! format 0.0.4, which `promtool check metrics` lints (its parser does not take OpenMetrics'
//! `# EOF`).

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use parking_lot::RwLock;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeMetric, LabelSetEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::TypedMetric;
use prometheus_client::registry::Registry;

use crate::admin::Readiness;
use crate::config::TelemetrySettings;
use crate::identity::{Identity, Tenants};
use crate::outbox::Outbox;
use crate::pricing::Pricing;
use crate::upstream::credentials::Credentials;
use crate::upstream::forwarder::ForwarderStats;

/// `Content-Type` of the Prometheus text format, the default answer of `/metrics`.
pub const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// `Content-Type` of OpenMetrics text, for scrapers that ask for it in `Accept`.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label value of tenants past `telemetry.max_tenant_labels`, and of unknown routes.
pub const OTHER: &str = "other";

// Buckets, in seconds unless said otherwise.
/// A request in memory takes ~10 µs; a sync of the outbox ~0.1-1 ms; Credyt tens of ms.
const REQUEST_SECONDS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
const EVENTS_PER_REQUEST: [f64; 9] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 250.0, 1000.0];
const DISK_SECONDS: [f64; 13] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
const WEBHOOK_LATENCY_SECONDS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 7200.0, 36000.0,
];
const GROUP_APPENDS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
const UPSTREAM_SECONDS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The spans the OTLP exporter dropped (queue full, export failed). Process-wide, because the
/// trace exporter is; every registry exposes it as `credyt_proxy_otel_spans_dropped_total`.
/// The exporter increments it; without OTLP it stays 0.
pub fn otel_spans_dropped() -> &'static Counter {
    static DROPPED: LazyLock<Counter> = LazyLock::new(Counter::default);
    &DROPPED
}

fn histogram(buckets: &'static [f64]) -> Histogram {
    Histogram::new(buckets.iter().copied())
}

/// Writes a label set of `(name, value)` pairs, skipping absent values.
fn encode_labels(
    encoder: &mut LabelSetEncoder,
    labels: &[(&'static str, Option<&str>)],
) -> Result<(), fmt::Error> {
    for (name, value) in labels {
        if let Some(value) = value {
            (*name, *value).encode(encoder.encode_label())?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Bounded label values
// ---------------------------------------------------------------------------------------

/// A tenant-facing route, by its pattern; anything else is `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Events,
    V1Events,
    V1Quote,
    V1BalanceCheck,
    Healthz,
    Other,
}

impl Endpoint {
    pub const ALL: [Endpoint; 6] = [
        Endpoint::Events,
        Endpoint::V1Events,
        Endpoint::V1Quote,
        Endpoint::V1BalanceCheck,
        Endpoint::Healthz,
        Endpoint::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Events => "/events",
            Endpoint::V1Events => "/v1/events",
            Endpoint::V1Quote => "/v1/quote",
            Endpoint::V1BalanceCheck => "/v1/balance/check",
            Endpoint::Healthz => "/healthz",
            Endpoint::Other => OTHER,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The class of an HTTP status, or `error` for a call that got no answer at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusClass {
    Success,
    Redirect,
    ClientError,
    ServerError,
    /// No HTTP answer (connection refused or reset, timeout, TLS).
    Error,
}

impl StatusClass {
    pub fn of(status: u16) -> StatusClass {
        match status {
            0..=299 => StatusClass::Success,
            300..=399 => StatusClass::Redirect,
            400..=499 => StatusClass::ClientError,
            _ => StatusClass::ServerError,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StatusClass::Success => "2xx",
            StatusClass::Redirect => "3xx",
            StatusClass::ClientError => "4xx",
            StatusClass::ServerError => "5xx",
            StatusClass::Error => "error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One kind of call to Credyt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Charge,
    ChargeCoalesced,
    Usage,
    FindAccount,
    FindCustomer,
    CreateCustomer,
    CustomerExists,
    AccountContext,
    /// `POST /accounts` (onboarding, `credyt-proxy tenant create`).
    CreateAccount,
    /// `POST /webhooks` (`credyt-proxy webhooks register`).
    CreateWebhook,
    /// `GET /webhooks` (`credyt-proxy webhooks register`).
    ListWebhooks,
    /// A tenant's call through the gateway (see `crate::gateway`).
    Gateway,
    /// `GET /customers/{id}/wallet`: an end user's balances, for balance gating (see
    /// `crate::balance`).
    WalletBalance,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Charge => "charge",
            Operation::ChargeCoalesced => "charge_coalesced",
            Operation::Usage => "usage",
            Operation::FindAccount => "find_account",
            Operation::FindCustomer => "find_customer",
            Operation::CreateCustomer => "create_customer",
            Operation::CustomerExists => "customer_exists",
            Operation::AccountContext => "account_context",
            Operation::CreateAccount => "create_account",
            Operation::CreateWebhook => "create_webhook",
            Operation::ListWebhooks => "list_webhooks",
            Operation::Gateway => "gateway",
            Operation::WalletBalance => "wallet_balance",
        }
    }

    /// The call as its client span names it (the span's `operation` attribute is
    /// [`Operation::as_str`], the label of the upstream metrics).
    pub fn call(self) -> super::traces::Call {
        let (name, method) = match self {
            Operation::Charge | Operation::ChargeCoalesced => {
                ("POST /customers/{id}/wallet/charges", "POST")
            }
            Operation::Usage => ("POST /events", "POST"),
            Operation::FindAccount => ("GET /accounts", "GET"),
            Operation::FindCustomer => ("GET /customers", "GET"),
            Operation::CreateCustomer => ("POST /customers", "POST"),
            Operation::CustomerExists => ("GET /customers/{id}", "GET"),
            Operation::AccountContext => ("GET /accounts/self", "GET"),
            Operation::CreateAccount => ("POST /accounts", "POST"),
            Operation::CreateWebhook => ("POST /webhooks", "POST"),
            Operation::ListWebhooks => ("GET /webhooks", "GET"),
            Operation::Gateway => ("gateway", "GET"),
            Operation::WalletBalance => ("GET /customers/{id}/wallet", "GET"),
        };
        super::traces::Call {
            name,
            method,
            operation: self.as_str(),
        }
    }
}

/// What an identity lookup resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LookupKind {
    /// tenant -> connected account (by external id).
    Account,
    /// (account, end user) -> customer.
    Customer,
    /// a `cust_...` id sent directly: does it belong to the account?
    CustomerCheck,
}

impl LookupKind {
    pub const ALL: [LookupKind; 3] = [
        LookupKind::Account,
        LookupKind::Customer,
        LookupKind::CustomerCheck,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LookupKind::Account => "account",
            LookupKind::Customer => "customer",
            LookupKind::CustomerCheck => "customer_check",
        }
    }
}

/// An event's outcome, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventOutcome {
    Accepted,
    Duplicate,
    Rejected,
}

impl EventOutcome {
    pub const ALL: [EventOutcome; 3] = [
        EventOutcome::Accepted,
        EventOutcome::Duplicate,
        EventOutcome::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventOutcome::Accepted => "accepted",
            EventOutcome::Duplicate => "duplicate",
            EventOutcome::Rejected => "rejected",
        }
    }
}

/// A tenant's label value: its id from the tenants file, or `other` past the cap. `None`
/// when per-tenant metrics are off (the label is then absent).
pub type TenantLabel = Option<Arc<str>>;

// ---------------------------------------------------------------------------------------
// Label sets
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RequestLabels {
    endpoint: Endpoint,
    class: StatusClass,
}

impl EncodeLabelSet for RequestLabels {
    fn encode(&self, e: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        encode_labels(
            e,
            &[
                ("endpoint", Some(self.endpoint.as_str())),
                ("status_class", Some(self.class.as_str())),
            ],
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct UpstreamLabels {
    operation: Operation,
    class: StatusClass,
}

impl EncodeLabelSet for UpstreamLabels {
    fn encode(&self, e: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        encode_labels(
            e,
            &[
                ("operation", Some(self.operation.as_str())),
                ("status_class", Some(self.class.as_str())),
            ],
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct KindLabels {
    kind: LookupKind,
}

impl EncodeLabelSet for KindLabels {
    fn encode(&self, e: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        encode_labels(e, &[("kind", Some(self.kind.as_str()))])
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct OutcomeLabels {
    outcome: EventOutcome,
    tenant: TenantLabel,
}

impl EncodeLabelSet for OutcomeLabels {
    fn encode(&self, e: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        encode_labels(
            e,
            &[
                ("outcome", Some(self.outcome.as_str())),
                ("tenant", self.tenant.as_deref()),
            ],
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TenantLabels {
    tenant: TenantLabel,
}

impl EncodeLabelSet for TenantLabels {
    fn encode(&self, e: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        encode_labels(e, &[("tenant", self.tenant.as_deref())])
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

// ---------------------------------------------------------------------------------------
// Handles
// ---------------------------------------------------------------------------------------

/// The tenant port: request durations by endpoint and status class, events per request.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    duration: HistogramFamily<RequestLabels>,
    /// The family's children, resolved once each: an observe costs no label hashing.
    cells: Arc<[[OnceLock<Histogram>; 5]; Endpoint::ALL.len()]>,
    events_per_request: Histogram,
}

impl HttpMetrics {
    fn new() -> Self {
        HttpMetrics {
            duration: Family::new_with_constructor(|| histogram(&REQUEST_SECONDS)),
            cells: Arc::new(Default::default()),
            events_per_request: histogram(&EVENTS_PER_REQUEST),
        }
    }

    /// One request answered with `status` after `took`.
    pub fn observe_request(&self, endpoint: Endpoint, status: u16, took: Duration) {
        let class = StatusClass::of(status);
        let cell = &self.cells[endpoint.index()][class.index()];
        cell.get_or_init(|| {
            self.duration
                .get_or_create_owned(&RequestLabels { endpoint, class })
        })
        .observe(took.as_secs_f64());
    }

    /// The number of events in one parsed request.
    pub fn observe_events(&self, n: usize) {
        self.events_per_request.observe(n as f64);
    }
}

/// Calls to Credyt by operation and status class.
#[derive(Debug, Clone)]
pub struct UpstreamMetrics {
    calls: Family<UpstreamLabels, Counter>,
    duration: HistogramFamily<UpstreamLabels>,
}

impl UpstreamMetrics {
    fn new() -> Self {
        UpstreamMetrics {
            calls: Family::default(),
            duration: Family::new_with_constructor(|| histogram(&UPSTREAM_SECONDS)),
        }
    }

    /// One call that ended with `status` (`None`: no HTTP answer) after `took`.
    pub fn observe(&self, operation: Operation, status: Option<u16>, took: Duration) {
        let labels = UpstreamLabels {
            operation,
            class: status.map_or(StatusClass::Error, StatusClass::of),
        };
        self.calls.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }
}

/// The identity caches: hits, misses (loads), the calls to Credyt the loads made, and how long
/// each load took.
#[derive(Debug, Clone)]
pub struct IdentityMetrics {
    hits: [Counter; 3],
    misses: [Counter; 3],
    upstream: [Counter; 3],
    duration: [Histogram; 3],
}

/// The families behind [`IdentityMetrics`], to register.
struct IdentityFamilies {
    counters: [Family<KindLabels, Counter>; 3],
    duration: HistogramFamily<KindLabels>,
}

impl Default for IdentityMetrics {
    /// Handles registered nowhere (an [`Identity`] built without metrics).
    fn default() -> Self {
        IdentityMetrics::with_families().0
    }
}

impl IdentityMetrics {
    /// The handles, one child per kind of each family (so every kind shows, at 0).
    fn with_families() -> (IdentityMetrics, IdentityFamilies) {
        let families = IdentityFamilies {
            counters: Default::default(),
            duration: Family::new_with_constructor(|| histogram(&UPSTREAM_SECONDS)),
        };
        let children = |family: &Family<KindLabels, Counter>| {
            LookupKind::ALL.map(|kind| family.get_or_create_owned(&KindLabels { kind }))
        };
        let metrics = IdentityMetrics {
            hits: children(&families.counters[0]),
            misses: children(&families.counters[1]),
            upstream: children(&families.counters[2]),
            duration: LookupKind::ALL
                .map(|kind| families.duration.get_or_create_owned(&KindLabels { kind })),
        };
        (metrics, families)
    }
}

impl IdentityMetrics {
    pub fn hit(&self, kind: LookupKind) {
        self.hits[kind as usize].inc();
    }
    pub fn miss(&self, kind: LookupKind) {
        self.misses[kind as usize].inc();
    }
    /// A miss that went to Credyt (concurrent misses of one key share one lookup).
    pub fn upstream_lookup(&self, kind: LookupKind) {
        self.upstream[kind as usize].inc();
    }
    pub fn observe_lookup(&self, kind: LookupKind, took: Duration) {
        self.duration[kind as usize].observe(took.as_secs_f64());
    }
}

/// The outbox's write path: how long an append waits to be durable, the syncs, the groups.
#[derive(Debug, Clone)]
pub struct OutboxMetrics {
    commit_wait: Histogram,
    sync_duration: Histogram,
    group_size: Histogram,
}

impl OutboxMetrics {
    /// One append's wait from its call to its answer (durable per the sync policy).
    pub fn observe_commit_wait(&self, took: Duration) {
        self.commit_wait.observe(took.as_secs_f64());
    }
    pub fn observe_sync(&self, took: Duration) {
        self.sync_duration.observe(took.as_secs_f64());
    }
    /// The append calls of one written commit group.
    pub fn observe_group(&self, appends: u64) {
        self.group_size.observe(appends as f64);
    }
}

/// What became of a webhook Credyt posted to the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WebhookReceipt {
    /// Recorded for delivery to its tenant.
    Accepted,
    /// Its id was recorded before (a redelivery): nothing recorded again.
    Duplicate,
    /// No tenant owns its account: recorded as a dead letter.
    Unroutable,
    /// Its tenant has no webhook endpoint, or does not take its topic: nothing to deliver.
    Filtered,
    /// Refused: signature, timestamp, body or size (4xx, nothing recorded).
    Refused,
}

impl WebhookReceipt {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookReceipt::Accepted => "accepted",
            WebhookReceipt::Duplicate => "duplicate",
            WebhookReceipt::Unroutable => "unroutable",
            WebhookReceipt::Filtered => "filtered",
            WebhookReceipt::Refused => "refused",
        }
    }
}

/// One attempt to deliver a webhook to a tenant's endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WebhookAttempt {
    /// The endpoint answered 2xx.
    Delivered,
    /// Anything else (another status, a timeout, no connection): retried per the schedule.
    Failed,
}

impl WebhookAttempt {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookAttempt::Delivered => "delivered",
            WebhookAttempt::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct StaticLabel(&'static str, &'static str);

impl EncodeLabelSet for StaticLabel {
    fn encode(&self, e: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        encode_labels(e, &[(self.0, Some(self.1))])
    }
}

/// The webhook relay: receipts, delivery attempts, dead letters, and the time from receipt to
/// delivery.
#[derive(Debug, Clone)]
pub struct WebhookMetrics {
    received: Family<StaticLabel, Counter>,
    attempts: Family<StaticLabel, Counter>,
    dead: Family<StaticLabel, Counter>,
    delivery_latency: Histogram,
}

impl WebhookMetrics {
    fn new() -> WebhookMetrics {
        WebhookMetrics {
            received: Family::default(),
            attempts: Family::default(),
            dead: Family::default(),
            delivery_latency: histogram(&WEBHOOK_LATENCY_SECONDS),
        }
    }
    pub fn received(&self, outcome: WebhookReceipt) {
        self.received
            .get_or_create(&StaticLabel("outcome", outcome.as_str()))
            .inc();
    }
    pub fn attempt(&self, result: WebhookAttempt) {
        self.attempts
            .get_or_create(&StaticLabel("result", result.as_str()))
            .inc();
    }
    /// A webhook became a dead letter, by `DeadCode` (`unroutable`, `retries_exhausted`).
    pub fn dead_lettered(&self, code: &'static str) {
        self.dead.get_or_create(&StaticLabel("code", code)).inc();
    }
    /// From the relay's receipt to the tenant's 2xx.
    pub fn observe_delivered(&self, since_receipt: Duration) {
        self.delivery_latency.observe(since_receipt.as_secs_f64());
    }
}

/// The tenant gateway: its answers by operation and status class, and the calls that move
/// money.
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    requests: Family<GatewayLabels, Counter>,
    money: Family<StaticLabel, Counter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GatewayLabels {
    operation: &'static str,
    class: StatusClass,
}

impl EncodeLabelSet for GatewayLabels {
    fn encode(&self, e: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        encode_labels(
            e,
            &[
                ("operation", Some(self.operation)),
                ("status_class", Some(self.class.as_str())),
            ],
        )
    }
}

impl GatewayMetrics {
    fn new() -> GatewayMetrics {
        GatewayMetrics {
            requests: Family::default(),
            money: Family::default(),
        }
    }
    /// One gateway answer; `operation` is an endpoint's name of the gateway's table or
    /// `denied` (a bounded set).
    pub fn observe(&self, operation: &'static str, status: u16) {
        self.requests
            .get_or_create(&GatewayLabels {
                operation,
                class: StatusClass::of(status),
            })
            .inc();
    }
    /// A call of an endpoint that moves money (`wallet.adjust`, `wallet.charge`).
    pub fn money_call(&self, operation: &'static str) {
        self.money
            .get_or_create(&StaticLabel("operation", operation))
            .inc();
    }
}

/// Balance gating (see `crate::balance`): events refused for balance, balance lookups, and the
/// decisions taken while Credyt's balance was unknown.
#[derive(Debug, Clone, Default)]
pub struct BalanceMetrics {
    refused: Family<StaticLabel, Counter>,
    lookups: Family<StaticLabel, Counter>,
    unknown: Family<StaticLabel, Counter>,
}

/// How a gated request found the end user's balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceLookup {
    /// A cached balance within its time to live.
    Hit,
    /// No usable cached balance: this request read it from Credyt (or waited for another
    /// request's read of the same wallet).
    Miss,
    /// The read failed, now or within the last `balance.unknown_ttl_ms`.
    Error,
}

impl BalanceLookup {
    fn as_str(self) -> &'static str {
        match self {
            BalanceLookup::Hit => "hit",
            BalanceLookup::Miss => "miss",
            BalanceLookup::Error => "error",
        }
    }
}

/// Why an event was refused for balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalanceRefusal {
    /// Credyt's own available balance is too low for it.
    Insufficient,
    /// Credyt's balance would cover it, but debits the proxy accepted (or is accepting) and
    /// Credyt has not confirmed yet take that room: a reservation conflict.
    Reserved,
}

impl BalanceMetrics {
    /// `n` events refused (`insufficient_balance`).
    pub fn refused(&self, why: BalanceRefusal, n: u64) {
        let reason = match why {
            BalanceRefusal::Insufficient => "insufficient",
            BalanceRefusal::Reserved => "reserved",
        };
        self.refused
            .get_or_create(&StaticLabel("reason", reason))
            .inc_by(n);
    }
    pub fn lookup(&self, result: BalanceLookup) {
        self.lookups
            .get_or_create(&StaticLabel("result", result.as_str()))
            .inc();
    }
    /// A gated request decided by `on_unknown` (`allow` or `deny`).
    pub fn unknown(&self, decision: &'static str) {
        self.unknown
            .get_or_create(&StaticLabel("decision", decision))
            .inc();
    }
}

/// Event outcomes, fees and rate-limited events; per tenant when configured.
#[derive(Debug)]
pub struct EventMetrics {
    outcomes: Family<OutcomeLabels, Counter>,
    fees: Family<TenantLabels, Counter>,
    ratelimited: Family<TenantLabels, Counter>,
    /// Without per-tenant labels: the children, resolved once.
    totals: Option<([Counter; 3], Counter, Counter)>,
    tenants: TenantLabeler,
}

impl EventMetrics {
    fn new(settings: &TelemetrySettings) -> Self {
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        let fees = Family::<TenantLabels, Counter>::default();
        let ratelimited = Family::<TenantLabels, Counter>::default();
        let totals = (!settings.per_tenant_metrics).then(|| {
            let no_tenant = TenantLabels { tenant: None };
            (
                EventOutcome::ALL.map(|outcome| {
                    outcomes.get_or_create_owned(&OutcomeLabels {
                        outcome,
                        tenant: None,
                    })
                }),
                fees.get_or_create_owned(&no_tenant),
                ratelimited.get_or_create_owned(&no_tenant),
            )
        });
        EventMetrics {
            outcomes,
            fees,
            ratelimited,
            totals,
            tenants: TenantLabeler {
                enabled: settings.per_tenant_metrics,
                cap: settings.max_tenant_labels,
                known: RwLock::default(),
            },
        }
    }

    /// The label of an authenticated tenant (`None` when per-tenant metrics are off).
    pub fn tenant_label(&self, tenant: &str) -> TenantLabel {
        self.tenants.label(tenant)
    }

    /// Counts `n` events of one outcome (and the fees of accepted ones).
    pub fn record(&self, tenant: &TenantLabel, outcome: EventOutcome, n: u64, fees: u64) {
        match &self.totals {
            Some((outcomes, fee_total, _)) => {
                outcomes[outcome as usize].inc_by(n);
                if fees > 0 {
                    fee_total.inc_by(fees);
                }
            }
            None => {
                self.outcomes
                    .get_or_create(&OutcomeLabels {
                        outcome,
                        tenant: tenant.clone(),
                    })
                    .inc_by(n);
                if fees > 0 {
                    self.fees
                        .get_or_create(&TenantLabels {
                            tenant: tenant.clone(),
                        })
                        .inc_by(fees);
                }
            }
        }
    }

    /// `n` events refused by the tenant's rate limit (429).
    pub fn ratelimited(&self, tenant: &TenantLabel, n: u64) {
        match &self.totals {
            Some((_, _, limited)) => {
                limited.inc_by(n);
            }
            None => {
                self.ratelimited
                    .get_or_create(&TenantLabels {
                        tenant: tenant.clone(),
                    })
                    .inc_by(n);
            }
        }
    }
}

/// Gives tenants their label value: their id while fewer than `cap` tenants have one, else
/// `other`. Only authenticated tenants (ids from the tenants file) ever get here.
#[derive(Debug)]
struct TenantLabeler {
    enabled: bool,
    cap: usize,
    known: RwLock<std::collections::HashMap<Arc<str>, Arc<str>>>,
}

impl TenantLabeler {
    fn label(&self, tenant: &str) -> TenantLabel {
        if !self.enabled {
            return None;
        }
        if let Some(label) = self.known.read().get(tenant) {
            return Some(label.clone());
        }
        let mut known = self.known.write();
        if let Some(label) = known.get(tenant) {
            return Some(label.clone());
        }
        let own = known.values().filter(|l| &***l != OTHER).count() < self.cap;
        let label: Arc<str> = if own {
            Arc::from(tenant)
        } else {
            Arc::from(OTHER)
        };
        known.insert(Arc::from(tenant), label.clone());
        Some(label)
    }
}

// ---------------------------------------------------------------------------------------
// The registry
// ---------------------------------------------------------------------------------------

/// One proxy's metrics: the registry and the handles the stages record into.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub http: HttpMetrics,
    pub upstream: UpstreamMetrics,
    pub identity: IdentityMetrics,
    pub outbox: OutboxMetrics,
    pub events: EventMetrics,
    pub webhooks: WebhookMetrics,
    pub gateway: GatewayMetrics,
    pub balance: BalanceMetrics,
}

impl Metrics {
    /// Registers every metric the stages record into. Figures read at scrape time come with
    /// [`Metrics::register_live`].
    pub fn new(settings: &TelemetrySettings) -> Metrics {
        let mut r = Registry::default();
        let http = HttpMetrics::new();
        r.register(
            "credyt_proxy_http_request_duration_seconds",
            "tenant requests by route pattern and status class: time from the handler's start to its answer",
            http.duration.clone(),
        );
        r.register(
            "credyt_proxy_request_events",
            "usage events per parsed request",
            http.events_per_request.clone(),
        );

        let events = EventMetrics::new(settings);
        r.register(
            "credyt_proxy_events",
            "usage events by outcome (accepted, duplicate, rejected)",
            events.outcomes.clone(),
        );
        r.register(
            "credyt_proxy_fees",
            "fees accepted for charging",
            events.fees.clone(),
        );
        r.register(
            "credyt_proxy_ratelimited_events",
            "usage events refused by the tenant's rate limit (429)",
            events.ratelimited.clone(),
        );

        let upstream = UpstreamMetrics::new();
        r.register(
            "credyt_proxy_upstream_calls",
            "calls to credyt by operation and status class (error: no http answer)",
            upstream.calls.clone(),
        );
        r.register(
            "credyt_proxy_upstream_call_duration_seconds",
            "calls to credyt by operation and status class: time until the answer's status and headers",
            upstream.duration.clone(),
        );

        let (identity, families) = IdentityMetrics::with_families();
        let [hits, misses, upstream_lookups] = families.counters;
        r.register(
            "credyt_proxy_identity_cache_hits",
            "identity lookups answered from the cache (or by another caller's load of the same key), by kind",
            hits,
        );
        r.register(
            "credyt_proxy_identity_cache_misses",
            "identity cache misses, by kind: loads (concurrent misses of one key share one)",
            misses,
        );
        r.register(
            "credyt_proxy_identity_upstream_lookups",
            "calls to credyt made by identity loads, by kind (a customer created on first sight: two)",
            upstream_lookups,
        );
        r.register(
            "credyt_proxy_identity_lookup_duration_seconds",
            "duration of identity loads (the calls to credyt of one miss), by kind",
            families.duration,
        );

        let outbox = OutboxMetrics {
            commit_wait: histogram(&DISK_SECONDS),
            sync_duration: histogram(&DISK_SECONDS),
            group_size: histogram(&GROUP_APPENDS),
        };
        r.register(
            "credyt_proxy_outbox_commit_wait_seconds",
            "time an outbox append waited until its events were durable per the sync policy",
            outbox.commit_wait.clone(),
        );
        r.register(
            "credyt_proxy_outbox_sync_duration_seconds",
            "duration of the outbox's fdatasync calls",
            outbox.sync_duration.clone(),
        );
        r.register(
            "credyt_proxy_outbox_group_size",
            "append calls per written outbox commit group",
            outbox.group_size.clone(),
        );

        let gateway = GatewayMetrics::new();
        r.register(
            "credyt_proxy_gateway_requests",
            "tenant calls of the credyt api through the gateway, by operation (denied: refused with 403) and status class",
            gateway.requests.clone(),
        );
        r.register(
            "credyt_proxy_gateway_money_calls",
            "gateway calls of endpoints that move money, by operation",
            gateway.money.clone(),
        );

        let balance = BalanceMetrics::default();
        r.register(
            "credyt_proxy_balance_refused_events",
            "usage events refused for balance (insufficient_balance), by reason (insufficient: credyt's balance; reserved: debits not yet confirmed by credyt)",
            balance.refused.clone(),
        );
        r.register(
            "credyt_proxy_balance_lookups",
            "balance reads of gated requests, by result (hit: cached; miss: read from credyt; error: credyt's balance unknown)",
            balance.lookups.clone(),
        );
        r.register(
            "credyt_proxy_balance_unknown_decisions",
            "gated requests decided by on_unknown while credyt's balance was unknown, by decision (allow, deny)",
            balance.unknown.clone(),
        );

        let webhooks = WebhookMetrics::new();
        r.register(
            "credyt_proxy_webhooks_received",
            "webhooks credyt posted to the relay, by outcome (accepted, duplicate, unroutable, filtered, refused)",
            webhooks.received.clone(),
        );
        r.register(
            "credyt_proxy_webhook_attempts",
            "attempts to deliver a webhook to a tenant endpoint, by result (delivered, failed)",
            webhooks.attempts.clone(),
        );
        r.register(
            "credyt_proxy_webhook_dead_letters",
            "webhooks that became dead letters, by code (unroutable, retries_exhausted)",
            webhooks.dead.clone(),
        );
        r.register(
            "credyt_proxy_webhook_delivery_seconds",
            "time from the relay's receipt of a webhook to its tenant's 2xx",
            webhooks.delivery_latency.clone(),
        );

        r.register(
            "credyt_proxy_otel_spans_dropped",
            "spans the otlp exporter dropped (0 without otlp)",
            otel_spans_dropped().clone(),
        );

        Metrics {
            registry: r,
            http,
            upstream,
            identity,
            outbox,
            events,
            webhooks,
            gateway,
            balance,
        }
    }

    /// Adds the figures read at scrape time (outbox, forwarder, key, readiness).
    pub fn register_live(&mut self, live: LiveState) {
        self.registry.register_collector(Box::new(live));
    }

    /// The exposition, in OpenMetrics when `openmetrics`, else Prometheus text 0.0.4.
    pub fn encode(&self, openmetrics: bool) -> Result<String, fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        }
        Ok(out)
    }
}

/// Figures kept by other parts of the proxy, read at each scrape.
pub struct LiveState {
    pub readiness: Arc<Readiness>,
    pub credentials: Arc<Credentials>,
    pub identity: Arc<Identity>,
    pub outbox: Option<Outbox>,
    /// The webhook relay's outbox, when the relay is configured.
    pub webhooks: Option<Outbox>,
    pub forwarder: Option<Arc<ForwarderStats>>,
    pub tenants: Arc<Tenants>,
    pub pricing: Arc<Pricing>,
}

impl fmt::Debug for LiveState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveState").finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ReasonLabels(&'static str);

impl EncodeLabelSet for ReasonLabels {
    fn encode(&self, e: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        encode_labels(e, &[("reason", Some(self.0))])
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SourceLabels(&'static str);

impl EncodeLabelSet for SourceLabels {
    fn encode(&self, e: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        encode_labels(e, &[("source", Some(self.0))])
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct VersionLabels;

impl EncodeLabelSet for VersionLabels {
    fn encode(&self, e: &mut LabelSetEncoder) -> Result<(), fmt::Error> {
        encode_labels(e, &[("version", Some(env!("CARGO_PKG_VERSION")))])
    }
}

fn one<M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: M,
) -> Result<(), fmt::Error> {
    let e = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    metric.encode(e)
}

impl Collector for LiveState {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let e = &mut enc;
        one(
            e,
            "credyt_proxy_build_info",
            "always 1; the version of the running proxy",
            ConstInfoGauge,
        )?;
        let key_refused = self.credentials.is_refused();
        let poisoned = self.outbox.as_ref().is_some_and(|o| o.stats().poisoned);
        // What /readyz answers.
        let ready = self.readiness.is_ready() && !key_refused && !poisoned;
        one(
            e,
            "credyt_proxy_ready",
            "1 while /readyz answers 200 (loaded, not draining, key accepted, outbox writable)",
            ConstGauge::new(i64::from(ready)),
        )?;
        one(
            e,
            "credyt_proxy_upstream_key_refused",
            "1 while credyt refuses the platform key (delivery paused, not ready)",
            ConstGauge::new(i64::from(key_refused)),
        )?;
        let mut family = e.encode_descriptor(
            "credyt_proxy_reload_rejected",
            "1 while the tenants file or pricing directory on disk was rejected at reload (the last good one serves)",
            None,
            ConstGauge::<i64>::TYPE,
        )?;
        for (source, rejected) in [
            ("tenants", self.tenants.last_error().is_some()),
            ("pricing", self.pricing.last_error().is_some()),
        ] {
            ConstGauge::new(i64::from(rejected))
                .encode(family.encode_family(&SourceLabels(source))?)?;
        }
        one(
            e,
            "credyt_proxy_identity_cached_customers",
            "cached end-user identities",
            ConstGauge::new(self.identity.cached_customers_now()),
        )?;
        if let Some(f) = &self.forwarder {
            let load = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as u64;
            for (name, help, value) in [
                (
                    "credyt_proxy_forwarder_concurrency_limit",
                    "calls to credyt the forwarder may have in flight now (adaptive)",
                    load(&f.limit),
                ),
                (
                    "credyt_proxy_forwarder_in_flight",
                    "calls to credyt in flight",
                    load(&f.in_flight),
                ),
                (
                    "credyt_proxy_forwarder_waiting_retries",
                    "records waiting for their retry timer",
                    load(&f.waiting),
                ),
                (
                    "credyt_proxy_forwarder_breaker_state",
                    "circuit breaker state: 0 closed, 1 open, 2 half-open",
                    load(&f.breaker),
                ),
            ] {
                one(e, name, help, ConstGauge::new(value))?;
            }
            one(
                e,
                "credyt_proxy_forwarder_delivered",
                "calls that delivered to credyt (a coalesced charge is one)",
                ConstCounter::new(f.delivered.load(Ordering::Relaxed)),
            )?;
            one(
                e,
                "credyt_proxy_forwarder_retries",
                "transient delivery failures, each retried",
                ConstCounter::new(f.retries.load(Ordering::Relaxed)),
            )?;
            let mut family = e.encode_descriptor(
                "credyt_proxy_forwarder_dead_lettered",
                "records dead-lettered, by reason",
                None,
                ConstCounter::<u64>::TYPE,
            )?;
            for (code, value) in ["refused", "conflict", "retries_exhausted"]
                .iter()
                .zip(&f.dead)
            {
                let labels = ReasonLabels(code);
                ConstCounter::new(value.load(Ordering::Relaxed))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        if let Some(relay) = &self.webhooks {
            let oldest = relay.oldest_accepted_at().map_or(0.0, |at| {
                (chrono::Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0
            });
            one(
                e,
                "credyt_proxy_webhooks_oldest_age_seconds",
                "age of the oldest webhook not yet acknowledged by its tenant, 0 when none",
                ConstGauge::new(oldest),
            )?;
            let stats = relay.stats();
            for (name, help, value) in [
                (
                    "credyt_proxy_webhooks_pending",
                    "webhooks recorded and not yet acknowledged by their tenant",
                    stats.depth as u64,
                ),
                (
                    "credyt_proxy_webhooks_dead_letters",
                    "webhook dead letters awaiting an operator",
                    stats.dead_letters as u64,
                ),
            ] {
                one(e, name, help, ConstGauge::new(value))?;
            }
        }
        if let Some(outbox) = &self.outbox {
            let oldest = outbox.oldest_accepted_at().map_or(0.0, |at| {
                (chrono::Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0
            });
            one(
                e,
                "credyt_proxy_outbox_oldest_age_seconds",
                "age of the oldest undelivered record (how far behind credyt the proxy is), 0 when none",
                ConstGauge::new(oldest),
            )?;
            let stats = outbox.stats();
            for (name, help, value) in [
                (
                    "credyt_proxy_outbox_depth",
                    "undelivered debits in the outbox",
                    stats.depth as u64,
                ),
                (
                    "credyt_proxy_outbox_dead_letters",
                    "dead letters awaiting an operator",
                    stats.dead_letters as u64,
                ),
                (
                    "credyt_proxy_outbox_dedupe_filter_bytes",
                    "heap bytes of the outbox's dedupe filter",
                    stats.dedupe_filter_bytes as u64,
                ),
                (
                    "credyt_proxy_outbox_log_segments",
                    "segments of the outbox's record log on disk",
                    stats.log_segments as u64,
                ),
                (
                    "credyt_proxy_outbox_unindexed_ids",
                    "accepted event ids not yet in the outbox's dedupe index",
                    stats.unindexed_ids as u64,
                ),
                (
                    "credyt_proxy_outbox_poisoned",
                    "1 when a failed write or sync stopped the outbox (refuses writes until a restart)",
                    u64::from(stats.poisoned),
                ),
            ] {
                one(e, name, help, ConstGauge::new(value))?;
            }
            for (name, help, value) in [
                (
                    "credyt_proxy_outbox_syncs",
                    "outbox fdatasync calls",
                    stats.syncs,
                ),
                (
                    "credyt_proxy_outbox_groups",
                    "outbox commit groups written",
                    stats.groups,
                ),
                (
                    "credyt_proxy_outbox_appends",
                    "outbox append calls written",
                    stats.appends,
                ),
            ] {
                one(e, name, help, ConstCounter::new(value))?;
            }
        }
        Ok(())
    }
}

/// `credyt_proxy_build_info{version="..."} 1`.
struct ConstInfoGauge;

impl TypedMetric for ConstInfoGauge {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Gauge;
}

impl EncodeMetric for ConstInfoGauge {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), fmt::Error> {
        ConstGauge::new(1i64).encode(encoder.encode_family(&VersionLabels)?)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(per_tenant: bool, cap: usize) -> TelemetrySettings {
        TelemetrySettings {
            per_tenant_metrics: per_tenant,
            max_tenant_labels: cap,
            traces: None,
        }
    }

    #[test]
    fn telemetry_tenant_labels_are_off_by_default_and_stop_at_the_cap() {
        let off = Metrics::new(&TelemetrySettings::default());
        assert_eq!(off.events.tenant_label("acme"), None);
        let on = Metrics::new(&settings(true, 2));
        assert_eq!(on.events.tenant_label("a").as_deref(), Some("a"));
        assert_eq!(on.events.tenant_label("b").as_deref(), Some("b"));
        assert_eq!(on.events.tenant_label("c").as_deref(), Some(OTHER));
        assert_eq!(on.events.tenant_label("d").as_deref(), Some(OTHER));
        // A tenant keeps its label.
        assert_eq!(on.events.tenant_label("a").as_deref(), Some("a"));
        assert_eq!(on.events.tenant_label("c").as_deref(), Some(OTHER));
    }

    #[test]
    fn telemetry_status_classes_and_endpoints_are_bounded() {
        assert_eq!(StatusClass::of(204).as_str(), "2xx");
        assert_eq!(StatusClass::of(303).as_str(), "3xx");
        assert_eq!(StatusClass::of(429).as_str(), "4xx");
        assert_eq!(StatusClass::of(503).as_str(), "5xx");
        assert_eq!(StatusClass::of(999).as_str(), "5xx");
        let names: Vec<&str> = Endpoint::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(
            names,
            [
                "/events",
                "/v1/events",
                "/v1/quote",
                "/v1/balance/check",
                "/healthz",
                "other"
            ]
        );
        for (i, e) in Endpoint::ALL.iter().enumerate() {
            assert_eq!(e.index(), i);
        }
    }

    #[test]
    fn telemetry_exposition_has_every_family_with_help_type_and_bounded_labels() {
        let m = Metrics::new(&TelemetrySettings::default());
        m.http
            .observe_request(Endpoint::Events, 204, Duration::from_micros(300));
        m.http
            .observe_request(Endpoint::Other, 404, Duration::from_micros(10));
        m.http.observe_events(7);
        m.events.record(&None, EventOutcome::Accepted, 3, 5);
        m.events.ratelimited(&None, 2);
        m.upstream
            .observe(Operation::Charge, Some(201), Duration::from_millis(12));
        m.upstream
            .observe(Operation::FindCustomer, None, Duration::from_millis(2));
        m.identity.hit(LookupKind::Customer);
        m.outbox.observe_commit_wait(Duration::from_micros(80));
        m.outbox.observe_group(3);
        let text = m.encode(false).unwrap();
        for line in [
            "# TYPE credyt_proxy_http_request_duration_seconds histogram",
            "credyt_proxy_http_request_duration_seconds_bucket{endpoint=\"/events\",status_class=\"2xx\",le=\"0.0005\"} 1",
            "credyt_proxy_http_request_duration_seconds_count{endpoint=\"other\",status_class=\"4xx\"} 1",
            "credyt_proxy_request_events_sum 7.0",
            "# TYPE credyt_proxy_events_total counter",
            "credyt_proxy_events_total{outcome=\"accepted\"} 3",
            "credyt_proxy_events_total{outcome=\"duplicate\"} 0",
            "credyt_proxy_fees_total 5",
            "credyt_proxy_ratelimited_events_total 2",
            "credyt_proxy_upstream_calls_total{operation=\"charge\",status_class=\"2xx\"} 1",
            "credyt_proxy_upstream_calls_total{operation=\"find_customer\",status_class=\"error\"} 1",
            "credyt_proxy_identity_cache_hits_total{kind=\"customer\"} 1",
            "credyt_proxy_identity_cache_misses_total{kind=\"account\"} 0",
            "credyt_proxy_outbox_group_size_count 1",
            "credyt_proxy_outbox_commit_wait_seconds_count 1",
            "credyt_proxy_otel_spans_dropped_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(!text.contains("_total_total"), "{text}");
        // Every family says what it is.
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(types, helps);
        assert!(types >= 15, "{text}");
        let open = m.encode(true).unwrap();
        assert!(open.ends_with("# EOF\n"), "{open}");
    }

    #[test]
    fn telemetry_per_tenant_counters_carry_the_label_and_no_unlabelled_series() {
        let m = Metrics::new(&settings(true, 1));
        let a = m.events.tenant_label("tenant-a");
        let b = m.events.tenant_label("tenant-b");
        m.events.record(&a, EventOutcome::Accepted, 1, 2);
        m.events.record(&b, EventOutcome::Rejected, 4, 0);
        m.events.ratelimited(&b, 3);
        let text = m.encode(false).unwrap();
        for line in [
            "credyt_proxy_events_total{outcome=\"accepted\",tenant=\"tenant-a\"} 1",
            "credyt_proxy_events_total{outcome=\"rejected\",tenant=\"other\"} 4",
            "credyt_proxy_fees_total{tenant=\"tenant-a\"} 2",
            "credyt_proxy_ratelimited_events_total{tenant=\"other\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(!text.contains("tenant-b"), "{text}");
        assert!(!text.contains("credyt_proxy_events_total{outcome=\"accepted\"}"));
    }

    #[test]
    fn telemetry_spans_dropped_is_one_counter_shared_by_every_registry() {
        let (one, two) = (
            Metrics::new(&TelemetrySettings::default()),
            Metrics::new(&TelemetrySettings::default()),
        );
        let before = otel_spans_dropped().get();
        otel_spans_dropped().inc();
        let want = format!("credyt_proxy_otel_spans_dropped_total {}", before + 1);
        for m in [one, two] {
            let text = m.encode(false).unwrap();
            assert!(text.lines().any(|l| l == want), "{text}");
        }
    }
}
