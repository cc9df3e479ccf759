//! Keeping the index exact: keyspace notifications and server events.
//!
//! Which events we listen to, and why that is enough:
//!
//! * Every key the server stores goes through `dbAdd()`, which fires the
//!   `new` event (class NOTIFY_NEW, Redis >= 7.0, also Valkey). Loading a
//!   dataset (RDB, AOF preamble, full sync) bypasses it; see below.
//! * Every removal fires one of `del` (DEL, UNLINK, GETDEL, MIGRATE, a
//!   container emptied by LPOP/HDEL/SREM/ZREM/..., a STORE with an empty
//!   result, EXPIRE in the past, RESTORE of an expired payload), `expired`
//!   (active and lazy expiry), `evicted`, `rename_from` or `move_from`.
//! * FLUSHDB/FLUSHALL (sync and async) and SWAPDB swap or drop whole
//!   dictionaries and fire server events instead.
//! * Overwrites (SET on an existing key, RENAME/COPY/RESTORE onto an existing
//!   key) keep the key's name and slot; `new` may fire for a name that is
//!   already indexed, which the set ignores.
//!
//! So we do NOT subscribe to the per-type classes (string, list, hash, ...):
//! a SET or HSET on an existing key costs us nothing on the hot path.
//!
//! For events whose meaning we do not know (other GENERIC events, events of
//! future versions), we look the key up instead of guessing.
//!
//! Counts-only mode keeps no names, so it cannot tell by itself whether a
//! `new` key replaced one of the same name (RESTORE/COPY ... REPLACE, RENAME
//! onto an existing key: the server deletes the old key without an event,
//! then adds the new one). It counts every `new`, and when the command's last
//! event for that key arrives (`restore`, `copy_to`, `rename_to`) it compares
//! its total with the server's key count: one key too many means the key
//! replaced another of the same name, hence of the same slot.
//!
//! Both modes then check, once per event-loop iteration (when no command is
//! half-done), that each touched database holds exactly as many keys as its
//! index, and every 100 ms every indexed database, touched or not: keys can
//! go without any event at all (another module's RM_DeleteKey, or Redis 8
//! deleting a hash whose last field expired lazily). A mismatch means keys
//! changed without an event: the database's index is rebuilt, counted in
//! INFO (`slots_index_resyncs`). The check cannot run per event: servers differ
//! in the order of a command's silent deletes and its additions (Valkey's
//! RENAME deletes the source before it adds the destination).

use std::os::raw::{c_char, c_int, c_void};

use redis_module::raw;

use crate::ffi::{self, guard, Ctx};
use crate::index::IndexMode;
use crate::rebuild;
use crate::state::{free_in_background, with_state};

/// What an event means for the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effect {
    /// A key was added to the database (it may replace one of the same name).
    Added,
    /// The key exists (already announced by `new`); make sure it is indexed.
    Present,
    /// The last event of a command that may have replaced the key silently
    /// (RESTORE, COPY, RENAME): the key exists.
    MaybeReplaced,
    /// The key was removed from the database.
    Removed,
    /// Unknown meaning: look the key up.
    Reconcile,
}

fn classify(class: c_int, event: &[u8]) -> Effect {
    if class & raw::NotifyEvent::NEW.bits() != 0 {
        return Effect::Added;
    }
    match event {
        b"del" | b"expired" | b"evicted" | b"rename_from" | b"move_from" => Effect::Removed,
        b"rename_to" | b"copy_to" | b"restore" => Effect::MaybeReplaced,
        b"move_to" | b"expire" | b"persist" => Effect::Present,
        _ => Effect::Reconcile,
    }
}

pub fn subscribe(ctx: Ctx) -> Result<(), String> {
    let mask = raw::NotifyEvent::NEW
        | raw::NotifyEvent::GENERIC
        | raw::NotifyEvent::EXPIRED
        | raw::NotifyEvent::EVICTED;
    // SAFETY: ctx is the OnLoad context; the callback is a plain extern fn.
    let rc = unsafe {
        raw::RedisModule_SubscribeToKeyspaceEvents.unwrap()(
            ctx.raw(),
            mask.bits(),
            Some(on_keyspace_event),
        )
    };
    if rc != raw::REDISMODULE_OK as c_int {
        return Err("cannot subscribe to keyspace events".into());
    }
    for (id, cb) in [
        (raw::REDISMODULE_EVENT_LOADING, on_loading as ServerEventCb),
        (raw::REDISMODULE_EVENT_FLUSHDB, on_flush),
        (raw::REDISMODULE_EVENT_SWAPDB, on_swapdb),
        (raw::REDISMODULE_EVENT_REPL_ASYNC_LOAD, on_async_load),
    ] {
        let event = raw::RedisModuleEvent { id, dataver: 1 };
        // SAFETY: as above. An unknown event id (older server) is an error we
        // report; all four exist since Redis 7.0.
        let rc =
            unsafe { raw::RedisModule_SubscribeToServerEvent.unwrap()(ctx.raw(), event, Some(cb)) };
        if rc != raw::REDISMODULE_OK as c_int {
            return Err(format!("cannot subscribe to server event {id}"));
        }
    }
    Ok(())
}

type ServerEventCb =
    unsafe extern "C" fn(*mut raw::RedisModuleCtx, raw::RedisModuleEvent, u64, *mut c_void);

extern "C" fn on_keyspace_event(
    ctx: *mut raw::RedisModuleCtx,
    class: c_int,
    event: *const c_char,
    key: *mut raw::RedisModuleString,
) -> c_int {
    guard(
        "keyspace event",
        || (),
        || {
            // SAFETY: the server passes a NUL-terminated event name.
            let event = unsafe { std::ffi::CStr::from_ptr(event) }.to_bytes();
            // SAFETY: ctx and key are live for the duration of this callback.
            let (ctx, key) = unsafe { (Ctx::from_raw(ctx), ffi::string_bytes(key)) };
            let db = ffi::selected_db(ctx);
            on_key_changed(ctx, db, classify(class, event), key);
            crate::valkey_db_fix::after_event(ctx, event, key, db);
        },
    );
    raw::REDISMODULE_OK as c_int
}

fn on_key_changed(ctx: Ctx, db: usize, effect: Effect, key: &[u8]) {
    let effect = match effect {
        // Look up outside the state lock: a lookup may expire the key.
        Effect::Reconcile => {
            if with_state(|s| s.loading || s.mode == IndexMode::CountsOnly) {
                // Counts-only cannot tell whether it counted the key; the
                // end-of-iteration check covers it.
                with_state(|s| s.touch(db));
                return;
            }
            if ffi::key_exists(ctx, key) {
                Effect::Present
            } else {
                Effect::Removed
            }
        }
        e => e,
    };
    let counts_only_replace_check =
        effect == Effect::MaybeReplaced && with_state(|s| s.mode) == IndexMode::CountsOnly;
    let db_size = if counts_only_replace_check {
        ffi::db_size(ctx)
    } else {
        0
    };
    with_state(|s| {
        if s.loading {
            return;
        }
        s.touch(db);
        let slot = s.slot(key);
        let mode = s.mode;
        let idx = s.db_mut(db);
        match (effect, mode) {
            (Effect::Added, _) => {
                idx.add(slot, key);
            }
            (Effect::Present | Effect::MaybeReplaced, IndexMode::Full) => {
                idx.add(slot, key);
            }
            (Effect::Present, IndexMode::CountsOnly) => {}
            (Effect::MaybeReplaced, IndexMode::CountsOnly) => {
                if idx.total() == db_size + 1 {
                    idx.remove(slot, key);
                }
            }
            (Effect::Removed, _) => {
                idx.remove(slot, key);
            }
            (Effect::Reconcile, _) => unreachable!("resolved above"),
        }
    });
}

/// The end-of-iteration check (see the top of this file): every database
/// touched since the last check holds as many keys as its index.
pub fn check_touched(ctx: Ctx) {
    let touched = with_state(|s| {
        if s.loading || s.build.is_some() {
            return Vec::new();
        }
        std::mem::take(&mut s.touched)
    });
    if touched.is_empty() {
        return;
    }
    let original_db = ffi::selected_db(ctx);
    for db in touched {
        if !ffi::select_db(ctx, db) {
            continue;
        }
        let stored = ffi::db_size(ctx);
        with_state(|s| {
            let indexed = s.db(db).map_or(0, |d| d.total());
            if indexed != stored && !s.resync.contains(&db) {
                redis_module::logging::log_warning(format!(
                    "slots: index of db {db} holds {indexed} keys but the database {stored} (keys changed without a \
                     keyspace event, e.g. by another module); rebuilding it"
                ));
                s.request_resync(db);
            }
        });
    }
    ffi::select_db(ctx, original_db);
}

unsafe extern "C" fn on_loading(
    ctx: *mut raw::RedisModuleCtx,
    _e: raw::RedisModuleEvent,
    sub: u64,
    _data: *mut c_void,
) {
    guard(
        "loading event",
        || (),
        || match sub {
            raw::REDISMODULE_SUBEVENT_LOADING_RDB_START
            | raw::REDISMODULE_SUBEVENT_LOADING_AOF_START
            | raw::REDISMODULE_SUBEVENT_LOADING_REPL_START => {
                let old = with_state(|s| {
                    s.loading = true;
                    s.build = None;
                    s.del.cancel_all("a dataset is being loaded");
                    s.take_all()
                });
                free_in_background(old);
                // The keys a job tracks are being replaced wholesale.
                crate::migrate_job::stop_all("a dataset is being loaded on this server");
            }
            _ => {
                with_state(|s| s.loading = false);
                // SAFETY: the event's context is live during this callback.
                rebuild::start(unsafe { Ctx::from_raw(ctx) }, "a dataset was loaded", None);
            }
        },
    );
}

unsafe extern "C" fn on_flush(
    _ctx: *mut raw::RedisModuleCtx,
    _e: raw::RedisModuleEvent,
    sub: u64,
    data: *mut c_void,
) {
    guard(
        "flush event",
        || (),
        || {
            if sub != raw::REDISMODULE_SUBEVENT_FLUSHDB_END {
                return;
            }
            // SAFETY: for this event the server passes a RedisModuleFlushInfo.
            let info = unsafe { &*(data as *const raw::RedisModuleFlushInfo) };
            let old = with_state(|s| {
                if info.dbnum < 0 {
                    s.take_all()
                } else {
                    s.replace_db(info.dbnum as usize, None)
                        .into_iter()
                        .collect()
                }
            });
            free_in_background(old);
            // FLUSH fires no per-key events: keys a job has in flight are
            // gone, so their copies on the target must go as well.
            let db = (info.dbnum >= 0).then_some(info.dbnum as usize);
            crate::migrate_job::with_jobs(|j| j.note_flush(db));
        },
    );
}

unsafe extern "C" fn on_swapdb(
    _ctx: *mut raw::RedisModuleCtx,
    _e: raw::RedisModuleEvent,
    _sub: u64,
    data: *mut c_void,
) {
    guard(
        "swapdb event",
        || (),
        || {
            // SAFETY: for this event the server passes a RedisModuleSwapDbInfo.
            let info = unsafe { &*(data as *const raw::RedisModuleSwapDbInfo) };
            let (a, b) = (info.dbnum_first as usize, info.dbnum_second as usize);
            with_state(|s| s.swap_dbs(a, b));
            crate::migrate_job::with_jobs(|j| {
                j.stop_for_db(&[a, b], "SWAPDB replaced the database")
            });
        },
    );
}

unsafe extern "C" fn on_async_load(
    ctx: *mut raw::RedisModuleCtx,
    _e: raw::RedisModuleEvent,
    sub: u64,
    _d: *mut c_void,
) {
    // With `repl-diskless-load swapdb` a replica loads into a temporary
    // database and swaps it in at the end, without loading events.
    guard(
        "async load event",
        || (),
        || {
            if sub == raw::REDISMODULE_SUBEVENT_REPL_ASYNC_LOAD_COMPLETED {
                // SAFETY: the event's context is live during this callback.
                rebuild::start(
                    unsafe { Ctx::from_raw(ctx) },
                    "replica finished an asynchronous load",
                    None,
                );
            }
        },
    );
}

/// Rebuilds the databases the event handlers found out of sync.
pub fn resync_pending(ctx: Ctx) {
    while let Some(db) = with_state(|s| s.resync.pop()) {
        with_state(|s| s.stats.resyncs += 1);
        rebuild::start(ctx, "the index disagreed with the keyspace", Some(db));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let generic = raw::NotifyEvent::GENERIC.bits();
        assert_eq!(
            classify(raw::NotifyEvent::NEW.bits(), b"new"),
            Effect::Added
        );
        for e in [&b"del"[..], b"rename_from", b"move_from"] {
            assert_eq!(classify(generic, e), Effect::Removed);
        }
        assert_eq!(
            classify(raw::NotifyEvent::EXPIRED.bits(), b"expired"),
            Effect::Removed
        );
        assert_eq!(
            classify(raw::NotifyEvent::EVICTED.bits(), b"evicted"),
            Effect::Removed
        );
        assert_eq!(classify(generic, b"rename_to"), Effect::MaybeReplaced);
        assert_eq!(classify(generic, b"move_to"), Effect::Present);
        assert_eq!(classify(generic, b"something_new"), Effect::Reconcile);
    }
}
