//! The module's entry point: what `loadmodule libslots.so` registers.

use redis_module::{configuration::ConfigurationFlags, redis_module};
use redis_module::{Context, RedisResult, RedisString, Status};

use crate::commands::{check, del, lookup, run};
use crate::{config, cron, events, ffi, info, state};

type Alloc = redis_module::alloc::RedisAlloc;
const ALLOC: Alloc = redis_module::alloc::RedisAlloc;

fn slots_hashkey(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    run(ctx, args, "SLOTS.HASHKEY", lookup::hashkey)
}
fn slots_info(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    run(ctx, args, "SLOTS.INFO", lookup::info)
}
fn slots_count(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    run(ctx, args, "SLOTS.COUNT", lookup::count)
}
fn slots_keys(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    run(ctx, args, "SLOTS.KEYS", lookup::keys)
}
fn slots_scan(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    run(ctx, args, "SLOTS.SCAN", lookup::scan)
}
fn slots_del(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    run(ctx, args, "SLOTS.DEL", del::del)
}
fn slots_check(ctx: &Context, args: Vec<RedisString>) -> RedisResult {
    run(ctx, args, "SLOTS.CHECK", check::check)
}

fn init(ctx: &Context, args: &[RedisString]) -> Status {
    ffi::guard(
        "module load",
        || Status::Err,
        || {
            let raw_args: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
            if let Err(e) = config::validate_module_args(&raw_args) {
                ctx.log_warning(&format!("slots: refusing to load: {e}"));
                return Status::Err;
            }
            let hash = config::hash_function();
            let mode = config::index_mode();
            state::init(state::State::new(hash, mode));
            if let Err(e) = events::subscribe(ffi::Ctx::of(ctx)) {
                ctx.log_warning(&format!("slots: {e}"));
                return Status::Err;
            }
            info::register(ffi::Ctx::of(ctx));
            // The module may be loaded into a server that already holds data
            // (MODULE LOAD at runtime).
            events::rebuild_all(ffi::Ctx::of(ctx), "module loaded");
            cron::start(ffi::Ctx::of(ctx));
            ctx.log_notice(&format!(
                "slots: ready, hash function {} ({} slots), index mode {}",
                hash.name(),
                hash.slot_count(),
                mode.name()
            ));
            Status::Ok
        },
    )
}

redis_module! {
    name: "slots",
    version: 1,
    allocator: (Alloc, ALLOC),
    data_types: [],
    init: init,
    commands: [
        ["slots.hashkey", slots_hashkey, "readonly fast", 0, 0, 0, ""],
        ["slots.info", slots_info, "readonly", 0, 0, 0, ""],
        ["slots.count", slots_count, "readonly fast", 0, 0, 0, ""],
        ["slots.keys", slots_keys, "readonly", 0, 0, 0, ""],
        ["slots.scan", slots_scan, "readonly", 0, 0, 0, ""],
        ["slots.del", slots_del, "write", 0, 0, 0, ""],
        ["slots.check", slots_check, "readonly", 0, 0, 0, ""],
    ],
    configurations: [
        i64: [
            ["step-budget-us", &config::STEP_BUDGET_US, 500, 50, 100_000, ConfigurationFlags::DEFAULT, None],
        ],
        string: [],
        bool: [],
        enum: [
            ["hash-function", &config::HASH_FUNCTION, config::HashFunctionConfig::Crc32, ConfigurationFlags::IMMUTABLE, None],
            ["index-mode", &config::INDEX_MODE, config::IndexModeConfig::Full, ConfigurationFlags::IMMUTABLE, None],
        ],
        module_args_as_configuration: true,
    ]
}
