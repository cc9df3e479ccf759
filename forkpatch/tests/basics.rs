//! Edge cases of the engine: growth limits (OOM), purge semantics, and the
//! fallback when userfaultfd cannot see kernel-mode faults.

mod common;
mod proc_threads;

use common::{engine, fork_checker, reap};
use forkpatch::{Config, Engine, Forked};
use std::time::Duration;

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

#[test]
fn async_fork_can_be_toggled_while_children_run() {
    use forkpatch::{STATE_FOLDING, STATE_IDLE, STATE_SNAPSHOT, STATE_STOCK};
    let e = engine(64 << 20);
    let len = 4 << 20;
    let a = e.alloc(len, 4096).unwrap().as_ptr();
    // SAFETY: len bytes of region memory owned by this test.
    let s = unsafe { std::slice::from_raw_parts_mut(a, len) };
    s.fill(1);

    // Switch off while an async child lives: applied when it exits, no fold.
    let pid = fork_checker(&e, s, 1, 50);
    e.set_async(false);
    assert_eq!(e.state(), STATE_SNAPSHOT);
    s.fill(2);
    assert_eq!(reap(pid), 0);
    assert!(e.child_exited(pid));
    assert_eq!(e.state(), STATE_STOCK);
    assert!(!e.purge(a as usize, len), "memfd frozen in stock mode");

    // Stock fork; switching on while its child lives must wait for it.
    let pid = fork_checker(&e, s, 2, 50);
    assert_eq!(
        e.stats().last_switch_usec,
        0,
        "a stock fork does not switch"
    );
    e.set_async(true);
    assert_eq!(
        e.state(),
        STATE_STOCK,
        "no fold while a stock child reads the memfd"
    );
    s.fill(3);
    assert_eq!(reap(pid), 0);
    assert!(e.child_exited(pid));
    assert!(matches!(e.state(), STATE_FOLDING | STATE_IDLE));
    assert!(e.wait_idle(Duration::from_secs(10)));
    assert_eq!(e.state(), STATE_IDLE);
    assert!(s.iter().all(|&x| x == 3));

    // Off and on again while idle; an async snapshot afterwards is right.
    e.set_async(false);
    assert_eq!(e.state(), STATE_STOCK);
    s[..4096].fill(4);
    e.set_async(true);
    assert!(e.wait_idle(Duration::from_secs(10)));
    assert_eq!(e.state(), STATE_IDLE);
    s[..4096].fill(3);
    let pid = fork_checker(&e, s, 3, 20);
    s.fill(5);
    assert_eq!(reap(pid), 0);
    assert!(e.child_exited(pid));
    assert!(e.wait_idle(Duration::from_secs(10)));
    assert!(s.iter().all(|&x| x == 5));
    assert!(e.purge(a as usize, len));
}

fn ncpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Tids of this process' threads whose name starts with `prefix`.
fn thread_ids(prefix: &str) -> Vec<libc::pid_t> {
    proc_threads::named("self", prefix)
        .into_iter()
        .map(|(_, tid)| tid)
        .collect()
}

/// CPUs allowed for each of this process' threads whose name starts with
/// `prefix` (one entry per thread).
fn thread_cpus(prefix: &str) -> Vec<String> {
    thread_ids(prefix)
        .into_iter()
        .map(|tid| proc_threads::cpu_list("self", tid).unwrap_or_default())
        .collect()
}

#[test]
fn engine_threads_follow_the_cpu_list() {
    let e = engine(64 << 20);
    // The threads register themselves as they start; give them a moment.
    std::thread::sleep(Duration::from_millis(100));
    assert!(e.set_thread_cpus(&[]).is_err(), "an empty list is refused");
    e.set_thread_cpus(&[0]).unwrap();
    // Other engines of this test binary run in parallel: ours is among the
    // fold threads, and the fault handlers stay unrestricted.
    assert!(
        thread_cpus("forkpatch-fold").iter().any(|c| c == "0"),
        "{:?}",
        thread_cpus("forkpatch-fold")
    );
    let all = thread_cpus("forkpatch-uffd");
    assert!(
        !all.is_empty() && all.iter().all(|c| c != "0" || ncpus() == 1),
        "{all:?}"
    );
    // A snapshot and its fold still work with the pinned threads.
    let p = e.alloc(1 << 20, 4096).unwrap().as_ptr();
    // SAFETY: 1 MiB the engine just handed out.
    unsafe { std::ptr::write_bytes(p, 7, 1 << 20) };
    match e.fork(true).unwrap() {
        Forked::Child => {
            // SAFETY: reads our own snapshot, then leaves without unwinding.
            let ok = unsafe { *p.add(12345) } == 7;
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        Forked::Parent(pid) => {
            assert_eq!(reap(pid), 0);
            e.child_exited(pid);
            assert!(e.wait_idle(Duration::from_secs(10)));
            let s = e.stats();
            assert_eq!(s.folds, 1);
            // The final step's CPU time is reported and lies within its
            // wall time.
            assert!(
                s.last_fold_final_cpu_usec > 0
                    && s.last_fold_final_cpu_usec <= s.last_fold_final_usec,
                "{s:?}"
            );
        }
    }
}

/// Scheduling policy and real-time priority of thread `tid` of this process
/// (0 = the calling thread).
fn thread_sched(tid: libc::pid_t) -> (i32, i32) {
    let mut p = libc::sched_param { sched_priority: 0 };
    // SAFETY: queries a thread of our own process into a local.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    assert!(unsafe { libc::sched_getparam(tid, &mut p) } == 0);
    (policy, p.sched_priority)
}

#[test]
fn rt_priority_applies_to_the_fault_handler_and_a_fold_still_works() {
    let e = engine(64 << 20);
    let tid = e.fault_handler_tid();
    assert!(tid > 0);
    assert_eq!(e.rt_priority(), 0, "normal scheduling until asked");
    assert_eq!(thread_sched(tid).0, libc::SCHED_OTHER);
    let bad = e.set_rt_priority(100).unwrap_err();
    assert_eq!(bad.raw_os_error(), Some(libc::EINVAL));
    assert!(e.set_rt_priority(-1).is_err());
    assert_eq!(
        thread_sched(tid).0,
        libc::SCHED_OTHER,
        "errors change nothing"
    );
    let rt = match e.set_rt_priority(3) {
        Ok(()) => {
            assert_eq!(thread_sched(tid), (libc::SCHED_FIFO, 3));
            assert_eq!(e.rt_priority(), 3);
            3
        }
        // Without CAP_SYS_NICE the kernel refuses; nothing may change.
        Err(err) => {
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
            assert_eq!(e.rt_priority(), 0);
            assert_eq!(thread_sched(tid).0, libc::SCHED_OTHER);
            0
        }
    };
    // A fold whose first writes go through the (real-time) handler.
    let len = 4 << 20;
    let p = e.alloc(len, 4096).unwrap().as_ptr();
    // SAFETY: memory the engine just handed out, written only by this thread.
    let s = unsafe { std::slice::from_raw_parts_mut(p, len) };
    s.fill(1);
    let pid = fork_checker(&e, s, 1, 0);
    s.fill(2);
    assert_eq!(reap(pid), 0);
    e.child_exited(pid);
    // Write while the fold runs: these are the faults the handler serves.
    for round in 0..50u8 {
        for page in s.chunks_mut(4096) {
            page.fill(3 + round % 4);
        }
    }
    assert!(e.wait_idle(Duration::from_secs(10)));
    let last = 3 + 49 % 4;
    assert!(s.iter().all(|&x| x == last));
    // The fold's final step ran at the handler's priority, and the fold
    // thread went back to normal scheduling after it. (Only this test raises
    // a priority, so every engine's fold thread in the process is normal.)
    assert_eq!(e.stats().last_fold_final_priority, rt as u64);
    let folds = thread_ids("forkpatch-fold");
    assert!(!folds.is_empty());
    for t in folds {
        assert_eq!(thread_sched(t).0, libc::SCHED_OTHER, "fold thread {t}");
    }
    // The next snapshot sees exactly the folded heap.
    let pid = fork_checker(&e, s, last, 0);
    assert_eq!(reap(pid), 0);
    e.child_exited(pid);
    assert!(e.wait_idle(Duration::from_secs(10)));
    // The handler's policy stays its own: the forking thread and its child
    // keep normal scheduling.
    let before = thread_sched(0);
    assert_eq!(before.0, libc::SCHED_OTHER);
    match e.fork(true).unwrap() {
        Forked::Child => {
            let ok = thread_sched(0).0 == libc::SCHED_OTHER;
            // SAFETY: leaves the child without unwinding.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        Forked::Parent(pid) => {
            assert_eq!(thread_sched(0), before);
            assert_eq!(reap(pid), 0, "child runs SCHED_OTHER");
            e.child_exited(pid);
        }
    }
    assert!(e.wait_idle(Duration::from_secs(10)));
    e.set_rt_priority(0).unwrap();
    assert_eq!(thread_sched(tid).0, libc::SCHED_OTHER);
}
