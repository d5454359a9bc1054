//! Request headers the proxy reads or rewrites: its own reserved prefix, request ids, size
//! checks, and the payment credentials that must never reach a hosted service.

use pingora::http::RequestHeader;

/// Request header prefix reserved for tollgate itself; clients may not send it upstream.
pub const INTERNAL_HEADER_PREFIX: &str = "x-tollgate-";
pub(crate) const REQUEST_ID: &str = "x-request-id";

/// Whether the request carries an MPP credential (`Authorization: Payment …`).
pub(crate) fn carries_payment(headers: &http::HeaderMap) -> bool {
    ["authorization", "payment-authorization"].iter().any(|n| {
        headers.get_all(*n).iter().any(|v| {
            let b = v.as_bytes().trim_ascii_start();
            b.get(..7)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"payment"))
                && b.get(7).is_some_and(u8::is_ascii_whitespace)
        })
    })
}

/// Drops the `Authorization: Payment …` / `Payment-Authorization: Payment …` values that answer
/// a challenge of one of `realms` (the platform's own): a hosted service must never see a
/// credential it could replay at the platform as its visitor. Only requests that carry a
/// `Payment` credential pay for the decoding.
pub(crate) fn strip_platform_credentials(req: &mut RequestHeader, realms: &[String]) {
    for name in ["authorization", "payment-authorization"] {
        let values = req.headers.get_all(name);
        if !values
            .iter()
            .any(|v| is_platform_credential(v.as_bytes(), realms))
        {
            continue;
        }
        let keep: Vec<http::HeaderValue> = values
            .iter()
            .filter(|v| !is_platform_credential(v.as_bytes(), realms))
            .cloned()
            .collect();
        req.remove_header(name);
        for v in keep {
            // Re-adding a value that was already valid cannot fail.
            let _ = req.append_header(name, v);
        }
    }
}

/// Whether a header value is a `Payment` credential (scheme case-insensitive, possibly one of
/// several comma-separated credentials) whose echoed challenge names one of `realms`.
pub(crate) fn is_platform_credential(value: &[u8], realms: &[String]) -> bool {
    use base64::Engine;
    value.split(|&c| c == b',').any(|part| {
        let part = part.trim_ascii_start();
        // `Payment`, then any whitespace (clients send a space; parsers accept tabs too).
        let Some(token) = part
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case(b"payment"))
            .and_then(|_| part.get(7..))
            .filter(|rest| rest.first().is_some_and(u8::is_ascii_whitespace))
        else {
            return false;
        };
        let token = token.trim_ascii();
        // Clients send url-safe or standard base64, padded or not.
        let token: Vec<u8> = token
            .iter()
            .filter(|&&c| c != b'=')
            .map(|&c| match c {
                b'+' => b'-',
                b'/' => b'_',
                c => c,
            })
            .collect();
        let Ok(json) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&token) else {
            return false;
        };
        #[derive(serde::Deserialize)]
        struct Cred {
            challenge: Challenge,
        }
        #[derive(serde::Deserialize)]
        struct Challenge {
            realm: String,
        }
        serde_json::from_slice::<Cred>(&json).is_ok_and(|c| realms.contains(&c.challenge.realm))
    })
}

/// Keeps a client's request id if it is sane (1–128 of `[A-Za-z0-9._:-]`), else makes one.
pub(crate) fn request_id(req: &RequestHeader) -> String {
    if let Some(v) = req.headers.get(REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b':'))
            && let Ok(s) = v.to_str()
        {
            return s.to_owned();
        }
    }
    new_request_id()
}

/// 128 random bits as 32 hex digits. From the thread-local CSPRNG (`rand::rng`), which reseeds
/// from the OS now and then, so there is no `getrandom` syscall per request (uuid's v4 made one:
/// 1.3 % of the proxy's CPU in a profile, docs/benchmarks.md).
pub(crate) fn new_request_id() -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits: u128 = rand::random();
    let mut out = String::with_capacity(32);
    for i in (0..32).rev() {
        out.push(char::from(HEX[((bits >> (i * 4)) & 0xf) as usize]));
    }
    out
}

/// Request line plus header block, as sent (close enough: `name: value\r\n`).
pub(crate) fn header_bytes(req: &RequestHeader) -> usize {
    let line =
        req.method.as_str().len() + req.uri.path_and_query().map_or(1, |p| p.as_str().len()) + 12;
    req.headers
        .iter()
        .fold(line, |acc, (k, v)| acc + k.as_str().len() + v.len() + 4)
}

pub(crate) fn content_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok())
}

pub(crate) fn strip_internal_headers(req: &mut RequestHeader) {
    let has_internal = req
        .headers
        .keys()
        .any(|k| k.as_str().starts_with(INTERNAL_HEADER_PREFIX));
    if !has_internal {
        return;
    }
    let names: Vec<http::HeaderName> = req
        .headers
        .keys()
        .filter(|k| k.as_str().starts_with(INTERNAL_HEADER_PREFIX))
        .cloned()
        .collect();
    for n in names {
        req.remove_header(&n);
    }
}
