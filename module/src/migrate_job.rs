//! The migration job (SLOTS.MIGRATE, SLOTS.MIGRATE.KEYS): moves keys to a
//! target in the background and deletes each one only after the target has
//! acknowledged it and it has not changed since it was serialized.
//!
//! Each cron tick gives every running job a slice of the step budget, in
//! which it (1) takes the replies its connection threads received, (2)
//! deletes the keys they acknowledge, (3) serializes more keys into batches
//! while the pipeline has room and the throttle allows. Nothing here waits
//! for the network (transport.rs does that on its own threads).
//!
//! A key's life in a job (`Tracked`):
//!
//!   queued -> sent (a DUMP record, or the chunks of a big key ending in
//!   COMMIT) -> acknowledged -> deleted from the source
//!
//! Every serialization of a key is a new generation. A write to the key
//! (tracking.rs) marks it dirty; an acknowledgement of a dirty or older
//! generation deletes nothing: the key is queued again, and after
//! MAX_RESENDS tries it is frozen (writes to it get -TRYAGAIN, redirect.rs)
//! so the next try converges. A `-1` reply (the target lost a staging key)
//! also queues the key again. Any other failure stops the job; every key
//! not yet acknowledged is still on the source, so a new job resumes.
//!
//! A job that fails or is cancelled may leave copies on the target: keys
//! whose records were sent but whose acknowledgement never came (the target
//! may have applied them). While such a key stays here that is harmless
//! (the next job sends it again with REPLACE), but a key deleted here before
//! the next job would survive there and come back once the slot has moved.
//! So the keys a stopped job had sent are remembered per target (by its run
//! id, whatever the host was called) and database ("leftovers"; in memory
//! only), and the next job to that target that covers them treats them as
//! sent once it has connected: present here, they are sent again; gone, the
//! target gets a DEL. A key moved by any job is no longer a leftover (its
//! copy on a target is then the key). A cancel also sends those DELs at
//! once.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis_module::raw;

use crate::config;
use crate::ffi::{self, Ctx};
use crate::restore::now_ms;
use crate::serializer::{self, BigKey, Limits, Start};
use crate::state::with_state;
use crate::transport::{self, Conn, Endpoint, Event, Item};
use crate::wire::BatchBuilder;

/// Batches in flight per connection: enough to keep the target busy while
/// replies travel back, few enough to bound what a failure leaves undone.
const WINDOW: usize = 4;
/// A batch is sent when it reaches either limit (or at the end of a step).
/// It is one command on the target, so it also bounds the target's step.
const BATCH_BYTES: usize = 256 * 1024;
const BATCH_RECORDS: usize = 256;
/// Tries of a key that keeps changing before its writes are blocked.
pub const MAX_RESENDS: u32 = 3;
/// Finished jobs kept for SLOTS.MIGRATE.STATUS.
const KEEP_FINISHED: usize = 16;
/// Keys deleted per UNLINK call; the step's deadline is checked between
/// calls. Measured (SLOWLOG, 1M keys, module loaded): a 64-key UNLINK takes
/// ~120 us median but up to ~0.9 ms, and 64-key calls were the largest item
/// in the job's budget overruns; 16 keeps one call well under the budget.
const DELETE_BATCH: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    Running,
    Done,
    Failed(String),
    Cancelled,
}

impl JobState {
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed(_) => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

pub struct Options {
    pub endpoint: Endpoint,
    pub limits: Limits,
    pub parallel: usize,
}

/// Which keys a job moves.
pub enum Scope {
    Slots {
        slots: Vec<usize>,
        /// Slots still to walk; the front one is being walked.
        pending: VecDeque<usize>,
        /// Slots whose remaining keys are all in flight: looked at again
        /// when their keys are acknowledged.
        parked: Vec<usize>,
        cursor: u64,
        candidates: VecDeque<Vec<u8>>,
    },
    Keys {
        all: HashSet<Vec<u8>>,
        queue: VecDeque<Vec<u8>>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Queued,
    /// A big key whose chunks are being produced.
    Streaming,
    /// Its last record is sent; waiting for the acknowledgement.
    Sent,
}

struct Tracked {
    slot: usize,
    generation: u64,
    dirty: bool,
    resends: u32,
    phase: Phase,
    /// A staging key may exist on the target (a chunk was sent).
    staged: bool,
    /// The link its records travel on.
    link: usize,
    /// Some record of it was sent: the target may hold a copy.
    sent: bool,
    /// It vanished here after being sent: a DEL record is on its way; its
    /// acknowledgement ends the key's tracking (nothing to delete here).
    removing: bool,
    bytes: u64,
}

/// Per record of a sent batch: which key, which generation, and whether it
/// is the key's last record (its acknowledgement allows the delete).
struct SentRecord {
    key: Vec<u8>,
    generation: u64,
    last: bool,
}

/// The target's result for one record, waiting to be acted on.
struct Ack {
    key: Vec<u8>,
    generation: u64,
    last: bool,
    code: i64,
}

struct Link {
    conn: Conn,
    builder: BatchBuilder,
    building: Vec<SentRecord>,
    in_flight: VecDeque<Vec<SentRecord>>,
    big: Vec<(u64, Box<BigKey>)>,
}

impl Link {
    fn has_room(&self) -> bool {
        self.in_flight.len() < WINDOW
    }
}

#[derive(Default)]
pub struct JobStats {
    pub keys_moved: u64,
    pub bytes_moved: u64,
    pub keys_resent: u64,
    pub keys_skipped: u64,
    pub big_keys: u64,
    pub chunks_sent: u64,
    pub batches_sent: u64,
    pub errors: u64,
    pub last_error: String,
    pub max_step_usec: u64,
    pub max_step_cpu_usec: u64,
    /// Event-loop slices this job ran, and how many took over 1 ms of wall
    /// and of CPU time: the maximum alone cannot tell one outlier from a
    /// habit.
    pub steps: u64,
    pub steps_over_1ms: u64,
    pub steps_over_1ms_cpu: u64,
    /// (when, keys_moved, bytes_moved), one sample per second, for the rate.
    samples: VecDeque<(Instant, u64, u64)>,
}

pub struct Job {
    pub id: u64,
    pub source_id: String,
    pub db: usize,
    pub target: String,
    pub host: String,
    pub port: u16,
    pub state: JobState,
    pub scope: Scope,
    opts: Options,
    links: Vec<Link>,
    tracked: HashMap<Vec<u8>, Tracked>,
    tracked_per_slot: HashMap<usize, usize>,
    resend: VecDeque<Vec<u8>>,
    pub frozen: HashSet<Vec<u8>>,
    to_delete: Vec<Vec<u8>>,
    /// Results received and not yet acted on (their keys are still tracked).
    acks: VecDeque<Ack>,
    /// The keys of `to_delete` still to delete. Between an acknowledgement
    /// and the UNLINK (a later slice, if the budget ran out) such a key is
    /// treated as moved: redirect.rs sends its clients to the target, which
    /// holds the acknowledged copy. A write that reaches it here anyway
    /// (one that bypasses the filter) takes it out of this set: the key is
    /// sent again instead of deleted.
    deleting: HashSet<Vec<u8>>,
    /// Keys taken out of `deleting` by a write, to send again.
    revived: Vec<Vec<u8>>,
    /// Set when the job must stop; it ends once acknowledged deletes are done.
    ending: Option<JobState>,
    /// The database the job read from is no longer the data it sent (see
    /// `abandon`): no acknowledgement may lead to a delete any more.
    abandoned: bool,
    /// The target's run id, once a connection has reported it: names the
    /// target for leftovers.
    target_run_id: Option<String>,
    pub stats: JobStats,
    pub started_at_ms: i64,
    started: Instant,
    ended: Option<Instant>,
}

/// A client blocked in SLOTS.MIGRATE.WAIT.
pub struct Waiter(pub *mut raw::RedisModuleBlockedClient);
// SAFETY: only used on the main thread; lives in a global behind a Mutex.
unsafe impl Send for Waiter {}

/// Clients blocked in SLOTS.MIGRATE.WAIT, with their job's id. One list for
/// all jobs, so that each handle is unblocked exactly once, by whichever
/// comes first: the job's end, the client's timeout or its disconnect.
static WAITERS: Mutex<Vec<(Waiter, u64)>> = Mutex::new(Vec::new());

pub fn add_waiter(job: u64, w: Waiter) {
    if let Ok(mut v) = WAITERS.lock() {
        v.push((w, job));
    }
}

/// Takes `bc` off the list; false if it was not there (already unblocked).
pub fn remove_waiter(bc: *mut raw::RedisModuleBlockedClient) -> bool {
    let Ok(mut v) = WAITERS.lock() else {
        return false;
    };
    let before = v.len();
    v.retain(|(w, _)| w.0 != bc);
    v.len() != before
}

fn take_waiters(job: u64) -> Vec<Waiter> {
    let Ok(mut v) = WAITERS.lock() else {
        return Vec::new();
    };
    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut *v)
        .into_iter()
        .partition(|(_, j)| *j == job);
    *v = rest;
    mine.into_iter().map(|(w, _)| w).collect()
}

/// Where one step's time went (for the overrun log line).
struct StepPhases {
    last: Instant,
    /// (count, microseconds) per phase.
    acks: (usize, u64),
    deletes: (usize, u64),
    keys: (usize, u64),
    big_steps: usize,
    flush: (usize, u64),
    /// Inside the serialization phase: choosing keys (index walk), the
    /// slowest single key (us, bytes), batches sent when full.
    pick_us: u64,
    slowest_key: (u64, u64),
    mid_flush_us: u64,
}

impl Default for StepPhases {
    fn default() -> Self {
        StepPhases {
            last: Instant::now(),
            acks: (0, 0),
            deletes: (0, 0),
            keys: (0, 0),
            big_steps: 0,
            flush: (0, 0),
            pick_us: 0,
            slowest_key: (0, 0),
            mid_flush_us: 0,
        }
    }
}

/// Microseconds since `mark`, which moves to now.
fn lap(mark: &mut Instant) -> u64 {
    let now = Instant::now();
    let us = now.duration_since(*mark).as_micros() as u64;
    *mark = now;
    us
}

impl StepPhases {
    /// Microseconds since the previous lap.
    fn lap(&mut self) -> u64 {
        lap(&mut self.last)
    }

    fn describe(&self) -> String {
        format!(
            "{} acks in {} us, {} deletes in {} us, {} keys + {} big-key steps serialized in {} us (choosing keys {} us, slowest key {} us for {} bytes, full batches sent {} us), {} batches sent in {} us",
            self.acks.0,
            self.acks.1,
            self.deletes.0,
            self.deletes.1,
            self.keys.0,
            self.big_steps,
            self.keys.1,
            self.pick_us,
            self.slowest_key.0,
            self.slowest_key.1,
            self.mid_flush_us,
            self.flush.0,
            self.flush.1
        )
    }
}

/// Set by a step that used its whole budget with work left over: the cron
/// may then run again before its 1 ms period, within
/// `slots.migrate-max-cpu-percent` (cron.rs; the job is CPU-bound, not
/// waiting for the target).
static HUNGRY: AtomicBool = AtomicBool::new(false);

/// Whether a step since the last call ran out of time with work left.
pub fn take_hungry() -> bool {
    HUNGRY.swap(false, Ordering::Relaxed)
}

/// All jobs of this server.
#[derive(Default)]
pub struct Jobs {
    next_id: u64,
    pub list: Vec<Job>,
    throttle: Throttle,
}

/// (target run id, db) -> keys that stopped jobs sent without an
/// acknowledgement (see the top of this file). Separate from JOBS: a job
/// running its step is outside that list and still has to reach this.
static LEFTOVERS: Mutex<Leftovers> = Mutex::new(BTreeMap::new());

type Leftovers = BTreeMap<(String, usize), HashSet<Vec<u8>>>;

fn with_leftovers<R>(f: impl FnOnce(&mut Leftovers) -> R) -> R {
    f(&mut LEFTOVERS.lock().unwrap_or_else(|e| e.into_inner()))
}

/// `key` of `db` was moved by some job: a copy a stopped job left on any
/// target is no longer stale (on this target it is the key now; elsewhere
/// it is not ours to delete any more).
fn forget_leftover(db: usize, key: &[u8]) {
    with_leftovers(|l| {
        if l.is_empty() {
            return;
        }
        l.retain(|(_, d), set| {
            if *d == db {
                set.remove(key);
            }
            !set.is_empty()
        });
    });
}

static JOBS: Mutex<Jobs> = Mutex::new(Jobs {
    next_id: 1,
    list: Vec::new(),
    throttle: Throttle {
        last: None,
        keys: 0.0,
        bytes: 0.0,
    },
});

/// Runs `f` on the jobs. Never call the server from inside `f`: the
/// keyspace-event callback (tracking.rs) takes this lock too.
pub fn with_jobs<R>(f: impl FnOnce(&mut Jobs) -> R) -> R {
    let mut g = JOBS.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut g)
}

/// Like with_jobs, but `None` if the lock is held (an event caused by one
/// of our own server calls during a step).
pub fn try_with_jobs<R>(f: impl FnOnce(&mut Jobs) -> R) -> Option<R> {
    JOBS.try_lock().ok().map(|mut g| f(&mut g))
}

/// A token bucket per limit, shared by all jobs.
#[derive(Default)]
pub struct Throttle {
    last: Option<Instant>,
    keys: f64,
    bytes: f64,
}

impl Throttle {
    /// Refills and tells whether a key may be started now.
    fn allows(&mut self) -> bool {
        let (kps, bps) = config::migrate_rate_limits();
        let now = Instant::now();
        let dt = self
            .last
            .map_or(0.0, |l| now.duration_since(l).as_secs_f64());
        self.last = Some(now);
        // Bursts of at most 100 ms worth (and at least one key / one MiB).
        if kps > 0 {
            let cap = (kps as f64 / 10.0).max(1.0);
            self.keys = (self.keys + dt * kps as f64).min(cap);
        }
        if bps > 0 {
            let cap = (bps as f64 / 10.0).max(1024.0 * 1024.0);
            self.bytes = (self.bytes + dt * bps as f64).min(cap);
        }
        (kps == 0 || self.keys >= 1.0) && (bps == 0 || self.bytes > 0.0)
    }

    fn take(&mut self, keys: u64, bytes: u64) {
        let (kps, bps) = config::migrate_rate_limits();
        if kps > 0 {
            self.keys -= keys as f64;
        }
        if bps > 0 {
            self.bytes -= bytes as f64;
        }
    }
}

impl Jobs {
    pub fn running(&self) -> impl Iterator<Item = &Job> {
        self.list.iter().filter(|j| j.state == JobState::Running)
    }

    pub fn any_running(&self) -> bool {
        self.running().next().is_some()
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Job> {
        self.list.iter_mut().find(|j| j.id == id)
    }

    pub fn get(&self, id: u64) -> Option<&Job> {
        self.list.iter().find(|j| j.id == id)
    }

    /// A new job's id; the job is added by `add`.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub fn add(&mut self, job: Job) {
        self.list.push(job);
        self.prune();
    }

    /// Forgets the oldest finished jobs beyond KEEP_FINISHED.
    pub fn prune(&mut self) {
        let finished = self
            .list
            .iter()
            .filter(|j| j.state != JobState::Running)
            .count();
        let mut extra = finished.saturating_sub(KEEP_FINISHED);
        self.list.retain(|j| {
            if extra > 0 && j.state != JobState::Running {
                extra -= 1;
                false
            } else {
                true
            }
        });
    }

    /// INFO fields of the source side.
    pub fn info_fields(&self) -> Vec<(&'static str, String)> {
        let sum = |f: fn(&Job) -> u64| self.list.iter().map(f).sum::<u64>().to_string();
        vec![
            ("migrate_running_jobs", self.running().count().to_string()),
            ("migrate_jobs_started", (self.next_id - 1).to_string()),
            ("migrate_keys_moved", sum(|j| j.stats.keys_moved)),
            ("migrate_bytes_moved", sum(|j| j.stats.bytes_moved)),
            ("migrate_keys_in_flight", sum(|j| j.tracked.len() as u64)),
            ("migrate_keys_frozen", sum(|j| j.frozen.len() as u64)),
            (
                "migrate_leftover_keys",
                with_leftovers(|l| l.values().map(|s| s.len()).sum::<usize>()).to_string(),
            ),
        ]
    }

    /// A FLUSHDB (Some(db)) or FLUSHALL (None): every key in flight changed.
    pub fn note_flush(&mut self, db: Option<usize>) {
        for j in self.list.iter_mut() {
            if j.state == JobState::Running && db.is_none_or(|d| d == j.db) {
                for t in j.tracked.values_mut() {
                    t.dirty = true;
                }
            }
        }
    }

    /// Abandons the running jobs of these databases (SWAPDB).
    pub fn stop_for_db(&mut self, dbs: &[usize], reason: &str) {
        for j in self.list.iter_mut() {
            if j.state == JobState::Running && dbs.contains(&j.db) {
                j.abandon(reason);
            }
        }
    }

    /// Marks `key` of `db` as changed, for every running job tracking it.
    ///
    /// A key waiting for its delete is moved: a write that reaches it here
    /// anyway is sent again, but its expiry or eviction here only does the
    /// pending delete's work. Sending that on (a DEL) would delete the
    /// target's copy, which is the key now, and may have been written
    /// since through -ASK (its own expiry time is the same as here).
    pub fn note_change(&mut self, db: usize, key: &[u8], event: &[u8]) {
        let vanished = matches!(event, b"expired" | b"evicted");
        // A hash field's expiry: the target's copy carries the same expiry
        // time (FIELDTTL, or DUMP), so it changes the same way there; the
        // key itself still waits for its delete here.
        let field_expired = event == b"hexpired";
        for j in self.list.iter_mut() {
            if j.state == JobState::Running && j.db == db {
                if let Some(t) = j.tracked.get_mut(key) {
                    t.dirty = true;
                } else if !field_expired && j.deleting.remove(key) && !vanished {
                    j.revived.push(key.to_vec());
                }
            }
        }
    }
}

impl Job {
    pub fn new(id: u64, source_id: String, db: usize, scope: Scope, opts: Options) -> Job {
        Job {
            id,
            source_id,
            db,
            target: opts.endpoint.addr(),
            host: opts.endpoint.host.clone(),
            port: opts.endpoint.port,
            state: JobState::Running,
            scope,
            opts,
            links: Vec::new(),
            tracked: HashMap::new(),
            tracked_per_slot: HashMap::new(),
            resend: VecDeque::new(),
            frozen: HashSet::new(),
            to_delete: Vec::new(),
            acks: VecDeque::new(),
            deleting: HashSet::new(),
            revived: Vec::new(),
            ending: None,
            abandoned: false,
            target_run_id: None,
            stats: JobStats::default(),
            started_at_ms: now_ms(),
            started: Instant::now(),
            ended: None,
        }
    }

    /// Opens the connections (threads; they connect in the background).
    pub fn connect(&mut self) -> Result<(), String> {
        for _ in 0..self.opts.parallel.max(1) {
            let conn = Conn::open(self.opts.endpoint.clone())?;
            self.links.push(Link {
                conn,
                builder: BatchBuilder::new(),
                building: Vec::new(),
                in_flight: VecDeque::new(),
                big: Vec::new(),
            });
        }
        Ok(())
    }

    pub fn elapsed(&self) -> Duration {
        self.ended.unwrap_or_else(Instant::now) - self.started
    }

    pub fn is_in_flight(&self, key: &[u8]) -> bool {
        self.tracked.contains_key(key)
    }

    /// Acknowledged and about to be deleted here: for clients, moved.
    pub fn is_moved(&self, key: &[u8]) -> bool {
        self.deleting.contains(key)
    }

    /// Keys written here after their acknowledgement: tracked again and
    /// queued, so the target gets the new value (their copy there stays
    /// until it is replaced).
    fn revive(&mut self) {
        for key in std::mem::take(&mut self.revived) {
            let slot = with_state(|s| s.slot(&key));
            let t = self.track(&key, slot);
            t.sent = true;
            self.stats.keys_moved = self.stats.keys_moved.saturating_sub(1);
            self.requeue(&key);
        }
    }

    pub fn keys_in_flight(&self) -> usize {
        self.tracked.len()
    }

    /// Keys still to move: in the job's slots (index counts) or named keys
    /// not yet done.
    pub fn keys_remaining(&self) -> u64 {
        match &self.scope {
            Scope::Slots { slots, .. } => with_state(|s| {
                s.db(self.db)
                    .map_or(0, |d| slots.iter().map(|&sl| d.count(sl)).sum())
            }),
            Scope::Keys { queue, .. } => (queue.len() + self.tracked.len()) as u64,
        }
    }

    /// (keys/s, bytes/s) over the last few seconds.
    pub fn rates(&self) -> (u64, u64) {
        let now = (
            Instant::now(),
            self.stats.keys_moved,
            self.stats.bytes_moved,
        );
        let Some(first) = self.stats.samples.front() else {
            return (0, 0);
        };
        let end = if self.state == JobState::Running {
            now
        } else {
            *self.stats.samples.back().unwrap_or(first)
        };
        let dt = end.0.duration_since(first.0).as_secs_f64();
        if dt <= 0.0 {
            return (0, 0);
        }
        (
            ((end.1 - first.1) as f64 / dt) as u64,
            ((end.2 - first.2) as f64 / dt) as u64,
        )
    }

    fn sample(&mut self) {
        let now = Instant::now();
        if self
            .stats
            .samples
            .back()
            .is_none_or(|s| now.duration_since(s.0) >= Duration::from_secs(1))
        {
            self.stats
                .samples
                .push_back((now, self.stats.keys_moved, self.stats.bytes_moved));
            while self.stats.samples.len() > 6 {
                self.stats.samples.pop_front();
            }
        }
    }

    /// Whether `key` is handled by this job (for -ASK): a slot of the job's,
    /// or one of its named keys.
    pub fn covers(&self, slot: usize, key: &[u8]) -> bool {
        match &self.scope {
            Scope::Slots { slots, .. } => slots.contains(&slot),
            Scope::Keys { all, .. } => all.contains(key),
        }
    }

    /// The slots the job moves keys of: its slots, or those its named keys
    /// hash to (a new slot job must not overlap either).
    pub fn touched_slots(&self) -> HashSet<usize> {
        match &self.scope {
            Scope::Slots { slots, .. } => slots.iter().copied().collect(),
            Scope::Keys { all, .. } => with_state(|s| all.iter().map(|k| s.slot(k)).collect()),
        }
    }

    /// Stops the job: no more batches, connections closed. Acknowledged
    /// deletes still pending are done before it ends.
    pub fn stop(&mut self, state: JobState) {
        if self.ending.is_none() && self.state == JobState::Running {
            if let JobState::Failed(e) = &state {
                self.stats.errors += 1;
                self.stats.last_error = e.clone();
                redis_module::logging::log_warning(format!(
                    "slots: migration job {} to {} failed: {e}; {} keys not acknowledged stay on this server",
                    self.id,
                    self.target,
                    self.tracked.len()
                ));
            }
            let cancelled = state == JobState::Cancelled;
            self.ending = Some(state);
            if cancelled {
                // The last batch deletes the target's copies of every key
                // not acknowledged yet, so no later reply may count one of
                // them as moved (it would then be gone from both servers):
                // `step` takes no more replies once cancelled.
                self.acks.clear();
                self.abort_staged();
            } else {
                for l in &mut self.links {
                    l.conn.close();
                }
            }
        }
    }

    /// The target's run id is known: keys an earlier job may have left on
    /// it, within this job's scope and not already in flight here, are
    /// tracked as sent and queued first. Present here, they are sent again
    /// (REPLACE); gone, they get a DEL record (`start_key`).
    fn adopt_leftovers(&mut self, run_id: &str) {
        if self.target_run_id.is_some() {
            return;
        }
        self.target_run_id = Some(run_id.to_string());
        if run_id.is_empty() {
            return;
        }
        let mine: Vec<Vec<u8>> = with_leftovers(|l| {
            let Some(set) = l.get_mut(&(run_id.to_string(), self.db)) else {
                return Vec::new();
            };
            let mine: Vec<Vec<u8>> = set
                .iter()
                .filter(|k| self.covers(with_state(|s| s.slot(k)), k))
                .cloned()
                .collect();
            for k in &mine {
                set.remove(k);
            }
            if set.is_empty() {
                l.remove(&(run_id.to_string(), self.db));
            }
            mine
        });
        for k in mine {
            if self.tracked.contains_key(&k) || self.deleting.contains(&k) {
                continue;
            }
            let slot = with_state(|s| s.slot(&k));
            let t = self.track(&k, slot);
            t.sent = true;
            self.resend.push_back(k);
        }
    }

    /// Stops the job without deleting anything more: the names it holds no
    /// longer denote the keys it sent. SWAPDB put another dataset under the
    /// job's database number (and fires no per-key events, so acknowledged
    /// keys would look unchanged); a load replaced the dataset; the server
    /// became a replica, whose data only its primary may change. Keys
    /// acknowledged but not yet deleted stay on both servers, as after any
    /// interruption (MIGRATION.md), and the next job sends them again.
    pub fn abandon(&mut self, reason: &str) {
        self.stop(JobState::Failed(reason.to_string()));
        self.abandoned = true;
        self.acks.clear();
        self.to_delete.clear();
        self.deleting.clear();
        self.revived.clear();
    }

    /// On cancel, the connections are still good: one last batch per link
    /// takes back what the target may hold of keys not acknowledged -- an
    /// ABORT drops a half-sent big key's staging key, a DEL any copy a
    /// batch in flight delivered (the key stays here) -- then each
    /// connection ends after it. The records not yet sent are dropped.
    /// Replies are not read: the keys also become leftovers (`finish`).
    fn abort_staged(&mut self) {
        for l in &mut self.links {
            l.big.clear();
            l.building.clear();
            l.builder = BatchBuilder::new();
        }
        for (key, t) in &self.tracked {
            if let (true, Some(l)) = (t.sent, self.links.get_mut(t.link)) {
                if t.staged {
                    l.builder.abort(key);
                }
                l.builder.del(key);
            }
        }
        for l in &mut self.links {
            if !l.builder.is_empty() {
                let _ = l.conn.send(l.builder.finish(self.source_id.as_bytes()));
            }
            l.conn.close_after_queued();
        }
    }

    fn untrack(&mut self, key: &[u8]) -> Option<Tracked> {
        let t = self.tracked.remove(key)?;
        if let Some(n) = self.tracked_per_slot.get_mut(&t.slot) {
            *n -= 1;
            if *n == 0 {
                self.tracked_per_slot.remove(&t.slot);
            }
        }
        Some(t)
    }

    fn track(&mut self, key: &[u8], slot: usize) -> &mut Tracked {
        if !self.tracked.contains_key(key) {
            *self.tracked_per_slot.entry(slot).or_default() += 1;
        }
        self.tracked.entry(key.to_vec()).or_insert(Tracked {
            slot,
            generation: 0,
            dirty: false,
            resends: 0,
            phase: Phase::Queued,
            staged: false,
            link: 0,
            sent: false,
            removing: false,
            bytes: 0,
        })
    }

    /// Sends `key` again (new generation); freezes it after MAX_RESENDS.
    fn requeue(&mut self, key: &[u8]) {
        let Some(t) = self.tracked.get_mut(key) else {
            return;
        };
        t.generation += 1;
        t.resends += 1;
        t.dirty = false;
        t.phase = Phase::Queued;
        self.stats.keys_resent += 1;
        if t.resends >= MAX_RESENDS {
            self.frozen.insert(key.to_vec());
        }
        // A big key being streamed stops; its staging key is abandoned.
        for l in &mut self.links {
            l.big.retain(|(_, b)| b.key != key);
        }
        self.resend.push_back(key.to_vec());
    }

    /// Moves the replies received so far into `acks` (pairing each result
    /// with its record is cheap; the bookkeeping per key is done by
    /// `apply_acks`, within the step's deadline).
    fn take_replies(&mut self) {
        let mut failure = None;
        let mut ready = None;
        let acks = &mut self.acks;
        for l in &mut self.links {
            while let Ok(ev) = l.conn.events.try_recv() {
                match ev {
                    Event::Reply(items) => {
                        let Some(records) = l.in_flight.pop_front() else {
                            failure = Some("reply without a batch".to_string());
                            break;
                        };
                        if items.len() != records.len() {
                            failure = Some(format!(
                                "target replied {} results to a batch of {} records",
                                items.len(),
                                records.len()
                            ));
                            break;
                        }
                        for (r, item) in records.into_iter().zip(items) {
                            match item {
                                Item::Int(code) => acks.push_back(Ack {
                                    key: r.key,
                                    generation: r.generation,
                                    last: r.last,
                                    code,
                                }),
                                Item::Error(e) => {
                                    failure = Some(format!(
                                        "target failed to restore key '{}': {e}",
                                        String::from_utf8_lossy(&r.key)
                                    ));
                                }
                            }
                        }
                    }
                    Event::Ready(run_id) => ready = Some(run_id),
                    Event::Rejected(e) => failure = Some(format!("target rejected a batch: {e}")),
                    Event::Failed(e) => failure = Some(format!("connection to target: {e}")),
                }
                if failure.is_some() {
                    break;
                }
            }
        }
        if let Some(run_id) = ready {
            self.adopt_leftovers(&run_id);
        }
        if let Some(e) = failure {
            self.stop(JobState::Failed(e));
        }
    }

    /// Acts on acknowledgements until `deadline` (a full window of replies
    /// is ~1000 keys: more than one step's worth of bookkeeping); the rest
    /// waits for the next step, still counted as in flight.
    fn apply_acks(&mut self, deadline: Instant) {
        let mut failure = None;
        let mut n = 0usize;
        while !self.acks.is_empty() {
            n += 1;
            if n.is_multiple_of(32) && Instant::now() >= deadline {
                break;
            }
            let Some(Ack {
                key,
                generation,
                last,
                code,
            }) = self.acks.pop_front()
            else {
                break;
            };
            let Some(t) = self.tracked.get(&key) else {
                continue;
            };
            if t.generation != generation {
                continue; // a reply to an older try of this key
            }
            match code {
                -1 => self.requeue(&key),
                0 | 1 if last && t.removing => {
                    self.untrack(&key);
                }
                0 | 1 if last => {
                    if t.dirty {
                        self.requeue(&key);
                    } else if let Some(t) = self.untrack(&key) {
                        self.stats.keys_moved += 1;
                        self.stats.bytes_moved += t.bytes;
                        self.frozen.remove(&key);
                        forget_leftover(self.db, &key);
                        self.deleting.insert(key.clone());
                        self.to_delete.push(key);
                    }
                }
                0 | 1 => {}
                c => {
                    failure = Some(format!("unexpected result {c} from target"));
                    break;
                }
            }
        }
        if let Some(e) = failure {
            self.stop(JobState::Failed(e));
        }
    }

    /// Deletes acknowledged keys (propagated UNLINK).
    fn delete_acknowledged(&mut self, ctx: Ctx, deadline: Instant) {
        while !self.to_delete.is_empty() && Instant::now() < deadline {
            if ffi::writes_paused() {
                return;
            }
            let n = self.to_delete.len().min(DELETE_BATCH);
            let batch: Vec<Vec<u8>> = self
                .to_delete
                .drain(..n)
                .filter(|k| self.deleting.remove(k))
                .collect();
            if let Err(e) = ffi::unlink(ctx, &batch) {
                redis_module::logging::log_warning(format!(
                    "slots: migration job {}: deleting moved keys failed: {e}",
                    self.id
                ));
            }
        }
    }

    /// The next key to start, if any.
    fn next_key(&mut self) -> Option<Vec<u8>> {
        if let Some(k) = self.resend.pop_front() {
            return Some(k);
        }
        let db = self.db;
        match &mut self.scope {
            Scope::Keys { queue, .. } => {
                while let Some(k) = queue.pop_front() {
                    // As in the slot walk: a key waiting for its delete
                    // (an adopted leftover sent first) is moved.
                    if !self.tracked.contains_key(&k) && !self.deleting.contains(&k) {
                        return Some(k);
                    }
                }
                None
            }
            Scope::Slots {
                pending,
                parked,
                cursor,
                candidates,
                ..
            } => {
                let per_slot = &self.tracked_per_slot;
                loop {
                    while let Some(k) = candidates.pop_front() {
                        // An acknowledged key waiting for its delete is
                        // moved: sending it again could overwrite a write
                        // made on the target since.
                        if !self.tracked.contains_key(&k) && !self.deleting.contains(&k) {
                            return Some(k);
                        }
                    }
                    let &slot = pending.front()?;
                    let (next, done_slot) = with_state(|s| {
                        let Some(set) = s.db(db).and_then(|d| d.keys(slot)) else {
                            return (0, true);
                        };
                        let mut c = *cursor;
                        let mut steps = 0;
                        loop {
                            c = set.scan_step(c, &mut |k| candidates.push_back(k.to_vec()));
                            steps += 1;
                            if c == 0 || candidates.len() >= 64 || steps >= 64 {
                                break;
                            }
                        }
                        (c, c == 0)
                    });
                    *cursor = next;
                    if done_slot {
                        pending.pop_front();
                        *cursor = 0;
                        // Look again later if keys remain (in flight, or
                        // added behind the cursor).
                        let count = with_state(|s| s.db(db).map_or(0, |d| d.count(slot)));
                        let tracked = per_slot.get(&slot).copied().unwrap_or(0);
                        if count > 0 || tracked > 0 {
                            parked.push(slot);
                        }
                    }
                    if candidates.is_empty() && pending.is_empty() {
                        return None;
                    }
                }
            }
        }
    }

    /// Parked slots come back to the walk once they hold keys that are not
    /// in flight (once per step: there may be many of them). Not while
    /// acknowledged keys wait for their delete (writes paused): the index
    /// still counts them, and the walk would find only them.
    fn unpark(&mut self) {
        if !self.to_delete.is_empty() {
            return;
        }
        let db = self.db;
        let per_slot = &self.tracked_per_slot;
        if let Scope::Slots {
            pending, parked, ..
        } = &mut self.scope
        {
            if parked.is_empty() {
                return;
            }
            let mut back = Vec::new();
            with_state(|s| {
                parked.retain(|&sl| {
                    let count = s.db(db).map_or(0, |d| d.count(sl)) as usize;
                    let tracked = per_slot.get(&sl).copied().unwrap_or(0);
                    if count == 0 && tracked == 0 {
                        return false;
                    }
                    if count > tracked {
                        back.push(sl);
                        return false;
                    }
                    true
                })
            });
            pending.extend(back);
        }
    }

    fn scope_exhausted(&self) -> bool {
        match &self.scope {
            Scope::Keys { queue, .. } => queue.is_empty(),
            Scope::Slots {
                pending,
                parked,
                candidates,
                ..
            } => pending.is_empty() && parked.is_empty() && candidates.is_empty(),
        }
    }

    /// The link for a new key: the least loaded with room.
    fn pick_link(&self) -> Option<usize> {
        (0..self.links.len())
            .filter(|&i| self.links[i].has_room())
            .min_by_key(|&i| (self.links[i].in_flight.len(), self.links[i].big.len()))
    }

    fn flush(&mut self, i: usize) {
        let l = &mut self.links[i];
        if l.builder.is_empty() {
            return;
        }
        let batch = l.builder.finish(self.source_id.as_bytes());
        let records = std::mem::take(&mut l.building);
        l.in_flight.push_back(records);
        self.stats.batches_sent += 1;
        if !l.conn.send(batch) {
            // The thread ended; its Failed event explains why.
        }
    }

    fn maybe_flush(&mut self, i: usize) {
        let b = &self.links[i].builder;
        if b.bytes() >= BATCH_BYTES || b.records() >= BATCH_RECORDS {
            self.flush(i);
        }
    }

    /// Starts `key` on link `i`.
    fn start_key(&mut self, ctx: Ctx, key: Vec<u8>, i: usize, slot: usize) -> u64 {
        let limits = self.opts.limits;
        let before = self.links[i].builder.bytes();
        let started = serializer::start(ctx, &key, limits, &mut self.links[i].builder);
        let staged = self.tracked.get(&key).is_some_and(|t| t.staged);
        match started {
            Ok(Start::Gone) => {
                // Deleted or expired meanwhile: nothing to move. But if an
                // earlier try reached the target, its copy must go too (a
                // client's DEL here must not be undone there): ABORT any
                // staging key, DEL the key, and keep the key tracked --
                // redirect.rs answers -TRYAGAIN, not -ASK, for it -- until
                // the target acknowledges.
                self.stats.keys_skipped += 1;
                self.frozen.remove(&key);
                let Some(t) = self.tracked.get_mut(&key).filter(|t| t.sent) else {
                    self.untrack(&key);
                    return 0;
                };
                t.removing = true;
                t.phase = Phase::Sent;
                t.dirty = false;
                t.link = i;
                let generation = t.generation;
                let l = &mut self.links[i];
                if staged {
                    l.builder.abort(&key);
                    l.building.push(SentRecord {
                        key: key.clone(),
                        generation,
                        last: false,
                    });
                }
                l.builder.del(&key);
                l.building.push(SentRecord {
                    key,
                    generation,
                    last: true,
                });
                0
            }
            Ok(Start::Whole { bytes }) => {
                let t = self.track(&key, slot);
                t.sent = true;
                t.removing = false;
                t.link = i;
                t.phase = Phase::Sent;
                t.dirty = false;
                t.bytes = bytes;
                let generation = t.generation;
                self.links[i].building.push(SentRecord {
                    key,
                    generation,
                    last: true,
                });
                (self.links[i].builder.bytes() - before) as u64
            }
            Ok(Start::Big(cursor)) => {
                let t = self.track(&key, slot);
                t.phase = Phase::Streaming;
                t.dirty = false;
                t.staged = true;
                t.sent = true;
                t.removing = false;
                t.link = i;
                t.bytes = 0;
                let generation = t.generation;
                self.stats.big_keys += 1;
                self.links[i].big.push((generation, cursor));
                0
            }
            Err(e) => {
                self.stop(JobState::Failed(format!(
                    "serializing key '{}': {e}",
                    String::from_utf8_lossy(&key)
                )));
                0
            }
        }
    }

    /// Advances one big key on link `i`; returns the bytes produced.
    fn step_big(&mut self, ctx: Ctx, i: usize, deadline: Instant) -> u64 {
        let limits = self.opts.limits;
        let (generation, mut cursor) = self.links[i].big.remove(0);
        let key = cursor.key.clone();
        let dirty = self.tracked.get(&key).is_none_or(|t| t.dirty);
        if dirty {
            // Changed while being read: start over (new generation).
            self.requeue(&key);
            return 0;
        }
        let records_before = self.links[i].builder.records();
        match cursor.step(ctx, limits, &mut self.links[i].builder, deadline) {
            Ok(r) => {
                // A step may write several records (a group, its consumers,
                // its pending entries); each gets a reply.
                let written = self.links[i].builder.records() - records_before;
                self.stats.chunks_sent += r.chunks;
                if let Some(t) = self.tracked.get_mut(&key) {
                    t.bytes += r.bytes;
                    if r.done {
                        t.phase = Phase::Sent;
                    }
                }
                for n in 0..written {
                    self.links[i].building.push(SentRecord {
                        key: key.clone(),
                        generation,
                        last: r.done && n + 1 == written,
                    });
                }
                if !r.done {
                    // Round robin with the link's other big keys.
                    self.links[i].big.push((generation, cursor));
                }
                r.bytes
            }
            Err(_) => {
                self.requeue(&key);
                0
            }
        }
    }

    /// One slice of work. Returns whether the job still runs.
    pub fn step(&mut self, ctx: Ctx, deadline: Instant, throttle: &mut Throttle) -> bool {
        let t0 = Instant::now();
        let cpu0 = ffi::thread_cpu_usec();
        let mut phases = StepPhases::default();
        if !self.abandoned && ffi::context_flags(ctx) & raw::REDISMODULE_CTX_FLAGS_SLAVE != 0 {
            self.abandon("this server became a replica");
        }
        if self.abandoned {
            self.finish();
            return false;
        }
        ffi::select_db(ctx, self.db);
        self.revive();
        // A cancelled job acts on no reply (see `stop`); an abandoned one
        // has ended above.
        if self.ending != Some(JobState::Cancelled) {
            self.take_replies();
        }
        let acks_before = self.acks.len();
        self.apply_acks(deadline);
        phases.acks = (acks_before - self.acks.len(), phases.lap());
        let deletes_before = self.to_delete.len();
        self.delete_acknowledged(ctx, deadline);
        phases.deletes = (deletes_before - self.to_delete.len(), phases.lap());
        if self.ending.is_none() {
            self.unpark();
            self.produce(ctx, deadline, throttle, &mut phases);
        }
        // Not done before a connection has named the target: its leftovers
        // (keys deleted here meanwhile) are only known then.
        if self.ending.is_none()
            && self.target_run_id.is_some()
            && self.scope_exhausted()
            && self.tracked.is_empty()
            && self.resend.is_empty()
            && self.links.iter().all(|l| l.in_flight.is_empty())
        {
            self.ending = Some(JobState::Done);
            for l in &mut self.links {
                l.conn.close();
            }
        }
        self.sample();
        // Wall time is what clients wait; CPU time separates our work from
        // time the thread was descheduled on a busy machine.
        let us = t0.elapsed().as_micros() as u64;
        self.stats.max_step_usec = self.stats.max_step_usec.max(us);
        let cpu = ffi::thread_cpu_usec().saturating_sub(cpu0);
        self.stats.max_step_cpu_usec = self.stats.max_step_cpu_usec.max(cpu);
        self.stats.steps += 1;
        self.stats.steps_over_1ms += u64::from(us > 1000);
        self.stats.steps_over_1ms_cpu += u64::from(cpu > 1000);
        let budget = config::step_budget().as_micros() as u64;
        if cpu > 2 * budget.max(500) {
            // Rare by design; when it happens, say where the time went.
            redis_module::logging::log_verbose(format!(
                "slots: migration job {}: step used {cpu} us CPU ({us} us wall, budget {budget} us): {}",
                self.id,
                phases.describe()
            ));
        }
        if self.can_finish() {
            self.finish();
            return false;
        }
        true
    }

    /// Stopping, and no acknowledged key is left to act on or delete.
    fn can_finish(&self) -> bool {
        self.ending.is_some() && self.to_delete.is_empty() && self.acks.is_empty()
    }

    fn produce(
        &mut self,
        ctx: Ctx,
        deadline: Instant,
        throttle: &mut Throttle,
        phases: &mut StepPhases,
    ) {
        let mut rr = 0usize;
        let mut keys = 0usize;
        let mut chunks = 0usize;
        // One clock read per boundary (key chosen, key serialized, batch
        // flushed) serves both the deadline and the overrun log line.
        let mut mark = Instant::now();
        while mark < deadline && self.ending.is_none() {
            if !throttle.allows() {
                break;
            }
            // Big keys first: they hold staging keys on the target.
            let n = self.links.len();
            let big_link = (0..n)
                .map(|k| (rr + k) % n)
                .find(|&i| !self.links[i].big.is_empty() && self.links[i].has_room());
            if let Some(i) = big_link {
                rr = i + 1;
                let bytes = self.step_big(ctx, i, deadline);
                chunks += 1;
                throttle.take(0, bytes);
                self.maybe_flush(i);
                mark = Instant::now();
                continue;
            }
            let Some(free) = self.pick_link() else {
                break;
            };
            let next = self.next_key();
            phases.pick_us += lap(&mut mark);
            let Some(key) = next else {
                break;
            };
            // Every try of a key goes on the link of its first try: the
            // target applies one connection's batches in order, so a later
            // copy can never be overwritten by an earlier one still in
            // flight (which would make the acknowledged copy stale).
            let i = self
                .tracked
                .get(&key)
                .filter(|t| t.sent)
                .map_or(free, |t| t.link);
            let slot = with_state(|s| s.slot(&key));
            let bytes = self.start_key(ctx, key, i, slot);
            let us = lap(&mut mark);
            if us > phases.slowest_key.0 {
                phases.slowest_key = (us, bytes);
            }
            keys += 1;
            throttle.take(1, bytes);
            self.maybe_flush(i);
            phases.mid_flush_us += lap(&mut mark);
        }
        // Ran out of time with work left: the cron comes back at once.
        if Instant::now() >= deadline && self.ending.is_none() {
            HUNGRY.store(true, Ordering::Relaxed);
        }
        phases.keys = (keys, phases.lap());
        phases.big_steps = chunks;
        let sent = self.stats.batches_sent;
        for i in 0..self.links.len() {
            if self.links[i].has_room() {
                self.flush(i);
            }
        }
        phases.flush = ((self.stats.batches_sent - sent) as usize, phases.lap());
    }

    /// Ends a stopped job at once when nothing is left to delete.
    pub fn finish_if_stopped(&mut self) {
        if self.can_finish() {
            self.finish();
        }
    }

    fn finish(&mut self) {
        self.state = self.ending.take().unwrap_or(JobState::Done);
        self.ended = Some(Instant::now());
        if let (true, Some(run_id)) = (
            self.state != JobState::Done && !self.abandoned,
            self.target_run_id.as_ref().filter(|r| !r.is_empty()),
        ) {
            let sent: Vec<Vec<u8>> = self
                .tracked
                .iter()
                .filter(|(_, t)| t.sent)
                .map(|(k, _)| k.clone())
                .collect();
            if !sent.is_empty() {
                with_leftovers(|l| l.entry((run_id.clone(), self.db)).or_default().extend(sent));
            }
        }
        self.frozen.clear();
        self.tracked.clear();
        self.tracked_per_slot.clear();
        self.resend.clear();
        self.deleting.clear();
        self.revived.clear();
        self.links.clear(); // closes the connections (threads end on their own)
        let (elapsed, moved, bytes) = (
            self.elapsed().as_millis(),
            self.stats.keys_moved,
            self.stats.bytes_moved,
        );
        redis_module::logging::log_notice(format!(
            "slots: migration job {} to {} {}: {moved} keys ({bytes} bytes) moved in {elapsed} ms{}",
            self.id,
            self.target,
            self.state.name(),
            match &self.state {
                JobState::Failed(e) => format!(", error: {e}"),
                _ => String::new(),
            }
        ));
        let state = self.state.name();
        for w in take_waiters(self.id) {
            let reply = Box::new(state);
            // SAFETY: each handle came from RedisModule_BlockClient and is
            // unblocked exactly once (drained from the list); the private
            // data is freed by the blocked client's free callback.
            unsafe {
                raw::RedisModule_UnblockClient.unwrap()(w.0, Box::into_raw(reply).cast());
            }
        }
    }
}

/// Abandons every running job (the dataset is replaced by a load).
pub fn stop_all(reason: &str) {
    with_jobs(|j| {
        for job in j.list.iter_mut() {
            if job.state == JobState::Running {
                job.abandon(reason);
            }
        }
    });
}

/// Whether any job needs the cron.
pub fn busy() -> bool {
    with_jobs(|j| j.any_running()) || transport::reap()
}

/// The cron's migration slice: every running job, within `deadline`.
/// Each job is taken out of the list while it runs, so that keyspace events
/// caused by our own calls (DUMP expiring a key, UNLINK of moved keys) find
/// the lock free and the job absent, and are ignored as they should be.
pub fn run(ctx: Ctx, deadline: Instant) -> bool {
    let ids: Vec<u64> = with_jobs(|j| j.running().map(|x| x.id).collect());
    let mut any = false;
    for id in ids {
        let taken = with_jobs(|j| {
            let pos = j.list.iter().position(|x| x.id == id)?;
            let throttle = std::mem::take(&mut j.throttle);
            Some((j.list.remove(pos), throttle, pos))
        });
        let Some((mut job, mut throttle, pos)) = taken else {
            continue;
        };
        let running = crate::ffi::guard(
            "migration job",
            || false,
            || job.step(ctx, deadline, &mut throttle),
        );
        if !running && job.state == JobState::Running {
            // A panic inside the step: fail the job, keep every key.
            job.stop(JobState::Failed(
                "internal error (see the server log)".into(),
            ));
            job.finish();
        }
        any |= running;
        with_jobs(|j| {
            j.throttle = throttle;
            let pos = pos.min(j.list.len());
            j.list.insert(pos, job);
        });
    }
    let still = with_jobs(|j| {
        j.prune();
        j.any_running()
    });
    if !still {
        crate::redirect::update();
    }
    any || still
}
