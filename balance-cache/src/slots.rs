//! The account → slot map. Readers do one `ArcSwap` load and at most two hash lookups; they
//! never lock and never write shared memory. A snapshot is a large `base` plus a small `overlay`
//! of accounts added since; adding accounts copies only the overlay, and the overlay is folded
//! into a new base once it passes 1/32 of it (the same scheme as the route table).
//!
//! Each slot is its own allocation of one cache line (16 bytes of `Arc` header + 48 of slot),
//! so threads spending for different accounts never share a line.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::cache::Slot;

type Hasher = foldhash::fast::RandomState;
type Inner = HashMap<Arc<str>, Arc<Slot>, Hasher>;

#[derive(Default)]
struct Snapshot {
    base: Arc<Inner>,
    overlay: Inner,
}

pub(crate) struct SlotMap {
    current: ArcSwap<Snapshot>,
    writer: Mutex<()>,
}

impl SlotMap {
    pub(crate) fn new() -> Self {
        SlotMap {
            current: ArcSwap::from_pointee(Snapshot::default()),
            writer: Mutex::new(()),
        }
    }

    /// Runs `f` on the account's key and slot, if the account is known here.
    #[inline]
    pub(crate) fn with<R>(
        &self,
        account: &str,
        f: impl FnOnce(&Arc<str>, &Slot) -> R,
    ) -> Option<R> {
        let snap = self.current.load();
        if !snap.overlay.is_empty()
            && let Some((k, s)) = snap.overlay.get_key_value(account)
        {
            return Some(f(k, s));
        }
        snap.base.get_key_value(account).map(|(k, s)| f(k, s))
    }

    /// Adds accounts that are not there yet; returns the new slots.
    pub(crate) fn insert_many(
        &self,
        accounts: impl IntoIterator<Item = String>,
        make: impl Fn() -> Slot,
    ) -> Vec<(Arc<str>, Arc<Slot>)> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.current.load_full();
        let mut overlay = cur.overlay.clone();
        let mut added = Vec::new();
        for a in accounts {
            if cur.base.contains_key(a.as_str()) || overlay.contains_key(a.as_str()) {
                continue;
            }
            let key: Arc<str> = Arc::from(a.as_str());
            let slot = Arc::new(make());
            overlay.insert(key.clone(), slot.clone());
            added.push((key, slot));
        }
        if added.is_empty() {
            return added;
        }
        let next = if overlay.len() > 256 + cur.base.len() / 32 {
            let mut base = (*cur.base).clone();
            base.reserve(overlay.len());
            base.extend(overlay);
            Snapshot {
                base: Arc::new(base),
                overlay: Inner::default(),
            }
        } else {
            Snapshot {
                base: cur.base.clone(),
                overlay,
            }
        };
        self.current.store(Arc::new(next));
        added
    }

    /// Every (account, slot), for the agent's cut.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&Arc<str>, &Slot)) {
        let snap = self.current.load();
        for (k, v) in snap.base.iter().chain(snap.overlay.iter()) {
            f(k, v);
        }
    }

    pub(crate) fn keys(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.for_each(|k, _| out.push(k.to_string()));
        out
    }

    pub(crate) fn len(&self) -> usize {
        let snap = self.current.load();
        snap.base.len() + snap.overlay.len()
    }
}
