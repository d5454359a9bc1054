//! `tollgate dev`'s chain: the project's local test chain (NO REAL MONEY), started in process
//! when the build has it (`--features dev-chain`, which scripts/dev and scripts/test turn on),
//! or a chain named with `--chain-rpc`. The production build carries no test chain.

use crate::modes::DevChoices;
use crate::settings::Settings;

/// The running test chain.
pub struct DevChain {
    #[cfg(feature = "dev-chain")]
    chain: tollgate_testchain::RunningChain,
}

impl DevChain {
    /// For the start-up banner.
    pub fn describe(&self) -> String {
        #[cfg(feature = "dev-chain")]
        {
            format!(
                "{} (chain id {}): the local TEST chain, NO REAL MONEY; fund a wallet with tempo_fundAddress",
                self.chain.url(),
                self.chain.chain().chain_id()
            )
        }
        #[cfg(not(feature = "dev-chain"))]
        String::new()
    }

    pub async fn shutdown(self) {
        #[cfg(feature = "dev-chain")]
        self.chain.shutdown().await;
    }
}

/// The chain `dev` pays on; the settings' payments section points at it.
pub async fn start(
    settings: &mut Settings,
    choices: &DevChoices,
) -> anyhow::Result<Option<DevChain>> {
    if let Some(url) = &choices.chain_rpc {
        settings.config.payments.rpc_url = url.clone();
        return Ok(None);
    }
    #[cfg(feature = "dev-chain")]
    {
        use anyhow::Context;
        let chain = tollgate_testchain::TestChain::spawn(
            choices.chain_listen,
            tollgate_testchain::ChainConfig {
                state_file: Some(settings.config.control.data_dir.join("testchain.json")),
                ..Default::default()
            },
        )
        .await
        .with_context(|| {
            format!(
                "starting the local test chain on {} (--chain-listen)",
                choices.chain_listen
            )
        })?;
        let p = &mut settings.config.payments;
        p.rpc_url = chain.url();
        p.chain_id = chain.chain().chain_id();
        p.allow_test_chain = true;
        Ok(Some(DevChain { chain }))
    }
    #[cfg(not(feature = "dev-chain"))]
    anyhow::bail!(
        "this build has no local test chain (it holds no real money and is left out of production builds): pass --chain-rpc URL, or build with `--features dev-chain` (scripts/dev does)"
    )
}
