//! The engine: a memfd-backed region with O(1) snapshots and a background
//! fold-back. See DESIGN.md for the protocol and its correctness argument.

use crate::sys::{self, PageRegion, Pagemap, Uffd, UffdMsg, PAGE};
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst,
};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const GIB: usize = 1 << 30;
/// The file grows in steps of this size (fewer ftruncate calls).
const GROW_STEP: usize = 2 << 20;
/// Old page tables are discarded one page table (2 MiB) at a time, between
/// forks, so a fork never waits long behind the teardown.
const UNMAP_CHUNK: usize = 2 << 20;
/// Before the flip: a lock probe slower than this means someone else held
/// the address-space lock (uncontended it takes a few microseconds).
const LOCK_BUSY: Duration = Duration::from_micros(100);
/// ...and the fold stops waiting for a free moment after this long in all.
const LOCK_WAIT_MAX: Duration = Duration::from_secs(1);

/// Engine states (`Inner::state`).
pub const STATE_IDLE: u8 = 0;
pub const STATE_SWITCHING: u8 = 1;
pub const STATE_SNAPSHOT: u8 = 2;
pub const STATE_FOLDING: u8 = 3;
/// A fold step failed; the heap stays a private mapping forever and forks
/// use stock `fork()` (correct, just not fast).
pub const STATE_DEGRADED: u8 = 4;

/// `async-fork no` at run time: the heap is a private mapping and forks are
/// stock `fork()`; the memfd is frozen. Re-enabling folds the heap back.
pub const STATE_STOCK: u8 = 5;

/// Fault-handler modes (`Inner::hmode`).
const H_IDLE: u8 = 0;
const H_TRACK: u8 = 1;
const H_FINAL: u8 = 2;

/// Deliberate bugs, used only by tests to prove the stress test catches a
/// wrong engine.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FaultInjection {
    #[default]
    None,
    /// Do not copy the last dirty pages before the flip.
    SkipFinalCopy,
    /// The fault handler forgets to record written pages.
    SkipDirtyTracking,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Address space reserved for the heap (rounded up to 1 GiB). Costs no
    /// memory; bounds how large the heap can ever grow.
    pub reserve_bytes: usize,
    /// Largest size the memfd may grow to; allocation beyond fails (OOM).
    pub max_bytes: usize,
    /// Open userfaultfd with `UFFD_USER_MODE_ONLY`, as an unprivileged
    /// process would have to; the engine must then refuse to start.
    pub simulate_unprivileged: bool,
    /// Stop iterating and flip when a round leaves at most this many dirty
    /// pages: they are copied while writers wait. Each cost the final step
    /// 4-8 us of CPU here (then a re-protect, a page-table scan and a copy
    /// per dirty run); under the latency harness' load at 1 GiB, 256 gave final steps
    /// of 3-129 pages and 0.33-1.05 ms, 32 gave 5-21 pages and 0.26-0.44 ms
    /// with fold times unchanged (bench/README.md, "Final step").
    pub final_max_pages: usize,
    /// Upper bound on background rounds before flipping anyway.
    pub max_rounds: usize,
    /// In the rounds, dirty runs at most this many pages apart are
    /// write-protected again with one call (the pages between are protected
    /// already, or dirty and recorded, so protecting them too is harmless).
    /// Each call that changes a page table flushes the TLB of every CPU
    /// running the process, i.e. interrupts the main thread (~25-45 us per
    /// call here), while a merged gap costs a page-table walk (~80 ns per
    /// page): 256 balances the two.
    pub protect_gap_pages: usize,
    #[doc(hidden)]
    pub fault_injection: FaultInjection,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            reserve_bytes: 64 * GIB,
            max_bytes: usize::MAX,
            simulate_unprivileged: false,
            final_max_pages: 32,
            max_rounds: 16,
            protect_gap_pages: 256,
            fault_injection: FaultInjection::None,
        }
    }
}

/// Why the engine is not available; the caller falls back to stock fork.
#[derive(Clone, Debug)]
pub struct Disabled {
    pub reason: String,
}

impl fmt::Display for Disabled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Disabled {}

fn disabled(reason: impl Into<String>) -> Disabled {
    Disabled {
        reason: reason.into(),
    }
}

/// Result of [`Engine::fork`], like the two returns of `fork()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forked {
    Parent(libc::pid_t),
    Child,
}

/// A snapshot of the engine's counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub state: u32,
    pub forks: u64,
    pub fork_failures: u64,
    /// Whole caller-visible stall of the last fork (switch + fork()).
    pub last_fork_usec: u64,
    pub max_fork_usec: u64,
    /// The page-table switch part of the last fork.
    pub last_switch_usec: u64,
    pub folds: u64,
    pub fold_errors: u64,
    /// Wall time of the last background fold (child exit to shared heap).
    pub last_fold_usec: u64,
    pub last_fold_rounds: u64,
    /// Time writers could be blocked in the last fold's final step.
    pub last_fold_final_usec: u64,
    pub last_fold_final_pages: u64,
    /// CPU time the fold thread used in that final step: far below
    /// `last_fold_final_usec` means it waited for a CPU, not for work.
    pub last_fold_final_cpu_usec: u64,
    /// `SCHED_FIFO` priority that final step ran at (0: normal scheduling).
    pub last_fold_final_priority: u64,
    /// Time the last fold waited, parking nobody, for the address-space lock
    /// to be free before its final step (see `fold_inner`).
    pub last_fold_lock_wait_usec: u64,
    /// Bytes the parent had written (copied-on-write) while the last child
    /// lived: the true copy-on-write cost of that snapshot.
    pub last_overlay_bytes: u64,
    pub total_overlay_bytes: u64,
    pub purge_refused: u64,
    pub region_bytes: u64,
    pub region_limit: u64,
    /// Flips that moved the shared heap's kept page tables back (the rest
    /// mapped it fresh; see `flip_shared`).
    pub flips_with_kept_tables: u64,
}

/// Runs the calling thread `SCHED_FIFO` at a priority until dropped (every
/// return path of the flip, errors included), then `SCHED_OTHER` again.
/// Priority 0, or a refused raise (no `CAP_SYS_NICE`), changes nothing.
struct FinalStepPriority(i32);

impl FinalStepPriority {
    fn raise(priority: i32) -> Self {
        let ok = priority > 0 && sys::set_thread_fifo(0, priority).is_ok();
        Self(if ok { priority } else { 0 })
    }

    /// The priority in force (0: normal scheduling).
    fn priority(&self) -> i32 {
        self.0
    }
}

impl Drop for FinalStepPriority {
    fn drop(&mut self) {
        if self.0 > 0 {
            let _ = sys::set_thread_fifo(0, 0);
        }
    }
}

/// What a successful fold reports (pages and the final step's cost).
struct Folded {
    overlay: usize,
    final_pages: usize,
    final_us: u64,
    final_cpu_us: u64,
    final_priority: i32,
}

#[derive(Default)]
struct Counters {
    forks: AtomicU64,
    fork_failures: AtomicU64,
    last_fork_usec: AtomicU64,
    max_fork_usec: AtomicU64,
    last_switch_usec: AtomicU64,
    folds: AtomicU64,
    fold_errors: AtomicU64,
    last_fold_usec: AtomicU64,
    last_fold_rounds: AtomicU64,
    last_fold_final_usec: AtomicU64,
    last_fold_final_pages: AtomicU64,
    last_fold_final_cpu_usec: AtomicU64,
    last_fold_final_priority: AtomicU64,
    last_fold_lock_wait_usec: AtomicU64,
    last_overlay_bytes: AtomicU64,
    total_overlay_bytes: AtomicU64,
    purge_refused: AtomicU64,
    flips_with_kept_tables: AtomicU64,
}

#[derive(Default)]
struct Jobs {
    fold: bool,
    /// Old page tables to drop: (start, length, populated prefix length).
    unmaps: VecDeque<(usize, usize, usize)>,
    /// Teardown steps popped but not finished.
    inflight: usize,
}

struct Inner {
    memfd: OwnedFd,
    /// H: the heap, always mapped over the whole reserve.
    base: usize,
    reserve: usize,
    /// M: a second shared view of the memfd; the fold writes through it.
    mview: usize,
    limit: usize,
    final_max_pages: usize,
    max_rounds: usize,
    protect_gap: usize,
    /// FORKPATCH_DEBUG_ROUNDS set at start: each fold round is described on
    /// stderr (pages, runs, protect calls, time).
    debug_rounds: bool,
    inject: FaultInjection,
    file_len: AtomicUsize,
    cursor: Mutex<usize>,
    state: AtomicU8,
    /// Set for the whole of `fork`: the worker starts no page-table teardown
    /// meanwhile (it would contend for the address-space lock).
    forking: AtomicBool,
    purgers: AtomicUsize,
    in_child: AtomicBool,
    uffd: Uffd,
    pagemap: Pagemap,
    /// One bit per heap page written while the fold tracks writes.
    dirty: sys::AtomicWords,
    hmode: AtomicU8,
    /// Odd while the handler processes a message (see `handler_quiesce`).
    hseq: AtomicU64,
    stop_fd: OwnedFd,
    shutdown: AtomicBool,
    jobs: Mutex<Jobs>,
    jobs_cv: Condvar,
    idle_mx: Mutex<()>,
    idle_cv: Condvar,
    child_pid: AtomicI32,
    /// Desired mode (`set_async`); applied at the next safe transition.
    want_async: AtomicBool,
    /// Children of stock forks (STOCK/DEGRADED) still alive: the memfd must
    /// stay frozen until they are gone (they refault from it).
    stock_pids: Mutex<Vec<libc::pid_t>>,
    /// An address range reserved in advance for the next switch: reserving
    /// 1 GiB-aligned space right after a teardown took 1-4 ms here, inside
    /// the fork stall.
    spare: Mutex<Option<usize>>,
    /// Reserving failed; retried after the next switch only.
    spare_failed: AtomicBool,
    /// The shared heap's page tables, moved aside by the switch and kept
    /// through the snapshot so the flip can move them back (see
    /// `flip_shared`). None outside a snapshot or fold, or when unusable.
    kept_shared: Mutex<Option<usize>>,
    /// Overlay size measured by the worker about once a second during a
    /// snapshot, for cheap reads (INFO).
    overlay_cached: AtomicUsize,
    degraded_reason: Mutex<Option<String>>,
    /// The fold thread's kernel tid (once it started) and the CPUs it should
    /// run on (`Engine::set_thread_cpus`; empty = any).
    fold_thread: Mutex<(Option<libc::pid_t>, Vec<usize>)>,
    /// The fault handler's kernel tid (known before `Engine::new` returns)
    /// and the real-time priority it runs at (0 = normal scheduling).
    handler_tid: AtomicI32,
    handler_priority: Mutex<i32>,
    c: Counters,
}

/// The async-fork engine. One per process in production (see `ffi`);
/// tests may create several, each owning its own region.
pub struct Engine {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

/// Merges runs of pages given in address order into fewer ranges, joining
/// runs at most `gap` bytes apart: `push` returns a finished range when a run
/// cannot join the pending one, `finish` the last. No allocation.
struct RunMerger {
    gap: usize,
    cur: Option<(usize, usize)>,
}

impl RunMerger {
    fn new(gap: usize) -> Self {
        RunMerger { gap, cur: None }
    }

    fn push(&mut self, off: usize, len: usize) -> Option<(usize, usize)> {
        match self.cur {
            Some((s, e)) if off <= e + self.gap => {
                self.cur = Some((s, e.max(off + len)));
                None
            }
            done => {
                self.cur = Some((off, off + len));
                done
            }
        }
    }

    fn finish(&mut self) -> Option<(usize, usize)> {
        self.cur.take()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn usec(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn ctx(stage: &'static str) -> impl FnOnce(io::Error) -> (String, io::Error) {
    move |e| (stage.to_string(), e)
}

impl Engine {
    /// Sets the engine up: probes every kernel feature the protocol needs
    /// and reserves the heap. Any failure returns the reason; nothing has
    /// been placed in the region yet, so the caller can use stock fork.
    pub fn new(cfg: Config) -> Result<Engine, Disabled> {
        if !sys::page_size_ok() {
            return Err(disabled("page size is not 4 KiB"));
        }
        let reserve = cfg.reserve_bytes.max(GIB).div_ceil(GIB) * GIB;
        let mut uffd = Uffd::open(cfg.simulate_unprivileged)
            .map_err(|e| disabled(format!("userfaultfd unavailable: {e}")))?;
        if !uffd.kernel_faults {
            return Err(disabled(
                "userfaultfd limited to user-mode faults (needs CAP_SYS_PTRACE, \
                 vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd); \
                 a syscall writing into the heap during fold-back would fail with EFAULT",
            ));
        }
        // EVENT_REMAP: without it the kernel cannot move whole page tables
        // of a registered range (it must clear uffd-wp bits entry by entry),
        // which makes the flip's mremap linear in heap size.
        let want = sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM
            | sys::UFFD_FEATURE_MINOR_SHMEM
            | sys::UFFD_FEATURE_MISSING_SHMEM
            | sys::UFFD_FEATURE_EVENT_REMAP;
        let got = uffd.api(want).map_err(|e| {
            disabled(format!(
                "UFFDIO_API refused shmem write-protect/minor faults (needs Linux >= 5.19): {e}"
            ))
        })?;
        if got & want != want {
            return Err(disabled(
                "kernel lacks userfaultfd write-protect or minor faults on shmem (needs Linux >= 5.19)",
            ));
        }
        let pagemap = Pagemap::open()
            .map_err(|e| disabled(format!("cannot open /proc/self/pagemap: {e}")))?;
        probe_primitives(&uffd, &pagemap)?;

        let memfd = sys::memfd_create(c"forkpatch-heap")
            .map_err(|e| disabled(format!("memfd_create: {e}")))?;
        let base = sys::reserve_aligned(reserve, GIB)
            .map_err(|e| disabled(format!("cannot reserve {reserve} bytes: {e}")))?;
        let mview = sys::reserve_aligned(reserve, GIB)
            .map_err(|e| disabled(format!("cannot reserve {reserve} bytes: {e}")))?;
        // SAFETY: base and mview are reservations we just made; nothing
        // references them.
        let mapped = unsafe {
            sys::map_fd_fixed(base, reserve, memfd.as_raw_fd(), true)
                .and_then(|_| sys::map_fd_fixed(mview, reserve, memfd.as_raw_fd(), true))
        };
        mapped.map_err(|e| disabled(format!("cannot map the heap memfd: {e}")))?;
        // Children must never get a writable view of the memfd.
        sys::madvise_nondestructive(mview, reserve, libc::MADV_DONTFORK)
            .map_err(|e| disabled(format!("MADV_DONTFORK: {e}")))?;
        // Trial switch on the real (still empty) heap: proves the private
        // mapping of the whole reserve is accepted by the commit policy.
        trial_switch(base, reserve, &memfd)?;
        let stop_fd = sys::eventfd().map_err(|e| disabled(format!("eventfd: {e}")))?;

        let words = (reserve / PAGE).div_ceil(64);
        let inner = Arc::new(Inner {
            memfd,
            base,
            reserve,
            mview,
            limit: cfg.max_bytes.min(reserve),
            final_max_pages: cfg.final_max_pages,
            max_rounds: cfg.max_rounds.max(1),
            protect_gap: cfg.protect_gap_pages * PAGE,
            debug_rounds: std::env::var_os("FORKPATCH_DEBUG_ROUNDS").is_some(),
            inject: cfg.fault_injection,
            file_len: AtomicUsize::new(0),
            cursor: Mutex::new(0),
            state: AtomicU8::new(STATE_IDLE),
            forking: AtomicBool::new(false),
            purgers: AtomicUsize::new(0),
            in_child: AtomicBool::new(false),
            uffd,
            pagemap,
            dirty: sys::AtomicWords::new(words)
                .map_err(|e| disabled(format!("dirty bitmap: {e}")))?,
            hmode: AtomicU8::new(H_IDLE),
            hseq: AtomicU64::new(0),
            stop_fd,
            shutdown: AtomicBool::new(false),
            jobs: Mutex::new(Jobs::default()),
            jobs_cv: Condvar::new(),
            idle_mx: Mutex::new(()),
            idle_cv: Condvar::new(),
            child_pid: AtomicI32::new(0),
            want_async: AtomicBool::new(true),
            stock_pids: Mutex::new(Vec::new()),
            overlay_cached: AtomicUsize::new(0),
            spare: Mutex::new(None),
            kept_shared: Mutex::new(None),
            spare_failed: AtomicBool::new(false),
            degraded_reason: Mutex::new(None),
            fold_thread: Mutex::new((None, Vec::new())),
            handler_tid: AtomicI32::new(0),
            handler_priority: Mutex::new(0),
            c: Counters::default(),
        });
        let h = inner.clone();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        // The fault handler does not follow the fold thread's CPU list: the
        // thread it serves is blocked in the fault meanwhile, so that
        // thread's CPU (a pinned main thread's) is the best place for it; on
        // a CPU shared with the fold thread each fault waited for the fold's
        // time slice (34-90 ms client stalls during folds at 1 GiB when both
        // were pinned away from the main thread).
        let handler = std::thread::Builder::new()
            .name("forkpatch-uffd".into())
            .spawn(move || {
                let _ = tid_tx.send(sys::gettid());
                h.handler_loop()
            })
            .map_err(|e| disabled(format!("cannot start the fault-handler thread: {e}")))?;
        let handler_tid = tid_rx
            .recv()
            .map_err(|_| disabled("the fault-handler thread died at start"))?;
        inner.handler_tid.store(handler_tid, SeqCst);
        let w = inner.clone();
        let worker = std::thread::Builder::new()
            .name("forkpatch-fold".into())
            .spawn(move || {
                w.register_fold_thread();
                w.worker_loop()
            })
            .map_err(|e| disabled(format!("cannot start the fold thread: {e}")))?;
        Ok(Engine {
            inner,
            threads: vec![handler, worker],
        })
    }

    /// Start of the heap region (1 GiB aligned).
    pub fn base(&self) -> usize {
        self.inner.base
    }

    pub fn reserve_bytes(&self) -> usize {
        self.inner.reserve
    }

    /// True if `addr` lies in the heap region.
    pub fn contains(&self, addr: usize) -> bool {
        addr >= self.inner.base && addr < self.inner.base + self.inner.reserve
    }

    /// True in a child created by [`Engine::fork`]: the region must not be
    /// grown or purged there (the memfd is the parent's snapshot).
    pub fn in_child(&self) -> bool {
        self.inner.in_child.load(SeqCst)
    }

    pub fn state(&self) -> u8 {
        self.inner.state.load(SeqCst)
    }

    /// Why the engine degraded to stock fork, if it did.
    pub fn degraded_reason(&self) -> Option<String> {
        lock(&self.inner.degraded_reason).clone()
    }

    /// Hands out `size` bytes of the region aligned to `align` (a power of
    /// two). Returns `None` when the region (or the memfd) cannot grow, or
    /// in a child: the caller treats that as out-of-memory / uses anonymous
    /// memory. Memory is zero-filled when first handed out.
    pub fn alloc(&self, size: usize, align: usize) -> Option<NonNull<u8>> {
        self.inner.alloc(size, align)
    }

    /// Releases the pages of `[addr, addr+len)` (page aligned, inside the
    /// region) back to the system; they read as zeros afterwards. Refused
    /// (returns false, contents unchanged) while a snapshot or a fold is in
    /// progress, because the memfd is then frozen.
    pub fn purge(&self, addr: usize, len: usize) -> bool {
        self.inner.purge(addr, len)
    }

    /// The fork replacement. In the parent, the main-thread stall is the
    /// O(1) switch plus a `fork()` that no longer copies the heap's page
    /// tables. If a fold of the previous snapshot is still running, waits
    /// for it when `wait`, else fails with EBUSY.
    pub fn fork(&self, wait: bool) -> io::Result<Forked> {
        self.inner.fork(wait)
    }

    /// Tells the engine the snapshot's child has exited and was reaped; the
    /// fold-back starts in the background. `pid <= 0` means "whatever child
    /// is current". Returns false if there was no such snapshot.
    pub fn child_exited(&self, pid: libc::pid_t) -> bool {
        self.inner.child_exited(pid)
    }

    /// `async-fork yes|no` at run time. `false` switches the heap to a
    /// private mapping (O(1), at once if idle, else when the current
    /// snapshot or fold ends) after which forks are stock `fork()`, with
    /// stock latency and copy-on-write. `true` folds the heap back in the
    /// background once no stock child is alive.
    /// Runs the engine's background thread (fold-back, page-table teardown,
    /// reservations) on `cpus` only, e.g. away from a server's pinned main
    /// thread: the fold's page-table walks and the teardown take
    /// milliseconds of CPU, and on the main thread's CPU they compete with
    /// it. The fault handler stays where it is (see `Engine::new`).
    /// Also applies if the thread has not started yet.
    pub fn set_thread_cpus(&self, cpus: &[usize]) -> io::Result<()> {
        if cpus.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut t = lock(&self.inner.fold_thread);
        if let Some(tid) = t.0 {
            sys::set_thread_affinity(tid, cpus)?;
        }
        t.1 = cpus.to_vec();
        Ok(())
    }

    /// Runs the fault handler `SCHED_FIFO` at `priority` (1-99), or with
    /// normal scheduling (0). During a fold every first write to a heap page
    /// waits for a round trip through this thread; as a normal task, woken
    /// on a CPU busy with the fold thread, the save child or anything else,
    /// it can wait out their time slice first (0.4 ms per fault on average
    /// under the latency harness' load, bench/README.md "Fourth run"). A
    /// real-time thread runs as soon as it is woken, for a few microseconds
    /// per fault.
    ///
    /// The forking thread is not raised: tried, a `SCHED_FIFO` main thread
    /// for the switch and `fork()` (to keep other tasks from getting in at
    /// the `cond_resched` points of the page-table copy) made the fork stall
    /// longer, 652-765 us against 382-560 us (1 GiB, 8 saves each).
    ///
    /// Needs `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` allowing `priority`; on
    /// error nothing changes.
    pub fn set_rt_priority(&self, priority: i32) -> io::Result<()> {
        if !(0..=99).contains(&priority) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut p = lock(&self.inner.handler_priority);
        sys::set_thread_fifo(self.inner.handler_tid.load(SeqCst), priority)?;
        *p = priority;
        Ok(())
    }

    /// The real-time priority set by `set_rt_priority` (0 = none).
    pub fn rt_priority(&self) -> i32 {
        *lock(&self.inner.handler_priority)
    }

    /// The fault handler's kernel tid.
    pub fn fault_handler_tid(&self) -> libc::pid_t {
        self.inner.handler_tid.load(SeqCst)
    }

    pub fn set_async(&self, on: bool) {
        self.inner.set_async(on)
    }

    pub fn async_enabled(&self) -> bool {
        self.inner.want_async.load(SeqCst)
    }

    /// Overlay bytes as last measured by the background thread (refreshed
    /// about once a second while a child lives; exact after each fold in
    /// `Stats::last_overlay_bytes`). Free to call.
    pub fn overlay_bytes_cached(&self) -> usize {
        match self.state() {
            STATE_SNAPSHOT | STATE_FOLDING => self.inner.overlay_cached.load(SeqCst),
            _ => 0,
        }
    }

    /// Memory held by the memfd's pages. The process RSS counts only the
    /// pages currently mapped, which after a fold-back is a fraction of them:
    /// add this (minus RssShmem) for a truthful resident figure.
    pub fn resident_bytes(&self) -> u64 {
        sys::allocated_bytes(&self.inner.memfd)
    }

    /// True while old page tables (from a switch or a flip) are still being
    /// torn down in the background. Forks are fine meanwhile, but back-to-back
    /// forks faster than the teardown let the backlog (and the number of
    /// mappings fork() walks) grow; benchmarks wait for this to clear.
    pub fn teardown_pending(&self) -> bool {
        let j = lock(&self.inner.jobs);
        !j.unmaps.is_empty() || j.inflight > 0
    }

    /// True while a snapshot or its fold is in progress (a new fork would
    /// wait or fail with EBUSY).
    pub fn busy(&self) -> bool {
        matches!(
            self.state(),
            STATE_SWITCHING | STATE_SNAPSHOT | STATE_FOLDING
        )
    }

    /// Waits until no fold is running. Returns false on timeout.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.inner.wait_not(STATE_FOLDING, timeout)
    }

    /// Bytes currently copied-on-write by the parent (0 when no snapshot).
    /// Walks the page tables (~16 ms/GiB): call it rarely.
    pub fn overlay_bytes(&self) -> usize {
        let i = &self.inner;
        if i.in_child.load(SeqCst)
            || !matches!(i.state.load(SeqCst), STATE_SNAPSHOT | STATE_FOLDING)
        {
            return 0;
        }
        let mut buf = vec![PageRegion::default(); 512];
        let len = i.file_len.load(SeqCst);
        i.pagemap
            .scan_anon(i.base, i.base + len, &mut buf, |_, _| {})
            .map(|p| p * PAGE)
            .unwrap_or(0)
    }

    pub fn stats(&self) -> Stats {
        let c = &self.inner.c;
        Stats {
            state: self.state() as u32,
            forks: c.forks.load(SeqCst),
            fork_failures: c.fork_failures.load(SeqCst),
            last_fork_usec: c.last_fork_usec.load(SeqCst),
            max_fork_usec: c.max_fork_usec.load(SeqCst),
            last_switch_usec: c.last_switch_usec.load(SeqCst),
            folds: c.folds.load(SeqCst),
            fold_errors: c.fold_errors.load(SeqCst),
            last_fold_usec: c.last_fold_usec.load(SeqCst),
            last_fold_rounds: c.last_fold_rounds.load(SeqCst),
            last_fold_final_usec: c.last_fold_final_usec.load(SeqCst),
            last_fold_final_pages: c.last_fold_final_pages.load(SeqCst),
            last_fold_final_cpu_usec: c.last_fold_final_cpu_usec.load(SeqCst),
            last_fold_final_priority: c.last_fold_final_priority.load(SeqCst),
            last_fold_lock_wait_usec: c.last_fold_lock_wait_usec.load(SeqCst),
            last_overlay_bytes: c.last_overlay_bytes.load(SeqCst),
            total_overlay_bytes: c.total_overlay_bytes.load(SeqCst),
            purge_refused: c.purge_refused.load(SeqCst),
            region_bytes: self.inner.file_len.load(SeqCst) as u64,
            region_limit: self.inner.limit as u64,
            flips_with_kept_tables: c.flips_with_kept_tables.load(SeqCst),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let i = &self.inner;
        if i.in_child.load(SeqCst) {
            return;
        }
        i.wait_not(STATE_FOLDING, Duration::from_secs(60));
        i.shutdown.store(true, SeqCst);
        sys::eventfd_signal(&i.stop_fd);
        i.jobs_cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let pending: Vec<_> = lock(&i.jobs)
            .unmaps
            .drain(..)
            .map(|(a, l, _)| (a, l))
            .collect();
        // SAFETY: the engine owns these ranges; region pointers handed out by
        // `alloc` are documented to die with the engine.
        unsafe {
            for (a, l) in pending {
                let _ = sys::munmap(a, l);
            }
            let _ = sys::munmap(i.base, i.reserve);
            if let Some(s) = lock(&i.spare).take() {
                let _ = sys::munmap(s, i.reserve);
            }
            if let Some(s) = lock(&i.kept_shared).take() {
                let _ = sys::munmap(s, i.reserve);
            }
            let _ = sys::munmap(i.mview, i.reserve);
        }
    }
}

/// Exercises every primitive once on a scratch memfd so that a kernel which
/// lacks one is detected at start-up, never in the middle of a fold.
fn probe_primitives(uffd: &Uffd, pagemap: &Pagemap) -> Result<(), Disabled> {
    const LEN: usize = 2 << 20;
    let fd = sys::memfd_create(c"forkpatch-probe")
        .map_err(|e| disabled(format!("memfd_create: {e}")))?;
    sys::ftruncate(&fd, LEN).map_err(|e| disabled(format!("ftruncate on memfd: {e}")))?;
    let a = sys::reserve_aligned(LEN, LEN).map_err(|e| disabled(format!("mmap: {e}")))?;
    let s = sys::reserve_aligned(LEN, LEN).map_err(|e| disabled(format!("mmap: {e}")))?;
    let r = (|| -> Result<(), Disabled> {
        // SAFETY: a and s are fresh reservations private to this function.
        unsafe {
            sys::map_fd_fixed(a, LEN, fd.as_raw_fd(), true)
                .map_err(|e| disabled(format!("mmap memfd: {e}")))?;
            (a as *mut u8).write_volatile(1);
            sys::mremap_dontunmap(a, LEN, s).map_err(|e| {
                disabled(format!(
                    "mremap(MREMAP_DONTUNMAP) on a shared mapping (needs Linux >= 5.13): {e}"
                ))
            })?;
            sys::map_fd_fixed(a, LEN, fd.as_raw_fd(), false)
                .map_err(|e| disabled(format!("private mmap of memfd: {e}")))?;
            if (a as *const u8).read_volatile() != 1 {
                return Err(disabled(
                    "private view of the memfd does not show its contents",
                ));
            }
            ((a + PAGE) as *mut u8).write_volatile(2);
        }
        let ioctls = uffd
            .register(a, LEN, sys::MODE_WP | sys::MODE_MINOR | sys::MODE_MISSING)
            .map_err(|e| {
                disabled(format!(
                    "userfaultfd register WP|MINOR|MISSING on a private shmem mapping: {e}"
                ))
            })?;
        const NEED: u64 = (1 << 0x02) | (1 << 0x06); // WAKE, WRITEPROTECT
        if ioctls & NEED != NEED {
            return Err(disabled("userfaultfd write-protect not supported on shmem"));
        }
        uffd.writeprotect(a, LEN, true, false)
            .map_err(|e| disabled(format!("UFFDIO_WRITEPROTECT on shmem: {e}")))?;
        uffd.wake(a, LEN)
            .map_err(|e| disabled(format!("UFFDIO_WAKE: {e}")))?;
        let mut buf = [PageRegion::default(); 4];
        let n = pagemap
            .scan_anon(a, a + LEN, &mut buf, |_, _| {})
            .map_err(|e| disabled(format!("PAGEMAP_SCAN (needs Linux >= 6.7): {e}")))?;
        if n != 1 {
            return Err(disabled(format!(
                "PAGEMAP_SCAN found {n} copied-on-write pages, expected 1"
            )));
        }
        uffd.unregister(a, LEN)
            .map_err(|e| disabled(format!("UFFDIO_UNREGISTER: {e}")))?;
        Ok(())
    })();
    // SAFETY: both ranges belong to this function and nothing points into
    // them any more.
    unsafe {
        let _ = sys::munmap(a, LEN);
        let _ = sys::munmap(s, LEN);
    }
    r
}

/// Switches the (empty) heap to private and back, so a commit-limit or
/// mremap refusal shows up at start-up.
fn trial_switch(base: usize, reserve: usize, memfd: &OwnedFd) -> Result<(), Disabled> {
    let s = sys::reserve_aligned(reserve, GIB)
        .map_err(|e| disabled(format!("cannot reserve switch area: {e}")))?;
    // SAFETY: the heap holds no data yet and nobody references it; s is ours.
    let r = unsafe {
        sys::mremap_dontunmap(base, reserve, s)
            .and_then(|_| sys::map_fd_fixed(base, reserve, memfd.as_raw_fd(), false))
            .and_then(|_| sys::map_fd_fixed(base, reserve, memfd.as_raw_fd(), true))
    };
    // SAFETY: s is ours and unreferenced.
    unsafe {
        let _ = sys::munmap(s, reserve);
    }
    r.map_err(|e| {
        disabled(format!(
            "trial switch of the heap to a private mapping failed: {e}"
        ))
    })
}

impl Inner {
    fn alloc(&self, size: usize, align: usize) -> Option<NonNull<u8>> {
        if self.in_child.load(SeqCst) || size == 0 || !align.is_power_of_two() {
            return None;
        }
        let align = align.max(PAGE);
        let size = size.checked_add(PAGE - 1)? & !(PAGE - 1);
        let mut cur = lock(&self.cursor);
        let start = cur.checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(size)?;
        if end > self.limit {
            return None;
        }
        let len = self.file_len.load(SeqCst);
        if end > len {
            let new_len = (end.div_ceil(GROW_STEP) * GROW_STEP).min(self.limit);
            sys::ftruncate(&self.memfd, new_len).ok()?;
            self.file_len.store(new_len, SeqCst);
        }
        *cur = end;
        NonNull::new((self.base + start) as *mut u8)
    }

    fn purge(&self, addr: usize, len: usize) -> bool {
        if self.in_child.load(SeqCst)
            || addr < self.base
            || !addr.is_multiple_of(PAGE)
            || !len.is_multiple_of(PAGE)
            || addr + len > self.base + self.file_len.load(SeqCst)
        {
            return false;
        }
        // Dekker handshake with `fork`: either fork sees us in `purgers` and
        // waits, or we see it left IDLE and refuse.
        self.purgers.fetch_add(1, SeqCst);
        let ok = self.state.load(SeqCst) == STATE_IDLE
            && sys::punch_hole(&self.memfd, addr - self.base, len).is_ok();
        self.purgers.fetch_sub(1, SeqCst);
        if !ok {
            self.c.purge_refused.fetch_add(1, SeqCst);
        }
        ok
    }

    fn wait_not(&self, st: u8, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.idle_mx);
        while self.state.load(SeqCst) == st {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .idle_cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    fn set_state(&self, st: u8) {
        let _g = lock(&self.idle_mx);
        self.state.store(st, SeqCst);
        self.idle_cv.notify_all();
    }

    fn fork(&self, wait: bool) -> io::Result<Forked> {
        if self.in_child.load(SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.forking.store(true, SeqCst);
        let r = self.fork_inner(wait);
        if !matches!(r, Ok(Forked::Child)) {
            self.forking.store(false, SeqCst);
        }
        r
    }

    fn fork_inner(&self, wait: bool) -> io::Result<Forked> {
        let t0 = Instant::now();
        loop {
            match self
                .state
                .compare_exchange(STATE_IDLE, STATE_SWITCHING, SeqCst, SeqCst)
            {
                Ok(_) => break,
                Err(STATE_DEGRADED | STATE_STOCK) => return self.stock_fork(t0),
                Err(STATE_FOLDING) if wait => {
                    self.wait_not(STATE_FOLDING, Duration::from_secs(3600));
                }
                Err(_) => return Err(io::Error::from_raw_os_error(libc::EBUSY)),
            }
        }
        let t_switch = Instant::now();
        let s = match self.switch_private() {
            Ok(s) => s,
            Err(e) => {
                self.set_state(STATE_IDLE);
                self.c.fork_failures.fetch_add(1, SeqCst);
                return Err(e);
            }
        };
        let switch_us = usec(t_switch.elapsed());
        self.overlay_cached.store(0, SeqCst);
        self.state.store(STATE_SNAPSHOT, SeqCst);
        match sys::fork() {
            Ok(0) => {
                self.in_child.store(true, SeqCst);
                Ok(Forked::Child)
            }
            Ok(pid) => {
                let us = usec(t0.elapsed());
                self.child_pid.store(pid, SeqCst);
                self.c.forks.fetch_add(1, SeqCst);
                self.c.last_fork_usec.store(us, SeqCst);
                self.c.max_fork_usec.fetch_max(us, SeqCst);
                self.c.last_switch_usec.store(switch_us, SeqCst);
                self.keep_shared(s);
                Ok(Forked::Parent(pid))
            }
            Err(e) => {
                // No child: fold the few pages written since the switch.
                self.c.fork_failures.fetch_add(1, SeqCst);
                self.keep_shared(s);
                self.start_fold();
                Err(e)
            }
        }
    }

    /// The O(1) switch of the heap from the shared to a private mapping of
    /// the memfd. The caller owns the SWITCHING state. Returns the address
    /// holding the old page tables, to be torn down in the background.
    fn switch_private(&self) -> io::Result<usize> {
        // A purge that saw IDLE may still be punching a hole; let it finish
        // so the frozen file is not modified under the child.
        while self.purgers.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        let spare = lock(&self.spare).take();
        let s = match spare {
            Some(s) => s,
            None => sys::reserve_aligned(self.reserve, GIB)?,
        };
        // The worker reserves the next one in the background, woken after
        // the fork (`queue_unmap`), not now: a thread of ours running on
        // another CPU during the mremap and the fork makes each of their TLB
        // flushes wait for an IPI to that CPU (perf: ~half of the mremap's
        // time was `smp_call_function_many_cond`).
        self.spare_failed.store(false, SeqCst);
        // SAFETY: s is a fresh reservation. Moving H's page tables away keeps
        // every byte of H reachable: H stays mapped to the same memfd and
        // refaults its pages from it. Replacing the now empty shared H by a
        // private mapping of the same file at the same offsets shows the
        // same bytes, so references into the heap stay valid.
        unsafe {
            if let Err(e) = sys::mremap_dontunmap(self.base, self.reserve, s) {
                let _ = sys::munmap(s, self.reserve);
                return Err(e);
            }
            if let Err(e) =
                sys::map_fd_fixed(self.base, self.reserve, self.memfd.as_raw_fd(), false)
            {
                // H is still the shared mapping with empty page tables, which
                // refault from the memfd: nothing was lost.
                self.queue_unmap(s);
                return Err(e);
            }
        }
        // The moved tables must not be copied into the child (that copy is
        // exactly the cost we avoid); if this fails fork is merely slower.
        let _ = sys::madvise_nondestructive(s, self.reserve, libc::MADV_DONTFORK);
        Ok(s)
    }

    /// Called first by the fold thread: records its tid and applies the CPU
    /// list if one was set before it started.
    fn register_fold_thread(&self) {
        let tid = sys::gettid();
        let mut t = lock(&self.fold_thread);
        if !t.1.is_empty() {
            let _ = sys::set_thread_affinity(tid, &t.1);
        }
        t.0 = Some(tid);
    }

    fn set_async(&self, on: bool) {
        self.want_async.store(on, SeqCst);
        if on {
            self.maybe_resume();
        } else {
            self.to_stock_if_idle();
        }
    }

    /// IDLE -> STOCK when async fork is unwanted.
    fn to_stock_if_idle(&self) {
        if self.want_async.load(SeqCst)
            || self
                .state
                .compare_exchange(STATE_IDLE, STATE_SWITCHING, SeqCst, SeqCst)
                .is_err()
        {
            return;
        }
        match self.switch_private() {
            Ok(s) => {
                self.queue_unmap(s);
                self.set_state(STATE_STOCK);
                self.maybe_resume();
            }
            Err(_) => self.set_state(STATE_IDLE),
        }
    }

    /// STOCK -> FOLDING when async fork is wanted again and no stock child
    /// still reads the memfd.
    fn maybe_resume(&self) {
        if !self.want_async.load(SeqCst) || !lock(&self.stock_pids).is_empty() {
            return;
        }
        if self
            .state
            .compare_exchange(STATE_STOCK, STATE_FOLDING, SeqCst, SeqCst)
            .is_ok()
        {
            lock(&self.jobs).fold = true;
            self.jobs_cv.notify_all();
        }
    }

    fn stock_fork(&self, t0: Instant) -> io::Result<Forked> {
        match sys::fork() {
            Ok(0) => {
                self.in_child.store(true, SeqCst);
                Ok(Forked::Child)
            }
            Ok(pid) => {
                let us = usec(t0.elapsed());
                lock(&self.stock_pids).push(pid);
                self.c.forks.fetch_add(1, SeqCst);
                self.c.last_fork_usec.store(us, SeqCst);
                self.c.max_fork_usec.fetch_max(us, SeqCst);
                self.c.last_switch_usec.store(0, SeqCst);
                Ok(Forked::Parent(pid))
            }
            Err(e) => Err(e),
        }
    }

    fn child_exited(&self, pid: libc::pid_t) -> bool {
        {
            let mut sp = lock(&self.stock_pids);
            if let Some(i) = sp.iter().position(|&p| p == pid) {
                sp.swap_remove(i);
                drop(sp);
                self.maybe_resume();
                return true;
            }
        }
        if pid > 0 && self.child_pid.load(SeqCst) != pid {
            return false;
        }
        if self.state.load(SeqCst) != STATE_SNAPSHOT {
            return false;
        }
        if !self.want_async.load(SeqCst) {
            // The heap is already private: that is the stock mode. No fold.
            self.set_state(STATE_STOCK);
            self.maybe_resume();
            return true;
        }
        self.start_fold();
        true
    }

    fn start_fold(&self) {
        self.set_state(STATE_FOLDING);
        lock(&self.jobs).fold = true;
        self.jobs_cv.notify_all();
    }

    /// Keeps the shared heap's tables moved aside by a switch until the
    /// flip (`flip_shared`) instead of tearing them down.
    fn keep_shared(&self, s: usize) {
        if let Some(old) = lock(&self.kept_shared).replace(s) {
            self.queue_unmap(old);
        }
    }

    /// Drops kept shared tables that no flip will use.
    fn drop_kept_shared(&self) {
        if let Some(k) = lock(&self.kept_shared).take() {
            self.queue_unmap(k);
        }
    }

    fn queue_unmap(&self, s: usize) {
        let populated = self.file_len.load(SeqCst);
        lock(&self.jobs)
            .unmaps
            .push_back((s, self.reserve, populated));
        self.jobs_cv.notify_all();
    }

    // ------------------------------------------------------------ threads

    fn worker_loop(&self) {
        enum Job {
            Fold,
            /// (start, length, drop the pages first)
            Unmap(usize, usize, bool),
            MeasureOverlay,
            Reserve,
        }
        loop {
            let job = {
                let mut j = lock(&self.jobs);
                loop {
                    if self.shutdown.load(SeqCst) {
                        return;
                    }
                    if j.fold {
                        j.fold = false;
                        break Job::Fold;
                    }
                    if !self.forking.load(SeqCst)
                        && !self.spare_failed.load(SeqCst)
                        && lock(&self.spare).is_none()
                    {
                        break Job::Reserve;
                    }
                    if let Some((a, l, left)) = j.unmaps.pop_front() {
                        j.inflight += 1;
                        if l > left {
                            // The part without page tables goes at once.
                            if left > 0 {
                                j.unmaps.push_front((a, left, left));
                            }
                            break Job::Unmap(a + left, l - left, false);
                        }
                        // The populated part goes one page table at a time,
                        // from the end: each step holds the address-space
                        // lock only briefly, and none starts during a fork.
                        let c = left.min(UNMAP_CHUNK);
                        if left > c {
                            j.unmaps.push_front((a, left - c, left - c));
                        }
                        break Job::Unmap(a + left - c, c, true);
                    }
                    let (g, t) = self
                        .jobs_cv
                        .wait_timeout(j, Duration::from_secs(1))
                        .unwrap_or_else(|e| e.into_inner());
                    j = g;
                    if t.timed_out() && self.state.load(SeqCst) == STATE_SNAPSHOT {
                        break Job::MeasureOverlay;
                    }
                }
            };
            if matches!(job, Job::Unmap(..)) {
                while self.forking.load(SeqCst) {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            match job {
                Job::Fold => self.fold(),
                Job::Unmap(a, l, discard) => {
                    // SAFETY: queued ranges are engine-owned leftovers of a
                    // switch or flip; nothing references them.
                    unsafe {
                        if discard {
                            sys::discard(a, l);
                        }
                        let _ = sys::munmap(a, l);
                    }
                    lock(&self.jobs).inflight -= 1;
                }
                Job::Reserve => match sys::reserve_aligned(self.reserve, GIB) {
                    Err(_) => self.spare_failed.store(true, SeqCst),
                    Ok(s) => {
                        let mut sp = lock(&self.spare);
                        if sp.is_none() {
                            *sp = Some(s);
                        } else {
                            drop(sp);
                            // SAFETY: s is the reservation we just made.
                            unsafe {
                                let _ = sys::munmap(s, self.reserve);
                            }
                        }
                    }
                },
                Job::MeasureOverlay => {
                    let mut buf = vec![PageRegion::default(); 512];
                    let len = self.file_len.load(SeqCst);
                    if let Ok(p) =
                        self.pagemap
                            .scan_anon(self.base, self.base + len, &mut buf, |_, _| {})
                    {
                        self.overlay_cached.store(p * PAGE, SeqCst);
                    }
                }
            }
        }
    }

    /// The userfaultfd handler. It must never allocate or take a lock: the
    /// thread it is serving may hold any lock (including the allocator's).
    fn handler_loop(&self) {
        let mut msgs = [UffdMsg::default(); 64];
        loop {
            let _ = sys::poll2(self.uffd.raw(), self.stop_fd.as_raw_fd());
            if self.shutdown.load(SeqCst) {
                return;
            }
            loop {
                let n = self.uffd.read_msgs(&mut msgs).unwrap_or_default();
                if n == 0 {
                    break;
                }
                for m in &msgs[..n] {
                    self.handle_msg(m);
                }
            }
        }
    }

    fn handle_msg(&self, m: &UffdMsg) {
        if m.event != sys::UFFD_EVENT_PAGEFAULT {
            return;
        }
        self.hseq.fetch_add(1, SeqCst);
        let page = (m.pf_address as usize) & !(PAGE - 1);
        let wp = m.pf_flags & sys::PF_FLAG_WP != 0;
        if wp
            && self.inject != FaultInjection::SkipDirtyTracking
            && page >= self.base
            && page < self.base + self.reserve
        {
            // Record before unprotecting: the fold re-copies every page
            // whose bit it sees, and sees every bit set before the write.
            let i = (page - self.base) / PAGE;
            self.dirty[i / 64].fetch_or(1 << (i % 64), SeqCst);
        }
        match self.hmode.load(SeqCst) {
            H_TRACK if wp => {
                if self.uffd.writeprotect(page, PAGE, false, false).is_err() {
                    let _ = self.uffd.wake(page, PAGE);
                }
            }
            // During the flip every faulting thread waits; the flip wakes
            // the whole heap once it is shared again.
            H_FINAL => {}
            _ => {
                let _ = self.uffd.wake(page, PAGE);
            }
        }
        self.hseq.fetch_add(1, SeqCst);
    }

    /// Returns once any message the handler was processing when called has
    /// been fully handled (its mode check and its unprotect are done).
    fn handler_quiesce(&self) {
        let s = self.hseq.load(SeqCst);
        if s & 1 == 1 {
            while self.hseq.load(SeqCst) == s {
                std::thread::yield_now();
            }
        }
    }

    // ------------------------------------------------------------ fold

    fn fold(&self) {
        let t0 = Instant::now();
        let mut rounds = 0u64;
        let r = self.fold_inner(&mut rounds);
        // A successful flip took them; a failed fold leaves them unused.
        self.drop_kept_shared();
        match r {
            Ok(Folded {
                overlay,
                final_pages,
                final_us,
                final_cpu_us,
                final_priority,
            }) => {
                let c = &self.c;
                c.folds.fetch_add(1, SeqCst);
                c.last_fold_usec.store(usec(t0.elapsed()), SeqCst);
                c.last_fold_rounds.store(rounds, SeqCst);
                c.last_fold_final_usec.store(final_us, SeqCst);
                c.last_fold_final_pages.store(final_pages as u64, SeqCst);
                c.last_fold_final_cpu_usec.store(final_cpu_us, SeqCst);
                c.last_fold_final_priority
                    .store(final_priority as u64, SeqCst);
                c.last_overlay_bytes.store((overlay * PAGE) as u64, SeqCst);
                c.total_overlay_bytes
                    .fetch_add((overlay * PAGE) as u64, SeqCst);
                self.set_state(STATE_IDLE);
                self.to_stock_if_idle();
            }
            Err((stage, e)) => {
                self.c.fold_errors.fetch_add(1, SeqCst);
                *lock(&self.degraded_reason) = Some(format!("fold failed at {stage}: {e}"));
                self.set_state(STATE_DEGRADED);
            }
        }
    }

    fn copy_out(&self, src_base: usize, addr: usize, len: usize) {
        let off = addr - src_base;
        // SAFETY: [addr, addr+len) lies in the heap (or its moved page
        // tables at src_base) below file_len, and the destination is the same
        // offset of M, which only the fold thread writes through. Both are
        // mapped for the engine's lifetime.
        unsafe { sys::copy_pages(addr, self.mview + off, len) }
    }

    /// Runs over the runs of set bits for pages below `limit`, clearing them
    /// if `clear`. Never allocates (usable while writers are blocked).
    fn dirty_runs(&self, limit: usize, clear: bool, mut f: impl FnMut(usize, usize)) -> usize {
        let pages = limit / PAGE;
        let mut run: Option<(usize, usize)> = None;
        let mut count = 0;
        for w in 0..pages.div_ceil(64) {
            // Plain load first: almost all words are zero and a locked
            // swap on each would cost ~100 us per 4 GiB in the final step.
            let mut bits = self.dirty[w].load(SeqCst);
            if bits == 0 {
                continue;
            }
            if clear {
                bits = self.dirty[w].swap(0, SeqCst);
            }
            for b in 0..64 {
                if bits & (1 << b) == 0 {
                    continue;
                }
                let p = w * 64 + b;
                count += 1;
                run = match run {
                    Some((s, e)) if e == p => Some((s, p + 1)),
                    Some((s, e)) => {
                        f(s * PAGE, (e - s) * PAGE);
                        Some((p, p + 1))
                    }
                    None => Some((p, p + 1)),
                };
            }
        }
        if let Some((s, e)) = run {
            f(s * PAGE, (e - s) * PAGE);
        }
        count
    }

    /// Write-protects the given runs (offsets from base, in address order),
    /// merged as `RunMerger` does. Returns the number of calls. Never
    /// allocates (usable while writers are parked).
    fn protect_runs(&self, runs: impl IntoIterator<Item = (usize, usize)>) -> io::Result<usize> {
        let mut calls = 0;
        let mut m = RunMerger::new(self.protect_gap);
        for (o, l) in runs {
            if let Some((s, e)) = m.push(o, l) {
                self.uffd.writeprotect(self.base + s, e - s, true, false)?;
                calls += 1;
            }
        }
        if let Some((s, e)) = m.finish() {
            self.uffd.writeprotect(self.base + s, e - s, true, false)?;
            calls += 1;
        }
        Ok(calls)
    }

    /// Background fold-back.
    fn fold_inner(&self, rounds: &mut u64) -> Result<Folded, (String, io::Error)> {
        let (base, reserve) = (self.base, self.reserve);
        let mut buf = vec![PageRegion::default(); 1024];
        let mut runs: Vec<(usize, usize)> = Vec::with_capacity(1024);
        let s2 = sys::reserve_aligned(reserve, GIB).map_err(ctx("reserve flip area"))?;

        // 1. Track writes: protect the whole used heap (installing markers
        //    on untouched pages), then copy every page copied-on-write during
        //    the snapshot. A write after the protect is recorded as dirty.
        self.uffd
            .register(base, reserve, sys::MODE_WP)
            .map_err(ctx("register WP"))?;
        self.hmode.store(H_TRACK, SeqCst);
        let mut wp_end = self.file_len.load(SeqCst);
        let mut lock_wait = Duration::ZERO;
        let r = (|| {
            if wp_end > 0 {
                self.uffd
                    .writeprotect(base, wp_end, true, false)
                    .map_err(ctx("protect heap"))?;
            }
            let overlay = self
                .pagemap
                .scan_anon(base, base + wp_end, &mut buf, |s, e| {
                    self.copy_out(base, s, e - s)
                })
                .map_err(ctx("scan overlay"))?;
            *rounds = 1;

            // 2. Re-copy what was written meanwhile until little is left.
            loop {
                runs.clear();
                let n = self.dirty_runs(wp_end, true, |o, l| runs.push((o, l)));
                // The handler may be unprotecting a page whose bit we just
                // took: let it finish so our re-protect comes after it.
                self.handler_quiesce();
                let tr = Instant::now();
                let calls = self
                    .protect_runs(runs.iter().copied())
                    .map_err(ctx("re-protect"))?;
                if self.debug_rounds {
                    eprintln!(
                        "fold round {}: {n} pages, {} runs, {calls} protect calls in {} us",
                        *rounds,
                        runs.len(),
                        usec(tr.elapsed())
                    );
                }
                let len = self.file_len.load(SeqCst);
                if len > wp_end {
                    self.uffd
                        .writeprotect(base + wp_end, len - wp_end, true, false)
                        .map_err(ctx("protect grown heap"))?;
                    self.pagemap
                        .scan_anon(base + wp_end, base + len, &mut buf, |s, e| {
                            self.copy_out(base, s, e - s)
                        })
                        .map_err(ctx("scan grown heap"))?;
                    wp_end = len;
                }
                for &(o, l) in &runs {
                    self.copy_out(base, base + o, l);
                }
                *rounds += 1;
                if n <= self.final_max_pages || *rounds >= self.max_rounds as u64 {
                    // The flip takes the address-space lock for writing
                    // three times while every heap access is parked. A
                    // reader holding it for reading (a monitor reading
                    // /proc/<pid>/smaps walks the heap's page tables with
                    // it held, ~15 ms per GiB) would park the main thread
                    // for the rest of its walk: final steps of 6-42 ms at
                    // 1 GiB with such a reader, 0.15-0.5 ms without. So
                    // take the lock once, parking nobody, and flip only
                    // when that came back at once; after a wait, writes
                    // went on meanwhile, so copy them in one more round.
                    let d = sys::address_space_lock_wait(s2).map_err(ctx("lock probe"))?;
                    lock_wait += d;
                    if d > LOCK_BUSY && lock_wait < LOCK_WAIT_MAX {
                        continue;
                    }
                    break;
                }
            }
            Ok(overlay)
        })();
        self.c
            .last_fold_lock_wait_usec
            .store(usec(lock_wait), SeqCst);
        let overlay = match r {
            Ok(o) => o,
            Err(e) => {
                self.abort_before_flip();
                // SAFETY: s2 is an unused reservation.
                unsafe {
                    let _ = sys::munmap(s2, reserve);
                }
                return Err(e);
            }
        };

        // 3. Flip. From the moment the handler is in FINAL mode no write
        //    fault is resolved until the heap is shared again.
        //
        // The flip runs at the fault handler's real-time priority, for the
        // same reason the handler does: any thread that touches the heap
        // now waits for this one, so it must not wait for a CPU itself. It
        // sleeps once in the middle (the heap move's REMAP event must be
        // read by the handler before mremap returns), and a normal task
        // woken on a busy CPU can wait out another task's time slice first.
        let rt = FinalStepPriority::raise(*lock(&self.handler_priority));
        // Timed from here: from now on a write fault is not resolved, so
        // the wait for the handler to finish its message counts too.
        let tf = Instant::now();
        let tf_cpu = sys::thread_cpu_time();
        self.hmode.store(H_FINAL, SeqCst);
        self.handler_quiesce();
        let mut marks = [tf; 5];
        marks[0] = Instant::now();
        // The dirty pages are not write-protected again here. A write to one
        // before the move below lands in its private page, which the move
        // carries to S2 and the copy after it takes, like the pages the heap
        // grew by since the last round (never protected at all); mremap
        // flushes the TLB before it returns, so nothing writes through H
        // after. Re-protecting them cost one call and one TLB flush per
        // dirty run while writers were parked (see forkpatch/DESIGN.md,
        // fold-back point 4).
        // Every page is now protected, untouched since the last copy, or
        // dirty and recorded (copied after the move).
        // Minor/missing faults make any access to the emptied heap wait too.
        let moved = self
            .uffd
            .register(
                base,
                reserve,
                sys::MODE_WP | sys::MODE_MINOR | sys::MODE_MISSING,
            )
            .map_err(ctx("register MINOR|MISSING"))
            // SAFETY: s2 is our reservation; H keeps its VMA (now empty,
            // every access traps to the handler, which holds it).
            .and_then(|_| {
                marks[1] = Instant::now();
                unsafe { sys::mremap_dontunmap(base, reserve, s2) }.map_err(ctx("move heap tables"))
            });
        if let Err(e) = moved {
            self.abort_before_flip();
            // SAFETY: the move did not happen; s2 is an unused reservation.
            unsafe {
                let _ = sys::munmap(s2, reserve);
            }
            return Err(e);
        }
        marks[2] = Instant::now();
        // The old tables must not be copied by a later fork while they wait
        // to be unmapped.
        let _ = sys::madvise_nondestructive(s2, reserve, libc::MADV_DONTFORK);
        // Copy the pages written since their last copy. Only copied-on-write
        // pages can differ from the memfd; the others may be untouched
        // markers, and reading those would fault into our own (parked)
        // handler, since the moved tables stay registered (EVENT_REMAP).
        let mut final_pages = 0;
        let mut scan_err = None;
        self.dirty_runs(wp_end, true, |o, l| {
            if self.inject == FaultInjection::SkipFinalCopy {
                return;
            }
            match self
                .pagemap
                .scan_anon(s2 + o, s2 + o + l, &mut buf, |s, e| {
                    self.copy_out(s2, s, e - s)
                }) {
                Ok(n) => final_pages += n,
                Err(e) => {
                    scan_err.get_or_insert(e);
                }
            }
        });
        let len = self.file_len.load(SeqCst);
        let mut r = scan_err.map_or(Ok(0), Err);
        if r.is_ok() && len > wp_end {
            // Pages added since the last round were never protected: take
            // whatever was copied-on-write there from the moved tables.
            r = self
                .pagemap
                .scan_anon(s2 + wp_end, s2 + len, &mut buf, |s, e| {
                    self.copy_out(s2, s, e - s)
                });
        }
        // SAFETY: H is empty (its tables are at s2) and every access to it
        // is parked in the handler; the shared mapping shows the memfd, which
        // now holds every byte the private view showed.
        marks[3] = Instant::now();
        let r = r.and_then(|n| {
            final_pages += n;
            unsafe { self.flip_shared(base, reserve) }
        });
        if let Err(e) = r {
            // Put the private tables back: no write is lost, stay private.
            // SAFETY: moves our own tables back over the empty H.
            unsafe {
                let _ = sys::mremap_replace(s2, reserve, base);
            }
            self.hmode.store(H_IDLE, SeqCst);
            let _ = self.uffd.wake(base, reserve);
            return Err(("flip to shared".into(), e));
        }
        // Measured before the wake: once woken, writers may preempt us.
        // CPU first: the wall interval then contains the CPU one.
        let final_cpu_us = usec(sys::thread_cpu_time().saturating_sub(tf_cpu));
        let final_us = usec(tf.elapsed());
        self.hmode.store(H_IDLE, SeqCst);
        let _ = self.uffd.wake(base, reserve);
        let final_priority = rt.priority();
        drop(rt);
        if self.debug_rounds {
            marks[4] = tf + Duration::from_micros(final_us);
            let d: Vec<u64> = marks.windows(2).map(|w| usec(w[1] - w[0])).collect();
            eprintln!(
                "fold final step: {final_us} us (CPU {final_cpu_us}, {final_pages} pages): \
                 quiesce {}, register {}, move {}, copy {}, map shared {}",
                usec(marks[0] - tf),
                d[0],
                d[1],
                d[2],
                d[3]
            );
        }
        self.queue_unmap(s2);
        Ok(Folded {
            overlay,
            final_pages,
            final_us,
            final_cpu_us,
            final_priority,
        })
    }

    /// Maps the heap shared again over the emptied H.
    ///
    /// A fresh `mmap` would leave H without page tables: after the fold every
    /// page of the heap faults once more (fault-around from the memfd), a few
    /// faults per request for seconds, and the perf profiles of the latency
    /// harness showed main-thread stretches of 10-20 ms in
    /// `filemap_map_pages` right after folds. The switch moved the shared
    /// mapping's tables aside (`kept_shared`) rather than dropping them, so
    /// they are moved back here: O(page-table pages), like the switch.
    ///
    /// Why the kept tables are still right: they map the memfd's own
    /// page-cache pages, and every later change of the file reaches every
    /// mapping of it through the kernel's reverse map (the fold writes into
    /// the same pages through M; a hole punch zaps the entries; migration and
    /// compaction update them); pages the file gained meanwhile simply have
    /// no entry and fault in. The kept range is `MADV_DONTFORK` (the child
    /// must not copy it), and that flag moves with it, so it is cleared here
    /// before anyone runs: a heap marked DONTFORK would be missing from the
    /// next child. If any step fails, H gets the fresh mapping as before.
    ///
    /// # Safety
    /// H is empty and every access to it is parked (the flip's final step).
    unsafe fn flip_shared(&self, base: usize, reserve: usize) -> io::Result<()> {
        if let Some(k) = lock(&self.kept_shared).take() {
            match sys::mremap_replace(k, reserve, base) {
                Ok(()) => {
                    if sys::madvise_nondestructive(base, reserve, libc::MADV_DOFORK).is_ok() {
                        self.c.flips_with_kept_tables.fetch_add(1, SeqCst);
                        return Ok(());
                    }
                }
                // The move did not happen: k is still ours.
                Err(_) => self.queue_unmap(k),
            }
        }
        sys::map_fd_fixed(base, reserve, self.memfd.as_raw_fd(), true)
    }

    /// Leaves the heap private (all data in place) and releases every
    /// waiting thread; the engine degrades to stock fork.
    fn abort_before_flip(&self) {
        self.hmode.store(H_IDLE, SeqCst);
        let _ = self.uffd.unregister(self.base, self.reserve);
        let _ = self.uffd.wake(self.base, self.reserve);
    }
}

#[cfg(test)]
mod tests {
    use super::RunMerger;

    fn merge(gap: usize, runs: &[(usize, usize)]) -> Vec<(usize, usize)> {
        let mut m = RunMerger::new(gap);
        let mut out: Vec<_> = runs.iter().filter_map(|&(o, l)| m.push(o, l)).collect();
        out.extend(m.finish());
        out
    }

    #[test]
    fn runs_within_the_gap_merge() {
        assert_eq!(merge(10, &[]), vec![]);
        assert_eq!(merge(10, &[(0, 4)]), vec![(0, 4)]);
        // 4..14 is a gap of 10: joined; 30 is 12 past 18: a new range.
        assert_eq!(
            merge(10, &[(0, 4), (14, 4), (30, 2)]),
            vec![(0, 18), (30, 32)]
        );
        // Gap 0 joins only touching runs.
        assert_eq!(merge(0, &[(0, 4), (4, 4), (9, 1)]), vec![(0, 8), (9, 10)]);
    }
}
