//! SLOTS.KEYS in counts-only mode: no key names are kept, so the keys of a
//! slot are found by walking the whole keyspace. That walk is O(keyspace), so
//! it is split over cron ticks (each within the step budget) while the
//! calling client, and only that client, waits blocked.

use std::collections::HashSet;
use std::time::Instant;

use redis_module::{BlockedClient, RedisValue, ThreadSafeContext};

use crate::ffi::{self, Ctx, ScanCursor};
use crate::state::with_state;

pub struct KeysJob {
    client: BlockedClient,
    db: usize,
    slot: usize,
    want: usize,
    /// Keys found, in order; `seen` drops the duplicates a scan may return.
    found: Vec<Vec<u8>>,
    seen: HashSet<Vec<u8>>,
    cursor: ScanCursor,
}

#[derive(Default)]
pub struct KeysJobs {
    jobs: Vec<KeysJob>,
}

impl KeysJobs {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn start(&mut self, client: BlockedClient, db: usize, slot: usize, want: usize) {
        self.jobs.push(KeysJob {
            client,
            db,
            slot,
            want,
            found: Vec::new(),
            seen: HashSet::new(),
            cursor: ScanCursor::new(),
        });
    }
}

/// Advances the walks until `deadline`; answers and unblocks the clients whose
/// walk is complete. Returns true while walks are left.
pub fn run(ctx: Ctx, deadline: Instant) -> bool {
    let original_db = ffi::selected_db(ctx);
    let finished: Vec<KeysJob> = with_state(|s| {
        let hash = s.hash;
        let mut done = Vec::new();
        let mut i = 0;
        while i < s.keys_jobs.jobs.len() {
            let job = &mut s.keys_jobs.jobs[i];
            let mut complete = !ffi::select_db(ctx, job.db);
            while !complete && job.found.len() < job.want && Instant::now() < deadline {
                let (slot, found, seen) = (job.slot, &mut job.found, &mut job.seen);
                // RM_Scan has no side effects on keys (no expiry, no events),
                // so it is safe to run while holding the state.
                let more = job.cursor.step(ctx, &mut |k| {
                    if hash.slot(k) == slot && seen.insert(k.to_vec()) {
                        found.push(k.to_vec());
                    }
                });
                complete = !more;
            }
            if complete || job.found.len() >= job.want {
                done.push(s.keys_jobs.jobs.swap_remove(i));
            } else {
                i += 1;
            }
        }
        done
    });
    ffi::select_db(ctx, original_db);
    for job in finished {
        let keys = job
            .found
            .into_iter()
            .take(job.want)
            .map(RedisValue::StringBuffer)
            .collect();
        // Replying through the blocked client's thread-safe context queues the
        // reply; dropping the context unblocks the client, which the server
        // completes on its next event-loop iteration.
        let reply_ctx = ThreadSafeContext::with_blocked_client(job.client);
        reply_ctx.reply(Ok(RedisValue::Array(keys)));
    }
    with_state(|s| !s.keys_jobs.is_empty())
}
