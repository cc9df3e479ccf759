//! Module configs (`CONFIG GET slots.*`), also settable as module arguments:
//! `loadmodule libslots.so hash-function crc16 index-mode counts-only`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

use redis_module::configuration::EnumConfigurationValue;
use redis_module::RedisError;

use crate::index::IndexMode;
use crate::slot::HashFunction;

/// An enum config whose option names need not be Rust identifiers
/// (`counts-only`), which the crate's `enum_configuration!` requires.
macro_rules! enum_config {
    ($name:ident { $($variant:ident = $val:expr => $text:expr),* $(,)? }) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($variant = $val),* }
        impl TryFrom<i32> for $name {
            type Error = RedisError;
            fn try_from(v: i32) -> Result<Self, RedisError> {
                match v {
                    $(x if x == $val => Ok($name::$variant),)*
                    _ => Err(RedisError::Str("unsupported value")),
                }
            }
        }
        impl From<$name> for i32 {
            fn from(v: $name) -> i32 { v as i32 }
        }
        impl EnumConfigurationValue for $name {
            fn get_options(&self) -> (Vec<String>, Vec<i32>) {
                (vec![$($text.to_string()),*], vec![$($val),*])
            }
        }
    };
}

enum_config!(HashFunctionConfig { Crc32 = 0 => "crc32", Crc16 = 1 => "crc16" });
enum_config!(IndexModeConfig { Full = 0 => "full", CountsOnly = 1 => "counts-only" });

/// `slots.hash-function` (immutable: changing it would re-slot every key).
pub static HASH_FUNCTION: Mutex<HashFunctionConfig> = Mutex::new(HashFunctionConfig::Crc32);
/// `slots.index-mode` (immutable).
pub static INDEX_MODE: Mutex<IndexModeConfig> = Mutex::new(IndexModeConfig::Full);
/// `slots.step-budget-us`: the longest one incremental step of ours (SLOTS.DEL,
/// rehashing, counts-only key walks) may hold the event loop.
pub static STEP_BUDGET_US: AtomicI64 = AtomicI64::new(500);

pub fn hash_function() -> HashFunction {
    match *HASH_FUNCTION.lock().unwrap_or_else(|e| e.into_inner()) {
        HashFunctionConfig::Crc32 => HashFunction::Crc32,
        HashFunctionConfig::Crc16 => HashFunction::Crc16,
    }
}

pub fn index_mode() -> IndexMode {
    match *INDEX_MODE.lock().unwrap_or_else(|e| e.into_inner()) {
        IndexModeConfig::Full => IndexMode::Full,
        IndexModeConfig::CountsOnly => IndexMode::CountsOnly,
    }
}

pub fn step_budget() -> std::time::Duration {
    std::time::Duration::from_micros(STEP_BUDGET_US.load(Ordering::Relaxed).max(1) as u64)
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
            b"step-budget-us" => match value.parse::<i64>() {
                Ok(v) if (50..=100_000).contains(&v) => {}
                _ => {
                    return Err(format!(
                        "step-budget-us must be an integer in 50..100000, got '{value}'"
                    ))
                }
            },
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
                "unknown module argument '{}' (known: hash-function, index-mode, step-budget-us)",
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
