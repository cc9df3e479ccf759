//! SLOTS.DEL slot [slot ...]: queue slots for background deletion.

use redis_module::{Context, RedisError, RedisResult, RedisString, RedisValue};

use super::parse_slot;
use crate::ffi::{self, Ctx};
use crate::state::with_state;

/// Replies `[[slot, keys_queued], ...]` at once; the deletion runs in the
/// cron (see del_job.rs) and shows in SLOTS.INFO ("deleting") and INFO.
pub fn del(ctx: &Context, args: &[RedisString]) -> RedisResult {
    if args.len() < 2 {
        return Err(RedisError::WrongArity);
    }
    let db = ffi::selected_db(Ctx::of(ctx));
    with_state(|s| {
        // Validate everything before queueing anything.
        let slots = args[1..]
            .iter()
            .map(|a| parse_slot(a, s.slot_count()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(slots.len());
        for slot in slots {
            let n = s.db(db).map_or(0, |d| d.count(slot));
            if n > 0 {
                s.del.enqueue(db, slot);
            }
            out.push(RedisValue::Array(vec![
                RedisValue::Integer(slot as i64),
                RedisValue::Integer(n as i64),
            ]));
        }
        Ok(RedisValue::Array(out))
    })
}
