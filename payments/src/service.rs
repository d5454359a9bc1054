//! The payments service: challenges, credentials accepted into credit, identity proofs, the
//! credit drain, and the background schedule (settlement, the close watcher).

use std::sync::Arc;

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use mpp::protocol::methods::tempo::SessionCredentialPayload;
use mpp::server::{
    Mpp, SessionMethodConfig, TempoChargeMethod, TempoConfig, TempoProvider, TempoSessionMethod,
};
use mpp::{Base64UrlJson, PaymentChallenge, PaymentCredential, SessionRequest, VerificationError};
use tollgate_metering::Store;

use crate::chain::Chain;
use crate::channels::{self, ChannelBackend, SharedChannels, account_of};
use crate::config::PaymentsConfig;
use crate::metrics::PaymentMetrics;
use crate::{Accepted, Action, Realm, Rejection, close, forced, settle};

type MppServer = Mpp<TempoChargeMethod<TempoProvider>, TempoSessionMethod<TempoProvider>>;

/// The payments service: one per process, shared by the HTTP and MCP endpoints.
pub struct Payments {
    mpp: MppServer,
    /// The same, for the services realm (the proxy's 402 on hosted URLs).
    services: MppServer,
    pub(crate) cfg: PaymentsConfig,
    payee: Address,
    pub(crate) backend: Arc<dyn ChannelBackend>,
    pub(crate) money: Arc<dyn Store>,
    pub(crate) chain: Arc<dyn Chain>,
    pub metrics: PaymentMetrics,
    /// Wakes the close watcher (a voucher found a close request).
    pub(crate) close_watch_wake: tokio::sync::Notify,
    pub(crate) watch: forced::WatchState,
    /// Whether this process runs the background rounds now (several control instances: the
    /// one holding the rounds' lease). Unset: always.
    rounds_gate: std::sync::OnceLock<RoundsGate>,
}

/// Answers whether this process may run a background round now.
pub type RoundsGate = Arc<dyn Fn() -> bool + Send + Sync>;

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
                crate::chain::tempo_provider(&cfg.rpc_url, cfg.chain_call_timeout)?,
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
            watch: forced::WatchState::default(),
            rounds_gate: std::sync::OnceLock::new(),
        })
    }

    /// From now on the settlement, close-watch and credit rounds of [`Payments::run`] run only
    /// while `gate` answers true (once; later calls are ignored).
    pub fn gate_rounds(&self, gate: RoundsGate) {
        let _ = self.rounds_gate.set(gate);
    }

    fn may_run(&self) -> bool {
        self.rounds_gate.get().is_none_or(|g| g())
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

    /// Counts a credential refused before it could be decoded (not base64url JSON, not a
    /// `Payment` credential): `action="unknown", result="rejected"`.
    pub fn refused_undecodable(&self) {
        self.metrics.undecodable();
    }

    /// [`Payments::accept`] in a realm: a credential for a challenge of another realm is
    /// refused (its HMAC binds the realm it was issued for).
    pub async fn accept_in(
        &self,
        realm: Realm,
        cred: &PaymentCredential,
    ) -> Result<Accepted, Rejection> {
        use tracing::Instrument as _;
        let started = std::time::Instant::now();
        let span = tracing::info_span!(
            "payments.accept",
            // Bounded: what the payer sent is not echoed into traces.
            payment.action = cred
                .payload
                .get("action")
                .and_then(|a| a.as_str())
                .filter(|a| matches!(*a, "open" | "voucher" | "topUp" | "close"))
                .unwrap_or("unknown"),
            payment.result = tracing::field::Empty,
        );
        let result = self
            .accept_inner(realm, cred)
            .instrument(span.clone())
            .await;
        span.record(
            "payment.result",
            match &result {
                Ok(_) => "accepted",
                Err(r) if r.retryable => "unavailable",
                Err(_) => "rejected",
            },
        );
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
            match forced::request(self, channel_id, grace_end, None).await {
                Ok(true) => self.close_watch_wake.notify_one(),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(channel = channel_id, error = %e.message, "close request not recorded yet; the watcher finds it in the escrow's events");
                }
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

    /// Runs the background work until `stop` resolves: pending credits (every second), the
    /// settlement schedule and the close watcher, each in a task of its own (a settlement
    /// round waiting on a slow or unreachable chain must neither delay a capture that has a
    /// deadline nor the credits of vouchers already accepted).
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let watcher = {
            let p = self.clone();
            let mut stop = stop.clone();
            AbortOnDrop(tokio::spawn(async move {
                let mut tick = tokio::time::interval(p.cfg.close_watch_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tick.tick() => if p.may_run() { p.watch_closes_logged().await },
                        // Another instance's watcher, if it holds the rounds, sees it on its
                        // next tick (close_watch_seconds, well inside the grace period).
                        _ = p.close_watch_wake.notified() => if p.may_run() { p.watch_closes_logged().await },
                    }
                }
            }))
        };
        let settler = {
            let p = self.clone();
            let mut stop = stop.clone();
            AbortOnDrop(tokio::spawn(async move {
                let mut tick = tokio::time::interval(p.cfg.settle_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = tick.tick() => {
                            if !p.may_run() {
                                continue;
                            }
                            if let Err(e) = settle::settle_due(&p).await {
                                tracing::warn!(error = %e, "settlement round failed");
                            }
                        }
                    }
                }
            }))
        };
        let mut credit_tick = tokio::time::interval(std::time::Duration::from_secs(1));
        credit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                _ = credit_tick.tick() => {
                    if !self.may_run() {
                        continue;
                    }
                    if let Err(e) = self.drain_credits().await {
                        tracing::warn!(error = %e.message, "pending credits not applied yet");
                    }
                }
            }
        }
        for (name, mut task) in [("close watcher", watcher), ("settlement", settler)] {
            if let Err(e) = (&mut task.0).await {
                tracing::warn!(error = %e, task = name, "payments task ended abnormally");
            }
        }
    }

    /// One round of the close watcher and one settlement round, now (tests, operators).
    pub async fn settle_now(&self) -> Result<usize, String> {
        self.watch_closes_logged().await;
        settle::settle_due(self).await
    }

    /// One round of the close watcher now (tests, operators): reads the escrow's close
    /// requests, captures the vouchers of channels closing on chain, writes off what can no
    /// longer be captured, closes the books of channels gone on chain.
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

fn expires_in(ttl: std::time::Duration) -> Result<String, String> {
    let t = time::OffsetDateTime::now_utc() + ttl;
    t.format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| e.to_string())
}

/// A task aborted when its handle is dropped: `Payments::run` cut short (a bounded shutdown
/// aborts it) must not leave a settlement round sending transactions behind it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
