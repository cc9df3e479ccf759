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
