//! The `slots` section of INFO.

use std::ffi::CString;
use std::os::raw::c_int;

use redis_module::raw;

use crate::ffi::guard;
use crate::state::try_with_state;

pub fn register(ctx: crate::ffi::Ctx) {
    // SAFETY: ctx is the OnLoad context. This replaces the default handler
    // the crate's macro registered.
    unsafe {
        raw::RedisModule_RegisterInfoFunc.unwrap()(ctx.raw(), Some(info_func));
    }
}

extern "C" fn info_func(ctx: *mut raw::RedisModuleInfoCtx, _for_crash_report: c_int) {
    guard(
        "INFO",
        || (),
        || {
            // try_: INFO may run from the crash handler while the state is held.
            let Some(fields) = try_with_state(|s| {
                let del_pending_keys: u64 = s
                    .del
                    .pending()
                    .map(|(db, slot)| s.db(db).map_or(0, |d| d.count(slot)))
                    .sum();
                let nonempty: usize = s.dbs().map(|(_, d)| d.nonempty()).sum();
                vec![
                    ("hash_function", s.hash.name().to_string()),
                    ("slot_count", s.slot_count().to_string()),
                    ("index_mode", s.mode.name().to_string()),
                    ("keys_indexed", s.keys_indexed().to_string()),
                    ("index_bytes", s.index_bytes().to_string()),
                    ("nonempty_slots", nonempty.to_string()),
                    ("del_pending_slots", s.del.pending().count().to_string()),
                    ("del_pending_keys", del_pending_keys.to_string()),
                    ("del_deleted_keys", s.del.deleted_keys.to_string()),
                    ("del_finished_slots", s.del.finished_slots.to_string()),
                    ("keys_jobs", s.keys_jobs.len().to_string()),
                    ("loading", (s.loading as u8).to_string()),
                    ("index_building", (s.build.is_some() as u8).to_string()),
                    (
                        "index_build_percent",
                        s.build
                            .as_ref()
                            .map_or(100, |b| b.percent_done())
                            .to_string(),
                    ),
                    ("index_rebuilds", s.stats.rebuilds.to_string()),
                    (
                        "index_last_rebuild_usec",
                        s.stats.last_rebuild_usec.to_string(),
                    ),
                    ("index_resyncs", s.stats.resyncs.to_string()),
                ]
            }) else {
                return;
            };
            let mut fields = fields;
            if let Some(m) = crate::migrate_job::try_with_jobs(|j| j.info_fields()) {
                fields.extend(m);
            }
            fields.extend(crate::restore::info_fields());
            // SAFETY: ctx is the live info context; the CStrings outlive each call.
            unsafe {
                raw::RedisModule_InfoAddSection.unwrap()(ctx, std::ptr::null());
                for (name, value) in fields {
                    let name = CString::new(name).unwrap();
                    let value = CString::new(value).unwrap();
                    raw::RedisModule_InfoAddFieldCString.unwrap()(
                        ctx,
                        name.as_ptr(),
                        value.as_ptr(),
                    );
                }
            }
        },
    );
}
