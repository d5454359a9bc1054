//! Money: integer pico-dollars (1 p$ = 10⁻¹² USD) everywhere inside; never floats.
//!
//! A request at the default price costs 500,000 p$ and a CPU-µs 12,500 p$, so smaller units
//! (µ$) cannot represent one request. Balances are `i64` (up to ±$9.2 million per account); sums
//! over many accounts or long periods are `i128`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Pico-dollars per dollar.
pub const PICOS_PER_USD: i64 = 1_000_000_000_000;

/// An amount of money in pico-dollars. Signed: a balance can be in debt by a bounded amount
/// (CPU that ran past an exhausted lease).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Picos(pub i64);

impl Picos {
    pub const ZERO: Picos = Picos(0);

    pub fn from_usd_whole(usd: i64) -> Option<Picos> {
        usd.checked_mul(PICOS_PER_USD).map(Picos)
    }

    /// Parses a decimal dollar amount such as `"0.05"` or `"12.5"` exactly (up to 12
    /// decimals). The only place money enters as text; floats are never involved.
    pub fn parse_usd(s: &str) -> Result<Picos, MoneyError> {
        let s = s.trim();
        let (neg, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if int.is_empty() && frac.is_empty() {
            return Err(MoneyError::Invalid(s.to_owned()));
        }
        if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(MoneyError::Invalid(s.to_owned()));
        }
        if frac.len() > 12 {
            return Err(MoneyError::TooPrecise(s.to_owned()));
        }
        let int: i64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| MoneyError::Overflow)?
        };
        let mut frac_p: i64 = 0;
        for (i, b) in frac.bytes().enumerate() {
            frac_p += i64::from(b - b'0') * 10i64.pow(11 - i as u32);
        }
        let v = int
            .checked_mul(PICOS_PER_USD)
            .and_then(|v| v.checked_add(frac_p))
            .ok_or(MoneyError::Overflow)?;
        Ok(Picos(if neg { -v } else { v }))
    }

    pub fn checked_add(self, o: Picos) -> Option<Picos> {
        self.0.checked_add(o.0).map(Picos)
    }

    pub fn checked_sub(self, o: Picos) -> Option<Picos> {
        self.0.checked_sub(o.0).map(Picos)
    }
}

/// Exact decimal dollars, e.g. `12.500000000000` → `"12.5"`.
impl fmt::Display for Picos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let neg = self.0 < 0;
        let abs = self.0.unsigned_abs();
        let int = abs / PICOS_PER_USD as u64;
        let frac = abs % PICOS_PER_USD as u64;
        let sign = if neg { "-" } else { "" };
        if frac == 0 {
            return write!(f, "{sign}{int}");
        }
        let frac = format!("{frac:012}");
        write!(f, "{sign}{int}.{}", frac.trim_end_matches('0'))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("'{0}' is not a dollar amount (expected digits with an optional '.', like 0.05)")]
    Invalid(String),
    #[error("'{0}' has more than 12 decimals (the smallest unit is 10^-12 USD)")]
    TooPrecise(String),
    #[error("amount out of range")]
    Overflow,
}

/// Raw metered quantities. Priced only when a batch is built, so splitting or merging usage never
/// changes a total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    pub requests: u64,
    pub cpu_us: u64,
    pub deploys: u64,
    /// Database rows read and written (SQLite's counters, as D1 reports them). Absent in
    /// records written before databases existed.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub rows_read: u64,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub rows_written: u64,
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

impl Usage {
    pub fn add(&mut self, o: &Usage) {
        self.requests = self.requests.saturating_add(o.requests);
        self.cpu_us = self.cpu_us.saturating_add(o.cpu_us);
        self.deploys = self.deploys.saturating_add(o.deploys);
        self.rows_read = self.rows_read.saturating_add(o.rows_read);
        self.rows_written = self.rows_written.saturating_add(o.rows_written);
    }

    pub fn is_zero(&self) -> bool {
        self.requests == 0
            && self.cpu_us == 0
            && self.deploys == 0
            && self.rows_read == 0
            && self.rows_written == 0
    }
}

/// Prices per unit, in pico-dollars. Defaults: $0.05 a deploy, $0.50 a million requests,
/// $12.50 a million CPU-ms, $0.25 a million database rows read, $1.00 a million rows written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    pub per_request: i64,
    pub per_cpu_us: i64,
    pub per_deploy: i64,
    /// Absent in records written before databases existed: the default prices.
    #[serde(default = "default_row_read")]
    pub per_row_read: i64,
    #[serde(default = "default_row_written")]
    pub per_row_written: i64,
}

fn default_row_read() -> i64 {
    Prices::default().per_row_read
}

fn default_row_written() -> i64 {
    Prices::default().per_row_written
}

impl Default for Prices {
    fn default() -> Self {
        Prices {
            per_request: 500_000,
            per_cpu_us: 12_500,
            per_deploy: 50_000_000_000,
            per_row_read: 250_000,
            per_row_written: 1_000_000,
        }
    }
}

impl Prices {
    /// Builds prices from the dollar amounts operators write in config:
    /// `deploy_usd`, `requests_per_million_usd`, `cpu_ms_per_million_usd`. Each must come out
    /// as a whole number of pico-dollars per unit.
    pub fn from_usd(
        deploy_usd: &str,
        requests_per_million_usd: &str,
        cpu_ms_per_million_usd: &str,
    ) -> Result<Prices, MoneyError> {
        let deploy = Picos::parse_usd(deploy_usd)?.0;
        let per_m_req = Picos::parse_usd(requests_per_million_usd)?.0;
        let per_m_cpu_ms = Picos::parse_usd(cpu_ms_per_million_usd)?.0;
        // A million CPU-ms is 10^9 CPU-µs.
        if per_m_req % 1_000_000 != 0 || per_m_cpu_ms % 1_000_000_000 != 0 {
            return Err(MoneyError::TooPrecise(format!(
                "{requests_per_million_usd} / {cpu_ms_per_million_usd}"
            )));
        }
        let p = Prices {
            per_request: per_m_req / 1_000_000,
            per_cpu_us: per_m_cpu_ms / 1_000_000_000,
            per_deploy: deploy,
            ..Prices::default()
        };
        p.validate()?;
        Ok(p)
    }

    /// Sets the database prices from dollars per million rows read and written; each must come
    /// out as a whole number of pico-dollars per row.
    pub fn with_rows_usd(
        self,
        read_per_million_usd: &str,
        written_per_million_usd: &str,
    ) -> Result<Prices, MoneyError> {
        let read = Picos::parse_usd(read_per_million_usd)?.0;
        let written = Picos::parse_usd(written_per_million_usd)?.0;
        if read % 1_000_000 != 0 || written % 1_000_000 != 0 {
            return Err(MoneyError::TooPrecise(format!(
                "{read_per_million_usd} / {written_per_million_usd}"
            )));
        }
        let p = Prices {
            per_row_read: read / 1_000_000,
            per_row_written: written / 1_000_000,
            ..self
        };
        p.validate()?;
        Ok(p)
    }

    /// Largest price of one unit: $1,000,000. With it, the cost of any `Usage` (five `u64`
    /// quantities) stays below 5 × 2⁶⁴ × 10¹⁸ < 2¹²⁷, so [`Prices::cost`] cannot overflow.
    pub const MAX_UNIT: i64 = 1_000_000 * PICOS_PER_USD;

    pub fn validate(&self) -> Result<(), MoneyError> {
        for p in [
            self.per_request,
            self.per_cpu_us,
            self.per_deploy,
            self.per_row_read,
            self.per_row_written,
        ] {
            if !(0..=Self::MAX_UNIT).contains(&p) {
                return Err(MoneyError::Invalid(format!(
                    "a unit price must be from 0 to $1,000,000, got {}",
                    Picos(p)
                )));
            }
        }
        Ok(())
    }

    /// Exact cost of a usage record. `i128`, and exact for every input when the prices passed
    /// [`Prices::validate`]; saturates (never wraps) if they did not.
    pub fn cost(&self, u: &Usage) -> i128 {
        let part = |q: u64, p: i64| i128::from(q).saturating_mul(i128::from(p));
        part(u.requests, self.per_request)
            .saturating_add(part(u.cpu_us, self.per_cpu_us))
            .saturating_add(part(u.deploys, self.per_deploy))
            .saturating_add(part(u.rows_read, self.per_row_read))
            .saturating_add(part(u.rows_written, self.per_row_written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_prices_match_the_brief() {
        let p = Prices::default();
        assert_eq!(p, Prices::from_usd("0.05", "0.50", "12.50").unwrap());
        assert_eq!(p.per_request, 500_000);
        assert_eq!(p.per_cpu_us, 12_500);
        // $5 buys ten million requests.
        let five = Picos::parse_usd("5").unwrap();
        assert_eq!(
            five.0 as i128,
            p.cost(&Usage {
                requests: 10_000_000,
                ..Default::default()
            })
        );
    }

    #[test]
    fn parse_and_display_round_trip() {
        for s in [
            "0",
            "0.05",
            "12.5",
            "5",
            "-1.000000000001",
            "0.000000000001",
        ] {
            assert_eq!(Picos::parse_usd(s).unwrap().to_string(), s);
        }
        assert_eq!(Picos::parse_usd(".5").unwrap(), Picos(500_000_000_000));
        assert!(Picos::parse_usd("1.0000000000001").is_err());
        assert!(Picos::parse_usd("abc").is_err());
        assert!(Picos::parse_usd("1e3").is_err());
        assert!(Picos::parse_usd("").is_err());
        assert!(Picos::parse_usd("99999999999").is_err());
    }

    #[test]
    fn prices_that_are_not_whole_picos_or_too_large_are_refused() {
        assert!(Prices::from_usd("0.05", "0.0000005", "12.5").is_err());
        assert!(Prices::from_usd("1000000.01", "0.5", "12.5").is_err());
        assert!(Prices::from_usd("-1", "0.5", "12.5").is_err());
        let p = Prices::default();
        assert!(p.with_rows_usd("0.0000001", "1").is_err());
        assert!(p.with_rows_usd("-0.25", "1").is_err());
        let rows = p.with_rows_usd("0.25", "1.00").unwrap();
        assert_eq!(
            (rows.per_row_read, rows.per_row_written),
            (250_000, 1_000_000)
        );
        // A million rows read cost $0.25, a million written $1.
        assert_eq!(
            rows.cost(&Usage {
                rows_read: 1_000_000,
                rows_written: 1_000_000,
                ..Default::default()
            }),
            1_250_000_000_000
        );
        let huge = Prices {
            per_request: i64::MAX,
            per_cpu_us: i64::MAX,
            per_deploy: i64::MAX,
            per_row_read: i64::MAX,
            per_row_written: i64::MAX,
        };
        assert!(huge.validate().is_err());
        // Even unvalidated prices saturate instead of wrapping.
        let u = Usage {
            requests: u64::MAX,
            cpu_us: u64::MAX,
            deploys: u64::MAX,
            rows_read: u64::MAX,
            rows_written: u64::MAX,
        };
        assert_eq!(huge.cost(&u), i128::MAX);
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn usage() -> impl Strategy<Value = Usage> {
            (
                0u64..1 << 40,
                0u64..1 << 40,
                0u64..1000,
                0u64..1 << 40,
                0u64..1 << 40,
            )
                .prop_map(|(requests, cpu_us, deploys, rows_read, rows_written)| {
                    Usage {
                        requests,
                        cpu_us,
                        deploys,
                        rows_read,
                        rows_written,
                    }
                })
        }

        proptest! {
            /// Pricing each batch and summing equals pricing the merged usage: splitting or
            /// merging batches never changes a total.
            #[test]
            fn split_and_merge_keep_totals(parts in proptest::collection::vec(usage(), 1..50)) {
                let p = Prices::default();
                let mut merged = Usage::default();
                let mut sum: i128 = 0;
                for u in &parts {
                    merged.add(u);
                    sum += p.cost(u);
                }
                prop_assert_eq!(sum, p.cost(&merged));
            }

            /// At the largest valid prices, no usage overflows: the cost is exact.
            #[test]
            fn no_overflow_at_the_bounds(
                r in any::<u64>(), c in any::<u64>(), d in any::<u64>(),
                rr in any::<u64>(), rw in any::<u64>(),
            ) {
                let m = Prices::MAX_UNIT;
                let p = Prices {
                    per_request: m, per_cpu_us: m, per_deploy: m,
                    per_row_read: m, per_row_written: m,
                };
                prop_assert!(p.validate().is_ok());
                let u = Usage { requests: r, cpu_us: c, deploys: d, rows_read: rr, rows_written: rw };
                let exact = (i128::from(r) + i128::from(c) + i128::from(d) + i128::from(rr)
                    + i128::from(rw)) * i128::from(m);
                prop_assert_eq!(p.cost(&u), exact);
            }

            /// Dollar text round-trips exactly through pico-dollars.
            #[test]
            fn usd_text_round_trips(v in -(1i64 << 62)..(1i64 << 62)) {
                let text = Picos(v).to_string();
                prop_assert_eq!(Picos::parse_usd(&text).unwrap(), Picos(v));
            }
        }
    }
}
