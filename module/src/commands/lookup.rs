//! Read-only commands over the index: SLOTS.HASHKEY, SLOTS.INFO, SLOTS.COUNT,
//! SLOTS.KEYS, SLOTS.SCAN. All of them answer for the client's selected
//! database.

use std::time::Instant;

use redis_module::{
    raw, CallOptionsBuilder, CallReply, CallResult, Context, RedisError, RedisResult, RedisString,
    RedisValue,
};

use super::{err, parse_count, parse_i64, parse_slot};
use crate::config;
use crate::ffi::{self, reply, Ctx};
use crate::index::IndexMode;
use crate::state::with_state;

/// SLOTS.HASHKEY key [key ...]
pub fn hashkey(_ctx: &Context, args: &[RedisString]) -> RedisResult {
    if args.len() < 2 {
        return Err(RedisError::WrongArity);
    }
    let hash = with_state(|s| s.hash);
    Ok(RedisValue::Array(
        args[1..]
            .iter()
            .map(|k| RedisValue::Integer(hash.slot(k.as_slice()) as i64))
            .collect(),
    ))
}

/// SLOTS.INFO [start [count]] -> [[slot, keys], ...] for non-empty slots;
/// a slot with a pending SLOTS.DEL carries a third element, "deleting".
pub fn info(ctx: &Context, args: &[RedisString]) -> RedisResult {
    if args.len() > 3 {
        return Err(RedisError::WrongArity);
    }
    let db = ffi::selected_db(Ctx::of(ctx));
    with_state(|s| {
        let slots = s.slot_count();
        let start = match args.get(1) {
            Some(a) => parse_slot(a, slots)?,
            None => 0,
        };
        let count = match args.get(2) {
            Some(a) => parse_count(a, "count")?,
            None => slots,
        };
        let end = start.saturating_add(count).min(slots);
        let mut out = Vec::new();
        if let Some(idx) = s.db(db) {
            for slot in start..end {
                let n = idx.count(slot);
                let deleting = s.del.is_pending(db, slot);
                if n == 0 && !deleting {
                    continue;
                }
                let mut entry = vec![
                    RedisValue::Integer(slot as i64),
                    RedisValue::Integer(n as i64),
                ];
                if deleting {
                    entry.push(RedisValue::BulkString("deleting".into()));
                }
                out.push(RedisValue::Array(entry));
            }
        }
        Ok(RedisValue::Array(out))
    })
}

/// SLOTS.COUNT slot
pub fn count(ctx: &Context, args: &[RedisString]) -> RedisResult {
    if args.len() != 2 {
        return Err(RedisError::WrongArity);
    }
    let db = ffi::selected_db(Ctx::of(ctx));
    with_state(|s| {
        let slot = parse_slot(&args[1], s.slot_count())?;
        Ok(RedisValue::Integer(
            s.db(db).map_or(0, |d| d.count(slot)) as i64
        ))
    })
}

/// SLOTS.KEYS slot count -> up to `count` keys of the slot. O(count) in full
/// mode, like CLUSTER GETKEYSINSLOT; in counts-only mode the client blocks
/// while the keyspace is walked in steps.
pub fn keys(ctx: &Context, args: &[RedisString]) -> RedisResult {
    if args.len() != 3 {
        return Err(RedisError::WrongArity);
    }
    let db = ffi::selected_db(Ctx::of(ctx));
    let (slot, want, mode) = with_state(|s| -> Result<_, RedisError> {
        Ok((
            parse_slot(&args[1], s.slot_count())?,
            parse_count(&args[2], "count")?,
            s.mode,
        ))
    })?;
    if mode == IndexMode::CountsOnly {
        if want == 0 || with_state(|s| s.db(db).map_or(0, |d| d.count(slot))) == 0 {
            return Ok(RedisValue::Array(Vec::new()));
        }
        let c = Ctx::of(ctx);
        if ffi::context_flags(c) & raw::REDISMODULE_CTX_FLAGS_DENY_BLOCKING != 0 {
            // Inside MULTI or a script the client cannot block: walk the
            // whole keyspace now, as KEYS would.
            let hash = with_state(|s| s.hash);
            let mut keys = Vec::new();
            let mut seen = std::collections::HashSet::new();
            ffi::scan_keyspace(c, &mut |k| {
                if keys.len() < want && hash.slot(k) == slot && seen.insert(k.to_vec()) {
                    keys.push(RedisValue::StringBuffer(k.to_vec()));
                }
            });
            return Ok(RedisValue::Array(keys));
        }
        let client = ctx.block_client();
        with_state(|s| s.keys_jobs.start(client, db, slot, want));
        return Ok(RedisValue::NoReply);
    }
    with_state(|s| {
        let Some(set) = s.db(db).and_then(|d| d.keys(slot)) else {
            reply::array(Ctx::of(ctx), 0);
            return;
        };
        let n = want.min(set.len());
        reply::array(Ctx::of(ctx), n);
        let mut left = n;
        set.for_each(|k| {
            if left == 0 {
                return false;
            }
            reply::bulk(Ctx::of(ctx), k);
            left -= 1;
            true
        });
    });
    Ok(RedisValue::NoReply)
}

/// SLOTS.SCAN slot cursor [COUNT n] -> [next_cursor, [keys]]
pub fn scan(ctx: &Context, args: &[RedisString]) -> RedisResult {
    if args.len() < 3 {
        return Err(RedisError::WrongArity);
    }
    let db = ffi::selected_db(Ctx::of(ctx));
    let slot = with_state(|s| parse_slot(&args[1], s.slot_count()))?;
    let cursor: u64 = std::str::from_utf8(args[2].as_slice())
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| err("invalid cursor".into()))?;
    let mut count = 10;
    let mut opts = args[3..].iter();
    while let Some(opt) = opts.next() {
        match opts.next() {
            Some(v) if opt.as_slice().eq_ignore_ascii_case(b"COUNT") => {
                let n = parse_i64(v, "COUNT")?;
                if n < 1 {
                    return Err(RedisError::Str("ERR syntax error"));
                }
                count = n as usize;
            }
            _ => return Err(RedisError::Str("ERR syntax error")),
        }
    }
    let (next, keys) = match with_state(|s| s.mode) {
        IndexMode::Full => with_state(|s| {
            let mut keys: Vec<Vec<u8>> = Vec::new();
            let Some(set) = s.db(db).and_then(|d| d.keys(slot)) else {
                return (0, keys);
            };
            let mut cursor = cursor;
            // Like SCAN: stop after `count` keys or 10*count buckets.
            let mut budget = count.saturating_mul(10);
            loop {
                cursor = set.scan_step(cursor, &mut |k| keys.push(k.to_vec()));
                budget -= 1;
                if cursor == 0 || keys.len() >= count || budget == 0 {
                    break;
                }
            }
            (cursor, keys)
        }),
        IndexMode::CountsOnly => scan_keyspace_for_slot(ctx, slot, cursor, count)?,
    };
    reply::array(Ctx::of(ctx), 2);
    reply::bulk(Ctx::of(ctx), next.to_string().as_bytes());
    reply::array(Ctx::of(ctx), keys.len());
    for k in &keys {
        reply::bulk(Ctx::of(ctx), k);
    }
    Ok(RedisValue::NoReply)
}

/// Counts-only SLOTS.SCAN: the server's own SCAN, filtered by slot, so the
/// cursor is the keyspace cursor and SCAN's guarantee carries over. Stops at
/// `count` matches, at the end of the keyspace, or when the step budget is
/// spent (returning the cursor to resume from).
fn scan_keyspace_for_slot(
    ctx: &Context,
    slot: usize,
    mut cursor: u64,
    count: usize,
) -> Result<(u64, Vec<Vec<u8>>), RedisError> {
    let hash = with_state(|s| s.hash);
    let started = Instant::now();
    let budget = config::step_budget();
    let options = CallOptionsBuilder::new().build();
    let mut keys = Vec::new();
    loop {
        let cur = cursor.to_string();
        let res: CallResult = ctx.call_ext("SCAN", &options, &[cur.as_str(), "COUNT", "100"]);
        let reply = res.map_err(|e| {
            err(format!(
                "keyspace scan failed: {}",
                e.to_utf8_string().unwrap_or_default()
            ))
        })?;
        let CallReply::Array(arr) = reply else {
            return Err(err("unexpected SCAN reply".into()));
        };
        let mut it = arr.iter();
        cursor = match it.next() {
            Some(Ok(CallReply::String(s))) => std::str::from_utf8(s.as_bytes())
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            _ => return Err(err("unexpected SCAN reply".into())),
        };
        if let Some(Ok(CallReply::Array(found))) = it.next() {
            for k in found.iter().flatten() {
                if let CallReply::String(k) = k {
                    if hash.slot(k.as_bytes()) == slot {
                        keys.push(k.as_bytes().to_vec());
                    }
                }
            }
        }
        if cursor == 0 || keys.len() >= count || started.elapsed() >= budget {
            return Ok((cursor, keys));
        }
    }
}
