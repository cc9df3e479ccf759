//! Measures the fork stall of the engine against stock fork() and a
//! THP-backed heap, and the engine's fold-back, for populated heaps.
//!
//! cargo run --release -p forkpatch --example stall -- 1 2 4
//! (arguments: heap sizes in GiB; each size needs about that much free RAM)

use forkpatch::{Config, Engine, Forked};
use std::time::{Duration, Instant};

const PAGE: usize = 4096;

fn fork_and_reap() -> Duration {
    let t = Instant::now();
    // SAFETY: the child exits immediately.
    let pid = unsafe { libc::fork() };
    let d = t.elapsed();
    if pid == 0 {
        // SAFETY: leaves the child without running anything else.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: reaps our child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    d
}

fn anon_heap(len: usize, thp: bool) -> Duration {
    // SAFETY: a fresh private anonymous mapping, unmapped before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        libc::madvise(
            p,
            len,
            if thp {
                libc::MADV_HUGEPAGE
            } else {
                libc::MADV_NOHUGEPAGE
            },
        );
        for i in (0..len).step_by(PAGE) {
            *(p as *mut u8).add(i) = 1;
        }
        let best = (0..3).map(|_| fork_and_reap()).min().unwrap();
        libc::munmap(p, len);
        best
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("GiB"))
        .collect();
    let sizes = if sizes.is_empty() { vec![1] } else { sizes };
    for gib in sizes {
        let len = gib << 30;
        let e = Engine::new(Config {
            reserve_bytes: 16 << 30,
            ..Config::default()
        })
        .expect("engine");
        let p = e.alloc(len, 2 << 20).expect("alloc").as_ptr();
        // SAFETY: p is len bytes of region memory.
        unsafe {
            for i in (0..len).step_by(8) {
                *(p.add(i) as *mut u64) = i as u64;
            }
        }
        let rounds = 10;
        let (mut forks, mut finals) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            if std::env::var_os("SETTLE").is_some() {
                std::thread::sleep(Duration::from_millis(300));
            }
            let pid = match e.fork(true).unwrap() {
                // SAFETY: the child exits immediately.
                Forked::Child => unsafe { libc::_exit(0) },
                Forked::Parent(pid) => pid,
            };
            let nowrite = std::env::var_os("NOWRITE").is_some();
            // The parent rewrites 10% of the pages while the child lives.
            let t = Instant::now();
            // SAFETY: p is len bytes of region memory.
            unsafe {
                for i in (0..len).step_by(PAGE * 10) {
                    if !nowrite {
                        *(p.add(i) as *mut u64) ^= 1;
                    }
                }
            }
            let cow = t.elapsed();
            // SAFETY: reaps our child.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            e.child_exited(pid);
            // Keep writing (2% of pages) while the fold runs: each first
            // write to a page during the fold is a userfaultfd round trip.
            let t = Instant::now();
            // SAFETY: p is len bytes of region memory.
            unsafe {
                for i in (PAGE * 5..len).step_by(PAGE * 50) {
                    if !nowrite {
                        *(p.add(i) as *mut u64) ^= 1;
                    }
                }
            }
            let fold_writes = t.elapsed();
            assert!(e.wait_idle(Duration::from_secs(120)));
            let s = e.stats();
            forks.push(s.last_fork_usec);
            finals.push(s.last_fold_final_usec);
            println!(
                "{gib} GiB engine round {round}: fork stall {} us (switch {} us), COW of {} pages {:?}, \
                 {} writes during fold {:?}, \
                 fold {} us in {} rounds, overlay {} MiB, final step {} us / {} pages",
                s.last_fork_usec,
                s.last_switch_usec,
                len / PAGE / 10,
                cow,
                len / PAGE / 50,
                fold_writes,
                s.last_fold_usec,
                s.last_fold_rounds,
                s.last_overlay_bytes >> 20,
                s.last_fold_final_usec,
                s.last_fold_final_pages
            );
        }
        // SAFETY: p is len bytes of region memory; writers are done.
        let ok = unsafe {
            (0..len).step_by(PAGE).all(|i| {
                let v = *(p.add(i) as *const u64);
                let mut flips = 0;
                if i.is_multiple_of(PAGE * 10) {
                    flips += rounds;
                }
                if i >= PAGE * 5 && (i - PAGE * 5).is_multiple_of(PAGE * 50) {
                    flips += rounds;
                }
                v == (i as u64) ^ (flips as u64 & 1)
            })
        };
        println!(
            "{gib} GiB engine: contents after folds {}",
            if ok { "OK" } else { "WRONG" }
        );
        forks.sort_unstable();
        finals.sort_unstable();
        println!(
            "{gib} GiB engine summary: fork stall min/median/max {}/{}/{} us, \
             fold final step min/median/max {}/{}/{} us",
            forks[0],
            forks[forks.len() / 2],
            forks[forks.len() - 1],
            finals[0],
            finals[finals.len() / 2],
            finals[finals.len() - 1]
        );
        drop(e);
        println!(
            "{gib} GiB stock fork (4 KiB pages): {:?}",
            anon_heap(len, false)
        );
        println!(
            "{gib} GiB stock fork (THP heap):    {:?}",
            anon_heap(len, true)
        );
    }
}
