//! Helpers shared by the engine's test binaries (`mod common;`).

use forkpatch::{Config, Engine, Forked};

/// An engine with a 1 GiB reserve that may grow to `max` bytes.
pub fn engine(max: usize) -> Engine {
    Engine::new(Config {
        reserve_bytes: 1 << 30,
        max_bytes: max,
        ..Config::default()
    })
    .expect("engine available")
}

pub fn reap(pid: libc::pid_t) -> i32 {
    let mut st = 0;
    // SAFETY: reaps our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
    st
}

/// Forks a child that checks, after `delay_ms`, that `s` holds `want`.
pub fn fork_checker(e: &Engine, s: &[u8], want: u8, delay_ms: u32) -> libc::pid_t {
    match e.fork(true).unwrap() {
        Forked::Child => {
            // SAFETY: plain libc calls in the child, then exit without unwinding.
            unsafe {
                libc::usleep(delay_ms * 1000);
                let ok = s.iter().all(|&x| x == want);
                libc::_exit(if ok { 0 } else { 1 })
            }
        }
        Forked::Parent(pid) => pid,
    }
}
