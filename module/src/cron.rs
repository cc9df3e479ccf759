//! The module's cron: a timer that drives everything incremental (SLOTS.DEL,
//! counts-only key walks, index rehashing, rebuilds after an inconsistency),
//! each tick within `slots.step-budget-us` of event-loop time.

use std::os::raw::c_void;
use std::time::Instant;

use redis_module::raw;

use crate::ffi::{self, guard, Ctx};
use crate::state::with_state;
use crate::{config, del_job, events, keys_job, rebuild};

/// Period while there is work: every event-loop iteration gets one step.
const BUSY_MS: i64 = 1;
/// Period when idle: enough to pick up new work promptly, cheap otherwise.
const IDLE_MS: i64 = 10;

pub fn start(ctx: Ctx) {
    arm(ctx, IDLE_MS);
}

fn arm(ctx: Ctx, ms: i64) {
    // SAFETY: ctx is a live context; the callback takes no data.
    unsafe {
        raw::RedisModule_CreateTimer.unwrap()(ctx.raw(), ms, Some(tick), std::ptr::null_mut());
    }
}

extern "C" fn tick(ctx: *mut raw::RedisModuleCtx, _data: *mut c_void) {
    // SAFETY: the timer's context is live during this callback.
    let ctx = unsafe { Ctx::from_raw(ctx) };
    let busy = guard("cron", || false, || work(ctx));
    arm(ctx, if busy { BUSY_MS } else { IDLE_MS });
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
    busy |= with_state(|s| s.dbs_mut().any(|d| d.rehash_until(deadline)));
    busy || with_state(|s| !s.resync.is_empty() || s.build.is_some() || !s.del.is_empty())
}
