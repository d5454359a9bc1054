//! Answers the proxy gives itself: an HTML page for browsers, RFC 9457 problem+json otherwise.
//! Self-contained (no external assets), `Cache-Control: no-store`, with the request id so that a
//! user's report can be matched to the logs.

use std::borrow::Cow;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;

/// What went wrong, in words an end user and a client program can both act on.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: u16,
    /// Last part of the problem type URI (`urn:tollgate:problem:<kind>`).
    pub kind: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub hint: Cow<'static, str>,
    /// Extra members of the problem+json body (RFC 9457 extensions).
    pub extra: Option<serde_json::Map<String, serde_json::Value>>,
    pub retry_after_seconds: Option<u32>,
}

impl Problem {
    pub fn bad_host(detail: String) -> Self {
        Problem {
            status: 400,
            kind: "bad-host",
            title: "Bad Host header",
            detail,
            hint: Cow::Borrowed(
                "Send the service's host name in the Host header, for example my-app.localhost.",
            ),
            extra: None,
            retry_after_seconds: None,
        }
    }

    pub fn unknown_host(host: &str) -> Self {
        Problem {
            status: 404,
            kind: "unknown-host",
            title: "No service at this address",
            detail: format!("Nothing is deployed at {host}."),
            hint: Cow::Borrowed(
                "Check the address. A service that was deleted or expired no longer answers here.",
            ),
            extra: None,
            retry_after_seconds: None,
        }
    }

    pub fn header_too_large(limit: usize) -> Self {
        Problem {
            status: 431,
            kind: "header-too-large",
            title: "Request headers too large",
            detail: format!("The request line and headers exceed {limit} bytes."),
            hint: Cow::Borrowed(
                "Send fewer or smaller headers (large cookies are the usual cause).",
            ),
            extra: None,
            retry_after_seconds: None,
        }
    }

    pub fn body_too_large(limit: u64) -> Self {
        Problem {
            status: 413,
            kind: "body-too-large",
            title: "Request body too large",
            detail: format!("The request body exceeds {limit} bytes."),
            hint: Cow::Borrowed("Send a smaller body, or split the upload into parts."),
            extra: None,
            retry_after_seconds: None,
        }
    }

    pub fn not_ready() -> Self {
        Problem {
            status: 503,
            kind: "not-ready",
            title: "Starting up",
            detail: "This proxy has not loaded its routes yet.".into(),
            hint: Cow::Borrowed("Retry in a moment."),
            extra: None,
            retry_after_seconds: Some(1),
        }
    }

    pub fn bad_gateway(host: &str) -> Self {
        Problem {
            status: 502,
            kind: "upstream-unavailable",
            title: "The service is not responding",
            detail: format!(
                "The service at {host} could not be reached or gave an invalid answer."
            ),
            hint: Cow::Borrowed(
                "Retry shortly. If it persists, the service's owner should check its logs.",
            ),
            extra: None,
            retry_after_seconds: None,
        }
    }

    /// The upstream took the request and then dropped the connection without an answer: on this
    /// platform, the service's process stopped (killed at its CPU limit, or crashed); the
    /// runtime restarts it.
    pub fn service_interrupted(host: &str) -> Self {
        Problem {
            status: 503,
            kind: "service-interrupted",
            title: "The service stopped while handling this request",
            detail: format!(
                "The service at {host} stopped before it answered: its process was ended, for example for passing its CPU limit per request, or it crashed. It is restarted automatically."
            ),
            hint: Cow::Borrowed(
                "Retry in a moment. If this request always fails, it likely exceeds the CPU limit: the service's owner can see why in its logs.",
            ),
            extra: None,
            retry_after_seconds: Some(1),
        }
    }

    /// The service's owner has no credit left (402): API clients get this as problem+json,
    /// browsers as the suspension page.
    pub fn suspended(host: &str, top_up: &str) -> Self {
        let mut extra = serde_json::Map::new();
        extra.insert("service".into(), host.into());
        extra.insert("balance_usd".into(), "0.00".into());
        extra.insert("top_up".into(), top_up.into());
        Problem {
            status: 402,
            kind: "service-suspended",
            title: "This service is paused",
            detail: format!(
                "The service at {host} has used up the credit its owner prepaid, so it is paused. It resumes by itself as soon as its owner adds credit; nothing is lost meanwhile."
            ),
            hint: Cow::Owned(format!(
                "If you own this service, top up its balance: {top_up}. Otherwise, let its owner know and try again later."
            )),
            extra: Some(extra),
            retry_after_seconds: None,
        }
    }

    /// No lease is left on this node and the money store cannot be reached: never a 402.
    pub fn metering_unavailable() -> Self {
        Problem {
            status: 503,
            kind: "metering-unavailable",
            title: "Temporarily unavailable",
            detail: "This request could not be paid for right now: the platform's balance store is unreachable. Nothing was charged.".into(),
            hint: Cow::Borrowed("Retry in a few seconds."),
            extra: None,
            retry_after_seconds: Some(2),
        }
    }

    pub fn gateway_timeout(host: &str) -> Self {
        Problem {
            status: 504,
            kind: "upstream-timeout",
            title: "The service took too long",
            detail: format!("The service at {host} did not answer in time."),
            hint: Cow::Borrowed(
                "Retry later, or ask the service's owner to make this request faster.",
            ),
            extra: None,
            retry_after_seconds: None,
        }
    }

    pub fn internal() -> Self {
        Problem {
            status: 500,
            kind: "internal",
            title: "Internal error",
            detail: "The proxy failed to handle this request.".into(),
            hint: Cow::Borrowed("Retry; if it persists, report the request id to the operator."),
            extra: None,
            retry_after_seconds: None,
        }
    }

    pub fn bad_request(detail: String) -> Self {
        Problem {
            status: 400,
            kind: "bad-request",
            title: "Bad request",
            detail,
            hint: Cow::Borrowed("Check the request against HTTP/1.1 (RFC 9112)."),
            extra: None,
            retry_after_seconds: None,
        }
    }

    /// The response header and body, as HTML when `html`, else as problem+json.
    pub fn render(&self, request_id: &str, html: bool) -> Result<(ResponseHeader, Bytes)> {
        let body = if html {
            Bytes::from(self.html(request_id))
        } else {
            Bytes::from(self.json(request_id))
        };
        let mut h = ResponseHeader::build(self.status, Some(6))?;
        h.insert_header(
            "content-type",
            if html {
                "text/html; charset=utf-8"
            } else {
                "application/problem+json"
            },
        )?;
        h.insert_header("content-length", body.len().to_string())?;
        h.insert_header("cache-control", "no-store")?;
        if !request_id.is_empty() {
            h.insert_header("x-request-id", request_id)?;
        }
        if let Some(s) = self.retry_after_seconds {
            h.insert_header("retry-after", s.to_string())?;
        }
        Ok((h, body))
    }

    pub fn json(&self, request_id: &str) -> String {
        let mut v = serde_json::json!({
            "type": format!("urn:tollgate:problem:{}", self.kind),
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "hint": self.hint,
            "request_id": request_id,
        });
        if let (Some(extra), Some(obj)) = (&self.extra, v.as_object_mut()) {
            for (k, val) in extra {
                obj.entry(k.clone()).or_insert_with(|| val.clone());
            }
        }
        v.to_string()
    }

    pub fn html(&self, request_id: &str) -> String {
        format!(
            r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{status} · {title}</title>
<style>
body{{margin:0;font:16px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;background:#f6f7f9;color:#1d2330}}
main{{max-width:34rem;margin:12vh auto;padding:2rem;background:#fff;border-radius:12px;box-shadow:0 1px 3px rgba(0,0,0,.08)}}
.code{{font-size:.85rem;letter-spacing:.08em;color:#6b7385;text-transform:uppercase}}
h1{{font-size:1.5rem;margin:.25rem 0 1rem}}
.hint{{background:#f0f4ff;border-left:3px solid #4b6bfb;padding:.75rem 1rem;border-radius:4px}}
footer{{margin-top:1.5rem;font-size:.8rem;color:#8a91a0}}
code{{font-family:ui-monospace,monospace}}
</style></head>
<body><main>
<div class="code">Error {status}</div>
<h1>{title}</h1>
<p>{detail}</p>
<p class="hint">{hint}</p>
<footer>Request id <code>{rid}</code> · served by tollgate</footer>
</main></body></html>
"#,
            status = self.status,
            title = escape(self.title),
            detail = escape(&self.detail),
            hint = escape(&self.hint),
            rid = escape(request_id),
        )
    }
}

/// True when the client prefers a page (a browser): `Accept` names `text/html`.
pub fn wants_html(accept: Option<&[u8]>) -> bool {
    accept.is_some_and(|a| a.windows(9).any(|w| w.eq_ignore_ascii_case(b"text/html")))
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_user_controlled_text() {
        let p = Problem::unknown_host("<script>x</script>");
        let page = p.html("id-1");
        assert!(!page.contains("<script>x"));
        assert!(page.contains("&lt;script&gt;"));
    }

    #[test]
    fn json_is_a_problem_document() {
        let v: serde_json::Value =
            serde_json::from_str(&Problem::unknown_host("a.localhost").json("r1")).unwrap();
        assert_eq!(v["type"], "urn:tollgate:problem:unknown-host");
        assert_eq!(v["status"], 404);
        assert_eq!(v["request_id"], "r1");
    }

    #[test]
    fn accept_detection() {
        assert!(wants_html(Some(b"text/html,application/xhtml+xml;q=0.9")));
        assert!(wants_html(Some(b"TEXT/HTML")));
        assert!(!wants_html(Some(b"application/json")));
        assert!(!wants_html(None));
    }
}
