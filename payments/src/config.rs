//! Payments configuration. Secrets (the HMAC key and the payee's private key) are wrapped so
//! that they never reach a log or a `Debug` print.

use std::time::Duration;

use alloy::primitives::{Address, address};

/// Tempo's TIP-1034 channel escrow precompile: the same address on every Tempo chain.
pub const ESCROW: Address = address!("0x4d50500000000000000000000000000000000000");
/// pathUSD, Tempo's 6-decimal stablecoin.
pub const PATH_USD: Address = address!("0x20c0000000000000000000000000000000000000");

/// A string that must not be logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The services realm of a platform realm (see [`PaymentsConfig::services_realm`]).
pub fn services_realm_of(realm: &str) -> String {
    format!("{realm}/services")
}

#[derive(Debug, Clone)]
pub struct PaymentsConfig {
    /// Protection space named in challenges (usually the public host).
    pub realm: String,
    /// HMAC key binding challenges (at least 32 bytes).
    pub secret: Secret,
    pub chain_id: u64,
    /// JSON-RPC endpoint of the chain (a Tempo node, or the local test chain).
    pub rpc_url: String,
    pub escrow: Address,
    /// The TIP-20 token payments are made in.
    pub currency: Address,
    /// The payee's private key: its address is the recipient in every challenge, and it
    /// signs settlements and closes.
    pub payee_key: Secret,
    /// Deposit a client is asked to lock when it opens a channel (base units; $5 default).
    pub suggested_deposit: u128,
    /// Smallest voucher increase accepted (base units).
    pub min_voucher_delta: u128,
    /// Largest single top-up (dollars).
    pub max_top_up_usd: u64,
    /// How long a challenge may be answered.
    pub challenge_ttl: Duration,
    /// How often spent money is settled on chain.
    pub settle_interval: Duration,
    /// Smallest amount worth a settlement transaction (base units).
    pub settle_min: u128,
    /// How often the close watcher reads the escrow's events and works on channels whose payer
    /// requested a close on chain (it also wakes at once when a voucher finds one).
    pub close_watch_interval: Duration,
    /// Blocks the watcher looks back on its very first run.
    pub close_watch_lookback_blocks: u64,
    /// The escrow's close grace period (Tempo: 900 s): dates a close request the crate recorded.
    pub close_grace: Duration,
    /// Write off the credit of a voucher still not captured this long before the payer may
    /// withdraw (the capture is retried until the channel is gone, and a late one gives the
    /// write-off back).
    pub write_off_margin: Duration,
    /// One chain JSON-RPC call that takes longer has failed (settlements, closes, voucher
    /// checks): a chain that stops answering fails a round, it does not hang it.
    pub chain_call_timeout: Duration,
}

impl PaymentsConfig {
    /// Defaults around the given chain endpoint and keys.
    pub fn new(rpc_url: &str, chain_id: u64, secret: Secret, payee_key: Secret) -> Self {
        PaymentsConfig {
            realm: "tollgate".into(),
            secret,
            chain_id,
            rpc_url: rpc_url.to_owned(),
            escrow: ESCROW,
            currency: PATH_USD,
            payee_key,
            suggested_deposit: 5_000_000,
            min_voucher_delta: 0,
            max_top_up_usd: 1_000,
            challenge_ttl: Duration::from_secs(60),
            settle_interval: Duration::from_secs(60),
            settle_min: 1_000_000,
            close_watch_interval: Duration::from_secs(10),
            close_grace: Duration::from_secs(900),
            close_watch_lookback_blocks: 5_000,
            write_off_margin: Duration::from_secs(60),
            chain_call_timeout: crate::chain::CALL_TIMEOUT,
        }
    }

    /// The realm of the 402 challenges on hosted services: derived from the platform realm, and
    /// not a hostname, so it can never equal the realm of a tenant that runs MPP itself (whose
    /// realm is usually its own host).
    pub fn services_realm(&self) -> String {
        services_realm_of(&self.realm)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(Duration::from_secs(1)..=Duration::from_secs(120)).contains(&self.chain_call_timeout) {
            return Err("payments.chain_timeout_seconds must be 1..=120".into());
        }
        if self.secret.expose().len() < 32 {
            return Err("payments.secret must be at least 32 bytes".into());
        }
        if self.realm.is_empty()
            || self.realm.contains(['"', '\\', '/'])
            || self.realm.chars().any(char::is_control)
        {
            return Err(
                "payments.realm must be a host name (non-empty; no quotes, backslashes or slashes)"
                    .into(),
            );
        }
        // A bare IP names a listener, not the platform: a wallet could not tell it from
        // anyone else's listener on that address.
        let host = self
            .realm
            .rsplit_once(':')
            .filter(|(_, port)| port.parse::<u16>().is_ok())
            .map_or(self.realm.as_str(), |(h, _)| h);
        if host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok()
            || self.realm.parse::<std::net::IpAddr>().is_ok()
        {
            return Err(format!(
                "payments.realm '{}' is an IP address: set public.mcp_url (or payments.realm) to the public MCP host name",
                self.realm
            ));
        }
        if self.suggested_deposit == 0 {
            return Err("payments.suggested_deposit_usd must be more than 0".into());
        }
        if self.max_top_up_usd == 0 || self.max_top_up_usd > 9_000 {
            return Err("payments.max_top_up_usd must be 1..=9000".into());
        }
        if self.challenge_ttl < Duration::from_secs(10) {
            return Err("payments.challenge_ttl must be at least 10 s".into());
        }
        if self.settle_interval < Duration::from_secs(1) {
            return Err("payments.settle_interval must be at least 1 s".into());
        }
        // A close request must be seen and captured well inside Tempo's 900 s grace period.
        if self.close_watch_interval.is_zero()
            || self.close_watch_interval > Duration::from_secs(300)
        {
            return Err("payments.close_watch_seconds must be 1..=300".into());
        }
        if self.write_off_margin < Duration::from_secs(30)
            || self.write_off_margin >= Duration::from_secs(600)
        {
            return Err("payments.write_off_margin_seconds must be 30..600".into());
        }
        // At least two watcher rounds fit in the margin: one failed read must not carry the
        // write-off past the moment the payer can withdraw.
        if self.close_watch_interval * 2 > self.write_off_margin {
            return Err(
                "payments.close_watch_seconds must be at most half of payments.write_off_margin_seconds"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let c = PaymentsConfig::new(
            "http://127.0.0.1:8545",
            42431,
            Secret::new("s".repeat(40)),
            Secret::new("k".repeat(64)),
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("ssss"), "{shown}");
        assert!(!shown.contains("kkkk"), "{shown}");
        assert!(c.validate().is_ok());
        let short = PaymentsConfig {
            secret: Secret::new("short"),
            ..c.clone()
        };
        assert!(short.validate().is_err());
        let thin_margin = PaymentsConfig {
            write_off_margin: Duration::from_secs(10),
            ..c.clone()
        };
        assert!(thin_margin.validate().is_err());
        let slow_watch = PaymentsConfig {
            close_watch_interval: Duration::from_secs(40),
            ..c
        };
        assert!(slow_watch.validate().is_err());
    }
}
