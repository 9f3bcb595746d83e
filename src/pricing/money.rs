//! Assets, exact decimal literals, and the one rounding rule.
//!
//! Contract: every fee amount is rounded exactly once, by [`round_fee`], to its asset's declared
//! precision with "round half away from zero" (the Credyt emulator's rule, API.md §12.11).
//! Nothing else in the crate rounds money. Decimal text is parsed here without ever passing
//! through a float: `1.005` stays `1.005` and `9007199254740993` stays odd.

use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};

/// Largest precision (decimal places) an asset may declare. Leaves room in `Decimal`'s 28
/// digits of scale for rates and volumes with many decimals.
pub const MAX_PRECISION: u32 = 18;

/// Precision of the predeclared fiat assets (`USD`, `EUR`) unless `assets.toml` says otherwise:
/// Credyt's fiat balances carry 6 decimals, so sub-cent token fees are not rounded away.
pub const DEFAULT_FIAT_PRECISION: u32 = 6;

/// Fiat assets that exist without being declared.
pub const BUILTIN_ASSETS: [&str; 2] = ["USD", "EUR"];

/// The one rounding rule: round half away from zero to `precision` decimal places.
///
/// Called once per fee, on the unrounded total of all its parts (unit part + every band).
pub fn round_fee(amount: Decimal, precision: u32) -> Decimal {
    amount.round_dp_with_strategy(precision, RoundingStrategy::MidpointAwayFromZero)
}

/// Why decimal text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecimalTextError {
    #[error("`{0}` is not a finite decimal number")]
    NotANumber(String),
    #[error("`{0}` cannot be represented exactly (more than 28 decimal places or out of range)")]
    NotRepresentable(String),
}

impl DecimalTextError {
    pub fn code(&self) -> &'static str {
        match self {
            DecimalTextError::NotANumber(_) => "invalid_decimal",
            DecimalTextError::NotRepresentable(_) => "precision_overflow",
        }
    }
}

/// Parses decimal text exactly: optional sign, digits with an optional fraction, optional
/// exponent (`1.25e-6`). `_` digit separators are accepted only when `allow_underscores`
/// (TOML literals; the TOML parser has already checked they sit between digits).
/// Refuses `inf`, `nan`, hex, empty text, whitespace, and anything that would be rounded.
pub fn parse_decimal(text: &str, allow_underscores: bool) -> Result<Decimal, DecimalTextError> {
    let cleaned: std::borrow::Cow<'_, str> = if allow_underscores && text.contains('_') {
        text.replace('_', "").into()
    } else {
        text.into()
    };
    let s: &str = &cleaned;
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let well_formed = {
        let body = mantissa.strip_prefix(['+', '-']).unwrap_or(mantissa);
        let mut parts = body.splitn(2, '.');
        let int = parts.next().unwrap_or("");
        let frac = parts.next();
        !int.is_empty()
            && int.bytes().all(|b| b.is_ascii_digit())
            && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
    };
    if !well_formed {
        return Err(DecimalTextError::NotANumber(text.to_owned()));
    }
    let not_repr = || DecimalTextError::NotRepresentable(text.to_owned());
    let mut value = Decimal::from_str_exact(mantissa).map_err(|_| not_repr())?;
    if let Some(exp) = exponent {
        let exp_body = exp.strip_prefix(['+', '-']).unwrap_or(exp);
        if exp_body.is_empty() || !exp_body.bytes().all(|b| b.is_ascii_digit()) {
            return Err(DecimalTextError::NotANumber(text.to_owned()));
        }
        let exp: i64 = i64::from_str(exp).map_err(|_| not_repr())?;
        if exp < 0 {
            let scale = i64::from(value.scale()) - exp;
            if scale > 28 {
                // Trailing zeros in the mantissa may still make it exact.
                value = value.normalize();
                let scale = i64::from(value.scale()) - exp;
                if scale > 28 {
                    return Err(not_repr());
                }
                value.set_scale(scale as u32).map_err(|_| not_repr())?;
            } else {
                value.set_scale(scale as u32).map_err(|_| not_repr())?;
            }
        } else {
            for _ in 0..exp.min(40) {
                value = value.checked_mul(Decimal::TEN).ok_or_else(not_repr)?;
            }
            if exp > 40 && !value.is_zero() {
                return Err(not_repr());
            }
        }
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn parses_exactly() {
        assert_eq!(parse_decimal("1.005", false).unwrap(), dec!(1.005));
        assert_eq!(parse_decimal("1_000_000", true).unwrap(), dec!(1000000));
        assert_eq!(parse_decimal("1.25e-6", false).unwrap(), dec!(0.00000125));
        assert_eq!(parse_decimal("1.5E3", false).unwrap(), dec!(1500));
        assert_eq!(parse_decimal("-0.5", false).unwrap(), dec!(-0.5));
        assert_eq!(
            parse_decimal("9007199254740993", false).unwrap(),
            Decimal::from(9_007_199_254_740_993_i64)
        );
        for bad in [
            "inf", "nan", "+inf", "", "1.", ".5", "1e", "0x10", " 1", "1_0", "abc", "1.2.3",
        ] {
            assert!(parse_decimal(bad, false).is_err(), "{bad}");
        }
        assert!(matches!(
            parse_decimal("0.00000000000000000000000000001", false),
            Err(DecimalTextError::NotRepresentable(_))
        ));
        assert!(parse_decimal("1e-29", false).is_err());
        assert!(parse_decimal("1e30", false).is_err());
    }

    #[test]
    fn rounds_half_away_from_zero() {
        assert_eq!(round_fee(dec!(1.005), 2), dec!(1.01));
        assert_eq!(round_fee(dec!(1.015), 2), dec!(1.02));
        assert_eq!(round_fee(dec!(1.0049999), 2), dec!(1.00));
        assert_eq!(round_fee(dec!(0.0000005), 6), dec!(0.000001));
        assert_eq!(round_fee(dec!(2.5), 0), dec!(3));
    }
}
