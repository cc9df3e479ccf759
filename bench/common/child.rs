//! Server processes started by the bench harnesses (included with
//! `#[path]`).

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes the child get SIGKILL when the harness dies, however it dies: an
/// interrupted benchmark must not leave a redis-server holding gigabytes
/// (its `Drop` only runs on a normal exit). The kernel sends the signal
/// when the thread that spawned the child exits; the harnesses spawn
/// servers from their main thread, which lives for the whole run. The
/// setting survives `execve` (e.g. through `taskset`).
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec and only
    // calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}
