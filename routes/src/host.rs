//! Host header normalisation: the one place that decides what a hostname is.
//!
//! Used on the hot path (no allocation: the caller lends a stack buffer) and by route writers, so
//! that a route written by the control service and a request's `Host` agree byte for byte.

use std::fmt;

/// RFC 1035 limit on a full domain name, without the trailing dot.
pub const MAX_HOST_LEN: usize = 253;
/// RFC 1035 limit on one label.
pub const MAX_LABEL_LEN: usize = 63;

/// Why a `Host` value was refused. Each maps to a 400 with this text as the detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    Empty,
    TooLong,
    BadCharacter,
    EmptyLabel,
    LabelTooLong,
    BadPort,
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostError::Empty => "the Host header is missing or empty",
            HostError::TooLong => "the host name is longer than 253 characters",
            HostError::BadCharacter => "the host name may contain only a-z, 0-9, '.' and '-'",
            HostError::EmptyLabel => "the host name has an empty label ('..' or a leading dot)",
            HostError::LabelTooLong => "a label of the host name is longer than 63 characters",
            HostError::BadPort => "the port after ':' must be a number from 0 to 65535",
        })
    }
}

impl std::error::Error for HostError {}

/// Normalises a raw `Host` value into `buf`: ASCII-lowercased, `:port` removed, one trailing dot
/// removed; then checks length, characters (`[a-z0-9.-]`) and labels.
pub fn normalize_host<'b>(
    raw: &[u8],
    buf: &'b mut [u8; MAX_HOST_LEN],
) -> Result<&'b str, HostError> {
    let raw = trim_ows(raw);
    let name = match raw.iter().position(|&b| b == b':') {
        Some(i) => {
            let port = &raw[i + 1..];
            if port.is_empty() || port.len() > 5 || !port.iter().all(u8::is_ascii_digit) {
                return Err(HostError::BadPort);
            }
            let value = port
                .iter()
                .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
            if value > 65_535 {
                return Err(HostError::BadPort);
            }
            &raw[..i]
        }
        None => raw,
    };
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() {
        return Err(HostError::Empty);
    }
    if name.len() > MAX_HOST_LEN {
        return Err(HostError::TooLong);
    }
    let mut label_len = 0usize;
    for (i, &b) in name.iter().enumerate() {
        let lower = b.to_ascii_lowercase();
        match lower {
            b'a'..=b'z' | b'0'..=b'9' | b'-' => {
                label_len += 1;
                if label_len > MAX_LABEL_LEN {
                    return Err(HostError::LabelTooLong);
                }
            }
            b'.' => {
                if label_len == 0 {
                    return Err(HostError::EmptyLabel);
                }
                label_len = 0;
            }
            _ => return Err(HostError::BadCharacter),
        }
        buf[i] = lower;
    }
    if label_len == 0 {
        return Err(HostError::EmptyLabel);
    }
    // Every byte written is ASCII, so this cannot fail; map the impossible case to an error
    // rather than panic.
    std::str::from_utf8(&buf[..name.len()]).map_err(|_| HostError::BadCharacter)
}

/// Allocating convenience for writers and config (not the hot path).
pub fn normalize_host_owned(raw: &str) -> Result<String, HostError> {
    let mut buf = [0u8; MAX_HOST_LEN];
    normalize_host(raw.as_bytes(), &mut buf).map(str::to_owned)
}

/// A slug is one DNS label: `[a-z0-9-]{1,63}`, not starting or ending with '-'.
pub fn validate_slug(slug: &str) -> Result<(), HostError> {
    if slug.is_empty() {
        return Err(HostError::Empty);
    }
    if slug.len() > MAX_LABEL_LEN {
        return Err(HostError::LabelTooLong);
    }
    let ok = slug
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok || slug.starts_with('-') || slug.ends_with('-') {
        return Err(HostError::BadCharacter);
    }
    Ok(())
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> Result<String, HostError> {
        normalize_host_owned(s)
    }

    #[test]
    fn lowercases_and_strips_port_and_dot() {
        assert_eq!(norm("Shop.LocalHost:8080").unwrap(), "shop.localhost");
        assert_eq!(norm("api.example.com.").unwrap(), "api.example.com");
        assert_eq!(norm(" a-b.example.com ").unwrap(), "a-b.example.com");
        assert_eq!(norm("127.0.0.1:80").unwrap(), "127.0.0.1");
    }

    #[test]
    fn refuses_bad_hosts() {
        assert_eq!(norm(""), Err(HostError::Empty));
        assert_eq!(norm(":80"), Err(HostError::Empty));
        assert_eq!(norm("a_b.example"), Err(HostError::BadCharacter));
        assert!(norm("[::1]:80").is_err());
        assert_eq!(norm("a..b"), Err(HostError::EmptyLabel));
        assert_eq!(norm(".a"), Err(HostError::EmptyLabel));
        assert_eq!(norm("a:"), Err(HostError::BadPort));
        assert_eq!(norm("a:99999"), Err(HostError::BadPort));
        assert_eq!(norm("a:8x"), Err(HostError::BadPort));
        assert_eq!(norm("ünïcode.example"), Err(HostError::BadCharacter));
        let long_label = "a".repeat(64);
        assert_eq!(norm(&long_label), Err(HostError::LabelTooLong));
        let long = ["abcdefgh"; 30].join(".");
        assert_eq!(norm(&long), Err(HostError::TooLong));
        let max = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        assert_eq!(norm(&max).unwrap().len(), 253);
    }

    #[test]
    fn slugs() {
        assert!(validate_slug("my-app-1").is_ok());
        assert!(validate_slug("-x").is_err());
        assert!(validate_slug("x-").is_err());
        assert!(validate_slug("A").is_err());
        assert!(validate_slug("a.b").is_err());
        assert!(validate_slug("").is_err());
    }
}
