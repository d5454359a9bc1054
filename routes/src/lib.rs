//! The tollgate route table: who serves which hostname.
//!
//! Writers (the control service, `tollgate routes`) go through [`RouteStore`]; every proxy node
//! runs a [`RouteSync`] that keeps its lock-free [`RouteTable`] in step with Redis. No Pingora
//! here: the proxy crate adapts this to its request path.

pub mod host;
pub mod metrics;
pub mod schema;
pub mod store;
pub mod sync;
pub mod table;

pub mod usage;
pub use host::{HostError, MAX_HOST_LEN, normalize_host, normalize_host_owned, validate_slug};
pub use metrics::SyncMetrics;
pub use schema::{Route, RouteError, RouteEvent, RouteKey, RouteRecord};
pub use store::{HeldLock, Keys, RouteStore, StoreError};
pub use sync::{RouteSync, SyncOptions};
pub use table::{Change, ResolvedRoute, RouteTable, Snapshot};
pub use usage::{hour_bucket, usage_key};
