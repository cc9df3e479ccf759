//! Engine-level stress test.
//!
//! Several threads write into the region (user-mode stores, and `read()`
//! from a pipe, i.e. kernel-mode writes) while snapshots are taken and
//! folded back in a loop. Every child compares its view, byte for byte,
//! with the model as of its fork instant (twice, a few ms apart, so a later
//! parent write leaking into the child is caught), free-running counters
//! check the switch itself, and at the end the parent's memory equals the
//! model. The same harness run with deliberately broken engines must report
//! failures, which shows the checks can fail.

use forkpatch::{Config, Engine, FaultInjection, Forked};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const USER_WRITERS: usize = 3;
/// Counter pages sit at the end of the region; 8 words per page.
const COUNTER_PAGES: usize = 8;
const COUNTERS: usize = COUNTER_PAGES * 8;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Byte `i` of the stream the feeder pushes into the pipe.
fn stream_byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8 ^ (i as u8)
}

/// Raw pointers shared by the threads. Each writer owns a disjoint page
/// range of both the region and the model, so no two threads write the same
/// bytes; the engine's own threads only copy pages around.
#[derive(Clone, Copy)]
struct Mem {
    region: usize,
    model: usize,
    len: usize,
}

struct Ctl {
    pause: AtomicBool,
    stop: AtomicBool,
    reader_done: AtomicBool,
    at_pause: Barrier,
    resume: Barrier,
    published: Vec<AtomicU64>,
}

impl Ctl {
    /// Writers call this between operations.
    fn checkpoint(&self) {
        if self.pause.load(Acquire) {
            self.at_pause.wait();
            self.resume.wait();
        }
    }
}

/// Bursts of writes with short sleeps in between: six writer threads
/// spinning on two cores would starve the forking thread and the children.
fn throttle(ops: &mut u32) {
    *ops += 1;
    if (*ops).is_multiple_of(32) {
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn counter_addr(m: &Mem, j: usize) -> usize {
    let first = m.len / PAGE - COUNTER_PAGES;
    m.region + (first + j / 8) * PAGE + (j % 8) * 512
}

fn user_writer(m: Mem, ctl: Arc<Ctl>, lo: usize, hi: usize, seed: u64) {
    let mut rng = Rng(seed);
    let mut buf = [0u8; 2 * PAGE];
    let mut ops = 0u32;
    while !ctl.stop.load(Acquire) {
        ctl.checkpoint();
        throttle(&mut ops);
        // Mostly small writes; sometimes a whole page; some cross pages.
        let span = (hi - lo) * PAGE;
        let len = match rng.below(10) {
            0 => PAGE,
            1 => 1 + rng.below(2 * PAGE - 1),
            _ => 1 + rng.below(256),
        }
        .min(span);
        let off = lo * PAGE + rng.below(span - len + 1);
        for b in &mut buf[..len] {
            *b = rng.next() as u8;
        }
        // SAFETY: [off, off+len) lies in this writer's own pages of both
        // the region and the model.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), (m.region + off) as *mut u8, len);
            std::ptr::copy_nonoverlapping(buf.as_ptr(), (m.model + off) as *mut u8, len);
        }
    }
}

fn kernel_writer(m: Mem, ctl: Arc<Ctl>, rfd: i32, lo: usize, hi: usize, seed: u64) {
    let mut rng = Rng(seed);
    let mut pos = 0u64;
    let mut ops = 0u32;
    while !ctl.stop.load(Acquire) {
        ctl.checkpoint();
        throttle(&mut ops);
        let span = (hi - lo) * PAGE;
        let len = (1 + rng.below(3 * PAGE)).min(span);
        let off = lo * PAGE + rng.below(span - len + 1);
        // SAFETY: read() writes at most len bytes into this thread's own
        // region pages; the kernel does the store (kernel-mode fault path).
        let n = unsafe { libc::read(rfd, (m.region + off) as *mut _, len) };
        assert!(
            n > 0,
            "read() into the region failed: {}",
            std::io::Error::last_os_error()
        );
        for k in 0..n as usize {
            // SAFETY: same range, model side.
            unsafe { *((m.model + off + k) as *mut u8) = stream_byte(pos + k as u64) };
        }
        pos += n as u64;
    }
    ctl.reader_done.store(true, Release);
}

fn feeder(ctl: Arc<Ctl>, wfd: i32) {
    let mut pos = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    while !ctl.reader_done.load(Acquire) {
        for (k, b) in buf.iter_mut().enumerate() {
            *b = stream_byte(pos + k as u64);
        }
        let mut done = 0;
        while done < buf.len() && !ctl.reader_done.load(Acquire) {
            // SAFETY: writes from a live local buffer into our pipe.
            let n = unsafe { libc::write(wfd, buf[done..].as_ptr() as *const _, buf.len() - done) };
            if n > 0 {
                done += n as usize;
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        pos += buf.len() as u64;
    }
}

fn counter_thread(m: Mem, ctl: Arc<Ctl>) {
    let mut local = [0u64; COUNTERS];
    let mut j = 0;
    let mut ops = 0u32;
    while !ctl.stop.load(Acquire) {
        throttle(&mut ops);
        local[j] += 1;
        // SAFETY: counter words are 8-byte aligned, inside the counter pages
        // that only this thread writes.
        unsafe { ((counter_addr(&m, j)) as *mut u64).write_volatile(local[j]) };
        ctl.published[j].store(local[j], Release);
        j = (j + 1) % COUNTERS;
    }
}

/// Child side: no allocation, no locks (other threads held them at fork).
fn child_check(m: Mem, res_fd: i32, seed: u64) -> ! {
    let data_len = m.len - COUNTER_PAGES * PAGE;
    let check = |first_bad: &mut u64| -> u64 {
        let mut bad = 0;
        for p in 0..data_len / PAGE {
            // SAFETY: both ranges are mapped for the whole test; the child is
            // single-threaded, nothing writes them here.
            let (a, b) = unsafe {
                (
                    std::slice::from_raw_parts((m.region + p * PAGE) as *const u8, PAGE),
                    std::slice::from_raw_parts((m.model + p * PAGE) as *const u8, PAGE),
                )
            };
            if a != b {
                if bad == 0 {
                    *first_bad = p as u64;
                }
                bad += 1;
            }
        }
        bad
    };
    let mut out = [0u64; 3 + COUNTERS];
    out[0] = check(&mut out[2]);
    for j in 0..COUNTERS {
        // SAFETY: counter word inside the region.
        out[3 + j] = unsafe { (counter_addr(&m, j) as *const u64).read_volatile() };
    }
    // Let the parent write and copy-on-write for a while, then look again:
    // the snapshot must not have moved.
    // SAFETY: plain libc calls.
    unsafe { libc::usleep((Rng(seed).below(4000)) as u32) };
    let mut fb = 0;
    out[1] = check(&mut fb);
    // SAFETY: writes a local array (< PIPE_BUF) to the result pipe, exits
    // without running the parent's destructors or atexit handlers.
    unsafe {
        libc::write(
            res_fd,
            out.as_ptr() as *const _,
            std::mem::size_of_val(&out),
        );
        libc::_exit(0)
    }
}

#[derive(Debug, Default)]
struct Outcome {
    cycles: usize,
    child_failures: usize,
    counter_failures: usize,
    parent_failures: usize,
    killed: usize,
    stock_forks: usize,
    max_fork_us: u64,
    max_final_us: u64,
    overlay_bytes: u64,
    /// smaps_rollup reads by the monitor thread, and folds that found the
    /// address-space lock busy before their final step (timing-dependent,
    /// reported only).
    smaps_reads: u64,
    folds_after_lock_wait: usize,
    /// Time spent waiting for folds, pausing writers, forking, in children.
    phase_ms: [u128; 4],
}

impl Outcome {
    fn failures(&self) -> usize {
        self.child_failures + self.counter_failures + self.parent_failures
    }
}

fn pause(ctl: &Ctl) {
    ctl.pause.store(true, Release);
    ctl.at_pause.wait();
    ctl.pause.store(false, Release);
}

fn resume(ctl: &Ctl) {
    ctl.resume.wait();
}

fn parent_matches(m: &Mem) -> usize {
    let data_len = m.len - COUNTER_PAGES * PAGE;
    (0..data_len / PAGE)
        .filter(|p| {
            // SAFETY: writers are paused; both ranges are mapped.
            unsafe {
                std::slice::from_raw_parts((m.region + p * PAGE) as *const u8, PAGE)
                    != std::slice::from_raw_parts((m.model + p * PAGE) as *const u8, PAGE)
            }
        })
        .count()
}

fn run(cycles: usize, region_mib: usize, inject: FaultInjection, seed: u64) -> Outcome {
    let engine = Engine::new(Config {
        reserve_bytes: 1 << 30,
        max_bytes: 256 << 20,
        fault_injection: inject,
        ..Config::default()
    })
    .expect("engine must be available on the test machine (root, Linux >= 6.7)");
    let len = region_mib << 20;
    let region = engine.alloc(len, 2 << 20).expect("region alloc").as_ptr() as usize;
    let mut model_vec = vec![0u8; len];
    let m = Mem {
        region,
        model: model_vec.as_mut_ptr() as usize,
        len,
    };
    let mut pipe = [0i32; 2];
    // SAFETY: creates a pipe into a local array.
    assert_eq!(
        unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) },
        0
    );
    // SAFETY: fcntl on our own pipe's write end.
    unsafe { libc::fcntl(pipe[1], libc::F_SETFL, libc::O_NONBLOCK) };

    let pausers = USER_WRITERS + 1; // + kernel writer
    let ctl = Arc::new(Ctl {
        pause: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        reader_done: AtomicBool::new(false),
        at_pause: Barrier::new(pausers + 1),
        resume: Barrier::new(pausers + 1),
        published: (0..COUNTERS).map(|_| AtomicU64::new(0)).collect(),
    });
    let data_pages = len / PAGE - COUNTER_PAGES;
    let per = data_pages / (USER_WRITERS + 1);
    let mut threads = Vec::new();
    for w in 0..USER_WRITERS {
        let c = ctl.clone();
        threads.push(std::thread::spawn(move || {
            user_writer(m, c, w * per, (w + 1) * per, seed + w as u64 + 1)
        }));
    }
    {
        let c = ctl.clone();
        let rfd = pipe[0];
        threads.push(std::thread::spawn(move || {
            kernel_writer(m, c, rfd, USER_WRITERS * per, data_pages, seed + 100)
        }));
    }
    let feeder_t = {
        let c = ctl.clone();
        let wfd = pipe[1];
        std::thread::spawn(move || feeder(c, wfd))
    };
    let counter_t = {
        let c = ctl.clone();
        std::thread::spawn(move || counter_thread(m, c))
    };
    // A monitor reading smaps_rollup (every ms: far more often than a real
    // one) holds the address-space lock for its walk of the region's page
    // tables: folds then sometimes take the path that waits for a free lock
    // and copies one more round before the final step.
    let smaps_t = {
        let c = ctl.clone();
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !c.stop.load(Acquire) {
                let _ = std::fs::read_to_string("/proc/self/smaps_rollup");
                reads += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            reads
        })
    };

    let mut out = Outcome::default();
    let mut rng = Rng(seed ^ 0xABCD);
    let mut res = [0i32; 2];
    // SAFETY: creates a pipe into a local array.
    assert_eq!(unsafe { libc::pipe2(res.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    for cycle in 0..cycles {
        // Let the previous fold finish while writers run, so writes race the
        // fold; then stop writers for the fork instant only.
        let t0 = Instant::now();
        assert!(
            engine.wait_idle(Duration::from_secs(30)),
            "fold did not finish"
        );
        let t1 = Instant::now();
        // Now and then take a stock fork (async fork switched off at run
        // time), then switch back on: the fold then copies back everything
        // written while the heap was private.
        let stock = cycle % 20 == 13;
        if stock {
            engine.set_async(false);
            assert_eq!(engine.state(), forkpatch::STATE_STOCK);
        }
        pause(&ctl);
        let t2 = Instant::now();
        let lo: Vec<u64> = ctl.published.iter().map(|p| p.load(Acquire)).collect();
        let child_seed = rng.next();
        let pid = match engine.fork(true).expect("fork") {
            Forked::Child => child_check(m, res[1], child_seed),
            Forked::Parent(pid) => pid,
        };
        resume(&ctl);
        let t3 = Instant::now();
        let hi: Vec<u64> = ctl.published.iter().map(|p| p.load(Acquire)).collect();
        let kill = cycle % 10 == 7;
        if kill {
            std::thread::sleep(Duration::from_micros(rng.below(3000) as u64));
            // SAFETY: signals our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let mut status = 0;
        // SAFETY: reaps our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let killed = libc::WIFSIGNALED(status);
        let t4 = Instant::now();
        for (k, d) in [t1 - t0, t2 - t1, t3 - t2, t4 - t3].iter().enumerate() {
            out.phase_ms[k] += d.as_millis();
        }
        // The fold starts now and runs while the writers keep writing.
        assert!(
            engine.child_exited(pid),
            "cycle {cycle}: state {} degraded {:?}",
            engine.state(),
            engine.degraded_reason()
        );
        if stock {
            engine.set_async(true);
            out.stock_forks += 1;
        }
        if killed {
            out.killed += 1;
        } else {
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "child crashed: {status:#x}"
            );
            let mut r = [0u64; 3 + COUNTERS];
            // SAFETY: reads the child's result into a local array.
            let n =
                unsafe { libc::read(res[0], r.as_mut_ptr() as *mut _, std::mem::size_of_val(&r)) };
            assert_eq!(n as usize, std::mem::size_of_val(&r));
            if r[0] != 0 || r[1] != 0 {
                out.child_failures += 1;
                if out.child_failures <= 3 {
                    eprintln!(
                        "cycle {cycle}: child saw {} / {} bad pages (first {})",
                        r[0], r[1], r[2]
                    );
                }
            }
            for j in 0..COUNTERS {
                let v = r[3 + j];
                if v < lo[j] || v > hi[j] + 1 {
                    out.counter_failures += 1;
                    eprintln!(
                        "cycle {cycle}: counter {j} = {v}, expected in [{}, {}]",
                        lo[j],
                        hi[j] + 1
                    );
                }
            }
        }
        let s = engine.stats();
        out.max_fork_us = out.max_fork_us.max(s.last_fork_usec);
        if s.last_fold_lock_wait_usec > 100 {
            out.folds_after_lock_wait += 1;
        }
        if cycle % 25 == 24 {
            assert!(engine.wait_idle(Duration::from_secs(30)));
            pause(&ctl);
            let bad = parent_matches(&m);
            if bad != 0 {
                eprintln!("cycle {cycle}: parent differs from model in {bad} pages");
                out.parent_failures += 1;
            }
            resume(&ctl);
        }
        out.cycles += 1;
    }

    // Stop everything, finish the last fold, compare the parent with the
    // model, and take one more snapshot with no writers at all.
    assert!(engine.wait_idle(Duration::from_secs(30)));
    ctl.stop.store(true, Release);
    for t in threads {
        t.join().unwrap();
    }
    feeder_t.join().unwrap();
    counter_t.join().unwrap();
    out.smaps_reads = smaps_t.join().unwrap();
    assert!(engine.wait_idle(Duration::from_secs(30)));
    if parent_matches(&m) != 0 {
        out.parent_failures += 1;
    }
    for j in 0..COUNTERS {
        // SAFETY: counter word inside the region; writer stopped.
        let v = unsafe { (counter_addr(&m, j) as *const u64).read_volatile() };
        if v != ctl.published[j].load(Acquire) {
            out.counter_failures += 1;
        }
    }
    let pid = match engine.fork(true).expect("fork") {
        Forked::Child => child_check(m, res[1], 0),
        Forked::Parent(pid) => pid,
    };
    let mut status = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    engine.child_exited(pid);
    let mut r = [0u64; 3 + COUNTERS];
    // SAFETY: reads the child's result into a local array.
    unsafe { libc::read(res[0], r.as_mut_ptr() as *mut _, std::mem::size_of_val(&r)) };
    if r[0] != 0 || r[1] != 0 {
        out.child_failures += 1;
    }
    assert!(engine.wait_idle(Duration::from_secs(30)));
    let s = engine.stats();
    out.max_fork_us = s.max_fork_usec;
    out.max_final_us = s.last_fold_final_usec;
    out.overlay_bytes = s.total_overlay_bytes;
    assert_eq!(s.fold_errors, 0, "{:?}", engine.degraded_reason());
    eprintln!("{inject:?}: {out:?} stats {s:?}");
    // SAFETY: closing our own fds.
    unsafe {
        for fd in pipe.into_iter().chain(res) {
            libc::close(fd);
        }
    }
    drop(engine);
    drop(model_vec);
    out
}

/// The two tests fork and hammer both cores; run them one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn snapshots_match_model_under_concurrent_writes() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // FORKPATCH_STRESS_SEEDS=N runs N differently seeded passes (default 1;
    // for soak runs after a change to the fold or the flip).
    let seeds: u64 = std::env::var("FORKPATCH_STRESS_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for k in 0..seeds {
        let t = Instant::now();
        let o = run(300, 32, FaultInjection::None, 0x5EED + k);
        assert_eq!(o.failures(), 0, "seed {k}: {o:?}");
        assert!(
            o.overlay_bytes > 0,
            "the parent never copied-on-write: test too weak"
        );
        assert!(o.killed > 0);
        eprintln!("correct engine: {} cycles in {:?}", o.cycles, t.elapsed());
    }
}

#[test]
fn broken_engines_are_caught() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for inject in [
        FaultInjection::SkipDirtyTracking,
        FaultInjection::SkipFinalCopy,
    ] {
        let o = run(60, 16, inject, 0xBAD);
        assert!(o.failures() > 0, "{inject:?} went unnoticed: {o:?}");
    }
}
