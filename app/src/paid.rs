//! MPP payments wired in: the payments service from the settings (its secrets loaded, its
//! stores opened), the MCP identity and payment gate over it, the proxy's payment desk for a
//! suspended service's 402, and the stores operator commands read.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tollgate_mcp::{Balance, Caller, Identify, Refusal, ToolFailure};
use tollgate_metering::Store;
use tollgate_metering::units::format_base_usd;
use tollgate_payments::config::Secret;
use tollgate_payments::{Payments, Rejection};

use crate::settings::Settings;

/// Where the payments service keeps its state.
pub enum PaymentStores {
    /// Shared by every node.
    Redis {
        target: tollgate_kv::Target,
        prefix: String,
    },
    /// One node (`tollgate dev`): files in the data dir.
    Embedded { dir: std::path::PathBuf },
}

/// Builds the payments service. `dev` creates a secret and a payee key in the data dir when
/// none is given (test money only: `dev` runs against the local test chain).
pub async fn payments(
    settings: &Settings,
    money: Arc<dyn Store>,
    stores: PaymentStores,
    dev: bool,
) -> anyhow::Result<Arc<Payments>> {
    let cfg = &settings.config;
    let p = &cfg.payments;
    let secret = load_secret(
        "TOLLGATE_PAYMENTS_SECRET",
        p.secret_file.as_deref(),
        dev.then(|| cfg.control.data_dir.join("payments-secret")),
        || {
            let a: [u8; 32] = rand::random();
            alloy::hex::encode(a)
        },
    )
    .context("payments secret (TOLLGATE_PAYMENTS_SECRET or payments.secret_file)")?;
    let payee_key = load_secret(
        "TOLLGATE_PAYEE_KEY",
        p.payee_key_file.as_deref(),
        dev.then(|| cfg.control.data_dir.join("payee.key")),
        || {
            alloy::hex::encode_prefixed(
                alloy::signers::local::PrivateKeySigner::random().to_bytes(),
            )
        },
    )
    .context("payee key (TOLLGATE_PAYEE_KEY or payments.payee_key_file)")?;
    let mut pc = tollgate_payments::PaymentsConfig::new(&p.rpc_url, p.chain_id, secret, payee_key);
    pc.realm = cfg.payment_realm().map_err(anyhow::Error::msg)?;
    pc.currency = p
        .currency
        .parse()
        .map_err(|_| anyhow::anyhow!("payments.currency '{}' is not an address", p.currency))?;
    pc.suggested_deposit = settings.payments.suggested_deposit;
    pc.min_voucher_delta = settings.payments.min_voucher_delta;
    pc.settle_min = settings.payments.settle_min;
    pc.max_top_up_usd = p.max_top_up_usd;
    pc.settle_interval = Duration::from_secs(p.settle_interval_seconds);
    pc.close_watch_interval = Duration::from_secs(p.close_watch_seconds);
    pc.write_off_margin = Duration::from_secs(p.write_off_margin_seconds);
    pc.challenge_ttl = Duration::from_secs(p.challenge_ttl_seconds);
    pc.chain_call_timeout = Duration::from_secs(p.chain_timeout_seconds);
    pc.validate().map_err(anyhow::Error::msg)?;
    refuse_test_chain(&p.rpc_url, p.allow_test_chain).await?;

    let signer: alloy::signers::local::PrivateKeySigner = pc
        .payee_key
        .expose()
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("the payee key is not a secp256k1 private key"))?;
    let chain = Arc::new(
        tollgate_payments::RpcChain::with_timeout(
            &p.rpc_url,
            signer,
            pc.chain_id,
            pc.escrow,
            pc.chain_call_timeout,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let (backend, kv): (
        Arc<dyn tollgate_payments::ChannelBackend>,
        Arc<dyn mpp::Store>,
    ) = match stores {
        PaymentStores::Redis { target, prefix } => (
            Arc::new(
                tollgate_payments::RedisChannels::connect(&target, &prefix)
                    .await
                    .map_err(|e| anyhow::anyhow!("channel store: {}", e.message))?,
            ),
            Arc::new(
                tollgate_payments::kv::RedisKv::connect(
                    &target,
                    &prefix,
                    Duration::from_secs(3600),
                )
                .await
                .map_err(|e| anyhow::anyhow!("payments kv: {e}"))?,
            ),
        ),
        PaymentStores::Embedded { dir } => {
            std::fs::create_dir_all(&dir)?;
            (
                Arc::new(
                    tollgate_payments::EmbeddedChannels::open(&dir.join("channels.redb"))
                        .map_err(|e| anyhow::anyhow!("channel store: {}", e.message))?,
                ),
                Arc::new(
                    mpp::FileStore::new(dir.join("proofs"))
                        .map_err(|e| anyhow::anyhow!("payments kv: {e}"))?,
                ),
            )
        }
    };
    let payments = Payments::new(pc, backend, kv, money, chain).map_err(anyhow::Error::msg)?;
    tracing::info!(payee = %payments.payee(), rpc = %p.rpc_url, chain_id = p.chain_id, "payments ready");
    Ok(Arc::new(payments))
}

/// The money store and the channel store, for operator commands: the shared Redis (one or a
/// cluster), or the embedded files of `dev` in `data_dir` (which a running `dev` holds).
pub async fn open_money_and_channels(
    redis: Option<&tollgate_proxy::RedisConfig>,
    prefix: &str,
    data_dir: &Path,
) -> anyhow::Result<(Arc<dyn Store>, Arc<dyn tollgate_payments::ChannelBackend>)> {
    let ttl = Duration::from_secs(10);
    Ok(match redis {
        Some(r) => (
            open_shared_money(r, prefix, ttl).await?,
            Arc::new(
                tollgate_payments::RedisChannels::connect(r.target(), prefix)
                    .await
                    .map_err(|e| anyhow::anyhow!("channel store: {}", e.message))?,
            ),
        ),
        None => (
            Arc::new(
                tollgate_metering::EmbeddedStore::open(&data_dir.join("money.redb"), ttl)
                    .with_context(|| {
                        format!(
                            "{}/money.redb (is tollgate dev running?)",
                            data_dir.display()
                        )
                    })?,
            ),
            Arc::new(
                tollgate_payments::EmbeddedChannels::open(
                    &data_dir.join("payments").join("channels.redb"),
                )
                .map_err(|e| anyhow::anyhow!("channel store: {}", e.message))?,
            ),
        ),
    })
}

/// The shared money store for an operator command (`prefix` as given on its command line).
pub async fn open_shared_money(
    r: &tollgate_proxy::RedisConfig,
    prefix: &str,
    ttl: Duration,
) -> anyhow::Result<Arc<dyn Store>> {
    Ok(tollgate_metering::connect_shared(&r.target(), prefix, ttl, r.money_shards).await?)
}

/// A secret from the environment, else a file, else (dev) a file created with `make`.
fn load_secret(
    var: &str,
    file: Option<&Path>,
    dev_file: Option<std::path::PathBuf>,
    make: impl FnOnce() -> String,
) -> anyhow::Result<Secret> {
    if let Ok(v) = std::env::var(var)
        && !v.trim().is_empty()
    {
        return Ok(Secret::new(v.trim()));
    }
    if let Some(f) = file {
        let v = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        return Ok(Secret::new(v.trim()));
    }
    let Some(f) = dev_file else {
        anyhow::bail!("not set");
    };
    if let Ok(v) = std::fs::read_to_string(&f) {
        return Ok(Secret::new(v.trim()));
    }
    if let Some(dir) = f.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let v = make();
    write_private(&f, &v)?;
    Ok(Secret::new(v))
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// The project's test chain names itself in `web3_clientVersion`; production must not take
/// "payments" that are test money.
async fn refuse_test_chain(rpc_url: &str, allowed: bool) -> anyhow::Result<()> {
    if allowed {
        return Ok(());
    }
    let body = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "web3_clientVersion", "params": []});
    let resp = reqwest::Client::new()
        .post(rpc_url)
        .timeout(Duration::from_secs(5))
        .json(&body)
        .send()
        .await;
    if let Ok(r) = resp
        && let Ok(v) = r.json::<serde_json::Value>().await
        && v["result"]
            .as_str()
            .is_some_and(|s| s.contains("tollgate-testchain"))
    {
        anyhow::bail!(
            "payments.rpc_url {rpc_url} is the project's test chain, which holds no real money; set payments.allow_test_chain = true only for development"
        );
    }
    Ok(())
}

/// MCP identity and payment over MPP: free tools ask for a zero-amount proof, paid tools for a
/// session voucher (JSON-RPC -32042 with the challenge; the message says it in words too).
pub struct PaidIdentity {
    pub payments: Arc<Payments>,
    /// How long a start's charge waits for its outcome (`payments.start_refund_hold_seconds`).
    pub start_hold: std::time::Duration,
}

impl PaidIdentity {
    fn rpc(
        &self,
        challenge: Result<mpp::PaymentChallenge, String>,
        rejection: Option<&Rejection>,
        words: &str,
    ) -> Refusal {
        match challenge {
            Ok(ch) => {
                let (code, message, data) =
                    tollgate_payments::mcp::payment_required(&ch, rejection, words);
                Refusal::Rpc {
                    code,
                    message,
                    data,
                }
            }
            Err(e) => Refusal::Tool(ToolFailure {
                code: "PAYMENT_UNAVAILABLE",
                message: format!("could not build a payment challenge: {e}"),
                hint: "retry later".into(),
            }),
        }
    }

    fn retry_later(r: &Rejection) -> Refusal {
        Refusal::Tool(ToolFailure {
            code: "PAYMENT_UNAVAILABLE",
            message: format!(
                "payment could not be checked right now: {}",
                r.problem.detail
            ),
            hint: "nothing was charged; repeat the call in a few seconds".into(),
        })
    }
}

/// How long a start's charge may stand without its outcome before it gives itself back, by
/// default (`payments.start_refund_hold_seconds`): longer than any deploy (bundling, the
/// runtime's start and health check take seconds to a minute, a queue on the project's lock
/// two minutes at most).
pub const START_REVERSAL_HOLD: std::time::Duration = std::time::Duration::from_secs(600);

#[async_trait::async_trait]
impl Identify for PaidIdentity {
    async fn account(
        &self,
        _parts: Option<&http::request::Parts>,
        meta: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Caller, Refusal> {
        let words = "This tool is free, but it needs to know who you are: answer the MPP challenge (method tempo, intent charge, amount 0) with a zero-amount proof signed by your wallet (an MPP client such as mppx does this and repeats the call). Your account is your wallet address.";
        let cred = match tollgate_payments::mcp::credential(meta) {
            Ok(Some(c)) => c,
            Ok(None) => return Err(self.rpc(self.payments.identity_challenge(), None, words)),
            Err(r) => return Err(self.rpc(self.payments.identity_challenge(), Some(&r), words)),
        };
        match self.payments.identify(&cred).await {
            Ok((account, _)) => Ok(Caller::unpaid(account)),
            Err(r) if r.retryable => Err(Self::retry_later(&r)),
            Err(r) => Err(self.rpc(self.payments.identity_challenge(), Some(&r), words)),
        }
    }

    async fn pay(
        &self,
        _parts: Option<&http::request::Parts>,
        meta: &serde_json::Map<String, serde_json::Value>,
        amount: u128,
        what: &str,
    ) -> Result<Caller, Refusal> {
        let cfg = self.payments.config();
        let words = format!(
            "Payment required: ${} for {what}, in pathUSD on Tempo (chain {}) through an MPP payment-channel session (method tempo, intent session, payee {:#x}). An MPP client such as mppx opens a channel (suggested deposit ${}) or reuses yours, signs a voucher for +${}, and repeats this call with the credential in _meta[\"org.paymentauth/credential\"]. The money becomes your tollgate balance.",
            format_base_usd(amount),
            cfg.chain_id,
            self.payments.payee(),
            format_base_usd(cfg.suggested_deposit.max(amount)),
            format_base_usd(amount),
        );
        let challenge = self.payments.session_challenge(amount, Some(what));
        let cred = match tollgate_payments::mcp::credential(meta) {
            Ok(Some(c)) => c,
            Ok(None) => return Err(self.rpc(challenge, None, &words)),
            Err(r) => {
                self.payments.refused_undecodable();
                return Err(self.rpc(challenge, Some(&r), &words));
            }
        };
        match self.payments.accept(&cred).await {
            Ok(a) if !a.action.is_management() => Ok(Caller {
                account: a.account,
                receipt: Some((
                    tollgate_payments::mcp::RECEIPT_META_KEY.to_owned(),
                    tollgate_payments::mcp::receipt_meta(&a.receipt, &a.challenge_id),
                )),
            }),
            // A deposit top-up or a close pays for nothing by itself: ask for the voucher.
            Ok(_) => Err(self.rpc(challenge, None, &words)),
            Err(r) if r.retryable => Err(Self::retry_later(&r)),
            Err(r) => Err(self.rpc(challenge, Some(&r), &words)),
        }
    }

    async fn charge(&self, account: &str, key: &str, picos: i64) -> Result<bool, ToolFailure> {
        // The reversal first, held until the start's outcome (see `Payments::hold_reversal`):
        // a crash or a dropped call after the charge gives it back by itself.
        if let Err(e) = self
            .payments
            .hold_reversal(account, key, picos, self.start_hold)
            .await
        {
            return Err(ToolFailure {
                code: "PAYMENT_UNAVAILABLE",
                message: format!("could not record the deploy's charge: {}", e.message),
                hint: "nothing was charged; repeat the call in a few seconds".into(),
            });
        }
        match self
            .payments
            .money()
            .charge(account, key, picos, false)
            .await
        {
            Ok(_) => Ok(true),
            Err(tollgate_metering::ChargeError::Insufficient { .. }) => {
                // Nothing was taken. Should the release fail, the reversal still nets to
                // zero when it falls due (it takes what the key took, then gives it back).
                if let Err(e) = self.payments.release_reversal(key).await {
                    tracing::warn!(account, key, error = %e.message, "held reversal of a refused charge not released");
                }
                Ok(false)
            }
            Err(e) => {
                // The answer may have been lost after the charge landed: reverse it durably
                // (a no-op if it never landed), so "nothing was charged" holds.
                let reversed = self.payments.reverse_charge(account, key, picos).await;
                if let Err(r) = reversed {
                    tracing::warn!(account, key, error = %r.message, "charge reversal pending; the background drain applies it");
                }
                Err(ToolFailure {
                    code: "PAYMENT_UNAVAILABLE",
                    message: format!("could not charge the deploy: {e}"),
                    hint: "nothing was charged (or it is given back); repeat the call in a few seconds".into(),
                })
            }
        }
    }

    async fn keep(&self, account: &str, key: &str) {
        if let Err(e) = self.payments.release_reversal(key).await {
            // Then it falls due at its deadline: this start is given for free.
            tracing::error!(account, key, error = %e.message, "a live start's held reversal could not be released; its charge will be given back at the deadline");
        }
    }

    async fn refund(&self, account: &str, key: &str, picos: i64) -> Result<(), ToolFailure> {
        // `key` is `refund:<charge key>`: reversed durably, applied now or by the drain.
        let charge_key = key.strip_prefix("refund:").unwrap_or(key);
        self.payments
            .reverse_charge(account, charge_key, picos)
            .await
            .map_err(|e| ToolFailure {
                code: "PAYMENT_UNAVAILABLE",
                message: format!(
                    "refund recorded, applied once the money store answers: {}",
                    e.message
                ),
                hint: "nothing to do: the refund lands by itself".into(),
            })
    }

    async fn balance(&self, account: &str) -> Result<Balance, ToolFailure> {
        let s = self
            .payments
            .money()
            .account(account)
            .await
            .map_err(|e| ToolFailure {
                code: "UNAVAILABLE",
                message: format!("balance unavailable: {e}"),
                hint: "retry in a few seconds".into(),
            })?
            .unwrap_or_else(|| tollgate_metering::AccountState::empty(account));
        Ok(Balance {
            available_picos: s.available,
            reserved_picos: s.leased,
            credited_picos: s.credited,
            spent_picos: s.debited,
        })
    }
}

/// MPP at the proxy: a suspended service's 402 carries a session challenge to top up its
/// owner's account, and the owner's wallet answering it pays on the retried request.
pub struct ProxyDesk {
    pub payments: Arc<Payments>,
    /// What the challenge asks for (base units).
    pub amount: u128,
}

#[async_trait::async_trait]
impl tollgate_proxy::PaymentDesk for ProxyDesk {
    fn challenge(&self, _account: &str, host: &str) -> Option<String> {
        let ch = self
            .payments
            .session_challenge_in(
                tollgate_payments::Realm::Services,
                self.amount,
                Some(&format!("Top up the balance of the owner of {host}")),
            )
            .ok()?;
        mpp::format_www_authenticate(&ch).ok()
    }

    async fn redeem(
        &self,
        account: &str,
        headers: &http::HeaderMap,
    ) -> Result<tollgate_proxy::Redeemed, tollgate_proxy::Refused> {
        use tollgate_proxy::{Redeemed, Refused};
        let refused = |detail: String| Refused {
            detail,
            retryable: false,
        };
        let cred = match tollgate_payments::http::credential(headers) {
            Ok(Some(c)) => c,
            Ok(None) => return Err(refused("no Payment credential".into())),
            Err(r) => {
                self.payments.refused_undecodable();
                return Err(refused(r.problem.detail.clone()));
            }
        };
        // Money from another wallet would land on that wallet's account, not on this
        // service's: refuse it before anything moves.
        match self.payments.payer_of(&cred).await {
            Some(payer) if payer == account => {}
            _ => {
                return Err(refused(
                    "only the service owner's wallet can top it up here; nothing was taken".into(),
                ));
            }
        }
        match self
            .payments
            .accept_in(tollgate_payments::Realm::Services, &cred)
            .await
        {
            Ok(a) => {
                let receipt = mpp::format_receipt(&a.receipt).unwrap_or_default();
                Ok(if a.action.is_management() {
                    Redeemed::Management(receipt)
                } else {
                    Redeemed::Paid(receipt)
                })
            }
            Err(r) => Err(Refused {
                detail: r.problem.detail.clone(),
                retryable: r.retryable,
            }),
        }
    }
}
