//! The SLOTS.* commands: argument parsing shared by all of them, and the
//! panic guard each one runs under. One file per command family.

use std::os::raw::c_int;

use redis_module::{raw, Context, RedisError, RedisResult, RedisString};

use crate::ffi::guard;

pub mod check;
pub mod del;
pub mod lookup;
pub mod migrate;
pub mod restore;
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
        "slots.migrate" => migrate::migrate,
        "slots.migrate.keys" => migrate::migrate_keys,
        "slots.migrate.status" => migrate::status,
        "slots.migrate.wait" => migrate::wait,
        "slots.migrate.cancel" => migrate::cancel,
        "slots.restore" => restore::restore,
        "slots.redirect" => crate::redirect::redirect_command,
        _ => return None,
    })
}

/// Whether the command reads the index, and so must wait while the index is
/// rebuilt.
fn reads_index(name: &str) -> bool {
    matches!(
        name,
        "slots.info"
            | "slots.count"
            | "slots.keys"
            | "slots.scan"
            | "slots.del"
            | "slots.check"
            | "slots.migrate"
            | "slots.migrate.keys"
    )
}

/// The server-facing entry of every SLOTS.* command (and of its re-run after
/// waiting for the index): decodes the arguments, runs the command named by
/// the first one, replies. A panic becomes an error reply and a log line,
/// never an abort of the server. `may_wait`: the client may block while the
/// index is rebuilt (false for the re-run, which answers -LOADING if another
/// rebuild started meanwhile).
pub fn entry(
    ctx: *mut raw::RedisModuleCtx,
    argv: *mut *mut raw::RedisModuleString,
    argc: c_int,
    may_wait: bool,
) -> c_int {
    let context = Context::new(ctx);
    let result = guard(
        "command",
        || {
            Err(RedisError::Str(
                "ERR internal error in the slots module, see the server log",
            ))
        },
        || {
            let args = redis_module::decode_args(ctx, argv, argc);
            let name = args
                .first()
                .map(|a| a.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            let f = dispatch(&name).ok_or(RedisError::Str("ERR unknown command"))?;
            if reads_index(&name) {
                if let Some(reply) = wait_for_index::block_if_building(&context, may_wait) {
                    return reply;
                }
            }
            f(&context, &args)
        },
    );
    let c = crate::ffi::Ctx::of(&context);
    match result {
        // Error texts often carry client input: see ffi::reply::error.
        // (WrongArity has its own server call.)
        Err(e) if !matches!(e, RedisError::WrongArity) => {
            crate::ffi::reply::error(c, &e.to_string())
        }
        other => {
            guard(
                "reply",
                || (),
                || {
                    context.reply(other);
                },
            );
        }
    }
    raw::REDISMODULE_OK as c_int
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
