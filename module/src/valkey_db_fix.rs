//! A workaround for a Valkey 8.1 bug that our keyspace subscription exposes.
//!
//! Valkey 8.1 (valkey-io/valkey#1819) runs module keyspace callbacks on the
//! client that executes the command and selects the event's database on
//! that client, without selecting the old one back (fixed upstream by
//! valkey#4024, not in Debian 13's 8.1.1). MOVE and COPY ... DB notify in the
//! destination database, so with any subscriber loaded the client is left on
//! the destination database: its next commands, or a replica's next
//! replicated commands, go to the wrong database.
//!
//! Our callbacks run last in each of those commands (`move_to`, `copy_to`),
//! so they select the client's original database back:
//! - MOVE: the original database is the one of the `move_from` event that
//!   the same command fired just before.
//! - COPY ... DB: no event names the source database, so a command filter
//!   records the client's database when the command arrives (for a client in
//!   MULTI, the database it will be in when EXEC runs the command, following
//!   the SELECTs queued before it).
//!
//! Enabled only on Valkey; Redis runs the callbacks on a temporary client.

use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use redis_module::raw;

use crate::ffi::{self, guard, Ctx};

/// A COPY ... DB seen by the filter, waiting for its `copy_to` event.
struct PendingCopy {
    client: u64,
    key: Vec<u8>,
    dst_db: usize,
    src_db: usize,
}

#[derive(Default)]
struct Fix {
    /// Database of the last `move_from` event (MOVE's source).
    last_move_from: Option<(Vec<u8>, usize)>,
    copies: Vec<PendingCopy>,
    /// Clients in MULTI: the database their queued commands will run in.
    multi_db: Vec<(u64, usize)>,
}

static FIX: Mutex<Option<Fix>> = Mutex::new(None);
/// Whether the workaround is on (the one source of truth): checked before
/// taking the lock, because every keyspace event on every server passes
/// through `after_event`.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Bounds the pending list: entries of COPYs that failed (no event) are
/// otherwise only dropped by the client's next MULTI.
const MAX_PENDING: usize = 4096;

fn with_fix<R>(f: impl FnOnce(&mut Fix) -> R) -> Option<R> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    let mut g = FIX.lock().unwrap_or_else(|e| e.into_inner());
    g.as_mut().map(f)
}

/// Installs the workaround where needed (Valkey).
pub fn install(ctx: Ctx) -> Result<(), String> {
    if !crate::call::is_valkey() {
        ENABLED.store(false, Ordering::Relaxed);
        return Ok(());
    }
    *FIX.lock().unwrap_or_else(|e| e.into_inner()) = Some(Fix::default());
    ENABLED.store(true, Ordering::Relaxed);
    // SAFETY: OnLoad context; the filter callback is a plain extern fn.
    let filter = unsafe {
        raw::RedisModule_RegisterCommandFilter.unwrap()(
            ctx.raw(),
            Some(filter),
            raw::REDISMODULE_CMDFILTER_NOSELF as c_int,
        )
    };
    if filter.is_null() {
        return Err("cannot register the command filter of the Valkey MOVE/COPY workaround".into());
    }
    redis_module::logging::log_notice(
        "slots: Valkey detected: restoring the client's database after MOVE and COPY ... DB (valkey#4024)",
    );
    Ok(())
}

pub fn uninstall() {
    ENABLED.store(false, Ordering::Relaxed);
    *FIX.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

fn arg(fctx: *mut raw::RedisModuleCommandFilterCtx, i: c_int) -> Vec<u8> {
    // SAFETY: `fctx` is the live filter context and `i` is below the count.
    unsafe { ffi::string_bytes(raw::RedisModule_CommandFilterArgGet.unwrap()(fctx, i)).to_vec() }
}

fn parse_db(v: &[u8]) -> Option<usize> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

unsafe extern "C" fn filter(fctx: *mut raw::RedisModuleCommandFilterCtx) {
    guard(
        "command filter",
        || (),
        || {
            // SAFETY: the live filter context.
            let argc = unsafe { raw::RedisModule_CommandFilterArgsCount.unwrap()(fctx) };
            if argc < 1 {
                return;
            }
            let name = arg(fctx, 0).to_ascii_lowercase();
            if !matches!(
                name.as_slice(),
                b"copy" | b"select" | b"multi" | b"discard" | b"exec"
            ) {
                return;
            }
            // SAFETY: the live filter context.
            let client = unsafe { raw::RedisModule_CommandFilterGetClientId.unwrap()(fctx) };
            let Some((db, in_multi)) = ffi::client_db(client) else {
                return;
            };
            let args: Vec<Vec<u8>> = (1..argc).map(|i| arg(fctx, i)).collect();
            with_fix(|f| match name.as_slice() {
                b"multi" if !in_multi => {
                    f.copies.retain(|c| c.client != client);
                    f.multi_db.retain(|&(c, _)| c != client);
                    // Clients that disconnect inside MULTI leave theirs.
                    if f.multi_db.len() >= MAX_PENDING {
                        f.multi_db.remove(0);
                    }
                    f.multi_db.push((client, db));
                }
                // The queued commands went through this filter when they
                // were queued; at EXEC the transaction's database is no
                // longer needed.
                b"discard" | b"exec" => f.multi_db.retain(|&(c, _)| c != client),
                b"select" if in_multi => {
                    if let (Some(n), Some(m)) = (
                        args.first().and_then(|a| parse_db(a)),
                        f.multi_db.iter_mut().find(|(c, _)| *c == client),
                    ) {
                        m.1 = n;
                    }
                }
                b"copy" => {
                    // COPY source destination [DB n] [REPLACE]: options
                    // only after the two key names.
                    let dst_db = args
                        .get(2..)
                        .unwrap_or_default()
                        .windows(2)
                        .find(|w| w[0].eq_ignore_ascii_case(b"db"))
                        .and_then(|w| parse_db(&w[1]));
                    let (Some(dst_db), Some(key)) = (dst_db, args.get(1)) else {
                        return;
                    };
                    let src_db = if in_multi {
                        f.multi_db
                            .iter()
                            .find(|(c, _)| *c == client)
                            .map_or(db, |m| m.1)
                    } else {
                        db
                    };
                    if dst_db == src_db {
                        return;
                    }
                    f.copies
                        .retain(|c| !(c.client == client && c.key == *key && c.dst_db == dst_db));
                    if f.copies.len() >= MAX_PENDING {
                        f.copies.remove(0);
                    }
                    f.copies.push(PendingCopy {
                        client,
                        key: key.clone(),
                        dst_db,
                        src_db,
                    });
                }
                _ => {}
            });
        },
    );
}

/// Called from the keyspace callback (with the event's context, which on
/// Valkey 8.1 is the executing client) after the index was updated.
pub fn after_event(ctx: Ctx, event: &[u8], key: &[u8], db: usize) {
    let restore = with_fix(|f| match event {
        b"move_from" => {
            f.last_move_from = Some((key.to_vec(), db));
            None
        }
        b"move_to" => match f.last_move_from.take() {
            Some((k, src)) if k == key => Some(src),
            _ => None,
        },
        b"copy_to" => {
            // SAFETY: the live event context.
            let client = unsafe { raw::RedisModule_GetClientId.unwrap()(ctx.raw()) };
            let i = f
                .copies
                .iter()
                .position(|c| c.client == client && c.key == key && c.dst_db == db)?;
            Some(f.copies.remove(i).src_db)
        }
        _ => None,
    })
    .flatten();
    if let Some(src) = restore {
        ffi::select_db(ctx, src);
    }
}
