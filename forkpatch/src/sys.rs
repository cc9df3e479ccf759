//! Thin wrappers over the Linux primitives the engine needs: memfd, fixed
//! mappings, `mremap(MREMAP_DONTUNMAP)`, userfaultfd and `PAGEMAP_SCAN`.
//!
//! Every `unsafe` block in the crate that talks to the kernel lives here.
//! Functions that can invalidate memory other code may hold references to
//! (fixed mappings, moves, unmaps) stay `unsafe fn` with the precondition
//! spelled out; the rest are safe because the kernel validates their
//! arguments and they cannot break Rust's memory model (at worst they make a
//! thread wait for a fault to be resolved).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

pub const PAGE: usize = 4096;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `_IOC(dir, type, nr, size)` from `<asm-generic/ioctl.h>`.
const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

pub fn page_size_ok() -> bool {
    // SAFETY: sysconf has no memory-safety preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) == PAGE as libc::c_long }
}

pub fn memfd_create(name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    // SAFETY: name is a valid NUL-terminated string; the returned fd is new
    // and owned by nobody else.
    unsafe {
        let fd = cvt(libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

pub fn ftruncate(fd: &OwnedFd, len: usize) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) }).map(|_| ())
}

/// Bytes of memory the file's pages occupy (allocated blocks).
pub fn allocated_bytes(fd: &OwnedFd) -> u64 {
    // SAFETY: fstat writes into a local stat struct.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return 0;
        }
        st.st_blocks as u64 * 512
    }
}

/// Frees the file pages in `[off, off+len)`; every mapping of the file then
/// reads zeros there. Memory safety is unaffected (pages read as zero).
pub fn punch_hole(fd: &OwnedFd, off: usize, len: usize) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    cvt(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    })
    .map(|_| ())
}

/// Reserves `len` bytes of address space aligned to `align` (a power of two)
/// as an inaccessible, unaccounted anonymous mapping. Safe: it only creates a
/// new mapping at an address the kernel chooses.
pub fn reserve_aligned(len: usize, align: usize) -> io::Result<usize> {
    let total = len + align;
    // SAFETY: a fresh PROT_NONE mapping at a kernel-chosen address aliases
    // nothing; we then unmap only the parts of it we just created.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let p = p as usize;
        let a = (p + align - 1) & !(align - 1);
        if a > p {
            libc::munmap(p as *mut _, a - p);
        }
        let tail = p + total - (a + len);
        if tail > 0 {
            libc::munmap((a + len) as *mut _, tail);
        }
        Ok(a)
    }
}

/// Maps `fd` at the fixed address `addr` (read/write), shared or private.
///
/// # Safety
/// `[addr, addr+len)` must be address space owned by the caller: whatever is
/// mapped there is replaced, so no live reference may point into it unless
/// the caller guarantees the new mapping shows the same bytes.
pub unsafe fn map_fd_fixed(addr: usize, len: usize, fd: RawFd, shared: bool) -> io::Result<()> {
    let kind = if shared {
        libc::MAP_SHARED
    } else {
        // NORESERVE: a private writable view of a large reserve would otherwise
        // be charged in full against the commit limit.
        libc::MAP_PRIVATE | libc::MAP_NORESERVE
    };
    let p = libc::mmap(
        addr as *mut _,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        kind | libc::MAP_FIXED,
        fd,
        0,
    );
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Moves the page tables of `[from, from+len)` to `to`, leaving `from` mapped
/// but empty (`MREMAP_DONTUNMAP`). O(1) for 1 GiB-aligned ranges: the kernel
/// moves whole PUD/PMD entries.
///
/// # Safety
/// `to` must be a reservation owned by the caller (it is replaced). Nobody
/// may hold references into `to`.
pub unsafe fn mremap_dontunmap(from: usize, len: usize, to: usize) -> io::Result<()> {
    mremap_fixed(from, len, to, libc::MREMAP_DONTUNMAP)
}

/// Moves the mapping at `from` with its page tables to `to`, replacing
/// whatever was mapped there (`MREMAP_FIXED`); `from` becomes unmapped.
///
/// # Safety
/// Nothing may reference `[from, from+len)` afterwards, and the caller must
/// own `[to, to+len)` (its old mapping is dropped).
pub unsafe fn mremap_replace(from: usize, len: usize, to: usize) -> io::Result<()> {
    mremap_fixed(from, len, to, 0)
}

/// `mremap(from, len, len, MAYMOVE | FIXED | extra, to)`.
unsafe fn mremap_fixed(from: usize, len: usize, to: usize, extra: libc::c_int) -> io::Result<()> {
    let p = libc::mremap(
        from as *mut _,
        len,
        len,
        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | extra,
        to as *mut libc::c_void,
    );
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// # Safety
/// No live reference may point into `[addr, addr+len)`.
pub unsafe fn munmap(addr: usize, len: usize) -> io::Result<()> {
    cvt(libc::munmap(addr as *mut _, len)).map(|_| ())
}

/// Drops the pages and page-table entries of `[addr, addr+len)`
/// (`MADV_DONTNEED`). Unlike munmap it runs under the range's own VMA lock
/// (Linux >= 6.16), not the address-space lock, so a concurrent switch or
/// fork does not wait behind it (nor behind its preemption).
///
/// # Safety
/// No live reference may point into the range; its contents are lost.
pub unsafe fn discard(addr: usize, len: usize) {
    libc::madvise(addr as *mut _, len, libc::MADV_DONTNEED);
}

/// Takes and releases the address-space lock for writing, changing nothing:
/// `mprotect` of one page of a `PROT_NONE` reservation to `PROT_NONE`
/// (the kernel takes the lock before it compares the protections). Returns
/// how long that took, i.e. how long another holder of the lock kept us
/// waiting (a `/proc/<pid>/smaps` reader holds it for reading for its whole
/// walk of a mapping's page tables: ~15 ms per GiB of heap here).
pub fn address_space_lock_wait(reservation: usize) -> io::Result<Duration> {
    let t = Instant::now();
    // SAFETY: the page belongs to a PROT_NONE reservation of the caller;
    // setting PROT_NONE again changes nothing.
    cvt(unsafe { libc::mprotect(reservation as *mut _, PAGE, libc::PROT_NONE) })?;
    Ok(t.elapsed())
}

/// The calling thread's kernel thread id.
pub fn gettid() -> libc::pid_t {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::gettid() }
}

/// Restricts thread `tid` of this process to `cpus` (`sched_setaffinity`).
pub fn set_thread_affinity(tid: libc::pid_t, cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data that CPU_SET writes inside of; the
    // kernel only reads the set we pass.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            if c >= libc::CPU_SETSIZE as usize {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            libc::CPU_SET(c, &mut set);
        }
        cvt(libc::sched_setaffinity(
            tid,
            std::mem::size_of::<libc::cpu_set_t>(),
            &set,
        ))
        .map(|_| ())
    }
}

/// Schedules thread `tid` of this process `SCHED_FIFO` at `priority`
/// (1-99), or `SCHED_OTHER` for 0.
/// CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: the kernel writes one timespec into `ts`.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

pub fn set_thread_fifo(tid: libc::pid_t, priority: i32) -> io::Result<()> {
    let policy = if priority > 0 {
        libc::SCHED_FIFO
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: the kernel only reads `param`.
    cvt(unsafe { libc::sched_setscheduler(tid, policy, &param) }).map(|_| ())
}

/// `madvise` with advice that does not change memory contents
/// (e.g. `MADV_DONTFORK`). Callers must not pass destructive advice.
pub fn madvise_nondestructive(addr: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
    debug_assert!(advice == libc::MADV_DONTFORK || advice == libc::MADV_DOFORK);
    // SAFETY: DONTFORK/DOFORK only change what a future fork copies.
    cvt(unsafe { libc::madvise(addr as *mut _, len, advice) }).map(|_| ())
}

/// A zeroed array of atomic words in its own anonymous mapping, for the
/// engine's dirty-page bitmap (one bit per reserved page: 2 MiB for a 64 GiB
/// reserve). Built with `collect()` on the heap, every word was written at
/// start, so all its pages were resident and every `fork()` copied their 512
/// page-table entries: ~0.1 ms of the fork stall, for a table the child never
/// reads. Here pages stay untouched (the zero page) until a bit is set, and
/// the mapping is `MADV_DONTFORK`: the child has no bitmap at all, which is
/// fine because only the parent's handler and fold threads use it.
pub struct AtomicWords {
    ptr: *mut AtomicU64,
    len: usize,
}

// SAFETY: the words are atomics; the mapping is owned by this value.
unsafe impl Send for AtomicWords {}
unsafe impl Sync for AtomicWords {}

impl AtomicWords {
    /// The mapping's length for `len` words.
    fn map_len(len: usize) -> usize {
        (len.max(1) * 8).next_multiple_of(4096)
    }

    pub fn new(len: usize) -> io::Result<AtomicWords> {
        let bytes = Self::map_len(len);
        // SAFETY: a fresh private anonymous mapping aliases nothing; zero
        // bytes are valid AtomicU64 values.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            // Best effort: if refused, fork only copies more.
            libc::madvise(p, bytes, libc::MADV_DONTFORK);
            Ok(AtomicWords { ptr: p.cast(), len })
        }
    }
}

impl std::ops::Deref for AtomicWords {
    type Target = [AtomicU64];
    fn deref(&self) -> &[AtomicU64] {
        // SAFETY: `ptr` maps at least `len` zero-initialised words for the
        // lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for AtomicWords {
    fn drop(&mut self) {
        let bytes = Self::map_len(self.len);
        // SAFETY: our own mapping; no reference outlives self.
        unsafe {
            libc::munmap(self.ptr.cast(), bytes);
        }
    }
}

/// Copies `len` bytes between two engine mappings.
///
/// # Safety
/// Both ranges must be mapped and readable/writable for `len` bytes and must
/// not overlap; the destination must not be referenced by Rust code.
pub unsafe fn copy_pages(src: usize, dst: usize, len: usize) {
    std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len);
}

pub fn fork() -> io::Result<libc::pid_t> {
    // SAFETY: fork has no memory-safety preconditions for the parent; the
    // child only runs the caller's code, which must be fork-safe (the C ABI
    // documents this, as fork(2) itself does).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(pid)
    }
}

pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: returns a new fd owned by nobody else.
    unsafe {
        let fd = cvt(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

pub fn eventfd_signal(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a local into an eventfd.
    unsafe { libc::write(fd.as_raw_fd(), &one as *const u64 as *const _, 8) };
}

// ---------------------------------------------------------------- userfaultfd

pub const UFFD_API: u64 = 0xAA;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;

pub const MODE_MISSING: u64 = 1;
pub const MODE_WP: u64 = 2;
pub const MODE_MINOR: u64 = 4;

pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const PF_FLAG_WP: u64 = 2;

const _UFFDIO_WAKE: u64 = 0x02;
const _UFFDIO_WRITEPROTECT: u64 = 0x06;
const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x3F, 24);
const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0xAA, 0x00, 32);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0xAA, 0x01, 16);
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0xAA, _UFFDIO_WAKE, 16);
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_READ | IOC_WRITE, 0xAA, _UFFDIO_WRITEPROTECT, 24);
const USERFAULTFD_IOC_NEW: u64 = ioc(0, 0xAA, 0x00, 0);

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// One `struct uffd_msg` (32 bytes); only the page-fault arm is decoded.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct UffdMsg {
    pub event: u8,
    _r1: u8,
    _r2: u16,
    _r3: u32,
    pub pf_flags: u64,
    pub pf_address: u64,
    _feat: u64,
}

pub struct Uffd {
    fd: OwnedFd,
    pub features: u64,
    /// True when the descriptor was created without `UFFD_USER_MODE_ONLY`,
    /// i.e. faults raised inside syscalls (`read()` into the heap) are
    /// delivered instead of failing with EFAULT.
    pub kernel_faults: bool,
}

impl Uffd {
    /// Opens a userfaultfd able to see kernel-mode faults if the process is
    /// allowed to (CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1, or access
    /// to /dev/userfaultfd). `user_mode_only` forces the unprivileged flavour
    /// (used to exercise the fallback path).
    pub fn open(user_mode_only: bool) -> io::Result<Uffd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let mut kernel_faults = !user_mode_only;
        let mut fd = -1;
        if !user_mode_only {
            // SAFETY: plain syscall returning a new fd.
            fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
            if fd < 0 {
                fd = open_dev_userfaultfd(flags).unwrap_or(-1);
            }
        }
        if fd < 0 {
            kernel_faults = false;
            // SAFETY: as above.
            fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) }
                as RawFd;
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: fd is a fresh descriptor that nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Uffd {
            fd,
            features: 0,
            kernel_faults,
        })
    }

    /// UFFDIO_API handshake; returns the features the kernel granted.
    pub fn api(&mut self, features: u64) -> io::Result<u64> {
        let mut a = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: a is a properly sized, writable struct uffdio_api.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_API as _, &mut a) })?;
        self.features = a.features;
        Ok(a.features)
    }

    /// Registers `[start, start+len)`; returns the ioctl bitmask the range
    /// supports. Registration changes only fault delivery, not contents.
    pub fn register(&self, start: usize, len: usize, mode: u64) -> io::Result<u64> {
        let mut r = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode,
            ioctls: 0,
        };
        // SAFETY: r is a properly sized, writable struct uffdio_register.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut r) })?;
        Ok(r.ioctls)
    }

    pub fn unregister(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: r is a properly sized struct uffdio_range.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut r) }).map(|_| ())
    }

    /// Write-protects (`wp`) or unprotects a registered range. Unprotecting
    /// also wakes threads waiting on it unless `dontwake` (the kernel rejects
    /// `dontwake` together with `wp`).
    pub fn writeprotect(
        &self,
        start: usize,
        len: usize,
        wp: bool,
        dontwake: bool,
    ) -> io::Result<()> {
        let mut mode = 0;
        if wp {
            mode |= 1;
        }
        if dontwake {
            mode |= 2;
        }
        let mut r = UffdioWriteprotect {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode,
        };
        // SAFETY: r is a properly sized struct uffdio_writeprotect.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut r) })
            .map(|_| ())
    }

    /// Wakes every thread blocked on a fault in the range; they retry the
    /// access against whatever is mapped there now.
    pub fn wake(&self, start: usize, len: usize) -> io::Result<()> {
        let mut r = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: r is a properly sized struct uffdio_range.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut r) }).map(|_| ())
    }

    /// Non-blocking read of pending fault messages; returns how many were
    /// read (0 when none are pending).
    pub fn read_msgs(&self, buf: &mut [UffdMsg]) -> io::Result<usize> {
        let want = std::mem::size_of_val(buf);
        // SAFETY: buf is writable for `want` bytes and UffdMsg is plain data
        // with the kernel's layout.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut _, want) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(n as usize / std::mem::size_of::<UffdMsg>())
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn open_dev_userfaultfd(flags: libc::c_int) -> io::Result<RawFd> {
    // SAFETY: opening a device node and issuing its documented ioctl, which
    // returns a new userfaultfd descriptor.
    unsafe {
        let dev = cvt(libc::open(
            c"/dev/userfaultfd".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC,
        ))?;
        let dev = OwnedFd::from_raw_fd(dev);
        cvt(libc::ioctl(
            dev.as_raw_fd(),
            USERFAULTFD_IOC_NEW as _,
            flags,
        ))
    }
}

// ---------------------------------------------------------------- PAGEMAP_SCAN

pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}
const PAGEMAP_SCAN: u64 = ioc(IOC_READ | IOC_WRITE, b'f' as u64, 16, 96);

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

pub struct Pagemap {
    fd: OwnedFd,
}

impl Pagemap {
    pub fn open() -> io::Result<Pagemap> {
        // SAFETY: opening a procfs file; the fd is new.
        unsafe {
            let fd = cvt(libc::open(
                c"/proc/self/pagemap".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            ))?;
            Ok(Pagemap {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    /// Calls `f(start, end)` for every run of present, anonymous (not file)
    /// pages in `[start, end)`: in a private file mapping these are exactly
    /// the copy-on-write copies ("overlay"). Uses `buf` as the kernel's output
    /// vector so it never allocates. Returns the number of pages found.
    ///
    /// Each `PAGEMAP_SCAN` call walks its range holding the address-space
    /// lock for reading, and one call over a sparse 1 GiB heap walked it all
    /// in one go (~30 ms; 200-870 ms when the calling thread was
    /// descheduled meanwhile, perf `mmap_lock` tracepoints): any thread of
    /// the process that needs the lock for writing waits that long, and
    /// every reader after it. So calls cover at most `SCAN_CHUNK`.
    pub fn scan_anon(
        &self,
        start: usize,
        end: usize,
        buf: &mut [PageRegion],
        mut f: impl FnMut(usize, usize),
    ) -> io::Result<usize> {
        let mut cur = start as u64;
        let mut pages = 0usize;
        while cur < end as u64 {
            let mut a = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                start: cur,
                end: (cur + SCAN_CHUNK).min(end as u64),
                vec: buf.as_mut_ptr() as u64,
                vec_len: buf.len() as u64,
                category_inverted: PAGE_IS_FILE,
                category_mask: PAGE_IS_PRESENT | PAGE_IS_FILE,
                return_mask: PAGE_IS_PRESENT | PAGE_IS_FILE,
                ..Default::default()
            };
            // SAFETY: a is a valid pm_scan_arg and a.vec points to buf, which
            // is writable for vec_len PageRegion entries.
            let n = cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), PAGEMAP_SCAN as _, &mut a) })?;
            for r in &buf[..n as usize] {
                pages += ((r.end - r.start) as usize) / PAGE;
                f(r.start as usize, r.end as usize);
            }
            if a.walk_end <= cur {
                break;
            }
            cur = a.walk_end;
        }
        Ok(pages)
    }
}

/// Most address space one `PAGEMAP_SCAN` call walks (`Pagemap::scan_anon`):
/// 8192 page-table entries, ~1 ms of holding the address-space lock here.
const SCAN_CHUNK: u64 = 32 << 20;

/// Waits until `a` or `b` is readable; returns (a_ready, b_ready).
pub fn poll2(a: RawFd, b: RawFd) -> (bool, bool) {
    let mut p = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: p is a valid array of two pollfd structs.
    let r = unsafe { libc::poll(p.as_mut_ptr(), 2, -1) };
    if r <= 0 {
        return (false, false);
    }
    (p[0].revents != 0, p[1].revents != 0)
}
