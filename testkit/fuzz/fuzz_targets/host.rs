//! Any `Host` header value: normalisation never panics, and what it accepts is a canonical
//! host name (lowercase `[a-z0-9.-]`, labels 1–63, at most 253 bytes) that normalises to
//! itself, so two spellings of one host can never name two routes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_routes::{MAX_HOST_LEN, normalize_host};

fuzz_target!(|raw: &[u8]| {
    let mut buf = [0u8; MAX_HOST_LEN];
    let Ok(host) = normalize_host(raw, &mut buf) else {
        return;
    };
    let host = host.to_owned();
    assert!(!host.is_empty() && host.len() <= MAX_HOST_LEN, "{host:?}");
    assert!(
        host.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-'),
        "{host:?}"
    );
    assert!(
        host.split('.').all(|l| !l.is_empty() && l.len() <= 63),
        "{host:?}"
    );
    let mut again = [0u8; MAX_HOST_LEN];
    assert_eq!(
        normalize_host(host.as_bytes(), &mut again).ok(),
        Some(host.as_str())
    );
});
