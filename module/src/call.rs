//! Calling server commands from the module (RM_Call) with byte-string
//! arguments, and reading the reply without copying it into a `RedisValue`
//! tree: the migration reads DUMP payloads and element ranges of big keys,
//! where an intermediate copy of every reply would double the main thread's
//! work.

use std::ffi::CString;
use std::marker::PhantomData;

use redis_module::raw;

use crate::ffi::{Ctx, OwnedString};

/// How the server should treat a call.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Propagate {
    /// Reads, or writes that must not reach replicas and AOF on their own.
    No,
    /// Writes that replicas and the AOF must see (the "!" flag). Several of
    /// them inside one command are wrapped in MULTI/EXEC by the server.
    Yes,
}

/// The kind of a reply.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    String,
    Error,
    Integer,
    Array,
    Null,
    Other,
}

/// A borrowed view of a reply or of an element of an array reply; valid
/// while the owning [`Reply`] lives.
#[derive(Clone, Copy)]
pub struct View<'a> {
    ptr: *mut raw::RedisModuleCallReply,
    _owner: PhantomData<&'a Reply>,
}

impl<'a> View<'a> {
    pub fn kind(&self) -> Kind {
        // SAFETY: `ptr` is a live reply for 'a (owned by a Reply we borrow).
        let t = unsafe { raw::RedisModule_CallReplyType.unwrap()(self.ptr) };
        match t as isize {
            raw::REDISMODULE_REPLY_STRING => Kind::String,
            raw::REDISMODULE_REPLY_ERROR => Kind::Error,
            raw::REDISMODULE_REPLY_INTEGER => Kind::Integer,
            raw::REDISMODULE_REPLY_ARRAY => Kind::Array,
            raw::REDISMODULE_REPLY_NULL => Kind::Null,
            _ => Kind::Other,
        }
    }

    pub fn is_error(&self) -> bool {
        self.kind() == Kind::Error
    }

    pub fn integer(&self) -> i64 {
        // SAFETY: as in kind(); a non-integer reply gives LLONG_MIN.
        unsafe { raw::RedisModule_CallReplyInteger.unwrap()(self.ptr) }
    }

    /// The bytes of a string, status or error reply (empty otherwise).
    pub fn bytes(&self) -> &'a [u8] {
        let mut len = 0;
        // SAFETY: as in kind(); the pointer is valid while the reply lives,
        // which 'a guarantees.
        unsafe {
            let p = raw::RedisModule_CallReplyStringPtr.unwrap()(self.ptr, &mut len);
            if p.is_null() || len == 0 {
                return &[];
            }
            std::slice::from_raw_parts(p.cast::<u8>(), len)
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(self.bytes()).into_owned()
    }

    /// Array length (0 for other kinds).
    pub fn len(&self) -> usize {
        if self.kind() != Kind::Array {
            return 0;
        }
        // SAFETY: as in kind().
        unsafe { raw::RedisModule_CallReplyLength.unwrap()(self.ptr) }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` of an array reply.
    pub fn at(&self, i: usize) -> Option<View<'a>> {
        if i >= self.len() {
            return None;
        }
        // SAFETY: as in kind(); elements are owned by the top-level reply.
        let p = unsafe { raw::RedisModule_CallReplyArrayElement.unwrap()(self.ptr, i) };
        (!p.is_null()).then_some(View {
            ptr: p,
            _owner: PhantomData,
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = View<'a>> + '_ {
        (0..self.len()).filter_map(|i| self.at(i))
    }

    /// A status/bulk reply equal to `s` (ASCII case-insensitive).
    pub fn is(&self, s: &str) -> bool {
        self.bytes().eq_ignore_ascii_case(s.as_bytes())
    }

    /// The value after field `name` in a flat field/value array reply
    /// (XINFO and friends).
    pub fn field(&self, name: &str) -> Option<View<'a>> {
        let n = self.len();
        let mut i = 0;
        while i + 1 < n {
            if self.at(i)?.is(name) {
                return self.at(i + 1);
            }
            i += 2;
        }
        None
    }
}

/// An owned call reply, freed on drop.
pub struct Reply(*mut raw::RedisModuleCallReply);

impl Reply {
    pub fn view(&self) -> View<'_> {
        View {
            ptr: self.0,
            _owner: PhantomData,
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        // SAFETY: we own the reply (returned by RM_Call) and free it once.
        unsafe { raw::RedisModule_FreeCallReply.unwrap()(self.0) }
    }
}

/// Runs `cmd args...` in `ctx`'s selected database. `Err` when the server
/// could not run it at all (unknown command, wrong arity); a command error
/// is an `Ok` reply of kind `Error`.
pub fn call(ctx: Ctx, propagate: Propagate, cmd: &str, args: &[&[u8]]) -> Result<Reply, String> {
    let strings: Vec<OwnedString> = args.iter().map(|a| OwnedString::new(a)).collect();
    let mut argv: Vec<*mut raw::RedisModuleString> = strings.iter().map(|s| s.ptr()).collect();
    let c = CString::new(cmd).map_err(|_| "bad command name".to_string())?;
    let fmt = if propagate == Propagate::Yes {
        c"!v"
    } else {
        c"v"
    };
    // SAFETY: ctx is live; `argv` holds `argv.len()` live strings for the
    // whole call; the reply is owned by the returned Reply.
    let reply = unsafe {
        raw::RedisModule_Call.unwrap()(
            ctx.raw(),
            c.as_ptr(),
            fmt.as_ptr(),
            argv.as_mut_ptr(),
            argv.len(),
        )
    };
    if reply.is_null() {
        return Err(format!(
            "{cmd} could not be called: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(Reply(reply))
}

/// `call`, with a command error turned into `Err(message)`.
pub fn call_ok(ctx: Ctx, propagate: Propagate, cmd: &str, args: &[&[u8]]) -> Result<Reply, String> {
    let r = call(ctx, propagate, cmd, args)?;
    if r.view().is_error() {
        return Err(format!("{cmd}: {}", r.view().text()));
    }
    Ok(r)
}

/// Whether the server is Valkey, detected once at load (`detect_server`).
static VALKEY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records which server we run in (from INFO server: Valkey has a
/// `valkey_version` field). Called once from OnLoad.
pub fn detect_server(ctx: Ctx) {
    let valkey = crate::ffi::server_info(ctx, "server")
        .windows(15)
        .any(|w| w == b"valkey_version:");
    VALKEY.store(valkey, std::sync::atomic::Ordering::Relaxed);
}

pub fn is_valkey() -> bool {
    VALKEY.load(std::sync::atomic::Ordering::Relaxed)
}

/// The server's version as 0x00MMmmpp: Redis' own, or Valkey's own (8.1.1
/// for Valkey 8.1.1, not the Redis version it forked from), so it only
/// means something together with `is_valkey`.
pub fn server_version() -> u32 {
    // SAFETY: no arguments.
    unsafe { raw::RedisModule_GetServerVersion.unwrap()() as u32 }
}
