//! Tiers over a period: the running totals a price with `tiering` is rated against.
//!
//! # Contract
//!
//! A price with `tiering = { period, basis }` is rated on the band range `(total, total + q]`
//! (graduated) or at the band `total + q` falls in (bulk), where `total` is what the same
//! (tenant, customer, price id, period, basis) accumulated in the event's period window, and q
//! is the event's quantity (`basis = "volume"`) or 1 (`basis = "unit"`). Windows are calendar
//! months, quarters and years of `occurred_at` in UTC; `lifetime` is one window.
//!
//! Pricing itself stays pure: [`crate::pricing::PricingSet::price_parts`] returns, beside the
//! fees (rated at a total of zero), one [`PeriodPart`] per period-tiered price. The part is
//! rated against its running total by the outbox's commit, which is the one place that both
//! decides the order of accepted events (groups strictly one after the other, under the commit
//! lock) and knows which events are duplicates. There, for each *new* event in decision order,
//! each part reads its total, is rated ([`PeriodPart::rate`]), and the total plus the event's
//! share is written into the same log frame as the event's records and dedupe key: the total
//! moves if and only if the event is accepted, in one atomic append. Consequences:
//!
//! * Two concurrent requests for one customer never price against the same total: the second
//!   is decided after the first, in the same group or the next.
//! * A duplicate is decided before rating, writes nothing and adds nothing; a re-sent event is
//!   answered `duplicate` and its charge stays the one stored at its first acceptance
//!   (records store amounts, never re-price).
//! * A failed append claims nothing and moves no total (the group's totals are applied in memory
//!   only after its write); after a failed sync the outbox refuses every later write until a
//!   restart, which recovers totals from durable state only.
//! * A late event (its window already past, within the accepted age of events) is rated
//!   against its own window's total and adds to it; the current window is untouched.
//! * Totals are keyed by price id, not book version: across a version change inside a window
//!   the total carries on (the customer's consumption in the period does not restart because
//!   the rates changed; the new version's tiers apply from the next event on). A version that
//!   changes the price's `period` or `basis` starts a total of its own.
//! * Prices without `tiering` produce no part: no lock, no lookup on the request path.
//!
//! `ack = "upstream"` has no outbox, so no durable total: a pricing set with period tiers is
//! refused there (see [`PricingSet::has_period_tiers`]). Totals are per outbox, so per replica.

use std::sync::Arc;

use chrono::{DateTime, Datelike, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use super::book::{Period, Price};
use super::engine::{rate_row, BandUse};
use super::{PricingError, PricingSet};

/// The window label of `period` holding `at` (UTC): `2026-06`, `2026-Q2`, `2026`, `lifetime`.
pub fn window(period: Period, at: DateTime<Utc>) -> Arc<str> {
    match period {
        Period::Lifetime => Arc::from("lifetime"),
        Period::Monthly => format!("{:04}-{:02}", at.year(), at.month()).into(),
        Period::Quarterly => format!("{:04}-Q{}", at.year(), (at.month() - 1) / 3 + 1).into(),
        Period::Yearly => format!("{:04}", at.year()).into(),
    }
}

/// The part of one event's fee that depends on a running total, as pricing left it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeriodPart {
    /// Index of the fee (in the event's fees) this part rates.
    pub fee: usize,
    pub price: Arc<Price>,
    /// Index of the matched dimension row in `price.rows`.
    pub row: usize,
    /// The event's quantity (`None`: a row without a volume part).
    pub volume: Option<Decimal>,
    /// What the event adds to the running total: q, or 1 on a `unit` basis.
    pub add: Decimal,
    /// The window label (see [`window`]).
    pub window: Arc<str>,
}

/// A period part rated against its running total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodRated {
    /// Index of the fee it replaces the amount of.
    pub fee: usize,
    /// The running total the event was rated against (before it).
    pub total: Decimal,
    pub amount: Decimal,
    pub unit_price: Option<Decimal>,
    pub volume_rate: Option<Decimal>,
}

impl PeriodPart {
    /// The running-total key: tenant, customer, price, period, basis and window, each
    /// length-prefixed so no id can run into the next.
    pub fn key(&self, tenant: &str, customer: &str) -> Box<str> {
        let (period, basis) = self
            .price
            .tiering
            .map_or(("none", "none"), |t| (t.period.as_str(), t.basis.as_str()));
        let id: &str = &self.price.id;
        format!(
            "{}:{tenant}{}:{customer}{}:{id}{period}/{basis}/{}",
            tenant.len(),
            customer.len(),
            id.len(),
            self.window
        )
        .into_boxed_str()
    }

    /// Rates the part when its running total stands at `total`; bands used go to `bands`.
    pub fn rate_with_bands(
        &self,
        total: Decimal,
        bands: Option<&mut Vec<BandUse>>,
    ) -> Result<PeriodRated, PricingError> {
        let row = self
            .price
            .rows
            .get(self.row)
            .ok_or_else(|| PricingError::AmountOverflow {
                price_id: self.price.id.to_string(),
            })?;
        let rated = rate_row(&self.price, row, self.volume, total, bands)?;
        Ok(PeriodRated {
            fee: self.fee,
            total,
            amount: rated.amount,
            unit_price: rated.unit_price,
            volume_rate: rated.volume_rate,
        })
    }

    /// Rates the part when its running total stands at `total`.
    pub fn rate(&self, total: Decimal) -> Result<PeriodRated, PricingError> {
        self.rate_with_bands(total, None)
    }

    /// The total after this event: `total + add`.
    pub fn after(&self, total: Decimal) -> Result<Decimal, PricingError> {
        total
            .checked_add(self.add)
            .ok_or_else(|| PricingError::AmountOverflow {
                price_id: self.price.id.to_string(),
            })
    }
}

/// A period part on its way into the outbox: what to rate, under which key, and which of the
/// event's deliveries carries its fee.
#[derive(Debug, Clone, PartialEq)]
pub struct TotalClaim {
    pub key: Box<str>,
    /// Index of the event's delivery (a charge) whose amount the rating sets; a charge of zero
    /// is dropped then.
    pub delivery: usize,
    pub part: PeriodPart,
}

/// What a quote shows of one period-tiered fee.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuotedTotal {
    pub price_id: Arc<str>,
    pub period: &'static str,
    pub basis: &'static str,
    pub window: Arc<str>,
    /// `outbox` (the running total recorded so far), `as_if` (the total the caller gave) or
    /// `none` (no customer or no outbox: zero).
    pub source: &'static str,
    /// The running total the event was rated against, and what it would be after it.
    pub total: Decimal,
    pub total_after: Decimal,
    /// Every band the event's quantity was rated in.
    pub bands: Vec<BandUse>,
}

impl PricingSet {
    /// Whether any book of the set has a price with `tiering` (which needs the outbox).
    pub fn has_period_tiers(&self) -> bool {
        self.books.values().any(|b| {
            b.timeline
                .iter()
                .any(|v| v.prices.iter().any(|p| p.tiering.is_some()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn windows_are_utc_calendar_periods() {
        let at = |y, m, d, h| Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap();
        assert_eq!(&*window(Period::Monthly, at(2026, 6, 30, 23)), "2026-06");
        assert_eq!(&*window(Period::Monthly, at(2026, 7, 1, 0)), "2026-07");
        assert_eq!(&*window(Period::Quarterly, at(2026, 3, 31, 23)), "2026-Q1");
        assert_eq!(&*window(Period::Quarterly, at(2026, 4, 1, 0)), "2026-Q2");
        assert_eq!(&*window(Period::Quarterly, at(2026, 12, 1, 0)), "2026-Q4");
        assert_eq!(&*window(Period::Yearly, at(2026, 12, 31, 23)), "2026");
        assert_eq!(&*window(Period::Lifetime, at(2026, 1, 1, 0)), "lifetime");
        // An offset is converted: 2026-07-01T01:00+02:00 is still June in UTC.
        let plus2 = chrono::DateTime::parse_from_rfc3339("2026-07-01T01:00:00+02:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(&*window(Period::Monthly, plus2), "2026-06");
    }
}
