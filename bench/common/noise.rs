//! CPU availability probe, shared by the bench harnesses (included with
//! `#[path]`).
//!
//! Why: on a small VM a latency figure mixes what the server did with what
//! the machine let it do. On the 2-core bench VM the kernel is built
//! `PREEMPT_NONE` and the host runs a DAMON `pageout` scheme (`kdamond.0`)
//! that scans physical memory in kernel mode for up to ~10 ms at a time
//! without a reschedule point; a task woken on that CPU, real-time or not,
//! waits until the scan yields. No server can answer faster than its CPU is
//! given back, so the harnesses measure that floor next to their clients.
//!
//! How: one thread per probed CPU, pinned there, `SCHED_FIFO` above the
//! clients, sleeps `period` and records how late each wake-up was. A
//! real-time thread preempts every normal task at once, so a late wake-up
//! means the CPU could not be taken back at all: a non-preemptible kernel
//! section, interrupts, or the hypervisor. Wake-ups later than `record_us`
//! are kept with their time; the cost is a few microseconds per period on
//! each probed CPU.

use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A probe stall at least this long marks the requests it overlapped (the
/// "clear" figures leave them out) and is listed in the reports.
pub const STALL_US: u64 = 1000;

/// One late wake-up: the probed CPU was unavailable from `start_us` (since
/// the harness' t0) for `late_us`.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct CpuStall {
    pub cpu: usize,
    pub start_us: u64,
    pub late_us: u64,
}

pub struct NoiseProbe {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<CpuStall>>>,
}

impl NoiseProbe {
    /// Starts one probe thread per CPU in `cpus`.
    pub fn start(
        cpus: &[usize],
        period: Duration,
        priority: i32,
        record_us: u64,
        t0: Instant,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = cpus
            .iter()
            .map(|&cpu| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    super::sched::pin_current_thread(&[cpu]);
                    super::sched::set_fifo(priority);
                    let mut out = Vec::new();
                    let mut next = Instant::now() + period;
                    while !stop.load(Acquire) {
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        }
                        let woke = Instant::now();
                        let late = woke.saturating_duration_since(next).as_micros() as u64;
                        if late >= record_us {
                            out.push(CpuStall {
                                cpu,
                                start_us: next.saturating_duration_since(t0).as_micros() as u64,
                                late_us: late,
                            });
                        }
                        // After a stall, start a fresh period instead of
                        // recording the missed ones as further stalls.
                        next = (next + period).max(woke + period / 2);
                    }
                    out
                })
            })
            .collect();
        NoiseProbe { stop, threads }
    }

    /// Stops the probes; the stalls of all CPUs, in time order.
    pub fn finish(self) -> Vec<CpuStall> {
        self.stop.store(true, Release);
        let mut v: Vec<CpuStall> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_default())
            .collect();
        v.sort_by_key(|s| s.start_us);
        v
    }
}

/// Longest stall per CPU among those overlapping [from_us, to_us).
pub fn max_stall_per_cpu(stalls: &[CpuStall], ncpu: usize, from_us: u64, to_us: u64) -> Vec<u64> {
    let mut m = vec![0; ncpu];
    for s in stalls {
        if s.start_us < to_us && s.start_us + s.late_us > from_us && s.cpu < ncpu {
            m[s.cpu] = m[s.cpu].max(s.late_us);
        }
    }
    m
}

/// Whether a request [start_us, start_us + lat_us] overlapped a stall of at
/// least `min_us` on any probed CPU.
pub fn overlaps_stall(sorted: &[CpuStall], start_us: u64, lat_us: u64, min_us: u64) -> bool {
    // Stalls are short (ms) and sorted by start: only those starting before
    // the request ended and at most 1 s before it began can overlap.
    let lo = sorted.partition_point(|s| s.start_us + 1_000_000 < start_us);
    sorted[lo..]
        .iter()
        .take_while(|s| s.start_us <= start_us + lat_us)
        .any(|s| s.late_us >= min_us && s.start_us + s.late_us >= start_us)
}

/// CPU time (ms) used so far by kernel threads named `kdamond*` (DAMON):
/// the bench VM's host-installed memory scanner, reported next to the
/// figures it disturbs. 0 where there is none.
pub fn kdamond_cpu_ms() -> f64 {
    let tick = 1000.0 / clk_tck();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| {
            let (comm, rest) = s.split_once(") ")?;
            if !comm.contains("(kdamond") {
                return None;
            }
            let f: Vec<&str> = rest.split_whitespace().collect();
            // Fields 14 and 15 of stat (utime, stime): 12 and 13 after the comm.
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        * tick
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}
