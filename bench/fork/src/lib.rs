//! Shared helpers for the fork benches: populated heaps of the three kinds
//! the benches compare, and a fork that measures only the parent's stall.

use std::time::{Duration, Instant};

pub const PAGE: usize = 4096;
pub const GIB: usize = 1 << 30;

/// MemAvailable from /proc/meminfo, in bytes.
pub fn mem_available() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Heap sizes (GiB) from `want` this machine can hold with room to spare.
pub fn sizes_that_fit(want: &[usize]) -> Vec<usize> {
    let avail = mem_available();
    want.iter()
        .copied()
        .filter(|&g| g * GIB * 5 / 2 < avail)
        .collect()
}

/// An anonymous private heap, every page written (4 KiB pages or THP).
pub struct AnonHeap {
    ptr: *mut u8,
    len: usize,
}

impl AnonHeap {
    pub fn new(len: usize, thp: bool) -> AnonHeap {
        // SAFETY: a fresh private anonymous mapping owned by the returned
        // value and unmapped in Drop; we only write inside it.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED, "mmap {len}");
            let advice = if thp {
                libc::MADV_HUGEPAGE
            } else {
                libc::MADV_NOHUGEPAGE
            };
            libc::madvise(p, len, advice);
            let p = p as *mut u8;
            for i in (0..len).step_by(PAGE) {
                *p.add(i) = 1;
            }
            AnonHeap { ptr: p, len }
        }
    }
}

impl Drop for AnonHeap {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping created in `new`.
        unsafe { libc::munmap(self.ptr as *mut _, self.len) };
    }
}

/// Stall of a stock fork() in the parent; the child exits at once.
pub fn stock_fork_stall() -> Duration {
    let t = Instant::now();
    // SAFETY: the child calls only _exit.
    let pid = unsafe { libc::fork() };
    let d = t.elapsed();
    if pid == 0 {
        // SAFETY: leaves the child at once.
        unsafe { libc::_exit(0) };
    }
    assert!(pid > 0, "fork failed");
    // SAFETY: reaps our child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    d
}

/// An engine with a populated region of `len` bytes.
pub struct EngineHeap {
    pub engine: forkpatch::Engine,
}

impl EngineHeap {
    pub fn new(len: usize) -> Result<EngineHeap, forkpatch::Disabled> {
        let engine = forkpatch::Engine::new(forkpatch::Config {
            reserve_bytes: (len * 2).max(16 * GIB),
            ..forkpatch::Config::default()
        })?;
        let p = engine.alloc(len, 2 << 20).expect("region alloc").as_ptr();
        // SAFETY: p is len bytes of region memory owned by the engine.
        unsafe {
            for i in (0..len).step_by(PAGE) {
                *p.add(i) = 1;
            }
        }
        Ok(EngineHeap { engine })
    }

    /// Stall of one async fork in the parent; reaps the child and waits for
    /// the fold outside the measured time.
    pub fn fork_stall(&self) -> Duration {
        let t = Instant::now();
        let pid = match self.engine.fork(true).expect("engine fork") {
            // SAFETY: leaves the child at once.
            forkpatch::Forked::Child => unsafe { libc::_exit(0) },
            forkpatch::Forked::Parent(pid) => pid,
        };
        let d = t.elapsed();
        // SAFETY: reaps our child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        self.engine.child_exited(pid);
        self.engine.wait_idle(Duration::from_secs(60));
        // Real forks are seconds apart; let the old page tables go first.
        while self.engine.teardown_pending() {
            std::thread::sleep(Duration::from_millis(1));
        }
        d
    }
}
