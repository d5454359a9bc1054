//! The route schema shared by every writer (control service, `tollgate routes`) and every reader
//! (proxy nodes). Documented for operators in `docs/routes.md`; change both together.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::host::{HostError, normalize_host_owned, validate_slug};

/// Where a route lives in the table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RouteKey {
    /// A platform subdomain: served at `<slug>.<base_domain>` on every node.
    Slug(String),
    /// An exact custom hostname.
    Host(String),
}

impl RouteKey {
    /// Validates and normalises a slug key.
    pub fn slug(slug: &str) -> Result<Self, HostError> {
        validate_slug(slug)?;
        Ok(RouteKey::Slug(slug.to_owned()))
    }

    /// Validates and normalises a custom hostname key.
    pub fn host(host: &str) -> Result<Self, HostError> {
        Ok(RouteKey::Host(normalize_host_owned(host)?))
    }

    /// The Redis hash field: `slug:<slug>` or `host:<hostname>`.
    pub fn field(&self) -> String {
        match self {
            RouteKey::Slug(s) => format!("slug:{s}"),
            RouteKey::Host(h) => format!("host:{h}"),
        }
    }

    /// Parses a hash field back; `None` for anything not written by a tollgate writer.
    pub fn from_field(field: &str) -> Option<Self> {
        if let Some(s) = field.strip_prefix("slug:") {
            RouteKey::slug(s).ok()
        } else if let Some(h) = field.strip_prefix("host:") {
            RouteKey::host(h).ok()
        } else {
            None
        }
    }

    /// The hostname requests carry for this key.
    pub fn hostname(&self, base_domain: &str) -> String {
        match self {
            RouteKey::Slug(s) => format!("{s}.{base_domain}"),
            RouteKey::Host(h) => h.clone(),
        }
    }
}

/// What a live route points at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Upstream addresses of the live deployment; requests are spread round-robin and a refused
    /// connection is retried on the next one.
    pub upstreams: Vec<SocketAddr>,
    /// The paying account that owns the service (used by metering).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
}

/// Why a route cannot be written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("a route needs at least one upstream address")]
    NoUpstreams,
    #[error("a route may have at most {max} upstream addresses")]
    TooManyUpstreams { max: usize },
}

impl Route {
    pub const MAX_UPSTREAMS: usize = 64;

    pub fn validate(&self) -> Result<(), RouteError> {
        if self.upstreams.is_empty() {
            return Err(RouteError::NoUpstreams);
        }
        if self.upstreams.len() > Self::MAX_UPSTREAMS {
            return Err(RouteError::TooManyUpstreams {
                max: Self::MAX_UPSTREAMS,
            });
        }
        Ok(())
    }
}

/// One stored version of a key: the value of the Redis hash field. `route: None` is a tombstone,
/// kept so that a late, older write can never bring a deleted route back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteRecord {
    /// Total order over all route writes (one Redis counter).
    pub v: u64,
    /// Redis server time of the write, microseconds since the epoch (for lag metrics only).
    pub ts_us: u64,
    pub route: Option<Route>,
}

/// A change notification on the pub/sub channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteEvent {
    pub key: String,
    pub v: u64,
    pub ts_us: u64,
    pub route: Option<Route>,
}
