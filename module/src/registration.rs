//! The module's entry point: what `loadmodule libslots.so` registers.
//!
//! Written against the raw API instead of the crate's `redis_module!` macro,
//! because the macro's OnLoad allocates (a detached context, a private-data
//! box per config) before our code can reject bad arguments, and never frees
//! it: every failed MODULE LOAD leaked. Here the arguments are checked
//! first and nothing is allocated that outlives a failed load.

use std::ffi::CString;
use std::os::raw::c_int;

use redis_module::raw;

use crate::commands::entry;
use crate::ffi::{self, Ctx};
use crate::{call, config, cron, events, info, rebuild, redirect, state, tracking, valkey_db_fix};

#[global_allocator]
static ALLOCATOR: crate::alloc::ServerAlloc = crate::alloc::ServerAlloc;

/// Commands, their flags (all keyless: they name slots, not keys).
const COMMANDS: [(&str, &str); 14] = [
    ("slots.hashkey", "readonly fast"),
    ("slots.info", "readonly"),
    ("slots.count", "readonly fast"),
    ("slots.keys", "readonly"),
    ("slots.scan", "readonly"),
    ("slots.del", "write"),
    ("slots.check", "readonly"),
    ("slots.migrate", "write"),
    ("slots.migrate.keys", "write"),
    ("slots.migrate.status", "readonly fast"),
    ("slots.migrate.wait", "readonly"),
    ("slots.migrate.cancel", "write"),
    // A target over maxmemory refuses a batch before touching anything.
    ("slots.restore", "write deny-oom"),
    // The reply the redirect filter substitutes; must run wherever the
    // command it replaces could (MULTI, scripts, loading, stale replica).
    ("slots.redirect", "readonly fast allow-loading allow-stale"),
];

/// Leaks 4 KiB on purpose (feature `leak-selftest` only; see Cargo.toml).
#[cfg(feature = "leak-selftest")]
extern "C" fn selftest_leak(
    ctx: *mut raw::RedisModuleCtx,
    _argv: *mut *mut raw::RedisModuleString,
    _argc: c_int,
) -> c_int {
    std::mem::forget(vec![0x5au8; 4096]);
    redis_module::Context::new(ctx).reply_simple_string("LEAKED");
    raw::REDISMODULE_OK as c_int
}

/// The C entry of every SLOTS.* command.
extern "C" fn command(
    ctx: *mut raw::RedisModuleCtx,
    argv: *mut *mut raw::RedisModuleString,
    argc: c_int,
) -> c_int {
    entry(ctx, argv, argc, true)
}

/// # Safety
/// Called by redis-server with a live context and `argc` argument strings.
#[no_mangle]
pub unsafe extern "C" fn RedisModule_OnLoad(
    ctx: *mut raw::RedisModuleCtx,
    argv: *mut *mut raw::RedisModuleString,
    argc: c_int,
) -> c_int {
    let err = raw::REDISMODULE_ERR as c_int;
    // The module name lives in a static buffer: the allocator is not usable
    // before RedisModule_Init has filled in the API.
    // SAFETY: ctx is the OnLoad context; the name is NUL-terminated.
    if unsafe {
        raw::Export_RedisModule_Init(
            ctx,
            c"slots".as_ptr(),
            1,
            raw::REDISMODULE_APIVER_1 as c_int,
        )
    } == raw::Status::Err as c_int
    {
        return err;
    }
    ffi::guard(
        "module load",
        || err,
        || {
            // SAFETY: the OnLoad context is live for this call.
            let c = unsafe { Ctx::from_raw(ctx) };
            let args: Vec<&[u8]> = (0..argc.max(0) as usize)
                // SAFETY: argv holds argc live strings for the duration of OnLoad.
                .map(|i| unsafe { ffi::string_bytes(*argv.add(i)) })
                .collect();
            match load(c, &args) {
                Ok(()) => raw::REDISMODULE_OK as c_int,
                Err(e) => {
                    redis_module::logging::log_warning(format!("slots: refusing to load: {e}"));
                    err
                }
            }
        },
    )
}

fn load(ctx: Ctx, args: &[&[u8]]) -> Result<(), String> {
    config::validate_module_args(args)?;
    for (name, flags) in COMMANDS {
        let cname = CString::new(name).unwrap();
        let cflags = CString::new(flags).unwrap();
        // SAFETY: the OnLoad context; the server copies name and flags.
        let rc = unsafe {
            raw::RedisModule_CreateCommand.unwrap()(
                ctx.raw(),
                cname.as_ptr(),
                Some(command),
                cflags.as_ptr(),
                0,
                0,
                0,
            )
        };
        if rc != raw::REDISMODULE_OK as c_int {
            return Err(format!("cannot create command {name}"));
        }
    }
    #[cfg(feature = "leak-selftest")]
    // SAFETY: the OnLoad context; static strings.
    unsafe {
        raw::RedisModule_CreateCommand.unwrap()(
            ctx.raw(),
            c"slots.selftest-leak".as_ptr(),
            Some(selftest_leak),
            c"".as_ptr(),
            0,
            0,
            0,
        );
    }
    config::register(ctx, args)?;
    let hash = config::hash_function();
    let mode = config::index_mode();
    state::init(state::State::new(hash, mode));
    events::subscribe(ctx)?;
    call::detect_server(ctx);
    valkey_db_fix::install(ctx)?;
    redirect::install(ctx)?;
    info::register(ctx);
    // A replica with `repl-diskless-load swapdb` loads a full sync into a
    // temporary database while it keeps serving the old one, but only if
    // every module declares it copes; otherwise the server falls back to a
    // blocking disk load. We do: the index is dropped when the load starts
    // (events.rs), commands that read it answer -LOADING until it is
    // rebuilt from the swapped-in data (wait_for_index.rs), and an aborted
    // load rebuilds it from the old data.
    // SAFETY: the OnLoad context.
    unsafe {
        raw::RedisModule_SetModuleOptions.unwrap()(
            ctx.raw(),
            raw::REDISMODULE_OPTIONS_HANDLE_REPL_ASYNC_LOAD as c_int,
        )
    };
    // The module may be loaded into a server that already holds data
    // (MODULE LOAD at runtime).
    rebuild::start(ctx, "module loaded", None);
    cron::subscribe(ctx)?;
    redis_module::logging::log_notice(format!(
        "slots: ready, hash function {} ({} slots), index mode {}",
        hash.name(),
        hash.slot_count(),
        mode.name()
    ));
    Ok(())
}

/// MODULE UNLOAD: refused while background work is queued (the server
/// already refuses while clients are blocked on us); otherwise frees the
/// index, so an unload/load cycle leaks nothing.
///
/// # Safety
/// Called by redis-server with a live context.
#[no_mangle]
pub unsafe extern "C" fn RedisModule_OnUnload(_ctx: *mut raw::RedisModuleCtx) -> c_int {
    ffi::guard(
        "module unload",
        || raw::REDISMODULE_ERR as c_int,
        || {
            if cron::busy() {
                redis_module::logging::log_warning(
                "slots: unload refused: background work (SLOTS.DEL, index rebuild, migration) is in progress; retry when INFO slots shows none",
            );
                return raw::REDISMODULE_ERR as c_int;
            }
            state::shutdown();
            valkey_db_fix::uninstall();
            redirect::uninstall();
            tracking::reset();
            cron::shutdown();
            raw::REDISMODULE_OK as c_int
        },
    )
}
