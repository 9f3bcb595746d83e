//! Rating: one event against one resolved book version -> one fee per matching price.
//!
//! Contract: pure (no I/O, no locks, no clock); exact decimal arithmetic with overflow checks;
//! every fee is rounded once, at the end, by `money::round_fee`. An event is either fully priced
//! (every price of its `event_type` yields a fee) or rejected with one [`PricingError`]: a missing
//! or invalid volume, or a dimension combination no row covers, never becomes a free event.

use std::collections::BTreeMap;
use std::sync::Arc;

use rust_decimal::Decimal;

use super::book::{Basis, Price, ResolvedBook, Row, Tier, VolumePart};
use super::money::{self, parse_decimal};
use super::period::{self, PeriodPart};
use crate::domain::{DataValue, EventData, Fee, UsageEvent};

/// Why an event could not be priced. `code()` is stable and goes on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("tenant `{tenant}` has no price book (not in assignments.toml and no default)")]
    UnknownTenant { tenant: String },
    #[error("price book `{book}` has no price for event_type `{event_type}`")]
    UnknownEventType { book: String, event_type: String },
    #[error("price book `{book}` has no version in force at {occurred_at}")]
    NotYetEffective { book: String, occurred_at: String },
    #[error("price `{price_id}`: no dimension row matches {found}")]
    NoMatchingPrice { price_id: String, found: String },
    #[error("price `{price_id}`: volume field `{field}` is missing from the event data")]
    MissingVolume { price_id: String, field: String },
    #[error("price `{price_id}`: volume field `{field}` is invalid: {reason}")]
    InvalidVolume {
        price_id: String,
        field: String,
        reason: String,
    },
    #[error("price `{price_id}`: the amount overflows the decimal range")]
    AmountOverflow { price_id: String },
    /// A price with `tiering` needs the outbox's durable running totals (`ack = "durable"`).
    #[error("price `{price_id}` tiers over a period, which needs ack = \"durable\" (running totals are kept in the outbox)")]
    PeriodNeedsOutbox { price_id: String },
}

impl PricingError {
    pub fn code(&self) -> &'static str {
        match self {
            PricingError::UnknownTenant { .. } => "unknown_tenant",
            PricingError::UnknownEventType { .. } => "unknown_event_type",
            PricingError::NotYetEffective { .. } => "not_yet_effective",
            PricingError::NoMatchingPrice { .. } => "no_matching_price",
            PricingError::MissingVolume { .. } => "missing_volume",
            PricingError::InvalidVolume { .. } => "invalid_volume",
            PricingError::AmountOverflow { .. } => "amount_overflow",
            PricingError::PeriodNeedsOutbox { .. } => "period_needs_outbox",
        }
    }
}

/// Prices `event` with the version of `book` in force at its `occurred_at`, every running
/// total taken as zero (what the fees are before the outbox rates the period part).
pub(crate) fn price_event(
    book: &ResolvedBook,
    pricing_hash: &Arc<str>,
    event: &UsageEvent,
) -> Result<Vec<Fee>, PricingError> {
    price_event_parts(book, pricing_hash, event, &mut Vec::new())
}

/// As [`price_event`], and one [`PeriodPart`] per price with `tiering` into `periods`: the
/// fee at that index is provisional until the part is rated against its running total.
pub(crate) fn price_event_parts(
    book: &ResolvedBook,
    pricing_hash: &Arc<str>,
    event: &UsageEvent,
    periods: &mut Vec<PeriodPart>,
) -> Result<Vec<Fee>, PricingError> {
    let version =
        book.version_at(event.occurred_at)
            .ok_or_else(|| PricingError::NotYetEffective {
                book: book.name.to_string(),
                occurred_at: event.occurred_at.to_rfc3339(),
            })?;
    let prices = version
        .by_event
        .get(event.event_type.as_str())
        .ok_or_else(|| PricingError::UnknownEventType {
            book: book.name.to_string(),
            event_type: event.event_type.clone(),
        })?;
    let mut fees = Vec::with_capacity(prices.len());
    for price in prices.iter() {
        let rated = rate(price, &event.data)?;
        if let Some(tiering) = price.tiering {
            periods.push(PeriodPart {
                fee: fees.len(),
                price: Arc::clone(price),
                row: rated.row_index,
                volume: rated.volume,
                add: match tiering.basis {
                    Basis::Volume => rated.volume.unwrap_or(Decimal::ZERO),
                    Basis::Unit => Decimal::ONE,
                },
                window: period::window(tiering.period, event.occurred_at),
            });
        }
        fees.push(Fee {
            price_id: price.id.clone(),
            price_name: price.name.clone(),
            usage_type: price.usage_type,
            dimensions: rated.dimensions,
            volume_field: rated.volume.and(price.volume_field.clone()),
            volume: rated.volume,
            unit_price: rated.row_rated.unit_price,
            volume_rate: rated.row_rated.volume_rate,
            package_size: rated.row_rated.package_size,
            amount: rated.row_rated.amount,
            asset: price.asset.clone(),
            book: book.name.clone(),
            book_version: version.label.clone(),
            pricing_hash: pricing_hash.clone(),
        });
    }
    Ok(fees)
}

/// One price applied to one event's data, at a running total of zero.
pub(crate) struct Rated {
    pub row_index: usize,
    pub dimensions: BTreeMap<String, String>,
    pub volume: Option<Decimal>,
    pub row_rated: RowRated,
}

/// One row's rate applied to a quantity at a position on the running total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowRated {
    /// Exact: unit part plus every band of the volume part, clamped to `min_amount` /
    /// `max_amount`; not rounded.
    pub raw_amount: Decimal,
    /// `raw_amount` rounded once to the asset's precision: the fee.
    pub amount: Decimal,
    /// The unit price charged (a tier's own when it has one).
    pub unit_price: Option<Decimal>,
    pub volume_rate: Option<Decimal>,
    pub package_size: Option<Decimal>,
}

/// One band a quantity was rated in (what a quote shows).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BandUse {
    /// The band's index in `tiers`, and its bound (`null`: the open last band).
    pub tier: usize,
    pub up_to: Option<Decimal>,
    /// The part of the running total rated in this band: `(from, to]`.
    pub from: Decimal,
    pub to: Decimal,
    pub volume_rate: Decimal,
    /// Exact: the band's share at its rate (per package when the rate is), before any floor,
    /// cap or rounding.
    pub amount: Decimal,
}

pub(crate) fn rate(price: &Price, data: &EventData) -> Result<Rated, PricingError> {
    let (row_index, row) = match_row(price, data).ok_or_else(|| PricingError::NoMatchingPrice {
        price_id: price.id.to_string(),
        found: describe_dimensions(price, data),
    })?;
    let volume = match &row.rates.volume {
        Some(_) => Some(read_volume(price, data)?),
        None => None,
    };
    let row_rated = rate_row(price, row, volume, Decimal::ZERO, None)?;
    let dimensions = price
        .dimensions
        .iter()
        .zip(row.values.iter())
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.clone(), v.to_string())))
        .collect();
    Ok(Rated {
        row_index,
        dimensions,
        volume,
        row_rated,
    })
}

/// Rates `row` of `price` for quantity `q` (`None` for a unit-only row) when the running total
/// stands at `before` (zero without `tiering`): the tiers' bands, the unit part (a tier's own
/// unit price when the tier holding the quantity has one), the floor and the cap, then the one
/// rounding. Bands used are pushed onto `bands` when given.
pub fn rate_row(
    price: &Price,
    row: &Row,
    q: Option<Decimal>,
    before: Decimal,
    bands: Option<&mut Vec<BandUse>>,
) -> Result<RowRated, PricingError> {
    let overflow = || PricingError::AmountOverflow {
        price_id: price.id.to_string(),
    };
    let basis = price.tiering.map_or(Basis::Volume, |t| t.basis);
    let mut unit_price = row.rates.unit_price;
    let mut raw_amount = Decimal::ZERO;
    let mut volume_rate = None;
    let mut package_size = None;
    if let (Some(part), Some(q)) = (&row.rates.volume, q) {
        let out = volume_amount_at(part, q, before, basis, bands).ok_or_else(overflow)?;
        raw_amount = out.amount;
        volume_rate = out.rate;
        package_size = out.package_size;
        if out.tier_unit_price.is_some() {
            unit_price = out.tier_unit_price;
        }
    }
    raw_amount = raw_amount
        .checked_add(unit_price.unwrap_or(Decimal::ZERO))
        .ok_or_else(overflow)?;
    if let Some(min) = row.rates.min_amount {
        raw_amount = raw_amount.max(min);
    }
    if let Some(max) = row.rates.max_amount {
        raw_amount = raw_amount.min(max);
    }
    Ok(RowRated {
        raw_amount,
        // The one rounding of this fee.
        amount: money::round_fee(raw_amount, price.precision),
        unit_price,
        volume_rate,
        package_size,
    })
}

/// First row (most specific first) whose every non-wildcard value equals the event's value.
/// A dimension missing from the data matches only a wildcard.
fn match_row<'p>(price: &'p Price, data: &EventData) -> Option<(usize, &'p Row)> {
    price.rows.iter().enumerate().find(|(_, row)| {
        row.values
            .iter()
            .zip(price.dimensions.iter())
            .all(|(want, key)| match want {
                None => true,
                Some(want) => data
                    .get(key.as_str())
                    .is_some_and(|v| v.as_dimension() == **want),
            })
    })
}

fn describe_dimensions(price: &Price, data: &EventData) -> String {
    let parts: Vec<String> = price
        .dimensions
        .iter()
        .map(|k| match data.get(k.as_str()) {
            Some(v) => format!("{k}={}", v.as_dimension()),
            None => format!("{k} (absent)"),
        })
        .collect();
    parts.join(", ")
}

fn read_volume(price: &Price, data: &EventData) -> Result<Decimal, PricingError> {
    let field = price.volume_field.as_deref().unwrap_or_default();
    let invalid = |reason: String| PricingError::InvalidVolume {
        price_id: price.id.to_string(),
        field: field.to_owned(),
        reason,
    };
    let q = match data.get(field) {
        None => {
            return Err(PricingError::MissingVolume {
                price_id: price.id.to_string(),
                field: field.to_owned(),
            })
        }
        Some(DataValue::Number(d)) => *d,
        Some(DataValue::String(s)) => {
            parse_decimal(s, false).map_err(|e| invalid(e.to_string()))?
        }
        Some(DataValue::Bool(_)) => return Err(invalid("a boolean is not a quantity".into())),
    };
    if q.is_sign_negative() && !q.is_zero() {
        return Err(invalid(format!("{q} is negative")));
    }
    Ok(q)
}

/// The volume part of a fee: exact amount, the rate to show, the package size applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeOutcome {
    pub amount: Decimal,
    /// The single rate used; `None` for graduated tiers when the quantity spans several bands.
    pub rate: Option<Decimal>,
    pub package_size: Option<Decimal>,
    /// The unit price of the tier holding the quantity, if it has one.
    pub tier_unit_price: Option<Decimal>,
}

/// Exact, unrounded; `None` only on decimal overflow. `q` is non-negative.
#[cfg(test)]
pub(crate) fn volume_amount(part: &VolumePart, q: Decimal) -> Option<VolumeOutcome> {
    volume_amount_at(part, q, Decimal::ZERO, Basis::Volume, None)
}

/// The volume part for `q` when the running total stands at `before`: graduated tiers rate
/// the range `(before, before + q]`; bulk tiers rate all of q at the band `before + q` falls
/// in; on a `unit` basis the event is one unit, so its band is the one `before + 1` falls in
/// and all of q is rated there. Flat and package parts ignore `before`.
pub(crate) fn volume_amount_at(
    part: &VolumePart,
    q: Decimal,
    before: Decimal,
    basis: Basis,
    mut bands: Option<&mut Vec<BandUse>>,
) -> Option<VolumeOutcome> {
    let first_band = bands.as_ref().map_or(0, |b| b.len());
    let out = volume_amount_walk(part, q, before, basis, bands.as_deref_mut())?;
    // Bands are shown per package too when the rate is quoted per package.
    if let (Some(bands), Some(size)) = (bands, out.package_size) {
        for band in bands.iter_mut().skip(first_band) {
            band.amount = band.amount.checked_div(size)?;
        }
    }
    Some(out)
}

fn volume_amount_walk(
    part: &VolumePart,
    q: Decimal,
    before: Decimal,
    basis: Basis,
    bands: Option<&mut Vec<BandUse>>,
) -> Option<VolumeOutcome> {
    match part {
        VolumePart::Flat { rate, package_size } => Some(VolumeOutcome {
            amount: per_package(rate.checked_mul(q)?, *package_size)?,
            rate: Some(*rate),
            package_size: *package_size,
            tier_unit_price: None,
        }),
        VolumePart::Package { rate, package_size } => Some(VolumeOutcome {
            amount: rate.checked_mul(packages(q, *package_size)?)?,
            rate: Some(*rate),
            package_size: Some(*package_size),
            tier_unit_price: None,
        }),
        VolumePart::Tiered {
            tiers,
            package_size,
        } if basis == Basis::Volume => {
            let end = before.checked_add(q)?;
            let (sum, rate) = graduated(tiers, before, end, bands)?;
            Some(VolumeOutcome {
                amount: per_package(sum, *package_size)?,
                rate,
                package_size: *package_size,
                tier_unit_price: holding_tier(tiers, end)?.unit_price,
            })
        }
        VolumePart::Tiered {
            tiers,
            package_size,
        }
        | VolumePart::Bulk {
            tiers,
            package_size,
        } => {
            let at = match basis {
                Basis::Volume => before.checked_add(q)?,
                Basis::Unit => before.checked_add(Decimal::ONE)?,
            };
            let (index, tier) = tiers
                .iter()
                .enumerate()
                .find(|(_, t)| t.up_to.is_none_or(|u| at <= u))?;
            let amount = tier.volume_rate.checked_mul(q)?;
            if let Some(bands) = bands {
                bands.push(BandUse {
                    tier: index,
                    up_to: tier.up_to,
                    from: before,
                    to: at,
                    volume_rate: tier.volume_rate,
                    amount,
                });
            }
            Some(VolumeOutcome {
                amount: per_package(amount, *package_size)?,
                rate: Some(tier.volume_rate),
                package_size: *package_size,
                tier_unit_price: tier.unit_price,
            })
        }
    }
}

/// Rates quoted per package are prorated: amount / package_size. The quotient is carried at
/// `Decimal`'s 28 significant digits; a rounding tie at the asset precision is a terminating
/// decimal and so is exact here.
fn per_package(amount: Decimal, package_size: Option<Decimal>) -> Option<Decimal> {
    match package_size {
        Some(size) => amount.checked_div(size),
        None => Some(amount),
    }
}

/// ceil(q / size), computed exactly through the remainder (a 28-digit quotient could round a
/// tiny excess away).
pub(crate) fn packages(q: Decimal, size: Decimal) -> Option<Decimal> {
    let rem = q.checked_rem(size)?;
    let whole = q.checked_sub(rem)?.checked_div(size)?;
    if rem.is_zero() {
        Some(whole)
    } else {
        whole.checked_add(Decimal::ONE)
    }
}

/// The band a position falls in (`up_to` inclusive); the last band is open, so there is one.
fn holding_tier(tiers: &[Tier], at: Decimal) -> Option<&Tier> {
    tiers.iter().find(|t| t.up_to.is_none_or(|u| at <= u))
}

/// Graduated tiers over `(from, to]`: sum of each band's share x its rate; also the rate when
/// one band only (for an empty range, the rate of the band holding `to`).
fn graduated(
    tiers: &[Tier],
    from: Decimal,
    to: Decimal,
    mut bands: Option<&mut Vec<BandUse>>,
) -> Option<(Decimal, Option<Decimal>)> {
    let mut lower = Decimal::ZERO;
    let mut sum = Decimal::ZERO;
    let mut used = 0usize;
    let mut shown = holding_tier(tiers, to).map(|t| t.volume_rate);
    for (index, tier) in tiers.iter().enumerate() {
        let lo = lower.max(from);
        let hi = tier.up_to.map_or(to, |u| u.min(to));
        if hi > lo {
            let amount = hi.checked_sub(lo)?.checked_mul(tier.volume_rate)?;
            sum = sum.checked_add(amount)?;
            used += 1;
            shown = Some(tier.volume_rate);
            if let Some(bands) = bands.as_deref_mut() {
                bands.push(BandUse {
                    tier: index,
                    up_to: tier.up_to,
                    from: lo,
                    to: hi,
                    volume_rate: tier.volume_rate,
                    amount,
                });
            }
        }
        match tier.up_to {
            Some(u) if u < to => lower = u,
            _ => break,
        }
    }
    Some((sum, if used <= 1 { shown } else { None }))
}

#[cfg(test)]
mod tests {
    use super::super::book::PricingModel;
    use super::*;
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    fn tiers(spec: &[(Option<Decimal>, Decimal)]) -> Box<[Tier]> {
        spec.iter()
            .map(|(u, r)| Tier {
                up_to: *u,
                volume_rate: *r,
                unit_price: None,
            })
            .collect()
    }

    fn standard_tiers() -> Box<[Tier]> {
        tiers(&[
            (Some(dec!(100)), dec!(0.10)),
            (Some(dec!(1000)), dec!(0.05)),
            (None, dec!(0.01)),
        ])
    }

    #[test]
    fn graduated_and_bulk_at_boundaries() {
        let grad = VolumePart::Tiered {
            tiers: standard_tiers(),
            package_size: None,
        };
        let bulk = VolumePart::Bulk {
            tiers: standard_tiers(),
            package_size: None,
        };
        let g = |q| volume_amount(&grad, q).unwrap();
        let b = |q| volume_amount(&bulk, q).unwrap();
        assert_eq!(g(dec!(100)).amount, dec!(10.00));
        assert_eq!(g(dec!(100)).rate, Some(dec!(0.10)));
        assert_eq!(g(dec!(101)).amount, dec!(10.05));
        assert_eq!(g(dec!(101)).rate, None);
        assert_eq!(b(dec!(100)).amount, dec!(10.00));
        assert_eq!(b(dec!(101)).amount, dec!(5.05));
        assert_eq!(b(dec!(1001)).rate, Some(dec!(0.01)));
        assert_eq!(packages(dec!(0), dec!(10)), Some(dec!(0)));
        assert_eq!(packages(dec!(10), dec!(10)), Some(dec!(1)));
        assert_eq!(packages(dec!(10.0000001), dec!(10)), Some(dec!(2)));
    }

    fn qty() -> impl Strategy<Value = Decimal> {
        // Up to 10^12 with up to 6 decimals.
        (0u64..1_000_000_000_000_000_000u64, 0u32..=6)
            .prop_map(|(m, s)| Decimal::new(m as i64 / 1000, s))
    }

    fn rate_val() -> impl Strategy<Value = Decimal> {
        (0i64..10_000_000, 0u32..=8).prop_map(|(m, s)| Decimal::new(m, s))
    }

    fn tier_set() -> impl Strategy<Value = Box<[Tier]>> {
        proptest::collection::vec((1i64..1_000_000, 0u32..=3, rate_val()), 1..5).prop_map(|v| {
            let mut bound = Decimal::ZERO;
            let n = v.len();
            v.into_iter()
                .enumerate()
                .map(|(i, (step, s, r))| {
                    bound += Decimal::new(step, s);
                    Tier {
                        up_to: (i + 1 < n).then_some(bound),
                        volume_rate: r,
                        unit_price: None,
                    }
                })
                .collect()
        })
    }

    fn size() -> impl Strategy<Value = Decimal> {
        (1i64..10_000_000, 0u32..=3).prop_map(|(m, s)| Decimal::new(m, s))
    }

    /// Models that must be monotonic in q (everything but bulk).
    fn monotone_part() -> impl Strategy<Value = VolumePart> {
        prop_oneof![
            (rate_val(), proptest::option::of(size()))
                .prop_map(|(rate, package_size)| VolumePart::Flat { rate, package_size }),
            (rate_val(), size())
                .prop_map(|(rate, package_size)| VolumePart::Package { rate, package_size }),
            (tier_set(), proptest::option::of(size())).prop_map(|(tiers, package_size)| {
                VolumePart::Tiered {
                    tiers,
                    package_size,
                }
            }),
        ]
    }

    /// Every model: the monotone ones (three arms, hence weight 3) plus bulk.
    fn part() -> impl Strategy<Value = VolumePart> {
        prop_oneof![
            3 => monotone_part(),
            1 => (tier_set(), proptest::option::of(size())).prop_map(|(tiers, package_size)| {
                VolumePart::Bulk {
                    tiers,
                    package_size,
                }
            }),
        ]
    }

    fn period_price(
        model: PricingModel,
        tiers: Box<[Tier]>,
        basis: Basis,
        precision: u32,
    ) -> Price {
        let volume = match model {
            PricingModel::Bulk => VolumePart::Bulk {
                tiers,
                package_size: None,
            },
            _ => VolumePart::Tiered {
                tiers,
                package_size: None,
            },
        };
        Price {
            id: "p".into(),
            name: None,
            event_type: "e".into(),
            usage_type: crate::domain::UsageType::Volume,
            model,
            volume_field: Some("q".into()),
            asset: "X".into(),
            precision,
            dimensions: Box::new([]),
            rows: Box::new([Row {
                values: Box::new([]),
                specificity: 0,
                rates: super::super::book::Rates {
                    unit_price: None,
                    volume: Some(volume),
                    min_amount: None,
                    max_amount: None,
                },
            }]),
            tiering: Some(super::super::book::Tiering {
                period: super::super::book::Period::Monthly,
                basis,
            }),
        }
    }

    #[test]
    fn period_walk_starts_at_the_running_total() {
        let price = period_price(PricingModel::Tiered, standard_tiers(), Basis::Volume, 2);
        let row = &price.rows[0];
        let at = |q, before| rate_row(&price, row, Some(q), before, None).unwrap();
        // (90, 110]: 10 at 0.10 + 10 at 0.05, two bands, no single rate.
        let mut bands = Vec::new();
        let r = rate_row(&price, row, Some(dec!(20)), dec!(90), Some(&mut bands)).unwrap();
        assert_eq!(r.amount, dec!(1.50));
        assert_eq!(r.volume_rate, None);
        assert_eq!(bands.len(), 2);
        assert_eq!((bands[0].from, bands[0].to), (dec!(90), dec!(100)));
        assert_eq!((bands[1].from, bands[1].to), (dec!(100), dec!(110)));
        // Past the first band entirely.
        assert_eq!(at(dec!(10), dec!(100)).amount, dec!(0.50));
        assert_eq!(at(dec!(10), dec!(100)).volume_rate, Some(dec!(0.05)));
        // Into the open band.
        assert_eq!(at(dec!(10), dec!(995)).amount, dec!(0.30));
        // Zero quantity: nothing, at the rate of the band holding the total.
        assert_eq!(at(dec!(0), dec!(500)).amount, dec!(0));
        assert_eq!(at(dec!(0), dec!(500)).volume_rate, Some(dec!(0.05)));

        let bulk = period_price(PricingModel::Bulk, standard_tiers(), Basis::Volume, 2);
        let b = |q, before| rate_row(&bulk, &bulk.rows[0], Some(q), before, None).unwrap();
        // The band of total + q, for all of q.
        assert_eq!(b(dec!(10), dec!(90)).amount, dec!(1.00));
        assert_eq!(b(dec!(10), dec!(91)).amount, dec!(0.50));
        assert_eq!(b(dec!(10), dec!(991)).amount, dec!(0.10));

        // Unit basis: the event is unit number total + 1, all of q at that band.
        let unit = period_price(PricingModel::Tiered, standard_tiers(), Basis::Unit, 2);
        let u = |q, before| rate_row(&unit, &unit.rows[0], Some(q), before, None).unwrap();
        assert_eq!(u(dec!(50), dec!(99)).amount, dec!(5.00));
        assert_eq!(u(dec!(50), dec!(100)).amount, dec!(2.50));
    }

    fn small_qty() -> impl Strategy<Value = Decimal> {
        // Up to 10^9 with up to 3 decimals: with rates of up to 6 decimals every product and
        // sum stays within Decimal's 28 digits, so sums are exact.
        (0i64..1_000_000_000_000, 0u32..=3).prop_map(|(m, s)| Decimal::new(m, s))
    }

    fn small_tiers() -> impl Strategy<Value = Box<[Tier]>> {
        proptest::collection::vec(
            (1i64..1_000_000, 0u32..=3, 0i64..100_000_000, 0u32..=6),
            1..5,
        )
        .prop_map(|v| {
            let mut bound = Decimal::ZERO;
            let n = v.len();
            v.into_iter()
                .enumerate()
                .map(|(i, (step, s, r, rs))| {
                    bound += Decimal::new(step, s);
                    Tier {
                        up_to: (i + 1 < n).then_some(bound),
                        volume_rate: Decimal::new(r, rs),
                        unit_price: None,
                    }
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn amount_is_non_negative(p in part(), q in qty(), prec in 0u32..=8) {
            let out = volume_amount(&p, q).unwrap();
            prop_assert!(out.amount >= Decimal::ZERO);
            prop_assert!(money::round_fee(out.amount, prec) >= Decimal::ZERO);
        }

        #[test]
        fn monotonic_except_bulk(p in monotone_part(), a in qty(), b in qty(), prec in 0u32..=8) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let x = volume_amount(&p, lo).unwrap().amount;
            let y = volume_amount(&p, hi).unwrap().amount;
            prop_assert!(x <= y, "{x} > {y} for {lo} <= {hi}");
            prop_assert!(money::round_fee(x, prec) <= money::round_fee(y, prec));
        }

        #[test]
        fn graduated_is_continuous_at_every_boundary(t in tier_set(), k in 1i64..10) {
            // Piecewise linear with no jump: just below a bound the slope is the band's rate,
            // just above it the next band's rate, and both one-sided limits meet at the bound.
            let part = VolumePart::Tiered { tiers: t.clone(), package_size: None };
            // Below the narrowest band (0.001) and coarse enough that every sum stays within
            // Decimal's 28 significant digits, so the equalities are exact.
            let eps = Decimal::new(k, 4);
            for (i, tier) in t.iter().enumerate() {
                let Some(u) = tier.up_to else { continue };
                let at = volume_amount(&part, u).unwrap().amount;
                let below = volume_amount(&part, u - eps).unwrap().amount;
                let above = volume_amount(&part, u + eps).unwrap().amount;
                prop_assert_eq!(at - below, eps * tier.volume_rate);
                prop_assert_eq!(above - at, eps * t[i + 1].volume_rate);
            }
        }

        #[test]
        fn package_is_ceil_times_rate(rate in rate_val(), size in size(), n in 0i64..100_000, f in 0i64..10_000) {
            // q = (n + f/10^4) x size: exactly n packages when f = 0, else n + 1.
            let q = (Decimal::from(n) + Decimal::new(f, 4)) * size;
            let out = volume_amount(&VolumePart::Package { rate, package_size: size }, q).unwrap();
            let expected = Decimal::from(n) + if f == 0 { Decimal::ZERO } else { Decimal::ONE };
            prop_assert_eq!(out.amount, expected * rate);
        }

        #[test]
        fn rounding_happens_once(t in tier_set(), q in qty(), unit in proptest::option::of(rate_val()), prec in 0u32..=4) {
            // Sum every band unrounded (computed independently here), add the unit part, round
            // once: that must be the fee amount the engine produces.
            let mut lower = Decimal::ZERO;
            let mut bands = Vec::new();
            for tier in t.iter() {
                let upper = tier.up_to.map_or(q, |u| u.min(q));
                if upper <= lower { break; }
                bands.push((upper - lower) * tier.volume_rate);
                match tier.up_to { Some(u) => lower = u, None => break }
            }
            let expected = money::round_fee(bands.iter().copied().sum::<Decimal>() + unit.unwrap_or_default(), prec);
            let price = Price {
                id: "p".into(), name: None, event_type: "e".into(),
                usage_type: if unit.is_some() { crate::domain::UsageType::UnitAndVolume } else { crate::domain::UsageType::Volume },
                model: super::super::book::PricingModel::Tiered, volume_field: Some("q".into()),
                asset: "X".into(), precision: prec, dimensions: Box::new([]),
                rows: Box::new([Row { values: Box::new([]), specificity: 0, rates: super::super::book::Rates {
                    unit_price: unit, volume: Some(VolumePart::Tiered { tiers: t.clone(), package_size: None }),
                    min_amount: None, max_amount: None } }]),
                tiering: None,
            };
            let mut data = EventData::new();
            data.insert("q".into(), DataValue::Number(q));
            let rated = rate(&price, &data).unwrap();
            prop_assert_eq!(money::round_fee(rated.row_rated.raw_amount, prec), expected);
        }

        #[test]
        fn graduated_over_a_period_is_split_invariant(
            t in small_tiers(),
            split in proptest::collection::vec(small_qty(), 1..12),
            prec in 0u32..=6,
        ) {
            // One customer's events in one window: rated one after the other against the
            // running total, their exact fees sum to the exact fee of one event carrying the
            // summed quantity, however it is split.
            let price = period_price(PricingModel::Tiered, t, Basis::Volume, prec);
            let row = &price.rows[0];
            let mut total = Decimal::ZERO;
            let mut exact = Decimal::ZERO;
            let mut rounded = Decimal::ZERO;
            for q in &split {
                let r = rate_row(&price, row, Some(*q), total, None).unwrap();
                exact += r.raw_amount;
                rounded += r.amount;
                total += *q;
            }
            let whole = rate_row(&price, row, Some(total), Decimal::ZERO, None).unwrap();
            prop_assert_eq!(exact, whole.raw_amount);
            // Each event is rounded once: at most half a unit of the precision apart each.
            let half = Decimal::new(5, prec + 1);
            let bound = half * Decimal::from(split.len());
            prop_assert!((rounded - whole.raw_amount).abs() <= bound,
                "{rounded} vs {} (bound {bound})", whole.raw_amount);
        }
    }
}
