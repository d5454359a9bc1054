//! The tollgate dispatch proxy: a Pingora reverse proxy that routes by `Host` from a lock-free
//! route table kept in sync with Redis, answers clearly when it cannot, and exposes admin
//! endpoints for SREs.

pub mod admin;
pub mod config;
pub mod dispatch;
pub mod gate;
pub mod metrics;
pub mod pages;
pub mod server;
pub mod usage;

pub use config::{AdminConfig, ProxyConfig, RedisConfig, ShutdownConfig, StaticRoute};
pub use gate::{MeteringOptions, PaymentDesk, Redeemed, Refused, RequestHooks, StoreSource};
pub use server::{Proxy, ProxyOptions, Stop, StopHandle};
