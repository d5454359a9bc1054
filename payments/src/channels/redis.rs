//! Channel records in Redis (many nodes): a per-channel lock (`SET NX PX`) and a fenced Lua
//! commit.

use std::time::Duration;

use async_trait::async_trait;
use mpp::VerificationError;
use tollgate_kv::{Conn, Target};

use super::{
    ChannelBackend, ChannelRecord, PendingCredit, PoisonedCredit, Updater, corrupt, unavailable,
};

/// Writes the record and the pending credits only while this node still holds the lock. Each
/// commit raises the record's version and marks it changed for the book of record
/// (book/src/channels.rs copies it, with the ledger lines up to the same point).
const COMMIT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'LOST' end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[3])
local v = redis.call('HINCRBY', KEYS[5], ARGV[3], 1)
redis.call('HSET', KEYS[6], ARGV[3], v)
for i = 4, #ARGV, 2 do redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1]) end
redis.call('DEL', KEYS[1])
return 'OK'
"#;

/// Takes a credit out of the held ones and, when it was held and ARGV[2] is given, makes it
/// pending (a release that came first wins: nothing is made pending then).
const UNHOLD: &str = r#"
local had = redis.call('HDEL', KEYS[1], ARGV[1])
if had == 1 and ARGV[2] ~= '' then redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) end
return had
"#;

const UNLOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#;

/// Channel records in Redis. Keys (prefix configurable): `{p}:mpp:ch:{id}` JSON record,
/// `{p}:mpp:lock:{id}` lock token, `{p}:mpp:channels` set of ids, `{p}:mpp:credits:pending`
/// hash key → JSON credit, `{p}:mpp:credits:poisoned` hash key → JSON [`PoisonedCredit`],
/// `{p}:mpp:credits:dropped` hash key → JSON [`PoisonedCredit`] (set aside, then dropped by an
/// operator), `{p}:mpp:credits:held` hash key → JSON credit (a start's reversal, held until its
/// outcome or deadline), `{p}:mpp:forced` set of ids with an unresolved forced close, `{p}:mpp:meta` hash (the close
/// watcher's block cursor), `{p}:mpp:ver` hash id → version (raised by every commit) and
/// `{p}:mpp:dirty` hash id → version (changed since the book of record stored it). The book
/// (book/src/channels.rs) reads and restores these keys by name.
#[derive(Clone)]
pub struct RedisChannels {
    conn: Conn,
    prefix: String,
    commit: redis::Script,
    unlock: redis::Script,
    lock_ttl: Duration,
    lock_wait: Duration,
}

impl RedisChannels {
    /// `prefix` is the deployment's (on a cluster, the keys carry it as a hash tag).
    pub async fn connect(
        target: impl Into<Target>,
        prefix: &str,
    ) -> Result<Self, VerificationError> {
        let target = target.into();
        let conn = target
            .connect_with(tollgate_kv::Timeouts::REQUESTS)
            .await
            .map_err(unavailable)?;
        Ok(RedisChannels {
            conn,
            prefix: target.family_prefix(prefix),
            commit: redis::Script::new(COMMIT),
            unlock: redis::Script::new(UNLOCK),
            lock_ttl: Duration::from_secs(5),
            lock_wait: Duration::from_secs(3),
        })
    }

    fn key(&self, what: &str) -> String {
        format!("{}:mpp:{what}", self.prefix)
    }
}

#[async_trait]
impl ChannelBackend for RedisChannels {
    async fn get(&self, id: &str) -> Result<Option<ChannelRecord>, VerificationError> {
        let mut c = self.conn.clone();
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.key(&format!("ch:{id}")))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        raw.map(|s| serde_json::from_str(&s).map_err(corrupt))
            .transpose()
    }

    async fn update(&self, id: &str, f: Updater) -> Result<ChannelRecord, VerificationError> {
        let mut c = self.conn.clone();
        let lock = self.key(&format!("lock:{id}"));
        let token = format!("{:032x}", rand_token());
        let deadline = tokio::time::Instant::now() + self.lock_wait;
        let mut pause = Duration::from_millis(2);
        loop {
            let got: Option<String> = redis::cmd("SET")
                .arg(&lock)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(self.lock_ttl.as_millis() as u64)
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            if got.is_some() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VerificationError::network_error(
                    "channel is busy with another update; retry",
                )
                .retryable());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        let result = async {
            let prev = self.get(id).await?;
            let upd = f(prev)?;
            let json = serde_json::to_string(&upd.record).map_err(corrupt)?;
            let mut inv = self.commit.prepare_invoke();
            inv.key(&lock)
                .key(self.key(&format!("ch:{id}")))
                .key(self.key("credits:pending"))
                .key(self.key("channels"))
                .key(self.key("ver"))
                .key(self.key("dirty"))
                .arg(&token)
                .arg(json)
                .arg(id);
            for credit in &upd.credits {
                inv.arg(&credit.key)
                    .arg(serde_json::to_string(credit).map_err(corrupt)?);
            }
            let reply: String = inv.invoke_async(&mut c).await.map_err(unavailable)?;
            if reply != "OK" {
                return Err(VerificationError::network_error(
                    "channel update lost its lock (the node stalled); nothing was written",
                )
                .retryable());
            }
            Ok(upd.record)
        }
        .await;
        if result.is_err() {
            // Best effort: the lock expires by itself anyway.
            let _: Result<i64, _> = self
                .unlock
                .key(&lock)
                .arg(&token)
                .invoke_async(&mut c)
                .await;
        }
        result
    }

    async fn pending_credits(&self) -> Result<Vec<PendingCredit>, VerificationError> {
        self.json_values("credits:pending").await
    }

    async fn add_pending(&self, credit: &PendingCredit) -> Result<(), VerificationError> {
        let mut c = self.conn.clone();
        let _: i64 = redis::cmd("HSETNX")
            .arg(self.key("credits:pending"))
            .arg(&credit.key)
            .arg(serde_json::to_string(credit).map_err(corrupt)?)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn hold(&self, credit: &PendingCredit) -> Result<(), VerificationError> {
        let mut c = self.conn.clone();
        let _: i64 = redis::cmd("HSET")
            .arg(self.key("credits:held"))
            .arg(&credit.key)
            .arg(serde_json::to_string(credit).map_err(corrupt)?)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn held_credits(&self) -> Result<Vec<PendingCredit>, VerificationError> {
        self.json_values("credits:held").await
    }

    async fn unhold(
        &self,
        key: &str,
        due: Option<&PendingCredit>,
    ) -> Result<bool, VerificationError> {
        let mut c = self.conn.clone();
        let due = due
            .map(serde_json::to_string)
            .transpose()
            .map_err(corrupt)?
            .unwrap_or_default();
        let had: i64 = redis::Script::new(UNHOLD)
            .key(self.key("credits:held"))
            .key(self.key("credits:pending"))
            .arg(key)
            .arg(due)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(had == 1)
    }

    async fn credit_done(&self, key: &str) -> Result<(), VerificationError> {
        let mut c = self.conn.clone();
        let _: i64 = redis::cmd("HDEL")
            .arg(self.key("credits:pending"))
            .arg(key)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn channel_ids(&self) -> Result<Vec<String>, VerificationError> {
        let mut c = self.conn.clone();
        redis::cmd("SMEMBERS")
            .arg(self.key("channels"))
            .query_async(&mut c)
            .await
            .map_err(unavailable)
    }

    async fn poison(&self, p: &PoisonedCredit) -> Result<(), VerificationError> {
        let mut c = self.conn.clone();
        let json = serde_json::to_string(p).map_err(corrupt)?;
        let _: () = redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(self.key("credits:poisoned"))
            .arg(&p.credit.key)
            .arg(json)
            .ignore()
            .cmd("HDEL")
            .arg(self.key("credits:pending"))
            .arg(&p.credit.key)
            .ignore()
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn poisoned(&self) -> Result<Vec<PoisonedCredit>, VerificationError> {
        self.json_values("credits:poisoned").await
    }

    async fn unpoison(
        &self,
        key: &str,
        retry: bool,
    ) -> Result<Option<PoisonedCredit>, VerificationError> {
        let mut c = self.conn.clone();
        let raw: Option<String> = redis::cmd("HGET")
            .arg(self.key("credits:poisoned"))
            .arg(key)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let Some(raw) = raw else { return Ok(None) };
        let p: PoisonedCredit = serde_json::from_str(&raw).map_err(corrupt)?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HDEL")
            .arg(self.key("credits:poisoned"))
            .arg(key)
            .ignore();
        if retry {
            pipe.cmd("HSETNX")
                .arg(self.key("credits:pending"))
                .arg(key)
                .arg(serde_json::to_string(&p.credit).map_err(corrupt)?)
                .ignore();
        } else {
            // Remembered: the book of record copies it, so that a rebuild counts this voucher
            // credit as settled by the operator rather than missing (never credited again).
            pipe.cmd("HSET")
                .arg(self.key("credits:dropped"))
                .arg(key)
                .arg(&raw)
                .ignore();
        }
        let _: () = pipe.query_async(&mut c).await.map_err(unavailable)?;
        Ok(Some(p))
    }

    async fn meta_get(&self, key: &str) -> Result<Option<String>, VerificationError> {
        let mut c = self.conn.clone();
        redis::cmd("HGET")
            .arg(self.key("meta"))
            .arg(key)
            .query_async(&mut c)
            .await
            .map_err(unavailable)
    }

    async fn meta_set(&self, key: &str, value: &str) -> Result<(), VerificationError> {
        let mut c = self.conn.clone();
        let _: i64 = redis::cmd("HSET")
            .arg(self.key("meta"))
            .arg(key)
            .arg(value)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn forced_add(&self, id: &str) -> Result<(), VerificationError> {
        self.set_op("SADD", id).await
    }

    async fn forced_remove(&self, id: &str) -> Result<(), VerificationError> {
        self.set_op("SREM", id).await
    }

    async fn forced_ids(&self) -> Result<Vec<String>, VerificationError> {
        let mut c = self.conn.clone();
        redis::cmd("SMEMBERS")
            .arg(self.key("forced"))
            .query_async(&mut c)
            .await
            .map_err(unavailable)
    }
}

impl RedisChannels {
    /// Every value of the hash `what` (under the prefix), as JSON.
    async fn json_values<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
    ) -> Result<Vec<T>, VerificationError> {
        let mut c = self.conn.clone();
        // Credits are applied from these lists: on a cluster, only what a replica holds too
        // (a commit whose acknowledgement failed may still be lost in a failover).
        let all: Vec<(String, String)> = c
            .query_confirmed(redis::cmd("HGETALL").arg(self.key(what)))
            .await
            .map_err(unavailable)?;
        all.into_iter()
            .map(|(_, v)| serde_json::from_str(&v).map_err(corrupt))
            .collect()
    }

    async fn set_op(&self, op: &str, id: &str) -> Result<(), VerificationError> {
        let mut c = self.conn.clone();
        let _: i64 = redis::cmd(op)
            .arg(self.key("forced"))
            .arg(id)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

fn rand_token() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    // Unique per call within and across processes: two random hasher seeds and the clock.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let hi = h.finish();
    let lo = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (u128::from(hi) << 64) | u128::from(lo)
}
