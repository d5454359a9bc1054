//! Pending credits into the money core: vouchers' credits, reversals of charges, write-offs
//! given back. Each is applied once by its key; one the money store refuses for good is set
//! aside for an operator instead of holding up the others.

use mpp::VerificationError;

use crate::Payments;
use crate::channels::{self, PendingCredit, PoisonedCredit};
use crate::close;

impl Payments {
    /// Applies pending credits to the money core (idempotent per key) and forgets them.
    /// Returns how many were applied now. A credit the money store refuses for good (an amount
    /// over the per-operation cap, a key reused with another amount) is set aside, counted and
    /// logged, and the drain goes on: one bad entry never holds up other payers' credit.
    pub async fn drain_credits(&self) -> Result<usize, VerificationError> {
        // Held reversals whose deadline passed become pending (their start never said).
        let now = close::now_ms();
        for h in self.backend.held_credits().await? {
            if h.not_before_ms.is_none_or(|t| t <= now) {
                let due = channels::PendingCredit {
                    not_before_ms: None,
                    ..h.clone()
                };
                if self.backend.unhold(&h.key, Some(&due)).await? {
                    tracing::warn!(key = %h.key, account = %h.account, amount = h.picos, "a start's charge is given back: its outcome was never recorded before the deadline (the process died, or the start never finished)");
                }
            }
        }
        let pending = self.backend.pending_credits().await?;
        let mut applied = 0;
        let mut left = pending.len();
        let mut unavailable = None;
        for c in pending {
            // A hold written as pending by an earlier build waits for its deadline too.
            if c.not_before_ms.is_some_and(|t| t > now) {
                continue;
            }
            match self.apply_credit(&c).await {
                Ok(now) => {
                    left -= 1;
                    if now {
                        applied += 1;
                    }
                }
                Err(CreditFailure::Refused(reason)) => {
                    left -= 1;
                    self.metrics.credits_poisoned.inc();
                    tracing::error!(key = %c.key, account = %c.account, amount = c.picos, reason = %reason, "pending credit refused for good: set aside (tollgate payments credits list)");
                    self.backend
                        .poison(&PoisonedCredit {
                            credit: c,
                            reason,
                            at_ms: close::now_ms(),
                        })
                        .await?;
                }
                // The store is away: the others would fail the same way. Retried next round.
                Err(CreditFailure::Unavailable(e)) => {
                    unavailable = Some(e);
                    break;
                }
            }
        }
        self.metrics.credits_pending.set(left as i64);
        if let Ok(p) = self.backend.poisoned().await {
            self.metrics.credits_poisoned_now.set(p.len() as i64);
        }
        match unavailable {
            Some(e) => {
                Err(VerificationError::network_error(format!("money store: {e}")).retryable())
            }
            None => Ok(applied),
        }
    }

    /// One pending credit into the money core; true when it was applied now (not before).
    async fn apply_credit(&self, c: &PendingCredit) -> Result<bool, CreditFailure> {
        use tollgate_metering::{ChargeError, CreditError};
        let mut amount = c.picos;
        if let Some(charge_key) = &c.reverses {
            // A reversal: take hold of the charge's key first. If the charge landed, this
            // answers what it took; if not, it records the key now (taking whatever the balance
            // allows, possibly nothing), so the charge can never land later, unreversed. Then
            // exactly what the key took is given back.
            match self
                .money
                .charge(&c.account, charge_key, c.picos, true)
                .await
            {
                Ok(o) => amount = o.taken,
                Err(ChargeError::Unavailable(e)) => return Err(CreditFailure::Unavailable(e)),
                Err(e) => {
                    return Err(CreditFailure::Refused(format!(
                        "reversal of {charge_key}: {e}"
                    )));
                }
            }
            if amount == 0 {
                self.backend
                    .credit_done(&c.key)
                    .await
                    .map_err(|e| CreditFailure::Unavailable(e.message))?;
                return Ok(false);
            }
        }
        match self.money.credit(&c.account, &c.key, amount).await {
            Ok(o) => {
                if o.applied {
                    self.metrics.credited(amount);
                }
                self.backend
                    .credit_done(&c.key)
                    .await
                    .map_err(|e| CreditFailure::Unavailable(e.message))?;
                Ok(o.applied)
            }
            Err(CreditError::Unavailable(e)) => Err(CreditFailure::Unavailable(e)),
            Err(e) => Err(CreditFailure::Refused(e.to_string())),
        }
    }

    /// Pending credits set aside, for operators.
    pub async fn poisoned_credits(&self) -> Result<Vec<PoisonedCredit>, VerificationError> {
        self.backend.poisoned().await
    }

    /// Resolves a set-aside credit: `retry` puts it back in the drain (after the cause was
    /// fixed), otherwise it is dropped (logged; the operator settles it by other means, e.g.
    /// `tollgate accounts credit`). `None` when no such key is set aside.
    pub async fn resolve_poisoned(
        &self,
        key: &str,
        retry: bool,
    ) -> Result<Option<PoisonedCredit>, VerificationError> {
        let p = self.backend.unpoison(key, retry).await?;
        if let Some(p) = &p {
            tracing::warn!(key, account = %p.credit.account, amount = p.credit.picos, retry, "set-aside credit resolved by an operator");
            if retry {
                let _ = self.drain_credits().await;
            }
        }
        Ok(p)
    }

    /// Before a start's charge is taken (a deploy, a rollback): records its reversal durably,
    /// held until `hold` from now. The start going live releases it
    /// ([`Payments::release_reversal`]); a start that fails makes it due now
    /// ([`Payments::reverse_charge`]); if nobody says (the process died mid-deploy, the
    /// client went away and the call was dropped), it falls due at the deadline and the drain
    /// gives the charge back. So a charge never stands for a start that did not go live.
    pub async fn hold_reversal(
        &self,
        account: &str,
        charge_key: &str,
        picos: i64,
        hold: std::time::Duration,
    ) -> Result<(), VerificationError> {
        let due =
            close::now_ms().saturating_add(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX));
        self.backend
            .hold(&channels::PendingCredit {
                key: format!("refund:{charge_key}"),
                account: account.to_owned(),
                picos,
                reverses: Some(charge_key.to_owned()),
                not_before_ms: Some(due),
            })
            .await
    }

    /// The start went live: its held reversal goes, the charge stands. False when it was no
    /// longer held (its deadline passed first: the start is given for free; logged).
    pub async fn release_reversal(&self, charge_key: &str) -> Result<bool, VerificationError> {
        let released = self
            .backend
            .unhold(&format!("refund:{charge_key}"), None)
            .await?;
        if !released {
            tracing::error!(
                charge_key,
                "a live start's reversal was already due (its deadline passed before it went live): the start is given for free"
            );
        }
        Ok(released)
    }

    /// Gives back a charge (`charge_key`, `picos`) exactly once, whether or not the charge had
    /// landed: recorded durably first, applied now if the money store answers, else by the
    /// background drain. For a deploy that failed after it was charged, or a charge whose answer
    /// was lost.
    pub async fn reverse_charge(
        &self,
        account: &str,
        charge_key: &str,
        picos: i64,
    ) -> Result<(), VerificationError> {
        // Due now: pending (and out of the held ones, if it was held).
        let due = channels::PendingCredit {
            key: format!("refund:{charge_key}"),
            account: account.to_owned(),
            picos,
            reverses: Some(charge_key.to_owned()),
            not_before_ms: None,
        };
        self.backend.unhold(&due.key, Some(&due)).await?;
        self.backend.add_pending(&due).await?;
        self.drain_credits().await.map(|_| ())
    }
}

/// Why a pending credit did not apply.
enum CreditFailure {
    /// The money store refuses it, and would again: set it aside.
    Refused(String),
    /// The money store cannot be reached: try again later.
    Unavailable(String),
}
