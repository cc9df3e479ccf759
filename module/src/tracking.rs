//! Change tracking for migrations: which keys were written after they were
//! serialized.
//!
//! A job may delete a key from the source only if the copy the target
//! acknowledged is still the current one. Every write to a key fires a
//! keyspace event at the moment it is applied -- including writes inside
//! MULTI/EXEC, scripts, other modules, expiry and eviction -- so an event
//! for a key a job has in flight marks it dirty, and the acknowledgement of
//! that copy then sends the key again instead of deleting it.
//!
//! Subscribing to every event class costs the server a callback per write,
//! so the subscription is only made when the first migration starts on this
//! server (the module API offers no way to unsubscribe; afterwards the
//! callback returns after one uncontended lock while no job runs).

use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, Ordering};

use redis_module::raw;

use crate::ffi::{self, guard, Ctx};
use crate::migrate_job::try_with_jobs;

static SUBSCRIBED: AtomicBool = AtomicBool::new(false);

/// Subscribes on first use. `ctx` must be a command context of this module.
pub fn ensure_subscribed(ctx: Ctx) -> Result<(), String> {
    if SUBSCRIBED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let types = raw::REDISMODULE_NOTIFY_ALL as c_int;
    // SAFETY: ctx is the live context of the running command; the callback
    // is a plain extern fn that lives as long as the module.
    let rc = unsafe {
        raw::RedisModule_SubscribeToKeyspaceEvents.unwrap()(ctx.raw(), types, Some(on_event))
    };
    if rc != raw::REDISMODULE_OK as c_int {
        return Err("cannot subscribe to keyspace events".into());
    }
    SUBSCRIBED.store(true, Ordering::Relaxed);
    Ok(())
}

/// Forgets the subscription (module unload: the server drops it).
pub fn reset() {
    SUBSCRIBED.store(false, Ordering::Relaxed);
}

extern "C" fn on_event(
    ctx: *mut raw::RedisModuleCtx,
    _type: c_int,
    event: *const std::os::raw::c_char,
    key: *mut raw::RedisModuleString,
) -> c_int {
    guard(
        "migration change tracking",
        || (),
        || {
            // SAFETY: the event's context and key are live for this callback.
            let (ctx, key) = unsafe { (Ctx::from_raw(ctx), ffi::string_bytes(key)) };
            // SAFETY: the server passes a NUL-terminated event name that
            // lives for the callback.
            let event = unsafe { std::ffi::CStr::from_ptr(event) }.to_bytes();
            // While a job runs its step it is out of the job list
            // (migrate_job::run), so events caused by its own calls (DUMP
            // expiring a key, UNLINK of moved keys) mark nothing.
            let db = ffi::selected_db(ctx);
            try_with_jobs(|j| j.note_change(db, key, event));
        },
    );
    raw::REDISMODULE_OK as c_int
}
