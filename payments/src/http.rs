//! The HTTP binding: `WWW-Authenticate: Payment` challenges on 402, credentials in
//! `Authorization: Payment` (or `Payment-Authorization`), receipts in `Payment-Receipt`.
//! Framework-neutral (`http` types) so the control service and the proxy can both use it.

use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use mpp::{PaymentChallenge, PaymentCredential, PaymentErrorDetails, Receipt};

use crate::Rejection;

/// Finds the one `Payment` credential of a request. `Ok(None)` when there is none; a
/// malformed one, or more than one, is refused (`malformed-credential`).
pub fn credential(headers: &HeaderMap) -> Result<Option<PaymentCredential>, Rejection> {
    let mut found = Vec::new();
    for name in [header::AUTHORIZATION.as_str(), "payment-authorization"] {
        for v in headers.get_all(name) {
            let Ok(s) = v.to_str() else {
                return Err(malformed("credential header is not ASCII"));
            };
            if mpp::protocol::core::extract_payment_scheme(s).is_some() {
                found.push(s.to_owned());
            }
        }
    }
    match found.as_slice() {
        [] => Ok(None),
        [one] => mpp::parse_authorization(one)
            .map(Some)
            .map_err(|e| malformed(&format!("Payment credential: {e}"))),
        _ => Err(malformed("send exactly one Payment credential")),
    }
}

fn malformed(detail: &str) -> Rejection {
    Rejection {
        problem: Box::new(
            mpp::MppError::MalformedCredential(Some(detail.to_owned())).to_problem_details_owned(),
        ),
        retryable: false,
    }
}

trait ToProblem {
    fn to_problem_details_owned(&self) -> PaymentErrorDetails;
}

impl ToProblem for mpp::MppError {
    fn to_problem_details_owned(&self) -> PaymentErrorDetails {
        use mpp::PaymentError;
        self.to_problem_details(None)
    }
}

/// A 402 answer: the challenge, `Cache-Control: no-store`, and a problem+json body. Without a
/// rejection the problem is `payment-required` with `detail` in words; with one, the rejection's
/// problem (and status 503 + `Retry-After` when the same credential may be retried).
pub fn payment_required(
    challenge: &PaymentChallenge,
    rejection: Option<&Rejection>,
    detail: &str,
    hint: &str,
) -> Response<String> {
    let (status, mut problem) = match rejection {
        Some(r) => (r.status(), (*r.problem).clone()),
        None => (
            402,
            PaymentErrorDetails {
                problem_type: format!("{}/payment-required", mpp::CORE_PROBLEM_TYPE_BASE),
                title: "Payment Required".into(),
                status: 402,
                detail: detail.to_owned(),
                challenge_id: None,
                hint: None,
            },
        ),
    };
    problem.challenge_id = Some(challenge.id.clone());
    if problem.hint.is_none() {
        problem.hint = Some(hint.to_owned());
    }
    let body = serde_json::to_string(&problem).unwrap_or_default();
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::PAYMENT_REQUIRED);
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if status == 503 {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    } else if let Ok(v) = mpp::format_www_authenticate(challenge)
        .ok()
        .and_then(|s| HeaderValue::from_str(&s).ok())
        .ok_or(())
    {
        // A retryable failure is not a request to pay again: no challenge with a 503.
        h.insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// Headers for a response that carries a receipt: `Payment-Receipt` and
/// `Cache-Control: private`.
pub fn receipt_headers(receipt: &Receipt) -> Vec<(http::HeaderName, HeaderValue)> {
    let mut out = vec![(header::CACHE_CONTROL, HeaderValue::from_static("private"))];
    if let Ok(v) = mpp::format_receipt(receipt)
        .ok()
        .and_then(|s| HeaderValue::from_str(&s).ok())
        .ok_or(())
    {
        out.push((http::HeaderName::from_static("payment-receipt"), v));
    }
    out
}

/// `POST /v1/top-up?amount_usd=5`: adds credit to the payer's account. Without a credential it
/// answers 402 with a session challenge for the amount; with one it verifies it and answers 200
/// with the new balance (204 for a deposit top-up or a close, which pay for nothing themselves),
/// with `Payment-Receipt` either way.
pub async fn top_up(
    p: &crate::Payments,
    amount_usd: Option<&str>,
    headers: &HeaderMap,
) -> Response<String> {
    let amount = match amount_usd
        .map(|a| tollgate_metering::units::parse_usd_base(a, p.config().max_top_up_usd))
    {
        Some(Ok(a)) if a > 0 => a,
        Some(Err(e)) => return bad_request(&e),
        _ => {
            return bad_request("amount_usd is required and must be more than 0");
        }
    };
    let usd = tollgate_metering::units::format_base_usd(amount);
    let challenge =
        match p.session_challenge(amount, Some(&format!("Top up ${usd} of tollgate credit"))) {
            Ok(c) => c,
            Err(e) => return internal(&e),
        };
    let detail = format!(
        "Pay ${usd} to add it to your tollgate balance: a Tempo payment-channel session (MPP intent \"session\")."
    );
    let hint = "Use an MPP client (e.g. mppx): it opens a channel with the suggested deposit on first use and signs a voucher for the amount; later top-ups reuse the channel.";
    let cred = match credential(headers) {
        Ok(Some(c)) => c,
        Ok(None) => return payment_required(&challenge, None, &detail, hint),
        Err(r) => {
            p.refused_undecodable();
            return payment_required(&challenge, Some(&r), &detail, hint);
        }
    };
    let accepted = match p.accept(&cred).await {
        Ok(a) => a,
        Err(r) => return payment_required(&challenge, Some(&r), &detail, hint),
    };
    let mut resp = if accepted.action.is_management() {
        let mut r = Response::new(String::new());
        *r.status_mut() = StatusCode::NO_CONTENT;
        r
    } else {
        let balance = p.money().account(&accepted.account).await.ok().flatten();
        let body = serde_json::json!({
            "account": accepted.account,
            "channel_id": accepted.channel_id,
            "accepted_cumulative_usd": tollgate_metering::units::format_base_usd(accepted.accepted_cumulative),
            "available_usd": balance.as_ref().map(|b| tollgate_metering::units::picos_to_usd_string(b.available)),
            "credited_usd": balance.as_ref().map(|b| tollgate_metering::units::picos_to_usd_string(b.credited)),
        });
        let mut r = Response::new(body.to_string());
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    };
    for (k, v) in receipt_headers(&accepted.receipt) {
        resp.headers_mut().insert(k, v);
    }
    resp
}

/// `POST|GET /v1/top-up?amount_usd=…`, for the control service's listener.
pub fn router(p: std::sync::Arc<crate::Payments>) -> axum::Router {
    use axum::extract::{Query, State};
    use axum::response::IntoResponse;
    async fn handle(
        State(p): State<std::sync::Arc<crate::Payments>>,
        Query(q): Query<std::collections::HashMap<String, String>>,
        headers: HeaderMap,
    ) -> axum::response::Response {
        top_up(&p, q.get("amount_usd").map(String::as_str), &headers)
            .await
            .into_response()
    }
    axum::Router::new()
        .route("/v1/top-up", axum::routing::post(handle).get(handle))
        .with_state(p)
}

fn bad_request(detail: &str) -> Response<String> {
    problem(
        StatusCode::BAD_REQUEST,
        "bad-request",
        "Bad Request",
        detail,
        "POST /v1/top-up?amount_usd=5 (dollars, up to 6 decimals)",
    )
}

fn internal(detail: &str) -> Response<String> {
    tracing::error!(detail, "top-up failed");
    problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal-payment-error",
        "Internal Error",
        "could not build a payment challenge",
        "retry later; operators: see the control service log",
    )
}

fn problem(
    status: StatusCode,
    kind: &str,
    title: &str,
    detail: &str,
    hint: &str,
) -> Response<String> {
    let body = serde_json::json!({
        "type": format!("{}/{kind}", mpp::CORE_PROBLEM_TYPE_BASE),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
        "hint": hint,
    });
    let mut r = Response::new(body.to_string());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(v) {
            h.insert(header::AUTHORIZATION, v);
        }
        h
    }

    #[test]
    fn hostile_credentials_are_refused_without_panicking() {
        // A fixed-seed generator: the same inputs on every run.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"Payment abcXYZ019+/=_-.,:;\"'{}[]\\ \t";
        for round in 0..20_000 {
            let len = (next() % 300) as usize;
            let mut s: Vec<u8> = if round % 2 == 0 {
                b"Payment ".to_vec()
            } else {
                Vec::new()
            };
            for _ in 0..len {
                let r = next();
                s.push(if r % 7 == 0 {
                    (r >> 8) as u8
                } else {
                    alphabet[(r >> 8) as usize % alphabet.len()]
                });
            }
            let _ = credential(&headers(&s));
        }
        // Structured garbage: valid base64url of hostile JSON.
        for json in [
            "{}",
            "null",
            "[]",
            r#"{"challenge":{}}"#,
            r#"{"challenge":{"id":"x","realm":"r","method":"tempo","intent":"session","request":"e30"},"payload":null}"#,
            r#"{"challenge":{"id":"x","realm":"r","method":"tempo","intent":"session","request":"!!"},"payload":{}}"#,
        ] {
            let enc = mpp::base64url_encode(json.as_bytes());
            let r = credential(&headers(format!("Payment {enc}").as_bytes()));
            assert!(
                r.is_err() || r.as_ref().is_ok_and(|c| c.is_some()),
                "{json}"
            );
        }
        // Two credentials: refused.
        let mut h = HeaderMap::new();
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Payment e30"),
        );
        h.append(
            "payment-authorization",
            HeaderValue::from_static("Payment e30"),
        );
        assert!(credential(&h).is_err());
        // Other schemes: no credential at all.
        assert!(matches!(credential(&headers(b"Bearer abc")), Ok(None)));
    }
}
