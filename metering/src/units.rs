//! Money as text and as token units, in one place: dollar strings in and out (config, agents,
//! people), pico-dollars inside, and the 6-decimal base units of the TIP-20 stablecoins on
//! chain. One base unit is exactly 1,000,000 p$, so base units → p$ is exact; the other way
//! rounds down. Floats never hold money.

use serde::{Deserialize, Deserializer};

use crate::money::{MoneyError, PICOS_PER_USD, Picos};
use crate::store::MAX_OP_AMOUNT;

/// p$ per on-chain base unit (6-decimal token).
pub const PICOS_PER_BASE_UNIT: i64 = 1_000_000;
/// Base units per dollar.
pub const BASE_UNITS_PER_USD: u128 = 1_000_000;

const _: () = assert!(PICOS_PER_USD == PICOS_PER_BASE_UNIT * 1_000_000);

/// Parses a dollar amount such as `"0.05"` or `"12.5"` into p$, exactly (up to 12 decimals).
pub fn parse_usd(text: &str) -> Result<Picos, MoneyError> {
    Picos::parse_usd(text)
}

/// p$ as exact dollars with trailing zeros trimmed: `12.5`, `0.0000005`, `-3`.
pub fn format_usd(picos: i64) -> String {
    Picos(picos).to_string()
}

/// p$ as dollars with exactly 6 decimals, rounded toward zero (what agents read): `4.950000`.
pub fn format_usd6(picos: i64) -> String {
    let micros = picos / PICOS_PER_BASE_UNIT;
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    format!("{sign}{}.{:06}", m / 1_000_000, m % 1_000_000)
}

/// Base units → p$; `None` when the amount is too large for one money-core operation
/// ([`MAX_OP_AMOUNT`], about $9,007).
pub fn base_to_picos(base: u128) -> Option<i64> {
    let picos = base.checked_mul(PICOS_PER_BASE_UNIT as u128)?;
    let picos = i64::try_from(picos).ok()?;
    (picos <= MAX_OP_AMOUNT).then_some(picos)
}

/// p$ → whole base units, rounding down (the remainder, under $0.000001, is not representable
/// on chain).
pub fn picos_to_base(picos: i64) -> u128 {
    u128::try_from(picos.max(0) / PICOS_PER_BASE_UNIT).unwrap_or(0)
}

/// Parses a dollar amount such as `5`, `0.25` or `12.500000` into base units. At most 6
/// decimals, no sign, no exponent; `max_usd` bounds it.
pub fn parse_usd_base(text: &str, max_usd: u64) -> Result<u128, String> {
    let t = text.trim();
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !(frac.is_empty() || digits(frac)) || (t.contains('.') && frac.is_empty())
    {
        return Err(format!(
            "'{text}' is not a dollar amount (write it like 5 or 0.25)"
        ));
    }
    if frac.len() > 6 {
        return Err(format!(
            "'{text}' has more than 6 decimals (the smallest amount is $0.000001)"
        ));
    }
    let whole: u128 = whole
        .parse()
        .map_err(|_| format!("'{text}' is too large"))?;
    let frac_units: u128 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}")
            .parse()
            .map_err(|_| format!("'{text}' is not a dollar amount"))?
    };
    let base = whole
        .checked_mul(BASE_UNITS_PER_USD)
        .and_then(|w| w.checked_add(frac_units))
        .ok_or_else(|| format!("'{text}' is too large"))?;
    if base > u128::from(max_usd) * BASE_UNITS_PER_USD {
        return Err(format!("${text} is more than the ${max_usd} limit"));
    }
    Ok(base)
}

/// Base units as a dollar string with up to 6 decimals, trailing zeros trimmed (`1.5`, `0.05`).
pub fn format_base_usd(base: u128) -> String {
    let whole = base / BASE_UNITS_PER_USD;
    let frac = base % BASE_UNITS_PER_USD;
    if frac == 0 {
        return whole.to_string();
    }
    let f = format!("{frac:06}");
    format!("{whole}.{}", f.trim_end_matches('0'))
}

/// p$ as dollars for people (up to 6 decimals, rounded toward zero, trailing zeros trimmed).
pub fn picos_to_usd_string(picos: i64) -> String {
    let sign = if picos < 0 { "-" } else { "" };
    let base = u128::from((picos / PICOS_PER_BASE_UNIT).unsigned_abs());
    format!("{sign}{}", format_base_usd(base))
}

/// A dollar amount as an agent sends it: a JSON string (`"0.50"`) or a JSON number (`0.5`).
/// Kept as text: a number is written back with the shortest representation that reads back as
/// the same double, which for the amounts people write (at most 6 decimals) is what they wrote;
/// parsing it is exact ([`parse_usd_base`]). Anything else is refused with a clear message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsdAmount(pub String);

impl UsdAmount {
    pub fn text(&self) -> &str {
        &self.0
    }

    /// In base units, at most `max_usd`.
    pub fn base_units(&self, max_usd: u64) -> Result<u128, String> {
        parse_usd_base(&self.0, max_usd)
    }
}

impl<'de> Deserialize<'de> for UsdAmount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = UsdAmount;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a dollar amount as a string (\"0.50\") or a number (0.5)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UsdAmount, E> {
                Ok(UsdAmount(v.trim().to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<UsdAmount, E> {
                Ok(UsdAmount(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<UsdAmount, E> {
                if v < 0 {
                    return Err(E::custom(format!(
                        "{v} is negative: a dollar amount is at least 0"
                    )));
                }
                Ok(UsdAmount(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<UsdAmount, E> {
                if !v.is_finite() || v < 0.0 {
                    return Err(E::custom(format!("{v} is not a dollar amount")));
                }
                // Rust prints a double's shortest round-trip form, never in exponent notation.
                Ok(UsdAmount(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl serde::Serialize for UsdAmount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_parse_exactly_and_refuse_what_is_not_money() {
        assert_eq!(parse_usd_base("5", 100), Ok(5_000_000));
        assert_eq!(parse_usd_base("0.25", 100), Ok(250_000));
        assert_eq!(parse_usd_base("0.000001", 100), Ok(1));
        assert_eq!(parse_usd_base("12.500000", 100), Ok(12_500_000));
        for bad in [
            "",
            "-1",
            "1e3",
            "0.0000001",
            "1.",
            ".5",
            "abc",
            "1,5",
            "101",
        ] {
            assert!(parse_usd_base(bad, 100).is_err(), "{bad} accepted");
        }
        assert_eq!(parse_usd("0.05"), Ok(Picos(50_000_000_000)));
    }

    #[test]
    fn conversions_round_trip_and_format() {
        assert_eq!(base_to_picos(1), Some(1_000_000));
        assert_eq!(base_to_picos(5_000_000), Some(5 * PICOS_PER_USD));
        assert_eq!(base_to_picos(u128::MAX), None);
        assert_eq!(base_to_picos(10_000 * BASE_UNITS_PER_USD), None);
        assert_eq!(picos_to_base(5 * PICOS_PER_USD + 999_999), 5_000_000);
        assert_eq!(picos_to_base(-5), 0);
        assert_eq!(format_base_usd(1_500_000), "1.5");
        assert_eq!(format_base_usd(50_000), "0.05");
        assert_eq!(format_base_usd(3_000_000), "3");
        assert_eq!(picos_to_usd_string(-PICOS_PER_USD / 2), "-0.5");
        assert_eq!(format_usd6(4_950_000_000_000), "4.950000");
        assert_eq!(format_usd6(-500_000), "0.000000");
        assert_eq!(format_usd(12_500_000_000_000), "12.5");
    }

    #[test]
    fn agents_send_amounts_as_strings_or_numbers() {
        let parse = |j: &str| serde_json::from_str::<UsdAmount>(j);
        for (json, base) in [
            ("\"0.50\"", 500_000),
            ("0.5", 500_000),
            ("1", 1_000_000),
            ("0.1", 100_000),
            ("2.25", 2_250_000),
            ("0.000001", 1),
            ("\" 3 \"", 3_000_000),
        ] {
            let a = parse(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(a.base_units(100), Ok(base), "{json}");
        }
        for bad in ["-1", "true", "null", "[1]", "{\"usd\":1}"] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
        // Parsed, but not money: refused with the reason.
        assert!(parse("1e-7").unwrap().base_units(100).is_err());
        assert!(parse("\"-1\"").unwrap().base_units(100).is_err());
        assert!(parse("1000").unwrap().base_units(100).is_err());
    }
}
