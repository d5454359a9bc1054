//! Call execution: the TIP-1034 escrow precompile and the TIP-20 tokens.
//!
//! Semantics follow the Tempo precompile (`tip20_channel_reserve`): the same checks in the same
//! order, the same custom errors, the same events. An [`Exec`] works on its own copy of the
//! ledger; the caller keeps it only when every call of the transaction succeeded.
//!
//! (Over 600 lines on purpose: the escrow precompile is one unit, checked against the real
//! precompile's source function by function; splitting it would hide that correspondence.)

use std::collections::HashSet;

use alloy::primitives::aliases::U96;
use alloy::primitives::{Address, B256, Bytes, Log, U256, keccak256};
use alloy::sol_types::{SolCall, SolError, SolEvent, SolInterface, eip712_domain};
use mpp::protocol::methods::tempo::precompile_voucher::{
    PRECOMPILE_DOMAIN_NAME, PRECOMPILE_DOMAIN_VERSION, compute_precompile_channel_id_with_escrow,
    precompile_voucher_signing_hash_with_escrow, verify_precompile_voucher_signature,
};
use tempo_alloy::contracts::precompiles::ITIP20;
use tempo_alloy::contracts::precompiles::ITIP20ChannelReserve as Escrow;
use tempo_alloy::primitives::is_tip20_prefix;

use crate::state::{ChannelRecord, Ledger};
use crate::{CLOSE_GRACE_PERIOD, ESCROW};

/// A failed call: the ABI revert data and a readable reason for logs and receipts.
#[derive(Clone, Debug)]
pub(crate) struct Revert {
    pub data: Bytes,
    pub reason: String,
}

impl Revert {
    fn custom<E: SolError>(e: E) -> Self {
        Self {
            data: Bytes::from(e.abi_encode()),
            reason: E::SIGNATURE.to_string(),
        }
    }

    fn message(reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Self {
            data: Bytes::from(
                alloy::sol_types::Revert {
                    reason: reason.clone(),
                }
                .abi_encode(),
            ),
            reason,
        }
    }

    fn insufficient_balance(token: Address, available: u128, required: U256) -> Self {
        let mut r = Self::custom(ITIP20::InsufficientBalance {
            available: U256::from(available),
            required,
            token,
        });
        r.reason = format!("InsufficientBalance(available {available}, required {required})");
        r
    }
}

/// The 712 type hash the precompile reports from `VOUCHER_TYPEHASH()`.
fn voucher_typehash() -> B256 {
    keccak256("Voucher(bytes32 channelId,uint96 cumulativeAmount)")
}

pub(crate) fn domain_separator(chain_id: u64) -> B256 {
    eip712_domain! {
        name: PRECOMPILE_DOMAIN_NAME,
        version: PRECOMPILE_DOMAIN_VERSION,
        chain_id: chain_id,
        verifying_contract: ESCROW,
    }
    .separator()
}

pub(crate) fn channel_id(d: &Escrow::ChannelDescriptor, chain_id: u64) -> B256 {
    compute_precompile_channel_id_with_escrow(
        d.payer,
        d.payee,
        d.operator,
        d.token,
        d.salt,
        d.authorizedSigner,
        d.expiringNonceHash,
        ESCROW,
        chain_id,
    )
}

pub(crate) fn descriptor_of(c: &ChannelRecord) -> Escrow::ChannelDescriptor {
    Escrow::ChannelDescriptor {
        payer: c.payer,
        payee: c.payee,
        operator: c.operator,
        token: c.token,
        salt: c.salt,
        authorizedSigner: c.authorized_signer,
        expiringNonceHash: c.expiring_nonce_hash,
    }
}

fn u96(v: u128) -> U96 {
    // Stored amounts never exceed uint96 (deposits are uint96 and checked on top-up).
    U96::saturating_from(v)
}

fn sol_state(c: Option<&ChannelRecord>) -> Escrow::ChannelState {
    match c {
        Some(c) => Escrow::ChannelState {
            settled: u96(c.settled),
            deposit: u96(c.deposit),
            closeRequestedAt: c.close_requested_at,
        },
        None => Escrow::ChannelState {
            settled: U96::ZERO,
            deposit: U96::ZERO,
            closeRequestedAt: 0,
        },
    }
}

/// Static facts a call runs against.
#[derive(Clone, Copy)]
pub(crate) struct Env<'a> {
    pub chain_id: u64,
    pub tokens: &'a [Address],
    /// Block timestamp, seconds.
    pub now: u64,
}

/// One transaction's (or one `eth_call`'s) execution.
pub(crate) struct Exec<'a> {
    env: Env<'a>,
    ledger: Ledger,
    sender: Address,
    /// `keccak256(encode_for_signing ‖ sender)` of the enclosing transaction, which `open`
    /// binds into the channel id. `None` in `eth_call`, where `open` reverts as on Tempo.
    open_hash: Option<B256>,
    /// Channels opened earlier in this transaction (they may not be reopened in it).
    opened: HashSet<B256>,
    logs: Vec<Log>,
}

type CallResult = Result<Bytes, Revert>;

impl<'a> Exec<'a> {
    pub fn new(env: Env<'a>, ledger: Ledger, sender: Address, open_hash: Option<B256>) -> Self {
        Self {
            env,
            ledger,
            sender,
            open_hash,
            opened: HashSet::new(),
            logs: Vec::new(),
        }
    }

    pub fn finish(self) -> (Ledger, Vec<Log>) {
        (self.ledger, self.logs)
    }

    pub fn call(&mut self, to: Address, input: &[u8]) -> CallResult {
        if to == ESCROW {
            self.escrow(input)
        } else if self.env.tokens.contains(&to) {
            self.token(to, input)
        } else {
            Err(Revert::message(format!(
                "call to {to}: only the escrow precompile and the configured TIP-20 tokens exist on this test chain"
            )))
        }
    }

    fn emit(&mut self, address: Address, event: impl SolEvent) {
        self.logs.push(Log {
            address,
            data: event.encode_log_data(),
        });
    }

    /// Moves `amount` of `token` and emits `Transfer`; reverts when `from` lacks it.
    fn transfer(
        &mut self,
        token: Address,
        from: Address,
        to: Address,
        amount: u128,
    ) -> Result<(), Revert> {
        let available = self.ledger.balance(token, from);
        if available < amount {
            return Err(Revert::insufficient_balance(
                token,
                available,
                U256::from(amount),
            ));
        }
        if from != to {
            self.ledger.set_balance(token, from, available - amount);
            let to_balance = self.ledger.balance(token, to);
            let Some(next) = to_balance.checked_add(amount) else {
                return Err(Revert::message("balance overflow"));
            };
            self.ledger.set_balance(token, to, next);
        }
        self.emit(
            token,
            ITIP20::Transfer {
                from,
                to,
                amount: U256::from(amount),
            },
        );
        Ok(())
    }

    // ---- TIP-20 tokens ----

    fn token(&mut self, token: Address, input: &[u8]) -> CallResult {
        use ITIP20::ITIP20Calls as C;
        let call = C::abi_decode_validate(input)
            .map_err(|_| Revert::message("unknown or malformed TIP-20 call on this test chain"))?;
        let out = match call {
            C::name(_) => ITIP20::nameCall::abi_encode_returns(&token_name(token).to_string()),
            C::symbol(_) => ITIP20::symbolCall::abi_encode_returns(&token_name(token).to_string()),
            C::currency(_) => ITIP20::currencyCall::abi_encode_returns(&"USD".to_string()),
            C::decimals(_) => ITIP20::decimalsCall::abi_encode_returns(&6u8),
            C::totalSupply(_) => ITIP20::totalSupplyCall::abi_encode_returns(&U256::from(
                self.ledger.supply.get(&token).copied().unwrap_or(0),
            )),
            C::balanceOf(c) => ITIP20::balanceOfCall::abi_encode_returns(&U256::from(
                self.ledger.balance(token, c.account),
            )),
            C::allowance(c) => ITIP20::allowanceCall::abi_encode_returns(&U256::from(
                self.ledger.allowance(token, c.owner, c.spender),
            )),
            C::paused(_) => ITIP20::pausedCall::abi_encode_returns(&false),
            C::transfer(c) => {
                let amount = amount_u128(token, self.ledger.balance(token, self.sender), c.amount)?;
                if c.to.is_zero() {
                    return Err(Revert::message("TIP-20 transfer to the zero address"));
                }
                self.transfer(token, self.sender, c.to, amount)?;
                ITIP20::transferCall::abi_encode_returns(&true)
            }
            C::approve(c) => {
                // Allowances above u128 can never be exhausted here; store them as "infinite".
                let amount = u128::try_from(c.amount).unwrap_or(u128::MAX);
                self.ledger
                    .set_allowance(token, self.sender, c.spender, amount);
                self.emit(
                    token,
                    ITIP20::Approval {
                        owner: self.sender,
                        spender: c.spender,
                        amount: c.amount,
                    },
                );
                ITIP20::approveCall::abi_encode_returns(&true)
            }
            C::transferFrom(c) => {
                let allowed = self.ledger.allowance(token, c.from, self.sender);
                let Ok(amount) = u128::try_from(c.amount) else {
                    return Err(Revert::custom(ITIP20::InsufficientAllowance {}));
                };
                if allowed < amount {
                    return Err(Revert::custom(ITIP20::InsufficientAllowance {}));
                }
                if c.to.is_zero() {
                    return Err(Revert::message("TIP-20 transfer to the zero address"));
                }
                self.transfer(token, c.from, c.to, amount)?;
                if allowed != u128::MAX {
                    self.ledger
                        .set_allowance(token, c.from, self.sender, allowed - amount);
                }
                ITIP20::transferFromCall::abi_encode_returns(&true)
            }
            _ => {
                return Err(Revert::message(
                    "this TIP-20 function is not modelled by the test chain",
                ));
            }
        };
        Ok(Bytes::from(out))
    }

    // ---- TIP-1034 escrow precompile ----

    fn escrow(&mut self, input: &[u8]) -> CallResult {
        use Escrow::ITIP20ChannelReserveCalls as C;
        let call = C::abi_decode_validate(input)
            .map_err(|_| Revert::message("unknown or malformed escrow call"))?;
        let chain_id = self.env.chain_id;
        let out = match call {
            C::open(c) => {
                let id = self.open(c)?;
                Escrow::openCall::abi_encode_returns(&id)
            }
            C::topUp(c) => {
                self.top_up(c)?;
                Vec::new()
            }
            C::settle(c) => {
                self.settle(c)?;
                Vec::new()
            }
            C::close(c) => {
                self.close(c)?;
                Vec::new()
            }
            C::requestClose(c) => {
                self.request_close(c)?;
                Vec::new()
            }
            C::withdraw(c) => {
                self.withdraw(c)?;
                Vec::new()
            }
            C::getChannelState(c) => Escrow::getChannelStateCall::abi_encode_returns(&sol_state(
                self.ledger.channels.get(&c.channelId),
            )),
            C::getChannelStatesBatch(c) => {
                let states: Vec<_> = c
                    .channelIds
                    .iter()
                    .map(|id| sol_state(self.ledger.channels.get(id)))
                    .collect();
                Escrow::getChannelStatesBatchCall::abi_encode_returns(&states)
            }
            C::getChannel(c) => {
                let id = channel_id(&c.descriptor, chain_id);
                let state = sol_state(self.ledger.channels.get(&id));
                Escrow::getChannelCall::abi_encode_returns(&Escrow::Channel {
                    descriptor: c.descriptor,
                    state,
                })
            }
            C::computeChannelId(c) => {
                let d = Escrow::ChannelDescriptor {
                    payer: c.payer,
                    payee: c.payee,
                    operator: c.operator,
                    token: c.token,
                    salt: c.salt,
                    authorizedSigner: c.authorizedSigner,
                    expiringNonceHash: c.expiringNonceHash,
                };
                Escrow::computeChannelIdCall::abi_encode_returns(&channel_id(&d, chain_id))
            }
            C::getVoucherDigest(c) => {
                let digest = precompile_voucher_signing_hash_with_escrow(
                    c.channelId,
                    c.cumulativeAmount.to::<u128>(),
                    ESCROW,
                    chain_id,
                )
                .map_err(|e| Revert::message(e.to_string()))?;
                Escrow::getVoucherDigestCall::abi_encode_returns(&digest)
            }
            C::domainSeparator(_) => {
                Escrow::domainSeparatorCall::abi_encode_returns(&domain_separator(chain_id))
            }
            C::CLOSE_GRACE_PERIOD(_) => {
                Escrow::CLOSE_GRACE_PERIODCall::abi_encode_returns(&CLOSE_GRACE_PERIOD)
            }
            C::VOUCHER_TYPEHASH(_) => {
                Escrow::VOUCHER_TYPEHASHCall::abi_encode_returns(&voucher_typehash())
            }
            // Storage credits (gas refunds for reused slots) are not modelled: always none.
            C::storageCredits(_) => Escrow::storageCreditsCall::abi_encode_returns(&0u64),
        };
        Ok(Bytes::from(out))
    }

    fn existing(&self, d: &Escrow::ChannelDescriptor) -> Result<(B256, ChannelRecord), Revert> {
        let id = channel_id(d, self.env.chain_id);
        match self.ledger.channels.get(&id) {
            Some(c) if c.deposit != 0 => Ok((id, c.clone())),
            _ => Err(Revert::custom(Escrow::ChannelNotFound {})),
        }
    }

    fn ensure_payee_or_operator(&self, d: &Escrow::ChannelDescriptor) -> Result<(), Revert> {
        if self.sender != d.payee && (d.operator.is_zero() || self.sender != d.operator) {
            return Err(Revert::custom(Escrow::NotPayeeOrOperator {}));
        }
        Ok(())
    }

    fn ensure_payer(&self, d: &Escrow::ChannelDescriptor) -> Result<(), Revert> {
        if self.sender != d.payer {
            return Err(Revert::custom(Escrow::NotPayer {}));
        }
        Ok(())
    }

    fn ensure_token(&self, token: Address) -> Result<(), Revert> {
        if !self.env.tokens.contains(&token) {
            return Err(Revert::message(format!(
                "{token} is not a TIP-20 token on this test chain"
            )));
        }
        Ok(())
    }

    fn validate_voucher(
        &self,
        d: &Escrow::ChannelDescriptor,
        id: B256,
        cumulative: u128,
        signature: &[u8],
    ) -> Result<(), Revert> {
        let expected = if d.authorizedSigner.is_zero() {
            d.payer
        } else {
            d.authorizedSigner
        };
        let ok = verify_precompile_voucher_signature(
            signature,
            expected,
            id,
            cumulative,
            ESCROW,
            self.env.chain_id,
        )
        .unwrap_or(false);
        if ok {
            Ok(())
        } else {
            Err(Revert::custom(Escrow::InvalidSignature {}))
        }
    }

    fn open(&mut self, c: Escrow::openCall) -> Result<B256, Revert> {
        if c.payee.is_zero() || is_tip20_prefix(c.payee) {
            return Err(Revert::custom(Escrow::InvalidPayee {}));
        }
        self.ensure_token(c.token)?;
        let deposit = c.deposit.to::<u128>();
        if deposit == 0 {
            return Err(Revert::custom(Escrow::ZeroDeposit {}));
        }
        let Some(nonce_hash) = self.open_hash else {
            return Err(Revert::custom(Escrow::ExpiringNonceHashNotSet {}));
        };
        let record = ChannelRecord {
            payer: self.sender,
            payee: c.payee,
            operator: c.operator,
            token: c.token,
            salt: c.salt,
            authorized_signer: c.authorizedSigner,
            expiring_nonce_hash: nonce_hash,
            settled: 0,
            deposit,
            close_requested_at: 0,
        };
        let d = descriptor_of(&record);
        let id = channel_id(&d, self.env.chain_id);
        if self.ledger.channels.contains_key(&id) || self.opened.contains(&id) {
            return Err(Revert::custom(Escrow::ChannelAlreadyExists {}));
        }
        self.transfer(c.token, self.sender, ESCROW, deposit)?;
        self.ledger.channels.insert(id, record);
        self.opened.insert(id);
        self.emit(
            ESCROW,
            Escrow::ChannelOpened {
                channelId: id,
                payer: d.payer,
                payee: d.payee,
                operator: d.operator,
                token: d.token,
                authorizedSigner: d.authorizedSigner,
                salt: d.salt,
                expiringNonceHash: d.expiringNonceHash,
                deposit: c.deposit,
            },
        );
        Ok(id)
    }

    fn settle(&mut self, c: Escrow::settleCall) -> Result<(), Revert> {
        let d = &c.descriptor;
        let (id, mut state) = self.existing(d)?;
        self.ensure_payee_or_operator(d)?;
        let cumulative = c.cumulativeAmount.to::<u128>();
        if cumulative > state.deposit {
            return Err(Revert::custom(Escrow::AmountExceedsDeposit {}));
        }
        if cumulative <= state.settled {
            return Err(Revert::custom(Escrow::AmountNotIncreasing {}));
        }
        self.validate_voucher(d, id, cumulative, &c.signature)?;
        let delta = cumulative - state.settled;
        self.transfer(d.token, ESCROW, d.payee, delta)?;
        state.settled = cumulative;
        self.ledger.channels.insert(id, state);
        self.emit(
            ESCROW,
            Escrow::Settled {
                channelId: id,
                payer: d.payer,
                payee: d.payee,
                cumulativeAmount: c.cumulativeAmount,
                deltaPaid: u96(delta),
                newSettled: c.cumulativeAmount,
            },
        );
        Ok(())
    }

    fn top_up(&mut self, c: Escrow::topUpCall) -> Result<(), Revert> {
        let d = &c.descriptor;
        let (id, mut state) = self.existing(d)?;
        self.ensure_payer(d)?;
        let additional = c.additionalDeposit.to::<u128>();
        let had_close_request = state.close_requested_at != 0;
        // A zero top-up only cancels a pending close request.
        if additional == 0 && !had_close_request {
            return Ok(());
        }
        if additional != 0 {
            let next = state.deposit.saturating_add(additional);
            if next > U96::MAX.to::<u128>() {
                return Err(Revert::custom(Escrow::DepositOverflow {}));
            }
            self.transfer(d.token, self.sender, ESCROW, additional)?;
            state.deposit = next;
        }
        state.close_requested_at = 0;
        let new_deposit = state.deposit;
        self.ledger.channels.insert(id, state);
        if had_close_request {
            self.emit(
                ESCROW,
                Escrow::CloseRequestCancelled {
                    channelId: id,
                    payer: d.payer,
                    payee: d.payee,
                },
            );
        }
        self.emit(
            ESCROW,
            Escrow::TopUp {
                channelId: id,
                payer: d.payer,
                payee: d.payee,
                additionalDeposit: c.additionalDeposit,
                newDeposit: u96(new_deposit),
            },
        );
        Ok(())
    }

    fn request_close(&mut self, c: Escrow::requestCloseCall) -> Result<(), Revert> {
        let d = &c.descriptor;
        let (id, mut state) = self.existing(d)?;
        self.ensure_payer(d)?;
        // Repeated requests keep the first timer.
        if state.close_requested_at != 0 {
            return Ok(());
        }
        state.close_requested_at = u32::try_from(self.env.now).unwrap_or(u32::MAX);
        self.ledger.channels.insert(id, state);
        self.emit(
            ESCROW,
            Escrow::CloseRequested {
                channelId: id,
                payer: d.payer,
                payee: d.payee,
                closeGraceEnd: U256::from(self.env.now.saturating_add(CLOSE_GRACE_PERIOD)),
            },
        );
        Ok(())
    }

    fn close(&mut self, c: Escrow::closeCall) -> Result<(), Revert> {
        let d = &c.descriptor;
        let (id, state) = self.existing(d)?;
        self.ensure_payee_or_operator(d)?;
        let cumulative = c.cumulativeAmount.to::<u128>();
        let capture = c.captureAmount.to::<u128>();
        if capture < state.settled || capture > cumulative {
            return Err(Revert::custom(Escrow::CaptureAmountInvalid {}));
        }
        if capture > state.deposit {
            return Err(Revert::custom(Escrow::AmountExceedsDeposit {}));
        }
        // Only a capture beyond what is already settled needs the payer's voucher.
        if capture > state.settled {
            self.validate_voucher(d, id, cumulative, &c.signature)?;
        }
        let delta = capture - state.settled;
        let refund = state.deposit - capture;
        if delta != 0 {
            self.transfer(d.token, ESCROW, d.payee, delta)?;
        }
        if refund != 0 {
            self.transfer(d.token, ESCROW, d.payer, refund)?;
        }
        self.ledger.channels.remove(&id);
        self.emit(
            ESCROW,
            Escrow::ChannelClosed {
                channelId: id,
                payer: d.payer,
                payee: d.payee,
                settledToPayee: c.captureAmount,
                refundedToPayer: u96(refund),
            },
        );
        Ok(())
    }

    fn withdraw(&mut self, c: Escrow::withdrawCall) -> Result<(), Revert> {
        let d = &c.descriptor;
        let (id, state) = self.existing(d)?;
        self.ensure_payer(d)?;
        let ready = state.close_requested_at != 0
            && self.env.now >= u64::from(state.close_requested_at) + CLOSE_GRACE_PERIOD;
        if !ready {
            return Err(Revert::custom(Escrow::CloseNotReady {}));
        }
        let refund = state.deposit - state.settled;
        if refund != 0 {
            self.transfer(d.token, ESCROW, d.payer, refund)?;
        }
        self.ledger.channels.remove(&id);
        self.emit(
            ESCROW,
            Escrow::ChannelClosed {
                channelId: id,
                payer: d.payer,
                payee: d.payee,
                settledToPayee: u96(state.settled),
                refundedToPayer: u96(refund),
            },
        );
        Ok(())
    }
}

/// A TIP-20 amount as u128, or the insufficient-balance revert a real token would give.
fn amount_u128(token: Address, available: u128, amount: U256) -> Result<u128, Revert> {
    u128::try_from(amount).map_err(|_| Revert::insufficient_balance(token, available, amount))
}

/// Names of the Tempo testnet stablecoins, so wallets and logs show something familiar.
pub(crate) fn token_name(token: Address) -> &'static str {
    let b = token.as_slice();
    // The known ones are 0x20c0…00NN.
    if !is_tip20_prefix(token) || b[12..19].iter().any(|&x| x != 0) {
        return "TestUSD";
    }
    match b[19] {
        0 => "pathUSD",
        1 => "AlphaUSD",
        2 => "BetaUSD",
        3 => "ThetaUSD",
        _ => "TestUSD",
    }
}
