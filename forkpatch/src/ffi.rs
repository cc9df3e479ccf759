//! C ABI over one process-wide engine. Declared in `include/forkpatch.h`.
//!
//! Thread-safety: every function may be called from any thread, except
//! that `forkpatch_init` must run before any other thread uses the engine.

use crate::engine::{Config, Engine, Forked, Stats};
use std::ffi::{c_char, c_int, CString};
use std::sync::OnceLock;
use std::time::Duration;

static ENGINE: OnceLock<Result<Engine, CString>> = OnceLock::new();

fn engine() -> Option<&'static Engine> {
    ENGINE.get().and_then(|r| r.as_ref().ok())
}

/// Runs `f`, turning a panic into `fallback` with errno EIO. A panic must
/// not unwind into C (Rust aborts the process there, i.e. the server). The
/// engine has no known panic site: this is the last line of defence; the
/// panic hook has printed the message on stderr (the server's log when it
/// logs to stdout/stderr).
fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        set_errno(libc::EIO);
        fallback
    })
}

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// Sets the engine up. `reserve_bytes` is the address space to reserve for
/// the heap (0 = 64 GiB), `max_bytes` the most the heap may grow to (0 = no
/// limit besides the reserve). Returns 1 if the engine is active, 0 if not
/// (see `forkpatch_disabled_reason`). Only the first call has an effect.
#[no_mangle]
pub extern "C" fn forkpatch_init(reserve_bytes: usize, max_bytes: usize) -> c_int {
    guard(0, || {
        let r = ENGINE.get_or_init(|| {
            let mut cfg = Config::default();
            if reserve_bytes != 0 {
                cfg.reserve_bytes = reserve_bytes;
            }
            if max_bytes != 0 {
                cfg.max_bytes = max_bytes;
            }
            Engine::new(cfg).map_err(|d| {
                CString::new(d.reason).unwrap_or_else(|_| CString::from(c"engine disabled"))
            })
        });
        r.is_ok() as c_int
    })
}

/// 1 if the engine is active in this process.
#[no_mangle]
pub extern "C" fn forkpatch_active() -> c_int {
    guard(0, || engine().is_some() as c_int)
}

/// Why the engine is not active (static string), or NULL if it is. If it
/// degraded after a failed fold, see `forkpatch_degraded` instead.
#[no_mangle]
pub extern "C" fn forkpatch_disabled_reason() -> *const c_char {
    guard(c"engine error".as_ptr(), || match ENGINE.get() {
        None => c"not initialised".as_ptr(),
        Some(Err(s)) => s.as_ptr(),
        Some(Ok(_)) => std::ptr::null(),
    })
}

static DEGRADED_REASON: OnceLock<CString> = OnceLock::new();

/// Why the engine degraded to stock fork (static string), or NULL if it did
/// not. Degradation is permanent, so the string stays valid.
#[no_mangle]
pub extern "C" fn forkpatch_degraded_reason() -> *const c_char {
    guard(c"engine error".as_ptr(), || {
        let Some(r) = engine().and_then(|e| e.degraded_reason()) else {
            return std::ptr::null();
        };
        DEGRADED_REASON
            .get_or_init(|| CString::new(r).unwrap_or_else(|_| CString::from(c"fold failed")))
            .as_ptr()
    })
}

/// 1 if a fold failed and the engine now uses stock fork (data intact).
#[no_mangle]
pub extern "C" fn forkpatch_degraded() -> c_int {
    guard(0, || {
        engine().is_some_and(|e| e.state() == crate::STATE_DEGRADED) as c_int
    })
}

/// 1 if `p` lies inside the engine's heap region.
#[no_mangle]
pub extern "C" fn forkpatch_region_contains(p: *const libc::c_void) -> c_int {
    guard(0, || {
        engine().is_some_and(|e| e.contains(p as usize)) as c_int
    })
}

/// `size` bytes of the heap region aligned to `align`, zero-filled when
/// first handed out, or NULL (out of memory, engine inactive, or called in
/// a snapshot child, where the caller must use anonymous memory).
#[no_mangle]
pub extern "C" fn forkpatch_region_alloc(size: usize, align: usize) -> *mut libc::c_void {
    guard(std::ptr::null_mut(), || {
        engine()
            .and_then(|e| e.alloc(size, align))
            .map_or(std::ptr::null_mut(), |p| p.as_ptr() as *mut _)
    })
}

/// Frees the pages of a page-aligned range of the region; they read as zero
/// afterwards. Returns 1 on success, 0 if refused (snapshot or fold in
/// progress, or in a child): the contents are then unchanged.
#[no_mangle]
pub extern "C" fn forkpatch_region_purge(p: *mut libc::c_void, len: usize) -> c_int {
    guard(0, || {
        engine().is_some_and(|e| e.purge(p as usize, len)) as c_int
    })
}

/// The fork replacement: returns like fork(2). With the engine inactive it
/// is fork(2). If the previous snapshot is still being folded, waits for it
/// (check `forkpatch_busy` first to avoid that).
#[no_mangle]
pub extern "C" fn forkpatch_fork() -> libc::pid_t {
    guard(-1, || {
        let Some(e) = engine() else {
            // SAFETY: plain fork(2), same contract as the caller's.
            return unsafe { libc::fork() };
        };
        match e.fork(true) {
            Ok(Forked::Child) => 0,
            Ok(Forked::Parent(pid)) => pid,
            Err(err) => {
                set_errno(err.raw_os_error().unwrap_or(libc::EAGAIN));
                -1
            }
        }
    })
}

/// Call after reaping the child returned by `forkpatch_fork` (any exit
/// status, including killed). Starts the background fold. Returns 1 if a
/// snapshot was ended.
#[no_mangle]
pub extern "C" fn forkpatch_child_exited(pid: libc::pid_t) -> c_int {
    guard(0, || engine().is_some_and(|e| e.child_exited(pid)) as c_int)
}

/// 1 while a snapshot is alive or being folded back.
#[no_mangle]
pub extern "C" fn forkpatch_busy() -> c_int {
    guard(0, || engine().is_some_and(|e| e.busy()) as c_int)
}

/// Waits up to `timeout_ms` for a running fold to finish; 1 if none runs.
#[no_mangle]
pub extern "C" fn forkpatch_wait_fold(timeout_ms: u64) -> c_int {
    guard(0, || {
        engine().is_none_or(|e| e.wait_idle(Duration::from_millis(timeout_ms))) as c_int
    })
}

/// `async-fork yes|no` at run time (see `Engine::set_async`). No effect if
/// the engine is inactive.
#[no_mangle]
pub extern "C" fn forkpatch_set_async(on: c_int) {
    guard((), || {
        if let Some(e) = engine() {
            e.set_async(on != 0);
        }
    })
}

/// Runs the engine's background (fold-back) thread on the CPUs of `cpulist`, in Redis' format
/// ("0-3,8,10-14:2": numbers, ranges, ranges with a stride), e.g. Redis'
/// `bio_cpulist`. Returns 0, or -1 with errno EINVAL (bad list; nothing
/// changed) or the error of sched_setaffinity. No effect (0) if the engine
/// is inactive.
///
/// # Safety
/// `cpulist` must be NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn forkpatch_set_thread_cpulist(cpulist: *const c_char) -> c_int {
    guard(-1, || {
        // SAFETY: the caller passes a NUL-terminated string (or NULL).
        let list = (!cpulist.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(cpulist) });
        let Some(cpus) = list.and_then(|l| parse_cpulist(&l.to_string_lossy())) else {
            set_errno(libc::EINVAL);
            return -1;
        };
        let Some(e) = engine() else {
            return 0;
        };
        match e.set_thread_cpus(&cpus) {
            Ok(()) => 0,
            Err(err) => {
                set_errno(err.raw_os_error().unwrap_or(libc::EINVAL));
                -1
            }
        }
    })
}

/// Real-time priority (1-99; 0 = normal scheduling) of the engine's fault
/// handler; see `Engine::set_rt_priority`. Returns 0
/// (also when the engine is inactive), or -1 with errno EINVAL (out of
/// range) or the error of sched_setscheduler (EPERM without CAP_SYS_NICE);
/// nothing changes on error.
#[no_mangle]
pub extern "C" fn forkpatch_set_rt_priority(priority: c_int) -> c_int {
    guard(-1, || {
        let Some(e) = engine() else {
            return 0;
        };
        match e.set_rt_priority(priority) {
            Ok(()) => 0,
            Err(err) => {
                set_errno(err.raw_os_error().unwrap_or(libc::EINVAL));
                -1
            }
        }
    })
}

/// The priority set by `forkpatch_set_rt_priority` (0 = normal scheduling,
/// also when the engine is inactive).
#[no_mangle]
pub extern "C" fn forkpatch_rt_priority() -> c_int {
    guard(0, || engine().map_or(0, |e| e.rt_priority()))
}

/// Redis' cpulist format (setcpuaffinity.c): comma-separated items, each
/// `n`, `a-b` or `a-b:stride`. None if malformed or empty.
pub fn parse_cpulist(s: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for item in s.split(',') {
        let (range, stride) = match item.split_once(':') {
            Some((r, st)) => (r, st.trim().parse::<usize>().ok().filter(|&x| x > 0)?),
            None => (item, 1),
        };
        let (a, b) = match range.split_once('-') {
            Some((a, b)) => (
                a.trim().parse::<usize>().ok()?,
                b.trim().parse::<usize>().ok()?,
            ),
            None => {
                let n = range.trim().parse::<usize>().ok()?;
                (n, n)
            }
        };
        if a > b || b >= libc::CPU_SETSIZE as usize {
            return None;
        }
        cpus.extend((a..=b).step_by(stride));
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// Overlay bytes as last measured in the background (about once a second
/// while a child lives): cheap, for INFO.
#[no_mangle]
pub extern "C" fn forkpatch_overlay_bytes_cached() -> usize {
    guard(0, || engine().map_or(0, |e| e.overlay_bytes_cached()))
}

/// Bytes of memory held by the heap memfd (its resident pages, mapped or
/// not): process RSS undercounts them after a fold-back.
#[no_mangle]
pub extern "C" fn forkpatch_region_resident_bytes() -> u64 {
    guard(0, || engine().map_or(0, |e| e.resident_bytes()))
}

/// 1 in a child created by `forkpatch_fork`.
#[no_mangle]
pub extern "C" fn forkpatch_in_child() -> c_int {
    guard(0, || engine().is_some_and(|e| e.in_child()) as c_int)
}

/// Bytes the parent currently holds copied-on-write (walks page tables).
#[no_mangle]
pub extern "C" fn forkpatch_overlay_bytes() -> usize {
    guard(0, || engine().map_or(0, |e| e.overlay_bytes()))
}

/// Fills `*out` with the engine's counters (zeros if inactive).
///
/// # Safety
/// `out` must be NULL or point to a writable `struct forkpatch_stats`.
#[no_mangle]
pub unsafe extern "C" fn forkpatch_stats(out: *mut Stats) {
    guard((), || {
        if out.is_null() {
            return;
        }
        let s = engine().map(|e| e.stats()).unwrap_or_default();
        // SAFETY: the caller guarantees out is valid for writes.
        unsafe { out.write(s) };
    })
}

#[cfg(test)]
mod tests {
    use super::{guard, parse_cpulist};

    #[test]
    fn a_panic_becomes_the_fallback_with_eio() {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r = guard(-1, || -> i32 { panic!("injected") });
        std::panic::set_hook(prev);
        assert_eq!(r, -1);
        // SAFETY: reads this thread's errno.
        assert_eq!(unsafe { *libc::__errno_location() }, libc::EIO);
        assert_eq!(guard(-1, || 5), 5);
    }

    #[test]
    fn cpulists() {
        assert_eq!(parse_cpulist("1"), Some(vec![1]));
        assert_eq!(parse_cpulist("0-3,8"), Some(vec![0, 1, 2, 3, 8]));
        assert_eq!(parse_cpulist("0-7:2,9"), Some(vec![0, 2, 4, 6, 9]));
        for bad in ["", "a", "3-1", "0-3:0", "1,,2", "0-99999"] {
            assert_eq!(parse_cpulist(bad), None, "{bad:?}");
        }
    }
}
