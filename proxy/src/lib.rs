//! The tollgate dispatch proxy: a Pingora reverse proxy that routes by `Host` from a lock-free
//! route table kept in sync with Redis, answers clearly when it cannot, and exposes admin
//! endpoints for SREs.

pub mod access_log;
pub mod admin;
pub mod config;
pub mod dispatch;
pub mod gate;
mod header_guard;
mod headers;
pub mod metrics;
pub mod pages;
pub mod server;
pub mod tls;
pub mod usage;

pub use access_log::{AccessLogConfig, AccessLogFormat, AccessLogMode};
pub use config::{AdminConfig, ProxyConfig, RedisConfig, ShutdownConfig, StaticRoute};
pub use gate::{Metering, PaymentDesk, Redeemed, Refused, RequestHooks};
pub use server::{Proxy, ProxyOptions, RunningProxy, Stop};
pub use tls::{CertificateFiles, Certificates, TlsConfig, UnknownSni};
