//! Channel records in a redb file (one node, `tollgate dev`): every update is one durable
//! write transaction.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use mpp::VerificationError;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    ChannelBackend, ChannelRecord, PendingCredit, PoisonedCredit, Updater, corrupt, unavailable,
};

const CHANNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("mpp_channels");
const PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("mpp_pending_credits");
const POISONED: TableDefinition<&str, &[u8]> = TableDefinition::new("mpp_poisoned_credits");
const META: TableDefinition<&str, &str> = TableDefinition::new("mpp_meta");
const FORCED: TableDefinition<&str, ()> = TableDefinition::new("mpp_forced_closes");
const HELD: TableDefinition<&str, &[u8]> = TableDefinition::new("mpp_held_credits");

/// Channel records in a redb file; every update is one durable write transaction.
#[derive(Clone)]
pub struct EmbeddedChannels {
    db: Arc<Database>,
}

impl EmbeddedChannels {
    pub fn open(path: &Path) -> Result<Self, VerificationError> {
        let db = Database::create(path).map_err(unavailable)?;
        let tx = db.begin_write().map_err(unavailable)?;
        tx.open_table(CHANNELS).map_err(unavailable)?;
        tx.open_table(PENDING).map_err(unavailable)?;
        tx.open_table(POISONED).map_err(unavailable)?;
        tx.open_table(META).map_err(unavailable)?;
        tx.open_table(FORCED).map_err(unavailable)?;
        tx.open_table(HELD).map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        Ok(EmbeddedChannels { db: Arc::new(db) })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, VerificationError> + Send + 'static,
    ) -> Result<T, VerificationError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(unavailable)?
    }

    /// Every key of `table`.
    async fn keys<V: redb::Value + Send + Sync + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, V>,
    ) -> Result<Vec<String>, VerificationError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(unavailable)?;
            let t = tx.open_table(table).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(unavailable)? {
                let (k, _) = row.map_err(unavailable)?;
                out.push(k.value().to_owned());
            }
            Ok(out)
        })
        .await
    }

    /// Every value of `table`, as JSON.
    async fn json_rows<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, &'static [u8]>,
    ) -> Result<Vec<T>, VerificationError> {
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(unavailable)?;
            let t = tx.open_table(table).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(unavailable)? {
                let (_, v) = row.map_err(unavailable)?;
                out.push(serde_json::from_slice(v.value()).map_err(corrupt)?);
            }
            Ok(out)
        })
        .await
    }

    /// Removes `key` from `table` (a no-op when absent).
    async fn remove_key<V: redb::Value + Send + Sync + 'static>(
        &self,
        table: TableDefinition<'static, &'static str, V>,
        key: &str,
    ) -> Result<(), VerificationError> {
        let key = key.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            tx.open_table(table)
                .map_err(unavailable)?
                .remove(key.as_str())
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl ChannelBackend for EmbeddedChannels {
    async fn get(&self, id: &str) -> Result<Option<ChannelRecord>, VerificationError> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(unavailable)?;
            let t = tx.open_table(CHANNELS).map_err(unavailable)?;
            match t.get(id.as_str()).map_err(unavailable)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(corrupt)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn update(&self, id: &str, f: Updater) -> Result<ChannelRecord, VerificationError> {
        let id = id.to_owned();
        self.blocking(move |db| {
            // redb runs one write transaction at a time: this is the per-channel lock.
            let tx = db.begin_write().map_err(unavailable)?;
            let record = {
                let mut t = tx.open_table(CHANNELS).map_err(unavailable)?;
                let prev: Option<ChannelRecord> = match t.get(id.as_str()).map_err(unavailable)? {
                    Some(v) => Some(serde_json::from_slice(v.value()).map_err(corrupt)?),
                    None => None,
                };
                // An error here drops `tx` uncommitted: nothing is written.
                let upd = f(prev)?;
                let bytes = serde_json::to_vec(&upd.record).map_err(corrupt)?;
                t.insert(id.as_str(), bytes.as_slice())
                    .map_err(unavailable)?;
                let mut p = tx.open_table(PENDING).map_err(unavailable)?;
                for credit in &upd.credits {
                    if p.get(credit.key.as_str()).map_err(unavailable)?.is_none() {
                        let bytes = serde_json::to_vec(credit).map_err(corrupt)?;
                        p.insert(credit.key.as_str(), bytes.as_slice())
                            .map_err(unavailable)?;
                    }
                }
                upd.record
            };
            tx.commit().map_err(unavailable)?;
            Ok(record)
        })
        .await
    }

    async fn pending_credits(&self) -> Result<Vec<PendingCredit>, VerificationError> {
        self.json_rows(PENDING).await
    }

    async fn hold(&self, credit: &PendingCredit) -> Result<(), VerificationError> {
        let credit = credit.clone();
        let bytes = serde_json::to_vec(&credit).map_err(corrupt)?;
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            {
                let mut t = tx.open_table(HELD).map_err(unavailable)?;
                t.insert(credit.key.as_str(), bytes.as_slice())
                    .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn held_credits(&self) -> Result<Vec<PendingCredit>, VerificationError> {
        self.json_rows(HELD).await
    }

    async fn unhold(
        &self,
        key: &str,
        due: Option<&PendingCredit>,
    ) -> Result<bool, VerificationError> {
        let key = key.to_owned();
        let due = due.map(serde_json::to_vec).transpose().map_err(corrupt)?;
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            let had;
            {
                let mut held = tx.open_table(HELD).map_err(unavailable)?;
                had = held.remove(key.as_str()).map_err(unavailable)?.is_some();
                if let Some(bytes) = due.as_ref().filter(|_| had) {
                    let mut pending = tx.open_table(PENDING).map_err(unavailable)?;
                    if pending.get(key.as_str()).map_err(unavailable)?.is_none() {
                        pending
                            .insert(key.as_str(), bytes.as_slice())
                            .map_err(unavailable)?;
                    }
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(had)
        })
        .await
    }

    async fn add_pending(&self, credit: &PendingCredit) -> Result<(), VerificationError> {
        let credit = credit.clone();
        let bytes = serde_json::to_vec(&credit).map_err(corrupt)?;
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            {
                let mut t = tx.open_table(PENDING).map_err(unavailable)?;
                if t.get(credit.key.as_str()).map_err(unavailable)?.is_none() {
                    t.insert(credit.key.as_str(), bytes.as_slice())
                        .map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn credit_done(&self, key: &str) -> Result<(), VerificationError> {
        self.remove_key(PENDING, key).await
    }

    async fn channel_ids(&self) -> Result<Vec<String>, VerificationError> {
        self.keys(CHANNELS).await
    }

    async fn poison(&self, p: &PoisonedCredit) -> Result<(), VerificationError> {
        let bytes = serde_json::to_vec(p).map_err(corrupt)?;
        let key = p.credit.key.clone();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            {
                let mut t = tx.open_table(POISONED).map_err(unavailable)?;
                t.insert(key.as_str(), bytes.as_slice())
                    .map_err(unavailable)?;
                let mut pending = tx.open_table(PENDING).map_err(unavailable)?;
                pending.remove(key.as_str()).map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn poisoned(&self) -> Result<Vec<PoisonedCredit>, VerificationError> {
        self.json_rows(POISONED).await
    }

    async fn unpoison(
        &self,
        key: &str,
        retry: bool,
    ) -> Result<Option<PoisonedCredit>, VerificationError> {
        let key = key.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            let found: Option<PoisonedCredit> = {
                let mut t = tx.open_table(POISONED).map_err(unavailable)?;
                match t.remove(key.as_str()).map_err(unavailable)? {
                    Some(v) => Some(serde_json::from_slice(v.value()).map_err(corrupt)?),
                    None => None,
                }
            };
            if let (Some(p), true) = (&found, retry) {
                let bytes = serde_json::to_vec(&p.credit).map_err(corrupt)?;
                let mut pending = tx.open_table(PENDING).map_err(unavailable)?;
                if pending.get(key.as_str()).map_err(unavailable)?.is_none() {
                    pending
                        .insert(key.as_str(), bytes.as_slice())
                        .map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(found)
        })
        .await
    }

    async fn meta_get(&self, key: &str) -> Result<Option<String>, VerificationError> {
        let key = key.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(unavailable)?;
            let t = tx.open_table(META).map_err(unavailable)?;
            Ok(t.get(key.as_str())
                .map_err(unavailable)?
                .map(|v| v.value().to_owned()))
        })
        .await
    }

    async fn meta_set(&self, key: &str, value: &str) -> Result<(), VerificationError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            tx.open_table(META)
                .map_err(unavailable)?
                .insert(key.as_str(), value.as_str())
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn forced_add(&self, id: &str) -> Result<(), VerificationError> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            tx.open_table(FORCED)
                .map_err(unavailable)?
                .insert(id.as_str(), ())
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn forced_remove(&self, id: &str) -> Result<(), VerificationError> {
        self.remove_key(FORCED, id).await
    }

    async fn forced_ids(&self) -> Result<Vec<String>, VerificationError> {
        self.keys(FORCED).await
    }
}
