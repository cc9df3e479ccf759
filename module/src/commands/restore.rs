//! SLOTS.RESTORE: the target side of a migration (MIGRATION.md, "Wire
//! protocol"). The whole batch is parsed and validated first; only a valid
//! batch is applied, so a bad one gets an error and changes nothing.

use redis_module::{raw, Context, RedisError, RedisResult, RedisString, RedisValue};

use crate::call::{is_valkey, server_version};
use crate::ffi::Ctx;
use crate::restore::{apply, Outcome};
use crate::wire::{parse_batch, Target};

pub fn restore(ctx: &Context, args: &[RedisString]) -> RedisResult {
    let bytes: Vec<&[u8]> = args[1..].iter().map(|a| a.as_slice()).collect();
    let target = Target::for_server(server_version(), is_valkey());
    let batch = parse_batch(&bytes, target).map_err(|e| {
        crate::restore::note_rejected();
        RedisError::String(format!("ERR SLOTS.RESTORE: {e}"))
    })?;
    let c = Ctx::of(ctx);
    let outcomes = apply(c, &batch);
    // Replies go straight to the client: one element per record.
    raw::reply_with_array(c.raw(), outcomes.len() as _);
    for o in &outcomes {
        match o {
            Outcome::Failed(e) => crate::ffi::reply::error(c, &format!("ERR {e}")),
            o => {
                raw::reply_with_long_long(c.raw(), o.code());
            }
        }
    }
    Ok(RedisValue::NoReply)
}
