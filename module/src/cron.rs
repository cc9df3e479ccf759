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
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis_module::raw;

use crate::ffi::{self, guard, Ctx};
use crate::state::{with_state, State};
use crate::{config, del_job, events, keys_job, migrate_job, rebuild};

/// Period while there is work: a step per millisecond at most, so that
/// background deletion takes at most half of an idle event loop.
const BUSY_MS: i64 = 1;
/// Period while the index is rebuilt, or while a migration job has more
/// work than one step's budget: every event-loop iteration gets a step
/// (clients blocked on SLOTS.* wait for the end; each step still stays
/// within the budget, so other clients wait at most one step). A migration
/// waiting for its target's replies goes back to BUSY_MS, so the event loop
/// does not spin while there is nothing to do.
///
/// A 0 ms module timer cannot do this by itself. Created inside a timer
/// callback (our tick), the server's timer handler sees it as not yet
/// expired and rounds its delay up to 1 ms; created in the before-sleep
/// hook, it comes after the event loop has computed how long to sleep. So
/// an eager tick goes through `RedisModule_EventLoopAddOneShot` (7.0+): the
/// one-shot's pipe makes the next poll return at once, together with any
/// ready clients, and its callback creates the 0 ms timer, which then fires
/// in the same iteration, after those clients (the callback of a timer is
/// also where the server handles our calls' propagation as for any tick).
const EAGER_MS: i64 = 0;

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
    if DETACHED.load(Ordering::Relaxed).is_null() {
        // SAFETY: ctx is the OnLoad context; the detached context lives
        // until module unload (`shutdown`).
        let d = unsafe { raw::RedisModule_GetDetachedThreadSafeContext.unwrap()(ctx.raw()) };
        DETACHED.store(d, Ordering::Relaxed);
    }
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
            // Keys can also go without any event (another module's
            // RM_DeleteKey or emptied container, Redis 8's lazy expiry of
            // a hash's last field): every indexed database takes part in
            // the count check every 100 ms, not only those with events.
            let now = now_us();
            if now >= FULL_CHECK_AT_US.load(Ordering::Relaxed) {
                FULL_CHECK_AT_US.store(now + FULL_CHECK_EVERY_US, Ordering::Relaxed);
                with_state(|s| s.touch_all());
            }
            events::check_touched(ctx);
            if !ARMED.load(Ordering::Relaxed)
                && with_state(|s| !s.loading && has_work(s)) | migrate_job::busy()
            {
                arm(ctx, period());
            } else if ARMED.load(Ordering::Relaxed) && eager_due() {
                // A hungry migration's pause is over and the server is busy
                // with clients (else we would not be here before the 1 ms
                // timer): take the next step in the next iteration.
                // SAFETY: ctx is live; the id is our pending timer's.
                let stopped = unsafe {
                    raw::RedisModule_StopTimer.unwrap()(
                        ctx.raw(),
                        TIMER_ID.load(Ordering::Relaxed),
                        std::ptr::null_mut(),
                    )
                } == raw::REDISMODULE_OK as c_int;
                if stopped {
                    arm(ctx, EAGER_MS);
                }
            }
        },
    );
}

fn period() -> i64 {
    if with_state(|s| s.build.is_some()) {
        EAGER_MS
    } else {
        BUSY_MS
    }
}

/// When a migration that used its whole step may take the next one, as
/// microseconds since START (0: no such migration). Main thread only.
static EAGER_AT_US: AtomicU64 = AtomicU64::new(0);
static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
/// When every indexed database is next counted (see before_sleep).
static FULL_CHECK_AT_US: AtomicU64 = AtomicU64::new(0);
const FULL_CHECK_EVERY_US: u64 = 100_000;
/// The pending timer (valid while ARMED).
static TIMER_ID: AtomicU64 = AtomicU64::new(0);

fn now_us() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_micros() as u64 + 1
}

/// After a migration step that ran out of budget with work left, the job
/// may have `slots.migrate-max-cpu-percent` of the event loop: the next
/// step waits `step * (100 - pct) / pct` (at 50%, as long as the step
/// took). Clients served meanwhile trigger it from the before-sleep hook;
/// an idle server takes it when the 1 ms timer fires (so on a quiet server
/// the share is lower than configured: a 500 us step every ~1.5 ms).
/// Measured (bench/README.md): 50% gave ~30k keys/s, 70% ~50k, 100% ~83k
/// with 4 clients at 20k req/s; client p99 stayed ~0.9 ms up to 70% while
/// p50 rose from ~0.1 to ~0.6 ms at 100% (requests wait behind back-to-back
/// steps).
fn note_hungry(step: Duration) {
    let pct = config::migrate_max_cpu_percent();
    let pause = step.as_micros() as u64 * (100 - pct) / pct;
    EAGER_AT_US.store(now_us() + pause, Ordering::Relaxed);
}

fn eager_due() -> bool {
    let at = EAGER_AT_US.load(Ordering::Relaxed);
    if at != 0 && now_us() >= at {
        EAGER_AT_US.store(0, Ordering::Relaxed);
        return true;
    }
    false
}

fn arm(ctx: Ctx, ms: i64) {
    ARMED.store(true, Ordering::Relaxed);
    if ms == EAGER_MS && arm_eager() {
        return;
    }
    create_timer(ctx.raw(), ms);
}

fn create_timer(ctx: *mut raw::RedisModuleCtx, ms: i64) {
    // SAFETY: ctx is a live context of this module; the callback takes no
    // data.
    let id =
        unsafe { raw::RedisModule_CreateTimer.unwrap()(ctx, ms, Some(tick), std::ptr::null_mut()) };
    TIMER_ID.store(id, Ordering::Relaxed);
}

/// A context of this module for calls made outside any callback context
/// (the one-shot below); created at load, lives as long as the module.
static DETACHED: AtomicPtr<raw::RedisModuleCtx> = AtomicPtr::new(std::ptr::null_mut());

/// Queues the one-shot that arms a 0 ms timer in the next event-loop
/// iteration. False when the server lacks the API (then the caller's
/// plain timer runs after its 1 ms rounding).
fn arm_eager() -> bool {
    let (Some(add), false) = (
        // SAFETY: reading a function pointer the server filled in at load.
        unsafe { raw::RedisModule_EventLoopAddOneShot },
        DETACHED.load(Ordering::Relaxed).is_null(),
    ) else {
        return false;
    };
    // SAFETY: the callback is a plain extern fn taking no data.
    unsafe { add(Some(eager), std::ptr::null_mut()) == raw::REDISMODULE_OK as c_int }
}

/// Module unload (nothing is armed then: unload waits for `busy()`).
pub fn shutdown() {
    let d = DETACHED.swap(std::ptr::null_mut(), Ordering::Relaxed);
    if !d.is_null() {
        // SAFETY: created by GetDetachedThreadSafeContext at load, freed once.
        unsafe { raw::RedisModule_FreeThreadSafeContext.unwrap()(d) };
    }
}

extern "C" fn eager(_data: *mut c_void) {
    guard(
        "cron",
        || (),
        || create_timer(DETACHED.load(Ordering::Relaxed), EAGER_MS),
    );
}

extern "C" fn tick(ctx: *mut raw::RedisModuleCtx, _data: *mut c_void) {
    ARMED.store(false, Ordering::Relaxed);
    // SAFETY: the timer's context is live during this callback.
    let ctx = unsafe { Ctx::from_raw(ctx) };
    EAGER_AT_US.store(0, Ordering::Relaxed);
    let t0 = Instant::now();
    if guard("cron", || false, || work(ctx)) {
        let hungry = migrate_job::take_hungry();
        if hungry && config::migrate_max_cpu_percent() >= 100 {
            arm(ctx, EAGER_MS);
        } else {
            if hungry {
                note_hungry(t0.elapsed());
            }
            arm(ctx, period());
        }
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
