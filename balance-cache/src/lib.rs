//! The node-local balance cache. The request path calls [`BalanceCache::try_spend_request`]: one
//! lock-free lookup and atomic operations on the account's own slot, spending a lease this node
//! holds. The [`Agent`] refills and settles in the background through a
//! [`tollgate_metering::Store`]. No Pingora here. Design: docs/money.md.

pub mod agent;
pub mod cache;
pub mod clock;
mod feed;
pub mod metrics;
mod slots;

pub use agent::{Agent, AgentConfig, AgentError};
pub use cache::{BalanceCache, DEFAULT_CPU_DEBT_MS, Spend};
pub use metrics::CacheMetrics;
