//! Where the control service publishes routes: Redis (every proxy node follows it), or straight
//! into the route table of a proxy in the same process (`tollgate dev` without Redis).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use tollgate_routes::{Change, HeldLock, Route, RouteKey, RouteStore, RouteTable};

use crate::locks::Fence;

#[async_trait]
pub trait RoutePublisher: Send + Sync + 'static {
    async fn put(&self, key: &RouteKey, route: &Route) -> Result<(), String>;
    async fn delete(&self, key: &RouteKey) -> Result<(), String>;

    /// What is published for `key` now; `Err` where this publisher cannot tell.
    async fn get(&self, _key: &RouteKey) -> Result<Option<Route>, String> {
        Err("this route publisher cannot be read".into())
    }

    /// [`RoutePublisher::put`], made only while `fence` holds (where the store can check it).
    async fn put_fenced(
        &self,
        key: &RouteKey,
        route: &Route,
        _fence: Option<&Fence>,
    ) -> Result<(), String> {
        self.put(key, route).await
    }

    /// [`RoutePublisher::delete`], made only while `fence` holds.
    async fn delete_fenced(&self, key: &RouteKey, _fence: Option<&Fence>) -> Result<(), String> {
        self.delete(key).await
    }
}

fn held(fence: Option<&Fence>) -> Option<HeldLock<'_>> {
    fence.map(|f| HeldLock {
        key: &f.key,
        token: &f.token,
    })
}

#[async_trait]
impl RoutePublisher for RouteStore {
    async fn put(&self, key: &RouteKey, route: &Route) -> Result<(), String> {
        self.put_fenced(key, route, None).await
    }

    async fn delete(&self, key: &RouteKey) -> Result<(), String> {
        self.delete_fenced(key, None).await
    }

    async fn get(&self, key: &RouteKey) -> Result<Option<Route>, String> {
        RouteStore::get(self, key).await.map_err(|e| e.to_string())
    }

    async fn put_fenced(
        &self,
        key: &RouteKey,
        route: &Route,
        fence: Option<&Fence>,
    ) -> Result<(), String> {
        RouteStore::put_held(self, key, route, held(fence))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn delete_fenced(&self, key: &RouteKey, fence: Option<&Fence>) -> Result<(), String> {
        RouteStore::delete_held(self, key, held(fence))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Publishes into an in-process proxy's table. Nothing outlives the process: at start the
/// control service's recovery publishes every live deployment again.
pub struct LocalRoutes {
    table: Arc<RouteTable>,
    version: AtomicU64,
}

impl LocalRoutes {
    pub fn new(table: Arc<RouteTable>) -> Self {
        LocalRoutes {
            table,
            // Above any version the table was built with (static routes).
            version: AtomicU64::new(1_000_000),
        }
    }

    fn apply(&self, key: &RouteKey, route: Option<Route>) {
        let version = self.version.fetch_add(1, Ordering::AcqRel) + 1;
        self.table.apply([Change {
            key: key.clone(),
            version,
            route,
        }]);
    }
}

#[async_trait]
impl RoutePublisher for LocalRoutes {
    async fn put(&self, key: &RouteKey, route: &Route) -> Result<(), String> {
        route.validate().map_err(|e| e.to_string())?;
        self.apply(key, Some(route.clone()));
        Ok(())
    }

    async fn delete(&self, key: &RouteKey) -> Result<(), String> {
        self.apply(key, None);
        Ok(())
    }
}
