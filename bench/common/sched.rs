//! Scheduling helpers shared by the bench binaries (included with
//! `#[path]`: two functions do not make a crate).

/// Makes the calling thread SCHED_FIFO at `priority`.
pub fn set_fifo(priority: i32) {
    let p = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: sched_setscheduler(0, ...) affects only the calling thread and
    // reads the parameter struct we pass.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) };
    assert_eq!(
        r,
        0,
        "SCHED_FIFO {priority}: {}",
        std::io::Error::last_os_error()
    );
}

/// Pins the calling thread to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) {
    // SAFETY: cpu_set_t is plain data; CPU_SET only writes inside it, and
    // sched_setaffinity(0, ...) affects only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        let r = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(r, 0, "sched_setaffinity {cpus:?}");
    }
}

pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize
}
