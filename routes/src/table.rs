//! The lock-free route table.
//!
//! Readers do one `ArcSwap` load and at most two hash lookups; they never lock. A snapshot is a
//! large, rarely rebuilt `base` map plus a small `overlay` of recent changes, so applying one
//! change costs O(overlay), not O(table): the overlay is folded into a new base only when it grows
//! past a fraction of the base (see [`compact_threshold`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::schema::{Route, RouteKey, RouteRecord};

type Hasher = foldhash::fast::RandomState;
type HostMap = HashMap<Arc<str>, Entry, Hasher>;

/// A route as the proxy uses it.
#[derive(Debug)]
pub struct ResolvedRoute {
    pub hostname: Arc<str>,
    pub upstreams: Box<[SocketAddr]>,
    pub account_id: Option<Arc<str>>,
    pub project_id: Option<Arc<str>>,
    pub deployment_id: Option<Arc<str>>,
    /// Round-robin cursor; relaxed is enough, fairness is statistical.
    cursor: AtomicUsize,
    /// Requests and response bytes served through this route since the last usage flush (the
    /// proxy counts, a background task swaps them out).
    pub requests: AtomicU64,
    pub bytes_out: AtomicU64,
}

impl ResolvedRoute {
    fn new(hostname: Arc<str>, route: Route) -> Self {
        ResolvedRoute {
            hostname,
            upstreams: route.upstreams.into_boxed_slice(),
            account_id: route.account_id.map(Arc::from),
            project_id: route.project_id.map(Arc::from),
            deployment_id: route.deployment_id.map(Arc::from),
            cursor: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        }
    }

    /// The upstream for a request's first attempt (round-robin).
    pub fn first_pick(&self) -> usize {
        if self.upstreams.len() <= 1 {
            return 0;
        }
        self.cursor.fetch_add(1, Ordering::Relaxed) % self.upstreams.len()
    }

    /// The upstream for attempt `attempt` (0-based) of a request whose first pick was `first`.
    pub fn upstream(&self, first: usize, attempt: usize) -> Option<SocketAddr> {
        let n = self.upstreams.len();
        if n == 0 {
            return None;
        }
        self.upstreams.get((first + attempt) % n).copied()
    }
}

#[derive(Clone, Debug)]
struct Entry {
    version: u64,
    route: Option<Arc<ResolvedRoute>>,
}

/// One immutable view of the table.
#[derive(Default)]
pub struct Snapshot {
    base: Arc<HostMap>,
    overlay: HostMap,
    live: usize,
    max_version: u64,
}

impl Snapshot {
    #[inline]
    pub fn lookup(&self, host: &str) -> Option<&Arc<ResolvedRoute>> {
        if !self.overlay.is_empty()
            && let Some(e) = self.overlay.get(host)
        {
            return e.route.as_ref();
        }
        self.base.get(host).and_then(|e| e.route.as_ref())
    }

    fn entry(&self, host: &str) -> Option<&Entry> {
        self.overlay.get(host).or_else(|| self.base.get(host))
    }

    /// Every live route (overlay entries shadow base ones).
    pub fn routes(&self) -> Vec<Arc<ResolvedRoute>> {
        let mut out: Vec<Arc<ResolvedRoute>> = self
            .overlay
            .values()
            .filter_map(|e| e.route.clone())
            .collect();
        out.extend(
            self.base
                .iter()
                .filter(|(h, _)| !self.overlay.contains_key(*h))
                .filter_map(|(_, e)| e.route.clone()),
        );
        out
    }

    /// Number of live (non-deleted) routes.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }
}

fn compact_threshold(base_len: usize) -> usize {
    256 + base_len / 32
}

/// A change to apply: the key, its version and the new route (`None` deletes).
pub struct Change {
    pub key: RouteKey,
    pub version: u64,
    pub route: Option<Route>,
}

/// The shared route table: one per proxy process.
pub struct RouteTable {
    current: ArcSwap<Snapshot>,
    base_domain: String,
    statics: Vec<(Arc<str>, Route)>,
    writer: Mutex<()>,
    synced: AtomicBool,
    applied: watch::Sender<u64>,
}

impl RouteTable {
    /// `statics` are routes from configuration, keyed by hostname; they have version 0, so any
    /// route written through Redis for the same hostname takes precedence.
    pub fn new(base_domain: &str, statics: Vec<(String, Route)>) -> Self {
        let table = RouteTable {
            current: ArcSwap::from_pointee(Snapshot::default()),
            base_domain: base_domain.to_owned(),
            statics: statics
                .into_iter()
                .map(|(h, r)| (Arc::from(h.as_str()), r))
                .collect(),
            writer: Mutex::new(()),
            synced: AtomicBool::new(false),
            applied: watch::channel(0).0,
        };
        table.replace_all(Vec::new());
        table
    }

    pub fn base_domain(&self) -> &str {
        &self.base_domain
    }

    /// The current snapshot; cheap, lock-free.
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// Looks a normalised hostname up.
    #[inline]
    pub fn lookup(&self, host: &str) -> Option<Arc<ResolvedRoute>> {
        self.current.load().lookup(host).cloned()
    }

    /// True once a full load has been applied (from Redis, or the static routes alone).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Marks the table complete without Redis (static routes only, or an in-process writer).
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    /// The highest route version applied so far; waiters use it to learn a write is being served.
    pub fn watch_version(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// Replaces the whole table with a full load (static routes, then `records` on top).
    pub fn replace_all(&self, records: Vec<(RouteKey, RouteRecord)>) {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut base = HostMap::with_capacity_and_hasher(
            records.len() + self.statics.len(),
            Hasher::default(),
        );
        for (host, route) in &self.statics {
            let resolved = ResolvedRoute::new(host.clone(), route.clone());
            base.insert(
                host.clone(),
                Entry {
                    version: 0,
                    route: Some(Arc::new(resolved)),
                },
            );
        }
        let mut max_version = 0;
        for (key, rec) in records {
            let host: Arc<str> = Arc::from(key.hostname(&self.base_domain).as_str());
            max_version = max_version.max(rec.v);
            if base.get(&host).is_some_and(|e| e.version >= rec.v) {
                continue;
            }
            let route = rec
                .route
                .map(|r| Arc::new(ResolvedRoute::new(host.clone(), r)));
            base.insert(
                host,
                Entry {
                    version: rec.v,
                    route,
                },
            );
        }
        let live = base.values().filter(|e| e.route.is_some()).count();
        self.current.store(Arc::new(Snapshot {
            base: Arc::new(base),
            overlay: HostMap::default(),
            live,
            max_version,
        }));
        self.applied.send_replace(max_version);
    }

    /// Applies changes whose version is newer than what the table holds for that hostname.
    /// Returns how many were applied; older or equal versions are ignored (idempotent, and safe
    /// against reordering).
    pub fn apply(&self, changes: impl IntoIterator<Item = Change>) -> usize {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.current.load_full();
        let mut overlay = cur.overlay.clone();
        let mut live = cur.live;
        let mut max_version = cur.max_version;
        let mut applied = 0;
        for ch in changes {
            let host = ch.key.hostname(&self.base_domain);
            let old = overlay
                .get(host.as_str())
                .or_else(|| cur.base.get(host.as_str()));
            if old.is_some_and(|e| e.version >= ch.version) {
                continue;
            }
            let was_live = old.is_some_and(|e| e.route.is_some());
            let host: Arc<str> = Arc::from(host.as_str());
            let route = ch
                .route
                .map(|r| Arc::new(ResolvedRoute::new(host.clone(), r)));
            let is_live = route.is_some();
            overlay.insert(
                host,
                Entry {
                    version: ch.version,
                    route,
                },
            );
            live = live + usize::from(is_live) - usize::from(was_live);
            max_version = max_version.max(ch.version);
            applied += 1;
        }
        if applied == 0 {
            return 0;
        }
        let next = if overlay.len() > compact_threshold(cur.base.len()) {
            let mut base = (*cur.base).clone();
            base.extend(overlay);
            Snapshot {
                base: Arc::new(base),
                overlay: HostMap::default(),
                live,
                max_version,
            }
        } else {
            Snapshot {
                base: cur.base.clone(),
                overlay,
                live,
                max_version,
            }
        };
        self.current.store(Arc::new(next));
        self.applied.send_replace(max_version);
        applied
    }

    /// The version held for a hostname (tombstones included), for tests and debugging.
    pub fn version_of(&self, host: &str) -> Option<u64> {
        self.current.load().entry(host).map(|e| e.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(port: u16) -> Route {
        Route {
            upstreams: vec![SocketAddr::from(([127, 0, 0, 1], port))],
            account_id: None,
            project_id: None,
            deployment_id: None,
        }
    }

    fn change(slug: &str, v: u64, port: Option<u16>) -> Change {
        Change {
            key: RouteKey::slug(slug).unwrap(),
            version: v,
            route: port.map(route),
        }
    }

    fn port_of(t: &RouteTable, host: &str) -> Option<u16> {
        t.lookup(host).map(|r| r.upstreams[0].port())
    }

    #[test]
    fn newer_versions_win_and_order_does_not_matter() {
        let t = RouteTable::new("localhost", vec![]);
        assert_eq!(
            t.apply([change("a", 5, Some(1)), change("a", 3, Some(2))]),
            1
        );
        assert_eq!(port_of(&t, "a.localhost"), Some(1));
        // Same version again: ignored.
        assert_eq!(t.apply([change("a", 5, Some(9))]), 0);
        // Delete at 6, then a late write at 4 must not resurrect it.
        t.apply([change("a", 6, None)]);
        t.apply([change("a", 4, Some(3))]);
        assert_eq!(port_of(&t, "a.localhost"), None);
        assert_eq!(t.snapshot().len(), 0);
        assert_eq!(t.version_of("a.localhost"), Some(6));
    }

    #[test]
    fn statics_lose_to_redis_and_survive_full_reload() {
        let t = RouteTable::new("localhost", vec![("s.example".into(), route(7))]);
        assert_eq!(port_of(&t, "s.example"), Some(7));
        t.apply([Change {
            key: RouteKey::host("s.example").unwrap(),
            version: 1,
            route: Some(route(8)),
        }]);
        assert_eq!(port_of(&t, "s.example"), Some(8));
        t.replace_all(vec![]);
        assert_eq!(port_of(&t, "s.example"), Some(7));
    }

    #[test]
    fn compaction_keeps_every_route() {
        let t = RouteTable::new("localhost", vec![]);
        for i in 0..2000u64 {
            t.apply([change(
                &format!("s{i}"),
                i + 1,
                Some(1000 + (i % 50) as u16),
            )]);
        }
        assert_eq!(t.snapshot().len(), 2000);
        for i in 0..2000u64 {
            assert_eq!(
                port_of(&t, &format!("s{i}.localhost")),
                Some(1000 + (i % 50) as u16)
            );
        }
        // The overlay was folded into the base at least once.
        assert!(t.snapshot().overlay.len() <= compact_threshold(t.snapshot().base.len()));
        assert!(!t.snapshot().base.is_empty());
    }

    #[test]
    fn round_robin_and_failover() {
        let r = ResolvedRoute::new(
            Arc::from("x"),
            Route {
                upstreams: vec![
                    SocketAddr::from(([127, 0, 0, 1], 1)),
                    SocketAddr::from(([127, 0, 0, 1], 2)),
                ],
                account_id: None,
                project_id: None,
                deployment_id: None,
            },
        );
        let a = r.first_pick();
        let b = r.first_pick();
        assert_ne!(a, b);
        assert_ne!(r.upstream(a, 0), r.upstream(a, 1));
    }
}
