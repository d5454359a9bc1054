//! What the control service keeps: projects (owned by the paying account) and their deployments.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tollgate_bundler::Manifest;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectStatus {
    Active,
    /// The owner's balance is gone: routes stay (the proxy answers 402), processes may stop.
    Suspended,
    /// Unused for the inactivity TTL; garbage-collected.
    Expired,
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    pub id: String,
    /// Unique across the platform: the service answers at `<slug>.<base_domain>`.
    pub slug: String,
    /// The paying account (an ephemeral org with no human owner).
    pub owner: String,
    pub created_ms: u64,
    pub status: ProjectStatus,
    pub live_deployment: Option<String>,
    /// Deployment ids, oldest first.
    pub deployments: Vec<String>,
    pub last_activity_ms: u64,
    /// When it was deleted or expired (its database goes a slug grace after an expiry).
    #[serde(default)]
    pub ended_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployStatus {
    Building,
    Live,
    Failed,
    /// Was live; a later deployment replaced it.
    Superseded,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: String,
    pub project_id: String,
    /// 1, 2, 3… within the project.
    pub version: u32,
    pub status: DeployStatus,
    /// Why it failed (agent-readable), when it did.
    pub reason: Option<String>,
    pub created_ms: u64,
    pub manifest: Option<Manifest>,
    /// For a rollback: the deployment whose code this one runs again.
    pub rollback_of: Option<String>,
    pub compatibility_date: String,
    /// Names the project's database is bound under in this version's `env` (D1 bindings).
    #[serde(default)]
    pub databases: Vec<String>,
}

/// An env var of a project; secrets are never read back.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    pub value: String,
    pub secret: bool,
}

/// Secrets never reach logs through `{:?}`.
impl std::fmt::Debug for EnvVar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = if self.secret { "<secret>" } else { &self.value };
        f.debug_struct("EnvVar")
            .field("value", &value)
            .field("secret", &self.secret)
            .finish()
    }
}

pub type Env = BTreeMap<String, EnvVar>;
pub type Files = BTreeMap<String, String>;

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `p_` / `d_` + 16 lowercase base32 characters (80 random bits).
pub(crate) fn new_id(prefix: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut rng = rand::rng();
    let tail: String = (0..16)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}_{tail}")
}
