//! # tollgate-testchain: a local Tempo test chain. **IT HOLDS NO REAL MONEY.**
//!
//! A loopback JSON-RPC 2.0 server that models the part of Tempo that tollgate's MPP payment flow
//! needs: TIP-20 stablecoin balances (minted freely by a faucet), the TIP-1034 escrow precompile
//! at [`ESCROW`] (open, topUp, settle, close, requestClose, withdraw and its views), and Tempo
//! 0x76 transactions signed by real keys. Every balance on it is play money: nothing here is
//! connected to Tempo or any other network, and nothing it says is a payment.
//!
//! Each accepted transaction is executed and mined into its own block at once, so its receipt
//! exists when `eth_sendRawTransaction` returns. Fees are not charged. See `docs/testchain.md`
//! for the method list and the limits versus a real Tempo node.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use tollgate_testchain::{ChainConfig, TestChain};
//! let running = TestChain::spawn("127.0.0.1:0".parse()?, ChainConfig::default()).await?;
//! println!("test chain (NO REAL MONEY) at {}", running.url());
//! running.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod chain;
pub mod client;
mod exec;
mod rpc;
mod state;
mod tx;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use alloy::primitives::{Address, B256, address};
use tempo_alloy::contracts::precompiles::TIP20_CHANNEL_RESERVE_ADDRESS;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use tempo_alloy::contracts::precompiles::ITIP20ChannelReserve::ChannelDescriptor;

use crate::state::State;

/// pathUSD, Tempo's base TIP-20 stablecoin (6 decimals). On this chain: play money.
pub const PATH_USD: Address = address!("0x20c0000000000000000000000000000000000000");
/// The TIP-1034 channel reserve (escrow) precompile, at the same address as on every Tempo chain.
pub const ESCROW: Address = TIP20_CHANNEL_RESERVE_ADDRESS;
/// The chain id mppx's `tempoModerato` chain config uses.
pub const DEFAULT_CHAIN_ID: u64 = 42431;
/// Seconds between `requestClose` and the earliest `withdraw`, as on Tempo.
pub const CLOSE_GRACE_PERIOD: u64 = 900;
/// Longest an expiring-nonce transaction may be valid for ahead of the chain clock (TIP-1009).
pub const MAX_EXPIRING_NONCE_SECS: u64 = 300;
/// Base fee reported in blocks and by `eth_gasPrice` (20 gwei). Never charged.
pub const BASE_FEE_PER_GAS: u64 = 20_000_000_000;
/// Default faucet mint: $1000 in 6-decimal base units.
pub const DEFAULT_FAUCET_AMOUNT: u128 = 1_000_000_000;

/// What the test chain starts with.
#[derive(Clone, Debug)]
pub struct ChainConfig {
    pub chain_id: u64,
    /// TIP-20 tokens that exist (all 6 decimals). Each must have the TIP-20 address prefix
    /// `0x20c000000000000000000000`.
    pub tokens: Vec<Address>,
    /// Base units of each token minted per faucet call.
    pub faucet_amount: u128,
    /// Where the state is kept across restarts. `None`: in memory only.
    pub state_file: Option<PathBuf>,
}

impl Default for ChainConfig {
    fn default() -> Self {
        Self {
            chain_id: DEFAULT_CHAIN_ID,
            tokens: vec![PATH_USD],
            faucet_amount: DEFAULT_FAUCET_AMOUNT,
            state_file: None,
        }
    }
}

/// An escrow channel as the test chain holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelView {
    pub id: B256,
    pub descriptor: ChannelDescriptor,
    pub settled: u128,
    pub deposit: u128,
    /// Unix seconds of the payer's `requestClose`, or 0.
    pub close_requested_at: u32,
}

/// The test chain. Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct TestChain {
    inner: Arc<Inner>,
}

struct Inner {
    chain_id: u64,
    tokens: Vec<Address>,
    faucet_amount: u128,
    state_file: Option<PathBuf>,
    state: Mutex<State>,
}

impl TestChain {
    /// Creates the chain, loading `cfg.state_file` when it exists (and writing it otherwise).
    pub fn new(cfg: ChainConfig) -> anyhow::Result<TestChain> {
        if cfg.tokens.is_empty() {
            anyhow::bail!("the test chain needs at least one token");
        }
        if let Some(bad) = cfg
            .tokens
            .iter()
            .find(|t| !tempo_alloy::primitives::is_tip20_prefix(**t))
        {
            anyhow::bail!("{bad} is not a TIP-20 address (prefix 0x20c000000000000000000000)");
        }
        let loaded = match &cfg.state_file {
            Some(path) => State::load(path, cfg.chain_id)?,
            None => None,
        };
        let fresh = loaded.is_none();
        let state = match loaded {
            Some(s) => s,
            None => chain::genesis(cfg.chain_id),
        };
        if fresh && let Some(path) = &cfg.state_file {
            state.save(path)?;
        }
        tracing::warn!(
            chain_id = cfg.chain_id,
            state_file = ?cfg.state_file,
            "tollgate-testchain: local TEST chain, NO REAL MONEY; balances are minted by a faucet"
        );
        Ok(TestChain {
            inner: Arc::new(Inner {
                chain_id: cfg.chain_id,
                tokens: cfg.tokens,
                faucet_amount: cfg.faucet_amount,
                state_file: cfg.state_file,
                state: Mutex::new(state),
            }),
        })
    }

    /// The JSON-RPC 2.0 endpoint (`POST /`, single and batch requests).
    pub fn router(&self) -> axum::Router {
        rpc::router(self.clone())
    }

    /// Creates the chain and serves it on `listen` (port 0 picks a free port).
    pub async fn spawn(listen: SocketAddr, cfg: ChainConfig) -> anyhow::Result<RunningChain> {
        let chain = TestChain::new(cfg)?;
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let app = chain.router();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // A dropped sender also means stop.
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "tollgate-testchain server failed");
            }
        });
        tracing::warn!(%addr, "tollgate-testchain listening (NO REAL MONEY)");
        Ok(RunningChain {
            chain,
            addr,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    pub fn chain_id(&self) -> u64 {
        self.inner.chain_id
    }

    /// Base units of `token` held by `owner` (the escrow's own balance is the locked deposits).
    pub fn balance(&self, token: Address, owner: Address) -> u128 {
        self.lock().ledger.balance(token, owner)
    }

    /// The open channel `id`, or `None` (never opened, closed or withdrawn).
    pub fn channel(&self, id: B256) -> Option<ChannelView> {
        let state = self.lock();
        state.ledger.channels.get(&id).map(|c| ChannelView {
            id,
            descriptor: exec::descriptor_of(c),
            settled: c.settled,
            deposit: c.deposit,
            close_requested_at: c.close_requested_at,
        })
    }

    /// Mints the faucet amount of every token to `owner`, one mined transaction per token, like
    /// `tempo_fundAddress`. Returns the transaction hashes (empty if the state file could not
    /// be written, in which case nothing was minted).
    pub fn fund(&self, owner: Address) -> Vec<B256> {
        match self.fund_address(owner) {
            Ok(hashes) => hashes,
            Err(e) => {
                tracing::error!(error = %e.message, "tollgate-testchain: faucet failed");
                Vec::new()
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock; recover the state if one ever did.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A test chain served on a loopback socket. Dropping it stops the server.
pub struct RunningChain {
    chain: TestChain,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl RunningChain {
    /// `http://IP:PORT`, what an RPC client is given.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn chain(&self) -> &TestChain {
        &self.chain
    }

    /// Stops the server, waiting briefly for in-flight requests.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for RunningChain {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
