//! The per-database slot index: for every slot, its keys (full mode) or just
//! their number (counts-only mode).
//!
//! The index mirrors the physical keyspace: a key is indexed from the moment
//! it is stored in the database dictionary until it is removed from it,
//! whether or not it is logically expired. That is what SLOTS.CHECK compares
//! against and what migration needs (an expired-but-stored key still has to
//! be dealt with).

use std::time::Instant;

use crate::keyset::KeySet;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexMode {
    /// Every key name is kept per slot.
    Full,
    /// Only exact per-slot counts are kept.
    CountsOnly,
}

impl IndexMode {
    pub fn name(self) -> &'static str {
        match self {
            IndexMode::Full => "full",
            IndexMode::CountsOnly => "counts-only",
        }
    }
}

/// The index of one database.
pub struct DbIndex {
    mode: IndexMode,
    /// Keys per slot (full mode); empty in counts-only mode.
    sets: Vec<KeySet>,
    /// Keys per slot (counts-only mode); empty in full mode.
    counts: Vec<u64>,
    total: u64,
    nonempty: usize,
    /// Slots whose key set is in the middle of a rehash; the cron finishes
    /// them. May hold duplicates and slots that are done already.
    rehashing: Vec<u32>,
}

impl DbIndex {
    pub fn new(mode: IndexMode, slots: usize) -> DbIndex {
        let (sets, counts) = match mode {
            IndexMode::Full => ((0..slots).map(|_| KeySet::new()).collect(), Vec::new()),
            IndexMode::CountsOnly => (Vec::new(), vec![0; slots]),
        };
        DbIndex {
            mode,
            sets,
            counts,
            total: 0,
            nonempty: 0,
            rehashing: Vec::new(),
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn nonempty(&self) -> usize {
        self.nonempty
    }

    pub fn count(&self, slot: usize) -> u64 {
        match self.mode {
            IndexMode::Full => self.sets[slot].len() as u64,
            IndexMode::CountsOnly => self.counts[slot],
        }
    }

    /// The key set of a slot (full mode only).
    pub fn keys(&self, slot: usize) -> Option<&KeySet> {
        self.sets.get(slot)
    }

    fn note_rehash(&mut self, slot: usize) {
        if self.sets[slot].is_rehashing() && self.rehashing.last() != Some(&(slot as u32)) {
            self.rehashing.push(slot as u32);
        }
    }

    /// Records that `key` is stored. Returns true when it was not indexed yet.
    /// In counts-only mode the caller has established that the key is new.
    pub fn add(&mut self, slot: usize, key: &[u8]) -> bool {
        let (added, now) = match self.mode {
            IndexMode::Full => {
                let added = self.sets[slot].insert(key);
                self.note_rehash(slot);
                (added, self.sets[slot].len() as u64)
            }
            IndexMode::CountsOnly => {
                self.counts[slot] += 1;
                (true, self.counts[slot])
            }
        };
        if added {
            self.total += 1;
            if now == 1 {
                self.nonempty += 1;
            }
        }
        added
    }

    /// Records that `key` is gone. Returns true when it was indexed.
    /// In counts-only mode the caller has established that the key existed.
    pub fn remove(&mut self, slot: usize, key: &[u8]) -> bool {
        let (removed, now) = match self.mode {
            IndexMode::Full => {
                let removed = self.sets[slot].remove(key);
                self.note_rehash(slot);
                (removed, self.sets[slot].len() as u64)
            }
            IndexMode::CountsOnly => {
                if self.counts[slot] == 0 {
                    (false, 0)
                } else {
                    self.counts[slot] -= 1;
                    (true, self.counts[slot])
                }
            }
        };
        if removed {
            self.total -= 1;
            if now == 0 {
                self.nonempty -= 1;
            }
        }
        removed
    }

    pub fn contains(&self, slot: usize, key: &[u8]) -> bool {
        self.sets.get(slot).is_some_and(|s| s.contains(key))
    }

    pub fn is_rehashing(&self) -> bool {
        !self.rehashing.is_empty()
    }

    /// Bytes held by the index of this database.
    pub fn bytes(&self) -> usize {
        let base = std::mem::size_of::<DbIndex>()
            + self.sets.capacity() * std::mem::size_of::<KeySet>()
            + self.counts.capacity() * std::mem::size_of::<u64>()
            + self.rehashing.capacity() * 4;
        base + self.sets.iter().map(KeySet::bytes).sum::<usize>()
    }

    /// Advances pending rehashes until `deadline`. Returns true while some
    /// are left.
    pub fn rehash_until(&mut self, deadline: Instant) -> bool {
        while let Some(&slot) = self.rehashing.last() {
            if self.sets[slot as usize].rehash_until(deadline) {
                return true;
            }
            self.rehashing.pop();
        }
        false
    }
}
