//! Cooperative close, handled here rather than by the crate: mppx 0.11 sends no
//! `closeSignature` (the crate requires one), and what the payee may capture depends on the
//! account's unused credit, which only tollgate knows.
//!
//! Steps, each recorded before the next so that a retry resumes instead of repeating:
//! 1. verify the echoed challenge (HMAC, expiry) and the final voucher's signature;
//! 2. record the final voucher (crediting any rise, like any voucher) and mark the channel
//!    `closing`, so no later voucher is accepted;
//! 3. withdraw the account's unused credit, up to what the channel could refund, with one
//!    idempotent charge (`mpp-close:{channel}`);
//! 4. `capture = cumulative − refund`; send `close(descriptor, cumulative, capture, sig)`;
//! 5. mark it finalized with the transaction hash; the receipt reports `spent = capture`.

use alloy::primitives::{Address, B256};
use mpp::protocol::methods::tempo::SessionCredentialPayload;
use mpp::protocol::methods::tempo::SessionReceipt;
use mpp::protocol::methods::tempo::precompile_voucher::{
    compute_precompile_channel_id_with_escrow, verify_precompile_voucher_signature,
};
use mpp::protocol::methods::tempo::session::ChannelDescriptor;
use mpp::{PaymentCredential, VerificationError};

use crate::channels::{ChainOp, CloseRecord, PendingCredit, Update};
use crate::{Accepted, Action, Payments, Realm, Rejection};
use tollgate_metering::units::{PICOS_PER_BASE_UNIT, base_to_picos, picos_to_base};

pub(crate) async fn close(
    p: &Payments,
    realm: Realm,
    cred: &PaymentCredential,
    payload: SessionCredentialPayload,
) -> Result<Accepted, Rejection> {
    let SessionCredentialPayload::Close {
        channel_id,
        descriptor,
        cumulative_amount,
        signature,
        ..
    } = payload
    else {
        return Err(Rejection::invalid("payload", "not a close"));
    };
    verify_echo(p, realm, cred)?;
    let id_str = channel_id.to_ascii_lowercase();
    let id: B256 = id_str
        .parse()
        .map_err(|_| Rejection::invalid("payload", "channelId is not a 32-byte hex id"))?;
    let cumulative: u128 = cumulative_amount
        .parse()
        .map_err(|_| Rejection::invalid("payload", "cumulativeAmount is not an integer"))?;
    let sig = alloy::hex::decode(&signature)
        .map_err(|_| Rejection::invalid("payload", "signature is not hex"))?;

    let record = p
        .backend
        .get(&id_str)
        .await
        .map_err(Rejection::from_verification)?
        .ok_or_else(|| Rejection::invalid("not-found", "no open channel with this id here"))?;
    if record.state.finalized {
        // A retry of a close that already happened: answer it again.
        return match &record.close {
            Some(c) if c.cumulative == cumulative && c.tx_hash.is_some() => {
                Ok(receipt(p, cred, &id_str, &record.account, c))
            }
            _ => Err(Rejection::invalid("closed", "this channel is closed")),
        };
    }
    let signer = if record.state.authorized_signer == Address::ZERO {
        record.state.payer
    } else {
        record.state.authorized_signer
    };
    let valid = verify_precompile_voucher_signature(
        &sig,
        signer,
        id,
        cumulative,
        p.cfg.escrow,
        p.cfg.chain_id,
    )
    .unwrap_or(false);
    if !valid {
        return Err(Rejection::invalid(
            "signature",
            "the close voucher is not signed by the channel's signer",
        ));
    }
    if cumulative < record.state.highest_voucher_amount {
        return Err(Rejection::invalid(
            "amount",
            format!(
                "close amount {cumulative} is below the accepted cumulative {}",
                record.state.highest_voucher_amount
            ),
        ));
    }
    if cumulative > record.state.deposit {
        return Err(Rejection::invalid(
            "deposit",
            "close amount is above the channel's deposit",
        ));
    }
    let descriptor = match (&record.descriptor, descriptor) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) if identifies(p, &d, id) => d,
        _ => {
            return Err(Rejection::invalid(
                "payload",
                "close needs the channel descriptor",
            ));
        }
    };

    // 2. Final voucher and `closing`, in one commit (with the credit of any rise).
    let challenge_id = cred.challenge.id.clone();
    let (sig2, desc2) = (sig.clone(), descriptor.clone());
    let id2 = id_str.clone();
    let record = p
        .backend
        .update(
            &id_str,
            Box::new(move |prev| {
                let mut r = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                if r.state.finalized {
                    return Err(VerificationError::channel_closed("closed meanwhile"));
                }
                // Checked again here, inside the atomic update that records the close: a higher
                // voucher may have been accepted on another node since the read above, and a
                // close recorded below it would leave that voucher's credit uncapturable.
                if cumulative < r.state.highest_voucher_amount {
                    return Err(VerificationError::invalid_amount(format!(
                        "close amount {cumulative} is below the accepted cumulative {}",
                        r.state.highest_voucher_amount
                    )));
                }
                // The first close fixes the amount: a second one at another amount would credit
                // a rise while the first close's refund is already decided.
                if let Some(c) = &r.close
                    && c.cumulative != cumulative
                {
                    return Err(VerificationError::channel_closed(format!(
                        "a close at {} is in progress",
                        c.cumulative
                    )));
                }
                let mut credits = Vec::new();
                if cumulative > r.state.highest_voucher_amount {
                    let delta = cumulative - r.state.highest_voucher_amount;
                    credits.push(PendingCredit {
                        key: format!("mpp:{id2}:{cumulative}"),
                        account: r.account.clone(),
                        picos: base_to_picos(delta).ok_or_else(|| {
                            VerificationError::invalid_amount("close adds too much at once")
                        })?,
                        reverses: None,
                        not_before_ms: None,
                    });
                    r.state.highest_voucher_amount = cumulative;
                    r.state.highest_voucher_signature = Some(sig2.clone());
                }
                r.state.closing = true;
                if r.descriptor.is_none() {
                    r.descriptor = Some(desc2);
                }
                if r.close.is_none() {
                    r.close = Some(CloseRecord {
                        cumulative,
                        signature: sig2,
                        capture: 0,
                        refund_picos: 0,
                        refund_ask_picos: None,
                        challenge_id,
                        tx_hash: None,
                    });
                }
                Ok(Update { record: r, credits })
            }),
        )
        .await
        .map_err(Rejection::from_verification)?;
    let _ = record;
    p.drain_credits()
        .await
        .map_err(Rejection::from_verification)?;
    let (account, c) = finish_close(p, &id_str).await?;
    Ok(receipt(p, cred, &id_str, &account, &c))
}

/// Steps 3–5 for a channel whose close is recorded: withdraw the unused credit (the ask is
/// fixed once and stored, so a retry charges the same key with the same amount), close on
/// chain, finalize. Resumable: the client's retry and the background reconciler both call it.
pub(crate) async fn finish_close(
    p: &Payments,
    id_str: &str,
) -> Result<(String, CloseRecord), Rejection> {
    let unavailable = |what: String| {
        Rejection::from_verification(VerificationError::network_error(what).retryable())
    };
    let record = p
        .backend
        .get(id_str)
        .await
        .map_err(Rejection::from_verification)?
        .ok_or_else(|| Rejection::invalid("not-found", "no channel with this id here"))?;
    let Some(close) = record.close.clone() else {
        return Err(Rejection::invalid(
            "payload",
            "no close recorded for this channel",
        ));
    };
    if record.state.finalized {
        return Ok((record.account, close));
    }
    let descriptor = record
        .descriptor
        .clone()
        .ok_or_else(|| Rejection::invalid("payload", "close needs the channel descriptor"))?;
    let id: B256 = id_str
        .parse()
        .map_err(|_| Rejection::invalid("payload", "bad channel id"))?;
    let cumulative = close.cumulative;
    // The chain is the truth for what is settled (a settlement may have landed meanwhile), and
    // for whether the channel still exists (an earlier attempt may have closed it).
    let on_chain = p
        .chain
        .channel(id)
        .await
        .map_err(|e| unavailable(format!("chain: {e}")))?;
    if on_chain.deposit == 0 {
        // Gone on chain: closed by an earlier attempt whose answer was lost, or withdrawn by
        // the payer. What we got is in the escrow's `ChannelClosed` event: the close watcher
        // reads it, writes off any credit it does not cover, and closes the books.
        p.backend
            .forced_add(id_str)
            .await
            .map_err(Rejection::from_verification)?;
        p.close_watch_wake.notify_one();
        tracing::warn!(channel = %id_str, "channel already gone on chain; the close watcher settles its books");
        return Ok((record.account, close));
    }
    let settled = on_chain.settled.max(record.state.settled_on_chain);
    let refundable = cumulative.saturating_sub(settled);

    // 3. Withdraw unused credit, with an ask fixed at the first attempt.
    let ask = match close.refund_ask_picos {
        Some(a) => a,
        None => {
            let a = base_to_picos(refundable)
                .unwrap_or(tollgate_metering::MAX_OP_AMOUNT)
                .min(tollgate_metering::MAX_OP_AMOUNT);
            p.backend
                .update(
                    id_str,
                    Box::new(move |prev| {
                        let mut r =
                            prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                        if let Some(c) = r.close.as_mut()
                            && c.refund_ask_picos.is_none()
                        {
                            c.refund_ask_picos = Some(a);
                        }
                        Ok(Update {
                            record: r,
                            credits: Vec::new(),
                        })
                    }),
                )
                .await
                .map_err(Rejection::from_verification)?
                .close
                .and_then(|c| c.refund_ask_picos)
                .unwrap_or(a)
        }
    };
    let taken = if ask > 0 {
        p.money
            .charge(&record.account, &format!("mpp-close:{id_str}"), ask, true)
            .await
            .map_err(|e| unavailable(format!("money store: {e}")))?
            .taken
    } else {
        0
    };
    // Whole base units only (the sub-micro-dollar remainder stays captured), and never below
    // what is settled. Credit withdrawn that cannot go back on chain returns to the account.
    let taken_base = picos_to_base(taken);
    let refund = taken_base.min(refundable);
    let capture = cumulative - refund;
    if taken_base > refund {
        let back = base_to_picos(taken_base - refund).unwrap_or(0);
        let account = record.account.clone();
        let key = format!("mpp-close-return:{id_str}");
        p.backend
            .update(
                id_str,
                Box::new(move |prev| {
                    let r = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                    Ok(Update {
                        record: r,
                        credits: vec![PendingCredit {
                            key,
                            account,
                            picos: back,
                            reverses: None,
                            not_before_ms: None,
                        }],
                    })
                }),
            )
            .await
            .map_err(Rejection::from_verification)?;
        let _ = p.drain_credits().await;
    }

    // 4. Close on chain.
    let tx = p
        .chain
        .close(&descriptor, cumulative, capture, &close.signature)
        .await
        .map_err(|e| {
            p.metrics.chain_op("close", false);
            tracing::warn!(channel = %id_str, error = %e, "close transaction failed");
            unavailable(format!("close transaction: {e}"))
        })?;
    p.metrics.chain_op("close", true);
    let tx_hash = format!("{tx:#x}");

    // 5. Finalize.
    let record = mark_closed(p, id_str, Some((capture, refund)), Some(tx_hash.clone())).await?;
    tracing::info!(channel = %id_str, account = %record.account, cumulative, capture, refund, tx = %tx_hash, "channel closed");
    let c = record
        .close
        .ok_or_else(|| Rejection::invalid("payload", "close record missing"))?;
    Ok((record.account, c))
}

async fn mark_closed(
    p: &Payments,
    id_str: &str,
    amounts: Option<(u128, u128)>,
    tx_hash: Option<String>,
) -> Result<crate::channels::ChannelRecord, Rejection> {
    p.backend
        .update(
            id_str,
            Box::new(move |prev| {
                let mut r = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                r.state.finalized = true;
                r.state.closing = false;
                if let Some(c) = r.close.as_mut() {
                    if let Some((capture, refund)) = amounts {
                        c.capture = capture;
                        c.refund_picos = (refund as i64).saturating_mul(PICOS_PER_BASE_UNIT);
                        r.state.settled_on_chain = capture;
                        r.state.spent = capture;
                    }
                    c.tx_hash = tx_hash.clone();
                }
                if let (Some(tx), Some(c)) = (tx_hash, r.close.as_ref()) {
                    r.chain_ops.push(ChainOp {
                        kind: "close".into(),
                        cumulative: c.cumulative,
                        settled: c.capture,
                        tx_hash: tx,
                        at_ms: now_ms(),
                    });
                }
                Ok(Update {
                    record: r,
                    credits: Vec::new(),
                })
            }),
        )
        .await
        .map_err(Rejection::from_verification)
}

fn receipt(
    p: &Payments,
    cred: &PaymentCredential,
    id: &str,
    account: &str,
    c: &CloseRecord,
) -> Accepted {
    let mut r = SessionReceipt::new(
        time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        cred.challenge.id.clone(),
        id,
        c.cumulative.to_string(),
        c.capture.to_string(),
    );
    r.tx_hash = c.tx_hash.clone();
    let _ = p;
    Accepted {
        account: account.to_owned(),
        action: Action::Close,
        channel_id: id.to_owned(),
        accepted_cumulative: c.cumulative,
        receipt: r.to_base_receipt(),
        challenge_id: cred.challenge.id.clone(),
    }
}

fn identifies(p: &Payments, d: &ChannelDescriptor, id: B256) -> bool {
    let Ok(w) = crate::chain::wire_descriptor(d) else {
        return false;
    };
    compute_precompile_channel_id_with_escrow(
        w.payer,
        w.payee,
        w.operator,
        w.token,
        w.salt,
        w.authorizedSigner,
        w.expiringNonceHash,
        p.cfg.escrow,
        p.cfg.chain_id,
    ) == id
}

/// The crate's HMAC and expiry check is private; the same check over the echoed challenge.
fn verify_echo(p: &Payments, realm: Realm, cred: &PaymentCredential) -> Result<(), Rejection> {
    let c = &cred.challenge;
    let expected = mpp::compute_challenge_id_with_header(
        p.cfg.secret.expose(),
        &c.realm,
        c.method.as_str(),
        c.intent.as_str(),
        c.request.raw(),
        c.expires.as_deref(),
        c.digest.as_deref(),
        c.opaque.as_ref().map(|o| o.raw()),
        c.header.as_deref(),
    );
    if c.realm != p.realm_name(realm) || !constant_time_eq(expected.as_bytes(), c.id.as_bytes()) {
        return Err(Rejection::invalid(
            "challenge",
            "challenge was not issued by this server",
        ));
    }
    let expires = c
        .expires
        .as_deref()
        .and_then(|e| {
            time::OffsetDateTime::parse(e, &time::format_description::well_known::Rfc3339).ok()
        })
        .ok_or_else(|| Rejection::invalid("challenge", "challenge has no valid expires"))?;
    if expires < time::OffsetDateTime::now_utc() {
        return Err(Rejection::invalid("expired", "challenge expired"));
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
