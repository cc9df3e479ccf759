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
