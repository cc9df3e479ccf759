//! Commands that read the index wait while it is being rebuilt.
//!
//! Right after a dataset is loaded the index is rebuilt in the background
//! (rebuild.rs). A SLOTS.* command arriving meanwhile blocks its client --
//! only that client, the server keeps serving -- and is run again, with its
//! original arguments, when the rebuild ends. Where a client cannot block
//! (MULTI, scripts) it gets `-LOADING`, as for a dataset being loaded.

use std::os::raw::c_int;

use redis_module::{raw, Context, RedisError, RedisResult, RedisValue};

use super::entry;
use crate::ffi::{self, Ctx};
use crate::state::with_state;

/// A blocked client waiting for the index.
pub struct Waiter(*mut raw::RedisModuleBlockedClient);

// SAFETY: the handle is only used on the thread holding the server lock; it
// lives in the global state, which must be Send.
unsafe impl Send for Waiter {}

/// `Some(reply)` when the command must not run now (the client was blocked,
/// or gets an error); `None` when the index is ready.
pub fn block_if_building(ctx: &Context, may_wait: bool) -> Option<RedisResult> {
    // A replica loading asynchronously (repl-diskless-load swapdb) keeps
    // serving its old dataset while the index waits for the new one: the
    // index cannot answer for either until the load ends and its rebuild
    // starts, which may take long, so no blocking here.
    if with_state(|s| s.loading) {
        return Some(Err(RedisError::Str(
            "LOADING a dataset is being loaded; the slots index is rebuilt when it is done",
        )));
    }
    let building = with_state(|s| s.build.as_ref().map(|b| b.percent_done()))?;
    let c = Ctx::of(ctx);
    if !may_wait || ffi::context_flags(c) & raw::REDISMODULE_CTX_FLAGS_DENY_BLOCKING != 0 {
        return Some(Err(loading_error(building)));
    }
    // SAFETY: ctx is the live context of the running command; the reply
    // callback is a plain extern fn; no timeout, no private data.
    let bc = unsafe { raw::RedisModule_BlockClient.unwrap()(c.raw(), Some(rerun), None, None, 0) };
    with_state(|s| s.waiting.push(Waiter(bc)));
    Some(Ok(RedisValue::NoReply))
}

fn loading_error(percent: u64) -> RedisError {
    RedisError::String(format!(
        "LOADING the slots index is being rebuilt from the keyspace ({percent}% done)"
    ))
}

/// Unblocks every waiting client; each one's command runs again in `rerun`.
pub fn release_all() {
    let waiting = with_state(|s| std::mem::take(&mut s.waiting));
    for w in waiting {
        // SAFETY: each handle came from RedisModule_BlockClient and is
        // unblocked exactly once (it was taken out of the list).
        unsafe { raw::RedisModule_UnblockClient.unwrap()(w.0, std::ptr::null_mut()) };
    }
}

/// The reply callback of a blocked command: runs it now, with the arguments
/// the client sent.
extern "C" fn rerun(
    ctx: *mut raw::RedisModuleCtx,
    argv: *mut *mut raw::RedisModuleString,
    argc: c_int,
) -> c_int {
    entry(ctx, argv, argc, false)
}
