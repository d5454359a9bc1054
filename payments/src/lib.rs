//! MPP payments for tollgate: Tempo payment-channel sessions through the official `mpp` crate.
//!
//! Money arrives as cumulative vouchers on a payment channel. Each rise of a channel's accepted
//! cumulative becomes prepaid credit on the payer's account in the money core, exactly once
//! (credit key `mpp:{channel}:{cumulative}`). Spent money is settled on chain on a schedule; a
//! close captures what was spent and refunds the rest of the deposit (the account's unused credit
//! is withdrawn first). See docs/payments.md.
//!
//! Where this departs from the crate (each written down in docs/payments.md):
//! - session challenges are built here: the crate omits `sessionProtocol: "v2"`, which the
//!   mppx client requires;
//! - the echoed escrow and chain id are pinned here (the crate checks only currency and
//!   recipient);
//! - the channel store is shared across nodes and also records credits ([`channels`]);
//! - `close` is handled here: mppx 0.11 sends no `closeSignature`, and the capture must follow
//!   the account's unused credit, which only tollgate knows;
//! - settlement is ours: the crate has no settle API.

pub mod audit;
pub mod chain;
pub mod channels;
pub mod config;
pub mod forced;
pub mod http;
pub mod kv;
pub mod mcp;
pub mod metrics;
pub mod units;

mod close;
mod settle;

use std::sync::Arc;

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use mpp::protocol::methods::tempo::SessionCredentialPayload;
use mpp::server::{
    Mpp, SessionMethodConfig, TempoChargeMethod, TempoConfig, TempoProvider, TempoSessionMethod,
};
use mpp::{
    Base64UrlJson, MppError, PaymentChallenge, PaymentCredential, PaymentError,
    PaymentErrorDetails, Receipt, SessionRequest, VerificationError,
};
use tollgate_metering::Store;

pub use chain::{Chain, ChainError, ChannelEvent, EventPage, OnChain, RpcChain};
pub use channels::{
    ChannelBackend, ChannelRecord, EmbeddedChannels, ForcedClose, Lifecycle, PendingCredit,
    PoisonedCredit, RedisChannels, SharedChannels, account_of,
};
pub use config::PaymentsConfig;
pub use metrics::PaymentMetrics;

type MppServer = Mpp<TempoChargeMethod<TempoProvider>, TempoSessionMethod<TempoProvider>>;

/// The protection space a credential was issued for. Credentials of one are refused at the
/// other: a voucher paid on a hosted service's 402 cannot identify its payer over MCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Realm {
    /// MCP and the HTTP top-up API: the configured public MCP host.
    Platform,
    /// The 402 of hosted services at the proxy (`<platform realm>/services`).
    Services,
}

/// What the payer did with an accepted credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Open,
    Voucher,
    TopUp,
    Close,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Open => "open",
            Action::Voucher => "voucher",
            Action::TopUp => "topUp",
            Action::Close => "close",
        }
    }

    /// Management actions (deposit changes) carry no payment for the request itself: answer
    /// them with 204 and the receipt, without running the paid operation.
    pub fn is_management(self) -> bool {
        matches!(self, Action::TopUp | Action::Close)
    }
}

/// An accepted session credential.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The payer's account (`did:pkh:eip155:{chain}:{address}`).
    pub account: String,
    pub action: Action,
    pub channel_id: String,
    /// The channel's accepted cumulative amount after this credential (base units).
    pub accepted_cumulative: u128,
    pub receipt: Receipt,
    pub challenge_id: String,
}

impl Accepted {
    /// Unique per accepted payment: `{channel}:{cumulative}`.
    pub fn payment_ref(&self) -> String {
        format!("{}:{}", self.channel_id, self.accepted_cumulative)
    }
}

/// A refused credential: a problem document, and whether the same credential may be retried
/// (the store or chain was unavailable: 503) or the client must pay again (402).
#[derive(Debug, Clone)]
pub struct Rejection {
    pub problem: Box<PaymentErrorDetails>,
    pub retryable: bool,
}

impl Rejection {
    pub fn from_verification(e: VerificationError) -> Self {
        let retryable = e.retryable
            || matches!(
                e.code,
                Some(mpp::ErrorCode::NetworkError) | Some(mpp::ErrorCode::Internal)
            );
        let message = e.message.clone();
        let mut problem = MppError::from(e).to_problem_details(None);
        if problem.detail.is_empty() {
            problem.detail = message;
        }
        Rejection {
            problem: Box::new(problem),
            retryable,
        }
    }

    fn invalid(kind: &str, detail: impl Into<String>) -> Self {
        let e = match kind {
            "challenge" => VerificationError::invalid_challenge(detail),
            "payload" => VerificationError::invalid_payload(detail),
            "signature" => VerificationError::invalid_signature(detail),
            "expired" => VerificationError::expired(detail),
            "not-found" => VerificationError::channel_not_found(detail),
            "closed" => VerificationError::channel_closed(detail),
            "deposit" => VerificationError::amount_exceeds_deposit(detail),
            "amount" => VerificationError::invalid_amount(detail),
            _ => VerificationError::new(detail),
        };
        Rejection::from_verification(e)
    }

    /// HTTP status: 503 for retryable failures, the problem's own status otherwise (402, or
    /// 410 for an unknown channel).
    pub fn status(&self) -> u16 {
        if self.retryable {
            503
        } else {
            self.problem.status
        }
    }
}

/// The payments service: one per process, shared by the HTTP and MCP endpoints.
pub struct Payments {
    mpp: MppServer,
    /// The same, for the services realm (the proxy's 402 on hosted URLs).
    services: MppServer,
    cfg: PaymentsConfig,
    payee: Address,
    backend: Arc<dyn ChannelBackend>,
    money: Arc<dyn Store>,
    chain: Arc<dyn Chain>,
    pub metrics: PaymentMetrics,
    /// Wakes the close watcher (a voucher found a close request).
    pub(crate) close_watch_wake: tokio::sync::Notify,
    pub(crate) chain_clock: forced::ChainClock,
}

impl Payments {
    /// `kv` backs the crate's replay protection for identity proofs (Redis in production,
    /// a directory in `dev`); `backend` holds channels; `money` is the money core.
    pub fn new(
        cfg: PaymentsConfig,
        backend: Arc<dyn ChannelBackend>,
        kv: Arc<dyn mpp::Store>,
        money: Arc<dyn Store>,
        chain: Arc<dyn Chain>,
    ) -> Result<Self, String> {
        let signer: PrivateKeySigner = cfg
            .payee_key
            .expose()
            .parse()
            .map_err(|_| "payments.payee_key is not a secp256k1 private key (64 hex digits)")?;
        let payee = signer.address();
        let backend_for = |realm: &str| -> Result<MppServer, String> {
            let session = TempoSessionMethod::new(
                mpp::server::tempo_provider(&cfg.rpc_url).map_err(|e| e.to_string())?,
                Arc::new(SharedChannels::new(backend.clone(), cfg.chain_id)),
                SessionMethodConfig {
                    escrow_contract: cfg.escrow,
                    chain_id: cfg.chain_id,
                    min_voucher_delta: cfg.min_voucher_delta,
                },
            );
            Ok(Mpp::create(
                mpp::server::tempo(TempoConfig {
                    recipient: &format!("{payee:#x}"),
                })
                .rpc_url(&cfg.rpc_url)
                .chain_id(cfg.chain_id)
                .currency(&format!("{:#x}", cfg.currency))
                .secret_key(cfg.secret.expose())
                .realm(realm)
                .store(kv.clone()),
            )
            .map_err(|e| e.to_string())?
            .with_session_method(session))
        };
        let mpp = backend_for(&cfg.realm)?;
        let services = backend_for(&cfg.services_realm())?;
        Ok(Payments {
            mpp,
            services,
            cfg,
            payee,
            backend,
            money,
            chain,
            metrics: PaymentMetrics::new().map_err(|e| e.to_string())?,
            close_watch_wake: tokio::sync::Notify::new(),
            chain_clock: forced::ChainClock::default(),
        })
    }

    pub fn config(&self) -> &PaymentsConfig {
        &self.cfg
    }

    /// The address that receives payments (and signs settlements).
    pub fn payee(&self) -> Address {
        self.payee
    }

    pub fn money(&self) -> &Arc<dyn Store> {
        &self.money
    }

    /// A session challenge for `amount` base units of credit (sessionProtocol v2, the TIP-1034
    /// escrow). The client opens a channel with the suggested deposit on first use, then raises
    /// its voucher by `amount` per paid call.
    pub fn session_challenge(
        &self,
        amount: u128,
        description: Option<&str>,
    ) -> Result<PaymentChallenge, String> {
        self.session_challenge_in(Realm::Platform, amount, description)
    }

    /// [`Payments::session_challenge`] for a realm.
    pub fn session_challenge_in(
        &self,
        realm: Realm,
        amount: u128,
        description: Option<&str>,
    ) -> Result<PaymentChallenge, String> {
        let realm = self.realm_name(realm);
        let deposit = amount.max(self.cfg.suggested_deposit);
        let mut details = serde_json::json!({
            "chainId": self.cfg.chain_id,
            "escrowContract": format!("{:#x}", self.cfg.escrow),
            "sessionProtocol": "v2",
        });
        if self.cfg.min_voucher_delta > 0
            && let Some(obj) = details.as_object_mut()
        {
            obj.insert(
                "minVoucherDelta".into(),
                self.cfg.min_voucher_delta.to_string().into(),
            );
        }
        let request = SessionRequest {
            amount: amount.to_string(),
            unit_type: Some("request".into()),
            currency: format!("{:#x}", self.cfg.currency),
            recipient: Some(format!("{:#x}", self.payee)),
            suggested_deposit: Some(deposit.to_string()),
            method_details: Some(details),
            ..Default::default()
        };
        let request = Base64UrlJson::from_typed(&request).map_err(|e| e.to_string())?;
        let expires = expires_in(self.cfg.challenge_ttl)?;
        let id = mpp::compute_challenge_id(
            self.cfg.secret.expose(),
            &realm,
            "tempo",
            "session",
            request.raw(),
            Some(&expires),
            None,
            None,
        );
        Ok(PaymentChallenge {
            id,
            realm,
            method: "tempo".into(),
            intent: "session".into(),
            request,
            expires: Some(expires),
            description: description.map(str::to_owned),
            digest: None,
            opaque: None,
            header: None,
        })
    }

    /// A zero-amount challenge: the client answers with a signed proof of its address (the
    /// spec's `proof` credential), which identifies the payer without moving money.
    pub fn identity_challenge(&self) -> Result<PaymentChallenge, String> {
        // Short-lived: a proof is single-use, and the less time a copied challenge has, the
        // less use it is to anyone replaying it.
        let expires = expires_in(self.cfg.challenge_ttl)?;
        self.mpp
            .charge_with_options(
                "0",
                mpp::server::ChargeOptions {
                    expires: Some(&expires),
                    ..Default::default()
                },
            )
            .map_err(|e| e.to_string())?
            .into_iter()
            .next()
            .ok_or_else(|| "no identity challenge".to_owned())
    }

    /// The realm string of a protection space.
    pub fn realm_name(&self, realm: Realm) -> String {
        match realm {
            Realm::Platform => self.cfg.realm.clone(),
            Realm::Services => self.cfg.services_realm(),
        }
    }

    /// Verifies an identity proof (or any session credential, which identifies its payer too)
    /// and returns the payer's account and a reference unique to this proof or payment (a proof
    /// is single-use; a voucher's `channel:cumulative` is accepted once).
    pub async fn identify(&self, cred: &PaymentCredential) -> Result<(String, String), Rejection> {
        match cred.challenge.intent.as_str() {
            "charge" => {
                self.mpp
                    .verify_charge(cred, "0")
                    .await
                    .map_err(Rejection::from_verification)?;
                let source = cred.source.as_deref().unwrap_or("");
                let account = self.account_from_did(source).ok_or_else(|| {
                    Rejection::invalid("payload", "proof has no valid did:pkh source")
                })?;
                Ok((account, format!("proof:{}", cred.challenge.id)))
            }
            "session" => {
                // Only payments identify: a close or a deposit top-up moves no money for the
                // call, and a close is answered again when replayed. Only the platform realm's:
                // a voucher paid on a hosted service's 402 identifies nobody here.
                let a = self.accept(cred).await?;
                if a.action.is_management() {
                    return Err(Rejection::invalid(
                        "payload",
                        "a close or deposit top-up does not identify a caller; send a proof",
                    ));
                }
                let r = a.payment_ref();
                Ok((a.account, r))
            }
            other => Err(Rejection::invalid(
                "challenge",
                format!("intent '{other}' is not accepted here"),
            )),
        }
    }

    fn account_from_did(&self, did: &str) -> Option<String> {
        let rest = did.strip_prefix("did:pkh:eip155:")?;
        let (chain, addr) = rest.split_once(':')?;
        if chain.parse::<u64>().ok()? != self.cfg.chain_id {
            return None;
        }
        let addr: Address = addr.parse().ok()?;
        Some(account_of(self.cfg.chain_id, &addr))
    }

    /// Accepts a session credential (open, voucher, topUp or close): verifies it, records the
    /// channel's new state, and credits each rise of the accepted cumulative to the payer's
    /// account. Retrying the same credential credits nothing more.
    pub async fn accept(&self, cred: &PaymentCredential) -> Result<Accepted, Rejection> {
        self.accept_in(Realm::Platform, cred).await
    }

    /// [`Payments::accept`] in a realm: a credential for a challenge of another realm is
    /// refused (its HMAC binds the realm it was issued for).
    pub async fn accept_in(
        &self,
        realm: Realm,
        cred: &PaymentCredential,
    ) -> Result<Accepted, Rejection> {
        let started = std::time::Instant::now();
        let result = self.accept_inner(realm, cred).await;
        self.metrics.observe(cred, &result, started.elapsed());
        result
    }

    async fn accept_inner(
        &self,
        realm: Realm,
        cred: &PaymentCredential,
    ) -> Result<Accepted, Rejection> {
        if cred.challenge.method.as_str() != "tempo" || cred.challenge.intent.as_str() != "session"
        {
            return Err(Rejection::invalid(
                "challenge",
                "expected a tempo session credential",
            ));
        }
        if cred.challenge.realm != self.realm_name(realm) {
            return Err(Rejection::invalid(
                "challenge",
                "this credential answers a challenge of another realm; ask this endpoint for a challenge",
            ));
        }
        self.check_pins(cred)?;
        let payload: SessionCredentialPayload = serde_json::from_value(cred.payload.clone())
            .map_err(|e| Rejection::invalid("payload", format!("session payload: {e}")))?;
        let (action, channel_id, descriptor) = match &payload {
            SessionCredentialPayload::Open {
                channel_id,
                descriptor,
                ..
            } => (Action::Open, channel_id, descriptor),
            SessionCredentialPayload::Voucher {
                channel_id,
                descriptor,
                ..
            } => (Action::Voucher, channel_id, descriptor),
            SessionCredentialPayload::TopUp {
                channel_id,
                descriptor,
                ..
            } => (Action::TopUp, channel_id, descriptor),
            SessionCredentialPayload::Close { .. } => {
                return close::close(self, realm, cred, payload).await;
            }
        };
        let channel_id = channel_id.to_ascii_lowercase();
        let server = match realm {
            Realm::Platform => &self.mpp,
            Realm::Services => &self.services,
        };
        let verified = match server.verify_session(cred).await {
            Ok(v) => v,
            Err(e) => {
                self.notice_close_request(&channel_id).await;
                return Err(Rejection::from_verification(e));
            }
        };
        if let Some(d) = descriptor {
            // The crate checked that the descriptor identifies this channel.
            self.remember_descriptor(&channel_id, d).await;
        }
        if let Err(e) = self.drain_credits().await {
            // The credit is recorded with the channel; the background drain applies it.
            tracing::warn!(error = %e.message, "credits pending after an accepted voucher");
        }
        let record = self
            .backend
            .get(&channel_id)
            .await
            .map_err(Rejection::from_verification)?
            .ok_or_else(|| Rejection::invalid("not-found", "channel vanished after accept"))?;
        Ok(Accepted {
            account: record.account,
            action,
            channel_id,
            accepted_cumulative: record.state.highest_voucher_amount,
            receipt: verified.receipt,
            challenge_id: cred.challenge.id.clone(),
        })
    }

    /// A refused voucher may be the first sign that the payer requested a close on chain (the
    /// crate reads the channel on every voucher and records the request): hand the channel to
    /// the close watcher at once.
    async fn notice_close_request(&self, channel_id: &str) {
        if let Ok(Some(r)) = self.backend.get(channel_id).await
            && r.state.close_requested_at != 0
            && !r.state.finalized
            && r.forced_close.as_ref().is_none_or(|f| f.cancelled)
        {
            let grace_end = r
                .state
                .close_requested_at
                .saturating_add(self.cfg.close_grace.as_secs());
            if let Err(e) = forced::request(self, channel_id, grace_end).await {
                tracing::warn!(channel = channel_id, error = %e.message, "close request not recorded yet; the watcher finds it in the escrow's events");
            }
        }
    }

    /// The account a session credential would credit: the channel's payer (the stored channel,
    /// or for an `open` the descriptor, whose payer the crate checks against the transaction's
    /// sender). Read before accepting, to refuse money meant for someone else.
    pub async fn payer_of(&self, cred: &PaymentCredential) -> Option<String> {
        let payload: SessionCredentialPayload =
            serde_json::from_value(cred.payload.clone()).ok()?;
        let (id, descriptor) = match &payload {
            SessionCredentialPayload::Open {
                channel_id,
                descriptor,
                ..
            }
            | SessionCredentialPayload::TopUp {
                channel_id,
                descriptor,
                ..
            }
            | SessionCredentialPayload::Voucher {
                channel_id,
                descriptor,
                ..
            }
            | SessionCredentialPayload::Close {
                channel_id,
                descriptor,
                ..
            } => (channel_id.to_ascii_lowercase(), descriptor),
        };
        if let Ok(Some(r)) = self.backend.get(&id).await {
            return Some(r.account);
        }
        let payer: Address = descriptor.as_ref()?.payer.parse().ok()?;
        Some(account_of(self.cfg.chain_id, &payer))
    }

    /// The crate binds the challenge by HMAC and checks currency and recipient; the escrow and
    /// chain the client used are pinned here too.
    fn check_pins(&self, cred: &PaymentCredential) -> Result<(), Rejection> {
        let request: SessionRequest = cred
            .challenge
            .request
            .decode()
            .map_err(|e| Rejection::invalid("challenge", format!("request: {e}")))?;
        let details = request.method_details.unwrap_or_default();
        let escrow = details
            .get("escrowContract")
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse::<Address>().ok());
        let chain = details.get("chainId").and_then(|v| v.as_u64());
        if escrow != Some(self.cfg.escrow) || chain != Some(self.cfg.chain_id) {
            return Err(Rejection::invalid(
                "challenge",
                "the challenge names another escrow or chain than this server uses",
            ));
        }
        Ok(())
    }

    async fn remember_descriptor(
        &self,
        channel_id: &str,
        d: &mpp::protocol::methods::tempo::session::ChannelDescriptor,
    ) {
        let d = d.clone();
        let r = self
            .backend
            .update(
                channel_id,
                Box::new(move |prev| {
                    let mut record = prev
                        .ok_or_else(|| VerificationError::channel_not_found("no such channel"))?;
                    if record.descriptor.is_none() {
                        record.descriptor = Some(d);
                    }
                    Ok(channels::Update {
                        record,
                        credits: Vec::new(),
                    })
                }),
            )
            .await;
        if let Err(e) = r {
            tracing::warn!(channel = channel_id, error = %e.message, "descriptor not stored yet");
        }
    }

    /// Applies pending credits to the money core (idempotent per key) and forgets them.
    /// Returns how many were applied now. A credit the money store refuses for good (an amount
    /// over the per-operation cap, a key reused with another amount) is set aside, counted and
    /// logged, and the drain goes on: one bad entry never holds up other payers' credit.
    pub async fn drain_credits(&self) -> Result<usize, VerificationError> {
        let pending = self.backend.pending_credits().await?;
        let mut applied = 0;
        let mut left = pending.len();
        let mut unavailable = None;
        for c in pending {
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
        self.backend
            .add_pending(&channels::PendingCredit {
                key: format!("refund:{charge_key}"),
                account: account.to_owned(),
                picos,
                reverses: Some(charge_key.to_owned()),
            })
            .await?;
        self.drain_credits().await.map(|_| ())
    }

    /// Runs the background work until `stop` resolves: pending credits (every second) and
    /// the settlement schedule.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut credit_tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut settle_tick = tokio::time::interval(self.cfg.settle_interval);
        let mut watch_tick = tokio::time::interval(self.cfg.close_watch_interval);
        credit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        settle_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        watch_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = watch_tick.tick() => self.watch_closes_logged().await,
                _ = self.close_watch_wake.notified() => self.watch_closes_logged().await,
                _ = credit_tick.tick() => {
                    if let Err(e) = self.drain_credits().await {
                        tracing::warn!(error = %e.message, "pending credits not applied yet");
                    }
                }
                _ = settle_tick.tick() => {
                    if let Err(e) = settle::settle_due(&self).await {
                        tracing::warn!(error = %e, "settlement round failed");
                    }
                }
            }
        }
    }

    /// One settlement round now (tests, operators).
    pub async fn settle_now(&self) -> Result<usize, String> {
        settle::settle_due(self).await
    }

    /// One round of the close watcher now (tests, operators): reads the escrow's close
    /// requests, captures the vouchers of channels closing on chain, writes off what can no
    /// longer be captured.
    pub async fn watch_closes(&self) -> Result<(), String> {
        forced::watch(self).await
    }

    async fn watch_closes_logged(&self) {
        if let Err(e) = self.watch_closes().await {
            tracing::warn!(error = %e, "close watcher round failed; retried");
        }
    }

    /// The chain access (audits read channels through it).
    pub fn chain(&self) -> &Arc<dyn Chain> {
        &self.chain
    }

    pub fn backend(&self) -> &Arc<dyn ChannelBackend> {
        &self.backend
    }
}

/// Why a pending credit did not apply.
enum CreditFailure {
    /// The money store refuses it, and would again: set it aside.
    Refused(String),
    /// The money store cannot be reached: try again later.
    Unavailable(String),
}

fn expires_in(ttl: std::time::Duration) -> Result<String, String> {
    let t = time::OffsetDateTime::now_utc() + ttl;
    t.format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| e.to_string())
}
