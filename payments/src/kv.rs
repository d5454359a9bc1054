//! The `mpp` crate's key-value store (replay protection for identity proofs) over Redis.
//! `dev` uses the crate's own `FileStore` in the data directory.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use mpp::StoreError;
use tollgate_kv::{Conn, Target};

type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Keys live under `{prefix}:mpp:kv:` and expire after `ttl` (longer than any challenge
/// lives, so a proof cannot be replayed while its challenge is valid).
#[derive(Clone)]
pub struct RedisKv {
    conn: Conn,
    prefix: String,
    ttl: Duration,
}

impl RedisKv {
    pub async fn connect(
        target: impl Into<Target>,
        prefix: &str,
        ttl: Duration,
    ) -> Result<Self, String> {
        let target = target.into();
        let conn = target
            .connect_with(tollgate_kv::Timeouts::REQUESTS)
            .await
            .map_err(|e| e.to_string())?;
        Ok(RedisKv {
            conn,
            prefix: target.family_prefix(prefix),
            ttl,
        })
    }

    fn key(&self, k: &str) -> String {
        format!("{}:mpp:kv:{k}", self.prefix)
    }
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

impl mpp::Store for RedisKv {
    fn get(&self, key: &str) -> Fut<'_, Option<serde_json::Value>> {
        let key = self.key(key);
        Box::pin(async move {
            let mut c = self.conn.clone();
            let raw: Option<String> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut c)
                .await
                .map_err(err)?;
            raw.map(|s| serde_json::from_str(&s).map_err(err))
                .transpose()
        })
    }

    fn put(&self, key: &str, value: serde_json::Value) -> Fut<'_, ()> {
        let key = self.key(key);
        Box::pin(async move {
            let mut c = self.conn.clone();
            let _: () = redis::cmd("SET")
                .arg(key)
                .arg(value.to_string())
                .arg("PX")
                .arg(self.ttl.as_millis() as u64)
                .query_async(&mut c)
                .await
                .map_err(err)?;
            Ok(())
        })
    }

    fn delete(&self, key: &str) -> Fut<'_, ()> {
        let key = self.key(key);
        Box::pin(async move {
            let mut c = self.conn.clone();
            let _: i64 = redis::cmd("DEL")
                .arg(key)
                .query_async(&mut c)
                .await
                .map_err(err)?;
            Ok(())
        })
    }

    fn put_if_absent(&self, key: &str, value: serde_json::Value) -> Fut<'_, bool> {
        let key = self.key(key);
        Box::pin(async move {
            let mut c = self.conn.clone();
            let r: Option<String> = redis::cmd("SET")
                .arg(key)
                .arg(value.to_string())
                .arg("NX")
                .arg("PX")
                .arg(self.ttl.as_millis() as u64)
                .query_async(&mut c)
                .await
                .map_err(err)?;
            Ok(r.is_some())
        })
    }
}
