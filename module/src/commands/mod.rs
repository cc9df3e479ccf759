//! The SLOTS.* commands: argument parsing shared by all of them, and the
//! panic guard each one runs under. One file per command family.

use redis_module::{Context, RedisError, RedisResult, RedisString};

use crate::ffi::guard;

pub mod check;
pub mod del;
pub mod lookup;
pub mod wait_for_index;

pub type Handler = fn(&Context, &[RedisString]) -> RedisResult;

/// The handler of each command.
pub fn dispatch(name: &str) -> Option<Handler> {
    Some(match name {
        "slots.hashkey" => lookup::hashkey,
        "slots.info" => lookup::info,
        "slots.count" => lookup::count,
        "slots.keys" => lookup::keys,
        "slots.scan" => lookup::scan,
        "slots.del" => del::del,
        "slots.check" => check::check,
        _ => return None,
    })
}

/// Whether the command reads the index, and so must wait while the index is
/// rebuilt.
fn reads_index(name: &str) -> bool {
    name != "slots.hashkey"
}

/// Runs command `name`; a panic becomes an error reply (and a log line),
/// never an abort of the server.
pub fn run(ctx: &Context, args: Vec<RedisString>, name: &str) -> RedisResult {
    guard(
        name,
        || {
            Err(RedisError::Str(
                "ERR internal error in the slots module, see the server log",
            ))
        },
        || {
            let f = dispatch(name).ok_or(RedisError::Str("ERR unknown command"))?;
            if reads_index(name) {
                if let Some(reply) = wait_for_index::block_if_building(ctx) {
                    return reply;
                }
            }
            f(ctx, &args)
        },
    )
}

pub fn err(msg: String) -> RedisError {
    RedisError::String(format!("ERR {msg}"))
}

/// A 64-bit signed integer argument, with Redis' own error text.
pub fn parse_i64(arg: &RedisString, what: &str) -> Result<i64, RedisError> {
    std::str::from_utf8(arg.as_slice())
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| err(format!("{what} is not an integer or out of range")))
}

/// A slot number: an integer in `0..slots`.
pub fn parse_slot(arg: &RedisString, slots: usize) -> Result<usize, RedisError> {
    let v = parse_i64(arg, "slot")?;
    if v < 0 || v >= slots as i64 {
        return Err(err(format!("slot {v} is out of range [0, {}]", slots - 1)));
    }
    Ok(v as usize)
}

/// A non-negative count.
pub fn parse_count(arg: &RedisString, what: &str) -> Result<usize, RedisError> {
    let v = parse_i64(arg, what)?;
    if v < 0 {
        return Err(err(format!("{what} must be >= 0")));
    }
    Ok(v as usize)
}
