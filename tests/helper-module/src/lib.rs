//! A second module loaded next to libslots.so by some integration tests:
//! it deletes keys the way another module may, through the key API
//! (`RM_DeleteKey`), which fires no keyspace event. The slots module must
//! notice such changes by itself (events.rs, "end-of-iteration check").

use redis_module::{redis_module, Context, RedisError, RedisResult, RedisString, RedisValue};

/// HELPER.SILENTDEL key [key ...] -> number of keys deleted, without events.
fn silent_del(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    if args.len() < 2 {
        return Err(RedisError::WrongArity);
    }
    let mut n = 0;
    for name in &args[1..] {
        let key = ctx.open_key_writable(name);
        if !key.is_empty() {
            key.delete()?;
            n += 1;
        }
    }
    Ok(RedisValue::Integer(n))
}

redis_module! {
    name: "slotforktesthelper",
    version: 1,
    allocator: (redis_module::alloc::RedisAlloc, redis_module::alloc::RedisAlloc),
    data_types: [],
    commands: [
        ["helper.silentdel", silent_del, "write", 1, -1, 1, ""],
    ],
}
