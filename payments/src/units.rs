//! Money units at the payments boundary. On chain, TIP-20 stablecoins have 6 decimals (one base
//! unit = $0.000001); inside tollgate money is integer pico-dollars. One base unit is exactly
//! 1,000,000 p$, so conversion is exact in that direction; the other way rounds down.

use tollgate_metering::{MAX_OP_AMOUNT, PICOS_PER_USD};

/// p$ per on-chain base unit (6-decimal token).
pub const PICOS_PER_BASE_UNIT: i64 = 1_000_000;
/// Base units per dollar.
pub const BASE_UNITS_PER_USD: u128 = 1_000_000;

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
pub fn parse_usd(text: &str, max_usd: u64) -> Result<u128, String> {
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
pub fn format_usd(base: u128) -> String {
    let whole = base / BASE_UNITS_PER_USD;
    let frac = base % BASE_UNITS_PER_USD;
    if frac == 0 {
        return whole.to_string();
    }
    let f = format!("{frac:06}");
    format!("{whole}.{}", f.trim_end_matches('0'))
}

/// p$ as dollars for people (6 decimals, rounded down).
pub fn picos_to_usd_string(picos: i64) -> String {
    let sign = if picos < 0 { "-" } else { "" };
    let base = u128::from((picos / PICOS_PER_BASE_UNIT).unsigned_abs());
    format!("{sign}{}", format_usd(base))
}

const _: () = assert!(PICOS_PER_USD == PICOS_PER_BASE_UNIT * 1_000_000);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_parse_exactly_and_refuse_what_is_not_money() {
        assert_eq!(parse_usd("5", 100), Ok(5_000_000));
        assert_eq!(parse_usd("0.25", 100), Ok(250_000));
        assert_eq!(parse_usd("0.000001", 100), Ok(1));
        assert_eq!(parse_usd("12.500000", 100), Ok(12_500_000));
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
            assert!(parse_usd(bad, 100).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn conversions_round_trip() {
        assert_eq!(base_to_picos(1), Some(1_000_000));
        assert_eq!(base_to_picos(5_000_000), Some(5 * PICOS_PER_USD));
        assert_eq!(base_to_picos(u128::MAX), None);
        assert_eq!(base_to_picos(10_000 * BASE_UNITS_PER_USD), None);
        assert_eq!(picos_to_base(5 * PICOS_PER_USD + 999_999), 5_000_000);
        assert_eq!(picos_to_base(-5), 0);
        assert_eq!(format_usd(1_500_000), "1.5");
        assert_eq!(format_usd(50_000), "0.05");
        assert_eq!(format_usd(3_000_000), "3");
        assert_eq!(picos_to_usd_string(-PICOS_PER_USD / 2), "-0.5");
    }
}
