//! The module's cron: a timer that drives everything incremental (SLOTS.DEL,
//! counts-only key walks, index rehashing, rebuilds), each tick within
//! `slots.step-budget-us` of event-loop time.
//!
//! The timer exists only while there is work. The server refuses to unload a
//! module that holds a timer, so a permanent one would make MODULE UNLOAD
//! impossible. Instead, a before-sleep hook (run once per event-loop
//! iteration, after the commands of that iteration) arms the timer when some
//! command or event has queued work. The same hook runs the index's
//! end-of-iteration consistency check (events.rs).

use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use redis_module::raw;

use crate::ffi::{self, guard, Ctx};
use crate::state::{with_state, State};
use crate::{config, del_job, events, keys_job, migrate_job, rebuild};

/// Period while there is work: a step per millisecond at most, so that
/// background deletion takes at most half of an idle event loop.
const BUSY_MS: i64 = 1;
/// Period while the index is rebuilt: every event-loop iteration gets a step
/// (clients blocked on SLOTS.* wait for the end; each step still stays
/// within the budget, so other clients wait at most one step).
const REBUILD_MS: i64 = 0;

/// Whether our timer is pending (only touched on the main thread).
static ARMED: AtomicBool = AtomicBool::new(false);

pub fn subscribe(ctx: Ctx) -> Result<(), String> {
    let event = raw::RedisModuleEvent {
        id: raw::REDISMODULE_EVENT_EVENTLOOP,
        dataver: 1,
    };
    // SAFETY: ctx is the OnLoad context; the callback is a plain extern fn.
    let rc = unsafe {
        raw::RedisModule_SubscribeToServerEvent.unwrap()(ctx.raw(), event, Some(before_sleep))
    };
    if rc != raw::REDISMODULE_OK as c_int {
        return Err("cannot subscribe to the event-loop event".into());
    }
    ARMED.store(false, Ordering::Relaxed);
    Ok(())
}

fn has_work(s: &State) -> bool {
    s.build.is_some()
        || !s.del.is_empty()
        || !s.keys_jobs.is_empty()
        || !s.resync.is_empty()
        || s.dbs().any(|(_, d)| d.is_rehashing())
}

/// Whether anything is queued; MODULE UNLOAD waits for this to be false.
pub fn busy() -> bool {
    ARMED.load(Ordering::Relaxed) || with_state(|s| has_work(s)) || migrate_job::busy()
}

unsafe extern "C" fn before_sleep(
    ctx: *mut raw::RedisModuleCtx,
    _e: raw::RedisModuleEvent,
    sub: u64,
    _d: *mut c_void,
) {
    if sub != raw::REDISMODULE_SUBEVENT_EVENTLOOP_BEFORE_SLEEP {
        return;
    }
    guard(
        "event loop hook",
        || (),
        || {
            // SAFETY: the event's context is live during this callback.
            let ctx = unsafe { Ctx::from_raw(ctx) };
            events::check_touched(ctx);
            if !ARMED.load(Ordering::Relaxed)
                && with_state(|s| !s.loading && has_work(s)) | migrate_job::busy()
            {
                arm(ctx, period());
            }
        },
    );
}

fn period() -> i64 {
    if with_state(|s| s.build.is_some()) {
        REBUILD_MS
    } else {
        BUSY_MS
    }
}

fn arm(ctx: Ctx, ms: i64) {
    ARMED.store(true, Ordering::Relaxed);
    // SAFETY: ctx is a live context; the callback takes no data.
    unsafe {
        raw::RedisModule_CreateTimer.unwrap()(ctx.raw(), ms, Some(tick), std::ptr::null_mut());
    }
}

extern "C" fn tick(ctx: *mut raw::RedisModuleCtx, _data: *mut c_void) {
    ARMED.store(false, Ordering::Relaxed);
    // SAFETY: the timer's context is live during this callback.
    let ctx = unsafe { Ctx::from_raw(ctx) };
    if guard("cron", || false, || work(ctx)) {
        arm(ctx, period());
    }
}

fn work(ctx: Ctx) -> bool {
    let deadline = Instant::now() + config::step_budget();
    if with_state(|s| s.loading) {
        return false;
    }
    events::resync_pending(ctx);
    let mut busy = false;
    if with_state(|s| s.build.is_some()) {
        busy |= rebuild::run(ctx, deadline);
    }
    // SLOTS.DEL reads the index to find keys: it waits for a rebuild too.
    if !with_state(|s| s.del.is_empty() || s.build.is_some()) {
        // Deleting is writing: it waits while clients are paused for writes,
        // as the server's own expiry and eviction do.
        busy |= ffi::writes_paused() || del_job::run(ctx, deadline);
    }
    if !with_state(|s| s.keys_jobs.is_empty()) {
        busy |= keys_job::run(ctx, deadline);
    }
    // Jobs read the index to find keys: they wait for a rebuild too.
    if with_state(|s| s.build.is_none()) {
        busy |= migrate_job::run(ctx, deadline);
    } else {
        busy |= migrate_job::busy();
    }
    busy |= with_state(|s| s.dbs_mut().any(|d| d.rehash_until(deadline)));
    busy || with_state(|s| !s.resync.is_empty() || s.build.is_some() || !s.del.is_empty())
}
