//! Route writes and full loads against Redis.
//!
//! Keys (with the default prefix `tollgate`):
//! - `tollgate:routes` — hash, field `slug:<slug>` | `host:<hostname>`, value a [`RouteRecord`];
//! - `tollgate:routes:version` — the counter that orders every write;
//! - `tollgate:routes:events` — pub/sub channel carrying a [`RouteEvent`] per write.
//!
//! One Lua script does version, write and publish atomically, so a reader that subscribes first
//! and then reads the hash can never miss a change.

use redis::aio::ConnectionManager;

use crate::schema::{Route, RouteError, RouteKey, RouteRecord};

/// Redis key names for one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    pub hash: String,
    pub counter: String,
    pub channel: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            hash: format!("{prefix}:routes"),
            counter: format!("{prefix}:routes:version"),
            channel: format!("{prefix}:routes:events"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("invalid route: {0}")]
    Invalid(#[from] RouteError),
    #[error("route could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

// The record and event JSON are assembled in Lua so that the version and the server time are
// the ones of this very write. TIME is built as a string: Lua numbers are doubles and would
// print microsecond timestamps in exponent form.
const PUT_SCRIPT: &str = r#"
local v = redis.call('INCR', KEYS[2])
local t = redis.call('TIME')
local ts = t[1] .. string.format('%06d', tonumber(t[2]))
local route = ARGV[2]
if route == '' then route = 'null' end
local body = '"v":' .. v .. ',"ts_us":' .. ts .. ',"route":' .. route
redis.call('HSET', KEYS[1], ARGV[1], '{' .. body .. '}')
redis.call('PUBLISH', ARGV[3], '{"key":' .. cjson.encode(ARGV[1]) .. ',' .. body .. '}')
return v
"#;

/// Writes routes (the control service, `tollgate routes`, tests).
#[derive(Clone)]
pub struct RouteStore {
    conn: ConnectionManager,
    keys: Keys,
    script: redis::Script,
}

impl RouteStore {
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(RouteStore {
            conn,
            keys: Keys::new(prefix),
            script: redis::Script::new(PUT_SCRIPT),
        })
    }

    /// Writes a route; returns its version.
    pub async fn put(&self, key: &RouteKey, route: &Route) -> Result<u64, StoreError> {
        route.validate()?;
        let json = serde_json::to_string(route)?;
        self.write(key, &json).await
    }

    /// Deletes a route (writes a tombstone); returns its version.
    pub async fn delete(&self, key: &RouteKey) -> Result<u64, StoreError> {
        self.write(key, "").await
    }

    async fn write(&self, key: &RouteKey, route_json: &str) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let v: u64 = self
            .script
            .key(&self.keys.hash)
            .key(&self.keys.counter)
            .arg(key.field())
            .arg(route_json)
            .arg(&self.keys.channel)
            .invoke_async(&mut conn)
            .await?;
        Ok(v)
    }

    /// Every stored record (tombstones included).
    pub async fn load_all(&self) -> Result<Vec<(RouteKey, RouteRecord)>, StoreError> {
        let mut conn = self.conn.clone();
        load_all(&mut conn, &self.keys).await
    }
}

/// Reads the whole hash; fields or values that do not parse are skipped with a warning (a bad
/// writer must not stop every proxy from loading the good routes).
pub(crate) async fn load_all<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    keys: &Keys,
) -> Result<Vec<(RouteKey, RouteRecord)>, StoreError> {
    let raw: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(&keys.hash)
        .query_async(conn)
        .await?;
    let mut out = Vec::with_capacity(raw.len());
    for (field, value) in raw {
        let Some(key) = RouteKey::from_field(&field) else {
            tracing::warn!(field, "skipping route with an invalid key");
            continue;
        };
        match serde_json::from_str::<RouteRecord>(&value) {
            Ok(rec) => out.push((key, rec)),
            Err(e) => tracing::warn!(field, error = %e, "skipping route that does not parse"),
        }
    }
    Ok(out)
}
