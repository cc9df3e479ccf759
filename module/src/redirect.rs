//! Redirections while keys move: the replies Redis Cluster gives during
//! resharding, so cluster-aware clients and proxies know where to go.
//!
//! A command filter sees every command before it runs. While a migration
//! job runs, for a command whose keys fall in the job's slots (or are its
//! named keys):
//!
//! - every such key is still here: the command runs here;
//! - none is here any more (moved, or never existed): `-ASK <slot>
//!   <host>:<port>`, and the client retries on the target (a new key is
//!   created there, where it will live);
//! - some are here and some are not, or the keys belong to different
//!   targets: `-TRYAGAIN`, as a cluster answers a multi-key command during
//!   resharding;
//! - a write to a key that is frozen (it kept changing while being sent, see
//!   migrate_job.rs): `-TRYAGAIN` until it has moved;
//! - while the index is rebuilt after a load, it cannot tell which keys are
//!   here: `-TRYAGAIN` rather than a wrong redirection.
//!
//! A filter cannot reply, so it rewrites the command into `SLOTS.REDIRECT
//! <reply>`, whose only job is to send that error. Commands queued in MULTI
//! are checked when queued (EXEC then returns the error in its place); a
//! transaction queued before a key moved and executed after it writes the
//! key here, where the job finds it and moves it again.
//!
//! Where the server can tell the filter the client's database (Valkey 8,
//! Redis 7.2+), keys of other databases are left alone; on Redis 7.0 the
//! filter assumes clients of migrating slots use the job's database, as in
//! cluster mode where database 0 is the only one.

use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use redis_module::{raw, Context, RedisError, RedisResult, RedisString};

use crate::ffi::{self, guard, Ctx, OwnedString};
use crate::migrate_job::with_jobs;
use crate::state::with_state;

/// Whether a job runs (checked before anything else, for every command).
static ACTIVE: AtomicBool = AtomicBool::new(false);

struct Handles {
    filter: *mut raw::RedisModuleCommandFilter,
    /// A context for GetCommandKeysWithFlags, which filters do not get.
    ctx: *mut raw::RedisModuleCtx,
}
// SAFETY: only used on the main thread; the Mutex makes the global Sync.
unsafe impl Send for Handles {}

static HANDLES: Mutex<Option<Handles>> = Mutex::new(None);

pub const TRYAGAIN: &str = "TRYAGAIN Multiple keys request during rehashing of slot";

/// Registers the filter (once, at load; it does nothing while no job runs).
pub fn install(ctx: Ctx) -> Result<(), String> {
    // SAFETY: the OnLoad context; the callback is a plain extern fn. NOSELF:
    // the jobs' own calls (DUMP, UNLINK) are never redirected.
    let filter = unsafe {
        raw::RedisModule_RegisterCommandFilter.unwrap()(
            ctx.raw(),
            Some(filter),
            raw::REDISMODULE_CMDFILTER_NOSELF as c_int,
        )
    };
    if filter.is_null() {
        return Err("cannot register the migration command filter".into());
    }
    // SAFETY: the OnLoad context; freed in uninstall().
    let detached = unsafe { raw::RedisModule_GetDetachedThreadSafeContext.unwrap()(ctx.raw()) };
    *HANDLES.lock().unwrap_or_else(|e| e.into_inner()) = Some(Handles {
        filter,
        ctx: detached,
    });
    Ok(())
}

pub fn uninstall() {
    ACTIVE.store(false, Ordering::Relaxed);
    if let Some(h) = HANDLES.lock().unwrap_or_else(|e| e.into_inner()).take() {
        // SAFETY: created in install(); the filter goes with the module.
        unsafe { raw::RedisModule_FreeThreadSafeContext.unwrap()(h.ctx) };
        let _ = h.filter;
    }
}

/// Turns the filter on or off to match whether any job runs.
pub fn update() {
    ACTIVE.store(with_jobs(|j| j.any_running()), Ordering::Relaxed);
}

fn arg_ptr(fctx: *mut raw::RedisModuleCommandFilterCtx, i: c_int) -> *mut raw::RedisModuleString {
    // SAFETY: `fctx` is the live filter context and `i` is below the count.
    unsafe { raw::RedisModule_CommandFilterArgGet.unwrap()(fctx, i) }
}

/// The client's database, where the server can tell.
fn client_db(fctx: *mut raw::RedisModuleCommandFilterCtx) -> Option<usize> {
    // Absent on Redis 7.0: the API table has no such function.
    // SAFETY: reading a function pointer the server filled in at load.
    let get_id = unsafe { raw::RedisModule_CommandFilterGetClientId }?;
    // SAFETY: the live filter context.
    let id = unsafe { get_id(fctx) };
    ffi::client_db(id).map(|(db, _)| db)
}

/// The keys of a command and whether each is written, from the server's
/// own key specs.
fn command_keys(
    fctx: *mut raw::RedisModuleCommandFilterCtx,
    ctx: *mut raw::RedisModuleCtx,
) -> Vec<(c_int, bool)> {
    // SAFETY: the live filter context.
    let argc = unsafe { raw::RedisModule_CommandFilterArgsCount.unwrap()(fctx) };
    if argc < 2 {
        return Vec::new();
    }
    let mut argv: Vec<*mut raw::RedisModuleString> = (0..argc).map(|i| arg_ptr(fctx, i)).collect();
    let mut n: c_int = 0;
    let mut flags: *mut c_int = std::ptr::null_mut();
    // SAFETY: argv holds argc live argument strings; the result arrays are
    // allocated by the server and freed below.
    let pos = unsafe {
        raw::RedisModule_GetCommandKeysWithFlags.unwrap()(
            ctx,
            argv.as_mut_ptr(),
            argc,
            &mut n,
            &mut flags,
        )
    };
    if pos.is_null() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for i in 0..n.max(0) as usize {
        // SAFETY: both arrays have n elements.
        let (p, f) = unsafe { (*pos.add(i), if flags.is_null() { 0 } else { *flags.add(i) }) };
        let write = f as u32 & raw::REDISMODULE_CMD_KEY_RO == 0;
        out.push((p, write));
    }
    // SAFETY: allocated by the server with its allocator.
    unsafe {
        raw::RedisModule_Free.unwrap()(pos.cast());
        if !flags.is_null() {
            raw::RedisModule_Free.unwrap()(flags.cast());
        }
    }
    out
}

/// What to answer instead of running the command.
#[derive(Debug, PartialEq, Eq)]
pub enum Redirect {
    Ask(usize, String),
    TryAgain,
}

/// The decision for a command's keys (`(key, written)`), in `db` (None:
/// unknown, assume each job's own).
pub fn decide(keys: &[(&[u8], bool)], db: Option<usize>) -> Option<Redirect> {
    // Per key: the covering job's (target, db, frozen).
    struct Hit {
        slot: usize,
        target: String,
        db: usize,
        frozen: bool,
        /// The job still tracks it (a copy or a DEL is on its way).
        in_flight: bool,
        /// Acknowledged, its delete here pending: it lives on the target.
        moved: bool,
    }
    let hits: Vec<Option<Hit>> = with_jobs(|jobs| {
        keys.iter()
            .map(|(k, _)| {
                let slot = with_state(|s| s.slot(k));
                jobs.running()
                    .find(|j| db.is_none_or(|d| d == j.db) && j.covers(slot, k))
                    .map(|j| Hit {
                        slot,
                        target: j.target.clone(),
                        db: j.db,
                        frozen: j.frozen.contains(*k),
                        in_flight: j.is_in_flight(k),
                        moved: j.is_moved(k),
                    })
            })
            .collect()
    });
    if hits.iter().all(|h| h.is_none()) {
        return None;
    }
    if with_state(|s| s.build.is_some() || s.loading) {
        return Some(Redirect::TryAgain);
    }
    let mut here = 0;
    let mut away: Vec<&Hit> = Vec::new();
    for ((k, write), h) in keys.iter().zip(&hits) {
        let Some(h) = h else {
            here += 1;
            continue;
        };
        if *write && h.frozen {
            return Some(Redirect::TryAgain);
        }
        let present = !h.moved && with_state(|s| s.db(h.db).is_some_and(|d| d.contains(h.slot, k)));
        if present {
            here += 1;
        } else if h.in_flight {
            // Gone here while the target may not have caught up (a DEL on
            // its way): sending the client there now could lose its write.
            return Some(Redirect::TryAgain);
        } else {
            away.push(h);
        }
    }
    match away.first() {
        None => None,
        Some(first) if here == 0 && away.iter().all(|h| h.target == first.target) => {
            Some(Redirect::Ask(first.slot, first.target.clone()))
        }
        Some(_) => Some(Redirect::TryAgain),
    }
}

unsafe extern "C" fn filter(fctx: *mut raw::RedisModuleCommandFilterCtx) {
    if !ACTIVE.load(Ordering::Relaxed) {
        return;
    }
    guard(
        "migration redirect filter",
        || (),
        || {
            let Some(ctx) = HANDLES.lock().ok().and_then(|h| h.as_ref().map(|h| h.ctx)) else {
                return;
            };
            let positions = command_keys(fctx, ctx);
            if positions.is_empty() {
                return;
            }
            // SAFETY: the arguments live for the duration of the filter call.
            let keys: Vec<(&[u8], bool)> = positions
                .iter()
                .map(|&(p, w)| (unsafe { ffi::string_bytes(arg_ptr(fctx, p)) }, w))
                .collect();
            let Some(r) = decide(&keys, client_db(fctx)) else {
                return;
            };
            rewrite(fctx, &r);
        },
    );
}

/// Replaces the command with `SLOTS.REDIRECT <error>`.
fn rewrite(fctx: *mut raw::RedisModuleCommandFilterCtx, r: &Redirect) {
    let reply = match r {
        Redirect::Ask(slot, target) => format!("ASK {slot} {target}"),
        Redirect::TryAgain => TRYAGAIN.to_string(),
    };
    // SAFETY: the live filter context; strings handed to the filter API
    // become the command's arguments and are freed by the server, so they
    // are created unmanaged and not freed here (into_raw).
    unsafe {
        let argc = raw::RedisModule_CommandFilterArgsCount.unwrap()(fctx);
        for i in (1..argc).rev() {
            raw::RedisModule_CommandFilterArgDelete.unwrap()(fctx, i);
        }
        raw::RedisModule_CommandFilterArgReplace.unwrap()(
            fctx,
            0,
            OwnedString::new(b"SLOTS.REDIRECT").into_raw(),
        );
        raw::RedisModule_CommandFilterArgInsert.unwrap()(
            fctx,
            1,
            OwnedString::new(reply.as_bytes()).into_raw(),
        );
    }
}

/// SLOTS.REDIRECT <error>: the command the filter substitutes.
pub fn redirect_command(_ctx: &Context, args: &[RedisString]) -> RedisResult {
    let msg = args
        .get(1)
        .map(|a| a.to_string_lossy())
        .unwrap_or_else(|| TRYAGAIN.to_string());
    Err(RedisError::String(msg))
}
