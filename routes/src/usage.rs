//! Shared by the proxies that count usage and the control service that reads it.
//!
//! Keys: `<prefix>:usage:<project>:<YYYYMMDDHH>` (hash: `requests`, `bytes_out`; one per UTC
//! hour) and `<prefix>:usage:<project>` (hash: `last_request_ms`).

/// The key of a project's usage in one hour bucket, or (without a bucket) its summary.
pub fn usage_key(prefix: &str, project: &str, bucket: Option<&str>) -> String {
    match bucket {
        Some(b) => format!("{prefix}:usage:{project}:{b}"),
        None => format!("{prefix}:usage:{project}"),
    }
}

/// Civil date-hour (UTC) of a Unix time, as `YYYYMMDDHH`.
pub fn hour_bucket(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let hour = (unix_s % 86_400) / 3600;
    // Howard Hinnant's days-from-civil, inverted.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}{m:02}{d:02}{hour:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hour_buckets_are_utc_date_hours() {
        assert_eq!(hour_bucket(0), "1970010100");
        assert_eq!(hour_bucket(951_782_400 + 3_600 * 5), "2000022905"); // leap day
        assert_eq!(hour_bucket(1_795_713_340), "2026112617"); // checked with Python datetime
    }
}
