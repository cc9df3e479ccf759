//! The set of key names of one slot: a compact chained hash table with
//! incremental rehashing and a resize-proof scan cursor.
//!
//! Why not `HashSet<Vec<u8>>`: a `Vec` costs 24 bytes plus its own allocation,
//! and hashbrown's load factor adds another 10-25 bytes per key, which blows
//! the budget of "key length + 32 bytes" per indexed key. Here every key is a
//! single allocation holding the chain pointer, a varint length and the bytes
//! (9 bytes of overhead for keys up to 127 bytes), and the bucket array costs
//! 8-16 bytes per key (load factor 0.5..1).
//!
//! Why chaining and a power-of-two table instead of open addressing: SLOTS.SCAN
//! must return every key that is present during the whole scan, even when the
//! table grows or shrinks between calls. That is exactly what Redis' own
//! `dictScan` guarantees with its reverse-binary cursor, and the guarantee
//! depends on "a key lives in bucket `hash & mask`", which only chaining gives.
//!
//! Why incremental rehashing: a slot can hold millions of keys (hash tags pin
//! whole tenants to one slot); rehashing them at once would stall the event
//! loop for tens of milliseconds. As in Redis, every insert/remove moves one
//! bucket, and a cron (`rehash_for`) moves more within a time budget.

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::ptr::NonNull;
use std::sync::OnceLock;
use std::time::Instant;

/// Header of one key allocation; the varint length and the key bytes follow.
#[repr(C)]
struct EntryHeader {
    next: Link,
}

type Link = Option<NonNull<EntryHeader>>;

const HEADER: usize = std::mem::size_of::<EntryHeader>();

fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

/// The size the allocator really hands out for a request of `size` bytes:
/// jemalloc's size classes (the allocator of every server we load into), four
/// classes per power of two above 128 bytes, 16-byte steps below. INFO reports
/// these figures, so they must include the rounding, not just what we asked.
pub fn allocated_size(size: usize) -> usize {
    if size <= 8 {
        8
    } else if size <= 128 {
        size.next_multiple_of(16)
    } else {
        let lg = usize::BITS - 1 - (size - 1).leading_zeros();
        size.next_multiple_of(1 << (lg - 2))
    }
}

fn entry_layout(key_len: usize) -> Layout {
    Layout::from_size_align(HEADER + varint_len(key_len) + key_len, 8)
        .expect("key length overflows a layout")
}

/// Allocates an entry holding `key`, chained in front of `next`.
fn entry_new(key: &[u8], next: Link) -> NonNull<EntryHeader> {
    let layout = entry_layout(key.len());
    // SAFETY: the layout is non-zero sized (the header alone is 8 bytes). The
    // writes below stay inside it: header, then varint_len(len) bytes, then
    // len bytes, which is exactly the size entry_layout computed.
    unsafe {
        let p = alloc(layout);
        let Some(p) = NonNull::new(p) else {
            handle_alloc_error(layout)
        };
        let header = p.cast::<EntryHeader>();
        header.as_ptr().write(EntryHeader { next });
        let mut at = p.as_ptr().add(HEADER);
        let mut n = key.len();
        while n >= 0x80 {
            at.write((n as u8 & 0x7f) | 0x80);
            at = at.add(1);
            n >>= 7;
        }
        at.write(n as u8);
        at = at.add(1);
        std::ptr::copy_nonoverlapping(key.as_ptr(), at, key.len());
        header
    }
}

/// The key bytes of an entry.
///
/// SAFETY: `e` must be a live entry made by `entry_new`; the slice is valid
/// until the entry is freed, which only `entry_free` does, and the table never
/// frees an entry while a borrow of the table (and so of this slice) is alive.
unsafe fn entry_key<'a>(e: NonNull<EntryHeader>) -> &'a [u8] {
    let mut at = e.as_ptr().cast::<u8>().add(HEADER);
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let b = *at;
        at = at.add(1);
        len |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    std::slice::from_raw_parts(at, len)
}

/// SAFETY: `e` must be a live entry made by `entry_new` and unlinked from
/// every chain; it must not be used afterwards.
unsafe fn entry_free(e: NonNull<EntryHeader>) -> usize {
    let layout = entry_layout(entry_key(e).len());
    dealloc(e.as_ptr().cast(), layout);
    layout.size()
}

/// SAFETY: `e` must be a live entry.
unsafe fn entry_next(e: NonNull<EntryHeader>) -> Link {
    (*e.as_ptr()).next
}

/// SAFETY: `e` must be a live entry owned by the caller's table.
unsafe fn entry_set_next(e: NonNull<EntryHeader>, next: Link) {
    (*e.as_ptr()).next = next;
}

fn hasher() -> &'static foldhash::fast::FixedState {
    // Keys come from clients: a per-process random seed keeps an attacker
    // from choosing keys that all land in one bucket. (Not ahash's RandomState:
    // it allocates a global random source that is never freed, which leaks
    // on every MODULE UNLOAD.)
    static STATE: OnceLock<foldhash::fast::FixedState> = OnceLock::new();
    STATE.get_or_init(|| {
        use std::hash::BuildHasher;
        let seed = std::collections::hash_map::RandomState::new().hash_one(0x5107_f0e4_u64);
        foldhash::fast::FixedState::with_seed(seed)
    })
}

#[inline]
fn hash_key(key: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    hasher().hash_one(key)
}

/// A bucket array of `n` empty chains, from zeroed memory: a big table costs
/// no page touching until buckets are used (see alloc.rs).
fn zeroed_buckets(n: usize) -> Box<[Link]> {
    if n == 0 {
        return Box::new([]);
    }
    let layout = Layout::array::<Link>(n).expect("bucket array size overflows");
    // SAFETY: `Option<NonNull<_>>` is guaranteed to represent `None` as the
    // all-zero bit pattern, so zeroed memory is `n` valid empty links; the
    // layout is non-zero sized and the box takes ownership of the block with
    // the same layout it will be freed with.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<Link>();
        if p.is_null() {
            handle_alloc_error(layout);
        }
        Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n))
    }
}

#[derive(Default)]
struct Table {
    buckets: Box<[Link]>,
    used: usize,
}

impl Table {
    fn with_size(size: usize) -> Table {
        Table {
            buckets: zeroed_buckets(size),
            used: 0,
        }
    }
    fn size(&self) -> usize {
        self.buckets.len()
    }
    fn mask(&self) -> u64 {
        (self.buckets.len() as u64).wrapping_sub(1)
    }
    fn bucket_of(&self, hash: u64) -> usize {
        (hash & self.mask()) as usize
    }
    fn bytes(&self) -> usize {
        match self.buckets.len() {
            0 => 0,
            n => allocated_size(n * std::mem::size_of::<Link>()),
        }
    }
    fn find(&self, key: &[u8], hash: u64) -> bool {
        if self.buckets.is_empty() {
            return false;
        }
        let mut cur = self.buckets[self.bucket_of(hash)];
        while let Some(e) = cur {
            // SAFETY: every entry reachable from a bucket is live (owned by us).
            unsafe {
                if entry_key(e) == key {
                    return true;
                }
                cur = entry_next(e);
            }
        }
        false
    }
    /// Unlinks the entry for `key` and returns it.
    fn unlink(&mut self, key: &[u8], hash: u64) -> Link {
        if self.buckets.is_empty() {
            return None;
        }
        let b = self.bucket_of(hash);
        let mut prev: Link = None;
        let mut cur = self.buckets[b];
        while let Some(e) = cur {
            // SAFETY: entries in the chain are live and owned by this table.
            unsafe {
                let next = entry_next(e);
                if entry_key(e) == key {
                    match prev {
                        None => self.buckets[b] = next,
                        Some(p) => entry_set_next(p, next),
                    }
                    self.used -= 1;
                    return Some(e);
                }
                prev = cur;
                cur = next;
            }
        }
        None
    }
    fn each_in_bucket(&self, b: usize, f: &mut impl FnMut(&[u8])) {
        let mut cur = self.buckets[b];
        while let Some(e) = cur {
            // SAFETY: live entries; `f` gets a borrow that ends before we go on.
            unsafe {
                f(entry_key(e));
                cur = entry_next(e);
            }
        }
    }
}

/// A set of byte-string keys.
pub struct KeySet {
    t: [Table; 2],
    /// Next bucket of `t[0]` to move into `t[1]`; `None` when not rehashing.
    rehash_idx: Option<usize>,
    /// Bytes of entry allocations (as requested from the allocator).
    entry_bytes: usize,
}

// SAFETY: a KeySet exclusively owns all its entries (nothing else points into
// them), so moving it to another thread (e.g. to free a flushed index in the
// background) is sound.
unsafe impl Send for KeySet {}

const MIN_SIZE: usize = 4;
/// Keys per bucket before the table doubles. Redis uses 1; we allow 2 because
/// the bucket array is most of our per-key overhead (4-8 bytes per key here
/// instead of 8-16), and one more short chain step is cheap next to the
/// server's own work per command.
const MAX_LOAD: usize = 2;

impl Default for KeySet {
    fn default() -> Self {
        Self::new()
    }
}

impl KeySet {
    pub fn new() -> KeySet {
        KeySet {
            t: [Table::default(), Table::default()],
            rehash_idx: None,
            entry_bytes: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.t[0].used + self.t[1].used
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_rehashing(&self) -> bool {
        self.rehash_idx.is_some()
    }

    /// Memory held by the set: entries and bucket arrays.
    pub fn bytes(&self) -> usize {
        self.entry_bytes + self.t[0].bytes() + self.t[1].bytes()
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        if self.is_empty() {
            return false;
        }
        let h = hash_key(key);
        self.t[0].find(key, h) || (self.is_rehashing() && self.t[1].find(key, h))
    }

    /// Adds `key`; returns true when it was not present.
    pub fn insert(&mut self, key: &[u8]) -> bool {
        self.rehash_step(1);
        let h = hash_key(key);
        if self.t[0].find(key, h) || (self.is_rehashing() && self.t[1].find(key, h)) {
            return false;
        }
        self.grow_if_needed();
        let t = if self.is_rehashing() {
            &mut self.t[1]
        } else {
            &mut self.t[0]
        };
        let b = t.bucket_of(h);
        let e = entry_new(key, t.buckets[b]);
        t.buckets[b] = Some(e);
        t.used += 1;
        self.entry_bytes += allocated_size(entry_layout(key.len()).size());
        true
    }

    /// Removes `key`; returns true when it was present.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        if self.is_empty() {
            return false;
        }
        self.rehash_step(1);
        let h = hash_key(key);
        let mut found = self.t[0].unlink(key, h);
        if found.is_none() && self.is_rehashing() {
            found = self.t[1].unlink(key, h);
        }
        let Some(e) = found else { return false };
        // SAFETY: `e` was just unlinked from its chain and nothing else refers to it.
        self.entry_bytes -= allocated_size(unsafe { entry_free(e) });
        self.shrink_if_needed();
        true
    }

    fn grow_if_needed(&mut self) {
        if self.is_rehashing() {
            return;
        }
        if self.t[0].size() == 0 {
            self.t[0] = Table::with_size(MIN_SIZE);
        } else if self.t[0].used >= MAX_LOAD * self.t[0].size() {
            self.start_rehash(self.t[0].size() * 2);
        }
    }

    fn shrink_if_needed(&mut self) {
        if self.is_rehashing() {
            return;
        }
        let size = self.t[0].size();
        let used = self.t[0].used;
        if used == 0 {
            // Free the bucket array of an emptied slot at once: it is the
            // common end state after a slot moves away.
            self.t[0] = Table::default();
        } else if size > MIN_SIZE && used * 8 < size {
            self.start_rehash(used.next_power_of_two().max(MIN_SIZE));
        }
    }

    fn start_rehash(&mut self, size: usize) {
        self.t[1] = Table::with_size(size);
        self.rehash_idx = Some(0);
    }

    /// Moves up to `n` buckets from the old table to the new one, visiting at
    /// most `10 * n` empty buckets (as Redis does, to bound the work of one
    /// step). Returns true while more rehashing is left.
    pub fn rehash_step(&mut self, n: usize) -> bool {
        let Some(mut idx) = self.rehash_idx else {
            return false;
        };
        let mut empty_visits = n * 10;
        let mut n = n;
        while n > 0 && self.t[0].used > 0 {
            while self.t[0].buckets[idx].is_none() {
                idx += 1;
                empty_visits -= 1;
                if empty_visits == 0 {
                    self.rehash_idx = Some(idx);
                    return true;
                }
            }
            let mut cur = self.t[0].buckets[idx].take();
            while let Some(e) = cur {
                // SAFETY: `e` is a live entry of bucket `idx` of the old table;
                // we relink it into the new table, so it stays owned exactly once.
                unsafe {
                    cur = entry_next(e);
                    let b = self.t[1].bucket_of(hash_key(entry_key(e)));
                    entry_set_next(e, self.t[1].buckets[b]);
                    self.t[1].buckets[b] = Some(e);
                }
                self.t[0].used -= 1;
                self.t[1].used += 1;
            }
            idx += 1;
            n -= 1;
        }
        if self.t[0].used == 0 {
            self.t[0] = std::mem::take(&mut self.t[1]);
            self.rehash_idx = None;
            // Keys may have come and gone while we rehashed: the new table
            // may already be too small or too big.
            self.grow_if_needed();
            self.shrink_if_needed();
            return self.is_rehashing();
        }
        self.rehash_idx = Some(idx);
        true
    }

    /// Rehashes in steps of 100 buckets until done or `deadline` passes.
    /// Returns true while more rehashing is left.
    pub fn rehash_until(&mut self, deadline: Instant) -> bool {
        while self.rehash_step(100) {
            if Instant::now() >= deadline {
                return true;
            }
        }
        false
    }

    /// One step of a scan, the algorithm of Redis' `dictScan`: the cursor is a
    /// bucket index whose bits are incremented from the most significant end,
    /// so buckets that split (grow) or merge (shrink) between two calls keep
    /// their relative order and no bucket is skipped. Calls `f` for each key of
    /// the bucket(s) visited and returns the next cursor; 0 means done.
    pub fn scan_step(&self, cursor: u64, f: &mut impl FnMut(&[u8])) -> u64 {
        if self.is_empty() {
            return 0;
        }
        let mut v = cursor;
        if !self.is_rehashing() {
            let t0 = &self.t[0];
            let m0 = t0.mask();
            t0.each_in_bucket((v & m0) as usize, f);
            v |= !m0;
            v = v.reverse_bits().wrapping_add(1).reverse_bits();
        } else {
            let (small, large) = if self.t[0].size() <= self.t[1].size() {
                (&self.t[0], &self.t[1])
            } else {
                (&self.t[1], &self.t[0])
            };
            let m0 = small.mask();
            let m1 = large.mask();
            small.each_in_bucket((v & m0) as usize, f);
            // Visit every bucket of the larger table that is an expansion of
            // the smaller table's bucket.
            loop {
                large.each_in_bucket((v & m1) as usize, f);
                v |= !m1;
                v = v.reverse_bits().wrapping_add(1).reverse_bits();
                if v & (m0 ^ m1) == 0 {
                    break;
                }
            }
        }
        v
    }

    /// Calls `f` for every key until it returns false.
    pub fn for_each(&self, mut f: impl FnMut(&[u8]) -> bool) {
        for t in &self.t {
            for &head in t.buckets.iter() {
                let mut cur = head;
                while let Some(e) = cur {
                    // SAFETY: live entries, borrowed only for the call.
                    unsafe {
                        if !f(entry_key(e)) {
                            return;
                        }
                        cur = entry_next(e);
                    }
                }
            }
        }
    }
}

impl Drop for KeySet {
    fn drop(&mut self) {
        for t in &mut self.t {
            for head in t.buckets.iter_mut() {
                let mut cur = head.take();
                while let Some(e) = cur {
                    // SAFETY: we own every entry; each is visited once, read
                    // before it is freed, and never touched again.
                    unsafe {
                        cur = entry_next(e);
                        entry_free(e);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn keys(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("key:{i}").into_bytes()).collect()
    }

    #[test]
    fn size_classes() {
        let expect = [
            (1, 8),
            (8, 8),
            (9, 16),
            (17, 32),
            (33, 48),
            (128, 128),
            (129, 160),
            (200, 224),
            (257, 320),
            (4097, 5120),
        ];
        for (req, got) in expect {
            assert_eq!(allocated_size(req), got, "{req}");
        }
    }

    #[test]
    fn insert_remove_contains() {
        let mut s = KeySet::new();
        assert!(s.is_empty());
        assert!(s.insert(b"a"));
        assert!(!s.insert(b"a"));
        assert!(s.contains(b"a"));
        assert!(!s.contains(b"b"));
        assert!(s.insert(b""));
        assert!(s.contains(b""));
        let long = vec![7u8; 100_000];
        assert!(s.insert(&long));
        assert!(s.contains(&long));
        assert_eq!(s.len(), 3);
        assert!(s.remove(&long));
        assert!(!s.remove(&long));
        assert!(s.remove(b"a"));
        assert!(s.remove(b""));
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
    }

    #[test]
    fn grows_and_shrinks_through_incremental_rehash() {
        let mut s = KeySet::new();
        let ks = keys(100_000);
        for k in &ks {
            assert!(s.insert(k));
        }
        assert_eq!(s.len(), ks.len());
        for k in &ks {
            assert!(s.contains(k), "{:?}", k);
        }
        for k in &ks[..99_000] {
            assert!(s.remove(k));
        }
        while s.rehash_step(100) {}
        assert_eq!(s.len(), 1000);
        assert!(
            s.t[0].size() <= 4096,
            "table did not shrink: {}",
            s.t[0].size()
        );
        for k in &ks[99_000..] {
            assert!(s.contains(k));
        }
        let mut seen = HashSet::new();
        s.for_each(|k| {
            seen.insert(k.to_vec());
            true
        });
        assert_eq!(seen.len(), 1000);
    }

    #[test]
    fn memory_per_key_fits_budget() {
        let mut s = KeySet::new();
        let n = 100_000;
        let mut key_bytes = 0;
        for i in 0..n {
            // 20 to 30 bytes, the sizes the README's figure is measured with.
            let k = format!("u:{i:08}:{}", "x".repeat(i % 11 + 9));
            key_bytes += k.len();
            s.insert(k.as_bytes());
        }
        while s.rehash_step(1000) {}
        let overhead = (s.bytes() - key_bytes) as f64 / n as f64;
        assert!(overhead < 32.0, "overhead {overhead} bytes/key");
    }

    /// The SCAN guarantee: a key present for the whole scan is returned,
    /// whatever inserts, removes, grows and shrinks happen between steps.
    #[test]
    fn scan_returns_every_stable_key_across_resizes() {
        for round in 0..20u64 {
            let mut s = KeySet::new();
            let stable: Vec<Vec<u8>> = (0..500)
                .map(|i| format!("s{round}:{i}").into_bytes())
                .collect();
            for k in &stable {
                s.insert(k);
            }
            let mut churn = 0u64;
            let mut seen = HashSet::new();
            let mut cursor = 0;
            let mut steps = 0;
            loop {
                cursor = s.scan_step(cursor, &mut |k| {
                    seen.insert(k.to_vec());
                });
                steps += 1;
                // Alternate phases of heavy growth and heavy shrinking.
                let phase = (steps / 7 + round) % 3;
                for _ in 0..50 {
                    churn += 1;
                    let k = format!("c{round}:{}", churn % 3000).into_bytes();
                    if phase == 0 {
                        s.insert(&k);
                    } else {
                        s.remove(&k);
                    }
                }
                if cursor == 0 {
                    break;
                }
                assert!(steps < 1_000_000);
            }
            for k in &stable {
                assert!(
                    seen.contains(k),
                    "round {round}: missed {:?}",
                    String::from_utf8_lossy(k)
                );
            }
        }
    }
}
