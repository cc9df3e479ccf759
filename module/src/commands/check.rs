//! SLOTS.CHECK: verify the index against the keyspace, in both directions,
//! for every database, and report the first discrepancy.
//!
//! This is a diagnostic, O(keys) like DEBUG DIGEST, and runs in one go so
//! that it compares one consistent state. Direction keyspace -> index: every
//! stored key is indexed in its slot. Direction index -> keyspace: per slot,
//! the index holds exactly as many keys as the keyspace; with the first
//! direction this proves the index holds nothing else (in counts-only mode
//! the counts are all there is to compare).

use std::collections::HashSet;

use redis_module::{Context, RedisError, RedisResult, RedisString, RedisValue};

use super::err;
use crate::ffi::{self, Ctx};
use crate::index::IndexMode;
use crate::state::with_state;

pub fn check(ctx: &Context, args: &[RedisString]) -> RedisResult {
    if args.len() != 1 {
        return Err(RedisError::WrongArity);
    }
    let c = Ctx::of(ctx);
    let original_db = ffi::selected_db(c);
    let mut result = Ok(RedisValue::SimpleStringStatic("OK"));
    let mut db = 0;
    while ffi::select_db(c, db) {
        if let Err(e) = check_db(c, db) {
            result = Err(err(e));
            break;
        }
        db += 1;
    }
    ffi::select_db(c, original_db);
    result
}

fn check_db(c: ffi::Ctx, db: usize) -> Result<(), String> {
    let stored = ffi::db_size(c);
    with_state(|s| {
        let slots = s.slot_count();
        let hash = s.hash;
        let mode = s.mode;
        let empty = s.new_db_index();
        let idx = s.db(db).unwrap_or(&empty);
        let mut per_slot = vec![0u64; slots];
        let mut missing: Option<(Vec<u8>, usize)> = None;
        ffi::scan_keyspace(c, &mut |k| {
            let slot = hash.slot(k);
            per_slot[slot] += 1;
            if mode == IndexMode::Full && missing.is_none() && !idx.contains(slot, k) {
                missing = Some((k.to_vec(), slot));
            }
        });
        if let Some((k, slot)) = missing {
            return Err(format!(
                "db {db}: key '{}' (slot {slot}) is stored but not in the index",
                String::from_utf8_lossy(&k)
            ));
        }
        for (slot, &n) in per_slot.iter().enumerate() {
            let indexed = idx.count(slot);
            if indexed == n {
                continue;
            }
            let mut msg =
                format!("db {db}: slot {slot} has {n} keys stored but {indexed} in the index");
            if let Some(set) = idx.keys(slot) {
                // Name one key the index has but the keyspace does not.
                let mut present = HashSet::new();
                ffi::scan_keyspace(c, &mut |k| {
                    if hash.slot(k) == slot {
                        present.insert(k.to_vec());
                    }
                });
                set.for_each(|k| {
                    if present.contains(k) {
                        return true;
                    }
                    msg.push_str(&format!(
                        " (e.g. '{}' is indexed but not stored)",
                        String::from_utf8_lossy(k)
                    ));
                    false
                });
            }
            return Err(msg);
        }
        if idx.total() != stored {
            return Err(format!(
                "db {db}: {stored} keys stored but {} in the index",
                idx.total()
            ));
        }
        Ok(())
    })
}
