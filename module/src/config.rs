//! Module configs (`CONFIG GET slots.*`), also settable as module arguments:
//! `loadmodule libslots.so hash-function crc16 index-mode counts-only`.
//!
//! Registered with the raw config API rather than the crate's helpers: those
//! box a private-data block per config that is never freed, which leaks on
//! every failed or unloaded MODULE LOAD.

use std::ffi::CString;
use std::os::raw::{c_char, c_int, c_longlong, c_void};
use std::sync::atomic::{AtomicI32, AtomicI64, Ordering};

use redis_module::raw;

use crate::ffi::{guard, Ctx};
use crate::index::IndexMode;
use crate::slot::HashFunction;

const HASH_FUNCTIONS: [&str; 2] = ["crc32", "crc16"];
const INDEX_MODES: [&str; 2] = ["full", "counts-only"];

/// `slots.hash-function`: index into HASH_FUNCTIONS (immutable: changing it
/// would re-slot every key).
static HASH_FUNCTION: AtomicI32 = AtomicI32::new(0);
/// `slots.index-mode`: index into INDEX_MODES (immutable).
static INDEX_MODE: AtomicI32 = AtomicI32::new(0);
/// `slots.step-budget-us`: the longest one incremental step of ours (SLOTS.DEL,
/// rehashing, rebuilds, counts-only key walks, migration) may hold the event
/// loop.
static STEP_BUDGET_US: AtomicI64 = AtomicI64::new(500);
/// `slots.migrate-max-keys-per-sec`, `slots.migrate-max-bytes-per-sec`: the
/// migration throttle, all jobs together (0 = unlimited).
static MIGRATE_KEYS_PER_SEC: AtomicI64 = AtomicI64::new(0);
static MIGRATE_BYTES_PER_SEC: AtomicI64 = AtomicI64::new(0);
/// `slots.migrate-max-cpu-percent`: the share of the event loop migration
/// steps may take while they have more work than one step (cron.rs).
static MIGRATE_MAX_CPU_PERCENT: AtomicI64 = AtomicI64::new(70);

/// A numeric config (all settable at runtime): name, value, default, range.
struct Numeric {
    name: &'static str,
    value: &'static AtomicI64,
    default: i64,
    min: i64,
    max: i64,
}

const NUMERIC: [Numeric; 4] = [
    Numeric {
        name: "step-budget-us",
        value: &STEP_BUDGET_US,
        default: 500,
        min: 50,
        max: 100_000,
    },
    Numeric {
        name: "migrate-max-keys-per-sec",
        value: &MIGRATE_KEYS_PER_SEC,
        default: 0,
        min: 0,
        max: 1_000_000_000,
    },
    Numeric {
        name: "migrate-max-bytes-per-sec",
        value: &MIGRATE_BYTES_PER_SEC,
        default: 0,
        min: 0,
        max: 1 << 40,
    },
    Numeric {
        name: "migrate-max-cpu-percent",
        value: &MIGRATE_MAX_CPU_PERCENT,
        default: 70,
        min: 1,
        max: 100,
    },
];

/// The migration throttle: (keys/s, bytes/s), 0 = unlimited.
pub fn migrate_rate_limits() -> (u64, u64) {
    (
        MIGRATE_KEYS_PER_SEC.load(Ordering::Relaxed).max(0) as u64,
        MIGRATE_BYTES_PER_SEC.load(Ordering::Relaxed).max(0) as u64,
    )
}

/// `slots.migrate-max-cpu-percent` (1..=100).
pub fn migrate_max_cpu_percent() -> u64 {
    MIGRATE_MAX_CPU_PERCENT
        .load(Ordering::Relaxed)
        .clamp(1, 100) as u64
}

pub fn hash_function() -> HashFunction {
    match HASH_FUNCTION.load(Ordering::Relaxed) {
        1 => HashFunction::Crc16,
        _ => HashFunction::Crc32,
    }
}

pub fn index_mode() -> IndexMode {
    match INDEX_MODE.load(Ordering::Relaxed) {
        1 => IndexMode::CountsOnly,
        _ => IndexMode::Full,
    }
}

pub fn step_budget() -> std::time::Duration {
    std::time::Duration::from_micros(STEP_BUDGET_US.load(Ordering::Relaxed).max(1) as u64)
}

fn enum_static(name: &str) -> &'static AtomicI32 {
    if name.ends_with("hash-function") {
        &HASH_FUNCTION
    } else {
        &INDEX_MODE
    }
}

unsafe extern "C" fn get_enum(name: *const c_char, _p: *mut c_void) -> c_int {
    // SAFETY: the server passes the config's NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy();
    guard(
        "config get",
        || 0,
        || enum_static(&name).load(Ordering::Relaxed),
    )
}

unsafe extern "C" fn set_enum(
    name: *const c_char,
    val: c_int,
    _p: *mut c_void,
    _e: *mut *mut raw::RedisModuleString,
) -> c_int {
    // SAFETY: as above. The server validated `val` against the options.
    let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy();
    enum_static(&name).store(val, Ordering::Relaxed);
    raw::REDISMODULE_OK as c_int
}

unsafe extern "C" fn get_numeric(_name: *const c_char, p: *mut c_void) -> c_longlong {
    // SAFETY: p is the &'static AtomicI64 registered with this config.
    unsafe { &*(p as *const AtomicI64) }.load(Ordering::Relaxed)
}

unsafe extern "C" fn set_numeric(
    _n: *const c_char,
    val: c_longlong,
    p: *mut c_void,
    _e: *mut *mut raw::RedisModuleString,
) -> c_int {
    // The server checked the range. SAFETY: as in get_numeric.
    unsafe { &*(p as *const AtomicI64) }.store(val, Ordering::Relaxed);
    raw::REDISMODULE_OK as c_int
}

/// The value given as a module argument for `name`, if any. `validate_module_args`
/// has checked them all before this is used.
fn arg<'a>(args: &[&'a [u8]], name: &str) -> Option<&'a [u8]> {
    args.chunks(2)
        .find(|p| p[0] == name.as_bytes())
        .map(|p| p[1])
}

fn position(options: &[&str], value: Option<&[u8]>) -> i32 {
    value
        .and_then(|v| options.iter().position(|o| o.as_bytes() == v))
        .unwrap_or(0) as i32
}

/// Registers the configs, with the module arguments as their values, then
/// lets the server apply `slots.*` lines of its config file.
pub fn register(ctx: Ctx, args: &[&[u8]]) -> Result<(), String> {
    let rc_ok = raw::REDISMODULE_OK as c_int;
    for (name, options) in [
        ("hash-function", HASH_FUNCTIONS),
        ("index-mode", INDEX_MODES),
    ] {
        let cname = CString::new(name).unwrap();
        let names: Vec<CString> = options.iter().map(|o| CString::new(*o).unwrap()).collect();
        let mut ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
        let values: Vec<c_int> = (0..options.len() as c_int).collect();
        let default = position(&options, arg(args, name));
        // SAFETY: ctx is the OnLoad context; the server copies the name and
        // option strings, which outlive the call.
        let rc = unsafe {
            raw::RedisModule_RegisterEnumConfig.unwrap()(
                ctx.raw(),
                cname.as_ptr(),
                default,
                raw::REDISMODULE_CONFIG_IMMUTABLE,
                ptrs.as_mut_ptr(),
                values.as_ptr(),
                options.len() as c_int,
                Some(get_enum),
                Some(set_enum),
                None,
                std::ptr::null_mut(),
            )
        };
        if rc != rc_ok {
            return Err(format!("cannot register config {name}"));
        }
    }
    for n in &NUMERIC {
        let value = arg(args, n.name)
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok())
            .unwrap_or(n.default);
        let cname = CString::new(n.name).unwrap();
        // SAFETY: as above; the private data is a &'static AtomicI64.
        let rc = unsafe {
            raw::RedisModule_RegisterNumericConfig.unwrap()(
                ctx.raw(),
                cname.as_ptr(),
                value,
                raw::REDISMODULE_CONFIG_DEFAULT,
                n.min,
                n.max,
                Some(get_numeric),
                Some(set_numeric),
                None,
                n.value as *const AtomicI64 as *mut c_void,
            )
        };
        if rc != rc_ok {
            return Err(format!("cannot register config {}", n.name));
        }
    }
    // SAFETY: as above.
    if unsafe { raw::RedisModule_LoadConfigs.unwrap()(ctx.raw()) } != rc_ok {
        return Err("the server rejected a slots.* config value".into());
    }
    Ok(())
}

/// Checks the module arguments (`loadmodule libslots.so name value ...`)
/// before the crate applies them: it silently ignores unknown names, a
/// trailing name without a value and out-of-range numbers, and an operator
/// who mistyped a setting must learn it at start, not from a wrong slot map.
pub fn validate_module_args(args: &[&[u8]]) -> Result<(), String> {
    if !args.len().is_multiple_of(2) {
        return Err(format!(
            "module arguments must be name/value pairs; '{}' has no value",
            String::from_utf8_lossy(args[args.len() - 1])
        ));
    }
    for pair in args.chunks(2) {
        let (name, value) = (pair[0], String::from_utf8_lossy(pair[1]));
        match name {
            b"hash-function" if ["crc32", "crc16"].contains(&value.as_ref()) => {}
            b"index-mode" if ["full", "counts-only"].contains(&value.as_ref()) => {}
            _ if NUMERIC.iter().any(|n| n.name.as_bytes() == name) => {
                let n = NUMERIC.iter().find(|n| n.name.as_bytes() == name).unwrap();
                match value.parse::<i64>() {
                    Ok(v) if (n.min..=n.max).contains(&v) => {}
                    _ => {
                        return Err(format!(
                            "{} must be an integer in {}..{}, got '{value}'",
                            n.name, n.min, n.max
                        ))
                    }
                }
            }
            b"hash-function" => {
                return Err(format!(
                    "hash-function must be crc32 or crc16, got '{value}'"
                ))
            }
            b"index-mode" => {
                return Err(format!(
                    "index-mode must be full or counts-only, got '{value}'"
                ))
            }
            _ => {
                return Err(format!(
                "unknown module argument '{}' (known: hash-function, index-mode, step-budget-us, migrate-max-keys-per-sec, migrate-max-bytes-per-sec, migrate-max-cpu-percent)",
                String::from_utf8_lossy(name)
            ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_args() {
        assert!(validate_module_args(&[]).is_ok());
        assert!(
            validate_module_args(&[b"hash-function", b"crc16", b"index-mode", b"counts-only"])
                .is_ok()
        );
        assert!(validate_module_args(&[b"step-budget-us", b"50"]).is_ok());
        assert!(validate_module_args(&[b"hash-function"]).is_err());
        assert!(validate_module_args(&[b"hash-function", b"md5"]).is_err());
        assert!(validate_module_args(&[b"no-such-option", b"1"]).is_err());
        assert!(validate_module_args(&[b"hash-function", b"crc16", b"index-mode"]).is_err());
        for bad in [&b"-1"[..], b"0", b"49", b"100001", b"x"] {
            assert!(validate_module_args(&[b"step-budget-us", bad]).is_err());
        }
    }
}
