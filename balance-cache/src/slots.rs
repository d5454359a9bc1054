//! The account → slot map, built for a million accounts in well under 100 bytes each.
//!
//! - Slots live in a slab of fixed chunks that never move, one cache line per slot, so threads
//!   spending for different accounts never share a line, and a slot needs no `Arc` header.
//! - The account id is stored *inside* its slot, packed into 24 bytes (`Packed`): ids of up to 23
//!   bytes as they are; longer ids of the form `<prefix>:0x<lowercase hex>` (the payments
//!   crate's `did:pkh:eip155:<chain>:0x<address>`) as a small interned prefix number plus the hex
//!   decoded to bytes. Anything else "spills" into a small side map (rare; never on a hot path
//!   that matters).
//! - The index is a table of 4-byte slot numbers keyed by a hash of the packed id: readers do one
//!   `ArcSwap` load and one probe, never lock and never write shared memory. A snapshot is a large
//!   `base` plus a small `overlay` of accounts added since; adding accounts copies only the
//!   overlay, which is folded into a new base once it passes 1/32 of it.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use hashbrown::HashTable;

use crate::cache::Slot;

/// A slot's number in the slab.
pub(crate) type SlotId = u32;

const CHUNK_BITS: u32 = 12;
const CHUNK: usize = 1 << CHUNK_BITS;
const CHUNKS: usize = 4096;
/// 16.7 million accounts per node; beyond that an account stays uncached (its requests wait,
/// then get 503 `metering-unavailable`), which an operator sees in the log.
pub(crate) const MAX_SLOTS: usize = CHUNK * CHUNKS;
/// Interned prefixes (`did:pkh:eip155:42431:` …); a deployment has a handful.
const MAX_PREFIXES: usize = 64;

const TAG_HEX: u8 = 0x80;
const TAG_SPILL: u8 = 0xff;
const INLINE_MAX: usize = 23;
const HEX_MAX: usize = 21;

/// An account id packed into 24 bytes (see the module doc), little-endian. Byte 23 says which
/// form: `0..=23` inline (the length; bytes `0..n`), `0x80 | n` n bytes of decoded hex (bytes
/// `0..n`) and the prefix number (bytes 21..23), `0xff` spilled (bytes `0..4`: its number).
/// Built in registers from word loads: assembling it in a byte buffer first cost a
/// store-forwarding stall that doubled the lookup.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Packed([u64; 3]);

impl std::hash::Hash for Packed {
    /// Three word writes (a slice of words would go through the hasher's byte path).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        for w in self.0 {
            state.write_u64(w);
        }
    }
}

impl Packed {
    fn tag(&self) -> u8 {
        (self.0[2] >> 56) as u8
    }

    fn bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        for (i, w) in self.0.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        b
    }

    fn spill(n: u32) -> Packed {
        Packed([u64::from(n), 0, u64::from(TAG_SPILL) << 56])
    }
}

/// Up to 8 bytes as a little-endian word.
#[inline]
fn word(b: &[u8]) -> u64 {
    if let Ok(x) = <[u8; 8]>::try_from(b) {
        return u64::from_le_bytes(x);
    }
    let mut w = 0u64;
    for (i, &c) in b.iter().enumerate() {
        w |= u64::from(c) << (8 * i);
    }
    w
}

/// Splits `<prefix>:0x<hex>` after its last `:` (or, for a 40-digit tail, at that `:`); `hex`
/// must be even and ≤ 42 digits.
#[inline]
fn split_hex(account: &str) -> Option<(&str, &[u8])> {
    let b = account.as_bytes();
    // An address (40 digits) is the common case: try its place first. (Where a later `:`
    // exists, the hex check refuses the tail, and the id spills: still one packing per id.)
    let colon = match b.len().checked_sub(43) {
        Some(at) if b[at] == b':' && &b[at + 1..at + 3] == b"0x" => at,
        _ => memchr::memrchr(b':', b)?,
    };
    if b.get(colon + 1..colon + 3)? != b"0x" {
        return None;
    }
    let hex = &b[colon + 3..];
    if hex.is_empty() || !hex.len().is_multiple_of(2) || hex.len() > 2 * HEX_MAX {
        return None;
    }
    Some((&account[..colon + 1], hex))
}

/// Lowercase hex digit → value; anything else → 0xff.
const HEX: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Eight lowercase hex digits (one little-endian word) → four bytes, without a branch or a
/// table: the lookup's hot part for `did:pkh` ids (20 bytes of address). The second value is
/// zero exactly when all eight are lowercase hex digits.
#[inline(always)]
fn swar_hex8(x: u64) -> (u32, u64) {
    const H: u64 = 0x8080_8080_8080_8080;
    const fn each(b: u8) -> u64 {
        u64::from_le_bytes([b; 8])
    }
    // Each byte is ASCII, so adding c < 0x80 sets its high bit exactly when byte ≥ 0x80 − c,
    // with no carry into the next byte.
    let ge = |lo: u8| (x.wrapping_add(each(0x80 - lo))) & H;
    let digit = ge(b'0') & !ge(b'9' + 1);
    let lower = ge(b'a') & !ge(b'f' + 1);
    let bad = (x & H) | ((digit | lower) ^ H);
    // Digit value: low nibble, plus 9 for letters (bit 6 set).
    let v = (x & each(0x0f)) + ((x >> 6) & each(0x01)) * 9;
    // Pairs (first digit is the high nibble) → one byte per 16-bit lane → four packed bytes.
    let t = ((v & 0x00ff_00ff_00ff_00ff) << 4) | ((v >> 8) & 0x00ff_00ff_00ff_00ff);
    let t = (t | (t >> 8)) & 0x0000_ffff_0000_ffff;
    let t = (t | (t >> 16)) & 0x0000_0000_ffff_ffff;
    (t as u32, bad)
}

/// Up to 42 lowercase hex digits (even) → up to 21 bytes, little-endian in three words.
#[inline]
fn decode_hex(hex: &[u8]) -> Option<[u64; 3]> {
    // An address (40 digits), in registers: five words in, validity checked once.
    if let Ok(h) = <&[u8; 40]>::try_from(hex) {
        let q = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&h[8 * i..8 * i + 8]);
            swar_hex8(u64::from_le_bytes(x))
        };
        let ((a, e0), (b, e1), (c, e2), (d, e3), (e, e4)) = (q(0), q(1), q(2), q(3), q(4));
        return (e0 | e1 | e2 | e3 | e4 == 0).then_some([
            u64::from(a) | u64::from(b) << 32,
            u64::from(c) | u64::from(d) << 32,
            u64::from(e),
        ]);
    }
    let mut w = [0u64; 3];
    let mut chunks = hex.chunks_exact(8);
    let mut at = 0usize; // output byte index
    for c in chunks.by_ref() {
        let (four, bad) = swar_hex8(word(c));
        if bad != 0 {
            return None;
        }
        *w.get_mut(at / 8)? |= u64::from(four) << (8 * (at % 8));
        at += 4;
    }
    let mut bad = 0u8;
    for pair in chunks.remainder().chunks_exact(2) {
        let (hi, lo) = (HEX[pair[0] as usize], HEX[pair[1] as usize]);
        bad |= hi | lo;
        *w.get_mut(at / 8)? |= u64::from(hi << 4 | (lo & 0x0f)) << (8 * (at % 8));
        at += 1;
    }
    (bad & 0xf0 == 0).then_some(w)
}

/// Packs `account` the one way it is always packed: inline when short; prefix + hex when the
/// prefix is interned; `None` otherwise (look in the spill map).
#[inline]
fn pack(account: &str, prefixes: &[Box<str>]) -> Option<Packed> {
    let a = account.as_bytes();
    let n = a.len();
    if n <= INLINE_MAX {
        let w0 = word(&a[..n.min(8)]);
        let w1 = if n > 8 { word(&a[8..n.min(16)]) } else { 0 };
        let w2 = if n > 16 { word(&a[16..]) } else { 0 };
        return Some(Packed([w0, w1, w2 | (n as u64) << 56]));
    }
    let (prefix, hex) = split_hex(account)?;
    let p = prefixes.iter().position(|x| **x == *prefix)? as u64;
    let mut w = decode_hex(hex)?;
    w[2] |= p << 40 | u64::from(TAG_HEX | (hex.len() / 2) as u8) << 56;
    Some(Packed(w))
}

fn unpack(p: Packed, prefixes: &[Box<str>], spilled: &Mutex<Vec<Arc<str>>>) -> Option<String> {
    let b = p.bytes();
    match p.tag() {
        n @ 0..=23 => String::from_utf8(b[..n as usize].to_vec()).ok(),
        TAG_SPILL => {
            let s = spilled.lock().unwrap_or_else(|e| e.into_inner());
            s.get(p.0[0] as usize).map(|s| s.to_string())
        }
        t if t & TAG_HEX != 0 => {
            let n = (t & !TAG_HEX) as usize;
            let prefix = prefixes.get(u16::from_le_bytes([b[21], b[22]]) as usize)?;
            let mut s = String::with_capacity(prefix.len() + 2 + 2 * n);
            s.push_str(prefix);
            s.push_str("0x");
            for byte in &b[..n] {
                s.push_str(&format!("{byte:02x}"));
            }
            Some(s)
        }
        _ => None,
    }
}

type Table = HashTable<SlotId>;

#[derive(Default)]
struct Snapshot {
    base: Arc<Table>,
    overlay: Table,
    /// Ids that do not pack (long and not `<prefix>:0x<hex>`, or the prefix table is full).
    spill: Arc<HashMap<Arc<str>, SlotId, foldhash::fast::RandomState>>,
    prefixes: Arc<Vec<Box<str>>>,
    len: u32,
}

pub(crate) struct SlotMap {
    current: ArcSwap<Snapshot>,
    chunks: Box<[OnceLock<Box<[Slot]>>]>,
    hasher: foldhash::fast::RandomState,
    /// Names of spilled ids by spill number (read by the agent only).
    spilled: Mutex<Vec<Arc<str>>>,
    writer: Mutex<()>,
}

impl SlotMap {
    pub(crate) fn new() -> Self {
        SlotMap {
            current: ArcSwap::from_pointee(Snapshot::default()),
            chunks: (0..CHUNKS).map(|_| OnceLock::new()).collect(),
            hasher: foldhash::fast::RandomState::default(),
            spilled: Mutex::new(Vec::new()),
            writer: Mutex::new(()),
        }
    }

    #[inline]
    pub(crate) fn slot(&self, id: SlotId) -> Option<&Slot> {
        let id = id as usize;
        self.chunks
            .get(id >> CHUNK_BITS)?
            .get()?
            .get(id & (CHUNK - 1))
    }

    #[inline]
    fn hash(&self, p: &Packed) -> u64 {
        self.hasher.hash_one(p)
    }

    #[inline]
    fn find_in(&self, snap: &Snapshot, account: &str) -> Option<SlotId> {
        let Some(p) = pack(account, &snap.prefixes) else {
            return snap.spill.get(account).copied();
        };
        let h = self.hash(&p);
        let eq = |&i: &SlotId| self.slot(i).is_some_and(|s| s.packed() == p);
        if !snap.overlay.is_empty()
            && let Some(&i) = snap.overlay.find(h, eq)
        {
            return Some(i);
        }
        snap.base.find(h, eq).copied()
    }

    /// The slot number of `account`, if it is cached here.
    pub(crate) fn find(&self, account: &str) -> Option<SlotId> {
        self.find_in(&self.current.load(), account)
    }

    /// Runs `f` on the account's slot, if the account is known here.
    #[inline]
    pub(crate) fn with<R>(&self, account: &str, f: impl FnOnce(SlotId, &Slot) -> R) -> Option<R> {
        let id = self.find_in(&self.current.load(), account)?;
        self.slot(id).map(|s| f(id, s))
    }

    /// The account id of a slot (allocates: for the agent, not the request path).
    pub(crate) fn name(&self, id: SlotId) -> Option<String> {
        let snap = self.current.load();
        let p = self.slot(id)?.packed();
        unpack(p, &snap.prefixes, &self.spilled)
    }

    /// Adds accounts that are not there yet, each slot first set up by `init`; returns the new
    /// slots' numbers.
    pub(crate) fn insert_many(
        &self,
        accounts: impl IntoIterator<Item = String>,
        init: impl Fn(&Slot),
    ) -> Vec<SlotId> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let cur = self.current.load_full();
        let mut overlay = cur.overlay.clone();
        let mut prefixes = cur.prefixes.clone();
        let mut spill = cur.spill.clone();
        let mut len = cur.len;
        let mut added = Vec::new();
        for a in accounts {
            if self.find_in(&cur, &a).is_some() {
                continue;
            }
            if (len as usize) >= MAX_SLOTS {
                tracing::error!(
                    account = %a,
                    "the balance cache is full ({MAX_SLOTS} accounts): this account is not metered here"
                );
                break;
            }
            // Intern a new prefix while there is room, so the id packs.
            if a.len() > INLINE_MAX
                && pack(&a, &prefixes).is_none()
                && let Some((prefix, hex)) = split_hex(&a)
                && decode_hex(hex).is_some()
                && prefixes.len() < MAX_PREFIXES
                && !prefixes.iter().any(|p| **p == *prefix)
            {
                Arc::make_mut(&mut prefixes).push(prefix.into());
            }
            let packed = match pack(&a, &prefixes) {
                Some(p) => {
                    let h = self.hash(&p);
                    let dup = |&i: &SlotId| self.slot(i).is_some_and(|s| s.packed() == p);
                    if overlay.find(h, dup).is_some() {
                        continue;
                    }
                    p
                }
                None => {
                    if spill.contains_key(a.as_str()) {
                        continue;
                    }
                    let mut names = self.spilled.lock().unwrap_or_else(|e| e.into_inner());
                    let n = names.len() as u32;
                    names.push(Arc::from(a.as_str()));
                    Packed::spill(n)
                }
            };
            let id = len;
            let Some(slot) = self.slot_or_alloc(id) else {
                break;
            };
            init(slot);
            slot.set_packed(packed);
            if packed.tag() == TAG_SPILL {
                Arc::make_mut(&mut spill).insert(Arc::from(a.as_str()), id);
            } else {
                let h = self.hash(&packed);
                overlay.insert_unique(h, id, |&i| self.hash_of(i));
            }
            len += 1;
            added.push(id);
        }
        if added.is_empty() {
            return added;
        }
        let next = if overlay.len() > 256 + cur.base.len() / 32 {
            let mut base = (*cur.base).clone();
            base.reserve(overlay.len(), |&i| self.hash_of(i));
            for &i in overlay.iter() {
                base.insert_unique(self.hash_of(i), i, |&j| self.hash_of(j));
            }
            Snapshot {
                base: Arc::new(base),
                overlay: Table::default(),
                spill,
                prefixes,
                len,
            }
        } else {
            Snapshot {
                base: cur.base.clone(),
                overlay,
                spill,
                prefixes,
                len,
            }
        };
        self.current.store(Arc::new(next));
        added
    }

    fn hash_of(&self, id: SlotId) -> u64 {
        self.slot(id).map_or(0, |s| self.hash(&s.packed()))
    }

    fn slot_or_alloc(&self, id: SlotId) -> Option<&Slot> {
        let id = id as usize;
        let chunk = self
            .chunks
            .get(id >> CHUNK_BITS)?
            .get_or_init(|| (0..CHUNK).map(|_| Slot::new()).collect());
        chunk.get(id & (CHUNK - 1))
    }

    /// Every slot number in use.
    pub(crate) fn ids(&self) -> std::ops::Range<SlotId> {
        0..self.current.load().len
    }

    pub(crate) fn keys(&self) -> Vec<String> {
        self.ids().filter_map(|i| self.name(i)).collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.current.load().len as usize
    }
}

/// Storage for a packed id inside a slot: written once before the slot is published (the
/// snapshot's `ArcSwap` store orders it before any reader finds the slot), then only read.
#[derive(Debug, Default)]
pub(crate) struct KeyWords([AtomicU64; 3]);

impl KeyWords {
    #[inline]
    fn load(&self) -> Packed {
        Packed([
            self.0[0].load(Ordering::Relaxed),
            self.0[1].load(Ordering::Relaxed),
            self.0[2].load(Ordering::Relaxed),
        ])
    }

    fn store(&self, p: Packed) {
        for (w, v) in self.0.iter().zip(p.0) {
            w.store(v, Ordering::Relaxed);
        }
    }
}

impl Slot {
    #[inline]
    pub(crate) fn packed(&self) -> Packed {
        self.key.load()
    }

    fn set_packed(&self, p: Packed) {
        self.key.store(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(map: &SlotMap, accounts: &[&str]) -> Vec<Option<String>> {
        accounts
            .iter()
            .map(|a| map.find(a).and_then(|i| map.name(i)))
            .collect()
    }

    #[test]
    fn every_form_of_id_is_found_and_named_back_exactly() {
        let map = SlotMap::new();
        let did = "did:pkh:eip155:42431:0x5b38da6a701c568545dcfcb03fcb875f56beddc4";
        let did2 = "did:pkh:eip155:1:0x5b38da6a701c568545dcfcb03fcb875f56beddc4";
        let upper = "did:pkh:eip155:42431:0x5B38Da6a701c568545dCfcB03FcB875f56beddC4";
        let long = "an-account-id-that-is-longer-than-twenty-three-bytes";
        let odd = "x:0xabc-and-then-some-more-bytes-to-be-long";
        let all = [
            "a",
            "acct-0000001",
            "exactly-23-bytes-long-x",
            did,
            did2,
            upper,
            long,
            odd,
        ];
        let added = map.insert_many(all.iter().map(|s| s.to_string()), |_| {});
        assert_eq!(added.len(), all.len());
        assert_eq!(map.len(), all.len());
        let want: Vec<Option<String>> = all.iter().map(|s| Some(s.to_string())).collect();
        assert_eq!(names(&map, &all), want);
        // Distinct ids, distinct slots.
        let mut ids: Vec<SlotId> = all.iter().filter_map(|a| map.find(a)).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), all.len());
        // Near misses are not found.
        for miss in [
            "",
            "acct-000000",
            "did:pkh:eip155:42431:0x5b38da6a701c568545dcfcb03fcb875f56beddc5",
            "did:pkh:eip155:42431:0x5b38da6a701c568545dcfcb03fcb875f56beddc",
            "did:pkh:eip155:4243:0x5b38da6a701c568545dcfcb03fcb875f56beddc4",
        ] {
            assert_eq!(map.find(miss), None, "{miss}");
        }
        // Adding again adds nothing.
        assert!(
            map.insert_many(all.iter().map(|s| s.to_string()), |_| {})
                .is_empty()
        );
        assert_eq!(map.keys().len(), all.len());
    }

    #[test]
    fn hex_digits_are_decoded_and_every_other_byte_is_refused() {
        let prefixes: Vec<Box<str>> = vec!["p:".into()];
        let base: Vec<u8> = b"0123456789abcdef0123456789abcdeffedcba98".to_vec();
        for at in [0, 7, 8, 15, 33, 39] {
            for c in 0u8..=255 {
                let mut hex = base.clone();
                hex[at] = c;
                let ok = c.is_ascii_digit() || (b'a'..=b'f').contains(&c);
                let Ok(hex) = String::from_utf8(hex) else {
                    continue; // not a &str: cannot be an account id
                };
                let id = format!("p:0x{hex}");
                let packed = pack(&id, &prefixes);
                assert_eq!(packed.is_some(), ok, "{id:?}");
                if let Some(p) = packed {
                    let back = unpack(p, &prefixes, &Mutex::new(Vec::new()));
                    assert_eq!(back.as_deref(), Some(id.as_str()));
                }
            }
        }
        // Every even length up to 42 digits round-trips.
        for n in (2..=42).step_by(2) {
            let id = format!(
                "p:0x{}",
                &"a1b2c3d4e5f60718293a4b5c6d7e8f9001122334455"[..n]
            );
            let p = pack(&id, &prefixes).expect("packs");
            assert_eq!(
                unpack(p, &prefixes, &Mutex::new(Vec::new())).as_deref(),
                Some(id.as_str())
            );
        }
    }

    #[test]
    fn a_full_prefix_table_spills_and_ids_stay_found() {
        let map = SlotMap::new();
        let ids: Vec<String> = (0..MAX_PREFIXES + 10)
            .map(|i| format!("did:pkh:eip155:{i}:0x5b38da6a701c568545dcfcb03fcb875f56beddc4"))
            .collect();
        map.insert_many(ids.iter().cloned(), |_| {});
        for id in &ids {
            let i = map.find(id).expect("cached");
            assert_eq!(map.name(i).as_deref(), Some(id.as_str()));
        }
        assert_eq!(map.len(), ids.len());
    }

    #[test]
    fn many_accounts_across_folds_and_chunks() {
        let map = SlotMap::new();
        let n = CHUNK * 2 + 100;
        for batch in (0..n).collect::<Vec<_>>().chunks(700) {
            map.insert_many(
                batch
                    .iter()
                    .map(|i| format!("did:pkh:eip155:42431:0x{i:040x}")),
                |s| s.requests.store(7, Ordering::Relaxed),
            );
        }
        assert_eq!(map.len(), n);
        for i in (0..n).step_by(97) {
            let id = format!("did:pkh:eip155:42431:0x{i:040x}");
            let got = map.with(&id, |slot_id, s| {
                (map.name(slot_id), s.requests.load(Ordering::Relaxed))
            });
            assert_eq!(got, Some((Some(id.clone()), 7)));
        }
    }
}
