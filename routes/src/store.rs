//! Route writes and full loads against Redis.
//!
//! Keys (with the default prefix `tollgate`):
//! - `tollgate:routes` — hash, field `slug:<slug>` | `host:<hostname>`, value a [`RouteRecord`];
//! - `tollgate:routes:version` — the counter that orders every write;
//! - `tollgate:routes:events` — pub/sub channel carrying a [`RouteEvent`] per write.
//!
//! One Lua script does version, write and publish atomically, so a reader that subscribes first
//! and then reads the hash can never miss a change.

use tollgate_kv::{Conn, Target};

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
    /// A fenced write whose lock is no longer the writer's: nothing was written.
    #[error("route not written: the lock {0} is no longer held by this writer")]
    Fenced(String),
}

/// A lock that a route write is made under: written only while `key` holds `token` (checked
/// inside Redis, in the same step as the write).
#[derive(Debug, Clone, Copy)]
pub struct HeldLock<'a> {
    pub key: &'a str,
    pub token: &'a str,
}

// The record and event JSON are assembled in Lua so that the version and the server time are
// the ones of this very write. TIME is built as a string: Lua numbers are doubles and would
// print microsecond timestamps in exponent form.
const PUT_SCRIPT: &str = r#"
if ARGV[4] and redis.call('GET', ARGV[4]) ~= ARGV[5] then return -1 end
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
    conn: Conn,
    keys: Keys,
    script: redis::Script,
}

impl RouteStore {
    /// `prefix` is the deployment's (on a cluster, the keys carry it as a hash tag).
    pub async fn connect(target: impl Into<Target>, prefix: &str) -> Result<Self, StoreError> {
        let target = target.into();
        let conn = target.connect().await?;
        Ok(RouteStore {
            script: conn.script(PUT_SCRIPT),
            conn,
            keys: Keys::new(&target.family_prefix(prefix)),
        })
    }

    /// Writes a route; returns its version.
    pub async fn put(&self, key: &RouteKey, route: &Route) -> Result<u64, StoreError> {
        self.put_held(key, route, None).await
    }

    /// Deletes a route (writes a tombstone); returns its version.
    pub async fn delete(&self, key: &RouteKey) -> Result<u64, StoreError> {
        self.delete_held(key, None).await
    }

    /// [`RouteStore::put`], only while `lock` is held (else [`StoreError::Fenced`]).
    pub async fn put_held(
        &self,
        key: &RouteKey,
        route: &Route,
        lock: Option<HeldLock<'_>>,
    ) -> Result<u64, StoreError> {
        route.validate()?;
        let json = serde_json::to_string(route)?;
        self.write(key, &json, lock).await
    }

    /// [`RouteStore::delete`], only while `lock` is held (else [`StoreError::Fenced`]).
    pub async fn delete_held(
        &self,
        key: &RouteKey,
        lock: Option<HeldLock<'_>>,
    ) -> Result<u64, StoreError> {
        self.write(key, "", lock).await
    }

    async fn write(
        &self,
        key: &RouteKey,
        route_json: &str,
        lock: Option<HeldLock<'_>>,
    ) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = self.script.key(&self.keys.hash);
        inv.key(&self.keys.counter)
            .arg(key.field())
            .arg(route_json)
            .arg(&self.keys.channel);
        if let Some(l) = lock {
            inv.arg(l.key).arg(l.token);
        }
        let v: i64 = inv.invoke_async(&mut conn).await?;
        u64::try_from(v).map_err(|_| StoreError::Fenced(lock.map_or("?", |l| l.key).to_owned()))
    }

    /// The route stored for `key` (`None`: none, or a tombstone).
    pub async fn get(&self, key: &RouteKey) -> Result<Option<Route>, StoreError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = redis::cmd("HGET")
            .arg(&self.keys.hash)
            .arg(key.field())
            .query_async(&mut conn)
            .await?;
        Ok(match raw {
            Some(v) => serde_json::from_str::<RouteRecord>(&v)?.route,
            None => None,
        })
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
