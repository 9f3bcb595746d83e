//! Library side of the CLI commands `credyt-proxy quote` and `credyt-proxy check-pricing`.
//!
//! Contract: `quote_json` parses a Credyt-shaped event (`{id, event_type, occurred_at, data,
//! ...}`) exactly (JSON numbers become `Decimal` from their literal text, never `f64`), prices it
//! with the same engine as the server, and returns the breakdown with every decimal as an exact
//! JSON number. `check_dir` validates a directory and summarises it. No printing, no exit codes:
//! the CLI does that.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::{json, Map, Number, Value};

use super::{LoadErrors, PricingError, PricingSet};
use crate::domain::{UsageEvent, UsageType};

/// Why a quote failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuoteError {
    #[error("invalid event JSON: {0}")]
    InvalidEvent(String),
    #[error(transparent)]
    Pricing(#[from] PricingError),
}

impl QuoteError {
    pub fn code(&self) -> &'static str {
        match self {
            QuoteError::InvalidEvent(_) => "invalid_event",
            QuoteError::Pricing(e) => e.code(),
        }
    }
}

/// An exact JSON number for a decimal (serde_json keeps the literal: `arbitrary_precision`).
pub fn decimal_json(d: Decimal) -> Value {
    Number::from_str(&d.to_string()).map_or_else(|_| Value::String(d.to_string()), Value::Number)
}

fn opt_decimal(d: Option<Decimal>) -> Value {
    d.map_or(Value::Null, decimal_json)
}

fn usage_str(u: UsageType) -> &'static str {
    match u {
        UsageType::Unit => "unit",
        UsageType::Volume => "volume",
        UsageType::UnitAndVolume => "unit_and_volume",
    }
}

/// Prices one event for `tenant` and returns the breakdown:
/// `{tenant, event_id, event_type, occurred_at, book, book_version, pricing_version,
/// pricing_hash, fees: [{price_id, price_name, usage_type, dimensions, volume_field, volume,
/// unit_price, volume_rate, package_size, amount, asset, book, book_version}], totals: {asset: sum}}`.
pub fn quote_json(set: &PricingSet, tenant: &str, event_json: &str) -> Result<Value, QuoteError> {
    let event: UsageEvent =
        serde_json::from_str(event_json).map_err(|e| QuoteError::InvalidEvent(e.to_string()))?;
    let fees = set.price(tenant, &event)?;
    let mut totals: BTreeMap<&str, Decimal> = BTreeMap::new();
    let mut out = Vec::with_capacity(fees.len());
    for fee in &fees {
        let total = totals.entry(&*fee.asset).or_default();
        *total = total
            .checked_add(fee.amount)
            .ok_or_else(|| PricingError::AmountOverflow {
                price_id: fee.price_id.to_string(),
            })?;
        out.push(json!({
            "price_id": fee.price_id,
            "price_name": fee.price_name,
            "usage_type": usage_str(fee.usage_type),
            "dimensions": fee.dimensions,
            "volume_field": fee.volume_field,
            "volume": opt_decimal(fee.volume),
            "unit_price": opt_decimal(fee.unit_price),
            "volume_rate": opt_decimal(fee.volume_rate),
            "package_size": opt_decimal(fee.package_size),
            "amount": decimal_json(fee.amount),
            "asset": fee.asset,
            "book": fee.book,
            "book_version": fee.book_version,
        }));
    }
    let totals: Map<String, Value> = totals
        .into_iter()
        .map(|(k, v)| (k.to_owned(), decimal_json(v)))
        .collect();
    let book = set.book_for(tenant).map(|b| b.name.clone());
    Ok(json!({
        "tenant": tenant,
        "event_id": event.id.as_str(),
        "event_type": event.event_type,
        "occurred_at": event.occurred_at.to_rfc3339(),
        "book": book,
        "book_version": fees.first().map(|f| f.book_version.clone()),
        "pricing_version": set.version(),
        "pricing_hash": set.hash(),
        "fees": out,
        "totals": totals,
    }))
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
