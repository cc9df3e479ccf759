//! Thin safe wrappers over the raw module API calls the crate does not wrap,
//! and the panic guard every callback from the server goes through.

use std::os::raw::{c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};

use redis_module::raw;

use crate::call::{self, Propagate};

/// A module context handed to us by the server for the current callback.
///
/// Invariant: it only exists for the duration of that callback (it is built
/// from a `&Context` or from the pointer a callback received), so every API
/// call made through it sees a live context.
#[derive(Clone, Copy)]
pub struct Ctx(*mut raw::RedisModuleCtx);

impl Ctx {
    /// # Safety
    /// `p` must be the live context of the running callback.
    pub unsafe fn from_raw(p: *mut raw::RedisModuleCtx) -> Ctx {
        Ctx(p)
    }
    pub fn of(ctx: &redis_module::Context) -> Ctx {
        Ctx(ctx.ctx)
    }
    pub fn raw(self) -> *mut raw::RedisModuleCtx {
        self.0
    }
}

/// Runs `f`, turning a panic into `on_panic` plus a warning in the server log.
/// Every entry point from redis-server (commands, keyspace notifications,
/// server events, timers, INFO) goes through here: unwinding into C is
/// undefined behaviour and would take the whole server down.
pub fn guard<R>(what: &str, on_panic: impl FnOnce() -> R, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            redis_module::logging::log_warning(format!("slots: internal error in {what}: {msg}"));
            on_panic()
        }
    }
}

/// The bytes of a module string.
///
/// The returned slice borrows memory owned by the server; callers use it only
/// while the string is alive (the duration of the callback that received it).
/// # Safety
/// `s` must be NULL or a live module string.
pub unsafe fn string_bytes<'a>(s: *const raw::RedisModuleString) -> &'a [u8] {
    if s.is_null() {
        return &[];
    }
    let mut len: usize = 0;
    // SAFETY: `s` is a live RedisModuleString handed to us by the server;
    // StringPtrLen returns a pointer to its `len` bytes, valid while it lives.
    unsafe {
        let p = raw::RedisModule_StringPtrLen.unwrap()(s, &mut len);
        if p.is_null() || len == 0 {
            return &[];
        }
        std::slice::from_raw_parts(p.cast::<u8>(), len)
    }
}

/// A module string the caller owns (freed on drop).
pub struct OwnedString(*mut raw::RedisModuleString);

impl OwnedString {
    pub fn new(bytes: &[u8]) -> OwnedString {
        // SAFETY: a NULL context makes an unmanaged string that we free in Drop.
        OwnedString(unsafe {
            raw::RedisModule_CreateString.unwrap()(
                std::ptr::null_mut(),
                bytes.as_ptr().cast(),
                bytes.len(),
            )
        })
    }
    pub fn ptr(&self) -> *mut raw::RedisModuleString {
        self.0
    }
    /// Gives the string away (to an API that takes ownership of it).
    pub fn into_raw(self) -> *mut raw::RedisModuleString {
        let p = self.0;
        std::mem::forget(self);
        p
    }
}

impl Drop for OwnedString {
    fn drop(&mut self) {
        // SAFETY: we created the string with a NULL context, so we must free it.
        unsafe { raw::RedisModule_FreeString.unwrap()(std::ptr::null_mut(), self.0) }
    }
}

pub fn context_flags(ctx: Ctx) -> u32 {
    // SAFETY: ctx is the live context of the current callback.
    unsafe { raw::RedisModule_GetContextFlags.unwrap()(ctx.0) as u32 }
}

pub fn selected_db(ctx: Ctx) -> usize {
    // SAFETY: as above.
    unsafe { raw::RedisModule_GetSelectedDb.unwrap()(ctx.0).max(0) as usize }
}

/// Selects `db` in `ctx`; false when the server has no such database.
pub fn select_db(ctx: Ctx, db: usize) -> bool {
    // SAFETY: as above; SelectDb validates the number.
    unsafe {
        raw::RedisModule_SelectDb.unwrap()(ctx.0, db as c_int) == raw::REDISMODULE_OK as c_int
    }
}

/// Number of keys physically in the selected database (expired ones included).
pub fn db_size(ctx: Ctx) -> u64 {
    // SAFETY: as above.
    unsafe { raw::RedisModule_DbSize.unwrap()(ctx.0) }
}

/// Whether `key` exists in the selected database. This is a real lookup: on
/// a primary an expired key is deleted by it (as any read would do).
pub fn key_exists(ctx: Ctx, key: &[u8]) -> bool {
    let name = OwnedString::new(key);
    // SAFETY: as above; `name` lives across the call.
    unsafe { raw::RedisModule_KeyExists.unwrap()(ctx.0, name.ptr()) != 0 }
}

/// True while clients are paused for writes (CLIENT PAUSE WRITE, FAILOVER):
/// the dataset must not change then, and the server asserts that nothing is
/// propagated, so background writers must wait.
pub fn writes_paused() -> bool {
    // SAFETY: no arguments; callable from the main thread at any time.
    unsafe { raw::RedisModule_AvoidReplicaTraffic.unwrap()() != 0 }
}

/// Walks the whole selected database, calling `f` with every key name. The
/// walk sees the dictionary as it is (expired keys that are still stored are
/// included) and has no side effects on the keys.
pub fn scan_keyspace(ctx: Ctx, f: &mut dyn FnMut(&[u8])) {
    let mut cursor = ScanCursor::new();
    while cursor.step(ctx, f) {}
}

/// A keyspace scan cursor (RedisModuleScanCursor), for scans split over
/// several event-loop iterations.
pub struct ScanCursor(*mut raw::RedisModuleScanCursor);

// SAFETY: the cursor is a plain heap object of the server; it is only used on
// the thread holding the server lock (the main thread), but the job owning it
// lives in a global behind a Mutex, which requires Send.
unsafe impl Send for ScanCursor {}

impl Default for ScanCursor {
    fn default() -> Self {
        Self::new()
    }
}

impl ScanCursor {
    pub fn new() -> ScanCursor {
        // SAFETY: creates a fresh cursor we destroy in Drop.
        ScanCursor(unsafe { raw::RedisModule_ScanCursorCreate.unwrap()() })
    }

    /// One scan step (one or a few buckets). Returns false when the scan is over.
    pub fn step(&mut self, ctx: Ctx, f: &mut dyn FnMut(&[u8])) -> bool {
        extern "C" fn cb(
            _ctx: *mut raw::RedisModuleCtx,
            keyname: *mut raw::RedisModuleString,
            _key: *mut raw::RedisModuleKey,
            privdata: *mut c_void,
        ) {
            // SAFETY: privdata is the `&mut &mut dyn FnMut` passed below,
            // alive for the duration of RedisModule_Scan.
            let f = unsafe { &mut *(privdata as *mut &mut dyn FnMut(&[u8])) };
            // A panic must not unwind into the server; the guard logs it.
            // SAFETY: the server passes a live key name string.
            guard(
                "keyspace scan",
                || (),
                || f(unsafe { string_bytes(keyname) }),
            );
        }
        let mut f = f;
        // SAFETY: ctx is live; the callback only runs during this call.
        unsafe {
            raw::RedisModule_Scan.unwrap()(
                ctx.raw(),
                self.0,
                Some(cb),
                (&mut f as *mut &mut dyn FnMut(&[u8])).cast(),
            ) != 0
        }
    }
}

/// Called with each element of a scanned key: (field or member, value).
pub type ElementFn<'a> = dyn FnMut(&[u8], Option<&[u8]>) + 'a;

impl ScanCursor {
    /// One step of a scan over the elements of a hash, set or sorted set
    /// (RM_ScanKey): `f(field, value)`, value None for sets, the score for
    /// sorted sets. Returns false when the scan is over (small encodings
    /// are returned whole in one step).
    pub fn scan_key(&mut self, key: &Key, f: &mut ElementFn) -> bool {
        extern "C" fn cb(
            _key: *mut raw::RedisModuleKey,
            field: *mut raw::RedisModuleString,
            value: *mut raw::RedisModuleString,
            privdata: *mut c_void,
        ) {
            // SAFETY: privdata is the `&mut &mut dyn FnMut` passed below,
            // alive for the duration of RedisModule_ScanKey.
            let f = unsafe { &mut *(privdata as *mut &mut ElementFn) };
            guard(
                "key scan",
                || (),
                // SAFETY: the server passes live strings (value may be NULL).
                || unsafe {
                    let v = (!value.is_null()).then(|| string_bytes(value));
                    f(string_bytes(field), v)
                },
            );
        }
        if key.raw().is_null() {
            return false;
        }
        let mut f = f;
        // SAFETY: the key is open; the callback only runs during this call.
        unsafe {
            raw::RedisModule_ScanKey.unwrap()(
                key.raw(),
                self.0,
                Some(cb),
                (&mut f as *mut &mut ElementFn).cast(),
            ) != 0
        }
    }
}

impl Drop for ScanCursor {
    fn drop(&mut self) {
        // SAFETY: created in new(), destroyed once.
        unsafe { raw::RedisModule_ScanCursorDestroy.unwrap()(self.0) }
    }
}

/// The text of `INFO <section>`.
pub fn server_info(ctx: Ctx, section: &str) -> Vec<u8> {
    call::call(ctx, Propagate::No, "INFO", &[section.as_bytes()])
        .map(|r| r.view().bytes().to_vec())
        .unwrap_or_default()
}

/// Runs `UNLINK key...` through the server, with propagation to replicas and
/// AOF ("!" flag), so deletions reach them exactly like a client's UNLINK.
/// Returns how many keys were removed.
pub fn unlink(ctx: Ctx, keys: &[Vec<u8>]) -> Result<i64, String> {
    if keys.is_empty() {
        return Ok(0);
    }
    let args: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
    let r = call::call(ctx, Propagate::Yes, "UNLINK", &args)?;
    let v = r.view();
    match v.kind() {
        call::Kind::Integer => Ok(v.integer()),
        _ if v.bytes().is_empty() => Err("unexpected reply".into()),
        _ => Err(v.text()),
    }
}

/// Reply helpers that write straight into the client's buffer, so a large
/// key list is not copied into an intermediate `RedisValue` tree.
pub mod reply {
    use super::*;

    pub fn array(ctx: Ctx, len: usize) {
        raw::reply_with_array(ctx.0, len as _);
    }
    pub fn bulk(ctx: Ctx, bytes: &[u8]) {
        raw::reply_with_string_buffer(ctx.0, bytes.as_ptr().cast(), bytes.len());
    }

    /// An error reply whose text may carry client input (key names, host
    /// names, arguments). The crate's error replies squeeze each character
    /// into one byte and panic on the NUL that makes of some (U+0100, most
    /// emoji), which aborts the server when it happens outside a guard; so
    /// every byte outside printable ASCII is written as `\xNN` here.
    pub fn error(ctx: Ctx, msg: &str) {
        let msg = std::ffi::CString::new(printable(msg.as_bytes())).unwrap_or_default();
        // SAFETY: ctx is the live context of the command being answered;
        // the message is a NUL-terminated string that outlives the call.
        unsafe { raw::RedisModule_ReplyWithError.unwrap()(ctx.0, msg.as_ptr()) };
    }

    /// `bytes` with everything outside printable ASCII escaped as `\xNN`.
    pub fn printable(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len());
        for &b in bytes {
            if (0x20..0x7f).contains(&b) && b != b'\\' {
                out.push(b as char);
            } else {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
        out
    }
}

/// The type of a stored value.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KeyType {
    Empty,
    String,
    List,
    Hash,
    Set,
    Zset,
    Module,
    Stream,
    Other,
}

/// An open key of the selected database, closed on drop. Opened without
/// touching its LRU/LFU (REDISMODULE_OPEN_KEY_NOTOUCH), so the migration's
/// reads do not make every key look hot.
pub struct Key {
    key: *mut raw::RedisModuleKey,
    _name: OwnedString,
}

impl Key {
    /// Opens `name` for reading (`write` = false) or writing. A lookup on a
    /// primary deletes the key if it is expired, as any read would.
    pub fn open(ctx: Ctx, name: &[u8], write: bool) -> Key {
        let name = OwnedString::new(name);
        let mut mode = raw::REDISMODULE_READ | raw::REDISMODULE_OPEN_KEY_NOTOUCH;
        if write {
            mode |= raw::REDISMODULE_WRITE;
        }
        // SAFETY: ctx is live; the name outlives the key (both in Self, and
        // the key is closed first in Drop).
        let key = unsafe {
            raw::RedisModule_OpenKey.unwrap()(ctx.raw(), name.ptr(), mode as c_int).cast()
        };
        Key { key, _name: name }
    }

    pub fn key_type(&self) -> KeyType {
        if self.key.is_null() {
            return KeyType::Empty;
        }
        // SAFETY: a live open key.
        let t = unsafe { raw::RedisModule_KeyType.unwrap()(self.key) } as isize;
        match t {
            raw::REDISMODULE_KEYTYPE_EMPTY => KeyType::Empty,
            raw::REDISMODULE_KEYTYPE_STRING => KeyType::String,
            raw::REDISMODULE_KEYTYPE_LIST => KeyType::List,
            raw::REDISMODULE_KEYTYPE_HASH => KeyType::Hash,
            raw::REDISMODULE_KEYTYPE_SET => KeyType::Set,
            raw::REDISMODULE_KEYTYPE_ZSET => KeyType::Zset,
            raw::REDISMODULE_KEYTYPE_MODULE => KeyType::Module,
            raw::REDISMODULE_KEYTYPE_STREAM => KeyType::Stream,
            _ => KeyType::Other,
        }
    }

    /// Elements (bytes for strings, entries for streams); O(1).
    pub fn len(&self) -> u64 {
        if self.key.is_null() {
            return 0;
        }
        // SAFETY: a live open key.
        unsafe { raw::RedisModule_ValueLength.unwrap()(self.key) as u64 }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Absolute expiry in unix ms, 0 for none.
    pub fn abs_expire(&self) -> i64 {
        if self.key.is_null() {
            return 0;
        }
        // SAFETY: a live open key.
        let t = unsafe { raw::RedisModule_GetAbsExpire.unwrap()(self.key) };
        t.max(0)
    }

    /// LFU counter, when the server's policy is LFU.
    pub fn lfu(&self) -> Option<i64> {
        let mut v: std::os::raw::c_longlong = -1;
        // SAFETY: a live open key; the out-pointer is a local.
        let rc = unsafe { raw::RedisModule_GetLFU.unwrap()(self.key, &mut v) };
        (rc == raw::REDISMODULE_OK as c_int && v >= 0).then_some(v)
    }

    /// Idle time in ms, when the server's policy is not LFU.
    pub fn lru_idle_ms(&self) -> Option<i64> {
        let mut v: raw::mstime_t = -1;
        // SAFETY: as above.
        let rc = unsafe { raw::RedisModule_GetLRU.unwrap()(self.key, &mut v) };
        (rc == raw::REDISMODULE_OK as c_int && v >= 0).then_some(v)
    }

    pub fn set_lfu(&self, freq: i64) {
        // SAFETY: a live open key.
        unsafe { raw::RedisModule_SetLFU.unwrap()(self.key, freq) };
    }

    pub fn set_lru_idle_ms(&self, ms: i64) {
        // SAFETY: a live open key.
        unsafe { raw::RedisModule_SetLRU.unwrap()(self.key, ms) };
    }

    pub fn raw(&self) -> *mut raw::RedisModuleKey {
        self.key
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        if !self.key.is_null() {
            // SAFETY: opened in open(), closed once.
            unsafe { raw::RedisModule_CloseKey.unwrap()(self.key) };
        }
    }
}

/// CPU time of the calling thread, in microseconds.
pub fn thread_cpu_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a local out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

/// A client's current database and whether it is in MULTI.
pub fn client_db(id: u64) -> Option<(usize, bool)> {
    let mut ci = raw::RedisModuleClientInfo {
        version: raw::REDISMODULE_CLIENTINFO_VERSION as u64,
        flags: 0,
        id: 0,
        addr: [0; 46],
        port: 0,
        db: 0,
    };
    // SAFETY: `ci` is a version-1 client info struct the call fills in.
    let rc = unsafe {
        raw::RedisModule_GetClientInfoById.unwrap()(
            (&mut ci as *mut raw::RedisModuleClientInfo).cast(),
            id,
        )
    };
    (rc == raw::REDISMODULE_OK as c_int).then_some((
        ci.db as usize,
        ci.flags & raw::REDISMODULE_CLIENTINFO_FLAG_MULTI as u64 != 0,
    ))
}
