//! Edge cases of the engine: growth limits (OOM), purge semantics, and the
//! fallback when userfaultfd cannot see kernel-mode faults.

use forkpatch::{Config, Engine, Forked};
use std::time::Duration;

fn engine(max: usize) -> Engine {
    Engine::new(Config {
        reserve_bytes: 1 << 30,
        max_bytes: max,
        ..Config::default()
    })
    .expect("engine available")
}

#[test]
fn growth_limit_behaves_like_oom_without_corruption() {
    let e = engine(8 << 20);
    let a = e.alloc(4 << 20, 4096).expect("fits");
    // SAFETY: a is 4 MiB of region memory owned by this test.
    let s = unsafe { std::slice::from_raw_parts_mut(a.as_ptr(), 4 << 20) };
    s.fill(0x5A);
    assert!(
        e.alloc(8 << 20, 4096).is_none(),
        "must fail beyond max_bytes"
    );
    assert!(e.alloc(usize::MAX / 2, 4096).is_none());
    let b = e.alloc(2 << 20, 4096).expect("smaller request still fits");
    // SAFETY: b is 2 MiB of fresh region memory.
    let t = unsafe { std::slice::from_raw_parts(b.as_ptr(), 2 << 20) };
    assert!(t.iter().all(|&x| x == 0), "fresh memory is zeroed");
    assert!(s.iter().all(|&x| x == 0x5A), "existing data untouched");
    assert!(e.contains(a.as_ptr() as usize) && e.contains(b.as_ptr() as usize));
}

#[test]
fn purge_zeroes_when_idle_and_is_refused_during_a_snapshot() {
    let e = engine(64 << 20);
    let len = 1 << 20;
    let a = e.alloc(len, 4096).unwrap().as_ptr() as usize;
    // SAFETY: a is len bytes of region memory owned by this test.
    let s = unsafe { std::slice::from_raw_parts_mut(a as *mut u8, len) };
    s.fill(7);
    assert!(e.purge(a, len));
    assert!(s.iter().all(|&x| x == 0), "purged pages read as zero");
    s.fill(9);
    let pid = match e.fork(true).unwrap() {
        Forked::Child => {
            // The child sees the snapshot and may not purge.
            // SAFETY: exits the child immediately with a status.
            let ok = s.iter().all(|&x| x == 9) && !e.purge(a, len) && e.alloc(4096, 4096).is_none();
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        Forked::Parent(pid) => pid,
    };
    assert!(
        !e.purge(a, len),
        "purge must be refused while a child lives"
    );
    assert!(s.iter().all(|&x| x == 9));
    s[..4096].fill(3);
    let mut st = 0;
    // SAFETY: reaps our child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    assert_eq!(st, 0, "child saw a wrong snapshot");
    assert!(e.child_exited(pid));
    assert!(e.wait_idle(Duration::from_secs(10)));
    assert!(s[..4096].iter().all(|&x| x == 3) && s[4096..].iter().all(|&x| x == 9));
    assert!(e.purge(a, len), "purge allowed again after the fold");
    assert!(e.stats().purge_refused >= 1);
}

#[test]
fn busy_engine_refuses_a_second_snapshot_without_waiting() {
    let e = engine(16 << 20);
    let pid = match e.fork(true).unwrap() {
        // SAFETY: exits the child at once.
        Forked::Child => unsafe { libc::_exit(0) },
        Forked::Parent(pid) => pid,
    };
    let err = e.fork(false).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBUSY));
    let mut st = 0;
    // SAFETY: reaps our child.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    assert!(e.child_exited(pid));
    assert!(
        !e.child_exited(pid),
        "second report of the same child is ignored"
    );
    assert!(e.wait_idle(Duration::from_secs(10)));
    assert!(!e.busy());
}

#[test]
fn user_mode_only_userfaultfd_disables_the_engine_with_a_reason() {
    let err = Engine::new(Config {
        reserve_bytes: 1 << 30,
        simulate_unprivileged: true,
        ..Config::default()
    })
    .err()
    .expect("must refuse");
    assert!(err.reason.contains("user-mode"), "{}", err.reason);
}
