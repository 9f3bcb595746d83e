//! The validated, in-memory form of price books: what the engine reads.
//!
//! Contract: a value of these types has passed every load-time check in `load.rs` (rates
//! non-negative, tiers increasing with one open last tier, package sizes positive, dimension
//! rows sorted by specificity with no ambiguous ties, assets known). The engine relies on that
//! and never re-checks. Immutable once built; shared through `Arc`.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::domain::UsageType;

/// Credyt's `pricing_model`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PricingModel {
    Flat,
    Tiered,
    Bulk,
    Package,
}

impl PricingModel {
    pub fn as_str(self) -> &'static str {
        match self {
            PricingModel::Flat => "flat",
            PricingModel::Tiered => "tiered",
            PricingModel::Bulk => "bulk",
            PricingModel::Package => "package",
        }
    }
}

/// One tier band: covers quantities above the previous band's `up_to` up to and including its
/// own `up_to` (`None` = open, only on the last band).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tier {
    pub up_to: Option<Decimal>,
    pub volume_rate: Decimal,
    /// Charged once by the tier that holds the quantity (`unit_and_volume` prices only); it
    /// replaces the price's own `unit_price` for that event.
    pub unit_price: Option<Decimal>,
}

/// Credyt's `tiering.period`: when a running total starts again from zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Period {
    Lifetime,
    Monthly,
    Quarterly,
    Yearly,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Lifetime => "lifetime",
            Period::Monthly => "monthly",
            Period::Quarterly => "quarterly",
            Period::Yearly => "yearly",
        }
    }
}

/// Credyt's `tiering.basis`: what a running total counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basis {
    /// The quantity of `volume_field`, summed.
    Volume,
    /// Events: each adds one.
    Unit,
}

impl Basis {
    pub fn as_str(self) -> &'static str {
        match self {
            Basis::Volume => "volume",
            Basis::Unit => "unit",
        }
    }
}

/// Tiers that apply to a running total per (tenant, customer, price, period window) instead
/// of one event's quantity (see `pricing::period`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiering {
    pub period: Period,
    pub basis: Basis,
}

/// The volume part of a rate, by pricing model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumePart {
    /// `volume_rate` x q, or `volume_rate` x q / `package_size` (prorated packages).
    Flat {
        rate: Decimal,
        package_size: Option<Decimal>,
    },
    /// `volume_rate` x ceil(q / `package_size`).
    Package {
        rate: Decimal,
        package_size: Decimal,
    },
    /// Graduated: each band's share of q at the band's rate (then / `package_size` if set).
    Tiered {
        tiers: Box<[Tier]>,
        package_size: Option<Decimal>,
    },
    /// Whole q at the rate of the band q falls in (then / `package_size` if set).
    Bulk {
        tiers: Box<[Tier]>,
        package_size: Option<Decimal>,
    },
}

/// The rate of one dimension row (or of a price without dimensions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rates {
    pub unit_price: Option<Decimal>,
    pub volume: Option<VolumePart>,
    /// Per-event floor and cap, applied to the exact amount before the one rounding.
    pub min_amount: Option<Decimal>,
    pub max_amount: Option<Decimal>,
}

/// One dimension row: a value (or wildcard `None`) per price dimension, in the price's
/// `dimensions` order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub values: Box<[Option<Box<str>>]>,
    /// Number of non-wildcard values: the more, the more specific.
    pub specificity: usize,
    pub rates: Rates,
}

/// One price of a book version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Price {
    pub id: Arc<str>,
    pub name: Option<Arc<str>>,
    pub event_type: String,
    pub usage_type: UsageType,
    pub model: PricingModel,
    pub volume_field: Option<Arc<str>>,
    pub asset: Arc<str>,
    /// The asset's precision, copied here so rating needs no second lookup.
    pub precision: u32,
    /// Data keys that select a row (Credyt's `billable_dimensions`); empty = one plain row.
    pub dimensions: Box<[String]>,
    /// Sorted by specificity, most specific first; at most one row per specificity can match
    /// any event (checked at load), so the first match is the answer.
    pub rows: Box<[Row]>,
    /// Tiers over a running total (tiered and bulk prices only); `None`: per event.
    pub tiering: Option<Tiering>,
}

/// A book as in force over one interval: its own prices merged over its parent's.
#[derive(Debug)]
pub struct ResolvedVersion {
    pub effective_from: DateTime<Utc>,
    /// Stamped on fees as `book_version`.
    pub label: Arc<str>,
    /// Every price in force, in book order (parent's first).
    pub prices: Box<[Arc<Price>]>,
    /// Prices by `event_type`, in book order.
    pub by_event: HashMap<String, Box<[Arc<Price>]>>,
}

/// A book's whole timeline, sorted by `effective_from`.
#[derive(Debug)]
pub struct ResolvedBook {
    pub name: Arc<str>,
    pub timeline: Box<[ResolvedVersion]>,
}

impl ResolvedBook {
    /// The version in force at `at`: the last one with `effective_from <= at` (inclusive at
    /// the switch instant, compared exactly to the nanosecond).
    pub fn version_at(&self, at: DateTime<Utc>) -> Option<&ResolvedVersion> {
        let idx = self.timeline.partition_point(|v| v.effective_from <= at);
        idx.checked_sub(1).and_then(|i| self.timeline.get(i))
    }
}
