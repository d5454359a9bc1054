//! Database rows per project and hour, for agents' views: counted in memory on the query path
//! and written to the control store once a second (the money itself goes through the balance
//! cache, not here).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::store::ControlStore;

pub struct RowsUsage {
    pending: Mutex<HashMap<String, (u64, u64)>>,
    store: Arc<dyn ControlStore>,
}

impl RowsUsage {
    pub fn new(store: Arc<dyn ControlStore>) -> Arc<RowsUsage> {
        Arc::new(RowsUsage {
            pending: Mutex::new(HashMap::new()),
            store,
        })
    }

    /// Writes what was counted since the last flush; what cannot be written is kept for the
    /// next one.
    pub async fn flush(&self) {
        let taken = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if taken.is_empty() {
            return;
        }
        let now_s = crate::model::now_ms() / 1000;
        let bucket = tollgate_routes::hour_bucket(now_s);
        for (project, (r, w)) in taken {
            if let Err(e) = self.store.add_rows(&project, &bucket, r, w).await {
                tracing::warn!(project = %project, error = %e, "database usage not recorded yet");
                self.add(&project, r, w);
            }
        }
    }

    /// Flushes every second until `stop`, then once more.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                _ = stop.wait_for(|s| *s) => true,
            };
            self.flush().await;
            if stopping {
                return;
            }
        }
    }

    fn add(&self, project: &str, r: u64, w: u64) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let e = p.entry(project.to_owned()).or_insert((0, 0));
        e.0 = e.0.saturating_add(r);
        e.1 = e.1.saturating_add(w);
    }
}

impl tollgate_database::Usage for RowsUsage {
    fn record(&self, project: &str, rows_read: u64, rows_written: u64, _cpu_us: u64) {
        if rows_read == 0 && rows_written == 0 {
            return;
        }
        self.add(project, rows_read, rows_written);
    }
}
