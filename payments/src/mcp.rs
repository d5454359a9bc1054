//! The MCP binding: JSON-RPC error `-32042` with `data.challenges` (request as a JSON object),
//! the credential in `params._meta["org.paymentauth/credential"]`, the receipt in
//! `result._meta["org.paymentauth/receipt"]`, `-32043` when verification fails. Some MCP
//! clients hide error data from the model, so every message also says in words what to pay.

use mpp::{PaymentChallenge, PaymentCredential, Receipt};

use crate::Rejection;

pub use mpp::mcp::{CREDENTIAL_META_KEY, RECEIPT_META_KEY};

/// The credential in a request's `_meta` (MCP puts `_meta` in `params`; some JSON-RPC
/// clients at the root: the caller passes whichever it has). `Ok(None)` when absent.
pub fn credential(
    meta: &serde_json::Map<String, serde_json::Value>,
) -> Result<Option<PaymentCredential>, Rejection> {
    if !meta.contains_key(CREDENTIAL_META_KEY) {
        return Ok(None);
    }
    mpp::mcp::extract_credential(&serde_json::Value::Object(meta.clone()))
        .map(Some)
        .ok_or_else(|| Rejection {
            problem: {
                use mpp::PaymentError;
                Box::new(
                    mpp::MppError::MalformedCredential(Some(format!(
                        "_meta[\"{CREDENTIAL_META_KEY}\"] is not a Payment credential"
                    )))
                    .to_problem_details(None),
                )
            },
            retryable: false,
        })
}

/// A JSON-RPC error (code, message, data) asking for payment. `words` is the human message.
pub fn payment_required(
    challenge: &PaymentChallenge,
    rejection: Option<&Rejection>,
    words: &str,
) -> (i32, String, serde_json::Value) {
    let e = match rejection {
        None => mpp::mcp::payment_required_error(challenge),
        Some(r) => mpp::mcp::payment_required_error_with_problem(challenge, (*r.problem).clone()),
    };
    let message = match rejection {
        None => words.to_owned(),
        Some(r) => format!("{} — {words}", r.problem.detail),
    };
    let data = serde_json::to_value(&e.data).unwrap_or(serde_json::Value::Null);
    (e.code, message, data)
}

/// The receipt as it goes into `result._meta`.
pub fn receipt_meta(receipt: &Receipt, challenge_id: &str) -> serde_json::Value {
    let mut v = serde_json::json!({});
    mpp::mcp::attach_receipt(&mut v, receipt, challenge_id);
    v.get("_meta")
        .and_then(|m| m.get(RECEIPT_META_KEY))
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}
