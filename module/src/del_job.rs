//! SLOTS.DEL: deleting whole slots in the background of the event loop.
//!
//! Each cron tick deletes keys of the queued slots for at most the step
//! budget (`slots.step-budget-us`), through `UNLINK` called with propagation,
//! so replicas and the AOF see ordinary deletes and big values are freed by
//! the lazyfree thread. The keyspace events of those UNLINKs update the index
//! like any client's would.
//!
//! A slot is done when it has no keys left. Keys written into the slot while
//! it is being deleted are deleted too (a slot is deleted because it moved
//! away; nothing should write to it). A pass over the slot that finds nothing
//! to delete while the index still counts keys ends the job with a warning
//! rather than spinning.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::ffi::{self, Ctx, ScanCursor};
use crate::index::IndexMode;
use crate::state::with_state;

pub struct DelJob {
    pub db: usize,
    pub slot: usize,
    /// Full mode: the slot's key-set scan cursor.
    cursor: u64,
    /// Counts-only mode: a keyspace scan filtered by slot.
    keyspace: Option<ScanCursor>,
    /// Keys deleted during the current pass over the slot.
    pass_deleted: u64,
}

#[derive(Default)]
pub struct DelQueue {
    jobs: VecDeque<DelJob>,
    /// Keys per UNLINK call, adapted so one call fits the step budget.
    batch: usize,
    pub deleted_keys: u64,
    pub finished_slots: u64,
}

impl DelQueue {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub fn is_pending(&self, db: usize, slot: usize) -> bool {
        self.jobs.iter().any(|j| j.db == db && j.slot == slot)
    }

    pub fn pending(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.jobs.iter().map(|j| (j.db, j.slot))
    }

    pub fn enqueue(&mut self, db: usize, slot: usize) {
        if !self.is_pending(db, slot) {
            self.jobs.push_back(DelJob {
                db,
                slot,
                cursor: 0,
                keyspace: None,
                pass_deleted: 0,
            });
        }
    }

    pub fn cancel_all(&mut self, why: &str) {
        if !self.jobs.is_empty() {
            redis_module::logging::log_warning(format!(
                "slots: SLOTS.DEL of {} slot(s) cancelled: {why}",
                self.jobs.len()
            ));
            self.jobs.clear();
        }
    }

    /// SWAPDB: a pending deletion follows its data to the other database
    /// number, so it still deletes what the operator asked for.
    pub fn swap_dbs(&mut self, a: usize, b: usize) {
        for j in &mut self.jobs {
            if j.db == a {
                j.db = b;
            } else if j.db == b {
                j.db = a;
            }
        }
    }
}

/// What one batch of a job found.
enum Batch {
    Keys(Vec<Vec<u8>>),
    /// The slot is empty or the job gave up: remove the job.
    Done,
}

/// Collects the next keys of the front job, at most `limit`.
fn next_batch(ctx: Ctx, limit: usize) -> Option<(usize, Batch)> {
    with_state(|s| {
        let mode = s.mode;
        let hash = s.hash;
        let job = s.del.jobs.front()?;
        let (db, slot) = (job.db, job.slot);
        let remaining = s.db(db).map_or(0, |d| d.count(slot));
        if remaining == 0 {
            return Some((db, Batch::Done));
        }
        let mut keys = Vec::new();
        let mut pass_over = false;
        match mode {
            IndexMode::Full => {
                let (idx, del) = s.db_and_del(db);
                let set = idx.and_then(|d| d.keys(slot))?;
                let job = del.jobs.front_mut()?;
                loop {
                    job.cursor = set.scan_step(job.cursor, &mut |k| keys.push(k.to_vec()));
                    if job.cursor == 0 {
                        pass_over = true;
                        break;
                    }
                    if keys.len() >= limit {
                        break;
                    }
                }
            }
            IndexMode::CountsOnly => {
                let job = s.del.jobs.front_mut()?;
                if !ffi::select_db(ctx, db) {
                    return Some((db, Batch::Done));
                }
                let cursor = job.keyspace.get_or_insert_with(ScanCursor::new);
                let started = Instant::now();
                // Filtering the whole keyspace for one slot: bound by time as
                // well as by the number of keys found.
                while keys.len() < limit && started.elapsed() < Duration::from_micros(200) {
                    if !cursor.step(ctx, &mut |k| {
                        if hash.slot(k) == slot {
                            keys.push(k.to_vec())
                        }
                    }) {
                        pass_over = true;
                        job.keyspace = None;
                        break;
                    }
                }
            }
        }
        let job = s.del.jobs.front_mut()?;
        job.pass_deleted += keys.len() as u64;
        if pass_over {
            if job.pass_deleted == 0 {
                redis_module::logging::log_warning(format!(
                    "slots: SLOTS.DEL of slot {slot} (db {db}) found no key to delete although the index counts \
                     {remaining}; giving up and rebuilding the index"
                ));
                s.request_resync(db);
                return Some((db, Batch::Done));
            }
            job.pass_deleted = 0;
        }
        Some((db, Batch::Keys(keys)))
    })
}

/// Runs SLOTS.DEL work until `deadline`. Returns true while work is left.
pub fn run(ctx: Ctx, deadline: Instant) -> bool {
    // A replica's data is its primary's: after a FAILOVER or REPLICAOF
    // (partial resync, no load) a deletion left here would make it diverge.
    if ffi::context_flags(ctx) & redis_module::raw::REDISMODULE_CTX_FLAGS_SLAVE != 0 {
        with_state(|s| s.del.cancel_all("this server became a replica"));
        return false;
    }
    let original_db = ffi::selected_db(ctx);
    loop {
        let limit = with_state(|s| s.del.batch.clamp(16, 1000));
        let Some((db, batch)) = next_batch(ctx, limit) else {
            break;
        };
        match batch {
            Batch::Done => with_state(|s| {
                s.del.jobs.pop_front();
                s.del.finished_slots += 1;
            }),
            Batch::Keys(keys) => {
                let started = Instant::now();
                ffi::select_db(ctx, db);
                // Not under the state lock: UNLINK fires keyspace events that
                // update the index.
                let result = ffi::unlink(ctx, &keys);
                let per_key = started.elapsed() / keys.len().max(1) as u32;
                with_state(|s| {
                    match result {
                        Ok(n) => s.del.deleted_keys += n as u64,
                        Err(e) => {
                            redis_module::logging::log_warning(format!(
                                "slots: SLOTS.DEL: UNLINK failed: {e}"
                            ));
                        }
                    }
                    // Aim for a quarter of the budget per call.
                    let budget = crate::config::step_budget() / 4;
                    s.del.batch = (budget.as_nanos() / per_key.as_nanos().max(1)) as usize;
                });
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    ffi::select_db(ctx, original_db);
    with_state(|s| !s.del.is_empty())
}
