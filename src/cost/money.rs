//! Money as integer micro-dollars.

use std::fmt;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Sub};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, excerpt};

/// An amount of US dollars in integer micro-dollars (1 USD = 1,000,000).
///
/// Every sum, budget and report in [`cost`](crate::cost) is integer arithmetic on this type;
/// no dollar amount is ever an `f64` sum. It serializes as the integer number of micro-dollars.
///
/// ```
/// use pupkit::cost::MicroUsd;
///
/// let price: MicroUsd = "0.02".parse()?;
/// assert_eq!(price.micros(), 20_000);
/// assert_eq!(price.to_string(), "$0.020000");
/// # Ok::<(), pupkit::Error>(())
/// ```
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct MicroUsd(i64);

/// Micro-dollars per dollar.
const PER_USD: i64 = 1_000_000;

impl MicroUsd {
    /// Zero dollars.
    pub const ZERO: MicroUsd = MicroUsd(0);

    /// An amount of micro-dollars.
    pub const fn from_micros(micros: i64) -> Self {
        MicroUsd(micros)
    }

    /// A whole number of dollars.
    pub const fn from_dollars(dollars: i64) -> Self {
        MicroUsd(dollars.saturating_mul(PER_USD))
    }

    /// Converts a dollar amount given as a float (from JSON, say), rounded to the nearest
    /// micro-dollar. Rejects NaN, infinities and amounts beyond ±9 trillion dollars.
    pub fn try_from_usd(dollars: f64) -> Result<Self> {
        const LIMIT: f64 = 9.0e12;
        if !dollars.is_finite() || dollars.abs() > LIMIT {
            return Err(Error::invalid(
                "amount",
                format!("{dollars} is not a dollar amount between -9e12 and 9e12"),
            ));
        }
        Ok(MicroUsd((dollars * PER_USD as f64).round() as i64))
    }

    /// The amount in micro-dollars.
    pub const fn micros(self) -> i64 {
        self.0
    }

    /// The amount in dollars as a float, for display and JSON only (never for sums).
    pub fn as_usd_f64(self) -> f64 {
        self.0 as f64 / PER_USD as f64
    }

    /// True when the amount is below zero.
    pub const fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// The amount as a plain decimal, `"12.345600"`, for CSV cells.
    pub fn to_decimal_string(self) -> String {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        format!("{sign}{}.{:06}", abs / PER_USD as u64, abs % PER_USD as u64)
    }

    /// `self - other`, never below zero.
    pub fn saturating_sub(self, other: MicroUsd) -> MicroUsd {
        MicroUsd(self.0.saturating_sub(other.0)).max(MicroUsd::ZERO)
    }

    /// `self * numerator / denominator`, rounded half away from zero, in 128-bit arithmetic.
    /// `None` when `denominator` is zero.
    pub fn mul_div(self, numerator: i64, denominator: i64) -> Option<MicroUsd> {
        if denominator == 0 {
            return None;
        }
        Some(MicroUsd(round_div(
            self.0 as i128 * numerator as i128,
            denominator as i128,
        )))
    }
}

/// `numerator / denominator` rounded half away from zero, clamped to `i64`.
pub(crate) fn round_div(numerator: i128, denominator: i128) -> i64 {
    let (numerator, denominator) = if denominator < 0 {
        (-numerator, -denominator)
    } else {
        (numerator, denominator)
    };
    let half = denominator / 2;
    let rounded = if numerator >= 0 {
        (numerator + half) / denominator
    } else {
        (numerator - half) / denominator
    };
    rounded.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

impl fmt::Display for MicroUsd {
    /// `$12.345600`: dollars with all six decimals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let decimal = self.to_decimal_string();
        match decimal.strip_prefix('-') {
            Some(abs) => write!(f, "-${abs}"),
            None => write!(f, "${decimal}"),
        }
    }
}

impl std::str::FromStr for MicroUsd {
    type Err = Error;

    /// Parses a decimal dollar amount exactly: `"10"`, `"0.02"`, `"-1.5"`, `"$3.25"`. At most
    /// six decimals; no exponent.
    fn from_str(text: &str) -> Result<Self> {
        let bad = |why: &str| Error::invalid("amount", format!("{:?} {why}", excerpt(text)));
        let trimmed = text.trim();
        let (negative, rest) = match trimmed.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        let rest = rest.strip_prefix('$').unwrap_or(rest);
        let (whole, fraction) = rest.split_once('.').unwrap_or((rest, ""));
        if whole.is_empty() && fraction.is_empty() {
            return Err(bad("is not a dollar amount"));
        }
        if !whole.bytes().all(|b| b.is_ascii_digit())
            || !fraction.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad("is not a decimal dollar amount"));
        }
        if fraction.len() > 6 {
            return Err(bad("has more than six decimals"));
        }
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad("is too large"))?
        };
        let fraction_micros: i64 = format!("{fraction:0<6}").parse().unwrap_or(0);
        let micros = whole
            .checked_mul(PER_USD)
            .and_then(|w| w.checked_add(fraction_micros))
            .ok_or_else(|| bad("is too large"))?;
        Ok(MicroUsd(if negative { -micros } else { micros }))
    }
}

impl Add for MicroUsd {
    type Output = MicroUsd;
    fn add(self, other: MicroUsd) -> MicroUsd {
        MicroUsd(self.0.saturating_add(other.0))
    }
}

impl AddAssign for MicroUsd {
    fn add_assign(&mut self, other: MicroUsd) {
        self.0 = self.0.saturating_add(other.0);
    }
}

impl Sub for MicroUsd {
    type Output = MicroUsd;
    fn sub(self, other: MicroUsd) -> MicroUsd {
        MicroUsd(self.0.saturating_sub(other.0))
    }
}

impl Sum for MicroUsd {
    fn sum<I: Iterator<Item = MicroUsd>>(iter: I) -> MicroUsd {
        iter.fold(MicroUsd::ZERO, |a, b| a + b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimals_exactly() {
        assert_eq!("10".parse::<MicroUsd>().unwrap().micros(), 10_000_000);
        assert_eq!("0.000001".parse::<MicroUsd>().unwrap().micros(), 1);
        assert_eq!("$3.25".parse::<MicroUsd>().unwrap().micros(), 3_250_000);
        assert_eq!("-1.5".parse::<MicroUsd>().unwrap().micros(), -1_500_000);
        assert_eq!(".5".parse::<MicroUsd>().unwrap().micros(), 500_000);
        for bad in [
            "",
            "abc",
            "1.2345678",
            "1e3",
            "1.2.3",
            "99999999999999999999",
        ] {
            let error = bad.parse::<MicroUsd>().unwrap_err();
            assert!(error.is_invalid_input(), "{bad:?} -> {error}");
        }
    }

    #[test]
    fn displays_with_six_decimals() {
        assert_eq!(MicroUsd::from_micros(12_345_600).to_string(), "$12.345600");
        assert_eq!(MicroUsd::from_micros(-5).to_string(), "-$0.000005");
        assert_eq!(MicroUsd::from_micros(7).to_decimal_string(), "0.000007");
    }

    #[test]
    fn floats_round_to_the_nearest_micro_and_reject_nan() {
        assert_eq!(MicroUsd::try_from_usd(0.1).unwrap().micros(), 100_000);
        assert_eq!(MicroUsd::try_from_usd(1e-7).unwrap().micros(), 0);
        assert!(MicroUsd::try_from_usd(f64::NAN).is_err());
        assert!(MicroUsd::try_from_usd(1e20).is_err());
    }

    #[test]
    fn mul_div_rounds_half_away_from_zero() {
        assert_eq!(MicroUsd::from_micros(10).mul_div(1, 4), Some(MicroUsd(3)));
        assert_eq!(MicroUsd::from_micros(-10).mul_div(1, 4), Some(MicroUsd(-3)));
        assert_eq!(MicroUsd::from_micros(10).mul_div(1, 0), None);
    }
}
