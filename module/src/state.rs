//! The module's global state and the one way to reach it.
//!
//! Every callback runs with the server lock held (the main thread, or a module
//! thread holding the GIL), so the Mutex is never contended. It exists to make
//! the state `Sync` and to catch re-entrancy: a callback that calls back into
//! the server (RM_Call, lookups) must release the state first, because the
//! server may deliver keyspace events to us from inside that call. `try_lock`
//! turns such a bug into a caught panic instead of a deadlock.

use std::sync::{Mutex, TryLockError};

use crate::commands::wait_for_index::Waiter;
use crate::del_job::DelQueue;
use crate::index::{DbIndex, IndexMode};
use crate::keys_job::KeysJobs;
use crate::rebuild::Build;
use crate::slot::HashFunction;

#[derive(Default)]
pub struct Stats {
    pub rebuilds: u64,
    pub last_rebuild_usec: u64,
    /// Times the index disagreed with the server's key count and a database
    /// was rebuilt (a key vanished without any event, e.g. another module's
    /// RM_DeleteKey).
    pub resyncs: u64,
}

pub struct State {
    pub hash: HashFunction,
    pub mode: IndexMode,
    dbs: Vec<Option<Box<DbIndex>>>,
    /// A dataset is being loaded: keyspace events are ignored until the
    /// rebuild at the end of loading.
    pub loading: bool,
    /// Databases whose index must be rebuilt from the keyspace by the cron.
    pub resync: Vec<usize>,
    /// Databases changed since the last end-of-iteration check.
    pub touched: Vec<usize>,
    /// A rebuild of the index from the keyspace in progress.
    pub build: Option<Build>,
    /// Clients whose command waits for the rebuild to end.
    pub waiting: Vec<Waiter>,
    pub del: DelQueue,
    pub keys_jobs: KeysJobs,
    pub stats: Stats,
}

impl State {
    pub fn new(hash: HashFunction, mode: IndexMode) -> State {
        State {
            hash,
            mode,
            dbs: Vec::new(),
            loading: false,
            resync: Vec::new(),
            touched: Vec::new(),
            build: None,
            waiting: Vec::new(),
            del: DelQueue::default(),
            keys_jobs: KeysJobs::default(),
            stats: Stats::default(),
        }
    }

    pub fn slot_count(&self) -> usize {
        self.hash.slot_count()
    }

    pub fn slot(&self, key: &[u8]) -> usize {
        self.hash.slot(key)
    }

    pub fn new_db_index(&self) -> DbIndex {
        DbIndex::new(self.mode, self.slot_count())
    }

    pub fn db(&self, db: usize) -> Option<&DbIndex> {
        self.dbs.get(db).and_then(|d| d.as_deref())
    }

    /// The index of `db`, created on first use (most servers use only db 0,
    /// and an index costs a slot table per database).
    pub fn db_mut(&mut self, db: usize) -> &mut DbIndex {
        if self.dbs.len() <= db {
            self.dbs.resize_with(db + 1, || None);
        }
        let fresh = || Box::new(DbIndex::new(self.mode, self.hash.slot_count()));
        self.dbs[db].get_or_insert_with(fresh)
    }

    /// The index of `db` together with the deletion queue, for code that
    /// walks a slot while advancing a deletion job's cursor.
    pub fn db_and_del(&mut self, db: usize) -> (Option<&DbIndex>, &mut DelQueue) {
        (self.dbs.get(db).and_then(|d| d.as_deref()), &mut self.del)
    }

    /// The rebuild in progress together with the (created on demand) index
    /// of `db`, for the rebuild's walk.
    pub fn build_and_db(&mut self, db: usize) -> (Option<&mut Build>, &mut DbIndex) {
        if self.dbs.len() <= db {
            self.dbs.resize_with(db + 1, || None);
        }
        let (mode, slots) = (self.mode, self.hash.slot_count());
        let idx = self.dbs[db].get_or_insert_with(|| Box::new(DbIndex::new(mode, slots)));
        (self.build.as_mut(), idx)
    }

    pub fn dbs(&self) -> impl Iterator<Item = (usize, &DbIndex)> {
        self.dbs
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.as_deref().map(|d| (i, d)))
    }

    pub fn dbs_mut(&mut self) -> impl Iterator<Item = &mut DbIndex> {
        self.dbs.iter_mut().filter_map(|d| d.as_deref_mut())
    }

    /// Replaces the index of `db`, returning the old one.
    pub fn replace_db(&mut self, db: usize, index: Option<Box<DbIndex>>) -> Option<Box<DbIndex>> {
        if self.dbs.len() <= db {
            self.dbs.resize_with(db + 1, || None);
        }
        std::mem::replace(&mut self.dbs[db], index)
    }

    pub fn take_all(&mut self) -> Vec<Box<DbIndex>> {
        self.dbs.iter_mut().filter_map(Option::take).collect()
    }

    pub fn swap_dbs(&mut self, a: usize, b: usize) {
        let n = a.max(b) + 1;
        if self.dbs.len() < n {
            self.dbs.resize_with(n, || None);
        }
        self.dbs.swap(a, b);
        self.del.swap_dbs(a, b);
        if let Some(b_) = self.build.as_mut() {
            b_.swap_dbs(a, b);
        }
    }

    pub fn keys_indexed(&self) -> u64 {
        self.dbs().map(|(_, d)| d.total()).sum()
    }

    pub fn index_bytes(&self) -> usize {
        std::mem::size_of::<State>()
            + self.dbs.capacity() * 8
            + self.dbs().map(|(_, d)| d.bytes()).sum::<usize>()
    }

    pub fn touch(&mut self, db: usize) {
        if self.touched.last() != Some(&db) && !self.touched.contains(&db) {
            self.touched.push(db);
        }
    }

    /// Every database with an index takes part in the next count check.
    pub fn touch_all(&mut self) {
        let dbs: Vec<usize> = self.dbs().map(|(db, _)| db).collect();
        for db in dbs {
            self.touch(db);
        }
    }

    pub fn request_resync(&mut self, db: usize) {
        if !self.resync.contains(&db) {
            self.resync.push(db);
        }
    }
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

pub fn init(state: State) {
    *STATE.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
}

/// Drops the state (MODULE UNLOAD), waiting for background frees: the code
/// they run is about to be unmapped.
pub fn shutdown() {
    let state = STATE.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(state);
    let pending = std::mem::take(&mut *FREEING.lock().unwrap_or_else(|e| e.into_inner()));
    for t in pending {
        let _ = t.join();
    }
}

/// Threads freeing old indexes.
static FREEING: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// Runs `f` with the state. Panics (caught by the callback's guard) if the
/// state is already borrowed, which would be a re-entrancy bug.
pub fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> R {
    let mut guard = match STATE.try_lock() {
        Ok(g) => g,
        // A panic while the state was held left it possibly half-updated:
        // keep serving, but rebuild every index from the keyspace.
        Err(TryLockError::Poisoned(p)) => {
            let mut g = p.into_inner();
            if let Some(s) = g.as_mut() {
                for db in 0..s.dbs.len() {
                    s.request_resync(db);
                }
            }
            STATE.clear_poison();
            g
        }
        Err(TryLockError::WouldBlock) => panic!("slots state re-entered"),
    };
    f(guard.as_mut().expect("slots module state used before load"))
}

/// Like `with_state` but gives up instead of panicking when the state is
/// busy (INFO during a crash report must not deadlock or panic).
pub fn try_with_state<R>(f: impl FnOnce(&State) -> R) -> Option<R> {
    let guard = STATE.try_lock().ok()?;
    guard.as_ref().map(f)
}

/// Frees indexes off the main thread when they are big: dropping millions of
/// entries takes tens of milliseconds (the same reason Redis has lazyfree).
pub fn free_in_background(indexes: Vec<Box<DbIndex>>) {
    let keys: u64 = indexes.iter().map(|d| d.total()).sum();
    if keys < 10_000 {
        drop(indexes);
        return;
    }
    let mut threads = FREEING.lock().unwrap_or_else(|e| e.into_inner());
    threads.retain(|t| !t.is_finished());
    match std::thread::Builder::new()
        .name("slots-free".into())
        .spawn(move || drop(indexes))
    {
        Ok(t) => threads.push(t),
        Err(e) => {
            // The closure (and the index in it) was dropped here, on the main thread.
            redis_module::logging::log_warning(format!(
                "slots: no thread to free the old index ({e}); freed it inline"
            ));
        }
    }
}
