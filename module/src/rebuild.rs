//! Rebuilding the index from the keyspace, in the background.
//!
//! When a dataset has been loaded (RDB or AOF at start, DEBUG RELOAD, a
//! replica's full resync) no keyspace event told us about its keys, so the
//! index is rebuilt by walking the keyspace. Doing it in one go would hold
//! the event loop for about a second per million keys right when the server
//! should start serving, so the walk runs in cron steps of at most
//! `slots.step-budget-us`, while the server serves clients and applies the
//! replication stream.
//!
//! Why the result is exact although keys change during the walk: keyspace
//! events keep being applied to the partial index. A key added during the
//! walk is indexed by its `new` event (and maybe again by the walk, which is
//! idempotent); a key removed during the walk is removed by its event, and if
//! the walk had not reached it yet it will not find it any more; a key that
//! exists during the whole walk is found by it (SCAN's guarantee).
//!
//! Until the walk ends the index is incomplete, so the SLOTS.* commands that
//! read it block their client (see `commands::wait_for_index`) and answer
//! when it is done. Counts-only mode cannot use events to correct a partial
//! count (it cannot tell whether the walk already counted a key), so it
//! rebuilds in one go; counting without storing names is several times
//! cheaper.

use std::collections::VecDeque;
use std::time::Instant;

use crate::ffi::{self, Ctx, ScanCursor};
use crate::index::IndexMode;
use crate::state::{free_in_background, with_state, State};

pub struct Build {
    /// Databases still to walk; the front one is being walked.
    dbs: VecDeque<usize>,
    cursor: Option<ScanCursor>,
    why: String,
    started: Instant,
    pub keys_expected: u64,
    pub keys_walked: u64,
}

impl Build {
    pub fn percent_done(&self) -> u64 {
        (self.keys_walked * 100)
            .checked_div(self.keys_expected)
            .unwrap_or(0)
            .min(99)
    }

    /// SWAPDB: the partial index moved with its data, so must the walk.
    pub fn swap_dbs(&mut self, a: usize, b: usize) {
        for db in &mut self.dbs {
            if *db == a {
                *db = b;
            } else if *db == b {
                *db = a;
            }
        }
    }
}

/// Starts rebuilding `only` one database, or all of them. Any previous index
/// of those databases is dropped (in the background).
pub fn start(ctx: Ctx, why: &str, only: Option<usize>) {
    let original_db = ffi::selected_db(ctx);
    let mut dbs = Vec::new();
    let mut db = 0;
    while ffi::select_db(ctx, db) {
        if only.is_none_or(|o| o == db) {
            dbs.push((db, ffi::db_size(ctx)));
        }
        db += 1;
    }
    ffi::select_db(ctx, original_db);

    if with_state(|s| s.mode) == IndexMode::CountsOnly {
        rebuild_now(ctx, why, &dbs);
        return;
    }
    let old = with_state(|s| {
        let mut old = Vec::new();
        for &(db, _) in &dbs {
            old.extend(s.replace_db(db, None));
            s.resync.retain(|&r| r != db);
        }
        let build = s.build.get_or_insert_with(|| Build {
            dbs: VecDeque::new(),
            cursor: None,
            why: why.to_string(),
            started: Instant::now(),
            keys_expected: 0,
            keys_walked: 0,
        });
        for &(db, size) in &dbs {
            if size > 0 && !build.dbs.contains(&db) {
                build.dbs.push_back(db);
                build.keys_expected += size;
            }
            if build.dbs.front() == Some(&db) {
                // Walking this database again from the start.
                build.cursor = None;
            }
        }
        old
    });
    free_in_background(old);
    // A first step at once: a small dataset (or an empty one) is done before
    // any client can notice a rebuild.
    run(ctx, Instant::now() + crate::config::step_budget());
}

/// Walks until `deadline`. Returns true while the rebuild goes on.
pub fn run(ctx: Ctx, deadline: Instant) -> bool {
    let original_db = ffi::selected_db(ctx);
    let more = loop {
        let Some(db) = with_state(|s| s.build.as_ref().map(|b| b.dbs.front().copied())) else {
            break false;
        };
        let Some(db) = db else {
            finish();
            break false;
        };
        if !ffi::select_db(ctx, db) {
            with_state(|s| s.build.as_mut().map(|b| b.dbs.pop_front()));
            continue;
        }
        // RM_Scan fires no keyspace events (no expiry, no lookups), so
        // holding the state across it is safe.
        let walked = with_state(|s| walk_step(s, ctx, db));
        if !walked {
            with_state(|s| {
                if let Some(b) = s.build.as_mut() {
                    b.dbs.pop_front();
                    b.cursor = None;
                }
            });
        }
        if Instant::now() >= deadline {
            break true;
        }
    };
    ffi::select_db(ctx, original_db);
    more
}

/// Up to 64 RM_Scan steps (buckets) over `db` into its index, under one
/// hold of the state and without reading the clock in between: a step is
/// about one key, far below the budget. False when `db` is done.
fn walk_step(s: &mut State, ctx: Ctx, db: usize) -> bool {
    let hash = s.hash;
    let (build, idx) = s.build_and_db(db);
    let Some(build) = build else { return false };
    let cursor = build.cursor.get_or_insert_with(ScanCursor::new);
    let mut walked = 0;
    let mut more = true;
    for _ in 0..64 {
        more = cursor.step(ctx, &mut |k| {
            idx.add(hash.slot(k), k);
            walked += 1;
        });
        if !more {
            break;
        }
    }
    build.keys_walked += walked;
    more
}

fn finish() {
    with_state(|s| {
        if let Some(b) = s.build.take() {
            let usec = b.started.elapsed().as_micros() as u64;
            s.stats.rebuilds += 1;
            s.stats.last_rebuild_usec = usec;
            redis_module::logging::log_notice(format!(
                "slots: index rebuilt from the keyspace ({}): {} keys walked in {:.1} ms",
                b.why,
                b.keys_walked,
                usec as f64 / 1000.0
            ));
        }
    });
    crate::commands::wait_for_index::release_all();
}

/// Counts-only rebuild, in one go.
fn rebuild_now(ctx: Ctx, why: &str, dbs: &[(usize, u64)]) {
    let started = Instant::now();
    let original_db = ffi::selected_db(ctx);
    let hash = with_state(|s| s.hash);
    let mut keys = 0;
    for &(db, size) in dbs {
        let mut idx = with_state(|s| s.new_db_index());
        if size > 0 && ffi::select_db(ctx, db) {
            ffi::scan_keyspace(ctx, &mut |k| {
                idx.add(hash.slot(k), k);
            });
        }
        keys += idx.total();
        let old = with_state(|s| {
            s.resync.retain(|&r| r != db);
            s.replace_db(db, Some(Box::new(idx)))
        });
        free_in_background(old.into_iter().collect());
    }
    ffi::select_db(ctx, original_db);
    let usec = started.elapsed().as_micros() as u64;
    with_state(|s| {
        s.stats.rebuilds += 1;
        s.stats.last_rebuild_usec = usec;
    });
    redis_module::logging::log_notice(format!(
        "slots: index counts rebuilt from the keyspace ({why}): {keys} keys in {:.1} ms",
        usec as f64 / 1000.0
    ));
}
