//! The price quote: one shape for `credyt-proxy quote` and `POST /v1/quote`, and the library
//! side of `credyt-proxy check-pricing`.
//!
//! Contract: [`Quote::build`] prices one parsed event with the same engine as the server and
//! returns the breakdown; both the CLI and the tenant API serialize that one struct, so they
//! answer in the same shape. Amounts are decimal strings (`"0.50"`), as in every JSON answer
//! of the proxy (`/v1/events` fees included), never JSON numbers. `quote_json` parses the
//! event text exactly (JSON numbers become `Decimal` from their literal text, never `f64`).
//! `check_dir` validates a directory and summarises it. No printing, no exit codes: the CLI
//! does that.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;

use super::period::{PeriodPart, QuotedTotal};
use super::{LoadErrors, PricingError, PricingSet};
use crate::domain::{Fee, UsageEvent};

/// Why a quote failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuoteError {
    /// The input is not JSON at all.
    #[error("invalid event json: {0}")]
    InvalidJson(String),
    /// JSON, but not a usage event (a field is missing or of the wrong type).
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    #[error(transparent)]
    Pricing(#[from] PricingError),
    /// The running total could not be read (the outbox failed).
    #[error("the running total could not be read: {0}")]
    Totals(String),
}

impl QuoteError {
    /// The stable code, the one the tenant API uses for the same problem.
    pub fn code(&self) -> &'static str {
        match self {
            QuoteError::InvalidJson(_) => "invalid_json",
            QuoteError::InvalidEvent(_) => "invalid_event",
            QuoteError::Pricing(e) => e.code(),
            QuoteError::Totals(_) => "totals_unavailable",
        }
    }
}

/// Which price book priced the event, and why that one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuotedBook {
    /// The book's name, e.g. `standard`.
    pub name: Arc<str>,
    /// The version in force at `occurred_at` (its `effective_from` label); `null` when the
    /// book has none yet.
    pub version: Option<Arc<str>>,
    /// `assigned` (the tenant's own assignment) or `default` (the default book).
    pub source: &'static str,
}

/// The price breakdown of one event, as the CLI prints it and `POST /v1/quote` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quote {
    pub tenant: String,
    pub event_id: String,
    pub event_type: String,
    /// RFC 3339, as given.
    pub occurred_at: String,
    pub book: QuotedBook,
    /// The pricing set's label and content hash (stamped on every debit).
    pub pricing_version: String,
    pub pricing_hash: String,
    /// The same fee objects `/v1/events` answers for an accepted event.
    pub fees: Vec<Fee>,
    /// Sum of the fees per asset, as decimal strings.
    pub totals: BTreeMap<Arc<str>, Decimal>,
    /// One entry per fee of a price with `tiering`: the running total it was rated against
    /// and the bands its quantity crossed. Absent when no price of the event has `tiering`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub running_totals: Vec<QuotedTotal>,
}

/// Where a quote takes the running totals of period-tiered prices from. A quote records
/// nothing, whichever it is.
pub enum Totals<'a> {
    /// None known (the CLI, or no customer named): every total is zero.
    Zero,
    /// "As if the total were N", for every period-tiered price of the event.
    AsIf(Decimal),
    /// The totals recorded so far (the outbox), looked up per part.
    Recorded(&'a dyn Fn(&PeriodPart) -> Result<Decimal, QuoteError>),
}

impl Quote {
    /// Prices `event` for `tenant` with `set` (the tenant's book, else the default book).
    pub fn build(set: &PricingSet, tenant: &str, event: &UsageEvent) -> Result<Quote, QuoteError> {
        Quote::build_with(set, tenant, event, Totals::Zero)
    }

    /// As [`Quote::build`], rating period-tiered prices against `totals`.
    pub fn build_with(
        set: &PricingSet,
        tenant: &str,
        event: &UsageEvent,
        totals: Totals<'_>,
    ) -> Result<Quote, QuoteError> {
        let assigned = set.tenants.get(tenant);
        let book =
            assigned
                .or(set.default.as_ref())
                .ok_or_else(|| PricingError::UnknownTenant {
                    tenant: tenant.to_owned(),
                })?;
        let mut parts = Vec::new();
        let mut fees = super::engine::price_event_parts(book, &set.hash, event, &mut parts)?;
        let mut running_totals = Vec::with_capacity(parts.len());
        for part in &parts {
            let (total, source) = match &totals {
                Totals::Zero => (Decimal::ZERO, "none"),
                Totals::AsIf(n) => (*n, "as_if"),
                Totals::Recorded(lookup) => (lookup(part)?, "outbox"),
            };
            let mut bands = Vec::new();
            let rated = part.rate_with_bands(total, Some(&mut bands))?;
            if let Some(fee) = fees.get_mut(part.fee) {
                fee.amount = rated.amount;
                fee.unit_price = rated.unit_price;
                fee.volume_rate = rated.volume_rate;
            }
            let tiering = part.price.tiering;
            running_totals.push(QuotedTotal {
                price_id: part.price.id.clone(),
                period: tiering.map_or("", |t| t.period.as_str()),
                basis: tiering.map_or("", |t| t.basis.as_str()),
                window: part.window.clone(),
                source,
                total,
                total_after: part.after(total)?,
                bands,
            });
        }
        let mut totals: BTreeMap<Arc<str>, Decimal> = BTreeMap::new();
        for fee in &fees {
            let total = totals.entry(fee.asset.clone()).or_default();
            *total = total
                .checked_add(fee.amount)
                .ok_or_else(|| PricingError::AmountOverflow {
                    price_id: fee.price_id.to_string(),
                })?;
        }
        Ok(Quote {
            tenant: tenant.to_owned(),
            event_id: event.id.as_str().to_owned(),
            event_type: event.event_type.clone(),
            occurred_at: event.occurred_at.to_rfc3339(),
            book: QuotedBook {
                name: book.name.clone(),
                version: book.version_at(event.occurred_at).map(|v| v.label.clone()),
                source: if assigned.is_some() {
                    "assigned"
                } else {
                    "default"
                },
            },
            pricing_version: set.version().to_owned(),
            pricing_hash: set.hash().to_owned(),
            fees,
            totals,
            running_totals,
        })
    }
}

/// Parses one Credyt usage event from its JSON text, exactly.
pub fn parse_event(event_json: &str) -> Result<UsageEvent, QuoteError> {
    serde_json::from_str(event_json).map_err(|e| {
        if e.is_data() {
            QuoteError::InvalidEvent(e.to_string())
        } else {
            QuoteError::InvalidJson(e.to_string())
        }
    })
}

/// Parses and prices one event for `tenant`: the [`Quote`] as a JSON value.
pub fn quote_json(set: &PricingSet, tenant: &str, event_json: &str) -> Result<Value, QuoteError> {
    let quote = Quote::build(set, tenant, &parse_event(event_json)?)?;
    serde_json::to_value(&quote).map_err(|e| QuoteError::InvalidEvent(e.to_string()))
}

/// Validates a pricing directory. `Ok`: a one-paragraph summary; `Err`: every mistake
/// (`Display` prints one `file:line: path: message [code]` per line).
pub fn check_dir(dir: &Path) -> Result<String, LoadErrors> {
    let set = PricingSet::load_dir(dir)?;
    let mut lines = vec![format!(
        "pricing ok: {} (version {}, hash {})",
        dir.display(),
        set.version(),
        set.hash()
    )];
    for name in set.book_names() {
        if let Some(book) = set.book(name) {
            let prices = book.timeline.last().map_or(0, |v| v.prices.len());
            lines.push(format!(
                "book {name}: {} version(s), {prices} price(s) in the latest",
                book.timeline.len()
            ));
        }
    }
    lines.push(format!(
        "default book: {}; {} tenant assignment(s)",
        set.default.as_ref().map_or("(none)", |b| &*b.name),
        set.tenants.len()
    ));
    Ok(lines.join("\n"))
}
