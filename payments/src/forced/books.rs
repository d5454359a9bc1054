//! Write-offs: the one a close case makes when its deadline passes, and the true-up to what
//! the payee got once the channel is gone.

use tollgate_metering::units::base_to_picos;

use super::case::write_off_key;
use crate::Payments;
use crate::channels::{ChannelRecord, CloseBooks, PendingCredit, edit};

/// What a cooperative close already withdrew from the account (p$): the same idempotent
/// charge, applied now if it had not landed.
pub(super) async fn close_refund_taken(
    p: &Payments,
    record: &ChannelRecord,
) -> Result<i64, String> {
    let id = record.state.channel_id.to_ascii_lowercase();
    match record.close.as_ref().and_then(|c| c.refund_ask_picos) {
        Some(ask) if ask > 0 => Ok(p
            .money
            .charge(&record.account, &format!("mpp-close:{id}"), ask, true)
            .await
            .map_err(|e| format!("money store: {e}"))?
            .taken),
        _ => Ok(0),
    }
}

/// Writes off the credit `unbacked` base units backed, for the channel's current close request
/// (once per request: the amount is pinned first, and the key carries the request's cycle).
pub(super) async fn write_off(
    p: &Payments,
    record: &ChannelRecord,
    unbacked: u128,
) -> Result<(), String> {
    let id = record.state.channel_id.to_ascii_lowercase();
    let Some(cycle) = record
        .forced_close
        .as_ref()
        .filter(|f| f.active())
        .map(|f| f.cycle)
    else {
        return Ok(());
    };
    let want = base_to_picos(unbacked)
        .unwrap_or(tollgate_metering::MAX_OP_AMOUNT)
        .saturating_sub(close_refund_taken(p, record).await?)
        .min(tollgate_metering::MAX_OP_AMOUNT);
    if want <= 0 {
        return Ok(());
    }
    // Pinned only while this request is still unresolved: a write-off must never start for a
    // request already captured or cancelled (nothing would give it back).
    let pinned = p
        .backend
        .update(
            &id,
            edit(move |r| {
                let open = r.closed_on_chain.is_none() && !r.state.finalized;
                if let Some(f) = r.forced_close.as_mut()
                    && open
                    && f.cycle == cycle
                    && f.active()
                    && f.write_off_ask.is_none()
                {
                    f.write_off_ask = Some(want);
                }
                Vec::new()
            }),
        )
        .await
        .map_err(|e| e.message)?
        .forced_close
        .filter(|f| f.cycle == cycle)
        .and_then(|f| f.write_off_ask);
    let Some(ask) = pinned else {
        return Ok(());
    };
    let taken = p
        .money
        .write_off(&record.account, &write_off_key(&id, cycle), ask)
        .await
        .map_err(|e| format!("money store: {e}"))?
        .taken;
    p.backend
        .update(
            &id,
            edit(move |r| {
                if let Some(f) = r.forced_close.as_mut()
                    && f.cycle == cycle
                    && f.written_off.is_none()
                {
                    f.written_off = Some(taken);
                }
                Vec::new()
            }),
        )
        .await
        .map_err(|e| e.message)?;
    p.metrics.written_off(taken);
    tracing::error!(channel = %id, account = %record.account, asked = ask, taken, "voucher not captured before the payer could withdraw: unbacked credit written off");
    Ok(())
}

/// The channel is gone and the payee got `settled` in all: what the account was credited above
/// that is unbacked for good. A write-off of the current request counts towards it; the rest is
/// written off now, or what was written off too much is given back.
pub(super) async fn close_books(
    p: &Payments,
    record: &ChannelRecord,
    settled: u128,
) -> Result<(), String> {
    let id = record.state.channel_id.to_ascii_lowercase();
    let high = record.state.highest_voucher_amount;
    let unbacked = base_to_picos(high.saturating_sub(settled))
        .unwrap_or(tollgate_metering::MAX_OP_AMOUNT)
        .saturating_sub(close_refund_taken(p, record).await?)
        .max(0);
    let f = record.forced_close.clone().unwrap_or_default();
    // A write-off of the last request that stands (not given back) is part of what is due;
    // it must be known before the difference is.
    let mut counted = 0;
    if let Some(ask) = f.write_off_ask.filter(|_| !f.restored) {
        counted = match f.written_off {
            Some(t) => t,
            None => {
                p.money
                    .write_off(&record.account, &write_off_key(&id, f.cycle), ask)
                    .await
                    .map_err(|e| format!("money store: {e}"))?
                    .taken
            }
        };
    }
    let books = record.close_books.clone().unwrap_or_default();
    if unbacked > counted && books.given_back.is_none() {
        let want = (unbacked - counted).min(tollgate_metering::MAX_OP_AMOUNT);
        let ask = pin_books(p, &id, move |b| {
            b.write_off_ask.get_or_insert(want);
        })
        .await?
        .write_off_ask
        .unwrap_or(want);
        let taken = p
            .money
            .write_off(&record.account, &format!("mpp-writeoff:{id}:final"), ask)
            .await
            .map_err(|e| format!("money store: {e}"))?
            .taken;
        if taken > 0 {
            p.metrics.written_off(taken);
            tracing::error!(channel = %id, account = %record.account, asked = ask, taken, "channel gone with credit above what the payee got: written off");
        }
    } else if counted > unbacked && books.write_off_ask.is_none() && books.given_back.is_none() {
        let back = counted - unbacked;
        let account = record.account.clone();
        let key = format!("mpp-writeoff-trueup:{id}");
        p.backend
            .update(
                &id,
                edit(move |r| {
                    let b = r.close_books.get_or_insert_with(CloseBooks::default);
                    let mut credits = Vec::new();
                    if b.given_back.is_none() && b.write_off_ask.is_none() {
                        b.given_back = Some(back);
                        credits.push(PendingCredit {
                            key,
                            account,
                            picos: back,
                            reverses: None,
                            not_before_ms: None,
                        });
                    }
                    credits
                }),
            )
            .await
            .map_err(|e| e.message)?;
        tracing::info!(channel = %id, picos = back, "the payee got more than was known when the credit was written off: the difference is given back");
        p.drain_credits().await.map_err(|e| e.message)?;
    }
    Ok(())
}

async fn pin_books(
    p: &Payments,
    id: &str,
    f: impl FnOnce(&mut CloseBooks) + Send + 'static,
) -> Result<CloseBooks, String> {
    let r = p
        .backend
        .update(
            id,
            edit(move |r| {
                f(r.close_books.get_or_insert_with(CloseBooks::default));
                Vec::new()
            }),
        )
        .await
        .map_err(|e| e.message)?;
    Ok(r.close_books.unwrap_or_default())
}
