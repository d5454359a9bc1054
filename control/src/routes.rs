//! Where the control service publishes routes: Redis (every proxy node follows it), or straight
//! into the route table of a proxy in the same process (`tollgate dev` without Redis).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use tollgate_routes::{Change, Route, RouteKey, RouteStore, RouteTable};

#[async_trait]
pub trait RoutePublisher: Send + Sync + 'static {
    async fn put(&self, key: &RouteKey, route: &Route) -> Result<(), String>;
    async fn delete(&self, key: &RouteKey) -> Result<(), String>;
}

#[async_trait]
impl RoutePublisher for RouteStore {
    async fn put(&self, key: &RouteKey, route: &Route) -> Result<(), String> {
        RouteStore::put(self, key, route)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn delete(&self, key: &RouteKey) -> Result<(), String> {
        RouteStore::delete(self, key)
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
